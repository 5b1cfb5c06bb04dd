//! SIGTERM/SIGINT: drain each app before its workers are told to stop (the decisions are
//! `policy::drain`'s; this gathers the facts and carries them out). Runs from the loop's tick,
//! every 5 ms while draining.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::Instant;

use crate::config::{self, AppName};
use crate::policy::drain::{self, DrainAction, DrainApp};
use crate::policy::rollout::WorkerState;
use crate::sys::socket;

use super::state::{AppRt, Supervisor};

/// Where one app's drain is.
#[derive(Debug, Default)]
pub(super) struct Drained {
    /// When its listeners stopped taking new connections.
    refused_at: Option<Instant>,
    /// Its workers were told to stop.
    stopped: bool,
}

/// Each app's drain, by name.
pub(super) type Drains = BTreeMap<AppName, Drained>;

impl Supervisor {
    /// True while some app's workers have not been told to stop yet.
    pub(super) fn draining(&self) -> bool {
        self.stopping()
            && self
                .apps
                .keys()
                .any(|n| !self.drains.get(n).is_some_and(|d| d.stopped))
    }

    /// One step of the drain: refuse, wait, stop (see `policy::drain`).
    pub(super) fn drain_step(&mut self) {
        if !self.stopping() {
            return;
        }
        let now = Instant::now();
        let view: Vec<DrainApp> = self
            .apps
            .iter()
            .map(|(n, a)| {
                let d = self.drains.get(n);
                DrainApp {
                    name: n.to_string(),
                    front: matches!(a.cfg.role, config::Role::TlsFront { .. }),
                    filtered_for: d.and_then(|d| d.refused_at).map(|t| now - t),
                    queued: queued(a),
                    ready: a
                        .state
                        .workers()
                        .filter(|w| w.state == WorkerState::Ready)
                        .count() as u32,
                    live: a.state.live_processes(),
                    stopped: d.is_some_and(|d| d.stopped),
                }
            })
            .collect();
        for action in drain::next(&view) {
            match action {
                DrainAction::Refuse(name) => {
                    let Some((name, app)) = self.apps.iter().find(|(n, _)| n.as_str() == name)
                    else {
                        continue;
                    };
                    refuse(name, app);
                    self.drains.entry(name.clone()).or_default().refused_at = Some(now);
                }
                DrainAction::Stop { app, why } => {
                    let Some(name) = self.apps.keys().find(|n| n.as_str() == app).cloned() else {
                        continue;
                    };
                    tracing::info!(app = %name, "drained ({why}): stopping its workers");
                    self.drains.entry(name.clone()).or_default().stopped = true;
                    self.decide(&name, |state, _| state.stop_all());
                }
            }
        }
    }
}

/// The connections waiting in the app's listeners' accept queues.
fn queued(app: &AppRt) -> u32 {
    listeners(app)
        .map(|(fd, _)| socket::accept_queue_len(fd.as_fd()).unwrap_or(0))
        .sum()
}

/// Every listener of the app, once each, with its address (a shared socket stands in every
/// slot; a TLS front may have its redirect listener).
fn listeners(app: &AppRt) -> impl Iterator<Item = (&std::os::fd::OwnedFd, std::net::SocketAddr)> {
    let mut seen: Vec<*const std::os::fd::OwnedFd> = Vec::new();
    let address = app.cfg.listen.address;
    let redirect = match &app.cfg.role {
        config::Role::TlsFront { tls, .. } => tls.redirect_http,
        _ => None,
    };
    app.state
        .slots
        .iter()
        .map(move |s| (&*s.socket, address))
        .chain(app.launch.redirect.as_deref().zip(redirect))
        .filter(move |(fd, _)| {
            let p = *fd as *const _;
            let new = !seen.contains(&p);
            seen.push(p);
            new
        })
}

fn refuse(name: &AppName, app: &AppRt) {
    for (fd, address) in listeners(app) {
        if let Err(e) = socket::refuse_new_connections(fd.as_fd(), address) {
            tracing::warn!(app = %name, "draining: {e}; its queue may be reset at exit");
        }
    }
    tracing::info!(app = %name, "draining: new connections are refused, the workers take what is queued");
}
