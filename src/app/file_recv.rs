//! Receiving files (`burrow listen --out DIR`): one incoming stream per file.
//!
//! The [`super::listen::Listener`] reads each stream's request and hands file requests to
//! [`FileReceiver::start`]. From then on this machine owns the stream:
//!
//! 1. The path is validated ([`validate_path`]): relative, '/'-separated, no `..`, no empty
//!    or `.` components, no NUL or control characters, no backslashes or drive letters, not
//!    inside the partial directory. Every file-system step below DIR goes through
//!    `app::safe_fs` (private): `openat`/`mkdirat`/`linkat`/`renameat` relative to
//!    directories opened with `O_NOFOLLOW`, so a symlink inside DIR (even one swapped in
//!    while we work) can never redirect a write outside.
//! 2. Without `overwrite`, an existing target is refused up front ([`REASON_EXISTS`]).
//! 3. Bytes go to `DIR/.burrow-partial/<key>.part` (key = BLAKE3 of sender peer ID and path),
//!    opened with `O_NOFOLLOW`, next to a `<key>.meta` sidecar recording path, size and peer.
//!    That name can never be mistaken for the final one.
//! 4. After the 32-byte trailer, the hash of the whole file is compared. On a match the file
//!    is fsynced and linked (no overwrite: `link` fails if the target appeared meanwhile) or
//!    renamed (overwrite) into place, parents created inside DIR without following symlinks.
//!    On a mismatch the partial is deleted (its bytes are wrong, so resuming from them would
//!    fail forever) and the sender gets [`Reply::Failed`].
//! 5. On disconnect or reset the partial stays as it is, never under the final name.
//!
//! **Resume**: a request (with `resume: true`) for a path with a partial from the same peer
//! and the same size re-hashes the partial's bytes and replies
//! `Accept { resume_offset: partial length, prefix_hash }`; the sender hashes its own first
//! `resume_offset` bytes, and continues from there if they match (the final hash still
//! covers the whole file), or asks again with `resume: false` if they do not (its file
//! changed since the interrupted attempt), which truncates the partial.
//!
//! A new request from the same peer for the same path **supersedes** an older stream still
//! in flight (aborted without a report): a sender that crashed and re-ran reaches us before
//! the old connection's idle timeout, and must resume rather than be refused as busy.
//!
//! Off Unix, `safe_fs` falls back to path-based `symlink_metadata` checks, which a local
//! user racing us could defeat; a remote peer cannot (it only names paths).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::protocol::{
    CODE_ABORTED, CODE_DONE, HASH_LEN, MAX_PATH_LEN, OutBuf, REASON_BAD_PATH, REASON_EXISTS,
    REASON_HASH_MISMATCH, REASON_IO, REASON_PROTOCOL, Reason, RejectQueue, Reply, encode_reply,
};
use super::safe_fs::{Kind, SafeDir};
use crate::transport::{ConnectionHandle, Event, StreamId, StreamRead, Transport};
use crate::wire::PeerId;

/// Name of the directory inside DIR holding partial files. Incoming paths may not start
/// with it.
pub const PARTIAL_DIR: &str = ".burrow-partial";

/// Longest single path component (the usual file-system limit).
const MAX_COMPONENT_LEN: usize = 255;

/// Read buffer per receiver (reused for every stream).
const READ_CHUNK: usize = 256 * 1024;

/// Why a path from the wire is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Empty string.
    #[error("empty path")]
    Empty,
    /// Longer than [`MAX_PATH_LEN`] bytes, or a component over 255 bytes.
    #[error("path too long")]
    TooLong,
    /// Starts with '/'.
    #[error("absolute path")]
    Absolute,
    /// A `..` component.
    #[error("'..' component")]
    ParentComponent,
    /// An empty (`a//b`, trailing '/') or `.` component.
    #[error("empty or '.' component")]
    EmptyComponent,
    /// NUL or another control character.
    #[error("control character in path")]
    ControlCharacter,
    /// A backslash (a Windows separator that would split differently elsewhere).
    #[error("backslash in path")]
    Backslash,
    /// `C:`-style drive prefix.
    #[error("drive letter")]
    DriveLetter,
    /// Names the partial-file directory.
    #[error("reserved name {PARTIAL_DIR}")]
    Reserved,
    /// An existing component inside DIR is a symlink or not a directory.
    #[error("'{0}' inside the output directory is a symlink or not a directory")]
    NotADirectory(String),
    /// The output directory could not be opened.
    #[error("output directory: {0}")]
    OutDir(String),
}

/// Checks a wire path and returns its components. Pure: no file-system access.
pub fn validate_path(path: &str) -> Result<Vec<&str>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(PathError::ControlCharacter);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let b = path.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Err(PathError::DriveLetter);
    }
    let components: Vec<&str> = path.split('/').collect();
    for c in &components {
        match *c {
            "" | "." => return Err(PathError::EmptyComponent),
            ".." => return Err(PathError::ParentComponent),
            c if c.len() > MAX_COMPONENT_LEN => return Err(PathError::TooLong),
            _ => {}
        }
    }
    if components[0] == PARTIAL_DIR {
        return Err(PathError::Reserved);
    }
    Ok(components)
}

/// Walks `components` below `root` without following symlinks, creating missing
/// directories if `create`. `Ok(None)`: a component is missing (and not created).
fn walk_parents(
    root: &SafeDir,
    components: &[&str],
    create: bool,
) -> Result<Option<SafeDir>, PathError> {
    let mut dir: Option<SafeDir> = None;
    for (i, c) in components.iter().enumerate() {
        let here = dir.as_ref().unwrap_or(root);
        match here.open_child(c, create) {
            Ok(Some(d)) => dir = Some(d),
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::debug!(error = %e, component = c, "refusing path component");
                return Err(PathError::NotADirectory(components[..=i].join("/")));
            }
        }
    }
    match dir {
        Some(d) => Ok(Some(d)),
        // No components: the root itself.
        None => root
            .try_clone()
            .map(Some)
            .map_err(|e| PathError::OutDir(e.to_string())),
    }
}

/// The sidecar next to a partial file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartialMeta {
    path: String,
    size: u64,
    peer: PeerId,
}

/// How the receiver behaves.
#[derive(Debug, Clone)]
pub struct FileReceiverConfig {
    /// Where files go. Nothing is ever written outside it.
    pub out_dir: PathBuf,
    /// Replace existing files.
    pub overwrite: bool,
}

/// The fields of a [`super::protocol::Request::File`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    /// Relative path as sent (not yet validated).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Executable bit.
    pub executable: bool,
    /// Whether a partial copy may be resumed.
    pub resume: bool,
}

/// A file being received, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingProgress {
    /// Who sends it.
    pub peer: PeerId,
    /// Its relative path.
    pub path: String,
    /// Bytes held so far (including resumed ones).
    pub done: u64,
    /// Its size.
    pub total: u64,
}

/// What happened to an incoming file, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileReport {
    /// Verified and in place.
    Received {
        /// Sender.
        peer: PeerId,
        /// Relative path.
        path: String,
        /// File size.
        size: u64,
        /// Bytes that were already there from an earlier attempt.
        resumed_from: u64,
    },
    /// Refused before any byte was written.
    Rejected {
        /// Sender.
        peer: PeerId,
        /// The path as requested.
        path: String,
        /// Why.
        reason: Reason,
    },
    /// Failed after it started (hash mismatch, I/O error, disconnect, reset).
    Failed {
        /// Sender.
        peer: PeerId,
        /// Relative path.
        path: String,
        /// Why.
        reason: Reason,
    },
}

enum Phase {
    /// Reading data and trailer.
    Receiving,
    /// Writing the final reply; then FIN.
    Replying,
}

struct Incoming {
    conn: ConnectionHandle,
    stream: StreamId,
    peer: PeerId,
    path: String,
    size: u64,
    executable: bool,
    key: String,
    file: Option<File>,
    hasher: blake3::Hasher,
    /// Bytes of the file held (partial + received).
    have: u64,
    resumed_from: u64,
    trailer: Vec<u8>,
    out: OutBuf,
    phase: Phase,
    recv_finished: bool,
}

/// Receives files into one output directory; owns every file stream handed to it.
pub struct FileReceiver {
    config: FileReceiverConfig,
    streams: HashMap<(ConnectionHandle, StreamId), Incoming>,
    /// Replies queued for rejected streams (no file state).
    rejecting: RejectQueue,
    reports: Vec<FileReport>,
    buf: Vec<u8>,
}

impl FileReceiver {
    /// A receiver writing into `config.out_dir` (which must exist).
    pub fn new(config: FileReceiverConfig) -> Self {
        FileReceiver {
            config,
            streams: HashMap::new(),
            rejecting: RejectQueue::default(),
            reports: Vec::new(),
            buf: vec![0; READ_CHUNK],
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FileReceiverConfig {
        &self.config
    }

    /// Takes a file request read from `stream` (its request frame already consumed).
    pub fn start(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        peer: PeerId,
        request: FileRequest,
    ) {
        let path = request.path.clone();
        match self.prepare(transport, conn, stream, peer, request) {
            Ok(incoming) => {
                tracing::debug!(peer = %peer.short(), %path, size = incoming.size, resume = incoming.have, "receiving file");
                self.streams.insert((conn, stream), incoming);
                self.pump(transport, conn, stream);
            }
            Err(reason) => {
                tracing::debug!(peer = %peer.short(), %path, %reason, "file rejected");
                self.reports.push(FileReport::Rejected {
                    peer,
                    path,
                    reason: reason.clone(),
                });
                self.reject(transport, conn, stream, reason);
            }
        }
    }

    fn reject(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        reason: Reason,
    ) {
        self.rejecting.reject(transport, conn, stream, reason);
    }

    fn root(&self) -> Result<SafeDir, Reason> {
        SafeDir::open_root(&self.config.out_dir).map_err(|e| {
            Reason::new(
                REASON_IO,
                format!("output directory {}: {e}", self.config.out_dir.display()),
            )
        })
    }

    fn partial_dir(&self, root: &SafeDir) -> Result<SafeDir, Reason> {
        match root.open_child(PARTIAL_DIR, true) {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(Reason::new(
                REASON_IO,
                format!("cannot create {PARTIAL_DIR}"),
            )),
            Err(e) => Err(Reason::new(REASON_IO, format!("{PARTIAL_DIR}: {e}"))),
        }
    }

    fn prepare(
        &mut self,
        transport: &mut Transport,
        conn: ConnectionHandle,
        stream: StreamId,
        peer: PeerId,
        request: FileRequest,
    ) -> Result<Incoming, Reason> {
        let FileRequest {
            path,
            size,
            executable,
            resume,
        } = request;
        let path = path.as_str();
        let bad = |e: PathError| Reason::new(REASON_BAD_PATH, format!("{path:?}: {e}"));
        let components = validate_path(path).map_err(bad)?;
        let (name, parents) = components.split_last().ok_or(bad(PathError::Empty))?;
        // Existing parents must be real directories (no symlink may redirect us); missing
        // ones are created only once the file verified.
        let root = self.root()?;
        let parent = walk_parents(&root, parents, false).map_err(bad)?;
        if let Some(parent) = &parent {
            check_target(parent, name, self.config.overwrite, path)?;
        }

        let key = partial_key(&peer, path);
        // The same peer asking again for the same path supersedes its older stream: the
        // sender restarted (its old connection may not have timed out here yet), or it
        // found our partial differs from its file and asks for a fresh start.
        let older: Vec<_> = self
            .streams
            .iter()
            .filter(|(_, s)| s.key == key)
            .map(|(k, _)| *k)
            .collect();
        for (c, st) in older {
            tracing::debug!(%path, "superseding an older stream for the same file");
            self.streams.remove(&(c, st));
            let _ = transport.stop(c, st, CODE_ABORTED);
            let _ = transport.reset(c, st, CODE_ABORTED);
        }
        let dir = self.partial_dir(&root)?;
        let part_name = format!("{key}.part");
        let meta_name = format!("{key}.meta");
        let meta = PartialMeta {
            path: path.to_string(),
            size,
            peer,
        };
        let io = |e: std::io::Error| Reason::new(REASON_IO, format!("{path}: {e}"));
        let mut file = dir.open_file(&part_name).map_err(io)?;
        let mut hasher = blake3::Hasher::new();
        let mut have = 0;
        let mut prefix_hash = None;
        if resume && read_meta(&dir, &meta_name).as_ref() == Some(&meta) {
            // Same sender, same path, same size: keep what is there and re-hash it.
            let len = file.metadata().map_err(io)?.len().min(size);
            have = hash_prefix(&mut file, len, &mut hasher, &mut self.buf).map_err(io)?;
            if have > 0 {
                prefix_hash = Some(*hasher.finalize().as_bytes());
            }
        }
        file.set_len(have).map_err(io)?;
        file.seek(SeekFrom::Start(have)).map_err(io)?;
        write_meta(&dir, &meta_name, &meta).map_err(io)?;
        let mut out = OutBuf::new();
        out.push(&encode_reply(&Reply::Accept {
            resume_offset: have,
            prefix_hash,
        }));
        Ok(Incoming {
            conn,
            stream,
            peer,
            path: path.to_string(),
            size,
            executable,
            key,
            file: Some(file),
            hasher,
            have,
            resumed_from: have,
            trailer: Vec::with_capacity(HASH_LEN),
            out,
            phase: Phase::Receiving,
            recv_finished: false,
        })
    }

    /// Handles a transport event for one of our streams (`true`) or ignores it (`false`).
    pub fn handle_event(
        &mut self,
        _now: Instant,
        transport: &mut Transport,
        event: &Event,
    ) -> bool {
        match *event {
            Event::StreamReadable { conn, stream }
            | Event::StreamWritable { conn, stream }
            | Event::StreamStopped { conn, stream, .. } => {
                if self.rejecting.contains(conn, stream) {
                    self.rejecting.flush(transport, conn, stream);
                    return true;
                }
                if self.streams.contains_key(&(conn, stream)) {
                    self.pump(transport, conn, stream);
                    return true;
                }
                false
            }
            Event::StreamFinished { conn, stream } => {
                self.streams.contains_key(&(conn, stream)) || self.rejecting.contains(conn, stream)
            }
            Event::ConnectionLost { conn, .. } => {
                self.rejecting.forget(conn);
                let keys: Vec<_> = self
                    .streams
                    .keys()
                    .filter(|k| k.0 == conn)
                    .copied()
                    .collect();
                for k in keys {
                    // A stream already replying has its verdict reported.
                    if let Some(s) = self.streams.remove(&k)
                        && matches!(s.phase, Phase::Receiving)
                    {
                        self.fail_kept(s, Reason::new(REASON_IO, "connection lost"));
                    }
                }
                false
            }
            _ => false,
        }
    }

    /// Retries writes that were blocked.
    pub fn on_tick(&mut self, _now: Instant, transport: &mut Transport) {
        let keys: Vec<_> = self.streams.keys().copied().collect();
        for (conn, stream) in keys {
            self.pump(transport, conn, stream);
        }
        self.rejecting.flush_all(transport);
    }

    /// Files in flight.
    pub fn progress(&self) -> Vec<IncomingProgress> {
        self.streams
            .values()
            .map(|s| IncomingProgress {
                peer: s.peer,
                path: s.path.clone(),
                done: s.have,
                total: s.size,
            })
            .collect()
    }

    /// Whether no stream is in flight.
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty() && self.rejecting.is_empty()
    }

    /// The next report, oldest first.
    pub fn poll_report(&mut self) -> Option<FileReport> {
        if self.reports.is_empty() {
            None
        } else {
            Some(self.reports.remove(0))
        }
    }

    /// A stream failed in a way that leaves the partial valid for a resume.
    fn fail_kept(&mut self, s: Incoming, reason: Reason) {
        tracing::debug!(path = %s.path, %reason, have = s.have, "file failed; partial kept");
        self.reports.push(FileReport::Failed {
            peer: s.peer,
            path: s.path,
            reason,
        });
    }

    fn pump(&mut self, transport: &mut Transport, conn: ConnectionHandle, stream: StreamId) {
        let Some(mut s) = self.streams.remove(&(conn, stream)) else {
            return;
        };
        match self.step(transport, &mut s) {
            Step::Continue => {
                self.streams.insert((conn, stream), s);
            }
            Step::Done => {}
            Step::Abort(reason) => {
                // Once replying, the verdict was already reported and sent.
                if matches!(s.phase, Phase::Receiving) {
                    // Tell the sender why, then end the stream.
                    self.rejecting.close_with(
                        transport,
                        conn,
                        stream,
                        CODE_ABORTED,
                        Reply::Failed(reason.clone()),
                    );
                    self.fail_kept(s, reason);
                } else {
                    let _ = transport.stop(conn, stream, CODE_ABORTED);
                    let _ = transport.reset(conn, stream, CODE_ABORTED);
                }
            }
        }
    }

    fn step(&mut self, transport: &mut Transport, s: &mut Incoming) -> Step {
        let (conn, stream) = (s.conn, s.stream);
        loop {
            match s.out.flush(transport, conn, stream) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Step::Abort(Reason::new(REASON_PROTOCOL, e.to_string())),
            }
            if let Phase::Replying = s.phase {
                let _ = transport.finish(conn, stream);
                if !s.recv_finished {
                    let _ = transport.stop(conn, stream, CODE_DONE);
                }
                return Step::Done;
            }
            // Receiving: read everything available.
            let want = if s.have < s.size {
                (s.size - s.have).min(self.buf.len() as u64) as usize
            } else {
                HASH_LEN - s.trailer.len()
            };
            if want == 0 {
                self.verify(s);
                continue;
            }
            // A copying read batches many packets into one `write` syscall (see pipe.rs).
            match transport.read(conn, stream, &mut self.buf[..want]) {
                Ok(StreamRead::Data(n)) => {
                    if s.have < s.size {
                        let data = &self.buf[..n];
                        s.hasher.update(data);
                        let written = s.file.as_mut().map(|f| f.write_all(data));
                        if let Some(Err(e)) = written {
                            return Step::Abort(Reason::new(REASON_IO, e.to_string()));
                        }
                        s.have += n as u64;
                    } else {
                        s.trailer.extend_from_slice(&self.buf[..n]);
                    }
                }
                Ok(StreamRead::Blocked) => return Step::Continue,
                Ok(StreamRead::Finished) => {
                    s.recv_finished = true;
                    return Step::Abort(Reason::new(
                        REASON_PROTOCOL,
                        format!("stream ended after {} of {} bytes", s.have, s.size),
                    ));
                }
                Err(e) => return Step::Abort(Reason::new(REASON_IO, format!("sender: {e}"))),
            }
        }
        Step::Continue
    }

    /// All bytes and the trailer are here: compare, then put the file in place.
    fn verify(&mut self, s: &mut Incoming) {
        let Some(file) = s.file.take() else {
            return;
        };
        let got = s.hasher.finalize();
        let part_name = format!("{}.part", s.key);
        let meta_name = format!("{}.meta", s.key);
        let dirs = self
            .root()
            .and_then(|root| self.partial_dir(&root).map(|d| (root, d)));
        let reply = if got.as_bytes()[..] != s.trailer[..] {
            drop(file);
            if let Ok((_, dir)) = &dirs {
                let _ = dir.remove(&part_name);
                let _ = dir.remove(&meta_name);
            }
            Err(Reason::new(
                REASON_HASH_MISMATCH,
                format!(
                    "{}: BLAKE3 of the received bytes differs from the sender's",
                    s.path
                ),
            ))
        } else {
            dirs.and_then(|(root, dir)| {
                self.finalize(s, file, &root, &dir, &part_name)?;
                let _ = dir.remove(&meta_name);
                Ok(())
            })
        };
        match reply {
            Ok(()) => {
                tracing::debug!(path = %s.path, size = s.size, "file verified");
                self.reports.push(FileReport::Received {
                    peer: s.peer,
                    path: s.path.clone(),
                    size: s.size,
                    resumed_from: s.resumed_from,
                });
                s.out.push(&encode_reply(&Reply::Verified));
            }
            Err(reason) => {
                tracing::debug!(path = %s.path, %reason, "file failed");
                self.reports.push(FileReport::Failed {
                    peer: s.peer,
                    path: s.path.clone(),
                    reason: reason.clone(),
                });
                s.out.push(&encode_reply(&Reply::Failed(reason)));
            }
        }
        s.phase = Phase::Replying;
    }

    fn finalize(
        &self,
        s: &Incoming,
        file: File,
        root: &SafeDir,
        partials: &SafeDir,
        part_name: &str,
    ) -> Result<(), Reason> {
        let io = |e: std::io::Error| Reason::new(REASON_IO, format!("{}: {e}", s.path));
        #[cfg(unix)]
        if s.executable {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(0o755))
                .map_err(io)?;
        }
        #[cfg(not(unix))]
        let _ = s.executable;
        file.sync_all().map_err(io)?;
        drop(file);
        let components =
            validate_path(&s.path).map_err(|e| Reason::new(REASON_BAD_PATH, e.to_string()))?;
        let (name, parents) = components
            .split_last()
            .ok_or(Reason::new(REASON_BAD_PATH, "empty"))?;
        let bad = |e: PathError| Reason::new(REASON_BAD_PATH, format!("{}: {e}", s.path));
        let parent = walk_parents(root, parents, true)
            .map_err(bad)?
            .ok_or_else(|| bad(PathError::NotADirectory(parents.join("/"))))?;
        check_target(&parent, name, self.config.overwrite, &s.path)?;
        if self.config.overwrite {
            partials.rename_to(part_name, &parent, name).map_err(io)?;
        } else {
            // link(2) refuses an existing target, so a file that appeared since the check is
            // never replaced.
            partials.link_to(part_name, &parent, name).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Reason::new(REASON_EXISTS, format!("{} already exists", s.path))
                } else {
                    io(e)
                }
            })?;
            let _ = partials.remove(part_name);
        }
        parent.sync();
        partials.sync();
        Ok(())
    }
}

enum Step {
    Continue,
    Done,
    Abort(Reason),
}

fn check_target(parent: &SafeDir, name: &str, overwrite: bool, path: &str) -> Result<(), Reason> {
    match parent.kind(name) {
        Ok(None) => Ok(()),
        Ok(Some(Kind::File)) if overwrite => Ok(()),
        Ok(Some(kind)) if overwrite => Err(Reason::new(
            REASON_EXISTS,
            format!(
                "{path} exists and is {}",
                if kind == Kind::Symlink {
                    "a symlink"
                } else {
                    "not a regular file"
                }
            ),
        )),
        Ok(Some(_)) => Err(Reason::new(
            REASON_EXISTS,
            format!("{path} already exists (the receiver did not allow overwriting)"),
        )),
        Err(e) => Err(Reason::new(REASON_IO, format!("{path}: {e}"))),
    }
}

/// The partial's file name: BLAKE3 of sender and path, so two senders never share one and
/// the name says nothing that could collide with a real file.
fn partial_key(peer: &PeerId, path: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"burrow partial v1\0");
    h.update(&peer.0);
    h.update(path.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

fn read_meta(dir: &SafeDir, name: &str) -> Option<PartialMeta> {
    let f = dir.read_file(name).ok()?;
    let mut b = Vec::new();
    f.take(8192).read_to_end(&mut b).ok()?;
    let config = bincode::config::standard().with_limit::<8192>();
    bincode::serde::decode_from_slice(&b, config)
        .ok()
        .map(|(m, _)| m)
}

fn write_meta(dir: &SafeDir, name: &str, meta: &PartialMeta) -> std::io::Result<()> {
    let b = bincode::serde::encode_to_vec(meta, bincode::config::standard())
        .map_err(std::io::Error::other)?;
    let mut f = dir.open_file(name)?;
    f.set_len(0)?;
    f.write_all(&b)
}

/// Hashes the first `len` bytes of `file`; returns how many it could read.
fn hash_prefix(
    file: &mut File,
    len: u64,
    hasher: &mut blake3::Hasher,
    buf: &mut [u8],
) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_paths() {
        assert_eq!(validate_path("a").unwrap(), ["a"]);
        assert_eq!(validate_path("a/b/c.txt").unwrap(), ["a", "b", "c.txt"]);
        assert_eq!(validate_path(".hidden/x").unwrap(), [".hidden", "x"]);
        assert_eq!(validate_path("a..b/..c").unwrap(), ["a..b", "..c"]);
        assert_eq!(validate_path("ünï côdé").unwrap(), ["ünï côdé"]);
        assert!(validate_path("x/.burrow-partial").is_ok());
    }

    #[test]
    fn bad_paths() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("", Empty),
            ("../x", ParentComponent),
            ("..", ParentComponent),
            ("a/../../x", ParentComponent),
            ("a/..", ParentComponent),
            ("/etc/passwd", Absolute),
            ("/", Absolute),
            ("a//b", EmptyComponent),
            ("a/", EmptyComponent),
            ("./a", EmptyComponent),
            ("a/./b", EmptyComponent),
            ("C:\\x", Backslash),
            ("C:x", DriveLetter),
            ("c:/x", DriveLetter),
            ("a\\..\\b", Backslash),
            ("a\0b", ControlCharacter),
            ("a\nb", ControlCharacter),
            (".burrow-partial/x.part", Reserved),
            (".burrow-partial", Reserved),
        ];
        for (path, want) in cases {
            assert_eq!(validate_path(path).as_ref(), Err(want), "{path:?}");
        }
        assert_eq!(validate_path(&"a".repeat(256)), Err(TooLong));
        assert_eq!(validate_path(&"a/".repeat(3000)), Err(TooLong));
        assert!(validate_path(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn symlinks_inside_dir_are_never_followed() {
        let out = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), out.path().join("evil")).unwrap();
        fs::write(out.path().join("plain"), b"x").unwrap();
        fs::create_dir(out.path().join("real")).unwrap();
        let root = SafeDir::open_root(out.path()).unwrap();
        assert_eq!(
            walk_parents(&root, &["evil"], true).unwrap_err(),
            PathError::NotADirectory("evil".into())
        );
        assert!(
            walk_parents(&root, &["real", "deeper"], true)
                .unwrap()
                .is_some()
        );
        assert!(out.path().join("real/deeper").is_dir());
        assert!(
            walk_parents(&root, &["real", "nope"], false)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            walk_parents(&root, &["plain", "x"], true).unwrap_err(),
            PathError::NotADirectory("plain".into())
        );
        assert!(
            walk_parents(&root, &["real", "deeper", "..."], false)
                .unwrap()
                .is_none()
        );
        assert!(walk_parents(&root, &["evil", "x"], true).is_err());
        // Nothing appeared outside.
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // A symlink as the final name is refused even with overwrite, and never opened.
        std::os::unix::fs::symlink(outside.path().join("f"), out.path().join("link")).unwrap();
        assert!(check_target(&root, "link", true, "link").is_err());
        assert!(check_target(&root, "link", false, "link").is_err());
        assert!(check_target(&root, "plain", false, "plain").is_err());
        assert!(check_target(&root, "plain", true, "plain").is_ok());
        assert!(check_target(&root, "real", true, "real").is_err());
        assert!(root.open_file("link").is_err());
        assert!(!outside.path().join("f").exists());
    }

    #[test]
    fn partial_keys_differ_by_peer_and_path() {
        let a = partial_key(&PeerId([1; 32]), "x");
        assert_eq!(a.len(), 32);
        assert_ne!(a, partial_key(&PeerId([2; 32]), "x"));
        assert_ne!(a, partial_key(&PeerId([1; 32]), "y"));
    }
}
