//! Stateless wire codecs shared by the node and the relay.
//!
//! Everything here parses untrusted bytes: every decoder is bounds-checked, never panics and
//! never allocates more than [`MAX_PACKET`] bytes for one message. Encoders write into a
//! caller-supplied buffer or append to a caller-supplied `Vec`.
//!
//! # UDP demultiplexing
//!
//! One UDP socket carries STUN, QUIC and burrow's own datagrams. They are told apart by the
//! first byte, following RFC 7983 and RFC 9443 ("Multiplexing Scheme Updates for QUIC"):
//!
//! | first byte    | protocol                                   | module            |
//! |---------------|--------------------------------------------|-------------------|
//! | `0x00..=0x03` | STUN (RFC 8489)                             | [`stun`]          |
//! | `0x20`        | burrow relay data (8-byte header + payload) | [`relay_data`]    |
//! | `0x21`        | burrow punch probe / ack                    | [`punch`]         |
//! | `0x22`        | burrow control datagram (bincode)           | [`control`]       |
//! | `0x23..=0x3F` | reserved for burrow                         | —                 |
//! | `0x40..=0x7F` | QUIC short header (RFC 9000 fixed bit set)  | transport         |
//! | `0xC0..=0xFF` | QUIC long header                            | transport         |
//! | anything else | dropped                                     | —                 |
//!
//! `0x20..=0x3F` is the DTLS range of RFC 7983; burrow never speaks DTLS, so the range is free
//! on a burrow socket. QUIC bit greasing (RFC 9287) must stay off, or QUIC packets could
//! leave the `0x40..` ranges.
//!
//! # TCP
//!
//! A TCP connection to the relay starts with the 4-byte [`frame::PREAMBLE`], then carries
//! length-prefixed frames whose bodies are exactly the burrow datagrams above (first byte
//! `0x20` or `0x22`). See [`frame`]. A TCP connection whose first byte is `0x00` or `0x01` is
//! STUN over TCP (RFC 8489 section 6.2.2) instead.

pub mod control;
pub mod frame;
pub mod peer_id;
pub mod punch;
pub mod relay_data;
pub mod stun;

pub use peer_id::PeerId;

/// The largest burrow packet (datagram, or TCP frame body) any decoder accepts.
///
/// It bounds every allocation made while decoding untrusted input: bincode 2 allocates a
/// claimed `Vec`/`String` length up front, so without this limit a 42-byte datagram can
/// claim a terabyte and abort the process.
pub const MAX_PACKET: usize = 65_536;

/// The version byte carried by every burrow packet (second byte, after the kind).
pub const WIRE_VERSION: u8 = 1;

/// First byte of a relay data packet.
pub const KIND_RELAY_DATA: u8 = 0x20;
/// First byte of a punch probe or acknowledgement.
pub const KIND_PUNCH: u8 = 0x21;
/// First byte of a control message.
pub const KIND_CONTROL: u8 = 0x22;

/// What a datagram's first byte says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketClass {
    /// STUN message (RFC 8489).
    Stun,
    /// Relay data: header + opaque end-to-end encrypted payload.
    RelayData,
    /// Punch probe or acknowledgement between two nodes.
    Punch,
    /// bincode control message.
    Control,
    /// QUIC packet (short or long header).
    Quic,
    /// Nothing burrow speaks; drop it.
    Unknown,
}

/// Classifies a datagram by its first byte (see the module table).
pub fn classify(packet: &[u8]) -> PacketClass {
    match packet.first() {
        None => PacketClass::Unknown,
        Some(0x00..=0x03) => PacketClass::Stun,
        Some(&KIND_RELAY_DATA) => PacketClass::RelayData,
        Some(&KIND_PUNCH) => PacketClass::Punch,
        Some(&KIND_CONTROL) => PacketClass::Control,
        Some(0x40..=0x7F) | Some(0xC0..=0xFF) => PacketClass::Quic,
        Some(_) => PacketClass::Unknown,
    }
}

/// Why a packet could not be decoded. Each variant is a reason to drop the packet (UDP) or
/// close the connection with that reason (TCP control session).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the fixed header needs.
    #[error("packet truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the header needs.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The first byte is not the kind this decoder handles.
    #[error("wrong packet kind 0x{0:02x}")]
    WrongKind(u8),
    /// The version byte is one this build does not speak.
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    /// Larger than [`MAX_PACKET`].
    #[error("packet of {0} bytes exceeds the {MAX_PACKET}-byte limit")]
    TooLarge(usize),
    /// The bincode body did not decode (bad variant, bad length, over the limit...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message authentication code did not verify.
    #[error("authentication failed")]
    BadMac,
    /// The output buffer is too small for the encoded packet.
    #[error("output buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// Checks the kind and version bytes shared by every burrow packet.
pub(crate) fn check_header(packet: &[u8], kind: u8, need: usize) -> Result<(), WireError> {
    if packet.len() < need {
        return Err(WireError::Truncated {
            need,
            have: packet.len(),
        });
    }
    if packet.len() > MAX_PACKET {
        return Err(WireError::TooLarge(packet.len()));
    }
    if packet[0] != kind {
        return Err(WireError::WrongKind(packet[0]));
    }
    if packet[1] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(packet[1]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_follows_rfc_9443_ranges() {
        assert_eq!(classify(&[]), PacketClass::Unknown);
        assert_eq!(classify(&[0x00]), PacketClass::Stun);
        assert_eq!(classify(&[0x01]), PacketClass::Stun);
        assert_eq!(classify(&[0x03]), PacketClass::Stun);
        assert_eq!(classify(&[0x04]), PacketClass::Unknown);
        assert_eq!(classify(&[0x20]), PacketClass::RelayData);
        assert_eq!(classify(&[0x21]), PacketClass::Punch);
        assert_eq!(classify(&[0x22]), PacketClass::Control);
        assert_eq!(classify(&[0x23]), PacketClass::Unknown);
        assert_eq!(classify(&[0x40]), PacketClass::Quic);
        assert_eq!(classify(&[0x7F]), PacketClass::Quic);
        assert_eq!(classify(&[0x80]), PacketClass::Unknown);
        assert_eq!(classify(&[0xC0]), PacketClass::Quic);
        assert_eq!(classify(&[0xFF]), PacketClass::Quic);
    }
}
