//! `burrow demo`: a relay and two nodes on 127.0.0.1 in one process. Shows the connection
//! coming up through the relay, data moving over it, the hole-punched direct path taking
//! over without the QUIC connection noticing, and a summary table. No setup, no root.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burrow::app::{BenchClient, BenchConfig, BenchSummary, ListenConfig, Listener};
use burrow::driver::node::{DriverConfig, NodeDriver};
use burrow::driver::relay::{RelayServerConfig, StopPipe};
use burrow::identity::Identity;
use burrow::node::{NodeConfig, NodeCore, NodeEvent, PathKind};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{ConnectionHandle, Event, Side, Transport, TransportConfig};
use burrow::wire::PeerId;
use clap::Args;

use super::describe_path;

/// `burrow demo` options.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seconds of data over the relay (the direct path is held back meanwhile).
    #[arg(long, default_value_t = 2)]
    relay_seconds: u32,
    /// Seconds of data over the direct path.
    #[arg(long, default_value_t = 3)]
    direct_seconds: u32,
}

/// Idle pings before each phase's data, for the RTT column (measured before the bulk
/// transfer so that queueing behind it does not count).
const PING_EVERY: Duration = Duration::from_millis(50);
/// How long each phase pings before moving data.
const PING_FOR: Duration = Duration::from_millis(500);
/// How long the direct path may take to appear once released.
const DIRECT_WAIT: Duration = Duration::from_secs(10);
/// Whole demo hang guard.
const DEMO_LIMIT: Duration = Duration::from_secs(120);

fn transport(identity: &Identity, max_segments: usize) -> Result<Transport, String> {
    let mut config = TransportConfig::default();
    rand::fill(&mut config.rng_seed);
    // GSO batches where the socket supports them.
    config.max_segments = max_segments;
    Transport::new(identity, config).map_err(|e| format!("QUIC/TLS setup: {e}"))
}

fn node(identity: Identity, relay: std::net::SocketAddr) -> Result<NodeDriver, String> {
    let config = NodeConfig::new(identity, relay);
    NodeDriver::new(
        config,
        DriverConfig {
            udp4: "127.0.0.1:0".parse().expect("valid literal"),
            udp6: None,
        },
    )
    .map_err(|e| format!("cannot open sockets: {e}"))
}

/// Node A: answers benchmarks; holds its direct path back until told.
struct DemoListener {
    listener: Listener,
    registered: Arc<AtomicBool>,
    direct_allowed: Arc<AtomicBool>,
    applied: bool,
}

impl Service for DemoListener {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        self.listener.handle_event(now, transport, &event);
        while self.listener.poll_report().is_some() {}
    }
    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        if let NodeEvent::Registered { .. } = event {
            self.registered.store(true, Ordering::Relaxed);
        }
    }
    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        let allowed = self.direct_allowed.load(Ordering::Relaxed);
        if allowed != self.applied {
            self.applied = allowed;
            core.set_direct_allowed(now, allowed);
        }
        self.listener.on_tick(now, transport);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.listener.poll_timeout()
    }
    fn is_done(&self) -> bool {
        false
    }
}

#[derive(Debug)]
struct PhaseResult {
    path: PathKind,
    rtts: Vec<Duration>,
    summary: BenchSummary,
}

enum Phase {
    Connecting,
    /// Idle pings on the current path; then the data of the relay (`false`) or direct
    /// (`true`) phase.
    Measure {
        until: Instant,
        direct: bool,
    },
    Relay(BenchClient),
    Switching(Instant),
    Direct(BenchClient),
    Done,
}

/// Node B: drives the story.
struct DemoClient {
    peer: PeerId,
    start: Instant,
    phase: Phase,
    conn: Option<ConnectionHandle>,
    path: Option<PathKind>,
    results: Vec<PhaseResult>,
    rtts: Vec<Duration>,
    next_ping: Option<Instant>,
    printed_samples: usize,
    peer_direct_allowed: Arc<AtomicBool>,
    peer_waker: Arc<mio::Waker>,
    path_changes: Vec<String>,
    connections: u32,
    error: Option<String>,
    linger_until: Option<Instant>,
    config: (u32, u32),
}

impl DemoClient {
    fn say(&self, now: Instant, msg: &str) {
        let t = now.saturating_duration_since(self.start).as_secs_f64();
        println!("[{t:7.3} s] {msg}");
    }

    fn start_bench(
        &mut self,
        now: Instant,
        transport: &mut Transport,
        seconds: u32,
    ) -> BenchClient {
        let conn = self.conn.expect("connected before a phase starts");
        let mut client = BenchClient::new(
            BenchConfig {
                seconds,
                reverse: false,
                streams: 1,
                datagram_rate: None,
            },
            conn,
        );
        client.on_tick(now, transport);
        self.printed_samples = 0;
        self.next_ping = None;
        client
    }

    fn finish_phase(&mut self, now: Instant, client: &BenchClient) {
        let summary = client.summary();
        let path = self.path.unwrap_or(PathKind::RelayUdp);
        self.say(
            now,
            &format!(
                "{}: {:.0} MB in {:.2} s = {:.0} MB/s",
                path.name(),
                summary.bytes as f64 / 1e6,
                summary.elapsed.as_secs_f64(),
                summary.megabytes_per_second()
            ),
        );
        if !summary.errors.is_empty() {
            self.error = Some(format!("benchmark stream failed: {:?}", summary.errors));
        }
        self.results.push(PhaseResult {
            path,
            rtts: std::mem::take(&mut self.rtts),
            summary,
        });
    }

    fn print_samples(&mut self, client: &BenchClient) {
        let label = self.path.map(|p| p.name()).unwrap_or("?");
        for s in &client.samples()[self.printed_samples..] {
            println!(
                "            {label:<9} {:4.1}-{:4.1} s  {:7.1} MB/s",
                s.start.as_secs_f64(),
                (s.start + s.length).as_secs_f64(),
                s.megabytes_per_second()
            );
        }
        self.printed_samples = client.samples().len();
    }
}

impl Service for DemoClient {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        match &event {
            Event::Connected {
                conn,
                side: Side::Client,
                ..
            } => {
                self.connections += 1;
                self.conn = Some(*conn);
                self.say(
                    now,
                    &format!(
                        "QUIC connected {} (TLS 1.3, both peer keys verified)",
                        self.path.map(|p| describe_path(&p)).unwrap_or_default()
                    ),
                );
                self.next_ping = Some(now);
                self.rtts.clear();
                self.phase = Phase::Measure {
                    until: now + PING_FOR,
                    direct: false,
                };
                return;
            }
            Event::ConnectionLost { reason, .. } if !matches!(self.phase, Phase::Done) => {
                self.error = Some(format!("QUIC connection lost: {reason}"));
            }
            _ => {}
        }
        match &mut self.phase {
            Phase::Relay(c) | Phase::Direct(c) => {
                c.handle_event(now, transport, &event);
            }
            _ => {}
        }
    }

    fn on_node_event(&mut self, now: Instant, core: &mut NodeCore, event: &NodeEvent) {
        match event {
            NodeEvent::Registered { .. } => self.say(now, "B registered with the relay"),
            NodeEvent::Introduced { peer, .. } if *peer == self.peer => {
                self.path = core.path(now, peer);
                self.say(
                    now,
                    &format!(
                        "relay introduced B to A: {}",
                        self.path.map(|p| describe_path(&p)).unwrap_or_default()
                    ),
                );
            }
            NodeEvent::PathChanged { peer, path } if *peer == self.peer => {
                let from = self.path.map(|p| p.name()).unwrap_or("none");
                self.path_changes.push(format!("{from} → {}", path.name()));
                self.path = Some(*path);
                self.say(now, &format!("path: {}", describe_path(path)));
            }
            NodeEvent::Pong { peer, rtt, .. }
                if *peer == self.peer && matches!(self.phase, Phase::Measure { .. }) =>
            {
                self.rtts.push(*rtt)
            }
            NodeEvent::ConnectFailed { message, .. } => {
                self.error = Some(format!("connect failed: {message}"))
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        if now.saturating_duration_since(self.start) > DEMO_LIMIT && self.error.is_none() {
            self.error = Some("the demo did not finish in time".into());
        }
        if self.next_ping.is_some_and(|t| t <= now) {
            let _ = core.ping(now, &self.peer);
            self.next_ping = Some(now + PING_EVERY);
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        self.phase = match phase {
            Phase::Measure { until, direct } if now >= until => {
                let (seconds, what) = if direct {
                    (self.config.1, "the direct path, same QUIC connection")
                } else {
                    (self.config.0, "the relay (direct path held back)")
                };
                self.say(
                    now,
                    &format!(
                        "phase {}: {seconds} s of data over {what}",
                        if direct { 2 } else { 1 }
                    ),
                );
                let c = self.start_bench(now, transport, seconds);
                if direct {
                    Phase::Direct(c)
                } else {
                    Phase::Relay(c)
                }
            }
            Phase::Relay(mut c) => {
                c.on_tick(now, transport);
                self.print_samples(&c);
                if c.is_done() {
                    self.finish_phase(now, &c);
                    self.say(
                        now,
                        "releasing the direct path (punched underneath meanwhile)",
                    );
                    self.peer_direct_allowed.store(true, Ordering::Relaxed);
                    let _ = self.peer_waker.wake();
                    core.set_direct_allowed(now, true);
                    self.next_ping = None;
                    Phase::Switching(now)
                } else {
                    Phase::Relay(c)
                }
            }
            Phase::Switching(since) => {
                if matches!(self.path, Some(PathKind::Direct(_))) {
                    self.next_ping = Some(now);
                    self.rtts.clear();
                    Phase::Measure {
                        until: now + PING_FOR,
                        direct: true,
                    }
                } else if now >= since + DIRECT_WAIT {
                    self.say(now, "no direct path appeared; the data stays on the relay");
                    Phase::Done
                } else {
                    Phase::Switching(since)
                }
            }
            Phase::Direct(mut c) => {
                c.on_tick(now, transport);
                self.print_samples(&c);
                if c.is_done() {
                    self.finish_phase(now, &c);
                    Phase::Done
                } else {
                    Phase::Direct(c)
                }
            }
            other => other,
        };
        if self.linger_until.is_none()
            && (matches!(self.phase, Phase::Done) || self.error.is_some())
        {
            self.linger_until = Some(now + Duration::from_millis(200));
            self.next_ping = None;
            if let Some(conn) = self.conn {
                let _ = transport.close(now, conn, 0, b"demo done");
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let bench = match &self.phase {
            Phase::Relay(c) | Phase::Direct(c) => c.poll_timeout(),
            Phase::Measure { until, .. } => Some(*until),
            Phase::Switching(since) => Some(*since + DIRECT_WAIT),
            _ => None,
        };
        [bench, self.next_ping, self.linger_until]
            .into_iter()
            .flatten()
            .min()
    }

    fn is_done(&self) -> bool {
        self.linger_until.is_some_and(|t| Instant::now() >= t)
    }
}

fn mean(v: &[Duration]) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    Some(v.iter().sum::<Duration>() / v.len() as u32)
}

pub fn run(args: DemoArgs) -> Result<ExitCode, String> {
    // The relay, in this process, on a free loopback port.
    let stop = StopPipe::new().map_err(|e| format!("relay setup: {e}"))?;
    let relay_stop = stop.handle().map_err(|e| format!("relay setup: {e}"))?;
    // The server holds raw recvmmsg buffers (not Send): bind it on its own thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let relay_thread = std::thread::spawn(move || {
        let mut config = RelayServerConfig::new("127.0.0.1:0".parse().expect("valid literal"));
        // A public relay caps each node's relayed bandwidth (2 MB/s by default); the demo
        // shows what the relay path itself can carry.
        config.limits.relay_bytes_per_sec = 10_000_000_000;
        config.limits.relay_burst_bytes = 64 << 20;
        match burrow::driver::relay::bind(config, stop) {
            Ok(server) => {
                let _ = tx.send(Ok(server.local_addr()));
                server.run()
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                Ok(())
            }
        }
    });
    let relay = rx
        .recv()
        .map_err(|_| "the relay thread died".to_string())?
        .map_err(|e| format!("cannot start the relay: {e}"))?;

    let (id_a, id_b) = (Identity::generate(), Identity::generate());
    let (peer_a, peer_b) = (id_a.peer_id(), id_b.peer_id());
    println!("burrow demo: a relay and two nodes on 127.0.0.1, in this process");
    println!("  relay   {relay}  (STUN, rendezvous, UDP/TCP relaying; bandwidth cap off)");
    println!("  node A  {peer_a}  (listening)");
    println!("  node B  {peer_b}  (connects to A)");

    // Node A on its own thread.
    let mut a = node(id_a.clone(), relay)?;
    let a_transport = transport(&id_a, a.max_gso_segments())?;
    let a_direct = Arc::new(AtomicBool::new(false));
    let (a_stop, a_waker) = a.stop_handle();
    let a_registered = Arc::new(AtomicBool::new(false));
    let a_service = DemoListener {
        registered: a_registered.clone(),
        listener: Listener::new(ListenConfig {
            bench: true,
            ..ListenConfig::default()
        }),
        direct_allowed: a_direct.clone(),
        applied: true,
    };
    let a_thread = std::thread::spawn(move || {
        let mut plane = DataPlane::new(a_transport, a_service);
        a.run(&mut plane, None)
    });

    // Node B here, once A is registered (else the relay has nobody to introduce).
    let wait_until = Instant::now() + Duration::from_secs(10);
    while !a_registered.load(Ordering::Relaxed) {
        if Instant::now() >= wait_until {
            return Err("node A did not register with the in-process relay".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut b = node(id_b.clone(), relay)?;
    let now = Instant::now();
    b.core().set_direct_allowed(now, false);
    let client = DemoClient {
        peer: peer_a,
        start: now,
        phase: Phase::Connecting,
        conn: None,
        path: None,
        results: Vec::new(),
        rtts: Vec::new(),
        next_ping: None,
        printed_samples: 0,
        peer_direct_allowed: a_direct,
        peer_waker: a_waker.clone(),
        path_changes: Vec::new(),
        connections: 0,
        error: None,
        linger_until: None,
        config: (args.relay_seconds.max(1), args.direct_seconds.max(1)),
    };
    let mut plane = DataPlane::new(transport(&id_b, b.max_gso_segments())?, client);
    plane.connect(now, b.core(), peer_a);
    let result = b.run(&mut plane, Some(now + DEMO_LIMIT + Duration::from_secs(5)));

    // Stop A and the relay.
    a_stop.store(true, Ordering::Relaxed);
    let _ = a_waker.wake();
    relay_stop.stop();
    let _ = a_thread.join();
    let _ = relay_thread.join();
    result.map_err(|e| format!("network error: {e}"))?;

    let demo = plane.service_mut();
    if let Some(e) = demo.error.take() {
        return Err(e);
    }
    println!();
    println!(
        "  {:<28} {:>10} {:>12} {:>10}",
        "path", "rtt", "throughput", "moved"
    );
    for r in &demo.results {
        println!(
            "  {:<28} {:>10} {:>12} {:>10}",
            describe_path(&r.path),
            mean(&r.rtts)
                .map(super::fmt_rtt)
                .unwrap_or_else(|| "-".into()),
            format!("{:.0} MB/s", r.summary.megabytes_per_second()),
            format!("{:.0} MB", r.summary.bytes as f64 / 1e6),
        );
    }
    println!();
    println!(
        "  one QUIC connection throughout ({} handshake), path changes: {}",
        demo.connections,
        if demo.path_changes.is_empty() {
            "none".to_string()
        } else {
            demo.path_changes.join(", ")
        }
    );
    let _ = peer_b;
    if demo.results.len() == 2 {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
