//! `relay_data::parse` on arbitrary bytes: accepted exactly when the header is right, and
//! then the payload is the rest of the packet, untouched.
#![no_main]

use burrow::wire::{KIND_RELAY_DATA, MAX_PACKET, WIRE_VERSION, relay_data};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ok = data.len() >= relay_data::HEADER_LEN
        && data.len() <= MAX_PACKET
        && data[0] == KIND_RELAY_DATA
        && data[1] == WIRE_VERSION;
    match relay_data::parse(data) {
        Ok((channel, payload)) => {
            assert!(ok);
            assert_eq!(payload, &data[relay_data::HEADER_LEN..]);
            assert_eq!(relay_data::channel(data).unwrap(), channel);
            let mut again = Vec::new();
            relay_data::encode(channel, payload, &mut again);
            assert_eq!(relay_data::parse(&again).unwrap(), (channel, payload));
        }
        Err(_) => assert!(!ok),
    }
});
