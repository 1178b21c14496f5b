//! Loopback tests of the real `burrow-relay` binary: STUN with coturn's client,
//! registration, introductions, UDP/TCP relaying with payload integrity, garbage floods,
//! metrics and clean shutdown. Traffic goes to 127.0.0.1 only.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burrow::identity::Identity;
use burrow::wire::PeerId;
use burrow::wire::control::{
    ClientMsg, ConnectFailure, ErrorCode, RelayTransport, Role, ServerMsg,
};
use burrow::wire::relay_data::{self, ChannelId};
use common::{Got, Node, Relay, Rng, Session, WAIT, register_msg, seed};

/// Generous limits so bandwidth buckets and queues do not drop test traffic.
const FAST: &[&str] = &[
    "--relay-bytes-per-sec",
    "1000000000",
    "--relay-burst-bytes",
    "100000000",
    "--tcp-queue-bytes",
    "16000000",
];

fn identity(rng: &mut Rng) -> Identity {
    let mut secret = [0u8; 32];
    rng.fill(&mut secret);
    Identity::from_secret(secret)
}

/// Registers two nodes and introduces A to B; returns them and their channel.
fn pair(relay: &Relay, rng: &mut Rng) -> (Node, Node, ChannelId) {
    let mut a = Node::register(relay.addr, identity(rng));
    let mut b = Node::register(relay.addr, identity(rng));
    a.session.send(&ClientMsg::Connect {
        peer: b.id.peer_id(),
        request_id: 1,
    });
    let ia = match a.session.recv_msg() {
        ServerMsg::Introduce(i) => i,
        m => panic!("A expected Introduce, got {m:?}"),
    };
    let ib = match b.session.recv_msg() {
        ServerMsg::Introduce(i) => i,
        m => panic!("B expected Introduce, got {m:?}"),
    };
    assert_eq!(ia.channel, ib.channel);
    assert_eq!(ia.punch_nonce, ib.punch_nonce);
    assert_eq!((ia.role, ib.role), (Role::Initiator, Role::Responder));
    assert_eq!(ia.peer, b.id.peer_id());
    assert_eq!(ib.peer, a.id.peer_id());
    // The relay-observed UDP address comes first.
    assert_eq!(ia.candidates[0].addr, b.udp.local_addr().unwrap());
    assert_eq!(ib.candidates[0].addr, a.udp.local_addr().unwrap());
    (a, b, ia.channel)
}

/// Packet `seq`: relay header, then seq, then bytes derived from (seq, index).
fn make_packet(channel: ChannelId, seq: u32, len: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(len.max(4));
    payload.extend_from_slice(&seq.to_be_bytes());
    for i in 4..len.max(4) {
        payload.push((seq as usize * 31 + i * 7) as u8 ^ (i >> 8) as u8);
    }
    let mut out = Vec::new();
    relay_data::encode(channel, &payload, &mut out);
    out
}

/// Checks a received packet; returns its seq if intact.
fn check_packet(channel: ChannelId, packet: &[u8]) -> Option<u32> {
    let (ch, payload) = relay_data::parse(packet).ok()?;
    if ch != channel || payload.len() < 4 {
        return None;
    }
    let seq = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let want = make_packet(channel, seq, payload.len());
    (want == packet).then_some(seq)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Udp,
    Tcp,
}

/// Sends `count` packets of random sizes from A (via `send`) to B (receiving via `recv`),
/// paced; returns (intact, corrupt) as counted by B.
fn transfer(
    a: &mut Node,
    b: Node,
    channel: ChannelId,
    send: Via,
    recv: Via,
    count: u32,
    rng: &mut Rng,
) -> (Node, usize, usize) {
    let max_len = if send == Via::Udp || recv == Via::Udp {
        1200
    } else {
        3000
    };
    if recv == Via::Tcp {
        // Ask for TCP delivery and wait until the relay has processed it.
        let mut b = b;
        b.session.send(&ClientMsg::SetRelayTransport {
            transport: RelayTransport::Tcp,
        });
        b.session.send(&ClientMsg::Ping { seq: 77 });
        assert_eq!(b.session.recv_msg(), ServerMsg::Pong { seq: 77 });
        return transfer_inner(a, b, channel, send, recv, count, max_len, rng);
    }
    transfer_inner(a, b, channel, send, recv, count, max_len, rng)
}

#[allow(clippy::too_many_arguments)]
fn transfer_inner(
    a: &mut Node,
    mut b: Node,
    channel: ChannelId,
    send: Via,
    recv: Via,
    count: u32,
    max_len: u64,
    rng: &mut Rng,
) -> (Node, usize, usize) {
    let done = Arc::new(AtomicBool::new(false));
    let done_rx = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut seen = vec![false; count as usize];
        let (mut intact, mut corrupt) = (0usize, 0usize);
        let mut idle_after_done = 0;
        let mut buf = vec![0u8; 70_000];
        b.udp
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        b.session
            .tcp
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        // Hang guard: at most this many receive attempts.
        for _ in 0..(count as usize * 4 + 1000) {
            let got = match recv {
                Via::Udp => b
                    .udp
                    .recv_from(&mut buf)
                    .ok()
                    .map(|(n, _)| buf[..n].to_vec()),
                Via::Tcp => match b.session.recv_timeout() {
                    Some(Got::Data(d)) => Some(d),
                    Some(Got::Ctl(_)) => continue,
                    Some(Got::Closed) => panic!("B's session closed"),
                    None => None,
                },
            };
            match got {
                Some(p) => match check_packet(channel, &p) {
                    Some(seq) if (seq as usize) < seen.len() && !seen[seq as usize] => {
                        seen[seq as usize] = true;
                        intact += 1;
                    }
                    _ => corrupt += 1,
                },
                None if done_rx.load(Ordering::SeqCst) => {
                    idle_after_done += 1;
                    if idle_after_done >= 3 {
                        break;
                    }
                }
                None => {}
            }
            if intact == count as usize {
                break;
            }
        }
        b.session.tcp.set_read_timeout(Some(WAIT)).unwrap();
        (b, intact, corrupt)
    });
    for seq in 0..count {
        let len = 4 + rng.below(max_len - 4) as usize;
        let p = make_packet(channel, seq, len);
        match send {
            Via::Udp => {
                a.udp.send_to(&p, a.relay).unwrap();
            }
            Via::Tcp => a.session.send_frame(&p),
        }
        if seq % 16 == 15 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    done.store(true, Ordering::SeqCst);
    let (b, intact, corrupt) = receiver.join().expect("receiver thread");
    (b, intact, corrupt)
}

fn run_path(send: Via, recv: Via) {
    let mut rng = Rng(seed(&format!("relay {send:?}->{recv:?}")));
    let relay = Relay::start(FAST);
    let (mut a, b, channel) = pair(&relay, &mut rng);
    let count = 2000;
    let (b, intact, corrupt) = transfer(&mut a, b, channel, send, recv, count, &mut rng);
    eprintln!("{send:?}->{recv:?}: {intact}/{count} intact, {corrupt} corrupt");
    assert_eq!(corrupt, 0, "corrupted or duplicated packets arrived");
    if send == Via::Tcp && recv == Via::Tcp {
        assert_eq!(intact, count as usize, "TCP to TCP must be lossless");
    } else {
        assert!(
            intact >= count as usize * 8 / 10,
            "only {intact}/{count} arrived"
        );
    }
    // A few packets back the other way prove the path is bidirectional.
    let mut b = b;
    let (_a, back_intact, back_corrupt) = transfer(&mut b, a, channel, recv, send, 50, &mut rng);
    assert_eq!(back_corrupt, 0);
    assert!(back_intact >= 40, "only {back_intact}/50 came back");
    let label = |v: Via| if v == Via::Udp { "udp" } else { "tcp" };
    let relayed = relay.metric(&format!(
        "burrow_relay_relayed_packets_total{{from=\"{}\",to=\"{}\"}}",
        label(send),
        label(recv)
    ));
    assert!(relayed >= intact as u64, "metrics say {relayed} relayed");
}

#[test]
fn relays_udp_to_udp() {
    run_path(Via::Udp, Via::Udp);
}

#[test]
fn relays_tcp_to_tcp() {
    run_path(Via::Tcp, Via::Tcp);
}

#[test]
fn relays_udp_to_tcp_and_back() {
    run_path(Via::Udp, Via::Tcp);
}

#[test]
fn relays_tcp_to_udp_and_back() {
    run_path(Via::Tcp, Via::Udp);
}

#[test]
fn stun_answered_for_coturn_client() {
    let relay = Relay::start(&[]);
    let port = relay.addr.port().to_string();
    let Some(text) = stunclient(&["-p", &port, "127.0.0.1"]) else {
        return;
    };
    let reflexive: SocketAddr = text
        .lines()
        .find_map(|l| l.split("UDP reflexive addr: ").nth(1))
        .unwrap_or_else(|| panic!("no reflexive address in:\n{text}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(reflexive.ip().to_string(), "127.0.0.1");
    assert_ne!(reflexive.port(), 0);
    assert!(relay.metric("burrow_relay_stun_responses_total") >= 1);
}

#[test]
fn registration_good_and_bad_signature() {
    let mut rng = Rng(seed("registration"));
    let relay = Relay::start(&[]);
    let a = identity(&mut rng);
    let b = identity(&mut rng);
    // B's signature under A's ID.
    let mut s = Session::open(relay.addr);
    let nonce = s.challenge();
    let mut msg = register_msg(&b, &nonce, None);
    if let ClientMsg::Register(r) = &mut msg {
        r.peer_id = a.peer_id();
    }
    s.send(&msg);
    match s.recv() {
        Got::Ctl(ServerMsg::Error {
            code: ErrorCode::BadSignature,
            ..
        }) => {}
        g => panic!("expected BadSignature, got {g:?}"),
    }
    assert_eq!(s.recv(), Got::Closed);
    // The real key holder registers.
    let node = Node::register(relay.addr, a);
    drop(node);
    assert_eq!(
        relay.metric("burrow_relay_registrations_bad_signature_total"),
        1
    );
    assert_eq!(relay.metric("burrow_relay_registrations_total"), 1);
}

#[test]
fn token_required_when_configured() {
    let mut rng = Rng(seed("token"));
    let relay = Relay::start(&["--token", "sesame"]);
    let a = identity(&mut rng);
    let mut s = Session::open(relay.addr);
    let nonce = s.challenge();
    s.send(&register_msg(&a, &nonce, Some("wrong")));
    assert!(matches!(
        s.recv_msg(),
        ServerMsg::Error {
            code: ErrorCode::Unauthorized,
            ..
        }
    ));
    let mut s = Session::open(relay.addr);
    let nonce = s.challenge();
    s.send(&register_msg(&a, &nonce, Some("sesame")));
    assert!(matches!(s.recv_msg(), ServerMsg::Registered { .. }));
}

#[test]
fn unknown_peer_gets_a_clear_error() {
    let mut rng = Rng(seed("unknown peer"));
    let relay = Relay::start(&[]);
    let mut a = Node::register(relay.addr, identity(&mut rng));
    let stranger: PeerId = identity(&mut rng).peer_id();
    a.session.send(&ClientMsg::Connect {
        peer: stranger,
        request_id: 3,
    });
    match a.session.recv_msg() {
        ServerMsg::ConnectFailed {
            peer,
            request_id: 3,
            reason: ConnectFailure::UnknownPeer,
            message,
        } => {
            assert_eq!(peer, stranger);
            assert!(message.contains("not registered"), "{message}");
        }
        m => panic!("expected ConnectFailed, got {m:?}"),
    }
}

#[test]
fn garbage_flood_does_not_disturb_a_relaying_pair() {
    let mut rng = Rng(seed("garbage flood"));
    let relay = Relay::start(FAST);
    let (mut a, b, channel) = pair(&relay, &mut rng);
    let target = relay.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut floods = Vec::new();
    for t in 0..3u64 {
        let stop = stop.clone();
        let mut r = Rng(rng.next() | 1);
        floods.push(std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut buf = [0u8; 1500];
            let mut sent = 0u64;
            for i in 0..20_000u64 {
                if stop.load(Ordering::Relaxed) && i > 5000 {
                    break;
                }
                let len = r.below(1500) as usize;
                r.fill(&mut buf[..len]);
                if len >= 2 {
                    // Half of them look like burrow or STUN packets, to get past first checks.
                    match r.below(4) {
                        0 => buf[0] = r.below(4) as u8,
                        1 => {
                            buf[0] = 0x20 + r.below(3) as u8;
                            buf[1] = 1;
                        }
                        _ => {}
                    }
                }
                let _ = sock.send_to(&buf[..len], target);
                sent += 1;
                if i % 64 == 63 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            eprintln!("udp flood {t}: {sent} datagrams");
        }));
    }
    {
        let stop = stop.clone();
        let mut r = Rng(rng.next() | 1);
        floods.push(std::thread::spawn(move || {
            let mut silent = Vec::new();
            for i in 0..200u64 {
                if stop.load(Ordering::Relaxed) && i > 100 {
                    break;
                }
                let Ok(mut s) = TcpStream::connect(target) else {
                    continue;
                };
                let mut junk = vec![0u8; r.below(3000) as usize];
                r.fill(&mut junk);
                let _ = match i % 5 {
                    0 => s.write_all(&junk),
                    1 => s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                    2 => s
                        .write_all(b"BRW\x01")
                        .and_then(|_| s.write_all(&[0xff, 0xff, 0xff, 0xff])),
                    3 => s.write_all(b"BRW\x01").and_then(|_| s.write_all(&junk)),
                    _ => Ok(()),
                };
                if i % 10 == 4 && silent.len() < 10 {
                    silent.push(s);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            eprintln!("tcp flood: done, {} silent connections held", silent.len());
        }));
    }
    let count = 1000;
    let (b, intact, corrupt) = transfer(&mut a, b, channel, Via::Udp, Via::Udp, count, &mut rng);
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().unwrap();
    }
    eprintln!("during flood: {intact}/{count} intact, {corrupt} corrupt");
    assert_eq!(corrupt, 0);
    assert!(
        intact >= count as usize * 7 / 10,
        "only {intact}/{count} arrived"
    );
    // Both sessions are still alive.
    let mut b = b;
    for n in [&mut a, &mut b] {
        n.session.send(&ClientMsg::Ping { seq: 5 });
        assert_eq!(n.session.recv_msg(), ServerMsg::Pong { seq: 5 });
    }
    let text = relay.metrics_text();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert!(value("burrow_relay_dropped_total{reason=\"malformed\"}") > 0);
    assert!(value("burrow_relay_protocol_violations_total") > 0);
    assert_eq!(value("burrow_relay_registered"), 2);
    assert!(value("burrow_relay_relayed_packets_total{from=\"udp\",to=\"udp\"}") >= intact as u64);
}

#[test]
fn sigterm_shuts_down_cleanly_and_tells_sessions() {
    let mut rng = Rng(seed("sigterm"));
    let mut relay = Relay::start(&[]);
    let mut a = Node::register(relay.addr, identity(&mut rng));
    let status = relay.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(matches!(
        a.session.recv_msg(),
        ServerMsg::Error {
            code: ErrorCode::Shutdown,
            ..
        }
    ));
}

#[test]
fn stun_over_tcp_on_the_same_port() {
    use std::io::Read;
    let relay = Relay::start(&[]);
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = [0u8; 64];
    let n = burrow::wire::stun::binding_request([1; 12], None, &mut req).unwrap();
    s.write_all(&req[..n]).unwrap();
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap();
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut resp = head.to_vec();
    resp.resize(20 + len, 0);
    s.read_exact(&mut resp[20..]).unwrap();
    let r = burrow::wire::stun::parse_binding_response(&resp).unwrap();
    assert_eq!(r.mapped, s.local_addr().unwrap());
}

/// Runs `turnutils_stunclient` with `args`; `None` when it is missing and
/// `BURROW_SKIP_COTURN=1`.
fn stunclient(args: &[&str]) -> Option<String> {
    let child = std::process::Command::new("turnutils_stunclient")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) if std::env::var("BURROW_SKIP_COTURN").as_deref() == Ok("1") => {
            eprintln!("skipping: turnutils_stunclient not runnable ({e})");
            return None;
        }
        Err(e) => panic!(
            "turnutils_stunclient (Debian package coturn) is needed: {e}; set BURROW_SKIP_COTURN=1 to skip"
        ),
    };
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    std::thread::spawn(move || {
        for _ in 0..WAIT.as_millis() / 50 {
            if done2.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill(2) on the helper's pid, still ours since `done` is unset.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    Some(String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn rfc5780_discovery_with_coturn_client() {
    let mut rng = Rng(seed("rfc5780"));
    // Two fixed ports are needed (alt = primary port + 1, on 127.0.0.2): try a few.
    let mut started = None;
    for _ in 0..20 {
        let port = 20_000 + rng.below(40_000) as u16;
        let listen = format!("127.0.0.1:{port}");
        let alt = format!("127.0.0.2:{}", port + 1);
        if let Some(r) = Relay::try_start(&["--listen", &listen, "--alt-listen", &alt], &[]) {
            started = Some((r, port));
            break;
        }
    }
    let (relay, port) = started.expect("no free port pair found");
    let Some(text) = stunclient(&["-f", "-p", &port.to_string(), "127.0.0.1"]) else {
        return;
    };
    // Response 1: from the primary, OTHER-ADDRESS = the alternate. Responses 2 and 3
    // answer CHANGE-REQUEST(ip, port) from the alternate socket.
    let alt = format!("127.0.0.2:{}", port + 1);
    assert!(text.contains(&format!("Other addr: : {alt}")), "{text}");
    assert!(text.contains("RFC 5780 response 2"), "{text}");
    assert!(text.contains("RFC 5780 response 3"), "{text}");
    assert!(
        text.contains(&format!("Response origin: : {alt}")),
        "{text}"
    );
    assert!(relay.metric("burrow_relay_stun_responses_total") >= 3);
}

#[test]
fn limits_are_enforced_by_the_binary() {
    let relay = Relay::start(&[
        "--max-sessions-per-ip",
        "2",
        "--handshake-timeout-secs",
        "1",
    ]);
    let mut s1 = Session::open(relay.addr);
    let mut s2 = Session::open(relay.addr);
    s1.challenge();
    s2.challenge();
    let mut s3 = Session::open(relay.addr);
    match s3.recv() {
        Got::Ctl(ServerMsg::Error {
            code: ErrorCode::TooManySessions,
            ..
        }) => {}
        g => panic!("expected TooManySessions, got {g:?}"),
    }
    // Never registering: the handshake timeout ends both.
    for s in [&mut s1, &mut s2] {
        match s.recv() {
            Got::Ctl(ServerMsg::Error {
                code: ErrorCode::HandshakeTimeout,
                ..
            }) => {}
            g => panic!("expected HandshakeTimeout, got {g:?}"),
        }
    }
    assert_eq!(
        relay.metric("burrow_relay_limit_hits_total{limit=\"sessions_per_ip\"}"),
        1
    );
    assert_eq!(
        relay.metric("burrow_relay_limit_hits_total{limit=\"handshake_timeout\"}"),
        2
    );
    // Anything but /metrics is a 404.
    let mut h = TcpStream::connect(relay.metrics.unwrap()).unwrap();
    h.write_all(b"GET /secret HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut h, &mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}

/// Introduces `a` to `c` (both registered); returns their channel.
fn introduce(a: &mut Node, c: &mut Node, request_id: u32) -> ChannelId {
    a.session.send(&ClientMsg::Connect {
        peer: c.id.peer_id(),
        request_id,
    });
    let ia = match a.session.recv_msg() {
        ServerMsg::Introduce(i) => i,
        m => panic!("A expected Introduce, got {m:?}"),
    };
    match c.session.recv_msg() {
        ServerMsg::Introduce(i) => assert_eq!(i.channel, ia.channel),
        m => panic!("C expected Introduce, got {m:?}"),
    }
    ia.channel
}

/// Sends `buf` as `segment`-byte datagrams in one GSO `sendmsg` (UDP_SEGMENT), the way a
/// QUIC node sends a burst. `Err` if the kernel refuses GSO.
fn gso_send(sock: &UdpSocket, buf: &[u8], segment: usize, to: SocketAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 loopback only")
    };
    let mut name = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut ctrl = [0u64; 4];
    // SAFETY: all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    // SAFETY: CMSG_* on a control buffer large enough and aligned for one u16 cmsg.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(2) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = 103; // UDP_SEGMENT
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
    }
    // SAFETY: valid fd and message.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    assert_eq!(rc as usize, buf.len(), "short GSO send");
    Ok(())
}

/// Receives relay packets on `node` until `count` arrived (or 1 s of silence after `done`);
/// returns the sequence numbers of the intact ones in arrival order and the corrupt count.
fn collect(
    node: Node,
    channel: ChannelId,
    count: usize,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u32>, usize)> {
    std::thread::spawn(move || {
        // The whole node (its TCP session too) lives as long as the receiver: the session
        // closing would end the channel.
        let node = node;
        let _ = socket2::SockRef::from(&node.udp).set_recv_buffer_size(4 << 20);
        node.udp
            .set_read_timeout(Some(Duration::from_millis(250)))
            .unwrap();
        let mut seqs = Vec::with_capacity(count);
        let mut corrupt = 0;
        let mut idle = 0;
        let mut buf = vec![0u8; 70_000];
        // Hang guard: bounded receive attempts.
        for _ in 0..count * 2 + 1000 {
            if seqs.len() + corrupt >= count {
                break;
            }
            match node.udp.recv_from(&mut buf) {
                Ok((n, _)) => match check_packet(channel, &buf[..n]) {
                    Some(seq) => seqs.push(seq),
                    None => corrupt += 1,
                },
                Err(_) if done.load(Ordering::SeqCst) => {
                    idle += 1;
                    if idle >= 4 {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        (seqs, corrupt)
    })
}

/// A node sends GSO bursts whose segments go to two different peers (so one GRO buffer at
/// the relay holds packets for two destinations), with random segment sizes and a shorter
/// last segment now and then. Each peer must get every one of its packets, intact, in
/// order; the metrics must count every packet and show that GRO batches were received.
#[test]
fn gso_bursts_with_mixed_destinations_are_split_and_arrive_in_order() {
    let mut rng = Rng(seed("gso bursts"));
    let relay = Relay::start(FAST);
    let (mut a, b, ab) = pair(&relay, &mut rng);
    let mut c = Node::register(relay.addr, identity(&mut rng));
    let ac = introduce(&mut a, &mut c, 2);
    assert_ne!(ab, ac);
    let _ = socket2::SockRef::from(&a.udp).set_send_buffer_size(4 << 20);

    // Plan every burst first, so the receivers know how many packets to expect.
    const BURSTS: usize = 300;
    let mut bursts = Vec::with_capacity(BURSTS);
    let (mut next_b, mut next_c) = (0u32, 0u32);
    for _ in 0..BURSTS {
        let segment = 64 + rng.below(1200 - 64) as usize;
        let segments = 2 + rng.below(39) as usize;
        let mut buf = Vec::with_capacity(segment * segments);
        let mut to_b = rng.below(2) == 0;
        for k in 0..segments {
            // Mostly runs (QUIC bursts to one peer), with switches mid-burst.
            if k > 0 && rng.below(6) == 0 {
                to_b = !to_b;
            }
            let len = if k + 1 == segments && rng.below(3) == 0 {
                relay_data::HEADER_LEN + 4 + rng.below((segment - 12) as u64) as usize
            } else {
                segment
            };
            let payload = len - relay_data::HEADER_LEN;
            let (channel, seq) = if to_b {
                next_b += 1;
                (ab, next_b - 1)
            } else {
                next_c += 1;
                (ac, next_c - 1)
            };
            buf.extend_from_slice(&make_packet(channel, seq, payload));
        }
        bursts.push((buf, segment));
    }
    let done = Arc::new(AtomicBool::new(false));
    let rx_b = collect(b, ab, next_b as usize, done.clone());
    let rx_c = collect(c, ac, next_c as usize, done.clone());
    let mut gso = true;
    for (buf, segment) in &bursts {
        if gso && let Err(e) = gso_send(&a.udp, buf, *segment, a.relay) {
            eprintln!("GSO send refused ({e}); sending the segments one by one");
            gso = false;
        }
        if !gso {
            for chunk in buf.chunks(*segment) {
                a.udp.send_to(chunk, a.relay).unwrap();
            }
        }
        // Paced (~20 packets/ms) so that even kernel-default socket buffers (~200 KB) ride
        // out a receiver descheduled for a while: the test is about splitting, not overload.
        std::thread::sleep(Duration::from_millis(1));
    }
    done.store(true, Ordering::SeqCst);
    for (name, rx, want) in [("B", rx_b, next_b), ("C", rx_c, next_c)] {
        let (seqs, corrupt) = rx.join().expect("receiver thread");
        assert_eq!(corrupt, 0, "{name}: corrupt or misrouted packets");
        let expected: Vec<u32> = (0..want).collect();
        assert_eq!(
            seqs.len(),
            expected.len(),
            "{name}: {} of {want} packets arrived",
            seqs.len()
        );
        assert_eq!(seqs, expected, "{name}: packets out of order");
    }
    let relayed = relay.metric("burrow_relay_relayed_packets_total{from=\"udp\",to=\"udp\"}");
    assert_eq!(relayed, (next_b + next_c) as u64, "relayed packet count");
    if gso {
        let gro = relay.metric("burrow_relay_udp_gro_buffers_total");
        assert!(gro > 0, "the relay saw no GRO batch");
        eprintln!("{gro} GRO buffers for {BURSTS} bursts");
    }
}
