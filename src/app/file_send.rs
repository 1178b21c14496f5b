//! Sending files (`burrow send PEER FILE...`): one stream per file, a few in parallel.
//!
//! [`FileSender::plan`] walks the arguments before anything touches the network: a file is
//! sent under its own name; a directory recursively, with names rooted at its last
//! component (`send ~/photos` → `photos/2024/a.jpg`). Special files (FIFOs, sockets,
//! devices) are skipped and reported. A symlink inside a directory is followed only when its
//! target is a regular file inside the same argument tree; anything else is reported as
//! skipped (so `send dir` can never leak `/etc/shadow` through a planted link). A symlink
//! named directly on the command line is followed: the user asked for it.
//!
//! Per file: open a stream, write [`Request::File`], read the reply. On
//! [`Reply::Accept`]`{ resume_offset }` hash (without sending) the first `resume_offset`
//! bytes, stream the rest with backpressure (a write takes what flow control allows; the
//! rest waits for [`Event::StreamWritable`] or the next [`FileSender::on_tick`]), then
//! write the 32-byte BLAKE3 trailer, FIN, and wait for [`Reply::Verified`] or
//! [`Reply::Failed`].

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::protocol::{
    CODE_ABORTED, CODE_DONE, FramePoll, FrameReader, OutBuf, Reply, Request, decode_reply,
    encode_request,
};
use crate::transport::{ConnectionHandle, Dir, Event, StreamId, Transport};

/// Bytes read from disk per write attempt (one buffer per file in flight).
const CHUNK: usize = 256 * 1024;

/// How the sender behaves.
#[derive(Debug, Clone)]
pub struct FileSenderConfig {
    /// Files in flight at once (each on its own stream).
    pub parallel: usize,
}

impl Default for FileSenderConfig {
    fn default() -> Self {
        FileSenderConfig { parallel: 4 }
    }
}

/// One file to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Where it is read from.
    pub source: PathBuf,
    /// The '/'-separated name the receiver stores it under.
    pub name: String,
    /// Size when planned (the request carries the size when the file is opened).
    pub size: u64,
}

/// Something that was not sent, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The local path.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Why a file did not arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFailure {
    /// The name it was sent under.
    pub name: String,
    /// Why (the receiver's reason, an I/O error, the connection loss...).
    pub reason: String,
}

/// Progress of one file in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProgress {
    /// Its name.
    pub name: String,
    /// Bytes done (resumed bytes included).
    pub done: u64,
    /// Its size.
    pub total: u64,
}

/// Progress of the whole send, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendProgress {
    /// Bytes done over all files (resumed and failed files count as done).
    pub bytes_done: u64,
    /// Bytes of all planned files.
    pub bytes_total: u64,
    /// Files finished (verified or failed).
    pub files_done: usize,
    /// Files planned.
    pub files_total: usize,
    /// Files in flight.
    pub current: Vec<FileProgress>,
}

/// The final account of a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSummary {
    /// Files verified by the receiver.
    pub files_ok: usize,
    /// Their total size.
    pub bytes_ok: u64,
    /// File bytes actually written to the network (less than `bytes_ok` after a resume).
    pub bytes_sent: u64,
    /// From [`FileSender::start`] to the last verdict.
    pub elapsed: Duration,
    /// Files that did not arrive.
    pub failures: Vec<FileFailure>,
    /// Things not sent at all (special files, links leaving the tree...).
    pub skipped: Vec<Skipped>,
}

impl SendSummary {
    /// Whether every planned file arrived (skipped items do not count as failures).
    pub fn is_success(&self) -> bool {
        self.failures.is_empty()
    }

    /// Bytes actually sent per second, in MB/s (10^6). Resumed bytes do not count: they
    /// never crossed the network, and counting them would inflate the rate.
    pub fn megabytes_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes_sent as f64 / secs / 1e6
        } else {
            0.0
        }
    }
}

/// Why planning failed outright.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// An argument does not exist or cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The argument.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An argument has no usable name (e.g. `/`), or its name is not UTF-8.
    #[error("{0}: cannot derive a name to send it under")]
    NoName(PathBuf),
}

enum Phase {
    /// Request written (or being written); waiting for Accept/Reject.
    AwaitAccept,
    /// Streaming file bytes.
    Data,
    /// Trailer queued; FIN follows.
    Trailer,
    /// FIN sent; waiting for Verified/Failed.
    AwaitVerdict,
}

struct Outgoing {
    index: usize,
    /// Asked the receiver not to resume (a retry after a partial that did not match).
    fresh: bool,
    stream: StreamId,
    phase: Phase,
    out: OutBuf,
    reply: FrameReader,
    file: File,
    size: u64,
    hasher: blake3::Hasher,
    /// File position read and hashed.
    offset: u64,
    buf: Vec<u8>,
    buf_pos: usize,
    buf_len: usize,
    /// Bytes the receiver already had.
    resumed: u64,
    /// Bytes handed to the transport.
    sent: u64,
    /// Why writing stopped, if it did (reported if no verdict follows).
    write_error: Option<String>,
}

enum Step {
    Continue,
    Verified,
    Failed(String),
    /// The receiver's partial is not a prefix of our file: send again from byte 0.
    Restart,
}

/// Sends a planned set of files over one connection.
pub struct FileSender {
    config: FileSenderConfig,
    files: Vec<PlannedFile>,
    skipped: Vec<Skipped>,
    conn: Option<ConnectionHandle>,
    next: usize,
    /// Files (indices) to send again without resuming.
    restart: VecDeque<usize>,
    active: Vec<Outgoing>,
    /// Spare chunk buffers, reused across files.
    spare: VecDeque<Vec<u8>>,
    started: Option<Instant>,
    last: Option<Instant>,
    files_ok: usize,
    bytes_ok: u64,
    bytes_sent: u64,
    /// Done bytes of finished files.
    bytes_finished: u64,
    failures: Vec<FileFailure>,
    lost: bool,
    #[cfg(test)]
    pub(crate) corrupt_trailer: bool,
}

impl FileSender {
    /// Walks `args` into a list of files and things skipped.
    pub fn plan(args: &[PathBuf]) -> Result<(Vec<PlannedFile>, Vec<Skipped>), PlanError> {
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        for arg in args {
            let io = |source| PlanError::Io {
                path: arg.clone(),
                source,
            };
            // Follow a link named on the command line.
            let meta = fs::metadata(arg).map_err(io)?;
            let name = arg
                .file_name()
                .map(PathBuf::from)
                .or_else(|| {
                    fs::canonicalize(arg)
                        .ok()
                        .and_then(|p| p.file_name().map(PathBuf::from))
                })
                .and_then(|n| n.to_str().map(str::to_string))
                .ok_or_else(|| PlanError::NoName(arg.clone()))?;
            if meta.is_file() {
                files.push(PlannedFile {
                    source: arg.clone(),
                    name,
                    size: meta.len(),
                });
            } else if meta.is_dir() {
                let root = fs::canonicalize(arg).map_err(io)?;
                walk(&root, arg, &name, &mut files, &mut skipped);
            } else {
                skipped.push(Skipped {
                    path: arg.clone(),
                    reason: "not a regular file or directory".into(),
                });
            }
        }
        // Two arguments with the same last component (`send a/x b/x`) would land on the same
        // name; keep the first, report the others.
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| {
            if seen.insert(f.name.clone()) {
                true
            } else {
                skipped.push(Skipped {
                    path: f.source.clone(),
                    reason: format!("another argument is also sent as {}", f.name),
                });
                false
            }
        });
        Ok((files, skipped))
    }

    /// A sender for `files` (from [`FileSender::plan`]; `skipped` goes into the summary).
    pub fn new(config: FileSenderConfig, files: Vec<PlannedFile>, skipped: Vec<Skipped>) -> Self {
        FileSender {
            config,
            files,
            skipped,
            conn: None,
            next: 0,
            restart: VecDeque::new(),
            active: Vec::new(),
            spare: VecDeque::new(),
            started: None,
            last: None,
            files_ok: 0,
            bytes_ok: 0,
            bytes_sent: 0,
            bytes_finished: 0,
            failures: Vec::new(),
            lost: false,
            #[cfg(test)]
            corrupt_trailer: false,
        }
    }

    /// The planned files.
    pub fn files(&self) -> &[PlannedFile] {
        &self.files
    }

    /// Starts sending on `conn` (call at [`Event::Connected`]).
    pub fn start(&mut self, now: Instant, transport: &mut Transport, conn: ConnectionHandle) {
        self.conn = Some(conn);
        self.started = Some(now);
        self.last = Some(now);
        self.on_tick(now, transport);
    }

    /// Handles a transport event; `true` if it was ours.
    pub fn handle_event(&mut self, now: Instant, transport: &mut Transport, event: &Event) -> bool {
        let Some(my) = self.conn else {
            return false;
        };
        match *event {
            Event::StreamReadable { conn, stream }
            | Event::StreamWritable { conn, stream }
            | Event::StreamStopped { conn, stream, .. }
                if conn == my =>
            {
                self.last = Some(now);
                if let Some(i) = self.active.iter().position(|o| o.stream == stream) {
                    self.pump(transport, i);
                    true
                } else {
                    false
                }
            }
            Event::StreamsAvailable { conn, .. } if conn == my => {
                self.on_tick(now, transport);
                true
            }
            Event::StreamFinished { conn, stream } if conn == my => {
                self.active.iter().any(|o| o.stream == stream)
            }
            Event::ConnectionLost {
                conn, ref reason, ..
            } if conn == my => {
                self.last = Some(now);
                self.lost = true;
                let why = format!("connection lost: {reason}");
                for o in std::mem::take(&mut self.active) {
                    self.finish_file(o, Step::Failed(why.clone()));
                }
                for index in std::mem::take(&mut self.restart) {
                    self.failures.push(FileFailure {
                        name: self.files[index].name.clone(),
                        reason: why.clone(),
                    });
                    self.bytes_finished += self.files[index].size;
                }
                while self.next < self.files.len() {
                    self.failures.push(FileFailure {
                        name: self.files[self.next].name.clone(),
                        reason: why.clone(),
                    });
                    self.bytes_finished += self.files[self.next].size;
                    self.next += 1;
                }
                true
            }
            _ => false,
        }
    }

    /// Opens streams for waiting files and pushes data on every stream.
    pub fn on_tick(&mut self, now: Instant, transport: &mut Transport) {
        let Some(conn) = self.conn else {
            return;
        };
        if self.lost {
            return;
        }
        let mut i = 0;
        while i < self.active.len() {
            let before = self.active.len();
            self.pump(transport, i);
            if self.active.len() == before {
                i += 1;
            }
        }
        while self.active.len() < self.config.parallel.max(1) {
            // Files restarting from byte 0 first, then the plan.
            let (index, fresh) = match self.restart.front() {
                Some(&i) => (i, true),
                None if self.next < self.files.len() => (self.next, false),
                None => break,
            };
            let advance = |me: &mut Self| {
                if fresh {
                    me.restart.pop_front();
                } else {
                    me.next += 1;
                }
            };
            let planned = self.files[index].clone();
            let file = match File::open(&planned.source).and_then(|f| {
                let m = f.metadata()?;
                Ok((f, m.len(), executable(&m)))
            }) {
                Ok(f) => f,
                Err(e) => {
                    self.failures.push(FileFailure {
                        name: planned.name.clone(),
                        reason: format!("{}: {e}", planned.source.display()),
                    });
                    self.bytes_finished += planned.size;
                    advance(self);
                    continue;
                }
            };
            let stream = match transport.open_stream(conn, Dir::Bi) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(_) => return,
            };
            let (file, size, executable) = file;
            if size != planned.size {
                // Keep the plan's totals honest for the progress bar.
                self.files[index].size = size;
            }
            let mut out = OutBuf::new();
            out.push(&encode_request(&Request::File {
                path: planned.name.clone(),
                size,
                executable,
                resume: !fresh,
            }));
            tracing::debug!(name = %planned.name, size, fresh, "sending file");
            self.active.push(Outgoing {
                index,
                fresh,
                stream,
                phase: Phase::AwaitAccept,
                out,
                reply: FrameReader::new(),
                file,
                size,
                hasher: blake3::Hasher::new(),
                offset: 0,
                buf: self.spare.pop_front().unwrap_or_else(|| vec![0; CHUNK]),
                buf_pos: 0,
                buf_len: 0,
                resumed: 0,
                sent: 0,
                write_error: None,
            });
            advance(self);
            let i = self.active.len() - 1;
            self.pump(transport, i);
        }
        if self.is_done() {
            self.last = Some(self.last.map_or(now, |l| l.max(now)));
        }
    }

    /// The sender has no timers of its own (the transport's idle timeout ends a dead
    /// connection).
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Whether every file has a verdict.
    pub fn is_done(&self) -> bool {
        self.conn.is_some()
            && self.active.is_empty()
            && self.restart.is_empty()
            && self.next >= self.files.len()
    }

    /// Progress for a progress bar.
    pub fn progress(&self) -> SendProgress {
        let current: Vec<FileProgress> = self
            .active
            .iter()
            .map(|o| FileProgress {
                name: self.files[o.index].name.clone(),
                done: o.resumed + o.sent,
                total: o.size,
            })
            .collect();
        SendProgress {
            bytes_done: self.bytes_finished + current.iter().map(|c| c.done).sum::<u64>(),
            bytes_total: self.files.iter().map(|f| f.size).sum(),
            files_done: self.files_ok + self.failures.len(),
            files_total: self.files.len(),
            current,
        }
    }

    /// The account so far (final once [`FileSender::is_done`]).
    pub fn summary(&self) -> SendSummary {
        SendSummary {
            files_ok: self.files_ok,
            bytes_ok: self.bytes_ok,
            bytes_sent: self.bytes_sent + self.active.iter().map(|o| o.sent).sum::<u64>(),
            elapsed: match (self.started, self.last) {
                (Some(s), Some(l)) => l.saturating_duration_since(s),
                _ => Duration::ZERO,
            },
            failures: self.failures.clone(),
            skipped: self.skipped.clone(),
        }
    }

    fn pump(&mut self, transport: &mut Transport, i: usize) {
        let Some(conn) = self.conn else {
            return;
        };
        #[cfg(test)]
        let corrupt = self.corrupt_trailer;
        #[cfg(not(test))]
        let corrupt = false;
        let step = step(transport, conn, &mut self.active[i], corrupt);
        match step {
            Step::Continue => {}
            Step::Restart => {
                let mut o = self.active.swap_remove(i);
                let _ = transport.reset(conn, o.stream, CODE_ABORTED);
                let _ = transport.stop(conn, o.stream, CODE_DONE);
                tracing::debug!(name = %self.files[o.index].name, "receiver's partial differs; restarting from 0");
                self.bytes_sent += o.sent;
                self.restart.push_back(o.index);
                self.spare.push_back(std::mem::take(&mut o.buf));
            }
            done => {
                let o = self.active.swap_remove(i);
                if let Step::Failed(_) = &done {
                    let _ = transport.reset(conn, o.stream, CODE_ABORTED);
                }
                let _ = transport.stop(conn, o.stream, CODE_DONE);
                self.finish_file(o, done);
            }
        }
    }

    fn finish_file(&mut self, mut o: Outgoing, step: Step) {
        let name = self.files[o.index].name.clone();
        self.bytes_sent += o.sent;
        self.bytes_finished += o.size;
        match step {
            Step::Verified => {
                tracing::debug!(%name, size = o.size, "file verified by receiver");
                self.files_ok += 1;
                self.bytes_ok += o.size;
            }
            Step::Failed(reason) => {
                tracing::debug!(%name, %reason, "file failed");
                self.failures.push(FileFailure { name, reason });
            }
            Step::Continue | Step::Restart => {}
        }
        self.spare.push_back(std::mem::take(&mut o.buf));
    }
}

fn step(
    transport: &mut Transport,
    conn: ConnectionHandle,
    o: &mut Outgoing,
    corrupt: bool,
) -> Step {
    let stream = o.stream;
    loop {
        // After a failed write, only the receiver's last frame matters.
        let flushed = if o.write_error.is_some() {
            Ok(true)
        } else {
            o.out.flush(transport, conn, stream)
        };
        match flushed {
            Ok(true) => {}
            Ok(false) => {
                if !matches!(o.phase, Phase::AwaitAccept) {
                    return Step::Continue;
                }
            }
            Err(e) => {
                wait_verdict(o, e.to_string());
                continue;
            }
        }
        match o.phase {
            Phase::AwaitAccept | Phase::AwaitVerdict => {
                let frame = match o.reply.poll(transport, conn, stream) {
                    Ok(FramePoll::Frame(f)) => f,
                    Ok(FramePoll::Pending) => return Step::Continue,
                    Ok(FramePoll::Eof) => {
                        return Step::Failed(match o.write_error.take() {
                            Some(e) => format!("stream: {e}"),
                            None => "receiver closed the stream without a verdict".into(),
                        });
                    }
                    Err(e) => {
                        return Step::Failed(match o.write_error.take() {
                            Some(w) => format!("stream: {w}"),
                            None => format!("receiver: {e}"),
                        });
                    }
                };
                let reply = match decode_reply(&frame) {
                    Ok(r) => r,
                    Err(e) => return Step::Failed(format!("receiver: {e}")),
                };
                match (&o.phase, reply) {
                    (
                        Phase::AwaitAccept,
                        Reply::Accept {
                            resume_offset,
                            prefix_hash,
                        },
                    ) => {
                        if resume_offset > o.size || (o.fresh && resume_offset > 0) {
                            return Step::Failed(format!(
                                "receiver asked to resume at {resume_offset} of {} bytes",
                                o.size
                            ));
                        }
                        if let Err(e) = hash_prefix(o, resume_offset) {
                            return Step::Failed(format!("reading for resume: {e}"));
                        }
                        if resume_offset > 0 && prefix_hash != Some(*o.hasher.finalize().as_bytes())
                        {
                            // Its partial copy is not the start of this file (the file
                            // changed since the interrupted send).
                            return Step::Restart;
                        }
                        o.resumed = resume_offset;
                        o.phase = Phase::Data;
                    }
                    (_, Reply::Reject(r) | Reply::Failed(r)) => return Step::Failed(r.to_string()),
                    (Phase::AwaitVerdict, Reply::Verified) => return Step::Verified,
                    (_, other) => return Step::Failed(format!("unexpected reply {other:?}")),
                }
            }
            Phase::Data => {
                if o.buf_pos == o.buf_len {
                    if o.offset == o.size {
                        let hash = o.hasher.finalize();
                        let mut trailer = *hash.as_bytes();
                        if corrupt {
                            trailer[0] ^= 1;
                        }
                        o.out.push(&trailer);
                        o.phase = Phase::Trailer;
                        continue;
                    }
                    let want = (o.size - o.offset).min(o.buf.len() as u64) as usize;
                    match o.file.read(&mut o.buf[..want]) {
                        Ok(0) => {
                            return Step::Failed(format!(
                                "file shrank to {} bytes while sending",
                                o.offset
                            ));
                        }
                        Ok(n) => {
                            o.hasher.update(&o.buf[..n]);
                            o.offset += n as u64;
                            o.buf_pos = 0;
                            o.buf_len = n;
                        }
                        Err(e) => return Step::Failed(format!("read: {e}")),
                    }
                }
                match transport.write(conn, stream, &o.buf[o.buf_pos..o.buf_len]) {
                    Ok(0) => return Step::Continue,
                    Ok(n) => {
                        o.buf_pos += n;
                        o.sent += n as u64;
                    }
                    Err(e) => {
                        wait_verdict(o, e.to_string());
                        continue;
                    }
                }
            }
            Phase::Trailer => {
                if let Err(e) = transport.finish(conn, stream) {
                    wait_verdict(o, e.to_string());
                    continue;
                }
                o.phase = Phase::AwaitVerdict;
            }
        }
    }
}

/// A write failed (the receiver stopped the stream): its last frame, which follows, says
/// why, so wait for it rather than report the bare stream error.
fn wait_verdict(o: &mut Outgoing, error: String) {
    tracing::debug!(%error, "write failed; waiting for the receiver's reason");
    o.write_error = Some(error);
    o.phase = Phase::AwaitVerdict;
}

fn hash_prefix(o: &mut Outgoing, len: u64) -> std::io::Result<()> {
    o.file.seek(SeekFrom::Start(0))?;
    while o.offset < len {
        let want = (len - o.offset).min(o.buf.len() as u64) as usize;
        let n = o.file.read(&mut o.buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::other("file shrank"));
        }
        o.hasher.update(&o.buf[..n]);
        o.offset += n as u64;
    }
    Ok(())
}

#[cfg(unix)]
fn executable(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_: &fs::Metadata) -> bool {
    false
}

/// Recursively lists `dir` (whose canonical path is `root`), naming entries `prefix/...`.
fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    files: &mut Vec<PlannedFile>,
    skipped: &mut Vec<Skipped>,
) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            skipped.push(Skipped {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            });
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            skipped.push(Skipped {
                path,
                reason: "name is not UTF-8".into(),
            });
            continue;
        };
        let child = format!("{prefix}/{name}");
        let Ok(ft) = entry.file_type() else {
            continue;
        };
        if ft.is_dir() {
            walk(root, &path, &child, files, skipped);
        } else if ft.is_file() {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            files.push(PlannedFile {
                source: path,
                name: child,
                size,
            });
        } else if ft.is_symlink() {
            match fs::canonicalize(&path) {
                Ok(target) if target.starts_with(root) => match fs::metadata(&target) {
                    Ok(m) if m.is_file() => files.push(PlannedFile {
                        source: target,
                        name: child,
                        size: m.len(),
                    }),
                    _ => skipped.push(Skipped {
                        path,
                        reason: "symlink to something other than a regular file".into(),
                    }),
                },
                Ok(target) => skipped.push(Skipped {
                    path,
                    reason: format!("symlink leaves the tree (to {})", target.display()),
                }),
                Err(e) => skipped.push(Skipped {
                    path,
                    reason: format!("dangling symlink: {e}"),
                }),
            }
        } else {
            skipped.push(Skipped {
                path,
                reason: "special file (FIFO, socket or device)".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_walks_trees_and_reports_what_it_skips() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let d = tmp.path().join("photos");
        fs::create_dir_all(d.join("2024/jan")).unwrap();
        fs::write(d.join("a.txt"), b"a").unwrap();
        fs::write(d.join("2024/jan/b.bin"), b"bb").unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(d.join("a.txt"), d.join("link-in")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.join("link-out")).unwrap();
        std::os::unix::fs::symlink(d.join("2024"), d.join("dirlink")).unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        fs::write(tmp.path().join("single"), b"123").unwrap();

        let (files, skipped) = FileSender::plan(&[d.clone(), tmp.path().join("single")]).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "photos/2024/jan/b.bin",
                "photos/a.txt",
                "photos/link-in",
                "single"
            ]
        );
        assert_eq!(files[3].size, 3);
        let skipped: Vec<String> = skipped
            .iter()
            .map(|s| s.path.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(skipped, ["dirlink", "fifo", "link-out"]);
        assert!(FileSender::plan(&[tmp.path().join("missing")]).is_err());
        // Same name from two arguments: the second is reported, not sent.
        fs::create_dir(tmp.path().join("other")).unwrap();
        fs::write(tmp.path().join("other/single"), b"x").unwrap();
        let (files, skipped) =
            FileSender::plan(&[tmp.path().join("single"), tmp.path().join("other/single")])
                .unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].source, tmp.path().join("single"));
        assert!(skipped[0].reason.contains("also sent as single"));
    }
}
