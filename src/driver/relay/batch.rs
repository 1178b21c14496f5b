//! Batched UDP I/O on Linux: `recvmmsg(2)` with UDP GRO to receive up to [`BATCH`]
//! buffers per syscall (each buffer one datagram, or a GRO super-datagram of up to 64
//! equal-size segments from one sender), and `sendmmsg(2)` with UDP GSO (`UDP_SEGMENT`) to
//! forward runs of segments to one destination as one message each.
//!
//! The relay never rewrites a packet, so forwarding re-sends slices of the receive buffers:
//! no copy and no allocation per packet. The send queue is bounded by construction (at most
//! one entry per segment of one receive batch) and preallocated.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tracing::{debug, trace};

/// Buffers per `recvmmsg`.
pub const BATCH: usize = 32;
/// Room per buffer: the largest UDP payload (and the largest GRO super-datagram).
pub const SLOT: usize = 65_536;
/// Segments per GSO send. The kernel's GRO coalesces at most 64 (`UDP_GRO_CNT_MAX`) and
/// older kernels send at most 64 (`UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Messages per `sendmmsg` call.
const SEND_CHUNK: usize = 64;
/// Queued sends: one per segment of a full batch at worst.
const SEND_QUEUE: usize = BATCH * MAX_SEGMENTS;

// From <linux/udp.h>; not exported by libc for every Linux target.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Control room for one `int` (UDP_GRO on receive) or `u16` (UDP_SEGMENT on send), in
/// `u64`s for `cmsghdr` alignment.
const CTRL_WORDS: usize = 4;

/// Asks the kernel to coalesce bursts into GRO super-datagrams (Linux 5.0+). `false` where
/// it cannot (datagrams then arrive one per buffer, which works the same).
pub fn enable_gro(socket: &impl AsRawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: valid fd and a pointer to an int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Reads an IPv4 or IPv6 socket address the kernel wrote into a `sockaddr_storage`.
fn to_socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // enough and suitably aligned for.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `storage`; returns the length to pass to the kernel.
fn write_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for a sockaddr_in.
            let sin = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            sin.sin_zero = [0; 8];
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// One received buffer.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// Sender.
    pub from: SocketAddr,
    /// GRO segment size (0: one datagram).
    pub segment_len: usize,
}

/// A forward waiting for the next [`RecvBatch::flush`]: a slice of a receive buffer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: usize,
    offset: usize,
    len: usize,
    segment_len: usize,
    destination: SocketAddr,
}

/// Receive buffers, the headers pointing into them, and the send queue of forwards out of
/// them, all reused for every batch.
pub struct RecvBatch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Each buffer of the last batch.
    pub got: Vec<Received>,
    pending: Vec<Pending>,
    send_names: Vec<libc::sockaddr_storage>,
    send_iovecs: Vec<libc::iovec>,
    send_ctrl: Vec<[u64; CTRL_WORDS]>,
    send_hdrs: Vec<libc::mmsghdr>,
    /// GSO sends work (cleared when the kernel or device cannot do GSO: segments then go
    /// one by one).
    gso: bool,
    /// A GSO send has succeeded at least once.
    gso_worked: bool,
}

impl RecvBatch {
    pub fn new() -> Self {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all
        // zero bytes is a valid value.
        let zeroed = || unsafe { MaybeUninit::zeroed().assume_init() };
        RecvBatch {
            bufs: vec![0; BATCH * SLOT],
            names: vec![zeroed(); BATCH],
            iovecs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            ctrl: vec![[0; CTRL_WORDS]; BATCH],
            hdrs: (0..BATCH).map(|_| zeroed_mmsghdr()).collect(),
            got: Vec::with_capacity(BATCH),
            pending: Vec::with_capacity(SEND_QUEUE),
            send_names: vec![zeroed(); SEND_CHUNK],
            send_iovecs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                SEND_CHUNK
            ],
            send_ctrl: vec![[0; CTRL_WORDS]; SEND_CHUNK],
            send_hdrs: (0..SEND_CHUNK).map(|_| zeroed_mmsghdr()).collect(),
            gso: true,
            gso_worked: false,
        }
    }

    /// The `i`th buffer of the last batch.
    pub fn buffer(&self, i: usize) -> &[u8] {
        &self.bufs[i * SLOT..i * SLOT + self.got[i].len]
    }

    /// Receives up to [`BATCH`] buffers; `Ok(0)` never happens (WouldBlock instead).
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            hdr.msg_controllen = std::mem::size_of::<[u64; CTRL_WORDS]>() as _;
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by `self` of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got.clear();
        for i in 0..n as usize {
            let len = self.hdrs[i].msg_len as usize;
            let segment_len = gro_segment_len(&self.hdrs[i].msg_hdr);
            match to_socket_addr(&self.names[i]) {
                Some(from) => self.got.push(Received {
                    len,
                    from,
                    segment_len,
                }),
                // Not an inet source (cannot happen on a UDP/IP socket): keep the slot
                // aligned with an empty buffer from an address the core will not match.
                None => self.got.push(Received {
                    len: 0,
                    from: SocketAddr::from(([0, 0, 0, 0], 0)),
                    segment_len: 0,
                }),
            }
        }
        Ok(self.got.len())
    }

    /// Queues `len` bytes of buffer `slot` at `offset`, cut into `segment_len`-byte
    /// datagrams, for `destination`. Sent by the next [`RecvBatch::flush`]; runs longer
    /// than [`MAX_SEGMENTS`] are split, and without GSO every segment is its own entry.
    pub fn queue(
        &mut self,
        slot: usize,
        offset: usize,
        len: usize,
        segment_len: usize,
        destination: SocketAddr,
    ) {
        let segment_len = if segment_len == 0 { len } else { segment_len };
        let step = if self.gso {
            segment_len * MAX_SEGMENTS
        } else {
            segment_len
        };
        let mut at = 0;
        while at < len && self.pending.len() < SEND_QUEUE {
            let take = step.min(len - at);
            self.pending.push(Pending {
                slot,
                offset: offset + at,
                len: take,
                segment_len,
                destination,
            });
            at += take;
        }
    }

    /// Sends the queued forwards from `socket` with `sendmmsg` (one message per run, GSO for
    /// runs of several segments) and empties the queue. Forwards the socket cannot take now
    /// (WouldBlock) are dropped, like any UDP overflow; returns how many messages went out.
    pub fn flush(&mut self, socket: &impl AsRawFd) -> usize {
        let mut sent_total = 0;
        let mut start = 0;
        while start < self.pending.len() {
            let count = (self.pending.len() - start).min(SEND_CHUNK);
            for k in 0..count {
                let p = self.pending[start + k];
                let namelen = write_sockaddr(p.destination, &mut self.send_names[k]);
                self.send_iovecs[k] = libc::iovec {
                    iov_base: self.bufs[p.slot * SLOT + p.offset..].as_ptr() as *mut libc::c_void,
                    iov_len: p.len,
                };
                let gso = p.len > p.segment_len;
                let hdr = &mut self.send_hdrs[k].msg_hdr;
                hdr.msg_name = (&mut self.send_names[k] as *mut libc::sockaddr_storage).cast();
                hdr.msg_namelen = namelen;
                hdr.msg_iov = &mut self.send_iovecs[k];
                hdr.msg_iovlen = 1;
                hdr.msg_flags = 0;
                if gso {
                    let ctrl = &mut self.send_ctrl[k];
                    hdr.msg_control = ctrl.as_mut_ptr().cast();
                    // SAFETY: CMSG_SPACE of a u16 fits in the control buffer.
                    hdr.msg_controllen =
                        unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
                    // SAFETY: the header points at a control buffer of msg_controllen bytes,
                    // aligned for cmsghdr, so CMSG_FIRSTHDR is non-null and in bounds.
                    unsafe {
                        let cmsg = libc::CMSG_FIRSTHDR(hdr);
                        (*cmsg).cmsg_level = libc::SOL_UDP;
                        (*cmsg).cmsg_type = UDP_SEGMENT;
                        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(cmsg).cast::<u16>(),
                            p.segment_len as u16,
                        );
                    }
                } else {
                    hdr.msg_control = std::ptr::null_mut();
                    hdr.msg_controllen = 0;
                }
                self.send_hdrs[k].msg_len = 0;
            }
            let mut sent = 0;
            while sent < count {
                // SAFETY: `send_hdrs[sent..count]` are initialised headers pointing into
                // `self.bufs`, `send_names`, `send_iovecs` and `send_ctrl`, all alive.
                let n = unsafe {
                    libc::sendmmsg(
                        socket.as_raw_fd(),
                        self.send_hdrs[sent..].as_mut_ptr(),
                        (count - sent) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    let n = n as usize;
                    if !self.gso_worked
                        && self.send_hdrs[sent..sent + n]
                            .iter()
                            .any(|h| h.msg_hdr.msg_controllen != 0)
                    {
                        self.gso_worked = true;
                    }
                    sent += n;
                    sent_total += n;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The send buffer is full: drop the rest of this chunk.
                    Some(libc::EAGAIN) => break,
                    // A GSO send refused: this run goes out segment by segment. EIO means
                    // the device cannot do GSO (no checksum offload), as does EINVAL from a
                    // kernel that never took one (older than 4.18): GSO stays off. EINVAL or
                    // EMSGSIZE after GSO worked concern this run (e.g. segments larger than
                    // the outgoing MTU).
                    Some(code @ (libc::EIO | libc::EINVAL | libc::EMSGSIZE))
                        if self.send_hdrs[sent].msg_hdr.msg_controllen != 0 =>
                    {
                        if self.gso && (code == libc::EIO || !self.gso_worked) {
                            debug!(error = %err, "UDP GSO unavailable; sending segments one by one");
                            self.gso = false;
                        }
                        let p = self.pending[start + sent];
                        send_segments(socket, &self.bufs, p);
                        sent += 1;
                    }
                    // Any other error (e.g. ECONNREFUSED from an earlier ICMP) concerns
                    // one destination: skip it.
                    _ => {
                        trace!(error = %err, "UDP forward failed");
                        sent += 1;
                    }
                }
            }
            start += count;
        }
        self.pending.clear();
        sent_total
    }
}

/// Sends a run one datagram at a time (the GSO fallback).
fn send_segments(socket: &impl AsRawFd, bufs: &[u8], p: Pending) {
    let mut name: libc::sockaddr_storage =
        // SAFETY: all-zero is a valid sockaddr_storage.
        unsafe { MaybeUninit::zeroed().assume_init() };
    let namelen = write_sockaddr(p.destination, &mut name);
    let run = &bufs[p.slot * SLOT + p.offset..p.slot * SLOT + p.offset + p.len];
    for segment in run.chunks(p.segment_len.max(1)) {
        // SAFETY: valid fd, buffer and address of the stated lengths.
        let rc = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                libc::MSG_DONTWAIT,
                (&name as *const libc::sockaddr_storage).cast(),
                namelen,
            )
        };
        if rc < 0 {
            trace!(error = %io::Error::last_os_error(), "UDP forward failed");
            return;
        }
    }
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct; all-zero is valid (null pointers, zero lengths).
    unsafe { MaybeUninit::zeroed().assume_init() }
}

/// The UDP_GRO segment size the kernel attached to a received message, 0 if none.
fn gro_segment_len(hdr: &libc::msghdr) -> usize {
    if hdr.msg_control.is_null() || hdr.msg_controllen == 0 {
        return 0;
    }
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
    // within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return v.max(0) as usize;
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    0
}
