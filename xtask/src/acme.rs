//! The ACME test server for tests/acme.rs: Debian trixie's `pebble` package (pebble 2.6 with
//! ARI, and `pebble-challtestsrv`, whose DNS server makes the tests' names resolve to
//! 127.0.0.1), fetched with apt through the VM tier's private trixie configuration
//! (target/vm/apt-trixie) and unpacked once under target/acme/pebble/. The binaries are static
//! Go programs: trixie's build runs on bookworm.
//!
//! The package ships no certificate for pebble's own HTTPS listener (upstream's test/certs are
//! not in it): the tests make one with openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::root;

const PACKAGE: &str = "pebble";
/// The binaries the tests run, relative to the unpacked tree.
const BINARIES: [&str; 2] = ["usr/bin/pebble", "usr/bin/pebble-challtestsrv"];

/// Make sure target/acme/pebble/usr/bin/{pebble,pebble-challtestsrv} exist; returns the
/// unpacked tree.
pub fn ensure_pebble() -> Result<PathBuf> {
    let target = root().join("target");
    let tree = target.join("acme/pebble");
    if BINARIES.iter().all(|b| tree.join(b).is_file()) {
        return Ok(tree);
    }
    let debs = target.join("acme/debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    eprintln!("xtask: acme: fetching Debian trixie's {PACKAGE} for tests/acme.rs");
    crate::vm::apt::download_trixie(&target.join("vm"), &debs, PACKAGE)?;
    let deb = find_deb(&debs)?;
    let staging = target.join("acme/pebble.partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&staging)
        .output()
        .context("running dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb -x {} failed: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for b in BINARIES {
        if !staging.join(b).is_file() {
            bail!(
                "{} has no {b}: the tests need pebble and pebble-challtestsrv from one package",
                deb.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::rename(&staging, &tree)?;
    let _ = std::fs::remove_dir_all(&debs);
    Ok(tree)
}

fn find_deb(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}
