//! The lab's WAN delay: every IPv4 packet that crosses the internet bridge (`br0` in the
//! `inet` namespace) is queued to userspace with the xtables `NFQUEUE` target and released
//! (verdict ACCEPT) a fixed delay later, by a thread of the test process.
//!
//! Why: the lab's routers and relay are L2-adjacent on one bridge, a few microseconds
//! apart. On the real internet every path has at least a millisecond or so of one-way
//! delay, much more than the skew between the relay's two introductions (0.2-0.5 ms here),
//! so both nodes' first punch packets leave before either reaches the other's router. With
//! zero delay, bare masquerade × bare masquerade is a microsecond race the later node
//! always loses (the conntrack clash, DESIGN.md). This kernel has no netem (and no nft
//! `queue` expression), hence `iptables-legacy ... -j NFQUEUE` plus this delayer.
//!
//! How: with `net.bridge.bridge-nf-call-iptables=1` in the `inet` namespace, bridged IPv4
//! traverses the IP `FORWARD` hook, where `-j NFQUEUE --queue-num 0` (without
//! `--queue-bypass`: a dead delayer drops everything, so the lab's tests fail instead of
//! silently running without delay) hands each packet's metadata (`NFQNL_COPY_META`: the
//! payload stays in the kernel) to a netlink socket opened by this thread after `setns(2)`
//! into the `inet` namespace. The delay is the same for every packet, so packets are
//! released in arrival order: one `NFQNL_MSG_VERDICT_BATCH` (ACCEPT every queued id up to
//! N) per wake-up. Raw nfnetlink_queue over libc (no crate): the whole protocol here is four
//! messages, and the `nfq` crate exposes neither its socket (no poll with a timeout, no
//! receive-buffer size) nor batch verdicts.
//!
//! Protocol: include/uapi/linux/netfilter/nfnetlink_queue.h.
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The queue number of the lab's `NFQUEUE` rule (each lab has its own namespace).
pub const QUEUE_NUM: u16 = 0;

/// Packets the kernel may hold for the delayer (the default, 1024, overflows in bulk
/// transfers: at 100 MB/s a 5 ms delay holds ~400 full-size packets per direction).
const QUEUE_MAX_LEN: u32 = 65536;

/// Receive buffer of the netlink socket (metadata-only messages, but skb overhead).
const RCVBUF: libc::c_int = 32 << 20;

/// How long the thread sleeps at most between checks of the stop flag.
const POLL_MAX: Duration = Duration::from_millis(20);

// nfnetlink / nfnetlink_queue constants (uapi headers).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
/// Hand GSO packets over unsegmented (the payload is never read, so no need to split).
const NFQA_CFG_F_GSO: u32 = 4;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// Counters of a running delayer (shared with the lab).
#[derive(Debug, Default)]
pub struct WanStats {
    /// Packets released after the delay.
    pub delayed: AtomicU64,
    /// Times the socket reported lost queue messages (ENOBUFS): should stay 0.
    pub overruns: AtomicU64,
    /// Most packets held at once.
    pub max_held: AtomicU64,
}

/// A running delayer thread; stops (and closes its queue) on drop.
pub struct WanDelay {
    /// The one-way delay per traversal of the internet bridge.
    pub delay: Duration,
    /// Its counters.
    pub stats: Arc<WanStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WanDelay {
    /// Starts the delayer inside namespace `ns` (`/run/netns/NS`) and binds queue
    /// [`QUEUE_NUM`]; returns once the queue is bound (or why it could not be). The caller
    /// then adds the `NFQUEUE` rule.
    pub fn start(ns: &str, delay: Duration) -> Result<WanDelay, String> {
        let stats = Arc::new(WanStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns_path = format!("/run/netns/{ns}");
        let (stats2, stop2) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("wan-delay {ns}"))
            .spawn(move || {
                let sock = match enter_and_bind(&ns_path) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = run(&sock, delay, &stats2, &stop2) {
                    // The rule has no bypass: from here on the lab's internet drops
                    // everything, and the tests fail; say why.
                    eprintln!("natlab: WAN delayer of {ns_path} died: {e}");
                }
            })
            .map_err(|e| format!("spawn the WAN delayer: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(WanDelay {
                delay,
                stats,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err("the WAN delayer thread died while starting".into()),
        }
    }

    /// Whether the thread is still running (false: the internet drops every packet).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for WanDelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Enters the namespace (this thread only), opens the nfnetlink socket and configures the
/// queue: bind, metadata-only copy, max length, GSO passthrough.
fn enter_and_bind(ns_path: &str) -> Result<OwnedFd, String> {
    let ns = std::fs::File::open(ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
    // SAFETY: setns(2) on a valid fd; CLONE_NEWNET changes only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(os_err("setns"));
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(os_err("netlink socket"));
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl zeroed is valid (pid 0: the kernel assigns one).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: bind(2) with a correctly sized sockaddr_nl.
    if unsafe {
        libc::bind(
            fd,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    } != 0
    {
        return Err(os_err("bind netlink"));
    }
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) with an int option.
        let ok = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &RCVBUF as *const libc::c_int as *const libc::c_void,
                4,
            )
        } == 0;
        if ok {
            break;
        }
    }
    // Bind the queue (pf is ignored since Linux 3.8).
    config(&sock, &[NFQNL_CFG_CMD_BIND, 0, 0, 0], NFQA_CFG_CMD)?;
    let mut params = Vec::new();
    params.extend_from_slice(&0u32.to_be_bytes()); // copy_range
    params.push(NFQNL_COPY_META); // copy_mode
    config(&sock, &params, NFQA_CFG_PARAMS)?;
    config(&sock, &QUEUE_MAX_LEN.to_be_bytes(), NFQA_CFG_QUEUE_MAXLEN)?;
    let mut flags = Vec::new();
    put_attr(&mut flags, NFQA_CFG_FLAGS, &NFQA_CFG_F_GSO.to_be_bytes());
    put_attr(&mut flags, NFQA_CFG_MASK, &NFQA_CFG_F_GSO.to_be_bytes());
    request(&sock, NFQNL_MSG_CONFIG, &flags, true)?;
    Ok(sock)
}

/// Appends one netlink attribute (4-byte aligned).
fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One config attribute, acknowledged.
fn config(sock: &OwnedFd, payload: &[u8], kind: u16) -> Result<(), String> {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, kind, payload);
    request(sock, NFQNL_MSG_CONFIG, &attrs, true)
}

/// Sends one nfnetlink_queue message (nlmsghdr + nfgenmsg + attrs); with `ack`, waits for
/// the kernel's answer and returns its error.
fn request(sock: &OwnedFd, msg: u16, attrs: &[u8], ack: bool) -> Result<(), String> {
    let len = 16 + 4 + attrs.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid (kernel)
    buf.push(libc::AF_UNSPEC as u8); // nfgen_family
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&QUEUE_NUM.to_be_bytes()); // res_id
    buf.extend_from_slice(attrs);
    // SAFETY: send(2) of an initialised buffer (the socket is bound; pid 0 is the kernel).
    if unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) } < 0 {
        return Err(os_err("send to nfnetlink_queue"));
    }
    if !ack {
        return Ok(());
    }
    let mut reply = [0u8; 4096];
    loop {
        // SAFETY: recv(2) into a stack buffer of the given size.
        let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            return Err(os_err("recv nfnetlink_queue ack"));
        }
        let n = n as usize;
        if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
            let err = i32::from_ne_bytes(reply[16..20].try_into().unwrap());
            return if err == 0 {
                Ok(())
            } else {
                Err(format!(
                    "nfnetlink_queue config: {}",
                    std::io::Error::from_raw_os_error(-err)
                ))
            };
        }
        // Anything else (a packet already queued) cannot come before the bind's ack.
    }
}

/// The delay loop: receive queued packets' ids, release each `delay` after it arrived.
fn run(sock: &OwnedFd, delay: Duration, stats: &WanStats, stop: &AtomicBool) -> Result<(), String> {
    let fd = sock.as_raw_fd();
    let mut held: VecDeque<(u32, Instant)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = held
            .front()
            .map(|&(_, at)| at.saturating_duration_since(now))
            .unwrap_or(POLL_MAX)
            .min(POLL_MAX);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // ppoll: a nanosecond timeout (poll's milliseconds would add up to 1 ms per packet).
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: ppoll(2) on one valid pollfd, a valid timespec, no signal mask.
        let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(os_err("poll"));
        }
        if r > 0 {
            loop {
                // SAFETY: recv(2) into our buffer, non-blocking.
                let n = unsafe {
                    libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EINTR) => break,
                        // Messages were lost (the socket buffer overflowed): the kernel
                        // still holds those packets; the batch verdict below covers them.
                        Some(libc::ENOBUFS) => {
                            stats.overruns.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        _ => return Err(format!("recv: {e}")),
                    }
                }
                let arrived = Instant::now();
                for id in packet_ids(&buf[..n as usize]) {
                    held.push_back((id, arrived + delay));
                }
            }
            let h = held.len() as u64;
            stats.max_held.fetch_max(h, Ordering::Relaxed);
        }
        // Release every packet that is due: ids grow in arrival order and the delay is
        // constant, so "ACCEPT all ids up to the last due one" is exact.
        let now = Instant::now();
        let mut last = None;
        let mut count = 0;
        while let Some(&(id, at)) = held.front() {
            if at > now {
                break;
            }
            last = Some(id);
            count += 1;
            held.pop_front();
        }
        if let Some(id) = last {
            let mut hdr = Vec::with_capacity(8);
            hdr.extend_from_slice(&NF_ACCEPT.to_be_bytes());
            hdr.extend_from_slice(&id.to_be_bytes());
            let mut attrs = Vec::new();
            put_attr(&mut attrs, NFQA_VERDICT_HDR, &hdr);
            request(sock, NFQNL_MSG_VERDICT_BATCH, &attrs, false)?;
            stats.delayed.fetch_add(count, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The packet ids of the `NFQNL_MSG_PACKET` messages in one netlink datagram.
fn packet_ids(mut data: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && len >= 20 {
            // Attributes after nlmsghdr (16) + nfgenmsg (4).
            let mut attrs = &data[20..len];
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let akind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if akind == NFQA_PACKET_HDR && alen >= 8 {
                    ids.push(u32::from_be_bytes(attrs[4..8].try_into().unwrap()));
                    break;
                }
                attrs = attrs.get((alen + 3) & !3..).unwrap_or(&[]);
            }
        }
        let step = (len + 3) & !3;
        if step >= data.len() {
            break;
        }
        data = &data[step..];
    }
    ids
}
