//! The VM tier's initramfs: static busybox, the workspace's binaries and test executables with
//! their shared libraries, the kernel's modules, and an /init that mounts the filesystems,
//! runs the tests and prints the result.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::cpio::Cpio;
use super::kernel::Kernel;
use super::{INIT_MARKER, RESULT_MARKER, VM_BIN_DIR};

/// Everything the initramfs holds besides the kernel's modules and /init.
pub(super) struct Payload {
    /// Archive path (no leading '/') -> (mode, contents).
    files: BTreeMap<String, (u32, Vec<u8>)>,
    /// Archive path -> target.
    symlinks: BTreeMap<String, String>,
    /// Archive paths of the test executables, run in this order.
    tests: Vec<String>,
    /// Load the CPU's crypto drivers at boot (the TLS benchmark).
    crypto_drivers: bool,
    /// `CORRAL_BENCH_*` variables of xtask's environment, exported to the tests (a benchmark's
    /// rounds and loads).
    env: Vec<(String, String)>,
}

impl Payload {
    pub(super) fn collect(
        target: &Path,
        profile: &str,
        tests: &[(String, PathBuf)],
        extra: &[(PathBuf, &str)],
    ) -> Result<Payload> {
        let mut p = Payload {
            files: BTreeMap::new(),
            symlinks: BTreeMap::new(),
            tests: Vec::new(),
            // Extra programs (nginx) come only with the TLS benchmark.
            crypto_drivers: !extra.is_empty(),
            env: bench_env()?,
        };
        p.elf(Path::new("/bin/busybox"), "bin/busybox")?;
        let list = Command::new("/bin/busybox")
            .arg("--list-full")
            .output()
            .context("running busybox --list-full")?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim().trim_start_matches('/');
            if !applet.is_empty() && applet != "bin/busybox" {
                p.symlinks
                    .insert(applet.to_string(), "/bin/busybox".to_string());
            }
        }
        if !p.symlinks.contains_key("bin/sh") {
            bail!("/bin/busybox has no sh applet");
        }
        let bins = target.join(profile);
        for bin in ["corral", "corral-demo"] {
            p.elf(&bins.join(bin), &format!("{VM_BIN_DIR}/{bin}"))?;
        }
        for (host, at) in extra {
            p.elf(host, at)?;
        }
        for (name, exe) in tests {
            let at = format!("{VM_BIN_DIR}/deps/{name}");
            p.elf(exe, &at)?;
            p.tests.push(at);
        }
        let etc: &[(&str, &str)] = &[
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
            (
                "etc/nsswitch.conf",
                "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
            ),
            ("etc/hosts", "127.0.0.1 localhost corral-vm\n::1 localhost\n"),
        ];
        for (path, text) in etc {
            p.files
                .insert(path.to_string(), (0o644, text.as_bytes().to_vec()));
        }
        Ok(p)
    }

    /// An executable at `at`, and every shared library it loads at the path `ldd` shows.
    fn elf(&mut self, host: &Path, at: &str) -> Result<()> {
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.files.insert(at.to_string(), (0o755, data));
        for lib in shared_libraries(host)? {
            let key = lib.to_string_lossy().trim_start_matches('/').to_string();
            if self.files.contains_key(&key) {
                continue;
            }
            let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            let mode = std::fs::metadata(&lib)?.permissions().mode() & 0o7777;
            self.files.insert(key, (mode, data));
        }
        Ok(())
    }
}

/// The shared libraries and the dynamic loader `exe` needs, from `ldd` (none for a static
/// executable).
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            // Static: nothing to copy.
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}{}",
            exe.display(),
            text.trim(),
            err.trim()
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("{}: a shared library is missing: {line}", exe.display());
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1 (0x...)` has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The kernel's module loader in the VM (/proc/sys/kernel/modprobe): busybox's modprobe, with
/// each request and its outcome logged for /init to show.
const MODPROBE: &str = r#"#!/bin/sh
for last; do :; done
/bin/busybox modprobe "$@"
rc=$?
echo "$last:$rc" >> /run/corral-vm-modprobe.log
exit $rc
"#;

/// /init: mount, load tls.ko, run the tests, print the result, power off.
/// The `CORRAL_BENCH_*` variables of this environment, for the tests in the VM.
fn bench_env() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in std::env::vars() {
        if !k.starts_with("CORRAL_BENCH_") {
            continue;
        }
        // They go into /init single-quoted.
        if v.contains('\'') || v.contains('\n') {
            bail!("{k}={v:?}: a value for the VM may not hold a quote or a newline");
        }
        out.push((k, v));
    }
    Ok(out)
}

fn init_script(kernel: &Kernel, payload: &Payload) -> String {
    let (tests, crypto_drivers) = (&payload.tests, payload.crypto_drivers);
    let env: String = payload
        .env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    // For the TLS benchmark only: the CPU's crypto drivers, which a booted Debian system's udev
    // loads from the CPU's modalias at boot (no udev here); without them the kernel's AES-GCM
    // is the generic C code while userspace uses AES-NI. Not in test runs: a trixie guest once
    // crashed in the scheduler under TCG with them loaded, and the tests do not need them.
    let crypto = if crypto_drivers {
        "for m in aesni_intel ghash_clmulni_intel; do modprobe $m 2>/dev/null; done"
    } else {
        ""
    };
    let tests = tests
        .iter()
        .map(|t| format!("/{t}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"#!/bin/sh
# corral's VM tier, written by `cargo xtask vm-test` for {package}.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
{env}fail=""
failed() {{ fail="$fail $1"; echo "corral-vm: FAILED: $1"; }}
mount -t proc proc /proc || failed mount-proc
echo "{INIT_MARKER} uptime $(cut -d' ' -f1 /proc/uptime)s"
mount -t sysfs sysfs /sys || failed mount-sysfs
mount -t devtmpfs devtmpfs /dev || failed mount-devtmpfs
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp || failed mount-tmp
mount -t tmpfs -o mode=755 tmpfs /run || failed mount-run
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || failed mount-cgroup2
mount -t bpf -o mode=700 bpf /sys/fs/bpf || failed mount-bpffs
ip link set lo up || failed lo-up
hostname corral-vm
echo /bin/corral-vm-modprobe > /proc/sys/kernel/modprobe
# Kernel messages stay in dmesg (shown on failure): on the console they could split the
# result line.
dmesg -n 1
echo "corral-vm: kernel $(uname -r) ({package})"
echo "corral-vm: cgroup.controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
# tls.ko and what it depends on (modules.dep); other modules load on demand.
modprobe tls || failed modprobe-tls
{crypto}
echo "corral-vm: modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
for t in {tests}; do
    name=$(basename "$t")
    echo "corral-vm: running $name --ignored --test-threads=1 --nocapture at uptime $(cut -d' ' -f1 /proc/uptime)s"
    CORRAL_VM=1 RUST_BACKTRACE=1 "$t" --ignored --test-threads=1 --nocapture
    rc=$?
    echo "corral-vm: $name exited with $rc at uptime $(cut -d' ' -f1 /proc/uptime)s"
    [ "$rc" -eq 0 ] || failed "$name(exit-$rc)"
done
echo "corral-vm: modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "corral-vm: the kernel asked for (module:modprobe status): $(tr '\n' ' ' < /run/corral-vm-modprobe.log 2>/dev/null)"
if [ -z "$fail" ]; then
    echo "{RESULT_MARKER}PASS"
else
    echo "corral-vm: last kernel messages:"
    dmesg | tail -n 60
    echo "{RESULT_MARKER}FAIL$fail"
fi
sync
poweroff -f
"#,
        package = kernel.package,
    )
}

pub(super) fn write_initramfs(
    path: &Path,
    kernel: &Kernel,
    modules: &Path,
    payload: &Payload,
) -> Result<()> {
    let t = Instant::now();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut c = Cpio::new(BufWriter::with_capacity(1 << 20, file));
    for d in ["proc", "sys", "dev", "run", "root", "etc", "mnt"] {
        c.dir(d)?;
    }
    c.dir_mode("tmp", 0o1777)?;
    // The kernel opens /dev/console for /init before devtmpfs is mounted over /dev.
    c.char_dev("dev/console", 0o600, 5, 1)?;
    c.char_dev("dev/null", 0o666, 1, 3)?;
    for (at, (mode, data)) in &payload.files {
        c.file(at, *mode, data)?;
    }
    for (at, target) in &payload.symlinks {
        if !c.contains(at) {
            c.symlink(at, target)?;
        }
    }
    let count = add_tree(&mut c, modules, modules)?;
    c.file("bin/corral-vm-modprobe", 0o755, MODPROBE.as_bytes())?;
    c.file("init", 0o755, init_script(kernel, payload).as_bytes())?;
    let out = c.finish()?;
    let size = out.get_ref().metadata()?.len();
    out.into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "xtask: vm: {} initramfs {} ({:.0} MiB, {count} module files) in {:.1} s",
        kernel.release.name(),
        path.display(),
        size as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every file under `dir` at its path relative to `base`; returns how many.
fn add_tree<W: Write>(c: &mut Cpio<W>, base: &Path, dir: &Path) -> Result<usize> {
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(base)
            .with_context(|| format!("{} is not under {}", path.display(), base.display()))?
            .to_string_lossy()
            .into_owned();
        if rel.starts_with('.') {
            continue;
        }
        if e.file_type()?.is_dir() {
            c.dir(&rel)?;
            n += add_tree(c, base, &path)?;
        } else {
            let data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            c.file(&rel, 0o644, &data)?;
            n += 1;
        }
    }
    Ok(n)
}
