//! The node's session with its relay: the TCP control connection and the UDP binding.
//!
//! ```text
//!  Idle ──(retry due)──▶ Connecting ──connected──▶ AwaitChallenge ──Challenge──▶
//!  AwaitRegistered ──Registered──▶ Registered
//!    ▲                                                                  │
//!    └──────── closed / timeout / error: backoff 0.5 s doubling to 30 s ┘
//!                 with jitter (uniform in [d/2, d]) so a relay restart does
//!                 not bring every node back in the same millisecond
//! ```
//!
//! Once registered the session keeps two things alive:
//! * TCP: a `Ping` every `keepalive_secs` (from `Registered`); three intervals without any
//!   byte from the relay close the session (a half-open TCP connection never errors).
//! * UDP: `UdpMsg::Bind` with the session's token, retransmitted from 500 ms doubling (RFC
//!   8489's RTO rule, reused, capped at 8 s) until `Bound`, then repeated every 15 s (each
//!   repetition again retransmitted until answered) so that the NAT
//!   mapping toward the relay (30 s on Linux conntrack) never expires. UDP "works" while a
//!   `Bound` arrived within the last 45 s. Until then relayed data goes over TCP; the relay
//!   is told which transport to use with `SetRelayTransport`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngExt;
use rand_chacha::ChaCha20Rng;
use tracing::{debug, trace};

use crate::wire::control::{self, ClientMsg, RelayTransport, ServerMsg, UdpMsg};
use crate::wire::frame::{self, FrameReader};
use crate::wire::relay_data::{self, ChannelId};
use crate::wire::{KIND_CONTROL, KIND_RELAY_DATA};

/// Most bytes buffered toward the relay; relayed data beyond it is dropped (control
/// messages always fit: they are small and rare).
pub const MAX_TCP_OUTGOING: usize = 512 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BIND_KEEPALIVE: Duration = Duration::from_secs(15);
const BIND_RTO: Duration = Duration::from_millis(500);
const BIND_RTO_MAX: Duration = Duration::from_secs(8);
const UDP_TRUST: Duration = Duration::from_secs(45);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle { retry_at: Instant },
    Connecting { since: Instant },
    AwaitChallenge { since: Instant },
    AwaitRegistered { since: Instant },
    Registered,
}

/// Something the relay sent that the node core must act on.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A control message (already validated).
    Control(ServerMsg),
    /// Relayed data on a channel.
    Data(ChannelId, Vec<u8>),
}

/// What the session asks of the node core / driver.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SessionAction {
    /// Open a TCP connection to the relay.
    Connect(SocketAddr),
    /// Close the TCP connection (timeout or protocol error).
    Close,
    /// The session ended (was registered or trying); report once.
    Lost,
}

/// The relay session state machine.
#[derive(Debug)]
pub(crate) struct RelaySession {
    tcp_addr: SocketAddr,
    udp_addr: SocketAddr,
    state: State,
    reader: FrameReader,
    out: Vec<u8>,
    out_sent: usize,
    backoff: Duration,
    keepalive: Duration,
    next_ping: Option<Instant>,
    last_rx: Instant,
    ping_seq: u64,
    udp_token: Option<[u8; 16]>,
    bind_seq: u32,
    next_bind: Option<Instant>,
    bind_rto: Duration,
    last_bound: Option<Instant>,
    told_transport: Option<RelayTransport>,
    /// Reflexive address from the last `Bound`.
    pub udp_observed: Option<SocketAddr>,
    /// The relay's alternate STUN address (from `Registered`).
    pub stun_alternate: Option<SocketAddr>,
    /// When the last bind was sent, for the relay RTT.
    bind_sent_at: Option<(u32, Instant)>,
    /// Latest bind round trip.
    pub rtt: Option<Duration>,
}

impl RelaySession {
    /// A session that will connect at `now`.
    pub fn new(now: Instant, tcp_addr: SocketAddr, udp_addr: SocketAddr) -> Self {
        RelaySession {
            tcp_addr,
            udp_addr,
            state: State::Idle { retry_at: now },
            reader: FrameReader::new(false),
            out: Vec::new(),
            out_sent: 0,
            backoff: Duration::ZERO,
            keepalive: Duration::from_secs(15),
            next_ping: None,
            last_rx: now,
            ping_seq: 0,
            udp_token: None,
            bind_seq: 0,
            next_bind: None,
            bind_rto: BIND_RTO,
            last_bound: None,
            told_transport: None,
            udp_observed: None,
            stun_alternate: None,
            bind_sent_at: None,
            rtt: None,
        }
    }

    /// The relay's UDP address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// Registered with the relay.
    pub fn is_registered(&self) -> bool {
        self.state == State::Registered
    }

    /// Whether relayed data should go over UDP right now.
    pub fn udp_works(&self, now: Instant) -> bool {
        self.is_registered()
            && self
                .last_bound
                .is_some_and(|t| now.saturating_duration_since(t) < UDP_TRUST)
    }

    /// Whether the TCP connection is up (handshake or registered).
    fn tcp_up(&self) -> bool {
        !matches!(self.state, State::Idle { .. } | State::Connecting { .. })
    }

    /// Bytes waiting to be written to the TCP connection.
    pub fn outgoing(&self) -> &[u8] {
        &self.out[self.out_sent..]
    }

    /// The driver wrote `n` bytes of [`RelaySession::outgoing`].
    pub fn written(&mut self, n: usize) {
        self.out_sent = (self.out_sent + n).min(self.out.len());
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
        } else if self.out_sent > 64 * 1024 && self.out_sent * 2 >= self.out.len() {
            // Compact only once the sent part is at least half the buffer: each byte is
            // then moved at most once on average (compacting after every partial write
            // moved the whole unsent queue, up to MAX_TCP_OUTGOING, every time).
            self.out.drain(..self.out_sent);
            self.out_sent = 0;
        }
    }

    fn queue_frame(&mut self, body: &[u8], droppable: bool) -> bool {
        if !self.tcp_up() {
            return false;
        }
        if droppable && self.outgoing().len() + body.len() > MAX_TCP_OUTGOING {
            trace!("relay TCP queue full: dropping relayed datagram");
            return false;
        }
        frame::encode(body, &mut self.out).is_ok()
    }

    /// Queues a control message on the TCP session.
    pub fn send_control(&mut self, msg: &ClientMsg) -> bool {
        match control::to_vec(msg) {
            Ok(body) => self.queue_frame(&body, false),
            Err(e) => {
                debug!(%e, "control message does not encode");
                false
            }
        }
    }

    /// Queues relayed data on the TCP session (TCP fallback).
    pub fn send_data_tcp(&mut self, channel: ChannelId, payload: &[u8]) -> bool {
        if !self.is_registered() {
            return false;
        }
        // Framed straight into the outgoing buffer (no intermediate body Vec); same checks
        // as `queue_frame`.
        let len = relay_data::HEADER_LEN + payload.len();
        if len > frame::MAX_FRAME_BODY {
            return false;
        }
        if self.outgoing().len() + len > MAX_TCP_OUTGOING {
            trace!("relay TCP queue full: dropping relayed datagram");
            return false;
        }
        self.out.extend_from_slice(&frame::length_prefix(len));
        relay_data::encode(channel, payload, &mut self.out);
        true
    }

    /// The next instant the session needs [`RelaySession::on_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state_t = match self.state {
            State::Idle { retry_at } => Some(retry_at),
            State::Connecting { since }
            | State::AwaitChallenge { since }
            | State::AwaitRegistered { since } => Some(since + CONNECT_TIMEOUT),
            State::Registered => Some(self.last_rx + self.keepalive * 3),
        };
        [state_t, self.next_ping, self.next_bind]
            .into_iter()
            .flatten()
            .min()
    }

    fn fail(&mut self, now: Instant, rng: &mut ChaCha20Rng, actions: &mut Vec<SessionAction>) {
        let was_up = self.tcp_up() || matches!(self.state, State::Connecting { .. });
        if was_up {
            actions.push(SessionAction::Close);
        }
        if self.state == State::Registered {
            actions.push(SessionAction::Lost);
        }
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        let ms = self.backoff.as_millis() as u64;
        let delay = Duration::from_millis(rng.random_range(ms / 2..=ms));
        debug!(retry_in = ?delay, "relay session down");
        self.state = State::Idle {
            retry_at: now + delay,
        };
        self.reader = FrameReader::new(false);
        self.out.clear();
        self.out_sent = 0;
        self.next_ping = None;
        self.next_bind = None;
        self.udp_token = None;
        self.last_bound = None;
        self.told_transport = None;
    }

    /// Runs due timers; returns UDP datagrams to send to the relay.
    pub fn on_timeout(
        &mut self,
        now: Instant,
        rng: &mut ChaCha20Rng,
        actions: &mut Vec<SessionAction>,
        udp_out: &mut Vec<Vec<u8>>,
    ) {
        match self.state {
            State::Idle { retry_at } if retry_at <= now => {
                self.state = State::Connecting { since: now };
                actions.push(SessionAction::Connect(self.tcp_addr));
            }
            State::Connecting { since }
            | State::AwaitChallenge { since }
            | State::AwaitRegistered { since }
                if since + CONNECT_TIMEOUT <= now =>
            {
                debug!("relay handshake timed out");
                self.fail(now, rng, actions);
                return;
            }
            State::Registered if self.last_rx + self.keepalive * 3 <= now => {
                debug!("relay silent for three keepalive intervals");
                self.fail(now, rng, actions);
                return;
            }
            _ => {}
        }
        if self.next_ping.is_some_and(|t| t <= now) {
            self.ping_seq += 1;
            let seq = self.ping_seq;
            self.send_control(&ClientMsg::Ping { seq });
            self.next_ping = Some(now + self.keepalive);
        }
        if self.next_bind.is_some_and(|t| t <= now) {
            self.send_bind(now, udp_out);
        }
        self.sync_transport(now);
    }

    fn send_bind(&mut self, now: Instant, udp_out: &mut Vec<Vec<u8>>) {
        let Some(token) = self.udp_token else { return };
        self.bind_seq = self.bind_seq.wrapping_add(1);
        if let Ok(pkt) = control::to_vec(&UdpMsg::Bind {
            token,
            seq: self.bind_seq,
        }) {
            udp_out.push(pkt);
        }
        self.bind_sent_at = Some((self.bind_seq, now));
        // Until a `Bound` answers this bind, retransmit on the RTO schedule (a lost
        // keepalive must not wait a whole keepalive interval); `Bound` re-arms 15 s.
        self.next_bind = Some(now + self.bind_rto);
        self.bind_rto = (self.bind_rto * 2).min(BIND_RTO_MAX);
    }

    /// Tells the relay which transport to use for our relayed data when that changed.
    fn sync_transport(&mut self, now: Instant) {
        if !self.is_registered() {
            return;
        }
        let want = if self.udp_works(now) {
            RelayTransport::Udp
        } else {
            RelayTransport::Tcp
        };
        if self.told_transport != Some(want) {
            debug!(?want, "relay transport");
            self.told_transport = Some(want);
            self.send_control(&ClientMsg::SetRelayTransport { transport: want });
        }
    }

    /// The driver's TCP connect succeeded.
    pub fn on_connected(&mut self, now: Instant) {
        if matches!(self.state, State::Connecting { .. }) {
            self.state = State::AwaitChallenge { since: now };
            self.last_rx = now;
            self.out.clear();
            self.out_sent = 0;
            self.out.extend_from_slice(&frame::PREAMBLE);
        }
    }

    /// The TCP connection closed (or the connect failed).
    pub fn on_closed(
        &mut self,
        now: Instant,
        rng: &mut ChaCha20Rng,
        actions: &mut Vec<SessionAction>,
    ) {
        if matches!(self.state, State::Idle { .. }) {
            return;
        }
        let was_registered = self.state == State::Registered;
        // The connection is already gone: no Close action.
        self.state = State::AwaitChallenge { since: now };
        self.fail(now, rng, actions);
        actions.retain(|a| *a != SessionAction::Close);
        if was_registered && !actions.contains(&SessionAction::Lost) {
            actions.push(SessionAction::Lost);
        }
    }

    /// Bytes from the TCP connection. Protocol errors close the session.
    pub fn on_tcp_data(
        &mut self,
        now: Instant,
        mut data: &[u8],
        rng: &mut ChaCha20Rng,
        actions: &mut Vec<SessionAction>,
        incoming: &mut Vec<Incoming>,
    ) {
        if !self.tcp_up() {
            return;
        }
        self.last_rx = now;
        while !data.is_empty() {
            let spare = self.reader.read_buf();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.reader.filled(n);
            data = &data[n..];
            loop {
                match self.reader.next_frame() {
                    Ok(Some(body)) => match body.first() {
                        Some(&KIND_CONTROL) => match control::decode_valid::<ServerMsg>(body) {
                            Ok(msg) => incoming.push(Incoming::Control(msg)),
                            Err(e) => {
                                debug!(%e, "bad control frame from relay");
                                self.fail(now, rng, actions);
                                return;
                            }
                        },
                        Some(&KIND_RELAY_DATA) => match relay_data::parse(body) {
                            Ok((ch, payload)) => {
                                incoming.push(Incoming::Data(ch, payload.to_vec()))
                            }
                            Err(e) => trace!(%e, "bad relay data frame"),
                        },
                        _ => trace!("unknown frame kind from relay"),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        debug!(%e, "relay stream broken");
                        self.fail(now, rng, actions);
                        return;
                    }
                }
            }
        }
    }

    /// Moves the handshake along; called by the node for `Challenge` (returns true: the
    /// node must now send `Register`).
    pub fn on_challenge(&mut self, now: Instant) -> bool {
        if matches!(self.state, State::AwaitChallenge { .. }) {
            self.state = State::AwaitRegistered { since: now };
            true
        } else {
            false
        }
    }

    /// `Registered` arrived: start keepalives and the UDP bind.
    pub fn on_registered(
        &mut self,
        now: Instant,
        udp_token: [u8; 16],
        keepalive_secs: u16,
        stun_alternate: Option<SocketAddr>,
        udp_out: &mut Vec<Vec<u8>>,
    ) -> bool {
        if !matches!(self.state, State::AwaitRegistered { .. }) {
            return false;
        }
        self.state = State::Registered;
        self.backoff = Duration::ZERO;
        self.keepalive = Duration::from_secs(u64::from(keepalive_secs.clamp(5, 120)));
        self.next_ping = Some(now + self.keepalive);
        self.udp_token = Some(udp_token);
        self.stun_alternate = stun_alternate;
        self.bind_rto = BIND_RTO;
        self.send_bind(now, udp_out);
        self.sync_transport(now);
        true
    }

    /// A UDP control message from the relay.
    pub fn on_udp(&mut self, now: Instant, msg: UdpMsg) -> UdpOutcome {
        match msg {
            UdpMsg::Bound { seq, observed } if self.udp_token.is_some() => {
                if let Some((s, at)) = self.bind_sent_at
                    && s == seq
                {
                    self.rtt = Some(now.saturating_duration_since(at));
                }
                self.last_bound = Some(now);
                self.next_bind = Some(now + BIND_KEEPALIVE);
                self.bind_rto = BIND_RTO;
                self.sync_transport(now);
                let changed = self.udp_observed != Some(observed);
                self.udp_observed = Some(observed);
                if changed {
                    UdpOutcome::Observed(observed)
                } else {
                    UdpOutcome::Nothing
                }
            }
            UdpMsg::BindRejected { seq } if seq == self.bind_seq && self.is_registered() => {
                UdpOutcome::Rejected
            }
            _ => UdpOutcome::Nothing,
        }
    }

    /// Forces the session down (e.g. the relay rejected our UDP token: it restarted).
    pub fn reset(&mut self, now: Instant, rng: &mut ChaCha20Rng, actions: &mut Vec<SessionAction>) {
        self.fail(now, rng, actions);
    }
}

/// What a UDP message from the relay meant.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UdpOutcome {
    /// Nothing to do.
    Nothing,
    /// Our reflexive address (as the relay sees it) is new.
    Observed(SocketAddr),
    /// The relay does not know our token.
    Rejected,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn addr() -> SocketAddr {
        "203.0.113.1:3478".parse().unwrap()
    }

    fn server_frame(msg: &ServerMsg) -> Vec<u8> {
        let mut v = Vec::new();
        frame::encode(&control::to_vec(msg).unwrap(), &mut v).unwrap();
        v
    }

    #[test]
    fn handshake_then_reconnect_with_backoff() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut s = RelaySession::new(t0, addr(), addr());
        let mut actions = Vec::new();
        let mut udp = Vec::new();
        s.on_timeout(t0, &mut rng, &mut actions, &mut udp);
        assert_eq!(actions, vec![SessionAction::Connect(addr())]);
        s.on_connected(t0);
        assert_eq!(s.outgoing(), &frame::PREAMBLE);
        let mut inc = Vec::new();
        let challenge = server_frame(&ServerMsg::Challenge {
            nonce: [1; 32],
            token_required: false,
        });
        // Split delivery must work.
        s.on_tcp_data(t0, &challenge[..3], &mut rng, &mut actions, &mut inc);
        s.on_tcp_data(t0, &challenge[3..], &mut rng, &mut actions, &mut inc);
        assert!(matches!(
            inc[0],
            Incoming::Control(ServerMsg::Challenge { .. })
        ));
        assert!(s.on_challenge(t0));
        assert!(s.on_registered(t0, [2; 16], 15, None, &mut udp));
        assert_eq!(udp.len(), 1, "bind sent at once");
        assert!(!s.udp_works(t0));
        s.on_closed(t0, &mut rng, &mut actions);
        assert!(actions.contains(&SessionAction::Lost));
        let retry = s.poll_timeout().unwrap();
        assert!(retry > t0 && retry <= t0 + BACKOFF_MIN);
    }

    #[test]
    fn garbage_from_relay_closes_session() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut s = RelaySession::new(t0, addr(), addr());
        let mut actions = Vec::new();
        s.on_timeout(t0, &mut rng, &mut actions, &mut Vec::new());
        s.on_connected(t0);
        actions.clear();
        let mut bad = Vec::new();
        frame::encode(&[0x22, 1, 0xff, 0xff], &mut bad).unwrap();
        s.on_tcp_data(t0, &bad, &mut rng, &mut actions, &mut Vec::new());
        assert_eq!(actions, vec![SessionAction::Close]);
    }
}
