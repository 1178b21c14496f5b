//! `burrow pipe PEER`: stdin → peer, peer → stdout, over one QUIC stream (netcat over P2P).
//! The other end is `burrow listen --pipe`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::app::Pipe;
use burrow::node::{NodeCore, NodeEvent};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{Event, Transport};
use clap::Args;

use super::dial::Dial;
use super::stdio::{StdinReader, StdoutWriter, pump_pipe};
use super::{NodeArgs, describe_path, parse_peer};

/// `burrow pipe` options.
#[derive(Args, Debug)]
pub struct PipeArgs {
    /// The peer running `burrow listen --pipe`.
    peer: String,
    #[command(flatten)]
    node: NodeArgs,
    /// Give up if the peer cannot be reached within this many seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    /// Report the path and byte counts on stderr.
    #[arg(long, short)]
    verbose: bool,
}

struct PipeService {
    dial: Dial,
    pipe: Option<Pipe>,
    stdin: Option<StdinReader>,
    stdout: StdoutWriter,
    verbose: bool,
}

impl Service for PipeService {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        if let Some(conn) = self.dial.connected(&event) {
            self.pipe = Some(Pipe::open(transport, conn));
        } else if let Some(pipe) = self.pipe.as_mut() {
            pipe.handle_event(now, transport, &event);
        }
        if let Some(pipe) = self.pipe.as_mut() {
            pump_pipe(pipe, transport, &mut self.stdin, &mut self.stdout);
        }
    }

    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        if let Some(path) = self.dial.on_node_event(event)
            && self.verbose
        {
            eprintln!("path: {}", describe_path(&path));
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        if let Some(pipe) = self.pipe.as_mut() {
            pipe.on_tick(now, transport);
            pump_pipe(pipe, transport, &mut self.stdin, &mut self.stdout);
        }
        let finished = self.pipe.as_ref().is_some_and(|p| p.is_done());
        self.dial.tick(now, core, transport, finished);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let pipe = self.pipe.as_ref().and_then(|p| p.poll_timeout());
        [pipe, self.dial.poll_timeout()].into_iter().flatten().min()
    }

    fn is_done(&self) -> bool {
        self.dial.is_done()
    }
}

pub fn run(args: PipeArgs) -> Result<ExitCode, String> {
    let peer = parse_peer(&args.peer)?;
    let (mut driver, transport) = args.node.build_with_transport()?;
    if driver.core().peer_id() == peer {
        return Err("that is this node's own ID".into());
    }
    let (_, waker) = driver.stop_handle();
    let service = PipeService {
        dial: Dial::new(
            peer,
            Duration::from_secs(args.connect_timeout),
            "burrow listen --pipe",
        ),
        pipe: None,
        stdin: Some(StdinReader::start(waker)),
        stdout: StdoutWriter::start(),
        verbose: args.verbose,
    };
    let mut plane = DataPlane::new(transport, service);
    plane.connect(Instant::now(), driver.core(), peer);
    driver
        .run(&mut plane, None)
        .map_err(|e| format!("network error: {e}"))?;
    let service = plane.service_mut();
    if let Some(pipe) = service.pipe.as_mut() {
        while let Some(chunk) = pipe.poll_output() {
            service.stdout.send_blocking(chunk);
        }
    }
    let outcome = service.pipe.as_ref().and_then(|p| p.outcome());
    let error = service.dial.error.take();
    let stdout = std::mem::replace(&mut service.stdout, StdoutWriter::start());
    stdout
        .finish()
        .map_err(|e| format!("writing stdout: {e}"))?;
    if let Some(e) = error {
        return Err(e);
    }
    match outcome {
        Some(Ok(stats)) => {
            if args.verbose {
                eprintln!(
                    "pipe closed ({} bytes sent, {} bytes received)",
                    stats.bytes_sent, stats.bytes_received
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Err(e)) => Err(format!("pipe failed: {e}")),
        None => Err("pipe ended before it was established".into()),
    }
}
