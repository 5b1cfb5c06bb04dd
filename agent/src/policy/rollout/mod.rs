//! The life of an app's workers as a pure state machine: what happened goes in (a worker became
//! ready, exited, crossed memory.high; a restart timer fired; pre-start steps ended; a reload,
//! scale or restart was asked for), the app's bookkeeping is updated, and what to do comes back
//! as a list of [`Effect`]s (start a worker in slot N, stop worker W, wake me in D, give slot N a
//! fresh socket, drop the app), which the supervisor carries out. Nothing here waits, spawns or
//! signals, so every rule is tested with plain values.
//!
//! An app is a row of **slots**: slot N has a listening socket, a restart history and at most
//! one *current* worker; during a rolling replacement the worker it replaces waits in the slot's
//! *retired* list (still serving) until the new one is ready. Workers of slots that no longer
//! exist (scale-down, a removed app) wait in *removed* until they exit.
//!
//! The types are generic over what the supervisor keeps beside the plain facts: `S` for a slot's
//! socket and `H` for a worker's handles (pidfd, cgroup leaf, tasks). Decisions move them around
//! (a retired worker keeps its handles) but never look inside; tests use `()`.

use std::time::{Duration, Instant};

use super::restart::{ExitStatus, SlotHistory};
use crate::config::Restart;

mod decide;
#[cfg(test)]
mod tests;

/// The agent's number for a worker process, unique for the agent's life.
pub type WorkerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, not ready yet: gets no connections but its readiness probes.
    Starting,
    Ready,
    /// Told to stop (SIGTERM), not exited yet.
    Stopping,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        }
    }
}

/// One worker process as the decisions see it.
#[derive(Debug)]
pub struct Worker<H> {
    pub id: WorkerId,
    pub slot: u32,
    pub pid: i32,
    pub state: WorkerState,
    pub started: Instant,
    /// The agent asked it to stop: its exit is not a failure.
    pub expected_exit: bool,
    /// Why it was stopped for not becoming ready, if that is why.
    pub not_ready: Option<String>,
    /// memory.events `high` when last looked at.
    pub high_seen: u64,
    /// Being replaced for crossing memory.high.
    pub recycling: bool,
    /// What the supervisor holds for it.
    pub res: H,
}

impl<H> Worker<H> {
    /// A worker just started in `slot`.
    pub fn starting(id: WorkerId, slot: u32, pid: i32, started: Instant, res: H) -> Worker<H> {
        Worker {
            id,
            slot,
            pid,
            state: WorkerState::Starting,
            started,
            expected_exit: false,
            not_ready: None,
            high_seen: 0,
            recycling: false,
            res,
        }
    }
}

/// One worker slot: its socket, its history, its current worker and the ones it is replacing.
#[derive(Debug)]
pub struct Slot<S, H> {
    pub socket: S,
    pub current: Option<Worker<H>>,
    /// Workers this slot is replacing: serving until the current one is ready, then stopping.
    pub retired: Vec<Worker<H>>,
    pub history: SlotHistory,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Its workers the kernel killed at memory.max.
    pub oom_kills: u64,
    /// A restart timer is armed with this token.
    pub waiting: Option<u64>,
    pub gave_up: Option<String>,
    /// Part of a rolling replacement (or a first start) that has not reached this slot yet.
    pub pending_replace: bool,
}

impl<S, H> Slot<S, H> {
    pub fn new(socket: S) -> Slot<S, H> {
        Slot {
            socket,
            current: None,
            retired: Vec::new(),
            history: SlotHistory::default(),
            restarts: 0,
            last_exit: None,
            oom_kills: 0,
            waiting: None,
            gave_up: None,
            pending_replace: false,
        }
    }

    /// Its running workers: the current one, then those it replaces.
    pub fn workers(&self) -> impl Iterator<Item = &Worker<H>> {
        self.current.iter().chain(self.retired.iter())
    }

    /// What `corral status` calls a slot without a current worker.
    pub fn empty_state(&self) -> &'static str {
        if self.gave_up.is_some() {
            "failed"
        } else if self.waiting.is_some() {
            "waiting"
        } else {
            "exited"
        }
    }
}

/// Where an app is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Pre-start steps are running (the token names the run); a new version's, when the
    /// supervisor holds one, while the old version serves.
    PreStart {
        token: u64,
    },
    Running,
    /// It will not run until `corral restart` or a reload: why.
    Failed(String),
    /// Removed by a reload, or the agent is stopping.
    Stopping,
}

/// An app's workers and slots.
#[derive(Debug)]
pub struct App<S, H> {
    pub phase: Phase,
    pub slots: Vec<Slot<S, H>>,
    /// Workers of slots that no longer exist (scale-down, removed app), being stopped.
    pub removed: Vec<Worker<H>>,
    /// Why the app is degraded, when it is.
    pub note: Option<String>,
}

/// How loud a [`Effect::Log`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// What the supervisor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start a worker in this slot, then report [`App::started`] or [`App::start_failed`].
    Start { slot: u32 },
    /// SIGTERM this worker now and SIGKILL it after the app's stop_timeout (it is marked
    /// stopping already).
    Stop { id: WorkerId },
    /// Call [`App::restart_due`] with this slot and token after this long.
    RestartLater {
        slot: u32,
        after: Duration,
        token: u64,
    },
    /// The slot's dead worker left connections in its socket's queue: give the slot a fresh
    /// socket so that closing the old one migrates them to ready workers.
    RenewSocket { slot: u32 },
    /// An app removed by a reload has no process left: forget it and remove its cgroup.
    Remove,
    /// Tell the operator.
    Log {
        level: Level,
        slot: Option<u32>,
        pid: Option<i32>,
        message: String,
    },
}

/// What a decision may know besides the app itself.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub app: &'a str,
    pub now: Instant,
    pub restart: &'a Restart,
    /// The agent is stopping: nothing starts again.
    pub stopping: bool,
    /// In `[0, 1)`, spreads restart delays (see [`super::restart::on_exit`]).
    pub jitter: f64,
    /// A fresh number the decision may use as a timer token.
    pub token: u64,
}

/// How a worker's process ended, for the decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub status: ExitStatus,
    /// For people: "killed by signal 9 (SIGKILL)", "oom-killed at memory.max = 64MiB".
    pub reason: String,
    /// The kernel killed it at memory.max.
    pub oom: bool,
}

impl<S, H> App<S, H> {
    /// An app with one slot per socket, none started: [`App::prestart_succeeded`] or adoption follows.
    pub fn new(sockets: impl IntoIterator<Item = S>) -> App<S, H> {
        App {
            phase: Phase::Running,
            slots: sockets.into_iter().map(Slot::new).collect(),
            removed: Vec::new(),
            note: None,
        }
    }

    /// The slot whose current (not retired) worker is `id`, to change.
    pub fn current_slot_mut(&mut self, id: WorkerId) -> Option<&mut Slot<S, H>> {
        self.slots
            .iter_mut()
            .find(|s| s.current.as_ref().is_some_and(|w| w.id == id))
    }

    /// Any live worker of the app: current, retired or removed.
    pub fn worker(&self, id: WorkerId) -> Option<&Worker<H>> {
        self.workers().find(|w| w.id == id)
    }

    pub fn worker_mut(&mut self, id: WorkerId) -> Option<&mut Worker<H>> {
        if let Some(w) = self.removed.iter_mut().find(|w| w.id == id) {
            return Some(w);
        }
        self.slots
            .iter_mut()
            .flat_map(|s| s.current.iter_mut().chain(s.retired.iter_mut()))
            .find(|w| w.id == id)
    }

    /// Every live worker: each slot's current and retired ones, then the removed ones.
    pub fn workers(&self) -> impl Iterator<Item = &Worker<H>> {
        self.slots
            .iter()
            .flat_map(Slot::workers)
            .chain(self.removed.iter())
    }

    /// Slots that may get connections: their worker, or during a rolling replacement the
    /// worker they replace, is ready (and not stopping) and `serves` the slot's socket (a
    /// worker serving an old socket of the slot, after a change of address or of steering, does
    /// not take the new one's connections).
    pub fn ready_slots(&self, serves: impl Fn(&Worker<H>, &S) -> bool) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.workers()
                    .any(|w| w.state == WorkerState::Ready && serves(w, &s.socket))
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Processes the agent must still see exit before it can stop (a running pre-start
    /// sequence counts as one).
    pub fn live_processes(&self) -> usize {
        self.workers().count() + usize::from(matches!(self.phase, Phase::PreStart { .. }))
    }

    /// The app's state for `corral status`, and why when it is not plainly running.
    pub fn label(&self) -> (&'static str, Option<String>) {
        let gave_up = || self.slots.iter().find_map(|s| s.gave_up.clone());
        let any_gave_up = self.slots.iter().any(|s| s.gave_up.is_some());
        let serving = self.slots.iter().any(|s| s.current.is_some());
        match &self.phase {
            Phase::PreStart { .. } if !serving => ("starting", None),
            Phase::PreStart { .. } => ("reloading", None),
            Phase::Failed(r) => ("failed", Some(r.clone())),
            Phase::Stopping => ("stopping", None),
            Phase::Running if any_gave_up && !serving => ("failed", gave_up()),
            Phase::Running if any_gave_up => ("degraded", gave_up()),
            Phase::Running if self.note.is_some() => ("degraded", self.note.clone()),
            Phase::Running => ("running", None),
        }
    }

    /// Why the app cannot be handed to the agent's next image now (`corral reexec`), if it
    /// cannot: it must be running or failed, with every worker ready and nothing replacing.
    pub fn steady(&self, name: &str) -> Result<(), String> {
        match &self.phase {
            Phase::Running | Phase::Failed(_) => {}
            Phase::PreStart { .. } => {
                return Err(format!(
                    "app {name} is running its pre-start steps: try again when it runs"
                ))
            }
            Phase::Stopping => return Err(format!("app {name} is stopping")),
        }
        if !self.removed.is_empty() {
            return Err(format!(
                "app {name} has workers of removed slots still stopping: try again in a moment"
            ));
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if !slot.retired.is_empty() || slot.pending_replace {
                return Err(format!(
                    "app {name} is being replaced one worker at a time: try again when it is done"
                ));
            }
            if let Some(w) = &slot.current {
                if w.state != WorkerState::Ready || w.recycling {
                    let what = if w.recycling {
                        "being recycled"
                    } else {
                        w.state.as_str()
                    };
                    return Err(format!(
                        "worker {name}/{i} is {what}: try again when it is ready"
                    ));
                }
            }
        }
        Ok(())
    }
}
