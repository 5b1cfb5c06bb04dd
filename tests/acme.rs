//! ACME against a real CA on loopback (root): Debian's pebble (2.6, with ARI) and
//! pebble-challtestsrv, which `cargo xtask test` (or `cargo xtask acme-tools`) unpacks under
//! target/acme/pebble. challtestsrv's DNS answers every name with 127.0.0.1, and pebble
//! validates on the front's TLS port (TLS-ALPN-01) or its redirect_http port (HTTP-01). Each
//! test starts its own pebble on free ports; the guards stop it even when the test fails.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use corral_tests::acme_proxy::AcmeProxy;
use corral_tests::pebble::{pebble_tls_cert, wait_listening, Pebble};
use corral_tests::*;

/// The acme table for the test's pebble.
fn acme(p: &Pebble, domains: &[&str], challenge: &str) -> Table {
    acme_table(domains, p.directory.as_str(), p.dir.join("pebble.crt"))
        .set("email", "ops@example.com")
        .set("challenge", challenge)
}

/// An acme table with just `domains`, `directory` and `directory_ca`.
fn acme_table(domains: &[&str], directory: impl Into<Value>, ca: impl Into<Value>) -> Table {
    Table::new()
        .set(
            "domains",
            Value::Array(domains.iter().map(|d| Value::from(*d)).collect()),
        )
        .set("directory", directory)
        .set("directory_ca", ca)
}

/// The demo app `web` on `app_port` with `processes` workers, behind a TLS front of as many
/// processes on `tls_port`.
fn fronted(app_port: u16, tls_port: u16, processes: usize) -> App {
    demo_app("web", loopback(app_port), processes)
        .tls("address", loopback(tls_port))
        .tls("processes", processes)
}

/// curl over https to `name` (resolved to the front) trusting only `root`; the body or why not.
fn curl(tls: SocketAddr, name: &str, root: &Path) -> Result<String, String> {
    curl_https(tls.port(), name, root, "/").map(|body| String::from_utf8_lossy(&body).into_owned())
}

/// The subject and SAN of the certificate the front sends for SNI `name`.
fn served_cert(tls: SocketAddr, name: &str) -> String {
    let mut s = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &tls.to_string(),
            "-servername",
            name,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    let mut pem = Vec::new();
    std::io::Read::read_to_end(s.stdout.as_mut().expect("stdout"), &mut pem).expect("read");
    let _ = s.wait();
    let mut x = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-issuer",
            "-serial",
            "-ext",
            "subjectAltName",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    std::io::Write::write_all(x.stdin.as_mut().expect("stdin"), &pem).expect("write");
    let out = x.wait_with_output().expect("x509");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The front app's ACME status (JSON).
fn acme_status(agent: &Agent) -> serde_json::Value {
    agent.app_json("web.tls")["tls"]["acme"].clone()
}

/// The ACME status once it counts a failure (`what` names the failure awaited).
fn first_failure(agent: &Agent, timeout: Duration, what: &str) -> serde_json::Value {
    wait_for(timeout, what, || {
        let st = acme_status(agent);
        (st["failures"].as_u64() >= Some(1)).then_some(st)
    })
}

/// Wait until the first ACME certificate is served for `name` by every front process: a new
/// certificate reaches the fronts by replacing them one at a time, so one front may serve it
/// while another still has only the file certificates (a `curl` to another name right after
/// the first success failed that way once). Done when the agent has begun the replacement and
/// lists only ready fronts again (while it replaces, a new front is starting or an old one is
/// draining or stopping beside it).
fn wait_served(agent: &Agent, tls: SocketAddr, name: &str, root: &Path) {
    wait_for(
        Duration::from_secs(120),
        &format!("https://{name} with pebble's certificate"),
        || curl(tls, name, root).ok(),
    );
    wait_for(
        Duration::from_secs(60),
        "every front replaced to serve the new certificate",
        || {
            let begun = agent
                .log()
                .contains("certificates changed: replacing the front processes");
            let fronts = agent.app("web.tls").workers;
            (begun && fronts.iter().all(|w| w.state == "ready")).then_some(())
        },
    );
}

#[test]
fn tls_alpn_01_two_names_beside_a_file_certificate_and_a_restart_does_not_order_again() {
    require_root();
    let dir = TempDir::new("acme-alpn-ca");
    let (app_port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), tls_port, free_port(), 3600 * 24 * 30);
    let app = fronted(app_port, tls_port, 2)
        .tls("cert", "@DIR@/c.crt")
        .tls("key", "@DIR@/c.key")
        .tls("acme", acme(&pebble, &["a.test", "b.test"], "tls-alpn-01"));
    let mut agent = Agent::start_with("acme-alpn", app, |d| {
        tls_file_cert(d.path(), "c", "c.test");
    });
    agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    let root = pebble.issuing_root();
    let tls = loopback(tls_port);
    wait_served(&agent, tls, "a.test", &root);
    assert!(curl(tls, "b.test", &root).is_ok());
    let a = served_cert(tls, "a.test");
    assert!(a.contains("DNS:a.test") && a.contains("DNS:b.test"), "{a}");
    assert!(a.contains("Pebble Intermediate"), "{a}");
    assert_eq!(served_cert(tls, "b.test"), a);
    // The file's certificate keeps its name, and stays the default.
    let c = served_cert(tls, "c.test");
    assert!(c.contains("DNS:c.test") && !c.contains("Pebble"), "{c}");
    assert!(curl(tls, "c.test", &root).is_err());
    let st = acme_status(&agent);
    assert_eq!(st["failures"], 0, "{st}");
    assert!(st["not_after"].as_i64().is_some(), "{st}");
    // The state: root-only, atomically replaced files.
    let state = agent.dir.path().join("acme/web");
    for f in ["account.json", "cert.pem", "key.pem"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(state.join(f))
                .expect("state file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let issued = pebble.issued();
    assert_eq!(
        issued,
        1,
        "{}",
        std::fs::read_to_string(&pebble.log).unwrap_or_default()
    );
    let mtime = std::fs::metadata(state.join("cert.pem"))
        .unwrap()
        .modified()
        .unwrap();

    agent.stop(Duration::from_secs(30));
    agent.spawn();
    agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    assert_eq!(
        served_cert(tls, "a.test"),
        a,
        "the stored certificate is served at once"
    );
    // The task has looked at the stored certificate and scheduled its renewal, not ordered.
    wait_for(Duration::from_secs(60), "the renewal scheduled", || {
        acme_status(&agent)["renew_at"].as_i64()
    });
    assert_eq!(pebble.issued(), 1);
    let st = acme_status(&agent);
    assert_eq!(st["attempts"], 0, "{st}");
    // pebble 2.6 offers ARI: the renewal is at its window, before the certificate's end.
    assert_eq!(st["renewal"], "ARI window", "{st}");
    assert!(st["renew_at"].as_i64() < st["not_after"].as_i64(), "{st}");
    assert_eq!(
        std::fs::metadata(state.join("cert.pem"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );

    // A crash: the next agent adopts the fronts and takes the certificate's care up again,
    // without an order.
    let fronts = agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    agent.kill9();
    agent.spawn();
    assert_eq!(
        agent.wait_ready("web.tls", 2, Duration::from_secs(30)),
        fronts
    );
    wait_for(
        Duration::from_secs(60),
        "the renewal scheduled again",
        || acme_status(&agent)["renew_at"].as_i64(),
    );
    assert_eq!(pebble.issued(), 1);
    assert_eq!(acme_status(&agent)["attempts"], 0);
}

/// A self-signed certificate for `name` as `<stem>.crt`/`<stem>.key` in `dir`.
fn tls_file_cert(dir: &Path, stem: &str, name: &str) {
    let (cert, key) = tls::self_signed(&[name]);
    std::fs::write(dir.join(format!("{stem}.crt")), cert).expect("write");
    std::fs::write(dir.join(format!("{stem}.key")), key).expect("write");
}

#[test]
fn http_01_on_the_redirect_listener() {
    require_root();
    let dir = TempDir::new("acme-http-ca");
    let (app_port, tls_port, http_port) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(dir.path(), tls_port, http_port, 3600 * 24 * 30);
    let app = fronted(app_port, tls_port, 2)
        .tls("redirect_http", loopback(http_port))
        .tls("acme", acme(&pebble, &["a.test", "b.test"], "http-01"));
    let agent = Agent::start("acme-http", app);
    agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    let root = pebble.issuing_root();
    let tls = loopback(tls_port);
    wait_served(&agent, tls, "a.test", &root);
    assert!(curl(tls, "b.test", &root).is_ok());
    let b = served_cert(tls, "b.test");
    assert!(b.contains("DNS:a.test") && b.contains("DNS:b.test"), "{b}");
    // The redirect listener still redirects everything else.
    let (status, _) = http_get(loopback(http_port), "/x").expect("redirect");
    assert_eq!(status, 308);
    assert_eq!(acme_status(&agent)["challenge"], "http-01");
}

/// The serial of the certificate served for `name`.
fn served_serial(tls: SocketAddr, name: &str) -> Option<String> {
    served_cert(tls, name)
        .lines()
        .find_map(|l| l.strip_prefix("serial=").map(str::to_string))
}

#[test]
fn a_short_lived_certificate_is_renewed_and_rolled_under_load_without_a_failed_request() {
    require_root();
    let dir = TempDir::new("acme-renew-ca");
    let (app_port, tls_port) = (free_port(), free_port());
    // 45 s certificates: renewed 30 s into their life (two thirds: pebble's ARI window for
    // them lies past their end), with 15 s to spare on a loaded machine.
    let pebble = Pebble::start(dir.path(), tls_port, free_port(), 45);
    let app = fronted(app_port, tls_port, 2).tls("acme", acme(&pebble, &["a.test"], "tls-alpn-01"));
    let agent = Agent::start("acme-renew", app);
    agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    let root_path = pebble.issuing_root();
    let root = std::fs::read_to_string(&root_path).expect("root");
    let tls = loopback(tls_port);
    wait_served(&agent, tls, "a.test", &root_path);
    let first = served_serial(tls, "a.test").expect("a serial");

    let load = tls::HandshakeLoad::start(tls, "a.test", &root, 3);
    let renewed = wait_for(
        Duration::from_secs(90),
        "a renewed certificate served",
        || served_serial(tls, "a.test").filter(|s| *s != first),
    );
    std::thread::sleep(Duration::from_millis(500));
    load.finish(21);
    assert_ne!(renewed, first);
    let st = acme_status(&agent);
    assert!(st["attempts"].as_u64().unwrap_or(0) >= 2, "{st}");
    assert_eq!(st["failures"], 0, "{st}");
    assert!(pebble.issued() >= 2);
}

/// `corral status` (text) of the agent.
fn status_text(agent: &Agent) -> String {
    let out = Command::new(bin("corral"))
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("corral status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metrics(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

#[test]
fn the_ca_down_keeps_the_old_certificate_serving_and_the_failure_shows_with_backoff() {
    require_root();
    let dir = TempDir::new("acme-down-ca");
    let (app_port, tls_port, metrics_port) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(dir.path(), tls_port, free_port(), 3600 * 24 * 30);
    let (directory, ca) = (pebble.directory.clone(), pebble.dir.join("pebble.crt"));
    let app = |domains: &[&str]| {
        let table = acme_table(domains, directory.as_str(), ca.clone());
        fronted(app_port, tls_port, 2).tls("acme", table)
    };
    let agent = start_with_metrics("acme-down", metrics_port, app(&["a.test"]));
    let root = pebble.issuing_root();
    let tls = loopback(tls_port);
    wait_served(&agent, tls, "a.test", &root);
    let serial = served_serial(tls, "a.test").expect("serial");

    // The CA goes away; a new name needs a new certificate.
    let next = app(&["a.test", "b.test"]).to_string();
    drop(pebble);
    agent.rewrite_config(next);
    reload(&agent);
    let st = first_failure(
        &agent,
        Duration::from_secs(60),
        "the failed order in status",
    );
    let error = st["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("Connection refused"),
        "the error says why: {st}"
    );
    assert!(
        error.contains(&format!("{directory}: ")),
        "the failing CA named: {st}"
    );
    let gap = st["next_attempt"].as_i64().unwrap() - st["last_error_at"].as_i64().unwrap();
    assert!((5..=15).contains(&gap), "first retry 10 s +- jitter: {st}");
    // The old certificate keeps serving its name.
    assert!(curl(tls, "a.test", &root).is_ok());
    assert_eq!(
        served_serial(tls, "a.test").as_deref(),
        Some(serial.as_str())
    );
    let text = status_text(&agent);
    assert!(text.contains("acme: last failure at"), "{text}");
    let m = metrics(loopback(metrics_port));
    assert!(
        m.lines().any(|l| l
            .starts_with("corral_tls_acme_renewal_failures_total{app=\"web.tls\"} ")
            && !l.ends_with(" 0")),
        "{m}"
    );
    assert!(
        m.contains("corral_tls_certificate_expiry_seconds{app=\"web.tls\",name=\"a.test\"}"),
        "{m}"
    );
    // The second retry waits longer (10 s doubled, with jitter).
    let st = wait_for(Duration::from_secs(60), "the second failed order", || {
        let st = acme_status(&agent);
        (st["failures"].as_u64() >= Some(2)).then_some(st)
    });
    let gap = st["next_attempt"].as_i64().unwrap() - st["last_error_at"].as_i64().unwrap();
    assert!(
        (10..=30).contains(&gap),
        "second retry 20 s +- jitter: {st}"
    );
    assert!(curl(tls, "a.test", &root).is_ok());
}

#[test]
fn a_malformed_directory_and_a_certificate_for_another_name_never_reach_the_fronts() {
    require_root();
    let dir = TempDir::new("acme-bad-ca");
    pebble_tls_cert(dir.path());
    // A "CA" whose directory is not JSON: openssl's HTTPS file server.
    std::fs::write(
        dir.path().join("dir"),
        "<html>this is not an ACME directory</html>\n",
    )
    .expect("dir");
    let bad_port = free_port();
    let _bad = ChildGuard::new(
        Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-WWW",
                "-accept",
                &bad_port.to_string(),
            ])
            .arg("-cert")
            .arg(dir.path().join("pebble.crt"))
            .arg("-key")
            .arg(dir.path().join("pebble.key"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    wait_listening(loopback(bad_port), "the bad directory server");
    let (app_port, tls_port) = (free_port(), free_port());
    let table = acme_table(
        &["a.test"],
        format!("https://127.0.0.1:{bad_port}/dir"),
        dir.path().join("pebble.crt"),
    );
    let app = fronted(app_port, tls_port, 2).tls("acme", table);
    // A certificate for another name where the ACME certificate goes (as if a CA had sent
    // it): refused, never served.
    let agent = Agent::start_with("acme-bad", app, |d| {
        let state = d.path().join("acme/web");
        std::fs::create_dir_all(&state).expect("state");
        tls_file_cert(&state, "cert", "evil.test");
        std::fs::rename(state.join("cert.crt"), state.join("cert.pem")).expect("rename");
        std::fs::rename(state.join("cert.key"), state.join("key.pem")).expect("rename");
    });
    agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    let st = first_failure(
        &agent,
        Duration::from_secs(60),
        "the refused directory in status",
    );
    let error = st["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("reading the directory") && error.contains("JSON"),
        "the error says what is wrong: {st}"
    );
    assert!(
        error.contains(&format!("https://127.0.0.1:{bad_port}/dir")),
        "{st}"
    );
    assert!(st["not_after"].is_null(), "{st}");
    let log = agent.log();
    assert!(
        log.contains("names evil.test, which `domains` (a.test) does not list"),
        "{log}"
    );
    // No certificate at all is served: neither the foreign one nor anything else.
    let served = served_cert(loopback(tls_port), "evil.test");
    assert!(!served.contains("evil.test"), "{served}");
    let served = served_cert(loopback(tls_port), "a.test");
    assert!(served.trim().is_empty(), "{served}");
}

/// `corral check` shows what an ACME front asks for and refuses a `directory_ca` that is not a
/// PEM of certificates, at its file:line:col; the agent refuses a bad `acme` table the same way.
#[test]
fn check_shows_acme_and_refuses_a_bad_directory_ca() {
    let dir = TempDir::new("acme-check");
    let app = |ca: &str| {
        let acme = acme_table(&["a.example"], "https://127.0.0.1:14000/dir", ca);
        demo_app("web", loopback(free_port()), 1)
            .tls("address", loopback(free_port()))
            .tls("acme", acme)
    };
    let check = |config: &Path| {
        let out = Command::new(bin("corral"))
            .args(["check", "--config"])
            .arg(config)
            .output()
            .expect("corral check");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let agent_table = AgentTable::private(dir.path());
    let (cert, _) = tls::self_signed(&["ca.example"]);
    std::fs::write(dir.path().join("ca.pem"), cert).expect("ca");
    let config = write_config(dir.path(), &agent_table, app("ca.pem"));
    let (ok, out) = check(&config);
    assert!(ok, "{out}");
    assert!(
        out.contains("acme        a.example by tls-alpn-01 from https://127.0.0.1:14000/dir"),
        "{out}"
    );
    assert!(out.contains("acme CA     "), "{out}");
    std::fs::write(dir.path().join("bad.pem"), "not a certificate\n").expect("bad");
    let config = write_config(dir.path(), &agent_table, app("bad.pem"));
    let (ok, out) = check(&config);
    assert!(!ok, "{out}");
    assert!(
        out.contains("acme.directory_ca") && out.contains("no CERTIFICATE in the PEM file"),
        "{out}"
    );
    let text = std::fs::read_to_string(&config).expect("config");
    let line = text
        .lines()
        .position(|l| l.contains("[app.web.tls.acme]") || l.contains("acme ="))
        .expect("acme line")
        + 1;
    assert!(
        out.contains(&format!("corral.toml:{line}:")),
        "{out}\n{text}"
    );
    // A bad value in the table: refused at its place by check and by the agent.
    let config = write_config(
        dir.path(),
        &agent_table,
        demo_app("web", loopback(free_port()), 1)
            .tls("address", loopback(free_port()))
            .tls(
                "acme",
                Table::new().set("domains", Value::Array(vec![Value::from("*.a.example")])),
            ),
    );
    let (ok, out) = check(&config);
    assert!(
        !ok && out.contains("\"*.a.example\" is not a DNS name: a wildcard"),
        "{out}"
    );
    let refused = refused_agent(&config);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("DNS-01"));
}

/// The CA refuses: its validation reaches nothing (pebble validates on a port where no front
/// listens), so the order fails with the CA's problem document, which status shows.
#[test]
fn a_refused_validation_shows_the_cas_problem_document() {
    require_root();
    let dir = TempDir::new("acme-refused-ca");
    let (app_port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), free_port(), free_port(), 3600);
    let app = fronted(app_port, tls_port, 1).tls("acme", acme(&pebble, &["a.test"], "tls-alpn-01"));
    let agent = Agent::start("acme-refused", app);
    let st = first_failure(
        &agent,
        Duration::from_secs(90),
        "the refused order in status",
    );
    let error = st["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&pebble.directory) && error.contains("urn:ietf:params:acme:error:"),
        "the CA's problem document: {st}"
    );
    assert!(st["not_after"].is_null(), "{st}");
    assert_eq!(pebble.issued(), 0);
}

/// The acme table for a CA behind the tampering proxy.
fn acme_via(proxy: &AcmeProxy, domains: &[&str]) -> Table {
    acme_table(domains, proxy.directory.as_str(), proxy.ca.clone()).set("challenge", "tls-alpn-01")
}

/// An agent with metrics on `metrics_port` running `app` (two fronts), once its fronts are ready.
fn start_with_metrics(tag: &str, metrics_port: u16, app: App) -> Agent {
    let agent = Agent::start_with_agent_extra(
        tag,
        Table::new().set("metrics", loopback(metrics_port).to_string()),
        app,
    );
    agent.wait_ready("web.tls", 2, Duration::from_secs(30));
    agent
}

/// `corral reload`, which must succeed.
fn reload(agent: &Agent) {
    let (code, out, err) = agent.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A CA that issues for another name than ordered (for the right key, so only the name is
/// wrong): the agent refuses it with the names in the error, in status, log and metrics; it
/// is never stored nor served, and the certificate in service keeps serving.
#[test]
fn a_certificate_for_another_name_from_the_ca_is_refused_and_the_old_one_keeps_serving() {
    require_root();
    let dir = TempDir::new("acme-wrong-ca");
    let (app_port, tls_port, metrics_port) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(dir.path(), tls_port, free_port(), 3600 * 24 * 30);
    let proxy = AcmeProxy::start(
        dir.path(),
        &pebble.directory,
        &dir.path().join("pebble.crt"),
    );
    let app =
        |domains: &[&str]| fronted(app_port, tls_port, 2).tls("acme", acme_via(&proxy, domains));
    let agent = start_with_metrics("acme-wrong", metrics_port, app(&["a.test"]));
    let root = pebble.issuing_root();
    let tls = loopback(tls_port);
    // Through the proxy, untouched: pebble's certificate.
    wait_served(&agent, tls, "a.test", &root);
    let serial = served_serial(tls, "a.test").expect("serial");
    let stored = agent.dir.path().join("acme/web/cert.pem");
    let before = std::fs::read_to_string(&stored).expect("stored certificate");

    // Now the CA answers an order for a.test and b.test with a certificate for evil.test.
    proxy.issue_for("evil.test");
    agent.rewrite_config(app(&["a.test", "b.test"]).to_string());
    reload(&agent);
    let st = first_failure(
        &agent,
        Duration::from_secs(90),
        "the refused certificate in status",
    );
    assert!(proxy.replaced() >= 1, "the proxy replaced the chain: {st}");
    let why = "the CA's certificate is refused: the certificate names evil.test, which \
               `domains` (a.test, b.test) does not list";
    assert!(
        st["last_error"].as_str().unwrap_or_default().contains(why),
        "{st}"
    );
    let log = agent.log();
    assert!(log.contains(why), "{log}");
    let text = status_text(&agent);
    assert!(text.contains("evil.test"), "{text}");
    let m = metrics(loopback(metrics_port));
    assert!(
        m.lines().any(|l| l
            .starts_with("corral_tls_acme_renewal_failures_total{app=\"web.tls\"} ")
            && !l.ends_with(" 0")),
        "{m}"
    );
    // Never stored, never served: the old certificate keeps serving a.test.
    assert_eq!(std::fs::read_to_string(&stored).expect("stored"), before);
    assert!(curl(tls, "a.test", &root).is_ok());
    assert_eq!(
        served_serial(tls, "a.test").as_deref(),
        Some(serial.as_str())
    );
    let evil = served_cert(tls, "evil.test");
    assert!(!evil.contains("evil.test"), "{evil}");
}

/// An HTTP-date `secs` from now, as a Retry-After may carry.
fn http_date_in(secs: u64) -> String {
    let out = run_ok(
        Command::new("date")
            .args(["-u", "-d"])
            .arg(format!("+{secs} seconds"))
            .arg("+%a, %d %b %Y %H:%M:%S GMT"),
        "date",
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A CA that rate-limits (429 with Retry-After, on a new order or on a new nonce, as
/// delay-seconds or an HTTP-date): the agent's next attempt, as it reports it, is no sooner
/// than the CA asked, not its own 10 s backoff.
#[test]
fn a_rate_limited_ca_is_not_asked_again_before_its_retry_after() {
    require_root();
    let cases = [
        ("/order-plz", "7200".to_string(), 7200, "rateLimited"),
        (
            "/nonce-plz",
            http_date_in(3 * 3600),
            3 * 3600 - 120,
            "error response from newNonce resource",
        ),
    ];
    for (i, (path, retry_after, at_least, what)) in cases.into_iter().enumerate() {
        let dir = TempDir::new(&format!("acme-limited-ca{i}"));
        let (app_port, tls_port) = (free_port(), free_port());
        let pebble = Pebble::start(dir.path(), tls_port, free_port(), 3600 * 24 * 30);
        let proxy = AcmeProxy::start(
            dir.path(),
            &pebble.directory,
            &dir.path().join("pebble.crt"),
        );
        proxy.rate_limit_next(path, &retry_after);
        let app = fronted(app_port, tls_port, 1).tls("acme", acme_via(&proxy, &["a.test"]));
        let agent = Agent::start(&format!("acme-limited{i}"), app);
        let st = first_failure(
            &agent,
            Duration::from_secs(90),
            "the rate-limited order in status",
        );
        let limited = proxy.limited();
        assert!(
            limited.len() == 1 && limited[0].contains(path),
            "{limited:?}"
        );
        let error = st["last_error"].as_str().unwrap_or_default();
        assert!(
            error.contains(what) && error.contains("the CA's Retry-After: "),
            "{path}: {st}"
        );
        let gap = st["next_attempt"].as_i64().unwrap() - st["last_error_at"].as_i64().unwrap();
        assert!(
            gap >= at_least,
            "{path} (Retry-After {retry_after}): the next attempt in {gap} s: {st}"
        );
        assert_eq!(st["failures"], 1, "{st}");
        assert_eq!(pebble.issued(), 0);
    }
}

/// `corral acme` runs as the fronts do: the front's user, no capabilities (none to regain:
/// an empty bounding set, no_new_privs), fds 0-2 only, undumpable, in a cgroup leaf `acme` of
/// the front app's, which the agent removes when it stops. It is looked at while the proxy
/// holds its order.
#[test]
fn corral_acme_runs_as_sandboxed_as_the_fronts() {
    require_root();
    let dir = TempDir::new("acme-sandbox-ca");
    let (app_port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), tls_port, free_port(), 3600 * 24 * 30);
    let proxy = AcmeProxy::start(
        dir.path(),
        &pebble.directory,
        &dir.path().join("pebble.crt"),
    );
    proxy.hold_next("/order-plz");
    let app = fronted(app_port, tls_port, 1).tls("acme", acme_via(&proxy, &["a.test"]));
    let mut agent = Agent::start("acme-sandbox", app);
    let front = agent.wait_ready("web.tls", 1, Duration::from_secs(30))[0];
    let acme = wait_for(
        Duration::from_secs(60),
        "`corral acme` waiting for its order",
        || {
            if !proxy.held() {
                return None;
            }
            processes_with_arg("acme").into_iter().find(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline == b"/proc/self/exe\0acme\0"
            })
        },
    );
    let status = proc_status(acme);
    let field = |st: &[(String, String)], k: &str| {
        st.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let front_status = proc_status(front);
    assert_eq!(
        field(&status, "PPid"),
        agent.pid().to_string(),
        "{status:?}"
    );
    for k in [
        "Uid",
        "Gid",
        "Groups",
        "NoNewPrivs",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
    ] {
        assert_eq!(
            field(&status, k),
            field(&front_status, k),
            "{k} of `corral acme` as the front's: {status:?}"
        );
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "CapEff"), "0000000000000000");
    assert_eq!(field(&status, "CapBnd"), "0000000000000000");
    assert_ne!(field(&status, "Uid").split_whitespace().next(), Some("0"));
    // Undumpable: its /proc files belong to root, not to its user.
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(format!("/proc/{acme}/status")).expect("status"),
    );
    assert_eq!(owner, 0, "undumpable");
    // Nothing of the agent's open files: what it holds beyond 0-2 it opened itself (its
    // runtime's epoll and eventfd, its connection to the CA), no socket, memfd, pidfd or
    // cgroup directory the agent has open.
    let targets = |pid: i32| -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .flatten()
            .filter_map(|e| {
                let t = std::fs::read_link(e.path()).ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    t.to_string_lossy().into_owned(),
                ))
            })
            .collect()
    };
    let agent_files: Vec<String> = targets(agent.pid()).into_iter().map(|(_, t)| t).collect();
    for (fd, target) in targets(acme) {
        if ["0", "1", "2"].contains(&fd.as_str()) {
            continue;
        }
        let own = target == "anon_inode:[eventpoll]" || target == "anon_inode:[eventfd]";
        assert!(
            own || !agent_files.contains(&target),
            "fd {fd} -> {target} is the agent's"
        );
        assert!(
            !target.starts_with("/memfd:")
                && !target.starts_with("/sys/fs/cgroup")
                && !target.contains("pidfd"),
            "fd {fd} -> {target}"
        );
    }
    // Its own leaf beside the front's, when the fronts get leaves (not where the agent runs
    // without cgroups: a hybrid host like this test's may be; the VM tier has them).
    let front_cg = proc_cgroup(front).expect("the front's cgroup");
    let acme_cg = proc_cgroup(acme).expect("its cgroup");
    let leaf = match front_cg.rsplit_once('/') {
        Some((app_cg, front_leaf)) if front_leaf.starts_with("worker-") => {
            assert_eq!(acme_cg, format!("{app_cg}/acme"));
            let leaf = cgroup_v2_dir(&acme_cg);
            assert_eq!(cgroup_procs(&leaf), [acme]);
            Some(leaf)
        }
        _ => {
            eprintln!(
                "note: the fronts run without cgroup leaves here (in {front_cg}), so the acme \
                 leaf is not shown: `corral acme` is in {acme_cg} like them"
            );
            assert_eq!(acme_cg, front_cg);
            None
        }
    };
    // Let it go: the certificate comes, the run ends, the leaf is empty, and goes with the
    // agent.
    proxy.release();
    let root = pebble.issuing_root();
    wait_served(&agent, loopback(tls_port), "a.test", &root);
    wait_for(Duration::from_secs(30), "the run over", || {
        (!Path::new(&format!("/proc/{acme}")).exists()).then_some(())
    });
    if let Some(leaf) = &leaf {
        assert!(cgroup_procs(leaf).is_empty());
    }
    agent.stop(Duration::from_secs(30));
    if let Some(leaf) = &leaf {
        assert!(!leaf.exists(), "{} removed", leaf.display());
    }
}

/// The directory of the cgroup v2 path `cg` (`/a/b` of /proc/PID/cgroup): under the cgroup2
/// mount, which a hybrid host has at /sys/fs/cgroup/unified.
fn cgroup_v2_dir(cg: &str) -> std::path::PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let mount = if unified.join("cgroup.procs").exists() {
        unified
    } else {
        Path::new("/sys/fs/cgroup")
    };
    mount.join(cg.trim_start_matches('/'))
}
