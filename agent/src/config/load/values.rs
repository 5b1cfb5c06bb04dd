//! Sizes (`"512MiB"`) and durations (`"1m30s"`) as written in the config, and why a wrong one
//! is wrong.

use std::time::Duration;

use crate::config::{ConfigError, Location};

/// Why a size or duration string is wrong, and how to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::config) struct Bad {
    pub message: String,
    pub hint: Option<String>,
}

impl Bad {
    pub(super) fn new(message: impl Into<String>, hint: Option<String>) -> Self {
        Bad {
            message: message.into(),
            hint,
        }
    }

    /// The error at `at`, with the hint.
    pub(super) fn at(self, at: Location) -> ConfigError {
        let mut e = ConfigError::at(at, self.message);
        e.hint = self.hint;
        e
    }
}

const SIZE_UNITS_HINT: &str = "sizes use binary units KiB, MiB, GiB, TiB";

/// Parses `"1GiB"`, `"900MiB"`, `"1.5GiB"`, `"512"` or `"512B"` into bytes.
pub(in crate::config) fn parse_size(s: &str) -> Result<u64, Bad> {
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
pub(in crate::config) fn parse_duration(s: &str) -> Result<Duration, Bad> {
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
