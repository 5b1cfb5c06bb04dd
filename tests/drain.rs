//! SIGTERM as the kubelet sends it, under load: every connection the kernel completed (the
//! client's connect() succeeded) gets its answer; new ones after the drain are refused, which a
//! client or kube-proxy retries elsewhere, and never reset after being accepted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_tests::*;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    ok_after_term: AtomicU64,
    refused: AtomicU64,
    lost: AtomicU64,
}

/// One request on a new connection: counted as answered, refused (never accepted), or lost
/// (accepted, then reset or closed without an answer).
fn one(
    addr: SocketAddr,
    tally: &Tally,
    term_sent: &AtomicBool,
    lost_why: &std::sync::Mutex<Vec<String>>,
) {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(_) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut out = Vec::new();
    let res = s
        .write_all(b"GET /x?delay_ms=150 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .and_then(|_| s.read_to_end(&mut out));
    let text = String::from_utf8_lossy(&out);
    if res.is_ok() && text.starts_with("HTTP/1.1 200") {
        tally.ok.fetch_add(1, Ordering::Relaxed);
        if term_sent.load(Ordering::Relaxed) {
            tally.ok_after_term.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        tally.lost.fetch_add(1, Ordering::Relaxed);
        lost_why
            .lock()
            .unwrap()
            .push(format!("{res:?} {:?}", text.lines().next()));
    }
}

#[test]
fn sigterm_under_load_answers_every_accepted_connection() {
    under_load("least-loaded");
}

/// The kernel's hash (no eBPF program, no migration of queued connections) drains the same way.
#[test]
fn with_the_kernels_hash_too() {
    under_load("hash");
}

fn under_load(steering: &str) {
    let port = free_port();
    let addr = loopback(port);
    let app = demo_app("web", addr, 2)
        .workers("stop_timeout", "20s")
        .listen("steering", steering);
    let mut agent = Agent::start(&format!("drain-{steering}"), app);
    agent.wait_ready("web", 2, Duration::from_secs(20));

    let tally = Arc::new(Tally::default());
    let term_sent = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let lost_why = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (tally, term_sent, done, lost_why) = (
                tally.clone(),
                term_sent.clone(),
                done.clone(),
                lost_why.clone(),
            );
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    one(addr, &tally, &term_sent, &lost_why);
                }
            })
        })
        .collect();
    wait_for(Duration::from_secs(20), "load flowing", || {
        (tally.ok.load(Ordering::Relaxed) >= 40).then_some(())
    });
    term_sent.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let code = agent.stop(Duration::from_secs(60));
    let stopped_in = t0.elapsed();
    // Clients keep going a moment after the agent is gone: they must all be refused now.
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let (ok, after, refused, lost) = (
        tally.ok.load(Ordering::Relaxed),
        tally.ok_after_term.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.lost.load(Ordering::Relaxed),
    );
    eprintln!("drain ({steering}): {ok} answered ({after} after SIGTERM), {refused} refused, {lost} lost, stopped in {stopped_in:?}");
    assert_eq!(code, Some(0), "log:\n{}", agent.log());
    assert_eq!(
        lost,
        0,
        "accepted connections lost at SIGTERM: {:?}",
        lost_why.lock().unwrap()
    );
    assert!(after > 0, "requests in flight at SIGTERM were answered");
    assert!(
        refused > 0,
        "connections after the agent's exit are refused"
    );
}

/// An agent that crashes in the middle of a stop's drain leaves its listeners refusing new
/// handshakes; the agent that adopts them takes the filter off. At the `sys` level: a client
/// whose SYN the filter dropped is accepted once it is off (its SYN is retransmitted).
#[test]
fn a_listener_refusing_for_a_drain_takes_connections_again() {
    use std::os::fd::AsFd;
    let addr = loopback(free_port());
    let fd = corral::sys::socket::reuseport_listener(addr, 16).expect("listener");
    let listener = std::net::TcpListener::from(fd);
    // No filter yet: taking it off is a no-op.
    corral::sys::socket::accept_new_connections(listener.as_fd(), addr).expect("no filter");
    corral::sys::socket::refuse_new_connections(listener.as_fd(), addr).expect("refuse");
    let client =
        std::thread::spawn(move || TcpStream::connect_timeout(&addr, Duration::from_secs(30)));
    // The client's SYN was sent (and dropped: nothing to accept).
    let port_hex = format!(":{:04X}", addr.port());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "02" && f[2].ends_with(&port_hex)
        })
    {
        assert!(Instant::now() < deadline, "the client never sent its SYN");
        std::thread::sleep(Duration::from_millis(5));
    }
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "the filter let a SYN through");
    corral::sys::socket::accept_new_connections(listener.as_fd(), addr).expect("accept again");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the retransmitted SYN was never accepted: {e}"),
        }
    }
    client.join().expect("client").expect("connected");
}
