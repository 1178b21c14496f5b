//! Peer identity on the wire: an Ed25519 public key and its short text form.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A node's identity: its Ed25519 public key. Only the holder of the matching secret key
/// can register this ID with a relay or complete a QUIC handshake as this peer.
///
/// Text form: the 32 key bytes in lowercase RFC 4648 base32 without padding (52 characters),
/// chosen over hex because it is shorter and case-insensitive to type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(pub [u8; 32]);

/// Length of a [`PeerId`] in its text form.
pub const PEER_ID_TEXT_LEN: usize = 52;

/// Why a peer ID string or key could not be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerIdError {
    /// Wrong number of characters.
    #[error("a peer ID is {PEER_ID_TEXT_LEN} characters of base32, got {0} characters")]
    Length(usize),
    /// A character outside a-z, 2-7.
    #[error("a peer ID is base32 (letters a-z and digits 2-7): {0}")]
    Encoding(String),
    /// The bytes are not a valid Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    NotAKey,
}

impl PeerId {
    /// Verifies an Ed25519 signature made by this peer's secret key.
    ///
    /// Uses `verify_strict` so that malleable or small-order-key signatures are refused.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = Signature::from_bytes(signature);
        key.verify_strict(message, &sig).is_ok() && key.verify(message, &sig).is_ok()
    }

    /// Whether the bytes are a valid Ed25519 public key (a point on the curve).
    pub fn is_valid_key(&self) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok()
    }

    /// First 8 characters of the text form, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != PEER_ID_TEXT_LEN {
            return Err(PeerIdError::Length(s.chars().count()));
        }
        let upper = s.to_ascii_uppercase();
        let bytes = BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|e| PeerIdError::Encoding(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PeerIdError::Encoding("wrong decoded length".into()))?;
        let id = PeerId(arr);
        if !id.is_valid_key() {
            return Err(PeerIdError::NotAKey);
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn text_form_round_trips() {
        let id = PeerId(key(7).verifying_key().to_bytes());
        let text = id.to_string();
        assert_eq!(text.len(), PEER_ID_TEXT_LEN);
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        assert_eq!(text.to_ascii_uppercase().parse::<PeerId>().unwrap(), id);
    }

    #[test]
    fn bad_text_is_a_clear_error() {
        assert_eq!("abc".parse::<PeerId>(), Err(PeerIdError::Length(3)));
        let bad = "1".repeat(PEER_ID_TEXT_LEN);
        assert!(matches!(
            bad.parse::<PeerId>(),
            Err(PeerIdError::Encoding(_))
        ));
    }

    #[test]
    fn signatures_verify_only_for_the_signer() {
        let k = key(1);
        let id = PeerId(k.verifying_key().to_bytes());
        let sig = k.sign(b"hello").to_bytes();
        assert!(id.verify(b"hello", &sig));
        assert!(!id.verify(b"hellO", &sig));
        let other = PeerId(key(2).verifying_key().to_bytes());
        assert!(!other.verify(b"hello", &sig));
    }
}
