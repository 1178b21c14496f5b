//! `burrow listen`: a node that stays up, answers pings, and serves files (`--out DIR`),
//! one pipe (`--pipe`) and benchmarks to the peers that connect (optionally only `--allow`ed
//! ones).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burrow::app::{FileReport, ListenConfig, ListenReport, Listener};
use burrow::node::{NodeCore, NodeEvent};
use burrow::plane::{DataPlane, Service};
use burrow::portmap::PortMapStatus;
use burrow::transport::{Event, Transport};
use burrow::wire::PeerId;
use clap::Args;

use super::stdio::{StdinReader, StdoutWriter, pump_pipe};
use super::{NodeArgs, describe_path, parse_allow};

/// `burrow listen` options.
#[derive(Args, Debug)]
pub struct ListenArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Accept files into this directory (created if missing).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace existing files of the same name.
    #[arg(long)]
    overwrite: bool,
    /// Accept one pipe: connect it to stdin/stdout and exit when it ends. The peer ID then
    /// goes to stderr, so stdout carries only the pipe's bytes.
    #[arg(long)]
    pipe: bool,
    /// Only these peers may connect (repeatable); default: anyone who knows our ID.
    #[arg(long = "allow")]
    allow: Vec<String>,
}

pub(crate) struct ListenService {
    listener: Listener,
    allow: Vec<PeerId>,
    pipe_mode: bool,
    stdin: Option<StdinReader>,
    stdout: Option<StdoutWriter>,
    pipe_done: bool,
    pipe_failed: Option<String>,
    /// `--pipe`: once the pipe ended, the connection is closed and we linger until this
    /// instant so the close (and the ACK of the peer's FIN) reaches the peer.
    linger_until: Option<Instant>,
}

/// How long `listen --pipe` keeps running after closing the pipe's connection.
const LINGER: std::time::Duration = std::time::Duration::from_millis(200);

impl ListenService {
    fn report(&mut self, r: ListenReport) {
        match r {
            ListenReport::File(FileReport::Received {
                peer,
                path,
                size,
                resumed_from,
            }) => {
                let resumed = if resumed_from > 0 {
                    format!(", resumed from {resumed_from} bytes")
                } else {
                    String::new()
                };
                eprintln!(
                    "received {path} ({size} bytes, BLAKE3 verified{resumed}) from {}",
                    peer.short()
                );
            }
            ListenReport::File(other) => eprintln!("file: {other:?}"),
            ListenReport::PipeOpened { peer } => eprintln!("pipe opened by {}", peer.short()),
            ListenReport::PipeEnded(result) => {
                self.pipe_done = true;
                match result {
                    Ok(stats) => eprintln!(
                        "pipe closed ({} bytes in, {} bytes out)",
                        stats.bytes_received, stats.bytes_sent
                    ),
                    Err(e) => {
                        eprintln!("pipe failed: {e}");
                        self.pipe_failed = Some(e.to_string());
                    }
                }
            }
            ListenReport::Bench(b) => eprintln!(
                "bench: {} {:.1} MB in {:.2} s ({:.1} MB/s)",
                if b.reverse { "sent" } else { "received" },
                b.bytes as f64 / 1e6,
                b.elapsed.as_secs_f64(),
                b.bytes as f64 / b.elapsed.as_secs_f64().max(1e-9) / 1e6
            ),
            ListenReport::Refused { peer, reason } => eprintln!(
                "refused a stream from {}: {reason:?}",
                peer.map(|p| p.short()).unwrap_or_else(|| "?".into())
            ),
        }
    }

    fn pump_pipe(&mut self, transport: &mut Transport) {
        if let (Some(pipe), Some(out)) = (self.listener.pipe_mut(), self.stdout.as_mut()) {
            pump_pipe(pipe, transport, &mut self.stdin, out);
        }
    }
}

impl Service for ListenService {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        if let Event::Connected { conn, peer, .. } = &event {
            if !self.allow.is_empty() && !self.allow.contains(peer) {
                eprintln!("refused {peer}: not in --allow");
                let _ = transport.close(now, *conn, 2, b"not allowed");
                return;
            }
            eprintln!("connection from {peer}");
        }
        if let Event::ConnectionLost { peer, reason, .. } = &event {
            eprintln!("connection with {} ended: {reason}", peer.short());
        }
        self.listener.handle_event(now, transport, &event);
        while let Some(r) = self.listener.poll_report() {
            self.report(r);
        }
    }

    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        match event {
            NodeEvent::Registered { observed_tcp } => {
                eprintln!("registered with the relay (seen as {observed_tcp})")
            }
            NodeEvent::RelayLost => eprintln!("relay connection lost; reconnecting"),
            NodeEvent::RelayError { code, message } => {
                eprintln!("relay refused us: {code:?}: {message}")
            }
            NodeEvent::Introduced { peer, .. } => eprintln!("peer {peer} introduced"),
            NodeEvent::PathChanged { peer, path } => {
                eprintln!("peer {} path: {}", peer.short(), describe_path(path))
            }
            NodeEvent::PeerGone { peer } => eprintln!("peer {} left", peer.short()),
            NodeEvent::PortMapping(status) if *status != PortMapStatus::Probing => {
                eprintln!("port mapping: {}", super::netcheck::portmap_line(status))
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, _core: &mut NodeCore, transport: &mut Transport) {
        self.listener.on_tick(now, transport);
        if self.pipe_mode {
            self.pump_pipe(transport);
        }
        while let Some(r) = self.listener.poll_report() {
            self.report(r);
        }
        if self.pipe_mode && self.pipe_done && self.linger_until.is_none() {
            self.linger_until = Some(now + LINGER);
            if let Some(pipe) = self.listener.pipe_mut() {
                let (conn, _) = pipe.stream();
                let _ = transport.close(now, conn, 0, b"done");
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [self.listener.poll_timeout(), self.linger_until]
            .into_iter()
            .flatten()
            .min()
    }

    fn is_done(&self) -> bool {
        self.pipe_mode && self.linger_until.is_some_and(|t| Instant::now() >= t)
    }
}

pub fn run(args: ListenArgs) -> Result<ExitCode, String> {
    let allow = parse_allow(&args.allow)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create --out directory {}: {e}", dir.display()))?;
    }
    let (mut driver, transport) = args.node.build_with_transport()?;
    // The first line is the peer ID, so scripts can read it (stderr in pipe mode, where
    // stdout belongs to the pipe's bytes).
    let id = driver.core().peer_id();
    if args.pipe {
        eprintln!("{id}");
    } else {
        println!("{id}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let (stdin, stdout) = if args.pipe {
        let (_, waker) = driver.stop_handle();
        (Some(StdinReader::start(waker)), Some(StdoutWriter::start()))
    } else {
        (None, None)
    };
    let service = ListenService {
        listener: Listener::new(ListenConfig {
            out_dir: args.out.clone(),
            overwrite: args.overwrite,
            pipe: args.pipe,
            bench: true,
        }),
        allow,
        pipe_mode: args.pipe,
        stdin,
        stdout,
        pipe_done: false,
        linger_until: None,
        pipe_failed: None,
    };
    let mut plane = DataPlane::new(transport, service);
    driver
        .run(&mut plane, None)
        .map_err(|e| format!("network error: {e}"))?;
    let service = plane.service_mut();
    if let Some(mut out) = service.stdout.take() {
        // Hand over what the pipe still holds, then flush.
        if let Some(pipe) = service.listener.pipe_mut() {
            while let Some(chunk) = pipe.poll_output() {
                out.send_blocking(chunk);
            }
        }
        out.finish().map_err(|e| format!("writing stdout: {e}"))?;
    }
    if let Some(e) = service.pipe_failed.take() {
        return Err(format!("pipe failed: {e}"));
    }
    Ok(ExitCode::SUCCESS)
}
