//! `cargo xtask image`: the example image of packaging/kubernetes, built offline by the
//! project (no registry pull), the equivalent of packaging/kubernetes/Containerfile:
//!
//! 1. a Debian bookworm root from Debian's packages (mmdebstrap, minbase + python3 and
//!    python3-venv, from the archive this machine's apt uses) with the app's venv made by the
//!    root's own python in a chroot, from wheels pip downloads on the host for that python's
//!    version (packaging/kubernetes/app/requirements.txt, pinned). Cached under
//!    target/image/base-<hash>; a change of the package list or the requirements makes a new one;
//! 2. each build: a copy of it plus corral's binary from the freshly built .deb (unpacked, as
//!    the Containerfile does), the app and packaging/kubernetes/corral.toml as
//!    /etc/corral/corral.toml;
//! 3. `podman import` of that tree with the Containerfile's ENTRYPOINT, EXPOSE and STOPSIGNAL
//!    as localhost/corral-fastapi:latest, `podman save` to target/image/corral-fastapi.tar (a
//!    docker-archive: `podman load -i` takes it), and the image removed from this machine's
//!    podman storage again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{ensure_these, root, run};

/// The image's name, as packaging/kubernetes/corral-fastapi.yaml names it.
pub const IMAGE: &str = "localhost/corral-fastapi:latest";

/// What mmdebstrap adds to minbase.
const INCLUDE: &str = "python3,python3-venv";

/// What dpkg leaves out of the root, as in debian:bookworm-slim (the Containerfile's base):
/// documentation, manuals and translations. Smaller is faster: the VM tier loads the image
/// under qemu TCG.
const EXCLUDE: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/groff/*",
    "/usr/share/lintian/*",
    "/usr/share/locale/*",
];

/// The Containerfile's instructions that `podman import` takes (`--change`).
/// (`podman import` sets no PATH: this is debian:bookworm-slim's.)
const CHANGES: &[&str] = &[
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    r#"ENTRYPOINT ["/usr/bin/corral", "agent", "--config", "/etc/corral/corral.toml"]"#,
    "EXPOSE 8000",
    "EXPOSE 9466",
    "STOPSIGNAL SIGTERM",
];

const PACKAGES: &[(&str, &str)] = &[
    ("mmdebstrap", "/usr/bin/mmdebstrap"),
    ("podman", "/usr/bin/podman"),
];

pub fn image(args: &[&str]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("image takes no arguments (got {a})");
    }
    let archive = build()?;
    println!("{}", archive.display());
    Ok(())
}

/// Build the image and return its archive, target/image/corral-fastapi.tar.
pub fn build() -> Result<PathBuf> {
    if !crate::is_root() {
        bail!(
            "the image's root filesystem is made with mmdebstrap and chroot, and imported into \
             root's podman storage: run `cargo xtask image` as root"
        );
    }
    ensure_these(PACKAGES, "the image (cargo xtask image)")?;
    let root = root();
    let dir = root.join("target/image");
    std::fs::create_dir_all(&dir)?;
    let requirements =
        std::fs::read_to_string(root.join("packaging/kubernetes/app/requirements.txt"))
            .context("reading packaging/kubernetes/app/requirements.txt")?;
    let base = base_root(&dir, &requirements)?;
    // Its own directory: target/package is `cargo xtask package`'s (and the tests').
    let deb_file = crate::package::build_deb(&dir.join("package"))?;

    let t = Instant::now();
    let stage = dir.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&base)
        .arg(&stage))?;
    std::fs::remove_file(stage.join(".complete"))?;
    // corral's binary from its .deb, unpacked rather than installed (Containerfile: the
    // package depends on systemd, which the container runs without).
    let deb = dir.join("deb");
    let _ = std::fs::remove_dir_all(&deb);
    run(Command::new("dpkg-deb")
        .arg("--extract")
        .arg(&deb_file)
        .arg(&deb))?;
    // Without its debug information (a third of the image otherwise).
    run(Command::new("install")
        .args(["-m", "0755", "--strip"])
        .arg(deb.join("usr/bin/corral"))
        .arg(stage.join("usr/bin/corral")))?;
    std::fs::remove_dir_all(&deb)?;
    let app = root.join("packaging/kubernetes/app");
    for f in std::fs::read_dir(&app)? {
        let f = f?;
        std::fs::copy(f.path(), stage.join("srv/api").join(f.file_name()))?;
    }
    std::fs::create_dir_all(stage.join("etc/corral"))?;
    std::fs::copy(
        root.join("packaging/kubernetes/corral.toml"),
        stage.join("etc/corral/corral.toml"),
    )?;
    // The pod's root filesystem is read-only: the app's bytecode is compiled here.
    run(chroot(&stage).args(["python3", "-m", "compileall", "-q", "/srv/api/main.py"]))?;
    run(Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(stage.join("srv/api")))?;

    let tar = dir.join("rootfs.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-C"])
        .arg(&stage)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    std::fs::remove_dir_all(&stage)?;
    let mut import = Command::new("podman");
    import.arg("import");
    for c in CHANGES {
        import.args(["--change", c]);
    }
    import
        .args(["--message", "corral-fastapi, built by cargo xtask image"])
        .arg(&tar)
        .arg(IMAGE);
    run(&mut import)?;
    let archive = dir.join("corral-fastapi.tar");
    let _ = std::fs::remove_file(&archive);
    let saved = run(Command::new("podman")
        .args(["save", "--format", "docker-archive", "-o"])
        .arg(&archive)
        .arg(IMAGE));
    // The image lives on in the archive only: this machine's podman storage is left as it was.
    let removed = run(Command::new("podman").args(["rmi", IMAGE]));
    saved?;
    removed?;
    std::fs::remove_file(&tar)?;
    eprintln!(
        "xtask: image: {IMAGE} in {} ({:.0} MiB) in {:.0} s",
        archive.display(),
        archive.metadata()?.len() as f64 / f64::from(1 << 20),
        t.elapsed().as_secs_f64()
    );
    Ok(archive)
}

/// A command run in `root` by chroot, with an environment of its own (the host's PIP_* and
/// the like are not the root's).
fn chroot(root: &Path) -> Command {
    let mut c = Command::new("chroot");
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .arg(root);
    c
}

/// The cached root: minbase + [`INCLUDE`] + the app's venv with `requirements`.
fn base_root(dir: &Path, requirements: &str) -> Result<PathBuf> {
    let base = dir.join(format!(
        "base-{:08x}",
        crate::vm::fnv(&format!("{INCLUDE}\n{EXCLUDE:?}\n{requirements}"))
    ));
    if base.join(".complete").exists() {
        return Ok(base);
    }
    let _ = std::fs::remove_dir_all(&base);
    let mirror = crate::vm::debian_mirror()?;
    eprintln!(
        "xtask: image: mmdebstrap bookworm (minbase + {INCLUDE}) into {}",
        base.display()
    );
    let t = Instant::now();
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap.args([
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        &format!("--include={INCLUDE}"),
    ]);
    for path in EXCLUDE {
        mmdebstrap.arg(format!("--dpkgopt=path-exclude={path}"));
    }
    run(mmdebstrap.arg("bookworm").arg(&base).arg(&mirror))?;

    // The wheels, for the root's python (not the host's), downloaded on the host.
    let out = chroot(&base)
        .args([
            "python3",
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2])",
        ])
        .output()
        .context("asking the root's python3 for its version")?;
    if !out.status.success() {
        bail!(
            "the root's python3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let wheels = base.join("tmp/wheels");
    std::fs::create_dir_all(&wheels)?;
    std::fs::write(wheels.join("requirements.txt"), requirements)?;
    // A pip of the host's (the manifest check's venv) downloads them.
    let python = crate::kube::ensure_validator()?.join("bin/python");
    let mut download = Command::new(&python);
    download.args(["-m", "pip", "download"]);
    // bookworm's glibc is 2.36: every manylinux wheel up to that (pip 23 takes the tags as
    // given, without expanding them).
    download.args(["--platform", "manylinux2014_x86_64"]);
    for minor in 5..=36 {
        download.args(["--platform", &format!("manylinux_2_{minor}_x86_64")]);
    }
    run(download
        .args([
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            &version,
            "--dest",
        ])
        .arg(&wheels)
        .arg("-r")
        .arg(wheels.join("requirements.txt")))?;
    std::fs::create_dir_all(base.join("srv/api"))?;
    run(chroot(&base).args(["python3", "-m", "venv", "/srv/api/.venv"]))?;
    run(chroot(&base).args([
        "/srv/api/.venv/bin/pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--no-index",
        "--find-links",
        "/tmp/wheels",
        "-r",
        "/tmp/wheels/requirements.txt",
    ]))?;
    // The app runs from the venv; nothing installs into it later.
    run(chroot(&base).args([
        "/srv/api/.venv/bin/python",
        "-m",
        "pip",
        "uninstall",
        "--quiet",
        "--yes",
        "pip",
        "setuptools",
    ]))?;
    std::fs::remove_dir_all(&wheels)?;
    std::fs::write(base.join(".complete"), "")?;
    eprintln!(
        "xtask: image: base root ready in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(base)
}
