//! STUN interop with coturn, a standard STUN server and client (Debian package `coturn`,
//! installed by `.ci/run`), on loopback only.
//!
//! * our client side (`wire::stun::binding_request` / `parse_binding_response`) against
//!   `turnserver` in STUN-only mode, with one listener and with two (127.0.0.1 and
//!   127.0.0.2, which turns on coturn's RFC 5780 support: OTHER-ADDRESS, RESPONSE-ORIGIN,
//!   CHANGE-REQUEST);
//! * our server side (`parse_binding_request` / `binding_success`) answering coturn's
//!   `turnutils_stunclient`.
//!
//! Without `turnserver` on PATH these tests fail, unless `BURROW_SKIP_COTURN=1` is set (then
//! they print why and pass). No timing assertions: waits are bounded retries only.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burrow::wire::stun::{self, BindingResponse, Change};

/// Whether `program` is on PATH; if not, panics unless `BURROW_SKIP_COTURN=1`.
fn have(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()));
    if found {
        return true;
    }
    if std::env::var("BURROW_SKIP_COTURN").as_deref() == Ok("1") {
        eprintln!("skipping: `{program}` not found and BURROW_SKIP_COTURN=1 (install coturn)");
        return false;
    }
    panic!(
        "`{program}` not found: install the coturn package (apt-get install coturn), \
         or set BURROW_SKIP_COTURN=1 to skip the STUN interop tests"
    );
}

/// A coturn `turnserver` child, killed on drop. Its log goes to a temp file, printed when a
/// test fails.
struct Coturn {
    child: Child,
    log: tempfile::NamedTempFile,
    port: u16,
}

impl Coturn {
    fn start(ips: &[Ipv4Addr], port: u16) -> Coturn {
        let log = tempfile::NamedTempFile::new().expect("temp log file");
        let mut cmd = Command::new("turnserver");
        cmd.args(["-n", "-S"]);
        for ip in ips {
            cmd.args(["-L", &ip.to_string()]);
        }
        cmd.args(["-p", &port.to_string()])
            .args(["--alt-listening-port", &(port + 1).to_string()])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--log-file", "stdout"])
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log handle"))
            .stderr(log.reopen().expect("log handle"));
        let child = cmd.spawn().expect("spawn turnserver");
        Coturn { child, log, port }
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = self.log.reopen().and_then(|mut f| f.read_to_string(&mut s));
        s
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- turnserver log (port {}) ---\n{}",
                self.port,
                self.log_text()
            );
        }
    }
}

/// A port P such that P and P+1 are free for UDP and TCP on every given address (coturn
/// listens on both, the +1 being its RFC 5780 alternate port). Bounded attempts.
fn free_port_pair(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..200 {
        let probe = UdpSocket::bind((ips[0], 0)).expect("bind probe");
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if port >= u16::MAX - 1 {
            continue;
        }
        let all_free = ips.iter().all(|&ip| {
            [port, port + 1]
                .iter()
                .all(|&p| UdpSocket::bind((ip, p)).is_ok() && TcpListener::bind((ip, p)).is_ok())
        });
        if all_free {
            return port;
        }
    }
    panic!("no free port pair found in 200 attempts");
}

/// Sends Binding requests (a fresh transaction ID each time) until a matching response
/// arrives, up to `attempts` times; returns it with the address it came from.
fn binding(
    sock: &UdpSocket,
    server: SocketAddr,
    change: Option<Change>,
    attempts: u32,
) -> (BindingResponse, SocketAddr) {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1500];
    for attempt in 0..attempts {
        let mut txid = [0u8; 12];
        txid[..4].copy_from_slice(&attempt.to_be_bytes());
        txid[4..].copy_from_slice(b"burrow-t");
        let mut req = [0u8; stun::MAX_BINDING_LEN];
        let n = stun::binding_request(txid, change, &mut req).unwrap();
        sock.send_to(&req[..n], server).expect("send to loopback");
        // Read until timeout: skip stale answers to earlier attempts.
        while let Ok((len, from)) = sock.recv_from(&mut buf) {
            match stun::parse_binding_response(&buf[..len]) {
                Ok(resp) if resp.txid == txid => return (resp, from),
                Ok(_) => continue,
                Err(e) => panic!("coturn's answer did not parse: {e} ({:02x?})", &buf[..len]),
            }
        }
    }
    panic!("no Binding response from {server} after {attempts} attempts");
}

const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LOCAL2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Generous: coturn takes a moment to start on a busy machine (the attempts are the hang
/// guard, ~200 ms each).
const STARTUP_ATTEMPTS: u32 = 150;

#[test]
fn our_client_against_coturn() {
    if !have("turnserver") {
        return;
    }
    let port = free_port_pair(&[LOCAL]);
    let _coturn = Coturn::start(&[LOCAL], port);
    let server = SocketAddr::V4(SocketAddrV4::new(LOCAL, port));
    let sock = UdpSocket::bind((LOCAL, 0)).unwrap();
    let me = sock.local_addr().unwrap();

    let (resp, from) = binding(&sock, server, None, STARTUP_ATTEMPTS);
    assert_eq!(from, server);
    assert_eq!(resp.mapped, me, "coturn's XOR-MAPPED-ADDRESS is our socket");
    // With one listening address coturn does not do RFC 5780; if it ever does, the
    // alternate must not be the address we asked.
    if let Some(other) = resp.other_address {
        assert_ne!(other, server);
    }
    if let Some(origin) = resp.response_origin {
        assert_eq!(origin, server);
    }

    // A second socket gets its own mapping (no state confusion on either side).
    let sock2 = UdpSocket::bind((LOCAL, 0)).unwrap();
    let (resp2, _) = binding(&sock2, server, None, 20);
    assert_eq!(resp2.mapped, sock2.local_addr().unwrap());
}

#[test]
fn our_client_against_coturn_rfc5780() {
    if !have("turnserver") {
        return;
    }
    let port = free_port_pair(&[LOCAL, LOCAL2]);
    let _coturn = Coturn::start(&[LOCAL, LOCAL2], port);
    let primary = SocketAddr::V4(SocketAddrV4::new(LOCAL, port));
    let sock = UdpSocket::bind((LOCAL, 0)).unwrap();
    let me = sock.local_addr().unwrap();

    let (resp, from) = binding(&sock, primary, None, STARTUP_ATTEMPTS);
    assert_eq!(from, primary);
    assert_eq!(resp.mapped, me);
    let other = resp
        .other_address
        .expect("coturn with two listening addresses sends OTHER-ADDRESS");
    assert_eq!(
        other,
        SocketAddr::V4(SocketAddrV4::new(LOCAL2, port + 1)),
        "OTHER-ADDRESS is the other IP and the alternate port"
    );
    assert_eq!(resp.response_origin, Some(primary));

    // RFC 5780 section 7.2: CHANGE-REQUEST asks for the answer from the other IP and/or port.
    let cases = [
        (true, true, SocketAddrV4::new(LOCAL2, port + 1)),
        (false, true, SocketAddrV4::new(LOCAL, port + 1)),
        (true, false, SocketAddrV4::new(LOCAL2, port)),
    ];
    for (ip, change_port, want) in cases {
        let want = SocketAddr::V4(want);
        let change = Change {
            ip,
            port: change_port,
        };
        let (resp, from) = binding(&sock, primary, Some(change), 20);
        assert_eq!(from, want, "{change:?} answered from {want}");
        assert_eq!(resp.mapped, me, "{change:?}");
        if let Some(origin) = resp.response_origin {
            assert_eq!(origin, want, "RESPONSE-ORIGIN for {change:?}");
        }
    }

    // Asking the alternate address directly works too. (coturn 4.6 then reports an
    // OTHER-ADDRESS that is not the primary, e.g. 127.0.0.2:P for a request to
    // 127.0.0.2:P+1, so only the mapping is checked here.)
    let alt = SocketAddr::V4(SocketAddrV4::new(LOCAL2, port + 1));
    let (resp, from) = binding(&sock, alt, None, 20);
    assert_eq!(from, alt);
    assert_eq!(resp.mapped, me);
}

/// Our server-side encoder, answering coturn's standard client.
#[test]
fn coturn_client_against_our_responder() {
    if !have("turnutils_stunclient") {
        return;
    }
    let sock = UdpSocket::bind((LOCAL, 0)).unwrap();
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1500];
            // Bounded: stops when told, or after ~60 s of polling as a hang guard.
            for _ in 0..600 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some(req) = stun::parse_binding_request(&buf[..len]) else {
                    continue;
                };
                let mut out = [0u8; stun::MAX_BINDING_LEN];
                let n = if req.modern {
                    stun::binding_success(&req, from, None, None, &mut out).unwrap()
                } else {
                    stun::classic_binding_success_raw(&buf[..len], from, &mut out).unwrap()
                };
                sock.send_to(&out[..n], from).unwrap();
                seen.push(from);
            }
            seen
        })
    };
    let output = Command::new("turnutils_stunclient")
        .args(["-p", &port.to_string(), "-L", "127.0.0.1", "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .expect("run turnutils_stunclient");
    stop.store(true, Ordering::Relaxed);
    let seen = responder.join().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reported: Vec<SocketAddr> = stdout
        .lines()
        .filter_map(|l| l.split("UDP reflexive addr: ").nth(1))
        .map(|a| a.trim().parse().expect("an address"))
        .collect();
    assert!(
        !reported.is_empty(),
        "turnutils_stunclient reported no reflexive address\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for addr in &reported {
        assert!(
            seen.contains(addr),
            "client reported {addr}, our responder saw {seen:?}"
        );
    }
}
