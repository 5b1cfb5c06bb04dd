//! `corral reexec`: the agent replaces its own image with its binary (the new one after a
//! package upgrade, or the same) and keeps every worker running. The process keeps its pid, so
//! the workers stay its children (their parent-death signal does not fire: the exec'ing thread
//! is the one that started them) and systemd keeps its main process.
//!
//! What crosses the exec: the control socket, the metrics listener, each slot's listening socket, each worker's
//! pidfd and the read ends of its stdout and stderr, a TLS front's counters memfd and
//! redirect listener; close-on-exec is cleared on exactly those. A JSON [`State`] in a sealed
//! memfd names them with what the descriptors cannot say (which app and slot, restarts, the
//! last exit, uptime, the cgroup leaf). The new image adopts them instead of binding and
//! starting: no pre-start step runs again, no worker restarts, no socket closes, so no queued
//! connection is lost.
//!
//! Steering: a socket can be in one eBPF socket array at a time, so the old image takes its
//! sockets out of its program's array just before the exec; until the new image attaches its
//! own program (replacing the old one in the group) and publishes the ready workers, the old
//! program finds nothing to select and the kernel's hash spreads new connections over the
//! group's sockets, every one of which has a ready worker. The in-flight counts start again
//! from zero in the new program.
//!
//! Refused, with the reason, unless the agent is steady: no pre-start step or rolling
//! replacement running, no worker starting or stopping, and the config on disk equal to the
//! running one (the new image reads it again and must find the apps it adopts). Before the
//! exec the old image runs `<binary> reexec-check --config FILE`: the new binary must load the
//! config and take this handoff [`FORMAT`], or nothing happens. A failed exec undoes the
//! preparation and the agent runs on, with the reason in `corral status --json`.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::apps::{launch_for, worker_count};
use super::events::Event;
use super::state::{AppRt, Handles, Lifecycle, Prepared, Supervisor, Worker};
use super::workers::{follow, watch_memory};
use crate::config::{self, App, AppName, WorkerCount};
use crate::policy::rollout::{Effect, Phase, WorkerState};
use crate::sys::handoff as sys;
use crate::sys::pidfd::Process;
use crate::sys::users::SystemLookup;

/// The handed state's format. `corral reexec-check` prints the one a binary takes; the old
/// image does not exec a binary that takes another.
pub const FORMAT: u32 = 1;

/// The line `corral reexec-check` prints when the config loads.
pub fn check_line() -> String {
    format!("corral handoff format {FORMAT}")
}

/// Descriptors of a worker that the next image needs besides its pidfd: dups of the read ends
/// of its stdout and stderr (the forwarding tasks own the originals), and a TLS front's
/// counters memfd.
#[derive(Debug, Default)]
pub struct WorkerFds {
    outputs: Option<[OwnedFd; 2]>,
    counters: Option<OwnedFd>,
}

impl WorkerFds {
    pub fn keep(out: &OwnedFd, err: &OwnedFd, counters: Option<OwnedFd>) -> Result<Self, String> {
        let dup = |f: &OwnedFd| {
            f.try_clone()
                .map_err(|e| format!("keeping its output pipes for a re-exec: {e}"))
        };
        Ok(WorkerFds {
            outputs: Some([dup(out)?, dup(err)?]),
            counters,
        })
    }
}

/// What the old image hands to the new one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    /// Re-execs so far, this one included.
    pub generation: u32,
    /// The next worker id, so new leaves never take an adopted worker's name.
    pub next_id: u64,
    pub control: RawFd,
    /// The `[agent] metrics` listener.
    pub metrics: Option<RawFd>,
    /// The open-file limit the agent started with (soft, hard), which children get back: the
    /// new image starts with the raised one.
    pub child_nofile: Option<[u64; 2]>,
    pub apps: Vec<HandedApp>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedApp {
    pub name: String,
    /// Why the app had failed (it stays failed, with no worker).
    pub failed: Option<String>,
    /// The worker count it ran with (`corral scale` may have changed it).
    pub count: u32,
    /// A TLS front: what its exited processes counted.
    pub front_totals: Vec<u64>,
    /// A TLS front's `redirect_http` listener.
    pub redirect: Option<RawFd>,
    pub slots: Vec<HandedSlot>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedSlot {
    pub socket: RawFd,
    pub restarts: u32,
    pub oom_kills: u64,
    pub last_exit: Option<String>,
    pub gave_up: Option<String>,
    pub worker: Option<HandedWorker>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedWorker {
    pub id: u64,
    pub pid: i32,
    pub pidfd: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub uptime_ms: u64,
    /// Its cgroup leaf's directory name (`worker-...`) under the app's cgroup.
    pub leaf: Option<String>,
    pub counters: Option<RawFd>,
    pub high_seen: u64,
    /// Its start in CLOCK_BOOTTIME milliseconds (a keeper's snapshot: its uptime is reckoned
    /// when a later agent adopts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_boot_ms: Option<u64>,
}

impl State {
    /// Every descriptor number the state names (a shared socket once per slot).
    pub fn fds_mut(&mut self) -> Vec<&mut RawFd> {
        let mut out = vec![&mut self.control];
        out.extend(self.metrics.as_mut());
        for app in &mut self.apps {
            out.extend(app.redirect.as_mut());
            for slot in &mut app.slots {
                out.push(&mut slot.socket);
                if let Some(w) = slot.worker.as_mut() {
                    out.push(&mut w.pidfd);
                    out.push(&mut w.stdout);
                    out.push(&mut w.stderr);
                    out.extend(w.counters.as_mut());
                }
            }
        }
        out
    }
}

/// The old image's decision, kept between the reply to `corral reexec` and the exec.
pub struct Pending {
    binary: PathBuf,
}

/// Run `binary reexec-check --config FILE`: it must print [`check_line`].
fn preflight(binary: &Path, config: &Path) -> Result<(), String> {
    let out = std::process::Command::new(binary)
        .arg("reexec-check")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {} reexec-check: {e}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.lines().any(|l| l.trim() == check_line()) {
        return Ok(());
    }
    let said = format!(
        "{}{}",
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Err(format!(
        "{} cannot take over ({}): {}",
        binary.display(),
        out.status,
        if said.is_empty() {
            format!("it does not print `{}`", check_line())
        } else {
            said
        }
    ))
}

/// A raw descriptor number owned by `fd`.
fn raw(fd: BorrowedFd<'_>, list: &mut Vec<RawFd>) -> RawFd {
    let n = fd.as_raw_fd();
    list.push(n);
    n
}

impl Supervisor {
    /// `corral reexec`: check that a handover is possible now and that the binary can take it.
    /// The exec itself follows the reply ([`Supervisor::reexec_now`]).
    pub(super) fn prepare_reexec(&mut self) -> Result<String, String> {
        if matches!(self.lifecycle, Lifecycle::Reexecuting(_)) {
            return Err("a re-exec is already under way".into());
        }
        let on_disk = config::load(&self.config_path, &SystemLookup).map_err(|e| {
            format!("the config on disk does not load, so the next image could not start: {e}")
        })?;
        if on_disk != self.config {
            return Err(
                "the config on disk differs from the running one: apply it with \
                        `corral reload` first (a re-exec hands over the apps as they run)"
                    .into(),
            );
        }
        self.steady()?;
        let binary =
            sys::running_binary().map_err(|e| format!("finding the agent's binary: {e}"))?;
        preflight(&binary, &self.config_path)?;
        let workers = self
            .apps
            .values()
            .flat_map(|a| &a.state.slots)
            .filter(|s| s.current.is_some())
            .count();
        let message = format!(
            "re-executing {} (pid {}): {workers} workers of {} apps keep running",
            binary.display(),
            std::process::id(),
            self.apps.len()
        );
        self.lifecycle = Lifecycle::Reexecuting(Pending { binary });
        self.reexec_error = None;
        Ok(message)
    }

    /// Why a handover is not possible now, if it is not.
    fn steady(&self) -> Result<(), String> {
        if self.control_fd.is_none() {
            return Err("the control socket cannot be handed over".into());
        }
        for (name, app) in &self.apps {
            app.state.steady(name.as_str())?;
            for (i, slot) in app.state.slots.iter().enumerate() {
                if slot
                    .current
                    .as_ref()
                    .is_some_and(|w| w.res.handover.outputs.is_none())
                {
                    return Err(format!(
                        "worker {name}/{i}'s output pipes could not be kept for a re-exec: \
                         restart it first (`corral restart {name}/{i}`)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The state to hand over, and every descriptor it names. For the keeper (`boot`: the
    /// keeper's clock), workers carry their start instead of their uptime, so an unchanged
    /// state encodes the same.
    pub(super) fn handed_state(
        &self,
        boot: Option<&super::keeper::Keeper>,
    ) -> Result<(State, Vec<RawFd>), String> {
        let mut fds = Vec::new();
        let control = self
            .control_fd
            .as_ref()
            .map(|f| raw(f.as_fd(), &mut fds))
            .ok_or("no control socket to hand over")?;
        let mut apps = Vec::new();
        for (name, app) in &self.apps {
            let mut slots = Vec::new();
            for slot in &app.state.slots {
                let worker = match &slot.current {
                    None => None,
                    Some(w) => {
                        let [out, err] = w
                            .res
                            .handover
                            .outputs
                            .as_ref()
                            .ok_or("a worker's output pipes were not kept")?;
                        Some(HandedWorker {
                            id: w.id,
                            pid: w.pid,
                            pidfd: raw(w.res.process.pidfd(), &mut fds),
                            stdout: raw(out.as_fd(), &mut fds),
                            stderr: raw(err.as_fd(), &mut fds),
                            uptime_ms: match boot {
                                Some(_) => 0,
                                None => w.started.elapsed().as_millis() as u64,
                            },
                            started_boot_ms: boot.map(|k| k.boot_ms_of(w.started)),
                            leaf: w.res.leaf.as_ref().map(|l| l.name().to_string()),
                            counters: w
                                .res
                                .handover
                                .counters
                                .as_ref()
                                .map(|c| raw(c.as_fd(), &mut fds)),
                            high_seen: w.high_seen,
                        })
                    }
                };
                slots.push(HandedSlot {
                    socket: raw(slot.socket.as_fd(), &mut fds),
                    restarts: slot.restarts,
                    oom_kills: slot.oom_kills,
                    last_exit: slot.last_exit.clone(),
                    gave_up: slot.gave_up.clone(),
                    worker,
                });
            }
            apps.push(HandedApp {
                name: name.to_string(),
                failed: match &app.state.phase {
                    Phase::Failed(why) => Some(why.clone()),
                    _ => None,
                },
                count: app.state.slots.len() as u32,
                front_totals: app.front.totals.to_vec(),
                redirect: app
                    .launch
                    .redirect
                    .as_ref()
                    .map(|r| raw(r.as_fd(), &mut fds)),
                slots,
            });
        }
        Ok((
            State {
                format: FORMAT,
                generation: self.generation + 1,
                next_id: self.next_id,
                control,
                metrics: self.metrics_fd.as_ref().map(|f| raw(f.as_fd(), &mut fds)),
                child_nofile: crate::sys::machine::child_nofile().map(|l| [l.soft, l.hard]),
                apps,
            },
            fds,
        ))
    }

    /// After the reply to `corral reexec` went out: exec, or undo and say why.
    pub(super) fn reexec_now(&mut self) {
        let pending = match std::mem::replace(&mut self.lifecycle, Lifecycle::Running) {
            Lifecycle::Reexecuting(p) => p,
            other => {
                self.lifecycle = other;
                return;
            }
        };
        match self.exec_into(&pending.binary) {
            Ok(never) => match never {},
            Err(e) => {
                tracing::error!("re-exec failed; the agent keeps running as it was: {e}");
                self.reexec_error = Some(e);
            }
        }
    }

    fn exec_into(&mut self, binary: &Path) -> Result<std::convert::Infallible, String> {
        // Anything may have happened since the reply: check again.
        self.steady()?;
        let (state, fds) = self.handed_state(None)?;
        let json = serde_json::to_vec(&state).map_err(|e| format!("encoding the state: {e}"))?;
        let memfd = sys::state_memfd(&json).map_err(|e| format!("the state memfd: {e}"))?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        tracing::info!(
            generation = state.generation,
            "re-executing {} {}; {} descriptors handed over",
            binary.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            fds.len() + 1
        );
        for app in self.apps.values_mut() {
            let n = app.state.slots.len() as u32;
            if let Err(e) = app.steering.release(n) {
                self.restore_steering();
                return Err(format!("releasing the steering sockets: {e}"));
            }
        }
        let mut inherit: Vec<RawFd> = fds;
        inherit.push(memfd.as_raw_fd());
        // Every number in `inherit` belongs to a descriptor this supervisor owns (collected
        // just above) and stays open for the duration of this function.
        let undo = |upto: usize| {
            for fd in &inherit[..upto] {
                let _ = sys::set_inherit_raw(*fd, false);
            }
        };
        for (i, fd) in inherit.iter().enumerate() {
            if let Err(e) = sys::set_inherit_raw(*fd, true) {
                undo(i);
                self.restore_steering();
                return Err(e.to_string());
            }
        }
        // Signals that arrive during the exec wait for the new image's handlers.
        let blocked = sys::block_signals();
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::sys::notify::monotonic_usec()
        ));
        let err = sys::exec(binary, &args, &memfd);
        if let Err(e) = blocked {
            tracing::debug!("blocking signals for the exec: {e}");
        }
        let _ = sys::unblock_signals();
        undo(inherit.len());
        self.restore_steering();
        self.notify("READY=1");
        Err(err.to_string())
    }

    /// After a failed exec: every socket back in its program's array, the ready set again.
    fn restore_steering(&mut self) {
        for (name, app) in self.apps.iter_mut() {
            let sockets: Vec<Arc<OwnedFd>> =
                app.state.slots.iter().map(|s| s.socket.clone()).collect();
            if let Err(e) = app.steering.install(&sockets) {
                tracing::error!(app = %name, "re-attaching connection steering: {e}");
            }
        }
        self.sync_steering();
    }

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
                stop_handed(handed);
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
        let mut cfg = cfg;
        if worker_count(&cfg) != handed.count {
            // `corral scale` had changed it; it lasts until the next reload, as before.
            cfg.workers.count = WorkerCount::Fixed(
                std::num::NonZeroU32::new(handed.count).unwrap_or(std::num::NonZeroU32::MIN),
            );
        }
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
        for (i, hs) in handed.slots.into_iter().enumerate() {
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
        }
        Ok(())
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
            crate::sys::front::SharedCounters::from_fd(fd.as_fd(), crate::front::stats::COUNT)
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

/// The slots of the apps in `state` that the config no longer has (it cannot happen through
/// `corral reexec`, which checks the config first): their workers are stopped.
pub fn stop_unknown(state: &mut State, known: &dyn Fn(&str) -> bool) {
    let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut state.apps)
        .into_iter()
        .partition(|a| known(&a.name));
    state.apps = keep;
    for app in gone {
        tracing::warn!(app = %app.name, "handed over but not in the config: stopping its workers");
        stop_handed(app);
    }
}

/// SIGTERM to a handed-over app's workers, reaped when they exit.
fn stop_handed(app: HandedApp) {
    for w in app.slots.into_iter().filter_map(|s| s.worker) {
        if let Ok(fd) = sys::adopt(w.pidfd) {
            if let Ok(p) = Process::new(w.pid, fd) {
                let _ = p.signal(libc::SIGTERM);
                tokio::spawn(async move {
                    let _ = p.wait().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_rejects_unknown_fields() {
        let st = State {
            format: FORMAT,
            generation: 2,
            next_id: 9,
            control: 7,
            metrics: None,
            child_nofile: Some([1024, 4096]),
            apps: vec![HandedApp {
                name: "web".into(),
                failed: None,
                count: 1,
                front_totals: vec![],
                redirect: None,
                slots: vec![HandedSlot {
                    socket: 8,
                    restarts: 1,
                    oom_kills: 0,
                    last_exit: Some("killed by signal 9 (SIGKILL)".into()),
                    gave_up: None,
                    worker: Some(HandedWorker {
                        id: 4,
                        pid: 1234,
                        pidfd: 10,
                        stdout: 11,
                        stderr: 12,
                        uptime_ms: 5000,
                        leaf: Some("worker-0-4".into()),
                        counters: None,
                        high_seen: 0,
                        started_boot_ms: None,
                    }),
                }],
            }],
        };
        let json = serde_json::to_string(&st).expect("encode");
        let back: State = serde_json::from_str(&json).expect("decode");
        assert_eq!(
            back.apps[0].slots[0].worker.as_ref().map(|w| w.pid),
            Some(1234)
        );
        let extra = json.replacen("\"format\"", "\"surprise\":1,\"format\"", 1);
        assert!(serde_json::from_str::<State>(&extra).is_err());
    }
}
