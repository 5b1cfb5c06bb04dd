//! The agent's side of `corral keeper` (see `crate::keeper`): at start, adopt the generation a
//! keeper holds for a crashed agent, or start a keeper; then send it a snapshot (the handoff
//! [`State`] and its descriptors) whenever that changes; on a planned stop, tell it to exit.

use std::os::fd::{AsFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::handoff::State;
use super::state::Supervisor;
use crate::keeper::{OutputPipe, Snapshot, SpoolLine};
use crate::sys::keeper as chan;

/// How long a send to, or an answer from, the keeper may take.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Keeper {
    conn: OwnedFd,
    /// The keeper this agent started (a crashed agent's keeper is nobody's child).
    child: Option<std::process::Child>,
    socket: PathBuf,
    spool: PathBuf,
    /// The last snapshot's JSON: an unchanged one is not sent again.
    last: Vec<u8>,
    /// A failed send: crash survival is lost until the agent restarts (said once).
    broken: bool,
    /// CLOCK_BOOTTIME and the monotonic clock at one instant: a worker's start as boot time,
    /// which a later agent can compare with its own clock.
    base: (Instant, u64),
}

/// The keeper's socket and spool file, beside the control socket.
pub fn paths(control: &Path) -> (PathBuf, PathBuf) {
    (
        control.with_file_name("keeper.sock"),
        control.with_file_name("keeper.spool"),
    )
}

/// What a keeper held for a crashed agent.
pub struct Kept {
    pub state: State,
}

/// Why there is no keeper.
pub enum AttachError {
    /// A keeper answers but cannot serve this agent (another agent is connected to it, or
    /// what it holds did not come across): this agent must not start beside it.
    Busy(String),
    /// No keeper could be started: the agent runs without one.
    Other(String),
}

/// Connect to the keeper of a previous agent (and take what it holds), or start one. A keeper
/// that answers "busy" or fails is asked again for a while: it may not have seen its crashed
/// agent's hang-up yet.
pub fn attach(control: &Path) -> Result<(Option<Keeper>, Option<Kept>), AttachError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match attach_once(control) {
            Err(e) if Instant::now() < deadline => {
                let (AttachError::Busy(why) | AttachError::Other(why)) = &e;
                tracing::debug!("the keeper: {why}; asking again");
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn attach_once(control: &Path) -> Result<(Option<Keeper>, Option<Kept>), AttachError> {
    let (socket, spool) = paths(control);
    let base = (Instant::now(), crate::sys::machine::boot_ms());
    match chan::connect(&socket) {
        Ok(conn) => {
            let _ = chan::set_timeout(conn.as_fd(), TIMEOUT);
            let kept = take(conn.as_fd(), &socket)?;
            tracing::info!(
                "keeper {}: {}",
                socket.display(),
                if kept.is_some() {
                    "it holds a previous agent's workers: adopting them"
                } else {
                    "it holds nothing"
                }
            );
            Ok((
                Some(Keeper {
                    conn,
                    child: None,
                    socket,
                    spool,
                    last: Vec::new(),
                    broken: false,
                    base,
                }),
                kept,
            ))
        }
        Err(_) => {
            let (conn, child) = start(&socket, &spool).map_err(AttachError::Other)?;
            Ok((
                Some(Keeper {
                    conn,
                    child: Some(child),
                    socket,
                    spool,
                    last: Vec::new(),
                    broken: false,
                    base,
                }),
                None,
            ))
        }
    }
}

/// Bind the keeper's socket, start `corral keeper` on it and connect.
fn start(socket: &Path, spool: &Path) -> Result<(OwnedFd, std::process::Child), String> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let listener = chan::listen(socket).map_err(|e| e.to_string())?;
    let binary = crate::sys::handoff::running_binary().map_err(|e| e.to_string())?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
    crate::sys::handoff::set_inherit_raw(raw, true).map_err(|e| e.to_string())?;
    let spawned = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&binary)
            .arg("keeper")
            .arg("--listen-fd")
            .arg(raw.to_string())
            .arg("--spool")
            .arg(spool)
            .stdin(std::process::Stdio::null())
            // Its own process group: a Ctrl-C meant for a foreground agent is not for it.
            .process_group(0)
            .spawn()
    };
    let _ = crate::sys::handoff::set_inherit_raw(raw, false);
    let mut child = spawned.map_err(|e| format!("starting {} keeper: {e}", binary.display()))?;
    // Listening already: the connection waits in its backlog until the keeper accepts.
    let conn = match chan::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.to_string());
        }
    };
    let _ = chan::set_timeout(conn.as_fd(), TIMEOUT);
    tracing::info!(
        pid = child.id(),
        "keeper started on {}: workers, sockets and output outlive a crash of this agent",
        socket.display()
    );
    Ok((conn, child))
}

/// Ask the keeper for what it holds.
fn take(conn: std::os::fd::BorrowedFd<'_>, socket: &Path) -> Result<Option<Kept>, AttachError> {
    // It answered: a keeper runs there, and may hold a previous generation (the control
    // socket among it), so a failure here is not one to start beside.
    let other = |e: String| {
        AttachError::Busy(format!(
            "the keeper at {} answers but did not hand over what it holds ({e}); if no agent \
             runs, stop that keeper (its workers then run unsupervised until stopped) to \
             start afresh",
            socket.display()
        ))
    };
    chan::send(conn, b"G", &[]).map_err(|e| other(e.to_string()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        let (bytes, got) = chan::recv(conn)
            .map_err(|e| other(e.to_string()))?
            .ok_or_else(|| other("it hung up".into()))?;
        match bytes.first() {
            Some(b'F') => fds.extend(got),
            Some(b'N') => return Ok(None),
            Some(b'B') => {
                return Err(AttachError::Busy(format!(
                    "another agent is running: it is connected to the keeper at {}",
                    socket.display()
                )))
            }
            Some(b'S') => {
                let memfd = got
                    .into_iter()
                    .next()
                    .ok_or_else(|| other("no snapshot in its answer".into()))?;
                let json = chan::read_memfd(memfd.as_fd()).map_err(|e| other(e.to_string()))?;
                let snap: Snapshot = serde_json::from_slice(&json)
                    .map_err(|e| other(format!("its snapshot: {e}")))?;
                let mut state: State = serde_json::from_value(snap.state)
                    .map_err(|e| other(format!("its snapshot: {e}")))?;
                if snap.numbers.len() != fds.len() {
                    return Err(other(format!(
                        "its snapshot names {} descriptors and it sent {}",
                        snap.numbers.len(),
                        fds.len()
                    )));
                }
                renumber(&mut state, &snap.numbers, fds);
                return Ok(Some(Kept { state }));
            }
            _ => return Err(other("an unknown message".into())),
        }
    }
}

/// Each descriptor number of the previous agent in `state` becomes that of the copy received
/// here (`numbers[i]` → `fds[i]`); the state then owns them (the adoption takes each number
/// once). Copies it does not name are closed; a number it names but the keeper did not send
/// becomes -1 (its adoption fails).
fn renumber(state: &mut State, numbers: &[RawFd], fds: Vec<OwnedFd>) {
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut new: Vec<Option<RawFd>> = vec![None; fds.len()];
    for field in state.fds_mut() {
        let Some(i) = numbers.iter().position(|n| *n == *field) else {
            *field = -1;
            continue;
        };
        if new[i].is_none() {
            new[i] = fds[i].take().map(|f| f.into_raw_fd());
        }
        *field = new[i].unwrap_or(-1);
    }
}

impl Supervisor {
    /// On the loop's ticks: a keeper that died is replaced and sent the state at once.
    pub(super) fn check_keeper(&mut self) {
        if self.keeper.as_ref().is_some_and(|k| k.gone()) {
            if let Some(k) = self.keeper.as_mut() {
                // Forces a send, which finds the connection dead and starts another keeper.
                k.last.clear();
            }
            self.keep();
        }
    }

    /// Send the keeper the current state if it changed (after every event).
    pub(super) fn keep(&mut self) {
        let Some(mut k) = self.keeper.take() else {
            return;
        };
        match self.handed_state(Some(&k)) {
            Ok((state, fds)) => k.push(&state, &fds),
            Err(e) => tracing::debug!("not sending the keeper this state: {e}"),
        }
        self.keeper = Some(k);
    }
}

impl Keeper {
    /// A worker's start (its `Instant`) as CLOCK_BOOTTIME milliseconds.
    pub fn boot_ms_of(&self, started: Instant) -> u64 {
        let (base, boot) = self.base;
        if started <= base {
            boot.saturating_sub(base.duration_since(started).as_millis() as u64)
        } else {
            boot + started.duration_since(base).as_millis() as u64
        }
    }

    /// Send the snapshot if it changed. `fds` are the numbers `state` names, owned by the
    /// caller for the duration of the call.
    pub fn push(&mut self, state: &State, fds: &[RawFd]) {
        if self.broken {
            return;
        }
        let mut outputs = Vec::new();
        for app in &state.apps {
            for (i, slot) in app.slots.iter().enumerate() {
                if let Some(w) = &slot.worker {
                    for (fd, stream) in [(w.stdout, "stdout"), (w.stderr, "stderr")] {
                        outputs.push(OutputPipe {
                            fd,
                            app: app.name.clone(),
                            who: format!("worker={i}"),
                            pid: w.pid,
                            stream: stream.into(),
                        });
                    }
                }
            }
        }
        let snap = match serde_json::to_value(state) {
            Ok(v) => Snapshot {
                numbers: fds.to_vec(),
                outputs,
                state: v,
            },
            Err(e) => return tracing::error!("encoding the keeper's snapshot: {e}"),
        };
        let json = match serde_json::to_vec(&snap) {
            Ok(j) => j,
            Err(e) => return tracing::error!("encoding the keeper's snapshot: {e}"),
        };
        if json == self.last {
            return;
        }
        if let Err(e) = self.send(&json, fds) {
            // Gone (killed?) or stuck: a new keeper, once. Its predecessor, if it lives,
            // holds nothing this agent relies on and exits when it sees this agent go.
            tracing::warn!("the keeper does not take the agent's state ({e}): starting another");
            let _ = chan::send(self.conn.as_fd(), b"X", &[]);
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let resent = start(&self.socket, &self.spool).and_then(|(conn, child)| {
                self.conn = conn;
                self.child = Some(child);
                self.send(&json, fds)
            });
            if let Err(e) = resent {
                self.broken = true;
                tracing::error!(
                    "no keeper at {} takes the agent's state any more ({e}): if this agent \
                     crashes now, its workers' output pipes break and a restarted agent \
                     starts every app afresh",
                    self.socket.display()
                );
                return;
            }
        }
        self.last = json;
    }

    fn send(&self, json: &[u8], fds: &[RawFd]) -> Result<(), String> {
        for chunk in fds.chunks(chan::FDS_PER_MESSAGE) {
            chan::send_raw(self.conn.as_fd(), b"F", chunk).map_err(|e| e.to_string())?;
        }
        let memfd = crate::sys::front::sealed_memfd("corral-keeper-snapshot", json)
            .map_err(|e| e.to_string())?;
        chan::send(self.conn.as_fd(), b"S", &[memfd.as_fd()]).map_err(|e| e.to_string())
    }

    /// Whether the keeper hung up (it was killed): checked on the loop's ticks, so a new one
    /// holds this agent's state within a tick, not only at the next change.
    pub fn gone(&self) -> bool {
        !self.broken && chan::peer_gone(self.conn.as_fd())
    }

    /// The lines the keeper drained while no agent ran (oldest first); the spool is emptied.
    /// At most `keeper::SPOOL_MAX_BYTES` of lines: the keeper stops spooling there.
    pub fn take_spool(&self) -> Vec<SpoolLine> {
        use std::io::BufRead;
        let Ok(file) = std::fs::File::open(&self.spool) else {
            return Vec::new();
        };
        let _ = std::fs::remove_file(&self.spool);
        std::io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// A planned stop: every worker has exited; the keeper exits too.
    pub fn stop(mut self) {
        let _ = chan::send(self.conn.as_fd(), b"X", &[]);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let _ = c.kill();
                let _ = c.wait();
            }
        } else {
            // An adopted keeper is not this agent's child: its hang-up says it exited, so a
            // service manager that sees the agent exit finds nothing else left running.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !chan::peer_gone(self.conn.as_fd()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.spool);
    }
}
