//! Hard-NAT punching: many sockets on one side, many probed ports on the other.
//!
//! Plain punching ([`super::punch`]) needs each side to know the port its peer's NAT will
//! use toward it. Two cases break that, and both are solved by trying many port pairs at
//! once, bounded and only toward the peer's own public IP after an introduction:
//!
//! * **Birthday** (endpoint-dependent mapping on one side, endpoint-independent on the
//!   other): the hard side opens [`SprayConfig::sockets`] sockets (default 256) and sends
//!   one probe from each to the easy side's reflexive address, which gives each socket a
//!   random public port aimed at the easy side. The easy side then probes random ports of
//!   the hard side's public IP from its one socket, paced, up to [`SprayConfig::probes`]
//!   (default 2,048). With 256 of ~64,500 ports open, 1,024 probes hit with ≈ 98 % and
//!   2,048 with ≈ 99.97 % (Tailscale's "birthday" numbers: `1 - (1 - 256/64512)^n`).
//!   A NAT that allocates sequentially is probed around its last observed port first
//!   (prediction), then at random.
//! * **Sweep** (both sides bare Linux `masquerade`: endpoint-independent, port-preserving,
//!   no input firewall): whichever probe arrives at the peer's router *before* that
//!   router's own outbound packet to the same pair of ports leaves a conntrack entry that
//!   moves the later outbound to another port (the "conntrack clash", DESIGN.md), so a
//!   pair of ports works only if both first packets cross within one one-way delay. The
//!   relay's two introductions never arrive exactly together (their skew can exceed the
//!   one-way delay between the peers), so when plain punching between two such NATs fails
//!   within [`SprayConfig::escalate_after`], the retry is a synchronised start on 256 fresh
//!   port pairs: the responder opens sockets at ports derived from the introduction's
//!   nonce (no list is exchanged; port preservation makes them its public ports too),
//!   measures the relay round trip to the initiator with a relayed ping (DCUtR's
//!   synchronisation, libp2p), then sends `Ready` over the relay; both sides burst
//!   [`SWEEP_LEAD`] after `Ready` reaches the initiator, a deadline the driver meets by
//!   spinning rather than with its millisecond timer. The initiator sends from its one
//!   socket to the ports in list order, the responder one probe from each socket to the
//!   initiator's reflexive address, in the same groups of [`SWEEP_GROUP`] but each group
//!   backwards ([`sweep_order`]), so within every group the send-time difference of a pair
//!   runs through zero. Fresh ports meet none of the old clash entries, so a failed sweep
//!   is retried at once with a new nonce, a few times, before the normal backoff.
//!   Honest limits: over a real path (≥ 1 ms one way) a synchronised start makes most pairs
//!   cross in time; between two routers on one bridge (microseconds apart, as in a plain
//!   namespace lab) a pair crosses only if both first packets pass their routers within
//!   microseconds, and one burst wins perhaps one time in ten.
//!
//! The state machine here is sans-IO: it asks the driver for sockets
//! ([`SocketOp::Open`]), is told which opened ([`Spray::on_sockets_opened`]), emits
//! probes as [`Transmit`]s and returns the sockets it no longer needs
//! ([`SocketOp::Close`]). Acks and probes arriving on its sockets are handled by
//! [`super::punch::PunchState`] like any other; a spray probe's transaction ID lies in a
//! range the spray owns ([`Spray::owns`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::debug;

use super::Transmit;
use super::peer::IntroKeys;
use crate::wire::control::{
    Candidate, CandidateKind, MappingBehavior, NatReport, PortAllocation, Role,
};
use crate::wire::punch::{self, PunchPacket, PunchType};

/// Hard-NAT punching parameters.
#[derive(Debug, Clone)]
pub struct SprayConfig {
    /// Try hard-NAT techniques at all.
    pub enabled: bool,
    /// Sockets the hard side opens (birthday and sweep).
    pub sockets: usize,
    /// Most probes the easy side sends in one attempt.
    pub probes: usize,
    /// Birthday probes are sent in groups of `per_tick` every `tick`.
    pub tick: Duration,
    /// See `tick`.
    pub per_tick: usize,
    /// How long the sockets stay open and probes are answered.
    pub duration: Duration,
    /// The prober starts this long after the introduction even without the peer's `Ready`
    /// (lost, or the peer could not open sockets).
    pub ready_wait: Duration,
    /// Two bare port-preserving NATs: how long plain punching gets before the attempt is
    /// given up and retried at once as a sweep.
    pub escalate_after: Duration,
}

impl Default for SprayConfig {
    fn default() -> Self {
        SprayConfig {
            enabled: true,
            sockets: 256,
            probes: 2048,
            tick: Duration::from_millis(10),
            // 1,600 probes/s: 2,048 probes in 1.3 s, ≈ 150 KB/s of 90-byte packets.
            per_tick: 16,
            duration: Duration::from_secs(10),
            ready_wait: Duration::from_secs(1),
            escalate_after: Duration::from_secs(2),
        }
    }
}

/// Most spray sockets open at once across all peers (file descriptors are finite).
pub(crate) const MAX_SOCKETS_TOTAL: usize = 1024;

/// A request to the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketOp {
    /// Bind IPv4 UDP sockets at these ports (0: any) on the main socket's address.
    Open(Vec<u16>),
    /// Close these sockets.
    Close(Vec<SocketAddr>),
}

/// Which technique an attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Technique {
    /// Random ports against endpoint-dependent mapping (with prediction first).
    Birthday,
    /// Opposite-order bursts between two bare port-preserving NATs.
    Sweep,
}

#[derive(Debug)]
enum Side {
    /// We open the sockets and send one probe from each to `target`.
    Opener {
        requested: Vec<u16>,
        target: SocketAddr,
        sockets: Vec<SocketAddr>,
        /// Send from the last socket first (sweep).
        reverse: bool,
        opened: bool,
        /// Sweep: a relayed ping measures the relay round trip first (txid, sent at).
        sync_ping: Option<(u64, Instant)>,
        /// When the burst goes out (`None`: not scheduled yet, or sent).
        burst_at: Option<Instant>,
        burst_sent: bool,
    },
    /// We probe `ports` on `ip` from our main socket.
    Prober {
        ip: IpAddr,
        ports: Vec<u16>,
        next: usize,
        /// When probing starts (`Ready` or the fallback wait).
        start_at: Instant,
        /// All at once (sweep) or paced (birthday).
        burst: bool,
        next_send: Option<Instant>,
    },
}

/// One hard-NAT attempt toward one peer.
#[derive(Debug)]
pub(crate) struct Spray {
    technique: Technique,
    side: Side,
    deadline: Instant,
    txid_base: u64,
    sent: u64,
    ops: Vec<SocketOp>,
    /// Punch packets to send over the relay (`Ping` with its txid, `Ready`), before any
    /// probe queued in the same call.
    relayed: Vec<(PunchType, u64)>,
    /// After success: until when sockets are kept open to learn which one the peer chose,
    /// and the ones to keep.
    settle: Option<(Instant, Vec<SocketAddr>)>,
    /// Sockets kept for the direct path(s) once settled, for [`Spray::take_kept`].
    kept: Vec<SocketAddr>,
    /// Sweep prober: the synchronised burst start (see [`Spray::precise_deadline`]).
    precise: Option<Instant>,
    done: bool,
}

/// How long after `Ready` both sides of a sweep burst (see [`Spray::on_pong`]): enough for
/// the peer to receive and act on it, short against the attempt.
pub(crate) const SWEEP_LEAD: Duration = Duration::from_millis(3);

/// After a spray succeeds, how long its other sockets stay open. Each side picks its own
/// direct path (the first ack it gets) and pings on it at once; the peer's ping shows which
/// of our sockets it chose, and that one must stay open too, or its data would go into a
/// closed port.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// What [`plan`] needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlanInputs<'a> {
    /// Our NAT as netcheck measured it.
    pub ours: NatReport,
    /// The peer's, from the introduction.
    pub peer: NatReport,
    /// Our role in the introduction.
    pub role: Role,
    /// The peer's candidates, from the introduction.
    pub peer_candidates: &'a [Candidate],
    /// The introduction's punch nonce.
    pub nonce: &'a [u8; 32],
    /// Punching attempts toward this peer since the last direct path, this one included.
    pub attempts: u32,
}

fn easy(n: &NatReport) -> bool {
    n.udp && n.mapping == MappingBehavior::EndpointIndependent
}

fn hard(n: &NatReport) -> bool {
    n.udp && n.mapping == MappingBehavior::EndpointDependent
}

/// Both sides behind port-preserving endpoint-independent NATs: plain punching works
/// unless the routers are bare masquerades (conntrack clash), which a sweep retry fixes.
pub(crate) fn sweep_candidate(ours: &NatReport, peer: &NatReport) -> bool {
    easy(ours)
        && easy(peer)
        && ours.allocation == PortAllocation::Preserving
        && peer.allocation == PortAllocation::Preserving
}

/// The ports a sweep uses, derived from the introduction's nonce so both sides compute the
/// same list without exchanging it. Distinct, in 10000..=60999 (clear of well-known and
/// registered-low ports; binding one that is taken simply skips it).
pub(crate) fn sweep_ports(nonce: &[u8; 32], n: usize) -> Vec<u16> {
    let seed = blake3::derive_key("burrow sweep ports v1", nonce);
    let mut rng = ChaCha20Rng::from_seed(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n.min(50_000) {
        let p: u16 = rng.random_range(10_000..=60_999);
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// Pairs per sweep group (see [`sweep_order`]).
pub(crate) const SWEEP_GROUP: usize = 16;

/// The opener's send order in a sweep. The prober sends to the port list in order; the
/// opener sends the same groups of [`SWEEP_GROUP`] pairs in the same order, but each group
/// backwards. Within a group the send-time difference of a pair then runs through zero
/// (one side's early pairs are the other's late ones), so every group whose time span
/// overlaps the peer's gives one crossing: 16 chances per burst rather than one. A pair
/// crosses in time only if the two first packets pass their routers within the one-way
/// delay, which in a namespace lab is a few microseconds against ~10 µs between pairs:
/// one crossing succeeds perhaps one time in five, sixteen nearly always. Sockets are
/// grouped by their port's index in the list, so ports that could not be bound do not
/// shift the groups against the prober's.
pub(crate) fn sweep_order(ports: &[u16], sockets: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut indexed: Vec<(usize, SocketAddr)> = sockets
        .iter()
        .map(|s| {
            let i = ports
                .iter()
                .position(|&p| p == s.port())
                .unwrap_or(usize::MAX);
            (i, *s)
        })
        .collect();
    indexed.sort_by_key(|&(i, _)| (i / SWEEP_GROUP, std::cmp::Reverse(i)));
    indexed.into_iter().map(|(_, s)| s).collect()
}

/// Birthday probe order: for a sequential allocator, the ports right after its observed one
/// (where its new sockets' mappings land), then random distinct ports, `budget` in all.
fn birthday_ports(
    observed: u16,
    allocation: PortAllocation,
    sockets: usize,
    budget: usize,
    rng: &mut ChaCha20Rng,
) -> Vec<u16> {
    let mut seen = HashSet::with_capacity(budget);
    let mut out = Vec::with_capacity(budget);
    if let PortAllocation::Sequential(step) = allocation
        && step != 0
    {
        // Room for the peer's sockets plus a little traffic of others in between.
        let window = sockets as i32 + sockets as i32 / 4 + 16;
        for k in 1..=window {
            let p = observed as i32 + step * k;
            if (1024..=65535).contains(&p) && out.len() < budget && seen.insert(p as u16) {
                out.push(p as u16);
            }
        }
    }
    let mut guard = 0;
    while out.len() < budget && guard < budget * 64 {
        guard += 1;
        let p: u16 = rng.random_range(1024..=65535);
        if p != observed && seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// Decides whether this introduction gets a hard-NAT attempt, and which side we are.
pub(crate) fn plan(
    now: Instant,
    cfg: &SprayConfig,
    inputs: PlanInputs<'_>,
    rng: &mut ChaCha20Rng,
) -> Option<Spray> {
    if !cfg.enabled || cfg.sockets == 0 {
        return None;
    }
    let peer_reflexive = inputs
        .peer_candidates
        .iter()
        .find(|c| c.kind == CandidateKind::ServerReflexive && c.addr.is_ipv4())?
        .addr;
    let (technique, side) = if hard(&inputs.ours) && easy(&inputs.peer) {
        (
            Technique::Birthday,
            Side::Opener {
                requested: vec![0; cfg.sockets],
                target: peer_reflexive,
                sockets: Vec::new(),
                reverse: false,
                opened: false,
                sync_ping: None,
                burst_at: None,
                burst_sent: false,
            },
        )
    } else if easy(&inputs.ours) && hard(&inputs.peer) {
        (
            Technique::Birthday,
            Side::Prober {
                ip: peer_reflexive.ip(),
                ports: birthday_ports(
                    peer_reflexive.port(),
                    inputs.peer.allocation,
                    cfg.sockets,
                    cfg.probes,
                    rng,
                ),
                next: 0,
                start_at: now + cfg.ready_wait,
                burst: false,
                next_send: None,
            },
        )
    } else if sweep_candidate(&inputs.ours, &inputs.peer) && inputs.attempts >= 2 {
        let ports = sweep_ports(inputs.nonce, cfg.sockets.min(cfg.probes));
        match inputs.role {
            Role::Responder => (
                Technique::Sweep,
                Side::Opener {
                    requested: ports,
                    target: peer_reflexive,
                    sockets: Vec::new(),
                    reverse: true,
                    opened: false,
                    sync_ping: None,
                    burst_at: None,
                    burst_sent: false,
                },
            ),
            Role::Initiator => (
                Technique::Sweep,
                Side::Prober {
                    ip: peer_reflexive.ip(),
                    ports,
                    next: 0,
                    start_at: now + cfg.ready_wait,
                    burst: true,
                    next_send: None,
                },
            ),
        }
    } else {
        return None;
    };
    let mut ops = Vec::new();
    if let Side::Opener { requested, .. } = &side {
        ops.push(SocketOp::Open(requested.clone()));
    }
    debug!(
        ?technique,
        opener = matches!(side, Side::Opener { .. }),
        "hard-NAT attempt"
    );
    Some(Spray {
        technique,
        side,
        deadline: now + cfg.duration,
        // The low 32 bits count probes; the high bits are random per attempt.
        txid_base: rng.random::<u64>() & !0xffff_ffff,
        sent: 0,
        ops,
        relayed: Vec::new(),
        settle: None,
        kept: Vec::new(),
        precise: None,
        done: false,
    })
}

impl Spray {
    /// The technique of this attempt.
    pub fn technique(&self) -> Technique {
        self.technique
    }

    /// Whether the attempt is over (success, deadline, or stopped).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Requests for the driver, oldest first.
    pub fn take_ops(&mut self) -> Vec<SocketOp> {
        std::mem::take(&mut self.ops)
    }

    /// Whether `txid` belongs to one of this attempt's probes.
    pub fn owns(&self, txid: u64) -> bool {
        txid.wrapping_sub(self.txid_base) < self.sent
    }

    /// Whether `local` is one of our sockets.
    pub fn has_socket(&self, local: SocketAddr) -> bool {
        matches!(&self.side, Side::Opener { sockets, .. } if sockets.contains(&local))
    }

    fn probe(
        &mut self,
        keys: &IntroKeys,
        source: Option<SocketAddr>,
        to: SocketAddr,
    ) -> Option<Transmit> {
        let pkt = PunchPacket {
            kind: PunchType::Probe,
            from_responder: keys.role == Role::Responder,
            tag: keys.tag,
            txid: self.txid_base.wrapping_add(self.sent),
            observed: None,
        };
        let mut buf = vec![0; punch::PACKET_LEN];
        punch::encode(&keys.nonce, &pkt, &mut buf).ok()?;
        self.sent += 1;
        Some(Transmit {
            source,
            destination: to,
            segment_size: None,
            contents: buf,
        })
    }

    /// Relayed punch packets to send before the probes queued in the same call.
    pub fn take_relayed(&mut self) -> Vec<(PunchType, u64)> {
        std::mem::take(&mut self.relayed)
    }

    /// The driver opened `locals` (in the order asked, failures left out). A birthday
    /// opener sends `Ready` and its burst at once. A sweep opener first measures the relay
    /// round trip to the peer with a relayed ping: it then sends `Ready` and holds its own
    /// burst for half that round trip, the time `Ready` takes to reach the peer, so that
    /// the two bursts start together (DCUtR's synchronisation, libp2p).
    pub fn on_sockets_opened(
        &mut self,
        now: Instant,
        keys: &IntroKeys,
        locals: &[SocketAddr],
        out: &mut Vec<Transmit>,
    ) {
        let Side::Opener {
            sockets,
            opened,
            sync_ping,
            burst_at,
            ..
        } = &mut self.side
        else {
            self.ops.push(SocketOp::Close(locals.to_vec()));
            return;
        };
        if self.done || *opened {
            self.ops.push(SocketOp::Close(locals.to_vec()));
            return;
        }
        *opened = true;
        sockets.extend_from_slice(locals);
        debug!(sockets = sockets.len(), technique = ?self.technique, "spray sockets open");
        if sockets.is_empty() {
            return;
        }
        if self.technique == Technique::Sweep {
            let txid = self.txid_base.wrapping_add(self.sent);
            self.sent += 1;
            *sync_ping = Some((txid, now));
            // Without an answer (relay-TCP-only, loss), go unsynchronised after a second.
            *burst_at = Some(now + Duration::from_secs(1));
            self.relayed.push((PunchType::Ping, txid));
        } else {
            self.relayed.push((PunchType::Ready, 0));
            self.send_burst(keys, out);
        }
    }

    fn send_burst(&mut self, keys: &IntroKeys, out: &mut Vec<Transmit>) {
        let Side::Opener {
            requested,
            target,
            sockets,
            reverse,
            burst_at,
            burst_sent,
            ..
        } = &mut self.side
        else {
            return;
        };
        if *burst_sent {
            return;
        }
        *burst_sent = true;
        *burst_at = None;
        let target = *target;
        debug!(sockets = sockets.len(), %target, "spray burst");
        let order = if *reverse {
            sweep_order(requested, sockets)
        } else {
            sockets.clone()
        };
        for local in order {
            if let Some(t) = self.probe(keys, Some(local), target) {
                out.push(t);
            }
        }
    }

    /// A pong over the relay: if it answers our synchronisation ping, send `Ready` now,
    /// carrying [`SWEEP_LEAD`]: the peer bursts that long after `Ready` arrives, we burst
    /// half a round trip (the time `Ready` takes to get there) plus that long after sending
    /// it. Both bursts then start within the relay path's asymmetry of each other, and
    /// neither side is busy sending while the other's `Ready` is on its way (a burst keeps
    /// a CPU busy for about a millisecond, which delays everything else on a small
    /// machine). These deadlines are "precise" ([`Spray::precise_deadline`]): the driver
    /// does not round them to its millisecond timer.
    pub fn on_pong(&mut self, now: Instant, txid: u64) {
        let Side::Opener {
            sync_ping,
            burst_at,
            burst_sent,
            ..
        } = &mut self.side
        else {
            return;
        };
        let Some((ping, sent)) = *sync_ping else {
            return;
        };
        if ping != txid || *burst_sent || self.done {
            return;
        }
        *sync_ping = None;
        let half = now.saturating_duration_since(sent) / 2;
        debug!(?half, "sweep synchronised over the relay");
        *burst_at = Some(now + half + SWEEP_LEAD);
        self.relayed
            .push((PunchType::Ready, SWEEP_LEAD.as_micros() as u64));
    }

    /// The peer's `Ready` arrived: its sockets are open. Start probing after the delay it
    /// carries (µs in the txid field; 0 for a birthday spray), capped at a second.
    pub fn on_ready(&mut self, now: Instant, delay_us: u64) {
        if let Side::Prober {
            start_at, burst, ..
        } = &mut self.side
        {
            let delay = Duration::from_micros(delay_us.min(1_000_000));
            *start_at = (*start_at).min(now + delay);
            if *burst {
                self.precise = Some(*start_at);
            }
        }
    }

    /// A deadline the driver should meet to the microsecond rather than to its millisecond
    /// timer (spinning for it): the start of a sweep burst.
    pub fn precise_deadline(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        match &self.side {
            Side::Opener {
                burst_at,
                sync_ping,
                ..
            } if sync_ping.is_none() => *burst_at,
            Side::Prober { next, .. } if *next == 0 => self.precise,
            _ => None,
        }
    }

    /// When [`Spray::on_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        let probe = match &self.side {
            Side::Prober {
                start_at,
                next_send,
                next,
                ports,
                ..
            } if *next < ports.len() => Some(next_send.unwrap_or(*start_at)),
            Side::Opener { burst_at, .. } => *burst_at,
            _ => None,
        };
        if let Some((at, _)) = &self.settle {
            return Some(*at);
        }
        Some(probe.map_or(self.deadline, |p| p.min(self.deadline)))
    }

    /// Sends due probes; ends the attempt at its deadline.
    pub fn on_timeout(
        &mut self,
        now: Instant,
        keys: &IntroKeys,
        cfg: &SprayConfig,
        out: &mut Vec<Transmit>,
    ) {
        if self.done {
            return;
        }
        if let Some((at, keep)) = &self.settle {
            if now >= *at {
                let keep = keep.clone();
                self.close_all_but(&keep);
                self.kept = keep;
            }
            return;
        }
        if now >= self.deadline {
            debug!(technique = ?self.technique, probes = self.sent, "hard-NAT attempt over");
            self.finish();
            return;
        }
        let (ip, due_ports) = match &mut self.side {
            Side::Prober {
                ip,
                ports,
                next,
                start_at,
                burst,
                next_send,
            } => {
                let due = next_send.unwrap_or(*start_at);
                if now < due || *next >= ports.len() {
                    return;
                }
                if *burst {
                    debug!(ports = ports.len(), %ip, "sweep burst");
                }
                let n = if *burst {
                    ports.len()
                } else {
                    cfg.per_tick.max(1)
                };
                let end = (*next + n).min(ports.len());
                let slice = ports[*next..end].to_vec();
                *next = end;
                *next_send = Some(now + cfg.tick);
                (*ip, slice)
            }
            Side::Opener { burst_at, .. } => {
                if burst_at.is_some_and(|t| t <= now) {
                    self.send_burst(keys, out);
                }
                return;
            }
        };
        for port in due_ports {
            if let Some(t) = self.probe(keys, None, SocketAddr::new(ip, port)) {
                out.push(t);
            }
        }
    }

    /// A direct path is confirmed (on `local`): stop sending; after [`SETTLE`] close every
    /// socket but `local` and those the peer pinged us on meanwhile.
    pub fn succeed(&mut self, now: Instant, local: Option<SocketAddr>) {
        if self.done || self.settle.is_some() {
            return;
        }
        let keep: Vec<SocketAddr> = local.filter(|l| self.has_socket(*l)).into_iter().collect();
        match &mut self.side {
            Side::Opener {
                burst_sent,
                burst_at,
                ..
            } => {
                *burst_sent = true;
                *burst_at = None;
                self.settle = Some((now + SETTLE, keep));
            }
            Side::Prober { .. } => self.done = true,
        }
    }

    /// The peer sent something (authenticated, or QUIC on its path) to `local` while we
    /// settle: its direct path may use that socket, keep it.
    pub fn note_heard(&mut self, local: SocketAddr) {
        // Called for every datagram from the peer: the cheap checks first (not settling,
        // or a socket already kept), the scan of the spray's sockets last.
        match &self.settle {
            Some((_, keep)) if !keep.contains(&local) => {}
            _ => return,
        }
        if self.has_socket(local)
            && let Some((_, keep)) = self.settle.as_mut()
        {
            keep.push(local);
        }
    }

    /// Sockets kept for direct paths after the attempt settled (taken once).
    pub fn take_kept(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.kept)
    }

    fn close_all_but(&mut self, keep: &[SocketAddr]) {
        self.done = true;
        self.settle = None;
        if let Side::Opener { sockets, .. } = &mut self.side {
            let close: Vec<SocketAddr> = sockets.drain(..).filter(|s| !keep.contains(s)).collect();
            if !close.is_empty() {
                self.ops.push(SocketOp::Close(close));
            }
        }
    }

    /// Ends the attempt (failure, or the peer is gone), closing every socket.
    pub fn finish(&mut self) {
        if self.done {
            return;
        }
        // Also when settling after a success that was then abandoned: nothing to keep.
        self.close_all_but(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::relay_data::ChannelId;

    fn nat(mapping: MappingBehavior, allocation: PortAllocation) -> NatReport {
        NatReport {
            mapping,
            allocation,
            udp: true,
        }
    }

    fn keys(role: Role) -> IntroKeys {
        IntroKeys {
            channel: ChannelId(1),
            nonce: [9; 32],
            tag: punch::tag(&[9; 32]),
            role,
        }
    }

    fn cands() -> Vec<Candidate> {
        vec![Candidate {
            addr: "198.51.100.7:4000".parse().unwrap(),
            kind: CandidateKind::ServerReflexive,
        }]
    }

    fn inputs<'a>(
        ours: NatReport,
        peer: NatReport,
        role: Role,
        c: &'a [Candidate],
        attempts: u32,
    ) -> PlanInputs<'a> {
        PlanInputs {
            ours,
            peer,
            role,
            peer_candidates: c,
            nonce: &[9; 32],
            attempts,
        }
    }

    const EIM: MappingBehavior = MappingBehavior::EndpointIndependent;
    const EDM: MappingBehavior = MappingBehavior::EndpointDependent;

    #[test]
    fn hard_side_opens_sockets_and_probes_once_from_each() {
        let t0 = Instant::now();
        let cfg = SprayConfig::default();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let c = cands();
        let ours = nat(EDM, PortAllocation::Random);
        let peer = nat(EIM, PortAllocation::Preserving);
        let mut s = plan(
            t0,
            &cfg,
            inputs(ours, peer, Role::Initiator, &c, 1),
            &mut rng,
        )
        .unwrap();
        assert_eq!(s.technique(), Technique::Birthday);
        assert_eq!(s.take_ops(), vec![SocketOp::Open(vec![0; 256])]);
        let locals: Vec<SocketAddr> = (0..200)
            .map(|i| SocketAddr::from(([0, 0, 0, 0], 30000 + i)))
            .collect();
        let mut out = Vec::new();
        s.on_sockets_opened(t0, &keys(Role::Initiator), &locals, &mut out);
        assert_eq!(s.take_relayed(), vec![(PunchType::Ready, 0)]);
        assert_eq!(out.len(), 200);
        assert!(out.iter().all(|t| t.destination == c[0].addr));
        assert_eq!(out[0].source, Some(locals[0]));
        let probe = punch::decode(&[9; 32], &out[5].contents).unwrap();
        assert!(s.owns(probe.txid));
        assert!(!s.owns(probe.txid.wrapping_add(1000)));
        // Success on socket 7; the peer pings us on 9 meanwhile: after the settling time
        // the others close, 7 and 9 stay for the direct paths.
        let t1 = t0 + Duration::from_millis(100);
        s.succeed(t1, Some(locals[7]));
        s.note_heard(locals[9]);
        assert!(s.take_ops().is_empty());
        assert_eq!(s.poll_timeout(), Some(t1 + SETTLE));
        s.on_timeout(t1 + SETTLE, &keys(Role::Initiator), &cfg, &mut out);
        let ops = s.take_ops();
        let SocketOp::Close(closed) = &ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!(closed.len(), 198);
        assert!(!closed.contains(&locals[7]) && !closed.contains(&locals[9]));
        assert_eq!(s.take_kept(), vec![locals[7], locals[9]]);
        assert!(s.is_done());
    }

    #[test]
    fn easy_side_waits_for_ready_then_paces_within_budget() {
        let t0 = Instant::now();
        let cfg = SprayConfig::default();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let c = cands();
        let ours = nat(EIM, PortAllocation::Preserving);
        let peer = nat(EDM, PortAllocation::Random);
        let k = keys(Role::Responder);
        let mut s = plan(
            t0,
            &cfg,
            inputs(ours, peer, Role::Responder, &c, 1),
            &mut rng,
        )
        .unwrap();
        assert!(s.take_ops().is_empty(), "the easy side opens no sockets");
        let mut out = Vec::new();
        assert_eq!(s.poll_timeout(), Some(t0 + cfg.ready_wait));
        s.on_timeout(t0, &k, &cfg, &mut out);
        assert!(out.is_empty(), "no probe before Ready");
        let t1 = t0 + Duration::from_millis(30);
        s.on_ready(t1, 0);
        let mut now = t1;
        while let Some(t) = s.poll_timeout() {
            now = t;
            s.on_timeout(now, &k, &cfg, &mut out);
        }
        assert_eq!(out.len(), cfg.probes, "budget spent exactly");
        let ports: HashSet<u16> = out.iter().map(|t| t.destination.port()).collect();
        assert_eq!(ports.len(), cfg.probes, "no port probed twice");
        assert!(
            out.iter().all(|t| t.destination.ip() == c[0].addr.ip()),
            "only the peer's IP"
        );
        assert!(out.iter().all(|t| t.destination.port() >= 1024));
        // Paced: 16 per 10 ms.
        assert!(now >= t1 + cfg.tick * (cfg.probes / cfg.per_tick - 1) as u32);
        assert!(s.is_done());
    }

    #[test]
    fn sequential_allocator_is_predicted_before_random() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let ports = birthday_ports(4000, PortAllocation::Sequential(2), 256, 2048, &mut rng);
        assert_eq!(&ports[..3], &[4002, 4004, 4006]);
        assert_eq!(ports.len(), 2048);
    }

    #[test]
    fn sweep_only_on_a_retry_between_port_preserving_eim_nats() {
        let t0 = Instant::now();
        let cfg = SprayConfig::default();
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let c = cands();
        let e = nat(EIM, PortAllocation::Preserving);
        assert!(plan(t0, &cfg, inputs(e, e, Role::Initiator, &c, 1), &mut rng).is_none());
        let mut resp = plan(t0, &cfg, inputs(e, e, Role::Responder, &c, 2), &mut rng).unwrap();
        let mut init = plan(t0, &cfg, inputs(e, e, Role::Initiator, &c, 2), &mut rng).unwrap();
        assert_eq!(resp.technique(), Technique::Sweep);
        let ports = sweep_ports(&[9; 32], 256);
        assert_eq!(resp.take_ops(), vec![SocketOp::Open(ports.clone())]);
        assert!(init.take_ops().is_empty());
        // Responder: last port first. Initiator: list order, all at once on Ready.
        let locals: Vec<SocketAddr> = ports
            .iter()
            .map(|&p| SocketAddr::from(([0, 0, 0, 0], p)))
            .collect();
        let mut out = Vec::new();
        resp.on_sockets_opened(t0, &keys(Role::Responder), &locals, &mut out);
        assert!(out.is_empty(), "the burst waits for the relay round trip");
        let relayed = resp.take_relayed();
        assert_eq!(relayed.len(), 1);
        assert_eq!(relayed[0].0, PunchType::Ping);
        assert!(resp.owns(relayed[0].1));
        // The pong comes back after 30 ms: Ready now (the peer bursts SWEEP_LEAD after it
        // arrives), our burst 15 ms (its trip) + SWEEP_LEAD later.
        let t1 = t0 + Duration::from_millis(30);
        resp.on_pong(t1, relayed[0].1);
        assert_eq!(
            resp.take_relayed(),
            vec![(PunchType::Ready, SWEEP_LEAD.as_micros() as u64)]
        );
        let at = t1 + Duration::from_millis(15) + SWEEP_LEAD;
        assert_eq!(resp.poll_timeout(), Some(at));
        assert_eq!(resp.precise_deadline(), Some(at));
        resp.on_timeout(at, &keys(Role::Responder), &cfg, &mut out);
        assert_eq!(out.len(), 256);
        // Groups of 16 in list order, each backwards.
        assert_eq!(out[0].source, Some(locals[15]));
        assert_eq!(out[15].source, Some(locals[0]));
        assert_eq!(out[16].source, Some(locals[31]));
        assert_eq!(out[255].source, Some(locals[240]));
        let mut probes = Vec::new();
        init.on_ready(t0, SWEEP_LEAD.as_micros() as u64);
        assert_eq!(init.precise_deadline(), Some(t0 + SWEEP_LEAD));
        init.on_timeout(t0, &keys(Role::Initiator), &cfg, &mut probes);
        assert!(probes.is_empty(), "not before the agreed start");
        init.on_timeout(t0 + SWEEP_LEAD, &keys(Role::Initiator), &cfg, &mut probes);
        assert_eq!(probes.len(), 256);
        assert_eq!(probes[0].destination.port(), ports[0]);
        assert_eq!(probes[255].destination.port(), ports[255]);
        // Both sides derive the same list; another nonce gives other ports.
        assert_ne!(sweep_ports(&[8; 32], 256), ports);
        // Not for symmetric pairs, not without UDP.
        let sym = nat(EDM, PortAllocation::Random);
        assert!(plan(t0, &cfg, inputs(sym, sym, Role::Initiator, &c, 5), &mut rng).is_none());
        let mut no_udp = e;
        no_udp.udp = false;
        assert!(
            plan(
                t0,
                &cfg,
                inputs(no_udp, sym, Role::Initiator, &c, 1),
                &mut rng
            )
            .is_none()
        );
    }

    #[test]
    fn sweep_groups_stay_aligned_when_ports_fail_to_bind() {
        let ports: Vec<u16> = (0..40).map(|i| 20_000 + i * 7).collect();
        // Port index 3 could not be bound.
        let sockets: Vec<SocketAddr> = ports
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, &p)| SocketAddr::from(([0, 0, 0, 0], p)))
            .collect();
        let order: Vec<u16> = sweep_order(&ports, &sockets)
            .iter()
            .map(|s| s.port())
            .collect();
        let idx = |p: u16| ports.iter().position(|&x| x == p).unwrap();
        let idxs: Vec<usize> = order.iter().map(|&p| idx(p)).collect();
        assert_eq!(
            &idxs[..15],
            &[15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 2, 1, 0]
        );
        assert_eq!(&idxs[15..31], &(16..32).rev().collect::<Vec<_>>()[..]);
        assert_eq!(&idxs[31..], &(32..40).rev().collect::<Vec<_>>()[..]);
    }

    #[test]
    fn late_sockets_after_the_end_are_closed() {
        let t0 = Instant::now();
        let cfg = SprayConfig::default();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let c = cands();
        let mut s = plan(
            t0,
            &cfg,
            inputs(
                nat(EDM, PortAllocation::Random),
                nat(EIM, PortAllocation::Preserving),
                Role::Initiator,
                &c,
                1,
            ),
            &mut rng,
        )
        .unwrap();
        s.take_ops();
        s.on_timeout(
            t0 + cfg.duration,
            &keys(Role::Initiator),
            &cfg,
            &mut Vec::new(),
        );
        assert!(s.is_done());
        let late: Vec<SocketAddr> = vec!["0.0.0.0:5000".parse().unwrap()];
        let mut out = Vec::new();
        s.on_sockets_opened(t0, &keys(Role::Initiator), &late, &mut out);
        assert!(out.is_empty());
        assert_eq!(s.take_ops(), vec![SocketOp::Close(late)]);
    }
}
