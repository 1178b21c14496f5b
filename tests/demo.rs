//! `burrow demo` (the README's first command) works: relay → direct, data moved, summary.

use std::process::Command;

#[test]
fn demo_goes_relay_then_direct_and_prints_a_summary() {
    let out = Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["demo", "--relay-seconds", "1", "--direct-seconds", "1"])
        .output()
        .expect("run burrow demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("QUIC connected via relay-udp"), "{stdout}");
    assert!(stdout.contains("path: direct 127.0.0.1:"), "{stdout}");
    assert!(
        stdout.contains("(1 handshake), path changes: relay-udp → direct"),
        "{stdout}"
    );
    // The summary table has one row per path, each with data moved.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" MB/s ") && l.trim_end().ends_with(" MB"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].contains("via relay-udp") && rows[1].contains("direct 127.0.0.1:"));
    for row in rows {
        let moved: f64 = row
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!(moved > 0.0, "no data on {row}");
    }
}
