//! An ACME front's state under `[agent] acme_dir`: `<app>/` (root, 0700) holds `account.json`
//! (the account's key and URL, and the directory it belongs to), `cert.pem` and `key.pem`
//! (0600), each written to a temporary file and renamed (a crash leaves the old file or the
//! new one, never half); `<app>.challenges/` (0700, the front's user) holds the challenge
//! answers the ACME process writes and the fronts read. `acme_dir` itself is made 0711 (an
//! existing one keeps its mode, but must be searchable): the fronts may pass through it to
//! their challenge directory, not list it.

use std::fs::{self, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Acme;

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// Make the directories (root's, and the challenge directory of user `uid`:`gid`), with
/// their modes, whatever they were.
pub fn prepare(acme: &Acme, uid: u32, gid: u32) -> Result<(), String> {
    let parent = acme.dir.parent().ok_or("acme_dir has no parent")?;
    if !parent.is_dir() {
        fs::create_dir_all(parent).map_err(io(parent))?;
        fs::set_permissions(parent, Permissions::from_mode(0o711)).map_err(io(parent))?;
    }
    // An existing acme_dir keeps its mode (it may be a directory of the operator's), but the
    // fronts must be able to pass through it to their challenge directory.
    let mode = fs::metadata(parent)
        .map_err(io(parent))?
        .permissions()
        .mode();
    if mode & 0o001 == 0 {
        return Err(format!(
            "acme_dir {} (mode {:o}) is not searchable by the front's user: the fronts read \
             their challenge answers below it (chmod o+x, or let corral create it)",
            parent.display(),
            mode & 0o777
        ));
    }
    for (d, mode) in [(&acme.dir, 0o700), (&acme.challenge_dir(), 0o700)] {
        if !d.is_dir() {
            fs::create_dir(d).map_err(io(d))?;
        }
        fs::set_permissions(d, Permissions::from_mode(mode)).map_err(io(d))?;
    }
    let ch = acme.challenge_dir();
    std::os::unix::fs::chown(&ch, Some(uid), Some(gid)).map_err(io(&ch))?;
    Ok(())
}

/// Write `bytes` to `path` (0600) atomically: a temporary file beside it, synced, renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = path.file_name().ok_or("no file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// The stored account, if it belongs to `directory` (another CA needs another account).
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredAccount {
    pub directory: String,
    pub credentials: serde_json::Value,
}

pub fn read_account(acme: &Acme) -> Option<serde_json::Value> {
    let bytes = fs::read(acme.dir.join("account.json")).ok()?;
    let stored: StoredAccount = serde_json::from_slice(&bytes).ok()?;
    (stored.directory == acme.directory).then_some(stored.credentials)
}

pub fn write_account(acme: &Acme, credentials: serde_json::Value) -> Result<(), String> {
    let stored = StoredAccount {
        directory: acme.directory.clone(),
        credentials,
    };
    let bytes = serde_json::to_vec_pretty(&stored).map_err(|e| e.to_string())?;
    write_atomic(&acme.dir.join("account.json"), &bytes)
}

/// The certificate chain and key in service, if any.
pub fn read_cert(acme: &Acme) -> Option<(String, String)> {
    let pair = acme.cert_pair();
    Some((
        fs::read_to_string(pair.cert).ok()?,
        fs::read_to_string(pair.key).ok()?,
    ))
}

/// Store a checked certificate: the key first, then the chain (the certificate watch reads
/// both once the chain is there).
pub fn write_cert(acme: &Acme, chain_pem: &str, key_pem: &str) -> Result<(), String> {
    let pair = acme.cert_pair();
    write_atomic(&pair.key, key_pem.as_bytes())?;
    write_atomic(&pair.cert, chain_pem.as_bytes())
}
