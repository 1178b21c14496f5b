//! `control::decode::<UdpMsg>` on arbitrary bytes, as sent and behind a valid header.
//! Whatever decodes must re-encode and decode to the same message.
#![no_main]

use burrow::wire::control::{self, UdpMsg};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    if let Ok(msg) = control::decode::<UdpMsg>(bytes) {
        let again = control::to_vec(&msg).expect("a decoded message re-encodes");
        assert_eq!(control::decode::<UdpMsg>(&again).expect("re-decodes"), msg);
        let _ = control::decode_valid::<UdpMsg>(bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut framed = Vec::with_capacity(data.len() + 2);
    framed.extend_from_slice(&[burrow::wire::KIND_CONTROL, burrow::wire::WIRE_VERSION]);
    framed.extend_from_slice(data);
    check(&framed);
});
