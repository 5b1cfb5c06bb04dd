//! `[app.NAME.workers]`: how many, their kernel limits (refused here when the kernel would refuse
//! them at worker start, see [`crate::config::limits`]), how they stop and when they are ready.

use std::num::NonZeroU32;
use std::time::Duration;

use serde_spanned::Spanned;

use super::source::Source;
use super::table::Table;
use super::values::{parse_duration, Bad};
use crate::config::limits::{
    self, CpuMaxError, CPU_PERIOD_USEC, MAX_CPU_QUOTA_USEC, MAX_PIDS, MIN_CPU_QUOTA_USEC,
    MIN_MEMORY_BYTES,
};
use crate::config::raw::{RawSize, RawWorkers};
use crate::config::{ByteSize, ConfigError, Location, Ready, Workers};

/// `[app.NAME.workers]`, or its defaults when the app has none.
pub(super) fn workers(
    src: &Source<'_>,
    n: &str,
    defined_at: &Location,
    raw: Option<Spanned<RawWorkers>>,
) -> Result<Workers, ConfigError> {
    let (w, raw) = Table::or_default(src, &["app", n, "workers"], raw);

    let (count, count_at) = w.count("count", raw.count.as_ref(), defined_at)?;

    let memory_max = memory(&w, "memory_max", raw.memory_max.as_ref())?;
    let memory_high = memory(&w, "memory_high", raw.memory_high.as_ref())?;
    // memory_high at or above memory_max would never trigger: the kernel OOM-kills at
    // memory_max first, so the graceful recycle the key asks for could never happen.
    if let (Some(high), Some(max), Some(v)) = (memory_high, memory_max, &raw.memory_high) {
        if high >= max {
            return Err(w
                .err(
                    v.span(),
                    "memory_high",
                    format!("{high} must be less than `memory_max` ({max})"),
                )
                .with_hint(
                    "crossing memory_high recycles a worker gracefully; memory_max is where the \
                     kernel kills it, so memory_high goes below it",
                ));
        }
    }
    let cpu_max = cpu_max(&w, raw.cpu_max.as_ref())?;
    let pids_max = w
        .u32_in("pids_max", raw.pids_max.as_ref(), 1..=MAX_PIDS)
        .map_err(|e| {
            e.with_hint(format!(
                "pids.max counts a worker's processes and threads; the kernel takes at most \
                 {MAX_PIDS}"
            ))
        })?
        .and_then(NonZeroU32::new);

    let stop_timeout = w.duration(
        "stop_timeout",
        raw.stop_timeout.as_ref(),
        Duration::from_secs(30),
    )?;
    let ready = match &raw.ready {
        None => Ready::Tcp,
        Some(v) => parse_ready(v.get_ref()).map_err(|b| w.bad(v.span(), "ready", b))?,
    };
    let ready_timeout = w.positive_duration(
        "ready_timeout",
        raw.ready_timeout.as_ref(),
        Duration::from_secs(60),
    )?;

    let min_ready = w
        .u32_in("min_ready", raw.min_ready.as_ref(), 1..=u32::MAX)?
        .and_then(NonZeroU32::new)
        .unwrap_or(NonZeroU32::MIN);
    if let (crate::config::WorkerCount::Fixed(n), Some(v)) = (count, &raw.min_ready) {
        if min_ready > n {
            return Err(w
                .err(
                    v.span(),
                    "min_ready",
                    format!("{min_ready} is more than workers.count ({n})"),
                )
                .with_hint(
                    "/readyz answers 200 while at least min_ready workers of each app are ready; \
                     more than the app runs could never be",
                ));
        }
    }

    Ok(Workers {
        count,
        count_at,
        memory_max,
        memory_high,
        cpu_max,
        pids_max,
        stop_timeout,
        ready,
        ready_timeout,
        min_ready,
    })
}

/// `memory_max` or `memory_high`: a size of at least [`MIN_MEMORY_BYTES`].
fn memory(
    w: &Table<'_>,
    key: &str,
    v: Option<&Spanned<RawSize>>,
) -> Result<Option<ByteSize>, ConfigError> {
    let size = w.size(key, v)?;
    if let (Some(size), Some(v)) = (size, v) {
        if size.0 < MIN_MEMORY_BYTES {
            return Err(w
                .err(
                    v.span(),
                    key,
                    format!(
                        "{size} is below the minimum of {}",
                        ByteSize(MIN_MEMORY_BYTES)
                    ),
                )
                .with_hint(
                    "the kernel rounds memory limits down to whole pages (up to 64KiB each); a \
                     smaller limit can round to 0, where no worker can run",
                ));
        }
    }
    Ok(size)
}

/// `cpu_max`: a number of CPUs whose `cpu.max` quota the kernel takes.
fn cpu_max(w: &Table<'_>, v: Option<&Spanned<f64>>) -> Result<Option<f64>, ConfigError> {
    let Some(v) = v else {
        return Ok(None);
    };
    let cpus = *v.get_ref();
    let err = |message: String| w.err(v.span(), "cpu_max", message);
    match limits::cpu_quota_usec(cpus) {
        Ok(_) => Ok(Some(cpus)),
        Err(CpuMaxError::NotPositive) => Err(err(format!(
            "expected a number of CPUs greater than 0, found {cpus}"
        ))),
        Err(e @ CpuMaxError::BelowMin) => Err(err(format!("{cpus} is {e}")).with_hint(format!(
            "cpu.max takes at least {MIN_CPU_QUOTA_USEC}us of CPU time per {CPU_PERIOD_USEC}us \
             period; write `cpu_max = {}` or more, or leave cpu_max out for no limit",
            limits::min_cpus()
        ))),
        Err(e @ CpuMaxError::AboveMax) => Err(err(format!("{cpus} is {e}")).with_hint(format!(
            "cpu.max takes at most {MAX_CPU_QUOTA_USEC}us of CPU time per {CPU_PERIOD_USEC}us \
             period; leave cpu_max out for no limit"
        ))),
    }
}

fn parse_ready(s: &str) -> Result<Ready, Bad> {
    const EXPECTED: &str = "expected \"tcp\", \"http:/PATH\", \"notify\" or \"delay:DURATION\"";
    match s {
        "tcp" => return Ok(Ready::Tcp),
        "notify" => return Ok(Ready::Notify),
        _ => {}
    }
    if let Some(path) = s.strip_prefix("http:") {
        if !path.starts_with('/') || path.starts_with("//") {
            return Err(Bad::new(
                format!("expected a path starting with `/` after `http:`, found {s:?}"),
                Some(
                    "give only the path, e.g. \"http:/healthz\"; corral probes each worker's \
                     own socket"
                        .into(),
                ),
            ));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Bad::new(
                format!(
                    "the health check path in {s:?} cannot contain spaces or control characters"
                ),
                None,
            ));
        }
        return Ok(Ready::Http(path.to_string()));
    }
    if let Some(d) = s.strip_prefix("delay:") {
        return parse_duration(d).map(Ready::Delay);
    }
    Err(Bad::new(format!("{EXPECTED}, found {s:?}"), None))
}
