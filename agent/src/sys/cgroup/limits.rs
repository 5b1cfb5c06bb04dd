//! A worker's resource limits: what to write to which interface file, and writing it.

use std::fmt;

use rustix::io::Errno;

use super::controllers::Controller;
use super::error::CgroupError;
use super::leaf::Leaf;

/// `cpu.max` period; quotas are expressed against it (the one number the loader checks with).
pub use crate::config::limits::CPU_PERIOD_USEC;
use crate::config::limits::{cpu_quota_usec, CpuMaxError};

/// Resource limits of one worker. `None` means unlimited (`max`) and is written too, so a
/// reused leaf never keeps an old limit. Byte values of `u64::MAX` are written as `max`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// memory.max, bytes: above it the kernel reclaims, then OOM-kills the whole leaf.
    pub memory_max: Option<u64>,
    /// memory.high, bytes: above it the kernel throttles and reclaims (counted in
    /// `MemoryEvents::high`).
    pub memory_high: Option<u64>,
    /// memory.swap.max, bytes. `None`: 0 when `memory_max` is set (a capped worker does not
    /// swap past its cap), unlimited otherwise.
    pub swap_max: Option<u64>,
    /// pids.max: processes and threads.
    pub pids_max: Option<u32>,
    /// cpu.max in CPUs: 1.5 is `150000 100000`. At least 0.01.
    pub cpu_max: Option<f64>,
}

/// One interface-file write planned from [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Planned {
    controller: Controller,
    file: &'static str,
    value: String,
    /// Asked for by the config (not just the unlimited default): worth reporting when skipped.
    configured: bool,
}

/// A limit that was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: &'static str,
    pub value: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The controller is not enabled for the leaf (not delegated, or not needed).
    NotEnabled(Controller),
    /// The controller is enabled but this kernel has no such file (e.g. memory.swap.max without
    /// swap accounting).
    FileMissing,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            SkipReason::NotEnabled(c) => write!(
                f,
                "{} = {} not applied: the {c} controller is not enabled",
                self.file, self.value
            ),
            SkipReason::FileMissing => write!(
                f,
                "{} = {} not applied: this kernel has no {}",
                self.file, self.value, self.file
            ),
        }
    }
}

fn bytes_value(v: Option<u64>) -> String {
    match v {
        None | Some(u64::MAX) => "max".to_string(),
        Some(n) => n.to_string(),
    }
}

/// `cpu.max` for `cpus` CPUs: `<quota> <period>`, with the loader's own arithmetic
/// ([`cpu_quota_usec`]), so what `corral check` accepts is what is written here.
fn cpu_max_value(cpus: Option<f64>) -> Result<String, CgroupError> {
    let Some(cpus) = cpus else {
        return Ok(format!("max {CPU_PERIOD_USEC}"));
    };
    let quota = cpu_quota_usec(cpus).map_err(|e| CgroupError::InvalidLimit {
        what: "cpu_max",
        value: cpus.to_string(),
        reason: match e {
            CpuMaxError::NotPositive => "must be a positive number of CPUs",
            CpuMaxError::BelowMin => "below the kernel's minimum cpu.max quota",
            CpuMaxError::AboveMax => "above the kernel's maximum cpu.max quota",
        },
    })?;
    Ok(format!("{quota} {CPU_PERIOD_USEC}"))
}

/// The writes for `limits`, in order.
fn plan_limits(limits: &Limits) -> Result<Vec<Planned>, CgroupError> {
    let memory_capped = limits.memory_max.is_some();
    let swap = limits.swap_max.or(memory_capped.then_some(0));
    let p = |controller, file, value, configured| Planned {
        controller,
        file,
        value,
        configured,
    };
    use Controller::{Cpu, Memory, Pids};
    Ok(vec![
        p(
            Memory,
            "memory.max",
            bytes_value(limits.memory_max),
            memory_capped,
        ),
        p(
            Memory,
            "memory.high",
            bytes_value(limits.memory_high),
            limits.memory_high.is_some(),
        ),
        p(Memory, "memory.swap.max", bytes_value(swap), swap.is_some()),
        // An OOM kill takes the whole worker (all its processes), never half of it.
        p(
            Memory,
            "memory.oom.group",
            "1".to_string(),
            memory_capped || limits.memory_high.is_some(),
        ),
        p(
            Pids,
            "pids.max",
            limits
                .pids_max
                .map_or_else(|| "max".to_string(), |n| n.to_string()),
            limits.pids_max.is_some(),
        ),
        p(
            Cpu,
            "cpu.max",
            cpu_max_value(limits.cpu_max)?,
            limits.cpu_max.is_some(),
        ),
    ])
}

impl Leaf {
    /// Write every limit file whose controller is enabled (unset limits as `max`), plus
    /// `memory.oom.group = 1`. Returns the configured limits that could not be applied.
    pub fn set_limits(&self, limits: &Limits) -> Result<Vec<Skipped>, CgroupError> {
        let mut skipped = Vec::new();
        for w in plan_limits(limits)? {
            let reason = if !self.controllers.contains(w.controller) {
                Some(SkipReason::NotEnabled(w.controller))
            } else {
                match self.node.write_errno(w.file, &w.value) {
                    Ok(()) => None,
                    Err(Errno::NOENT) => Some(SkipReason::FileMissing),
                    Err(e) => return Err(self.node.write_error(w.file, &w.value, e)),
                }
            };
            if let Some(reason) = reason.filter(|_| w.configured) {
                skipped.push(Skipped {
                    file: w.file,
                    value: w.value,
                    reason,
                });
            }
        }
        Ok(skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max() {
        assert_eq!(cpu_max_value(Some(1.5)).unwrap(), "150000 100000");
        assert_eq!(cpu_max_value(Some(0.25)).unwrap(), "25000 100000");
        assert_eq!(cpu_max_value(Some(4.0)).unwrap(), "400000 100000");
        assert_eq!(cpu_max_value(Some(0.01)).unwrap(), "1000 100000");
        assert_eq!(cpu_max_value(None).unwrap(), "max 100000");
        for bad in [0.0, -1.0, 0.001, f64::NAN, f64::INFINITY, 2e8] {
            assert!(
                matches!(
                    cpu_max_value(Some(bad)),
                    Err(CgroupError::InvalidLimit { .. })
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn limit_plan() {
        let plan = |l: Limits| -> Vec<(&'static str, String, bool)> {
            plan_limits(&l)
                .unwrap()
                .into_iter()
                .map(|w| (w.file, w.value, w.configured))
                .collect()
        };
        let capped = plan(Limits {
            memory_max: Some(256 << 20),
            ..Limits::default()
        });
        assert_eq!(
            capped,
            vec![
                ("memory.max", "268435456".to_string(), true),
                ("memory.high", "max".to_string(), false),
                ("memory.swap.max", "0".to_string(), true),
                ("memory.oom.group", "1".to_string(), true),
                ("pids.max", "max".to_string(), false),
                ("cpu.max", "max 100000".to_string(), false),
            ]
        );
        let uncapped = plan(Limits::default());
        assert_eq!(uncapped[2], ("memory.swap.max", "max".to_string(), false));
        let swap = plan(Limits {
            memory_max: Some(1 << 30),
            swap_max: Some(u64::MAX),
            ..Limits::default()
        });
        assert_eq!(swap[2], ("memory.swap.max", "max".to_string(), true));
    }
}
