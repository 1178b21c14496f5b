//! Port mapping: asking the local router to forward a public port to our UDP socket, with
//! PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD, as sans-IO state machines.
//!
//! A mapped port is reachable from anywhere, whatever the NAT's mapping and filtering
//! behaviour: a symmetric NAT that defeats hole punching still forwards it. The node
//! announces it as a [`crate::wire::control::CandidateKind::PortMapped`] candidate.
//!
//! [`PortMapper`] coordinates the three clients ([`pcp::PcpClient`],
//! [`natpmp::NatPmpClient`], [`upnp::UpnpClient`]):
//! * PCP first, then NAT-PMP when the gateway answers PCP with a version-0 reply (RFC 6887
//!   Appendix A: a NAT-PMP-only gateway does that) or stays silent. Both are one small UDP
//!   exchange with the gateway and carry the mapping's lifetime; PCP also returns the
//!   external address in the same reply.
//! * UPnP IGD *discovery* (SSDP search, description fetch) runs in parallel from the start,
//!   because its multicast search waits for devices (MX seconds); but it only *maps* after
//!   PCP and NAT-PMP failed. So a router that speaks both gets one mapping, not two, and the
//!   fallback costs no extra wait.
//!
//! # Driving it
//! Inputs: [`PortMapper::handle_udp`] (datagrams on the port-mapping UDP socket: from the
//! gateway's port 5351 for PCP/NAT-PMP, anything else is taken as an SSDP reply),
//! [`PortMapper::handle_http`] (the reply to an HTTP exchange), [`PortMapper::handle_timeout`],
//! [`PortMapper::release`] (on shutdown).
//! Drain order after every input: [`PortMapper::poll_transmit`] until `None` (UDP),
//! [`PortMapper::poll_http`] until `None` (TCP exchanges), [`PortMapper::poll_status`]
//! until `None`, then sleep until [`PortMapper::poll_timeout`].

pub mod natpmp;
pub mod pcp;
pub mod upnp;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::debug;

pub use upnp::HttpRequest;

/// The PCP and NAT-PMP server port on the gateway (RFC 6887 §19.1, RFC 6886 §3.1).
pub const SERVER_PORT: u16 = 5351;

/// Which protocol made a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// UPnP Internet Gateway Device (WANIPConnection).
    Upnp,
}

impl Protocol {
    /// Short name for output.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

/// A port mapping held on the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The protocol that made it.
    pub protocol: Protocol,
    /// The public address the router forwards to us.
    pub external: SocketAddr,
    /// Our socket's port it forwards to.
    pub internal_port: u16,
    /// Granted lifetime (zero: permanent UPnP lease); renewed at half of it.
    pub lifetime: Duration,
}

/// Where port mapping stands, as the node and the user see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortMapStatus {
    /// Turned off (`--no-portmap`), or not run by this driver.
    #[default]
    Disabled,
    /// Asking the router.
    Probing,
    /// A mapping is held.
    Mapped(Mapping),
    /// No protocol worked; why (for humans).
    Unavailable(String),
}

/// Port mapping configuration.
#[derive(Debug, Clone)]
pub struct PortMapConfig {
    /// The gateway (default route's next hop).
    pub gateway: Ipv4Addr,
    /// Our address on the gateway's network (PCP's client address, UPnP's internal client).
    pub local: Ipv4Addr,
    /// Our UDP socket's port: the one to map.
    pub internal_port: u16,
    /// Lifetime asked of PCP / NAT-PMP (RFC 6886 §3.3 recommends 7200 s).
    pub lifetime: u32,
    /// Seed for the PCP nonce.
    pub seed: u64,
    /// Whether to try UPnP IGD at all.
    pub upnp: bool,
    /// The gateway's PCP/NAT-PMP port ([`SERVER_PORT`]; tests point it elsewhere).
    pub server_port: u16,
}

impl PortMapConfig {
    /// Defaults for a gateway, local address and port.
    pub fn new(gateway: Ipv4Addr, local: Ipv4Addr, internal_port: u16) -> Self {
        PortMapConfig {
            gateway,
            local,
            internal_port,
            lifetime: 7200,
            seed: 0,
            upnp: true,
            server_port: SERVER_PORT,
        }
    }
}

/// First retransmission timeout: RFC 6886 §3.1 ("initially 250 ms, doubling").
const FIRST_RTO: Duration = Duration::from_millis(250);
/// Retransmissions before a silent gateway counts as not speaking the protocol. RFC 6886
/// allows 9 (64 s); we fall through to the next protocol after 4 sends (~3.75 s) instead, since
/// every protocol is tried and the node works without a mapping meanwhile.
pub(crate) const RETRANSMITS: u32 = 3;

/// RFC 6886 §3.1-style retransmission timer: 250 ms, doubling, bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retransmit {
    next: Option<Instant>,
    rto: Duration,
    sent: u32,
}

impl Retransmit {
    /// A request was just sent at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Retransmit {
            next: Some(now + FIRST_RTO),
            rto: FIRST_RTO,
            sent: 1,
        }
    }

    /// Nothing outstanding.
    pub(crate) fn idle() -> Self {
        Retransmit {
            next: None,
            rto: FIRST_RTO,
            sent: 0,
        }
    }

    pub(crate) fn active(&self) -> bool {
        self.next.is_some()
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.next
    }

    pub(crate) fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|t| now >= t)
    }

    /// The timer fired: `true` = send again (rescheduled), `false` = give up.
    pub(crate) fn fire(&mut self, now: Instant) -> bool {
        if self.sent > RETRANSMITS {
            self.next = None;
            return false;
        }
        self.rto *= 2;
        self.next = Some(now + self.rto);
        self.sent += 1;
        true
    }
}

/// The coordinator. See the module docs for the drain order.
#[derive(Debug)]
pub struct PortMapper {
    cfg: PortMapConfig,
    pcp: Option<pcp::PcpClient>,
    natpmp: Option<natpmp::NatPmpClient>,
    upnp: Option<upnp::UpnpClient>,
    status: PortMapStatus,
    statuses: VecDeque<PortMapStatus>,
    /// Why each protocol failed, for [`PortMapStatus::Unavailable`].
    failures: Vec<String>,
    releasing: bool,
}

impl PortMapper {
    /// Starts PCP and the UPnP search at `now`.
    pub fn new(cfg: PortMapConfig, now: Instant) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
        let nonce: [u8; 12] = rng.random();
        let gw = SocketAddrV4::new(cfg.gateway, cfg.server_port);
        let pcp = pcp::PcpClient::new(now, gw, cfg.local, cfg.internal_port, cfg.lifetime, nonce);
        let upnp = cfg
            .upnp
            .then(|| upnp::UpnpClient::new(now, cfg.gateway, cfg.local, cfg.internal_port));
        let mut m = PortMapper {
            cfg,
            pcp: Some(pcp),
            natpmp: None,
            upnp,
            status: PortMapStatus::Probing,
            statuses: VecDeque::new(),
            failures: Vec::new(),
            releasing: false,
        };
        m.statuses.push_back(PortMapStatus::Probing);
        m
    }

    /// The current status.
    pub fn status(&self) -> &PortMapStatus {
        &self.status
    }

    fn set_status(&mut self, s: PortMapStatus) {
        if self.status != s {
            debug!(status = ?s, "port mapping");
            self.status = s.clone();
            self.statuses.push_back(s);
        }
    }

    /// The next status change, for the node.
    pub fn poll_status(&mut self) -> Option<PortMapStatus> {
        self.statuses.pop_front()
    }

    /// The next datagram for the port-mapping UDP socket.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        if let Some(t) = self.pcp.as_mut().and_then(|c| c.poll_transmit()) {
            return Some(t);
        }
        if let Some(t) = self.natpmp.as_mut().and_then(|c| c.poll_transmit()) {
            return Some(t);
        }
        self.upnp.as_mut().and_then(|c| c.poll_transmit())
    }

    /// The next HTTP exchange to carry out (UPnP).
    pub fn poll_http(&mut self) -> Option<HttpRequest> {
        self.upnp.as_mut().and_then(|c| c.poll_http())
    }

    /// When [`PortMapper::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.pcp.as_ref().and_then(|c| c.poll_timeout()),
            self.natpmp.as_ref().and_then(|c| c.poll_timeout()),
            self.upnp.as_ref().and_then(|c| c.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(o) = self.pcp.as_mut().map(|c| c.handle_timeout(now)) {
            self.on_pcp(now, o);
        }
        if let Some(o) = self.natpmp.as_mut().map(|c| c.handle_timeout(now)) {
            self.on_natpmp(now, o);
        }
        if let Some(o) = self.upnp.as_mut().map(|c| c.handle_timeout(now)) {
            self.on_upnp(now, o);
        }
    }

    /// A datagram on the port-mapping socket.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, b: &[u8]) {
        if from.port() == self.cfg.server_port && from.ip() == IpAddr::V4(self.cfg.gateway) {
            if let Some(o) = self.pcp.as_mut().map(|c| c.handle_response(now, from, b)) {
                self.on_pcp(now, o);
            } else if let Some(o) = self
                .natpmp
                .as_mut()
                .map(|c| c.handle_response(now, from, b))
            {
                self.on_natpmp(now, o);
            }
        } else if let Some(o) = self.upnp.as_mut().map(|c| c.handle_ssdp(now, from, b)) {
            self.on_upnp(now, o);
        }
    }

    /// The reply to HTTP exchange `id` (`None`: connection failed or reply too big).
    pub fn handle_http(&mut self, now: Instant, id: u64, reply: Option<&[u8]>) {
        if let Some(o) = self.upnp.as_mut().map(|c| c.handle_http(now, id, reply)) {
            self.on_upnp(now, o);
        }
    }

    fn on_pcp(&mut self, now: Instant, o: pcp::Outcome) {
        match o {
            pcp::Outcome::None => {}
            pcp::Outcome::Mapped(m) => self.mapped(now, m),
            pcp::Outcome::Unsupported | pcp::Outcome::Failed(_) => {
                if let pcp::Outcome::Failed(why) = o {
                    self.failures.push(why);
                }
                self.pcp = None;
                if self.releasing {
                    return;
                }
                if matches!(self.status, PortMapStatus::Mapped(_)) {
                    // A held mapping expired unrenewed: start over with PCP's fallbacks.
                    self.set_status(PortMapStatus::Probing);
                }
                let gw = SocketAddrV4::new(self.cfg.gateway, self.cfg.server_port);
                self.natpmp = Some(natpmp::NatPmpClient::new(
                    now,
                    gw,
                    self.cfg.internal_port,
                    self.cfg.lifetime,
                ));
            }
            pcp::Outcome::Deleted => self.pcp = None,
        }
    }

    fn on_natpmp(&mut self, now: Instant, o: natpmp::Outcome) {
        match o {
            natpmp::Outcome::None => {}
            natpmp::Outcome::Mapped(m) => self.mapped(now, m),
            natpmp::Outcome::Failed(why) => {
                self.failures.push(why);
                self.natpmp = None;
                if self.releasing {
                    return;
                }
                match self.upnp.as_mut() {
                    Some(u) => u.map(now),
                    None => self.unavailable(),
                }
            }
            natpmp::Outcome::Deleted => self.natpmp = None,
        }
    }

    fn on_upnp(&mut self, now: Instant, o: upnp::Outcome) {
        match o {
            upnp::Outcome::None | upnp::Outcome::Found => {}
            upnp::Outcome::Mapped(m) => self.mapped(now, m),
            upnp::Outcome::Failed(why) => {
                self.failures.push(why);
                self.upnp = None;
                if !self.releasing && self.pcp.is_none() && self.natpmp.is_none() {
                    self.unavailable();
                }
            }
            upnp::Outcome::Deleted => self.upnp = None,
        }
    }

    fn mapped(&mut self, now: Instant, m: Mapping) {
        if self.releasing {
            return;
        }
        // Got one from PCP or NAT-PMP: UPnP (discovery only so far) is not needed.
        if m.protocol != Protocol::Upnp
            && let Some(mut u) = self.upnp.take()
        {
            u.release(now);
        }
        self.set_status(PortMapStatus::Mapped(m));
    }

    fn unavailable(&mut self) {
        let why = if self.failures.is_empty() {
            "no answer".to_string()
        } else {
            self.failures.join("; ")
        };
        self.set_status(PortMapStatus::Unavailable(why));
    }

    /// Starts deleting the mapping (shutdown). Drive the outputs until
    /// [`PortMapper::is_released`].
    pub fn release(&mut self, now: Instant) {
        self.releasing = true;
        if let Some(c) = self.pcp.as_mut()
            && !c.release(now)
        {
            self.pcp = None;
        }
        if let Some(c) = self.natpmp.as_mut()
            && !c.release(now)
        {
            self.natpmp = None;
        }
        if let Some(c) = self.upnp.as_mut()
            && !c.release(now)
        {
            self.upnp = None;
        }
        self.set_status(PortMapStatus::Disabled);
    }

    /// Whether every delete finished (or was given up).
    pub fn is_released(&self) -> bool {
        self.releasing
            && self.pcp.as_ref().is_none_or(|c| c.is_done())
            && self.natpmp.as_ref().is_none_or(|c| c.is_done())
            && self.upnp.as_ref().is_none_or(|c| c.is_done())
    }
}

/// Whether an external address is worth announcing: a private or shared (CGNAT) one means
/// another NAT sits above the router, and the mapping does not reach the internet.
pub fn is_announceable(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            let cgnat = o[0] == 100 && (o[1] & 0xc0) == 64;
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_link_local()
                || ip.is_broadcast()
                || ip.is_multicast()
                || cgnat)
                && addr.port() != 0
        }
        IpAddr::V6(ip) => !(ip.is_loopback() || ip.is_unspecified()) && addr.port() != 0,
    }
}

/// The default IPv4 gateway from the text of `/proc/net/route` (little-endian hex
/// columns: Iface, Destination, Gateway, Flags, ...). The route with destination 0 and the
/// gateway flag (RTF_GATEWAY = 0x2) wins.
pub fn parse_default_gateway(proc_net_route: &str) -> Option<Ipv4Addr> {
    for line in proc_net_route.lines().skip(1).take(4096) {
        let cols: Vec<&str> = line.split_whitespace().take(4).collect();
        if cols.len() < 4 || cols[1] != "00000000" {
            continue;
        }
        let gw = u32::from_str_radix(cols[2], 16).ok()?;
        let flags = u32::from_str_radix(cols[3], 16).ok()?;
        if flags & 0x2 != 0 && gw != 0 {
            // The kernel prints the address in host (little-endian) order.
            return Some(Ipv4Addr::from(gw.to_le_bytes()));
        }
    }
    None
}

#[cfg(test)]
mod tests;
