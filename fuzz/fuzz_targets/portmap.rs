//! Router replies to the port-mapping clients (`burrow::portmap`): PCP and NAT-PMP
//! datagrams, SSDP answers, HTTP replies with IGD descriptions and SOAP bodies. All come
//! from a device on the LAN and are untrusted.
//!
//! Checked: no decoder panics; a decoded PCP response came from at least a MAP-sized
//! datagram of at most 1100 bytes; a parsed HTTP body is never longer than the input; and a
//! `PortMapper` fed the bytes as every kind of reply, in every phase it reaches, neither
//! panics nor ever reports a mapping to a private external address as announceable.
//!
//! Input: byte 0 = how to split the rest into replies (and which source each gets), rest =
//! the bytes.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use burrow::portmap::upnp::{self, HttpUrl};
use burrow::portmap::{PortMapConfig, PortMapStatus, PortMapper, is_announceable, natpmp, pcp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [split, rest @ ..] = data else {
        return;
    };
    let _ = natpmp::decode_response(rest);
    if pcp::decode_response(rest).is_ok() {
        assert!((pcp::MAP_LEN..=pcp::MAX_MESSAGE).contains(&rest.len()));
    }
    let _ = upnp::parse_ssdp_response(rest);
    if let Some(r) = upnp::parse_http_reply(rest) {
        assert!(r.body.len() <= rest.len());
    }
    let loc = HttpUrl::parse("http://10.1.0.1:5000/rootDesc.xml").unwrap();
    if let Some(s) = upnp::parse_description(rest, &loc) {
        assert_eq!(s.control.addr.ip(), loc.addr.ip(), "control URL on another host");
    }
    let _ = upnp::soap_field(rest, "NewExternalIPAddress");
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = HttpUrl::parse(s);
        let _ = loc.join(s);
    }

    let gw = Ipv4Addr::new(10, 1, 0, 1);
    let mut m = PortMapper::new(PortMapConfig::new(gw, Ipv4Addr::new(10, 1, 0, 10), 4000), {
        Instant::now()
    });
    let mut now = Instant::now();
    let pcp_from = SocketAddr::from((gw, 5351));
    let ssdp_from = SocketAddr::from((gw, 1900));
    let chunk = usize::from(*split).max(1);
    let mut id = 0u64;
    for piece in rest.chunks(chunk).take(64) {
        while m.poll_transmit().is_some() {}
        let http = m.poll_http();
        match piece.first().copied().unwrap_or(0) % 3 {
            0 => m.handle_udp(now, pcp_from, piece),
            1 => m.handle_udp(now, ssdp_from, piece),
            _ => {
                id = http.map_or(id + 1, |h| h.id);
                m.handle_http(now, id, Some(piece));
            }
        }
        now += Duration::from_millis(u64::from(piece.len() as u8) * 40);
        if m.poll_timeout().is_some_and(|t| t <= now) {
            m.handle_timeout(now);
        }
        while let Some(s) = m.poll_status() {
            if let PortMapStatus::Mapped(mp) = s {
                if let SocketAddr::V4(a) = mp.external
                    && a.ip().is_private()
                {
                    assert!(!is_announceable(mp.external));
                }
            }
        }
    }
    m.release(now);
    for _ in 0..64 {
        while m.poll_transmit().is_some() {}
        while m.poll_http().is_some() {}
        let Some(t) = m.poll_timeout() else { break };
        now = now.max(t);
        m.handle_timeout(now);
    }
    assert!(m.is_released(), "release did not finish on a silent network");
});
