//! An app's status as `corral status`, `corral top` and the metrics endpoint see it: the
//! bookkeeping's facts plus what the kernel says now (memory, CPU, connections).

use crate::config::{self, AppName};
use crate::control::{AppStatus, FrontStats, SteeringStats, WorkerStatus};
use crate::policy::health::{self, AppReadiness, Readiness};
use crate::policy::rollout::WorkerState;
use crate::sys::machine;

use super::state::{AppRt, Supervisor, Worker};

impl Supervisor {
    /// `/readyz`: every app's ready workers against its `min_ready`.
    pub(super) fn readiness(&self) -> Readiness {
        let apps: Vec<AppReadiness> = self
            .apps
            .iter()
            .map(|(n, a)| AppReadiness {
                app: n.to_string(),
                ready: a
                    .state
                    .workers()
                    .filter(|w| w.state == WorkerState::Ready)
                    .count() as u32,
                slots: a.state.slots.len() as u32,
                min_ready: a.cfg.workers.min_ready.get(),
            })
            .collect();
        health::readiness(&apps, self.stopping())
    }
}

pub(super) fn app_status(name: &AppName, app: &AppRt) -> AppStatus {
    let (state, reason) = app.state.label();
    let n = app.state.slots.len() as u32;
    let mem_cap = app.cfg.workers.memory_max.map(|b| b.0);
    // With a shared socket every connection is counted on slot 0: per worker there is nothing
    // to say (the app's totals are in its steering counters).
    let shared = app.steering.shared();
    let picks = app.steering.slot_picks(n).filter(|_| !shared);
    let inflight = app.steering.inflight(n).filter(|_| !shared);
    let at =
        |v: &Option<Vec<u64>>, slot: u32| v.as_ref().and_then(|p| p.get(slot as usize).copied());
    let open = |slot: u32| {
        inflight
            .as_ref()
            .and_then(|p| p.get(slot as usize).copied())
    };
    // A live worker: what the kernel says of its leaf, or of its process without one.
    let live = |w: &Worker, state: &str, restarts: u32, last_exit: Option<String>, oom_kills| {
        let proc_stats = machine::process_stats(w.pid);
        let cg = w.res.leaf.as_ref().and_then(|l| l.stats().ok());
        WorkerStatus {
            slot: w.slot,
            pid: Some(w.pid),
            state: state.to_string(),
            uptime_ms: Some(w.started.elapsed().as_millis() as u64),
            restarts,
            last_exit,
            oom_kills,
            rss_bytes: cg
                .as_ref()
                .and_then(|c| c.memory_current)
                .or(proc_stats.map(|s| s.rss_bytes)),
            peak_rss_bytes: cg
                .as_ref()
                .and_then(|c| c.memory_peak)
                .or(proc_stats.map(|s| s.peak_rss_bytes)),
            memory_max: mem_cap,
            cpu_ms: cg
                .as_ref()
                .map(|c| c.cpu_usage_usec / 1000)
                .or(proc_stats.map(|s| s.cpu_ms)),
            connections: None,
            inflight: None,
            pids: cg.as_ref().and_then(|c| c.pids_current),
            cgroup: w.res.leaf.as_ref().map(|l| l.path().display().to_string()),
        }
    };
    let mut workers = Vec::new();
    for (i, slot) in app.state.slots.iter().enumerate() {
        let i = i as u32;
        let mut st = match &slot.current {
            Some(w) => live(
                w,
                w.state.as_str(),
                slot.restarts,
                slot.last_exit.clone(),
                slot.oom_kills,
            ),
            None => WorkerStatus {
                slot: i,
                pid: None,
                state: slot.empty_state().to_string(),
                uptime_ms: None,
                restarts: slot.restarts,
                last_exit: slot.gave_up.clone().or_else(|| slot.last_exit.clone()),
                oom_kills: slot.oom_kills,
                rss_bytes: None,
                peak_rss_bytes: None,
                memory_max: mem_cap,
                cpu_ms: None,
                connections: None,
                inflight: None,
                pids: None,
                cgroup: None,
            },
        };
        st.connections = at(&picks, i);
        st.inflight = open(i);
        workers.push(st);
        for w in &slot.retired {
            let state = if w.state == WorkerState::Stopping {
                "stopping"
            } else {
                "draining"
            };
            let mut st = live(
                w,
                state,
                slot.restarts,
                slot.last_exit.clone(),
                slot.oom_kills,
            );
            st.connections = at(&picks, i);
            st.inflight = open(i);
            workers.push(st);
        }
    }
    for w in &app.state.removed {
        workers.push(live(w, "stopping", 0, None, 0));
    }
    let tls = matches!(app.cfg.role, config::Role::TlsFront { .. }).then(|| {
        let live = app.state.workers().filter_map(|w| w.res.counters.as_ref());
        let totals = crate::front::stats::with_live(&app.front.totals, live);
        FrontStats {
            counters: crate::front::stats::NAMES
                .iter()
                .zip(totals)
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            kernel_tls_stat: machine::tls_stat(),
            acme: app
                .front
                .acme
                .as_ref()
                .and_then(|a| a.status.lock().ok().map(|s| s.clone())),
        }
    });
    AppStatus {
        name: name.to_string(),
        state: state.to_string(),
        tls,
        reason,
        address: app.cfg.listen.address.to_string(),
        steering: app.steering.describe(),
        steering_stats: app.steering.stats().map(|s| SteeringStats {
            selected: s.selected,
            probes: s.probes,
            migrations: s.migrations,
            select_errors: s.select_errors,
            fallbacks: s.fallbacks,
            no_eligible: s.no_eligible,
            tracked: s.tracked,
            untracked: s.untracked,
            programs: app.steering.program_ids(),
        }),
        workers,
    }
}
