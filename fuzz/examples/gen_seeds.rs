//! Writes the small seed corpus under `fuzz/corpus/TARGET/seed-N`: a few valid messages per
//! target, encoded by burrow's own encoders. Run from `fuzz/`:
//! `cargo run --example gen_seeds` (stable is fine).

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use burrow::app::protocol::{self, Reason, Reply, Request};
use burrow::identity::Identity;
use burrow::transport::tls::LocalCert;
use burrow::wire::control::{
    self, Candidate, CandidateKind, ClientMsg, ConnectFailure, ErrorCode, Introduction,
    MappingBehavior, NatReport, PortAllocation, Register, RelayTransport, Role, ServerMsg,
    UdpMsg,
};
use burrow::wire::frame::{self, PREAMBLE};
use burrow::wire::punch::{self, PunchPacket, PunchType};
use burrow::wire::relay_data::{self, ChannelId};
use burrow::wire::stun::{self, Change};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        fs::write(dir.join(format!("seed-{i}")), s).unwrap();
    }
    println!("{target}: {} seeds", seeds.len());
}

/// Splits one DER element into (header length, contents length); enough for the
/// certificates rcgen writes (lengths of at most 3 bytes).
fn der_header(der: &[u8]) -> (usize, usize) {
    let first = der[1];
    if first < 0x80 {
        return (2, first as usize);
    }
    let n = (first & 0x7f) as usize;
    let len = der[2..2 + n]
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | b as usize);
    (2 + n, len)
}

fn main() {
    let id = Identity::from_secret([1; 32]);
    let peer = Identity::from_secret([2; 32]).peer_id();
    let candidates = vec![
        Candidate {
            addr: addr("192.168.1.10:40000"),
            kind: CandidateKind::Host,
        },
        Candidate {
            addr: addr("[2001:db8::1]:40000"),
            kind: CandidateKind::ServerReflexive,
        },
        Candidate {
            addr: addr("203.0.113.5:50001"),
            kind: CandidateKind::Predicted,
        },
    ];
    let nat = NatReport {
        mapping: MappingBehavior::EndpointDependent,
        allocation: PortAllocation::Sequential(2),
        udp: true,
    };

    let client = [
        ClientMsg::Register(Register {
            peer_id: id.peer_id(),
            signature: id.sign(&control::register_signed_bytes(&[9; 32])),
            token: Some("secret-token".into()),
            candidates: candidates.clone(),
            nat,
            agent: "burrow 0.1.0".into(),
        }),
        ClientMsg::Connect {
            peer,
            request_id: 300,
        },
        ClientMsg::UpdateCandidates {
            candidates: candidates.clone(),
            nat: NatReport::default(),
        },
        ClientMsg::Ping { seq: 5 },
        ClientMsg::CloseChannel {
            channel: ChannelId(77),
        },
        ClientMsg::SetRelayTransport {
            transport: RelayTransport::Tcp,
        },
    ];
    let client: Vec<Vec<u8>> = client.iter().map(|m| control::to_vec(m).unwrap()).collect();
    write("control_client", &client);

    let server = [
        ServerMsg::Challenge {
            nonce: [9; 32],
            token_required: true,
        },
        ServerMsg::Registered {
            udp_token: [3; 16],
            observed_tcp: addr("198.51.100.1:5555"),
            keepalive_secs: 15,
            stun_alternate: Some(addr("127.0.0.2:3479")),
        },
        ServerMsg::Introduce(Introduction {
            peer,
            channel: ChannelId(77),
            punch_nonce: [4; 32],
            role: Role::Initiator,
            candidates: candidates.clone(),
            nat,
            request_id: Some(300),
        }),
        ServerMsg::ConnectFailed {
            peer,
            request_id: 1,
            reason: ConnectFailure::UnknownPeer,
            message: "no such peer".into(),
        },
        ServerMsg::PeerGone {
            peer,
            channel: ChannelId(77),
        },
        ServerMsg::Pong { seq: 5 },
        ServerMsg::Error {
            code: ErrorCode::BadSignature,
            message: "bad signature".into(),
        },
        ServerMsg::PeerCandidates {
            peer,
            channel: ChannelId(77),
            candidates,
            nat,
        },
    ];
    let server: Vec<Vec<u8>> = server.iter().map(|m| control::to_vec(m).unwrap()).collect();
    write("control_server", &server);

    let udp = [
        UdpMsg::Bind {
            token: [3; 16],
            seq: 1,
        },
        UdpMsg::Bound {
            seq: 1,
            observed: addr("[2001:db8::7]:999"),
        },
        UdpMsg::BindRejected { seq: 2 },
    ];
    write(
        "control_udp",
        &udp.iter()
            .map(|m| control::to_vec(m).unwrap())
            .collect::<Vec<_>>(),
    );

    let mut relay = Vec::new();
    for (c, payload) in [(1, &b""[..]), (0xdead_beef, b"hello"), (7, &[0x40; 1200][..])] {
        let mut v = Vec::new();
        relay_data::encode(ChannelId(c), payload, &mut v);
        relay.push(v);
    }
    write("relay_data", &relay);

    // The punch target checks packets with nonce [7; 32].
    let nonce = [7; 32];
    let mut punches = Vec::new();
    for (kind, observed) in [
        (PunchType::Probe, None),
        (PunchType::Ack, Some(addr("198.51.100.9:4000"))),
        (PunchType::Pong, Some(addr("[2001:db8::9]:4000"))),
    ] {
        let p = PunchPacket {
            kind,
            from_responder: observed.is_some(),
            tag: punch::tag(&nonce),
            txid: 42,
            observed,
        };
        let mut buf = [0u8; punch::PACKET_LEN];
        punch::encode(&nonce, &p, &mut buf).unwrap();
        punches.push(buf.to_vec());
    }
    write("punch", &punches);

    // frame_reader: flags byte, seed byte, then a stream.
    let mut frames = Vec::new();
    for (flags, with_preamble) in [(1u8, true), (0, false), (3, false)] {
        let mut v = vec![flags, 17];
        if with_preamble {
            v.extend_from_slice(&PREAMBLE);
        }
        for m in client.iter().take(3) {
            frame::encode(m, &mut v).unwrap();
        }
        frame::encode(&relay[1], &mut v).unwrap();
        frames.push(v);
    }
    write("frame_reader", &frames);

    let mut requests = Vec::new();
    for (i, change) in [
        None,
        Some(Change {
            ip: true,
            port: true,
        }),
        Some(Change {
            ip: false,
            port: true,
        }),
    ]
    .into_iter()
    .enumerate()
    {
        let mut buf = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::binding_request([i as u8; 12], change, &mut buf).unwrap();
        requests.push(buf[..n].to_vec());
    }
    // RFC 3489 request (no magic cookie).
    let mut classic = vec![0x00, 0x01, 0x00, 0x00, 9, 9, 9, 9];
    classic.extend_from_slice(&[5; 12]);
    requests.push(classic);
    write("stun_request", &requests);

    let mut responses = Vec::new();
    let req = stun::parse_binding_request(&requests[0]).unwrap();
    for (mapped, origin, other) in [
        (addr("203.0.113.7:40000"), None, None),
        (
            addr("127.0.0.1:5000"),
            Some(addr("127.0.0.1:3478")),
            Some(addr("127.0.0.2:3479")),
        ),
        (addr("[2001:db8::5]:443"), None, Some(addr("[::1]:3479"))),
    ] {
        let mut out = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::binding_success(&req, mapped, origin, other, &mut out).unwrap();
        responses.push(out[..n].to_vec());
    }
    let mut out = [0u8; stun::MAX_BINDING_LEN];
    let n = stun::binding_error(&req, 420, "Unknown Attribute", &[0x42], &mut out).unwrap();
    responses.push(out[..n].to_vec());
    write("stun_response", &responses);

    let ids = [
        id.peer_id().to_string(),
        peer.to_string().to_ascii_uppercase(),
        format!("  {}\n", Identity::from_secret([3; 32]).peer_id()),
    ];
    write(
        "peer_id",
        &ids.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>(),
    );

    // Application stream protocol: frame bodies (after the 4-byte length prefix).
    let requests = [
        Request::File {
            path: "photos/2026/ünï.jpg".into(),
            size: 123_456_789,
            executable: false,
            resume: true,
        },
        Request::Pipe,
        Request::Bench {
            seconds: 10,
            reverse: true,
        },
        Request::BenchDatagrams {
            seconds: 3,
            reverse: false,
            rate: 50_000_000,
        },
    ];
    let request_frames: Vec<Vec<u8>> = requests.iter().map(protocol::encode_request).collect();
    write(
        "app_request",
        &request_frames
            .iter()
            .map(|f| f[4..].to_vec())
            .collect::<Vec<_>>(),
    );
    let replies = [
        Reply::Accept {
            resume_offset: 4096,
            prefix_hash: Some([0xab; 32]),
        },
        Reply::Accept {
            resume_offset: 0,
            prefix_hash: None,
        },
        Reply::Reject(Reason::new(protocol::REASON_EXISTS, "exists: a.txt")),
        Reply::Verified,
        Reply::Failed(Reason::new(protocol::REASON_HASH_MISMATCH, "hash mismatch")),
        Reply::BenchResult {
            bytes: 1 << 30,
            micros: 10_000_000,
        },
        Reply::DatagramResult {
            datagrams: 1000,
            bytes: 1_200_000,
        },
    ];
    let reply_frames: Vec<Vec<u8>> = replies.iter().map(protocol::encode_reply).collect();
    write(
        "app_reply",
        &reply_frames
            .iter()
            .map(|f| f[4..].to_vec())
            .collect::<Vec<_>>(),
    );

    // app_frame_reader: seed byte, then a stream: whole frames, frames followed by file
    // bytes, a truncated frame, a zero length prefix.
    let mut streams = Vec::new();
    let mut v = vec![17];
    v.extend(request_frames.iter().flatten());
    streams.push(v);
    let mut v = vec![200];
    v.extend_from_slice(&request_frames[0]);
    v.extend_from_slice(&[0x5a; 700]);
    streams.push(v);
    let mut v = vec![3];
    v.extend(reply_frames.iter().flatten());
    v.truncate(v.len() - 3);
    streams.push(v);
    let mut v = vec![90];
    v.extend_from_slice(&reply_frames[3]);
    v.extend_from_slice(&[0, 0, 0, 0, 1, 2, 3]);
    streams.push(v);
    write("app_frame_reader", &streams);

    // tls_cert: byte 0 = mode. Mode 0: whole certificates from LocalCert (the transport's
    // own builder, rcgen underneath). Mode 1: the tbsCertificate contents of the cert for
    // identity [1; 32], which the target re-signs with that key.
    let mut certs = Vec::new();
    for secret in [[1u8; 32], [2; 32], [0xfe; 32]] {
        let cert = LocalCert::new(&Identity::from_secret(secret)).unwrap().cert;
        let mut v = vec![0];
        v.extend_from_slice(&cert);
        certs.push(v);
    }
    let cert = LocalCert::new(&id).unwrap().cert;
    let (outer, _) = der_header(&cert);
    let (tbs_header, tbs_len) = der_header(&cert[outer..]);
    let start = outer + tbs_header;
    let mut v = vec![1];
    v.extend_from_slice(&cert[start..start + tbs_len]);
    certs.push(v);
    write("tls_cert", &certs);
}
