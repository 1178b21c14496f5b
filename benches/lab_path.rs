//! The NAT-lab data path, head to head (issue 6): two sites behind `eim-fw` routers (real
//! kernel NAT in network namespaces, `tests/natlab/lab.rs`), and on that one path, in one
//! run:
//!
//! * `udp-raw`      — baseline: 1200-byte datagrams blasted from site 0's host to site 1's
//!   host (a plain `send` loop, as in `data_plane`), received bytes count;
//! * `tcp-iperf3`   — baseline: kernel TCP, `iperf3` (one stream);
//! * `burrow`       — `burrow bench PEER` over the punched direct path (one QUIC stream);
//! * `burrow-relay-udp` / `burrow-relay-tcp` — the same through the relay (for reference:
//!   the direct path is blocked in site 0's router; for relay-tcp all its UDP is);
//! * `nebula`       — Nebula (lighthouse on the relay host, one node behind each router,
//!   punchy on), `iperf3` TCP over its tun interface. Tuned for throughput: tun MTU 1400,
//!   10 MB socket buffers, `routines: 2` (`LAB_PATH_NEBULA_MTU=1300 LAB_PATH_NEBULA_TUNING=`
//!   for Nebula's defaults);
//! * setup          — `burrow ping` from a fresh identity: connect → first byte at the peer
//!   via the relay, connect → direct path (both ends), in µs and in relay round trips
//!   measured in the same run (`burrow ping` with the direct path blocked).
//!
//! How the baselines reach the host behind site 1's NAT: a port forward (`dnat`) in site 1's
//! router for TCP 5201 and UDP 5301. A packet from site 0's host then crosses exactly the
//! hops of burrow's direct path: host 0 → router 0 (masquerade) → the internet bridge →
//! router 1 (dnat instead of the punched conntrack entry) → host 1. Nebula's tun carries
//! its iperf3 over its own punched path, the same hops again.
//!
//! CPU is user + system time of every process of a case (both ends; for relay cases the
//! relay; for Nebula both nodes and the lighthouse): short-lived clients by
//! `getrusage(RUSAGE_CHILDREN)`, servers by `/proc/PID/stat` before and after. Kernel
//! forwarding in the routers is charged to whoever the softirq interrupts and is left out
//! for every case alike.
//!
//! Needs root, `ip netns`, nftables; `iperf3` and `nebula` for their rows (Debian:
//! `apt-get install iperf3 nebula`; Nebula 1.6.1 in Debian 12). Rows that cannot run are
//! printed as skipped with the reason; nothing is estimated. Run:
//!
//! ```sh
//! cargo build --release -p burrow-relay
//! cargo bench --bench lab_path   # LAB_PATH_SECONDS=5, LAB_PATH_SETUP_RUNS=5,
//!                                 # LAB_PATH_CASES=burrow,nebula,setup,... (default all),
//!                                 # LAB_PATH_NAT=eim for bare-masquerade routers,
//!                                 # LAB_PATH_WAN_DELAY_MS=5 for the natlab's WAN delay
//! ```
//!
//! Writes `target/bench-results/lab_path.json` and prints one screen.

#[path = "../tests/natlab/lab.rs"]
mod lab;
#[path = "common/relay_proc.rs"]
mod relay_proc;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::{Kind, Lab, NsProc, SiteSpec, WAIT};

/// TCP port of the iperf3 server on site 1's host (forwarded by its router).
const IPERF_PORT: u16 = 5201;
/// UDP port of the blast receiver on site 1's host (forwarded by its router).
const BLAST_PORT: u16 = 5301;
/// Log filter of the processes whose setup is timed (the lines carry µs timestamps).
const SETUP_LOG: &str = "warn,burrow::node=debug,burrow::transport=debug";
/// Nebula overlay addresses.
const NEB_LIGHTHOUSE: &str = "192.168.100.1";
const NEB_NODE: [&str; 2] = ["192.168.100.2", "192.168.100.3"];

// ------------------------------------------------------------------ helper processes

/// `getrusage(RUSAGE_CHILDREN)`: CPU of every waited-for child so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn proc_cpu(pid: u32) -> f64 {
    relay_proc::cpu_time(pid).as_secs_f64()
}

/// The bench binary re-run inside a namespace as a small helper (UDP blast ends, a TCP
/// connect wait). Returns true if `args` asked for one (it has then run).
fn helper_main(args: &[String]) -> bool {
    let Some(mode) = args.get(1) else {
        return false;
    };
    match mode.as_str() {
        "__udp_send" => {
            let dest: SocketAddr = args[2].parse().unwrap();
            let seconds: f64 = args[3].parse().unwrap();
            let tx = blast_socket(dest);
            blast(&tx, 1200, 64, seconds);
        }
        "__udp_send_gso" => {
            // The same bytes as `__udp_send`, handed to the kernel 53 datagrams per call
            // (UDP GSO, `UDP_SEGMENT` = 1200): the cheapest way to emit 1200-byte UDP.
            let dest: SocketAddr = args[2].parse().unwrap();
            let seconds: f64 = args[3].parse().unwrap();
            let tx = blast_socket(dest);
            let seg: libc::c_int = 1200;
            // SAFETY: setsockopt with a valid fd and a c_int option value.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&tx),
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    (&seg as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                println!("no-gso {}", std::io::Error::last_os_error());
                return true;
            }
            blast(&tx, 1200 * 53, 16, seconds);
        }
        "__udp_recv" => {
            // Counts until 1 s of silence after the first datagram (or 30 s of nothing).
            let port: u16 = args[2].parse().unwrap();
            let rx = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(4 << 20);
            println!("ready");
            let mut buf = vec![0u8; 65536];
            let mut total = 0u64;
            rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            while let Ok(n) = rx.recv(&mut buf) {
                total += n as u64;
                rx.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            }
            println!("{total}");
        }
        "__tcp_wait" => {
            // Connects until it works: prints the milliseconds it took.
            let dest: SocketAddr = args[2].parse().unwrap();
            let give_up: f64 = args[3].parse().unwrap();
            let start = Instant::now();
            loop {
                if TcpStream::connect_timeout(&dest, Duration::from_millis(250)).is_ok() {
                    println!("{:.1}", start.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                if start.elapsed().as_secs_f64() > give_up {
                    println!("timeout");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => return false,
    }
    true
}

fn self_exe() -> std::path::PathBuf {
    std::env::current_exe().expect("bench executable path")
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

// ------------------------------------------------------------------ results

#[derive(Debug, Clone)]
struct Row {
    name: &'static str,
    /// `Ok` with the measurement, `Err` with why it was skipped or failed.
    result: Result<Measured, String>,
}

#[derive(Debug, Clone)]
struct Measured {
    bytes: u64,
    seconds: f64,
    cpu: f64,
    /// CPU seconds per process role, for the JSON (who is the bottleneck).
    cpu_parts: Vec<(&'static str, f64)>,
    path: String,
}

impl Measured {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
    fn cpu_per_gb(&self) -> f64 {
        self.cpu / (self.bytes as f64 / 1e9).max(1e-12)
    }
}

/// Sums /proc CPU deltas of long-running processes around a case.
struct CpuWatch {
    pids: Vec<u32>,
    start: Vec<f64>,
    children: f64,
}

impl CpuWatch {
    fn start(pids: &[u32]) -> CpuWatch {
        CpuWatch {
            pids: pids.to_vec(),
            start: pids.iter().map(|p| proc_cpu(*p)).collect(),
            children: children_cpu(),
        }
    }
    /// Total CPU seconds, and the parts: the waited-for children (clients), then each pid.
    fn stop(&self) -> (f64, Vec<f64>) {
        let mut parts = vec![children_cpu() - self.children];
        parts.extend(
            self.pids
                .iter()
                .zip(&self.start)
                .map(|(p, s)| proc_cpu(*p) - s),
        );
        (parts.iter().sum(), parts)
    }
}

// ------------------------------------------------------------------ the bench

struct Bench {
    lab: Lab,
    seconds: u32,
    relay: NsProc,
    listener: NsProc,
    listen_peer: String,
    client_ns: String,
    server_ns: String,
}

impl Bench {
    /// Blocks (for `relay-udp`) the direct path, or (for `relay-tcp`) all UDP, in site 0's
    /// router; `None` lifts it.
    fn block(&self, what: Option<&str>) {
        let router = &self.lab.routers[0][0];
        let _ = self
            .lab
            .exec(router, &["nft", "delete", "table", "inet", "benchblock"]);
        let rules = match what {
            None => return,
            Some("direct") => {
                let peer = self.lab.wan_ip(1);
                format!(
                    "meta l4proto udp ip daddr {peer} drop\n    meta l4proto udp ip saddr {peer} drop"
                )
            }
            Some(_) => "meta l4proto udp drop".to_string(),
        };
        let script = format!(
            "table inet benchblock {{\n  chain forward {{\n    type filter hook forward priority filter - 10; policy accept;\n    {rules}\n  }}\n}}\n"
        );
        self.lab.nft(router, &script).expect("block rule");
    }

    /// `burrow bench` from site 0 to the listener; `want` is the path it must run on.
    fn burrow(&self, name: &'static str, want: &str) -> Row {
        let seconds = self.seconds.to_string();
        let mut args = self.lab.node_args(name, &["bench", &self.listen_peer], &[]);
        args.extend(
            ["--seconds", &seconds, "--json", "--connect-timeout", "30"]
                .iter()
                .map(|s| s.to_string()),
        );
        if want == "direct" {
            args.extend(["--wait-direct".to_string(), "15".to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let watch = CpuWatch::start(&[self.listener.pid(), self.relay.pid()]);
        let mut proc = NsProc::spawn_env(
            &self.client_ns,
            &lab::bin("burrow"),
            &args,
            name,
            &[("RUST_LOG", "warn")],
        );
        let ok = proc.wait_exit(Duration::from_secs(u64::from(self.seconds) + 60));
        let (cpu, parts) = watch.stop();
        let cpu_parts = vec![
            ("sender (burrow bench)", parts[0]),
            ("receiver (burrow listen)", parts[1]),
            ("relay", parts[2]),
        ];
        let summary = proc
            .stdout_lines()
            .into_iter()
            .map(|(_, l)| l)
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok());
        let Some(v) = summary else {
            return Row {
                name,
                result: Err(format!(
                    "burrow bench failed (exit {ok:?}): {}",
                    proc.stderr_text()
                )),
            };
        };
        let path = v["path"].as_str().unwrap_or("?").to_string();
        let result = if path != want {
            Err(format!("ran on {path}, not {want}"))
        } else {
            Ok(Measured {
                bytes: v["bytes"].as_u64().unwrap_or(0),
                seconds: v["seconds"].as_f64().unwrap_or(0.0),
                cpu,
                cpu_parts,
                path: format!("burrow {path}"),
            })
        };
        Row { name, result }
    }

    fn udp_raw(&self, name: &'static str) -> Row {
        let (mode, how) = if name == "udp-gso" {
            ("__udp_send_gso", "GSO 53×1200 B per send")
        } else {
            ("__udp_send", "1200 B per send")
        };
        let exe = self_exe();
        let port = BLAST_PORT.to_string();
        let watch = CpuWatch::start(&[]);
        let mut rx = NsProc::spawn(&self.server_ns, &exe, &["__udp_recv", &port], "udp-recv");
        if rx.next_stdout(WAIT).as_deref() != Some("ready") {
            return Row {
                name,
                result: Err("blast receiver did not start".into()),
            };
        }
        let dest = format!("{}:{BLAST_PORT}", self.lab.wan_ip(1));
        let secs = self.seconds.to_string();
        let mut tx = NsProc::spawn(&self.client_ns, &exe, &[mode, &dest, &secs], "udp-send");
        tx.wait_exit(Duration::from_secs(u64::from(self.seconds) + 30));
        rx.wait_exit(Duration::from_secs(35));
        let (cpu, _) = watch.stop();
        let sent: Vec<String> = tx.stdout_lines().into_iter().map(|(_, l)| l).collect();
        let got: Vec<String> = rx.stdout_lines().into_iter().map(|(_, l)| l).collect();
        let parse = || -> Option<(u64, u64, f64)> {
            let mut s = sent.first()?.split_whitespace();
            let sent_bytes = s.next()?.parse().ok()?;
            let secs = s.next()?.parse().ok()?;
            let received = got.get(1)?.parse().ok()?;
            Some((sent_bytes, received, secs))
        };
        let result = match parse() {
            Some((sent_bytes, received, secs)) if received > 0 => Ok(Measured {
                bytes: received,
                seconds: secs,
                cpu,
                cpu_parts: vec![("sender + receiver", cpu)],
                path: format!(
                    "kernel udp via dnat, {how}, {:.0} % of sent arrived",
                    received as f64 * 100.0 / sent_bytes.max(1) as f64
                ),
            }),
            _ => Err(format!("blast failed: sent {sent:?}, received {got:?}")),
        };
        Row { name, result }
    }

    /// iperf3 TCP from site 0's host to `dest` (an iperf3 server runs on site 1's host).
    fn iperf(&self, name: &'static str, dest: &str, server: u32, extra: &[u32], what: &str) -> Row {
        let secs = self.seconds.to_string();
        let port = IPERF_PORT.to_string();
        let mut pids = vec![server];
        pids.extend_from_slice(extra);
        let watch = CpuWatch::start(&pids);
        let mut c = NsProc::spawn(
            &self.client_ns,
            Path::new("iperf3"),
            &["-c", dest, "-p", &port, "-t", &secs, "-J"],
            name,
        );
        let status = c.wait_exit(Duration::from_secs(u64::from(self.seconds) + 30));
        let (cpu, parts) = watch.stop();
        let roles = [
            "iperf3 client",
            "iperf3 server",
            "nebula lighthouse",
            "nebula node 0 (sender)",
            "nebula node 1 (receiver)",
        ];
        let cpu_parts: Vec<(&'static str, f64)> = roles.iter().copied().zip(parts).collect();
        let text: String = c
            .stdout_lines()
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>()
            .join("\n");
        let v: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let result = match v {
            Some(v) if v["end"]["sum_received"]["bytes"].as_u64().is_some() => {
                let r = &v["end"]["sum_received"];
                Ok(Measured {
                    bytes: r["bytes"].as_u64().unwrap_or(0),
                    seconds: r["seconds"].as_f64().unwrap_or(0.0),
                    cpu,
                    cpu_parts,
                    path: what.to_string(),
                })
            }
            Some(v) => Err(format!(
                "iperf3 failed (exit {status:?}): {}",
                v["error"].as_str().unwrap_or("no result")
            )),
            None => Err(format!(
                "iperf3 failed (exit {status:?}): {} {}",
                text.chars().take(300).collect::<String>(),
                c.stderr_text()
            )),
        };
        Row { name, result }
    }
}

// ------------------------------------------------------------------ Nebula

struct Nebula {
    procs: Vec<NsProc>,
    /// Milliseconds from the first packet to a working tunnel (TCP connect through it).
    tunnel_ms: Option<f64>,
    /// The underlay address node 0 talks to node 1 at (from its log).
    remote: String,
}

fn nebula_up(lab: &Lab, hosts: [&str; 2]) -> Result<Nebula, String> {
    let dir = lab.dir.path().join("nebula");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let d = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let cert = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("nebula-cert")
            .args(args)
            .output()
            .map_err(|e| format!("nebula-cert: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nebula-cert {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    cert(&[
        "ca",
        "-name",
        "burrow-lab",
        "-out-crt",
        &d("ca.crt"),
        "-out-key",
        &d("ca.key"),
    ])?;
    let names = ["lighthouse", "node0", "node1"];
    let ips = [NEB_LIGHTHOUSE, NEB_NODE[0], NEB_NODE[1]];
    for (n, ip) in names.iter().zip(ips) {
        cert(&[
            "sign",
            "-ca-crt",
            &d("ca.crt"),
            "-ca-key",
            &d("ca.key"),
            "-name",
            n,
            "-ip",
            &format!("{ip}/24"),
            "-out-crt",
            &d(&format!("{n}.crt")),
            "-out-key",
            &d(&format!("{n}.key")),
        ])?;
    }
    let relay_ip = lab::RELAY.split(':').next().unwrap();
    let config = |n: &str, lighthouse: bool| {
        let (listen_host, lh) = if lighthouse {
            (relay_ip.to_string(), "  am_lighthouse: true\n".to_string())
        } else {
            (
                "0.0.0.0".to_string(),
                format!(
                    "  am_lighthouse: false\n  interval: 60\n  hosts:\n    - \"{NEB_LIGHTHOUSE}\"\n"
                ),
            )
        };
        format!(
            "pki:\n  ca: {ca}\n  cert: {crt}\n  key: {key}\n\
             static_host_map:\n  \"{NEB_LIGHTHOUSE}\": [\"{relay_ip}:4242\"]\n\
             lighthouse:\n{lh}\
             listen:\n  host: {listen_host}\n  port: 4242\n{tuning}\
             punchy:\n  punch: true\n  respond: true\n\
             tun:\n  disabled: false\n  dev: nebula1\n  mtu: {mtu}\n\
             logging:\n  level: info\n  format: text\n\
             firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n  \
             inbound:\n    - port: any\n      proto: any\n      host: any\n",
            tuning = nebula_tuning(),
            // 1400 (default 1300): the underlay is 1500, and burrow's QUIC packets are ~1450.
            mtu = std::env::var("LAB_PATH_NEBULA_MTU").unwrap_or_else(|_| "1400".into()),
            ca = d("ca.crt"),
            crt = d(&format!("{n}.crt")),
            key = d(&format!("{n}.key")),
        )
    };
    let mut procs = Vec::new();
    let nss = [lab.relay_ns(), hosts[0], hosts[1]];
    for (i, n) in names.iter().enumerate() {
        let path = d(&format!("{n}.yml"));
        std::fs::write(&path, config(n, i == 0)).map_err(|e| e.to_string())?;
        procs.push(NsProc::spawn(
            nss[i],
            Path::new("nebula"),
            &["-config", &path],
            &format!("nebula-{n}"),
        ));
    }
    // Both nodes up (their tun exists and they talked to the lighthouse).
    for p in &procs[1..] {
        if !wait_stdout(p, "Handshake message received", WAIT) {
            return Err(format!(
                "a Nebula node never reached the lighthouse:\n{}",
                stdout_text(p)
            ));
        }
    }
    // The first packet toward node 1 makes node 0 ask the lighthouse and punch.
    let mut wait = NsProc::spawn(
        hosts[0],
        &self_exe(),
        &["__tcp_wait", &format!("{}:{IPERF_PORT}", NEB_NODE[1]), "30"],
        "neb-wait",
    );
    wait.wait_exit(Duration::from_secs(45));
    let line = wait.stdout_lines().into_iter().map(|(_, l)| l).next();
    let tunnel_ms = line.as_deref().and_then(|l| l.parse::<f64>().ok());
    if tunnel_ms.is_none() {
        return Err(format!(
            "no TCP connection through Nebula within 30 s; node0 log:\n{}",
            stdout_text(&procs[1])
        ));
    }
    // Where node 0's tunnel to node 1 goes (direct: node 1's router's WAN address).
    let remote = procs[1]
        .stdout_lines()
        .into_iter()
        .rev()
        .map(|(_, l)| l)
        .filter(|l| l.contains(NEB_NODE[1]) && l.contains("udpAddr"))
        .filter_map(|l| {
            let at = l.find("udpAddr=")? + 8;
            let rest = l[at..].trim_start_matches('"');
            Some(rest.split(['"', ' ']).next()?.to_string())
        })
        .next()
        .unwrap_or_else(|| "?".into());
    Ok(Nebula {
        procs,
        tunnel_ms,
        remote,
    })
}

/// Nebula's throughput settings, so it is measured at its best rather than its defaults
/// (seen here: default 99–113 MB/s, with these 136–153 MB/s in the same conditions): 10 MB
/// socket buffers and two routines (Nebula's multi-queue tun + UDP readers).
const NEBULA_TUNING: &str = "  read_buffer: 10485760\n  write_buffer: 10485760\nroutines: 2\n";

/// Extra lines for the Nebula configs (after `listen.port`, so `  key: v` lands in `listen`
/// and `key: v` at the top level): `LAB_PATH_NEBULA_TUNING` (empty: Nebula's defaults),
/// else [`NEBULA_TUNING`].
fn nebula_tuning() -> String {
    let mut t =
        std::env::var("LAB_PATH_NEBULA_TUNING").unwrap_or_else(|_| NEBULA_TUNING.to_string());
    if !t.is_empty() && !t.ends_with('\n') {
        t.push('\n');
    }
    t
}

/// Nebula logs to stdout: waits (polling) for a line containing `needle`.
fn wait_stdout(p: &NsProc, needle: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if p.stdout_lines().iter().any(|(_, l)| l.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn stdout_text(p: &NsProc) -> String {
    p.stdout_lines()
        .into_iter()
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

// ------------------------------------------------------------------ setup times

/// The line without ANSI colour codes (tracing colours its fields even into a pipe).
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A tracing timestamp (`2026-11-25T20:50:00.123456Z ...`) as seconds since midnight UTC.
fn log_time(plain: &str) -> Option<f64> {
    let t = plain.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn first_time(lines: &[(Instant, String)], needles: &[&str]) -> Option<f64> {
    lines
        .iter()
        .map(|(_, l)| strip_ansi(l))
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| log_time(&l))
}

#[derive(Debug, Clone, Default)]
struct Setup {
    /// connect request sent → first ping arrives at the peer (via the relay), µs.
    first_byte_us: Option<f64>,
    /// connect → direct path confirmed at the pinger, µs.
    direct_client_us: Option<f64>,
    /// connect → direct path confirmed at the listener, µs.
    direct_listener_us: Option<f64>,
    /// connect → introduction at the pinger, µs.
    intro_us: Option<f64>,
    /// connect → the QUIC Initial reaches the listener (a fresh `burrow bench`), µs.
    quic_initial_us: Option<f64>,
    /// connect → QUIC handshake done at the listener, µs: the client's first stream bytes
    /// travel with (or right after) its handshake Finished.
    quic_listener_us: Option<f64>,
    /// connect → QUIC handshake done at the client, µs.
    quic_client_us: Option<f64>,
    /// RTT of this run's first pong (its ping went over the relay at the introduction), µs:
    /// the relay round trip at the very moment of the setup, same processes, same load.
    first_relay_rtt_us: Option<f64>,
}

impl Bench {
    /// Runs a `burrow ping` with debug logs on both ends; returns the pongs and the timings.
    fn ping(&self, name: &str, count: u32, interval: &str) -> (Vec<serde_json::Value>, Setup) {
        let count = count.to_string();
        let mut args = self.lab.node_args(name, &["ping", &self.listen_peer], &[]);
        args.extend(
            [
                "--json",
                "--count",
                &count,
                "--interval",
                interval,
                "--timeout",
                "30",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let listener_seen = self.listener.stderr_lines().len();
        let mut proc = NsProc::spawn_env(
            &self.client_ns,
            &lab::bin("burrow"),
            &args,
            "ping",
            &[("RUST_LOG", SETUP_LOG)],
        );
        proc.wait_exit(Duration::from_secs(45));
        std::thread::sleep(Duration::from_millis(100));
        let pongs: Vec<serde_json::Value> = proc
            .stdout_lines()
            .into_iter()
            .filter(|(_, l)| l.starts_with('{'))
            .filter_map(|(_, l)| serde_json::from_str(&l).ok())
            .collect();
        let client = proc.stderr_lines();
        let listener: Vec<(Instant, String)> = self
            .listener
            .stderr_lines()
            .into_iter()
            .skip(listener_seen)
            .collect();
        if std::env::var_os("LAB_PATH_DEBUG").is_some() {
            for (_, l) in client.iter().chain(&listener) {
                eprintln!("{l}");
            }
        }
        let t0 = first_time(&client, &["connect request sent"]);
        let since = |t: Option<f64>| match (t0, t) {
            (Some(a), Some(b)) => Some((b - a) * 1e6),
            _ => None,
        };
        let setup = Setup {
            first_byte_us: since(first_time(&listener, &["ping received", "relayed=true"])),
            direct_client_us: since(first_time(&client, &["direct path confirmed"])),
            direct_listener_us: since(first_time(&listener, &["direct path confirmed"])),
            intro_us: since(first_time(&client, &["introduced"])),
            first_relay_rtt_us: None,
            ..Setup::default()
        };
        (pongs, setup)
    }
}

impl Bench {
    /// A fresh `burrow bench --seconds 1`: connect → QUIC Initial at the listener and
    /// → handshake done on each side (`burrow::transport` debug lines).
    fn quic_setup(&self, name: &str, into: &mut Setup) {
        let mut args = self.lab.node_args(name, &["bench", &self.listen_peer], &[]);
        args.extend(["--seconds", "1", "--json"].iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let listener_seen = self.listener.stderr_lines().len();
        let mut proc = NsProc::spawn_env(
            &self.client_ns,
            &lab::bin("burrow"),
            &args,
            "quic-setup",
            &[("RUST_LOG", SETUP_LOG)],
        );
        proc.wait_exit(Duration::from_secs(45));
        std::thread::sleep(Duration::from_millis(100));
        let client = proc.stderr_lines();
        let listener: Vec<(Instant, String)> = self
            .listener
            .stderr_lines()
            .into_iter()
            .skip(listener_seen)
            .collect();
        if std::env::var_os("LAB_PATH_DEBUG").is_some() {
            for (_, l) in client.iter().chain(&listener) {
                eprintln!("{l}");
            }
        }
        let t0 = first_time(&client, &["connect request sent"]);
        let since = |t: Option<f64>| Some((t? - t0?) * 1e6);
        into.quic_initial_us = since(first_time(&listener, &["incoming connection"]));
        into.quic_listener_us = since(first_time(&listener, &["connected", "side=Server"]));
        into.quic_client_us = since(first_time(&client, &["connected", "side=Client"]));
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn rtts_ms(pongs: &[serde_json::Value], path: &str) -> Vec<f64> {
    pongs
        .iter()
        .filter(|p| p["path"].as_str() == Some(path))
        .filter_map(|p| p["rtt_ms"].as_f64())
        .collect()
}

// ------------------------------------------------------------------ main

/// The routers of both sites: `LAB_PATH_NAT` = `eim-fw` (default: goes direct today) or
/// `eim` (bare masquerade: the conntrack clash of DESIGN.md; direct once the node beats it).
fn nat_kind() -> Kind {
    match std::env::var("LAB_PATH_NAT").as_deref() {
        Ok("eim") => Kind::Eim,
        Ok("eim-fw") | Err(_) => Kind::EimFw,
        Ok(other) => panic!("LAB_PATH_NAT={other}: use eim-fw or eim"),
    }
}

fn env_num(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if helper_main(&args) {
        return;
    }
    let seconds = env_num("LAB_PATH_SECONDS", 5);
    let setup_runs = env_num("LAB_PATH_SETUP_RUNS", 5);
    let only = std::env::var("LAB_PATH_CASES").ok();
    let wanted = |n: &str| only.as_ref().is_none_or(|o| o.split(',').any(|x| x == n));
    let out_dir = relay_proc::target_dir().join("bench-results");
    let _ = std::fs::create_dir_all(&out_dir);
    let out = out_dir.join("lab_path.json");

    let mut rows: Vec<Row> = Vec::new();
    let names = [
        "udp-raw",
        "udp-gso",
        "tcp-iperf3",
        "burrow",
        "burrow-relay-udp",
        "burrow-relay-tcp",
        "nebula",
    ];
    // Nothing can run without the lab.
    let relay_bin = relay_proc::target_dir()
        .join("release")
        .join("burrow-relay");
    let no_lab = lab::unavailable_reason().or_else(|| {
        (!relay_bin.is_file()).then(|| {
            format!(
                "{} not built: run `cargo build --release -p burrow-relay` first",
                relay_bin.display()
            )
        })
    });
    if let Some(reason) = no_lab {
        for n in names {
            rows.push(Row {
                name: n,
                result: Err(reason.clone()),
            });
        }
        report(&rows, Err(&reason), &[], seconds, &out);
        return;
    }

    let kind = nat_kind();
    // No WAN delay by default (the natlab tests' default is 5 ms through a userspace
    // NFQUEUE hop): this bench measures the data path itself, as its published numbers did.
    // LAB_PATH_WAN_DELAY_MS sets one, e.g. to see setup times in relay RTTs on a path
    // where process wake-ups no longer dominate.
    let wan = Duration::from_millis(env_num("LAB_PATH_WAN_DELAY_MS", 0).into());
    let lab = Lab::with_wan_delay(&[SiteSpec::new(kind), SiteSpec::new(kind)], wan);
    let client_ns = lab.host(0, 0).to_string();
    let server_ns = lab.host(1, 0).to_string();
    // Port forwards for the baselines (see the header: same hops as the direct path).
    let fwd = format!(
        "table ip benchfwd {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         iifname \"wan\" tcp dport {IPERF_PORT} dnat to {host}:{IPERF_PORT}\n    \
         iifname \"wan\" udp dport {BLAST_PORT} dnat to {host}:{BLAST_PORT}\n  }}\n}}\n",
        host = lab.lan_ip(1, 0)
    );
    lab.nft(&lab.routers[1][0], &fwd).expect("port forward");
    // The relay with the public-relay bandwidth caps lifted: measure the path, not the cap.
    let relay = lab.start_relay_with(&[
        "--relay-bytes-per-sec",
        "1000000000000",
        "--relay-burst-bytes",
        "1000000000000",
    ]);
    let listen_args = lab.node_args("listen", &["listen"], &[]);
    let listen_args: Vec<&str> = listen_args.iter().map(String::as_str).collect();
    let listener = NsProc::spawn_env(
        &server_ns,
        &lab::bin("burrow"),
        &listen_args,
        "listen",
        &[("RUST_LOG", SETUP_LOG)],
    );
    let listen_peer = listener
        .next_stdout(WAIT)
        .expect("listen printed its peer ID");
    listener.wait_stderr("registered", WAIT);
    let bench = Bench {
        lab,
        seconds,
        relay,
        listener,
        listen_peer,
        client_ns,
        server_ns,
    };

    let iperf_server = which("iperf3").map(|_| {
        let p = NsProc::spawn(
            &bench.server_ns,
            Path::new("iperf3"),
            &["-s", "-p", &IPERF_PORT.to_string()],
            "iperf3-s",
        );
        std::thread::sleep(Duration::from_millis(300));
        p
    });

    for name in names {
        if !wanted(name) {
            continue;
        }
        eprintln!("lab_path: {name} ...");
        let row = match name {
            "udp-raw" | "udp-gso" => bench.udp_raw(name),
            "tcp-iperf3" => match &iperf_server {
                None => Row {
                    name,
                    result: Err("iperf3 not installed (apt-get install iperf3)".into()),
                },
                Some(s) => bench.iperf(
                    name,
                    &bench.lab.wan_ip(1),
                    s.pid(),
                    &[],
                    "kernel tcp via dnat (iperf3, 1 stream)",
                ),
            },
            "burrow" => bench.burrow("burrow", "direct"),
            "burrow-relay-udp" => {
                bench.block(Some("direct"));
                let r = bench.burrow("burrow-relay-udp", "relay-udp");
                bench.block(None);
                r
            }
            "burrow-relay-tcp" => {
                bench.block(Some("udp"));
                let r = bench.burrow("burrow-relay-tcp", "relay-tcp");
                bench.block(None);
                r
            }
            "nebula" => nebula_row(&bench, iperf_server.as_ref()),
            _ => unreachable!(),
        };
        if let Err(e) = &row.result {
            eprintln!("lab_path: {name}: {e}");
        }
        rows.push(row);
    }

    // Connection setup: relay RTT with the direct path blocked, then fresh connects.
    let mut setups = Vec::new();
    let mut relay_rtt = None;
    let mut direct_rtt = None;
    if wanted("setup") {
        eprintln!("lab_path: setup ...");
        bench.block(Some("direct"));
        let (pongs, _) = bench.ping("rtt-relay", 40, "0.02");
        bench.block(None);
        relay_rtt = median(rtts_ms(&pongs, "relay-udp"));
        for i in 0..setup_runs {
            let (pongs, mut s) = bench.ping(&format!("setup{i}"), 20, "0.02");
            direct_rtt = direct_rtt.or(median(rtts_ms(&pongs, "direct")));
            s.first_relay_rtt_us = pongs
                .first()
                .filter(|p| p["path"].as_str().is_some_and(|x| x.starts_with("relay")))
                .and_then(|p| p["rtt_ms"].as_f64())
                .map(|ms| ms * 1000.0);
            bench.quic_setup(&format!("quic{i}"), &mut s);
            setups.push(s);
        }
    }
    let setup = SetupSummary::new(&setups, relay_rtt, direct_rtt);
    if wanted("setup") {
        report(&rows, Ok(&setup), &setups, seconds, &out);
    } else {
        report(
            &rows,
            Err("not selected (LAB_PATH_CASES)"),
            &[],
            seconds,
            &out,
        );
    }
    drop(iperf_server);
}

fn nebula_row(bench: &Bench, iperf_server: Option<&NsProc>) -> Row {
    let name = "nebula";
    let Some(server) = iperf_server else {
        return Row {
            name,
            result: Err("iperf3 not installed (apt-get install iperf3)".into()),
        };
    };
    if which("nebula").is_none() || which("nebula-cert").is_none() {
        return Row {
            name,
            result: Err("nebula not installed (apt-get install nebula)".into()),
        };
    }
    let version = std::process::Command::new("nebula")
        .arg("-version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    match nebula_up(&bench.lab, [&bench.client_ns, &bench.server_ns]) {
        Err(e) => Row {
            name,
            result: Err(e),
        },
        Ok(neb) => {
            let pids: Vec<u32> = neb.procs.iter().map(|p| p.pid()).collect();
            let row = bench.iperf(
                name,
                NEB_NODE[1],
                server.pid(),
                &pids,
                &format!(
                    "nebula {} tun, underlay {}, tunnel up in {:.0} ms",
                    version.trim_start_matches("Version: "),
                    neb.remote,
                    neb.tunnel_ms.unwrap_or(f64::NAN)
                ),
            );
            drop(neb);
            row
        }
    }
}

struct SetupSummary {
    /// Median over runs of (connect → first byte) / (that run's first relayed pong RTT).
    first_byte_per_run_rtts: Option<f64>,
    /// Median over runs of (connect → direct at the pinger) / (that run's relayed RTT).
    direct_per_run_rtts: Option<f64>,
    relay_rtt_ms: Option<f64>,
    direct_rtt_ms: Option<f64>,
    first_byte_us: Option<f64>,
    direct_client_us: Option<f64>,
    direct_listener_us: Option<f64>,
    intro_us: Option<f64>,
    quic_initial_us: Option<f64>,
    quic_listener_us: Option<f64>,
    quic_client_us: Option<f64>,
    runs: usize,
}

impl SetupSummary {
    fn new(s: &[Setup], relay_rtt_ms: Option<f64>, direct_rtt_ms: Option<f64>) -> SetupSummary {
        let m = |f: fn(&Setup) -> Option<f64>| median(s.iter().filter_map(f).collect());
        let per_run = |f: fn(&Setup) -> Option<f64>| {
            median(
                s.iter()
                    .filter_map(|x| Some(f(x)? / x.first_relay_rtt_us?))
                    .collect(),
            )
        };
        SetupSummary {
            first_byte_per_run_rtts: per_run(|x| x.first_byte_us),
            direct_per_run_rtts: per_run(|x| x.direct_client_us),
            relay_rtt_ms,
            direct_rtt_ms,
            first_byte_us: m(|x| x.first_byte_us),
            direct_client_us: m(|x| x.direct_client_us),
            direct_listener_us: m(|x| x.direct_listener_us),
            intro_us: m(|x| x.intro_us),
            quic_initial_us: m(|x| x.quic_initial_us),
            quic_listener_us: m(|x| x.quic_listener_us),
            quic_client_us: m(|x| x.quic_client_us),
            runs: s.len(),
        }
    }
    fn in_rtts(&self, us: Option<f64>) -> Option<f64> {
        Some(us? / 1000.0 / self.relay_rtt_ms?)
    }
    fn in_direct_rtts(&self, us: Option<f64>) -> Option<f64> {
        Some(us? / 1000.0 / self.direct_rtt_ms?)
    }
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// Prints the table and writes the JSON; `setup` is Err(why) when it did not run.
fn report(
    rows: &[Row],
    setup: Result<&SetupSummary, &str>,
    runs: &[Setup],
    seconds: u32,
    out: &Path,
) {
    let speed = |n: &str| {
        rows.iter()
            .find(|r| r.name == n)
            .and_then(|r| r.result.as_ref().ok())
            .map(|m| m.mb_per_s())
            .filter(|v| *v > 0.0)
    };
    let (udp, tcp, neb) = (speed("udp-raw"), speed("tcp-iperf3"), speed("nebula"));
    let kind = nat_kind().name();
    println!("NAT lab path: {kind} × {kind}, {seconds} s per case, one run");
    println!(
        "{:<17} {:>8} {:>8} {:>6} {:>6} {:>7} {:>8}  path",
        "case", "MB/s", "Mbit/s", "÷tcp", "÷udp", "÷nebula", "CPU s/GB"
    );
    let mut json_rows = Vec::new();
    for r in rows {
        match &r.result {
            Ok(m) => {
                let ratio = |b: Option<f64>| b.map(|b| m.mb_per_s() / b);
                println!(
                    "{:<17} {:>8.1} {:>8.0} {:>6} {:>6} {:>7} {:>8.2}  {}",
                    r.name,
                    m.mb_per_s(),
                    m.mb_per_s() * 8.0,
                    fmt(ratio(tcp), 2),
                    fmt(ratio(udp), 2),
                    fmt(ratio(neb), 2),
                    m.cpu_per_gb(),
                    m.path
                );
                json_rows.push(serde_json::json!({
                    "case": r.name, "bytes": m.bytes, "seconds": m.seconds,
                    "mb_per_s": m.mb_per_s(), "cpu_seconds": m.cpu,
                    "cpu_seconds_per_gb": m.cpu_per_gb(), "path": m.path,
                    "cpu_seconds_by_process": m.cpu_parts.iter()
                        .map(|(k, v)| ((*k).to_string(), serde_json::json!(v)))
                        .collect::<serde_json::Map<_, _>>(),
                    "ratio_to_tcp_iperf3": ratio(tcp), "ratio_to_udp_raw": ratio(udp),
                    "ratio_to_nebula": ratio(neb),
                }));
            }
            Err(e) => {
                let short: String = e.lines().next().unwrap_or("").chars().take(90).collect();
                println!("{:<17} not measured: {short}", r.name);
                json_rows.push(serde_json::json!({"case": r.name, "skipped": e}));
            }
        }
    }
    let mut setup_json = serde_json::Value::Null;
    if let Err(why) = setup {
        println!("{:<17} skipped: {why}", "setup");
        setup_json = serde_json::json!({ "skipped": why });
    }
    if let Ok(s) = setup {
        println!(
            "setup (median of {} fresh connects; relay RTT {} ms, direct RTT {} ms):",
            s.runs,
            fmt(s.relay_rtt_ms, 3),
            fmt(s.direct_rtt_ms, 3)
        );
        for (what, us) in [
            ("connect → introduced", s.intro_us),
            ("connect → first byte at peer (relay)", s.first_byte_us),
            ("connect → direct (pinger)", s.direct_client_us),
            ("connect → direct (listener)", s.direct_listener_us),
            ("connect → QUIC Initial at listener", s.quic_initial_us),
            ("connect → QUIC up at listener", s.quic_listener_us),
            ("connect → QUIC up at client", s.quic_client_us),
        ] {
            println!(
                "  {what:<38} {:>7} µs = {:>5} relay RTTs = {:>5} direct RTTs",
                fmt(us, 0),
                fmt(s.in_rtts(us), 2),
                fmt(s.in_direct_rtts(us), 2)
            );
        }
        println!(
            "  per run, in that run's first (relayed) pong RTT: first byte {} , direct {}",
            fmt(s.first_byte_per_run_rtts, 2),
            fmt(s.direct_per_run_rtts, 2)
        );
        setup_json = serde_json::json!({
            "first_byte_in_same_run_relay_rtts": s.first_byte_per_run_rtts,
            "direct_in_same_run_relay_rtts": s.direct_per_run_rtts,
            "runs": s.runs,
            "relay_rtt_ms": s.relay_rtt_ms,
            "direct_rtt_ms": s.direct_rtt_ms,
            "connect_to_introduced_us": s.intro_us,
            "connect_to_first_byte_us": s.first_byte_us,
            "connect_to_first_byte_relay_rtts": s.in_rtts(s.first_byte_us),
            "connect_to_direct_pinger_us": s.direct_client_us,
            "connect_to_direct_pinger_relay_rtts": s.in_rtts(s.direct_client_us),
            "connect_to_direct_pinger_direct_rtts": s.in_direct_rtts(s.direct_client_us),
            "connect_to_direct_listener_us": s.direct_listener_us,
            "connect_to_quic_initial_at_listener_us": s.quic_initial_us,
            "connect_to_quic_connected_listener_us": s.quic_listener_us,
            "connect_to_quic_connected_listener_relay_rtts": s.in_rtts(s.quic_listener_us),
            "connect_to_quic_connected_client_us": s.quic_client_us,
            "each_run": runs.iter().map(|r| serde_json::json!({
                "introduced_us": r.intro_us, "first_byte_us": r.first_byte_us,
                "direct_pinger_us": r.direct_client_us, "direct_listener_us": r.direct_listener_us,
                "first_relayed_pong_rtt_us": r.first_relay_rtt_us,
                "quic_initial_us": r.quic_initial_us, "quic_listener_us": r.quic_listener_us,
                "quic_client_us": r.quic_client_us,
            })).collect::<Vec<_>>(),
        });
    }
    let doc = serde_json::json!({
        "bench": "lab_path",
        "lab": format!("two sites behind {kind} routers (tests/natlab/lab.rs)"),
        "seconds_per_case": seconds,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "results": json_rows,
        "setup": setup_json,
    });
    match std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap()) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
}

/// A UDP socket connected to `dest` with a large send buffer, for the blasts.
fn blast_socket(dest: SocketAddr) -> UdpSocket {
    let tx = UdpSocket::bind("0.0.0.0:0").unwrap();
    let _ = socket2::SockRef::from(&tx).set_send_buffer_size(4 << 20);
    tx.connect(dest).unwrap();
    tx
}

/// Sends `len`-byte buffers on `tx` for `seconds` (checking the clock every `per_check`
/// sends) and prints the bytes the kernel took and the elapsed seconds.
fn blast(tx: &UdpSocket, len: usize, per_check: usize, seconds: f64) {
    let payload = vec![0x55u8; len];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..per_check {
            if tx.send(&payload).is_ok() {
                sent += payload.len() as u64;
            }
        }
    }
    println!("{sent} {}", start.elapsed().as_secs_f64());
}
