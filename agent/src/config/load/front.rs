//! The TLS front as an app: `[app.NAME.tls]` becomes an app `NAME.tls` whose workers are
//! `corral front` processes (the agent's own binary), supervised like any worker.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{App, KtlsMode, Listen, Ready, Restart, Role, Steering, Tls, Workers};

/// Who runs the TLS front when `[app.NAME.tls]` has no `user`.
pub const FRONT_DEFAULT_USER: &str = "nobody";
/// The program of a TLS front process: the agent's own binary, whatever its path (after a
/// package upgrade too, the running agent's: the kernel keeps the old file for it).
pub const SELF_EXE: &str = "/proc/self/exe";
/// How long a front process has to finish its connections when it is replaced or stopped.
pub const FRONT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The front app of `app` (named `<app>.tls`): `corral front` processes on the TLS address,
/// proxying to the app's listen address, supervised like workers.
pub fn front_app(app: &App, tls: &Tls) -> App {
    let name = app.name.front();
    let mut command = vec![
        SELF_EXE.to_string(),
        "front".to_string(),
        "--app".to_string(),
        app.name.to_string(),
        "--upstream".to_string(),
        app.listen.address.to_string(),
        "--ktls".to_string(),
        match tls.ktls {
            KtlsMode::Auto => "auto",
            KtlsMode::Off => "off",
            KtlsMode::Require => "require",
        }
        .to_string(),
        "--handshake-timeout-ms".to_string(),
        tls.handshake_timeout.as_millis().to_string(),
        "--max-handshakes".to_string(),
        tls.max_handshakes.to_string(),
    ];
    if tls.proxy_protocol {
        command.push("--proxy-protocol-v2".to_string());
    }
    if tls.redirect_http.is_some() {
        // The plain listener comes as fd 6; redirects go to this port.
        command.push("--redirect-to-port".to_string());
        command.push(tls.address.port().to_string());
    }
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
            ready: Ready::Tcp,
            ready_timeout: Duration::from_secs(10),
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
