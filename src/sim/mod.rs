//! Deterministic in-memory network with RFC 4787 NAT models and a virtual clock.
//!
//! The simulator runs the real [`NodeCore`]s and the real [`crate::relay::RelayCore`]
//! (through the [`SimRelay`] trait, see [`RealRelay`]; a test may plug in another relay). Nothing
//! sleeps: time is a base `Instant` plus a virtual offset that jumps to the next event.
//! Every random choice (loss, jitter, NAT ports, node RNG seeds, identities) comes from one
//! seeded `ChaCha20Rng`, so a seed reproduces a run exactly.
//!
//! Topology: the relay sits on the "internet" at [`RELAY_ADDR`] (TCP + UDP) and
//! [`RELAY_ALT_ADDR`] (STUN only). Each NAT has a public IP `198.51.100.N` and a private
//! `10.0.N.0/24`; hosts sit behind a NAT or directly on `192.0.2.N`. A packet between two
//! internet sites takes `latency(src) + latency(dst)` plus uniform jitter in `[0, jitter]`
//! (jitter reorders), and is lost with probability `loss`. LAN packets take 1 ms, no loss.
//! TCP (node ↔ relay only) is a reliable in-order byte pipe through the NAT; a lost
//! segment costs a retransmission timeout instead of disappearing.

pub mod nat;
mod real_relay;
pub mod scenario;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

pub use nat::{Filtering, Mapping, Nat, NatConfig, PortAlloc};
pub use real_relay::RealRelay;

use crate::identity::Identity;
use crate::node::{NodeConfig, NodeCore, NodeEvent, Transmit};
use crate::wire::PeerId;

/// The relay's main address (TCP control, UDP, STUN).
pub const RELAY_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 3478);
/// The relay's alternate STUN address (RFC 5780 OTHER-ADDRESS).
pub const RELAY_ALT_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2)), 3478);
/// Port of every simulated node's UDP socket.
pub const NODE_PORT: u16 = 41641;
const LAN_LATENCY: Duration = Duration::from_millis(1);
const TCP_RTO: Duration = Duration::from_millis(200);
/// Hang guard: most events one `run_*` call processes.
const MAX_STEPS: u64 = 20_000_000;

/// Something the relay wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayOutput {
    /// A UDP datagram from one of the relay's addresses.
    Udp {
        /// The relay socket it leaves from.
        from: SocketAddr,
        /// Destination.
        to: SocketAddr,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// Bytes on a TCP connection.
    Tcp {
        /// Which connection.
        conn: u64,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// Close a TCP connection.
    CloseTcp {
        /// Which connection.
        conn: u64,
    },
}

/// The relay as the simulator drives it (sans-IO, like the node).
pub trait SimRelay {
    /// A TCP connection from `from` was accepted.
    fn tcp_open(&mut self, now: Instant, conn: u64, from: SocketAddr);
    /// Bytes on a TCP connection.
    fn tcp_data(&mut self, now: Instant, conn: u64, data: &[u8]);
    /// The TCP connection closed.
    fn tcp_closed(&mut self, now: Instant, conn: u64);
    /// A UDP datagram arrived at `local` from `from`.
    fn udp(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, data: &[u8]);
    /// The next output.
    fn poll_output(&mut self) -> Option<RelayOutput>;
    /// The next timer.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Timers due.
    fn handle_timeout(&mut self, now: Instant);
}

/// Makes a relay (again, after a restart) from a seed, at a virtual instant.
pub type RelayFactory = Box<dyn FnMut(u64, Instant) -> Box<dyn SimRelay>>;

/// A factory for the real [`crate::relay::RelayCore`] at [`RELAY_ADDR`] with
/// [`RELAY_ALT_ADDR`] as its RFC 5780 alternate.
pub fn real_relay_factory() -> RelayFactory {
    Box::new(|seed, now| {
        let mut cfg = crate::relay::RelayConfig::new(RELAY_ADDR, seed);
        cfg.alt_listen = Some(RELAY_ALT_ADDR);
        Box::new(RealRelay::new(cfg, now))
    })
}

/// Network-wide parameters.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Loss probability of every internet packet (0.0..1.0).
    pub loss: f64,
    /// Extra uniform delay `[0, jitter]` per packet (reorders).
    pub jitter: Duration,
    /// The relay site's one-way latency to the core.
    pub relay_latency: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            loss: 0.0,
            jitter: Duration::from_millis(2),
            relay_latency: Duration::from_millis(10),
        }
    }
}

/// Index of a NAT.
pub type NatId = usize;
/// Index of a host.
pub type HostId = usize;

/// One simulated machine running a [`NodeCore`].
pub struct Host {
    /// The node.
    pub node: NodeCore,
    /// Its socket address (private when behind a NAT).
    pub addr: SocketAddr,
    /// Its NAT.
    pub nat: Option<NatId>,
    /// Its site latency when public (NATed hosts use the NAT's).
    latency: Duration,
    /// Everything the node reported except datagrams: (virtual time, event).
    pub events: Vec<(Duration, NodeEvent)>,
    /// Datagrams received: (virtual time, from, bytes).
    pub received: Vec<(Duration, PeerId, Vec<u8>)>,
    tcp: Option<u64>,
    /// Extra sockets the node opened (hard-NAT punching), on the host's IP.
    pub extra_sockets: Vec<SocketAddr>,
    /// Most extra sockets open at once over the run.
    pub max_extra_sockets: usize,
}

impl Host {
    /// The node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.node.peer_id()
    }

    /// Whether `addr` is one of this host's sockets.
    fn owns(&self, addr: SocketAddr) -> bool {
        self.addr == addr || self.extra_sockets.contains(&addr)
    }
}

#[derive(Debug)]
struct Conn {
    host: HostId,
    connected: bool,
    alive: bool,
    last_up: Instant,
    last_down: Instant,
}

#[derive(Debug)]
enum Ev {
    Net {
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    Lan {
        host: HostId,
        to: SocketAddr,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
    TcpConnected(u64),
    TcpRefused(u64),
    TcpOpenAtRelay(u64, SocketAddr),
    TcpToRelay(u64, Vec<u8>),
    TcpClosedAtRelay(u64),
    TcpToHost(u64, Vec<u8>),
    TcpClosedToHost(u64),
}

struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The simulated world.
pub struct Sim {
    /// The seed this world was made from (print it on failure).
    pub seed: u64,
    start: Instant,
    now: Instant,
    rng: ChaCha20Rng,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    /// Network parameters (may be changed mid-run).
    pub cfg: SimConfig,
    /// The NATs.
    pub nats: Vec<Nat>,
    nat_latency: Vec<Duration>,
    /// The hosts.
    pub hosts: Vec<Host>,
    relay: Box<dyn SimRelay>,
    relay_factory: RelayFactory,
    relay_down_until: Option<Instant>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    next_tcp_port: u16,
    /// Pairs of IPs between which internet packets are dropped (a broken path).
    pub partitions: Vec<(IpAddr, IpAddr)>,
    /// Extra delay on relay → host TCP bytes, per host (a stalled TCP path, e.g. a
    /// retransmission), to make one side's introduction arrive late.
    pub tcp_stall: HashMap<HostId, Duration>,
    /// UDP packets delivered / lost (diagnostics).
    pub stats: SimStats,
}

/// Counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    /// Internet UDP packets sent.
    pub udp_sent: u64,
    /// Lost to random loss.
    pub udp_lost: u64,
    /// Dropped by a NAT (no mapping, filtered, blocked, no hairpin).
    pub udp_filtered: u64,
}

impl Sim {
    /// An empty world with the real relay core.
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        Self::with_relay(seed, cfg, real_relay_factory())
    }

    /// An empty world with a relay from `factory`.
    pub fn with_relay(seed: u64, cfg: SimConfig, mut factory: RelayFactory) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let start = Instant::now();
        let relay = factory(rng.random(), start);
        Sim {
            seed,
            start,
            now: start,
            rng,
            seq: 0,
            queue: BinaryHeap::new(),
            cfg,
            nats: Vec::new(),
            nat_latency: Vec::new(),
            hosts: Vec::new(),
            relay,
            relay_factory: factory,
            relay_down_until: None,
            conns: HashMap::new(),
            next_conn: 1,
            next_tcp_port: 50000,
            partitions: Vec::new(),
            tcp_stall: HashMap::new(),
            stats: SimStats::default(),
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Adds a NAT whose site has `latency` one-way to the core.
    pub fn add_nat(&mut self, cfg: NatConfig, latency: Duration) -> NatId {
        let id = self.nats.len();
        let n = u8::try_from(id + 1).expect("at most 255 NATs");
        self.nats.push(Nat::new(
            cfg,
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)),
            [10, 0, n],
        ));
        self.nat_latency.push(latency);
        id
    }

    /// Adds a host behind `nat` (or public with `latency` when `None`); `tweak` adjusts
    /// its node configuration.
    pub fn add_host(
        &mut self,
        nat: Option<NatId>,
        latency: Duration,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> HostId {
        let id = self.hosts.len();
        let n = u8::try_from(id + 2).expect("at most 253 hosts");
        let addr = match nat {
            Some(k) => {
                let s = self.nats[k].subnet;
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(s[0], s[1], s[2], n)), NODE_PORT)
            }
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), NODE_PORT),
        };
        let identity = Identity::from_secret(self.rng.random());
        let mut cfg = NodeConfig::new(identity, RELAY_ADDR);
        cfg.seed = self.rng.random();
        cfg.local_addrs = vec![addr];
        tweak(&mut cfg);
        let node = NodeCore::new(cfg, self.now);
        self.hosts.push(Host {
            node,
            addr,
            nat,
            latency,
            events: Vec::new(),
            received: Vec::new(),
            tcp: None,
            extra_sockets: Vec::new(),
            max_extra_sockets: 0,
        });
        id
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn site_latency(&self, ip: IpAddr) -> Option<Duration> {
        if ip == RELAY_ADDR.ip() || ip == RELAY_ALT_ADDR.ip() {
            return Some(self.cfg.relay_latency);
        }
        if let Some(i) = self.nats.iter().position(|n| n.public_ip == ip) {
            return Some(self.nat_latency[i]);
        }
        self.hosts
            .iter()
            .find(|h| h.nat.is_none() && h.addr.ip() == ip)
            .map(|h| h.latency)
    }

    fn host_latency(&self, h: HostId) -> Duration {
        match self.hosts[h].nat {
            Some(n) => self.nat_latency[n],
            None => self.hosts[h].latency,
        }
    }

    fn host_public_ip(&self, h: HostId) -> IpAddr {
        match self.hosts[h].nat {
            Some(n) => self.nats[n].public_ip,
            None => self.hosts[h].addr.ip(),
        }
    }

    /// Sends one internet packet (loss, partition, latency, jitter).
    fn send_net(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.stats.udp_sent += 1;
        let (Some(a), Some(b)) = (self.site_latency(from.ip()), self.site_latency(to.ip())) else {
            self.stats.udp_filtered += 1;
            return;
        };
        if self
            .partitions
            .iter()
            .any(|&(x, y)| (x, y) == (from.ip(), to.ip()) || (y, x) == (from.ip(), to.ip()))
        {
            self.stats.udp_lost += 1;
            return;
        }
        if self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss {
            self.stats.udp_lost += 1;
            return;
        }
        let jitter = if self.cfg.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(
                self.rng
                    .random_range(0..=self.cfg.jitter.as_micros() as u64),
            )
        };
        let at = self.now + a + b + jitter;
        self.schedule(at, Ev::Net { from, to, bytes });
    }

    fn host_send(&mut self, h: HostId, t: Transmit) {
        let local = match t.source {
            Some(s) if self.hosts[h].extra_sockets.contains(&s) => s,
            _ => self.hosts[h].addr,
        };
        let dst = t.destination;
        let Some(n) = self.hosts[h].nat else {
            self.send_net(local, dst, t.contents);
            return;
        };
        if self.nats[n].is_inside(dst.ip()) {
            if let Some(to) = self.hosts.iter().position(|x| x.owns(dst)) {
                self.schedule(
                    self.now + LAN_LATENCY,
                    Ev::Lan {
                        host: to,
                        to: dst,
                        from: local,
                        bytes: t.contents,
                    },
                );
            }
            return;
        }
        if self.nats[n].cfg.block_udp {
            self.stats.udp_filtered += 1;
            return;
        }
        let now = self.now;
        let port = self.nats[n].outbound(now, local, dst, &mut self.rng);
        let from = SocketAddr::new(self.nats[n].public_ip, port);
        if dst.ip() == self.nats[n].public_ip {
            // Hairpin.
            if !self.nats[n].cfg.hairpin {
                self.stats.udp_filtered += 1;
                return;
            }
            if let Some(inside) = self.nats[n].inbound(now, from, dst.port())
                && let Some(to) = self.hosts.iter().position(|x| x.owns(inside))
            {
                self.schedule(
                    now + LAN_LATENCY,
                    Ev::Lan {
                        host: to,
                        to: inside,
                        from,
                        bytes: t.contents,
                    },
                );
            }
            return;
        }
        self.send_net(from, dst, t.contents);
    }

    fn relay_up(&self) -> bool {
        self.relay_down_until.is_none_or(|t| t <= self.now)
    }

    fn on_net(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let now = self.now;
        if to.ip() == RELAY_ADDR.ip() || to.ip() == RELAY_ALT_ADDR.ip() {
            if self.relay_up() && (to == RELAY_ADDR || to == RELAY_ALT_ADDR) {
                self.relay.udp(now, to, from, &bytes);
            }
            return;
        }
        if let Some(n) = self.nats.iter().position(|x| x.public_ip == to.ip()) {
            match self.nats[n].inbound(now, from, to.port()) {
                Some(inside) => {
                    if let Some(h) = self.hosts.iter().position(|x| x.owns(inside)) {
                        self.hosts[h].node.handle_udp(now, inside, from, &bytes);
                    }
                }
                None => self.stats.udp_filtered += 1,
            }
            return;
        }
        if let Some(h) = self
            .hosts
            .iter()
            .position(|x| x.nat.is_none() && x.owns(to))
        {
            self.hosts[h].node.handle_udp(now, to, from, &bytes);
        }
    }

    fn tcp_delay(&mut self, h: HostId) -> Duration {
        let mut d = self.host_latency(h) + self.cfg.relay_latency;
        if self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss {
            d += TCP_RTO + 2 * d;
        }
        d
    }

    fn relay_outputs(&mut self) {
        while let Some(o) = self.relay.poll_output() {
            match o {
                RelayOutput::Udp { from, to, bytes } => self.send_net(from, to, bytes),
                RelayOutput::Tcp { conn, bytes } => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    if !c.alive {
                        continue;
                    }
                    let h = c.host;
                    let d = self.tcp_delay(h) + self.tcp_stall.get(&h).copied().unwrap_or_default();
                    let c = self.conns.get_mut(&conn).expect("checked");
                    let at = (self.now + d).max(c.last_down + Duration::from_nanos(1));
                    c.last_down = at;
                    self.schedule(at, Ev::TcpToHost(conn, bytes));
                }
                RelayOutput::CloseTcp { conn } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.alive = false;
                        let at = c.last_down + Duration::from_nanos(1);
                        self.schedule(at.max(self.now), Ev::TcpClosedToHost(conn));
                    }
                }
            }
        }
    }

    /// Drains one host's outputs; returns whether anything happened.
    fn drain_host(&mut self, h: HostId) -> bool {
        let mut any = false;
        while let Some(t) = self.hosts[h].node.poll_transmit() {
            any = true;
            if t.segment_size.is_some() {
                // A GSO batch leaves the host as separate datagrams.
                for d in t.datagrams() {
                    let one = Transmit {
                        segment_size: None,
                        contents: d.to_vec(),
                        ..t.clone()
                    };
                    self.host_send(h, one);
                }
            } else {
                self.host_send(h, t);
            }
        }
        if let Some(conn) = self.hosts[h].tcp
            && self
                .conns
                .get(&conn)
                .is_some_and(|c| c.connected && c.alive)
        {
            let bytes = self.hosts[h].node.relay_tcp_outgoing().to_vec();
            if !bytes.is_empty() {
                any = true;
                self.hosts[h].node.relay_tcp_written(bytes.len());
                let d = self.tcp_delay(h);
                let c = self.conns.get_mut(&conn).expect("checked");
                let at = (self.now + d).max(c.last_up + Duration::from_nanos(1));
                c.last_up = at;
                self.schedule(at, Ev::TcpToRelay(conn, bytes));
            }
        }
        while let Some(ev) = self.hosts[h].node.poll_event() {
            any = true;
            let t = self.elapsed();
            match ev {
                NodeEvent::ConnectRelayTcp(_) => {
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    self.hosts[h].tcp = Some(conn);
                    self.conns.insert(
                        conn,
                        Conn {
                            host: h,
                            connected: false,
                            alive: true,
                            last_up: self.now,
                            last_down: self.now,
                        },
                    );
                    let one_way = self.host_latency(h) + self.cfg.relay_latency;
                    if self.relay_up() {
                        self.next_tcp_port = self.next_tcp_port.wrapping_add(1).max(50000);
                        let from = SocketAddr::new(self.host_public_ip(h), self.next_tcp_port);
                        self.schedule(self.now + one_way, Ev::TcpOpenAtRelay(conn, from));
                        self.schedule(self.now + 2 * one_way, Ev::TcpConnected(conn));
                    } else {
                        self.schedule(self.now + 2 * one_way, Ev::TcpRefused(conn));
                    }
                    self.hosts[h]
                        .events
                        .push((t, NodeEvent::ConnectRelayTcp(RELAY_ADDR)));
                }
                NodeEvent::CloseRelayTcp => {
                    if let Some(conn) = self.hosts[h].tcp.take()
                        && let Some(c) = self.conns.get_mut(&conn)
                    {
                        c.alive = false;
                        let at = c.last_up + Duration::from_nanos(1);
                        let at = at.max(self.now + self.cfg.relay_latency);
                        self.schedule(at, Ev::TcpClosedAtRelay(conn));
                    }
                    self.hosts[h].events.push((t, NodeEvent::CloseRelayTcp));
                }
                NodeEvent::Datagram { peer, bytes } => {
                    self.hosts[h].received.push((t, peer, bytes.to_vec()));
                }
                NodeEvent::OpenSockets { request, ports } => {
                    let ip = self.hosts[h].addr.ip();
                    let mut locals = Vec::with_capacity(ports.len());
                    for port in ports {
                        let port = if port == 0 {
                            // An ephemeral port, as the kernel would pick.
                            let mut p = self.rng.random_range(32768..=60999u16);
                            while self.hosts[h].owns(SocketAddr::new(ip, p)) {
                                p = self.rng.random_range(32768..=60999u16);
                            }
                            p
                        } else {
                            port
                        };
                        let a = SocketAddr::new(ip, port);
                        if !self.hosts[h].owns(a) {
                            self.hosts[h].extra_sockets.push(a);
                            locals.push(a);
                        }
                    }
                    let host = &mut self.hosts[h];
                    host.max_extra_sockets = host.max_extra_sockets.max(host.extra_sockets.len());
                    self.hosts[h]
                        .node
                        .handle_sockets_opened(self.now, request, &locals);
                }
                NodeEvent::CloseSockets { locals } => {
                    self.hosts[h].extra_sockets.retain(|a| !locals.contains(a));
                }
                other => self.hosts[h].events.push((t, other)),
            }
        }
        any
    }

    fn drain_all(&mut self) {
        for _ in 0..1000 {
            self.relay_outputs();
            let mut any = false;
            for h in 0..self.hosts.len() {
                any |= self.drain_host(h);
            }
            if !any {
                self.relay_outputs();
                return;
            }
        }
        panic!("seed {}: outputs never drained", self.seed);
    }

    fn on_event(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Net { from, to, bytes } => self.on_net(from, to, bytes),
            Ev::Lan {
                host,
                to,
                from,
                bytes,
            } => {
                if self.hosts[host].owns(to) {
                    self.hosts[host].node.handle_udp(now, to, from, &bytes);
                }
            }
            Ev::TcpConnected(conn) => {
                if let Some(c) = self.conns.get_mut(&conn)
                    && c.alive
                {
                    c.connected = true;
                    let h = c.host;
                    if self.hosts[h].tcp == Some(conn) {
                        self.hosts[h].node.handle_relay_connected(now);
                    }
                }
            }
            Ev::TcpRefused(conn) => {
                if let Some(c) = self.conns.remove(&conn)
                    && self.hosts[c.host].tcp == Some(conn)
                {
                    self.hosts[c.host].tcp = None;
                    self.hosts[c.host].node.handle_relay_closed(now);
                }
            }
            Ev::TcpOpenAtRelay(conn, from) => {
                if self.conns.get(&conn).is_some_and(|c| c.alive) && self.relay_up() {
                    self.relay.tcp_open(now, conn, from);
                }
            }
            Ev::TcpToRelay(conn, bytes) => {
                if self.conns.get(&conn).is_some_and(|c| c.alive) {
                    self.relay.tcp_data(now, conn, &bytes);
                }
            }
            Ev::TcpClosedAtRelay(conn) => {
                self.conns.remove(&conn);
                self.relay.tcp_closed(now, conn);
            }
            Ev::TcpToHost(conn, bytes) => {
                if let Some(c) = self.conns.get(&conn)
                    && self.hosts[c.host].tcp == Some(conn)
                {
                    let h = c.host;
                    self.hosts[h].node.handle_relay_tcp_data(now, &bytes);
                }
            }
            Ev::TcpClosedToHost(conn) => {
                if let Some(c) = self.conns.remove(&conn)
                    && self.hosts[c.host].tcp == Some(conn)
                {
                    self.hosts[c.host].tcp = None;
                    self.hosts[c.host].node.handle_relay_closed(now);
                }
            }
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let mut t = self.queue.peek().map(|s| s.0.at);
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        for h in &self.hosts {
            take(h.node.poll_timeout());
        }
        take(self.relay.poll_timeout());
        t
    }

    /// Runs until virtual time `d` has passed or `stop` returns true (checked after every
    /// step). Returns whether `stop` fired.
    pub fn run_until(&mut self, d: Duration, mut stop: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + d;
        self.drain_all();
        for _ in 0..MAX_STEPS {
            if stop(self) {
                return true;
            }
            let Some(next) = self.next_time() else {
                self.now = end;
                return false;
            };
            if next > end {
                self.now = end;
                return stop(self);
            }
            self.now = self.now.max(next);
            let now = self.now;
            while self.queue.peek().is_some_and(|s| s.0.at <= now) {
                let Some(Reverse(s)) = self.queue.pop() else {
                    break;
                };
                self.on_event(s.ev);
            }
            for h in 0..self.hosts.len() {
                if self.hosts[h].node.poll_timeout().is_some_and(|t| t <= now) {
                    self.hosts[h].node.handle_timeout(now);
                }
            }
            if self.relay.poll_timeout().is_some_and(|t| t <= now) {
                self.relay.handle_timeout(now);
            }
            self.drain_all();
        }
        panic!(
            "seed {}: simulation did not settle in {MAX_STEPS} steps",
            self.seed
        );
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// Lets host `h`'s node do something at the current virtual time, then drains outputs.
    pub fn with_node<R>(&mut self, h: HostId, f: impl FnOnce(&mut NodeCore, Instant) -> R) -> R {
        let now = self.now;
        let r = f(&mut self.hosts[h].node, now);
        self.drain_all();
        r
    }

    /// Kills the relay (closing every TCP connection, forgetting all state) and brings a
    /// fresh one up after `down_for`.
    pub fn restart_relay(&mut self, down_for: Duration) {
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.alive = false;
                let h = c.host;
                let at = self.now + self.host_latency(h) + self.cfg.relay_latency;
                self.schedule(at, Ev::TcpClosedToHost(conn));
            }
        }
        let seed = self.rng.random();
        let up_at = self.now + down_for;
        self.relay = (self.relay_factory)(seed, up_at);
        self.relay_down_until = Some(self.now + down_for);
    }

    /// The public IP a host's traffic appears from.
    pub fn public_ip(&self, h: HostId) -> IpAddr {
        self.host_public_ip(h)
    }

    /// Whether host `h` logged an event matching `f`.
    pub fn has_event(&self, h: HostId, f: impl Fn(&NodeEvent) -> bool) -> bool {
        self.hosts[h].events.iter().any(|(_, e)| f(e))
    }
}

#[cfg(test)]
mod matrix;
#[cfg(test)]
mod portmap_tests;
#[cfg(test)]
mod tests;
