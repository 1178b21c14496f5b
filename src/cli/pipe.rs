//! `burrow pipe PEER`: stdin → peer, peer → stdout, over one QUIC stream (netcat over P2P).
//! The other end is `burrow listen --pipe`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::app::Pipe;
use burrow::node::{NodeCore, NodeEvent};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{ConnectionHandle, Event, Side, Transport};
use burrow::wire::PeerId;
use clap::Args;

use super::stdio::{Input, StdinReader, StdoutWriter};
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

const LINGER: Duration = Duration::from_millis(200);

struct PipeService {
    peer: PeerId,
    conn: Option<ConnectionHandle>,
    pipe: Option<Pipe>,
    stdin: Option<StdinReader>,
    stdout: StdoutWriter,
    error: Option<String>,
    verbose: bool,
    connect_deadline: Instant,
    linger_until: Option<Instant>,
}

impl PipeService {
    fn pump(&mut self, transport: &mut Transport) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        if let Some(stdin) = self.stdin.as_mut() {
            loop {
                match stdin.next() {
                    Input::Data(d) => {
                        let n = pipe.push_input(transport, d);
                        if n == 0 {
                            break;
                        }
                        stdin.consumed(n);
                    }
                    Input::Eof => {
                        pipe.input_eof(transport);
                        self.stdin = None;
                        break;
                    }
                    Input::Empty => break,
                }
            }
        }
        while self.stdout.ready() {
            let Some(chunk) = pipe.poll_output() else {
                break;
            };
            if !self.stdout.offer(chunk) {
                break;
            }
        }
    }
}

impl Service for PipeService {
    fn on_transport_event(&mut self, _now: Instant, transport: &mut Transport, event: Event) {
        match &event {
            Event::Connected { conn, peer, side }
                if *peer == self.peer && *side == Side::Client =>
            {
                if self.conn.is_none() {
                    self.conn = Some(*conn);
                    self.pipe = Some(Pipe::open(transport, *conn));
                }
                return;
            }
            Event::ConnectionLost { peer, reason, .. }
                if *peer == self.peer && self.pipe.is_none() =>
            {
                self.error = Some(format!("cannot connect to {peer}: {reason}"));
            }
            _ => {}
        }
        if let Some(pipe) = self.pipe.as_mut() {
            pipe.handle_event(_now, transport, &event);
        }
        self.pump(transport);
    }

    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        match event {
            NodeEvent::PathChanged { peer, path } if *peer == self.peer && self.verbose => {
                eprintln!("path: {}", describe_path(path));
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

    fn on_tick(&mut self, now: Instant, _core: &mut NodeCore, transport: &mut Transport) {
        if let Some(pipe) = self.pipe.as_mut() {
            pipe.on_tick(now, transport);
        }
        self.pump(transport);
        if self.conn.is_none() && now >= self.connect_deadline && self.error.is_none() {
            self.error = Some(format!(
                "no connection to {} (is it running `burrow listen --pipe`?)",
                self.peer
            ));
        }
        let finished = self.pipe.as_ref().is_some_and(|p| p.is_done());
        if self.linger_until.is_none() && (finished || self.error.is_some()) {
            self.linger_until = Some(now + LINGER);
            if let Some(conn) = self.conn {
                let _ = transport.close(now, conn, 0, b"done");
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let mut t = vec![self.linger_until];
        if let Some(p) = &self.pipe {
            t.push(p.poll_timeout());
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

pub fn run(args: PipeArgs) -> Result<ExitCode, String> {
    let peer = parse_peer(&args.peer)?;
    let (mut driver, transport) = args.node.build_with_transport()?;
    if driver.core().peer_id() == peer {
        return Err("that is this node's own ID".into());
    }
    let (_, waker) = driver.stop_handle();
    let service = PipeService {
        peer,
        conn: None,
        pipe: None,
        stdin: Some(StdinReader::start(waker)),
        stdout: StdoutWriter::start(),
        error: None,
        verbose: args.verbose,
        connect_deadline: Instant::now() + Duration::from_secs(args.connect_timeout),
        linger_until: None,
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
    let error = service.error.take();
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
