//! `stun::parse_binding_response` on arbitrary bytes: no panic; what it accepts is a
//! well-framed STUN message with the magic cookie.
#![no_main]

use burrow::wire::stun;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = stun::parse_binding_response(data) {
        assert!(stun::looks_like_stun(data, false));
        assert_eq!(Some(resp.txid), stun::transaction_id(data));
        // A success response is never also taken for a request.
        assert!(stun::parse_binding_request(data).is_none());
    }
});
