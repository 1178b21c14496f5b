//! The sans-IO relay core (registration, rendezvous, STUN, forwarding, limits). It lives in
//! the library, not in `relay/`, so that the simulator can run it next to the node core;
//! the `burrow-relay` binary wraps it in a mio driver.
//!
//! One state machine per file:
//! - [`core`]: [`RelayCore`], the whole relay (sessions, channels, UDP bindings, STUN).
//! - [`session`]: one TCP control session (Challenge → Register → Registered → Closing)
//!   and its bounded outgoing byte queue.
//! - [`stun_server`]: the STUN Binding responder (stateless).
//! - [`limits`]: token buckets and per-IP rate windows.
//! - [`metrics`]: counters as plain integers and their Prometheus text rendering.
//! - [`config`]: [`RelayConfig`] and [`Limits`] with their defaults.

pub mod config;
pub mod core;
pub mod limits;
pub mod metrics;
pub mod session;
pub mod stun_server;

pub use self::config::{Limits, RelayConfig};
pub use self::core::{ConnId, Event, Forward, ForwardRun, RelayCore, Transmit};
pub use self::metrics::Metrics;

/// Scenarios of the real node core against the real relay core in the simulator (the
/// adapter is `crate::sim::RealRelay`).
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;
