//! Time-to-direct from the simulator: median and p99 (in RTTs between the two nodes) over
//! many seeded runs per NAT pair and loss level, plus how many runs went direct at all.
//!
//! `cargo bench --features sim --bench time_to_direct` (set `RUNS=n` to change the number
//! of seeds per cell; default 200).

use burrow::sim::NatConfig;
use burrow::sim::scenario::run_pair;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
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
        "{:<36} {:>6} {:>8} {:>8} {:>8}",
        "pair", "loss", "direct", "median", "p99"
    );
    for (name, a, b) in pairs {
        for loss in [0.0, 0.05, 0.20] {
            let mut t: Vec<f64> = (0..runs)
                .filter_map(|seed| run_pair(0x7D_0000 + seed, a, b, loss).rtts_to_direct)
                .collect();
            t.sort_by(|x, y| x.total_cmp(y));
            if t.is_empty() {
                println!(
                    "{name:<36} {:>5.0}% {:>8} {:>8} {:>8}",
                    loss * 100.0,
                    "0",
                    "-",
                    "-"
                );
                continue;
            }
            println!(
                "{name:<36} {:>5.0}% {:>5}/{runs} {:>7.1} {:>8.1}",
                loss * 100.0,
                t.len(),
                percentile(&t, 0.5),
                percentile(&t, 0.99)
            );
        }
    }
}
