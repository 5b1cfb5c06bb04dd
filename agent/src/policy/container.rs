//! Container limits: what the agent's own cgroup and its ancestors allow, against what the
//! machine has. Inside a container (Kubernetes, podman, Docker) /proc/meminfo and the online
//! CPUs describe the node, not the pod: a pod limited to 2 GiB on a 64 GiB node must be
//! budgeted at 2 GiB, and `count = "auto"` on a 2-CPU pod of a 64-CPU node means 2 workers.
//!
//! cgroup v2 enforces the lowest `memory.max` and the tightest `cpu.max` on the path from the
//! agent's cgroup up to the root, so the lowest of them wins. `sys::cgroup::ancestor_limits`
//! reads the files; this module parses them and decides, with the source named for messages.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::ByteSize;

/// One cgroup on the path from the agent's cgroup to the root, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupReading {
    /// The cgroup's directory (for messages).
    pub dir: PathBuf,
    /// Whether `dir` is the cgroup2 mount point. A mount point with a `memory.max` is not the
    /// host's root cgroup (which has none): it is a container's view of its own cgroup.
    pub at_mount: bool,
    /// `memory.max`, or `None` when the file is absent (the root cgroup, or no memory
    /// controller enabled there).
    pub memory_max: Option<String>,
    /// `cpu.max`, or `None` when absent.
    pub cpu_max: Option<String>,
}

/// Where a limit comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitSource {
    /// The machine: MemTotal in /proc/meminfo, or the online CPUs.
    Machine,
    /// A cgroup interface file of the agent's cgroup or an ancestor.
    Cgroup {
        /// The file, e.g. `/sys/fs/cgroup/kubepods/pod1/memory.max`.
        file: PathBuf,
        /// The file's content, trimmed (`2147483648`, `200000 100000`).
        value: String,
        /// The file is at the cgroup2 mount point of a cgroup namespace: the container's own.
        container: bool,
    },
    /// The cgroup root corral was given (`[agent] cgroup_root`) has a memory.max of its own.
    CgroupRoot { file: PathBuf },
}

/// The memory corral may plan for, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryCeiling {
    pub bytes: ByteSize,
    pub source: LimitSource,
}

impl MemoryCeiling {
    /// The machine's memory, no cgroup limit below it.
    pub fn machine(bytes: ByteSize) -> MemoryCeiling {
        MemoryCeiling {
            bytes,
            source: LimitSource::Machine,
        }
    }

    /// Where the number comes from, for messages: `MemTotal in /proc/meminfo`, `the
    /// container's memory.max = 2GiB at /sys/fs/cgroup/memory.max`.
    pub fn describe_source(&self) -> String {
        match &self.source {
            LimitSource::Machine => "MemTotal in /proc/meminfo".to_string(),
            LimitSource::Cgroup {
                file, container, ..
            } => format!(
                "{} memory.max = {} at {}",
                if *container {
                    "the container's"
                } else {
                    "the agent's cgroup's"
                },
                crate::policy::budget::human(self.bytes),
                file.display()
            ),
            LimitSource::CgroupRoot { file } => format!(
                "the cgroup root's memory.max = {} at {}",
                crate::policy::budget::human(self.bytes),
                file.display()
            ),
        }
    }
}

impl From<ByteSize> for MemoryCeiling {
    fn from(bytes: ByteSize) -> MemoryCeiling {
        MemoryCeiling::machine(bytes)
    }
}

/// How many CPUs `count = "auto"` means, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuCeiling {
    pub cpus: u32,
    pub source: LimitSource,
}

impl fmt::Display for CpuCeiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            LimitSource::Cgroup {
                file,
                value,
                container,
            } => write!(
                f,
                "{} cpu.max = {value} at {} allows {} CPU{}",
                if *container {
                    "the container's"
                } else {
                    "the agent's cgroup's"
                },
                file.display(),
                self.cpus,
                if self.cpus == 1 { "" } else { "s" }
            ),
            _ => write!(f, "one per online CPU"),
        }
    }
}

/// A cgroup file that did not parse: ignored (the other limits still count), reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ignoring {file}: cannot parse {text:?} ({why})", file = file.display())]
pub struct Malformed {
    pub file: PathBuf,
    pub text: String,
    pub why: &'static str,
}

/// A `memory.max` value: `Some(bytes)`, or `None` for `max` (no limit).
pub fn parse_memory_max(text: &str) -> Result<Option<u64>, &'static str> {
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse::<u64>()
        .map(Some)
        .map_err(|_| "expected a number of bytes or `max`")
}

/// A `cpu.max` value (`$QUOTA $PERIOD`, both in microseconds; the period may be left out and
/// is then 100000): the CPUs it allows, `ceil(quota / period)` and at least 1, or `None` for a
/// quota of `max`.
pub fn parse_cpu_max(text: &str) -> Result<Option<u32>, &'static str> {
    let mut it = text.split_whitespace();
    let quota = it.next().ok_or("empty")?;
    let period = match it.next() {
        Some(p) => p
            .parse::<u64>()
            .map_err(|_| "the period must be a number of microseconds")?,
        None => 100_000,
    };
    if it.next().is_some() {
        return Err("expected `$QUOTA $PERIOD`");
    }
    if period == 0 {
        return Err("the period is 0");
    }
    if quota == "max" {
        return Ok(None);
    }
    let quota = quota
        .parse::<u64>()
        .map_err(|_| "the quota must be a number of microseconds or `max`")?;
    let cpus = quota.div_ceil(period).max(1);
    Ok(Some(u32::try_from(cpus).unwrap_or(u32::MAX)))
}

/// The cgroups from `own` up to the root, `own` first: `/a/b` gives `/a/b`, `/a`, `/`.
pub fn ancestors(own: &Path) -> Vec<PathBuf> {
    own.ancestors().map(Path::to_path_buf).collect()
}

fn source(r: &CgroupReading, name: &str, text: &str) -> LimitSource {
    LimitSource::Cgroup {
        file: r.dir.join(name),
        value: text.trim().to_string(),
        container: r.at_mount,
    }
}

/// The lowest of `mem_total` and every `memory.max` in `readings` (the first named on a tie:
/// the agent's own cgroup before its ancestors). Malformed files are ignored and returned.
pub fn memory_ceiling(
    mem_total: ByteSize,
    readings: &[CgroupReading],
) -> (MemoryCeiling, Vec<Malformed>) {
    let mut best = MemoryCeiling::machine(mem_total);
    let mut bad = Vec::new();
    for r in readings {
        let Some(text) = &r.memory_max else { continue };
        match parse_memory_max(text) {
            Ok(Some(bytes)) if bytes < best.bytes.0 => {
                best = MemoryCeiling {
                    bytes: ByteSize(bytes),
                    source: source(r, "memory.max", text),
                }
            }
            Ok(_) => {}
            Err(why) => bad.push(Malformed {
                file: r.dir.join("memory.max"),
                text: text.clone(),
                why,
            }),
        }
    }
    (best, bad)
}

/// The fewest of `online` and the CPUs every `cpu.max` in `readings` allows.
pub fn cpu_ceiling(online: u32, readings: &[CgroupReading]) -> (CpuCeiling, Vec<Malformed>) {
    let mut best = CpuCeiling {
        cpus: online.max(1),
        source: LimitSource::Machine,
    };
    let mut bad = Vec::new();
    for r in readings {
        let Some(text) = &r.cpu_max else { continue };
        match parse_cpu_max(text) {
            Ok(Some(cpus)) if cpus < best.cpus => {
                best = CpuCeiling {
                    cpus,
                    source: source(r, "cpu.max", text),
                }
            }
            Ok(_) => {}
            Err(why) => bad.push(Malformed {
                file: r.dir.join("cpu.max"),
                text: text.clone(),
                why,
            }),
        }
    }
    (best, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn reading(dir: &str, mem: Option<&str>, cpu: Option<&str>) -> CgroupReading {
        CgroupReading {
            dir: PathBuf::from(dir),
            at_mount: dir == "/sys/fs/cgroup",
            memory_max: mem.map(str::to_string),
            cpu_max: cpu.map(str::to_string),
        }
    }

    #[test]
    fn memory_max_values() {
        assert_eq!(parse_memory_max("max\n"), Ok(None));
        assert_eq!(parse_memory_max("2147483648\n"), Ok(Some(2 * GIB)));
        assert_eq!(parse_memory_max("0"), Ok(Some(0)));
        assert!(parse_memory_max("").is_err());
        assert!(parse_memory_max("2G").is_err());
        assert!(parse_memory_max("-1").is_err());
        assert!(parse_memory_max("max max").is_err());
    }

    #[test]
    fn cpu_max_values() {
        assert_eq!(parse_cpu_max("max 100000\n"), Ok(None));
        assert_eq!(parse_cpu_max("max"), Ok(None));
        assert_eq!(parse_cpu_max("200000 100000\n"), Ok(Some(2)));
        // 1.5 CPUs: two workers can each use most of one.
        assert_eq!(parse_cpu_max("150000 100000"), Ok(Some(2)));
        assert_eq!(parse_cpu_max("100001 100000"), Ok(Some(2)));
        // 0.25 CPU is still one worker.
        assert_eq!(parse_cpu_max("25000 100000"), Ok(Some(1)));
        assert_eq!(parse_cpu_max("50000"), Ok(Some(1)));
        assert_eq!(parse_cpu_max("400000"), Ok(Some(4)));
        assert_eq!(
            parse_cpu_max("u64max 1"),
            Err("the quota must be a number of microseconds or `max`")
        );
        assert!(parse_cpu_max("").is_err());
        assert!(parse_cpu_max("100000 0").is_err());
        assert!(parse_cpu_max("100000 x").is_err());
        assert!(parse_cpu_max("1 2 3").is_err());
        assert_eq!(parse_cpu_max("18446744073709551615 1"), Ok(Some(u32::MAX)));
    }

    #[test]
    fn ancestors_walk_to_the_root() {
        assert_eq!(
            ancestors(Path::new("/kubepods/pod1/c1")),
            ["/kubepods/pod1/c1", "/kubepods/pod1", "/kubepods", "/"].map(PathBuf::from)
        );
        assert_eq!(ancestors(Path::new("/")), [PathBuf::from("/")]);
    }

    #[test]
    fn lowest_memory_max_wins_at_any_depth() {
        let readings = [
            reading("/sys/fs/cgroup/kubepods/pod1/c1", Some("max"), None),
            reading("/sys/fs/cgroup/kubepods/pod1", Some("2147483648"), None),
            reading("/sys/fs/cgroup/kubepods", Some("8589934592"), None),
            reading("/sys/fs/cgroup", None, None),
        ];
        let (c, bad) = memory_ceiling(ByteSize(64 * GIB), &readings);
        assert!(bad.is_empty());
        assert_eq!(c.bytes, ByteSize(2 * GIB));
        assert_eq!(
            c.describe_source(),
            "the agent's cgroup's memory.max = 2GiB at /sys/fs/cgroup/kubepods/pod1/memory.max"
        );
        // The machine is smaller than every limit: MemTotal stands.
        let (c, _) = memory_ceiling(ByteSize(GIB), &readings);
        assert_eq!(c, MemoryCeiling::machine(ByteSize(GIB)));
        assert_eq!(c.describe_source(), "MemTotal in /proc/meminfo");
    }

    #[test]
    fn a_container_names_its_own_limit() {
        // In a cgroup namespace the container's cgroup is the mount point.
        let readings = [reading(
            "/sys/fs/cgroup",
            Some("2147483648\n"),
            Some("200000 100000\n"),
        )];
        let (m, _) = memory_ceiling(ByteSize(64 * GIB), &readings);
        assert_eq!(
            m.describe_source(),
            "the container's memory.max = 2GiB at /sys/fs/cgroup/memory.max"
        );
        let (c, _) = cpu_ceiling(64, &readings);
        assert_eq!(c.cpus, 2);
        assert_eq!(
            c.to_string(),
            "the container's cpu.max = 200000 100000 at /sys/fs/cgroup/cpu.max allows 2 CPUs"
        );
    }

    #[test]
    fn no_limits_is_the_machine() {
        let readings = [
            reading("/sys/fs/cgroup/a", Some("max"), Some("max 100000")),
            reading("/sys/fs/cgroup", None, None),
        ];
        let (m, bad) = memory_ceiling(ByteSize(64 * GIB), &readings);
        assert_eq!(m, MemoryCeiling::machine(ByteSize(64 * GIB)));
        assert!(bad.is_empty());
        let (c, _) = cpu_ceiling(8, &readings);
        assert_eq!(c.cpus, 8);
        assert_eq!(c.source, LimitSource::Machine);
        assert_eq!(c.to_string(), "one per online CPU");
        assert_eq!(cpu_ceiling(0, &[]).0.cpus, 1);
    }

    #[test]
    fn tightest_cpu_max_wins_and_the_inner_one_on_a_tie() {
        let readings = [
            reading("/sys/fs/cgroup/a/b", Some("max"), Some("300000 100000")),
            reading("/sys/fs/cgroup/a", None, Some("300000 100000")),
            reading("/sys/fs/cgroup", None, Some("max 100000")),
        ];
        let (c, _) = cpu_ceiling(16, &readings);
        assert_eq!(c.cpus, 3);
        assert!(
            matches!(&c.source, LimitSource::Cgroup { file, .. } if file == Path::new("/sys/fs/cgroup/a/b/cpu.max")),
            "{c:?}"
        );
        // Fewer CPUs online than the quota allows: the CPUs stand.
        assert_eq!(cpu_ceiling(2, &readings).0.cpus, 2);
    }

    #[test]
    fn malformed_files_are_ignored_and_named() {
        let readings = [
            reading("/sys/fs/cgroup/a", Some("lots"), Some("fast 100000")),
            reading("/sys/fs/cgroup", Some("1073741824"), Some("100000 100000")),
        ];
        let (m, bad) = memory_ceiling(ByteSize(64 * GIB), &readings);
        assert_eq!(m.bytes, ByteSize(GIB));
        assert_eq!(
            bad,
            [Malformed {
                file: PathBuf::from("/sys/fs/cgroup/a/memory.max"),
                text: "lots".into(),
                why: "expected a number of bytes or `max`",
            }]
        );
        assert_eq!(
            bad[0].to_string(),
            "ignoring /sys/fs/cgroup/a/memory.max: cannot parse \"lots\" (expected a number of bytes or `max`)"
        );
        let (c, bad) = cpu_ceiling(8, &readings);
        assert_eq!(c.cpus, 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].file, PathBuf::from("/sys/fs/cgroup/a/cpu.max"));
    }
}
