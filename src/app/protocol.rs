//! The stream protocol spoken on every application stream.
//!
//! Every bidirectional stream starts with one request frame from the opener; the acceptor
//! answers with reply frames. A frame is
//!
//! ```text
//! +----------------+---------+------------------------------+
//! | length: u32 BE | ver = 1 | bincode (standard config)... |
//! +----------------+---------+------------------------------+
//! ```
//!
//! where `length` counts the version byte and the bincode body and is at most
//! [`MAX_FRAME`]. Bodies are decoded with bincode's byte limit, so a frame claiming a huge
//! string cannot make the decoder allocate it (see `DESIGN.md`, "Why the limit is not
//! optional"). What follows the frames depends on the request:
//!
//! - [`Request::File`]: the acceptor replies [`Reply::Accept`] (or [`Reply::Reject`] and
//!   ends the stream); the opener checks `prefix_hash` against its own first
//!   `resume_offset` bytes (on a mismatch it resets the stream and asks again with
//!   `resume: false`), sends the file bytes from `resume_offset` to `size`, then
//!   the 32-byte BLAKE3 hash of the whole file as a trailer, then FIN; the acceptor answers
//!   [`Reply::Verified`] or [`Reply::Failed`] and FINs.
//! - [`Request::Pipe`]: the acceptor replies [`Reply::Accept`]; then each direction carries
//!   `[len: u32 BE][bytes]` frames ended by an EOF frame (`len = 0`), a CONSUMED frame
//!   (`len = 0xFFFF_FFFF`, sent after reading the peer's EOF) and FIN (see
//!   [`super::pipe`]).
//! - [`Request::Bench`]: the acceptor replies [`Reply::Accept`]; the sending side writes
//!   filler bytes for `seconds` then FINs; when the acceptor was the receiver it answers
//!   with [`Reply::BenchResult`].
//! - [`Request::BenchDatagrams`]: as `Bench`, but the data travels in QUIC datagrams
//!   (`[sequence: u64 BE][filler]`) and the receiving acceptor answers
//!   [`Reply::DatagramResult`].
//!
//! Enums are append-only: a new variant goes at the end, so an older peer fails to decode
//! it (and rejects the stream) rather than misreading it.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use serde::{Deserialize, Serialize};

use crate::transport::{ConnectionHandle, StreamId, StreamRead, Transport, TransportError};

/// The version byte at the start of every frame body.
pub const APP_VERSION: u8 = 1;
/// The largest frame body (version byte + bincode) accepted.
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest relative path in a file request, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest free-text reason.
pub const MAX_MESSAGE_LEN: usize = 512;
/// Length of the hash trailer after a file's bytes.
pub const HASH_LEN: usize = 32;

/// Stream error code (RESET_STREAM / STOP_SENDING) for "the request was rejected".
pub const CODE_REJECTED: u32 = 1;
/// Stream error code for "aborted: local failure (I/O error, protocol violation)".
pub const CODE_ABORTED: u32 = 2;
/// Stream error code for "no longer interested" (e.g. after the final reply).
pub const CODE_DONE: u32 = 3;

/// What the opener of a stream wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Store a file under the receiver's output directory.
    File {
        /// Relative path, '/'-separated, validated by the receiver.
        path: String,
        /// Total size in bytes.
        size: u64,
        /// Whether the file is executable (the receiver sets mode 0o755 instead of its
        /// default).
        executable: bool,
        /// Whether the receiver may resume from a partial copy. `false` after the sender
        /// found the receiver's partial differs from its file: start from byte 0.
        resume: bool,
    },
    /// Connect the opener's stdin/stdout to the acceptor's.
    Pipe,
    /// Measure throughput.
    Bench {
        /// How long the sending side writes.
        seconds: u32,
        /// `false`: the opener sends; `true`: the acceptor sends.
        reverse: bool,
    },
    /// Measure unreliable QUIC datagram (RFC 9221) throughput and loss. The stream only
    /// carries control (request, accept, result; FIN marks the end of sending); the data
    /// travels as datagrams of `[sequence: u64 BE][filler]`.
    BenchDatagrams {
        /// How long the sending side sends.
        seconds: u32,
        /// `false`: the opener sends; `true`: the acceptor sends.
        reverse: bool,
        /// Target send rate in bytes per second (datagrams have no flow control).
        rate: u64,
    },
}

/// Why something was refused or failed: a machine-readable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// One of the `REASON_*` constants (a number rather than an enum so a newer peer's
    /// codes still decode).
    pub code: u32,
    /// Text for the user.
    pub message: String,
}

/// Unclassified failure.
pub const REASON_OTHER: u32 = 0;
/// The path is not acceptable (traversal, absolute, bad characters, symlink in the way).
pub const REASON_BAD_PATH: u32 = 1;
/// The target exists and overwriting is off.
pub const REASON_EXISTS: u32 = 2;
/// The same file is already being received.
pub const REASON_BUSY: u32 = 3;
/// A file-system error on the receiver.
pub const REASON_IO: u32 = 4;
/// This kind of request is not enabled on the receiver.
pub const REASON_NOT_ACCEPTING: u32 = 5;
/// The trailer hash did not match the bytes received.
pub const REASON_HASH_MISMATCH: u32 = 6;
/// The peer broke the protocol (bad frame, data past the trailer, early EOF).
pub const REASON_PROTOCOL: u32 = 7;

impl Reason {
    /// A reason with `code` and `message` (cut to [`MAX_MESSAGE_LEN`] bytes).
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut end = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Reason { code, message }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.code {
            REASON_BAD_PATH => "bad path",
            REASON_EXISTS => "exists",
            REASON_BUSY => "busy",
            REASON_IO => "I/O error",
            REASON_NOT_ACCEPTING => "not accepting",
            REASON_HASH_MISMATCH => "hash mismatch",
            REASON_PROTOCOL => "protocol error",
            _ => "failed",
        };
        write!(f, "{what}: {}", self.message)
    }
}

/// What the acceptor of a stream answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Go ahead; for a file, send from this offset (the receiver already holds and has
    /// hashed the bytes before it).
    Accept {
        /// Bytes the receiver already has.
        resume_offset: u64,
        /// BLAKE3 of those bytes (when `resume_offset > 0`), so the sender can check they
        /// are a prefix of its file before sending the rest.
        prefix_hash: Option<[u8; 32]>,
    },
    /// Refused; the stream ends.
    Reject(Reason),
    /// The file arrived, its hash matched, and it is in place under its final name.
    Verified,
    /// The file did not make it (hash mismatch, I/O error...).
    Failed(Reason),
    /// A benchmark's receiving acceptor counted this much.
    BenchResult {
        /// Bytes received.
        bytes: u64,
        /// Microseconds from the request to EOF.
        micros: u64,
    },
    /// A datagram benchmark's receiving acceptor counted this much.
    DatagramResult {
        /// Datagrams received.
        datagrams: u64,
        /// Their payload bytes.
        bytes: u64,
    },
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream failed underneath.
    #[error("stream: {0}")]
    Transport(#[from] TransportError),
    /// The length prefix is zero or above [`MAX_FRAME`].
    #[error("frame length {0} out of range")]
    BadLength(u32),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Unknown version byte.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The body did not decode (unknown variant, over the limit, trailing bytes...).
    #[error("malformed frame: {0}")]
    Malformed(String),
}

type LimitedConfig = Configuration<LittleEndian, Varint, Limit<MAX_FRAME>>;

fn bincode_config() -> LimitedConfig {
    config::standard().with_limit::<MAX_FRAME>()
}

fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, APP_VERSION];
    // Encoding our own in-memory messages cannot fail except by exceeding the limit, which
    // the field bounds (path, message) rule out; an empty body would be refused by the peer.
    if let Err(e) = bincode::serde::encode_into_std_write(msg, &mut out, bincode_config()) {
        tracing::debug!(error = %e, "encoding an application frame failed");
        out.truncate(5);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// The whole frame (length prefix included) for a request.
pub fn encode_request(req: &Request) -> Vec<u8> {
    encode_frame(req)
}

/// The whole frame (length prefix included) for a reply.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    encode_frame(reply)
}

fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (&version, rest) = body.split_first().ok_or(FrameError::Truncated)?;
    if version != APP_VERSION {
        return Err(FrameError::Version(version));
    }
    let (msg, used) = bincode::serde::decode_from_slice(rest, bincode_config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != rest.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len() - used
        )));
    }
    Ok(msg)
}

/// Decodes a frame body (after the length prefix) as a request and checks its bounds.
pub fn decode_request(body: &[u8]) -> Result<Request, FrameError> {
    let req: Request = decode_body(body)?;
    if let Request::File { path, .. } = &req
        && path.len() > MAX_PATH_LEN
    {
        return Err(FrameError::Malformed(format!(
            "path of {} bytes exceeds {MAX_PATH_LEN}",
            path.len()
        )));
    }
    Ok(req)
}

/// Decodes a frame body (after the length prefix) as a reply and checks its bounds.
pub fn decode_reply(body: &[u8]) -> Result<Reply, FrameError> {
    let reply: Reply = decode_body(body)?;
    if let Reply::Reject(r) | Reply::Failed(r) = &reply
        && r.message.len() > MAX_MESSAGE_LEN
    {
        return Err(FrameError::Malformed("reason too long".into()));
    }
    Ok(reply)
}

/// What [`FrameReader::poll`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum FramePoll {
    /// Not all of the frame is here yet: wait for the stream to become readable.
    Pending,
    /// A complete frame body (version byte + bincode).
    Frame(Vec<u8>),
    /// The stream ended cleanly before any byte of a new frame.
    Eof,
}

/// Reads one length-prefixed frame off a stream without ever reading past its end, so the
/// bytes after it (file data, pipe data) stay in the stream for whoever reads next.
#[derive(Debug, Default)]
pub struct FrameReader {
    len_buf: [u8; 4],
    len_have: usize,
    body: Vec<u8>,
    body_have: usize,
}

impl FrameReader {
    /// A reader at the start of a frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads as much of the frame as is available. After a `Frame` the reader is ready for
    /// the next frame.
    pub fn poll(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
    ) -> Result<FramePoll, FrameError> {
        while self.len_have < 4 {
            match transport.read(conn, stream, &mut self.len_buf[self.len_have..])? {
                StreamRead::Data(n) => self.len_have += n,
                StreamRead::Blocked => return Ok(FramePoll::Pending),
                StreamRead::Finished if self.len_have == 0 => return Ok(FramePoll::Eof),
                StreamRead::Finished => return Err(FrameError::Truncated),
            }
            if self.len_have == 4 {
                let len = u32::from_be_bytes(self.len_buf);
                if len == 0 || len as usize > MAX_FRAME {
                    return Err(FrameError::BadLength(len));
                }
                self.body = vec![0; len as usize];
                self.body_have = 0;
            }
        }
        while self.body_have < self.body.len() {
            match transport.read(conn, stream, &mut self.body[self.body_have..])? {
                StreamRead::Data(n) => self.body_have += n,
                StreamRead::Blocked => return Ok(FramePoll::Pending),
                StreamRead::Finished => return Err(FrameError::Truncated),
            }
        }
        self.len_have = 0;
        self.body_have = 0;
        Ok(FramePoll::Frame(std::mem::take(&mut self.body)))
    }
}

/// Bytes waiting to be written to a stream (a frame, a trailer), written as flow control
/// allows.
#[derive(Debug, Default)]
pub struct OutBuf {
    data: Vec<u8>,
    pos: usize,
}

impl OutBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `bytes` after whatever is pending.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos == self.data.len() {
            self.data.clear();
            self.pos = 0;
        }
        self.data.extend_from_slice(bytes);
    }

    /// Whether everything queued was handed to the transport.
    pub fn is_empty(&self) -> bool {
        self.pos == self.data.len()
    }

    /// Writes what the stream accepts; `Ok(true)` once everything is written.
    pub fn flush(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
    ) -> Result<bool, TransportError> {
        while self.pos < self.data.len() {
            let n = transport.write(conn, stream, &self.data[self.pos..])?;
            if n == 0 {
                return Ok(false);
            }
            self.pos += n;
        }
        Ok(true)
    }
}

/// Streams being ended by us: each gets its last frame ([`Reply::Reject`] or
/// [`Reply::Failed`]), then FIN. Reading was already stopped.
#[derive(Debug, Default)]
pub struct RejectQueue {
    pending: std::collections::HashMap<(ConnectionHandle, StreamId), OutBuf>,
}

impl RejectQueue {
    /// Stops reading `stream` and queues the rejection.
    pub fn reject(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        reason: Reason,
    ) {
        self.close_with(
            transport,
            conn,
            stream,
            CODE_REJECTED,
            Reply::Reject(reason),
        );
    }

    /// Stops reading `stream` with `stop_code` and queues `reply` as its last frame.
    pub fn close_with(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        stop_code: u32,
        reply: Reply,
    ) {
        let _ = transport.stop(conn, stream, stop_code);
        let mut out = OutBuf::new();
        out.push(&encode_reply(&reply));
        self.pending.insert((conn, stream), out);
        self.flush(transport, conn, stream);
    }

    /// Whether `stream` is being refused.
    pub fn contains(&self, conn: ConnectionHandle, stream: StreamId) -> bool {
        self.pending.contains_key(&(conn, stream))
    }

    /// Writes what is pending on one stream.
    pub fn flush(&mut self, transport: &mut Transport, conn: ConnectionHandle, stream: StreamId) {
        let Some(out) = self.pending.get_mut(&(conn, stream)) else {
            return;
        };
        match out.flush(transport, conn, stream) {
            Ok(false) => {}
            Ok(true) => {
                let _ = transport.finish(conn, stream);
                self.pending.remove(&(conn, stream));
            }
            Err(_) => {
                self.pending.remove(&(conn, stream));
            }
        }
    }

    /// Writes what is pending on every stream.
    pub fn flush_all(&mut self, transport: &mut Transport) {
        let keys: Vec<_> = self.pending.keys().copied().collect();
        for (conn, stream) in keys {
            self.flush(transport, conn, stream);
        }
    }

    /// Forgets a lost connection's streams.
    pub fn forget(&mut self, conn: ConnectionHandle) {
        self.pending.retain(|k, _| k.0 != conn);
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_bytes_requests() {
        assert_eq!(encode_request(&Request::Pipe), [0, 0, 0, 2, 1, 1]);
        assert_eq!(
            encode_request(&Request::File {
                path: "a/b".into(),
                size: 300,
                executable: true,
                resume: false,
            }),
            // len 11: version, variant 0, path len 3 + "a/b", size 300 as varint (251 u16
            // LE), executable, resume.
            [
                0, 0, 0, 11, 1, 0, 3, b'a', b'/', b'b', 251, 0x2c, 0x01, 1, 0
            ]
        );
        assert_eq!(
            encode_request(&Request::Bench {
                seconds: 10,
                reverse: false
            }),
            [0, 0, 0, 4, 1, 2, 10, 0]
        );
        assert_eq!(
            encode_request(&Request::BenchDatagrams {
                seconds: 1,
                reverse: true,
                rate: 1000,
            }),
            [0, 0, 0, 7, 1, 3, 1, 1, 251, 0xe8, 0x03]
        );
    }

    #[test]
    fn fixed_bytes_replies() {
        assert_eq!(
            encode_reply(&Reply::Accept {
                resume_offset: 7,
                prefix_hash: None
            }),
            [0, 0, 0, 4, 1, 0, 7, 0]
        );
        assert_eq!(
            encode_reply(&Reply::Reject(Reason::new(REASON_EXISTS, "x"))),
            [0, 0, 0, 5, 1, 1, 2, 1, b'x']
        );
        assert_eq!(encode_reply(&Reply::Verified), [0, 0, 0, 2, 1, 2]);
        assert_eq!(
            encode_reply(&Reply::Failed(Reason::new(REASON_HASH_MISMATCH, ""))),
            [0, 0, 0, 4, 1, 3, 6, 0]
        );
        assert_eq!(
            encode_reply(&Reply::BenchResult {
                bytes: 1,
                micros: 2
            }),
            [0, 0, 0, 4, 1, 4, 1, 2]
        );
        assert_eq!(
            encode_reply(&Reply::DatagramResult {
                datagrams: 3,
                bytes: 4
            }),
            [0, 0, 0, 4, 1, 5, 3, 4]
        );
    }

    #[test]
    fn round_trips() {
        for req in [
            Request::Pipe,
            Request::File {
                path: "dir/ünï/x".into(),
                size: u64::MAX,
                executable: false,
                resume: true,
            },
            Request::Bench {
                seconds: 3,
                reverse: true,
            },
        ] {
            let frame = encode_request(&req);
            assert_eq!(decode_request(&frame[4..]).unwrap(), req);
        }
        for reply in [
            Reply::Failed(Reason::new(REASON_IO, "disk full")),
            Reply::Accept {
                resume_offset: 9,
                prefix_hash: Some([7; 32]),
            },
        ] {
            assert_eq!(decode_reply(&encode_reply(&reply)[4..]).unwrap(), reply);
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(decode_request(&[]), Err(FrameError::Truncated)));
        assert!(matches!(
            decode_request(&[2, 1]),
            Err(FrameError::Version(2))
        ));
        assert!(decode_request(&[1, 9]).is_err());
        // Trailing byte.
        assert!(decode_request(&[1, 1, 0]).is_err());
        // A path claiming 2^40 bytes: refused by the limit, not allocated.
        let mut huge = vec![1, 0, 253];
        huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_request(&huge).is_err());
        // Over-long path and reason.
        let long = Request::File {
            path: "a".repeat(MAX_PATH_LEN + 1),
            size: 0,
            executable: false,
            resume: true,
        };
        assert!(decode_request(&encode_request(&long)[4..]).is_err());
        let long = Reply::Failed(Reason {
            code: 0,
            message: "m".repeat(MAX_MESSAGE_LEN + 1),
        });
        assert!(decode_reply(&encode_reply(&long)[4..]).is_err());
        // Reason::new cuts at a char boundary.
        assert_eq!(Reason::new(0, "é".repeat(400)).message.len(), 512);
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_request(&body);
            let _ = decode_reply(&body);
        }

        #[test]
        fn versioned_arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = vec![APP_VERSION];
            b.extend_from_slice(&body);
            let _ = decode_request(&b);
            let _ = decode_reply(&b);
        }

        #[test]
        fn file_requests_round_trip(path in "[a-z/]{0,40}", size in any::<u64>(), executable in any::<bool>()) {
            let req = Request::File { path, size, executable, resume: !executable };
            prop_assert_eq!(decode_request(&encode_request(&req)[4..]).unwrap(), req);
        }
    }
}
