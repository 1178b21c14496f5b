//! NAT-PMP (RFC 6886): codec and the client state machine for one UDP mapping.
//!
//! NAT-PMP needs two exchanges: "external address" (opcode 0) for the public IP, and "map
//! UDP" (opcode 1) for the port. Both go to the gateway's port 5351 and the reply comes
//! back from there; the mapping belongs to the request's source IP (the router takes the
//! internal client from the packet's source address, RFC 6886 §3.3).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use tracing::{debug, trace};

use super::{Mapping, Protocol, Retransmit};

/// NAT-PMP's version number (RFC 6886 §3.2).
pub const VERSION: u8 = 0;
/// Opcode of the external address request.
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode of the UDP mapping request (2 is TCP).
pub const OP_MAP_UDP: u8 = 1;
/// A response's opcode is the request's plus 128 (RFC 6886 §3.2).
pub const OP_RESPONSE: u8 = 128;

/// The external address request (RFC 6886 §3.2): version, opcode.
pub fn encode_external_address_request() -> [u8; 2] {
    [VERSION, OP_EXTERNAL_ADDRESS]
}

/// A UDP mapping request (RFC 6886 §3.3): version, opcode, 16 reserved bits, internal
/// port, suggested external port, requested lifetime in seconds (0 deletes).
pub fn encode_map_request(internal_port: u16, external_port: u16, lifetime: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = VERSION;
    b[1] = OP_MAP_UDP;
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&external_port.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

/// A decoded NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// Answer to the external address request.
    ExternalAddress {
        /// Result code (0 = success).
        result: u16,
        /// Seconds since the gateway's mapping table was (re)initialised.
        epoch: u32,
        /// The gateway's external IPv4 address.
        address: Ipv4Addr,
    },
    /// Answer to a UDP mapping request.
    MapUdp {
        /// Result code (0 = success).
        result: u16,
        /// Seconds since the gateway's mapping table was (re)initialised.
        epoch: u32,
        /// Our internal port the mapping is for.
        internal_port: u16,
        /// The external port the gateway assigned.
        external_port: u16,
        /// Granted lifetime in seconds.
        lifetime: u32,
    },
    /// A response with an error code too short to carry the opcode's body (RFC 6886 §3.5:
    /// "unsupported version" replies are 8 bytes), or any other opcode.
    Other {
        /// Opcode byte.
        opcode: u8,
        /// Result code.
        result: u16,
    },
}

/// Why a datagram is not a NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the opcode's layout.
    #[error("truncated NAT-PMP response")]
    Truncated,
    /// Version byte is not 0.
    #[error("not NAT-PMP (version {0})")]
    Version(u8),
    /// The R bit (opcode >= 128) is not set: a request, not a response.
    #[error("not a response")]
    NotResponse,
}

/// Decodes a response. Trailing bytes are ignored (RFC 6886 §3.2 lets future versions
/// extend packets); nothing here allocates.
pub fn decode_response(b: &[u8]) -> Result<Response, DecodeError> {
    if b.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    if b[0] != VERSION {
        return Err(DecodeError::Version(b[0]));
    }
    let opcode = b[1];
    if opcode < OP_RESPONSE {
        return Err(DecodeError::NotResponse);
    }
    let result = u16::from_be_bytes([b[2], b[3]]);
    let epoch = |b: &[u8]| u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    match opcode - OP_RESPONSE {
        OP_EXTERNAL_ADDRESS if b.len() >= 12 => Ok(Response::ExternalAddress {
            result,
            epoch: epoch(b),
            address: Ipv4Addr::new(b[8], b[9], b[10], b[11]),
        }),
        OP_MAP_UDP if b.len() >= 16 => Ok(Response::MapUdp {
            result,
            epoch: epoch(b),
            internal_port: u16::from_be_bytes([b[8], b[9]]),
            external_port: u16::from_be_bytes([b[10], b[11]]),
            lifetime: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }),
        _ if result != 0 => Ok(Response::Other { opcode, result }),
        _ => Err(DecodeError::Truncated),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Asking for the external address.
    Address,
    /// Asking for the mapping (external address known).
    Map { address: Ipv4Addr },
    /// Mapped; renewing at `renew_at`.
    Mapped {
        address: Ipv4Addr,
        external_port: u16,
        renew_at: Instant,
        expires: Instant,
    },
    /// Sending the delete (lifetime 0) request.
    Deleting,
    /// Finished (failed, deleted, or gave up).
    Done,
}

/// What [`NatPmpClient::handle_response`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report (still working, or the datagram was not for us).
    None,
    /// A mapping was obtained or renewed.
    Mapped(Mapping),
    /// The gateway does not speak NAT-PMP or refused: try the next protocol.
    Failed(String),
    /// The delete was confirmed.
    Deleted,
}

/// One UDP mapping via NAT-PMP. Drain order after each input: [`NatPmpClient::poll_transmit`]
/// until `None`, then sleep until [`NatPmpClient::poll_timeout`].
#[derive(Debug)]
pub struct NatPmpClient {
    gateway: SocketAddrV4,
    internal_port: u16,
    lifetime: u32,
    phase: Phase,
    retx: Retransmit,
    /// The last epoch seen: one that goes backwards means the gateway rebooted and lost our
    /// mapping (RFC 6886 §3.6), so we map again.
    epoch: Option<(u32, Instant)>,
    out: Option<Vec<u8>>,
}

impl NatPmpClient {
    /// Starts by asking `gateway` (port 5351) for its external address.
    pub fn new(now: Instant, gateway: SocketAddrV4, internal_port: u16, lifetime: u32) -> Self {
        let mut c = NatPmpClient {
            gateway,
            internal_port,
            lifetime,
            phase: Phase::Address,
            retx: Retransmit::new(now),
            epoch: None,
            out: None,
        };
        c.send_current();
        c
    }

    fn send_current(&mut self) {
        self.out = match self.phase {
            Phase::Address => Some(encode_external_address_request().to_vec()),
            Phase::Map { .. } => Some(
                encode_map_request(self.internal_port, self.internal_port, self.lifetime).to_vec(),
            ),
            Phase::Mapped { external_port, .. } => {
                Some(encode_map_request(self.internal_port, external_port, self.lifetime).to_vec())
            }
            // RFC 6886 §3.4: delete = lifetime 0 and suggested external port 0.
            Phase::Deleting => Some(encode_map_request(self.internal_port, 0, 0).to_vec()),
            Phase::Done => None,
        };
    }

    /// The datagram to send to the gateway next, if any.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.take().map(|b| (SocketAddr::V4(self.gateway), b))
    }

    /// When [`NatPmpClient::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Done => None,
            Phase::Mapped { renew_at, .. } if !self.retx.active() => Some(renew_at),
            _ => self.retx.next(),
        }
    }

    /// Retransmits, gives up, or renews. Returns `Failed` when the gateway stayed silent.
    pub fn handle_timeout(&mut self, now: Instant) -> Outcome {
        match self.phase {
            Phase::Done => Outcome::None,
            Phase::Mapped {
                renew_at, expires, ..
            } if !self.retx.active() => {
                if now >= renew_at {
                    trace!(?expires, "NAT-PMP: renewing");
                    self.retx = Retransmit::new(now);
                    self.send_current();
                }
                Outcome::None
            }
            _ => {
                if !self.retx.due(now) {
                    return Outcome::None;
                }
                if self.retx.fire(now) {
                    self.send_current();
                    Outcome::None
                } else if let Phase::Mapped { expires, .. } = self.phase {
                    // Renewal unanswered: keep the mapping until it expires, retrying later.
                    if now >= expires {
                        self.phase = Phase::Done;
                        Outcome::Failed("NAT-PMP renewal unanswered; mapping expired".into())
                    } else {
                        self.retx = Retransmit::idle();
                        if let Phase::Mapped { renew_at, .. } = &mut self.phase {
                            *renew_at = now + (expires - now) / 2;
                        }
                        Outcome::None
                    }
                } else if self.phase == Phase::Deleting {
                    self.phase = Phase::Done;
                    Outcome::Deleted
                } else {
                    self.phase = Phase::Done;
                    Outcome::Failed("no NAT-PMP answer from the gateway".into())
                }
            }
        }
    }

    /// A datagram from the gateway's port 5351.
    pub fn handle_response(&mut self, now: Instant, from: SocketAddr, b: &[u8]) -> Outcome {
        if from != SocketAddr::V4(self.gateway) {
            trace!(%from, "NAT-PMP: reply not from the gateway; dropped");
            return Outcome::None;
        }
        let resp = match decode_response(b) {
            Ok(r) => r,
            Err(e) => {
                trace!("NAT-PMP: {e}; dropped");
                return Outcome::None;
            }
        };
        if let Response::ExternalAddress { epoch, .. } | Response::MapUdp { epoch, .. } = resp
            && self.epoch_went_back(now, epoch)
            && matches!(self.phase, Phase::Mapped { .. })
        {
            debug!("NAT-PMP: gateway epoch went back (reboot); mapping again");
            self.phase = Phase::Address;
            self.retx = Retransmit::new(now);
            self.send_current();
            return Outcome::None;
        }
        match (self.phase, resp) {
            (_, Response::Other { opcode, result }) => {
                if self.phase == Phase::Deleting || self.phase == Phase::Done {
                    self.phase = Phase::Done;
                    return Outcome::Deleted;
                }
                self.phase = Phase::Done;
                Outcome::Failed(format!(
                    "NAT-PMP error {result} ({}) for opcode {opcode}",
                    result_name(result)
                ))
            }
            (
                Phase::Address,
                Response::ExternalAddress {
                    result, address, ..
                },
            ) => {
                if result != 0 {
                    self.phase = Phase::Done;
                    return Outcome::Failed(format!(
                        "NAT-PMP external address: error {result} ({})",
                        result_name(result)
                    ));
                }
                self.phase = Phase::Map { address };
                self.retx = Retransmit::new(now);
                self.send_current();
                Outcome::None
            }
            (
                Phase::Map { address } | Phase::Mapped { address, .. },
                Response::MapUdp {
                    result,
                    internal_port,
                    external_port,
                    lifetime,
                    ..
                },
            ) if internal_port == self.internal_port => {
                if result != 0 || external_port == 0 || lifetime == 0 {
                    self.phase = Phase::Done;
                    return Outcome::Failed(format!(
                        "NAT-PMP map: error {result} ({})",
                        result_name(result)
                    ));
                }
                let life = Duration::from_secs(lifetime.into());
                self.phase = Phase::Mapped {
                    address,
                    external_port,
                    // RFC 6886 §3.3: "the client SHOULD begin trying to renew the mapping
                    // halfway to expiry time".
                    renew_at: now + life / 2,
                    expires: now + life,
                };
                self.retx = Retransmit::idle();
                Outcome::Mapped(Mapping {
                    protocol: Protocol::NatPmp,
                    external: SocketAddr::new(address.into(), external_port),
                    internal_port: self.internal_port,
                    lifetime: life,
                })
            }
            (Phase::Deleting, Response::MapUdp { internal_port, .. })
                if internal_port == self.internal_port =>
            {
                self.phase = Phase::Done;
                Outcome::Deleted
            }
            (_, other) => {
                trace!(?other, "NAT-PMP: unexpected response; dropped");
                Outcome::None
            }
        }
    }

    fn epoch_went_back(&mut self, now: Instant, epoch: u32) -> bool {
        // RFC 6886 §3.6: the epoch must advance with our clock, give or take 1/8 (and 2 s)
        // of slack; if it is smaller than expected, the gateway lost its state.
        let back = match self.epoch {
            Some((prev, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs();
                let expected = u64::from(prev) + elapsed * 7 / 8;
                u64::from(epoch) + 2 < expected
            }
            None => false,
        };
        self.epoch = Some((epoch, now));
        back
    }

    /// Starts deleting the mapping (if there is one). Returns whether a delete was sent.
    pub fn release(&mut self, now: Instant) -> bool {
        if matches!(self.phase, Phase::Mapped { .. } | Phase::Map { .. }) {
            self.phase = Phase::Deleting;
            self.retx = Retransmit::new(now);
            self.send_current();
            true
        } else {
            self.phase = Phase::Done;
            false
        }
    }

    /// Whether the client has finished (nothing more to send or wait for).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// RFC 6886 §3.5 result codes.
pub fn result_name(code: u16) -> &'static str {
    match code {
        0 => "success",
        1 => "unsupported version",
        2 => "not authorized/refused",
        3 => "network failure",
        4 => "out of resources",
        5 => "unsupported opcode",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> SocketAddrV4 {
        "10.0.0.1:5351".parse().unwrap()
    }

    #[test]
    fn request_layouts() {
        assert_eq!(encode_external_address_request(), [0, 0]);
        // RFC 6886 §3.3 layout: 0 | 1 | reserved(2) | internal | external | lifetime.
        assert_eq!(
            encode_map_request(0x1234, 0x5678, 7200),
            [0, 1, 0, 0, 0x12, 0x34, 0x56, 0x78, 0, 0, 0x1c, 0x20]
        );
    }

    #[test]
    fn response_layouts() {
        let b = [0, 128, 0, 0, 0, 0, 1, 0, 198, 18, 0, 21];
        assert_eq!(
            decode_response(&b),
            Ok(Response::ExternalAddress {
                result: 0,
                epoch: 256,
                address: Ipv4Addr::new(198, 18, 0, 21)
            })
        );
        let b = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x12, 0x34, 0x9a, 0xbc, 0, 0, 0x0e, 0x10,
        ];
        assert_eq!(
            decode_response(&b),
            Ok(Response::MapUdp {
                result: 0,
                epoch: 9,
                internal_port: 0x1234,
                external_port: 0x9abc,
                lifetime: 3600
            })
        );
        // An "unsupported version" answer to a PCP request is 8 bytes (RFC 6886 §3.5).
        assert_eq!(
            decode_response(&[0, 129, 0, 1, 0, 0, 0, 0]),
            Ok(Response::Other {
                opcode: 129,
                result: 1
            })
        );
        assert_eq!(
            decode_response(&[0, 129, 0, 0]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_response(&[2, 129, 0, 0]),
            Err(DecodeError::Version(2))
        );
        assert_eq!(
            decode_response(&[0, 1, 0, 0]),
            Err(DecodeError::NotResponse)
        );
    }

    #[test]
    fn decode_never_panics_on_short_or_garbage() {
        for len in 0..40 {
            for fill in [0u8, 0x80, 0xff] {
                let mut v = vec![fill; len];
                if !v.is_empty() {
                    v[0] = 0;
                }
                let _ = decode_response(&v);
            }
        }
    }

    #[test]
    fn address_then_map_then_renew_then_delete() {
        let t0 = Instant::now();
        let mut c = NatPmpClient::new(t0, gw(), 4000, 7200);
        let (to, b) = c.poll_transmit().unwrap();
        assert_eq!(to, SocketAddr::V4(gw()));
        assert_eq!(b, [0, 0]);
        let from = SocketAddr::V4(gw());
        // From another address: ignored.
        let other: SocketAddr = "10.0.0.2:5351".parse().unwrap();
        assert_eq!(
            c.handle_response(t0, other, &[0, 128, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]),
            Outcome::None
        );
        assert_eq!(
            c.handle_response(t0, from, &[0, 128, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]),
            Outcome::None
        );
        let (_, b) = c.poll_transmit().unwrap();
        assert_eq!(b, encode_map_request(4000, 4000, 7200));
        let mut reply = [0u8; 16];
        reply[1] = 129;
        reply[7] = 2;
        reply[8..10].copy_from_slice(&4000u16.to_be_bytes());
        reply[10..12].copy_from_slice(&4001u16.to_be_bytes());
        reply[12..16].copy_from_slice(&100u32.to_be_bytes());
        let m = match c.handle_response(t0, from, &reply) {
            Outcome::Mapped(m) => m,
            o => panic!("{o:?}"),
        };
        assert_eq!(m.external, "1.2.3.4:4001".parse::<SocketAddr>().unwrap());
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(50)));
        let t1 = t0 + Duration::from_secs(50);
        c.handle_timeout(t1);
        let (_, b) = c.poll_transmit().unwrap();
        assert_eq!(b, encode_map_request(4000, 4001, 7200));
        assert!(c.release(t1));
        let (_, b) = c.poll_transmit().unwrap();
        assert_eq!(b, encode_map_request(4000, 0, 0));
        reply[12..16].copy_from_slice(&0u32.to_be_bytes());
        reply[10..12].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(c.handle_response(t1, from, &reply), Outcome::Deleted);
        assert!(c.is_done());
    }

    #[test]
    fn silence_fails_after_bounded_retries() {
        let t0 = Instant::now();
        let mut c = NatPmpClient::new(t0, gw(), 4000, 7200);
        let mut sent = 0;
        for _ in 0..100 {
            while c.poll_transmit().is_some() {
                sent += 1;
            }
            let Some(t) = c.poll_timeout() else { break };
            if let Outcome::Failed(_) = c.handle_timeout(t) {
                assert!(c.is_done());
                assert!(sent <= super::super::RETRANSMITS as usize + 1, "{sent}");
                return;
            }
        }
        panic!("never gave up");
    }
}
