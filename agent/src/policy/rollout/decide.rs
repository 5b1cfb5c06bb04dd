//! The decisions: each takes what happened and the context of the moment, updates the app's
//! bookkeeping and returns the effects to carry out, in order.

use std::time::Duration;

use super::{App, Ctx, Effect, Exit, Level, Phase, Slot, Worker, WorkerId, WorkerState};
use crate::policy::restart::{self, Decision, ExitStatus};

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
        let Some(slot) = self.current_slot_mut(id) else {
            return out;
        };
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
        let Some(slot) = self.current_slot_mut(id) else {
            return out;
        };
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
