//! `cargo xtask vm-test --system`: the .deb installed in a booted Debian, under systemd, each
//! step of an operator's life asserted (vm/e2e.sh): trixie (systemd 257, the current stable:
//! the crash-surviving unit, kill -9 of the agent under load) and bookworm (systemd 252: the
//! package's drop-in turns crash survival off there).
//!
//! The root filesystem comes from debootstrap (minbase plus systemd, Debian's kernel with its
//! initramfs, curl, openssl), made once per release from the Debian archive this machine's apt
//! uses and cached under target/vm/system/rootfs-*. Each run copies it, adds the freshly built
//! packages (0.1.0 and a 0.1.1 for the upgrade), corral-demo, the test script and the unit that
//! runs it at boot, makes an ext4 image of it, and boots the rootfs's own kernel and initramfs
//! under qemu TCG with the image as its disk. The script reboots the VM once (start at boot);
//! it prints `CORRAL-VM-RESULT: PASS` or `FAIL <step>` and powers off.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::kernel::Release;
use crate::{root, run};

const E2E_SCRIPT: &str = include_str!("e2e.sh");

const PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "/usr/sbin/debootstrap"),
    ("e2fsprogs", "/sbin/mkfs.ext4"),
];

/// What debootstrap adds to minbase.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,udev,kmod,linux-image-amd64,initramfs-tools,\
                       curl,openssl,ca-certificates,iproute2,procps,man-db";

const UNIT: &str = "[Unit]
Description=corral's VM system tier
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /root/e2e/e2e.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
[Install]
WantedBy=multi-user.target
";

const DEMO: &str = r#"# The demo app of the VM system tier: each request logs a line (corral logs, the journal).
[app.demo]
command = ["/usr/local/bin/corral-demo"]
user = "nobody"
group = "nogroup"
env = { DEMO_LOG_REQUESTS = "1" }
[app.demo.listen]
address = "127.0.0.1:8080"
[app.demo.workers]
count = 4
memory_max = "256MiB"
pids_max = 64
stop_timeout = "5s"
"#;

/// A one-request-at-a-time app (gunicorn sync workers' shape) on one shared socket: its
/// readiness probes must learn which worker accepted them, reading the /proc of workers of
/// another user under the unit's capabilities.
const SYNC: &str = r#"# One request at a time per worker, one socket shared by all.
[app.sync]
command = ["/usr/local/bin/corral-demo"]
user = "nobody"
group = "nogroup"
env = { DEMO_THREADS = "1" }
[app.sync.listen]
address = "127.0.0.1:8081"
steering = "shared"
[app.sync.workers]
count = 2
ready = "http:/healthz"
stop_timeout = "5s"
"#;

const DEMO_TLS: &str = r#"
[app.demo.tls]
address = "127.0.0.1:8443"
cert = "/etc/corral/tls/demo.crt"
key = "/etc/corral/tls/demo.key"
user = "corral"
processes = 2
"#;

/// The cached root filesystem of `release` (debootstrap once).
fn rootfs(dir: &Path, release: Release) -> Result<PathBuf> {
    // The name says what is in it: a change of INCLUDE makes a new one. (Bookworm's keeps the
    // name it had when it was the only one.)
    let name = match release {
        Release::Bookworm => format!("rootfs-{:08x}", fnv(INCLUDE)),
        other => format!("rootfs-{}-{:08x}", other.name(), fnv(INCLUDE)),
    };
    let base = dir.join(name);
    if base.join(".complete").exists() {
        return Ok(base);
    }
    let _ = std::fs::remove_dir_all(&base);
    let mirror = super::apt::debian_mirror()?;
    eprintln!(
        "xtask: vm system: debootstrap {} (minbase + {INCLUDE}) into {}",
        release.name(),
        base.display()
    );
    let t = Instant::now();
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            release.name(),
        ])
        .arg(&base)
        .arg(&mirror))?;
    // A console root without a password (the VM has no network), a hostname, the root disk.
    run(Command::new("chroot")
        .arg(&base)
        .args(["passwd", "-d", "root"]))?;
    std::fs::write(base.join("etc/hostname"), "corral-e2e\n")?;
    std::fs::write(base.join("etc/fstab"), "/dev/vda / ext4 defaults 0 1\n")?;
    std::fs::write(base.join(".complete"), "")?;
    eprintln!(
        "xtask: vm system: root filesystem ready in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(base)
}

/// A short hash of what a cached root holds, for its directory's name.
pub(crate) fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

pub(super) fn single(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// The system tier on each of `releases`, one VM after the other (the packages built once).
pub fn run_system(releases: &[Release], timeout: Duration, keep: bool) -> Result<()> {
    crate::ensure_these(PACKAGES, "the VM system tier")?;
    super::ensure_vm_packages()?;
    let root = root();
    let dir = root.join("target/vm/system");
    std::fs::create_dir_all(&dir)?;
    let bases = releases
        .iter()
        .map(|&r| rootfs(&dir, r).map(|b| (r, b)))
        .collect::<Result<Vec<_>>>()?;

    let p1 = crate::package::build_into(None, &dir.join("pkg-0.1.0"))?;
    let p2 = crate::package::build_into(Some("0.1.1-1"), &dir.join("pkg-0.1.1"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "-p", "corral-demo"]))?;
    let debs = [&p1.deb, &p2.deb];
    let mut failed = Vec::new();
    for (release, base) in bases {
        if let Err(e) = boot_one(release, &base, &dir, debs, timeout, keep) {
            eprintln!("xtask: vm system {}: {e:#}", release.name());
            failed.push(format!("{}: {e:#}", release.name()));
        }
    }
    if !failed.is_empty() {
        bail!("the VM system tier failed on {}", failed.join("; "));
    }
    Ok(())
}

/// Stage `base` with the packages and the test script, boot it and read the verdict.
fn boot_one(
    release: Release,
    base: &Path,
    dir: &Path,
    debs: [&PathBuf; 2],
    timeout: Duration,
    keep: bool,
) -> Result<()> {
    let root = root();
    let name = release.name();
    let stage = dir.join(format!("stage-{name}"));
    let _ = std::fs::remove_dir_all(&stage);
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(base)
        .arg(&stage))?;
    let e2e = stage.join("root/e2e");
    std::fs::create_dir_all(&e2e)?;
    std::fs::write(e2e.join("e2e.sh"), E2E_SCRIPT)?;
    std::fs::write(e2e.join("demo.toml"), DEMO)?;
    std::fs::write(e2e.join("sync.toml"), SYNC)?;
    std::fs::write(e2e.join("demo-tls.toml"), DEMO_TLS)?;
    std::fs::copy(debs[0], e2e.join("corral_0.1.0-1_amd64.deb"))?;
    std::fs::copy(debs[1], e2e.join("corral_0.1.1-1_amd64.deb"))?;
    std::fs::copy(
        root.join("target/release/corral-demo"),
        stage.join("usr/local/bin/corral-demo"),
    )?;
    let units = stage.join("etc/systemd/system");
    std::fs::write(units.join("corral-e2e.service"), UNIT)?;
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("corral-e2e.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/corral-e2e.service", &link)?;
    // A persistent journal, to read after a failed run (vm-test --system --keep).
    std::fs::create_dir_all(stage.join("var/log/journal"))?;
    // No login prompt on the serial console: a getty's vhangup would cut the script's output.
    let getty = units.join("serial-getty@ttyS0.service");
    let _ = std::fs::remove_file(&getty);
    std::os::unix::fs::symlink("/dev/null", &getty)?;

    let image = dir.join(format!("disk-{name}.ext4"));
    let _ = std::fs::remove_file(&image);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "corral-e2e", "-d"])
        .arg(&stage)
        .arg(&image)
        .arg("4G"))?;
    let vmlinuz = single(&stage.join("boot"), "vmlinuz-")?;
    let initrd = single(&stage.join("boot"), "initrd.img-")?;
    let version = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    // Boot files outside the stage, so the stage can go.
    let (k, i) = (
        dir.join(format!("vmlinuz-{name}")),
        dir.join(format!("initrd.img-{name}")),
    );
    std::fs::copy(&vmlinuz, &k)?;
    std::fs::copy(&initrd, &i)?;
    if !keep {
        let _ = std::fs::remove_dir_all(&stage);
    }

    let args = super::systemd_boot_args(&k, &i, &image);
    let log = root.join(format!("target/vm/system-{name}.log"));
    let outcome = super::run_qemu(
        release,
        &version,
        &format!("debootstrap {name} + the .deb"),
        args,
        &log,
        timeout,
        None,
        dir,
    )?;
    if !keep {
        let _ = std::fs::remove_file(&image);
    }
    eprintln!(
        "xtask: vm system {name}: {} in {:.0} s (log {})",
        if outcome.passed() { "PASS" } else { "FAIL" },
        outcome.total.as_secs_f64(),
        log.display()
    );
    if !outcome.passed() {
        bail!(
            "{} (serial log {})",
            outcome.result.as_deref().unwrap_or("no result line"),
            log.display()
        );
    }
    Ok(())
}
