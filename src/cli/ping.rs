//! `burrow ping PEER`: like `tailscale ping`, one line per pong with its path and RTT.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::driver::node::NodeApp;
use burrow::node::{NodeCore, NodeEvent, PathKind};
use burrow::wire::PeerId;
use clap::Args;

use super::{NodeArgs, fmt_rtt, parse_peer};

/// `burrow ping` options.
#[derive(Args, Debug)]
pub struct PingArgs {
    /// The peer's ID (as printed by `burrow id` or `burrow listen`).
    peer: String,
    #[command(flatten)]
    node: NodeArgs,
    /// Stop after this many pongs.
    #[arg(long, short = 'c', default_value_t = 10)]
    count: u32,
    /// Seconds between pings.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Stop at the first pong over a direct path.
    #[arg(long)]
    until_direct: bool,
    /// One JSON object per pong (`seq`, `path`, `remote`, `rtt_ms`).
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// A ping counts as lost after this long without its pong.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

struct PingApp {
    peer: PeerId,
    relay: std::net::SocketAddr,
    count: u32,
    interval: Duration,
    until_direct: bool,
    json: bool,
    connected: bool,
    next_ping: Option<Instant>,
    outstanding: BTreeMap<u64, Instant>,
    pongs: u32,
    lost: u32,
    direct_seen: bool,
    error: Option<String>,
    started: bool,
}

impl PingApp {
    fn send_ping(&mut self, now: Instant, core: &mut NodeCore) {
        match core.ping(now, &self.peer) {
            Ok(seq) => {
                self.outstanding.insert(seq, now);
            }
            Err(e) => eprintln!("ping not sent: {e}"),
        }
        self.next_ping = Some(now + self.interval);
    }

    fn print_pong(&self, seq: u64, path: &PathKind, rtt: Duration) {
        let remote = path.remote().unwrap_or(self.relay);
        if self.json {
            let v = serde_json::json!({
                "seq": seq,
                "path": path.name(),
                "remote": remote.to_string(),
                "rtt_ms": rtt.as_secs_f64() * 1000.0,
            });
            println!("{v}");
        } else {
            let via = match path {
                PathKind::Direct(a) => format!("direct {a}"),
                other => format!("via {} {remote}", other.name()),
            };
            println!(
                "pong from {} seq={seq} {via} in {}",
                self.peer.short(),
                fmt_rtt(rtt)
            );
        }
    }
}

impl NodeApp for PingApp {
    fn on_event(&mut self, now: Instant, core: &mut NodeCore, event: NodeEvent) {
        match event {
            NodeEvent::Introduced { peer, .. } if peer == self.peer && !self.connected => {
                self.connected = true;
                self.send_ping(now, core);
            }
            NodeEvent::Pong {
                peer,
                seq,
                path,
                rtt,
            } if peer == self.peer => {
                if self.outstanding.remove(&seq).is_none() {
                    return; // late answer to a ping already counted as lost
                }
                self.pongs += 1;
                self.print_pong(seq, &path, rtt);
                if matches!(path, PathKind::Direct(_)) {
                    self.direct_seen = true;
                }
            }
            NodeEvent::ConnectFailed { peer, message, .. } if peer == self.peer => {
                self.error = Some(format!("cannot reach {peer}: {message}"));
            }
            NodeEvent::RelayError { code, message } => {
                self.error = Some(format!("relay refused us: {code:?}: {message}"));
            }
            NodeEvent::PeerGone { peer } if peer == self.peer => {
                eprintln!("peer {} left the relay", peer.short());
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore) {
        if !self.started {
            self.started = true;
            core.connect(now, self.peer);
        }
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, sent)| now.saturating_duration_since(**sent) >= PING_TIMEOUT)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            self.outstanding.remove(&seq);
            self.lost += 1;
            if !self.json {
                println!("timeout seq={seq}");
            }
        }
        if self.connected
            && !self.is_done()
            && self.pongs + self.lost + (self.outstanding.len() as u32) < self.count
            && self.next_ping.is_some_and(|t| t <= now)
        {
            self.send_ping(now, core);
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let oldest = self.outstanding.values().min().map(|t| *t + PING_TIMEOUT);
        [self.next_ping, oldest].into_iter().flatten().min()
    }

    fn is_done(&self) -> bool {
        self.error.is_some()
            || (self.until_direct && self.direct_seen)
            || (self.connected && self.pongs + self.lost >= self.count)
    }
}

pub fn run(args: PingArgs) -> Result<ExitCode, String> {
    let peer = parse_peer(&args.peer)?;
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err("--interval must be a positive number of seconds".into());
    }
    let relay = super::resolve("relay", &args.node.relay)?;
    let mut driver = args.node.build()?;
    if driver.core().peer_id() == peer {
        return Err("that is this node's own ID".into());
    }
    let mut app = PingApp {
        peer,
        relay,
        count: args.count.max(1),
        interval: Duration::from_secs_f64(args.interval),
        until_direct: args.until_direct,
        json: args.json,
        connected: false,
        next_ping: None,
        outstanding: BTreeMap::new(),
        pongs: 0,
        lost: 0,
        direct_seen: false,
        error: None,
        started: false,
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    driver
        .run(&mut app, Some(deadline))
        .map_err(|e| format!("network error: {e}"))?;
    if let Some(e) = app.error {
        return Err(e);
    }
    if !app.connected {
        return Err(format!(
            "no introduction to {} within {} s (is the relay reachable and the peer registered?)",
            peer, args.timeout
        ));
    }
    if app.pongs == 0 {
        return Err(format!("no pong from {}", peer.short()));
    }
    if args.until_direct && !app.direct_seen {
        return Err(format!(
            "no direct path to {} within {} s ({} pongs via the relay)",
            peer.short(),
            args.timeout,
            app.pongs
        ));
    }
    Ok(ExitCode::SUCCESS)
}
