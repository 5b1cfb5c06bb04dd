//! `cargo xtask bench peers`: corral's connection steering against the real peers, with real
//! Python apps, in one run (issue 10).
//!
//! Three apps (xtask/bench-apps), each served four ways on 127.0.0.1, all running for the
//! whole of the app's measurements and loaded one at a time:
//!   - a plain WSGI app: corral with 4 x `gunicorn -w 1` (sync worker, socket from LISTEN_FDS)
//!     against `gunicorn -w 4`;
//!   - FastAPI with sync `def` endpoints, and FastAPI with `async def` endpoints that burn CPU
//!     inside the event loop: corral with 4 x `uvicorn --fd 3` against `uvicorn --workers 4`
//!     and `gunicorn -k uvicorn_worker.UvicornWorker -w 4`.
//!
//! corral runs with its default `steering = "auto"` (what a user gets: a shared queue for
//! gunicorn's sync workers, least-loaded for uvicorn); `--corral` names others to compare.
//! The peers are what users run today: one shared listening socket that every worker accepts
//! from. Every process runs as `nobody` from a venv of pinned PyPI packages (python.rs).
//!
//! The load is bench_steering's open loop (Poisson arrivals from fixed seeds, a new connection
//! per request, latency from the scheduled time, the same schedules for every server) with
//! this benchmark's mix ([`MIX`]), at rates calibrated so that the servers use about 40% and
//! 70% of the CPUs: the app's CPU per request is measured on the first peer first. Several
//! rounds, the servers interleaved (A B C, C B A, ...). Then the kill storms (storm.rs).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::bench_steering::{
    handler_cpu_ms, online_cpus, open_loop, schedule, wait_quiet_for, Acc, DISTURBED, SEED,
};
use crate::{is_root, root, run};

mod placement;
mod plan;
mod procs;
pub(crate) mod python;
mod report;
mod servers;
mod storm;

use placement::Placement;
use plan::{AppReport, LoadReport, Options, KILL_EVERY, MIX};
use servers::{App, Ctx, Running};

pub fn peers(rest: &[&str]) -> Result<()> {
    let o = plan::parse(rest)?;
    if !is_root() {
        bail!(
            "the benchmark runs corral agents (sockets, eBPF, workers as `nobody`): run it as root"
        );
    }
    let began = Instant::now();
    crate::ensure_packages()?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            // The binary is read from target/release below, whatever built xtask.
            .env_remove("CARGO_TARGET_DIR")
            .args(["build", "--release", "-p", "corral"]),
    )?;
    let venv = python::ensure_venv()?;
    let apps = python::write_apps(&venv)?;
    let dir = std::env::temp_dir().join(format!("corral-bench-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let ctx = Ctx {
        corral: root().join("target/release/corral"),
        venv,
        apps,
        dir,
    };
    let load_before = procs::loadavg();
    let mut reports = Vec::new();
    for &app in &o.apps {
        reports.push(run_app(&ctx, app, &o)?);
    }
    let load_after = procs::loadavg();
    report::print(
        &ctx,
        &o,
        &reports,
        &load_before,
        &load_after,
        began.elapsed(),
    );
    let _ = std::fs::remove_dir_all(&ctx.dir);
    Ok(())
}

/// The app's CPU per request (ms), from a short open-loop run on `r` at a light load.
fn calibrate(r: &Running, o: &Options) -> Result<(f64, f64)> {
    let cpus = online_cpus() as f64;
    // About 20% of the CPUs if a request costs 4 ms.
    let rate = 0.2 * cpus * 1000.0 / 4.0;
    let warmup = Duration::from_secs(1);
    let plan = schedule(MIX, rate, warmup + o.calibrate, SEED ^ 0xca1b);
    wait_quiet_for(o.quiet_wait);
    let res = open_loop(&r.servers, MIX, &plan, warmup, o.calibrate);
    if res.completed_in_window == 0 {
        bail!("calibration: no request to {} completed", r.name);
    }
    let cpu_ms = res.cpu.servers * cpus * o.calibrate.as_secs_f64() * 1000.0
        / res.completed_in_window as f64;
    Ok((cpu_ms, rate))
}

fn run_app(ctx: &Ctx, app: App, o: &Options) -> Result<AppReport> {
    eprintln!("bench peers: {}", app.title());
    let mut running = Vec::new();
    let mut started = Vec::new();
    for v in app.variants(&o.corral) {
        let r = servers::start(ctx, app, v)?;
        eprintln!("bench peers:   started {}: {}", r.name, r.servers.steering);
        started.push((r.name, r.servers.steering.clone()));
        running.push(r);
    }
    let cpus = online_cpus() as f64;
    let (calibration, rates) = match &o.rates {
        Some(r) => (None, r.clone()),
        None => {
            let (cpu_ms, at) = calibrate(&running[0], o)?;
            let handlers = handler_cpu_ms(MIX);
            eprintln!(
                "bench peers:   calibration on {} at {at:.0} req/s: {cpu_ms:.2} ms of server CPU \
                 per request (the handlers' own work: {handlers:.2} ms)",
                running[0].name
            );
            let rates = o.loads.iter().map(|l| l * cpus * 1000.0 / cpu_ms).collect();
            (Some((cpu_ms, running[0].name, at)), rates)
        }
    };

    let mut loads = Vec::new();
    for (li, (&target, &rate)) in o.loads.iter().zip(&rates).enumerate() {
        eprintln!(
            "bench peers:   load {:.0}% of {cpus} CPUs: {rate:.0} req/s, {} round(s) of {} s \
             warm-up + {} s measured per server",
            target * 100.0,
            o.rounds,
            o.warmup.as_secs_f64(),
            o.measure.as_secs_f64()
        );
        let plans: Vec<_> = (0..o.rounds)
            .map(|k| {
                schedule(
                    MIX,
                    rate,
                    o.warmup + o.measure,
                    SEED + 1000 * li as u64 + k as u64,
                )
            })
            .collect();
        let planned: usize = plans
            .iter()
            .map(|p| p.iter().filter(|p| p.at >= o.warmup).count())
            .sum();
        let mut acc: Vec<Acc> = running.iter().map(|_| Acc::default()).collect();
        let mut places = vec![Placement::default(); running.len()];
        for (k, plan) in plans.iter().enumerate() {
            let mut order: Vec<usize> = (0..running.len()).collect();
            if k % 2 == 1 {
                order.reverse();
            }
            for v in order {
                let mut attempts = 0;
                loop {
                    wait_quiet_for(o.quiet_wait);
                    let r = open_loop(&running[v].servers, MIX, plan, o.warmup, o.measure);
                    attempts += 1;
                    let others = r.cpu.others();
                    let failed = r
                        .measured
                        .iter()
                        .filter(|x| !matches!(x.outcome, crate::bench_steering::Outcome::Ok(_)))
                        .count();
                    eprintln!(
                        "bench peers:     round {}/{} {}: servers {:.0}%, others {:.0}%, {} failed",
                        k + 1,
                        o.rounds,
                        running[v].name,
                        r.cpu.servers * 100.0,
                        others * 100.0,
                        failed
                    );
                    if others <= DISTURBED || attempts > o.retries {
                        places[v].add(Placement::of(&r, &running[v].servers.pids));
                        acc[v].add(r, others > DISTURBED);
                        acc[v].repeats += attempts - 1;
                        break;
                    }
                    eprintln!("bench peers:       other processes used the CPUs: again");
                }
            }
        }
        let measure = o.measure * o.rounds as u32;
        let mut results = Vec::new();
        for (a, r) in acc.into_iter().zip(&running) {
            let s = a.summary(r.name, &r.servers, MIX, o.rounds, measure, &ctx.corral)?;
            results.push((r.variant, s));
        }
        loads.push(LoadReport {
            target,
            rate,
            planned_rate: planned as f64 / measure.as_secs_f64(),
            results,
            placement: places,
        });
    }

    // Kill storms, at the first (lightest) load.
    let storm_rate = rates[0];
    let mut storms = Vec::new();
    if !o.storm.is_zero() {
        eprintln!(
            "bench peers:   kill storms: {storm_rate:.0} req/s, a serving process SIGKILLed \
             every {:.1} s for {} s",
            KILL_EVERY.as_secs_f64(),
            o.storm.as_secs_f64()
        );
        for r in &running {
            wait_quiet_for(o.quiet_wait);
            let s = storm::storm(
                ctx,
                r,
                MIX,
                storm_rate,
                o.warmup,
                o.storm,
                KILL_EVERY,
                SEED ^ 0x57_0a3e,
            )?;
            eprintln!(
                "bench peers:     {}: {} kills, {} failed of {} requests, {} connections held by \
                 the killed processes",
                r.name,
                s.kills.len(),
                s.failed(),
                s.requests,
                s.accepted()
            );
            storms.push(s);
        }
    }
    Ok(AppReport {
        app,
        calibration,
        loads,
        storm_rate,
        storms,
        started,
    })
}
