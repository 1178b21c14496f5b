//! Loopback process tests of the data plane's applications: `send` into `listen --out`
//! (including a resume after the sender was killed) and `pipe` against `listen --pipe`,
//! with the real `burrow-relay` and `burrow` binaries on 127.0.0.1.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Deterministic bytes (xorshift).
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

fn node_args<'a>(relay: &'a str, key: &'a Path) -> Vec<&'a str> {
    vec![
        "--relay",
        relay,
        "--identity",
        key.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--no-ipv6",
    ]
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "no JSON summary; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

fn partial_len(out: &Path) -> u64 {
    fs::read_dir(out.join(".burrow-partial"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn send_a_tree_then_resume_a_killed_send() {
    let relay = Relay::start("127.0.0.1:0");
    let relay_s = relay.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let listener = Listener::start(relay.addr, dir.path(), &["--out", out.to_str().unwrap()]);
    let key = dir.path().join("sender.key");

    // A tree with an empty file, a small one and a few megabytes.
    let tree = dir.path().join("src/tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("empty"), b"").unwrap();
    fs::write(tree.join("sub/small.txt"), b"hello\n").unwrap();
    let big = pattern(3 << 20, 1);
    fs::write(tree.join("sub/big.bin"), &big).unwrap();
    let mut args = vec!["send", &listener.peer, tree.to_str().unwrap(), "--json"];
    args.extend(node_args(&relay_s, &key));
    args.extend(["--connect-timeout", "30"]);
    let result = burrow(&args);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let s = summary(&result);
    assert_eq!(s["files_ok"], 3, "{s}");
    assert_eq!(fs::read(out.join("tree/sub/big.bin")).unwrap(), big);
    assert_eq!(
        fs::read(out.join("tree/sub/small.txt")).unwrap(),
        b"hello\n"
    );
    assert_eq!(fs::read(out.join("tree/empty")).unwrap(), b"");

    // A bigger file: kill -9 the sender once a part arrived, then run it again.
    let huge = pattern(40 << 20, 2);
    let huge_path = dir.path().join("src/huge.bin");
    fs::write(&huge_path, &huge).unwrap();
    let mut args = vec![
        "send",
        &listener.peer,
        huge_path.to_str().unwrap(),
        "--json",
    ];
    args.extend(node_args(&relay_s, &key));
    let child = Command::new(bin("burrow"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = Proc {
        child,
        name: "burrow send",
    };
    let started = Instant::now();
    while partial_len(&out) < 4 << 20 {
        assert!(started.elapsed() < WAIT, "no partial data arrived");
        if let Ok(Some(status)) = first.child.try_wait() {
            panic!("first send ended before it could be interrupted: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    first.child.kill().unwrap();
    let _ = first.child.wait();
    assert!(
        !out.join("huge.bin").exists(),
        "final name before verification"
    );

    let result = burrow(&args);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let s = summary(&result);
    let sent = s["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < huge.len() as u64,
        "resumed send re-sent everything: {s}"
    );
    assert!(
        fs::read(out.join("huge.bin")).unwrap() == huge,
        "huge.bin differs"
    );
    assert_eq!(partial_len(&out), 0);

    // Without --overwrite, the same file again is refused and the exit code says so.
    let result = burrow(&args);
    assert!(!result.status.success());
    let s = summary(&result);
    assert!(
        s["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("exists"),
        "{s}"
    );
    drop(listener);
}

#[test]
fn pipe_carries_binary_both_ways() {
    let relay = Relay::start("127.0.0.1:0");
    let relay_s = relay.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let up = pattern(1 << 20, 3);
    let down = pattern(700_000, 4);
    let down_path = dir.path().join("down");
    fs::write(&down_path, &down).unwrap();
    let listen_key = dir.path().join("listener.key");
    let mut largs = vec!["listen", "--pipe"];
    largs.extend(node_args(&relay_s, &listen_key));
    let mut child = Command::new(bin("burrow"))
        .args(&largs)
        .stdin(fs::File::open(&down_path).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = lines_of(child.stderr.take().unwrap(), "listen --pipe");
    let mut listener = Proc {
        child,
        name: "burrow listen --pipe",
    };
    let got_up = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut { stdout }, &mut v).unwrap();
        v
    });
    // In pipe mode the peer ID is the first line on stderr.
    let peer = stderr.recv_timeout(WAIT).expect("peer ID on stderr");

    let key = dir.path().join("opener.key");
    let mut args = vec!["pipe", peer.as_str()];
    args.extend(node_args(&relay_s, &key));
    let mut opener = Command::new(bin("burrow"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = opener.stdin.take().unwrap();
    let feeder = {
        let up = up.clone();
        std::thread::spawn(move || {
            stdin.write_all(&up).unwrap();
        })
    };
    let out = opener.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == down, "listener → opener differs");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = listener.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < WAIT, "listen --pipe did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "listen --pipe exited with {status}");
    assert!(got_up.join().unwrap() == up, "opener → listener differs");
}
