//! Configuration: TOML files -> validated [`Config`]. Pure: reads files, never touches the
//! system otherwise. What it must know about the machine (users, groups) comes in through
//! [`Lookup`], which `sys` implements.

mod error;
pub mod limits;
mod load;
mod raw;
mod types;

#[cfg(test)]
mod tests;

pub use error::ConfigError;
pub use load::{load, load_str, LETS_ENCRYPT};
pub use types::*;

/// What validation needs to know about the machine.
pub trait Lookup {
    /// `(uid, primary gid)` of a user name, or `None` when no such user exists.
    fn user(&self, name: &str) -> Option<(u32, u32)>;
    /// The name of the group with this gid, if any.
    fn group_name(&self, gid: u32) -> Option<String>;
    /// The gid of a group name, or `None` when no such group exists.
    fn group(&self, name: &str) -> Option<u32>;
}
