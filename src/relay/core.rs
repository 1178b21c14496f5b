//! [`RelayCore`]: the sans-IO relay. Sessions, registration, rendezvous, UDP bindings,
//! STUN, forwarding and limits, with time passed in and no sockets.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::{debug, info, trace};

use crate::wire::control::{
    self, Candidate, CandidateKind, ClientMsg, ConnectFailure, ErrorCode, Introduction,
    MAX_CANDIDATES, NatReport, RelayTransport, Role, ServerMsg, UdpMsg,
};
use crate::wire::frame::{FrameReader, LENGTH_LEN, PREAMBLE};
use crate::wire::relay_data::{self, ChannelId};
use crate::wire::{self, PacketClass, PeerId, stun};

use super::config::RelayConfig;
use super::limits::{RateWindows, TokenBucket, client_key};
use super::metrics::Metrics;
use super::session::{Registration, Session, SessionState, UdpBinding};
use super::stun_server::{StunOutcome, StunReply, StunResponder};

mod segments;
pub use self::segments::ForwardRun;

/// The driver's handle for one TCP connection. Chosen by the caller (the relay driver packs
/// a slab key and a generation into it; a simulator may count up). It must not be reused
/// while the core still knows it, i.e. before `handle_tcp_closed` for it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A UDP datagram for the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The relay socket to send from (one of [`RelayConfig::udp_sockets`]).
    pub source: SocketAddr,
    /// Where to.
    pub destination: SocketAddr,
    /// The datagram.
    pub contents: Vec<u8>,
}

/// "Send the datagram you just passed to `handle_udp`, unchanged, from `source` to
/// `destination`": the UDP→UDP relay fast path, which copies and allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// The relay socket to send from.
    pub source: SocketAddr,
    /// Where to.
    pub destination: SocketAddr,
}

/// Something the driver must do for a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The connection's outgoing queue became non-empty: write [`RelayCore::tcp_outgoing`]
    /// (and keep WRITABLE interest until it is empty).
    TcpWrite(ConnId),
    /// The core ended this connection: write what [`RelayCore::tcp_outgoing`] still holds
    /// (best effort, without waiting long), close the socket, then call
    /// [`RelayCore::handle_tcp_closed`].
    TcpClose(ConnId),
}

/// Most queued UDP transmits. Replies are drained after every driver turn, so this is only
/// reached under a flood; past it, replies are dropped (as `drop_queue_full`).
const MAX_TRANSMITS: usize = 8192;

/// How often timeouts are checked. Timeouts are accurate to this; one periodic sweep costs
/// O(sessions) once a second instead of a timer per session.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most clients the STUN rate limit tracks at once (about 5 MB); beyond that, requests from
/// untracked addresses are dropped until the next sweep frees room.
const STUN_RATE_MAX_TRACKED: usize = 100_000;

/// How long a closed session's final bytes are kept if the driver never reports the close.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// One relay channel between two introduced nodes.
#[derive(Debug, Clone, Copy)]
struct Channel {
    /// The initiator's session.
    a: ConnId,
    /// The responder's session.
    b: ConnId,
}

/// How a relay packet reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    Udp,
    Tcp,
}

/// The relay, without I/O.
///
/// # Inputs
/// - [`RelayCore::handle_udp`] for every datagram on any relay UDP socket.
/// - [`RelayCore::handle_tcp_accepted`] / [`RelayCore::handle_tcp_data`] /
///   [`RelayCore::handle_tcp_closed`] for TCP connections, identified by a caller-chosen
///   [`ConnId`]; [`RelayCore::tcp_written`] after writing bytes from
///   [`RelayCore::tcp_outgoing`].
/// - [`RelayCore::handle_timeout`] whenever `now` passes [`RelayCore::poll_timeout`].
///
/// # TCP session start
/// The client speaks first: the relay sends `ServerMsg::Challenge` only once the 4-byte
/// [`PREAMBLE`] has arrived. A connection whose first byte is 0x00/0x01 is STUN over TCP
/// (RFC 8489 section 6.2.2) and is answered with raw STUN, never a burrow frame.
///
/// # Drain order (after each batch of inputs)
/// 1. Act on `Forward`s as `handle_udp` returns them (same buffer, no copy).
/// 2. [`RelayCore::poll_transmit`] until `None` (STUN answers, UDP control replies,
///    TCP→UDP relayed packets).
/// 3. [`RelayCore::poll_event`] until `None`: `TcpWrite` → write `tcp_outgoing`, then
///    `tcp_written(n)`; `TcpClose` → flush best effort, close, `handle_tcp_closed`.
/// 4. Sleep until [`RelayCore::poll_timeout`] (or I/O).
///
/// Nothing in the core blocks or grows without bound: every queue has a limit from
/// [`super::Limits`] or a constant here, and every limit hit is counted in [`Metrics`].
///
/// # STUN and RFC 5780
/// Binding requests are answered on any UDP socket, registered or not, from the socket they
/// arrived on. With an alternate address, answers carry RESPONSE-ORIGIN and OTHER-ADDRESS
/// and CHANGE-REQUEST is honoured by answering from the changed socket. RFC 5780 section
/// 6.1: a server that cannot honour a CHANGE-REQUEST (no alternate address, or the alternate
/// shares the IP or port that should change) answers 420 (Unknown Attribute) listing
/// CHANGE-REQUEST, so the client knows this server cannot run that test.
#[derive(Debug)]
pub struct RelayCore {
    config: RelayConfig,
    stun: StunResponder,
    rng: ChaCha20Rng,
    sessions: HashMap<ConnId, Session>,
    /// Sessions not in `Closing` (the number `max_sessions` limits).
    live_sessions: usize,
    per_ip: HashMap<IpAddr, usize>,
    peers: HashMap<PeerId, ConnId>,
    udp_tokens: HashMap<[u8; 16], ConnId>,
    udp_addrs: HashMap<SocketAddr, ConnId>,
    channels: HashMap<ChannelId, Channel>,
    registration_rate: RateWindows,
    stun_rate: RateWindows,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Sessions that must be closed once the current input is handled (queue overflow found
    /// while sending to them). Deferred so closing never recurses.
    to_close: Vec<(ConnId, ErrorCode, String)>,
    next_sweep: Instant,
    /// Bytes in all TCP out queues together (bounded by `max_total_queue_bytes` for
    /// relayed data).
    queued_total: usize,
    metrics: Metrics,
    /// Reused buffers: a copy of the current TCP frame, and message encoding.
    frame_scratch: Vec<u8>,
    encode_scratch: Vec<u8>,
}

impl RelayCore {
    /// A relay with no sessions.
    pub fn new(config: RelayConfig, now: Instant) -> Self {
        let rng = ChaCha20Rng::seed_from_u64(config.seed);
        let registration_rate = RateWindows::new(
            Duration::from_secs(60),
            config.limits.registrations_per_ip_per_minute,
        );
        let stun_rate =
            RateWindows::new(Duration::from_secs(1), config.limits.stun_per_ip_per_second)
                .with_max_tracked(STUN_RATE_MAX_TRACKED);
        RelayCore {
            stun: StunResponder::new(&config),
            config,
            rng,
            sessions: HashMap::new(),
            live_sessions: 0,
            per_ip: HashMap::new(),
            peers: HashMap::new(),
            udp_tokens: HashMap::new(),
            udp_addrs: HashMap::new(),
            channels: HashMap::new(),
            registration_rate,
            stun_rate,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            to_close: Vec::new(),
            next_sweep: now + SWEEP_INTERVAL,
            queued_total: 0,
            metrics: Metrics::default(),
            frame_scratch: Vec::new(),
            encode_scratch: Vec::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Counters and current gauges.
    pub fn metrics(&self) -> Metrics {
        let mut m = self.metrics.clone();
        m.sessions = self.live_sessions as u64;
        m.registered = self.peers.len() as u64;
        m.channels = self.channels.len() as u64;
        m.udp_bindings = self.udp_addrs.len() as u64;
        m
    }

    /// The session registered as `peer`, if any (for tests and simulators).
    pub fn peer_conn(&self, peer: &PeerId) -> Option<ConnId> {
        self.peers.get(peer).copied()
    }

    // -----------------------------------------------------------------------------------
    // Outputs
    // -----------------------------------------------------------------------------------

    /// The next UDP datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next TCP action.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`RelayCore::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_sweep)
    }

    /// Bytes waiting to be written on `conn` (empty for unknown connections).
    pub fn tcp_outgoing(&self, conn: ConnId) -> &[u8] {
        self.sessions.get(&conn).map_or(&[], |s| s.out.pending())
    }

    /// Records that the driver wrote the first `n` bytes of [`RelayCore::tcp_outgoing`].
    pub fn tcp_written(&mut self, conn: ConnId, n: usize) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            let before = s.out.len();
            s.out.consume(n);
            self.queued_total = self.queued_total.saturating_sub(before - s.out.len());
        }
    }

    /// Forgets a session entirely (after teardown), releasing its queued bytes.
    fn remove_session(&mut self, conn: ConnId) {
        if let Some(s) = self.sessions.remove(&conn) {
            self.queued_total = self.queued_total.saturating_sub(s.out.len());
        }
    }

    // -----------------------------------------------------------------------------------
    // UDP
    // -----------------------------------------------------------------------------------

    /// A datagram arrived on relay socket `local` from `from`. Returns `Some(Forward)` when
    /// the driver must re-send this same buffer (UDP→UDP relaying); everything else comes out
    /// of [`RelayCore::poll_transmit`] and [`RelayCore::poll_event`].
    pub fn handle_udp(
        &mut self,
        now: Instant,
        local: SocketAddr,
        from: SocketAddr,
        packet: &[u8],
    ) -> Option<Forward> {
        let forward = match wire::classify(packet) {
            PacketClass::RelayData => self.relay_from_udp(now, from, packet),
            PacketClass::Stun => {
                if self.stun_rate.allow(now, client_key(from.ip())) {
                    self.handle_stun(local, from, packet);
                } else {
                    self.metrics.limit_stun_rate += 1;
                }
                None
            }
            PacketClass::Control => {
                self.handle_udp_control(now, local, from, packet);
                None
            }
            _ => {
                trace!(%from, len = packet.len(), "dropping datagram of unknown kind");
                self.metrics.drop_malformed += 1;
                None
            }
        };
        self.flush_closes(now);
        forward
    }

    fn relay_from_udp(&mut self, now: Instant, from: SocketAddr, packet: &[u8]) -> Option<Forward> {
        let Some(&conn) = self.udp_addrs.get(&from) else {
            trace!(%from, "relay data from an unbound address");
            self.metrics.drop_unbound_sender += 1;
            return None;
        };
        let Ok(channel) = relay_data::channel(packet) else {
            self.metrics.drop_malformed += 1;
            return None;
        };
        self.route(now, conn, channel, packet, Inbound::Udp)
    }

    /// Forwards one relay packet from `sender` on `channel` to the channel's other end.
    fn route(
        &mut self,
        now: Instant,
        sender: ConnId,
        channel: ChannelId,
        packet: &[u8],
        inbound: Inbound,
    ) -> Option<Forward> {
        let Some(ch) = self.channels.get(&channel) else {
            trace!(?channel, "relay data for an unknown channel");
            self.metrics.drop_unknown_channel += 1;
            return None;
        };
        let other = if ch.a == sender {
            ch.b
        } else if ch.b == sender {
            ch.a
        } else {
            trace!(
                ?channel,
                "relay data from a node that is not an end of the channel"
            );
            self.metrics.drop_unknown_channel += 1;
            return None;
        };
        let s = self.sessions.get_mut(&sender)?;
        s.last_heard = now;
        let reg = s.registration_mut()?;
        if !reg.bucket.try_take(now, packet.len() as u64) {
            self.metrics.drop_bandwidth += 1;
            return None;
        }
        let tcp_queue_bytes = self.config.limits.tcp_queue_bytes;
        let Some(dst) = self.sessions.get_mut(&other) else {
            self.metrics.drop_no_route += 1;
            return None;
        };
        let Some(dst_reg) = dst.registration() else {
            self.metrics.drop_no_route += 1;
            return None;
        };
        let len = packet.len() as u64;
        match (dst_reg.relay_transport, dst_reg.udp) {
            (RelayTransport::Udp, Some(udp)) => match inbound {
                Inbound::Udp => {
                    self.metrics.relayed_packets_udp_udp += 1;
                    self.metrics.relayed_bytes_udp_udp += len;
                    Some(Forward {
                        source: udp.local,
                        destination: udp.remote,
                    })
                }
                Inbound::Tcp => {
                    if self.transmits.len() >= MAX_TRANSMITS {
                        self.metrics.drop_queue_full += 1;
                        return None;
                    }
                    self.metrics.relayed_packets_tcp_udp += 1;
                    self.metrics.relayed_bytes_tcp_udp += len;
                    self.transmits.push_back(Transmit {
                        source: udp.local,
                        destination: udp.remote,
                        contents: packet.to_vec(),
                    });
                    None
                }
            },
            _ => {
                // Relayed data is the first thing to give way: over the queue limit it is
                // dropped (the nodes' QUIC recovers), and the session stays up.
                let frame_len = LENGTH_LEN + packet.len();
                if dst.out.len() + frame_len > tcp_queue_bytes {
                    self.metrics.drop_queue_full += 1;
                    return None;
                }
                if self.queued_total + frame_len > self.config.limits.max_total_queue_bytes {
                    self.metrics.drop_queue_full += 1;
                    self.metrics.limit_total_queue += 1;
                    return None;
                }
                self.queued_total += frame_len;
                let was_empty = dst.out.is_empty();
                dst.out.push_frame(packet);
                if was_empty {
                    self.events.push_back(Event::TcpWrite(other));
                }
                match inbound {
                    Inbound::Udp => {
                        self.metrics.relayed_packets_udp_tcp += 1;
                        self.metrics.relayed_bytes_udp_tcp += len;
                    }
                    Inbound::Tcp => {
                        self.metrics.relayed_packets_tcp_tcp += 1;
                        self.metrics.relayed_bytes_tcp_tcp += len;
                    }
                }
                None
            }
        }
    }

    fn push_transmit(&mut self, source: SocketAddr, destination: SocketAddr, contents: Vec<u8>) {
        if self.transmits.len() >= MAX_TRANSMITS {
            self.metrics.drop_queue_full += 1;
            return;
        }
        self.transmits.push_back(Transmit {
            source,
            destination,
            contents,
        });
    }

    fn handle_udp_control(
        &mut self,
        now: Instant,
        local: SocketAddr,
        from: SocketAddr,
        packet: &[u8],
    ) {
        let msg = match control::decode_valid::<UdpMsg>(packet) {
            Ok(m) => m,
            Err(e) => {
                trace!(%from, error = %e, "dropping malformed UDP control message");
                self.metrics.drop_malformed += 1;
                return;
            }
        };
        let UdpMsg::Bind { token, seq } = msg else {
            trace!(%from, "dropping UDP control message a relay does not take");
            self.metrics.drop_malformed += 1;
            return;
        };
        let Some(&conn) = self.udp_tokens.get(&token) else {
            self.metrics.udp_binds_rejected += 1;
            if let Ok(reply) = control::to_vec(&UdpMsg::BindRejected { seq }) {
                self.push_transmit(local, from, reply);
            }
            return;
        };
        let binding = UdpBinding {
            local,
            remote: from,
        };
        let mut previous = None;
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.last_heard = now;
            if let Some(reg) = s.registration_mut() {
                previous = reg.udp.replace(binding);
            }
        }
        let changed = previous != Some(binding);
        if changed {
            if let Some(prev) = previous
                && self.udp_addrs.get(&prev.remote) == Some(&conn)
            {
                self.udp_addrs.remove(&prev.remote);
            }
            // Another session bound from this very address before (a node restarted behind
            // the same mapping): the address now belongs to the newer session.
            if let Some(old) = self.udp_addrs.insert(from, conn)
                && old != conn
                && let Some(reg) = self
                    .sessions
                    .get_mut(&old)
                    .and_then(|s| s.registration_mut())
            {
                reg.udp = None;
            }
            self.metrics.udp_binds += 1;
            debug!(%from, ?conn, "UDP address bound");
            if previous.is_some() {
                self.notify_candidates(conn);
            }
        }
        if let Ok(reply) = control::to_vec(&UdpMsg::Bound {
            seq,
            observed: from,
        }) {
            self.push_transmit(local, from, reply);
        }
    }

    // -----------------------------------------------------------------------------------
    // STUN
    // -----------------------------------------------------------------------------------

    fn handle_stun(&mut self, local: SocketAddr, from: SocketAddr, packet: &[u8]) {
        match self.stun.answer(local, from, packet, false) {
            StunOutcome::Dropped => self.metrics.drop_malformed += 1,
            StunOutcome::Unanswerable => self.metrics.stun_requests += 1,
            StunOutcome::Answered(reply) => {
                self.count_stun_reply(&reply);
                self.push_transmit(reply.source, reply.destination, reply.bytes);
            }
        }
    }

    fn count_stun_reply(&mut self, reply: &StunReply) {
        self.metrics.stun_requests += 1;
        if reply.is_error {
            self.metrics.stun_errors += 1;
        } else {
            self.metrics.stun_responses += 1;
        }
    }

    // -----------------------------------------------------------------------------------
    // TCP
    // -----------------------------------------------------------------------------------

    /// A TCP connection was accepted: the core sends the challenge (or refuses it at a
    /// limit, with an `Error` followed by `Event::TcpClose`).
    pub fn handle_tcp_accepted(
        &mut self,
        now: Instant,
        conn: ConnId,
        remote: SocketAddr,
        local: SocketAddr,
    ) {
        self.metrics.tcp_accepted += 1;
        if self.sessions.contains_key(&conn) {
            debug!(
                ?conn,
                "ConnId reused while still known; treating as closed first"
            );
            self.handle_tcp_closed(now, conn);
        }
        let limits = &self.config.limits;
        let handshake_deadline = now + limits.handshake_timeout();
        let mut nonce = [0u8; 32];
        self.rng.fill_bytes(&mut nonce);
        let session = Session::new(conn, remote, local, nonce, now, handshake_deadline);
        let refuse = if self.live_sessions >= limits.max_sessions {
            self.metrics.limit_max_sessions += 1;
            Some("the relay is at its session limit")
        } else if self
            .per_ip
            .get(&client_key(remote.ip()))
            .copied()
            .unwrap_or(0)
            >= limits.max_sessions_per_ip
        {
            self.metrics.limit_sessions_per_ip += 1;
            Some("too many sessions from your address")
        } else {
            None
        };
        self.sessions.insert(conn, session);
        self.live_sessions += 1;
        *self.per_ip.entry(client_key(remote.ip())).or_insert(0) += 1;
        if let Some(why) = refuse {
            debug!(%remote, why, "refusing TCP connection");
            self.close(
                now,
                conn,
                Some((ErrorCode::TooManySessions, why.to_string())),
            );
            return;
        }
        // The challenge waits for the client's preamble: the client speaks first, so a
        // STUN-over-TCP client on the same port never sees a burrow frame.
        trace!(%remote, ?conn, "TCP session accepted");
        let _ = nonce;
        self.flush_closes(now);
    }

    /// Consumes preamble bytes from the front of `data`; sends the challenge once the whole
    /// preamble is in. Returns the rest, or `None` if the session was closed.
    fn take_preamble<'a>(
        &mut self,
        now: Instant,
        conn: ConnId,
        mut data: &'a [u8],
    ) -> Option<&'a [u8]> {
        let s = self.sessions.get_mut(&conn)?;
        while s.preamble_seen < PREAMBLE.len() {
            let Some(&byte) = data.first() else {
                return Some(data);
            };
            if byte != PREAMBLE[s.preamble_seen] {
                self.metrics.protocol_violations += 1;
                let why = if s.preamble_seen == PREAMBLE.len() - 1 {
                    format!(
                        "unsupported wire version {byte} (this relay speaks {})",
                        wire::WIRE_VERSION
                    )
                } else {
                    "not a burrow TCP stream".to_string()
                };
                debug!(?conn, %why, "bad preamble");
                self.close(now, conn, Some((ErrorCode::ProtocolViolation, why)));
                return None;
            }
            s.preamble_seen += 1;
            data = &data[1..];
        }
        if !s.challenge_sent {
            s.challenge_sent = true;
            if let SessionState::Challenged { nonce, .. } = s.state {
                let token_required = !self.config.tokens.is_empty();
                self.send(
                    conn,
                    &ServerMsg::Challenge {
                        nonce,
                        token_required,
                    },
                );
            }
        }
        Some(data)
    }

    /// Bytes arrived on `conn`. Any amount, split anywhere; at most one frame is buffered.
    pub fn handle_tcp_data(&mut self, now: Instant, conn: ConnId, mut data: &[u8]) {
        let mut frame = std::mem::take(&mut self.frame_scratch);
        let max_frame = self.config.limits.max_frame_bytes;
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        if s.is_closing() {
            trace!(
                ?conn,
                len = data.len(),
                "ignoring data on a closing session"
            );
            return;
        }
        s.last_heard = now;
        if s.preamble_seen == 0
            && (s.stun_tcp.is_some() || data.first().is_some_and(|b| *b <= 0x01))
        {
            self.handle_stun_tcp(now, conn, data);
            self.flush_closes(now);
            return;
        }
        if s.preamble_seen < PREAMBLE.len() {
            match self.take_preamble(now, conn, data) {
                Some(rest) => data = rest,
                None => {
                    self.flush_closes(now);
                    return;
                }
            }
        }
        while let Some(s) = self.sessions.get_mut(&conn) {
            if s.is_closing() {
                trace!(
                    ?conn,
                    len = data.len(),
                    "ignoring data on a closing session"
                );
                break;
            }
            s.last_heard = now;
            let reader = s.reader.get_or_insert_with(|| FrameReader::new(false));
            match reader.next_frame() {
                Ok(Some(f)) if f.len() > max_frame => {
                    self.metrics.limit_frame_size += 1;
                    let why = format!("frame of {} bytes over the {max_frame}-byte limit", f.len());
                    self.close(now, conn, Some((ErrorCode::ProtocolViolation, why)));
                    break;
                }
                Ok(Some(f)) => {
                    frame.clear();
                    frame.extend_from_slice(f);
                }
                Ok(None) => {
                    if data.is_empty() {
                        break;
                    }
                    let spare = reader.read_buf();
                    let n = spare.len().min(data.len());
                    spare[..n].copy_from_slice(&data[..n]);
                    reader.filled(n);
                    data = &data[n..];
                    continue;
                }
                Err(e) => {
                    if matches!(e, wire::WireError::TooLarge(_)) {
                        self.metrics.limit_frame_size += 1;
                    } else {
                        self.metrics.protocol_violations += 1;
                    }
                    debug!(?conn, error = %e, "bad TCP stream");
                    self.close(
                        now,
                        conn,
                        Some((ErrorCode::ProtocolViolation, e.to_string())),
                    );
                    break;
                }
            }
            self.handle_frame(now, conn, &frame);
            self.flush_closes(now);
        }
        self.frame_scratch = frame;
        self.flush_closes(now);
    }

    /// STUN over TCP (RFC 8489 section 6.2.2): messages back to back, each 20 header bytes
    /// plus the length in the header. Answers go back raw on the same connection. The
    /// session stays unregistered and ends at the handshake timeout.
    fn handle_stun_tcp(&mut self, now: Instant, conn: ConnId, mut data: &[u8]) {
        /// Largest STUN message taken over TCP; a Binding request is far smaller.
        const MAX_STUN_TCP: usize = 1024;
        let queue_limit = self.config.limits.tcp_queue_bytes;
        while !data.is_empty() {
            let Some(s) = self.sessions.get_mut(&conn) else {
                return;
            };
            if s.is_closing() {
                return;
            }
            let (local, remote) = (s.local, s.remote);
            let buf = s.stun_tcp.get_or_insert_with(Vec::new);
            let n = data.len().min(MAX_STUN_TCP * 2 - buf.len());
            buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            loop {
                let Some(s) = self.sessions.get_mut(&conn) else {
                    return;
                };
                let Some(buf) = s.stun_tcp.as_mut() else {
                    return;
                };
                if buf.len() < stun::HEADER_LEN {
                    break;
                }
                let len = stun::HEADER_LEN + u16::from_be_bytes([buf[2], buf[3]]) as usize;
                if len > MAX_STUN_TCP || buf[0] > 0x01 {
                    self.metrics.drop_malformed += 1;
                    self.close(now, conn, None);
                    return;
                }
                if buf.len() < len {
                    break;
                }
                let message: Vec<u8> = buf.drain(..len).collect();
                match self.stun.answer(local, remote, &message, true) {
                    StunOutcome::Answered(reply) => {
                        self.count_stun_reply(&reply);
                        let Some(s) = self.sessions.get_mut(&conn) else {
                            return;
                        };
                        if s.out.len() + reply.bytes.len() > queue_limit {
                            self.metrics.limit_too_slow += 1;
                            self.close(now, conn, None);
                            return;
                        }
                        let was_empty = s.out.is_empty();
                        s.out.push_raw(&reply.bytes);
                        self.queued_total += reply.bytes.len();
                        if was_empty {
                            self.events.push_back(Event::TcpWrite(conn));
                        }
                    }
                    StunOutcome::Unanswerable => self.metrics.stun_requests += 1,
                    StunOutcome::Dropped => self.metrics.drop_malformed += 1,
                }
            }
        }
    }

    /// The driver closed `conn` (peer closed, error, or after `Event::TcpClose`). The core
    /// forgets it; its channels' other ends get `PeerGone`.
    pub fn handle_tcp_closed(&mut self, now: Instant, conn: ConnId) {
        if let Some(s) = self.sessions.get(&conn) {
            if !s.is_closing() {
                trace!(?conn, "TCP connection closed by the driver");
                self.teardown(conn, now);
            }
            self.remove_session(conn);
        }
        self.flush_closes(now);
    }

    fn handle_frame(&mut self, now: Instant, conn: ConnId, frame: &[u8]) {
        match wire::classify(frame) {
            PacketClass::RelayData => {
                let registered = self
                    .sessions
                    .get(&conn)
                    .is_some_and(|s| s.registration().is_some());
                if !registered {
                    self.violation(now, conn, "relay data before registration");
                    return;
                }
                match relay_data::channel(frame) {
                    Ok(channel) => {
                        self.route(now, conn, channel, frame, Inbound::Tcp);
                    }
                    Err(e) => self.violation(now, conn, &e.to_string()),
                }
            }
            PacketClass::Control => match control::decode_valid::<ClientMsg>(frame) {
                Ok(msg) => self.handle_client_msg(now, conn, msg),
                Err(e) => self.violation(now, conn, &e.to_string()),
            },
            _ => self.violation(now, conn, "frame is neither control nor relay data"),
        }
    }

    fn violation(&mut self, now: Instant, conn: ConnId, why: &str) {
        debug!(?conn, why, "protocol violation");
        self.metrics.protocol_violations += 1;
        let mut message = why.to_string();
        message.truncate(control::MAX_TEXT_LEN / 2);
        self.close(now, conn, Some((ErrorCode::ProtocolViolation, message)));
    }

    fn handle_client_msg(&mut self, now: Instant, conn: ConnId, msg: ClientMsg) {
        let Some(s) = self.sessions.get(&conn) else {
            return;
        };
        let registered = s.registration().is_some();
        match msg {
            ClientMsg::Ping { seq } => {
                self.metrics.pings += 1;
                self.send(conn, &ServerMsg::Pong { seq });
            }
            ClientMsg::Register(r) if !registered => self.register(now, conn, r),
            _ if !registered => self.violation(now, conn, "register first"),
            ClientMsg::Register(_) => self.violation(now, conn, "already registered"),
            ClientMsg::Connect { peer, request_id } if !self.control_allowed(now, conn) => {
                self.metrics.connects_failed += 1;
                self.send(
                    conn,
                    &ServerMsg::ConnectFailed {
                        peer,
                        request_id,
                        reason: ConnectFailure::RateLimited,
                        message: "too many requests; slow down".into(),
                    },
                );
            }
            ClientMsg::Connect { peer, request_id } => self.connect(now, conn, peer, request_id),
            ClientMsg::UpdateCandidates { .. } if !self.control_allowed(now, conn) => {
                trace!(?conn, "UpdateCandidates over the control rate; ignored");
            }
            ClientMsg::UpdateCandidates { candidates, nat } => {
                if let Some(reg) = self
                    .sessions
                    .get_mut(&conn)
                    .and_then(|s| s.registration_mut())
                {
                    reg.candidates = candidates;
                    reg.nat = nat;
                }
                self.notify_candidates(conn);
            }
            ClientMsg::CloseChannel { channel } => {
                let Some(ch) = self.channels.get(&channel).copied() else {
                    return;
                };
                if ch.a != conn && ch.b != conn {
                    return;
                }
                self.channels.remove(&channel);
                let other = if ch.a == conn { ch.b } else { ch.a };
                let me = self.peer_of(conn);
                for c in [conn, other] {
                    if let Some(reg) = self.sessions.get_mut(&c).and_then(|s| s.registration_mut())
                    {
                        reg.channels.retain(|x| *x != channel);
                    }
                }
                if let Some(me) = me {
                    self.send(other, &ServerMsg::PeerGone { peer: me, channel });
                }
            }
            ClientMsg::SetRelayTransport { transport } => {
                if let Some(reg) = self
                    .sessions
                    .get_mut(&conn)
                    .and_then(|s| s.registration_mut())
                {
                    reg.relay_transport = transport;
                }
            }
        }
    }

    /// Takes one message from the session's control bucket; counts a limit hit if empty.
    fn control_allowed(&mut self, now: Instant, conn: ConnId) -> bool {
        let ok = self
            .sessions
            .get_mut(&conn)
            .and_then(|s| s.registration_mut())
            .is_some_and(|r| r.control_bucket.try_take(now, 1));
        if !ok {
            self.metrics.limit_control_rate += 1;
        }
        ok
    }

    fn peer_of(&self, conn: ConnId) -> Option<PeerId> {
        self.sessions.get(&conn)?.registration().map(|r| r.peer)
    }

    fn register(&mut self, now: Instant, conn: ConnId, r: control::Register) {
        let Some(s) = self.sessions.get(&conn) else {
            return;
        };
        let SessionState::Challenged { nonce, .. } = s.state else {
            return;
        };
        let remote = s.remote;
        // Count attempts before the signature check: verifying costs CPU.
        if !self.registration_rate.allow(now, client_key(remote.ip())) {
            self.metrics.limit_registration_rate += 1;
            self.close(
                now,
                conn,
                Some((
                    ErrorCode::RateLimited,
                    "too many registrations from your address; retry in a minute".into(),
                )),
            );
            return;
        }
        if !self.config.tokens.is_empty() {
            let ok = r.token.as_deref().is_some_and(|t| {
                self.config.tokens.iter().fold(false, |acc, known| {
                    acc | constant_time_eq(known.as_bytes(), t.as_bytes())
                })
            });
            if !ok {
                self.metrics.registrations_unauthorized += 1;
                self.close(
                    now,
                    conn,
                    Some((
                        ErrorCode::Unauthorized,
                        "this relay requires a valid access token".into(),
                    )),
                );
                return;
            }
        }
        let signed = control::register_signed_bytes(&nonce);
        if !r.peer_id.verify(&signed, &r.signature.to_bytes()) {
            self.metrics.registrations_bad_signature += 1;
            debug!(%remote, peer = %r.peer_id.short(), "bad registration signature");
            self.close(
                now,
                conn,
                Some((
                    ErrorCode::BadSignature,
                    "the signature does not verify for this peer ID".into(),
                )),
            );
            return;
        }
        // The key is proven: only now may an existing session of this ID be replaced.
        if let Some(old) = self.peers.get(&r.peer_id).copied()
            && old != conn
        {
            self.metrics.sessions_replaced += 1;
            info!(peer = %r.peer_id.short(), %remote, "peer registered again; replacing its old session");
            let why = format!(
                "{} registered again from another connection",
                r.peer_id.short()
            );
            self.close(now, old, Some((ErrorCode::Replaced, why)));
        }
        let mut udp_token = [0u8; 16];
        loop {
            self.rng.fill_bytes(&mut udp_token);
            if !self.udp_tokens.contains_key(&udp_token) {
                break;
            }
        }
        let limits = &self.config.limits;
        let registration = Registration {
            peer: r.peer_id,
            udp_token,
            candidates: r.candidates,
            nat: r.nat,
            relay_transport: RelayTransport::Udp,
            udp: None,
            channels: Vec::new(),
            bucket: TokenBucket::new(limits.relay_bytes_per_sec, limits.relay_burst_bytes, now),
            control_bucket: TokenBucket::new(
                limits.control_msgs_per_sec as u64,
                limits.control_msgs_burst as u64,
                now,
            ),
        };
        let keepalive_secs = limits.keepalive_secs();
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        s.state = SessionState::Registered(Box::new(registration));
        self.peers.insert(r.peer_id, conn);
        self.udp_tokens.insert(udp_token, conn);
        self.metrics.registrations += 1;
        info!(peer = %r.peer_id.short(), %remote, agent = %r.agent, "registered");
        self.send(
            conn,
            &ServerMsg::Registered {
                udp_token,
                observed_tcp: remote,
                keepalive_secs,
                stun_alternate: self.config.alt_listen,
            },
        );
    }

    fn connect(&mut self, now: Instant, conn: ConnId, peer: PeerId, request_id: u32) {
        let Some(me) = self.peer_of(conn) else {
            return;
        };
        let fail = |reason: ConnectFailure, message: String| ServerMsg::ConnectFailed {
            peer,
            request_id,
            reason,
            message,
        };
        if peer == me {
            self.metrics.connects_failed += 1;
            self.send(
                conn,
                &fail(
                    ConnectFailure::SelfConnect,
                    "cannot connect to yourself".into(),
                ),
            );
            return;
        }
        let Some(target) = self.peers.get(&peer).copied() else {
            self.metrics.connects_failed += 1;
            let msg = format!("peer {peer} is not registered on this relay");
            self.send(conn, &fail(ConnectFailure::UnknownPeer, msg));
            return;
        };
        // A new introduction between the same pair supersedes the old channel.
        let existing: Vec<ChannelId> = self
            .sessions
            .get(&conn)
            .and_then(|s| s.registration())
            .map(|r| {
                r.channels
                    .iter()
                    .copied()
                    .filter(|c| {
                        self.channels
                            .get(c)
                            .is_some_and(|ch| ch.a == target || ch.b == target)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for c in existing {
            self.channels.remove(&c);
            for end in [conn, target] {
                if let Some(reg) = self
                    .sessions
                    .get_mut(&end)
                    .and_then(|s| s.registration_mut())
                {
                    reg.channels.retain(|x| *x != c);
                }
            }
        }
        let max = self.config.limits.max_channels_per_session;
        let count = |c: ConnId| {
            self.sessions
                .get(&c)
                .and_then(|s| s.registration())
                .map_or(usize::MAX, |r| r.channels.len())
        };
        if count(conn) >= max || count(target) >= max {
            self.metrics.limit_channels += 1;
            self.metrics.connects_failed += 1;
            let who = if count(conn) >= max {
                "you have"
            } else {
                "the peer has"
            };
            let msg = format!("{who} {max} relay channels open, the limit on this relay");
            self.send(conn, &fail(ConnectFailure::TooManyChannels, msg));
            return;
        }
        let channel = loop {
            let c = ChannelId(self.rng.next_u32());
            if c.0 != 0 && !self.channels.contains_key(&c) {
                break c;
            }
        };
        let mut punch_nonce = [0u8; 32];
        self.rng.fill_bytes(&mut punch_nonce);
        self.channels
            .insert(channel, Channel { a: conn, b: target });
        for end in [conn, target] {
            if let Some(reg) = self
                .sessions
                .get_mut(&end)
                .and_then(|s| s.registration_mut())
            {
                reg.channels.push(channel);
            }
        }
        let (mine, my_nat) = self.candidates_of(conn);
        let (theirs, their_nat) = self.candidates_of(target);
        self.metrics.introductions += 1;
        debug!(from = %me.short(), to = %peer.short(), ?channel, "introducing");
        self.send(
            conn,
            &ServerMsg::Introduce(Introduction {
                peer,
                channel,
                punch_nonce,
                role: Role::Initiator,
                candidates: theirs,
                nat: their_nat,
                request_id: Some(request_id),
            }),
        );
        self.send(
            target,
            &ServerMsg::Introduce(Introduction {
                peer: me,
                channel,
                punch_nonce,
                role: Role::Responder,
                candidates: mine,
                nat: my_nat,
                request_id: None,
            }),
        );
        let _ = now;
    }

    /// A node's candidates as its peers get them: the relay-observed UDP address first
    /// (server-reflexive), then what it advertised, at most [`MAX_CANDIDATES`].
    fn candidates_of(&self, conn: ConnId) -> (Vec<Candidate>, NatReport) {
        let Some(reg) = self.sessions.get(&conn).and_then(|s| s.registration()) else {
            return (Vec::new(), NatReport::default());
        };
        let mut v = Vec::with_capacity(reg.candidates.len() + 1);
        if let Some(udp) = reg.udp {
            v.push(Candidate {
                addr: udp.remote,
                kind: CandidateKind::ServerReflexive,
            });
        }
        for c in &reg.candidates {
            if v.len() >= MAX_CANDIDATES {
                break;
            }
            if !v.iter().any(|x| x.addr == c.addr) {
                v.push(*c);
            }
        }
        (v, reg.nat)
    }

    /// Tells every channel peer of `conn` its current candidates.
    fn notify_candidates(&mut self, conn: ConnId) {
        let Some(reg) = self.sessions.get(&conn).and_then(|s| s.registration()) else {
            return;
        };
        let peer = reg.peer;
        let channels = reg.channels.clone();
        let (candidates, nat) = self.candidates_of(conn);
        for channel in channels {
            let Some(ch) = self.channels.get(&channel).copied() else {
                continue;
            };
            let other = if ch.a == conn { ch.b } else { ch.a };
            self.send(
                other,
                &ServerMsg::PeerCandidates {
                    peer,
                    channel,
                    candidates: candidates.clone(),
                    nat,
                },
            );
        }
    }

    /// Queues a control message to `conn`. A session whose queue is already past the limit
    /// plus the control headroom cannot keep up: it is closed as `TooSlow` (deferred).
    fn send(&mut self, conn: ConnId, msg: &ServerMsg) {
        let hard_limit =
            self.config.limits.tcp_queue_bytes + self.config.limits.control_headroom_bytes;
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        if s.is_closing() {
            return;
        }
        self.encode_scratch.clear();
        if let Err(e) = control::encode(msg, &mut self.encode_scratch) {
            debug!(error = %e, "cannot encode a control message");
            return;
        }
        if s.out.len() + LENGTH_LEN + self.encode_scratch.len() > hard_limit {
            self.metrics.limit_too_slow += 1;
            self.to_close.push((
                conn,
                ErrorCode::TooSlow,
                "you did not read fast enough".into(),
            ));
            return;
        }
        let was_empty = s.out.is_empty();
        s.out.push_frame(&self.encode_scratch);
        self.queued_total += LENGTH_LEN + self.encode_scratch.len();
        if was_empty {
            self.events.push_back(Event::TcpWrite(conn));
        }
    }

    /// Ends a session: queues `error` (if any) as its last message, releases its
    /// registration, tells its channel peers, and asks the driver to close it.
    fn close(&mut self, now: Instant, conn: ConnId, error: Option<(ErrorCode, String)>) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        if s.is_closing() {
            return;
        }
        // A STUN-over-TCP client would not understand a burrow Error frame.
        if let Some((code, message)) = error
            && s.stun_tcp.is_none()
        {
            // The final message ignores the queue limit: it is one small frame, and the
            // session is forgotten right after.
            self.encode_scratch.clear();
            if control::encode(
                &ServerMsg::Error { code, message },
                &mut self.encode_scratch,
            )
            .is_ok()
            {
                s.out.push_frame(&self.encode_scratch);
                self.queued_total += LENGTH_LEN + self.encode_scratch.len();
            }
        }
        self.teardown(conn, now);
        self.events.push_back(Event::TcpClose(conn));
    }

    /// Releases everything a session holds and marks it `Closing`.
    fn teardown(&mut self, conn: ConnId, now: Instant) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        let state = std::mem::replace(
            &mut s.state,
            SessionState::Closing {
                forget_at: now + CLOSE_LINGER,
            },
        );
        s.reader = None;
        let remote_ip = client_key(s.remote.ip());
        self.live_sessions = self.live_sessions.saturating_sub(1);
        if let Some(n) = self.per_ip.get_mut(&remote_ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&remote_ip);
            }
        }
        let SessionState::Registered(reg) = state else {
            return;
        };
        if self.peers.get(&reg.peer) == Some(&conn) {
            self.peers.remove(&reg.peer);
        }
        self.udp_tokens.remove(&reg.udp_token);
        if let Some(udp) = reg.udp
            && self.udp_addrs.get(&udp.remote) == Some(&conn)
        {
            self.udp_addrs.remove(&udp.remote);
        }
        for channel in reg.channels {
            let Some(ch) = self.channels.remove(&channel) else {
                continue;
            };
            let other = if ch.a == conn { ch.b } else { ch.a };
            if let Some(r) = self
                .sessions
                .get_mut(&other)
                .and_then(|s| s.registration_mut())
            {
                r.channels.retain(|x| *x != channel);
            }
            self.send(
                other,
                &ServerMsg::PeerGone {
                    peer: reg.peer,
                    channel,
                },
            );
        }
        debug!(peer = %reg.peer.short(), ?conn, "session ended");
    }

    fn flush_closes(&mut self, now: Instant) {
        while let Some((conn, code, message)) = self.to_close.pop() {
            self.close(now, conn, Some((code, message)));
        }
    }

    // -----------------------------------------------------------------------------------
    // Time
    // -----------------------------------------------------------------------------------

    /// Runs timeouts due at `now`: handshake and idle timeouts, forgetting lingering closed
    /// sessions, pruning rate windows.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let idle = self.config.limits.idle_timeout();
        let mut expired = Vec::new();
        let mut forget = Vec::new();
        for (conn, s) in &self.sessions {
            match &s.state {
                SessionState::Challenged { deadline, .. } if now >= *deadline => {
                    expired.push((*conn, ErrorCode::HandshakeTimeout));
                }
                SessionState::Registered(_)
                    if now.saturating_duration_since(s.last_heard) >= idle =>
                {
                    expired.push((*conn, ErrorCode::IdleTimeout));
                }
                SessionState::Closing { forget_at } if now >= *forget_at => forget.push(*conn),
                _ => {}
            }
        }
        for (conn, code) in expired {
            let message = match code {
                ErrorCode::HandshakeTimeout => {
                    self.metrics.limit_handshake_timeout += 1;
                    "no registration within the handshake timeout"
                }
                _ => {
                    self.metrics.limit_idle_timeout += 1;
                    "nothing heard within the idle timeout"
                }
            };
            self.close(now, conn, Some((code, message.into())));
        }
        for conn in forget {
            self.remove_session(conn);
        }
        self.registration_rate.prune(now);
        self.stun_rate.prune(now);
        self.flush_closes(now);
    }

    /// Ends every session with `Error{Shutdown}` (the driver flushes and closes them).
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.is_closing())
            .map(|(c, _)| *c)
            .collect();
        for conn in conns {
            self.close(
                now,
                conn,
                Some((ErrorCode::Shutdown, "the relay is shutting down".into())),
            );
        }
        self.flush_closes(now);
    }
}

/// Compares without an early exit, so response time does not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
