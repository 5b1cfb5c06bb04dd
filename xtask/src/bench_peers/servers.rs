//! The apps and the servers that run them: corral with four workers of the app's own
//! single-process server, and each peer's own multi-worker mode on a socket of its own.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use corral_testkit::{die_with_parent, free_port, ChildGuard};

use super::procs;
use crate::bench_steering::{
    http_get, nobody, request, start_corral_with, Outcome, Servers, WORKERS,
};

/// corral's default listen backlog; every peer is given the same.
const BACKLOG: &str = "1024";
/// How long a server may take to have all its workers serving (Python imports FastAPI in
/// about a second; much longer when the machine is busy compiling).
const START_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum App {
    /// A plain WSGI app under gunicorn's sync workers.
    Wsgi,
    /// FastAPI with `def` endpoints (run in Starlette's threadpool).
    FastapiSync,
    /// FastAPI with `async def` endpoints doing their CPU work in the event loop.
    FastapiAsync,
}

impl App {
    pub(super) const ALL: [App; 3] = [App::Wsgi, App::FastapiSync, App::FastapiAsync];

    /// The name `--apps` takes.
    pub(super) fn key(self) -> &'static str {
        match self {
            App::Wsgi => "wsgi",
            App::FastapiSync => "sync",
            App::FastapiAsync => "async",
        }
    }

    pub(super) fn title(self) -> &'static str {
        match self {
            App::Wsgi => "WSGI app (gunicorn sync workers)",
            App::FastapiSync => "FastAPI, sync `def` endpoints (uvicorn)",
            App::FastapiAsync => {
                "FastAPI, `async def` endpoints with CPU work in the loop (uvicorn)"
            }
        }
    }

    fn module(self) -> &'static str {
        match self {
            App::Wsgi => "wsgi_app:app",
            App::FastapiSync => "fastapi_sync:app",
            App::FastapiAsync => "fastapi_async:app",
        }
    }

    /// What runs it, in the order of the first round: a peer, corral with the first of
    /// `corral` (the steering compared with the targets), the other peer, then corral with the
    /// other steerings asked for.
    pub(super) fn variants(self, corral: &[&'static str]) -> Vec<Variant> {
        let first = Variant::Corral(corral.first().copied().unwrap_or("auto"));
        let mut v = match self {
            App::Wsgi => vec![Variant::GunicornSync, first],
            App::FastapiSync | App::FastapiAsync => {
                vec![Variant::UvicornWorkers, first, Variant::GunicornUvicorn]
            }
        };
        v.extend(corral.iter().skip(1).map(|s| Variant::Corral(s)));
        v
    }

    /// Targets of issue 10 as (p99, 1 ms class p99), each a bound on corral /
    /// the best peer.
    pub(super) fn targets(self) -> (f64, f64) {
        match self {
            App::Wsgi => (1.0, 1.0),
            App::FastapiSync => (1.0, 0.9),
            App::FastapiAsync => (0.9, 0.6),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Variant {
    /// corral with this steering; each worker the app's single-process server on fd 3.
    Corral(&'static str),
    /// `uvicorn --workers 4`.
    UvicornWorkers,
    /// `gunicorn -w 4` (sync workers).
    GunicornSync,
    /// `gunicorn -k uvicorn_worker.UvicornWorker -w 4`.
    GunicornUvicorn,
}

impl Variant {
    pub(super) fn is_corral(self) -> bool {
        matches!(self, Variant::Corral(_))
    }

    pub(super) fn name(self, app: App) -> &'static str {
        match (self, app) {
            (Variant::Corral(s), App::Wsgi) => match s {
                "auto" => "corral (auto), 4 x gunicorn -w 1",
                "least-loaded" => "corral least-loaded, 4 x gunicorn -w 1",
                "round-robin" => "corral round-robin, 4 x gunicorn -w 1",
                "shared" => "corral shared, 4 x gunicorn -w 1",
                _ => "corral hash, 4 x gunicorn -w 1",
            },
            (Variant::Corral(s), _) => match s {
                "auto" => "corral (auto), 4 x uvicorn --fd 3",
                "least-loaded" => "corral least-loaded, 4 x uvicorn --fd 3",
                "round-robin" => "corral round-robin, 4 x uvicorn --fd 3",
                "shared" => "corral shared, 4 x uvicorn --fd 3",
                _ => "corral hash, 4 x uvicorn --fd 3",
            },
            (Variant::UvicornWorkers, _) => "uvicorn --workers 4",
            (Variant::GunicornSync, _) => "gunicorn -w 4 (sync)",
            (Variant::GunicornUvicorn, _) => "gunicorn -k UvicornWorker -w 4",
        }
    }
}

/// Where things are for one run.
pub(super) struct Ctx {
    pub(super) corral: PathBuf,
    pub(super) venv: PathBuf,
    pub(super) apps: PathBuf,
    /// This run's scratch directory (agents' state, logs, markers).
    pub(super) dir: PathBuf,
}

/// One running server.
pub(super) struct Running {
    pub(super) variant: Variant,
    pub(super) name: &'static str,
    /// `servers.pids` are the serving processes as started, in slot order for corral.
    pub(super) servers: Servers,
    /// The agent or the peer's master.
    pub(super) root_pid: i32,
    /// Where the app's processes leave their pid when imported.
    pub(super) markers: PathBuf,
    pub(super) log: PathBuf,
}

impl Running {
    /// The processes serving now, oldest first.
    pub(super) fn serving(&self) -> Vec<i32> {
        procs::serving(self.root_pid, &self.markers)
    }

    /// Wait until [`WORKERS`] processes serve again (after a kill storm).
    pub(super) fn wait_all_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.serving().len() < WORKERS {
            if Instant::now() > deadline {
                bail!(
                    "{}: only {} of {WORKERS} workers serving after {} s; see {}",
                    self.name,
                    self.serving().len(),
                    timeout.as_secs(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

fn label(app: App, variant: Variant) -> String {
    let v = match variant {
        Variant::Corral(s) => format!("corral-{s}"),
        Variant::UvicornWorkers => "uvicorn".into(),
        Variant::GunicornSync => "gunicorn".into(),
        Variant::GunicornUvicorn => "gunicorn-uvicorn".into(),
    };
    format!("{}-{v}", app.key())
}

/// A directory that `nobody` can write its markers into.
fn markers_dir(ctx: &Ctx, label: &str) -> Result<PathBuf> {
    let dir = ctx.dir.join(label).join("markers");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(dir.parent().expect("has a parent"), perms(0o755))?;
    std::fs::set_permissions(&dir, perms(0o777))?;
    Ok(dir)
}

fn perms(mode: u32) -> std::fs::Permissions {
    std::fs::Permissions::from_mode(mode)
}

pub(super) fn start(ctx: &Ctx, app: App, variant: Variant) -> Result<Running> {
    match variant {
        Variant::Corral(steering) => start_corral(ctx, app, variant, steering),
        _ => start_peer(ctx, app, variant),
    }
}

/// The environment of every worker.
fn worker_env(ctx: &Ctx, markers: &Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "PATH",
            format!("{}:/usr/bin:/bin", ctx.venv.join("bin").display()),
        ),
        ("PYTHONPATH", ctx.apps.display().to_string()),
        ("PYTHONDONTWRITEBYTECODE", "1".into()),
        ("BENCH_MARKERS", markers.display().to_string()),
    ]
}

fn start_corral(ctx: &Ctx, app: App, variant: Variant, steering: &str) -> Result<Running> {
    let label = label(app, variant);
    let markers = markers_dir(ctx, &label)?;
    let bin = |name: &str| ctx.venv.join("bin").join(name).display().to_string();
    // Each worker is the app's own single-process server on corral's socket: uvicorn takes it
    // as `--fd 3`, gunicorn from LISTEN_FDS (it then binds nothing itself).
    let command: Vec<String> = match app {
        App::Wsgi => vec![
            bin("gunicorn"),
            "-w".into(),
            "1".into(),
            app.module().into(),
        ],
        App::FastapiSync | App::FastapiAsync => vec![
            bin("uvicorn"),
            app.module().into(),
            "--fd".into(),
            "3".into(),
            "--no-access-log".into(),
            "--log-level".into(),
            "warning".into(),
        ],
    };
    let mut table = corral_testkit::App::new("bench")
        .command(command)
        .user("nobody")
        .set("workdir", ctx.apps.as_path())
        // A kill storm kills each slot's worker every few seconds: more restarts in a row
        // than the default allows (5 a minute) before a slot gives up.
        .restart("max_restarts", 1000);
    for (k, v) in worker_env(ctx, &markers) {
        table = table.env(k, v);
    }
    let dir = ctx.dir.join(&label);
    let mut servers = start_corral_with(&ctx.corral, &dir, steering, table)
        .with_context(|| format!("starting corral for {}", app.title()))?;
    let root_pid = servers.agent_pid.context("corral has an agent")?;
    let running_pids = servers.pids.clone();
    // The serving process of each slot: the worker itself (uvicorn), or gunicorn's one worker
    // below the slot's arbiter.
    let deadline = Instant::now() + START_TIMEOUT;
    let serving = loop {
        let now = procs::serving(root_pid, &markers);
        let by_slot: Vec<Option<i32>> = running_pids
            .iter()
            .map(|&slot_pid| {
                now.iter()
                    .copied()
                    .find(|&p| p == slot_pid || procs::parent(p) == Some(slot_pid))
            })
            .collect();
        if by_slot.iter().all(Option::is_some) {
            break by_slot.into_iter().flatten().collect::<Vec<i32>>();
        }
        if Instant::now() > deadline {
            bail!(
                "corral's workers for {} did not all serve within {} s; see {}",
                app.title(),
                START_TIMEOUT.as_secs(),
                dir.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    servers.pids = serving;
    servers.steering = format!("corral {}", servers.steering);
    Ok(Running {
        variant,
        name: variant.name(app),
        servers,
        root_pid,
        markers,
        log: dir.join("agent.log"),
    })
}

fn start_peer(ctx: &Ctx, app: App, variant: Variant) -> Result<Running> {
    let label = label(app, variant);
    let markers = markers_dir(ctx, &label)?;
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let port_arg = port.to_string();
    let workers = WORKERS.to_string();
    let (bin, args): (&str, Vec<&str>) = match variant {
        Variant::UvicornWorkers => (
            "uvicorn",
            vec![
                app.module(),
                "--workers",
                &workers,
                "--host",
                "127.0.0.1",
                "--port",
                &port_arg,
                "--backlog",
                BACKLOG,
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        ),
        Variant::GunicornSync | Variant::GunicornUvicorn => (
            "gunicorn",
            vec![
                "-k",
                if variant == Variant::GunicornSync {
                    "sync"
                } else {
                    "uvicorn_worker.UvicornWorker"
                },
                "-w",
                &workers,
                "-b",
                &bind,
                "--backlog",
                BACKLOG,
                app.module(),
            ],
        ),
        Variant::Corral(_) => unreachable!("start() sends corral to start_corral"),
    };
    let log_path = ctx.dir.join(&label).join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let (uid, gid) = nobody()?;
    let mut cmd = Command::new(ctx.venv.join("bin").join(bin));
    cmd.args(&args)
        .env_clear()
        .envs(worker_env(ctx, &markers))
        .current_dir(&ctx.apps)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: the closure only calls prctl/getppid (async-signal-safe) and allocates nothing.
    // The master dies with this benchmark; its workers die with the master (the app sets
    // their death signal when imported).
    unsafe { cmd.pre_exec(die_with_parent) };
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", variant.name(app)))?;
    let root_pid = child.id() as i32;
    // SIGTERM to the master stops its workers gracefully; SIGKILL after 10 s.
    let mut guard = ChildGuard::with_grace(child, Duration::from_secs(10));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + START_TIMEOUT;
    let probe = http_get("/");
    let pids = loop {
        if let Some(st) = guard.try_wait() {
            bail!(
                "{} exited with {st}; see {}",
                variant.name(app),
                log_path.display()
            );
        }
        let now = procs::serving(root_pid, &markers);
        if now.len() == WORKERS && matches!(request(addr, &probe, false), Outcome::Ok(_)) {
            break now;
        }
        if Instant::now() > deadline {
            bail!(
                "{}: {} of {WORKERS} workers serving after {} s; see {}",
                variant.name(app),
                now.len(),
                START_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Running {
        variant,
        name: variant.name(app),
        servers: Servers {
            addr,
            pids,
            agent_pid: Some(root_pid),
            control: None,
            steering: "one shared listening socket, every worker accepts from it".into(),
            _processes: vec![guard],
            _listener: None,
        },
        root_pid,
        markers,
        log: log_path,
    })
}
