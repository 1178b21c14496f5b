//! In-process UDP forwarders for the relay_forward bench, with no protocol beyond reading
//! the destination from the first packet's 8-byte relay header:
//!
//! - [`Kind::Raw`]: one `recv_from` + one `send_to` per packet (what a naive relay does);
//! - [`Kind::Mmsg`]: `recvmmsg` 32 datagrams, `sendmmsg` them back out;
//! - [`Kind::Gro`]: UDP GRO receive (`recvmmsg` of up to 32 coalesced buffers), and one GSO
//!   send of each coalesced buffer: the "physical limit" of a UDP relay on this kernel.
//!
//! Each runs on its own thread until stopped and reports (packets forwarded, CPU time of
//! its thread).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use burrow::wire::relay_data;

/// Which forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Mmsg,
    Gro,
}

const BATCH: usize = 32;
const POLL: Duration = Duration::from_millis(20);

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn route(routes: &HashMap<u32, SocketAddr>, packet: &[u8]) -> Option<SocketAddr> {
    let channel = relay_data::channel(packet).ok()?;
    routes.get(&channel.0).copied()
}

/// Starts a forwarder on a fresh 127.0.0.1 socket; returns its address and the thread.
pub fn spawn(
    kind: Kind,
    routes: HashMap<u32, SocketAddr>,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, JoinHandle<(u64, Duration)>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = socket2::SockRef::from(&sock);
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    let addr = sock.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let cpu0 = thread_cpu_time();
        let forwarded = match kind {
            Kind::Raw => raw(sock, &routes, &stop),
            Kind::Mmsg => mmsg(sock, &routes, &stop),
            Kind::Gro => gro(sock, &routes, &stop),
        };
        (forwarded, thread_cpu_time().saturating_sub(cpu0))
    });
    (addr, handle)
}

fn raw(sock: UdpSocket, routes: &HashMap<u32, SocketAddr>, stop: &AtomicBool) -> u64 {
    sock.set_read_timeout(Some(POLL)).unwrap();
    let mut buf = [0u8; 2048];
    let mut forwarded = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(dst) = route(routes, &buf[..n]) {
            let _ = sock.send_to(&buf[..n], dst);
            forwarded += 1;
        }
    }
    forwarded
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s = socket2::SockAddr::from(addr);
    // SAFETY: SockAddr holds a valid sockaddr_storage of `len` bytes.
    let mut st: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    unsafe {
        std::ptr::copy_nonoverlapping(
            s.as_ptr().cast::<u8>(),
            (&mut st as *mut libc::sockaddr_storage).cast::<u8>(),
            s.len() as usize,
        )
    };
    (st, s.len())
}

fn mmsg(sock: UdpSocket, routes: &HashMap<u32, SocketAddr>, stop: &AtomicBool) -> u64 {
    // Pre-converted destinations: no conversion per packet.
    let dests: HashMap<u32, (libc::sockaddr_storage, libc::socklen_t)> =
        routes.iter().map(|(c, a)| (*c, sockaddr(*a))).collect();
    sock.set_read_timeout(Some(POLL)).unwrap();
    const SLOT: usize = 2048;
    let mut bufs = vec![0u8; BATCH * SLOT];
    // SAFETY: plain C structs, all-zero valid.
    let mut rhdrs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
        .collect();
    let mut shdrs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
        .collect();
    let mut riov: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            iov_base: bufs[i * SLOT..].as_mut_ptr().cast(),
            iov_len: SLOT,
        })
        .collect();
    let mut siov = riov.clone();
    let mut names: Vec<libc::sockaddr_storage> = (0..BATCH)
        .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
        .collect();
    let mut forwarded = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            rhdrs[i].msg_hdr.msg_iov = &mut riov[i];
            rhdrs[i].msg_hdr.msg_iovlen = 1;
            rhdrs[i].msg_len = 0;
        }
        // SAFETY: headers point at live buffers of the stated sizes. Blocking with
        // MSG_WAITFORONE: returns as soon as one datagram is there (or the 20 ms timeout).
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                rhdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let mut out = 0;
        for i in 0..n as usize {
            let len = rhdrs[i].msg_len as usize;
            let Ok(ch) = relay_data::channel(&bufs[i * SLOT..i * SLOT + len]) else {
                continue;
            };
            let Some((name, namelen)) = dests.get(&ch.0) else {
                continue;
            };
            names[out] = *name;
            siov[out] = libc::iovec {
                iov_base: bufs[i * SLOT..].as_mut_ptr().cast(),
                iov_len: len,
            };
            shdrs[out].msg_hdr.msg_name = (&mut names[out] as *mut libc::sockaddr_storage).cast();
            shdrs[out].msg_hdr.msg_namelen = *namelen;
            shdrs[out].msg_hdr.msg_iov = &mut siov[out];
            shdrs[out].msg_hdr.msg_iovlen = 1;
            out += 1;
        }
        let mut sent = 0;
        while sent < out {
            // SAFETY: as above.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    shdrs[sent..].as_mut_ptr(),
                    (out - sent) as u32,
                    0,
                )
            };
            if r <= 0 {
                break;
            }
            sent += r as usize;
        }
        forwarded += sent as u64;
    }
    forwarded
}

fn gro(sock: UdpSocket, routes: &HashMap<u32, SocketAddr>, stop: &AtomicBool) -> u64 {
    let state = quinn_udp::UdpSocketState::new((&sock).into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut sock = mio::net::UdpSocket::from_std(sock);
    let mut poll = mio::Poll::new().unwrap();
    let mut events = mio::Events::with_capacity(4);
    poll.registry()
        .register(&mut sock, mio::Token(0), mio::Interest::READABLE)
        .unwrap();
    const SLOT: usize = 64 * 1024;
    let mut bufs = vec![0u8; BATCH * SLOT];
    let mut meta = [quinn_udp::RecvMeta::default(); BATCH];
    let mut forwarded = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(POLL));
        loop {
            let mut slices: [IoSliceMut; BATCH] = {
                let mut it = bufs.chunks_mut(SLOT);
                std::array::from_fn(|_| IoSliceMut::new(it.next().unwrap()))
            };
            let n = match state.recv((&sock).into(), &mut slices, &mut meta) {
                Ok(n) => n,
                Err(_) => break,
            };
            for (m, s) in meta.iter().zip(slices.iter()).take(n) {
                let data = &s[..m.len];
                let Some(dst) = route(routes, data) else {
                    continue;
                };
                let stride = m.stride.max(1);
                let t = quinn_udp::Transmit {
                    destination: dst,
                    ecn: None,
                    contents: data,
                    segment_size: (stride < m.len).then_some(stride),
                    src_ip: None,
                };
                if state.try_send((&sock).into(), &t).is_ok() {
                    forwarded += m.len.div_ceil(stride) as u64;
                }
            }
        }
    }
    forwarded
}
