//! TOML files -> [`Config`]: deserialize into `raw`, then convert once, checking every value and
//! pointing every error at the file, line and column it is about.
//!
//! The only I/O here: reading the main file, expanding `[agent] include` globs, reading the
//! included files and each app's `env_file`.
//!
//! One file per concern: `source` (spans and serde errors), `values` (sizes, durations),
//! `table` (typed keys of a table), `agent`, `includes`, `endpoints` (the app set and socket
//! overlaps), `app` (one `[app.NAME]`), its sections `identity`, `env`, `workers` (counts,
//! limits, readiness) and `tls`, `concurrency` (what `steering = "auto"` reads of the command). The app a TLS front
//! becomes is `crate::front::app`'s.

mod acme;
mod agent;
mod app;
mod concurrency;
mod endpoints;
mod env;
mod identity;
mod includes;
mod source;
mod table;
mod tls;
mod values;
mod workers;

use std::path::Path;

use agent::convert_agent;
use endpoints::AppSet;
use includes::{find_includes, included_apps};
use source::Source;

use super::raw::MainFile;
use super::{Config, ConfigError, Lookup};

#[cfg(test)]
pub(super) use values::{parse_duration, parse_size};

pub use acme::LETS_ENCRYPT;

/// Reads and validates the main config file at `path` and every file it includes.
pub fn load(path: &Path, lookup: &dyn Lookup) -> Result<Config, ConfigError> {
    let text = read(path)?;
    load_str(path, &text, lookup)
}

/// Like [`load`], with the main file's contents given as `text`. Included files and `env_file`s
/// are still read from disk, relative to `path`'s directory.
pub fn load_str(path: &Path, text: &str, lookup: &dyn Lookup) -> Result<Config, ConfigError> {
    let main = Source::new(path, text);
    let file: MainFile = main.parse()?;
    let (agent, include) = convert_agent(&main, file.agent)?;

    let mut apps = AppSet::new(lookup);
    if let (Some(addr), Some(at)) = (agent.metrics, &agent.metrics_at) {
        apps.endpoints
            .add(addr, at.clone(), "`metrics` in [agent]".to_string());
    }
    apps.add(&main, file.app)?;

    let mut files = vec![path.to_path_buf()];
    for included in find_includes(&main, &include)? {
        let text = read(&included)?;
        let src = Source::new(&included, &text);
        apps.add(&src, included_apps(&src, path)?)?;
        files.push(included);
    }

    apps.set_acme_dir(&agent.acme_dir);
    Ok(Config {
        files,
        agent,
        apps: apps.finish()?,
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::nowhere(format!("cannot read {}: {e}", path.display())))
}
