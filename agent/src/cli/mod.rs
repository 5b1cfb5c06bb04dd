//! The command line's work beyond parsing: what each subcommand prints and how it talks to the
//! agent. Part of the binary, so anyhow is used here as in main.rs.

pub mod check;
pub mod logs;
pub mod reexec;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};

use corral::config;
use corral::control::{self, Request, Response};
use corral::sys::users::SystemLookup;

pub const DEFAULT_CONFIG: &str = "/etc/corral/corral.toml";

/// Which agent to talk to.
#[derive(clap::Args)]
pub struct Target {
    /// Config whose `[agent] control_socket` to use.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The control socket, overriding the config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        match config::load(&self.config, &SystemLookup) {
            Ok(c) => c.agent.control_socket,
            Err(_) => PathBuf::from("/run/corral/control.sock"),
        }
    }

    pub fn call(&self, request: &Request) -> Result<Response> {
        let path = self.socket();
        Ok(control::call(&path, request, Duration::from_secs(600))?)
    }
}

/// Print an agent's plain answer; its error is the command's.
pub fn simple(response: Response) -> Result<ExitCode> {
    match response {
        Response::Ok { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => bail!("{message}"),
        Response::Status { .. } | Response::Logs { .. } => {
            bail!("the agent answered something else than was asked")
        }
    }
}
