//! The second phase of `bench peers`: the same open-loop load while a serving process is
//! SIGKILLed at a fixed period, counting the requests lost against the connections the killed
//! processes held.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::procs;
use super::servers::{Ctx, Running};
use crate::bench_steering::{open_loop, pct, schedule, sleep_until, status, Failure, Mix, Outcome};

/// One kill.
pub(super) struct Kill {
    /// Connections the killed process held open (accepted, not yet closed by it), counted with
    /// the process stopped (SIGSTOP) just before the SIGKILL: the requests no server can save.
    pub(super) accepted: usize,
    /// corral: the slot's in-flight count (queued in its listener or being served) from
    /// `corral status --json`, read just before the stop.
    pub(super) slot_inflight: Option<u64>,
}

pub(super) struct StormResult {
    pub(super) name: &'static str,
    pub(super) is_corral: bool,
    /// Requests sent, warm-up included (the kills are all in the measured window).
    pub(super) requests: usize,
    /// Failed requests scheduled in the measured window, by kind.
    pub(super) failures: BTreeMap<Failure, usize>,
    /// Failed requests scheduled in the warm-up (still in flight at the first kill).
    pub(super) warmup_failures: usize,
    pub(super) examples: Vec<String>,
    pub(super) kills: Vec<Kill>,
    /// Kill times at which no process was serving (every worker killed and none back yet).
    pub(super) no_victim: usize,
    /// Successful requests scheduled in the measured window.
    pub(super) p99: Duration,
    pub(super) p99_fast: Duration,
    pub(super) max: Duration,
    /// corral: worker restarts it counted (gunicorn's own arbiter restarts are not corral's).
    pub(super) restarts: Option<u64>,
    pub(super) others: f64,
}

impl StormResult {
    pub(super) fn failed(&self) -> usize {
        self.failures.values().sum::<usize>() + self.warmup_failures
    }

    pub(super) fn accepted(&self) -> usize {
        self.kills.iter().map(|k| k.accepted).sum()
    }
}

/// Kill the oldest serving process of `r` (so each kill meets a warm worker, and the kills
/// rotate over the workers).
fn kill_one(ctx: &Ctx, r: &Running) -> Option<Kill> {
    let pid = *r.serving().first()?;
    let slot_inflight = r.servers.control.as_ref().and_then(|control| {
        let app = status(&ctx.corral, control).ok()?;
        let slot_pid = procs::parent(pid);
        app["workers"].as_array()?.iter().find_map(|w| {
            let p = w["pid"].as_i64()? as i32;
            (p == pid || Some(p) == slot_pid)
                .then(|| w["inflight"].as_u64())
                .flatten()
        })
    });
    // SAFETY: `pid` was listed a moment ago as one of this server's serving processes (a
    // descendant of its agent or master that left its marker); signals have no memory effects.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let accepted = procs::accepted_connections(pid, r.servers.addr.port());
    // SAFETY: as above; the process is stopped, so it is still the same one.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    Some(Kill {
        accepted,
        slot_inflight,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn storm(
    ctx: &Ctx,
    r: &Running,
    mix: &Mix,
    rate: f64,
    warmup: Duration,
    length: Duration,
    every: Duration,
    seed: u64,
) -> Result<StormResult> {
    let plan = schedule(mix, rate, warmup + length, seed);
    let kills = Mutex::new(Vec::new());
    // open_loop starts its schedule 200 ms after it is called; this is within microseconds of
    // that instant, which is all the kills need.
    let start = Instant::now() + Duration::from_millis(200);
    let load = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            loop {
                let at = start + warmup + every * i;
                if at >= start + warmup + length {
                    return;
                }
                sleep_until(at);
                // None: no process was serving at that moment (all killed and not back yet).
                kills.lock().expect("not poisoned").push(kill_one(ctx, r));
                i += 1;
            }
        });
        open_loop(&r.servers, mix, &plan, warmup, length)
    });
    let kills: Vec<Option<Kill>> = kills.into_inner().expect("not poisoned");
    let no_victim = kills.iter().filter(|k| k.is_none()).count();
    let kills: Vec<Kill> = kills.into_iter().flatten().collect();
    let mut failures = BTreeMap::new();
    let mut examples = Vec::new();
    let mut ok = Vec::new();
    let mut fast = Vec::new();
    for rec in &load.measured {
        match &rec.outcome {
            Outcome::Ok(_) => {
                ok.push(rec.latency);
                if rec.class == 0 {
                    fast.push(rec.latency);
                }
            }
            Outcome::Failed(f, why) => {
                *failures.entry(*f).or_insert(0) += 1;
                if examples.len() < 4 && !examples.contains(why) {
                    examples.push(why.clone());
                }
            }
        }
    }
    // Let the server get all its workers back before anything else is measured on it.
    r.wait_all_serving(Duration::from_secs(90))?;
    let restarts = match &r.servers.control {
        Some(control) => status(&ctx.corral, control).ok().map(|app| {
            app["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w["restarts"].as_u64())
                .sum()
        }),
        None => None,
    };
    Ok(StormResult {
        name: r.name,
        is_corral: r.variant.is_corral(),
        requests: plan.len(),
        failures,
        warmup_failures: load.warmup_failures,
        examples,
        kills,
        no_victim,
        p99: pct(ok.clone(), 0.99),
        p99_fast: pct(fast, 0.99),
        max: pct(ok, 1.0),
        restarts,
        others: load.cpu.others(),
    })
}
