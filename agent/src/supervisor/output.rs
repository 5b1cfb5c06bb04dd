//! Worker and pre-start output: read each pipe line by line and log it tagged with who wrote it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::control::LogLine;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;

/// Longest line logged as one record; longer lines are split.
const MAX_LINE: usize = 16 * 1024;

/// Lines kept for `corral logs`, the oldest first to go; older ones are in the agent's log
/// (the journal under systemd). Bounded by count and by bytes: 20,000 lines of up to 16 KiB
/// would otherwise hold 320 MiB of the agent's memory.
pub const KEPT_LINES: usize = 20_000;
pub const KEPT_BYTES: usize = 8 * 1024 * 1024;

/// The agent's recent output lines: one book per process (there is one agent per process, and
/// the forwarding tasks are many and short-lived).
static BOOK: Mutex<Book> = Mutex::new(Book::new(KEPT_LINES, KEPT_BYTES));

struct Book {
    lines: VecDeque<LogLine>,
    next: u64,
    /// The bytes of text the kept lines hold.
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
}

impl Book {
    const fn new(max_lines: usize, max_bytes: usize) -> Book {
        Book {
            lines: VecDeque::new(),
            next: 1,
            bytes: 0,
            max_lines,
            max_bytes,
        }
    }

    fn push(&mut self, mut line: LogLine) {
        line.seq = self.next;
        self.next += 1;
        self.bytes += line.line.len();
        self.lines.push_back(line);
        // The newest line stays even when it alone is above the bound (at most MAX_LINE).
        while self.lines.len() > 1
            && (self.lines.len() > self.max_lines || self.bytes > self.max_bytes)
        {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.line.len();
            }
        }
    }
}

fn record(tag: &Tag, line: &str, kept: bool) {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // A poisoned lock only means a panic elsewhere while holding it: the book is still whole.
    let mut book = BOOK.lock().unwrap_or_else(|p| p.into_inner());
    book.push(LogLine {
        seq: 0,
        unix_ms,
        app: tag.app.clone(),
        who: tag.who.clone(),
        pid: tag.pid,
        stream: tag.stream.to_string(),
        line: line.to_string(),
        kept,
    });
}

/// `corral logs`: the last `n` lines that pass `wanted`, after sequence number `after`; and
/// the number to ask after next time.
pub fn recent(
    after: Option<u64>,
    n: usize,
    wanted: impl Fn(&LogLine) -> bool,
) -> (Vec<LogLine>, u64) {
    let book = BOOK.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<LogLine> = book
        .lines
        .iter()
        .rev()
        .filter(|l| after.is_none_or(|a| l.seq > a))
        .filter(|l| wanted(l))
        .take(n)
        .cloned()
        .collect();
    out.reverse();
    (out, book.next - 1)
}

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
            record(&tag, &line, false);
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
        let tag = Tag {
            app: l.app.clone(),
            who: l.who.clone(),
            pid: l.pid,
            stream: if l.stream == "stderr" {
                "stderr"
            } else {
                "stdout"
            },
        };
        record(&tag, &l.line, true);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> LogLine {
        LogLine {
            seq: 0,
            unix_ms: 0,
            app: "api".into(),
            who: "worker=0".into(),
            pid: 1,
            stream: "stdout".into(),
            line: text.into(),
            kept: false,
        }
    }

    #[test]
    fn the_book_is_bounded_by_lines() {
        let mut b = Book::new(3, 1 << 20);
        for i in 0..5 {
            b.push(line(&format!("l{i}")));
        }
        let kept: Vec<_> = b.lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(kept, ["l2", "l3", "l4"]);
        assert_eq!(b.lines.back().map(|l| l.seq), Some(5));
        assert_eq!(b.bytes, 6);
    }

    #[test]
    fn the_book_is_bounded_by_bytes() {
        let mut b = Book::new(1000, 10);
        for text in ["aaaa", "bbbb", "cccc"] {
            b.push(line(text));
        }
        // 12 bytes > 10: the oldest went.
        let kept: Vec<_> = b.lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(kept, ["bbbb", "cccc"]);
        assert_eq!(b.bytes, 8);
        // A line above the bound by itself is kept alone, not dropped.
        b.push(line("a line longer than ten bytes"));
        assert_eq!(b.lines.len(), 1);
        assert_eq!(b.bytes, 28);
    }
}
