//! The NAT lab: the real `burrow-relay` and `burrow` binaries behind real Linux NAT
//! (network namespaces + nftables; see `tests/natlab/lab.rs` for the topology).
//!
//! Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN). Without it every test prints a skip reason
//! and passes, unless BURROW_REQUIRE_NETNS=1 (CI), where not being able to run is a failure.
//!
//! Reproduce the results table (tests/natlab/RESULTS.md):
//! `BURROW_NATLAB_RESULTS=tests/natlab/RESULTS.md cargo test --release --workspace --test natlab -- --nocapture`
//!
//! Knobs: BURROW_NATLAB_JOBS (concurrent matrix cells, default 3), BURROW_NATLAB_ONLY (run
//! only the matrix cells whose name contains this, e.g. "eim × eim"), BURROW_NATLAB_LOG
//! (RUST_LOG of the binaries, default info), BURROW_TEST_LOG=1 (echo every process line).

#[path = "natlab/lab.rs"]
mod lab;

use std::sync::Mutex;
use std::time::Duration;

use lab::{Kind, Lab, SiteSpec};

/// The NAT kinds of the pair matrix (issue 5): every unordered pair, same-type included.
const MATRIX: [Kind; 6] = [
    Kind::Public,
    Kind::Eim,
    Kind::EimFw,
    Kind::Sym,
    Kind::UdpBlocked,
    Kind::Double,
];

/// The path the pinger must end on, with the reason. Theory only ("what simple UDP hole
/// punching allows", with the node's current techniques: simultaneous probes to every
/// candidate, peer-reflexive candidates, sequential-port prediction, no birthday probing):
///
/// * udp-blocked anywhere: no UDP leaves that site, so the pinger (always the udp-blocked
///   side, see [`cells`]) can only use the relay's TCP forwarding: `relay-tcp`.
/// * public × anything with UDP: the public host accepts every source and answers a probe's
///   peer-reflexive source (RFC 8445 7.3.1.3), so the NATed side's own outbound probe opens
///   the path: `direct`. This includes sym: its mapping toward the public host is a new
///   random port, but the public side learns it from the probe itself.
/// * EIM (eim, eim-fw, double = bare EIM CGNAT + eim-fw home router, which composes to
///   EIM) × EIM: both reflexive addresses are valid toward the peer; simultaneous probes
///   open both filters: `direct`. On bare masquerade this needs the node to beat (or
///   recover from) the conntrack clash (DESIGN.md), which is exactly what the cell tests.
/// * sym × EIM: the sym side's mapping toward the peer is a fresh random port the EIM side
///   cannot know, and the EIM side's address-and-port-dependent filter drops probes from any
///   port it did not send to. Only birthday-paradox probing would get through (not
///   implemented; `masquerade random` ports are not sequential, so prediction cannot help):
///   `relay-udp`.
/// * sym × sym: neither side can predict the other's mapping: `relay-udp`.
fn expected(a: Kind, b: Kind) -> &'static str {
    use Kind::*;
    if a == UdpBlocked || b == UdpBlocked {
        return "relay-tcp";
    }
    let eim_like = |k: Kind| matches!(k, Eim | EimFw | Double);
    let sym = |k: Kind| matches!(k, Sym | SymFw);
    match (a, b) {
        (Public, _) | (_, Public) => "direct",
        (x, y) if eim_like(x) && eim_like(y) => "direct",
        (x, y) if sym(x) || sym(y) => "relay-udp",
        _ => unreachable!("every kind is covered"),
    }
}

/// Cells that fail because of a node bug (not a lab bug): they still run and are reported
/// (with their logs), but do not fail the test. Keyed by [`Cell::name`]. The expectation
/// above stays honest; remove an entry once the node is fixed (a listed cell that passes is
/// reported as "now passes" rather than failing, since a race can let it through).
///
/// The conntrack clash (DESIGN.md, "bare Linux masquerade"): the two introductions reach
/// the nodes ~0.5 ms apart, so the earlier side's first probe reaches the later side's
/// router before the later side's own first outbound packet. If that router is a bare
/// masquerade (eim, or the CGNAT of double) the clash below follows: with bare routers at
/// both ends it always hits the later side (eim × eim, eim × double, double × double fail
/// every run); with one bare end it hits when the bare end is the later one (eim × eim-fw,
/// eim-fw × double fail in roughly half of the runs). The router answers ICMP port-unreachable and confirms the conntrack entry
/// `peer:P -> router:Q`; the local node's outbound to `peer:P` from the same port then
/// cannot reuse port Q and is remapped (seen: 51995 -> 12079), so the peer's filter drops
/// it. The node retries after 10 s on the same poisoned port, and the peer's own probes keep
/// refreshing the unreplied entry, so it never recovers. Needs an RTT-synchronised start
/// and/or retrying from fresh local ports.
const KNOWN_NODE_BUGS: &[(&str, &str)] = &[
    ("eim × eim", CLASH),
    ("eim × eim-fw", CLASH_RACE),
    ("eim × double", CLASH),
    ("eim-fw × double", CLASH_RACE),
    ("double × double", CLASH),
    ("eim × eim (10 % loss)", CLASH),
];

const CLASH: &str = "conntrack clash on bare masquerade at both ends: no synchronised start, retries reuse the poisoned port";
const CLASH_RACE: &str = "conntrack clash on the bare-masquerade end when its introduction arrives later (racy): no synchronised start, retries reuse the poisoned port";

/// One matrix cell: listener site, pinger site, loss on both routers, "same NAT" flag.
#[derive(Debug, Clone)]
struct Cell {
    listener: Kind,
    pinger: Kind,
    loss: u8,
    same: bool,
}

impl Cell {
    fn name(&self) -> String {
        let mut n = if self.same {
            format!("same ({} LAN)", self.listener.name())
        } else {
            format!("{} × {}", self.listener.name(), self.pinger.name())
        };
        if self.loss > 0 {
            n.push_str(&format!(" ({} % loss)", self.loss));
        }
        n
    }

    fn expected(&self) -> &'static str {
        if self.same {
            // Both hosts on one LAN: host candidates reach each other directly.
            "direct"
        } else {
            expected(self.listener, self.pinger)
        }
    }

    fn known_bug(&self) -> Option<&'static str> {
        let name = self.name();
        KNOWN_NODE_BUGS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, why)| *why)
    }
}

/// Every unordered pair of [`MATRIX`] plus `same`. The udp-blocked side always pings, so
/// the reported path is the one the UDP-less node uses.
fn cells() -> Vec<Cell> {
    let mut v = Vec::new();
    for (i, &a) in MATRIX.iter().enumerate() {
        for &b in &MATRIX[i..] {
            let (listener, pinger) = if a == Kind::UdpBlocked {
                (b, a)
            } else {
                (a, b)
            };
            v.push(Cell {
                listener,
                pinger,
                loss: 0,
                same: false,
            });
        }
    }
    v.push(Cell {
        listener: Kind::Eim,
        pinger: Kind::Eim,
        loss: 0,
        same: true,
    });
    v
}

/// What one cell did.
#[derive(Debug)]
struct Outcome {
    cell: Cell,
    expected: &'static str,
    got: String,
    remote: String,
    /// Seq and time since the first pong of the first direct pong.
    direct_at: Option<(u64, Duration)>,
    ok: bool,
    known_bug: Option<&'static str>,
    log: String,
}

fn run_cell(cell: &Cell) -> Outcome {
    let (lab, listener_ns, pinger_ns) = if cell.same {
        let lab = Lab::new(&[SiteSpec {
            kind: cell.listener,
            hosts: 2,
            loss: cell.loss,
        }]);
        let (l, p) = (lab.host(0, 0).to_string(), lab.host(0, 1).to_string());
        (lab, l, p)
    } else {
        let spec = |kind| SiteSpec {
            kind,
            hosts: 1,
            loss: cell.loss,
        };
        let lab = Lab::new(&[spec(cell.listener), spec(cell.pinger)]);
        let (l, p) = (lab.host(0, 0).to_string(), lab.host(1, 0).to_string());
        (lab, l, p)
    };
    let relay = lab.start_relay();
    let listener = lab.listen(&listener_ns, "listener");
    let expected = cell.expected();
    let ping = if expected == "direct" {
        // Stop at the first direct pong; bounded by --timeout (a hang guard, not a timing
        // assertion: loss cells get more room).
        let timeout = if cell.loss > 0 { 40 } else { 20 };
        lab.ping(
            &pinger_ns,
            "pinger",
            &listener.peer,
            &["--until-direct", "--count", "1000", "--interval", "0.2"],
            timeout,
        )
    } else {
        // Watch a relayed pair for a while (it must not claim a direct path either).
        lab.ping(
            &pinger_ns,
            "pinger",
            &listener.peer,
            &["--count", "12", "--interval", "0.5"],
            30,
        )
    };
    let got = ping.final_path().to_string();
    let first_at = ping.pongs.first().map(|p| p.at).unwrap_or_default();
    let direct_at = ping
        .first_direct()
        .map(|p| (p.seq, p.at.saturating_sub(first_at)));
    let ok = ping.success && got == expected && (expected == "direct" || direct_at.is_none());
    let pongs: Vec<String> = ping
        .pongs
        .iter()
        .map(|p| {
            format!(
                "seq {} {} {} rtt {:.2} ms at {:.2} s",
                p.seq,
                p.path,
                p.remote,
                p.rtt_ms,
                p.at.as_secs_f64()
            )
        })
        .collect();
    let mut log = format!(
        "--- ping stderr ---\n{}\n--- pongs ---\n{}\n--- listener stderr ---\n{}\n",
        ping.stderr,
        pongs.join("\n"),
        listener.proc.stderr_text()
    );
    if !ok {
        log.push_str(&format!("--- relay stderr ---\n{}\n", relay.stderr_text()));
        for routers in &lab.routers {
            for r in routers {
                log.push_str(&format!(
                    "--- ruleset of {r} ---\n{}\n--- UDP conntrack of {r} ---\n{}\n",
                    lab.ruleset(r),
                    lab.conntrack_udp(r)
                ));
            }
        }
    }
    Outcome {
        cell: cell.clone(),
        expected,
        got,
        remote: ping
            .pongs
            .last()
            .map(|p| p.remote.clone())
            .unwrap_or_default(),
        direct_at,
        ok,
        known_bug: cell.known_bug(),
        log,
    }
}

/// Runs cells on a few worker threads (each cell has its own namespaces, so cells never
/// share a NAT or a conntrack table).
fn run_cells(cells: Vec<Cell>) -> Vec<Outcome> {
    let jobs: usize = std::env::var("BURROW_NATLAB_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let queue = Mutex::new(cells.into_iter().enumerate().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap().pop();
                    let Some((i, cell)) = next else { break };
                    let out = std::panic::catch_unwind(|| run_cell(&cell)).unwrap_or_else(|e| {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Outcome {
                            expected: cell.expected(),
                            got: "error".into(),
                            remote: String::new(),
                            direct_at: None,
                            ok: false,
                            known_bug: cell.known_bug(),
                            log: format!("cell panicked: {msg}"),
                            cell,
                        }
                    });
                    eprintln!(
                        "natlab: {} -> {} (expected {})",
                        out.cell.name(),
                        out.got,
                        out.expected
                    );
                    results.lock().unwrap().push((i, out));
                }
            });
        }
    });
    let mut v = results.into_inner().unwrap();
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, o)| o).collect()
}

/// The results as a Markdown table.
fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| pair (listener × pinger) | expected | final path | first direct pong (seq, time after first pong) | result |\n|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let direct = match o.direct_at {
            Some((seq, d)) => format!("seq {seq}, {:.2} s", d.as_secs_f64()),
            None => "-".into(),
        };
        let result = match (o.ok, o.known_bug) {
            (true, _) => "ok".to_string(),
            (false, Some(why)) => format!("KNOWN NODE BUG: {why}"),
            (false, None) => "FAIL".to_string(),
        };
        t.push_str(&format!(
            "| {} | {} | {} ({}) | {} | {} |\n",
            o.cell.name(),
            o.expected,
            o.got,
            if o.remote.is_empty() { "-" } else { &o.remote },
            direct,
            result
        ));
    }
    t
}

/// Prints the table, writes it to BURROW_NATLAB_RESULTS (appending a section) when set,
/// and fails on any unexpected outcome.
fn report(title: &str, outcomes: &[Outcome]) {
    let t = table(outcomes);
    eprintln!("\n{title}\n{t}");
    if let Ok(path) = std::env::var("BURROW_NATLAB_RESULTS") {
        results_file_section(&path, title, &t);
    }
    let mut failures = Vec::new();
    for o in outcomes {
        match (o.ok, o.known_bug) {
            (true, Some(why)) => eprintln!(
                "natlab: NOW PASSES: {} is listed as a known node bug ({why}); remove it from KNOWN_NODE_BUGS if it keeps passing",
                o.cell.name()
            ),
            (false, None) => failures.push(format!(
                "{}: expected {}, got {}\n{}",
                o.cell.name(),
                o.expected,
                o.got,
                o.log
            )),
            (false, Some(why)) => eprintln!(
                "natlab: {} is a known node bug ({why}); log:\n{}",
                o.cell.name(),
                o.log
            ),
            (true, None) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Replaces (or adds) the section `## title` of the results file.
fn results_file_section(path: &str, title: &str, body: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let header = format!("## {title}\n");
    let mut out = String::new();
    let mut skipping = false;
    for line in old.lines() {
        if line.starts_with("## ") {
            skipping = line.trim_end() == header.trim_end();
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    out.push_str(&header);
    out.push('\n');
    out.push_str(body);
    std::fs::write(path, out).expect("write the results file");
}

#[test]
fn pair_matrix() {
    if !lab::lab_available() {
        return;
    }
    let only = std::env::var("BURROW_NATLAB_ONLY").unwrap_or_default();
    let cells = cells()
        .into_iter()
        .filter(|c| c.name().contains(&only))
        .collect();
    let outcomes = run_cells(cells);
    report("Pair matrix", &outcomes);
}

#[test]
fn loss_ten_percent_still_goes_direct() {
    if !lab::lab_available() {
        return;
    }
    let cells = [Kind::EimFw, Kind::Eim]
        .into_iter()
        .map(|k| Cell {
            listener: k,
            pinger: k,
            loss: 10,
            same: false,
        })
        .collect();
    let outcomes = run_cells(cells);
    report("10 % UDP loss on both routers", &outcomes);
}

/// `burrow netcheck --timeout`: behind udp-blocked every STUN request must time out first
/// (RFC 8489 Rc = 7, RTO 500 ms doubling: 39.5 s), so the CLI default (20 s) is too short.
const NETCHECK_TIMEOUT: u64 = 60;

#[test]
fn netcheck_sees_each_nat_kind() {
    if !lab::lab_available() {
        return;
    }
    let kinds = [
        Kind::Public,
        Kind::Eim,
        Kind::EimFw,
        Kind::Sym,
        Kind::SymFw,
        Kind::UdpBlocked,
        Kind::Double,
    ];
    let lab = Lab::new(&kinds.map(SiteSpec::new));
    let _relay = lab.start_relay();
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..kinds.len())
            .map(|i| {
                let lab = &lab;
                s.spawn(move || lab.netcheck(lab.host(i, 0), &format!("nc{i}"), NETCHECK_TIMEOUT))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    let mut t = String::from(
        "| site | udp | mapping | port allocation | public address |\n|---|---|---|---|---|\n",
    );
    for (kind, report) in kinds.iter().zip(&reports) {
        let v = match report {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{}: {e}", kind.name()));
                continue;
            }
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            kind.name(),
            v["udp"],
            v["mapping"].as_str().unwrap_or("?"),
            v["port_allocation"].as_str().unwrap_or("?"),
            v["public_addr"].as_str().unwrap_or("-"),
        ));
        let (udp, mapping) = match kind {
            Kind::Public => (true, Some("no-nat")),
            Kind::Eim | Kind::EimFw | Kind::Double => (true, Some("endpoint-independent")),
            Kind::Sym | Kind::SymFw => (true, Some("endpoint-dependent")),
            Kind::UdpBlocked => (false, None),
        };
        if v["udp"] != udp || mapping.is_some_and(|m| v["mapping"] != m) {
            failures.push(format!(
                "{}: expected udp={udp} mapping={mapping:?}, got {v}",
                kind.name()
            ));
        }
    }
    eprintln!("\nnetcheck\n{t}");
    if let Ok(path) = std::env::var("BURROW_NATLAB_RESULTS") {
        results_file_section(&path, "netcheck", &t);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn relay_restart_mid_session() {
    if !lab::lab_available() {
        return;
    }
    let lab = Lab::new(&[SiteSpec::new(Kind::EimFw), SiteSpec::new(Kind::EimFw)]);
    let mut relay = lab.start_relay();
    let listener = lab.listen(lab.host(0, 0), "listener");
    let first = lab.ping(
        lab.host(1, 0),
        "pinger",
        &listener.peer,
        &["--until-direct", "--count", "1000", "--interval", "0.2"],
        20,
    );
    assert!(first.success, "first ping: {first:#?}");
    // Kill the relay and start a new one on the same addresses: the listener must notice
    // and register again by itself.
    relay.kill();
    listener
        .proc
        .wait_stderr("relay connection lost", lab::WAIT);
    relay = lab.start_relay();
    listener
        .proc
        .wait_stderr("registered", Duration::from_secs(90));
    let again = lab.ping(
        lab.host(1, 0),
        "pinger2",
        &listener.peer,
        &["--count", "3", "--interval", "0.2"],
        30,
    );
    assert!(
        again.success && again.pongs.len() == 3,
        "ping after the relay restart: {again:#?}\nlistener:\n{}",
        listener.proc.stderr_text()
    );
    drop(relay);
}
