//! Shared helpers for the loopback process tests: find the workspace's binaries, start the
//! real `burrow-relay`, `burrow listen` and coturn, and kill every child on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Hang guard for any single wait (never a timing assertion).
pub const WAIT: Duration = Duration::from_secs(30);

/// A workspace binary next to the test executable (`target/<profile>/NAME`).
///
/// `cargo test --workspace` builds every binary before running tests; a lone
/// `cargo test -p burrow` does not build `burrow-relay`, hence the explicit message.
pub fn bin(name: &str) -> PathBuf {
    if name == "burrow" {
        return PathBuf::from(env!("CARGO_BIN_EXE_burrow"));
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/test");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace` (or `cargo build -p {name}` first)",
        path.display()
    );
    path
}

/// A child process killed on drop, even when the test panics.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards a child's stream line by line to a channel (and to stderr with
/// BURROW_TEST_LOG set), so a test can wait for a line without blocking forever.
pub fn lines_of(
    stream: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("BURROW_TEST_LOG").is_some() {
                eprintln!("{tag}: {line}");
            }
            if tx.send(line).is_err() {
                // Nobody listens any more; keep draining so the child never blocks.
            }
        }
    });
    rx
}

/// Waits for the first line containing `needle`.
pub fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        match rx.recv_timeout(WAIT) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line containing {needle:?}: {e}"),
        }
    }
}

/// The real relay on 127.0.0.1.
pub struct Relay {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Relay {
    /// Starts `burrow-relay --listen LISTEN` and waits for its listening line.
    pub fn start(listen: &str) -> Relay {
        let mut child = Command::new(bin("burrow-relay"))
            .args(["--listen", listen])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start burrow-relay");
        let rx = lines_of(child.stderr.take().unwrap(), "relay");
        let proc = Proc {
            child,
            name: "burrow-relay",
        };
        let line = wait_line(&rx, "listening");
        let start = line.find("tcp=").expect("tcp= in the listening line") + 4;
        let rest = &line[start..];
        let end = rest.find([' ', ',']).unwrap_or(rest.len());
        let addr = rest[..end].parse().expect("relay address");
        Relay { proc, addr }
    }
}

/// `burrow listen` with its own identity file; returns the process and its peer ID.
pub struct Listener {
    pub proc: Proc,
    pub peer: String,
    pub stderr: mpsc::Receiver<String>,
}

impl Listener {
    pub fn start(relay: SocketAddr, dir: &std::path::Path, extra: &[&str]) -> Listener {
        let mut child = Command::new(bin("burrow"))
            .arg("listen")
            .args(["--relay", &relay.to_string()])
            .args(["--identity", dir.join("listener.key").to_str().unwrap()])
            .args(["--bind", "127.0.0.1:0", "--no-ipv6"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start burrow listen");
        let stdout = lines_of(child.stdout.take().unwrap(), "listen");
        let stderr = lines_of(child.stderr.take().unwrap(), "listen!");
        let proc = Proc {
            child,
            name: "burrow listen",
        };
        let peer = stdout
            .recv_timeout(WAIT)
            .expect("listen printed its peer ID");
        Listener { proc, peer, stderr }
    }
}

/// Runs `burrow ARGS...` to completion (hang-guarded by the command's own --timeout).
pub fn burrow(args: &[&str]) -> Output {
    Command::new(bin("burrow"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run burrow")
}

/// A free UDP+TCP port on 127.0.0.1 (bound then released; good enough for a test).
pub fn free_port() -> u16 {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.local_addr().unwrap().port()
}

/// Whether coturn's tools are installed; when missing, fail unless BURROW_SKIP_COTURN=1.
pub fn coturn_available() -> bool {
    let ok = Command::new("turnserver")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        if std::env::var("BURROW_SKIP_COTURN").as_deref() == Ok("1") {
            eprintln!("skipping: coturn's turnserver is not installed (BURROW_SKIP_COTURN=1)");
            return false;
        }
        panic!(
            "coturn's turnserver is not installed (apt-get install coturn), or set BURROW_SKIP_COTURN=1"
        );
    }
    true
}
