//! The TLS front (`[app.NAME.tls]`), end to end: the app it becomes (`app`), the typed command
//! line of its processes (`args`), the descriptors they get (`fds`), the certificate bundle the
//! agent builds and seals (`bundle`, `seal`), the unprivileged `corral front` process that
//! terminates TLS and proxies to the app's workers (`process`: its start and accept loop, `tls`:
//! the handshake and kTLS, `relay`: the bytes both ways, `proxy`: the PROXY header, `redirect`;
//! with `proxy = "http"`, `http`: hyper to the client and to the workers, `forwarded`: the
//! client's address and scheme in headers), `host`: which host a request is for, `upstream`:
//! the connections to the workers, and the counters it keeps (`stats`); `acme`: the answers to
//! an ACME CA's challenges. `app` and `args` are pure, like `config`, which uses
//! them; the `[app.NAME.tls]` table itself is read by `config::load` like every other table, and
//! the supervisor's event handling for fronts (certificate changes) is in `supervisor/front.rs`.

pub mod acme;
pub mod app;
pub mod args;
pub mod bundle;
pub mod forwarded;
mod host;
mod http;
pub mod process;
pub mod proxy;
pub mod redirect;
mod relay;
pub mod seal;
pub mod stats;
mod tls;
mod upstream;

/// The descriptors a front process gets, in one place: the agent passes them
/// (`supervisor::launch`), the front takes them (`process`). `sys::spawn` places the extra
/// descriptors at 4, 5, 6 in the order given, which these numbers follow. Its readiness report
/// takes no descriptor: `READY=1` goes to the abstract socket named in its `NOTIFY_SOCKET`,
/// which the agent binds for that one process (`supervisor::ready::notify_socket`).
pub mod fds {
    use std::os::fd::RawFd;

    /// Its listening socket on the TLS address, as the worker contract gives every worker.
    pub const LISTENER: RawFd = 3;
    /// The sealed memfd of certificates and keys.
    pub const BUNDLE: RawFd = 4;
    /// The counters memfd the agent maps too.
    pub const COUNTERS: RawFd = 5;
    /// The `redirect_http` listener, when there is one.
    pub const REDIRECT: RawFd = 6;

    const _: () = assert!(
        BUNDLE == LISTENER + 1 && COUNTERS == BUNDLE + 1 && REDIRECT == COUNTERS + 1,
        "sys::spawn places extra descriptors at 4, 5, 6 in order"
    );
}
