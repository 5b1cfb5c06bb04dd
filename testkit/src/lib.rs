//! What the integration tests (`tests/`) and the project tasks (`xtask/`) both need: free
//! loopback ports, guards that stop the processes they started, CLOCK_MONOTONIC time as the
//! demo worker writes it, and builders for the `[agent]` and `[app.NAME]` tables of a config.
//!
//! These helpers serve tests and benchmarks, where a failed setup ends the run: they panic with
//! a message naming what failed instead of returning errors.

pub mod clock;
pub mod config;
pub mod port;
pub mod process;

pub use clock::{monotonic_ns, started_lines};
pub use config::{AgentTable, App, Table, Value};
pub use port::{free_port, loopback};
pub use process::{die_with_parent, pid_alive, terminate, ChildGuard, KillOnDrop};
