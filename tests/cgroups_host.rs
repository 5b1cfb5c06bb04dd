//! Cgroup limits on this host, whose cgroups are hybrid (memory on v1, a v2 tree without the
//! memory controller): corral detects it, says so, refuses capped apps unless told to run them
//! uncapped, and creates no cgroup here. (The limits themselves are tested in the VM tier.)

use std::process::Command;
use std::time::Duration;

use corral_tests::*;

fn capped_and_plain(port: u16, port2: u16) -> String {
    format!(
        "{}{}",
        demo_app("capped", loopback(port), 2)
            .workers("memory_max", "64MiB")
            .workers("pids_max", 64),
        demo_app("plain", loopback(port2), 1)
    )
}

fn host_is_hybrid() -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup/unified"))
}

#[test]
fn check_reports_hybrid_cgroups_and_refuses_caps_unless_told_otherwise() {
    require_root();
    assert!(
        host_is_hybrid(),
        "these host tests describe the hybrid development machines"
    );
    let dir = TempDir::new("cg-check");
    let apps = capped_and_plain(free_port(), free_port());
    let run = |agent: AgentTable| {
        let config = write_config(dir.path(), &agent, &apps);
        let out = Command::new(bin("corral"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(AgentTable::private(dir.path()));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("cgroups: hybrid cgroups"), "{out}");
    assert!(
        err.contains("corral.toml:")
            && err.contains("app capped: its limits need the cgroup v2 memory, pids controller(s)"),
        "{err}"
    );
    assert!(
        err.contains("enforce_limits = false"),
        "the message says how to proceed: {err}"
    );
    assert!(!err.contains("app plain"), "an uncapped app is fine: {err}");

    let (code, out, err) = run(AgentTable::private(dir.path()).set("enforce_limits", false));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("limits      NOT enforced"), "{out}");
}

#[test]
fn the_agent_refuses_a_capped_app_here_but_serves_the_rest() {
    let (port, port2) = (free_port(), free_port());
    let agent = Agent::start("cg-refuse", capped_and_plain(port, port2));
    let capped = wait_for(Duration::from_secs(10), "capped app refused", || {
        let a = agent.app("capped");
        (a.state == "failed").then_some(a)
    });
    let reason = capped.reason.expect("reason");
    assert!(
        reason.contains("its limits need the cgroup v2 memory, pids controller(s)"),
        "{reason}"
    );
    assert!(
        capped.workers.iter().all(|w| w.pid.is_none()),
        "no capped worker runs uncapped"
    );
    agent.wait_ready("plain", 1, Duration::from_secs(20));
    assert!(
        agent.log().contains("cgroups: hybrid cgroups"),
        "{}",
        agent.log()
    );
}

#[test]
fn with_enforce_limits_false_capped_apps_run_uncapped_with_a_warning() {
    require_root();
    let (port, port2) = (free_port(), free_port());
    let dir_apps = capped_and_plain(port, port2);
    let agent = Agent::start_with_agent_extra(
        "cg-uncapped",
        Table::new().set("enforce_limits", false),
        dir_apps,
    );
    let pids = agent.wait_ready("capped", 2, Duration::from_secs(20));
    let log = agent.log();
    assert!(
        log.contains("running it uncapped (enforce_limits = false)"),
        "{log}"
    );
    for pid in pids {
        // In the agent's own cgroup: corral created none on this host.
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let agent_cg =
            std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid())).expect("cgroup");
        assert_eq!(cg, agent_cg, "worker {pid} stays in the agent's cgroups");
    }
    assert!(agent
        .app("capped")
        .workers
        .iter()
        .all(|w| w.cgroup.is_none()));
}
