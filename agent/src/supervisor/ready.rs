//! Readiness probes. A probe for slot N connects from source port `PROBE_PORT_BASE + N`, which
//! the group's reuseport program hands to slot N's socket, so it reaches exactly that worker.
//!
//! `tcp`: ready once the worker has accept()ed the probe connection. The agent holds the
//! listening socket itself, so a completed TCP handshake proves nothing (the kernel completes it
//! into the accept queue); sock_diag shows whether the connection left the queue (it gains a
//! socket inode on accept). `http:/path`: the same connection then carries `GET /path` and
//! the worker is ready on a 2xx or 3xx answer.
//!
//! A socket may have more than one worker accepting from it: every worker where they share one
//! socket (one accept queue), and a slot's socket during a rolling replacement, where the new
//! worker inherits it while the worker it replaces still accepts. A probe then goes to whoever
//! accepts first, so every probe also asks whose process tree holds the accepted socket (its
//! inode among the worker's fds, `sys::holder`, which reads as the worker's user where the
//! agent lacks CAP_SYS_PTRACE); one taken by another worker is closed and the next probe
//! tried, until the worker takes one or its time is up. Otherwise a replaced worker that took
//! its successor's probe would make the successor ready before it accepts anything.
//!
//! `notify`: no probe; the worker's own `READY=1` on a socket made for it alone. TLS fronts
//! always use it: they make themselves undumpable, so whose fds hold a probe connection cannot
//! be read without CAP_SYS_PTRACE, and the front being replaced could take its successor's
//! probe.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixDatagram};
use tokio::time::{sleep, Instant};

use crate::config::{AppName, Ready};
use crate::sys::{diag, holder, socket};

/// How a probe learns that the worker accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptSignal {
    /// sock_diag: the probe connection gained a socket inode (exact).
    Diag,
    /// sock_diag is unavailable: the slot listener's accept queue drained (approximate: other
    /// connections queued on the same slot delay it).
    QueueDrained,
}

static SIGNAL: OnceLock<AcceptSignal> = OnceLock::new();

/// Decide once, at agent start, how probes see an accept; says so if it is the fallback.
pub fn init_accept_signal() -> AcceptSignal {
    *SIGNAL.get_or_init(|| match diag::self_check() {
        Ok(()) => AcceptSignal::Diag,
        Err(why) => {
            tracing::warn!(
                "readiness probes cannot use sock_diag ({why}); they watch the worker's \
                 accept queue drain instead, which a busy slot can delay"
            );
            AcceptSignal::QueueDrained
        }
    })
}

/// Which worker a probe is for.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub address: SocketAddr,
    pub slot: u32,
    /// The probe counts only when this process (the worker) or one of its descendants accepted
    /// it: another worker may accept from the same socket. (TLS fronts, whose fds cannot be
    /// read, are not probed: they report READY=1 themselves.)
    pub worker_pid: i32,
}

/// Wait until the worker in `slot` of the group on `address` is ready, or say why not.
/// `listener` is the slot's listening socket.
pub async fn wait_ready(
    ready: &Ready,
    target: Target,
    listener: Arc<OwnedFd>,
    timeout: Duration,
    notify: Option<Notify>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let limit = crate::policy::restart::format_duration(timeout);
    // Probes another worker took, for the timeout's message.
    let mut missed = 0u32;
    let others = |missed: u32| {
        if missed == 0 {
            String::new()
        } else {
            format!(" ({missed} probes were accepted by other workers on its socket)")
        }
    };
    match ready {
        Ready::Delay(d) => {
            sleep(*d).await;
            Ok(())
        }
        Ready::Notify => {
            let Some(notify) = notify else {
                return Err("no notify socket was set up for this worker".into());
            };
            wait_notify_ready(&notify, deadline, &limit).await
        }
        Ready::Tcp => loop {
            match tokio::time::timeout_at(deadline, probe(target, &listener, None)).await {
                Ok(Ok(Probe::Accepted)) => return Ok(()),
                Ok(Ok(Probe::TakenByAnother)) => {
                    missed += 1;
                    sleep(Duration::from_millis(5)).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(format!(
                        "did not accept a probe connection within {limit}{}",
                        others(missed)
                    ))
                }
            }
        },
        Ready::Http(path) => loop {
            match tokio::time::timeout_at(deadline, probe(target, &listener, Some(path))).await {
                Ok(Ok(Probe::Accepted)) => return Ok(()),
                Ok(Ok(Probe::TakenByAnother)) => {
                    missed += 1;
                    sleep(Duration::from_millis(5)).await;
                }
                Ok(Err(e)) if Instant::now() + Duration::from_millis(100) < deadline => {
                    tracing::debug!(slot = target.slot, "http probe: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(format!(
                        "GET {path} did not succeed within {limit}{}",
                        others(missed)
                    ))
                }
            }
        },
    }
}

/// How a probe that reached an accept ended.
enum Probe {
    /// The worker accepted it (and answered the GET, for an http probe).
    Accepted,
    /// Another worker sharing the socket accepted it.
    TakenByAnother,
}

async fn connect(address: SocketAddr, slot: u32) -> Result<TcpStream, String> {
    let source = socket::probe_source(address, slot)
        .ok_or_else(|| format!("slot {slot} has no probe port"))?;
    let target = socket::probe_target(address);
    let sock = if address.is_ipv6() {
        TcpSocket::new_v6()
    } else {
        TcpSocket::new_v4()
    }
    .map_err(|e| format!("probe socket: {e}"))?;
    sock.set_reuseaddr(true)
        .map_err(|e| format!("probe SO_REUSEADDR: {e}"))?;
    sock.bind(source)
        .map_err(|e| format!("binding probe source {source}: {e}"))?;
    // Close with RST: no TIME_WAIT on the probe port, so the next probe can use it at once. A
    // zero linger never blocks on drop (the deprecation is about non-zero values).
    #[allow(deprecated)]
    sock.set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("probe SO_LINGER: {e}"))?;
    sock.connect(target)
        .await
        .map_err(|e| format!("probe connect to {target}: {e}"))
}

async fn probe(
    target: Target,
    listener: &Arc<OwnedFd>,
    http: Option<&str>,
) -> Result<Probe, String> {
    let Target {
        address,
        slot,
        worker_pid,
    } = target;
    let mut stream = connect(address, slot).await?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let server_end = stream.peer_addr().map_err(|e| e.to_string())?;
    let signal = SIGNAL.get().copied().unwrap_or(AcceptSignal::Diag);
    // Wait for the accept: back off from 1 ms to 20 ms between looks.
    let mut pause = Duration::from_millis(1);
    if signal == AcceptSignal::QueueDrained {
        // Give the final ACK time to put the probe in the queue before an empty queue counts.
        sleep(Duration::from_millis(5)).await;
    }
    loop {
        let accepted = match signal {
            AcceptSignal::Diag => {
                match diag::tcp_connection(server_end, local).map_err(|e| e.to_string())? {
                    Some(c) if c.inode != 0 => {
                        let ours = holder::tree_holds_socket(worker_pid, c.inode)
                            .map_err(|e| format!("whose probe connection: {e}"))?;
                        if !ours {
                            return Ok(Probe::TakenByAnother);
                        }
                        true
                    }
                    Some(_) => false,
                    None => {
                        return Err("the probe connection was closed before it was accepted".into())
                    }
                }
            }
            AcceptSignal::QueueDrained => {
                socket::accept_queue_len(listener.as_fd())
                    .map_err(|e| format!("reading the accept queue: {e}"))?
                    == 0
            }
        };
        if accepted {
            break;
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    let Some(path) = http else {
        return Ok(Probe::Accepted);
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: corral-probe\r\nConnection: close\r\n\r\n",
        socket::probe_target(address)
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending GET {path}: {e}"))?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = stream
            .read(&mut head[got..])
            .await
            .map_err(|e| format!("reading the answer to GET {path}: {e}"))?;
        if n == 0 {
            return Err(format!("GET {path}: connection closed without an answer"));
        }
        got += n;
    }
    let status_line = String::from_utf8_lossy(&head[..got]);
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP answer: {status_line:?}"))?;
    if (200..400).contains(&code) {
        Ok(Probe::Accepted)
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

/// A per-worker `NOTIFY_SOCKET`: an abstract unix datagram socket named after the agent's pid
/// and the worker's id, with a random part no other process can guess and bind first, so no
/// file needs permissions for the unprivileged worker. Anyone in the network namespace can send
/// to an abstract name, so each datagram's sender is checked (see [`Notify`]).
pub fn notify_socket(worker_id: u64) -> Result<(UnixDatagram, String), String> {
    let prefix = format!("corral/{}/notify/{worker_id}/", std::process::id());
    let (std_sock, name) = crate::sys::notify::bind_unguessable_receiver(&prefix)
        .map_err(|e| format!("binding a notify socket @{prefix}...: {e}"))?;
    let sock = UnixDatagram::from_std(std_sock).map_err(|e| format!("notify socket: {e}"))?;
    Ok((sock, format!("@{name}")))
}

/// A worker's notify socket and the worker's pid: `READY=1` counts only from that process or
/// one of its descendants (systemd's `NotifyAccess=main`, widened to the worker's own children,
/// as a gunicorn arbiter or a shell wrapper's child may be the one that reports). A datagram
/// from anyone else is ignored and remembered for the timeout's message.
pub struct Notify {
    pub sock: UnixDatagram,
    pub worker_pid: i32,
}

async fn wait_notify_ready(n: &Notify, deadline: Instant, limit: &str) -> Result<(), String> {
    use crate::sys::notify::{is_same_or_descendant, recv_with_sender};
    let mut buf = vec![0u8; 4096];
    let mut strangers: Vec<String> = Vec::new();
    loop {
        let received = n.sock.async_io(tokio::io::Interest::READABLE, || {
            recv_with_sender(n.sock.as_fd(), &mut buf)
        });
        let (len, sender) = match tokio::time::timeout_at(deadline, received).await {
            Ok(Ok(r)) => r,
            Err(_) => {
                return Err(format!(
                    "did not send READY=1 within {limit}{}",
                    ignored(&strangers)
                ))
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "reading the notify socket: {e}{}",
                    ignored(&strangers)
                ))
            }
        };
        let text = String::from_utf8_lossy(&buf[..len]);
        if !text.lines().any(|l| l.trim() == "READY=1") {
            continue;
        }
        match sender {
            Some(pid) if is_same_or_descendant(pid, n.worker_pid) => return Ok(()),
            other => {
                let who = other.map_or("an unknown sender".to_string(), |p| format!("pid {p}"));
                tracing::warn!(
                    worker_pid = n.worker_pid,
                    "ignoring READY=1 from {who} on the worker's notify socket: not the worker \
                     or one of its processes"
                );
                if strangers.len() < 8 {
                    strangers.push(who);
                }
            }
        }
    }
}

/// Why a TLS front process was not ready, naming it and its app: `why` is what
/// [`wait_ready`] said (a front reports READY=1 itself, see `front::process`).
pub fn front_not_ready(of: &AppName, slot: u32, pid: i32, why: &str) -> String {
    format!(
        "TLS front process {slot} (pid {pid}) of app {of}: {why} (a front sends READY=1 once its \
         certificates are loaded and it accepts connections)"
    )
}

/// " (ignored READY=1 from pid 7, pid 9: not the worker's)" or nothing.
fn ignored(strangers: &[String]) -> String {
    if strangers.is_empty() {
        String::new()
    } else {
        format!(
            " (ignored READY=1 from {}: not the worker's processes)",
            strangers.join(", ")
        )
    }
}
