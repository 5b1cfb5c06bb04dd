//! The event loop. One task owns every app, slot and worker; everything else (pidfd waits,
//! readiness probes, timers, pre-start sequences, control connections) runs in small tasks that
//! report back as events. The app's bookkeeping (`policy::rollout`) decides what follows each
//! event; this module carries it out.
//!
//! Rooms: `startup` (the agent's life: start, loop, end), `state` (what the loop owns),
//! `events` (events in, decisions, effects out), `workers` (starting and stopping processes),
//! `apps` (an app from config to running), `reload` (reload, scale, removal, the budget on
//! change), `control` and `status` (the control socket), `front` (a TLS front's bundle,
//! certificates and counters), `handoff` (`corral reexec`), and the helpers each of those uses:
//! `launch`, `ready`, `prestart`, `output`, `steering`, `cgroups`, `budget`, `metrics`.

mod acme;
mod adopt;
mod apps;
pub mod budget;
pub mod cgroups;
mod control;
mod drain;
mod events;
mod front;
pub mod handoff;
mod keeper;
pub mod launch;
mod metrics;
mod output;
mod prestart;
mod ready;
mod reload;
mod startup;
mod state;
mod status;
pub mod steering;
mod workers;

pub use budget::worker_count;
pub use keeper::paths as keeper_paths;
pub use startup::{run, Options, StartError};
pub use workers::exit_status;
