//! A non-blocking UDP socket for the mio loop, with batched receive (recvmmsg + GRO) and
//! segmented send (GSO) through `quinn-udp` where the kernel has them.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use mio::net::UdpSocket;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked of the kernel. Bulk QUIC traffic at ~1 GB/s needs a few MB of
/// buffering to ride out scheduling hiccups; the kernel caps it at `net.core.rmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Datagrams fetched per `recvmmsg` call.
pub const RECV_BATCH: usize = 32;

/// Bytes per receive slot: one 64 KiB GRO super-datagram (up to 64 coalesced segments of
/// ~1 KB, or fewer larger ones).
pub const RECV_SLOT_BYTES: usize = 64 * 1024;

/// A bound UDP socket registered with mio.
pub struct UdpEndpoint {
    socket: UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
}

impl std::fmt::Debug for UdpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UdpEndpoint({})", self.local)
    }
}

impl UdpEndpoint {
    /// Binds to `addr` (port 0 picks a free port). IPv6 sockets are v6-only so that an IPv4
    /// socket can be bound beside them on the same port.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::bind_with(addr, true)
    }

    /// Binds an extra socket for hard-NAT punching: no `SO_REUSEADDR` (a port that is taken
    /// must fail rather than be shared with the other owner). It gets the main socket's
    /// buffer sizes, since a direct path may end up on it; the sizes are limits, charged
    /// only for data actually queued, so hundreds of idle extra sockets cost nothing more.
    pub fn bind_extra(addr: SocketAddr) -> io::Result<Self> {
        Self::bind_with(addr, false)
    }

    fn bind_with(addr: SocketAddr, reuse_address: bool) -> io::Result<Self> {
        let domain = Domain::for_address(addr);
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if reuse_address {
            socket.set_reuse_address(true)?;
        }
        // Best effort: the kernel clamps to its maximum, which is fine.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
        socket.bind(&addr.into())?;
        // mio's from_std does not set non-blocking for us.
        socket.set_nonblocking(true)?;
        let std_socket: std::net::UdpSocket = socket.into();
        let socket = UdpSocket::from_std(std_socket);
        let state = UdpSocketState::new((&socket).into())?;
        let local = socket.local_addr()?;
        Ok(UdpEndpoint {
            socket,
            state,
            local,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The mio source, for (de)registration.
    pub fn source(&mut self) -> &mut UdpSocket {
        &mut self.socket
    }

    /// Largest number of segments one GSO send may carry (1 where GSO is unavailable).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends one datagram, or a GSO batch of `segment_size`-byte segments to one destination.
    /// `Err(WouldBlock)` means the socket buffer is full: keep the data and retry when
    /// writable.
    pub fn send(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: segment_size.filter(|&s| s < contents.len()),
            src_ip: None,
        };
        self.state.try_send((&self.socket).into(), &transmit)
    }

    /// Receives one batch and calls `on_datagram(from, datagram)` for each datagram, GRO
    /// super-datagrams split into their segments. Returns the number of datagrams, 0 when
    /// the socket would block.
    pub fn recv_batch(
        &self,
        bufs: &mut RecvBuffers,
        mut on_datagram: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = bufs
            .data
            .chunks_mut(RECV_SLOT_BYTES)
            .map(IoSliceMut::new)
            .collect();
        let n = match self
            .state
            .recv((&self.socket).into(), &mut slices, &mut bufs.meta)
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut count = 0;
        for (meta, slice) in bufs.meta.iter().zip(slices.iter()).take(n) {
            let data = &slice[..meta.len];
            let stride = meta.stride.max(1);
            for segment in data.chunks(stride) {
                on_datagram(meta.addr, segment);
                count += 1;
            }
        }
        Ok(count)
    }
}

/// Reusable receive buffers for [`UdpEndpoint::recv_batch`], allocated once per loop.
pub struct RecvBuffers {
    data: Vec<u8>,
    meta: Vec<RecvMeta>,
}

impl RecvBuffers {
    /// Buffers for [`RECV_BATCH`] slots of [`RECV_SLOT_BYTES`].
    pub fn new() -> Self {
        RecvBuffers {
            data: vec![0; RECV_BATCH * RECV_SLOT_BYTES],
            meta: vec![RecvMeta::default(); RECV_BATCH],
        }
    }
}

impl Default for RecvBuffers {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_send_and_batched_receive() {
        let a = UdpEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = UdpEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        for i in 0..10u8 {
            a.send(b.local_addr(), &[i; 100], None).unwrap();
        }
        // One GSO batch of 3 segments (falls back to one datagram per segment without GSO).
        a.send(b.local_addr(), &[7; 300], Some(100)).unwrap();
        let mut bufs = RecvBuffers::new();
        let mut got = Vec::new();
        for _ in 0..10_000 {
            b.recv_batch(&mut bufs, |from, d| {
                assert_eq!(from, a.local_addr());
                got.push(d.to_vec());
            })
            .unwrap();
            if got.len() >= 13 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got.len(), 13);
        assert!(got.iter().all(|d| d.len() == 100));
        assert_eq!(got[0], vec![0; 100]);
        assert_eq!(got[12], vec![7; 100]);
    }
}
