//! End-to-end data-path benchmark (issue 4/6), everything on 127.0.0.1 in one process:
//!
//! * `direct`    — one QUIC stream between two `NodeDriver`s over a punched direct path;
//! * `relay-udp` — the same over the in-process relay's UDP forwarding (`relay_only`);
//! * `relay-tcp` — the same over the relay's TCP connections (`relay_only`, and the node's
//!   `relay_udp` pointed at a dead port so UDP to the relay never works);
//! * `direct-procs` — the same direct stream between two processes, `burrow listen` and
//!   `burrow bench` (the release binaries, with a `burrow-relay` process): what a user runs,
//!   and each node gets its own process (skipped with the reason if the relay binary is not
//!   built: `cargo build --release -p burrow-relay`);
//! * `udp-raw`   — baseline: one thread blasting 1200-byte datagrams (GSO where available)
//!   at a socket drained by another thread (received bytes count);
//! * `tcp-raw`   — baseline: a kernel TCP loopback stream with 256 KiB writes.
//!
//! Each case runs a few seconds; CPU is process CPU (getrusage) over the case, all threads
//! (both nodes and the relay) included. Prints a table and writes
//! `target/bench-results/data_plane.json`. Run: `cargo bench --bench data_plane`
//! (`DATA_PLANE_SECONDS=N` changes the per-case length, default 3).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burrow::app::{BenchClient, BenchConfig, ListenConfig, Listener};
use burrow::driver::node::{DriverConfig, NodeDriver};
use burrow::driver::relay::{RelayServerConfig, StopPipe};
use burrow::identity::Identity;
use burrow::node::{NodeConfig, NodeCore, NodeEvent, PathKind};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{ConnectionHandle, Event, Side, Transport, TransportConfig};
use burrow::wire::PeerId;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Debug, Clone)]
struct CaseResult {
    name: &'static str,
    bytes: u64,
    seconds: f64,
    cpu: f64,
    path: String,
}

impl CaseResult {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
    fn cpu_per_gb(&self) -> f64 {
        self.cpu / (self.bytes as f64 / 1e9).max(1e-12)
    }
}

// ------------------------------------------------------------------ raw baselines

fn udp_raw(seconds: u64) -> CaseResult {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(4 << 20);
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let dest = rx.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (s2, r2) = (stop.clone(), received.clone());
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !s2.load(Ordering::Relaxed) {
            if let Ok(n) = rx.recv(&mut buf) {
                r2.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&tx).set_send_buffer_size(4 << 20);
    tx.connect(dest).unwrap();
    let payload = vec![0x55u8; 1200];
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let base = received.load(Ordering::Relaxed);
    while Instant::now() < end {
        for _ in 0..64 {
            let _ = tx.send(&payload);
        }
    }
    let bytes = received.load(Ordering::Relaxed) - base;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    CaseResult {
        name: "udp-raw",
        bytes,
        seconds: elapsed,
        cpu,
        path: "kernel udp, 1200 B datagrams".into(),
    }
}

fn tcp_raw(seconds: u64) -> CaseResult {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let mut tx = TcpStream::connect(addr).unwrap();
    let chunk = vec![0xAAu8; 256 * 1024];
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    while Instant::now() < end {
        tx.write_all(&chunk).unwrap();
    }
    drop(tx);
    let bytes = receiver.join().unwrap();
    CaseResult {
        name: "tcp-raw",
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu0,
        path: "kernel tcp".into(),
    }
}

// ------------------------------------------------------------------ burrow nodes

/// The listening side: answers benchmarks.
struct ListenSide {
    listener: Listener,
}

impl Service for ListenSide {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        self.listener.handle_event(now, transport, &event);
        while self.listener.poll_report().is_some() {}
    }
    fn on_node_event(&mut self, _: Instant, _: &mut NodeCore, _: &NodeEvent) {}
    fn on_tick(&mut self, now: Instant, _: &mut NodeCore, transport: &mut Transport) {
        self.listener.on_tick(now, transport);
        while self.listener.poll_report().is_some() {}
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.listener.poll_timeout()
    }
    fn is_done(&self) -> bool {
        false
    }
}

/// The measuring side: connects, waits for the wanted path kind, runs one bench stream.
struct BenchSide {
    peer: PeerId,
    want: &'static str,
    seconds: u32,
    conn: Option<ConnectionHandle>,
    path: Option<PathKind>,
    client: Option<BenchClient>,
    started: Option<(Instant, f64)>,
    finished: Option<(Instant, f64)>,
    give_up: Instant,
}

impl BenchSide {
    fn maybe_start(&mut self, now: Instant, transport: &mut Transport) {
        if self.client.is_some() {
            return;
        }
        let (Some(conn), Some(path)) = (self.conn, self.path) else {
            return;
        };
        if path.name() != self.want {
            return;
        }
        let mut c = BenchClient::new(
            BenchConfig {
                seconds: self.seconds,
                reverse: false,
                streams: 1,
                datagram_rate: None,
            },
            conn,
        );
        self.started = Some((now, cpu_seconds()));
        c.on_tick(now, transport);
        self.client = Some(c);
    }
}

impl Service for BenchSide {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        if let Event::Connected { conn, peer, side } = &event
            && *peer == self.peer
            && *side == Side::Client
        {
            self.conn = Some(*conn);
            self.maybe_start(now, transport);
            return;
        }
        if let Some(c) = self.client.as_mut() {
            c.handle_event(now, transport, &event);
        }
    }
    fn on_node_event(&mut self, _: Instant, _: &mut NodeCore, event: &NodeEvent) {
        if let NodeEvent::PathChanged { peer, path } = event
            && *peer == self.peer
        {
            self.path = Some(*path);
        }
    }
    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        if self.path.is_none() {
            self.path = core.path(now, &self.peer);
        }
        self.maybe_start(now, transport);
        if let Some(c) = self.client.as_mut() {
            c.on_tick(now, transport);
            if c.is_done() && self.finished.is_none() {
                self.finished = Some((now, cpu_seconds()));
            }
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        let mut t = Some(self.give_up);
        if let Some(c) = &self.client {
            t = t.min(c.poll_timeout()).or(Some(self.give_up));
        }
        t
    }
    fn is_done(&self) -> bool {
        self.finished.is_some() || Instant::now() >= self.give_up
    }
}

fn transport(identity: &Identity, seed: u8, max_segments: usize) -> Transport {
    let config = TransportConfig {
        rng_seed: [seed; 32],
        max_segments,
        ..TransportConfig::default()
    };
    Transport::new(identity, config).unwrap()
}

fn burrow_case(name: &'static str, seconds: u32) -> CaseResult {
    let want = match name {
        "direct" => "direct",
        "relay-udp" => "relay-udp",
        _ => "relay-tcp",
    };
    // The relay, in-process (bound inside its thread: the server is not `Send`).
    let (tx, rx) = std::sync::mpsc::channel();
    let relay_thread = std::thread::spawn(move || {
        let stop = StopPipe::new().unwrap();
        let handle = stop.handle().unwrap();
        let mut config = RelayServerConfig::new("127.0.0.1:0".parse().unwrap());
        // The default per-node relay bandwidth cap is for a public relay; measure the path.
        config.limits.relay_bytes_per_sec = 100 << 30;
        config.limits.relay_burst_bytes = 1 << 30;
        let relay = burrow::driver::relay::bind(config, stop).unwrap();
        tx.send((relay.local_addr(), handle)).unwrap();
        relay.run()
    });
    let (relay_addr, stop_handle) = rx.recv().unwrap();

    // A UDP port nobody answers on: with it as the relay's UDP address, UDP to the relay
    // never works and the core falls back to the TCP relay path.
    let dead = UdpSocket::bind("127.0.0.1:0").unwrap();
    let node_config = |identity: Identity| {
        let mut cfg = NodeConfig::new(identity, relay_addr);
        cfg.relay_only = want != "direct";
        if want == "relay-tcp" {
            cfg.relay_udp = dead.local_addr().unwrap();
        }
        cfg
    };
    let driver_config = DriverConfig {
        udp4: "127.0.0.1:0".parse().unwrap(),
        udp6: None,
    };

    let listen_id = Identity::generate();
    let listen_peer = listen_id.peer_id();
    let mut listen_driver =
        NodeDriver::new(node_config(listen_id.clone()), driver_config.clone()).unwrap();
    let (listen_stop, listen_waker) = listen_driver.stop_handle();
    let listen_transport = transport(&listen_id, 1, listen_driver.max_gso_segments());
    let listen_thread = std::thread::spawn(move || {
        let mut plane = DataPlane::new(
            listen_transport,
            ListenSide {
                listener: Listener::new(ListenConfig {
                    bench: true,
                    ..ListenConfig::default()
                }),
            },
        );
        listen_driver.run(&mut plane, None)
    });

    let bench_id = Identity::generate();
    let mut driver = NodeDriver::new(node_config(bench_id.clone()), driver_config).unwrap();
    let now = Instant::now();
    let bench_transport = transport(&bench_id, 2, driver.max_gso_segments());
    let mut plane = DataPlane::new(
        bench_transport,
        BenchSide {
            peer: listen_peer,
            want,
            seconds,
            conn: None,
            path: None,
            client: None,
            started: None,
            finished: None,
            give_up: now + Duration::from_secs(u64::from(seconds) + 20),
        },
    );
    // The listener registers first so the introduction finds it.
    std::thread::sleep(Duration::from_millis(300));
    plane.connect(now, driver.core(), listen_peer);
    driver.run(&mut plane, None).unwrap();

    let side = plane.service();
    let summary = side.client.as_ref().map(|c| c.summary());
    let (bytes, secs) = summary
        .as_ref()
        .map(|s| (s.bytes, s.elapsed.as_secs_f64()))
        .unwrap_or((0, 0.0));
    let cpu = match (side.started, side.finished) {
        (Some((_, c0)), Some((_, c1))) => c1 - c0,
        _ => 0.0,
    };
    if let Some(s) = &summary
        && !s.errors.is_empty()
    {
        eprintln!("{name}: stream errors: {:?}", s.errors);
    }
    let path = side
        .path
        .map(|p| p.name().to_string())
        .unwrap_or_else(|| "none".into());

    listen_stop.store(true, Ordering::Relaxed);
    let _ = listen_waker.wake();
    let _ = listen_thread.join();
    stop_handle.stop();
    let _ = relay_thread.join();
    drop(dead);
    CaseResult {
        name,
        bytes,
        seconds: secs,
        cpu,
        path,
    }
}

#[path = "common/relay_proc.rs"]
mod relay_proc;

/// `direct-procs`: `burrow listen` + `burrow bench --wait-direct` as processes on loopback.
/// CPU is both nodes' and the relay's (children rusage for the client, /proc for the rest).
fn direct_procs(seconds: u32) -> Result<CaseResult, String> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    if !relay_proc::relay_bin().is_file() {
        return Err(format!(
            "{} not built (cargo build --release -p burrow-relay)",
            relay_proc::relay_bin().display()
        ));
    }
    let burrow = env!("CARGO_BIN_EXE_burrow");
    let relay = relay_proc::RelayProc::start(&[
        "--relay-bytes-per-sec",
        "1000000000000",
        "--relay-burst-bytes",
        "1000000000000",
    ]);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let relay_addr = relay.addr.to_string();
    let node = |cmd: &str, key: &str| {
        let mut c = Command::new(burrow);
        c.arg(cmd)
            .args(["--relay", &relay_addr, "--bind", "127.0.0.1:0", "--no-ipv6"])
            .arg("--identity")
            .arg(dir.path().join(key))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        c
    };
    let mut listen = node("listen", "listen.key")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("burrow listen: {e}"))?;
    let mut peer = String::new();
    std::io::BufReader::new(listen.stdout.take().unwrap())
        .read_line(&mut peer)
        .map_err(|e| e.to_string())?;
    // Registration: give the listener a moment (the bench's connect retries anyway).
    std::thread::sleep(Duration::from_millis(500));
    let cpu_of = |pid: u32| relay_proc::cpu_time(pid).as_secs_f64();
    let (l0, r0) = (cpu_of(listen.id()), cpu_of(relay.pid()));
    let children0 = children_cpu();
    let out = node("bench", "bench.key")
        .arg(peer.trim())
        .args([
            "--seconds",
            &seconds.to_string(),
            "--wait-direct",
            "10",
            "--json",
        ])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("burrow bench: {e}"))?;
    let cpu = children_cpu() - children0 + cpu_of(listen.id()) - l0 + cpu_of(relay.pid()) - r0;
    let _ = listen.kill();
    let _ = listen.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("burrow bench printed no JSON ({e}): {:?}", out.status))?;
    Ok(CaseResult {
        name: "direct-procs",
        bytes: v["bytes"].as_u64().unwrap_or(0),
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        cpu,
        path: format!(
            "{} (burrow listen + burrow bench processes)",
            v["path"].as_str().unwrap_or("?")
        ),
    })
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore arguments.
    let seconds: u32 = std::env::var("DATA_PLANE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("DATA_PLANE_CASES").ok();
    let wanted = |n: &str| only.as_ref().is_none_or(|o| o.split(',').any(|x| x == n));
    let mut results = Vec::new();
    if wanted("udp-raw") {
        results.push(udp_raw(u64::from(seconds)));
    }
    if wanted("tcp-raw") {
        results.push(tcp_raw(u64::from(seconds)));
    }
    for name in ["direct", "relay-udp", "relay-tcp"] {
        if wanted(name) {
            results.push(burrow_case(name, seconds));
        }
    }
    if wanted("direct-procs") {
        match direct_procs(seconds) {
            Ok(r) => results.push(r),
            Err(e) => println!("direct-procs skipped: {e}"),
        }
    }
    let baseline = |n: &str| {
        results
            .iter()
            .find(|r| r.name == n)
            .map(|r| r.mb_per_s())
            .filter(|v| *v > 0.0)
    };
    let udp_base = baseline("udp-raw");
    let tcp_base = baseline("tcp-raw");
    println!(
        "{:<12} {:>10} {:>9} {:>9} {:>10}  path",
        "case", "MB/s", "÷udp", "÷tcp", "CPU s/GB"
    );
    let mut json = Vec::new();
    for r in &results {
        let ratio = |b: Option<f64>| b.map(|b| r.mb_per_s() / b);
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{:<12} {:>10.1} {:>9} {:>9} {:>10.2}  {}",
            r.name,
            r.mb_per_s(),
            fmt(ratio(udp_base)),
            fmt(ratio(tcp_base)),
            r.cpu_per_gb(),
            r.path
        );
        json.push(serde_json::json!({
            "case": r.name,
            "bytes": r.bytes,
            "seconds": r.seconds,
            "mb_per_s": r.mb_per_s(),
            "ratio_to_udp_raw": ratio(udp_base),
            "ratio_to_tcp_raw": ratio(tcp_base),
            "cpu_seconds": r.cpu,
            "cpu_seconds_per_gb": r.cpu_per_gb(),
            "path": r.path,
        }));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let out = dir.join("data_plane.json");
    let doc = serde_json::json!({
        "bench": "data_plane",
        "seconds_per_case": seconds,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "results": json,
    });
    if let Err(e) = std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()) {
        eprintln!("cannot write {}: {e}", out.display());
    } else {
        println!("wrote {}", out.display());
    }
}
