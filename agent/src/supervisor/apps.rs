//! An app from its config to running workers: what must exist before it can be applied
//! (sockets, program, launch, steering), adding it, and its pre-start steps.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{self, App, AppName};
use crate::policy::rollout::{App as AppState, Phase};
use crate::sys::socket;

use super::events::Event;
use super::front::FrontRt;
use super::launch::Launch;
use super::prestart;
use super::state::{AppRt, Prepared, Rollout, Supervisor};
use super::steering::GroupSteering;

/// What to exec for the app's workers (and, for a TLS front, its bundle and redirect
/// listener).
pub(super) fn launch_for(cfg: &App, argv: &[String]) -> Result<Launch, String> {
    let mut launch = Launch::for_app(cfg, argv)
        .map_err(|e| format!("{}: app {}: {e}", cfg.command_at, cfg.name))?;
    if let config::Role::TlsFront { tls, .. } = &cfg.role {
        if let Some(acme) = &tls.acme {
            crate::acme::state::prepare(acme, tls.identity.uid, tls.identity.gid)
                .map_err(|e| format!("{}: app {}: acme: {e}", acme.at, cfg.name))?;
        }
        launch.bundle = Some(crate::front::seal::seal(cfg.name.as_str(), tls)?);
        if let Some(r) = tls.redirect_http {
            // SO_REUSEPORT, so a rolling replacement's new fronts can bind beside the old ones.
            let fd = socket::reuseport_listener(r, cfg.listen.backlog)
                .map_err(|e| format!("{}: app {}: redirect_http: {e}", tls.address_at, cfg.name))?;
            launch.redirect = Some(Arc::new(fd));
        }
    }
    Ok(launch)
}

/// Bind `count` sockets for `cfg`, reusing `existing` (a group on the same address) for the
/// first slots; load a steering program unless `keep_steering` (same group, same kind). With a
/// shared socket every slot gets the same one (the first existing socket, or a new one).
pub(super) fn prepare(
    cfg: &App,
    count: u32,
    existing: &[Arc<OwnedFd>],
    keep_steering: bool,
    pin_root: &Path,
) -> Result<Prepared, String> {
    let launch = launch_for(cfg, &cfg.command)?;
    // A shared socket stands in every slot of its group: each once.
    let mut sockets: Vec<Arc<OwnedFd>> = Vec::new();
    for s in existing {
        if !sockets.iter().any(|k| Arc::ptr_eq(k, s)) {
            sockets.push(s.clone());
        }
    }
    let fresh_group = sockets.is_empty();
    let wanted = if cfg.listen.steering == config::Steering::Shared {
        1
    } else {
        count as usize
    };
    sockets.truncate(wanted);
    while sockets.len() < wanted {
        let fd = socket::reuseport_listener(cfg.listen.address, cfg.listen.backlog)
            .map_err(|e| format!("{}: app {}: {e}", cfg.listen.address_at, cfg.name))?;
        sockets.push(Arc::new(fd));
    }
    for s in &sockets {
        socket::listen(std::os::fd::AsFd::as_fd(&**s), cfg.listen.backlog)
            .map_err(|e| format!("{}: app {}: listen: {e}", cfg.listen.address_at, cfg.name))?;
    }
    if wanted == 1 {
        sockets = vec![sockets[0].clone(); count as usize];
    }
    let steering = (fresh_group || !keep_steering).then(|| GroupSteering::load(cfg, pin_root));
    Ok(Prepared {
        launch,
        sockets,
        steering,
    })
}

/// Each pre-start step with what to exec for it.
pub(super) fn prestart_plan(cfg: &App) -> Result<Vec<(config::PreStart, Launch)>, String> {
    cfg.pre_start
        .iter()
        .map(|step| {
            Launch::for_app(cfg, &step.command)
                .map(|l| (step.clone(), l))
                .map_err(|e| format!("{}: app {} pre-start {}: {e}", step.at, cfg.name, step.name))
        })
        .collect()
}

impl Supervisor {
    /// Add an app and start it: its pre-start steps, then its workers.
    pub(super) fn add_app(&mut self, cfg: App, p: Prepared) {
        let name = cfg.name.clone();
        if self.add_app_idle(cfg, p) {
            self.begin_prestart(&name, None);
        }
    }

    /// Add an app with its slots and steering but no worker (an app adopted from the agent's
    /// previous image has them running already). False when it is refused (marked failed).
    pub(super) fn add_app_idle(&mut self, cfg: App, p: Prepared) -> bool {
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
                if super::cgroups::needed(&cfg).is_empty() || !self.config.agent.enforce_limits {
                    tracing::warn!(app = %name, "{why}; its workers run in the agent's cgroup");
                } else {
                    tracing::error!(app = %name, "{why}");
                    refused = Some(why);
                }
                None
            }
        };
        let mut state = AppState::new(p.sockets);
        let accepted = refused.is_none();
        if let Some(why) = refused {
            state.phase = Phase::Failed(why);
        }
        let rt = AppRt {
            launch: p.launch,
            cfg,
            state,
            rollout: None,
            cancel,
            steering,
            cg,
            front: FrontRt::default(),
        };
        self.apps.insert(name.clone(), rt);
        self.watch_certs(&name);
        accepted
    }

    /// Run the app's pre-start steps (those of `rollout` when replacing), then start workers.
    pub(super) fn begin_prestart(&mut self, name: &AppName, rollout: Option<Box<Rollout>>) {
        let token = self.id();
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let cfg = rollout.as_ref().map(|r| &r.cfg).unwrap_or(&app.cfg);
        let plan = prestart_plan(cfg);
        app.state.begin_prestart(token);
        app.rollout = rollout;
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Event::PreStartDone {
                    app: name.clone(),
                    token,
                    result: Err(e),
                });
                return;
            }
        };
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

    /// The app's pre-start steps ended: start (or replace) its workers, or say why not.
    pub(super) fn on_prestart_done(
        &mut self,
        name: &AppName,
        token: u64,
        result: Result<(), String>,
    ) {
        let stopping = self.stopping();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        if !app.state.awaits_prestart(token) {
            return;
        }
        let rollout = app.rollout.take();
        if stopping {
            app.state.phase = Phase::Stopping;
            return;
        }
        match (result, rollout) {
            (Err(reason), rollout) => {
                let replacing = rollout.is_some();
                self.decide(name, |state, _| state.prestart_failed(reason, replacing));
            }
            (Ok(()), None) => self.decide(name, |state, ctx| state.prestart_succeeded(ctx)),
            (Ok(()), Some(r)) => {
                let Rollout {
                    cfg,
                    launch,
                    sockets,
                    steering,
                } = *r;
                app.cfg = cfg;
                app.launch = launch;
                let new_group = steering.is_some();
                if let Some(mut st) = steering {
                    if let Err(e) = st.install(&sockets) {
                        tracing::error!(app = %name, "attaching connection steering: {e}");
                    }
                    tracing::info!(app = %name, "connection steering: {}", st.describe());
                    app.steering = st;
                }
                let kept = app.state.slots.len();
                if !new_group {
                    // Slots the new version adds join the group's steering.
                    for (i, sock) in sockets.iter().enumerate().skip(kept) {
                        if let Err(e) = app.steering.set_socket(i as u32, sock) {
                            tracing::error!(app = %name, worker = i, "registering its socket for steering: {e}");
                        }
                    }
                }
                self.decide(name, |state, ctx| state.new_version(sockets, ctx));
            }
        }
    }
}
