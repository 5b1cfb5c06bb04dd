//! The kubelet's probes on the `[agent] metrics` listener: `/livez` while the agent's loop
//! answers, `/readyz` while every app has its `min_ready` workers ready.

use std::time::Duration;

use corral_tests::*;

#[test]
fn readyz_follows_the_ready_workers_and_livez_the_loop() {
    let (port, mport) = (free_port(), free_port());
    let maddr = loopback(mport);
    // Workers start only while `down` does not exist, so the test can keep one down.
    let app = demo_app("web", loopback(port), 2)
        .command([
            "/bin/sh",
            "-c",
            "if [ -e @DIR@/down ]; then exit 1; fi; exec @DEMO@",
        ])
        .workers("min_ready", 2)
        .restart("backoff_initial", "100ms")
        .restart("backoff_max", "200ms")
        .restart("max_restarts", 1000);
    let agent = Agent::start_with_agent_extra("health", Table::new().set("metrics", maddr), app);
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    let get = |path: &str| http_get(maddr, path).expect("health endpoint answers");

    let (code, body) = get("/livez");
    assert_eq!(code, 200, "{body}");
    let (code, body) = get("/readyz");
    assert_eq!(
        (code, body.as_str()),
        (200, "ok web: 2 of 2 workers ready, 2 needed\n")
    );

    // One worker down, and it stays down: not ready (2 needed).
    std::fs::write(agent.dir.path().join("down"), "").expect("down");
    // SAFETY: pids[1] is one of this test's workers.
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    let body = wait_for(Duration::from_secs(20), "/readyz 503", || {
        let (code, body) = get("/readyz");
        (code == 503).then_some(body)
    });
    assert!(
        body.contains("not ready web: 1 of 2 workers ready, 2 needed"),
        "{body}"
    );
    // The agent itself is fine: alive.
    assert_eq!(get("/livez").0, 200);

    // Back up: ready again.
    std::fs::remove_file(agent.dir.path().join("down")).expect("up");
    agent.wait_ready("web", 2, Duration::from_secs(20));
    wait_for(Duration::from_secs(20), "/readyz 200 again", || {
        (get("/readyz").0 == 200).then_some(())
    });
    assert_eq!(get("/nothing").0, 404);
}

/// From SIGTERM on the pod is not ready (the kubelet takes it out of the Service's endpoints
/// while it drains), and still alive (the kubelet must not restart what is stopping).
#[test]
fn stopping_is_not_ready_but_alive() {
    let (port, mport) = (free_port(), free_port());
    let maddr = loopback(mport);
    // A worker that ignores SIGTERM keeps the agent stopping until stop_timeout's SIGKILL.
    let app = demo_app("web", loopback(port), 1)
        .env("DEMO_IGNORE_SIGTERM", 1)
        .workers("stop_timeout", "5s");
    let mut agent =
        Agent::start_with_agent_extra("health-stop", Table::new().set("metrics", maddr), app);
    agent.wait_ready("web", 1, Duration::from_secs(20));
    assert_eq!(http_get(maddr, "/readyz").expect("readyz").0, 200);
    agent.signal(libc::SIGTERM);
    let body = wait_for(Duration::from_secs(4), "/readyz 503 while stopping", || {
        let (code, body) = http_get(maddr, "/readyz").ok()?;
        (code == 503).then_some(body)
    });
    assert!(
        body.starts_with("not ready: the agent is stopping\n"),
        "{body}"
    );
    assert_eq!(http_get(maddr, "/livez").expect("livez").0, 200);
    assert_eq!(agent.stop(Duration::from_secs(30)), Some(0));
}
