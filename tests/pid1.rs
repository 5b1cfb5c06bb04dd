//! corral as a container's entrypoint: the agent started as PID 1 of a new PID namespace
//! (`unshare --pid --fork`, as a container engine starts an entrypoint) reaps the orphans its
//! workers leave, and SIGTERM to PID 1 stops everything with exit code 0.

use std::time::Duration;

use corral_tests::*;

/// `(pid, state, comm)` of every process whose parent is `parent`, from /proc/*/stat.
fn children(parent: i32) -> Vec<(i32, char, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: i32 = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == parent {
            out.push((pid, state, comm));
        }
    }
    out
}

/// The PID in the innermost namespace of host pid `pid` (the last field of NSpid).
fn ns_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// SIGTERM to PID 1 `init`: the agent exits 0, PID 1 with it, and `left` (host pids of
/// processes in the namespace) are gone.
fn stop_through_pid1(agent: &mut Agent, init: i32, left: &[i32]) {
    // SAFETY: `init` is this test's process (PID 1 of the namespace it made), alive.
    assert_eq!(unsafe { libc::kill(init, libc::SIGTERM) }, 0);
    // unshare blocks SIGTERM (the harness sends it one too) and exits with its child's status.
    assert_eq!(
        agent.stop(Duration::from_secs(30)),
        Some(0),
        "log:\n{}",
        agent.log()
    );
    for pid in left {
        wait_for(
            Duration::from_secs(10),
            "the namespace's processes gone",
            || (!pid_alive(*pid)).then_some(()),
        );
    }
}

#[test]
fn as_pid1_it_reaps_orphans_and_stops_on_sigterm() {
    let port = free_port();
    // Each worker leaves five orphans that exit at once (zombies unless PID 1 reaps them) and
    // one that lives on (it shows that orphans do reach PID 1).
    let app = demo_app("web", loopback(port), 2).command([
        "/bin/sh",
        "-c",
        "for i in 1 2 3 4 5; do (sh -c 'exit 0' &); done; (exec sleep 1000 &); exec @DEMO@",
    ]);
    // --kill-child: if the test fails, killing unshare kills PID 1 and with it the namespace.
    let mut agent = Agent::start_wrapped(
        "pid1",
        app,
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    );
    agent.wait_ready("web", 2, Duration::from_secs(30));
    let init = wait_for(Duration::from_secs(10), "PID 1 of the namespace", || {
        children(agent.pid()).first().map(|c| c.0)
    });
    assert_eq!(
        ns_pid(init),
        Some(1),
        "the agent's process is PID 1 in its namespace"
    );

    // Both long-lived orphans reach PID 1, and no child of PID 1 stays a zombie.
    let orphans = wait_for(
        Duration::from_secs(30),
        "the orphans reparented to PID 1, and no zombie among its children",
        || {
            let kids = children(init);
            let sleepers: Vec<i32> = kids
                .iter()
                .filter(|k| k.2 == "sleep")
                .map(|k| k.0)
                .collect();
            let zombies = kids.iter().filter(|k| k.1 == 'Z').count();
            (sleepers.len() == 2 && zombies == 0).then_some(sleepers)
        },
    );
    // Not only for a moment: the zombies of orphans would stay forever.
    std::thread::sleep(Duration::from_millis(300));
    let kids = children(init);
    assert!(
        kids.iter().all(|k| k.1 != 'Z'),
        "zombies under PID 1: {kids:?}"
    );
    let log = agent.log();
    assert!(log.contains("running as PID 1"), "log:\n{log}");

    // SIGTERM to PID 1, as the kubelet sends it: the agent stops its workers and exits 0, and
    // PID 1 with it, which ends the namespace and every orphan in it.
    stop_through_pid1(&mut agent, init, &orphans);
    let log = agent.log();
    assert!(log.contains("SIGTERM"), "log:\n{log}");
}

/// The agent under PID 1 crashes (SIGKILL, as the OOM killer would): PID 1 starts it again, and
/// the new agent adopts the running workers from the keeper instead of the container ending
/// with every connection.
#[test]
fn as_pid1_a_crashed_agent_is_started_again_and_adopts_its_workers() {
    let port = free_port();
    let app = demo_app("web", loopback(port), 2);
    let mut agent = Agent::start_wrapped(
        "pid1-crash",
        app,
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    );
    let workers = agent.wait_ready("web", 2, Duration::from_secs(30));
    let init = wait_for(Duration::from_secs(10), "PID 1 of the namespace", || {
        children(agent.pid()).first().map(|c| c.0)
    });
    let first = wait_for(Duration::from_secs(10), "the agent under PID 1", || {
        children(init)
            .into_iter()
            .find(|c| c.2 == "corral")
            .map(|c| c.0)
    });
    // SAFETY: `first` is this test's agent process, alive (its parent is the test's PID 1).
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    let second = wait_for(Duration::from_secs(30), "a new agent under PID 1", || {
        children(init)
            .into_iter()
            .find(|c| c.2 == "corral" && c.0 != first)
            .map(|c| c.0)
    });
    // The workers (their pids as the namespace sees them) were adopted, not restarted.
    let now = wait_for(Duration::from_secs(30), "the new agent answering", || {
        agent
            .try_status()
            .is_some()
            .then(|| agent.wait_ready("web", 2, Duration::from_secs(20)))
    });
    assert_eq!(now, workers, "log:\n{}", agent.log());
    let (status, body) = http_get(loopback(port), "/").expect("served after the crash");
    assert_eq!(status, 200, "{body}");
    let log = agent.log();
    assert!(
        log.contains("starting it again; it adopts the workers the keeper held"),
        "log:\n{log}"
    );
    assert!(pid_alive(second));
    // Orphaned by the crash, the workers are PID 1's children now (as the host sees them).
    let demos: Vec<i32> = children(init)
        .into_iter()
        .filter(|c| c.2 == "corral-demo")
        .map(|c| c.0)
        .collect();
    assert_eq!(demos.len(), 2, "{:?}", children(init));
    // A planned stop still ends everything, with status 0.
    stop_through_pid1(&mut agent, init, &demos);
}
