//! `cargo xtask bench tls`: tests/tls_bench.rs (release builds) on the host, then in
//! bookworm's VM, side by side with nginx from Debian's packages (downloaded and unpacked
//! under target/, never installed: installing it would start a system nginx on port 80).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{is_root, root, run};

/// Debian's nginx binary, unpacked from its package under target/bench-tls (cached).
pub fn nginx_binary() -> Result<PathBuf> {
    let dir = root().join("target/bench-tls");
    let bin = dir.join("root/usr/sbin/nginx");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: bench tls: fetching Debian's nginx package (apt-get download nginx)");
    let status = Command::new("apt-get")
        .args(["download", "nginx"])
        .current_dir(&dir)
        .status()
        .context("running apt-get download nginx")?;
    if !status.success() {
        bail!(
            "apt-get download nginx failed ({status}): the TLS benchmark needs Debian's nginx \
             package reachable through apt"
        );
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nginx_"))
        })
        .context("apt-get download left no nginx_*.deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")))?;
    if !bin.exists() {
        bail!("{} has no usr/sbin/nginx", deb.display());
    }
    Ok(bin)
}

pub fn tls(args: &[&str]) -> Result<()> {
    let (mut quick, mut host_only, mut vm_only) = (false, false, false);
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match *a {
            "--quick" => quick = true,
            "--host" => host_only = true,
            "--vm" => vm_only = true,
            "--loads" => {
                let list = args
                    .next()
                    .context("--loads takes a list: handshakes,requests,mib")?;
                for l in list.split(',') {
                    if !["handshakes", "requests", "mib"].contains(&l) {
                        bail!("--loads: {l:?} is not one of handshakes, requests, mib");
                    }
                }
                // The tests read it, on the host and in the VM (vm-test exports CORRAL_BENCH_*).
                std::env::set_var("CORRAL_BENCH_LOADS", list);
            }
            other => bail!("bench tls: unexpected argument {other}"),
        }
    }
    if host_only && vm_only {
        bail!("bench tls: --host and --vm exclude each other");
    }
    if quick {
        std::env::set_var("CORRAL_BENCH_ROUNDS", "1");
        std::env::set_var("CORRAL_BENCH_ROUND", "2");
    }
    if !is_root() {
        bail!("the benchmark runs corral agents and nginx: run it as root");
    }
    crate::ensure_packages()?;
    let nginx = nginx_binary()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "--workspace", "--bins"]))?;
    let mut host = Command::new(&cargo);
    host.current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .env("CORRAL_NGINX", &nginx)
        .args([
            "test",
            "--release",
            "-p",
            "corral-tests",
            "--test",
            "tls_bench",
            "--",
            "--ignored",
            "--nocapture",
            // The throughput and the cost measurements must not share the CPUs.
            "--test-threads=1",
        ]);
    if !vm_only {
        run(&mut host)?;
    }
    if host_only {
        return Ok(());
    }
    let result = crate::vm::vm_test(&[
        "--kernel",
        "bookworm",
        "--tests",
        "tls_bench",
        "--release",
        "--timeout",
        "3600",
    ]);
    let log = root().join("target/vm/bookworm-tls_bench.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let out: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with('|')
                || l.starts_with("bench tls")
                || l.starts_with("handshakes/s")
                || l.starts_with("requests/s")
                || l.starts_with("1 MiB")
                || l.starts_with("cost per MiB")
                || l.starts_with("rounds")
                || l.contains("counters:")
                || l.contains("kernel TLS:")
        })
        .collect();
    println!(
        "\nin the VM (bookworm, qemu TCG, release builds):\n{}",
        out.join("\n")
    );
    result
}
