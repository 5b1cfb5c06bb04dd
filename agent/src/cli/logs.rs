//! `corral logs [APP[/WORKER]] [-f] [-n N]`: the lines the workers and pre-start steps wrote,
//! as the agent has them (its recent lines, those the keeper kept while no agent ran
//! included); with `-f`, asking again for what came next until Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use corral::control::{LogLine, Request, Response};

use super::Target;

/// `APP` or `APP/WORKER`.
pub fn parse_target(text: &str) -> Result<(String, Option<u32>)> {
    match text.split_once('/') {
        None => Ok((text.to_string(), None)),
        Some((a, w)) => {
            let n = w.parse::<u32>().with_context(|| {
                format!("`{text}`: the worker after `/` must be a number (0-based slot)")
            })?;
            Ok((a.to_string(), Some(n)))
        }
    }
}

/// One line as printed: `APP/WORKER pid stream | line` (`APP step=NAME ...` for a pre-start
/// step; `(kept)` marks lines the keeper held while no agent ran).
pub fn render(l: &LogLine) -> String {
    let who = match l.who.strip_prefix("worker=") {
        Some(n) => format!("{}/{n}", l.app),
        None => format!("{} {}", l.app, l.who),
    };
    format!(
        "{who} pid={} {}{} | {}",
        l.pid,
        l.stream,
        if l.kept { " (kept)" } else { "" },
        l.line
    )
}

pub fn run(target: &Target, which: Option<&str>, follow: bool, lines: u32) -> Result<ExitCode> {
    let (app, worker) = match which {
        None => (None, None),
        Some(t) => {
            let (a, w) = parse_target(t)?;
            (Some(a), w)
        }
    };
    let mut after = None;
    let mut want = lines;
    loop {
        let request = Request::Logs {
            app: app.clone(),
            worker,
            after,
            lines: want,
        };
        match target.call(&request)? {
            Response::Logs { lines, next } => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for l in &lines {
                    // A reader that went away (`corral logs -f | head`) ends the command.
                    if writeln!(out, "{}", render(l)).is_err() {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                if out.flush().is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
                after = Some(next);
            }
            Response::Error { message } => bail!("{message}"),
            Response::Ok { .. } | Response::Status { .. } => {
                bail!("the agent answered something else than log lines")
            }
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        // Everything new from now on.
        want = u32::MAX;
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_lines_read_as_documented() {
        assert_eq!(parse_target("api").unwrap(), ("api".into(), None));
        assert_eq!(parse_target("api/2").unwrap(), ("api".into(), Some(2)));
        let e = parse_target("api/x").unwrap_err().to_string();
        assert!(e.contains("must be a number"), "{e}");
        let l = LogLine {
            seq: 1,
            unix_ms: 0,
            app: "api".into(),
            who: "worker=2".into(),
            pid: 42,
            stream: "stdout".into(),
            line: "hello".into(),
            kept: true,
        };
        assert_eq!(render(&l), "api/2 pid=42 stdout (kept) | hello");
    }
}
