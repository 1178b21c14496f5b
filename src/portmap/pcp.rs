//! PCP (RFC 6887), MAP opcode only: codec and the client state machine for one UDP mapping.
//!
//! One MAP request returns both the external address and port. The request names our
//! internal address (the gateway checks it against the packet's source, `ADDRESS_MISMATCH`
//! otherwise) and a random 96-bit nonce that every renewal and the delete repeat (RFC 6887
//! §11.1: "the nonce ... MUST be remembered by the client" and the server refuses a
//! different one for an existing mapping).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use tracing::{debug, trace};

use super::{Mapping, Protocol, Retransmit};

/// PCP's version number.
pub const VERSION: u8 = 2;
/// The MAP opcode.
pub const OP_MAP: u8 = 1;
/// The R bit of the opcode byte: set in responses.
pub const RESPONSE_BIT: u8 = 0x80;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Size of a MAP request without options: 24-byte header + 36-byte MAP body.
pub const MAP_LEN: usize = 60;
/// RFC 6887 §7: "PCP messages MUST NOT exceed 1100 octets": bigger replies are dropped.
pub const MAX_MESSAGE: usize = 1100;

/// Result codes (RFC 6887 §7.4) the client acts on.
pub mod result {
    /// Success.
    pub const SUCCESS: u8 = 0;
    /// The server does not speak this version (a NAT-PMP-only gateway).
    pub const UNSUPP_VERSION: u8 = 1;
    /// The server refuses (policy).
    pub const NOT_AUTHORIZED: u8 = 2;
    /// The suggested external address cannot be had; retry without a suggestion.
    pub const CANNOT_PROVIDE_EXTERNAL: u8 = 11;
    /// Our stated client address is not the packet's source (we are behind another NAT).
    pub const ADDRESS_MISMATCH: u8 = 12;
}

/// A MAP request for UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRequest {
    /// Our address as the gateway sees it (the request's source).
    pub client: IpAddr,
    /// Requested lifetime in seconds; 0 deletes.
    pub lifetime: u32,
    /// The mapping nonce.
    pub nonce: [u8; 12],
    /// Our internal port.
    pub internal_port: u16,
    /// Suggested external address (unspecified = any).
    pub suggested: SocketAddr,
}

/// IPv4 addresses travel IPv4-mapped in PCP's 128-bit fields (RFC 6887 §5).
fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_from16(b: &[u8]) -> IpAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl MapRequest {
    /// The request's bytes (RFC 6887 §7.1 header + §11.1 MAP body, no options).
    pub fn encode(&self) -> [u8; MAP_LEN] {
        let mut b = [0u8; MAP_LEN];
        b[0] = VERSION;
        b[1] = OP_MAP;
        b[4..8].copy_from_slice(&self.lifetime.to_be_bytes());
        b[8..24].copy_from_slice(&ip16(self.client));
        b[24..36].copy_from_slice(&self.nonce);
        b[36] = PROTO_UDP;
        b[40..42].copy_from_slice(&self.internal_port.to_be_bytes());
        b[42..44].copy_from_slice(&self.suggested.port().to_be_bytes());
        let ext = if self.suggested.ip().is_unspecified() {
            // "all zeros" IPv4-mapped = ::ffff:0.0.0.0 (RFC 6887 §11.1).
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            self.suggested.ip()
        };
        b[44..60].copy_from_slice(&ip16(ext));
        b
    }
}

/// A decoded MAP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapResponse {
    /// Result code.
    pub result: u8,
    /// Granted lifetime in seconds (on errors: how long the error holds).
    pub lifetime: u32,
    /// Server epoch in seconds.
    pub epoch: u32,
    /// The nonce the request carried.
    pub nonce: [u8; 12],
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// The assigned external address.
    pub external: SocketAddr,
}

/// Why a datagram is not a usable PCP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than a MAP response or longer than 1100 bytes.
    #[error("bad PCP response length {0}")]
    Length(usize),
    /// A version-0 (NAT-PMP) reply: the gateway does not speak PCP.
    #[error("NAT-PMP reply (gateway does not speak PCP), result {0}")]
    NatPmp(u16),
    /// Another version.
    #[error("PCP version {0}")]
    Version(u8),
    /// Not a MAP response.
    #[error("not a MAP response (opcode byte {0:#04x})")]
    Opcode(u8),
    /// An error response too short to carry the MAP body.
    #[error("PCP error {0} without a MAP body")]
    ShortError(u8),
}

/// Decodes a MAP response (options after the body are ignored). Nothing here allocates.
pub fn decode_response(b: &[u8]) -> Result<MapResponse, DecodeError> {
    if b.len() > MAX_MESSAGE || b.len() < 4 {
        return Err(DecodeError::Length(b.len()));
    }
    if b[0] == 0 {
        // RFC 6887 Appendix A / RFC 6886 §3.5: a NAT-PMP gateway answers an unknown
        // version with its own version 0 and result 1 "unsupported version".
        return Err(DecodeError::NatPmp(u16::from_be_bytes([b[2], b[3]])));
    }
    if b[0] != VERSION {
        return Err(DecodeError::Version(b[0]));
    }
    if b[1] != RESPONSE_BIT | OP_MAP {
        return Err(DecodeError::Opcode(b[1]));
    }
    let result = b[3];
    if b.len() < MAP_LEN {
        // RFC 6887 §7.2: a server that cannot parse the request may answer with just the
        // header (e.g. UNSUPP_VERSION).
        return if result != result::SUCCESS && b.len() >= 24 {
            Err(DecodeError::ShortError(result))
        } else {
            Err(DecodeError::Length(b.len()))
        };
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&b[24..36]);
    Ok(MapResponse {
        result,
        lifetime: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        epoch: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        nonce,
        protocol: b[36],
        internal_port: u16::from_be_bytes([b[40], b[41]]),
        external: SocketAddr::new(ip_from16(&b[44..60]), u16::from_be_bytes([b[42], b[43]])),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Requesting,
    Mapped {
        external: SocketAddr,
        renew_at: Instant,
        expires: Instant,
    },
    Deleting,
    Done,
}

/// What [`PcpClient::handle_response`] / [`PcpClient::handle_timeout`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report.
    None,
    /// A mapping was obtained or renewed.
    Mapped(Mapping),
    /// The gateway does not speak PCP (NAT-PMP reply or `UNSUPP_VERSION`): try NAT-PMP now.
    Unsupported,
    /// Refused or silent: try the next protocol.
    Failed(String),
    /// The delete was confirmed.
    Deleted,
}

/// One UDP mapping via PCP MAP. Drain order after each input: [`PcpClient::poll_transmit`]
/// until `None`, then sleep until [`PcpClient::poll_timeout`].
#[derive(Debug)]
pub struct PcpClient {
    gateway: SocketAddrV4,
    request: MapRequest,
    phase: Phase,
    retx: Retransmit,
    epoch: Option<(u32, Instant)>,
    out: Option<Vec<u8>>,
}

impl PcpClient {
    /// Starts asking `gateway` for a mapping of `client:internal_port`, suggesting the same
    /// external port (many routers grant it, which keeps the address readable).
    pub fn new(
        now: Instant,
        gateway: SocketAddrV4,
        client: Ipv4Addr,
        internal_port: u16,
        lifetime: u32,
        nonce: [u8; 12],
    ) -> Self {
        let mut c = PcpClient {
            gateway,
            request: MapRequest {
                client: client.into(),
                lifetime,
                nonce,
                internal_port,
                suggested: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), internal_port),
            },
            phase: Phase::Requesting,
            retx: Retransmit::new(now),
            epoch: None,
            out: None,
        };
        c.send_current();
        c
    }

    fn send_current(&mut self) {
        self.out = match self.phase {
            Phase::Done => None,
            Phase::Deleting => Some(
                MapRequest {
                    lifetime: 0,
                    ..self.request
                }
                .encode()
                .to_vec(),
            ),
            _ => Some(self.request.encode().to_vec()),
        };
    }

    /// The datagram to send to the gateway next, if any.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.take().map(|b| (SocketAddr::V4(self.gateway), b))
    }

    /// When [`PcpClient::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Done => None,
            Phase::Mapped { renew_at, .. } if !self.retx.active() => Some(renew_at),
            _ => self.retx.next(),
        }
    }

    /// Retransmits, gives up or renews.
    pub fn handle_timeout(&mut self, now: Instant) -> Outcome {
        if let Phase::Mapped { renew_at, .. } = self.phase
            && !self.retx.active()
        {
            if now >= renew_at {
                trace!("PCP: renewing");
                self.retx = Retransmit::new(now);
                self.send_current();
            }
            return Outcome::None;
        }
        if self.phase == Phase::Done || !self.retx.due(now) {
            return Outcome::None;
        }
        if self.retx.fire(now) {
            self.send_current();
            return Outcome::None;
        }
        match &mut self.phase {
            Phase::Mapped {
                renew_at, expires, ..
            } => {
                if now >= *expires {
                    self.phase = Phase::Done;
                    Outcome::Failed("PCP renewal unanswered; mapping expired".into())
                } else {
                    // Keep the mapping and try again halfway to its expiry.
                    *renew_at = now + (*expires - now) / 2;
                    self.retx = Retransmit::idle();
                    Outcome::None
                }
            }
            Phase::Deleting => {
                self.phase = Phase::Done;
                Outcome::Deleted
            }
            _ => {
                self.phase = Phase::Done;
                Outcome::Failed("no PCP answer from the gateway".into())
            }
        }
    }

    /// A datagram from the gateway's port 5351.
    pub fn handle_response(&mut self, now: Instant, from: SocketAddr, b: &[u8]) -> Outcome {
        if from != SocketAddr::V4(self.gateway) || self.phase == Phase::Done {
            trace!(%from, "PCP: reply not from the gateway or not awaited; dropped");
            return Outcome::None;
        }
        let r = match decode_response(b) {
            Ok(r) => r,
            Err(DecodeError::NatPmp(_)) | Err(DecodeError::ShortError(result::UNSUPP_VERSION))
                if self.phase == Phase::Requesting =>
            {
                self.phase = Phase::Done;
                return Outcome::Unsupported;
            }
            Err(DecodeError::ShortError(code)) if self.phase == Phase::Requesting => {
                self.phase = Phase::Done;
                return Outcome::Failed(format!("PCP error {code} ({})", result_name(code)));
            }
            Err(e) => {
                trace!("PCP: {e}; dropped");
                return Outcome::None;
            }
        };
        // RFC 6887 §11.4: a response whose nonce, protocol or internal port differ from the
        // request is not ours ("MUST be silently ignored" for a mismatched nonce).
        if r.nonce != self.request.nonce
            || r.protocol != PROTO_UDP
            || r.internal_port != self.request.internal_port
        {
            trace!("PCP: response for another mapping; dropped");
            return Outcome::None;
        }
        // RFC 6887 §8.5: an epoch that moved backwards (or too slowly) means the server
        // lost its state: renew at once.
        let lost_state = match self.epoch {
            Some((prev, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs();
                u64::from(r.epoch) + 2 < u64::from(prev) + elapsed * 7 / 8
            }
            None => false,
        };
        self.epoch = Some((r.epoch, now));
        if self.phase == Phase::Deleting {
            self.phase = Phase::Done;
            return Outcome::Deleted;
        }
        match r.result {
            result::SUCCESS if r.lifetime > 0 && r.external.port() != 0 => {
                let life = Duration::from_secs(r.lifetime.into());
                // RFC 6887 §11.2.1: renew no earlier than 1/2 and no later than 5/8 of the
                // lifetime; we take 1/2.
                let renew_at = if lost_state {
                    debug!("PCP: server epoch went back; renewing now");
                    now
                } else {
                    now + life / 2
                };
                self.phase = Phase::Mapped {
                    external: r.external,
                    renew_at,
                    expires: now + life,
                };
                // Renewals suggest what we got.
                self.request.suggested = r.external;
                self.retx = Retransmit::idle();
                Outcome::Mapped(Mapping {
                    protocol: Protocol::Pcp,
                    external: r.external,
                    internal_port: self.request.internal_port,
                    lifetime: life,
                })
            }
            result::CANNOT_PROVIDE_EXTERNAL if !self.request.suggested.ip().is_unspecified() => {
                // Our suggestion (from the last grant) is gone: ask for anything.
                self.request.suggested = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
                self.retx = Retransmit::new(now);
                self.send_current();
                Outcome::None
            }
            code => {
                self.phase = Phase::Done;
                Outcome::Failed(format!("PCP error {code} ({})", result_name(code)))
            }
        }
    }

    /// The mapping currently held, if any.
    pub fn external(&self) -> Option<SocketAddr> {
        match self.phase {
            Phase::Mapped { external, .. } => Some(external),
            _ => None,
        }
    }

    /// Starts deleting the mapping (if there is one). Returns whether a delete was sent.
    pub fn release(&mut self, now: Instant) -> bool {
        if matches!(self.phase, Phase::Mapped { .. } | Phase::Requesting) {
            self.phase = Phase::Deleting;
            self.retx = Retransmit::new(now);
            self.send_current();
            true
        } else {
            self.phase = Phase::Done;
            false
        }
    }

    /// Whether the client has finished.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// RFC 6887 §7.4 result code names.
pub fn result_name(code: u8) -> &'static str {
    match code {
        0 => "SUCCESS",
        1 => "UNSUPP_VERSION",
        2 => "NOT_AUTHORIZED",
        3 => "MALFORMED_REQUEST",
        4 => "UNSUPP_OPCODE",
        5 => "UNSUPP_OPTION",
        6 => "MALFORMED_OPTION",
        7 => "NETWORK_FAILURE",
        8 => "NO_RESOURCES",
        9 => "UNSUPP_PROTOCOL",
        10 => "USER_EX_QUOTA",
        11 => "CANNOT_PROVIDE_EXTERNAL",
        12 => "ADDRESS_MISMATCH",
        13 => "EXCESSIVE_REMOTE_PEERS",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn gw() -> SocketAddrV4 {
        "10.0.0.1:5351".parse().unwrap()
    }

    /// A MAP response laid out by hand from RFC 6887 §7.2 and §11.1.
    fn response(
        result: u8,
        lifetime: u32,
        epoch: u32,
        nonce: [u8; 12],
        ext: [u8; 4],
        port: u16,
    ) -> Vec<u8> {
        let mut b = vec![2, 0x81, 0, result];
        b.extend_from_slice(&lifetime.to_be_bytes());
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(&[0; 12]);
        b.extend_from_slice(&nonce);
        b.extend_from_slice(&[17, 0, 0, 0]);
        b.extend_from_slice(&4000u16.to_be_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        b.extend_from_slice(&ext);
        b
    }

    #[test]
    fn map_request_layout() {
        let r = MapRequest {
            client: "10.1.0.10".parse().unwrap(),
            lifetime: 7200,
            nonce: NONCE,
            internal_port: 4000,
            suggested: "0.0.0.0:4000".parse().unwrap(),
        };
        let mut want = vec![2, 1, 0, 0, 0, 0, 0x1c, 0x20];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 0, 10]);
        want.extend_from_slice(&NONCE);
        want.extend_from_slice(&[17, 0, 0, 0, 0x0f, 0xa0, 0x0f, 0xa0]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(r.encode().to_vec(), want);
    }

    #[test]
    fn map_response_layout() {
        let b = response(0, 3600, 77, NONCE, [198, 18, 0, 21], 5000);
        let r = decode_response(&b).unwrap();
        assert_eq!(r.result, 0);
        assert_eq!(r.lifetime, 3600);
        assert_eq!(r.epoch, 77);
        assert_eq!(r.nonce, NONCE);
        assert_eq!(r.protocol, 17);
        assert_eq!(r.internal_port, 4000);
        assert_eq!(
            r.external,
            "198.18.0.21:5000".parse::<SocketAddr>().unwrap()
        );
        // With options appended: still decodes.
        let mut long = b.clone();
        long.extend_from_slice(&[0x01, 0, 0, 0]);
        assert!(decode_response(&long).is_ok());
        assert_eq!(
            decode_response(&vec![2; 1101]),
            Err(DecodeError::Length(1101))
        );
        assert_eq!(decode_response(&b[..59]), Err(DecodeError::Length(59)));
        assert_eq!(
            decode_response(&[0, 0x81, 0, 1, 0, 0, 0, 0]),
            Err(DecodeError::NatPmp(1))
        );
        let mut hdr = b[..24].to_vec();
        hdr[3] = 1;
        assert_eq!(decode_response(&hdr), Err(DecodeError::ShortError(1)));
    }

    #[test]
    fn decode_never_panics() {
        for len in 0..80 {
            for first in [0u8, 1, 2, 3] {
                for fill in [0u8, 0x81, 0xff] {
                    let mut v = vec![fill; len];
                    if !v.is_empty() {
                        v[0] = first;
                    }
                    let _ = decode_response(&v);
                }
            }
        }
    }

    #[test]
    fn map_renew_delete() {
        let t0 = Instant::now();
        let from = SocketAddr::V4(gw());
        let mut c = PcpClient::new(t0, gw(), "10.1.0.10".parse().unwrap(), 4000, 7200, NONCE);
        let (to, first) = c.poll_transmit().unwrap();
        assert_eq!(to, from);
        assert_eq!(first.len(), MAP_LEN);
        // Wrong nonce: ignored.
        let mut bad_nonce = NONCE;
        bad_nonce[0] ^= 1;
        let r = response(0, 100, 5, bad_nonce, [198, 18, 0, 21], 5000);
        assert_eq!(c.handle_response(t0, from, &r), Outcome::None);
        let r = response(0, 100, 5, NONCE, [198, 18, 0, 21], 5000);
        let Outcome::Mapped(m) = c.handle_response(t0, from, &r) else {
            panic!()
        };
        assert_eq!(
            m.external,
            "198.18.0.21:5000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(m.protocol, Protocol::Pcp);
        let t1 = c.poll_timeout().unwrap();
        assert_eq!(t1, t0 + Duration::from_secs(50));
        c.handle_timeout(t1);
        let (_, renew) = c.poll_transmit().unwrap();
        // The renewal suggests the granted address and keeps the nonce.
        assert_eq!(&renew[24..36], &NONCE);
        assert_eq!(&renew[42..44], &5000u16.to_be_bytes());
        assert!(c.release(t1));
        let (_, del) = c.poll_transmit().unwrap();
        assert_eq!(&del[4..8], &[0, 0, 0, 0]);
        let r = response(0, 0, 55, NONCE, [198, 18, 0, 21], 5000);
        assert_eq!(c.handle_response(t1, from, &r), Outcome::Deleted);
        assert!(c.is_done());
    }

    #[test]
    fn natpmp_only_gateway_is_unsupported() {
        let t0 = Instant::now();
        let mut c = PcpClient::new(t0, gw(), "10.1.0.10".parse().unwrap(), 4000, 7200, NONCE);
        c.poll_transmit();
        assert_eq!(
            c.handle_response(t0, SocketAddr::V4(gw()), &[0, 0x81, 0, 1, 0, 0, 0, 9]),
            Outcome::Unsupported
        );
    }

    #[test]
    fn refusal_fails() {
        let t0 = Instant::now();
        let mut c = PcpClient::new(t0, gw(), "10.1.0.10".parse().unwrap(), 4000, 7200, NONCE);
        c.poll_transmit();
        let r = response(result::NOT_AUTHORIZED, 30, 5, NONCE, [0; 4], 0);
        assert!(matches!(
            c.handle_response(t0, SocketAddr::V4(gw()), &r),
            Outcome::Failed(_)
        ));
    }
}
