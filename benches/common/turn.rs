//! coturn for the relay benches: a `turnserver` child process on loopback with a fresh
//! config (no auth, no TLS, relay ports in a range, listening on 127.0.0.1), and a minimal
//! TURN client (RFC 8656 Allocate and ChannelBind over UDP, then ChannelData) so that the
//! bench can drive coturn with exactly the same closed-loop load as burrow's relay.
#![allow(dead_code)] // each bench uses part of it

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// STUN magic cookie (RFC 8489 §5).
const MAGIC: u32 = 0x2112_A442;
const ALLOCATE: u16 = 0x0003;
const CHANNEL_BIND: u16 = 0x0009;
/// Success response = request | 0x0100 (class bits, RFC 8489 §5).
const SUCCESS: u16 = 0x0100;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
/// First ChannelData channel number (RFC 8656 §12: 0x4000–0x4FFF).
pub const FIRST_CHANNEL: u16 = 0x4000;
/// ChannelData header: channel number and length.
pub const CHANNEL_DATA_HEADER: usize = 4;

/// `turnserver` on PATH?
pub fn turnserver_installed() -> bool {
    Command::new("turnserver")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A running coturn; killed when dropped.
pub struct Coturn {
    child: Child,
    /// Its listening address (UDP).
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free UDP port on 127.0.0.1 (racy, like any probe; coturn failing to bind shows up as
/// no answer to the first Allocate).
fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

impl Coturn {
    /// Starts `turnserver` with a fresh config in a temp dir and waits until it answers.
    /// `relay_ports` relay ports are reserved from a range above 40000.
    pub fn start(relay_ports: u16) -> Coturn {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let min_port = 40_000u16;
        let max_port = min_port
            .saturating_add(relay_ports.max(100) * 4)
            .min(65_000);
        let conf = format!(
            "listening-ip=127.0.0.1\n\
             relay-ip=127.0.0.1\n\
             listening-port={port}\n\
             min-port={min_port}\n\
             max-port={max_port}\n\
             no-auth\n\
             no-tls\n\
             no-dtls\n\
             no-tcp\n\
             no-cli\n\
             no-rfc5780\n\
             no-stun-backward-compatibility\n\
             no-software-attribute\n\
             allow-loopback-peers\n\
             no-multicast-peers\n\
             user-quota=0\n\
             total-quota=0\n\
             max-allocate-lifetime=3600\n\
             simple-log\n\
             log-file={log}\n\
             pidfile={pid}\n\
             userdb={db}\n",
            log = dir.path().join("turn.log").display(),
            pid = dir.path().join("turn.pid").display(),
            db = dir.path().join("turn.db").display(),
        );
        let conf_path = dir.path().join("turnserver.conf");
        std::fs::write(&conf_path, conf).expect("write coturn config");
        let child = Command::new("turnserver")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnserver");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let coturn = Coturn { child, addr, dir };
        // Ready when an Allocate is answered.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if allocate(&probe, addr, 1).is_some() {
                return coturn;
            }
        }
        panic!(
            "turnserver did not answer on {addr}; log: {}",
            coturn.log_path().display()
        );
    }

    /// The process ID (its CPU time covers all of coturn's threads).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// coturn's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("turn.log")
    }

    /// The config directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn request(kind: u16, txid: [u8; 12], attrs: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&MAGIC.to_be_bytes());
    m.extend_from_slice(&txid);
    attrs(&mut m);
    let len = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    m
}

fn xor_addr(addr: SocketAddrV4) -> [u8; 8] {
    let port = addr.port() ^ (MAGIC >> 16) as u16;
    let ip = u32::from(*addr.ip()) ^ MAGIC;
    let mut v = [0u8; 8];
    v[1] = 0x01; // IPv4
    v[2..4].copy_from_slice(&port.to_be_bytes());
    v[4..8].copy_from_slice(&ip.to_be_bytes());
    v
}

fn txid(seq: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&seq.to_be_bytes());
    t[8..].copy_from_slice(&0xB0_77_0B_EEu32.to_be_bytes());
    t
}

/// Sends `req` until a success response with the same transaction ID arrives (a few tries,
/// 200 ms each); the response's attributes.
fn transact(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> Option<Vec<(u16, Vec<u8>)>> {
    let kind = u16::from_be_bytes([req[0], req[1]]);
    // Blocking with a timeout (a receiver thread may have made the socket non-blocking).
    sock.set_nonblocking(false).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        sock.send_to(req, server).ok()?;
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                break;
            };
            let m = &buf[..n];
            if n < 20 || m[8..20] != req[8..20] {
                continue;
            }
            if u16::from_be_bytes([m[0], m[1]]) != kind | SUCCESS {
                return None;
            }
            let mut attrs = Vec::new();
            let mut at = 20;
            while at + 4 <= n {
                let t = u16::from_be_bytes([m[at], m[at + 1]]);
                let l = u16::from_be_bytes([m[at + 2], m[at + 3]]) as usize;
                let v = m.get(at + 4..at + 4 + l)?;
                attrs.push((t, v.to_vec()));
                at += 4 + l.div_ceil(4) * 4;
            }
            return Some(attrs);
        }
    }
    None
}

/// Allocates a UDP relay address for `sock`'s address; the relayed address.
pub fn allocate(sock: &UdpSocket, server: SocketAddr, seq: u64) -> Option<SocketAddrV4> {
    let req = request(ALLOCATE, txid(seq), |m| {
        put_attr(m, ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        put_attr(m, ATTR_LIFETIME, &3600u32.to_be_bytes());
    });
    let attrs = transact(sock, server, &req)?;
    let (_, v) = attrs.iter().find(|(t, _)| *t == ATTR_XOR_RELAYED_ADDRESS)?;
    if v.len() < 8 || v[1] != 0x01 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip), port))
}

/// Binds `channel` on `sock`'s allocation to `peer` (which also installs the permission).
pub fn channel_bind(
    sock: &UdpSocket,
    server: SocketAddr,
    seq: u64,
    channel: u16,
    peer: SocketAddrV4,
) -> bool {
    let req = request(CHANNEL_BIND, txid(seq), |m| {
        let mut ch = [0u8; 4];
        ch[..2].copy_from_slice(&channel.to_be_bytes());
        put_attr(m, ATTR_CHANNEL_NUMBER, &ch);
        put_attr(m, ATTR_XOR_PEER_ADDRESS, &xor_addr(peer));
    });
    transact(sock, server, &req).is_some()
}

/// A ChannelData message (RFC 8656 §12.4): channel, length, payload (no padding over UDP).
pub fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHANNEL_DATA_HEADER + payload.len());
    m.extend_from_slice(&channel.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    m.extend_from_slice(payload);
    m
}
