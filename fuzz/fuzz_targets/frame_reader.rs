//! `frame::FrameReader` fed arbitrary bytes in arbitrary pieces, through both the socket
//! API (`read_buf` / `filled` / `next_frame`, in an order the input chooses) and `push`.
//! No panic; frames are 2..=MAX_FRAME_BODY bytes; the buffer never passes `MAX_BUFFER`;
//! an error, once reported, is reported again.
//!
//! Input: byte 0 = flags (bit 0: expect the preamble, bit 1: prepend a valid preamble),
//! byte 1 = op seed, rest = the stream.
#![no_main]

use burrow::wire::frame::{self, FrameReader, MAX_BUFFER, MAX_FRAME_BODY, PREAMBLE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [flags, seed, rest @ ..] = data else {
        return;
    };
    let expect_preamble = flags & 1 == 1;
    let mut stream = Vec::with_capacity(rest.len() + 4);
    if flags & 2 == 2 {
        stream.extend_from_slice(&PREAMBLE);
    }
    stream.extend_from_slice(rest);

    // Socket style: read sizes and drain points from a tiny LCG seeded by the input.
    let mut r = FrameReader::new(expect_preamble);
    let mut state = u32::from(*seed) | 1;
    let mut pos = 0;
    let mut failed = false;
    let mut rounds = 0;
    while pos < stream.len() && rounds < 10_000 {
        rounds += 1;
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let buffered = r.buffered();
        let spare = r.read_buf();
        assert!(spare.len() + buffered <= MAX_BUFFER);
        let want = match state >> 28 {
            0 => 1,
            1..=7 => (state >> 8) as usize % 64 + 1,
            _ => (state >> 8) as usize % 100_000 + 1,
        };
        let n = want.min(spare.len()).min(stream.len() - pos);
        spare[..n].copy_from_slice(&stream[pos..pos + n]);
        r.filled(n);
        pos += n;
        if state & 0x300 != 0 || n == 0 {
            loop {
                match r.next_frame() {
                    Ok(Some(f)) => {
                        assert!(!failed, "frame after an error");
                        assert!((2..=MAX_FRAME_BODY).contains(&f.len()));
                    }
                    Ok(None) => {
                        assert!(!failed, "recovered after an error");
                        break;
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                break;
            }
        }
    }

    // Convenience API, fixed pieces.
    let mut r = FrameReader::new(expect_preamble);
    let piece = usize::from(*seed).max(1) * 64;
    for chunk in stream.chunks(piece) {
        match r.push(chunk) {
            Ok(frames) => {
                for f in frames {
                    assert!((2..=MAX_FRAME_BODY).contains(&f.len()));
                }
            }
            Err(_) => break,
        }
        assert!(r.buffered() <= MAX_BUFFER);
    }
    let _ = frame::length_prefix(stream.len());
});
