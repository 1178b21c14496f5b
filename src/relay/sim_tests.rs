//! The real node core against the real relay core, in the simulator.

use std::time::Duration;

use crate::node::PathKind;
use crate::sim::{HostId, NatConfig, Sim, SimConfig};

use crate::sim::real_relay_factory;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn registered(sim: &Sim, h: HostId) -> bool {
    sim.hosts[h].node.is_registered()
}

fn path(sim: &Sim, h: HostId, peer: HostId) -> Option<PathKind> {
    let id = sim.hosts[peer].peer_id();
    sim.hosts[h].node.path(sim.now(), &id)
}

fn quic(i: u32) -> Vec<u8> {
    let mut v = vec![0x40];
    v.extend_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&[0xAB; 40]);
    v
}

/// Two hosts behind NATs of the given kinds (20 and 30 ms from the internet), both
/// registered with the real relay.
fn registered_pair(seed: u64, nat_a: NatConfig, nat_b: NatConfig) -> (Sim, HostId, HostId) {
    let mut sim = Sim::with_relay(seed, SimConfig::default(), real_relay_factory());
    let na = sim.add_nat(nat_a, ms(20));
    let nb = sim.add_nat(nat_b, ms(30));
    let a = sim.add_host(Some(na), ms(0), |_| {});
    let b = sim.add_host(Some(nb), ms(0), |_| {});
    assert!(
        sim.run_until(Duration::from_secs(10), |s| registered(s, a)
            && registered(s, b)),
        "seed {seed}: not registered"
    );
    (sim, a, b)
}

/// Sends one datagram each way and checks both arrive.
fn exchange(sim: &mut Sim, a: HostId, b: HostId) {
    let (aid, bid) = (sim.hosts[a].peer_id(), sim.hosts[b].peer_id());
    let (ra, rb) = (sim.hosts[a].received.len(), sim.hosts[b].received.len());
    sim.with_node(a, |n, now| n.send_datagram(now, &bid, &quic(1)).unwrap());
    sim.with_node(b, |n, now| n.send_datagram(now, &aid, &quic(2)).unwrap());
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.hosts[b].received.len(), rb + 1, "b got nothing");
    assert_eq!(sim.hosts[a].received.len(), ra + 1, "a got nothing");
    assert_eq!(sim.hosts[b].received.last().unwrap().2, quic(1));
    assert_eq!(sim.hosts[a].received.last().unwrap().2, quic(2));
}

#[test]
fn nodes_register_and_go_direct_through_the_real_relay() {
    for seed in 1..4 {
        eprintln!("seed {seed}");
        let (mut sim, a, b) = registered_pair(
            seed,
            NatConfig::port_restricted(),
            NatConfig::port_restricted(),
        );
        let bid = sim.hosts[b].peer_id();
        sim.with_node(a, |n, now| n.connect(now, bid));
        let ok = sim.run_until(Duration::from_secs(10), |s| {
            matches!(path(s, a, b), Some(PathKind::Direct(_)))
                && matches!(path(s, b, a), Some(PathKind::Direct(_)))
        });
        assert!(ok, "seed {seed}: no direct path");
        exchange(&mut sim, a, b);
    }
}

#[test]
fn symmetric_nats_fall_back_to_relaying_through_the_real_relay() {
    for seed in 1..4 {
        eprintln!("seed {seed}");
        let (mut sim, a, b) = registered_pair(
            seed,
            NatConfig::symmetric_random(),
            NatConfig::symmetric_random(),
        );
        let bid = sim.hosts[b].peer_id();
        sim.with_node(a, |n, now| n.connect(now, bid));
        let ok = sim.run_until(Duration::from_secs(10), |s| {
            path(s, a, b).is_some() && path(s, b, a).is_some()
        });
        assert!(ok, "seed {seed}: no path at all");
        exchange(&mut sim, a, b);
    }
}

#[test]
fn udp_blocked_node_relays_over_tcp_through_the_real_relay() {
    for seed in 1..3 {
        eprintln!("seed {seed}");
        let (mut sim, a, b) =
            registered_pair(seed, NatConfig::udp_blocked(), NatConfig::port_restricted());
        let bid = sim.hosts[b].peer_id();
        sim.with_node(a, |n, now| n.connect(now, bid));
        let ok = sim.run_until(Duration::from_secs(20), |s| {
            path(s, a, b).is_some() && path(s, b, a).is_some()
        });
        assert!(ok, "seed {seed}: no path at all");
        assert_eq!(path(&sim, a, b), Some(PathKind::RelayTcp));
        exchange(&mut sim, a, b);
    }
}

#[test]
fn direct_paths_can_be_held_back_and_released() {
    let seed = 7;
    let (mut sim, a, b) = registered_pair(
        seed,
        NatConfig::port_restricted(),
        NatConfig::port_restricted(),
    );
    sim.with_node(a, |n, now| n.set_direct_allowed(now, false));
    let bid = sim.hosts[b].peer_id();
    sim.with_node(a, |n, now| n.connect(now, bid));
    // B goes direct; A keeps relaying although its punch succeeded underneath.
    assert!(sim.run_until(Duration::from_secs(10), |s| matches!(
        path(s, b, a),
        Some(PathKind::Direct(_))
    )));
    sim.run_for(Duration::from_secs(2));
    assert_eq!(path(&sim, a, b), Some(PathKind::RelayUdp), "seed {seed}");
    exchange(&mut sim, a, b);
    // Released: the confirmed path is used at once.
    sim.with_node(a, |n, now| n.set_direct_allowed(now, true));
    assert!(
        matches!(path(&sim, a, b), Some(PathKind::Direct(_))),
        "seed {seed}"
    );
    exchange(&mut sim, a, b);
}

#[test]
fn relayed_packets_that_overtake_the_introduction_are_kept() {
    // B's relay TCP stalls, so A's first relayed datagram reaches B before B's introduction.
    let seed = 11;
    let (mut sim, a, b) = registered_pair(
        seed,
        NatConfig::port_restricted(),
        NatConfig::port_restricted(),
    );
    sim.run_for(Duration::from_secs(20));
    sim.with_node(a, |n, now| n.set_direct_allowed(now, false));
    sim.tcp_stall.insert(b, ms(300));
    let bid = sim.hosts[b].peer_id();
    sim.with_node(a, |n, now| n.connect(now, bid));
    assert!(sim.run_until(Duration::from_secs(5), |s| path(s, a, b).is_some()));
    assert_eq!(
        path(&sim, b, a),
        None,
        "seed {seed}: B must not be introduced yet"
    );
    assert_eq!(path(&sim, a, b), Some(PathKind::RelayUdp), "seed {seed}");
    let before = sim.hosts[b].received.len();
    sim.with_node(a, |n, now| n.send_datagram(now, &bid, &quic(7)).unwrap());
    sim.run_for(Duration::from_secs(1));
    assert_eq!(
        sim.hosts[b].received.len(),
        before + 1,
        "seed {seed}: first datagram lost"
    );
    assert_eq!(sim.hosts[b].received.last().unwrap().2, quic(7));
}
