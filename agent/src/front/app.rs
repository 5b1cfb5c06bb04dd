//! The TLS front as an app: `[app.NAME.tls]` becomes an app `NAME.tls` whose workers are
//! `corral front` processes (the agent's own binary), supervised like any worker. Pure: the
//! config loader adds these apps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::args::FrontArgs;
use crate::config::{App, Listen, Ready, Restart, Role, Steering, Tls, Workers};

/// Who runs the TLS front when `[app.NAME.tls]` has no `user`.
pub const FRONT_DEFAULT_USER: &str = "nobody";
/// The program of a TLS front process: the agent's own binary, whatever its path (after a
/// package upgrade too, the running agent's: the kernel keeps the old file for it).
pub const SELF_EXE: &str = "/proc/self/exe";
/// How long a front process has to report ready (READY=1) after its start.
pub const FRONT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a front process has to finish its connections when it is replaced or stopped.
pub const FRONT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The front app of `app` (named `<app>.tls`): `corral front` processes on the TLS address,
/// proxying to the app's listen address, supervised like workers.
pub fn front_app(app: &App, tls: &Tls) -> App {
    let name = app.name.front();
    let args = FrontArgs {
        app: app.name.to_string(),
        upstream: app.listen.address,
        ktls: tls.ktls,
        handshake_timeout: tls.handshake_timeout,
        max_handshakes: tls.max_handshakes,
        // The plain listener comes as fds::REDIRECT; redirects go to the TLS port.
        redirect_to_port: tls.redirect_http.map(|_| tls.address.port()),
        proxy_protocol_v2: tls.proxy_protocol,
        proxy: tls.proxy,
        http: tls.http.clone(),
        acme_challenges: tls.acme.as_ref().map(|a| a.challenge_dir()),
    };
    let command = std::iter::once(SELF_EXE.to_string())
        .chain(args.to_argv())
        .collect();
    App {
        name,
        defined_at: tls.address_at.clone(),
        command,
        command_at: tls.address_at.clone(),
        workdir: PathBuf::from("/"),
        identity: tls.identity.clone(),
        env: BTreeMap::new(),
        listen: Listen {
            address: tls.address,
            address_at: tls.address_at.clone(),
            backlog: app.listen.backlog,
            steering: Steering::LeastLoaded,
            steering_auto: None,
        },
        workers: Workers {
            count: tls.processes,
            count_at: tls.processes_at.clone(),
            memory_max: None,
            memory_high: None,
            cpu_max: None,
            pids_max: None,
            stop_timeout: FRONT_STOP_TIMEOUT,
            // The front reports READY=1 itself (front::process): a probe on the slot's socket
            // may be accepted by the front it replaces, which cannot be told apart.
            ready: Ready::Notify,
            ready_timeout: FRONT_READY_TIMEOUT,
            min_ready: std::num::NonZeroU32::MIN,
        },
        restart: Restart::DEFAULT,
        pre_start: Vec::new(),
        tls: None,
        role: Role::TlsFront {
            of: app.name.clone(),
            tls: Box::new(tls.clone()),
        },
    }
}
