//! Reusable scenarios (the matrix test and the time-to-direct benchmark run these).

use std::time::Duration;

use super::*;
use crate::node::PathKind;

/// Outcome of one pair run.
#[derive(Debug, Clone)]
pub struct PairOutcome {
    /// A's path to B at the end.
    pub path_a: Option<PathKind>,
    /// B's path to A at the end.
    pub path_b: Option<PathKind>,
    /// Time from `connect` until both sides are direct, in RTTs between the nodes.
    pub rtts_to_direct: Option<f64>,
    /// Datagrams A received from B.
    pub got_a: usize,
    /// Datagrams B received from A.
    pub got_b: usize,
    /// Datagrams sent each way.
    pub sent: usize,
}

const LAT_A: Duration = Duration::from_millis(20);
const LAT_B: Duration = Duration::from_millis(30);

fn quic(i: u32) -> Vec<u8> {
    let mut v = vec![0x40];
    v.extend_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&[0x5A; 100]);
    v
}

/// Two registered nodes behind `nat_a` / `nat_b` (`None`: public) at `loss`, their UDP
/// binds settled (relay-udp vs relay-tcp is decided by them): A's site is 20 ms from the
/// core, B's 30 ms, the relay's 10 ms. Returns the simulator, A, B and the RTT between the
/// two nodes (100 ms).
pub fn registered_pair(
    seed: u64,
    nat_a: Option<NatConfig>,
    nat_b: Option<NatConfig>,
    loss: f64,
) -> (Sim, HostId, HostId, Duration) {
    let mut sim = Sim::new(
        seed,
        SimConfig {
            loss,
            ..SimConfig::default()
        },
    );
    let host = |sim: &mut Sim, k: Option<NatConfig>, lat: Duration| {
        let nat = k.map(|c| sim.add_nat(c, lat));
        sim.add_host(nat, lat, |_| {})
    };
    let ha = host(&mut sim, nat_a, LAT_A);
    let hb = host(&mut sim, nat_b, LAT_B);
    let ok = sim.run_until(Duration::from_secs(60), |s| {
        s.hosts[ha].node.is_registered() && s.hosts[hb].node.is_registered()
    });
    assert!(ok, "seed {seed}: never registered");
    sim.run_for(Duration::from_secs(3));
    (sim, ha, hb, 2 * (LAT_A + LAT_B))
}

/// Runs [`registered_pair`], connects A to B, waits up to 60 s for a direct path, then sends
/// 50 QUIC-looking datagrams each way.
pub fn run_pair(
    seed: u64,
    nat_a: Option<NatConfig>,
    nat_b: Option<NatConfig>,
    loss: f64,
) -> PairOutcome {
    let (mut sim, ha, hb, rtt) = registered_pair(seed, nat_a, nat_b, loss);
    let ida = sim.hosts[ha].peer_id();
    let idb = sim.hosts[hb].peer_id();
    let t0 = sim.elapsed();
    sim.with_node(ha, |n, now| n.connect(now, idb));
    let both_direct = |s: &Sim| {
        matches!(
            s.hosts[ha].node.path(s.now(), &idb),
            Some(PathKind::Direct(_))
        ) && matches!(
            s.hosts[hb].node.path(s.now(), &ida),
            Some(PathKind::Direct(_))
        )
    };
    let direct = sim.run_until(Duration::from_secs(60), both_direct);
    let rtts_to_direct = direct.then(|| (sim.elapsed() - t0).as_secs_f64() / rtt.as_secs_f64());
    sim.run_for(Duration::from_secs(1));
    // Datagrams both ways.
    let sent = 50;
    for i in 0..sent as u32 {
        sim.with_node(ha, |n, now| {
            let _ = n.send_datagram(now, &idb, &quic(i));
        });
        sim.with_node(hb, |n, now| {
            let _ = n.send_datagram(now, &ida, &quic(1000 + i));
        });
        sim.run_for(Duration::from_millis(50));
    }
    sim.run_for(Duration::from_secs(2));
    PairOutcome {
        path_a: sim.hosts[ha].node.path(sim.now(), &idb),
        path_b: sim.hosts[hb].node.path(sim.now(), &ida),
        rtts_to_direct,
        got_a: sim.hosts[ha].received.len(),
        got_b: sim.hosts[hb].received.len(),
        sent,
    }
}
