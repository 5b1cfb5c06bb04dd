//! `corral check`: the config loaded, each app's plan printed, and what would fail at start
//! found now (a port in use, a program that is not there, limits this machine cannot enforce,
//! the memory budget), each with file:line:col.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use corral::config::{self, Config, Ready, WorkerCount};
use corral::control::{self, Request, Response};
use corral::policy::restart::format_duration;
use corral::supervisor::{self, budget};
use corral::sys::{machine, socket, spawn::display_argv};

/// Whether a keeper listens beside the control socket: a running agent's, or a crashed one's
/// whose workers still hold their sockets (and the keeper the control socket and the metrics
/// listener), which the next agent adopts. An address in use is then taken to be corral's, and
/// the control socket is not asked (without an agent it never answers).
fn kept(cfg: &Config) -> bool {
    let (keeper, _) = supervisor::keeper_paths(&cfg.agent.control_socket);
    corral::sys::keeper::listening(&keeper)
}

/// Can the agent bind its metrics address? An agent answering on the control socket is taken
/// to be the one serving it; otherwise a plain bind must work.
fn probe_metrics(cfg: &Config, address: std::net::SocketAddr) -> Result<(), String> {
    let kept = kept(cfg);
    // A keeper without its agent holds the control socket unanswered: no 2 s wait on it.
    let running = !kept
        && control::call(
            &cfg.agent.control_socket,
            &Request::Status { app: None },
            Duration::from_secs(2),
        )
        .is_ok();
    if running {
        return Ok(());
    }
    match std::net::TcpListener::bind(address) {
        Err(e) if kept && e.kind() == std::io::ErrorKind::AddrInUse => return Ok(()),
        r => r,
    }
    .map(drop)
    .map_err(|e| {
        let at = cfg
            .agent
            .metrics_at
            .as_ref()
            .map_or_else(|| "[agent] metrics".to_string(), |l| l.to_string());
        match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!("{at}: metrics endpoint {address} is already in use by another process")
            }
            std::io::ErrorKind::AddrNotAvailable => {
                format!("{at}: metrics endpoint {address} is not an address of this machine")
            }
            _ => format!("{at}: metrics endpoint {address}: {e}"),
        }
    })
}

/// Can the agent bind this address? A running agent serving it already is fine; otherwise try a
/// plain bind (never SO_REUSEPORT, so the check can't join a live group and steal connections).
fn probe_bind(cfg: &Config, app: &config::App) -> Result<(), String> {
    let kept = kept(cfg);
    let served = !kept
        && control::call(
            &cfg.agent.control_socket,
            &Request::Status {
                app: Some(app.name.to_string()),
            },
            Duration::from_secs(2),
        )
        .ok()
        .and_then(|r| match r {
            Response::Status { apps, .. } => Some(apps),
            _ => None,
        })
        .is_some_and(|apps| {
            apps.iter()
                .any(|a| a.address == app.listen.address.to_string())
        });
    if served {
        return Ok(());
    }
    match std::net::TcpListener::bind(app.listen.address) {
        Err(e) if kept && e.kind() == std::io::ErrorKind::AddrInUse => return Ok(()),
        r => r,
    }
    .map(drop)
        .map_err(|e| {
            let what = match e.kind() {
                std::io::ErrorKind::AddrInUse => format!(
                    "{} is already in use by another process (another server, or an old agent that is still running)",
                    app.listen.address
                ),
                std::io::ErrorKind::AddrNotAvailable => {
                    format!("{} is not an address of this machine", app.listen.address)
                }
                std::io::ErrorKind::PermissionDenied => format!(
                    "binding {} needs privilege (ports below 1024 need root)",
                    app.listen.address
                ),
                _ => format!("cannot bind {}: {e}", app.listen.address),
            };
            format!("{}: app {}: {what}", app.listen.address_at, app.name)
        })
}

pub fn run(path: &Path) -> Result<ExitCode> {
    let cfg = crate::load(path)?;
    let mut problems = Vec::new();
    println!(
        "config: {}",
        cfg.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "agent: state {}  control {}  bpf pins {}",
        cfg.agent.state_dir.display(),
        cfg.agent.control_socket.display(),
        cfg.agent.bpf_pin_dir.display()
    );
    if let Some(address) = cfg.agent.metrics {
        println!("metrics: http://{address}/metrics (Prometheus text format)");
        if let Err(e) = probe_metrics(&cfg, address) {
            problems.push(e);
        }
    }
    if kept(&cfg) {
        println!(
            "keeper: listening beside the control socket (a running agent's, or a crashed \
             one's whose workers the next agent adopts): an address in use counts as held by its workers"
        );
    }
    let cgroups = supervisor::cgroups::Cgroups::inspect(&cfg.agent);
    println!("cgroups: {}", cgroups.describe());
    if cfg.apps.is_empty() {
        println!("no apps defined (add [app.NAME] tables, or files matching the include globs)");
    }
    for app in cfg.apps.values() {
        let count = supervisor::worker_count(app);
        println!();
        println!("app {} ({})", app.name, app.defined_at);
        let auto = if app.workers.count == WorkerCount::Auto {
            format!(" (auto: {})", supervisor::budget::cpu_ceiling())
        } else {
            String::new()
        };
        println!("  workers     {count}{auto}");
        println!("  command     {}", display_argv(&app.command));
        match supervisor::launch::Launch::for_app(app, &app.command) {
            Ok(l) => println!("  program     {}", l.program.display()),
            Err(e) => problems.push(format!("{}: app {}: {e}", app.command_at, app.name)),
        }
        println!(
            "  runs as     {}:{} (uid {}, gid {}), no capabilities, no_new_privs",
            app.identity.user, app.identity.group, app.identity.uid, app.identity.gid
        );
        println!("  workdir     {}", app.workdir.display());
        if let corral::config::Role::TlsFront { tls, .. } = &app.role {
            if let Some(acme) = &tls.acme {
                acme_lines(acme, &mut problems);
            }
        }
        println!(
            "  listen      {} (backlog {}, one socket per worker, SO_REUSEPORT)",
            app.listen.address, app.listen.backlog
        );
        let steering = if machine::is_root() {
            // Load (and drop) the program to learn what this machine gives; nothing is attached.
            supervisor::steering::GroupSteering::load(app, Path::new("/nonexistent")).describe()
        } else {
            format!(
                "{} (whether eBPF works here needs root to find out)",
                supervisor::steering::kind_name(app.listen.steering)
            )
        };
        println!("  steering    {steering}");
        if let Some(why) = &app.listen.steering_auto {
            println!("              auto: {why}");
        }
        if count > u32::from(socket::PROBE_PORTS) {
            problems.push(format!(
                "{}: app {}: {count} workers is more than the {} corral supports per app",
                app.workers.count_at,
                app.name,
                socket::PROBE_PORTS
            ));
        }
        if let Err(e) = probe_bind(&cfg, app) {
            problems.push(e);
        }
        let ready = match &app.workers.ready {
            Ready::Tcp => "tcp (the worker accepts a probe on its own socket)".to_string(),
            Ready::Http(p) => format!("http GET {p} on the worker's own socket answers 2xx/3xx"),
            Ready::Notify if matches!(app.role, corral::config::Role::TlsFront { .. }) => {
                "when each front process reports READY=1 (certificates loaded, accepting)"
                    .to_string()
            }
            Ready::Notify => "notify (READY=1 on the worker's NOTIFY_SOCKET)".to_string(),
            Ready::Delay(d) => format!("after {}", format_duration(*d)),
        };
        println!(
            "  ready       {ready}, within {}; /readyz needs {} ready",
            format_duration(app.workers.ready_timeout),
            app.workers.min_ready.get().min(count)
        );
        if let Some(m) = app.workers.memory_max {
            println!("  memory_max  {m} per worker");
        }
        if let Some(why) = cgroups.refusal(app) {
            if cfg.agent.enforce_limits {
                problems.push(why);
            } else {
                println!("  limits      NOT enforced: {why}");
            }
        } else if let (Some(why), true) = (
            cgroups.container_warning(),
            !supervisor::cgroups::needed(app).is_empty(),
        ) {
            println!("  limits      not per worker (the container's own stand): {why}");
        } else if let Some(root) = cgroups.root_path() {
            println!(
                "  cgroups     {}/app-{}/worker-<slot>-<n>, one leaf per worker",
                root.display(),
                app.name
            );
        }
        let r = &app.restart;
        println!(
            "  restart     {:?}, backoff {} to {}, give up after {} restarts within {}",
            r.policy,
            format_duration(r.backoff_initial),
            format_duration(r.backoff_max),
            r.max_restarts,
            format_duration(r.window)
        );
        println!(
            "  stop        SIGTERM, SIGKILL after {}",
            format_duration(app.workers.stop_timeout)
        );
        for step in &app.pre_start {
            println!(
                "  pre-start   {}: {} (timeout {})",
                step.name,
                display_argv(&step.command),
                format_duration(step.timeout)
            );
            if let Err(e) = supervisor::launch::Launch::for_app(app, &step.command) {
                problems.push(format!(
                    "{}: app {} pre-start {}: {e}",
                    step.at, app.name, step.name
                ));
            }
        }
    }
    println!();
    match budget_under(&cfg, cgroups.root_memory_max()) {
        Ok(b) => print!("{}", b.describe()),
        Err(e) => problems.push(e.to_string()),
    }
    if problems.is_empty() {
        println!("\nconfig OK");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("corral: {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The memory budget of the config as it would start (what the agent checks before starting
/// anything): an error over budget unless `allow_overcommit`, which warns.
pub fn budget(cfg: &Config) -> Result<corral::policy::budget::Budget> {
    let ceiling = supervisor::cgroups::Cgroups::inspect(&cfg.agent).root_memory_max();
    budget_under(cfg, ceiling)
}

fn budget_under(
    cfg: &Config,
    ceiling: Option<corral::policy::container::MemoryCeiling>,
) -> Result<corral::policy::budget::Budget> {
    let b = budget::enforce(
        &budget::plan(cfg.apps.values()),
        ceiling,
        cfg.agent.allow_overcommit,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(msg) = b.over_message() {
        eprintln!("corral: warning: {msg} (allowed by [agent] allow_overcommit = true)");
    }
    Ok(b)
}

/// An ACME front: what it will ask for, from whom, where it keeps it; its `directory_ca` must
/// be a readable PEM of certificates.
fn acme_lines(acme: &corral::config::Acme, problems: &mut Vec<String>) {
    println!(
        "  acme        {} by {} from {}",
        acme.domains.join(", "),
        acme.challenge.as_str(),
        acme.directory
    );
    println!(
        "  acme state  {} (root-only); challenge answers in {}",
        acme.dir.display(),
        acme.challenge_dir().display()
    );
    if let Some(ca) = &acme.directory_ca {
        use rustls_pki_types::pem::PemObject;
        let certs = std::fs::read(ca).map(|pem| {
            rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .filter(|c| c.is_ok())
                .count()
        });
        match certs {
            Ok(n) if n > 0 => println!("  acme CA     {} ({n} certificates)", ca.display()),
            Ok(_) => problems.push(format!(
                "{}: acme.directory_ca {}: no CERTIFICATE in the PEM file",
                acme.at,
                ca.display()
            )),
            Err(e) => problems.push(format!(
                "{}: acme.directory_ca {}: {e}",
                acme.at,
                ca.display()
            )),
        }
    }
}
