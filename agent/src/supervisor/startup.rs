//! The agent's life: start (everything fallible first, then the apps), the loop, and the end
//! (every worker stopped, cgroups and pins removed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{self, AppName, Config};
use crate::sys::machine;

use super::apps::{prepare, prestart_plan};
use super::budget::worker_count;
use super::cgroups::Cgroups;
use super::keeper;
use super::ready;
use super::state::{Lifecycle, Supervisor};
use super::steering;

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

/// Options the CLI passes in.
pub struct Options {
    pub config_path: PathBuf,
}

/// Run the agent until SIGTERM or SIGINT. Errors before the first worker starts are returned
/// (nothing is left running); afterwards problems are logged and the agent keeps going.
pub async fn run(options: Options, config: Config) -> Result<(), StartError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;

    // Started by `corral reexec`: the previous image's workers, sockets and cgroups to adopt.
    let mut handed = super::adopt::take();
    // Raised before the keeper hands over a crashed agent's generation (about five descriptors
    // a worker): at a soft limit of 1024 the kernel would cut them off above ~200 workers.
    let raised = machine::raise_nofile();
    // The keeper: a crashed agent's, holding its generation to adopt, or a new one that holds
    // this agent's should it crash.
    let (keeper, kept) = match keeper::attach(&config.agent.control_socket) {
        Ok(k) => k,
        Err(keeper::AttachError::Busy(e)) => return Err(StartError::App(e)),
        Err(keeper::AttachError::Other(e)) => {
            tracing::warn!(
                "no keeper ({e}): if this agent crashes, its workers keep serving but their \
                 output pipes break, and a restarted agent starts every app afresh"
            );
            (None, None)
        }
    };
    // A keeper started just now goes with this agent if the start fails (nothing is left
    // running); a crashed agent's keeper stays and keeps its workers for the next try.
    let (mut new_keeper, crashed_keeper) = match kept {
        None => (StopOnError(keeper), None),
        Some(_) => (StopOnError(None), keeper),
    };
    match (&handed, kept) {
        // A re-exec hands over by itself; the keeper's copies are closed.
        (Some(_), Some(k)) => super::adopt::discard(k.state),
        (Some(_), None) | (None, None) => {}
        (None, Some(k)) => {
            tracing::warn!(
                "the previous agent did not stop cleanly: adopting its workers, sockets and \
                 output from the keeper"
            );
            handed = Some(k.state);
        }
    }
    if let Some([soft, hard]) = handed.as_ref().and_then(|st| st.child_nofile) {
        // Children get the limit the first image started with, not the one it raised.
        machine::set_child_nofile(machine::NofileLimit { soft, hard });
    }
    match raised {
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
        let stopping = super::adopt::stop_unknown(st, &|name| {
            AppName::new(name).is_ok_and(|n| config.apps.contains_key(&n))
        });
        // Gone before their cgroups are removed as stale (which would SIGKILL them).
        for task in stopping {
            let _ = task.await;
        }
    }
    let keep: Vec<String> = handed
        .iter()
        .flat_map(|st| st.apps.iter().map(|a| a.name.clone()))
        .collect();
    let cgroups = Cgroups::setup(&config.agent, &keep).await;
    tracing::info!("cgroups: {}", cgroups.describe());
    if let Some(why) = cgroups.container_warning() {
        tracing::warn!("no per-worker cgroups: {why}");
    }
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
    let metrics_listener =
        metrics_listener(&config.agent, handed.as_ref().and_then(|st| st.metrics))?;
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

    let mut sup = Supervisor::new(options.config_path, config.clone(), tx.clone(), cgroups);
    sup.keeper = new_keeper.0.take().or(crashed_keeper);
    // Dups of the listeners, kept to hand over on `corral reexec`.
    sup.control_fd = std::os::fd::AsFd::as_fd(&control)
        .try_clone_to_owned()
        .map_err(|e| tracing::warn!("keeping the control socket for a re-exec: {e}"))
        .ok();
    sup.metrics_fd = metrics_listener.as_ref().and_then(|l| {
        std::os::fd::AsFd::as_fd(l)
            .try_clone_to_owned()
            .map_err(|e| tracing::warn!("keeping the metrics listener for a re-exec: {e}"))
            .ok()
    });
    if let Some(st) = handed {
        sup.generation = st.generation;
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
    // What the workers wrote while no agent ran, before anything they write now.
    if let Some(k) = &sup.keeper {
        super::output::replay(k.take_spool());
    }
    for (name, p) in prepared {
        let cfg = config.apps[&name].clone();
        sup.add_app(cfg, p);
    }
    sup.sync_steering();
    sup.keep();
    tokio::spawn(super::control::serve(control, tx.clone()));
    if let Some(l) = metrics_listener {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics: http://{a}/metrics");
        }
        tokio::spawn(super::metrics::serve(l, tx.clone()));
    }
    sup.lifecycle = Lifecycle::Running;
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
            Some(ev) = rx.recv() => {
                sup.handle(ev);
                sup.keep();
            }
            _ = tokio::time::sleep_until(next_tick) => {
                // Load publishing: every 5 ms while connections flow, 4 times a second when idle.
                let active = sup.tick();
                sup.drain_step();
                sup.check_keeper();
                next_tick = tokio::time::Instant::now()
                    + Duration::from_millis(if active || sup.draining() { 5 } else { 250 });
            }
            _ = term.recv() => sup.shutdown("SIGTERM"),
            _ = int.recv() => sup.shutdown("SIGINT"),
            _ = hup.recv() => {
                if !sup.stopping() {
                    match sup.reload(None) {
                        Ok(msg) => tracing::info!("reload: {msg}"),
                        Err(e) => tracing::error!("reload refused, running apps untouched: {e}"),
                    }
                    // The workers a reload started are the keeper's to know at once: a crash
                    // before the next event would otherwise leave them to nobody.
                    sup.keep();
                }
            }
        }
        if sup.stopping() && sup.live_processes() == 0 {
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
    if let Some(k) = sup.keeper.take() {
        k.stop();
    }
    drop(sup); // unpins every group's steering maps
    let _ = std::fs::remove_dir(&pin_root); // only if empty
    tracing::info!("all workers stopped; agent exiting");
    Ok(())
}

impl Supervisor {
    /// SIGTERM/SIGINT: stop every pre-start sequence now, and every app's workers once its
    /// listeners are drained (`drain.rs`); the loop ends when the last process has exited.
    fn shutdown(&mut self, why: &str) {
        if self.stopping() {
            return;
        }
        tracing::info!("{why}: draining, then stopping all workers");
        self.lifecycle = Lifecycle::Stopping;
        self.notify("STOPPING=1");
        for app in self.apps.values() {
            let _ = app.cancel.send(true);
        }
        self.drain_step();
    }
}

/// The keeper this agent started, stopped (and waited for) if the start fails before the
/// supervisor takes it.
struct StopOnError(Option<keeper::Keeper>);

impl Drop for StopOnError {
    fn drop(&mut self) {
        if let Some(k) = self.0.take() {
            k.stop();
        }
    }
}

/// The metrics endpoint's listener: handed over by the previous image, or bound now.
fn metrics_listener(
    agent: &config::Agent,
    handed: Option<std::os::fd::RawFd>,
) -> Result<Option<tokio::net::TcpListener>, StartError> {
    let listener = match (agent.metrics, handed) {
        (None, None) => return Ok(None),
        // Not configured any more (cannot happen through `corral reexec`, which checks the
        // config): close it.
        (None, Some(fd)) => {
            drop(crate::sys::handoff::adopt(fd));
            return Ok(None);
        }
        (Some(address), Some(fd)) => crate::sys::handoff::adopt(fd)
            .map(std::net::TcpListener::from)
            .map_err(|source| StartError::Metrics {
                at: "the listener handed over".into(),
                address,
                source: std::io::Error::other(source),
            })?,
        (Some(address), None) => bind_metrics(agent, address)?,
    };
    let address = listener.local_addr().ok();
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .map(Some)
        .map_err(|source| StartError::Metrics {
            at: "registering the listener".into(),
            address: address.unwrap_or(([0, 0, 0, 0], 0).into()),
            source,
        })
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
