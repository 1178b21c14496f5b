//! The relay's STUN Binding responder (RFC 8489, RFC 3489 classic clients, RFC 5780 NAT
//! behaviour discovery). Stateless: every answer depends only on the request, where it
//! came from, and which relay socket it reached.

use std::net::SocketAddr;

use tracing::{debug, trace};

use crate::wire::stun;

use super::config::RelayConfig;

/// An answer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunReply {
    /// The relay socket to answer from (differs from the receiving one after a
    /// CHANGE-REQUEST).
    pub source: SocketAddr,
    /// Where to (differs from the request's source port after a RESPONSE-PORT).
    pub destination: SocketAddr,
    /// The encoded response.
    pub bytes: Vec<u8>,
    /// Whether it is an error response (420).
    pub is_error: bool,
}

/// What became of a datagram that looked like STUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunOutcome {
    /// Not a well-formed Binding request: dropped without an answer (RFC 8489 section 6.3;
    /// answering garbage would also make the relay an amplifier).
    Dropped,
    /// A Binding request, answered.
    Answered(StunReply),
    /// A Binding request that could not be encoded an answer (e.g. an RFC 3489 client
    /// with an IPv6 address).
    Unanswerable,
}

/// Answers Binding requests on the relay's sockets.
#[derive(Debug, Clone)]
pub struct StunResponder {
    listen: SocketAddr,
    alt_listen: Option<SocketAddr>,
    udp_sockets: Vec<SocketAddr>,
}

impl StunResponder {
    /// A responder for the sockets of `config`.
    pub fn new(config: &RelayConfig) -> Self {
        StunResponder {
            listen: config.listen,
            alt_listen: config.alt_listen,
            udp_sockets: config.udp_sockets(),
        }
    }

    /// Answers `packet`, which arrived on `local` from `from`. Over TCP (RFC 8489 section
    /// 6.2.2) the answer goes back on the same connection, so CHANGE-REQUEST cannot be
    /// honoured (420) and RESPONSE-PORT is ignored.
    pub fn answer(
        &self,
        local: SocketAddr,
        from: SocketAddr,
        packet: &[u8],
        over_tcp: bool,
    ) -> StunOutcome {
        let Some(request) = stun::parse_binding_request(packet) else {
            trace!(%from, "dropping malformed or non-Binding STUN message");
            return StunOutcome::Dropped;
        };
        trace!(%from, %local, change = ?request.change, modern = request.modern, "STUN Binding request");
        let mut buf = [0u8; stun::MAX_BINDING_LEN];
        if !request.modern {
            // RFC 3489 client: MAPPED-ADDRESS only, full 16-byte transaction ID echoed.
            return match stun::classic_binding_success_raw(packet, from, &mut buf) {
                Ok(n) => StunOutcome::Answered(StunReply {
                    source: local,
                    destination: from,
                    bytes: buf[..n].to_vec(),
                    is_error: false,
                }),
                Err(e) => {
                    trace!(%from, error = %e, "cannot answer classic STUN request");
                    StunOutcome::Unanswerable
                }
            };
        }
        let error = |unknown: &[u16]| {
            let mut buf = [0u8; stun::MAX_BINDING_LEN];
            match stun::binding_error(&request, 420, "Unknown Attribute", unknown, &mut buf) {
                Ok(n) => StunOutcome::Answered(StunReply {
                    source: local,
                    destination: from,
                    bytes: buf[..n].to_vec(),
                    is_error: true,
                }),
                Err(_) => StunOutcome::Unanswerable,
            }
        };
        if !request.unknown_required.is_empty() {
            // RFC 8489 section 6.3.1.1: unknown comprehension-required attributes → 420 with
            // UNKNOWN-ATTRIBUTES listing them.
            return error(&request.unknown_required);
        }
        let mut source = local;
        if let Some(change) = request.change
            && (change.ip || change.port)
        {
            match self.changed_socket(local, change).filter(|_| !over_tcp) {
                Some(s) => source = s,
                // RFC 5780 section 6.1: a server that cannot honour a CHANGE-REQUEST (no
                // alternate address, or not the one asked for) answers 420 listing
                // CHANGE-REQUEST (0x0003), so the client knows this test cannot run here.
                None => return error(&[0x0003]),
            }
        }
        let (origin, other) = match self.other_socket(local) {
            Some(other) => (Some(source), Some(other)),
            None => (None, None),
        };
        // RFC 5780 section 7.5: with RESPONSE-PORT, "the Binding Response MUST be transmitted
        // to the source IP address of the Binding Request and the port contained in" it.
        // The mapped address stays the request's source. Only the port can change, so the
        // relay cannot be pointed at another host.
        let destination = match request.response_port {
            Some(port) if port != 0 && !over_tcp => SocketAddr::new(from.ip(), port),
            _ => from,
        };
        match stun::binding_success(&request, from, origin, other, &mut buf) {
            Ok(n) => StunOutcome::Answered(StunReply {
                source,
                destination,
                bytes: buf[..n].to_vec(),
                is_error: false,
            }),
            Err(e) => {
                debug!(%from, error = %e, "cannot encode STUN response");
                StunOutcome::Unanswerable
            }
        }
    }

    /// The (alternate IP, alternate port) pair for `local`: RFC 5780 OTHER-ADDRESS.
    fn other_socket(&self, local: SocketAddr) -> Option<SocketAddr> {
        let alt = self.alt_listen?;
        let primary = self.listen;
        let ip = if local.ip() == primary.ip() {
            alt.ip()
        } else {
            primary.ip()
        };
        let port = if local.port() == primary.port() {
            alt.port()
        } else {
            primary.port()
        };
        let other = SocketAddr::new(ip, port);
        (other != local && self.udp_sockets.contains(&other)).then_some(other)
    }

    /// The socket a CHANGE-REQUEST asks to answer from, if the relay has it.
    fn changed_socket(&self, local: SocketAddr, change: stun::Change) -> Option<SocketAddr> {
        let alt = self.alt_listen?;
        let primary = self.listen;
        let mut ip = local.ip();
        let mut port = local.port();
        if change.ip {
            if primary.ip() == alt.ip() {
                return None;
            }
            ip = if ip == primary.ip() {
                alt.ip()
            } else {
                primary.ip()
            };
        }
        if change.port {
            if primary.port() == alt.port() {
                return None;
            }
            port = if port == primary.port() {
                alt.port()
            } else {
                primary.port()
            };
        }
        let s = SocketAddr::new(ip, port);
        self.udp_sockets.contains(&s).then_some(s)
    }
}
