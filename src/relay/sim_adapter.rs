//! The real [`RelayCore`] behind the simulator's [`SimRelay`] trait, so simulated nodes
//! can run against the same relay code as production.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::sim::{RELAY_ADDR, RELAY_ALT_ADDR, RelayFactory, RelayOutput, SimRelay};

use super::config::RelayConfig;
use super::core::{ConnId, Event, RelayCore};

/// [`RelayCore`] adapted to [`SimRelay`]: every core output becomes a [`RelayOutput`].
#[derive(Debug)]
pub struct SimRelayCore {
    core: RelayCore,
    outputs: VecDeque<RelayOutput>,
}

impl SimRelayCore {
    /// A relay with `config`, started at `now`.
    pub fn new(config: RelayConfig, now: Instant) -> Self {
        SimRelayCore {
            core: RelayCore::new(config, now),
            outputs: VecDeque::new(),
        }
    }

    /// The core (for metrics and assertions).
    pub fn core(&self) -> &RelayCore {
        &self.core
    }

    /// The configuration the simulator's relay uses: its two addresses, default limits
    /// except a bandwidth bucket large enough not to shape test traffic.
    pub fn sim_config(seed: u64) -> RelayConfig {
        let mut config = RelayConfig::new(RELAY_ADDR, seed);
        config.alt_listen = Some(RELAY_ALT_ADDR);
        config.limits.relay_bytes_per_sec = 1_000_000_000;
        config.limits.relay_burst_bytes = 100_000_000;
        config
    }

    /// Moves the core's outputs into the output queue (the drain order of [`RelayCore`]).
    fn collect(&mut self, now: Instant) {
        // Bounded: each event is handled once and handling adds none.
        loop {
            while let Some(t) = self.core.poll_transmit() {
                self.outputs.push_back(RelayOutput::Udp {
                    from: t.source,
                    to: t.destination,
                    bytes: t.contents,
                });
            }
            let Some(event) = self.core.poll_event() else {
                return;
            };
            let (Event::TcpWrite(conn) | Event::TcpClose(conn)) = event;
            let bytes = self.core.tcp_outgoing(conn).to_vec();
            self.core.tcp_written(conn, bytes.len());
            if !bytes.is_empty() {
                self.outputs.push_back(RelayOutput::Tcp {
                    conn: conn.0,
                    bytes,
                });
            }
            if let Event::TcpClose(conn) = event {
                self.outputs
                    .push_back(RelayOutput::CloseTcp { conn: conn.0 });
                self.core.handle_tcp_closed(now, conn);
            }
        }
    }
}

impl SimRelay for SimRelayCore {
    fn tcp_open(&mut self, now: Instant, conn: u64, from: SocketAddr) {
        self.core
            .handle_tcp_accepted(now, ConnId(conn), from, RELAY_ADDR);
        self.collect(now);
    }

    fn tcp_data(&mut self, now: Instant, conn: u64, data: &[u8]) {
        self.core.handle_tcp_data(now, ConnId(conn), data);
        self.collect(now);
    }

    fn tcp_closed(&mut self, now: Instant, conn: u64) {
        self.core.handle_tcp_closed(now, ConnId(conn));
        self.collect(now);
    }

    fn udp(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, data: &[u8]) {
        if let Some(fwd) = self.core.handle_udp(now, local, from, data) {
            self.outputs.push_back(RelayOutput::Udp {
                from: fwd.source,
                to: fwd.destination,
                bytes: data.to_vec(),
            });
        }
        self.collect(now);
    }

    fn poll_output(&mut self) -> Option<RelayOutput> {
        self.outputs.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.collect(now);
    }
}

/// A simulator relay factory running the real [`RelayCore`] (compare
/// `crate::sim::fake_relay_factory`). The factory's seed seeds the relay's RNG.
///
/// The factory gets no clock, and the simulator's base is itself an `Instant::now()`; the
/// start time only anchors the core's first timer sweep (a stale anchor just makes the
/// first sweep run at once), so reading the clock here changes no decision.
pub fn real_relay_factory() -> RelayFactory {
    Box::new(|seed| {
        Box::new(SimRelayCore::new(
            SimRelayCore::sim_config(seed),
            Instant::now(),
        ))
    })
}
