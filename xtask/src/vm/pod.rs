//! `cargo xtask vm-test --kube`: the image of `cargo xtask image` run by a real engine, podman
//! from Debian's packages, in a booted Debian bookworm under qemu TCG, with the project's
//! manifest (`podman kube play packaging/kubernetes/corral-fastapi.yaml`); no registry is
//! reachable (the VM has no network). vm/pod.sh runs inside and asserts each step.
//!
//! The root filesystem comes from mmdebstrap (minbase plus systemd, Debian's kernel with its
//! initramfs, podman with crun, netavark, catatonit for the pod's infra container, curl), made
//! once from the Debian archive this machine's apt uses and cached under
//! target/vm/pod/rootfs-<hash>. Each run copies it, adds the image archive, the manifest, the
//! script and the unit that runs it at boot, makes an ext4 image and boots the root's own
//! kernel and initramfs with it as the disk. The script prints `CORRAL-VM-RESULT: PASS` or
//! `FAIL <step>` and powers off.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::kernel::Release;
use super::system::{fnv, single};
use crate::{root, run};

const SCRIPT: &str = include_str!("pod.sh");

const PACKAGES: &[(&str, &str)] = &[
    ("mmdebstrap", "/usr/bin/mmdebstrap"),
    ("e2fsprogs", "/sbin/mkfs.ext4"),
];

/// What mmdebstrap adds to minbase: a booted Debian with podman.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,udev,kmod,linux-image-amd64,initramfs-tools,\
                       podman,crun,conmon,netavark,catatonit,iptables,curl,iproute2,procps";

const UNIT: &str = "[Unit]
Description=corral's VM pod tier
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /root/kube/pod.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
[Install]
WantedBy=multi-user.target
";

/// The cached root filesystem (mmdebstrap once).
fn rootfs(dir: &Path) -> Result<PathBuf> {
    let base = dir.join(format!("rootfs-{:08x}", fnv(INCLUDE)));
    if base.join(".complete").exists() {
        return Ok(base);
    }
    let _ = std::fs::remove_dir_all(&base);
    let mirror = super::apt::debian_mirror()?;
    eprintln!(
        "xtask: vm pod: mmdebstrap bookworm (minbase + {INCLUDE}) into {}",
        base.display()
    );
    let t = Instant::now();
    run(Command::new("mmdebstrap")
        .args([
            "--mode=root",
            "--format=directory",
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            "bookworm",
        ])
        .arg(&base)
        .arg(&mirror))?;
    // A console root without a password (the VM has no network), a hostname, the root disk.
    run(Command::new("chroot")
        .arg(&base)
        .args(["passwd", "-d", "root"]))?;
    std::fs::write(base.join("etc/hostname"), "corral-pod\n")?;
    std::fs::write(base.join("etc/fstab"), "/dev/vda / ext4 defaults 0 1\n")?;
    std::fs::write(base.join(".complete"), "")?;
    eprintln!(
        "xtask: vm pod: root filesystem ready in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(base)
}

pub fn run_pod(timeout: Duration, keep: bool) -> Result<()> {
    crate::ensure_these(PACKAGES, "the VM pod tier")?;
    super::ensure_vm_packages()?;
    let root = root();
    let dir = root.join("target/vm/pod");
    std::fs::create_dir_all(&dir)?;
    let base = rootfs(&dir)?;
    let archive = crate::image::build()?;

    let stage = dir.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&base)
        .arg(&stage))?;
    let kube = stage.join("root/kube");
    std::fs::create_dir_all(&kube)?;
    std::fs::write(kube.join("pod.sh"), SCRIPT)?;
    std::fs::copy(&archive, kube.join("corral-fastapi.tar"))?;
    // The project's manifest as it is; the script derives its variants from it.
    std::fs::copy(
        root.join("packaging/kubernetes/corral-fastapi.yaml"),
        kube.join("corral-fastapi.yaml"),
    )?;
    let units = stage.join("etc/systemd/system");
    std::fs::write(units.join("corral-pod.service"), UNIT)?;
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("corral-pod.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/corral-pod.service", &link)?;
    std::fs::create_dir_all(stage.join("var/log/journal"))?;
    // No login prompt on the serial console: a getty's vhangup would cut the script's output.
    let getty = units.join("serial-getty@ttyS0.service");
    let _ = std::fs::remove_file(&getty);
    std::os::unix::fs::symlink("/dev/null", &getty)?;

    let image = dir.join("disk.ext4");
    let _ = std::fs::remove_file(&image);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "corral-pod", "-d"])
        .arg(&stage)
        .arg(&image)
        .arg("6G"))?;
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
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    std::fs::copy(&vmlinuz, &k)?;
    std::fs::copy(&initrd, &i)?;
    if !keep {
        let _ = std::fs::remove_dir_all(&stage);
    }

    let args = super::systemd_boot_args(&k, &i, &image);
    let log = root.join("target/vm/pod.log");
    let outcome = super::run_qemu(
        Release::Bookworm,
        &version,
        "mmdebstrap bookworm + podman + the image",
        args,
        &log,
        timeout,
        None,
        &dir,
    )?;
    if !keep {
        let _ = std::fs::remove_file(&image);
    }
    eprintln!(
        "xtask: vm pod: {} in {:.0} s (log {})",
        if outcome.passed() { "PASS" } else { "FAIL" },
        outcome.total.as_secs_f64(),
        log.display()
    );
    if !outcome.passed() {
        bail!(
            "the VM pod tier failed: {} (serial log {})",
            outcome.result.as_deref().unwrap_or("no result line"),
            log.display()
        );
    }
    Ok(())
}
