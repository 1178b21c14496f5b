//! `burrow listen`: accepts streams from any connected peer, reads each one's request and
//! hands it to the machine that serves it ([`FileReceiver`], [`Pipe`], [`BenchServer`]), or
//! rejects it with a reason ([`REASON_NOT_ACCEPTING`] when that service is off).
//!
//! The allow list (`--allow PEER`) is the glue's job at [`Event::Connected`]: a refused
//! peer's connection is closed before any stream reaches the listener. Every incoming file
//! is attributed to the authenticated [`PeerId`] of its connection.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

use super::bench::{BenchReport, BenchServer};
use super::file_recv::{
    FileReceiver, FileReceiverConfig, FileReport, FileRequest, IncomingProgress,
};
use super::pipe::{Pipe, PipeError, PipeStats};
use super::protocol::{
    CODE_REJECTED, FramePoll, FrameReader, REASON_BUSY, REASON_NOT_ACCEPTING, REASON_PROTOCOL,
    Reason, RejectQueue, Request, decode_request,
};
use crate::transport::{ConnectionHandle, Dir, Event, StreamId, Transport};
use crate::wire::PeerId;

/// Which services the listener offers.
#[derive(Debug, Clone, Default)]
pub struct ListenConfig {
    /// Accept files into this directory (`--out DIR`); `None` refuses files.
    pub out_dir: Option<PathBuf>,
    /// Replace existing files (`--overwrite`).
    pub overwrite: bool,
    /// Accept one pipe (`--pipe`).
    pub pipe: bool,
    /// Answer benchmarks.
    pub bench: bool,
}

/// Something the user may want to see.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenReport {
    /// A file arrived, failed or was refused.
    File(FileReport),
    /// A peer opened the pipe.
    PipeOpened {
        /// Who.
        peer: PeerId,
    },
    /// The pipe ended.
    PipeEnded(Result<PipeStats, PipeError>),
    /// A benchmark stream finished.
    Bench(BenchReport),
    /// A stream was refused before reaching a service.
    Refused {
        /// Who asked.
        peer: Option<PeerId>,
        /// Why.
        reason: Reason,
    },
}

/// Serves everything peers ask of a listening node.
pub struct Listener {
    config: ListenConfig,
    files: Option<FileReceiver>,
    pipe: Option<Pipe>,
    pipe_reported: bool,
    bench: BenchServer,
    /// Streams whose request frame is still being read.
    headers: HashMap<(ConnectionHandle, StreamId), FrameReader>,
    rejecting: RejectQueue,
    reports: VecDeque<ListenReport>,
}

impl Listener {
    /// A listener offering what `config` enables. The output directory must exist.
    pub fn new(config: ListenConfig) -> Self {
        let files = config.out_dir.clone().map(|out_dir| {
            FileReceiver::new(FileReceiverConfig {
                out_dir,
                overwrite: config.overwrite,
            })
        });
        Listener {
            config,
            files,
            pipe: None,
            pipe_reported: false,
            bench: BenchServer::new(),
            headers: HashMap::new(),
            rejecting: RejectQueue::default(),
            reports: VecDeque::new(),
        }
    }

    /// The pipe, once a peer opened it: push stdin into it, drain its output to stdout.
    pub fn pipe_mut(&mut self) -> Option<&mut Pipe> {
        self.pipe.as_mut()
    }

    /// Incoming files in flight.
    pub fn incoming(&self) -> Vec<IncomingProgress> {
        self.files
            .as_ref()
            .map(|f| f.progress())
            .unwrap_or_default()
    }

    /// Handles a transport event; `true` if it was consumed.
    pub fn handle_event(&mut self, now: Instant, transport: &mut Transport, event: &Event) -> bool {
        match *event {
            Event::StreamOpened { conn, dir } => {
                while let Ok(Some(stream)) = transport.accept_stream(conn, dir) {
                    if dir == Dir::Uni {
                        // Nothing uses unidirectional streams yet.
                        let _ = transport.stop(conn, stream, CODE_REJECTED);
                        continue;
                    }
                    self.headers.insert((conn, stream), FrameReader::new());
                    self.read_header(now, transport, conn, stream);
                }
                true
            }
            Event::StreamReadable { conn, stream }
                if self.headers.contains_key(&(conn, stream)) =>
            {
                self.read_header(now, transport, conn, stream);
                true
            }
            Event::StreamReadable { conn, stream }
            | Event::StreamWritable { conn, stream }
            | Event::StreamStopped { conn, stream, .. }
            | Event::StreamFinished { conn, stream }
                if self.rejecting.contains(conn, stream) =>
            {
                self.rejecting.flush(transport, conn, stream);
                true
            }
            Event::ConnectionLost { conn, .. } => {
                self.headers.retain(|k, _| k.0 != conn);
                self.rejecting.forget(conn);
                if let Some(f) = &mut self.files {
                    f.handle_event(now, transport, event);
                }
                if let Some(p) = &mut self.pipe {
                    p.handle_event(now, transport, event);
                }
                self.bench.handle_event(now, transport, event);
                self.collect();
                false
            }
            _ => {
                let mut used = false;
                if let Some(f) = &mut self.files {
                    used = f.handle_event(now, transport, event);
                }
                if !used && let Some(p) = &mut self.pipe {
                    used = p.handle_event(now, transport, event);
                }
                if !used {
                    used = self.bench.handle_event(now, transport, event);
                }
                self.collect();
                used
            }
        }
    }

    /// Retries blocked writes, sends benchmark filler, ends timed-out benchmarks.
    pub fn on_tick(&mut self, now: Instant, transport: &mut Transport) {
        if let Some(f) = &mut self.files {
            f.on_tick(now, transport);
        }
        if let Some(p) = &mut self.pipe {
            p.on_tick(now, transport);
        }
        self.bench.on_tick(now, transport);
        self.rejecting.flush_all(transport);
        self.collect();
    }

    /// When [`Listener::on_tick`] must run next (benchmark deadlines).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.bench.poll_timeout()
    }

    /// The next report, oldest first.
    pub fn poll_report(&mut self) -> Option<ListenReport> {
        self.collect();
        self.reports.pop_front()
    }

    /// A listener never finishes by itself, except `--pipe`: done once its pipe is.
    pub fn is_done(&self) -> bool {
        self.config.pipe && self.pipe.as_ref().is_some_and(Pipe::is_done)
    }

    fn collect(&mut self) {
        if let Some(f) = &mut self.files {
            while let Some(r) = f.poll_report() {
                self.reports.push_back(ListenReport::File(r));
            }
        }
        while let Some(r) = self.bench.poll_report() {
            self.reports.push_back(ListenReport::Bench(r));
        }
        if !self.pipe_reported
            && let Some(outcome) = self.pipe.as_ref().and_then(Pipe::outcome)
        {
            self.pipe_reported = true;
            self.reports.push_back(ListenReport::PipeEnded(outcome));
        }
    }

    fn refuse(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        reason: Reason,
    ) {
        tracing::debug!(%reason, "stream refused");
        self.reports.push_back(ListenReport::Refused {
            peer: transport.peer(conn),
            reason: reason.clone(),
        });
        self.rejecting.reject(transport, conn, stream, reason);
    }

    fn read_header(
        &mut self,
        now: Instant,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
    ) {
        let Some(reader) = self.headers.get_mut(&(conn, stream)) else {
            return;
        };
        let polled = reader.poll(transport, conn, stream);
        let frame = match polled {
            Ok(FramePoll::Pending) => return,
            Ok(FramePoll::Frame(f)) => f,
            Ok(FramePoll::Eof) => {
                self.headers.remove(&(conn, stream));
                let _ = transport.finish(conn, stream);
                return;
            }
            Err(e) => {
                self.headers.remove(&(conn, stream));
                self.refuse(
                    transport,
                    conn,
                    stream,
                    Reason::new(REASON_PROTOCOL, e.to_string()),
                );
                return;
            }
        };
        self.headers.remove(&(conn, stream));
        let Some(peer) = transport.peer(conn) else {
            return;
        };
        let request = match decode_request(&frame) {
            Ok(r) => r,
            Err(e) => {
                return self.refuse(
                    transport,
                    conn,
                    stream,
                    Reason::new(REASON_PROTOCOL, e.to_string()),
                );
            }
        };
        tracing::debug!(peer = %peer.short(), ?request, "stream request");
        match request {
            Request::File {
                path,
                size,
                executable,
                resume,
            } => match &mut self.files {
                Some(files) => {
                    let request = FileRequest {
                        path,
                        size,
                        executable,
                        resume,
                    };
                    files.start(transport, conn, stream, peer, request);
                    self.collect();
                }
                None => self.refuse(
                    transport,
                    conn,
                    stream,
                    Reason::new(
                        REASON_NOT_ACCEPTING,
                        "this node does not accept files (no --out)",
                    ),
                ),
            },
            Request::Pipe if !self.config.pipe => self.refuse(
                transport,
                conn,
                stream,
                Reason::new(
                    REASON_NOT_ACCEPTING,
                    "this node does not accept pipes (no --pipe)",
                ),
            ),
            Request::Pipe if self.pipe.is_some() => self.refuse(
                transport,
                conn,
                stream,
                Reason::new(REASON_BUSY, "a pipe is already open"),
            ),
            Request::Pipe => {
                self.pipe = Some(Pipe::accept(transport, conn, stream));
                self.reports.push_back(ListenReport::PipeOpened { peer });
            }
            Request::Bench { .. } if !self.config.bench => self.refuse(
                transport,
                conn,
                stream,
                Reason::new(REASON_NOT_ACCEPTING, "this node does not answer benchmarks"),
            ),
            Request::Bench { seconds, reverse } => {
                self.bench
                    .start(now, transport, conn, stream, seconds, reverse, None);
            }
            Request::BenchDatagrams { .. } if !self.config.bench => self.refuse(
                transport,
                conn,
                stream,
                Reason::new(REASON_NOT_ACCEPTING, "this node does not answer benchmarks"),
            ),
            Request::BenchDatagrams {
                seconds,
                reverse,
                rate,
            } => {
                self.bench
                    .start(now, transport, conn, stream, seconds, reverse, Some(rate));
            }
        }
    }
}
