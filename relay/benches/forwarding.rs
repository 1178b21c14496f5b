//! Relay forwarding throughput: the real `burrow-relay` binary (release build) against a
//! raw UDP forwarder baseline (recv_from + send_to on one thread, no protocol) measured in
//! the same run, at 64, 512 and 1200-byte payloads with 1 and 64 concurrent pairs.
//!
//! `cargo bench -p burrow-relay --bench forwarding` (set `BURROW_BENCH_SECS` to change the
//! 2-second measurement per case). Loopback only. The senders blast without pacing, so the
//! numbers are delivered packets under overload; on a 2-core machine the sender, the
//! forwarder and the receiver share the cores, which hurts both sides alike.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burrow::identity::Identity;
use burrow::wire::control::{self, ClientMsg, NatReport, Register, ServerMsg, UdpMsg};
use burrow::wire::frame::{self, FrameReader, PREAMBLE};
use burrow::wire::relay_data::{self, ChannelId};

struct Child_(Child);
impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_relay() -> (Child_, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_burrow-relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--max-sessions-per-ip",
            "100000",
            "--registrations-per-ip-per-minute",
            "100000",
            "--relay-bytes-per-sec",
            "100000000000",
            "--relay-burst-bytes",
            "1000000000",
            "--control-msgs-per-sec",
            "100000",
        ])
        .env("RUST_LOG", "warn,burrow_relay=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let line = loop {
        let l = lines.next().expect("relay exited").unwrap();
        if l.contains("listening") {
            break l;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let start = line.find("tcp=").unwrap() + 4;
    let rest = &line[start..];
    let addr = rest[..rest.find(' ').unwrap()].parse().unwrap();
    (Child_(child), addr)
}

struct Node {
    id: Identity,
    tcp: TcpStream,
    reader: FrameReader,
    udp: UdpSocket,
}

impl Node {
    fn recv_msg(&mut self) -> ServerMsg {
        loop {
            if let Some(f) = self.reader.next_frame().unwrap() {
                if f[0] == 0x22 {
                    return control::decode(f).unwrap();
                }
                continue;
            }
            let n = self.tcp.read(self.reader.read_buf()).unwrap();
            assert!(n > 0, "relay closed the session");
            self.reader.filled(n);
        }
    }

    fn send(&mut self, msg: &ClientMsg) {
        let mut out = Vec::new();
        frame::encode(&control::to_vec(msg).unwrap(), &mut out).unwrap();
        self.tcp.write_all(&out).unwrap();
    }

    fn register(relay: SocketAddr, seed: u32) -> Node {
        let mut secret = [7u8; 32];
        secret[..4].copy_from_slice(&seed.to_be_bytes());
        let id = Identity::from_secret(secret);
        let mut tcp = TcpStream::connect(relay).unwrap();
        tcp.write_all(&PREAMBLE).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = socket2::SockRef::from(&udp).set_recv_buffer_size(4 << 20);
        let mut n = Node {
            id,
            tcp,
            reader: FrameReader::new(false),
            udp,
        };
        let ServerMsg::Challenge { nonce, .. } = n.recv_msg() else {
            panic!("no challenge")
        };
        n.send(&ClientMsg::Register(Register {
            peer_id: n.id.peer_id(),
            signature: n.id.sign(&control::register_signed_bytes(&nonce)),
            token: None,
            candidates: vec![],
            nat: NatReport::default(),
            agent: "bench".into(),
        }));
        let ServerMsg::Registered { udp_token, .. } = n.recv_msg() else {
            panic!("not registered")
        };
        n.udp
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let bind = control::to_vec(&UdpMsg::Bind {
            token: udp_token,
            seq: 0,
        })
        .unwrap();
        let mut buf = [0u8; 512];
        for _ in 0..50 {
            n.udp.send_to(&bind, relay).unwrap();
            if let Ok((len, _)) = n.udp.recv_from(&mut buf)
                && matches!(control::decode(&buf[..len]), Ok(UdpMsg::Bound { .. }))
            {
                return n;
            }
        }
        panic!("bind not answered");
    }
}

/// One case: `pairs` sender sockets blast `payload`-byte packets to `target`, to be
/// forwarded to the matching receiver sockets. Returns delivered packets and bytes per
/// second.
fn measure(
    senders: &[(UdpSocket, Vec<u8>)],
    receivers: &[UdpSocket],
    target: SocketAddr,
    secs: f64,
) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let recv_socks: Vec<UdpSocket> = receivers.iter().map(|s| s.try_clone().unwrap()).collect();
    for s in &recv_socks {
        s.set_nonblocking(true).unwrap();
    }
    let stop_rx = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut poll = mio::Poll::new().unwrap();
        let mut socks: Vec<mio::net::UdpSocket> = recv_socks
            .into_iter()
            .map(mio::net::UdpSocket::from_std)
            .collect();
        for (i, s) in socks.iter_mut().enumerate() {
            poll.registry()
                .register(s, mio::Token(i), mio::Interest::READABLE)
                .unwrap();
        }
        let mut events = mio::Events::with_capacity(256);
        let mut buf = vec![0u8; 2048];
        let (mut packets, mut bytes) = (0u64, 0u64);
        while !stop_rx.load(Ordering::Relaxed) {
            poll.poll(&mut events, Some(Duration::from_millis(20)))
                .unwrap();
            for ev in events.iter() {
                let s = &socks[ev.token().0];
                while let Ok((n, _)) = s.recv_from(&mut buf) {
                    packets += 1;
                    bytes += n as u64;
                }
            }
        }
        (packets, bytes)
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    'outer: loop {
        for _ in 0..64 {
            for (s, p) in senders {
                let _ = s.send_to(p, target);
            }
        }
        if Instant::now() >= deadline {
            break 'outer;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let (packets, bytes) = receiver.join().unwrap();
    (packets as f64 / elapsed, bytes as f64 / elapsed / 1e6)
}

/// The baseline: a raw forwarder with the relay's shape (one thread, one socket, a map
/// from source address to destination) and nothing else.
fn start_baseline(routes: HashMap<SocketAddr, SocketAddr>) -> (SocketAddr, Arc<AtomicBool>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && let Some(to) = routes.get(&from)
            {
                let _ = sock.send_to(&buf[..n], to);
            }
        }
    });
    (addr, stop)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("BURROW_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let (_relay, relay_addr) = start_relay();
    println!(
        "{:>6} {:>6} | {:>12} {:>9} | {:>12} {:>9} | {:>6}",
        "pairs", "bytes", "relay pkt/s", "MB/s", "raw pkt/s", "MB/s", "ratio"
    );
    for pairs in [1usize, 64] {
        // Register the pairs once per pair count.
        let mut nodes: Vec<(Node, Node, ChannelId)> = Vec::new();
        for i in 0..pairs {
            let mut a = Node::register(relay_addr, (pairs * 1000 + 2 * i) as u32);
            let mut b = Node::register(relay_addr, (pairs * 1000 + 2 * i + 1) as u32);
            a.send(&ClientMsg::Connect {
                peer: b.id.peer_id(),
                request_id: 0,
            });
            let ServerMsg::Introduce(intro) = a.recv_msg() else {
                panic!("no introduction")
            };
            let _ = b.recv_msg();
            nodes.push((a, b, intro.channel));
        }
        for payload in [64usize, 512, 1200] {
            let senders: Vec<(UdpSocket, Vec<u8>)> = nodes
                .iter()
                .map(|(a, _, ch)| {
                    let mut p = Vec::new();
                    relay_data::encode(*ch, &vec![0x5A; payload], &mut p);
                    (a.udp.try_clone().unwrap(), p)
                })
                .collect();
            let receivers: Vec<UdpSocket> = nodes
                .iter()
                .map(|(_, b, _)| b.udp.try_clone().unwrap())
                .collect();
            let (rp, rb) = measure(&senders, &receivers, relay_addr, secs);
            // Baseline: fresh sockets, same sizes (header included), raw forwarder.
            let base_send: Vec<UdpSocket> = (0..pairs)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            let base_recv: Vec<UdpSocket> = (0..pairs)
                .map(|_| {
                    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
                    s
                })
                .collect();
            let routes = base_send
                .iter()
                .zip(&base_recv)
                .map(|(s, r)| (s.local_addr().unwrap(), r.local_addr().unwrap()))
                .collect();
            let (base_addr, stop) = start_baseline(routes);
            let base_senders: Vec<(UdpSocket, Vec<u8>)> = base_send
                .into_iter()
                .zip(&senders)
                .map(|(s, (_, p))| (s, p.clone()))
                .collect();
            let (bp, bb) = measure(&base_senders, &base_recv, base_addr, secs);
            stop.store(true, Ordering::Relaxed);
            println!(
                "{pairs:>6} {payload:>6} | {rp:>12.0} {rb:>9.1} | {bp:>12.0} {bb:>9.1} | {:>6.2}",
                rp / bp.max(1.0)
            );
        }
    }
}
