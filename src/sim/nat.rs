//! RFC 4787 NAT model for the simulator.
//!
//! Mapping (section 4.1): endpoint-independent, address-dependent, address-and-port-
//! dependent. Filtering (section 5): the same three. Port allocation (section 4.2.1):
//! preserving, sequential, random. A mapping expires `mapping_timeout` after the last
//! *outbound* packet (REQ-6: "the NAT mapping Refresh Direction MUST have a NAT Outbound
//! refresh behavior of True"); Linux conntrack keeps an unreplied UDP flow 30 s.
//! Hairpinning (section 6) on or off.
//!
//! Plus the bare-Linux-masquerade clash (DESIGN.md): with no input firewall, an unsolicited
//! inbound packet reaches the router itself and confirms a conntrack entry for
//! `remote -> public:port`. When the inside host later sends to that `remote` from the
//! mapping on `port`, the reply tuple is taken, so the router picks another port for that
//! one destination, and packets from `remote` to `port` keep hitting the router (dropped)
//! until the entry expires (30 s).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand_chacha::ChaCha20Rng;

/// RFC 4787 mapping behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Same external port for every destination.
    EndpointIndependent,
    /// A new port per destination IP.
    AddressDependent,
    /// A new port per destination IP and port ("symmetric").
    AddressPortDependent,
}

/// RFC 4787 filtering behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Anyone may send to a mapping ("full cone").
    EndpointIndependent,
    /// Only IPs the inside host sent to ("restricted cone").
    AddressDependent,
    /// Only IP:ports the inside host sent to ("port-restricted cone").
    AddressPortDependent,
}

/// RFC 4787 port allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAlloc {
    /// External port = internal port when free.
    Preserving,
    /// Next port after the last allocated one.
    Sequential,
    /// Uniformly random free port.
    Random,
}

/// One NAT's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Port allocation.
    pub alloc: PortAlloc,
    /// Mapping lifetime after the last outbound packet.
    pub mapping_timeout: Duration,
    /// Whether inside hosts can reach each other via the public address.
    pub hairpin: bool,
    /// Bare Linux masquerade: unsolicited inbound creates a conntrack entry that clashes.
    pub conntrack_clash: bool,
    /// Drop all UDP to the outside (a UDP-hostile network); TCP still works.
    pub block_udp: bool,
}

impl NatConfig {
    fn base(mapping: Mapping, filtering: Filtering, alloc: PortAlloc) -> Self {
        NatConfig {
            mapping,
            filtering,
            alloc,
            mapping_timeout: Duration::from_secs(30),
            hairpin: false,
            conntrack_clash: false,
            block_udp: false,
        }
    }
    /// EIM + EIF ("full cone").
    pub fn full_cone() -> Self {
        Self::base(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            PortAlloc::Preserving,
        )
    }
    /// EIM + ADF ("restricted cone").
    pub fn restricted_cone() -> Self {
        Self::base(
            Mapping::EndpointIndependent,
            Filtering::AddressDependent,
            PortAlloc::Preserving,
        )
    }
    /// EIM + APDF ("port-restricted cone", a home router with an input firewall).
    pub fn port_restricted() -> Self {
        Self::base(
            Mapping::EndpointIndependent,
            Filtering::AddressPortDependent,
            PortAlloc::Preserving,
        )
    }
    /// EIM + APDF with the conntrack clash (bare Linux masquerade).
    pub fn bare_masquerade() -> Self {
        NatConfig {
            conntrack_clash: true,
            ..Self::port_restricted()
        }
    }
    /// Address-and-port-dependent mapping, random ports ("symmetric").
    pub fn symmetric_random() -> Self {
        Self::base(
            Mapping::AddressPortDependent,
            Filtering::AddressPortDependent,
            PortAlloc::Random,
        )
    }
    /// Address-and-port-dependent mapping, sequential ports.
    pub fn symmetric_sequential() -> Self {
        Self::base(
            Mapping::AddressPortDependent,
            Filtering::AddressPortDependent,
            PortAlloc::Sequential,
        )
    }
    /// Port-restricted, and UDP to the outside is dropped.
    pub fn udp_blocked() -> Self {
        NatConfig {
            block_udp: true,
            ..Self::port_restricted()
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    internal: SocketAddr,
    /// For address(-and-port)-dependent mapping: the destination this mapping is for; for
    /// clash overrides: the one remote.
    key: Option<SocketAddr>,
    clash_override: bool,
    external_port: u16,
    last_out: Instant,
    /// Remotes sent to, with the last outbound time: a filter permission lives as long as
    /// a mapping (conntrack keeps one entry per flow, each with its own timeout).
    contacted: Vec<(SocketAddr, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Clash {
    remote: SocketAddr,
    port: u16,
    expires: Instant,
}

/// Conntrack keeps the router's own entry this long (unreplied UDP).
const CLASH_LIFETIME: Duration = Duration::from_secs(30);

/// A NAT box: public IP, private /24 and its tables.
#[derive(Debug)]
pub struct Nat {
    /// Behaviour.
    pub cfg: NatConfig,
    /// Public address.
    pub public_ip: IpAddr,
    /// First three octets of the private 10.x.y.0/24.
    pub subnet: [u8; 3],
    entries: Vec<Entry>,
    next_port: u16,
    clashes: Vec<Clash>,
    /// Inbound packets dropped by filtering (for test diagnostics).
    pub dropped_inbound: u64,
    /// Clash entries created.
    pub clashes_created: u64,
    /// Static port forwards (external port → inside address): what a router's PCP /
    /// NAT-PMP / UPnP server installs (issue 7).
    forwards: Vec<(u16, SocketAddr)>,
}

impl Nat {
    /// A NAT with an empty table.
    pub fn new(cfg: NatConfig, public_ip: IpAddr, subnet: [u8; 3]) -> Self {
        Nat {
            cfg,
            public_ip,
            subnet,
            entries: Vec::new(),
            next_port: 20000,
            clashes: Vec::new(),
            dropped_inbound: 0,
            clashes_created: 0,
            forwards: Vec::new(),
        }
    }

    /// A reboot with a new public address (an ISP renumbering): every mapping is gone.
    pub fn reboot(&mut self, public_ip: IpAddr) {
        self.public_ip = public_ip;
        self.entries.clear();
        self.clashes.clear();
    }

    /// Whether `ip` is inside this NAT's private subnet.
    pub fn is_inside(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4.octets()[..3] == self.subnet,
            IpAddr::V6(_) => false,
        }
    }

    /// Live mappings (for tests).
    pub fn mapping_count(&self, now: Instant) -> usize {
        self.entries
            .iter()
            .filter(|e| now.saturating_duration_since(e.last_out) < self.cfg.mapping_timeout)
            .count()
    }

    fn expire(&mut self, now: Instant) {
        let t = self.cfg.mapping_timeout;
        self.entries
            .retain(|e| now.saturating_duration_since(e.last_out) < t);
        for e in &mut self.entries {
            e.contacted
                .retain(|c| now.saturating_duration_since(c.1) < t);
        }
        self.clashes.retain(|c| c.expires > now);
    }

    fn port_used(&self, port: u16) -> bool {
        self.entries.iter().any(|e| e.external_port == port)
            || self.forwards.iter().any(|f| f.0 == port)
    }

    /// Forwards `external_port` to `internal` from any remote (a router port mapping). Like
    /// Linux DNAT, a packet through it creates a session whose replies leave from the same
    /// external port.
    pub fn add_port_forward(&mut self, external_port: u16, internal: SocketAddr) {
        self.forwards.retain(|f| f.0 != external_port);
        self.forwards.push((external_port, internal));
    }

    fn clash(&self, remote: SocketAddr, port: u16) -> bool {
        self.clashes
            .iter()
            .any(|c| c.remote == remote && c.port == port)
    }

    fn allocate(
        &mut self,
        internal: SocketAddr,
        rng: &mut ChaCha20Rng,
        avoid: Option<(SocketAddr, u16)>,
    ) -> u16 {
        let bad = |nat: &Nat, p: u16| {
            p < 1024 || nat.port_used(p) || avoid.is_some_and(|(r, ap)| ap == p || nat.clash(r, p))
        };
        let mut port = match self.cfg.alloc {
            PortAlloc::Preserving => internal.port(),
            PortAlloc::Sequential => {
                self.next_port = self.next_port.wrapping_add(1).max(1024);
                self.next_port
            }
            PortAlloc::Random => rng.random_range(1024..=65535),
        };
        for _ in 0..70000 {
            if !bad(self, port) {
                break;
            }
            port = match self.cfg.alloc {
                PortAlloc::Random => rng.random_range(1024..=65535),
                _ => port.wrapping_add(1).max(1024),
            };
        }
        if self.cfg.alloc == PortAlloc::Sequential {
            self.next_port = port;
        }
        port
    }

    /// Translates an outbound packet from `internal` to `remote`: the external source port,
    /// creating or refreshing the mapping.
    pub fn outbound(
        &mut self,
        now: Instant,
        internal: SocketAddr,
        remote: SocketAddr,
        rng: &mut ChaCha20Rng,
    ) -> u16 {
        self.expire(now);
        // A clash override for exactly this destination wins.
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.clash_override && e.internal == internal && e.key == Some(remote))
        {
            e.last_out = now;
            return e.external_port;
        }
        let key = match self.cfg.mapping {
            Mapping::EndpointIndependent => None,
            Mapping::AddressDependent => Some(SocketAddr::new(remote.ip(), 0)),
            Mapping::AddressPortDependent => Some(remote),
        };
        let existing = self
            .entries
            .iter()
            .position(|e| !e.clash_override && e.internal == internal && e.key == key);
        let port = match existing {
            Some(i)
                if self.cfg.conntrack_clash
                    && !self.entries[i].contacted.iter().any(|c| c.0 == remote)
                    && self.clash(remote, self.entries[i].external_port) =>
            {
                // The reply tuple is taken by the router's own conntrack entry: this
                // destination gets another port.
                let p = self.allocate(internal, rng, Some((remote, self.entries[i].external_port)));
                self.entries.push(Entry {
                    internal,
                    key: Some(remote),
                    clash_override: true,
                    external_port: p,
                    last_out: now,
                    contacted: vec![(remote, now)],
                });
                return p;
            }
            Some(i) => {
                let e = &mut self.entries[i];
                e.last_out = now;
                match e.contacted.iter_mut().find(|c| c.0 == remote) {
                    Some(c) => c.1 = now,
                    None => e.contacted.push((remote, now)),
                }
                return e.external_port;
            }
            None => {
                let avoid = self.cfg.conntrack_clash.then_some((remote, 0));
                self.allocate(internal, rng, avoid)
            }
        };
        self.entries.push(Entry {
            internal,
            key,
            clash_override: false,
            external_port: port,
            last_out: now,
            contacted: vec![(remote, now)],
        });
        port
    }

    /// Translates an inbound packet from `remote` to our public `port`: the inside address,
    /// or `None` when filtered (or no mapping).
    pub fn inbound(&mut self, now: Instant, remote: SocketAddr, port: u16) -> Option<SocketAddr> {
        self.expire(now);
        if let Some(&(_, internal)) = self.forwards.iter().find(|f| f.0 == port) {
            // The reply direction of the forwarded session: same external port, this remote.
            if !self
                .entries
                .iter()
                .any(|e| e.clash_override && e.internal == internal && e.key == Some(remote))
            {
                self.entries.push(Entry {
                    internal,
                    key: Some(remote),
                    clash_override: true,
                    external_port: port,
                    last_out: now,
                    contacted: vec![(remote, now)],
                });
            }
            return Some(internal);
        }
        if let Some(c) = self
            .clashes
            .iter_mut()
            .find(|c| c.remote == remote && c.port == port)
        {
            // Every packet refreshes the router's own conntrack entry.
            c.expires = now + CLASH_LIFETIME;
            self.dropped_inbound += 1;
            return None;
        }
        let filtering = self.cfg.filtering;
        let hit = self.entries.iter().find(|e| {
            e.external_port == port
                && if e.clash_override {
                    e.key == Some(remote)
                } else {
                    match filtering {
                        Filtering::EndpointIndependent => true,
                        Filtering::AddressDependent => {
                            e.contacted.iter().any(|c| c.0.ip() == remote.ip())
                        }
                        Filtering::AddressPortDependent => {
                            e.contacted.iter().any(|c| c.0 == remote)
                        }
                    }
                }
        });
        match hit {
            Some(e) => Some(e.internal),
            None => {
                self.dropped_inbound += 1;
                if self.cfg.conntrack_clash {
                    self.clashes_created += 1;
                    self.clashes.push(Clash {
                        remote,
                        port,
                        expires: now + CLASH_LIFETIME,
                    });
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn port_restricted_filters_and_expires() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut n = Nat::new(
            NatConfig::port_restricted(),
            "198.51.100.1".parse().unwrap(),
            [10, 0, 0],
        );
        let inside = a("10.0.0.2:4000");
        let p = n.outbound(t0, inside, a("203.0.113.1:3478"), &mut rng);
        assert_eq!(p, 4000, "port preserved");
        assert_eq!(
            n.outbound(t0, inside, a("192.0.2.9:1"), &mut rng),
            4000,
            "EIM"
        );
        assert_eq!(n.inbound(t0, a("203.0.113.1:3478"), p), Some(inside));
        assert_eq!(n.inbound(t0, a("203.0.113.1:3479"), p), None, "APDF");
        assert_eq!(
            n.inbound(t0 + Duration::from_secs(31), a("203.0.113.1:3478"), p),
            None,
            "expired"
        );
    }

    #[test]
    fn symmetric_gets_new_port_per_destination() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut n = Nat::new(
            NatConfig::symmetric_sequential(),
            "198.51.100.1".parse().unwrap(),
            [10, 0, 0],
        );
        let inside = a("10.0.0.2:4000");
        let p1 = n.outbound(t0, inside, a("203.0.113.1:3478"), &mut rng);
        let p2 = n.outbound(t0, inside, a("203.0.113.2:3478"), &mut rng);
        assert_eq!(p2, p1 + 1);
    }

    #[test]
    fn masquerade_clash_moves_the_port() {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut n = Nat::new(
            NatConfig::bare_masquerade(),
            "198.51.100.1".parse().unwrap(),
            [10, 0, 0],
        );
        let inside = a("10.0.0.2:4000");
        let peer = a("192.0.2.7:5000");
        let p = n.outbound(t0, inside, a("203.0.113.1:3478"), &mut rng);
        // The peer's probe arrives before we ever sent to it.
        assert_eq!(n.inbound(t0, peer, p), None);
        let q = n.outbound(t0, inside, peer, &mut rng);
        assert_ne!(q, p, "clash must move the port");
        assert_eq!(n.inbound(t0, peer, p), None, "old port still poisoned");
        assert_eq!(n.inbound(t0, peer, q), Some(inside));
    }
}
