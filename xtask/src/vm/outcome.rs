//! What one boot of a VM tier came to: the result line, the timings, and whether the guest
//! (not a test) ended the run by crashing or hanging.

use std::path::PathBuf;
use std::time::Duration;

use super::kernel::Release;

/// What one kernel's run came to.
pub(super) struct Outcome {
    pub(super) release: Release,
    pub(super) version: String,
    /// The words after `CORRAL-VM-RESULT: `, if /init got that far.
    pub(super) result: Option<String>,
    /// From starting qemu to /init's first line.
    pub(super) boot: Option<Duration>,
    /// The guest's uptime when /init started.
    pub(super) guest_boot: Option<String>,
    pub(super) total: Duration,
    pub(super) timed_out: bool,
    /// The console fell silent for longer than any test takes (qemu was killed).
    pub(super) hung: Option<Duration>,
    pub(super) log: PathBuf,
    /// Why the first boot failed (a crash or a hang), when this is the second.
    pub(super) retried_after: Option<String>,
}

/// Lines of a guest kernel that crashed (with `oops=panic`, an oops is a panic too).
const CRASH_SIGNS: &[&str] = &["Kernel panic", "Oops:", "BUG: ", "general protection fault"];

impl Outcome {
    pub(super) fn passed(&self) -> bool {
        self.result.as_deref() == Some("PASS") && !self.timed_out && self.hung.is_none()
    }

    /// Why the guest, not a test, ended the run: its kernel crashed, or it hung (the console
    /// silent far longer than any test takes, both vCPUs busy: seen once under TCG in the cgroup
    /// tree test, where the other observed crash was).
    pub(super) fn guest_failure(&self) -> Option<String> {
        if let Some(silent) = self.hung {
            return Some(format!(
                "the guest hung: no console output for {} s",
                silent.as_secs()
            ));
        }
        self.guest_crash()
    }

    /// The guest kernel's first crash line, when the run ended without a result because the
    /// kernel crashed (not a test failure, not a timeout).
    fn guest_crash(&self) -> Option<String> {
        if self.result.is_some() || self.timed_out || self.hung.is_some() {
            return None;
        }
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .find(|l| CRASH_SIGNS.iter().any(|sign| l.contains(sign)))
            .map(|l| l.trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(log: &str, result: Option<&str>, timed_out: bool) -> (Outcome, PathBuf) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "corral-xtask-outcome-{}-{n}.log",
            std::process::id()
        ));
        std::fs::write(&path, log).expect("write log");
        let o = Outcome {
            release: Release::Bookworm,
            version: "6.1".into(),
            result: result.map(str::to_string),
            boot: None,
            guest_boot: None,
            total: Duration::ZERO,
            timed_out,
            hung: None,
            log: path.clone(),
            retried_after: None,
        };
        (o, path)
    }

    #[test]
    fn a_guest_kernel_crash_is_told_from_a_failure_and_a_timeout() {
        let oops = "corral-vm: running vm\n[ 41.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
                    [ 41.2] Kernel panic - not syncing: Fatal exception\n";
        let (o, p) = outcome(oops, None, false);
        assert_eq!(
            o.guest_crash().as_deref(),
            Some("[ 41.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI")
        );
        let _ = std::fs::remove_file(p);
        // A test that failed printed its result: no second boot.
        let (o, p) = outcome(oops, Some("FAIL vm(exit-101)"), false);
        assert_eq!(o.guest_crash(), None);
        let _ = std::fs::remove_file(p);
        // A hang is a timeout, not a crash.
        let (o, p) = outcome(oops, None, true);
        assert_eq!(o.guest_crash(), None);
        let _ = std::fs::remove_file(p);
        // /init died without the kernel crashing: a failure, not retried.
        let (o, p) = outcome("corral-vm: running vm\nsh: /vm: not found\n", None, false);
        assert_eq!(o.guest_crash(), None);
        assert_eq!(o.guest_failure(), None);
        // A silent guest is retried too.
        let (mut o, p2) = outcome("corral-vm: running vm\n", None, false);
        o.hung = Some(Duration::from_secs(240));
        assert_eq!(
            o.guest_failure().as_deref(),
            Some("the guest hung: no console output for 240 s")
        );
        assert!(!o.passed());
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(p2);
    }
}
