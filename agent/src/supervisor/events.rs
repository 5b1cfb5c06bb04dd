//! The loop's inputs and outputs: what the small tasks report ([`Event`]), how each is turned
//! into a decision of the app's bookkeeping (`policy::rollout`), and how the decision's
//! effects are carried out, in order, until none is left. No method here calls back into the
//! decisions except through that one work list, so nothing recurses.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::config::AppName;
use crate::control::{Request, Response};
use crate::policy::restart::ExitStatus;
use crate::policy::rollout::{Effect, Exit, Level, WorkerId};
use crate::sys::pidfd::WaitStatus;

use super::state::Supervisor;
use super::workers::exit_status;

pub(super) enum Event {
    Exited {
        app: AppName,
        id: WorkerId,
        status: Result<WaitStatus, String>,
    },
    Ready {
        app: AppName,
        id: WorkerId,
        result: Result<(), String>,
    },
    RestartDue {
        app: AppName,
        slot: u32,
        token: u64,
    },
    KillDue {
        app: AppName,
        id: WorkerId,
    },
    PreStartDone {
        app: AppName,
        token: u64,
        result: Result<(), String>,
    },
    /// A worker's memory.events changed.
    MemoryEvents {
        app: AppName,
        id: WorkerId,
    },
    /// Something changed where a TLS front's certificate or key files are.
    CertsChanged {
        app: AppName,
    },
    Control {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
    /// The kubelet asks (`/livez`, `/readyz`): answering at all is liveness; the reply is
    /// readiness.
    Health {
        reply: oneshot::Sender<crate::policy::health::Readiness>,
    },
    /// The reply to `corral reexec` went out: exec now.
    ReexecNow,
}

impl Supervisor {
    pub fn handle(&mut self, ev: Event) {
        self.dispatch(ev);
        self.sync_steering();
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Exited { app, id, status } => self.on_exited(&app, id, status),
            Event::Ready { app, id, result } => {
                self.decide(&app, |state, ctx| state.ready(id, result, ctx))
            }
            Event::RestartDue { app, slot, token } => {
                self.decide(&app, |state, ctx| state.restart_due(slot, token, ctx))
            }
            Event::KillDue { app, id } => {
                let w = self.apps.get(&app).and_then(|a| a.state.worker(id));
                if let Some(w) = w {
                    tracing::warn!(app = %app, worker = w.slot, pid = w.pid,
                        "did not exit within stop_timeout; sending SIGKILL");
                    let _ = w.res.process.signal(libc::SIGKILL);
                }
            }
            Event::PreStartDone { app, token, result } => {
                self.on_prestart_done(&app, token, result)
            }
            Event::MemoryEvents { app, id } => self.on_memory_events(&app, id),
            Event::CertsChanged { app } => self.on_certs_changed(&app),
            Event::Control { request, reply } => {
                let response = self.control(request);
                let _ = reply.send(response);
            }
            Event::Health { reply } => {
                let _ = reply.send(self.readiness());
            }
            Event::ReexecNow => self.reexec_now(),
        }
    }

    /// Carry out `effects` for app `name`, and what carrying them out leads to, in order.
    pub fn execute(&mut self, name: &AppName, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            // What an effect leads to comes before the effects queued after it.
            for next in self.execute_one(name, effect).into_iter().rev() {
                queue.push_front(next);
            }
        }
    }

    fn execute_one(&mut self, name: &AppName, effect: Effect) -> Vec<Effect> {
        match effect {
            Effect::Start { slot } => match self.start_worker(name, slot) {
                Ok(()) => Vec::new(),
                Err(reason) => {
                    tracing::error!(app = %name, worker = slot, "worker could not start: {reason}");
                    self.with_ctx(name, |state, ctx| state.start_failed(slot, reason, ctx))
                        .unwrap_or_default()
                }
            },
            Effect::Stop { id } => {
                self.signal_stop(name, id);
                Vec::new()
            }
            Effect::RestartLater { slot, after, token } => {
                let (tx, app) = (self.tx.clone(), name.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(Event::RestartDue { app, slot, token });
                });
                Vec::new()
            }
            Effect::RenewSocket { slot } => {
                self.renew_socket(name, slot as usize);
                Vec::new()
            }
            Effect::Remove => {
                if let Some(cg) = self.apps.remove(name).and_then(|app| app.cg) {
                    self.cgroups.remove_app(cg);
                }
                Vec::new()
            }
            Effect::Log {
                level,
                slot,
                pid,
                message,
            } => {
                match level {
                    Level::Info => tracing::info!(app = %name, worker = slot, pid, "{message}"),
                    Level::Warn => tracing::warn!(app = %name, worker = slot, pid, "{message}"),
                    Level::Error => tracing::error!(app = %name, worker = slot, pid, "{message}"),
                }
                Vec::new()
            }
        }
    }

    /// Tell every app's steering which slots are ready.
    pub fn sync_steering(&mut self) {
        for app in self.apps.values_mut() {
            let ready = app
                .state
                .ready_slots(|w, socket| Arc::ptr_eq(&w.res.socket, socket));
            app.steering.sync(ready);
        }
    }

    /// Publish every slot's load; whether any app has traffic.
    pub fn tick(&mut self) -> bool {
        let mut active = false;
        for app in self.apps.values_mut() {
            let sockets: Vec<(u32, &Arc<OwnedFd>)> = app
                .state
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u32, &s.socket))
                .collect();
            active |= app.steering.tick(&sockets);
        }
        active
    }

    /// A worker's process exited: read what only its handles can tell (an OOM kill in its
    /// leaf's memory.events, a front's last counts), release them, then decide.
    fn on_exited(&mut self, name: &AppName, id: WorkerId, status: Result<WaitStatus, String>) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let cap = app.cfg.workers.memory_max;
        let mut oom = None;
        if let Some(w) = app.state.worker_mut(id) {
            if let Some(c) = w.res.counters.take() {
                crate::front::stats::add_final(&mut app.front.totals, &c);
            }
            if let Some(leaf) = w.res.leaf.take() {
                if let (Ok(ev), Some(cap)) = (leaf.read_memory_events(), cap) {
                    if ev.oom_kill > 0 || ev.oom_group_kill > 0 {
                        oom = Some(format!("oom-killed at memory.max = {cap}"));
                    }
                }
                super::cgroups::spawn_teardown(leaf);
            }
        }
        let exit = match (&oom, &status) {
            (Some(o), Ok(s)) => Exit {
                status: exit_status(*s),
                reason: o.clone(),
                oom: true,
            },
            (None, Ok(s)) => Exit {
                status: exit_status(*s),
                reason: exit_status(*s).to_string(),
                oom: false,
            },
            (_, Err(e)) => Exit {
                status: ExitStatus::Exited(127),
                reason: e.clone(),
                oom: false,
            },
        };
        let migrates = app.steering.migrates();
        // The worker's handles are dropped here, after the decision took it out of the app.
        self.decide(name, |state, ctx| state.exited(id, exit, migrates, ctx).1);
    }

    /// A worker's memory.events changed: crossing memory.high recycles it.
    fn on_memory_events(&mut self, name: &AppName, id: WorkerId) {
        let Some(app) = self.apps.get(name) else {
            return;
        };
        let Some(w) = app.state.worker(id) else {
            return;
        };
        let Some(ev) = w
            .res
            .leaf
            .as_ref()
            .and_then(|l| l.read_memory_events().ok())
        else {
            return;
        };
        let limit = app
            .cfg
            .workers
            .memory_high
            .map(|h| h.to_string())
            .unwrap_or_default();
        self.decide(name, |state, ctx| {
            state.memory_high(id, ev.high, &limit, ctx)
        });
    }
}
