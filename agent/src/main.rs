//! The `corral` command line. anyhow lives here only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use corral::config::{self, Config};
use corral::control::Request;
use corral::supervisor;
use corral::sys::{machine, users::SystemLookup};

mod cli;

use cli::{simple, Target, DEFAULT_CONFIG};

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
    /// The output of apps and workers: `corral logs api`, `corral logs api/2 -f`.
    ///
    /// Shows the last lines the agent keeps (20000 over all apps: its recent output, and what
    /// the keeper held while no agent ran, marked "(kept)"); older lines are in the agent's log
    /// (the journal under systemd: `journalctl -u corral`). With -f, prints new lines as they
    /// come until Ctrl-C.
    Logs {
        /// APP or APP/WORKER (0-based slot); every app when left out.
        target_app: Option<String>,
        /// Keep printing new lines.
        #[arg(long, short)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: u32,
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
    /// A TLS front process, started by the agent for `[app.NAME.tls]` (never by hand): its
    /// descriptors are corral::front::fds, its arguments corral::front::args::FrontArgs.
    #[command(hide = true)]
    Front(corral::front::args::FrontArgs),
    /// The ACME client, started by the agent as a TLS front's user (never by hand): one
    /// request (JSON) on stdin, one response (JSON) on stdout.
    #[command(hide = true)]
    Acme,
    /// The keeper, started by the agent (never by hand): holds the agent's workers' sockets,
    /// pidfds and output pipes, so a crashed agent's successor adopts them.
    #[command(hide = true)]
    Keeper(corral::keeper::KeeperArgs),
}

/// mimalloc, for every subcommand of the one binary: the TLS fronts allocate per proxied
/// request (hyper, h2, rustls buffers), and glibc's allocator merging free chunks for their
/// 8 KiB-plus buffers showed in their profile; the agent allocates little and loses nothing.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

pub(crate) fn load(path: &Path) -> Result<Config> {
    config::load(path, &SystemLookup).map_err(|e| anyhow::anyhow!("{e}"))
}

/// As PID 1: fork the agent and return in it (true if it replaces one that crashed); PID 1
/// itself never returns. One thread so far, and PID 1 never starts another: fork is safe.
fn pid1_init() -> Result<bool> {
    use corral::policy::init::{after_agent, AfterAgent, AgentEnd};
    use corral::policy::restart::ExitStatus;
    use nix::sys::wait::WaitStatus;
    let init = corral::sys::init::Init::new().context("starting as PID 1")?;
    let mut restarts = std::collections::VecDeque::new();
    loop {
        let Some(agent) = init
            .fork_agent()
            .context("starting the agent under PID 1")?
        else {
            return Ok(!restarts.is_empty());
        };
        let end = init.wait_agent(agent);
        let status = match end.status {
            WaitStatus::Signaled(_, sig, core_dumped) => ExitStatus::Signaled {
                signal: sig as i32,
                core_dumped,
            },
            WaitStatus::Exited(_, code) => ExitStatus::Exited(code),
            // wait_agent returns only these two.
            _ => ExitStatus::Exited(1),
        };
        let end = AgentEnd {
            status,
            stopping: end.stopping,
        };
        match after_agent(end, &mut restarts, std::time::Instant::now()) {
            AfterAgent::Exit(code) => std::process::exit(code),
            AfterAgent::Restart { why } => {
                tracing::error!("{why}: starting it again; it adopts the workers the keeper held")
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Agent { config } => {
            init_logging();
            let mut cfg = load(&config)?;
            if !machine::is_root() {
                bail!("the agent must run as root: it binds sockets for and switches to the apps' users");
            }
            cli::check::budget(&cfg)?;
            if corral::sys::init::is_pid1() {
                // A container's entrypoint: PID 1 stays a minimal init (reaps orphans, forwards
                // signals, starts a crashed agent again) and the agent goes on as its child.
                tracing::info!("running as PID 1: PID 1 reaps orphans and forwards signals, the agent runs as its child");
                if pid1_init()? {
                    // After a crash, the config as it is now, as a restart by systemd reads it.
                    cfg = load(&config)?;
                }
            }
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
        Command::Check { config } => cli::check::run(&config),
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
        Command::Front(args) => {
            corral::front::process::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Acme => {
            corral::acme::client::run().map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keeper(args) => {
            corral::keeper::run(args).map_err(|e| anyhow::anyhow!("keeper: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { app, json, target } => {
            let response = target.call(&Request::Status { app })?;
            let apps = cli::status::apps(response)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&apps)?);
            } else {
                print!("{}", cli::status::render(&apps));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Top { target } => loop {
            let apps = cli::status::apps(target.call(&Request::Status { app: None })?)?;
            print!("\x1b[H\x1b[2J{}", cli::status::render(&apps));
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
        Command::Reexec { target } => cli::reexec::run(&target),
        Command::Logs {
            target_app,
            follow,
            lines,
            target,
        } => cli::logs::run(&target, target_app.as_deref(), follow, lines),
        Command::ReexecCheck { config } => {
            let cfg = load(&config)?;
            cli::check::budget(&cfg)?;
            println!("{}", supervisor::handoff::check_line());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent renders a front's argv from the same struct this CLI parses it into.
    #[test]
    fn the_front_parses_what_the_agent_renders() {
        let args = corral::front::args::FrontArgs {
            app: "api".into(),
            upstream: "127.0.0.1:8000".parse().unwrap(),
            ktls: config::KtlsMode::Auto,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            redirect_to_port: Some(443),
            proxy_protocol_v2: true,
            proxy: corral::front::args::ProxyMode::Tcp,
            http: corral::front::args::HttpArgs {
                trusted_proxies: vec!["192.0.2.0/24".parse().unwrap()],
                header_timeout: Duration::from_secs(10),
                upstream_timeout: Duration::from_secs(60),
                body_timeout: Duration::from_secs(60),
                max_header_bytes: 32768,
                max_headers: 100,
                access_log: true,
                upstream: corral::front::args::UpstreamMode::Connect,
            },
            acme_challenges: Some("/var/lib/corral/acme/api.challenges".into()),
        };
        let argv = std::iter::once("corral".to_string()).chain(args.to_argv());
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Front(parsed) => assert_eq!(parsed, args),
            _ => panic!("not the front subcommand"),
        }
    }
}
