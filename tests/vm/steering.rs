//! The agent with eBPF steering over two demo workers, and its readiness probes without
//! sock_diag.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use super::fixture::{in_vm, ModprobeOff};
use corral_tests::*;

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn the_agent_serves_two_demo_workers_with_ebpf_steering() {
    in_vm();
    let port = free_port();
    let addr = loopback(port);
    let agent = Agent::start("vm-agent", demo_app("web", loopback(port), 2));
    let pids: BTreeSet<i32> = agent
        .wait_ready("web", 2, Duration::from_secs(60))
        .into_iter()
        .collect();

    let mut answered = BTreeSet::new();
    for _ in 0..400 {
        let (status, body) = http_get(addr, "/").expect("GET /");
        assert_eq!(status, 200, "GET / answered {status}: {body}");
        answered.insert(demo_pid(&body).expect("pid in the demo's answer"));
        if answered == pids {
            break;
        }
    }
    assert_eq!(answered, pids, "not every worker answered GET /");

    let out = Command::new(bin("corral"))
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()
        .expect("run corral status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "corral status failed: {out:?}");
    let steering = text
        .lines()
        .find(|l| l.trim_start().starts_with("steering:"))
        .unwrap_or_else(|| panic!("no steering line in corral status:\n{text}"));
    println!("corral status: {}", steering.trim());
    assert!(
        steering.contains("(eBPF"),
        "the VM kernel should run the eBPF steering program: {steering}\nagent log:\n{}",
        agent.log()
    );
    let stats = agent
        .app("web")
        .steering_stats
        .expect("eBPF steering stats");
    assert!(
        stats.selected > 0,
        "the steering program picked no worker: {stats:?}"
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn without_sock_diag_readiness_falls_back_to_the_accept_queue() {
    in_vm();
    // A kernel without inet_diag/tcp_diag: unload them (they are modules in Debian's kernels)
    // and keep the kernel from loading them again while this test runs.
    let _off = ModprobeOff::new();
    for m in ["tcp_diag", "udp_diag", "inet_diag"] {
        let _ = Command::new("rmmod").arg(m).status();
    }
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    assert!(
        !modules.lines().any(|l| l.starts_with("inet_diag ")),
        "inet_diag still loaded:\n{modules}"
    );
    let port = free_port();
    let late = "if [ $CORRAL_WORKER = 1 ]; then export DEMO_START_DELAY_MS=1500; fi; exec @DEMO@";
    let app = App::new("web")
        .command(["/bin/sh", "-c", late])
        .user("nobody")
        .address(loopback(port))
        .count(2);
    let agent = Agent::start("nodiag", app);
    agent.wait_ready("web", 2, Duration::from_secs(60));
    // The agent's own measure from worker 1's spawn (the test's clock starts only once the
    // agent answers, which under emulation came after most of the delay: 46 ms once).
    let took = agent.ready_in_ms("web", 1);
    assert!(
        took.len() == 1 && took[0] >= 1499.9,
        "worker 1 was not ready before its delay: {took:?}"
    );
    let log = agent.log();
    assert!(
        log.contains("readiness probes cannot use sock_diag"),
        "the agent says which signal it fell back to:\n{log}"
    );
    assert!(
        !log.contains("not ready:"),
        "no worker was wrongly failed:\n{log}"
    );
    let addr = loopback(port);
    let (status, body) = http_get(addr, "/").expect("GET");
    assert_eq!(status, 200, "{body}");
}
