//! Config loading: valid files round-trip into the expected values, and every malformed file
//! yields an error at the right file, line and column.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::load::{parse_duration, parse_size};
use super::*;
use crate::front::app::front_app;

mod acme;
mod apps;
mod env;
mod errors;
mod includes;
mod limits;
mod listen;
mod round_trip;
mod tls;
mod units;
mod workers;

/// A machine with the users root, api and nobody and the groups root, api and nogroup.
struct FakeLookup;

impl Lookup for FakeLookup {
    fn user(&self, name: &str) -> Option<(u32, u32)> {
        match name {
            "root" => Some((0, 0)),
            "api" => Some((1000, 1000)),
            "nobody" => Some((65534, 65534)),
            _ => None,
        }
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        match gid {
            0 => Some("root".into()),
            1000 => Some("api".into()),
            65534 => Some("nogroup".into()),
            _ => None,
        }
    }

    fn group(&self, name: &str) -> Option<u32> {
        match name {
            "root" => Some(0),
            "api" => Some(1000),
            "nogroup" => Some(65534),
            _ => None,
        }
    }
}

/// A main file in a directory that does not exist, so the default include matches nothing.
const MAIN: &str = "/nonexistent-corral-test/corral.toml";

fn load_text(text: &str) -> Result<Config, ConfigError> {
    load_str(Path::new(MAIN), text, &FakeLookup)
}

fn err(text: &str) -> ConfigError {
    match load_text(text) {
        Ok(c) => panic!("expected an error, got {c:#?}\nfor:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts that loading `text` fails at `MAIN:{at}` with a message containing `part`.
fn assert_err(text: &str, at: &str, part: &str) -> ConfigError {
    let e = err(text);
    let shown = e.to_string();
    let prefix = format!("{MAIN}:{at}: ");
    assert!(
        shown.starts_with(&prefix),
        "expected prefix {prefix:?}, got {shown:?}\nfor:\n{text}"
    );
    assert!(
        shown.contains(part),
        "expected {part:?} in {shown:?}\nfor:\n{text}"
    );
    e
}

/// A valid app with one extra line in `[app.api]` (line 4) and `tail` from line 7 on, which
/// continues `[app.api.listen]` unless it opens a table of its own.
fn app(extra: &str, tail: &str) -> String {
    assert!(!extra.contains('\n'));
    format!(
        "[app.api]\ncommand = [\"/bin/serve\"]\nuser = \"api\"\n{extra}\n\
         [app.api.listen]\naddress = \"127.0.0.1:8000\"\n{tail}"
    )
}

fn loc(file: &str, line: usize, col: usize) -> Location {
    Location {
        file: PathBuf::from(file),
        line,
        col,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// [`app`] with `body` as its `[app.api.workers]` table (line 7, so the first key of `body` is on
/// line 8).
fn with_workers(body: &str) -> String {
    app("", &format!("[app.api.workers]\n{body}\n"))
}

/// [`app`] with `body` as its `[app.api.restart]` table (first key on line 8).
fn with_restart(body: &str) -> String {
    app("", &format!("[app.api.restart]\n{body}\n"))
}

/// [`app`] with `command = {command}` (line 2) in place of `["/bin/serve"]`.
fn with_command(command: &str) -> String {
    app("", "").replace("[\"/bin/serve\"]", command)
}

/// The workers of app `api` with `body` in its `[app.api.workers]`.
fn workers(body: &str) -> Workers {
    api(&load_text(&with_workers(body)).unwrap())
        .workers
        .clone()
}

fn workers_err(body: &str, at: &str, part: &str) -> ConfigError {
    assert_err(&with_workers(body), at, part)
}

fn restart_err(body: &str, at: &str, part: &str) -> ConfigError {
    assert_err(&with_restart(body), at, part)
}

/// The app `api` of a loaded config.
fn api(c: &Config) -> &App {
    &c.apps[&AppName::new("api").unwrap()]
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-config-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
