//! The node's mio reactor: one thread, one `Poll`, the UDP sockets and the relay TCP
//! connection, driving a [`NodeCore`] and an application on top of it ([`NodeApp`]).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, trace, warn};

use super::portmap::{PortMapDriver, PortMapSettings};
use super::udp::{RecvBuffers, UdpEndpoint};
use crate::node::{NodeConfig, NodeCore, NodeEvent, Transmit};

/// What runs on top of the node core: a command (`ping`, `listen`, `send`...) as a sans-IO
/// state machine of its own. The driver calls it with every event the core emits (except
/// the driver's own relay-connection requests) and on its timeouts.
pub trait NodeApp {
    /// An event from the core. The app may call core methods (connect, ping, send).
    fn on_event(&mut self, now: Instant, core: &mut NodeCore, event: NodeEvent);
    /// Called once per loop turn after the inputs were handled; the app may act on its own
    /// timers here.
    fn on_tick(&mut self, now: Instant, core: &mut NodeCore);
    /// When the app next wants `on_tick`.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// Called after a run of [`NodeApp::on_event`] calls, once the core's event queue is
    /// empty: an app may defer per-event work (e.g. polling its transport for transmits)
    /// to here so that a received batch is answered as a batch. Default: nothing.
    fn flush(&mut self, _now: Instant, _core: &mut NodeCore) {}
    /// Whether the app has finished (the driver then returns).
    fn is_done(&self) -> bool;
}

/// Tokens: fixed ones for the UDP sockets, then one per relay connection attempt (the
/// generation in the token makes a late event for a closed connection harmless).
const UDP4: Token = Token(0);
const UDP6: Token = Token(1);
const WAKE: Token = Token(2);
const RELAY_BASE: usize = 16;
/// Tokens of extra (hard-NAT punching) sockets: this plus their slab key. Far above any
/// relay connection generation.
const EXTRA_BASE: usize = 1 << 40;
/// End of the extra-socket token range (the port-mapping driver's tokens lie above it).
const EXTRA_END: usize = EXTRA_BASE + (1 << 32);

/// How long before a precise deadline the loop stops sleeping in epoll and spins.
const PRECISE_SPIN: Duration = Duration::from_millis(4);

/// Most datagrams read from one socket per loop turn, so the relay connection and timers
/// are served even under a flood.
const READ_BUDGET: usize = 256;

/// Cap on datagrams per GSO send. Larger batches save syscalls and per-batch work but make
/// bursts longer (quinn-proto still paces them; upstream quinn allows the kernel's 64). 32
/// keeps a batch of 1444-byte QUIC datagrams plus 8-byte relay headers (46 KB) well under
/// the 64 KiB GSO limit. Measured on loopback: 10 -> 32 cut CPU per GB by ~5 %.
pub const MAX_SEGMENTS: usize = 32;

/// How the driver binds its sockets.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The IPv4 UDP socket's address (port 0 picks one).
    pub udp4: SocketAddr,
    /// An IPv6 UDP socket's address, if wanted; failure to bind it is not fatal.
    pub udp6: Option<SocketAddr>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            udp4: "0.0.0.0:0".parse().expect("valid literal"),
            udp6: Some("[::]:0".parse().expect("valid literal")),
        }
    }
}

struct RelayConn {
    stream: TcpStream,
    token: Token,
    connected: bool,
    writable_interest: bool,
}

/// The reactor. Create it with [`NodeDriver::new`], then [`NodeDriver::run`] an app.
pub struct NodeDriver {
    poll: Poll,
    core: NodeCore,
    udp4: UdpEndpoint,
    udp6: Option<UdpEndpoint>,
    relay: Option<RelayConn>,
    relay_generation: usize,
    bufs: RecvBuffers,
    /// Transmits that met a full socket buffer; retried before new ones.
    blocked: Option<Transmit>,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    waker: std::sync::Arc<mio::Waker>,
    /// Sockets whose read budget ran out while still readable (edge-triggered readiness
    /// will not report them again): read again next turn, polling with a zero timeout.
    still_readable: Vec<Token>,
    /// Extra sockets the core asked for (hard-NAT punching), by slab key = token offset.
    extra: slab::Slab<UdpEndpoint>,
    extra_by_addr: std::collections::HashMap<SocketAddr, usize>,
    /// Router port mapping for the IPv4 socket, when enabled
    /// ([`NodeDriver::enable_port_mapping`]); released on drop.
    portmap: Option<PortMapDriver>,
}

impl std::fmt::Debug for NodeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDriver")
            .field("udp4", &self.udp4)
            .field("udp6", &self.udp6)
            .finish_non_exhaustive()
    }
}

/// Unspecified bind addresses are useless as host candidates: list the machine's
/// addresses instead. Loopback addresses only mean something to a peer on this machine, so
/// they are offered only when the relay itself is on loopback (a local setup).
fn host_candidates(bound: SocketAddr, relay: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    interface_addresses(bound.is_ipv4())
        .into_iter()
        .filter(|ip| !ip.is_loopback() || relay.ip().is_loopback())
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect()
}

/// The machine's interface addresses of one family, via getifaddrs(3).
fn interface_addresses(v4: bool) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free with freeifaddrs below; we only
    // read sockaddr fields whose family we checked.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                let family = (*addr).sa_family as i32;
                if v4 && family == libc::AF_INET {
                    let sin = &*(addr as *const libc::sockaddr_in);
                    out.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                        u32::from_be(sin.sin_addr.s_addr),
                    )));
                } else if !v4 && family == libc::AF_INET6 {
                    let sin6 = &*(addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    // Link-local addresses need a scope id a peer cannot use.
                    if ip.segments()[0] & 0xffc0 != 0xfe80 {
                        out.push(std::net::IpAddr::V6(ip));
                    }
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

impl NodeDriver {
    /// Binds the sockets and builds the core (its host candidates are the bound sockets).
    pub fn new(mut config: NodeConfig, driver: DriverConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut udp4 = UdpEndpoint::bind(driver.udp4)?;
        poll.registry()
            .register(udp4.source(), UDP4, Interest::READABLE)?;
        let mut udp6 = match driver.udp6.map(UdpEndpoint::bind) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                debug!("no IPv6 socket: {e}");
                None
            }
            None => None,
        };
        if let Some(s) = udp6.as_mut() {
            poll.registry()
                .register(s.source(), UDP6, Interest::READABLE)?;
        }
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        if config.local_addrs.is_empty() {
            config.local_addrs = host_candidates(udp4.local_addr(), config.relay_udp);
            if let Some(s) = &udp6 {
                config
                    .local_addrs
                    .extend(host_candidates(s.local_addr(), config.relay_udp));
            }
        }
        if config.seed == 0 {
            config.seed = rand::random();
        }
        let core = NodeCore::new(config, Instant::now());
        Ok(NodeDriver {
            poll,
            core,
            udp4,
            udp6,
            relay: None,
            relay_generation: 0,
            bufs: RecvBuffers::new(),
            blocked: None,
            stop: None,
            waker,
            still_readable: Vec::new(),
            extra: slab::Slab::new(),
            extra_by_addr: std::collections::HashMap::new(),
            portmap: None,
        })
    }

    /// Asks the router for a port mapping of the IPv4 socket (PCP, NAT-PMP, then UPnP IGD;
    /// see [`crate::portmap`]): the mapped address becomes a candidate, is renewed while the
    /// driver lives, and is deleted when it is dropped. Fails when there is no IPv4 default
    /// gateway.
    pub fn enable_port_mapping(&mut self, settings: PortMapSettings) -> io::Result<()> {
        let now = Instant::now();
        let mut pm = match PortMapDriver::start(
            self.poll.registry(),
            &settings,
            self.udp4.local_addr().port(),
            rand::random(),
            now,
        ) {
            Ok(pm) => pm,
            Err(e) => {
                self.core.handle_port_mapping(
                    now,
                    crate::portmap::PortMapStatus::Unavailable(e.to_string()),
                );
                return Err(e);
            }
        };
        pm.flush(now, self.poll.registry());
        self.portmap = Some(pm);
        self.portmap_turn(now);
        Ok(())
    }

    /// Port mapping's share of a loop turn: timers, outputs, status changes to the core.
    fn portmap_turn(&mut self, now: Instant) {
        let Some(pm) = self.portmap.as_mut() else {
            return;
        };
        pm.handle_timeout(now, self.poll.registry());
        pm.flush(now, self.poll.registry());
        while let Some(status) = pm.poll_status() {
            self.core.handle_port_mapping(now, status);
        }
    }

    /// Deletes the port mapping, waiting at most `wait` for the router to confirm (a
    /// router that does not answer keeps the mapping until its lifetime runs out).
    fn release_port_mapping(&mut self, wait: Duration) {
        let Some(mut pm) = self.portmap.take() else {
            return;
        };
        let start = Instant::now();
        pm.release(start);
        let mut events = Events::with_capacity(16);
        for _ in 0..1000 {
            let now = Instant::now();
            pm.handle_timeout(now, self.poll.registry());
            pm.flush(now, self.poll.registry());
            if pm.is_released() || now >= start + wait {
                break;
            }
            let timeout = pm
                .poll_timeout()
                .unwrap_or(start + wait)
                .min(start + wait)
                .saturating_duration_since(now);
            if self.poll.poll(&mut events, Some(timeout)).is_err() {
                break;
            }
            let now = Instant::now();
            for ev in events.iter() {
                if pm.owns(ev.token()) {
                    pm.handle_event(now, ev.token(), self.poll.registry());
                }
            }
        }
        debug!(released = pm.is_released(), "port mapping: deleted");
        pm.close(self.poll.registry());
    }

    /// The core, for calls before [`NodeDriver::run`] (e.g. `connect`).
    pub fn core(&mut self) -> &mut NodeCore {
        &mut self.core
    }

    /// Most datagrams one GSO send may carry on the IPv4 socket (1 without GSO): what to set
    /// as [`crate::transport::TransportConfig::max_segments`] (capped, see
    /// [`MAX_SEGMENTS`]).
    pub fn max_gso_segments(&self) -> usize {
        self.udp4.max_gso_segments().min(MAX_SEGMENTS)
    }

    /// The IPv4 UDP socket's address.
    pub fn udp4_addr(&self) -> SocketAddr {
        self.udp4.local_addr()
    }

    /// A flag that makes [`NodeDriver::run`] return when set (and the waker to call after
    /// setting it from another thread or a signal handler's helper thread).
    pub fn stop_handle(
        &mut self,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::sync::Arc<mio::Waker>,
    ) {
        let flag = self
            .stop
            .get_or_insert_with(|| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)))
            .clone();
        (flag, self.waker.clone())
    }

    /// Runs until the app is done, the stop flag is set, or `deadline` passes.
    pub fn run(&mut self, app: &mut dyn NodeApp, deadline: Option<Instant>) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(now);
            }
            self.portmap_turn(now);
            // An event handled during the drain may change what the app wants to do now
            // (e.g. a path change starts the next phase): tick again until it is quiet.
            for _ in 0..8 {
                app.on_tick(now, &mut self.core);
                if !self.drain(now, app)? {
                    break;
                }
            }
            if app.is_done()
                || deadline.is_some_and(|d| d <= now)
                || self
                    .stop
                    .as_ref()
                    .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Ok(());
            }
            let next = [
                self.core.poll_timeout(),
                app.poll_timeout(),
                deadline,
                self.portmap.as_ref().and_then(|p| p.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = next.map(|t| t.saturating_duration_since(Instant::now()));
            // A blocked transmit waits for WRITABLE on its socket; poll at most 1 ms then.
            // A hard-NAT sweep burst must start within microseconds of the peer's (see
            // `NodeCore::poll_precise_timeout`); epoll rounds to milliseconds, so spin for
            // the last stretch (a few ms, rarely).
            let precise_soon = self
                .core
                .poll_precise_timeout()
                .is_some_and(|t| t.saturating_duration_since(Instant::now()) < PRECISE_SPIN);
            let timeout = if !self.still_readable.is_empty() || precise_soon {
                Some(Duration::ZERO)
            } else if self.blocked.is_some() {
                Some(
                    timeout
                        .unwrap_or(Duration::from_millis(1))
                        .min(Duration::from_millis(1)),
                )
            } else {
                timeout
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for token in std::mem::take(&mut self.still_readable) {
                self.read_udp(now, token)?;
            }
            for event in events.iter() {
                match event.token() {
                    UDP4 | UDP6 => self.read_udp(now, event.token())?,
                    t if (EXTRA_BASE..EXTRA_END).contains(&t.0) => self.read_udp(now, t)?,
                    WAKE => {}
                    t if self.relay.as_ref().is_some_and(|r| r.token == t) => {
                        self.relay_ready(now, event.is_writable())
                    }
                    t if self.portmap.as_ref().is_some_and(|p| p.owns(t)) => {
                        if let Some(pm) = self.portmap.as_mut() {
                            pm.handle_event(now, t, self.poll.registry());
                        }
                    }
                    t => trace!(?t, "stale event"),
                }
            }
        }
    }

    fn read_udp(&mut self, now: Instant, token: Token) -> io::Result<()> {
        let socket = if token == UDP4 {
            &self.udp4
        } else if token == UDP6 {
            match &self.udp6 {
                Some(s) => s,
                None => return Ok(()),
            }
        } else {
            match self.extra.get(token.0 - EXTRA_BASE) {
                Some(s) => s,
                None => return Ok(()),
            }
        };
        let local = socket.local_addr();
        let core = &mut self.core;
        let mut read = 0;
        // Edge-triggered: drain until WouldBlock, within the budget.
        while read < READ_BUDGET {
            let n = match socket.recv_batch(&mut self.bufs, |from, data| {
                core.handle_udp(now, local, from, data);
            }) {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors (port unreachable from a dead candidate) surface here on
                    // Linux; they are not fatal to the socket.
                    debug!("udp receive on {local}: {e}");
                    break;
                }
            };
            if n == 0 {
                return Ok(());
            }
            read += n;
        }
        // Budget spent: come back to this socket right after serving the others.
        if !self.still_readable.contains(&token) {
            self.still_readable.push(token);
        }
        Ok(())
    }

    fn relay_ready(&mut self, now: Instant, writable: bool) {
        let Some(conn) = self.relay.as_mut() else {
            return;
        };
        if !conn.connected {
            if !writable {
                return;
            }
            // A non-blocking connect finished: success if there is no socket error and the
            // peer address is known.
            match conn.stream.take_error() {
                Ok(None) if conn.stream.peer_addr().is_ok() => {
                    conn.connected = true;
                    let _ = conn.stream.set_nodelay(true);
                    self.core.handle_relay_connected(now);
                }
                Ok(None) => return, // spurious wake-up, still connecting
                Ok(Some(e)) | Err(e) => {
                    debug!("relay connect failed: {e}");
                    self.close_relay(now, true);
                    return;
                }
            }
        }
        // Read everything there is.
        let mut buf = [0u8; 16 * 1024];
        loop {
            let Some(conn) = self.relay.as_mut() else {
                return;
            };
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    debug!("relay closed the connection");
                    self.close_relay(now, true);
                    return;
                }
                Ok(n) => self.core.handle_relay_tcp_data(now, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("relay read: {e}");
                    self.close_relay(now, true);
                    return;
                }
            }
        }
    }

    fn close_relay(&mut self, now: Instant, tell_core: bool) {
        if let Some(mut conn) = self.relay.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        if tell_core {
            self.core.handle_relay_closed(now);
        }
    }

    fn open_relay(&mut self, now: Instant, addr: SocketAddr) {
        self.close_relay(now, false);
        self.relay_generation += 1;
        let token = Token(RELAY_BASE + self.relay_generation);
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    warn!("register relay connection: {e}");
                    self.core.handle_relay_closed(now);
                    return;
                }
                self.relay = Some(RelayConn {
                    stream,
                    token,
                    connected: false,
                    writable_interest: true,
                });
            }
            Err(e) => {
                debug!("relay connect to {addr}: {e}");
                self.core.handle_relay_closed(now);
            }
        }
    }

    fn send_udp(&mut self, t: &Transmit) -> io::Result<bool> {
        let socket = match t.source {
            Some(src) if self.extra_by_addr.contains_key(&src) => self
                .extra_by_addr
                .get(&src)
                .and_then(|&k| self.extra.get(k)),
            Some(src) if self.udp6.as_ref().is_some_and(|s| s.local_addr() == src) => {
                self.udp6.as_ref()
            }
            Some(_) | None if t.destination.is_ipv6() => self.udp6.as_ref(),
            _ => Some(&self.udp4),
        };
        let Some(socket) = socket else {
            trace!(dest = %t.destination, "no socket for this address family");
            return Ok(true);
        };
        let result = match t.segment_size {
            Some(size) if socket.max_gso_segments() <= 1 => {
                // No GSO on this socket: one send per segment. A full buffer midway retries
                // the whole batch later; QUIC discards the duplicated packets.
                t.contents
                    .chunks(size.max(1))
                    .try_for_each(|d| socket.send(t.destination, d, None))
            }
            segment_size => socket.send(t.destination, &t.contents, segment_size),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => {
                // Unreachable networks, EMSGSIZE, ICMP errors: the datagram is lost like any
                // other UDP loss; the core's retries and the transport's recovery handle it.
                debug!(dest = %t.destination, "udp send: {e}");
                Ok(true)
            }
        }
    }

    /// Sends what the core queued and hands its events to the app, until both are empty.
    /// Returns whether any event reached the app.
    fn drain(&mut self, now: Instant, app: &mut dyn NodeApp) -> io::Result<bool> {
        let mut delivered = false;
        for _ in 0..1_000_000 {
            let mut progressed = false;
            if let Some(t) = self.blocked.take()
                && !self.send_udp(&t)?
            {
                self.blocked = Some(t);
            }
            while self.blocked.is_none() {
                let Some(t) = self.core.poll_transmit() else {
                    break;
                };
                progressed = true;
                if !self.send_udp(&t)? {
                    self.blocked = Some(t);
                }
            }
            self.flush_relay(now);
            let mut app_events = false;
            while let Some(ev) = self.core.poll_event() {
                progressed = true;
                match ev {
                    NodeEvent::ConnectRelayTcp(addr) => self.open_relay(now, addr),
                    NodeEvent::CloseRelayTcp => self.close_relay(now, false),
                    NodeEvent::OpenSockets { request, ports } => {
                        let locals = self.open_extra(&ports);
                        self.core.handle_sockets_opened(now, request, &locals);
                    }
                    NodeEvent::CloseSockets { locals } => self.close_extra(&locals),
                    other => {
                        app_events = true;
                        delivered = true;
                        app.on_event(now, &mut self.core, other);
                    }
                }
            }
            if app_events {
                // Whatever the app queued goes out on the next round of this loop.
                app.flush(now, &mut self.core);
            }
            if !progressed {
                return Ok(delivered);
            }
        }
        warn!("drain did not settle");
        Ok(delivered)
    }

    /// Binds extra IPv4 sockets on the main socket's address; ports that fail are skipped.
    fn open_extra(&mut self, ports: &[u16]) -> Vec<SocketAddr> {
        let ip = self.udp4.local_addr().ip();
        let mut locals = Vec::with_capacity(ports.len());
        for &port in ports {
            let mut socket = match UdpEndpoint::bind_extra(SocketAddr::new(ip, port)) {
                Ok(s) => s,
                Err(e) => {
                    trace!(port, "extra socket: {e}");
                    // Out of descriptors: the rest would fail too.
                    if e.raw_os_error() == Some(libc::EMFILE)
                        || e.raw_os_error() == Some(libc::ENFILE)
                    {
                        debug!(
                            "extra sockets: out of file descriptors after {}",
                            locals.len()
                        );
                        break;
                    }
                    continue;
                }
            };
            let entry = self.extra.vacant_entry();
            let key = entry.key();
            if self
                .poll
                .registry()
                .register(socket.source(), Token(EXTRA_BASE + key), Interest::READABLE)
                .is_err()
            {
                continue;
            }
            let local = socket.local_addr();
            entry.insert(socket);
            self.extra_by_addr.insert(local, key);
            locals.push(local);
        }
        debug!(
            asked = ports.len(),
            opened = locals.len(),
            "extra sockets open"
        );
        locals
    }

    fn close_extra(&mut self, locals: &[SocketAddr]) {
        for local in locals {
            if let Some(key) = self.extra_by_addr.remove(local)
                && self.extra.contains(key)
            {
                let mut socket = self.extra.remove(key);
                let _ = self.poll.registry().deregister(socket.source());
                self.still_readable.retain(|t| t.0 != EXTRA_BASE + key);
            }
        }
    }

    fn flush_relay(&mut self, now: Instant) {
        let Some(conn) = self.relay.as_mut() else {
            return;
        };
        if !conn.connected {
            return;
        }
        loop {
            let out = self.core.relay_tcp_outgoing();
            if out.is_empty() {
                break;
            }
            match conn.stream.write(out) {
                Ok(0) => break,
                Ok(n) => self.core.relay_tcp_written(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("relay write: {e}");
                    self.close_relay(now, true);
                    return;
                }
            }
        }
        // WRITABLE interest only while bytes wait.
        let want = !self.core.relay_tcp_outgoing().is_empty();
        let Some(conn) = self.relay.as_mut() else {
            return;
        };
        if want != conn.writable_interest {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut conn.stream, conn.token, interest)
                .is_ok()
            {
                conn.writable_interest = want;
            }
        }
    }
}

impl Drop for NodeDriver {
    fn drop(&mut self) {
        // A clean exit deletes the router mapping (RFC 6886 §3.4, RFC 6887 §15: a client
        // SHOULD delete mappings it no longer needs) rather than leaving a forwarded port.
        self.release_port_mapping(Duration::from_secs(1));
    }
}
