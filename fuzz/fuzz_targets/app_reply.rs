//! `app::protocol::decode_reply` on arbitrary frame bodies, as sent and behind a valid
//! version byte. Whatever decodes respects the bounds (reason <= MAX_MESSAGE_LEN) and
//! re-encodes to a frame with a correct length prefix that decodes to the same reply;
//! re-encoding is never longer than the input (our encoding is the minimal one).
#![no_main]

use burrow::app::protocol::{self, APP_VERSION, MAX_FRAME, MAX_MESSAGE_LEN, Reply};
use libfuzzer_sys::fuzz_target;

fn check(body: &[u8]) {
    let Ok(reply) = protocol::decode_reply(body) else {
        return;
    };
    if let Reply::Reject(r) | Reply::Failed(r) = &reply {
        assert!(r.message.len() <= MAX_MESSAGE_LEN);
    }
    let frame = protocol::encode_reply(&reply);
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "length prefix");
    assert!((2..=MAX_FRAME).contains(&len));
    assert!(len <= body.len(), "re-encoding is longer than the input");
    assert_eq!(frame[4], APP_VERSION);
    assert_eq!(
        protocol::decode_reply(&frame[4..]).expect("re-decodes"),
        reply
    );
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut versioned = Vec::with_capacity(data.len() + 1);
    versioned.push(APP_VERSION);
    versioned.extend_from_slice(data);
    check(&versioned);
});
