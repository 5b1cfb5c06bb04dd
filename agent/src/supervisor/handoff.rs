//! `corral reexec`: the agent replaces its own image with its binary (the new one after a
//! package upgrade, or the same) and keeps every worker running. The process keeps its pid, so
//! the workers stay its children and systemd keeps its main process.
//!
//! What crosses the exec: the control socket, the metrics listener, each slot's listening socket, each worker's
//! pidfd and the read ends of its stdout and stderr, a TLS front's counters memfd and
//! redirect listener; close-on-exec is cleared on exactly those. A JSON [`State`] in a sealed
//! memfd names them with what the descriptors cannot say (which app and slot, restarts, the
//! last exit, uptime, the cgroup leaf). The new image adopts them (`adopt.rs`) instead of
//! binding and starting: no pre-start step runs again, no worker restarts, no socket closes,
//! so no queued connection is lost. The same [`State`], with its descriptors, is what the
//! agent sends its keeper after each change (`keeper.rs`), for the agent after a crash.
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

use serde::{Deserialize, Serialize};

use super::state::{Lifecycle, Supervisor};
use crate::config::{self, App};
use crate::policy::rollout::Phase;
use crate::sys::handoff as sys;
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
    /// A digest of the app's config as it ran (a keeper's snapshot: the next agent may read a
    /// config changed since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<u64>,
    /// A rolling replacement (or a start) was under way: not every worker runs the config.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replacing: bool,
    /// The eBPF connection tracker, so the next agent goes on counting the open connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<HandedTracking>,
}

/// An app's connection tracker: its link (held, it stays attached) and its `inflight` and
/// `since` maps.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedTracking {
    pub link: RawFd,
    pub inflight: RawFd,
    pub since: RawFd,
}

/// A worker being replaced (a keeper's snapshot during a rolling replacement): the next agent
/// stops it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedStray {
    pub pid: i32,
    pub pidfd: RawFd,
    pub leaf: Option<String>,
}

/// A digest of an app's config, as it runs (its Debug rendering: any change of a setting
/// changes it; a new binary may render differently, which only costs a rolling restart).
pub fn config_digest(cfg: &App) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{cfg:?}").hash(&mut h);
    h.finish()
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<HandedStray>,
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
            if let Some(t) = app.tracking.as_mut() {
                out.extend([&mut t.link, &mut t.inflight, &mut t.since]);
            }
            for slot in &mut app.slots {
                out.push(&mut slot.socket);
                if let Some(w) = slot.worker.as_mut() {
                    out.push(&mut w.pidfd);
                    out.push(&mut w.stdout);
                    out.push(&mut w.stderr);
                    out.extend(w.counters.as_mut());
                }
                for r in &mut slot.retired {
                    out.push(&mut r.pidfd);
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
                let retired = slot
                    .retired
                    .iter()
                    .map(|r| HandedStray {
                        pid: r.pid,
                        pidfd: raw(r.res.process.pidfd(), &mut fds),
                        leaf: r.res.leaf.as_ref().map(|l| l.name().to_string()),
                    })
                    .collect();
                slots.push(HandedSlot {
                    socket: raw(slot.socket.as_fd(), &mut fds),
                    restarts: slot.restarts,
                    oom_kills: slot.oom_kills,
                    last_exit: slot.last_exit.clone(),
                    gave_up: slot.gave_up.clone(),
                    worker,
                    retired,
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
                // A re-exec runs the same config (checked), maybe rendered by a new binary.
                config_digest: boot.map(|_| config_digest(&app.cfg)),
                replacing: app
                    .state
                    .slots
                    .iter()
                    .any(|s| s.pending_replace || !s.retired.is_empty()),
                tracking: app
                    .steering
                    .tracker_handles()
                    .map(|[link, inflight, since]| HandedTracking {
                        link: raw(link, &mut fds),
                        inflight: raw(inflight, &mut fds),
                        since: raw(since, &mut fds),
                    }),
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
                tracking: None,
                config_digest: None,
                replacing: false,
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
                    retired: vec![],
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
