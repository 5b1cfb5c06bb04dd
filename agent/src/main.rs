//! The `corral` command line. anyhow lives here only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use corral::config::{self, Config, Ready, WorkerCount};
use corral::control::{self, AppStatus, Request, Response};
use corral::policy::budget;
use corral::policy::restart::format_duration;
use corral::supervisor;
use corral::sys::{machine, socket, spawn::display_argv, users::SystemLookup};

const DEFAULT_CONFIG: &str = "/etc/corral/corral.toml";

/// corral: run web-app workers the way production needs them.
///
/// One privileged agent runs each app's pre-start steps once, then N workers as an
/// unprivileged user, each handed its own listening socket (fd 3, systemd socket-activation
/// style) in an SO_REUSEPORT group the agent owns. Crashed workers are back within milliseconds
/// (pidfd), with backoff and a crash-loop give-up that says why.
#[derive(Parser)]
#[command(name = "corral", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (systemd runs this).
    ///
    /// SIGTERM/SIGINT stop every worker (SIGTERM, then SIGKILL after stop_timeout) and exit 0.
    /// SIGHUP re-reads the config: an invalid one is refused and nothing changes; changed apps
    /// are replaced one worker at a time, each new worker ready before its old one stops.
    Agent {
        /// The main config file; apps may also come from its `include` globs.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the config and print the plan: apps, workers, commands, users, sockets and the
    /// memory budget against this machine. Exits 1 with a precise error (file:line:col).
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Apps and workers: pid, state, uptime, restarts, last exit, memory, CPU.
    Status {
        /// Only this app.
        app: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// The status, refreshed every second until Ctrl-C.
    Top {
        #[command(flatten)]
        target: Target,
    },
    /// Re-read the config and apply it (all apps, or one): rolling, zero-downtime replacement.
    Reload {
        app: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Rolling restart of an app's workers, or of one worker: `corral restart api/2`. Also
    /// retries an app that failed (pre-start steps run again) or whose workers gave up.
    Restart {
        /// APP or APP/WORKER.
        target_app: String,
        #[command(flatten)]
        target: Target,
    },
    /// Change an app's worker count until the next reload re-reads workers.count.
    Scale {
        app: String,
        count: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Restart the agent itself in place, keeping every worker serving: it re-executes its
    /// binary (the new one after a package upgrade) under the same pid and hands over the
    /// workers, their sockets, output and cgroups; no pre-start step runs again, no worker
    /// restarts, no connection is lost. Refused, saying why, while pre-start steps or a rolling
    /// replacement run, while a worker starts or stops, or when the config on disk differs
    /// from the running one (apply it with `corral reload` first). Waits until the new image
    /// answers.
    Reexec {
        #[command(flatten)]
        target: Target,
    },
    /// Run by the agent before `corral reexec` execs this binary: load the config and print
    /// the handoff format this binary takes.
    #[command(hide = true)]
    ReexecCheck {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Shell completions for bash, zsh or fish, on stdout (the packages install them).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// The man page (roff), on stdout (the packages install it as corral(1)).
    #[command(hide = true)]
    Manpage,
    /// A TLS front process, started by the agent for `[app.NAME.tls]` (never by hand): the
    /// listening socket on fd 3, the certificate bundle on fd 4.
    #[command(hide = true)]
    Front {
        #[arg(long)]
        app: String,
        /// The app's workers' address.
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long, value_parser = ["auto", "off", "require"])]
        ktls: String,
        #[arg(long)]
        handshake_timeout_ms: u64,
        #[arg(long)]
        max_handshakes: usize,
        /// Answer plain HTTP on fd 6 with a 308 to https on this port.
        #[arg(long)]
        redirect_to_port: Option<u16>,
        /// Start each upstream connection with a PROXY protocol v2 header.
        #[arg(long)]
        proxy_protocol_v2: bool,
    },
}

/// Which agent to talk to.
#[derive(clap::Args)]
struct Target {
    /// Config whose `[agent] control_socket` to use.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The control socket, overriding the config.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        match config::load(&self.config, &SystemLookup) {
            Ok(c) => c.agent.control_socket,
            Err(_) => PathBuf::from("/run/corral/control.sock"),
        }
    }

    fn call(&self, request: &Request) -> Result<Response> {
        let path = self.socket();
        Ok(control::call(&path, request, Duration::from_secs(600))?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn load(path: &Path) -> Result<Config> {
    config::load(path, &SystemLookup).map_err(|e| anyhow::anyhow!("{e}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Agent { config } => {
            init_logging();
            let cfg = load(&config)?;
            if !machine::is_root() {
                bail!("the agent must run as root: it binds sockets for and switches to the apps' users");
            }
            check_budget(
                &cfg,
                supervisor::cgroups::Cgroups::inspect(&cfg.agent).root_memory_max(),
            )?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(supervisor::run(
                supervisor::Options {
                    config_path: config,
                },
                cfg,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => check(&config),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "corral", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Front {
            app,
            upstream,
            ktls,
            handshake_timeout_ms,
            max_handshakes,
            redirect_to_port,
            proxy_protocol_v2,
        } => {
            corral::tls::front::run(corral::tls::front::FrontArgs {
                app,
                upstream,
                ktls: match ktls.as_str() {
                    "off" => config::KtlsMode::Off,
                    "require" => config::KtlsMode::Require,
                    _ => config::KtlsMode::Auto,
                },
                handshake_timeout: Duration::from_millis(handshake_timeout_ms),
                max_handshakes: max_handshakes.max(1),
                redirect_to_port,
                proxy_protocol_v2,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { app, json, target } => {
            let response = target.call(&Request::Status { app })?;
            let apps = status_apps(response)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&apps)?);
            } else {
                print!("{}", render_status(&apps));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Top { target } => loop {
            let apps = status_apps(target.call(&Request::Status { app: None })?)?;
            print!("\x1b[H\x1b[2J{}", render_status(&apps));
            println!("\n(refreshing every second; Ctrl-C to quit)");
            std::thread::sleep(Duration::from_secs(1));
        },
        Command::Reload { app, target } => simple(target.call(&Request::Reload { app })?),
        Command::Restart { target_app, target } => {
            let (app, worker) = match target_app.split_once('/') {
                None => (target_app.clone(), None),
                Some((a, w)) => {
                    let n = w.parse::<u32>().with_context(|| {
                        format!(
                            "`{target_app}`: the worker after `/` must be a number (0-based slot)"
                        )
                    })?;
                    (a.to_string(), Some(n))
                }
            };
            simple(target.call(&Request::Restart { app, worker })?)
        }
        Command::Scale { app, count, target } => {
            simple(target.call(&Request::Scale { app, count })?)
        }
        Command::Reexec { target } => reexec(&target),
        Command::ReexecCheck { config } => {
            let cfg = load(&config)?;
            check_budget(
                &cfg,
                supervisor::cgroups::Cgroups::inspect(&cfg.agent).root_memory_max(),
            )?;
            println!("{}", supervisor::handoff::check_line());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The agent answering on `target`.
fn agent_info(target: &Target) -> Result<control::AgentInfo> {
    match target.call(&Request::Status { app: None })? {
        Response::Status {
            agent: Some(info), ..
        } => Ok(info),
        Response::Status { agent: None, .. } => {
            bail!("this agent predates `corral reexec`: restart it instead (systemctl restart corral)")
        }
        Response::Error { message } => bail!("{message}"),
        Response::Ok { message } => bail!("unexpected answer: {message}"),
    }
}

/// `corral reexec`: ask, then wait for the new image (or the reason the old one stayed).
fn reexec(target: &Target) -> Result<ExitCode> {
    let before = agent_info(target)?;
    match target.call(&Request::Reexec)? {
        Response::Ok { message } => println!("{message}"),
        Response::Error { message } => bail!("{message}"),
        Response::Status { .. } => bail!("the agent answered with a status where none was asked"),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // The control socket stays open across the exec: requests wait in its backlog until
        // the new image accepts them.
        match agent_info(target) {
            Ok(now) if now.generation > before.generation => {
                println!(
                    "the agent (pid {}) runs corral {} now, re-executed {} time{} since it started",
                    now.pid,
                    now.version,
                    now.generation,
                    if now.generation == 1 { "" } else { "s" }
                );
                return Ok(ExitCode::SUCCESS);
            }
            Ok(now) => {
                // The agent handles requests in order: one answered by the same image after
                // the reply means the exec failed (and it says why).
                bail!(
                    "the re-exec failed and the agent runs on as it was: {}",
                    now.reexec_error.as_deref().unwrap_or("no reason given")
                );
            }
            Err(_) if std::time::Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent did not come back from its re-exec within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn simple(response: Response) -> Result<ExitCode> {
    match response {
        Response::Ok { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => bail!("{message}"),
        Response::Status { .. } => bail!("the agent answered with a status where none was asked"),
    }
}

fn status_apps(response: Response) -> Result<Vec<AppStatus>> {
    match response {
        Response::Status { apps, .. } => Ok(apps),
        Response::Error { message } => bail!("{message}"),
        Response::Ok { message } => bail!("unexpected answer: {message}"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}M", b as f64 / (1u64 << 20) as f64)
}

fn render_status(apps: &[AppStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if apps.is_empty() {
        out.push_str("no apps\n");
    }
    for app in apps {
        let _ = writeln!(out, "{}  {}  {}", app.name, app.state, app.address);
        if let Some(r) = &app.reason {
            let _ = writeln!(out, "  reason: {r}");
        }
        let _ = writeln!(out, "  steering: {}", app.steering);
        if let Some(st) = &app.steering_stats {
            let _ = writeln!(
                out,
                "  steered {} (probes {}, migrated {}, to the kernel's hash {}, select errors {})",
                st.selected,
                st.probes,
                st.migrations,
                st.fallbacks + st.no_eligible,
                st.select_errors
            );
        }
        if let Some(t) = &app.tls {
            let c = |k: &str| t.counters.get(k).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "  tls: handshakes kTLS {}, userspace {} (ktls off {}, kernel without kTLS {}, \
                 cipher not in kernel {}, ULP refused {}); open {}",
                c("handshakes_ktls"),
                c("handshakes_userspace"),
                c("fallback_ktls_off"),
                c("fallback_kernel_without_ktls"),
                c("fallback_cipher_not_in_kernel"),
                c("fallback_ulp_refused"),
                c("open_connections"),
            );
            let _ = writeln!(
                out,
                "  tls: failed handshakes: eof {}, timeout {}, protocol {}, io {}; kTLS set-up \
                 failed {}; upstream failed {}; redirects {}",
                c("handshake_failed_eof"),
                c("handshake_failed_timeout"),
                c("handshake_failed_protocol"),
                c("handshake_failed_io"),
                c("ktls_setup_failed"),
                c("upstream_failed"),
                c("redirects"),
            );
            let _ = writeln!(
                out,
                "  tls: bytes spliced {}, copied {}; received close_notify {}, alerts {}, \
                 post-handshake closes {}, EOF without close_notify {}",
                c("bytes_spliced"),
                c("bytes_copied"),
                c("close_notify_received"),
                c("alerts_received"),
                c("post_handshake_closes"),
                c("eof_without_close_notify"),
            );
            if !t.kernel_tls_stat.is_empty() {
                let kv: Vec<String> = t
                    .kernel_tls_stat
                    .iter()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                let _ = writeln!(out, "  kernel /proc/net/tls_stat: {}", kv.join(", "));
            }
        }
        let _ = writeln!(
            out,
            "  {:<6} {:<8} {:<9} {:>9} {:>8} {:>16} {:>9} {:>8} {:>6}  LAST EXIT",
            "WORKER",
            "PID",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "MEM (RSS/PEAK)",
            "CPU",
            "CONNS",
            "OPEN"
        );
        for w in &app.workers {
            let _ = writeln!(
                out,
                "  {:<6} {:<8} {:<9} {:>9} {:>8} {:>16} {:>9} {:>8} {:>6}  {}",
                w.slot,
                w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                w.state,
                w.uptime_ms
                    .map(|u| format_duration(Duration::from_millis(u)))
                    .unwrap_or_else(|| "-".into()),
                w.restarts,
                match (w.rss_bytes, w.peak_rss_bytes) {
                    (Some(r), Some(p)) => format!("{}/{}", mib(r), mib(p)),
                    _ => "-".into(),
                },
                w.cpu_ms
                    .map(|c| format_duration(Duration::from_millis(c)))
                    .unwrap_or_else(|| "-".into()),
                w.connections
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                w.inflight
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                w.last_exit.as_deref().unwrap_or("-"),
            );
        }
    }
    out
}

fn resolved_count(c: WorkerCount) -> u32 {
    match c {
        WorkerCount::Fixed(n) => n.get(),
        WorkerCount::Auto => machine::online_cpus(),
    }
}

/// Sum of memory caps against the memory corral may use: MemTotal, or less when its cgroup
/// root has a memory.max of its own.
fn check_budget(cfg: &Config, ceiling: Option<config::ByteSize>) -> Result<budget::Budget> {
    let lines: Vec<_> = cfg
        .apps
        .values()
        .map(|a| {
            (
                a.name.clone(),
                resolved_count(a.workers.count),
                a.workers.memory_max,
            )
        })
        .collect();
    let total = machine::mem_total()?;
    let available = match ceiling {
        Some(c) if c.0 < total => c,
        _ => config::ByteSize(total),
    };
    let b = budget::memory_budget(&lines, available);
    if let Some(msg) = b.over_message() {
        if cfg.agent.allow_overcommit {
            eprintln!("corral: warning: {msg} (allowed by [agent] allow_overcommit = true)");
        } else {
            bail!("{msg}");
        }
    }
    Ok(b)
}

/// Can the agent bind its metrics address? An agent answering on the control socket is taken
/// to be the one serving it; otherwise a plain bind must work.
fn probe_metrics(cfg: &Config, address: std::net::SocketAddr) -> Result<(), String> {
    let running = control::call(
        &cfg.agent.control_socket,
        &Request::Status { app: None },
        Duration::from_secs(2),
    )
    .is_ok();
    if running {
        return Ok(());
    }
    std::net::TcpListener::bind(address).map(drop).map_err(|e| {
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
    let served = control::call(
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
    std::net::TcpListener::bind(app.listen.address)
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

fn check(path: &Path) -> Result<ExitCode> {
    let cfg = load(path)?;
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
    let cgroups = supervisor::cgroups::Cgroups::inspect(&cfg.agent);
    println!("cgroups: {}", cgroups.describe());
    if cfg.apps.is_empty() {
        println!("no apps defined (add [app.NAME] tables, or files matching the include globs)");
    }
    for app in cfg.apps.values() {
        let count = resolved_count(app.workers.count);
        println!();
        println!("app {} ({})", app.name, app.defined_at);
        let auto = if app.workers.count == WorkerCount::Auto {
            " (auto: one per online CPU)"
        } else {
            ""
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
            Ready::Notify => "notify (READY=1 on the worker's NOTIFY_SOCKET)".to_string(),
            Ready::Delay(d) => format!("after {}", format_duration(*d)),
        };
        println!(
            "  ready       {ready}, within {}",
            format_duration(app.workers.ready_timeout)
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
    match check_budget(&cfg, cgroups.root_memory_max()) {
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
