//! The offline validator of packaging/kubernetes: kubernetes-validate (which carries the
//! Kubernetes JSON schemas itself, so validation needs no cluster and no network) in a venv of
//! pinned PyPI packages under target/kube/venv. `cargo xtask test` makes it before the tests;
//! tests/kubernetes.rs runs it.

use std::path::PathBuf;

use anyhow::Result;

use crate::{root, venv};

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

/// target/kube/venv with [`REQUIREMENTS`], made or reused.
pub fn ensure_validator() -> Result<PathBuf> {
    venv::ensure_python("the Kubernetes manifest check")?;
    let dir = root().join("target/kube/venv");
    if venv::is_current(&dir, REQUIREMENTS, "bin/kubernetes-validate") {
        return Ok(dir);
    }
    eprintln!("xtask: making {} with kubernetes-validate", dir.display());
    venv::make(&dir, REQUIREMENTS)?;
    venv::stamp(&dir, REQUIREMENTS)?;
    Ok(dir)
}
