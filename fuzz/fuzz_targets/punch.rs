//! `punch::decode` on arbitrary bytes, twice: as sent (the MAC must refuse it), and with a
//! valid MAC computed over the fuzzed first 40 bytes, so the fields behind the MAC get
//! fuzzed too. Whatever decodes must re-encode and decode to the same packet.
#![no_main]

use burrow::wire::punch;
use libfuzzer_sys::fuzz_target;

const NONCE: [u8; 32] = [7; 32];
const MAC_OFFSET: usize = 40;

fn check(packet: &[u8]) {
    let _ = punch::peek_tag(packet);
    if let Ok(p) = punch::decode(&NONCE, packet) {
        assert_eq!(packet.len(), punch::PACKET_LEN);
        assert_eq!(punch::peek_tag(packet).unwrap(), p.tag);
        let mut again = [0u8; punch::PACKET_LEN];
        punch::encode(&NONCE, &p, &mut again).unwrap();
        assert_eq!(punch::decode(&NONCE, &again).unwrap(), p);
        assert!(punch::decode(&[8; 32], packet).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= MAC_OFFSET {
        let mut packet = data[..MAC_OFFSET].to_vec();
        let mac = blake3::keyed_hash(&NONCE, &packet);
        packet.extend_from_slice(&mac.as_bytes()[..16]);
        check(&packet);
    }
});
