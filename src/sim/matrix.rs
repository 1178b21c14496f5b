//! The NAT matrix: every pair of NAT types × loss levels, against an expected outcome table.
//!
//! Run `cargo test --lib sim::matrix -- --nocapture` to see the table with time-to-direct in
//! RTTs between the two nodes.

use super::scenario::{PairOutcome, run_pair};
use super::*;
use crate::node::PathKind;

/// The NAT types of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    NoNat,
    FullCone,
    Restricted,
    PortRestricted,
    Masquerade,
    SymRandom,
    SymSequential,
    UdpBlocked,
}

pub(crate) const KINDS: [Kind; 8] = [
    Kind::NoNat,
    Kind::FullCone,
    Kind::Restricted,
    Kind::PortRestricted,
    Kind::Masquerade,
    Kind::SymRandom,
    Kind::SymSequential,
    Kind::UdpBlocked,
];

impl Kind {
    fn nat(self) -> Option<NatConfig> {
        Some(match self {
            Kind::NoNat => return None,
            Kind::FullCone => NatConfig::full_cone(),
            Kind::Restricted => NatConfig::restricted_cone(),
            Kind::PortRestricted => NatConfig::port_restricted(),
            Kind::Masquerade => NatConfig::bare_masquerade(),
            Kind::SymRandom => NatConfig::symmetric_random(),
            Kind::SymSequential => NatConfig::symmetric_sequential(),
            Kind::UdpBlocked => NatConfig::udp_blocked(),
        })
    }

    fn short(self) -> &'static str {
        match self {
            Kind::NoNat => "none",
            Kind::FullCone => "eim-eif",
            Kind::Restricted => "eim-adf",
            Kind::PortRestricted => "eim-apdf",
            Kind::Masquerade => "masq",
            Kind::SymRandom => "sym-rand",
            Kind::SymSequential => "sym-seq",
            Kind::UdpBlocked => "no-udp",
        }
    }

    fn hard(self) -> bool {
        matches!(self, Kind::SymRandom | Kind::SymSequential)
    }
}

/// Expected path name on each side.
pub(crate) fn expected(a: Kind, b: Kind) -> (&'static str, &'static str) {
    let relay = |k: Kind| {
        if k == Kind::UdpBlocked {
            "relay-tcp"
        } else {
            "relay-udp"
        }
    };
    if a == Kind::UdpBlocked || b == Kind::UdpBlocked {
        return (relay(a), relay(b));
    }
    let direct = match (a.hard(), b.hard()) {
        (false, false) => true,
        (true, true) => false,
        // One hard side: the birthday spray (256 sockets there, up to 2,048 probed ports
        // here; prediction first for sequential allocation) goes direct, except against a
        // bare masquerade with random ports: the hard side's 256 probes arrive first and
        // leave conntrack clash entries on exactly the ports the easy side must then probe.
        // Loss can spare some of them, so that pair may go either way.
        (true, false) => {
            if b == Kind::Masquerade && a == Kind::SymRandom {
                return ("either", "either");
            }
            true
        }
        (false, true) => {
            if a == Kind::Masquerade && b == Kind::SymRandom {
                return ("either", "either");
            }
            true
        }
    };
    if direct {
        ("direct", "direct")
    } else {
        (relay(a), relay(b))
    }
}

pub(crate) fn run_cell(seed: u64, a: Kind, b: Kind, loss: f64) -> PairOutcome {
    run_pair(seed, a.nat(), b.nat(), loss)
}

fn name(p: Option<PathKind>) -> &'static str {
    p.map_or("none", |p| p.name())
}

#[test]
fn nat_matrix() {
    let losses = [0.0, 0.05, 0.20];
    let mut failures = Vec::new();
    let mut table = String::new();
    for (li, &loss) in losses.iter().enumerate() {
        table += &format!(
            "\nloss {:.0} %: rows = A's NAT, columns = B's NAT; cell = outcome (RTTs to direct)\n{:>10}",
            loss * 100.0,
            ""
        );
        for b in KINDS {
            table += &format!("{:>14}", b.short());
        }
        table += "\n";
        for (ai, a) in KINDS.into_iter().enumerate() {
            table += &format!("{:>10}", a.short());
            for (bi, b) in KINDS.into_iter().enumerate() {
                let seed = 0xB0_0000 + (li * 100 + ai * 10 + bi) as u64;
                let r = run_cell(seed, a, b, loss);
                let (ea, eb) = expected(a, b);
                let cell = match (r.rtts_to_direct, name(r.path_a)) {
                    (Some(t), "direct") => format!("direct {t:.1}"),
                    (_, n) => n.to_string(),
                };
                table += &format!("{cell:>14}");
                // Data must flow both ways: at 20 % loss a relayed datagram crosses two
                // lossy legs (64 %, 32 of 50 expected), so demand a quarter, and everything at 0 %.
                let need = if loss == 0.0 { r.sent } else { r.sent / 4 };
                let path_ok = |got: &str, want: &str| {
                    got == want || (want == "either" && (got == "direct" || got == "relay-udp"))
                };
                if !path_ok(name(r.path_a), ea)
                    || !path_ok(name(r.path_b), eb)
                    || r.got_a < need
                    || r.got_b < need
                {
                    failures.push(format!(
                        "seed {seed:#x}: {a:?} x {b:?} at {:.0} % loss: paths {}/{} (want {ea}/{eb}), received {}/{} of {} each way",
                        loss * 100.0,
                        name(r.path_a),
                        name(r.path_b),
                        r.got_a,
                        r.got_b,
                        r.sent
                    ));
                }
            }
            table += "\n";
        }
    }
    eprintln!("{table}");
    assert!(
        failures.is_empty(),
        "{} cells failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
