//! Users and groups from the system's databases (NSS), for config validation.

use crate::config::Lookup;

/// [`Lookup`] backed by getpwnam_r/getgrnam_r.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn user(&self, name: &str) -> Option<(u32, u32)> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(|g| g.name)
    }

    fn group(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Home directory and login shell of a uid, for the worker's HOME/SHELL.
pub fn home_and_shell(uid: u32) -> Option<(String, String)> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| {
            (
                u.dir.to_string_lossy().into_owned(),
                u.shell.to_string_lossy().into_owned(),
            )
        })
}
