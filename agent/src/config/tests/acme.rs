//! `[app.NAME.tls] acme = { ... }`: its defaults, where its state goes, and every bad value
//! refused at its file:line:col with the value in the message.

use super::*;

/// `[app.api.tls]` (line 8) with only an address (line 9), then `body` from line 10.
fn acme_tls(body: &str) -> String {
    app(
        "",
        &format!("[app.api.tls]\naddress = \"0.0.0.0:443\"\n{body}"),
    )
}

fn front_tls(c: &Config) -> Tls {
    match &c.apps[&AppName::new("api.tls").unwrap()].role {
        Role::TlsFront { tls, .. } => (**tls).clone(),
        Role::Workers => panic!("api.tls is not a front"),
    }
}

#[test]
fn acme_alone_with_its_defaults() {
    let c = load_text(&acme_tls(
        "acme = { domains = [\"Example.COM\", \"www.example.com.\"] }\n",
    ))
    .unwrap();
    let tls = front_tls(&c);
    assert_eq!(tls.cert, None);
    let acme = tls.acme.unwrap();
    assert_eq!(acme.domains, ["example.com", "www.example.com"]);
    assert_eq!(acme.directory, crate::config::LETS_ENCRYPT);
    assert_eq!(acme.challenge, AcmeChallenge::TlsAlpn01);
    assert_eq!(acme.email, None);
    assert_eq!(acme.directory_ca, None);
    assert_eq!(acme.at, loc(MAIN, 9, 8));
    assert_eq!(acme.dir, PathBuf::from("/var/lib/corral/acme/api"));
    assert_eq!(
        acme.cert_pair().cert,
        PathBuf::from("/var/lib/corral/acme/api/cert.pem")
    );
}

#[test]
fn acme_beside_files_and_every_key() {
    let text = format!(
        "[agent]\nacme_dir = \"/srv/acme\"\n{}",
        acme_tls(
            "cert = \"/c\"\nkey = \"/k\"\nredirect_http = \"0.0.0.0:80\"\n\
             acme = { domains = [\"a.example\"], email = \"ops@example.com\", directory = \
             \"https://127.0.0.1:14000/dir\", directory_ca = \"pebble.pem\", challenge = \
             \"http-01\" }\n"
        )
    );
    let tls = front_tls(&load_text(&text).unwrap());
    assert_eq!(tls.cert.unwrap().cert, PathBuf::from("/c"));
    let acme = tls.acme.unwrap();
    assert_eq!(acme.challenge, AcmeChallenge::Http01);
    assert_eq!(acme.email.as_deref(), Some("ops@example.com"));
    assert_eq!(acme.directory, "https://127.0.0.1:14000/dir");
    assert_eq!(
        acme.directory_ca,
        Some(PathBuf::from("/nonexistent-corral-test/pebble.pem"))
    );
    assert_eq!(acme.dir, PathBuf::from("/srv/acme/api"));
}

#[test]
fn acme_bad_values_are_refused_at_their_value() {
    assert_err(
        &acme_tls("acme = { domains = [] }\n"),
        "9:20",
        "`acme.domains` in [app.api.tls]: expected at least one DNS name",
    );
    let e = assert_err(
        &acme_tls("acme = { domains = [\"a.example\", \"*.example.com\"] }\n"),
        "9:34",
        "\"*.example.com\" is not a DNS name: a wildcard",
    );
    assert!(e.hint.unwrap().contains("DNS-01"));
    assert_err(
        &acme_tls("acme = { domains = [\"localhost\"] }\n"),
        "9:21",
        "\"localhost\" is not a DNS name: a single label",
    );
    assert_err(
        &acme_tls("acme = { domains = [\"10.0.0.1\"] }\n"),
        "9:21",
        "an IP address",
    );
    assert_err(
        &acme_tls("acme = { domains = [\"a_b.example\"] }\n"),
        "9:21",
        "labels are letters, digits and inner hyphens",
    );
    assert_err(
        &acme_tls("acme = { domains = [\"a.example\", \"A.example\"] }\n"),
        "9:34",
        "\"A.example\" is listed twice",
    );
    assert_err(
        &acme_tls("acme = { domains = [\"a.example\"], email = \"nobody\" }\n"),
        "9:43",
        "expected an e-mail address, found \"nobody\"",
    );
    let e = assert_err(
        &acme_tls("acme = { domains = [\"a.example\"], directory = \"http://ca/dir\" }\n"),
        "9:47",
        "expected an https:// URL of an ACME directory, found \"http://ca/dir\"",
    );
    assert!(e.hint.unwrap().contains("acme-v02"));
    assert_err(
        &acme_tls("acme = { domains = [\"a.example\"], challenge = \"dns-01\" }\n"),
        "9:47",
        "expected \"tls-alpn-01\" or \"http-01\", found \"dns-01\"",
    );
    let e = assert_err(
        &acme_tls("acme = { domains = [\"a.example\"], challenge = \"http-01\" }\n"),
        "9:47",
        "http-01 is answered on the `redirect_http` listener, and this front has none",
    );
    assert!(e.hint.unwrap().contains("redirect_http"));
    assert_err(
        &acme_tls("acme = { domains = [\"a.example\"], port = 80 }\n"),
        "9:35",
        "unknown key `port` in [app.api.tls.acme]",
    );
    assert_err(
        &acme_tls("acme = { email = \"a@b.c\" }\n"),
        "9:8",
        "`acme` in [app.api.tls]: missing key `domains`",
    );
}

#[test]
fn cert_or_acme_is_needed() {
    let e = assert_err(&acme_tls(""), "7:1", "missing key `cert` in [app.api.tls]");
    assert!(e.hint.unwrap().contains("acme"));
    assert_err(
        &acme_tls("cert = \"/c\"\nacme = { domains = [\"a.example\"] }\n"),
        "7:1",
        "missing key `key`",
    );
}
