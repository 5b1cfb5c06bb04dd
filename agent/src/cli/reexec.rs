//! `corral reexec`: ask the agent to restart itself in place, then wait for the new image.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};

use corral::control::{self, Request, Response};

use super::Target;

/// The agent answering on `target`.
fn agent_info(target: &Target) -> Result<control::AgentInfo> {
    match target.call(&Request::Status { app: None })? {
        Response::Status {
            agent: Some(info), ..
        } => Ok(info),
        Response::Status { agent: None, .. } => {
            bail!("this agent predates `corral reexec`: restart it instead (systemctl restart corral)")
        }
        Response::Error { message } => bail!("{message}"),
        Response::Ok { message } => bail!("unexpected answer: {message}"),
        Response::Logs { .. } => bail!("the agent answered with log lines where none were asked"),
    }
}

/// `corral reexec`: ask, then wait for the new image (or the reason the old one stayed).
pub fn run(target: &Target) -> Result<ExitCode> {
    let before = agent_info(target)?;
    match target.call(&Request::Reexec)? {
        Response::Ok { message } => println!("{message}"),
        Response::Error { message } => bail!("{message}"),
        Response::Status { .. } | Response::Logs { .. } => {
            bail!("the agent answered something else than was asked")
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // The control socket stays open across the exec: requests wait in its backlog until
        // the new image accepts them.
        match agent_info(target) {
            Ok(now) if now.generation > before.generation => {
                println!(
                    "the agent (pid {}) runs corral {} now, re-executed {} time{} since it started",
                    now.pid,
                    now.version,
                    now.generation,
                    if now.generation == 1 { "" } else { "s" }
                );
                return Ok(ExitCode::SUCCESS);
            }
            Ok(now) => {
                // The agent handles requests in order: one answered by the same image after
                // the reply means the exec failed (and it says why).
                bail!(
                    "the re-exec failed and the agent runs on as it was: {}",
                    now.reexec_error.as_deref().unwrap_or("no reason given")
                );
            }
            Err(_) if std::time::Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent did not come back from its re-exec within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
