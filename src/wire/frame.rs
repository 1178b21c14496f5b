//! TCP framing for the relay control session and TCP relaying.
//!
//! The client opens with the 4-byte [`PREAMBLE`], then both sides send frames:
//!
//! ```text
//! +----------------------+---------------------------------------+
//! | body length (u32 be) | body: a burrow packet (0x20 or 0x22)   |
//! +----------------------+---------------------------------------+
//! ```
//!
//! A body longer than [`MAX_FRAME_BODY`] or shorter than 2 bytes is a protocol violation:
//! the reader returns an error and the caller closes the connection with that reason.
//! The preamble makes a burrow stream distinguishable from STUN over TCP (first byte 0x00
//! or 0x01) and from stray HTTP or TLS on the same port.

use super::{MAX_PACKET, WIRE_VERSION, WireError};

/// Bytes a client sends first on a burrow TCP connection: "BRW" and the wire version.
pub const PREAMBLE: [u8; 4] = [b'B', b'R', b'W', WIRE_VERSION];

/// Bytes of the length prefix.
pub const LENGTH_LEN: usize = 4;

/// Largest frame body.
pub const MAX_FRAME_BODY: usize = MAX_PACKET;

/// Appends one frame (length prefix + body) to `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    if body.len() > MAX_FRAME_BODY {
        return Err(WireError::TooLarge(body.len()));
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// The length prefix for a body of `len` bytes.
pub fn length_prefix(len: usize) -> [u8; LENGTH_LEN] {
    (len as u32).to_be_bytes()
}

/// Incremental frame reader with a bounded buffer (at most [`MAX_BUFFER`] bytes: one maximal
/// frame plus its prefix and the preamble), for non-blocking sockets.
///
/// Use: fill [`FrameReader::read_buf`] from the socket, call [`FrameReader::filled`] with the
/// count, then take frames with [`FrameReader::next_frame`] until it returns `Ok(None)`;
/// repeat until the socket would block.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Whether the preamble is still expected (server side of a fresh connection).
    awaiting_preamble: bool,
}

/// Initial buffer size; it doubles only as far as a frame in flight needs. Small because a
/// relay keeps one reader per registered node and most sessions only ever carry small
/// control frames: 16 KiB made an idle node cost ~16.5 KB of relay RSS
/// (`benches/relay_scale.rs`), 512 B brings it to ~1.2 KB. Bulk TCP relaying grows its
/// reader to the frame size within a few reads.
const INITIAL_CAPACITY: usize = 512;

/// The most a [`FrameReader`] ever buffers: the preamble, one length prefix and one maximal
/// frame body. Holding this many bytes means a complete frame (or an error) is buffered.
pub const MAX_BUFFER: usize = PREAMBLE.len() + LENGTH_LEN + MAX_FRAME_BODY;

impl FrameReader {
    /// A reader; `expect_preamble` on the accepting (relay) side.
    pub fn new(expect_preamble: bool) -> Self {
        FrameReader {
            buf: vec![0; INITIAL_CAPACITY],
            start: 0,
            end: 0,
            awaiting_preamble: expect_preamble,
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Spare space to read into: compacts, then grows up to [`MAX_BUFFER`] bytes in all.
    ///
    /// Empty only when the buffer is full at [`MAX_BUFFER`], which means it already holds a
    /// complete frame or an error: take them with [`FrameReader::next_frame`] before reading
    /// again (a socket read into an empty slice returns 0, which looks like EOF). A driver
    /// that alternates one read with draining `next_frame` (as [`FrameReader::push`] does)
    /// never sees an empty slice.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() && self.buf.len() < MAX_BUFFER {
                // Never past MAX_BUFFER: a driver that keeps reading without taking frames
                // must not grow the buffer without bound (it used to grow by one byte per
                // call once full).
                let grown = (self.buf.len() * 2).min(MAX_BUFFER);
                self.buf.resize(grown, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written into the slice from [`FrameReader::read_buf`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies bytes in (for tests and simulators that have a slice, not a socket).
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Vec<u8>>, WireError> {
        let mut frames = Vec::new();
        while !data.is_empty() {
            let spare = self.read_buf();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.filled(n);
            data = &data[n..];
            while let Some(f) = self.next_frame()? {
                frames.push(f.to_vec());
            }
        }
        Ok(frames)
    }

    /// The next complete frame body, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, WireError> {
        if self.awaiting_preamble {
            if self.buffered() < PREAMBLE.len() {
                // Fail fast on a wrong first byte rather than waiting for four.
                if self.buffered() > 0 && self.buf[self.start] != PREAMBLE[0] {
                    return Err(WireError::Malformed("not a burrow TCP stream".into()));
                }
                return Ok(None);
            }
            let got = &self.buf[self.start..self.start + PREAMBLE.len()];
            if got[..3] != PREAMBLE[..3] {
                return Err(WireError::Malformed("not a burrow TCP stream".into()));
            }
            if got[3] != WIRE_VERSION {
                return Err(WireError::UnsupportedVersion(got[3]));
            }
            self.start += PREAMBLE.len();
            self.awaiting_preamble = false;
        }
        if self.buffered() < LENGTH_LEN {
            return Ok(None);
        }
        let s = self.start;
        let len = u32::from_be_bytes([
            self.buf[s],
            self.buf[s + 1],
            self.buf[s + 2],
            self.buf[s + 3],
        ]) as usize;
        if len > MAX_FRAME_BODY {
            return Err(WireError::TooLarge(len));
        }
        if len < 2 {
            return Err(WireError::Truncated { need: 2, have: len });
        }
        if self.buffered() < LENGTH_LEN + len {
            return Ok(None);
        }
        let body = s + LENGTH_LEN..s + LENGTH_LEN + len;
        self.start = body.end;
        if self.start == self.end {
            // Everything consumed: reset so the next read starts at the front.
            let (start, end) = (body.start, body.end);
            self.start = 0;
            self.end = 0;
            return Ok(Some(&self.buf[start..end]));
        }
        Ok(Some(&self.buf[body]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_bytes() {
        let mut out = Vec::new();
        encode(&[0x22, 1, 7], &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 3, 0x22, 1, 7]);
    }

    #[test]
    fn reads_frames_split_anywhere() {
        let mut wire = PREAMBLE.to_vec();
        for i in 0..50u8 {
            encode(&vec![0x22; 2 + i as usize * 37], &mut wire).unwrap();
        }
        for chunk in [1, 3, 7, 4096, 100_000] {
            let mut r = FrameReader::new(true);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                got.extend(r.push(piece).unwrap());
            }
            assert_eq!(got.len(), 50, "chunk {chunk}");
            for (i, f) in got.iter().enumerate() {
                assert_eq!(f.len(), 2 + i * 37);
            }
        }
    }

    #[test]
    fn maximal_frame_fits() {
        let mut wire = Vec::new();
        encode(&vec![0x20; MAX_FRAME_BODY], &mut wire).unwrap();
        let mut r = FrameReader::new(false);
        let got = r.push(&wire).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), MAX_FRAME_BODY);
    }

    #[test]
    fn reading_without_taking_frames_stays_bounded() {
        // Regression (found by tests/wire_props.rs): a driver that read until the buffer was
        // full without calling next_frame made the buffer grow one byte per call, forever.
        let mut r = FrameReader::new(true);
        let mut total = 0;
        for _ in 0..10 {
            let spare = r.read_buf();
            spare.fill(0x22);
            let n = spare.len();
            r.filled(n);
            total += n;
        }
        assert_eq!(total, MAX_BUFFER);
        assert!(r.read_buf().is_empty());
        // What is buffered is a complete frame... or here, since the first byte is not 'B',
        // an error; either way next_frame makes progress.
        assert!(r.next_frame().is_err());
        let mut r = FrameReader::new(false);
        let mut wire = Vec::new();
        encode(&vec![0x20; MAX_FRAME_BODY], &mut wire).unwrap();
        encode(&[0x22, 1], &mut wire).unwrap();
        let mut fed = 0;
        while !r.read_buf().is_empty() && fed < wire.len() {
            let spare = r.read_buf();
            let n = spare.len().min(wire.len() - fed);
            spare[..n].copy_from_slice(&wire[fed..fed + n]);
            r.filled(n);
            fed += n;
        }
        assert_eq!(r.next_frame().unwrap().unwrap().len(), MAX_FRAME_BODY);
        assert!(!r.read_buf().is_empty());
    }

    #[test]
    fn oversize_and_bad_preamble_are_errors() {
        let mut r = FrameReader::new(false);
        assert_eq!(
            r.push(&[0xff, 0xff, 0xff, 0xff]),
            Err(WireError::TooLarge(0xffff_ffff))
        );
        let mut r = FrameReader::new(true);
        assert!(matches!(
            r.push(b"GET / HTTP/1.1\r\n"),
            Err(WireError::Malformed(_))
        ));
        let mut r = FrameReader::new(true);
        assert_eq!(r.push(b"BRW\x09"), Err(WireError::UnsupportedVersion(9)));
        assert!(encode(&vec![0; MAX_FRAME_BODY + 1], &mut Vec::new()).is_err());
    }
}
