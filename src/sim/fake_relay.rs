//! A minimal relay for the simulator, speaking the real wire protocol, used until the real
//! `RelayCore` is wired in (see [`super::SimRelay`]). It does just enough: challenge /
//! register with signature check, UDP bind, STUN with OTHER-ADDRESS, introductions with a
//! fresh channel and nonce, forwarding over UDP or TCP per the receiver's chosen transport.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{RelayOutput, SimRelay};
use crate::wire::control::{
    self, Candidate, CandidateKind, ClientMsg, ConnectFailure, Introduction, NatReport,
    RelayTransport, Role, ServerMsg, UdpMsg,
};
use crate::wire::frame::{self, FrameReader};
use crate::wire::relay_data::{self, ChannelId};
use crate::wire::{PacketClass, PeerId, classify, stun};

#[derive(Debug)]
struct Session {
    reader: FrameReader,
    nonce: [u8; 32],
    from: SocketAddr,
    peer: Option<PeerId>,
    token: [u8; 16],
    udp: Option<SocketAddr>,
    transport: RelayTransport,
    candidates: Vec<Candidate>,
    nat: NatReport,
}

/// The fake relay.
#[derive(Debug)]
pub struct FakeRelay {
    main: SocketAddr,
    alternate: SocketAddr,
    rng: ChaCha20Rng,
    sessions: HashMap<u64, Session>,
    by_peer: HashMap<PeerId, u64>,
    channels: HashMap<ChannelId, (PeerId, PeerId)>,
    next_channel: u32,
    out: VecDeque<RelayOutput>,
}

impl FakeRelay {
    /// A relay answering on `main` (everything) and `alternate` (STUN only).
    pub fn new(main: SocketAddr, alternate: SocketAddr, seed: u64) -> Self {
        FakeRelay {
            main,
            alternate,
            rng: ChaCha20Rng::seed_from_u64(seed),
            sessions: HashMap::new(),
            by_peer: HashMap::new(),
            channels: HashMap::new(),
            next_channel: 1,
            out: VecDeque::new(),
        }
    }

    fn send_tcp(&mut self, conn: u64, body: &[u8]) {
        let mut v = Vec::new();
        if frame::encode(body, &mut v).is_ok() {
            self.out.push_back(RelayOutput::Tcp { conn, bytes: v });
        }
    }

    fn send_msg(&mut self, conn: u64, msg: &ServerMsg) {
        if let Ok(b) = control::to_vec(msg) {
            self.send_tcp(conn, &b);
        }
    }

    fn deliver(&mut self, to: PeerId, packet: &[u8]) {
        let Some(&conn) = self.by_peer.get(&to) else {
            return;
        };
        let Some(s) = self.sessions.get(&conn) else {
            return;
        };
        match (s.transport, s.udp) {
            (RelayTransport::Udp, Some(addr)) => self.out.push_back(RelayOutput::Udp {
                from: self.main,
                to: addr,
                bytes: packet.to_vec(),
            }),
            _ => self.send_tcp(conn, packet),
        }
    }

    fn forward(&mut self, sender: PeerId, packet: &[u8]) {
        let Ok(ch) = relay_data::channel(packet) else {
            return;
        };
        let Some(&(a, b)) = self.channels.get(&ch) else {
            return;
        };
        let to = if sender == a {
            b
        } else if sender == b {
            a
        } else {
            return;
        };
        self.deliver(to, packet);
    }

    fn candidates_of(&self, conn: u64) -> (Vec<Candidate>, NatReport) {
        let s = &self.sessions[&conn];
        let mut v = Vec::new();
        if let Some(u) = s.udp {
            v.push(Candidate {
                addr: u,
                kind: CandidateKind::ServerReflexive,
            });
        }
        for c in &s.candidates {
            if !v.iter().any(|x| x.addr == c.addr) {
                v.push(*c);
            }
        }
        v.truncate(control::MAX_CANDIDATES);
        (v, s.nat)
    }

    /// Tells every peer with a channel to `conn`'s node about its new candidates.
    fn announce(&mut self, conn: u64) {
        let Some(me) = self.sessions.get(&conn).and_then(|s| s.peer) else {
            return;
        };
        let (candidates, nat) = self.candidates_of(conn);
        let targets: Vec<(ChannelId, PeerId)> = self
            .channels
            .iter()
            .filter_map(|(ch, &(a, b))| {
                if a == me {
                    Some((*ch, b))
                } else if b == me {
                    Some((*ch, a))
                } else {
                    None
                }
            })
            .collect();
        for (channel, other) in targets {
            if let Some(&oc) = self.by_peer.get(&other) {
                self.send_msg(
                    oc,
                    &ServerMsg::PeerCandidates {
                        peer: me,
                        channel,
                        candidates: candidates.clone(),
                        nat,
                    },
                );
            }
        }
    }

    fn on_client(&mut self, conn: u64, msg: ClientMsg) {
        match msg {
            ClientMsg::Register(r) => {
                let Some(s) = self.sessions.get_mut(&conn) else {
                    return;
                };
                let ok = r.peer_id.verify(
                    &control::register_signed_bytes(&s.nonce),
                    &r.signature.to_bytes(),
                );
                if !ok || s.peer.is_some() {
                    self.out.push_back(RelayOutput::CloseTcp { conn });
                    return;
                }
                s.peer = Some(r.peer_id);
                s.candidates = r.candidates;
                s.nat = r.nat;
                let token = s.token;
                let from = s.from;
                if let Some(old) = self.by_peer.insert(r.peer_id, conn)
                    && old != conn
                {
                    self.sessions.remove(&old);
                    self.out.push_back(RelayOutput::CloseTcp { conn: old });
                }
                let alt = self.alternate;
                self.send_msg(
                    conn,
                    &ServerMsg::Registered {
                        udp_token: token,
                        observed_tcp: from,
                        keepalive_secs: 15,
                        stun_alternate: Some(alt),
                    },
                );
            }
            ClientMsg::Connect { peer, request_id } => {
                let Some(me) = self.sessions.get(&conn).and_then(|s| s.peer) else {
                    return;
                };
                let Some(&other) = self.by_peer.get(&peer) else {
                    self.send_msg(
                        conn,
                        &ServerMsg::ConnectFailed {
                            peer,
                            request_id,
                            reason: ConnectFailure::UnknownPeer,
                            message: "unknown peer".into(),
                        },
                    );
                    return;
                };
                let channel = ChannelId(self.next_channel);
                self.next_channel += 1;
                self.channels.insert(channel, (me, peer));
                let nonce: [u8; 32] = self.rng.random();
                let (mine, my_nat) = self.candidates_of(conn);
                let (theirs, their_nat) = self.candidates_of(other);
                self.send_msg(
                    conn,
                    &ServerMsg::Introduce(Introduction {
                        peer,
                        channel,
                        punch_nonce: nonce,
                        role: Role::Initiator,
                        candidates: theirs,
                        nat: their_nat,
                        request_id: Some(request_id),
                    }),
                );
                self.send_msg(
                    other,
                    &ServerMsg::Introduce(Introduction {
                        peer: me,
                        channel,
                        punch_nonce: nonce,
                        role: Role::Responder,
                        candidates: mine,
                        nat: my_nat,
                        request_id: None,
                    }),
                );
            }
            ClientMsg::UpdateCandidates { candidates, nat } => {
                if let Some(s) = self.sessions.get_mut(&conn) {
                    s.candidates = candidates;
                    s.nat = nat;
                }
                self.announce(conn);
            }
            ClientMsg::Ping { seq } => self.send_msg(conn, &ServerMsg::Pong { seq }),
            ClientMsg::CloseChannel { channel } => {
                self.channels.remove(&channel);
            }
            ClientMsg::SetRelayTransport { transport } => {
                if let Some(s) = self.sessions.get_mut(&conn) {
                    s.transport = transport;
                }
            }
        }
    }
}

impl SimRelay for FakeRelay {
    fn tcp_open(&mut self, _now: Instant, conn: u64, from: SocketAddr) {
        let nonce: [u8; 32] = self.rng.random();
        let token: [u8; 16] = self.rng.random();
        self.sessions.insert(
            conn,
            Session {
                reader: FrameReader::new(true),
                nonce,
                from,
                peer: None,
                token,
                udp: None,
                transport: RelayTransport::Udp,
                candidates: Vec::new(),
                nat: NatReport::default(),
            },
        );
        self.send_msg(
            conn,
            &ServerMsg::Challenge {
                nonce,
                token_required: false,
            },
        );
    }

    fn tcp_data(&mut self, _now: Instant, conn: u64, data: &[u8]) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        let frames = match s.reader.push(data) {
            Ok(f) => f,
            Err(_) => {
                self.tcp_closed(_now, conn);
                self.out.push_back(RelayOutput::CloseTcp { conn });
                return;
            }
        };
        for f in frames {
            match classify(&f) {
                PacketClass::Control => {
                    if let Ok(msg) = control::decode_valid::<ClientMsg>(&f) {
                        self.on_client(conn, msg);
                    }
                }
                PacketClass::RelayData => {
                    if let Some(p) = self.sessions.get(&conn).and_then(|s| s.peer) {
                        self.forward(p, &f);
                    }
                }
                _ => {}
            }
        }
    }

    fn tcp_closed(&mut self, _now: Instant, conn: u64) {
        if let Some(s) = self.sessions.remove(&conn)
            && let Some(p) = s.peer
            && self.by_peer.get(&p) == Some(&conn)
        {
            self.by_peer.remove(&p);
        }
    }

    fn udp(&mut self, _now: Instant, local: SocketAddr, from: SocketAddr, data: &[u8]) {
        match classify(data) {
            PacketClass::Stun => {
                let Some(req) = stun::parse_binding_request(data) else {
                    return;
                };
                let mut buf = [0u8; 512];
                let other = if local == self.main {
                    Some(self.alternate)
                } else {
                    Some(self.main)
                };
                if let Ok(n) = stun::binding_success(&req, from, Some(local), other, &mut buf) {
                    self.out.push_back(RelayOutput::Udp {
                        from: local,
                        to: from,
                        bytes: buf[..n].to_vec(),
                    });
                }
            }
            _ if local != self.main => {}
            PacketClass::Control => {
                let Ok(UdpMsg::Bind { token, seq }) = control::decode_valid::<UdpMsg>(data) else {
                    return;
                };
                let hit = self
                    .sessions
                    .iter_mut()
                    .find(|(_, s)| s.token == token && s.peer.is_some());
                let mut changed = None;
                let reply = match hit {
                    Some((conn, s)) => {
                        if s.udp != Some(from) {
                            changed = Some(*conn);
                        }
                        s.udp = Some(from);
                        UdpMsg::Bound {
                            seq,
                            observed: from,
                        }
                    }
                    None => UdpMsg::BindRejected { seq },
                };
                if let Some(conn) = changed {
                    self.announce(conn);
                }
                if let Ok(bytes) = control::to_vec(&reply) {
                    self.out.push_back(RelayOutput::Udp {
                        from: self.main,
                        to: from,
                        bytes,
                    });
                }
            }
            PacketClass::RelayData => {
                let sender = self
                    .sessions
                    .values()
                    .find(|s| s.udp == Some(from))
                    .and_then(|s| s.peer);
                if let Some(p) = sender {
                    self.forward(p, data);
                }
            }
            _ => {}
        }
    }

    fn poll_output(&mut self) -> Option<RelayOutput> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn handle_timeout(&mut self, _now: Instant) {}
}
