//! Port mapping through the real node reactor against fake gateways on 127.0.0.1: a PCP
//! server, and a NAT-PMP-only server (which answers PCP with "unsupported version", so the
//! node must fall back). The mapping must reach the node core, and dropping the driver must
//! send the delete.

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use burrow::driver::node::{DriverConfig, NodeApp, NodeDriver};
use burrow::driver::portmap::PortMapSettings;
use burrow::identity::Identity;
use burrow::node::{NodeConfig, NodeCore, NodeEvent};
use burrow::portmap::{PortMapStatus, Protocol};

/// External address the fake gateways hand out (TEST-NET-2: never contacted).
const EXTERNAL: [u8; 4] = [198, 51, 100, 7];
const EXTERNAL_PORT: u16 = 40_123;

/// What a fake gateway saw.
#[derive(Debug, Default)]
struct Seen {
    pcp_requests: usize,
    natpmp_requests: usize,
    deleted: bool,
}

/// Runs a fake gateway on 127.0.0.1 until it sees a delete (or a hang guard passes).
fn fake_gateway(speaks_pcp: bool) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut seen = Seen::default();
        let guard = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 1500];
        while Instant::now() < guard && !seen.deleted {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let req = &buf[..n];
            let reply = match (req.first(), speaks_pcp) {
                (Some(2), true) if n >= 60 && req[1] == 1 => {
                    seen.pcp_requests += 1;
                    let lifetime = u32::from_be_bytes([req[4], req[5], req[6], req[7]]);
                    if lifetime == 0 {
                        seen.deleted = true;
                    }
                    // RFC 6887 §11.1 response: header, then the request's nonce, protocol,
                    // internal port, and the assigned external address.
                    let mut r = vec![2, 0x81, 0, 0];
                    r.extend_from_slice(&lifetime.min(600).to_be_bytes());
                    r.extend_from_slice(&100u32.to_be_bytes());
                    r.extend_from_slice(&[0; 12]);
                    r.extend_from_slice(&req[24..42]);
                    r.extend_from_slice(&EXTERNAL_PORT.to_be_bytes());
                    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
                    r.extend_from_slice(&EXTERNAL);
                    r
                }
                // A NAT-PMP-only gateway answers another version with its own "unsupported
                // version" (RFC 6886 §3.5).
                (Some(2), false) => {
                    seen.pcp_requests += 1;
                    vec![0, 0x81, 0, 1, 0, 0, 0, 100]
                }
                (Some(0), _) if n == 2 && req[1] == 0 => {
                    seen.natpmp_requests += 1;
                    let mut r = vec![0, 128, 0, 0, 0, 0, 0, 100];
                    r.extend_from_slice(&EXTERNAL);
                    r
                }
                (Some(0), _) if n == 12 && req[1] == 1 => {
                    seen.natpmp_requests += 1;
                    let lifetime = u32::from_be_bytes([req[8], req[9], req[10], req[11]]);
                    if lifetime == 0 {
                        seen.deleted = true;
                    }
                    let mut r = vec![0, 129, 0, 0, 0, 0, 0, 101];
                    r.extend_from_slice(&req[4..6]);
                    let port = if lifetime == 0 { 0 } else { EXTERNAL_PORT };
                    r.extend_from_slice(&port.to_be_bytes());
                    r.extend_from_slice(&lifetime.min(600).to_be_bytes());
                    r
                }
                _ => continue,
            };
            let _ = sock.send_to(&reply, from);
        }
        let _ = tx.send(seen);
    });
    (addr, rx)
}

/// Waits for the port mapping to settle.
struct WaitMapping {
    status: Option<PortMapStatus>,
}

impl NodeApp for WaitMapping {
    fn on_event(&mut self, _now: Instant, _core: &mut NodeCore, event: NodeEvent) {
        if let NodeEvent::PortMapping(s) = event
            && s != PortMapStatus::Probing
        {
            self.status = Some(s);
        }
    }
    fn on_tick(&mut self, _now: Instant, _core: &mut NodeCore) {}
    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
    fn is_done(&self) -> bool {
        self.status.is_some()
    }
}

fn run(speaks_pcp: bool) -> (PortMapStatus, Seen) {
    let (gateway, seen) = fake_gateway(speaks_pcp);
    // No relay listens on port 1: the node keeps retrying it, which does not matter here.
    let relay: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut driver = NodeDriver::new(
        NodeConfig::new(Identity::from_secret([9; 32]), relay),
        DriverConfig {
            udp4: "127.0.0.1:0".parse().unwrap(),
            udp6: None,
        },
    )
    .unwrap();
    driver
        .enable_port_mapping(PortMapSettings {
            gateway: Some("127.0.0.1".parse().unwrap()),
            server_port: gateway.port(),
            // SSDP is multicast: it would leave loopback.
            upnp: false,
        })
        .unwrap();
    let mut app = WaitMapping { status: None };
    driver
        .run(&mut app, Some(Instant::now() + Duration::from_secs(20)))
        .unwrap();
    let status = app.status.expect("port mapping never settled (hang guard)");
    assert_eq!(driver.core().port_mapping(), &status);
    // Dropping the driver deletes the mapping.
    drop(driver);
    let seen = seen.recv_timeout(Duration::from_secs(40)).unwrap();
    (status, seen)
}

#[test]
fn pcp_mapping_reaches_the_core_and_is_deleted_on_drop() {
    let (status, seen) = run(true);
    let PortMapStatus::Mapped(m) = status else {
        panic!("not mapped: {status:?}")
    };
    assert_eq!(m.protocol, Protocol::Pcp);
    assert_eq!(
        m.external,
        SocketAddr::from((EXTERNAL, EXTERNAL_PORT)),
        "{m:?}"
    );
    assert_eq!(seen.natpmp_requests, 0, "{seen:?}");
    assert!(seen.deleted, "no delete on drop: {seen:?}");
}

#[test]
fn natpmp_only_gateway_gets_the_fallback() {
    let (status, seen) = run(false);
    let PortMapStatus::Mapped(m) = status else {
        panic!("not mapped: {status:?}")
    };
    assert_eq!(m.protocol, Protocol::NatPmp);
    assert_eq!(m.external, SocketAddr::from((EXTERNAL, EXTERNAL_PORT)));
    assert!(
        seen.pcp_requests >= 1 && seen.natpmp_requests >= 2,
        "{seen:?}"
    );
    assert!(seen.deleted, "no delete on drop: {seen:?}");
}
