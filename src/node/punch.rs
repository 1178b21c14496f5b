//! Hole punching and the direct path to one peer.
//!
//! # Punching
//! On an introduction both nodes send authenticated probes ([`crate::wire::punch`], keyed by
//! the introduction's nonce) to every candidate of the other, at the same moment (both
//! introductions leave the relay together). Sending first opens our NAT toward the peer, so
//! the peer's probe that arrives a moment later passes our filter: simultaneous open.
//! Starting at once matters beyond speed: on a bare Linux masquerade an unsolicited probe
//! that arrives *before* our own first outbound packet creates a conntrack entry that makes
//! our later mapping toward that peer pick another port (see DESIGN.md).
//!
//! * Pacing: the first round goes out back to back (up to 16 candidates), so that every
//!   mapping toward the peer exists before the peer's first probe can arrive; later rounds
//!   send one probe every [`PunchConfig::pace`] (ICE's Ta = 50 ms, RFC 8445 section 14.2).
//! * Rounds: the candidate list is probed again after 200 ms, then doubling up to 1 s,
//!   until [`PunchConfig::punch_duration`]. Loss of 20 % still lets one of ~13 rounds
//!   through with near certainty.
//! * Answer: every authenticated probe gets an `Ack` carrying the address it came from, on
//!   the socket it arrived on. A probe from an address we did not know is a peer-reflexive
//!   candidate (RFC 8445 section 7.3.1.3): we add it and send a triggered probe at once
//!   (section 7.3.1.4); this is what lets an easy NAT reach a symmetric one.
//! * Confirmation: an `Ack` to one of our probes is a full round trip, so that address
//!   becomes the direct path. A later `Ack` from a better candidate kind (host/LAN over
//!   reflexive) replaces it. Probes carry the sender's role; a node drops packets with its
//!   own role, so reflected probes (hairpin, misrouted) never confirm a path.
//! * Prediction: a peer reporting endpoint-dependent mapping with sequential port
//!   allocation gets predicted candidates at the next few ports after its reflexive one.
//! * Failure: after `punch_duration` without an ack, traffic stays relayed and punching
//!   restarts after a backoff (30 s doubling to 2 min, plus up to 25 % jitter). The
//!   initiator restarts it by asking the relay for a fresh introduction, so both sides
//!   start together again (an unsynchronised retry is exactly what provokes the conntrack
//!   clash); the responder waits for that introduction. The first gap is 30 s because a
//!   clash entry left by the failed attempt lives 30 s after the peer's last probe on a
//!   Linux router: retrying sooner would run into it again.
//!
//! # Keepalive and liveness
//! The direct path carries a `Ping` every [`PunchConfig::keepalive`] (default 15 s) when
//! idle: RFC 8445 section 11 says at most 15 s, and it keeps two refreshes inside the 30 s
//! unreplied-UDP timeout of Linux conntrack and of many home routers. While data is flowing
//! and nothing came back for [`PunchConfig::heartbeat`] (3 s, Tailscale's heartbeat), a
//! ping is sent at once. An unanswered ping is retried every second; after
//! [`PunchConfig::path_timeout`] (6.5 s, Tailscale's trust window) with no authenticated
//! packet from the path, it is declared dead: traffic returns to the relay and punching
//! restarts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngExt;
use rand_chacha::ChaCha20Rng;
use tracing::{debug, trace};

use super::Transmit;
use super::peer::IntroKeys;
use super::spray::{self, PlanInputs, SocketOp, Spray, SprayConfig};
use crate::wire::control::{
    Candidate, CandidateKind, MappingBehavior, NatReport, PortAllocation, Role,
};
use crate::wire::punch::{self, PunchPacket, PunchType};

/// Punching and keepalive parameters (see the module docs for the reasoning).
#[derive(Debug, Clone)]
pub struct PunchConfig {
    /// Gap between two probes (ICE Ta).
    pub pace: Duration,
    /// How long one punching attempt lasts before falling back to the relay.
    pub punch_duration: Duration,
    /// Idle keepalive interval on the direct path; `None` disables keepalives (tests).
    pub keepalive: Option<Duration>,
    /// While sending, ping when nothing was received for this long.
    pub heartbeat: Duration,
    /// A direct path with an unanswered ping this long is dead.
    pub path_timeout: Duration,
    /// First retry delay after a failed attempt (doubles up to `retry_max`); at least the
    /// 30 s a conntrack clash entry outlives the peer's last probe.
    pub retry_min: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// Hard-NAT punching (many sockets / many ports, see [`SprayConfig`]).
    pub spray: SprayConfig,
}

impl Default for PunchConfig {
    fn default() -> Self {
        PunchConfig {
            pace: Duration::from_millis(50),
            punch_duration: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(15)),
            heartbeat: Duration::from_secs(3),
            path_timeout: Duration::from_millis(6500),
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(120),
            spray: SprayConfig::default(),
        }
    }
}

/// How a candidate was learned; the order is the preference for the direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum CandSource {
    /// A probe arrived from it.
    PeerReflexive,
    /// Guessed from sequential allocation.
    Predicted,
    /// Seen by the relay / a STUN server.
    Reflexive,
    /// From the router (NAT-PMP, PCP, UPnP).
    Mapped,
    /// One of the peer's interface addresses (same LAN: best).
    Host,
}

impl From<CandidateKind> for CandSource {
    fn from(k: CandidateKind) -> Self {
        match k {
            CandidateKind::Host => CandSource::Host,
            CandidateKind::ServerReflexive => CandSource::Reflexive,
            CandidateKind::PortMapped => CandSource::Mapped,
            CandidateKind::Predicted => CandSource::Predicted,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cand {
    addr: SocketAddr,
    source: CandSource,
}

#[derive(Debug, Clone, Copy)]
struct Probing {
    started: Instant,
    next_send: Instant,
    next_index: usize,
    round: u32,
    round_start: Instant,
}

/// A confirmed direct path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct {
    /// Our socket it was confirmed on (`None`: the driver's default socket).
    pub local: Option<SocketAddr>,
    /// The peer's address.
    pub remote: SocketAddr,
    source: CandSource,
    last_rx: Instant,
    next_keepalive: Option<Instant>,
    ping_outstanding_since: Option<Instant>,
    next_ping_retx: Option<Instant>,
}

/// What changed about the direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathUpdate {
    /// A (new) direct path is confirmed.
    Direct(SocketAddr),
    /// The direct path died (or punching failed): traffic goes via the relay.
    Lost,
    /// A failed attempt's backoff is over: time to punch again.
    RetryDue,
}

/// Failed sweeps retried at once (each with fresh ports) before the normal backoff.
const MAX_QUICK_SWEEPS: u32 = 4;

/// Candidates probed back to back (unpaced) in the first round.
const FIRST_ROUND_BURST: usize = 16;
/// Most outstanding probe/ping transaction IDs remembered.
const MAX_OUTSTANDING: usize = 128;
/// Most candidates kept per peer.
const MAX_CANDS: usize = 48;
/// How many ports past the reflexive one are predicted for sequential allocators.
const PREDICTED_PORTS: i32 = 8;

/// Punching and direct-path state for one peer.
#[derive(Debug, Default)]
pub(crate) struct PunchState {
    cands: Vec<Cand>,
    probing: Option<Probing>,
    retry_at: Option<Instant>,
    backoff: Duration,
    direct: Option<Direct>,
    outstanding: Vec<u64>,
    /// When the current punching attempt started (for time-to-direct).
    pub attempt_started: Option<Instant>,
    /// Attempts since the last direct path (the current one included).
    attempts: u32,
    /// This attempt ends after `spray.escalate_after` and is retried at once (as a sweep).
    escalate: bool,
    /// Failed sweeps since the last direct path (the first few are retried at once).
    sweeps: u32,
    /// The current or last hard-NAT attempt.
    spray: Option<Spray>,
    /// Spray sockets kept open for the direct path (ours and the one the peer chose).
    kept_sockets: Vec<SocketAddr>,
    /// Socket requests for the driver.
    ops: Vec<SocketOp>,
}

fn send(
    keys: &IntroKeys,
    kind: PunchType,
    txid: u64,
    observed: Option<SocketAddr>,
    source: Option<SocketAddr>,
    destination: SocketAddr,
    out: &mut Vec<Transmit>,
) {
    let pkt = PunchPacket {
        kind,
        from_responder: keys.role == Role::Responder,
        tag: keys.tag,
        txid,
        observed,
    };
    let mut buf = vec![0; punch::PACKET_LEN];
    if punch::encode(&keys.nonce, &pkt, &mut buf).is_ok() {
        out.push(Transmit {
            source,
            destination,
            segment_size: None,
            contents: buf,
        });
    }
}

/// Encodes a punch packet for sending over any path (also used for relayed pings).
pub(crate) fn encode_packet(
    keys: &IntroKeys,
    kind: PunchType,
    txid: u64,
    observed: Option<SocketAddr>,
) -> Vec<u8> {
    let pkt = PunchPacket {
        kind,
        from_responder: keys.role == Role::Responder,
        tag: keys.tag,
        txid,
        observed,
    };
    let mut buf = vec![0; punch::PACKET_LEN];
    let _ = punch::encode(&keys.nonce, &pkt, &mut buf);
    buf
}

impl PunchState {
    /// The confirmed direct path, if any.
    pub fn direct(&self) -> Option<&Direct> {
        self.direct.as_ref()
    }

    /// Whether an attempt is running.
    #[cfg(test)]
    pub fn is_probing(&self) -> bool {
        self.probing.is_some()
    }

    /// Installs the peer's candidates from an introduction and starts punching (unless a
    /// direct path already works).
    pub fn start(
        &mut self,
        now: Instant,
        cands: &[Candidate],
        peer_nat: NatReport,
        local_families: (bool, bool),
    ) {
        self.cands.clear();
        for c in cands {
            self.add_cand(c.addr, c.kind.into(), local_families);
        }
        if peer_nat.mapping == MappingBehavior::EndpointDependent
            && let PortAllocation::Sequential(step) = peer_nat.allocation
            && step != 0
            && let Some(refl) = cands
                .iter()
                .find(|c| c.kind == CandidateKind::ServerReflexive)
        {
            for k in 1..=PREDICTED_PORTS {
                let port = refl.addr.port() as i32 + step * k;
                if (1..=65535).contains(&port) {
                    let mut a = refl.addr;
                    a.set_port(port as u16);
                    self.add_cand(a, CandSource::Predicted, local_families);
                }
            }
        }
        self.backoff = Duration::ZERO;
        if self.direct.is_none() {
            self.begin(now);
        }
    }

    fn add_cand(&mut self, addr: SocketAddr, source: CandSource, fam: (bool, bool)) -> bool {
        let ok_family = if addr.is_ipv4() { fam.0 } else { fam.1 };
        if !ok_family || addr.port() == 0 || addr.ip().is_unspecified() {
            return false;
        }
        if self.cands.iter().any(|c| c.addr == addr) || self.cands.len() >= MAX_CANDS {
            return false;
        }
        self.cands.push(Cand { addr, source });
        true
    }

    fn begin(&mut self, now: Instant) {
        if self.cands.is_empty() {
            return;
        }
        self.retry_at = None;
        self.attempt_started = Some(now);
        self.attempts = self.attempts.saturating_add(1);
        self.escalate = false;
        self.probing = Some(Probing {
            started: now,
            next_send: now,
            next_index: 0,
            round: 0,
            round_start: now,
        });
    }

    /// Starts a new attempt now with the known candidates (retry without a relay).
    pub fn restart(&mut self, now: Instant) {
        if self.direct.is_none() {
            self.begin(now);
        }
    }

    /// Drops the direct path without waiting for it to time out: a new introduction (a new
    /// punch nonce) means the peer started a new session, possibly from another socket, and
    /// the old path can no longer be authenticated.
    pub fn forget_direct(&mut self) -> bool {
        let had = self.direct.take().is_some();
        self.release_kept_sockets();
        had
    }

    /// Stops everything (peer gone for good).
    pub fn stop(&mut self) {
        self.probing = None;
        self.retry_at = None;
        if let Some(s) = self.spray.as_mut() {
            s.finish();
        }
        if self.direct.is_none() {
            self.release_kept_sockets();
        }
    }

    fn release_kept_sockets(&mut self) {
        if let Some(s) = self.spray.as_mut() {
            // Still settling: close them all now.
            s.finish();
            self.ops.extend(s.take_ops());
        }
        if !self.kept_sockets.is_empty() {
            self.ops
                .push(SocketOp::Close(std::mem::take(&mut self.kept_sockets)));
        }
    }

    /// A QUIC datagram from the peer arrived on `local`: a spray socket the peer sends data
    /// to (its chosen path) must outlive the settling. (Probes and acks do not count: after
    /// a sweep every pair may carry some.)
    pub fn note_data(&mut self, local: Option<SocketAddr>) {
        if let (Some(s), Some(l)) = (self.spray.as_mut(), local) {
            s.note_heard(l);
        }
    }

    /// An authenticated ping from the peer arrived on `local` from `from`: the peer's
    /// direct path. After a spray the two sides may have confirmed different port pairs
    /// (each takes the first ack it gets); the prober, which has one socket, follows the
    /// peer's choice when it differs only in the port, so both use one pair and the
    /// opener's other sockets can close.
    pub fn on_peer_ping(
        &mut self,
        now: Instant,
        local: Option<SocketAddr>,
        from: SocketAddr,
    ) -> Option<PathUpdate> {
        let s = self.spray.as_mut()?;
        if let Some(l) = local {
            s.note_heard(l);
        }
        let d = self.direct.as_mut()?;
        if d.remote == from || d.remote.ip() != from.ip() || d.local != local {
            return None;
        }
        debug!(old = %d.remote, new = %from, "following the peer's choice of direct path");
        d.remote = from;
        d.last_rx = now;
        Some(PathUpdate::Direct(from))
    }

    /// Attempts since the last direct path, the current one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Decides on a hard-NAT attempt for a new introduction (after [`PunchState::start`]).
    /// Two port-preserving EIM NATs that get no hard-NAT attempt yet have their plain
    /// attempt shortened: if it fails, the retry is a sweep.
    pub fn plan_spray(
        &mut self,
        now: Instant,
        cfg: &PunchConfig,
        inputs: PlanInputs<'_>,
        rng: &mut ChaCha20Rng,
    ) {
        if let Some(old) = self.spray.as_mut() {
            old.finish();
            self.ops.extend(old.take_ops());
        }
        if self.direct.is_some() {
            self.spray = None;
            return;
        }
        self.spray = spray::plan(now, &cfg.spray, inputs, rng);
        self.escalate = self.spray.is_none()
            && cfg.spray.enabled
            && self.probing.is_some()
            && spray::sweep_candidate(&inputs.ours, &inputs.peer);
        if let Some(s) = self.spray.as_mut() {
            self.ops.extend(s.take_ops());
        }
    }

    /// Whether a hard-NAT attempt is running (not finished or settled).
    pub fn spray_active(&self) -> bool {
        self.spray.as_ref().is_some_and(|s| !s.is_done())
    }

    /// Socket requests for the driver, oldest first.
    pub fn take_socket_ops(&mut self) -> Vec<SocketOp> {
        let mut ops = std::mem::take(&mut self.ops);
        if let Some(s) = self.spray.as_mut() {
            ops.extend(s.take_ops());
        }
        ops
    }

    /// The driver opened the sockets of our spray request.
    pub fn on_sockets_opened(
        &mut self,
        now: Instant,
        keys: &IntroKeys,
        locals: &[SocketAddr],
        out: &mut Vec<Transmit>,
    ) {
        match self.spray.as_mut() {
            Some(s) => s.on_sockets_opened(now, keys, locals, out),
            None => self.ops.push(SocketOp::Close(locals.to_vec())),
        }
    }

    /// Punch packets the spray wants sent over the relay (type, txid), to go out before
    /// the transmits of the same call.
    pub fn take_relayed(&mut self) -> Vec<(PunchType, u64)> {
        self.spray
            .as_mut()
            .map(|s| s.take_relayed())
            .unwrap_or_default()
    }

    /// A pong (over any path) for one of our txids.
    pub fn on_pong(&mut self, now: Instant, txid: u64) {
        if let Some(s) = self.spray.as_mut() {
            s.on_pong(now, txid);
        }
    }

    /// The peer's spray sockets are open; start after `delay_us`.
    pub fn on_ready(&mut self, now: Instant, delay_us: u64) {
        if let Some(s) = self.spray.as_mut() {
            s.on_ready(now, delay_us);
        }
    }

    /// A timer the driver should meet to the microsecond (a sweep burst), if any.
    pub fn precise_deadline(&self) -> Option<Instant> {
        self.spray.as_ref().and_then(|s| s.precise_deadline())
    }

    /// The earliest instant this state wants [`PunchState::on_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = [
            self.probing.map(|p| p.next_send),
            self.retry_at,
            self.direct.and_then(|d| d.next_keepalive),
            self.direct.and_then(|d| d.next_ping_retx),
            self.spray.as_ref().and_then(|s| s.poll_timeout()),
        ];
        t.sort();
        t.into_iter().flatten().next()
    }

    fn new_txid(&mut self, rng: &mut ChaCha20Rng) -> u64 {
        let txid: u64 = rng.random();
        if self.outstanding.len() >= MAX_OUTSTANDING {
            self.outstanding.remove(0);
        }
        self.outstanding.push(txid);
        txid
    }

    /// Runs due timers. Returns a path update when the direct path died.
    pub fn on_timeout(
        &mut self,
        now: Instant,
        keys: &IntroKeys,
        cfg: &PunchConfig,
        rng: &mut ChaCha20Rng,
        out: &mut Vec<Transmit>,
    ) -> Option<PathUpdate> {
        let mut update = None;
        if let Some(d) = self.direct {
            if let Some(since) = d.ping_outstanding_since
                && now.saturating_duration_since(since) >= cfg.path_timeout
            {
                debug!(remote = %d.remote, "direct path dead: no answer");
                self.direct = None;
                self.release_kept_sockets();
                update = Some(PathUpdate::Lost);
                self.backoff = Duration::ZERO;
                self.begin(now);
            } else {
                let due_keepalive = d.next_keepalive.is_some_and(|t| t <= now);
                let due_retx = d.next_ping_retx.is_some_and(|t| t <= now);
                if due_keepalive || due_retx {
                    self.send_ping(now, keys, cfg, rng, out);
                }
            }
        }
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            if self.direct.is_none() {
                // The node core decides how: a fresh introduction (both sides start
                // together) or, without a relay, a local restart via `restart`.
                return Some(PathUpdate::RetryDue);
            }
        }
        if let Some(s) = self.spray.as_mut() {
            s.on_timeout(now, keys, &cfg.spray, out);
            self.ops.extend(s.take_ops());
            let kept = s.take_kept();
            if self.direct.is_some() {
                self.kept_sockets.extend(kept);
            } else if !kept.is_empty() {
                self.ops.push(SocketOp::Close(kept));
            }
        }
        // Bounded: at most one round's worth of probes per call.
        let mut budget = self.cands.len() + 1;
        while let Some(mut p) = self.probing {
            if p.next_send > now || budget == 0 {
                break;
            }
            budget -= 1;
            let sweeping = self
                .spray
                .as_ref()
                .is_some_and(|s| s.technique() == spray::Technique::Sweep);
            // A sweep succeeds within a round trip of its burst or not at all.
            let duration = if self.escalate || sweeping {
                cfg.spray.escalate_after
            } else {
                cfg.punch_duration
            };
            if now.saturating_duration_since(p.started) >= duration {
                self.probing = None;
                if self.direct.is_none()
                    && (self.escalate || (sweeping && self.sweeps < MAX_QUICK_SWEEPS))
                {
                    // Fresh port pairs do not meet the old clash entries: retry at once.
                    self.escalate = false;
                    self.sweeps += u32::from(sweeping);
                    self.retry_at = Some(now);
                    debug!(
                        sweeps = self.sweeps,
                        "punching between two EIM NATs failed; retrying as a sweep"
                    );
                } else if self.direct.is_none() {
                    self.backoff = (self.backoff * 2).clamp(cfg.retry_min, cfg.retry_max);
                    let jitter = rng.random_range(0..=self.backoff.as_millis() as u64 / 4);
                    self.retry_at = Some(now + self.backoff + Duration::from_millis(jitter));
                    debug!(retry_in = ?self.backoff, "punching failed; staying on relay");
                }
                break;
            }
            if let Some(c) = self.cands.get(p.next_index).copied() {
                let txid = self.new_txid(rng);
                trace!(to = %c.addr, round = p.round, "punch probe");
                send(keys, PunchType::Probe, txid, None, None, c.addr, out);
            }
            p.next_index += 1;
            if p.next_index >= self.cands.len() {
                p.next_index = 0;
                let interval = Duration::from_millis(200 << p.round.min(3))
                    .min(Duration::from_secs(1))
                    .max(cfg.pace * self.cands.len() as u32);
                p.round += 1;
                p.round_start += interval;
                p.next_send = p.round_start.max(now);
            } else if p.round == 0 && p.next_index < FIRST_ROUND_BURST {
                // The first round goes out at once: every mapping toward the peer must exist
                // before the peer's first probe can arrive (one one-way delay later), or a
                // bare masquerade NAT turns that early probe into a conntrack clash.
                p.next_send = now;
            } else {
                p.next_send = now + cfg.pace;
            }
            self.probing = Some(p);
        }
        update
    }

    fn send_ping(
        &mut self,
        now: Instant,
        keys: &IntroKeys,
        cfg: &PunchConfig,
        rng: &mut ChaCha20Rng,
        out: &mut Vec<Transmit>,
    ) {
        let txid = self.new_txid(rng);
        let Some(d) = self.direct.as_mut() else {
            return;
        };
        trace!(to = %d.remote, local = ?d.local, "path ping");
        send(keys, PunchType::Ping, txid, None, d.local, d.remote, out);
        d.ping_outstanding_since.get_or_insert(now);
        d.next_ping_retx = Some(now + Duration::from_secs(1));
        d.next_keepalive = cfg.keepalive.map(|k| now + k);
    }

    /// The application sent data on the direct path: if the path has been silent for a
    /// heartbeat, check it now rather than at the next keepalive.
    pub fn note_sent(&mut self, now: Instant, cfg: &PunchConfig) {
        if let Some(d) = self.direct.as_mut()
            && d.ping_outstanding_since.is_none()
            && now.saturating_duration_since(d.last_rx) >= cfg.heartbeat
        {
            d.next_keepalive = Some(now);
        }
    }

    /// Something authenticated (or QUIC) arrived from `from`: proof the path is alive.
    pub fn note_received(&mut self, now: Instant, from: SocketAddr, cfg: &PunchConfig) {
        if let Some(d) = self.direct.as_mut()
            && d.remote == from
        {
            d.last_rx = now;
            if d.ping_outstanding_since.take().is_some() {
                d.next_ping_retx = None;
                d.next_keepalive = cfg.keepalive.map(|k| now + k);
            }
        }
    }

    /// An authenticated probe arrived on `local` from `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_probe(
        &mut self,
        now: Instant,
        keys: &IntroKeys,
        local: Option<SocketAddr>,
        from: SocketAddr,
        txid: u64,
        rng: &mut ChaCha20Rng,
        fam: (bool, bool),
        out: &mut Vec<Transmit>,
    ) {
        send(keys, PunchType::Ack, txid, Some(from), local, from, out);
        let known = self.cands.iter().any(|c| c.addr == from);
        if !known {
            debug!(%from, "peer-reflexive candidate");
            self.add_cand(from, CandSource::PeerReflexive, fam);
        }
        let better = match self.direct {
            None => true,
            Some(d) => d.remote != from && self.source_of(from) > d.source,
        };
        if better {
            // Triggered check (RFC 8445 section 7.3.1.4).
            let t = self.new_txid(rng);
            send(keys, PunchType::Probe, t, None, local, from, out);
            if self.direct.is_none() && self.probing.is_none() {
                self.begin(now);
            }
        }
    }

    fn source_of(&self, addr: SocketAddr) -> CandSource {
        self.cands
            .iter()
            .find(|c| c.addr == addr)
            .map_or(CandSource::PeerReflexive, |c| c.source)
    }

    /// An authenticated ack to one of our probes: the round trip confirms the path.
    pub fn on_ack(
        &mut self,
        now: Instant,
        local: Option<SocketAddr>,
        from: SocketAddr,
        txid: u64,
        cfg: &PunchConfig,
    ) -> Option<PathUpdate> {
        let spray_probe = self.spray.as_ref().is_some_and(|s| s.owns(txid));
        if !self.outstanding.contains(&txid) && !spray_probe {
            trace!(%from, "ack for an unknown probe");
            return None;
        }
        let source = self.source_of(from);
        if let Some(d) = self.direct.as_mut() {
            if d.remote == from {
                d.last_rx = now;
                return None;
            }
            if source <= d.source {
                return None;
            }
        }
        debug!(%from, ?source, ?local, "direct path confirmed");
        if let Some(s) = self.spray.as_mut() {
            s.succeed(now, local);
        }
        self.attempts = 0;
        self.escalate = false;
        self.sweeps = 0;
        self.direct = Some(Direct {
            local,
            remote: from,
            source,
            last_rx: now,
            // A ping at once tells the peer which of its addresses we chose (it accepts
            // data only from addresses that sent it something authenticated, and after a
            // spray of probes the one we use may have been pushed out of that list).
            next_keepalive: cfg.keepalive.map(|_| now),
            ping_outstanding_since: None,
            next_ping_retx: None,
        });
        // Keep probing better candidate kinds only while some are left untried this round;
        // simplest and good enough: stop once a path exists.
        self.probing = None;
        self.retry_at = None;
        self.backoff = Duration::ZERO;
        Some(PathUpdate::Direct(from))
    }

    /// Whether `txid` is one of ours (for pongs on any path).
    pub fn owns(&self, txid: u64) -> bool {
        self.outstanding.contains(&txid) || self.spray.as_ref().is_some_and(|s| s.owns(txid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn keys(role: Role) -> IntroKeys {
        IntroKeys {
            channel: crate::wire::relay_data::ChannelId(1),
            nonce: [3; 32],
            tag: punch::tag(&[3; 32]),
            role,
        }
    }

    fn cand(s: &str, kind: CandidateKind) -> Candidate {
        Candidate {
            addr: s.parse().unwrap(),
            kind,
        }
    }

    #[test]
    fn probes_are_paced_and_round_trip_confirms() {
        let t0 = Instant::now();
        let cfg = PunchConfig::default();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let k = keys(Role::Initiator);
        let mut p = PunchState::default();
        p.start(
            t0,
            &[
                cand("198.51.100.1:4000", CandidateKind::ServerReflexive),
                cand("10.0.0.2:4000", CandidateKind::Host),
            ],
            NatReport::default(),
            (true, false),
        );
        let mut out = Vec::new();
        assert_eq!(p.on_timeout(t0, &k, &cfg, &mut rng, &mut out), None);
        assert_eq!(out.len(), 2, "first round in one burst");
        let second_round = p.poll_timeout().unwrap();
        assert_eq!(second_round, t0 + Duration::from_millis(200));
        p.on_timeout(second_round, &k, &cfg, &mut rng, &mut out);
        assert_eq!(out.len(), 3, "later rounds paced");
        assert_eq!(p.poll_timeout(), Some(second_round + cfg.pace));
        // Answer the first probe as the peer would.
        let probe = punch::decode(&k.nonce, &out[0].contents).unwrap();
        let upd = p.on_ack(t0, None, out[0].destination, probe.txid, &cfg);
        assert_eq!(upd, Some(PathUpdate::Direct(out[0].destination)));
        assert!(!p.is_probing());
        // An ack with an unknown txid confirms nothing.
        assert_eq!(p.on_ack(t0, None, out[1].destination, 42, &cfg), None);
    }

    #[test]
    fn unanswered_pings_kill_the_path_and_punching_restarts() {
        let t0 = Instant::now();
        let cfg = PunchConfig::default();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let k = keys(Role::Responder);
        let mut p = PunchState::default();
        p.start(
            t0,
            &[cand("198.51.100.1:4000", CandidateKind::ServerReflexive)],
            NatReport::default(),
            (true, false),
        );
        let mut out = Vec::new();
        p.on_timeout(t0, &k, &cfg, &mut rng, &mut out);
        let probe = punch::decode(&k.nonce, &out[0].contents).unwrap();
        p.on_ack(t0, None, out[0].destination, probe.txid, &cfg);
        let mut lost = None;
        for _ in 0..100 {
            let now = p.poll_timeout().unwrap();
            if let Some(u) = p.on_timeout(now, &k, &cfg, &mut rng, &mut out) {
                lost = Some((u, now));
                break;
            }
        }
        let (u, at) = lost.expect("path never declared dead");
        assert_eq!(u, PathUpdate::Lost);
        assert!(at >= t0 + cfg.path_timeout);
        assert!(p.is_probing(), "punching restarts after a path dies");
    }

    #[test]
    fn sequential_nat_gets_predicted_candidates() {
        let mut p = PunchState::default();
        let nat = NatReport {
            mapping: MappingBehavior::EndpointDependent,
            allocation: PortAllocation::Sequential(1),
            udp: true,
        };
        p.start(
            Instant::now(),
            &[cand("198.51.100.1:4000", CandidateKind::ServerReflexive)],
            nat,
            (true, false),
        );
        assert_eq!(p.cands.len(), 1 + PREDICTED_PORTS as usize);
        assert_eq!(p.cands[1].addr.port(), 4001);
    }
}
