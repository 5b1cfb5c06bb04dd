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

/// `apt-get download PACKAGE` of trixie into `dir`, through the private apt configuration
/// under `vm_dir/apt-trixie` (fresh package lists each time: only called on a cache miss).
pub fn download_trixie(vm_dir: &Path, dir: &Path, package: &str) -> Result<()> {
    Apt::private(vm_dir, "trixie")?.download(dir, package)
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

/// How apt-get is run: the machine's configuration, or a private one for another release.
struct Apt {
    private: bool,
    options: Vec<String>,
}

impl Apt {
    fn system() -> Apt {
        Apt {
            private: false,
            // Downloads land in target/, which apt's unprivileged _apt user may not reach.
            options: vec!["-o".into(), "APT::Sandbox::User=root".into()],
        }
    }

    /// A private apt configuration for `suite` of the machine's Debian archive under
    /// `vm_dir/apt-<suite>`, with fresh package lists.
    fn private(vm_dir: &Path, suite: &str) -> Result<Apt> {
        let mirror = debian_mirror()?;
        let dir = vm_dir.join(format!("apt-{suite}"));
        let parts = dir.join("etc/sources.list.d");
        for d in [
            parts.clone(),
            dir.join("lists/partial"),
            dir.join("cache/archives/partial"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(dir.join("etc/sources.list"), "")?;
        std::fs::write(dir.join("status"), "")?;
        let mut options: Vec<String> = [
            format!(
                "Dir::Etc::SourceList={}",
                dir.join("etc/sources.list").display()
            ),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            format!("Dir::State::Status={}", dir.join("status").display()),
            format!(
                "Dir::State::extended_states={}",
                dir.join("extended_states").display()
            ),
            "APT::Sandbox::User=root".into(),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();

        // The archive key that signs `suite`: Debian's keyring normally has it; the
        // release-specific keyrings are the fallback.
        let mut keyrings = vec![PathBuf::from(
            "/usr/share/keyrings/debian-archive-keyring.gpg",
        )];
        if let Ok(entries) = std::fs::read_dir("/usr/share/keyrings") {
            let mut extra: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("debian-archive-{suite}-")) && n.ends_with(".gpg")
                    })
                })
                .collect();
            extra.sort();
            keyrings.extend(extra);
        }
        let sources = parts.join(format!("{suite}.sources"));
        let mut failures = Vec::new();
        for keyring in keyrings.iter().filter(|k| k.is_file()) {
            std::fs::write(
                &sources,
                format!(
                    "# Written by `cargo xtask vm-test`: {suite}'s kernel for the VM tier.\n\
                     Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
                     Signed-By: {}\n",
                    keyring.display()
                ),
            )?;
            eprintln!(
                "xtask: vm: apt-get update for {suite} from {mirror} (private configuration in \
                 {}, key {})",
                dir.display(),
                keyring.display()
            );
            match update(&options, &dir, suite) {
                Ok(()) => {
                    return Ok(Apt {
                        private: true,
                        options,
                    })
                }
                Err(e) => failures.push(format!("with {}: {e:#}", keyring.display())),
            }
        }

        if failures.is_empty() {
            bail!("none of the keyrings {keyrings:?} exists: install debian-archive-keyring");
        }
        if !failures.iter().all(|f| is_signature_problem(f)) {
            bail!(
                "apt-get update for {suite} from {mirror} failed for another reason than a \
                 missing key (network? mirror?): {}",
                failures.join("; ")
            );
        }
        // Last resort: no signature check at all. Loud, because it is a downgrade.
        eprintln!(
            "\nxtask: vm: WARNING: no keyring on this machine verifies {suite} ({}).\n\
             xtask: vm: WARNING: downloading {suite}'s kernel WITHOUT SIGNATURE CHECKS \
             (Acquire::AllowInsecureRepositories); install a newer debian-archive-keyring to \
             avoid this.\n",
            failures.join("; ")
        );
        std::fs::write(
            &sources,
            format!(
                "# Written by `cargo xtask vm-test`: {suite}'s kernel for the VM tier, \
                 UNVERIFIED.\nTypes: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n"
            ),
        )?;
        options.extend(
            [
                "Acquire::AllowInsecureRepositories=true",
                "APT::Get::AllowUnauthenticated=true",
            ]
            .into_iter()
            .flat_map(|o| ["-o".to_string(), o.to_string()]),
        );
        update(&options, &dir, suite).with_context(|| {
            format!(
                "cannot fetch {suite}'s package lists from {mirror}, even without signature \
                 checks (earlier attempts: {})",
                failures.join("; ")
            )
        })?;
        Ok(Apt {
            private: true,
            options,
        })
    }

    /// `apt-get download PACKAGE` into `dir`.
    fn download(&self, dir: &Path, package: &str) -> Result<()> {
        let mut cmd = Command::new("apt-get");
        cmd.args(&self.options)
            .args(["download", "-q", package])
            .current_dir(dir);
        eprintln!(
            "xtask: vm: apt-get download {package} (into {})",
            dir.display()
        );
        let out = cmd.output().context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get download {package} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// `apt-get update` with a private configuration; fails unless the suite's package list
/// arrived, verified.
fn update(options: &[String], dir: &Path, suite: &str) -> Result<()> {
    let out = Command::new("apt-get")
        .args(options)
        .args(["update", "-q"])
        .output()
        .context("running apt-get update")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("GPG error") || stderr.contains("NO_PUBKEY") {
        bail!(
            "apt-get update failed ({}): {}",
            out.status,
            stderr.trim().replace('\n', " / ")
        );
    }
    let has_list = std::fs::read_dir(dir.join("lists"))?
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.contains(&format!("_dists_{suite}_main_binary-amd64_Packages")))
        });
    if !has_list {
        bail!(
            "apt-get update left no {suite} main amd64 package list in {}",
            dir.join("lists").display()
        );
    }
    Ok(())
}

/// Whether apt's complaint is about the archive's signature (a key this machine lacks).
fn is_signature_problem(msg: &str) -> bool {
    [
        "NO_PUBKEY",
        "GPG error",
        "is not signed",
        "EXPKEYSIG",
        "signature",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

/// Debian codenames a main-archive entry may carry (not -updates, -security, -backports).
const CODENAMES: &[&str] = &[
    "bookworm", "trixie", "forky", "bullseye", "sid", "stable", "testing", "unstable",
];

/// The main Debian archive's address, from this machine's apt sources: the first `deb` entry
/// whose suites include bookworm, else one with another plain Debian codename.
pub fn debian_mirror() -> Result<String> {
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ if file.ends_with("sources.list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    let pick = |suite: &str| {
        entries
            .iter()
            .find(|(_, suites)| suites.iter().any(|s| s == suite))
            .map(|(uri, _)| uri.trim_end_matches('/').to_string())
    };
    CODENAMES.iter().find_map(|c| pick(c)).with_context(|| {
        format!(
            "no Debian archive in this machine's apt sources ({}): need a `deb` entry whose \
             suites include bookworm, to fetch kernels from",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// (URI, suites) of each enabled `Types: deb` stanza of a deb822 .sources file.
fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut flush = |fields: &mut BTreeMap<String, String>| {
        let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
        let enabled = !get("enabled").trim().eq_ignore_ascii_case("no");
        if enabled && get("types").split_whitespace().any(|t| t == "deb") {
            let suites: Vec<String> = get("suites").split_whitespace().map(String::from).collect();
            for uri in get("uris").split_whitespace() {
                out.push((uri.to_string(), suites.clone()));
            }
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields);
            last = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| fields.get_mut(k)) {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            fields.insert(k.clone(), v.trim().to_string());
            last = Some(k);
        }
    }
    flush(&mut fields);
    out
}

/// (URI, [suite]) of each `deb` line of a one-line-style sources.list.
fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options: `[arch=amd64 signed-by=...]`.
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_string();
            let suite = words.next()?.to_string();
            Some((uri, vec![suite]))
        })
        .collect()
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
    fn deb822_sources() {
        let text = "Types: deb\n# comment\nURIs: http://a.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://b.example/debian-security\nSuites: bookworm-security\n\nTypes: deb-src\nURIs: http://c.example\nSuites: bookworm\n\nEnabled: no\nTypes: deb\nURIs: http://d.example\nSuites: bookworm\n";
        let e = parse_deb822(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "http://a.example/debian");
        assert_eq!(e[0].1, ["bookworm", "bookworm-updates"]);
        assert_eq!(e[1].1, ["bookworm-security"]);
    }

    #[test]
    fn one_line_sources() {
        let text = "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian/ bookworm main\ndeb-src http://b.example bookworm main\ndeb http://c.example trixie main # hi\n";
        let e = parse_one_line(text);
        assert_eq!(
            e,
            vec![
                (
                    "http://a.example/debian/".to_string(),
                    vec!["bookworm".to_string()]
                ),
                ("http://c.example".to_string(), vec!["trixie".to_string()]),
            ]
        );
    }

    #[test]
    fn signature_problems_are_told_apart_from_network_ones() {
        assert!(is_signature_problem(
            "W: GPG error: http://a.example trixie InRelease: The following signatures couldn't \
             be verified because the public key is not available: NO_PUBKEY 762F67A0B2C39DE4"
        ));
        assert!(!is_signature_problem(
            "E: Failed to fetch http://a.example/dists/trixie/InRelease  Could not resolve \
             'a.example'"
        ));
    }

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
