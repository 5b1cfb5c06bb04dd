//! One config file's text: byte spans -> file:line:col, and toml/serde errors rewritten in
//! corral's words (naming the key and the table, suggesting the closest valid key).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use crate::config::{ConfigError, Location};

/// One config file's text, for turning byte spans into locations.
pub(super) struct Source<'a> {
    pub(super) file: &'a Path,
    /// Relative paths written in this file (include, env_file, cert, key) are relative to this.
    pub(super) dir: PathBuf,
    text: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub(super) fn new(file: &'a Path, text: &'a str) -> Self {
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
    pub(super) fn loc(&self, offset: usize) -> Location {
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

    pub(super) fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.loc(span.start), message)
    }

    /// A path written in this file, made absolute against the file's directory.
    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    pub(super) fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
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

/// The header of the table at `path`: `[app.api.workers]`.
pub(super) fn header(path: &[&str]) -> String {
    section(&keys(path))
}

/// The header of an element of the array of tables at `path`: `[[app.api.pre_start]]`.
pub(super) fn array_header(path: &[&str]) -> String {
    let mut path = keys(path);
    path.push(Seg::Index);
    section(&path)
}

fn keys(path: &[&str]) -> Vec<Seg> {
    path.iter().map(|k| Seg::Key(k.to_string())).collect()
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
