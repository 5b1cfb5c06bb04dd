//! The memory budget wherever the plan changes: at start (and `corral check`,
//! `reexec-check`), on a reload and on `corral scale`. The arithmetic is `policy::budget`'s;
//! this adds what only the machine knows (MemTotal, the cgroup root's memory.max, online CPUs).

use crate::config::{App, AppName, ByteSize};
use crate::policy::budget::{self, Budget};
use crate::sys::machine;

use super::apps::worker_count;

/// One budget line per app: its name, how many workers, each worker's cap.
pub type Plan = Vec<(AppName, u32, Option<ByteSize>)>;

/// The plan of these apps, each with its configured worker count.
pub fn plan<'a>(apps: impl IntoIterator<Item = &'a App>) -> Plan {
    apps.into_iter()
        .map(|a| (a.name.clone(), worker_count(a), a.workers.memory_max))
        .collect()
}

/// The budget of `plan` against the memory corral may use: MemTotal, or less when its cgroup
/// root has a memory.max of its own (`ceiling`). Over budget is an error (the same message
/// wherever the plan changes) unless `allow_overcommit`; then the caller warns with
/// [`Budget::over_message`].
pub fn enforce(
    plan: &[(AppName, u32, Option<ByteSize>)],
    ceiling: Option<ByteSize>,
    allow_overcommit: bool,
) -> Result<Budget, String> {
    let total = machine::mem_total().map_err(|e| e.to_string())?;
    let available = match ceiling {
        Some(c) if c.0 < total => c,
        _ => ByteSize(total),
    };
    let b = budget::memory_budget(plan, available);
    match b.over_message() {
        Some(msg) if !allow_overcommit => Err(msg),
        _ => Ok(b),
    }
}
