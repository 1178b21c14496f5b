//! The IO half of port mapping: one UDP socket (PCP / NAT-PMP to the gateway's port 5351,
//! SSDP search and its replies) and short-lived non-blocking TCP connections for the UPnP
//! IGD's HTTP, all on the node's mio `Poll`, driving a sans-IO [`PortMapper`].

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use tracing::{debug, trace};

use crate::portmap::upnp::{HTTP_TIMEOUT, MAX_HTTP_REPLY};
use crate::portmap::{
    HttpRequest, PortMapConfig, PortMapStatus, PortMapper, SERVER_PORT, parse_default_gateway,
};

/// How port mapping finds its gateway.
#[derive(Debug, Clone)]
pub struct PortMapSettings {
    /// The gateway to ask; `None`: the default route's next hop from `/proc/net/route`.
    pub gateway: Option<Ipv4Addr>,
    /// The gateway's PCP / NAT-PMP port (5351; tests use another).
    pub server_port: u16,
    /// Whether to try UPnP IGD (SSDP multicast, HTTP) as well.
    pub upnp: bool,
}

impl Default for PortMapSettings {
    fn default() -> Self {
        PortMapSettings {
            gateway: None,
            server_port: SERVER_PORT,
            upnp: true,
        }
    }
}

/// The port-mapping UDP socket's token (the node driver's fixed tokens are below 16).
pub(crate) const UDP_TOKEN: Token = Token(3);
/// HTTP connection tokens start here, far above the node driver's relay-connection and
/// extra-socket tokens (`driver::node`).
const HTTP_BASE: usize = usize::MAX / 2;
/// At most this many HTTP exchanges at once (the client makes one at a time).
const MAX_HTTP: usize = 4;

struct HttpConn {
    id: u64,
    token: Token,
    stream: TcpStream,
    request: Vec<u8>,
    written: usize,
    reply: Vec<u8>,
    deadline: Instant,
}

/// Port mapping on the node's reactor.
pub(crate) struct PortMapDriver {
    mapper: PortMapper,
    udp: UdpSocket,
    http: Vec<HttpConn>,
    next_http: usize,
}

impl std::fmt::Debug for PortMapDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortMapDriver")
            .field("status", self.mapper.status())
            .finish_non_exhaustive()
    }
}

/// The default IPv4 gateway of this network namespace.
pub fn default_gateway() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&text)
}

impl PortMapDriver {
    /// Finds the gateway, opens the socket and starts asking for a mapping of
    /// `internal_port` (our main UDP socket's port).
    pub(crate) fn start(
        registry: &Registry,
        settings: &PortMapSettings,
        internal_port: u16,
        seed: u64,
        now: Instant,
    ) -> io::Result<Self> {
        let gateway = settings
            .gateway
            .or_else(default_gateway)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no default IPv4 gateway"))?;
        // Our address toward the gateway: what a connected socket's source would be.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
        probe.connect(SocketAddrV4::new(gateway, settings.server_port))?;
        let local = match probe.local_addr()?.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => {
                return Err(io::Error::other("gateway route is not IPv4"));
            }
        };
        drop(probe);
        let std_udp = std::net::UdpSocket::bind(SocketAddrV4::new(local, 0))?;
        std_udp.set_nonblocking(true)?;
        // UDA 1.1 §1.3.2: the M-SEARCH's TTL "SHOULD default to 2".
        let _ = std_udp.set_multicast_ttl_v4(2);
        let mut udp = UdpSocket::from_std(std_udp);
        registry.register(&mut udp, UDP_TOKEN, Interest::READABLE)?;
        let mut cfg = PortMapConfig::new(gateway, local, internal_port);
        cfg.seed = seed;
        cfg.upnp = settings.upnp;
        cfg.server_port = settings.server_port;
        debug!(%gateway, %local, internal_port, "port mapping: starting");
        Ok(PortMapDriver {
            mapper: PortMapper::new(cfg, now),
            udp,
            http: Vec::new(),
            next_http: 0,
        })
    }

    /// Whether `token` is one of ours.
    pub(crate) fn owns(&self, token: Token) -> bool {
        token == UDP_TOKEN || self.http.iter().any(|c| c.token == token)
    }

    /// When [`PortMapDriver::handle_timeout`] is next due.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.http
            .iter()
            .map(|c| c.deadline)
            .chain(self.mapper.poll_timeout())
            .min()
    }

    /// Runs due timers (the mapper's and the HTTP connections' hang guards).
    pub(crate) fn handle_timeout(&mut self, now: Instant, registry: &Registry) {
        if self.mapper.poll_timeout().is_some_and(|t| t <= now) {
            self.mapper.handle_timeout(now);
        }
        let mut i = 0;
        while i < self.http.len() {
            if self.http[i].deadline <= now {
                let mut c = self.http.swap_remove(i);
                let _ = registry.deregister(&mut c.stream);
                trace!(id = c.id, "UPnP HTTP: timed out");
                self.mapper.handle_http(now, c.id, None);
            } else {
                i += 1;
            }
        }
    }

    /// A readiness event for one of our tokens.
    pub(crate) fn handle_event(&mut self, now: Instant, token: Token, registry: &Registry) {
        if token == UDP_TOKEN {
            let mut buf = [0u8; 2048];
            for _ in 0..64 {
                match self.udp.recv_from(&mut buf) {
                    Ok((n, from)) => self.mapper.handle_udp(now, from, &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        trace!("port mapping socket: {e}");
                    }
                }
            }
            return;
        }
        let Some(i) = self.http.iter().position(|c| c.token == token) else {
            return;
        };
        match Self::pump(&mut self.http[i]) {
            Ok(false) => {}
            Ok(true) => {
                let mut c = self.http.swap_remove(i);
                let _ = registry.deregister(&mut c.stream);
                self.mapper.handle_http(now, c.id, Some(&c.reply));
            }
            Err(e) => {
                let mut c = self.http.swap_remove(i);
                let _ = registry.deregister(&mut c.stream);
                debug!(id = c.id, "UPnP HTTP: {e}");
                self.mapper.handle_http(now, c.id, None);
            }
        }
    }

    /// Writes what is left of the request and reads the reply. `Ok(true)` at EOF.
    fn pump(c: &mut HttpConn) -> io::Result<bool> {
        while c.written < c.request.len() {
            match c.stream.write(&c.request[c.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                // Not connected yet: wait for WRITABLE.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut buf = [0u8; 8192];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    if c.reply.len() + n > MAX_HTTP_REPLY {
                        return Err(io::Error::other("reply over the size limit"));
                    }
                    c.reply.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Carries out the mapper's outputs: datagrams and new HTTP exchanges.
    pub(crate) fn flush(&mut self, now: Instant, registry: &Registry) {
        while let Some((to, bytes)) = self.mapper.poll_transmit() {
            if let Err(e) = self.udp.send_to(&bytes, to) {
                debug!(%to, "port mapping send: {e}");
            }
        }
        while let Some(req) = self.mapper.poll_http() {
            self.open_http(now, req, registry);
        }
    }

    fn open_http(&mut self, now: Instant, req: HttpRequest, registry: &Registry) {
        if self.http.len() >= MAX_HTTP {
            self.mapper.handle_http(now, req.id, None);
            return;
        }
        let token = Token(HTTP_BASE + self.next_http);
        self.next_http = (self.next_http + 1) % (1 << 20);
        let result = TcpStream::connect(req.to).and_then(|mut stream| {
            registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        match result {
            Ok(stream) => self.http.push(HttpConn {
                id: req.id,
                token,
                stream,
                request: req.request,
                written: 0,
                reply: Vec::new(),
                deadline: now + HTTP_TIMEOUT + Duration::from_secs(1),
            }),
            Err(e) => {
                debug!(to = %req.to, "UPnP HTTP connect: {e}");
                self.mapper.handle_http(now, req.id, None);
            }
        }
    }

    /// The next status change for the node core.
    pub(crate) fn poll_status(&mut self) -> Option<PortMapStatus> {
        self.mapper.poll_status()
    }

    /// Starts deleting the mapping.
    pub(crate) fn release(&mut self, now: Instant) {
        self.mapper.release(now);
    }

    /// Whether the deletes are done.
    pub(crate) fn is_released(&self) -> bool {
        self.mapper.is_released()
    }

    /// Closes every connection (before drop).
    pub(crate) fn close(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.udp);
        for mut c in self.http.drain(..) {
            let _ = registry.deregister(&mut c.stream);
        }
    }

    /// The address the mapping socket is bound to (tests).
    #[allow(dead_code)]
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.local_addr().ok()
    }
}
