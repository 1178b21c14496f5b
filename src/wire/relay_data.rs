//! Relay data packets: an 8-byte header and an opaque, end-to-end encrypted payload.
//!
//! ```text
//! 0      1        2       3        4                8
//! +------+--------+-------+--------+----------------+-----------------
//! | 0x20 | ver=1  | flags | rsvd=0 | channel (u32be)| payload ...
//! +------+--------+-------+--------+----------------+-----------------
//! ```
//!
//! The same bytes travel node → relay and relay → node: the relay looks the channel up,
//! checks that the sender is one of its two ends and forwards the packet unchanged to the
//! other end. No rewrite means a burst of equal-size segments received with GRO can be
//! re-sent with one GSO call. Over TCP the packet is a frame body (see [`super::frame`]).

use super::{KIND_RELAY_DATA, WIRE_VERSION, WireError, check_header};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;

/// Identifies one introduced pair of nodes on a relay. Assigned by the relay in the
/// introduction; both ends use the same value.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ChannelId(pub u32);

/// Writes the header into the first [`HEADER_LEN`] bytes of `buf`; the payload goes after.
pub fn write_header(buf: &mut [u8], channel: ChannelId) -> Result<(), WireError> {
    let Some(header) = buf.get_mut(..HEADER_LEN) else {
        return Err(WireError::BufferTooSmall {
            need: HEADER_LEN,
            have: buf.len(),
        });
    };
    header[0] = KIND_RELAY_DATA;
    header[1] = WIRE_VERSION;
    header[2] = 0;
    header[3] = 0;
    header[4..8].copy_from_slice(&channel.0.to_be_bytes());
    Ok(())
}

/// Appends a whole relay data packet to `out`.
pub fn encode(channel: ChannelId, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    // Cannot fail: the slice is exactly HEADER_LEN long.
    let _ = write_header(&mut out[start..], channel);
    out.extend_from_slice(payload);
}

/// Reads the channel without touching the payload.
pub fn channel(packet: &[u8]) -> Result<ChannelId, WireError> {
    check_header(packet, KIND_RELAY_DATA, HEADER_LEN)?;
    Ok(ChannelId(u32::from_be_bytes([
        packet[4], packet[5], packet[6], packet[7],
    ])))
}

/// Splits a relay data packet into its channel and payload.
pub fn parse(packet: &[u8]) -> Result<(ChannelId, &[u8]), WireError> {
    let channel = channel(packet)?;
    Ok((channel, &packet[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_bytes() {
        let mut out = Vec::new();
        encode(ChannelId(0x0102_0304), b"hi", &mut out);
        assert_eq!(out, [0x20, 1, 0, 0, 1, 2, 3, 4, b'h', b'i']);
        assert_eq!(parse(&out).unwrap(), (ChannelId(0x0102_0304), &b"hi"[..]));
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(matches!(
            parse(&[0x20, 1, 0]),
            Err(WireError::Truncated { .. })
        ));
        assert_eq!(
            parse(&[0x21, 1, 0, 0, 0, 0, 0, 0]),
            Err(WireError::WrongKind(0x21))
        );
        assert_eq!(
            parse(&[0x20, 9, 0, 0, 0, 0, 0, 0]),
            Err(WireError::UnsupportedVersion(9))
        );
        assert_eq!(
            parse(&vec![0x20; super::super::MAX_PACKET + 1]),
            Err(WireError::TooLarge(super::super::MAX_PACKET + 1))
        );
    }
}
