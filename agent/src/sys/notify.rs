//! sd_notify: tell systemd (Type=notify) about the agent's state over `NOTIFY_SOCKET`.

use std::io;
use std::os::unix::net::UnixDatagram;

#[derive(Debug, thiserror::Error)]
#[error("sd_notify to {socket}: {source}")]
pub struct NotifyError {
    pub socket: String,
    #[source]
    pub source: io::Error,
}

/// The systemd notification socket the agent was started with, if any.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`. The variable is never passed on to workers (they get their own).
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Send `state` (e.g. "READY=1"); a no-op without `NOTIFY_SOCKET`.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let err = |source| NotifyError {
            socket: path.clone(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        if let Some(abstract_name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .map_err(err)?;
            sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
        } else {
            sock.send_to(state.as_bytes(), path).map_err(err)?;
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in microseconds, for `MONOTONIC_USEC=` with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
