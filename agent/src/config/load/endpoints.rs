//! The apps of every file, gathered into one set: names must be unique (across files, and
//! against the `<name>.tls` apps of TLS fronts), and no two sockets may collide where one of them
//! is an app's own SO_REUSEPORT group.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_spanned::Spanned;

use super::app::convert_app;
use super::source::Source;
use super::table::Table;
use crate::config::raw::{Apps, Str};
use crate::config::{App, AppName, ConfigError, Location, Lookup};
use crate::front::app::front_app;

/// A socket some part of the config listens on, to find two that would collide.
struct Endpoint {
    addr: SocketAddr,
    at: Location,
    /// "`address` in [app.api.listen]".
    what: String,
    /// An app's worker socket (a SO_REUSEPORT group that must be the app's alone).
    worker_socket: bool,
}

/// Every socket of the config, in the order it is written.
#[derive(Default)]
pub(super) struct Endpoints(Vec<Endpoint>);

impl Endpoints {
    /// Records a socket written elsewhere than in an app (`metrics` in [agent]).
    pub(super) fn add(&mut self, addr: SocketAddr, at: Location, what: String) {
        self.0.push(Endpoint {
            addr,
            at,
            what,
            worker_socket: false,
        });
    }

    /// Parses the address under `key` of table `t` and records it; `worker_socket` for a
    /// SO_REUSEPORT group that must be the app's alone (its workers', its TLS front's).
    pub(super) fn claim(
        &mut self,
        t: &Table<'_>,
        key: &str,
        v: &Str,
        worker_socket: bool,
    ) -> Result<(SocketAddr, Location), ConfigError> {
        let addr = t.socket_addr(key, v)?;
        let at = t.src.loc(v.span().start);
        self.0.push(Endpoint {
            addr,
            at: at.clone(),
            what: format!("`{key}` in {}", t.section),
            worker_socket,
        });
        Ok((addr, at))
    }

    /// An app's worker socket must not overlap any other socket in the config.
    fn check(&self) -> Result<(), ConfigError> {
        for (i, later) in self.0.iter().enumerate() {
            for earlier in &self.0[..i] {
                if (later.worker_socket || earlier.worker_socket)
                    && overlaps(&later.addr, &earlier.addr)
                {
                    return Err(ConfigError::at(
                        later.at.clone(),
                        format!(
                            "{} {} overlaps {} {} at {}",
                            later.what, later.addr, earlier.what, earlier.addr, earlier.at
                        ),
                    )
                    .with_hint("each app's worker socket needs an address of its own"));
                }
            }
        }
        Ok(())
    }
}

/// Whether binding both addresses would collide: same port, and the same IP or a wildcard that
/// covers the other (`0.0.0.0` covers IPv4, `[::]` covers both families).
fn overlaps(a: &SocketAddr, b: &SocketAddr) -> bool {
    let covers =
        |w: &SocketAddr, x: &SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// The apps converted so far, across files.
pub(super) struct AppSet<'l> {
    lookup: &'l dyn Lookup,
    apps: BTreeMap<AppName, App>,
    pub(super) endpoints: Endpoints,
}

impl<'l> AppSet<'l> {
    pub(super) fn new(lookup: &'l dyn Lookup) -> Self {
        AppSet {
            lookup,
            apps: BTreeMap::new(),
            endpoints: Endpoints::default(),
        }
    }

    /// Where each ACME front keeps its state: `[agent] acme_dir` / the app's name.
    pub(super) fn set_acme_dir(&mut self, acme_dir: &std::path::Path) {
        for (name, app) in self.apps.iter_mut() {
            if let Some(acme) = app.tls.as_mut().and_then(|t| t.acme.as_mut()) {
                acme.dir = acme_dir.join(name.as_str());
            }
        }
    }

    /// Converts the `[app.NAME]` tables of one file.
    pub(super) fn add(&mut self, src: &Source<'_>, apps: Apps) -> Result<(), ConfigError> {
        // Report problems in the order they appear in the file, not by name.
        let mut apps: Vec<(Spanned<String>, _)> = apps.into_iter().collect();
        apps.sort_by_key(|(k, v)| k.span().start.min(v.span().start));
        for (key, table) in apps {
            let name = AppName::new(key.get_ref()).map_err(|m| src.error(key.span(), m))?;
            // `[app.api]` is defined at its header; `api = { ... }` at its key.
            let start = table.span().start.min(key.span().start);
            let defined_at = src.loc(start);
            if let Some(first) = self.apps.get(&name) {
                return Err(ConfigError::at(
                    defined_at.clone(),
                    format!(
                        "app `{name}` is defined twice: at {} and at {defined_at}",
                        first.defined_at
                    ),
                )
                .with_hint("an app's name is its key; rename one of them or remove the other"));
            }
            let app = convert_app(
                src,
                self.lookup,
                name.clone(),
                defined_at,
                table,
                &mut self.endpoints,
            )?;
            self.apps.insert(name, app);
        }
        Ok(())
    }

    /// Checks the sockets of every file, then adds an app `NAME.tls` of front processes for
    /// every `[app.NAME.tls]`: the apps of the config.
    pub(super) fn finish(mut self) -> Result<BTreeMap<AppName, App>, ConfigError> {
        self.endpoints.check()?;
        let fronts: Vec<App> = self
            .apps
            .values()
            .filter_map(|app| app.tls.as_ref().map(|tls| front_app(app, tls)))
            .collect();
        for front in fronts {
            if let Some(taken) = self.apps.get(&front.name) {
                return Err(ConfigError::at(
                    taken.defined_at.clone(),
                    format!(
                        "app name `{}` is taken by the TLS front of the app whose [tls] is at {}",
                        front.name, front.defined_at
                    ),
                )
                .with_hint(
                    "rename this app: `<name>.tls` is where corral runs <name>'s TLS front",
                ));
            }
            self.apps.insert(front.name.clone(), front);
        }
        Ok(self.apps)
    }
}
