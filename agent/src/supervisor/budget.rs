//! The memory budget wherever the plan changes: at start (and `corral check`,
//! `reexec-check`), on a reload and on `corral scale`. The arithmetic is `policy::budget`'s and
//! `policy::container`'s; this adds what only the machine knows: MemTotal, the online CPUs, and
//! the cgroup limits above the agent (a container's memory.max and cpu.max), read each time the
//! plan changes so a resized pod is seen at the next reload.

use std::path::Path;

use crate::config::{App, AppName, ByteSize, WorkerCount};
use crate::policy::budget::{self, Budget};
use crate::policy::container::{self, CgroupReading, CpuCeiling, MemoryCeiling};
use crate::sys::{cgroup, machine};

/// The cgroup mount corral looks at.
const MOUNT: &str = "/sys/fs/cgroup";

/// One budget line per app: its name, how many workers, each worker's cap.
pub type Plan = Vec<(AppName, u32, Option<ByteSize>)>;

/// The number of workers the app's config asks for ("auto": one per CPU the machine and the
/// agent's cgroups allow).
pub fn worker_count(cfg: &App) -> u32 {
    match cfg.workers.count {
        WorkerCount::Fixed(n) => n.get(),
        WorkerCount::Auto => cpu_ceiling().cpus,
    }
}

/// The plan of these apps, each with its configured worker count.
pub fn plan<'a>(apps: impl IntoIterator<Item = &'a App>) -> Plan {
    apps.into_iter()
        .map(|a| (a.name.clone(), worker_count(a), a.workers.memory_max))
        .collect()
}

/// memory.max and cpu.max of the agent's cgroup and its ancestors, read now; none where there
/// is no cgroup2 hierarchy. A file that cannot be read is logged and left out.
fn readings() -> Vec<CgroupReading> {
    cgroup::own_limits(Path::new(MOUNT)).unwrap_or_else(|e| {
        tracing::warn!("container limits: {e}; using the machine's memory and CPUs");
        Vec::new()
    })
}

/// How many CPUs `count = "auto"` means here: the online CPUs, or fewer when a cpu.max quota
/// above the agent allows fewer.
pub fn cpu_ceiling() -> CpuCeiling {
    let (c, bad) = container::cpu_ceiling(machine::online_cpus(), &readings());
    for b in bad {
        tracing::warn!("{b}");
    }
    c
}

/// The memory corral may plan for: MemTotal, or less when a memory.max above the agent (its
/// container's) or of its cgroup root (`root`) is lower.
pub fn memory_ceiling(root: Option<MemoryCeiling>) -> Result<MemoryCeiling, String> {
    let total = machine::mem_total().map_err(|e| e.to_string())?;
    let (mut c, bad) = container::memory_ceiling(ByteSize(total), &readings());
    for b in bad {
        tracing::warn!("{b}");
    }
    if let Some(r) = root {
        if r.bytes < c.bytes {
            c = r;
        }
    }
    Ok(c)
}

/// The budget of `plan` against the memory corral may use ([`memory_ceiling`]). Over budget is
/// an error (the same message wherever the plan changes, naming the limit's source) unless
/// `allow_overcommit`; then the caller warns with [`Budget::over_message`].
pub fn enforce(
    plan: &[(AppName, u32, Option<ByteSize>)],
    root: Option<MemoryCeiling>,
    allow_overcommit: bool,
) -> Result<Budget, String> {
    let b = budget::memory_budget(plan, memory_ceiling(root)?);
    match b.over_message() {
        Some(msg) if !allow_overcommit => Err(msg),
        _ => Ok(b),
    }
}
