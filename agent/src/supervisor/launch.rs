//! Turning an app's config into what `sys::spawn` needs, once per app (re)start, so a restart
//! after a crash only clones and spawns.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{App, Role};
use crate::front::fds;
use crate::sys::pidfd::Process;
use crate::sys::spawn::{self, SpawnError, Spec};
use crate::sys::users;

/// The default PATH for workers, as systemd gives services.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started process: its handle, the read ends of its stdout and stderr, and (a TLS front)
/// the counters it keeps.
pub struct Started {
    pub process: Arc<Process>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub counters: Option<Arc<crate::sys::front::SharedCounters>>,
    /// The counters' memfd (kept to hand the mapping to the agent's next image).
    pub counters_fd: Option<OwnedFd>,
}

/// Everything needed to start a process of an app, resolved ahead of time.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub argv: Vec<String>,
    /// Without the per-worker variables.
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// A TLS front's certificate bundle (a sealed memfd), passed as `fds::BUNDLE`, and its
    /// digest.
    pub bundle: Option<(Arc<OwnedFd>, u64)>,
    /// A TLS front's plain-HTTP listener for `redirect_http`, passed as `fds::REDIRECT`.
    pub redirect: Option<Arc<OwnedFd>>,
}

impl Launch {
    /// The worker environment: a clean one, as systemd builds for a service (PATH, HOME, USER,
    /// LOGNAME, SHELL, LANG), then the app's env_file and env. Nothing else of the agent's own
    /// environment leaks in (NOTIFY_SOCKET, LISTEN_*, WATCHDOG_*, secrets).
    pub fn for_app(app: &App, argv: &[String]) -> Result<Launch, SpawnError> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v));
        };
        set("PATH", DEFAULT_PATH.to_string());
        if let Some((home, shell)) = users::home_and_shell(app.identity.uid) {
            set("HOME", home);
            set("SHELL", shell);
        }
        set("USER", app.identity.user.clone());
        set("LOGNAME", app.identity.user.clone());
        if let Ok(lang) = std::env::var("LANG") {
            set("LANG", lang);
        }
        for (k, v) in &app.env {
            set(k, v.clone());
        }
        // Test-only (tests/tls.rs): a TLS front's start delay, from the agent's own environment.
        if matches!(app.role, Role::TlsFront { .. }) {
            let var = crate::front::process::TEST_START_DELAY_VAR;
            if let Ok(ms) = std::env::var(var) {
                set(var, ms);
            }
        }
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let program = spawn::resolve_program(&argv[0], &path_var)?;
        Ok(Launch {
            program,
            argv: argv.to_vec(),
            env,
            workdir: app.workdir.clone(),
            uid: app.identity.uid,
            gid: app.identity.gid,
            bundle: None,
            redirect: None,
        })
    }

    /// Start a process: with `fd3` and `extra` worker variables for a worker, none for a step.
    /// Returns the process and the read ends of its stdout and stderr.
    pub fn start(
        &self,
        fd3: Option<&OwnedFd>,
        extra: &[(String, String)],
        cgroup: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Started, String> {
        let (out_r, out_w) = spawn::output_pipe().map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) = spawn::output_pipe().map_err(|e| format!("pipe: {e}"))?;
        let mut env = self.env.clone();
        env.extend(extra.iter().cloned());
        // A TLS front: its certificates, its counters and the redirect listener, as the
        // numbers of front::fds.
        let mut owned: Vec<(RawFd, OwnedFd)> = Vec::new();
        let mut counters = None;
        let mut counters_fd = None;
        if let Some((memfd, _)) = &self.bundle {
            owned.push((
                fds::BUNDLE,
                crate::sys::front::reopen(memfd)
                    .map_err(|e| format!("opening the certificate bundle: {e}"))?,
            ));
            let (c, fd) = crate::sys::front::SharedCounters::create(
                "corral-front-counters",
                crate::front::stats::COUNT,
            )
            .map_err(|e| format!("the counters memfd: {e}"))?;
            counters_fd = Some(
                fd.try_clone()
                    .map_err(|e| format!("the counters memfd: {e}"))?,
            );
            owned.push((fds::COUNTERS, fd));
            counters = Some(Arc::new(c));
        }
        let mut more_fds: Vec<(RawFd, BorrowedFd<'_>)> =
            owned.iter().map(|(n, f)| (*n, f.as_fd())).collect();
        if let Some(r) = &self.redirect {
            more_fds.push((fds::REDIRECT, r.as_fd()));
        }
        let spec = Spec {
            program: &self.program,
            argv: &self.argv,
            env: &env,
            listen_pid: fd3.is_some(),
            workdir: &self.workdir,
            uid: self.uid,
            gid: self.gid,
            fd3: fd3.map(|f| f.as_fd()),
            more_fds: &more_fds,
            stdin: None,
            stdout: out_w.as_fd(),
            stderr: err_w.as_fd(),
            cgroup,
            die_with_agent: fd3.is_none(),
        };
        let child = spawn::spawn(&spec).map_err(|e| e.to_string())?;
        let process = Process::new(child.pid, child.pidfd).map_err(|e| e.to_string())?;
        Ok(Started {
            process: Arc::new(process),
            stdout: out_r,
            stderr: err_r,
            counters,
            counters_fd,
        })
    }
}
