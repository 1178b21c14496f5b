//! A byte pipe over one bidirectional stream (`burrow pipe PEER` / `burrow listen --pipe`).
//!
//! The opener writes [`Request::Pipe`] and then, without waiting, its input; the acceptor
//! answers [`Reply::Accept`] and then its own input. The two directions are independent:
//! each ends with its own EOF (a half-close), so `echo hi | burrow pipe PEER` delivers "hi"
//! and EOF while the other direction keeps flowing.
//!
//! After the header each direction carries frames `[len: u32 BE][len bytes]`; `len = 0`
//! is EOF and `len = 0xFFFF_FFFF` is CONSUMED: "I read your EOF and handed all your bytes
//! to my driver". The QUIC FIN follows once both were sent. Why the extra marker: closing a
//! QUIC connection discards whatever the peer's application had not read yet (unlike a TCP
//! FIN), so a side may close only once it knows the peer consumed everything, and a FIN's
//! acknowledgement only says the peer's *transport* has the bytes. The pipe is done when
//! both EOFs and both CONSUMEDs went through (ours acknowledged) and the driver took all
//! output; then either side may close the connection. A normal close
//! ([`CLOSE_NORMAL`]) by the peer after we sent CONSUMED is a clean end too: the peer only
//! closes once it got our CONSUMED and its own was acknowledged.
//!
//! Driver side (no I/O here): feed stdin with [`Pipe::push_input`] (it takes what fits in
//! a bounded buffer; retry the rest after [`Pipe::can_push`] turns true again), signal
//! [`Pipe::input_eof`], and drain [`Pipe::poll_output`] to stdout. Output is bounded too:
//! the pipe stops reading the stream while [`Pipe::OUTPUT_CAP`] bytes wait, which lets QUIC
//! flow control slow the peer down; call [`Pipe::on_tick`] after draining output.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::protocol::{
    CODE_ABORTED, CODE_REJECTED, FramePoll, FrameReader, OutBuf, Reason, Reply, Request,
    decode_reply, encode_reply, encode_request,
};
use crate::transport::{
    CLOSE_NORMAL, ConnectionError, ConnectionHandle, Dir, Event, LostReason, StreamId, StreamRead,
    Transport,
};

/// Frame length meaning "end of my input".
const EOF: u32 = 0;
/// Frame length meaning "I read your EOF and all your bytes".
const CONSUMED: u32 = u32::MAX;
/// Largest data frame.
const MAX_DATA_FRAME: usize = 64 * 1024;

/// Whether the peer closed the connection with [`CLOSE_NORMAL`].
fn closed_normally_by_peer(reason: &LostReason) -> bool {
    matches!(reason, LostReason::Quic(ConnectionError::ApplicationClosed(close))
        if close.error_code.into_inner() == u64::from(CLOSE_NORMAL))
}

/// Why a pipe ended badly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipeError {
    /// The peer refused the pipe.
    #[error("refused by peer: {0}")]
    Rejected(Reason),
    /// The peer reset or stopped the stream, or broke the protocol.
    #[error("stream: {0}")]
    Stream(String),
    /// The connection went away.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

/// Counters for the final report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Input bytes handed to the transport.
    pub bytes_sent: u64,
    /// Output bytes received.
    pub bytes_received: u64,
}

/// One end of a pipe.
pub struct Pipe {
    conn: ConnectionHandle,
    stream: Option<StreamId>,
    /// Request (opener) or Accept (acceptor) frame, written before any input.
    header: OutBuf,
    /// The opener reads the acceptor's reply frame before any output.
    reply: Option<FrameReader>,
    input: VecDeque<u8>,
    input_eof: bool,
    /// The frame being written (data, EOF or CONSUMED).
    frame: OutBuf,
    eof_sent: bool,
    consumed_sent: bool,
    fin_sent: bool,
    fin_acked: bool,
    peer_eof: bool,
    peer_consumed: bool,
    /// The peer closed the connection normally after our CONSUMED.
    peer_closed_clean: bool,
    /// The peer's FIN was read: the stream's receive side is gone.
    recv_done: bool,
    /// Incoming frame header bytes, and data bytes left in the current frame.
    in_len: [u8; 4],
    in_len_have: usize,
    in_remaining: usize,
    output: VecDeque<Bytes>,
    output_len: usize,
    read_buf: Vec<u8>,
    stats: PipeStats,
    error: Option<PipeError>,
}

impl Pipe {
    /// Input bytes buffered before [`Pipe::push_input`] refuses more.
    pub const INPUT_CAP: usize = 256 * 1024;
    /// Output bytes buffered before the pipe stops reading the stream.
    pub const OUTPUT_CAP: usize = 256 * 1024;

    fn with(
        conn: ConnectionHandle,
        stream: Option<StreamId>,
        header: Vec<u8>,
        opener: bool,
    ) -> Self {
        let mut h = OutBuf::new();
        h.push(&header);
        Pipe {
            conn,
            stream,
            header: h,
            reply: opener.then(FrameReader::new),
            input: VecDeque::new(),
            input_eof: false,
            frame: OutBuf::new(),
            eof_sent: false,
            consumed_sent: false,
            fin_sent: false,
            fin_acked: false,
            peer_eof: false,
            peer_consumed: false,
            peer_closed_clean: false,
            recv_done: false,
            in_len: [0; 4],
            in_len_have: 0,
            in_remaining: 0,
            output: VecDeque::new(),
            output_len: 0,
            read_buf: vec![0; 64 * 1024],
            stats: PipeStats::default(),
            error: None,
        }
    }

    /// The opening end (`burrow pipe PEER`): opens its stream on `conn` (now, or on the next
    /// tick if the peer's stream limit is reached).
    pub fn open(transport: &mut Transport, conn: ConnectionHandle) -> Self {
        let mut p = Pipe::with(conn, None, encode_request(&Request::Pipe), true);
        p.pump(transport);
        p
    }

    /// The accepting end, for a stream whose [`Request::Pipe`] was read (by the listener).
    pub fn accept(transport: &mut Transport, conn: ConnectionHandle, stream: StreamId) -> Self {
        let mut p = Pipe::with(
            conn,
            Some(stream),
            encode_reply(&Reply::Accept {
                resume_offset: 0,
                prefix_hash: None,
            }),
            false,
        );
        p.pump(transport);
        p
    }

    /// The connection and stream (the stream is `None` until opened).
    pub fn stream(&self) -> (ConnectionHandle, Option<StreamId>) {
        (self.conn, self.stream)
    }

    /// Takes as much of `data` as fits; returns how much. 0 means full (or input already
    /// ended): wait until [`Pipe::can_push`].
    pub fn push_input(&mut self, transport: &mut Transport, data: &[u8]) -> usize {
        if self.input_eof || self.error.is_some() {
            return 0;
        }
        let n = data
            .len()
            .min(Self::INPUT_CAP.saturating_sub(self.input.len()));
        self.input.extend(&data[..n]);
        self.pump(transport);
        n
    }

    /// Whether [`Pipe::push_input`] would take bytes now.
    pub fn can_push(&self) -> bool {
        !self.input_eof && self.error.is_none() && self.input.len() < Self::INPUT_CAP
    }

    /// No more input: the peer sees EOF after the buffered bytes.
    pub fn input_eof(&mut self, transport: &mut Transport) {
        self.input_eof = true;
        self.pump(transport);
    }

    /// The next chunk of output, oldest first.
    pub fn poll_output(&mut self) -> Option<Bytes> {
        let b = self.output.pop_front()?;
        self.output_len -= b.len();
        Some(b)
    }

    /// Handles a transport event; `true` if it was ours.
    pub fn handle_event(
        &mut self,
        _now: Instant,
        transport: &mut Transport,
        event: &Event,
    ) -> bool {
        match *event {
            Event::StreamReadable { conn, stream } | Event::StreamWritable { conn, stream }
                if conn == self.conn && Some(stream) == self.stream =>
            {
                self.pump(transport);
                true
            }
            Event::StreamFinished { conn, stream }
                if conn == self.conn && Some(stream) == self.stream =>
            {
                self.fin_acked = true;
                true
            }
            Event::StreamStopped { conn, stream, code }
                if conn == self.conn && Some(stream) == self.stream =>
            {
                // Our direction is unwanted; the peer's reply may still say why.
                self.pump(transport);
                if self.error.is_none() && !self.fin_acked {
                    if code == u64::from(CODE_REJECTED) {
                        // The Reject frame follows on the stream; pump reads it.
                    } else {
                        self.error = Some(PipeError::Stream(format!(
                            "peer stopped reading (code {code})"
                        )));
                    }
                }
                true
            }
            Event::StreamsAvailable { conn, dir: Dir::Bi } if conn == self.conn => {
                self.pump(transport);
                false
            }
            Event::ConnectionLost {
                conn, ref reason, ..
            } if conn == self.conn => {
                if self.consumed_sent && self.eof_sent && closed_normally_by_peer(reason) {
                    // The peer is only done (and closes) once it got our CONSUMED, which we
                    // send after reading its EOF; and it sent its CONSUMED after reading ours.
                    self.peer_closed_clean = true;
                }
                if !self.is_finished() && self.error.is_none() {
                    self.error = Some(PipeError::ConnectionLost(reason.to_string()));
                }
                true
            }
            _ => false,
        }
    }

    /// Moves buffered input to the stream and stream data to output, as far as both allow.
    pub fn on_tick(&mut self, _now: Instant, transport: &mut Transport) {
        self.pump(transport);
    }

    /// The pipe has no timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn is_finished(&self) -> bool {
        self.eof_sent
            && self.consumed_sent
            && self.peer_eof
            && (self.peer_closed_clean || (self.peer_consumed && self.fin_acked))
    }

    /// Whether the pipe is over: both directions finished and output drained, or failed.
    pub fn is_done(&self) -> bool {
        self.error.is_some() || (self.is_finished() && self.output.is_empty())
    }

    /// `Some(Ok)` once cleanly done, `Some(Err)` once failed.
    pub fn outcome(&self) -> Option<Result<PipeStats, PipeError>> {
        match &self.error {
            Some(e) => Some(Err(e.clone())),
            None if self.is_done() => Some(Ok(self.stats)),
            None => None,
        }
    }

    /// Whether the peer's direction ended (its EOF was read).
    pub fn peer_finished(&self) -> bool {
        self.peer_eof
    }

    /// Byte counters so far.
    pub fn stats(&self) -> PipeStats {
        self.stats
    }

    fn fail(&mut self, transport: &mut Transport, error: PipeError) {
        if self.error.is_none() {
            tracing::debug!(%error, "pipe failed");
            self.error = Some(error);
        }
        if let Some(s) = self.stream {
            let _ = transport.reset(self.conn, s, CODE_ABORTED);
            let _ = transport.stop(self.conn, s, CODE_ABORTED);
        }
    }

    fn pump(&mut self, transport: &mut Transport) {
        if self.error.is_some() {
            return;
        }
        let conn = self.conn;
        let stream = match self.stream {
            Some(s) => s,
            None => match transport.open_stream(conn, Dir::Bi) {
                Ok(Some(s)) => {
                    self.stream = Some(s);
                    s
                }
                Ok(None) => return,
                Err(e) => {
                    self.error = Some(PipeError::ConnectionLost(e.to_string()));
                    return;
                }
            },
        };
        // Send side.
        if !self.fin_sent {
            match self.write_input(transport, stream) {
                Ok(()) => {}
                Err(e) if self.reply.is_some() => {
                    // The opener may be reading a Reject; report that instead.
                    self.read_side(transport, stream);
                    if self.error.is_none() {
                        self.fail(transport, PipeError::Stream(e));
                    }
                    return;
                }
                Err(e) => return self.fail(transport, PipeError::Stream(e)),
            }
        }
        self.read_side(transport, stream);
        // Reading may have found the peer's EOF: CONSUMED (and our FIN) can go now.
        if !self.fin_sent
            && self.error.is_none()
            && self.reply.is_none()
            && let Err(e) = self.write_input(transport, stream)
        {
            self.fail(transport, PipeError::Stream(e));
        }
    }

    fn write_input(&mut self, transport: &mut Transport, stream: StreamId) -> Result<(), String> {
        let conn = self.conn;
        let err = |e: crate::transport::TransportError| e.to_string();
        if !self.header.flush(transport, conn, stream).map_err(err)? {
            return Ok(());
        }
        loop {
            if !self.frame.flush(transport, conn, stream).map_err(err)? {
                return Ok(());
            }
            if self.peer_eof && self.output.is_empty() && !self.consumed_sent {
                self.frame.push(&CONSUMED.to_be_bytes());
                self.consumed_sent = true;
            } else if !self.input.is_empty() {
                let n = self.input.len().min(MAX_DATA_FRAME);
                self.frame.push(&(n as u32).to_be_bytes());
                let (a, b) = self.input.as_slices();
                let from_a = n.min(a.len());
                self.frame.push(&a[..from_a]);
                self.frame.push(&b[..n - from_a]);
                self.input.drain(..n);
                self.stats.bytes_sent += n as u64;
            } else if self.input_eof && !self.eof_sent {
                self.frame.push(&EOF.to_be_bytes());
                self.eof_sent = true;
            } else {
                if self.eof_sent && self.consumed_sent && !self.fin_sent {
                    transport.finish(conn, stream).map_err(err)?;
                    self.fin_sent = true;
                }
                return Ok(());
            }
        }
    }

    fn read_side(&mut self, transport: &mut Transport, stream: StreamId) {
        let conn = self.conn;
        if let Some(reader) = &mut self.reply {
            match reader.poll(transport, conn, stream) {
                Ok(FramePoll::Pending) => return,
                Ok(FramePoll::Frame(f)) => match decode_reply(&f) {
                    Ok(Reply::Accept { .. }) => self.reply = None,
                    Ok(Reply::Reject(r) | Reply::Failed(r)) => {
                        return self.fail(transport, PipeError::Rejected(r));
                    }
                    Ok(other) => {
                        return self.fail(
                            transport,
                            PipeError::Stream(format!("unexpected reply {other:?}")),
                        );
                    }
                    Err(e) => return self.fail(transport, PipeError::Stream(e.to_string())),
                },
                Ok(FramePoll::Eof) => {
                    return self.fail(
                        transport,
                        PipeError::Stream("closed before accepting".into()),
                    );
                }
                Err(e) => return self.fail(transport, PipeError::Stream(e.to_string())),
            }
        }
        // Copying into one 64 KiB buffer rather than taking quinn's per-packet chunks
        // (`read_chunk`): the driver writes each output chunk with one syscall, and one
        // write per ~1.2 kB packet would cost far more than the copy.
        while !self.recv_done && self.output_len < Self::OUTPUT_CAP {
            if self.in_remaining == 0 {
                match transport.read(conn, stream, &mut self.in_len[self.in_len_have..]) {
                    Ok(StreamRead::Data(n)) => self.in_len_have += n,
                    Ok(StreamRead::Blocked) => break,
                    Ok(StreamRead::Finished) if self.in_len_have == 0 && self.peer_consumed => {
                        self.recv_done = true;
                        break;
                    }
                    Ok(StreamRead::Finished) => {
                        return self.fail(
                            transport,
                            PipeError::Stream("peer ended the stream without EOF".into()),
                        );
                    }
                    Err(e) => return self.fail(transport, PipeError::Stream(e.to_string())),
                }
                if self.in_len_have < 4 {
                    continue;
                }
                self.in_len_have = 0;
                match u32::from_be_bytes(self.in_len) {
                    EOF => self.peer_eof = true,
                    CONSUMED => self.peer_consumed = true,
                    _ if self.peer_eof => {
                        return self.fail(
                            transport,
                            PipeError::Stream("peer sent data after its EOF".into()),
                        );
                    }
                    n if n as usize > MAX_DATA_FRAME => {
                        return self.fail(
                            transport,
                            PipeError::Stream(format!("peer frame of {n} bytes")),
                        );
                    }
                    n => self.in_remaining = n as usize,
                }
                continue;
            }
            let want = self.in_remaining.min(self.read_buf.len());
            match transport.read(conn, stream, &mut self.read_buf[..want]) {
                Ok(StreamRead::Data(n)) => {
                    self.output
                        .push_back(Bytes::copy_from_slice(&self.read_buf[..n]));
                    self.output_len += n;
                    self.in_remaining -= n;
                    self.stats.bytes_received += n as u64;
                }
                Ok(StreamRead::Blocked) => break,
                Ok(StreamRead::Finished) => {
                    return self.fail(
                        transport,
                        PipeError::Stream("peer ended the stream inside a frame".into()),
                    );
                }
                Err(e) => return self.fail(transport, PipeError::Stream(e.to_string())),
            }
        }
    }
}
