//! The relay's I/O: one thread, one mio `Poll`, the sans-IO `RelayCore` inside.
//!
//! Tokens: fixed tokens for the signal pipe, TCP listener and metrics listener; UDP
//! sockets at `UDP_BASE + index`; TCP connections at `TCP_FLAG | generation << 32 | slab
//! key` and metrics connections at `HTTP_FLAG | key`. The generation makes a stale event
//! for a reused slab slot miss (it no longer matches the slot's generation); the same value
//! is the connection's `ConnId` in the core.
//!
//! Every readable socket is drained until `WouldBlock`, but at most a per-turn budget;
//! sockets that still had data go on a "still readable" list and the loop polls with a zero
//! timeout while that list is non-empty, so one busy socket cannot starve the others.
//! WRITABLE interest is registered only while a connection's queue is non-empty.
//!
//! On Linux, UDP is read with `recvmmsg` and UDP GRO (32 buffers per call, each a datagram
//! or a coalesced burst of up to 64 segments, see `batch`); the core splits each buffer into
//! its relay packets and returns runs of consecutive segments to one destination, which are
//! re-sent from the same buffers, one GSO message per run, with one `sendmmsg` per batch;
//! replies the core generates (STUN, bind answers, TCP→UDP relaying) go out one
//! `send_to` each. Signals arrive through a self-pipe (see `signals`), which a
//! [`StopHandle`] can also write to.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use crate::relay::ForwardRun;
use crate::relay::{ConnId, Event, Limits, RelayConfig, RelayCore};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, trace, warn};

#[cfg(target_os = "linux")]
mod batch;
mod http;
mod signals;

use self::http::{HttpConn, Next};
pub use self::signals::{StopHandle, StopPipe};

/// Everything a relay server needs: addresses, access tokens, limits.
#[derive(Debug, Clone)]
pub struct RelayServerConfig {
    /// UDP and TCP address (port 0 picks a free port; UDP and TCP get the same one).
    pub listen: SocketAddr,
    /// Alternate address for RFC 5780 NAT behaviour discovery.
    pub alt_listen: Option<SocketAddr>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Access tokens; empty means registration is open.
    pub tokens: Vec<String>,
    /// Kernel socket buffer size for the UDP sockets.
    pub udp_buffer_bytes: usize,
    /// Limits enforced by the core.
    pub limits: Limits,
}

impl RelayServerConfig {
    /// Defaults (open registration, default limits, 4 MiB UDP buffers) on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        RelayServerConfig {
            listen,
            alt_listen: None,
            metrics: None,
            tokens: Vec::new(),
            udp_buffer_bytes: 4 << 20,
            limits: Limits::default(),
        }
    }
}

/// A bound relay server; [`RelayServer::run`] serves until stopped.
pub struct RelayServer {
    driver: Driver,
}

impl std::fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayServer({})", self.driver.listen_addr)
    }
}

impl RelayServer {
    /// The UDP+TCP address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.driver.listen_addr
    }

    /// The metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.driver
            .metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until the stop pipe fires (a signal, or a [`StopHandle`]).
    pub fn run(mut self) -> io::Result<()> {
        self.driver.run()
    }
}

const SIGNAL: Token = Token(0);
const LISTENER: Token = Token(1);
const METRICS: Token = Token(2);
const UDP_BASE: usize = 16;
const TCP_FLAG: usize = 1 << 62;
const HTTP_FLAG: usize = 1 << 61;
const KEY_MASK: usize = 0xFFFF_FFFF;
const GENERATION_MASK: u32 = 0x0FFF_FFFF;

/// Datagrams read from one UDP socket per turn before others get a go.
const UDP_BUDGET: usize = 512;
/// Reads from one TCP connection per turn.
const TCP_BUDGET: usize = 8;
/// Accepts per turn.
const ACCEPT_BUDGET: usize = 64;
/// Largest datagram.
const BUF_LEN: usize = 65_536;

struct Conn {
    stream: TcpStream,
    generation: u32,
    writable: bool,
}

fn conn_id(key: usize, generation: u32) -> ConnId {
    ConnId(((generation as u64) << 32) | key as u64)
}

fn conn_token(id: ConnId) -> Token {
    Token(TCP_FLAG | id.0 as usize)
}

struct Driver {
    poll: Poll,
    core: RelayCore,
    udp: Vec<(SocketAddr, UdpSocket)>,
    listener: TcpListener,
    listen_addr: SocketAddr,
    conns: Slab<Conn>,
    next_generation: u32,
    metrics_listener: Option<TcpListener>,
    http: Slab<HttpConn>,
    signals: StopPipe,
    still_readable: Vec<Token>,
    buf: Vec<u8>,
    #[cfg(target_os = "linux")]
    batch: batch::RecvBatch,
    /// What the core forwards out of one received buffer (reused).
    #[cfg(target_os = "linux")]
    runs: Vec<ForwardRun>,
    shutting_down: bool,
}

/// Binds everything and logs the addresses; `stop` ends [`RelayServer::run`] when written to
/// (install signal handlers on it for a process-wide server).
pub fn bind(settings: RelayServerConfig, stop: StopPipe) -> io::Result<RelayServer> {
    let (udp0, listener, listen) = bind_primary(settings.listen, settings.udp_buffer_bytes)?;
    let mut config = RelayConfig::new(listen, rand::random());
    config.alt_listen = settings.alt_listen;
    config.tokens = settings.tokens.clone();
    config.limits = settings.limits.clone();
    let mut udp = vec![(listen, udp0)];
    for addr in config.udp_sockets().into_iter().skip(1) {
        let s = bind_udp(addr, settings.udp_buffer_bytes)?;
        udp.push((addr, s));
    }
    let poll = Poll::new()?;
    let mut signals = stop;
    poll.registry()
        .register(&mut signals.read, SIGNAL, Interest::READABLE)?;
    let mut listener = listener;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    for (i, (_, s)) in udp.iter_mut().enumerate() {
        poll.registry()
            .register(s, Token(UDP_BASE + i), Interest::READABLE)?;
    }
    let metrics_listener = match settings.metrics {
        Some(addr) => {
            let mut l = bind_tcp(addr)?;
            poll.registry()
                .register(&mut l, METRICS, Interest::READABLE)?;
            Some(l)
        }
        None => None,
    };
    let udp_list: Vec<String> = udp.iter().map(|(a, _)| a.to_string()).collect();
    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or("off".to_string(), |a| a.to_string());
    info!(
        "burrow-relay listening udp={} tcp={} metrics={} tokens={}",
        udp_list.join(","),
        listen,
        metrics_addr,
        if config.tokens.is_empty() {
            "off"
        } else {
            "required"
        }
    );
    let core = RelayCore::new(config, Instant::now());
    let driver = Driver {
        poll,
        core,
        udp,
        listener,
        listen_addr: listen,
        conns: Slab::new(),
        next_generation: 1,
        metrics_listener,
        http: Slab::new(),
        signals,
        still_readable: Vec::new(),
        buf: vec![0; BUF_LEN],
        #[cfg(target_os = "linux")]
        batch: batch::RecvBatch::new(),
        #[cfg(target_os = "linux")]
        runs: Vec::with_capacity(batch::MAX_SEGMENTS),
        shutting_down: false,
    };
    Ok(RelayServer { driver })
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    Ok(s)
}

fn into_mio_udp(s: Socket) -> io::Result<UdpSocket> {
    // mio's from_std does not set non-blocking itself.
    s.set_nonblocking(true)?;
    // Bursts from one sender (QUIC with GSO) arrive as one buffer and leave as one GSO send.
    #[cfg(target_os = "linux")]
    if !batch::enable_gro(&s) {
        debug!("UDP GRO unavailable; datagrams are read one per buffer");
    }
    Ok(UdpSocket::from_std(s.into()))
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = udp_socket(addr, buffer)?;
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
    into_mio_udp(s)
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind TCP {addr}: {e}")))?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(TcpListener::from_std(s.into()))
}

/// UDP and TCP on the same port. With port 0, the UDP socket picks the port and TCP takes
/// the same one (retried a few times in case the TCP port is taken).
fn bind_primary(
    addr: SocketAddr,
    buffer: usize,
) -> io::Result<(UdpSocket, TcpListener, SocketAddr)> {
    let mut last_err = None;
    for _ in 0..16 {
        let udp = udp_socket(addr, buffer)?;
        udp.bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
        let bound = udp
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("UDP socket has no inet address"))?;
        match bind_tcp(bound) {
            Ok(l) => return Ok((into_mio_udp(udp)?, l, bound)),
            Err(e) if addr.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("cannot bind")))
}

impl Driver {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = if !self.still_readable.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.core
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(now))
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let mut pending = std::mem::take(&mut self.still_readable);
            for ev in events.iter() {
                let t = ev.token();
                if (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                    && !pending.contains(&t)
                {
                    pending.push(t);
                }
                if ev.is_writable() {
                    self.on_writable(t);
                }
            }
            for t in pending {
                self.on_readable(t);
            }
            let now = Instant::now();
            self.core.handle_timeout(now);
            self.expire_http(now);
            self.drain_core();
            if self.shutting_down {
                info!("shutting down");
                self.core.shutdown(Instant::now());
                self.drain_core();
                for (_, c) in self.conns.iter_mut() {
                    let _ = c.stream.flush();
                }
                return Ok(());
            }
        }
    }

    fn on_readable(&mut self, t: Token) {
        match t {
            SIGNAL if self.signals.drain() => {
                self.shutting_down = true;
            }
            LISTENER => self.accept_tcp(),
            METRICS => self.accept_http(),
            Token(n) if n & TCP_FLAG != 0 => self.read_tcp(t),
            Token(n) if n & HTTP_FLAG != 0 => self.serve_http(n & KEY_MASK),
            Token(n) if (UDP_BASE..UDP_BASE + self.udp.len()).contains(&n) => {
                self.read_udp(n - UDP_BASE)
            }
            _ => {}
        }
    }

    fn on_writable(&mut self, t: Token) {
        match t {
            Token(n) if n & TCP_FLAG != 0 => {
                if let Some(id) = self.live_conn(t) {
                    self.flush_conn(id);
                }
            }
            Token(n) if n & HTTP_FLAG != 0 => self.serve_http(n & KEY_MASK),
            _ => {}
        }
    }

    /// The `ConnId` for a token if the slot still holds that generation.
    fn live_conn(&self, t: Token) -> Option<ConnId> {
        let id = ConnId((t.0 & !TCP_FLAG) as u64);
        let key = (id.0 & KEY_MASK as u64) as usize;
        let conn = self.conns.get(key)?;
        (conn.generation as u64 == id.0 >> 32).then_some(id)
    }

    /// Reads one socket's buffers (at most the per-turn budget), hands each to the core
    /// (GRO super-datagrams as their segments), and re-sends what the core forwards: runs of
    /// segments to one destination as one GSO message, all of a batch in `sendmmsg` calls.
    #[cfg(target_os = "linux")]
    fn read_udp(&mut self, index: usize) {
        let local = self.udp[index].0;
        for _ in 0..UDP_BUDGET / batch::BATCH {
            let n = match self.batch.recv(&self.udp[index].1) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here (ECONNREFUSED etc.); they are not fatal.
                    trace!(error = %e, "UDP receive error");
                    continue;
                }
            };
            let now = Instant::now();
            // The relay socket the queued forwards leave from (almost always one).
            let mut queued_src: Option<usize> = None;
            for i in 0..n {
                let got = self.batch.got[i];
                self.runs.clear();
                self.core.handle_udp_segments(
                    now,
                    local,
                    got.from,
                    self.batch.buffer(i),
                    got.segment_len,
                    &mut self.runs,
                );
                for run in &self.runs {
                    let Some(src) = self.udp.iter().position(|(a, _)| *a == run.forward.source)
                    else {
                        continue;
                    };
                    if let Some(q) = queued_src
                        && q != src
                    {
                        self.batch.flush(&self.udp[q].1);
                    }
                    queued_src = Some(src);
                    self.batch.queue(
                        i,
                        run.offset,
                        run.len,
                        run.segment_len,
                        run.forward.destination,
                    );
                }
            }
            if let Some(q) = queued_src {
                self.batch.flush(&self.udp[q].1);
            }
            // Keep control replies flowing during a long burst.
            self.drain_transmits();
            if n < batch::BATCH {
                return;
            }
        }
        self.still_readable.push(Token(UDP_BASE + index));
    }

    #[cfg(not(target_os = "linux"))]
    fn read_udp(&mut self, index: usize) {
        let local = self.udp[index].0;
        for _ in 0..UDP_BUDGET {
            let (n, from) = match self.udp[index].1.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    trace!(error = %e, "UDP receive error");
                    continue;
                }
            };
            if let Some(fwd) = self
                .core
                .handle_udp(Instant::now(), local, from, &self.buf[..n])
                && let Some((_, s)) = self.udp.iter().find(|(a, _)| *a == fwd.source)
                && let Err(e) = s.send_to(&self.buf[..n], fwd.destination)
            {
                trace!(error = %e, dest = %fwd.destination, "UDP forward failed");
            }
            self.drain_transmits();
        }
        self.still_readable.push(Token(UDP_BASE + index));
    }

    fn accept_tcp(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((mut stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let generation = self.next_generation;
                    // 28 bits: generation << 32 must stay clear of the TCP/HTTP flag bits.
                    self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
                    if self.next_generation == 0 {
                        self.next_generation = 1;
                    }
                    let entry = self.conns.vacant_entry();
                    let id = conn_id(entry.key(), generation);
                    if entry.key() > KEY_MASK
                        || self
                            .poll
                            .registry()
                            .register(&mut stream, conn_token(id), Interest::READABLE)
                            .is_err()
                    {
                        continue;
                    }
                    let local = stream.local_addr().unwrap_or(self.listen_addr);
                    entry.insert(Conn {
                        stream,
                        generation,
                        writable: false,
                    });
                    self.core
                        .handle_tcp_accepted(Instant::now(), id, remote, local);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: try again next turn rather than spin.
                    warn!(error = %e, "accept failed");
                    self.still_readable.push(LISTENER);
                    return;
                }
            }
        }
        self.still_readable.push(LISTENER);
    }

    fn read_tcp(&mut self, t: Token) {
        let Some(id) = self.live_conn(t) else {
            return;
        };
        let key = (id.0 & KEY_MASK as u64) as usize;
        for _ in 0..TCP_BUDGET {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            match conn.stream.read(&mut self.buf) {
                Ok(0) => {
                    self.drop_conn(id);
                    return;
                }
                Ok(n) => {
                    // If the core closes it, it ignores further data; the close itself
                    // happens in drain_core.
                    self.core
                        .handle_tcp_data(Instant::now(), id, &self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(error = %e, "TCP read error");
                    self.drop_conn(id);
                    return;
                }
            }
        }
        self.still_readable.push(t);
    }

    /// Writes what the core has queued for `id`; adjusts WRITABLE interest.
    fn flush_conn(&mut self, id: ConnId) -> bool {
        let key = (id.0 & KEY_MASK as u64) as usize;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return false;
            };
            let out = self.core.tcp_outgoing(id);
            if out.is_empty() {
                if conn.writable {
                    conn.writable = false;
                    let _ = self.poll.registry().reregister(
                        &mut conn.stream,
                        conn_token(id),
                        Interest::READABLE,
                    );
                }
                return true;
            }
            match conn.stream.write(out) {
                Ok(0) => {
                    self.drop_conn(id);
                    return false;
                }
                Ok(n) => self.core.tcp_written(id, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !conn.writable {
                        conn.writable = true;
                        let _ = self.poll.registry().reregister(
                            &mut conn.stream,
                            conn_token(id),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(error = %e, "TCP write error");
                    self.drop_conn(id);
                    return false;
                }
            }
        }
    }

    /// Deregisters, drops the socket, tells the core.
    fn drop_conn(&mut self, id: ConnId) {
        let key = (id.0 & KEY_MASK as u64) as usize;
        if let Some(conn) = self.conns.get(key) {
            if conn.generation as u64 != id.0 >> 32 {
                return;
            }
            let mut conn = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        self.core.handle_tcp_closed(Instant::now(), id);
    }

    fn drain_transmits(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            if let Some((_, s)) = self.udp.iter().find(|(a, _)| *a == t.source)
                && let Err(e) = s.send_to(&t.contents, t.destination)
            {
                trace!(error = %e, dest = %t.destination, "UDP send failed");
            }
        }
    }

    fn drain_core(&mut self) {
        // Bounded: each event is handled once; handling may add at most a few more.
        for _ in 0..1_000_000 {
            self.drain_transmits();
            match self.core.poll_event() {
                Some(Event::TcpWrite(id)) => {
                    self.flush_conn(id);
                }
                Some(Event::TcpClose(id)) => {
                    // Best effort: the final Error frame, if the socket takes it now.
                    if self.flush_conn(id) {
                        let key = (id.0 & KEY_MASK as u64) as usize;
                        if let Some(c) = self.conns.get(key) {
                            let _ = c.stream.shutdown(std::net::Shutdown::Write);
                        }
                    }
                    self.drop_conn(id);
                }
                None => return,
            }
        }
    }

    fn accept_http(&mut self) {
        let Some(listener) = &self.metrics_listener else {
            return;
        };
        for _ in 0..ACCEPT_BUDGET {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.http.len() >= http::MAX_CONNS {
                        continue;
                    }
                    let entry = self.http.vacant_entry();
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            Token(HTTP_FLAG | entry.key()),
                            Interest::READABLE,
                        )
                        .is_ok()
                    {
                        entry.insert(HttpConn::new(stream, Instant::now()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn serve_http(&mut self, key: usize) {
        let Some(conn) = self.http.get_mut(key) else {
            return;
        };
        let core = &self.core;
        let before = conn.wants_write;
        match conn.on_ready(|| core.metrics().render_prometheus()) {
            Next::Keep => {
                if conn.wants_write && !before {
                    let _ = self.poll.registry().reregister(
                        &mut conn.stream,
                        Token(HTTP_FLAG | key),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                }
            }
            Next::Close => {
                let mut conn = self.http.remove(key);
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
    }

    fn expire_http(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .http
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.started) > http::DEADLINE)
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            let mut conn = self.http.remove(k);
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }
}
