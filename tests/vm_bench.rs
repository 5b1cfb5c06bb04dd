//! The VM tier's benchmarks: what per-worker cgroup leaves cost. Run by `cargo xtask bench
//! cgroup`, which boots bookworm's 6.1 kernel under qemu with the VM tier's initramfs and runs
//! this executable inside (`--ignored --nocapture`, CORRAL_VM=1): the host has no cgroup v2
//! memory controller. Results and method: BENCHMARKS.md, "cgroup".
//!
//! 1. Respawn: two agents side by side, 16 workers of corral-demo each (DEMO_THREADS=1): (a)
//!    with `[agent] cgroup_root` and `memory_max = "64MiB"`, so each worker gets its own leaf
//!    with limits, entered through clone3(CLONE_INTO_CGROUP); (b) without a cgroup root (the
//!    agent's cgroup in the VM is the root, which corral does not manage), so workers start in
//!    the agent's cgroup and nothing is written. Each worker is SIGKILLed in turn, alternating
//!    (a) and (b), and two times are taken per kill:
//!    - kill -> replacement's `main()`: CLOCK_MONOTONIC just before kill(2), and the line the
//!      new worker appends to DEMO_STARTED_FILE first thing (as `bench restart`). It covers
//!      reap, the old leaf's teardown (memory.events, cgroup.kill, rmdir), the new leaf's mkdir
//!      and limit writes, clone3, exec and the loader in a memory cgroup.
//!    - the agent's spawn path: from its `worker exited` log line (written after the old leaf
//!      is gone) to its `worker started` line for the replacement (written when clone3
//!      returned): policy, leaf mkdir + limit writes, clone3 with CLONE_INTO_CGROUP.
//! 2. The agent's own memory (VmRSS) with 16 and with 256 workers in cgroup mode, all ready.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_tests::*;

/// Workers per agent in the respawn benchmark.
const WORKERS: usize = 16;
/// Kills per worker and mode.
const ROUNDS: usize = 10;

fn in_vm() {
    assert_eq!(
        std::env::var("CORRAL_VM").as_deref(),
        Ok("1"),
        "this benchmark runs inside the VM tier's kernel: run it with `cargo xtask bench cgroup`"
    );
}

/// An app of `count` corral-demo workers with one serving thread each, reporting their start
/// in `started`. A stable worker (10 ms) restarts at once, without backoff, however often it is
/// killed.
fn bench_app(port: u16, count: usize, started: &Path) -> App {
    demo_app("web", loopback(port), count)
        .env("DEMO_THREADS", 1)
        .env("DEMO_STARTED_FILE", started.display())
        .workers("ready_timeout", "120s")
        .restart("reset_after", "10ms")
        .restart("max_restarts", 1000000)
        .restart("window", "1s")
}

/// One agent of the respawn benchmark and what was measured on it.
struct Side {
    name: &'static str,
    agent: Agent,
    started: PathBuf,
    pids: Vec<i32>,
    /// kill -> replacement's main().
    respawn: Vec<Duration>,
    /// (old pid, new pid) per kill, for the log-based spawn path.
    pairs: Vec<(i32, i32)>,
}

impl Side {
    /// SIGKILL the worker in `slot`, wait for its replacement's start line and for every
    /// worker to be ready again.
    fn kill_and_measure(&mut self, slot: usize) {
        let old = self.pids[slot];
        let seen = started_lines(&self.started).len();
        let t0 = monotonic_ns();
        // SAFETY: kill(2) of a worker this agent just reported in its status.
        unsafe { libc::kill(old, libc::SIGKILL) };
        let (new, t1) = wait_for(
            Duration::from_secs(60),
            &format!("{}: a replacement for worker {slot} (pid {old})", self.name),
            || started_lines(&self.started).get(seen).copied(),
        );
        self.respawn
            .push(Duration::from_nanos(t1.saturating_sub(t0)));
        self.pairs.push((old, new));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pids = self
                .agent
                .wait_ready("web", WORKERS, Duration::from_secs(120));
            if pids[slot] == new {
                self.pids = pids;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: slot {slot} runs {pids:?}, not the replacement {new}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Let the agent finish what follows readiness (ready set, load ticks) before the next
        // kill.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`2026-11-26T23:10:04.442120Z`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (_, time) = stamp.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From the agent's `worker exited` line for `old` to its `worker started` line for `new`.
fn spawn_path(log: &str, old: i32, new: i32) -> Option<Duration> {
    let find = |what: &str, pid: i32| {
        let field = format!("pid={pid}");
        log.lines()
            .find(|l| l.contains(what) && l.split_whitespace().any(|w| w == field))
            .and_then(log_time)
    };
    let exited = find("worker exited", old)?;
    let mut started = find("worker started", new)?;
    if started < exited {
        started += 86_400.0; // midnight passed
    }
    Some(Duration::from_secs_f64(started - exited))
}

struct Stats {
    n: usize,
    median: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    assert!(!v.is_empty(), "no samples");
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        n: v.len(),
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: *v.last().expect("not empty"),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn row(what: &str, s: &Stats) {
    println!(
        "| {what} | {} | {} | {} | {} | {} |",
        s.n,
        ms(s.median),
        ms(s.p90),
        ms(s.p99),
        ms(s.max)
    );
}

fn ratio_line(what: &str, a: &Stats, b: &Stats) {
    println!(
        "bench cgroup: {what}: ratio (a)/(b) median {:.2}, p90 {:.2}",
        a.median.as_secs_f64() / b.median.as_secs_f64(),
        a.p90.as_secs_f64() / b.p90.as_secs_f64()
    );
}

/// `key` of /proc/PID/status in KiB (`VmRSS:   1234 kB`).
fn status_kib(pid: i32, key: &str) -> u64 {
    proc_status(pid)
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The agent's memory: VmRSS, RssAnon, RssFile + RssShmem (the initramfs's files are shmem),
/// VmHWM, in KiB.
fn memory_kib(pid: i32) -> [u64; 4] {
    [
        status_kib(pid, "VmRSS"),
        status_kib(pid, "RssAnon"),
        status_kib(pid, "RssFile") + status_kib(pid, "RssShmem"),
        status_kib(pid, "VmHWM"),
    ]
}

/// How many fds `pid` has open.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The agent's memory and fds as a table row.
fn rss_row(what: &str, pid: i32) {
    let [rss, anon, file, hwm] = memory_kib(pid);
    println!(
        "| {what} | {} | {} | {} | {} | {} |",
        mib(rss),
        mib(anon),
        mib(file),
        mib(hwm),
        open_fds(pid)
    );
}

/// The agent's `cgroups:` log line, shortened to what it decided.
fn cgroups_line(agent: &Agent) -> String {
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("cgroups: "))
        .unwrap_or("(no cgroups line)");
    line.split_once("cgroups: ")
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_default()
}

#[test]
#[ignore = "VM tier benchmark: run by cargo xtask bench cgroup"]
fn respawn_with_and_without_cgroup_leaves() {
    in_vm();
    // Created before the agents, so they stop before the tree goes.
    let root = vm_cgroup_root("bench");
    let files = TempDir::new("bench-cgroup");
    let (start_a, start_b) = (
        files.shared_file("started-a"),
        files.shared_file("started-b"),
    );

    let t = Instant::now();
    let a = Agent::start_with_agent_extra(
        "bench-a",
        root.agent_settings(),
        bench_app(free_port(), WORKERS, &start_a).workers("memory_max", "64MiB"),
    );
    let pids_a = a.wait_ready("web", WORKERS, Duration::from_secs(300));
    println!(
        "bench cgroup: (a) {WORKERS} workers ready in {:.1} s; cgroups: {}",
        t.elapsed().as_secs_f64(),
        cgroups_line(&a)
    );
    let t = Instant::now();
    let b = Agent::start("bench-b", bench_app(free_port(), WORKERS, &start_b));
    let pids_b = b.wait_ready("web", WORKERS, Duration::from_secs(300));
    println!(
        "bench cgroup: (b) {WORKERS} workers ready in {:.1} s; cgroups: {}",
        t.elapsed().as_secs_f64(),
        cgroups_line(&b)
    );

    // Where the workers are: (a) each in its own leaf below the root, (b) in the agent's cgroup.
    let agent_cg = proc_cgroup(b.pid()).expect("the agent's cgroup");
    let root_name = cgroup_name(root.path());
    for &pid in &pids_a {
        let cg = proc_cgroup(pid).unwrap_or_default();
        assert!(
            cg.starts_with(&format!("{root_name}/app-web/worker-")),
            "(a) worker {pid} is in {cg}, not a leaf under {root_name}"
        );
    }
    for &pid in &pids_b {
        assert_eq!(
            proc_cgroup(pid).as_deref(),
            Some(agent_cg.as_str()),
            "(b) worker {pid} is not in the agent's cgroup"
        );
    }
    let leaf = proc_cgroup(pids_a[0]).expect("leaf");
    let leaf_dir = Path::new(CGROUP_FS).join(leaf.trim_start_matches('/'));
    println!(
        "bench cgroup: (a) worker 0 in {leaf}: memory.max {}, memory.current {}; (b) workers in \
         the agent's cgroup {agent_cg}",
        cgroup_read(&leaf_dir, "memory.max"),
        cgroup_read(&leaf_dir, "memory.current")
    );

    let mut sides = [
        Side {
            name: "(a) cgroup",
            agent: a,
            started: start_a,
            pids: pids_a,
            respawn: Vec::new(),
            pairs: Vec::new(),
        },
        Side {
            name: "(b) no cgroup",
            agent: b,
            started: start_b,
            pids: pids_b,
            respawn: Vec::new(),
            pairs: Vec::new(),
        },
    ];
    let t = Instant::now();
    for round in 0..ROUNDS {
        for slot in 0..WORKERS {
            // Alternate which side goes first, so neither always follows the other's kill.
            let order = if (round + slot) % 2 == 0 {
                [0, 1]
            } else {
                [1, 0]
            };
            for i in order {
                sides[i].kill_and_measure(slot);
            }
        }
        println!(
            "bench cgroup: round {}/{ROUNDS} done at {:.1} s",
            round + 1,
            t.elapsed().as_secs_f64()
        );
    }
    let kills = ROUNDS * WORKERS;

    let mut spawn = Vec::new();
    for side in &sides {
        let log = side.agent.log();
        let v: Vec<Duration> = side
            .pairs
            .iter()
            .filter_map(|&(old, new)| spawn_path(&log, old, new))
            .collect();
        assert!(
            v.len() * 10 >= side.pairs.len() * 9,
            "{}: only {} of {} kills found in the agent's log",
            side.name,
            v.len(),
            side.pairs.len()
        );
        spawn.push(v);
    }
    let [ra, rb] = [
        stats(sides[0].respawn.clone()),
        stats(sides[1].respawn.clone()),
    ];
    let [sa, sb] = [stats(spawn[0].clone()), stats(spawn[1].clone())];

    println!(
        "\nbench cgroup: {WORKERS} workers per agent, {ROUNDS} SIGKILLs per worker ({kills} per \
         mode), (a) and (b) interleaved\n"
    );
    println!("| measure | mode | n | median | p90 | p99 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    row(
        "kill -> replacement's main() | (a) own leaf, memory_max = 64MiB",
        &ra,
    );
    row("kill -> replacement's main() | (b) no cgroup root", &rb);
    row(
        "agent spawn path (log: exited -> started) | (a) own leaf, memory_max = 64MiB",
        &sa,
    );
    row(
        "agent spawn path (log: exited -> started) | (b) no cgroup root",
        &sb,
    );
    println!();
    ratio_line("kill -> replacement's main()", &ra, &rb);
    ratio_line("agent spawn path", &sa, &sb);

    println!("\nbench cgroup: the agents' memory after the kills ({WORKERS} workers each)\n");
    println!("| agent | VmRSS | RssAnon | RssFile + RssShmem | VmHWM | open fds |");
    println!("| --- | --- | --- | --- | --- | --- |");
    rss_row("(a) cgroup root", sides[0].agent.pid());
    rss_row("(b) no cgroup root", sides[1].agent.pid());
    println!();
}

/// Start an agent in cgroup mode with `count` tiny workers, wait for all of them, and return
/// it (with its time to ready) for its memory to be read.
fn rss_agent(root: &CgroupRootGuard, tag: &str, count: usize, files: &TempDir) -> (Agent, f64) {
    let started = files.shared_file(&format!("started-{tag}"));
    let t = Instant::now();
    // 256 x 16MiB is more than this VM's 3 GiB: the budget needs allow_overcommit. What the
    // workers really use is far less (printed below).
    let agent = Agent::start_with_agent_extra(
        tag,
        root.agent_settings().set("allow_overcommit", true),
        bench_app(free_port(), count, &started).workers("memory_max", "16MiB"),
    );
    // Fail at once, not at a timeout, when a worker cannot even be started (e.g. the agent is
    // out of fds).
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let app = agent.app("web");
        if app.workers.len() == count && app.workers.iter().all(|w| w.state == "ready") {
            break;
        }
        let log = agent.log();
        if let Some(line) = log.lines().find(|l| l.contains("worker could not start")) {
            panic!(
                "{count} workers: {line}\n(the agent has {} fds open, RLIMIT_NOFILE {:?})",
                open_fds(agent.pid()),
                nofile()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{count} workers not ready after 900 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let secs = t.elapsed().as_secs_f64();
    // Let the agent settle: the last probes' tasks end, the load ticks go idle.
    std::thread::sleep(Duration::from_secs(3));
    (agent, secs)
}

/// RLIMIT_NOFILE of this process (soft, hard).
fn nofile() -> (libc::rlim_t, libc::rlim_t) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit to fill.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (r.rlim_cur, r.rlim_max)
}

/// memory.current of every worker leaf of `agent`'s app `web`, summed, in KiB.
fn workers_memory_kib(agent: &Agent) -> (u64, usize) {
    let app = agent.app_json("web");
    let mut total = 0;
    let mut n = 0;
    for w in app["workers"].as_array().into_iter().flatten() {
        if let Some(rss) = w["rss_bytes"].as_u64() {
            total += rss / 1024;
            n += 1;
        }
    }
    (total, n)
}

#[test]
#[ignore = "VM tier benchmark: run by cargo xtask bench cgroup"]
fn agent_rss_with_16_and_256_workers() {
    in_vm();
    let root = vm_cgroup_root("bench-rss");
    let files = TempDir::new("bench-rss");
    // The agent needs about 6 fds per worker (its listening socket, pidfd, stdout and stderr
    // pipes, cgroup leaf, ...) and does not raise its own soft RLIMIT_NOFILE: with the usual
    // 1024 it cannot start the ~150th worker. Give it the hard limit, as LimitNOFILE= in its
    // systemd unit would.
    let (soft, hard) = nofile();
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit with a valid rlimit; raising the soft limit to the hard one is allowed.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    println!(
        "\nbench cgroup: the agent's memory in cgroup mode, all workers ready (RLIMIT_NOFILE \
         soft {soft} raised to the hard limit {hard} for the agent)\n"
    );
    let mut rows = Vec::new();
    for count in [16, 256] {
        let (agent, secs) = rss_agent(&root, &format!("rss-{count}"), count, &files);
        let pid = agent.pid();
        let (workers_kib, n) = workers_memory_kib(&agent);
        rows.push((
            count,
            secs,
            memory_kib(pid),
            open_fds(pid),
            workers_kib / (n.max(1) as u64),
            cgroups_line(&agent),
        ));
        // Stop it before the next one, so the two never share the machine.
        drop(agent);
    }
    println!(
        "| workers | all ready after | agent VmRSS | RssAnon | RssFile + RssShmem | VmHWM | \
         agent's open fds | a worker's memory.current, mean |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (count, secs, [rss, anon, file, hwm], fds, worker_kib, _) in &rows {
        println!(
            "| {count} | {secs:.1} s | {} | {} | {} | {} | {fds} | {} |",
            mib(*rss),
            mib(*anon),
            mib(*file),
            mib(*hwm),
            mib(*worker_kib)
        );
    }
    let (small, big) = (&rows[0], &rows[1]);
    println!(
        "\nbench cgroup: agent VmRSS grows {} for {} more workers ({:.1} KiB per worker)",
        mib(big.2[0].saturating_sub(small.2[0])),
        big.0 - small.0,
        big.2[0].saturating_sub(small.2[0]) as f64 / (big.0 - small.0) as f64
    );
    println!(
        "bench cgroup: agent fds grow by {} ({:.1} per worker)",
        big.3 - small.3,
        (big.3 - small.3) as f64 / (big.0 - small.0) as f64
    );
    println!("bench cgroup: cgroups: {}\n", small.5);
}
