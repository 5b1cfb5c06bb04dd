//! Every limit the kernel would refuse at worker start is refused at load, at the value's
//! file:line:col, with the value in the message; the kernel's bounds themselves load.

use super::*;
use crate::config::limits::{MAX_BACKLOG, MAX_PIDS};

#[test]
fn cpu_max_below_the_kernels_minimum() {
    let e = workers_err(
        "cpu_max = 0.005",
        "8:11",
        "`cpu_max` in [app.api.workers]: 0.005 is below the kernel's minimum of 0.01 CPU",
    );
    let hint = e.hint.unwrap();
    assert!(
        hint.contains("1000us") && hint.contains("100000us"),
        "{hint}"
    );
    workers_err("cpu_max = 0.00999", "8:11", "0.00999 is below");
}

#[test]
fn cpu_max_at_the_kernels_bounds_loads() {
    assert_eq!(workers("cpu_max = 0.01").cpu_max, Some(0.01));
    // 999.5us rounds to the 1000us written to cpu.max.
    assert_eq!(workers("cpu_max = 0.009995").cpu_max, Some(0.009995));
    assert_eq!(workers("cpu_max = 64").cpu_max, Some(64.0));
    assert_eq!(
        workers("cpu_max = 175921860.44415").cpu_max,
        Some(175921860.44415)
    );
}

#[test]
fn cpu_max_above_the_kernels_maximum() {
    let e = workers_err(
        "cpu_max = 2e8",
        "8:11",
        "`cpu_max` in [app.api.workers]: 200000000 is above the kernel's maximum of \
         175921860.44415 CPUs",
    );
    assert!(e.hint.unwrap().contains("17592186044415us"));
}

#[test]
fn cpu_max_not_a_number() {
    workers_err("cpu_max = nan", "8:11", "greater than 0, found NaN");
    workers_err("cpu_max = inf", "8:11", "greater than 0, found inf");
    workers_err("cpu_max = -0.5", "8:11", "greater than 0, found -0.5");
}

#[test]
fn pids_max_above_pid_max_limit() {
    let e = workers_err(
        &format!("pids_max = {}", u64::from(MAX_PIDS) + 1),
        "8:12",
        &format!(
            "`pids_max` in [app.api.workers]: expected an integer from 1 to {MAX_PIDS}, found {}",
            u64::from(MAX_PIDS) + 1
        ),
    );
    assert!(e.hint.unwrap().contains("the kernel takes at most"));
    workers_err("pids_max = 4294967295", "8:12", "found 4294967295");
    assert_eq!(
        workers(&format!("pids_max = {MAX_PIDS}")).pids_max,
        NonZeroU32::new(MAX_PIDS)
    );
}

#[test]
fn memory_below_one_page_of_any_size() {
    let e = workers_err(
        "memory_max = \"32KiB\"",
        "8:14",
        "`memory_max` in [app.api.workers]: 32KiB is below the minimum of 64KiB",
    );
    assert!(e.hint.unwrap().contains("whole pages"));
    workers_err(
        "memory_max = \"1GiB\"\nmemory_high = 1000",
        "9:15",
        "`memory_high` in [app.api.workers]: 1000B is below the minimum of 64KiB",
    );
    let w = workers("memory_max = \"128KiB\"\nmemory_high = \"64KiB\"");
    assert_eq!(w.memory_max, Some(ByteSize(128 << 10)));
    assert_eq!(w.memory_high, Some(ByteSize(64 << 10)));
}

#[test]
fn backlog_above_the_maximum() {
    assert_err(
        &app("", &format!("backlog = {}\n", MAX_BACKLOG + 1)),
        "7:11",
        "`backlog` in [app.api.listen]: expected an integer from 1 to 65535, found 65536",
    );
    let c = load_text(&app("", &format!("backlog = {MAX_BACKLOG}\n"))).unwrap();
    assert_eq!(api(&c).listen.backlog, 65535);
}
