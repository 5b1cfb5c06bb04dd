//! The eBPF steering program against the real kernel, at the `sys` level: real reuseport
//! listeners, real connections, the agent's own loader. (Root; BPF works on these machines.)

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use corral::sys::bpf::{Policy, Steering};
use corral::sys::socket::{self, PROBE_PORT_BASE};
use corral_tests::*;

struct Group {
    addr: SocketAddr,
    listeners: Vec<TcpListener>,
    steering: Steering,
}

fn group(n: usize, policy: Policy) -> Group {
    require_root();
    let port = free_port();
    let addr = loopback(port);
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            let fd: OwnedFd = socket::reuseport_listener(addr, 1024).expect("listener");
            let l = TcpListener::from(fd);
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .collect();
    let mut steering = Steering::load(policy, port, None).expect("load steering program");
    for (slot, l) in listeners.iter().enumerate() {
        steering
            .set_socket(slot as u32, l.as_fd())
            .expect("set socket");
    }
    steering.attach(listeners[0].as_fd()).expect("attach");
    Group {
        addr,
        listeners,
        steering,
    }
}

/// Accept everything queued; returns how many each listener had.
fn drain(g: &Group) -> Vec<usize> {
    std::thread::sleep(Duration::from_millis(50));
    g.listeners
        .iter()
        .map(|l| {
            let mut n = 0;
            loop {
                match l.accept() {
                    Ok(_) => n += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break n,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        })
        .collect()
}

fn connect_from(addr: SocketAddr, source_port: Option<u16>) -> TcpStream {
    match source_port {
        None => TcpStream::connect(addr).expect("connect"),
        Some(p) => {
            // SAFETY: plain socket(2); the fd is wrapped at once.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0);
            // SAFETY: fd was just created and is owned by nobody else.
            let s = unsafe { OwnedFd::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: p.to_be(),
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            };
            let fd = s.into_raw_fd();
            // SAFETY: valid fd and a sockaddr_in of the size passed.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const i32).cast(),
                    4,
                );
                assert_eq!(
                    libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), 16),
                    0,
                    "bind probe port"
                );
            }
            // SAFETY: fd is ours.
            let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
            let sa: socket2_free::Addr = addr.into();
            // SAFETY: valid fd and sockaddr.
            let r = unsafe { libc::connect(fd, sa.ptr(), sa.len()) };
            assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
            stream
        }
    }
}

mod socket2_free {
    pub struct Addr(libc::sockaddr_in);
    impl From<std::net::SocketAddr> for Addr {
        fn from(a: std::net::SocketAddr) -> Addr {
            let std::net::SocketAddr::V4(a) = a else {
                panic!("v4 only")
            };
            Addr(libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            })
        }
    }
    impl Addr {
        pub fn ptr(&self) -> *const libc::sockaddr {
            (&self.0 as *const libc::sockaddr_in).cast()
        }
        pub fn len(&self) -> libc::socklen_t {
            16
        }
    }
}

#[test]
fn only_eligible_slots_get_connections_and_probes_reach_their_slot() {
    let mut g = group(3, Policy::LeastLoaded);
    g.steering.publish_eligible(&[0, 2]).expect("eligible");
    let conns: Vec<_> = (0..300).map(|_| connect_from(g.addr, None)).collect();
    let counts = drain(&g);
    assert_eq!(counts[1], 0, "slot 1 is not eligible: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 300, "{counts:?}");
    assert!(
        counts[0] > 100 && counts[2] > 100,
        "both eligible slots serve: {counts:?}"
    );
    drop(conns);

    // A probe from PROBE_PORT_BASE + 1 reaches slot 1, which is not eligible.
    let probe = connect_from(g.addr, Some(PROBE_PORT_BASE + 1));
    assert_eq!(drain(&g), vec![0, 1, 0]);
    drop(probe);
    let st = g.steering.stats().expect("stats");
    assert_eq!(st.probes, 1);
    assert_eq!(st.selected, 300);
    let picks = g.steering.slot_picks(3).expect("picks");
    assert_eq!(picks[1], 0);
    assert_eq!(picks[0] + picks[2], 300);
}

/// Without the connection tracker (kernels before 5.5) the load is the published accept queue.
#[test]
fn least_loaded_avoids_the_slot_with_a_long_queue() {
    let mut g = group(4, Policy::LeastLoaded);
    g.steering
        .disable_tracking("test: as without the tracker")
        .expect("config");
    g.steering
        .publish_eligible(&[0, 1, 2, 3])
        .expect("eligible");
    // Slot 3 reports a long accept queue; the others none.
    g.steering
        .publish_load(&[(0, 0), (1, 0), (2, 0), (3, 1000)])
        .expect("load");
    let conns: Vec<_> = (0..400).map(|_| connect_from(g.addr, None)).collect();
    let counts = drain(&g);
    drop(conns);
    assert_eq!(counts[3], 0, "slot 3 never wins a comparison: {counts:?}");
    // The others are scored by picks since the publish alone, so they take turns: with the
    // tracker's counts leaking in (in-flight ages), this split was 123/81/196 once.
    for c in &counts[..3] {
        assert!((400 / 3 - 5..=400 / 3 + 5).contains(c), "{counts:?}");
    }
}

#[test]
fn in_flight_connections_count_from_handshake_until_the_server_closes() {
    let mut g = group(2, Policy::LeastLoaded);
    g.steering.tracker().as_ref().expect("tracker attached");
    g.steering.publish_eligible(&[0, 1]).expect("eligible");
    let clients: Vec<_> = (0..40).map(|_| connect_from(g.addr, None)).collect();
    std::thread::sleep(Duration::from_millis(50));
    let queued: Vec<usize> = g
        .listeners
        .iter()
        .map(|l| socket::accept_queue_len(l.as_fd()).expect("queue") as usize)
        .collect();
    let open = g.steering.inflight(2).expect("inflight");
    assert_eq!(
        open.iter().map(|n| *n as usize).collect::<Vec<_>>(),
        queued,
        "queued connections are in flight, per slot"
    );
    assert_eq!(queued.iter().sum::<usize>(), 40);

    // Accepted and open: still in flight. A client closing first does not end it either.
    let mut accepted = Vec::new();
    for l in &g.listeners {
        while let Ok((s, _)) = l.accept() {
            accepted.push(s);
        }
    }
    assert_eq!(accepted.len(), 40);
    drop(clients);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.steering.inflight(2).expect("inflight"), open);

    // The server closes: nothing in flight. A probe is not counted.
    drop(accepted);
    let probe = connect_from(g.addr, Some(PROBE_PORT_BASE + 1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.steering.inflight(2).expect("inflight"), vec![0, 0]);
    let st = g.steering.stats().expect("stats");
    assert_eq!(st.tracked, 40);
    assert_eq!(st.untracked, 1, "the probe");
    drop(probe);
    drain(&g);
    assert_eq!(g.steering.inflight(2).expect("inflight"), vec![0, 0]);
}

/// The tracker's last run per connection skips its lookup when the close comes after FIN_WAIT1
/// or LAST_ACK; a close straight from ESTABLISHED (the server resets: SO_LINGER 0) must still
/// uncount, as must a connection closed before it was accepted (its listener closed).
#[test]
fn connections_the_server_resets_or_never_accepts_are_uncounted() {
    let mut g = group(2, Policy::LeastLoaded);
    g.steering.tracker().as_ref().expect("tracker attached");
    g.steering.publish_eligible(&[0, 1]).expect("eligible");
    let clients: Vec<_> = (0..20).map(|_| connect_from(g.addr, None)).collect();
    let counted = |g: &Group| {
        g.steering
            .inflight(2)
            .expect("inflight")
            .iter()
            .sum::<u32>()
    };
    wait_for(Duration::from_secs(5), "20 in flight", || {
        (counted(&g) == 20).then_some(())
    });
    let mut accepted = Vec::new();
    for l in &g.listeners {
        while let Ok((s, _)) = l.accept() {
            accepted.push(s);
        }
    }
    assert_eq!(accepted.len(), 20);
    for s in accepted {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a fully initialised `linger` of the size passed.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_LINGER");
        drop(s); // an RST: ESTABLISHED -> CLOSE
    }
    wait_for(Duration::from_secs(5), "the reset ones uncounted", || {
        (counted(&g) == 0).then_some(())
    });
    drop(clients);

    // Queued, never accepted: both listeners close (nowhere to migrate to), their children
    // with them.
    let clients: Vec<_> = (0..10).map(|_| connect_from(g.addr, None)).collect();
    wait_for(Duration::from_secs(5), "10 in flight", || {
        (counted(&g) == 10).then_some(())
    });
    drop(std::mem::take(&mut g.listeners));
    wait_for(
        Duration::from_secs(5),
        "the never accepted ones uncounted",
        || (counted(&g) == 0).then_some(()),
    );
    drop(clients);
}

#[test]
fn least_loaded_avoids_the_slot_with_connections_open() {
    let mut g = group(2, Policy::LeastLoaded);
    // Slot 0's worker has accepted 20 connections and is busy with them; its queue is empty.
    g.steering.publish_eligible(&[0]).expect("eligible");
    let clients: Vec<_> = (0..20).map(|_| connect_from(g.addr, None)).collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut held = Vec::new();
    while let Ok((s, _)) = g.listeners[0].accept() {
        held.push(s);
    }
    assert_eq!(held.len(), 20);
    g.steering.publish_eligible(&[0, 1]).expect("eligible");
    // Queues empty, loads published as such: only the in-flight count tells the slots apart.
    g.steering.publish_load(&[(0, 0), (1, 0)]).expect("load");
    // Each new connection adds a pick and, once established, an in-flight connection to slot
    // 1's score: ten of them bring it to 20 at most, which never beats slot 0's 20.
    let more: Vec<_> = (0..10).map(|_| connect_from(g.addr, None)).collect();
    let counts = drain(&g);
    drop((more, clients, held));
    assert_eq!(counts, vec![0, 10], "slot 0 has 20 open connections");
}

#[test]
fn round_robin_is_even() {
    let mut g = group(4, Policy::RoundRobin);
    g.steering
        .publish_eligible(&[0, 1, 2, 3])
        .expect("eligible");
    let conns: Vec<_> = (0..400).map(|_| connect_from(g.addr, None)).collect();
    let counts = drain(&g);
    drop(conns);
    for c in &counts {
        assert!(
            (90..=110).contains(c),
            "round-robin per CPU stays near 100 each: {counts:?}"
        );
    }
}

#[test]
fn closing_a_listener_migrates_its_queue() {
    let mut g = group(2, Policy::LeastLoaded);
    assert!(
        g.steering.migrates(),
        "this kernel has the select-or-migrate program"
    );
    // Only slot 1 is eligible: connections queue there, nobody accepts.
    g.steering.publish_eligible(&[1]).expect("eligible");
    let conns: Vec<_> = (0..20).map(|_| connect_from(g.addr, None)).collect();
    std::thread::sleep(Duration::from_millis(50));
    // Slot 1 goes away; slot 0 becomes the eligible one; its queue must move, not reset.
    g.steering.publish_eligible(&[0]).expect("eligible");
    let l1 = g.listeners.remove(1);
    drop(l1);
    let counts = drain(&g);
    assert_eq!(counts, vec![20], "all queued connections moved to slot 0");
    assert_eq!(g.steering.stats().expect("stats").migrations, 20);
    drop(conns);
}

/// Least-loaded looks at every ready slot (up to `abi::FULL_SCAN`), not two random ones: an idle
/// worker gets the next connection whatever the others are doing. With power of two choices,
/// slot 7 would be a candidate for a quarter of the connections only.
#[test]
fn least_loaded_finds_the_one_idle_slot_among_many_busy_ones() {
    let mut g = group(8, Policy::LeastLoaded);
    g.steering.tracker().as_ref().expect("tracker attached");
    // Slots 0-6 each hold five accepted, open connections; slot 7 none.
    let mut held = Vec::new();
    let mut clients = Vec::new();
    for slot in 0..7u32 {
        g.steering.publish_eligible(&[slot]).expect("eligible");
        for _ in 0..5 {
            clients.push(connect_from(g.addr, None));
        }
        std::thread::sleep(Duration::from_millis(20));
        while let Ok((s, _)) = g.listeners[slot as usize].accept() {
            held.push(s);
        }
    }
    assert_eq!(held.len(), 35);
    g.steering
        .publish_eligible(&[0, 1, 2, 3, 4, 5, 6, 7])
        .expect("eligible");
    // Five new connections: each finds slot 7 the least loaded (0..4 open against 5).
    let more: Vec<_> = (0..5).map(|_| connect_from(g.addr, None)).collect();
    let counts = drain(&g);
    drop((more, clients, held));
    assert_eq!(
        counts,
        vec![0, 0, 0, 0, 0, 0, 0, 5],
        "slot 7 was the idle one"
    );
}

/// The shared policy: one accept queue, entry 0's socket, for every connection (probes too),
/// whatever the ready set says.
#[test]
fn shared_sends_every_connection_to_the_one_shared_socket() {
    let mut g = group(3, Policy::Shared);
    let conns: Vec<_> = (0..100).map(|_| connect_from(g.addr, None)).collect();
    assert_eq!(drain(&g), vec![100, 0, 0]);
    g.steering.publish_eligible(&[1, 2]).expect("eligible");
    let probe = connect_from(g.addr, Some(PROBE_PORT_BASE + 2));
    assert_eq!(drain(&g), vec![1, 0, 0]);
    drop((conns, probe));
    let st = g.steering.stats().expect("stats");
    assert_eq!(st.selected, 101);
    assert_eq!(st.probes, 0);
}

/// Of slots with as many open connections, least-loaded takes the one whose connections are
/// younger: a worker whose one request has run for a while is more likely in a long one.
#[test]
fn least_loaded_prefers_the_slot_whose_open_connections_are_younger() {
    let mut g = group(2, Policy::LeastLoaded);
    g.steering.tracker().as_ref().expect("tracker attached");
    for trial in 0..8 {
        // Slot 0 holds a connection opened 100 ms ago, slot 1 one opened just now.
        g.steering.publish_eligible(&[0]).expect("eligible");
        let old = connect_from(g.addr, None);
        std::thread::sleep(Duration::from_millis(100));
        g.steering.publish_eligible(&[1]).expect("eligible");
        let young = connect_from(g.addr, None);
        std::thread::sleep(Duration::from_millis(20));
        let held: Vec<_> = g
            .listeners
            .iter()
            .map(|l| l.accept().expect("accept").0)
            .collect();
        g.steering.publish_eligible(&[0, 1]).expect("eligible");
        let next = connect_from(g.addr, None);
        assert_eq!(drain(&g), vec![0, 1], "trial {trial}: the younger slot");
        drop((old, young, next, held));
        wait_for(Duration::from_secs(5), "every connection closed", || {
            (g.steering.inflight(2).expect("inflight") == vec![0, 0]).then_some(())
        });
    }
}

/// A previous agent's tracker, handed over (its link and maps), goes on counting the
/// connections it saw: the new program adds them to each slot's load until they close, then
/// lets the old tracker go.
#[test]
fn a_previous_trackers_open_connections_are_carried_until_they_close() {
    let mut old = group(2, Policy::LeastLoaded);
    old.steering.publish_eligible(&[0]).expect("eligible");
    let clients: Vec<_> = (0..6).map(|_| connect_from(old.addr, None)).collect();
    let mut held = Vec::new();
    wait_for(
        Duration::from_secs(10),
        "6 connections accepted by slot 0",
        || {
            while let Ok((s, _)) = old.listeners[0].accept() {
                held.push(s);
            }
            (held.len() == 6).then_some(())
        },
    );
    wait_for(Duration::from_secs(10), "6 in flight on slot 0", || {
        (old.steering.inflight(2).ok()? == [6, 0]).then_some(())
    });
    let [link, inflight, since] = old
        .steering
        .tracker_handles()
        .expect("tracker attached")
        .map(|fd| fd.try_clone_to_owned().expect("dup"));
    // The agent goes (its sockets out of its array, its program and maps dropped with it);
    // the listeners stay, as the workers hold them.
    let Group {
        addr,
        listeners,
        mut steering,
    } = old;
    for slot in 0..2 {
        steering.clear_socket(slot).expect("clear");
    }
    drop(steering);
    let port = addr.port();
    let mut steering = Steering::load(Policy::LeastLoaded, port, None).expect("load");
    for (slot, l) in listeners.iter().enumerate() {
        steering.set_socket(slot as u32, l.as_fd()).expect("set");
    }
    steering.attach(listeners[0].as_fd()).expect("attach");
    assert_eq!(steering.carry(link, inflight, since, 2).expect("carry"), 6);
    assert_eq!(steering.inflight(2).expect("inflight"), vec![6, 0]);
    steering.publish_eligible(&[0, 1]).expect("eligible");
    steering.publish_load(&[(0, 0), (1, 0)]).expect("load");
    let g = Group {
        addr,
        listeners,
        steering,
    };
    // Slot 0 still serves the 6: new connections go to slot 1.
    let more: Vec<_> = (0..4).map(|_| connect_from(g.addr, None)).collect();
    assert_eq!(drain(&g), vec![0, 4], "slot 0 carries 6 open connections");
    drop(more);
    let Group { mut steering, .. } = g;
    // The server closes them: the old tracker counts them down, and is let go at 0.
    drop((held, clients));
    wait_for(
        Duration::from_secs(10),
        "the carried connections closed",
        || (steering.refresh_carried(2).expect("refresh") == 0).then_some(()),
    );
    assert_eq!(steering.inflight(2).expect("inflight"), vec![0, 0]);
}
