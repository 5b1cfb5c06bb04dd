//! corral: a Linux-native process manager for web-app workers.
//!
//! Module map and dependency rule (see ARCHITECTURE.md): `config` and `policy` are pure and never
//! import `sys`; `sys` is the only home of `unsafe` and raw syscalls; `supervisor` turns kernel
//! events into policy calls and policy decisions into effects; `control` is the wire format of
//! the control socket; `metrics` renders the status for Prometheus (pure).
#![deny(unsafe_code)]

pub mod acme;
pub mod config;
pub mod control;
pub mod front;
pub mod keeper;
pub mod metrics;
pub mod policy;
pub mod supervisor;
pub mod sys;
