//! Config loading: valid files round-trip into the expected values, and every malformed file
//! yields an error at the right file, line and column.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::load::{parse_duration, parse_size};
use super::*;
use crate::front::app::front_app;

mod acme;
mod limits;

/// A machine with the users root, api and nobody and the groups root, api and nogroup.
struct FakeLookup;

impl Lookup for FakeLookup {
    fn user(&self, name: &str) -> Option<(u32, u32)> {
        match name {
            "root" => Some((0, 0)),
            "api" => Some((1000, 1000)),
            "nobody" => Some((65534, 65534)),
            _ => None,
        }
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        match gid {
            0 => Some("root".into()),
            1000 => Some("api".into()),
            65534 => Some("nogroup".into()),
            _ => None,
        }
    }

    fn group(&self, name: &str) -> Option<u32> {
        match name {
            "root" => Some(0),
            "api" => Some(1000),
            "nogroup" => Some(65534),
            _ => None,
        }
    }
}

/// A main file in a directory that does not exist, so the default include matches nothing.
const MAIN: &str = "/nonexistent-corral-test/corral.toml";

fn load_text(text: &str) -> Result<Config, ConfigError> {
    load_str(Path::new(MAIN), text, &FakeLookup)
}

fn err(text: &str) -> ConfigError {
    match load_text(text) {
        Ok(c) => panic!("expected an error, got {c:#?}\nfor:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts that loading `text` fails at `MAIN:{at}` with a message containing `part`.
fn assert_err(text: &str, at: &str, part: &str) -> ConfigError {
    let e = err(text);
    let shown = e.to_string();
    let prefix = format!("{MAIN}:{at}: ");
    assert!(
        shown.starts_with(&prefix),
        "expected prefix {prefix:?}, got {shown:?}\nfor:\n{text}"
    );
    assert!(
        shown.contains(part),
        "expected {part:?} in {shown:?}\nfor:\n{text}"
    );
    e
}

/// A valid app with one extra line in `[app.api]` (line 4) and `tail` from line 7 on, which
/// continues `[app.api.listen]` unless it opens a table of its own.
fn app(extra: &str, tail: &str) -> String {
    assert!(!extra.contains('\n'));
    format!(
        "[app.api]\ncommand = [\"/bin/serve\"]\nuser = \"api\"\n{extra}\n\
         [app.api.listen]\naddress = \"127.0.0.1:8000\"\n{tail}"
    )
}

fn loc(file: &str, line: usize, col: usize) -> Location {
    Location {
        file: PathBuf::from(file),
        line,
        col,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-config-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Valid configs

const FULL: &str = r#"[agent]
include = []
state_dir = "/var/lib/corral"
bpf_pin_dir = "/sys/fs/bpf/corral-test"
metrics = "127.0.0.1:9464"
enforce_limits = false
allow_overcommit = true

[app.api]
command = ["/srv/api/.venv/bin/uvicorn", "main:app", "--fd", "3"]
workdir = "/srv/api"
user = "api"
group = "nogroup"
env = { DATABASE_URL = "postgres://db/api", LOG = "info" }

[app.api.listen]
address = "127.0.0.1:8000"
backlog = 512
steering = "round-robin"

[app.api.workers]
count = 4
memory_max = "1GiB"
memory_high = "900MiB"
cpu_max = 1
pids_max = 256
stop_timeout = "1m30s"
ready = "http:/healthz"
ready_timeout = "2m"

[app.api.restart]
policy = "on-failure"
backoff_initial = "250ms"
backoff_max = "1m"
max_restarts = 10
window = "5m"
reset_after = "30s"

[[app.api.pre_start]]
command = ["/srv/api/.venv/bin/alembic", "upgrade", "head"]
timeout = "10m"

[[app.api.pre_start]]
name = "warm cache"
command = ["/srv/api/warm"]

[app.api.tls]
address = "0.0.0.0:443"
cert = "/etc/corral/tls/api.crt"
key = "tls/api.key"
ktls = "require"
redirect_http = "0.0.0.0:80"
proxy = "tcp"
[app.web]
command = ["node", "server.js"]
user = "nobody"

[app.web.listen]
address = "[::1]:3000"
"#;

#[test]
fn full_config_round_trips() {
    let config = load_text(FULL).unwrap();
    let api_name = AppName::new("api").unwrap();
    let web_name = AppName::new("web").unwrap();

    let api = App {
        name: api_name.clone(),
        defined_at: loc(MAIN, 9, 1),
        command: vec![
            "/srv/api/.venv/bin/uvicorn".into(),
            "main:app".into(),
            "--fd".into(),
            "3".into(),
        ],
        command_at: loc(MAIN, 10, 12),
        workdir: PathBuf::from("/srv/api"),
        identity: Identity {
            user: "api".into(),
            uid: 1000,
            group: "nogroup".into(),
            gid: 65534,
        },
        env: BTreeMap::from([
            ("DATABASE_URL".to_string(), "postgres://db/api".to_string()),
            ("LOG".to_string(), "info".to_string()),
        ]),
        listen: Listen {
            address: addr("127.0.0.1:8000"),
            address_at: loc(MAIN, 17, 11),
            backlog: 512,
            steering: Steering::RoundRobin,
            steering_auto: None,
        },
        workers: Workers {
            count: WorkerCount::Fixed(NonZeroU32::new(4).unwrap()),
            count_at: loc(MAIN, 22, 9),
            memory_max: Some(ByteSize(1 << 30)),
            memory_high: Some(ByteSize(900 << 20)),
            cpu_max: Some(1.0),
            pids_max: NonZeroU32::new(256),
            stop_timeout: Duration::from_secs(90),
            ready: Ready::Http("/healthz".into()),
            ready_timeout: Duration::from_secs(120),
            min_ready: NonZeroU32::MIN,
        },
        restart: Restart {
            policy: RestartMode::OnFailure,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(60),
            max_restarts: 10,
            window: Duration::from_secs(300),
            reset_after: Duration::from_secs(30),
        },
        pre_start: vec![
            PreStart {
                name: "step 1".into(),
                command: vec![
                    "/srv/api/.venv/bin/alembic".into(),
                    "upgrade".into(),
                    "head".into(),
                ],
                timeout: Duration::from_secs(600),
                at: loc(MAIN, 40, 12),
            },
            PreStart {
                name: "warm cache".into(),
                command: vec!["/srv/api/warm".into()],
                timeout: Duration::from_secs(300),
                at: loc(MAIN, 45, 12),
            },
        ],
        tls: Some(Tls {
            address: addr("0.0.0.0:443"),
            address_at: loc(MAIN, 48, 11),
            cert: Some(CertPair {
                cert: PathBuf::from("/etc/corral/tls/api.crt"),
                key: PathBuf::from("/nonexistent-corral-test/tls/api.key"),
            }),
            sni: vec![],
            acme: None,
            ktls: KtlsMode::Require,
            redirect_http: Some(addr("0.0.0.0:80")),
            identity: Identity {
                user: "nobody".into(),
                uid: 65534,
                group: "nogroup".into(),
                gid: 65534,
            },
            processes: WorkerCount::Auto,
            processes_at: loc(MAIN, 48, 11),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            proxy_protocol: false,
            proxy: ProxyMode::Tcp,
            http: HttpArgs {
                trusted_proxies: vec![],
                header_timeout: Duration::from_secs(10),
                upstream_timeout: Duration::from_secs(60),
                body_timeout: Duration::from_secs(60),
                max_header_bytes: 32 * 1024,
                max_headers: 100,
                access_log: false,
                upstream: crate::front::args::UpstreamMode::DEFAULT,
            },
        }),
        role: Role::Workers,
    };
    let front = front_app(&api, api.tls.as_ref().unwrap());
    assert_eq!(front.name.as_str(), "api.tls");
    assert_eq!(front.command[0], "/proc/self/exe");
    assert_eq!(front.listen.address, addr("0.0.0.0:443"));
    assert!(front
        .command
        .windows(2)
        .any(|w| w[0] == "--upstream" && w[1] == "127.0.0.1:8000"));
    assert!(front
        .command
        .windows(2)
        .any(|w| w[0] == "--ktls" && w[1] == "require"));

    let web = App {
        name: web_name.clone(),
        defined_at: loc(MAIN, 54, 1),
        command: vec!["node".into(), "server.js".into()],
        command_at: loc(MAIN, 55, 12),
        workdir: PathBuf::from("/"),
        identity: Identity {
            user: "nobody".into(),
            uid: 65534,
            group: "nogroup".into(),
            gid: 65534,
        },
        env: BTreeMap::new(),
        listen: Listen {
            address: addr("[::1]:3000"),
            address_at: loc(MAIN, 59, 11),
            backlog: 1024,
            steering: Steering::LeastLoaded,
            steering_auto: Some(
                "workers that serve many requests at once: least-loaded over one socket each"
                    .into(),
            ),
        },
        workers: Workers {
            count: WorkerCount::Auto,
            count_at: loc(MAIN, 54, 1),
            memory_max: None,
            memory_high: None,
            cpu_max: None,
            pids_max: None,
            stop_timeout: Duration::from_secs(30),
            ready: Ready::Tcp,
            ready_timeout: Duration::from_secs(60),
            min_ready: NonZeroU32::MIN,
        },
        restart: Restart {
            policy: RestartMode::Always,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_restarts: 5,
            window: Duration::from_secs(60),
            reset_after: Duration::from_secs(10),
        },
        pre_start: vec![],
        tls: None,
        role: Role::Workers,
    };

    let expected = Config {
        files: vec![PathBuf::from(MAIN)],
        agent: Agent {
            include: vec![],
            state_dir: PathBuf::from("/var/lib/corral"),
            acme_dir: PathBuf::from("/var/lib/corral/acme"),
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/corral-test"),
            control_socket: PathBuf::from("/var/lib/corral/control.sock"),
            metrics: Some(addr("127.0.0.1:9464")),
            metrics_at: Some(Location {
                file: PathBuf::from(MAIN),
                line: 5,
                col: 11,
            }),
            enforce_limits: false,
            allow_overcommit: true,
            cgroup_root: CgroupRoot::Auto,
        },
        apps: BTreeMap::from([
            (front.name.clone(), front),
            (api_name, api),
            (web_name, web),
        ]),
    };
    assert_eq!(config, expected);
}

#[test]
fn missing_agent_table_means_defaults() {
    let config = load_text(&app("", "")).unwrap();
    assert_eq!(
        config.agent,
        Agent {
            include: vec!["apps.d/*.toml".into()],
            state_dir: PathBuf::from("/run/corral"),
            acme_dir: PathBuf::from("/var/lib/corral/acme"),
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/corral"),
            control_socket: PathBuf::from("/run/corral/control.sock"),
            metrics: None,
            metrics_at: None,
            enforce_limits: true,
            allow_overcommit: false,
            cgroup_root: CgroupRoot::Auto,
        }
    );
    assert_eq!(config.files, vec![PathBuf::from(MAIN)]);
    let api = &config.apps[&AppName::new("api").unwrap()];
    // The default group is the user's primary group, by name.
    assert_eq!(api.identity.group, "api");
    assert_eq!(api.identity.gid, 1000);
}

#[test]
fn empty_file_is_a_config_without_apps() {
    let config = load_text("").unwrap();
    assert!(config.apps.is_empty());
}

#[test]
fn root_only_when_written() {
    let config = load_text(&app("", "").replace("user = \"api\"", "user = \"root\"")).unwrap();
    let api = &config.apps[&AppName::new("api").unwrap()];
    assert_eq!((api.identity.uid, api.identity.gid), (0, 0));
}

#[test]
fn group_falls_back_to_numeric_gid() {
    struct NoGroups;
    impl Lookup for NoGroups {
        fn user(&self, _: &str) -> Option<(u32, u32)> {
            Some((1000, 4242))
        }
        fn group_name(&self, _: u32) -> Option<String> {
            None
        }
        fn group(&self, _: &str) -> Option<u32> {
            None
        }
    }
    let config = load_str(Path::new(MAIN), &app("", ""), &NoGroups).unwrap();
    let api = &config.apps[&AppName::new("api").unwrap()];
    assert_eq!(api.identity.group, "4242");
    assert_eq!(api.identity.gid, 4242);
}

#[test]
fn ready_and_count_forms() {
    let workers = |body: &str| {
        let c = load_text(&app("", &format!("[app.api.workers]\n{body}\n"))).unwrap();
        c.apps[&AppName::new("api").unwrap()].workers.clone()
    };
    assert_eq!(workers("ready = \"notify\"").ready, Ready::Notify);
    assert_eq!(workers("ready = \"tcp\"").ready, Ready::Tcp);
    assert_eq!(
        workers("ready = \"delay:2s\"").ready,
        Ready::Delay(Duration::from_secs(2))
    );
    assert_eq!(workers("count = \"auto\"").count, WorkerCount::Auto);
    let w = workers("count = 1024\nmemory_max = 536870912");
    assert_eq!(w.count, WorkerCount::Fixed(NonZeroU32::new(1024).unwrap()));
    assert_eq!(w.count_at, loc(MAIN, 8, 9));
    assert_eq!(w.memory_max, Some(ByteSize(512 << 20)));
}

#[test]
fn sizes() {
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("900MiB"), Ok(900 << 20));
    assert_eq!(parse_size("64KiB"), Ok(64 << 10));
    assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    assert_eq!(parse_size("512"), Ok(512));
    assert_eq!(parse_size("512B"), Ok(512));
    assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
    assert_eq!(parse_size("0.5KiB"), Ok(512));
    for bad in ["", "GiB", "-1GiB", "1.2.3MiB", "1 parsec", "99999999999TiB"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    for (bad, suggestion) in [
        ("1GB", "`1GiB`"),
        ("1G", "`1GiB`"),
        ("1gb", "`1GiB`"),
        ("512mb", "`512MiB`"),
        ("1.5kB", "`1.5KiB`"),
    ] {
        let e = parse_size(bad).unwrap_err();
        let hint = e.hint.unwrap();
        assert!(
            hint.contains(&format!("did you mean {suggestion}?")),
            "{hint}"
        );
        assert!(hint.contains("KiB, MiB, GiB, TiB"), "{hint}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(
        parse_duration("1h 2m 3s 4ms"),
        Ok(Duration::from_millis(3_723_004))
    );
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in ["", "30", "-5s", "s", "5 minutes", "1.2.3s", "abc", "5d"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse_duration("30").unwrap_err().hint.unwrap(),
        "write `30s`; durations use the units ms, s, m and h, e.g. \"1m30s\""
    );
}

#[test]
fn env_file_then_env() {
    let dir = TempDir::new("env");
    let env_file = dir.write(
        "api.env",
        concat!(
            "# comment\n\nexport A=1\nB = 'two words # not a comment'\n",
            "C=\"line\\nbreak \\\"q\\\"\" # note\nD=x=y\nE=\n",
        ),
    );
    let text = app(
        &format!("env_file = {:?}", env_file.to_str().unwrap()),
        "\n[app.api.env]\nA = \"override\"\n",
    );
    let config = load_text(&text).unwrap();
    let env = &config.apps[&AppName::new("api").unwrap()].env;
    let expected: BTreeMap<String, String> = [
        ("A", "override"),
        ("B", "two words # not a comment"),
        ("C", "line\nbreak \"q\""),
        ("D", "x=y"),
        ("E", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, &expected);
}

#[test]
fn relative_env_file_is_relative_to_the_config_file() {
    let dir = TempDir::new("env-rel");
    dir.write("api.env", "A=1\n");
    let main = dir.write("corral.toml", &app("env_file = \"api.env\"", ""));
    let config = load(&main, &FakeLookup).unwrap();
    let env = &config.apps[&AppName::new("api").unwrap()].env;
    assert_eq!(env.get("A").map(String::as_str), Some("1"));
}

#[test]
fn includes_merge_in_sorted_order() {
    let dir = TempDir::new("include");
    let main = dir.write(
        "corral.toml",
        "[agent]\nstate_dir = \"/run/corral-test\"\n\n[app.main]\ncommand = [\"/bin/main\"]\n\
         user = \"api\"\n[app.main.listen]\naddress = \"127.0.0.1:8000\"\n",
    );
    let b = dir.write(
        "apps.d/b.toml",
        "[app.bravo]\ncommand = [\"/bin/b\"]\nuser = \"nobody\"\n\
         [app.bravo.listen]\naddress = \"127.0.0.1:8002\"\n",
    );
    let a = dir.write(
        "apps.d/a.toml",
        "# first\n[app.alpha]\ncommand = [\"/bin/a\"]\nuser = \"api\"\n\
         [app.alpha.listen]\naddress = \"127.0.0.1:8001\"\n",
    );
    // Neither hidden files nor other extensions are picked up by the default `*.toml`.
    dir.write("apps.d/.draft.toml", "this is not toml");
    dir.write("apps.d/notes.txt", "this is not toml either");

    let config = load(&main, &FakeLookup).unwrap();
    assert_eq!(config.files, vec![main.clone(), a.clone(), b.clone()]);
    let names: Vec<&str> = config.apps.keys().map(AppName::as_str).collect();
    assert_eq!(names, ["alpha", "bravo", "main"]);
    let alpha = &config.apps[&AppName::new("alpha").unwrap()];
    assert_eq!(
        alpha.defined_at,
        Location {
            file: a,
            line: 2,
            col: 1
        }
    );
    assert_eq!(config.agent.state_dir, PathBuf::from("/run/corral-test"));

    // An explicit absolute pattern, and a pattern that matches nothing.
    let text = format!(
        "[agent]\ninclude = [{:?}, \"nothing.d/*.toml\"]\n",
        dir.0.join("apps.d/b*.toml").to_str().unwrap()
    );
    let config = load_str(&main, &text, &FakeLookup).unwrap();
    assert_eq!(config.files, vec![main.clone(), b]);
}

#[test]
fn empty_include_dir_is_fine() {
    let dir = TempDir::new("include-empty");
    std::fs::create_dir_all(dir.0.join("apps.d")).unwrap();
    let main = dir.write("corral.toml", &app("", ""));
    let config = load(&main, &FakeLookup).unwrap();
    assert_eq!(config.files, vec![main]);
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn display_has_location_message_and_hint() {
    let e = assert_err(&app("", "[app.api.workers]\ncount = 0\n"), "8:9", "count");
    assert_eq!(
        e.to_string(),
        format!(
            "{MAIN}:8:9: `count` in [app.api.workers]: expected an integer from 1 to 1024 or \
             \"auto\", found 0\n  hint: write `count = \"auto\"` for one worker per CPU"
        )
    );
    let no_hint = ConfigError::at(loc("f.toml", 1, 2), "bad");
    assert_eq!(no_hint.to_string(), "f.toml:1:2: bad");
}

#[test]
fn missing_file() {
    let e = load(Path::new("/nonexistent-corral-test/nope.toml"), &FakeLookup).unwrap_err();
    assert_eq!(e.at, None);
    let shown = e.to_string();
    assert!(
        shown.starts_with("cannot read /nonexistent-corral-test/nope.toml: "),
        "{shown}"
    );
}

#[test]
fn unknown_key_top_level() {
    let e = assert_err("foo = 1\n", "1:1", "unknown key `foo` at the top level");
    assert!(e.hint.unwrap().contains("`agent`, `app`"));
}

#[test]
fn unknown_key_agent() {
    assert_err(
        "[agent]\nstate = \"/x\"\n",
        "2:1",
        "unknown key `state` in [agent]",
    );
}

#[test]
fn unknown_key_app() {
    let e = assert_err(
        &app("colour = \"red\"", ""),
        "4:1",
        "unknown key `colour` in [app.api]",
    );
    assert!(e.hint.unwrap().contains("`command`"));
}

#[test]
fn unknown_key_workers_suggests_the_closest() {
    let e = assert_err(
        &app("", "[app.api.workers]\ncont = 4\n"),
        "8:1",
        "unknown key `cont` in [app.api.workers]",
    );
    assert!(e.hint.unwrap().starts_with("did you mean `count`?"));
}

#[test]
fn unknown_key_restart() {
    assert_err(
        &app("", "[app.api.restart]\nretries = 3\n"),
        "8:1",
        "unknown key `retries` in [app.api.restart]",
    );
}

#[test]
fn unknown_key_listen() {
    assert_err(
        &app("", "port = 80\n"),
        "7:1",
        "unknown key `port` in [app.api.listen]",
    );
}

#[test]
fn unknown_key_pre_start() {
    assert_err(
        &app(
            "",
            "[[app.api.pre_start]]\ncommand = [\"/bin/x\"]\nretry = true\n",
        ),
        "9:1",
        "unknown key `retry` in [[app.api.pre_start]]",
    );
}

#[test]
fn unknown_key_tls() {
    assert_err(
        &app(
            "",
            "[app.api.tls]\naddress = \"0.0.0.0:443\"\ncert = \"c\"\nkey = \"k\"\nca = \"x\"\n",
        ),
        "11:1",
        "unknown key `ca` in [app.api.tls]",
    );
}

#[test]
fn bad_size() {
    assert_err(
        &app("", "[app.api.workers]\nmemory_max = \"lots\"\n"),
        "8:14",
        "`memory_max` in [app.api.workers]: expected a size such as \"512MiB\"",
    );
}

#[test]
fn decimal_size_unit_gets_a_hint() {
    let e = assert_err(
        &app("", "[app.api.workers]\nmemory_max = \"1GB\"\n"),
        "8:14",
        "unknown size unit `GB`",
    );
    assert_eq!(
        e.hint.as_deref(),
        Some("did you mean `1GiB`? sizes use binary units KiB, MiB, GiB, TiB")
    );
}

#[test]
fn negative_size() {
    assert_err(
        &app("", "[app.api.workers]\nmemory_max = -5\n"),
        "8:14",
        "a size cannot be negative",
    );
}

#[test]
fn bad_duration() {
    assert_err(
        &app("", "[app.api.workers]\nstop_timeout = \"soon\"\n"),
        "8:16",
        "`stop_timeout` in [app.api.workers]: expected a duration such as \"30s\"",
    );
}

#[test]
fn bare_integer_duration() {
    let e = assert_err(
        &app("", "[app.api.workers]\nstop_timeout = 30\n"),
        "8:16",
        "found the bare number 30",
    );
    assert!(e.hint.unwrap().contains("write `stop_timeout = \"30s\"`"));
}

#[test]
fn unitless_duration_string() {
    let e = assert_err(
        &app("", "[app.api.restart]\nwindow = \"60\"\n"),
        "8:10",
        "duration \"60\" has no unit",
    );
    assert!(e.hint.unwrap().starts_with("write `60s`"));
}

#[test]
fn zero_window() {
    assert_err(
        &app("", "[app.api.restart]\nwindow = \"0s\"\n"),
        "8:10",
        "`window` in [app.api.restart]: must be longer than 0",
    );
}

#[test]
fn count_zero() {
    assert_err(
        &app("", "[app.api.workers]\ncount = 0\n"),
        "8:9",
        "expected an integer from 1 to 1024 or \"auto\", found 0",
    );
}

#[test]
fn count_too_large() {
    assert_err(
        &app("", "[app.api.workers]\ncount = 1025\n"),
        "8:9",
        "found 1025",
    );
}

#[test]
fn count_many() {
    assert_err(
        &app("", "[app.api.workers]\ncount = \"many\"\n"),
        "8:9",
        "`count` in [app.api.workers]: expected an integer from 1 to 1024 or \"auto\", \
         found \"many\"",
    );
}

#[test]
fn count_wrong_type() {
    assert_err(
        &app("", "[app.api.workers]\ncount = true\n"),
        "8:9",
        "`count` in [app.api.workers]: expected an integer from 1 to 1024 or \"auto\", \
         found boolean `true`",
    );
}

#[test]
fn backlog_wrong_type_and_range() {
    assert_err(
        &app("", "backlog = \"lots\"\n"),
        "7:11",
        "`backlog` in [app.api.listen]: expected an integer, found string \"lots\"",
    );
    assert_err(
        &app("", "backlog = 0\n"),
        "7:11",
        "`backlog` in [app.api.listen]: expected an integer from 1 to 65535, found 0",
    );
}

#[test]
fn memory_high_not_below_memory_max() {
    let e = assert_err(
        &app(
            "",
            "[app.api.workers]\nmemory_max = \"512MiB\"\nmemory_high = \"1GiB\"\n",
        ),
        "9:15",
        "`memory_high` in [app.api.workers]: 1GiB must be less than `memory_max` (512MiB)",
    );
    assert!(e.hint.is_some());
    assert_err(
        &app(
            "",
            "[app.api.workers]\nmemory_max = \"1GiB\"\nmemory_high = 1073741824\n",
        ),
        "9:15",
        "must be less than `memory_max`",
    );
}

#[test]
fn bad_cpu_and_pids() {
    assert_err(
        &app("", "[app.api.workers]\ncpu_max = 0\n"),
        "8:11",
        "expected a number of CPUs greater than 0, found 0",
    );
    assert_err(
        &app("", "[app.api.workers]\npids_max = 0\n"),
        "8:12",
        "`pids_max` in [app.api.workers]: expected an integer from 1 to",
    );
}

#[test]
fn missing_command() {
    let e = assert_err(
        "[app.api]\nuser = \"api\"\n[app.api.listen]\naddress = \"127.0.0.1:8000\"\n",
        "1:1",
        "missing key `command` in [app.api]",
    );
    assert!(e.hint.unwrap().contains("command = ["));
}

#[test]
fn empty_command() {
    assert_err(
        &app("", "").replace("[\"/bin/serve\"]", "[]"),
        "2:11",
        "`command` in [app.api]: expected the program and its arguments, found an empty array",
    );
}

#[test]
fn empty_command_argument() {
    assert_err(
        &app("", "").replace("[\"/bin/serve\"]", "[\"/bin/serve\", \"\"]"),
        "2:26",
        "arguments cannot be empty strings",
    );
}

#[test]
fn command_item_wrong_type_counts_columns_in_characters() {
    // `é` is two bytes: the column of `3` is 17 in characters, 18 in bytes.
    assert_err(
        &app("", "").replace("[\"/bin/serve\"]", "[\"é\", 3]"),
        "2:17",
        "each item of `command` in [app.api]: expected a string, found integer `3`",
    );
}

#[test]
fn command_not_an_array() {
    assert_err(
        &app("", "").replace("[\"/bin/serve\"]", "\"/bin/serve --fd 3\""),
        "2:11",
        "`command` in [app.api]: expected an array, found string",
    );
}

#[test]
fn missing_user() {
    let e = assert_err(
        "[app.api]\ncommand = [\"/bin/serve\"]\n[app.api.listen]\naddress = \"127.0.0.1:8000\"\n",
        "1:1",
        "app `api` has no `user`: workers never run as root unless `user = \"root\"` is written",
    );
    assert!(e.hint.unwrap().contains("user = \"api\""));
}

#[test]
fn unknown_user() {
    let e = assert_err(
        &app("", "").replace("user = \"api\"", "user = \"ghost\""),
        "3:8",
        "user `ghost` does not exist on this machine",
    );
    assert!(e.hint.unwrap().contains("useradd --system ghost"));
}

#[test]
fn unknown_group() {
    let e = assert_err(
        &app("group = \"wheel\"", ""),
        "4:9",
        "group `wheel` does not exist on this machine",
    );
    assert!(e.hint.unwrap().contains("groupadd --system wheel"));
}

#[test]
fn relative_workdir() {
    assert_err(
        &app("workdir = \"srv/api\"", ""),
        "4:11",
        "`workdir` in [app.api]: expected an absolute path, found \"srv/api\"",
    );
}

#[test]
fn missing_listen() {
    let e = assert_err(
        "[app.api]\ncommand = [\"/bin/serve\"]\nuser = \"api\"\n",
        "1:1",
        "app `api` has no [app.api.listen] table",
    );
    assert!(e.hint.unwrap().contains("address = \"127.0.0.1:8000\""));
}

#[test]
fn missing_listen_address() {
    assert_err(
        &app("", "").replace("address = \"127.0.0.1:8000\"", "backlog = 10"),
        "5:1",
        "missing key `address` in [app.api.listen]",
    );
}

#[test]
fn bad_address() {
    let e = assert_err(
        &app("", "").replace("127.0.0.1:8000", "localhost:8000"),
        "6:11",
        "`address` in [app.api.listen]: expected an IP address and port, found \"localhost:8000\"",
    );
    assert!(e.hint.unwrap().contains("host names are not resolved"));
    let e = assert_err(
        &app("", "").replace("127.0.0.1:8000", "::1"),
        "6:11",
        "expected an IP address and port",
    );
    assert!(e.hint.unwrap().contains("\"[::1]:8000\""));
}

#[test]
fn port_zero() {
    assert_err(
        &app("", "").replace("127.0.0.1:8000", "127.0.0.1:0"),
        "6:11",
        "`address` in [app.api.listen]: port 0 is not allowed",
    );
}

#[test]
fn bad_steering() {
    assert_err(
        &app("", "steering = \"random\"\n"),
        "7:12",
        "`steering` in [app.api.listen]: expected \"auto\", \"least-loaded\", \"round-robin\", \"hash\" or \"shared\", \
         found \"random\"",
    );
}

#[test]
fn bad_ready() {
    assert_err(
        &app("", "[app.api.workers]\nready = \"maybe\"\n"),
        "8:9",
        "`ready` in [app.api.workers]: expected \"tcp\", \"http:/PATH\", \"notify\" or \
         \"delay:DURATION\", found \"maybe\"",
    );
    let e = assert_err(
        &app("", "[app.api.workers]\nready = \"http:healthz\"\n"),
        "8:9",
        "expected a path starting with `/` after `http:`",
    );
    assert!(e.hint.unwrap().contains("\"http:/healthz\""));
    assert_err(
        &app("", "[app.api.workers]\nready = \"delay:2\"\n"),
        "8:9",
        "duration \"2\" has no unit",
    );
}

#[test]
fn bad_restart_policy() {
    assert_err(
        &app("", "[app.api.restart]\npolicy = \"sometimes\"\n"),
        "8:10",
        "expected \"always\", \"on-failure\" or \"never\", found \"sometimes\"",
    );
}

#[test]
fn backoff_initial_above_backoff_max() {
    assert_err(
        &app(
            "",
            "[app.api.restart]\nbackoff_initial = \"1m\"\nbackoff_max = \"30s\"\n",
        ),
        "8:19",
        "`backoff_initial` in [app.api.restart]: 60s must not be longer than `backoff_max` (30s)",
    );
}

#[test]
fn pre_start_missing_command() {
    assert_err(
        &app("", "[[app.api.pre_start]]\ntimeout = \"1m\"\n"),
        "7:1",
        "missing key `command` in [[app.api.pre_start]]",
    );
}

#[test]
fn pre_start_single_brackets() {
    let e = assert_err(
        &app("", "[app.api.pre_start]\ncommand = [\"/bin/x\"]\n"),
        "7:1",
        "`pre_start` in [app.api]: expected an array, found a table",
    );
    assert!(e.hint.unwrap().contains("[[app.api.pre_start]]"));
}

#[test]
fn tls_missing_key() {
    assert_err(
        &app(
            "",
            "[app.api.tls]\naddress = \"0.0.0.0:443\"\ncert = \"/c.pem\"\n",
        ),
        "7:1",
        "missing key `key` in [app.api.tls]",
    );
}

#[test]
fn bad_app_name() {
    assert_err(
        &app("", "")
            .replace("[app.api]", "[app.\"a/b\"]")
            .replace("app.api.listen", "app.\"a/b\".listen"),
        "1:6",
        "app name `a/b` contains `/`",
    );
}

#[test]
fn reserved_env_name() {
    let e = assert_err(
        &app("env = { LISTEN_FDS = \"2\" }", ""),
        "4:9",
        "environment variable `LISTEN_FDS` is set by corral",
    );
    assert!(e.hint.unwrap().contains("LISTEN_PID"));
}

#[test]
fn env_name_starting_with_digit() {
    assert_err(
        &app("env = { 1PASSWORD = \"x\" }", ""),
        "4:9",
        "environment variable name `1PASSWORD` cannot start with a digit",
    );
}

#[test]
fn env_value_wrong_type() {
    assert_err(
        &app("env = { PORT = 8000 }", ""),
        "4:16",
        "`PORT` in [app.api.env]: expected a string, found integer `8000`",
    );
}

#[test]
fn bad_env_file_line() {
    let dir = TempDir::new("env-bad");
    let env_file = dir.write("api.env", "# ok\nA=1\nthis line has no equals sign\n");
    let text = app(&format!("env_file = {:?}", env_file.to_str().unwrap()), "");
    let e = err(&text);
    assert!(
        e.to_string()
            .starts_with(&format!("{}:3:1: expected KEY=VALUE", env_file.display())),
        "{e}"
    );

    let env_file = dir.write("reserved.env", "export NOTIFY_SOCKET=/tmp/x\n");
    let text = app(&format!("env_file = {:?}", env_file.to_str().unwrap()), "");
    let e = err(&text);
    assert!(
        e.to_string().starts_with(&format!(
            "{}:1:8: environment variable `NOTIFY_SOCKET` is set by corral",
            env_file.display()
        )),
        "{e}"
    );

    let env_file = dir.write("quote.env", "A=\"unterminated\n");
    let text = app(&format!("env_file = {:?}", env_file.to_str().unwrap()), "");
    let e = err(&text);
    assert!(
        e.to_string().starts_with(&format!(
            "{}:1:3: missing the closing \"",
            env_file.display()
        )),
        "{e}"
    );
}

#[test]
fn missing_env_file() {
    assert_err(
        &app("env_file = \"/nonexistent-corral-test/api.env\"", ""),
        "4:12",
        "`env_file` in [app.api]: cannot read /nonexistent-corral-test/api.env: ",
    );
}

#[test]
fn invalid_toml() {
    assert_err("[app.api\n", "1:9", "invalid TOML: ");
    assert_err("[app.api]\nuser = \n", "2:8", "invalid TOML: ");
}

#[test]
fn duplicate_table_in_one_file() {
    let e = assert_err(
        &format!("{}[app.api]\nuser = \"api\"\n", app("", "")),
        "7:6",
        "table [app.api] is defined twice",
    );
    assert!(e.hint.is_some());
    assert_err(
        &app("user = \"nobody\"", ""),
        "4:1",
        "key `user` is defined twice",
    );
}

#[test]
fn listen_addresses_must_not_overlap() {
    let text = format!(
        "{}\n[app.web]\ncommand = [\"/bin/web\"]\nuser = \"nobody\"\n\
         [app.web.listen]\naddress = \"0.0.0.0:8000\"\n",
        app("", "")
    );
    assert_err(
        &text,
        "12:11",
        &format!(
            "`address` in [app.web.listen] 0.0.0.0:8000 overlaps `address` in [app.api.listen] \
             127.0.0.1:8000 at {MAIN}:6:11"
        ),
    );
}

#[test]
fn duplicate_app_across_files() {
    let dir = TempDir::new("dup");
    let main = dir.write("corral.toml", &app("", ""));
    let other = dir.write(
        "apps.d/api.toml",
        "\n[app.api]\ncommand = [\"/bin/other\"]\nuser = \"api\"\n\
         [app.api.listen]\naddress = \"127.0.0.1:9000\"\n",
    );
    let e = load(&main, &FakeLookup).unwrap_err();
    assert_eq!(
        e.to_string().lines().next().unwrap(),
        format!(
            "{}:2:1: app `api` is defined twice: at {}:1:1 and at {}:2:1",
            other.display(),
            main.display(),
            other.display()
        )
    );
}

#[test]
fn agent_table_in_included_file() {
    let dir = TempDir::new("agent-inc");
    let main = dir.write("corral.toml", &app("", ""));
    let other = dir.write("apps.d/x.toml", "\n\n[agent]\nstate_dir = \"/x\"\n");
    let e = load(&main, &FakeLookup).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:3:1: [agent] belongs in the main file, not in an included file",
            other.display()
        )),
        "{shown}"
    );
    assert!(e.hint.unwrap().contains(&main.display().to_string()));
}

#[test]
fn bad_include_pattern() {
    assert_err(
        "[agent]\ninclude = [\"apps.d/[*.toml\"]\n",
        "2:12",
        "invalid include pattern `apps.d/[*.toml`",
    );
}

#[test]
fn unknown_key_in_included_file() {
    let dir = TempDir::new("inc-unknown");
    let main = dir.write("corral.toml", &app("", ""));
    let other = dir.write("apps.d/x.toml", "[apps.web]\ncommand = [\"/bin/web\"]\n");
    let e = load(&main, &FakeLookup).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:1:2: unknown key `apps` at the top level",
            other.display()
        )),
        "{shown}"
    );
    assert!(e.hint.unwrap().starts_with("did you mean `app`?"));
}

#[test]
fn cgroup_root_is_auto_or_an_absolute_path() {
    let text = |v: &str| format!("[agent]\ncgroup_root = {v}\n{}", app("", ""));
    assert_eq!(
        load_text(&text("\"auto\"")).unwrap().agent.cgroup_root,
        CgroupRoot::Auto
    );
    assert_eq!(
        load_text(&text("\"/sys/fs/cgroup/corral\""))
            .unwrap()
            .agent
            .cgroup_root,
        CgroupRoot::Path(PathBuf::from("/sys/fs/cgroup/corral"))
    );
    let err = load_text(&text("\"corral\"")).unwrap_err().to_string();
    assert!(
        err.contains("2:15") && err.contains("absolute path"),
        "{err}"
    );
}

#[test]
fn steering_auto_shares_one_queue_for_gunicorn_sync_workers_only() {
    let listen = |command: &str, steering: &str| {
        let text = format!(
            "[app.api]\ncommand = {command}\nuser = \"api\"\n[app.api.listen]\n\
             address = \"127.0.0.1:8000\"\n{steering}"
        );
        let c = load_text(&text).unwrap_or_else(|e| panic!("{e}"));
        c.apps.values().next().expect("one app").listen.clone()
    };
    let l = listen(r#"["/srv/.venv/bin/gunicorn", "-w", "1", "app:app"]"#, "");
    assert_eq!(l.steering, Steering::Shared);
    assert!(l
        .steering_auto
        .is_some_and(|w| w.contains("gunicorn's sync workers")));
    let l = listen(
        r#"["/srv/.venv/bin/gunicorn", "-k", "gthread", "app:app"]"#,
        "",
    );
    assert_eq!(l.steering, Steering::LeastLoaded);
    let l = listen(
        r#"["/srv/.venv/bin/uvicorn", "main:app", "--fd", "3"]"#,
        "steering = \"auto\"",
    );
    assert_eq!(l.steering, Steering::LeastLoaded);
    assert!(l.steering_auto.is_some());
    // Written out, it is what it says, and not "auto".
    let l = listen(
        r#"["/srv/.venv/bin/gunicorn", "app:app"]"#,
        "steering = \"least-loaded\"",
    );
    assert_eq!((l.steering, l.steering_auto), (Steering::LeastLoaded, None));
    let l = listen(r#"["/srv/server"]"#, "steering = \"shared\"");
    assert_eq!(l.steering, Steering::Shared);
}

#[test]
fn min_ready_is_at_most_the_worker_count() {
    let e = assert_err(
        &app("", "[app.api.workers]\ncount = 2\nmin_ready = 3\n"),
        "9:13",
        "`min_ready` in [app.api.workers]: 3 is more than workers.count (2)",
    );
    assert!(e.hint.is_some());
    assert_err(
        &app("", "[app.api.workers]\nmin_ready = 0\n"),
        "8:13",
        "expected an integer from 1 to",
    );
    let c = load_text(&app("", "[app.api.workers]\ncount = 4\nmin_ready = 3\n")).unwrap();
    assert_eq!(c.apps.values().next().unwrap().workers.min_ready.get(), 3);
    // "auto" workers: any count is accepted (it is capped by the running count at /readyz).
    let c = load_text(&app("", "[app.api.workers]\nmin_ready = 8\n")).unwrap();
    assert_eq!(c.apps.values().next().unwrap().workers.min_ready.get(), 8);
    let c = load_text(&app("", "")).unwrap();
    assert_eq!(c.apps.values().next().unwrap().workers.min_ready.get(), 1);
}

/// `[app.api.tls]` with `extra` after its address and certificate (from line 11).
fn tls_with(extra: &str) -> String {
    app(
        "",
        &format!("[app.api.tls]\naddress = \"0.0.0.0:443\"\ncert = \"/c\"\nkey = \"/k\"\n{extra}"),
    )
}

#[test]
fn tls_proxy_and_http_settings() {
    let c = load_text(&tls_with(
        "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n\
         header_timeout = \"5s\"\nmax_header_size = \"64KiB\"\naccess_log = true\n",
    ))
    .unwrap();
    let tls = c.apps[&AppName::new("api").unwrap()].tls.as_ref().unwrap();
    assert_eq!(tls.proxy, ProxyMode::Http);
    let nets: Vec<String> = tls
        .http
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    assert_eq!(tls.http.header_timeout, Duration::from_secs(5));
    assert_eq!(tls.http.max_header_bytes, 65536);
    assert_eq!(tls.http.max_headers, 100);
    assert!(tls.http.access_log);
    assert_eq!(tls.http.upstream, UpstreamMode::Pool, "the default");
    let c = load_text(&tls_with("upstream = \"connect\"\n")).unwrap();
    let tls = c.apps[&AppName::new("api").unwrap()].tls.as_ref().unwrap();
    assert_eq!(tls.http.upstream, UpstreamMode::Connect);
    let c = load_text(&tls_with("proxy = \"tcp\"\n")).unwrap();
    assert_eq!(
        c.apps[&AppName::new("api").unwrap()]
            .tls
            .as_ref()
            .unwrap()
            .proxy,
        ProxyMode::Tcp
    );
}

#[test]
fn tls_proxy_and_http_settings_refused_at_their_value() {
    assert_err(
        &tls_with("proxy = \"udp\"\n"),
        "11:9",
        "`proxy` in [app.api.tls]: expected \"http\" or \"tcp\", found \"udp\"",
    );
    assert_err(
        &tls_with("trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n"),
        "11:34",
        "expected an address or a network such as \"10.0.0.0/8\", found \"10.0.0.0/33\"",
    );
    assert_err(
        &tls_with("max_header_size = \"1KiB\"\n"),
        "11:19",
        "expected from 8KiB to 1MiB, found 1024 bytes",
    );
    assert_err(
        &tls_with("header_timeout = 5\n"),
        "11:18",
        "expected a duration",
    );
    let e = assert_err(
        &tls_with("proxy_protocol = \"v2\"\n"),
        "11:18",
        "a PROXY header is for the byte path",
    );
    assert!(e.hint.unwrap().contains("proxy = \"tcp\""));
    assert_err(
        &tls_with("ktls = \"require\"\n"),
        "11:8",
        "kTLS carries the byte path only",
    );
    let e = assert_err(
        &tls_with("proxy = \"tcp\"\naccess_log = true\n"),
        "12:14",
        "`access_log` in [app.api.tls]: is a setting of the HTTP proxy",
    );
    assert!(e.hint.unwrap().contains("remove it"));
    assert_err(
        &tls_with("upstream = \"keepalive\"\n"),
        "11:12",
        "`upstream` in [app.api.tls]: expected \"pool\" or \"connect\", found \"keepalive\"",
    );
    assert_err(
        &tls_with("proxy = \"tcp\"\nupstream = \"pool\"\n"),
        "12:12",
        "`upstream` in [app.api.tls]: is a setting of the HTTP proxy",
    );
}
