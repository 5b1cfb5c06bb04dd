//! TOML files -> [`Config`]: deserialize into `raw`, then convert once, checking every value and
//! pointing every error at the file, line and column it is about.
//!
//! The only I/O here: reading the main file, expanding `[agent] include` globs, reading the
//! included files and each app's `env_file`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use super::raw::{self, Scalar, Str, StrList};
use super::{
    Agent, App, AppName, ByteSize, CertPair, CgroupRoot, Config, ConfigError, Identity, KtlsMode,
    Listen, Location, Lookup, PreStart, Ready, Restart, RestartMode, Role, Steering, Tls,
    WorkerCount, Workers,
};

/// Included files when `[agent] include` is not written; relative to the main file's directory.
const DEFAULT_INCLUDE: &str = "apps.d/*.toml";
const DEFAULT_STATE_DIR: &str = "/run/corral";
const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/corral";
const DEFAULT_BACKLOG: i64 = 1024;
const MAX_WORKERS: i64 = 1024;

/// Environment variables corral sets for every worker; an app may not set them.
const RESERVED_ENV: [&str; 8] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "CORRAL_APP",
    "CORRAL_WORKER",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Reads and validates the main config file at `path` and every file it includes.
pub fn load(path: &Path, lookup: &dyn Lookup) -> Result<Config, ConfigError> {
    let text = read(path)?;
    load_str(path, &text, lookup)
}

/// Like [`load`], with the main file's contents given as `text`. Included files and `env_file`s
/// are still read from disk, relative to `path`'s directory.
pub fn load_str(path: &Path, text: &str, lookup: &dyn Lookup) -> Result<Config, ConfigError> {
    let main = Source::new(path, text);
    let file: raw::MainFile = main.parse()?;
    let (agent, include, metrics_at) = convert_agent(&main, file.agent)?;

    let mut apps = AppSet {
        lookup,
        apps: BTreeMap::new(),
        endpoints: Vec::new(),
    };
    if let (Some(addr), Some(at)) = (agent.metrics, metrics_at) {
        apps.endpoints.push(Endpoint {
            addr,
            at,
            what: "`metrics` in [agent]".to_string(),
            worker_socket: false,
        });
    }
    apps.add(&main, file.app)?;

    let mut files = vec![path.to_path_buf()];
    for included in find_includes(&main, &include)? {
        let text = read(&included)?;
        let src = Source::new(&included, &text);
        let file: raw::IncludedFile = src.parse()?;
        if let Some(agent) = file.agent {
            return Err(src
                .error(
                    agent.span(),
                    "[agent] belongs in the main file, not in an included file",
                )
                .with_hint(format!(
                    "move this table to {}; included files hold [app.NAME] tables only",
                    path.display()
                )));
        }
        apps.add(&src, file.app)?;
        files.push(included);
    }
    apps.check_endpoints()?;
    apps.add_fronts()?;

    Ok(Config {
        files,
        agent,
        apps: apps.apps,
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::nowhere(format!("cannot read {}: {e}", path.display())))
}

// ---------------------------------------------------------------------------------------------
// Sources, locations and serde errors

/// One config file's text, for turning byte spans into locations.
struct Source<'a> {
    file: &'a Path,
    /// Relative paths written in this file (include, env_file, cert, key) are relative to this.
    dir: PathBuf,
    text: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            file,
            dir,
            text,
            line_starts,
        }
    }

    /// The 1-based line and column (in characters) of a byte offset.
    fn loc(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.line_starts.get(line).copied().unwrap_or(0);
        let col = match self.text.get(start..offset) {
            Some(s) => s.chars().filter(|&c| c != '\u{feff}').count(),
            None => offset - start,
        };
        Location {
            file: self.file.to_path_buf(),
            line: line + 1,
            col: col + 1,
        }
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.loc(span.start), message)
    }

    /// A path written in this file, made absolute against the file's directory.
    fn resolve(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let doc = DeTable::parse(self.text).map_err(|e| self.syntax_error(&e))?;
        T::deserialize(toml::de::Deserializer::from(doc)).map_err(|e| self.serde_error(&e))
    }

    fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().replace('\n', "; ");
        if message == "duplicate key" {
            let at = self.loc(span.start);
            let line = self
                .text
                .lines()
                .nth(at.line - 1)
                .unwrap_or_default()
                .trim();
            let name = self.text.get(span.clone()).unwrap_or_default();
            if line.starts_with('[') {
                let header = match line.rfind(']') {
                    Some(end) => &line[..=end],
                    None => line,
                };
                return ConfigError::at(at, format!("table {header} is defined twice"))
                    .with_hint("a table can be written only once per file; merge the two");
            }
            return ConfigError::at(at, format!("key `{name}` is defined twice"));
        }
        ConfigError::at(self.loc(span.start), format!("invalid TOML: {message}"))
    }

    /// Rewrites serde's messages ("unknown field", "invalid type") in corral's words, naming
    /// the key and table they are about.
    fn serde_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().replace('\n', "; ");
        let Some(span) = e.span() else {
            return ConfigError::at(self.loc(0), message);
        };
        let found = DeTable::parse(self.text)
            .ok()
            .and_then(|doc| find_span(doc.get_ref(), &span, &mut Vec::new()));
        let err = |m: String| self.error(span.clone(), m);

        if let Some(rest) = message.strip_prefix("unknown field `") {
            let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            let place = match &found {
                Some(f) => place(&section(&f.parent)),
                None => String::new(),
            };
            let mut out = err(format!("unknown key `{name}`{place}"));
            let list = valid
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ");
            out.hint = match (closest(name, &valid), valid.is_empty()) {
                (Some(near), _) => Some(format!("did you mean `{near}`? valid keys: {list}")),
                (None, false) => Some(format!("valid keys: {list}")),
                (None, true) => Some("this table takes no keys".to_string()),
            };
            return out;
        }

        let Some(f) = found else {
            return err(message);
        };
        if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or(rest);
            let mut path = f.parent.clone();
            path.push(Seg::Key(f.key.clone()));
            if f.item {
                path.push(Seg::Index);
            }
            return err(format!("missing key `{name}` in {}", section(&path)));
        }
        let what = if f.item {
            format!("each item of `{}`{}", f.key, place(&section(&f.parent)))
        } else {
            format!("`{}`{}", f.key, place(&section(&f.parent)))
        };
        let body = message
            .strip_prefix("invalid type: ")
            .or_else(|| message.strip_prefix("invalid value: "))
            .and_then(|m| m.rsplit_once(", expected "));
        let Some((unexpected, expected)) = body else {
            return err(format!("{what}: {message}"));
        };
        let (expected, unexpected) = (plain_expected(expected), plain_unexpected(unexpected));
        let mut out = err(format!("{what}: expected {expected}, found {unexpected}"));
        if f.key == "pre_start" && unexpected == "a table" {
            let mut path = f.parent.clone();
            path.push(Seg::Key(f.key.clone()));
            path.push(Seg::Index);
            out.hint = Some(format!(
                "write each step as {} (double brackets)",
                section(&path)
            ));
        }
        out
    }
}

/// serde's names for expected types, in the words of a TOML user.
fn plain_expected(e: &str) -> String {
    match e {
        "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" => "an integer".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        _ if e.starts_with("struct ") => "a table".to_string(),
        _ => e.to_string(),
    }
}

fn plain_unexpected(u: &str) -> String {
    match u {
        "map" => "a table".to_string(),
        "sequence" => "an array".to_string(),
        _ => u.to_string(),
    }
}

/// A step in a path through the document: a key, or an element of an array of tables.
#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index,
}

/// Where a span is: the key it belongs to and the path of the table holding that key.
struct Found {
    parent: Vec<Seg>,
    key: String,
    /// The span is an element of the array under `key`.
    item: bool,
}

/// Finds the key whose name or value has exactly this span.
fn find_span(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<Seg>) -> Option<Found> {
    for (k, v) in table.iter() {
        if k.span() == *span || v.span() == *span {
            return Some(Found {
                parent: path.clone(),
                key: k.get_ref().to_string(),
                item: false,
            });
        }
        path.push(Seg::Key(k.get_ref().to_string()));
        let hit = match v.get_ref() {
            DeValue::Table(t) => find_span(t, span, path),
            DeValue::Array(items) => find_in_array(items, k.get_ref(), span, path),
            _ => None,
        };
        path.pop();
        if hit.is_some() {
            return hit;
        }
    }
    None
}

/// `path` ends with the array's key.
fn find_in_array(
    items: &[Spanned<DeValue<'_>>],
    key: &str,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
) -> Option<Found> {
    for item in items {
        if item.span() == *span {
            let mut parent = path.clone();
            parent.pop();
            return Some(Found {
                parent,
                key: key.to_string(),
                item: true,
            });
        }
        if let DeValue::Table(t) = item.get_ref() {
            path.push(Seg::Index);
            let hit = find_span(t, span, path);
            path.pop();
            if hit.is_some() {
                return hit;
            }
        }
    }
    None
}

/// `[app.api.workers]`, `[[app.api.pre_start]]`, or "" for the top level.
fn section(path: &[Seg]) -> String {
    let keys: Vec<String> = path
        .iter()
        .filter_map(|s| match s {
            Seg::Key(k) => Some(toml_key(k)),
            Seg::Index => None,
        })
        .collect();
    if keys.is_empty() {
        return String::new();
    }
    match path.last() {
        Some(Seg::Index) => format!("[[{}]]", keys.join(".")),
        _ => format!("[{}]", keys.join(".")),
    }
}

/// " in [app.api]", or " at the top level".
fn place(section: &str) -> String {
    if section.is_empty() {
        " at the top level".to_string()
    } else {
        format!(" in {section}")
    }
}

/// A key as it would be written in a table header.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

/// The valid key closest to a misspelt one, if any is close.
fn closest<'k>(name: &str, valid: &[&'k str]) -> Option<&'k str> {
    valid
        .iter()
        .map(|v| (edit_distance(name, v), *v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 4) && *d < v.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Sizes and durations

/// Why a size or duration string is wrong, and how to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bad {
    pub message: String,
    pub hint: Option<String>,
}

impl Bad {
    fn new(message: impl Into<String>, hint: Option<String>) -> Self {
        Bad {
            message: message.into(),
            hint,
        }
    }
}

const SIZE_UNITS_HINT: &str = "sizes use binary units KiB, MiB, GiB, TiB";

/// Parses `"1GiB"`, `"900MiB"`, `"1.5GiB"`, `"512"` or `"512B"` into bytes.
pub(super) fn parse_size(s: &str) -> Result<u64, Bad> {
    let t = s.trim();
    let number_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..number_len], t[number_len..].trim());
    if t.starts_with('-') {
        return Err(Bad::new(
            format!("a size cannot be negative, found {s:?}"),
            None,
        ));
    }
    let example = Some(format!(
        "write a number and a unit, e.g. \"512MiB\"; {SIZE_UNITS_HINT}"
    ));
    if number.is_empty() {
        return Err(Bad::new(
            format!("expected a size such as \"512MiB\", found {s:?}"),
            example,
        ));
    }
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => {
            let lower = unit.to_ascii_lowercase();
            let binary = match lower.chars().next() {
                Some('k') => Some("KiB"),
                Some('m') => Some("MiB"),
                Some('g') => Some("GiB"),
                Some('t') => Some("TiB"),
                _ => None,
            };
            return Err(match binary {
                Some(b) if matches!(&lower[1..], "" | "b" | "i" | "ib") => Bad::new(
                    format!("unknown size unit `{unit}` in {s:?}"),
                    Some(format!("did you mean `{number}{b}`? {SIZE_UNITS_HINT}")),
                ),
                _ => Bad::new(format!("unknown size unit `{unit}` in {s:?}"), example),
            });
        }
    };
    let value = decimal_times(number, u128::from(scale)).ok_or_else(|| {
        Bad::new(
            format!("expected a size such as \"512MiB\", found {s:?}"),
            example,
        )
    })?;
    u64::try_from(value).map_err(|_| Bad::new(format!("size {s:?} is too large"), None))
}

/// `number` (digits with at most one `.`) times `scale`, rounded down; `None` if malformed.
fn decimal_times(number: &str, scale: u128) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let digits = |d: &str| -> Option<u128> {
        if d.is_empty() {
            Some(0)
        } else {
            d.parse::<u128>().ok()
        }
    };
    // Beyond 18 fractional digits nothing changes at nanosecond or byte precision.
    let frac = &frac[..frac.len().min(18)];
    let whole = digits(int)?.checked_mul(scale)?;
    let part = digits(frac)?.checked_mul(scale)? / 10u128.pow(frac.len() as u32);
    whole.checked_add(part)
}

const DURATION_UNITS_HINT: &str = "durations use the units ms, s, m and h, e.g. \"1m30s\"";

/// Parses `"100ms"`, `"30s"`, `"5m"`, `"1h"`, `"1m30s"` (and decimals such as `"1.5s"`).
pub(super) fn parse_duration(s: &str) -> Result<Duration, Bad> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Bad::new(
            "a duration cannot be empty",
            Some("write e.g. \"30s\"".into()),
        ));
    }
    if t.starts_with('-') {
        return Err(Bad::new(
            format!("a duration cannot be negative, found {s:?}"),
            None,
        ));
    }
    let mut rest = t;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(n);
        let u = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(u);
        rest = after.trim_start();
        if number.is_empty() {
            return Err(Bad::new(
                format!("expected a duration such as \"30s\", found {s:?}"),
                Some(DURATION_UNITS_HINT.into()),
            ));
        }
        let scale: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(Bad::new(
                    format!("duration {s:?} has no unit"),
                    Some(format!("write `{number}s`; {DURATION_UNITS_HINT}")),
                ))
            }
            _ => {
                return Err(Bad::new(
                    format!("unknown duration unit `{unit}` in {s:?}"),
                    Some(DURATION_UNITS_HINT.into()),
                ))
            }
        };
        let part = decimal_times(number, scale).ok_or_else(|| {
            Bad::new(
                format!("expected a duration such as \"30s\", found {s:?}"),
                Some(DURATION_UNITS_HINT.into()),
            )
        })?;
        nanos = nanos
            .checked_add(part)
            .ok_or_else(|| Bad::new(format!("duration {s:?} is too long"), None))?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000)
        .map_err(|_| Bad::new(format!("duration {s:?} is too long"), None))?;
    // The remainder of a division by 10^9 fits in u32.
    let sub = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

// ---------------------------------------------------------------------------------------------
// Converting tables

/// A table being converted: where it is, for errors about its keys.
struct Table<'s> {
    src: &'s Source<'s>,
    /// `[app.api.workers]`.
    section: String,
    span: Range<usize>,
}

impl<'s> Table<'s> {
    fn new(src: &'s Source<'s>, path: &[&str], span: Range<usize>) -> Self {
        let path: Vec<Seg> = path.iter().map(|k| Seg::Key(k.to_string())).collect();
        Table {
            src,
            section: section(&path),
            span,
        }
    }

    /// The same, for an element of an array of tables (`[[app.api.pre_start]]`).
    fn array_item(src: &'s Source<'s>, path: &[&str], span: Range<usize>) -> Self {
        let mut path: Vec<Seg> = path.iter().map(|k| Seg::Key(k.to_string())).collect();
        path.push(Seg::Index);
        Table {
            src,
            section: section(&path),
            span,
        }
    }

    /// An error about the value of `key`: "`key` in [section]: message".
    fn err(&self, span: Range<usize>, key: &str, message: impl Display) -> ConfigError {
        self.src
            .error(span, format!("`{key}` in {}: {message}", self.section))
    }

    fn bad(&self, span: Range<usize>, key: &str, bad: Bad) -> ConfigError {
        let mut e = self.err(span, key, bad.message);
        e.hint = bad.hint;
        e
    }

    fn missing(&self, key: &str) -> ConfigError {
        self.src.error(
            self.span.clone(),
            format!("missing key `{key}` in {}", self.section),
        )
    }

    fn required<T>(&self, key: &str, v: Option<T>) -> Result<T, ConfigError> {
        v.ok_or_else(|| self.missing(key))
    }

    fn string(&self, key: &str, v: &Str) -> Result<String, ConfigError> {
        if v.get_ref().is_empty() {
            return Err(self.err(v.span(), key, "expected a non-empty string"));
        }
        if v.get_ref().contains('\0') {
            return Err(self.err(v.span(), key, "cannot contain a NUL character"));
        }
        Ok(v.get_ref().clone())
    }

    fn absolute_path(&self, key: &str, v: &Str) -> Result<PathBuf, ConfigError> {
        let s = self.string(key, v)?;
        if !Path::new(&s).is_absolute() {
            return Err(self.err(
                v.span(),
                key,
                format!("expected an absolute path, found {s:?}"),
            ));
        }
        Ok(PathBuf::from(s))
    }

    /// A path; relative ones are relative to the directory of the file that says them.
    fn path(&self, key: &str, v: &Str) -> Result<PathBuf, ConfigError> {
        let s = self.string(key, v)?;
        Ok(self.src.resolve(&s))
    }

    /// argv: a non-empty array of non-empty strings, and where its program (argv[0]) is written.
    fn argv(&self, key: &str, v: Option<StrList>) -> Result<(Vec<String>, Location), ConfigError> {
        let v = v.ok_or_else(|| {
            self.missing(key).with_hint(
                "the program and its arguments, e.g. \
                 `command = [\"/srv/api/.venv/bin/uvicorn\", \"main:app\", \"--fd\", \"3\"]`",
            )
        })?;
        if v.get_ref().is_empty() {
            return Err(self.err(
                v.span(),
                key,
                "expected the program and its arguments, found an empty array",
            ));
        }
        let program_at = self.src.loc(v.get_ref()[0].span().start);
        let argv = v
            .get_ref()
            .iter()
            .map(|arg| {
                if arg.get_ref().is_empty() {
                    Err(self.err(arg.span(), key, "arguments cannot be empty strings"))
                } else if arg.get_ref().contains('\0') {
                    Err(self.err(arg.span(), key, "arguments cannot contain a NUL character"))
                } else {
                    Ok(arg.get_ref().clone())
                }
            })
            .collect::<Result<_, _>>()?;
        Ok((argv, program_at))
    }

    fn socket_addr(&self, key: &str, v: &Str) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref().trim();
        let addr: SocketAddr = match s.parse() {
            Ok(a) => a,
            Err(_) => {
                let hint = if s.parse::<std::net::IpAddr>().is_ok() {
                    if s.contains(':') {
                        format!("add a port, and brackets around an IPv6 address: \"[{s}]:8000\"")
                    } else {
                        format!("add a port: \"{s}:8000\"")
                    }
                } else if s.starts_with("localhost") || s.starts_with('*') {
                    "host names are not resolved; write \"127.0.0.1:PORT\" or \"0.0.0.0:PORT\""
                        .to_string()
                } else {
                    "write an IP address and a port: \"127.0.0.1:8000\", \"0.0.0.0:80\" or \
                     \"[::]:8000\""
                        .to_string()
                };
                return Err(self
                    .err(
                        v.span(),
                        key,
                        format!("expected an IP address and port, found {:?}", v.get_ref()),
                    )
                    .with_hint(hint));
            }
        };
        if addr.port() == 0 {
            return Err(self
                .err(v.span(), key, "port 0 is not allowed")
                .with_hint("corral listens on a fixed port; pick one, e.g. \"127.0.0.1:8000\""));
        }
        Ok(addr)
    }

    fn choice<T: Copy>(
        &self,
        key: &str,
        v: Option<&Str>,
        default: T,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let Some(v) = v else {
            return Ok(default);
        };
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == v.get_ref()) {
            return Ok(*t);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        Err(self.err(
            v.span(),
            key,
            format!("expected {expected}, found {:?}", v.get_ref()),
        ))
    }

    fn duration(
        &self,
        key: &str,
        v: Option<&Spanned<raw::RawDuration>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else {
            return Ok(default);
        };
        let number = match &v.get_ref().0 {
            Scalar::Str(s) => return parse_duration(s).map_err(|b| self.bad(v.span(), key, b)),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(f) => f.to_string(),
        };
        Err(self
            .err(
                v.span(),
                key,
                format!("expected a duration such as \"30s\", found the bare number {number}"),
            )
            .with_hint(format!(
                "durations need a unit: write `{key} = \"{number}s\"` (or ms, m, h)"
            )))
    }

    fn positive_duration(
        &self,
        key: &str,
        v: Option<&Spanned<raw::RawDuration>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(key, v, default)?;
        match v {
            Some(v) if d.is_zero() => Err(self.err(v.span(), key, "must be longer than 0")),
            _ => Ok(d),
        }
    }

    /// A memory size; 0 is refused.
    fn size(
        &self,
        key: &str,
        v: Option<&Spanned<raw::RawSize>>,
    ) -> Result<Option<ByteSize>, ConfigError> {
        let Some(v) = v else {
            return Ok(None);
        };
        let bytes = match &v.get_ref().0 {
            Scalar::Str(s) => parse_size(s).map_err(|b| self.bad(v.span(), key, b))?,
            Scalar::Int(n) => u64::try_from(*n).map_err(|_| {
                self.err(
                    v.span(),
                    key,
                    format!("a size cannot be negative, found {n}"),
                )
            })?,
            Scalar::Float(f) => {
                return Err(self.err(
                    v.span(),
                    key,
                    format!("expected a size such as \"512MiB\", found {f}"),
                ))
            }
        };
        if bytes == 0 {
            return Err(self.err(v.span(), key, "must be greater than 0"));
        }
        Ok(Some(ByteSize(bytes)))
    }

    fn int_in(
        &self,
        key: &str,
        v: &Spanned<i64>,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<i64, ConfigError> {
        let n = *v.get_ref();
        if !range.contains(&n) {
            return Err(self.err(
                v.span(),
                key,
                format!(
                    "expected an integer from {} to {}, found {n}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(n)
    }
}

/// `[agent]`, the include patterns (with their spans) and where `metrics` is written.
type AgentParts = (Agent, Vec<(String, Option<Range<usize>>)>, Option<Location>);

fn convert_agent(
    src: &Source<'_>,
    raw: Option<Spanned<raw::RawAgent>>,
) -> Result<AgentParts, ConfigError> {
    let Some(raw) = raw else {
        let state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        let agent = Agent {
            include: vec![DEFAULT_INCLUDE.to_string()],
            control_socket: state_dir.join("control.sock"),
            state_dir,
            bpf_pin_dir: PathBuf::from(DEFAULT_BPF_PIN_DIR),
            metrics: None,
            metrics_at: None,
            enforce_limits: true,
            allow_overcommit: false,
            cgroup_root: CgroupRoot::Auto,
        };
        return Ok((agent, vec![(DEFAULT_INCLUDE.to_string(), None)], None));
    };
    let t = Table::new(src, &["agent"], raw.span());
    let raw = raw.into_inner();

    let include = match raw.include {
        None => vec![(DEFAULT_INCLUDE.to_string(), None)],
        Some(list) => list
            .into_inner()
            .into_iter()
            .map(|p| Ok((t.string("include", &p)?, Some(p.span()))))
            .collect::<Result<Vec<_>, ConfigError>>()?,
    };
    let state_dir = match &raw.state_dir {
        Some(v) => t.absolute_path("state_dir", v)?,
        None => PathBuf::from(DEFAULT_STATE_DIR),
    };
    let bpf_pin_dir = match &raw.bpf_pin_dir {
        Some(v) => t.absolute_path("bpf_pin_dir", v)?,
        None => PathBuf::from(DEFAULT_BPF_PIN_DIR),
    };
    let control_socket = match &raw.control_socket {
        Some(v) => t.absolute_path("control_socket", v)?,
        None => state_dir.join("control.sock"),
    };
    let metrics = match &raw.metrics {
        Some(v) => Some((t.socket_addr("metrics", v)?, src.loc(v.span().start))),
        None => None,
    };
    let cgroup_root = match &raw.cgroup_root {
        None => CgroupRoot::Auto,
        Some(v) if v.get_ref() == "auto" => CgroupRoot::Auto,
        Some(v) => CgroupRoot::Path(t.absolute_path("cgroup_root", v)?),
    };
    let agent = Agent {
        include: include.iter().map(|(p, _)| p.clone()).collect(),
        state_dir,
        bpf_pin_dir,
        control_socket,
        metrics: metrics.as_ref().map(|(a, _)| *a),
        metrics_at: metrics.as_ref().map(|(_, at)| at.clone()),
        enforce_limits: raw.enforce_limits.unwrap_or(true),
        allow_overcommit: raw.allow_overcommit.unwrap_or(false),
        cgroup_root,
    };
    Ok((agent, include, metrics.map(|(_, at)| at)))
}

/// Every file the include patterns match, sorted, without duplicates or the main file itself.
fn find_includes(
    main: &Source<'_>,
    patterns: &[(String, Option<Range<usize>>)],
) -> Result<Vec<PathBuf>, ConfigError> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        // `*.toml` does not pick up editors' hidden files.
        require_literal_leading_dot: true,
    };
    let main_canonical = std::fs::canonicalize(main.file).ok();
    let mut found = BTreeSet::new();
    for (pattern, span) in patterns {
        let at = |message: String| match span {
            Some(span) => main.error(span.clone(), message),
            None => ConfigError::nowhere(message),
        };
        let full = if Path::new(pattern).is_absolute() {
            pattern.clone()
        } else {
            let dir = main.dir.to_str().ok_or_else(|| {
                at(format!(
                    "cannot expand include pattern `{pattern}`: the directory {} is not UTF-8",
                    main.dir.display()
                ))
            })?;
            let dir = glob::Pattern::escape(dir);
            format!("{}/{pattern}", dir.trim_end_matches('/'))
        };
        let paths = glob::glob_with(&full, options)
            .map_err(|e| at(format!("invalid include pattern `{pattern}`: {}", e.msg)))?;
        for entry in paths {
            let p = entry.map_err(|e| {
                at(format!(
                    "cannot read {} while expanding `{pattern}`: {}",
                    e.path().display(),
                    e.error()
                ))
            })?;
            let is_main = p == main.file
                || (main_canonical.is_some() && std::fs::canonicalize(&p).ok() == main_canonical);
            if !is_main {
                found.insert(p);
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// A socket some part of the config listens on, to find two that would collide.
struct Endpoint {
    addr: SocketAddr,
    at: Location,
    /// "`address` in [app.api.listen]".
    what: String,
    /// An app's worker socket (a SO_REUSEPORT group that must be the app's alone).
    worker_socket: bool,
}

/// The apps converted so far, across files.
struct AppSet<'l> {
    lookup: &'l dyn Lookup,
    apps: BTreeMap<AppName, App>,
    endpoints: Vec<Endpoint>,
}

impl AppSet<'_> {
    fn add(&mut self, src: &Source<'_>, apps: raw::Apps) -> Result<(), ConfigError> {
        // Report problems in the order they appear in the file, not by name.
        let mut apps: Vec<_> = apps.into_iter().collect();
        apps.sort_by_key(|(k, v)| k.span().start.min(v.span().start));
        for (key, table) in apps {
            let name = AppName::new(key.get_ref()).map_err(|m| src.error(key.span(), m))?;
            // `[app.api]` is defined at its header; `api = { ... }` at its key.
            let start = table.span().start.min(key.span().start);
            let defined_at = src.loc(start);
            if let Some(first) = self.apps.get(&name) {
                return Err(ConfigError::at(
                    defined_at.clone(),
                    format!(
                        "app `{name}` is defined twice: at {} and at {defined_at}",
                        first.defined_at
                    ),
                )
                .with_hint("an app's name is its key; rename one of them or remove the other"));
            }
            let app = convert_app(
                src,
                self.lookup,
                name.clone(),
                defined_at,
                table,
                &mut self.endpoints,
            )?;
            self.apps.insert(name, app);
        }
        Ok(())
    }

    /// Every `[app.NAME.tls]` becomes an app `NAME.tls` of front processes.
    fn add_fronts(&mut self) -> Result<(), ConfigError> {
        let fronts: Vec<App> = self
            .apps
            .values()
            .filter_map(|app| app.tls.as_ref().map(|tls| front_app(app, tls)))
            .collect();
        for front in fronts {
            if let Some(taken) = self.apps.get(&front.name) {
                return Err(ConfigError::at(
                    taken.defined_at.clone(),
                    format!(
                        "app name `{}` is taken by the TLS front of the app whose [tls] is at {}",
                        front.name, front.defined_at
                    ),
                )
                .with_hint(
                    "rename this app: `<name>.tls` is where corral runs <name>'s TLS front",
                ));
            }
            self.apps.insert(front.name.clone(), front);
        }
        Ok(())
    }

    /// An app's worker socket must not overlap any other socket in the config.
    fn check_endpoints(&self) -> Result<(), ConfigError> {
        for (i, later) in self.endpoints.iter().enumerate() {
            for earlier in &self.endpoints[..i] {
                if (later.worker_socket || earlier.worker_socket)
                    && overlaps(&later.addr, &earlier.addr)
                {
                    return Err(ConfigError::at(
                        later.at.clone(),
                        format!(
                            "{} {} overlaps {} {} at {}",
                            later.what, later.addr, earlier.what, earlier.addr, earlier.at
                        ),
                    )
                    .with_hint("each app's worker socket needs an address of its own"));
                }
            }
        }
        Ok(())
    }
}

/// Whether binding both addresses would collide: same port, and the same IP or a wildcard that
/// covers the other (`0.0.0.0` covers IPv4, `[::]` covers both families).
fn overlaps(a: &SocketAddr, b: &SocketAddr) -> bool {
    let covers =
        |w: &SocketAddr, x: &SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// `count = N | "auto"` (or `processes`), defaulting to auto at `default_at`.
fn count(
    w: &Table<'_>,
    key: &str,
    v: Option<&Spanned<raw::RawCount>>,
    default_at: &Location,
) -> Result<(WorkerCount, Location), ConfigError> {
    let Some(v) = v else {
        return Ok((WorkerCount::Auto, default_at.clone()));
    };
    let bad = |found: String| {
        w.err(
            v.span(),
            key,
            format!("expected an integer from 1 to {MAX_WORKERS} or \"auto\", found {found}"),
        )
        .with_hint(format!(
            "write `{key} = \"auto\"` for one {} per CPU",
            if key == "count" { "worker" } else { "process" }
        ))
    };
    let count = match &v.get_ref().0 {
        Scalar::Str(s) if s == "auto" => WorkerCount::Auto,
        Scalar::Int(i) if (1..=MAX_WORKERS).contains(i) => {
            // In 1..=1024, checked by the guard.
            match u32::try_from(*i).ok().and_then(NonZeroU32::new) {
                Some(c) => WorkerCount::Fixed(c),
                None => return Err(bad(i.to_string())),
            }
        }
        Scalar::Int(i) => return Err(bad(i.to_string())),
        Scalar::Float(f) => return Err(bad(f.to_string())),
        Scalar::Str(s) => return Err(bad(format!("{s:?}"))),
    };
    Ok((count, w.src.loc(v.span().start)))
}

fn convert_app(
    src: &Source<'_>,
    lookup: &dyn Lookup,
    name: AppName,
    defined_at: Location,
    table: Spanned<raw::RawApp>,
    endpoints: &mut Vec<Endpoint>,
) -> Result<App, ConfigError> {
    let n = name.as_str();
    let t = Table::new(src, &["app", n], table.span());
    let raw = table.into_inner();

    let (command, command_at) = t.argv("command", raw.command)?;
    let workdir = match &raw.workdir {
        Some(v) => t.absolute_path("workdir", v)?,
        None => PathBuf::from("/"),
    };
    let identity = identity(&t, lookup, &name, raw.user.as_ref(), raw.group.as_ref())?;

    let mut env = BTreeMap::new();
    if let Some(v) = &raw.env_file {
        let path = t.path("env_file", v)?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            t.err(
                v.span(),
                "env_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        env.extend(parse_env_file(&path, &text)?);
    }
    if let Some(vars) = raw.env {
        let et = Table::new(src, &["app", n, "env"], t.span.clone());
        let mut vars: Vec<_> = vars.into_iter().collect();
        vars.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in vars {
            check_env_name(k.get_ref())
                .map_err(|b| with_hint(src.error(k.span(), b.message), b.hint))?;
            if v.get_ref().contains('\0') {
                return Err(et.err(v.span(), k.get_ref(), "cannot contain a NUL character"));
            }
            env.insert(k.into_inner(), v.into_inner());
        }
    }

    let listen = {
        let raw_listen = raw.listen.ok_or_else(|| {
            src.error(
                t.span.clone(),
                format!(
                    "app `{name}` has no {} table",
                    section_of(&["app", n, "listen"])
                ),
            )
            .with_hint(format!(
                "add {} with the workers' socket, e.g. `address = \"127.0.0.1:8000\"`",
                section_of(&["app", n, "listen"])
            ))
        })?;
        let lt = Table::new(src, &["app", n, "listen"], raw_listen.span());
        let raw_listen = raw_listen.into_inner();
        let address_v = lt
            .required("address", raw_listen.address)
            .map_err(|e| e.with_hint("the workers' socket, e.g. `address = \"127.0.0.1:8000\"`"))?;
        let address = lt.socket_addr("address", &address_v)?;
        let address_at = src.loc(address_v.span().start);
        endpoints.push(Endpoint {
            addr: address,
            at: address_at.clone(),
            what: format!("`address` in {}", lt.section),
            worker_socket: true,
        });
        let backlog = match &raw_listen.backlog {
            Some(v) => lt.int_in("backlog", v, 1..=65535)?,
            None => DEFAULT_BACKLOG,
        };
        let steering = lt.choice(
            "steering",
            raw_listen.steering.as_ref(),
            Steering::LeastLoaded,
            &[
                ("least-loaded", Steering::LeastLoaded),
                ("round-robin", Steering::RoundRobin),
                ("hash", Steering::Hash),
            ],
        )?;
        Listen {
            address,
            address_at,
            // In 1..=65535, checked above.
            backlog: backlog as u32,
            steering,
        }
    };

    let workers = workers(src, n, &defined_at, raw.workers)?;
    let restart = restart(src, n, raw.restart)?;

    let pre_start = raw
        .pre_start
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, step)| {
            let pt = Table::array_item(src, &["app", n, "pre_start"], step.span());
            let step = step.into_inner();
            let (command, at) = pt.argv("command", step.command)?;
            Ok(PreStart {
                name: match &step.name {
                    Some(v) => pt.string("name", v)?,
                    None => format!("step {}", i + 1),
                },
                command,
                timeout: pt.positive_duration(
                    "timeout",
                    step.timeout.as_ref(),
                    Duration::from_secs(5 * 60),
                )?,
                at,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;

    let tls = match raw.tls {
        None => None,
        Some(raw_tls) => {
            let tt = Table::new(src, &["app", n, "tls"], raw_tls.span());
            let raw_tls = raw_tls.into_inner();
            let address_v = tt.required("address", raw_tls.address)?;
            let address = tt.socket_addr("address", &address_v)?;
            let address_at = src.loc(address_v.span().start);
            endpoints.push(Endpoint {
                addr: address,
                at: address_at.clone(),
                what: format!("`address` in {}", tt.section),
                // The front processes' SO_REUSEPORT group: the app's alone, like a worker socket.
                worker_socket: true,
            });
            let cert = tt.path("cert", &tt.required("cert", raw_tls.cert)?)?;
            let key = tt.path("key", &tt.required("key", raw_tls.key)?)?;
            let sni = raw_tls
                .sni
                .unwrap_or_default()
                .into_iter()
                .map(|pair| {
                    let pt = Table::array_item(src, &["app", n, "tls", "sni"], pair.span());
                    let pair = pair.into_inner();
                    Ok(CertPair {
                        cert: pt.path("cert", &pt.required("cert", pair.cert)?)?,
                        key: pt.path("key", &pt.required("key", pair.key)?)?,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            let identity = match &raw_tls.user {
                Some(_) => self::identity(
                    &tt,
                    lookup,
                    &name,
                    raw_tls.user.as_ref(),
                    raw_tls.group.as_ref(),
                )?,
                None => {
                    let nobody = Spanned::new(tt.span.clone(), FRONT_DEFAULT_USER.to_string());
                    self::identity(&tt, lookup, &name, Some(&nobody), raw_tls.group.as_ref())
                        .map_err(|e| e.with_hint(format!(
                            "the TLS front runs as `{FRONT_DEFAULT_USER}` unless `user` is set in {}",
                            tt.section
                        )))?
                }
            };
            let (processes, processes_at) =
                count(&tt, "processes", raw_tls.processes.as_ref(), &address_at)?;
            let handshake_timeout = tt.positive_duration(
                "handshake_timeout",
                raw_tls.handshake_timeout.as_ref(),
                Duration::from_secs(10),
            )?;
            let proxy_protocol = tt.choice(
                "proxy_protocol",
                raw_tls.proxy_protocol.as_ref(),
                false,
                &[("off", false), ("v2", true)],
            )?;
            let max_handshakes = match &raw_tls.max_handshakes {
                Some(v) => tt.int_in("max_handshakes", v, 1..=65536)? as u32,
                None => 1024,
            };
            let ktls = tt.choice(
                "ktls",
                raw_tls.ktls.as_ref(),
                KtlsMode::Auto,
                &[
                    ("auto", KtlsMode::Auto),
                    ("off", KtlsMode::Off),
                    ("require", KtlsMode::Require),
                ],
            )?;
            let redirect_http = match &raw_tls.redirect_http {
                Some(v) => {
                    let addr = tt.socket_addr("redirect_http", v)?;
                    endpoints.push(Endpoint {
                        addr,
                        at: src.loc(v.span().start),
                        what: format!("`redirect_http` in {}", tt.section),
                        worker_socket: false,
                    });
                    Some(addr)
                }
                None => None,
            };
            Some(Tls {
                address,
                address_at,
                cert,
                key,
                sni,
                ktls,
                redirect_http,
                identity,
                processes,
                processes_at,
                handshake_timeout,
                max_handshakes,
                proxy_protocol,
            })
        }
    };

    Ok(App {
        name,
        defined_at,
        command,
        command_at,
        workdir,
        identity,
        env,
        listen,
        workers,
        restart,
        pre_start,
        tls,
        role: Role::Workers,
    })
}

/// Who runs the TLS front when `[app.NAME.tls]` has no `user`.
pub const FRONT_DEFAULT_USER: &str = "nobody";
/// The program of a TLS front process: the agent's own binary, whatever its path (after a
/// package upgrade too, the running agent's: the kernel keeps the old file for it).
pub const SELF_EXE: &str = "/proc/self/exe";
/// How long a front process has to finish its connections when it is replaced or stopped.
pub const FRONT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The front app of `app` (named `<app>.tls`): `corral front` processes on the TLS address,
/// proxying to the app's listen address, supervised like workers.
pub fn front_app(app: &App, tls: &Tls) -> App {
    let name = app.name.front();
    let mut command = vec![
        SELF_EXE.to_string(),
        "front".to_string(),
        "--app".to_string(),
        app.name.to_string(),
        "--upstream".to_string(),
        app.listen.address.to_string(),
        "--ktls".to_string(),
        match tls.ktls {
            KtlsMode::Auto => "auto",
            KtlsMode::Off => "off",
            KtlsMode::Require => "require",
        }
        .to_string(),
        "--handshake-timeout-ms".to_string(),
        tls.handshake_timeout.as_millis().to_string(),
        "--max-handshakes".to_string(),
        tls.max_handshakes.to_string(),
    ];
    if tls.proxy_protocol {
        command.push("--proxy-protocol-v2".to_string());
    }
    if tls.redirect_http.is_some() {
        // The plain listener comes as fd 6; redirects go to this port.
        command.push("--redirect-to-port".to_string());
        command.push(tls.address.port().to_string());
    }
    App {
        name,
        defined_at: tls.address_at.clone(),
        command,
        command_at: tls.address_at.clone(),
        workdir: PathBuf::from("/"),
        identity: tls.identity.clone(),
        env: BTreeMap::new(),
        listen: Listen {
            address: tls.address,
            address_at: tls.address_at.clone(),
            backlog: app.listen.backlog,
            steering: Steering::LeastLoaded,
        },
        workers: Workers {
            count: tls.processes,
            count_at: tls.processes_at.clone(),
            memory_max: None,
            memory_high: None,
            cpu_max: None,
            pids_max: None,
            stop_timeout: FRONT_STOP_TIMEOUT,
            ready: Ready::Tcp,
            ready_timeout: Duration::from_secs(10),
        },
        restart: Restart::DEFAULT,
        pre_start: Vec::new(),
        tls: None,
        role: Role::TlsFront {
            of: app.name.clone(),
            tls: Box::new(tls.clone()),
        },
    }
}

fn section_of(path: &[&str]) -> String {
    let path: Vec<Seg> = path.iter().map(|k| Seg::Key(k.to_string())).collect();
    section(&path)
}

fn with_hint(mut e: ConfigError, hint: Option<String>) -> ConfigError {
    e.hint = hint;
    e
}

fn identity(
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

fn workers(
    src: &Source<'_>,
    n: &str,
    defined_at: &Location,
    raw: Option<Spanned<raw::RawWorkers>>,
) -> Result<Workers, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Workers {
            count: WorkerCount::Auto,
            count_at: defined_at.clone(),
            memory_max: None,
            memory_high: None,
            cpu_max: None,
            pids_max: None,
            stop_timeout: Duration::from_secs(30),
            ready: Ready::Tcp,
            ready_timeout: Duration::from_secs(60),
        });
    };
    let w = Table::new(src, &["app", n, "workers"], raw.span());
    let raw = raw.into_inner();

    let (count, count_at) = count(&w, "count", raw.count.as_ref(), defined_at)?;

    let memory_max = w.size("memory_max", raw.memory_max.as_ref())?;
    let memory_high = w.size("memory_high", raw.memory_high.as_ref())?;
    if let (Some(high), Some(max), Some(v)) = (memory_high, memory_max, &raw.memory_high) {
        if high >= max {
            return Err(w
                .err(
                    v.span(),
                    "memory_high",
                    format!("{high} must be less than `memory_max` ({max})"),
                )
                .with_hint(
                    "crossing memory_high recycles a worker gracefully; memory_max is where the \
                     kernel kills it, so memory_high goes below it",
                ));
        }
    }

    let cpu_max = match &raw.cpu_max {
        None => None,
        Some(v) => {
            let c = *v.get_ref();
            if !(c.is_finite() && c > 0.0) {
                return Err(w.err(
                    v.span(),
                    "cpu_max",
                    format!("expected a number of CPUs greater than 0, found {c}"),
                ));
            }
            Some(c)
        }
    };
    let pids_max = match &raw.pids_max {
        None => None,
        Some(v) => {
            let p = w.int_in("pids_max", v, 1..=i64::from(u32::MAX))?;
            // In 1..=u32::MAX, checked above.
            NonZeroU32::new(p as u32)
        }
    };

    let stop_timeout = w.duration(
        "stop_timeout",
        raw.stop_timeout.as_ref(),
        Duration::from_secs(30),
    )?;
    let ready = match &raw.ready {
        None => Ready::Tcp,
        Some(v) => parse_ready(v.get_ref()).map_err(|b| w.bad(v.span(), "ready", b))?,
    };
    let ready_timeout = w.positive_duration(
        "ready_timeout",
        raw.ready_timeout.as_ref(),
        Duration::from_secs(60),
    )?;

    Ok(Workers {
        count,
        count_at,
        memory_max,
        memory_high,
        cpu_max,
        pids_max,
        stop_timeout,
        ready,
        ready_timeout,
    })
}

fn parse_ready(s: &str) -> Result<Ready, Bad> {
    const EXPECTED: &str = "expected \"tcp\", \"http:/PATH\", \"notify\" or \"delay:DURATION\"";
    match s {
        "tcp" => return Ok(Ready::Tcp),
        "notify" => return Ok(Ready::Notify),
        _ => {}
    }
    if let Some(path) = s.strip_prefix("http:") {
        if !path.starts_with('/') || path.starts_with("//") {
            return Err(Bad::new(
                format!("expected a path starting with `/` after `http:`, found {s:?}"),
                Some(
                    "give only the path, e.g. \"http:/healthz\"; corral probes each worker's \
                     own socket"
                        .into(),
                ),
            ));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Bad::new(
                format!(
                    "the health check path in {s:?} cannot contain spaces or control characters"
                ),
                None,
            ));
        }
        return Ok(Ready::Http(path.to_string()));
    }
    if let Some(d) = s.strip_prefix("delay:") {
        return parse_duration(d).map(Ready::Delay);
    }
    Err(Bad::new(format!("{EXPECTED}, found {s:?}"), None))
}

fn restart(
    src: &Source<'_>,
    n: &str,
    raw: Option<Spanned<raw::RawRestart>>,
) -> Result<Restart, ConfigError> {
    let (span, raw) = match raw {
        Some(r) => (r.span(), r.into_inner()),
        None => (
            0..0,
            raw::RawRestart {
                policy: None,
                backoff_initial: None,
                backoff_max: None,
                max_restarts: None,
                window: None,
                reset_after: None,
            },
        ),
    };
    let r = Table::new(src, &["app", n, "restart"], span.clone());
    let d = Restart::DEFAULT;
    let policy = r.choice(
        "policy",
        raw.policy.as_ref(),
        d.policy,
        &[
            ("always", RestartMode::Always),
            ("on-failure", RestartMode::OnFailure),
            ("never", RestartMode::Never),
        ],
    )?;
    let backoff_initial = r.duration(
        "backoff_initial",
        raw.backoff_initial.as_ref(),
        d.backoff_initial,
    )?;
    let backoff_max = r.duration("backoff_max", raw.backoff_max.as_ref(), d.backoff_max)?;
    if backoff_initial > backoff_max {
        let span = match (&raw.backoff_initial, &raw.backoff_max) {
            (Some(v), _) => v.span(),
            (None, Some(v)) => v.span(),
            (None, None) => span,
        };
        return Err(r
            .err(
                span,
                "backoff_initial",
                format!(
                    "{backoff_initial:?} must not be longer than `backoff_max` ({backoff_max:?})"
                ),
            )
            .with_hint("the delay starts at backoff_initial and doubles up to backoff_max"));
    }
    let max_restarts = match &raw.max_restarts {
        Some(v) => r.int_in("max_restarts", v, 0..=i64::from(u32::MAX))?,
        None => i64::from(d.max_restarts),
    };
    let window = r.positive_duration("window", raw.window.as_ref(), d.window)?;
    let reset_after = r.duration("reset_after", raw.reset_after.as_ref(), d.reset_after)?;
    Ok(Restart {
        policy,
        backoff_initial,
        backoff_max,
        // In 0..=u32::MAX, checked above.
        max_restarts: max_restarts as u32,
        window,
        reset_after,
    })
}

// ---------------------------------------------------------------------------------------------
// Environment

fn check_env_name(name: &str) -> Result<(), Bad> {
    let problem = if name.is_empty() {
        "an environment variable name cannot be empty".to_string()
    } else if name.contains('=') {
        format!("environment variable name `{name}` cannot contain `=`")
    } else if name.contains('\0') {
        format!("environment variable name {name:?} cannot contain a NUL character")
    } else if name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("environment variable name `{name}` cannot start with a digit")
    } else if RESERVED_ENV.contains(&name) {
        return Err(Bad::new(
            format!("environment variable `{name}` is set by corral"),
            Some(format!(
                "corral sets {} for every worker; remove `{name}`",
                RESERVED_ENV.join(", ")
            )),
        ));
    } else {
        return Ok(());
    };
    Err(Bad::new(problem, None))
}

/// Parses an env file: `KEY=VALUE` lines, blank lines and `#` comments ignored, an optional
/// leading `export `, values optionally in single quotes (literal) or double quotes (with `\\`,
/// `\"`, `\n`, `\t` and `\$` escapes).
fn parse_env_file(path: &Path, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // Column (1-based, in characters) of a sub-slice of `line`.
        let at = |part: &str| {
            let offset = (part.as_ptr() as usize).saturating_sub(line.as_ptr() as usize);
            Location {
                file: path.to_path_buf(),
                line: i + 1,
                col: line.get(..offset).map_or(1, |s| s.chars().count() + 1),
            }
        };
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let body = body
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(body);
        let Some((name, value)) = body.split_once('=') else {
            return Err(ConfigError::at(at(body), "expected KEY=VALUE")
                .with_hint("env files hold `KEY=VALUE` lines and `#` comments"));
        };
        let name = name.trim_end();
        check_env_name(name)
            .map_err(|b| with_hint(ConfigError::at(at(body), b.message), b.hint))?;
        let value = value.trim();
        let parsed = env_value(value).map_err(|m| ConfigError::at(at(value), m))?;
        if parsed.contains('\0') {
            return Err(ConfigError::at(
                at(value),
                "a value cannot contain a NUL character",
            ));
        }
        out.push((name.to_string(), parsed));
    }
    Ok(out)
}

fn env_value(v: &str) -> Result<String, String> {
    let quote = match v.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => return Ok(v.to_string()),
    };
    let mut out = String::new();
    let mut chars = v[1..].char_indices();
    let mut end = None;
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => {
                end = Some(i + 2);
                break;
            }
            '\\' if quote == '"' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, e @ ('\\' | '"' | '$'))) => out.push(e),
                Some((_, e)) => {
                    out.push('\\');
                    out.push(e);
                }
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    let Some(end) = end else {
        return Err(format!("missing the closing {quote} of the value"));
    };
    let after = v[end..].trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return Err(format!(
            "unexpected text after the closing {quote}: {after:?}"
        ));
    }
    Ok(out)
}
