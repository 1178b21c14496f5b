//! Relay scale benchmark (issue 6, "relay scale"): how many concurrently registered nodes
//! one `burrow-relay` carries, at what memory and keepalive CPU.
//!
//! ```sh
//! cargo build --release -p burrow-relay
//! cargo bench --bench relay_scale
//! ```
//!
//! A load generator in this process speaks the real protocol to the real release binary on
//! loopback: each node is one TCP connection (preamble, `Challenge`, `Register` signed with
//! a per-node Ed25519 key from `Identity::from_secret`, `Registered`). Nodes are added in
//! cumulative steps (default 1,000 / 10,000 / 50,000 / 100,000; `BURROW_SCALE_STEPS=1000,5000`
//! overrides), all kept registered until the end. Client sockets are bound to many
//! 127.1.x.y source addresses (1,000 nodes per address) before connecting, so the
//! ephemeral-port range of one address is never the limit. RLIMIT_NOFILE is raised for this
//! process (to the kernel's `fs.nr_open` when running as root) and inherited by the relay.
//! One mio thread drives all sockets non-blocking, with at most `IN_FLIGHT` handshakes
//! open at a time.
//!
//! Per step it measures:
//! - registration rate: nodes added / wall time from the first connect to the last
//!   `Registered` of the step;
//! - relay RSS (`VmRSS` of /proc/PID/status) after the step, and RSS per node both as
//!   (RSS − RSS of the idle relay) / nodes and as the step's marginal growth / nodes added;
//! - keepalive CPU: relay utime+stime (/proc/PID/stat) over `BURROW_SCALE_KEEPALIVE_WINDOW`
//!   seconds (default 5) while the nodes send `Ping` at the relay's real interval
//!   (`Registered.keepalive_secs`, staggered evenly over the nodes, so N / keepalive_secs
//!   pings per second) and read the `Pong`s. `BURROW_SCALE_KEEPALIVE_SECS` compresses the
//!   interval (reported in the table). CPU is sampled at 10 ms resolution, so at the real
//!   interval and few nodes the µs-per-ping column is mostly noise; a compressed interval
//!   (e.g. `BURROW_SCALE_KEEPALIVE_SECS=1`) gives a usable per-ping cost.
//!
//! File descriptors: both processes hold one fd per node. Without CAP_SYS_RESOURCE the
//! hard RLIMIT_NOFILE cannot be raised (on the dev machine it is 20,000), so steps above
//! the limit are replaced by one step at (limit − 200) and the table says "fd-limited".
//! Run as a user with CAP_SYS_RESOURCE (or `ulimit -Hn 1048576` first) for 100,000.
//!
//! coturn beside it, same run: when `turnserver` is installed, a fresh no-auth coturn on
//! loopback gets `BURROW_SCALE_COTURN_ALLOCS` (default 5,000, at most half the fd limit)
//! TURN allocations, one client UDP socket each, and its RSS per allocation is reported
//! next to burrow's RSS per registered node (a TURN allocation is what a relayed peer costs
//! coturn: it holds a relay socket per allocation, where burrow holds none per node).
//!
//! Every step has a wall-clock cap (`BURROW_SCALE_STEP_SECS`, default 120); a step that
//! does not finish is reported with the nodes it got, and later steps are skipped. The
//! relay is killed when the bench ends (also on panic, via Drop). Loopback only.

#[path = "common/relay_proc.rs"]
mod relay_proc;
#[path = "common/turn.rs"]
mod turn;

use relay_proc::{RelayProc, cpu_time, relay_bin, target_dir};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use burrow::identity::Identity;
use burrow::wire::control::{self, ClientMsg, NatReport, Register, ServerMsg};
use burrow::wire::frame::{self, PREAMBLE};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

const DEFAULT_STEPS: [usize; 4] = [1_000, 10_000, 50_000, 100_000];
/// Handshakes (connect → `Registered`) open at once.
const IN_FLIGHT: usize = 2_000;
/// Nodes per 127.1.x.y source address.
const NODES_PER_SOURCE: usize = 1_000;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn steps() -> Vec<usize> {
    match std::env::var("BURROW_SCALE_STEPS") {
        Ok(v) => v
            .split(',')
            .filter_map(|s| s.trim().replace('_', "").parse().ok())
            .collect(),
        Err(_) => DEFAULT_STEPS.to_vec(),
    }
}

/// Raises RLIMIT_NOFILE as far as allowed (the relay inherits it). Returns the new soft
/// limit.
fn raise_nofile() -> u64 {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let want = libc::rlimit {
        rlim_cur: nr_open,
        rlim_max: nr_open,
    };
    // SAFETY: valid pointer; failure (not root) leaves the limit unchanged.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        let soft_to_hard = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft_to_hard) };
    }
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------------------

/// VmRSS of a process, bytes.
fn rss_bytes(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Non-blocking connect in progress.
    Connecting,
    /// Preamble sent; waiting for `Challenge`.
    AwaitChallenge,
    /// `Register` sent; waiting for `Registered`.
    AwaitRegistered,
    /// Registered; answers keepalives.
    Registered,
    /// Closed by the relay or failed.
    Dead,
}

struct Conn {
    index: usize,
    stream: TcpStream,
    state: State,
    /// Bytes of a partial frame (usually empty: messages here are small).
    inbuf: Vec<u8>,
}

/// Why a node did not register, counted per step.
#[derive(Default, Debug)]
struct Failures {
    connect: u64,
    closed: u64,
    rejected: u64,
}

struct LoadGen {
    poll: Poll,
    relay: SocketAddr,
    conns: Vec<Conn>,
    next_index: usize,
    registered: usize,
    in_flight: usize,
    keepalive_secs: u16,
    pongs: u64,
    failures: Failures,
    scratch: Vec<u8>,
}

fn source_addr(index: usize) -> SocketAddr {
    let k = index / NODES_PER_SOURCE;
    let ip = Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250 + 1) as u8);
    SocketAddr::new(IpAddr::V4(ip), 0)
}

fn secret(index: usize) -> [u8; 32] {
    let mut s = [0x5C; 32];
    s[..8].copy_from_slice(&(index as u64).to_le_bytes());
    s
}

fn send_msg(stream: &mut TcpStream, msg: &ClientMsg) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(128);
    frame::encode(&control::to_vec(msg).expect("encode"), &mut out).expect("frame");
    // Messages are tiny and the socket buffer is empty at this point in the handshake (or
    // holds a few pings): a short write means the relay stopped reading, count it as dead.
    let n = stream.write(&out)?;
    if n != out.len() {
        return Err(std::io::Error::new(ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

impl LoadGen {
    fn new(relay: SocketAddr) -> LoadGen {
        LoadGen {
            poll: Poll::new().expect("mio poll"),
            relay,
            conns: Vec::new(),
            next_index: 0,
            registered: 0,
            in_flight: 0,
            keepalive_secs: 0,
            pongs: 0,
            failures: Failures::default(),
            scratch: vec![0u8; 64 * 1024],
        }
    }

    /// Starts one non-blocking connect from this node's source address.
    fn open(&mut self) {
        let index = self.next_index;
        self.next_index += 1;
        let sock = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("socket(): {e}");
                self.failures.connect += 1;
                return;
            }
        };
        let ok = sock.set_nonblocking(true).is_ok()
            && sock.set_tcp_nodelay(true).is_ok()
            && sock.bind(&source_addr(index).into()).is_ok();
        if !ok {
            self.failures.connect += 1;
            return;
        }
        match sock.connect(&self.relay.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(_) => {
                self.failures.connect += 1;
                return;
            }
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(sock));
        let slot = self.conns.len();
        if self
            .poll
            .registry()
            .register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.failures.connect += 1;
            return;
        }
        self.conns.push(Conn {
            index,
            stream,
            state: State::Connecting,
            inbuf: Vec::new(),
        });
        self.in_flight += 1;
    }

    fn kill(&mut self, slot: usize, rejected: bool) {
        let c = &mut self.conns[slot];
        match c.state {
            State::Dead => return,
            State::Registered => self.registered -= 1,
            _ => self.in_flight -= 1,
        }
        if rejected {
            self.failures.rejected += 1;
        } else {
            self.failures.closed += 1;
        }
        c.state = State::Dead;
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }

    fn on_event(&mut self, slot: usize) {
        if self.conns[slot].state == State::Dead {
            return;
        }
        if self.conns[slot].state == State::Connecting {
            if !matches!(self.conns[slot].stream.take_error(), Ok(None)) {
                self.kill(slot, false);
                // Counted as a connect failure, not a close.
                self.failures.closed -= 1;
                self.failures.connect += 1;
                return;
            }
            let c = &mut self.conns[slot];
            if c.stream.peer_addr().is_err() {
                return; // still connecting
            }
            if c.stream.write(&PREAMBLE).ok() != Some(PREAMBLE.len()) {
                self.kill(slot, false);
                return;
            }
            c.state = State::AwaitChallenge;
        }
        // Edge-triggered: read until WouldBlock.
        loop {
            let c = &mut self.conns[slot];
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.kill(slot, false);
                    return;
                }
                Ok(n) => c.inbuf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.kill(slot, false);
                    return;
                }
            }
        }
        // Whole frames: 4-byte big-endian length, then the body.
        let mut inbuf = std::mem::take(&mut self.conns[slot].inbuf);
        let mut used = 0;
        while inbuf.len() - used >= frame::LENGTH_LEN {
            let len = u32::from_be_bytes(inbuf[used..used + 4].try_into().unwrap()) as usize;
            if inbuf.len() - used < 4 + len {
                break;
            }
            let body = &inbuf[used + 4..used + 4 + len];
            used += 4 + len;
            if body.first() != Some(&burrow::wire::KIND_CONTROL) {
                continue;
            }
            let Ok(msg) = control::decode_valid::<ServerMsg>(body) else {
                self.kill(slot, true);
                return;
            };
            if !self.on_message(slot, msg) {
                return;
            }
        }
        inbuf.drain(..used);
        inbuf.shrink_to_fit();
        self.conns[slot].inbuf = inbuf;
    }

    /// Returns false when the connection was killed.
    fn on_message(&mut self, slot: usize, msg: ServerMsg) -> bool {
        let state = self.conns[slot].state;
        match (state, msg) {
            (State::AwaitChallenge, ServerMsg::Challenge { nonce, .. }) => {
                let id = Identity::from_secret(secret(self.conns[slot].index));
                let reg = ClientMsg::Register(Register {
                    peer_id: id.peer_id(),
                    signature: id.sign(&control::register_signed_bytes(&nonce)),
                    token: None,
                    candidates: vec![],
                    nat: NatReport::default(),
                    agent: "relay_scale bench".into(),
                });
                if send_msg(&mut self.conns[slot].stream, &reg).is_err() {
                    self.kill(slot, false);
                    return false;
                }
                self.conns[slot].state = State::AwaitRegistered;
                true
            }
            (State::AwaitRegistered, ServerMsg::Registered { keepalive_secs, .. }) => {
                self.keepalive_secs = keepalive_secs;
                self.conns[slot].state = State::Registered;
                self.in_flight -= 1;
                self.registered += 1;
                // Only pongs from now on: no need to hear about writability.
                let c = &mut self.conns[slot];
                let _ =
                    self.poll
                        .registry()
                        .reregister(&mut c.stream, Token(slot), Interest::READABLE);
                true
            }
            (State::Registered, ServerMsg::Pong { .. }) => {
                self.pongs += 1;
                true
            }
            (_, ServerMsg::Error { code, message }) => {
                if self.failures.rejected < 3 {
                    eprintln!("relay rejected node: {code:?} {message}");
                }
                self.kill(slot, true);
                false
            }
            (_, _) => true,
        }
    }

    fn poll_once(&mut self, events: &mut Events, timeout: Duration) {
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                panic!("poll: {e}");
            }
            return;
        }
        let slots: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        for slot in slots {
            self.on_event(slot);
        }
    }

    /// Adds nodes until `target` are registered, or `cap` elapses, or nothing is left in
    /// flight and opening more keeps failing.
    fn grow_to(&mut self, target: usize, cap: Duration) -> bool {
        let deadline = Instant::now() + cap;
        let mut events = Events::with_capacity(4096);
        let budget = target + target / 10 + 100; // attempts, including failed ones
        while self.registered < target {
            if Instant::now() >= deadline {
                return false;
            }
            while self.in_flight < IN_FLIGHT
                && self.registered + self.in_flight < target
                && self.next_index < budget
            {
                self.open();
            }
            if self.in_flight == 0 && self.next_index >= budget {
                return false;
            }
            self.poll_once(&mut events, Duration::from_millis(50));
        }
        true
    }

    /// Sends `Ping`s for `window`, staggered so each registered node pings once per
    /// `interval`, and reads the pongs.
    fn keepalive(&mut self, window: Duration, interval: Duration) -> u64 {
        let live: Vec<usize> = (0..self.conns.len())
            .filter(|&s| self.conns[s].state == State::Registered)
            .collect();
        if live.is_empty() {
            return 0;
        }
        let mut events = Events::with_capacity(4096);
        let start = Instant::now();
        let per_sec = live.len() as f64 / interval.as_secs_f64();
        let mut sent = 0u64;
        let mut cursor = 0usize;
        let mut queue: VecDeque<usize> = live.into_iter().collect();
        while start.elapsed() < window {
            let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
            while sent < due {
                let Some(slot) = queue.pop_front() else { break };
                queue.push_back(slot);
                if self.conns[slot].state != State::Registered {
                    continue;
                }
                cursor += 1;
                let ping = ClientMsg::Ping { seq: cursor as u64 };
                if send_msg(&mut self.conns[slot].stream, &ping).is_err() {
                    self.kill(slot, false);
                }
                sent += 1;
            }
            self.poll_once(&mut events, Duration::from_millis(5));
        }
        sent
    }
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

struct Row {
    target: usize,
    registered: usize,
    complete: bool,
    secs: f64,
    reg_per_sec: f64,
    rss: u64,
    rss_per_node: f64,
    rss_marginal_per_node: f64,
    keepalive_interval_secs: f64,
    pings: u64,
    keepalive_cpu_pct: f64,
    keepalive_cpu_us_per_ping: f64,
    failures: String,
}

fn main() {
    // `cargo bench` passes --bench; ignore all arguments.
    let requested = steps();
    let step_cap = Duration::from_secs(env_num("BURROW_SCALE_STEP_SECS", 120));
    let window = Duration::from_secs(env_num("BURROW_SCALE_KEEPALIVE_WINDOW", 5).max(1));
    let nofile = raise_nofile();
    // Both processes hold one fd per node (the relay inherits this limit); keep a margin for
    // listeners, epoll, pipes and the handshakes in flight.
    let fd_max = (nofile as usize).saturating_sub(200);
    let mut steps: Vec<usize> = requested.iter().copied().filter(|&n| n <= fd_max).collect();
    let fd_limited = requested.iter().any(|&n| n > fd_max);
    if fd_limited {
        eprintln!(
            "RLIMIT_NOFILE is {nofile} and cannot be raised here (setrlimit needs CAP_SYS_RESOURCE above the hard limit): steps above {fd_max} nodes replaced by one step at {fd_max}"
        );
        steps.push(fd_max);
    }
    let max = steps.iter().copied().max().unwrap_or(0);
    eprintln!("relay_scale: steps {steps:?}, RLIMIT_NOFILE {nofile}, step cap {step_cap:?}");

    let max_sessions = (max + 1_000).to_string();
    let per_ip = (2 * NODES_PER_SOURCE).to_string();
    let relay = RelayProc::start(&[
        "--max-sessions",
        &max_sessions,
        "--max-sessions-per-ip",
        &per_ip,
        "--registrations-per-ip-per-minute",
        "1000000",
        "--handshake-timeout-secs",
        "60",
    ]);
    let pid = relay.pid();
    let pid_s = pid.to_string();
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_bytes(&pid_s);
    eprintln!(
        "relay pid {pid} at {}, idle RSS {} KiB",
        relay.addr,
        rss_idle / 1024
    );

    let mut lg = LoadGen::new(relay.addr);
    let mut rows = Vec::new();
    let mut prev_rss = rss_idle;
    let mut prev_nodes = 0usize;
    for &target in &steps {
        lg.failures = Failures::default();
        let t0 = Instant::now();
        let complete = lg.grow_to(target, step_cap);
        let secs = t0.elapsed().as_secs_f64();
        let added = lg.registered.saturating_sub(prev_nodes);
        // Let the relay finish what it was doing before reading its memory.
        std::thread::sleep(Duration::from_millis(200));
        let rss = rss_bytes(&pid_s);
        let interval = Duration::from_secs_f64(
            std::env::var("BURROW_SCALE_KEEPALIVE_SECS")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::from(lg.keepalive_secs.max(1))),
        );
        let cpu0 = cpu_time(pid);
        let w0 = Instant::now();
        let pings = lg.keepalive(window, interval);
        let cpu = cpu_time(pid).saturating_sub(cpu0);
        let wall = w0.elapsed();
        let row = Row {
            target,
            registered: lg.registered,
            complete,
            secs,
            reg_per_sec: added as f64 / secs.max(1e-9),
            rss,
            rss_per_node: rss.saturating_sub(rss_idle) as f64 / lg.registered.max(1) as f64,
            rss_marginal_per_node: rss.saturating_sub(prev_rss) as f64 / added.max(1) as f64,
            keepalive_interval_secs: interval.as_secs_f64(),
            pings,
            keepalive_cpu_pct: 100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
            keepalive_cpu_us_per_ping: cpu.as_secs_f64() * 1e6 / pings.max(1) as f64,
            failures: format!(
                "connect {} closed {} rejected {}",
                lg.failures.connect, lg.failures.closed, lg.failures.rejected
            ),
        };
        eprintln!(
            "step {target}: {} registered in {secs:.1} s ({:.0}/s), RSS {} KiB, {:.0} B/node, \
             keepalive CPU {:.2} % ({pings} pings, {} pongs total), {}",
            row.registered,
            row.reg_per_sec,
            rss / 1024,
            row.rss_per_node,
            row.keepalive_cpu_pct,
            lg.pongs,
            row.failures
        );
        prev_rss = rss;
        prev_nodes = lg.registered;
        rows.push(row);
        if !complete {
            eprintln!("step {target} did not complete within its cap: stopping here");
            break;
        }
    }
    let bench_rss = rss_bytes("self");
    drop(lg);
    drop(relay);
    let coturn = coturn_scale(fd_max / 2);

    println!();
    println!(
        "relay scale: burrow-relay, loopback, 1 load-generator thread (idle relay RSS {} KiB)",
        rss_idle / 1024
    );
    println!(
        "{:>8} {:>8} {:>9} {:>9} {:>11} {:>10} {:>12} {:>9} {:>10} {:>8}",
        "target",
        "nodes",
        "secs",
        "reg/s",
        "RSS MiB",
        "B/node",
        "marg B/node",
        "ka int s",
        "ka CPU %",
        "us/ping"
    );
    for r in &rows {
        println!(
            "{:>8} {:>8} {:>9.1} {:>9.0} {:>11.1} {:>10.0} {:>12.0} {:>9.1} {:>10.2} {:>8.1}{}",
            r.target,
            r.registered,
            r.secs,
            r.reg_per_sec,
            r.rss as f64 / (1024.0 * 1024.0),
            r.rss_per_node,
            r.rss_marginal_per_node,
            r.keepalive_interval_secs,
            r.keepalive_cpu_pct,
            r.keepalive_cpu_us_per_ping,
            if r.complete { "" } else { "  (cap hit)" }
        );
    }
    println!(
        "target: >= 100,000 nodes at <= 2048 B RSS per idle node; load generator RSS {} MiB",
        bench_rss / (1024 * 1024)
    );
    if fd_limited {
        println!(
            "fd-limited: RLIMIT_NOFILE {nofile} (hard) caps both processes; requested steps {requested:?}"
        );
    }
    match &coturn {
        Ok(c) => {
            let ours = rows.last().map_or(0.0, |r| r.rss_per_node);
            println!(
                "coturn, same run: {} allocations in {:.1} s ({:.0}/s), RSS {:.1} MiB (idle {:.1}), {:.0} B per allocation; burrow {:.0} B per registered node ({:.1}x less)",
                c.allocations,
                c.secs,
                c.allocations as f64 / c.secs.max(1e-9),
                c.rss as f64 / (1024.0 * 1024.0),
                c.rss_idle as f64 / (1024.0 * 1024.0),
                c.per_allocation,
                ours,
                c.per_allocation / ours.max(1.0)
            );
        }
        Err(why) => println!("coturn: skipped ({why})"),
    }

    let json = json!({
        "bench": "relay_scale",
        "relay_bin": relay_bin().display().to_string(),
        "rlimit_nofile": nofile,
        "requested_steps": requested,
        "fd_limited": fd_limited,
        "idle_rss_bytes": rss_idle,
        "keepalive_window_secs": window.as_secs_f64(),
        "steps": rows.iter().map(|r| json!({
            "target": r.target,
            "registered": r.registered,
            "complete": r.complete,
            "secs": r.secs,
            "registrations_per_sec": r.reg_per_sec,
            "relay_rss_bytes": r.rss,
            "rss_per_node_bytes": r.rss_per_node,
            "rss_marginal_per_node_bytes": r.rss_marginal_per_node,
            "keepalive_interval_secs": r.keepalive_interval_secs,
            "keepalive_pings": r.pings,
            "keepalive_cpu_percent": r.keepalive_cpu_pct,
            "keepalive_cpu_us_per_ping": r.keepalive_cpu_us_per_ping,
            "failures": r.failures,
        })).collect::<Vec<_>>(),
        "coturn": match &coturn {
            Ok(c) => json!({
                "allocations": c.allocations,
                "secs": c.secs,
                "idle_rss_bytes": c.rss_idle,
                "rss_bytes": c.rss,
                "rss_per_allocation_bytes": c.per_allocation,
            }),
            Err(why) => json!({ "skipped": why }),
        },
    });
    let dir = target_dir().join("bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("relay_scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("write json");
    println!("wrote {}", path.display());
}

/// coturn's side of the scale comparison.
struct CoturnScale {
    allocations: usize,
    secs: f64,
    rss_idle: u64,
    rss: u64,
    per_allocation: f64,
}

/// Starts coturn and holds `max` (capped by BURROW_SCALE_COTURN_ALLOCS, default 5,000) TURN
/// allocations open, one client socket each; its RSS per allocation.
fn coturn_scale(max: usize) -> Result<CoturnScale, String> {
    if !turn::turnserver_installed() {
        return Err("turnserver not installed (Debian package coturn)".into());
    }
    let n = (env_num("BURROW_SCALE_COTURN_ALLOCS", 5_000) as usize).min(max);
    if n == 0 {
        return Err("no file descriptors to spare".into());
    }
    let coturn = turn::Coturn::start(u16::try_from(n + 100).unwrap_or(u16::MAX));
    let pid = coturn.pid().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_bytes(&pid);
    let mut sockets = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let src = source_addr(i);
        let sock = std::net::UdpSocket::bind(SocketAddr::new(src.ip(), 0))
            .map_err(|e| format!("client socket {i}: {e}"))?;
        if turn::allocate(&sock, coturn.addr, 0x0005_ca1e_0000 + i as u64).is_none() {
            return Err(format!(
                "allocation {i} refused or unanswered; log {}",
                coturn.log_path().display()
            ));
        }
        sockets.push(sock);
    }
    let secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_bytes(&pid);
    Ok(CoturnScale {
        allocations: n,
        secs,
        rss_idle,
        rss,
        per_allocation: rss.saturating_sub(rss_idle) as f64 / n as f64,
    })
}
