//! The TLS front (`[app.NAME.tls]`): certificate bundles built by the agent, and the
//! unprivileged `corral front` process that terminates TLS and proxies to the app's workers.

pub mod bundle;
pub mod process;
pub mod proxy;
pub mod redirect;
pub mod stats;
