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
//! else. The init exits with the agent's status when the agent exits; the kernel then kills
//! whatever is left in the namespace.

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

/// Fork the agent off a PID-1 init. Returns in the child (the agent, with the signal mask it
/// had); the parent never returns: it runs [`init_loop`] and exits with the
/// agent's status. Call it while the process has one thread (before any runtime starts).
pub fn split_init() -> Result<(), InitError> {
    let set = waited();
    let mut old = SigSet::empty();
    // Blocked before the fork, so no signal sent between the fork and the init's first wait is
    // lost (a blocked signal is never dropped, even for PID 1).
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
        .map_err(err("sigprocmask"))?;
    // SAFETY: the process has a single thread here (the caller's contract), so the child may
    // run arbitrary code; the parent only makes async-signal-safe calls in its loop anyway.
    match unsafe { fork() }.map_err(err("fork"))? {
        ForkResult::Child => {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)
                .map_err(err("sigprocmask"))?;
            Ok(())
        }
        ForkResult::Parent { child } => init_loop(child, &set),
    }
}

/// PID 1's loop: reap every child, forward every other signal to the agent, exit with the
/// agent's status (its exit code, or 128 + the signal that killed it).
fn init_loop(agent: Pid, set: &SigSet) -> ! {
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            // sigwait fails only for an invalid set; nothing to do but try again.
            Err(_) => continue,
        };
        if sig == Signal::SIGCHLD {
            if let Some(code) = reap_all(agent) {
                std::process::exit(code);
            }
        } else {
            // The agent may have exited a moment ago (its SIGCHLD is next): nothing to tell.
            let _ = kill(agent, sig);
        }
    }
}

/// Reap every child that has exited; the agent's exit status if the agent was one of them.
fn reap_all(agent: Pid) -> Option<i32> {
    let mut agent_status = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => agent_status = Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => {
                agent_status = Some(128 + sig as i32)
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return agent_status,
            // An orphan, reaped.
            Ok(_) => {}
        }
    }
}
