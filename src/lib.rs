//! burrow: peer-to-peer connectivity through NAT.
//!
//! Two nodes register with a relay, learn their public addresses, get introduced, punch a
//! direct UDP path and fall back to relaying when none exists. See `ARCHITECTURE.md`.
//!
//! Layout (sans-IO, after quinn-proto and str0m): [`wire`] holds stateless codecs; [`relay`]
//! and [`node`] are pure state machines with time passed in; [`transport`] wraps
//! quinn-proto; only [`driver`] touches sockets and the clock; `sim` is a deterministic
//! in-memory network with NAT models that runs the real cores.
#![deny(missing_docs)]

pub mod app;
pub mod driver;
pub mod identity;
pub mod node;
pub mod plane;
pub mod portmap;
pub mod relay;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod transport;
pub mod wire;
