//! The release `burrow-relay` binary as a child process for the end-to-end benches: find
//! it, start it on a free loopback port with bench-specific flags, read its address from
//! the "listening" line, measure its CPU time, kill it on drop.
#![allow(dead_code)] // each bench uses part of it

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Hang guard for the listening line.
const LISTEN_WAIT: Duration = Duration::from_secs(20);

/// The target directory (`CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `BURROW_RELAY_BIN`, else `target/release/burrow-relay`.
pub fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BURROW_RELAY_BIN") {
        return PathBuf::from(p);
    }
    target_dir().join("release").join("burrow-relay")
}

/// A running relay; killed when dropped.
pub struct RelayProc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RelayProc {
    /// Starts `burrow-relay --listen 127.0.0.1:0 ARGS...` and waits for its address.
    pub fn start(args: &[&str]) -> RelayProc {
        let bin = relay_bin();
        assert!(
            bin.is_file(),
            "{} not found: run `cargo build --release -p burrow-relay` first \
             (or set BURROW_RELAY_BIN)",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so the relay never blocks on a full stderr pipe.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(LISTEN_WAIT)
            .expect("relay printed no listening line");
        let start = line.find("tcp=").expect("tcp= in the listening line") + 4;
        let rest = &line[start..];
        let end = rest.find([' ', ',']).unwrap_or(rest.len());
        let addr = rest[..end].parse().expect("relay address");
        RelayProc { child, addr }
    }

    /// The relay's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time of the relay so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }
}

/// User + system CPU time of a process (from /proc, 10 ms resolution).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}
