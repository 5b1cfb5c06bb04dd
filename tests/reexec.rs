//! `corral reexec`: the agent restarts itself in place (the new binary after an upgrade) and
//! keeps its workers, through the real binaries (root).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use corral_tests::*;

#[test]
fn reexec_under_load_loses_no_request_and_keeps_workers_output_and_supervision() {
    let port = free_port();
    let app = demo_app("web", loopback(port), 3)
        .env("DEMO_LOG_REQUESTS", 1)
        .pre_start(
            Table::new()
                .set("name", "migrate")
                .set("command", ["/bin/sh", "-c", "echo migrated >> @DIR@/order"]),
        );
    let agent = Agent::start_with("reexec-load", app, |dir| {
        dir.shared_file("order");
    });
    let pids = agent.wait_ready("web", 3, Duration::from_secs(20));
    let load = OpenLoad::start(loopback(port), 200);
    std::thread::sleep(Duration::from_millis(300));
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("3 workers of 1 apps keep running"), "{said}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.finish();
    let ok = ok.len();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "the load ran: {ok}");

    assert_eq!(agent.agent_info().generation, 1);
    assert_eq!(agent.wait_ready("web", 3, Duration::from_secs(5)), pids);
    let order = std::fs::read_to_string(agent.dir.path().join("order")).expect("order");
    assert_eq!(
        order.lines().count(),
        1,
        "the pre-start step ran once: {order:?}"
    );
    // The workers' output still reaches the agent's log: a request after the re-exec.
    let (status, _) = http_get(loopback(port), "/after-reexec").expect("GET");
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(5), "the request logged", || {
        let log = agent.log();
        let after = log.split("adopted 3 running workers").nth(1)?;
        after
            .contains("\"GET /after-reexec HTTP/1.1\" 200")
            .then_some(())
    });
    // Supervision goes on: a killed adopted worker is replaced.
    // SAFETY: pids[1] is one of this test's workers.
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    let now = wait_for(Duration::from_secs(10), "worker 1 replaced", || {
        let now = agent.wait_ready("web", 3, Duration::from_secs(10));
        (now[1] != pids[1]).then_some(now)
    });
    assert_eq!((now[0], now[2]), (pids[0], pids[2]));
    let w1 = agent.worker("web", 1);
    assert_eq!(w1.restarts, 1);
    assert_eq!(
        w1.last_exit.as_deref(),
        Some("killed by signal 9 (SIGKILL)")
    );
    // And a second re-exec hands over the replacement too.
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert_eq!(agent.wait_ready("web", 3, Duration::from_secs(5)), now);
    let w1 = agent.worker("web", 1);
    assert_eq!(w1.restarts, 1, "restart counts cross the re-exec");
    assert_eq!(agent.agent_info().generation, 2);
}

#[test]
fn reexec_is_refused_while_unsteady_or_with_a_changed_config_and_changes_nothing() {
    let port = free_port();
    let late = demo_app("web", loopback(port), 2).env("DEMO_START_DELAY_MS", 2500);
    let agent = Agent::start("reexec-refused", &late);
    wait_for(Duration::from_secs(10), "workers starting", || {
        let a = agent.app("web");
        (a.workers.len() == 2 && a.workers.iter().all(|w| w.pid.is_some())).then_some(())
    });
    let (code, said) = agent.reexec();
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("re-exec refused, nothing changed: worker web/"),
        "{said}"
    );
    assert!(said.contains("is starting"), "{said}");
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    assert_eq!(agent.agent_info().generation, 0);

    // The config on disk is not what runs: refused (the new image would not find its apps).
    agent.rewrite_config(late.clone().count(3));
    let (code, said) = agent.reexec();
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("differs from the running one"), "{said}");
    assert_eq!(agent.agent_info().generation, 0);
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(5)), pids);
    // Back as it runs: the re-exec goes through.
    agent.rewrite_config(&late);
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(5)), pids);
}

/// A copy of the corral binary in `dir`, as a package would install it.
fn installed_copy(dir: &Path) -> std::path::PathBuf {
    let bin_dir = dir.join("usr-bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let path = bin_dir.join("corral");
    std::fs::copy(bin("corral"), &path).expect("copy corral");
    path
}

/// An upgrade replaces the binary (a new file renamed over the old, as dpkg does); `corral
/// reexec` runs the new file, with the workers kept. A binary that cannot take over is refused
/// before anything changes.
#[test]
fn reexec_runs_the_upgraded_binary_and_refuses_one_that_cannot_take_over() {
    let port = free_port();
    let dir = TempDir::new("reexec-upgrade-bin");
    let binary = installed_copy(dir.path());
    let agent = Agent::start_binary(
        "reexec-upgrade",
        demo_app("web", loopback(port), 2),
        &binary,
    );
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    let exe = |pid: i32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .expect("exe")
            .to_string_lossy()
            .into_owned()
    };

    // A "new version" that cannot load the config: refused, the agent untouched.
    let broken = binary.with_extension("new");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'unsupported config' >&2\nexit 3\n",
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&broken, &binary).expect("rename over");
    let (code, said) = agent.reexec();
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("cannot take over") && said.contains("unsupported config"),
        "{said}"
    );
    assert_eq!(agent.agent_info().generation, 0);
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(5)), pids);
    let (status, _) = http_get(loopback(port), "/").expect("GET");
    assert_eq!(status, 200);

    // The real new version: the running image's file is gone, the re-exec runs the new one.
    let fresh = binary.with_extension("new");
    std::fs::copy(bin("corral"), &fresh).expect("copy");
    std::fs::rename(&fresh, &binary).expect("rename over");
    assert!(
        exe(agent.pid()).ends_with(" (deleted)"),
        "{}",
        exe(agent.pid())
    );
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert_eq!(exe(agent.pid()), binary.display().to_string());
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(5)), pids);
    let (status, _) = http_get(loopback(port), "/").expect("GET");
    assert_eq!(status, 200);
}

/// A TLS front is an app like the others: its processes, counters and redirect listener are
/// handed over, and https keeps working.
#[test]
fn reexec_hands_over_a_tls_front_with_its_counters() {
    let (app_port, tls_port, http_port) = (free_port(), free_port(), free_port());
    let (cert, key) = tls::self_signed(&["a.test"]);
    let app =
        tls::fronted_demo_app("web", app_port, tls_port).tls("redirect_http", loopback(http_port));
    let agent = Agent::start_with("reexec-tls", app, |dir| {
        tls::write_cert(dir.path(), &cert, &key)
    });
    agent.wait_ready("web", 2, Duration::from_secs(20));
    let fronts = agent.wait_ready("web.tls", 2, Duration::from_secs(20));
    let tls_addr = loopback(tls_port);
    for _ in 0..5 {
        let r =
            tls::get(tls_addr, "a.test", &cert, tls::Tls::V13, "/", false).expect("https before");
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("\"app\":\"web\""), "{body}");
    }
    let handshakes = |agent: &Agent| -> u64 {
        let st = agent.app_json("web.tls");
        st["tls"]["counters"]["handshakes_userspace"]
            .as_u64()
            .unwrap_or(0)
            + st["tls"]["counters"]["handshakes_ktls"]
                .as_u64()
                .unwrap_or(0)
    };
    let before = handshakes(&agent);
    assert!(before >= 5, "{before}");
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert_eq!(
        agent.wait_ready("web.tls", 2, Duration::from_secs(5)),
        fronts
    );
    assert!(
        handshakes(&agent) >= before,
        "the counters were handed over"
    );
    for _ in 0..5 {
        let r =
            tls::get(tls_addr, "a.test", &cert, tls::Tls::V13, "/", false).expect("https after");
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("\"app\":\"web\""), "{body}");
    }
    assert!(
        handshakes(&agent) >= before + 5,
        "the new image reads the fronts' counters"
    );
    // The redirect listener is the fronts' own, still served.
    let mut s = TcpStream::connect(loopback(http_port)).expect("connect redirect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
}

/// The agent raises its own open-file limit and gives workers the original back; a re-exec
/// starts with the raised one, and workers started after it must still get the original.
#[test]
fn workers_started_after_a_reexec_get_the_original_open_file_limit() {
    let port = free_port();
    let hard = hard_nofile();
    assert!(
        hard > 256,
        "this test needs a hard open-file limit above 256"
    );
    let nofile = format!("--nofile=256:{hard}");
    let agent = Agent::start_wrapped(
        "reexec-nofile",
        demo_app("web", loopback(port), 2),
        &["prlimit", &nofile, "--"],
    );
    let pids = agent.wait_ready("web", 2, Duration::from_secs(20));
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    // SAFETY: pids[0] is one of this test's workers.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let now = wait_for(Duration::from_secs(10), "worker 0 replaced", || {
        let now = agent.wait_ready("web", 2, Duration::from_secs(10));
        (now[0] != pids[0]).then_some(now)
    });
    assert_eq!(nofile_of(now[0]), ["256".to_string(), hard.to_string()]);
}

/// Connections open across a re-exec stay counted: the new image takes over the connection
/// tracker, so least-loaded goes on seeing them until they close.
#[test]
fn open_connections_stay_counted_across_a_reexec() {
    let port = free_port();
    let app = demo_app("web", loopback(port), 2).env("DEMO_KEEPALIVE_MS", 120_000);
    let agent = Agent::start("reexec-inflight", app);
    agent.wait_ready("web", 2, Duration::from_secs(30));
    let conns = answered_connections(loopback(port), 3);
    wait_for(Duration::from_secs(10), "3 connections in flight", || {
        (agent.in_flight("web") == Some(3)).then_some(())
    });
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    wait_for(
        Duration::from_secs(10),
        "the 3 still counted after the re-exec",
        || (agent.agent_info().generation == 1 && agent.in_flight("web") == Some(3)).then_some(()),
    );
    drop(conns);
    wait_for(Duration::from_secs(20), "nothing in flight", || {
        (agent.in_flight("web") == Some(0)).then_some(())
    });
}
