//! The CLI's control commands and the agent's systemd integration, through the real binaries.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::Duration;

use corral_tests::*;

#[test]
fn restart_scale_reload_and_status_from_the_cli() {
    let port = free_port();
    let agent = Agent::start("cli", demo_app("web", loopback(port), 2));
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    // Only root (the agent's owner) may drive it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket)
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let (code, out, err) = agent.cli(&["restart", "web/1"]);
    assert_eq!(code, 0, "{out}{err}");
    let after = wait_for(Duration::from_secs(20), "worker 1 replaced", || {
        let now = agent.wait_ready("web", 2, Duration::from_secs(20));
        (now[1] != pids[1]).then_some(now)
    });
    assert_eq!(after[0], pids[0], "only worker 1 restarted");

    let (code, out, err) = agent.cli(&["scale", "web", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    let scaled = agent.wait_ready("web", 3, Duration::from_secs(20));
    assert_eq!(
        &scaled[..2],
        &after[..],
        "scale-up keeps the running workers"
    );

    let (code, out, err) = agent.cli(&["status", "web", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["name"], "web");
    assert_eq!(v[0]["workers"].as_array().map(Vec::len), Some(3));
    assert!(v[0]["workers"][0]["rss_bytes"].as_u64().unwrap_or(0) > 0);

    let (code, out, _) = agent.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("web  running") && out.contains("RESTARTS"),
        "{out}"
    );

    // `corral reload` re-reads the file, which still says 2 workers.
    let (code, out, err) = agent.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("scaled web to 2"), "{out}");
    agent.wait_ready("web", 2, Duration::from_secs(20));

    // Bad requests get precise errors and change nothing.
    let before = agent.wait_ready("web", 2, Duration::from_secs(5));
    for (args, expect) in [
        (vec!["restart", "nope"], "no app named `nope`"),
        (vec!["restart", "web/7"], "app `web` has workers 0..2"),
        (vec!["restart", "web/x"], "must be a number"),
        (vec!["scale", "web", "0"], "worker count must be 1..=1024"),
        (vec!["scale", "nope", "2"], "no app named `nope`"),
        (vec!["status", "nope"], "no app named `nope`"),
        (vec!["reload", "nope"], "no app named `nope`"),
    ] {
        let (code, out, err) = agent.cli(&args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // Garbage on the control socket itself.
    for garbage in [
        "not json\n",
        "{\"cmd\":\"explode\"}\n",
        "{\"cmd\":\"scale\",\"app\":\"web\"}\n",
    ] {
        let mut s = UnixStream::connect(&agent.socket).expect("connect");
        s.write_all(garbage.as_bytes()).expect("write");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("read");
        assert!(
            reply.contains("\"result\":\"error\"") && reply.contains("invalid request"),
            "{garbage:?}: {reply}"
        );
    }
    assert_eq!(
        agent.wait_ready("web", 2, Duration::from_secs(5)),
        before,
        "nothing changed"
    );
    let (code, _, err) = Command::new(bin("corral"))
        .args(["status", "--socket", "/nonexistent/corral.sock"])
        .output()
        .map(|o| {
            (
                o.status.code().unwrap_or(-1),
                o.stdout,
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .expect("run");
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the agent at /nonexistent/corral.sock"),
        "{err}"
    );
}

#[test]
fn sd_notify_states_and_no_agent_variables_leak_into_workers() {
    require_root();
    let dir = TempDir::new("notify");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let port = free_port();
    let config = write_config(
        dir.path(),
        &AgentTable::private(dir.path()),
        demo_app("web", loopback(port), 2),
    );
    let mut child = Command::new(bin("corral"))
        .args(["agent", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("LISTEN_FDS", "5")
        .env("LISTEN_PID", "1")
        .env("SECRET_OF_THE_AGENT", "hunter2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    let recv = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1");
    let socket = dir.path().join("run/control.sock");
    let status = || {
        corral::control::call(
            &socket,
            &Request::Status { app: None },
            Duration::from_secs(5),
        )
        .ok()
    };
    let pids = wait_for(
        Duration::from_secs(20),
        "two ready workers",
        || match status()? {
            Response::Status { apps, .. } => {
                let ws = &apps.first()?.workers;
                (ws.len() == 2 && ws.iter().all(|w| w.state == "ready"))
                    .then(|| ws.iter().filter_map(|w| w.pid).collect::<Vec<_>>())
            }
            _ => None,
        },
    );
    for pid in &pids {
        let env: BTreeMap<_, _> = proc_environ(*pid).into_iter().collect();
        assert!(!env.contains_key("NOTIFY_SOCKET"), "{env:?}");
        assert!(!env.contains_key("WATCHDOG_USEC"), "{env:?}");
        assert!(!env.contains_key("SECRET_OF_THE_AGENT"), "{env:?}");
        assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("1"));
        assert_eq!(env.get("LISTEN_PID"), Some(&pid.to_string()));
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
        assert_eq!(cwd, std::path::Path::new("/tmp"), "workdir");
    }
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloading = recv();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(recv(), "READY=1");
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(recv(), "STOPPING=1");
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(0));
    for pid in pids {
        assert!(!pid_alive(pid));
    }
}

#[test]
fn ipv6_http_and_notify_readiness() {
    let port6 = free_port();
    let port_http = free_port();
    let port_notify = free_port();
    let apps = format!(
        "{}{}{}",
        demo_app("six", format!("[::1]:{port6}"), 2),
        demo_app("http", loopback(port_http), 2)
            .env("DEMO_START_DELAY_MS", 800)
            .workers("ready", "http:/healthz"),
        demo_app("notified", loopback(port_notify), 2)
            .env("DEMO_NOTIFY", 1)
            .env("DEMO_START_DELAY_MS", 800)
            .workers("ready", "notify"),
    );
    let agent = Agent::start("readykinds", apps);
    agent.wait_ready("six", 2, Duration::from_secs(20));
    let six: SocketAddr = format!("[::1]:{port6}").parse().expect("addr");
    let (status, body) = http_get(six, "/").expect("GET over IPv6");
    assert_eq!(status, 200, "{body}");
    // Both wait for their workers' 800 ms start delay: the agent's own measure, from each
    // worker's spawn to its readiness (the test's clock would start after the spawns).
    agent.wait_ready("http", 2, Duration::from_secs(20));
    agent.wait_ready("notified", 2, Duration::from_secs(20));
    for app in ["http", "notified"] {
        let took: Vec<f64> = (0..2).flat_map(|w| agent.ready_in_ms(app, w)).collect();
        assert_eq!(took.len(), 2, "{app}: {}", agent.log());
        assert!(took.iter().all(|ms| *ms >= 799.9), "{app}: {took:?}");
    }
}

/// The agent's abstract notify sockets (`@corral/<agent pid>/notify/<worker id>`), from
/// /proc/net/unix.
fn notify_sockets(agent_pid: i32) -> Vec<String> {
    let prefix = format!("@corral/{agent_pid}/notify/");
    std::fs::read_to_string("/proc/net/unix")
        .expect("/proc/net/unix")
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Anyone in the network namespace can send to an abstract socket: READY=1 counts only from
/// the worker or its own processes.
#[test]
fn notify_readiness_ignores_strangers_and_takes_the_workers_children() {
    use std::os::linux::net::SocketAddrExt;
    let (p1, p2) = (free_port(), free_port());
    let apps = format!(
        "{}{}",
        demo_app("late", loopback(p1), 1)
            .env("DEMO_NOTIFY", 1)
            .env("DEMO_START_DELAY_MS", 3000)
            .workers("ready", "notify"),
        // The worker is a shell; the demo, which sends READY=1, is its child.
        demo_app("wrapped", loopback(p2), 1)
            .command([
                "/bin/sh",
                "-c",
                "sh -c 'export LISTEN_PID=$$; exec @DEMO@' & wait",
            ])
            .env("DEMO_NOTIFY", 1)
            .workers("ready", "notify"),
    );
    let agent = Agent::start("notifyfrom", apps);
    let t0 = std::time::Instant::now();
    // The late worker's socket lives until its READY=1 (3 s); the wrapped one's may already
    // be gone.
    wait_for(Duration::from_secs(10), "the late worker started", || {
        agent.app("late").workers.first()?.pid
    });
    let sockets = wait_for(Duration::from_secs(10), "the notify sockets", || {
        let s = notify_sockets(agent.pid());
        (!s.is_empty()).then_some(s)
    });
    // A stranger (this test, the agent's parent) says READY=1 on every worker's socket.
    let stranger = UnixDatagram::unbound().expect("socket");
    for name in &sockets {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(
            name.trim_start_matches('@').as_bytes(),
        )
        .expect("abstract name");
        stranger
            .send_to_addr(b"READY=1", &addr)
            .expect("send READY=1");
    }
    // The wrapped app's child reports for it.
    agent.wait_ready("wrapped", 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let late = agent.app("late");
    assert_eq!(
        late.workers[0].state, "starting",
        "a stranger's READY=1 made the worker ready: {late:?}"
    );
    agent.wait_ready("late", 1, Duration::from_secs(20));
    assert!(
        t0.elapsed() >= Duration::from_millis(2500),
        "ready before its 3 s start delay: {:?}",
        t0.elapsed()
    );
    let me = std::process::id();
    let log = agent.log();
    assert!(
        log.contains(&format!("ignoring READY=1 from pid {me}")),
        "{log}"
    );
    // The wrapped worker's child serves; it is not the worker, and it goes when the worker
    // goes (its process group is killed at the worker's exit: this host has no cgroup root).
    let (status, body) = http_get(loopback(p2), "/").expect("GET the wrapped app");
    assert_eq!(status, 200, "{body}");
    let child: i32 = body
        .split("\"pid\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body}"));
    let wrapper = agent.app("wrapped").workers[0].pid.expect("worker pid");
    assert_ne!(child, wrapper, "the demo runs as the shell's child");
    let mut agent = agent;
    assert_eq!(agent.stop(Duration::from_secs(20)), Some(0));
    wait_for(
        Duration::from_secs(5),
        "the wrapped worker's child gone",
        || (!pid_alive(child)).then_some(()),
    );
}

/// A raw HTTP exchange with the metrics endpoint: (status line, body).
fn http_raw(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// `[agent] metrics`: what corral status shows, for Prometheus; other requests get a precise
/// status; idle connections do not block a scrape; the endpoint survives a re-exec.
#[test]
fn metrics_endpoint_serves_the_status_for_prometheus() {
    let (port, mport) = (free_port(), free_port());
    let maddr = loopback(mport);
    let agent = Agent::start_with_agent_extra(
        "metrics",
        Table::new().set("metrics", maddr),
        demo_app("web", loopback(port), 2),
    );
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    let scrape = || {
        let (status, body) = http_raw(maddr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        body
    };
    let body = scrape();
    for line in [
        "corral_worker_up{app=\"web\",slot=\"0\"} 1",
        "corral_worker_up{app=\"web\",slot=\"1\"} 1",
        "corral_app_state{app=\"web\",state=\"running\"} 1",
        "corral_worker_restarts_total{app=\"web\",slot=\"1\"} 0",
        "corral_agent_reexecs_total 0",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} missing:\n{body}");
    }
    // A killed worker shows as a restart.
    // SAFETY: pids[1] is one of this test's workers.
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    // Until its replacement is ready (the status may still show the killed one for a moment,
    // and a re-exec below is refused while a worker starts).
    wait_for(Duration::from_secs(10), "a new ready worker 1", || {
        let now = agent.wait_ready("web", 2, Duration::from_secs(10));
        (now[1] != pids[1]).then_some(())
    });
    wait_for(Duration::from_secs(10), "the restart counted", || {
        scrape()
            .lines()
            .any(|l| l == "corral_worker_restarts_total{app=\"web\",slot=\"1\"} 1")
            .then_some(())
    });
    // Everything else gets a status that says what is wrong.
    assert_eq!(
        http_raw(maddr, b"GET / HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http_raw(maddr, b"POST /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        http_raw(maddr, b"\x16\x03\x01\x00\xa5\x01\x00\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
    // Idle connections (a slow client) do not hold up a scrape.
    let idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(maddr).expect("idle connect");
            s.write_all(b"GET /met").expect("half a request");
            s
        })
        .collect();
    scrape();
    drop(idle);
    // The endpoint is handed over by a re-exec.
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    let body = scrape();
    assert!(
        body.lines().any(|l| l == "corral_agent_reexecs_total 1"),
        "{body}"
    );
}

#[test]
fn on_failure_and_never_policies() {
    let p1 = free_port();
    let p2 = free_port();
    let exits = |name: &str, code: u8, port: u16, policy: &str| {
        App::new(name)
            .command(["/bin/sh", "-c", format!("exit {code}").as_str()])
            .user("nobody")
            .address(loopback(port))
            .count(1)
            .workers("ready", "delay:10s")
            .restart("policy", policy)
    };
    let apps = format!(
        "{}{}",
        exits("clean", 0, p1, "on-failure"),
        exits("once", 7, p2, "never")
    );
    let agent = Agent::start("policies", apps);
    for (app, exit) in [
        ("clean", "exited with status 0"),
        ("once", "exited with status 7"),
    ] {
        let w = wait_for(Duration::from_secs(10), "worker to exit", || {
            let a = agent.app(app);
            let w = a.workers.first()?.clone();
            (w.state == "exited").then_some(w)
        });
        assert_eq!(w.last_exit.as_deref(), Some(exit), "{app}");
        std::thread::sleep(Duration::from_millis(500));
        let w = agent.app(app).workers[0].clone();
        assert_eq!(
            (w.state.as_str(), w.restarts, w.pid),
            ("exited", 0, None),
            "{app} stays down"
        );
    }
    let log = agent.log();
    assert!(
        log.contains("not restarting: exited cleanly and restart policy is on-failure"),
        "{log}"
    );
    assert!(
        log.contains("not restarting: restart policy is never"),
        "{log}"
    );
}

/// The memory budget is checked wherever the plan changes, not only at start: a reload or a
/// `corral scale` that would exceed it is refused with the start's message and changes nothing.
#[test]
fn over_budget_reload_and_scale_are_refused_and_change_nothing() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let fits = demo_app("web", &address, 2).workers("memory_max", "4GiB");
    // This host cannot enforce memory caps (hybrid cgroups); the budget is checked all the same.
    let mut agent =
        Agent::start_with_agent_extra("budget", Table::new().set("enforce_limits", false), &fits);
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));

    // 1000 x 4GiB does not fit in any machine this runs on.
    let (code, out, err) = agent.cli(&["scale", "web", "1000"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("scale refused, nothing changed: memory budget exceeded: web 1000 x 4GiB"),
        "{err}"
    );

    let over = fits.clone().workers("memory_max", "512GiB");
    agent.rewrite_config(&over);
    let (code, out, err) = agent.cli(&["reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "reload refused, running apps untouched: memory budget exceeded: web 2 x 512GiB"
        ),
        "{err}"
    );
    let (code, out, err) = agent.cli(&["reload", "web"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("memory budget exceeded"), "{err}");
    // SIGHUP reads the same file: refused the same way, in the log.
    agent.signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the SIGHUP reload refused", || {
        agent
            .log()
            .contains("reload refused, running apps untouched: memory budget exceeded")
            .then_some(())
    });

    let app = agent.app_json("web");
    assert_eq!(app["state"], "running", "{app}");
    assert_eq!(
        app["workers"][0]["memory_max"].as_u64(),
        Some(4 << 30),
        "the running config is the old one"
    );
    assert_eq!(
        agent.wait_ready("web", 2, Duration::from_secs(5)),
        pids,
        "no worker was started or stopped"
    );

    // Back within budget, the same commands work.
    agent.rewrite_config(fits.count(3));
    let (code, out, err) = agent.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        &agent.wait_ready("web", 3, Duration::from_secs(20))[..2],
        &pids[..]
    );
    agent.stop(Duration::from_secs(20));
}

/// A rolling replacement's new worker inherits its slot's socket while the worker it replaces
/// still accepts from it, so the old worker may accept the new one's readiness probe. The new
/// worker counts as ready only once it accepted a probe itself: here it sleeps 3 s before
/// accepting anything, the old one keeps serving meanwhile, and the new one is not ready early.
#[test]
fn a_replacement_is_not_ready_before_it_accepts_though_the_old_worker_takes_its_probes() {
    use std::os::unix::fs::PermissionsExt;
    let port = free_port();
    let dir = TempDir::new("slow-successor");
    // The workers (nobody) look for the marker.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let marker = dir.path().join("slow");
    let script = format!(
        "if [ -e {} ]; then export DEMO_START_DELAY_MS=3000; fi; exec @DEMO@",
        marker.display()
    );
    let app = demo_app("web", loopback(port), 1).command(["/bin/sh", "-c", &script]);
    let agent = Agent::start("slow-successor", app);
    let old = agent.wait_ready("web", 1, Duration::from_secs(20))[0];
    std::fs::write(&marker, "").expect("marker");

    let t0 = std::time::Instant::now();
    let (code, out, err) = agent.cli(&["restart", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut served_by_old = 0;
    let ready_after = wait_for(Duration::from_secs(30), "the replacement ready", || {
        // The old worker keeps accepting from the slot's socket (and so takes probes).
        if let Ok((200, body)) = http_get(loopback(port), "/") {
            if body.contains(&format!("\"pid\":{old},")) {
                served_by_old += 1;
            }
        }
        let a = agent.app("web");
        a.workers
            .iter()
            .any(|w| w.pid.is_some_and(|p| p != old) && w.state == "ready")
            .then(|| t0.elapsed())
    });
    assert!(
        ready_after >= Duration::from_millis(2500),
        "the replacement counted as ready {ready_after:?} after the restart, before its 3 s \
         start delay ended (the old worker took its probe); log:\n{}",
        agent.log()
    );
    assert!(
        served_by_old > 0,
        "the old worker served nothing while its successor started"
    );
    let now = agent.wait_ready("web", 1, Duration::from_secs(20));
    assert_ne!(now[0], old);
    let (status, body) = http_get(loopback(port), "/").expect("GET after the replacement");
    assert_eq!(status, 200, "{body}");
}

/// systemd runs the unit's `ExecStartPre=corral check` before it restarts a crashed agent,
/// while that agent's workers still hold the listen addresses and its keeper the control
/// socket (unanswered): the check must pass there, or no crash is survived under systemd.
#[test]
fn check_passes_while_a_crashed_agents_workers_hold_their_addresses() {
    let port = free_port();
    let mut agent = Agent::start("check-kept", demo_app("web", loopback(port), 2));
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    agent.kill9();
    let out = Command::new(bin("corral"))
        .args(["check", "--config"])
        .arg(&agent.config)
        .output()
        .expect("corral check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("keeper: listening"), "{text}");
    // The next agent adopts the same workers.
    agent.spawn();
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(20)), pids);
}
