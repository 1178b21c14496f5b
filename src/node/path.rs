//! Path choice: which way one outgoing datagram to a peer goes.
//!
//! Preference: a confirmed direct path; else the relay over UDP (8-byte
//! [`crate::wire::relay_data`] header with the introduction's channel) while UDP to the relay
//! works; else the same packet as a frame on the TCP control session. The choice is made per
//! datagram, so the layer above sees one continuous pipe while the path underneath moves.

use std::net::SocketAddr;

use serde::Serialize;

/// The path a datagram took or will take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case", tag = "path", content = "remote")]
pub enum PathKind {
    /// Relayed over UDP.
    RelayUdp,
    /// Relayed over the TCP control session.
    RelayTcp,
    /// Straight to the peer's address.
    Direct(SocketAddr),
}

impl PathKind {
    /// `relay-udp`, `relay-tcp` or `direct` (the `burrow ping --json` spelling).
    pub fn name(&self) -> &'static str {
        match self {
            PathKind::RelayUdp => "relay-udp",
            PathKind::RelayTcp => "relay-tcp",
            PathKind::Direct(_) => "direct",
        }
    }

    /// The remote address of a direct path.
    pub fn remote(&self) -> Option<SocketAddr> {
        match self {
            PathKind::Direct(a) => Some(*a),
            _ => None,
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathKind::RelayUdp => f.write_str("via relay udp"),
            PathKind::RelayTcp => f.write_str("via relay tcp"),
            PathKind::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

/// What the path choice needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PathInputs {
    /// The confirmed direct path's remote address.
    pub direct: Option<SocketAddr>,
    /// The peer has a relay channel (an introduction is live).
    pub has_channel: bool,
    /// Registered with the relay.
    pub relay_registered: bool,
    /// UDP to the relay works.
    pub relay_udp: bool,
}

/// The path for the next datagram, `None` when there is no way to the peer right now.
pub(crate) fn choose(i: PathInputs) -> Option<PathKind> {
    if let Some(a) = i.direct {
        return Some(PathKind::Direct(a));
    }
    if !i.has_channel || !i.relay_registered {
        return None;
    }
    Some(if i.relay_udp {
        PathKind::RelayUdp
    } else {
        PathKind::RelayTcp
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_order() {
        let d: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let base = PathInputs {
            direct: None,
            has_channel: true,
            relay_registered: true,
            relay_udp: true,
        };
        assert_eq!(choose(base), Some(PathKind::RelayUdp));
        assert_eq!(
            choose(PathInputs {
                relay_udp: false,
                ..base
            }),
            Some(PathKind::RelayTcp)
        );
        assert_eq!(
            choose(PathInputs {
                direct: Some(d),
                relay_registered: false,
                ..base
            }),
            Some(PathKind::Direct(d))
        );
        assert_eq!(
            choose(PathInputs {
                relay_registered: false,
                ..base
            }),
            None
        );
        assert_eq!(PathKind::Direct(d).to_string(), "direct 192.0.2.1:1");
        assert_eq!(PathKind::RelayTcp.name(), "relay-tcp");
    }
}
