//! Loopback process tests: the real `burrow-relay` and `burrow` binaries on 127.0.0.1.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

#[test]
fn ping_goes_direct_through_a_real_relay() {
    let relay = Relay::start("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(relay.addr, dir.path(), &[]);
    let relay_s = relay.addr.to_string();
    let key = dir.path().join("pinger.key");
    let out = burrow(&[
        "ping",
        &listener.peer,
        "--relay",
        &relay_s,
        "--identity",
        key.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--no-ipv6",
        "--json",
        "--interval",
        "0.2",
        "--count",
        "50",
        "--until-direct",
        "--timeout",
        "30",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ping failed: {stderr}");
    let pongs = json_lines(&out.stdout);
    assert!(!pongs.is_empty(), "no pongs; stderr: {stderr}");
    for p in &pongs {
        let path = p["path"].as_str().unwrap();
        assert!(["relay-udp", "relay-tcp", "direct"].contains(&path), "{p}");
        assert!(p["rtt_ms"].as_f64().unwrap() >= 0.0);
        assert!(p["seq"].as_u64().unwrap() >= 1);
    }
    let last = pongs.last().unwrap();
    assert_eq!(last["path"], "direct", "pongs: {pongs:?}");
    // The direct path is the listener's loopback socket, not the relay.
    let remote: std::net::SocketAddr = last["remote"].as_str().unwrap().parse().unwrap();
    assert!(remote.ip().is_loopback());
    assert_ne!(remote, relay.addr);
    drop(listener);
}

#[test]
fn ping_to_an_unknown_peer_is_a_clear_error() {
    let relay = Relay::start("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    // A valid ID that nobody registered.
    let out = burrow(&[
        "id",
        "--identity",
        dir.path().join("nobody.key").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let nobody = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = burrow(&[
        "ping",
        &nobody,
        "--relay",
        &relay.addr.to_string(),
        "--identity",
        dir.path().join("me.key").to_str().unwrap(),
        "--no-ipv6",
        "--timeout",
        "20",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach"), "stderr: {stderr}");
}

#[test]
fn bad_peer_id_is_a_clear_error() {
    let out = burrow(&["ping", "not-a-peer", "--relay", "127.0.0.1:9"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad peer ID"), "stderr: {stderr}");
}

#[test]
fn id_is_stable_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let a = burrow(&["id", "--identity", key.to_str().unwrap()]);
    let b = burrow(&["id", "--identity", key.to_str().unwrap()]);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(String::from_utf8_lossy(&a.stdout).trim().len(), 52);
}

#[test]
fn netcheck_against_the_relay() {
    let relay = Relay::start("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let out = burrow(&[
        "netcheck",
        "--relay",
        &relay.addr.to_string(),
        "--identity",
        dir.path().join("k").to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--no-ipv6",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "netcheck failed: {stderr}");
    let v = &json_lines(&out.stdout)[0];
    assert_eq!(v["udp"], true, "{v}");
    let public: std::net::SocketAddr = v["public_addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(public.ip().to_string(), "127.0.0.1");
    // On loopback the mapped address is our own socket: no NAT.
    assert_eq!(v["mapping"], "no-nat", "{v}");
    assert!(v["relay_rtt_ms"].as_f64().is_some());
}

#[test]
fn netcheck_against_coturn_as_a_plain_stun_server() {
    if !coturn_available() {
        return;
    }
    let port = free_port();
    let child = Command::new("turnserver")
        .args(["-n", "-S", "-L", "127.0.0.1", "-p", &port.to_string()])
        .args(["--no-tls", "--no-dtls", "--no-cli", "--log-file", "stdout"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start turnserver");
    let _coturn = Proc {
        child,
        name: "turnserver",
    };
    let dir = tempfile::tempdir().unwrap();
    let server = format!("127.0.0.1:{port}");
    // coturn is both the "relay" (for STUN; its TCP side does not speak burrow) and an
    // extra STUN server; netcheck must still report the mapped address.
    let out = burrow(&[
        "netcheck",
        "--relay",
        &server,
        "--stun",
        &server,
        "--identity",
        dir.path().join("k").to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--no-ipv6",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "netcheck failed: {stderr}");
    let v = &json_lines(&out.stdout)[0];
    assert_eq!(v["udp"], true, "{v}");
    let public: std::net::SocketAddr = v["public_addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(public.ip().to_string(), "127.0.0.1");
}

#[test]
fn listener_re_registers_after_the_relay_restarts() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay = Relay::start(&listen);
    assert_eq!(relay.addr.port(), port);
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(relay.addr, dir.path(), &[]);
    wait_line(&listener.stderr, "registered");
    // Kill the relay, start a new one on the same port: the listener must come back by
    // itself (reconnect with backoff), and a ping must then reach it.
    let _ = relay.proc.child.kill();
    let _ = relay.proc.child.wait();
    relay = Relay::start(&listen);
    wait_line(&listener.stderr, "registered");
    let out = burrow(&[
        "ping",
        &listener.peer,
        "--relay",
        &listen,
        "--identity",
        dir.path().join("pinger.key").to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--no-ipv6",
        "--count",
        "3",
        "--interval",
        "0.2",
        "--timeout",
        "30",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ping after restart failed: {stderr}");
    drop(relay);
}

#[test]
fn a_peer_that_comes_back_is_answered_at_once() {
    // The same identity pings twice, from two processes (two different sockets). The
    // listener must drop the first session's direct path when the second introduction
    // arrives, instead of answering into the dead socket until the path times out.
    let relay = Relay::start("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(relay.addr, dir.path(), &[]);
    let relay_s = relay.addr.to_string();
    let key = dir.path().join("pinger.key");
    for round in 0..2 {
        let out = burrow(&[
            "ping",
            &listener.peer,
            "--relay",
            &relay_s,
            "--identity",
            key.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
            "--no-ipv6",
            "--json",
            "--count",
            "4",
            "--interval",
            "0.2",
            "--timeout",
            "30",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: {stderr}");
        let pongs = json_lines(&out.stdout);
        assert_eq!(
            pongs.len(),
            4,
            "round {round}: every ping answered: {pongs:?}"
        );
    }
    drop(listener);
}

#[test]
fn allow_list_refuses_other_peers_and_admits_listed_ones() {
    let relay = Relay::start("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let relay_s = relay.addr.to_string();
    let friend_key = dir.path().join("friend.key");
    let friend = burrow(&["id", "--identity", friend_key.to_str().unwrap()]);
    let friend = String::from_utf8(friend.stdout).unwrap().trim().to_string();
    let inbox = dir.path().join("inbox");
    let listener = Listener::start(
        relay.addr,
        dir.path(),
        &["--out", inbox.to_str().unwrap(), "--allow", &friend],
    );
    let file = dir.path().join("note.txt");
    std::fs::write(&file, b"for friends only").unwrap();
    let send = |key: &std::path::Path| {
        burrow(&[
            "send",
            &listener.peer,
            file.to_str().unwrap(),
            "--relay",
            &relay_s,
            "--identity",
            key.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
            "--no-ipv6",
            "--connect-timeout",
            "20",
        ])
    };
    let stranger = send(&dir.path().join("stranger.key"));
    assert!(
        !stranger.status.success(),
        "a peer not in --allow must fail: {}",
        String::from_utf8_lossy(&stranger.stdout)
    );
    assert!(
        !inbox.join("note.txt").exists(),
        "nothing from the stranger"
    );
    wait_line(&listener.stderr, "not in --allow");
    let ok = send(&friend_key);
    assert!(
        ok.status.success(),
        "the allowed peer: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        std::fs::read(inbox.join("note.txt")).unwrap(),
        b"for friends only"
    );
}

#[test]
fn ipv6_relay_and_candidates_work() {
    // Relay on ::1: registration over TCP/IPv6, relayed UDP over IPv6, and a direct path
    // between the nodes' IPv6 (or IPv4) host candidates.
    let relay = Relay::start("[::1]:0");
    assert!(relay.addr.is_ipv6());
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin("burrow"))
        .arg("listen")
        .args(["--relay", &relay.addr.to_string()])
        .args(["--identity", dir.path().join("l.key").to_str().unwrap()])
        .args(["--bind", "127.0.0.1:0", "--bind6", "[::1]:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start burrow listen");
    let stdout = lines_of(child.stdout.take().unwrap(), "listen6");
    let stderr = lines_of(child.stderr.take().unwrap(), "listen6!");
    let _listener = Proc {
        child,
        name: "burrow listen",
    };
    let peer = stdout.recv_timeout(WAIT).expect("peer ID");
    let line = wait_line(&stderr, "registered");
    assert!(line.contains("[::1]:"), "registered over IPv6: {line}");
    let out = burrow(&[
        "ping",
        &peer,
        "--relay",
        &relay.addr.to_string(),
        "--identity",
        dir.path().join("p.key").to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--bind6",
        "[::1]:0",
        "--json",
        "--count",
        "20",
        "--interval",
        "0.2",
        "--until-direct",
        "--timeout",
        "30",
    ]);
    let stderr_text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ping over IPv6 failed: {stderr_text}");
    let pongs = json_lines(&out.stdout);
    assert_eq!(pongs.last().unwrap()["path"], "direct", "{pongs:?}");
    for p in pongs.iter().filter(|p| p["path"] == "relay-udp") {
        assert!(p["remote"].as_str().unwrap().starts_with("[::1]:"), "{p}");
    }
}
