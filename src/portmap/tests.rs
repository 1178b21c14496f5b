//! Coordinator tests: the fallback order and release, against scripted gateways.

use super::*;

fn cfg(upnp: bool) -> PortMapConfig {
    let mut c = PortMapConfig::new(
        Ipv4Addr::new(10, 1, 0, 1),
        Ipv4Addr::new(10, 1, 0, 10),
        4000,
    );
    c.upnp = upnp;
    c.seed = 7;
    c
}

fn gw() -> SocketAddr {
    "10.1.0.1:5351".parse().unwrap()
}

/// Runs timers until `pred` holds, answering nothing (a silent network); bounded.
fn run_silent(m: &mut PortMapper, mut now: Instant, pred: impl Fn(&PortMapper) -> bool) -> Instant {
    for _ in 0..200 {
        while m.poll_transmit().is_some() {}
        while m.poll_http().is_some() {}
        if pred(m) {
            return now;
        }
        let Some(t) = m.poll_timeout() else { break };
        now = now.max(t);
        m.handle_timeout(now);
    }
    assert!(pred(m), "condition never reached: {:?}", m.status());
    now
}

#[test]
fn pcp_unsupported_falls_back_to_natpmp() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(cfg(false), t0);
    assert_eq!(m.poll_status(), Some(PortMapStatus::Probing));
    let (to, pcp_req) = m.poll_transmit().unwrap();
    assert_eq!(to, gw());
    assert_eq!(pcp_req[0], 2);
    // NAT-PMP-only gateway: version 0, result 1.
    m.handle_udp(t0, gw(), &[0, 0x81, 0, 1, 0, 0, 0, 3]);
    let (_, req) = m.poll_transmit().unwrap();
    assert_eq!(req, [0, 0]);
    m.handle_udp(t0, gw(), &[0, 128, 0, 0, 0, 0, 0, 3, 198, 18, 0, 21]);
    let (_, req) = m.poll_transmit().unwrap();
    assert_eq!(req[..2], [0, 1]);
    let mut reply = vec![0, 129, 0, 0, 0, 0, 0, 3];
    reply.extend_from_slice(&4000u16.to_be_bytes());
    reply.extend_from_slice(&4000u16.to_be_bytes());
    reply.extend_from_slice(&7200u32.to_be_bytes());
    m.handle_udp(t0, gw(), &reply);
    match m.poll_status() {
        Some(PortMapStatus::Mapped(mp)) => {
            assert_eq!(mp.protocol, Protocol::NatPmp);
            assert_eq!(
                mp.external,
                "198.18.0.21:4000".parse::<SocketAddr>().unwrap()
            );
        }
        s => panic!("{s:?}"),
    }
    m.release(t0);
    let (_, del) = m.poll_transmit().unwrap();
    assert_eq!(del, natpmp::encode_map_request(4000, 0, 0));
    assert!(!m.is_released());
    let mut done = vec![0, 129, 0, 0, 0, 0, 0, 3];
    done.extend_from_slice(&4000u16.to_be_bytes());
    done.extend_from_slice(&[0; 6]);
    m.handle_udp(t0, gw(), &done);
    assert!(m.is_released());
}

#[test]
fn silent_gateway_ends_unavailable_without_upnp() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(cfg(false), t0);
    run_silent(&mut m, t0, |m| {
        matches!(m.status(), PortMapStatus::Unavailable(_))
    });
    assert_eq!(m.poll_timeout(), None, "nothing left to do");
}

#[test]
fn silent_everything_ends_unavailable_with_upnp() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(cfg(true), t0);
    run_silent(&mut m, t0, |m| {
        matches!(m.status(), PortMapStatus::Unavailable(_))
    });
    let PortMapStatus::Unavailable(why) = m.status() else {
        unreachable!()
    };
    assert!(why.contains("UPnP"), "{why}");
}

#[test]
fn upnp_maps_only_after_pcp_and_natpmp_failed() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(cfg(true), t0);
    while m.poll_transmit().is_some() {}
    let ssdp = b"HTTP/1.1 200 OK\r\nLOCATION: http://10.1.0.1:5000/d.xml\r\nST: x\r\n\r\n";
    m.handle_udp(t0, "10.1.0.1:1900".parse().unwrap(), ssdp);
    let get = m.poll_http().unwrap();
    let desc = "<root><device><serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType><controlURL>/ctl</controlURL></service></serviceList></device></root>";
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{desc}",
        desc.len()
    );
    m.handle_http(t0, get.id, Some(reply.as_bytes()));
    assert!(
        m.poll_http().is_none(),
        "UPnP must wait for PCP and NAT-PMP"
    );
    // PCP and NAT-PMP stay silent until they give up; then UPnP asks for the address.
    let mut soap = None;
    for _ in 0..100 {
        while m.poll_transmit().is_some() {}
        if let Some(h) = m.poll_http() {
            soap = Some(h);
            break;
        }
        let now = m.poll_timeout().unwrap();
        m.handle_timeout(now);
    }
    let soap = soap.expect("UPnP never started mapping");
    assert!(String::from_utf8_lossy(&soap.request).contains("GetExternalIPAddress"));
}

#[test]
fn pcp_success_cancels_upnp() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(cfg(true), t0);
    let (_, req) = m.poll_transmit().unwrap();
    let mut r = vec![2, 0x81, 0, 0, 0, 0, 0x1c, 0x20, 0, 0, 0, 1];
    r.extend_from_slice(&[0; 12]);
    r.extend_from_slice(&req[24..36]);
    r.extend_from_slice(&[17, 0, 0, 0]);
    r.extend_from_slice(&4000u16.to_be_bytes());
    r.extend_from_slice(&4000u16.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 22]);
    m.handle_udp(t0, gw(), &r);
    m.poll_status();
    assert!(
        matches!(m.poll_status(), Some(PortMapStatus::Mapped(mp)) if mp.protocol == Protocol::Pcp)
    );
    while m.poll_transmit().is_some() {}
    // Only PCP's renewal remains.
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(3600)));
}

#[test]
fn hostile_replies_do_not_crash_or_map() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(cfg(true), t0);
    let mut x: u64 = 0x1234_5678;
    for i in 0..2000usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x as usize) % 1200;
        let bytes: Vec<u8> = (0..len).map(|j| (x >> (j % 56)) as u8).collect();
        let from = if i % 2 == 0 {
            gw()
        } else {
            "10.1.0.1:1900".parse().unwrap()
        };
        m.handle_udp(t0, from, &bytes);
        m.handle_http(t0, i as u64, Some(&bytes));
    }
    assert!(!matches!(m.status(), PortMapStatus::Mapped(_)));
}

#[test]
fn default_gateway_from_proc_net_route() {
    let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                eth0\t0001010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
    assert_eq!(
        parse_default_gateway(text),
        Some(Ipv4Addr::new(10, 1, 0, 1))
    );
    assert_eq!(parse_default_gateway("Iface\n"), None);
    assert_eq!(parse_default_gateway("garbage"), None);
}

#[test]
fn announceable_addresses() {
    assert!(is_announceable("198.18.0.21:4000".parse().unwrap()));
    assert!(!is_announceable("192.168.1.2:4000".parse().unwrap()));
    assert!(!is_announceable("100.64.1.2:4000".parse().unwrap()));
    assert!(!is_announceable("198.18.0.21:0".parse().unwrap()));
}
