//! An app's environment: `env_file` (a file of `KEY=VALUE` lines) and `[app.NAME.env]`, with
//! the names corral sets itself refused.

use std::collections::BTreeMap;
use std::path::Path;

use super::table::Table;
use super::values::Bad;
use crate::config::raw::Str;
use crate::config::{ConfigError, Location};

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

/// `env_file` entries first, then `env` (which wins).
pub(super) fn app_env(
    t: &Table<'_>,
    name: &str,
    env_file: Option<&Str>,
    vars: Option<BTreeMap<Str, Str>>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut env = BTreeMap::new();
    if let Some(v) = env_file {
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
    if let Some(vars) = vars {
        let et = Table::new(t.src, &["app", name, "env"], t.span.clone());
        let mut vars: Vec<_> = vars.into_iter().collect();
        vars.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in vars {
            check_env_name(k.get_ref()).map_err(|b| b.at(t.src.loc(k.span().start)))?;
            if v.get_ref().contains('\0') {
                return Err(et.err(v.span(), k.get_ref(), "cannot contain a NUL character"));
            }
            env.insert(k.into_inner(), v.into_inner());
        }
    }
    Ok(env)
}

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
        check_env_name(name).map_err(|b| b.at(at(body)))?;
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
