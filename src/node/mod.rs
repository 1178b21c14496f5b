//! The sans-IO node core: relay session, address discovery, peer table, punching, path choice.
//!
//! [`NodeCore`] is a pure state machine (after quinn-proto and str0m): it never reads the
//! clock, never touches a socket, and draws randomness from a `ChaCha20Rng` seeded by
//! [`NodeConfig::seed`]. A driver (the mio reactor, or the simulator in `crate::sim`) feeds
//! it inputs and carries out its outputs.
//!
//! # Driving it
//!
//! Inputs (`handle_*` and application calls), each taking `now`:
//! * [`NodeCore::handle_udp`]: a datagram arrived on one of our UDP sockets (`local` is that
//!   socket's address; issue 7 will open many sockets, so every output names its source).
//! * Relay TCP: the core asks for a connection with [`NodeEvent::ConnectRelayTcp`]; the
//!   driver reports [`NodeCore::handle_relay_connected`] or [`NodeCore::handle_relay_closed`]
//!   (connect failure, EOF, error), passes received bytes to
//!   [`NodeCore::handle_relay_tcp_data`], writes [`NodeCore::relay_tcp_outgoing`] and
//!   confirms with [`NodeCore::relay_tcp_written`]. [`NodeEvent::CloseRelayTcp`] asks the
//!   driver to close the connection (no `handle_relay_closed` needed after that).
//! * [`NodeCore::handle_timeout`] when [`NodeCore::poll_timeout`] has passed.
//! * Application: [`NodeCore::connect`], [`NodeCore::send_datagram`], [`NodeCore::ping`],
//!   [`NodeCore::netcheck`].
//!
//! Drain order after every input: [`NodeCore::poll_transmit`] until `None` (UDP datagrams),
//! then [`NodeCore::relay_tcp_outgoing`] (TCP bytes), then [`NodeCore::poll_event`] until
//! `None`, then sleep until [`NodeCore::poll_timeout`]. Handling an event may produce more
//! transmits (e.g. `send_datagram` from the QUIC layer), so a driver loops until all three
//! are empty.
//!
//! # Paths
//! Datagrams to a peer flow over the relay from the moment of the introduction and switch
//! to the direct path once a probe round trip confirms it ([`NodeEvent::PathChanged`]); if
//! the direct path dies they go back to the relay. The QUIC layer above only sees
//! [`NodeCore::send_datagram`] / [`NodeEvent::Datagram`]. Only QUIC-looking datagrams
//! (first byte `0x40..=0x7F` or `0xC0..=0xFF`) are carried; punch packets (`0x21`) are the
//! core's own, on any path (that is how [`NodeCore::ping`] measures every path).

mod discovery;
mod path;
mod peer;
mod punch;
mod relay_session;
mod spray;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::{debug, trace};

pub use discovery::{NetcheckReport, StunProbeResult, StunServerKind};
pub use path::PathKind;
pub use peer::PeerHandle;
pub use punch::PunchConfig;
pub use spray::SprayConfig;

use crate::identity::Identity;
use crate::portmap::PortMapStatus;
use crate::wire::control::{
    self, Candidate, CandidateKind, ClientMsg, ConnectFailure, ErrorCode, NatReport, Register,
    Role, ServerMsg, UdpMsg,
};
use crate::wire::punch::{self as punch_wire, PunchType};
use crate::wire::relay_data::{self, ChannelId};
use crate::wire::{PacketClass, PeerId, classify};
use discovery::Discovery;
use peer::{IntroKeys, Peer, PeerTable};
use punch::{PathUpdate, PunchState};
use relay_session::{Incoming, RelaySession, SessionAction, UdpOutcome};

/// A UDP datagram for the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The local socket to send from; `None` means the driver's default socket for the
    /// destination's address family.
    pub source: Option<SocketAddr>,
    /// Where to.
    pub destination: SocketAddr,
    /// `Some(n)`: `contents` holds several datagrams of `n` bytes each (the last may be
    /// shorter) for one GSO send; a driver without GSO sends them one by one. `None`: one
    /// datagram. Only [`NodeCore::send_segments`] produces `Some` (direct and relay-UDP paths).
    pub segment_size: Option<usize>,
    /// The bytes.
    pub contents: Vec<u8>,
}

impl Transmit {
    /// The individual datagrams of this transmit.
    pub fn datagrams(&self) -> std::slice::Chunks<'_, u8> {
        let size = self.segment_size.unwrap_or(self.contents.len()).max(1);
        self.contents.chunks(size)
    }
}

/// Node configuration.
#[derive(Clone)]
pub struct NodeConfig {
    /// Our key; the peer ID is its public half.
    pub identity: Identity,
    /// The relay's TCP control address.
    pub relay_tcp: SocketAddr,
    /// The relay's UDP address (STUN, binds, relayed data); usually the same as `relay_tcp`.
    pub relay_udp: SocketAddr,
    /// Extra STUN servers for netcheck (e.g. coturn).
    pub stun_servers: Vec<SocketAddr>,
    /// Our UDP sockets' addresses: host candidates. Unspecified addresses are skipped.
    pub local_addrs: Vec<SocketAddr>,
    /// Access token for the relay, if it wants one.
    pub token: Option<String>,
    /// Seed of the core's RNG (the driver seeds it from the OS; the simulator from its own).
    pub seed: u64,
    /// Punching and keepalive tuning.
    pub punch: PunchConfig,
    /// Sent to the relay for its logs.
    pub agent: String,
    /// Benchmark/test knob: never punch (no candidates are probed), so data to peers stays
    /// on the relay (UDP, or TCP when UDP to the relay does not work — point `relay_udp` at
    /// a dead port to force that). `false` in normal use.
    pub relay_only: bool,
}

impl NodeConfig {
    /// Defaults for everything but the identity and the relay.
    pub fn new(identity: Identity, relay: SocketAddr) -> Self {
        NodeConfig {
            identity,
            relay_tcp: relay,
            relay_udp: relay,
            stun_servers: Vec::new(),
            local_addrs: Vec::new(),
            token: None,
            seed: 0,
            punch: PunchConfig::default(),
            agent: concat!("burrow ", env!("CARGO_PKG_VERSION")).to_string(),
            relay_only: false,
        }
    }
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("peer_id", &self.identity.peer_id())
            .field("relay_tcp", &self.relay_tcp)
            .field("relay_udp", &self.relay_udp)
            .finish_non_exhaustive()
    }
}

/// What the node tells its driver and application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// Open a TCP connection to the relay at this address.
    ConnectRelayTcp(SocketAddr),
    /// Close the relay TCP connection (timeout or protocol error).
    CloseRelayTcp,
    /// Registered with the relay.
    Registered {
        /// Our address as the relay saw the TCP connection.
        observed_tcp: SocketAddr,
    },
    /// The relay session ended; it reconnects by itself. Direct paths keep working.
    RelayLost,
    /// The relay rejected us with a fatal error (bad token...).
    RelayError {
        /// Why.
        code: ErrorCode,
        /// For humans.
        message: String,
    },
    /// Introduced to a peer: relayed traffic works from now on, punching has started.
    Introduced {
        /// Who.
        peer: PeerId,
        /// Our role (the initiator is the QUIC client).
        role: Role,
    },
    /// The path to a peer changed.
    PathChanged {
        /// Who.
        peer: PeerId,
        /// The new path.
        path: PathKind,
    },
    /// A datagram (QUIC packet) from a peer.
    Datagram {
        /// From whom.
        peer: PeerId,
        /// The bytes: a unique view into a receive arena shared with a few neighbouring
        /// datagrams (see [`RX_ARENA`]), so QUIC can decrypt it in place.
        bytes: BytesMut,
    },
    /// Answer to [`NodeCore::ping`].
    Pong {
        /// Who answered.
        peer: PeerId,
        /// The ping's sequence number.
        seq: u64,
        /// The path the ping went out on.
        path: PathKind,
        /// Round-trip time.
        rtt: Duration,
    },
    /// A [`NodeCore::connect`] failed at the relay.
    ConnectFailed {
        /// Who.
        peer: PeerId,
        /// Why.
        reason: ConnectFailure,
        /// For humans.
        message: String,
    },
    /// The relay says the peer left (its relayed channel is closed).
    PeerGone {
        /// Who.
        peer: PeerId,
    },
    /// A [`NodeCore::netcheck`] finished.
    NetcheckDone(NetcheckReport),
    /// For the driver (like [`NodeEvent::ConnectRelayTcp`]): bind IPv4 UDP sockets on the
    /// main socket's address at these ports (0: any free port) for hard-NAT punching, and
    /// answer with [`NodeCore::handle_sockets_opened`] (also when none could be opened).
    OpenSockets {
        /// Echo this in the answer.
        request: u64,
        /// One socket per entry.
        ports: Vec<u16>,
    },
    /// For the driver: close these sockets (from an earlier [`NodeEvent::OpenSockets`]).
    CloseSockets {
        /// Their local addresses, as reported in [`NodeCore::handle_sockets_opened`].
        locals: Vec<SocketAddr>,
    },
    /// The router port mapping changed (see [`NodeCore::handle_port_mapping`]).
    PortMapping(PortMapStatus),
}

/// Why a datagram or ping could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No introduction to this peer (call [`NodeCore::connect`] first).
    #[error("not connected to that peer")]
    UnknownPeer,
    /// Neither a direct path nor the relay is available right now.
    #[error("no path to the peer right now")]
    NoPath,
    /// Not a QUIC datagram (the core only carries first bytes 0x40..=0x7F, 0xC0..=0xFF).
    #[error("not a QUIC datagram")]
    NotQuic,
}

/// Node-level timers (per-peer and per-session timers live in their state machines; the
/// next timeout is the minimum over this table and them).
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// Periodic re-discovery (roaming: a new reflexive address).
    Rediscover = 0,
    /// Register now even though STUN has not answered yet.
    RegisterDeadline = 1,
}
const TIMER_COUNT: usize = 2;
/// How long `Register` may wait for our reflexive address. Registering with it means the
/// relay's introductions carry it; without it, a peer's first probes can arrive before
/// ours left (see `punch`), which a bare masquerade NAT punishes.
const REGISTER_WAIT: Duration = Duration::from_secs(1);
/// How often the STUN round repeats to notice a changed mapping.
const REDISCOVER_EVERY: Duration = Duration::from_secs(120);
/// Relayed packets kept while their channel's introduction is on its way.
const EARLY_RELAYED_MAX: usize = 32;
/// How long such a packet is kept.
const EARLY_RELAYED_TTL: Duration = Duration::from_secs(2);
/// Size of one receive arena ([`NodeEvent::Datagram`] bytes are views into it): about six
/// 1200-byte datagrams per allocation. Small on purpose: a received STREAM frame keeps its
/// whole arena alive until the application reads it, and quinn's reassembly bounds
/// over-allocation by the *datagram* size, so a peer sending tiny out-of-order frames pins
/// at most ~6× what quinn accounts for (it defragments past 32 KiB of that per stream).
pub const RX_ARENA: usize = 8 * 1024;
/// Most app pings awaiting a pong.
const MAX_APP_PINGS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct AppPing {
    peer: PeerId,
    seq: u64,
    sent: Instant,
    path: PathKind,
}

/// Where a punch packet arrived from.
#[derive(Debug, Clone, Copy)]
enum Via {
    Direct {
        local: Option<SocketAddr>,
        from: SocketAddr,
    },
    Relay,
}

/// The sans-IO node. See the module docs for how to drive it.
#[derive(Debug)]
pub struct NodeCore {
    cfg: NodeConfig,
    rng: ChaCha20Rng,
    session: RelaySession,
    discovery: Discovery,
    peers: PeerTable,
    transmits: VecDeque<Transmit>,
    events: VecDeque<NodeEvent>,
    /// Where received QUIC datagrams are copied for [`NodeEvent::Datagram`] (see
    /// [`RX_ARENA`]).
    rx_arena: BytesMut,
    timers: [Option<Instant>; TIMER_COUNT],
    next_request_id: u32,
    app_pings: HashMap<u64, AppPing>,
    ping_seq: u64,
    reflexive: Option<SocketAddr>,
    nat: NatReport,
    netcheck_wanted: bool,
    advertised: Option<(Vec<Candidate>, NatReport)>,
    pending_challenge: Option<[u8; 32]>,
    /// Counts registrations, to tell a relay restart from a peer restart (see
    /// `on_introduce`).
    relay_epoch: u64,
    /// Whether confirmed direct paths carry traffic (see [`NodeCore::set_direct_allowed`]).
    direct_allowed: bool,
    /// Relayed packets that arrived on a channel before its introduction (UDP can overtake
    /// the relay's TCP message): replayed when the introduction arrives. Bounded.
    early_relayed: VecDeque<(Instant, ChannelId, Vec<u8>)>,
    /// Outstanding socket requests: request id → (peer, ports asked).
    socket_requests: HashMap<u64, (PeerHandle, usize)>,
    next_socket_request: u64,
    /// Spray sockets open or asked for, across peers (bounded by `spray::MAX_SOCKETS_TOTAL`).
    spray_sockets: usize,
    /// The router port mapping the driver holds for our UDP socket (issue 7): announced
    /// as a `PortMapped` candidate while `Mapped`.
    port_mapping: PortMapStatus,
}

impl NodeCore {
    /// A node that starts connecting to the relay and discovering its address at `now`.
    pub fn new(cfg: NodeConfig, now: Instant) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
        let session = RelaySession::new(now, cfg.relay_tcp, cfg.relay_udp);
        let mut discovery = Discovery::default();
        discovery.start(now, &Self::stun_servers(&cfg, None), &mut rng);
        let mut timers = [None; TIMER_COUNT];
        timers[Timer::Rediscover as usize] = Some(now + REDISCOVER_EVERY);
        NodeCore {
            cfg,
            rng,
            session,
            discovery,
            peers: PeerTable::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            rx_arena: BytesMut::new(),
            timers,
            next_request_id: 1,
            app_pings: HashMap::new(),
            ping_seq: 0,
            reflexive: None,
            nat: NatReport::default(),
            netcheck_wanted: false,
            advertised: None,
            direct_allowed: true,
            early_relayed: VecDeque::new(),
            pending_challenge: None,
            relay_epoch: 0,
            socket_requests: HashMap::new(),
            next_socket_request: 1,
            spray_sockets: 0,
            port_mapping: PortMapStatus::Disabled,
        }
    }

    fn stun_servers(
        cfg: &NodeConfig,
        alternate: Option<SocketAddr>,
    ) -> Vec<(SocketAddr, StunServerKind)> {
        let mut v = vec![(cfg.relay_udp, StunServerKind::Relay)];
        if let Some(a) = alternate {
            v.push((a, StunServerKind::RelayAlternate));
        }
        v.extend(cfg.stun_servers.iter().map(|s| (*s, StunServerKind::Extra)));
        v
    }

    /// Our peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.cfg.identity.peer_id()
    }

    /// Whether the relay session is registered.
    pub fn is_registered(&self) -> bool {
        self.session.is_registered()
    }

    /// The driver's port mapping changed: a held mapping becomes a `PortMapped` candidate
    /// (announced to the relay with `UpdateCandidates`, so current and future peers probe
    /// it); anything else withdraws it. Emits [`NodeEvent::PortMapping`].
    pub fn handle_port_mapping(&mut self, now: Instant, status: PortMapStatus) {
        if self.port_mapping == status {
            return;
        }
        debug!(?status, "port mapping");
        self.port_mapping = status.clone();
        self.events.push_back(NodeEvent::PortMapping(status));
        self.maybe_update_candidates(now);
    }

    /// The port mapping as last reported by the driver.
    pub fn port_mapping(&self) -> &PortMapStatus {
        &self.port_mapping
    }

    /// What we measured of our NAT so far.
    pub fn nat_report(&self) -> NatReport {
        self.nat
    }

    /// Lets confirmed direct paths carry traffic (the default) or holds them back so that
    /// everything stays on the relay while punching and keepalives go on underneath. Used to
    /// measure the relay path (`burrow demo`, benchmarks) and by operators who want relayed
    /// traffic only. Emits [`NodeEvent::PathChanged`] for every peer whose path changes.
    pub fn set_direct_allowed(&mut self, now: Instant, allowed: bool) {
        if self.direct_allowed == allowed {
            return;
        }
        let before: Vec<_> = self
            .peers
            .handles()
            .into_iter()
            .map(|h| (h, self.path_of(now, h)))
            .collect();
        self.direct_allowed = allowed;
        for (h, old) in before {
            let new = self.path_of(now, h);
            if new != old
                && let (Some(path), Some(peer)) = (new, self.peers.get(h).map(|p| p.id))
            {
                self.events.push_back(NodeEvent::PathChanged { peer, path });
            }
        }
    }

    /// The current path to a peer, `None` when there is none.
    pub fn path(&self, now: Instant, peer: &PeerId) -> Option<PathKind> {
        let h = self.peers.by_id(peer)?;
        self.path_of(now, h)
    }

    /// The handle of a known peer.
    pub fn peer_handle(&self, peer: &PeerId) -> Option<PeerHandle> {
        self.peers.by_id(peer)
    }

    fn path_of(&self, now: Instant, h: PeerHandle) -> Option<PathKind> {
        let p = self.peers.get(h)?;
        path::choose(path::PathInputs {
            direct: p
                .punch
                .direct()
                .map(|d| d.remote)
                .filter(|_| self.direct_allowed),
            has_channel: p.intro.is_some() && p.channel_live,
            relay_registered: self.session.is_registered(),
            relay_udp: self.session.udp_works(now),
        })
    }

    fn families(&self) -> (bool, bool) {
        if self.cfg.local_addrs.is_empty() {
            return (true, true);
        }
        (
            self.cfg.local_addrs.iter().any(|a| a.is_ipv4()),
            self.cfg.local_addrs.iter().any(|a| a.is_ipv6()),
        )
    }

    // ------------------------------------------------------------------ outputs

    /// The next UDP datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// Bytes to write to the relay TCP connection (empty when none).
    pub fn relay_tcp_outgoing(&self) -> &[u8] {
        self.session.outgoing()
    }

    /// The driver wrote the first `n` bytes of [`NodeCore::relay_tcp_outgoing`].
    pub fn relay_tcp_written(&mut self, n: usize) {
        self.session.written(n);
    }

    /// When [`NodeCore::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.timers.iter().flatten().copied().min();
        for x in [
            self.session.poll_timeout(),
            self.discovery.poll_timeout(self.session.is_registered()),
        ]
        .into_iter()
        .flatten()
        {
            t = Some(t.map_or(x, |t| t.min(x)));
        }
        for h in self.peers.handles() {
            let Some(p) = self.peers.get(h) else { continue };
            for x in [p.punch.poll_timeout(), p.reconnect_at]
                .into_iter()
                .flatten()
            {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        }
        t
    }

    /// The earliest timer that must not be rounded to a millisecond: a hard-NAT sweep
    /// burst, whose two halves must start within tens of microseconds of each other. A
    /// driver whose timers are coarser should spin (poll without blocking) for the last
    /// stretch before it. `None` almost always.
    pub fn poll_precise_timeout(&self) -> Option<Instant> {
        self.peers
            .handles()
            .into_iter()
            .filter_map(|h| self.peers.get(h).and_then(|p| p.punch.precise_deadline()))
            .min()
    }

    // ------------------------------------------------------------------ inputs

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut actions = Vec::new();
        let mut udp = Vec::new();
        self.session
            .on_timeout(now, &mut self.rng, &mut actions, &mut udp);
        self.apply_session(actions, udp);

        let mut stun_out = Vec::new();
        self.discovery.on_timeout(now, &mut stun_out);
        if self.session.is_registered() {
            self.discovery.give_up_if_silent(now);
        }
        for (destination, contents) in stun_out {
            self.transmits.push_back(Transmit {
                source: None,
                destination,
                contents,
                segment_size: None,
            });
        }
        self.check_discovery(now);

        if self.timers[Timer::RegisterDeadline as usize].is_some_and(|t| t <= now) {
            self.timers[Timer::RegisterDeadline as usize] = None;
            self.send_register();
        }

        if self.timers[Timer::Rediscover as usize].is_some_and(|t| t <= now) {
            self.timers[Timer::Rediscover as usize] = Some(now + REDISCOVER_EVERY);
            if !self.discovery.is_running() {
                let servers = Self::stun_servers(&self.cfg, self.session.stun_alternate);
                self.discovery.start(now, &servers, &mut self.rng);
            }
        }

        for h in self.peers.handles() {
            let reconnect = self
                .peers
                .get(h)
                .and_then(|p| p.reconnect_at)
                .is_some_and(|t| t <= now);
            if reconnect {
                if let Some(p) = self.peers.get_mut(h) {
                    p.reconnect_at = None;
                }
                if self.session.is_registered() {
                    self.send_connect(h);
                }
            }
            let due = self
                .peers
                .get(h)
                .and_then(|p| p.punch.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                self.peer_timeout(now, h);
            }
        }
    }

    fn peer_timeout(&mut self, now: Instant, h: PeerHandle) {
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        let Some(keys) = p.intro else { return };
        let old = p.punch.direct().map(|d| d.remote);
        let mut out = Vec::new();
        let upd = p
            .punch
            .on_timeout(now, &keys, &self.cfg.punch, &mut self.rng, &mut out);
        self.send_spray_relayed(now, h);
        self.transmits.extend(out);
        if let Some(u) = upd {
            self.apply_path_update(now, h, old, u);
        }
        self.flush_socket_ops(h);
    }

    /// Plans a hard-NAT attempt toward `h` from the two NAT reports. On an introduction
    /// (`fresh`) always; otherwise (a NAT report changed) only while there is neither a
    /// direct path nor a running attempt.
    fn plan_spray(&mut self, now: Instant, h: PeerHandle, fresh: bool) {
        if self.cfg.relay_only {
            return;
        }
        let ours = self.nat;
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        let Some(keys) = p.intro else { return };
        if !fresh && (p.punch.direct().is_some() || p.punch.spray_active()) {
            return;
        }
        let attempts = p.punch.attempts();
        let candidates = std::mem::take(&mut p.peer_candidates);
        p.punch.plan_spray(
            now,
            &self.cfg.punch,
            spray::PlanInputs {
                ours,
                peer: p.peer_nat,
                role: keys.role,
                peer_candidates: &candidates,
                nonce: &keys.nonce,
                attempts,
            },
            &mut self.rng,
        );
        p.peer_candidates = candidates;
        self.flush_socket_ops(h);
        if !fresh {
            self.peer_timeout(now, h);
        }
    }

    /// Turns a peer's socket requests into driver events, within the global budget.
    fn flush_socket_ops(&mut self, h: PeerHandle) {
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        for op in p.punch.take_socket_ops() {
            match op {
                spray::SocketOp::Open(mut ports) => {
                    let room = spray::MAX_SOCKETS_TOTAL.saturating_sub(self.spray_sockets);
                    ports.truncate(room);
                    let request = self.next_socket_request;
                    self.next_socket_request += 1;
                    self.spray_sockets += ports.len();
                    self.socket_requests.insert(request, (h, ports.len()));
                    if ports.is_empty() {
                        debug!("spray socket budget exhausted");
                    }
                    self.events
                        .push_back(NodeEvent::OpenSockets { request, ports });
                }
                spray::SocketOp::Close(locals) => {
                    self.spray_sockets = self.spray_sockets.saturating_sub(locals.len());
                    if !locals.is_empty() {
                        self.events.push_back(NodeEvent::CloseSockets { locals });
                    }
                }
            }
        }
    }

    /// The driver's answer to [`NodeEvent::OpenSockets`]: the sockets it bound (in the
    /// order asked; ports that could not be bound left out).
    pub fn handle_sockets_opened(&mut self, now: Instant, request: u64, locals: &[SocketAddr]) {
        let Some((h, asked)) = self.socket_requests.remove(&request) else {
            debug!(request, "sockets for no request: closing them");
            if !locals.is_empty() {
                self.events.push_back(NodeEvent::CloseSockets {
                    locals: locals.to_vec(),
                });
            }
            return;
        };
        // Count what is open, not what was asked.
        self.spray_sockets = self.spray_sockets.saturating_sub(asked) + locals.len();
        let Some(p) = self.peers.get_mut(h) else {
            self.spray_sockets = self.spray_sockets.saturating_sub(locals.len());
            if !locals.is_empty() {
                self.events.push_back(NodeEvent::CloseSockets {
                    locals: locals.to_vec(),
                });
            }
            return;
        };
        let Some(keys) = p.intro else {
            p.punch.stop();
            self.flush_socket_ops(h);
            return;
        };
        let mut out = Vec::new();
        p.punch.on_sockets_opened(now, &keys, locals, &mut out);
        self.send_spray_relayed(now, h);
        self.transmits.extend(out);
        self.flush_socket_ops(h);
        self.peer_timeout(now, h);
    }

    /// Sends what the peer's spray wants relayed (`Ready` must precede the burst queued in
    /// the same call: the peer starts its half when it arrives).
    fn send_spray_relayed(&mut self, now: Instant, h: PeerHandle) {
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        let Some(keys) = p.intro else { return };
        for (kind, txid) in p.punch.take_relayed() {
            let packet = punch::encode_packet(&keys, kind, txid, None);
            self.send_relayed(now, keys.channel, &packet);
        }
    }

    /// The relay TCP connection is established.
    pub fn handle_relay_connected(&mut self, now: Instant) {
        self.session.on_connected(now);
    }

    /// The relay TCP connection closed or could not be opened.
    pub fn handle_relay_closed(&mut self, now: Instant) {
        self.pending_challenge = None;
        let mut actions = Vec::new();
        self.session.on_closed(now, &mut self.rng, &mut actions);
        self.apply_session(actions, Vec::new());
    }

    /// Bytes read from the relay TCP connection.
    pub fn handle_relay_tcp_data(&mut self, now: Instant, data: &[u8]) {
        let mut actions = Vec::new();
        let mut incoming = Vec::new();
        self.session
            .on_tcp_data(now, data, &mut self.rng, &mut actions, &mut incoming);
        self.apply_session(actions, Vec::new());
        for inc in incoming {
            match inc {
                Incoming::Control(msg) => self.on_server_msg(now, msg),
                Incoming::Data(ch, payload) => self.on_relayed(now, ch, &payload),
            }
        }
    }

    /// A UDP datagram arrived on our socket `local` from `from`.
    pub fn handle_udp(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, packet: &[u8]) {
        match classify(packet) {
            PacketClass::Stun => {
                if self.discovery.on_packet(now, from, packet, &mut self.rng) {
                    self.check_discovery(now);
                }
            }
            PacketClass::Control if from == self.session.udp_addr() => {
                match control::decode_valid::<UdpMsg>(packet) {
                    Ok(msg) => match self.session.on_udp(now, msg) {
                        UdpOutcome::Observed(addr) => self.set_reflexive(now, addr),
                        UdpOutcome::Rejected => {
                            debug!("relay forgot our UDP token; re-registering");
                            let mut actions = Vec::new();
                            self.session.reset(now, &mut self.rng, &mut actions);
                            self.apply_session(actions, Vec::new());
                        }
                        UdpOutcome::Nothing => {}
                    },
                    Err(e) => trace!(%e, "bad UDP control message"),
                }
            }
            PacketClass::RelayData if from == self.session.udp_addr() => {
                match relay_data::parse(packet) {
                    Ok((ch, payload)) => self.on_relayed(now, ch, payload),
                    Err(e) => trace!(%e, "bad relay data"),
                }
            }
            PacketClass::Punch => self.on_punch(
                now,
                Via::Direct {
                    local: Some(local),
                    from,
                },
                packet,
            ),
            PacketClass::Quic => match self
                .peers
                .by_direct(from)
                .or_else(|| self.peers.by_validated(from))
            {
                Some(h) => {
                    if let Some(p) = self.peers.get_mut(h) {
                        p.punch.note_received(now, from, &self.cfg.punch);
                        p.punch.note_data(Some(local));
                        let peer = p.id;
                        let bytes = self.rx_copy(packet);
                        self.events.push_back(NodeEvent::Datagram { peer, bytes });
                    }
                }
                None => trace!(%from, "QUIC datagram from an unknown address"),
            },
            _ => trace!(%from, "dropped datagram"),
        }
    }

    // ------------------------------------------------------------------ application

    /// Asks the relay to introduce us to `peer`. Retried by itself after a relay restart.
    pub fn connect(&mut self, _now: Instant, peer: PeerId) {
        let h = self.peers.get_or_insert(peer, || new_peer(peer));
        if let Some(p) = self.peers.get_mut(h) {
            p.wanted = true;
        }
        if self.session.is_registered() {
            self.send_connect(h);
        }
    }

    fn send_connect(&mut self, h: PeerHandle) {
        let request_id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        p.pending_request = Some(request_id);
        // The start of connection setup (the lab bench times first byte and direct from it).
        debug!(peer = %p.id.short(), "connect request sent");
        let msg = ClientMsg::Connect {
            peer: p.id,
            request_id,
        };
        self.session.send_control(&msg);
    }

    /// Sends one datagram to `peer` on the best path right now; returns that path.
    pub fn send_datagram(
        &mut self,
        now: Instant,
        peer: &PeerId,
        bytes: &[u8],
    ) -> Result<PathKind, SendError> {
        if classify(bytes) != PacketClass::Quic {
            return Err(SendError::NotQuic);
        }
        let h = self.peers.by_id(peer).ok_or(SendError::UnknownPeer)?;
        self.send_on_path(now, h, bytes)
    }

    /// Sends a batch of datagrams to `peer`: `contents` holds datagrams of `segment_size`
    /// bytes each (the last may be shorter; `None`: one datagram), as a QUIC stack with
    /// segmentation offload emits them. On a direct path the buffer is moved, uncopied, into
    /// one [`Transmit`] for a GSO send; on the UDP relay path every datagram gets its 8-byte
    /// relay header and the equal-size results go out as one GSO send too; the TCP relay path
    /// frames each datagram on its own. Returns the path, or the error of the first datagram
    /// that could not be sent (the rest of the batch is dropped with it, like lost packets).
    pub fn send_segments(
        &mut self,
        now: Instant,
        peer: &PeerId,
        contents: Vec<u8>,
        segment_size: Option<usize>,
    ) -> Result<PathKind, SendError> {
        let size = segment_size
            .filter(|&s| s > 0 && s < contents.len())
            .unwrap_or(contents.len());
        if contents.is_empty()
            || contents
                .chunks(size)
                .any(|d| classify(d) != PacketClass::Quic)
        {
            return Err(SendError::NotQuic);
        }
        let h = self.peers.by_id(peer).ok_or(SendError::UnknownPeer)?;
        match self.path_of(now, h) {
            Some(PathKind::Direct(remote)) => {
                let p = self.peers.get_mut(h).ok_or(SendError::UnknownPeer)?;
                let source = p.punch.direct().and_then(|d| d.local);
                p.punch.note_sent(now, &self.cfg.punch);
                self.transmits.push_back(Transmit {
                    source,
                    destination: remote,
                    segment_size: (size < contents.len()).then_some(size),
                    contents,
                });
                return Ok(PathKind::Direct(remote));
            }
            Some(PathKind::RelayUdp) if size < contents.len() => {
                // Each datagram still carries its own 8-byte relay header, so the
                // header+datagram segments are equal-size too: one GSO send to the relay
                // (the relay forwards them one by one, or as a batch if it receives with GRO).
                let p = self.peers.get(h).ok_or(SendError::UnknownPeer)?;
                let ch = p.intro.ok_or(SendError::NoPath)?.channel;
                let count = contents.len().div_ceil(size);
                let mut out = Vec::with_capacity(contents.len() + count * relay_data::HEADER_LEN);
                for datagram in contents.chunks(size) {
                    relay_data::encode(ch, datagram, &mut out);
                }
                self.transmits.push_back(Transmit {
                    source: None,
                    destination: self.session.udp_addr(),
                    segment_size: Some(size + relay_data::HEADER_LEN),
                    contents: out,
                });
                return Ok(PathKind::RelayUdp);
            }
            _ => {}
        }
        let mut path = Err(SendError::NoPath);
        for datagram in contents.chunks(size) {
            path = self.send_on_path(now, h, datagram);
            if path.is_err() {
                break;
            }
        }
        path
    }

    fn send_on_path(
        &mut self,
        now: Instant,
        h: PeerHandle,
        bytes: &[u8],
    ) -> Result<PathKind, SendError> {
        let path = self.path_of(now, h).ok_or(SendError::NoPath)?;
        let p = self.peers.get_mut(h).ok_or(SendError::UnknownPeer)?;
        match path {
            PathKind::Direct(remote) => {
                let source = p.punch.direct().and_then(|d| d.local);
                p.punch.note_sent(now, &self.cfg.punch);
                self.transmits.push_back(Transmit {
                    source,
                    destination: remote,
                    contents: bytes.to_vec(),
                    segment_size: None,
                });
            }
            PathKind::RelayUdp => {
                let ch = p.intro.ok_or(SendError::NoPath)?.channel;
                let mut contents = Vec::with_capacity(relay_data::HEADER_LEN + bytes.len());
                relay_data::encode(ch, bytes, &mut contents);
                self.transmits.push_back(Transmit {
                    source: None,
                    destination: self.session.udp_addr(),
                    contents,
                    segment_size: None,
                });
            }
            PathKind::RelayTcp => {
                let ch = p.intro.ok_or(SendError::NoPath)?.channel;
                if !self.session.send_data_tcp(ch, bytes) {
                    return Err(SendError::NoPath);
                }
            }
        }
        Ok(path)
    }

    /// Sends a ping to `peer` on the current path; the answer is a [`NodeEvent::Pong`] with
    /// the returned sequence number.
    pub fn ping(&mut self, now: Instant, peer: &PeerId) -> Result<u64, SendError> {
        let h = self.peers.by_id(peer).ok_or(SendError::UnknownPeer)?;
        let keys = self
            .peers
            .get(h)
            .and_then(|p| p.intro)
            .ok_or(SendError::UnknownPeer)?;
        let txid: u64 = self.rng.random();
        let pkt = punch::encode_packet(&keys, PunchType::Ping, txid, None);
        let path = self.send_on_path(now, h, &pkt)?;
        self.ping_seq += 1;
        if self.app_pings.len() >= MAX_APP_PINGS {
            self.app_pings
                .retain(|_, p| now.saturating_duration_since(p.sent) < Duration::from_secs(60));
        }
        self.app_pings.insert(
            txid,
            AppPing {
                peer: *peer,
                seq: self.ping_seq,
                sent: now,
                path,
            },
        );
        Ok(self.ping_seq)
    }

    /// Starts a netcheck (STUN to the relay, its alternate address and the extra servers);
    /// the result arrives as [`NodeEvent::NetcheckDone`].
    pub fn netcheck(&mut self, now: Instant) {
        let servers = Self::stun_servers(&self.cfg, self.session.stun_alternate);
        self.discovery.start(now, &servers, &mut self.rng);
        self.netcheck_wanted = true;
    }

    // ------------------------------------------------------------------ internals

    fn apply_session(&mut self, actions: Vec<SessionAction>, udp: Vec<Vec<u8>>) {
        for contents in udp {
            self.transmits.push_back(Transmit {
                source: None,
                destination: self.session.udp_addr(),
                contents,
                segment_size: None,
            });
        }
        for a in actions {
            match a {
                SessionAction::Connect(addr) => {
                    self.events.push_back(NodeEvent::ConnectRelayTcp(addr))
                }
                SessionAction::Close => {
                    self.pending_challenge = None;
                    self.events.push_back(NodeEvent::CloseRelayTcp)
                }
                SessionAction::Lost => {
                    self.advertised = None;
                    self.events.push_back(NodeEvent::RelayLost);
                    // Relay channels die with the session; direct paths live on. The
                    // initiator re-requests introductions after re-registering.
                    for h in self.peers.handles() {
                        self.peers.clear_channel(h);
                        if let Some(p) = self.peers.get_mut(h) {
                            p.pending_request = None;
                        }
                    }
                }
            }
        }
    }

    fn candidates(&self) -> Vec<Candidate> {
        let mut v: Vec<Candidate> = Vec::new();
        if let Some(r) = self.reflexive {
            v.push(Candidate {
                addr: r,
                kind: CandidateKind::ServerReflexive,
            });
        }
        if let PortMapStatus::Mapped(m) = &self.port_mapping
            && crate::portmap::is_announceable(m.external)
            && !v.iter().any(|c| c.addr == m.external)
        {
            v.push(Candidate {
                addr: m.external,
                kind: CandidateKind::PortMapped,
            });
        }
        for a in &self.cfg.local_addrs {
            if !a.ip().is_unspecified() && !v.iter().any(|c| c.addr == *a) {
                v.push(Candidate {
                    addr: *a,
                    kind: CandidateKind::Host,
                });
            }
        }
        v.truncate(control::MAX_CANDIDATES);
        v
    }

    fn set_reflexive(&mut self, now: Instant, addr: SocketAddr) {
        if self.reflexive != Some(addr) {
            debug!(%addr, "reflexive address");
            self.reflexive = Some(addr);
        }
        self.send_register();
        self.maybe_update_candidates(now);
    }

    fn maybe_update_candidates(&mut self, _now: Instant) {
        if !self.session.is_registered() {
            return;
        }
        let now_adv = (self.candidates(), self.nat);
        if self.advertised.as_ref() != Some(&now_adv) {
            self.session.send_control(&ClientMsg::UpdateCandidates {
                candidates: now_adv.0.clone(),
                nat: now_adv.1,
            });
            self.advertised = Some(now_adv);
        }
    }

    fn check_discovery(&mut self, now: Instant) {
        if let Some(m) = self.discovery.relay_mapped()
            && self.reflexive.is_none()
        {
            self.set_reflexive(now, m);
        }
        if !self.discovery.relay_pending() {
            // Answered or failed: nothing left to wait for.
            self.send_register();
        }
        if let Some(report) = self.discovery.take_report(&self.cfg.local_addrs) {
            let nat_changed = self.nat != report.nat;
            self.nat = report.nat;
            if nat_changed {
                // Introductions that arrived before we knew our NAT may now call for a
                // hard-NAT attempt (the peer re-plans when our update reaches it).
                for h in self.peers.handles() {
                    self.plan_spray(now, h, false);
                }
            }
            if let Some(p) = report.public_addr {
                self.reflexive = Some(p);
            }
            self.maybe_update_candidates(now);
            if self.netcheck_wanted {
                self.netcheck_wanted = false;
                self.events.push_back(NodeEvent::NetcheckDone(report));
            }
        }
    }

    fn on_server_msg(&mut self, now: Instant, msg: ServerMsg) {
        match msg {
            ServerMsg::Challenge { nonce, .. } => {
                if self.session.on_challenge(now) {
                    self.pending_challenge = Some(nonce);
                    if self.reflexive.is_some() || !self.discovery.relay_pending() {
                        self.send_register();
                    } else {
                        self.timers[Timer::RegisterDeadline as usize] = Some(now + REGISTER_WAIT);
                    }
                }
            }
            ServerMsg::Registered {
                udp_token,
                observed_tcp,
                keepalive_secs,
                stun_alternate,
            } => {
                let mut udp = Vec::new();
                if self.session.on_registered(
                    now,
                    udp_token,
                    keepalive_secs,
                    stun_alternate,
                    &mut udp,
                ) {
                    self.apply_session(Vec::new(), udp);
                    self.events
                        .push_back(NodeEvent::Registered { observed_tcp });
                    self.relay_epoch += 1;
                    self.maybe_update_candidates(now);
                    // Re-request introductions for peers we want (after a relay restart).
                    for h in self.peers.handles() {
                        if self.peers.get(h).is_some_and(|p| p.wanted) {
                            self.send_connect(h);
                        }
                    }
                }
            }
            ServerMsg::Introduce(intro) => self.on_introduce(now, intro),
            ServerMsg::ConnectFailed {
                peer,
                request_id,
                reason,
                message,
            } => {
                if let Some(h) = self.peers.by_id(&peer)
                    && let Some(p) = self.peers.get_mut(h)
                    && p.pending_request == Some(request_id)
                {
                    p.pending_request = None;
                    if reason == ConnectFailure::UnknownPeer && p.wanted && p.intro.is_some() {
                        // We knew this peer: after a relay restart it may simply not have
                        // re-registered yet. Ask again with backoff (1 s doubling to 30 s)
                        // rather than give up on a pair the application still wants.
                        let wait = p.reconnect_backoff.map_or(Duration::from_secs(1), |d| {
                            (d * 2).min(Duration::from_secs(30))
                        });
                        p.reconnect_backoff = Some(wait);
                        p.reconnect_at = Some(now + wait);
                        debug!(peer = %peer.short(), ?wait, "peer not at the relay yet; asking again later");
                    }
                    self.events.push_back(NodeEvent::ConnectFailed {
                        peer,
                        reason,
                        message,
                    });
                }
            }
            ServerMsg::PeerGone { peer, channel } => {
                if let Some(h) = self.peers.by_channel(channel)
                    && self.peers.get(h).is_some_and(|p| p.id == peer)
                {
                    self.peers.clear_channel(h);
                    if let Some(p) = self.peers.get_mut(h)
                        && p.punch.direct().is_none()
                    {
                        p.punch.stop();
                    }
                    self.flush_socket_ops(h);
                    self.events.push_back(NodeEvent::PeerGone { peer });
                }
            }
            ServerMsg::Pong { .. } => {}
            ServerMsg::Error { code, message } => {
                debug!(?code, %message, "relay error");
                self.events
                    .push_back(NodeEvent::RelayError { code, message });
            }
            ServerMsg::PeerCandidates {
                peer,
                channel,
                candidates,
                nat,
            } => {
                let fam = self.families();
                if let Some(h) = self.peers.by_channel(channel)
                    && let Some(p) = self.peers.get_mut(h)
                    && p.id == peer
                {
                    // Keep them even while a direct path works: when it dies (the peer
                    // roamed), the next attempt must aim at the new addresses.
                    p.punch.start(now, &candidates, nat, fam);
                    let nat_changed = p.peer_nat != nat;
                    p.peer_nat = nat;
                    p.peer_candidates = candidates;
                    if nat_changed {
                        // E.g. the peer finished its netcheck after the introduction:
                        // a hard-NAT attempt may now apply.
                        self.plan_spray(now, h, false);
                    }
                }
            }
        }
    }

    fn send_register(&mut self) {
        let Some(nonce) = self.pending_challenge.take() else {
            return;
        };
        self.timers[Timer::RegisterDeadline as usize] = None;
        let candidates = self.candidates();
        let reg = Register {
            peer_id: self.peer_id(),
            signature: self
                .cfg
                .identity
                .sign(&control::register_signed_bytes(&nonce)),
            token: self.cfg.token.clone(),
            candidates: candidates.clone(),
            nat: self.nat,
            agent: self.cfg.agent.clone(),
        };
        self.session.send_control(&ClientMsg::Register(reg));
        self.advertised = Some((candidates, self.nat));
    }

    fn on_introduce(&mut self, now: Instant, intro: control::Introduction) {
        let peer = intro.peer;
        let fam = self.families();
        let h = self.peers.get_or_insert(peer, || new_peer(peer));
        // A fresh nonce within the same relay session is a new session of the peer (it
        // restarted or reconnected): its old direct path is stale, and keeping it would send
        // everything into a dead socket until the path timeout. Forget it and punch again.
        // A re-introduction after *our* relay session was re-established (relay restart) is
        // not: the direct path kept working through the outage and stays.
        let epoch = self.relay_epoch;
        let old_direct = self
            .peers
            .get(h)
            .filter(|p| p.intro_epoch == epoch)
            .filter(|p| p.intro.is_some_and(|k| k.nonce != intro.punch_nonce))
            .and_then(|p| p.punch.direct().map(|d| d.remote));
        if let Some(p) = self.peers.get_mut(h) {
            p.intro_epoch = epoch;
        }
        if old_direct.is_some()
            && let Some(p) = self.peers.get_mut(h)
        {
            p.punch.forget_direct();
        }
        let keys = IntroKeys {
            channel: intro.channel,
            nonce: intro.punch_nonce,
            tag: punch_wire::tag(&intro.punch_nonce),
            role: intro.role,
        };
        self.peers.set_intro(h, keys);
        if let Some(p) = self.peers.get_mut(h) {
            if intro.request_id.is_some() && p.pending_request == intro.request_id {
                p.pending_request = None;
            }
            p.reconnect_at = None;
            p.reconnect_backoff = None;
            let candidates: &[_] = if self.cfg.relay_only {
                &[]
            } else {
                &intro.candidates
            };
            p.punch.start(now, candidates, intro.nat, fam);
            p.peer_nat = intro.nat;
            p.peer_candidates = intro.candidates.clone();
        }
        self.plan_spray(now, h, true);
        debug!(peer = %peer.short(), role = ?intro.role, candidates = ?intro.candidates, "introduced");
        self.events.push_back(NodeEvent::Introduced {
            peer,
            role: intro.role,
        });
        if old_direct.is_some() {
            self.peers.set_direct(h, old_direct, None);
            if let Some(path) = self.path_of(now, h) {
                self.events.push_back(NodeEvent::PathChanged { peer, path });
            }
        }
        // Packets that overtook this introduction.
        let (early, later): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.early_relayed)
            .into_iter()
            .filter(|(t, _, _)| now.saturating_duration_since(*t) < EARLY_RELAYED_TTL)
            .partition(|(_, ch, _)| *ch == intro.channel);
        self.early_relayed = later;
        for (_, ch, bytes) in early {
            self.on_relayed(now, ch, &bytes);
        }
        // Start probing right away (both sides get the introduction at the same moment).
        self.peer_timeout(now, h);
    }

    /// Copies a received QUIC datagram into the receive arena and splits it off as its own
    /// unique view. Profile (data_plane bench, receiver side): a `Vec` per datagram cost a
    /// malloc, and quinn's first `split_to` of it a second one (promoting the buffer to a
    /// shared one), plus both frees: ~10 % of the receiving node's CPU. From an arena that
    /// is already shared, splitting is a reference-count increment.
    fn rx_copy(&mut self, packet: &[u8]) -> BytesMut {
        if self.rx_arena.capacity() < packet.len() {
            self.rx_arena = BytesMut::with_capacity(RX_ARENA.max(packet.len()));
        }
        self.rx_arena.extend_from_slice(packet);
        self.rx_arena.split()
    }

    fn on_relayed(&mut self, now: Instant, ch: ChannelId, payload: &[u8]) {
        let Some(h) = self.peers.by_channel(ch) else {
            // The relay sends the introduction over TCP and the peer's first packet over
            // UDP at once; the packet may win. Keep a few for a moment instead of dropping
            // the peer's first ping or QUIC Initial.
            self.early_relayed
                .retain(|(t, _, _)| now.saturating_duration_since(*t) < EARLY_RELAYED_TTL);
            if self.early_relayed.len() < EARLY_RELAYED_MAX {
                self.early_relayed.push_back((now, ch, payload.to_vec()));
            } else {
                trace!(?ch, "relayed data on an unknown channel");
            }
            return;
        };
        match classify(payload) {
            PacketClass::Punch => self.on_punch(now, Via::Relay, payload),
            PacketClass::Quic => {
                if let Some(p) = self.peers.get(h) {
                    let peer = p.id;
                    let bytes = self.rx_copy(payload);
                    self.events.push_back(NodeEvent::Datagram { peer, bytes });
                }
            }
            _ => trace!("relayed payload of an unknown kind"),
        }
    }

    fn on_punch(&mut self, now: Instant, via: Via, packet: &[u8]) {
        let Ok(tag) = punch_wire::peek_tag(packet) else {
            trace!("malformed punch packet");
            return;
        };
        let Some(h) = self.peers.by_tag(tag) else {
            trace!("punch packet for no introduction");
            return;
        };
        let fam = self.families();
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        let Some(keys) = p.intro else { return };
        let pkt = match punch_wire::decode(&keys.nonce, packet) {
            Ok(pkt) => pkt,
            Err(e) => {
                trace!(%e, "punch packet does not authenticate");
                return;
            }
        };
        if pkt.from_responder == (keys.role == Role::Responder) {
            trace!("punch packet with our own role (reflected)");
            return;
        }
        let peer_id = p.id;
        if let Via::Direct { from, .. } = via {
            p.punch.note_received(now, from, &self.cfg.punch);
            self.peers.validate_addr(h, from);
        }
        let Some(p) = self.peers.get_mut(h) else {
            return;
        };
        match (pkt.kind, via) {
            (PunchType::Probe, Via::Direct { local, from }) => {
                let mut out = Vec::new();
                p.punch.on_probe(
                    now,
                    &keys,
                    local,
                    from,
                    pkt.txid,
                    &mut self.rng,
                    fam,
                    &mut out,
                );
                self.transmits.extend(out);
            }
            (PunchType::Ack, Via::Direct { local, from }) => {
                let old = p.punch.direct().map(|d| d.remote);
                if let Some(u) = p.punch.on_ack(now, local, from, pkt.txid, &self.cfg.punch) {
                    self.apply_path_update(now, h, old, u);
                }
            }
            (PunchType::Ping, via) => {
                // Pings are rare (the application's `burrow ping`): cheap to log.
                debug!(peer = %peer_id.short(), relayed = matches!(via, Via::Relay), "ping received");
                if let Via::Direct { local, from } = via {
                    let old = p.punch.direct().map(|d| d.remote);
                    let update = p.punch.on_peer_ping(now, local, from);
                    self.peers.pin_addr(h, from);
                    if let Some(u) = update {
                        self.apply_path_update(now, h, old, u);
                    }
                }
                let reply = punch::encode_packet(
                    &keys,
                    PunchType::Pong,
                    pkt.txid,
                    match via {
                        Via::Direct { from, .. } => Some(from),
                        Via::Relay => None,
                    },
                );
                match via {
                    Via::Direct { local, from } => self.transmits.push_back(Transmit {
                        source: local,
                        destination: from,
                        contents: reply,
                        segment_size: None,
                    }),
                    Via::Relay => {
                        self.send_relayed(now, keys.channel, &reply);
                    }
                }
            }
            (PunchType::Pong, _) => {
                if let Some(ping) = self.app_pings.remove(&pkt.txid) {
                    if ping.peer == peer_id {
                        self.events.push_back(NodeEvent::Pong {
                            peer: peer_id,
                            seq: ping.seq,
                            path: ping.path,
                            rtt: now.saturating_duration_since(ping.sent),
                        });
                    }
                } else if p.punch.owns(pkt.txid) {
                    p.punch.on_pong(now, pkt.txid);
                    self.send_spray_relayed(now, h);
                    self.peer_timeout(now, h);
                } else {
                    trace!("pong for no ping");
                }
            }
            (PunchType::Ready, Via::Relay) => {
                p.punch.on_ready(now, pkt.txid);
                self.peer_timeout(now, h);
            }
            (kind, via) => trace!(?kind, ?via, "punch packet on the wrong path ignored"),
        }
        self.flush_socket_ops(h);
    }

    fn send_relayed(&mut self, now: Instant, ch: ChannelId, payload: &[u8]) {
        if self.session.udp_works(now) {
            let mut contents = Vec::new();
            relay_data::encode(ch, payload, &mut contents);
            self.transmits.push_back(Transmit {
                source: None,
                destination: self.session.udp_addr(),
                contents,
                segment_size: None,
            });
        } else {
            self.session.send_data_tcp(ch, payload);
        }
    }

    fn apply_path_update(
        &mut self,
        now: Instant,
        h: PeerHandle,
        old: Option<SocketAddr>,
        u: PathUpdate,
    ) {
        let new = self
            .peers
            .get(h)
            .and_then(|p| p.punch.direct().map(|d| d.remote));
        self.peers.set_direct(h, old, new);
        let Some(peer) = self.peers.get(h).map(|p| p.id) else {
            return;
        };
        let path = match u {
            PathUpdate::Direct(_) if !self.direct_allowed => None,
            PathUpdate::Direct(a) => Some(PathKind::Direct(a)),
            PathUpdate::Lost => self.path_of(now, h),
            PathUpdate::RetryDue => {
                self.retry_punch(now, h);
                None
            }
        };
        if let Some(path) = path {
            self.events.push_back(NodeEvent::PathChanged { peer, path });
        }
    }
}

impl NodeCore {
    /// A punching backoff ran out. With a relay, the initiator asks for a fresh
    /// introduction (both sides then start at the same moment) and the responder waits for
    /// it; without one, both restart locally.
    fn retry_punch(&mut self, now: Instant, h: PeerHandle) {
        let Some(p) = self.peers.get(h) else { return };
        let role = p.intro.map(|k| k.role);
        let via_relay = self.session.is_registered() && p.channel_live;
        match (via_relay, role) {
            (true, Some(Role::Initiator)) => {
                debug!(peer = %p.id.short(), "punch retry: asking for a fresh introduction");
                self.send_connect(h);
            }
            (true, _) => {}
            (false, _) => {
                if let Some(p) = self.peers.get_mut(h) {
                    p.punch.restart(now);
                }
            }
        }
    }
}

fn new_peer(id: PeerId) -> Peer {
    Peer {
        id,
        wanted: false,
        pending_request: None,
        intro: None,
        channel_live: false,
        punch: PunchState::default(),
        validated: Vec::new(),
        pinned: None,
        intro_epoch: 0,
        reconnect_at: None,
        reconnect_backoff: None,
        peer_nat: NatReport::default(),
        peer_candidates: Vec::new(),
    }
}

#[cfg(test)]
mod rx_arena_tests {
    use super::*;

    /// Datagrams copied into the receive arena keep their own bytes across arena refills,
    /// and each is a unique view (quinn decrypts in place: `try_into_mut`-style uniqueness).
    #[test]
    fn received_datagrams_are_intact_unique_views_across_arenas() {
        let identity = Identity::generate();
        let mut core = NodeCore::new(
            NodeConfig::new(identity, "127.0.0.1:3478".parse().unwrap()),
            Instant::now(),
        );
        let mut views = Vec::new();
        // Sizes that do not divide the arena, plus one larger than a whole arena.
        let sizes = [1200usize, 1452, 37, RX_ARENA + 100, 1200, 1];
        for i in 0..200usize {
            let len = sizes[i % sizes.len()];
            let packet: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            views.push((packet.clone(), core.rx_copy(&packet)));
        }
        // Views must not overlap: flip every view's first byte, then each must show exactly
        // its own bytes with only that byte flipped.
        for (_, got) in views.iter_mut() {
            if let Some(b) = got.first_mut() {
                *b ^= 0xFF;
            }
        }
        for (i, (mut want, got)) in views.into_iter().enumerate() {
            if let Some(b) = want.first_mut() {
                *b ^= 0xFF;
            }
            assert_eq!(&got[..], &want[..], "datagram {i} changed");
        }
    }
}
