//! Address discovery: a STUN Binding client (RFC 8489) toward the relay, the relay's
//! alternate address and any extra STUN servers, and the netcheck verdict built from the
//! answers.
//!
//! Retransmission follows RFC 8489 section 6.2.1: "the client SHOULD retransmit ... starting
//! with an interval of RTO [500 ms], doubling after each retransmission ... Rc [7] requests
//! ... If, after the last request, a duration equal to Rm [16] times the RTO has passed
//! without a response ... the client SHOULD consider the transaction to have failed."
//!
//! Mapping behaviour (RFC 5780 section 4.3, simplified): the mapped address seen by two
//! server addresses with different IPs is compared. Equal: endpoint-independent. Different:
//! endpoint-dependent. Equal to one of our own socket addresses: no NAT. When the two ports
//! differ by a small step the allocation is reported as sequential with that step, which
//! lets the peer predict the port of our next mapping.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngExt;
use rand_chacha::ChaCha20Rng;
use tracing::{debug, trace};

use crate::wire::control::{MappingBehavior, NatReport, PortAllocation};
use crate::wire::stun;

const RTO: Duration = Duration::from_millis(500);
/// Rc in RFC 8489.
const MAX_REQUESTS: u32 = 7;
/// Rm in RFC 8489.
const LAST_WAIT_FACTOR: u32 = 16;
/// Silence from every STUN server for this long, while the relay answers over TCP, means
/// UDP is blocked. Four requests have gone out by then (0, 0.5, 1.5, 3.5 s).
const SILENT_VERDICT: Duration = Duration::from_secs(5);

/// Which server a result is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunServerKind {
    /// The relay's main address.
    Relay,
    /// The relay's alternate address (RFC 5780 OTHER-ADDRESS).
    RelayAlternate,
    /// A configured third-party server.
    Extra,
}

/// One server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunProbeResult {
    /// The server.
    pub server: SocketAddr,
    /// Relay, alternate or extra.
    pub kind: StunServerKind,
    /// Our address as it saw us; `None` when every retransmission went unanswered.
    pub mapped: Option<SocketAddr>,
    /// Time from the first request to the answer (includes retransmissions).
    pub rtt: Option<Duration>,
}

/// The result of a netcheck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetcheckReport {
    /// Our public (server-reflexive) address as the relay saw it, else another server.
    pub public_addr: Option<SocketAddr>,
    /// The NAT summary shared with peers.
    pub nat: NatReport,
    /// Round trip to the relay's STUN service.
    pub relay_rtt: Option<Duration>,
    /// Our own socket addresses (host candidates).
    pub host_addrs: Vec<SocketAddr>,
    /// Every server's answer.
    pub probes: Vec<StunProbeResult>,
}

#[derive(Debug, Clone)]
struct Tx {
    txid: [u8; 12],
    server: SocketAddr,
    kind: StunServerKind,
    first_sent: Instant,
    next: Instant,
    rto: Duration,
    sent: u32,
    result: Option<Option<(SocketAddr, Duration)>>,
}

/// The STUN client and netcheck state machine.
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    txs: Vec<Tx>,
    running: bool,
}

impl Discovery {
    /// Starts a round toward `servers` (replacing any running one).
    pub fn start(
        &mut self,
        now: Instant,
        servers: &[(SocketAddr, StunServerKind)],
        rng: &mut ChaCha20Rng,
    ) {
        self.txs.clear();
        for &(server, kind) in servers {
            self.add(now, server, kind, rng);
        }
        self.running = !self.txs.is_empty();
    }

    fn add(
        &mut self,
        now: Instant,
        server: SocketAddr,
        kind: StunServerKind,
        rng: &mut ChaCha20Rng,
    ) {
        if self.txs.iter().any(|t| t.server == server) {
            return;
        }
        self.txs.push(Tx {
            txid: rng.random(),
            server,
            kind,
            first_sent: now,
            next: now,
            rto: RTO,
            sent: 0,
            result: None,
        });
    }

    /// Whether a round is in progress.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Next retransmission or give-up instant; with `relay_reachable` (registered over
    /// TCP) also the early "UDP is blocked" verdict, see [`Discovery::give_up_if_silent`].
    pub fn poll_timeout(&self, relay_reachable: bool) -> Option<Instant> {
        let retransmit = self
            .txs
            .iter()
            .filter(|t| t.result.is_none())
            .map(|t| t.next)
            .min();
        let silent = self.silent_deadline().filter(|_| relay_reachable);
        [retransmit, silent].into_iter().flatten().min()
    }

    /// While no server has answered anything: when the round may be called off.
    fn silent_deadline(&self) -> Option<Instant> {
        let answered = self.txs.iter().any(|t| matches!(t.result, Some(Some(_))));
        if !self.running || answered {
            return None;
        }
        self.txs
            .iter()
            .filter(|t| t.sent > 0)
            .map(|t| t.first_sent + SILENT_VERDICT)
            .max()
    }

    /// Calls the round off when not one server answered within [`SILENT_VERDICT`] of its
    /// first request. The caller does this only when it knows the relay is reachable over
    /// TCP: then silence on UDP means UDP is blocked, and waiting out RFC 8489's full
    /// 39.5 s (Rc = 7, Rm = 16) would only delay that verdict. Returns whether it did.
    pub fn give_up_if_silent(&mut self, now: Instant) -> bool {
        if self.silent_deadline().is_none_or(|t| t > now) {
            return false;
        }
        debug!("no STUN answer from any server: UDP looks blocked");
        for t in self.txs.iter_mut().filter(|t| t.result.is_none()) {
            t.result = Some(None);
        }
        true
    }

    /// Sends due requests; returns `(destination, packet)` pairs.
    pub fn on_timeout(&mut self, now: Instant, out: &mut Vec<(SocketAddr, Vec<u8>)>) {
        for t in self.txs.iter_mut().filter(|t| t.result.is_none()) {
            if t.next > now {
                continue;
            }
            if t.sent >= MAX_REQUESTS {
                debug!(server = %t.server, "STUN transaction failed");
                t.result = Some(None);
                continue;
            }
            let mut buf = [0u8; stun::MAX_BINDING_LEN];
            match stun::binding_request(t.txid, None, &mut buf) {
                Ok(n) => out.push((t.server, buf[..n].to_vec())),
                Err(e) => debug!(%e, "cannot encode a STUN request"),
            }
            if t.sent == 0 {
                t.first_sent = now;
            }
            t.sent += 1;
            t.next = if t.sent >= MAX_REQUESTS {
                now + RTO * LAST_WAIT_FACTOR
            } else {
                now + t.rto
            };
            t.rto *= 2;
        }
    }

    /// A STUN packet arrived. Returns `true` when it answered one of our transactions;
    /// `other` is the relay's alternate address, to probe next when learned.
    pub fn on_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        rng: &mut ChaCha20Rng,
    ) -> bool {
        let Ok(resp) = stun::parse_binding_response(packet) else {
            trace!(%from, "not a binding response");
            return false;
        };
        let Some(i) = self
            .txs
            .iter()
            .position(|t| t.txid == resp.txid && t.result.is_none())
        else {
            trace!(%from, "STUN response for no transaction");
            return false;
        };
        let t = &mut self.txs[i];
        let rtt = now.saturating_duration_since(t.first_sent);
        t.result = Some(Some((resp.mapped, rtt)));
        if t.kind == StunServerKind::Relay
            && let Some(other) = resp.other_address
        {
            self.add(now, other, StunServerKind::RelayAlternate, rng);
        }
        true
    }

    /// The report, once every transaction finished (then the round is over).
    pub fn take_report(&mut self, host_addrs: &[SocketAddr]) -> Option<NetcheckReport> {
        if !self.running || self.txs.iter().any(|t| t.result.is_none()) {
            return None;
        }
        self.running = false;
        Some(self.report(host_addrs))
    }

    /// Whether the relay's transaction is still waiting for an answer.
    pub fn relay_pending(&self) -> bool {
        self.txs
            .iter()
            .any(|t| t.kind == StunServerKind::Relay && t.result.is_none())
    }

    /// The relay's answer so far (our reflexive address), even mid-round.
    pub fn relay_mapped(&self) -> Option<SocketAddr> {
        self.txs
            .iter()
            .find(|t| t.kind == StunServerKind::Relay)
            .and_then(|t| t.result.flatten())
            .map(|(m, _)| m)
    }

    fn report(&self, host_addrs: &[SocketAddr]) -> NetcheckReport {
        let probes: Vec<StunProbeResult> = self
            .txs
            .iter()
            .map(|t| StunProbeResult {
                server: t.server,
                kind: t.kind,
                mapped: t.result.flatten().map(|r| r.0),
                rtt: t.result.flatten().map(|r| r.1),
            })
            .collect();
        let answered: Vec<&StunProbeResult> =
            probes.iter().filter(|p| p.mapped.is_some()).collect();
        let public_addr = probes
            .iter()
            .find(|p| p.kind == StunServerKind::Relay)
            .and_then(|p| p.mapped)
            .or_else(|| answered.first().and_then(|p| p.mapped));
        let relay_rtt = probes
            .iter()
            .find(|p| p.kind == StunServerKind::Relay)
            .and_then(|p| p.rtt);
        let mut nat = NatReport {
            udp: !answered.is_empty(),
            ..NatReport::default()
        };
        if let Some(first) = answered.first().and_then(|p| p.mapped) {
            if host_addrs.contains(&first) {
                nat.mapping = MappingBehavior::NoNat;
                nat.allocation = PortAllocation::Preserving;
            } else if let Some(second) = answered
                .iter()
                .skip(1)
                .find(|p| p.server.ip() != answered[0].server.ip())
                .and_then(|p| p.mapped)
            {
                if second == first {
                    nat.mapping = MappingBehavior::EndpointIndependent;
                    if host_addrs.iter().any(|h| h.port() == first.port()) {
                        nat.allocation = PortAllocation::Preserving;
                    }
                } else {
                    nat.mapping = MappingBehavior::EndpointDependent;
                    let step = i32::from(second.port()) - i32::from(first.port());
                    nat.allocation = if step != 0 && step.abs() <= 16 {
                        PortAllocation::Sequential(step)
                    } else {
                        PortAllocation::Random
                    };
                }
            }
        }
        NetcheckReport {
            public_addr,
            nat,
            relay_rtt,
            host_addrs: host_addrs.to_vec(),
            probes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn retransmits_per_rfc_8489_then_fails() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut d = Discovery::default();
        let server: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        d.start(t0, &[(server, StunServerKind::Relay)], &mut rng);
        let mut out = Vec::new();
        let mut sends = Vec::new();
        for _ in 0..20 {
            let Some(t) = d.poll_timeout(false) else {
                break;
            };
            let before = out.len();
            d.on_timeout(t, &mut out);
            if out.len() > before {
                sends.push(t - t0);
            }
        }
        let ms: Vec<u128> = sends.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 500, 1500, 3500, 7500, 15500, 31500]);
        let r = d.take_report(&[]).expect("round over");
        assert!(!r.nat.udp);
    }

    #[test]
    fn two_servers_classify_mapping() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        let b: SocketAddr = "203.0.113.2:3478".parse().unwrap();
        let host: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        for (ma, mb, want) in [
            (
                "198.51.100.1:6000",
                "198.51.100.1:6000",
                MappingBehavior::EndpointIndependent,
            ),
            (
                "198.51.100.1:6000",
                "198.51.100.1:6001",
                MappingBehavior::EndpointDependent,
            ),
            ("10.0.0.2:5000", "10.0.0.2:5000", MappingBehavior::NoNat),
        ] {
            let mut d = Discovery::default();
            d.start(
                t0,
                &[(a, StunServerKind::Relay), (b, StunServerKind::Extra)],
                &mut rng,
            );
            let mut out = Vec::new();
            d.on_timeout(t0, &mut out);
            for (i, (server, mapped)) in [(a, ma), (b, mb)].into_iter().enumerate() {
                let req = stun::parse_binding_request(&out[i].1).unwrap();
                let mut buf = [0u8; 256];
                let n = stun::binding_success(&req, mapped.parse().unwrap(), None, None, &mut buf)
                    .unwrap();
                assert!(d.on_packet(t0, server, &buf[..n], &mut rng));
            }
            let r = d.take_report(&[host]).unwrap();
            assert_eq!(r.nat.mapping, want);
            assert!(r.nat.udp);
        }
    }
}
