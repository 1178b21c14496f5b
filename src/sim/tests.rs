//! Scenario tests: the real node core in the simulated network.

use std::time::Duration;

use super::*;
use crate::node::{NodeEvent, PathKind};

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn registered(sim: &Sim, h: HostId) -> bool {
    sim.hosts[h].node.is_registered()
}

/// QUIC-looking payload (short header first byte) carrying an index.
fn quic(i: u32) -> Vec<u8> {
    let mut v = vec![0x40];
    v.extend_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&[0xAB; 40]);
    v
}

fn direct(sim: &Sim, h: HostId, peer: HostId) -> bool {
    let id = sim.hosts[peer].peer_id();
    matches!(
        sim.hosts[h].node.path(sim.now(), &id),
        Some(PathKind::Direct(_))
    )
}

#[test]
fn two_port_restricted_nodes_go_direct() {
    init_log();
    let mut sim = Sim::new(1, SimConfig::default());
    let na = sim.add_nat(NatConfig::port_restricted(), ms(20));
    let nb = sim.add_nat(NatConfig::port_restricted(), ms(30));
    let a = sim.add_host(Some(na), ms(0), |_| {});
    let b = sim.add_host(Some(nb), ms(0), |_| {});
    assert!(sim.run_until(Duration::from_secs(10), |s| registered(s, a)
        && registered(s, b)));
    let bid = sim.hosts[b].peer_id();
    sim.with_node(a, |n, now| n.connect(now, bid));
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        direct(s, a, b) && direct(s, b, a)
    });
    assert!(ok, "no direct path: {:#?}", sim.hosts[a].events);
    let aid = sim.hosts[a].peer_id();
    sim.with_node(a, |n, now| n.send_datagram(now, &bid, &quic(1)).unwrap());
    sim.with_node(b, |n, now| n.send_datagram(now, &aid, &quic(2)).unwrap());
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.hosts[b].received.len(), 1);
    assert_eq!(sim.hosts[a].received.len(), 1);
    assert!(sim.has_event(a, |e| matches!(e, NodeEvent::Introduced { .. })));
}
