//! `cargo xtask vm-test`: the VM tier (STYLE.md "Tests in layers", item 3).
//!
//! Debian's own kernels (bookworm's 6.1, trixie's 6.12; fetched with apt once, cached under
//! target/vm/cache/) boot under qemu (TCG: /dev/kvm does not work on these machines) with an
//! initramfs written here: static busybox, the workspace's debug binaries and the `vm` test
//! executable of corral-tests with their shared libraries, the kernel's tls.ko, and an /init
//! that mounts proc, sysfs, devtmpfs, cgroup2, bpffs and tmpfs, loads the module, runs the test
//! executables (`--ignored`, with CORRAL_VM=1), prints `CORRAL-VM-RESULT: PASS` or
//! `CORRAL-VM-RESULT: FAIL <what>` and powers off. The serial console is kept in
//! target/vm/<release>.log.
//!
//! `--tests NAME` runs another test target of corral-tests instead of `vm` (its work directory
//! and logs get a `-NAME` suffix, so it can run beside vm-test); `cargo xtask bench cgroup` is
//! `--kernel bookworm --tests vm_bench` ([`bench_cgroup`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{root, run};

pub(crate) mod apt;
mod cpio;
mod kernel;
mod pod;
mod system;

use cpio::Cpio;
use kernel::{Kernel, Release};

// The image (cargo xtask image) is built from the same Debian archive, cached the same way.
pub(crate) use apt::debian_mirror;
pub(crate) use system::fnv;

/// The line /init prints first; the host measures the boot to it.
const INIT_MARKER: &str = "CORRAL-VM-INIT";
/// The line /init prints last: `CORRAL-VM-RESULT: PASS` or `CORRAL-VM-RESULT: FAIL <what>`.
const RESULT_MARKER: &str = "CORRAL-VM-RESULT: ";
/// Where the workspace binaries go in the VM; the test executables go to its deps/, so the
/// harness finds the binaries next to them as it does on the host.
const VM_BIN_DIR: &str = "corral/debug";

/// Debian packages the VM tier needs, with a file that shows each is installed.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("xz-utils", "/usr/bin/xz"),
];

struct Options {
    kernels: Vec<Release>,
    keep: bool,
    timeout: Duration,
    /// The corral-tests test target to run inside (tests/<NAME>.rs).
    tests: String,
    /// Release builds of the binaries and the tests (benchmarks).
    release: bool,
    /// The system tier instead: the .deb in a booted Debian (vm/system.rs).
    system: bool,
    /// The pod tier instead: the image under podman kube play in a booted Debian (vm/pod.rs).
    kube: bool,
}

fn parse(args: &[&str]) -> Result<Options> {
    let mut o = Options {
        kernels: Release::ALL.to_vec(),
        keep: false,
        timeout: Duration::from_secs(600),
        tests: "vm".into(),
        release: false,
        system: false,
        kube: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match *arg {
            "--kernel" => {
                o.kernels = match it.next().copied() {
                    Some("all") => Release::ALL.to_vec(),
                    Some("bookworm") => vec![Release::Bookworm],
                    Some("trixie") => vec![Release::Trixie],
                    other => bail!(
                        "--kernel takes bookworm, trixie or all (got {})",
                        other.unwrap_or("nothing")
                    ),
                }
            }
            "--keep" => o.keep = true,
            "--release" => o.release = true,
            "--system" => o.system = true,
            "--kube" => o.kube = true,
            "--timeout" => {
                let secs: u64 = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| *s > 0)
                    .context("--timeout takes a number of seconds")?;
                o.timeout = Duration::from_secs(secs);
            }
            "--tests" => {
                o.tests = it
                    .next()
                    .filter(|s| !s.is_empty() && !s.starts_with('-'))
                    .context("--tests takes a test target of corral-tests, e.g. vm_bench")?
                    .to_string();
            }
            other => bail!("vm-test: unknown argument {other} (see `cargo xtask help`)"),
        }
    }
    Ok(o)
}

/// Install what is missing from [`VM_PACKAGES`] (as root, with apt-get), or say exactly what is
/// missing and how to get it.
pub fn ensure_vm_packages() -> Result<()> {
    crate::ensure_these(VM_PACKAGES, "the VM tier")
}

/// What one kernel's run came to.
struct Outcome {
    release: Release,
    version: String,
    /// The words after `CORRAL-VM-RESULT: `, if /init got that far.
    result: Option<String>,
    /// From starting qemu to /init's first line.
    boot: Option<Duration>,
    /// The guest's uptime when /init started.
    guest_boot: Option<String>,
    total: Duration,
    timed_out: bool,
    /// The console fell silent for longer than any test takes (qemu was killed).
    hung: Option<Duration>,
    log: PathBuf,
    /// Why the first boot failed (a crash or a hang), when this is the second.
    retried_after: Option<String>,
}

/// Lines of a guest kernel that crashed (with `oops=panic`, an oops is a panic too).
const CRASH_SIGNS: &[&str] = &["Kernel panic", "Oops:", "BUG: ", "general protection fault"];

impl Outcome {
    fn passed(&self) -> bool {
        self.result.as_deref() == Some("PASS") && !self.timed_out && self.hung.is_none()
    }

    /// Why the guest, not a test, ended the run: its kernel crashed, or it hung (the console
    /// silent far longer than any test takes, both vCPUs busy: seen once under TCG in the cgroup
    /// tree test, where the other observed crash was).
    fn guest_failure(&self) -> Option<String> {
        if let Some(silent) = self.hung {
            return Some(format!(
                "the guest hung: no console output for {} s",
                silent.as_secs()
            ));
        }
        self.guest_crash()
    }

    /// The guest kernel's first crash line, when the run ended without a result because the
    /// kernel crashed (not a test failure, not a timeout).
    fn guest_crash(&self) -> Option<String> {
        if self.result.is_some() || self.timed_out || self.hung.is_some() {
            return None;
        }
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .find(|l| CRASH_SIGNS.iter().any(|sign| l.contains(sign)))
            .map(|l| l.trim().to_string())
    }
}

pub fn vm_test(args: &[&str]) -> Result<()> {
    let opts = parse(args)?;
    if opts.kube {
        return pod::run_pod(opts.timeout.max(Duration::from_secs(1200)), opts.keep);
    }
    if opts.system {
        return system::run_system(
            &opts.kernels,
            opts.timeout.max(Duration::from_secs(1200)),
            opts.keep,
        );
    }
    let started = Instant::now();
    ensure_vm_packages()?;
    crate::ensure_packages()?;
    let root = root();
    let target = root.join("target");
    let vm_dir = target.join("vm");
    // Another test target keeps its own work directory and logs.
    let suffix = match opts.tests.as_str() {
        "vm" => String::new(),
        other => format!("-{other}"),
    };
    let work = vm_dir.join(format!("work{suffix}"));
    std::fs::create_dir_all(&vm_dir)?;

    // Kernels first: a download that fails should fail before minutes of building.
    let kernels: Vec<(Kernel, PathBuf)> = opts
        .kernels
        .iter()
        .map(|r| {
            let k = kernel::fetch(*r, &vm_dir).with_context(|| {
                format!(
                    "getting {}'s kernel (Debian's linux-image-amd64) for the VM tier",
                    r.name()
                )
            })?;
            let modules = kernel::module_tree(&k)
                .with_context(|| format!("staging the modules of {}", k.package))?;
            Ok((k, modules))
        })
        .collect::<Result<_>>()?;

    let tests = build(&target, &opts.tests, opts.release)?;
    // The TLS benchmark compares against nginx (Debian's binary, fetched, not installed).
    let mut extra: Vec<(PathBuf, &str)> = Vec::new();
    if opts.tests == "tls_bench" {
        extra.push((crate::bench_tls::nginx_binary()?, "usr/sbin/nginx"));
    }
    let profile = if opts.release { "release" } else { "debug" };
    let payload = Payload::collect(&target, profile, &tests, &extra)?;

    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut outcomes = Vec::new();
    for (k, modules) in &kernels {
        let initrd = work.join(format!("{}.cpio", k.release.name()));
        write_initramfs(&initrd, k, modules, &payload)?;
        let log = vm_dir.join(format!("{}{suffix}.log", k.release.name()));
        // The test tier's tests each end well within a minute; a console silent for this long
        // is a hung guest (benchmarks run longer rounds and are not watched).
        let silence = (opts.tests == "vm").then_some(GUEST_SILENCE);
        let mut outcome = boot(k, &initrd, &log, opts.timeout, silence, &work)?;
        if let Some(why) = outcome.guest_failure() {
            // Seen under TCG with two vCPUs: trixie's kernel trapped on an int3 in the
            // scheduler while patching its own text (a qemu TCG cross-modifying-code race,
            // not corral's doing), and once a bookworm guest spun on both vCPUs with no output
            // in the same test. One more boot, said loudly; a second failure fails the tier.
            let kept = vm_dir.join(format!("{}{suffix}-failed.log", k.release.name()));
            let _ = std::fs::rename(&log, &kept);
            eprintln!(
                "\nxtask: vm: WARNING: {}: {why}; its log is kept in {}. Booting it once more.\n",
                k.release.name(),
                kept.display()
            );
            outcome = boot(k, &initrd, &log, opts.timeout, silence, &work)?;
            outcome.retried_after = Some(why);
        }
        outcomes.push(outcome);
    }

    eprintln!("\nxtask: vm-test results:");
    for o in &outcomes {
        eprintln!(
            "  {:<9} {:<22} {:<5} boot to /init {} (guest uptime {}), total {:.1} s, log {}",
            o.release.name(),
            o.version,
            if o.passed() { "PASS" } else { "FAIL" },
            o.boot
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "never".into()),
            o.guest_boot.as_deref().unwrap_or("?"),
            o.total.as_secs_f64(),
            o.log.display()
        );
        if let Some(oops) = &o.retried_after {
            eprintln!("            (second boot: the first crashed: {oops})");
        }
    }
    eprintln!(
        "xtask: vm-test took {:.1} s in all (build, downloads, initramfs, boots)",
        started.elapsed().as_secs_f64()
    );
    if opts.keep {
        eprintln!(
            "xtask: kept {} (initramfs and boot-<kernel>.sh)",
            work.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| {
            let why = match (&o.result, o.timed_out, o.guest_failure()) {
                (_, true, _) => format!("timed out after {:.0} s", o.total.as_secs_f64()),
                (_, false, Some(why)) => match &o.retried_after {
                    Some(first) => format!("twice: {first}; then {why}"),
                    None => why,
                },
                (Some(r), false, None) => r.clone(),
                (None, false, None) => "no CORRAL-VM-RESULT line (/init died)".into(),
            };
            format!("{}: {why}", o.release.name())
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "the VM tier failed: {} (serial logs in {})",
            failed.join("; "),
            vm_dir.display()
        );
    }
    eprintln!("xtask: the VM tier passed");
    Ok(())
}

/// Build the workspace binaries and the test executable `test` (`vm` unless --tests) in the
/// workspace's target/; returns the test executables by target name.
fn build(target: &Path, test: &str, release: bool) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo = || {
        let mut c = Command::new(&cargo);
        c.current_dir(root()).env("CARGO_TARGET_DIR", target);
        c
    };
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    run(cargo()
        .args(["build", "--workspace", "--bins"])
        .args(profile))?;
    eprintln!("xtask: building the VM tier's test executable (tests/{test}.rs)");
    let out = cargo()
        .args([
            "test",
            "-p",
            "corral-tests",
            "--test",
            test,
            "--no-run",
            "--message-format=json",
        ])
        .args(profile)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-message") => {
                if let Some(r) = msg["message"]["rendered"].as_str() {
                    eprint!("{r}");
                }
            }
            Some("compiler-artifact") => {
                if let (Some(exe), Some(name)) =
                    (msg["executable"].as_str(), msg["target"]["name"].as_str())
                {
                    tests.push((name.to_string(), PathBuf::from(exe)));
                }
            }
            _ => {}
        }
    }
    if !out.status.success() {
        bail!("building the VM tests failed ({})", out.status);
    }
    if tests.is_empty() {
        bail!("cargo test --no-run named no test executable for tests/{test}.rs");
    }
    Ok(tests)
}

/// Everything the initramfs holds besides the kernel's modules and /init.
struct Payload {
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
    fn collect(
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

fn write_initramfs(path: &Path, kernel: &Kernel, modules: &Path, payload: &Payload) -> Result<()> {
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

enum Event {
    Line(Instant, String),
    Eof,
}

/// How long the test tier's console may stay silent before the guest counts as hung.
const GUEST_SILENCE: Duration = Duration::from_secs(240);

/// Boot `kernel` with `initrd`, the serial console into `log`; kill qemu after `timeout`, or
/// when the console has been silent for `silence`.
fn boot(
    kernel: &Kernel,
    initrd: &Path,
    log_path: &Path,
    timeout: Duration,
    silence: Option<Duration>,
    work: &Path,
) -> Result<Outcome> {
    let mut args: Vec<String> =
        "-accel tcg -M q35 -cpu max -m 3G -smp 2 -nographic -nic none -no-reboot"
            .split_whitespace()
            .map(String::from)
            .collect();
    args.extend([
        "-kernel".into(),
        kernel.vmlinuz.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        // oops=panic: a kernel oops ends the VM at once (panic=-1 and -no-reboot: qemu exits)
        // instead of leaving a test hung until the timeout.
        "console=ttyS0 panic=-1 oops=panic rdinit=/init".into(),
    ]);
    run_qemu(
        kernel.release,
        &kernel.version,
        &kernel.package,
        args,
        log_path,
        timeout,
        silence,
        work,
    )
}

/// Run qemu with `args` (the serial console on stdout), log every line to `log_path`, and
/// come back with the result line's words, or after `timeout`, or once the console has been
/// silent for `silence` (a hung guest).
#[allow(clippy::too_many_arguments)]
fn run_qemu(
    release: Release,
    version: &str,
    package: &str,
    args: Vec<String>,
    log_path: &Path,
    timeout: Duration,
    silence: Option<Duration>,
    work: &Path,
) -> Result<Outcome> {
    let name = release.name();
    let mut cmd = Command::new("qemu-system-x86_64");
    // No monitor: the serial console alone on stdout.
    cmd.args(&args).args(["-monitor", "none"]);
    // A script to boot the same VM by hand (kept with --keep).
    let script = work.join(format!("boot-{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# Boots the VM tier's {name} VM again (Ctrl-A X quits qemu).\n\
             exec qemu-system-x86_64 '{}'\n",
            args.join("' '")
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;

    eprintln!(
        "xtask: vm: booting {name} ({version}, {package}) under qemu TCG; serial log {}",
        log_path.display()
    );
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        readers += 1;
        let tx = tx.clone();
        std::thread::spawn(move || forward(out, tx));
    }
    if let Some(err) = child.stderr.take() {
        readers += 1;
        let tx = tx.clone();
        std::thread::spawn(move || forward(err, tx));
    }
    drop(tx);

    let deadline = start + timeout;
    let mut boot = None;
    let mut guest_boot = None;
    let mut result: Option<String> = None;
    let mut result_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut hung = None;
    let mut last_line = start;
    while readers > 0 {
        let now = Instant::now();
        // After the result line qemu should power off at once; give it a minute at most.
        let until = match result_at {
            Some(t) => deadline.min(t + Duration::from_secs(60)),
            None => deadline,
        };
        let quiet_until = silence
            .filter(|_| result_at.is_none())
            .map(|s| last_line + s);
        if quiet_until.is_some_and(|q| now >= q && q < until) {
            hung = silence;
            break;
        }
        if now >= until {
            timed_out = result_at.is_none();
            break;
        }
        let wake = quiet_until.map_or(until, |q| q.min(until));
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(Event::Line(at, line)) => {
                last_line = at;
                writeln!(log, "{line}")?;
                if let Some(i) = line.find(INIT_MARKER) {
                    boot = Some(at - start);
                    guest_boot = line[i + INIT_MARKER.len()..]
                        .trim()
                        .strip_prefix("uptime ")
                        .map(str::to_string);
                }
                if boot.is_some() {
                    eprintln!("[{name}] {line}");
                }
                if let Some(i) = line.find(RESULT_MARKER) {
                    result = Some(line[i + RESULT_MARKER.len()..].trim().to_string());
                    result_at = Some(at);
                }
            }
            Ok(Event::Eof) => readers -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if readers > 0 || timed_out || hung.is_some() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for qemu")?;
    let total = start.elapsed();
    writeln!(
        log,
        "[xtask: qemu exited with {status} after {:.1} s]",
        total.as_secs_f64()
    )?;
    log.flush()?;
    let outcome = Outcome {
        release,
        version: version.to_string(),
        result,
        boot,
        guest_boot,
        total,
        timed_out,
        hung,
        log: log_path.to_path_buf(),
        retried_after: None,
    };
    if let Some(s) = hung {
        eprintln!(
            "xtask: vm: {name}: no console output for {} s: the guest hung; qemu killed",
            s.as_secs()
        );
    }
    if timed_out {
        eprintln!(
            "xtask: vm: {name}: no result after {} s: qemu killed",
            timeout.as_secs()
        );
    }
    if !outcome.passed() {
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(80)..];
        eprintln!(
            "xtask: vm: {name} FAILED; the last {} lines of {}:\n{}",
            tail.len(),
            log_path.display(),
            tail.join("\n")
        );
    }
    Ok(outcome)
}

/// Send `r`'s lines (serial output: CR LF, maybe not UTF-8) as events, then EOF.
fn forward(r: impl std::io::Read, tx: mpsc::Sender<Event>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .replace('\r', "");
                if tx.send(Event::Line(Instant::now(), line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Event::Eof);
}

/// `cargo xtask bench cgroup`: tests/vm_bench.rs in bookworm's VM (BENCHMARKS.md, "cgroup"),
/// then its output again, without the serial console's prefixes.
pub fn bench_cgroup(args: &[&str]) -> Result<()> {
    if !args.is_empty() {
        bail!("bench cgroup takes no arguments (got {})", args.join(" "));
    }
    let result = vm_test(&[
        "--kernel",
        "bookworm",
        "--tests",
        "vm_bench",
        "--timeout",
        "3600",
    ]);
    let log = root().join("target/vm/bookworm-vm_bench.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let out: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("corral-vm: running vm_bench"))
        .take_while(|l| !l.contains("corral-vm: vm_bench exited"))
        .collect();
    println!("{}", out.join("\n"));
    result
}

/// qemu's arguments to boot a root filesystem image under systemd (TCG, 2 CPUs, 3 GiB, no
/// network, serial console): the system and pod tiers.
pub(crate) fn systemd_boot_args(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    image: &std::path::Path,
) -> Vec<String> {
    let mut args: Vec<String> = "-accel tcg -M q35 -cpu max -m 3G -smp 2 -nographic -nic none"
        .split_whitespace()
        .map(String::from)
        .collect();
    args.extend([
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 root=/dev/vda rw panic=-1 systemd.show_status=0".into(),
        "-drive".into(),
        format!("file={},if=virtio,format=raw", image.display()),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(log: &str, result: Option<&str>, timed_out: bool) -> (Outcome, PathBuf) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "corral-xtask-outcome-{}-{n}.log",
            std::process::id()
        ));
        std::fs::write(&path, log).expect("write log");
        let o = Outcome {
            release: Release::Bookworm,
            version: "6.1".into(),
            result: result.map(str::to_string),
            boot: None,
            guest_boot: None,
            total: Duration::ZERO,
            timed_out,
            hung: None,
            log: path.clone(),
            retried_after: None,
        };
        (o, path)
    }

    #[test]
    fn a_guest_kernel_crash_is_told_from_a_failure_and_a_timeout() {
        let oops = "corral-vm: running vm\n[ 41.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
                    [ 41.2] Kernel panic - not syncing: Fatal exception\n";
        let (o, p) = outcome(oops, None, false);
        assert_eq!(
            o.guest_crash().as_deref(),
            Some("[ 41.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI")
        );
        let _ = std::fs::remove_file(p);
        // A test that failed printed its result: no second boot.
        let (o, p) = outcome(oops, Some("FAIL vm(exit-101)"), false);
        assert_eq!(o.guest_crash(), None);
        let _ = std::fs::remove_file(p);
        // A hang is a timeout, not a crash.
        let (o, p) = outcome(oops, None, true);
        assert_eq!(o.guest_crash(), None);
        let _ = std::fs::remove_file(p);
        // /init died without the kernel crashing: a failure, not retried.
        let (o, p) = outcome("corral-vm: running vm\nsh: /vm: not found\n", None, false);
        assert_eq!(o.guest_crash(), None);
        assert_eq!(o.guest_failure(), None);
        // A silent guest is retried too.
        let (mut o, p2) = outcome("corral-vm: running vm\n", None, false);
        o.hung = Some(Duration::from_secs(240));
        assert_eq!(
            o.guest_failure().as_deref(),
            Some("the guest hung: no console output for 240 s")
        );
        assert!(!o.passed());
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(p2);
    }
}
