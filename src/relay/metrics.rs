//! Relay counters as plain integers, and their Prometheus text exposition.
//!
//! The core bumps fields directly (no atomics: the relay is single-threaded); the driver
//! renders them on `GET /metrics` with [`Metrics::render_prometheus`].

use std::fmt::Write;

/// Every counter and gauge of the relay. Counters only grow; gauges are the current values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Gauge: TCP connections the core knows (any state).
    pub sessions: u64,
    /// Gauge: registered sessions.
    pub registered: u64,
    /// Gauge: open relay channels.
    pub channels: u64,
    /// Gauge: sessions with a bound UDP address.
    pub udp_bindings: u64,

    /// TCP connections accepted by the core.
    pub tcp_accepted: u64,
    /// Successful registrations.
    pub registrations: u64,
    /// Registrations refused for a bad signature.
    pub registrations_bad_signature: u64,
    /// Registrations refused for a missing or wrong token.
    pub registrations_unauthorized: u64,
    /// Sessions replaced by a new registration of the same ID.
    pub sessions_replaced: u64,
    /// Successful `UdpMsg::Bind`s.
    pub udp_binds: u64,
    /// `UdpMsg::Bind`s with an unknown token.
    pub udp_binds_rejected: u64,
    /// Introductions made (one per successful `Connect`).
    pub introductions: u64,
    /// `Connect`s that failed (unknown peer, self, channel limit).
    pub connects_failed: u64,
    /// Pings answered.
    pub pings: u64,

    /// STUN Binding requests received (well-formed).
    pub stun_requests: u64,
    /// STUN success responses sent.
    pub stun_responses: u64,
    /// STUN error responses sent (420, unhonourable CHANGE-REQUEST).
    pub stun_errors: u64,

    /// Relayed packets, UDP in → UDP out.
    pub relayed_packets_udp_udp: u64,
    /// Relayed packets, UDP in → TCP out.
    pub relayed_packets_udp_tcp: u64,
    /// Relayed packets, TCP in → UDP out.
    pub relayed_packets_tcp_udp: u64,
    /// Relayed packets, TCP in → TCP out.
    pub relayed_packets_tcp_tcp: u64,
    /// Relayed bytes (whole relay packets, header included) per path as above.
    pub relayed_bytes_udp_udp: u64,
    /// See `relayed_bytes_udp_udp`.
    pub relayed_bytes_udp_tcp: u64,
    /// See `relayed_bytes_udp_udp`.
    pub relayed_bytes_tcp_udp: u64,
    /// See `relayed_bytes_udp_udp`.
    pub relayed_bytes_tcp_tcp: u64,

    /// UDP buffers that arrived as a GRO batch (several datagrams from one sender in one
    /// buffer), and the datagrams they held.
    pub udp_gro_buffers: u64,
    /// See `udp_gro_buffers`.
    pub udp_gro_segments: u64,

    /// Dropped: UDP datagram that is nothing the relay speaks, or malformed.
    pub drop_malformed: u64,
    /// Dropped: relay data from an address not bound to a session.
    pub drop_unbound_sender: u64,
    /// Dropped: relay data for a channel that does not exist or the sender is not an end of.
    pub drop_unknown_channel: u64,
    /// Dropped: the other end has no usable path (no UDP binding and... gone).
    pub drop_no_route: u64,
    /// Dropped: over the sender's bandwidth bucket.
    pub drop_bandwidth: u64,
    /// Dropped: the receiving TCP connection's queue is full.
    pub drop_queue_full: u64,

    /// Limit hit: connection refused at `max_sessions`.
    pub limit_max_sessions: u64,
    /// Limit hit: connection refused at `max_sessions_per_ip`.
    pub limit_sessions_per_ip: u64,
    /// Limit hit: registration refused by the per-IP rate.
    pub limit_registration_rate: u64,
    /// Limit hit: STUN request dropped by the per-IP rate.
    pub limit_stun_rate: u64,
    /// Limit hit: `Connect` refused at `max_channels_per_session`.
    pub limit_channels: u64,
    /// Limit hit: session disconnected because it did not read its queue (`TooSlow`).
    pub limit_too_slow: u64,
    /// Limit hit: `Connect`/`UpdateCandidates` over the per-session control rate.
    pub limit_control_rate: u64,
    /// Limit hit: relayed data dropped because all TCP queues together are full.
    pub limit_total_queue: u64,
    /// Limit hit: frame over `max_frame_bytes` (connection closed).
    pub limit_frame_size: u64,
    /// Limit hit: handshake timeout.
    pub limit_handshake_timeout: u64,
    /// Limit hit: idle timeout.
    pub limit_idle_timeout: u64,
    /// Sessions closed for a protocol violation (garbage, unexpected message).
    pub protocol_violations: u64,
}

impl Metrics {
    /// Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut s = String::with_capacity(4096);
        let gauge = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP burrow_relay_{name} {help}");
            let _ = writeln!(s, "# TYPE burrow_relay_{name} gauge");
            let _ = writeln!(s, "burrow_relay_{name} {v}");
        };
        gauge(&mut s, "sessions", "TCP sessions open.", self.sessions);
        gauge(
            &mut s,
            "registered",
            "Registered sessions.",
            self.registered,
        );
        gauge(&mut s, "channels", "Open relay channels.", self.channels);
        gauge(
            &mut s,
            "udp_bindings",
            "Sessions with a bound UDP address.",
            self.udp_bindings,
        );

        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP burrow_relay_{name}_total {help}");
            let _ = writeln!(s, "# TYPE burrow_relay_{name}_total counter");
            let _ = writeln!(s, "burrow_relay_{name}_total {v}");
        };
        counter(
            &mut s,
            "tcp_accepted",
            "TCP connections accepted.",
            self.tcp_accepted,
        );
        counter(
            &mut s,
            "registrations",
            "Successful registrations.",
            self.registrations,
        );
        counter(
            &mut s,
            "registrations_bad_signature",
            "Registrations with a bad signature.",
            self.registrations_bad_signature,
        );
        counter(
            &mut s,
            "registrations_unauthorized",
            "Registrations without a valid token.",
            self.registrations_unauthorized,
        );
        counter(
            &mut s,
            "sessions_replaced",
            "Sessions replaced by a re-registration.",
            self.sessions_replaced,
        );
        counter(&mut s, "udp_binds", "UDP binds accepted.", self.udp_binds);
        counter(
            &mut s,
            "udp_binds_rejected",
            "UDP binds with an unknown token.",
            self.udp_binds_rejected,
        );
        counter(
            &mut s,
            "introductions",
            "Introductions made.",
            self.introductions,
        );
        counter(
            &mut s,
            "connects_failed",
            "Connect requests that failed.",
            self.connects_failed,
        );
        counter(&mut s, "pings", "Pings answered.", self.pings);
        counter(
            &mut s,
            "stun_requests",
            "STUN Binding requests received.",
            self.stun_requests,
        );
        counter(
            &mut s,
            "stun_responses",
            "STUN success responses sent.",
            self.stun_responses,
        );
        counter(
            &mut s,
            "stun_errors",
            "STUN error responses sent.",
            self.stun_errors,
        );

        let _ = writeln!(
            s,
            "# HELP burrow_relay_relayed_packets_total Relayed packets by inbound and outbound transport."
        );
        let _ = writeln!(s, "# TYPE burrow_relay_relayed_packets_total counter");
        for (from, to, v) in [
            ("udp", "udp", self.relayed_packets_udp_udp),
            ("udp", "tcp", self.relayed_packets_udp_tcp),
            ("tcp", "udp", self.relayed_packets_tcp_udp),
            ("tcp", "tcp", self.relayed_packets_tcp_tcp),
        ] {
            let _ = writeln!(
                s,
                "burrow_relay_relayed_packets_total{{from=\"{from}\",to=\"{to}\"}} {v}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP burrow_relay_relayed_bytes_total Relayed bytes by inbound and outbound transport."
        );
        let _ = writeln!(s, "# TYPE burrow_relay_relayed_bytes_total counter");
        for (from, to, v) in [
            ("udp", "udp", self.relayed_bytes_udp_udp),
            ("udp", "tcp", self.relayed_bytes_udp_tcp),
            ("tcp", "udp", self.relayed_bytes_tcp_udp),
            ("tcp", "tcp", self.relayed_bytes_tcp_tcp),
        ] {
            let _ = writeln!(
                s,
                "burrow_relay_relayed_bytes_total{{from=\"{from}\",to=\"{to}\"}} {v}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP burrow_relay_dropped_total Packets dropped by reason."
        );
        let _ = writeln!(s, "# TYPE burrow_relay_dropped_total counter");
        for (reason, v) in [
            ("malformed", self.drop_malformed),
            ("unbound_sender", self.drop_unbound_sender),
            ("unknown_channel", self.drop_unknown_channel),
            ("no_route", self.drop_no_route),
            ("bandwidth", self.drop_bandwidth),
            ("queue_full", self.drop_queue_full),
        ] {
            let _ = writeln!(s, "burrow_relay_dropped_total{{reason=\"{reason}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP burrow_relay_limit_hits_total Times a limit refused or ended something."
        );
        let _ = writeln!(s, "# TYPE burrow_relay_limit_hits_total counter");
        for (limit, v) in [
            ("max_sessions", self.limit_max_sessions),
            ("sessions_per_ip", self.limit_sessions_per_ip),
            ("registration_rate", self.limit_registration_rate),
            ("stun_rate", self.limit_stun_rate),
            ("channels", self.limit_channels),
            ("too_slow", self.limit_too_slow),
            ("control_rate", self.limit_control_rate),
            ("total_queue", self.limit_total_queue),
            ("frame_size", self.limit_frame_size),
            ("handshake_timeout", self.limit_handshake_timeout),
            ("idle_timeout", self.limit_idle_timeout),
        ] {
            let _ = writeln!(s, "burrow_relay_limit_hits_total{{limit=\"{limit}\"}} {v}");
        }
        counter(
            &mut s,
            "protocol_violations",
            "Sessions closed for a protocol violation.",
            self.protocol_violations,
        );
        counter(
            &mut s,
            "udp_gro_buffers",
            "UDP buffers received as a GRO batch of several datagrams.",
            self.udp_gro_buffers,
        );
        counter(
            &mut s,
            "udp_gro_segments",
            "Datagrams received inside GRO batches.",
            self.udp_gro_segments,
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_type_lines() {
        let m = Metrics {
            relayed_packets_tcp_udp: 7,
            drop_bandwidth: 3,
            ..Metrics::default()
        };
        let text = m.render_prometheus();
        assert!(text.contains("burrow_relay_relayed_packets_total{from=\"tcp\",to=\"udp\"} 7\n"));
        assert!(text.contains("burrow_relay_dropped_total{reason=\"bandwidth\"} 3\n"));
        assert!(text.contains("# TYPE burrow_relay_stun_requests_total counter\n"));
        // Every sample line's family has a TYPE line.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
