//! corral's project tasks: `cargo xtask <task>`.
//!
//!   test            fmt, clippy, build, unit tests, host integration tests (as root), VM tier
//!   vm-test         the VM tier: Debian's kernels under qemu, tests/vm.rs inside
//!   image           the example Kubernetes image, built offline (podman import)
//!   demo            build and run the agent on packaging/examples/demo.toml, in the foreground
//!   bench restart   SIGKILL of a worker -> the replacement running, vs. a shell respawn loop
//!   bench cgroup    in the VM tier: worker respawn with vs. without a cgroup leaf; agent RSS
//!   bench steering  open-loop tail latency and per-worker share: one shared accept socket vs.
//!                   corral's hash, round-robin and least-loaded steering; connection-rate cost
//!   bench peers     the same kind of load on real Python apps: corral vs. uvicorn --workers,
//!                   gunicorn -w, gunicorn + UvicornWorker; then kill storms

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod acme;
mod bench;
mod bench_adopt;
mod bench_http;
mod bench_peers;
mod bench_steering;
mod bench_tls;
mod image;
mod kube;
mod package;
mod venv;
mod vm;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test              everything CI runs: cargo fmt --check, clippy -D warnings, build, unit tests,
                    and the host integration tests (they start real agents: run as root),
                    then the VM tier (vm-test, all kernels; vm_container on bookworm)
  acme-tools        fetch Debian trixie's pebble (the ACME test server tests/acme.rs runs, with
                    pebble-challtestsrv) with apt into target/acme/pebble; `test` does it too
  demo              build release binaries and run `corral agent` on
                    packaging/examples/demo.toml in the foreground (root); then in another
                    terminal: curl http://127.0.0.1:8080/
  vm-test [--kernel bookworm|trixie|all] [--keep] [--timeout SECS] [--tests NAME] [--release]
          [--system | --kube]
                    the VM tier: Debian's kernels (bookworm 6.1, trixie 6.12; fetched with apt
                    once, cached in target/vm/cache) boot under qemu (TCG) with an initramfs of
                    busybox, the debug binaries and tests/vm.rs, which run inside, where cgroup
                    v2 has every controller and kTLS loads; serial logs in
                    target/vm/<kernel>.log; --keep keeps target/vm/work (the initramfs and a
                    script that boots it again); --timeout per kernel in seconds, default 600;
                    --tests NAME runs tests/NAME.rs instead of tests/vm.rs; --release packs
                    release builds (benchmarks). --system: the system tier instead: a Debian root
                    filesystem from debootstrap (per release, --kernel picks them; cached in
                    target/vm/system) boots under systemd, installs the freshly built .deb and
                    runs vm/e2e.sh (install, reload, a shared-socket app, https, kill -9 of the
                    agent: under load with every worker kept on trixie's systemd 257, a full
                    restart on bookworm's 252; systemctl stop, reboot, upgrade, remove, purge);
                    logs in target/vm/system-<release>.log
                    --kube: the pod tier: `cargo xtask image`, then a bookworm root from
                    mmdebstrap with podman (cached in target/vm/pod) boots under systemd with
                    no network and runs vm/pod.sh: podman load, podman kube play of
                    packaging/kubernetes/corral-fastapi.yaml (FastAPI served on the pod's IP,
                    a worker killed and restarted without a container restart, /readyz,
                    podman kube down under load, per-worker cgroups when privileged, the
                    budget from the pod's limit); log in target/vm/pod.log. Not part of
                    `test` (it takes longer than the default run can spare)
  bench restart [--kills N]
                    time from SIGKILL of a worker to its replacement running, over N kills
                    (default 200), side by side with a `while :; do app; done` shell loop
  bench adopt [--rounds N]
                    agent start -> every worker ready: a cold start of 16 and 256 workers vs.
                    a restarted agent adopting them after kill -9 of the first (median of N
                    rounds, default 3)
  bench cgroup      in bookworm's VM (vm-test --tests vm_bench): 16 workers respawned after
                    SIGKILL with a cgroup leaf (memory_max) vs. without a cgroup root, median
                    and p90; the agent's VmRSS with 16 and 256 workers in cgroup mode
  image             target/image/corral-fastapi.tar (localhost/corral-fastapi:latest, for
                    `podman load`): packaging/kubernetes/Containerfile's image built offline
                    from Debian's packages (a bookworm root from mmdebstrap, cached in
                    target/image), pinned PyPI wheels and the freshly built .deb, imported with
                    `podman import` (root)
  package [--version V]
                    target/package/corral_<V>_amd64.deb and corral-<V>-1.x86_64.rpm (release
                    build, completions, man page; cargo-deb and cargo-generate-rpm are installed
                    into target/tools the first time); --version overrides the crate's
  bench tls [--quick] [--host | --vm] [--loads handshakes,requests,mib]
                    the TLS front vs nginx (Debian's binary, unpacked under target/, never
                    installed) in front of the same demo workers, ECDSA P-256, TLS 1.3:
                    handshakes/s, requests/s (100 B), 1 MiB responses MB/s; on the host
                    (userspace rustls vs nginx), then in bookworm's VM (kTLS + splice vs
                    userspace vs nginx); release builds. --host: skip the VM; --vm: skip the
                    host; --loads: only these loads; --quick: one round of 2 s
  bench http [--quick] [--loads LIST] [--no-slow]
                    the HTTP front (proxy = \"http\") vs nginx and Caddy (Debian's binaries,
                    unpacked under target/, never installed) in front of the same two demo
                    workers, TLS 1.3, ECDSA P-256, driven by h2load: requests/s, p50/p99,
                    failures and CPU per request over HTTP/1.1 and HTTP/2, 100 B and 1 MiB
                    responses, corral with upstream = \"pool\" and \"connect\"; then one slow
                    worker of four: its share of requests and p99 under each; release
                    builds, host only (root). --quick: one round of 2 s; --loads: only these
                    (h1-100,h2-100,h1-1,h2-1); --no-slow: no slow-worker phase.
                    CORRAL_BENCH_DEMO_THREADS=N: the demo workers' threads (default 16)
  bench steering [--quick] [--cost] [--rate R] [--threads T] [--accept greedy|free-thread]
                    4 workers of corral-demo, T threads each (default 1), accepting greedily
                    (default: every connection at once, queued for the threads, as an asyncio
                    or gthread server does) or only with a free thread, under an open-loop
                    Poisson load of R req/s (default 700), one new connection per request,
                    latency from the scheduled send; mix 90.8% 1 ms CPU, 9% 10 ms CPU, 0.2%
                    100 ms sleep; one shared accept socket vs. corral steering hash,
                    round-robin, least-loaded, 4 interleaved segments of 2 s warm-up + 5 s
                    measured each. Then /healthz connections per second, closed loop, hash
                    vs. least-loaded, 3 ABBA blocks of 5 s rounds, and least-loaded's added
                    CPU per connection directly: its programs' run time from the kernel's BPF
                    statistics plus its agent's CPU, against the hash's CPU per connection
                    (root). --quick: one 3 s segment per variant, one block of 1 s rounds.
                    --cost: only the connection-cost phase
  bench peers [--quick] [--apps wsgi,sync,async] [--loads 40,70] [--rates R1,R2] [--rounds N]
              [--warmup S] [--measure S] [--storm S] [--retries N] [--quiet-wait S]
              [--corral STEERING,...] [--hash]
                    corral with its default steering, auto (4 workers, each the app's own
                    single-process server on corral's socket; --corral adds or names others,
                    the first compared) against the real peers' multi-worker modes, with real Python
                    apps from a venv of pinned PyPI packages (target/bench/venv, from Debian's
                    python3): a WSGI app (4 x gunicorn -w 1 vs gunicorn -w 4), FastAPI with sync
                    and with async endpoints (4 x uvicorn --fd 3 vs uvicorn --workers 4 and
                    gunicorn -k UvicornWorker -w 4). Open loop, Poisson, a new connection per
                    request, mix 90.8% 1 ms CPU, 9% 15 ms CPU, 0.2% 100 ms sleep, at rates
                    calibrated to the servers using --loads percent of the CPUs (default 40,70;
                    --rates R1,R2: fixed rates instead), --rounds (default 8) interleaved rounds
                    of --warmup (2) + --measure (10) seconds per server; p50/p99/p99.9 overall
                    and per class, share per worker, where requests landed (sent to a busy
                    worker while one was idle), CPU, the ratios of issue 10. Then kill
                    storms: a serving process SIGKILLed every 1.5 s for --storm seconds
                    (default 15; 0 skips). --hash adds corral's hash steering. --retries:
                    rounds disturbed by other processes are measured again (default 1);
                    --quiet-wait: up to S s (default 10) for a quiet machine before each.
                    --quick: one round of 1 + 3 s, 6 s storms (root)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["test", rest @ ..] => test(rest),
        ["demo"] => demo(),
        ["acme-tools"] => acme::ensure_pebble().map(|tree| eprintln!("xtask: {}", tree.display())),
        ["vm-test", rest @ ..] => vm::vm_test(rest),
        ["bench", "restart", rest @ ..] => bench::restart(rest),
        ["bench", "adopt", rest @ ..] => bench_adopt::adopt(rest),
        ["bench", "cgroup", rest @ ..] => vm::bench_cgroup(rest),
        ["bench", "steering", rest @ ..] => bench_steering::steering(rest),
        ["bench", "peers", rest @ ..] => bench_peers::peers(rest),
        ["bench", "tls", rest @ ..] => bench_tls::tls(rest),
        ["bench", "http", rest @ ..] => bench_http::http(rest),
        ["package", rest @ ..] => package::package(rest),
        ["image", rest @ ..] => image::image(rest),
        ["help" | "--help" | "-h"] | [] => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("{USAGE}");
            bail!("unknown task: {}", other.join(" "))
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Debian packages the build and the tests need, with a file that shows each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("clang", "/usr/bin/clang"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("curl", "/usr/bin/curl"),
    // The TLS tests generate certificates and speak TLS with `openssl s_client`.
    ("openssl", "/usr/bin/openssl"),
    // The package tests read the .rpm's file flags and scriptlets.
    ("rpm", "/usr/bin/rpm"),
];

/// Install what is missing from [`PACKAGES`] (as root, with apt-get), or say exactly what is
/// missing and how to get it.
pub fn ensure_packages() -> Result<()> {
    ensure_these(PACKAGES, "the build and the tests")
}

/// Install the Debian packages of `list` (name, a file that shows it is installed) that are
/// missing; `what` says what needs them.
pub fn ensure_these(list: &[(&str, &str)], what: &str) -> Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages for {what}: {}; install them with `apt-get install {}` (as root)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {} for {what}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn test(rest: &[&str]) -> Result<()> {
    if !rest.is_empty() {
        bail!(
            "`cargo xtask test` takes no arguments (got {})",
            rest.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "the host integration tests start real agents, which bind sockets and switch users: \
             run `cargo xtask test` as root"
        );
    }
    ensure_packages()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    // tests/http_front.rs runs a FastAPI app under uvicorn from this venv (and websockets);
    // tests/http_upstream.rs runs its Python worker with its python.
    bench_peers::python::ensure_venv()?;
    // tests/packages.rs reads the .deb and the .rpm.
    package::build(None)?;
    // tests/kubernetes.rs validates packaging/kubernetes with it.
    kube::ensure_validator()?;
    // tests/acme.rs runs Debian's pebble and pebble-challtestsrv from target/acme/pebble.
    acme::ensure_pebble()?;
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    vm::vm_test(&[])?;
    // corral in a container: the budget from its cgroup limits, a read-only cgroup.
    vm::vm_test(&["--tests", "vm_container", "--kernel", "bookworm"])?;
    // The .deb installed in a booted Debian under systemd.
    vm::vm_test(&["--system"])?;
    eprintln!("xtask: all tests passed");
    Ok(())
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the agent runs as root (it binds the workers' sockets and starts them as `nobody`): run `cargo xtask demo` as root");
    }
    ensure_packages()?;
    run(cargo().args(["build", "--release", "-p", "corral", "-p", "corral-demo"]))?;
    let root = root();
    let release = root.join("target/release");
    let template = root.join("packaging/examples/demo.toml");
    let text = std::fs::read_to_string(&template)
        .with_context(|| format!("reading {}", template.display()))?;
    const PLACEHOLDER: &str = "/usr/lib/corral/corral-demo";
    if !text.contains(PLACEHOLDER) {
        bail!("{} no longer mentions {PLACEHOLDER}", template.display());
    }
    // The workers run as `nobody`, who may not reach a checkout under /root: give them a copy
    // in the demo's own state directory.
    let state = Path::new("/run/corral-demo");
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let demo_bin = state.join("corral-demo");
    let _ = std::fs::remove_file(&demo_bin);
    std::fs::copy(release.join("corral-demo"), &demo_bin)
        .with_context(|| format!("copying corral-demo to {}", demo_bin.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&demo_bin, std::fs::Permissions::from_mode(0o755))?;
    let config_dir = root.join("target/demo");
    std::fs::create_dir_all(&config_dir)?;
    let config = config_dir.join("corral.toml");
    std::fs::write(
        &config,
        text.replace(PLACEHOLDER, &demo_bin.display().to_string()),
    )?;
    let corral = release.join("corral");
    eprintln!(
        "\nxtask: starting the agent on {config}\n\
         xtask: in another terminal:\n\
         \x20   curl http://127.0.0.1:8080/\n\
         \x20   {corral} status --config {config}\n\
         xtask: Ctrl-C stops the agent and its workers\n",
        config = config.display(),
        corral = corral.display()
    );
    use std::os::unix::process::CommandExt;
    let err = Command::new(&corral)
        .args(["agent", "--config"])
        .arg(&config)
        .exec();
    bail!("exec {}: {err}", corral.display())
}
