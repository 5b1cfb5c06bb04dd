//! A table being converted: typed readers for its keys (strings, paths, argv, addresses,
//! choices, durations, sizes, integers, counts) whose errors name the key, the table and the
//! place in the file.

use std::fmt::Display;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_spanned::Spanned;

use super::source::{array_header, header, Source};
use super::values::{parse_duration, parse_size, Bad};
use crate::config::raw::{self, Scalar, Str, StrList};
use crate::config::{ByteSize, ConfigError, Location, WorkerCount};

/// The largest `count` and `processes`: probes reach slot N from port 31000 + N, below the
/// default ephemeral range.
const MAX_WORKERS: i64 = 1024;

/// A table being converted: where it is, for errors about its keys.
pub(super) struct Table<'s> {
    pub(super) src: &'s Source<'s>,
    /// `[app.api.workers]`.
    pub(super) section: String,
    pub(super) span: Range<usize>,
}

impl<'s> Table<'s> {
    pub(super) fn new(src: &'s Source<'s>, path: &[&str], span: Range<usize>) -> Self {
        Table {
            src,
            section: header(path),
            span,
        }
    }

    /// A table that may be left out, and its contents: when it is, every key takes its default
    /// (`T::default()` is all `None`) and the table is nowhere (only a missing required key
    /// would point at it, and such a table has none).
    pub(super) fn or_default<T: Default>(
        src: &'s Source<'s>,
        path: &[&str],
        raw: Option<Spanned<T>>,
    ) -> (Self, T) {
        let (span, raw) = match raw {
            Some(r) => (r.span(), r.into_inner()),
            None => (0..0, T::default()),
        };
        (Table::new(src, path, span), raw)
    }

    /// A table that is an element of an array of tables (`[[app.api.pre_start]]`).
    pub(super) fn array_item(src: &'s Source<'s>, path: &[&str], span: Range<usize>) -> Self {
        Table {
            src,
            section: array_header(path),
            span,
        }
    }

    /// An error about the value of `key`: "`key` in [section]: message".
    pub(super) fn err(&self, span: Range<usize>, key: &str, message: impl Display) -> ConfigError {
        self.src
            .error(span, format!("`{key}` in {}: {message}", self.section))
    }

    /// An error about the value of `key` from a [`Bad`], with its hint.
    pub(super) fn bad(&self, span: Range<usize>, key: &str, bad: Bad) -> ConfigError {
        let mut e = self.err(span, key, bad.message);
        e.hint = bad.hint;
        e
    }

    pub(super) fn missing(&self, key: &str) -> ConfigError {
        self.src.error(
            self.span.clone(),
            format!("missing key `{key}` in {}", self.section),
        )
    }

    pub(super) fn required<T>(&self, key: &str, v: Option<T>) -> Result<T, ConfigError> {
        v.ok_or_else(|| self.missing(key))
    }

    pub(super) fn string(&self, key: &str, v: &Str) -> Result<String, ConfigError> {
        if v.get_ref().is_empty() {
            return Err(self.err(v.span(), key, "expected a non-empty string"));
        }
        if v.get_ref().contains('\0') {
            return Err(self.err(v.span(), key, "cannot contain a NUL character"));
        }
        Ok(v.get_ref().clone())
    }

    pub(super) fn absolute_path(&self, key: &str, v: &Str) -> Result<PathBuf, ConfigError> {
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
    pub(super) fn path(&self, key: &str, v: &Str) -> Result<PathBuf, ConfigError> {
        let s = self.string(key, v)?;
        Ok(self.src.resolve(&s))
    }

    /// argv: a non-empty array of non-empty strings, and where its program (argv[0]) is written.
    pub(super) fn argv(
        &self,
        key: &str,
        v: Option<StrList>,
    ) -> Result<(Vec<String>, Location), ConfigError> {
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

    pub(super) fn socket_addr(&self, key: &str, v: &Str) -> Result<SocketAddr, ConfigError> {
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

    pub(super) fn choice<T: Copy>(
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

    pub(super) fn duration(
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

    pub(super) fn positive_duration(
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
    pub(super) fn size(
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

    /// An integer in `range`, if written.
    pub(super) fn u32_in(
        &self,
        key: &str,
        v: Option<&Spanned<i64>>,
        range: RangeInclusive<u32>,
    ) -> Result<Option<u32>, ConfigError> {
        let Some(v) = v else {
            return Ok(None);
        };
        let n = *v.get_ref();
        match u32::try_from(n) {
            Ok(u) if range.contains(&u) => Ok(Some(u)),
            _ => Err(self.err(
                v.span(),
                key,
                format!(
                    "expected an integer from {} to {}, found {n}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    /// `count = N | "auto"` (or `processes`), defaulting to auto at `default_at`.
    pub(super) fn count(
        &self,
        key: &str,
        v: Option<&Spanned<raw::RawCount>>,
        default_at: &Location,
    ) -> Result<(WorkerCount, Location), ConfigError> {
        let Some(v) = v else {
            return Ok((WorkerCount::Auto, default_at.clone()));
        };
        let bad = |found: String| {
            self.err(
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
        Ok((count, self.src.loc(v.span().start)))
    }
}
