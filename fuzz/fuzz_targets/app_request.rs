//! `app::protocol::decode_request` on arbitrary frame bodies, as sent and behind a valid
//! version byte. Whatever decodes respects the bounds (path <= MAX_PATH_LEN) and re-encodes
//! to a frame with a correct length prefix that decodes to the same request; re-encoding
//! is never longer than the input (our encoding is the minimal one).
#![no_main]

use burrow::app::protocol::{self, APP_VERSION, MAX_FRAME, MAX_PATH_LEN, Request};
use libfuzzer_sys::fuzz_target;

fn check(body: &[u8]) {
    let Ok(req) = protocol::decode_request(body) else {
        return;
    };
    if let Request::File { path, .. } = &req {
        assert!(path.len() <= MAX_PATH_LEN);
    }
    let frame = protocol::encode_request(&req);
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "length prefix");
    assert!((2..=MAX_FRAME).contains(&len));
    assert!(len <= body.len(), "re-encoding is longer than the input");
    assert_eq!(frame[4], APP_VERSION);
    assert_eq!(
        protocol::decode_request(&frame[4..]).expect("re-decodes"),
        req
    );
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut versioned = Vec::with_capacity(data.len() + 1);
    versioned.push(APP_VERSION);
    versioned.extend_from_slice(data);
    check(&versioned);
});
