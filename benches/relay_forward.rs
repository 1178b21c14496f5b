//! Relay forwarding benchmark (issue 2): packets/s and MB/s through the real `burrow-relay`
//! binary on loopback, next to a raw UDP forwarder measured in the same run.
//!
//! ```sh
//! cargo build --release -p burrow-relay
//! cargo bench --bench relay_forward
//! ```
//!
//! For each payload size (64, 512, 1200 bytes) and pair count (1, 64), node A of each pair
//! sends relay data packets (`wire::relay_data`, 8-byte header + payload) from its UDP
//! socket, and node B's socket counts what arrives. The pairs are registered with the real
//! protocol (TCP session, Ed25519 challenge, UDP bind, `Connect` → `Introduce`).
//!
//! The baseline is a plain UDP forwarder thread in this process: one `recv_from`, a channel
//! lookup in a `HashMap`, one `send_to` per packet, on the same sockets and with the same
//! packets. Both are driven closed-loop: at most `WINDOW` packets in flight in total (so
//! an overloaded receiver measures forwarding, not kernel drops); a stall of 20 ms counts
//! the outstanding packets as lost and goes on.
//!
//! Prints a table (packets/s, payload MB/s, CPU µs per packet of the forwarder, lost
//! packets, relay/baseline ratio) and writes `target/bench-results/relay_forward.json`.
//! Each cell runs `BURROW_BENCH_SECS` seconds (default 2) after a 0.3 s warm-up; the relay
//! binary is `BURROW_RELAY_BIN` or `target/release/burrow-relay`.
//!
//! Loopback only. The machine is shared: numbers vary run to run, compare ratios.

#[path = "common/relay_proc.rs"]
mod relay_proc;

use relay_proc::{RelayProc, relay_bin};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burrow::identity::Identity;
use burrow::wire::control::{self, ClientMsg, NatReport, Register, ServerMsg, UdpMsg};
use burrow::wire::frame::{self, FrameReader, PREAMBLE};
use burrow::wire::relay_data::{self, ChannelId};

const PAYLOADS: [usize; 3] = [64, 512, 1200];
const PAIR_COUNTS: [usize; 2] = [1, 64];
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

// ---------------------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------------------

fn results_dir() -> PathBuf {
    relay_proc::target_dir().join("bench-results")
}

// ---------------------------------------------------------------------------------------
// A minimal node: TCP control session + UDP socket, the real protocol
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
    udp: UdpSocket,
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
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_buffers(&udp);
        udp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let bind = control::to_vec(&UdpMsg::Bind { token, seq: 1 }).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..50 {
            udp.send_to(&bind, relay).unwrap();
            if let Ok((n, _)) = udp.recv_from(&mut buf)
                && let Ok(UdpMsg::Bound { .. }) = control::decode(&buf[..n])
            {
                return Node { id, session, udp };
            }
        }
        panic!("UDP bind not answered");
    }
}

/// Larger kernel buffers so a window of 1200-byte packets fits (capped by rmem_max).
fn set_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
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

// ---------------------------------------------------------------------------------------
// The baseline forwarder
// ---------------------------------------------------------------------------------------

/// A raw UDP forwarder: recv_from, look the channel up, send_to. Returns (packets
/// forwarded, its thread's CPU time) when stopped.
fn spawn_baseline(
    routes: HashMap<u32, SocketAddr>,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, std::thread::JoinHandle<(u64, Duration)>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    set_buffers(&sock);
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let cpu0 = thread_cpu_time();
        let mut buf = [0u8; 2048];
        let mut forwarded = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, _from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(channel) = relay_data::channel(&buf[..n]) else {
                continue;
            };
            if let Some(dst) = routes.get(&channel.0) {
                let _ = sock.send_to(&buf[..n], dst);
                forwarded += 1;
            }
        }
        (forwarded, thread_cpu_time().saturating_sub(cpu0))
    });
    (addr, handle)
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_THREAD_CPUTIME_ID is always available on
    // Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

// ---------------------------------------------------------------------------------------
// One measurement
// ---------------------------------------------------------------------------------------

/// One measured cell; `cells` alternates relay, baseline.
#[derive(Debug, Clone)]
struct Cell {
    payload: usize,
    pairs: usize,
    secs: f64,
    packets: u64,
    lost: u64,
    cpu_us_per_packet: Option<f64>,
}

impl Cell {
    fn pps(&self) -> f64 {
        self.packets as f64 / self.secs
    }
    fn mbps(&self) -> f64 {
        self.pps() * self.payload as f64 / 1e6
    }
}

/// Drives `pairs` closed-loop through `via` (relay or baseline) and measures delivery.
/// `cpu` reads the forwarder's CPU time (relay only; the baseline reports its own).
fn measure(
    pairs: &[Pair],
    via: SocketAddr,
    payload: usize,
    window: u64,
    duration: Duration,
    cpu: Option<&dyn Fn() -> Duration>,
) -> (u64, u64, f64, Option<Duration>) {
    for p in pairs {
        p.a.udp.connect(via).unwrap();
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let wire_len = relay_data::HEADER_LEN + payload;

    // Receiver: every B socket in one mio poll, drained on each wakeup.
    let receiver = {
        let socks: Vec<UdpSocket> = pairs.iter().map(|p| p.b.udp.try_clone().unwrap()).collect();
        let received = received.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut poll = mio::Poll::new().unwrap();
            let mut socks: Vec<mio::net::UdpSocket> = socks
                .into_iter()
                .map(|s| {
                    s.set_nonblocking(true).unwrap();
                    mio::net::UdpSocket::from_std(s)
                })
                .collect();
            for (i, s) in socks.iter_mut().enumerate() {
                poll.registry()
                    .register(s, mio::Token(i), mio::Interest::READABLE)
                    .unwrap();
            }
            let mut events = mio::Events::with_capacity(128);
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
                let mut got = 0;
                for ev in events.iter() {
                    let s = &socks[ev.token().0];
                    while let Ok(n) = s.recv(&mut buf) {
                        if n == wire_len {
                            got += 1;
                        }
                    }
                }
                received.fetch_add(got, Ordering::Relaxed);
            }
            for s in socks.iter_mut() {
                let _ = poll.registry().deregister(s);
            }
        })
    };

    let packets: Vec<Vec<u8>> = pairs
        .iter()
        .map(|p| {
            let mut v = Vec::with_capacity(wire_len);
            relay_data::encode(p.channel, &vec![0x5A; payload], &mut v);
            v
        })
        .collect();
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
        if in_flight < window {
            let i = next % pairs.len();
            next += 1;
            if pairs[i].a.udp.send(&packets[i]).is_ok() {
                sent += 1;
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
    let secs = t1.duration_since(t0).as_secs_f64();
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    (recv1 - recv0, lost.saturating_sub(lost0), secs, cpu)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special. Do
    // nothing unless run as a benchmark, so `cargo test --all-targets` stays quick.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("relay_forward: run with `cargo bench --bench relay_forward`");
        return;
    }
    let duration = Duration::from_millis(env_num("BURROW_BENCH_SECS", 2) * 1000);
    let window = env_num("BURROW_BENCH_WINDOW", 128);

    // Limits opened up for a benchmark: many sessions and registrations from one IP, no
    // bandwidth cap, long idle timeout.
    let relay = RelayProc::start(&[
        "--max-sessions-per-ip",
        "1000",
        "--registrations-per-ip-per-minute",
        "100000",
        "--relay-bytes-per-sec",
        "1000000000000",
        "--relay-burst-bytes",
        "1000000000000",
        "--idle-timeout-secs",
        "3600",
        "--udp-buffer-bytes",
        "4194304",
    ]);
    eprintln!("relay at {} ({})", relay.addr, relay_bin().display());
    let max_pairs = *PAIR_COUNTS.iter().max().unwrap();
    let pairs: Vec<Pair> = (0..max_pairs).map(|i| make_pair(relay.addr, i)).collect();
    eprintln!("{} pairs registered and introduced", pairs.len());
    let relay_cpu = || relay.cpu_time();

    let mut cells = Vec::new();
    for &n in &PAIR_COUNTS {
        let active = &pairs[..n];
        for &payload in &PAYLOADS {
            // Relay.
            let (packets, lost, secs, cpu) = measure(
                active,
                relay.addr,
                payload,
                window,
                duration,
                Some(&relay_cpu),
            );
            cells.push(Cell {
                payload,
                pairs: n,
                secs,
                packets,
                lost,
                cpu_us_per_packet: cpu.map(|c| c.as_secs_f64() * 1e6 / packets.max(1) as f64),
            });
            // Baseline, same pairs and packets.
            let routes: HashMap<u32, SocketAddr> = active
                .iter()
                .map(|p| (p.channel.0, p.b.udp.local_addr().unwrap()))
                .collect();
            let stop = Arc::new(AtomicBool::new(false));
            let (addr, handle) = spawn_baseline(routes, stop.clone());
            let (packets, lost, secs, _) = measure(active, addr, payload, window, duration, None);
            stop.store(true, Ordering::Relaxed);
            let (forwarded, cpu) = handle.join().unwrap();
            cells.push(Cell {
                payload,
                pairs: n,
                secs,
                packets,
                lost,
                // Whole-run CPU over whole-run packets (warm-up included on both sides).
                cpu_us_per_packet: Some(cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64),
            });
            let (r, b) = (&cells[cells.len() - 2], &cells[cells.len() - 1]);
            eprintln!(
                "{payload:>5} B x {n:>2} pairs: relay {:>9.0} pkt/s, baseline {:>9.0} pkt/s",
                r.pps(),
                b.pps()
            );
        }
    }
    drop(pairs);
    drop(relay);

    print_table(&cells, window, duration);
    write_json(&cells, window, duration);
}

fn print_table(cells: &[Cell], window: u64, duration: Duration) {
    println!();
    println!(
        "relay_forward: {:.1} s per cell, window {window} packets, loopback",
        duration.as_secs_f64()
    );
    println!(
        "{:>7} {:>5} | {:>10} {:>8} {:>7} {:>6} | {:>10} {:>8} {:>7} {:>6} | {:>6} {:>9}",
        "payload",
        "pairs",
        "relay p/s",
        "MB/s",
        "µs/pkt",
        "lost",
        "base p/s",
        "MB/s",
        "µs/pkt",
        "lost",
        "ratio",
        "cpu ratio"
    );
    for pair in cells.chunks(2) {
        let (r, b) = (&pair[0], &pair[1]);
        let us = |c: &Cell| {
            c.cpu_us_per_packet
                .map_or("-".into(), |u| format!("{u:.2}"))
        };
        println!(
            "{:>7} {:>5} | {:>10.0} {:>8.1} {:>7} {:>6} | {:>10.0} {:>8.1} {:>7} {:>6} | {:>6.2} {:>9}",
            r.payload,
            r.pairs,
            r.pps(),
            r.mbps(),
            us(r),
            r.lost,
            b.pps(),
            b.mbps(),
            us(b),
            b.lost,
            r.pps() / b.pps().max(1.0),
            cpu_ratio(r, b).map_or("-".into(), |x| format!("{x:.2}"))
        );
    }
    println!("ratio = relay packets/s ÷ baseline packets/s; MB/s counts payload bytes only.");
    println!(
        "cpu ratio = baseline CPU µs/packet ÷ relay CPU µs/packet (1.0: as cheap as the raw \
         forwarder); steadier than packets/s on a shared machine."
    );
}

/// Baseline CPU per packet over relay CPU per packet.
fn cpu_ratio(relay: &Cell, baseline: &Cell) -> Option<f64> {
    let (r, b) = (relay.cpu_us_per_packet?, baseline.cpu_us_per_packet?);
    (r > 0.0).then(|| b / r)
}

fn write_json(cells: &[Cell], window: u64, duration: Duration) {
    let dir = results_dir();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return;
    }
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = Vec::new();
    for pair in cells.chunks(2) {
        let (r, b) = (&pair[0], &pair[1]);
        let cpu = |c: &Cell| {
            c.cpu_us_per_packet
                .map_or("null".into(), |u| format!("{u:.3}"))
        };
        rows.push(format!(
            concat!(
                "    {{\"payload_bytes\": {}, \"pairs\": {}, ",
                "\"relay\": {{\"packets_per_sec\": {:.0}, \"payload_mb_per_sec\": {:.2}, ",
                "\"cpu_us_per_packet\": {}, \"lost\": {}, \"packets\": {}, \"secs\": {:.3}}}, ",
                "\"baseline\": {{\"packets_per_sec\": {:.0}, \"payload_mb_per_sec\": {:.2}, ",
                "\"cpu_us_per_packet\": {}, \"lost\": {}, \"packets\": {}, \"secs\": {:.3}}}, ",
                "\"ratio\": {:.3}, \"cpu_ratio\": {}}}"
            ),
            r.payload,
            r.pairs,
            r.pps(),
            r.mbps(),
            cpu(r),
            r.lost,
            r.packets,
            r.secs,
            b.pps(),
            b.mbps(),
            cpu(b),
            b.lost,
            b.packets,
            b.secs,
            r.pps() / b.pps().max(1.0),
            cpu_ratio(r, b).map_or("null".into(), |x| format!("{x:.3}")),
        ));
    }
    let json = format!(
        "{{\n  \"bench\": \"relay_forward\",\n  \"unix_time\": {unix},\n  \"secs_per_cell\": {},\n  \"window\": {window},\n  \"cells\": [\n{}\n  ]\n}}\n",
        duration.as_secs_f64(),
        rows.join(",\n")
    );
    let path = dir.join("relay_forward.json");
    match std::fs::write(&path, json) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
