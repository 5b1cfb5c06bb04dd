//! `corral status` and `corral top` as text for people (`--json` is the wire format itself).

use std::time::Duration;

use anyhow::{bail, Result};

use corral::control::{AppStatus, Response};
use corral::policy::restart::format_duration;

/// The apps of a status answer.
pub fn apps(response: Response) -> Result<Vec<AppStatus>> {
    match response {
        Response::Status { apps, .. } => Ok(apps),
        Response::Error { message } => bail!("{message}"),
        Response::Ok { message } => bail!("unexpected answer: {message}"),
        Response::Logs { .. } => bail!("the agent answered with log lines where none were asked"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}M", b as f64 / (1u64 << 20) as f64)
}

pub fn render(apps: &[AppStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if apps.is_empty() {
        out.push_str("no apps\n");
    }
    for app in apps {
        let _ = writeln!(out, "{}  {}  {}", app.name, app.state, app.address);
        if let Some(r) = &app.reason {
            let _ = writeln!(out, "  reason: {r}");
        }
        let _ = writeln!(out, "  steering: {}", app.steering);
        if let Some(st) = &app.steering_stats {
            let _ = writeln!(
                out,
                "  steered {} (probes {}, migrated {}, to the kernel's hash {}, select errors {})",
                st.selected,
                st.probes,
                st.migrations,
                st.fallbacks + st.no_eligible,
                st.select_errors
            );
        }
        if let Some(t) = &app.tls {
            let c = |k: &str| t.counters.get(k).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "  tls: handshakes kTLS {}, userspace {} (ktls off {}, kernel without kTLS {}, \
                 cipher not in kernel {}, ULP refused {}); open {}",
                c("handshakes_ktls"),
                c("handshakes_userspace"),
                c("fallback_ktls_off"),
                c("fallback_kernel_without_ktls"),
                c("fallback_cipher_not_in_kernel"),
                c("fallback_ulp_refused"),
                c("open_connections"),
            );
            let _ = writeln!(
                out,
                "  tls: failed handshakes: eof {}, timeout {}, protocol {}, io {}; kTLS set-up \
                 failed {}; upstream failed {}; redirects {}",
                c("handshake_failed_eof"),
                c("handshake_failed_timeout"),
                c("handshake_failed_protocol"),
                c("handshake_failed_io"),
                c("ktls_setup_failed"),
                c("upstream_failed"),
                c("redirects"),
            );
            let _ = writeln!(
                out,
                "  tls: bytes spliced {}, copied {}; received close_notify {}, alerts {}, \
                 post-handshake closes {}, EOF without close_notify {}",
                c("bytes_spliced"),
                c("bytes_copied"),
                c("close_notify_received"),
                c("alerts_received"),
                c("post_handshake_closes"),
                c("eof_without_close_notify"),
            );
            if !t.kernel_tls_stat.is_empty() {
                let kv: Vec<String> = t
                    .kernel_tls_stat
                    .iter()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                let _ = writeln!(out, "  kernel /proc/net/tls_stat: {}", kv.join(", "));
            }
            if let Some(a) = &t.acme {
                acme_lines(&mut out, a);
            }
        }
        let _ = writeln!(
            out,
            "  {:<6} {:<8} {:<9} {:>9} {:>8} {:>16} {:>9} {:>8} {:>6}  LAST EXIT",
            "WORKER",
            "PID",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "MEM (RSS/PEAK)",
            "CPU",
            "CONNS",
            "OPEN"
        );
        for w in &app.workers {
            let _ = writeln!(
                out,
                "  {:<6} {:<8} {:<9} {:>9} {:>8} {:>16} {:>9} {:>8} {:>6}  {}",
                w.slot,
                w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                w.state,
                w.uptime_ms
                    .map(|u| format_duration(Duration::from_millis(u)))
                    .unwrap_or_else(|| "-".into()),
                w.restarts,
                match (w.rss_bytes, w.peak_rss_bytes) {
                    (Some(r), Some(p)) => format!("{}/{}", mib(r), mib(p)),
                    _ => "-".into(),
                },
                w.cpu_ms
                    .map(|c| format_duration(Duration::from_millis(c)))
                    .unwrap_or_else(|| "-".into()),
                w.connections
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                w.inflight
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                w.last_exit.as_deref().unwrap_or("-"),
            );
        }
    }
    out
}

/// An ACME front's certificate: names, expiry, next renewal, the last failure.
fn acme_lines(out: &mut String, a: &corral::control::AcmeStatus) {
    use std::fmt::Write;
    let at = |t: Option<i64>| match t {
        Some(t) => format!("{t} (unix)"),
        None => "-".to_string(),
    };
    let _ = writeln!(
        out,
        "  acme: {} by {} from {}; expires {}; renewal at {} ({}); orders {}, failed {}",
        a.domains.join(", "),
        a.challenge,
        a.directory,
        match a.not_after {
            Some(_) => at(a.not_after),
            None => "- (no certificate yet)".to_string(),
        },
        at(a.renew_at),
        if a.renewal.is_empty() {
            "-"
        } else {
            &a.renewal
        },
        a.attempts,
        a.failures,
    );
    if let Some(e) = &a.last_error {
        let _ = writeln!(
            out,
            "  acme: last failure at {}: {e}; next attempt at {}",
            at(a.last_error_at),
            at(a.next_attempt)
        );
    }
}
