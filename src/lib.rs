//! burrow: peer-to-peer connectivity through NAT.
//!
//! Two nodes register with a relay, learn their public addresses, get introduced, punch a
//! direct UDP path and fall back to relaying when none exists. See `ARCHITECTURE.md`.
//!
//! Layout (sans-IO, after quinn-proto and str0m): [`wire`] holds stateless codecs shared with
//! the relay; the cores are pure state machines with time passed in; only `driver` touches
//! sockets and the clock.
#![deny(missing_docs)]

pub mod wire;
