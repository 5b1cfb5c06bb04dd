//! `Root`, `App` and `Leaf` against a temp-directory fixture that looks like cgroupfs.
//!
//! The fixture is a plain directory, populated as cgroupfs would be; production code runs on it
//! unchanged (no test-only field or hook). cgroupfs does two things by itself that a plain
//! directory cannot: `mkdir` creates a cgroup's interface files (its `cgroup.controllers` is
//! what the parent enabled in `cgroup.subtree_control`), and `rmdir` takes them away. The tests
//! do those two steps where the kernel would: [`Fixture::mkdir`] makes a cgroup directory with
//! its files just before the production call that creates it (which then meets EEXIST, the
//! path it takes for a cgroup that exists: the same code from there on), and
//! [`Fixture::clear`] empties one just before the production rmdir (which fails on a directory
//! with files, so a missing or misplaced rmdir still fails the test).
//! `a_missing_cgroup_is_made_with_mkdir` checks that production code does create what is
//! missing, where it should. Why not emulate the kernel inside the production type (as a flag
//! on `Node` did): test behaviour in production code is code the real kernel never runs.
//! Tests read the files back to see exactly what was written where.

use std::fs;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::fs::{FileType, Mode};

use super::node::{write_all, Node, DIR_FLAGS};
use super::*;

const CORE_FILES: &[(&str, &str)] = &[
    ("cgroup.subtree_control", ""),
    ("cgroup.procs", ""),
    ("cgroup.events", "populated 0\nfrozen 0\n"),
    ("cgroup.type", "domain\n"),
    ("cgroup.kill", ""),
    ("cgroup.freeze", "0\n"),
    ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
];

fn controller_files(c: Controller) -> &'static [(&'static str, &'static str)] {
    match c {
        Controller::Memory => &[
            ("memory.max", "max\n"),
            ("memory.high", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.oom.group", "0\n"),
            ("memory.current", "0\n"),
            ("memory.peak", "0\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
            ),
        ],
        Controller::Pids => &[("pids.max", "max\n"), ("pids.current", "0\n")],
        Controller::Cpu => &[("cpu.max", "max 100000\n"), ("cpu.weight", "100\n")],
        _ => &[],
    }
}

/// `<tmp>/system.slice/corral.service`, the latter the delegated root.
struct Fixture {
    tmp: PathBuf,
    above: PathBuf,
    root: PathBuf,
}

impl Fixture {
    fn new(controllers: &str, procs: &str) -> Fixture {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tmp = std::env::temp_dir().join(format!(
            "corral-cgroup-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let above = tmp.join("system.slice");
        let root = above.join("corral.service");
        fs::create_dir_all(&root).unwrap();
        fs::write(above.join("cgroup.subtree_control"), "").unwrap();
        fs::write(above.join("cgroup.procs"), "").unwrap();
        for (file, content) in CORE_FILES {
            fs::write(root.join(file), content).unwrap();
        }
        fs::write(root.join("cgroup.controllers"), format!("{controllers}\n")).unwrap();
        fs::write(root.join("cgroup.procs"), procs).unwrap();
        fs::write(root.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        Fixture { tmp, above, root }
    }

    /// `Root::open` without the cgroup2 magic check.
    fn open(&self) -> Result<Root, CgroupError> {
        let fd = rustix::fs::open(&self.root, DIR_FLAGS, Mode::empty()).unwrap();
        Root::from_node(Node {
            fd,
            path: self.root.clone(),
        })
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.join(rel)).unwrap()
    }

    /// What the kernel does on mkdir in cgroupfs: the directory `rel` (below the root) with
    /// its interface files, for the controllers its parent enables for it now.
    fn mkdir(&self, rel: &str) {
        let dir = self.root.join(rel);
        let parent = dir.parent().unwrap();
        let subtree = fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap();
        // The fixture file holds what was written ("+memory +pids"), the kernel shows names.
        let enabled = Controllers::parse(&subtree.replace('+', ""));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("cgroup.controllers"), format!("{enabled}\n")).unwrap();
        for (file, content) in CORE_FILES
            .iter()
            .chain(enabled.iter().flat_map(controller_files))
        {
            fs::write(dir.join(file), content).unwrap();
        }
    }

    /// What the kernel does with rmdir in cgroupfs: the interface files of `rel` go (the
    /// directory itself is left for the code under test to remove).
    fn clear(&self, rel: &str) {
        for e in fs::read_dir(self.root.join(rel)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                fs::remove_file(e.path()).unwrap();
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

const NEEDED: &[Controller] = &[Controller::Memory, Controller::Pids, Controller::Cpu];

/// A fixture delegating `controllers`, without processes in the root, opened and prepared.
fn prepared(controllers: &str) -> (Fixture, Root) {
    let fx = Fixture::new(controllers, "");
    let mut root = fx.open().unwrap();
    root.prepare(NEEDED).unwrap();
    (fx, root)
}

/// `app-<name>` and its `worker-0`, made as the kernel would, opened by the code under test.
fn app_and_leaf(fx: &Fixture, root: &Root, name: &str) -> (App, Leaf) {
    fx.mkdir(&format!("app-{name}"));
    let app = root.app(name).unwrap();
    fx.mkdir(&format!("app-{name}/worker-0"));
    let leaf = app.leaf(0).unwrap();
    (app, leaf)
}

#[test]
fn prepare_moves_the_agent_and_enables_only_at_the_root() {
    let fx = Fixture::new("cpu io memory pids", "4242\n4243\n");
    let mut root = fx.open().unwrap();
    fx.mkdir("supervisor");
    let prepared = root.prepare(NEEDED).unwrap();
    assert_eq!(prepared.moved, vec![4242, 4243]);
    assert_eq!(prepared.missing, Controllers::NONE);
    assert_eq!(prepared.enabled.to_string(), "memory pids cpu");
    // The pids went to supervisor/, one write each.
    assert_eq!(fx.read("supervisor/cgroup.procs"), "4242\n4243\n");
    // Only what is needed (not io), only at the root, nothing above it.
    assert_eq!(fx.read("cgroup.subtree_control"), "+memory +pids +cpu");
    assert_eq!(
        fs::read_to_string(fx.above.join("cgroup.subtree_control")).unwrap(),
        ""
    );
    // supervisor/ is a leaf: nothing enabled in it.
    assert_eq!(fx.read("supervisor/cgroup.subtree_control"), "");
}

#[test]
fn prepare_without_processes_creates_no_supervisor() {
    let fx = Fixture::new("cpu memory pids", "");
    let mut root = fx.open().unwrap();
    let prepared = root.prepare(NEEDED).unwrap();
    assert!(prepared.moved.is_empty());
    assert!(!fx.root.join("supervisor").exists());
    assert_eq!(fx.read("cgroup.subtree_control"), "+memory +pids +cpu");
}

#[test]
fn prepare_reports_missing_controllers() {
    // Delegated without cpu (e.g. systemd without CPUAccounting).
    let fx = Fixture::new("memory pids", "");
    let mut root = fx.open().unwrap();
    let prepared = root.prepare(NEEDED).unwrap();
    assert_eq!(prepared.missing.to_string(), "cpu");
    assert_eq!(prepared.enabled.to_string(), "memory pids");
    assert_eq!(fx.read("cgroup.subtree_control"), "+memory +pids");
}

#[test]
fn prepare_writes_only_what_is_not_enabled_yet() {
    let fx = Fixture::new("cpu memory pids", "");
    fs::write(fx.root.join("cgroup.subtree_control"), "memory\n").unwrap();
    let mut root = fx.open().unwrap();
    root.prepare(NEEDED).unwrap();
    assert_eq!(fx.read("cgroup.subtree_control"), "+pids +cpu");
}

#[test]
fn app_and_leaf_with_limits() {
    let fx = Fixture::new("cpu memory pids", "1\n");
    let mut root = fx.open().unwrap();
    fx.mkdir("supervisor");
    root.prepare(NEEDED).unwrap();
    fx.mkdir("app-api");
    let app = root.app("api").unwrap();
    assert_eq!(app.path(), fx.root.join("app-api"));
    assert_eq!(
        fx.read("app-api/cgroup.subtree_control"),
        "+memory +pids +cpu"
    );

    fx.mkdir("app-api/worker-0");
    let leaf = app.leaf(0).unwrap();
    assert_eq!(leaf.name(), "worker-0");
    assert_eq!(leaf.path(), fx.root.join("app-api/worker-0"));
    let skipped = leaf
        .set_limits(&Limits {
            memory_max: Some(512 << 20),
            memory_high: Some(400 << 20),
            swap_max: None,
            pids_max: Some(64),
            cpu_max: Some(1.5),
        })
        .unwrap();
    assert_eq!(skipped, vec![]);
    let w = |f: &str| fx.read(&format!("app-api/worker-0/{f}"));
    assert_eq!(w("memory.max"), "536870912");
    assert_eq!(w("memory.high"), "419430400");
    assert_eq!(w("memory.swap.max"), "0");
    assert_eq!(w("memory.oom.group"), "1");
    assert_eq!(w("pids.max"), "64");
    assert_eq!(w("cpu.max"), "150000 100000");
    // Leaves enable nothing.
    assert_eq!(w("cgroup.subtree_control"), "");
    assert_eq!(
        fs::read_to_string(fx.above.join("cgroup.subtree_control")).unwrap(),
        ""
    );

    // Limits removed later are written back as max.
    leaf.set_limits(&Limits::default()).unwrap();
    assert_eq!(w("memory.max"), "max");
    assert_eq!(w("memory.swap.max"), "max");
    assert_eq!(w("cpu.max"), "max 100000");
}

#[test]
fn limits_of_controllers_not_delegated_are_skipped_and_reported() {
    let (fx, root) = prepared("memory pids");
    fx.mkdir("app-api");
    let app = root.app("api").unwrap();
    assert_eq!(fx.read("app-api/cgroup.subtree_control"), "+memory +pids");
    fx.mkdir("app-api/worker-1");
    let leaf = app.leaf(1).unwrap();
    // A kernel without swap accounting.
    fs::remove_file(fx.root.join("app-api/worker-1/memory.swap.max")).unwrap();
    let skipped = leaf
        .set_limits(&Limits {
            memory_max: Some(1 << 30),
            cpu_max: Some(2.0),
            ..Limits::default()
        })
        .unwrap();
    assert_eq!(
        skipped,
        vec![
            Skipped {
                file: "memory.swap.max",
                value: "0".into(),
                reason: SkipReason::FileMissing
            },
            Skipped {
                file: "cpu.max",
                value: "200000 100000".into(),
                reason: SkipReason::NotEnabled(Controller::Cpu)
            },
        ]
    );
    assert_eq!(
        skipped[1].to_string(),
        "cpu.max = 200000 100000 not applied: the cpu controller is not enabled"
    );
    assert!(!fx.root.join("app-api/worker-1/cpu.max").exists());
    assert!(!fx.root.join("app-api/worker-1/memory.swap.max").exists());
    assert_eq!(fx.read("app-api/worker-1/memory.max"), "1073741824");
}

#[test]
fn bad_names_are_refused_and_create_nothing() {
    let (fx, root) = prepared("cpu memory pids");
    for bad in ["../x", "a/b", "", ".."] {
        assert!(
            matches!(root.app(bad), Err(CgroupError::InvalidName { .. })),
            "{bad:?}"
        );
    }
    fx.mkdir("app-api");
    let app = root.app("api").unwrap();
    assert!(matches!(
        app.leaf("../../escape"),
        Err(CgroupError::InvalidName { .. })
    ));
    let mut entries: Vec<_> = fs::read_dir(&fx.root)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type().unwrap().is_dir().then(|| e.file_name())
        })
        .collect();
    entries.sort();
    assert_eq!(entries, vec!["app-api"]);
    assert!(!fx.tmp.join("escape").exists());
}

#[test]
fn errors_name_the_file_and_the_value() {
    let (fx, root) = prepared("cpu memory pids");
    let (_app, leaf) = app_and_leaf(&fx, &root, "api");
    let file = fx.root.join("app-api/worker-0/memory.max");
    fs::remove_file(&file).unwrap();
    fs::create_dir(&file).unwrap(); // any error will do: EISDIR
    let err = leaf
        .set_limits(&Limits {
            memory_max: Some(256 << 20),
            ..Limits::default()
        })
        .unwrap_err();
    assert!(matches!(err, CgroupError::Write { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "writing `268435456` to {}: Is a directory (os error 21)",
            file.display()
        )
    );
    assert_eq!(
        CgroupError::MoveIncomplete {
            path: fx.root.clone(),
            rounds: 3
        }
        .to_string(),
        format!(
            "processes keep appearing in {} after 3 rounds of moving them to supervisor/",
            fx.root.display()
        )
    );
}

#[test]
fn symlinks_are_not_followed() {
    let (fx, root) = prepared("cpu memory pids");
    // A symlink where an app cgroup should be (cgroupfs never has one; a plain fs might).
    std::os::unix::fs::symlink(&fx.above, fx.root.join("app-evil")).unwrap();
    assert!(matches!(
        root.app("evil"),
        Err(CgroupError::Io { op: "open", .. })
    ));
    assert_eq!(
        fs::read_to_string(fx.above.join("cgroup.subtree_control")).unwrap(),
        ""
    );
}

#[test]
fn leaves_are_reused_only_when_empty() {
    let (fx, root) = prepared("cpu memory pids");
    fx.mkdir("app-api");
    let app = root.app("api").unwrap();
    fx.mkdir("app-api/worker-2");
    drop(app.leaf(2).unwrap());
    // Reuse of the app and of an empty leaf.
    let app = root.app("api").unwrap();
    let again = app.leaf(2).unwrap();
    assert_eq!(again.controllers().to_string(), "memory pids cpu");
    fs::write(fx.root.join("app-api/worker-2/cgroup.procs"), "777\n").unwrap();
    let err = app.leaf(2).unwrap_err();
    assert!(matches!(err, CgroupError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("app-api/worker-2"));
}

#[test]
fn kill_populated_events_stats_remove() {
    let (fx, root) = prepared("cpu memory pids");
    let (app, leaf) = app_and_leaf(&fx, &root, "web");
    let dir = fx.root.join("app-web/worker-0");

    leaf.kill().unwrap();
    assert_eq!(fx.read("app-web/worker-0/cgroup.kill"), "1");

    assert!(!leaf.populated().unwrap());
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    assert!(leaf.populated().unwrap());

    assert_eq!(
        leaf.events_path(EventsFile::Memory),
        dir.join("memory.events")
    );
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 7\nmax 2\noom 1\noom_kill 1\noom_group_kill 1\n",
    )
    .unwrap();
    let ev = leaf.read_memory_events().unwrap();
    assert_eq!((ev.high, ev.oom_kill, ev.oom_group_kill), (7, 1, 1));
    let fd = leaf.events_fd(EventsFile::Memory).unwrap();
    assert_eq!(MemoryEvents::parse(&read_fd(fd.as_fd()).unwrap()), ev);

    fs::write(dir.join("memory.current"), "1048576\n").unwrap();
    fs::write(dir.join("pids.current"), "3\n").unwrap();
    fs::write(dir.join("cpu.stat"), "usage_usec 5000\nuser_usec 1\n").unwrap();
    let stats = leaf.stats().unwrap();
    assert_eq!(
        stats,
        LeafStats {
            memory_current: Some(1 << 20),
            memory_peak: Some(0),
            cpu_usage_usec: 5000,
            pids_current: Some(3),
        }
    );
    // Before 5.19 there is no memory.peak.
    fs::remove_file(dir.join("memory.peak")).unwrap();
    assert_eq!(leaf.stats().unwrap().memory_peak, None);

    let procs = leaf.procs_fd().unwrap();
    write_all(&procs, "0").unwrap();
    drop(procs);
    fs::write(dir.join("cgroup.procs"), "").unwrap();

    let st = rustix::fs::fstat(leaf.dir_fd()).unwrap();
    assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Directory);
    fx.clear("app-web/worker-0");
    leaf.remove().unwrap();
    assert!(!dir.exists());
    fx.clear("app-web");
    app.remove().unwrap();
    assert!(!fx.root.join("app-web").exists());
}

#[test]
fn kill_without_cgroup_kill_signals_each_process() {
    let (fx, root) = prepared("cpu memory pids");
    let (_app, leaf) = app_and_leaf(&fx, &root, "old");
    let dir = fx.root.join("app-old/worker-0");
    fs::remove_file(dir.join("cgroup.kill")).unwrap(); // kernel < 5.14
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    fs::write(dir.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
    leaf.kill().unwrap();
    assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn existing_apps_and_leaves() {
    let (fx, root) = prepared("cpu memory pids");
    fx.mkdir("app-a");
    let a = root.app("a").unwrap();
    fx.mkdir("app-a/worker-0");
    a.leaf(0).unwrap();
    fx.mkdir("app-a/worker-1");
    a.leaf(1).unwrap();
    fx.mkdir("app-b");
    root.app("b").unwrap();
    fs::create_dir(fx.root.join("not-ours")).unwrap();
    let apps = root.existing_apps().unwrap();
    let names: Vec<_> = apps.iter().map(App::name).collect();
    assert_eq!(names, vec!["a", "b"]);
    let leaves = apps[0].existing_leaves().unwrap();
    let names: Vec<_> = leaves.iter().map(Leaf::name).collect();
    assert_eq!(names, vec!["worker-0", "worker-1"]);
    for l in leaves {
        fx.clear(&format!("app-a/{}", l.name()));
        l.remove().unwrap();
    }
    for app in apps {
        fx.clear(&format!("app-{}", app.name()));
        app.remove().unwrap();
    }
    assert!(!fx.root.join("app-a").exists());
    assert!(fx.root.join("not-ours").exists());
}

#[test]
fn the_hierarchy_root_and_non_cgroup2_are_refused() {
    let fx = Fixture::new("cpu memory pids", "");
    // The hierarchy's root has no cgroup.events.
    fs::remove_file(fx.root.join("cgroup.events")).unwrap();
    assert!(matches!(fx.open(), Err(CgroupError::HierarchyRoot { .. })));
    // The real open checks the filesystem.
    let err = Root::open(&fx.root).unwrap_err();
    assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
}

#[test]
fn a_missing_cgroup_is_made_with_mkdir() {
    // No `Fixture::mkdir`: the directory the code creates is a plain one, without interface
    // files, so reading its cgroup.controllers fails, naming the file where it made it.
    let (fx, root) = prepared("cpu memory pids");
    let err = root.app("new").unwrap_err();
    let file = fx.root.join("app-new/cgroup.controllers");
    assert!(
        matches!(&err, CgroupError::Io { op: "read", path, .. } if *path == file),
        "{err}"
    );
    assert!(fx.root.join("app-new").is_dir());
    fx.mkdir("app-api");
    let app = root.app("api").unwrap();
    let err = app.leaf(7).unwrap_err();
    let file = fx.root.join("app-api/worker-7/cgroup.controllers");
    assert!(
        matches!(&err, CgroupError::Io { op: "read", path, .. } if *path == file),
        "{err}"
    );
    assert!(fx.root.join("app-api/worker-7").is_dir());
}

#[tokio::test]
async fn wait_unpopulated_returns_on_the_event() {
    let (fx, root) = prepared("cpu memory pids");
    let (_app, leaf) = app_and_leaf(&fx, &root, "web");
    let events = fx.root.join("app-web/worker-0/cgroup.events");

    // Empty already: at once.
    leaf.wait_unpopulated(Duration::from_secs(60))
        .await
        .unwrap();

    fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
    let wait = leaf.wait_unpopulated(Duration::from_secs(60));
    tokio::pin!(wait);
    // Polled once (a zero timeout polls the future before looking at the clock): it watches
    // the file, reads `populated 1` and waits.
    assert!(tokio::time::timeout(Duration::ZERO, &mut wait)
        .await
        .is_err());
    // The kernel's change to `populated 0` (inotify IN_MODIFY) ends the wait.
    fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
    wait.await.unwrap();
}

#[tokio::test]
async fn wait_unpopulated_times_out_naming_the_leaf() {
    let (fx, root) = prepared("cpu memory pids");
    let (_app, leaf) = app_and_leaf(&fx, &root, "web");
    let dir = fx.root.join("app-web/worker-0");
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    let err = leaf
        .wait_unpopulated(Duration::from_millis(20))
        .await
        .unwrap_err();
    assert!(matches!(err, CgroupError::StillPopulated { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("{} still has processes after 20ms", dir.display())
    );
}

#[tokio::test]
async fn an_app_sees_its_last_leaf_go() {
    let (fx, root) = prepared("cpu memory pids");
    fx.mkdir("app-web");
    let app = root.app("web").unwrap();
    // No leaf: at once.
    app.leaves_gone().await;
    fx.mkdir("app-web/worker-0");
    let first = app.leaf(0).unwrap();
    fx.mkdir("app-web/prestart");
    let second = app.named_leaf("prestart").unwrap();
    {
        let gone = app.leaves_gone();
        tokio::pin!(gone);
        assert!(tokio::time::timeout(Duration::ZERO, &mut gone)
            .await
            .is_err());
        drop(first);
        assert!(tokio::time::timeout(Duration::ZERO, &mut gone)
            .await
            .is_err());
        // The last one removed (what a teardown does): the app can go.
        fx.clear("app-web/prestart");
        second.remove().unwrap();
        gone.await;
    }
    fx.clear("app-web/worker-0");
    fs::remove_dir(fx.root.join("app-web/worker-0")).unwrap();
    fx.clear("app-web");
    app.remove().unwrap();
    assert!(!fx.root.join("app-web").exists());
}
