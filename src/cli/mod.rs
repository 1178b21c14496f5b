//! clap front end: parses arguments, builds a node, runs one command on it.

mod bench;
mod demo;
mod dial;
mod listen;
mod netcheck;
mod ping;
mod pipe;
mod send;
mod stdio;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use burrow::driver::node::{DriverConfig, NodeDriver};
use burrow::driver::portmap::PortMapSettings;
use burrow::identity::Identity;
use burrow::node::NodeConfig;
use burrow::transport::{Congestion, Transport, TransportConfig};
use burrow::wire::PeerId;
use clap::{Args, Parser, Subcommand};

/// Peer-to-peer connections through NAT: direct when possible, relayed when not.
#[derive(Parser, Debug)]
#[command(name = "burrow", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print this node's peer ID (creating the identity key on first use).
    Id {
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Discover the public address and NAT behaviour.
    Netcheck(netcheck::NetcheckArgs),
    /// Run a node that answers pings (and accepts connections), printing its peer ID first.
    Listen(listen::ListenArgs),
    /// Ping a peer, printing every pong with the path it took and its round-trip time.
    Ping(ping::PingArgs),
    /// Send files and directories to a listening peer (`burrow listen --out DIR`).
    Send(send::SendArgs),
    /// Connect stdin/stdout to a peer running `burrow listen --pipe` (netcat over P2P).
    Pipe(pipe::PipeArgs),
    /// Measure throughput to a listening peer, like iperf3.
    Bench(bench::BenchArgs),
    /// A relay and two nodes on 127.0.0.1 in this process: relay → direct, data, summary.
    Demo(demo::DemoArgs),
}

/// Where the identity key lives.
#[derive(Args, Debug, Clone)]
pub struct IdentityArgs {
    /// Identity key file (created 0600 on first use).
    #[arg(long, env = "BURROW_IDENTITY")]
    identity: Option<PathBuf>,
}

impl IdentityArgs {
    fn load(&self) -> Result<Identity, String> {
        let path = self.identity.clone().unwrap_or_else(Identity::default_path);
        Identity::load_or_create(&path).map_err(|e| e.to_string())
    }
}

/// `--congestion` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum CongestionArg {
    /// CUBIC (quinn's default).
    Cubic,
    /// quinn's experimental BBR.
    Bbr,
}

/// Options every networked command shares.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The relay, as HOST:PORT.
    #[arg(long, env = "BURROW_RELAY")]
    relay: String,
    /// Access token, if the relay requires one.
    #[arg(long, env = "BURROW_TOKEN")]
    token: Option<String>,
    /// Local UDP address to bind (IPv4).
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Local UDP address to bind for IPv6.
    #[arg(long, default_value = "[::]:0")]
    bind6: SocketAddr,
    /// Do not open an IPv6 socket.
    #[arg(long)]
    no_ipv6: bool,
    /// Extra STUN server (HOST:PORT), repeatable.
    #[arg(long = "stun")]
    stun: Vec<String>,
    /// Do not ask the router for a port mapping (PCP, NAT-PMP, UPnP IGD). Port mapping is
    /// also skipped when the relay is on loopback (a local setup).
    #[arg(long, env = "BURROW_NO_PORTMAP")]
    no_portmap: bool,
    /// Congestion control for QUIC: `cubic` (default) or `bbr` (quinn's experimental BBR:
    /// far faster on paths with random loss such as poor Wi-Fi, less fair to other flows).
    #[arg(long, env = "BURROW_CONGESTION", value_enum, default_value = "cubic")]
    congestion: CongestionArg,
    #[command(flatten)]
    identity: IdentityArgs,
}

fn resolve(what: &str, s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {what} {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} {s:?} resolves to no address"))
}

impl NodeArgs {
    /// The node driver plus a QUIC transport speaking as the same identity.
    fn build_with_transport(&self) -> Result<(NodeDriver, Transport), String> {
        let identity = self.identity.load()?;
        let driver = self.build()?;
        let mut config = TransportConfig::default();
        rand::fill(&mut config.rng_seed);
        config.congestion = match self.congestion {
            CongestionArg::Cubic => Congestion::Cubic,
            CongestionArg::Bbr => Congestion::Bbr,
        };
        // GSO batches where the socket supports them (one send per batch on a direct path).
        config.max_segments = driver.max_gso_segments();
        let transport = Transport::new(&identity, config)
            .map_err(|e| format!("cannot set up QUIC/TLS: {e}"))?;
        Ok((driver, transport))
    }

    fn build(&self) -> Result<NodeDriver, String> {
        let identity = self.identity.load()?;
        let relay = resolve("relay", &self.relay)?;
        let mut cfg = NodeConfig::new(identity, relay);
        cfg.token = self.token.clone();
        for s in &self.stun {
            cfg.stun_servers.push(resolve("STUN server", s)?);
        }
        let driver = DriverConfig {
            udp4: self.bind,
            udp6: (!self.no_ipv6).then_some(self.bind6),
        };
        let mut driver =
            NodeDriver::new(cfg, driver).map_err(|e| format!("cannot open sockets: {e}"))?;
        stop_on_signals(&mut driver);
        if !self.no_portmap && !relay.ip().is_loopback() {
            // Not fatal: the node works without a mapping (the status says why).
            if let Err(e) = driver.enable_port_mapping(PortMapSettings::default()) {
                tracing::debug!("no port mapping: {e}");
            }
        }
        Ok(driver)
    }
}

/// The stop flag of the one node driver a command runs, for the signal handler.
static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only async-signal-safe work: an atomic swap, and _exit on a second signal. The
    // reactor's poll returns EINTR and the loop sees the flag.
    if let Some(flag) = STOP.get()
        && flag.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// SIGINT / SIGTERM stop the driver's loop instead of killing the process, so that the
/// command finishes cleanly and dropping the driver deletes the router port mapping; a
/// second signal exits at once.
fn stop_on_signals(driver: &mut NodeDriver) {
    let (flag, _) = driver.stop_handle();
    if STOP.set(flag).is_err() {
        return;
    }
    // SAFETY: a plain sigaction with a handler that only does async-signal-safe work; no
    // SA_RESTART, so epoll_wait returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_stop_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub(crate) fn parse_peer(s: &str) -> Result<PeerId, String> {
    s.parse::<PeerId>()
        .map_err(|e| format!("bad peer ID {s:?}: {e}"))
}

/// Parses repeated `--allow PEER` values.
pub(crate) fn parse_allow(list: &[String]) -> Result<Vec<PeerId>, String> {
    list.iter().map(|s| parse_peer(s)).collect()
}

/// How a path reads in summaries.
pub(crate) fn describe_path(path: &burrow::node::PathKind) -> String {
    match path {
        burrow::node::PathKind::Direct(a) => format!("direct {a}"),
        other => format!("via {}", other.name()),
    }
}

pub(crate) fn fmt_rtt(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the command line; errors are printed as one clear line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Id { identity } => identity.load().map(|id| {
            println!("{}", id.peer_id());
            ExitCode::SUCCESS
        }),
        Command::Netcheck(args) => netcheck::run(args),
        Command::Listen(args) => listen::run(args),
        Command::Ping(args) => ping::run(args),
        Command::Send(args) => send::run(args),
        Command::Pipe(args) => pipe::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("burrow: {msg}");
            ExitCode::FAILURE
        }
    }
}
