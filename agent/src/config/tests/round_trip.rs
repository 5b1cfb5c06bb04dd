//! Valid files load into exactly the values written, and what is left out takes its default.

use super::*;

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
    // A front reports its own readiness: no probe, which the front it replaces may take.
    assert_eq!(front.workers.ready, Ready::Notify);
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
fn empty_file_is_a_config_without_apps() {
    let config = load_text("").unwrap();
    assert!(config.apps.is_empty());
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
    let api = api(&config);
    // The default group is the user's primary group, by name.
    assert_eq!(api.identity.group, "api");
    assert_eq!(api.identity.gid, 1000);
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
fn unknown_key_agent() {
    assert_err(
        "[agent]\nstate = \"/x\"\n",
        "2:1",
        "unknown key `state` in [agent]",
    );
}
