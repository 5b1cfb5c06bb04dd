//! Decisions as pure functions of plain values: no tokio, no syscalls, no `sys` imports.
//! The supervisor feeds them what happened and executes what they return.

pub mod budget;
pub mod container;
pub mod drain;
pub mod health;
pub mod init;
pub mod restart;
pub mod rollout;
