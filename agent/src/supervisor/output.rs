//! Worker and pre-start output: read each pipe line by line and log it tagged with who wrote it.

use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;

/// Longest line logged as one record; longer lines are split.
const MAX_LINE: usize = 16 * 1024;

/// Who a line of output belongs to.
#[derive(Debug, Clone)]
pub struct Tag {
    pub app: String,
    /// `worker=N` or `step=NAME`.
    pub who: String,
    pub pid: i32,
    pub stream: &'static str,
}

/// Log every line read from `fd` until EOF (the process and all holders of the write end are
/// gone).
pub fn forward(fd: OwnedFd, tag: Tag) {
    let receiver = match pipe::Receiver::from_owned_fd(fd) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(app = %tag.app, "cannot read {} of pid {}: {e}", tag.stream, tag.pid);
            return;
        }
    };
    tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(MAX_LINE, receiver);
        let mut buf = Vec::with_capacity(256);
        loop {
            buf.clear();
            let n = {
                let mut limited = (&mut reader).take_line(MAX_LINE);
                match limited.read_until(b'\n', &mut buf).await {
                    Ok(n) => n,
                    Err(_) => break,
                }
            };
            if n == 0 {
                break;
            }
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            let line = String::from_utf8_lossy(&buf);
            tracing::info!(
                target: "corral::output",
                "app={} {} pid={} {}: {}",
                tag.app,
                tag.who,
                tag.pid,
                tag.stream,
                line
            );
        }
    });
}

/// Log the lines the keeper drained while no agent ran, as [`forward`] would have.
pub fn replay(lines: Vec<crate::keeper::SpoolLine>) {
    if lines.is_empty() {
        return;
    }
    tracing::info!(
        "{} lines the workers wrote while no agent ran, kept by the keeper:",
        lines.len()
    );
    for l in lines {
        tracing::info!(
            target: "corral::output",
            "app={} {} pid={} {}: {}{}",
            l.app,
            l.who,
            l.pid,
            l.stream,
            l.line,
            if l.partial { " [line continues below]" } else { "" }
        );
    }
}

trait TakeLine {
    fn take_line(self, limit: usize) -> tokio::io::Take<Self>
    where
        Self: Sized;
}

impl<R: tokio::io::AsyncRead> TakeLine for R {
    fn take_line(self, limit: usize) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, limit as u64)
    }
}
