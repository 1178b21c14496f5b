//! RelayCore unit tests: a virtual clock, in-test clients built from `Identity` + `wire`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::identity::Identity;
use crate::wire::control::{
    self, Candidate, CandidateKind, ClientMsg, ConnectFailure, ErrorCode, NatReport, Register,
    RelayTransport, Role, ServerMsg, UdpMsg,
};
use crate::wire::frame::{self, FrameReader, PREAMBLE};
use crate::wire::relay_data::{self, ChannelId};
use crate::wire::{PeerId, stun};

const RELAY: &str = "192.0.2.1:3478";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What a client read from its TCP connection.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Ctl(ServerMsg),
    Data(Vec<u8>),
}

struct Harness {
    core: RelayCore,
    now: Instant,
    relay: SocketAddr,
    /// Bytes the relay wrote to each connection, not yet parsed by the client.
    readers: HashMap<ConnId, FrameReader>,
    inbox: HashMap<ConnId, Vec<Got>>,
    closed: HashSet<ConnId>,
    /// Connections whose client does not read (their queue is not drained).
    stalled: HashSet<ConnId>,
    remotes: HashMap<ConnId, SocketAddr>,
    udp_out: Vec<Transmit>,
    next_conn: u64,
}

impl Harness {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(f: impl FnOnce(&mut RelayConfig)) -> Self {
        let mut config = RelayConfig::new(addr(RELAY), 7);
        f(&mut config);
        let now = Instant::now();
        Harness {
            relay: config.listen,
            core: RelayCore::new(config, now),
            now,
            readers: HashMap::new(),
            inbox: HashMap::new(),
            closed: HashSet::new(),
            stalled: HashSet::new(),
            remotes: HashMap::new(),
            udp_out: Vec::new(),
            next_conn: 1,
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        // Bounded: at most one sweep per virtual second plus one.
        for _ in 0..(d.as_secs() + 2) {
            match self.core.poll_timeout() {
                Some(t) if t <= self.now => self.core.handle_timeout(self.now),
                _ => break,
            }
        }
        self.pump();
    }

    /// Drains the core's outputs like a driver would.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            if let Some(t) = self.core.poll_transmit() {
                self.udp_out.push(t);
                continue;
            }
            match self.core.poll_event() {
                Some(Event::TcpWrite(c)) => {
                    if !self.stalled.contains(&c) {
                        self.drain_conn(c);
                    }
                }
                Some(Event::TcpClose(c)) => {
                    self.drain_conn(c);
                    self.closed.insert(c);
                    self.core.handle_tcp_closed(self.now, c);
                }
                None => return,
            }
        }
        panic!("pump did not settle");
    }

    fn drain_conn(&mut self, c: ConnId) {
        let bytes = self.core.tcp_outgoing(c).to_vec();
        self.core.tcp_written(c, bytes.len());
        let reader = self
            .readers
            .entry(c)
            .or_insert_with(|| FrameReader::new(false));
        for f in reader.push(&bytes).expect("relay sent a bad frame") {
            let got = match f[0] {
                0x22 => Got::Ctl(control::decode_valid(&f).expect("relay sent a bad message")),
                0x20 => Got::Data(f),
                k => panic!("relay sent frame kind {k:#x}"),
            };
            self.inbox.entry(c).or_default().push(got);
        }
    }

    fn unstall(&mut self, c: ConnId) {
        self.stalled.remove(&c);
        self.drain_conn(c);
    }

    fn take(&mut self, c: ConnId) -> Vec<Got> {
        self.pump();
        self.inbox.remove(&c).unwrap_or_default()
    }

    fn take_msgs(&mut self, c: ConnId) -> Vec<ServerMsg> {
        self.take(c)
            .into_iter()
            .filter_map(|g| match g {
                Got::Ctl(m) => Some(m),
                Got::Data(_) => None,
            })
            .collect()
    }

    fn accept_from(&mut self, remote: SocketAddr) -> ConnId {
        let c = ConnId(self.next_conn);
        self.next_conn += 1;
        self.remotes.insert(c, remote);
        self.core
            .handle_tcp_accepted(self.now, c, remote, self.relay);
        self.core.handle_tcp_data(self.now, c, &PREAMBLE);
        self.pump();
        c
    }

    fn accept(&mut self) -> ConnId {
        let n = self.next_conn;
        self.accept_from(addr(&format!("198.51.100.{}:{}", n % 250 + 1, 40000 + n)))
    }

    fn send_raw(&mut self, c: ConnId, bytes: &[u8]) {
        self.core.handle_tcp_data(self.now, c, bytes);
        self.pump();
    }

    fn send_frame(&mut self, c: ConnId, body: &[u8]) {
        let mut bytes = Vec::new();
        frame::encode(body, &mut bytes).unwrap();
        self.send_raw(c, &bytes);
    }

    fn send(&mut self, c: ConnId, msg: &ClientMsg) {
        self.send_frame(c, &control::to_vec(msg).unwrap());
    }

    fn challenge(&mut self, c: ConnId) -> [u8; 32] {
        let msgs = self.take_msgs(c);
        match msgs.as_slice() {
            [ServerMsg::Challenge { nonce, .. }] => *nonce,
            other => panic!("expected one challenge, got {other:?}"),
        }
    }

    fn register_msg(id: &Identity, nonce: &[u8; 32], token: Option<&str>) -> ClientMsg {
        ClientMsg::Register(Register {
            peer_id: id.peer_id(),
            signature: id.sign(&control::register_signed_bytes(nonce)),
            token: token.map(str::to_string),
            candidates: vec![Candidate {
                addr: addr("10.0.0.5:5000"),
                kind: CandidateKind::Host,
            }],
            nat: NatReport::default(),
            agent: "test".into(),
        })
    }

    /// Connects and registers; returns the connection and its UDP token.
    fn register_with(&mut self, id: &Identity, token: Option<&str>) -> (ConnId, [u8; 16]) {
        let c = self.accept();
        let nonce = self.challenge(c);
        self.send(c, &Self::register_msg(id, &nonce, token));
        match self.take_msgs(c).as_slice() {
            [ServerMsg::Registered { udp_token, .. }] => (c, *udp_token),
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    fn register(&mut self, id: &Identity) -> (ConnId, [u8; 16]) {
        self.register_with(id, None)
    }

    fn udp(&mut self, from: SocketAddr, packet: &[u8]) -> Option<Forward> {
        let relay = self.relay;
        let f = self.core.handle_udp(self.now, relay, from, packet);
        self.pump();
        f
    }

    fn bind(&mut self, token: [u8; 16], from: SocketAddr) {
        let bind = control::to_vec(&UdpMsg::Bind { token, seq: 1 }).unwrap();
        assert_eq!(self.udp(from, &bind), None);
        let t = self.udp_out.pop().expect("bind answered");
        assert_eq!(t.destination, from);
        assert_eq!(
            control::decode::<UdpMsg>(&t.contents).unwrap(),
            UdpMsg::Bound {
                seq: 1,
                observed: from
            }
        );
    }

    /// Registers A and B, binds both on UDP, introduces them. Returns (a, b, channel).
    fn pair(&mut self, ida: &Identity, idb: &Identity) -> (ConnId, ConnId, ChannelId) {
        let (a, ta) = self.register(ida);
        let (b, tb) = self.register(idb);
        self.bind(ta, addr(UDP_A));
        self.bind(tb, addr(UDP_B));
        self.send(
            a,
            &ClientMsg::Connect {
                peer: idb.peer_id(),
                request_id: 9,
            },
        );
        let ia = match self.take_msgs(a).as_slice() {
            [ServerMsg::Introduce(i)] => i.clone(),
            other => panic!("A expected Introduce, got {other:?}"),
        };
        let ib = match self.take_msgs(b).as_slice() {
            [ServerMsg::Introduce(i)] => i.clone(),
            other => panic!("B expected Introduce, got {other:?}"),
        };
        assert_eq!(ia.channel, ib.channel);
        (a, b, ia.channel)
    }
}

const UDP_A: &str = "203.0.113.10:1111";
const UDP_B: &str = "203.0.113.20:2222";

fn ids() -> (Identity, Identity) {
    (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    )
}

fn data(channel: ChannelId, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    relay_data::encode(channel, payload, &mut v);
    v
}

fn error_code(msgs: &[ServerMsg]) -> Option<ErrorCode> {
    msgs.iter().find_map(|m| match m {
        ServerMsg::Error { code, .. } => Some(*code),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------

#[test]
fn registration_with_good_signature() {
    let mut h = Harness::new();
    let (a, _) = ids();
    let (c, _) = h.register(&a);
    assert_eq!(h.core.peer_conn(&a.peer_id()), Some(c));
    let m = h.core.metrics();
    assert_eq!((m.registrations, m.registered, m.sessions), (1, 1, 1));
}

#[test]
fn registration_with_bad_signature_is_refused() {
    let mut h = Harness::new();
    let (a, b) = ids();
    let c = h.accept();
    let nonce = h.challenge(c);
    // B's signature under A's ID.
    let mut msg = Harness::register_msg(&b, &nonce, None);
    if let ClientMsg::Register(r) = &mut msg {
        r.peer_id = a.peer_id();
    }
    h.send(c, &msg);
    assert_eq!(error_code(&h.take_msgs(c)), Some(ErrorCode::BadSignature));
    assert!(h.closed.contains(&c));
    assert_eq!(h.core.peer_conn(&a.peer_id()), None);
    assert_eq!(h.core.metrics().registrations_bad_signature, 1);
    assert_eq!(h.core.metrics().sessions, 0);

    // A signature over another nonce (a replay) is refused too.
    let c = h.accept();
    let _ = h.challenge(c);
    h.send(c, &Harness::register_msg(&a, &[0; 32], None));
    assert_eq!(error_code(&h.take_msgs(c)), Some(ErrorCode::BadSignature));
}

#[test]
fn token_is_required_when_configured() {
    let mut h = Harness::with(|c| c.tokens = vec!["s3cret".into()]);
    let (a, b) = ids();
    let c = h.accept();
    match h.take_msgs(c).as_slice() {
        [
            ServerMsg::Challenge {
                token_required,
                nonce,
            },
        ] => {
            assert!(*token_required);
            h.send(c, &Harness::register_msg(&a, nonce, None));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(error_code(&h.take_msgs(c)), Some(ErrorCode::Unauthorized));
    let c = h.accept();
    let nonce = h.challenge(c);
    h.send(c, &Harness::register_msg(&a, &nonce, Some("wrong")));
    assert_eq!(error_code(&h.take_msgs(c)), Some(ErrorCode::Unauthorized));
    assert_eq!(h.core.metrics().registrations_unauthorized, 2);
    // Without registering, nothing but ping is served.
    let c = h.accept();
    let _ = h.challenge(c);
    h.send(
        c,
        &ClientMsg::Connect {
            peer: b.peer_id(),
            request_id: 1,
        },
    );
    assert_eq!(
        error_code(&h.take_msgs(c)),
        Some(ErrorCode::ProtocolViolation)
    );
    // STUN is still answered.
    let mut req = [0u8; 64];
    let n = stun::binding_request([3; 12], None, &mut req).unwrap();
    h.udp(addr(UDP_A), &req[..n]);
    assert_eq!(h.udp_out.len(), 1);
    h.register_with(&a, Some("s3cret"));
}

#[test]
fn second_registration_replaces_only_after_proving_the_key() {
    let mut h = Harness::new();
    let (a, b) = ids();
    let (old, _) = h.register(&a);
    let (other, _) = h.register(&b);
    h.send(
        other,
        &ClientMsg::Connect {
            peer: a.peer_id(),
            request_id: 1,
        },
    );
    let channel = match h.take_msgs(other).as_slice() {
        [ServerMsg::Introduce(i)] => i.channel,
        o => panic!("{o:?}"),
    };
    h.take_msgs(old);
    // An impostor with a bad signature changes nothing.
    let c = h.accept();
    let nonce = h.challenge(c);
    let mut msg = Harness::register_msg(&b, &nonce, None);
    if let ClientMsg::Register(r) = &mut msg {
        r.peer_id = a.peer_id();
    }
    h.send(c, &msg);
    assert_eq!(h.core.peer_conn(&a.peer_id()), Some(old));
    assert!(!h.closed.contains(&old));
    // The key holder replaces the old session.
    let (new, _) = h.register(&a);
    assert_eq!(h.core.peer_conn(&a.peer_id()), Some(new));
    assert_eq!(error_code(&h.take_msgs(old)), Some(ErrorCode::Replaced));
    assert!(h.closed.contains(&old));
    assert_eq!(
        h.take_msgs(other),
        vec![ServerMsg::PeerGone {
            peer: a.peer_id(),
            channel
        }]
    );
    assert_eq!(h.core.metrics().sessions_replaced, 1);
}

#[test]
fn ping_pong_and_garbage_frame_closes() {
    let mut h = Harness::new();
    let c = h.accept();
    h.challenge(c);
    h.send(c, &ClientMsg::Ping { seq: 42 });
    assert_eq!(h.take_msgs(c), vec![ServerMsg::Pong { seq: 42 }]);
    h.send_frame(c, &[0x22, 1, 200, 1, 2]);
    assert_eq!(
        error_code(&h.take_msgs(c)),
        Some(ErrorCode::ProtocolViolation)
    );
    assert!(h.closed.contains(&c));
    // A stream without the preamble is closed at once.
    let c = ConnId(999);
    h.core
        .handle_tcp_accepted(h.now, c, addr("198.51.100.9:1"), h.relay);
    h.send_raw(c, b"GET / HTTP/1.1\r\n\r\n");
    assert!(h.closed.contains(&c));
    assert_eq!(h.core.metrics().sessions, 0);
}

// ---------------------------------------------------------------------------------------
// Rendezvous
// ---------------------------------------------------------------------------------------

#[test]
fn introduction_reaches_both_sides_with_candidates() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (a, ta) = h.register(&ida);
    let (b, tb) = h.register(&idb);
    h.bind(ta, addr(UDP_A));
    h.bind(tb, addr(UDP_B));
    h.send(
        a,
        &ClientMsg::Connect {
            peer: idb.peer_id(),
            request_id: 77,
        },
    );
    let ia = match h.take_msgs(a).as_slice() {
        [ServerMsg::Introduce(i)] => i.clone(),
        o => panic!("{o:?}"),
    };
    let ib = match h.take_msgs(b).as_slice() {
        [ServerMsg::Introduce(i)] => i.clone(),
        o => panic!("{o:?}"),
    };
    assert_eq!(ia.peer, idb.peer_id());
    assert_eq!(ib.peer, ida.peer_id());
    assert_eq!(ia.role, Role::Initiator);
    assert_eq!(ib.role, Role::Responder);
    assert_eq!(ia.request_id, Some(77));
    assert_eq!(ib.request_id, None);
    assert_eq!(ia.channel, ib.channel);
    assert_eq!(ia.punch_nonce, ib.punch_nonce);
    assert_ne!(ia.punch_nonce, [0; 32]);
    assert_eq!(
        ia.candidates,
        vec![
            Candidate {
                addr: addr(UDP_B),
                kind: CandidateKind::ServerReflexive
            },
            Candidate {
                addr: addr("10.0.0.5:5000"),
                kind: CandidateKind::Host
            }
        ]
    );
    assert_eq!(ib.candidates[0].addr, addr(UDP_A));
    assert_eq!(h.core.metrics().introductions, 1);
    assert_eq!(h.core.metrics().channels, 1);
}

#[test]
fn unknown_peer_and_self_connect_fail_clearly() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (a, _) = h.register(&ida);
    h.send(
        a,
        &ClientMsg::Connect {
            peer: idb.peer_id(),
            request_id: 5,
        },
    );
    match h.take_msgs(a).as_slice() {
        [
            ServerMsg::ConnectFailed {
                peer,
                request_id: 5,
                reason: ConnectFailure::UnknownPeer,
                message,
            },
        ] => {
            assert_eq!(*peer, idb.peer_id());
            assert!(message.contains(&idb.peer_id().to_string()), "{message}");
            assert!(message.contains("not registered"), "{message}");
        }
        o => panic!("{o:?}"),
    }
    h.send(
        a,
        &ClientMsg::Connect {
            peer: ida.peer_id(),
            request_id: 6,
        },
    );
    assert!(matches!(
        h.take_msgs(a).as_slice(),
        [ServerMsg::ConnectFailed {
            reason: ConnectFailure::SelfConnect,
            ..
        }]
    ));
    assert_eq!(h.core.metrics().connects_failed, 2);
}

#[test]
fn close_channel_update_candidates_and_peer_gone() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (a, b, ch) = h.pair(&ida, &idb);
    let new = vec![Candidate {
        addr: addr("10.9.9.9:9"),
        kind: CandidateKind::PortMapped,
    }];
    h.send(
        a,
        &ClientMsg::UpdateCandidates {
            candidates: new.clone(),
            nat: NatReport::default(),
        },
    );
    match h.take_msgs(b).as_slice() {
        [
            ServerMsg::PeerCandidates {
                peer,
                channel,
                candidates,
                ..
            },
        ] => {
            assert_eq!((*peer, *channel), (ida.peer_id(), ch));
            assert_eq!(candidates[0].addr, addr(UDP_A));
            assert_eq!(candidates[1], new[0]);
        }
        o => panic!("{o:?}"),
    }
    h.send(b, &ClientMsg::CloseChannel { channel: ch });
    assert_eq!(
        h.take_msgs(a),
        vec![ServerMsg::PeerGone {
            peer: idb.peer_id(),
            channel: ch
        }]
    );
    assert_eq!(h.udp(addr(UDP_A), &data(ch, b"x")), None);
    assert_eq!(h.core.metrics().drop_unknown_channel, 1);
    // A fresh introduction, then B disconnects: A hears PeerGone.
    h.send(
        a,
        &ClientMsg::Connect {
            peer: idb.peer_id(),
            request_id: 1,
        },
    );
    let ch2 = match h.take_msgs(a).as_slice() {
        [ServerMsg::Introduce(i)] => i.channel,
        o => panic!("{o:?}"),
    };
    h.core.handle_tcp_closed(h.now, b);
    assert_eq!(
        h.take_msgs(a),
        vec![ServerMsg::PeerGone {
            peer: idb.peer_id(),
            channel: ch2
        }]
    );
    assert_eq!(h.core.metrics().registered, 1);
    assert_eq!(h.core.metrics().udp_bindings, 1);
}

#[test]
fn bind_with_unknown_token_is_rejected() {
    let mut h = Harness::new();
    let bind = control::to_vec(&UdpMsg::Bind {
        token: [0xEE; 16],
        seq: 4,
    })
    .unwrap();
    h.udp(addr(UDP_A), &bind);
    let t = h.udp_out.pop().unwrap();
    assert_eq!(
        control::decode::<UdpMsg>(&t.contents).unwrap(),
        UdpMsg::BindRejected { seq: 4 }
    );
    assert_eq!(h.core.metrics().udp_binds_rejected, 1);
}

// ---------------------------------------------------------------------------------------
// Relaying
// ---------------------------------------------------------------------------------------

#[test]
fn udp_to_udp_forwards_the_same_buffer() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (_, _, ch) = h.pair(&ida, &idb);
    let pkt = data(ch, b"hello over udp");
    assert_eq!(
        h.udp(addr(UDP_A), &pkt),
        Some(Forward {
            source: h.relay,
            destination: addr(UDP_B)
        })
    );
    assert_eq!(
        h.udp(addr(UDP_B), &pkt),
        Some(Forward {
            source: h.relay,
            destination: addr(UDP_A)
        })
    );
    // From a stranger: dropped.
    assert_eq!(h.udp(addr("203.0.113.99:1"), &pkt), None);
    let m = h.core.metrics();
    assert_eq!(m.relayed_packets_udp_udp, 2);
    assert_eq!(m.relayed_bytes_udp_udp, 2 * pkt.len() as u64);
    assert_eq!(m.drop_unbound_sender, 1);
}

#[test]
fn tcp_to_tcp_and_mixed_paths_keep_payloads_intact() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (a, b, ch) = h.pair(&ida, &idb);
    // B wants TCP delivery; A stays on UDP.
    h.send(
        b,
        &ClientMsg::SetRelayTransport {
            transport: RelayTransport::Tcp,
        },
    );
    // UDP (A) → TCP (B).
    let p1 = data(ch, &[1, 2, 3, 4, 5]);
    assert_eq!(h.udp(addr(UDP_A), &p1), None);
    assert_eq!(h.take(b), vec![Got::Data(p1.clone())]);
    // TCP (B) → UDP (A).
    let p2 = data(ch, &(0..=255).collect::<Vec<u8>>());
    h.send_frame(b, &p2);
    let t = h.udp_out.pop().expect("forwarded over UDP");
    assert_eq!(
        (t.source, t.destination, t.contents.as_slice()),
        (h.relay, addr(UDP_A), p2.as_slice())
    );
    // TCP (A) → TCP (B), A also asking for TCP.
    h.send(
        a,
        &ClientMsg::SetRelayTransport {
            transport: RelayTransport::Tcp,
        },
    );
    let p3 = data(ch, &vec![0xAB; 3000]);
    // Split the frame anywhere.
    let mut bytes = Vec::new();
    frame::encode(&p3, &mut bytes).unwrap();
    for piece in bytes.chunks(7) {
        h.send_raw(a, piece);
    }
    assert_eq!(h.take(b), vec![Got::Data(p3.clone())]);
    h.send_frame(b, &p3);
    assert_eq!(h.take(a), vec![Got::Data(p3.clone())]);
    let m = h.core.metrics();
    assert_eq!(m.relayed_packets_udp_tcp, 1);
    assert_eq!(m.relayed_packets_tcp_udp, 1);
    assert_eq!(m.relayed_packets_tcp_tcp, 2);
    assert_eq!(m.relayed_bytes_tcp_tcp, 2 * p3.len() as u64);
}

#[test]
fn unbound_peer_gets_data_over_tcp() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (a, ta) = h.register(&ida);
    let (b, _) = h.register(&idb);
    h.bind(ta, addr(UDP_A));
    h.send(
        a,
        &ClientMsg::Connect {
            peer: idb.peer_id(),
            request_id: 1,
        },
    );
    let ch = match h.take_msgs(a).as_slice() {
        [ServerMsg::Introduce(i)] => i.channel,
        o => panic!("{o:?}"),
    };
    h.take(b);
    let p = data(ch, b"no udp on b");
    assert_eq!(h.udp(addr(UDP_A), &p), None);
    assert_eq!(h.take(b), vec![Got::Data(p)]);
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

#[test]
fn max_sessions_and_per_ip_sessions() {
    let mut h = Harness::with(|c| {
        c.limits.max_sessions = 3;
        c.limits.max_sessions_per_ip = 2;
    });
    let ip1 = |p: u16| addr(&format!("198.51.100.1:{p}"));
    let c1 = h.accept_from(ip1(1));
    let _c2 = h.accept_from(ip1(2));
    let c3 = h.accept_from(ip1(3));
    assert_eq!(
        error_code(&h.take_msgs(c3)),
        Some(ErrorCode::TooManySessions)
    );
    assert_eq!(h.core.metrics().limit_sessions_per_ip, 1);
    let _c4 = h.accept_from(addr("198.51.100.2:1"));
    let c5 = h.accept_from(addr("198.51.100.3:1"));
    assert_eq!(
        error_code(&h.take_msgs(c5)),
        Some(ErrorCode::TooManySessions)
    );
    assert_eq!(h.core.metrics().limit_max_sessions, 1);
    assert_eq!(h.core.metrics().sessions, 3);
    // Closing one makes room again.
    h.core.handle_tcp_closed(h.now, c1);
    let c6 = h.accept_from(ip1(6));
    assert!(matches!(
        h.take_msgs(c6).as_slice(),
        [ServerMsg::Challenge { .. }]
    ));
}

#[test]
fn registration_rate_per_ip() {
    let mut h = Harness::with(|c| c.limits.registrations_per_ip_per_minute = 2);
    let (a, _) = ids();
    let from = addr("198.51.100.7:1");
    for i in 0..3 {
        let c = h.accept_from(from);
        let nonce = h.challenge(c);
        h.send(c, &Harness::register_msg(&a, &nonce, None));
        let msgs = h.take_msgs(c);
        if i < 2 {
            assert!(
                matches!(msgs.as_slice(), [ServerMsg::Registered { .. }]),
                "{msgs:?}"
            );
        } else {
            assert_eq!(error_code(&msgs), Some(ErrorCode::RateLimited));
        }
    }
    assert_eq!(h.core.metrics().limit_registration_rate, 1);
    h.advance(Duration::from_secs(61));
    let c = h.accept_from(from);
    let nonce = h.challenge(c);
    h.send(c, &Harness::register_msg(&a, &nonce, None));
    assert!(matches!(
        h.take_msgs(c).as_slice(),
        [ServerMsg::Registered { .. }]
    ));
}

#[test]
fn max_channels_per_session() {
    let mut h = Harness::with(|c| c.limits.max_channels_per_session = 2);
    let me = Identity::from_secret([10; 32]);
    let (a, _) = h.register(&me);
    let others: Vec<Identity> = (11..14).map(|i| Identity::from_secret([i; 32])).collect();
    for o in &others {
        h.register(o);
    }
    for (i, o) in others.iter().enumerate() {
        h.send(
            a,
            &ClientMsg::Connect {
                peer: o.peer_id(),
                request_id: i as u32,
            },
        );
        let msgs = h.take_msgs(a);
        if i < 2 {
            assert!(
                matches!(msgs.as_slice(), [ServerMsg::Introduce(_)]),
                "{msgs:?}"
            );
        } else {
            assert!(
                matches!(
                    msgs.as_slice(),
                    [ServerMsg::ConnectFailed {
                        reason: ConnectFailure::TooManyChannels,
                        ..
                    }]
                ),
                "{msgs:?}"
            );
        }
    }
    assert_eq!(h.core.metrics().limit_channels, 1);
    // Reconnecting to the same peer replaces its channel instead of using a new slot.
    h.send(
        a,
        &ClientMsg::Connect {
            peer: others[0].peer_id(),
            request_id: 50,
        },
    );
    assert!(matches!(
        h.take_msgs(a).as_slice(),
        [ServerMsg::Introduce(_)]
    ));
    assert_eq!(h.core.metrics().channels, 2);
}

#[test]
fn bandwidth_token_bucket_per_node() {
    let mut h = Harness::with(|c| {
        c.limits.relay_bytes_per_sec = 10_000;
        c.limits.relay_burst_bytes = 5_000;
    });
    let (ida, idb) = ids();
    let (_, _, ch) = h.pair(&ida, &idb);
    let pkt = data(ch, &[0; 992]); // 1000 bytes
    let mut forwarded = 0;
    for _ in 0..10 {
        if h.udp(addr(UDP_A), &pkt).is_some() {
            forwarded += 1;
        }
    }
    assert_eq!(forwarded, 5);
    assert_eq!(h.core.metrics().drop_bandwidth, 5);
    // B has its own bucket.
    assert!(h.udp(addr(UDP_B), &pkt).is_some());
    // 100 ms later A may send 1000 bytes more.
    h.advance(Duration::from_millis(100));
    assert!(h.udp(addr(UDP_A), &pkt).is_some());
    assert!(h.udp(addr(UDP_A), &pkt).is_none());
}

#[test]
fn tcp_queue_limit_drops_data_then_disconnects_slow_reader() {
    let mut h = Harness::with(|c| {
        c.limits.tcp_queue_bytes = 4_000;
        c.limits.control_headroom_bytes = 600;
    });
    let (ida, idb) = ids();
    let (a, b, ch) = h.pair(&ida, &idb);
    h.send(
        b,
        &ClientMsg::SetRelayTransport {
            transport: RelayTransport::Tcp,
        },
    );
    h.stalled.insert(b);
    let pkt = data(ch, &[7; 992]);
    for _ in 0..10 {
        h.udp(addr(UDP_A), &pkt);
    }
    // 3 frames of 1004 bytes fit in 4000; the rest are dropped, B stays connected.
    assert_eq!(h.core.metrics().relayed_packets_udp_tcp, 3);
    assert_eq!(h.core.metrics().drop_queue_full, 7);
    assert!(!h.closed.contains(&b));
    assert!(h.core.tcp_outgoing(b).len() <= 4_000);
    // Control messages use the headroom; once that is gone B is disconnected as TooSlow.
    let mut closed_after = None;
    for i in 0..200 {
        h.send(
            a,
            &ClientMsg::UpdateCandidates {
                candidates: vec![],
                nat: NatReport::default(),
            },
        );
        if h.closed.contains(&b) {
            closed_after = Some(i);
            break;
        }
    }
    assert!(closed_after.is_some());
    assert_eq!(h.core.metrics().limit_too_slow, 1);
    // What B had queued ends with the TooSlow error.
    h.unstall(b);
    let msgs = h.take_msgs(b);
    assert_eq!(error_code(&msgs), Some(ErrorCode::TooSlow));
    // A learns its peer is gone.
    assert!(h.take_msgs(a).contains(&ServerMsg::PeerGone {
        peer: idb.peer_id(),
        channel: ch
    }));
}

#[test]
fn frame_size_limit() {
    let mut h = Harness::with(|c| c.limits.max_frame_bytes = 100);
    let c = h.accept();
    h.challenge(c);
    h.send_frame(c, &[0x22; 101]);
    assert_eq!(
        error_code(&h.take_msgs(c)),
        Some(ErrorCode::ProtocolViolation)
    );
    assert_eq!(h.core.metrics().limit_frame_size, 1);
    // Over the wire maximum: refused from the length prefix alone.
    let c = h.accept();
    h.challenge(c);
    h.send_raw(c, &[0xff, 0xff, 0xff, 0xff]);
    assert!(h.closed.contains(&c));
    assert_eq!(h.core.metrics().limit_frame_size, 2);
}

#[test]
fn handshake_and_idle_timeouts() {
    let mut h = Harness::with(|c| {
        c.limits.handshake_timeout_secs = 5;
        c.limits.idle_timeout_secs = 30;
    });
    let (ida, _) = ids();
    let silent = h.accept();
    let (reg, _) = h.register(&ida);
    h.take_msgs(silent);
    h.advance(Duration::from_secs(4));
    assert!(!h.closed.contains(&silent));
    h.advance(Duration::from_secs(2));
    assert_eq!(
        error_code(&h.take_msgs(silent)),
        Some(ErrorCode::HandshakeTimeout)
    );
    assert_eq!(h.core.metrics().limit_handshake_timeout, 1);
    // Pings keep a registered session alive.
    for _ in 0..5 {
        h.advance(Duration::from_secs(10));
        h.send(reg, &ClientMsg::Ping { seq: 1 });
    }
    assert!(!h.closed.contains(&reg));
    h.take_msgs(reg);
    h.advance(Duration::from_secs(31));
    assert_eq!(error_code(&h.take_msgs(reg)), Some(ErrorCode::IdleTimeout));
    assert_eq!(h.core.metrics().limit_idle_timeout, 1);
    assert_eq!(h.core.peer_conn(&ida.peer_id()), None);
    assert_eq!(h.core.metrics().sessions, 0);
}

#[test]
fn shutdown_tells_every_session() {
    let mut h = Harness::new();
    let (ida, idb) = ids();
    let (a, b, _) = h.pair(&ida, &idb);
    h.core.shutdown(h.now);
    h.pump();
    for c in [a, b] {
        assert!(h.closed.contains(&c));
        assert!(h.take_msgs(c).iter().any(|m| matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::Shutdown,
                ..
            }
        )));
    }
}

// ---------------------------------------------------------------------------------------
// STUN
// ---------------------------------------------------------------------------------------

fn stun_answer(
    h: &mut Harness,
    local: SocketAddr,
    from: SocketAddr,
    req: &[u8],
) -> Option<Transmit> {
    h.core.handle_udp(h.now, local, from, req);
    h.pump();
    h.udp_out.pop()
}

#[test]
fn stun_binding_answers_rfc8489_and_rfc3489_clients() {
    let mut h = Harness::new();
    let client = addr("203.0.113.5:54321");
    let mut req = [0u8; 64];
    let n = stun::binding_request([4; 12], None, &mut req).unwrap();
    let t = stun_answer(&mut h, addr(RELAY), client, &req[..n]).unwrap();
    assert_eq!((t.source, t.destination), (h.relay, client));
    let resp = stun::parse_binding_response(&t.contents).unwrap();
    assert_eq!(resp.mapped, client);
    assert_eq!(resp.txid, [4; 12]);
    assert_eq!(resp.other_address, None);
    // RFC 3489 request (no magic cookie).
    let mut classic = vec![0, 1, 0, 0];
    classic.extend_from_slice(&[9; 16]);
    let t = stun_answer(&mut h, addr(RELAY), client, &classic).unwrap();
    assert_eq!(&t.contents[4..20], &[9; 16]);
    assert_eq!(&t.contents[24..26], &[0, 1]);
    // Unknown comprehension-required attribute → 420.
    let mut pkt = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
    pkt.extend_from_slice(&[1; 12]);
    pkt.extend_from_slice(&[0x00, 0x42, 0x00, 0x04, 1, 2, 3, 4]);
    let t = stun_answer(&mut h, addr(RELAY), client, &pkt).unwrap();
    assert!(matches!(
        stun::parse_binding_response(&t.contents),
        Err(stun::StunError::ErrorResponse { code: 420, .. })
    ));
    // CHANGE-REQUEST without an alternate address → 420.
    let n = stun::binding_request(
        [5; 12],
        Some(stun::Change {
            ip: false,
            port: true,
        }),
        &mut req,
    )
    .unwrap();
    let t = stun_answer(&mut h, addr(RELAY), client, &req[..n]).unwrap();
    assert!(matches!(
        stun::parse_binding_response(&t.contents),
        Err(stun::StunError::ErrorResponse { code: 420, .. })
    ));
    // Malformed: dropped, no answer.
    assert!(stun_answer(&mut h, addr(RELAY), client, &[0, 1, 0, 4, 0x21, 0x12]).is_none());
    let m = h.core.metrics();
    assert_eq!(
        (m.stun_requests, m.stun_responses, m.stun_errors),
        (4, 2, 2)
    );
}

#[test]
fn stun_change_request_with_alternate_address() {
    let mut h = Harness::with(|c| c.alt_listen = Some(addr("192.0.2.2:3479")));
    let client = addr("203.0.113.5:54321");
    let mut req = [0u8; 64];
    let ask = |h: &mut Harness, local: &str, ip: bool, port: bool, req: &mut [u8; 64]| {
        let change = (ip || port).then_some(stun::Change { ip, port });
        let n = stun::binding_request([6; 12], change, req).unwrap();
        let t = stun_answer(h, addr(local), client, &req[..n]).unwrap();
        let resp = stun::parse_binding_response(&t.contents).unwrap();
        assert_eq!(resp.response_origin, Some(t.source));
        (t.source, resp.other_address)
    };
    assert_eq!(
        ask(&mut h, "192.0.2.1:3478", false, false, &mut req),
        (addr("192.0.2.1:3478"), Some(addr("192.0.2.2:3479")))
    );
    assert_eq!(
        ask(&mut h, "192.0.2.1:3478", true, true, &mut req).0,
        addr("192.0.2.2:3479")
    );
    assert_eq!(
        ask(&mut h, "192.0.2.1:3478", false, true, &mut req).0,
        addr("192.0.2.1:3479")
    );
    assert_eq!(
        ask(&mut h, "192.0.2.1:3478", true, false, &mut req).0,
        addr("192.0.2.2:3478")
    );
    // On the alternate socket, OTHER-ADDRESS points back at the primary.
    assert_eq!(
        ask(&mut h, "192.0.2.2:3479", false, false, &mut req).1,
        Some(addr("192.0.2.1:3478"))
    );
    // Alternate sharing the IP: a change of IP cannot be honoured.
    let mut h = Harness::with(|c| c.alt_listen = Some(addr("192.0.2.1:3479")));
    let n = stun::binding_request(
        [7; 12],
        Some(stun::Change {
            ip: true,
            port: false,
        }),
        &mut req,
    )
    .unwrap();
    let t = stun_answer(&mut h, addr(RELAY), client, &req[..n]).unwrap();
    assert!(matches!(
        stun::parse_binding_response(&t.contents),
        Err(stun::StunError::ErrorResponse { code: 420, .. })
    ));
}

// ---------------------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------------------

fn peer(id: &Identity) -> PeerId {
    id.peer_id()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary datagrams and TCP bytes never panic, never disturb a registered pair.
    #[test]
    fn garbage_never_panics_nor_disturbs_others(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        prefixed in proptest::collection::vec(
            (0u8..4, proptest::collection::vec(any::<u8>(), 0..100)), 0..20),
        stream in proptest::collection::vec(any::<u8>(), 0..500),
        with_preamble in any::<bool>(),
    ) {
        let mut h = Harness::new();
        let (ida, idb) = ids();
        let (a, b, ch) = h.pair(&ida, &idb);
        let stranger = addr("203.0.113.66:6666");
        for d in &datagrams {
            h.udp(stranger, d);
            h.udp(addr(UDP_A), d);
        }
        // Datagrams starting with a burrow kind byte and version, to get past the first checks.
        for (k, rest) in &prefixed {
            let mut d = vec![0x20 + k, 1];
            d.extend_from_slice(rest);
            h.udp(stranger, &d);
            h.udp(addr(UDP_A), &d);
        }
        let c = ConnId(1_000_000);
        h.core.handle_tcp_accepted(h.now, c, stranger, h.relay);
        if with_preamble {
            h.core.handle_tcp_data(h.now, c, &PREAMBLE);
        }
        for piece in stream.chunks(13) {
            h.send_raw(c, piece);
        }
        // The pair still relays.
        let pkt = data(ch, b"still here");
        prop_assert!(h.udp(addr(UDP_B), &pkt).is_some());
        prop_assert_eq!(h.core.peer_conn(&peer(&ida)), Some(a));
        prop_assert_eq!(h.core.peer_conn(&peer(&idb)), Some(b));
        prop_assert!(!h.closed.contains(&a) && !h.closed.contains(&b));
    }
}

#[test]
fn stun_response_port_redirects_to_the_same_ip() {
    let mut h = Harness::with(|c| c.alt_listen = Some(addr("192.0.2.2:3479")));
    let client = addr("203.0.113.5:35120");
    // coturn's turnutils_stunclient -f second request: RESPONSE-PORT + CHANGE-REQUEST(ip, port).
    let mut pkt = vec![0x00, 0x01, 0x00, 0x10, 0x21, 0x12, 0xA4, 0x42];
    pkt.extend_from_slice(&[8; 12]);
    pkt.extend_from_slice(&[0x00, 0x27, 0x00, 0x04, 0x89, 0x31, 0, 0]);
    pkt.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 6]);
    let t = stun_answer(&mut h, addr(RELAY), client, &pkt).unwrap();
    assert_eq!(t.source, addr("192.0.2.2:3479"));
    assert_eq!(t.destination, addr("203.0.113.5:35121"));
    assert_eq!(
        stun::parse_binding_response(&t.contents).unwrap().mapped,
        client
    );
}

#[test]
fn stun_over_tcp_is_answered_on_the_connection() {
    let mut h = Harness::new();
    let c = ConnId(500);
    let client = addr("203.0.113.7:40001");
    h.core.handle_tcp_accepted(h.now, c, client, h.relay);
    h.pump();
    let mut req = [0u8; 64];
    let n = stun::binding_request([9; 12], None, &mut req).unwrap();
    let mut two = req[..n].to_vec();
    two.extend_from_slice(&req[..n]);
    // Split across calls.
    h.core.handle_tcp_data(h.now, c, &two[..5]);
    h.core.handle_tcp_data(h.now, c, &two[5..]);
    let bytes = h.core.tcp_outgoing(c).to_vec();
    h.core.tcp_written(c, bytes.len());
    // The relay speaks only after the client: nothing but STUN answers came back.
    let rest = &bytes[..];
    let first_len = 20 + u16::from_be_bytes([rest[2], rest[3]]) as usize;
    let resp = stun::parse_binding_response(&rest[..first_len]).unwrap();
    assert_eq!(resp.mapped, client);
    assert_eq!(rest.len(), 2 * first_len);
    assert_eq!(h.core.metrics().stun_responses, 2);
    // Garbage after it closes the connection without a burrow Error frame.
    h.core.handle_tcp_data(h.now, c, &[0xff; 40]);
    h.pump();
    assert!(h.closed.contains(&c));
}

#[test]
fn control_message_rate_per_session() {
    let mut h = Harness::with(|c| {
        c.limits.control_msgs_per_sec = 1;
        c.limits.control_msgs_burst = 3;
    });
    let (ida, idb) = ids();
    let (a, _) = h.register(&ida);
    let _ = idb;
    let mut limited = 0;
    for i in 0..6 {
        h.send(
            a,
            &ClientMsg::Connect {
                peer: idb.peer_id(),
                request_id: i,
            },
        );
        for m in h.take_msgs(a) {
            if let ServerMsg::ConnectFailed {
                reason: ConnectFailure::RateLimited,
                ..
            } = m
            {
                limited += 1;
            }
        }
    }
    assert_eq!(limited, 3);
    assert_eq!(h.core.metrics().limit_control_rate, 3);
    h.advance(Duration::from_secs(1));
    h.send(
        a,
        &ClientMsg::Connect {
            peer: idb.peer_id(),
            request_id: 99,
        },
    );
    assert!(matches!(
        h.take_msgs(a).as_slice(),
        [ServerMsg::ConnectFailed {
            reason: ConnectFailure::UnknownPeer,
            ..
        }]
    ));
}

#[test]
fn total_queue_limit_caps_memory_across_connections() {
    let mut h = Harness::with(|c| {
        c.limits.tcp_queue_bytes = 100_000;
        c.limits.max_total_queue_bytes = 5_000;
    });
    let (ida, idb) = ids();
    let (_, b, ch) = h.pair(&ida, &idb);
    h.send(
        b,
        &ClientMsg::SetRelayTransport {
            transport: RelayTransport::Tcp,
        },
    );
    h.stalled.insert(b);
    let pkt = data(ch, &[1; 992]);
    for _ in 0..10 {
        h.udp(addr(UDP_A), &pkt);
    }
    let m = h.core.metrics();
    assert_eq!(m.relayed_packets_udp_tcp, 4);
    assert_eq!(m.limit_total_queue, 6);
    // Once B reads, room comes back.
    h.unstall(b);
    assert!(h.udp(addr(UDP_A), &pkt).is_none());
    assert_eq!(h.core.metrics().relayed_packets_udp_tcp, 5);
}

#[test]
fn challenge_waits_for_the_whole_preamble() {
    let mut h = Harness::new();
    let c = ConnId(600);
    h.core
        .handle_tcp_accepted(h.now, c, addr("198.51.100.50:1"), h.relay);
    h.pump();
    assert!(h.core.tcp_outgoing(c).is_empty());
    for b in &PREAMBLE[..3] {
        h.send_raw(c, &[*b]);
        assert!(h.take_msgs(c).is_empty());
    }
    h.send_raw(c, &PREAMBLE[3..]);
    assert!(matches!(
        h.take_msgs(c).as_slice(),
        [ServerMsg::Challenge { .. }]
    ));
    // A client of another wire version is told why.
    let c = ConnId(601);
    h.core
        .handle_tcp_accepted(h.now, c, addr("198.51.100.50:2"), h.relay);
    h.send_raw(c, b"BRW\x07");
    match h.take_msgs(c).as_slice() {
        [
            ServerMsg::Error {
                code: ErrorCode::ProtocolViolation,
                message,
            },
        ] => assert!(message.contains("version 7"), "{message}"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn per_ip_limits_count_an_ipv6_slash_64_as_one_client() {
    let mut h = Harness::with(|c| c.limits.max_sessions_per_ip = 2);
    let _a = h.accept_from(addr("[2001:db8:1:2::1]:1000"));
    let _b = h.accept_from(addr("[2001:db8:1:2::ffff]:1000"));
    // A third address from the same /64 is the same client.
    let c = h.accept_from(addr("[2001:db8:1:2:abcd::7]:1000"));
    assert_eq!(
        error_code(&h.take_msgs(c)),
        Some(ErrorCode::TooManySessions)
    );
    // Another /64 is another client.
    let d = h.accept_from(addr("[2001:db8:1:3::1]:1000"));
    assert!(matches!(
        h.take_msgs(d).as_slice(),
        [ServerMsg::Challenge { .. }]
    ));
}

// ---------------------------------------------------------------------------------------
// GRO batches (handle_udp_segments)
// ---------------------------------------------------------------------------------------

const UDP_C: &str = "203.0.113.30:3333";

/// A introduced to B (channel ab) and to C (channel ac), all bound on UDP.
fn triangle(h: &mut Harness) -> (ChannelId, ChannelId) {
    let (ida, idb) = ids();
    let idc = Identity::from_secret([3; 32]);
    let (a, _, ab) = h.pair(&ida, &idb);
    let (c, tc) = h.register(&idc);
    h.bind(tc, addr(UDP_C));
    h.send(
        a,
        &ClientMsg::Connect {
            peer: idc.peer_id(),
            request_id: 10,
        },
    );
    let ac = match h.take_msgs(a).as_slice() {
        [ServerMsg::Introduce(i)] => i.channel,
        other => panic!("A expected Introduce, got {other:?}"),
    };
    h.take_msgs(c);
    (ab, ac)
}

/// `packets` concatenated, with `seg` the size of all but the last.
fn gro_buffer(packets: &[Vec<u8>]) -> Vec<u8> {
    packets.concat()
}

fn segments(h: &mut Harness, from: &str, buf: &[u8], seg: usize) -> Vec<ForwardRun> {
    let mut out = Vec::new();
    let relay = h.relay;
    h.core
        .handle_udp_segments(h.now, relay, addr(from), buf, seg, &mut out);
    h.pump();
    out
}

#[test]
fn gro_buffer_with_two_destinations_is_split_into_runs() {
    let mut h = Harness::new();
    let (ab, ac) = triangle(&mut h);
    let p = |ch, b: u8| data(ch, &[b; 92]); // 100 bytes each
    // B B C C C B, last one shorter.
    let mut pkts = vec![p(ab, 1), p(ab, 2), p(ac, 3), p(ac, 4), p(ac, 5)];
    pkts.push(data(ab, &[6; 40]));
    let buf = gro_buffer(&pkts);
    let runs = segments(&mut h, UDP_A, &buf, 100);
    let to = |d: &str| Forward {
        source: h.relay,
        destination: addr(d),
    };
    assert_eq!(
        runs,
        vec![
            ForwardRun {
                forward: to(UDP_B),
                offset: 0,
                len: 200,
                segment_len: 100
            },
            ForwardRun {
                forward: to(UDP_C),
                offset: 200,
                len: 300,
                segment_len: 100
            },
            ForwardRun {
                forward: to(UDP_B),
                offset: 500,
                len: 48,
                segment_len: 100
            },
        ]
    );
    assert_eq!(runs[1].segments(), 3);
    let m = h.core.metrics();
    assert_eq!(m.relayed_packets_udp_udp, 6);
    assert_eq!(m.relayed_bytes_udp_udp, 548);
    assert_eq!((m.udp_gro_buffers, m.udp_gro_segments), (1, 6));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A GRO buffer handled at once forwards exactly what handling its segments one by one
    /// forwards, with the same metrics: mixed channels, an unknown channel, garbage and
    /// control segments, a shorter last segment, and a bandwidth bucket that runs out.
    #[test]
    fn gro_buffer_equals_its_segments_one_by_one(
        kinds in proptest::collection::vec(0u8..6, 1..64),
        seg in 12usize..300,
        short_last in proptest::option::of(12usize..300),
        tight_bucket in any::<bool>(),
    ) {
        let make = || {
            let mut h = Harness::with(|c| {
                if tight_bucket {
                    c.limits.relay_bytes_per_sec = 1_000;
                    c.limits.relay_burst_bytes = 3_000;
                }
            });
            let channels = triangle(&mut h);
            (h, channels)
        };
        let (mut whole, (ab, ac)) = make();
        let (mut single, _) = make();
        // A shorter last segment only without a bucket limit (with one, the batch cuts a
        // run at its first refusal while one by one a shorter last packet may still pass).
        let short_last = short_last.filter(|&l| l < seg && !tight_bucket);
        let mut packets = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let len = match short_last {
                Some(l) if i + 1 == kinds.len() => l,
                _ => seg,
            };
            let mut p = match kind {
                0 | 1 => data(ab, &vec![i as u8; len - relay_data::HEADER_LEN]),
                2 | 3 => data(ac, &vec![i as u8; len - relay_data::HEADER_LEN]),
                4 => data(ChannelId(0xDEAD_BEEF), &vec![0; len - relay_data::HEADER_LEN]),
                _ => vec![0xEE; len],
            };
            p.truncate(len);
            packets.push(p);
        }
        let buf = packets.concat();
        let runs = segments(&mut whole, UDP_A, &buf, seg);
        let mut expanded = Vec::new();
        for r in &runs {
            prop_assert!(r.len > 0 && r.offset + r.len <= buf.len());
            for (k, chunk) in buf[r.offset..r.offset + r.len].chunks(seg).enumerate() {
                expanded.push((r.offset + k * seg, chunk.len(), r.forward));
            }
        }
        let mut one_by_one = Vec::new();
        let mut offset = 0;
        for p in &packets {
            if let Some(f) = single.udp(addr(UDP_A), p) {
                one_by_one.push((offset, p.len(), f));
            }
            offset += p.len();
        }
        prop_assert_eq!(expanded, one_by_one);
        let mut m = whole.core.metrics().clone();
        let n = single.core.metrics().clone();
        if kinds.len() > 1 {
            prop_assert_eq!((m.udp_gro_buffers, m.udp_gro_segments), (1, kinds.len() as u64));
        }
        m.udp_gro_buffers = 0;
        m.udp_gro_segments = 0;
        prop_assert_eq!(m, n);
    }
}

#[test]
fn stun_answers_are_rate_limited_per_client() {
    let mut h = Harness::with(|c| c.limits.stun_per_ip_per_second = 5);
    let mut req = [0u8; 64];
    let n = stun::binding_request([6; 12], None, &mut req).unwrap();
    let spoofed = addr("203.0.113.9:1000");
    let answered = (0..20)
        .filter(|i| {
            let from = SocketAddr::new(spoofed.ip(), 1000 + i);
            stun_answer(&mut h, addr(RELAY), from, &req[..n]).is_some()
        })
        .count();
    assert_eq!(
        answered, 5,
        "one client (any port) gets 5 answers per second"
    );
    assert_eq!(h.core.metrics().limit_stun_rate, 15);
    // Another client is not affected; the first gets answers again a second later.
    assert!(stun_answer(&mut h, addr(RELAY), addr("203.0.113.10:1"), &req[..n]).is_some());
    h.advance(Duration::from_secs(1));
    assert!(stun_answer(&mut h, addr(RELAY), spoofed, &req[..n]).is_some());
    assert!(
        h.core
            .metrics()
            .render_prometheus()
            .contains("limit=\"stun_rate\"} 15")
    );
}
