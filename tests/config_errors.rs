//! Host integration tests for configuration errors: the real `corral check` and `corral agent`
//! on malformed configs. Every error must name the exact `FILE:LINE:COL` of the offending value
//! (computed here from the text the test wrote) and say what is wrong; `check` exits 1, the
//! agent exits non-zero at once, starts nothing and creates no control socket.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use corral_tests::{bin, free_port, require_root, AgentTable, TempDir};

/// Marks the expected error location in a config text; removed before the file is written.
const MARK: &str = "@@";

/// A valid app: `corral check` accepts it. Every negative case is this with one thing broken.
/// `@PORT@` becomes a free port, `@DIR@` the test directory. Literal text, not an
/// [`corral_tests::App`]: the cases edit it as text and point at lines and columns in it.
const BASE: &str = r#"[app.web]
command = ["/bin/true"]
user = "nobody"

[app.web.listen]
address = "127.0.0.1:@PORT@"
steering = "least-loaded"

[app.web.workers]
count = 2
memory_max = "64MiB"
memory_high = "48MiB"
stop_timeout = "5s"
ready = "tcp"

[app.web.restart]
policy = "always"
backoff_initial = "100ms"
backoff_max = "10s"
window = "60s"

[[app.web.pre_start]]
command = ["/bin/true", "pre-start"]
timeout = "1m"
"#;

/// A malformed config: `edits` are (old, new) replacements applied to `[agent]` + [`BASE`]
/// (each `old` must occur exactly once); one `new` carries [`MARK`] where the error must point.
/// `expect[0]` must directly follow `FILE:LINE:COL: ` on stderr; the rest (hints) appear
/// anywhere on stderr.
struct Case {
    name: &'static str,
    edits: &'static [(&'static str, &'static str)],
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown key at the top level",
        edits: &[("[agent]\n", "@@colour = \"red\"\n[agent]\n")],
        expect: &["unknown key `colour` at the top level", "valid keys: `agent`, `app`"],
    },
    Case {
        name: "unknown key in [agent]",
        edits: &[("[agent]\n", "[agent]\n@@stat_dir = \"/x\"\n")],
        expect: &["unknown key `stat_dir` in [agent]", "did you mean `state_dir`?"],
    },
    Case {
        name: "unknown key in [app.web]",
        edits: &[("user = \"nobody\"\n", "user = \"nobody\"\n@@colour = \"red\"\n")],
        expect: &["unknown key `colour` in [app.web]", "`command`"],
    },
    Case {
        name: "unknown key in [app.web.workers]",
        edits: &[("count = 2\n", "@@cont = 2\n")],
        expect: &["unknown key `cont` in [app.web.workers]", "did you mean `count`?"],
    },
    Case {
        name: "unknown key in [app.web.listen]",
        edits: &[("steering = \"least-loaded\"\n", "@@port = 80\n")],
        expect: &["unknown key `port` in [app.web.listen]"],
    },
    Case {
        name: "unknown key in [app.web.restart]",
        edits: &[("window = \"60s\"\n", "window = \"60s\"\n@@retries = 3\n")],
        expect: &["unknown key `retries` in [app.web.restart]"],
    },
    Case {
        name: "unknown key in [[app.web.pre_start]]",
        edits: &[("timeout = \"1m\"\n", "timeout = \"1m\"\n@@retry = true\n")],
        expect: &["unknown key `retry` in [[app.web.pre_start]]"],
    },
    Case {
        name: "bad size",
        edits: &[("memory_max = \"64MiB\"", "memory_max = @@\"lots\"")],
        expect: &[
            "`memory_max` in [app.web.workers]: expected a size such as \"512MiB\", found \"lots\"",
        ],
    },
    Case {
        name: "decimal size unit",
        edits: &[("memory_max = \"64MiB\"", "memory_max = @@\"1GB\"")],
        expect: &[
            "`memory_max` in [app.web.workers]: unknown size unit `GB` in \"1GB\"",
            "hint: did you mean `1GiB`? sizes use binary units KiB, MiB, GiB, TiB",
        ],
    },
    Case {
        name: "bad duration",
        edits: &[("stop_timeout = \"5s\"", "stop_timeout = @@\"soon\"")],
        expect: &[
            "`stop_timeout` in [app.web.workers]: expected a duration such as \"30s\", found \"soon\"",
            "durations use the units ms, s, m and h",
        ],
    },
    Case {
        name: "bare integer duration",
        edits: &[("stop_timeout = \"5s\"", "stop_timeout = @@30")],
        expect: &[
            "`stop_timeout` in [app.web.workers]: expected a duration such as \"30s\", found the bare number 30",
            "write `stop_timeout = \"30s\"`",
        ],
    },
    Case {
        name: "duration string without a unit",
        edits: &[("window = \"60s\"", "window = @@\"60\"")],
        expect: &[
            "`window` in [app.web.restart]: duration \"60\" has no unit",
            "write `60s`",
        ],
    },
    Case {
        name: "zero window",
        edits: &[("window = \"60s\"", "window = @@\"0s\"")],
        expect: &["`window` in [app.web.restart]: must be longer than 0"],
    },
    Case {
        name: "count = 0",
        edits: &[("count = 2", "count = @@0")],
        expect: &[
            "`count` in [app.web.workers]: expected an integer from 1 to 1024 or \"auto\", found 0",
            "write `count = \"auto\"` for one worker per CPU",
        ],
    },
    Case {
        name: "count = \"many\"",
        edits: &[("count = 2", "count = @@\"many\"")],
        expect: &[
            "`count` in [app.web.workers]: expected an integer from 1 to 1024 or \"auto\", found \"many\"",
        ],
    },
    Case {
        name: "wrong type: count = true",
        edits: &[("count = 2", "count = @@true")],
        expect: &[
            "`count` in [app.web.workers]: expected an integer from 1 to 1024 or \"auto\", found boolean `true`",
        ],
    },
    Case {
        name: "wrong type: backlog = \"lots\"",
        edits: &[(
            "steering = \"least-loaded\"\n",
            "steering = \"least-loaded\"\nbacklog = @@\"lots\"\n",
        )],
        expect: &["`backlog` in [app.web.listen]: expected an integer, found string \"lots\""],
    },
    Case {
        name: "memory_high equal to memory_max",
        edits: &[("memory_high = \"48MiB\"", "memory_high = @@\"64MiB\"")],
        expect: &[
            "`memory_high` in [app.web.workers]: 64MiB must be less than `memory_max` (64MiB)",
            "memory_high goes below it",
        ],
    },
    Case {
        name: "memory_high above memory_max",
        edits: &[("memory_high = \"48MiB\"", "memory_high = @@\"1GiB\"")],
        expect: &["`memory_high` in [app.web.workers]: 1GiB must be less than `memory_max` (64MiB)"],
    },
    Case {
        name: "cpu_max below the kernel's minimum quota",
        edits: &[("count = 2\n", "count = 2\ncpu_max = @@0.005\n")],
        expect: &[
            "`cpu_max` in [app.web.workers]: 0.005 is below the kernel's minimum of 0.01 CPU",
            "cpu.max takes at least 1000us of CPU time per 100000us period",
        ],
    },
    Case {
        name: "pids_max above the kernel's PID_MAX_LIMIT",
        edits: &[("count = 2\n", "count = 2\npids_max = @@5000000\n")],
        expect: &[
            "`pids_max` in [app.web.workers]: expected an integer from 1 to 4194304, found 5000000",
        ],
    },
    Case {
        name: "memory_max below one page",
        edits: &[("memory_max = \"64MiB\"", "memory_max = @@\"4KiB\"")],
        expect: &["`memory_max` in [app.web.workers]: 4KiB is below the minimum of 64KiB"],
    },
    Case {
        name: "missing command",
        edits: &[
            ("[app.web]\n", "@@[app.web]\n"),
            ("command = [\"/bin/true\"]\n", ""),
        ],
        expect: &["missing key `command` in [app.web]", "command = ["],
    },
    Case {
        name: "empty command",
        edits: &[("command = [\"/bin/true\"]", "command = @@[]")],
        expect: &[
            "`command` in [app.web]: expected the program and its arguments, found an empty array",
        ],
    },
    Case {
        name: "empty pre_start command argument",
        edits: &[(
            "command = [\"/bin/true\", \"pre-start\"]",
            "command = [\"/bin/true\", @@\"\"]",
        )],
        expect: &["`command` in [[app.web.pre_start]]: arguments cannot be empty strings"],
    },
    Case {
        name: "missing user",
        edits: &[("[app.web]\n", "@@[app.web]\n"), ("user = \"nobody\"\n", "")],
        expect: &[
            "app `web` has no `user`: workers never run as root unless `user = \"root\"` is written",
            "add `user = \"web\"`",
        ],
    },
    Case {
        name: "user that does not exist",
        edits: &[("user = \"nobody\"", "user = @@\"no-such-user-corral\"")],
        expect: &[
            "user `no-such-user-corral` does not exist on this machine",
            "useradd --system no-such-user-corral",
        ],
    },
    Case {
        name: "group that does not exist",
        edits: &[(
            "user = \"nobody\"\n",
            "user = \"nobody\"\ngroup = @@\"no-such-group-corral\"\n",
        )],
        expect: &[
            "group `no-such-group-corral` does not exist on this machine",
            "groupadd --system no-such-group-corral",
        ],
    },
    Case {
        name: "relative workdir",
        edits: &[("user = \"nobody\"\n", "user = \"nobody\"\nworkdir = @@\"srv/web\"\n")],
        expect: &["`workdir` in [app.web]: expected an absolute path, found \"srv/web\""],
    },
    Case {
        name: "missing [app.web.listen]",
        edits: &[
            ("[app.web]\n", "@@[app.web]\n"),
            (
                "[app.web.listen]\naddress = \"127.0.0.1:@PORT@\"\nsteering = \"least-loaded\"\n",
                "",
            ),
        ],
        expect: &[
            "app `web` has no [app.web.listen] table",
            "address = \"127.0.0.1:8000\"",
        ],
    },
    Case {
        name: "missing listen address",
        edits: &[
            ("[app.web.listen]\n", "@@[app.web.listen]\n"),
            ("address = \"127.0.0.1:@PORT@\"\n", ""),
        ],
        expect: &["missing key `address` in [app.web.listen]"],
    },
    Case {
        name: "host name instead of an address",
        edits: &[(
            "address = \"127.0.0.1:@PORT@\"",
            "address = @@\"localhost:@PORT@\"",
        )],
        expect: &[
            "`address` in [app.web.listen]: expected an IP address and port, found \"localhost:@PORT@\"",
            "host names are not resolved",
        ],
    },
    Case {
        name: "address without a port",
        edits: &[("address = \"127.0.0.1:@PORT@\"", "address = @@\"127.0.0.1\"")],
        expect: &[
            "`address` in [app.web.listen]: expected an IP address and port, found \"127.0.0.1\"",
            "add a port: \"127.0.0.1:8000\"",
        ],
    },
    Case {
        name: "port 0",
        edits: &[("address = \"127.0.0.1:@PORT@\"", "address = @@\"127.0.0.1:0\"")],
        expect: &["`address` in [app.web.listen]: port 0 is not allowed"],
    },
    Case {
        name: "bad steering",
        edits: &[("steering = \"least-loaded\"", "steering = @@\"random\"")],
        expect: &[
            "`steering` in [app.web.listen]: expected \"auto\", \"least-loaded\", \"round-robin\", \"hash\" or \"shared\", found \"random\"",
        ],
    },
    Case {
        name: "bad ready",
        edits: &[("ready = \"tcp\"", "ready = @@\"maybe\"")],
        expect: &[
            "`ready` in [app.web.workers]: expected \"tcp\", \"http:/PATH\", \"notify\" or \"delay:DURATION\", found \"maybe\"",
        ],
    },
    Case {
        name: "ready http without a leading slash",
        edits: &[("ready = \"tcp\"", "ready = @@\"http:healthz\"")],
        expect: &[
            "`ready` in [app.web.workers]: expected a path starting with `/` after `http:`",
            "\"http:/healthz\"",
        ],
    },
    Case {
        name: "bad restart policy",
        edits: &[("policy = \"always\"", "policy = @@\"sometimes\"")],
        expect: &[
            "`policy` in [app.web.restart]: expected \"always\", \"on-failure\" or \"never\", found \"sometimes\"",
        ],
    },
    Case {
        name: "backoff_initial longer than backoff_max",
        edits: &[("backoff_initial = \"100ms\"", "backoff_initial = @@\"1m\"")],
        expect: &[
            "`backoff_initial` in [app.web.restart]: 60s must not be longer than `backoff_max` (10s)",
            "doubles up to backoff_max",
        ],
    },
    Case {
        name: "invalid TOML: missing value",
        edits: &[("user = \"nobody\"\n", "user = @@\n")],
        expect: &["invalid TOML: "],
    },
    Case {
        name: "invalid TOML: unclosed table header",
        edits: &[("[app.web.restart]\n", "[app.web.restart@@\n")],
        expect: &["invalid TOML: "],
    },
    Case {
        name: "key defined twice",
        edits: &[("user = \"nobody\"\n", "user = \"nobody\"\n@@user = \"root\"\n")],
        expect: &["key `user` is defined twice"],
    },
    Case {
        name: "table defined twice",
        edits: &[("[app.web.restart]\n", "[app.web.restart]\n[app.web.@@restart]\n")],
        expect: &["table [app.web.restart] is defined twice", "merge the two"],
    },
    Case {
        name: "pre_start written with single brackets",
        edits: &[("[[app.web.pre_start]]\n", "@@[app.web.pre_start]\n")],
        expect: &[
            "`pre_start` in [app.web]: expected an array, found a table",
            "[[app.web.pre_start]]",
        ],
    },
    Case {
        name: "reserved env name",
        edits: &[(
            "user = \"nobody\"\n",
            "user = \"nobody\"\nenv = { A = \"1\", @@LISTEN_PID = \"1\" }\n",
        )],
        expect: &[
            "environment variable `LISTEN_PID` is set by corral",
            "remove `LISTEN_PID`",
        ],
    },
    Case {
        name: "env value of the wrong type",
        edits: &[("user = \"nobody\"\n", "user = \"nobody\"\nenv = { PORT = @@8000 }\n")],
        expect: &["`PORT` in [app.web.env]: expected a string, found integer `8000`"],
    },
    Case {
        name: "env_file that does not exist",
        edits: &[(
            "user = \"nobody\"\n",
            "user = \"nobody\"\nenv_file = @@\"@DIR@/missing.env\"\n",
        )],
        expect: &["`env_file` in [app.web]: cannot read @DIR@/missing.env: "],
    },
    Case {
        name: "bad include pattern",
        edits: &[("include = []", "include = [@@\"apps.d/[*.toml\"]")],
        expect: &["invalid include pattern `apps.d/[*.toml`"],
    },
    Case {
        name: "relative bpf_pin_dir",
        edits: &[("bpf_pin_dir = ", "bpf_pin_dir = @@\"bpf\"\n# was ")],
        expect: &["`bpf_pin_dir` in [agent]: expected an absolute path, found \"bpf\""],
    },
    Case {
        name: "worker sockets that overlap",
        edits: &[(
            "[app.web.workers]\n",
            "[app.other]\ncommand = [\"/bin/true\"]\nuser = \"nobody\"\n\
             [app.other.listen]\naddress = @@\"0.0.0.0:@PORT@\"\n\n[app.web.workers]\n",
        )],
        expect: &[
            "`address` in [app.other.listen] 0.0.0.0:@PORT@ overlaps `address` in [app.web.listen] 127.0.0.1:@PORT@ at ",
            "each app's worker socket needs an address of its own",
        ],
    },
    Case {
        name: "program not found in PATH",
        edits: &[(
            "command = [\"/bin/true\"]",
            "command = [@@\"no-such-program-corral\"]",
        )],
        expect: &["app web: command `no-such-program-corral` not found in PATH"],
    },
    Case {
        name: "pre-start program not found in PATH",
        edits: &[(
            "command = [\"/bin/true\", \"pre-start\"]",
            "command = [@@\"no-such-program-corral\"]",
        )],
        expect: &["app web pre-start step 1: command `no-such-program-corral` not found in PATH"],
    },
];

// ---------------------------------------------------------------------------------------------
// Helpers

/// Where `MARK` is in `text` (1-based line, column in characters), and `text` without it.
fn locate(text: &str) -> (String, usize, usize) {
    assert_eq!(
        text.matches(MARK).count(),
        1,
        "exactly one {MARK} in:\n{text}"
    );
    let offset = text.find(MARK).expect("mark");
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (text.replacen(MARK, "", 1), line, col)
}

fn apply(mut text: String, edits: &[(&str, &str)]) -> String {
    for (old, new) in edits {
        assert_eq!(
            text.matches(old).count(),
            1,
            "{old:?} must occur once in:\n{text}"
        );
        text = text.replacen(old, new, 1);
    }
    text
}

fn expand(text: &str, dir: &Path, port: u16) -> String {
    text.replace("@DIR@", &dir.display().to_string())
        .replace("@PORT@", &port.to_string())
}

fn check(config: &Path) -> Output {
    Command::new(bin("corral"))
        .args(["check", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .expect("run corral check")
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Pids of live processes (other than this one) whose command line mentions `needle` (a
/// directory with its trailing `/`, so that `...-4/` does not match `...-46/`).
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me || !corral_tests::pid_alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// Run `corral agent` on a config that must be refused: it has to exit non-zero within a few
/// seconds (it is killed and the test fails otherwise). Returns (exit code, stderr, elapsed).
fn agent_refuses(config: &Path) -> Result<(i32, String, Duration), String> {
    let dir = config.parent().expect("config dir");
    let err_path = dir.join("agent.stderr");
    let start = Instant::now();
    let mut child = Command::new(bin("corral"))
        .args(["agent", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn corral agent");
    let deadline = start + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            terminate(child.id() as i32);
            let _ = child.wait();
            return Err(format!(
                "agent still running after 10s (killed); stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status.code() {
        Some(0) => Err(format!("agent exited 0; stderr:\n{stderr}")),
        Some(code) => Ok((code, stderr, elapsed)),
        None => Err(format!("agent died of {status}; stderr:\n{stderr}")),
    }
}

/// SIGTERM, then SIGKILL, a process this test started.
fn terminate(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions; callers pass pids of their own processes.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// `stderr` names `file:line:col` followed directly by `expect[0]`, and holds the rest.
fn check_stderr(
    stderr: &str,
    file: &Path,
    line: usize,
    col: usize,
    expect: &[String],
) -> Result<(), String> {
    let at = format!("{}:{line}:{col}: ", file.display());
    let first = format!("{at}{}", expect[0]);
    if !stderr.contains(&first) {
        return Err(format!("expected {first:?} in stderr:\n{stderr}"));
    }
    for e in &expect[1..] {
        if !stderr.contains(e.as_str()) {
            return Err(format!("expected {e:?} in stderr:\n{stderr}"));
        }
    }
    Ok(())
}

/// `corral check` exits 1 with the error at `file:line:col`; `corral agent` exits non-zero
/// quickly with the same, without a control socket or any process left behind.
fn assert_refused(
    dir: &TempDir,
    config: &Path,
    file: &Path,
    line: usize,
    col: usize,
    expect: &[String],
) -> Result<(), String> {
    let out = check(config);
    let (stdout, stderr) = (lossy(&out.stdout), lossy(&out.stderr));
    if out.status.code() != Some(1) {
        return Err(format!(
            "`corral check` exited with {}, expected 1\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        ));
    }
    if stdout.contains("config OK") {
        return Err(format!("`corral check` said config OK:\n{stdout}"));
    }
    check_stderr(&stderr, file, line, col, expect).map_err(|e| format!("corral check: {e}"))?;

    let (code, stderr, elapsed) =
        agent_refuses(config).map_err(|e| format!("corral agent: {e}"))?;
    check_stderr(&stderr, file, line, col, expect)
        .map_err(|e| format!("corral agent (exit {code}): {e}"))?;
    if elapsed > Duration::from_secs(5) {
        return Err(format!(
            "corral agent took {elapsed:?} to refuse the config"
        ));
    }
    let socket = dir.path().join("run/control.sock");
    if socket.exists() {
        return Err(format!(
            "corral agent left its control socket {}",
            socket.display()
        ));
    }
    let left = processes_mentioning(&format!("{}/", dir.path().display()));
    if !left.is_empty() {
        return Err(format!("processes left behind: {left:?}"));
    }
    Ok(())
}

/// The main config: `[agent]` for `dir`, then [`BASE`], with `edits`, expanded; returns the
/// text (without the mark) and the mark's line and column. The base app has a `memory_max`
/// (for the memory_high cases), which this hybrid host cannot enforce: `enforce_limits = false`
/// keeps the baseline valid here (refusing it is tested in cgroups_host.rs).
fn main_config(dir: &Path, port: u16, edits: &[(&str, &str)]) -> (String, usize, usize) {
    let agent = AgentTable::private(dir).set("enforce_limits", false);
    let full = apply(format!("{agent}{BASE}"), edits);
    let full = expand(&full, dir, port);
    if full.contains(MARK) {
        locate(&full)
    } else {
        (full, 0, 0)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn the_baseline_config_is_valid() {
    let dir = TempDir::new("cfg-ok");
    let (config_text, _, _) = main_config(dir.path(), free_port(), &[]);
    let config = dir.path().join("corral.toml");
    std::fs::write(&config, config_text).expect("write config");
    let out = check(&config);
    let (stdout, stderr) = (lossy(&out.stdout), lossy(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("config OK"), "stdout:\n{stdout}");
    assert!(stdout.contains("app web ("), "stdout:\n{stdout}");
    assert!(stdout.contains("runs as     nobody:"), "stdout:\n{stdout}");
}

#[test]
fn every_malformed_config_is_refused_at_its_location() {
    require_root();
    assert!(CASES.len() >= 24);
    let mut failures = Vec::new();
    for case in CASES {
        let dir = TempDir::new("cfg-bad");
        let port = free_port();
        let (config_text, line, col) = main_config(dir.path(), port, case.edits);
        assert!(line > 0, "case {:?} has no {MARK}", case.name);
        let config = dir.path().join("corral.toml");
        std::fs::write(&config, &config_text).expect("write config");
        let expect: Vec<String> = case
            .expect
            .iter()
            .map(|e| expand(e, dir.path(), port))
            .collect();
        if let Err(e) = assert_refused(&dir, &config, &config, line, col, &expect) {
            failures.push(format!(
                "--- {} (at {line}:{col})\n{e}\nconfig:\n{config_text}",
                case.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

fn write_marked(path: &Path, marked: &str) -> (usize, usize) {
    let (clean, line, col) = locate(marked);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, clean).expect("write");
    (line, col)
}

/// The main file with `include = ["apps.d/*.toml"]` instead of `include = []`.
fn main_with_includes(dir: &Path, port: u16, marked: bool) -> (PathBuf, usize, usize) {
    let mut edits = vec![("include = []", "include = [\"apps.d/*.toml\"]")];
    if marked {
        edits.push(("[app.web]\n", "@@[app.web]\n"));
    }
    let (text, line, col) = main_config(dir, port, &edits);
    let config = dir.join("corral.toml");
    std::fs::write(&config, text).expect("write config");
    (config, line, col)
}

#[test]
fn app_defined_in_the_main_file_and_an_included_file() {
    require_root();
    let dir = TempDir::new("cfg-dup");
    let (config, main_line, main_col) = main_with_includes(dir.path(), free_port(), true);
    let other = dir.path().join("apps.d/web.toml");
    let other_port = free_port();
    let (line, col) = write_marked(
        &other,
        &format!(
            "# the same app again\n\n@@[app.web]\ncommand = [\"/bin/true\"]\nuser = \"nobody\"\n\n\
             [app.web.listen]\naddress = \"127.0.0.1:{other_port}\"\n"
        ),
    );
    let expect = vec![
        format!(
            "app `web` is defined twice: at {}:{main_line}:{main_col} and at {}:{line}:{col}",
            config.display(),
            other.display()
        ),
        "rename one of them".to_string(),
    ];
    if let Err(e) = assert_refused(&dir, &config, &other, line, col, &expect) {
        panic!("{e}");
    }
}

#[test]
fn agent_table_in_an_included_file() {
    require_root();
    let dir = TempDir::new("cfg-inc-agent");
    let (config, _, _) = main_with_includes(dir.path(), free_port(), false);
    let other = dir.path().join("apps.d/agent.toml");
    let (line, col) = write_marked(
        &other,
        "# agent settings do not go here\n\n@@[agent]\nstate_dir = \"/tmp/x\"\n",
    );
    let expect = vec![
        "[agent] belongs in the main file, not in an included file".to_string(),
        format!("move this table to {}", config.display()),
    ];
    if let Err(e) = assert_refused(&dir, &config, &other, line, col, &expect) {
        panic!("{e}");
    }
}

#[test]
fn unknown_key_in_an_included_file() {
    require_root();
    let dir = TempDir::new("cfg-inc-unknown");
    let (config, _, _) = main_with_includes(dir.path(), free_port(), false);
    let other = dir.path().join("apps.d/typo.toml");
    let (line, col) = write_marked(&other, "[@@apps.api]\ncommand = [\"/bin/true\"]\n");
    let expect = vec![
        "unknown key `apps` at the top level".to_string(),
        "did you mean `app`?".to_string(),
    ];
    if let Err(e) = assert_refused(&dir, &config, &other, line, col, &expect) {
        panic!("{e}");
    }
}

#[test]
fn bad_env_file_line_names_the_env_file() {
    require_root();
    let dir = TempDir::new("cfg-envfile");
    let env_file = dir.path().join("web.env");
    let cases: &[(&str, &str)] = &[
        (
            "# comment\nA=1\n\n@@this line has no equals sign\n",
            "expected KEY=VALUE",
        ),
        (
            "A=1\nexport @@NOTIFY_SOCKET=/tmp/x\n",
            "environment variable `NOTIFY_SOCKET` is set by corral",
        ),
        (
            "A=1\nB=@@\"unterminated\n",
            "missing the closing \" of the value",
        ),
    ];
    let port = free_port();
    let (text, _, _) = main_config(
        dir.path(),
        port,
        &[(
            "user = \"nobody\"\n",
            "user = \"nobody\"\nenv_file = \"web.env\"\n",
        )],
    );
    let config = dir.path().join("corral.toml");
    std::fs::write(&config, text).expect("write config");
    for (env_text, message) in cases {
        let (line, col) = write_marked(&env_file, env_text);
        if let Err(e) = assert_refused(&dir, &config, &env_file, line, col, &[message.to_string()])
        {
            panic!("env file {env_text:?}: {e}");
        }
    }
}

/// A port held by a plain listener of this test (no SO_REUSEPORT: nobody else can join it).
/// The port was free a moment ago; another process may have taken it since, so try a few.
fn occupied_port() -> (u16, TcpListener) {
    (0..20)
        .find_map(|_| {
            let port = free_port();
            TcpListener::bind(("127.0.0.1", port))
                .ok()
                .map(|l| (port, l))
        })
        .expect("bind the test's listener on a free port")
}

#[test]
fn port_in_use_is_reported_at_the_address() {
    require_root();
    let dir = TempDir::new("cfg-inuse");
    let (port, listener) = occupied_port();
    // Workers and pre-start steps that would linger, and name the test directory, if started.
    let (text, line, col) = main_config(
        dir.path(),
        port,
        &[
            (
                "address = \"127.0.0.1:@PORT@\"",
                "address = @@\"127.0.0.1:@PORT@\"",
            ),
            (
                "command = [\"/bin/true\"]",
                "command = [\"/bin/sh\", \"-c\", \"sleep 600\", \"@DIR@/worker\"]",
            ),
            (
                "command = [\"/bin/true\", \"pre-start\"]",
                "command = [\"/bin/sh\", \"-c\", \"sleep 600\", \"@DIR@/pre-start\"]",
            ),
        ],
    );
    let config = dir.path().join("corral.toml");
    std::fs::write(&config, &text).expect("write config");
    let expect = vec![format!("app web: 127.0.0.1:{port} is already in use")];
    let result = assert_refused(&dir, &config, &config, line, col, &expect);
    // Whatever happened, leave nothing running.
    for pid in processes_mentioning(&format!("{}/", dir.path().display())) {
        // Started by this test: its command line names the test directory.
        terminate(pid);
    }
    if let Err(e) = result {
        panic!("{e}");
    }
    // The test's listener still owns the port: a new connection reaches it.
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect to the test's port");
    listener.accept().expect("the test's listener accepts");
    // And the port was the only problem: once it is free, the same config is fine.
    drop(listener);
    let out = check(&config);
    let stdout = lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", lossy(&out.stderr));
    assert!(stdout.contains("config OK"), "{stdout}");
}

#[test]
fn metrics_port_in_use_is_reported_at_its_location() {
    require_root();
    let dir = TempDir::new("cfg-metrics-inuse");
    let (port, listener) = occupied_port();
    let (text, line, col) = main_config(
        dir.path(),
        free_port(),
        &[
            (
                "include = []\n",
                &format!("include = []\nmetrics = @@\"127.0.0.1:{port}\"\n"),
            ),
            (
                "command = [\"/bin/true\"]",
                "command = [\"/bin/sh\", \"-c\", \"sleep 600\", \"@DIR@/worker\"]",
            ),
        ],
    );
    let config = dir.path().join("corral.toml");
    std::fs::write(&config, &text).expect("write config");
    let expect = vec![format!("metrics endpoint 127.0.0.1:{port}")];
    let result = assert_refused(&dir, &config, &config, line, col, &expect);
    for pid in processes_mentioning(&format!("{}/", dir.path().display())) {
        terminate(pid);
    }
    if let Err(e) = result {
        panic!("{e}");
    }
    drop(listener);
    let out = check(&config);
    assert_eq!(out.status.code(), Some(0), "{}", lossy(&out.stderr));
    assert!(lossy(&out.stdout).contains(&format!("metrics: http://127.0.0.1:{port}/metrics")));
}

#[test]
fn missing_config_file_says_cannot_read() {
    let dir = TempDir::new("cfg-missing");
    let config = dir.path().join("nope.toml");
    let out = check(&config);
    let stderr = lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read {}: ", config.display())),
        "{stderr}"
    );
    let (code, stderr, _) = agent_refuses(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("cannot read {}: ", config.display())),
        "{stderr}"
    );
}

#[test]
fn help_mentions_config_and_sighup() {
    let run = |args: &[&str]| {
        let out = Command::new(bin("corral"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run corral");
        assert_eq!(
            out.status.code(),
            Some(0),
            "corral {args:?}: {}",
            lossy(&out.stderr)
        );
        lossy(&out.stdout)
    };
    let top = run(&["--help"]);
    for word in ["agent", "check", "config"] {
        assert!(top.contains(word), "`corral --help` lacks {word:?}:\n{top}");
    }
    let agent = run(&["agent", "--help"]);
    for word in ["SIGHUP", "--config", "config"] {
        assert!(
            agent.contains(word),
            "`corral agent --help` lacks {word:?}:\n{agent}"
        );
    }
    let check = run(&["check", "--help"]);
    assert!(
        check.contains("file:line:col"),
        "`corral check --help`:\n{check}"
    );
}
