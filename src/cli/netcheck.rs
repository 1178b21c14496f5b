//! `burrow netcheck`: public address, NAT mapping behaviour, UDP reachability, relay RTT.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::driver::node::NodeApp;
use burrow::node::{NetcheckReport, NodeCore, NodeEvent, StunServerKind};
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
}

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
            NodeEvent::NetcheckDone(report) if self.requested => self.report = Some(report),
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore) {
        let started = *self.started.get_or_insert(now);
        if !self.requested && now >= started + REGISTRATION_GRACE {
            self.requested = true;
            core.netcheck(now);
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        if self.requested {
            None
        } else {
            self.started.map(|s| s + REGISTRATION_GRACE)
        }
    }

    fn is_done(&self) -> bool {
        self.report.is_some()
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

pub fn run(args: NetcheckArgs) -> Result<ExitCode, String> {
    let mut driver = args.node.build()?;
    let mut app = NetcheckApp {
        started: None,
        requested: false,
        report: None,
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
