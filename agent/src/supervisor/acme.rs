//! The agent's side of an ACME front: one task per front with `acme`, which keeps its
//! certificate current. It reads what is stored, asks the CA when to renew (ARI, through the
//! unprivileged `corral acme` process), sleeps until then, orders, checks the result
//! (`acme::check`) and stores it; the certificate watch of `front.rs` then rolls it into the
//! fronts like a changed certificate file. A failed order is logged, counted and shown in
//! status and metrics, and retried with backoff and jitter; the certificate in service keeps
//! serving meanwhile.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use crate::acme::client::{self, Action, Outcome, Request, Response};
use crate::acme::{check, schedule, state};
use crate::config::{Acme, AppName, Identity};
use crate::control::AcmeStatus;
use crate::front::app::SELF_EXE;

use super::state::AbortOnDrop;

/// The most one `corral acme` run may take (an order polls the CA for up to 90 s twice).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// After ARI could not be asked, when to ask again.
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// A running front's ACME task and what it reports.
pub(super) struct AcmeRt {
    pub status: Arc<Mutex<AcmeStatus>>,
    _task: AbortOnDrop,
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

pub(super) fn start(app: &AppName, acme: &Acme, identity: &Identity) -> AcmeRt {
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
    ));
    AcmeRt {
        status,
        _task: AbortOnDrop(task.abort_handle()),
    }
}

fn set(status: &Mutex<AcmeStatus>, f: impl FnOnce(&mut AcmeStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

async fn keep(app: AppName, acme: Acme, identity: Identity, status: Arc<Mutex<AcmeStatus>>) {
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
            let (due, recheck, how) = match run(&acme, &identity, Action::RenewalInfo, Some(chain))
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
        let result = match run(
            &acme,
            &identity,
            Action::Order,
            current.as_ref().map(|(c, _)| c),
        )
        .await
        {
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

/// One run of `corral acme` as the front's user; the account it made, if any, is stored.
async fn run(
    acme: &Acme,
    identity: &Identity,
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
    let mut child = tokio::process::Command::new(SELF_EXE)
        .arg(client::SUBCOMMAND)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .uid(identity.uid)
        .gid(identity.gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting `corral acme`: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&input)
            .await
            .map_err(|e| format!("`corral acme`'s stdin: {e}"))?;
    }
    let out = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "`corral acme` took more than {} s",
                CLIENT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("`corral acme`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`corral acme` failed ({})", out.status));
    }
    let resp: Response = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("`corral acme` answered something else than a response: {e}"))?;
    if let Some(creds) = resp.account {
        state::write_account(acme, creds)?;
    }
    Ok(resp.outcome)
}
