//! The TLS front's counters: what each `corral front` process counts in its shared memfd
//! (`sys::front::SharedCounters`), in this order, what `corral status` shows, and the app's
//! totals the agent keeps across its processes.

/// Index of each counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Stat {
    HandshakesKtls,
    HandshakesUserspace,
    /// Userspace because `ktls = "off"`.
    FallbackOff,
    /// Userspace because the kernel has no kTLS.
    FallbackKernel,
    /// Userspace because the kernel does not take the negotiated version/cipher both ways.
    FallbackSuite,
    /// Userspace because `TCP_ULP "tls"` was refused on the connection.
    FallbackUlp,
    /// Handshake failures: the client closed first.
    FailEof,
    FailTimeout,
    /// Not TLS, a bad record, or a TLS alert (rustls refused).
    FailProtocol,
    FailIo,
    /// kTLS set-up failed after the secrets left rustls (the connection was closed).
    KtlsSetupFailures,
    UpstreamFailures,
    BytesSpliced,
    BytesCopied,
    CloseNotifyReceived,
    AlertsReceived,
    /// A post-handshake message (KeyUpdate) on a kTLS connection: closed.
    PostHandshakeCloses,
    EofWithoutCloseNotify,
    /// Connections open now (handshaking or proxied).
    Open,
    /// Plain HTTP requests answered with a redirect to https.
    Redirects,
    /// Requests the HTTP proxy (`proxy = "http"`) took.
    HttpRequests,
    /// Requests answered 502: no worker took the connection, or it failed before answering.
    HttpBadGateway,
    /// Requests answered 504: the worker did not start its answer within upstream_timeout.
    HttpGatewayTimeout,
    /// HTTP/1.1 upgrades (WebSockets) passed through.
    HttpUpgrades,
}

pub const COUNT: usize = Stat::HttpUpgrades as usize + 1;

pub const NAMES: [&str; COUNT] = [
    "handshakes_ktls",
    "handshakes_userspace",
    "fallback_ktls_off",
    "fallback_kernel_without_ktls",
    "fallback_cipher_not_in_kernel",
    "fallback_ulp_refused",
    "handshake_failed_eof",
    "handshake_failed_timeout",
    "handshake_failed_protocol",
    "handshake_failed_io",
    "ktls_setup_failed",
    "upstream_failed",
    "bytes_spliced",
    "bytes_copied",
    "close_notify_received",
    "alerts_received",
    "post_handshake_closes",
    "eof_without_close_notify",
    "open_connections",
    "redirects",
    "http_requests",
    "http_bad_gateway",
    "http_gateway_timeout",
    "http_upgrades",
];

/// An app's counts: what its exited front processes counted, kept by the agent.
pub type Totals = [u64; COUNT];

/// An exited front process's counts join `totals` (not what it had open).
pub fn add_final(totals: &mut Totals, counters: &crate::sys::front::SharedCounters) {
    for (i, t) in totals.iter_mut().enumerate() {
        if i != Stat::Open as usize {
            *t += counters.get(i);
        }
    }
}

/// `totals` plus what the live processes count now.
pub fn with_live<'a>(
    totals: &Totals,
    live: impl Iterator<Item = &'a std::sync::Arc<crate::sys::front::SharedCounters>>,
) -> Totals {
    let mut sum = *totals;
    for c in live {
        for (i, t) in sum.iter_mut().enumerate() {
            *t += c.get(i);
        }
    }
    sum
}
