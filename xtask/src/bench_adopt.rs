//! `cargo xtask bench adopt`: how long a restarted agent takes to take back a crashed agent's
//! workers (from its start to every worker adopted and ready, the same pids), against a cold
//! start of the same app (from the agent's start to every worker started and ready). 16 and
//! 256 workers of corral-demo, release builds; each measured `--rounds` times, the median
//! reported.
//!
//! "Ready" is what `corral status --json` says, polled every 10 ms (each poll is a process:
//! a resolution of some 10-20 ms, small beside what is measured).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use corral_testkit::{free_port, loopback, AgentTable, App, ChildGuard, KillOnDrop};

use crate::bench::{release_build, Release};
use crate::is_root;

/// The worker pids once every one of `n` is ready, or None.
fn ready_pids(corral: &Path, socket: &Path, n: usize) -> Option<Vec<i64>> {
    let out = Command::new(corral)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let apps: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let workers = apps.get(0)?.get("workers")?.as_array()?;
    let pids: Vec<i64> = workers
        .iter()
        .filter(|w| w["state"] == "ready")
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    (pids.len() == n).then_some(pids)
}

fn wait_ready(corral: &Path, socket: &Path, n: usize, what: &str) -> Result<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(p) = ready_pids(corral, socket, n) {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("{what}: {n} workers not ready within 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The keeper of the agent whose spool file is `spool` (its argv names it).
fn keeper_pids(spool: &Path) -> Vec<i32> {
    let want = spool.as_os_str().as_encoded_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == want))
        })
        .collect()
}

fn start_agent(corral: &Path, config: &Path, log: &Path) -> Result<ChildGuard> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new(corral)
        .args(["agent", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent")?;
    Ok(ChildGuard::with_grace(child, Duration::from_secs(60)))
}

/// One round for `n` workers: (cold start, adoption after a SIGKILL of the agent).
fn round(rel: &Release, n: usize) -> Result<(Duration, Duration)> {
    let dir = rel.dir.join(format!("n{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let app = App::new("bench")
        .command([rel.demo.display().to_string()])
        .user("nobody")
        .env("DEMO_THREADS", 1)
        .address(loopback(free_port()))
        .count(n);
    let config = dir.join("corral.toml");
    std::fs::write(&config, format!("{}{app}", AgentTable::private(&dir)))?;
    let socket = dir.join("run/control.sock");
    let log = dir.join("agent.log");
    let strays = KillOnDrop::new();

    let t0 = Instant::now();
    let agent = start_agent(&rel.corral, &config, &log)?;
    let pids = wait_ready(&rel.corral, &socket, n, "cold start")?;
    let cold = t0.elapsed();
    strays.add(pids.iter().map(|p| *p as i32));
    strays.add(keeper_pids(&dir.join("run/keeper.spool")));
    // The keeper holds the state once the loop sent it; give it a moment after ready.
    std::thread::sleep(Duration::from_millis(300));
    // SIGKILL: the crash.
    // SAFETY: the benchmark's own agent.
    unsafe { libc::kill(agent.pid(), libc::SIGKILL) };
    drop(agent);

    let t1 = Instant::now();
    let agent = start_agent(&rel.corral, &config, &log)?;
    let again = wait_ready(&rel.corral, &socket, n, "adoption")?;
    let adopt = t1.elapsed();
    let mut a = again.clone();
    let mut b = pids.clone();
    a.sort();
    b.sort();
    if a != b {
        bail!(
            "the restarted agent did not adopt the same {n} workers (see {})",
            log.display()
        );
    }
    // A planned stop ends the workers and the keeper.
    drop(agent);
    drop(strays);
    Ok((cold, adopt))
}

pub fn adopt(rest: &[&str]) -> Result<()> {
    let rounds = match rest {
        [] => 3,
        ["--rounds", n] => n.parse().context("--rounds takes a number")?,
        other => bail!("bench adopt: unexpected arguments {}", other.join(" ")),
    };
    if !is_root() {
        bail!("the benchmark runs an agent: run it as root");
    }
    crate::ensure_packages()?;
    let rel = release_build("adopt")?;
    let mut rows = Vec::new();
    for n in [16usize, 256] {
        let (mut cold, mut adopt) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            eprintln!("bench adopt: {n} workers, round {}/{rounds}", r + 1);
            let (c, a) = round(&rel, n)?;
            cold.push(c);
            adopt.push(a);
        }
        cold.sort();
        adopt.sort();
        rows.push((n, cold[cold.len() / 2], adopt[adopt.len() / 2]));
    }
    let _ = std::fs::remove_dir_all(&rel.dir);
    println!("\nagent start -> every worker ready (median of {rounds} rounds)");
    println!("| workers | cold start | adoption after kill -9 | ratio |");
    println!("| --- | --- | --- | --- |");
    for (n, c, a) in rows {
        println!(
            "| {n} | {:.0} ms | {:.0} ms | {:.2} |",
            c.as_secs_f64() * 1000.0,
            a.as_secs_f64() * 1000.0,
            a.as_secs_f64() / c.as_secs_f64()
        );
    }
    Ok(())
}
