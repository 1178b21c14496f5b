//! A file sent while the path switches from the relay to the direct path arrives intact on
//! one QUIC connection: the real relay server, two node reactors and the file protocols, in
//! process, on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burrow::app::{FileSender, FileSenderConfig, ListenConfig, Listener};
use burrow::driver::node::{DriverConfig, NodeDriver};
use burrow::driver::relay::{RelayServerConfig, StopPipe};
use burrow::identity::Identity;
use burrow::node::{NodeConfig, NodeCore, NodeEvent, PathKind};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{Event, Side, Transport, TransportConfig};
use burrow::wire::PeerId;

fn node(id: &Identity, relay: std::net::SocketAddr) -> NodeDriver {
    NodeDriver::new(
        NodeConfig::new(id.clone(), relay),
        DriverConfig {
            udp4: "127.0.0.1:0".parse().unwrap(),
            udp6: None,
        },
    )
    .unwrap()
}

fn transport(id: &Identity) -> Transport {
    let config = TransportConfig {
        rng_seed: [7; 32],
        ..TransportConfig::default()
    };
    Transport::new(id, config).unwrap()
}

struct Receiver {
    listener: Listener,
    registered: Arc<AtomicBool>,
}

impl Service for Receiver {
    fn on_transport_event(&mut self, now: Instant, t: &mut Transport, e: Event) {
        self.listener.handle_event(now, t, &e);
        while self.listener.poll_report().is_some() {}
    }
    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, e: &NodeEvent) {
        if matches!(e, NodeEvent::Registered { .. }) {
            self.registered.store(true, Ordering::Relaxed);
        }
    }
    fn on_tick(&mut self, now: Instant, _core: &mut NodeCore, t: &mut Transport) {
        self.listener.on_tick(now, t);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.listener.poll_timeout()
    }
    fn is_done(&self) -> bool {
        false
    }
}

struct Sender {
    peer: PeerId,
    sender: FileSender,
    started: bool,
    released: bool,
    paths: Vec<PathKind>,
    connections: u32,
    total: u64,
}

impl Service for Sender {
    fn on_transport_event(&mut self, now: Instant, t: &mut Transport, e: Event) {
        if let Event::Connected {
            conn,
            peer,
            side: Side::Client,
        } = &e
            && *peer == self.peer
        {
            self.connections += 1;
            if !self.started {
                self.started = true;
                self.sender.start(now, t, *conn);
            }
            return;
        }
        self.sender.handle_event(now, t, &e);
    }
    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, e: &NodeEvent) {
        if let NodeEvent::PathChanged { path, .. } = e {
            self.paths.push(*path);
        }
    }
    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, t: &mut Transport) {
        self.sender.on_tick(now, t);
        // A third of the file over the relay, then let the punched path take over.
        if !self.released && self.sender.progress().bytes_done > self.total / 3 {
            self.released = true;
            assert_eq!(core.path(now, &self.peer), Some(PathKind::RelayUdp));
            core.set_direct_allowed(now, true);
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.sender.poll_timeout()
    }
    fn is_done(&self) -> bool {
        self.sender.is_done()
    }
}

#[test]
fn a_file_sent_across_a_relay_to_direct_switch_arrives_intact() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    let mut data = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let out = dir.path().join("inbox");
    std::fs::create_dir_all(&out).unwrap();

    let stop = StopPipe::new().unwrap();
    let relay_stop = stop.handle().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let relay_thread = std::thread::spawn(move || {
        let mut cfg = RelayServerConfig::new("127.0.0.1:0".parse().unwrap());
        cfg.limits.relay_bytes_per_sec = 10_000_000_000;
        cfg.limits.relay_burst_bytes = 64 << 20;
        let server = burrow::driver::relay::bind(cfg, stop).unwrap();
        tx.send(server.local_addr()).unwrap();
        server.run()
    });
    let relay = rx.recv().unwrap();

    let (ida, idb) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    );
    let mut a = node(&ida, relay);
    let (a_stop, a_waker) = a.stop_handle();
    let registered = Arc::new(AtomicBool::new(false));
    let receiver = Receiver {
        listener: Listener::new(ListenConfig {
            out_dir: Some(out.clone()),
            ..ListenConfig::default()
        }),
        registered: registered.clone(),
    };
    let ta = transport(&ida);
    let a_thread = std::thread::spawn(move || {
        let mut plane = DataPlane::new(ta, receiver);
        a.run(&mut plane, None)
    });
    let wait = Instant::now() + Duration::from_secs(20);
    while !registered.load(Ordering::Relaxed) {
        assert!(Instant::now() < wait, "A never registered");
        std::thread::sleep(Duration::from_millis(2));
    }

    let mut b = node(&idb, relay);
    let now = Instant::now();
    b.core().set_direct_allowed(now, false);
    let (files, skipped) = FileSender::plan(std::slice::from_ref(&src)).unwrap();
    let sender = Sender {
        peer: ida.peer_id(),
        sender: FileSender::new(FileSenderConfig::default(), files, skipped),
        started: false,
        released: false,
        paths: Vec::new(),
        connections: 0,
        total: data.len() as u64,
    };
    let mut plane = DataPlane::new(transport(&idb), sender);
    plane.connect(now, b.core(), ida.peer_id());
    b.run(&mut plane, Some(now + Duration::from_secs(120)))
        .unwrap();

    a_stop.store(true, Ordering::Relaxed);
    let _ = a_waker.wake();
    relay_stop.stop();
    a_thread.join().unwrap().unwrap();
    relay_thread.join().unwrap().unwrap();

    let s = plane.service_mut();
    assert!(s.sender.is_done(), "the send did not finish");
    let summary = s.sender.summary();
    assert!(summary.is_success(), "{:?}", summary.failures);
    assert!(s.released, "the path never got released mid-file");
    assert!(
        s.paths.iter().any(|p| matches!(p, PathKind::Direct(_))),
        "never went direct: {:?}",
        s.paths
    );
    assert_eq!(s.connections, 1, "one QUIC connection throughout");
    assert_eq!(std::fs::read(out.join("big.bin")).unwrap(), data);
}
