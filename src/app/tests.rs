//! End-to-end tests: two transports back to back through an in-memory link with a virtual
//! clock (adapted from the transport tests), each driven with one application machine.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::protocol::*;
use super::*;
use crate::identity::Identity;
use crate::transport::{ConnectionHandle, Dir, TransportConfig};
use crate::wire::PeerId;

fn identity(n: u8) -> Identity {
    Identity::from_secret([n; 32])
}

/// A machine that does nothing (for a side driven by hand in the test).
struct Idle;

impl Machine for Idle {
    fn handle_event(&mut self, _: Instant, _: &mut Transport, _: &Event) -> bool {
        false
    }
    fn on_tick(&mut self, _: Instant, _: &mut Transport) {}
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn is_done(&self) -> bool {
        false
    }
}

struct Net {
    now: Instant,
    nodes: Vec<Transport>,
    ids: Vec<PeerId>,
    /// Events no machine used (Connected, ConnectionLost...), per node.
    unused: Vec<Vec<Event>>,
    queue: BTreeMap<(Instant, u64), (usize, PeerId, Vec<u8>)>,
    seq: u64,
    latency: Duration,
    /// Datagrams from each node pass only while this is true.
    up: bool,
    /// Percent of datagrams dropped (seeded, deterministic).
    loss_pct: u64,
    rng: u64,
    seed: u64,
}

impl Net {
    fn new(seed: u64, latency: Duration) -> Net {
        let nodes = [1u8, 2]
            .iter()
            .map(|&s| {
                let config = TransportConfig {
                    rng_seed: [s.wrapping_add(seed as u8); 32],
                    ..TransportConfig::default()
                };
                Transport::new(&identity(s), config).unwrap()
            })
            .collect();
        Net {
            now: Instant::now(),
            nodes,
            ids: vec![identity(1).peer_id(), identity(2).peer_id()],
            unused: vec![Vec::new(), Vec::new()],
            queue: BTreeMap::new(),
            seq: 0,
            latency,
            up: true,
            loss_pct: 0,
            rng: seed,
            seed,
        }
    }

    /// splitmix64.
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn flush(&mut self, i: usize, app: &mut dyn Machine) {
        loop {
            let mut any = false;
            while let Some(t) = self.nodes[i].poll_transmit(self.now) {
                any = true;
                if !self.up {
                    continue;
                }
                let to = self.ids.iter().position(|p| *p == t.peer).unwrap();
                for d in t.datagrams() {
                    if self.loss_pct > 0 && self.random() % 100 < self.loss_pct {
                        continue;
                    }
                    self.seq += 1;
                    self.queue.insert(
                        (self.now + self.latency, self.seq),
                        (to, self.ids[i], d.to_vec()),
                    );
                }
            }
            while let Some(e) = self.nodes[i].poll_event() {
                any = true;
                if !app.handle_event(self.now, &mut self.nodes[i], &e) {
                    self.unused[i].push(e);
                }
            }
            app.on_tick(self.now, &mut self.nodes[i]);
            if !any {
                break;
            }
        }
    }

    fn step(&mut self, a: &mut dyn Machine, b: &mut dyn Machine) {
        self.flush(0, a);
        self.flush(1, b);
        let next = [
            self.queue.keys().next().map(|k| k.0),
            self.nodes[0].poll_timeout(),
            self.nodes[1].poll_timeout(),
            a.poll_timeout(),
            b.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return };
        if next > self.now {
            self.now = next;
        }
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (to, from, data) = entry.remove();
            self.nodes[to].handle_datagram(self.now, from, &data);
        }
        for n in &mut self.nodes {
            if n.poll_timeout().is_some_and(|t| t <= self.now) {
                n.handle_timeout(self.now);
            }
        }
    }

    fn run(
        &mut self,
        max: usize,
        a: &mut dyn Machine,
        b: &mut dyn Machine,
        mut done: impl FnMut(&mut Net, &mut dyn Machine, &mut dyn Machine) -> bool,
    ) {
        for _ in 0..max {
            if done(self, a, b) {
                return;
            }
            self.step(a, b);
        }
        panic!("not done after {max} steps (seed {})", self.seed);
    }

    fn connected(&self, node: usize) -> Option<ConnectionHandle> {
        self.unused[node].iter().find_map(|e| match e {
            Event::Connected { conn, .. } => Some(*conn),
            _ => None,
        })
    }

    /// Node 0 dials node 1; returns both handles.
    fn connect(&mut self) -> (ConnectionHandle, ConnectionHandle) {
        for u in &mut self.unused {
            u.clear();
        }
        let peer = self.ids[1];
        self.nodes[0].connect(self.now, peer).unwrap();
        self.run(10_000, &mut Idle, &mut Idle, |net, _, _| {
            net.connected(0).is_some() && net.connected(1).is_some()
        });
        let r = (self.connected(0).unwrap(), self.connected(1).unwrap());
        for u in &mut self.unused {
            u.clear();
        }
        r
    }
}

/// Deterministic bytes (xorshift), distinct per seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn listener(out: &Path, overwrite: bool) -> Listener {
    Listener::new(ListenConfig {
        out_dir: Some(out.to_path_buf()),
        overwrite,
        pipe: false,
        bench: false,
    })
}

fn sender(args: &[PathBuf]) -> FileSender {
    let (files, skipped) = FileSender::plan(args).unwrap();
    FileSender::new(FileSenderConfig::default(), files, skipped)
}

/// Connects, sends `args`, runs until the sender is done; returns the sender and listener.
fn send_all(
    net: &mut Net,
    args: &[PathBuf],
    out: &Path,
    overwrite: bool,
) -> (FileSender, Listener) {
    let (ca, _) = net.connect();
    let mut s = sender(args);
    let mut l = listener(out, overwrite);
    s.start(net.now, &mut net.nodes[0], ca);
    net.run(500_000, &mut s, &mut l, |_, s, _| s.is_done());
    // Let the listener see the last acknowledgements.
    for _ in 0..20 {
        net.step(&mut s, &mut l);
    }
    (s, l)
}

fn reports(l: &mut Listener) -> Vec<ListenReport> {
    std::iter::from_fn(|| l.poll_report()).collect()
}

fn partial_files(out: &Path) -> Vec<PathBuf> {
    match fs::read_dir(out.join(file_recv::PARTIAL_DIR)) {
        Ok(d) => d.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn directory_tree_arrives_byte_identical() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    fs::create_dir_all(tree.join("empty-dir")).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("small.txt", b"hello\n".to_vec()),
        ("sub/big.bin", pattern(3 << 20, 1)),
        ("sub/deeper/mid.bin", pattern(300_000, 2)),
        (
            "sub/deeper/all-bytes",
            (0..=255u8).cycle().take(70_000).collect(),
        ),
    ];
    for (name, data) in &files {
        fs::write(tree.join(name), data).unwrap();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tree.join("small.txt"), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let single = src.path().join("single.dat");
    fs::write(&single, pattern(5000, 3)).unwrap();

    let mut net = Net::new(1, Duration::from_millis(2));
    let (s, mut l) = send_all(&mut net, &[tree.clone(), single.clone()], out.path(), false);
    let summary = s.summary();
    assert!(summary.is_success(), "{:?}", summary.failures);
    assert_eq!(summary.files_ok, 6);
    let total: u64 = files.iter().map(|f| f.1.len() as u64).sum::<u64>() + 5000;
    assert_eq!(summary.bytes_ok, total);
    assert_eq!(summary.bytes_sent, total);
    assert!(summary.elapsed > Duration::ZERO);
    let progress = s.progress();
    assert_eq!(progress.bytes_done, progress.bytes_total);
    assert_eq!(progress.files_done, 6);
    for (name, data) in &files {
        let got = fs::read(out.path().join("tree").join(name)).unwrap();
        assert!(got == *data, "{name} differs");
    }
    assert_eq!(
        fs::read(out.path().join("single.dat")).unwrap(),
        pattern(5000, 3)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(out.path().join("tree/small.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
    }
    // No leftovers: partials and sidecars were all moved or removed.
    assert!(
        partial_files(out.path()).is_empty(),
        "{:?}",
        partial_files(out.path())
    );
    let received = reports(&mut l)
        .into_iter()
        .filter(|r| matches!(r, ListenReport::File(FileReport::Received { .. })))
        .count();
    assert_eq!(received, 6);
}

#[test]
fn files_arrive_intact_over_a_lossy_link() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = src.path().join("d");
    fs::create_dir(&d).unwrap();
    let datas: Vec<Vec<u8>> = (0..5)
        .map(|i| pattern(100_000 + i * 150_000, 20 + i as u64))
        .collect();
    for (i, data) in datas.iter().enumerate() {
        fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    let mut net = Net::new(20, Duration::from_millis(10));
    let (ca, _) = net.connect();
    net.loss_pct = 5;
    let mut s = sender(std::slice::from_ref(&d));
    let mut l = listener(out.path(), false);
    s.start(net.now, &mut net.nodes[0], ca);
    net.run(500_000, &mut s, &mut l, |_, s, _| s.is_done());
    let summary = s.summary();
    assert!(summary.is_success(), "{:?} (seed 20)", summary.failures);
    for (i, data) in datas.iter().enumerate() {
        assert!(
            fs::read(out.path().join(format!("d/f{i}"))).unwrap() == *data,
            "f{i}"
        );
    }
}

/// Sends one request frame by hand and returns the reply.
fn raw_request(net: &mut Net, l: &mut Listener, ca: ConnectionHandle, req: &Request) -> Reply {
    let s = net.nodes[0].open_stream(ca, Dir::Bi).unwrap().unwrap();
    let frame = encode_request(req);
    assert_eq!(net.nodes[0].write(ca, s, &frame).unwrap(), frame.len());
    let mut reader = FrameReader::new();
    let mut reply = None;
    net.run(10_000, &mut Idle, l, |net, _, _| {
        if let Ok(FramePoll::Frame(f)) = reader.poll(&mut net.nodes[0], ca, s) {
            reply = Some(decode_reply(&f).unwrap());
        }
        reply.is_some()
    });
    reply.unwrap()
}

#[test]
fn traversal_names_are_rejected_with_a_reason() {
    let out = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), out.path().join("link")).unwrap();
    let mut net = Net::new(2, Duration::from_millis(1));
    let (ca, _) = net.connect();
    let mut l = listener(out.path(), false);
    for path in [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "C:\\x",
        "c:/x",
        "link/x",
        "link",
        ".burrow-partial/x.part",
        "nul\0byte",
    ] {
        let reply = raw_request(
            &mut net,
            &mut l,
            ca,
            &Request::File {
                path: path.into(),
                size: 3,
                executable: false,
                resume: true,
            },
        );
        match reply {
            Reply::Reject(r) => {
                assert!(
                    r.code == REASON_BAD_PATH || (path == "link" && r.code == REASON_EXISTS),
                    "{path:?}: {r}"
                );
                assert!(!r.message.is_empty());
            }
            other => panic!("{path:?} got {other:?}"),
        }
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    let refused = reports(&mut l)
        .into_iter()
        .filter(|r| matches!(r, ListenReport::File(FileReport::Rejected { .. })))
        .count();
    assert_eq!(refused, 10);
    // Garbage instead of a request is refused too, and the listener carries on.
    let s = net.nodes[0].open_stream(ca, Dir::Bi).unwrap().unwrap();
    net.nodes[0].write(ca, s, &[0, 0, 0, 3, 1, 77, 77]).unwrap();
    let reply = raw_request(&mut net, &mut l, ca, &Request::Pipe);
    assert!(matches!(
        reply,
        Reply::Reject(Reason {
            code: REASON_NOT_ACCEPTING,
            ..
        })
    ));
}

#[test]
fn a_truncated_stream_gets_a_failed_reply_and_no_file() {
    let out = tempfile::tempdir().unwrap();
    let mut net = Net::new(19, Duration::from_millis(1));
    let (ca, _) = net.connect();
    let mut l = listener(out.path(), false);
    let s = net.nodes[0].open_stream(ca, Dir::Bi).unwrap().unwrap();
    let mut bytes = encode_request(&Request::File {
        path: "short".into(),
        size: 100,
        executable: false,
        resume: true,
    });
    bytes.extend_from_slice(b"only ten b");
    net.nodes[0].write(ca, s, &bytes).unwrap();
    net.nodes[0].finish(ca, s).unwrap();
    let mut reader = FrameReader::new();
    let mut replies = Vec::new();
    net.run(10_000, &mut Idle, &mut l, |net, _, _| {
        while let Ok(FramePoll::Frame(f)) = reader.poll(&mut net.nodes[0], ca, s) {
            replies.push(decode_reply(&f).unwrap());
        }
        replies.len() == 2
    });
    assert!(matches!(
        replies[0],
        Reply::Accept {
            resume_offset: 0,
            ..
        }
    ));
    match &replies[1] {
        Reply::Failed(r) => assert_eq!(r.code, REASON_PROTOCOL, "{r}"),
        other => panic!("{other:?}"),
    }
    assert!(!out.path().join("short").exists());
}

#[test]
fn sender_reports_a_symlinked_directory_inside_out_dir() {
    // The sender's tree has a real directory "link"; the receiver's DIR has a symlink of
    // that name pointing outside: the file must not land outside.
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("t/link")).unwrap();
    fs::write(src.path().join("t/link/x"), b"payload").unwrap();
    fs::create_dir(out.path().join("t")).unwrap();
    std::os::unix::fs::symlink(outside.path(), out.path().join("t/link")).unwrap();
    let mut net = Net::new(3, Duration::from_millis(1));
    let (s, _) = send_all(&mut net, &[src.path().join("t")], out.path(), false);
    let summary = s.summary();
    assert_eq!(summary.files_ok, 0);
    assert_eq!(summary.failures.len(), 1);
    assert!(
        summary.failures[0].reason.contains("symlink"),
        "{:?}",
        summary.failures
    );
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn no_overwrite_without_the_flag() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("doc.txt");
    fs::write(&f, b"new contents").unwrap();
    fs::write(out.path().join("doc.txt"), b"old").unwrap();
    let mut net = Net::new(4, Duration::from_millis(1));
    let (s, _) = send_all(&mut net, std::slice::from_ref(&f), out.path(), false);
    let summary = s.summary();
    assert!(!summary.is_success());
    assert!(
        summary.failures[0].reason.contains("exists"),
        "{:?}",
        summary.failures
    );
    assert_eq!(fs::read(out.path().join("doc.txt")).unwrap(), b"old");

    let (s, _) = send_all(&mut net, std::slice::from_ref(&f), out.path(), true);
    assert!(s.summary().is_success(), "{:?}", s.summary().failures);
    assert_eq!(
        fs::read(out.path().join("doc.txt")).unwrap(),
        b"new contents"
    );
}

#[test]
fn receiver_disconnect_leaves_no_final_file_and_sender_fails() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("big.bin");
    let data = pattern(4 << 20, 5);
    fs::write(&f, &data).unwrap();
    let mut net = Net::new(5, Duration::from_millis(2));
    let (s, mut l) = interrupted_send(&mut net, &f, out.path(), 1 << 20);
    let summary = s.summary();
    assert_eq!(summary.files_ok, 0);
    assert_eq!(summary.failures.len(), 1);
    assert!(
        summary.failures[0].reason.contains("connection lost"),
        "{:?}",
        summary.failures
    );
    assert!(!out.path().join("big.bin").exists());
    // The partial is kept (for a resume), under its own name only.
    let partials = partial_files(out.path());
    assert_eq!(partials.len(), 2, "{partials:?}");
    assert!(partials.iter().any(|p| p.extension().unwrap() == "part"));
    // The receiver reports the failure once its closed connection has drained.
    let mut s = s;
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        seen.extend(reports(&mut l));
        if seen
            .iter()
            .any(|r| matches!(r, ListenReport::File(FileReport::Failed { .. })))
        {
            break;
        }
        net.step(&mut s, &mut l);
    }
    assert!(
        seen.iter()
            .any(|r| matches!(r, ListenReport::File(FileReport::Failed { .. }))),
        "{seen:?}"
    );
    assert!(!out.path().join("big.bin").exists());
}

/// Starts sending `file`, closes the receiver's connection once it holds `cut_at` bytes,
/// and runs until the sender noticed.
fn interrupted_send(net: &mut Net, file: &Path, out: &Path, cut_at: u64) -> (FileSender, Listener) {
    let (ca, cb) = net.connect();
    let mut s = sender(&[file.to_path_buf()]);
    let mut l = listener(out, false);
    s.start(net.now, &mut net.nodes[0], ca);
    let mut cut = false;
    net.run(500_000, &mut s, &mut l, |net, s, l| {
        if !cut {
            // Downcast-free peek: the listener's progress is reachable through the report
            // of the machine the test passed in, so look at the file on disk instead.
            let _ = l;
            let held: u64 = partial_files(out)
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "part"))
                .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            if held >= cut_at {
                net.nodes[1]
                    .close(net.now, cb, 0, b"receiver quit")
                    .unwrap();
                cut = true;
            }
        }
        s.is_done()
    });
    assert!(cut);
    (s, l)
}

#[test]
fn resume_continues_from_the_partial() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("big.bin");
    let data = pattern(4 << 20, 6);
    fs::write(&f, &data).unwrap();
    let mut net = Net::new(6, Duration::from_millis(2));
    let (s, _) = interrupted_send(&mut net, &f, out.path(), 2 << 20);
    assert!(!s.summary().is_success());
    let held: u64 = partial_files(out.path())
        .iter()
        .filter(|p| p.extension().unwrap() == "part")
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(held >= 2 << 20);
    // Let the closed connections drain before reconnecting.
    net.run(100_000, &mut Idle, &mut Idle, |net, _, _| {
        net.nodes[0].connection_count() == 0 && net.nodes[1].connection_count() == 0
    });

    let (s, mut l) = send_all(&mut net, std::slice::from_ref(&f), out.path(), false);
    let summary = s.summary();
    assert!(summary.is_success(), "{:?}", summary.failures);
    assert_eq!(summary.bytes_ok, data.len() as u64);
    assert!(
        summary.bytes_sent < data.len() as u64 - (1 << 20),
        "sent {} of {}",
        summary.bytes_sent,
        data.len()
    );
    assert_eq!(summary.bytes_sent, data.len() as u64 - held);
    assert!(fs::read(out.path().join("big.bin")).unwrap() == data);
    assert!(partial_files(out.path()).is_empty());
    let resumed = reports(&mut l).into_iter().find_map(|r| match r {
        ListenReport::File(FileReport::Received { resumed_from, .. }) => Some(resumed_from),
        _ => None,
    });
    assert_eq!(resumed, Some(held));
}

#[test]
fn resume_restarts_when_the_file_changed() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("big.bin");
    fs::write(&f, pattern(2 << 20, 16)).unwrap();
    let mut net = Net::new(16, Duration::from_millis(2));
    let (s, _) = interrupted_send(&mut net, &f, out.path(), 1 << 20);
    assert!(!s.summary().is_success());
    net.run(100_000, &mut Idle, &mut Idle, |net, _, _| {
        net.nodes[0].connection_count() == 0 && net.nodes[1].connection_count() == 0
    });
    // Same name, same size, other bytes: the receiver's partial is not a prefix of it.
    let data = pattern(2 << 20, 17);
    fs::write(&f, &data).unwrap();
    let (s, mut l) = send_all(&mut net, std::slice::from_ref(&f), out.path(), false);
    let summary = s.summary();
    assert!(summary.is_success(), "{:?}", summary.failures);
    assert!(fs::read(out.path().join("big.bin")).unwrap() == data);
    // All of it went over the wire on the fresh attempt.
    assert!(summary.bytes_sent >= data.len() as u64);
    let resumed = reports(&mut l).into_iter().find_map(|r| match r {
        ListenReport::File(FileReport::Received { resumed_from, .. }) => Some(resumed_from),
        _ => None,
    });
    assert_eq!(resumed, Some(0));
}

#[test]
fn a_rerun_supersedes_a_stream_the_receiver_still_holds() {
    // The sender vanishes without its close reaching the receiver, which still holds the
    // old connection and stream when the re-run arrives: the new request takes over and
    // resumes instead of being refused as busy.
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("big.bin");
    let data = pattern(3 << 20, 18);
    fs::write(&f, &data).unwrap();
    let mut net = Net::new(18, Duration::from_millis(2));
    let (ca, _) = net.connect();
    let mut s = sender(std::slice::from_ref(&f));
    let mut l = listener(out.path(), false);
    s.start(net.now, &mut net.nodes[0], ca);
    net.run(500_000, &mut s, &mut l, |_, _, _| {
        partial_files(out.path())
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "part"))
            .any(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0) >= 1 << 20)
    });
    net.up = false;
    net.nodes[0].close(net.now, ca, 0, b"crash").unwrap();
    net.run(100_000, &mut s, &mut l, |net, _, _| {
        net.nodes[0].connection_count() == 0
    });
    net.up = true;
    net.queue.clear();
    assert_eq!(
        net.nodes[1].connection_count(),
        1,
        "receiver still holds the old one"
    );
    assert_eq!(l.incoming().len(), 1);

    let (ca, _) = net.connect();
    let mut s = sender(std::slice::from_ref(&f));
    s.start(net.now, &mut net.nodes[0], ca);
    net.run(500_000, &mut s, &mut l, |_, s, _| s.is_done());
    let summary = s.summary();
    assert!(summary.is_success(), "{:?}", summary.failures);
    assert!(summary.bytes_sent < data.len() as u64);
    assert!(fs::read(out.path().join("big.bin")).unwrap() == data);
}

#[test]
fn hash_mismatch_fails_and_leaves_no_file() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("x.bin");
    fs::write(&f, pattern(200_000, 7)).unwrap();
    let mut net = Net::new(7, Duration::from_millis(1));
    let (ca, _) = net.connect();
    let mut s = sender(std::slice::from_ref(&f));
    s.corrupt_trailer = true;
    let mut l = listener(out.path(), false);
    s.start(net.now, &mut net.nodes[0], ca);
    net.run(100_000, &mut s, &mut l, |_, s, _| s.is_done());
    let summary = s.summary();
    assert_eq!(summary.files_ok, 0);
    assert!(
        summary.failures[0].reason.contains("hash mismatch"),
        "{:?}",
        summary.failures
    );
    assert!(!out.path().join("x.bin").exists());
    assert!(partial_files(out.path()).is_empty());
}

#[test]
fn connection_loss_before_start_fails_every_file() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for i in 0..6 {
        fs::write(src.path().join(format!("f{i}")), pattern(100_000, i)).unwrap();
    }
    let mut net = Net::new(8, Duration::from_millis(1));
    let (ca, cb) = net.connect();
    let args: Vec<PathBuf> = (0..6).map(|i| src.path().join(format!("f{i}"))).collect();
    let mut s = sender(&args);
    let mut l = listener(out.path(), false);
    net.nodes[1].close(net.now, cb, 0, b"bye").unwrap();
    s.start(net.now, &mut net.nodes[0], ca);
    net.run(100_000, &mut s, &mut l, |_, s, _| s.is_done());
    let summary = s.summary();
    assert_eq!(summary.failures.len() + summary.files_ok, 6);
    assert!(!summary.failures.is_empty());
}

#[test]
fn pipe_carries_binary_both_ways_and_closes_on_eof() {
    let mut net = Net::new(9, Duration::from_millis(3));
    let (ca, _) = net.connect();
    let mut opener = Pipe::open(&mut net.nodes[0], ca);
    let mut l = Listener::new(ListenConfig {
        out_dir: None,
        overwrite: false,
        pipe: true,
        bench: false,
    });
    let up: Vec<u8> = (0..=255u8)
        .cycle()
        .take(100_000)
        .chain(pattern(900_000, 9))
        .collect();
    let down: Vec<u8> = pattern(700_000, 10);
    let (mut up_off, mut down_off) = (0, 0);
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    let mut steps = 0;
    while !(opener.is_done() && l.is_done()) {
        steps += 1;
        assert!(steps < 200_000, "pipe did not finish");
        let t0 = &mut net.nodes[0];
        if up_off < up.len() {
            up_off += opener.push_input(t0, &up[up_off..(up_off + 50_000).min(up.len())]);
            if up_off == up.len() {
                opener.input_eof(t0);
            }
        }
        while let Some(b) = opener.poll_output() {
            got_down.extend_from_slice(&b);
        }
        if let Some(p) = l.pipe_mut() {
            let t1 = &mut net.nodes[1];
            if down_off < down.len() {
                down_off += p.push_input(t1, &down[down_off..]);
                if down_off == down.len() {
                    p.input_eof(t1);
                }
            }
            while let Some(b) = p.poll_output() {
                got_up.extend_from_slice(&b);
            }
        }
        net.step(&mut opener, &mut l);
    }
    assert!(got_up == up, "opener → acceptor differs");
    assert!(got_down == down, "acceptor → opener differs");
    let stats = opener.outcome().unwrap().unwrap();
    assert_eq!(stats.bytes_sent, up.len() as u64);
    assert_eq!(stats.bytes_received, down.len() as u64);
    let reports = reports(&mut l);
    assert!(
        reports
            .iter()
            .any(|r| matches!(r, ListenReport::PipeOpened { .. }))
    );
    assert!(
        reports
            .iter()
            .any(|r| matches!(r, ListenReport::PipeEnded(Ok(_))))
    );
}

#[test]
fn pipe_half_close_keeps_the_other_direction() {
    let mut net = Net::new(10, Duration::from_millis(1));
    let (ca, _) = net.connect();
    let mut opener = Pipe::open(&mut net.nodes[0], ca);
    let mut l = Listener::new(ListenConfig {
        pipe: true,
        ..ListenConfig::default()
    });
    // The opener has nothing to say: EOF right away. The acceptor answers only after it
    // saw that EOF, and its answer must still arrive.
    opener.input_eof(&mut net.nodes[0]);
    let mut got = Vec::new();
    let mut replied = false;
    for _ in 0..50_000 {
        if let Some(p) = l.pipe_mut() {
            while p.poll_output().is_some() {}
            if !replied && p.peer_finished() {
                let t1 = &mut net.nodes[1];
                assert_eq!(p.push_input(t1, b"late reply"), 10);
                p.input_eof(t1);
                replied = true;
            }
        }
        while let Some(b) = opener.poll_output() {
            got.extend_from_slice(&b);
        }
        if opener.is_done() && l.is_done() {
            break;
        }
        net.step(&mut opener, &mut l);
    }
    assert!(replied);
    assert_eq!(got, b"late reply");
    assert!(matches!(opener.outcome(), Some(Ok(_))));
}

#[test]
fn pipe_is_not_done_while_the_peer_has_not_consumed_our_bytes() {
    // Closing a QUIC connection drops what the peer's application has not read, so the
    // opener must not be done (and close) while the acceptor's driver sits on our bytes.
    let mut net = Net::new(21, Duration::from_millis(1));
    let (ca, _) = net.connect();
    let mut opener = Pipe::open(&mut net.nodes[0], ca);
    let mut l = Listener::new(ListenConfig {
        pipe: true,
        ..ListenConfig::default()
    });
    let data = pattern(100_000, 21);
    assert_eq!(opener.push_input(&mut net.nodes[0], &data), data.len());
    opener.input_eof(&mut net.nodes[0]);
    for _ in 0..2_000 {
        if let Some(p) = l.pipe_mut()
            && !p.peer_finished()
        {
            let t1 = &mut net.nodes[1];
            p.input_eof(t1);
        }
        net.step(&mut opener, &mut l);
    }
    // Everything was acknowledged at the transport level long ago, but not consumed.
    assert!(
        !opener.is_done(),
        "done before the acceptor consumed our bytes"
    );
    let mut got = Vec::new();
    for _ in 0..10_000 {
        if let Some(p) = l.pipe_mut() {
            while let Some(b) = p.poll_output() {
                got.extend_from_slice(&b);
            }
        }
        if opener.is_done() && l.is_done() {
            break;
        }
        net.step(&mut opener, &mut l);
    }
    assert!(got == data);
    assert!(matches!(opener.outcome(), Some(Ok(_))));
    assert!(matches!(l.pipe_mut().unwrap().outcome(), Some(Ok(_))));
}

#[test]
fn pipe_refused_when_not_enabled() {
    let mut net = Net::new(11, Duration::from_millis(1));
    let (ca, _) = net.connect();
    let mut opener = Pipe::open(&mut net.nodes[0], ca);
    opener.push_input(&mut net.nodes[0], b"hello");
    let mut l = Listener::new(ListenConfig::default());
    net.run(10_000, &mut opener, &mut l, |_, o, _| o.is_done());
    match opener.outcome() {
        Some(Err(PipeError::Rejected(r))) => assert_eq!(r.code, REASON_NOT_ACCEPTING),
        other => panic!("{other:?}"),
    }
}

fn bench(seed: u64, reverse: bool, streams: u16, datagram_rate: Option<u64>) -> BenchSummary {
    // 50 ms one way: one second of virtual time is ten round trips, which keeps the
    // amount of data (and the test's run time) small.
    let mut net = Net::new(seed, Duration::from_millis(50));
    let (ca, _) = net.connect();
    let mut c = BenchClient::new(
        BenchConfig {
            seconds: 1,
            reverse,
            streams,
            datagram_rate,
        },
        ca,
    );
    let mut l = Listener::new(ListenConfig {
        bench: true,
        ..ListenConfig::default()
    });
    net.run(200_000, &mut c, &mut l, |_, c, _| c.is_done());
    let summary = c.summary();
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    assert!(summary.bytes > 0);
    assert!(summary.megabytes_per_second() > 0.0);
    assert!(!summary.samples.is_empty());
    assert!(summary.samples.iter().map(|s| s.bytes).sum::<u64>() > 0);
    summary
}

#[test]
fn bench_moves_data() {
    let s = bench(12, false, 1, None);
    assert!(s.datagrams.is_none());
}

#[test]
fn bench_reverse_with_several_streams() {
    bench(13, true, 3, None);
}

#[test]
fn bench_datagrams_count_loss_both_ways() {
    for (seed, reverse) in [(14, false), (15, true)] {
        let s = bench(seed, reverse, 1, Some(1_000_000));
        let d = s.datagrams.unwrap();
        eprintln!(
            "reverse={reverse}: {d:?}, {} bytes, {:?}",
            s.bytes, s.elapsed
        );
        assert!(d.received > 0, "{d:?}");
        assert_eq!(d.received + d.lost, d.sent, "{d:?}");
        // One second at 1 MB/s of ~1.2 kB datagrams.
        assert!(d.sent > 100, "{d:?}");
    }
}
