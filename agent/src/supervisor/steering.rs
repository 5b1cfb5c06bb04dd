//! Connection steering of one app's socket group: the eBPF program when it loads, otherwise the
//! kernel's hash (plus the classic-BPF program that still routes readiness probes to their
//! slot). The supervisor tells it which slots are ready; it publishes that, and each listener's
//! accept-queue length as the load, to the program's maps.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{App, Steering as SteeringKind};
use crate::sys::bpf::{self, abi, Policy, Steering};
use crate::sys::socket;

/// How one group is steered.
pub enum Mode {
    Ebpf(Box<Steering>),
    /// The kernel's hash; the reason when eBPF was wanted but is not available.
    Hash(Option<String>),
}

pub struct GroupSteering {
    mode: Mode,
    address: std::net::SocketAddr,
    /// What the program was last told is eligible.
    published: Option<Vec<u32>>,
    /// `stats.selected + probes` at the last load tick: traffic is flowing while it moves.
    last_seen: u64,
    /// Pins of this group, removed when it is dropped.
    pins: Option<PathBuf>,
    kind: SteeringKind,
}

/// Logged once per agent: eBPF steering is unavailable.
static WARNED: AtomicBool = AtomicBool::new(false);
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Remove pins left by an agent that did not stop cleanly: every `v<ABI>-<hash>` directory
/// directly under `pin_root` (nothing else there is touched). Returns what it removed.
pub fn remove_stale_pins(pin_root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if !bpf::on_bpffs(pin_root) {
        return removed;
    }
    let Ok(entries) = std::fs::read_dir(pin_root) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name
            .strip_prefix('v')
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(abi, hash)| {
                abi.chars().all(|c| c.is_ascii_digit())
                    && hash.chars().all(|c| c.is_ascii_hexdigit())
            });
        if ours && bpf::remove_pins(&e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

impl GroupSteering {
    /// Load what `cfg` asks for. No effect on any socket until [`GroupSteering::install`].
    pub fn load(cfg: &App, pin_root: &Path) -> GroupSteering {
        let policy = match cfg.listen.steering {
            SteeringKind::Hash => None,
            SteeringKind::LeastLoaded => Some(Policy::LeastLoaded),
            SteeringKind::RoundRobin => Some(Policy::RoundRobin),
            SteeringKind::Shared => Some(Policy::Shared),
        };
        let mut pins = None;
        let mode = match policy {
            None => Mode::Hash(None),
            Some(policy) => {
                let pin_dir = bpf::on_bpffs(pin_root).then(|| {
                    pin_root.join(abi::version_tag()).join(format!(
                        "{}-{}",
                        cfg.name,
                        GENERATION.fetch_add(1, Ordering::Relaxed)
                    ))
                });
                match Steering::load(policy, cfg.listen.address.port(), pin_dir.as_deref()) {
                    Ok(s) => {
                        if let Err(why) = s.tracker() {
                            tracing::warn!(
                                app = %cfg.name,
                                "in-flight connections are not counted ({why}): least-loaded \
                                 sees each worker's accept queue only"
                            );
                        }
                        match s.pinned() {
                            Ok(dir) => pins = Some(dir.clone()),
                            Err(why) if pin_dir.is_some() => {
                                tracing::warn!(app = %cfg.name, "steering maps not pinned: {why}")
                            }
                            Err(_) => {}
                        }
                        Mode::Ebpf(Box::new(s))
                    }
                    Err(e) => {
                        let why = format!("eBPF steering unavailable: {e}");
                        if !WARNED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                "{why}; connections are spread by the kernel's hash (readiness \
                                 probes still reach their own worker). eBPF steering needs \
                                 CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN), CAP_PERFMON for \
                                 its connection tracker, and kernel 4.19+; in a container, add \
                                 them to its capabilities (Kubernetes: securityContext \
                                 capabilities add: [BPF, NET_ADMIN, PERFMON])"
                            );
                        }
                        Mode::Hash(Some(why))
                    }
                }
            }
        };
        if pin_dir_missing(pin_root) && policy.is_some() {
            tracing::debug!(
                "{} is not on a bpf filesystem: steering maps are not pinned",
                pin_root.display()
            );
        }
        GroupSteering {
            mode,
            address: cfg.listen.address,
            published: None,
            last_seen: 0,
            pins,
            kind: cfg.listen.steering,
        }
    }

    /// Attach to the group of `sockets` (slot order) and register every socket (with a shared
    /// socket, the one).
    pub fn install(&mut self, sockets: &[Arc<OwnedFd>]) -> Result<(), String> {
        let Some(first) = sockets.first() else {
            return Ok(());
        };
        let registered = if self.shared() { 1 } else { sockets.len() };
        match &mut self.mode {
            Mode::Ebpf(s) => {
                let mut attached = false;
                for (slot, fd) in sockets.iter().enumerate().take(registered) {
                    match s.set_socket(slot as u32, fd.as_fd()) {
                        Ok(()) => {}
                        // Still in a crashed agent's array: replace its program first (its
                        // maps are freed then, asynchronously), meanwhile the kernel's hash
                        // spreads connections over the group's sockets.
                        Err(e) if e.is_busy() => {
                            if !attached {
                                s.publish_eligible(&[]).map_err(|e| e.to_string())?;
                                s.attach(first.as_fd()).map_err(|e| e.to_string())?;
                                attached = true;
                            }
                            set_when_free(s, slot as u32, fd)
                                .map_err(|e| format!("slot {slot}: {e}"))?;
                        }
                        Err(e) => return Err(format!("slot {slot}: {e}")),
                    }
                }
                s.publish_eligible(&[]).map_err(|e| e.to_string())?;
                self.published = Some(Vec::new());
                s.attach(first.as_fd()).map_err(|e| e.to_string())
            }
            // One socket: probes reach it whatever the kernel picks.
            Mode::Hash(_) if self.kind == SteeringKind::Shared => Ok(()),
            Mode::Hash(_) => socket::attach_probe_steering(first.as_fd(), self.address)
                .map_err(|e| e.to_string()),
        }
    }

    /// Take the first `n` slots' sockets out of this program's socket array, so the agent's
    /// next image can put them in its own (`corral reexec`). Until it attaches its program,
    /// this one finds no socket to select and leaves every connection to the kernel's hash
    /// over the group, which still holds every socket.
    pub fn release(&mut self, n: u32) -> Result<(), String> {
        if let Mode::Ebpf(s) = &mut self.mode {
            for slot in 0..n {
                s.clear_socket(slot)
                    .map_err(|e| format!("slot {slot}: {e}"))?;
            }
        }
        Ok(())
    }

    /// A new or replaced socket for `slot` (the group's order is irrelevant to the eBPF map).
    /// With a shared socket only slot 0's is the program's.
    pub fn set_socket(&mut self, slot: u32, fd: &Arc<OwnedFd>) -> Result<(), String> {
        if self.shared() && slot > 0 {
            return Ok(());
        }
        match &mut self.mode {
            Mode::Ebpf(s) => s.set_socket(slot, fd.as_fd()).map_err(|e| e.to_string()),
            Mode::Hash(_) => Ok(()),
        }
    }

    /// Publish the ready slots, if they changed.
    pub fn sync(&mut self, eligible: Vec<u32>) {
        if self.published.as_ref() == Some(&eligible) {
            return;
        }
        if let Mode::Ebpf(s) = &mut self.mode {
            if let Err(e) = s.publish_eligible(&eligible) {
                tracing::error!("publishing the ready workers to the steering program: {e}");
                return;
            }
        }
        self.published = Some(eligible);
    }

    /// Every worker accepts from one shared socket (slot 0's): one accept queue, whether the
    /// eBPF program runs or not.
    pub fn shared(&self) -> bool {
        self.kind == SteeringKind::Shared
    }

    /// Queued connections move to another worker when a listener closes (eBPF migrate
    /// program); otherwise a slot keeps its socket across worker restarts. A shared socket has
    /// no queue of one worker's to move: it stays.
    pub fn migrates(&self) -> bool {
        !self.shared() && matches!(&self.mode, Mode::Ebpf(s) if s.migrates())
    }

    /// Sockets join a hash group in `listen()` order, which the classic-BPF probe program
    /// relies on: only eBPF groups may swap a slot's socket.
    pub fn keyed_by_slot(&self) -> bool {
        matches!(self.mode, Mode::Ebpf(_))
    }

    /// Publish each slot's accept-queue length. Returns whether the program needs it fresh
    /// (the caller ticks every 5 ms then, 4 times a second otherwise): while traffic flows and
    /// the load is the published accept queue (no tracker), or a previous agent's counts are
    /// carried. With the tracker the program counts live and turns its windows of picks by the
    /// kernel's clock: ticking fast would only cost the agent CPU (0.6-1% of the machine at
    /// 15k connections/s in `bench steering --cost`).
    pub fn tick(&mut self, sockets: &[(u32, &Arc<OwnedFd>)]) -> bool {
        let Mode::Ebpf(s) = &mut self.mode else {
            return false;
        };
        let seen = s.stats().map(|st| st.selected + st.probes).unwrap_or(0);
        let mut loads = Vec::with_capacity(sockets.len());
        let mut queued = false;
        for (slot, fd) in sockets {
            let q = socket::accept_queue_len(fd.as_fd()).unwrap_or(0);
            queued |= q > 0;
            loads.push((*slot, q));
        }
        if let Err(e) = s.publish_load(&loads) {
            tracing::debug!("publishing load: {e}");
        }
        let slots = sockets.iter().map(|(slot, _)| slot + 1).max().unwrap_or(0);
        let carried = match s.refresh_carried(slots) {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::debug!("reading the previous agent's connection counts: {e}");
                false
            }
        };
        let active = queued || seen != self.last_seen;
        self.last_seen = seen;
        active && (s.tracker().is_err() || carried)
    }

    /// One line for status and check.
    pub fn describe(&self) -> String {
        if self.shared() {
            return format!(
                "shared (one socket, one accept queue: an idle worker takes the next \
                 connection{})",
                match &self.mode {
                    Mode::Ebpf(_) => String::new(),
                    Mode::Hash(None) => String::new(),
                    Mode::Hash(Some(why)) => format!("; {why}"),
                }
            );
        }
        match &self.mode {
            Mode::Ebpf(s) => format!(
                "{} (eBPF{}{})",
                kind_name(self.kind),
                if s.migrates() {
                    ", queued connections migrate when a listener closes"
                } else {
                    ", select-only kernel: no migration"
                },
                match (self.kind, s.tracker()) {
                    (SteeringKind::LeastLoaded, Ok(())) => {
                        ", load = in-flight connections + accept queue".to_string()
                    }
                    (SteeringKind::LeastLoaded, Err(why)) => {
                        format!(", load = accept queue only: {why}")
                    }
                    _ => String::new(),
                }
            ),
            Mode::Hash(None) => "hash (the kernel's own, as configured)".to_string(),
            Mode::Hash(Some(why)) => format!("hash ({why})"),
        }
    }

    pub fn stats(&self) -> Option<abi::Stats> {
        match &self.mode {
            Mode::Ebpf(s) => s.stats().ok(),
            Mode::Hash(_) => None,
        }
    }

    /// The kernel's ids of the eBPF programs steering this group (none in hash mode).
    pub fn program_ids(&self) -> Vec<u32> {
        match &self.mode {
            Mode::Ebpf(s) => s.program_ids(),
            Mode::Hash(_) => Vec::new(),
        }
    }

    pub fn slot_picks(&self, n: u32) -> Option<Vec<u64>> {
        match &self.mode {
            Mode::Ebpf(s) => s.slot_picks(n).ok(),
            Mode::Hash(_) => None,
        }
    }

    /// The tracker's link and maps, for the next agent.
    pub fn tracker_handles(&self) -> Option<[std::os::fd::BorrowedFd<'_>; 3]> {
        match &self.mode {
            Mode::Ebpf(s) => s.tracker_handles(),
            Mode::Hash(_) => None,
        }
    }

    /// Go on counting the previous agent's open connections on the first `n` slots (its
    /// tracker's link and maps, handed over). Returns how many there are.
    pub fn carry(&mut self, handed: [OwnedFd; 3], n: u32) -> Result<u64, String> {
        let Mode::Ebpf(s) = &mut self.mode else {
            return Err("this group is not steered by eBPF".into());
        };
        let [link, inflight, since] = handed;
        s.carry(link, inflight, since, n).map_err(|e| e.to_string())
    }

    /// Each of the first `n` slots' established connections not yet closed by its worker.
    pub fn inflight(&self, n: u32) -> Option<Vec<u32>> {
        match &self.mode {
            Mode::Ebpf(s) if s.tracker().is_ok() => s.inflight(n).ok(),
            _ => None,
        }
    }

    pub fn pins(&self) -> Option<&Path> {
        self.pins.as_deref()
    }
}

/// Put `fd` in slot `slot` once the array it is still in has been freed (the kernel frees a
/// replaced program's maps from a work queue: milliseconds).
fn set_when_free(s: &mut Steering, slot: u32, fd: &Arc<OwnedFd>) -> Result<(), bpf::BpfError> {
    let t0 = std::time::Instant::now();
    let deadline = t0 + std::time::Duration::from_secs(3);
    loop {
        match s.set_socket(slot, fd.as_fd()) {
            Err(e) if e.is_busy() && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => {
                tracing::debug!(
                    slot,
                    "the previous socket array let go after {:?}",
                    t0.elapsed()
                );
                return r;
            }
        }
    }
}

fn pin_dir_missing(pin_root: &Path) -> bool {
    !bpf::on_bpffs(pin_root)
}

pub fn kind_name(k: SteeringKind) -> &'static str {
    match k {
        SteeringKind::LeastLoaded => "least-loaded",
        SteeringKind::RoundRobin => "round-robin",
        SteeringKind::Hash => "hash",
        SteeringKind::Shared => "shared",
    }
}

impl Drop for GroupSteering {
    fn drop(&mut self) {
        // The kernel keeps the program and maps while the group uses them; only the pins go.
        if let Some(dir) = &self.pins {
            let _ = bpf::remove_pins(dir);
            if let Some(version_dir) = dir.parent() {
                let _ = std::fs::remove_dir(version_dir); // only if empty
            }
        }
    }
}
