//! The offline validator of packaging/kubernetes: kubernetes-validate (which carries the
//! Kubernetes JSON schemas itself, so validation needs no cluster and no network) in a venv of
//! pinned PyPI packages under target/kube/venv. `cargo xtask test` makes it before the tests;
//! tests/kubernetes.rs runs it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::{ensure_these, root, run};

/// Pinned, dependencies included; changing a line rebuilds the venv.
const REQUIREMENTS: &str = "\
kubernetes-validate==1.37.0
attrs==26.1.0
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.4
PyYAML==6.0.4
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0
";

const PYTHON: &str = "/usr/bin/python3";

/// target/kube/venv with [`REQUIREMENTS`], made or reused.
pub fn ensure_validator() -> Result<PathBuf> {
    ensure_these(&[("python3", PYTHON)], "the Kubernetes manifest check")?;
    // python3-venv ships ensurepip under the interpreter's own version directory.
    let version = crate::bench_peers::python::python_version()?;
    let ensurepip = format!("/usr/lib/python{version}/ensurepip/__init__.py");
    ensure_these(
        &[("python3-venv", &ensurepip)],
        "the Kubernetes manifest check's venv",
    )?;
    let venv = root().join("target/kube/venv");
    let stamp = venv.join("corral-requirements.txt");
    if std::fs::read_to_string(&stamp).unwrap_or_default() == REQUIREMENTS
        && venv.join("bin/kubernetes-validate").exists()
    {
        return Ok(venv);
    }
    eprintln!("xtask: making {} with kubernetes-validate", venv.display());
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    std::fs::create_dir_all(root().join("target/kube"))?;
    run(Command::new(PYTHON).arg("-m").arg("venv").arg(&venv))?;
    let reqs = venv.join("requirements.txt");
    std::fs::write(&reqs, REQUIREMENTS)?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&reqs))?;
    std::fs::write(&stamp, REQUIREMENTS)?;
    Ok(venv)
}
