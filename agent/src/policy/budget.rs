//! The memory budget: do the apps' worker caps fit in this machine's memory?
//!
//! Each app with `memory_max` can use up to `workers x memory_max`; apps without a cap are listed
//! but cannot be counted. The agent keeps [`AGENT_RESERVE`] for itself. `corral check` prints
//! [`Budget::describe`]; the agent refuses to start when [`Budget::over`] unless
//! `[agent] allow_overcommit = true`.

use std::fmt::Write as _;

use crate::config::{AppName, ByteSize};
use crate::policy::container::MemoryCeiling;

/// Memory set aside for the agent itself.
pub const AGENT_RESERVE: ByteSize = ByteSize(64 << 20);

/// One app's share of the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLine {
    pub app: AppName,
    /// The resolved worker count.
    pub workers: u32,
    pub memory_max: Option<ByteSize>,
    /// `workers x memory_max` (saturating), or `None` when the app has no cap.
    pub total: Option<ByteSize>,
}

/// The budget for a whole config against the memory available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// One line per app, in the order given.
    pub lines: Vec<BudgetLine>,
    /// The sum of the capped apps' totals (saturating).
    pub capped_total: ByteSize,
    /// Apps without `memory_max`: not counted.
    pub uncapped_apps: Vec<AppName>,
    pub agent_reserve: ByteSize,
    /// What is available: MemTotal, or a cgroup limit below it (the container's).
    pub available: ByteSize,
    /// Where `available` comes from.
    pub ceiling: MemoryCeiling,
}

impl Budget {
    /// What the budget needs: the capped total plus the agent's reserve (saturating).
    pub fn needed(&self) -> ByteSize {
        ByteSize(self.capped_total.0.saturating_add(self.agent_reserve.0))
    }

    /// True when the capped workers and the agent's reserve do not fit in what is available.
    pub fn over(&self) -> bool {
        self.needed() > self.available
    }

    /// Multi-line text for `corral check`, one line per app, then the agent, then the verdict.
    pub fn describe(&self) -> String {
        let width = self
            .lines
            .iter()
            .map(|l| l.app.as_str().len())
            .chain(["agent".len(), "total".len()])
            .max()
            .unwrap_or(0);
        let mut out = String::from("memory budget:\n");
        // Writing to a String cannot fail.
        for line in &self.lines {
            let app = line.app.as_str();
            let _ = match (line.memory_max, line.total) {
                (Some(max), Some(total)) => {
                    writeln!(
                        out,
                        "  {app:<width$}  {} x {} = {}",
                        line.workers,
                        human(max),
                        human(total)
                    )
                }
                _ => writeln!(
                    out,
                    "  {app:<width$}  {} workers, no memory_max: not counted",
                    line.workers
                ),
            };
        }
        let _ = writeln!(out, "  {:<width$}  {}", "agent", human(self.agent_reserve));
        let verdict = if self.over() { "over budget" } else { "fits" };
        let _ = write!(
            out,
            "  {:<width$}  {} of {} available: {verdict}",
            "total",
            human(self.needed()),
            human(self.available)
        );
        if self.ceiling.source != crate::policy::container::LimitSource::Machine {
            let _ = write!(out, "\n  available is {}", self.ceiling.describe_source());
        }
        if !self.uncapped_apps.is_empty() {
            let names: Vec<&str> = self.uncapped_apps.iter().map(AppName::as_str).collect();
            let _ = write!(
                out,
                "\n  uncapped apps can use any memory: {}",
                names.join(", ")
            );
        }
        out
    }

    /// The error for an agent that would overcommit, naming every capped app; `None` when the
    /// budget fits.
    pub fn over_message(&self) -> Option<String> {
        if !self.over() {
            return None;
        }
        let mut msg = String::from("memory budget exceeded: ");
        for line in &self.lines {
            if let (Some(max), Some(total)) = (line.memory_max, line.total) {
                // Writing to a String cannot fail.
                let _ = write!(
                    msg,
                    "{} {} x {} = {}, ",
                    line.app,
                    line.workers,
                    human(max),
                    human(total)
                );
            }
        }
        let _ = write!(
            msg,
            "plus {} for the agent = {}, but {} is available ({}); \
             lower memory_max or workers.count, or set [agent] allow_overcommit = true",
            human(self.agent_reserve),
            human(self.needed()),
            human(self.available),
            self.ceiling.describe_source()
        );
        Some(msg)
    }
}

/// Sizes for people: `1GiB` and `512MiB` when exact, otherwise the largest unit with a decimal
/// (`5.1GiB` rather than `ByteSize`'s exact `5184MiB`). A value just over a whole unit keeps
/// enough digits not to look whole (`4.01GiB`, never `4.0GiB` against `4GiB` available).
pub fn human(size: ByteSize) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    let Some(&(name, unit)) = UNITS.iter().find(|&&(_, unit)| size.0 >= unit) else {
        return size.to_string();
    };
    if size.0.is_multiple_of(unit) {
        return format!("{}{name}", size.0 / unit);
    }
    let value = size.0 as f64 / unit as f64;
    for decimals in 1..=2 {
        let text = format!("{value:.decimals$}");
        if !text.trim_end_matches('0').ends_with('.') {
            return format!("{text}{name}");
        }
    }
    size.to_string()
}

/// Builds the budget from `(app, resolved worker count, memory_max)` triples against the
/// memory available (and where that number comes from).
pub fn memory_budget(
    apps: &[(AppName, u32, Option<ByteSize>)],
    ceiling: impl Into<MemoryCeiling>,
) -> Budget {
    let ceiling = ceiling.into();
    let lines: Vec<BudgetLine> = apps
        .iter()
        .map(|(app, workers, memory_max)| BudgetLine {
            app: app.clone(),
            workers: *workers,
            memory_max: *memory_max,
            total: memory_max.map(|m| ByteSize(m.0.saturating_mul(u64::from(*workers)))),
        })
        .collect();
    let capped_total = ByteSize(
        lines
            .iter()
            .filter_map(|l| l.total)
            .fold(0u64, |sum, t| sum.saturating_add(t.0)),
    );
    let uncapped_apps = lines
        .iter()
        .filter(|l| l.memory_max.is_none())
        .map(|l| l.app.clone())
        .collect();
    Budget {
        lines,
        capped_total,
        uncapped_apps,
        agent_reserve: AGENT_RESERVE,
        available: ceiling.bytes,
        ceiling,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn name(s: &str) -> AppName {
        AppName::new(s).unwrap()
    }

    #[test]
    fn seed_example_is_over() {
        let b = memory_budget(&[(name("api"), 4, Some(ByteSize(GIB)))], ByteSize(3 * GIB));
        assert!(b.over());
        assert_eq!(b.capped_total, ByteSize(4 * GIB));
        assert_eq!(b.lines[0].total, Some(ByteSize(4 * GIB)));
        assert_eq!(
            b.over_message().unwrap(),
            "memory budget exceeded: api 4 x 1GiB = 4GiB, plus 64MiB for the agent = 4.1GiB, \
             but 3GiB is available (MemTotal in /proc/meminfo); lower memory_max or workers.count, or set [agent] \
             allow_overcommit = true"
        );
        assert!(b.describe().contains("over budget"), "{}", b.describe());
    }

    #[test]
    fn a_container_limit_is_named() {
        use crate::policy::container::{LimitSource, MemoryCeiling};
        let pod = MemoryCeiling {
            bytes: ByteSize(2 * GIB),
            source: LimitSource::Cgroup {
                file: "/sys/fs/cgroup/memory.max".into(),
                value: "2147483648".into(),
                container: true,
            },
        };
        let b = memory_budget(&[(name("api"), 4, Some(ByteSize(GIB)))], pod);
        assert_eq!(b.available, ByteSize(2 * GIB));
        assert_eq!(
            b.over_message().unwrap(),
            "memory budget exceeded: api 4 x 1GiB = 4GiB, plus 64MiB for the agent = 4.1GiB, \
             but 2GiB is available (the container's memory.max = 2GiB at \
             /sys/fs/cgroup/memory.max); lower memory_max or workers.count, or set [agent] \
             allow_overcommit = true"
        );
        assert!(
            b.describe().ends_with(
                "available is the container's memory.max = 2GiB at /sys/fs/cgroup/memory.max"
            ),
            "{}",
            b.describe()
        );
    }

    #[test]
    fn two_apps_message() {
        let b = memory_budget(
            &[
                (name("api"), 4, Some(ByteSize(GIB))),
                (name("worker"), 2, Some(ByteSize(512 * MIB))),
            ],
            ByteSize(3 * GIB),
        );
        let msg = b.over_message().unwrap();
        assert!(
            msg.starts_with(
                "memory budget exceeded: api 4 x 1GiB = 4GiB, worker 2 x 512MiB = 1GiB, \
                 plus 64MiB for the agent = 5.1GiB, but 3GiB is available"
            ),
            "{msg}"
        );
    }

    #[test]
    fn two_workers_fit() {
        let b = memory_budget(&[(name("api"), 2, Some(ByteSize(GIB)))], ByteSize(3 * GIB));
        assert!(!b.over());
        assert_eq!(b.over_message(), None);
        assert!(b.describe().contains("fits"), "{}", b.describe());
    }

    #[test]
    fn reserve_counts_at_the_edge() {
        let fits = memory_budget(
            &[(name("api"), 2, Some(ByteSize(GIB)))],
            ByteSize(2 * GIB + 64 * MIB),
        );
        assert!(!fits.over());
        let over = memory_budget(
            &[(name("api"), 2, Some(ByteSize(GIB)))],
            ByteSize(2 * GIB + 64 * MIB - 1),
        );
        assert!(over.over());
    }

    #[test]
    fn uncapped_apps_are_listed_not_counted() {
        let b = memory_budget(
            &[
                (name("api"), 2, Some(ByteSize(GIB))),
                (name("batch"), 8, None),
            ],
            ByteSize(3 * GIB),
        );
        assert_eq!(b.uncapped_apps, vec![name("batch")]);
        assert_eq!(b.capped_total, ByteSize(2 * GIB));
        assert_eq!(b.lines[1].total, None);
        assert!(!b.over());
        let text = b.describe();
        assert!(
            text.contains("batch  8 workers, no memory_max: not counted"),
            "{text}"
        );
        assert!(
            text.contains("uncapped apps can use any memory: batch"),
            "{text}"
        );
    }

    #[test]
    fn describe_layout() {
        let b = memory_budget(
            &[
                (name("api"), 4, Some(ByteSize(GIB))),
                (name("worker"), 2, Some(ByteSize(512 * MIB))),
            ],
            ByteSize(8 * GIB),
        );
        assert_eq!(
            b.describe(),
            "memory budget:\n\
             \x20 api     4 x 1GiB = 4GiB\n\
             \x20 worker  2 x 512MiB = 1GiB\n\
             \x20 agent   64MiB\n\
             \x20 total   5.1GiB of 8GiB available: fits"
        );
    }

    #[test]
    fn multiplication_saturates() {
        let b = memory_budget(
            &[
                (name("a"), u32::MAX, Some(ByteSize(u64::MAX / 2))),
                (name("b"), 3, Some(ByteSize(u64::MAX / 2))),
            ],
            ByteSize(u64::MAX),
        );
        assert_eq!(b.lines[0].total, Some(ByteSize(u64::MAX)));
        assert_eq!(b.capped_total, ByteSize(u64::MAX));
        assert_eq!(b.needed(), ByteSize(u64::MAX));
        // Saturated at the maximum, it equals what is "available" rather than wrapping to fit.
        assert!(!b.over());
        let b = memory_budget(
            &[(name("a"), u32::MAX, Some(ByteSize(u64::MAX / 2)))],
            ByteSize(64 * GIB),
        );
        assert!(b.over());
    }

    #[test]
    fn sizes_for_people() {
        let cases = [
            (ByteSize(0), "0B"),
            (ByteSize(1000), "1000B"),
            (ByteSize(64 * MIB), "64MiB"),
            (ByteSize(GIB), "1GiB"),
            (ByteSize(1536 * MIB), "1.5GiB"),
            (ByteSize(5 * GIB + 64 * MIB), "5.1GiB"),
            (ByteSize(4 * GIB + 16 * MIB), "4.02GiB"),
            (ByteSize(4 * GIB + MIB), "4097MiB"),
        ];
        for (size, want) in cases {
            assert_eq!(human(size), want, "{}", size.0);
        }
    }

    #[test]
    fn no_apps() {
        let b = memory_budget(&[], ByteSize(GIB));
        assert_eq!(b.capped_total, ByteSize(0));
        assert!(!b.over());
        assert!(memory_budget(&[], ByteSize(MIB)).over());
    }
}
