//! `burrow netcheck`: public address, NAT mapping behaviour, UDP reachability, relay RTT.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::driver::node::NodeApp;
use burrow::node::{NetcheckReport, NodeCore, NodeEvent, StunServerKind};
use burrow::portmap::PortMapStatus;
use burrow::wire::control::{MappingBehavior, PortAllocation};
use clap::Args;

use super::{NodeArgs, fmt_rtt};

/// `burrow netcheck` options.
#[derive(Args, Debug)]
pub struct NetcheckArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// One JSON object instead of human-readable lines.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds. With the relay reachable over TCP, silence on UDP
    /// is reported as "UDP blocked" after 5 s; without it, a STUN transaction only counts
    /// as failed after 39.5 s (RFC 8489 retransmissions).
    #[arg(long, default_value_t = 45)]
    timeout: u64,
}

/// Waits for registration (so the relay's alternate STUN address is known) for a short
/// while, then runs one netcheck round and keeps its report.
struct NetcheckApp {
    started: Option<Instant>,
    requested: bool,
    report: Option<NetcheckReport>,
    /// The router port mapping as last reported; the report waits (a bounded while) for
    /// it to settle so that it can be shown.
    portmap: PortMapStatus,
    report_at: Option<Instant>,
}

/// How long the output waits for port mapping after the NAT report: PCP and NAT-PMP give up
/// after ~3.75 s each, the UPnP search after ~4 s, and the IGD's HTTP after 5 s.
const PORTMAP_GRACE: Duration = Duration::from_secs(15);

/// How long to wait for the relay's registration before measuring without its alternate
/// address (e.g. when the "relay" is a plain STUN server such as coturn).
const REGISTRATION_GRACE: Duration = Duration::from_secs(2);

impl NodeApp for NetcheckApp {
    fn on_event(&mut self, now: Instant, core: &mut NodeCore, event: NodeEvent) {
        match event {
            NodeEvent::Registered { .. } if !self.requested => {
                self.requested = true;
                core.netcheck(now);
            }
            NodeEvent::NetcheckDone(report) if self.requested => {
                self.report = Some(report);
                self.report_at = Some(now);
            }
            NodeEvent::PortMapping(status) => self.portmap = status,
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore) {
        if self.report_at.is_some_and(|at| now >= at + PORTMAP_GRACE)
            && self.portmap == PortMapStatus::Probing
        {
            self.portmap = PortMapStatus::Unavailable("still probing; gave up waiting".into());
        }
        let started = *self.started.get_or_insert(now);
        if !self.requested && now >= started + REGISTRATION_GRACE {
            self.requested = true;
            core.netcheck(now);
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        if let Some(at) = self.report_at {
            Some(at + PORTMAP_GRACE)
        } else if self.requested {
            None
        } else {
            self.started.map(|s| s + REGISTRATION_GRACE)
        }
    }

    fn is_done(&self) -> bool {
        self.report.is_some() && self.portmap != PortMapStatus::Probing
    }
}

fn mapping_name(m: MappingBehavior) -> &'static str {
    match m {
        MappingBehavior::Unknown => "unknown",
        MappingBehavior::NoNat => "no-nat",
        MappingBehavior::EndpointIndependent => "endpoint-independent",
        MappingBehavior::EndpointDependent => "endpoint-dependent",
    }
}

fn allocation_name(a: PortAllocation) -> String {
    match a {
        PortAllocation::Unknown => "unknown".into(),
        PortAllocation::Preserving => "preserving".into(),
        PortAllocation::Sequential(step) => format!("sequential({step})"),
        PortAllocation::Random => "random".into(),
    }
}

fn kind_name(k: StunServerKind) -> &'static str {
    match k {
        StunServerKind::Relay => "relay",
        StunServerKind::RelayAlternate => "relay-alternate",
        StunServerKind::Extra => "extra",
    }
}

/// One line for humans, e.g. `198.18.0.21:40123 via pcp (lifetime 7200 s)`.
pub(crate) fn portmap_line(s: &PortMapStatus) -> String {
    match s {
        PortMapStatus::Disabled => "off".into(),
        PortMapStatus::Probing => "probing".into(),
        PortMapStatus::Mapped(m) => {
            let life = if m.lifetime.is_zero() {
                "permanent lease".to_string()
            } else {
                format!("lifetime {} s", m.lifetime.as_secs())
            };
            let note = if burrow::portmap::is_announceable(m.external) {
                ""
            } else {
                ", private address: another NAT above the router, not announced"
            };
            format!(
                "{} via {} -> local port {} ({life}{note})",
                m.external,
                m.protocol.name(),
                m.internal_port
            )
        }
        PortMapStatus::Unavailable(why) => format!("unavailable ({why})"),
    }
}

fn portmap_json(s: &PortMapStatus) -> serde_json::Value {
    match s {
        PortMapStatus::Mapped(m) => serde_json::json!({
            "status": "mapped",
            "external": m.external.to_string(),
            "protocol": m.protocol.name(),
            "internal_port": m.internal_port,
            "lifetime_s": m.lifetime.as_secs(),
            "announced": burrow::portmap::is_announceable(m.external),
        }),
        PortMapStatus::Disabled => serde_json::json!({ "status": "off" }),
        PortMapStatus::Probing => serde_json::json!({ "status": "probing" }),
        PortMapStatus::Unavailable(why) => {
            serde_json::json!({ "status": "unavailable", "reason": why })
        }
    }
}

pub fn run(args: NetcheckArgs) -> Result<ExitCode, String> {
    let mut driver = args.node.build()?;
    let mut app = NetcheckApp {
        started: None,
        requested: false,
        report: None,
        portmap: driver.core().port_mapping().clone(),
        report_at: None,
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    driver
        .run(&mut app, Some(deadline))
        .map_err(|e| format!("network error: {e}"))?;
    let Some(r) = app.report else {
        return Err(format!("netcheck did not finish within {} s", args.timeout));
    };
    if args.json {
        let probes: Vec<_> = r
            .probes
            .iter()
            .map(|p| {
                serde_json::json!({
                    "server": p.server.to_string(),
                    "kind": kind_name(p.kind),
                    "mapped": p.mapped.map(|m| m.to_string()),
                    "rtt_ms": p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                })
            })
            .collect();
        let v = serde_json::json!({
            "udp": r.nat.udp,
            "public_addr": r.public_addr.map(|a| a.to_string()),
            "mapping": mapping_name(r.nat.mapping),
            "port_allocation": allocation_name(r.nat.allocation),
            "relay_rtt_ms": r.relay_rtt.map(|d| d.as_secs_f64() * 1000.0),
            "host_addrs": r.host_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "probes": probes,
            "port_mapping": portmap_json(&app.portmap),
        });
        println!("{v}");
    } else {
        println!(
            "udp:             {}",
            if r.nat.udp {
                "yes"
            } else {
                "no (UDP blocked?)"
            }
        );
        match r.public_addr {
            Some(a) => println!("public address:  {a}"),
            None => println!("public address:  unknown"),
        }
        println!("mapping:         {}", mapping_name(r.nat.mapping));
        println!("port allocation: {}", allocation_name(r.nat.allocation));
        match r.relay_rtt {
            Some(d) => println!("relay rtt:       {}", fmt_rtt(d)),
            None => println!("relay rtt:       no answer"),
        }
        println!("port mapping:    {}", portmap_line(&app.portmap));
        for a in &r.host_addrs {
            println!("host address:    {a}");
        }
        for p in &r.probes {
            match p.mapped {
                Some(m) => println!(
                    "stun {} ({}): mapped {m} in {}",
                    p.server,
                    kind_name(p.kind),
                    p.rtt.map(fmt_rtt).unwrap_or_default()
                ),
                None => println!("stun {} ({}): no answer", p.server, kind_name(p.kind)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
