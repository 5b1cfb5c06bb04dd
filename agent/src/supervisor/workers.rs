//! Worker processes: starting one in a slot (its leaf, its environment, its readiness probe,
//! its output and exit followed), stopping one, and a slot's fresh socket after a death.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::config::{self, App, AppName};
use crate::policy::restart::ExitStatus;
use crate::policy::rollout::{Worker, WorkerId};
use crate::sys::pidfd::{Process, WaitStatus};
use crate::sys::socket;

use super::events::Event;
use super::handoff;
use super::launch;
use super::output::{self, Tag};
use super::ready;
use super::state::{Handles, Supervisor};

/// How a pidfd wait ended, in policy terms.
pub fn exit_status(w: WaitStatus) -> ExitStatus {
    match w {
        WaitStatus::Exited(code) => ExitStatus::Exited(code),
        WaitStatus::Signaled {
            signal,
            core_dumped,
        } => ExitStatus::Signaled {
            signal,
            core_dumped,
        },
    }
}

impl Supervisor {
    /// Start a worker in slot `slot_idx` ([`crate::policy::rollout::Effect::Start`]); `Err` is
    /// why it could not (the slot's failure to decide on).
    pub(super) fn start_worker(&mut self, name: &AppName, slot_idx: u32) -> Result<(), String> {
        let id = self.id();
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return Ok(());
        };
        let Some(slot) = app.state.slots.get(slot_idx as usize) else {
            return Ok(());
        };
        if slot.current.is_some() {
            tracing::debug!(app = %name, worker = slot_idx, "already has a worker; not starting another");
            return Ok(());
        }
        let socket = slot.socket.clone();
        let mut extra = vec![
            ("LISTEN_FDS".to_string(), "1".to_string()),
            ("LISTEN_FDNAMES".to_string(), name.to_string()),
            ("CORRAL_APP".to_string(), name.to_string()),
            ("CORRAL_WORKER".to_string(), slot_idx.to_string()),
        ];
        let mut notify = None;
        if app.cfg.workers.ready == config::Ready::Notify {
            match ready::notify_socket(id) {
                Ok((sock, addr)) => {
                    extra.push(("NOTIFY_SOCKET".to_string(), addr));
                    notify = Some(sock);
                }
                Err(e) => tracing::error!(app = %name, worker = slot_idx, "{e}"),
            }
        }
        let started = Instant::now();
        let leaf = match app.cg.as_ref() {
            None => None,
            Some(cg) => {
                let leaf = cg
                    .leaf(format!("{slot_idx}-{id}"))
                    .map_err(|e| format!("creating its cgroup: {e}"))?;
                let skipped = leaf
                    .set_limits(&super::cgroups::limits(&app.cfg))
                    .map_err(|e| format!("setting its cgroup limits: {e}"))?;
                for s in skipped {
                    tracing::warn!(app = %name, worker = slot_idx, "not enforced: {s}");
                }
                Some(leaf)
            }
        };
        let launch::Started {
            process,
            stdout: out,
            stderr: err,
            counters,
            counters_fd,
        } = app
            .launch
            .start(Some(&socket), &extra, leaf.as_ref().map(|l| l.dir_fd()))?;
        let pid = process.pid();
        tracing::info!(app = %name, worker = slot_idx, pid, "worker started");
        let handover = match handoff::WorkerFds::keep(&out, &err, counters_fd) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(app = %name, worker = slot_idx, "{e}; `corral reexec` will restart this worker");
                handoff::WorkerFds::default()
            }
        };
        follow(&tx, name, slot_idx, id, &process, (out, err), false);
        let (ready_cfg, timeout) = (app.cfg.workers.ready.clone(), app.cfg.workers.ready_timeout);
        let target = ready::Target {
            address: app.cfg.listen.address,
            slot: slot_idx,
            worker_pid: pid,
        };
        let notify = notify.map(|sock| ready::Notify {
            sock,
            worker_pid: pid,
        });
        // A TLS front is not probed (front/app.rs): it reports READY=1 itself, and a front
        // that does not is named with its app in the error.
        let front_of = match &app.cfg.role {
            config::Role::TlsFront { of, .. } => Some(of.clone()),
            config::Role::Workers => None,
        };
        let (listener, app_name) = (socket.clone(), name.clone());
        let probe = tokio::spawn(async move {
            let result = ready::wait_ready(&ready_cfg, target, listener, timeout, notify)
                .await
                .map_err(|e| match front_of {
                    Some(of) => ready::front_not_ready(&of, slot_idx, pid, &e),
                    None => e,
                });
            let _ = tx.send(Event::Ready {
                app: app_name,
                id,
                result,
            });
        });
        let memory_watch = watch_memory(&self.tx, name, &app.cfg, slot_idx, id, &leaf);
        let res = Handles {
            process,
            socket,
            probe: probe.abort_handle(),
            leaf,
            memory_watch,
            counters,
            handover,
        };
        app.state
            .started(Worker::starting(id, slot_idx, pid, started, res));
        Ok(())
    }

    /// SIGTERM now, SIGKILL after the app's stop_timeout
    /// ([`crate::policy::rollout::Effect::Stop`]).
    pub(super) fn signal_stop(&mut self, name: &AppName, id: WorkerId) {
        let Some(app) = self.apps.get(name) else {
            return;
        };
        let Some(w) = app.state.worker(id) else {
            return;
        };
        tracing::info!(app = %name, worker = w.slot, pid = w.pid, "stopping worker (SIGTERM)");
        let _ = w.res.process.signal(libc::SIGTERM);
        let (tx, app_name, timeout) = (self.tx.clone(), name.clone(), app.cfg.workers.stop_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Event::KillDue { app: app_name, id });
        });
    }

    /// Give slot `slot_idx` a fresh listening socket; the old one closes when its last user
    /// (the dead worker's handle) is dropped, after the slot has left the ready set.
    pub(super) fn renew_socket(&mut self, name: &AppName, slot_idx: usize) {
        self.sync_steering();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(slot) = app.state.slots.get_mut(slot_idx) else {
            return;
        };
        match socket::reuseport_listener(app.cfg.listen.address, app.cfg.listen.backlog) {
            Ok(fd) => {
                let fd = Arc::new(fd);
                match app.steering.set_socket(slot_idx as u32, &fd) {
                    Ok(()) => slot.socket = fd,
                    Err(e) => {
                        tracing::warn!(app = %name, worker = slot_idx, "keeping the old socket: {e}")
                    }
                }
            }
            Err(e) => tracing::warn!(app = %name, worker = slot_idx, "keeping the old socket: {e}"),
        }
    }
}

/// Log a worker's output and report its exit (started here, or adopted from the agent's
/// previous image).
pub(super) fn follow(
    tx: &mpsc::UnboundedSender<Event>,
    name: &AppName,
    slot_idx: u32,
    id: WorkerId,
    process: &Arc<Process>,
    (out, err): (OwnedFd, OwnedFd),
    while_down: bool,
) {
    let pid = process.pid();
    for (fd, stream) in [(out, "stdout"), (err, "stderr")] {
        output::forward(
            fd,
            Tag {
                app: name.to_string(),
                who: format!("worker={slot_idx}"),
                pid,
                stream,
            },
        );
    }
    let waiter = process.clone();
    let (app_name, tx) = (name.clone(), tx.clone());
    tokio::spawn(async move {
        // Without a cgroup this is what removes the worker's leftover children.
        let status = match waiter.wait_and_kill_group().await {
            // It exited before this agent adopted it.
            Ok(st) if while_down => Err(format!(
                "exited while the agent was down: {}",
                exit_status(st)
            )),
            Ok(st) => Ok(st),
            Err(crate::sys::pidfd::PidfdError::StatusUnknown) if while_down => {
                Err("exited while the agent was down, status unknown".to_string())
            }
            Err(crate::sys::pidfd::PidfdError::StatusUnknown) => {
                Err("exited, status unknown (adopted after an agent crash)".to_string())
            }
            Err(e) => Err(format!("lost track of it: {e}")),
        };
        let _ = tx.send(Event::Exited {
            app: app_name,
            id,
            status,
        });
    });
}

/// With `memory_high`, watch the worker leaf's memory.events so crossing it recycles the
/// worker.
pub(super) fn watch_memory(
    tx: &mpsc::UnboundedSender<Event>,
    name: &AppName,
    cfg: &App,
    slot_idx: u32,
    id: WorkerId,
    leaf: &Option<crate::sys::cgroup::Leaf>,
) -> Option<tokio::task::AbortHandle> {
    let (Some(leaf), Some(_)) = (leaf, cfg.workers.memory_high) else {
        return None;
    };
    let path = leaf.events_path(crate::sys::cgroup::EventsFile::Memory);
    match crate::sys::inotify::Watch::new(&path) {
        Ok(watch) => {
            let (tx, app_name) = (tx.clone(), name.clone());
            let task = tokio::spawn(async move {
                while watch.changed().await.is_ok() {
                    let ev = Event::MemoryEvents {
                        app: app_name.clone(),
                        id,
                    };
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            });
            Some(task.abort_handle())
        }
        Err(e) => {
            tracing::warn!(app = %name, worker = slot_idx, "memory_high will not recycle it: {e}");
            None
        }
    }
}
