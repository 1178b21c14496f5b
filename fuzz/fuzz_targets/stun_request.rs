//! `stun::parse_binding_request` on arbitrary bytes. Whatever it accepts, the server side
//! must be able to answer, and the answer must parse as a response with the same
//! transaction ID.
#![no_main]

use std::net::SocketAddr;

use burrow::wire::stun;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stun::looks_like_stun(data, true);
    let _ = stun::transaction_id(data);
    let Some(req) = stun::parse_binding_request(data) else {
        return;
    };
    let mapped: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut out = [0u8; stun::MAX_BINDING_LEN];
    if !req.modern {
        let n = stun::classic_binding_success_raw(data, mapped, &mut out).unwrap();
        assert_eq!(&out[4..20], &data[4..20]);
        assert_eq!(n, 32);
        return;
    }
    if !req.unknown_required.is_empty() {
        let n = stun::binding_error(&req, 420, "Unknown Attribute", &req.unknown_required, &mut out);
        // A very long list may not fit in MAX_BINDING_LEN; that is an Err, not a panic.
        if let Ok(n) = n {
            assert!(stun::parse_binding_response(&out[..n]).is_err());
        }
        return;
    }
    let other: SocketAddr = "[2001:db8::2]:3479".parse().unwrap();
    let n = stun::binding_success(&req, mapped, Some(mapped), Some(other), &mut out).unwrap();
    let resp = stun::parse_binding_response(&out[..n]).unwrap();
    assert_eq!(resp.txid, req.txid);
    assert_eq!(resp.mapped, mapped);
    assert_eq!(resp.other_address, Some(other));
});
