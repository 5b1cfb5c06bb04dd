//! The VM tier's smoke tests: they run inside Debian's kernels under qemu, started by
//! `cargo xtask vm-test` (its /init mounts cgroup2, bpffs and tmpfs, loads tls.ko and runs this
//! executable with `--ignored` and CORRAL_VM=1). On the host they are ignored: its kernel has
//! no cgroup v2 memory controller and no kTLS.
//!
//! One module a topic: [`kernel`] (what the VM's kernel offers), [`steering`] (the agent with
//! eBPF steering and readiness), [`leaves`] and [`limits`] (per-worker cgroup v2 leaves and the
//! limits in them), [`tls_front`] (kTLS + splice).

#[path = "vm/fixture.rs"]
mod fixture;
#[path = "vm/kernel.rs"]
mod kernel;
#[path = "vm/leaves.rs"]
mod leaves;
#[path = "vm/limits.rs"]
mod limits;
#[path = "vm/steering.rs"]
mod steering;
#[path = "vm/tls_front.rs"]
mod tls_front;
