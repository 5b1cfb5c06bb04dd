//! Pre-start steps: run in order, once, before any worker of the app; a failure or a timeout
//! stops the sequence and keeps the workers from starting.

use crate::config::PreStart;
use crate::policy::restart::format_duration;

use super::launch::Launch;
use super::output::{self, Tag};

/// Run every step; `Err` names the step and what went wrong.
/// With `leaf`, every step runs in it, and whatever a step left running is killed with the leaf
/// when the sequence ends.
pub async fn run_steps(
    app: String,
    steps: Vec<(PreStart, Launch)>,
    leaf: Option<crate::sys::cgroup::Leaf>,
) -> Result<(), String> {
    let result = run_in(&app, steps, leaf.as_ref()).await;
    if let Some(leaf) = leaf {
        super::cgroups::teardown(leaf).await;
    }
    result
}

async fn run_in(
    app: &str,
    steps: Vec<(PreStart, Launch)>,
    leaf: Option<&crate::sys::cgroup::Leaf>,
) -> Result<(), String> {
    for (step, launch) in steps {
        let started = std::time::Instant::now();
        tracing::info!(app = %app, step = %step.name, "pre-start: running {}", crate::sys::spawn::display_argv(&step.command));
        let super::launch::Started {
            process,
            stdout: out,
            stderr: err,
            ..
        } = launch
            .start(None, &[], leaf.map(|l| l.dir_fd()))
            .map_err(|e| format!("pre-start {} ({}) could not start: {e}", step.name, step.at))?;
        for (fd, stream) in [(out, "stdout"), (err, "stderr")] {
            output::forward(
                fd,
                Tag {
                    app: app.to_string(),
                    who: format!("step={:?}", step.name),
                    pid: process.pid(),
                    stream,
                },
            );
        }
        let status = match tokio::time::timeout(step.timeout, process.wait()).await {
            Ok(status) => status.map_err(|e| e.to_string())?,
            Err(_) => {
                let _ = process.signal(libc::SIGKILL);
                let _ = process.wait().await;
                return Err(format!(
                    "pre-start {} timed out after {} and was killed",
                    step.name,
                    format_duration(step.timeout)
                ));
            }
        };
        let status = super::exit_status(status);
        if !status.success() {
            return Err(format!("pre-start {} {status}", step.name));
        }
        tracing::info!(app = %app, step = %step.name, "pre-start: done in {}", format_duration(started.elapsed()));
    }
    Ok(())
}
