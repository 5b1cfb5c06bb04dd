//! When to renew and when to try again: pure arithmetic on unix seconds.

use std::time::Duration;

/// Without ARI: two thirds into the certificate's lifetime (Let's Encrypt's own advice; 60 of
/// 90 days).
pub fn two_thirds(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

/// A moment inside ARI's suggested window, `jitter` in [0, 1) choosing where (RFC 9773 4.2:
/// a random point, so clients spread their load); a window that ends before it starts means
/// its start.
pub fn in_window(start: i64, end: i64, jitter: f64) -> i64 {
    if end <= start {
        return start;
    }
    start + ((end - start) as f64 * jitter.clamp(0.0, 1.0)) as i64
}

/// Whether an ARI window can be followed: it ends before the certificate does (a window past
/// the end would let it expire; seen from pebble with short-lived certificates).
pub fn window_fits(start: i64, end: i64, not_before: i64, not_after: i64) -> bool {
    start <= end && end <= not_after && start >= not_before
}

/// The retries after failed orders: 10 s doubling to 1 h, each scaled by a jitter factor in
/// [0.5, 1.5), and never sooner than the CA's Retry-After.
pub fn backoff(failures: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let base = 10u64.saturating_mul(1u64 << failures.saturating_sub(1).min(12));
    let secs = (base.min(3600) as f64 * (0.5 + jitter.clamp(0.0, 1.0))) as u64;
    Duration::from_secs(secs.max(1)).max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_times() {
        assert_eq!(two_thirds(0, 90), 60);
        assert_eq!(in_window(100, 200, 0.0), 100);
        assert_eq!(in_window(100, 200, 0.5), 150);
        assert_eq!(in_window(100, 50, 0.7), 100);
        assert!(window_fits(50, 80, 0, 90));
        assert!(!window_fits(50, 100, 0, 90));
        assert!(!window_fits(80, 50, 0, 90));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_an_hour_and_honours_retry_after() {
        assert_eq!(backoff(1, 0.5, None), Duration::from_secs(10));
        assert_eq!(backoff(2, 0.5, None), Duration::from_secs(20));
        assert_eq!(backoff(3, 0.0, None), Duration::from_secs(20));
        assert_eq!(backoff(40, 0.5, None), Duration::from_secs(3600));
        assert_eq!(
            backoff(1, 0.5, Some(Duration::from_secs(600))),
            Duration::from_secs(600)
        );
    }
}
