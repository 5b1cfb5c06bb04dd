//! The HTTP proxy's pooled upstream connections against a worker that closes a keep-alive
//! connection as a request arrives (tests/apps/close_second.py, made deterministic: every
//! second request on a connection): a request that may be sent again (idempotent, no body)
//! goes on a new connection; one with a body gets the 502 that says why.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corral_tests::*;

const WORKER: &str = include_str!("apps/close_second.py");

fn python() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: `cargo xtask test` makes the venv before the tests run",
        venv.display()
    );
    venv.display().to_string()
}

/// One curl request; its status and body.
fn request(port: u16, ca: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "30", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("https://localhost:{port}/"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl's -w line");
    (code.parse().expect("status"), body.to_string())
}

#[test]
fn a_request_that_can_be_sent_again_survives_a_pooled_connection_closed_under_it() {
    require_root();
    let (app_port, tls_port) = (free_port(), free_port());
    let app = App::new("closer")
        .command([python().as_str(), "@DIR@/close_second.py"])
        .user("nobody")
        .set("group", "nogroup")
        .set("workdir", "@DIR@")
        .address(loopback(app_port))
        .count(1)
        .workers("stop_timeout", "2s")
        .tls("address", loopback(tls_port))
        .tls("cert", "@DIR@/a.crt")
        .tls("key", "@DIR@/a.key")
        .tls("processes", 1)
        .tls("upstream", "pool");
    let agent = Agent::start_with("http-upstream", app, |dir| {
        let (cert, key) = tls::self_signed(&["localhost"]);
        tls::write_cert(dir.path(), &cert, &key);
        std::fs::write(dir.path().join("close_second.py"), WORKER).expect("write the worker");
    });
    agent.wait_ready("closer", 1, Duration::from_secs(30));
    agent.wait_ready("closer.tls", 1, Duration::from_secs(20));
    let ca = agent.dir.path().join("a.crt");
    // The first request opens the connection the pool keeps; each next one is sent on it,
    // and the worker closes it unanswered.
    for i in 0..5 {
        let (status, body) = request(tls_port, &ca, &[]);
        assert_eq!(status, 200, "GET {i}: {body}");
        assert_eq!(
            body.trim_end(),
            "first request on its connection",
            "GET {i}"
        );
    }
    let (status, body) = request(tls_port, &ca, &["--data-binary", "x"]);
    assert_eq!(status, 502, "a POST with a body is not sent twice: {body}");
    assert!(
        body.contains("closed the connection before answering"),
        "{body}"
    );
}
