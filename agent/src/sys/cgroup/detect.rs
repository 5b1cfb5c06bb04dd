//! Which cgroup hierarchy this machine mounts, where the agent sits in it, and whether systemd
//! delegated that cgroup. Reads only.

use std::path::{Component, Path, PathBuf};

use super::controllers::Controllers;
use super::error::CgroupError;
use super::names::SUPERVISOR;

/// `statfs` magic of a cgroup v2 filesystem.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `statfs` magic of a cgroup v1 filesystem (one controller hierarchy).
pub const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;
/// `statfs` magic of tmpfs: what `/sys/fs/cgroup` is in the hybrid and legacy layouts.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;

/// How cgroups are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// cgroup2 at the mount point: every controller is on v2.
    Unified,
    /// tmpfs with v1 controller hierarchies, and cgroup2 (usually without controllers) at
    /// `unified_at`: systemd's hybrid layout.
    Hybrid { unified_at: PathBuf },
    /// Only v1 hierarchies: corral cannot place or limit workers.
    Legacy,
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub kind: Kind,
    /// Where the cgroup2 filesystem is mounted (the mount point, or `unified_at`).
    pub v2_mount: Option<PathBuf>,
    /// The agent's own cgroup, from the `0::` line of /proc/self/cgroup (`/` is the root).
    pub own_cgroup: Option<PathBuf>,
    /// The delegated root as a directory: the agent's own cgroup, or its parent when the agent
    /// sits in a leaf named `supervisor` (systemd's `DelegateSubgroup=supervisor`, or a
    /// previous `Root::prepare`). Pass it to [`Root::open`].
    pub root: Option<PathBuf>,
    /// The root's `cgroup.controllers`: what its parent enabled for it. For a delegated cgroup
    /// these are the delegated controllers; a needed one missing here cannot be enabled below.
    pub available: Controllers,
    /// The root's `cgroup.subtree_control`: already enabled for its children.
    pub enabled_for_children: Controllers,
}

/// Detect the cgroup layout under `mount` (normally `/sys/fs/cgroup`) and the agent's place in
/// it. Reads only.
pub fn detect(mount: &Path) -> Result<Detected, CgroupError> {
    let proc_path = Path::new("/proc/self/cgroup");
    let proc = std::fs::read_to_string(proc_path).map_err(|source| CgroupError::Io {
        op: "read",
        path: proc_path.to_path_buf(),
        source,
    })?;
    let mount_magic = statfs_magic(mount)?;
    let unified_at = mount.join("unified");
    let kind = classify(mount, mount_magic, || statfs_magic(&unified_at).ok())?;
    let v2_mount = match &kind {
        Kind::Unified => Some(mount.to_path_buf()),
        Kind::Hybrid { unified_at } => Some(unified_at.clone()),
        Kind::Legacy => None,
    };
    let own_cgroup = v2_mount.as_ref().and_then(|_| parse_proc_cgroup(&proc));
    let root = match (&v2_mount, &own_cgroup) {
        (Some(m), Some(own)) => {
            let rel = delegated_root(own);
            let rel = rel.strip_prefix("/").unwrap_or(rel);
            Some(if rel.as_os_str().is_empty() {
                m.clone()
            } else {
                m.join(rel)
            })
        }
        _ => None,
    };
    let (mut available, mut enabled_for_children) = (Controllers::NONE, Controllers::NONE);
    if let Some(r) = &root {
        available = Controllers::parse(&read_path(&r.join("cgroup.controllers"))?);
        enabled_for_children = Controllers::parse(&read_path(&r.join("cgroup.subtree_control"))?);
    }
    Ok(Detected {
        kind,
        v2_mount,
        own_cgroup,
        root,
        available,
        enabled_for_children,
    })
}

fn read_path(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn statfs_magic(path: &Path) -> Result<u64, CgroupError> {
    let st = rustix::fs::statfs(path).map_err(|e| CgroupError::Io {
        op: "statfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.f_type as u64)
}

/// The layout from the mount point's magic and, only asked for tmpfs, the magic of
/// `<mount>/unified` (`None` if it does not exist).
fn classify(
    mount: &Path,
    magic: u64,
    unified_magic: impl FnOnce() -> Option<u64>,
) -> Result<Kind, CgroupError> {
    match magic {
        CGROUP2_SUPER_MAGIC => Ok(Kind::Unified),
        TMPFS_MAGIC => Ok(match unified_magic() {
            Some(CGROUP2_SUPER_MAGIC) => Kind::Hybrid {
                unified_at: mount.join("unified"),
            },
            _ => Kind::Legacy,
        }),
        CGROUP_SUPER_MAGIC => Ok(Kind::Legacy),
        _ => Err(CgroupError::UnknownFs {
            path: mount.to_path_buf(),
            magic,
        }),
    }
}

/// The v2 path in /proc/self/cgroup (the `0::/path` line), if there is one and it lies inside
/// this cgroup namespace (no `..` components).
pub fn parse_proc_cgroup(text: &str) -> Option<PathBuf> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = Path::new(path);
    let ok = path.has_root()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

/// A container's own cgroup, as the agent inside it sees it: the root of its cgroup namespace,
/// which (unlike the host's root cgroup) has a `cgroup.events` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroup {
    pub path: PathBuf,
    /// Mounted read-write and the agent may write its `cgroup.subtree_control`: a privileged
    /// container, or one given a writable cgroup by its engine.
    pub writable: bool,
}

/// The container's cgroup when the agent sits at the root of a cgroup namespace that is not
/// the host's root cgroup; `None` otherwise.
pub fn container_cgroup(d: &Detected) -> Option<ContainerCgroup> {
    let root = d.root.as_ref()?;
    if d.own_cgroup.as_deref() != Some(Path::new("/")) || !root.join("cgroup.events").exists() {
        return None;
    }
    let read_only = rustix::fs::statvfs(root)
        .map(|st| st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
        .unwrap_or(true);
    let may_write = rustix::fs::access(
        root.join("cgroup.subtree_control"),
        rustix::fs::Access::WRITE_OK,
    )
    .is_ok();
    Some(ContainerCgroup {
        path: root.clone(),
        writable: !read_only && may_write,
    })
}

/// Where systemd puts a delegated unit's control processes (`ExecStartPre=`, `ExecReload=`)
/// when the unit has `DelegateSubgroup=`: `corral check` runs there.
const SYSTEMD_CONTROL: &str = ".control";

/// The delegated root for a process in cgroup `own`: its parent when the process sits in the
/// agent's `supervisor` leaf or in systemd's `.control` leaf beside it, `own` otherwise.
fn delegated_root(own: &Path) -> &Path {
    match own.parent() {
        Some(parent)
            if own
                .file_name()
                .is_some_and(|n| n == SUPERVISOR || n == SYSTEMD_CONTROL) =>
        {
            parent
        }
        _ => own,
    }
}

/// Whether systemd delegated `dir`: for Delegate=yes it sets the `trusted.delegate` xattr
/// and, since systemd 252, `user.delegate` too. Reading `trusted.*` needs CAP_SYS_ADMIN, which
/// corral's unit does not give the agent, so `user.delegate` is what the packaged agent sees.
pub fn delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut buf = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut buf[..]).is_ok_and(|n| buf[..n].starts_with(b"1"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x/y\n1:cpu:/\n0::/\n";
        assert_eq!(parse_proc_cgroup(hybrid), Some(PathBuf::from("/")));
        let unified = "0::/system.slice/corral.service\n";
        assert_eq!(
            parse_proc_cgroup(unified),
            Some(PathBuf::from("/system.slice/corral.service"))
        );
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
        // Outside the cgroup namespace: refuse rather than climb.
        assert_eq!(parse_proc_cgroup("0::/../../x\n"), None);
        assert_eq!(parse_proc_cgroup("0::relative\n"), None);
    }

    #[test]
    fn a_container_cgroup_is_a_namespace_root_with_cgroup_events() {
        let dir = std::env::temp_dir().join(format!("corral-container-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        let d = |own: &str| Detected {
            kind: Kind::Unified,
            v2_mount: Some(dir.clone()),
            own_cgroup: Some(PathBuf::from(own)),
            root: Some(dir.clone()),
            available: Controllers::NONE,
            enabled_for_children: Controllers::NONE,
        };
        // The host's root cgroup has no cgroup.events.
        assert_eq!(container_cgroup(&d("/")), None);
        std::fs::write(dir.join("cgroup.events"), "populated 1\n").unwrap();
        let c = container_cgroup(&d("/")).unwrap();
        assert_eq!(c.path, dir);
        // As root, on a read-write temp dir (read-only is the VM tier's and a container's).
        assert!(c.writable || !crate::sys::machine::is_root());
        // Not at the namespace root: an ordinary cgroup, not a container's view of its own.
        assert_eq!(container_cgroup(&d("/system.slice/x.service")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn delegated_root_is_the_parent_of_supervisor() {
        let p = |s| PathBuf::from(s);
        assert_eq!(
            delegated_root(&p("/system.slice/corral.service/supervisor")),
            p("/system.slice/corral.service")
        );
        assert_eq!(
            delegated_root(&p("/system.slice/corral.service")),
            p("/system.slice/corral.service")
        );
        // `corral check` as the unit's ExecStartPre, with DelegateSubgroup=.
        assert_eq!(
            delegated_root(&p("/system.slice/corral.service/.control")),
            p("/system.slice/corral.service")
        );
        assert_eq!(delegated_root(&p("/")), p("/"));
    }

    #[test]
    fn classify_by_magic() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            classify(m, CGROUP2_SUPER_MAGIC, || panic!("not asked")).unwrap(),
            Kind::Unified
        );
        assert_eq!(
            classify(m, TMPFS_MAGIC, || Some(CGROUP2_SUPER_MAGIC)).unwrap(),
            Kind::Hybrid {
                unified_at: PathBuf::from("/sys/fs/cgroup/unified")
            }
        );
        assert_eq!(classify(m, TMPFS_MAGIC, || None).unwrap(), Kind::Legacy);
        assert_eq!(
            classify(m, TMPFS_MAGIC, || Some(TMPFS_MAGIC)).unwrap(),
            Kind::Legacy
        );
        assert_eq!(
            classify(m, CGROUP_SUPER_MAGIC, || None).unwrap(),
            Kind::Legacy
        );
        assert!(matches!(
            classify(m, 0xef53, || None),
            Err(CgroupError::UnknownFs { magic: 0xef53, .. })
        ));
    }

    /// Reads only. On this kind of host (systemd's hybrid layout) detection must say hybrid.
    #[test]
    fn detect_on_this_host() {
        let mount = Path::new("/sys/fs/cgroup");
        let Ok(magic) = statfs_magic(mount) else {
            eprintln!("skipped: no {}", mount.display());
            return;
        };
        let d = detect(mount).unwrap();
        eprintln!("{d:?}");
        if magic != TMPFS_MAGIC {
            eprintln!("not asserting hybrid: {} is not tmpfs", mount.display());
            return;
        }
        let unified = mount.join("unified");
        if statfs_magic(&unified).ok() == Some(CGROUP2_SUPER_MAGIC) {
            assert_eq!(
                d.kind,
                Kind::Hybrid {
                    unified_at: unified.clone()
                }
            );
            assert_eq!(d.v2_mount, Some(unified.clone()));
            if d.own_cgroup.as_deref() == Some(Path::new("/")) {
                assert_eq!(d.root, Some(unified));
            }
        } else {
            assert_eq!(d.kind, Kind::Legacy);
        }
    }
}
