//! Control messages: serde enums encoded with bincode 2 behind a 2-byte header.
//!
//! ```text
//! +------+-------+-------------------------------+
//! | 0x22 | ver=1 | bincode (standard config) ... |
//! +------+-------+-------------------------------+
//! ```
//!
//! [`ClientMsg`] and [`ServerMsg`] travel in TCP frames on the node's control session;
//! [`UdpMsg`] travels in UDP datagrams between a node and the relay. New variants are only
//! ever appended, so an older peer answers an unknown one with a decode error rather than
//! misreading it. Everything is decoded with a byte limit ([`super::MAX_PACKET`]).

use std::net::SocketAddr;

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::relay_data::ChannelId;
use super::{KIND_CONTROL, MAX_PACKET, PeerId, WIRE_VERSION, WireError, check_header};

/// Most candidates a node may advertise; more is a protocol violation.
pub const MAX_CANDIDATES: usize = 32;
/// Longest access token accepted.
pub const MAX_TOKEN_LEN: usize = 256;
/// Longest free-text field (agent string, error message).
pub const MAX_TEXT_LEN: usize = 512;

/// Domain separation for the registration signature: the node signs
/// `REGISTER_CONTEXT || nonce`, never a bare relay-chosen nonce, so a relay cannot make a node
/// sign something meaningful elsewhere.
pub const REGISTER_CONTEXT: &[u8] = b"burrow register v1\0";

/// The bytes a node signs to register: context string followed by the relay's nonce.
pub fn register_signed_bytes(nonce: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(REGISTER_CONTEXT.len() + 32);
    m.extend_from_slice(REGISTER_CONTEXT);
    m.extend_from_slice(nonce);
    m
}

/// An Ed25519 signature (serde has no impl for `[u8; 64]`).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(pub [u8; 32], pub [u8; 32]);

impl Signature {
    /// From the 64 signature bytes.
    pub fn from_bytes(b: [u8; 64]) -> Self {
        let mut r = [0; 32];
        let mut s = [0; 32];
        r.copy_from_slice(&b[..32]);
        s.copy_from_slice(&b[32..]);
        Signature(r, s)
    }

    /// The 64 signature bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0; 64];
        b[..32].copy_from_slice(&self.0);
        b[32..].copy_from_slice(&self.1);
        b
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signature(..)")
    }
}

/// Where a candidate address came from (RFC 8445 candidate types, plus port prediction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CandidateKind {
    /// An address of one of the node's own interfaces.
    Host,
    /// The node's address as a STUN server or the relay saw it.
    ServerReflexive,
    /// A mapping obtained from the router (NAT-PMP, PCP, UPnP IGD).
    PortMapped,
    /// A guessed address (sequential port allocation).
    Predicted,
}

/// An address at which a node may be reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// The address.
    pub addr: SocketAddr,
    /// How it was found.
    pub kind: CandidateKind,
}

/// RFC 4787 mapping behaviour as measured by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum MappingBehavior {
    /// Not measured (yet).
    #[default]
    Unknown,
    /// No NAT: the reflexive address is a host address.
    NoNat,
    /// Endpoint-independent mapping ("easy" NAT).
    EndpointIndependent,
    /// Address- or address-and-port-dependent mapping ("symmetric", "hard" NAT).
    EndpointDependent,
}

/// RFC 4787 port allocation behaviour as measured by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum PortAllocation {
    /// Not measured.
    #[default]
    Unknown,
    /// The external port equals the internal port.
    Preserving,
    /// Consecutive mappings get nearby ports (with the observed step).
    Sequential(i32),
    /// No pattern.
    Random,
}

/// What a node knows of its own NAT, shared with peers through the introduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct NatReport {
    /// Mapping behaviour.
    pub mapping: MappingBehavior,
    /// Port allocation behaviour.
    pub allocation: PortAllocation,
    /// Whether UDP reached the relay at all.
    pub udp: bool,
}

/// Which side of an introduction a node is. The initiator (the side that asked to connect)
/// is the QUIC client; roles also break ties in punching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Asked for the connection.
    Initiator,
    /// Was asked.
    Responder,
}

/// How a node reaches the relay for relayed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RelayTransport {
    /// UDP datagrams ([`super::relay_data`]).
    Udp,
    /// TCP frames on the control session.
    Tcp,
}

/// The answer to a node's challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The identity being registered.
    pub peer_id: PeerId,
    /// Signature over [`register_signed_bytes`] of the challenge nonce.
    pub signature: Signature,
    /// Access token, when the relay requires one.
    pub token: Option<String>,
    /// The node's own candidates (host addresses, mappings).
    #[serde(deserialize_with = "bounded_candidates")]
    pub candidates: Vec<Candidate>,
    /// What the node measured of its NAT.
    pub nat: NatReport,
    /// Free text such as "burrow 0.1.0", for the relay's logs.
    pub agent: String,
}

/// Node → relay on the TCP control session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Registers after a [`ServerMsg::Challenge`].
    Register(Register),
    /// Asks the relay to introduce this node to `peer`.
    Connect {
        /// Who to reach.
        peer: PeerId,
        /// Echoed in the answer, to match it.
        request_id: u32,
    },
    /// New candidates or NAT report (after roaming or a new measurement).
    UpdateCandidates {
        /// Replaces the node's candidate list.
        #[serde(deserialize_with = "bounded_candidates")]
        candidates: Vec<Candidate>,
        /// Replaces the node's NAT report.
        nat: NatReport,
    },
    /// Keepalive; answered with [`ServerMsg::Pong`].
    Ping {
        /// Echoed.
        seq: u64,
    },
    /// The node no longer needs this relayed channel.
    CloseChannel {
        /// Which one.
        channel: ChannelId,
    },
    /// Asks the relay to send this node's relayed data over TCP instead of UDP (UDP does
    /// not work from where the node is), or back to UDP.
    SetRelayTransport {
        /// The transport to use from now on.
        transport: RelayTransport,
    },
}

/// Why a `Connect` did not produce an introduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectFailure {
    /// No node with that ID is registered here.
    UnknownPeer,
    /// A node cannot connect to itself.
    SelfConnect,
    /// Too many introductions or channels; try later.
    RateLimited,
    /// The relay's channel table is full.
    TooManyChannels,
}

/// Why the relay is closing a session. Sent in [`ServerMsg::Error`] right before it closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The signature did not verify for the claimed ID.
    BadSignature,
    /// The relay requires a token and none, or a wrong one, was given.
    Unauthorized,
    /// The relay is at its session limit.
    TooManySessions,
    /// Too many registrations from this address; back off.
    RateLimited,
    /// No registration within the handshake timeout.
    HandshakeTimeout,
    /// Nothing heard within the idle timeout.
    IdleTimeout,
    /// A malformed or unexpected message.
    ProtocolViolation,
    /// The same ID registered again elsewhere (proving the key); this session is replaced.
    Replaced,
    /// The relay is shutting down.
    Shutdown,
    /// The node did not read fast enough; its queue overflowed.
    TooSlow,
}

/// An introduction: everything a node needs to reach a peer directly and via the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    /// The other node.
    pub peer: PeerId,
    /// For relayed data between the two, from now on.
    pub channel: ChannelId,
    /// Shared secret authenticating punch probes ([`super::punch`]); fresh per introduction.
    pub punch_nonce: [u8; 32],
    /// This node's role.
    pub role: Role,
    /// The peer's candidates, the relay-observed reflexive address first.
    #[serde(deserialize_with = "bounded_candidates")]
    pub candidates: Vec<Candidate>,
    /// The peer's NAT report.
    pub nat: NatReport,
    /// Set on the initiator's copy: the `request_id` of its `Connect`.
    pub request_id: Option<u32>,
}

/// Relay → node on the TCP control session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// First message on a session: sign this nonce to register.
    Challenge {
        /// Random, fresh per session.
        nonce: [u8; 32],
        /// Whether a token is required.
        token_required: bool,
    },
    /// Registration accepted.
    Registered {
        /// Send this in [`UdpMsg::Bind`] so the relay learns the node's UDP address.
        udp_token: [u8; 16],
        /// The node's address as seen on this TCP connection.
        observed_tcp: SocketAddr,
        /// How often the relay expects a keepalive, in seconds.
        keepalive_secs: u16,
        /// The relay's alternate STUN address (RFC 5780 OTHER-ADDRESS), if any.
        stun_alternate: Option<SocketAddr>,
    },
    /// Introduction to a peer (sent to both sides).
    Introduce(Introduction),
    /// A `Connect` failed.
    ConnectFailed {
        /// Who was asked for.
        peer: PeerId,
        /// The request's ID.
        request_id: u32,
        /// Why.
        reason: ConnectFailure,
        /// For humans.
        message: String,
    },
    /// The peer on this channel is gone (disconnected, replaced or channel closed).
    PeerGone {
        /// Who.
        peer: PeerId,
        /// The channel that no longer forwards.
        channel: ChannelId,
    },
    /// Answer to [`ClientMsg::Ping`].
    Pong {
        /// Echoed.
        seq: u64,
    },
    /// Fatal: the relay closes the session after this.
    Error {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for humans.
        message: String,
    },
    /// A peer's candidates changed (it roamed); sent to every peer it has a channel with.
    PeerCandidates {
        /// Who.
        peer: PeerId,
        /// On which channel.
        channel: ChannelId,
        /// Its new candidates.
        #[serde(deserialize_with = "bounded_candidates")]
        candidates: Vec<Candidate>,
        /// Its NAT report.
        nat: NatReport,
    },
}

/// Node ↔ relay over UDP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UdpMsg {
    /// Binds the sender's UDP address to the session that got this token. Repeated as a
    /// keepalive for the NAT mapping toward the relay.
    Bind {
        /// From [`ServerMsg::Registered`].
        token: [u8; 16],
        /// Echoed.
        seq: u32,
    },
    /// The relay's answer to `Bind`.
    Bound {
        /// Echoed.
        seq: u32,
        /// The address the bind came from.
        observed: SocketAddr,
    },
    /// The token is unknown (the relay restarted or the session ended): register again.
    BindRejected {
        /// Echoed.
        seq: u32,
    },
}

/// Decodes a candidate list, refusing more than [`MAX_CANDIDATES`] as soon as the length is
/// read or the list passes it.
///
/// serde's own `Vec` visitor preallocates from the length the message claims (up to 1 MiB),
/// and bincode's byte limit does not apply to sequences: an 8-byte message claiming 2^31
/// candidates made the decoder allocate 1 MiB, and a 64 KiB one full of real candidates
/// ~600 KiB, breaking this module's [`MAX_PACKET`] allocation bound. Found by
/// `tests/wire_props.rs`. The bytes on the wire are unchanged; a longer list was already a
/// protocol violation (see [`Validate`]).
fn bounded_candidates<'de, D>(deserializer: D) -> Result<Vec<Candidate>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct BoundedVisitor;

    impl<'de> serde::de::Visitor<'de> for BoundedVisitor {
        type Value = Vec<Candidate>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_CANDIDATES} candidates")
        }

        fn visit_seq<A>(self, mut seq: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::SeqAccess<'de>,
        {
            let too_many = |n: usize| serde::de::Error::invalid_length(n, &BoundedVisitor);
            if let Some(n) = seq.size_hint().filter(|&n| n > MAX_CANDIDATES) {
                return Err(too_many(n));
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(c) = seq.next_element()? {
                if out.len() == MAX_CANDIDATES {
                    return Err(too_many(out.len() + 1));
                }
                out.push(c);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(BoundedVisitor)
}

type LimitedConfig = Configuration<LittleEndian, Varint, Limit<MAX_PACKET>>;

fn bincode_config() -> LimitedConfig {
    config::standard().with_limit::<MAX_PACKET>()
}

/// Appends `[0x22][version][bincode(msg)]` to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.push(KIND_CONTROL);
    out.push(WIRE_VERSION);
    match bincode::serde::encode_into_std_write(msg, out, bincode_config()) {
        Ok(_) if out.len() - start <= MAX_PACKET => Ok(()),
        Ok(_) => {
            let len = out.len() - start;
            out.truncate(start);
            Err(WireError::TooLarge(len))
        }
        Err(e) => {
            out.truncate(start);
            Err(WireError::Malformed(e.to_string()))
        }
    }
}

/// Encodes to a fresh `Vec`.
pub fn to_vec<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut v = Vec::new();
    encode(msg, &mut v)?;
    Ok(v)
}

/// Decodes a control packet, refusing trailing bytes and anything over the size limit.
pub fn decode<T: DeserializeOwned>(packet: &[u8]) -> Result<T, WireError> {
    check_header(packet, KIND_CONTROL, 2)?;
    let (msg, used) = bincode::serde::decode_from_slice(&packet[2..], bincode_config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != packet.len() - 2 {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            packet.len() - 2 - used
        )));
    }
    Ok(msg)
}

/// Checks the bounds bincode cannot express (list lengths, text lengths).
pub trait Validate {
    /// `Err` with the reason when a field is out of bounds.
    fn validate(&self) -> Result<(), WireError>;
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::Malformed(format!("{what}: {len} > {max}")));
    }
    Ok(())
}

impl Validate for ClientMsg {
    fn validate(&self) -> Result<(), WireError> {
        match self {
            ClientMsg::Register(r) => {
                check_len("candidates", r.candidates.len(), MAX_CANDIDATES)?;
                check_len(
                    "token",
                    r.token.as_ref().map_or(0, String::len),
                    MAX_TOKEN_LEN,
                )?;
                check_len("agent", r.agent.len(), MAX_TEXT_LEN)
            }
            ClientMsg::UpdateCandidates { candidates, .. } => {
                check_len("candidates", candidates.len(), MAX_CANDIDATES)
            }
            _ => Ok(()),
        }
    }
}

impl Validate for ServerMsg {
    fn validate(&self) -> Result<(), WireError> {
        match self {
            ServerMsg::Introduce(i) => check_len("candidates", i.candidates.len(), MAX_CANDIDATES),
            ServerMsg::PeerCandidates { candidates, .. } => {
                check_len("candidates", candidates.len(), MAX_CANDIDATES)
            }
            ServerMsg::ConnectFailed { message, .. } | ServerMsg::Error { message, .. } => {
                check_len("message", message.len(), MAX_TEXT_LEN)
            }
            _ => Ok(()),
        }
    }
}

impl Validate for UdpMsg {
    fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

/// [`decode`] followed by [`Validate::validate`].
pub fn decode_valid<T: DeserializeOwned + Validate>(packet: &[u8]) -> Result<T, WireError> {
    let msg: T = decode(packet)?;
    msg.validate()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> PeerId {
        PeerId([b; 32])
    }

    #[test]
    fn fixed_bytes_ping() {
        let bytes = to_vec(&ClientMsg::Ping { seq: 5 }).unwrap();
        // kind, version, variant index 3 (varint), seq 5 (varint).
        assert_eq!(bytes, [0x22, 1, 3, 5]);
        assert_eq!(
            decode::<ClientMsg>(&bytes).unwrap(),
            ClientMsg::Ping { seq: 5 }
        );
    }

    #[test]
    fn fixed_bytes_connect() {
        let bytes = to_vec(&ClientMsg::Connect {
            peer: id(0xAB),
            request_id: 300,
        })
        .unwrap();
        let mut want = vec![0x22, 1, 1];
        want.extend_from_slice(&[0xAB; 32]);
        want.extend_from_slice(&[251, 0x2C, 0x01]); // varint u16 marker + 300 LE
        assert_eq!(bytes, want);
    }

    #[test]
    fn fixed_bytes_udp_bind() {
        let bytes = to_vec(&UdpMsg::Bind {
            token: [7; 16],
            seq: 1,
        })
        .unwrap();
        let mut want = vec![0x22, 1, 0];
        want.extend_from_slice(&[7; 16]);
        want.push(1);
        assert_eq!(bytes, want);
    }

    #[test]
    fn introduction_round_trips() {
        let msg = ServerMsg::Introduce(Introduction {
            peer: id(1),
            channel: ChannelId(77),
            punch_nonce: [9; 32],
            role: Role::Responder,
            candidates: vec![Candidate {
                addr: "[2001:db8::1]:5000".parse().unwrap(),
                kind: CandidateKind::Host,
            }],
            nat: NatReport {
                mapping: MappingBehavior::EndpointDependent,
                allocation: PortAllocation::Sequential(2),
                udp: true,
            },
            request_id: Some(4),
        });
        let bytes = to_vec(&msg).unwrap();
        assert_eq!(decode_valid::<ServerMsg>(&bytes).unwrap(), msg);
    }

    #[test]
    fn huge_claimed_length_is_refused_not_allocated() {
        // Register with a token claiming 2^40 bytes: must fail on the limit, not abort.
        let mut bytes = vec![0x22, 1, 0];
        bytes.extend_from_slice(&[0x11; 32]); // peer id
        bytes.extend_from_slice(&[0x22; 64]); // signature
        bytes.push(1); // Some(token)
        bytes.push(253); // varint u64 marker
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            decode::<ClientMsg>(&bytes),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_and_bad_variants_are_refused() {
        assert!(decode::<ClientMsg>(&[0x22, 1, 3, 5, 0]).is_err());
        assert!(decode::<ClientMsg>(&[0x22, 1, 99]).is_err());
        assert!(decode::<ClientMsg>(&[0x22, 2, 3, 5]).is_err());
        assert!(decode::<ClientMsg>(&[0x22]).is_err());
    }

    #[test]
    fn too_many_candidates_fail_validation() {
        let msg = ClientMsg::UpdateCandidates {
            candidates: vec![
                Candidate {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    kind: CandidateKind::Host
                };
                MAX_CANDIDATES + 1
            ],
            nat: NatReport::default(),
        };
        let bytes = to_vec(&msg).unwrap();
        assert!(decode_valid::<ClientMsg>(&bytes).is_err());
        // Refused by the decoder itself, before building the list.
        assert!(decode::<ClientMsg>(&bytes).is_err());
    }

    #[test]
    fn huge_candidate_count_is_refused_before_allocating() {
        // Regression (found by tests/wire_props.rs): UpdateCandidates claiming 2^31 - 1
        // candidates made serde preallocate 1 MiB. Now refused on the length alone.
        let bytes = [0x22, 1, 2, 252, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            decode::<ClientMsg>(&bytes),
            Err(WireError::Malformed(m)) if m.contains("at most")
        ));
    }
}
