//! `transport::tls::peer_id_from_cert` on untrusted DER, in two modes (byte 0, bit 0):
//!
//! - 0: the rest is the whole certificate, as a peer would send it.
//! - 1: the rest is the *contents* of a tbsCertificate; the target wraps it in a
//!   Certificate signed by a fixed identity (Ed25519 algorithm identifiers, valid
//!   signature), so the fuzzer gets past the self-signature to the field walk.
//!
//! Whatever parses must yield a PeerId that is a valid Ed25519 key (decompresses, and
//! round-trips through its text form), whose 32 bytes appear in the input; in mode 1 it
//! must be the signer's key (nothing else can verify that signature).
#![no_main]

use burrow::identity::Identity;
use burrow::transport::tls;
use burrow::wire::PeerId;
use libfuzzer_sys::fuzz_target;

/// DER AlgorithmIdentifier for Ed25519 (RFC 8410): SEQUENCE { OID 1.3.101.112 }.
const ED25519_ALG: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

fn der_len(len: usize, out: &mut Vec<u8>) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xffff => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        _ => out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
    }
}

fn der(tag: u8, contents: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    der_len(contents.len(), out);
    out.extend_from_slice(contents);
}

fn check_peer(id: PeerId, input: &[u8]) {
    assert!(
        ed25519_dalek::VerifyingKey::from_bytes(&id.0).is_ok(),
        "accepted key is not a valid Ed25519 point"
    );
    assert_eq!(
        id.to_string().parse::<PeerId>().expect("text form parses"),
        id
    );
    assert!(
        input.windows(32).any(|w| w == id.0),
        "key not taken from the input"
    );
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(id) = tls::peer_id_from_cert(rest) {
            check_peer(id, rest);
        }
        return;
    }
    let signer = Identity::from_secret([1; 32]);
    let mut tbs = Vec::with_capacity(rest.len() + 4);
    der(0x30, rest, &mut tbs);
    let sig = signer.sign(&tbs);
    let mut bits = Vec::with_capacity(65);
    bits.push(0);
    bits.extend_from_slice(&sig.to_bytes());
    let mut contents = tbs;
    contents.extend_from_slice(ED25519_ALG);
    der(0x03, &bits, &mut contents);
    let mut cert = Vec::with_capacity(contents.len() + 4);
    der(0x30, &contents, &mut cert);
    if let Ok(id) = tls::peer_id_from_cert(&cert) {
        check_peer(id, &cert);
        assert_eq!(
            id,
            signer.peer_id(),
            "a signature verified under another key"
        );
    }
});
