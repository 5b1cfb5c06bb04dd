//! Facts about this machine: memory, CPUs, privilege.

use std::io;

const MEMINFO: &str = "/proc/meminfo";

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no MemTotal line in {path}")]
    NoMemTotal { path: &'static str },
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn mem_total() -> Result<u64, MachineError> {
    let text = std::fs::read_to_string(MEMINFO).map_err(|source| MachineError::Read {
        path: MEMINFO,
        source,
    })?;
    parse_meminfo_total(&text).ok_or(MachineError::NoMemTotal { path: MEMINFO })
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Online CPUs (what `count = "auto"` means).
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n < 1 {
        1
    } else {
        n as u32
    }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo() {
        let t = "MemTotal:       24594892 kB\nMemFree: 1 kB\n";
        assert_eq!(super::parse_meminfo_total(t), Some(24594892 * 1024));
        assert_eq!(super::parse_meminfo_total("x"), None);
    }
}

/// What /proc says about a process's memory and CPU use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub cpu_ms: u64,
}

/// RSS, peak RSS and CPU time of `pid`, or `None` if it is gone. (Per-worker cgroup numbers
/// replace these where cgroup v2 memory accounting is available.)
pub fn process_stats(pid: i32) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ProcStats {
        rss_bytes: kib("VmRSS:").unwrap_or(0),
        peak_rss_bytes: kib("VmHWM:").unwrap_or(0),
        cpu_ms: ticks * 1000 / hz,
    })
}

/// The open-file limit the agent started with, restored in every child it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raise the agent's own soft RLIMIT_NOFILE to its hard limit (it holds about six fds per
/// worker: socket, pidfd, two output pipes, cgroup leaf, memory watch) and return the limit it
/// had, which children get back: many programs still use select() and expect 1024.
pub fn raise_nofile() -> Result<NofileLimit, MachineError> {
    let err = |call| MachineError::Syscall {
        call,
        source: io::Error::last_os_error(),
    };
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == -1 {
        return Err(err("getrlimit(RLIMIT_NOFILE)"));
    }
    let old = NofileLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    };
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one is
        // always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == -1 {
            return Err(err("setrlimit(RLIMIT_NOFILE)"));
        }
    }
    Ok(old)
}

static CHILD_NOFILE: std::sync::OnceLock<NofileLimit> = std::sync::OnceLock::new();

/// Remember the limit children get (set once, at agent start).
pub fn set_child_nofile(l: NofileLimit) {
    let _ = CHILD_NOFILE.set(l);
}

/// The limit children get, if the agent raised its own.
pub fn child_nofile() -> Option<NofileLimit> {
    CHILD_NOFILE.get().copied()
}

/// /proc/net/tls_stat as name -> value (empty when the kernel has no tls module loaded).
pub fn tls_stat() -> std::collections::BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// CLOCK_BOOTTIME in milliseconds: comparable across processes and agent restarts (suspend
/// included), unlike `Instant`.
pub fn boot_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}
