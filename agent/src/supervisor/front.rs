//! What the event loop does for a TLS front app beyond what it does for any app: the watch of
//! its certificate files (a valid change replaces the front processes one by one) and its
//! counters' totals. The certificates themselves are `crate::front::seal`'s.

use std::time::Duration;

use crate::config::{self, App, AppName};
use crate::front::{seal, stats};

use super::events::Event;
use super::state::{AbortOnDrop, AppRt, Rollout, Supervisor};

/// How long a certificate change settles before it is read: a renewal writes the certificate
/// and the key one after the other.
const CERT_SETTLE: Duration = Duration::from_millis(500);

/// A front app's running extras (empty for other apps).
#[derive(Default)]
pub(super) struct FrontRt {
    /// What its exited processes counted.
    pub totals: stats::Totals,
    /// The watch of its certificate files' directories.
    pub cert_watch: Option<AbortOnDrop>,
    /// The task keeping its ACME certificate current.
    pub acme: Option<super::acme::AcmeRt>,
}

/// Whether a running front's certificates differ from what is on disk now (an unreadable or
/// invalid one is an error: the reload is refused).
pub(super) fn bundle_changed(rt: &AppRt, cfg: &App) -> Result<bool, String> {
    match (&cfg.role, &rt.launch.bundle) {
        (config::Role::TlsFront { tls, .. }, Some((_, sealed))) => {
            seal::changed(cfg.name.as_str(), tls, *sealed)
        }
        _ => Ok(false),
    }
}

impl Supervisor {
    /// (Re)start the watch of a TLS front's certificate directories, for its current config.
    pub(super) fn watch_certs(&mut self, name: &AppName) {
        if let Some(cfg) = self.apps.get(name).map(|a| a.cfg.clone()) {
            self.watch_certs_of(name, &cfg);
        }
    }

    /// The same for `cfg`, the config a replacement of the app is starting with (the app's
    /// own is still the old one until the rollout ends).
    pub(super) fn watch_certs_of(&mut self, name: &AppName, cfg: &App) {
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        app.front.cert_watch = None;
        let tls = match &cfg.role {
            config::Role::TlsFront { tls, .. } => tls,
            config::Role::Workers => return,
        };
        // The replaced task goes (its run killed); its cgroup leaf stays for the new one.
        let old = app.front.acme.take();
        app.front.acme = tls.acme.as_ref().map(|a| {
            let leaf = super::acme::leaf(old, app.cg.as_ref(), cfg);
            super::acme::start(name, a, &tls.identity, leaf)
        });
        match crate::sys::inotify::Watch::dirs(&seal::cert_dirs(tls)) {
            Ok(watch) => {
                let app_name = name.clone();
                let task = tokio::spawn(async move {
                    while watch.changed().await.is_ok() {
                        tokio::time::sleep(CERT_SETTLE).await;
                        let ev = Event::CertsChanged {
                            app: app_name.clone(),
                        };
                        if tx.send(ev).is_err() {
                            break;
                        }
                    }
                });
                app.front.cert_watch = Some(AbortOnDrop(task.abort_handle()));
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
    pub(super) fn on_certs_changed(&mut self, name: &AppName) {
        let Some(app) = self.apps.get(name) else {
            return;
        };
        if app.state.phase != crate::policy::rollout::Phase::Running {
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
        let existing: Vec<_> = app.state.slots.iter().map(|s| s.socket.clone()).collect();
        let count = existing.len() as u32;
        match super::apps::prepare(&cfg, count, &existing, true, &self.config.agent.bpf_pin_dir) {
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
}
