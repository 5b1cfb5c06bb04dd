//! `cargo xtask bench restart`: how fast a killed worker is running again.
//!
//! The worker (corral-demo with DEMO_STARTED_FILE) appends `<pid> <CLOCK_MONOTONIC ns>` as the
//! first thing its main() does. The bench reads the clock, SIGKILLs the current worker, and
//! waits for the next line: the difference is kill -> replacement exec'd and running (including
//! the dynamic loader, a few hundred microseconds). The same is measured, in the same run, for
//! `sh -c 'while :; do app; done'`, the simplest supervisor there is, so the ratio means
//! something on a shared, noisy machine.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use corral_testkit::{
    free_port, loopback, monotonic_ns, started_lines as lines, AgentTable, App, ChildGuard,
    KillOnDrop,
};

use crate::{is_root, root, run};

/// Kill the newest worker `kills` times; each sample is kill -> replacement's first line.
fn measure(file: &Path, kills: usize, what: &str) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(kills);
    let first = wait_lines(file, 1, Duration::from_secs(20))
        .with_context(|| format!("{what}: no worker started"))?;
    std::thread::sleep(Duration::from_millis(200));
    let mut seen = first;
    for _ in 0..kills {
        let (pid, _) = *lines(file).last().context("started file emptied")?;
        let t0 = monotonic_ns();
        // SAFETY: `pid` is the benchmark's own worker, just reported in its file.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let now = wait_lines(file, seen + 1, Duration::from_secs(10))
            .with_context(|| format!("{what}: no replacement for pid {pid}"))?;
        let all = lines(file);
        let (_, t1) = all[seen];
        seen = now;
        samples.push(Duration::from_nanos(t1.saturating_sub(t0)));
        // Let the replacement settle (the agent's readiness probe, the shell's fork) so each
        // kill meets a steady state.
        std::thread::sleep(Duration::from_millis(30));
    }
    Ok(samples)
}

fn wait_lines(file: &Path, n: usize, timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let have = lines(file).len();
        if have >= n {
            return Ok(have);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for line {n} in {}", file.display());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

struct Stats {
    median: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: *v.last().unwrap_or(&Duration::ZERO),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The pids of every worker listed in a started file.
fn pids(file: &Path) -> impl Iterator<Item = i32> {
    lines(file).into_iter().map(|(pid, _)| pid)
}

/// What a benchmark of the agent runs: release builds of corral and corral-demo.
pub struct Release {
    /// target/release/corral.
    pub corral: PathBuf,
    /// A fresh, world-readable work directory under the temp dir, left for the benchmark to
    /// remove when it succeeds (its logs are there when it fails).
    pub dir: PathBuf,
    /// A copy of corral-demo in `dir`: the workers run as `nobody`, who may not reach a checkout
    /// under /root.
    pub demo: PathBuf,
}

/// Build corral and corral-demo in release mode and make [`Release::dir`],
/// `corral-bench-<name>-<pid>`.
pub fn release_build(name: &str) -> Result<Release> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            // The binaries are read from target/release below, whatever built xtask.
            .env_remove("CARGO_TARGET_DIR")
            .args(["build", "--release", "-p", "corral", "-p", "corral-demo"]),
    )?;
    let release = root().join("target/release");
    let dir = std::env::temp_dir().join(format!("corral-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let demo = dir.join("corral-demo");
    std::fs::copy(release.join("corral-demo"), &demo)?;
    std::fs::set_permissions(&demo, std::fs::Permissions::from_mode(0o755))?;
    Ok(Release {
        corral: release.join("corral"),
        dir,
        demo,
    })
}

pub fn restart(rest: &[&str]) -> Result<()> {
    let kills = match rest {
        [] => 200,
        ["--kills", n] => n.parse().context("--kills takes a number")?,
        other => bail!("bench restart: unexpected arguments {}", other.join(" ")),
    };
    if !is_root() {
        bail!("the benchmark runs an agent: run it as root");
    }
    crate::ensure_packages()?;
    let Release { corral, dir, demo } = release_build("restart")?;
    let started_corral = dir.join("started-corral");
    let started_sh = dir.join("started-sh");
    for f in [&started_corral, &started_sh] {
        std::fs::write(f, "")?;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o666))?;
    }

    // corral: one worker, a restart policy that restarts a stable worker at once.
    let app = App::new("bench")
        .command([demo.display().to_string()])
        .user("nobody")
        .env("DEMO_STARTED_FILE", started_corral.display())
        .env("DEMO_THREADS", 2)
        .address(loopback(free_port()))
        .count(1)
        .restart("reset_after", "10ms")
        .restart("max_restarts", 1000000)
        .restart("window", "1s");
    let config = dir.join("corral.toml");
    std::fs::write(&config, format!("{}{app}", AgentTable::private(&dir)))?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    // Workers the agent has not stopped when this returns (early, on an error) are killed
    // after it: the guards drop in the reverse order of their making.
    let strays = KillOnDrop::new();
    let agent = Command::new(&corral)
        .args(["agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent")?;
    let agent = ChildGuard::with_grace(agent, Duration::from_secs(10));
    eprintln!("bench restart: corral, {kills} kills");
    let corral = measure(&started_corral, kills, "corral");
    strays.add(pids(&started_corral));
    let corral = corral?;
    drop(agent);

    // The baseline: a shell loop respawning the same binary on its own socket.
    let port = free_port();
    let sh = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"while :; do "$0" --listen "$1" --reuseport; done"#)
        .arg(&demo)
        .arg(format!("127.0.0.1:{port}"))
        .env("DEMO_STARTED_FILE", &started_sh)
        .env("DEMO_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the shell loop")?;
    let sh = ChildGuard::new(sh);
    eprintln!("bench restart: shell loop, {kills} kills");
    let result = measure(&started_sh, kills, "shell loop");
    // Kill the loop first so it does not respawn, then what it started.
    drop(sh);
    strays.add(pids(&started_sh));
    let shell = result?;
    drop(strays);
    let _ = std::fs::remove_dir_all(&dir);

    let (c, s) = (stats(corral), stats(shell));
    println!("\nSIGKILL -> replacement running, {kills} kills each");
    println!("| supervisor | median | p90 | p99 | max |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| corral (pidfd, setuid nobody, caps dropped) | {} | {} | {} | {} |",
        ms(c.median),
        ms(c.p90),
        ms(c.p99),
        ms(c.max)
    );
    println!(
        "| sh `while :; do app; done` (root, no isolation) | {} | {} | {} | {} |",
        ms(s.median),
        ms(s.p90),
        ms(s.p99),
        ms(s.max)
    );
    println!(
        "\nratio corral/sh: median {:.2}, p99 {:.2}; target: corral median under 5 ms: {}",
        c.median.as_secs_f64() / s.median.as_secs_f64(),
        c.p99.as_secs_f64() / s.p99.as_secs_f64(),
        if c.median < Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
