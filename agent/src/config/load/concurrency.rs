//! `steering = "auto"`: whether an app's workers serve one request at a time, read from its
//! command line. Such a worker is best fed from one accept queue shared by all (an idle worker
//! takes the next connection); one that serves many at once from per-worker queues steered to
//! the least loaded.
//!
//! Known: gunicorn with its default `sync` worker class (no `-k`/`--worker-class` naming another
//! and no `--threads` above 1, on its command line or in `GUNICORN_CMD_ARGS`), as
//! `gunicorn ...` or `python -m gunicorn ...`. A worker class set only in a gunicorn config
//! file is not read: such apps set `steering` themselves. Anything else is taken to serve many
//! requests at once (uvicorn, hypercorn, Node, Go, gunicorn's gthread/gevent/uvicorn workers).

use std::collections::BTreeMap;

/// Why the app's workers serve one request at a time, or `None` when they are taken to serve
/// many.
pub(super) fn one_at_a_time(argv: &[String], env: &BTreeMap<String, String>) -> Option<String> {
    let args = gunicorn_args(argv)?;
    let from_env: Vec<String> = env
        .get("GUNICORN_CMD_ARGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    // gunicorn reads GUNICORN_CMD_ARGS first; the command line overrides it.
    let mut class = None;
    let mut threads = 1u32;
    for list in [from_env.as_slice(), args] {
        let mut it = list.iter();
        while let Some(a) = it.next() {
            let value = |flag: &str| -> Option<String> {
                if a == flag {
                    it.clone().next().cloned()
                } else {
                    a.strip_prefix(&format!("{flag}="))
                        .map(str::to_string)
                        .or_else(|| {
                            // -kgevent: a short flag's value may follow it directly.
                            (flag.len() == 2 && a.len() > 2 && a.starts_with(flag))
                                .then(|| a[2..].to_string())
                        })
                }
            };
            if let Some(v) = value("-k").or_else(|| value("--worker-class")) {
                class = Some(v);
            } else if let Some(v) = value("--threads") {
                threads = v.parse().unwrap_or(threads);
            }
        }
    }
    let sync = class
        .as_deref()
        .is_none_or(|c| matches!(c, "sync" | "gunicorn.workers.sync.SyncWorker"));
    (sync && threads <= 1).then(|| {
        "gunicorn's sync workers serve one request at a time: one accept queue shared by all"
            .to_string()
    })
}

/// The arguments after `gunicorn` when the command runs gunicorn.
fn gunicorn_args(argv: &[String]) -> Option<&[String]> {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    let first = base(argv.first()?);
    if first == "gunicorn" {
        return Some(&argv[1..]);
    }
    if first.starts_with("python") {
        let m = argv.iter().position(|a| a == "-m")?;
        if argv.get(m + 1).map(String::as_str) == Some("gunicorn") {
            return Some(&argv[m + 2..]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn one(cmd: &str) -> bool {
        one_at_a_time(&argv(cmd), &BTreeMap::new()).is_some()
    }

    #[test]
    fn gunicorn_sync_workers_serve_one_request_at_a_time() {
        assert!(one("/srv/app/.venv/bin/gunicorn -w 1 app:app"));
        assert!(one("gunicorn -k sync app:app"));
        assert!(one("gunicorn --worker-class=sync --threads 1 app:app"));
        assert!(one("/usr/bin/python3 -m gunicorn app:app"));
        assert!(one("python3.11 -u -m gunicorn --bind fd://3 app:app"));
    }

    #[test]
    fn other_worker_classes_and_threads_serve_many() {
        assert!(!one("gunicorn -k uvicorn.workers.UvicornWorker app:app"));
        assert!(!one("gunicorn -kgevent app:app"));
        assert!(!one("gunicorn --worker-class gthread app:app"));
        assert!(!one("gunicorn --threads 4 app:app"));
        assert!(!one("gunicorn --threads=8 app:app"));
        assert!(!one("uvicorn main:app --fd 3"));
        assert!(!one("/usr/bin/node server.js"));
        assert!(!one("python3 -m uvicorn main:app"));
        assert!(!one("python3 app.py gunicorn"));
    }

    #[test]
    fn gunicorn_cmd_args_count_and_the_command_line_wins() {
        let env = |v: &str| BTreeMap::from([("GUNICORN_CMD_ARGS".to_string(), v.to_string())]);
        assert!(one_at_a_time(&argv("gunicorn app:app"), &env("--threads 4")).is_none());
        assert!(one_at_a_time(&argv("gunicorn app:app"), &env("-k gevent")).is_none());
        assert!(one_at_a_time(&argv("gunicorn -k sync app:app"), &env("-k gevent")).is_some());
        assert!(one_at_a_time(&argv("gunicorn app:app"), &env("--bind fd://3")).is_some());
    }
}
