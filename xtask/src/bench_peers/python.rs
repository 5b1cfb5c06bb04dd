//! The Python side of `bench peers` (and of tests/http_front.rs, which `cargo xtask test`
//! provisions it for): a venv of pinned PyPI packages under target/bench/venv,
//! made from Debian's /usr/bin/python3 (the workers run as `nobody`, who cannot read an
//! interpreter under /root), and the benchmark's apps, written into target/bench/apps.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bench_steering::nobody;
use crate::{root, venv};

/// Everything the venv holds, pinned, dependencies included, so that two runs months apart
/// measure the same servers. Changing a line rebuilds the venv.
pub(super) const REQUIREMENTS: &str = "\
fastapi==0.165.0
uvicorn==0.55.0
gunicorn==27.0.1
uvicorn-worker==0.4.0
starlette==1.10.0
pydantic==2.14.4
pydantic_core==2.50.5
anyio==4.16.0
h11==0.16.0
click==8.5.1
idna==3.20
typing_extensions==4.16.0
typing-inspection==0.4.5
annotated-types==0.8.0
annotated-doc==0.0.7
opentelemetry-api==1.45.2
websockets==17.4
";

/// The apps, kept in the repository as Python files (xtask/bench-apps) and written out at each
/// run: (file name, text).
const APPS: &[(&str, &str)] = &[
    (
        "benchcommon.py",
        include_str!("../../bench-apps/benchcommon.py"),
    ),
    ("wsgi_app.py", include_str!("../../bench-apps/wsgi_app.py")),
    (
        "fastapi_sync.py",
        include_str!("../../bench-apps/fastapi_sync.py"),
    ),
    (
        "fastapi_async.py",
        include_str!("../../bench-apps/fastapi_async.py"),
    ),
];

/// The venv's directory, made (or reused when it holds exactly [`REQUIREMENTS`]) and checked to
/// be usable by `nobody`.
pub(crate) fn ensure_venv() -> Result<PathBuf> {
    let version = venv::ensure_python("the peers benchmark")?;
    let dir = root().join("target/bench/venv");
    if venv::is_current(&dir, REQUIREMENTS, "bin/python") {
        eprintln!("bench peers: reusing {}", dir.display());
    } else {
        eprintln!(
            "bench peers: making {} (Python {version}) with pinned fastapi, uvicorn, gunicorn",
            dir.display()
        );
        venv::make(&dir, REQUIREMENTS)?;
        make_readable(&dir)?;
        venv::stamp(&dir, REQUIREMENTS)?;
    }
    check_as_nobody(
        &dir,
        "import fastapi, uvicorn, gunicorn, uvicorn_worker",
        &dir,
    )?;
    Ok(dir)
}

/// The version line of the interpreter, for the report.
pub(super) fn python_banner(venv: &Path) -> String {
    Command::new(venv.join("bin/python"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "python ?".into())
}

/// Write the apps into target/bench/apps (every run: the files are the ones this xtask was built
/// with) and check that `nobody` can import them.
pub(super) fn write_apps(venv: &Path) -> Result<PathBuf> {
    let dir = root().join("target/bench/apps");
    std::fs::create_dir_all(&dir)?;
    for (name, text) in APPS {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    check_as_nobody(venv, "import benchcommon, wsgi_app", &dir)?;
    Ok(dir)
}

/// Give everyone read access (and search access to directories) under `dir`: pip honours the
/// umask, and root's may be 077.
fn make_readable(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let ty = entry.file_type()?;
        if ty.is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        let want = if ty.is_dir() {
            mode | 0o555
        } else {
            mode | 0o444
        };
        if want != mode {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(want))?;
        }
        if ty.is_dir() {
            make_readable(&entry.path())?;
        }
    }
    Ok(())
}

/// Run `python -c code` as `nobody` in `cwd` (with it on the import path): fails with a hint
/// when the checkout's directories are not open to other users.
fn check_as_nobody(venv: &Path, code: &str, cwd: &Path) -> Result<()> {
    let (uid, gid) = nobody()?;
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", code])
        .current_dir(cwd)
        .env("PYTHONPATH", cwd)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .uid(uid)
        .gid(gid)
        .output()
        .context("running the venv's python as nobody")?;
    if !out.status.success() {
        bail!(
            "`nobody` cannot run `{code}` with {} in {}: the workers run as nobody, so every \
             directory above target/ must be searchable by other users (`namei -l {}`): {}",
            venv.display(),
            cwd.display(),
            cwd.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
