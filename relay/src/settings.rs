//! Command line and config file. CLI flags override the file; the file overrides defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use burrow::relay::Limits;
use clap::Parser;
use serde::Deserialize;

/// burrow's rendezvous, STUN and fallback relay server.
///
/// Serves STUN (RFC 8489, RFC 5780 with --alt-listen), node registration, introductions
/// and relayed traffic on one UDP+TCP port.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    /// UDP and TCP address to serve on (port 0: pick a free port and log it).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Alternate address for RFC 5780 NAT behaviour discovery (another IP and/or port).
    #[arg(long)]
    pub alt_listen: Option<SocketAddr>,
    /// TOML config file (see relay.example.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Access token a node must present to register (repeatable). Without any, registration
    /// is open. Prefer `tokens = [...]` in the config file: arguments are visible in `ps`.
    #[arg(long = "token")]
    pub tokens: Vec<String>,
    /// Serve Prometheus metrics over HTTP at this address, path /metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Kernel socket buffer size for the UDP sockets, bytes.
    #[arg(long)]
    pub udp_buffer_bytes: Option<usize>,
    /// Most TCP sessions at once.
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Most TCP sessions from one IP at once.
    #[arg(long)]
    pub max_sessions_per_ip: Option<usize>,
    /// Most registration attempts per IP per minute.
    #[arg(long)]
    pub registrations_per_ip_per_minute: Option<u32>,
    /// Most relay channels per session.
    #[arg(long)]
    pub max_channels_per_session: Option<usize>,
    /// Relay bandwidth per node, bytes per second.
    #[arg(long)]
    pub relay_bytes_per_sec: Option<u64>,
    /// Relay burst per node, bytes.
    #[arg(long)]
    pub relay_burst_bytes: Option<u64>,
    /// Bytes of relayed data queued toward one TCP connection before dropping.
    #[arg(long)]
    pub tcp_queue_bytes: Option<usize>,
    /// Bytes of relayed data queued toward all TCP connections together.
    #[arg(long)]
    pub max_total_queue_bytes: Option<usize>,
    /// `Connect`/`UpdateCandidates` messages per second per session.
    #[arg(long)]
    pub control_msgs_per_sec: Option<u32>,
    /// Largest TCP frame body accepted, bytes.
    #[arg(long)]
    pub max_frame_bytes: Option<usize>,
    /// Seconds without traffic before a session is closed.
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// Seconds a new connection has to register.
    #[arg(long)]
    pub handshake_timeout_secs: Option<u64>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Cli::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Cli::alt_listen`].
    pub alt_listen: Option<SocketAddr>,
    /// See [`Cli::metrics`].
    pub metrics: Option<SocketAddr>,
    /// See [`Cli::tokens`].
    pub tokens: Vec<String>,
    /// See [`Cli::udp_buffer_bytes`].
    pub udp_buffer_bytes: Option<usize>,
    /// The `[limits]` table.
    pub limits: Limits,
}

/// Everything the driver needs, merged: the library's server configuration.
pub type Settings = burrow::driver::relay::RelayServerConfig;

/// Default port: the IANA STUN port, so the relay doubles as a STUN server.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3478";

/// Loading the settings from the command line and the config file.
pub trait Load: Sized {
    /// Merges the file (if any) and the flags.
    fn load(cli: Cli) -> Result<Self, String>;
}

impl Load for Settings {
    fn load(cli: Cli) -> Result<Settings, String> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| format!("bad config file {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut limits = file.limits;
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = cli.$f { limits.$f = v; } )* };
        }
        over!(
            max_sessions,
            max_sessions_per_ip,
            registrations_per_ip_per_minute,
            max_channels_per_session,
            relay_bytes_per_sec,
            relay_burst_bytes,
            tcp_queue_bytes,
            max_total_queue_bytes,
            control_msgs_per_sec,
            max_frame_bytes,
            idle_timeout_secs,
            handshake_timeout_secs
        );
        limits.max_frame_bytes = limits
            .max_frame_bytes
            .min(burrow::wire::frame::MAX_FRAME_BODY);
        let listen = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let alt_listen = cli.alt_listen.or(file.alt_listen);
        if let Some(alt) = alt_listen {
            if alt.port() == 0 || listen.port() == 0 {
                return Err("--alt-listen needs fixed ports on both addresses".into());
            }
            if alt == listen {
                return Err("--alt-listen must differ from --listen".into());
            }
        }
        let tokens = if cli.tokens.is_empty() {
            file.tokens
        } else {
            cli.tokens
        };
        if tokens
            .iter()
            .any(|t| t.is_empty() || t.len() > burrow::wire::control::MAX_TOKEN_LEN)
        {
            return Err("tokens must be 1 to 256 bytes long".into());
        }
        Ok(Settings {
            listen,
            alt_listen,
            metrics: cli.metrics.or(file.metrics),
            tokens,
            udp_buffer_bytes: cli
                .udp_buffer_bytes
                .or(file.udp_buffer_bytes)
                .unwrap_or(4 * 1024 * 1024),
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_overrides_file() {
        let dir = std::env::temp_dir().join(format!("burrow-relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:4000\"\ntokens = [\"a\"]\n[limits]\nmax_sessions = 5\nidle_timeout_secs = 7\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "burrow-relay",
            "--config",
            path.to_str().unwrap(),
            "--max-sessions",
            "9",
            "--token",
            "b",
        ]);
        let s = Settings::load(cli).unwrap();
        assert_eq!(s.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(s.limits.max_sessions, 9);
        assert_eq!(s.limits.idle_timeout_secs, 7);
        assert_eq!(s.tokens, vec!["b".to_string()]);
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let cli = Cli::parse_from(["burrow-relay", "--config", path.to_str().unwrap()]);
        assert!(Settings::load(cli).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../relay.example.toml");
        toml::from_str::<FileConfig>(text).unwrap();
    }
}
