//! The control socket protocol: one JSON request line, one JSON response line, over the unix
//! socket at `[agent] control_socket` (mode 0600: root only). The CLI's `status`, `top`,
//! `reload`, `restart` and `scale` are clients of it.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status {
        app: Option<String>,
    },
    Reload {
        app: Option<String>,
    },
    Restart {
        app: String,
        worker: Option<u32>,
    },
    Scale {
        app: String,
        count: u32,
    },
    /// Re-execute the agent in place, keeping every worker (see `supervisor::handoff`).
    Reexec,
    /// The last `lines` output lines of an app (or of one of its workers, or of every app),
    /// only those after sequence number `after` when given (`corral logs -f` asks again).
    Logs {
        app: Option<String>,
        worker: Option<u32>,
        after: Option<u64>,
        lines: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Ok {
        message: String,
    },
    Status {
        apps: Vec<AppStatus>,
        /// The agent itself (absent from agents before `corral reexec` existed).
        #[serde(default)]
        agent: Option<AgentInfo>,
    },
    Error {
        message: String,
    },
    Logs {
        lines: Vec<LogLine>,
        /// Ask again with `after` = this for what comes next.
        next: u64,
    },
}

/// One line a worker or pre-start step wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub seq: u64,
    /// When the agent read it (Unix milliseconds); for lines the keeper kept while no agent
    /// ran, when the next agent logged them.
    pub unix_ms: u64,
    pub app: String,
    /// `worker=N` or `step=NAME`.
    pub who: String,
    pub pid: i32,
    pub stream: String,
    pub line: String,
    /// Kept by the keeper while no agent ran.
    #[serde(default)]
    pub kept: bool,
}

/// The agent process answering.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub pid: u32,
    /// corral's version of the running image.
    pub version: String,
    /// How many times this agent re-executed itself (`corral reexec`) since it started.
    pub generation: u32,
    /// Why the last `corral reexec` failed, when it did (the agent kept running as it was).
    pub reexec_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppStatus {
    pub name: String,
    /// starting | running | degraded | failed | stopping | stopped
    pub state: String,
    pub reason: Option<String>,
    pub address: String,
    /// How new connections are spread: "least-loaded (eBPF, ...)", "hash (...)".
    pub steering: String,
    /// The steering program's counters, when eBPF steers this app.
    pub steering_stats: Option<SteeringStats>,
    /// A TLS front (`NAME.tls`): its processes' counters, and the kernel's.
    #[serde(default)]
    pub tls: Option<FrontStats>,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FrontStats {
    /// Since the front app started (exited processes included; `open_connections` is now).
    /// Names in `front::stats::NAMES`.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// /proc/net/tls_stat (empty without the kernel's tls module).
    pub kernel_tls_stat: std::collections::BTreeMap<String, u64>,
    /// The ACME certificate's state, for a front with `acme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeStatus>,
}

/// An ACME front's certificate: when it expires, when it is renewed, how the orders went.
/// Times are unix seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AcmeStatus {
    pub domains: Vec<String>,
    pub challenge: String,
    pub directory: String,
    /// The certificate in service; `None` before the first one.
    pub not_after: Option<i64>,
    pub renew_at: Option<i64>,
    /// What set `renew_at`: "ARI window" or "two thirds of its lifetime".
    pub renewal: String,
    /// Orders started, and how many failed.
    pub attempts: u64,
    pub failures: u64,
    /// The last failure (cleared by a success), and when it happened.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// When the next order after a failure is due.
    pub next_attempt: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SteeringStats {
    /// Connections steered to a ready worker.
    pub selected: u64,
    /// Probe connections steered to the slot they named.
    pub probes: u64,
    /// Queued connections moved off a closing listener.
    pub migrations: u64,
    /// Selections that failed (the slot had no socket at that instant).
    pub select_errors: u64,
    /// Connections left to the kernel's hash because no candidate worked.
    pub fallbacks: u64,
    /// Connections left to the kernel's hash because no worker was ready.
    pub no_eligible: u64,
    /// Established connections the tracker counted (in-flight accounting).
    #[serde(default)]
    pub tracked: u64,
    /// Established connections on the port the tracker had no pick for (e.g. probes).
    #[serde(default)]
    pub untracked: u64,
    /// The kernel's ids of the steering programs (`bpftool prog show id N`; with
    /// `sysctl kernel.bpf_stats_enabled=1` it shows their run time per run).
    #[serde(default)]
    pub programs: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub slot: u32,
    pub pid: Option<i32>,
    /// starting | ready | draining | stopping | exited | waiting (restart backoff) | failed
    pub state: String,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Workers of this slot the kernel killed at memory.max.
    #[serde(default)]
    pub oom_kills: u64,
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub memory_max: Option<u64>,
    pub cpu_ms: Option<u64>,
    /// Connections the steering program sent to this worker's slot since its socket group
    /// was created (eBPF steering only).
    pub connections: Option<u64>,
    /// Connections steered to this slot that are established and not yet closed by the worker
    /// (queued or being served): the load least-loaded steering sees. Per slot, so a replaced
    /// worker's slot may still count connections its predecessor's queue handed on.
    #[serde(default)]
    pub inflight: Option<u32>,
    /// pids.current of its cgroup leaf.
    pub pids: Option<u64>,
    /// Its cgroup leaf, when corral has a cgroup root (then `rss_bytes` and `peak_rss_bytes` are
    /// the leaf's memory.current and memory.peak, `cpu_ms` its cpu.stat usage).
    pub cgroup: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {path}: {source} (is `corral agent` running, and are you root?)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent sent a reply corral cannot read: {0}")]
    Decode(String),
}

/// Send one request and wait for its response (reloads can take a while: up to `timeout`).
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let p = path.display().to_string();
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: p.clone(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: p.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line =
        serde_json::to_string(request).map_err(|e| ClientError::Decode(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| ClientError::Decode(format!("{e}: {reply:?}")))
}
