//! `[agent] metrics`: the Prometheus text exposition (format 0.0.4) of what `corral status`
//! shows. Pure: the status in, text out; `supervisor::metrics` serves it.

use std::fmt::Write;

use crate::control::{AgentInfo, AppStatus};

/// The app states `corral status` reports, each a series of `corral_app_state` (1 for the
/// current one), so an alert can match `state="failed"` without knowing the others.
const APP_STATES: [&str; 7] = [
    "starting",
    "reloading",
    "running",
    "degraded",
    "failed",
    "stopping",
    "stopped",
];

/// A label value, escaped as the exposition format wants (`\`, `"` and newlines).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// A per-worker family: one sample per worker slot of every app where `value` has one. The
/// status lists a slot's current worker first; a worker it is replacing (draining, stopping)
/// comes later with the same slot and is left out, so no series repeats in a scrape.
fn per_worker(
    out: &mut String,
    apps: &[AppStatus],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&crate::control::WorkerStatus) -> Option<String>,
) {
    let mut f = Family::new(out, name, kind, help);
    for app in apps {
        let mut seen = std::collections::BTreeSet::new();
        for w in &app.workers {
            if !seen.insert(w.slot) {
                continue;
            }
            if let Some(v) = value(w) {
                let slot = w.slot.to_string();
                f.sample(name, &[("app", &app.name), ("slot", &slot)], v);
            }
        }
    }
}

/// The whole exposition.
pub fn render(apps: &[AppStatus], agent: &AgentInfo) -> String {
    let mut out = String::new();
    Family::new(
        &mut out,
        "corral_agent_info",
        "gauge",
        "The agent: its pid and corral's version (always 1).",
    )
    .sample(
        "corral_agent_info",
        &[("version", &agent.version), ("pid", &agent.pid.to_string())],
        1,
    );
    Family::new(
        &mut out,
        "corral_agent_reexecs_total",
        "counter",
        "Times the agent re-executed itself in place (corral reexec) since it started.",
    )
    .sample("corral_agent_reexecs_total", &[], agent.generation);

    let mut f = Family::new(
        &mut out,
        "corral_app_state",
        "gauge",
        "1 for the app's current state (as corral status shows it), 0 for the others.",
    );
    for app in apps {
        for state in APP_STATES {
            f.sample(
                "corral_app_state",
                &[("app", &app.name), ("state", state)],
                u8::from(app.state == state),
            );
        }
    }

    per_worker(
        &mut out,
        apps,
        "corral_worker_up",
        "gauge",
        "1 when the slot's worker is ready (it gets connections), 0 otherwise.",
        |w| Some(u8::from(w.state == "ready").to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_restarts_total",
        "counter",
        "Restarts of the slot's worker after it exited or failed.",
        |w| Some(w.restarts.to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_oom_kills_total",
        "counter",
        "Workers of the slot the kernel killed at memory.max.",
        |w| Some(w.oom_kills.to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_memory_bytes",
        "gauge",
        "Memory of the worker (its cgroup's memory.current, or its RSS without one).",
        |w| w.rss_bytes.map(|v| v.to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_memory_peak_bytes",
        "gauge",
        "Peak memory of the worker (memory.peak, or its peak RSS).",
        |w| w.peak_rss_bytes.map(|v| v.to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_memory_max_bytes",
        "gauge",
        "The worker's memory cap (memory_max).",
        |w| w.memory_max.map(|v| v.to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_cpu_seconds_total",
        "counter",
        "CPU time of the current worker (its cgroup, or the process).",
        |w| w.cpu_ms.map(|v| format!("{:.3}", v as f64 / 1000.0)),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_uptime_seconds",
        "gauge",
        "How long the slot's current worker has run.",
        |w| w.uptime_ms.map(|v| format!("{:.3}", v as f64 / 1000.0)),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_connections_total",
        "counter",
        "Connections the steering program sent to the slot (eBPF steering only).",
        |w| w.connections.map(|v| v.to_string()),
    );
    per_worker(
        &mut out,
        apps,
        "corral_worker_inflight_connections",
        "gauge",
        "Connections of the slot established and not yet closed by its worker.",
        |w| w.inflight.map(|v| v.to_string()),
    );

    type Field = fn(&crate::control::SteeringStats) -> u64;
    let steering: [(&str, &str, Field); 6] = [
        ("selected", "Connections steered to a ready worker.", |s| {
            s.selected
        }),
        ("probes", "Probe connections steered to their slot.", |s| {
            s.probes
        }),
        (
            "migrations",
            "Queued connections moved off a closing listener.",
            |s| s.migrations,
        ),
        (
            "select_errors",
            "Selections that failed (the slot had no socket).",
            |s| s.select_errors,
        ),
        (
            "fallbacks",
            "Connections left to the kernel's hash: no candidate worked.",
            |s| s.fallbacks,
        ),
        (
            "no_eligible",
            "Connections left to the kernel's hash: no worker was ready.",
            |s| s.no_eligible,
        ),
    ];
    for (what, help, get) in steering {
        let name = format!("corral_steering_{what}_total");
        let mut f = Family::new(&mut out, &name, "counter", help);
        for app in apps {
            if let Some(s) = &app.steering_stats {
                f.sample(&name, &[("app", &app.name)], get(s));
            }
        }
    }

    for counter in crate::front::stats::NAMES {
        let gauge = counter == "open_connections";
        let name = if gauge {
            format!("corral_tls_{counter}")
        } else {
            format!("corral_tls_{counter}_total")
        };
        let help = format!(
            "The TLS front's {} (corral status).",
            counter.replace('_', " ")
        );
        let mut f = Family::new(
            &mut out,
            &name,
            if gauge { "gauge" } else { "counter" },
            &help,
        );
        for app in apps {
            if let Some(v) = app.tls.as_ref().and_then(|t| t.counters.get(counter)) {
                f.sample(&name, &[("app", &app.name)], v);
            }
        }
    }
    acme(&mut out, apps);
    if let Some(stat) = apps
        .iter()
        .filter_map(|a| a.tls.as_ref())
        .map(|t| &t.kernel_tls_stat)
        .find(|s| !s.is_empty())
    {
        let mut f = Family::new(
            &mut out,
            "corral_kernel_tls",
            "gauge",
            "The kernel's /proc/net/tls_stat, machine-wide.",
        );
        for (k, v) in stat {
            f.sample("corral_kernel_tls", &[("stat", k)], v);
        }
    }
    out
}

/// ACME fronts: when each name's certificate expires (a unix timestamp, as blackbox_exporter's
/// `probe_ssl_earliest_cert_expiry`: alert on `corral_tls_certificate_expiry_seconds - time()`),
/// and the orders started and failed.
fn acme(out: &mut String, apps: &[AppStatus]) {
    let acme: Vec<(&str, &crate::control::AcmeStatus)> = apps
        .iter()
        .filter_map(|a| Some((a.name.as_str(), a.tls.as_ref()?.acme.as_ref()?)))
        .collect();
    if acme.is_empty() {
        return;
    }
    let name = "corral_tls_certificate_expiry_seconds";
    let mut f = Family::new(
        out,
        name,
        "gauge",
        "When the ACME certificate of each name expires (unix time).",
    );
    for (app, st) in &acme {
        if let Some(t) = st.not_after {
            for d in &st.domains {
                f.sample(name, &[("app", app), ("name", d)], t);
            }
        }
    }
    type Get = fn(&crate::control::AcmeStatus) -> u64;
    let counters: [(&str, &str, Get); 2] = [
        (
            "corral_tls_acme_renewal_attempts_total",
            "Certificate orders started (first ones and renewals).",
            |s| s.attempts,
        ),
        (
            "corral_tls_acme_renewal_failures_total",
            "Certificate orders that failed (the error is in corral status).",
            |s| s.failures,
        ),
    ];
    for (name, help, get) in counters {
        let mut f = Family::new(out, name, "counter", help);
        for (app, st) in &acme {
            f.sample(name, &[("app", app)], get(st));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{FrontStats, SteeringStats, WorkerStatus};

    fn worker(slot: u32, state: &str) -> WorkerStatus {
        WorkerStatus {
            slot,
            pid: Some(100 + slot as i32),
            state: state.into(),
            uptime_ms: Some(1500),
            restarts: slot,
            last_exit: None,
            rss_bytes: Some(4096),
            peak_rss_bytes: Some(8192),
            memory_max: Some(1 << 30),
            cpu_ms: Some(250),
            connections: Some(7),
            inflight: Some(1),
            oom_kills: 2,
            pids: None,
            cgroup: None,
        }
    }

    fn app(name: &str, state: &str) -> AppStatus {
        AppStatus {
            name: name.into(),
            state: state.into(),
            reason: None,
            address: "127.0.0.1:8000".into(),
            steering: "least-loaded".into(),
            steering_stats: Some(SteeringStats {
                selected: 40,
                ..SteeringStats::default()
            }),
            tls: None,
            workers: vec![worker(0, "ready"), worker(1, "starting")],
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_carry_app_and_slot() {
        let mut front = app("web.tls", "running");
        front.tls = Some(FrontStats {
            counters: [
                ("handshakes_ktls".to_string(), 3),
                ("open_connections".into(), 1),
            ]
            .into_iter()
            .collect(),
            kernel_tls_stat: [("TlsTxSw".to_string(), 9)].into_iter().collect(),
            acme: Some(crate::control::AcmeStatus {
                domains: vec!["a.example".into(), "b.example".into()],
                not_after: Some(1_900_000_000),
                attempts: 3,
                failures: 2,
                ..Default::default()
            }),
        });
        let agent = AgentInfo {
            pid: 42,
            version: "0.1.0".into(),
            generation: 1,
            reexec_error: None,
        };
        let mut web = app("web", "degraded");
        // A worker being replaced: same slot, listed after the current one.
        web.workers.push(worker(0, "draining"));
        let text = render(&[web, front], &agent);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("corral_worker_up{app=\"web\",slot=\"0\"}"))
                .count(),
            1,
            "one series per slot:\n{text}"
        );
        for line in [
            "corral_agent_info{version=\"0.1.0\",pid=\"42\"} 1",
            "corral_agent_reexecs_total 1",
            "corral_app_state{app=\"web\",state=\"degraded\"} 1",
            "corral_app_state{app=\"web\",state=\"running\"} 0",
            "corral_worker_up{app=\"web\",slot=\"0\"} 1",
            "corral_worker_up{app=\"web\",slot=\"1\"} 0",
            "corral_worker_restarts_total{app=\"web\",slot=\"1\"} 1",
            "corral_worker_oom_kills_total{app=\"web\",slot=\"0\"} 2",
            "corral_worker_memory_max_bytes{app=\"web\",slot=\"0\"} 1073741824",
            "corral_worker_cpu_seconds_total{app=\"web\",slot=\"0\"} 0.250",
            "corral_steering_selected_total{app=\"web\"} 40",
            "corral_tls_handshakes_ktls_total{app=\"web.tls\"} 3",
            "corral_tls_open_connections{app=\"web.tls\"} 1",
            "corral_kernel_tls{stat=\"TlsTxSw\"} 9",
            "corral_tls_certificate_expiry_seconds{app=\"web.tls\",name=\"b.example\"} 1900000000",
            "corral_tls_acme_renewal_attempts_total{app=\"web.tls\"} 3",
            "corral_tls_acme_renewal_failures_total{app=\"web.tls\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Each family is declared once, before its samples.
        let mut declared = std::collections::BTreeSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(declared.insert(name.to_string()), "{name} twice");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                assert!(declared.contains(name), "{name} sampled before its TYPE");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
