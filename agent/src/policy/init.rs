//! What PID 1 does when the agent under it ends (corral as a container's entrypoint, see
//! `sys::init`).
//!
//! An agent that exits (a planned stop, a config it refuses at start) ends the container with
//! its status, as any entrypoint's would. An agent that crashes (killed by a signal it did not
//! ask for: the OOM killer, a `kill -9`, a fault; or a Rust panic, status 101) is started
//! again: its workers, sockets and output were left running and are held by the keeper, so the
//! new agent adopts them and the pod goes on serving, where a container restart would drop
//! every connection and start every app cold. At most [`MAX_RESTARTS`] within [`WINDOW`]: an
//! agent that crashes in a loop ends the container, and the engine's restart policy takes over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::restart::ExitStatus;

/// Restarts allowed within [`WINDOW`].
pub const MAX_RESTARTS: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);

/// Rust's exit status for a panic that unwound out of `main`.
const PANIC_STATUS: i32 = 101;

/// How the agent under PID 1 ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentEnd {
    pub status: ExitStatus,
    /// PID 1 had forwarded it a stop signal (SIGTERM, SIGINT, SIGQUIT): whatever it died of,
    /// it was stopping.
    pub stopping: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAgent {
    /// End the container with this exit status.
    Exit(i32),
    /// Start the agent again; `why` is for the log.
    Restart { why: String },
}

/// Decide, given when the agent was restarted before (`restarts`, pruned to the window here).
pub fn after_agent(end: AgentEnd, restarts: &mut VecDeque<Instant>, now: Instant) -> AfterAgent {
    let code = match end.status {
        ExitStatus::Exited(c) => c,
        ExitStatus::Signaled { signal, .. } => 128 + signal,
    };
    let crashed = match end.status {
        ExitStatus::Exited(c) => c == PANIC_STATUS,
        ExitStatus::Signaled { .. } => true,
    };
    if !crashed || end.stopping {
        return AfterAgent::Exit(code);
    }
    while restarts
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
    {
        restarts.pop_front();
    }
    if restarts.len() >= MAX_RESTARTS {
        return AfterAgent::Exit(code);
    }
    restarts.push_back(now);
    AfterAgent::Restart {
        why: format!(
            "the agent {} (restart {} of at most {MAX_RESTARTS} within {}s)",
            end.status,
            restarts.len(),
            WINDOW.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn killed(signal: i32) -> AgentEnd {
        AgentEnd {
            status: ExitStatus::Signaled {
                signal,
                core_dumped: false,
            },
            stopping: false,
        }
    }

    #[test]
    fn an_exit_ends_the_container_with_its_status() {
        let mut r = VecDeque::new();
        let now = Instant::now();
        for code in [0, 1, 2] {
            let end = AgentEnd {
                status: ExitStatus::Exited(code),
                stopping: false,
            };
            assert_eq!(after_agent(end, &mut r, now), AfterAgent::Exit(code));
        }
        assert!(r.is_empty());
    }

    #[test]
    fn a_crash_restarts_the_agent_but_not_while_stopping() {
        let mut r = VecDeque::new();
        let now = Instant::now();
        assert!(matches!(
            after_agent(killed(9), &mut r, now),
            AfterAgent::Restart { why } if why.contains("killed by signal 9 (SIGKILL)")
        ));
        let panic = AgentEnd {
            status: ExitStatus::Exited(101),
            stopping: false,
        };
        assert!(matches!(
            after_agent(panic, &mut r, now),
            AfterAgent::Restart { .. }
        ));
        let mut stopping = killed(9);
        stopping.stopping = true;
        assert_eq!(after_agent(stopping, &mut r, now), AfterAgent::Exit(137));
    }

    #[test]
    fn a_crash_loop_ends_the_container_and_the_window_slides() {
        let mut r = VecDeque::new();
        let t0 = Instant::now();
        for i in 0..MAX_RESTARTS {
            let at = t0 + Duration::from_secs(i as u64);
            assert!(matches!(
                after_agent(killed(11), &mut r, at),
                AfterAgent::Restart { .. }
            ));
        }
        let at = t0 + Duration::from_secs(10);
        assert_eq!(after_agent(killed(11), &mut r, at), AfterAgent::Exit(139));
        // A minute after the first restart, one more is allowed again.
        let later = t0 + WINDOW;
        assert!(matches!(
            after_agent(killed(11), &mut r, later),
            AfterAgent::Restart { .. }
        ));
    }
}
