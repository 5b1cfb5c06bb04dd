//! Host integration tests for the supervisor core (root): real agent, real workers, real
//! sockets. Each test owns its port, directory and agent, and its Drop cleans them up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use corral_tests::*;

/// corral-demo on 127.0.0.1:`port` (see [`corral_tests::demo_app`]).
fn demo_app(name: &str, port: u16, count: usize) -> App {
    corral_tests::demo_app(name, loopback(port), count)
}

#[test]
fn workers_get_their_own_socket_on_fd3_and_requests_reach_all() {
    let port = free_port();
    let agent = Agent::start("fd3", demo_app("web", port, 4));
    let pids = agent.wait_ready("web", 4, Duration::from_secs(20));

    let mut inodes = BTreeSet::new();
    for (slot, pid) in pids.iter().enumerate() {
        let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).expect("fd 3");
        let fd3 = fd3.to_string_lossy().into_owned();
        assert!(fd3.starts_with("socket:["), "fd 3 of {pid} is {fd3}");
        inodes.insert(fd3);
        let env: BTreeMap<_, _> = proc_environ(*pid).into_iter().collect();
        assert_eq!(
            env.get("LISTEN_PID"),
            Some(&pid.to_string()),
            "LISTEN_PID of {pid}"
        );
        assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("1"));
        assert_eq!(env.get("LISTEN_FDNAMES").map(String::as_str), Some("web"));
        assert_eq!(env.get("CORRAL_APP").map(String::as_str), Some("web"));
        assert_eq!(env.get("CORRAL_WORKER"), Some(&slot.to_string()));
    }
    assert_eq!(
        inodes.len(),
        4,
        "each worker has its own socket: {inodes:?}"
    );
    // Nothing of the agent leaks past fd 3: a worker's other fds are its own pipes and the TCP
    // connections it accepted, never another slot's listener or the agent's unix sockets. A
    // probe connection the agent reset is out of the kernel's TCP table while the worker still
    // holds it for a moment, so unexplained fds are looked at again until they are gone.
    let unexpected = || {
        let tcp = tcp_socket_inodes();
        let mut odd = Vec::new();
        for pid in &pids {
            for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fd dir")
                .flatten()
            {
                let fd: i32 = entry
                    .file_name()
                    .to_string_lossy()
                    .parse()
                    .expect("fd number");
                if fd <= 3 {
                    continue;
                }
                let Ok(target) = std::fs::read_link(entry.path()) else {
                    continue; // closed meanwhile
                };
                let target = target.to_string_lossy().into_owned();
                let ok = target.starts_with("pipe:")
                    || (target.starts_with("socket:[")
                        && !inodes.contains(&target)
                        && tcp.contains(&target["socket:[".len()..target.len() - 1]));
                if !ok {
                    odd.push(format!("worker {pid} fd {fd} -> {target}"));
                }
            }
        }
        odd
    };
    let mut last = Vec::new();
    let clean = (0..200).any(|_| {
        last = unexpected();
        last.is_empty() || {
            std::thread::sleep(Duration::from_millis(10));
            false
        }
    });
    assert!(clean, "workers hold unexpected fds: {last:?}");

    let mut answered = BTreeSet::new();
    for _ in 0..200 {
        let (status, body) = http_get(loopback(port), "/").expect("GET /");
        assert_eq!(status, 200);
        answered.insert(demo_pid(&body).expect("pid in body"));
    }
    let expected: BTreeSet<i32> = pids.iter().copied().collect();
    assert_eq!(answered, expected, "200 connections reach every worker");
}

/// Under a seccomp filter that refuses clone3 (systemd's RestrictNamespaces=, older container
/// profiles), workers still start with a pidfd, unprivileged, and come back after a kill.
#[test]
fn workers_start_and_restart_when_clone3_is_refused() {
    let port = free_port();
    let agent = Agent::start_without_clone3("noclone3", Table::new(), demo_app("web", port, 2));
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    let (status, body) = http_get(loopback(port), "/").expect("GET");
    assert_eq!(status, 200, "{body}");
    for pid in &pids {
        let st: BTreeMap<_, _> = proc_status(*pid).into_iter().collect();
        assert_eq!(st["Seccomp"], "2", "{pid} runs under the test's filter");
        assert_eq!(st["CapEff"], "0000000000000000", "CapEff of {pid}");
        assert!(st["Uid"].split_whitespace().all(|u| u == "65534"), "{st:?}");
    }
    // SAFETY: pids[0] is one of this test's workers.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let after = wait_for(Duration::from_secs(5), "worker 0 replaced", || {
        let now = agent.wait_ready("web", 2, Duration::from_secs(5));
        (now[0] != pids[0]).then_some(now)
    });
    assert_eq!(after[1], pids[1]);
    let log = agent.log();
    assert_eq!(
        log.matches("clone3 is refused with ENOSYS").count(),
        1,
        "said once: {log}"
    );
}

#[test]
fn workers_run_unprivileged_with_no_capabilities() {
    let port = free_port();
    let root_port = free_port();
    let asroot = App::new("asroot")
        .command(["@DEMO@"])
        .user("root")
        .address(loopback(root_port))
        .count(1);
    let agent = Agent::start("caps", format!("{}{asroot}", demo_app("web", port, 2)));
    let mut pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    let root_pids = agent.wait_ready("asroot", 1, Duration::from_secs(20));
    pids.extend(&root_pids);
    for pid in pids {
        let st: BTreeMap<_, _> = proc_status(pid).into_iter().collect();
        for key in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert_eq!(st[key], "0000000000000000", "{key} of {pid}");
        }
        assert_eq!(st["NoNewPrivs"], "1", "NoNewPrivs of {pid}");
        assert_eq!(st["Groups"], "", "supplementary groups of {pid}");
        let uid = if root_pids.contains(&pid) {
            "0"
        } else {
            "65534"
        };
        assert!(
            st["Uid"].split_whitespace().all(|u| u == uid),
            "Uid of {pid}: {}",
            st["Uid"]
        );
        assert!(
            st["Gid"].split_whitespace().all(|g| g == uid),
            "Gid of {pid}: {}",
            st["Gid"]
        );
        // Own session: the worker leads its session.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        assert_eq!(fields[3], pid.to_string(), "session id of {pid}");
        // The agent's own notify/listen variables never reach workers.
        let env: BTreeMap<_, _> = proc_environ(pid).into_iter().collect();
        assert!(!env.contains_key("NOTIFY_SOCKET"));
        assert!(!env.contains_key("WATCHDOG_USEC"));
    }
}

#[test]
fn killed_worker_is_replaced_within_100ms_and_others_untouched() {
    let port = free_port();
    let agent = Agent::start("kill9", demo_app("web", port, 3));
    let pids = agent.wait_ready("web", 3, Duration::from_secs(20));
    let victim = pids[1];
    let t0 = Instant::now();
    // SAFETY: victim is one of this test's workers.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let replacement = wait_for(Duration::from_secs(5), "replacement worker", || {
        let app = agent.app("web");
        let w = app.workers.iter().find(|w| w.slot == 1)?;
        let pid = w.pid?;
        (pid != victim && pid_alive(pid)).then_some(pid)
    });
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_millis(100),
        "replacement {replacement} running after {elapsed:?}"
    );
    let after = agent.wait_ready("web", 3, Duration::from_secs(10));
    assert_eq!(after[0], pids[0], "worker 0 untouched");
    assert_eq!(after[2], pids[2], "worker 2 untouched");
    let app = agent.app("web");
    let w1 = app.workers.iter().find(|w| w.slot == 1).expect("slot 1");
    assert_eq!(w1.restarts, 1);
    assert_eq!(
        w1.last_exit.as_deref(),
        Some("killed by signal 9 (SIGKILL)")
    );
    let (status, body) = http_get(loopback(port), "/").expect("GET");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn crash_loop_backs_off_then_gives_up_while_other_apps_serve() {
    let port = free_port();
    let crash_port = free_port();
    let crashy = App::new("crashy")
        .command(["/bin/sh", "-c", "echo crashing; exit 3"])
        .user("nobody")
        .address(loopback(crash_port))
        .count(1)
        .restart("backoff_initial", "50ms")
        .restart("backoff_max", "1s")
        .restart("max_restarts", 4)
        .restart("window", "30s");
    let agent = Agent::start("crashloop", format!("{}{crashy}", demo_app("web", port, 2)));
    agent.wait_ready("web", 2, Duration::from_secs(20));
    let app = wait_for(Duration::from_secs(15), "crashy to fail", || {
        let a = agent.app("crashy");
        (a.state == "failed").then_some(a)
    });
    let reason = app.reason.clone().expect("reason");
    assert!(reason.contains("4 restarts"), "reason: {reason}");
    assert!(reason.contains("exited with status 3"), "reason: {reason}");
    assert_eq!(app.workers[0].restarts, 4);
    assert_eq!(app.workers[0].state, "failed");

    // The log shows the backoff growing: 0 (first restart), then 50ms, 100ms, 200ms with up to
    // 20% jitter below.
    let log = agent.log();
    let delays: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("app=crashy") && l.contains("restarting in"))
        .filter_map(|l| {
            let d = l
                .split("restarting in ")
                .nth(1)?
                .split_whitespace()
                .next()?;
            let ms = d.strip_suffix("ms")?.parse::<f64>().ok()?;
            Some(ms)
        })
        .collect();
    assert_eq!(
        delays.len(),
        3,
        "three delayed restarts after the immediate one; log:\n{log}"
    );
    for w in delays.windows(2) {
        assert!(w[1] > w[0], "backoff grows: {delays:?}");
    }
    assert!(delays[0] >= 40.0 && delays[0] <= 50.0, "{delays:?}");
    assert!(log.contains("crash loop"), "give-up logged");
    assert!(
        log.contains("app=crashy worker=0 pid="),
        "output captured: {log}"
    );

    // The agent is up and the other app serves.
    let (status, _) = http_get(loopback(port), "/").expect("web still serves");
    assert_eq!(status, 200);
    assert_eq!(agent.app("web").state, "running");
}

#[test]
fn pre_start_runs_once_before_any_worker() {
    let port = free_port();
    let app = App::new("web")
        .command([
            "/bin/sh",
            "-c",
            "echo worker $CORRAL_WORKER >> @DIR@/order; exec @DEMO@",
        ])
        .user("nobody")
        .address(loopback(port))
        .count(8)
        .pre_start(
            Table::new()
                .set("name", "migrate")
                .set(
                    "command",
                    [
                        "/bin/sh",
                        "-c",
                        "sleep 0.3; echo migrated >> @DIR@/order; echo migrations done",
                    ],
                )
                .set("timeout", "10s"),
        );
    // The order file must exist and be writable by nobody before the agent starts.
    let agent = Agent::start_with("prestart", app, |dir| {
        dir.shared_file("order");
    });
    agent.wait_ready("web", 8, Duration::from_secs(30));
    let order = std::fs::read_to_string(agent.dir.path().join("order")).expect("order file");
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"migrated"),
        "pre-start ran first: {lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| **l == "migrated").count(),
        1,
        "exactly once: {lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("worker")).count(),
        8,
        "{lines:?}"
    );
    let log = agent.log();
    assert!(
        log.contains("step=\"migrate\"") && log.contains("migrations done"),
        "step output logged:\n{log}"
    );
}

#[test]
fn failing_pre_start_keeps_workers_down_and_says_why() {
    let port = free_port();
    let ok_port = free_port();
    let broken = App::new("broken")
        .command([
            "/bin/sh",
            "-c",
            "echo started >> @DIR@/started; exec @DEMO@",
        ])
        .user("nobody")
        .address(loopback(port))
        .count(2)
        .pre_start(Table::new().set("name", "migrate").set(
            "command",
            [
                "/bin/sh",
                "-c",
                "echo 'relation users does not exist' >&2; exit 4",
            ],
        ));
    let apps = format!("{}{broken}", demo_app("web", ok_port, 1));
    let agent = Agent::start_with("prestartfail", apps, |dir| {
        dir.shared_file("started");
    });
    let app = wait_for(Duration::from_secs(10), "broken to fail", || {
        let a = agent.app("broken");
        (a.state == "failed").then_some(a)
    });
    let reason = app.reason.expect("reason");
    assert!(
        reason.contains("migrate") && reason.contains("exited with status 4"),
        "{reason}"
    );
    assert!(
        app.workers.iter().all(|w| w.pid.is_none()),
        "no worker: {:?}",
        app.workers
    );
    let started = std::fs::read_to_string(agent.dir.path().join("started")).expect("file");
    assert_eq!(started, "", "no worker process ever ran");
    let log = agent.log();
    assert!(
        log.contains("relation users does not exist"),
        "step stderr in the log:\n{log}"
    );
    assert!(
        log.contains("pre-start migrate exited with status 4"),
        "{log}"
    );
    // `corral status` (the CLI) shows the reason too.
    let out = std::process::Command::new(bin("corral"))
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("corral status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("broken  failed") && text.contains("exited with status 4"),
        "{text}"
    );
    // The other app serves.
    agent.wait_ready("web", 1, Duration::from_secs(10));
    assert_eq!(http_get(loopback(ok_port), "/").expect("GET").0, 200);
}

#[test]
fn sighup_with_a_broken_config_changes_nothing_and_a_new_count_scales() {
    let port = free_port();
    let agent = Agent::start("hup", demo_app("web", port, 2));
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));

    // Not a valid config: an unknown key (in the last table, [app.web.workers]).
    agent.rewrite_config(format!("{}bogus_key = 1\n", demo_app("web", port, 5)));
    agent.signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "reload refusal in the log", || {
        agent.log().contains("reload refused").then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        agent.wait_ready("web", 2, Duration::from_secs(1)),
        pids,
        "workers untouched"
    );
    let log = agent.log();
    assert!(
        log.contains("corral.toml:") && log.contains("bogus_key"),
        "error names the place:\n{log}"
    );

    agent.rewrite_config(demo_app("web", port, 4));
    agent.signal(libc::SIGHUP);
    let after = agent.wait_ready("web", 4, Duration::from_secs(20));
    assert_eq!(
        &after[..2],
        &pids[..],
        "scaling up keeps the running workers"
    );
    let mut answered = BTreeSet::new();
    for _ in 0..200 {
        answered.insert(demo_pid(&http_get(loopback(port), "/").expect("GET").1).expect("pid"));
    }
    assert_eq!(answered.len(), 4, "all 4 workers serve");

    agent.rewrite_config(demo_app("web", port, 1));
    agent.signal(libc::SIGHUP);
    let after = agent.wait_ready("web", 1, Duration::from_secs(20));
    assert_eq!(after[0], pids[0], "scaling down keeps slot 0");
}

#[test]
fn reload_of_a_changed_app_rolls_without_failed_requests() {
    let port = free_port();
    let app = |marker: &str| demo_app("web", port, 3).env("MARK", marker);
    let agent = Agent::start("rolling", app("one"));
    let old = agent.wait_ready("web", 3, Duration::from_secs(20));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http_get(loopback(port), "/?delay_ms=20") {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    agent.rewrite_config(app("two"));
    agent.signal(libc::SIGHUP);
    let new = wait_for(Duration::from_secs(30), "all workers replaced", || {
        let a = agent.app("web");
        let current: Vec<i32> = a
            .workers
            .iter()
            .filter(|w| w.state == "ready")
            .filter_map(|w| w.pid)
            .collect();
        (a.workers.len() == 3 && current.len() == 3 && current.iter().all(|p| !old.contains(p)))
            .then_some(current)
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.join().expect("client");
    assert!(
        failed.is_empty(),
        "{} failed requests during the rolling reload: {failed:?}",
        failed.len()
    );
    assert!(ok > 20, "the client kept going: {ok}");
    for pid in &new {
        let env: BTreeMap<_, _> = proc_environ(*pid).into_iter().collect();
        assert_eq!(env.get("MARK").map(String::as_str), Some("two"));
    }
    for pid in &old {
        assert!(!pid_alive(*pid), "old worker {pid} is gone");
    }
}

#[test]
fn readiness_probe_reaches_exactly_its_own_worker() {
    let port = free_port();
    // Worker 2 takes 2 s before it accepts; the others are ready at once. A probe that could
    // land on any worker would call worker 2 ready early.
    let app = App::new("web")
        .command([
            "/bin/sh",
            "-c",
            "if [ $CORRAL_WORKER = 2 ]; then export DEMO_START_DELAY_MS=2000; fi; exec @DEMO@",
        ])
        .user("nobody")
        .address(loopback(port))
        .count(4);
    let agent = Agent::start("ready", app);
    let t0 = Instant::now();
    wait_for(Duration::from_secs(10), "three ready workers", || {
        let a = agent.app("web");
        (a.workers.iter().filter(|w| w.state == "ready").count() == 3).then_some(())
    });
    let a = agent.app("web");
    let w2 = a.workers.iter().find(|w| w.slot == 2).expect("slot 2");
    assert_eq!(
        w2.state, "starting",
        "worker 2 is not ready before it accepts: {a:#?}"
    );
    agent.wait_ready("web", 4, Duration::from_secs(10));
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "worker 2 became ready only after its delay"
    );
}

#[test]
fn sigterm_stops_every_worker_and_exits_zero() {
    let port = free_port();
    let port2 = free_port();
    // The other app's workers ignore SIGTERM: the agent must SIGKILL them after stop_timeout.
    let apps = format!(
        "{}{}",
        demo_app("web", port, 3).workers("stop_timeout", "1s"),
        demo_app("other", port2, 2)
            .env("DEMO_IGNORE_SIGTERM", 1)
            .workers("stop_timeout", "1s")
    );
    let mut agent = Agent::start("sigterm", apps);
    let mut pids = agent.wait_ready("web", 3, Duration::from_secs(20));
    pids.extend(agent.wait_ready("other", 2, Duration::from_secs(20)));
    let t0 = Instant::now();
    let code = agent.stop(Duration::from_secs(20));
    assert_eq!(code, Some(0), "agent exit code; log:\n{}", agent.log());
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "waited stop_timeout for the stubborn workers"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("did not exit within stop_timeout; sending SIGKILL")
            .count(),
        2,
        "both stubborn workers were killed:\n{log}"
    );
    for pid in &pids {
        assert!(!pid_alive(*pid), "worker {pid} survived the agent");
    }
    // No process left in any session a worker led (no orphaned grandchildren).
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                if let Some(sid) = f.get(3).and_then(|s| s.parse::<i32>().ok()) {
                    assert!(
                        !pids.contains(&sid) || !pid_alive(pid),
                        "process {pid} of worker session {sid} is still alive"
                    );
                }
            }
        }
    }
    assert!(!agent.socket.exists(), "control socket removed");
}

/// Inodes of every TCP socket in this network namespace.
fn tcp_socket_inodes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            if let Some(inode) = line.split_whitespace().nth(9) {
                out.insert(inode.to_string());
            }
        }
    }
    out
}

#[test]
fn many_workers_fit_a_small_open_file_limit_and_workers_get_it_back() {
    let port = free_port();
    // About six agent fds per worker: 60 workers need more than a soft limit of 256.
    let apps = demo_app("web", port, 60).env("DEMO_THREADS", 1);
    let hard = hard_nofile();
    assert!(
        hard > 1024,
        "this test needs a hard open-file limit above 1024"
    );
    let nofile = format!("--nofile=256:{hard}");
    let agent = Agent::start_wrapped("nofile", apps, &["prlimit", &nofile, "--"]);
    let pids = agent.wait_ready("web", 60, Duration::from_secs(60));
    assert_eq!(
        nofile_of(pids[59]),
        ["256".to_string(), hard.to_string()],
        "workers get the agent's original limit"
    );
    assert_eq!(agent.app("web").state, "running");
}
