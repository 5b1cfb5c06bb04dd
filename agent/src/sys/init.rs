//! corral as a container's PID 1: a minimal init in front of the agent.
//!
//! PID 1 of a PID namespace has two duties the agent's event loop should not carry: every
//! orphan in the namespace (a worker's double-forked grandchild) is reparented to it and stays
//! a zombie until it reaps it, and signals without a handler are dropped (so a SIGTERM from the
//! kubelet must be caught explicitly). Reaping "every child but the workers" inside the agent
//! would race its pidfd waits: `waitpid(-1)` steals a worker's exit status from
//! `waitid(P_PIDFD)`, and even `waitid(P_ALL, WNOWAIT)` then reap-if-not-ours cannot tell a
//! worker cloned a moment ago from an orphan, and an unreaped worker hides the zombies behind
//! it. So, like tini, the agent forks once at start when it finds itself PID 1: the parent stays
//! PID 1, reaps every child it gets with `waitpid(-1)` and forwards signals; the child is the
//! agent (PID 2), whose workers stay its own children, waited for through pidfds as anywhere
//! else. When the agent ends, its caller asks `policy::init` what follows: an exit ends the
//! init with the agent's status (the kernel then kills whatever is left in the namespace); a
//! crash forks a new agent, which adopts the workers the keeper held.

use std::io;

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, ForkResult, Pid};

#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct InitError {
    call: &'static str,
    #[source]
    source: io::Error,
}

fn err(call: &'static str) -> impl FnOnce(nix::errno::Errno) -> InitError {
    move |e| InitError {
        call,
        source: e.into(),
    }
}

/// Whether this process is PID 1 of its PID namespace.
pub fn is_pid1() -> bool {
    getpid().as_raw() == 1
}

/// The signals the init waits for: all but those the kernel raises for a fault of the init's
/// own (blocking those would make a crash hang) and the two no one can catch.
fn waited() -> SigSet {
    let mut set = SigSet::all();
    for s in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGFPE,
        Signal::SIGILL,
        Signal::SIGTRAP,
        Signal::SIGABRT,
        Signal::SIGSYS,
        Signal::SIGKILL,
        Signal::SIGSTOP,
    ] {
        set.remove(s);
    }
    set
}

/// PID 1's side of the split: the signals it waits for are blocked from [`Init::new`] on (a
/// blocked signal is never dropped, even for PID 1), and each agent it forks gets the mask the
/// process had before.
pub struct Init {
    set: SigSet,
    old: SigSet,
}

/// How the agent under PID 1 ended (`stopping`: a stop signal had been forwarded to it).
#[derive(Debug, Clone, Copy)]
pub struct AgentEnd {
    /// `Exited` or `Signaled`.
    pub status: WaitStatus,
    pub stopping: bool,
}

impl Init {
    /// Call it while the process has one thread (before any runtime starts), and keep it that
    /// way in the parent: [`Init::fork_agent`] forks.
    pub fn new() -> Result<Init, InitError> {
        let set = waited();
        let mut old = SigSet::empty();
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
            .map_err(err("sigprocmask"))?;
        Ok(Init { set, old })
    }

    /// Fork an agent: `None` in the child (the agent, with the signal mask the process had),
    /// the agent's pid in the parent (PID 1).
    pub fn fork_agent(&self) -> Result<Option<Pid>, InitError> {
        // SAFETY: the process has a single thread (Init::new's contract: PID 1 never starts
        // another), so the child may run arbitrary code; the parent only makes
        // async-signal-safe calls in its loop anyway.
        match unsafe { fork() }.map_err(err("fork"))? {
            ForkResult::Child => {
                nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None)
                    .map_err(err("sigprocmask"))?;
                Ok(None)
            }
            ForkResult::Parent { child } => Ok(Some(child)),
        }
    }

    /// PID 1's loop while `agent` runs: reap every child, forward every other signal to the
    /// agent; returns when the agent has exited.
    pub fn wait_agent(&self, agent: Pid) -> AgentEnd {
        let mut stopping = false;
        loop {
            let sig = match self.set.wait() {
                Ok(s) => s,
                // sigwait fails only for an invalid set; nothing to do but try again.
                Err(_) => continue,
            };
            if sig == Signal::SIGCHLD {
                if let Some(status) = reap_all(agent) {
                    return AgentEnd { status, stopping };
                }
            } else {
                stopping |= matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT);
                // The agent may have exited a moment ago (its SIGCHLD is next): nothing to tell.
                let _ = kill(agent, sig);
            }
        }
    }
}

/// Reap every child that has exited; how the agent ended if it was one of them. Orphans
/// (a worker's double-forked grandchild, a crashed agent's workers, reparented here) are
/// reaped and forgotten: a restarted agent learns of its adopted workers' exits through their
/// pidfds.
fn reap_all(agent: Pid) -> Option<WaitStatus> {
    let mut agent_status = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(s @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                if pid == agent =>
            {
                agent_status = Some(s)
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return agent_status,
            // An orphan, reaped.
            Ok(_) => {}
        }
    }
}
