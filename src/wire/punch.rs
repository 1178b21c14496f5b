//! Punch probes and path keepalives between two nodes, authenticated by the introduction's
//! punch nonce so that nobody but the two introduced peers can create or hold a direct path.
//!
//! ```text
//! 0      1       2      3       4            12          20                40       56
//! +------+-------+------+-------+------------+-----------+-----------------+--------+
//! | 0x21 | ver=1 | type | flags | tag (u64be)| txid u64be| observed address| MAC    |
//! +------+-------+------+-------+------------+-----------+-----------------+--------+
//! ```
//!
//! * `type`: [`PunchType`].
//! * `flags`: bit 0 is the sender's role (0 initiator, 1 responder). A node ignores packets
//!   carrying its own role, so a probe reflected back at its sender is not mistaken for the
//!   peer's.
//! * `tag`: identifies the introduction without revealing the nonce:
//!   the first 8 bytes of `BLAKE3-keyed(nonce, "burrow punch tag")`.
//! * `txid`: chosen by the prober, echoed in the answer.
//! * observed address: in answers (`Ack`, `Pong`), the source address the probe came from
//!   (family byte 4 or 6, then port, then 16 address bytes; zeros in probes). It tells a node
//!   its peer-reflexive address.
//! * MAC: the first 16 bytes of `BLAKE3-keyed(nonce, bytes[0..40])`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{KIND_PUNCH, WIRE_VERSION, WireError, check_header};

/// Total packet length.
pub const PACKET_LEN: usize = 56;
const MAC_OFFSET: usize = 40;

/// What a punch packet is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchType {
    /// Sent to a candidate to open the sender's NAT and test the path.
    Probe = 1,
    /// Answer to a probe: the path works in both directions.
    Ack = 2,
    /// Keepalive on an established direct path (holds the NAT binding, measures RTT).
    Ping = 3,
    /// Answer to a ping.
    Pong = 4,
    /// Sent over the relay by the side that opened many sockets for hard-NAT punching
    /// (`node::spray`): its sockets are open and sending, the other side may start probing.
    Ready = 5,
}

impl PunchType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => PunchType::Probe,
            2 => PunchType::Ack,
            3 => PunchType::Ping,
            4 => PunchType::Pong,
            5 => PunchType::Ready,
            _ => return None,
        })
    }
}

/// A decoded, authenticated punch packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchPacket {
    /// What it is.
    pub kind: PunchType,
    /// Whether the sender is the responder of the introduction.
    pub from_responder: bool,
    /// Introduction tag (see [`tag`]).
    pub tag: u64,
    /// Transaction ID.
    pub txid: u64,
    /// In answers: where the answered packet came from.
    pub observed: Option<SocketAddr>,
}

/// The tag that identifies an introduction, derived from its nonce.
pub fn tag(nonce: &[u8; 32]) -> u64 {
    let h = blake3::keyed_hash(nonce, b"burrow punch tag");
    let mut b = [0; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_be_bytes(b)
}

/// The tag of a packet, before authenticating it (to find which nonce to check with).
pub fn peek_tag(packet: &[u8]) -> Result<u64, WireError> {
    check_header(packet, KIND_PUNCH, PACKET_LEN)?;
    let mut b = [0; 8];
    b.copy_from_slice(&packet[4..12]);
    Ok(u64::from_be_bytes(b))
}

fn mac(nonce: &[u8; 32], body: &[u8]) -> [u8; 16] {
    let h = blake3::keyed_hash(nonce, body);
    let mut m = [0; 16];
    m.copy_from_slice(&h.as_bytes()[..16]);
    m
}

/// Writes a punch packet into `out` (at least [`PACKET_LEN`] bytes) and returns its length.
pub fn encode(nonce: &[u8; 32], p: &PunchPacket, out: &mut [u8]) -> Result<usize, WireError> {
    let Some(buf) = out.get_mut(..PACKET_LEN) else {
        return Err(WireError::BufferTooSmall {
            need: PACKET_LEN,
            have: out.len(),
        });
    };
    buf.fill(0);
    buf[0] = KIND_PUNCH;
    buf[1] = WIRE_VERSION;
    buf[2] = p.kind as u8;
    buf[3] = p.from_responder as u8;
    buf[4..12].copy_from_slice(&p.tag.to_be_bytes());
    buf[12..20].copy_from_slice(&p.txid.to_be_bytes());
    if let Some(addr) = p.observed {
        let (family, ip) = match addr.ip() {
            IpAddr::V4(v4) => {
                let mut b = [0; 16];
                b[..4].copy_from_slice(&v4.octets());
                (4, b)
            }
            IpAddr::V6(v6) => (6, v6.octets()),
        };
        buf[20] = family;
        buf[21..23].copy_from_slice(&addr.port().to_be_bytes());
        buf[23..39].copy_from_slice(&ip);
    }
    let m = mac(nonce, &buf[..MAC_OFFSET]);
    buf[MAC_OFFSET..].copy_from_slice(&m);
    Ok(PACKET_LEN)
}

/// Authenticates and decodes a punch packet with the introduction's nonce.
pub fn decode(nonce: &[u8; 32], packet: &[u8]) -> Result<PunchPacket, WireError> {
    check_header(packet, KIND_PUNCH, PACKET_LEN)?;
    if packet.len() != PACKET_LEN {
        return Err(WireError::Malformed(format!(
            "punch packet of {} bytes",
            packet.len()
        )));
    }
    let want = mac(nonce, &packet[..MAC_OFFSET]);
    // Constant-time comparison is not needed for a MAC checked once per packet with no
    // oracle, but blake3's Hash equality is constant-time anyway; compare as hashes.
    if !constant_time_eq(&want, &packet[MAC_OFFSET..]) {
        return Err(WireError::BadMac);
    }
    let kind = PunchType::from_u8(packet[2])
        .ok_or_else(|| WireError::Malformed(format!("punch type {}", packet[2])))?;
    let mut b = [0; 8];
    b.copy_from_slice(&packet[4..12]);
    let tag = u64::from_be_bytes(b);
    b.copy_from_slice(&packet[12..20]);
    let txid = u64::from_be_bytes(b);
    let port = u16::from_be_bytes([packet[21], packet[22]]);
    let observed = match packet[20] {
        0 => None,
        4 => {
            let ip = Ipv4Addr::new(packet[23], packet[24], packet[25], packet[26]);
            Some(SocketAddr::new(ip.into(), port))
        }
        6 => {
            let mut o = [0; 16];
            o.copy_from_slice(&packet[23..39]);
            Some(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        f => return Err(WireError::Malformed(format!("address family {f}"))),
    };
    Ok(PunchPacket {
        kind,
        from_responder: packet[3] & 1 == 1,
        tag,
        txid,
        observed,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 32] = [3; 32];

    #[test]
    fn fixed_bytes_probe() {
        let p = PunchPacket {
            kind: PunchType::Probe,
            from_responder: true,
            tag: 0x0102030405060708,
            txid: 9,
            observed: None,
        };
        let mut buf = [0u8; PACKET_LEN];
        assert_eq!(encode(&NONCE, &p, &mut buf).unwrap(), PACKET_LEN);
        assert_eq!(&buf[..12], &[0x21, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[12..20], &[0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(&buf[20..40], &[0; 20]);
        assert_eq!(decode(&NONCE, &buf).unwrap(), p);
        assert_eq!(peek_tag(&buf).unwrap(), 0x0102030405060708);
    }

    #[test]
    fn ack_carries_observed_address() {
        for addr in ["198.51.100.9:4000", "[2001:db8::9]:4000"] {
            let p = PunchPacket {
                kind: PunchType::Ack,
                from_responder: false,
                tag: tag(&NONCE),
                txid: u64::MAX,
                observed: Some(addr.parse().unwrap()),
            };
            let mut buf = [0u8; PACKET_LEN];
            encode(&NONCE, &p, &mut buf).unwrap();
            assert_eq!(decode(&NONCE, &buf).unwrap(), p);
        }
    }

    #[test]
    fn wrong_nonce_or_tampering_fails() {
        let p = PunchPacket {
            kind: PunchType::Ping,
            from_responder: false,
            tag: 1,
            txid: 2,
            observed: None,
        };
        let mut buf = [0u8; PACKET_LEN];
        encode(&NONCE, &p, &mut buf).unwrap();
        assert_eq!(decode(&[4; 32], &buf), Err(WireError::BadMac));
        buf[13] ^= 1;
        assert_eq!(decode(&NONCE, &buf), Err(WireError::BadMac));
        assert!(decode(&NONCE, &buf[..20]).is_err());
    }
}
