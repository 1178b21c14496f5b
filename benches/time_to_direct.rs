//! Connection setup in the simulator (issue 6): over many seeded runs per NAT pair and loss
//! level, the time from `connect` to
//!
//! * the first byte at the peer via the relay: A sends one QUIC-looking datagram the moment
//!   its introduction arrives (the earliest an application can), measured until B's node
//!   hands it over; in relay round trips, the relay RTT being the pong of a `ping` A sends at
//!   the same moment over the relay path (same run);
//! * both sides on the direct path, in RTTs between the nodes (A 20 ms from the core, B
//!   30 ms, the relay 10 ms: direct RTT 100 ms, relay-path RTT ~140 ms plus jitter).
//!
//! Targets (issue 6): first byte within 1 relay RTT; direct within 3 RTTs at 0 % loss.
//!
//! `cargo bench --features sim --bench time_to_direct` (`RUNS=n` seeds per cell, default 200);
//! writes `target/bench-results/time_to_direct.json`.

use std::time::Duration;

use burrow::node::{NodeEvent, PathKind};
use burrow::sim::{NatConfig, Sim, scenario};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One run's measurements (None: did not happen within the run's bounds).
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    /// connect → first byte at B, in relay RTTs.
    first_byte_relay_rtts: Option<f64>,
    /// connect → first byte at B, in direct RTTs.
    first_byte_rtts: Option<f64>,
    /// connect → both direct, in direct RTTs.
    direct_rtts: Option<f64>,
}

fn run(seed: u64, nat_a: Option<NatConfig>, nat_b: Option<NatConfig>, loss: f64) -> Run {
    let (mut sim, ha, hb, rtt) = scenario::registered_pair(seed, nat_a, nat_b, loss);
    let rtt = rtt.as_secs_f64();
    let ida = sim.hosts[ha].peer_id();
    let idb = sim.hosts[hb].peer_id();
    let t0 = sim.elapsed();
    let events_before = sim.hosts[ha].events.len();
    let received_before = sim.hosts[hb].received.len();
    sim.with_node(ha, |n, now| n.connect(now, idb));
    let introduced = |s: &Sim| {
        s.hosts[ha].events[events_before..]
            .iter()
            .any(|(_, e)| matches!(e, NodeEvent::Introduced { peer, .. } if *peer == idb))
    };
    let mut out = Run::default();
    if !sim.run_until(Duration::from_secs(30), introduced) {
        return out;
    }
    // The earliest moment an application can send: the introduction's arrival.
    let mut first = vec![0x40u8];
    first.extend_from_slice(&[0x5A; 100]);
    let ping_seq = sim.with_node(ha, |n, now| {
        let _ = n.send_datagram(now, &idb, &first);
        n.ping(now, &idb).ok()
    });
    let both_direct = |s: &Sim| {
        matches!(
            s.hosts[ha].node.path(s.now(), &idb),
            Some(PathKind::Direct(_))
        ) && matches!(
            s.hosts[hb].node.path(s.now(), &ida),
            Some(PathKind::Direct(_))
        )
    };
    let mut first_at = None;
    let mut direct_at = None;
    sim.run_until(Duration::from_secs(60), |s| {
        if first_at.is_none() {
            first_at = s.hosts[hb].received[received_before..]
                .iter()
                .find(|(_, p, b)| *p == ida && b.first() == Some(&0x40))
                .map(|(t, _, _)| *t);
        }
        if direct_at.is_none() && both_direct(s) {
            direct_at = Some(s.elapsed());
        }
        let pong = s.hosts[ha].events[events_before..]
            .iter()
            .any(|(_, e)| matches!(e, NodeEvent::Pong { seq, .. } if Some(*seq) == ping_seq));
        first_at.is_some() && direct_at.is_some() && pong
    });
    let relay_rtt = sim.hosts[ha].events[events_before..]
        .iter()
        .find_map(|(_, e)| match e {
            NodeEvent::Pong { seq, path, rtt, .. }
                if Some(*seq) == ping_seq && !matches!(path, PathKind::Direct(_)) =>
            {
                Some(rtt.as_secs_f64())
            }
            _ => None,
        });
    if let Some(t) = first_at {
        let s = (t - t0).as_secs_f64();
        out.first_byte_rtts = Some(s / rtt);
        out.first_byte_relay_rtts = relay_rtt.map(|r| s / r);
    }
    out.direct_rtts = direct_at.map(|t| (t - t0).as_secs_f64() / rtt);
    out
}

fn stats(mut v: Vec<f64>) -> Option<(usize, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|x, y| x.total_cmp(y));
    Some((v.len(), percentile(&v, 0.5), percentile(&v, 0.99)))
}

fn main() {
    let runs: u64 = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let pairs: [(&str, Option<NatConfig>, Option<NatConfig>); 5] = [
        ("no NAT x no NAT", None, None),
        (
            "full cone x port-restricted",
            Some(NatConfig::full_cone()),
            Some(NatConfig::port_restricted()),
        ),
        (
            "port-restricted x port-restricted",
            Some(NatConfig::port_restricted()),
            Some(NatConfig::port_restricted()),
        ),
        (
            "masquerade x masquerade",
            Some(NatConfig::bare_masquerade()),
            Some(NatConfig::bare_masquerade()),
        ),
        (
            "restricted cone x symmetric",
            Some(NatConfig::restricted_cone()),
            Some(NatConfig::symmetric_random()),
        ),
    ];
    println!(
        "{:<34} {:>5} | {:>9} {:>6} {:>6} | {:>11} {:>6} {:>6}",
        "pair", "loss", "direct", "median", "p99", "first byte", "median", "p99"
    );
    println!(
        "{:<34} {:>5} | {:>9} {:>13} | {:>11} {:>13}",
        "", "", "runs", "(RTTs)", "runs", "(relay RTTs)"
    );
    let mut json = Vec::new();
    for (name, a, b) in pairs {
        for loss in [0.0, 0.05, 0.20] {
            let results: Vec<Run> = (0..runs)
                .map(|seed| run(0x7D_0000 + seed, a, b, loss))
                .collect();
            let direct = stats(results.iter().filter_map(|r| r.direct_rtts).collect());
            let first = stats(
                results
                    .iter()
                    .filter_map(|r| r.first_byte_relay_rtts)
                    .collect(),
            );
            let first_direct_rtts =
                stats(results.iter().filter_map(|r| r.first_byte_rtts).collect());
            let cell = |s: Option<(usize, f64, f64)>| match s {
                Some((n, m, p)) => format!("{:>5}/{runs} {m:>6.2} {p:>6.2}", n),
                None => format!("{:>5}/{runs} {:>6} {:>6}", 0, "-", "-"),
            };
            println!(
                "{name:<34} {:>4.0}% | {} | {:>2}{}",
                loss * 100.0,
                cell(direct),
                "",
                cell(first)
            );
            let j = |s: Option<(usize, f64, f64)>| {
                s.map(|(n, m, p)| serde_json::json!({"runs": n, "median": m, "p99": p}))
            };
            json.push(serde_json::json!({
                "pair": name,
                "loss": loss,
                "runs": runs,
                "direct_rtts": j(direct),
                "first_byte_relay_rtts": j(first),
                "first_byte_direct_rtts": j(first_direct_rtts),
            }));
        }
    }
    println!(
        "RTT = direct RTT between the nodes (100 ms); relay RTT = the pong of a relayed ping in the same run"
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let out = dir.join("time_to_direct.json");
    let doc = serde_json::json!({
        "bench": "time_to_direct",
        "latency_ms": {"a": 20, "b": 30, "relay": 10, "jitter_max": 2},
        "results": json,
    });
    match std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
}
