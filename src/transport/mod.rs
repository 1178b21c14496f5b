//! QUIC data plane on quinn-proto: one connection per peer over a stable virtual address.
//!
//! [`Transport`] is a sans-IO state machine wrapping one `quinn_proto::Endpoint` that serves
//! every peer. It never sees a real network address: the node core hands it opaque QUIC
//! datagrams tagged with the [`PeerId`] they came from, and carries the datagrams it emits to
//! that peer over whichever real path (relay or direct) is current. Inside, each peer gets a
//! stable **virtual address** (an IPv6 unique-local address from a per-peer counter, never
//! sent on the wire), so quinn-proto sees one unchanging 4-tuple per peer and a relay →
//! direct → relay switch is invisible to it: no migration, no path validation, no reset.
//!
//! # Drain order
//!
//! After any input (`handle_datagram`, `handle_timeout`, a user command such as
//! [`Transport::write`]):
//!
//! 1. [`Transport::poll_transmit`] until `None`, sending each datagram to its peer;
//! 2. [`Transport::poll_event`] until `None`;
//! 3. [`Transport::poll_timeout`], and call [`Transport::handle_timeout`] when it passes.
//!
//! Events are also produced while transmitting (e.g. a stream becomes writable once an ACK
//! frees window), so loop 1–2 until both are empty.
//!
//! # Gluing to the node
//!
//! ```ignore
//! // node event -> transport
//! NodeEvent::Datagram { peer, bytes } => transport.handle_datagram(now, peer, &bytes),
//! // transport -> node (any path; a GSO batch is split for the relay)
//! while let Some(t) = transport.poll_transmit(now) {
//!     for d in t.datagrams() {
//!         let _ = node.send_datagram(now, &t.peer, d); // no path yet: QUIC retransmits
//!     }
//! }
//! ```
//!
//! The node's initiator (`Role`) calls [`Transport::connect`]; the other side just receives.
//! `src/transport/sim_tests.rs` runs exactly this loop in the simulator.
//!
//! # Packet sizes
//!
//! Every QUIC datagram must still fit a 1280–1500 byte path after the node adds the 8-byte
//! relay header. Initial and minimum MTU are 1200 (RFC 9000 section 14: "a client MUST expand
//! the payload of all UDP datagrams carrying Initial packets to at least 1200 bytes"; 1200 +
//! 8 + 48 bytes of IPv6/UDP headers fits IPv6's minimum MTU of 1280). DPLPMTUD (RFC 8899) then
//! probes up to [`MAX_UDP_PAYLOAD`] = 1500 − 40 (IPv6) − 8 (UDP) − 8 (relay header).
//!
//! # Randomness
//!
//! quinn-proto's connection IDs, reset key and token key derive from
//! [`TransportConfig::rng_seed`]. TLS key shares and randoms come from ring's system RNG:
//! handshake secrets must never be reproducible, so that is the one deliberate exception to
//! "no OS RNG in cores".
//!
//! # Security
//!
//! See [`tls`]: both sides present self-signed Ed25519 certificates; a client refuses any
//! server that is not the [`PeerId`] it dialled, and a server checks that the authenticated
//! client is the peer whose datagrams carried the handshake.

pub mod tls;

#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{DatagramEvent, MtuDiscoveryConfig, StreamEvent, VarInt};
use rustls::pki_types::CertificateDer;

pub use quinn_proto::{ConnectionError, ConnectionStats, Dir, Side, StreamId};

use crate::identity::Identity;
use crate::wire::{self, PacketClass, PeerId};
use tls::{CertError, LocalCert, VerdictSlot};

/// Largest UDP payload quinn-proto may use: 1500 − 40 (IPv6) − 8 (UDP) − 8 (relay header).
pub const MAX_UDP_PAYLOAD: u16 = 1500 - 40 - 8 - 8;

/// Initial and minimum QUIC datagram size (RFC 9000 section 14.1).
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// Application close code: normal close by the user.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code: the authenticated key is not the peer the datagrams came from.
pub const CLOSE_WRONG_PEER: u32 = 1;

/// Tunables of the transport. `Default` is tuned for bulk throughput on one core.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Seed for connection IDs, the stateless-reset key and the token key. The driver MUST
    /// fill it from the OS random source (tests use fixed seeds): anyone who knows it can
    /// forge stateless resets (RFC 9000 section 10.3) and kill our connections.
    pub rng_seed: [u8; 32],
    /// Most datagrams one [`Transmit`] may carry as equal-size segments (for a GSO send).
    /// 1 means every transmit is exactly one datagram.
    pub max_segments: usize,
    /// Per-stream receive window in bytes. Must cover bandwidth × RTT of one stream.
    pub stream_receive_window: u32,
    /// Connection-wide receive window in bytes (all streams together).
    pub receive_window: u32,
    /// Bytes we buffer unacknowledged across all streams of a connection.
    pub send_window: u64,
    /// PING interval so an idle connection keeps its state (and the relay or NAT binding
    /// under it) alive. Must be well below `idle_timeout`.
    pub keep_alive_interval: Duration,
    /// A connection with no packet from the peer for this long is lost (RFC 9000 10.1).
    pub idle_timeout: Duration,
    /// Incoming bidirectional streams the peer may have open at once.
    pub max_bidi_streams: u32,
    /// Incoming unidirectional streams the peer may have open at once.
    pub max_uni_streams: u32,
    /// Bytes of received QUIC datagrams (RFC 9221) buffered before old ones are dropped.
    pub datagram_receive_buffer: usize,
    /// Congestion controller.
    pub congestion: Congestion,
}

/// Which congestion controller a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: backs off on every loss, so random loss that is
    /// not congestion (Wi-Fi, a lossy uplink) caps throughput near MSS/RTT·1.22/√p (about
    /// 0.3 MB/s at 10 % loss and 10 ms RTT in the NAT lab).
    #[default]
    Cubic,
    /// quinn-proto's BBR (v1, marked experimental by quinn): paces to the measured
    /// bandwidth and ignores random loss — 15–20× CUBIC's throughput at 10 % loss in the NAT
    /// lab — but is less fair to competing flows and less proven. Opt-in.
    Bbr,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            rng_seed: [0; 32],
            max_segments: 1,
            // 8 MiB per stream and 16 MiB per connection: enough for ~1 GB/s at 8-16 ms RTT.
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
            keep_alive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_bidi_streams: 256,
            max_uni_streams: 256,
            datagram_receive_buffer: 1 << 20,
            congestion: Congestion::Cubic,
        }
    }
}

/// Why the transport could not be set up or a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Our certificate could not be built.
    #[error("certificate: {0}")]
    Certificate(#[from] CertError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn-proto refused the configuration (e.g. the ring provider lacking QUIC's initial
    /// cipher suite; never expected).
    #[error("QUIC configuration: {0}")]
    Config(String),
    /// quinn-proto refused to start the connection.
    #[error("connect: {0}")]
    Connect(#[from] quinn_proto::ConnectError),
    /// The handle does not name a live connection (closed, drained, or from another slot).
    #[error("no such connection")]
    UnknownConnection,
    /// The stream is not open in that direction (never opened, or already finished/reset).
    #[error("stream closed")]
    ClosedStream,
    /// The peer asked us to stop sending on this stream (RFC 9000 STOP_SENDING).
    #[error("stream stopped by peer with code {0}")]
    Stopped(u64),
    /// The peer abandoned the stream (RFC 9000 RESET_STREAM).
    #[error("stream reset by peer with code {0}")]
    Reset(u64),
    /// Sending a QUIC datagram failed (peer does not support them, or too large).
    #[error("datagram: {0}")]
    Datagram(#[from] quinn_proto::SendDatagramError),
}

/// Why a connection ended.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LostReason {
    /// We refused the peer's certificate, or the authenticated key was not the peer expected.
    #[error("{0}")]
    Refused(CertError),
    /// quinn-proto reported the connection lost (timeout, peer close, protocol error...).
    #[error("{0}")]
    Quic(ConnectionError),
    /// We closed it ([`Transport::close`]).
    #[error("closed locally")]
    LocallyClosed,
}

/// A connection, valid until its [`Event::ConnectionLost`]. Carries a generation so a stale
/// handle can never reach a connection that later reused the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionHandle {
    index: usize,
    generation: u64,
}

/// What happened, for the layer above.
#[derive(Debug, Clone)]
pub enum Event {
    /// Handshake complete and the peer authenticated as `peer`. The layer above applies its
    /// allow list here (and [`Transport::close`]s refused peers). On the client side the
    /// server checks our certificate only after this point (TLS 1.3 client Finished), so a
    /// refusal there shows up as a [`Event::ConnectionLost`] right after.
    Connected {
        /// The connection.
        conn: ConnectionHandle,
        /// The authenticated peer.
        peer: PeerId,
        /// `Client` if we dialled, `Server` if the peer did.
        side: Side,
    },
    /// The connection is gone; the handle is dead. Emitted exactly once per connection.
    ConnectionLost {
        /// The connection.
        conn: ConnectionHandle,
        /// The peer it was with (authenticated or not).
        peer: PeerId,
        /// Why.
        reason: LostReason,
    },
    /// The peer opened streams in `dir`: call [`Transport::accept_stream`] until `None`.
    StreamOpened {
        /// The connection.
        conn: ConnectionHandle,
        /// Direction of the new streams.
        dir: Dir,
    },
    /// New data (or EOF, or a reset) is ready on the stream: call [`Transport::read`].
    StreamReadable {
        /// The connection.
        conn: ConnectionHandle,
        /// The stream.
        stream: StreamId,
    },
    /// A stream that returned `Ok(0)` from [`Transport::write`] has room again.
    StreamWritable {
        /// The connection.
        conn: ConnectionHandle,
        /// The stream.
        stream: StreamId,
    },
    /// Everything we wrote and finished on this stream was acknowledged by the peer.
    StreamFinished {
        /// The connection.
        conn: ConnectionHandle,
        /// The stream.
        stream: StreamId,
    },
    /// The peer sent STOP_SENDING: stop writing this stream.
    StreamStopped {
        /// The connection.
        conn: ConnectionHandle,
        /// The stream.
        stream: StreamId,
        /// The peer's application error code.
        code: u64,
    },
    /// The stream limit in `dir` was raised: [`Transport::open_stream`] may succeed again.
    StreamsAvailable {
        /// The connection.
        conn: ConnectionHandle,
        /// Direction.
        dir: Dir,
    },
    /// An unreliable QUIC datagram (RFC 9221) arrived.
    DatagramReceived {
        /// The connection.
        conn: ConnectionHandle,
        /// The payload.
        data: Bytes,
    },
}

/// One datagram (or a GSO batch of equal-size datagrams) for the node to carry to `peer`.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// The peer it is for; the node picks the real path.
    pub peer: PeerId,
    /// `Some(n)` when `contents` holds several datagrams of `n` bytes each (the last may be
    /// shorter), ready for one GSO send on a direct path. A relayed path must send them one by
    /// one: iterate [`Transmit::datagrams`]. `None` when `contents` is one datagram. Only
    /// produced when [`TransportConfig::max_segments`] > 1.
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

/// What [`Transport::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRead {
    /// This many bytes were copied into the buffer.
    Data(usize),
    /// Nothing available now; wait for [`Event::StreamReadable`].
    Blocked,
    /// The peer finished the stream and everything was read (EOF).
    Finished,
}

/// What [`Transport::read_chunk`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamChunk {
    /// The next bytes of the stream.
    Data(Bytes),
    /// Nothing available now; wait for [`Event::StreamReadable`].
    Blocked,
    /// The peer finished the stream and everything was read (EOF).
    Finished,
}

/// One connection and what the transport knows about it.
struct Conn {
    quinn: quinn_proto::Connection,
    generation: u64,
    /// The peer whose virtual address carries this connection.
    peer: PeerId,
    /// The client verifier's refusal, if it refused.
    verdict: VerdictSlot,
    /// Whether `ConnectionLost` was emitted (it must be, exactly once).
    lost_reported: bool,
    /// Streams whose EOF was seen inside a read that also returned data; the next read
    /// reports `Finished` (quinn-proto frees the stream once EOF is read).
    eof_pending: HashSet<StreamId>,
}

/// The QUIC data plane: one endpoint, one connection per peer (usually), all sans-IO.
pub struct Transport {
    endpoint: quinn_proto::Endpoint,
    local: LocalCert,
    transport_config: Arc<quinn_proto::TransportConfig>,
    max_segments: usize,
    /// Keyed by quinn's connection index (ours, never a peer's choice): FxHash, since every
    /// packet, transmit and chunk read looks it up and SipHash showed in the profile.
    conns: rustc_hash::FxHashMap<usize, Conn>,
    next_generation: u64,
    /// Keys of `conns` in transmit round-robin order.
    order: Vec<usize>,
    cursor: usize,
    peer_addrs: HashMap<PeerId, SocketAddr>,
    addr_peers: HashMap<SocketAddr, PeerId>,
    next_virtual: u64,
    events: VecDeque<Event>,
    /// Endpoint-level responses (stateless reset, version negotiation, refused handshakes).
    responses: VecDeque<Transmit>,
    /// The latest `now` passed in, for work done while draining events.
    last_now: Option<Instant>,
}

/// The /64 of virtual addresses: ULA (RFC 4193) `fd62:7572:726f:7700::/64` ("burrow").
const VIRTUAL_PREFIX: [u16; 4] = [0xfd62, 0x7572, 0x726f, 0x7700];

fn derive_key(context: &str, seed: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(context, seed)
}

impl Transport {
    /// A transport speaking as `identity`.
    pub fn new(identity: &Identity, config: TransportConfig) -> Result<Self, TransportError> {
        let local = LocalCert::new(identity)?;

        let mut tc = quinn_proto::TransportConfig::default();
        tc.stream_receive_window(VarInt::from_u32(config.stream_receive_window))
            .receive_window(VarInt::from_u32(config.receive_window))
            .send_window(config.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(config.max_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(config.max_uni_streams))
            .keep_alive_interval(Some(config.keep_alive_interval))
            .max_idle_timeout(Some(
                config
                    .idle_timeout
                    .try_into()
                    .unwrap_or(quinn_proto::IdleTimeout::from(VarInt::from_u32(30_000))),
            ))
            .initial_mtu(MIN_UDP_PAYLOAD)
            .min_mtu(MIN_UDP_PAYLOAD)
            .datagram_receive_buffer_size(Some(config.datagram_receive_buffer))
            .datagram_send_buffer_size(config.datagram_receive_buffer)
            .enable_segmentation_offload(config.max_segments > 1);
        match config.congestion {
            Congestion::Cubic => {
                tc.congestion_controller_factory(Arc::new(
                    quinn_proto::congestion::CubicConfig::default(),
                ));
            }
            Congestion::Bbr => {
                tc.congestion_controller_factory(Arc::new(
                    quinn_proto::congestion::BbrConfig::default(),
                ));
            }
        }
        let mut mtud = MtuDiscoveryConfig::default();
        mtud.upper_bound(MAX_UDP_PAYLOAD);
        tc.mtu_discovery_config(Some(mtud));
        let transport_config = Arc::new(tc);

        let mut endpoint_config = quinn_proto::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &derive_key("burrow transport 2026 stateless reset", &config.rng_seed),
        )));
        endpoint_config
            // RFC 9287: greasing may clear the fixed bit; burrow demultiplexes on it
            // (RFC 9443 ranges, see `wire`), so it must stay set.
            .grease_quic_bit(false)
            .rng_seed(Some(derive_key(
                "burrow transport 2026 endpoint rng",
                &config.rng_seed,
            )));
        endpoint_config
            .max_udp_payload_size(MAX_UDP_PAYLOAD)
            .map_err(|e| TransportError::Config(e.to_string()))?;

        let server_tls = tls::server_config(&local)?;
        let server_crypto = QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&derive_key(
            "burrow transport 2026 token key",
            &config.rng_seed,
        ));
        let mut server_config =
            quinn_proto::ServerConfig::new(Arc::new(server_crypto), Arc::new(token_key));
        server_config
            .transport_config(transport_config.clone())
            // Virtual addresses never change; a datagram for this connection arriving from
            // another peer's virtual address is not a migration we want.
            .migration(false);

        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(endpoint_config),
            Some(Arc::new(server_config)),
            true,
            None,
        );
        Ok(Transport {
            endpoint,
            local,
            transport_config,
            max_segments: config.max_segments.max(1),
            conns: rustc_hash::FxHashMap::default(),
            next_generation: 0,
            order: Vec::new(),
            cursor: 0,
            peer_addrs: HashMap::new(),
            addr_peers: HashMap::new(),
            next_virtual: 1,
            events: VecDeque::new(),
            responses: VecDeque::new(),
            last_now: None,
        })
    }

    /// The stable virtual address quinn-proto uses for `peer` (allocated on first use).
    pub fn virtual_addr(&mut self, peer: PeerId) -> SocketAddr {
        if let Some(addr) = self.peer_addrs.get(&peer) {
            return *addr;
        }
        let n = self.next_virtual;
        self.next_virtual += 1;
        let [a, b, c, d] = VIRTUAL_PREFIX;
        let ip = Ipv6Addr::new(
            a,
            b,
            c,
            d,
            (n >> 48) as u16,
            (n >> 32) as u16,
            (n >> 16) as u16,
            n as u16,
        );
        let addr = SocketAddr::new(IpAddr::V6(ip), 1);
        self.peer_addrs.insert(peer, addr);
        self.addr_peers.insert(addr, peer);
        addr
    }

    /// Starts a connection to `peer`. The handshake succeeds only if the remote proves it
    /// holds `peer`'s key; [`Event::Connected`] or [`Event::ConnectionLost`] follows.
    pub fn connect(
        &mut self,
        now: Instant,
        peer: PeerId,
    ) -> Result<ConnectionHandle, TransportError> {
        let verdict: VerdictSlot = Arc::new(Mutex::new(None));
        let client_tls = tls::client_config(&self.local, peer, verdict.clone())?;
        self.connect_with_tls(now, peer, client_tls, verdict)
    }

    /// `connect` with a given rustls configuration (tests use it to play a non-burrow or
    /// misconfigured client).
    fn connect_with_tls(
        &mut self,
        now: Instant,
        peer: PeerId,
        client_tls: rustls::ClientConfig,
        verdict: VerdictSlot,
    ) -> Result<ConnectionHandle, TransportError> {
        self.last_now = Some(now);
        let addr = self.virtual_addr(peer);
        let client_crypto = QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut client_config = quinn_proto::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(self.transport_config.clone());
        let (ch, quinn) = match self
            .endpoint
            .connect(now, client_config, addr, tls::SERVER_NAME)
        {
            Ok(pair) => pair,
            Err(e) => {
                self.release_if_unused(peer);
                return Err(e.into());
            }
        };
        tracing::debug!(peer = %peer.short(), "connecting");
        Ok(self.insert(ch, quinn, peer, verdict))
    }

    fn insert(
        &mut self,
        ch: quinn_proto::ConnectionHandle,
        quinn: quinn_proto::Connection,
        peer: PeerId,
        verdict: VerdictSlot,
    ) -> ConnectionHandle {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.conns.insert(
            ch.0,
            Conn {
                quinn,
                generation,
                peer,
                verdict,
                lost_reported: false,
                eof_pending: HashSet::new(),
            },
        );
        self.order.push(ch.0);
        ConnectionHandle {
            index: ch.0,
            generation,
        }
    }

    fn handle_of(index: usize, conn: &Conn) -> ConnectionHandle {
        ConnectionHandle {
            index,
            generation: conn.generation,
        }
    }

    fn conn_mut(&mut self, handle: ConnectionHandle) -> Result<&mut Conn, TransportError> {
        match self.conns.get_mut(&handle.index) {
            Some(c) if c.generation == handle.generation => Ok(c),
            _ => Err(TransportError::UnknownConnection),
        }
    }

    fn conn(&self, handle: ConnectionHandle) -> Option<&Conn> {
        self.conns
            .get(&handle.index)
            .filter(|c| c.generation == handle.generation)
    }

    /// A QUIC datagram from `from` (as attributed by the node: relay session or direct path).
    /// Anything that is not QUIC, or not valid for any connection, is dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: PeerId, data: &[u8]) {
        self.handle_datagram_owned(now, from, BytesMut::from(data));
    }

    /// [`Transport::handle_datagram`] for a buffer the caller gives away (a `Vec<u8>` converts
    /// without a copy via `Bytes`): saves one allocation and copy per received datagram.
    pub fn handle_datagram_owned(&mut self, now: Instant, from: PeerId, data: BytesMut) {
        self.last_now = Some(now);
        if wire::classify(&data) != PacketClass::Quic {
            tracing::trace!(peer = %from.short(), len = data.len(), "dropping non-QUIC datagram");
            return;
        }
        let known = self.peer_addrs.contains_key(&from);
        let addr = self.virtual_addr(from);
        self.handle_quic(now, from, addr, data);
        if !known {
            // Garbage from a stream of unknown senders must not grow the address table.
            self.release_if_unused(from);
        }
    }

    fn handle_quic(&mut self, now: Instant, from: PeerId, addr: SocketAddr, data: BytesMut) {
        let mut buf = Vec::new();
        let Some(event) = self.endpoint.handle(now, addr, None, None, data, &mut buf) else {
            return;
        };
        match event {
            DatagramEvent::ConnectionEvent(ch, event) => {
                if let Some(conn) = self.conns.get_mut(&ch.0) {
                    conn.quinn.handle_event(event);
                    self.drive(ch.0);
                }
            }
            DatagramEvent::NewConnection(incoming) => {
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((ch, quinn)) => {
                        tracing::debug!(peer = %from.short(), "incoming connection");
                        self.insert(ch, quinn, from, Arc::new(Mutex::new(None)));
                        self.drive(ch.0);
                    }
                    Err(e) => {
                        tracing::debug!(peer = %from.short(), error = %e.cause, "incoming refused");
                        if let Some(t) = e.response {
                            self.push_response(t, buf);
                        }
                    }
                }
            }
            DatagramEvent::Response(t) => self.push_response(t, buf),
        }
    }

    /// Forgets `peer`'s virtual address when no connection uses it. A later connection gets
    /// a fresh address, which is fine: an address only has to be stable for the lifetime of
    /// the connections on it.
    fn release_if_unused(&mut self, peer: PeerId) {
        if self.conns.values().any(|c| c.peer == peer) {
            return;
        }
        if let Some(addr) = self.peer_addrs.remove(&peer) {
            self.addr_peers.remove(&addr);
        }
    }

    fn push_response(&mut self, t: quinn_proto::Transmit, mut buf: Vec<u8>) {
        let Some(peer) = self.addr_peers.get(&t.destination) else {
            return;
        };
        buf.truncate(t.size);
        self.responses.push_back(Transmit {
            peer: *peer,
            segment_size: t.segment_size,
            contents: buf,
        });
    }

    /// Runs timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = Some(now);
        let due: Vec<usize> = self
            .conns
            .iter_mut()
            .filter_map(|(k, c)| c.quinn.poll_timeout().filter(|t| *t <= now).map(|_| *k))
            .collect();
        for key in due {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.quinn.handle_timeout(now);
            }
            self.drive(key);
        }
    }

    /// When [`Transport::handle_timeout`] should next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.conns
            .values_mut()
            .filter_map(|c| c.quinn.poll_timeout())
            .min()
    }

    /// The next datagram to send, round-robin over connections.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.last_now = Some(now);
        if let Some(t) = self.responses.pop_front() {
            return Some(t);
        }
        for _ in 0..self.order.len() {
            if self.cursor >= self.order.len() {
                self.cursor = 0;
            }
            let Some(&key) = self.order.get(self.cursor) else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                self.cursor += 1;
                continue;
            };
            let mut buf = Vec::with_capacity(MAX_UDP_PAYLOAD as usize * self.max_segments);
            let transmit = conn.quinn.poll_transmit(now, self.max_segments, &mut buf);
            self.drive(key);
            match transmit {
                Some(t) => {
                    // Stay on this connection: a bulk sender emits bursts, and the next
                    // connection gets its turn once this one has nothing to send.
                    buf.truncate(t.size);
                    let Some(peer) = self.addr_peers.get(&t.destination) else {
                        continue;
                    };
                    return Some(Transmit {
                        peer: *peer,
                        segment_size: t.segment_size,
                        contents: buf,
                    });
                }
                None => self.cursor += 1,
            }
        }
        None
    }

    /// The next event for the layer above.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            // User commands (write, read, close) can queue quinn events too.
            let keys: Vec<usize> = self.conns.keys().copied().collect();
            for key in keys {
                self.drive(key);
            }
        }
        self.events.pop_front()
    }

    /// Moves endpoint events between the connection and the endpoint, translates the
    /// connection's events, and forgets the connection once it is drained.
    fn drive(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let ch = quinn_proto::ConnectionHandle(key);
        let handle = Self::handle_of(key, conn);
        while let Some(ev) = conn.quinn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ch, ev) {
                conn.quinn.handle_event(back);
            }
        }
        while let Some(ev) = conn.quinn.poll() {
            match ev {
                quinn_proto::Event::HandshakeDataReady => {}
                quinn_proto::Event::Connected => {
                    let presented = authenticated_peer(&conn.quinn);
                    match presented {
                        Some(presented) if presented == conn.peer => {
                            tracing::debug!(peer = %presented.short(), side = ?conn.quinn.side(), "connected");
                            self.events.push_back(Event::Connected {
                                conn: handle,
                                peer: presented,
                                side: conn.quinn.side(),
                            });
                        }
                        other => {
                            // The key that completed the handshake is not the peer whose
                            // datagrams carried it (a relay or path attributing traffic
                            // wrongly, or someone replaying another peer's handshake).
                            let reason = CertError::WrongPeer {
                                expected: conn.peer,
                                presented: other.unwrap_or(PeerId([0; 32])),
                            };
                            tracing::debug!(error = %reason, "closing: wrong peer");
                            if let Some(now) = self.last_now {
                                conn.quinn.close(
                                    now,
                                    VarInt::from_u32(CLOSE_WRONG_PEER),
                                    Bytes::from(reason.to_string()),
                                );
                            }
                            conn.lost_reported = true;
                            self.events.push_back(Event::ConnectionLost {
                                conn: handle,
                                peer: conn.peer,
                                reason: LostReason::Refused(reason),
                            });
                        }
                    }
                }
                quinn_proto::Event::ConnectionLost { reason } => {
                    if !conn.lost_reported {
                        conn.lost_reported = true;
                        let refused = conn.verdict.lock().ok().and_then(|mut v| v.take());
                        let reason = match refused {
                            Some(e) => LostReason::Refused(e),
                            None => LostReason::Quic(reason),
                        };
                        tracing::debug!(peer = %conn.peer.short(), %reason, "connection lost");
                        self.events.push_back(Event::ConnectionLost {
                            conn: handle,
                            peer: conn.peer,
                            reason,
                        });
                    }
                }
                quinn_proto::Event::Stream(s) => self.events.push_back(match s {
                    StreamEvent::Opened { dir } => Event::StreamOpened { conn: handle, dir },
                    StreamEvent::Readable { id } => Event::StreamReadable {
                        conn: handle,
                        stream: id,
                    },
                    StreamEvent::Writable { id } => Event::StreamWritable {
                        conn: handle,
                        stream: id,
                    },
                    StreamEvent::Finished { id } => Event::StreamFinished {
                        conn: handle,
                        stream: id,
                    },
                    StreamEvent::Stopped { id, error_code } => Event::StreamStopped {
                        conn: handle,
                        stream: id,
                        code: error_code.into_inner(),
                    },
                    StreamEvent::Available { dir } => Event::StreamsAvailable { conn: handle, dir },
                }),
                quinn_proto::Event::DatagramReceived => {
                    while let Some(data) = conn.quinn.datagrams().recv() {
                        self.events
                            .push_back(Event::DatagramReceived { conn: handle, data });
                    }
                }
                quinn_proto::Event::DatagramsUnblocked => {}
            }
        }
        if conn.quinn.is_drained() {
            if !conn.lost_reported {
                let refused = conn.verdict.lock().ok().and_then(|mut v| v.take());
                self.events.push_back(Event::ConnectionLost {
                    conn: handle,
                    peer: conn.peer,
                    reason: refused.map_or(LostReason::LocallyClosed, LostReason::Refused),
                });
            }
            let peer = conn.peer;
            self.conns.remove(&key);
            self.order.retain(|k| *k != key);
            self.release_if_unused(peer);
        }
    }

    /// The peer a connection is with (authenticated once [`Event::Connected`] was emitted).
    pub fn peer(&self, conn: ConnectionHandle) -> Option<PeerId> {
        self.conn(conn).map(|c| c.peer)
    }

    /// quinn-proto's statistics (RTT, congestion window, bytes, lost packets, path MTU).
    pub fn stats(&self, conn: ConnectionHandle) -> Option<ConnectionStats> {
        self.conn(conn).map(|c| c.quinn.stats())
    }

    /// The live connections with `peer` (usually one; two while both sides dialled at once,
    /// which the layer above resolves by closing one).
    pub fn connections(&self, peer: PeerId) -> Vec<ConnectionHandle> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer == peer)
            .map(|(k, c)| Self::handle_of(*k, c))
            .collect()
    }

    /// Number of live connections (including ones still closing).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Opens a stream; `Ok(None)` when the peer's stream limit is reached (wait for
    /// [`Event::StreamsAvailable`]).
    pub fn open_stream(
        &mut self,
        conn: ConnectionHandle,
        dir: Dir,
    ) -> Result<Option<StreamId>, TransportError> {
        Ok(self.conn_mut(conn)?.quinn.streams().open(dir))
    }

    /// Takes the next stream the peer opened in `dir`, if any.
    pub fn accept_stream(
        &mut self,
        conn: ConnectionHandle,
        dir: Dir,
    ) -> Result<Option<StreamId>, TransportError> {
        Ok(self.conn_mut(conn)?.quinn.streams().accept(dir))
    }

    /// Writes as much of `data` as flow control and the send window allow and returns how
    /// much was taken. `Ok(0)` means blocked: wait for [`Event::StreamWritable`].
    pub fn write(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        data: &[u8],
    ) -> Result<usize, TransportError> {
        match self.conn_mut(conn)?.quinn.send_stream(stream).write(data) {
            Ok(n) => Ok(n),
            Err(quinn_proto::WriteError::Blocked) => Ok(0),
            Err(quinn_proto::WriteError::Stopped(code)) => {
                Err(TransportError::Stopped(code.into_inner()))
            }
            Err(quinn_proto::WriteError::ClosedStream) => Err(TransportError::ClosedStream),
        }
    }

    /// Zero-copy [`Transport::write`]: takes as much of `data` as allowed without copying
    /// and advances `data` past it. `Ok(0)` means blocked.
    pub fn write_bytes(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        data: &mut Bytes,
    ) -> Result<usize, TransportError> {
        let quinn = &mut self.conn_mut(conn)?.quinn;
        let mut chunks = [std::mem::take(data)];
        let result = quinn.send_stream(stream).write_chunks(&mut chunks);
        *data = std::mem::take(&mut chunks[0]);
        match result {
            Ok(written) => Ok(written.bytes),
            Err(quinn_proto::WriteError::Blocked) => Ok(0),
            Err(quinn_proto::WriteError::Stopped(code)) => {
                Err(TransportError::Stopped(code.into_inner()))
            }
            Err(quinn_proto::WriteError::ClosedStream) => Err(TransportError::ClosedStream),
        }
    }

    /// Ends the stream after the data written so far (a FIN).
    pub fn finish(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
    ) -> Result<(), TransportError> {
        match self.conn_mut(conn)?.quinn.send_stream(stream).finish() {
            Ok(()) => Ok(()),
            Err(quinn_proto::FinishError::Stopped(code)) => {
                Err(TransportError::Stopped(code.into_inner()))
            }
            Err(quinn_proto::FinishError::ClosedStream) => Err(TransportError::ClosedStream),
        }
    }

    /// Abandons sending on the stream (RFC 9000 RESET_STREAM with `code`).
    pub fn reset(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        code: u32,
    ) -> Result<(), TransportError> {
        self.conn_mut(conn)?
            .quinn
            .send_stream(stream)
            .reset(VarInt::from_u32(code))
            .map_err(|_| TransportError::ClosedStream)
    }

    /// Asks the peer to stop sending on the stream (RFC 9000 STOP_SENDING with `code`).
    pub fn stop(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        code: u32,
    ) -> Result<(), TransportError> {
        self.conn_mut(conn)?
            .quinn
            .recv_stream(stream)
            .stop(VarInt::from_u32(code))
            .map_err(|_| TransportError::ClosedStream)
    }

    /// Reads in-order stream data into `buf`. Reading returns credit to the peer, so a
    /// reader that stops reading applies backpressure to the sender.
    pub fn read(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        buf: &mut [u8],
    ) -> Result<StreamRead, TransportError> {
        let c = self.conn_mut(conn)?;
        // Checked first when empty (almost always): no hashing per chunk read.
        if !c.eof_pending.is_empty() && c.eof_pending.remove(&stream) {
            return Ok(StreamRead::Finished);
        }
        let mut recv = c.quinn.recv_stream(stream);
        let mut chunks = match recv.read(true) {
            Ok(chunks) => chunks,
            Err(_) => return Err(TransportError::ClosedStream),
        };
        let mut filled = 0;
        let mut outcome = None;
        while filled < buf.len() {
            match chunks.next(buf.len() - filled) {
                Ok(Some(chunk)) => {
                    buf[filled..filled + chunk.bytes.len()].copy_from_slice(&chunk.bytes);
                    filled += chunk.bytes.len();
                }
                Ok(None) => {
                    outcome = Some(Ok(StreamRead::Finished));
                    break;
                }
                Err(quinn_proto::ReadError::Blocked) => break,
                Err(quinn_proto::ReadError::Reset(code)) => {
                    outcome = Some(Err(TransportError::Reset(code.into_inner())));
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        if filled > 0 {
            if let Some(Ok(StreamRead::Finished)) = outcome {
                c.eof_pending.insert(stream);
            }
            // A reset after data is reported on the next read (quinn-proto keeps it).
            return Ok(StreamRead::Data(filled));
        }
        outcome.unwrap_or(Ok(StreamRead::Blocked))
    }

    /// Zero-copy [`Transport::read`]: the next in-order chunk of at most `max` bytes, as
    /// quinn-proto received it.
    pub fn read_chunk(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        max: usize,
    ) -> Result<StreamChunk, TransportError> {
        let c = self.conn_mut(conn)?;
        // Checked first when empty (almost always): no hashing per chunk read.
        if !c.eof_pending.is_empty() && c.eof_pending.remove(&stream) {
            return Ok(StreamChunk::Finished);
        }
        let mut recv = c.quinn.recv_stream(stream);
        let mut chunks = recv.read(true).map_err(|_| TransportError::ClosedStream)?;
        let outcome = match chunks.next(max) {
            Ok(Some(chunk)) => Ok(StreamChunk::Data(chunk.bytes)),
            Ok(None) => Ok(StreamChunk::Finished),
            Err(quinn_proto::ReadError::Blocked) => Ok(StreamChunk::Blocked),
            Err(quinn_proto::ReadError::Reset(code)) => {
                Err(TransportError::Reset(code.into_inner()))
            }
        };
        let _ = chunks.finalize();
        outcome
    }

    /// Sends an unreliable QUIC datagram (RFC 9221). Oldest queued datagrams are dropped if
    /// the send buffer is full.
    pub fn send_datagram(
        &mut self,
        conn: ConnectionHandle,
        data: Bytes,
    ) -> Result<(), TransportError> {
        self.conn_mut(conn)?.quinn.datagrams().send(data, true)?;
        Ok(())
    }

    /// Largest datagram [`Transport::send_datagram`] accepts now (depends on the path MTU).
    pub fn max_datagram_size(&mut self, conn: ConnectionHandle) -> Option<usize> {
        self.conn_mut(conn).ok()?.quinn.datagrams().max_size()
    }

    /// Closes the connection with an application `code` and `reason` (sent to the peer).
    /// [`Event::ConnectionLost`] follows once the connection has drained.
    pub fn close(
        &mut self,
        now: Instant,
        conn: ConnectionHandle,
        code: u32,
        reason: &[u8],
    ) -> Result<(), TransportError> {
        self.last_now = Some(now);
        let c = self.conn_mut(conn)?;
        c.quinn
            .close(now, VarInt::from_u32(code), Bytes::copy_from_slice(reason));
        Ok(())
    }
}

/// The peer ID proven by the handshake, from the certificate the peer presented.
fn authenticated_peer(conn: &quinn_proto::Connection) -> Option<PeerId> {
    let identity = conn.crypto_session().peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let first = certs.first()?;
    tls::peer_id_from_cert(first).ok()
}
