//! `burrow bench PEER`: iperf3-like throughput over the P2P path to a `burrow listen` peer.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::app::{BenchClient, BenchConfig, BenchSummary};
use burrow::node::{NodeCore, NodeEvent, PathKind};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{Event, Transport};
use clap::Args;

use super::dial::Dial;
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

pub(crate) struct BenchService {
    dial: Dial,
    config: BenchConfig,
    client: Option<BenchClient>,
    wait_direct_until: Option<Instant>,
    printed: usize,
    json: bool,
}

impl BenchService {
    fn maybe_start(&mut self, now: Instant, transport: &mut Transport) {
        let (Some(conn), None) = (self.dial.conn, self.client.as_ref()) else {
            return;
        };
        let direct = matches!(self.dial.path, Some(PathKind::Direct(_)));
        if !direct && self.wait_direct_until.is_some_and(|t| now < t) {
            return;
        }
        let mut client = BenchClient::new(self.config, conn);
        client.on_tick(now, transport);
        self.client = Some(client);
        if !self.json {
            println!(
                "benchmarking {} for {} s, {} stream(s), {} ({})",
                self.dial.peer.short(),
                self.config.seconds,
                self.config.streams,
                if self.config.reverse {
                    "peer sends"
                } else {
                    "we send"
                },
                self.dial
                    .path
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
        if self.dial.connected(&event).is_some() {
            self.maybe_start(now, transport);
        } else if let Some(c) = self.client.as_mut() {
            c.handle_event(now, transport, &event);
        }
    }

    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        if let Some(path) = self.dial.on_node_event(event)
            && self.client.is_some()
            && !self.json
        {
            println!("path: {}", describe_path(&path));
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        self.maybe_start(now, transport);
        if let Some(c) = self.client.as_mut() {
            c.on_tick(now, transport);
        }
        self.print_samples();
        let finished = self.client.as_ref().is_some_and(|c| c.is_done());
        self.dial.tick(now, core, transport, finished);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let client = self.client.as_ref().and_then(|c| c.poll_timeout());
        [client, self.dial.poll_timeout(), self.wait_direct_until]
            .into_iter()
            .flatten()
            .min()
    }

    fn is_done(&self) -> bool {
        self.dial.is_done()
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
        dial: Dial::new(
            peer,
            Duration::from_secs(args.connect_timeout),
            "burrow listen",
        ),
        config: BenchConfig {
            seconds: args.seconds.max(1),
            reverse: args.reverse,
            streams: args.streams.max(1),
            datagram_rate: args.datagram.map(|mbit| mbit.max(1) * 1_000_000 / 8),
        },
        client: None,
        wait_direct_until: (args.wait_direct > 0)
            .then(|| now + Duration::from_secs(args.wait_direct)),
        printed: 0,
        json: args.json,
    };
    let mut plane = DataPlane::new(transport, service);
    plane.connect(now, driver.core(), peer);
    driver
        .run(&mut plane, None)
        .map_err(|e| format!("network error: {e}"))?;
    let service = plane.service_mut();
    if let Some(e) = service.dial.error.take() {
        return Err(e);
    }
    let Some(client) = &service.client else {
        return Err("the benchmark never started".into());
    };
    let summary = client.summary();
    print_summary(&summary, service.dial.path, args.json);
    if summary.errors.is_empty() && summary.bytes > 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
