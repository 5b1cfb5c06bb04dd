//! `cargo xtask bench http`: tests/http_bench.rs (release builds) on the host: the HTTP front
//! against nginx and Caddy from Debian's packages (downloaded and unpacked under target/,
//! never installed: installing them would start system servers on port 80), with h2load
//! (Debian's nghttp2-client) as the client.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{ensure_these, is_root, root, run};

/// Debian's caddy binary, unpacked from its package under target/bench-http (cached).
fn caddy_binary() -> Result<PathBuf> {
    let dir = root().join("target/bench-http");
    let bin = dir.join("root/usr/bin/caddy");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: bench http: fetching Debian's caddy package (apt-get download caddy)");
    let status = Command::new("apt-get")
        .args(["download", "caddy"])
        .current_dir(&dir)
        .status()
        .context("running apt-get download caddy")?;
    if !status.success() {
        bail!("apt-get download caddy failed ({status}): the HTTP benchmark needs Debian's caddy package reachable through apt");
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("caddy_"))
        })
        .context("apt-get download left no caddy_*.deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")))?;
    if !bin.exists() {
        bail!("{} has no usr/bin/caddy", deb.display());
    }
    Ok(bin)
}

pub fn http(args: &[&str]) -> Result<()> {
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match *a {
            "--quick" => {
                std::env::set_var("CORRAL_BENCH_ROUNDS", "1");
                std::env::set_var("CORRAL_BENCH_ROUND", "2");
            }
            "--loads" => {
                let list = args
                    .next()
                    .context("--loads takes a list: h1-100,h2-100,h1-1,h2-1")?;
                std::env::set_var("CORRAL_BENCH_LOADS", list);
            }
            "--no-slow" => std::env::set_var("CORRAL_BENCH_SLOW_ROUND", "0"),
            other => bail!("bench http: unexpected argument {other}"),
        }
    }
    if !is_root() {
        bail!("the benchmark runs a corral agent, nginx and caddy: run it as root");
    }
    crate::ensure_packages()?;
    ensure_these(
        &[("nghttp2-client", "/usr/bin/h2load")],
        "the HTTP benchmark",
    )?;
    let nginx = crate::bench_tls::nginx_binary()?;
    let caddy = caddy_binary()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "--workspace", "--bins"]))?;
    run(Command::new(&cargo)
        .current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .env("CORRAL_NGINX", &nginx)
        .env("CORRAL_CADDY", &caddy)
        .args([
            "test",
            "--release",
            "-p",
            "corral-tests",
            "--test",
            "http_bench",
            "--",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]))
}
