//! In-memory QUIC stream throughput on one core: two `Transport`s wired back to back in one
//! thread, no sockets, no loss. Measures what quinn-proto + rustls (ring AES-GCM) + burrow's
//! transport layer cost per byte, i.e. the ceiling for a direct path before any syscall.
//!
//! Run: `cargo bench --bench quic_loopback` (optional env `BURROW_BENCH_MB`, default 512).

use std::time::{Duration, Instant};

use burrow::identity::Identity;
use burrow::transport::{Dir, Event, StreamChunk, Transport, TransportConfig};
use bytes::Bytes;

/// CPU time this thread has used: the machine is shared, so wall-clock rates understate
/// what one core does; MB per CPU-second is the stable number.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Returns (wall-clock MB/s, MB per CPU-second, wall time).
fn run(total: usize, max_segments: usize) -> (f64, f64, Duration) {
    let id_a = Identity::from_secret([1; 32]);
    let id_b = Identity::from_secret([2; 32]);
    let config = |seed: u8| TransportConfig {
        rng_seed: [seed; 32],
        max_segments,
        ..TransportConfig::default()
    };
    let mut a = Transport::new(&id_a, config(1)).unwrap();
    let mut b = Transport::new(&id_b, config(2)).unwrap();
    let (pa, pb) = (id_a.peer_id(), id_b.peer_id());

    let ca = a.connect(Instant::now(), pb).unwrap();
    let mut cb = None;
    let mut connected_a = false;
    // One shared 1 MiB buffer, handed to the stream zero-copy again and again.
    let payload = Bytes::from(vec![0x5au8; 1 << 20]);
    let mut pending = Bytes::new();
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut stream = None;
    let mut recv_stream = None;
    let mut finished = false;
    let mut start = None;
    let mut cpu_start = Duration::ZERO;
    let mut steps = 0u64;

    loop {
        steps += 1;
        assert!(steps < 50_000_000, "benchmark did not finish");
        let now = Instant::now();
        // Sender: fill the stream as far as flow control allows.
        if connected_a && start.is_some() {
            let s = *stream.get_or_insert_with(|| a.open_stream(ca, Dir::Uni).unwrap().unwrap());
            while sent < total {
                if pending.is_empty() {
                    pending = payload.slice(..payload.len().min(total - sent));
                }
                let n = a.write_bytes(ca, s, &mut pending).unwrap();
                if n == 0 {
                    break;
                }
                sent += n;
            }
            if sent == total && !finished {
                a.finish(ca, s).unwrap();
                finished = true;
            }
        }
        while let Some(t) = a.poll_transmit(now) {
            for d in t.datagrams() {
                b.handle_datagram(now, pa, d);
            }
        }
        while let Some(t) = b.poll_transmit(now) {
            for d in t.datagrams() {
                a.handle_datagram(now, pb, d);
            }
        }
        while let Some(e) = a.poll_event() {
            if let Event::Connected { .. } = e {
                connected_a = true;
            }
        }
        while let Some(e) = b.poll_event() {
            if let Event::Connected { conn, .. } = e {
                cb = Some(conn);
            }
        }
        if connected_a && cb.is_some() && start.is_none() {
            start = Some(Instant::now());
            cpu_start = thread_cpu_time();
        }
        if let Some(cb) = cb {
            if recv_stream.is_none() {
                recv_stream = b.accept_stream(cb, Dir::Uni).unwrap();
            }
            if let Some(rs) = recv_stream {
                loop {
                    match b.read_chunk(cb, rs, usize::MAX).unwrap() {
                        StreamChunk::Data(chunk) => received += chunk.len(),
                        StreamChunk::Blocked => break,
                        StreamChunk::Finished => {
                            assert_eq!(received, total);
                            let elapsed = start.unwrap().elapsed();
                            let cpu = thread_cpu_time() - cpu_start;
                            return (
                                total as f64 / elapsed.as_secs_f64() / 1e6,
                                total as f64 / cpu.as_secs_f64() / 1e6,
                                elapsed,
                            );
                        }
                    }
                }
            }
        }
        for t in [&mut a, &mut b] {
            if t.poll_timeout().is_some_and(|d| d <= now) {
                t.handle_timeout(now);
            }
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it as a quick smoke test.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mb: usize = std::env::var("BURROW_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 8 } else { 512 });
    for segments in [1, 10] {
        let (rate, cpu_rate, elapsed) = run(mb << 20, segments);
        println!(
            "quic_loopback: {mb} MiB over one in-memory stream, max_segments {segments}: \
             {rate:.0} MB/s wall ({:.2} s), {cpu_rate:.0} MB per CPU-second \
             (sender + receiver on one thread)",
            elapsed.as_secs_f64()
        );
    }
}
