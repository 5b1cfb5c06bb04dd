//! The limits the agent writes into each worker's leaf, at work: an OOM kill, memory.high
//! reclaim, pids.max against a fork bomb, and the memory budget at start.

use std::process::Command;
use std::time::Duration;

use super::fixture::in_vm;
use super::leaves::{cgroup_agent, entries_starting_with, leaf_dir, workers_json, MIB};
use corral_tests::*;

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn oom_kill_is_attributed_and_restarted() {
    in_vm();
    let root = vm_cgroup_root("oom");
    let port = free_port();
    let addr = loopback(port);
    let apps = demo_app("web", loopback(port), 3).workers("memory_max", "64MiB");
    let (agent, _) = cgroup_agent("cg-oom", &root, Table::new(), &apps);
    let before = agent.wait_ready("web", 3, Duration::from_secs(60));

    // Whichever worker takes this request touches 200 MiB under a 64 MiB cap: the kernel
    // kills it mid-request, so the request cannot succeed.
    let answer = http_get(addr, "/?alloc_mb=200");
    assert!(
        !matches!(answer, Ok((200, _))),
        "a worker allocated 200 MiB under memory_max = 64MiB and answered: {answer:?}"
    );

    let want = "oom-killed at memory.max = 64MiB";
    let (slot, killed) = wait_for(
        Duration::from_secs(60),
        "an OOM-killed worker restarted",
        || {
            let app = agent.app("web");
            let w = app.workers.iter().find(|w| {
                w.last_exit.as_deref() == Some(want)
                    && w.restarts >= 1
                    && w.state == "ready"
                    && w.pid.is_some_and(|p| p != before[w.slot as usize])
            })?;
            Some((w.slot, before[w.slot as usize]))
        },
    );
    assert!(
        !pid_alive(killed),
        "the OOM-killed worker {killed} is alive"
    );
    let app = agent.app("web");
    println!(
        "slot {slot}: pid {killed} {want}, restarted as {:?}",
        app.workers
            .iter()
            .find(|w| w.slot == slot)
            .and_then(|w| w.pid)
    );
    assert_eq!(app.workers.len(), 3, "{app:#?}");
    for w in &app.workers {
        // Counted per slot (corral status --json, and corral_worker_oom_kills_total).
        assert_eq!(
            w.oom_kills,
            u64::from(w.slot == slot),
            "oom_kills of slot {}",
            w.slot
        );
        if w.slot == slot {
            continue;
        }
        assert_eq!(
            (w.restarts, w.pid, w.state.as_str()),
            (0, Some(before[w.slot as usize]), "ready"),
            "slot {} was touched by slot {slot}'s OOM kill: {w:#?}",
            w.slot
        );
    }
    let log = agent.log();
    assert!(log.contains(want), "no `{want}` in the log:\n{log}");
    let (status, body) = http_get(addr, "/").expect("GET / after the OOM kill");
    assert_eq!(status, 200, "{body}");
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn memory_high_recycles_without_failed_requests() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    in_vm();
    let root = vm_cgroup_root("high");
    let port = free_port();
    let addr = loopback(port);
    let apps = demo_app("web", loopback(port), 2)
        .workers("memory_max", "256MiB")
        .workers("memory_high", "64MiB");
    let (agent, _) = cgroup_agent("cg-high", &root, Table::new(), &apps);
    let before = agent.wait_ready("web", 2, Duration::from_secs(60));

    // A client that keeps asking, one connection per request, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (stop, ok, failures) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failures));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match http_get(addr, "/") {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().expect("lock").push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_for(
        Duration::from_secs(10),
        "the client's first answers",
        || (ok.load(Ordering::SeqCst) >= 5).then_some(()),
    );

    // 100 MiB crosses memory.high (64 MiB) and stays under memory.max (256 MiB): the kernel
    // throttles the worker and the agent replaces it. The request itself may never be
    // answered; its outcome is not counted.
    let hog = std::thread::spawn(move || {
        let _ = http_get(addr, "/?alloc_mb=100");
    });
    let hog_pid = wait_for(
        Duration::from_secs(30),
        "a worker holding the allocation",
        || {
            before.iter().copied().find(|&pid| {
                proc_status(pid)
                    .iter()
                    .find(|(k, _)| k == "VmRSS")
                    .and_then(|(_, v)| v.split_whitespace().next()?.parse::<u64>().ok())
                    .is_some_and(|kb| kb * 1024 > 48 * MIB)
            })
        },
    );
    let hog_slot = before.iter().position(|&p| p == hog_pid).expect("slot");

    let crossed = "crossed memory.high = 64MiB; replacing it";
    wait_for(Duration::from_secs(15), "the memory.high log line", || {
        agent.log().contains(crossed).then_some(())
    });
    wait_for(
        Duration::from_secs(30),
        "the worker over memory.high replaced and gone",
        || {
            let app = agent.app("web");
            let mut ws = app.workers;
            ws.sort_by_key(|w| w.slot);
            let done = ws.len() == 2
                && ws.iter().all(|w| w.state == "ready")
                && ws[hog_slot].pid.is_some_and(|p| p != hog_pid)
                && ws[1 - hog_slot].pid == Some(before[1 - hog_slot])
                && !pid_alive(hog_pid);
            done.then_some(())
        },
    );
    // A little more traffic on the new worker, then stop the client.
    let served = ok.load(Ordering::SeqCst);
    wait_for(
        Duration::from_secs(10),
        "answers after the replacement",
        || (ok.load(Ordering::SeqCst) >= served + 5).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    let _ = hog.join();

    let failures = failures.lock().expect("lock");
    println!(
        "memory.high: slot {hog_slot} pid {hog_pid} replaced; the client made {} requests, {} failed",
        ok.load(Ordering::SeqCst) + failures.len() as u64,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed while the worker was replaced: {failures:#?}\nlog:\n{}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst),
        agent.log()
    );
    let app = agent.app("web");
    let other = app
        .workers
        .iter()
        .find(|w| w.slot as usize != hog_slot)
        .expect("the other slot");
    assert_eq!(
        other.pid,
        Some(before[1 - hog_slot]),
        "the worker under memory.high was not the only one replaced: {app:#?}"
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn pids_max_contains_a_fork_bomb_and_stop_leaves_nothing() {
    in_vm();
    let root = vm_cgroup_root("pids");
    let port = free_port();
    let addr = loopback(port);
    // Two serving threads: the worker is 3 tasks, well under pids.max = 16.
    let apps = demo_app("web", loopback(port), 1)
        .env("DEMO_THREADS", 2)
        .workers("pids_max", 16);
    let (mut agent, root_dir) = cgroup_agent("cg-pids", &root, Table::new(), &apps);
    let worker = agent.wait_ready("web", 1, Duration::from_secs(60))[0];
    let status = agent.app_json("web");
    let leaf = leaf_dir(&root_dir, &workers_json(&status)[0]);
    assert_eq!(cgroup_read(&leaf, "pids.max"), "16", "{}", leaf.display());

    // Children that escape a missing pids cap are not the agent's to clean up: kill them here.
    let escaped = KillOnDrop::new();
    let (status, body) =
        http_get(addr, "/?fork_children=64&child_ignores_term=1").expect("GET fork_children");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    let children: Vec<i32> = v["children"]
        .as_array()
        .unwrap_or_else(|| panic!("no children in {body}"))
        .iter()
        .filter_map(|p| p.as_i64().map(|p| p as i32))
        .collect();
    escaped.add(children.iter().copied());
    assert!(
        v["fork_error"].is_string(),
        "64 forks under pids.max = 16 all succeeded: {body}"
    );
    assert!(
        !children.is_empty() && children.len() < 16,
        "{} children under pids.max = 16: {body}",
        children.len()
    );
    println!(
        "pids.max = 16: {} children, then {}",
        children.len(),
        v["fork_error"]
    );
    for &c in &children {
        assert!(pid_alive(c), "child {c} is not running");
        assert_eq!(
            proc_cgroup(c),
            Some(cgroup_name(&leaf)),
            "child {c} is not in its worker's leaf"
        );
    }
    let tasks = agent.app_json("web")["workers"][0]["pids"]
        .as_u64()
        .unwrap_or_else(|| panic!("no \"pids\" in the worker's status"));
    assert!(
        tasks > children.len() as u64 && tasks <= 16,
        "\"pids\" is {tasks} with {} children under pids.max = 16",
        children.len()
    );

    assert_eq!(agent.stop(Duration::from_secs(60)), Some(0), "agent exit");
    assert!(!pid_alive(worker), "worker {worker} outlived the agent");
    let alive: Vec<i32> = children.iter().copied().filter(|&c| pid_alive(c)).collect();
    assert!(
        alive.is_empty(),
        "children ignoring SIGTERM outlived the agent: {alive:?} (of {children:?})"
    );
    assert!(!leaf.exists(), "{} is left after stop", leaf.display());
    let left = entries_starting_with(&root_dir, "app-");
    assert!(left.is_empty(), "app directories left after stop: {left:?}");
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .expect("read /proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("MemTotal in /proc/meminfo")
        * 1024
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
#[allow(non_snake_case)] // named after the sizes it checks: 4 x 1GiB in 3GiB
fn budget_refuses_4_x_1GiB_in_3GiB_and_overcommit_allows_it() {
    in_vm();
    let total = mem_total();
    assert!(
        total < (4 << 30) + 64 * MIB,
        "this VM has MemTotal {total}: 4 x 1GiB would fit (xtask boots it with -m 3G)"
    );
    let root = vm_cgroup_root("budget");
    let port = free_port();
    let apps = demo_app("big", loopback(port), 4).workers("memory_max", "1GiB");

    // Over budget: the agent refuses to start, with the numbers.
    let dir = TempDir::new("cg-budget-refused");
    let config = write_config(
        dir.path(),
        &AgentTable::private(dir.path()).merge(root.agent_settings()),
        &apps,
    );
    let out_path = dir.path().join("agent.out");
    let err_path = dir.path().join("agent.err");
    let mut child = Command::new(bin("corral"))
        .args(["agent", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn corral agent");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            // It started (a failure): its workers and keeper outlive a SIGKILL; the guard
            // empties the cgroups, the keeper is killed here.
            let _ = child.kill();
            let _ = child.wait();
            let spool = dir.path().join("run/keeper.spool");
            for pid in processes_with_arg(&spool.to_string_lossy()) {
                // SAFETY: this test's keeper (its argv names this test's directory).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "corral agent over budget (MemTotal {total}) did not exit 1 ({status:?}); stderr:\n{stderr}"
    );
    println!(
        "MemTotal {total}: {}",
        stderr
            .lines()
            .find(|l| l.contains("memory budget"))
            .unwrap_or("")
    );
    for want in ["memory budget exceeded", "big", "4 x 1GiB"] {
        assert!(stderr.contains(want), "no `{want}` in stderr:\n{stderr}");
    }
    let made = entries_starting_with(root.path(), "app-");
    assert!(made.is_empty(), "a refused agent made cgroups: {made:?}");

    // allow_overcommit = true: it starts (and says so), each worker capped at 1GiB.
    let (agent, root_dir) = cgroup_agent(
        "cg-budget-overcommit",
        &root,
        Table::new().set("allow_overcommit", true),
        &apps,
    );
    agent.wait_ready("big", 4, Duration::from_secs(90));
    let log = agent.log();
    assert!(
        log.contains("memory budget exceeded"),
        "no overcommit warning in the log:\n{log}"
    );
    for w in workers_json(&agent.app_json("big")) {
        let leaf = leaf_dir(&root_dir, &w);
        assert_eq!(
            cgroup_read(&leaf, "memory.max"),
            "1073741824",
            "memory.max of {}",
            leaf.display()
        );
    }
}
