//! Open-loop HTTP load for the tests that kill or replace something under traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http_get;

/// Open-loop load: `rate` requests a second, each on a new connection, each to a path of its
/// own (`/r/<n>`), issued on schedule whatever the answers take.
pub struct OpenLoad {
    stop: Arc<AtomicBool>,
    /// (path, when it was answered 200)
    ok: Arc<Mutex<Vec<(String, Instant)>>>,
    failed: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl OpenLoad {
    pub fn start(a: SocketAddr, rate: u32) -> OpenLoad {
        const THREADS: u32 = 12;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        // Request n is due at t0 + n/rate; each thread takes the next due request.
        let threads = (0..THREADS)
            .map(|_| {
                let (stop, ok, failed, next) =
                    (stop.clone(), ok.clone(), failed.clone(), next.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let path = format!("/r/{n}");
                        match http_get(a, &path) {
                            Ok((200, _)) => ok.lock().expect("lock").push((path, Instant::now())),
                            Ok((s, b)) => failed
                                .lock()
                                .expect("lock")
                                .push(format!("{path}: {s} {b}")),
                            Err(e) => failed.lock().expect("lock").push(format!("{path}: {e}")),
                        }
                    }
                })
            })
            .collect();
        OpenLoad {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// Stop issuing; every request's outcome: (path, when answered 200), and the failures.
    pub fn finish(self) -> (Vec<(String, Instant)>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let ok = self.ok.lock().expect("lock").clone();
        let failed = self.failed.lock().expect("lock").clone();
        (ok, failed)
    }
}

/// `n` keep-alive connections to `a`, each answered once (`GET /`, 200) and left open.
pub fn answered_connections(a: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::{Read, Write};
    (0..n)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(a).expect("connect");
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("request");
            let mut buf = [0u8; 4096];
            let got = c.read(&mut buf).expect("response");
            assert!(
                buf[..got].starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..got])
            );
            c
        })
        .collect()
}
