//! corral's cgroup v2 subtree: where it is, what it may enforce, and each app's part of it.
//!
//! Layout: `<root>/app-<app>/worker-<slot>-<n>` (one leaf per worker process, `n` an
//! agent-internal number so a replacement and the worker it replaces never share a leaf), and
//! `<root>/app-<app>/prestart` for pre-start steps. The agent's own processes move into
//! `<root>/supervisor` only if they sit in `<root>` itself (the no-internal-processes rule).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::{self, App, ByteSize, CgroupRoot};
use crate::policy::container::{self, LimitSource, MemoryCeiling};
use crate::sys::cgroup::{self, Controller, Controllers, Kind, Leaf, Limits, Root};

/// The cgroup mount corral looks at.
const MOUNT: &str = "/sys/fs/cgroup";
/// How long what is left in a leaf gets to die after cgroup.kill.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How long an app cgroup's removal waits for its leaves' teardowns (each bounded by
/// `KILL_WAIT`) before it tries anyway.
const LEAVES_WAIT: Duration = Duration::from_secs(5);

/// What this machine gives corral.
pub struct Cgroups {
    root: Option<Root>,
    enabled: Controllers,
    /// Why there is no root, or which controllers are missing, for messages.
    why_not: Option<String>,
    summary: String,
    /// App cgroups being removed, by app name (see [`Cgroups::remove_app`]).
    removing: BTreeMap<String, JoinHandle<()>>,
    /// In a container whose cgroup is read-only: said at start as a warning.
    container_read_only: bool,
}

/// Kill whatever is left in a worker's leaf (grandchildren the worker left behind) now, then
/// wait for it to be empty and remove it in a task of its own: the event loop never waits. The
/// worker's own process has exited by now, so the wait is normally nil; what it left gets
/// cgroup.kill's SIGKILL and dies within milliseconds. The app's cgroup is removed only after
/// this task has dropped the leaf (see [`Cgroups::remove_app`]).
pub fn spawn_teardown(leaf: Leaf) {
    kill(&leaf);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn(remove_when_empty(leaf))),
        // Not in the agent, whose workers live and die inside its runtime.
        Err(_) => tracing::warn!(
            "{} is left for the next agent to remove (no runtime to wait in)",
            leaf.path().display()
        ),
    }
}

/// [`spawn_teardown`] awaited in place: for the pre-start sequence's leaf (its end is reported
/// after its leaf is gone, so a next sequence can make it again) and stale cgroups at start.
pub async fn teardown(leaf: Leaf) {
    kill(&leaf);
    remove_when_empty(leaf).await
}

fn kill(leaf: &Leaf) {
    if let Err(e) = leaf.kill() {
        tracing::warn!("killing what is left in {}: {e}", leaf.path().display());
    }
}

/// Wait for `populated 0` (the kernel's event, at most `KILL_WAIT`), then rmdir.
async fn remove_when_empty(leaf: Leaf) {
    match leaf.wait_unpopulated(KILL_WAIT).await {
        Ok(()) => {}
        Err(e @ cgroup::CgroupError::StillPopulated { .. }) => {
            tracing::error!("after cgroup.kill: {e}");
            return;
        }
        // Cannot watch or read it (gone already?): the rmdir says what is the matter.
        Err(e) => tracing::warn!("waiting for {} to empty: {e}", leaf.path().display()),
    }
    let path = leaf.path().to_path_buf();
    if let Err(e) = leaf.remove() {
        tracing::warn!("removing {}: {e}", path.display());
    }
}

/// Remove an app's cgroup once every leaf opened through it is gone: its rmdir fails (EBUSY)
/// while a leaf directory exists, and leaf teardowns run in tasks of their own.
async fn remove_app_when_empty(cg: cgroup::App) {
    if tokio::time::timeout(LEAVES_WAIT, cg.leaves_gone())
        .await
        .is_err()
    {
        tracing::warn!(
            app = %cg.name(),
            "its cgroup's leaves are still being torn down after {LEAVES_WAIT:?}"
        );
    }
    let name = cg.name().to_string();
    if let Err(e) = cg.remove() {
        tracing::warn!(app = %name, "removing its cgroup: {e}");
    }
}

/// Why a container's read-only cgroup gives no per-worker leaves, and how to change that.
fn container_read_only(path: &Path) -> String {
    format!(
        "the container's cgroup {} is read-only (container engines mount it so unless the \
         container is privileged or given a writable cgroup: Kubernetes securityContext \
         privileged: true, podman --security-opt unmask=/sys/fs/cgroup or --privileged); workers \
         run in the container's cgroup, under the container's own limits, without per-worker \
         caps",
        path.display()
    )
}

pub fn needed(app: &App) -> Vec<Controller> {
    let w = &app.workers;
    let mut v = Vec::new();
    if w.memory_max.is_some() || w.memory_high.is_some() {
        v.push(Controller::Memory);
    }
    if w.pids_max.is_some() {
        v.push(Controller::Pids);
    }
    if w.cpu_max.is_some() {
        v.push(Controller::Cpu);
    }
    v
}

/// A worker's limits from its app's config.
pub fn limits(app: &App) -> Limits {
    let w = &app.workers;
    Limits {
        memory_max: w.memory_max.map(|b| b.0),
        memory_high: w.memory_high.map(|b| b.0),
        swap_max: None,
        pids_max: w.pids_max.map(|n| n.get()),
        cpu_max: w.cpu_max,
    }
}

impl Cgroups {
    /// Find and prepare corral's subtree (creating `supervisor` and enabling memory, pids and
    /// cpu where they are delegated). Never fails: without a usable root, every worker runs in
    /// the agent's cgroup and [`Cgroups::refusal`] says what that means for capped apps.
    /// `keep`: apps whose cgroups hold workers adopted from the agent's previous image (`corral
    /// reexec`); every other app cgroup is stale and removed.
    pub async fn setup(agent: &config::Agent, keep: &[String]) -> Cgroups {
        let cgroups = Self::find(agent, false);
        if let Some(root) = &cgroups.root {
            remove_stale(root, keep).await;
        }
        cgroups
    }

    /// What [`Cgroups::setup`] would find, changing nothing (for `corral check`).
    pub fn inspect(agent: &config::Agent) -> Cgroups {
        Self::find(agent, true)
    }

    fn find(agent: &config::Agent, dry: bool) -> Cgroups {
        let detected = match cgroup::detect(Path::new(MOUNT)) {
            Ok(d) => d,
            Err(e) => return Cgroups::none(format!("cannot read {MOUNT}: {e}"), String::new()),
        };
        let summary = match &detected.kind {
            Kind::Unified => format!(
                "cgroup v2 at {MOUNT}; the agent's cgroup {} offers: {}",
                detected
                    .own_cgroup
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display(),
                detected.available
            ),
            Kind::Hybrid { unified_at } => format!(
                "hybrid cgroups: v1 controllers at {MOUNT}, v2 at {} offering: {}",
                unified_at.display(),
                detected.available
            ),
            Kind::Legacy => format!("cgroup v1 only at {MOUNT}"),
        };
        let root_path: PathBuf =
            match &agent.cgroup_root {
                CgroupRoot::Path(p) => p.clone(),
                CgroupRoot::Auto => match (
                    &detected.kind,
                    &detected.root,
                    cgroup::container_cgroup(&detected),
                ) {
                    (Kind::Unified, Some(root), _) if crate::sys::cgroup::delegated(root) => {
                        root.clone()
                    }
                    // A container's own cgroup, writable: corral's, as a delegated one would be.
                    (Kind::Unified, Some(_), Some(c)) if c.writable => c.path,
                    (Kind::Unified, Some(_), Some(c)) => {
                        return Cgroups {
                            container_read_only: true,
                            ..Cgroups::none(container_read_only(&c.path), summary)
                        };
                    }
                    (Kind::Unified, Some(root), None) => {
                        return Cgroups::none(
                            format!(
                            "the agent's cgroup {} is not delegated to it (run corral as a systemd \
                             service with Delegate=yes, or set [agent] cgroup_root to a cgroup v2 \
                             directory made for it)",
                            root.display()
                        ),
                            summary,
                        )
                    }
                    (Kind::Hybrid { .. }, _, _) => return Cgroups::none(
                        "this machine mounts cgroups in hybrid mode: the memory controller is on \
                         cgroup v1, where corral does not manage limits (boot with \
                         systemd.unified_cgroup_hierarchy=1 for cgroup v2)"
                            .to_string(),
                        summary,
                    ),
                    _ => {
                        return Cgroups::none(
                            "no cgroup v2 hierarchy for the agent".to_string(),
                            summary,
                        )
                    }
                },
            };
        let mut root = match Root::open(&root_path) {
            Ok(r) => r,
            Err(e) => return Cgroups::none(format!("cgroup_root: {e}"), summary),
        };
        if dry {
            let offered = std::fs::read_to_string(root_path.join("cgroup.controllers"))
                .map(|t| Controllers::parse(&t))
                .unwrap_or_default();
            let wanted: Controllers = [Controller::Memory, Controller::Pids, Controller::Cpu]
                .into_iter()
                .collect();
            let enabled = offered.and(wanted);
            let missing = wanted.without(enabled);
            return Cgroups {
                summary: format!(
                    "{summary}; corral's root {} with {enabled}",
                    root_path.display()
                ),
                root: Some(root),
                enabled,
                removing: BTreeMap::new(),
                container_read_only: false,
                why_not: (!missing.is_empty()).then(|| {
                    format!(
                        "{} does not have the {missing} controller(s) delegated to it",
                        root_path.display()
                    )
                }),
            };
        }
        let prepared = match root.prepare(&[Controller::Memory, Controller::Pids, Controller::Cpu])
        {
            Ok(p) => p,
            Err(e) => {
                return Cgroups::none(format!("preparing {}: {e}", root_path.display()), summary)
            }
        };
        if !prepared.moved.is_empty() {
            tracing::info!(
                "moved the agent's processes {:?} into {}/{}",
                prepared.moved,
                root_path.display(),
                cgroup::SUPERVISOR
            );
        }
        let why_not = (!prepared.missing.is_empty()).then(|| {
            format!(
                "{} does not have the {} controller(s) delegated to it",
                root_path.display(),
                prepared.missing
            )
        });
        Cgroups {
            summary: format!(
                "{summary}; corral's root {} with {}",
                root_path.display(),
                prepared.enabled
            ),
            root: Some(root),
            enabled: prepared.enabled,
            why_not,
            removing: BTreeMap::new(),
            container_read_only: false,
        }
    }

    fn none(why: String, summary: String) -> Cgroups {
        Cgroups {
            root: None,
            enabled: Controllers::default(),
            summary: if summary.is_empty() {
                why.clone()
            } else {
                format!("{summary}; no cgroup root: {why}")
            },
            why_not: Some(why),
            removing: BTreeMap::new(),
            container_read_only: false,
        }
    }

    /// Why corral has no per-worker cgroups in this container, when that is so: a warning at
    /// start (apps without limits run; the container's own limit is what caps them).
    pub fn container_warning(&self) -> Option<&str> {
        self.container_read_only
            .then_some(self.why_not.as_deref())
            .flatten()
    }

    /// One line for logs and `corral check`.
    pub fn describe(&self) -> &str {
        &self.summary
    }

    pub fn root_path(&self) -> Option<&Path> {
        self.root.as_ref().map(|r| r.path())
    }

    /// Why `app`'s limits cannot be enforced here, or `None` when they can, or when the
    /// container's own limits stand in for them: in a container whose cgroup is read-only the
    /// pod's memory.max caps the workers together (said once at start, [`Self::container_warning`];
    /// the budget is still checked against it), and the app runs.
    pub fn refusal(&self, app: &App) -> Option<String> {
        if self.container_read_only {
            return None;
        }
        let missing: Vec<&str> = needed(app)
            .into_iter()
            .filter(|c| self.root.is_none() || !self.enabled.contains(*c))
            .map(|c| c.name())
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "{}: app {}: its limits need the cgroup v2 {} controller(s), which corral cannot use \
             here: {}; fix that, or set [agent] enforce_limits = false to run it uncapped",
            app.defined_at,
            app.name,
            missing.join(", "),
            self.why_not.as_deref().unwrap_or("not enabled")
        ))
    }

    /// The app's cgroup, created if needed; `None` without a root. An app added again while
    /// its cgroup's removal waits for leaf teardowns keeps the directory: the removal is
    /// called off (on this single-threaded runtime it is parked at an await, before its rmdir,
    /// or finished).
    pub fn app(&mut self, name: &str) -> Option<Result<cgroup::App, cgroup::CgroupError>> {
        if let Some(removal) = self.removing.remove(name) {
            removal.abort();
        }
        self.root.as_ref().map(|r| r.app(name))
    }

    /// Remove a removed (or, at exit, every) app's cgroup. Ordering: its workers' leaves are
    /// torn down in tasks ([`spawn_teardown`]) that may still run, and an rmdir of the app
    /// cgroup before theirs fails with EBUSY; so the removal is a task too, which waits until
    /// every `Leaf` opened through the app is dropped (`App::leaves_gone`; a teardown drops its
    /// leaf after the rmdir), then removes the app's directory. Call it after the app's
    /// workers are dropped or have their teardowns spawned. The agent's exit awaits these
    /// tasks ([`Cgroups::removals_done`]).
    pub fn remove_app(&mut self, cg: cgroup::App) {
        self.removing.retain(|_, task| !task.is_finished());
        let name = cg.name().to_string();
        self.removing
            .insert(name, tokio::spawn(remove_app_when_empty(cg)));
    }

    /// Wait for every app cgroup removal started by [`Cgroups::remove_app`] (at the agent's
    /// exit: the runtime drops unfinished tasks when it ends).
    pub async fn removals_done(&mut self) {
        for (_, task) in std::mem::take(&mut self.removing) {
            let _ = task.await;
        }
    }

    /// memory.max of the root itself, when it is limited (a ceiling of the budget).
    pub fn root_memory_max(&self) -> Option<MemoryCeiling> {
        let root = self.root.as_ref()?;
        let file = root.path().join("memory.max");
        let text = std::fs::read_to_string(&file).ok()?;
        let bytes = container::parse_memory_max(&text).ok()??;
        Some(MemoryCeiling {
            bytes: ByteSize(bytes),
            source: LimitSource::CgroupRoot { file },
        })
    }
}

/// Remove every app-* tree a previous agent left before making new ones, except those of the
/// workers this agent adopts (`keep`: handed over by a re-exec or held by a crashed agent's
/// keeper; the workers of apps the config dropped were stopped before). Awaited before any app starts, so no app of this agent meets a stale directory
/// being removed.
async fn remove_stale(root: &Root, keep: &[String]) {
    let apps = match root.existing_apps() {
        Ok(apps) => apps,
        Err(e) => {
            tracing::warn!("listing stale cgroups under {}: {e}", root.path().display());
            return;
        }
    };
    for app in apps
        .into_iter()
        .filter(|a| !keep.iter().any(|k| k == a.name()))
    {
        for leaf in app.existing_leaves().unwrap_or_default() {
            teardown(leaf).await;
        }
        for name in ["prestart", super::acme::LEAF] {
            if let Ok(leaf) = app.named_leaf(name) {
                teardown(leaf).await;
            }
        }
        let path = app.path().to_path_buf();
        match app.remove() {
            Ok(()) => tracing::info!("removed stale cgroup {}", path.display()),
            Err(e) => tracing::warn!("stale cgroup {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped_app() -> App {
        let text = "[agent]\ninclude = []\n\
                    [app.api]\ncommand = [\"/bin/true\"]\nuser = \"root\"\n\
                    [app.api.listen]\naddress = \"127.0.0.1:8000\"\n\
                    [app.api.workers]\ncount = 2\nmemory_max = \"64MiB\"\n";
        let cfg = config::load_str(
            Path::new("/etc/corral/corral.toml"),
            text,
            &crate::sys::users::SystemLookup,
        )
        .expect("config");
        cfg.apps.into_values().next().expect("one app")
    }

    #[test]
    fn a_read_only_container_runs_capped_apps_under_its_own_limit() {
        let app = capped_app();
        let read_only = Cgroups {
            container_read_only: true,
            ..Cgroups::none(
                container_read_only(Path::new("/sys/fs/cgroup")),
                String::new(),
            )
        };
        assert_eq!(read_only.refusal(&app), None);
        assert!(
            read_only
                .container_warning()
                .is_some_and(|w| w.contains("/sys/fs/cgroup is read-only")),
            "{:?}",
            read_only.container_warning()
        );
        // Anywhere else without a root, an app with limits is refused, saying why.
        let none = Cgroups::none("no cgroup v2 hierarchy for the agent".into(), String::new());
        assert!(
            none.refusal(&app).is_some_and(
                |w| w.contains("memory controller(s)") && w.contains("no cgroup v2 hierarchy")
            ),
            "{:?}",
            none.refusal(&app)
        );
        assert_eq!(none.container_warning(), None);
    }
}
