//! Facts about this machine: memory, CPUs, privilege.

use std::io;

/// MemTotal from /proc/meminfo, in bytes.
pub fn mem_total() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_total(&text).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "no MemTotal line in /proc/meminfo")
    })
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
