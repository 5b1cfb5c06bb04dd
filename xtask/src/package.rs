//! `cargo xtask package`: the .deb and the .rpm, from the metadata in agent/Cargo.toml.
//! cargo-deb and cargo-generate-rpm are installed from crates.io into target/tools (pinned
//! versions, once); the completions and the man page come from the built binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run};

const CARGO_DEB: &str = "3.6.2";
const CARGO_GENERATE_RPM: &str = "0.16.0";

/// What `package` made.
pub struct Packages {
    pub deb: PathBuf,
    pub rpm: PathBuf,
}

fn tool(name: &str, version: &str) -> Result<PathBuf> {
    let tools = root().join("target/tools");
    let bin = tools.join("bin").join(name);
    let stamp = tools.join(format!("{name}-{version}.installed"));
    if bin.exists() && stamp.exists() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: package: installing {name} {version} into {}",
        tools.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["install", "--locked", "--quiet", "--root"])
        .arg(&tools)
        .arg(format!("{name}@{version}")))?;
    std::fs::write(&stamp, "")?;
    Ok(bin)
}

fn capture(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Build both packages into target/package.
pub fn build(version: Option<&str>) -> Result<Packages> {
    build_into(version, &root().join("target/package"))
}

/// Build both packages into `out`; `version` overrides the crate's (an upgrade test needs a
/// newer one).
pub fn build_into(version: Option<&str>, out: &Path) -> Result<Packages> {
    let deb = build_with(version, out, true)?;
    let rpm = find(out, "rpm")?;
    Ok(Packages { deb, rpm })
}

/// Only the .deb, into `out` (the image unpacks corral from it; the .rpm takes the longest).
pub fn build_deb(out: &Path) -> Result<PathBuf> {
    build_with(None, out, false)
}

fn find(out: &Path, ext: &str) -> Result<PathBuf> {
    std::fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == ext))
        .with_context(|| format!("no .{ext} in {}", out.display()))
}

/// The .deb, and the .rpm too when `rpm`, into `out`; returns the .deb.
fn build_with(version: Option<&str>, out: &Path, rpm: bool) -> Result<PathBuf> {
    crate::ensure_packages()?;
    crate::ensure_these(
        &[
            // cargo-deb's `$auto` dependencies come from dpkg-shlibdeps.
            ("dpkg-dev", "/usr/bin/dpkg-shlibdeps"),
        ],
        "the packages",
    )?;
    let cargo_deb = tool("cargo-deb", CARGO_DEB)?;
    let generate_rpm = tool("cargo-generate-rpm", CARGO_GENERATE_RPM)?;
    let root = root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "-p", "corral"]))?;
    // The asset paths in agent/Cargo.toml name target/package/ for the generated files.
    let gen = root.join("target/package");
    std::fs::create_dir_all(&gen)?;
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    let corral = root.join("target/release/corral");
    for (shell, file) in [
        ("bash", "corral.bash"),
        ("zsh", "_corral"),
        ("fish", "corral.fish"),
    ] {
        let text = capture(Command::new(&corral).args(["completions", shell]))?;
        std::fs::write(gen.join(file), text)?;
    }
    let man = capture(Command::new(&corral).arg("manpage"))?;
    std::fs::write(gen.join("corral.1"), man)?;
    run(Command::new("gzip")
        .args(["-9nf"])
        .arg(gen.join("corral.1")))?;

    let mut deb = Command::new(&cargo_deb);
    deb.current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["-p", "corral", "--no-build", "--no-strip", "--output"])
        .arg(out);
    if let Some(v) = version {
        deb.args(["--deb-version", v]);
    }
    run(&mut deb)?;
    if !rpm {
        return find(out, "deb");
    }
    let mut rpm = Command::new(&generate_rpm);
    rpm.current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["-p", "agent", "-o"])
        .arg(out);
    if let Some(v) = version {
        // An rpm version has no Debian revision ("0.1.1-1" is version 0.1.1, release 1).
        let v = v.split('-').next().unwrap_or(v);
        rpm.args(["--set-metadata", &format!("version = \"{v}\"")]);
    }
    run(&mut rpm)?;
    find(out, "deb")
}

pub fn package(args: &[&str]) -> Result<()> {
    let mut version = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--version" => {
                version = Some(
                    *it.next()
                        .context("--version takes a package version, e.g. 0.1.1")?,
                )
            }
            other => bail!("package: unexpected argument {other}"),
        }
    }
    let p = build(version)?;
    println!("{}\n{}", show(&p.deb), show(&p.rpm));
    Ok(())
}

fn show(p: &Path) -> String {
    p.display().to_string()
}
