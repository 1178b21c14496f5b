//! Property tests for every codec in `burrow::wire`, through the public API only.
//!
//! * round trips with arbitrary field values (control messages, relay data, punch packets,
//!   TCP frames, STUN Binding request/response, peer IDs);
//! * tampering: any single-bit flip of a punch packet fails; any truncation of a control
//!   message fails;
//! * "arbitrary bytes never panic" for every decoder, and never make it allocate more than
//!   [`MAX_PACKET`] bytes at once (measured by a per-thread tracking allocator below);
//! * the TCP [`FrameReader`] returns the same frames for any split of a valid stream, and its
//!   buffer never grows past one maximal frame + length prefix + preamble, whatever it is fed
//!   and in whatever order its methods are called.
//!
//! proptest prints the minimal failing input and persists the seed under
//! `proptest-regressions/` on failure; `PROPTEST_CASES` raises the case count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use burrow::wire::control::{
    self, Candidate, CandidateKind, ClientMsg, ConnectFailure, ErrorCode, Introduction,
    MAX_CANDIDATES, MAX_TEXT_LEN, MAX_TOKEN_LEN, MappingBehavior, NatReport, PortAllocation,
    Register, RelayTransport, Role, ServerMsg, Signature, UdpMsg, Validate,
};
use burrow::wire::frame::{self, FrameReader, LENGTH_LEN, MAX_FRAME_BODY, PREAMBLE};
use burrow::wire::punch::{self, PunchPacket, PunchType};
use burrow::wire::relay_data::{self, ChannelId};
use burrow::wire::stun::{self, BindingRequest, Change};
use burrow::wire::{self, MAX_PACKET, PacketClass, PeerId, WireError};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation made by the current thread since the
// last reset. Thread-local so that tests running in parallel do not see each other.
// ---------------------------------------------------------------------------------------

struct TrackingAlloc;

thread_local! {
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // `try_with`: the slot is gone while the thread is being torn down.
    let _ = LARGEST_ALLOC.try_with(|m| {
        if size > m.get() {
            m.set(size);
        }
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: TrackingAlloc = TrackingAlloc;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_alloc_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST_ALLOC.with(|m| m.set(0));
    let r = f();
    (r, LARGEST_ALLOC.with(|m| m.get()))
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Any socket address serde can carry. serde's `SocketAddrV6` form is (ip, port): flow info
/// and scope ID are not on the wire, so they are zero here.
fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn arb_peer() -> impl Strategy<Value = PeerId> {
    any::<[u8; 32]>().prop_map(PeerId)
}

fn arb_signature() -> impl Strategy<Value = Signature> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(r, s)| Signature(r, s))
}

fn arb_channel() -> impl Strategy<Value = ChannelId> {
    any::<u32>().prop_map(ChannelId)
}

fn arb_candidate() -> impl Strategy<Value = Candidate> {
    let kind = prop_oneof![
        Just(CandidateKind::Host),
        Just(CandidateKind::ServerReflexive),
        Just(CandidateKind::PortMapped),
        Just(CandidateKind::Predicted),
    ];
    (arb_addr(), kind).prop_map(|(addr, kind)| Candidate { addr, kind })
}

/// Candidate lists up to a few over the limit, so validation is exercised both ways.
fn arb_candidates() -> impl Strategy<Value = Vec<Candidate>> {
    vec(arb_candidate(), 0..=MAX_CANDIDATES + 3)
}

fn arb_nat() -> impl Strategy<Value = NatReport> {
    let mapping = prop_oneof![
        Just(MappingBehavior::Unknown),
        Just(MappingBehavior::NoNat),
        Just(MappingBehavior::EndpointIndependent),
        Just(MappingBehavior::EndpointDependent),
    ];
    let allocation = prop_oneof![
        Just(PortAllocation::Unknown),
        Just(PortAllocation::Preserving),
        any::<i32>().prop_map(PortAllocation::Sequential),
        Just(PortAllocation::Random),
    ];
    (mapping, allocation, any::<bool>()).prop_map(|(mapping, allocation, udp)| NatReport {
        mapping,
        allocation,
        udp,
    })
}

/// Text of any Unicode content, sometimes longer than the protocol's limits.
fn arb_text(max_chars: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::string::string_regex(".{0,40}").unwrap(),
        1 => vec(any::<char>(), 0..=max_chars).prop_map(|c| c.into_iter().collect()),
    ]
}

fn arb_client_msg() -> impl Strategy<Value = ClientMsg> {
    let register = (
        arb_peer(),
        arb_signature(),
        proptest::option::of(arb_text(MAX_TOKEN_LEN + 8)),
        arb_candidates(),
        arb_nat(),
        arb_text(MAX_TEXT_LEN + 8),
    )
        .prop_map(|(peer_id, signature, token, candidates, nat, agent)| {
            ClientMsg::Register(Register {
                peer_id,
                signature,
                token,
                candidates,
                nat,
                agent,
            })
        });
    prop_oneof![
        register,
        (arb_peer(), any::<u32>())
            .prop_map(|(peer, request_id)| ClientMsg::Connect { peer, request_id }),
        (arb_candidates(), arb_nat())
            .prop_map(|(candidates, nat)| ClientMsg::UpdateCandidates { candidates, nat }),
        any::<u64>().prop_map(|seq| ClientMsg::Ping { seq }),
        arb_channel().prop_map(|channel| ClientMsg::CloseChannel { channel }),
        prop_oneof![Just(RelayTransport::Udp), Just(RelayTransport::Tcp)]
            .prop_map(|transport| ClientMsg::SetRelayTransport { transport }),
    ]
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadSignature),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::TooManySessions),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::HandshakeTimeout),
        Just(ErrorCode::IdleTimeout),
        Just(ErrorCode::ProtocolViolation),
        Just(ErrorCode::Replaced),
        Just(ErrorCode::Shutdown),
        Just(ErrorCode::TooSlow),
    ]
}

fn arb_connect_failure() -> impl Strategy<Value = ConnectFailure> {
    prop_oneof![
        Just(ConnectFailure::UnknownPeer),
        Just(ConnectFailure::SelfConnect),
        Just(ConnectFailure::RateLimited),
        Just(ConnectFailure::TooManyChannels),
    ]
}

fn arb_server_msg() -> impl Strategy<Value = ServerMsg> {
    let introduction = (
        arb_peer(),
        arb_channel(),
        any::<[u8; 32]>(),
        prop_oneof![Just(Role::Initiator), Just(Role::Responder)],
        arb_candidates(),
        arb_nat(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(peer, channel, punch_nonce, role, candidates, nat, request_id)| {
                ServerMsg::Introduce(Introduction {
                    peer,
                    channel,
                    punch_nonce,
                    role,
                    candidates,
                    nat,
                    request_id,
                })
            },
        );
    prop_oneof![
        (any::<[u8; 32]>(), any::<bool>()).prop_map(|(nonce, token_required)| {
            ServerMsg::Challenge {
                nonce,
                token_required,
            }
        }),
        (
            any::<[u8; 16]>(),
            arb_addr(),
            any::<u16>(),
            proptest::option::of(arb_addr())
        )
            .prop_map(
                |(udp_token, observed_tcp, keepalive_secs, stun_alternate)| {
                    ServerMsg::Registered {
                        udp_token,
                        observed_tcp,
                        keepalive_secs,
                        stun_alternate,
                    }
                }
            ),
        introduction,
        (
            arb_peer(),
            any::<u32>(),
            arb_connect_failure(),
            arb_text(MAX_TEXT_LEN + 8)
        )
            .prop_map(
                |(peer, request_id, reason, message)| ServerMsg::ConnectFailed {
                    peer,
                    request_id,
                    reason,
                    message,
                }
            ),
        (arb_peer(), arb_channel())
            .prop_map(|(peer, channel)| ServerMsg::PeerGone { peer, channel }),
        any::<u64>().prop_map(|seq| ServerMsg::Pong { seq }),
        (arb_error_code(), arb_text(MAX_TEXT_LEN + 8))
            .prop_map(|(code, message)| ServerMsg::Error { code, message }),
        (arb_peer(), arb_channel(), arb_candidates(), arb_nat()).prop_map(
            |(peer, channel, candidates, nat)| ServerMsg::PeerCandidates {
                peer,
                channel,
                candidates,
                nat,
            }
        ),
    ]
}

fn arb_udp_msg() -> impl Strategy<Value = UdpMsg> {
    prop_oneof![
        (any::<[u8; 16]>(), any::<u32>()).prop_map(|(token, seq)| UdpMsg::Bind { token, seq }),
        (any::<u32>(), arb_addr()).prop_map(|(seq, observed)| UdpMsg::Bound { seq, observed }),
        any::<u32>().prop_map(|seq| UdpMsg::BindRejected { seq }),
    ]
}

fn client_candidates(m: &ClientMsg) -> usize {
    match m {
        ClientMsg::Register(r) => r.candidates.len(),
        ClientMsg::UpdateCandidates { candidates, .. } => candidates.len(),
        _ => 0,
    }
}

fn server_candidates(m: &ServerMsg) -> usize {
    match m {
        ServerMsg::Introduce(i) => i.candidates.len(),
        ServerMsg::PeerCandidates { candidates, .. } => candidates.len(),
        _ => 0,
    }
}

/// The bounds `Validate` is documented to check, computed independently.
fn client_within_limits(m: &ClientMsg) -> bool {
    match m {
        ClientMsg::Register(r) => {
            r.candidates.len() <= MAX_CANDIDATES
                && r.token.as_ref().is_none_or(|t| t.len() <= MAX_TOKEN_LEN)
                && r.agent.len() <= MAX_TEXT_LEN
        }
        ClientMsg::UpdateCandidates { candidates, .. } => candidates.len() <= MAX_CANDIDATES,
        _ => true,
    }
}

fn server_within_limits(m: &ServerMsg) -> bool {
    match m {
        ServerMsg::Introduce(i) => i.candidates.len() <= MAX_CANDIDATES,
        ServerMsg::PeerCandidates { candidates, .. } => candidates.len() <= MAX_CANDIDATES,
        ServerMsg::ConnectFailed { message, .. } | ServerMsg::Error { message, .. } => {
            message.len() <= MAX_TEXT_LEN
        }
        _ => true,
    }
}

/// Arbitrary bytes, biased towards what gets past the 2-byte burrow header.
fn arb_packet_with_kind(kind: u8) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        vec(any::<u8>(), 0..200).prop_map(move |mut v| {
            v.splice(0..0, [kind, wire::WIRE_VERSION]);
            v
        }),
    ]
}

/// Every decoder must stay under this for a single allocation, whatever the input.
const ALLOC_LIMIT: usize = MAX_PACKET;

fn check_control_decoders(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (_, a) = largest_alloc_of(|| control::decode::<ClientMsg>(bytes));
    prop_assert!(a <= ALLOC_LIMIT, "ClientMsg decode allocated {a} bytes");
    let (_, a) = largest_alloc_of(|| control::decode::<ServerMsg>(bytes));
    prop_assert!(a <= ALLOC_LIMIT, "ServerMsg decode allocated {a} bytes");
    let (_, a) = largest_alloc_of(|| control::decode::<UdpMsg>(bytes));
    prop_assert!(a <= ALLOC_LIMIT, "UdpMsg decode allocated {a} bytes");
    let _ = control::decode_valid::<ClientMsg>(bytes);
    let _ = control::decode_valid::<ServerMsg>(bytes);
    let _ = control::decode_valid::<UdpMsg>(bytes);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Control messages
// ---------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn client_msg_round_trips(msg in arb_client_msg()) {
        let bytes = control::to_vec(&msg).unwrap();
        prop_assert_eq!(&bytes[..2], &[wire::KIND_CONTROL, wire::WIRE_VERSION]);
        prop_assert_eq!(wire::classify(&bytes), PacketClass::Control);
        // Over-long candidate lists are refused by the decoder itself (bounded allocation);
        // everything else decodes, and `decode_valid` adds the text limits.
        if client_candidates(&msg) <= MAX_CANDIDATES {
            prop_assert_eq!(control::decode::<ClientMsg>(&bytes).unwrap(), msg.clone());
        } else {
            prop_assert!(control::decode::<ClientMsg>(&bytes).is_err());
        }
        prop_assert_eq!(msg.validate().is_ok(), client_within_limits(&msg));
        prop_assert_eq!(
            control::decode_valid::<ClientMsg>(&bytes).is_ok(),
            client_within_limits(&msg)
        );
    }

    #[test]
    fn server_msg_round_trips(msg in arb_server_msg()) {
        let bytes = control::to_vec(&msg).unwrap();
        if server_candidates(&msg) <= MAX_CANDIDATES {
            prop_assert_eq!(control::decode::<ServerMsg>(&bytes).unwrap(), msg.clone());
        } else {
            prop_assert!(control::decode::<ServerMsg>(&bytes).is_err());
        }
        prop_assert_eq!(msg.validate().is_ok(), server_within_limits(&msg));
        prop_assert_eq!(
            control::decode_valid::<ServerMsg>(&bytes).is_ok(),
            server_within_limits(&msg)
        );
    }

    #[test]
    fn udp_msg_round_trips(msg in arb_udp_msg()) {
        let bytes = control::to_vec(&msg).unwrap();
        prop_assert_eq!(control::decode_valid::<UdpMsg>(&bytes).unwrap(), msg);
    }

    /// `encode` appends: what was in the buffer stays, the message follows.
    #[test]
    fn control_encode_appends(prefix in vec(any::<u8>(), 0..16), msg in arb_udp_msg()) {
        let mut out = prefix.clone();
        control::encode(&msg, &mut out).unwrap();
        prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
        prop_assert_eq!(control::decode::<UdpMsg>(&out[prefix.len()..]).unwrap(), msg);
    }

    /// bincode is self-delimiting, so no strict prefix of a message is a message, and a
    /// trailing byte is refused.
    #[test]
    fn truncated_or_extended_control_fails(msg in arb_client_msg(), cut in any::<prop::sample::Index>(), extra in any::<u8>()) {
        let bytes = control::to_vec(&msg).unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(control::decode::<ClientMsg>(&bytes[..cut]).is_err());
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert!(control::decode::<ClientMsg>(&longer).is_err());
    }

    #[test]
    fn control_decoders_never_panic(bytes in arb_packet_with_kind(wire::KIND_CONTROL)) {
        check_control_decoders(&bytes)?;
    }

    /// Valid messages with one byte changed or inserted: the decoders still must not panic or
    /// over-allocate (this reaches much deeper than random bytes).
    #[test]
    fn mutated_control_never_panics(
        msg in prop_oneof![
            arb_client_msg().prop_map(|m| control::to_vec(&m).unwrap()),
            arb_server_msg().prop_map(|m| control::to_vec(&m).unwrap()),
            arb_udp_msg().prop_map(|m| control::to_vec(&m).unwrap()),
        ],
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        insert in any::<bool>(),
    ) {
        let mut bytes = msg;
        let i = at.index(bytes.len());
        if insert {
            bytes.insert(i, byte);
        } else {
            bytes[i] = byte;
        }
        check_control_decoders(&bytes)?;
    }
}

/// Every length-prefixed field claiming a huge length: refused without a big allocation.
#[test]
fn huge_claimed_lengths_do_not_allocate() {
    let huge_lens: [&[u8]; 4] = [
        &[252, 0xff, 0xff, 0xff, 0x7f], // varint u32: 2^31 - 1
        &[252, 0x00, 0x00, 0x10, 0x00], // 2^20
        &[253, 0, 0, 0, 0, 0, 1, 0, 0], // 2^40
        &[251, 0xff, 0xff],             // 65535
    ];
    for len in huge_lens {
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        // Register: token Some(huge), then agent huge, then candidates huge.
        let mut reg = vec![0x22, 1, 0];
        reg.extend_from_slice(&[0x11; 32]);
        reg.extend_from_slice(&[0x22; 64]);
        let mut token = reg.clone();
        token.push(1);
        token.extend_from_slice(len);
        cases.push(("register token", token));
        let mut cands = reg.clone();
        cands.push(0); // no token
        cands.extend_from_slice(len);
        cases.push(("register candidates", cands));
        // UpdateCandidates { candidates: huge }.
        let mut upd = vec![0x22, 1, 2];
        upd.extend_from_slice(len);
        cases.push(("update candidates", upd));
        for (what, bytes) in &cases {
            let (r, a) = largest_alloc_of(|| control::decode::<ClientMsg>(bytes));
            assert!(r.is_err(), "{what}: {len:?} decoded");
            assert!(
                a <= ALLOC_LIMIT,
                "{what} claiming {len:?}: allocated {a} bytes"
            );
        }
        // ServerMsg: Introduce candidates, ConnectFailed message, Error message,
        // PeerCandidates candidates.
        let mut intro = vec![0x22, 1, 2];
        intro.extend_from_slice(&[0x11; 32]); // peer
        intro.push(5); // channel
        intro.extend_from_slice(&[0x33; 32]); // nonce
        intro.push(0); // role
        intro.extend_from_slice(len);
        let mut failed = vec![0x22, 1, 3];
        failed.extend_from_slice(&[0x11; 32]);
        failed.extend_from_slice(&[1, 0]); // request id, reason
        failed.extend_from_slice(len);
        let mut error = vec![0x22, 1, 6, 0];
        error.extend_from_slice(len);
        let mut pc = vec![0x22, 1, 7];
        pc.extend_from_slice(&[0x11; 32]);
        pc.push(5);
        pc.extend_from_slice(len);
        for (what, bytes) in [
            ("introduce", intro),
            ("connect failed", failed),
            ("error", error),
            ("peer candidates", pc),
        ] {
            let (r, a) = largest_alloc_of(|| control::decode::<ServerMsg>(&bytes));
            assert!(r.is_err(), "{what}: {len:?} decoded");
            assert!(
                a <= ALLOC_LIMIT,
                "{what} claiming {len:?}: allocated {a} bytes"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Relay data
// ---------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn relay_data_round_trips(channel in arb_channel(), payload in vec(any::<u8>(), 0..2000)) {
        let mut out = Vec::new();
        relay_data::encode(channel, &payload, &mut out);
        prop_assert_eq!(out.len(), relay_data::HEADER_LEN + payload.len());
        prop_assert_eq!(wire::classify(&out), PacketClass::RelayData);
        prop_assert_eq!(relay_data::channel(&out).unwrap(), channel);
        let (c, p) = relay_data::parse(&out).unwrap();
        prop_assert_eq!(c, channel);
        prop_assert_eq!(p, &payload[..]);
        // write_header in place gives the same bytes.
        let mut inplace = vec![0xAA; relay_data::HEADER_LEN];
        inplace.extend_from_slice(&payload);
        relay_data::write_header(&mut inplace, channel).unwrap();
        prop_assert_eq!(inplace, out);
    }

    #[test]
    fn relay_data_parse_never_panics(bytes in arb_packet_with_kind(wire::KIND_RELAY_DATA)) {
        let (r, a) = largest_alloc_of(|| relay_data::parse(&bytes).map(|(c, p)| (c, p.len())));
        prop_assert_eq!(a, 0, "relay data parse allocated");
        match r {
            Ok((c, len)) => {
                prop_assert!(bytes.len() >= relay_data::HEADER_LEN);
                prop_assert_eq!(bytes[0], wire::KIND_RELAY_DATA);
                prop_assert_eq!(bytes[1], wire::WIRE_VERSION);
                prop_assert_eq!(len, bytes.len() - relay_data::HEADER_LEN);
                prop_assert_eq!(c.0, u32::from_be_bytes(bytes[4..8].try_into().unwrap()));
            }
            Err(_) => prop_assert!(
                bytes.len() < relay_data::HEADER_LEN
                    || bytes[0] != wire::KIND_RELAY_DATA
                    || bytes[1] != wire::WIRE_VERSION
            ),
        }
    }

    #[test]
    fn write_header_needs_room(len in 0..relay_data::HEADER_LEN) {
        let mut buf = vec![0; len];
        let r = relay_data::write_header(&mut buf, ChannelId(1));
        prop_assert_eq!(r, Err(WireError::BufferTooSmall { need: relay_data::HEADER_LEN, have: len }));
    }
}

#[test]
fn relay_data_size_limit() {
    let mut max = Vec::new();
    relay_data::encode(ChannelId(9), &vec![0; MAX_PACKET - 8], &mut max);
    assert!(relay_data::parse(&max).is_ok());
    max.push(0);
    assert_eq!(
        relay_data::parse(&max),
        Err(WireError::TooLarge(MAX_PACKET + 1))
    );
}

// ---------------------------------------------------------------------------------------
// Punch packets
// ---------------------------------------------------------------------------------------

fn arb_punch() -> impl Strategy<Value = PunchPacket> {
    let kind = prop_oneof![
        Just(PunchType::Probe),
        Just(PunchType::Ack),
        Just(PunchType::Ping),
        Just(PunchType::Pong),
    ];
    (
        kind,
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(arb_addr()),
    )
        .prop_map(|(kind, from_responder, tag, txid, observed)| PunchPacket {
            kind,
            from_responder,
            tag,
            txid,
            observed,
        })
}

proptest! {
    #[test]
    fn punch_round_trips(nonce in any::<[u8; 32]>(), p in arb_punch(), spare in 0usize..8) {
        let mut buf = vec![0x5A; punch::PACKET_LEN + spare];
        let n = punch::encode(&nonce, &p, &mut buf).unwrap();
        prop_assert_eq!(n, punch::PACKET_LEN);
        let pkt = &buf[..n];
        prop_assert_eq!(wire::classify(pkt), PacketClass::Punch);
        prop_assert_eq!(punch::decode(&nonce, pkt).unwrap(), p);
        prop_assert_eq!(punch::peek_tag(pkt).unwrap(), p.tag);
        // Bytes past the packet are left alone.
        prop_assert!(buf[n..].iter().all(|&b| b == 0x5A));
    }

    #[test]
    fn punch_bit_flip_fails(nonce in any::<[u8; 32]>(), p in arb_punch(), bit in 0..punch::PACKET_LEN * 8) {
        let mut buf = [0u8; punch::PACKET_LEN];
        punch::encode(&nonce, &p, &mut buf).unwrap();
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(punch::decode(&nonce, &buf).is_err(), "bit {} flipped and still accepted", bit);
    }

    #[test]
    fn punch_wrong_nonce_fails(nonce in any::<[u8; 32]>(), other in any::<[u8; 32]>(), p in arb_punch()) {
        prop_assume!(nonce != other);
        let mut buf = [0u8; punch::PACKET_LEN];
        punch::encode(&nonce, &p, &mut buf).unwrap();
        prop_assert_eq!(punch::decode(&other, &buf), Err(WireError::BadMac));
    }

    #[test]
    fn punch_wrong_length_fails(nonce in any::<[u8; 32]>(), p in arb_punch(), extra in vec(any::<u8>(), 1..8), cut in 0..punch::PACKET_LEN) {
        let mut buf = [0u8; punch::PACKET_LEN];
        punch::encode(&nonce, &p, &mut buf).unwrap();
        prop_assert!(punch::decode(&nonce, &buf[..cut]).is_err());
        let mut longer = buf.to_vec();
        longer.extend_from_slice(&extra);
        prop_assert!(punch::decode(&nonce, &longer).is_err());
        let mut small = vec![0u8; cut];
        prop_assert_eq!(
            punch::encode(&nonce, &p, &mut small),
            Err(WireError::BufferTooSmall { need: punch::PACKET_LEN, have: cut })
        );
    }

    #[test]
    fn punch_decode_never_panics(nonce in any::<[u8; 32]>(), bytes in arb_packet_with_kind(wire::KIND_PUNCH)) {
        let (_, a) = largest_alloc_of(|| {
            let _ = punch::peek_tag(&bytes);
            punch::decode(&nonce, &bytes).is_ok()
        });
        // Only an error path's message may allocate, and only a little.
        prop_assert!(a <= 128, "punch decode allocated {a} bytes");
    }

    /// A forger who knows the tag but not the nonce: any 56 bytes with the right header and
    /// any MAC still fail (a MAC collision at 2^-128 would be news).
    #[test]
    fn punch_forgery_fails(nonce in any::<[u8; 32]>(), body in any::<[u8; 54]>()) {
        let mut pkt = vec![wire::KIND_PUNCH, wire::WIRE_VERSION];
        pkt.extend_from_slice(&body);
        prop_assert!(punch::decode(&nonce, &pkt).is_err());
    }
}

// ---------------------------------------------------------------------------------------
// TCP framing
// ---------------------------------------------------------------------------------------

/// The documented bound on a FrameReader's buffer.
const READER_MAX: usize = PREAMBLE.len() + LENGTH_LEN + MAX_FRAME_BODY;

/// Frame bodies: mostly small, sometimes large, occasionally the maximum.
fn arb_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => vec(any::<u8>(), 2..300),
        2 => (2usize..20_000).prop_map(|n| vec![0x20; n]),
        1 => Just(vec![0x22; MAX_FRAME_BODY]),
    ]
}

/// How a driver feeds a reader.
#[derive(Debug, Clone)]
enum ReaderOp {
    /// Read up to this many bytes of the stream into `read_buf`.
    Read(usize),
    /// Take every complete frame.
    Drain,
}

fn arb_ops() -> impl Strategy<Value = Vec<ReaderOp>> {
    vec(
        prop_oneof![
            3 => (1usize..70_000).prop_map(ReaderOp::Read),
            3 => (1usize..64).prop_map(ReaderOp::Read),
            2 => Just(ReaderOp::Drain),
        ],
        1..200,
    )
}

fn drain(r: &mut FrameReader, got: &mut Vec<Vec<u8>>) -> Result<(), WireError> {
    while let Some(f) = r.next_frame()? {
        got.push(f.to_vec());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `push` with any split of a valid stream returns the frames that were encoded.
    #[test]
    fn frames_survive_any_split(
        bodies in vec(arb_body(), 0..12),
        preamble in any::<bool>(),
        cuts in vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let mut stream = if preamble { PREAMBLE.to_vec() } else { Vec::new() };
        for b in &bodies {
            frame::encode(b, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut r = FrameReader::new(preamble);
        let mut got = Vec::new();
        for w in cuts.windows(2) {
            got.extend(r.push(&stream[w[0]..w[1]]).unwrap());
            prop_assert!(r.buffered() <= READER_MAX);
        }
        prop_assert_eq!(r.buffered(), 0);
        prop_assert_eq!(got, bodies);
    }

    /// The socket-style API, driven in any order: the frames come out unchanged and the
    /// buffer never passes its bound (`read_buf().len() + buffered()` is the whole buffer
    /// right after a compaction or growth, so a growth past the bound shows up here).
    #[test]
    fn socket_style_reads_are_bounded(
        bodies in vec(arb_body(), 1..8),
        ops in arb_ops(),
    ) {
        let mut stream = PREAMBLE.to_vec();
        for b in &bodies {
            frame::encode(b, &mut stream).unwrap();
        }
        let mut r = FrameReader::new(true);
        let mut got = Vec::new();
        let mut pos = 0;
        // The ops, then as many read+drain rounds as the rest of the stream needs.
        let tail = std::iter::repeat_n([ReaderOp::Read(usize::MAX), ReaderOp::Drain], stream.len() + 2).flatten();
        for op in ops.into_iter().chain(tail) {
            match op {
                ReaderOp::Read(n) => {
                    let spare = r.read_buf();
                    let spare_len = spare.len();
                    let n = n.min(spare_len).min(stream.len() - pos);
                    spare[..n].copy_from_slice(&stream[pos..pos + n]);
                    r.filled(n);
                    pos += n;
                    prop_assert!(
                        spare_len + r.buffered() - n <= READER_MAX,
                        "buffer grew to {} (> {READER_MAX})",
                        spare_len + r.buffered() - n
                    );
                }
                ReaderOp::Drain => drain(&mut r, &mut got).unwrap(),
            }
            if pos == stream.len() && r.buffered() == 0 {
                break;
            }
        }
        drain(&mut r, &mut got).unwrap();
        prop_assert_eq!(pos, stream.len());
        prop_assert_eq!(got, bodies);
    }

    /// Arbitrary bytes, fed any way: no panic, bounded buffer, and once an error comes the
    /// reader keeps reporting an error (the caller closes on the first one anyway).
    #[test]
    fn frame_reader_arbitrary_bytes(
        preamble in any::<bool>(),
        prefix_valid in any::<bool>(),
        junk in vec(any::<u8>(), 0..5000),
        ops in arb_ops(),
    ) {
        let mut stream = Vec::new();
        if prefix_valid {
            stream.extend_from_slice(&PREAMBLE);
            frame::encode(&[0x22, 1, 3, 5], &mut stream).unwrap();
        }
        stream.extend_from_slice(&junk);
        let mut r = FrameReader::new(preamble);
        let mut pos = 0;
        let mut failed = false;
        for op in ops {
            match op {
                ReaderOp::Read(n) => {
                    let buffered = r.buffered();
                    let spare = r.read_buf();
                    let spare_len = spare.len();
                    prop_assert!(spare_len + buffered <= READER_MAX, "buffer grew to {}", spare_len + buffered);
                    let n = n.min(spare_len).min(stream.len() - pos);
                    spare[..n].copy_from_slice(&stream[pos..pos + n]);
                    r.filled(n);
                    pos += n;
                }
                ReaderOp::Drain => {
                    let mut got = Vec::new();
                    match drain(&mut r, &mut got) {
                        Ok(()) => prop_assert!(!failed, "reader recovered after an error"),
                        Err(_) => failed = true,
                    }
                    for f in got {
                        prop_assert!((2..=MAX_FRAME_BODY).contains(&f.len()));
                    }
                }
            }
        }
        // And the convenience API on the same bytes.
        let mut r = FrameReader::new(preamble);
        for chunk in stream.chunks(777) {
            if r.push(chunk).is_err() {
                break;
            }
            prop_assert!(r.buffered() <= READER_MAX);
        }
    }
}

#[test]
fn frame_encode_limits() {
    let mut out = Vec::new();
    assert!(frame::encode(&vec![0; MAX_FRAME_BODY], &mut out).is_ok());
    assert_eq!(
        frame::encode(&vec![0; MAX_FRAME_BODY + 1], &mut Vec::new()),
        Err(WireError::TooLarge(MAX_FRAME_BODY + 1))
    );
    assert_eq!(frame::length_prefix(300), [0, 0, 1, 44]);
    // A body under 2 bytes is a protocol violation.
    let mut r = FrameReader::new(false);
    assert!(r.push(&[0, 0, 0, 1, 0x22]).is_err());
}

// ---------------------------------------------------------------------------------------
// STUN
// ---------------------------------------------------------------------------------------

fn arb_change() -> impl Strategy<Value = Option<Change>> {
    proptest::option::of((any::<bool>(), any::<bool>()).prop_map(|(ip, port)| Change { ip, port }))
}

proptest! {
    #[test]
    fn stun_request_round_trips(txid in any::<[u8; 12]>(), change in arb_change()) {
        let mut buf = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::binding_request(txid, change, &mut buf).unwrap();
        let pkt = &buf[..n];
        prop_assert_eq!(wire::classify(pkt), PacketClass::Stun);
        prop_assert!(stun::looks_like_stun(pkt, false));
        prop_assert_eq!(stun::transaction_id(pkt), Some(txid));
        let req = stun::parse_binding_request(pkt).unwrap();
        prop_assert_eq!(req, BindingRequest { txid, modern: true, change, unknown_required: vec![], response_port: None });
        // A request is not a response.
        prop_assert!(stun::parse_binding_response(pkt).is_err());
    }

    #[test]
    fn stun_success_round_trips(
        txid in any::<[u8; 12]>(),
        mapped in arb_addr(),
        origin in proptest::option::of(arb_addr()),
        other in proptest::option::of(arb_addr()),
    ) {
        let mut buf = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::binding_request(txid, None, &mut buf).unwrap();
        let req = stun::parse_binding_request(&buf[..n]).unwrap();
        let mut out = [0u8; stun::MAX_BINDING_LEN];
        let m = stun::binding_success(&req, mapped, origin, other, &mut out).unwrap();
        let resp = stun::parse_binding_response(&out[..m]).unwrap();
        prop_assert_eq!(resp.txid, txid);
        prop_assert_eq!(resp.mapped, mapped);
        prop_assert_eq!(resp.response_origin, origin);
        prop_assert_eq!(resp.other_address, other);
        // A response is not a request (the relay must never answer its own answers).
        prop_assert_eq!(stun::parse_binding_request(&out[..m]), None);
    }

    #[test]
    fn stun_classic_success(cookie in any::<[u8; 4]>(), txid in any::<[u8; 12]>(), ip in any::<[u8; 4]>(), port in any::<u16>()) {
        prop_assume!(u32::from_be_bytes(cookie) != stun::MAGIC_COOKIE);
        let mut pkt = vec![0x00, 0x01, 0x00, 0x00];
        pkt.extend_from_slice(&cookie);
        pkt.extend_from_slice(&txid);
        let req = stun::parse_binding_request(&pkt).unwrap();
        prop_assert!(!req.modern);
        let mapped = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port);
        let mut out = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::classic_binding_success_raw(&pkt, mapped, &mut out).unwrap();
        // Never larger than needed; the ID echoed whole; MAPPED-ADDRESS as sent.
        prop_assert_eq!(n, 32);
        prop_assert_eq!(&out[4..20], &pkt[4..20]);
        prop_assert_eq!(&out[26..28], &port.to_be_bytes());
        prop_assert_eq!(&out[28..32], &ip);
    }

    #[test]
    fn stun_error_round_trips(txid in any::<[u8; 12]>(), code in 300u16..700, unknown in vec(any::<u16>(), 0..4)) {
        let req = BindingRequest { txid, modern: true, change: None, unknown_required: vec![], response_port: None };
        let mut out = [0u8; stun::MAX_BINDING_LEN];
        let m = stun::binding_error(&req, code, "Some Reason", &unknown, &mut out).unwrap();
        match stun::parse_binding_response(&out[..m]) {
            Err(stun::StunError::ErrorResponse { code: c, reason }) => {
                prop_assert_eq!(c, code);
                prop_assert_eq!(reason, "Some Reason");
            }
            other => prop_assert!(false, "got {:?}", other),
        }
    }

    /// Arbitrary bytes, and arbitrary bytes behind a plausible STUN header (right length and
    /// cookie, so they reach stun-rs's attribute decoder).
    #[test]
    fn stun_parsers_never_panic(
        raw in vec(any::<u8>(), 0..200),
        msg_type in any::<u16>(),
        cookie in prop_oneof![Just(stun::MAGIC_COOKIE), any::<u32>()],
        txid in any::<[u8; 12]>(),
        attrs in vec(any::<u8>(), 0..50).prop_map(|mut v| { v.truncate(v.len() / 4 * 4); v }),
    ) {
        let mut framed = Vec::new();
        framed.extend_from_slice(&(msg_type & 0x3FFF).to_be_bytes());
        framed.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        framed.extend_from_slice(&cookie.to_be_bytes());
        framed.extend_from_slice(&txid);
        framed.extend_from_slice(&attrs);
        for bytes in [&raw, &framed] {
            let (_, a) = largest_alloc_of(|| {
                let _ = stun::parse_binding_request(bytes);
                let _ = stun::parse_binding_response(bytes);
            });
            prop_assert!(a <= ALLOC_LIMIT, "stun parse allocated {a} bytes");
        }
    }

    /// Valid responses and requests with one byte changed: no panic.
    #[test]
    fn mutated_stun_never_panics(
        txid in any::<[u8; 12]>(),
        mapped in arb_addr(),
        other in proptest::option::of(arb_addr()),
        change in arb_change(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut req = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::binding_request(txid, change, &mut req).unwrap();
        let parsed = stun::parse_binding_request(&req[..n]).unwrap();
        let mut resp = [0u8; stun::MAX_BINDING_LEN];
        let m = stun::binding_success(&parsed, mapped, Some(mapped), other, &mut resp).unwrap();
        for pkt in [&mut req[..n], &mut resp[..m]] {
            let i = at.index(pkt.len());
            pkt[i] = byte;
            let _ = stun::parse_binding_request(pkt);
            let _ = stun::parse_binding_response(pkt);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Peer IDs
// ---------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn peer_id_text_round_trips(secret in any::<[u8; 32]>(), upper in any::<bool>(), pad in "[ \t]{0,3}") {
        let id = burrow::identity::Identity::from_secret(secret).peer_id();
        let text = id.to_string();
        prop_assert_eq!(text.len(), wire::peer_id::PEER_ID_TEXT_LEN);
        prop_assert_eq!(text.parse::<PeerId>().unwrap(), id);
        let typed = if upper { text.to_ascii_uppercase() } else { text.clone() };
        prop_assert_eq!(format!("{pad}{typed}{pad}").parse::<PeerId>().unwrap(), id);
        prop_assert!(id.short().len() == 8 && text.starts_with(&id.short()));
    }

    /// Any 32 bytes print as 52 base32 characters; they parse back exactly when they are a
    /// curve point.
    #[test]
    fn peer_id_any_bytes(bytes in any::<[u8; 32]>()) {
        let id = PeerId(bytes);
        let text = id.to_string();
        prop_assert_eq!(text.len(), wire::peer_id::PEER_ID_TEXT_LEN);
        match text.parse::<PeerId>() {
            Ok(back) => prop_assert_eq!(back, id),
            Err(e) => {
                prop_assert_eq!(e, wire::peer_id::PeerIdError::NotAKey);
                prop_assert!(!id.is_valid_key());
            }
        }
    }

    #[test]
    fn peer_id_from_str_never_panics(
        s in prop_oneof![
            any::<String>(),
            "[a-z2-7]{52}",
            "[A-Za-z0-9=]{50,54}",
            vec(any::<char>(), 52).prop_map(|c| c.into_iter().collect::<String>()),
        ]
    ) {
        let (r, _) = largest_alloc_of(|| s.parse::<PeerId>());
        if let Ok(id) = r {
            prop_assert_eq!(id.to_string(), s.trim().to_ascii_lowercase());
        }
    }

    /// Signatures verify for the signer's message only.
    #[test]
    fn register_signature_verifies(secret in any::<[u8; 32]>(), nonce in any::<[u8; 32]>(), flip in 0usize..(64 * 8)) {
        let ident = burrow::identity::Identity::from_secret(secret);
        let signed = control::register_signed_bytes(&nonce);
        let sig = ident.sign(&signed).to_bytes();
        prop_assert!(ident.peer_id().verify(&signed, &sig));
        let mut bad = sig;
        bad[flip / 8] ^= 1 << (flip % 8);
        prop_assert!(!ident.peer_id().verify(&signed, &bad));
        prop_assert_eq!(Signature::from_bytes(sig).to_bytes(), sig);
    }
}
