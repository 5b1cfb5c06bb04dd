//! The agent's side of an ACME front: one task per front with `acme`, which keeps its
//! certificate current. It reads what is stored, asks the CA when to renew (ARI, through the
//! unprivileged `corral acme` process), sleeps until then, orders, checks the result
//! (`acme::check`) and stores it; the certificate watch of `front.rs` then rolls it into the
//! fronts like a changed certificate file. A failed order is logged, counted and shown in
//! status and metrics, and retried with backoff and jitter; the certificate in service keeps
//! serving meanwhile.
//!
//! `corral acme` is started as the fronts are (`sys::spawn`: the front's user, no
//! capabilities, an empty bounding set, no_new_privs, only fds 0-2, its own session, killed
//! with the agent), in a leaf `acme` of the front app's cgroup with the front's limits; it makes
//! itself undumpable (it holds the account key and the new certificate's key).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::acme::client::{self, Action, Outcome, Request, Response};
use crate::acme::{check, schedule, state};
use crate::config::{Acme, App, AppName, Identity};
use crate::control::AcmeStatus;
use crate::front::app::SELF_EXE;
use crate::sys::cgroup;
use crate::sys::pidfd::Process;
use crate::sys::spawn::{self, Spec};

use super::output::{self, Tag};
use super::state::AbortOnDrop;

/// The most one `corral acme` run may take (an order polls the CA for up to 90 s twice).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// After ARI could not be asked, when to ask again.
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// The name of the cgroup leaf `corral acme` runs in, under the front app's cgroup.
pub(super) const LEAF: &str = "acme";

/// A running front's ACME task and what it reports.
pub(super) struct AcmeRt {
    pub status: Arc<Mutex<AcmeStatus>>,
    /// Its cgroup leaf, handed to the task that replaces this one (a reload).
    leaf: Option<Arc<AcmeLeaf>>,
    _task: AbortOnDrop,
}

/// The leaf `corral acme` runs in; torn down (what is in it killed, then removed) when the
/// last task using it is gone.
pub(super) struct AcmeLeaf(Option<cgroup::Leaf>);

impl Drop for AcmeLeaf {
    fn drop(&mut self) {
        if let Some(leaf) = self.0.take() {
            super::cgroups::spawn_teardown(leaf);
        }
    }
}

/// The leaf for a front's ACME runs: the one of the task being replaced (`old`), or a new
/// one under the app's cgroup with the front's limits; none without a cgroup (`corral acme`
/// then runs in the agent's, and says so).
pub(super) fn leaf(
    old: Option<AcmeRt>,
    cg: Option<&cgroup::App>,
    cfg: &App,
) -> Option<Arc<AcmeLeaf>> {
    if let Some(leaf) = old.and_then(|rt| rt.leaf.clone()) {
        return Some(leaf);
    }
    let made = cg?.named_leaf(LEAF).and_then(|leaf| {
        let skipped = leaf.set_limits(&super::cgroups::limits(cfg))?;
        for s in skipped {
            tracing::warn!(app = %cfg.name, "`corral acme`: not enforced: {s}");
        }
        Ok(leaf)
    });
    match made {
        Ok(leaf) => Some(Arc::new(AcmeLeaf(Some(leaf)))),
        Err(e) => {
            tracing::warn!(app = %cfg.name, "`corral acme` runs in the agent's cgroup: its own: {e}");
            None
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A number in [0, 1) for jitter: the clock's nanoseconds mixed (not for secrets).
fn jitter() -> f64 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    x as f64 / (1u64 << 53) as f64
}

pub(super) fn start(
    app: &AppName,
    acme: &Acme,
    identity: &Identity,
    leaf: Option<Arc<AcmeLeaf>>,
) -> AcmeRt {
    let status = Arc::new(Mutex::new(AcmeStatus {
        domains: acme.domains.clone(),
        challenge: acme.challenge.as_str().to_string(),
        directory: acme.directory.clone(),
        ..Default::default()
    }));
    let task = tokio::spawn(keep(
        app.clone(),
        acme.clone(),
        identity.clone(),
        status.clone(),
        leaf.clone(),
    ));
    AcmeRt {
        status,
        leaf,
        _task: AbortOnDrop(task.abort_handle()),
    }
}

fn set(status: &Mutex<AcmeStatus>, f: impl FnOnce(&mut AcmeStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

async fn keep(
    app: AppName,
    acme: Acme,
    identity: Identity,
    status: Arc<Mutex<AcmeStatus>>,
    leaf: Option<Arc<AcmeLeaf>>,
) {
    let leaf = leaf.as_ref().and_then(|l| l.0.as_ref());
    let mut failures: u32 = 0;
    loop {
        // What is in service now (it may lack a name the config just added), and whether it
        // is still good for every configured name.
        let stored = state::read_cert(&acme);
        let serving = stored.as_ref().and_then(|(chain, key)| {
            check::check_servable(chain, key, &acme.domains, now())
                .ok()
                .map(|(_, v)| v.not_after)
        });
        set(&status, |s| s.not_after = serving);
        let current = stored.and_then(|(chain, key)| {
            match check::check(&chain, &key, &acme.domains, now()) {
                Ok(v) => Some((chain, v)),
                Err(e) => {
                    tracing::warn!(app = %app, "acme: the stored certificate will be replaced: {e}");
                    None
                }
            }
        });
        if let Some((chain, v)) = &current {
            let (due, recheck, how) = match run(
                &app,
                &acme,
                &identity,
                leaf,
                Action::RenewalInfo,
                Some(chain),
            )
            .await
            {
                Ok(Outcome::Window {
                    start,
                    end,
                    retry_after_secs,
                }) if schedule::window_fits(start, end, v.not_before, v.not_after) => (
                    schedule::in_window(start, end, jitter()),
                    Duration::from_secs(retry_after_secs.clamp(60, 86_400)),
                    "ARI window",
                ),
                Ok(Outcome::Window { start, end, .. }) => {
                    tracing::warn!(app = %app, "acme: the CA's renewal window {start}..{end} (unix) is not inside the certificate's life {}..{}: renewing at two thirds of it", v.not_before, v.not_after);
                    (
                        schedule::two_thirds(v.not_before, v.not_after),
                        ARI_RETRY,
                        "two thirds of its lifetime",
                    )
                }
                Ok(Outcome::NoAri) => (
                    schedule::two_thirds(v.not_before, v.not_after),
                    Duration::from_secs(86_400),
                    "two thirds of its lifetime",
                ),
                Ok(Outcome::Issued { .. }) => {
                    tracing::warn!(app = %app, "acme: a certificate in answer to a renewal check: ignored");
                    (
                        schedule::two_thirds(v.not_before, v.not_after),
                        ARI_RETRY,
                        "two thirds of its lifetime",
                    )
                }
                Ok(Outcome::Failed {
                    error: e,
                    retry_after_secs,
                }) => {
                    tracing::warn!(app = %app, "acme: renewal information: {e}; renewing at two thirds of the lifetime");
                    (
                        schedule::two_thirds(v.not_before, v.not_after),
                        ARI_RETRY.max(Duration::from_secs(retry_after_secs.unwrap_or(0))),
                        "two thirds of its lifetime",
                    )
                }
                Err(e) => {
                    tracing::warn!(app = %app, "acme: renewal information: {e}; renewing at two thirds of the lifetime");
                    (
                        schedule::two_thirds(v.not_before, v.not_after),
                        ARI_RETRY,
                        "two thirds of its lifetime",
                    )
                }
            };
            set(&status, |s| {
                s.renew_at = Some(due);
                s.renewal = how.to_string();
            });
            let wait = due - now();
            if wait > 0 {
                tracing::info!(app = %app, "acme: certificate valid until {} (unix); renewal in {wait} s ({how})", v.not_after);
                // Ask again when the CA says to (its window may move), or renew when due.
                tokio::time::sleep(Duration::from_secs(wait as u64).min(recheck)).await;
                if now() < due {
                    continue;
                }
            }
        }
        // Order, with backoff until it works.
        set(&status, |s| s.attempts += 1);
        tracing::info!(app = %app, domains = ?acme.domains, "acme: ordering a certificate from {}", acme.directory);
        let ordered = run(
            &app,
            &acme,
            &identity,
            leaf,
            Action::Order,
            current.as_ref().map(|(c, _)| c),
        );
        let result = match ordered.await {
            Ok(Outcome::Issued { chain_pem, key_pem }) => {
                match check::check(&chain_pem, &key_pem, &acme.domains, now()) {
                    Ok(v) => state::write_cert(&acme, &chain_pem, &key_pem)
                        .map(|()| v)
                        .map_err(|e| (e, None)),
                    Err(e) => Err((format!("the CA's certificate is refused: {e}"), None)),
                }
            }
            Ok(Outcome::Failed {
                error,
                retry_after_secs,
            }) => Err((error, retry_after_secs.map(Duration::from_secs))),
            Ok(other) => Err((format!("unexpected answer to an order: {other:?}"), None)),
            Err(e) => Err((e, None)),
        };
        match result {
            Ok(v) => {
                failures = 0;
                tracing::info!(app = %app, "acme: new certificate valid until {} (unix): rolling it into the fronts", v.not_after);
                set(&status, |s| {
                    s.not_after = Some(v.not_after);
                    s.last_error = None;
                    s.next_attempt = None;
                });
            }
            Err((e, retry_after)) => {
                failures += 1;
                let delay = schedule::backoff(failures, jitter(), retry_after);
                tracing::error!(app = %app, "acme: the order failed: {e}; next attempt in {} s (the certificate in service, if any, keeps serving)", delay.as_secs());
                set(&status, |s| {
                    s.failures += 1;
                    s.last_error = Some(e);
                    s.last_error_at = Some(now());
                    s.next_attempt = Some(now() + delay.as_secs() as i64);
                });
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Kills a `corral acme` run that is given up (timed out, or its task aborted) and reaps it.
struct KillOnDrop(Option<Arc<Process>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.signal(libc::SIGKILL);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = p.wait().await;
                });
            }
        }
    }
}

/// One run of `corral acme`, started like a front (see the module's documentation), in
/// `leaf`; the account it made, if any, is stored.
async fn run(
    app: &AppName,
    acme: &Acme,
    identity: &Identity,
    leaf: Option<&cgroup::Leaf>,
    action: Action,
    current: Option<&String>,
) -> Result<Outcome, String> {
    let directory_ca_pem = match &acme.directory_ca {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("{}: directory_ca {}: {e}", acme.at, p.display()))?,
        ),
        None => None,
    };
    let req = Request {
        directory: acme.directory.clone(),
        directory_ca_pem,
        domains: acme.domains.clone(),
        email: acme.email.clone(),
        challenge: acme.challenge,
        challenge_dir: acme.challenge_dir(),
        account: state::read_account(acme),
        current: current.cloned(),
        action,
    };
    let input = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    let pipe_err = |e: std::io::Error| format!("starting `corral acme`: a pipe: {e}");
    let (in_r, in_w) = spawn::pipe_cloexec().map_err(pipe_err)?;
    let (out_r, out_w) = spawn::output_pipe().map_err(pipe_err)?;
    let (err_r, err_w) = spawn::output_pipe().map_err(pipe_err)?;
    let argv = [SELF_EXE.to_string(), client::SUBCOMMAND.to_string()];
    let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let child = spawn::spawn(&Spec {
        program: Path::new(SELF_EXE),
        argv: &argv,
        env: &env,
        listen_pid: false,
        workdir: Path::new("/"),
        uid: identity.uid,
        gid: identity.gid,
        fd3: None,
        more_fds: &[],
        stdin: Some(in_r.as_fd()),
        stdout: out_w.as_fd(),
        stderr: err_w.as_fd(),
        cgroup: leaf.map(|l| l.dir_fd()),
        die_with_agent: true,
    })
    .map_err(|e| format!("starting `corral acme`: {e}"))?;
    drop((in_r, out_w, err_w));
    let pid = child.pid;
    let process =
        Arc::new(Process::new(child.pid, child.pidfd).map_err(|e| format!("`corral acme`: {e}"))?);
    let mut kill = KillOnDrop(Some(process.clone()));
    output::forward(
        err_r,
        Tag {
            app: app.to_string(),
            who: "acme".to_string(),
            pid,
            stream: "stderr",
        },
    );
    let exchange = async {
        let mut stdin =
            pipe::Sender::from_owned_fd(in_w).map_err(|e| format!("`corral acme`'s stdin: {e}"))?;
        stdin
            .write_all(&input)
            .await
            .map_err(|e| format!("`corral acme`'s stdin: {e}"))?;
        drop(stdin);
        let mut stdout = pipe::Receiver::from_owned_fd(out_r)
            .map_err(|e| format!("`corral acme`'s stdout: {e}"))?;
        let mut out = Vec::new();
        stdout
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("`corral acme`'s stdout: {e}"))?;
        let status = process
            .wait()
            .await
            .map_err(|e| format!("`corral acme`: {e}"))?;
        Ok::<_, String>((super::exit_status(status), out))
    };
    let (status, out) = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!(
                "`corral acme` took more than {} s",
                CLIENT_TIMEOUT.as_secs()
            )
        })??;
    // Reaped: nothing to kill.
    kill.0 = None;
    if !status.success() {
        return Err(format!("`corral acme` {status}"));
    }
    let resp: Response = serde_json::from_slice(&out)
        .map_err(|e| format!("`corral acme` answered something else than a response: {e}"))?;
    if let Some(creds) = resp.account {
        state::write_account(acme, creds)?;
    }
    Ok(resp.outcome)
}
