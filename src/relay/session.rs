//! One TCP control session's state machine and its bounded outgoing byte queue.
//!
//! ```text
//! accepted ──Challenge sent──▶ Challenged ──valid Register──▶ Registered
//!     │                            │                              │
//!     └─ limit hit ─┐   timeout / bad signature / token      idle / error / replaced
//!                   ▼              ▼                              ▼
//!                              Closing (final bytes queued, driver told to close;
//!                                       forgotten on handle_tcp_closed or after a linger)
//! ```
//!
//! The transitions that involve other sessions (replacement, introductions, forwarding)
//! are made by [`super::RelayCore`]; this file holds the per-session data and the rules
//! that only concern one session.

use std::net::SocketAddr;
use std::time::Instant;

use crate::wire::PeerId;
use crate::wire::control::{Candidate, NatReport, RelayTransport};
use crate::wire::frame::FrameReader;
use crate::wire::relay_data::ChannelId;

use super::core::ConnId;
use super::limits::TokenBucket;

/// Outgoing bytes of one TCP connection: a contiguous buffer with a read offset, so the
/// driver can hand [`OutQueue::pending`] straight to `write`.
#[derive(Debug, Default)]
pub struct OutQueue {
    buf: Vec<u8>,
    start: usize,
}

impl OutQueue {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes to write next.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Appends raw bytes (STUN over TCP has no burrow framing).
    pub fn push_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a frame: length prefix and body.
    pub fn push_frame(&mut self, body: &[u8]) {
        self.buf
            .extend_from_slice(&crate::wire::frame::length_prefix(body.len()));
        self.buf.extend_from_slice(body);
    }

    /// Records that the driver wrote `n` bytes from [`OutQueue::pending`].
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            // Give memory back after a burst: an idle session should not pin a large buffer.
            if self.buf.capacity() > 64 * 1024 {
                self.buf.shrink_to(16 * 1024);
            }
        } else if self.start >= 64 * 1024 && self.start * 2 >= self.buf.len() {
            // Compact once the consumed prefix dominates, so the buffer stays bounded by
            // the queue limit plus one compaction's worth.
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Where a registered node's UDP packets come from and which relay socket they reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpBinding {
    /// The relay socket the node's `Bind` arrived on; replies and forwards leave from it,
    /// since that is the mapping the node's NAT keeps open.
    pub local: SocketAddr,
    /// The node's address as the relay sees it (its server-reflexive address).
    pub remote: SocketAddr,
}

/// The state of a registered node.
#[derive(Debug)]
pub struct Registration {
    /// Its proven identity.
    pub peer: PeerId,
    /// The secret it puts in `UdpMsg::Bind`.
    pub udp_token: [u8; 16],
    /// What it advertised (host addresses, mappings).
    pub candidates: Vec<Candidate>,
    /// What it measured of its NAT.
    pub nat: NatReport,
    /// How it wants relayed data delivered.
    pub relay_transport: RelayTransport,
    /// Its bound UDP address, once a `Bind` arrived.
    pub udp: Option<UdpBinding>,
    /// Channels it is an end of (at most `max_channels_per_session`).
    pub channels: Vec<ChannelId>,
    /// Relay bandwidth it may still send.
    pub bucket: TokenBucket,
    /// `Connect` / `UpdateCandidates` it may still send (in messages).
    pub control_bucket: TokenBucket,
}

/// Where a session is in its life.
#[derive(Debug)]
pub enum SessionState {
    /// The challenge went out; a `Register` must come back before `deadline`.
    Challenged {
        /// The nonce the node must sign.
        nonce: [u8; 32],
        /// Handshake timeout.
        deadline: Instant,
    },
    /// The node proved its key.
    Registered(Box<Registration>),
    /// Ended: only its final bytes remain, for the driver to flush before closing. Input is
    /// ignored. Forgotten on `handle_tcp_closed` or at `forget_at`.
    Closing {
        /// When the core forgets it even if the driver never reports the close.
        forget_at: Instant,
    },
}

/// One TCP connection to the relay.
#[derive(Debug)]
pub struct Session {
    /// The driver's handle.
    pub conn: ConnId,
    /// The peer's address on this connection.
    pub remote: SocketAddr,
    /// The relay's address on this connection.
    pub local: SocketAddr,
    /// Where it is in its life.
    pub state: SessionState,
    /// Incoming frame reassembly; created on first data, dropped on close.
    pub reader: Option<FrameReader>,
    /// Outgoing bytes.
    pub out: OutQueue,
    /// Last time anything arrived from this node (TCP bytes or UDP packets).
    pub last_heard: Instant,
    /// Set when the connection turned out to be STUN over TCP (RFC 8489 section 6.2.2:
    /// first byte 0x00 or 0x01 instead of the burrow preamble): the bytes of an incomplete
    /// STUN message. Such a session never registers; it is answered and times out.
    pub stun_tcp: Option<Vec<u8>>,
    /// How many bytes of the burrow preamble have arrived (the challenge goes out once all
    /// four have: the client speaks first).
    pub preamble_seen: usize,
    /// Whether the challenge went out.
    pub challenge_sent: bool,
}

impl Session {
    /// A fresh session that has just been sent a challenge.
    pub fn new(
        conn: ConnId,
        remote: SocketAddr,
        local: SocketAddr,
        nonce: [u8; 32],
        now: Instant,
        handshake_deadline: Instant,
    ) -> Self {
        Session {
            conn,
            remote,
            local,
            state: SessionState::Challenged {
                nonce,
                deadline: handshake_deadline,
            },
            reader: None,
            out: OutQueue::default(),
            last_heard: now,
            stun_tcp: None,
            preamble_seen: 0,
            challenge_sent: false,
        }
    }

    /// Whether the session has ended (only final bytes remain).
    pub fn is_closing(&self) -> bool {
        matches!(self.state, SessionState::Closing { .. })
    }

    /// The registration, if registered.
    pub fn registration(&self) -> Option<&Registration> {
        match &self.state {
            SessionState::Registered(r) => Some(r),
            _ => None,
        }
    }

    /// The registration, mutably, if registered.
    pub fn registration_mut(&mut self) -> Option<&mut Registration> {
        match &mut self.state {
            SessionState::Registered(r) => Some(r),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_queue_stays_contiguous_and_compacts() {
        let mut q = OutQueue::default();
        q.push_frame(&[0x22, 1, 9]);
        assert_eq!(q.pending(), &[0, 0, 0, 3, 0x22, 1, 9]);
        q.consume(2);
        assert_eq!(q.pending(), &[0, 3, 0x22, 1, 9]);
        q.consume(5);
        assert!(q.is_empty());
        for _ in 0..100 {
            q.push_frame(&[0x20; 1000]);
        }
        q.consume(70_000);
        assert_eq!(q.len(), 100 * 1004 - 70_000);
        assert_eq!(q.pending()[0], 0x20);
    }
}
