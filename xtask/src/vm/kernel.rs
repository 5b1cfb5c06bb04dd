//! Debian kernels for the VM tier, fetched with apt from Debian's archive once and cached under
//! target/vm/cache/<release>/: the image .deb, its unpacked tree (root/, with kernel.txt naming
//! the version), and the modules the VM gets (vm-modules/).
//!
//! bookworm's kernel comes through the machine's own apt configuration; trixie's through a
//! private one under target/vm/apt-trixie (its own sources, lists, cache and status): the
//! machine's apt sources are never changed. The archive's address is read from the machine's
//! apt sources at run time; none is written in this project.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::apt::Apt;
use crate::run;

/// A Debian release whose kernel the VM tier boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Debian 12, Linux 6.1.
    Bookworm,
    /// Debian 13, Linux 6.12.
    Trixie,
}

impl Release {
    pub const ALL: [Release; 2] = [Release::Bookworm, Release::Trixie];

    pub fn name(self) -> &'static str {
        match self {
            Release::Bookworm => "bookworm",
            Release::Trixie => "trixie",
        }
    }

    /// The kernel series this release ships: its image package is `linux-image-<series>...`.
    fn series(self) -> &'static str {
        match self {
            Release::Bookworm => "6.1.",
            Release::Trixie => "6.12.",
        }
    }
}

/// An unpacked kernel image package.
pub struct Kernel {
    pub release: Release,
    /// `uname -r` of the kernel, e.g. 6.1.0-37-amd64.
    pub version: String,
    /// The image package and its version, e.g. linux-image-6.1.0-37-amd64 6.1.140-1.
    pub package: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/<version> of the unpacked package.
    pub modules: PathBuf,
    /// target/vm/cache/<release>.
    pub cache: PathBuf,
}

/// The kernel TLS module, relative to the modules directory (without a compression suffix).
const TLS_MODULE: &str = "kernel/net/tls/tls.ko";

const MARKER: &str = "kernel.txt";

/// The kernel of `release`, from the cache or downloaded into it.
pub fn fetch(release: Release, vm_dir: &Path) -> Result<Kernel> {
    let cache = vm_dir.join("cache").join(release.name());
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let unpacked = cache.join("root");
    if let Ok(text) = std::fs::read_to_string(cache.join(MARKER)) {
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        if let (Some(version), Some(package)) = (fields.get("version"), fields.get("package")) {
            if let Ok(k) = locate(release, &cache, version, package) {
                eprintln!(
                    "xtask: vm: {} kernel {} from the cache ({})",
                    release.name(),
                    k.version,
                    cache.display()
                );
                return Ok(k);
            }
        }
    }
    let _ = std::fs::remove_file(cache.join(MARKER));
    let _ = std::fs::remove_dir_all(cache.join("vm-modules"));

    let deb = match cached_image_deb(&cache, release)? {
        Some(deb) => {
            eprintln!(
                "xtask: vm: {} kernel package {} already downloaded",
                release.name(),
                deb.display()
            );
            deb
        }
        None => download(release, vm_dir, &cache)?,
    };
    let package = format!(
        "{} {}",
        deb_field(&deb, "Package")?,
        deb_field(&deb, "Version")?
    );

    let partial = cache.join("root.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&unpacked);
    eprintln!("xtask: vm: unpacking {}", deb.display());
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &unpacked)
        .with_context(|| format!("renaming {} to {}", partial.display(), unpacked.display()))?;

    let boot = unpacked.join("boot");
    let version = std::fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ directory", deb.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .next()
        .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
    let kernel = locate(release, &cache, &version, &package)?;
    std::fs::write(
        cache.join(MARKER),
        format!("version={version}\npackage={package}\n"),
    )?;
    eprintln!(
        "xtask: vm: {} kernel {version} ({package}) cached in {}",
        release.name(),
        cache.display()
    );
    Ok(kernel)
}

/// Check an unpacked kernel: its image, its modules directory and the TLS module.
fn locate(release: Release, cache: &Path, version: &str, package: &str) -> Result<Kernel> {
    let unpacked = cache.join("root");
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing", vmlinuz.display());
    }
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(version))
        .find(|d| d.join("kernel").is_dir())
        .with_context(|| format!("{}: no lib/modules/{version}/kernel", unpacked.display()))?;
    if module_file(&modules, TLS_MODULE).is_none() && !tls_builtin(&modules) {
        bail!(
            "{package} has no {TLS_MODULE} module (under {}): the VM tier needs kernel TLS as a \
             module (or built in)",
            modules.display()
        );
    }
    Ok(Kernel {
        release,
        version: version.to_string(),
        package: package.to_string(),
        vmlinuz,
        modules,
        cache: cache.to_path_buf(),
    })
}

/// `rel` (e.g. kernel/net/tls/tls.ko) as it exists under `modules`, perhaps compressed.
fn module_file(modules: &Path, rel: &str) -> Option<PathBuf> {
    ["", ".xz", ".zst", ".gz"]
        .iter()
        .map(|ext| modules.join(format!("{rel}{ext}")))
        .find(|p| p.is_file())
}

/// A kernel image package in the cache from an earlier, interrupted run.
fn cached_image_deb(cache: &Path, release: Release) -> Result<Option<PathBuf>> {
    let prefix = format!("linux-image-{}", release.series());
    let mut debs: Vec<PathBuf> = std::fs::read_dir(cache)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .context("running dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb -f {} {field}: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Download `linux-image-amd64` of `release`, read which image package it depends on,
/// download that into `cache`; returns its path.
fn download(release: Release, vm_dir: &Path, cache: &Path) -> Result<PathBuf> {
    let apt = match release {
        Release::Bookworm => Apt::system(),
        Release::Trixie => Apt::private(vm_dir, "trixie")?,
    };
    let meta_dir = cache.join("meta");
    let _ = std::fs::remove_dir_all(&meta_dir);
    std::fs::create_dir_all(&meta_dir)?;
    if let Err(e) = apt.download(&meta_dir, "linux-image-amd64") {
        if apt.private {
            return Err(e);
        }
        // The machine's package lists may be missing or stale.
        eprintln!("xtask: vm: {e:#}\nxtask: vm: refreshing the machine's package lists");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        apt.download(&meta_dir, "linux-image-amd64")?;
    }
    let meta = std::fs::read_dir(&meta_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", meta_dir.display()))?;
    let depends = deb_field(&meta, "Depends")?;
    let image = image_package(&depends).with_context(|| {
        format!(
            "{}: no linux-image-* package in Depends: {depends}",
            meta.display()
        )
    })?;
    let wanted = format!("linux-image-{}", release.series());
    if !image.starts_with(&wanted) {
        bail!(
            "{}'s linux-image-amd64 depends on {image}, not on a {wanted}* package: {}",
            release.name(),
            match release {
                Release::Bookworm =>
                    "the bookworm kernel comes from this machine's apt sources, which must be \
                     Debian 12 (bookworm)",
                Release::Trixie => "the trixie archive answered with an unexpected kernel",
            }
        );
    }
    apt.download(cache, &image)?;
    let _ = std::fs::remove_dir_all(&meta_dir);
    cached_image_deb(cache, release)?.with_context(|| {
        format!(
            "apt-get download {image} left no .deb in {}",
            cache.display()
        )
    })
}

/// The image package named first in a `Depends:` field
/// (`linux-image-6.1.0-37-amd64 (= 6.1.140-1)` gives `linux-image-6.1.0-37-amd64`).
fn image_package(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-") && *name != "linux-image-amd64")
        .map(str::to_string)
}

/// The module directories the VM gets (relative to lib/modules/<version>): networking (kTLS,
/// the sock_diag modules the agent's readiness probes use), the crypto kTLS needs and the
/// libraries they use. The kernel loads what it needs on demand through /sbin/modprobe, as on
/// an installed system.
const MODULE_DIRS: &[&str] = &[
    "kernel/net",
    "kernel/crypto",
    "kernel/arch/x86/crypto",
    "kernel/lib",
];

/// A tree `lib/modules/<version>/` with the [`MODULE_DIRS`] modules uncompressed and the
/// modules.dep, modules.alias and modules.symbols of busybox's depmod (the package has none:
/// depmod writes them when the package is installed), for busybox's modprobe in the VM.
/// Built once, in the kernel's cache directory; returns the directory holding `lib/`.
pub fn module_tree(kernel: &Kernel) -> Result<PathBuf> {
    let tree = kernel.cache.join("vm-modules");
    if tree.join(".complete").is_file() {
        return Ok(tree);
    }
    let t = std::time::Instant::now();
    let partial = kernel.cache.join("vm-modules.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&tree);
    let dest = partial.join("lib/modules").join(&kernel.version);
    let mut compressed: BTreeMap<&str, Vec<PathBuf>> = BTreeMap::new();
    for dir in MODULE_DIRS {
        let src = kernel.modules.join(dir);
        if src.is_dir() {
            copy_tree(&src, &dest.join(dir), &mut compressed)?;
        }
    }
    for f in [
        "modules.builtin",
        "modules.order",
        "modules.builtin.modinfo",
    ] {
        let src = kernel.modules.join(f);
        if src.is_file() {
            std::fs::copy(&src, dest.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    for (tool, files) in &compressed {
        for chunk in files.chunks(500) {
            // Each tool removes the compressed file after writing the plain one, except zstd.
            let mut cmd = Command::new(tool);
            cmd.args(["-d", "-q", "-f"]);
            if *tool == "zstd" {
                cmd.arg("--rm");
            }
            let status = cmd
                .args(chunk)
                .status()
                .with_context(|| format!("running {tool}"))?;
            if !status.success() {
                bail!("decompressing modules with {tool} failed ({status})");
            }
        }
    }
    run(Command::new("/bin/busybox")
        .args(["depmod", "-b"])
        .arg(&partial)
        .arg(&kernel.version))?;
    if module_file(&dest, TLS_MODULE).is_none() && !tls_builtin(&dest) {
        bail!(
            "{} has no {TLS_MODULE} after staging the modules in {}",
            kernel.package,
            partial.display()
        );
    }
    std::fs::write(partial.join(".complete"), "")?;
    std::fs::rename(&partial, &tree)?;
    eprintln!(
        "xtask: vm: {} modules ({}) staged in {} in {:.1} s",
        kernel.release.name(),
        MODULE_DIRS.join(", "),
        tree.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(tree)
}

/// Copy `src` to `dest` recursively; compressed files are listed by the tool that
/// decompresses them (their copies keep the suffix until then).
fn copy_tree(
    src: &Path,
    dest: &Path,
    compressed: &mut BTreeMap<&'static str, Vec<PathBuf>>,
) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&from, &to, compressed)?;
            continue;
        }
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        let tool = match to.extension().and_then(|e| e.to_str()) {
            Some("xz") => "xz",
            Some("zst") => "zstd",
            Some("gz") => "gzip",
            _ => continue,
        };
        compressed.entry(tool).or_default().push(to);
    }
    Ok(())
}

fn tls_builtin(modules: &Path) -> bool {
    std::fs::read_to_string(modules.join("modules.builtin"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == TLS_MODULE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_package_from_depends() {
        assert_eq!(
            image_package("linux-image-6.1.0-37-amd64 (= 6.1.140-1)").as_deref(),
            Some("linux-image-6.1.0-37-amd64")
        );
        assert_eq!(
            image_package("initramfs-tools, linux-image-6.12.48+deb13-amd64 (= 6.12.48-1)")
                .as_deref(),
            Some("linux-image-6.12.48+deb13-amd64")
        );
        assert_eq!(image_package("foo"), None);
    }
}
