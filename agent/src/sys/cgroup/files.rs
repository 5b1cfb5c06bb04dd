//! The interface files' formats: flat-keyed `key value` lines (memory.events, cpu.stat,
//! cgroup.events) and `cgroup.procs`, and reading an events file again through its fd.

use std::io;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;

/// `key value` lines (memory.events, cpu.stat, cgroup.events, ...).
pub fn flat_keyed(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|l| {
        let mut it = l.split_whitespace();
        Some((it.next()?, it.next()?))
    })
}

/// The numeric value of `key` in a flat-keyed file.
pub fn flat_value(text: &str, key: &str) -> Option<u64> {
    flat_keyed(text)
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// Counters of `memory.events`. Keys the kernel does not have (oom_group_kill before 5.13) read
/// as 0. The counters only grow: compare with the previous read to see what happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    pub low: u64,
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
    pub oom_group_kill: u64,
}

impl MemoryEvents {
    pub fn parse(text: &str) -> MemoryEvents {
        let v = |k| flat_value(text, k).unwrap_or(0);
        MemoryEvents {
            low: v("low"),
            high: v("high"),
            max: v("max"),
            oom: v("oom"),
            oom_kill: v("oom_kill"),
            oom_group_kill: v("oom_group_kill"),
        }
    }
}

/// `cgroup.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupEvents {
    /// Some process lives in this cgroup or below.
    pub populated: bool,
    pub frozen: bool,
}

impl CgroupEvents {
    /// `None` without a `populated` line.
    pub fn parse(text: &str) -> Option<CgroupEvents> {
        Some(CgroupEvents {
            populated: flat_value(text, "populated")? != 0,
            frozen: flat_value(text, "frozen").unwrap_or(0) != 0,
        })
    }
}

/// The pids in a `cgroup.procs` text, one per line.
pub(super) fn parse_pids(text: &str) -> Option<Vec<i32>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().ok())
        .collect()
}

/// Which events file to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsFile {
    /// `cgroup.events`: `populated` drops to 0 when the last process exits.
    Cgroup,
    /// `memory.events`: `oom_kill`, `high`, ... counters.
    Memory,
}

impl EventsFile {
    pub fn file_name(self) -> &'static str {
        match self {
            EventsFile::Cgroup => "cgroup.events",
            EventsFile::Memory => "memory.events",
        }
    }
}

/// Read a whole small file from offset 0 through `fd`: an events file after a notification
/// ([`Leaf::events_fd`](super::Leaf::events_fd)), without reopening it.
pub fn read_fd(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match rustix::io::pread(fd, &mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files() {
        let ev =
            MemoryEvents::parse("low 1\nhigh 20\nmax 3\noom 4\noom_kill 5\noom_group_kill 6\n");
        assert_eq!(
            ev,
            MemoryEvents {
                low: 1,
                high: 20,
                max: 3,
                oom: 4,
                oom_kill: 5,
                oom_group_kill: 6
            }
        );
        // Before 5.13 there is no oom_group_kill.
        let old = MemoryEvents::parse("low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n");
        assert_eq!(old.oom_kill, 1);
        assert_eq!(old.oom_group_kill, 0);

        let stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(flat_value(stat, "usage_usec"), Some(123456));
        assert_eq!(flat_value(stat, "nr_throttled"), None);
        assert_eq!(flat_value("usage_usec x\n", "usage_usec"), None);

        assert_eq!(
            CgroupEvents::parse("populated 1\nfrozen 0\n"),
            Some(CgroupEvents {
                populated: true,
                frozen: false
            })
        );
        assert_eq!(
            CgroupEvents::parse("populated 0\n").map(|e| e.populated),
            Some(false)
        );
        assert_eq!(CgroupEvents::parse("frozen 1\n"), None);

        assert_eq!(parse_pids("12\n345\n"), Some(vec![12, 345]));
        assert_eq!(parse_pids(""), Some(vec![]));
        assert_eq!(parse_pids("12\nx\n"), None);
    }
}
