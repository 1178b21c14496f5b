//! Issue 7 part 3 in the simulator: a router port mapping takes symmetric × symmetric
//! (which otherwise stays relayed) to a direct path.

use std::time::Duration;

use super::*;
use crate::node::{NodeEvent, PathKind};
use crate::portmap::{Mapping, PortMapStatus, Protocol};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn direct(sim: &Sim, h: HostId, peer: HostId) -> bool {
    let id = sim.hosts[peer].peer_id();
    matches!(
        sim.hosts[h].node.path(sim.now(), &id),
        Some(PathKind::Direct(_))
    )
}

/// Runs sym × sym with or without a port mapping on the first NAT; returns whether both
/// sides went direct within 20 s.
fn sym_pair(seed: u64, mapped: bool) -> bool {
    let mut sim = Sim::new(seed, SimConfig::default());
    let na = sim.add_nat(NatConfig::symmetric_random(), ms(20));
    let nb = sim.add_nat(NatConfig::symmetric_random(), ms(30));
    let a = sim.add_host(Some(na), ms(0), |_| {});
    let b = sim.add_host(Some(nb), ms(0), |_| {});
    if mapped {
        let inside = sim.hosts[a].addr;
        let external = SocketAddr::new(sim.nats[na].public_ip, 40_000);
        sim.nats[na].add_port_forward(40_000, inside);
        sim.with_node(a, |n, now| {
            n.handle_port_mapping(
                now,
                PortMapStatus::Mapped(Mapping {
                    protocol: Protocol::Pcp,
                    external,
                    internal_port: inside.port(),
                    lifetime: Duration::from_secs(7200),
                }),
            )
        });
    }
    let reg = sim.run_until(Duration::from_secs(10), |s| {
        s.hosts[a].node.is_registered() && s.hosts[b].node.is_registered()
    });
    assert!(reg, "seed {seed}: not registered");
    assert_eq!(
        mapped,
        sim.has_event(a, |e| matches!(e, NodeEvent::PortMapping(_)))
    );
    let aid = sim.hosts[a].peer_id();
    // The side without the mapping connects: it learns the mapped candidate from the
    // introduction.
    sim.with_node(b, |n, now| n.connect(now, aid));
    sim.run_until(Duration::from_secs(20), |s| {
        direct(s, a, b) && direct(s, b, a)
    })
}

#[test]
fn sym_sym_goes_direct_through_a_port_mapping() {
    for seed in 1..=10 {
        assert!(
            sym_pair(seed, true),
            "seed {seed}: stayed relayed with a port mapping"
        );
    }
}

#[test]
fn sym_sym_without_mapping_stays_relayed() {
    // The control: the same pair without the mapping does not go direct (so the test
    // above can fail).
    assert!(
        !sym_pair(1, false),
        "sym × sym went direct without a mapping?"
    );
}
