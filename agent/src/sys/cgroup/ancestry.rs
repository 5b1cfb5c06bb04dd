//! The limits above corral: `memory.max` and `cpu.max` of the agent's own cgroup and of every
//! ancestor up to the cgroup2 mount point (inside a container, the container's cgroup). Reads
//! only; `policy::container` parses and decides.

use std::io;
use std::path::Path;

use crate::policy::container::{ancestors, CgroupReading};

use super::detect::detect;
use super::error::CgroupError;

/// The readings for the agent's cgroup and its ancestors, the agent's own first: empty when
/// there is no cgroup2 hierarchy (legacy v1) or the agent's cgroup is not visible.
pub fn own_limits(mount: &Path) -> Result<Vec<CgroupReading>, CgroupError> {
    let d = detect(mount)?;
    Ok(match (d.v2_mount, d.own_cgroup) {
        (Some(m), Some(own)) => ancestor_limits(&m, &own)?,
        _ => Vec::new(),
    })
}

/// The readings of `own` (a path inside the hierarchy mounted at `v2_mount`, as in
/// /proc/self/cgroup) and its ancestors. A missing file (the root cgroup has neither; a
/// controller not enabled there) reads as `None`; any other read error is an error.
pub fn ancestor_limits(v2_mount: &Path, own: &Path) -> Result<Vec<CgroupReading>, CgroupError> {
    let mut out = Vec::new();
    for rel in ancestors(own) {
        let rel = rel.strip_prefix("/").unwrap_or(&rel);
        let dir = if rel.as_os_str().is_empty() {
            v2_mount.to_path_buf()
        } else {
            v2_mount.join(rel)
        };
        out.push(CgroupReading {
            at_mount: dir == v2_mount,
            memory_max: read_optional(&dir.join("memory.max"))?,
            cpu_max: read_optional(&dir.join("cpu.max"))?,
            dir,
        });
    }
    Ok(out)
}

fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        // ENOENT: not there. ENODEV: a file of a controller the kernel lacks.
        Err(e)
            if matches!(e.kind(), io::ErrorKind::NotFound)
                || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(source) => Err(CgroupError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the temp dir, removed on drop.
    struct TmpDir(PathBuf);

    impl TmpDir {
        fn new() -> TmpDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "corral-ancestry-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TmpDir(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_each_ancestor_up_to_the_mount() {
        let tmp = TmpDir::new();
        let m = tmp.path();
        std::fs::create_dir_all(m.join("kubepods/pod1/c1")).unwrap();
        std::fs::write(m.join("kubepods/pod1/c1/memory.max"), "max\n").unwrap();
        std::fs::write(m.join("kubepods/pod1/c1/cpu.max"), "max 100000\n").unwrap();
        std::fs::write(m.join("kubepods/pod1/memory.max"), "2147483648\n").unwrap();
        std::fs::write(m.join("kubepods/pod1/cpu.max"), "200000 100000\n").unwrap();
        let r = ancestor_limits(m, Path::new("/kubepods/pod1/c1")).unwrap();
        let dirs: Vec<PathBuf> = r.iter().map(|r| r.dir.clone()).collect();
        assert_eq!(
            dirs,
            [
                m.join("kubepods/pod1/c1"),
                m.join("kubepods/pod1"),
                m.join("kubepods"),
                m.to_path_buf()
            ]
        );
        assert_eq!(r[1].memory_max.as_deref(), Some("2147483648\n"));
        assert_eq!(r[1].cpu_max.as_deref(), Some("200000 100000\n"));
        assert_eq!(r[2].memory_max, None);
        assert!(r[3].at_mount && !r[0].at_mount);
        let (mem, bad) =
            crate::policy::container::memory_ceiling(crate::config::ByteSize(1 << 40), &r);
        assert!(bad.is_empty());
        assert_eq!(mem.bytes.0, 2 << 30);
        let (cpu, _) = crate::policy::container::cpu_ceiling(64, &r);
        assert_eq!(cpu.cpus, 2);
    }

    #[test]
    fn the_namespace_root_is_the_mount() {
        let tmp = TmpDir::new();
        std::fs::write(tmp.path().join("memory.max"), "1073741824\n").unwrap();
        let r = ancestor_limits(tmp.path(), Path::new("/")).unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].at_mount);
        let (mem, _) =
            crate::policy::container::memory_ceiling(crate::config::ByteSize(1 << 40), &r);
        assert_eq!(
            mem.describe_source(),
            format!(
                "the container's memory.max = 1GiB at {}/memory.max",
                tmp.path().display()
            )
        );
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let tmp = TmpDir::new();
        // A directory where the file should be: reading it fails with EISDIR.
        std::fs::create_dir(tmp.path().join("memory.max")).unwrap();
        let e = ancestor_limits(tmp.path(), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("memory.max"), "{e}");
    }
}
