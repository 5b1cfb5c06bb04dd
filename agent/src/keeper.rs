//! `corral keeper`: the process that keeps a crashed agent's generation alive until the next
//! agent adopts it (ARCHITECTURE.md, "What survives an agent crash"). Started by the agent,
//! outside its workers' cgroups, in its own process group; it reads nothing from the network
//! and parses only what its agent sends over an owner-only unix socket.
//!
//! It holds the latest snapshot the agent sent: every descriptor a new agent needs (the
//! control socket, each slot's listening socket, each worker's pidfd and the read ends of its
//! stdout and stderr, a front's counters) and the handoff state naming them. While no agent is
//! connected it drains the workers' output pipes into the spool file, so no worker blocks on a
//! full pipe and no written line is lost; the next agent logs those lines. A planned stop of
//! the agent tells it to exit.
//!
//! Messages (one per SOCK_SEQPACKET send, the first byte says which):
//! - agent → keeper: `F` + descriptors (part of the next snapshot), `S` + a sealed memfd with
//!   the snapshot's JSON (commits it with the descriptors sent since the last `S`), `G` (an
//!   agent that starts: stop draining, send the snapshot), `X` (a planned stop: exit);
//! - keeper → agent: `F` + descriptors, then `S` + memfd, or `N` (no snapshot), or `B` (busy:
//!   another agent is connected).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sys::keeper as chan;

/// The snapshot's JSON: the state for the next agent (opaque to the keeper), the number each
/// descriptor had in the agent (in the order they were sent), and which of them are output
/// pipes to drain.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub numbers: Vec<RawFd>,
    pub outputs: Vec<OutputPipe>,
    pub state: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputPipe {
    /// Its number in `numbers`.
    pub fd: RawFd,
    pub app: String,
    /// `worker=N`.
    pub who: String,
    pub pid: i32,
    pub stream: String,
}

/// One line of the spool file (JSON lines).
#[derive(Debug, Serialize, Deserialize)]
pub struct SpoolLine {
    pub app: String,
    pub who: String,
    pub pid: i32,
    pub stream: String,
    pub line: String,
    /// The line's start; its rest went to the next agent's forwarding.
    #[serde(default)]
    pub partial: bool,
}

struct Held {
    json: Vec<u8>,
    fds: Vec<OwnedFd>,
    outputs: Vec<Drain>,
}

struct Drain {
    /// Index into `Held::fds`.
    index: usize,
    pipe: OutputPipe,
    partial: Vec<u8>,
    closed: bool,
    /// Lines read and not spooled because the spool was full (said in the spool when the
    /// next agent takes over).
    dropped: u64,
}

/// The most the spool file holds. It lives beside the control socket, on a tmpfs (memory)
/// under systemd: a chatty app whose agent stays down for hours must not fill it. The keeper
/// goes on draining the pipes beyond it (no worker ever blocks), and counts what it dropped.
pub const SPOOL_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The keeper's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct KeeperArgs {
    /// Its listening socket, bound by the agent, as this descriptor number.
    #[arg(long)]
    pub listen_fd: RawFd,
    /// Where drained output lines go.
    #[arg(long)]
    pub spool: PathBuf,
}

/// Run until a planned stop (`X`), SIGTERM, or the agent leaves with nothing to keep.
pub fn run(args: KeeperArgs) -> Result<(), String> {
    // It holds about five descriptors a worker, twice while a new snapshot replaces the last:
    // the soft limit of 1024 its parent gives children would cut them off above ~100 workers.
    if let Err(e) = crate::sys::machine::raise_nofile() {
        eprintln!("corral keeper: cannot raise the open-file limit: {e}");
    }
    let listener = crate::sys::handoff::adopt(args.listen_fd)
        .map_err(|e| format!("its listening socket: {e}"))?;
    let mut owner: Option<OwnedFd> = None;
    let mut held: Option<Held> = None;
    let mut pending: Vec<OwnedFd> = Vec::new();
    loop {
        let draining = owner.is_none();
        let mut polled: Vec<BorrowedFd<'_>> = vec![listener.as_fd()];
        if let Some(o) = &owner {
            polled.push(o.as_fd());
        }
        let mut drained: Vec<usize> = Vec::new();
        if let (true, Some(h)) = (draining, &held) {
            for (i, d) in h.outputs.iter().enumerate() {
                if !d.closed {
                    polled.push(h.fds[d.index].as_fd());
                    drained.push(i);
                }
            }
        }
        let ready = chan::poll_readable(&polled).map_err(|e| format!("poll: {e}"))?;
        drop(polled);
        if !draining && ready[1] {
            // The owner checked above is the one polled.
            let conn = owner.take().ok_or("no owner")?;
            match chan::recv(conn.as_fd()) {
                Ok(Some((bytes, fds))) => match bytes.first() {
                    Some(b'F') => {
                        pending.extend(fds);
                        owner = Some(conn);
                    }
                    Some(b'S') => {
                        let fds_sent = std::mem::take(&mut pending);
                        match commit(fds, fds_sent) {
                            Ok(h) => held = Some(h),
                            Err(e) => eprintln!("corral keeper: a snapshot refused: {e}"),
                        }
                        owner = Some(conn);
                    }
                    Some(b'G') => {
                        flush_partials(&mut held, &args.spool);
                        if let Err(e) = give(conn.as_fd(), &held) {
                            eprintln!("corral keeper: handing the snapshot over: {e}");
                        }
                        pending.clear();
                        owner = Some(conn);
                    }
                    Some(b'X') => return Ok(()),
                    _ => {
                        eprintln!("corral keeper: an unknown message; closing that connection");
                    }
                },
                // The agent is gone: a crash (a planned stop sends X first). Keep everything
                // and drain the output until the next agent comes.
                Ok(None) | Err(_) => {
                    pending.clear();
                    if held.is_none() {
                        return Ok(());
                    }
                }
            }
            continue;
        }
        // Only once the owner has nothing to read: a crashed agent's last messages and its
        // hang-up are taken before its successor is let in.
        if ready[0] {
            match chan::accept(listener.as_fd()) {
                Ok(conn) if owner.is_some() => {
                    // What it sent already is read, so closing does not reset the connection
                    // before it reads the answer.
                    chan::discard_pending(conn.as_fd());
                    let _ = chan::send(conn.as_fd(), b"B", &[]);
                }
                Ok(conn) => owner = Some(conn),
                Err(e) => eprintln!("corral keeper: a connection: {e}"),
            }
        }
        if draining {
            if let Some(h) = held.as_mut() {
                for (k, &i) in drained.iter().enumerate() {
                    // Outputs follow the listener when no owner is polled.
                    if ready[1 + k] {
                        drain_one(h, i, &args.spool);
                    }
                }
            }
        }
    }
}

/// A snapshot: the `S` message's memfd holds the JSON, `fds` are the descriptors sent since the
/// last one, in `numbers`' order.
fn commit(memfd: Vec<OwnedFd>, fds: Vec<OwnedFd>) -> Result<Held, String> {
    let memfd = memfd.into_iter().next().ok_or("no memfd")?;
    let json = chan::read_memfd(memfd.as_fd()).map_err(|e| e.to_string())?;
    let snap: Snapshot = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
    if snap.numbers.len() != fds.len() {
        return Err(format!(
            "{} descriptors named, {} sent",
            snap.numbers.len(),
            fds.len()
        ));
    }
    let mut outputs = Vec::new();
    for pipe in snap.outputs {
        let index = snap
            .numbers
            .iter()
            .position(|n| *n == pipe.fd)
            .ok_or_else(|| format!("output descriptor {} not sent", pipe.fd))?;
        if let Err(e) = chan::set_nonblocking(fds[index].as_fd()) {
            eprintln!("corral keeper: {e}");
        }
        outputs.push(Drain {
            index,
            pipe,
            partial: Vec::new(),
            closed: false,
            dropped: 0,
        });
    }
    Ok(Held { json, fds, outputs })
}

/// Send the snapshot to a starting agent (`N` if there is none).
fn give(conn: BorrowedFd<'_>, held: &Option<Held>) -> Result<(), chan::KeeperError> {
    let Some(h) = held else {
        return chan::send(conn, b"N", &[]);
    };
    for chunk in h.fds.chunks(chan::FDS_PER_MESSAGE) {
        let b: Vec<BorrowedFd<'_>> = chunk.iter().map(|f| f.as_fd()).collect();
        chan::send(conn, b"F", &b)?;
    }
    let memfd =
        crate::sys::front::sealed_memfd("corral-keeper-snapshot", &h.json).map_err(|e| {
            chan::KeeperError::Io {
                call: "memfd",
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    chan::send(conn, b"S", &[memfd.as_fd()])
}

/// Read what one output pipe has and spool its complete lines.
fn drain_one(h: &mut Held, i: usize, spool: &std::path::Path) {
    let mut buf = [0u8; 16 * 1024];
    let d = &mut h.outputs[i];
    let fd = h.fds[d.index].as_fd();
    let mut lines = Vec::new();
    loop {
        match chan::read_pipe(fd, &mut buf) {
            chan::Read::End | chan::Read::Failed => {
                d.closed = true;
                break;
            }
            chan::Read::Bytes(n) => {
                d.partial.extend_from_slice(&buf[..n]);
                while let Some(pos) = d.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = d.partial.drain(..=pos).collect();
                    lines.push(spool_line(&d.pipe, &line[..line.len() - 1], false));
                }
                if d.partial.len() >= 16 * 1024 {
                    let line = std::mem::take(&mut d.partial);
                    lines.push(spool_line(&d.pipe, &line, false));
                }
            }
            chan::Read::Empty => break,
        }
    }
    if d.closed && !d.partial.is_empty() {
        let line = std::mem::take(&mut d.partial);
        lines.push(spool_line(&d.pipe, &line, false));
    }
    let written = append(spool, &lines, SPOOL_MAX_BYTES);
    d.dropped += (lines.len() - written) as u64;
}

/// Partial lines go to the spool as such when an agent takes over the pipes.
fn flush_partials(held: &mut Option<Held>, spool: &std::path::Path) {
    let Some(h) = held.as_mut() else {
        return;
    };
    let mut lines = Vec::new();
    let mut notes = Vec::new();
    for d in &mut h.outputs {
        if !d.partial.is_empty() {
            let line = std::mem::take(&mut d.partial);
            lines.push(spool_line(&d.pipe, &line, true));
        }
        if d.dropped > 0 {
            let said = format!(
                "[corral keeper: {} lines of this stream were dropped while no agent ran: the \
                 spool was full ({} MiB)]",
                d.dropped,
                SPOOL_MAX_BYTES >> 20
            );
            notes.push(spool_line(&d.pipe, said.as_bytes(), false));
            d.dropped = 0;
        }
        // The next agent reads them again; a pipe that hit end of stream is polled again by
        // nobody, so forget that it did.
        d.closed = false;
    }
    append(spool, &lines, SPOOL_MAX_BYTES);
    // What was dropped is said even when the spool is full: a few short lines above the bound.
    append(spool, &notes, u64::MAX);
}

fn spool_line(p: &OutputPipe, bytes: &[u8], partial: bool) -> SpoolLine {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    while text.ends_with('\r') {
        text.pop();
    }
    SpoolLine {
        app: p.app.clone(),
        who: p.who.clone(),
        pid: p.pid,
        stream: p.stream.clone(),
        line: text,
        partial,
    }
}

/// Append `lines` while the spool stays within `max` bytes; the number of lines written (the
/// first ones: a line that does not fit is not written, nor any after it).
fn append(spool: &std::path::Path, lines: &[SpoolLine], max: u64) -> usize {
    if lines.is_empty() {
        return 0;
    }
    // Workers' output may hold secrets: the agent's user only, and never through a link
    // planted in its place.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spool);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            eprintln!("corral keeper: writing {}: {e}", spool.display());
            return 0;
        }
    };
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    let mut written = 0;
    for l in lines {
        let Ok(mut j) = serde_json::to_vec(l) else {
            // A String and a few plain fields always serialise; skipped rather than stopping.
            written += 1;
            continue;
        };
        j.push(b'\n');
        if size.saturating_add(j.len() as u64) > max {
            break;
        }
        size += j.len() as u64;
        out.extend_from_slice(&j);
        written += 1;
    }
    if let Err(e) = file.write_all(&out) {
        eprintln!("corral keeper: writing {}: {e}", spool.display());
        return 0;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> OutputPipe {
        OutputPipe {
            fd: 3,
            app: "api".into(),
            who: "worker=0".into(),
            pid: 42,
            stream: "stdout".into(),
        }
    }

    #[test]
    fn the_spool_stops_at_its_bound_and_keeps_the_oldest_lines() {
        let dir = std::env::temp_dir().join(format!("corral-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = dir.join("keeper.spool");
        let lines: Vec<SpoolLine> = (0..10)
            .map(|i| spool_line(&pipe(), format!("line {i}").as_bytes(), false))
            .collect();
        let one = serde_json::to_vec(&lines[0]).unwrap().len() as u64 + 1;
        // Room for four lines, in two appends: three, then one of the next seven.
        assert_eq!(append(&spool, &lines[..3], one * 4), 3);
        assert_eq!(append(&spool, &lines[3..], one * 4), 1);
        assert_eq!(append(&spool, &lines[4..], one * 4), 0);
        let text = std::fs::read_to_string(&spool).unwrap();
        let kept: Vec<SpoolLine> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kept: Vec<&str> = kept.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(kept, ["line 0", "line 1", "line 2", "line 3"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
