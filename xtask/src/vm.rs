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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{root, run};

pub(crate) mod apt;
mod cpio;
mod initramfs;
mod kernel;
mod outcome;
mod pod;
mod qemu;
mod system;

use initramfs::{write_initramfs, Payload};
use kernel::{Kernel, Release};
use qemu::{boot, GUEST_SILENCE};
// The system and pod tiers boot their images with the same qemu runner.
use qemu::{run_qemu, systemd_boot_args};

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
