//! `[app.NAME.tls]` with a certificate: its keys, and the HTTP proxy settings refused at their value.

use super::*;

#[test]
fn unknown_key_tls() {
    assert_err(
        &app(
            "",
            "[app.api.tls]\naddress = \"0.0.0.0:443\"\ncert = \"c\"\nkey = \"k\"\nca = \"x\"\n",
        ),
        "11:1",
        "unknown key `ca` in [app.api.tls]",
    );
}

#[test]
fn tls_missing_key() {
    assert_err(
        &app(
            "",
            "[app.api.tls]\naddress = \"0.0.0.0:443\"\ncert = \"/c.pem\"\n",
        ),
        "7:1",
        "missing key `key` in [app.api.tls]",
    );
}

/// `[app.api.tls]` with `extra` after its address and certificate (from line 11).
fn tls_with(extra: &str) -> String {
    app(
        "",
        &format!("[app.api.tls]\naddress = \"0.0.0.0:443\"\ncert = \"/c\"\nkey = \"/k\"\n{extra}"),
    )
}

#[test]
fn tls_proxy_and_http_settings() {
    let c = load_text(&tls_with(
        "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n\
         header_timeout = \"5s\"\nmax_header_size = \"64KiB\"\naccess_log = true\n",
    ))
    .unwrap();
    let tls = api(&c).tls.as_ref().unwrap();
    assert_eq!(tls.proxy, ProxyMode::Http);
    let nets: Vec<String> = tls
        .http
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    assert_eq!(tls.http.header_timeout, Duration::from_secs(5));
    assert_eq!(tls.http.max_header_bytes, 65536);
    assert_eq!(tls.http.max_headers, 100);
    assert!(tls.http.access_log);
    assert_eq!(tls.http.upstream, UpstreamMode::Pool, "the default");
    let c = load_text(&tls_with("upstream = \"connect\"\n")).unwrap();
    let tls = api(&c).tls.as_ref().unwrap();
    assert_eq!(tls.http.upstream, UpstreamMode::Connect);
    let c = load_text(&tls_with("proxy = \"tcp\"\n")).unwrap();
    assert_eq!(api(&c).tls.as_ref().unwrap().proxy, ProxyMode::Tcp);
}

#[test]
fn tls_proxy_and_http_settings_refused_at_their_value() {
    assert_err(
        &tls_with("proxy = \"udp\"\n"),
        "11:9",
        "`proxy` in [app.api.tls]: expected \"http\" or \"tcp\", found \"udp\"",
    );
    assert_err(
        &tls_with("trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n"),
        "11:34",
        "expected an address or a network such as \"10.0.0.0/8\", found \"10.0.0.0/33\"",
    );
    assert_err(
        &tls_with("max_header_size = \"1KiB\"\n"),
        "11:19",
        "expected from 8KiB to 1MiB, found 1024 bytes",
    );
    assert_err(
        &tls_with("header_timeout = 5\n"),
        "11:18",
        "expected a duration",
    );
    let e = assert_err(
        &tls_with("proxy_protocol = \"v2\"\n"),
        "11:18",
        "a PROXY header is for the byte path",
    );
    assert!(e.hint.unwrap().contains("proxy = \"tcp\""));
    assert_err(
        &tls_with("ktls = \"require\"\n"),
        "11:8",
        "kTLS carries the byte path only",
    );
    let e = assert_err(
        &tls_with("proxy = \"tcp\"\naccess_log = true\n"),
        "12:14",
        "`access_log` in [app.api.tls]: is a setting of the HTTP proxy",
    );
    assert!(e.hint.unwrap().contains("remove it"));
    assert_err(
        &tls_with("upstream = \"keepalive\"\n"),
        "11:12",
        "`upstream` in [app.api.tls]: expected \"pool\" or \"connect\", found \"keepalive\"",
    );
    assert_err(
        &tls_with("proxy = \"tcp\"\nupstream = \"pool\"\n"),
        "12:12",
        "`upstream` in [app.api.tls]: is a setting of the HTTP proxy",
    );
}
