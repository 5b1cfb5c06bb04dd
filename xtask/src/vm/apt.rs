//! apt-get for the VM tiers: the machine's own configuration, or a private one under
//! target/vm/apt-<suite> (its own sources, lists, cache and status) for another Debian release,
//! so that the machine's apt sources are never changed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod sources;

pub use sources::debian_mirror;

/// `apt-get download PACKAGE` of trixie into `dir`, through the private apt configuration
/// under `vm_dir/apt-trixie` (fresh package lists each time: only called on a cache miss).
pub fn download_trixie(vm_dir: &Path, dir: &Path, package: &str) -> Result<()> {
    Apt::private(vm_dir, "trixie")?.download(dir, package)
}

/// How apt-get is run: the machine's configuration, or a private one for another release.
pub(super) struct Apt {
    pub(super) private: bool,
    options: Vec<String>,
}

impl Apt {
    pub(super) fn system() -> Apt {
        Apt {
            private: false,
            // Downloads land in target/, which apt's unprivileged _apt user may not reach.
            options: vec!["-o".into(), "APT::Sandbox::User=root".into()],
        }
    }

    /// A private apt configuration for `suite` of the machine's Debian archive under
    /// `vm_dir/apt-<suite>`, with fresh package lists.
    pub(super) fn private(vm_dir: &Path, suite: &str) -> Result<Apt> {
        let mirror = debian_mirror()?;
        let dir = vm_dir.join(format!("apt-{suite}"));
        let parts = dir.join("etc/sources.list.d");
        for d in [
            parts.clone(),
            dir.join("lists/partial"),
            dir.join("cache/archives/partial"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(dir.join("etc/sources.list"), "")?;
        std::fs::write(dir.join("status"), "")?;
        let mut options: Vec<String> = [
            format!(
                "Dir::Etc::SourceList={}",
                dir.join("etc/sources.list").display()
            ),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            format!("Dir::State::Status={}", dir.join("status").display()),
            format!(
                "Dir::State::extended_states={}",
                dir.join("extended_states").display()
            ),
            "APT::Sandbox::User=root".into(),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();

        // The archive key that signs `suite`: Debian's keyring normally has it; the
        // release-specific keyrings are the fallback.
        let mut keyrings = vec![PathBuf::from(
            "/usr/share/keyrings/debian-archive-keyring.gpg",
        )];
        if let Ok(entries) = std::fs::read_dir("/usr/share/keyrings") {
            let mut extra: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("debian-archive-{suite}-")) && n.ends_with(".gpg")
                    })
                })
                .collect();
            extra.sort();
            keyrings.extend(extra);
        }
        let sources = parts.join(format!("{suite}.sources"));
        let mut failures = Vec::new();
        for keyring in keyrings.iter().filter(|k| k.is_file()) {
            std::fs::write(
                &sources,
                format!(
                    "# Written by `cargo xtask vm-test`: {suite}'s kernel for the VM tier.\n\
                     Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
                     Signed-By: {}\n",
                    keyring.display()
                ),
            )?;
            eprintln!(
                "xtask: vm: apt-get update for {suite} from {mirror} (private configuration in \
                 {}, key {})",
                dir.display(),
                keyring.display()
            );
            match update(&options, &dir, suite) {
                Ok(()) => {
                    return Ok(Apt {
                        private: true,
                        options,
                    })
                }
                Err(e) => failures.push(format!("with {}: {e:#}", keyring.display())),
            }
        }

        if failures.is_empty() {
            bail!("none of the keyrings {keyrings:?} exists: install debian-archive-keyring");
        }
        if !failures.iter().all(|f| is_signature_problem(f)) {
            bail!(
                "apt-get update for {suite} from {mirror} failed for another reason than a \
                 missing key (network? mirror?): {}",
                failures.join("; ")
            );
        }
        // Last resort: no signature check at all. Loud, because it is a downgrade.
        eprintln!(
            "\nxtask: vm: WARNING: no keyring on this machine verifies {suite} ({}).\n\
             xtask: vm: WARNING: downloading {suite}'s kernel WITHOUT SIGNATURE CHECKS \
             (Acquire::AllowInsecureRepositories); install a newer debian-archive-keyring to \
             avoid this.\n",
            failures.join("; ")
        );
        std::fs::write(
            &sources,
            format!(
                "# Written by `cargo xtask vm-test`: {suite}'s kernel for the VM tier, \
                 UNVERIFIED.\nTypes: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n"
            ),
        )?;
        options.extend(
            [
                "Acquire::AllowInsecureRepositories=true",
                "APT::Get::AllowUnauthenticated=true",
            ]
            .into_iter()
            .flat_map(|o| ["-o".to_string(), o.to_string()]),
        );
        update(&options, &dir, suite).with_context(|| {
            format!(
                "cannot fetch {suite}'s package lists from {mirror}, even without signature \
                 checks (earlier attempts: {})",
                failures.join("; ")
            )
        })?;
        Ok(Apt {
            private: true,
            options,
        })
    }

    /// `apt-get download PACKAGE` into `dir`.
    pub(super) fn download(&self, dir: &Path, package: &str) -> Result<()> {
        let mut cmd = Command::new("apt-get");
        cmd.args(&self.options)
            .args(["download", "-q", package])
            .current_dir(dir);
        eprintln!(
            "xtask: vm: apt-get download {package} (into {})",
            dir.display()
        );
        let out = cmd.output().context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get download {package} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// `apt-get update` with a private configuration; fails unless the suite's package list
/// arrived, verified.
fn update(options: &[String], dir: &Path, suite: &str) -> Result<()> {
    let out = Command::new("apt-get")
        .args(options)
        .args(["update", "-q"])
        .output()
        .context("running apt-get update")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("GPG error") || stderr.contains("NO_PUBKEY") {
        bail!(
            "apt-get update failed ({}): {}",
            out.status,
            stderr.trim().replace('\n', " / ")
        );
    }
    let has_list = std::fs::read_dir(dir.join("lists"))?
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.contains(&format!("_dists_{suite}_main_binary-amd64_Packages")))
        });
    if !has_list {
        bail!(
            "apt-get update left no {suite} main amd64 package list in {}",
            dir.join("lists").display()
        );
    }
    Ok(())
}

/// Whether apt's complaint is about the archive's signature (a key this machine lacks).
fn is_signature_problem(msg: &str) -> bool {
    [
        "NO_PUBKEY",
        "GPG error",
        "is not signed",
        "EXPKEYSIG",
        "signature",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_problems_are_told_apart_from_network_ones() {
        assert!(is_signature_problem(
            "W: GPG error: http://a.example trixie InRelease: The following signatures couldn't \
             be verified because the public key is not available: NO_PUBKEY 762F67A0B2C39DE4"
        ));
        assert!(!is_signature_problem(
            "E: Failed to fetch http://a.example/dists/trixie/InRelease  Could not resolve \
             'a.example'"
        ));
    }
}
