//! What `bench peers` reads from /proc: which processes serve (those that imported the app
//! and left a marker), how old they are, and the connections a process holds.

use std::collections::HashSet;
use std::path::Path;

/// Fields of /proc/<pid>/stat after `(comm)`, numbered as in proc(5) (state is 3).
fn stat_field(pid: i32, field: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(field - 3)?.parse().ok()
}

fn ppid(pid: i32) -> Option<i32> {
    stat_field(pid, 4).map(|p| p as i32)
}

/// Start time after boot, in clock ticks.
fn start_time(pid: i32) -> Option<u64> {
    stat_field(pid, 22)
}

/// Whether `pid` is alive (not a zombie) and `root` is among its first `depth` ancestors.
fn under(pid: i32, root: i32, depth: usize) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        });
    if matches!(state.as_deref(), None | Some("Z") | Some("X")) {
        return false;
    }
    let mut p = pid;
    for _ in 0..depth {
        match ppid(p) {
            Some(q) if q == root => return true,
            Some(q) if q > 1 => p = q,
            _ => return false,
        }
    }
    false
}

/// The live processes below `root` (its children or grandchildren) that imported the app,
/// which writes a file named by its pid into `markers` when imported: oldest first.
pub(super) fn serving(root: i32, markers: &Path) -> Vec<i32> {
    let mut pids: Vec<(u64, i32)> = std::fs::read_dir(markers)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| under(p, root, 2))
        .filter_map(|p| Some((start_time(p)?, p)))
        .collect();
    pids.sort();
    pids.into_iter().map(|(_, p)| p).collect()
}

/// The parent of `pid`, if it is alive.
pub(super) fn parent(pid: i32) -> Option<i32> {
    ppid(pid)
}

/// Connections on local `port` that `pid` holds open (accepted and not yet closed by it), from
/// its descriptor table and the kernel's TCP tables. Call it with the process stopped.
pub(super) fn accepted_connections(pid: i32, port: u16) -> usize {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let s = link.to_str()?;
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            // 0A is LISTEN: the listening socket, not a connection.
            if local_port == Some(port)
                && *state != "0A"
                && inode.parse().is_ok_and(|i: u64| inodes.contains(&i))
            {
                n += 1;
            }
        }
    }
    n
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg says them.
pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
