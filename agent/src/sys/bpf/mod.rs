//! The eBPF steering program of one app's SO_REUSEPORT group: load it (the migrate variant
//! where the kernel has it), attach it, and keep its maps current (sockets per slot, the set of
//! ready slots, per-slot load). See ebpf/steer.bpf.c for what the program does.

pub mod abi;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, ReusePortSockArray};
use aya::programs::{ProgramError, RawTracePoint, SkReuseport};
use aya::{Ebpf, EbpfError};

use super::socket::{PROBE_PORTS, PROBE_PORT_BASE};

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the steering object: {0}")]
    Object(#[source] Box<EbpfError>),
    #[error("loading program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("the steering object has no {0}")]
    Missing(&'static str),
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching the connection tracker to inet_sock_set_state: {0}")]
    Tracepoint(#[source] io::Error),
    #[error("the previous agent's {name} map: {why}")]
    Previous { name: &'static str, why: String },
}

impl BpfError {
    /// A socket array refused a socket that is still in another array (EBUSY): the array of
    /// a crashed agent's program, still attached to the group, until that program is
    /// replaced and its maps freed.
    pub fn is_busy(&self) -> bool {
        matches!(self, BpfError::Map { source, .. }
            if matches!(source.as_ref(), MapError::SyscallError(e)
                if e.io_error.raw_os_error() == Some(libc::EBUSY)))
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map {
        name,
        source: Box::new(source),
    }
}

/// How connections are spread over ready workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    LeastLoaded,
    RoundRobin,
    /// Every connection to slot 0's socket, which every worker shares (one accept queue).
    Shared,
}

const SELECT_OR_MIGRATE: &str = "corral_select_or_migrate";
const SELECT: &str = "corral_select";
const TRACKER: &str = "corral_conn_state";
const TRACKER_TRACEPOINT: &std::ffi::CStr = c"inet_sock_set_state";

/// A loaded steering program with its maps, for one reuseport group.
pub struct Steering {
    ebpf: Ebpf,
    program: &'static str,
    socks: ReusePortSockArray<MapData>,
    config: Array<MapData, abi::Config>,
    eligible: Array<MapData, abi::Eligible>,
    load: Array<MapData, u32>,
    inflight: Array<MapData, u32>,
    carried: Array<MapData, abi::Carried>,
    stats: PerCpuArray<MapData, abi::Stats>,
    slot_picks: PerCpuArray<MapData, u64>,
    /// What `load` holds per slot, as last written (`None`: not written by this agent).
    published_load: Vec<Option<u32>>,
    active: u32,
    policy: u32,
    port: u16,
    epoch: u32,
    pinned: Result<PathBuf, String>,
    /// The connection tracker's link (dropping it detaches the tracker) and copies of the
    /// `inflight` and `since` descriptors, to hand over to the next agent; or why there is
    /// no tracker.
    tracker: Result<TrackerHandles, String>,
    /// A previous agent's tracker, kept counting its connections until they close.
    previous: Option<Previous>,
}

/// What the next agent needs to go on counting this agent's open connections.
struct TrackerHandles {
    link: OwnedFd,
    inflight: OwnedFd,
    since: OwnedFd,
}

/// A previous agent's tracker (its link held, so it stays attached) and its counts, read into
/// `carried` until every connection it counted has closed.
struct Previous {
    inflight: Array<MapData, u32>,
    since: Array<MapData, u64>,
    _link: OwnedFd,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("program", &self.program)
            .field("active", &self.active)
            .finish()
    }
}

impl Steering {
    /// Load the program and create its maps. The select-or-migrate variant needs kernel 5.14;
    /// older kernels get the select-only variant (and the supervisor then never closes a
    /// listener that may hold queued connections).
    ///
    /// With `pin_dir`, the program and maps are also pinned there; a pinning failure does not
    /// fail the load (steering works unpinned) and is reported by [`Steering::pinned`].
    ///
    /// The connection tracker (in-flight connections per slot) is attached too; without it
    /// (kernel before 5.5, no inet_sock_set_state) the load is the accept queue alone, and
    /// [`Steering::tracker`] says why.
    pub fn load(policy: Policy, port: u16, pin_dir: Option<&Path>) -> Result<Steering, BpfError> {
        let mut ebpf = Ebpf::load(abi::OBJECT).map_err(|e| BpfError::Object(Box::new(e)))?;
        let program = match load_program(&mut ebpf, SELECT_OR_MIGRATE) {
            Ok(()) => SELECT_OR_MIGRATE,
            Err(migrate_err) => {
                tracing::debug!("{migrate_err}; trying the select-only program");
                load_program(&mut ebpf, SELECT)?;
                SELECT
            }
        };
        let tracker = attach_tracker(&mut ebpf).map_err(|e| e.to_string());
        // Copies before the maps are taken: the next agent gets them with the link.
        let tracker = tracker.and_then(|link| {
            Ok(TrackerHandles {
                link,
                inflight: dup_map_fd(&ebpf, "inflight").map_err(|e| e.to_string())?,
                since: dup_map_fd(&ebpf, "since").map_err(|e| e.to_string())?,
            })
        });
        let pinned = match pin_dir {
            None => Err("pinning not requested".to_string()),
            Some(dir) => match pin_all(&mut ebpf, program, dir) {
                Ok(()) => Ok(dir.to_path_buf()),
                Err(e) => {
                    let _ = remove_pins(dir);
                    Err(e.to_string())
                }
            },
        };
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(BpfError::Missing(name));
        let socks = ReusePortSockArray::try_from(take("socks")?).map_err(map_err("socks"))?;
        let config = Array::try_from(take("config")?).map_err(map_err("config"))?;
        let eligible = Array::try_from(take("eligible")?).map_err(map_err("eligible"))?;
        let load = Array::try_from(take("load")?).map_err(map_err("load"))?;
        let inflight = Array::try_from(take("inflight")?).map_err(map_err("inflight"))?;
        let carried = Array::try_from(take("carried")?).map_err(map_err("carried"))?;
        let stats = PerCpuArray::try_from(take("stats")?).map_err(map_err("stats"))?;
        let slot_picks =
            PerCpuArray::try_from(take("slot_picks")?).map_err(map_err("slot_picks"))?;
        let policy = match policy {
            Policy::LeastLoaded => abi::POLICY_LEAST_LOADED,
            Policy::RoundRobin => abi::POLICY_ROUND_ROBIN,
            Policy::Shared => abi::POLICY_SHARED,
        };
        let mut s = Steering {
            ebpf,
            program,
            socks,
            config,
            eligible,
            load,
            inflight,
            carried,
            stats,
            slot_picks,
            published_load: vec![None; abi::MAX_SLOTS as usize],
            active: 0,
            policy,
            port,
            epoch: 0,
            pinned,
            tracker,
            previous: None,
        };
        s.write_config()?;
        Ok(s)
    }

    fn write_config(&mut self) -> Result<(), BpfError> {
        let cfg = abi::Config {
            policy: self.policy,
            active: self.active,
            probe_base: u32::from(PROBE_PORT_BASE),
            probe_count: u32::from(PROBE_PORTS),
            port: u32::from(self.port),
            tracking: u32::from(self.tracker.is_ok()),
            epoch: self.epoch,
        };
        self.config.set(0, cfg, 0).map_err(map_err("config"))
    }

    /// Whether queued connections move to another worker when a listener closes.
    pub fn migrates(&self) -> bool {
        self.program == SELECT_OR_MIGRATE
    }

    /// The kernel's ids of this agent's loaded programs (the select program, and the tracker if
    /// attached): what `bpftool prog show id N` takes, and what run-time statistics are read by.
    pub fn program_ids(&self) -> Vec<u32> {
        let tracker = self.tracker.is_ok().then_some(TRACKER);
        [Some(self.program), tracker]
            .into_iter()
            .flatten()
            .filter_map(|name| self.ebpf.program(name)?.info().ok())
            .map(|info| info.id())
            .collect()
    }

    fn program(&self) -> Result<&SkReuseport, BpfError> {
        let p = self
            .ebpf
            .program(self.program)
            .ok_or(BpfError::Missing(self.program))?;
        <&SkReuseport>::try_from(p).map_err(|e| BpfError::Program {
            name: self.program,
            source: Box::new(e),
        })
    }

    /// Attach to the reuseport group `fd` belongs to (replacing any program it had).
    pub fn attach(&self, fd: BorrowedFd<'_>) -> Result<(), BpfError> {
        self.program()?.attach(fd).map_err(|e| BpfError::Program {
            name: self.program,
            source: Box::new(e),
        })
    }

    /// Put slot `slot`'s listening socket in the socket array.
    pub fn set_socket(&mut self, slot: u32, fd: BorrowedFd<'_>) -> Result<(), BpfError> {
        let raw = fd.as_raw_fd();
        self.socks.set(slot, &raw, 0).map_err(map_err("socks"))
    }

    /// Take slot `slot`'s socket out of the socket array (a socket can be in one array at a
    /// time: the agent's next image puts it in its own). An empty slot is not an error.
    pub fn clear_socket(&mut self, slot: u32) -> Result<(), BpfError> {
        match self.socks.clear_index(&slot) {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            r => r.map_err(map_err("socks")),
        }
    }

    /// Publish the set of slots whose worker is ready: written to the inactive buffer, then
    /// the program is switched to it in one map write.
    pub fn publish_eligible(&mut self, slots: &[u32]) -> Result<(), BpfError> {
        let mut set = abi::Eligible::default();
        let n = slots.len().min(abi::MAX_SLOTS as usize);
        set.slots[..n].copy_from_slice(&slots[..n]);
        set.count = n as u32;
        let next = self.active ^ 1;
        self.eligible
            .set(next, set, 0)
            .map_err(map_err("eligible"))?;
        self.active = next;
        self.write_config()
    }

    /// Publish each slot's load and start a new window of picks-since-publish: one write of
    /// the epoch for every slot (the program counts a window of an older epoch as empty), and
    /// a write of a slot's load only when it changed (an accept queue is mostly empty). A
    /// connection picked before the epoch moved never takes its pick back from the new window.
    pub fn publish_load(&mut self, loads: &[(u32, u32)]) -> Result<(), BpfError> {
        self.epoch = self.epoch.wrapping_add(1);
        self.write_config()?;
        for &(slot, queue) in loads {
            let Some(known) = self.published_load.get_mut(slot as usize) else {
                continue;
            };
            if *known != Some(queue) {
                self.load.set(slot, queue, 0).map_err(map_err("load"))?;
                *known = Some(queue);
            }
        }
        Ok(())
    }

    /// Steer on the accept queue (published by [`Steering::publish_load`]) instead of the
    /// tracker's in-flight counts: what a kernel without the tracker gets.
    pub fn disable_tracking(&mut self, why: &str) -> Result<(), BpfError> {
        self.tracker = Err(why.to_string());
        self.previous = None;
        self.write_config()
    }

    /// Whether in-flight connections are counted (the tracker is attached), or why not.
    pub fn tracker(&self) -> Result<(), &str> {
        self.tracker.as_ref().map(|_| ()).map_err(|e| e.as_str())
    }

    /// Established connections of each of the first `n` slots not yet closed by the server
    /// (a previous agent's still open ones included).
    pub fn inflight(&self, n: u32) -> Result<Vec<u32>, BpfError> {
        (0..n.min(abi::MAX_SLOTS))
            .map(|slot| {
                let own = self.inflight.get(&slot, 0).map_err(map_err("inflight"))?;
                let carried = self.carried.get(&slot, 0).map_err(map_err("carried"))?;
                Ok(own.wrapping_add(carried.inflight))
            })
            .collect()
    }

    /// The tracker's link and its `inflight` and `since` maps, for the next agent (`None`
    /// without a tracker).
    pub fn tracker_handles(&self) -> Option<[BorrowedFd<'_>; 3]> {
        let t = self.tracker.as_ref().ok()?;
        Some([t.link.as_fd(), t.inflight.as_fd(), t.since.as_fd()])
    }

    /// Go on counting a previous agent's open connections: its tracker's `link` (held, so it
    /// stays attached and counts them down as they close) and its `inflight` and `since` maps,
    /// read into `carried` for the first `n` slots on each [`Steering::refresh_carried`].
    /// Returns how many connections it counts.
    pub fn carry(
        &mut self,
        link: OwnedFd,
        inflight: OwnedFd,
        since: OwnedFd,
        n: u32,
    ) -> Result<u64, BpfError> {
        if let Err(why) = &self.tracker {
            return Err(BpfError::Previous {
                name: "inflight",
                why: format!("not used: this agent counts no connections ({why})"),
            });
        }
        self.previous = Some(Previous {
            inflight: previous_array(inflight, "inflight")?,
            since: previous_array(since, "since")?,
            _link: link,
        });
        self.refresh_carried(n)
    }

    /// Copy the previous agent's counts of the first `n` slots into `carried`; once they are
    /// all 0 its tracker is detached and its maps freed. Returns how many it still counts.
    pub fn refresh_carried(&mut self, n: u32) -> Result<u64, BpfError> {
        let Some(prev) = &self.previous else {
            return Ok(0);
        };
        let mut total = 0u64;
        for slot in 0..n.min(abi::MAX_SLOTS) {
            let inflight = prev
                .inflight
                .get(&slot, 0)
                .map_err(map_err("previous inflight"))?;
            let since = prev
                .since
                .get(&slot, 0)
                .map_err(map_err("previous since"))?;
            // A count that wrapped below zero (a decrement racing a reset) counts as none.
            let inflight = if inflight < 0x8000_0000 { inflight } else { 0 };
            total += u64::from(inflight);
            let value = abi::Carried {
                inflight,
                _pad: 0,
                since: if inflight == 0 { 0 } else { since },
            };
            if self.carried.get(&slot, 0).map_err(map_err("carried"))? != value {
                self.carried
                    .set(slot, value, 0)
                    .map_err(map_err("carried"))?;
            }
        }
        if total == 0 {
            self.previous = None;
        }
        Ok(total)
    }

    /// The program's counters, summed over CPUs.
    pub fn stats(&self) -> Result<abi::Stats, BpfError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err("stats"))?;
        let mut total = abi::Stats::default();
        for s in per_cpu.iter() {
            total.selected += s.selected;
            total.probes += s.probes;
            total.migrations += s.migrations;
            total.select_errors += s.select_errors;
            total.fallbacks += s.fallbacks;
            total.no_eligible += s.no_eligible;
            total.tracked += s.tracked;
            total.untracked += s.untracked;
        }
        Ok(total)
    }

    /// Connections steered to each of the first `n` slots (probes excluded).
    pub fn slot_picks(&self, n: u32) -> Result<Vec<u64>, BpfError> {
        (0..n.min(abi::MAX_SLOTS))
            .map(|slot| {
                let per_cpu = self
                    .slot_picks
                    .get(&slot, 0)
                    .map_err(map_err("slot_picks"))?;
                Ok(per_cpu.iter().sum())
            })
            .collect()
    }

    /// Where the program and maps are pinned, or why they are not.
    pub fn pinned(&self) -> &Result<PathBuf, String> {
        &self.pinned
    }
}

/// Pin the program and every map under `dir` (on a bpf filesystem; created here).
fn pin_all(ebpf: &mut Ebpf, program: &'static str, dir: &Path) -> Result<(), BpfError> {
    let err = |path: &Path, source: io::Error| BpfError::Pin {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    for name in MAPS {
        let path = dir.join(name);
        ebpf.map(name)
            .ok_or(BpfError::Missing(name))?
            .pin(&path)
            .map_err(|e| err(&path, io::Error::other(e.to_string())))?;
    }
    let path = dir.join("program");
    ebpf.program_mut(program)
        .ok_or(BpfError::Missing(program))?
        .pin(&path)
        .map_err(|e| err(&path, io::Error::other(e.to_string())))
}

const MAPS: [&str; 12] = [
    "socks",
    "config",
    "eligible",
    "load",
    "window",
    "conns",
    "inflight",
    "since",
    "carried",
    "rr",
    "stats",
    "slot_picks",
];

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), BpfError> {
    let p = ebpf.program_mut(name).ok_or(BpfError::Missing(name))?;
    let p: &mut SkReuseport = p.try_into().map_err(|e| BpfError::Program {
        name,
        source: Box::new(e),
    })?;
    p.load().map_err(|e| BpfError::Program {
        name,
        source: Box::new(e),
    })
}

/// Load and attach the connection tracker; the returned link keeps it attached (dropped, it
/// detaches), and can be handed to the next agent, which holds it until the connections this
/// agent counted have closed. The attach is the raw-tracepoint open syscall itself: aya keeps
/// its links' descriptors to itself, and this one must cross a re-exec and reach the keeper.
fn attach_tracker(ebpf: &mut Ebpf) -> Result<OwnedFd, BpfError> {
    let err = |source: ProgramError| BpfError::Program {
        name: TRACKER,
        source: Box::new(source),
    };
    let p = ebpf
        .program_mut(TRACKER)
        .ok_or(BpfError::Missing(TRACKER))?;
    let p: &mut RawTracePoint = p.try_into().map_err(err)?;
    p.load().map_err(err)?;
    let prog = p.fd().map_err(err)?;
    raw_tracepoint_open(prog.as_fd(), TRACKER_TRACEPOINT).map_err(BpfError::Tracepoint)
}

/// `bpf(BPF_RAW_TRACEPOINT_OPEN)`: attach `prog` to the raw tracepoint `name`; the returned
/// descriptor is the attachment.
fn raw_tracepoint_open(prog: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    /// `union bpf_attr`'s `raw_tracepoint` member (linux/bpf.h), without the cookie (0).
    #[repr(C)]
    struct RawTracepointAttr {
        name: u64,
        prog_fd: u32,
        _pad: u32,
    }
    let attr = RawTracepointAttr {
        name: name.as_ptr() as u64,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid, fully initialised prefix of `union bpf_attr` for this command
    // (the kernel zero-extends a shorter attr), `name` outlives the call, and a non-negative
    // result is a new descriptor that nothing else owns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_RAW_TRACEPOINT_OPEN,
            &attr as *const RawTracepointAttr,
            std::mem::size_of::<RawTracepointAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: a fresh descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A copy of map `name`'s descriptor.
fn dup_map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, BpfError> {
    match ebpf.map(name).ok_or(BpfError::Missing(name))? {
        Map::Array(data) => {
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| BpfError::Previous {
                    name,
                    why: format!("duplicating its descriptor: {e}"),
                })
        }
        _ => Err(BpfError::Missing(name)),
    }
}

/// A previous agent's per-slot array map, checked to be what this agent would read: an array
/// of `MAX_SLOTS` values of `V` (another build's may differ: then nothing is carried).
fn previous_array<V: aya::Pod>(
    fd: OwnedFd,
    name: &'static str,
) -> Result<Array<MapData, V>, BpfError> {
    let prev = |why: String| BpfError::Previous { name, why };
    let data = MapData::from_fd(fd).map_err(|e| prev(e.to_string()))?;
    let info = data.info().map_err(|e| prev(e.to_string()))?;
    if info.max_entries() != abi::MAX_SLOTS {
        return Err(prev(format!(
            "{} entries, this agent reads {}",
            info.max_entries(),
            abi::MAX_SLOTS
        )));
    }
    Array::try_from(Map::Array(data)).map_err(|e| prev(e.to_string()))
}

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` (or its nearest existing ancestor) is on a bpf filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(cur) = p {
        if cur.exists() {
            // f_type's integer type differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            return rustix::fs::statfs(cur).is_ok_and(|s| s.f_type as i64 == BPF_FS_MAGIC);
        }
        p = cur.parent();
    }
    false
}

/// Remove a pin directory and everything in it (unpinning what was pinned there).
pub fn remove_pins(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
