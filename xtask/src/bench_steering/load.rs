//! The open-loop client: a Poisson schedule of requests from a fixed seed, one request on a
//! new connection and its outcome, the pool of client threads that keeps the schedule, and the
//! closed loop that opens connections as fast as it can.

use super::*;

/// A request mix: (share of requests, path, label) per class; the shares add up to 1.
pub(crate) type Mix = [(f64, &'static str, &'static str)];

/// splitmix64: a fixed-seed generator, so every variant (and every run) gets the same schedule.
pub(super) struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Planned {
    /// Offset from the start of the run.
    pub(crate) at: Duration,
    /// Index into the [`Mix`].
    pub(crate) class: usize,
}

/// Poisson arrivals at `rate` per second over `length`, each of a class drawn from `mix`.
pub(crate) fn schedule(mix: &Mix, rate: f64, length: Duration, seed: u64) -> Vec<Planned> {
    let mut rng = Rng(seed);
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        t += -rng.unit().ln() / rate;
        if t >= length.as_secs_f64() {
            return out;
        }
        let u = rng.unit();
        let mut acc = 0.0;
        let mut class = mix.len() - 1;
        for (i, (share, _, _)) in mix.iter().enumerate() {
            acc += share;
            if u <= acc {
                class = i;
                break;
            }
        }
        out.push(Planned {
            at: Duration::from_secs_f64(t),
            class,
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Failure {
    Refused,
    Reset,
    Timeout,
    Other,
}

pub(crate) enum Outcome {
    Ok(i32),
    Failed(Failure, String),
}

pub(super) fn classify(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Failure::Reset
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Other,
    }
}

/// The request for `path`, on a connection of its own.
pub(crate) fn http_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Send `req` (from [`http_get`]) on a new connection and read the response to EOF (the server
/// closes first). `abort`: then close with a reset (SO_LINGER 0) instead of a FIN, so the
/// server's socket is freed at once instead of lingering in TIME_WAIT.
pub(crate) fn request(addr: SocketAddr, req: &[u8], abort: bool) -> Outcome {
    let fail =
        |e: std::io::Error, what: &str| Outcome::Failed(classify(&e), format!("{what}: {e}"));
    let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return fail(e, "connect"),
    };
    if let Err(e) = s
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
    {
        return fail(e, "setsockopt");
    }
    if let Err(e) = s.write_all(req) {
        return fail(e, "write");
    }
    let mut buf = Vec::with_capacity(512);
    if let Err(e) = s.read_to_end(&mut buf) {
        return fail(e, "read");
    }
    if abort {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket of ours and a linger struct of the size passed.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }
    let text = String::from_utf8_lossy(&buf);
    let Some(head) = text
        .split("\r\n\r\n")
        .next()
        .filter(|_| text.contains("\r\n\r\n"))
    else {
        return Outcome::Failed(
            Failure::Other,
            format!("incomplete response ({} bytes)", buf.len()),
        );
    };
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200 ") {
        return Outcome::Failed(Failure::Other, format!("status `{status}`"));
    }
    let pid = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-pid"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    Outcome::Ok(pid)
}

pub(crate) struct Record {
    pub(crate) class: usize,
    /// Scheduled time -> response read to the end (failures: -> the failure).
    pub(crate) latency: Duration,
    /// Scheduled time -> the client thread starting the request.
    pub(crate) lag: Duration,
    /// Start of the run -> done.
    pub(crate) done: Duration,
    pub(crate) outcome: Outcome,
}

pub(crate) struct LoadResult {
    /// Requests scheduled in the measured window, in no particular order.
    pub(crate) measured: Vec<Record>,
    /// Successful responses completed inside the measured window (whenever scheduled).
    pub(crate) completed_in_window: usize,
    pub(crate) warmup_failures: usize,
    pub(crate) peak_in_flight: usize,
    pub(crate) cpu: Cpu,
}

pub(crate) fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Run `plan` (requests of `mix`) against `servers`.
pub(crate) fn open_loop(
    servers: &Servers,
    mix: &Mix,
    plan: &[Planned],
    warmup: Duration,
    measure: Duration,
) -> LoadResult {
    let addr = servers.addr;
    let start = Instant::now() + Duration::from_millis(200);
    let requests: Vec<Vec<u8>> = mix.iter().map(|m| http_get(m.1)).collect();
    let next = AtomicUsize::new(0);
    let in_flight = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let cpu = std::sync::Mutex::new(Cpu::default());
    let mut records: Vec<Record> = Vec::with_capacity(plan.len());
    std::thread::scope(|s| {
        s.spawn(|| {
            sleep_until(start + warmup);
            let before = CpuSample::take(servers);
            sleep_until(start + warmup + measure);
            *cpu.lock().unwrap() = before.until(&CpuSample::take(servers));
        });
        let handles: Vec<_> = (0..CLIENT_THREADS)
            .map(|_| {
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, || {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(p) = plan.get(i) else {
                                return mine;
                            };
                            let due = start + p.at;
                            sleep_until(due);
                            let began = Instant::now();
                            let n = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                            peak.fetch_max(n, Ordering::Relaxed);
                            let outcome = request(addr, &requests[p.class], false);
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                            let done = Instant::now();
                            mine.push((
                                i,
                                Record {
                                    class: p.class,
                                    latency: done - due,
                                    lag: began.saturating_duration_since(due),
                                    done: done - start,
                                    outcome,
                                },
                            ));
                        }
                    })
                    .expect("spawning a client thread")
            })
            .collect();
        let mut all: Vec<(usize, Record)> = Vec::with_capacity(plan.len());
        for h in handles {
            all.extend(h.join().expect("client thread panicked"));
        }
        all.sort_by_key(|(i, _)| *i);
        records = all.into_iter().map(|(_, r)| r).collect();
    });
    let mut warmup_failures = 0;
    let mut measured = Vec::new();
    let window = warmup..warmup + measure;
    let completed_in_window = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Ok(_)) && window.contains(&r.done))
        .count();
    for (p, r) in plan.iter().zip(records) {
        if p.at < warmup {
            warmup_failures += matches!(r.outcome, Outcome::Failed(..)) as usize;
        } else {
            measured.push(r);
        }
    }
    let cpu = *cpu.lock().unwrap();
    LoadResult {
        measured,
        completed_in_window,
        warmup_failures,
        peak_in_flight: peak.load(Ordering::Relaxed),
        cpu,
    }
}

/// Closed loop: `RATE_CLIENTS` threads, each opening `/healthz` connections back to back for
/// `length`. Returns (successful connections, failures, CPU use).
pub(super) fn closed_loop(servers: &Servers, length: Duration) -> (u64, u64, Cpu) {
    let addr = servers.addr;
    let before = CpuSample::take(servers);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let req = http_get("/healthz");
    std::thread::scope(|s| {
        for _ in 0..RATE_CLIENTS {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match request(addr, &req, true) {
                        Outcome::Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Outcome::Failed(..) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(length);
        stop.store(true, Ordering::Relaxed);
    });
    let cpu = before.until(&CpuSample::take(servers));
    (ok.into_inner(), failed.into_inner(), cpu)
}
