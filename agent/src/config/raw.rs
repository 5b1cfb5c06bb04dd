//! The TOML files as serde sees them: every table denies unknown keys, every value keeps its span.
//!
//! Required keys are `Option`s here so that `load/` can say what is missing in its own words;
//! ranges, units and enumerations are checked there too. These types never leave the module.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_spanned::Spanned;

/// A string with its span.
pub type Str = Spanned<String>;
/// An array of strings (argv) with its span and each item's span.
pub type StrList = Spanned<Vec<Spanned<String>>>;
/// `[app.NAME]` tables keyed by name, each with the key's span and the table's span.
pub type Apps = BTreeMap<Spanned<String>, Spanned<RawApp>>;

/// The main file, `corral.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MainFile {
    pub agent: Option<Spanned<RawAgent>>,
    #[serde(default)]
    pub app: Apps,
}

/// A file pulled in by `[agent] include`: apps only. `agent` is accepted by serde so that the
/// loader can say where it belongs instead of calling it an unknown key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncludedFile {
    pub agent: Option<Spanned<de::IgnoredAny>>,
    #[serde(default)]
    pub app: Apps,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub include: Option<StrList>,
    pub state_dir: Option<Str>,
    pub acme_dir: Option<Str>,
    pub bpf_pin_dir: Option<Str>,
    pub control_socket: Option<Str>,
    pub metrics: Option<Str>,
    pub enforce_limits: Option<bool>,
    pub allow_overcommit: Option<bool>,
    pub cgroup_root: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub command: Option<StrList>,
    pub workdir: Option<Str>,
    pub user: Option<Str>,
    pub group: Option<Str>,
    pub env: Option<BTreeMap<Str, Str>>,
    pub env_file: Option<Str>,
    pub listen: Option<Spanned<RawListen>>,
    pub workers: Option<Spanned<RawWorkers>>,
    pub restart: Option<Spanned<RawRestart>>,
    pub pre_start: Option<Vec<Spanned<RawPreStart>>>,
    pub tls: Option<Spanned<RawTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub address: Option<Str>,
    pub backlog: Option<Spanned<i64>>,
    pub steering: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkers {
    pub count: Option<Spanned<RawCount>>,
    pub memory_max: Option<Spanned<RawSize>>,
    pub memory_high: Option<Spanned<RawSize>>,
    pub cpu_max: Option<Spanned<f64>>,
    pub pids_max: Option<Spanned<i64>>,
    pub stop_timeout: Option<Spanned<RawDuration>>,
    pub ready: Option<Str>,
    pub ready_timeout: Option<Spanned<RawDuration>>,
    pub min_ready: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    pub policy: Option<Str>,
    pub backoff_initial: Option<Spanned<RawDuration>>,
    pub backoff_max: Option<Spanned<RawDuration>>,
    pub max_restarts: Option<Spanned<i64>>,
    pub window: Option<Spanned<RawDuration>>,
    pub reset_after: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPreStart {
    pub command: Option<StrList>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub name: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub address: Option<Str>,
    pub cert: Option<Str>,
    pub key: Option<Str>,
    pub sni: Option<Vec<Spanned<RawCertPair>>>,
    pub acme: Option<Spanned<RawAcme>>,
    pub ktls: Option<Str>,
    pub redirect_http: Option<Str>,
    pub user: Option<Str>,
    pub group: Option<Str>,
    pub processes: Option<Spanned<RawCount>>,
    pub handshake_timeout: Option<Spanned<RawDuration>>,
    pub max_handshakes: Option<Spanned<i64>>,
    pub proxy_protocol: Option<Str>,
    pub proxy: Option<Str>,
    pub trusted_proxies: Option<StrList>,
    pub header_timeout: Option<Spanned<RawDuration>>,
    pub upstream_timeout: Option<Spanned<RawDuration>>,
    pub body_timeout: Option<Spanned<RawDuration>>,
    pub max_header_size: Option<Spanned<RawSize>>,
    pub max_headers: Option<Spanned<i64>>,
    pub access_log: Option<Spanned<bool>>,
    pub upstream: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub domains: Option<StrList>,
    pub email: Option<Str>,
    pub directory: Option<Str>,
    pub directory_ca: Option<Str>,
    pub challenge: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertPair {
    pub cert: Option<Str>,
    pub key: Option<Str>,
}

/// A TOML scalar that may be written as a number or a string; `load/` decides which forms are
/// valid so that it can explain a wrong one (`count = 0`, `stop_timeout = 30`).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Str(String),
}

/// `workers.count`: an integer or `"auto"`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawCount(pub Scalar);

/// A size: `"1GiB"` or an integer number of bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSize(pub Scalar);

/// A duration: `"30s"`; numbers are accepted here only to be rejected with a hint.
#[derive(Debug, Clone, PartialEq)]
pub struct RawDuration(pub Scalar);

struct ScalarVisitor {
    expecting: &'static str,
    floats: bool,
}

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        i64::try_from(v)
            .map(Scalar::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        if self.floats {
            Ok(Scalar::Float(v))
        } else {
            Err(E::invalid_type(de::Unexpected::Float(v), &self))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(v.to_string()))
    }
}

impl<'de> Deserialize<'de> for RawCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "an integer from 1 to 1024 or \"auto\"",
            floats: false,
        })
        .map(RawCount)
    }
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a size such as \"512MiB\" or an integer number of bytes",
            floats: false,
        })
        .map(RawSize)
    }
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a duration such as \"30s\"",
            floats: true,
        })
        .map(RawDuration)
    }
}
