//! `burrow listen`: a node that stays up, answers pings and reports who connects.

use std::process::ExitCode;
use std::time::Instant;

use burrow::driver::node::NodeApp;
use burrow::node::{NodeCore, NodeEvent, PathKind};
use clap::Args;

use super::NodeArgs;

/// `burrow listen` options.
#[derive(Args, Debug)]
pub struct ListenArgs {
    #[command(flatten)]
    node: NodeArgs,
}

struct ListenApp;

fn describe(path: &PathKind) -> String {
    match path {
        PathKind::Direct(a) => format!("direct {a}"),
        other => format!("via {}", other.name()),
    }
}

impl NodeApp for ListenApp {
    fn on_event(&mut self, _now: Instant, _core: &mut NodeCore, event: NodeEvent) {
        // stdout is the log a person or script reads; one line per event.
        match event {
            NodeEvent::Registered { observed_tcp } => {
                eprintln!("registered with the relay (seen as {observed_tcp})")
            }
            NodeEvent::RelayLost => eprintln!("relay connection lost; reconnecting"),
            NodeEvent::RelayError { code, message } => {
                eprintln!("relay refused us: {code:?}: {message}")
            }
            NodeEvent::Introduced { peer, .. } => eprintln!("peer {peer} connected"),
            NodeEvent::PathChanged { peer, path } => {
                eprintln!("peer {} path: {}", peer.short(), describe(&path))
            }
            NodeEvent::PeerGone { peer } => eprintln!("peer {} left", peer.short()),
            _ => {}
        }
    }

    fn on_tick(&mut self, _now: Instant, _core: &mut NodeCore) {}

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }

    fn is_done(&self) -> bool {
        false
    }
}

pub fn run(args: ListenArgs) -> Result<ExitCode, String> {
    let mut driver = args.node.build()?;
    // The first line of stdout is the peer ID, so scripts can read it.
    println!("{}", driver.core().peer_id());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    driver
        .run(&mut ListenApp, None)
        .map_err(|e| format!("network error: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
