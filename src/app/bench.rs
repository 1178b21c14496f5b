//! Throughput benchmark (`burrow bench PEER`, iperf3-like).
//!
//! The client opens `streams` bidirectional streams, each starting with
//! [`Request::Bench`]`{ seconds, reverse }`; the server ([`BenchServer`], run by the
//! listener) answers [`Reply::Accept`]. The sending side writes filler from one reusable
//! buffer as fast as flow control allows (a write takes what fits; the rest waits for
//! [`Event::StreamWritable`]) until `seconds` have passed on its own clock, then FINs.
//! When the server is the receiver it answers with [`Reply::BenchResult`] (bytes it
//! counted) after the EOF, so the client reports what actually arrived rather than what it
//! queued. The client takes a throughput sample every second of the `now`s it is given.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::protocol::{
    CODE_DONE, FramePoll, FrameReader, OutBuf, Reply, Request, decode_reply, encode_reply,
    encode_request,
};
use crate::transport::{ConnectionHandle, Dir, Event, StreamId, StreamRead, Transport};

/// Filler written per call (one buffer, allocated once per machine).
const FILLER: usize = 64 * 1024;
/// Longest benchmark a server agrees to send for.
pub const MAX_BENCH_SECONDS: u32 = 3600;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    /// How long the sender writes.
    pub seconds: u32,
    /// `false`: we send; `true`: the peer sends.
    pub reverse: bool,
    /// Parallel streams.
    pub streams: u16,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            seconds: 10,
            reverse: false,
            streams: 1,
        }
    }
}

/// Bytes moved in one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Start of the interval, from the start of the benchmark.
    pub start: Duration,
    /// Interval length.
    pub length: Duration,
    /// Bytes moved by us (written when sending, read when receiving) in it.
    pub bytes: u64,
}

impl Sample {
    /// Throughput in MB/s (10^6 bytes).
    pub fn megabytes_per_second(&self) -> f64 {
        let s = self.length.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e6
        } else {
            0.0
        }
    }
}

/// The final account.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSummary {
    /// Bytes that arrived at the receiver.
    pub bytes: u64,
    /// From start to the last stream's end.
    pub elapsed: Duration,
    /// Per-second samples.
    pub samples: Vec<Sample>,
    /// Streams that failed (reset, connection lost), with the reason.
    pub errors: Vec<String>,
}

impl BenchSummary {
    /// Overall throughput in MB/s (10^6 bytes).
    pub fn megabytes_per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e6
        } else {
            0.0
        }
    }
}

struct ClientStream {
    stream: Option<StreamId>,
    header: OutBuf,
    reply: FrameReader,
    accepted: bool,
    fin_sent: bool,
    /// Bytes written (sending) or read (receiving).
    bytes: u64,
    /// Receiver's count (sending) or our own at EOF (receiving).
    result: Option<u64>,
    error: Option<String>,
}

/// The `burrow bench` side.
pub struct BenchClient {
    config: BenchConfig,
    conn: ConnectionHandle,
    streams: Vec<ClientStream>,
    filler: Vec<u8>,
    read_buf: Vec<u8>,
    start: Option<Instant>,
    end: Option<Instant>,
    deadline: Option<Instant>,
    sample_start: Option<Instant>,
    sample_bytes: u64,
    samples: Vec<Sample>,
}

impl BenchClient {
    /// A benchmark over `conn`; it starts on the first [`BenchClient::on_tick`].
    pub fn new(config: BenchConfig, conn: ConnectionHandle) -> Self {
        let streams = (0..config.streams.max(1))
            .map(|_| {
                let mut header = OutBuf::new();
                header.push(&encode_request(&Request::Bench {
                    seconds: config.seconds,
                    reverse: config.reverse,
                }));
                ClientStream {
                    stream: None,
                    header,
                    reply: FrameReader::new(),
                    accepted: false,
                    fin_sent: false,
                    bytes: 0,
                    result: None,
                    error: None,
                }
            })
            .collect();
        BenchClient {
            config,
            conn,
            streams,
            filler: vec![0x5a; FILLER],
            read_buf: vec![0; FILLER],
            start: None,
            end: None,
            deadline: None,
            sample_start: None,
            sample_bytes: 0,
            samples: Vec::new(),
        }
    }

    /// Handles a transport event; `true` if it was ours.
    pub fn handle_event(&mut self, now: Instant, transport: &mut Transport, event: &Event) -> bool {
        match *event {
            Event::StreamReadable { conn, stream }
            | Event::StreamWritable { conn, stream }
            | Event::StreamStopped { conn, stream, .. }
                if conn == self.conn =>
            {
                if let Some(i) = self.streams.iter().position(|s| s.stream == Some(stream)) {
                    self.pump(now, transport, i);
                    true
                } else {
                    false
                }
            }
            Event::StreamsAvailable { conn, .. } if conn == self.conn => {
                self.on_tick(now, transport);
                true
            }
            Event::ConnectionLost {
                conn, ref reason, ..
            } if conn == self.conn => {
                for s in &mut self.streams {
                    if s.result.is_none() && s.error.is_none() {
                        s.error = Some(format!("connection lost: {reason}"));
                    }
                }
                self.check_done(now);
                true
            }
            _ => false,
        }
    }

    /// Opens streams, writes, takes samples.
    pub fn on_tick(&mut self, now: Instant, transport: &mut Transport) {
        if self.start.is_none() {
            self.start = Some(now);
            self.sample_start = Some(now);
            self.deadline = Some(now + Duration::from_secs(u64::from(self.config.seconds)));
        }
        for i in 0..self.streams.len() {
            self.pump(now, transport, i);
        }
        self.sample(now);
    }

    /// Next sample time, or the sending deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_done() {
            return None;
        }
        let next_sample = self.sample_start.map(|s| s + Duration::from_secs(1));
        let deadline = self
            .deadline
            .filter(|_| !self.config.reverse && self.streams.iter().any(|s| !s.fin_sent));
        [next_sample, deadline].into_iter().flatten().min()
    }

    /// Whether every stream ended.
    pub fn is_done(&self) -> bool {
        self.end.is_some()
    }

    /// Samples so far.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The account (final once [`BenchClient::is_done`]).
    pub fn summary(&self) -> BenchSummary {
        BenchSummary {
            bytes: self.streams.iter().map(|s| s.result.unwrap_or(0)).sum(),
            elapsed: match (self.start, self.end) {
                (Some(s), Some(e)) => e - s,
                _ => Duration::ZERO,
            },
            samples: self.samples.clone(),
            errors: self
                .streams
                .iter()
                .filter_map(|s| s.error.clone())
                .collect(),
        }
    }

    fn sample(&mut self, now: Instant) {
        let Some(start) = self.start else { return };
        let total: u64 = self.streams.iter().map(|s| s.bytes).sum();
        while let Some(ss) = self.sample_start {
            if now < ss + Duration::from_secs(1) && self.end.is_none() {
                break;
            }
            let end = if self.end.is_some() {
                now.min(ss + Duration::from_secs(1))
            } else {
                ss + Duration::from_secs(1)
            };
            if end <= ss {
                break;
            }
            self.samples.push(Sample {
                start: ss - start,
                length: end - ss,
                bytes: total - self.sample_bytes,
            });
            self.sample_bytes = total;
            self.sample_start = Some(end);
            if self.end.is_some() {
                self.sample_start = None;
            }
        }
    }

    fn check_done(&mut self, now: Instant) {
        if self.end.is_none()
            && self
                .streams
                .iter()
                .all(|s| s.result.is_some() || s.error.is_some())
        {
            self.end = Some(now);
            self.sample(now);
        }
    }

    fn pump(&mut self, now: Instant, transport: &mut Transport, i: usize) {
        let conn = self.conn;
        let reverse = self.config.reverse;
        let past_deadline = self.deadline.is_some_and(|d| now >= d);
        let s = &mut self.streams[i];
        if s.result.is_some() || s.error.is_some() {
            return;
        }
        let stream = match s.stream {
            Some(st) => st,
            None => match transport.open_stream(conn, Dir::Bi) {
                Ok(Some(st)) => {
                    s.stream = Some(st);
                    st
                }
                Ok(None) => return,
                Err(e) => {
                    s.error = Some(e.to_string());
                    self.check_done(now);
                    return;
                }
            },
        };
        if let Err(e) = client_step(
            s,
            transport,
            conn,
            stream,
            reverse,
            past_deadline,
            &self.filler,
            &mut self.read_buf,
        ) {
            s.error = Some(e);
            let _ = transport.reset(conn, stream, CODE_DONE);
            let _ = transport.stop(conn, stream, CODE_DONE);
        }
        self.check_done(now);
        self.sample(now);
    }
}

#[allow(clippy::too_many_arguments)]
fn client_step(
    s: &mut ClientStream,
    transport: &mut Transport,
    conn: ConnectionHandle,
    stream: StreamId,
    reverse: bool,
    past_deadline: bool,
    filler: &[u8],
    read_buf: &mut [u8],
) -> Result<(), String> {
    if !s.fin_sent
        && s.header
            .flush(transport, conn, stream)
            .map_err(|e| e.to_string())?
    {
        if reverse || past_deadline {
            transport.finish(conn, stream).map_err(|e| e.to_string())?;
            s.fin_sent = true;
        } else {
            loop {
                let n = transport
                    .write(conn, stream, filler)
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                s.bytes += n as u64;
            }
        }
    }
    loop {
        if !s.accepted || !reverse {
            match s
                .reply
                .poll(transport, conn, stream)
                .map_err(|e| e.to_string())?
            {
                FramePoll::Pending => return Ok(()),
                FramePoll::Eof => return Err("server closed the stream without a result".into()),
                FramePoll::Frame(f) => match decode_reply(&f).map_err(|e| e.to_string())? {
                    Reply::Accept { .. } => s.accepted = true,
                    Reply::BenchResult { bytes, .. } => {
                        s.result = Some(bytes);
                        let _ = transport.stop(conn, stream, CODE_DONE);
                        return Ok(());
                    }
                    Reply::Reject(r) | Reply::Failed(r) => return Err(r.to_string()),
                    other => return Err(format!("unexpected reply {other:?}")),
                },
            }
        } else {
            match transport
                .read(conn, stream, read_buf)
                .map_err(|e| e.to_string())?
            {
                StreamRead::Data(n) => s.bytes += n as u64,
                StreamRead::Blocked => return Ok(()),
                StreamRead::Finished => {
                    s.result = Some(s.bytes);
                    return Ok(());
                }
            }
        }
    }
}

struct ServerStream {
    out: OutBuf,
    reverse: bool,
    started: Instant,
    deadline: Instant,
    bytes: u64,
    /// FIN once `out` is flushed.
    fin_queued: bool,
    fin_sent: bool,
    eof: bool,
}

/// A finished benchmark stream on the server side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchReport {
    /// The connection it ran on.
    pub conn: ConnectionHandle,
    /// Bytes we sent (reverse) or received.
    pub bytes: u64,
    /// How long it ran.
    pub elapsed: Duration,
    /// Whether we were the sender.
    pub reverse: bool,
}

/// The listener's side of benchmarks: any number of streams from any peers.
pub struct BenchServer {
    streams: HashMap<(ConnectionHandle, StreamId), ServerStream>,
    filler: Vec<u8>,
    read_buf: Vec<u8>,
    reports: Vec<BenchReport>,
}

impl Default for BenchServer {
    fn default() -> Self {
        Self::new()
    }
}

impl BenchServer {
    /// No streams yet.
    pub fn new() -> Self {
        BenchServer {
            streams: HashMap::new(),
            filler: vec![0xa5; FILLER],
            read_buf: vec![0; FILLER],
            reports: Vec::new(),
        }
    }

    /// Takes a stream whose [`Request::Bench`] was read.
    pub fn start(
        &mut self,
        now: Instant,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        seconds: u32,
        reverse: bool,
    ) {
        let mut out = OutBuf::new();
        out.push(&encode_reply(&Reply::Accept { resume_offset: 0 }));
        let seconds = seconds.min(MAX_BENCH_SECONDS);
        self.streams.insert(
            (conn, stream),
            ServerStream {
                out,
                reverse,
                started: now,
                deadline: now + Duration::from_secs(u64::from(seconds)),
                bytes: 0,
                fin_queued: false,
                fin_sent: false,
                eof: false,
            },
        );
        self.pump(now, transport, conn, stream);
    }

    /// Handles a transport event; `true` if it was ours.
    pub fn handle_event(&mut self, now: Instant, transport: &mut Transport, event: &Event) -> bool {
        match *event {
            Event::StreamReadable { conn, stream }
            | Event::StreamWritable { conn, stream }
            | Event::StreamStopped { conn, stream, .. }
                if self.streams.contains_key(&(conn, stream)) =>
            {
                self.pump(now, transport, conn, stream);
                true
            }
            Event::ConnectionLost { conn, .. } => {
                self.streams.retain(|k, _| k.0 != conn);
                false
            }
            _ => false,
        }
    }

    /// Writes more filler and ends streams whose time is up.
    pub fn on_tick(&mut self, now: Instant, transport: &mut Transport) {
        let keys: Vec<_> = self.streams.keys().copied().collect();
        for (conn, stream) in keys {
            self.pump(now, transport, conn, stream);
        }
    }

    /// The earliest sending deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.streams
            .values()
            .filter(|s| s.reverse && !s.fin_sent)
            .map(|s| s.deadline)
            .min()
    }

    /// Whether no benchmark runs.
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty()
    }

    /// The next finished stream.
    pub fn poll_report(&mut self) -> Option<BenchReport> {
        if self.reports.is_empty() {
            None
        } else {
            Some(self.reports.remove(0))
        }
    }

    fn pump(
        &mut self,
        now: Instant,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
    ) {
        let Some(s) = self.streams.get_mut(&(conn, stream)) else {
            return;
        };
        let result = (|| -> Result<bool, String> {
            if !s
                .out
                .flush(transport, conn, stream)
                .map_err(|e| e.to_string())?
            {
                return Ok(false);
            }
            if s.fin_queued && !s.fin_sent {
                transport.finish(conn, stream).map_err(|e| e.to_string())?;
                s.fin_sent = true;
            }
            if s.fin_sent {
                return Ok(s.eof);
            }
            if s.reverse {
                while now < s.deadline {
                    let n = transport
                        .write(conn, stream, &self.filler)
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    s.bytes += n as u64;
                }
            }
            while !s.eof {
                match transport
                    .read(conn, stream, &mut self.read_buf)
                    .map_err(|e| e.to_string())?
                {
                    StreamRead::Data(n) => {
                        if !s.reverse {
                            s.bytes += n as u64;
                        }
                    }
                    StreamRead::Blocked => break,
                    StreamRead::Finished => s.eof = true,
                }
            }
            if s.reverse && now >= s.deadline {
                transport.finish(conn, stream).map_err(|e| e.to_string())?;
                s.fin_sent = true;
            } else if !s.reverse && s.eof && !s.fin_queued {
                let micros = now.saturating_duration_since(s.started).as_micros() as u64;
                s.out.push(&encode_reply(&Reply::BenchResult {
                    bytes: s.bytes,
                    micros,
                }));
                s.fin_queued = true;
                if s.out
                    .flush(transport, conn, stream)
                    .map_err(|e| e.to_string())?
                {
                    transport.finish(conn, stream).map_err(|e| e.to_string())?;
                    s.fin_sent = true;
                }
            }
            Ok(s.fin_sent && s.eof && s.out.is_empty())
        })();
        let done = match result {
            Ok(done) => done,
            Err(e) => {
                tracing::debug!(error = %e, "bench stream ended");
                let _ = transport.reset(conn, stream, CODE_DONE);
                true
            }
        };
        if done && let Some(s) = self.streams.remove(&(conn, stream)) {
            self.reports.push(BenchReport {
                conn,
                bytes: s.bytes,
                elapsed: now.saturating_duration_since(s.started),
                reverse: s.reverse,
            });
        }
    }
}
