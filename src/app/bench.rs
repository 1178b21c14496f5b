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
//!
//! Datagram mode ([`BenchConfig::datagram_rate`], `burrow bench --datagram`) sends QUIC
//! datagrams (RFC 9221) of `[sequence: u64 BE][filler]` at a target rate instead: they have
//! no flow control, so the sender paces itself from the `now`s it is given (a tick every
//! [`PACE_TICK`]) and the receiver counts them; loss is what the sequence numbers say is
//! missing. One stream carries the control frames; its FIN marks the end of sending.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::protocol::{
    CODE_DONE, FramePoll, FrameReader, OutBuf, Reply, Request, decode_reply, encode_reply,
    encode_request,
};
use crate::transport::{ConnectionHandle, Dir, Event, StreamChunk, StreamId, Transport};

/// Filler written per call (one buffer, allocated once per machine).
const FILLER: usize = 64 * 1024;
/// Longest benchmark a server agrees to send for.
pub const MAX_BENCH_SECONDS: u32 = 3600;
/// Fastest datagram rate a server agrees to send at (bytes per second).
pub const MAX_DATAGRAM_RATE: u64 = 10_000_000_000;
/// Pacing interval of datagram mode.
pub const PACE_TICK: Duration = Duration::from_millis(1);
/// Most datagrams sent per pacing tick (bounds the work of one call after a long pause).
const MAX_DATAGRAMS_PER_TICK: u64 = 4096;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    /// How long the sender writes.
    pub seconds: u32,
    /// `false`: we send; `true`: the peer sends.
    pub reverse: bool,
    /// Parallel streams (stream mode only).
    pub streams: u16,
    /// `Some(bytes per second)`: datagram mode at this target rate.
    pub datagram_rate: Option<u64>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            seconds: 10,
            reverse: false,
            streams: 1,
            datagram_rate: None,
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
    /// Datagram mode's counts.
    pub datagrams: Option<DatagramStats>,
}

/// What datagram mode counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramStats {
    /// Datagrams sent (when we sent), or the highest sequence seen + 1 (when we received:
    /// losses after the last received one are invisible).
    pub sent: u64,
    /// Datagrams that arrived.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
}

/// Sends sequence-numbered datagrams at a target rate.
struct Pacer {
    start: Instant,
    rate: u64,
    sent_bytes: u64,
    next_seq: u64,
    next_at: Option<Instant>,
}

impl Pacer {
    fn new(start: Instant, rate: u64) -> Self {
        Pacer {
            start,
            rate: rate.clamp(1, MAX_DATAGRAM_RATE),
            sent_bytes: 0,
            next_seq: 0,
            next_at: None,
        }
    }

    /// Sends what is due by `now`; returns payload bytes sent.
    fn send_due(
        &mut self,
        now: Instant,
        transport: &mut Transport,
        conn: ConnectionHandle,
        filler: &[u8],
    ) -> Result<u64, String> {
        let size = transport
            .max_datagram_size(conn)
            .ok_or("the peer does not accept datagrams")?
            .min(filler.len())
            .max(8);
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let due = (u128::from(self.rate) * elapsed / 1_000_000_000) as u64 + size as u64;
        let count = due
            .saturating_sub(self.sent_bytes)
            .div_ceil(size as u64)
            .min(MAX_DATAGRAMS_PER_TICK);
        // One allocation per tick, split into the datagrams (they share it).
        let mut block = BytesMut::with_capacity(count as usize * size);
        let mut sent = 0;
        for _ in 0..count {
            block.put_u64(self.next_seq);
            block.put_slice(&filler[..size - 8]);
            let d = block.split_to(size).freeze();
            transport
                .send_datagram(conn, d)
                .map_err(|e| e.to_string())?;
            self.next_seq += 1;
            self.sent_bytes += size as u64;
            sent += size as u64;
        }
        self.next_at = Some(now + PACE_TICK);
        Ok(sent)
    }
}

/// Counts received datagrams and the highest sequence number.
#[derive(Debug, Default)]
struct DatagramCounter {
    received: u64,
    highest: Option<u64>,
}

impl DatagramCounter {
    fn record(&mut self, data: &Bytes) {
        let Some(seq) = data.get(..8) else {
            tracing::trace!(len = data.len(), "short bench datagram");
            return;
        };
        let mut b = [0; 8];
        b.copy_from_slice(seq);
        let seq = u64::from_be_bytes(b);
        self.received += 1;
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
    }
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
    /// Datagram mode, sending: the receiver's datagram count.
    peer_datagrams: Option<u64>,
    error: Option<String>,
}

/// The `burrow bench` side.
pub struct BenchClient {
    config: BenchConfig,
    conn: ConnectionHandle,
    streams: Vec<ClientStream>,
    /// Written with zero-copy `write_bytes`: a clone is a reference count, not a copy.
    filler: Bytes,
    start: Option<Instant>,
    end: Option<Instant>,
    deadline: Option<Instant>,
    sample_start: Option<Instant>,
    sample_bytes: u64,
    samples: Vec<Sample>,
    pacer: Option<Pacer>,
    counter: DatagramCounter,
}

impl BenchClient {
    /// A benchmark over `conn`; it starts on the first [`BenchClient::on_tick`].
    pub fn new(config: BenchConfig, conn: ConnectionHandle) -> Self {
        let (count, request) = match config.datagram_rate {
            Some(rate) => (
                1,
                Request::BenchDatagrams {
                    seconds: config.seconds,
                    reverse: config.reverse,
                    rate,
                },
            ),
            None => (
                config.streams.max(1),
                Request::Bench {
                    seconds: config.seconds,
                    reverse: config.reverse,
                },
            ),
        };
        let streams = (0..count)
            .map(|_| {
                let mut header = OutBuf::new();
                header.push(&encode_request(&request));
                ClientStream {
                    stream: None,
                    header,
                    reply: FrameReader::new(),
                    accepted: false,
                    fin_sent: false,
                    bytes: 0,
                    result: None,
                    peer_datagrams: None,
                    error: None,
                }
            })
            .collect();
        BenchClient {
            config,
            conn,
            streams,
            filler: Bytes::from(vec![0x5a; FILLER]),
            start: None,
            end: None,
            deadline: None,
            sample_start: None,
            sample_bytes: 0,
            samples: Vec::new(),
            pacer: None,
            counter: DatagramCounter::default(),
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
            Event::DatagramReceived { conn, ref data }
                if conn == self.conn && self.config.datagram_rate.is_some() =>
            {
                if self.config.reverse && self.end.is_none() {
                    self.counter.record(data);
                    self.streams[0].bytes += data.len() as u64;
                    self.sample(now);
                }
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
        let sending = !self.config.reverse && self.streams.iter().any(|s| !s.fin_sent);
        let deadline = self.deadline.filter(|_| sending);
        let pace = self
            .pacer
            .as_ref()
            .and_then(|p| p.next_at)
            .filter(|_| sending);
        [next_sample, deadline, pace].into_iter().flatten().min()
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
            datagrams: self.config.datagram_rate.map(|_| {
                if self.config.reverse {
                    let sent = self.counter.highest.map_or(0, |h| h + 1);
                    DatagramStats {
                        sent,
                        received: self.counter.received,
                        lost: sent.saturating_sub(self.counter.received),
                    }
                } else {
                    let sent = self.pacer.as_ref().map_or(0, |p| p.next_seq);
                    let received = self.streams[0].peer_datagrams.unwrap_or(0);
                    DatagramStats {
                        sent,
                        received,
                        lost: sent.saturating_sub(received),
                    }
                }
            }),
        }
    }

    fn sample(&mut self, now: Instant) {
        let Some(start) = self.start else { return };
        let total: u64 = self.streams.iter().map(|s| s.bytes).sum();
        while let Some(ss) = self.sample_start {
            if now < ss + Duration::from_secs(1) && self.end.is_none() {
                break;
            }
            // The last, partial interval: drop a sliver (under 100 ms) that only holds the
            // wait for the final frame; its bytes are in the summary anyway.
            if self.end.is_some() && now.saturating_duration_since(ss) < Duration::from_millis(100)
            {
                self.sample_start = None;
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
        let datagram = self.config.datagram_rate;
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
            datagram.is_some(),
            &self.filler,
        ) {
            s.error = Some(e);
            let _ = transport.reset(conn, stream, CODE_DONE);
            let _ = transport.stop(conn, stream, CODE_DONE);
        } else if let Some(rate) = datagram
            && !reverse
            && s.accepted
            && !s.fin_sent
            && !past_deadline
        {
            let pacer = self.pacer.get_or_insert_with(|| Pacer::new(now, rate));
            match pacer.send_due(now, transport, conn, &self.filler) {
                Ok(n) => s.bytes += n,
                Err(e) => {
                    s.error = Some(e);
                    let _ = transport.reset(conn, stream, CODE_DONE);
                }
            }
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
    datagram: bool,
    filler: &Bytes,
) -> Result<(), String> {
    if !s.fin_sent
        && s.header
            .flush(transport, conn, stream)
            .map_err(|e| e.to_string())?
    {
        if reverse || past_deadline {
            transport.finish(conn, stream).map_err(|e| e.to_string())?;
            s.fin_sent = true;
        } else if !datagram {
            loop {
                let mut chunk = filler.clone();
                let n = transport
                    .write_bytes(conn, stream, &mut chunk)
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
                    Reply::DatagramResult { datagrams, bytes } => {
                        s.result = Some(bytes);
                        s.peer_datagrams = Some(datagrams);
                        let _ = transport.stop(conn, stream, CODE_DONE);
                        return Ok(());
                    }
                    Reply::Reject(r) | Reply::Failed(r) => return Err(r.to_string()),
                    other => return Err(format!("unexpected reply {other:?}")),
                },
            }
        } else {
            match transport
                .read_chunk(conn, stream, usize::MAX)
                .map_err(|e| e.to_string())?
            {
                StreamChunk::Data(b) => s.bytes += b.len() as u64,
                StreamChunk::Blocked => return Ok(()),
                StreamChunk::Finished => {
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
    /// Datagram mode: the target rate.
    datagram_rate: Option<u64>,
    /// Datagram mode, sending.
    pacer: Option<Pacer>,
    /// Datagram mode, receiving.
    datagrams: u64,
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
    /// The receiving datagram benchmark of each connection (datagrams carry no stream ID,
    /// so a connection runs at most one).
    datagram_sessions: HashMap<ConnectionHandle, StreamId>,
    filler: Bytes,
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
            datagram_sessions: HashMap::new(),
            filler: Bytes::from(vec![0xa5; FILLER]),
            reports: Vec::new(),
        }
    }

    /// Takes a stream whose [`Request::Bench`] (`datagram_rate: None`) or
    /// [`Request::BenchDatagrams`] was read.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        now: Instant,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        seconds: u32,
        reverse: bool,
        datagram_rate: Option<u64>,
    ) {
        if datagram_rate.is_some() && !reverse {
            if self.datagram_sessions.contains_key(&conn) {
                let mut q = super::protocol::RejectQueue::default();
                q.reject(
                    transport,
                    conn,
                    stream,
                    super::protocol::Reason::new(
                        super::protocol::REASON_BUSY,
                        "a datagram benchmark is already running on this connection",
                    ),
                );
                return;
            }
            self.datagram_sessions.insert(conn, stream);
        }
        let mut out = OutBuf::new();
        out.push(&encode_reply(&Reply::Accept {
            resume_offset: 0,
            prefix_hash: None,
        }));
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
                datagram_rate,
                pacer: None,
                datagrams: 0,
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
            Event::DatagramReceived { conn, ref data } => {
                let Some(&stream) = self.datagram_sessions.get(&conn) else {
                    return false;
                };
                if let Some(s) = self.streams.get_mut(&(conn, stream)) {
                    s.datagrams += 1;
                    s.bytes += data.len() as u64;
                }
                true
            }
            Event::ConnectionLost { conn, .. } => {
                self.streams.retain(|k, _| k.0 != conn);
                self.datagram_sessions.remove(&conn);
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
            .map(|s| {
                s.pacer
                    .as_ref()
                    .and_then(|p| p.next_at)
                    .map_or(s.deadline, |t| t.min(s.deadline))
            })
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
            if let (true, Some(rate)) = (s.reverse, s.datagram_rate) {
                if now < s.deadline {
                    let pacer = s.pacer.get_or_insert_with(|| Pacer::new(now, rate));
                    s.bytes += pacer.send_due(now, transport, conn, &self.filler)?;
                }
            } else if s.reverse {
                while now < s.deadline {
                    let n = transport
                        .write_bytes(conn, stream, &mut self.filler.clone())
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    s.bytes += n as u64;
                }
            }
            while !s.eof {
                match transport
                    .read_chunk(conn, stream, usize::MAX)
                    .map_err(|e| e.to_string())?
                {
                    StreamChunk::Data(b) => {
                        if !s.reverse {
                            s.bytes += b.len() as u64;
                        }
                    }
                    StreamChunk::Blocked => break,
                    StreamChunk::Finished => s.eof = true,
                }
            }
            if s.reverse && now >= s.deadline {
                transport.finish(conn, stream).map_err(|e| e.to_string())?;
                s.fin_sent = true;
            } else if !s.reverse && s.eof && !s.fin_queued {
                let micros = now.saturating_duration_since(s.started).as_micros() as u64;
                s.out.push(&encode_reply(&match s.datagram_rate {
                    Some(_) => Reply::DatagramResult {
                        datagrams: s.datagrams,
                        bytes: s.bytes,
                    },
                    None => Reply::BenchResult {
                        bytes: s.bytes,
                        micros,
                    },
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
            if self.datagram_sessions.get(&conn) == Some(&stream) {
                self.datagram_sessions.remove(&conn);
            }
            self.reports.push(BenchReport {
                conn,
                bytes: s.bytes,
                elapsed: now.saturating_duration_since(s.started),
                reverse: s.reverse,
            });
        }
    }
}
