//! `user` and `group`: who an app's workers (or its TLS front) run as.

use super::table::Table;
use crate::config::raw::Str;
use crate::config::{AppName, ConfigError, Identity, Lookup};

/// Who an app's processes run as: `user` (required: never root by default) and `group` (the
/// user's primary group by default), both checked against this machine.
pub(super) fn identity(
    t: &Table<'_>,
    lookup: &dyn Lookup,
    name: &AppName,
    user: Option<&Str>,
    group: Option<&Str>,
) -> Result<Identity, ConfigError> {
    let user_v = user.ok_or_else(|| {
        t.src
            .error(
                t.span.clone(),
                format!(
                    "app `{name}` has no `user`: workers never run as root unless \
                     `user = \"root\"` is written"
                ),
            )
            .with_hint(format!(
                "add `user = \"{name}\"` (an existing system user) to {}",
                t.section
            ))
    })?;
    let user = t.string("user", user_v)?;
    let (uid, primary_gid) = lookup.user(&user).ok_or_else(|| {
        t.src
            .error(
                user_v.span(),
                format!("user `{user}` does not exist on this machine"),
            )
            .with_hint(format!(
                "create it with `useradd --system {user}`, or name an existing user"
            ))
    })?;
    let (group, gid) = match group {
        Some(v) => {
            let group = t.string("group", v)?;
            let gid = lookup.group(&group).ok_or_else(|| {
                t.src
                    .error(
                        v.span(),
                        format!("group `{group}` does not exist on this machine"),
                    )
                    .with_hint(format!(
                        "create it with `groupadd --system {group}`, or leave `group` out to \
                         use the user's primary group"
                    ))
            })?;
            (group, gid)
        }
        None => (
            lookup
                .group_name(primary_gid)
                .unwrap_or_else(|| primary_gid.to_string()),
            primary_gid,
        ),
    };
    Ok(Identity {
        user,
        uid,
        group,
        gid,
    })
}
