//! CLOCK_MONOTONIC, the clock corral-demo stamps its start with (DEMO_STARTED_FILE).

use std::path::Path;

/// CLOCK_MONOTONIC in nanoseconds: comparable with the stamps of [`started_lines`], which the
/// demo worker takes from the same clock in another process.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `<pid> <CLOCK_MONOTONIC ns>` lines corral-demo appends to its DEMO_STARTED_FILE first
/// thing in main(), oldest first (none if the file is missing; lines that do not parse are left
/// out).
pub fn started_lines(file: &Path) -> Vec<(i32, u64)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, ns) = l.split_once(' ')?;
            Some((pid.parse().ok()?, ns.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_time_does_not_go_back() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 1_000_000, "{a} then {b}");
    }

    #[test]
    fn started_lines_skip_what_does_not_parse() {
        let path =
            std::env::temp_dir().join(format!("corral-testkit-started-{}", std::process::id()));
        std::fs::write(&path, "12 1000\n13 2000\nbad\n14").expect("write");
        let lines = started_lines(&path);
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(lines, [(12, 1000), (13, 2000)]);
        assert!(started_lines(&path).is_empty());
    }
}
