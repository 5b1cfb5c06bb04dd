//! `<root>/app-<name>`: one app's cgroup, which holds its worker leaves.

use std::fmt;
use std::path::Path;

use tokio::sync::watch;

use super::controllers::Controllers;
use super::error::CgroupError;
use super::leaf::Leaf;
use super::names::{validate_name, APP_PREFIX, WORKER_PREFIX};
use super::node::Node;

/// `<root>/app-<name>`: holds the app's worker leaves.
#[derive(Debug)]
pub struct App {
    node: Node,
    parent: Node,
    name: String,
    enabled: Controllers,
    /// Every [`Leaf`] opened through this app holds a receiver of it, so [`App::leaves_gone`]
    /// sees the last one dropped.
    leaves: watch::Sender<()>,
}

impl App {
    pub(super) fn new(node: Node, parent: Node, name: String, enabled: Controllers) -> App {
        let (leaves, _) = watch::channel(());
        App {
            node,
            parent,
            name,
            enabled,
            leaves,
        }
    }

    /// The app's name (without the `app-` prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.node.path
    }

    /// Controllers enabled for the app's leaves.
    pub fn enabled(&self) -> Controllers {
        self.enabled
    }

    /// Create `worker-<id>` (`app.leaf(3)`, or `app.leaf("3b")` for a second worker of slot 3
    /// during a rolling replacement), or reuse an existing one that has no processes.
    pub fn leaf(&self, id: impl fmt::Display) -> Result<Leaf, CgroupError> {
        let id = id.to_string();
        validate_name(&id)?;
        self.make_leaf(format!("{WORKER_PREFIX}{id}"))
    }

    /// A leaf with a name of its own (`prestart`), created, or reused when it has no processes.
    pub fn named_leaf(&self, name: &str) -> Result<Leaf, CgroupError> {
        validate_name(name)?;
        self.make_leaf(name.to_string())
    }

    /// Create the leaf `name` (validated), or reuse it when it has no processes.
    fn make_leaf(&self, name: String) -> Result<Leaf, CgroupError> {
        let (node, created) = self.node.make_child(&name)?;
        if !created && !node.pids()?.is_empty() {
            return Err(CgroupError::InUse { path: node.path });
        }
        self.leaf_from(node, name)
    }

    fn leaf_from(&self, node: Node, name: String) -> Result<Leaf, CgroupError> {
        let controllers = node.controllers()?;
        Ok(Leaf::new(
            node,
            self.node.try_clone()?,
            name,
            controllers,
            self.leaves.subscribe(),
        ))
    }

    /// An existing worker leaf by its directory name (`worker-...`), populated or not: the
    /// leaf of a worker the agent's previous image handed over.
    pub fn open_leaf(&self, name: &str) -> Result<Leaf, CgroupError> {
        let id = name.strip_prefix(WORKER_PREFIX).unwrap_or("");
        validate_name(id)?;
        let node = self.node.open_child(name)?;
        self.leaf_from(node, name.to_string())
    }

    /// The worker leaves that exist, populated or not (for cleanup after a previous agent).
    pub fn existing_leaves(&self) -> Result<Vec<Leaf>, CgroupError> {
        let mut leaves = Vec::new();
        for id in self.node.children(WORKER_PREFIX)? {
            if validate_name(&id).is_err() {
                continue;
            }
            let name = format!("{WORKER_PREFIX}{id}");
            let node = self.node.open_child(&name)?;
            leaves.push(self.leaf_from(node, name)?);
        }
        Ok(leaves)
    }

    /// Resolves when no [`Leaf`] opened through this app exists any more (at once when there is
    /// none). A leaf's teardown drops it after its rmdir, so once this resolves
    /// [`App::remove`] does not fail on a leaf still being torn down.
    pub async fn leaves_gone(&self) {
        self.leaves.closed().await
    }

    /// Remove the app's cgroup; its leaves must be removed first ([`CgroupError::Busy`]
    /// otherwise, see [`App::leaves_gone`]).
    pub fn remove(self) -> Result<(), CgroupError> {
        self.parent
            .remove_child(&format!("{APP_PREFIX}{}", self.name))
    }
}
