//! `[agent]`: where the agent keeps its state, which files to include, the metrics endpoint and
//! the cgroup root. Every key has a default, and so has a missing table.

use std::path::PathBuf;

use serde_spanned::Spanned;

use super::includes::Pattern;
use super::source::Source;
use super::table::Table;
use crate::config::raw::RawAgent;
use crate::config::{Agent, CgroupRoot, ConfigError};

/// Included files when `[agent] include` is not written; relative to the main file's directory.
const DEFAULT_INCLUDE: &str = "apps.d/*.toml";
const DEFAULT_STATE_DIR: &str = "/run/corral";
/// Not under /run: a certificate must survive a reboot (a CA's rate limits count re-orders).
const DEFAULT_ACME_DIR: &str = "/var/lib/corral/acme";
const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/corral";

/// `[agent]` (or its defaults when the file has none), and the include patterns.
pub(super) fn convert_agent(
    src: &Source<'_>,
    raw: Option<Spanned<RawAgent>>,
) -> Result<(Agent, Vec<Pattern>), ConfigError> {
    let (t, raw) = Table::or_default(src, &["agent"], raw);

    let include = match raw.include {
        None => vec![Pattern {
            pattern: DEFAULT_INCLUDE.to_string(),
            span: None,
        }],
        Some(list) => list
            .into_inner()
            .into_iter()
            .map(|p| {
                Ok(Pattern {
                    pattern: t.string("include", &p)?,
                    span: Some(p.span()),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?,
    };
    let state_dir = match &raw.state_dir {
        Some(v) => t.absolute_path("state_dir", v)?,
        None => PathBuf::from(DEFAULT_STATE_DIR),
    };
    let acme_dir = match &raw.acme_dir {
        Some(v) => t.absolute_path("acme_dir", v)?,
        None => PathBuf::from(DEFAULT_ACME_DIR),
    };
    let bpf_pin_dir = match &raw.bpf_pin_dir {
        Some(v) => t.absolute_path("bpf_pin_dir", v)?,
        None => PathBuf::from(DEFAULT_BPF_PIN_DIR),
    };
    let control_socket = match &raw.control_socket {
        Some(v) => t.absolute_path("control_socket", v)?,
        None => state_dir.join("control.sock"),
    };
    let (metrics, metrics_at) = match &raw.metrics {
        Some(v) => (
            Some(t.socket_addr("metrics", v)?),
            Some(src.loc(v.span().start)),
        ),
        None => (None, None),
    };
    let cgroup_root = match &raw.cgroup_root {
        None => CgroupRoot::Auto,
        Some(v) if v.get_ref() == "auto" => CgroupRoot::Auto,
        Some(v) => CgroupRoot::Path(t.absolute_path("cgroup_root", v)?),
    };
    let agent = Agent {
        include: include.iter().map(|p| p.pattern.clone()).collect(),
        state_dir,
        acme_dir,
        bpf_pin_dir,
        control_socket,
        metrics,
        metrics_at,
        enforce_limits: raw.enforce_limits.unwrap_or(true),
        allow_overcommit: raw.allow_overcommit.unwrap_or(false),
        cgroup_root,
    };
    Ok((agent, include))
}
