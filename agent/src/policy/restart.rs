//! Restart, backoff and crash-loop policy for one worker slot.
//!
//! [`on_exit`] is called by the supervisor each time a worker exits on its own (not when corral
//! stopped it). It returns a [`Decision`]; the supervisor carries it out.
//!
//! Backoff: the first failure in a row restarts at once (a worker that ran fine and crashed once
//! comes straight back), the second waits `backoff_initial`, then the wait doubles up to
//! `backoff_max`. A run of at least `reset_after` counts as stable and starts the sequence over.
//! Independently, at most `max_restarts` restarts are allowed within the sliding `window`; the
//! exit after that gives up.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::config::{Restart, RestartMode};

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// True only for `exit(0)`; a death by any signal is a failure.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Exited(0))
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(status) => write!(f, "exited with status {status}"),
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by signal {signal}")?;
                if let Some(name) = signal_name(signal) {
                    write!(f, " ({name})")?;
                }
                if core_dumped {
                    f.write_str(", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

/// Linux signal names 1..=31, in the numbering of x86, arm and most other architectures
/// (not alpha, mips, parisc or sparc, which corral does not target).
const SIGNAL_NAMES: [&str; 31] = [
    "SIGHUP",    // 1
    "SIGINT",    // 2
    "SIGQUIT",   // 3
    "SIGILL",    // 4
    "SIGTRAP",   // 5
    "SIGABRT",   // 6
    "SIGBUS",    // 7
    "SIGFPE",    // 8
    "SIGKILL",   // 9
    "SIGUSR1",   // 10
    "SIGSEGV",   // 11
    "SIGUSR2",   // 12
    "SIGPIPE",   // 13
    "SIGALRM",   // 14
    "SIGTERM",   // 15
    "SIGSTKFLT", // 16
    "SIGCHLD",   // 17
    "SIGCONT",   // 18
    "SIGSTOP",   // 19
    "SIGTSTP",   // 20
    "SIGTTIN",   // 21
    "SIGTTOU",   // 22
    "SIGURG",    // 23
    "SIGXCPU",   // 24
    "SIGXFSZ",   // 25
    "SIGVTALRM", // 26
    "SIGPROF",   // 27
    "SIGWINCH",  // 28
    "SIGIO",     // 29
    "SIGPWR",    // 30
    "SIGSYS",    // 31
];

/// The name of a standard Linux signal (`9` -> `"SIGKILL"`); `None` outside 1..=31.
pub fn signal_name(signal: i32) -> Option<&'static str> {
    let index = usize::try_from(signal).ok()?.checked_sub(1)?;
    SIGNAL_NAMES.get(index).copied()
}

/// What the supervisor should do with a slot whose worker exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a new worker in the slot after this delay.
    Restart { after: Duration },
    /// Crash loop: leave the slot empty and mark the app failed with this reason.
    GiveUp { reason: String },
    /// The restart policy says not to restart; not a failure of the app.
    Stay { reason: String },
}

/// What the policy remembers about one slot between exits.
#[derive(Debug, Clone, Default)]
pub struct SlotHistory {
    /// When each restart within the window was decided, oldest first.
    restarts: VecDeque<Instant>,
    /// Failures since the last stable run; drives the backoff.
    consecutive: u32,
}

impl SlotHistory {
    /// Restarts decided within `cfg.window` before `now` (a restart exactly `window` old counts).
    pub fn restarts_in_window(&self, cfg: &Restart, now: Instant) -> usize {
        self.restarts
            .iter()
            .filter(|&&at| in_window(cfg, at, now))
            .count()
    }

    /// Failures in a row since the last stable run.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Forget everything, e.g. after an operator's `corral restart`.
    pub fn reset(&mut self) {
        *self = SlotHistory::default();
    }

    fn prune(&mut self, cfg: &Restart, now: Instant) {
        // Oldest first, so expired entries are all at the front.
        while self
            .restarts
            .front()
            .is_some_and(|&at| !in_window(cfg, at, now))
        {
            self.restarts.pop_front();
        }
    }
}

fn in_window(cfg: &Restart, at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) <= cfg.window
}

/// Decides what follows a worker's exit.
///
/// `ran_for` is how long the worker ran; `jitter` is a value in `[0, 1)` from the caller (kept
/// out of here so tests are deterministic): the delay is scaled by `1 - 0.2 * jitter` so that
/// slots that crash together do not restart in lockstep. Values outside the range are clamped.
pub fn on_exit(
    cfg: &Restart,
    history: &mut SlotHistory,
    exit: &ExitStatus,
    ran_for: Duration,
    now: Instant,
    jitter: f64,
) -> Decision {
    match cfg.policy {
        RestartMode::Never => {
            return Decision::Stay {
                reason: "restart policy is never".into(),
            };
        }
        RestartMode::OnFailure if exit.success() => {
            return Decision::Stay {
                reason: "exited cleanly and restart policy is on-failure".into(),
            };
        }
        RestartMode::OnFailure | RestartMode::Always => {}
    }

    if ran_for >= cfg.reset_after {
        // A stable run: the backoff starts over, the crash-loop window does not.
        history.consecutive = 0;
    }
    history.prune(cfg, now);

    let count = history.restarts.len();
    if count >= usize::try_from(cfg.max_restarts).unwrap_or(usize::MAX) {
        let reason = if cfg.max_restarts == 0 {
            format!("gave up at the first exit because max_restarts is 0; last exit: {exit}")
        } else {
            format!(
                "gave up after {count} restarts within {}; last exit: {exit}",
                format_duration(cfg.window)
            )
        };
        return Decision::GiveUp { reason };
    }

    history.restarts.push_back(now);
    history.consecutive = history.consecutive.saturating_add(1);
    Decision::Restart {
        after: apply_jitter(backoff(cfg, history.consecutive), cfg.backoff_max, jitter),
    }
}

/// The delay before the `consecutive`-th restart in a row (1-based), before jitter.
fn backoff(cfg: &Restart, consecutive: u32) -> Duration {
    if consecutive <= 1 {
        return Duration::ZERO;
    }
    // backoff_initial * 2^(consecutive - 2), saturating at backoff_max.
    1u32.checked_shl(consecutive - 2)
        .and_then(|factor| cfg.backoff_initial.checked_mul(factor))
        .map_or(cfg.backoff_max, |d| d.min(cfg.backoff_max))
}

fn apply_jitter(delay: Duration, max: Duration, jitter: f64) -> Duration {
    // NaN counts as no jitter; the factor stays in (0.8, 1], so the product never overflows.
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    delay.mul_f64(1.0 - 0.2 * jitter).min(max)
}

/// A duration for people: `250ms`, `1.5s`, `60s`, `5m`, `3h`. Milliseconds below one second,
/// seconds up to two minutes, minutes up to two hours, hours beyond; one decimal when not whole.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    let (value, unit) = if d < Duration::from_secs(1) {
        (secs * 1e3, "ms")
    } else if d <= Duration::from_secs(120) {
        (secs, "s")
    } else if d <= Duration::from_secs(2 * 3600) {
        (secs / 60.0, "m")
    } else {
        (secs / 3600.0, "h")
    };
    let tenths = (value * 10.0).round() / 10.0;
    if tenths.fract() == 0.0 {
        format!("{tenths:.0}{unit}")
    } else {
        format!("{tenths:.1}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Restart {
        Restart::DEFAULT
    }

    const CRASH: ExitStatus = ExitStatus::Exited(1);
    const KILLED: ExitStatus = ExitStatus::Signaled {
        signal: 9,
        core_dumped: false,
    };
    const SHORT: Duration = Duration::from_millis(50);

    fn after(d: Decision) -> Duration {
        match d {
            Decision::Restart { after } => after,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn first_failure_restarts_at_once() {
        let mut h = SlotHistory::default();
        let d = on_exit(&cfg(), &mut h, &CRASH, SHORT, Instant::now(), 0.0);
        assert_eq!(
            d,
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        assert_eq!(h.consecutive_failures(), 1);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = Restart {
            max_restarts: 100,
            window: Duration::from_secs(1),
            backoff_max: Duration::from_millis(1000),
            ..cfg()
        };
        let mut h = SlotHistory::default();
        let mut now = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..9 {
            seen.push(after(on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0)).as_millis());
            now += Duration::from_secs(2); // keep the window from giving up
        }
        assert_eq!(seen, [0, 100, 200, 400, 800, 1000, 1000, 1000, 1000]);
    }

    #[test]
    fn backoff_saturates_for_huge_counts() {
        let c = cfg();
        for n in [33, 64, 1000, u32::MAX] {
            assert_eq!(backoff(&c, n), c.backoff_max);
        }
        let huge = Restart {
            backoff_initial: Duration::MAX,
            backoff_max: Duration::MAX,
            ..c
        };
        assert_eq!(backoff(&huge, 3), Duration::MAX);
        let mut h = SlotHistory {
            consecutive: u32::MAX,
            ..SlotHistory::default()
        };
        let d = after(on_exit(&c, &mut h, &CRASH, SHORT, Instant::now(), 0.0));
        assert_eq!(d, c.backoff_max);
        assert_eq!(h.consecutive_failures(), u32::MAX);
    }

    #[test]
    fn jitter_stays_between_80_and_100_percent() {
        let max = Duration::from_secs(30);
        let d = Duration::from_secs(10);
        assert_eq!(apply_jitter(d, max, 0.0), d);
        for j in [0.0, 0.25, 0.5, 0.999_999] {
            let got = apply_jitter(d, max, j);
            assert!(got <= d && got >= d.mul_f64(0.8), "{j}: {got:?}");
        }
        // Out of range and NaN are clamped.
        assert_eq!(apply_jitter(d, max, -3.0), d);
        assert_eq!(apply_jitter(d, max, f64::NAN), d);
        assert_eq!(apply_jitter(d, max, 7.0), d.mul_f64(0.8));
        assert_eq!(apply_jitter(max, max, 0.0), max);
        assert_eq!(apply_jitter(Duration::ZERO, max, 0.5), Duration::ZERO);

        // Through on_exit: the second failure's 100ms becomes 90ms with jitter 0.5.
        let mut h = SlotHistory::default();
        let now = Instant::now();
        on_exit(&cfg(), &mut h, &CRASH, SHORT, now, 0.5);
        let d = after(on_exit(&cfg(), &mut h, &CRASH, SHORT, now, 0.5));
        assert_eq!(d, Duration::from_millis(90));
    }

    #[test]
    fn gives_up_after_max_restarts_in_window() {
        let c = cfg();
        let mut h = SlotHistory::default();
        let start = Instant::now();
        for i in 0..5 {
            let now = start + Duration::from_secs(i);
            assert!(matches!(
                on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(h.restarts_in_window(&c, start + Duration::from_secs(5)), 5);
        let d = on_exit(
            &c,
            &mut h,
            &KILLED,
            SHORT,
            start + Duration::from_secs(5),
            0.0,
        );
        assert_eq!(
            d,
            Decision::GiveUp {
                reason:
                    "gave up after 5 restarts within 60s; last exit: killed by signal 9 (SIGKILL)"
                        .into()
            }
        );
    }

    #[test]
    fn window_slides() {
        let c = cfg();
        let mut h = SlotHistory::default();
        let start = Instant::now();
        for i in 0..5 {
            on_exit(
                &c,
                &mut h,
                &CRASH,
                SHORT,
                start + Duration::from_secs(i),
                0.0,
            );
        }
        // The first restart (at start) is exactly 60s old: still inside.
        let t = start + Duration::from_secs(60);
        assert_eq!(h.restarts_in_window(&c, t), 5);
        assert!(matches!(
            on_exit(&c, &mut h, &CRASH, SHORT, t, 0.0),
            Decision::GiveUp { .. }
        ));
        // Just past it, the oldest restart has expired and there is room for one more.
        let t = start + Duration::from_millis(60_001);
        assert_eq!(h.restarts_in_window(&c, t), 4);
        assert!(matches!(
            on_exit(&c, &mut h, &CRASH, SHORT, t, 0.0),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            on_exit(&c, &mut h, &CRASH, SHORT, t, 0.0),
            Decision::GiveUp { .. }
        ));
        // Much later everything has expired.
        let t = start + Duration::from_secs(600);
        assert_eq!(h.restarts_in_window(&c, t), 0);
        assert!(matches!(
            on_exit(&c, &mut h, &CRASH, SHORT, t, 0.0),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn stable_run_resets_backoff_but_not_window() {
        let c = cfg();
        let mut h = SlotHistory::default();
        let now = Instant::now();
        for _ in 0..3 {
            on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0);
        }
        assert_eq!(h.consecutive_failures(), 3);
        let d = after(on_exit(&c, &mut h, &CRASH, c.reset_after, now, 0.0));
        assert_eq!(d, Duration::ZERO);
        assert_eq!(h.consecutive_failures(), 1);
        assert_eq!(h.restarts_in_window(&c, now), 4);
        // The next quick crash backs off again from the start.
        let d = after(on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0));
        assert_eq!(d, c.backoff_initial);
        // The window still counts all of them.
        assert!(matches!(
            on_exit(&c, &mut h, &CRASH, Duration::from_secs(3600), now, 0.0),
            Decision::GiveUp { .. }
        ));
    }

    #[test]
    fn never_stays() {
        let c = Restart {
            policy: RestartMode::Never,
            ..cfg()
        };
        let mut h = SlotHistory::default();
        for exit in [CRASH, KILLED, ExitStatus::Exited(0)] {
            assert_eq!(
                on_exit(&c, &mut h, &exit, SHORT, Instant::now(), 0.0),
                Decision::Stay {
                    reason: "restart policy is never".into()
                }
            );
        }
        assert_eq!(h.restarts_in_window(&c, Instant::now()), 0);
    }

    #[test]
    fn on_failure_restarts_failures_only() {
        let c = Restart {
            policy: RestartMode::OnFailure,
            ..cfg()
        };
        let mut h = SlotHistory::default();
        let now = Instant::now();
        assert_eq!(
            on_exit(&c, &mut h, &ExitStatus::Exited(0), SHORT, now, 0.0),
            Decision::Stay {
                reason: "exited cleanly and restart policy is on-failure".into()
            }
        );
        assert_eq!(h.restarts_in_window(&c, now), 0);
        assert!(matches!(
            on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0),
            Decision::Restart { .. }
        ));
        let term = ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        };
        assert!(matches!(
            on_exit(&c, &mut h, &term, SHORT, now, 0.0),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn always_restarts_clean_exits() {
        let mut h = SlotHistory::default();
        let d = on_exit(
            &cfg(),
            &mut h,
            &ExitStatus::Exited(0),
            SHORT,
            Instant::now(),
            0.0,
        );
        assert_eq!(
            d,
            Decision::Restart {
                after: Duration::ZERO
            }
        );
    }

    #[test]
    fn zero_max_restarts_gives_up_at_first_exit() {
        let c = Restart {
            max_restarts: 0,
            ..cfg()
        };
        let mut h = SlotHistory::default();
        match on_exit(&c, &mut h, &CRASH, SHORT, Instant::now(), 0.0) {
            Decision::GiveUp { reason } => {
                assert!(reason.contains("max_restarts is 0"), "{reason}");
                assert!(reason.contains("exited with status 1"), "{reason}");
            }
            other => panic!("expected give-up, got {other:?}"),
        }
    }

    #[test]
    fn reset_forgets_everything() {
        let c = cfg();
        let mut h = SlotHistory::default();
        let now = Instant::now();
        for _ in 0..5 {
            on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0);
        }
        h.reset();
        assert_eq!(h.restarts_in_window(&c, now), 0);
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!(
            on_exit(&c, &mut h, &CRASH, SHORT, now, 0.0),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
    }

    #[test]
    fn exit_status_display() {
        assert_eq!(ExitStatus::Exited(3).to_string(), "exited with status 3");
        assert_eq!(KILLED.to_string(), "killed by signal 9 (SIGKILL)");
        let segv = ExitStatus::Signaled {
            signal: 11,
            core_dumped: true,
        };
        assert_eq!(
            segv.to_string(),
            "killed by signal 11 (SIGSEGV), core dumped"
        );
        let rt = ExitStatus::Signaled {
            signal: 40,
            core_dumped: false,
        };
        assert_eq!(rt.to_string(), "killed by signal 40");
        assert!(ExitStatus::Exited(0).success());
        assert!(!ExitStatus::Exited(1).success());
        assert!(!KILLED.success());
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(1), Some("SIGHUP"));
        assert_eq!(signal_name(15), Some("SIGTERM"));
        assert_eq!(signal_name(31), Some("SIGSYS"));
        assert_eq!(signal_name(0), None);
        assert_eq!(signal_name(32), None);
        assert_eq!(signal_name(-9), None);
    }

    #[test]
    fn durations_for_people() {
        let cases = [
            (Duration::ZERO, "0ms"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(60), "60s"),
            (Duration::from_secs(120), "120s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(150 * 60), "2.5h"),
            (Duration::from_secs(3 * 3600), "3h"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want, "{d:?}");
        }
    }
}
