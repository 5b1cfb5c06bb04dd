//! CPU time per measured window: the machine, the servers, the agent, the client and everyone
//! else, from /proc, to tell a disturbed window from a clean one.

use super::*;

/// CPU use over the measured window, as shares of all CPUs' time.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    /// The whole machine, stolen time (the hypervisor ran someone else) excluded.
    pub(crate) busy: f64,
    /// The client (this process).
    pub(crate) client: f64,
    /// The workers and the agent.
    pub(crate) servers: f64,
    /// The agent alone (included in `servers`).
    pub(crate) agent: f64,
    pub(crate) steal: f64,
}

impl Cpu {
    /// What neither the benchmark's servers nor its client used: other processes on this
    /// shared machine (and a little kernel work charged to no process).
    pub(crate) fn others(&self) -> f64 {
        (self.busy - self.servers - self.client).max(0.0)
    }
}

/// A measurement during which other processes used more than this share of the CPUs is
/// repeated (each variant and each block of connection-rate rounds alike).
pub(crate) const DISTURBED: f64 = 0.10;
/// At most this many measurements of one segment (then the last one counts, and the report
/// says it was disturbed). Connection-rate blocks: at most as many discarded as asked for.
pub(super) const ATTEMPTS: usize = 5;

/// (busy, steal, total) jiffies of all CPUs, from /proc/stat.
pub(super) fn cpu_jiffies() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let (idle, steal) = (at(3) + at(4), at(7));
    (total - idle - steal, steal, total)
}

/// CPU time of a process (all its threads), in jiffies; "self" is this one.
pub(super) fn proc_jiffies(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// The machine is shared (builds, tests): wait, up to 30 s, until it has been nearly idle
/// (under 10% busy, the idle servers included) for a second, so a variant does not start in the
/// middle of someone else's burst. Says so when it gives up.
pub(super) fn wait_quiet() {
    wait_quiet_for(Duration::from_secs(30))
}

/// [`wait_quiet`], giving up after `limit`.
pub(crate) fn wait_quiet_for(limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut quiet = 0;
    let mut last = cpu_jiffies();
    while quiet < 2 {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_jiffies();
        let busy = (now.0 - last.0) as f64 / (now.2 - last.2).max(1) as f64;
        last = now;
        quiet = if busy < 0.10 { quiet + 1 } else { 0 };
        if Instant::now() > deadline {
            eprintln!(
                "bench: the machine is still busy ({:.0}%); going on",
                busy * 100.0
            );
            return;
        }
    }
}

/// Counters for [`Cpu`].
pub(super) struct CpuSample {
    /// (busy, steal, total) of the machine.
    machine: (u64, u64, u64),
    client: u64,
    workers: u64,
    agent: u64,
}

impl CpuSample {
    pub(super) fn take(servers: &Servers) -> CpuSample {
        let of = |p: &i32| proc_jiffies(&p.to_string());
        CpuSample {
            machine: cpu_jiffies(),
            client: proc_jiffies("self"),
            workers: servers.pids.iter().map(of).sum(),
            agent: servers.agent_pid.as_ref().map(of).unwrap_or(0),
        }
    }

    pub(super) fn until(&self, later: &CpuSample) -> Cpu {
        let total = (later.machine.2 - self.machine.2).max(1) as f64;
        Cpu {
            busy: (later.machine.0 - self.machine.0) as f64 / total,
            client: later.client.saturating_sub(self.client) as f64 / total,
            servers: (later.workers + later.agent).saturating_sub(self.workers + self.agent) as f64
                / total,
            agent: later.agent.saturating_sub(self.agent) as f64 / total,
            steal: (later.machine.1 - self.machine.1) as f64 / total,
        }
    }
}

pub(crate) fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
