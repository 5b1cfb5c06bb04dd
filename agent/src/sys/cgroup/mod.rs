//! cgroup v2 through cgroupfs: which hierarchy the machine has, and corral's own subtree below
//! the cgroup delegated to the agent.
//!
//! ```text
//! <root>/                  the delegated root: the agent's own cgroup (systemd: Delegate=yes)
//!   supervisor/            the agent itself (DelegateSubgroup=supervisor, or moved by `prepare`)
//!   app-<name>/            one per app, enables the needed controllers for its workers
//!     worker-<id>/         one leaf per worker: its limits, its OOM events, its process tree
//! ```
//!
//! Rules this module keeps:
//! - Nothing above the root is ever opened for writing: the root is the only directory opened
//!   by path; everything below it is reached with `openat`/`mkdirat`/`unlinkat` relative to a
//!   directory fd, with `O_NOFOLLOW`, one validated name at a time (no `/`, no `..`). Paths kept
//!   next to the fds are for messages (and inotify) only.
//! - Controllers are enabled (`+name` in `cgroup.subtree_control`) only in the root and in app
//!   cgroups, only if the root's `cgroup.controllers` offers them (offered = delegated), and only
//!   the ones asked for. Nothing is ever disabled.
//! - The no-internal-processes rule: a cgroup with processes cannot enable controllers for its
//!   children, so `prepare` first moves the root's processes into the `supervisor` leaf.
//!
//! Every error names the operation, the file and (for writes) the value.
//!
//! One file per concern: `detect` (which hierarchy, where the agent is), `controllers`, `files`
//! (the flat-keyed interface files), `names`, `node` (one directory held by fd), `root`, `app`,
//! `leaf` with `limits`, `stats` and `teardown` (kill, wait for `populated 0`, rmdir).

mod ancestry;
mod app;
mod controllers;
mod detect;
mod error;
mod files;
mod leaf;
mod limits;
mod names;
mod node;
mod root;
mod stats;
mod teardown;
#[cfg(test)]
mod tests;

pub use ancestry::{ancestor_limits, own_limits};
pub use app::App;
pub use controllers::{Controller, Controllers};
pub use detect::{
    container_cgroup, delegated, detect, parse_proc_cgroup, ContainerCgroup, Detected, Kind,
    CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC, TMPFS_MAGIC,
};
pub use error::CgroupError;
pub use files::{flat_keyed, flat_value, read_fd, CgroupEvents, EventsFile, MemoryEvents};
pub use leaf::Leaf;
pub use limits::{Limits, SkipReason, Skipped, CPU_PERIOD_USEC};
pub use names::{validate_name, SUPERVISOR};
pub use root::{Prepared, Root};
pub use stats::LeafStats;
