//! The steering ABI: Rust mirrors of ebpf/steer.h, checked for size at compile time.

/// Bumped with every change to ebpf/steer.h; pins live under `bpf_pin_dir/v<ABI>-<object hash>`.
pub const ABI_VERSION: u32 = 7;
pub const MAX_SLOTS: u32 = 1024;
pub const POLICY_LEAST_LOADED: u32 = 0;
pub const POLICY_ROUND_ROBIN: u32 = 1;
pub const POLICY_SHARED: u32 = 2;
/// Least-loaded scans ready sets up to this size whole.
pub const FULL_SCAN: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    pub policy: u32,
    pub active: u32,
    pub probe_base: u32,
    pub probe_count: u32,
    pub port: u32,
    pub tracking: u32,
    pub epoch: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Eligible {
    pub count: u32,
    pub slots: [u32; MAX_SLOTS as usize],
}

impl Default for Eligible {
    fn default() -> Self {
        Eligible {
            count: 0,
            slots: [0; MAX_SLOTS as usize],
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub selected: u64,
    pub probes: u64,
    pub migrations: u64,
    pub select_errors: u64,
    pub fallbacks: u64,
    pub no_eligible: u64,
    pub tracked: u64,
    pub untracked: u64,
}

/// A slot's connections that a previous agent's tracker still counts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub inflight: u32,
    pub _pad: u32,
    pub since: u64,
}

const _: () = assert!(std::mem::size_of::<Config>() == 28);
const _: () = assert!(std::mem::size_of::<Carried>() == 16);
const _: () = assert!(std::mem::size_of::<Eligible>() == 4 + 4 * MAX_SLOTS as usize);
const _: () = assert!(std::mem::size_of::<Stats>() == 64);
const _: () = assert!(MAX_SLOTS.is_power_of_two());
const _: () = assert!(MAX_SLOTS == crate::sys::socket::PROBE_PORTS as u32);

// SAFETY: plain-old-data C structs without padding (sizes asserted above); any bit pattern is
// a valid value.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Eligible {}
// SAFETY: as above.
unsafe impl aya::Pod for Stats {}
// SAFETY: as above (the padding is an explicit field).
unsafe impl aya::Pod for Carried {}

/// The compiled program (ebpf/steer.bpf.c), built by agent/build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));

/// `v<ABI>-<FNV-1a of the object>`: a pinned set from another build is never mistaken for ours.
pub fn version_tag() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("v{ABI_VERSION}-{:012x}", h >> 16)
}
