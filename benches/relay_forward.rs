//! Relay forwarding benchmark (issue 6): packets/s, MB/s and server CPU per forwarded
//! packet through the real `burrow-relay` binary on loopback, next to coturn's TURN relay
//! and to minimal forwarders written here (the "physical limit"), all in the same run with
//! the same load generator, sizes and pair counts.
//!
//! ```sh
//! cargo build --release -p burrow-relay
//! cargo bench --bench relay_forward
//! ```
//!
//! For each pair count (1, 64, 1000) and payload size (64, 512, 1200 bytes), node A of each
//! pair sends to node B through the forwarder under test, closed-loop: at most `WINDOW`
//! packets in flight over all pairs (so an overloaded receiver measures forwarding, not
//! kernel drops); a stall of 20 ms counts the outstanding packets as lost. Senders either
//! burst (QUIC with GSO: one `sendmsg` of `BURST` equal-size datagrams, as `NodeCore::
//! send_segments` does through the relay) or send one datagram per call. Receivers read
//! with recvmmsg + GRO (quinn-udp), as a burrow node does.
//!
//! Forwarders:
//! - `burrow`: the real relay; pairs registered with the real protocol (TCP session,
//!   Ed25519 challenge, UDP bind, `Connect` → `Introduce`); relay data packets (8-byte
//!   header + payload). CPU from `/proc/<pid>/stat` over the measured window.
//! - `coturn`: `turnserver` (Debian coturn) on loopback with a fresh config (no auth, no
//!   TLS); each client allocates, the two clients of a pair ChannelBind to each other's
//!   relayed address, A sends ChannelData (4-byte header + payload). This is TURN
//!   client-to-client, the way two NATed nodes use a TURN server, so each packet crosses
//!   coturn twice (client → A's allocation → B's allocation → client): the CPU column is per
//!   delivered packet, as for burrow. coturn runs its default thread count (one per core).
//!   `turnutils_uclient` was the suggested load, but it paces every session on a timer
//!   (`-z` ms between packets), starts sending only after ~5 s and reports no rate, so it
//!   cannot saturate a relay; driving coturn with this bench's load keeps the comparison
//!   like for like.
//! - `raw`: a thread here doing `recv_from`, a channel lookup, `send_to`, per packet.
//! - `limit-mmsg`: recvmmsg 32 / sendmmsg. `limit-gro`: UDP GRO receive, one GSO send per
//!   coalesced buffer (the physical limit). Thread CPU time over the whole run.
//!
//! Prints two tables (bursting and non-bursting senders), writes
//! `target/bench-results/relay_forward.json` and `relay_forward.svg` (payload MB/s by payload
//! size, one panel per pair count). Each cell is the median of `BURROW_BENCH_REPEATS` (3)
//! runs of `BURROW_BENCH_SECS` (1) after a 0.3 s warm-up, the repeats interleaved across
//! forwarders. Other env: `BURROW_BENCH_WINDOW` (512), `BURROW_BENCH_BURST` (16),
//! `BURROW_BENCH_PAIRS` (e.g. `1,64`), `BURROW_BENCH_ONLY` (e.g. `burrow,coturn`: a subset
//! of the forwarders, for profiling), `BURROW_RELAY_BIN`.
//!
//! Loopback only. The machine is shared and the load generator shares its 2 cores with the
//! forwarder: packets/s vary run to run; CPU per packet is the steadier number.

#[path = "common/forwarders.rs"]
mod forwarders;
#[path = "common/relay_proc.rs"]
mod relay_proc;
#[path = "common/turn.rs"]
mod turn;

use relay_proc::{RelayProc, relay_bin};
use std::collections::HashMap;
use std::io::{IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burrow::identity::Identity;
use burrow::wire::control::{self, ClientMsg, NatReport, Register, ServerMsg, UdpMsg};
use burrow::wire::frame::{self, FrameReader, PREAMBLE};
use burrow::wire::relay_data::{self, ChannelId};
use quinn_udp::UdpSocketState;

const PAYLOADS: [usize; 3] = [64, 512, 1200];
const PAIR_COUNTS: [usize; 3] = [1, 64, 1000];
const WARMUP: Duration = Duration::from_millis(300);
/// A stall this long means the outstanding packets were dropped.
const STALL: Duration = Duration::from_millis(20);
/// Hang guard for any single protocol wait.
const WAIT: Duration = Duration::from_secs(20);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn results_dir() -> PathBuf {
    relay_proc::target_dir().join("bench-results")
}

/// What forwards, and how the senders send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Burrow,
    Coturn,
    LimitGro,
    LimitMmsg,
    BurrowSingle,
    CoturnSingle,
    Raw,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::Burrow,
        Variant::Coturn,
        Variant::LimitGro,
        Variant::LimitMmsg,
        Variant::BurrowSingle,
        Variant::CoturnSingle,
        Variant::Raw,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Burrow => "burrow",
            Variant::Coturn => "coturn",
            Variant::LimitGro => "limit-gro",
            Variant::LimitMmsg => "limit-mmsg",
            Variant::BurrowSingle => "burrow-single",
            Variant::CoturnSingle => "coturn-single",
            Variant::Raw => "raw",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Burrow => "burrow relay (GSO senders)",
            Variant::Coturn => "coturn (GSO senders)",
            Variant::LimitGro => "limit: GRO+GSO forwarder",
            Variant::LimitMmsg => "limit: recvmmsg/sendmmsg",
            Variant::BurrowSingle => "burrow relay (1 datagram/send)",
            Variant::CoturnSingle => "coturn (1 datagram/send)",
            Variant::Raw => "raw recv/send forwarder",
        }
    }

    fn bursts(self) -> bool {
        matches!(
            self,
            Variant::Burrow | Variant::Coturn | Variant::LimitGro | Variant::LimitMmsg
        )
    }
}

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

/// A UDP socket with quinn-udp state (GSO send, GRO receive).
struct Endpoint {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl Endpoint {
    fn bind() -> Endpoint {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_buffers(&sock);
        let state = UdpSocketState::new((&sock).into()).unwrap();
        // quinn-udp made it non-blocking; the handshakes want timeouts instead.
        sock.set_nonblocking(false).unwrap();
        Endpoint { sock, state }
    }
}

/// Larger kernel buffers so a window of 1200-byte packets fits (capped by rmem_max).
fn set_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
}

// ---------------------------------------------------------------------------------------
// A minimal burrow node: TCP control session + UDP socket, the real protocol
// ---------------------------------------------------------------------------------------

struct Session {
    tcp: TcpStream,
    reader: FrameReader,
}

impl Session {
    fn open(relay: SocketAddr) -> Session {
        let mut tcp = TcpStream::connect(relay).expect("connect to relay");
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.write_all(&PREAMBLE).unwrap();
        Session {
            tcp,
            reader: FrameReader::new(false),
        }
    }

    fn send(&mut self, msg: &ClientMsg) {
        let mut out = Vec::new();
        frame::encode(&control::to_vec(msg).unwrap(), &mut out).unwrap();
        self.tcp.write_all(&out).unwrap();
    }

    /// The next control message (relay data over TCP is skipped).
    fn recv(&mut self) -> ServerMsg {
        loop {
            if let Some(f) = self.reader.next_frame().expect("bad frame from relay") {
                if f[0] == burrow::wire::KIND_CONTROL {
                    return control::decode_valid(f).expect("bad message from relay");
                }
                continue;
            }
            let n = self.tcp.read(self.reader.read_buf()).expect("read relay");
            assert!(n > 0, "relay closed the session");
            self.reader.filled(n);
        }
    }
}

struct Node {
    id: Identity,
    session: Session,
    udp: Endpoint,
}

impl Node {
    fn register(relay: SocketAddr, secret: [u8; 32]) -> Node {
        let id = Identity::from_secret(secret);
        let mut session = Session::open(relay);
        let nonce = match session.recv() {
            ServerMsg::Challenge { nonce, .. } => nonce,
            m => panic!("expected Challenge, got {m:?}"),
        };
        session.send(&ClientMsg::Register(Register {
            peer_id: id.peer_id(),
            signature: id.sign(&control::register_signed_bytes(&nonce)),
            token: None,
            candidates: vec![],
            nat: NatReport::default(),
            agent: "relay_forward bench".into(),
        }));
        let token = match session.recv() {
            ServerMsg::Registered { udp_token, .. } => udp_token,
            m => panic!("expected Registered, got {m:?}"),
        };
        let udp = Endpoint::bind();
        udp.sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let bind = control::to_vec(&UdpMsg::Bind { token, seq: 1 }).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..50 {
            udp.sock.send_to(&bind, relay).unwrap();
            if let Ok((n, _)) = udp.sock.recv_from(&mut buf)
                && let Ok(UdpMsg::Bound { .. }) = control::decode(&buf[..n])
            {
                return Node { id, session, udp };
            }
        }
        panic!("UDP bind not answered");
    }
}

/// One introduced pair: A sends on `channel`, B receives.
struct Pair {
    a: Node,
    b: Node,
    channel: ChannelId,
}

fn make_pair(relay: SocketAddr, index: usize) -> Pair {
    let secret = |side: u8| {
        let mut s = [side; 32];
        s[..8].copy_from_slice(&(index as u64).to_le_bytes());
        s
    };
    let mut a = Node::register(relay, secret(0xA));
    let b = Node::register(relay, secret(0xB));
    a.session.send(&ClientMsg::Connect {
        peer: b.id.peer_id(),
        request_id: index as u32,
    });
    loop {
        match a.session.recv() {
            ServerMsg::Introduce(i) if i.peer == b.id.peer_id() => {
                return Pair {
                    a,
                    b,
                    channel: i.channel,
                };
            }
            ServerMsg::ConnectFailed { message, .. } => panic!("connect failed: {message}"),
            _ => {}
        }
    }
}

/// Two TURN clients of coturn bound to each other's relayed address on one channel.
struct TurnPair {
    a: Endpoint,
    b: Endpoint,
    relayed_a: std::net::SocketAddrV4,
    relayed_b: std::net::SocketAddrV4,
}

fn make_turn_pair(server: SocketAddr, index: usize) -> TurnPair {
    let a = Endpoint::bind();
    let b = Endpoint::bind();
    let seq = index as u64 * 8;
    let relayed_a = turn::allocate(&a.sock, server, seq).expect("coturn Allocate (A)");
    let relayed_b = turn::allocate(&b.sock, server, seq + 1).expect("coturn Allocate (B)");
    let pair = TurnPair {
        a,
        b,
        relayed_a,
        relayed_b,
    };
    pair.bind(server, seq + 2);
    pair
}

impl TurnPair {
    /// (Re)binds the channels both ways; refreshes the permissions (they last 5 minutes).
    fn bind(&self, server: SocketAddr, seq: u64) {
        assert!(
            turn::channel_bind(
                &self.a.sock,
                server,
                seq,
                turn::FIRST_CHANNEL,
                self.relayed_b
            ),
            "coturn ChannelBind (A)"
        );
        assert!(
            turn::channel_bind(
                &self.b.sock,
                server,
                seq + 1,
                turn::FIRST_CHANNEL,
                self.relayed_a
            ),
            "coturn ChannelBind (B)"
        );
    }
}

// ---------------------------------------------------------------------------------------
// One measurement
// ---------------------------------------------------------------------------------------

/// One sender's traffic: `packet` (one datagram, header included) from `tx` to `dest`.
struct Flow<'a> {
    tx: &'a Endpoint,
    dest: SocketAddr,
    packet: Vec<u8>,
}

/// One measured cell.
#[derive(Debug, Clone)]
struct Cell {
    variant: Variant,
    payload: usize,
    pairs: usize,
    secs: f64,
    packets: u64,
    lost: u64,
    cpu_us_per_packet: Option<f64>,
    /// Why there is no number, if there is none.
    note: Option<String>,
    /// Packets/s of every repeat (the cell holds the median one).
    repeats_pps: Vec<f64>,
}

/// The repeat with the median packets/s, carrying the median CPU per packet of all repeats
/// (each median taken on its own: both are what a typical run shows).
fn median(mut runs: Vec<Cell>) -> Cell {
    let all_pps: Vec<f64> = runs.iter().map(Cell::pps).collect();
    let mut cpus: Vec<f64> = runs.iter().filter_map(|c| c.cpu_us_per_packet).collect();
    cpus.sort_by(f64::total_cmp);
    runs.sort_by(|a, b| a.pps().total_cmp(&b.pps()));
    let mut cell = runs.swap_remove(runs.len() / 2);
    cell.cpu_us_per_packet = cpus.get(cpus.len() / 2).copied();
    cell.repeats_pps = all_pps;
    cell
}

impl Cell {
    fn pps(&self) -> f64 {
        if self.secs > 0.0 {
            self.packets as f64 / self.secs
        } else {
            0.0
        }
    }
    fn mbps(&self) -> f64 {
        self.pps() * self.payload as f64 / 1e6
    }
}

struct Measured {
    packets: u64,
    lost: u64,
    secs: f64,
    cpu: Option<Duration>,
}

/// Receives on every socket of `socks` (GRO, recvmmsg) until `stop`; counts datagrams of
/// exactly `wire_len` bytes into `received`.
fn spawn_receiver(
    socks: Vec<UdpSocket>,
    wire_len: usize,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut poll = mio::Poll::new().unwrap();
        let mut socks: Vec<(mio::net::UdpSocket, UdpSocketState)> = socks
            .into_iter()
            .map(|s| {
                s.set_nonblocking(true).unwrap();
                let state = UdpSocketState::new((&s).into()).unwrap();
                (mio::net::UdpSocket::from_std(s), state)
            })
            .collect();
        for (i, (s, _)) in socks.iter_mut().enumerate() {
            poll.registry()
                .register(s, mio::Token(i), mio::Interest::READABLE)
                .unwrap();
        }
        const BATCH: usize = 32;
        const SLOT: usize = 64 * 1024;
        let mut bufs = vec![0u8; BATCH * SLOT];
        let mut meta = [quinn_udp::RecvMeta::default(); BATCH];
        let mut events = mio::Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
            let mut got = 0u64;
            for ev in events.iter() {
                let (s, state) = &socks[ev.token().0];
                loop {
                    let mut slices: [IoSliceMut; BATCH] = {
                        let mut it = bufs.chunks_mut(SLOT);
                        std::array::from_fn(|_| IoSliceMut::new(it.next().unwrap()))
                    };
                    let n = match state.recv(s.into(), &mut slices, &mut meta) {
                        Ok(n) => n,
                        Err(_) => break,
                    };
                    for m in &meta[..n] {
                        if m.stride == wire_len {
                            got += m.len.div_ceil(m.stride) as u64;
                        }
                    }
                }
            }
            received.fetch_add(got, Ordering::Relaxed);
        }
        for (s, _) in socks.iter_mut() {
            let _ = poll.registry().deregister(s);
        }
    })
}

/// Drives `flows` closed-loop (round robin, `burst` datagrams per send, at most `window`
/// in flight) while `receivers` count; `cpu` reads the forwarder's CPU time, if it is a
/// process.
fn measure(
    flows: &[Flow],
    receivers: Vec<UdpSocket>,
    burst: usize,
    window: u64,
    duration: Duration,
    cpu: Option<&dyn Fn() -> Duration>,
) -> Measured {
    let wire_len = flows[0].packet.len();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = spawn_receiver(receivers, wire_len, received.clone(), stop.clone());
    let bursts: Vec<Vec<u8>> = flows.iter().map(|f| f.packet.repeat(burst)).collect();
    let burst = burst as u64;
    let mut sent = 0u64;
    let mut lost = 0u64;
    let mut next = 0usize;
    let mut last_progress = (Instant::now(), 0u64);
    let start = Instant::now();
    let mut mark: Option<(Instant, u64, u64, Option<Duration>)> = None;
    let end_at = start + WARMUP + duration;
    loop {
        let now = Instant::now();
        let now_recv = received.load(Ordering::Relaxed);
        if mark.is_none() && now >= start + WARMUP {
            mark = Some((now, now_recv, lost, cpu.map(|f| f())));
        }
        if now >= end_at {
            break;
        }
        let in_flight = sent.saturating_sub(now_recv + lost);
        if in_flight + burst <= window {
            let i = next % flows.len();
            next += 1;
            let f = &flows[i];
            let t = quinn_udp::Transmit {
                destination: f.dest,
                ecn: None,
                contents: &bursts[i],
                segment_size: (burst > 1).then_some(wire_len),
                src_ip: None,
            };
            if f.tx.state.try_send((&f.tx.sock).into(), &t).is_ok() {
                sent += burst;
            }
            continue;
        }
        if now_recv != last_progress.1 {
            last_progress = (now, now_recv);
        } else if now.duration_since(last_progress.0) > STALL {
            lost += in_flight;
            last_progress = (now, now_recv);
        }
        std::thread::yield_now();
    }
    let t1 = Instant::now();
    let recv1 = received.load(Ordering::Relaxed);
    let cpu1 = cpu.map(|f| f());
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    let (t0, recv0, lost0, cpu0) = mark.expect("measurement window started");
    Measured {
        packets: recv1 - recv0,
        lost: lost.saturating_sub(lost0),
        secs: t1.duration_since(t0).as_secs_f64(),
        cpu: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    }
}

fn clones(socks: impl Iterator<Item = UdpSocket>) -> Vec<UdpSocket> {
    socks.collect()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special. Do
    // nothing unless run as a benchmark, so `cargo test --all-targets` stays quick.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("relay_forward: run with `cargo bench --bench relay_forward`");
        return;
    }
    let duration = Duration::from_millis(env_num("BURROW_BENCH_SECS", 1) * 1000);
    let repeats = env_num("BURROW_BENCH_REPEATS", 3).max(1) as usize;
    let window = env_num("BURROW_BENCH_WINDOW", 512);
    let burst = env_num("BURROW_BENCH_BURST", 16).clamp(1, 64) as usize;
    let pair_counts: Vec<usize> = std::env::var("BURROW_BENCH_PAIRS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| PAIR_COUNTS.to_vec());
    let max_pairs = *pair_counts.iter().max().expect("at least one pair count");

    // Limits opened up for a benchmark: many sessions and registrations from one IP, no
    // bandwidth cap, long idle timeout.
    let sessions = (max_pairs * 2 + 100).to_string();
    let relay = RelayProc::start(&[
        "--max-sessions",
        &sessions,
        "--max-sessions-per-ip",
        &sessions,
        "--registrations-per-ip-per-minute",
        "1000000",
        "--relay-bytes-per-sec",
        "1000000000000",
        "--relay-burst-bytes",
        "1000000000000",
        "--idle-timeout-secs",
        "3600",
        "--udp-buffer-bytes",
        "4194304",
    ]);
    eprintln!(
        "relay at {} (pid {}, {})",
        relay.addr,
        relay.pid(),
        relay_bin().display()
    );
    // BURROW_BENCH_ONLY=burrow,coturn-single: a subset of the forwarders (for profiling).
    let only: Option<Vec<String>> = std::env::var("BURROW_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
    let wanted = |v: Variant| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|x| x == v.name()))
    };
    let pairs: Vec<Pair> = (0..max_pairs).map(|i| make_pair(relay.addr, i)).collect();
    eprintln!("{} burrow pairs registered and introduced", pairs.len());
    let relay_cpu = || relay.cpu_time();

    let want_coturn = wanted(Variant::Coturn) || wanted(Variant::CoturnSingle);
    let coturn = if !want_coturn {
        None
    } else if turn::turnserver_installed() {
        let c = turn::Coturn::start((max_pairs * 2) as u16);
        eprintln!("coturn at {} (pid {})", c.addr, c.pid());
        Some(c)
    } else {
        eprintln!("turnserver not installed: coturn cells skipped");
        None
    };
    let turn_pairs: Vec<TurnPair> = match &coturn {
        Some(c) => (0..max_pairs).map(|i| make_turn_pair(c.addr, i)).collect(),
        None => Vec::new(),
    };
    if coturn.is_some() {
        eprintln!(
            "{} coturn pairs allocated and channel-bound",
            turn_pairs.len()
        );
    }
    let gso_ok = pairs[0].a.udp.state.max_gso_segments() >= burst;
    if !gso_ok {
        eprintln!("no UDP GSO here: bursting senders send one datagram per call");
    }

    let variants: Vec<Variant> = Variant::ALL.into_iter().filter(|v| wanted(*v)).collect();
    let mut cells = Vec::new();
    for &n in &pair_counts {
        for &payload in &PAYLOADS {
            // Repeats interleaved (every forwarder once, then again) so a burst of load from
            // elsewhere on the machine hits all of them alike; the median is kept.
            let mut runs: Vec<Vec<Cell>> = vec![Vec::new(); variants.len()];
            for _ in 0..repeats {
                for (k, &variant) in variants.iter().enumerate() {
                    let burst_now = if variant.bursts() && gso_ok { burst } else { 1 };
                    let cell = run_cell(
                        variant,
                        payload,
                        n,
                        &pairs[..n],
                        &turn_pairs,
                        coturn.as_ref(),
                        &relay_cpu,
                        burst_now,
                        window,
                        duration,
                    );
                    eprintln!(
                        "{:>5} B x {:>4} pairs {:>14}: {:>9.0} pkt/s {:>6} µs/pkt",
                        payload,
                        n,
                        variant.name(),
                        cell.pps(),
                        cell.cpu_us_per_packet
                            .map_or("-".into(), |u| format!("{u:.2}"))
                    );
                    runs[k].push(cell);
                }
            }
            cells.extend(runs.into_iter().map(median));
        }
    }
    drop(pairs);
    drop(turn_pairs);
    drop(relay);
    drop(coturn);

    print_tables(&cells, &pair_counts, window, burst, duration, repeats);
    write_json(&cells, &pair_counts, window, burst, duration, repeats);
    write_svg(&cells, &pair_counts);
}

#[allow(clippy::too_many_arguments)]
fn run_cell(
    variant: Variant,
    payload: usize,
    n: usize,
    pairs: &[Pair],
    turn_pairs: &[TurnPair],
    coturn: Option<&turn::Coturn>,
    relay_cpu: &dyn Fn() -> Duration,
    burst: usize,
    window: u64,
    duration: Duration,
) -> Cell {
    let mut cell = Cell {
        variant,
        payload,
        pairs: n,
        secs: 0.0,
        packets: 0,
        lost: 0,
        cpu_us_per_packet: None,
        note: None,
        repeats_pps: Vec::new(),
    };
    let per_packet = |cpu: Duration, packets: u64| cpu.as_secs_f64() * 1e6 / packets.max(1) as f64;
    let burrow_flows = |dest: Option<SocketAddr>, relay: SocketAddr| -> Vec<Flow> {
        pairs
            .iter()
            .map(|p| {
                let mut packet = Vec::new();
                relay_data::encode(p.channel, &vec![0x5A; payload], &mut packet);
                Flow {
                    tx: &p.a.udp,
                    dest: dest.unwrap_or(relay),
                    packet,
                }
            })
            .collect()
    };
    let burrow_rx = || clones(pairs.iter().map(|p| p.b.udp.sock.try_clone().unwrap()));
    match variant {
        Variant::Burrow | Variant::BurrowSingle => {
            let relay_addr = relay_addr_of(pairs);
            let flows = burrow_flows(None, relay_addr);
            let m = measure(
                &flows,
                burrow_rx(),
                burst,
                window,
                duration,
                Some(relay_cpu),
            );
            fill(&mut cell, &m);
            cell.cpu_us_per_packet = m.cpu.map(|c| per_packet(c, m.packets));
        }
        Variant::Coturn | Variant::CoturnSingle => {
            let Some(c) = coturn else {
                cell.note = Some("turnserver not installed".into());
                return cell;
            };
            let active = &turn_pairs[..n];
            for (i, p) in active.iter().enumerate() {
                p.bind(c.addr, 1_000_000 + i as u64 * 2);
            }
            let flows: Vec<Flow> = active
                .iter()
                .map(|p| Flow {
                    tx: &p.a,
                    dest: c.addr,
                    packet: turn::channel_data(turn::FIRST_CHANNEL, &vec![0x5A; payload]),
                })
                .collect();
            let rx = clones(active.iter().map(|p| p.b.sock.try_clone().unwrap()));
            let pid = c.pid();
            let cpu = move || relay_proc::cpu_time(pid);
            let m = measure(&flows, rx, burst, window, duration, Some(&cpu));
            fill(&mut cell, &m);
            cell.cpu_us_per_packet = m.cpu.map(|c| per_packet(c, m.packets));
        }
        Variant::Raw | Variant::LimitMmsg | Variant::LimitGro => {
            let kind = match variant {
                Variant::Raw => forwarders::Kind::Raw,
                Variant::LimitMmsg => forwarders::Kind::Mmsg,
                _ => forwarders::Kind::Gro,
            };
            let routes: HashMap<u32, SocketAddr> = pairs
                .iter()
                .map(|p| (p.channel.0, p.b.udp.sock.local_addr().unwrap()))
                .collect();
            let stop = Arc::new(AtomicBool::new(false));
            let (addr, handle) = forwarders::spawn(kind, routes, stop.clone());
            let flows = burrow_flows(Some(addr), addr);
            let m = measure(&flows, burrow_rx(), burst, window, duration, None);
            stop.store(true, Ordering::Relaxed);
            let (forwarded, cpu) = handle.join().unwrap();
            fill(&mut cell, &m);
            // Whole-run CPU over whole-run packets (warm-up included).
            cell.cpu_us_per_packet = Some(per_packet(cpu, forwarded));
        }
    }
    if cell.packets == 0 {
        cell.note = Some("nothing arrived".into());
    }
    cell
}

/// Where the pairs' A sockets reach the relay: the address they bound to it.
fn relay_addr_of(pairs: &[Pair]) -> SocketAddr {
    pairs[0].a.session.tcp.peer_addr().unwrap()
}

fn fill(cell: &mut Cell, m: &Measured) {
    cell.secs = m.secs;
    cell.packets = m.packets;
    cell.lost = m.lost;
}

fn find(cells: &[Cell], v: Variant, pairs: usize, payload: usize) -> Option<&Cell> {
    cells
        .iter()
        .find(|c| c.variant == v && c.pairs == pairs && c.payload == payload)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a > 0.0 => Some(a / b),
        _ => None,
    }
}

fn pps_of(c: Option<&Cell>) -> Option<f64> {
    c.filter(|c| c.packets > 0).map(Cell::pps)
}

fn cpu_of(c: Option<&Cell>) -> Option<f64> {
    c.filter(|c| c.packets > 0)
        .and_then(|c| c.cpu_us_per_packet)
}

fn fmt_k(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{:.0}", v / 1e3))
}

fn fmt_us(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.2}"))
}

fn fmt_x(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.2}x"))
}

fn print_tables(
    cells: &[Cell],
    pair_counts: &[usize],
    window: u64,
    burst: usize,
    d: Duration,
    repeats: usize,
) {
    println!();
    println!(
        "relay_forward: loopback, median of {repeats} x {:.1} s per cell, window {window} \
         packets; k pkt/s and server CPU µs per delivered packet",
        d.as_secs_f64()
    );
    println!("senders that burst (GSO, {burst} datagrams per send):");
    println!(
        "{:>5} {:>5} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>8} {:>8} {:>8}",
        "pairs",
        "bytes",
        "burrow",
        "µs",
        "coturn",
        "µs",
        "lim-gro",
        "µs",
        "lim-mms",
        "µs",
        "b/coturn",
        "cpu gain",
        "b/limit"
    );
    for &n in pair_counts {
        for &p in &PAYLOADS {
            let b = find(cells, Variant::Burrow, n, p);
            let c = find(cells, Variant::Coturn, n, p);
            let g = find(cells, Variant::LimitGro, n, p);
            let m = find(cells, Variant::LimitMmsg, n, p);
            println!(
                "{:>5} {:>5} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>8} {:>8} {:>8}",
                n,
                p,
                fmt_k(pps_of(b)),
                fmt_us(cpu_of(b)),
                fmt_k(pps_of(c)),
                fmt_us(cpu_of(c)),
                fmt_k(pps_of(g)),
                fmt_us(cpu_of(g)),
                fmt_k(pps_of(m)),
                fmt_us(cpu_of(m)),
                fmt_x(ratio(pps_of(b), pps_of(c))),
                fmt_x(ratio(cpu_of(c), cpu_of(b))),
                fmt_x(ratio(pps_of(b), pps_of(g))),
            );
        }
    }
    println!("senders that do not burst (one datagram per send):");
    println!(
        "{:>5} {:>5} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>8} {:>8}",
        "pairs", "bytes", "burrow", "µs", "coturn", "µs", "raw", "µs", "b/coturn", "cpu gain"
    );
    for &n in pair_counts {
        for &p in &PAYLOADS {
            let b = find(cells, Variant::BurrowSingle, n, p);
            let c = find(cells, Variant::CoturnSingle, n, p);
            let r = find(cells, Variant::Raw, n, p);
            println!(
                "{:>5} {:>5} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>8} {:>8}",
                n,
                p,
                fmt_k(pps_of(b)),
                fmt_us(cpu_of(b)),
                fmt_k(pps_of(c)),
                fmt_us(cpu_of(c)),
                fmt_k(pps_of(r)),
                fmt_us(cpu_of(r)),
                fmt_x(ratio(pps_of(b), pps_of(c))),
                fmt_x(ratio(cpu_of(c), cpu_of(b))),
            );
        }
    }
    println!(
        "b/coturn = burrow pkt/s ÷ coturn pkt/s; cpu gain = coturn µs/pkt ÷ burrow µs/pkt; \
         b/limit = burrow ÷ GRO+GSO forwarder. coturn: TURN client-to-client (2 hops in \
         coturn per packet). n/a: no number (see JSON notes)."
    );
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel,
    })
}

fn write_json(
    cells: &[Cell],
    pair_counts: &[usize],
    window: u64,
    burst: usize,
    d: Duration,
    repeats: usize,
) {
    let dir = results_dir();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return;
    }
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rows: Vec<serde_json::Value> = cells
        .iter()
        .map(|c| {
            serde_json::json!({
                "forwarder": c.variant.name(),
                "sender_bursts": c.variant.bursts(),
                "payload_bytes": c.payload,
                "pairs": c.pairs,
                "packets_per_sec": (c.pps()).round(),
                "payload_mb_per_sec": (c.mbps() * 100.0).round() / 100.0,
                "cpu_us_per_packet": c.cpu_us_per_packet.map(|u| (u * 1000.0).round() / 1000.0),
                "packets": c.packets,
                "lost": c.lost,
                "secs": c.secs,
                "note": c.note,
                "repeats_packets_per_sec": c.repeats_pps.iter().map(|p| p.round()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut summary = Vec::new();
    for &n in pair_counts {
        for &p in &PAYLOADS {
            let get = |v| find(cells, v, n, p);
            let r3 = |x: Option<f64>| x.map(|v| (v * 1000.0).round() / 1000.0);
            summary.push(serde_json::json!({
                "pairs": n,
                "payload_bytes": p,
                "burst_pps_vs_coturn": r3(ratio(pps_of(get(Variant::Burrow)), pps_of(get(Variant::Coturn)))),
                "burst_cpu_gain_vs_coturn": r3(ratio(cpu_of(get(Variant::Coturn)), cpu_of(get(Variant::Burrow)))),
                "burst_pps_vs_limit_gro": r3(ratio(pps_of(get(Variant::Burrow)), pps_of(get(Variant::LimitGro)))),
                "burst_cpu_vs_limit_gro": r3(ratio(cpu_of(get(Variant::Burrow)), cpu_of(get(Variant::LimitGro)))),
                "single_pps_vs_coturn": r3(ratio(pps_of(get(Variant::BurrowSingle)), pps_of(get(Variant::CoturnSingle)))),
                "single_cpu_gain_vs_coturn": r3(ratio(cpu_of(get(Variant::CoturnSingle)), cpu_of(get(Variant::BurrowSingle)))),
            }));
        }
    }
    let json = serde_json::json!({
        "bench": "relay_forward",
        "unix_time": unix,
        "command": "cargo build --release -p burrow-relay && cargo bench --bench relay_forward",
        "machine": machine(),
        "secs_per_cell": d.as_secs_f64(),
        "repeats": repeats,
        "window": window,
        "burst": burst,
        "cells": rows,
        "ratios": summary,
    });
    let path = dir.join("relay_forward.json");
    match std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

/// Payload MB/s by payload size, one panel per pair count, every forwarder a line. SVG via
/// plotters (already in the build through criterion; SVG needs no font files).
fn write_svg(cells: &[Cell], pair_counts: &[usize]) {
    use plotters::prelude::*;
    let path = results_dir().join("relay_forward.svg");
    let width = 420 * pair_counts.len() as u32;
    let root = SVGBackend::new(&path, (width, 460)).into_drawing_area();
    let _ = root.fill(&WHITE);
    let root = root
        .titled(
            "Relay forwarding on loopback: payload MB/s by payload size",
            ("sans-serif", 18),
        )
        .unwrap_or(root);
    let panels = root.split_evenly((1, pair_counts.len()));
    let colors = [
        RGBColor(0xD6, 0x27, 0x28), // burrow
        RGBColor(0x1F, 0x77, 0xB4), // coturn
        RGBColor(0x2C, 0xA0, 0x2C), // limit-gro
        RGBColor(0x17, 0xBE, 0xCF), // limit-mmsg
        RGBColor(0xFF, 0x7F, 0x0E), // burrow-single
        RGBColor(0x94, 0x67, 0xBD), // coturn-single
        RGBColor(0x7F, 0x7F, 0x7F), // raw
    ];
    let y_max = cells.iter().map(Cell::mbps).fold(1.0f64, f64::max) * 1.1;
    for (panel, &n) in panels.iter().zip(pair_counts) {
        let mut chart = match ChartBuilder::on(panel)
            .caption(
                format!("{n} pair{}", if n == 1 { "" } else { "s" }),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..1300f64, 0f64..y_max)
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("plot: {e}");
                return;
            }
        };
        let _ = chart
            .configure_mesh()
            .x_desc("payload bytes")
            .y_desc("payload MB/s")
            .x_labels(7)
            .draw();
        for (variant, color) in Variant::ALL.iter().zip(colors) {
            let points: Vec<(f64, f64)> = PAYLOADS
                .iter()
                .filter_map(|&p| find(cells, *variant, n, p))
                .filter(|c| c.packets > 0)
                .map(|c| (c.payload as f64, c.mbps()))
                .collect();
            if points.is_empty() {
                continue;
            }
            let style = if variant.bursts() {
                color.stroke_width(2)
            } else {
                color.stroke_width(1)
            };
            if let Ok(series) = chart.draw_series(LineSeries::new(points.clone(), style)) {
                series
                    .label(variant.label())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            let _ = chart.draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            );
        }
        if n == pair_counts[0] {
            let _ = chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 11))
                .draw();
        }
    }
    match root.present() {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
