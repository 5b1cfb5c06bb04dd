//! Validated configuration: values of these types cannot be bad.
//!
//! `raw.rs` deserializes TOML into serde structs; `load/` converts them once into these.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// Where a value came from: file, 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// An app's name: the key of its `[app.NAME]` table. Non-empty, at most 64 bytes of
/// `[A-Za-z0-9_.-]`, not starting with `.` or `-`: safe as a path component, a cgroup name and a
/// log field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppName(String);

impl AppName {
    /// Returns the reason when `s` is not a valid app name.
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an app name cannot be empty".into());
        }
        if s.len() > 64 {
            return Err(format!("app name `{s}` is longer than 64 bytes"));
        }
        if s.starts_with('.') || s.starts_with('-') {
            return Err(format!("app name `{s}` cannot start with `.` or `-`"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!(
                "app name `{s}` contains `{c}`; use letters, digits, `_`, `-` and `.`"
            ));
        }
        Ok(AppName(s.to_string()))
    }

    /// `<name>.tls`, the app of this app's TLS front processes.
    pub fn front(&self) -> AppName {
        AppName(format!("{}.tls", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes, written `512MiB`, `1GiB`, `64KiB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, unit) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, name);
            }
        }
        for (name, unit) in UNITS {
            if self.0 >= unit {
                return write!(f, "{:.1}{}", self.0 as f64 / unit as f64, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// Which worker commands may be started as which identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: u32,
    /// The group's name as written (or the user's primary group's name).
    pub group: String,
    pub gid: u32,
}

/// How new connections reach the app's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// One socket per worker; the eBPF program picks the ready worker with the fewest open
    /// connections.
    LeastLoaded,
    RoundRobin,
    /// One socket per worker, spread by the kernel's hash.
    Hash,
    /// One socket shared by every worker, one accept queue: for workers that serve one request
    /// at a time (an idle worker takes the next connection).
    Shared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub address: SocketAddr,
    pub address_at: Location,
    pub backlog: u32,
    pub steering: Steering,
    /// `steering = "auto"` (the default): why it chose what it did.
    pub steering_auto: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// The worker's slot accepts a probe connection.
    Tcp,
    /// An HTTP GET of this path answers 2xx/3xx (parsed now, probed from the steering issue on).
    Http(String),
    /// The worker sends `READY=1` on its `NOTIFY_SOCKET`.
    Notify,
    /// Ready this long after exec.
    Delay(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    Fixed(NonZeroU32),
    /// One per online CPU, resolved when the agent plans the app.
    Auto,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workers {
    pub count: WorkerCount,
    pub count_at: Location,
    pub memory_max: Option<ByteSize>,
    pub memory_high: Option<ByteSize>,
    pub cpu_max: Option<f64>,
    pub pids_max: Option<NonZeroU32>,
    pub stop_timeout: Duration,
    pub ready: Ready,
    pub ready_timeout: Duration,
    /// How many ready workers make the app ready for the health endpoint's `/readyz` (at most
    /// the app's current worker count counts).
    pub min_ready: NonZeroU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub policy: RestartMode,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Restarts allowed within `window` before the slot gives up.
    pub max_restarts: u32,
    pub window: Duration,
    /// A run at least this long counts as stable: the backoff starts over.
    pub reset_after: Duration,
}

impl Restart {
    /// What `[app.NAME.restart]` gives when it says nothing (and what TLS fronts get).
    pub const DEFAULT: Restart = Restart {
        policy: RestartMode::Always,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
        max_restarts: 5,
        window: Duration::from_secs(60),
        reset_after: Duration::from_secs(10),
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreStart {
    /// `step N` (1-based) or the optional `name` key.
    pub name: String,
    pub command: Vec<String>,
    pub timeout: Duration,
    /// Where the step's program (`command[0]`) is written.
    pub at: Location,
}

pub use crate::front::args::{HttpArgs, KtlsMode, ProxyMode, UpstreamMode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub address: SocketAddr,
    pub address_at: Location,
    /// The default certificate chain and key: for clients without SNI or with a name no other
    /// certificate has. `None` only with `acme` (whose certificate is then the default).
    pub cert: Option<CertPair>,
    /// More certificates, chosen by SNI among the DNS names each one is valid for.
    pub sni: Vec<CertPair>,
    /// Certificates obtained and renewed from an ACME CA (`acme = { ... }`).
    pub acme: Option<Acme>,
    pub ktls: KtlsMode,
    pub redirect_http: Option<SocketAddr>,
    /// Who the front processes run as (never the app's workers' user by default: the key must
    /// not reach them).
    pub identity: Identity,
    /// Front processes (`auto`: one per online CPU).
    pub processes: WorkerCount,
    pub processes_at: Location,
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, per front process; more wait in the accept queue.
    pub max_handshakes: u32,
    /// Send the client's address to the worker in a PROXY protocol v2 header (`proxy = "tcp"`).
    pub proxy_protocol: bool,
    /// HTTP-aware (default) or bytes.
    pub proxy: ProxyMode,
    /// The HTTP proxy's trusted proxies, limits and timeouts (`proxy = "http"`).
    pub http: HttpArgs,
}

/// The ACME challenge a front answers (DNS-01 is out of scope: it needs a DNS provider's API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AcmeChallenge {
    /// On the TLS address itself (RFC 8737): no other port.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// On the `redirect_http` listener, under `/.well-known/acme-challenge/`.
    #[serde(rename = "http-01")]
    Http01,
}

impl AcmeChallenge {
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Http01 => "http-01",
        }
    }
}

/// `[app.NAME.tls] acme = { ... }`: one certificate for `domains`, obtained and renewed by the
/// agent (through an unprivileged `corral acme` process) and served by the front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// Lower-case DNS names, no wildcard, no duplicate; the first is the certificate's subject.
    pub domains: Vec<String>,
    pub email: Option<String>,
    /// The CA's directory URL (https).
    pub directory: String,
    /// A PEM file of roots that the CA's own TLS certificate must chain to, instead of the
    /// system's.
    pub directory_ca: Option<PathBuf>,
    pub challenge: AcmeChallenge,
    /// Where `acme` is written.
    pub at: Location,
    /// The account and certificate of this front: `[agent] acme_dir` / the app's name.
    pub dir: PathBuf,
}

impl Acme {
    /// Where the obtained certificate chain and its key are kept.
    pub fn cert_pair(&self) -> CertPair {
        CertPair {
            cert: self.dir.join("cert.pem"),
            key: self.dir.join("key.pem"),
        }
    }

    /// Where the fronts read challenge answers (written by the `corral acme` process, both as
    /// the front's user): beside `dir`, which is root's alone.
    pub fn challenge_dir(&self) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(".challenges");
        self.dir.with_file_name(name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// Every certificate and key from files, the default first (the ACME certificate, which
    /// may not exist yet, is `acme.cert_pair()`).
    pub fn cert_pairs(&self) -> Vec<CertPair> {
        let mut v: Vec<CertPair> = self.cert.iter().cloned().collect();
        v.extend(self.sni.iter().cloned());
        v
    }
}

/// What an app's processes are.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// The app's own workers.
    Workers,
    /// The TLS front of app `of` (an app `<of>.tls` the config makes from `[app.<of>.tls]`):
    /// `corral front` processes proxying to `of`'s workers.
    TlsFront { of: AppName, tls: Box<Tls> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub name: AppName,
    /// Where `[app.NAME]` is defined.
    pub defined_at: Location,
    /// argv; never empty. `command[0]` is resolved through PATH at exec when it has no `/`.
    pub command: Vec<String>,
    /// Where `command[0]` is written.
    pub command_at: Location,
    pub workdir: PathBuf,
    pub identity: Identity,
    /// `env_file` entries first, then `env` (which wins).
    pub env: BTreeMap<String, String>,
    pub listen: Listen,
    pub workers: Workers,
    pub restart: Restart,
    pub pre_start: Vec<PreStart>,
    pub tls: Option<Tls>,
    pub role: Role,
}

/// Where corral's cgroup subtree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupRoot {
    /// The agent's own cgroup, when systemd delegated it (Delegate=yes); otherwise none.
    Auto,
    /// This existing cgroup v2 directory, delegated to corral by whoever made it.
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub include: Vec<String>,
    pub state_dir: PathBuf,
    /// ACME accounts and certificates (root-only), one directory per front: kept across
    /// reboots, unlike `state_dir`'s default.
    pub acme_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub control_socket: PathBuf,
    /// The Prometheus endpoint (`GET /metrics`), and where it is written.
    pub metrics: Option<SocketAddr>,
    pub metrics_at: Option<Location>,
    pub enforce_limits: bool,
    pub allow_overcommit: bool,
    pub cgroup_root: CgroupRoot,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The main file, then every included file in sorted order.
    pub files: Vec<PathBuf>,
    pub agent: Agent,
    pub apps: BTreeMap<AppName, App>,
}
