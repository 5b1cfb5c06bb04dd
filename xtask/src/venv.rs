//! Python venvs of pinned PyPI packages under target/ (the peers benchmark's apps, the
//! Kubernetes manifest validator): made with the machine's python3 and python3-venv, stamped
//! with their requirements, and reused while those stay the same.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{ensure_these, run};

/// The machine's interpreter the venvs are made with.
pub const PYTHON: &str = "/usr/bin/python3";

/// The file in a venv that holds the requirements it was made with.
const STAMP: &str = "corral-requirements.txt";

/// Check that python3 and python3-venv are installed (or install them), for `what` (e.g. "the
/// peers benchmark"); returns the interpreter's `major.minor`.
pub fn ensure_python(what: &str) -> Result<String> {
    ensure_these(&[("python3", PYTHON)], what)?;
    // python3-venv ships ensurepip under the interpreter's own version directory.
    let version = python_version()?;
    let ensurepip = format!("/usr/lib/python{version}/ensurepip/__init__.py");
    ensure_these(&[("python3-venv", &ensurepip)], &format!("{what}'s venv"))?;
    Ok(version)
}

/// The interpreter's `major.minor`.
pub fn python_version() -> Result<String> {
    let out = Command::new(PYTHON)
        .args([
            "-c",
            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        ])
        .output()
        .with_context(|| format!("running {PYTHON}"))?;
    if !out.status.success() {
        bail!("{PYTHON} -c 'import sys' failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `venv` was made with exactly `requirements` and has `marker` (a path inside it, e.g.
/// `bin/python`).
pub fn is_current(venv: &Path, requirements: &str, marker: &str) -> bool {
    std::fs::read_to_string(venv.join(STAMP)).unwrap_or_default() == requirements
        && venv.join(marker).exists()
}

/// Make `venv` anew (an old one is removed) and pip-install `requirements` into it. Not
/// stamped: call [`stamp`] once the caller's own steps on it are done too.
pub fn make(venv: &Path, requirements: &str) -> Result<()> {
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .with_context(|| format!("removing the old {}", venv.display()))?;
    }
    let parent = venv
        .parent()
        .with_context(|| format!("{} has no parent directory", venv.display()))?;
    std::fs::create_dir_all(parent)?;
    run(Command::new(PYTHON).arg("-m").arg("venv").arg(venv))?;
    let reqs = venv.join("requirements.txt");
    std::fs::write(&reqs, requirements)?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&reqs))
}

/// Record that `venv` holds `requirements` (see [`is_current`]).
pub fn stamp(venv: &Path, requirements: &str) -> Result<()> {
    let path = venv.join(STAMP);
    std::fs::write(&path, requirements).with_context(|| format!("writing {}", path.display()))
}
