//! qemu under TCG: boot a kernel, keep its serial console in a log, and watch it for /init's
//! lines, a timeout and a silent (hung) guest.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::kernel::{Kernel, Release};
use super::outcome::Outcome;
use super::{INIT_MARKER, RESULT_MARKER};

enum Event {
    Line(Instant, String),
    Eof,
}

/// How long the test tier's console may stay silent before the guest counts as hung.
pub(super) const GUEST_SILENCE: Duration = Duration::from_secs(240);

/// Boot `kernel` with `initrd`, the serial console into `log`; kill qemu after `timeout`, or
/// when the console has been silent for `silence`.
pub(super) fn boot(
    kernel: &Kernel,
    initrd: &Path,
    log_path: &Path,
    timeout: Duration,
    silence: Option<Duration>,
    work: &Path,
) -> Result<Outcome> {
    let mut args: Vec<String> =
        "-accel tcg -M q35 -cpu max -m 3G -smp 2 -nographic -nic none -no-reboot"
            .split_whitespace()
            .map(String::from)
            .collect();
    args.extend([
        "-kernel".into(),
        kernel.vmlinuz.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        // oops=panic: a kernel oops ends the VM at once (panic=-1 and -no-reboot: qemu exits)
        // instead of leaving a test hung until the timeout.
        "console=ttyS0 panic=-1 oops=panic rdinit=/init".into(),
    ]);
    run_qemu(
        kernel.release,
        &kernel.version,
        &kernel.package,
        args,
        log_path,
        timeout,
        silence,
        work,
    )
}

/// Run qemu with `args` (the serial console on stdout), log every line to `log_path`, and
/// come back with the result line's words, or after `timeout`, or once the console has been
/// silent for `silence` (a hung guest).
#[allow(clippy::too_many_arguments)]
pub(super) fn run_qemu(
    release: Release,
    version: &str,
    package: &str,
    args: Vec<String>,
    log_path: &Path,
    timeout: Duration,
    silence: Option<Duration>,
    work: &Path,
) -> Result<Outcome> {
    let name = release.name();
    let mut cmd = Command::new("qemu-system-x86_64");
    // No monitor: the serial console alone on stdout.
    cmd.args(&args).args(["-monitor", "none"]);
    // A script to boot the same VM by hand (kept with --keep).
    let script = work.join(format!("boot-{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# Boots the VM tier's {name} VM again (Ctrl-A X quits qemu).\n\
             exec qemu-system-x86_64 '{}'\n",
            args.join("' '")
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;

    eprintln!(
        "xtask: vm: booting {name} ({version}, {package}) under qemu TCG; serial log {}",
        log_path.display()
    );
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        readers += 1;
        let tx = tx.clone();
        std::thread::spawn(move || forward(out, tx));
    }
    if let Some(err) = child.stderr.take() {
        readers += 1;
        let tx = tx.clone();
        std::thread::spawn(move || forward(err, tx));
    }
    drop(tx);

    let deadline = start + timeout;
    let mut boot = None;
    let mut guest_boot = None;
    let mut result: Option<String> = None;
    let mut result_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut hung = None;
    let mut last_line = start;
    while readers > 0 {
        let now = Instant::now();
        // After the result line qemu should power off at once; give it a minute at most.
        let until = match result_at {
            Some(t) => deadline.min(t + Duration::from_secs(60)),
            None => deadline,
        };
        let quiet_until = silence
            .filter(|_| result_at.is_none())
            .map(|s| last_line + s);
        if quiet_until.is_some_and(|q| now >= q && q < until) {
            hung = silence;
            break;
        }
        if now >= until {
            timed_out = result_at.is_none();
            break;
        }
        let wake = quiet_until.map_or(until, |q| q.min(until));
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(Event::Line(at, line)) => {
                last_line = at;
                writeln!(log, "{line}")?;
                if let Some(i) = line.find(INIT_MARKER) {
                    boot = Some(at - start);
                    guest_boot = line[i + INIT_MARKER.len()..]
                        .trim()
                        .strip_prefix("uptime ")
                        .map(str::to_string);
                }
                if boot.is_some() {
                    eprintln!("[{name}] {line}");
                }
                if let Some(i) = line.find(RESULT_MARKER) {
                    result = Some(line[i + RESULT_MARKER.len()..].trim().to_string());
                    result_at = Some(at);
                }
            }
            Ok(Event::Eof) => readers -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if readers > 0 || timed_out || hung.is_some() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for qemu")?;
    let total = start.elapsed();
    writeln!(
        log,
        "[xtask: qemu exited with {status} after {:.1} s]",
        total.as_secs_f64()
    )?;
    log.flush()?;
    let outcome = Outcome {
        release,
        version: version.to_string(),
        result,
        boot,
        guest_boot,
        total,
        timed_out,
        hung,
        log: log_path.to_path_buf(),
        retried_after: None,
    };
    if let Some(s) = hung {
        eprintln!(
            "xtask: vm: {name}: no console output for {} s: the guest hung; qemu killed",
            s.as_secs()
        );
    }
    if timed_out {
        eprintln!(
            "xtask: vm: {name}: no result after {} s: qemu killed",
            timeout.as_secs()
        );
    }
    if !outcome.passed() {
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(80)..];
        eprintln!(
            "xtask: vm: {name} FAILED; the last {} lines of {}:\n{}",
            tail.len(),
            log_path.display(),
            tail.join("\n")
        );
    }
    Ok(outcome)
}

/// Send `r`'s lines (serial output: CR LF, maybe not UTF-8) as events, then EOF.
fn forward(r: impl std::io::Read, tx: mpsc::Sender<Event>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .replace('\r', "");
                if tx.send(Event::Line(Instant::now(), line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Event::Eof);
}

/// qemu's arguments to boot a root filesystem image under systemd (TCG, 2 CPUs, 3 GiB, no
/// network, serial console): the system and pod tiers.
pub(super) fn systemd_boot_args(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    image: &std::path::Path,
) -> Vec<String> {
    let mut args: Vec<String> = "-accel tcg -M q35 -cpu max -m 3G -smp 2 -nographic -nic none"
        .split_whitespace()
        .map(String::from)
        .collect();
    args.extend([
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 root=/dev/vda rw panic=-1 systemd.show_status=0".into(),
        "-drive".into(),
        format!("file={},if=virtio,format=raw", image.display()),
    ]);
    args
}
