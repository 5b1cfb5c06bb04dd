//! The .deb and the .rpm that `cargo xtask package` builds (`cargo xtask test` builds them
//! first): file lists, configuration flags and maintainer scripts, read with Debian's dpkg-deb
//! and rpm. Installing the .deb for real, under systemd, is the VM system tier's job.

use std::path::PathBuf;
use std::process::Command;

fn package(ext: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/package");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == ext))
        .unwrap_or_else(|| {
            panic!(
                "no .{ext} in {}: build the packages with `cargo xtask package` (cargo xtask \
                 test does it first)",
                dir.display()
            )
        })
}

fn out(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const FILES: &[&str] = &[
    "/usr/bin/corral",
    "/etc/corral/corral.toml",
    "/etc/corral/apps.d/example.toml",
    "/usr/lib/sysusers.d/corral.conf",
    "/usr/lib/tmpfiles.d/corral.conf",
    "/etc/modules-load.d/corral.conf",
    "/usr/share/bash-completion/completions/corral",
    "/usr/share/fish/vendor_completions.d/corral.fish",
    "/usr/share/man/man1/corral.1.gz",
    "/usr/share/corral/systemd-before-254.conf",
];

#[test]
fn the_rpm_holds_the_files_config_flags_and_scriptlets() {
    let rpm = package("rpm");
    let list = out(Command::new("rpm").arg("-qlp").arg(&rpm));
    for f in FILES.iter().chain(&[
        "/usr/lib/systemd/system/corral.service",
        "/usr/share/zsh/site-functions/_corral",
    ]) {
        assert!(list.lines().any(|l| l == *f), "{f} not in the rpm:\n{list}");
    }
    // %config(noreplace): FILEFLAGS shows c (config) and n (noreplace).
    let flags = out(Command::new("rpm")
        .args(["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]"])
        .arg(&rpm));
    for conf in [
        "/etc/corral/corral.toml",
        "/etc/corral/apps.d/example.toml",
        "/etc/modules-load.d/corral.conf",
    ] {
        let line = flags
            .lines()
            .find(|l| l.starts_with(&format!("{conf} ")))
            .unwrap_or_else(|| panic!("{conf}: {flags}"));
        let f = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            f.contains('c') && f.contains('n'),
            "{conf} is not %config(noreplace): {line}"
        );
    }
    let bin = flags
        .lines()
        .find(|l| l.starts_with("/usr/bin/corral "))
        .expect("binary");
    assert!(
        !bin.rsplit(' ').next().unwrap_or_default().contains('c'),
        "{bin}"
    );
    let scripts = out(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    for want in [
        "postinstall scriptlet",
        "systemctl enable --now corral.service",
        "systemctl try-restart corral.service",
        "/usr/bin/corral reexec",
        "preuninstall scriptlet",
        "systemctl disable --now corral.service",
        "postuninstall scriptlet",
        "systemd-sysusers corral.conf",
        "ln -sf /usr/share/corral/systemd-before-254.conf",
        "-lt 254",
    ] {
        assert!(scripts.contains(want), "{want:?} missing:\n{scripts}");
    }
    let requires = out(Command::new("rpm").args(["-qpR"]).arg(&rpm));
    assert!(requires.contains("systemd"), "{requires}");
}

#[test]
fn the_deb_holds_the_files_conffiles_and_maintainer_scripts() {
    let deb = package("deb");
    let list = out(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for f in FILES.iter().chain(&[
        "/lib/systemd/system/corral.service",
        "/usr/share/zsh/vendor-completions/_corral",
    ]) {
        assert!(
            list.lines().any(|l| l.ends_with(&format!(".{f}"))),
            "{f} not in the deb:\n{list}"
        );
    }
    let conffiles = out(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    for conf in [
        "/etc/corral/corral.toml",
        "/etc/corral/apps.d/example.toml",
        "/etc/modules-load.d/corral.conf",
    ] {
        assert!(
            conffiles.lines().any(|l| l.trim() == conf),
            "{conf}:\n{conffiles}"
        );
    }
    let info = out(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert!(
        info.contains("Depends:") && info.contains("systemd"),
        "{info}"
    );
    let postinst = out(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postinst"));
    for want in [
        "deb-systemd-helper enable corral.service",
        "/usr/bin/corral reexec",
        "try-restart",
        "systemd-sysusers",
        "ln -sf /usr/share/corral/systemd-before-254.conf",
        "-lt 254",
    ] {
        assert!(postinst.contains(want), "{want}:\n{postinst}");
    }
    let postrm = out(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postrm"));
    assert!(postrm.contains("rm -rf /etc/corral"), "{postrm}");
    assert!(
        postrm.contains("rm -f /etc/systemd/system/corral.service.d/10-systemd-before-254.conf"),
        "{postrm}"
    );
    let prerm = out(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("prerm"));
    assert!(prerm.contains("stop corral.service"), "{prerm}");
}

#[test]
fn the_shipped_config_passes_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let corral = root.join("target/release/corral");
    let corral = if corral.exists() {
        corral
    } else {
        corral_tests::bin("corral")
    };
    // The shipped main file includes /etc/corral/apps.d: point it at the shipped example.
    let dir = corral_tests::TempDir::new("shipped");
    let apps = dir.path().join("apps.d");
    std::fs::create_dir_all(&apps).expect("dir");
    std::fs::copy(
        root.join("packaging/etc/apps.d/example.toml"),
        apps.join("example.toml"),
    )
    .expect("copy");
    let main = std::fs::read_to_string(root.join("packaging/etc/corral.toml"))
        .expect("shipped config")
        .replace("/etc/corral/apps.d", &apps.display().to_string());
    let path = dir.path().join("corral.toml");
    std::fs::write(&path, main).expect("write");
    let o = Command::new(corral)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("corral check");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
