//! End to end in the simulator: two real `NodeCore`s behind NATs, the fake relay, and a
//! `Transport` on each node carrying QUIC over whatever path the node picks. The transfer
//! starts on the relay, moves to the punched direct path, falls back to the relay when the
//! direct path breaks, and must arrive intact on one connection throughout.

use std::time::Duration;

use crate::node::{NodeEvent, PathKind};
use crate::sim::{HostId, NatConfig, Sim, SimConfig};

use super::*;

/// Paths each side's datagrams took, counted.
#[derive(Default, Debug)]
struct PathCount {
    relay: u64,
    direct: u64,
}

struct World {
    sim: Sim,
    hosts: [HostId; 2],
    transports: [Transport; 2],
    ids: [PeerId; 2],
    paths: PathCount,
}

impl World {
    /// Moves datagrams node → transport and transport → node, then runs the simulator until
    /// the next transport timer, a delivered datagram, or `slice`.
    fn step(&mut self, slice: Duration) {
        for side in 0..2 {
            let h = self.hosts[side];
            let now = self.sim.now();
            for (_, from, bytes) in std::mem::take(&mut self.sim.hosts[h].received) {
                self.transports[side].handle_datagram(now, from, &bytes);
            }
            if self.transports[side]
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.transports[side].handle_timeout(now);
            }
            while let Some(t) = self.transports[side].poll_transmit(now) {
                for d in t.datagrams() {
                    let sent = self
                        .sim
                        .with_node(h, |n, now| n.send_datagram(now, &t.peer, d));
                    match sent {
                        Ok(PathKind::Direct(_)) => self.paths.direct += 1,
                        Ok(_) => self.paths.relay += 1,
                        Err(e) => tracing::debug!(%e, "node could not send"),
                    }
                }
            }
        }
        let now = self.sim.now();
        let next = self
            .transports
            .iter_mut()
            .filter_map(|t| t.poll_timeout())
            .min()
            .map_or(slice, |t| t.saturating_duration_since(now).min(slice));
        let [a, b] = self.hosts;
        self.sim
            .run_until(next.max(Duration::from_micros(100)), |s| {
                !s.hosts[a].received.is_empty() || !s.hosts[b].received.is_empty()
            });
    }
}

#[test]
fn quic_transfer_over_node_paths_relay_direct_relay() {
    for (seed, loss) in [(42, 0.0), (7, 0.01), (1234, 0.02)] {
        transfer_across_path_changes(seed, loss);
    }
}

fn transfer_across_path_changes(seed: u64, loss: f64) {
    let cfg = SimConfig {
        loss,
        ..SimConfig::default()
    };
    let mut sim = Sim::new(seed, cfg);
    let na = sim.add_nat(NatConfig::port_restricted(), Duration::from_millis(20));
    let nb = sim.add_nat(NatConfig::port_restricted(), Duration::from_millis(25));
    let (id_a, id_b) = (
        Identity::from_secret([0xa1; 32]),
        Identity::from_secret([0xb2; 32]),
    );
    let a = sim.add_host(Some(na), Duration::ZERO, |c| c.identity = id_a.clone());
    let b = sim.add_host(Some(nb), Duration::ZERO, |c| c.identity = id_b.clone());
    assert!(
        sim.run_until(Duration::from_secs(10), |s| s.hosts[a].node.is_registered()
            && s.hosts[b].node.is_registered()),
        "seed {seed}: not registered"
    );
    let ids = [sim.hosts[a].peer_id(), sim.hosts[b].peer_id()];
    sim.with_node(a, |n, now| n.connect(now, ids[1]));
    assert!(
        sim.run_until(Duration::from_secs(5), |s| {
            s.has_event(a, |e| matches!(e, NodeEvent::Introduced { .. }))
                && s.has_event(b, |e| matches!(e, NodeEvent::Introduced { .. }))
        }),
        "seed {seed}: not introduced"
    );
    let config = |s: u8| TransportConfig {
        rng_seed: [s; 32],
        ..TransportConfig::default()
    };
    let transports = [
        Transport::new(&id_a, config(1)).unwrap(),
        Transport::new(&id_b, config(2)).unwrap(),
    ];
    let mut w = World {
        sim,
        hosts: [a, b],
        transports,
        ids,
        paths: PathCount::default(),
    };

    // Connect right away: the first packets go over the relay.
    let now = w.sim.now();
    let ca = w.transports[0].connect(now, w.ids[1]).unwrap();
    let mut cb = None;
    for _ in 0..100_000 {
        while let Some(e) = w.transports[1].poll_event() {
            if let Event::Connected { conn, peer, .. } = e {
                assert_eq!(peer, w.ids[0]);
                cb = Some(conn);
            }
        }
        if cb.is_some() {
            break;
        }
        w.step(Duration::from_millis(5));
    }
    let cb = cb.unwrap_or_else(|| panic!("seed {seed}: no QUIC connection"));
    assert!(w.paths.relay > 0, "handshake should start on the relay");

    let data = {
        let mut x = 0x1234_5678_9abc_def0u64;
        (0..(6 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    let s = w.transports[0].open_stream(ca, Dir::Uni).unwrap().unwrap();
    let (mut sent, mut finished, mut rs) = (0, false, None);
    let mut received = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * 1024];
    let mut phase = 0;
    let mut relay_before_break = 0;
    let (pa, pb) = (w.sim.public_ip(a), w.sim.public_ip(b));
    for step in 0.. {
        assert!(
            step < 2_000_000,
            "seed {seed}: transfer stuck at {}",
            received.len()
        );
        while sent < data.len() {
            let n = w.transports[0].write(ca, s, &data[sent..]).unwrap();
            if n == 0 {
                break;
            }
            sent += n;
        }
        if sent == data.len() && !finished {
            w.transports[0].finish(ca, s).unwrap();
            finished = true;
        }
        if rs.is_none() {
            rs = w.transports[1].accept_stream(cb, Dir::Uni).unwrap();
        }
        let mut eof = false;
        if let Some(rs) = rs {
            loop {
                match w.transports[1].read(cb, rs, &mut buf).unwrap() {
                    StreamRead::Data(n) => received.extend_from_slice(&buf[..n]),
                    StreamRead::Blocked => break,
                    StreamRead::Finished => {
                        eof = true;
                        break;
                    }
                }
            }
        }
        for t in &mut w.transports {
            while let Some(e) = t.poll_event() {
                assert!(
                    !matches!(e, Event::ConnectionLost { .. }),
                    "seed {seed}: connection lost: {e:?}"
                );
            }
        }
        if eof {
            break;
        }
        let progress = received.len() as f64 / data.len() as f64;
        if phase == 0 && progress > 0.3 && w.paths.direct > 0 {
            // Break the direct path: the node must fall back to the relay.
            relay_before_break = w.paths.relay;
            w.sim.partitions.push((pa, pb));
            w.sim.partitions.push((pb, pa));
            phase = 1;
        } else if phase == 1 && progress > 0.8 {
            w.sim.partitions.clear();
            phase = 2;
        }
        w.step(Duration::from_millis(5));
    }
    eprintln!(
        "seed {seed}: {:?}, relay before break {relay_before_break}, phase {phase}, {:?} virtual",
        w.paths,
        w.sim.elapsed()
    );
    assert_eq!(received.len(), data.len());
    assert!(received == data, "seed {seed}: data corrupted");
    assert!(
        w.paths.direct > 0,
        "seed {seed}: never went direct: {:?}",
        w.paths
    );
    assert!(phase >= 1, "seed {seed}: direct path came too late");
    assert!(
        w.paths.relay > relay_before_break,
        "seed {seed}: no relay fallback: {:?}",
        w.paths
    );
    assert_eq!(w.transports[0].connections(w.ids[1]), vec![ca]);
}
