//! The data plane: joins a [`NodeCore`] (paths: relay or direct) and a [`Transport`] (QUIC)
//! and hosts a [`Service`] (a command such as send, pipe or bench) on top.
//!
//! Datagrams from a peer ([`NodeEvent::Datagram`]) go into the transport under that peer's
//! ID; the transport's output goes back through [`NodeCore::send_datagram`], which picks the
//! current real path for each datagram. QUIC therefore sees one continuous connection per
//! peer while the path moves between the relay and a direct route.
//!
//! The side that asked for the introduction (`Role::Initiator`) dials the QUIC connection;
//! the other side accepts it. Everything here is sans-IO: it runs inside the mio driver
//! ([`crate::driver::node::NodeDriver`]) or the simulator alike.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tracing::{debug, trace};

use crate::driver::node::NodeApp;
use crate::node::{NodeCore, NodeEvent, SendError};
use crate::transport::{ConnectionHandle, Event, Transport};
use crate::wire::PeerId;
use crate::wire::control::Role;

/// A command running over QUIC connections.
pub trait Service {
    /// A transport event (connections, streams, datagrams).
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event);
    /// A node event the plane does not consume (introductions, path changes, pongs,
    /// failures), for display and decisions.
    fn on_node_event(&mut self, now: Instant, core: &mut NodeCore, event: &NodeEvent);
    /// Called every loop turn: push more data, act on timers.
    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport);
    /// When the service next wants `on_tick`.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Whether the command has finished.
    fn is_done(&self) -> bool;
}

/// Counters of the plane itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlaneStats {
    /// QUIC datagrams handed to the node core.
    pub datagrams_out: u64,
    /// QUIC datagrams the node core could not send (no path yet).
    pub datagrams_unsent: u64,
    /// QUIC datagrams received from peers.
    pub datagrams_in: u64,
}

/// A [`NodeApp`] that runs QUIC over the node's paths and a [`Service`] over QUIC.
pub struct DataPlane<S: Service> {
    transport: Transport,
    service: S,
    /// Peers we asked to reach: dial QUIC once introduced.
    dial: HashSet<PeerId>,
    conns: HashMap<PeerId, ConnectionHandle>,
    stats: PlaneStats,
    /// Datagrams went into the transport since the last pump (see [`NodeApp::flush`]).
    pump_pending: bool,
}

impl<S: Service> DataPlane<S> {
    /// A plane around a transport and a service.
    pub fn new(transport: Transport, service: S) -> Self {
        DataPlane {
            transport,
            service,
            dial: HashSet::new(),
            conns: HashMap::new(),
            stats: PlaneStats::default(),
            pump_pending: false,
        }
    }

    /// Asks the relay for `peer` and dials QUIC once introduced.
    pub fn connect(&mut self, now: Instant, core: &mut NodeCore, peer: PeerId) {
        self.dial.insert(peer);
        core.connect(now, peer);
    }

    /// The service.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The service, mutably.
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// The transport (for connection statistics).
    pub fn transport(&mut self) -> &mut Transport {
        &mut self.transport
    }

    /// The plane's counters.
    pub fn stats(&self) -> PlaneStats {
        self.stats
    }

    /// Moves transport output to the node and transport events to the service until both
    /// are quiet.
    fn pump(&mut self, now: Instant, core: &mut NodeCore) {
        for _ in 0..100_000 {
            let mut progressed = false;
            while let Some(t) = self.transport.poll_transmit(now) {
                progressed = true;
                // The whole batch goes to the core at once: on a direct path it leaves as one
                // GSO send without being copied.
                let count = t.datagrams().len() as u64;
                match core.send_segments(now, &t.peer, t.contents, t.segment_size) {
                    Ok(_) => self.stats.datagrams_out += count,
                    Err(SendError::NoPath) | Err(SendError::UnknownPeer) => {
                        // Like lost packets: QUIC retransmits once a path exists.
                        self.stats.datagrams_unsent += count;
                    }
                    Err(e) => debug!(peer = %t.peer.short(), "datagrams not sent: {e}"),
                }
            }
            while let Some(ev) = self.transport.poll_event() {
                progressed = true;
                match &ev {
                    Event::Connected { conn, peer, .. } => {
                        self.conns.insert(*peer, *conn);
                    }
                    Event::ConnectionLost { conn, peer, .. }
                        if self.conns.get(peer) == Some(conn) =>
                    {
                        self.conns.remove(peer);
                    }
                    _ => {}
                }
                self.service
                    .on_transport_event(now, &mut self.transport, ev);
            }
            if !progressed {
                return;
            }
        }
        trace!("pump did not settle within its bound");
    }
}

impl<S: Service> NodeApp for DataPlane<S> {
    fn on_event(&mut self, now: Instant, core: &mut NodeCore, event: NodeEvent) {
        match event {
            NodeEvent::Datagram { peer, bytes } => {
                self.stats.datagrams_in += 1;
                self.transport.handle_datagram_owned(now, peer, bytes);
                // Pumped in `flush` once the driver has handed over the whole received
                // batch: ACK processing then opens the congestion window once for many
                // datagrams and the sender emits full GSO batches instead of one or two
                // datagrams per ACK (and the receiver sends one ACK for the batch).
                self.pump_pending = true;
                return;
            }
            other => {
                if let NodeEvent::Introduced {
                    peer,
                    role: Role::Initiator,
                } = &other
                    && self.dial.contains(peer)
                    && !self.conns.contains_key(peer)
                {
                    match self.transport.connect(now, *peer) {
                        Ok(conn) => {
                            self.conns.insert(*peer, conn);
                        }
                        Err(e) => debug!(peer = %peer.short(), "QUIC connect: {e}"),
                    }
                }
                self.service.on_node_event(now, core, &other);
            }
        }
        self.pump(now, core);
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore) {
        self.pump_pending = false;
        if self.transport.poll_timeout().is_some_and(|t| t <= now) {
            self.transport.handle_timeout(now);
        }
        self.service.on_tick(now, core, &mut self.transport);
        self.pump(now, core);
    }

    fn flush(&mut self, now: Instant, core: &mut NodeCore) {
        if std::mem::take(&mut self.pump_pending) {
            self.pump(now, core);
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        [self.transport.poll_timeout(), self.service.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    fn is_done(&self) -> bool {
        self.service.is_done()
    }
}
