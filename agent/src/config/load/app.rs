//! One `[app.NAME]` table -> [`App`]: its command and identity here, each section in a function
//! of its own (`listen`, `restart`, `pre_start` below; `workers`, `env`, `tls` in their files).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_spanned::Spanned;

use super::concurrency;
use super::endpoints::Endpoints;
use super::env::app_env;
use super::identity::identity;
use super::source::{header, Source};
use super::table::Table;
use super::tls::tls;
use super::workers::workers;
use crate::config::limits::MAX_BACKLOG;
use crate::config::raw::{RawApp, RawListen, RawPreStart, RawRestart};
use crate::config::{
    App, AppName, ConfigError, Listen, Location, Lookup, PreStart, Restart, RestartMode, Role,
    Steering,
};

const DEFAULT_BACKLOG: u32 = 1024;
const DEFAULT_PRE_START_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// `[app.NAME]`, defined at `defined_at`; its sockets are recorded in `endpoints`.
pub(super) fn convert_app(
    src: &Source<'_>,
    lookup: &dyn Lookup,
    name: AppName,
    defined_at: Location,
    table: Spanned<RawApp>,
    endpoints: &mut Endpoints,
) -> Result<App, ConfigError> {
    let n = name.as_str();
    let t = Table::new(src, &["app", n], table.span());
    let raw = table.into_inner();

    let (command, command_at) = t.argv("command", raw.command)?;
    let workdir = match &raw.workdir {
        Some(v) => t.absolute_path("workdir", v)?,
        None => PathBuf::from("/"),
    };
    let identity = identity(&t, lookup, &name, raw.user.as_ref(), raw.group.as_ref())?;
    let env = app_env(&t, n, raw.env_file.as_ref(), raw.env)?;
    let listen = listen(&t, &name, raw.listen, endpoints, &command, &env)?;
    let workers = workers(src, n, &defined_at, raw.workers)?;
    let restart = restart(src, n, raw.restart)?;
    let pre_start = pre_start(src, n, raw.pre_start.unwrap_or_default())?;
    let tls = match raw.tls {
        Some(raw_tls) => Some(tls(src, lookup, &name, raw_tls, endpoints)?),
        None => None,
    };

    Ok(App {
        name,
        defined_at,
        command,
        command_at,
        workdir,
        identity,
        env,
        listen,
        workers,
        restart,
        pre_start,
        tls,
        role: Role::Workers,
    })
}

/// `[app.NAME.listen]` (required), its address recorded as the app's worker socket;
/// `steering = "auto"` decided from the app's command and environment.
fn listen(
    t: &Table<'_>,
    name: &AppName,
    raw: Option<Spanned<RawListen>>,
    endpoints: &mut Endpoints,
    command: &[String],
    env: &BTreeMap<String, String>,
) -> Result<Listen, ConfigError> {
    let path = ["app", name.as_str(), "listen"];
    let raw = raw.ok_or_else(|| {
        t.src
            .error(
                t.span.clone(),
                format!("app `{name}` has no {} table", header(&path)),
            )
            .with_hint(format!(
                "add {} with the workers' socket, e.g. `address = \"127.0.0.1:8000\"`",
                header(&path)
            ))
    })?;
    let lt = Table::new(t.src, &path, raw.span());
    let raw = raw.into_inner();
    let address_v = lt
        .required("address", raw.address)
        .map_err(|e| e.with_hint("the workers' socket, e.g. `address = \"127.0.0.1:8000\"`"))?;
    let (address, address_at) = endpoints.claim(&lt, "address", &address_v, true)?;
    let backlog = lt
        .u32_in("backlog", raw.backlog.as_ref(), 1..=MAX_BACKLOG)?
        .unwrap_or(DEFAULT_BACKLOG);
    let chosen = lt.choice(
        "steering",
        raw.steering.as_ref(),
        None,
        &[
            ("auto", None),
            ("least-loaded", Some(Steering::LeastLoaded)),
            ("round-robin", Some(Steering::RoundRobin)),
            ("hash", Some(Steering::Hash)),
            ("shared", Some(Steering::Shared)),
        ],
    )?;
    let (steering, steering_auto) = match chosen {
        Some(s) => (s, None),
        None => match concurrency::one_at_a_time(command, env) {
            Some(why) => (Steering::Shared, Some(why)),
            None => (
                Steering::LeastLoaded,
                Some(
                    "workers that serve many requests at once: least-loaded over one socket \
                     each"
                        .to_string(),
                ),
            ),
        },
    };
    Ok(Listen {
        address,
        address_at,
        backlog,
        steering,
        steering_auto,
    })
}

/// `[app.NAME.restart]`, every key defaulting to [`Restart::DEFAULT`].
fn restart(
    src: &Source<'_>,
    n: &str,
    raw: Option<Spanned<RawRestart>>,
) -> Result<Restart, ConfigError> {
    let (r, raw) = Table::or_default(src, &["app", n, "restart"], raw);
    let d = Restart::DEFAULT;
    let policy = r.choice(
        "policy",
        raw.policy.as_ref(),
        d.policy,
        &[
            ("always", RestartMode::Always),
            ("on-failure", RestartMode::OnFailure),
            ("never", RestartMode::Never),
        ],
    )?;
    let backoff_initial = r.duration(
        "backoff_initial",
        raw.backoff_initial.as_ref(),
        d.backoff_initial,
    )?;
    let backoff_max = r.duration("backoff_max", raw.backoff_max.as_ref(), d.backoff_max)?;
    if backoff_initial > backoff_max {
        let span = match (&raw.backoff_initial, &raw.backoff_max) {
            (Some(v), _) => v.span(),
            (None, Some(v)) => v.span(),
            (None, None) => r.span.clone(),
        };
        return Err(r
            .err(
                span,
                "backoff_initial",
                format!(
                    "{backoff_initial:?} must not be longer than `backoff_max` ({backoff_max:?})"
                ),
            )
            .with_hint("the delay starts at backoff_initial and doubles up to backoff_max"));
    }
    let max_restarts = r
        .u32_in("max_restarts", raw.max_restarts.as_ref(), 0..=u32::MAX)?
        .unwrap_or(d.max_restarts);
    let window = r.positive_duration("window", raw.window.as_ref(), d.window)?;
    let reset_after = r.duration("reset_after", raw.reset_after.as_ref(), d.reset_after)?;
    Ok(Restart {
        policy,
        backoff_initial,
        backoff_max,
        max_restarts,
        window,
        reset_after,
    })
}

/// `[[app.NAME.pre_start]]`: steps run in order before the workers start.
fn pre_start(
    src: &Source<'_>,
    n: &str,
    steps: Vec<Spanned<RawPreStart>>,
) -> Result<Vec<PreStart>, ConfigError> {
    steps
        .into_iter()
        .enumerate()
        .map(|(i, step)| {
            let pt = Table::array_item(src, &["app", n, "pre_start"], step.span());
            let step = step.into_inner();
            let (command, at) = pt.argv("command", step.command)?;
            Ok(PreStart {
                name: match &step.name {
                    Some(v) => pt.string("name", v)?,
                    None => format!("step {}", i + 1),
                },
                command,
                timeout: pt.positive_duration(
                    "timeout",
                    step.timeout.as_ref(),
                    DEFAULT_PRE_START_TIMEOUT,
                )?,
                at,
            })
        })
        .collect()
}
