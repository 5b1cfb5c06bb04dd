//! Certificates from an ACME CA (RFC 8555) for a TLS front, renewed by the CA's ARI window
//! (RFC 9773) or at two thirds of their lifetime.
//!
//! Who does what: `client` is the `corral acme` process, unprivileged (the front's user): the
//! only code that talks to the CA and parses its answers; it writes challenge answers for the
//! fronts (`crate::front::acme`). The agent (`crate::supervisor::acme`) decides when to run it,
//! `check`s the PEM it returns like a certificate file (chain, key match, every configured
//! name, dates), keeps it in `state` (root-only files, written atomically), from where the
//! certificate watch rolls it into the fronts as it does a changed certificate file.
//! `schedule` is the pure arithmetic of when.

pub mod check;
pub mod client;
pub mod schedule;
pub mod state;
