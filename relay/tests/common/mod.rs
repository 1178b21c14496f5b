//! Helpers for the loopback tests: start the real `burrow-relay`, and a minimal node client
//! built from `burrow::identity` + `burrow::wire`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burrow::identity::Identity;
use burrow::wire::control::{self, ClientMsg, NatReport, Register, ServerMsg, UdpMsg};
use burrow::wire::frame::{self, FrameReader, PREAMBLE};

/// Hang guard for any single wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// The relay child process; killed on drop (also when a test panics).
pub struct Relay {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    /// Starts the relay on 127.0.0.1 port 0 with metrics, plus `extra` arguments, and waits
    /// for its "listening" line.
    pub fn start(extra: &[&str]) -> Relay {
        Self::try_start(&["--listen", "127.0.0.1:0"], extra).expect("relay did not start")
    }

    /// Starts the relay with `listen` arguments; `None` if it exited (e.g. port taken).
    pub fn try_start(listen: &[&str], extra: &[&str]) -> Option<Relay> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_burrow-relay"))
            .args(listen)
            .args(["--metrics", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start burrow-relay");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("BURROW_RELAY_TEST_LOG").is_some() {
                    eprintln!("relay: {line}");
                }
            }
        });
        let mut relay = Relay {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            metrics: None,
        };
        let line = rx
            .recv_timeout(WAIT)
            .expect("relay printed no listening line");
        let field = |name: &str| -> Option<SocketAddr> {
            let start = line.find(&format!("{name}="))? + name.len() + 1;
            let rest = &line[start..];
            let end = rest.find([' ', ',']).unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        relay.addr = field("tcp").expect("tcp address in the listening line");
        relay.metrics = field("metrics");
        Some(relay)
    }

    /// Sends SIGTERM and waits for the exit status (hang-guarded).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "relay did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET /metrics.
    pub fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(self.metrics.expect("metrics enabled")).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// The value of one sample line, e.g. `burrow_relay_registrations_total`.
    pub fn metric(&self, sample: &str) -> u64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }
}

/// What a node read from its TCP session.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Ctl(ServerMsg),
    Data(Vec<u8>),
    Closed,
}

/// A node's TCP control session.
pub struct Session {
    pub tcp: TcpStream,
    reader: FrameReader,
    queue: std::collections::VecDeque<Got>,
}

impl Session {
    pub fn open(relay: SocketAddr) -> Session {
        let tcp = TcpStream::connect(relay).unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let mut s = Session {
            tcp,
            reader: FrameReader::new(false),
            queue: Default::default(),
        };
        s.tcp.write_all(&PREAMBLE).unwrap();
        s
    }

    pub fn send(&mut self, msg: &ClientMsg) {
        self.send_frame(&control::to_vec(msg).unwrap());
    }

    pub fn send_frame(&mut self, body: &[u8]) {
        let mut out = Vec::new();
        frame::encode(body, &mut out).unwrap();
        self.tcp.write_all(&out).unwrap();
    }

    /// The next frame (blocking, hang-guarded by the read timeout).
    pub fn recv(&mut self) -> Got {
        self.recv_timeout()
            .expect("timed out waiting for the relay")
    }

    /// The next frame, `None` when the socket's read timeout passes first.
    pub fn recv_timeout(&mut self) -> Option<Got> {
        loop {
            if let Some(g) = self.queue.pop_front() {
                return Some(g);
            }
            if let Some(f) = self.reader.next_frame().expect("relay sent a bad frame") {
                let g = match f[0] {
                    0x22 => Got::Ctl(control::decode_valid(f).expect("bad message")),
                    _ => Got::Data(f.to_vec()),
                };
                return Some(g);
            }
            let buf = self.reader.read_buf();
            match self.tcp.read(buf) {
                Ok(0) => return Some(Got::Closed),
                Ok(n) => self.reader.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(Got::Closed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("TCP read: {e}"),
            }
        }
    }

    /// The next control message, skipping relay data.
    pub fn recv_msg(&mut self) -> ServerMsg {
        loop {
            match self.recv() {
                Got::Ctl(m) => return m,
                Got::Data(_) => {}
                Got::Closed => panic!("session closed while waiting for a message"),
            }
        }
    }

    pub fn challenge(&mut self) -> [u8; 32] {
        match self.recv_msg() {
            ServerMsg::Challenge { nonce, .. } => nonce,
            m => panic!("expected Challenge, got {m:?}"),
        }
    }
}

pub fn register_msg(id: &Identity, nonce: &[u8; 32], token: Option<&str>) -> ClientMsg {
    ClientMsg::Register(Register {
        peer_id: id.peer_id(),
        signature: id.sign(&control::register_signed_bytes(nonce)),
        token: token.map(str::to_string),
        candidates: vec![],
        nat: NatReport::default(),
        agent: "loopback-test".into(),
    })
}

/// A registered node with a bound UDP socket.
pub struct Node {
    pub id: Identity,
    pub session: Session,
    pub udp: UdpSocket,
    pub relay: SocketAddr,
}

impl Node {
    pub fn register(relay: SocketAddr, id: Identity) -> Node {
        let mut session = Session::open(relay);
        let nonce = session.challenge();
        session.send(&register_msg(&id, &nonce, None));
        let token = match session.recv_msg() {
            ServerMsg::Registered { udp_token, .. } => udp_token,
            m => panic!("expected Registered, got {m:?}"),
        };
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let bind = control::to_vec(&UdpMsg::Bind { token, seq: 1 }).unwrap();
        let mut buf = [0u8; 2048];
        let mut bound = false;
        for _ in 0..20 {
            udp.send_to(&bind, relay).unwrap();
            if let Ok((n, _)) = udp.recv_from(&mut buf)
                && let Ok(UdpMsg::Bound { observed, .. }) = control::decode(&buf[..n])
            {
                assert_eq!(observed, udp.local_addr().unwrap());
                bound = true;
                break;
            }
        }
        assert!(bound, "UDP bind not answered");
        Node {
            id,
            session,
            udp,
            relay,
        }
    }
}

/// A small deterministic PRNG (xorshift64*), so the tests need no extra crates.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// A seed from the clock, printed so a failure can be replayed with `BURROW_TEST_SEED`.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("BURROW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("{test}: seed {seed} (set BURROW_TEST_SEED to replay)");
    seed
}
