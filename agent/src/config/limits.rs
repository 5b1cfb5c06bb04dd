//! The kernel's ranges for the limits corral writes, in one place: the loader refuses a value
//! outside them at its file:line:col (so `corral check` catches it), and `sys` must write limits
//! with these same numbers and [`cpu_quota_usec`], so that what the loader accepts is exactly
//! what the kernel accepts at worker start.
//!
//! What the kernel does with each value (Linux 5.x-6.x):
//! - `cpu.max` (`<quota> <period>`, microseconds): `tg_set_cfs_bandwidth` refuses a quota below
//!   1 ms and one above `max_cfs_runtime` (`MAX_BW` = 2^44 - 1 us); corral's period is fixed.
//! - `pids.max`: `pids_max_write` refuses anything above `PID_MAX_LIMIT`.
//! - `memory.max`, `memory.high`: any byte count is taken, rounded down to whole pages; below one
//!   page the limit is 0, where no worker can start (`memory.max`) or every worker is always
//!   above it (`memory.high`), so corral refuses sizes below the largest page Linux uses.
//! - `listen(2)` backlog: never refused, silently capped at `net.core.somaxconn`.

use std::fmt;

/// `cpu.max` period: quotas are written against it (`cpu_max x CPU_PERIOD_USEC`).
pub const CPU_PERIOD_USEC: u64 = 100_000;
/// The kernel refuses a `cpu.max` quota below 1 ms (`min_cfs_quota_period`): 0.01 CPU at
/// [`CPU_PERIOD_USEC`].
pub const MIN_CPU_QUOTA_USEC: u64 = 1_000;
/// The kernel refuses a `cpu.max` quota above `max_cfs_runtime`, `MAX_BW` microseconds
/// (`(1 << (64 - BW_SHIFT)) - 1` with `BW_SHIFT` 20): about 175.9 million CPUs.
pub const MAX_CPU_QUOTA_USEC: u64 = (1 << 44) - 1;
/// The largest `pids.max` the kernel takes: `PID_MAX_LIMIT` (4 Mi on 64-bit machines, 32 Ki on
/// 32-bit ones).
pub const MAX_PIDS: u32 = if cfg!(target_pointer_width = "64") {
    4 << 20
} else {
    32 << 10
};
/// The smallest `memory_max` or `memory_high`: the largest page size Linux uses (64 KiB on
/// arm64 and ppc64). The kernel rounds memory limits down to whole pages; anything smaller can
/// round to 0.
pub const MIN_MEMORY_BYTES: u64 = 64 << 10;
/// The largest accept backlog: older kernels keep it in 16 bits. The kernel never refuses a
/// backlog; it caps it at `net.core.somaxconn`.
pub const MAX_BACKLOG: u32 = 65_535;

/// Why the kernel would refuse a `cpu_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMaxError {
    /// Zero, negative, NaN or infinite.
    NotPositive,
    /// The quota rounds to less than [`MIN_CPU_QUOTA_USEC`].
    BelowMin,
    /// The quota is more than [`MAX_CPU_QUOTA_USEC`].
    AboveMax,
}

impl fmt::Display for CpuMaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuMaxError::NotPositive => f.write_str("must be a positive number of CPUs"),
            CpuMaxError::BelowMin => write!(f, "below the kernel's minimum of {} CPU", min_cpus()),
            CpuMaxError::AboveMax => write!(f, "above the kernel's maximum of {} CPUs", max_cpus()),
        }
    }
}

impl std::error::Error for CpuMaxError {}

/// The `cpu.max` quota for `cpus` CPUs, in microseconds per [`CPU_PERIOD_USEC`] (rounded to the
/// nearest microsecond), or why the kernel would refuse it.
pub fn cpu_quota_usec(cpus: f64) -> Result<u64, CpuMaxError> {
    if !(cpus.is_finite() && cpus > 0.0) {
        return Err(CpuMaxError::NotPositive);
    }
    let quota = (cpus * CPU_PERIOD_USEC as f64).round();
    if quota < MIN_CPU_QUOTA_USEC as f64 {
        return Err(CpuMaxError::BelowMin);
    }
    // MAX_CPU_QUOTA_USEC < 2^53, so the comparison is exact.
    if quota > MAX_CPU_QUOTA_USEC as f64 {
        return Err(CpuMaxError::AboveMax);
    }
    // In MIN_CPU_QUOTA_USEC..=MAX_CPU_QUOTA_USEC and integral, checked above: the cast is exact.
    Ok(quota as u64)
}

/// The smallest `cpu_max`: 0.01.
pub fn min_cpus() -> f64 {
    MIN_CPU_QUOTA_USEC as f64 / CPU_PERIOD_USEC as f64
}

/// The largest `cpu_max`: 175921860.44415.
pub fn max_cpus() -> f64 {
    MAX_CPU_QUOTA_USEC as f64 / CPU_PERIOD_USEC as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quota_matches_the_kernel() {
        assert_eq!(cpu_quota_usec(1.5), Ok(150_000));
        assert_eq!(cpu_quota_usec(0.25), Ok(25_000));
        assert_eq!(cpu_quota_usec(0.01), Ok(1_000));
        // Rounded to the nearest microsecond, as written to cpu.max.
        assert_eq!(cpu_quota_usec(0.009995), Ok(1_000));
        assert_eq!(cpu_quota_usec(0.00999), Err(CpuMaxError::BelowMin));
        assert_eq!(cpu_quota_usec(0.005), Err(CpuMaxError::BelowMin));
        assert_eq!(cpu_quota_usec(max_cpus()), Ok(MAX_CPU_QUOTA_USEC));
        assert_eq!(
            cpu_quota_usec(max_cpus() + 0.01),
            Err(CpuMaxError::AboveMax)
        );
        assert_eq!(cpu_quota_usec(2e6), Ok(200_000_000_000));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(cpu_quota_usec(bad), Err(CpuMaxError::NotPositive), "{bad}");
        }
        assert_eq!(min_cpus(), 0.01);
        assert_eq!(max_cpus().to_string(), "175921860.44415");
    }

    #[test]
    fn pids_and_memory_bounds() {
        #[cfg(target_pointer_width = "64")]
        assert_eq!(MAX_PIDS, 4_194_304);
        assert_eq!(MIN_MEMORY_BYTES, 65_536);
    }
}
