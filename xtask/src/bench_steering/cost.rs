//! What the steering adds to a connection, measured directly rather than as a difference of two
//! rates: the connection rate of this shared VM drifts by 2x between rounds of one variant
//! (BENCHMARKS.md, steering, 2026-12-07), far more than the 2% to be shown, while what least-
//! loaded adds to the hash's path is its programs' run time, which the kernel measures per run
//! (BPF_ENABLE_STATS), and its agent's ticks, which /proc measures.

use aya::programs::loaded_programs;
use aya::sys::{enable_stats, Stats};

use super::*;

/// One program's counters.
#[derive(Clone, Default)]
struct Counters {
    name: String,
    runs: u64,
    run_time: Duration,
}

/// The counters of the programs `ids`, in that order.
fn counters(ids: &[u32]) -> Result<Vec<Counters>> {
    let mut found = vec![None; ids.len()];
    for info in loaded_programs() {
        let info = info.context("listing the loaded BPF programs")?;
        if let Some(i) = ids.iter().position(|id| *id == info.id()) {
            found[i] = Some(Counters {
                name: info.name_as_str().unwrap_or("?").to_string(),
                runs: info.run_count(),
                run_time: info.run_time(),
            });
        }
    }
    found
        .into_iter()
        .zip(ids)
        .map(|(c, id)| c.with_context(|| format!("steering program {id} is not loaded")))
        .collect()
}

/// One closed-loop round on (d) with the kernel's run-time statistics on.
pub(super) struct ProgramCost {
    /// Connections served in the round.
    pub(super) connections: u64,
    /// Program runs per connection (the select program once, the tracker at each state change
    /// of either end that passes its state filter: on loopback the client's end too).
    pub(super) runs_per_connection: f64,
    /// The programs' run time per connection.
    pub(super) per_connection: Duration,
    /// Per program: its name, runs per connection and mean run time.
    pub(super) programs: Vec<(String, f64, Duration)>,
    pub(super) cpu: Cpu,
}

/// Measure (d)'s programs (`ids`, from its status) over a round of `length`. Statistics are on
/// only for this round (they cost two clock reads per run, which the rate rounds must not pay),
/// and off again when the descriptor closes, also if this fails.
pub(super) fn program_cost(
    servers: &Servers,
    ids: &[u32],
    length: Duration,
) -> Result<ProgramCost> {
    if ids.is_empty() {
        bail!("the least-loaded agent's status names no steering programs");
    }
    let _on = enable_stats(Stats::RunTime)
        .context("turning on the kernel's BPF run-time statistics (BPF_ENABLE_STATS)")?;
    let before = counters(ids)?;
    let (ok, _failed, cpu) = closed_loop(servers, length);
    let after = counters(ids)?;
    let connections = ok.max(1) as f64;
    let programs: Vec<(String, f64, Duration)> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| {
            let runs = a.runs - b.runs;
            let time = a.run_time - b.run_time;
            (
                a.name.clone(),
                runs as f64 / connections,
                Duration::from_secs_f64(time.as_secs_f64() / runs.max(1) as f64),
            )
        })
        .collect();
    let total: Duration = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.run_time - b.run_time)
        .sum();
    Ok(ProgramCost {
        connections: ok,
        runs_per_connection: programs.iter().map(|p| p.1).sum(),
        per_connection: Duration::from_secs_f64(total.as_secs_f64() / connections),
        programs,
        cpu,
    })
}

/// CPU time per connection of a round: the servers' side (workers, agent and the kernel's work
/// for them: the whole machine less the client) and the agent's alone.
pub(super) fn per_connection(cpu: &Cpu, rate: f64) -> (Duration, Duration) {
    let cpus = online_cpus() as f64;
    let each = |share: f64| Duration::from_secs_f64((share * cpus / rate.max(1.0)).max(0.0));
    (each(cpu.busy - cpu.client), each(cpu.agent))
}

/// What least-loaded adds per connection, as a share of the hash's server-side CPU per
/// connection: its programs' run time, and its agent's CPU beyond the hash agent's.
pub(super) fn overhead(
    program: Duration,
    agent_d: Duration,
    agent_b: Duration,
    hash: Duration,
) -> f64 {
    let added = program.as_secs_f64() + (agent_d.as_secs_f64() - agent_b.as_secs_f64()).max(0.0);
    added / hash.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_overhead_is_what_least_loaded_adds_over_the_hash_per_connection() {
        // 0.5 µs of programs and 0.3 µs more agent time on a 40 µs connection: 2%.
        let o = overhead(US / 2, US * 4 / 10, US / 10, US * 40);
        assert!((o - 0.02).abs() < 1e-9, "{o}");
        // An agent that happened to use less than the hash's adds nothing, never a credit.
        assert_eq!(overhead(Duration::ZERO, US, US * 2, US * 40), 0.0);
    }

    #[test]
    fn cpu_per_connection_counts_the_servers_side_only() {
        let cpu = Cpu {
            busy: 0.9,
            client: 0.4,
            servers: 0.3,
            agent: 0.01,
            steal: 0.0,
        };
        let (server, agent) = per_connection(&cpu, 10_000.0);
        let cpus = online_cpus() as f64;
        let close = |d: Duration, want: f64| (d.as_secs_f64() - want).abs() < 1e-12;
        assert!(close(server, 0.5 * cpus / 10_000.0), "{server:?}");
        assert!(close(agent, 0.01 * cpus / 10_000.0), "{agent:?}");
    }
}
