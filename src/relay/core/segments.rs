//! GRO batches on the UDP→UDP fast path: one received buffer holding several equal-size
//! datagrams ("segments", the last one possibly shorter) from one sender, as the kernel's
//! UDP GRO delivers a QUIC GSO burst.
//!
//! Each segment is its own relay data packet with its own 8-byte header (the header is
//! forwarded unchanged, so segment sizes are preserved end to end). Consecutive segments on
//! the same channel form a run: the channel, the sender's session and the destination are
//! looked up once per run instead of once per packet, and the run leaves as one GSO send.
//! Limits and metrics still count packets: the bandwidth bucket is charged per segment
//! (a run is cut at the first segment it refuses) and every counter moves by the number of
//! segments.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Forward, Inbound, RelayCore};
use crate::wire::control::RelayTransport;
use crate::wire::relay_data::{self, ChannelId};

/// "Send `len` bytes of the buffer you passed to [`RelayCore::handle_udp_segments`],
/// starting at `offset`, from `forward.source` to `forward.destination`, as datagrams of
/// `segment_len` bytes (the last one may be shorter)": one GSO send, or one datagram when
/// `len <= segment_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardRun {
    /// From which relay socket to where.
    pub forward: Forward,
    /// Offset of the run's first segment in the buffer.
    pub offset: usize,
    /// Bytes in the run (whole segments).
    pub len: usize,
    /// Size of every segment but possibly the last.
    pub segment_len: usize,
}

impl ForwardRun {
    /// Number of datagrams in the run.
    pub fn segments(&self) -> usize {
        self.len.div_ceil(self.segment_len.max(1))
    }
}

impl RelayCore {
    /// A UDP buffer arrived on `local` from `from`: `buf` split into `segment_len`-byte
    /// datagrams (0, or `buf.len()` or more: one datagram). Appends what to forward to `out`,
    /// in buffer order, consecutive segments to the same destination merged into one run.
    ///
    /// Equivalent to calling [`RelayCore::handle_udp`] once per segment (same forwards, same
    /// limits, same metrics, same transmits and events for segments that are not UDP→UDP
    /// relay data), except that a run refused by the bandwidth bucket is cut at its first
    /// refused segment (a per-packet check could still pass a shorter last segment).
    pub fn handle_udp_segments(
        &mut self,
        now: Instant,
        local: SocketAddr,
        from: SocketAddr,
        buf: &[u8],
        segment_len: usize,
        out: &mut Vec<ForwardRun>,
    ) {
        let seg = if segment_len == 0 || segment_len > buf.len() {
            buf.len()
        } else {
            segment_len
        };
        if seg == 0 {
            // An empty datagram: the per-packet path counts it as malformed.
            if let Some(forward) = self.handle_udp(now, local, from, buf) {
                push_run(out, forward, 0, 0, 0);
            }
            return;
        }
        if seg < buf.len() {
            self.metrics.udp_gro_buffers += 1;
            self.metrics.udp_gro_segments += buf.len().div_ceil(seg) as u64;
        }
        let sender = self.udp_addrs.get(&from).copied();
        let mut offset = 0;
        while offset < buf.len() {
            let first_end = (offset + seg).min(buf.len());
            let first = &buf[offset..first_end];
            let (Some(sender), Ok(channel)) = (sender, relay_data::channel(first)) else {
                // Not relay data from a bound address: the general per-packet path.
                if let Some(forward) = self.handle_udp(now, local, from, first) {
                    push_run(out, forward, offset, first.len(), seg);
                }
                offset = first_end;
                continue;
            };
            let mut end = first_end;
            while end < buf.len() {
                let next_end = (end + seg).min(buf.len());
                if relay_data::channel(&buf[end..next_end]) != Ok(channel) {
                    break;
                }
                end = next_end;
            }
            if let Some((forward, len)) =
                self.route_run(now, sender, channel, &buf[offset..end], seg)
            {
                push_run(out, forward, offset, len, seg);
            }
            offset = end;
        }
        self.flush_closes(now);
    }

    /// Routes a run of relay data segments from `sender` on `channel`: the forward and the
    /// bytes of the leading segments allowed through, if any.
    fn route_run(
        &mut self,
        now: Instant,
        sender: super::ConnId,
        channel: ChannelId,
        run: &[u8],
        seg: usize,
    ) -> Option<(Forward, usize)> {
        let udp_destination = self.channels.get(&channel).and_then(|ch| {
            let other = if ch.a == sender {
                ch.b
            } else if ch.b == sender {
                ch.a
            } else {
                return None;
            };
            let reg = self.sessions.get(&other)?.registration()?;
            match (reg.relay_transport, reg.udp) {
                (RelayTransport::Udp, Some(udp)) => Some(udp),
                _ => None,
            }
        });
        let Some(udp) = udp_destination else {
            // Unknown channel, not an end of it, no route, or a TCP destination (which
            // queues a copy per packet anyway): the per-packet path, for its exact drops.
            // `route` forwards over UDP only to a UDP destination, which this is not.
            for segment in run.chunks(seg) {
                let _ = self.route(now, sender, channel, segment, Inbound::Udp);
            }
            return None;
        };
        let s = self.sessions.get_mut(&sender)?;
        s.last_heard = now;
        let reg = s.registration_mut()?;
        let total = run.len();
        let count = total.div_ceil(seg);
        let allowed = if reg.bucket.try_take(now, total as u64) {
            total
        } else {
            // Over budget: segment by segment, up to the first refusal.
            let mut allowed = 0;
            for segment in run.chunks(seg) {
                if !reg.bucket.try_take(now, segment.len() as u64) {
                    break;
                }
                allowed += segment.len();
            }
            allowed
        };
        let passed = allowed.div_ceil(seg);
        self.metrics.drop_bandwidth += (count - passed) as u64;
        if passed == 0 {
            return None;
        }
        self.metrics.relayed_packets_udp_udp += passed as u64;
        self.metrics.relayed_bytes_udp_udp += allowed as u64;
        Some((
            Forward {
                source: udp.local,
                destination: udp.remote,
            },
            allowed,
        ))
    }
}

/// Appends a run, merged into the previous one when it continues it (same forward, next
/// bytes, same segment size, previous run made of whole segments).
fn push_run(out: &mut Vec<ForwardRun>, forward: Forward, offset: usize, len: usize, seg: usize) {
    if let Some(last) = out.last_mut()
        && last.forward == forward
        && last.segment_len == seg
        && last.offset + last.len == offset
        && last.len % seg.max(1) == 0
    {
        last.len += len;
        return;
    }
    out.push(ForwardRun {
        forward,
        offset,
        len,
        segment_len: seg,
    });
}
