//! `[app.NAME.listen]`: the address, the backlog and how connections are steered to workers.

use super::*;

#[test]
fn missing_listen() {
    let e = assert_err(
        "[app.api]\ncommand = [\"/bin/serve\"]\nuser = \"api\"\n",
        "1:1",
        "app `api` has no [app.api.listen] table",
    );
    assert!(e.hint.unwrap().contains("address = \"127.0.0.1:8000\""));
}

#[test]
fn missing_listen_address() {
    assert_err(
        &app("", "").replace("address = \"127.0.0.1:8000\"", "backlog = 10"),
        "5:1",
        "missing key `address` in [app.api.listen]",
    );
}

#[test]
fn bad_address() {
    let e = assert_err(
        &app("", "").replace("127.0.0.1:8000", "localhost:8000"),
        "6:11",
        "`address` in [app.api.listen]: expected an IP address and port, found \"localhost:8000\"",
    );
    assert!(e.hint.unwrap().contains("host names are not resolved"));
    let e = assert_err(
        &app("", "").replace("127.0.0.1:8000", "::1"),
        "6:11",
        "expected an IP address and port",
    );
    assert!(e.hint.unwrap().contains("\"[::1]:8000\""));
}

#[test]
fn port_zero() {
    assert_err(
        &app("", "").replace("127.0.0.1:8000", "127.0.0.1:0"),
        "6:11",
        "`address` in [app.api.listen]: port 0 is not allowed",
    );
}

#[test]
fn backlog_wrong_type_and_range() {
    assert_err(
        &app("", "backlog = \"lots\"\n"),
        "7:11",
        "`backlog` in [app.api.listen]: expected an integer, found string \"lots\"",
    );
    assert_err(
        &app("", "backlog = 0\n"),
        "7:11",
        "`backlog` in [app.api.listen]: expected an integer from 1 to 65535, found 0",
    );
}

#[test]
fn listen_addresses_must_not_overlap() {
    let text = format!(
        "{}\n[app.web]\ncommand = [\"/bin/web\"]\nuser = \"nobody\"\n\
         [app.web.listen]\naddress = \"0.0.0.0:8000\"\n",
        app("", "")
    );
    assert_err(
        &text,
        "12:11",
        &format!(
            "`address` in [app.web.listen] 0.0.0.0:8000 overlaps `address` in [app.api.listen] \
             127.0.0.1:8000 at {MAIN}:6:11"
        ),
    );
}

#[test]
fn bad_steering() {
    assert_err(
        &app("", "steering = \"random\"\n"),
        "7:12",
        "`steering` in [app.api.listen]: expected \"auto\", \"least-loaded\", \"round-robin\", \"hash\" or \"shared\", \
         found \"random\"",
    );
}

#[test]
fn steering_auto_shares_one_queue_for_gunicorn_sync_workers_only() {
    let listen = |command: &str, steering: &str| {
        let text = format!(
            "[app.api]\ncommand = {command}\nuser = \"api\"\n[app.api.listen]\n\
             address = \"127.0.0.1:8000\"\n{steering}"
        );
        let c = load_text(&text).unwrap_or_else(|e| panic!("{e}"));
        c.apps.values().next().expect("one app").listen.clone()
    };
    let l = listen(r#"["/srv/.venv/bin/gunicorn", "-w", "1", "app:app"]"#, "");
    assert_eq!(l.steering, Steering::Shared);
    assert!(l
        .steering_auto
        .is_some_and(|w| w.contains("gunicorn's sync workers")));
    let l = listen(
        r#"["/srv/.venv/bin/gunicorn", "-k", "gthread", "app:app"]"#,
        "",
    );
    assert_eq!(l.steering, Steering::LeastLoaded);
    let l = listen(
        r#"["/srv/.venv/bin/uvicorn", "main:app", "--fd", "3"]"#,
        "steering = \"auto\"",
    );
    assert_eq!(l.steering, Steering::LeastLoaded);
    assert!(l.steering_auto.is_some());
    // Written out, it is what it says, and not "auto".
    let l = listen(
        r#"["/srv/.venv/bin/gunicorn", "app:app"]"#,
        "steering = \"least-loaded\"",
    );
    assert_eq!((l.steering, l.steering_auto), (Steering::LeastLoaded, None));
    let l = listen(r#"["/srv/server"]"#, "steering = \"shared\"");
    assert_eq!(l.steering, Steering::Shared);
}
