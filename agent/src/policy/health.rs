//! What the kubelet's readiness probe (`/readyz` on the `[agent] metrics` listener) is told:
//! ready while every app has at least its `min_ready` workers ready (never more than it runs)
//! and the agent is not stopping. Liveness needs no decision: the loop answering is the answer.

use std::fmt::Write as _;

/// One app as the readiness decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppReadiness {
    pub app: String,
    /// Workers ready now (a rolling replacement's old and new ones both count).
    pub ready: u32,
    /// Worker slots the app runs now.
    pub slots: u32,
    /// `[app.NAME.workers] min_ready`.
    pub min_ready: u32,
}

impl AppReadiness {
    /// How many must be ready: `min_ready`, but never more than the app runs (an "auto" count
    /// on a smaller pod, a `corral scale` down), and at least one.
    pub fn needed(&self) -> u32 {
        self.min_ready.min(self.slots).max(1)
    }
}

/// The answer: ready or not, and one line per app saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub text: String,
}

/// Ready when not `stopping` and every app has [`AppReadiness::needed`] workers ready.
pub fn readiness(apps: &[AppReadiness], stopping: bool) -> Readiness {
    let mut text = String::new();
    let mut ready = !stopping;
    if stopping {
        text.push_str("not ready: the agent is stopping\n");
    }
    for a in apps {
        let ok = a.ready >= a.needed();
        ready &= ok;
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "{} {}: {} of {} workers ready, {} needed",
            if ok { "ok" } else { "not ready" },
            a.app,
            a.ready,
            a.slots,
            a.needed()
        );
    }
    if apps.is_empty() {
        text.push_str("no apps\n");
    }
    Readiness { ready, text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, ready: u32, slots: u32, min_ready: u32) -> AppReadiness {
        AppReadiness {
            app: name.into(),
            ready,
            slots,
            min_ready,
        }
    }

    #[test]
    fn every_app_needs_its_minimum() {
        let r = readiness(&[app("api", 1, 4, 1), app("admin", 2, 2, 2)], false);
        assert!(r.ready, "{}", r.text);
        assert_eq!(
            r.text,
            "ok api: 1 of 4 workers ready, 1 needed\nok admin: 2 of 2 workers ready, 2 needed\n"
        );
        let r = readiness(&[app("api", 1, 4, 1), app("admin", 1, 2, 2)], false);
        assert!(!r.ready);
        assert!(
            r.text
                .contains("not ready admin: 1 of 2 workers ready, 2 needed"),
            "{}",
            r.text
        );
    }

    #[test]
    fn no_worker_ready_is_not_ready() {
        let r = readiness(&[app("api", 0, 2, 1)], false);
        assert!(!r.ready);
        // An app with no slots (failed at start) is not ready either.
        assert!(!readiness(&[app("api", 0, 0, 1)], false).ready);
    }

    #[test]
    fn the_minimum_is_capped_by_what_runs() {
        // min_ready 4 on a pod where "auto" gave 2 workers: 2 ready is all there can be.
        assert_eq!(app("api", 2, 2, 4).needed(), 2);
        assert!(readiness(&[app("api", 2, 2, 4)], false).ready);
        assert!(!readiness(&[app("api", 1, 2, 4)], false).ready);
    }

    #[test]
    fn stopping_is_never_ready() {
        let r = readiness(&[app("api", 4, 4, 1)], true);
        assert!(!r.ready);
        assert!(
            r.text.starts_with("not ready: the agent is stopping\n"),
            "{}",
            r.text
        );
        assert!(readiness(&[], false).ready);
        assert!(!readiness(&[], true).ready);
    }
}
