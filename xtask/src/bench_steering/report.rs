//! The printed report: the setup, the per-variant tables and the verdicts against the targets.

use super::*;

/// What was run: the arrival rate, the windows, the servers and the mix.
pub(super) fn header(o: &Options, planned: usize, measure: Duration, mix: &[String]) {
    println!(
        "\nopen loop: Poisson arrivals at {:.0} req/s (these schedules: {:.1} req/s in the \
         measured windows; the same for every variant), {} s measured per variant ({} segment(s) of \
         {} s, each after {} s of warm-up, variants interleaved); {} workers x {} threads, {} \
         accept; mix {}",
        o.rate,
        planned as f64 / measure.as_secs_f64(),
        measure.as_secs(),
        o.segments,
        o.segment.as_secs(),
        o.warmup.as_secs(),
        WORKERS,
        o.threads,
        o.accept,
        mix.join(", ")
    );
}

/// One row per variant, p99 by request class, and each variant's details.
pub(super) fn results(results: &[Summary]) {
    println!(
        "| variant | req/s | p50 | p99 | p99.9 | max (ms) | refused / reset / timeout / other | \
         per-worker share % | CPU busy: all (bench) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for s in results {
        let f = |k| s.failures.get(&k).copied().unwrap_or(0);
        println!(
            "| {} | {} / {} / {} / {} | {} | {:.0}% ({:.0}%) |",
            s.latency_cells(),
            f(Failure::Refused),
            f(Failure::Reset),
            f(Failure::Timeout),
            f(Failure::Other),
            s.shares_cell(),
            s.cpu.busy * 100.0,
            (s.cpu.client + s.cpu.servers) * 100.0
        );
    }
    println!("\np99 by request class (ms):");
    let header: Vec<&str> = MIX.iter().map(|m| m.2).collect();
    println!("| variant | {} |", header.join(" | "));
    println!("| --- |{}", " --- |".repeat(MIX.len()));
    for s in results {
        let v: Vec<String> = s.class_p99.iter().map(|d| ms(*d)).collect();
        println!("| {} | {} |", s.name, v.join(" | "));
    }
    println!();
    for s in results {
        println!("{}: {}", s.name, s.steering);
        println!(
            "    schedule kept: send lag p99 {} ms, max {} ms; peak in flight {} of {} client \
             threads{}",
            ms(s.lag_p99),
            ms(s.lag_max),
            s.peak_in_flight,
            CLIENT_THREADS,
            if s.peak_in_flight >= CLIENT_THREADS {
                " (ALL USED: the schedule slipped)"
            } else {
                ""
            }
        );
        println!(
            "    CPU, share of all CPUs: machine {:.0}%, servers {:.0}% (agent {:.1}%), client {:.0}%, \
             others {:.0}%, stolen {:.0}%",
            s.cpu.busy * 100.0,
            s.cpu.servers * 100.0,
            s.cpu.agent * 100.0,
            s.cpu.client * 100.0,
            s.cpu.others() * 100.0,
            s.cpu.steal * 100.0
        );
        if s.repeats > 0 || s.disturbed > 0 {
            println!(
                "    segments measured again because other processes used over {:.0}% of the \
                 CPUs: {}; kept although DISTURBED (after {ATTEMPTS} tries): {}",
                DISTURBED * 100.0,
                s.repeats,
                s.disturbed
            );
        }
        if let Some(p) = &s.program {
            println!("    program counters: {p}; worker restarts: {}", s.restarts);
        }
        if s.strays > 0 {
            println!("    {} responses from unknown pids", s.strays);
        }
        if s.warmup_failures > 0 {
            println!("    {} failures during warm-up", s.warmup_failures);
        }
        for e in &s.failure_examples {
            println!("    failure: {e}");
        }
    }
}

/// The p99 ratios against their targets.
fn latency_verdicts(results: &[Summary]) {
    let a = &results[0];
    let b = &results[1];
    let d = &results[3];
    let da = d.p99.as_secs_f64() / a.p99.as_secs_f64();
    let db = d.p99.as_secs_f64() / b.p99.as_secs_f64();
    let verdict = |ok: bool, involved: &[&Summary]| -> String {
        match involved.iter().find(|s| s.disturbed > 0) {
            Some(s) => format!("no verdict: {} was disturbed by other processes", s.name),
            None => met(ok).to_string(),
        }
    };
    println!(
        "| (d) p99 / (a) p99 | {da:.2} | <= 0.5 | {} |",
        verdict(da <= 0.5, &[a, d])
    );
    println!(
        "| (d) p99 / (b) p99 | {db:.2} | <= 0.7 | {} |",
        verdict(db <= 0.7, &[b, d])
    );
}

/// The ratios against their targets, with no verdict where a window was disturbed.
/// `results`: none with `--cost`.
pub(super) fn verdicts(
    results: Option<&[Summary]>,
    rate: &RateSummary,
    rounds: &[Round],
    program: &cost::ProgramCost,
    quick: bool,
) {
    println!("\n| ratio | value | target | |");
    println!("| --- | --- | --- | --- |");
    if let Some(results) = results {
        latency_verdicts(results);
    }
    let overhead = (1.0 - rate.ratio) * 100.0;
    let rate_verdict = if rounds.iter().any(|r| r.cpu.others() > DISTURBED) {
        "no verdict: rounds were disturbed by other processes".to_string()
    } else {
        match rate.ci {
            Some(h) if overhead + h * 100.0 <= 2.0 => "met".to_string(),
            Some(h) if overhead - h * 100.0 > 2.0 => "NOT met".to_string(),
            Some(_) => format!(
                "not resolved: the point estimate is {}, but the noise is wider than the target",
                if overhead <= 2.0 { "within" } else { "over" }
            ),
            None => format!(
                "{} (one block: no confidence interval)",
                met(overhead <= 2.0)
            ),
        }
    };
    println!(
        "| (d) / (b) connections per second | {:.3} (overhead {overhead:.1}%{}) | overhead <= 2% \
         | {} |",
        rate.ratio,
        match rate.ci {
            Some(h) => format!(
                "; 95% CI of the overhead {:.1}% .. {:.1}%",
                overhead - h * 100.0,
                overhead + h * 100.0
            ),
            None => String::new(),
        },
        rate_verdict
    );
    // The direct measure: what least-loaded adds per connection against the hash's CPU per
    // connection, both from this run's rounds.
    let mean = |tag: char, f: &dyn Fn(&Round) -> Duration| {
        let mine: Vec<&Round> = rounds.iter().filter(|r| r.tag == tag).collect();
        mine.iter().map(|r| f(r)).sum::<Duration>() / mine.len().max(1) as u32
    };
    let server = |r: &Round| cost::per_connection(&r.cpu, r.rate).0;
    let agent = |r: &Round| cost::per_connection(&r.cpu, r.rate).1;
    let (hash, agent_b, agent_d) = (mean('b', &server), mean('b', &agent), mean('d', &agent));
    let direct = cost::overhead(program.per_connection, agent_d, agent_b, hash);
    let disturbed =
        program.cpu.others() > DISTURBED || rounds.iter().any(|r| r.cpu.others() > DISTURBED);
    println!(
        "| least-loaded's added CPU per connection / the hash's | {:.2}% ({:.2} µs of programs in \
         {:.1} runs, agent {:.2} µs against the hash's {:.2} µs; the hash's servers' side {:.1} \
         µs per connection, (d)'s {:.1} µs) | <= 2% | {} |",
        direct * 100.0,
        program.per_connection.as_secs_f64() * 1e6,
        program.runs_per_connection,
        agent_d.as_secs_f64() * 1e6,
        agent_b.as_secs_f64() * 1e6,
        hash.as_secs_f64() * 1e6,
        mean('d', &server).as_secs_f64() * 1e6,
        if disturbed {
            "no verdict: rounds were disturbed by other processes".to_string()
        } else {
            met(direct <= 0.02).to_string()
        }
    );
    println!(
        "    (the programs' run time from the kernel's statistics over one more round of (d), {} \
         connections: {}; CPU per connection from the rate rounds: the machine's busy time less \
         the client's, over the connections)",
        program.connections,
        program
            .programs
            .iter()
            .map(|(name, runs, each)| format!(
                "{name} {runs:.1} runs per connection of {:.0} ns",
                each.as_secs_f64() * 1e9
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if quick {
        println!("\n(--quick: a smoke test; the numbers mean little)");
    }
}
