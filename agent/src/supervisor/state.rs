//! What the event loop owns: the agent's phase, every app with its config, launch, steering and
//! cgroup, and beside each worker of the pure bookkeeping (`policy::rollout`) the handles that
//! make it a process (pidfd, leaf, tasks). The other supervisor modules add methods to
//! [`Supervisor`]; this one only holds the types and the small helpers they share.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::config::{App, AppName, Config};
use crate::policy::rollout::{self, Ctx, Effect};
use crate::sys::notify::Notifier;
use crate::sys::pidfd::Process;

use super::cgroups::Cgroups;
use super::events::Event;
use super::front::FrontRt;
use super::handoff;
use super::launch::Launch;
use super::steering::GroupSteering;

/// The agent's own phase. A reload is not one: it is decided and applied within one turn of
/// the loop (what it starts then runs as each app's own phase: pre-start, rolling replacement).
pub(super) enum Lifecycle {
    /// Binding, adopting, starting the apps; nothing is served on the control socket yet.
    Starting,
    Running,
    /// `corral reexec` was answered: the exec follows once the reply is out.
    Reexecuting(handoff::Pending),
    /// SIGTERM/SIGINT: every worker is stopping; the agent exits when the last has.
    Stopping,
}

/// What a worker is besides its bookkeeping: the process and what lives as long as it does.
pub(super) struct Handles {
    pub process: Arc<Process>,
    /// The listening socket this worker was given, kept open for as long as it runs.
    pub socket: Arc<OwnedFd>,
    /// The readiness probe; it must not outlive the worker (it holds the probe's 4-tuple).
    pub probe: tokio::task::AbortHandle,
    /// Its cgroup leaf, when corral has a cgroup root.
    pub leaf: Option<crate::sys::cgroup::Leaf>,
    /// The watch of its memory.events (memory_high set), stopped with the worker.
    pub memory_watch: Option<tokio::task::AbortHandle>,
    /// A TLS front's counters (shared memory it updates).
    pub counters: Option<Arc<crate::sys::front::SharedCounters>>,
    /// What `corral reexec` hands to the agent's next image besides the pidfd.
    pub handover: handoff::WorkerFds,
}

impl Drop for Handles {
    fn drop(&mut self) {
        self.probe.abort();
        if let Some(w) = &self.memory_watch {
            w.abort();
        }
        if let Some(leaf) = self.leaf.take() {
            super::cgroups::spawn_teardown(leaf);
        }
    }
}

pub(super) type AppState = rollout::App<Arc<OwnedFd>, Handles>;
pub(super) type Worker = rollout::Worker<Handles>;

/// One app as the agent runs it.
pub(super) struct AppRt {
    pub cfg: App,
    pub launch: Launch,
    /// Slots and workers.
    pub state: AppState,
    /// A new version waiting for its pre-start steps (while the app is in `PreStart`).
    pub rollout: Option<Box<Rollout>>,
    /// Tells the app's pre-start sequence to stop.
    pub cancel: watch::Sender<bool>,
    pub steering: GroupSteering,
    /// `<root>/app-<name>`, when corral has a cgroup root.
    pub cg: Option<crate::sys::cgroup::App>,
    /// A TLS front's totals and certificate watch.
    pub front: FrontRt,
}

/// A new version of an app waiting for its pre-start steps.
pub(super) struct Rollout {
    pub cfg: App,
    pub launch: Launch,
    pub sockets: Vec<Arc<OwnedFd>>,
    /// A new socket group (new address or steering kind) brings its own steering.
    pub steering: Option<GroupSteering>,
}

/// What a config needs before it can be applied: sockets bound, programs found, the steering
/// program loaded (not attached: attaching is part of applying).
pub(super) struct Prepared {
    pub launch: Launch,
    pub sockets: Vec<Arc<OwnedFd>>,
    /// `Some` for a new socket group, or when the steering kind changes.
    pub steering: Option<GroupSteering>,
}

/// A background task that ends with its owner.
pub(super) struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(super) struct Supervisor {
    pub config_path: PathBuf,
    pub config: Config,
    pub apps: BTreeMap<AppName, AppRt>,
    pub tx: mpsc::UnboundedSender<Event>,
    pub next_id: u64,
    pub notifier: Notifier,
    pub lifecycle: Lifecycle,
    pub rng: u64,
    pub cgroups: Cgroups,
    /// A dup of the control socket's listener, to hand to the next image.
    pub control_fd: Option<OwnedFd>,
    /// A dup of the metrics endpoint's listener, likewise.
    pub metrics_fd: Option<OwnedFd>,
    /// Re-execs since the agent started (`corral reexec`).
    pub generation: u32,
    /// Why the last re-exec failed.
    pub reexec_error: Option<String>,
    /// SIGTERM/SIGINT: each app's drain (see `drain.rs`).
    pub drains: super::drain::Drains,
    /// The `corral keeper` that holds this generation for the next agent if this one crashes.
    pub keeper: Option<super::keeper::Keeper>,
}

impl Supervisor {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        tx: mpsc::UnboundedSender<Event>,
        cgroups: Cgroups,
    ) -> Supervisor {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Supervisor {
            config_path,
            config,
            apps: BTreeMap::new(),
            tx,
            next_id: 1,
            notifier: Notifier::from_env(),
            lifecycle: Lifecycle::Starting,
            rng: seed,
            cgroups,
            control_fd: None,
            metrics_fd: None,
            generation: 0,
            reexec_error: None,
            drains: Default::default(),
            keeper: None,
        }
    }

    pub fn notify(&self, state: &str) {
        if let Err(e) = self.notifier.notify(state) {
            tracing::warn!("{e}");
        }
    }

    pub fn stopping(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Stopping)
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: spreads restarts of many slots; not for anything secret.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A new number: worker ids, pre-start runs and restart timers never share one.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn live_processes(&self) -> usize {
        self.apps.values().map(|a| a.state.live_processes()).sum()
    }

    /// Run `f` on the app's bookkeeping with the context of this moment (`None`: no such app).
    pub fn with_ctx<R, F>(&mut self, name: &AppName, f: F) -> Option<R>
    where
        F: FnOnce(&mut AppState, &Ctx) -> R,
    {
        let (jitter, token, stopping) = (self.jitter(), self.id(), self.stopping());
        let app = self.apps.get_mut(name)?;
        let ctx = Ctx {
            app: name.as_str(),
            now: Instant::now(),
            restart: &app.cfg.restart,
            stopping,
            jitter,
            token,
        };
        Some(f(&mut app.state, &ctx))
    }

    /// Ask the app's bookkeeping what to do about something and do it.
    pub fn decide<F>(&mut self, name: &AppName, f: F)
    where
        F: FnOnce(&mut AppState, &Ctx) -> Vec<Effect>,
    {
        if let Some(effects) = self.with_ctx(name, f) {
            self.execute(name, effects);
        }
    }
}
