//! `app::protocol::FrameReader` reading arbitrary bytes off a real QUIC stream: two
//! in-memory `Transport`s (connected once per process, virtual clock, no sockets), a new
//! unidirectional stream per input, written in pieces the input chooses, polled after each.
//!
//! Checked against a model of the framing: the reader yields exactly the frames the bytes
//! hold (each 1..=MAX_FRAME bytes, so its buffer stays bounded), then `Eof` at a clean end,
//! `BadLength` for a zero or oversized prefix, or `Truncated` for an end inside a frame. It
//! never reads past the frame it returns: after a `BadLength` the rest of the stream is
//! still there, byte for byte.
//!
//! Input: byte 0 = seed for the piece sizes, rest = the stream.
#![no_main]

use std::cell::RefCell;
use std::time::{Duration, Instant};

use burrow::app::protocol::{FrameError, FramePoll, FrameReader, MAX_FRAME};
use burrow::identity::Identity;
use burrow::transport::{
    ConnectionHandle, Dir, Event, StreamId, StreamRead, Transport, TransportConfig,
};
use burrow::wire::PeerId;
use libfuzzer_sys::fuzz_target;

struct Pair {
    now: Instant,
    a: Transport,
    b: Transport,
    id_a: PeerId,
    id_b: PeerId,
    conn_a: ConnectionHandle,
    conn_b: Option<ConnectionHandle>,
}

impl Pair {
    fn new() -> Pair {
        let config = |s: u8| TransportConfig {
            rng_seed: [s; 32],
            // Small windows: the fuzz inputs are small, and big buffers would trip
            // -malloc_limit_mb=1.
            stream_receive_window: 256 << 10,
            receive_window: 512 << 10,
            send_window: 512 << 10,
            ..TransportConfig::default()
        };
        let (ia, ib) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        );
        let mut a = Transport::new(&ia, config(101)).unwrap();
        let b = Transport::new(&ib, config(102)).unwrap();
        let now = Instant::now();
        let conn_a = a.connect(now, ib.peer_id()).unwrap();
        let mut p = Pair {
            now,
            a,
            b,
            id_a: ia.peer_id(),
            id_b: ib.peer_id(),
            conn_a,
            conn_b: None,
        };
        p.settle(|p| p.conn_b.is_some());
        p
    }

    /// Moves datagrams both ways until neither side has anything to send.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit(self.now) {
                for d in t.datagrams() {
                    self.b.handle_datagram(self.now, self.id_a, d);
                }
                moved = true;
            }
            while let Some(t) = self.b.poll_transmit(self.now) {
                for d in t.datagrams() {
                    self.a.handle_datagram(self.now, self.id_b, d);
                }
                moved = true;
            }
            while self.a.poll_event().is_some() {}
            while let Some(e) = self.b.poll_event() {
                if let Event::Connected { conn, .. } = e {
                    self.conn_b = Some(conn);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("pump did not settle");
    }

    /// Pumps, running timers (ACK delay, pacing) until `done` holds. Panics after a
    /// generous number of rounds (a hang guard, not a timing assertion).
    fn settle(&mut self, mut done: impl FnMut(&mut Pair) -> bool) {
        for _ in 0..2_000 {
            self.pump();
            if done(self) {
                return;
            }
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            self.now = match next {
                Some(t) if t > self.now => t,
                _ => self.now + Duration::from_millis(1),
            };
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
        }
        panic!("transport pair did not settle");
    }
}

thread_local! {
    static PAIR: RefCell<Option<Pair>> = const { RefCell::new(None) };
}

/// What the model says the reader must produce.
#[derive(Debug, PartialEq)]
enum End {
    Eof,
    BadLength(u32),
    Truncated,
}

/// The frames in `stream`, how it ends, and how many bytes the reader consumes.
fn model(stream: &[u8]) -> (Vec<&[u8]>, End, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &stream[pos..];
        if rest.is_empty() {
            return (frames, End::Eof, pos);
        }
        if rest.len() < 4 {
            return (frames, End::Truncated, stream.len());
        }
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap());
        if len == 0 || len as usize > MAX_FRAME {
            return (frames, End::BadLength(len), pos + 4);
        }
        if rest.len() - 4 < len as usize {
            return (frames, End::Truncated, stream.len());
        }
        frames.push(&rest[4..4 + len as usize]);
        pos += 4 + len as usize;
    }
}

struct ReadState {
    reader: FrameReader,
    frames: Vec<Vec<u8>>,
    end: Option<Result<End, String>>,
}

impl ReadState {
    /// Polls the reader until it blocks or ends.
    fn poll(&mut self, b: &mut Transport, conn: ConnectionHandle, stream: StreamId) {
        while self.end.is_none() {
            match self.reader.poll(b, conn, stream) {
                Ok(FramePoll::Pending) => return,
                Ok(FramePoll::Frame(f)) => {
                    assert!((1..=MAX_FRAME).contains(&f.len()), "frame of {}", f.len());
                    self.frames.push(f);
                }
                Ok(FramePoll::Eof) => self.end = Some(Ok(End::Eof)),
                Err(FrameError::BadLength(n)) => self.end = Some(Ok(End::BadLength(n))),
                Err(FrameError::Truncated) => self.end = Some(Ok(End::Truncated)),
                Err(e) => self.end = Some(Err(e.to_string())),
            }
        }
    }
}

fn run(p: &mut Pair, seed: u8, stream: &[u8]) {
    let conn_b = p.conn_b.expect("connected");
    let mut sa = None;
    p.settle(|p| {
        sa =
            p.a.open_stream(p.conn_a, Dir::Uni)
                .expect("connection alive");
        sa.is_some()
    });
    let sa = sa.unwrap();

    let mut state = u32::from(seed) | 1;
    let mut sb: Option<StreamId> = None;
    let mut rs = ReadState {
        reader: FrameReader::new(),
        frames: Vec::new(),
        end: None,
    };
    let mut pos = 0;
    while pos < stream.len() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let want = match state >> 29 {
            0 => 1,
            1..=4 => (state >> 8) as usize % 8 + 1,
            _ => (state >> 8) as usize % 3000 + 1,
        };
        let piece = &stream[pos..(pos + want).min(stream.len())];
        let mut written = 0;
        p.settle(|p| {
            written += p.a.write(p.conn_a, sa, &piece[written..]).expect("write");
            written == piece.len()
        });
        pos += piece.len();
        p.pump();
        if sb.is_none() {
            sb = p.b.accept_stream(conn_b, Dir::Uni).expect("accept");
        }
        if let Some(s) = sb {
            rs.poll(&mut p.b, conn_b, s);
        }
    }
    p.a.finish(p.conn_a, sa).expect("finish");
    p.settle(|p| {
        if sb.is_none() {
            sb = p.b.accept_stream(conn_b, Dir::Uni).expect("accept");
        }
        if let Some(s) = sb {
            rs.poll(&mut p.b, conn_b, s);
        }
        rs.end.is_some()
    });
    let sb = sb.unwrap();

    let (frames, end, consumed) = model(stream);
    assert_eq!(rs.end, Some(Ok(end)), "how the stream ended");
    assert_eq!(rs.frames.len(), frames.len(), "frame count");
    for (got, want) in rs.frames.iter().zip(&frames) {
        assert_eq!(got.as_slice(), *want);
    }

    // Drain what the reader left: it must be exactly the bytes after what it consumed.
    // Reading to EOF also lets quinn-proto free the stream.
    let mut left = Vec::new();
    let mut buf = [0u8; 4096];
    let mut finished = rs.end == Some(Ok(End::Eof)) || rs.end == Some(Ok(End::Truncated));
    p.settle(|p| {
        while !finished {
            match p.b.read(conn_b, sb, &mut buf).expect("read") {
                StreamRead::Data(n) => left.extend_from_slice(&buf[..n]),
                StreamRead::Blocked => return false,
                StreamRead::Finished => finished = true,
            }
        }
        true
    });
    assert_eq!(
        left.as_slice(),
        &stream[consumed..],
        "bytes left in the stream"
    );
}

fuzz_target!(|data: &[u8]| {
    let [seed, stream @ ..] = data else {
        return;
    };
    if stream.len() > 4 * MAX_FRAME {
        return;
    }
    PAIR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let p = cell.get_or_insert_with(Pair::new);
        run(p, *seed, stream);
    });
});
