//! corral's cgroup v2 subtree: where it is, what it may enforce, and each app's part of it.
//!
//! Layout: `<root>/app-<app>/worker-<slot>-<n>` (one leaf per worker process, `n` an
//! agent-internal number so a replacement and the worker it replaces never share a leaf), and
//! `<root>/app-<app>/prestart` for pre-start steps. The agent's own processes move into
//! `<root>/supervisor` only if they sit in `<root>` itself (the no-internal-processes rule).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{self, App, ByteSize, CgroupRoot};
use crate::sys::cgroup::{self, Controller, Controllers, Kind, Limits, Root};

/// The cgroup mount corral looks at.
const MOUNT: &str = "/sys/fs/cgroup";

/// What this machine gives corral.
pub struct Cgroups {
    root: Option<Root>,
    enabled: Controllers,
    /// Why there is no root, or which controllers are missing, for messages.
    why_not: Option<String>,
    summary: String,
}

/// The controllers an app's limits need.
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

/// Kill whatever is left in a leaf (grandchildren the worker left behind), wait until it is
/// empty, remove it. The worker's own process has exited by now, so this is immediate unless
/// it left children; those get cgroup.kill's SIGKILL and die within milliseconds.
pub(super) fn teardown_leaf(leaf: cgroup::Leaf) {
    if let Err(e) = leaf.kill() {
        tracing::warn!("killing what is left in {}: {e}", leaf.path().display());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while leaf.populated().unwrap_or(false) {
        if Instant::now() > deadline {
            tracing::error!(
                "{} still has processes after cgroup.kill",
                leaf.path().display()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let path = leaf.path().to_path_buf();
    if let Err(e) = leaf.remove() {
        tracing::warn!("removing {}: {e}", path.display());
    }
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
    pub fn setup(agent: &config::Agent, keep: &[String]) -> Cgroups {
        Self::find(agent, false, keep)
    }

    /// What [`Cgroups::setup`] would find, changing nothing (for `corral check`).
    pub fn inspect(agent: &config::Agent) -> Cgroups {
        Self::find(agent, true, &[])
    }

    fn find(agent: &config::Agent, dry: bool, keep: &[String]) -> Cgroups {
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
        let root_path: PathBuf = match &agent.cgroup_root {
            CgroupRoot::Path(p) => p.clone(),
            CgroupRoot::Auto => match (&detected.kind, &detected.root) {
                (Kind::Unified, Some(root)) if crate::sys::cgroup::delegated(root) => root.clone(),
                (Kind::Unified, Some(root)) => {
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
                (Kind::Hybrid { .. }, _) => {
                    return Cgroups::none(
                        "this machine mounts cgroups in hybrid mode: the memory controller is on \
                         cgroup v1, where corral does not manage limits (boot with \
                         systemd.unified_cgroup_hierarchy=1 for cgroup v2)"
                            .to_string(),
                        summary,
                    )
                }
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
        // Nothing of a crashed agent survives it (workers die with it), but its cgroups do:
        // remove every app-* tree before making new ones, except those of workers handed over
        // by a re-exec.
        match root.existing_apps() {
            Ok(apps) => {
                for app in apps
                    .into_iter()
                    .filter(|a| !keep.iter().any(|k| k == a.name()))
                {
                    for leaf in app.existing_leaves().unwrap_or_default() {
                        teardown_leaf(leaf);
                    }
                    if let Ok(leaf) = app.named_leaf("prestart") {
                        teardown_leaf(leaf);
                    }
                    let path = app.path().to_path_buf();
                    match app.remove() {
                        Ok(()) => tracing::info!("removed stale cgroup {}", path.display()),
                        Err(e) => tracing::warn!("stale cgroup {}: {e}", path.display()),
                    }
                }
            }
            Err(e) => tracing::warn!("listing stale cgroups under {}: {e}", root_path.display()),
        }
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
        }
    }

    /// One line for logs and `corral check`.
    pub fn describe(&self) -> &str {
        &self.summary
    }

    pub fn root_path(&self) -> Option<&Path> {
        self.root.as_ref().map(|r| r.path())
    }

    /// Why `app`'s limits cannot be enforced here, or `None` when they can.
    pub fn refusal(&self, app: &App) -> Option<String> {
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

    /// The app's cgroup, created if needed; `None` without a root.
    pub fn app(&self, name: &str) -> Option<Result<cgroup::App, cgroup::CgroupError>> {
        self.root.as_ref().map(|r| r.app(name))
    }

    /// memory.max of the root itself, when it is limited (the budget's ceiling).
    pub fn root_memory_max(&self) -> Option<ByteSize> {
        let root = self.root.as_ref()?;
        let text = std::fs::read_to_string(root.path().join("memory.max")).ok()?;
        text.trim().parse::<u64>().ok().map(ByteSize)
    }
}
