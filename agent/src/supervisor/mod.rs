//! The event loop. One task owns every app, slot and worker; everything else (pidfd waits,
//! readiness probes, timers, pre-start sequences, control connections) runs in small tasks that
//! report back as [`Event`]s. Policy decides, this module executes.

pub mod cgroups;
pub mod handoff;
pub mod launch;
mod metrics;
mod output;
mod prestart;
mod ready;
pub mod steering;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, App, AppName, Config, WorkerCount};
use crate::control::{AppStatus, Request, Response, SteeringStats, WorkerStatus};
use crate::policy::restart::{self, Decision, ExitStatus, SlotHistory};
use crate::sys::notify::{monotonic_usec, Notifier};
use crate::sys::pidfd::{Process, WaitStatus};
use crate::sys::{machine, socket, users::SystemLookup};

use cgroups::Cgroups;
use launch::Launch;
use output::Tag;
use steering::GroupSteering;

/// Errors that keep the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    App(String),
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("{at}: metrics endpoint {address}: {source}")]
    Metrics {
        at: String,
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How a pidfd wait ended, in policy terms.
pub fn exit_status(w: WaitStatus) -> ExitStatus {
    match w {
        WaitStatus::Exited(code) => ExitStatus::Exited(code),
        WaitStatus::Signaled {
            signal,
            core_dumped,
        } => ExitStatus::Signaled {
            signal,
            core_dumped,
        },
    }
}

enum Event {
    Exited {
        app: AppName,
        id: u64,
        status: Result<WaitStatus, String>,
    },
    Ready {
        app: AppName,
        id: u64,
        result: Result<(), String>,
    },
    RestartDue {
        app: AppName,
        slot: u32,
        token: u64,
    },
    KillDue {
        app: AppName,
        id: u64,
    },
    PreStartDone {
        app: AppName,
        token: u64,
        result: Result<(), String>,
    },
    /// A worker's memory.events changed.
    MemoryEvents {
        app: AppName,
        id: u64,
    },
    /// Something changed where a TLS front's certificate or key files are.
    CertsChanged {
        app: AppName,
    },
    Control {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
    /// The reply to `corral reexec` went out: exec now.
    ReexecNow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    Starting,
    Ready,
    Stopping,
}

impl WorkerState {
    fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        }
    }
}

struct Worker {
    id: u64,
    slot: u32,
    process: Arc<Process>,
    state: WorkerState,
    started: Instant,
    /// Keeps the listening socket this worker was given open for as long as it runs.
    _socket: Arc<OwnedFd>,
    /// The agent asked it to stop: its exit is not a failure.
    expected_exit: bool,
    /// Why it was stopped for not becoming ready, if that is why.
    not_ready: Option<String>,
    /// The readiness probe; it must not outlive the worker (it holds the probe's 4-tuple).
    probe: tokio::task::AbortHandle,
    /// Its cgroup leaf, when corral has a cgroup root.
    leaf: Option<crate::sys::cgroup::Leaf>,
    /// The watch of its memory.events (memory_high set), stopped with the worker.
    memory_watch: Option<tokio::task::AbortHandle>,
    /// memory.events `high` when last looked at; it is being replaced for crossing it.
    high_seen: u64,
    recycling: bool,
    /// A TLS front's counters (shared memory it updates).
    counters: Option<Arc<crate::sys::front::SharedCounters>>,
    /// What `corral reexec` hands to the agent's next image besides the pidfd: dups of the read
    /// ends of its stdout and stderr (the forwarding tasks own the originals) and a front's
    /// counters memfd.
    handover: handoff::WorkerFds,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.probe.abort();
        if let Some(w) = &self.memory_watch {
            w.abort();
        }
        if let Some(leaf) = self.leaf.take() {
            cgroups::spawn_teardown(leaf);
        }
    }
}

struct Slot {
    socket: Arc<OwnedFd>,
    current: Option<Worker>,
    /// Workers this slot is replacing: serving until the current one is ready, then stopping.
    retired: Vec<Worker>,
    history: SlotHistory,
    restarts: u32,
    last_exit: Option<String>,
    /// Its workers the kernel killed at memory.max.
    oom_kills: u64,
    /// A restart timer is armed with this token.
    waiting: Option<u64>,
    gave_up: Option<String>,
    /// Part of a rolling replacement that has not reached this slot yet.
    pending_replace: bool,
}

impl Slot {
    fn new(socket: Arc<OwnedFd>) -> Slot {
        Slot {
            socket,
            current: None,
            retired: Vec::new(),
            history: SlotHistory::default(),
            restarts: 0,
            last_exit: None,
            oom_kills: 0,
            waiting: None,
            gave_up: None,
            pending_replace: false,
        }
    }
}

/// A new version of an app waiting for its pre-start steps.
struct Rollout {
    cfg: App,
    launch: Launch,
    sockets: Vec<Arc<OwnedFd>>,
    /// A new socket group (new address or steering kind) brings its own steering.
    steering: Option<GroupSteering>,
}

enum Phase {
    /// Pre-start steps are running (token identifies the run).
    PreStart {
        token: u64,
        rollout: Option<Box<Rollout>>,
    },
    Running,
    Failed(String),
    Stopping,
}

struct AppRt {
    cfg: App,
    launch: Launch,
    phase: Phase,
    slots: Vec<Slot>,
    /// Workers of slots that no longer exist (scale-down, removed app), being stopped.
    removed: Vec<Worker>,
    /// Why the app is degraded, when it is.
    note: Option<String>,
    cancel: watch::Sender<bool>,
    steering: GroupSteering,
    /// `<root>/app-<name>`, when corral has a cgroup root.
    cg: Option<crate::sys::cgroup::App>,
    /// A TLS front: what its exited processes counted.
    front_totals: [u64; crate::tls::stats::COUNT],
    /// A TLS front: the watch of its certificate files' directories.
    cert_watch: Option<AbortOnDrop>,
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The directories a front's certificate and key files are in (and, for symlinks, where they
/// point: certbot's live/ links into archive/).
fn cert_dirs(tls: &config::Tls) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for pair in tls.cert_pairs() {
        for f in [&pair.cert, &pair.key] {
            let mut candidates = vec![f.clone()];
            if let Ok(real) = std::fs::canonicalize(f) {
                candidates.push(real);
            }
            for c in candidates {
                if let Some(d) = c.parent() {
                    if !dirs.iter().any(|x| x == d) {
                        dirs.push(d.to_path_buf());
                    }
                }
            }
        }
    }
    dirs
}

/// How long a certificate change settles before it is read: a renewal writes the certificate
/// and the key one after the other.
const CERT_SETTLE: Duration = Duration::from_millis(500);

/// What a config needs before it can be applied: sockets bound, programs found, the steering
/// program loaded (not attached: attaching is part of applying).
struct Prepared {
    launch: Launch,
    sockets: Vec<Arc<OwnedFd>>,
    /// `Some` for a new socket group, or when the steering kind changes.
    steering: Option<GroupSteering>,
}

fn worker_count(cfg: &App) -> u32 {
    match cfg.workers.count {
        WorkerCount::Fixed(n) => n.get(),
        WorkerCount::Auto => machine::online_cpus(),
    }
}

fn launch_for(cfg: &App, argv: &[String]) -> Result<Launch, String> {
    let mut launch = Launch::for_app(cfg, argv)
        .map_err(|e| format!("{}: app {}: {e}", cfg.command_at, cfg.name))?;
    if let config::Role::TlsFront { tls, .. } = &cfg.role {
        launch.bundle = Some(front_bundle(cfg, tls)?);
        if let Some(r) = tls.redirect_http {
            // SO_REUSEPORT, so a rolling replacement's new fronts can bind beside the old ones.
            let fd = socket::reuseport_listener(r, cfg.listen.backlog)
                .map_err(|e| format!("{}: app {}: redirect_http: {e}", tls.address_at, cfg.name))?;
            launch.redirect = Some(Arc::new(fd));
        }
    }
    Ok(launch)
}

/// Read and check a TLS front's certificates and keys (as root: key files are the agent's to
/// read) into a sealed memfd for its processes. An invalid certificate fails here, before
/// anything is applied.
fn front_bundle(cfg: &App, tls: &config::Tls) -> Result<(Arc<OwnedFd>, u64), String> {
    let bundle = crate::tls::bundle::Bundle::load(&tls.cert_pairs())
        .map_err(|e| format!("{}: app {}: {e}", tls.address_at, cfg.name))?;
    let memfd = crate::sys::front::sealed_memfd(&format!("corral-{}", cfg.name), &bundle.encode())
        .map_err(|e| format!("app {}: certificate bundle: {e}", cfg.name))?;
    if tls.ktls != config::KtlsMode::Off {
        // As root this also loads tls.ko when the kernel has it as a module; the unprivileged
        // front processes could not.
        match crate::sys::ktls::probe() {
            Ok(()) => tracing::info!(app = %cfg.name, "kernel TLS: TCP_ULP \"tls\" available"),
            Err(why) if tls.ktls == config::KtlsMode::Require => {
                return Err(format!(
                    "{}: app {}: ktls = \"require\", but {why}",
                    tls.address_at, cfg.name
                ))
            }
            Err(why) => {
                tracing::info!(app = %cfg.name, "kernel TLS unavailable ({why}): userspace rustls")
            }
        }
    }
    Ok((Arc::new(memfd), bundle.digest()))
}

/// Whether a running front's certificates differ from what is on disk now (an unreadable or
/// invalid one is an error: the reload is refused).
fn bundle_changed(rt: &AppRt, cfg: &App) -> Result<bool, String> {
    match (&cfg.role, &rt.launch.bundle) {
        (config::Role::TlsFront { tls, .. }, Some((_, old))) => {
            let new = crate::tls::bundle::Bundle::load(&tls.cert_pairs())
                .map_err(|e| format!("{}: app {}: {e}", tls.address_at, cfg.name))?;
            Ok(new.digest() != *old)
        }
        _ => Ok(false),
    }
}

/// Bind `count` sockets for `cfg`, reusing `existing` (a group on the same address) for the
/// first slots; load a steering program unless `keep_steering` (same group, same kind).
fn prepare(
    cfg: &App,
    count: u32,
    existing: &[Arc<OwnedFd>],
    keep_steering: bool,
    pin_root: &Path,
) -> Result<Prepared, String> {
    let launch = launch_for(cfg, &cfg.command)?;
    let mut sockets: Vec<Arc<OwnedFd>> = existing.iter().take(count as usize).cloned().collect();
    let fresh_group = sockets.is_empty();
    while sockets.len() < count as usize {
        let fd = socket::reuseport_listener(cfg.listen.address, cfg.listen.backlog)
            .map_err(|e| format!("{}: app {}: {e}", cfg.listen.address_at, cfg.name))?;
        sockets.push(Arc::new(fd));
    }
    for s in &sockets {
        socket::listen(std::os::fd::AsFd::as_fd(&**s), cfg.listen.backlog)
            .map_err(|e| format!("{}: app {}: listen: {e}", cfg.listen.address_at, cfg.name))?;
    }
    let steering = (fresh_group || !keep_steering).then(|| GroupSteering::load(cfg, pin_root));
    Ok(Prepared {
        launch,
        sockets,
        steering,
    })
}

fn prestart_plan(cfg: &App) -> Result<Vec<(config::PreStart, Launch)>, String> {
    cfg.pre_start
        .iter()
        .map(|step| {
            Launch::for_app(cfg, &step.command)
                .map(|l| (step.clone(), l))
                .map_err(|e| format!("{}: app {} pre-start {}: {e}", step.at, cfg.name, step.name))
        })
        .collect()
}

/// Options the CLI passes in.
pub struct Options {
    pub config_path: PathBuf,
}

struct Supervisor {
    config_path: PathBuf,
    config: Config,
    apps: BTreeMap<AppName, AppRt>,
    tx: mpsc::UnboundedSender<Event>,
    next_id: u64,
    notifier: Notifier,
    shutting_down: bool,
    rng: u64,
    cgroups: Cgroups,
    /// A dup of the control socket's listener, to hand to the next image.
    control_fd: Option<OwnedFd>,
    /// A dup of the metrics endpoint's listener, likewise.
    metrics_fd: Option<OwnedFd>,
    /// Re-execs since the agent started (`corral reexec`).
    generation: u32,
    /// Why the last re-exec failed.
    reexec_error: Option<String>,
    pending_reexec: Option<handoff::Pending>,
}

/// Run the agent until SIGTERM or SIGINT. Errors before the first worker starts are returned
/// (nothing is left running); afterwards problems are logged and the agent keeps going.
pub async fn run(options: Options, config: Config) -> Result<(), StartError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;

    // Started by `corral reexec`: the previous image's workers, sockets and cgroups to adopt.
    let mut handed = handoff::take();
    if let Some([soft, hard]) = handed.as_ref().and_then(|st| st.child_nofile) {
        // Children get the limit the first image started with, not the one it raised.
        machine::set_child_nofile(machine::NofileLimit { soft, hard });
    }
    match machine::raise_nofile() {
        Ok(old) => {
            machine::set_child_nofile(old);
            tracing::debug!(
                "open files: raised to {} (workers get {})",
                old.hard,
                old.soft
            );
        }
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
    ready::init_accept_signal();
    if let Some(st) = handed.as_mut() {
        handoff::stop_unknown(st, &|name| {
            AppName::new(name).is_ok_and(|n| config.apps.contains_key(&n))
        });
    }
    let keep: Vec<String> = handed
        .iter()
        .flat_map(|st| st.apps.iter().map(|a| a.name.clone()))
        .collect();
    let cgroups = Cgroups::setup(&config.agent, &keep).await;
    tracing::info!("cgroups: {}", cgroups.describe());
    for dir in steering::remove_stale_pins(&config.agent.bpf_pin_dir) {
        tracing::info!("removed stale steering pins {}", dir.display());
    }
    // Everything fallible first: sockets and programs for every app, then the control socket.
    let mut prepared = BTreeMap::new();
    for (name, cfg) in &config.apps {
        if keep.iter().any(|k| k == name.as_str()) {
            continue;
        }
        let p = prepare(
            cfg,
            worker_count(cfg),
            &[],
            false,
            &config.agent.bpf_pin_dir,
        )
        .map_err(StartError::App)?;
        prestart_plan(cfg).map_err(StartError::App)?;
        prepared.insert(name.clone(), p);
    }
    let metrics_listener = match (
        config.agent.metrics,
        handed.as_ref().and_then(|st| st.metrics),
    ) {
        (None, None) => None,
        // Not configured any more (cannot happen through `corral reexec`, which checks the
        // config): close it.
        (None, Some(fd)) => {
            drop(crate::sys::handoff::adopt(fd));
            None
        }
        (Some(address), Some(fd)) => Some(
            crate::sys::handoff::adopt(fd)
                .map(std::net::TcpListener::from)
                .map_err(|source| StartError::Metrics {
                    at: "the listener handed over".into(),
                    address,
                    source: std::io::Error::other(source),
                })?,
        ),
        (Some(address), None) => Some(bind_metrics(&config.agent, address)?),
    };
    let metrics_listener = match metrics_listener {
        None => None,
        Some(l) => {
            let address = l.local_addr().ok();
            let l = l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
                .map_err(|source| StartError::Metrics {
                    at: "registering the listener".into(),
                    address: address.unwrap_or(([0, 0, 0, 0], 0).into()),
                    source,
                })?;
            Some(l)
        }
    };
    let control = match handed.as_ref() {
        Some(st) => crate::sys::handoff::adopt(st.control)
            .map_err(std::io::Error::other)
            .map(std::os::unix::net::UnixListener::from)
            .and_then(UnixListener::from_std)
            .map_err(|source| StartError::Control {
                path: config.agent.control_socket.clone(),
                source,
            })?,
        None => bind_control(&config.agent.control_socket)?,
    };
    // A dup of the listener, kept to hand over on `corral reexec`.
    let control_fd = std::os::fd::AsFd::as_fd(&control)
        .try_clone_to_owned()
        .map_err(|e| tracing::warn!("keeping the control socket for a re-exec: {e}"))
        .ok();

    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut sup = Supervisor {
        config_path: options.config_path,
        config: config.clone(),
        apps: BTreeMap::new(),
        tx: tx.clone(),
        next_id: 1,
        notifier: Notifier::from_env(),
        shutting_down: false,
        rng: seed,
        cgroups,
        control_fd,
        metrics_fd: metrics_listener.as_ref().and_then(|l| {
            std::os::fd::AsFd::as_fd(l)
                .try_clone_to_owned()
                .map_err(|e| tracing::warn!("keeping the metrics listener for a re-exec: {e}"))
                .ok()
        }),
        generation: handed.as_ref().map_or(0, |st| st.generation),
        reexec_error: None,
        pending_reexec: None,
    };
    if let Some(st) = handed {
        sup.next_id = sup.next_id.max(st.next_id);
        for app in st.apps {
            let Some(cfg) = AppName::new(&app.name)
                .ok()
                .and_then(|n| config.apps.get(&n).cloned())
            else {
                continue;
            };
            if let Err(e) = sup.adopt_app(cfg, app) {
                tracing::error!("{e}");
            }
        }
    }
    for (name, p) in prepared {
        let cfg = config.apps[&name].clone();
        sup.add_app(cfg, p);
    }
    sup.sync_steering();
    tokio::spawn(serve_control(control, tx.clone()));
    if let Some(l) = metrics_listener {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics: http://{a}/metrics");
        }
        tokio::spawn(metrics::serve(l, tx.clone()));
    }
    tracing::info!(
        config = %sup.config_path.display(),
        apps = sup.apps.len(),
        control = %config.agent.control_socket.display(),
        generation = sup.generation,
        "agent started"
    );
    sup.notify("READY=1");
    // Handlers are in place: a signal that arrived during a re-exec is delivered now.
    if let Err(e) = crate::sys::handoff::unblock_signals() {
        tracing::warn!("unblocking signals: {e}");
    }

    let mut next_tick = tokio::time::Instant::now();
    loop {
        tokio::select! {
            Some(ev) = rx.recv() => sup.handle(ev),
            _ = tokio::time::sleep_until(next_tick) => {
                // Load publishing: every 5 ms while connections flow, 4 times a second when idle.
                let active = sup.tick();
                next_tick = tokio::time::Instant::now()
                    + Duration::from_millis(if active { 5 } else { 250 });
            }
            _ = term.recv() => sup.shutdown("SIGTERM"),
            _ = int.recv() => sup.shutdown("SIGINT"),
            _ = hup.recv() => {
                if !sup.shutting_down {
                    match sup.reload(None) {
                        Ok(msg) => tracing::info!("reload: {msg}"),
                        Err(e) => tracing::error!("reload refused, running apps untouched: {e}"),
                    }
                }
            }
        }
        if sup.shutting_down && sup.live_processes() == 0 {
            break;
        }
    }
    let _ = std::fs::remove_file(&sup.config.agent.control_socket);
    let pin_root = sup.config.agent.bpf_pin_dir.clone();
    for (_, app) in std::mem::take(&mut sup.apps) {
        if let Some(cg) = app.cg {
            sup.cgroups.remove_app(cg);
        }
    }
    sup.cgroups.removals_done().await;
    drop(sup); // unpins every group's steering maps
    let _ = std::fs::remove_dir(&pin_root); // only if empty
    tracing::info!("all workers stopped; agent exiting");
    Ok(())
}

/// The metrics endpoint's listener (SO_REUSEADDR, as std binds it, so a restarted agent can
/// bind it while old connections linger in TIME_WAIT).
fn bind_metrics(
    agent: &config::Agent,
    address: std::net::SocketAddr,
) -> Result<std::net::TcpListener, StartError> {
    std::net::TcpListener::bind(address).map_err(|source| StartError::Metrics {
        at: agent
            .metrics_at
            .as_ref()
            .map_or_else(|| "[agent] metrics".to_string(), |l| l.to_string()),
        address,
        source,
    })
}

fn bind_control(path: &Path) -> Result<UnixListener, StartError> {
    let err = |source| StartError::Control {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        // A stale socket from an agent that died; a live one answers, and then we must not
        // steal its socket.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is running and answers on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Created 0600 from the start.
    let listener = crate::sys::socket::bind_unix_private(path).map_err(err)?;
    UnixListener::from_std(listener).map_err(err)
}

async fn serve_control(listener: UnixListener, tx: mpsc::UnboundedSender<Event>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r).take(64 * 1024);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let mut reexec = false;
            let response = match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::Error {
                    message: format!("invalid request: {e}"),
                },
                Ok(request) => {
                    reexec = request == Request::Reexec;
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Event::Control { request, reply }).is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            if let Ok(mut text) = serde_json::to_string(&response) {
                text.push('\n');
                let _ = w.write_all(text.as_bytes()).await;
            }
            if reexec && matches!(response, Response::Ok { .. }) {
                // The reply is in the socket's buffer; the client reads it after the exec too.
                let _ = tx.send(Event::ReexecNow);
            }
        });
    }
}

use tokio::io::AsyncReadExt as _;

impl Supervisor {
    fn notify(&self, state: &str) {
        if let Err(e) = self.notifier.notify(state) {
            tracing::warn!("{e}");
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: spreads restarts of many slots; not for anything secret.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn live_processes(&self) -> usize {
        self.apps
            .values()
            .map(|a| {
                a.removed.len()
                    + a.slots
                        .iter()
                        .map(|s| s.retired.len() + usize::from(s.current.is_some()))
                        .sum::<usize>()
                    + usize::from(matches!(a.phase, Phase::PreStart { .. }))
            })
            .sum()
    }

    fn add_app(&mut self, cfg: App, p: Prepared) {
        self.add_app_as(cfg, p, true);
    }

    /// Add an app; `prestart` runs its pre-start steps and starts its workers (an app adopted
    /// from the agent's previous image has them running already).
    fn add_app_as(&mut self, cfg: App, p: Prepared, prestart: bool) {
        let (cancel, _) = watch::channel(false);
        let name = cfg.name.clone();
        let mut steering = p
            .steering
            .unwrap_or_else(|| GroupSteering::load(&cfg, &self.config.agent.bpf_pin_dir));
        if let Err(e) = steering.install(&p.sockets) {
            tracing::error!(app = %name, "attaching connection steering: {e}");
        }
        tracing::info!(app = %name, "connection steering: {}", steering.describe());
        let mut refused = None;
        if let Some(why) = self.cgroups.refusal(&cfg) {
            if self.config.agent.enforce_limits {
                tracing::error!(app = %name, "{why}");
                refused = Some(why);
            } else {
                tracing::warn!(app = %name, "{why}; running it uncapped (enforce_limits = false)");
            }
        }
        let cg = match self.cgroups.app(name.as_str()) {
            None => None,
            Some(Ok(cg)) => Some(cg),
            Some(Err(e)) => {
                let why = format!("app {name}: its cgroup: {e}");
                if cgroups::needed(&cfg).is_empty() || !self.config.agent.enforce_limits {
                    tracing::warn!(app = %name, "{why}; its workers run in the agent's cgroup");
                } else {
                    tracing::error!(app = %name, "{why}");
                    refused = Some(why);
                }
                None
            }
        };
        let rt = AppRt {
            slots: p.sockets.into_iter().map(Slot::new).collect(),
            launch: p.launch,
            cfg,
            phase: Phase::Running,
            removed: Vec::new(),
            note: None,
            cancel,
            steering,
            cg,
            front_totals: [0; crate::tls::stats::COUNT],
            cert_watch: None,
        };
        self.apps.insert(name.clone(), rt);
        self.watch_certs(&name);
        match refused {
            Some(why) => {
                if let Some(app) = self.apps.get_mut(&name) {
                    app.phase = Phase::Failed(why);
                }
            }
            None if prestart => self.begin_prestart(&name, None),
            None => {}
        }
    }

    /// Run the app's pre-start steps (those of `rollout` when replacing), then start workers.
    fn begin_prestart(&mut self, name: &AppName, rollout: Option<Box<Rollout>>) {
        let token = self.id();
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let cfg = rollout.as_ref().map(|r| &r.cfg).unwrap_or(&app.cfg);
        let plan = match prestart_plan(cfg) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Event::PreStartDone {
                    app: name.clone(),
                    token,
                    result: Err(e),
                });
                app.phase = Phase::PreStart { token, rollout };
                return;
            }
        };
        app.phase = Phase::PreStart { token, rollout };
        let leaf = match app.cg.as_ref().map(|cg| cg.named_leaf("prestart")) {
            Some(Ok(leaf)) => Some(leaf),
            Some(Err(e)) => {
                tracing::warn!(app = %name, "pre-start steps run in the agent's cgroup: {e}");
                None
            }
            None => None,
        };
        let mut cancel = app.cancel.subscribe();
        let app_name = name.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = prestart::run_steps(app_name.to_string(), plan, leaf) => r,
                _ = cancel.wait_for(|c| *c) => Err("cancelled: the agent is stopping".to_string()),
            };
            let _ = tx.send(Event::PreStartDone {
                app: app_name,
                token,
                result,
            });
        });
    }

    fn handle(&mut self, ev: Event) {
        self.dispatch(ev);
        self.sync_steering();
    }

    /// Tell every app's steering which slots are ready: a slot whose worker (or, during a
    /// rolling replacement, whose previous worker) is ready and not stopping.
    fn sync_steering(&mut self) {
        for app in self.apps.values_mut() {
            let eligible: Vec<u32> = app
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.current
                        .iter()
                        .chain(s.retired.iter())
                        .any(|w| w.state == WorkerState::Ready)
                })
                .map(|(i, _)| i as u32)
                .collect();
            app.steering.sync(eligible);
        }
    }

    /// Publish every slot's load; whether any app has traffic.
    fn tick(&mut self) -> bool {
        let mut active = false;
        for app in self.apps.values_mut() {
            let sockets: Vec<(u32, &Arc<OwnedFd>)> = app
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u32, &s.socket))
                .collect();
            active |= app.steering.tick(&sockets);
        }
        active
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Exited { app, id, status } => self.on_exited(&app, id, status),
            Event::Ready { app, id, result } => self.on_ready(&app, id, result),
            Event::RestartDue { app, slot, token } => {
                if self.shutting_down {
                    return;
                }
                let due = self
                    .apps
                    .get_mut(&app)
                    .and_then(|a| a.slots.get_mut(slot as usize))
                    .is_some_and(|s| {
                        let due = s.waiting == Some(token);
                        if due {
                            s.waiting = None;
                        }
                        due
                    });
                if due {
                    self.start_worker(&app, slot);
                }
            }
            Event::KillDue { app, id } => {
                if let Some(w) = self.apps.get_mut(&app).and_then(|a| find_worker(a, id)) {
                    tracing::warn!(app = %app, worker = w.slot, pid = w.process.pid(),
                        "did not exit within stop_timeout; sending SIGKILL");
                    let _ = w.process.signal(libc::SIGKILL);
                }
            }
            Event::PreStartDone { app, token, result } => {
                self.on_prestart_done(&app, token, result)
            }
            Event::MemoryEvents { app, id } => self.on_memory_events(&app, id),
            Event::CertsChanged { app } => self.on_certs_changed(&app),
            Event::Control { request, reply } => {
                let response = self.control(request);
                let _ = reply.send(response);
            }
            Event::ReexecNow => self.reexec_now(),
        }
    }

    fn on_prestart_done(&mut self, name: &AppName, token: u64, result: Result<(), String>) {
        let shutting_down = self.shutting_down;
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let rollout = match &mut app.phase {
            Phase::PreStart { token: t, rollout } if *t == token => rollout.take(),
            _ => return,
        };
        if shutting_down {
            app.phase = Phase::Stopping;
            return;
        }
        let had_workers = app.slots.iter().any(|s| s.current.is_some());
        match result {
            Err(reason) => {
                tracing::error!(app = %name, "{reason}; no worker of this version will start");
                if rollout.is_some() && had_workers {
                    app.phase = Phase::Running;
                    app.note = Some(format!(
                        "reload failed: {reason}; the previous version keeps serving"
                    ));
                } else {
                    app.phase = Phase::Failed(reason);
                }
            }
            Ok(()) => {
                app.phase = Phase::Running;
                app.note = None;
                match rollout {
                    None => {
                        for s in &mut app.slots {
                            s.pending_replace = true;
                        }
                    }
                    Some(r) => self.apply_rollout(name, *r),
                }
                self.advance_rollout(name);
            }
        }
    }

    /// Install a new version's config and sockets; every slot is then replaced one by one.
    fn apply_rollout(&mut self, name: &AppName, r: Rollout) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        app.cfg = r.cfg;
        app.launch = r.launch;
        let new_count = r.sockets.len();
        let new_group = r.steering.is_some();
        if let Some(mut st) = r.steering {
            if let Err(e) = st.install(&r.sockets) {
                tracing::error!(app = %name, "attaching connection steering: {e}");
            }
            tracing::info!(app = %name, "connection steering: {}", st.describe());
            app.steering = st;
        }
        // Slots beyond the new count go away: their workers stop.
        remove_slots(&self.tx, name, app, new_count);
        for (i, sock) in r.sockets.into_iter().enumerate() {
            if !new_group && i >= app.slots.len() {
                if let Err(e) = app.steering.set_socket(i as u32, &sock) {
                    tracing::error!(app = %name, worker = i, "registering its socket for steering: {e}");
                }
            }
            if let Some(slot) = app.slots.get_mut(i) {
                slot.socket = sock;
                slot.pending_replace = true;
                slot.gave_up = None;
                slot.history.reset();
            } else {
                let mut slot = Slot::new(sock);
                slot.pending_replace = true;
                app.slots.push(slot);
            }
        }
    }

    /// Start the next replacement of a rolling update, one slot at a time: a slot's new worker
    /// must be ready before its old one is told to stop and the next slot begins.
    fn advance_rollout(&mut self, name: &AppName) {
        loop {
            let Some(app) = self.apps.get_mut(name) else {
                return;
            };
            if !matches!(app.phase, Phase::Running) || self.shutting_down {
                return;
            }
            let in_flight = app
                .slots
                .iter()
                .any(|s| s.retired.iter().any(|w| w.state != WorkerState::Stopping));
            if in_flight {
                return;
            }
            let Some(i) = app.slots.iter().position(|s| s.pending_replace) else {
                return;
            };
            let slot = &mut app.slots[i];
            slot.pending_replace = false;
            slot.waiting = None;
            let replacing = slot.current.take();
            let had_old = replacing.is_some();
            if let Some(old) = replacing {
                slot.retired.push(old);
            }
            self.start_worker(name, i as u32);
            if had_old {
                return; // wait for the new worker to be ready
            }
        }
    }

    fn start_worker(&mut self, name: &AppName, slot_idx: u32) {
        let id = self.id();
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(slot) = app.slots.get_mut(slot_idx as usize) else {
            return;
        };
        let mut extra = vec![
            ("LISTEN_FDS".to_string(), "1".to_string()),
            ("LISTEN_FDNAMES".to_string(), name.to_string()),
            ("CORRAL_APP".to_string(), name.to_string()),
            ("CORRAL_WORKER".to_string(), slot_idx.to_string()),
        ];
        let mut notify = None;
        if app.cfg.workers.ready == config::Ready::Notify {
            match ready::notify_socket(id) {
                Ok((sock, addr)) => {
                    extra.push(("NOTIFY_SOCKET".to_string(), addr));
                    notify = Some(sock);
                }
                Err(e) => tracing::error!(app = %name, worker = slot_idx, "{e}"),
            }
        }
        let started = Instant::now();
        let leaf = match app
            .cg
            .as_ref()
            .map(|cg| cg.leaf(format!("{slot_idx}-{id}")))
        {
            None => Ok(None),
            Some(Ok(leaf)) => match leaf.set_limits(&cgroups::limits(&app.cfg)) {
                Ok(skipped) => {
                    for s in skipped {
                        tracing::warn!(app = %name, worker = slot_idx, "not enforced: {s}");
                    }
                    Ok(Some(leaf))
                }
                Err(e) => Err(format!("setting its cgroup limits: {e}")),
            },
            Some(Err(e)) => Err(format!("creating its cgroup: {e}")),
        };
        let started_proc = match leaf {
            Ok(leaf) => app
                .launch
                .start(
                    Some(&slot.socket),
                    &extra,
                    leaf.as_ref().map(|l| l.dir_fd()),
                )
                .map(|p| (p, leaf)),
            Err(e) => Err(e),
        };
        match started_proc {
            Ok((
                launch::Started {
                    process,
                    stdout: out,
                    stderr: err,
                    counters,
                    counters_fd,
                },
                leaf,
            )) => {
                let pid = process.pid();
                tracing::info!(app = %name, worker = slot_idx, pid, "worker started");
                let handover = match handoff::WorkerFds::keep(&out, &err, counters_fd) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(app = %name, worker = slot_idx, "{e}; `corral reexec` will restart this worker");
                        handoff::WorkerFds::default()
                    }
                };
                follow(&tx, name, slot_idx, id, &process, out, err);
                let (ready_cfg, address, timeout, listener) = (
                    app.cfg.workers.ready.clone(),
                    app.cfg.listen.address,
                    app.cfg.workers.ready_timeout,
                    slot.socket.clone(),
                );
                let app_name = name.clone();
                let notify = notify.map(|sock| ready::Notify {
                    sock,
                    worker_pid: pid,
                });
                let probe = tokio::spawn(async move {
                    let result =
                        ready::wait_ready(&ready_cfg, address, slot_idx, listener, timeout, notify)
                            .await;
                    let _ = tx.send(Event::Ready {
                        app: app_name,
                        id,
                        result,
                    });
                });
                let memory_watch = watch_memory(&self.tx, name, &app.cfg, slot_idx, id, &leaf);
                slot.current = Some(Worker {
                    id,
                    slot: slot_idx,
                    process,
                    state: WorkerState::Starting,
                    started,
                    _socket: slot.socket.clone(),
                    expected_exit: false,
                    not_ready: None,
                    probe: probe.abort_handle(),
                    leaf,
                    memory_watch,
                    high_seen: 0,
                    recycling: false,
                    counters,
                    handover,
                });
            }
            Err(reason) => {
                tracing::error!(app = %name, worker = slot_idx, "worker could not start: {reason}");
                self.after_failure(
                    name,
                    slot_idx,
                    reason,
                    ExitStatus::Exited(127),
                    Duration::ZERO,
                );
            }
        }
    }

    fn on_ready(&mut self, name: &AppName, id: u64, result: Result<(), String>) {
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(slot_idx) = slot_of_current(app, id) else {
            return;
        };
        let slot = &mut app.slots[slot_idx];
        let Some(w) = slot.current.as_mut() else {
            return;
        };
        if w.state != WorkerState::Starting {
            return;
        }
        match result {
            Ok(()) => {
                w.state = WorkerState::Ready;
                tracing::info!(app = %name, worker = w.slot, pid = w.process.pid(),
                    "worker ready in {}", restart::format_duration(w.started.elapsed()));
                for old in &mut slot.retired {
                    if old.state != WorkerState::Stopping {
                        stop_worker(&tx, &app.cfg, name, old);
                    }
                }
                self.advance_rollout(name);
            }
            Err(reason) => {
                tracing::warn!(app = %name, worker = w.slot, pid = w.process.pid(),
                    "worker not ready: {reason}; stopping it");
                w.not_ready = Some(format!("not ready: {reason}"));
                stop_worker(&tx, &app.cfg, name, w);
                // Stopping for not being ready is a failure, not a requested stop.
                w.expected_exit = false;
            }
        }
    }

    fn on_exited(&mut self, name: &AppName, id: u64, status: Result<WaitStatus, String>) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        // An OOM kill shows as SIGKILL; the leaf's memory.events says who did it.
        let cap = app.cfg.workers.memory_max;
        let mut oom = None;
        let mut oom_slot = None;
        let mut final_counts = None;
        if let Some(w) = find_worker(app, id) {
            if let Some(c) = w.counters.take() {
                final_counts = Some(
                    (0..crate::tls::stats::COUNT)
                        .map(|i| c.get(i))
                        .collect::<Vec<u64>>(),
                );
            }
            if let Some(leaf) = w.leaf.take() {
                if let (Ok(ev), Some(cap)) = (leaf.read_memory_events(), cap) {
                    if ev.oom_kill > 0 || ev.oom_group_kill > 0 {
                        oom = Some(format!("oom-killed at memory.max = {cap}"));
                        oom_slot = Some(w.slot as usize);
                    }
                }
                cgroups::spawn_teardown(leaf);
            }
        }
        // A removed slot's worker is not counted: its slot is gone.
        if let Some(slot) = oom_slot.and_then(|i| app.slots.get_mut(i)) {
            if !app.removed.iter().any(|w| w.id == id) {
                slot.oom_kills += 1;
            }
        }
        if let Some(counts) = final_counts {
            // What an exited front counted stays in the app's totals (not what was open).
            for (i, v) in counts.into_iter().enumerate() {
                if i != crate::tls::stats::Stat::Open as usize {
                    app.front_totals[i] += v;
                }
            }
        }
        let describe = |status: &Result<WaitStatus, String>| match (&oom, status) {
            (Some(o), _) => o.clone(),
            (None, Ok(s)) => exit_status(*s).to_string(),
            (None, Err(e)) => format!("lost track of it: {e}"),
        };
        // Retired or removed workers: expected.
        if let Some(pos) = app.removed.iter().position(|w| w.id == id) {
            let w = app.removed.remove(pos);
            tracing::info!(app = %name, worker = w.slot, pid = w.process.pid(), "worker stopped ({})", describe(&status));
            // An app removed by a reload goes once its last worker has.
            if matches!(app.phase, Phase::Stopping)
                && !self.shutting_down
                && app.slots.is_empty()
                && app.removed.is_empty()
            {
                if let Some(app) = self.apps.remove(name) {
                    if let Some(cg) = app.cg {
                        self.cgroups.remove_app(cg);
                    }
                }
            }
            return;
        }
        for slot in &mut app.slots {
            if let Some(pos) = slot.retired.iter().position(|w| w.id == id) {
                let w = slot.retired.remove(pos);
                tracing::info!(app = %name, worker = w.slot, pid = w.process.pid(), "old worker stopped ({})", describe(&status));
                if w.state != WorkerState::Stopping {
                    // It died while still serving beside its replacement: nothing to restart,
                    // the replacement takes the slot.
                    slot.last_exit = Some(describe(&status));
                }
                self.advance_rollout(name);
                return;
            }
        }
        let Some(slot_idx) = slot_of_current(app, id) else {
            return;
        };
        let slot = &mut app.slots[slot_idx];
        let Some(w) = slot.current.take() else {
            return;
        };
        let ran_for = w.started.elapsed();
        if w.expected_exit {
            tracing::info!(app = %name, worker = w.slot, pid = w.process.pid(), "worker stopped ({})", describe(&status));
            slot.last_exit = Some(describe(&status));
            if !self.shutting_down && slot.pending_replace {
                self.advance_rollout(name);
            }
            return;
        }
        // The dead worker's listener may hold connections it never accepted. With the migrate
        // program, closing it moves them to ready workers at once; the replacement gets a fresh
        // socket. (Without it the slot keeps its socket and they wait for the replacement.)
        if slot.retired.is_empty() && app.steering.migrates() && !self.shutting_down {
            self.renew_socket(name, slot_idx);
        }
        let exit = match &status {
            Ok(s) => exit_status(*s),
            Err(_) => ExitStatus::Exited(127),
        };
        let mut reason = describe(&status);
        if let Some(nr) = &w.not_ready {
            reason = format!("{nr} ({reason})");
        }
        tracing::warn!(app = %name, worker = w.slot, pid = w.process.pid(),
            "worker exited after {}: {reason}", restart::format_duration(ran_for));
        if self.shutting_down {
            return;
        }
        self.after_failure(name, slot_idx as u32, reason, exit, ran_for);
    }

    /// A worker's memory.events changed: crossing memory.high recycles it (its replacement
    /// starts and becomes ready first, like a rolling restart of that one slot).
    fn on_memory_events(&mut self, name: &AppName, id: u64) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let high = app.cfg.workers.memory_high;
        let Some(slot_idx) = slot_of_current(app, id) else {
            return;
        };
        let slot = &mut app.slots[slot_idx];
        let Some(w) = slot.current.as_mut() else {
            return;
        };
        let Some(ev) = w.leaf.as_ref().and_then(|l| l.read_memory_events().ok()) else {
            return;
        };
        if ev.high <= w.high_seen {
            return;
        }
        w.high_seen = ev.high;
        if w.recycling || w.state != WorkerState::Ready {
            return;
        }
        w.recycling = true;
        tracing::warn!(app = %name, worker = w.slot, pid = w.process.pid(),
            "crossed memory.high = {}; replacing it", high.map(|h| h.to_string()).unwrap_or_default());
        slot.pending_replace = true;
        self.advance_rollout(name);
    }

    /// Give slot `slot_idx` a fresh listening socket; the old one closes when its last user
    /// (the dead worker's handle) is dropped, after the slot has left the ready set.
    fn renew_socket(&mut self, name: &AppName, slot_idx: usize) {
        self.sync_steering();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        match socket::reuseport_listener(app.cfg.listen.address, app.cfg.listen.backlog) {
            Ok(fd) => {
                let fd = Arc::new(fd);
                match app.steering.set_socket(slot_idx as u32, &fd) {
                    Ok(()) => app.slots[slot_idx].socket = fd,
                    Err(e) => {
                        tracing::warn!(app = %name, worker = slot_idx, "keeping the old socket: {e}")
                    }
                }
            }
            Err(e) => tracing::warn!(app = %name, worker = slot_idx, "keeping the old socket: {e}"),
        }
    }

    /// A worker is gone without being asked to: ask the policy what now.
    fn after_failure(
        &mut self,
        name: &AppName,
        slot_idx: u32,
        reason: String,
        exit: ExitStatus,
        ran_for: Duration,
    ) {
        let jitter = self.jitter();
        let token = self.id();
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        if matches!(app.phase, Phase::Stopping | Phase::Failed(_)) {
            return;
        }
        let policy = app.cfg.restart;
        let Some(slot) = app.slots.get_mut(slot_idx as usize) else {
            return;
        };
        slot.last_exit = Some(reason.clone());
        let decision = restart::on_exit(
            &policy,
            &mut slot.history,
            &exit,
            ran_for,
            Instant::now(),
            jitter,
        );
        match decision {
            Decision::Restart { after } => {
                slot.restarts += 1;
                if after.is_zero() {
                    self.start_worker(name, slot_idx);
                } else {
                    tracing::info!(app = %name, worker = slot_idx,
                        "restarting in {}", restart::format_duration(after));
                    slot.waiting = Some(token);
                    let app_name = name.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(Event::RestartDue {
                            app: app_name,
                            slot: slot_idx,
                            token,
                        });
                    });
                }
            }
            Decision::GiveUp { reason: why } => {
                let why = if why.contains(&reason) {
                    why
                } else {
                    format!("{why} ({reason})")
                };
                tracing::error!(app = %name, worker = slot_idx,
                    "crash loop: {why}; the slot stays down until `corral restart {name}` or a reload");
                slot.gave_up = Some(why.clone());
                slot.pending_replace = false;
                let any_serving = app.slots.iter().any(|s| {
                    s.current.is_some() || s.retired.iter().any(|w| w.state == WorkerState::Ready)
                });
                if any_serving {
                    for s in &mut app.slots {
                        if s.pending_replace {
                            s.pending_replace = false;
                            app.note = Some(format!(
                                "rolling update stopped: worker {slot_idx} gave up; the previous version keeps serving the other slots"
                            ));
                        }
                    }
                }
            }
            Decision::Stay { reason: why } => {
                tracing::info!(app = %name, worker = slot_idx, "not restarting: {why}");
            }
        }
    }

    fn shutdown(&mut self, why: &str) {
        if self.shutting_down {
            return;
        }
        tracing::info!("{why}: stopping all workers");
        self.shutting_down = true;
        self.notify("STOPPING=1");
        let tx = self.tx.clone();
        for (name, app) in &mut self.apps {
            let _ = app.cancel.send(true);
            if !matches!(app.phase, Phase::PreStart { .. }) {
                app.phase = Phase::Stopping;
            }
            for slot in &mut app.slots {
                slot.waiting = None;
                slot.pending_replace = false;
                for w in slot.current.iter_mut().chain(slot.retired.iter_mut()) {
                    if w.state != WorkerState::Stopping || !w.expected_exit {
                        stop_worker(&tx, &app.cfg, name, w);
                    }
                }
            }
        }
    }

    /// Re-read the config and apply what changed. All-or-nothing: every new socket is bound and
    /// every program found before anything running is touched.
    fn reload(&mut self, only: Option<&AppName>) -> Result<String, String> {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let result = self.reload_inner(only);
        self.notify("READY=1");
        result
    }

    fn reload_inner(&mut self, only: Option<&AppName>) -> Result<String, String> {
        let new = config::load(&self.config_path, &SystemLookup).map_err(|e| e.to_string())?;
        if let Some(name) = only {
            if !new.apps.contains_key(name) && !self.apps.contains_key(name) {
                return Err(format!("no app named `{name}` in the config"));
            }
        }
        if new.agent != self.config.agent {
            tracing::warn!("changes to [agent] take effect when the agent restarts");
        }
        enum Change {
            Add(App, Prepared),
            Scale(App, Prepared),
            Replace(App, Prepared),
            Remove,
        }
        let mut changes: Vec<(AppName, Change)> = Vec::new();
        for (name, cfg) in &new.apps {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let count = worker_count(cfg);
            match self.apps.get(name) {
                None => changes.push((
                    name.clone(),
                    Change::Add(
                        cfg.clone(),
                        prepare(cfg, count, &[], false, &new.agent.bpf_pin_dir)?,
                    ),
                )),
                Some(rt) if rt.cfg == *cfg && !bundle_changed(rt, cfg)? => {}
                Some(rt) => {
                    let existing: Vec<_> = if rt.cfg.listen.address == cfg.listen.address {
                        rt.slots.iter().map(|s| s.socket.clone()).collect()
                    } else {
                        Vec::new()
                    };
                    let keep = rt.cfg.listen.steering == cfg.listen.steering;
                    let p = prepare(cfg, count, &existing, keep, &self.config.agent.bpf_pin_dir)?;
                    prestart_plan(cfg)?;
                    let mut same_but_count = rt.cfg.clone();
                    same_but_count.workers.count = cfg.workers.count;
                    same_but_count.workers.count_at = cfg.workers.count_at.clone();
                    if same_but_count == *cfg && !bundle_changed(rt, cfg)? {
                        changes.push((name.clone(), Change::Scale(cfg.clone(), p)));
                    } else {
                        changes.push((name.clone(), Change::Replace(cfg.clone(), p)));
                    }
                }
            }
        }
        for name in self.apps.keys() {
            if !new.apps.contains_key(name) && only.is_none_or(|o| o == name) {
                changes.push((name.clone(), Change::Remove));
            }
        }
        // Commit: nothing below fails.
        let mut summary = Vec::new();
        for (name, change) in changes {
            match change {
                Change::Add(cfg, p) => {
                    summary.push(format!("added {name}"));
                    self.add_app(cfg, p);
                }
                Change::Scale(cfg, p) => {
                    summary.push(format!("scaled {name} to {}", p.sockets.len()));
                    self.scale(&name, cfg, p.sockets);
                }
                Change::Replace(cfg, p) => {
                    summary.push(format!("replacing {name}"));
                    let rollout = Rollout {
                        cfg,
                        launch: p.launch,
                        sockets: p.sockets,
                        steering: p.steering,
                    };
                    self.begin_prestart(&name, Some(Box::new(rollout)));
                    self.watch_certs(&name);
                }
                Change::Remove => {
                    summary.push(format!("removed {name}"));
                    self.remove_app(&name);
                }
            }
        }
        match only {
            Some(name) => match new.apps.get(name) {
                Some(cfg) => {
                    self.config.apps.insert(name.clone(), cfg.clone());
                }
                None => {
                    self.config.apps.remove(name);
                }
            },
            None => self.config = new,
        }
        if summary.is_empty() {
            Ok("no changes".into())
        } else {
            Ok(summary.join(", "))
        }
    }

    /// (Re)start the watch of a TLS front's certificate directories, for its current config.
    fn watch_certs(&mut self, name: &AppName) {
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        app.cert_watch = None;
        let tls = match &app.cfg.role {
            config::Role::TlsFront { tls, .. } => tls,
            config::Role::Workers => return,
        };
        let dirs = cert_dirs(tls);
        match crate::sys::inotify::Watch::dirs(&dirs) {
            Ok(watch) => {
                let app_name = name.clone();
                let task = tokio::spawn(async move {
                    while watch.changed().await.is_ok() {
                        tokio::time::sleep(CERT_SETTLE).await;
                        if tx
                            .send(Event::CertsChanged {
                                app: app_name.clone(),
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                app.cert_watch = Some(AbortOnDrop(task.abort_handle()));
            }
            Err(e) => tracing::warn!(
                app = %name,
                "certificate changes are not picked up without a reload: {e}"
            ),
        }
    }

    /// A front's certificate files changed: if they now hold something else that is valid,
    /// replace its processes one by one (open connections finish on the old certificate);
    /// if invalid, say so and keep serving the old one.
    fn on_certs_changed(&mut self, name: &AppName) {
        let Some(app) = self.apps.get(name) else {
            return;
        };
        if !matches!(app.phase, Phase::Running) {
            return;
        }
        let cfg = app.cfg.clone();
        match bundle_changed(app, &cfg) {
            Ok(false) => return,
            Err(e) => {
                tracing::error!(
                    app = %name,
                    "certificate files changed but cannot be used: {e}; still serving the \
                     previous certificate"
                );
                return;
            }
            Ok(true) => {}
        }
        let existing: Vec<_> = app.slots.iter().map(|s| s.socket.clone()).collect();
        let count = existing.len() as u32;
        match prepare(&cfg, count, &existing, true, &self.config.agent.bpf_pin_dir) {
            Ok(p) => {
                tracing::info!(app = %name, "certificates changed: replacing the front processes one by one");
                let rollout = Rollout {
                    cfg,
                    launch: p.launch,
                    sockets: p.sockets,
                    steering: p.steering,
                };
                self.begin_prestart(name, Some(Box::new(rollout)));
            }
            Err(e) => tracing::error!(app = %name, "certificate change not applied: {e}"),
        }
    }

    fn scale(&mut self, name: &AppName, cfg: App, sockets: Vec<Arc<OwnedFd>>) {
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        app.cfg = cfg;
        remove_slots(&tx, name, app, sockets.len());
        let running = matches!(app.phase, Phase::Running);
        let old = app.slots.len();
        for (i, sock) in sockets.into_iter().enumerate().skip(old) {
            if let Err(e) = app.steering.set_socket(i as u32, &sock) {
                tracing::error!(app = %name, worker = i, "registering its socket for steering: {e}");
            }
            let mut slot = Slot::new(sock);
            slot.pending_replace = true;
            app.slots.push(slot);
        }
        if running {
            self.advance_rollout(name);
        }
    }

    fn remove_app(&mut self, name: &AppName) {
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let _ = app.cancel.send(true);
        app.phase = Phase::Stopping;
        remove_slots(&tx, name, app, 0);
        // The runtime entry stays until its workers are gone, so their exits are recognised.
        if app.removed.is_empty() {
            self.apps.remove(name);
        }
    }

    fn control(&mut self, request: Request) -> Response {
        let err = |message: String| Response::Error { message };
        let app_name = |s: &str| AppName::new(s).map_err(|e| Response::Error { message: e });
        if self.shutting_down && !matches!(request, Request::Status { .. }) {
            return err("the agent is stopping".into());
        }
        match request {
            Request::Status { app } => {
                let apps = self
                    .apps
                    .iter()
                    .filter(|(n, _)| app.as_deref().is_none_or(|a| a == n.as_str()))
                    .map(|(n, a)| app_status(n, a))
                    .collect::<Vec<_>>();
                if let Some(a) = app {
                    if apps.is_empty() {
                        return err(format!("no app named `{a}`"));
                    }
                }
                Response::Status {
                    apps,
                    agent: Some(crate::control::AgentInfo {
                        pid: std::process::id(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        generation: self.generation,
                        reexec_error: self.reexec_error.clone(),
                    }),
                }
            }
            Request::Reexec => match self.prepare_reexec() {
                Ok(message) => Response::Ok { message },
                Err(message) => Response::Error {
                    message: format!("re-exec refused, nothing changed: {message}"),
                },
            },
            Request::Reload { app } => {
                let name = match app.as_deref().map(app_name).transpose() {
                    Ok(n) => n,
                    Err(e) => return e,
                };
                match self.reload(name.as_ref()) {
                    Ok(message) => Response::Ok { message },
                    Err(e) => err(format!("reload refused, running apps untouched: {e}")),
                }
            }
            Request::Restart { app, worker } => {
                let name = match app_name(&app) {
                    Ok(n) => n,
                    Err(e) => return e,
                };
                let Some(rt) = self.apps.get_mut(&name) else {
                    return err(format!("no app named `{app}`"));
                };
                if let Some(w) = worker {
                    if w as usize >= rt.slots.len() {
                        return err(format!("app `{app}` has workers 0..{}", rt.slots.len()));
                    }
                }
                match rt.phase {
                    Phase::Failed(_) => {
                        self.begin_prestart(&name, None);
                        return Response::Ok {
                            message: format!(
                                "{app}: running pre-start steps again, then starting workers"
                            ),
                        };
                    }
                    Phase::PreStart { .. } => {
                        return err(format!("{app} is running its pre-start steps"));
                    }
                    Phase::Stopping => return err(format!("{app} is stopping")),
                    Phase::Running => {}
                }
                rt.note = None;
                for (i, s) in rt.slots.iter_mut().enumerate() {
                    if worker.is_none_or(|w| w as usize == i) {
                        s.pending_replace = true;
                        s.gave_up = None;
                        s.history.reset();
                    }
                }
                self.advance_rollout(&name);
                Response::Ok {
                    message: match worker {
                        Some(w) => format!("restarting {app}/{w}"),
                        None => format!("rolling restart of {app}"),
                    },
                }
            }
            Request::Scale { app, count } => {
                let name = match app_name(&app) {
                    Ok(n) => n,
                    Err(e) => return e,
                };
                let Some(rt) = self.apps.get(&name) else {
                    return err(format!("no app named `{app}`"));
                };
                if count == 0 || count > socket::PROBE_PORTS as u32 {
                    return err(format!(
                        "worker count must be 1..={}, got {count}",
                        socket::PROBE_PORTS
                    ));
                }
                let mut cfg = rt.cfg.clone();
                cfg.workers.count = WorkerCount::Fixed(
                    std::num::NonZeroU32::new(count).unwrap_or(std::num::NonZeroU32::MIN),
                );
                let existing: Vec<_> = rt.slots.iter().map(|s| s.socket.clone()).collect();
                match prepare(&cfg, count, &existing, true, &self.config.agent.bpf_pin_dir) {
                    Ok(p) => {
                        self.scale(&name, cfg, p.sockets);
                        Response::Ok {
                            message: format!("scaled {app} to {count} workers (until the next reload re-reads workers.count)"),
                        }
                    }
                    Err(e) => err(e),
                }
            }
        }
    }
}

/// Log a worker's output and report its exit (started here, or adopted from the agent's
/// previous image).
fn follow(
    tx: &mpsc::UnboundedSender<Event>,
    name: &AppName,
    slot_idx: u32,
    id: u64,
    process: &Arc<Process>,
    out: OwnedFd,
    err: OwnedFd,
) {
    let pid = process.pid();
    for (fd, stream) in [(out, "stdout"), (err, "stderr")] {
        output::forward(
            fd,
            Tag {
                app: name.to_string(),
                who: format!("worker={slot_idx}"),
                pid,
                stream,
            },
        );
    }
    let waiter = process.clone();
    let (app_name, tx) = (name.clone(), tx.clone());
    tokio::spawn(async move {
        // Without a cgroup this is what removes the worker's leftover children.
        let status = waiter
            .wait_and_kill_group()
            .await
            .map_err(|e| e.to_string());
        let _ = tx.send(Event::Exited {
            app: app_name,
            id,
            status,
        });
    });
}

/// With `memory_high`, watch the worker leaf's memory.events so crossing it recycles the
/// worker.
fn watch_memory(
    tx: &mpsc::UnboundedSender<Event>,
    name: &AppName,
    cfg: &App,
    slot_idx: u32,
    id: u64,
    leaf: &Option<crate::sys::cgroup::Leaf>,
) -> Option<tokio::task::AbortHandle> {
    let (Some(leaf), Some(_)) = (leaf, cfg.workers.memory_high) else {
        return None;
    };
    let path = leaf.events_path(crate::sys::cgroup::EventsFile::Memory);
    match crate::sys::inotify::Watch::new(&path) {
        Ok(watch) => {
            let (tx, app_name) = (tx.clone(), name.clone());
            let task = tokio::spawn(async move {
                while watch.changed().await.is_ok() {
                    let ev = Event::MemoryEvents {
                        app: app_name.clone(),
                        id,
                    };
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            });
            Some(task.abort_handle())
        }
        Err(e) => {
            tracing::warn!(app = %name, worker = slot_idx, "memory_high will not recycle it: {e}");
            None
        }
    }
}

/// Remove the slots from `keep` on: their workers are told to stop and wait in `removed` until
/// they exit (their sockets close with them).
fn remove_slots(tx: &mpsc::UnboundedSender<Event>, name: &AppName, app: &mut AppRt, keep: usize) {
    while app.slots.len() > keep {
        let Some(mut slot) = app.slots.pop() else {
            break;
        };
        for mut w in slot
            .current
            .take()
            .into_iter()
            .chain(slot.retired.drain(..))
        {
            stop_worker(tx, &app.cfg, name, &mut w);
            app.removed.push(w);
        }
    }
}

/// The slot whose current (not retired) worker is `id`.
fn slot_of_current(app: &AppRt, id: u64) -> Option<usize> {
    app.slots
        .iter()
        .position(|s| s.current.as_ref().is_some_and(|w| w.id == id))
}

fn find_worker(app: &mut AppRt, id: u64) -> Option<&mut Worker> {
    if let Some(w) = app.removed.iter_mut().find(|w| w.id == id) {
        return Some(w);
    }
    app.slots
        .iter_mut()
        .flat_map(|s| s.current.iter_mut().chain(s.retired.iter_mut()))
        .find(|w| w.id == id)
}

/// SIGTERM now, SIGKILL after the app's stop_timeout.
fn stop_worker(tx: &mpsc::UnboundedSender<Event>, cfg: &App, name: &AppName, w: &mut Worker) {
    w.expected_exit = true;
    if w.state == WorkerState::Stopping {
        return;
    }
    w.state = WorkerState::Stopping;
    tracing::info!(app = %name, worker = w.slot, pid = w.process.pid(), "stopping worker (SIGTERM)");
    let _ = w.process.signal(libc::SIGTERM);
    let (tx, app, id, timeout) = (tx.clone(), name.clone(), w.id, cfg.workers.stop_timeout);
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let _ = tx.send(Event::KillDue { app, id });
    });
}

fn app_status(name: &AppName, app: &AppRt) -> AppStatus {
    let gave_up = app.slots.iter().filter(|s| s.gave_up.is_some()).count();
    let serving = app.slots.iter().filter(|s| s.current.is_some()).count();
    let (state, reason) = match &app.phase {
        Phase::PreStart { .. } if serving == 0 => ("starting", None),
        Phase::PreStart { .. } => ("reloading", None),
        Phase::Failed(r) => ("failed", Some(r.clone())),
        Phase::Stopping => ("stopping", None),
        Phase::Running if gave_up > 0 && serving == 0 => {
            ("failed", app.slots.iter().find_map(|s| s.gave_up.clone()))
        }
        Phase::Running if gave_up > 0 => {
            ("degraded", app.slots.iter().find_map(|s| s.gave_up.clone()))
        }
        Phase::Running if app.note.is_some() => ("degraded", app.note.clone()),
        Phase::Running => ("running", None),
    };
    let mem_cap = app.cfg.workers.memory_max.map(|b| b.0);
    let picks = app.steering.slot_picks(app.slots.len() as u32);
    let conns = |slot: u32| picks.as_ref().and_then(|p| p.get(slot as usize).copied());
    let inflight = app.steering.inflight(app.slots.len() as u32);
    let inflight = |slot: u32| {
        inflight
            .as_ref()
            .and_then(|p| p.get(slot as usize).copied())
    };
    let worker = |w: &Worker, slot: &Slot| {
        let proc_stats = machine::process_stats(w.process.pid());
        let cg = w.leaf.as_ref().and_then(|l| l.stats().ok());
        WorkerStatus {
            slot: w.slot,
            pid: Some(w.process.pid()),
            state: w.state.as_str().to_string(),
            uptime_ms: Some(w.started.elapsed().as_millis() as u64),
            restarts: slot.restarts,
            last_exit: slot.last_exit.clone(),
            oom_kills: slot.oom_kills,
            rss_bytes: cg
                .as_ref()
                .and_then(|c| c.memory_current)
                .or(proc_stats.map(|s| s.rss_bytes)),
            peak_rss_bytes: cg
                .as_ref()
                .and_then(|c| c.memory_peak)
                .or(proc_stats.map(|s| s.peak_rss_bytes)),
            memory_max: mem_cap,
            cpu_ms: cg
                .as_ref()
                .map(|c| c.cpu_usage_usec / 1000)
                .or(proc_stats.map(|s| s.cpu_ms)),
            connections: conns(w.slot),
            inflight: inflight(w.slot),
            pids: cg.as_ref().and_then(|c| c.pids_current),
            cgroup: w.leaf.as_ref().map(|l| l.path().display().to_string()),
        }
    };
    let mut workers = Vec::new();
    for (i, slot) in app.slots.iter().enumerate() {
        match &slot.current {
            Some(w) => workers.push(worker(w, slot)),
            None => workers.push(WorkerStatus {
                slot: i as u32,
                pid: None,
                state: if slot.gave_up.is_some() {
                    "failed"
                } else if slot.waiting.is_some() {
                    "waiting"
                } else {
                    "exited"
                }
                .to_string(),
                uptime_ms: None,
                restarts: slot.restarts,
                last_exit: slot.gave_up.clone().or_else(|| slot.last_exit.clone()),
                oom_kills: slot.oom_kills,
                rss_bytes: None,
                peak_rss_bytes: None,
                memory_max: mem_cap,
                cpu_ms: None,
                connections: conns(i as u32),
                inflight: inflight(i as u32),
                pids: None,
                cgroup: None,
            }),
        }
        for w in &slot.retired {
            let mut st = worker(w, slot);
            st.state = if w.state == WorkerState::Stopping {
                "stopping".into()
            } else {
                "draining".into()
            };
            workers.push(st);
        }
    }
    for w in &app.removed {
        let stats = machine::process_stats(w.process.pid());
        workers.push(WorkerStatus {
            slot: w.slot,
            pid: Some(w.process.pid()),
            state: "stopping".into(),
            uptime_ms: Some(w.started.elapsed().as_millis() as u64),
            restarts: 0,
            last_exit: None,
            oom_kills: 0,
            rss_bytes: stats.map(|s| s.rss_bytes),
            peak_rss_bytes: stats.map(|s| s.peak_rss_bytes),
            memory_max: mem_cap,
            cpu_ms: stats.map(|s| s.cpu_ms),
            connections: None,
            inflight: None,
            pids: None,
            cgroup: w.leaf.as_ref().map(|l| l.path().display().to_string()),
        });
    }
    let tls = matches!(app.cfg.role, config::Role::TlsFront { .. }).then(|| {
        let mut totals = app.front_totals;
        let live = app
            .slots
            .iter()
            .flat_map(|s| s.current.iter().chain(s.retired.iter()))
            .chain(app.removed.iter());
        for w in live {
            if let Some(c) = &w.counters {
                for (i, t) in totals.iter_mut().enumerate() {
                    *t += c.get(i);
                }
            }
        }
        crate::control::FrontStats {
            counters: crate::tls::stats::NAMES
                .iter()
                .zip(totals)
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            kernel_tls_stat: machine::tls_stat(),
        }
    });
    AppStatus {
        name: name.to_string(),
        state: state.to_string(),
        tls,
        reason,
        address: app.cfg.listen.address.to_string(),
        steering: app.steering.describe(),
        steering_stats: app.steering.stats().map(|s| SteeringStats {
            selected: s.selected,
            probes: s.probes,
            migrations: s.migrations,
            select_errors: s.select_errors,
            fallbacks: s.fallbacks,
            no_eligible: s.no_eligible,
            tracked: s.tracked,
            untracked: s.untracked,
        }),
        workers,
    }
}
