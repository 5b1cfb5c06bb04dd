//! What the agent does for a TLS front app beyond what it does for any app: its certificate
//! bundle (read and checked as root, handed over sealed), the watch of its certificate files
//! (a valid change replaces the front processes one by one), and its counters' totals.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, App, AppName};
use crate::front::stats;
use crate::sys::front::SharedCounters;

use super::events::Event;
use super::state::{AbortOnDrop, AppRt, Rollout, Supervisor};

/// How long a certificate change settles before it is read: a renewal writes the certificate
/// and the key one after the other.
const CERT_SETTLE: Duration = Duration::from_millis(500);

/// A front app's running extras (empty for other apps).
#[derive(Default)]
pub(super) struct FrontRt {
    /// What its exited processes counted.
    pub totals: Totals,
    /// The watch of its certificate files' directories.
    pub cert_watch: Option<AbortOnDrop>,
}

pub(super) type Totals = [u64; stats::COUNT];

impl FrontRt {
    /// An exited front process's counts join the totals (not what it had open).
    pub fn add_final(&mut self, counters: &SharedCounters) {
        for (i, t) in self.totals.iter_mut().enumerate() {
            if i != stats::Stat::Open as usize {
                *t += counters.get(i);
            }
        }
    }
}

/// The totals plus what the live processes count now.
pub(super) fn totals_with<'a>(
    totals: &Totals,
    live: impl Iterator<Item = &'a Arc<SharedCounters>>,
) -> Totals {
    let mut sum = *totals;
    for c in live {
        for (i, t) in sum.iter_mut().enumerate() {
            *t += c.get(i);
        }
    }
    sum
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

/// Read and check a TLS front's certificates and keys (as root: key files are the agent's to
/// read) into a sealed memfd for its processes. An invalid certificate fails here, before
/// anything is applied.
pub(super) fn bundle(cfg: &App, tls: &config::Tls) -> Result<(Arc<OwnedFd>, u64), String> {
    let bundle = crate::front::bundle::Bundle::load(&tls.cert_pairs())
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
pub(super) fn bundle_changed(rt: &AppRt, cfg: &App) -> Result<bool, String> {
    match (&cfg.role, &rt.launch.bundle) {
        (config::Role::TlsFront { tls, .. }, Some((_, old))) => {
            let new = crate::front::bundle::Bundle::load(&tls.cert_pairs())
                .map_err(|e| format!("{}: app {}: {e}", tls.address_at, cfg.name))?;
            Ok(new.digest() != *old)
        }
        _ => Ok(false),
    }
}

impl Supervisor {
    /// (Re)start the watch of a TLS front's certificate directories, for its current config.
    pub(super) fn watch_certs(&mut self, name: &AppName) {
        let tx = self.tx.clone();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        app.front.cert_watch = None;
        let tls = match &app.cfg.role {
            config::Role::TlsFront { tls, .. } => tls,
            config::Role::Workers => return,
        };
        match crate::sys::inotify::Watch::dirs(&cert_dirs(tls)) {
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
