//! Per-worker cgroup v2 leaves: the tree the agent keeps, adopting it after a crash or a
//! reexec, and the same tree without clone3.
//!
//! The contract these tests check: `[agent] cgroup_root` names an existing cgroup v2 directory
//! (made here by `vm_cgroup_root`, never by corral); under it the agent keeps
//! `app-<app>/worker-<slot>-<n>`, one leaf per worker process, with the app's limits written
//! into each leaf, and removes what it made when workers exit and when it stops.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fixture::in_vm;
use corral_tests::*;

pub const MIB: u64 = 1 << 20;

/// Start an agent on `apps` whose `[agent]` table has `cgroup_root` = the test's root and the
/// settings in `extra`; returns it and the root's path.
pub fn cgroup_agent(
    tag: &str,
    root: &CgroupRootGuard,
    extra: Table,
    apps: impl std::fmt::Display,
) -> (Agent, PathBuf) {
    let agent = Agent::start_with_agent_extra(tag, root.agent_settings().merge(extra), apps);
    (agent, root.path().to_path_buf())
}

/// A worker's leaf directory from its status's `cgroup` field: an absolute path under
/// /sys/fs/cgroup, or a cgroup name as /proc/PID/cgroup shows it (`/corral-.../app-web/...`).
pub fn leaf_dir(root: &Path, worker: &serde_json::Value) -> PathBuf {
    let field = worker["cgroup"]
        .as_str()
        .unwrap_or_else(|| panic!("worker status has no \"cgroup\" string: {worker}"));
    let path = if Path::new(field).starts_with(CGROUP_FS) {
        PathBuf::from(field)
    } else if field.starts_with('/') {
        Path::new(CGROUP_FS).join(field.trim_start_matches('/'))
    } else {
        root.join(field)
    };
    assert!(
        path.starts_with(root) && path != root,
        "worker cgroup {field} is not below the cgroup root {}",
        root.display()
    );
    path
}

/// The workers of an app's JSON status.
pub fn workers_json(app: &serde_json::Value) -> Vec<serde_json::Value> {
    app["workers"].as_array().cloned().unwrap_or_default()
}

pub fn json_pid(w: &serde_json::Value) -> Option<i32> {
    w["pid"].as_i64().map(|p| p as i32)
}

/// Directories directly in `dir` whose names start with `prefix`.
pub fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The directories directly in `dir`.
pub fn subdir_names(dir: &Path) -> BTreeSet<String> {
    entries_starting_with(dir, "").into_iter().collect()
}

pub fn controllers(dir: &Path) -> BTreeSet<String> {
    cgroup_read(dir, "cgroup.subtree_control")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

pub fn assert_controllers(dir: &Path) {
    let have = controllers(dir);
    for c in ["memory", "pids", "cpu"] {
        assert!(
            have.contains(c),
            "{c} is not enabled in {}/cgroup.subtree_control: {have:?}",
            dir.display()
        );
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn tree_is_as_designed_and_removed_on_shutdown() {
    in_vm();
    let root = vm_cgroup_root("tree");
    let parent = root.path().parent().expect("parent").to_path_buf();
    // What the agent must leave alone: everything outside its root.
    let parent_controllers = cgroup_read(&parent, "cgroup.subtree_control");
    let parent_dirs = subdir_names(&parent);
    let own_cgroup = proc_cgroup(std::process::id() as i32).expect("own cgroup");

    let (pa, pb) = (free_port(), free_port());
    let limits = |app: App| {
        app.workers("memory_max", "64MiB")
            .workers("pids_max", 32)
            .workers("cpu_max", 0.5)
    };
    let apps = format!(
        "{}{}",
        limits(demo_app("alpha", loopback(pa), 2)),
        limits(demo_app("beta", loopback(pb), 1))
    );
    let (mut agent, root_dir) = cgroup_agent("cg-tree", &root, Table::new(), &apps);
    let mut pids = agent.wait_ready("alpha", 2, Duration::from_secs(60));
    pids.extend(agent.wait_ready("beta", 1, Duration::from_secs(60)));

    assert_eq!(
        cgroup_read(&parent, "cgroup.subtree_control"),
        parent_controllers,
        "the agent wrote {}/cgroup.subtree_control",
        parent.display()
    );
    // The agent stays where it was started: it is not in the root, so it is not moved.
    assert_eq!(
        proc_cgroup(agent.pid()).as_deref(),
        Some(own_cgroup.as_str()),
        "the agent moved itself out of its own cgroup"
    );

    let mut expected = BTreeSet::new();
    let mut leaves = Vec::new();
    for app in ["alpha", "beta"] {
        expected.insert(format!("app-{app}"));
        let status = agent.app_json(app);
        for w in workers_json(&status) {
            let slot = w["slot"].as_u64().expect("slot");
            let pid = json_pid(&w).expect("a ready worker has a pid");
            let leaf = leaf_dir(&root_dir, &w);
            let rel = leaf
                .strip_prefix(&root_dir)
                .expect("below the root")
                .to_string_lossy()
                .into_owned();
            let prefix = format!("app-{app}/worker-{slot}-");
            let n = rel.strip_prefix(&prefix).unwrap_or_else(|| {
                panic!("worker {app}/{slot}'s leaf is {rel}, expected {prefix}<n>")
            });
            assert!(
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
                "worker {app}/{slot}'s leaf is {rel}: <n> is not a number"
            );
            expected.insert(rel.clone());
            leaves.push((app, slot, pid, leaf, w));
        }
    }
    assert_eq!(leaves.len(), 3, "{leaves:?}");

    // The exact tree: app-<app> and one worker leaf per worker; `supervisor` (the agent's own
    // leaf, only if it sat in the root) and an empty `prestart` are the only extras allowed.
    let actual = cgroup_subdirs(&root_dir);
    let extras: Vec<&String> = actual
        .iter()
        .filter(|d| !expected.contains(*d))
        .filter(|d| {
            let allowed = d.as_str() == "supervisor"
                || (d.ends_with("/prestart")
                    && d.matches('/').count() == 1
                    && cgroup_procs(&root_dir.join(d)).is_empty());
            !allowed
        })
        .collect();
    assert!(
        extras.is_empty() && expected.is_subset(&actual),
        "cgroup tree under {}:\n  actual   {actual:?}\n  expected {expected:?}\n  unexpected {extras:?}",
        root_dir.display()
    );

    println!("cgroup tree under {}: {actual:?}", root_dir.display());
    assert_controllers(&root_dir);
    for app in ["alpha", "beta"] {
        let dir = root_dir.join(format!("app-{app}"));
        assert_controllers(&dir);
        assert_eq!(
            cgroup_procs(&dir),
            Vec::<i32>::new(),
            "processes in the inner node {}",
            dir.display()
        );
    }
    assert_eq!(
        cgroup_procs(&root_dir),
        Vec::<i32>::new(),
        "processes in the root"
    );

    for (app, slot, pid, leaf, w) in &leaves {
        let at = format!("{app}/{slot} ({})", leaf.display());
        for (file, want) in [
            ("memory.max", "67108864"),
            ("memory.high", "max"),
            ("memory.swap.max", "0"),
            ("memory.oom.group", "1"),
            ("pids.max", "32"),
            ("cpu.max", "50000 100000"),
        ] {
            assert_eq!(cgroup_read(leaf, file), want, "{file} of {at}");
        }
        assert_eq!(
            cgroup_procs(leaf),
            vec![*pid],
            "cgroup.procs of {at}: exactly its worker"
        );
        assert_eq!(
            proc_cgroup(*pid),
            Some(cgroup_name(leaf)),
            "/proc/{pid}/cgroup of {at}"
        );
        // Status numbers come from the leaf.
        let current: u64 = cgroup_read(leaf, "memory.current")
            .parse()
            .expect("memory.current");
        let rss = w["rss_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("rss_bytes of {at}: {w}"));
        let peak = w["peak_rss_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("peak_rss_bytes of {at}: {w}"));
        assert!(
            rss > 0 && rss <= 64 * MIB && rss.abs_diff(current) < 8 * MIB,
            "rss_bytes {rss} of {at} is not its memory.current ({current})"
        );
        assert!(
            peak > 0 && peak <= 64 * MIB,
            "peak_rss_bytes {peak} of {at} is not a memory.peak under memory.max"
        );
        let tasks = w["pids"]
            .as_u64()
            .unwrap_or_else(|| panic!("\"pids\" of {at}: {w}"));
        let pids_current: u64 = cgroup_read(leaf, "pids.current")
            .parse()
            .expect("pids.current");
        // Read a moment apart: a worker still starting its threads may have one more by now.
        assert!(
            (1..=32).contains(&tasks) && tasks.abs_diff(pids_current) <= 1,
            "\"pids\" {tasks} of {at}: pids.current is {pids_current}"
        );
    }

    assert_eq!(agent.stop(Duration::from_secs(30)), Some(0), "agent exit");
    let left = entries_starting_with(&root_dir, "app-");
    assert!(
        left.is_empty(),
        "app directories left after SIGTERM: {left:?} (tree {:?})",
        cgroup_subdirs(&root_dir)
    );
    assert!(root_dir.is_dir(), "the agent removed the root it was given");
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} outlived the agent");
    }
    // Nothing outside the root changed.
    assert_eq!(
        cgroup_read(&parent, "cgroup.subtree_control"),
        parent_controllers,
        "{}/cgroup.subtree_control changed",
        parent.display()
    );
    assert_eq!(
        subdir_names(&parent),
        parent_dirs,
        "cgroups appeared or went next to the root in {}",
        parent.display()
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn a_restarted_agent_adopts_a_crashed_ones_leaves_and_removes_those_nobody_holds() {
    in_vm();
    let root = vm_cgroup_root("stale");
    let port = free_port();
    let apps = demo_app("web", loopback(port), 2).workers("memory_max", "64MiB");
    let (mut agent, root_dir) = cgroup_agent("cg-stale", &root, Table::new(), &apps);
    let old = agent.wait_ready("web", 2, Duration::from_secs(60));
    let old_leaves = cgroup_subdirs(&root_dir.join("app-web"));
    assert_eq!(old_leaves.len(), 2, "{old_leaves:?}");
    // A crash: the keeper holds the workers; the next agent adopts them in their leaves.
    agent.kill9();
    agent.spawn();
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(60)), old);
    assert_eq!(cgroup_subdirs(&root_dir.join("app-web")), old_leaves);
    for w in agent.app("web").workers {
        let leaf = w.cgroup.clone().unwrap_or_default();
        assert!(
            old_leaves.iter().any(|l| leaf.ends_with(l.as_str())),
            "{leaf} adopted"
        );
    }
    // The agent, its keeper and the workers all killed (nothing holds them): the leaves
    // stay behind, empty, and the next agent removes them.
    agent.kill9();
    let spool = agent.socket.with_file_name("keeper.spool");
    for pid in processes_with_arg(&spool.to_string_lossy()) {
        // SAFETY: this test's keeper.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for pid in &old {
        // SAFETY: this test's workers.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while old.iter().any(|p| pid_alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "workers outlived the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        cgroup_subdirs(&root_dir.join("app-web")),
        old_leaves,
        "stale leaves remain"
    );
    agent.spawn();
    let new = agent.wait_ready("web", 2, Duration::from_secs(60));
    let new_leaves = cgroup_subdirs(&root_dir.join("app-web"));
    assert_eq!(
        new_leaves.len(),
        2,
        "only the new workers' leaves: {new_leaves:?}"
    );
    // (The restarted agent numbers its workers from scratch, so leaf names may repeat: what
    // counts is that every leaf holds a new worker and nothing else.)
    let mut held = Vec::new();
    for leaf in &new_leaves {
        let procs = cgroup_procs(&root_dir.join("app-web").join(leaf));
        assert_eq!(procs.len(), 1, "{leaf}: {procs:?}");
        held.extend(procs);
    }
    held.sort();
    let mut want = new.clone();
    want.sort();
    assert_eq!(held, want, "the leaves hold exactly the new workers");
    assert!(
        agent.log().contains("removed stale cgroup"),
        "{}",
        agent.log()
    );
}

/// With clone3 refused (no CLONE_INTO_CGROUP), a worker joins its leaf itself before it drops
/// its privileges: the tree, the limits and the accounting are the same.
#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn without_clone3_workers_still_run_in_their_own_leaves() {
    in_vm();
    let root = vm_cgroup_root("noclone3");
    let port = free_port();
    let apps = demo_app("web", loopback(port), 2)
        .workers("memory_max", "64MiB")
        .workers("pids_max", 32);
    let agent = Agent::start_without_clone3("cg-noclone3", root.agent_settings(), &apps);
    let pids = agent.wait_ready("web", 2, Duration::from_secs(60));
    let root_dir = root.path().to_path_buf();
    for w in workers_json(&agent.app_json("web")) {
        let pid = json_pid(&w).expect("a ready worker has a pid");
        let leaf = leaf_dir(&root_dir, &w);
        assert_eq!(cgroup_procs(&leaf), vec![pid], "{}", leaf.display());
        assert_eq!(proc_cgroup(pid), Some(cgroup_name(&leaf)));
        assert_eq!(cgroup_read(&leaf, "memory.max"), "67108864");
        assert_eq!(cgroup_read(&leaf, "pids.max"), "32");
    }
    assert_eq!(cgroup_procs(&root_dir.join("app-web")), Vec::<i32>::new());
    assert!(
        pids.iter().all(|p| proc_status(*p)
            .iter()
            .any(|(k, v)| k == "Seccomp" && v == "2")),
        "the workers run under the test's filter"
    );
    assert!(
        agent.log().contains("clone3 is refused with ENOSYS"),
        "{}",
        agent.log()
    );
}

/// `corral reexec` keeps each worker in its leaf: the new image adopts the app's cgroup (it is
/// not stale), a worker killed afterwards gets a leaf of its own, a stop removes the tree.
#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn reexec_keeps_workers_in_their_leaves() {
    in_vm();
    let root = vm_cgroup_root("reexec");
    let port = free_port();
    let apps = demo_app("web", loopback(port), 2)
        .workers("memory_max", "64MiB")
        .workers("memory_high", "48MiB");
    let (mut agent, root_dir) = cgroup_agent("cg-reexec", &root, Table::new(), &apps);
    let pids = agent.wait_ready("web", 2, Duration::from_secs(60));
    let leaves = |agent: &Agent| -> Vec<(i32, PathBuf)> {
        workers_json(&agent.app_json("web"))
            .iter()
            .map(|w| (json_pid(w).expect("pid"), leaf_dir(&root_dir, w)))
            .collect()
    };
    let before = leaves(&agent);
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(20)), pids);
    let after = leaves(&agent);
    assert_eq!(after, before, "the same workers in the same leaves");
    for (pid, leaf) in &after {
        assert_eq!(cgroup_procs(leaf), vec![*pid], "{}", leaf.display());
        assert_eq!(cgroup_read(leaf, "memory.max"), "67108864");
    }
    assert!(
        !agent.log().contains("removed stale cgroup"),
        "{}",
        agent.log()
    );
    // SAFETY: pids[0] is one of this test's workers.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let now = wait_for(Duration::from_secs(20), "worker 0 replaced", || {
        let now = agent.wait_ready("web", 2, Duration::from_secs(20));
        (now[0] != pids[0]).then_some(now)
    });
    let replaced = leaves(&agent);
    let (_, new_leaf) = replaced
        .iter()
        .find(|(p, _)| *p == now[0])
        .expect("new worker");
    assert_ne!(new_leaf, &before[0].1, "a new leaf for the new worker");
    wait_for(Duration::from_secs(10), "the old leaf removed", || {
        (!before[0].1.exists()).then_some(())
    });
    assert_eq!(agent.stop(Duration::from_secs(30)), Some(0));
    assert!(
        !root_dir.join("app-web").exists(),
        "the app's cgroup removed at stop"
    );
}
