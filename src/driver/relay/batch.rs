//! Batched UDP I/O on Linux: `recvmmsg(2)` to receive up to [`BATCH`] datagrams per
//! syscall and `sendmmsg(2)` to forward them, so the UDP→UDP relay path costs a fraction
//! of a syscall per packet. The received buffers are re-sent as they are (the relay never
//! rewrites a packet), so forwarding copies nothing.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams per syscall.
pub const BATCH: usize = 32;
/// Room per datagram: the largest UDP payload.
pub const SLOT: usize = 65_536;

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

/// Receive buffers and the headers pointing into them, reused for every batch.
pub struct RecvBatch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// (length, source) of each datagram of the last batch.
    pub got: Vec<(usize, SocketAddr)>,
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0; BATCH * SLOT],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all
            // zero bytes is a valid value.
            names: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            iovecs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            hdrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            got: Vec::with_capacity(BATCH),
        }
    }

    /// The `i`th datagram of the last batch.
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i * SLOT..i * SLOT + self.got[i].0]
    }

    /// Receives up to [`BATCH`] datagrams; `Ok(0)` never happens (WouldBlock instead).
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
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
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
            match to_socket_addr(&self.names[i]) {
                Some(from) => self.got.push((len, from)),
                // Not an inet source (cannot happen on a UDP/IP socket): keep the slot
                // aligned with an unspecified address the core will not match.
                None => self.got.push((0, SocketAddr::from(([0, 0, 0, 0], 0)))),
            }
        }
        Ok(self.got.len())
    }

    /// Sends datagrams `which[k]` of the last batch to `dests[k]` in one `sendmmsg`,
    /// retrying the rest after a partial send. Datagrams the socket cannot take now
    /// (WouldBlock) are dropped, like any UDP overflow; returns how many went out.
    pub fn forward(&self, socket: &impl AsRawFd, which: &[usize], dests: &[SocketAddr]) -> usize {
        let count = which.len().min(BATCH);
        let names: Vec<SockAddr> = dests[..count].iter().map(|d| SockAddr::from(*d)).collect();
        // SAFETY: zeroed C structs are valid; the pointers set below stay valid during the
        // call (they point into `self.bufs`, `names` and `iovecs`, all alive).
        let mut iovecs: [libc::iovec; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for k in 0..count {
            let i = which[k];
            iovecs[k] = libc::iovec {
                iov_base: self.bufs[i * SLOT..].as_ptr() as *mut libc::c_void,
                iov_len: self.got[i].0,
            };
            let hdr = &mut hdrs[k].msg_hdr;
            hdr.msg_name = names[k].as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = names[k].len();
            hdr.msg_iov = &mut iovecs[k];
            hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: as above; `hdrs[sent..count]` are initialised headers.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    hdrs[sent..].as_mut_ptr(),
                    (count - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // WouldBlock: the send buffer is full, drop the rest. Any other error
                // (e.g. ECONNREFUSED from an earlier ICMP) concerns one destination: skip it.
                if n < 0 && err.kind() != io::ErrorKind::WouldBlock {
                    sent += 1;
                    continue;
                }
                break;
            }
            sent += n as usize;
        }
        sent
    }
}
