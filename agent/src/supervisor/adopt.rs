//! Adopting a previous agent's generation: after `corral reexec` (the handed state in a
//! memfd) or after a crash (the state and descriptors the keeper held). Sockets, workers,
//! leaves and counters become this agent's; no pre-start step runs, no worker restarts. An
//! adopted worker that is not this agent's child (after a crash) is known by the pidfd the
//! keeper held since its spawn, and must still be in its cgroup leaf.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::apps::launch_for;
use super::budget::worker_count;
use super::events::Event;
use super::handoff::{
    config_digest, HandedApp, HandedStray, HandedWorker, State, WorkerFds, FORMAT,
};
use super::state::{AppRt, Handles, Prepared, Supervisor, Worker};
use super::workers::{follow, watch_memory};
use crate::config::{App, AppName, WorkerCount};
use crate::policy::rollout::{Effect, Phase, WorkerState};
use crate::sys::handoff as sys;
use crate::sys::pidfd::Process;

impl Supervisor {
    /// In the new image: take over `handed` for the app `cfg` (the config the old image ran,
    /// read again). Its sockets, workers, leaves and counters become this image's; a slot
    /// without a worker starts one.
    pub(super) fn adopt_app(&mut self, cfg: App, handed: HandedApp) -> Result<(), String> {
        // Nothing this image could check beforehand should fail here (the old image ran
        // `reexec-check` with this config), but if it does, the workers must not run on
        // unsupervised: they are stopped, and the app starts afresh on the next reload.
        let launch = match launch_for(&cfg, &cfg.command) {
            Ok(l) => l,
            Err(e) => {
                drop(stop_handed(handed, cfg.workers.stop_timeout));
                return Err(format!("{e}; its handed-over workers were stopped"));
            }
        };
        let name = cfg.name.clone();
        // A shared socket stands in every slot under one number: adopted once.
        let mut adopted: Vec<(RawFd, Arc<OwnedFd>)> = Vec::new();
        let mut sockets: Vec<Arc<OwnedFd>> = Vec::new();
        for s in &handed.slots {
            let fd = match adopted.iter().find(|(n, _)| *n == s.socket) {
                Some((_, fd)) => fd.clone(),
                None => {
                    let fd = sys::adopt(s.socket)
                        .map(Arc::new)
                        .map_err(|e| format!("app {name}: its sockets: {e}"))?;
                    // A crash in the middle of a stop's drain left it refusing handshakes.
                    crate::sys::socket::accept_new_connections(fd.as_fd(), cfg.listen.address)
                        .map_err(|e| format!("app {name}: its sockets: {e}"))?;
                    adopted.push((s.socket, fd.clone()));
                    fd
                }
            };
            sockets.push(fd);
        }
        let redirect = handed
            .redirect
            .map(sys::adopt)
            .transpose()
            .map_err(|e| format!("app {name}: its redirect_http listener: {e}"))?
            .map(Arc::new);
        // The drain filters it as it does the slots' sockets.
        if let (Some(fd), crate::config::Role::TlsFront { tls, .. }) = (&redirect, &cfg.role) {
            if let Some(address) = tls.redirect_http {
                crate::sys::socket::accept_new_connections(fd.as_fd(), address)
                    .map_err(|e| format!("app {name}: its redirect_http listener: {e}"))?;
            }
        }
        let mut cfg = cfg;
        if worker_count(&cfg) != handed.count {
            // `corral scale` had changed it; it lasts until the next reload, as before.
            cfg.workers.count = WorkerCount::Fixed(
                std::num::NonZeroU32::new(handed.count).unwrap_or(std::num::NonZeroU32::MIN),
            );
        }
        let changed = handed
            .config_digest
            .is_some_and(|d| d != config_digest(&cfg));
        let replacing = handed.replacing;
        let mut launch = launch;
        if redirect.is_some() {
            launch.redirect = redirect;
        }
        let prepared = Prepared {
            launch,
            sockets,
            steering: Some(super::steering::GroupSteering::load(
                &cfg,
                &self.config.agent.bpf_pin_dir,
            )),
        };
        self.add_app_idle(cfg, prepared);
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(&name) else {
            return Ok(());
        };
        if let Some(t) = handed.tracking {
            carry_counts(&name, app, t);
        }
        for (i, t) in handed.front_totals.iter().enumerate() {
            if let Some(total) = app.front.totals.get_mut(i) {
                *total = *t;
            }
        }
        // Failed if it had failed, or if this image refuses it (its workers are adopted all
        // the same: they run, and are better supervised than orphaned); running otherwise.
        if let Some(why) = handed.failed {
            app.state.phase = Phase::Failed(why);
        } else if !matches!(app.state.phase, Phase::Failed(_)) {
            app.state.phase = Phase::Running;
        }
        let mut adopted = 0;
        let mut to_start = Vec::new();
        for (i, mut hs) in handed.slots.into_iter().enumerate() {
            for stray in std::mem::take(&mut hs.retired) {
                stop_stray(&name, app, stray);
            }
            let Some(slot) = app.state.slots.get_mut(i) else {
                break;
            };
            slot.restarts = hs.restarts;
            slot.oom_kills = hs.oom_kills;
            slot.last_exit = hs.last_exit;
            slot.gave_up = hs.gave_up;
            match hs.worker {
                Some(hw) => match adopt_worker(&tx, &name, app, i as u32, hw) {
                    Ok(w) => {
                        app.state.slots[i].current = Some(w);
                        adopted += 1;
                    }
                    Err(e) => {
                        tracing::error!(app = %name, worker = i, "adopting it: {e}; starting a new one");
                        to_start.push(i as u32);
                    }
                },
                None if slot.gave_up.is_none() => to_start.push(i as u32),
                None => {}
            }
        }
        tracing::info!(app = %name, "adopted {adopted} running workers from the agent's previous image");
        if matches!(
            self.apps.get(&name).map(|a| &a.state.phase),
            Some(Phase::Running)
        ) {
            let starts = to_start.into_iter().map(|slot| Effect::Start { slot });
            self.execute(&name, starts.collect());
            if changed || replacing {
                tracing::warn!(
                    app = %name,
                    "{}: replacing its workers one at a time",
                    if replacing {
                        "the previous agent was replacing its workers"
                    } else {
                        "its config changed since its workers started"
                    }
                );
                self.decide(&name, |state, ctx| state.restart(None, ctx));
            }
        }
        Ok(())
    }
}

/// The previous agent's connection tracker goes on counting the connections it saw, until they
/// close (least-loaded keeps seeing a slot busy with long-lived connections across the crash
/// or re-exec). Without it, or if this agent cannot use it, they count from zero.
fn carry_counts(name: &AppName, app: &mut AppRt, t: super::handoff::HandedTracking) {
    let fds = [t.link, t.inflight, t.since].map(sys::adopt);
    let [Ok(link), Ok(inflight), Ok(since)] = fds else {
        tracing::warn!(app = %name, "the previous agent's connection tracker was not handed over whole: open connections count from zero");
        return;
    };
    let n = app.state.slots.len() as u32;
    match app.steering.carry([link, inflight, since], n) {
        Ok(0) => {}
        Ok(open) => tracing::info!(
            app = %name,
            "{open} connections the previous agent steered are still open: counted until they close"
        ),
        Err(e) => tracing::warn!(app = %name, "open connections count from zero: {e}"),
    }
}

/// A worker of the previous image, as this image's: its pidfd, output, leaf and counters.
fn adopt_worker(
    tx: &tokio::sync::mpsc::UnboundedSender<Event>,
    name: &AppName,
    app: &mut AppRt,
    slot_idx: u32,
    hw: HandedWorker,
) -> Result<Worker, String> {
    let pidfd = sys::adopt(hw.pidfd).map_err(|e| format!("its pidfd: {e}"))?;
    let out = sys::adopt(hw.stdout).map_err(|e| format!("its stdout: {e}"))?;
    let err = sys::adopt(hw.stderr).map_err(|e| format!("its stderr: {e}"))?;
    let counters_fd = hw
        .counters
        .map(sys::adopt)
        .transpose()
        .map_err(|e| format!("its counters: {e}"))?;
    // After a crash the keeper held this pidfd since the worker started: it names that very
    // process, whatever its pid names now, so signals through it never reach a stranger.
    let process = Arc::new(Process::adopt(hw.pid, pidfd).map_err(|e| e.to_string())?);
    let while_down = process.has_exited();
    let counters = match &counters_fd {
        None => None,
        Some(fd) => Some(Arc::new(
            crate::sys::front::SharedCounters::handed_over(fd.as_fd(), crate::front::stats::COUNT)
                .map_err(|e| format!("mapping its counters: {e}"))?,
        )),
    };
    let leaf = match (&app.cg, &hw.leaf) {
        (Some(cg), Some(leaf)) => Some(
            cg.open_leaf(leaf)
                .map_err(|e| format!("its cgroup leaf {leaf}: {e}"))?,
        ),
        _ => None,
    };
    if let (Some(l), false) = (&leaf, while_down) {
        // Alive: it must still be in its leaf (read by pid, so the pidfd is asked again
        // afterwards: if it exited in between, the pid may name another process).
        let in_leaf = l.holds_pid(hw.pid);
        if !in_leaf && !process.has_exited() {
            return Err(format!(
                "pid {} is not in its cgroup leaf {} any more; left alone",
                hw.pid,
                l.name()
            ));
        }
    }
    let handover = WorkerFds::keep(&out, &err, counters_fd)?;
    follow(tx, name, slot_idx, hw.id, &process, (out, err), while_down);
    let memory_watch = watch_memory(tx, name, &app.cfg, slot_idx, hw.id, &leaf);
    let socket = app.state.slots[slot_idx as usize].socket.clone();
    tracing::info!(app = %name, worker = slot_idx, pid = hw.pid, "adopted");
    Ok(Worker {
        id: hw.id,
        slot: slot_idx,
        pid: hw.pid,
        state: WorkerState::Ready,
        started: Instant::now()
            .checked_sub(Duration::from_millis(match hw.started_boot_ms {
                Some(b) => crate::sys::machine::boot_ms().saturating_sub(b),
                None => hw.uptime_ms,
            }))
            .unwrap_or_else(Instant::now),
        expected_exit: false,
        not_ready: None,
        high_seen: hw.high_seen,
        recycling: false,
        res: Handles {
            process,
            socket,
            // Ready already: no probe runs.
            probe: tokio::spawn(async {}).abort_handle(),
            leaf,
            memory_watch,
            counters,
            handover,
        },
    })
}

/// A worker the previous agent was replacing: stopped, and its leaf torn down once it exits.
fn stop_stray(name: &AppName, app: &AppRt, stray: HandedStray) {
    let leaf = match (&app.cg, &stray.leaf) {
        (Some(cg), Some(l)) => cg.open_leaf(l).ok(),
        _ => None,
    };
    tracing::info!(app = %name, pid = stray.pid, "stopping a worker the previous agent was replacing");
    stop_process(stray.pid, stray.pidfd, app.cfg.workers.stop_timeout, leaf);
}

/// SIGTERM through a handed-over pidfd (never by pid: after a crash the pid may name another
/// process by now), SIGKILL after `grace`, then the leaf torn down. The task ends when the
/// process is gone.
fn stop_process(
    pid: i32,
    pidfd: RawFd,
    grace: Duration,
    leaf: Option<crate::sys::cgroup::Leaf>,
) -> Option<tokio::task::JoinHandle<()>> {
    let p = sys::adopt(pidfd)
        .ok()
        .and_then(|fd| Process::adopt(pid, fd).ok())?;
    let _ = p.signal(libc::SIGTERM);
    Some(tokio::spawn(async move {
        if tokio::time::timeout(grace, p.wait()).await.is_err() {
            tracing::warn!(pid, "still running {grace:?} after SIGTERM: SIGKILL");
            let _ = p.signal(libc::SIGKILL);
            let _ = p.wait().await;
        }
        if let Some(leaf) = leaf {
            super::cgroups::spawn_teardown(leaf);
        }
    }))
}

/// In the new image: the handed state, if this image was started by `corral reexec`. A state
/// that cannot be read leaves workers this image cannot supervise: they are stopped (they are
/// its children, so their pids are safe to signal), and the agent starts from scratch.
pub fn take() -> Option<State> {
    let bytes = match sys::take_state()? {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("the previous image's handoff cannot be read ({e}); stopping the workers it left and starting afresh");
            sys::terminate_children();
            return None;
        }
    };
    match serde_json::from_slice::<State>(&bytes) {
        Ok(st) if st.format == FORMAT => Some(st),
        Ok(st) => {
            tracing::error!(
                "the previous image handed over format {} (this one takes {FORMAT}); stopping \
                 the workers it left and starting afresh",
                st.format
            );
            sys::terminate_children();
            None
        }
        Err(e) => {
            tracing::error!("the previous image's handoff is not valid ({e}); stopping the workers it left and starting afresh");
            sys::terminate_children();
            None
        }
    }
}

/// How long the workers of an app that a crashed agent ran and the config no longer has get
/// between SIGTERM and SIGKILL: their own `stop_timeout` went with the config, and the other
/// apps' start waits for them.
const UNKNOWN_APP_GRACE: Duration = Duration::from_secs(10);

/// The apps in `state` that the config no longer has (a crashed agent's, restarted with a
/// changed config; `corral reexec` checks the config first): their workers are stopped. The
/// tasks end when every one has exited, so their cgroups can be removed as stale afterwards.
pub fn stop_unknown(
    state: &mut State,
    known: &dyn Fn(&str) -> bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut state.apps)
        .into_iter()
        .partition(|a| known(&a.name));
    state.apps = keep;
    let mut stopping = Vec::new();
    for app in gone {
        tracing::warn!(app = %app.name, "handed over but not in the config: stopping its workers");
        stopping.extend(stop_handed(app, UNKNOWN_APP_GRACE));
    }
    stopping
}

/// Close every descriptor a state names, each once (a keeper's snapshot not used because a
/// re-exec handed the same things over itself).
pub fn discard(mut state: State) {
    let mut numbers: Vec<RawFd> = state.fds_mut().into_iter().map(|n| *n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    for n in numbers.into_iter().filter(|n| *n >= 0) {
        drop(sys::adopt(n));
    }
}

/// Stop a handed-over app that will not run here: its workers and those it was replacing get
/// SIGTERM (SIGKILL after `grace`), and every other descriptor it names is closed (each once:
/// a shared socket stands in every slot). The tasks end when the processes are gone.
fn stop_handed(app: HandedApp, grace: Duration) -> Vec<tokio::task::JoinHandle<()>> {
    let mut stopping = Vec::new();
    let mut closed: Vec<RawFd> = Vec::new();
    let mut close = |n: RawFd| {
        if n >= 0 && !closed.contains(&n) {
            closed.push(n);
            drop(sys::adopt(n));
        }
    };
    app.redirect.into_iter().for_each(&mut close);
    if let Some(t) = app.tracking {
        [t.link, t.inflight, t.since]
            .into_iter()
            .for_each(&mut close);
    }
    for (i, slot) in app.slots.into_iter().enumerate() {
        close(slot.socket);
        if let Some(w) = slot.worker {
            w.counters.into_iter().for_each(&mut close);
            // Its last lines are logged like any worker's.
            for (n, stream) in [(w.stdout, "stdout"), (w.stderr, "stderr")] {
                if let Ok(fd) = sys::adopt(n) {
                    let tag = super::output::Tag {
                        app: app.name.clone(),
                        who: format!("worker={i}"),
                        pid: w.pid,
                        stream,
                    };
                    super::output::forward(fd, tag);
                }
            }
            stopping.extend(stop_process(w.pid, w.pidfd, grace, None));
        }
        for r in slot.retired {
            stopping.extend(stop_process(r.pid, r.pidfd, grace, None));
        }
    }
    stopping
}
