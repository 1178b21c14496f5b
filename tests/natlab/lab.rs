//! The NAT lab: real Linux NAT routers built from network namespaces, veth pairs, a
//! bridge and nftables, with the real `burrow-relay` and `burrow` binaries inside.
//!
//! Topology (every name below lives inside a namespace this lab created; nothing is ever
//! added to, routed to or filtered on the host's own interfaces or ruleset):
//!
//! ```text
//!   ns <p>-inet: bridge br0 198.18.0.254/24 (the "internet", RFC 2544 benchmark range)
//!     ├── ns <p>-relay: eth0 198.18.0.1/24 + 198.18.0.2/24 (relay 1:3478, alternate 2:3479)
//!     ├── site i public:  ns <p>-sN  eth0 198.18.0.(20+i)
//!     ├── site i NAT:     ns <p>-rN  wan 198.18.0.(20+i), bridge lan 10.(i+1).0.1/24
//!     │                     └── ns <p>-sN[-h]  eth0 10.(i+1).0.(10+h), default via .1
//!     └── site i double:  ns <p>-cN  (carrier-grade NAT) wan 198.18.0.(20+i), lan 100.64.(i+1).1/24
//!                           └── ns <p>-rN  (home router) wan 100.64.(i+1).2, lan 10.(i+1).0.1/24
//!                                 └── ns <p>-sN  eth0 10.(i+1).0.10
//! ```
//!
//! Router kinds (RFC 4787 terms; see DESIGN.md "NAT models"):
//! * `eim`: `masquerade` on a bare router (endpoint-independent mapping with port
//!   preservation, address-and-port-dependent filtering, no input rules: an unsolicited
//!   probe reaches the router, which answers ICMP port-unreachable and confirms a conntrack
//!   entry: the "conntrack clash").
//! * `eim-fw`: the same plus a home-router input firewall (`iifname "wan" ct state new drop`).
//! * `sym` / `sym-fw`: `masquerade random` (endpoint-dependent mapping, random ports).
//! * `udp-blocked`: the router forwards no UDP at all (TCP only).
//! * `double`: a bare `eim` carrier-grade NAT in front of an `eim-fw` home router.
//!
//! Port mapping ([`Lab::with_port_mapping`]): the site's router also runs Debian's
//! `miniupnpd` (nftables backend: PCP, NAT-PMP and UPnP IGD on the LAN) with its own
//! `inet miniupnpd` table whose chains it fills with DNAT and accept rules. miniupnpd
//! refuses a WAN address in a reserved range (its list includes 198.18.0.0/15), so such a
//! router's WAN is 198.20.0.(20+i)/24 instead, on the same internet bridge, which routes
//! 198.20.0.0/24 (198.20.0.254). That range exists only inside the lab's namespaces: the
//! host has no route into them and they have none out.
//!
//! Loss: `meta l4proto udp numgen random mod 100 < N drop` in the router's forward chain
//! (both directions; this kernel has no netem).
//!
//! WAN delay ([`wan_delay`], BURROW_NATLAB_WAN_DELAY_MS, default 5 ms, 0 = off): every IPv4
//! packet crossing the internet bridge is held that long by a userspace delayer (NFQUEUE,
//! `wan.rs`), so a path host → router → internet → relay has a realistic one-way delay of
//! D and a relayed round trip between two nodes takes 4 D. Without it the routers are
//! microseconds apart and simultaneous punching through two bare masquerade routers is a
//! race against the relay's introduction skew (see `wan.rs`).
//!
//! Namespaces are named `bnl<pid>x<n>-...`; a lab deletes its own on drop (killing any
//! process still inside them: only processes this lab started), and every new lab first
//! deletes leftovers of crashed runs (prefix `bnl<pid>x` whose pid is gone).
#![allow(dead_code)]

#[path = "wan.rs"]
mod wan;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Hang guard for a single wait (never a timing assertion).
pub const WAIT: Duration = Duration::from_secs(30);

/// Namespace name prefix of every lab (followed by `<pid>x<n>-`).
const NS_PREFIX: &str = "bnl";

/// The relay's main address (UDP STUN/relay and TCP control).
pub const RELAY: &str = "198.18.0.1:3478";
/// The relay's alternate address (RFC 5780 "A2:P2"): another IP and another port.
pub const RELAY_ALT: &str = "198.18.0.2:3479";

/// What sits between a site's host and the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The host is directly on the internet bridge.
    Public,
    /// Bare Linux `masquerade`: EIM, port-dependent filtering, no input firewall.
    Eim,
    /// `masquerade` plus a home-router input firewall.
    EimFw,
    /// `masquerade random`: symmetric (endpoint-dependent mapping), no input firewall.
    Sym,
    /// `masquerade random` plus the input firewall.
    SymFw,
    /// The router drops all forwarded UDP.
    UdpBlocked,
    /// A bare `eim` carrier-grade NAT in front of an `eim-fw` home router.
    Double,
}

impl Kind {
    /// The lab's name for the kind.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::Eim => "eim",
            Kind::EimFw => "eim-fw",
            Kind::Sym => "sym",
            Kind::SymFw => "sym-fw",
            Kind::UdpBlocked => "udp-blocked",
            Kind::Double => "double",
        }
    }
}

/// One site: a NAT kind, the number of hosts behind it, and UDP loss on its router.
#[derive(Debug, Clone, Copy)]
pub struct SiteSpec {
    /// The router kind.
    pub kind: Kind,
    /// Hosts on the site's LAN (2 for the "same NAT" case; 1 otherwise; public sites: 1).
    pub hosts: usize,
    /// Percentage of forwarded UDP the router drops at random.
    pub loss: u8,
    /// Forwarded UDP above this many MB/s is dropped (0: no limit). Slows a transfer
    /// down enough to act in the middle of it.
    pub udp_rate_mbytes: u32,
}

impl SiteSpec {
    /// One host behind `kind`, no loss.
    pub fn new(kind: Kind) -> SiteSpec {
        SiteSpec {
            kind,
            hosts: 1,
            loss: 0,
            udp_rate_mbytes: 0,
        }
    }
}

/// Debian's miniupnpd (package `miniupnpd-nftables`), if installed.
pub fn miniupnpd_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/miniupnpd",
        "/sbin/miniupnpd",
        "/usr/local/sbin/miniupnpd",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Like [`lab_available`], and miniupnpd must be installed: skips (false) with a reason, or
/// panics under BURROW_REQUIRE_NETNS=1.
pub fn port_mapping_available() -> bool {
    if !lab_available() {
        return false;
    }
    if miniupnpd_bin().is_some() {
        return true;
    }
    let reason = "miniupnpd is not installed (apt-get install miniupnpd-nftables)";
    if std::env::var("BURROW_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("NAT lab port mapping required (BURROW_REQUIRE_NETNS=1) but unavailable: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

/// Why the lab cannot run here (not root, no `ip netns`, no `nft`).
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    let probe = format!("{NS_PREFIX}{}probe{}", std::process::id(), next_id());
    if let Err(e) = run(&["ip", "netns", "add", &probe]) {
        return Some(format!("`ip netns add` does not work here: {e}"));
    }
    // Everything a lab uses, once: a bridge, a veth pair, masquerade (random), numgen, ct.
    let checks: [&[&str]; 3] = [
        &["ip", "-n", &probe, "link", "add", "b0", "type", "bridge"],
        &[
            "ip", "-n", &probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ],
        &[
            "ip",
            "netns",
            "exec",
            &probe,
            "nft",
            "add table ip t; add chain ip t p { type nat hook postrouting priority srcnat; }; \
             add rule ip t p oifname \"v0\" masquerade random; \
             add chain ip t f { type filter hook forward priority filter; }; \
             add rule ip t f meta l4proto udp numgen random mod 100 < 5 drop; \
             add rule ip t f iifname \"v0\" ct state new drop",
        ],
    ];
    let mut failed = checks.iter().find_map(|c| run(c).err());
    if failed.is_none() && !wan_delay().is_zero() {
        // The WAN delay: iptables-legacy with the NFQUEUE target (nft's `queue` is not
        // built on this kernel).
        let rule = nfqueue_rule(&probe);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        failed = run(&rule).err().map(|e| {
            format!(
                "{e} (the WAN delay needs iptables-legacy, Debian package `iptables`, and the \
                 xtables NFQUEUE target; BURROW_NATLAB_WAN_DELAY_MS=0 turns the delay off)"
            )
        });
    }
    let _ = run(&["ip", "netns", "del", &probe]);
    if let Some(e) = failed {
        return Some(format!("network namespaces lack what the lab needs: {e}"));
    }
    None
}

/// Skips (returns false) with a printed reason, or panics under BURROW_REQUIRE_NETNS=1.
pub fn lab_available() -> bool {
    match unavailable_reason() {
        None => true,
        Some(reason) => {
            if std::env::var("BURROW_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("NAT lab required (BURROW_REQUIRE_NETNS=1) but unavailable: {reason}");
            }
            eprintln!(
                "skipping NAT lab test: {reason} (set BURROW_REQUIRE_NETNS=1 to fail instead)"
            );
            false
        }
    }
}

/// The lab's one-way delay per traversal of the internet bridge:
/// BURROW_NATLAB_WAN_DELAY_MS (milliseconds, 0 = off), default 5 ms.
pub fn wan_delay() -> Duration {
    let ms = std::env::var("BURROW_NATLAB_WAN_DELAY_MS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(5);
    Duration::from_millis(ms)
}

/// The `iptables-legacy` rule that hands the internet's packets to the delayer. No
/// `--queue-bypass`: with the delayer gone, packets are dropped, never passed undelayed.
fn nfqueue_rule(ns: &str) -> Vec<String> {
    [
        "ip",
        "netns",
        "exec",
        ns,
        "iptables-legacy",
        "-w",
        "-A",
        "FORWARD",
        "-j",
        "NFQUEUE",
        "--queue-num",
        &wan::QUEUE_NUM.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn next_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Runs a command to completion; Err carries its stderr.
fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a lab-building command; a failure here is a lab bug: panic with the command.
fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("lab setup: {e}");
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills the processes inside `ns` (only ever namespaces of this lab scheme) and deletes it.
fn delete_ns(ns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) on a pid inside a namespace this lab scheme created.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let _ = run(&["ip", "netns", "del", ns]);
}

/// Deletes namespaces left behind by crashed runs (their creating process is gone).
fn delete_leftovers() {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        let tail = &rest[digits.len()..];
        if !(tail.starts_with('x') || tail.starts_with("probe")) {
            continue;
        }
        if pid != std::process::id() && !pid_alive(pid) {
            eprintln!("natlab: deleting leftover namespace {name} of a dead run (pid {pid})");
            delete_ns(name);
        }
    }
}

/// A built lab. Dropping it kills every process inside and deletes every namespace.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    /// Per site: the namespace of each host.
    pub hosts: Vec<Vec<String>>,
    /// Per site: the namespaces of its routers (home router last).
    pub routers: Vec<Vec<String>>,
    /// Per site: the spec it was built from.
    pub specs: Vec<SiteSpec>,
    /// Identity keys and logs.
    pub dir: tempfile::TempDir,
    relay_ns: String,
    /// Per site: whether its router runs miniupnpd.
    pub port_mapping: Vec<bool>,
    /// miniupnpd processes (killed with their namespaces; behind a mutex so that a lab
    /// stays shareable between threads).
    pub daemons: Mutex<Vec<NsProc>>,
    /// The WAN delayer of the internet bridge (None when the delay is off).
    wan: Option<wan::WanDelay>,
}

/// The WAN subnet of port-mapping routers (see the module docs).
pub const PORTMAP_WAN_PREFIX: &str = "198.20.0";

impl Lab {
    /// Builds the internet, the relay host and the sites (the relay is not started).
    pub fn new(sites: &[SiteSpec]) -> Lab {
        Lab::with_port_mapping(sites, &[])
    }

    /// Like [`Lab::new`], and the routers of the sites where `port_mapping[i]` is true run
    /// miniupnpd (NAT sites only; a missing entry means no).
    pub fn with_port_mapping(sites: &[SiteSpec], port_mapping: &[bool]) -> Lab {
        Lab::build(sites, port_mapping, false, wan_delay())
    }

    /// Like [`Lab::new`] with an explicit WAN delay instead of [`wan_delay`] (zero: off;
    /// e.g. a throughput benchmark that measures the path, not a WAN).
    pub fn with_wan_delay(sites: &[SiteSpec], delay: Duration) -> Lab {
        Lab::build(sites, &[], false, delay)
    }

    /// Like [`Lab::with_port_mapping`], but miniupnpd serves only UPnP IGD (NAT-PMP and
    /// PCP off), so a node has to fall back to SSDP + SOAP.
    pub fn with_upnp_only(sites: &[SiteSpec], port_mapping: &[bool]) -> Lab {
        Lab::build(sites, port_mapping, true, wan_delay())
    }

    fn build(sites: &[SiteSpec], port_mapping: &[bool], upnp_only: bool, delay: Duration) -> Lab {
        delete_leftovers();
        let mapped = |i: usize| {
            port_mapping.get(i).copied().unwrap_or(false)
                && !matches!(sites[i].kind, Kind::Public | Kind::Double)
        };
        let prefix = format!("{NS_PREFIX}{}x{}-", std::process::id(), next_id());
        let mut lab = Lab {
            prefix: prefix.clone(),
            namespaces: Vec::new(),
            hosts: Vec::new(),
            routers: Vec::new(),
            specs: sites.to_vec(),
            dir: tempfile::tempdir().expect("temp dir"),
            relay_ns: format!("{prefix}relay"),
            port_mapping: (0..sites.len()).map(mapped).collect(),
            daemons: Mutex::new(Vec::new()),
            wan: None,
        };
        let inet = lab.add_ns("inet");
        if !delay.is_zero() {
            // Bridged IPv4 through the IP hooks (per namespace), then the queue, then the
            // rule (without a bound queue the rule would drop everything).
            must(&[
                "ip",
                "netns",
                "exec",
                &inet,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables",
            ]);
            let delayer = wan::WanDelay::start(&inet, delay)
                .unwrap_or_else(|e| panic!("lab setup: WAN delayer in {inet}: {e}"));
            lab.wan = Some(delayer);
            let rule = nfqueue_rule(&inet);
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            must(&rule);
        }
        must(&["ip", "-n", &inet, "link", "add", "br0", "type", "bridge"]);
        must(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            "198.18.0.254/24",
            "dev",
            "br0",
        ]);
        must(&["ip", "-n", &inet, "link", "set", "br0", "up"]);
        if (0..sites.len()).any(mapped) {
            // The internet routes between its two subnets.
            let gw = format!("{PORTMAP_WAN_PREFIX}.254/24");
            must(&["ip", "-n", &inet, "addr", "add", &gw, "dev", "br0"]);
            must(&[
                "ip",
                "netns",
                "exec",
                &inet,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ]);
        }

        let relay = lab.add_ns("relay");
        lab.plug(
            &inet,
            "br0",
            "relay",
            &relay,
            "eth0",
            &["198.18.0.1/24", "198.18.0.2/24"],
        );
        must(&[
            "ip",
            "-n",
            &relay,
            "route",
            "add",
            "default",
            "via",
            "198.18.0.254",
        ]);

        for (i, spec) in sites.iter().enumerate() {
            let wan_ip = format!("198.18.0.{}/24", 20 + i);
            let mut hosts = Vec::new();
            let mut routers = Vec::new();
            if spec.kind == Kind::Public {
                let host = lab.add_ns(&format!("s{i}"));
                lab.plug(&inet, "br0", &format!("s{i}"), &host, "eth0", &[&wan_ip]);
                must(&[
                    "ip",
                    "-n",
                    &host,
                    "route",
                    "add",
                    "default",
                    "via",
                    "198.18.0.254",
                ]);
                hosts.push(host);
            } else {
                // The router whose WAN is on the internet bridge.
                let (home, home_kind) = if spec.kind == Kind::Double {
                    let cgnat = lab.add_ns(&format!("c{i}"));
                    lab.plug(&inet, "br0", &format!("c{i}"), &cgnat, "wan", &[&wan_ip]);
                    must(&[
                        "ip",
                        "-n",
                        &cgnat,
                        "route",
                        "add",
                        "default",
                        "via",
                        "198.18.0.254",
                    ]);
                    lab.lan_bridge(&cgnat, &format!("100.64.{}.1/24", i + 1));
                    lab.router_rules(&cgnat, Kind::Eim, 0, 0);
                    let home = lab.add_ns(&format!("r{i}"));
                    let home_wan = format!("100.64.{}.2/24", i + 1);
                    lab.plug(&cgnat, "lan", "home", &home, "wan", &[&home_wan]);
                    let gw = format!("100.64.{}.1", i + 1);
                    must(&["ip", "-n", &home, "route", "add", "default", "via", &gw]);
                    routers.push(cgnat);
                    (home, Kind::EimFw)
                } else {
                    let router = lab.add_ns(&format!("r{i}"));
                    let (wan_ip, gw) = if mapped(i) {
                        (
                            format!("{PORTMAP_WAN_PREFIX}.{}/24", 20 + i),
                            format!("{PORTMAP_WAN_PREFIX}.254"),
                        )
                    } else {
                        (wan_ip.clone(), "198.18.0.254".to_string())
                    };
                    lab.plug(&inet, "br0", &format!("r{i}"), &router, "wan", &[&wan_ip]);
                    must(&["ip", "-n", &router, "route", "add", "default", "via", &gw]);
                    (router, spec.kind)
                };
                lab.lan_bridge(&home, &format!("10.{}.0.1/24", i + 1));
                lab.router_rules(&home, home_kind, spec.loss, spec.udp_rate_mbytes);
                if mapped(i) {
                    lab.start_miniupnpd(&home, i, upnp_only);
                }
                for h in 0..spec.hosts.max(1) {
                    let host = lab.add_ns(&format!("s{i}h{h}"));
                    let ip = format!("10.{}.0.{}/24", i + 1, 10 + h);
                    lab.plug(&home, "lan", &format!("h{h}"), &host, "eth0", &[&ip]);
                    let gw = format!("10.{}.0.1", i + 1);
                    must(&["ip", "-n", &host, "route", "add", "default", "via", &gw]);
                    hosts.push(host);
                }
                routers.push(home);
            }
            lab.hosts.push(hosts);
            lab.routers.push(routers);
        }
        lab
    }

    fn add_ns(&mut self, role: &str) -> String {
        let ns = format!("{}{role}", self.prefix);
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth from bridge `bridge` in `from_ns` (end `from_if`) to `to_ns` (end `to_if`,
    /// with `addrs`). Both ends are created directly inside the lab's namespaces.
    fn plug(
        &self,
        from_ns: &str,
        bridge: &str,
        from_if: &str,
        to_ns: &str,
        to_if: &str,
        addrs: &[&str],
    ) {
        must(&[
            "ip", "-n", from_ns, "link", "add", from_if, "type", "veth", "peer", "name", to_if,
            "netns", to_ns,
        ]);
        must(&[
            "ip", "-n", from_ns, "link", "set", from_if, "master", bridge, "up",
        ]);
        for a in addrs {
            must(&["ip", "-n", to_ns, "addr", "add", a, "dev", to_if]);
        }
        must(&["ip", "-n", to_ns, "link", "set", to_if, "up"]);
    }

    /// A LAN bridge `lan` with the router's LAN address.
    fn lan_bridge(&self, router: &str, addr: &str) {
        must(&["ip", "-n", router, "link", "add", "lan", "type", "bridge"]);
        must(&["ip", "-n", router, "addr", "add", addr, "dev", "lan"]);
        must(&["ip", "-n", router, "link", "set", "lan", "up"]);
    }

    /// Forwarding and the nftables ruleset of one router (tables inside its namespace).
    fn router_rules(&self, router: &str, kind: Kind, loss: u8, rate_mbytes: u32) {
        must(&[
            "ip",
            "netns",
            "exec",
            router,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ]);
        let masq = match kind {
            Kind::Sym | Kind::SymFw => "masquerade random",
            _ => "masquerade",
        };
        let mut forward = String::new();
        if kind == Kind::UdpBlocked {
            forward.push_str("    meta l4proto udp drop\n");
        }
        if loss > 0 {
            forward.push_str(&format!(
                "    meta l4proto udp numgen random mod 100 < {loss} drop\n"
            ));
        }
        if rate_mbytes > 0 {
            forward.push_str(&format!(
                "    meta l4proto udp limit rate over {rate_mbytes} mbytes/second drop\n"
            ));
        }
        let mut input = String::new();
        if matches!(kind, Kind::EimFw | Kind::SymFw) {
            // The home-router firewall: nothing new from the WAN reaches the router itself,
            // so an early probe dies silently instead of confirming a conntrack entry.
            input.push_str("    iifname \"wan\" ct state new drop\n");
        }
        let script = format!(
            "table ip natlab_nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"wan\" {masq}\n  }}\n}}\n\
             table inet natlab_filter {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{forward}  }}\n  chain input {{\n    type filter hook input priority filter; policy accept;\n{input}  }}\n}}\n"
        );
        nft_script(router, &script);
    }
}

/// Applies an nftables script inside `router`'s namespace (lab setup: a failure panics).
fn nft_script(router: &str, script: &str) {
    if let Err(e) = nft_apply(router, script) {
        panic!("{e}");
    }
}

/// Applies an nftables script inside namespace `ns`.
fn nft_apply(ns: &str, script: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .map_err(|e| format!("write to nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {ns} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// Runs miniupnpd on `router` (site `site`): PCP, NAT-PMP and UPnP IGD for the LAN,
    /// mapping into the router's `inet miniupnpd` table (created here: the daemon fills
    /// its chains but does not create them). Waits until it listens.
    fn start_miniupnpd(&mut self, router: &str, site: usize, upnp_only: bool) {
        let tables = "table inet miniupnpd {\n\
             chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }\n\
             chain miniupnpd { }\n\
             chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }\n\
             chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }\n\
             chain prerouting_miniupnpd { }\n\
             chain postrouting_miniupnpd { }\n\
             }\n";
        nft_script(router, tables);
        let conf = self.dir.path().join(format!("miniupnpd-{site}.conf"));
        let lan = format!("10.{}.0.0/24", site + 1);
        let natpmp = if upnp_only { "no" } else { "yes" };
        std::fs::write(
            &conf,
            format!(
                "ext_ifname=wan\nlistening_ip=lan\nhttp_port=0\nenable_natpmp={natpmp}\n\
                 enable_upnp=yes\nsecure_mode=yes\nsystem_uptime=no\n\
                 uuid=3a5c1c2a-0000-4000-8000-00000000000{site}\n\
                 upnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\n\
                 upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
                 upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
                 allow 1024-65535 {lan} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )
        .expect("write miniupnpd.conf");
        let pid = self.dir.path().join(format!("miniupnpd-{site}.pid"));
        let proc = NsProc::spawn(
            router,
            &miniupnpd_bin().expect("miniupnpd installed (checked by port_mapping_available)"),
            &[
                "-d",
                "-f",
                conf.to_str().unwrap(),
                "-P",
                pid.to_str().unwrap(),
            ],
            &format!("miniupnpd{site}"),
        );
        proc.wait_stderr(
            if upnp_only {
                "HTTP listening on port"
            } else {
                "Listening for NAT-PMP/PCP traffic"
            },
            WAIT,
        );
        self.daemons.lock().unwrap().push(proc);
    }

    /// The miniupnpd logs (for failure reports).
    pub fn daemon_logs(&self) -> String {
        self.daemons
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.stderr_text())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The namespace of host `h` of site `site`.
    pub fn host(&self, site: usize, h: usize) -> &str {
        &self.hosts[site][h]
    }

    /// The relay host's namespace.
    pub fn relay_ns(&self) -> &str {
        &self.relay_ns
    }

    /// Starts the real relay on [`RELAY`] with the alternate [`RELAY_ALT`].
    pub fn start_relay(&self) -> NsProc {
        let p = NsProc::spawn(
            &self.relay_ns,
            &bin("burrow-relay"),
            &["--listen", RELAY, "--alt-listen", RELAY_ALT],
            "relay",
        );
        p.wait_stderr("listening", WAIT);
        p
    }

    /// Starts the real relay with extra flags (benches open the bandwidth caps up).
    pub fn start_relay_with(&self, extra: &[&str]) -> NsProc {
        let mut args = vec!["--listen", RELAY, "--alt-listen", RELAY_ALT];
        args.extend_from_slice(extra);
        let p = NsProc::spawn(&self.relay_ns, &bin("burrow-relay"), &args, "relay");
        p.wait_stderr("listening", WAIT);
        p
    }

    /// Runs a command to completion inside `ns` (one of this lab's namespaces).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        assert!(
            ns.starts_with(&self.prefix),
            "{ns} is not this lab's namespace"
        );
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Loads an nftables script (`nft -f -`) inside `ns` (one of this lab's namespaces).
    pub fn nft(&self, ns: &str, script: &str) -> Result<(), String> {
        assert!(
            ns.starts_with(&self.prefix),
            "{ns} is not this lab's namespace"
        );
        nft_apply(ns, script)
    }

    /// The public address of site `site` (its router's WAN, or the public host itself).
    /// For a `double` site this is the CGNAT's WAN; a port-mapping router's is in
    /// [`PORTMAP_WAN_PREFIX`].
    pub fn wan_ip(&self, site: usize) -> String {
        if self.port_mapping.get(site).copied().unwrap_or(false) {
            format!("{PORTMAP_WAN_PREFIX}.{}", 20 + site)
        } else {
            format!("198.18.0.{}", 20 + site)
        }
    }

    /// The LAN address of host `h` of a NATed site.
    pub fn lan_ip(&self, site: usize, h: usize) -> String {
        format!("10.{}.0.{}", site + 1, 10 + h)
    }

    /// An identity key path for `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    /// Starts `burrow listen` in `ns`; waits for its peer ID and its registration.
    pub fn listen(&self, ns: &str, name: &str) -> Listener {
        self.listen_with(ns, name, &[])
    }

    /// `burrow` arguments: `cmd`, the options every lab node uses (this lab's relay, the
    /// identity key of `name`, IPv4 only), then `extra`.
    pub fn node_args(&self, name: &str, cmd: &[&str], extra: &[&str]) -> Vec<String> {
        let key = self.key(name);
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--relay",
                RELAY,
                "--identity",
                key.to_str().unwrap(),
                "--bind",
                "0.0.0.0:0",
                "--no-ipv6",
            ]
            .map(String::from),
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// `burrow listen` with extra options (e.g. `--out DIR`).
    pub fn listen_with(&self, ns: &str, name: &str, extra: &[&str]) -> Listener {
        let args = self.node_args(name, &["listen"], extra);
        let proc = NsProc::spawn(ns, &bin("burrow"), &strs(&args), "listen");
        let peer = proc.next_stdout(WAIT).expect("listen printed its peer ID");
        proc.wait_stderr("registered", WAIT);
        Listener { proc, peer }
    }

    /// Runs `burrow ping PEER` in `ns` with `extra` options to completion.
    pub fn ping(&self, ns: &str, name: &str, peer: &str, extra: &[&str], timeout: u64) -> Ping {
        let timeout_s = timeout.to_string();
        let mut rest = vec!["--json", "--timeout", &timeout_s];
        rest.extend_from_slice(extra);
        let args = self.node_args(name, &["ping", peer], &rest);
        let started = Instant::now();
        let mut proc = NsProc::spawn(ns, &bin("burrow"), &strs(&args), "ping");
        // Hang guard: the command bounds itself with --timeout; give it slack, then kill.
        let status = proc.wait_exit(Duration::from_secs(timeout + 15));
        let mut pongs = Vec::new();
        for (at, line) in proc.stdout_lines() {
            if line.starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON pong line");
                pongs.push(Pong {
                    seq: v["seq"].as_u64().unwrap_or(0),
                    path: v["path"].as_str().unwrap_or("?").to_string(),
                    remote: v["remote"].as_str().unwrap_or("?").to_string(),
                    rtt_ms: v["rtt_ms"].as_f64().unwrap_or(-1.0),
                    at: at.saturating_duration_since(started),
                });
            }
        }
        Ping {
            success: status == Some(true),
            pongs,
            stderr: proc.stderr_text(),
        }
    }

    /// Starts `burrow send PEER FILE --json` in `ns` (see [`Send::finish`]).
    pub fn start_send(&self, ns: &str, name: &str, peer: &str, file: &Path) -> NsProc {
        let args = self.node_args(
            name,
            &["send", peer, file.to_str().unwrap()],
            &["--json", "--connect-timeout", "30"],
        );
        NsProc::spawn(ns, &bin("burrow"), &strs(&args), "send")
    }

    /// Runs `burrow send PEER FILE --json` in `ns` to completion (killed after `wait`).
    pub fn send(&self, ns: &str, name: &str, peer: &str, file: &Path, wait: Duration) -> Send {
        Send::finish(self.start_send(ns, name, peer, file), wait)
    }

    /// Writes `len` pseudo-random bytes (seeded) to a new file in the lab's directory.
    pub fn random_file(&self, name: &str, len: usize, seed: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut x = seed | 1;
        let mut buf = vec![0u8; 1 << 16];
        let mut left = len;
        while left > 0 {
            for chunk in buf.chunks_mut(8) {
                // xorshift64: reproducible content, no RNG dependency.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
            let n = left.min(buf.len());
            f.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        f.flush().unwrap();
        path
    }

    /// Runs `burrow netcheck --json` in `ns`; returns its JSON report (or the stderr).
    pub fn netcheck(
        &self,
        ns: &str,
        name: &str,
        timeout: u64,
    ) -> Result<serde_json::Value, String> {
        let timeout_s = timeout.to_string();
        let args = self.node_args(name, &["netcheck"], &["--json", "--timeout", &timeout_s]);
        let mut proc = NsProc::spawn(ns, &bin("burrow"), &strs(&args), "netcheck");
        let ok = proc.wait_exit(Duration::from_secs(timeout + 15)) == Some(true);
        let line = proc
            .stdout_lines()
            .into_iter()
            .map(|(_, l)| l)
            .find(|l| l.starts_with('{'));
        match (ok, line) {
            (true, Some(l)) => serde_json::from_str(&l).map_err(|e| e.to_string()),
            _ => Err(format!("netcheck failed: {}", proc.stderr_text())),
        }
    }

    /// The UDP entries of a router's conntrack table (for failure reports).
    pub fn conntrack_udp(&self, router: &str) -> String {
        run(&[
            "ip",
            "netns",
            "exec",
            router,
            "cat",
            "/proc/net/nf_conntrack",
        ])
        .map(|t| {
            t.lines()
                .filter(|l| l.contains(" udp "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| e)
    }

    /// The nftables ruleset of a router (for failure reports).
    pub fn ruleset(&self, router: &str) -> String {
        run(&["ip", "netns", "exec", router, "nft", "list", "ruleset"]).unwrap_or_else(|e| e)
    }
}

impl Lab {
    /// The one-way delay of each traversal of the internet bridge (zero: off).
    pub fn wan_delay(&self) -> Duration {
        self.wan.as_ref().map_or(Duration::ZERO, |w| w.delay)
    }

    /// Packets the WAN delayer has released so far, or None when the delay is off. Panics
    /// if the delayer thread has died (the internet then drops every packet).
    pub fn wan_delayed_packets(&self) -> Option<u64> {
        let w = self.wan.as_ref()?;
        assert!(w.is_alive(), "the lab's WAN delayer thread has died");
        Some(w.stats.delayed.load(Ordering::Relaxed))
    }

    /// A one-line summary of the WAN delayer (for reports).
    pub fn wan_summary(&self) -> String {
        match &self.wan {
            None => "WAN delay off".into(),
            Some(w) => format!(
                "WAN delay {} ms: {} packets delayed, at most {} held, {} socket overruns, thread {}",
                w.delay.as_millis(),
                w.stats.delayed.load(Ordering::Relaxed),
                w.stats.max_held.load(Ordering::Relaxed),
                w.stats.overruns.load(Ordering::Relaxed),
                if w.is_alive() { "alive" } else { "DEAD" }
            ),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The delayer first (it joins its thread; queued packets are then dropped).
        self.wan = None;
        // Hosts first (processes), then routers, the relay and the internet last.
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
    }
}

/// A workspace binary next to the test executable (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    if name == "burrow" {
        return PathBuf::from(env!("CARGO_BIN_EXE_burrow"));
    }
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/test")
        .join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace` (or `cargo build -p {name}` first)",
        path.display()
    );
    path
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// A process inside a namespace (`ip netns exec NS BIN ...`, which execs BIN in place, so
/// the child's pid is the binary's). Killed on drop; its output is kept for reports.
pub struct NsProc {
    child: Child,
    tag: String,
    stdout: Lines,
    stderr: Lines,
    stdout_rx: mpsc::Receiver<String>,
    stderr_rx: mpsc::Receiver<String>,
    /// Lines of stderr already consumed by `wait_stderr`.
    stderr_seen: Mutex<usize>,
}

fn collect(
    stream: impl std::io::Read + std::marker::Send + 'static,
    tag: String,
    store: Lines,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("BURROW_TEST_LOG").is_some() {
                eprintln!("{tag}: {line}");
            }
            store.lock().unwrap().push((Instant::now(), line.clone()));
            let _ = tx.send(line);
        }
    });
    rx
}

impl NsProc {
    /// Spawns `bin args` inside `ns` (RUST_LOG from BURROW_NATLAB_LOG, default info).
    pub fn spawn(ns: &str, bin: &Path, args: &[&str], tag: &str) -> NsProc {
        NsProc::spawn_env(ns, bin, args, tag, &[])
    }

    /// [`NsProc::spawn`] with extra environment variables (they override RUST_LOG too).
    pub fn spawn_env(
        ns: &str,
        bin: &Path,
        args: &[&str],
        tag: &str,
        env: &[(&str, &str)],
    ) -> NsProc {
        let log = std::env::var("BURROW_NATLAB_LOG").unwrap_or_else(|_| "info".into());
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .env("RUST_LOG", log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} in {ns}: {e}", bin.display()));
        let tag = format!("{tag}@{}", ns.rsplit('-').next().unwrap_or(ns));
        let stdout: Lines = Arc::default();
        let stderr: Lines = Arc::default();
        let stdout_rx = collect(child.stdout.take().unwrap(), tag.clone(), stdout.clone());
        let stderr_rx = collect(
            child.stderr.take().unwrap(),
            format!("{tag}!"),
            stderr.clone(),
        );
        NsProc {
            child,
            tag,
            stdout,
            stderr,
            stdout_rx,
            stderr_rx,
            stderr_seen: Mutex::new(0),
        }
    }

    /// The next stdout line, if one comes within `wait`.
    pub fn next_stdout(&self, wait: Duration) -> Option<String> {
        self.stdout_rx.recv_timeout(wait).ok()
    }

    /// Waits for the next stderr line containing `needle`; panics with the log after `wait`.
    pub fn wait_stderr(&self, needle: &str, wait: Duration) -> String {
        self.try_wait_stderr(needle, wait).unwrap_or_else(|| {
            panic!(
                "{}: no stderr line containing {needle:?} within {wait:?}; stderr:\n{}",
                self.tag,
                self.stderr_text()
            )
        })
    }

    /// Waits for the next stderr line containing `needle`.
    pub fn try_wait_stderr(&self, needle: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_rx.recv_timeout(left) {
                Ok(line) => {
                    *self.stderr_seen.lock().unwrap() += 1;
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the process to exit (killing it after `wait`): Some(success) or None if
    /// it had to be killed.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<bool> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads finish the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status.success());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process ID (`ip netns exec` execs in place: the binary's own pid).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs in place).
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every stdout line so far with its arrival time.
    pub fn stdout_lines(&self) -> Vec<(Instant, String)> {
        self.stdout.lock().unwrap().clone()
    }

    /// Every stderr line so far with its arrival time.
    pub fn stderr_lines(&self) -> Vec<(Instant, String)> {
        self.stderr.lock().unwrap().clone()
    }

    /// The whole stderr so far.
    pub fn stderr_text(&self) -> String {
        let lines = self.stderr.lock().unwrap();
        lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `burrow listen`.
pub struct Listener {
    /// The process.
    pub proc: NsProc,
    /// Its peer ID.
    pub peer: String,
}

/// One pong line of `burrow ping --json`.
#[derive(Debug, Clone)]
pub struct Pong {
    /// Ping sequence number.
    pub seq: u64,
    /// `relay-udp`, `relay-tcp` or `direct`.
    pub path: String,
    /// The remote address the pong came from.
    pub remote: String,
    /// Round-trip time reported by the node.
    pub rtt_ms: f64,
    /// When the line arrived, since the ping process started.
    pub at: Duration,
}

/// The outcome of one `burrow ping` run.
#[derive(Debug)]
pub struct Ping {
    /// Exit status was success.
    pub success: bool,
    /// Every pong in order.
    pub pongs: Vec<Pong>,
    /// The ping's stderr.
    pub stderr: String,
}

impl Ping {
    /// The path of the last pong.
    pub fn final_path(&self) -> &str {
        self.pongs.last().map(|p| p.path.as_str()).unwrap_or("none")
    }

    /// The first direct pong.
    pub fn first_direct(&self) -> Option<&Pong> {
        self.pongs.iter().find(|p| p.path == "direct")
    }
}

/// The outcome of one `burrow send`.
#[derive(Debug)]
pub struct Send {
    /// Exit status was success.
    pub success: bool,
    /// The JSON summary (`ok`, `bytes`, `seconds`, `mb_per_s`, `path`, `remote`, ...).
    pub summary: Option<serde_json::Value>,
    /// The sender's stderr.
    pub stderr: String,
}

impl Send {
    /// Waits for a started send (killed after `wait`) and reads its summary.
    pub fn finish(mut proc: NsProc, wait: Duration) -> Send {
        let status = proc.wait_exit(wait);
        let summary = proc
            .stdout_lines()
            .into_iter()
            .map(|(_, l)| l)
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(&l).ok());
        Send {
            success: status == Some(true),
            summary,
            stderr: proc.stderr_text(),
        }
    }

    /// The path the transfer ended on.
    pub fn path(&self) -> &str {
        self.summary
            .as_ref()
            .and_then(|v| v["path"].as_str())
            .unwrap_or("none")
    }
}

/// Whether two files have the same bytes (BLAKE3 of each, streamed).
pub fn same_content(a: &Path, b: &Path) -> bool {
    fn hash(p: &Path) -> Option<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(p).ok()?).ok()?;
        Some(h.finalize())
    }
    matches!((hash(a), hash(b)), (Some(x), Some(y)) if x == y)
}

/// The relay address as a SocketAddr.
pub fn relay_addr() -> SocketAddr {
    RELAY.parse().unwrap()
}

/// Borrows owned arguments for [`NsProc::spawn`].
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
