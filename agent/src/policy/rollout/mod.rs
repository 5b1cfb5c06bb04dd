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

use super::restart::{self, Decision, ExitStatus, SlotHistory};
use crate::config::Restart;

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
    /// In `[0, 1)`, spreads restart delays (see [`restart::on_exit`]).
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

fn log(level: Level, slot: Option<u32>, pid: Option<i32>, message: String) -> Effect {
    Effect::Log {
        level,
        slot,
        pid,
        message,
    }
}

/// Ask a worker to stop: it is marked stopping (its exit is then expected) and signalled,
/// unless it was stopping already (then only its exit becomes expected).
fn stop<H>(w: &mut Worker<H>, out: &mut Vec<Effect>) {
    w.expected_exit = true;
    if w.state == WorkerState::Stopping {
        return;
    }
    w.state = WorkerState::Stopping;
    out.push(Effect::Stop { id: w.id });
}

impl<S, H> App<S, H> {
    /// An app with one slot per socket, none started: [`App::first_start`] or adoption follows.
    pub fn new(sockets: impl IntoIterator<Item = S>) -> App<S, H> {
        App {
            phase: Phase::Running,
            slots: sockets.into_iter().map(Slot::new).collect(),
            removed: Vec::new(),
            note: None,
        }
    }

    // ---- what the state says ----------------------------------------------------------------

    /// The slot whose current (not retired) worker is `id`.
    pub fn slot_of_current(&self, id: WorkerId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.current.as_ref().is_some_and(|w| w.id == id))
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
    /// worker they replace, is ready (and not stopping).
    pub fn ready_slots(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.workers().any(|w| w.state == WorkerState::Ready))
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

    // ---- decisions --------------------------------------------------------------------------

    /// Start the next replacement of a rolling update, one slot at a time: a slot's new worker
    /// must be ready before its old one is told to stop and the next slot begins. Slots with
    /// no worker to replace (a first start, a scale-up) all start at once.
    pub fn advance(&mut self, ctx: &Ctx) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.phase != Phase::Running || ctx.stopping {
            return out;
        }
        let replacing = self
            .slots
            .iter()
            .any(|s| s.retired.iter().any(|w| w.state != WorkerState::Stopping));
        if replacing {
            return out;
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !slot.pending_replace {
                continue;
            }
            slot.pending_replace = false;
            slot.waiting = None;
            let had_old = match slot.current.take() {
                Some(old) => {
                    slot.retired.push(old);
                    true
                }
                None => false,
            };
            out.push(Effect::Start { slot: i as u32 });
            if had_old {
                break; // the next slot waits for this one's new worker to be ready
            }
        }
        out
    }

    /// A worker started in its slot (after [`Effect::Start`]).
    pub fn started(&mut self, worker: Worker<H>) {
        if let Some(slot) = self.slots.get_mut(worker.slot as usize) {
            slot.current = Some(worker);
        }
    }

    /// [`Effect::Start`] failed before the worker ran: a failure like an exit with status 127.
    pub fn start_failed(&mut self, slot: u32, reason: String, ctx: &Ctx) -> Vec<Effect> {
        self.after_failure(slot, reason, ExitStatus::Exited(127), Duration::ZERO, ctx)
    }

    /// A worker's readiness probe ended.
    pub fn ready(&mut self, id: WorkerId, result: Result<(), String>, ctx: &Ctx) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(i) = self.slot_of_current(id) else {
            return out;
        };
        let slot = &mut self.slots[i];
        let Some(w) = slot.current.as_mut() else {
            return out;
        };
        if w.state != WorkerState::Starting {
            return out;
        }
        match result {
            Ok(()) => {
                w.state = WorkerState::Ready;
                let took = restart::format_duration(ctx.now.saturating_duration_since(w.started));
                out.push(log(
                    Level::Info,
                    Some(w.slot),
                    Some(w.pid),
                    format!("worker ready in {took}"),
                ));
                for old in &mut slot.retired {
                    if old.state != WorkerState::Stopping {
                        stop(old, &mut out);
                    }
                }
                out.extend(self.advance(ctx));
            }
            Err(reason) => {
                out.push(log(
                    Level::Warn,
                    Some(w.slot),
                    Some(w.pid),
                    format!("worker not ready: {reason}; stopping it"),
                ));
                w.not_ready = Some(format!("not ready: {reason}"));
                stop(w, &mut out);
                // Stopping for not being ready is a failure, not a requested stop.
                w.expected_exit = false;
            }
        }
        out
    }

    /// A worker's process exited. The worker leaves the state and comes back with its handles,
    /// for the supervisor to release; `migrates`: closing a socket moves its queue to ready
    /// workers (the eBPF migrate program is attached).
    pub fn exited(
        &mut self,
        id: WorkerId,
        exit: Exit,
        migrates: bool,
        ctx: &Ctx,
    ) -> (Option<Worker<H>>, Vec<Effect>) {
        let mut out = Vec::new();
        // A removed slot's worker: expected, and its slot is gone.
        if let Some(pos) = self.removed.iter().position(|w| w.id == id) {
            let w = self.removed.remove(pos);
            out.push(log(
                Level::Info,
                Some(w.slot),
                Some(w.pid),
                format!("worker stopped ({})", exit.reason),
            ));
            // An app removed by a reload goes once its last worker has.
            if self.phase == Phase::Stopping
                && !ctx.stopping
                && self.slots.is_empty()
                && self.removed.is_empty()
            {
                out.push(Effect::Remove);
            }
            return (Some(w), out);
        }
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.workers().any(|w| w.id == id))
        else {
            return (None, out);
        };
        let slot = &mut self.slots[i];
        if exit.oom {
            slot.oom_kills += 1;
        }
        if let Some(pos) = slot.retired.iter().position(|w| w.id == id) {
            let w = slot.retired.remove(pos);
            out.push(log(
                Level::Info,
                Some(w.slot),
                Some(w.pid),
                format!("old worker stopped ({})", exit.reason),
            ));
            if w.state != WorkerState::Stopping {
                // It died while still serving beside its replacement: nothing to restart, the
                // replacement takes the slot.
                slot.last_exit = Some(exit.reason);
            }
            out.extend(self.advance(ctx));
            return (Some(w), out);
        }
        let Some(w) = slot.current.take() else {
            return (None, out);
        };
        if w.expected_exit {
            out.push(log(
                Level::Info,
                Some(w.slot),
                Some(w.pid),
                format!("worker stopped ({})", exit.reason),
            ));
            slot.last_exit = Some(exit.reason);
            if slot.pending_replace {
                out.extend(self.advance(ctx));
            }
            return (Some(w), out);
        }
        // Its listener may hold connections it never accepted: with migration, a fresh socket
        // for the slot lets the old one close and its queue move to ready workers now.
        if slot.retired.is_empty() && migrates && !ctx.stopping {
            out.push(Effect::RenewSocket { slot: i as u32 });
        }
        let reason = match &w.not_ready {
            Some(nr) => format!("{nr} ({})", exit.reason),
            None => exit.reason,
        };
        let ran_for = ctx.now.saturating_duration_since(w.started);
        out.push(log(
            Level::Warn,
            Some(w.slot),
            Some(w.pid),
            format!(
                "worker exited after {}: {reason}",
                restart::format_duration(ran_for)
            ),
        ));
        if !ctx.stopping {
            out.extend(self.after_failure(i as u32, reason, exit.status, ran_for, ctx));
        }
        (Some(w), out)
    }

    /// A worker is gone without being asked to: restart it now or later, or give up.
    fn after_failure(
        &mut self,
        slot_idx: u32,
        reason: String,
        exit: ExitStatus,
        ran_for: Duration,
        ctx: &Ctx,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if matches!(self.phase, Phase::Stopping | Phase::Failed(_)) {
            return out;
        }
        let Some(slot) = self.slots.get_mut(slot_idx as usize) else {
            return out;
        };
        slot.last_exit = Some(reason.clone());
        let decision = restart::on_exit(
            ctx.restart,
            &mut slot.history,
            &exit,
            ran_for,
            ctx.now,
            ctx.jitter,
        );
        match decision {
            Decision::Restart { after } => {
                slot.restarts += 1;
                if after.is_zero() {
                    out.push(Effect::Start { slot: slot_idx });
                } else {
                    slot.waiting = Some(ctx.token);
                    out.push(log(
                        Level::Info,
                        Some(slot_idx),
                        None,
                        format!("restarting in {}", restart::format_duration(after)),
                    ));
                    out.push(Effect::RestartLater {
                        slot: slot_idx,
                        after,
                        token: ctx.token,
                    });
                }
            }
            Decision::GiveUp { reason: why } => {
                let why = if why.contains(&reason) {
                    why
                } else {
                    format!("{why} ({reason})")
                };
                out.push(log(
                    Level::Error,
                    Some(slot_idx),
                    None,
                    format!(
                        "crash loop: {why}; the slot stays down until `corral restart {}` or a \
                         reload",
                        ctx.app
                    ),
                ));
                slot.gave_up = Some(why);
                slot.pending_replace = false;
                let serving = self.slots.iter().any(|s| {
                    s.current.is_some() || s.retired.iter().any(|w| w.state == WorkerState::Ready)
                });
                if serving {
                    for s in &mut self.slots {
                        if s.pending_replace {
                            s.pending_replace = false;
                            self.note = Some(format!(
                                "rolling update stopped: worker {slot_idx} gave up; the previous \
                                 version keeps serving the other slots"
                            ));
                        }
                    }
                }
            }
            Decision::Stay { reason: why } => {
                out.push(log(
                    Level::Info,
                    Some(slot_idx),
                    None,
                    format!("not restarting: {why}"),
                ));
            }
        }
        out
    }

    /// A restart timer fired: start the slot's worker if the timer is still the slot's.
    pub fn restart_due(&mut self, slot: u32, token: u64, ctx: &Ctx) -> Vec<Effect> {
        if ctx.stopping {
            return Vec::new();
        }
        match self.slots.get_mut(slot as usize) {
            Some(s) if s.waiting == Some(token) => {
                s.waiting = None;
                vec![Effect::Start { slot }]
            }
            _ => Vec::new(),
        }
    }

    /// A worker's memory.events `high` count is now `high`: a ready worker that crossed
    /// memory.high (`limit`, for the message) is replaced like a one-slot rolling restart.
    pub fn memory_high(&mut self, id: WorkerId, high: u64, limit: &str, ctx: &Ctx) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(i) = self.slot_of_current(id) else {
            return out;
        };
        let slot = &mut self.slots[i];
        let Some(w) = slot.current.as_mut() else {
            return out;
        };
        if high <= w.high_seen {
            return out;
        }
        w.high_seen = high;
        if w.recycling || w.state != WorkerState::Ready {
            return out;
        }
        w.recycling = true;
        out.push(log(
            Level::Warn,
            Some(w.slot),
            Some(w.pid),
            format!("crossed memory.high = {limit}; replacing it"),
        ));
        slot.pending_replace = true;
        out.extend(self.advance(ctx));
        out
    }

    /// The agent is stopping: every worker is asked to stop and nothing starts again.
    pub fn stop_all(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        if !matches!(self.phase, Phase::PreStart { .. }) {
            self.phase = Phase::Stopping;
        }
        for slot in &mut self.slots {
            slot.waiting = None;
            slot.pending_replace = false;
            for w in slot.current.iter_mut().chain(slot.retired.iter_mut()) {
                if w.state != WorkerState::Stopping || !w.expected_exit {
                    stop(w, &mut out);
                }
            }
        }
        out
    }

    /// `corral restart APP[/WORKER]` of a running app: a rolling restart of the slots named,
    /// forgetting their crash history.
    pub fn restart(&mut self, only: Option<u32>, ctx: &Ctx) -> Vec<Effect> {
        self.note = None;
        for (i, s) in self.slots.iter_mut().enumerate() {
            if only.is_none_or(|w| w as usize == i) {
                s.pending_replace = true;
                s.gave_up = None;
                s.history.reset();
            }
        }
        self.advance(ctx)
    }

    /// Pre-start steps began (run `token`).
    pub fn begin_prestart(&mut self, token: u64) {
        self.phase = Phase::PreStart { token };
    }

    /// Whether `token` names the pre-start run the app is waiting for.
    pub fn awaits_prestart(&self, token: u64) -> bool {
        matches!(self.phase, Phase::PreStart { token: t } if t == token)
    }

    /// The pre-start steps failed. `new_version`: they were a new version's (a reload), and the
    /// old version keeps serving if it has workers.
    pub fn prestart_failed(&mut self, reason: String, new_version: bool) -> Vec<Effect> {
        let out = vec![log(
            Level::Error,
            None,
            None,
            format!("{reason}; no worker of this version will start"),
        )];
        let had_workers = self.slots.iter().any(|s| s.current.is_some());
        if new_version && had_workers {
            self.phase = Phase::Running;
            self.note = Some(format!(
                "reload failed: {reason}; the previous version keeps serving"
            ));
        } else {
            self.phase = Phase::Failed(reason);
        }
        out
    }

    /// The pre-start steps succeeded: every slot (re)starts, one at a time where a worker is
    /// replaced.
    pub fn prestart_succeeded(&mut self, ctx: &Ctx) -> Vec<Effect> {
        self.phase = Phase::Running;
        self.note = None;
        for s in &mut self.slots {
            s.pending_replace = true;
        }
        self.advance(ctx)
    }

    /// A new version's pre-start steps succeeded: its sockets become the slots' (slots beyond
    /// them go away, their workers stop), and every slot is replaced one at a time.
    pub fn new_version(&mut self, sockets: Vec<S>, ctx: &Ctx) -> Vec<Effect> {
        self.phase = Phase::Running;
        self.note = None;
        let mut out = self.remove_slots(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            match self.slots.get_mut(i) {
                Some(slot) => {
                    slot.socket = socket;
                    slot.pending_replace = true;
                    slot.gave_up = None;
                    slot.history.reset();
                }
                None => {
                    let mut slot = Slot::new(socket);
                    slot.pending_replace = true;
                    self.slots.push(slot);
                }
            }
        }
        out.extend(self.advance(ctx));
        out
    }

    /// A new worker count, with a socket for each slot (the first ones the slots' own): slots
    /// beyond it go away, new ones start (at once if the app runs).
    pub fn scale(&mut self, sockets: Vec<S>, ctx: &Ctx) -> Vec<Effect> {
        let mut out = self.remove_slots(sockets.len());
        let old = self.slots.len();
        for socket in sockets.into_iter().skip(old) {
            let mut slot = Slot::new(socket);
            slot.pending_replace = true;
            self.slots.push(slot);
        }
        out.extend(self.advance(ctx));
        out
    }

    /// The app left the config: every worker stops; the app goes when the last has exited.
    pub fn remove(&mut self) -> Vec<Effect> {
        self.phase = Phase::Stopping;
        let mut out = self.remove_slots(0);
        if self.removed.is_empty() {
            out.push(Effect::Remove);
        }
        out
    }

    /// Remove the slots from `keep` on: their workers are told to stop and wait in `removed`
    /// until they exit (their sockets close with them).
    fn remove_slots(&mut self, keep: usize) -> Vec<Effect> {
        let mut out = Vec::new();
        while self.slots.len() > keep {
            let Some(mut slot) = self.slots.pop() else {
                break;
            };
            for mut w in slot
                .current
                .take()
                .into_iter()
                .chain(slot.retired.drain(..))
            {
                stop(&mut w, &mut out);
                self.removed.push(w);
            }
        }
        out
    }
}
