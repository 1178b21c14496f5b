//! The only code that touches mio, sockets and the clock.
//!
//! The cores (`relay`, `node`, `transport`) are pure state machines; the driver owns one
//! mio `Poll`, the sockets, and `Instant::now()`, feeds the cores their inputs and carries
//! out their outputs.

pub mod node;
pub mod portmap;
pub mod relay;
pub mod udp;
