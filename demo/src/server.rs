//! The accept threads and the HTTP/1.1 connection loop.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http::{self, Body, ChunkedDecoder, HttpError, Request};
use crate::sys;

/// Connections accepted and not yet closed.
pub static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// The thread currently inside accept() (0: none). main() kicks it during shutdown.
pub static ACCEPTOR: AtomicU64 = AtomicU64::new(0);
/// Requests parsed since start, across all threads.
static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// One thread at a time waits for a connection: no thundering herd, and at most one thread can
/// be blocked in accept() when shutdown begins.
static ACCEPT_LOCK: Mutex<()> = Mutex::new(());

/// How long a request may take to arrive once its first byte did, and a write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// During shutdown, how long a connection that has not sent anything yet still gets.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 16 * 1024;

/// Everything a connection needs, shared by all threads.
pub struct Server {
    pub listener: TcpListener,
    /// The self-pipe: readable once SIGTERM/SIGINT arrived.
    pub wake_fd: RawFd,
    pub app: String,
    pub worker: Option<u32>,
    pub pid: u32,
    pub listen_pid_ok: bool,
    pub log_requests: bool,
    pub delay_ms: u64,
    pub burn_ms: u64,
    pub pad: u64,
    pub keepalive: Duration,
    /// Every connection starts with a PROXY protocol v2 header (DEMO_PROXY_PROTOCOL=1).
    pub proxy_protocol: bool,
}

impl Server {
    fn worker_header(&self) -> String {
        self.worker
            .map_or_else(|| "-".to_string(), |w| w.to_string())
    }
}

fn shutting_down() -> bool {
    sys::SHUTDOWN.load(Ordering::SeqCst)
}

/// Body of an accept thread: accept a connection, serve it to the end, repeat until shutdown.
/// Never returns: once shutting down the thread parks, so its id stays valid for [`sys::kick`].
pub fn accept_loop(server: &Server) -> ! {
    while let Some(stream) = accept_one(server) {
        let _active = ActiveGuard;
        Conn::new(server, stream).run();
    }
    loop {
        std::thread::park();
    }
}

/// Connections accepted by the greedy acceptor and not yet picked up by a serving thread.
#[derive(Default)]
pub struct Backlog {
    queue: Mutex<VecDeque<TcpStream>>,
    ready: Condvar,
}

/// DEMO_ACCEPT=greedy, the acceptor: take every connection the moment it is queued (as an
/// asyncio or gthread server's accept loop does) and hand it to the serving threads, whether
/// or not one is free. The listener must be non-blocking. Parks once shutting down.
pub fn greedy_accept_loop(server: &Server, backlog: &Backlog) -> ! {
    let fd = server.listener.as_raw_fd();
    'outer: loop {
        match sys::poll2(fd, Some(server.wake_fd), None) {
            Ok(r) if r.b => break,
            Ok(r) if r.a => {}
            Ok(_) => continue,
            Err(e) => {
                warn(format_args!(
                    "corral-demo: poll on the listening socket failed: {e}"
                ));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        loop {
            if shutting_down() {
                break 'outer;
            }
            match sys::accept(fd) {
                Ok(conn) => {
                    ACTIVE.fetch_add(1, Ordering::SeqCst);
                    let stream = TcpStream::from(conn);
                    backlog
                        .queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(stream);
                    backlog.ready.notify_one();
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                    _ => {
                        warn(format_args!("corral-demo: accept failed: {e}"));
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                },
            }
        }
    }
    loop {
        std::thread::park();
    }
}

/// DEMO_ACCEPT=greedy, a serving thread: serve queued connections in arrival order. Queued
/// connections are still served during shutdown (they count in [`ACTIVE`]).
pub fn serve_backlog_loop(server: &Server, backlog: &Backlog) -> ! {
    loop {
        let stream = {
            let mut q = backlog.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(s) = q.pop_front() {
                    break s;
                }
                q = backlog.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let _active = ActiveGuard;
        Conn::new(server, stream).run();
    }
}

/// Decrements [`ACTIVE`] when a connection is done, however it ends.
struct ActiveGuard;

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for and accepts one connection (counting it in [`ACTIVE`]); `None` once shutting down.
fn accept_one(server: &Server) -> Option<TcpStream> {
    // A poisoned lock only means another accept thread panicked; the guarded data is `()`.
    let _turn = ACCEPT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fd = server.listener.as_raw_fd();
    loop {
        if shutting_down() {
            return None;
        }
        match sys::poll2(fd, Some(server.wake_fd), None) {
            Ok(r) if r.b => return None,
            Ok(r) if r.a => {}
            Ok(_) => continue,
            Err(e) => {
                warn(format_args!(
                    "corral-demo: poll on the listening socket failed: {e}"
                ));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        // Publish ourselves before re-checking the flag: either main() sees us and kicks us out
        // of accept(), or we see the flag and do not enter it.
        ACCEPTOR.store(sys::thread_id(), Ordering::SeqCst);
        if shutting_down() {
            ACCEPTOR.store(0, Ordering::SeqCst);
            return None;
        }
        let accepted = sys::accept(fd);
        if accepted.is_ok() {
            // Counted before ACCEPTOR is cleared, so main() never sees both at zero in between.
            ACTIVE.fetch_add(1, Ordering::SeqCst);
        }
        ACCEPTOR.store(0, Ordering::SeqCst);
        match accepted {
            Ok(fd) => return Some(TcpStream::from(fd)),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ECONNABORTED | libc::EPROTO) => {}
                _ => {
                    // EMFILE, ENOBUFS, ...: back off instead of spinning.
                    warn(format_args!("corral-demo: accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
        }
    }
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    /// We decided to close after a response. If the client already sent more than we read,
    /// half-close and drain it first, so our last response is not destroyed by a reset.
    Close,
    /// We answered an error: the client may still be sending, so always half-close and drain.
    Failed,
    /// The client is gone or idle: just close.
    Drop,
}

enum Fill {
    Data,
    Eof,
    Timeout,
    /// Shutting down and the connection is idle between requests.
    Shutdown,
    Error,
}

struct Conn<'a> {
    server: &'a Server,
    stream: TcpStream,
    peer: Option<SocketAddr>,
    buf: Vec<u8>,
    served: u64,
    /// Shutdown began before this connection's first request: it has a short grace.
    grace: bool,
    /// The client's address from the PROXY protocol header, when there is one.
    proxy_client: Option<SocketAddr>,
}

impl<'a> Conn<'a> {
    fn new(server: &'a Server, stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        Conn {
            server,
            peer: stream.peer_addr().ok(),
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            served: 0,
            grace: false,
            proxy_client: None,
        }
    }

    fn run(mut self) {
        if self.server.proxy_protocol {
            let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
            match read_proxy_v2(&mut self.stream) {
                Ok(client) => self.proxy_client = client,
                Err(e) => {
                    warn(format_args!(
                        "corral-demo: {}: bad PROXY protocol header: {e}",
                        self.peer_str()
                    ));
                    return;
                }
            }
            let _ = self.stream.set_read_timeout(None);
        }
        loop {
            match self.serve_one() {
                Next::KeepAlive => continue,
                Next::Close => {
                    let unread = !self.buf.is_empty()
                        || sys::poll2(self.stream.as_raw_fd(), None, Some(Duration::ZERO))
                            .is_ok_and(|r| r.a);
                    if unread {
                        self.linger_close();
                    }
                    return;
                }
                Next::Failed => {
                    self.linger_close();
                    return;
                }
                Next::Drop => return,
            }
        }
    }

    /// Reads more into `buf`. `idle`: no request has started, so shutdown or the keep-alive
    /// timeout end the connection quietly.
    fn fill(&mut self, idle: bool, deadline: &mut Instant) -> Fill {
        let fd = self.stream.as_raw_fd();
        loop {
            let now = Instant::now();
            if now >= *deadline {
                return Fill::Timeout;
            }
            let watch_wake = idle && !self.grace;
            let wake = watch_wake.then_some(self.server.wake_fd);
            let ready = match sys::poll2(fd, wake, Some(*deadline - now)) {
                Ok(r) => r,
                Err(_) => return Fill::Error,
            };
            if ready.b {
                if self.served > 0 {
                    return Fill::Shutdown;
                }
                // A fresh connection may be a request on its way: give it a moment.
                self.grace = true;
                *deadline = (*deadline).min(now + SHUTDOWN_GRACE);
                continue;
            }
            if !ready.a {
                continue;
            }
            let len = self.buf.len();
            self.buf.resize(len + READ_CHUNK, 0);
            let r = self.stream.read(&mut self.buf[len..]);
            self.buf.truncate(len + *r.as_ref().unwrap_or(&0));
            return match r {
                Ok(0) => Fill::Eof,
                Ok(_) => Fill::Data,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(_) => Fill::Error,
            };
        }
    }

    fn serve_one(&mut self) -> Next {
        if self.served > 0 && shutting_down() {
            // Shutdown began just after a keep-alive response: close (draining any pipelined
            // bytes already sent, see `run`).
            return Next::Close;
        }
        let mut deadline = Instant::now() + self.server.keepalive;
        let mut started = false;
        let (req, head_len) = loop {
            if !started && self.buf.iter().any(|&b| b != b'\r' && b != b'\n') {
                started = true;
                deadline = Instant::now() + IO_TIMEOUT;
            }
            match http::parse_head(&self.buf) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(e) => return self.fail(&e),
            }
            match self.fill(!started, &mut deadline) {
                Fill::Data => {}
                Fill::Timeout if started => {
                    return self.fail(&HttpError {
                        status: 408,
                        reason: "the request took too long to arrive".into(),
                    })
                }
                Fill::Eof | Fill::Timeout | Fill::Shutdown | Fill::Error => return Next::Drop,
            }
        };
        let started_at = Instant::now();
        self.buf.drain(..head_len);
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        self.served += 1;

        if req.body != Body::None {
            if req.expect_continue && self.buf.is_empty() && req.version == http::Version::Http11 {
                let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            if let Some(next) = self.skip_body(req.body) {
                return next;
            }
        }

        let (path, query) = match http::split_target(&req.target) {
            Ok(pq) => pq,
            Err(e) => return self.fail(&e),
        };
        let (status, keep) = match self.respond(&req, path, query) {
            Ok(sent) => sent,
            Err(_) => return Next::Drop,
        };
        if self.server.log_requests {
            self.log(&req, status, started_at);
        }
        if keep {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Reads and discards the request body, leaving any pipelined bytes after it in `buf`.
    /// `Some(next)` when the connection cannot continue.
    fn skip_body(&mut self, body: Body) -> Option<Next> {
        let mut deadline = Instant::now() + IO_TIMEOUT;
        let timeout = HttpError {
            status: 408,
            reason: "the request body took too long to arrive".into(),
        };
        match body {
            Body::None => None,
            Body::Length(mut left) => {
                let take = left.min(self.buf.len() as u64) as usize;
                self.buf.drain(..take);
                left -= take as u64;
                let mut scratch = vec![0u8; READ_CHUNK];
                while left > 0 {
                    let fd = self.stream.as_raw_fd();
                    let now = Instant::now();
                    if now >= deadline {
                        return Some(self.fail(&timeout));
                    }
                    match sys::poll2(fd, None, Some(deadline - now)) {
                        Ok(r) if r.a => {}
                        Ok(_) => continue,
                        Err(_) => return Some(Next::Drop),
                    }
                    // Never read past the body: what follows is the next request.
                    let want = left.min(scratch.len() as u64) as usize;
                    match self.stream.read(&mut scratch[..want]) {
                        Ok(0) => return Some(Next::Drop),
                        Ok(n) => left -= n as u64,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Some(Next::Drop),
                    }
                }
                None
            }
            Body::Chunked => {
                let mut decoder = ChunkedDecoder::default();
                loop {
                    match decoder.feed(&self.buf) {
                        Ok(n) => {
                            self.buf.drain(..n);
                        }
                        Err(e) => return Some(self.fail(&e)),
                    }
                    if decoder.is_done() {
                        return None;
                    }
                    match self.fill(false, &mut deadline) {
                        Fill::Data => {}
                        Fill::Timeout => return Some(self.fail(&timeout)),
                        Fill::Eof | Fill::Shutdown | Fill::Error => return Some(Next::Drop),
                    }
                }
            }
        }
    }

    /// Sends an error response; the connection is closed afterwards.
    fn fail(&mut self, e: &HttpError) -> Next {
        let body = format!(
            "{}: {}\n",
            http::reason(e.status).to_ascii_lowercase(),
            e.reason
        );
        let head = self.head(
            e.status,
            "text/plain; charset=utf-8",
            body.len() as u64,
            false,
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        let _ = self.stream.write_all(&out);
        if self.server.log_requests {
            say(format_args!(
                "corral-demo: worker={} {} {} {}",
                self.server.worker_header(),
                self.peer_str(),
                e.status,
                e.reason
            ));
        }
        Next::Failed
    }

    fn head(&self, status: u16, content_type: &str, len: u64, keep: bool) -> String {
        let date = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut h = String::with_capacity(256);
        let _ = write!(
            h,
            "HTTP/1.1 {status} {}\r\nDate: {}\r\nServer: corral-demo\r\nContent-Type: {content_type}\r\n\
             Content-Length: {len}\r\nX-Worker: {}\r\nX-Pid: {}\r\nConnection: {}\r\n\r\n",
            http::reason(status),
            http::http_date(date),
            self.server.worker_header(),
            self.server.pid,
            if keep { "keep-alive" } else { "close" },
        );
        h
    }

    /// Applies delay and burn, then writes the response. Returns the status sent and whether
    /// the connection stays open (decided after the delay: a request that was in flight when
    /// shutdown began is answered with `Connection: close`).
    fn respond(&mut self, req: &Request, path: &str, query: &str) -> io::Result<(u16, bool)> {
        let params = match http::parse_query(query) {
            Ok(p) => p,
            Err(reason) => {
                // The framing is fine, so the connection can go on.
                let keep = req.keep_alive() && !shutting_down();
                let body = format!("bad request: {reason}\n");
                self.send(req, keep, 400, "text/plain; charset=utf-8", body.as_bytes())?;
                return Ok((400, keep));
            }
        };
        let delay = params.delay_ms.unwrap_or(self.server.delay_ms);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let burn = params.burn_ms.unwrap_or(self.server.burn_ms);
        if burn > 0 {
            burn_cpu(Duration::from_millis(burn));
        }
        // Extra JSON fields (each starting with a comma) from alloc_mb and fork_children.
        let mut extra = String::new();
        if let Some(mb) = params.alloc_mb {
            let total = alloc_and_touch(mb);
            let _ = write!(extra, ",\"alloc_mb\":{mb},\"allocated_mb\":{total}");
        }
        if let Some(n) = params.fork_children {
            fork_children(n, params.child_ignores_term, &mut extra);
        }
        let keep = req.keep_alive() && !shutting_down();
        if let Some(n) = params.bytes {
            self.send_pattern(req, keep, n)?;
        } else if path == "/healthz" {
            self.send(req, keep, 200, "text/plain; charset=utf-8", b"ok")?;
        } else {
            let body = self.json(path, params.pad.unwrap_or(self.server.pad), &extra);
            self.send(req, keep, 200, "application/json", body.as_bytes())?;
        }
        Ok((200, keep))
    }

    fn json(&self, path: &str, pad: u64, extra: &str) -> String {
        let s = self.server;
        let mut j = String::with_capacity(160 + pad as usize);
        j.push_str("{\"app\":");
        http::json_str(&mut j, &s.app);
        match s.worker {
            Some(w) => {
                let _ = write!(j, ",\"worker\":{w}");
            }
            None => j.push_str(",\"worker\":null"),
        }
        let _ = write!(
            j,
            ",\"pid\":{},\"listen_pid_ok\":{},\"path\":",
            s.pid, s.listen_pid_ok
        );
        http::json_str(&mut j, path);
        let _ = write!(j, ",\"requests\":{}", REQUESTS.load(Ordering::Relaxed));
        if let Some(c) = self.proxy_client {
            let _ = write!(j, ",\"proxy_client\":\"{c}\"");
        }
        j.push_str(extra);
        if pad > 0 {
            j.push_str(",\"pad\":\"");
            j.extend(std::iter::repeat_n('x', pad as usize));
            j.push('"');
        }
        j.push_str("}\n");
        j
    }

    fn send(
        &mut self,
        req: &Request,
        keep: bool,
        status: u16,
        ctype: &str,
        body: &[u8],
    ) -> io::Result<()> {
        let mut out = self
            .head(status, ctype, body.len() as u64, keep)
            .into_bytes();
        if !req.is_head() {
            out.extend_from_slice(body);
        }
        self.stream.write_all(&out)
    }

    /// `bytes=N`: exactly `n` bytes of the deterministic pattern, streamed.
    fn send_pattern(&mut self, req: &Request, keep: bool, n: u64) -> io::Result<()> {
        let pattern = pattern_block();
        let mut out = self
            .head(200, "application/octet-stream", n, keep)
            .into_bytes();
        if req.is_head() {
            return self.stream.write_all(&out);
        }
        // The block is a whole number of pattern periods, so every write starts at offset 0.
        let first = n.min(pattern.len() as u64) as usize;
        out.extend_from_slice(&pattern[..first]);
        self.stream.write_all(&out)?;
        let mut left = n - first as u64;
        while left > 0 {
            let k = left.min(pattern.len() as u64) as usize;
            self.stream.write_all(&pattern[..k])?;
            left -= k as u64;
        }
        Ok(())
    }

    /// Half-closes and reads until the client closes (bounded), so that unread request bytes
    /// do not make the kernel reset the connection before the client read our response.
    fn linger_close(&mut self) {
        let _ = self.stream.flush();
        if self.stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut scratch = [0u8; 4096];
        let mut total = 0usize;
        while total < (1 << 20) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            match sys::poll2(self.stream.as_raw_fd(), None, Some(deadline - now)) {
                Ok(r) if r.a => {}
                Ok(_) => continue,
                Err(_) => return,
            }
            match self.stream.read(&mut scratch) {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    }

    fn peer_str(&self) -> String {
        self.peer.map_or_else(|| "-".to_string(), |p| p.to_string())
    }

    fn log(&self, req: &Request, status: u16, started: Instant) {
        say(format_args!(
            "corral-demo: worker={} {} \"{} {} {}\" {} {:.1}ms",
            self.server.worker_header(),
            self.peer_str(),
            req.method,
            req.target,
            req.version.as_str(),
            status,
            started.elapsed().as_secs_f64() * 1000.0
        ));
    }
}

/// The PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2): the 12-byte
/// signature, version 2 and a command, family, length, addresses. Returns the source address
/// for PROXY over TCP/IPv4 or IPv6, `None` for LOCAL or another family.
fn read_proxy_v2(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut head = [0u8; 16];
    stream.read_exact(&mut head)?;
    if &head[..12] != SIG || head[12] >> 4 != 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a PROXY v2 header",
        ));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest)?;
    if head[12] & 0x0f == 0 {
        return Ok(None); // LOCAL
    }
    Ok(match head[13] {
        0x11 if len >= 12 => Some(SocketAddr::from((
            [rest[0], rest[1], rest[2], rest[3]],
            u16::from_be_bytes([rest[8], rest[9]]),
        ))),
        0x21 if len >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&rest[..16]);
            Some(SocketAddr::from((
                ip,
                u16::from_be_bytes([rest[32], rest[33]]),
            )))
        }
        _ => None,
    })
}

/// Memory allocated by `alloc_mb` and `DEMO_ALLOC_MB`: kept (and resident) for the process's
/// life, so a memory cap sees it until the process exits.
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// MiB in [`LEAKED`].
static LEAKED_MB: AtomicU64 = AtomicU64::new(0);

/// Allocates `mb` MiB one MiB at a time, writes a byte in every 4 KiB page so each is resident
/// (not just reserved), and keeps it in [`LEAKED`]. Returns the MiB kept so far, this included.
/// Under a cgroup memory cap this is where the process is throttled (memory.high) or killed
/// (memory.max).
pub fn alloc_and_touch(mb: u64) -> u64 {
    const MIB: usize = 1 << 20;
    const PAGE: usize = 4096;
    for _ in 0..mb {
        let mut chunk = vec![0u8; MIB];
        for i in (0..MIB).step_by(PAGE) {
            chunk[i] = 1;
        }
        // A poisoned lock only means another thread panicked while pushing; the Vec is fine.
        LEAKED.lock().unwrap_or_else(|e| e.into_inner()).push(chunk);
        LEAKED_MB.fetch_add(1, Ordering::SeqCst);
    }
    LEAKED_MB.load(Ordering::SeqCst)
}

/// `fork_children=N`: forks `n` children that sleep until killed (ignoring SIGTERM with
/// `ignore_term`), and appends `,"children":[pids]` (and `,"fork_error":"..."` when a fork
/// failed, e.g. EAGAIN under a cgroup's pids.max) and `,"forked":count` to `out`.
fn fork_children(n: u64, ignore_term: bool, out: &mut String) {
    let mut pids = Vec::new();
    let mut error = None;
    for _ in 0..n {
        match sys::fork_sleeper(ignore_term) {
            Ok(pid) => pids.push(pid),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    out.push_str(",\"children\":[");
    for (i, pid) in pids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{pid}");
    }
    out.push(']');
    if let Some(e) = &error {
        out.push_str(",\"fork_error\":");
        http::json_str(out, &e.to_string());
    }
    let _ = write!(out, ",\"forked\":{}", pids.len());
    say(format_args!(
        "corral-demo: forked {} of {n} children{}{}",
        pids.len(),
        if error.is_some() {
            ": fork failed: "
        } else {
            ""
        },
        error.map(|e| e.to_string()).unwrap_or_default()
    ));
}

/// Spins until this thread has used `cpu` of CPU time (so under a CPU cap the request takes
/// longer than `cpu` in wall time).
fn burn_cpu(cpu: Duration) {
    let start = sys::thread_cpu_time();
    let mut x = 0u64;
    while sys::thread_cpu_time().saturating_sub(start) < cpu {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
        }
    }
    std::hint::black_box(x);
}

/// 256 periods of the `bytes=N` pattern.
fn pattern_block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| (0..251 * 256).map(http::pattern_byte).collect())
}

/// Writes one line to stdout, ignoring errors (a closed stdout must not take a worker down).
pub fn say(line: std::fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Writes one line to stderr, ignoring errors.
pub fn warn(line: std::fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(line);
    let _ = err.write_all(b"\n");
}
