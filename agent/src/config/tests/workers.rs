//! `[app.NAME.workers]` and `[app.NAME.restart]`: counts, readiness, limits and restart policy.

use super::*;

#[test]
fn ready_and_count_forms() {
    assert_eq!(workers("ready = \"notify\"").ready, Ready::Notify);
    assert_eq!(workers("ready = \"tcp\"").ready, Ready::Tcp);
    assert_eq!(
        workers("ready = \"delay:2s\"").ready,
        Ready::Delay(Duration::from_secs(2))
    );
    assert_eq!(workers("count = \"auto\"").count, WorkerCount::Auto);
    let w = workers("count = 1024\nmemory_max = 536870912");
    assert_eq!(w.count, WorkerCount::Fixed(NonZeroU32::new(1024).unwrap()));
    assert_eq!(w.count_at, loc(MAIN, 8, 9));
    assert_eq!(w.memory_max, Some(ByteSize(512 << 20)));
}

#[test]
fn count_zero() {
    workers_err(
        "count = 0",
        "8:9",
        "expected an integer from 1 to 1024 or \"auto\", found 0",
    );
}

#[test]
fn count_too_large() {
    workers_err("count = 1025", "8:9", "found 1025");
}

#[test]
fn count_many() {
    workers_err(
        "count = \"many\"",
        "8:9",
        "`count` in [app.api.workers]: expected an integer from 1 to 1024 or \"auto\", \
         found \"many\"",
    );
}

#[test]
fn count_wrong_type() {
    workers_err(
        "count = true",
        "8:9",
        "`count` in [app.api.workers]: expected an integer from 1 to 1024 or \"auto\", \
         found boolean `true`",
    );
}

#[test]
fn memory_high_not_below_memory_max() {
    let e = workers_err(
        "memory_max = \"512MiB\"\nmemory_high = \"1GiB\"",
        "9:15",
        "`memory_high` in [app.api.workers]: 1GiB must be less than `memory_max` (512MiB)",
    );
    assert!(e.hint.is_some());
    workers_err(
        "memory_max = \"1GiB\"\nmemory_high = 1073741824",
        "9:15",
        "must be less than `memory_max`",
    );
}

#[test]
fn bad_cpu_and_pids() {
    workers_err(
        "cpu_max = 0",
        "8:11",
        "expected a number of CPUs greater than 0, found 0",
    );
    workers_err(
        "pids_max = 0",
        "8:12",
        "`pids_max` in [app.api.workers]: expected an integer from 1 to",
    );
}

#[test]
fn bad_ready() {
    workers_err(
        "ready = \"maybe\"",
        "8:9",
        "`ready` in [app.api.workers]: expected \"tcp\", \"http:/PATH\", \"notify\" or \
         \"delay:DURATION\", found \"maybe\"",
    );
    let e = workers_err(
        "ready = \"http:healthz\"",
        "8:9",
        "expected a path starting with `/` after `http:`",
    );
    assert!(e.hint.unwrap().contains("\"http:/healthz\""));
    workers_err("ready = \"delay:2\"", "8:9", "duration \"2\" has no unit");
}

#[test]
fn min_ready_is_at_most_the_worker_count() {
    let e = workers_err(
        "count = 2\nmin_ready = 3",
        "9:13",
        "`min_ready` in [app.api.workers]: 3 is more than workers.count (2)",
    );
    assert!(e.hint.is_some());
    workers_err("min_ready = 0", "8:13", "expected an integer from 1 to");
    let c = load_text(&with_workers("count = 4\nmin_ready = 3")).unwrap();
    assert_eq!(c.apps.values().next().unwrap().workers.min_ready.get(), 3);
    // "auto" workers: any count is accepted (it is capped by the running count at /readyz).
    let c = load_text(&with_workers("min_ready = 8")).unwrap();
    assert_eq!(c.apps.values().next().unwrap().workers.min_ready.get(), 8);
    let c = load_text(&app("", "")).unwrap();
    assert_eq!(c.apps.values().next().unwrap().workers.min_ready.get(), 1);
}

#[test]
fn zero_window() {
    restart_err(
        "window = \"0s\"",
        "8:10",
        "`window` in [app.api.restart]: must be longer than 0",
    );
}

#[test]
fn bad_restart_policy() {
    restart_err(
        "policy = \"sometimes\"",
        "8:10",
        "expected \"always\", \"on-failure\" or \"never\", found \"sometimes\"",
    );
}

#[test]
fn backoff_initial_above_backoff_max() {
    restart_err(
        "backoff_initial = \"1m\"\nbackoff_max = \"30s\"",
        "8:19",
        "`backoff_initial` in [app.api.restart]: 60s must not be longer than `backoff_max` (30s)",
    );
}
