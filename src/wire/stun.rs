//! STUN (RFC 8489) Binding glue on top of `stun-rs`: the client side (build a request, read
//! a response) and the server side (read a request, build the answer), including the
//! RFC 5780 NAT behaviour discovery attributes (CHANGE-REQUEST, OTHER-ADDRESS,
//! RESPONSE-ORIGIN).

use std::net::SocketAddr;

use stun_rs::attributes::discovery::{
    ChangeRequest, ChangeRequestFlags, OtherAddress, ResponseOrigin, ResponsePort,
};
use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MappedAddress, Software, UnknownAttributes, XorMappedAddress,
};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessage,
    StunMessageBuilder, TransactionId,
};

/// The STUN magic cookie (RFC 8489 section 5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// A STUN header is 20 bytes (RFC 8489 section 5).
pub const HEADER_LEN: usize = 20;

/// Room for any Binding message burrow builds.
pub const MAX_BINDING_LEN: usize = 256;

/// The SOFTWARE value the relay puts in its responses.
pub const SOFTWARE: &str = concat!("burrow ", env!("CARGO_PKG_VERSION"));

/// Why a STUN message was not usable.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StunError {
    /// Not a well-formed STUN message (the text comes from the decoder).
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// Well-formed, but not the method or class expected here.
    #[error("not a Binding {0}")]
    NotBinding(&'static str),
    /// A success response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS.
    #[error("Binding response carries no mapped address")]
    NoMappedAddress,
    /// An error response (RFC 8489 section 14.8).
    #[error("STUN error {code}: {reason}")]
    ErrorResponse {
        /// The error code, e.g. 420.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// The encoder failed (buffer too small).
    #[error("cannot encode STUN message: {0}")]
    Encode(String),
}

/// Quick pre-check before full decoding: 20-byte header, first two bits zero, magic cookie,
/// length a multiple of 4 that matches the datagram (RFC 8489 section 5). RFC 3489 clients
/// send no magic cookie; they are accepted when `allow_classic` is set.
pub fn looks_like_stun(packet: &[u8], allow_classic: bool) -> bool {
    if packet.len() < HEADER_LEN || packet[0] & 0xC0 != 0 {
        return false;
    }
    let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    if !len.is_multiple_of(4) || HEADER_LEN + len != packet.len() {
        return false;
    }
    let cookie = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    cookie == MAGIC_COOKIE || allow_classic
}

/// The transaction ID of a STUN-looking packet (bytes 8..20), without a full decode.
pub fn transaction_id(packet: &[u8]) -> Option<[u8; 12]> {
    packet.get(8..20)?.try_into().ok()
}

fn decode(packet: &[u8]) -> Result<StunMessage, StunError> {
    let decoder = MessageDecoderBuilder::default().build();
    let (msg, _) = decoder
        .decode(packet)
        .map_err(|e| StunError::Malformed(format!("{e:?}")))?;
    Ok(msg)
}

fn encode(msg: &StunMessage, out: &mut [u8]) -> Result<usize, StunError> {
    let encoder = MessageEncoderBuilder::default().build();
    encoder
        .encode(out, msg)
        .map_err(|e| StunError::Encode(format!("{e:?}")))
}

// ---------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------

/// What a client asks the server to change when answering (RFC 5780 section 7.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    /// Answer from the alternate IP address.
    pub ip: bool,
    /// Answer from the alternate port.
    pub port: bool,
}

/// Writes a Binding request into `out` and returns its length.
///
/// The request carries FINGERPRINT so that a server multiplexing STUN with other protocols
/// (as burrow's relay does) can tell it apart (RFC 8489 section 7.3 / 14.7).
pub fn binding_request(
    txid: [u8; 12],
    change: Option<Change>,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut builder = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(txid));
    if let Some(change) = change {
        let mut flags = enumflags2::BitFlags::<ChangeRequestFlags>::empty();
        if change.ip {
            flags |= ChangeRequestFlags::ChangeIp;
        }
        if change.port {
            flags |= ChangeRequestFlags::ChangePort;
        }
        builder = builder.with_attribute(ChangeRequest::new(Some(flags)));
    }
    let msg = builder.with_attribute(Fingerprint::default()).build();
    encode(&msg, out)
}

/// A decoded Binding success response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingResponse {
    /// Transaction ID, to match against the request.
    pub txid: [u8; 12],
    /// The client's address as the server saw it (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS).
    pub mapped: SocketAddr,
    /// The server's alternate address (RFC 5780 OTHER-ADDRESS), if it has one.
    pub other_address: Option<SocketAddr>,
    /// Where the response was sent from (RFC 5780 RESPONSE-ORIGIN).
    pub response_origin: Option<SocketAddr>,
}

/// Reads a Binding response. Error responses come back as [`StunError::ErrorResponse`].
pub fn parse_binding_response(packet: &[u8]) -> Result<BindingResponse, StunError> {
    if !looks_like_stun(packet, false) {
        return Err(StunError::Malformed("not a STUN header".into()));
    }
    let msg = decode(packet)?;
    if msg.method() != BINDING {
        return Err(StunError::NotBinding("response"));
    }
    let txid = *msg.transaction_id().as_bytes();
    match msg.class() {
        MessageClass::SuccessResponse => {}
        MessageClass::ErrorResponse => {
            let (code, reason) = msg
                .get::<ErrorCode>()
                .and_then(|a| a.as_error_code().ok())
                .map(|e| {
                    let e = e.error_code();
                    (e.error_code(), e.reason().to_string())
                })
                .unwrap_or((0, String::from("no ERROR-CODE")));
            return Err(StunError::ErrorResponse { code, reason });
        }
        _ => return Err(StunError::NotBinding("response")),
    }
    let mapped = msg
        .get::<XorMappedAddress>()
        .and_then(|a| a.as_xor_mapped_address().ok())
        .map(|a| *a.socket_address())
        .or_else(|| {
            msg.get::<MappedAddress>()
                .and_then(|a| a.as_mapped_address().ok())
                .map(|a| *a.socket_address())
        })
        .ok_or(StunError::NoMappedAddress)?;
    let other_address = msg
        .get::<OtherAddress>()
        .and_then(|a| a.as_other_address().ok())
        .map(|a| *a.socket_address());
    let response_origin = msg
        .get::<ResponseOrigin>()
        .and_then(|a| a.as_response_origin().ok())
        .map(|a| *a.socket_address());
    Ok(BindingResponse {
        txid,
        mapped,
        other_address,
        response_origin,
    })
}

// ---------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------

/// A decoded Binding request, as a server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRequest {
    /// Transaction ID to echo.
    pub txid: [u8; 12],
    /// The magic cookie was present (RFC 8489); without it the client is RFC 3489-era and
    /// only understands MAPPED-ADDRESS.
    pub modern: bool,
    /// CHANGE-REQUEST flags, if the attribute was present.
    pub change: Option<Change>,
    /// Comprehension-required attributes this server does not understand. RFC 8489
    /// section 6.3.1.1: the server MUST answer such a request with error 420 listing them.
    pub unknown_required: Vec<u16>,
    /// RFC 5780 RESPONSE-PORT: "the Binding Response MUST be transmitted to the source IP
    /// address of the Binding Request and the port contained in" it (section 7.5). Used by
    /// clients testing filtering behaviour from a second local socket.
    pub response_port: Option<u16>,
}

/// Reads a Binding request. `None` for anything else, which the caller drops silently
/// (RFC 8489 section 6.3: malformed messages are discarded, and answering them with a larger
/// packet would make the server an amplifier).
pub fn parse_binding_request(packet: &[u8]) -> Option<BindingRequest> {
    if !looks_like_stun(packet, true) {
        return None;
    }
    let modern = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) == MAGIC_COOKIE;
    // stun-rs only decodes RFC 5389+ messages. An RFC 3489 request is a bare header or a
    // header with attributes we do not need: answer it from the header alone.
    if !modern {
        let method = u16::from_be_bytes([packet[0], packet[1]]);
        if method != 0x0001 {
            return None;
        }
        return Some(BindingRequest {
            txid: transaction_id(packet)?,
            modern: false,
            change: None,
            unknown_required: Vec::new(),
            response_port: None,
        });
    }
    let msg = decode(packet).ok()?;
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return None;
    }
    let change = msg
        .get::<ChangeRequest>()
        .and_then(|a| a.as_change_request().ok())
        .map(|c| Change {
            ip: c.flags().contains(ChangeRequestFlags::ChangeIp),
            port: c.flags().contains(ChangeRequestFlags::ChangePort),
        });
    let unknown_required = msg
        .attributes()
        .iter()
        .filter_map(|a| match a {
            StunAttribute::Unknown(u) if u.attribute_type().is_comprehension_required() => {
                Some(u.attribute_type().as_u16())
            }
            _ => None,
        })
        .collect();
    let response_port = msg
        .get::<ResponsePort>()
        .and_then(|a| a.as_response_port().ok())
        .map(|p| p.as_u16());
    Some(BindingRequest {
        txid: *msg.transaction_id().as_bytes(),
        modern: true,
        change,
        unknown_required,
        response_port,
    })
}

/// Writes a Binding success response into `out` and returns its length.
///
/// Carries XOR-MAPPED-ADDRESS (RFC 8489) and MAPPED-ADDRESS (for RFC 3489-era clients, which
/// RFC 8489 section 14.1 says servers may include), the RFC 5780 attributes when the server
/// has an alternate address, SOFTWARE and FINGERPRINT.
pub fn binding_success(
    request: &BindingRequest,
    mapped: SocketAddr,
    response_origin: Option<SocketAddr>,
    other_address: Option<SocketAddr>,
    out: &mut [u8],
) -> Result<usize, StunError> {
    if !request.modern {
        return classic_binding_success(request, mapped, out);
    }
    let mut builder = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(TransactionId::from(request.txid))
        .with_attribute(XorMappedAddress::from(mapped))
        .with_attribute(MappedAddress::from(mapped));
    if let Some(origin) = response_origin {
        builder = builder.with_attribute(ResponseOrigin::from(origin));
    }
    if let Some(other) = other_address {
        builder = builder.with_attribute(OtherAddress::from(other));
    }
    if let Ok(software) = Software::new(SOFTWARE) {
        builder = builder.with_attribute(software);
    }
    let msg = builder.with_attribute(Fingerprint::default()).build();
    encode(&msg, out)
}

/// RFC 3489 section 11.1: a response with MAPPED-ADDRESS only, no magic cookie (the
/// 16-byte transaction ID is echoed whole: bytes 4..20).
fn classic_binding_success(
    request: &BindingRequest,
    mapped: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let SocketAddr::V4(v4) = mapped else {
        return Err(StunError::Encode(
            "RFC 3489 has no IPv6 MAPPED-ADDRESS".into(),
        ));
    };
    const LEN: usize = HEADER_LEN + 12;
    if out.len() < LEN {
        return Err(StunError::Encode("buffer too small".into()));
    }
    // The caller only has the last 12 bytes of the 16-byte RFC 3489 ID; classic requests are
    // answered by the relay core from the raw packet via `classic_binding_success_raw`.
    out[..2].copy_from_slice(&0x0101u16.to_be_bytes());
    out[2..4].copy_from_slice(&12u16.to_be_bytes());
    out[4..8].copy_from_slice(&[0; 4]);
    out[8..20].copy_from_slice(&request.txid);
    out[20..22].copy_from_slice(&0x0001u16.to_be_bytes());
    out[22..24].copy_from_slice(&8u16.to_be_bytes());
    out[24] = 0;
    out[25] = 1;
    out[26..28].copy_from_slice(&v4.port().to_be_bytes());
    out[28..32].copy_from_slice(&v4.ip().octets());
    Ok(LEN)
}

/// Answers an RFC 3489 request from its raw bytes: like [`binding_success`] for classic
/// clients, but echoes the full 16-byte transaction ID (bytes 4..20 of the request).
pub fn classic_binding_success_raw(
    request_packet: &[u8],
    mapped: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let txid = transaction_id(request_packet).ok_or(StunError::Malformed("short".into()))?;
    let req = BindingRequest {
        txid,
        modern: false,
        change: None,
        unknown_required: Vec::new(),
        response_port: None,
    };
    let n = classic_binding_success(&req, mapped, out)?;
    out[4..8].copy_from_slice(&request_packet[4..8]);
    Ok(n)
}

/// Writes a Binding error response (e.g. 420 Unknown Attribute with the list, or 400).
pub fn binding_error(
    request: &BindingRequest,
    code: u16,
    reason: &str,
    unknown: &[u16],
    out: &mut [u8],
) -> Result<usize, StunError> {
    let error =
        stun_rs::ErrorCode::new(code, reason).map_err(|e| StunError::Encode(format!("{e:?}")))?;
    let mut builder = StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse)
        .with_transaction_id(TransactionId::from(request.txid))
        .with_attribute(ErrorCode::from(error));
    if !unknown.is_empty() {
        builder = builder.with_attribute(UnknownAttributes::from(unknown));
    }
    let msg = builder.with_attribute(Fingerprint::default()).build();
    encode(&msg, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn request_fixed_bytes() {
        let mut buf = [0u8; MAX_BINDING_LEN];
        let n = binding_request(TXID, None, &mut buf).unwrap();
        // Header: Binding request, length 8 (FINGERPRINT), cookie, txid; then FINGERPRINT.
        assert_eq!(
            &buf[..20],
            &[
                0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                12
            ]
        );
        assert_eq!(&buf[20..24], &[0x80, 0x28, 0x00, 0x04]);
        assert_eq!(n, 28);
        let req = parse_binding_request(&buf[..n]).unwrap();
        assert_eq!(req.txid, TXID);
        assert!(req.modern);
        assert_eq!(req.change, None);
    }

    #[test]
    fn request_with_change_round_trips() {
        let mut buf = [0u8; MAX_BINDING_LEN];
        let change = Change {
            ip: true,
            port: false,
        };
        let n = binding_request(TXID, Some(change), &mut buf).unwrap();
        let req = parse_binding_request(&buf[..n]).unwrap();
        assert_eq!(req.change, Some(change));
    }

    #[test]
    fn response_round_trips_with_rfc5780_attributes() {
        let mut buf = [0u8; MAX_BINDING_LEN];
        let n = binding_request(TXID, None, &mut buf).unwrap();
        let req = parse_binding_request(&buf[..n]).unwrap();
        let mapped: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let origin: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:3479".parse().unwrap();
        let mut out = [0u8; MAX_BINDING_LEN];
        let m = binding_success(&req, mapped, Some(origin), Some(other), &mut out).unwrap();
        let resp = parse_binding_response(&out[..m]).unwrap();
        assert_eq!(resp.txid, TXID);
        assert_eq!(resp.mapped, mapped);
        assert_eq!(resp.response_origin, Some(origin));
        assert_eq!(resp.other_address, Some(other));
    }

    #[test]
    fn ipv6_mapped_round_trips() {
        let mut buf = [0u8; MAX_BINDING_LEN];
        let n = binding_request(TXID, None, &mut buf).unwrap();
        let req = parse_binding_request(&buf[..n]).unwrap();
        let mapped: SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        let mut out = [0u8; MAX_BINDING_LEN];
        let m = binding_success(&req, mapped, None, None, &mut out).unwrap();
        assert_eq!(parse_binding_response(&out[..m]).unwrap().mapped, mapped);
    }

    #[test]
    fn error_response_is_reported() {
        let mut buf = [0u8; MAX_BINDING_LEN];
        let n = binding_request(TXID, None, &mut buf).unwrap();
        let req = parse_binding_request(&buf[..n]).unwrap();
        let mut out = [0u8; MAX_BINDING_LEN];
        let m = binding_error(&req, 420, "Unknown Attribute", &[0x0042], &mut out).unwrap();
        assert_eq!(
            parse_binding_response(&out[..m]),
            Err(StunError::ErrorResponse {
                code: 420,
                reason: "Unknown Attribute".into()
            })
        );
    }

    #[test]
    fn unknown_required_attribute_is_listed() {
        // Binding request with one comprehension-required attribute 0x0042 (4 bytes value).
        let mut pkt = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
        pkt.extend_from_slice(&TXID);
        pkt.extend_from_slice(&[0x00, 0x42, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]);
        let req = parse_binding_request(&pkt).unwrap();
        assert_eq!(req.unknown_required, vec![0x0042]);
    }

    #[test]
    fn response_port_is_read() {
        // coturn's turnutils_stunclient -f: RESPONSE-PORT 0x8931 and CHANGE-REQUEST ip+port.
        let mut pkt = vec![0x00, 0x01, 0x00, 0x10, 0x21, 0x12, 0xA4, 0x42];
        pkt.extend_from_slice(&TXID);
        pkt.extend_from_slice(&[0x00, 0x27, 0x00, 0x04, 0x89, 0x31, 0, 0]);
        pkt.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 6]);
        let req = parse_binding_request(&pkt).unwrap();
        assert_eq!(req.response_port, Some(0x8931));
        assert_eq!(
            req.change,
            Some(Change {
                ip: true,
                port: true
            })
        );
        assert!(req.unknown_required.is_empty());
    }

    #[test]
    fn classic_rfc3489_request_gets_mapped_address() {
        let mut pkt = vec![0x00, 0x01, 0x00, 0x00];
        pkt.extend_from_slice(&[9, 9, 9, 9]);
        pkt.extend_from_slice(&TXID);
        let req = parse_binding_request(&pkt).unwrap();
        assert!(!req.modern);
        let mut out = [0u8; MAX_BINDING_LEN];
        let mapped: SocketAddr = "198.51.100.1:1234".parse().unwrap();
        let n = classic_binding_success_raw(&pkt, mapped, &mut out).unwrap();
        assert_eq!(n, 32);
        assert_eq!(&out[4..20], &pkt[4..20]);
        assert_eq!(&out[24..32], &[0, 1, 0x04, 0xD2, 198, 51, 100, 1]);
    }

    #[test]
    fn garbage_is_not_a_request() {
        assert_eq!(parse_binding_request(&[0u8; 3]), None);
        assert_eq!(parse_binding_request(&[0xffu8; 40]), None);
        let mut pkt = vec![0x00, 0x01, 0x00, 0x04, 0x21, 0x12, 0xA4, 0x42];
        pkt.extend_from_slice(&TXID);
        pkt.extend_from_slice(&[0x80, 0x28, 0x00, 0x08]); // claims 8 bytes, has 0
        assert_eq!(parse_binding_request(&pkt), None);
    }
}
