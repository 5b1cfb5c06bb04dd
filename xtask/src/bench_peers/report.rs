//! The report of `bench peers`, in Markdown, ready to go into BENCHMARKS.md.

use std::process::Command;
use std::time::Duration;

use super::plan::{AppReport, LoadReport, Options, KILL_EVERY, MIX};
use super::python;
use super::servers::Ctx;
use super::storm::StormResult;
use crate::bench_steering::{
    handler_cpu_ms, met, ms, online_cpus, Failure, Summary, CLIENT_THREADS, DISTURBED,
};
use crate::root;

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// `a / b`, or infinity when `b` is zero.
fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::INFINITY
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

fn share_spread(s: &Summary) -> String {
    let max = s.shares.iter().copied().fold(0.0, f64::max);
    let min = s.shares.iter().copied().fold(f64::INFINITY, f64::min);
    if min > 0.0 {
        format!("{:.2}", max / min)
    } else {
        "inf".into()
    }
}

fn failures(s: &Summary) -> String {
    let total: usize = s.failures.values().sum();
    if total == 0 {
        return "0".into();
    }
    let parts: Vec<String> = s
        .failures
        .iter()
        .map(|(k, n)| format!("{n} {}", kind(*k)))
        .collect();
    parts.join(", ")
}

fn kind(f: Failure) -> &'static str {
    match f {
        Failure::Refused => "refused",
        Failure::Reset => "reset",
        Failure::Timeout => "timeout",
        Failure::Other => "other",
    }
}

/// The corral run compared with the targets: the first corral variant (its default steering
/// unless `--corral` said otherwise).
fn corral_ll(l: &LoadReport) -> Option<&Summary> {
    l.results
        .iter()
        .find(|(v, _)| v.is_corral())
        .map(|(_, s)| s)
}

/// The peer with the lowest value of `f`.
fn best_peer(l: &LoadReport, f: impl Fn(&Summary) -> Duration) -> Option<&Summary> {
    l.results
        .iter()
        .filter(|(v, _)| !v.is_corral())
        .map(|(_, s)| s)
        .min_by_key(|s| f(s))
}

/// One ratio row: corral's value of `f` over the best peer's.
struct Ratio {
    value: f64,
    corral: Duration,
    peer: Duration,
    peer_name: &'static str,
    disturbed: bool,
}

fn ratio_of(l: &LoadReport, f: impl Fn(&Summary) -> Duration + Copy) -> Option<Ratio> {
    let c = corral_ll(l)?;
    let p = best_peer(l, f)?;
    Some(Ratio {
        value: ratio(f(c), f(p)),
        corral: f(c),
        peer: f(p),
        peer_name: p.name,
        disturbed: c.disturbed > 0 || p.disturbed > 0,
    })
}

/// "met" or "NOT met", marked when a round disturbed by other processes was kept.
fn verdict(r: &Ratio, target: f64) -> String {
    let v = met(r.value <= target);
    if r.disturbed {
        format!("{v} (disturbed)")
    } else {
        v.to_string()
    }
}

pub(super) fn print(
    ctx: &Ctx,
    o: &Options,
    reports: &[AppReport],
    load_before: &str,
    load_after: &str,
    took: Duration,
) {
    let cpus = online_cpus();
    let commit = command_line("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let pins: Vec<&str> = python::REQUIREMENTS
        .lines()
        .filter(|l| {
            ["fastapi", "uvicorn", "gunicorn", "uvicorn-worker"]
                .iter()
                .any(|p| l.split("==").next() == Some(*p))
        })
        .collect();
    let mix: Vec<String> = MIX
        .iter()
        .map(|(share, path, label)| format!("{:.1}% `{path}` ({label})", share * 100.0))
        .collect();
    println!("\n## bench peers: corral's steering against the real peers, real Python apps\n");
    println!(
        "- date {} (UTC); machine: {cpus} CPUs ({}), Linux {}; commit {commit}{}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        cpu_model(),
        command_line("uname", &["-r"]),
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    println!(
        "- {}, {} (pinned, venv {}); every server runs as nobody on 127.0.0.1",
        python::python_banner(&ctx.venv),
        pins.join(", "),
        ctx.venv.display()
    );
    println!(
        "- load average before {load_before}, after {load_after} (the machine is shared: compare \
         ratios within this run); the run took {:.1} min",
        took.as_secs_f64() / 60.0
    );
    println!(
        "- mix: {}; the handlers burn {:.2} ms of CPU per request on average (thread CPU time)",
        mix.join(", "),
        handler_cpu_ms(MIX)
    );
    println!(
        "- open loop: Poisson arrivals from fixed seeds, a new connection per request \
         (`Connection: close`), latency from the scheduled send, up to {CLIENT_THREADS} client \
         threads; per server and load {} round(s) of {} s warm-up + {} s measured, servers \
         interleaved (A B C, C B A, ...) on the same schedules; a round in which other processes \
         used over {:.0}% of the CPUs is measured again up to {} time(s){}",
        o.rounds,
        o.warmup.as_secs_f64(),
        o.measure.as_secs_f64(),
        DISTURBED * 100.0,
        o.retries,
        if o.quick {
            "\n- **--quick: a smoke test, the numbers mean little**"
        } else {
            ""
        }
    );
    for r in reports {
        print_app(r, o);
    }
    print_targets(reports);
    println!(
        "\n(disturbed: a round in which other processes used over {:.0}% of the CPUs was kept \
         after the retries)",
        DISTURBED * 100.0
    );
}

fn print_app(r: &AppReport, o: &Options) {
    println!("\n### {}\n", r.app.title());
    for (name, how) in &r.started {
        println!("- {name}: {how}");
    }
    match r.calibration {
        Some((cpu_ms, on, at)) => println!(
            "- calibration: {cpu_ms:.2} ms of server CPU per request, measured on {on} at {at:.0} \
             req/s; rates = load x {} CPUs / that",
            online_cpus()
        ),
        None => println!("- rates given with --rates (not calibrated)"),
    }
    for l in &r.loads {
        print_load(l, r);
    }
    if !r.storms.is_empty() {
        print_storms(r, o);
    }
}

fn print_load(l: &LoadReport, r: &AppReport) {
    println!(
        "\n#### load ~{:.0}% of the CPUs: {:.0} req/s (the schedules: {:.1} req/s)\n",
        l.target * 100.0,
        l.rate,
        l.planned_rate
    );
    let classes: Vec<String> = MIX
        .iter()
        .map(|m| format!("{} p50 / p99 / p99.9", m.2))
        .collect();
    println!(
        "| server | req/s | p50 | p99 | p99.9 | max | {} | failed | share % per worker | max/min | CPU: servers / machine / others |",
        classes.join(" | ")
    );
    println!("| --- |{}", " --- |".repeat(9 + MIX.len()));
    for (_, s) in &l.results {
        let per_class: Vec<String> = (0..MIX.len())
            .map(|c| {
                format!(
                    "{} / {} / {}",
                    ms(s.class_p50[c]),
                    ms(s.class_p99[c]),
                    ms(s.class_p999[c])
                )
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {:.0}% / {:.0}% / {:.0}% |",
            s.latency_cells(),
            per_class.join(" | "),
            failures(s),
            s.shares_cell(),
            share_spread(s),
            s.cpu.servers * 100.0,
            s.cpu.busy * 100.0,
            s.cpu.others() * 100.0
        );
    }
    println!("\n(latencies in ms)\n");
    println!(
        "| where requests landed (from the client) | sent to a busy worker while another was idle \
         | sent to a worker with more in flight than the least busy | in flight on their worker / \
         on the least busy, at the send (mean) | 1 ms class's slowest 1%: sent to a busy worker; \
         in flight on all workers at the send (mean) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for ((_, s), p) in l.results.iter().zip(&l.placement) {
        let (theirs, least) = p.means();
        let (tail_busy, tail_all) = p.tail();
        println!(
            "| {} | {:.1}% | {:.1}% | {theirs:.2} / {least:.2} | {tail_busy:.0}%; {tail_all:.1} |",
            s.name,
            p.busy_while_idle_pct(),
            p.behind_more_pct()
        );
    }
    println!();
    for (_, s) in &l.results {
        let mut notes = Vec::new();
        if s.peak_in_flight >= CLIENT_THREADS {
            notes.push("ALL client threads used: the schedule slipped".to_string());
        }
        if s.repeats > 0 || s.disturbed > 0 {
            notes.push(format!(
                "rounds measured again: {}, kept although disturbed: {}",
                s.repeats, s.disturbed
            ));
        }
        if s.strays > 0 {
            notes.push(format!("{} responses from unknown pids", s.strays));
        }
        if s.warmup_failures > 0 {
            notes.push(format!("{} failures in warm-up", s.warmup_failures));
        }
        if let Some(p) = &s.program {
            notes.push(format!("program counters {p}"));
        }
        if s.restarts > 0 {
            notes.push(format!("worker restarts {}", s.restarts));
        }
        notes.extend(s.failure_examples.iter().map(|e| format!("failure: {e}")));
        println!(
            "- {}: send lag p99 {} ms, peak in flight {}{}{}",
            s.name,
            ms(s.lag_p99),
            s.peak_in_flight,
            if notes.is_empty() { "" } else { "; " },
            notes.join("; ")
        );
    }
    let (t99, tfast) = r.app.targets();
    println!("\n| corral / best peer | value | corral | best peer | target | |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let rows: [(&str, f64, Option<Ratio>); 2] = [
        ("p99", t99, ratio_of(l, |s| s.p99)),
        ("1 ms CPU class p99", tfast, ratio_of(l, |s| s.class_p99[0])),
    ];
    for (what, target, rr) in rows {
        if let Some(x) = rr {
            println!(
                "| {what} | {:.2} | {} ms | {} ms ({}) | <= {target:.1} | {} |",
                x.value,
                ms(x.corral),
                ms(x.peer),
                x.peer_name,
                verdict(&x, target)
            );
        }
    }
}

fn print_storms(r: &AppReport, o: &Options) {
    println!(
        "\n#### kill storm: {:.0} req/s, the oldest serving process SIGKILLed every {:.1} s for {} \
         s\n",
        r.storm_rate,
        KILL_EVERY.as_secs_f64(),
        o.storm.as_secs_f64()
    );
    println!(
        "| server | kills | requests | failed | refused / reset / timeout / other / scheduled in \
         warm-up | connections held by the killed processes | failed beyond those | corral: \
         the slot's in-flight at the kills | 1 ms p99 | p99 | max | restarts seen by corral |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for s in &r.storms {
        let f = |k| s.failures.get(&k).copied().unwrap_or(0);
        let inflight: Option<u64> = s.kills.iter().map(|k| k.slot_inflight).sum::<Option<u64>>();
        println!(
            "| {} | {} | {} | {} | {} / {} / {} / {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            if s.no_victim > 0 {
                format!(
                    "{} ({} times no worker was serving)",
                    s.kills.len(),
                    s.no_victim
                )
            } else {
                s.kills.len().to_string()
            },
            s.requests,
            s.failed(),
            f(Failure::Refused),
            f(Failure::Reset),
            f(Failure::Timeout),
            f(Failure::Other),
            s.warmup_failures,
            s.accepted(),
            s.failed() as i64 - s.accepted() as i64,
            inflight.map_or("-".into(), |v| v.to_string()),
            ms(s.p99_fast),
            ms(s.p99),
            ms(s.max),
            s.restarts.map_or("-".into(), |v| v.to_string())
        );
    }
    for s in &r.storms {
        let mut notes = s.examples.clone();
        if s.others > DISTURBED {
            notes.insert(
                0,
                format!("other processes used {:.0}% of the CPUs", s.others * 100.0),
            );
        }
        if !notes.is_empty() {
            println!("- {}: {}", s.name, notes.join("; "));
        }
    }
    if let Some(c) = r.storms.iter().find(|s| s.is_corral) {
        let peers: Vec<&StormResult> = r.storms.iter().filter(|s| !s.is_corral).collect();
        let worst_ok = peers.iter().all(|p| c.failed() <= p.failed());
        println!(
            "\n- {} lost {} requests; the killed processes held {}: {}",
            c.name,
            c.failed(),
            c.accepted(),
            met(c.failed() <= c.accepted())
        );
        println!(
            "- {} lost {} vs {}: no more than either peer: {}",
            c.name,
            c.failed(),
            peers
                .iter()
                .map(|p| format!("{} {}", p.name, p.failed()))
                .collect::<Vec<_>>()
                .join(", "),
            met(worst_ok)
        );
    }
}

fn print_targets(reports: &[AppReport]) {
    println!("\n### targets (issue 10): corral / the best peer, this run\n");
    println!("| app | load | p99 ratio | target | | 1 ms p99 ratio | target | | share max/min: corral / peers |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in reports {
        let (t99, tfast) = r.app.targets();
        for l in &r.loads {
            let (Some(a), Some(b)) = (ratio_of(l, |s| s.p99), ratio_of(l, |s| s.class_p99[0]))
            else {
                continue;
            };
            let spreads: Vec<String> = l
                .results
                .iter()
                .filter(|(v, _)| !v.is_corral())
                .map(|(_, s)| share_spread(s))
                .collect();
            println!(
                "| {} | {:.0}% ({:.0} req/s) | {:.2} | <= {t99:.1} | {} | {:.2} | <= {tfast:.1} | {} | {} / {} |",
                r.app.key(),
                l.target * 100.0,
                l.rate,
                a.value,
                verdict(&a, t99),
                b.value,
                verdict(&b, tfast),
                corral_ll(l).map(share_spread).unwrap_or_default(),
                spreads.join(", ")
            );
        }
    }
}
