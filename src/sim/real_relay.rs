//! The real [`RelayCore`] behind the simulator's [`SimRelay`] trait.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use super::{RelayOutput, SimRelay};
use crate::relay::{ConnId, Event, RelayConfig, RelayCore};

/// Adapter from [`RelayCore`]'s driver API to [`SimRelay`].
#[derive(Debug)]
pub struct RealRelay {
    core: RelayCore,
    tcp_local: SocketAddr,
    now: Instant,
    out: VecDeque<RelayOutput>,
}

impl RealRelay {
    /// A relay core with `config`, started at `now`.
    pub fn new(config: RelayConfig, now: Instant) -> Self {
        let tcp_local = config.listen;
        RealRelay {
            core: RelayCore::new(config, now),
            tcp_local,
            now,
            out: VecDeque::new(),
        }
    }

    /// The wrapped core (metrics, lookups).
    pub fn core(&self) -> &RelayCore {
        &self.core
    }

    fn drain(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            self.out.push_back(RelayOutput::Udp {
                from: t.source,
                to: t.destination,
                bytes: t.contents,
            });
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::TcpWrite(c) => self.flush(c),
                Event::TcpClose(c) => {
                    self.flush(c);
                    self.out.push_back(RelayOutput::CloseTcp { conn: c.0 });
                    self.core.handle_tcp_closed(self.now, c);
                }
            }
        }
    }

    fn flush(&mut self, c: ConnId) {
        let bytes = self.core.tcp_outgoing(c).to_vec();
        if !bytes.is_empty() {
            self.core.tcp_written(c, bytes.len());
            self.out.push_back(RelayOutput::Tcp { conn: c.0, bytes });
        }
    }
}

impl SimRelay for RealRelay {
    fn tcp_open(&mut self, now: Instant, conn: u64, from: SocketAddr) {
        self.now = now;
        self.core
            .handle_tcp_accepted(now, ConnId(conn), from, self.tcp_local);
        self.drain();
    }

    fn tcp_data(&mut self, now: Instant, conn: u64, data: &[u8]) {
        self.now = now;
        self.core.handle_tcp_data(now, ConnId(conn), data);
        self.drain();
    }

    fn tcp_closed(&mut self, now: Instant, conn: u64) {
        self.now = now;
        self.core.handle_tcp_closed(now, ConnId(conn));
        self.drain();
    }

    fn udp(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, data: &[u8]) {
        self.now = now;
        if let Some(f) = self.core.handle_udp(now, local, from, data) {
            self.out.push_back(RelayOutput::Udp {
                from: f.source,
                to: f.destination,
                bytes: data.to_vec(),
            });
        }
        self.drain();
    }

    fn poll_output(&mut self) -> Option<RelayOutput> {
        self.drain();
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        self.core.handle_timeout(now);
        self.drain();
    }
}
