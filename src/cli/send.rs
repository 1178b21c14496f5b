//! `burrow send PEER FILE...`: files and directories to a listening peer, verified end to
//! end, with a progress bar on a terminal and a summary (or `--json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use burrow::app::{FileSender, FileSenderConfig, SendSummary};
use burrow::node::{NodeCore, NodeEvent, PathKind};
use burrow::plane::{DataPlane, Service};
use burrow::transport::{Event, Transport};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::dial::Dial;
use super::{NodeArgs, describe_path, parse_peer};

/// `burrow send` options.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The receiving peer's ID.
    peer: String,
    /// Files and directories to send.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
    /// Print one JSON object with the summary instead of text.
    #[arg(long)]
    json: bool,
    /// Files in flight at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Give up if the peer cannot be reached within this many seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
}

pub(crate) struct SendService {
    dial: Dial,
    sender: FileSender,
    bar: ProgressBar,
    last_draw: Option<Instant>,
}

impl Service for SendService {
    fn on_transport_event(&mut self, now: Instant, transport: &mut Transport, event: Event) {
        if let Some(conn) = self.dial.connected(&event) {
            self.sender.start(now, transport, conn);
            return;
        }
        self.sender.handle_event(now, transport, &event);
    }

    fn on_node_event(&mut self, _now: Instant, _core: &mut NodeCore, event: &NodeEvent) {
        if let Some(path) = self.dial.on_node_event(event) {
            self.bar.set_message(describe_path(&path));
        }
    }

    fn on_tick(&mut self, now: Instant, core: &mut NodeCore, transport: &mut Transport) {
        self.sender.on_tick(now, transport);
        if self
            .last_draw
            .is_none_or(|t| now >= t + Duration::from_millis(100))
        {
            self.last_draw = Some(now);
            let p = self.sender.progress();
            self.bar.set_length(p.bytes_total);
            self.bar.set_position(p.bytes_done);
            if let Some(f) = p.current.first() {
                self.bar.set_prefix(f.name.clone());
            }
        }
        let finished = self.sender.is_done();
        self.dial.tick(now, core, transport, finished);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let draw = (!self.bar.is_hidden())
            .then(|| self.last_draw.map(|d| d + Duration::from_millis(100)))
            .flatten();
        [self.sender.poll_timeout(), self.dial.poll_timeout(), draw]
            .into_iter()
            .flatten()
            .min()
    }

    fn is_done(&self) -> bool {
        self.dial.is_done()
    }
}

fn print_summary(s: &SendSummary, path: Option<PathKind>, json: bool) {
    let path_name = path.map(|p| p.name()).unwrap_or("none");
    if json {
        let v = serde_json::json!({
            "ok": s.is_success(),
            "files_ok": s.files_ok,
            "bytes": s.bytes_ok,
            "bytes_sent": s.bytes_sent,
            "seconds": s.elapsed.as_secs_f64(),
            "mb_per_s": s.megabytes_per_second(),
            "path": path_name,
            "remote": path.and_then(|p| p.remote()).map(|a| a.to_string()),
            "failures": s.failures.iter().map(|f| serde_json::json!({"name": f.name, "reason": f.reason})).collect::<Vec<_>>(),
            "skipped": s.skipped.iter().map(|k| serde_json::json!({"path": k.path.display().to_string(), "reason": k.reason})).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    for k in &s.skipped {
        eprintln!("skipped {}: {}", k.path.display(), k.reason);
    }
    for f in &s.failures {
        eprintln!("FAILED {}: {}", f.name, f.reason);
    }
    let resumed = s.bytes_ok.saturating_sub(s.bytes_sent);
    println!(
        "sent {} file(s), {:.1} MB in {:.2} s, {:.1} MB/s, {}{}",
        s.files_ok,
        s.bytes_ok as f64 / 1e6,
        s.elapsed.as_secs_f64(),
        s.megabytes_per_second(),
        path.map(|p| describe_path(&p))
            .unwrap_or_else(|| "no path".into()),
        if resumed > 0 {
            format!(" ({:.1} MB resumed)", resumed as f64 / 1e6)
        } else {
            String::new()
        }
    );
}

pub fn run(args: SendArgs) -> Result<ExitCode, String> {
    let peer = parse_peer(&args.peer)?;
    let (files, skipped) = FileSender::plan(&args.files).map_err(|e| e.to_string())?;
    if files.is_empty() {
        return Err("nothing to send".into());
    }
    let (mut driver, transport) = args.node.build_with_transport()?;
    if driver.core().peer_id() == peer {
        return Err("that is this node's own ID".into());
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    let sender = FileSender::new(
        FileSenderConfig {
            parallel: args.parallel.max(1),
        },
        files,
        skipped,
    );
    let service = SendService {
        dial: Dial::new(
            peer,
            Duration::from_secs(args.connect_timeout),
            "burrow listen --out DIR",
        ),
        sender,
        bar,
        last_draw: None,
    };
    let mut plane = DataPlane::new(transport, service);
    plane.connect(Instant::now(), driver.core(), peer);
    driver
        .run(&mut plane, None)
        .map_err(|e| format!("network error: {e}"))?;
    let service = plane.service_mut();
    service.bar.finish_and_clear();
    if let Some(e) = service.dial.error.take() {
        return Err(e);
    }
    let summary = service.sender.summary();
    print_summary(&summary, service.dial.path, args.json);
    if summary.is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
