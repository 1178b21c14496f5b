//! Relay configuration: addresses, access tokens, RNG seed and every limit.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the relay core needs to know before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The primary UDP/TCP address (RFC 5780 "A1:P1"). STUN answers and `Registered` refer
    /// to it; it must be the address the driver actually bound (not a port-0 request).
    pub listen: SocketAddr,
    /// The alternate address (RFC 5780 "A2:P2"), if the relay has one. With it the relay
    /// answers STUN on up to four sockets, see [`RelayConfig::udp_sockets`].
    pub alt_listen: Option<SocketAddr>,
    /// Accepted access tokens. Empty: registration is open to anyone holding a key.
    /// Non-empty: a `Register` without one of these gets `Error{Unauthorized}`; only STUN
    /// is served to others.
    pub tokens: Vec<String>,
    /// Seed of the core's ChaCha20 RNG (nonces, UDP tokens, channel IDs, punch nonces).
    /// The driver must draw it from the OS RNG in production: nonces and tokens must be
    /// unpredictable. Tests and the simulator pass a fixed seed.
    pub seed: u64,
    /// Resource limits.
    pub limits: Limits,
}

impl RelayConfig {
    /// A configuration with default limits, no tokens and no alternate address.
    pub fn new(listen: SocketAddr, seed: u64) -> Self {
        RelayConfig {
            listen,
            alt_listen: None,
            tokens: Vec::new(),
            seed,
            limits: Limits::default(),
        }
    }

    /// The UDP sockets the driver must bind, primary first.
    ///
    /// RFC 5780 section 4.1: a server supporting the discovery attributes has two IPs and
    /// two ports, A1:P1, A1:P2, A2:P1, A2:P2, and answers a CHANGE-REQUEST from the socket
    /// with the changed IP and/or port. When the alternate shares the IP (or the port) of the
    /// primary, the combinations collapse to fewer sockets; the core then cannot honour
    /// the corresponding change (see `RelayCore` docs).
    pub fn udp_sockets(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.listen];
        if let Some(alt) = self.alt_listen {
            for addr in [
                SocketAddr::new(self.listen.ip(), alt.port()),
                SocketAddr::new(alt.ip(), self.listen.port()),
                alt,
            ] {
                if !v.contains(&addr) {
                    v.push(addr);
                }
            }
        }
        v
    }
}

/// Resource limits. Every one has a counter in [`super::Metrics`] that counts its hits.
///
/// Serde-(de)serializable so the relay binary can read them from the `[limits]` table of its
/// TOML file; missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most TCP connections (registered or not) at once. Over it: `Error{TooManySessions}`.
    pub max_sessions: usize,
    /// Most TCP connections from one IP address at once.
    pub max_sessions_per_ip: usize,
    /// Most registration attempts from one IP address per minute (signature checks cost
    /// CPU, so attempts are counted before verifying).
    pub registrations_per_ip_per_minute: u32,
    /// Most relay channels one session may be an end of.
    pub max_channels_per_session: usize,
    /// Relay bandwidth one node may send, bytes per second (token bucket rate).
    pub relay_bytes_per_sec: u64,
    /// Token bucket depth: bytes one node may send in a burst.
    pub relay_burst_bytes: u64,
    /// Bytes of relayed data queued toward one TCP connection. Relayed data over it is
    /// dropped (and counted); control messages get [`Limits::control_headroom_bytes`] more,
    /// and a session that overflows even that is disconnected as `TooSlow`.
    pub tcp_queue_bytes: usize,
    /// Extra queue room for control messages beyond [`Limits::tcp_queue_bytes`].
    pub control_headroom_bytes: usize,
    /// Bytes queued toward all TCP connections together. Past it, relayed data toward TCP
    /// is dropped (counted as `queue_full`) whatever the per-connection room: it caps the
    /// relay's memory when many clients stop reading at once.
    pub max_total_queue_bytes: usize,
    /// `Connect` and `UpdateCandidates` per second one session may send (token bucket);
    /// each makes the relay send messages to other nodes, so unlimited they would let one
    /// node flood its peers' queues.
    pub control_msgs_per_sec: u32,
    /// Burst for [`Limits::control_msgs_per_sec`].
    pub control_msgs_burst: u32,
    /// Largest TCP frame body accepted (at most [`crate::wire::frame::MAX_FRAME_BODY`]).
    pub max_frame_bytes: usize,
    /// A session that sends nothing for this long is closed (`IdleTimeout`). Nodes are told
    /// to ping every third of it.
    pub idle_timeout_secs: u64,
    /// A connection that has not registered after this long is closed (`HandshakeTimeout`).
    pub handshake_timeout_secs: u64,
    /// STUN Binding requests answered per client (IPv4 address or IPv6 /64) per second; the
    /// rest are dropped. A 20-byte request earns a ~70-byte answer, so without a cap
    /// requests with a spoofed source would make the relay a reflector aimed at that
    /// source. A node asks a handful per minute.
    pub stun_per_ip_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_ip: 32,
            registrations_per_ip_per_minute: 60,
            max_channels_per_session: 64,
            relay_bytes_per_sec: 2_000_000,
            relay_burst_bytes: 512 * 1024,
            tcp_queue_bytes: 512 * 1024,
            control_headroom_bytes: 128 * 1024,
            max_total_queue_bytes: 256 * 1024 * 1024,
            control_msgs_per_sec: 10,
            control_msgs_burst: 40,
            max_frame_bytes: crate::wire::frame::MAX_FRAME_BODY,
            idle_timeout_secs: 90,
            handshake_timeout_secs: 10,
            stun_per_ip_per_second: 50,
        }
    }
}

impl Limits {
    /// [`Limits::idle_timeout_secs`] as a `Duration`.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }

    /// [`Limits::handshake_timeout_secs`] as a `Duration`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// The keepalive interval announced in `Registered`: a third of the idle timeout, so two
    /// lost pings do not end a session.
    pub fn keepalive_secs(&self) -> u16 {
        (self.idle_timeout_secs / 3).clamp(1, u16::MAX as u64) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_sockets_follow_rfc5780_combinations() {
        let mut c = RelayConfig::new("10.0.0.1:3478".parse().unwrap(), 0);
        assert_eq!(c.udp_sockets().len(), 1);
        c.alt_listen = Some("10.0.0.2:3479".parse().unwrap());
        let s: Vec<String> = c.udp_sockets().iter().map(|a| a.to_string()).collect();
        assert_eq!(
            s,
            [
                "10.0.0.1:3478",
                "10.0.0.1:3479",
                "10.0.0.2:3478",
                "10.0.0.2:3479"
            ]
        );
        c.alt_listen = Some("10.0.0.1:3479".parse().unwrap());
        assert_eq!(c.udp_sockets().len(), 2);
    }

    #[test]
    fn limits_parse_from_partial_toml() {
        let l: Limits = toml::from_str("max_sessions = 5").unwrap();
        assert_eq!(l.max_sessions, 5);
        assert_eq!(l.idle_timeout_secs, Limits::default().idle_timeout_secs);
        assert!(toml::from_str::<Limits>("bogus = 1").is_err());
    }
}
