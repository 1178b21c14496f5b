//! `burrow bench PEER`: iperf3-like throughput over the P2P path to a `burrow listen` peer.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::app::{BenchClient, BenchConfig, BenchSummary};
use burrow::node::{NodeCore, NodeEvent, PathKind};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{ConnectionHandle, Event, Side, Transport};
use burrow::wire::PeerId;
use clap::Args;

use super::{NodeArgs, describe_path, parse_peer};

/// `burrow bench` options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The peer running `burrow listen`.
    peer: String,
    #[command(flatten)]
    node: NodeArgs,
    /// How long to send.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// The peer sends, we receive.
    #[arg(long)]
    reverse: bool,
    /// Parallel streams.
    #[arg(long, default_value_t = 1)]
    streams: u16,
    /// One JSON object with the samples and summary.
    #[arg(long)]
    json: bool,
    /// Unreliable QUIC datagrams instead of a stream, at this rate in Mbit/s; reports loss.
    #[arg(long, value_name = "MBIT_PER_S")]
    datagram: Option<u64>,
    /// Wait for a direct path (up to this many seconds) before measuring.
    #[arg(long, default_value_t = 0)]
    wait_direct: u64,
    /// Give up if the peer cannot be reached within this many seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
}

const LINGER: Duration = Duration::from_millis(200);

pub(crate) struct BenchService {
    peer: PeerId,
    config: BenchConfig,
    conn: Option<ConnectionHandle>,
    client: Option<BenchClient>,
    path: Option<PathKind>,
    wait_direct_until: Option<Instant>,
    error: Option<String>,
    printed: usize,
    json: bool,
    connect_deadline: Instant,
    linger_until: Option<Instant>,
}

impl BenchService {
    fn maybe_start(&mut self, now: Instant, transport: &mut Transport) {
        let (Some(conn), None) = (self.conn, self.client.as_ref()) else {
            return;
        };
        let direct = matches!(self.path, Some(PathKind::Direct(_)));
        if !direct && self.wait_direct_until.is_some_and(|t| now < t) {
            return;
        }
        let mut client = BenchClient::new(self.config, conn);
        client.on_tick(now, transport);
        self.client = Some(client);
        if !self.json {
            println!(
                "benchmarking {} for {} s, {} stream(s), {} ({})",
                self.peer.short(),
                self.config.seconds,
                self.config.streams,
                if self.config.reverse {
                    "peer sends"
                } else {
                    "we send"
                },
                self.path
                    .map(|p| describe_path(&p))
                    .unwrap_or_else(|| "path unknown".into())
            );
        }
    }

    fn print_samples(&mut self) {
        let Some(client) = &self.client else {
            return;
        };
        if self.json {
            return;
        }
        for s in &client.samples()[self.printed..] {
            println!(
                "{:>5.1}-{:<5.1} s  {:>8.1} MB  {:>8.1} MB/s",
                s.start.as_secs_f64(),
                (s.start + s.length).as_secs_f64(),
                s.bytes as f64 / 1e6,
                s.megabytes_per_second()
            );
        }
        self.printed = client.samples().len();
    }
}

impl Service for BenchService {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        match &event {
            Event::Connected { conn, peer, side }
                if *peer == self.peer && *side == Side::Client =>
            {
                self.conn.get_or_insert(*conn);
                self.maybe_start(now, transport);
                return;
            }
            Event::ConnectionLost { peer, reason, .. }
                if *peer == self.peer && self.client.is_none() =>
            {
                self.error = Some(format!("cannot connect to {peer}: {reason}"));
            }
            _ => {}
        }
        if let Some(c) = self.client.as_mut() {
            c.handle_event(now, transport, &event);
        }
    }

    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        match event {
            NodeEvent::PathChanged { peer, path } if *peer == self.peer => {
                self.path = Some(*path);
                if self.client.is_some() && !self.json {
                    println!("path: {}", describe_path(path));
                }
            }
            NodeEvent::ConnectFailed { peer, message, .. } if *peer == self.peer => {
                self.error = Some(format!("cannot reach {peer}: {message}"));
            }
            NodeEvent::RelayError { code, message } => {
                self.error = Some(format!("relay refused us: {code:?}: {message}"));
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        if self.path.is_none() {
            self.path = core.path(now, &self.peer);
        }
        self.maybe_start(now, transport);
        if let Some(c) = self.client.as_mut() {
            c.on_tick(now, transport);
        }
        self.print_samples();
        if self.conn.is_none() && now >= self.connect_deadline && self.error.is_none() {
            self.error = Some(format!(
                "no connection to {} (is it running `burrow listen`?)",
                self.peer
            ));
        }
        let finished = self.client.as_ref().is_some_and(|c| c.is_done());
        if self.linger_until.is_none() && (finished || self.error.is_some()) {
            self.linger_until = Some(now + LINGER);
            if let Some(conn) = self.conn {
                let _ = transport.close(now, conn, 0, b"done");
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let mut t = vec![self.linger_until, self.wait_direct_until];
        if let Some(c) = &self.client {
            t.push(c.poll_timeout());
        }
        if self.conn.is_none() {
            t.push(Some(self.connect_deadline));
        }
        t.into_iter().flatten().min()
    }

    fn is_done(&self) -> bool {
        self.linger_until.is_some_and(|t| Instant::now() >= t)
    }
}

fn print_summary(s: &BenchSummary, path: Option<PathKind>, json: bool) {
    if json {
        let v = serde_json::json!({
            "bytes": s.bytes,
            "seconds": s.elapsed.as_secs_f64(),
            "mb_per_s": s.megabytes_per_second(),
            "path": path.map(|p| p.name()),
            "samples": s.samples.iter().map(|x| serde_json::json!({
                "start": x.start.as_secs_f64(), "seconds": x.length.as_secs_f64(), "bytes": x.bytes,
            })).collect::<Vec<_>>(),
            "errors": s.errors,
            "datagrams": s.datagrams.as_ref().map(|d| serde_json::json!({
                "sent": d.sent, "received": d.received, "lost": d.lost,
            })),
        });
        println!("{v}");
    } else {
        println!(
            "summary: {:.1} MB in {:.2} s = {:.1} MB/s ({:.0} Mbit/s), {}",
            s.bytes as f64 / 1e6,
            s.elapsed.as_secs_f64(),
            s.megabytes_per_second(),
            s.megabytes_per_second() * 8.0,
            path.map(|p| describe_path(&p))
                .unwrap_or_else(|| "path unknown".into())
        );
        if let Some(d) = &s.datagrams {
            println!(
                "datagrams: {} sent, {} received, {} lost ({:.2} %)",
                d.sent,
                d.received,
                d.lost,
                if d.sent > 0 {
                    d.lost as f64 * 100.0 / d.sent as f64
                } else {
                    0.0
                }
            );
        }
        for e in &s.errors {
            eprintln!("stream error: {e}");
        }
    }
}

pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let peer = parse_peer(&args.peer)?;
    let (mut driver, transport) = args.node.build_with_transport()?;
    if driver.core().peer_id() == peer {
        return Err("that is this node's own ID".into());
    }
    let now = Instant::now();
    let service = BenchService {
        peer,
        config: BenchConfig {
            seconds: args.seconds.max(1),
            reverse: args.reverse,
            streams: args.streams.max(1),
            datagram_rate: args.datagram.map(|mbit| mbit.max(1) * 1_000_000 / 8),
        },
        conn: None,
        client: None,
        path: None,
        wait_direct_until: (args.wait_direct > 0)
            .then(|| now + Duration::from_secs(args.wait_direct)),
        error: None,
        printed: 0,
        json: args.json,
        connect_deadline: now + Duration::from_secs(args.connect_timeout),
        linger_until: None,
    };
    let mut plane = DataPlane::new(transport, service);
    plane.connect(now, driver.core(), peer);
    driver
        .run(&mut plane, None)
        .map_err(|e| format!("network error: {e}"))?;
    let service = plane.service_mut();
    if let Some(e) = service.error.take() {
        return Err(e);
    }
    let Some(client) = &service.client else {
        return Err("the benchmark never started".into());
    };
    let summary = client.summary();
    print_summary(&summary, service.path, args.json);
    if summary.errors.is_empty() && summary.bytes > 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
