//! stdin and stdout for `burrow pipe` / `listen --pipe`, on threads so that a slow terminal,
//! a blocking file or a full pipe never stalls the reactor. Bounded channels carry the
//! bytes; a full output channel stops the reactor from draining the QUIC stream, which is
//! how backpressure reaches the sender.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;

use bytes::Bytes;

/// Chunks in flight between a thread and the reactor.
const DEPTH: usize = 32;
/// Bytes per stdin read.
const READ_CHUNK: usize = 64 * 1024;

/// Reads stdin on a thread; the reactor takes chunks with [`StdinReader::next`].
pub struct StdinReader {
    rx: Receiver<std::io::Result<Vec<u8>>>,
    /// A chunk the pipe did not take whole yet, and how much of it was taken.
    pending: Option<(Vec<u8>, usize)>,
    eof: bool,
}

/// What [`StdinReader::next`] found.
pub enum Input<'a> {
    /// Bytes to push (call [`StdinReader::consumed`] with what was taken).
    Data(&'a [u8]),
    /// Nothing now.
    Empty,
    /// stdin ended (or failed: the error is printed and treated as the end).
    Eof,
}

impl StdinReader {
    /// Starts the thread; `wake` is called after every chunk so the reactor runs.
    pub fn start(wake: Arc<mio::Waker>) -> StdinReader {
        let (tx, rx) = mpsc::sync_channel(DEPTH);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            loop {
                let mut buf = vec![0u8; READ_CHUNK];
                let r = match stdin.read(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(buf)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let end = !matches!(&r, Ok(b) if !b.is_empty());
                if tx.send(r).is_err() {
                    return;
                }
                let _ = wake.wake();
                if end {
                    return;
                }
            }
        });
        StdinReader {
            rx,
            pending: None,
            eof: false,
        }
    }

    /// The next input.
    pub fn next(&mut self) -> Input<'_> {
        if self.pending.is_none() && !self.eof {
            match self.rx.try_recv() {
                Ok(Ok(b)) if !b.is_empty() => self.pending = Some((b, 0)),
                Ok(Ok(_)) | Err(TryRecvError::Disconnected) => self.eof = true,
                Ok(Err(e)) => {
                    eprintln!("burrow: reading stdin: {e}");
                    self.eof = true;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        match &self.pending {
            Some((b, off)) => Input::Data(&b[*off..]),
            None if self.eof => Input::Eof,
            None => Input::Empty,
        }
    }

    /// `n` bytes of the last [`Input::Data`] were taken.
    pub fn consumed(&mut self, n: usize) {
        if let Some((b, off)) = &mut self.pending {
            *off += n;
            if *off >= b.len() {
                self.pending = None;
            }
        }
    }
}

/// Writes to stdout on a thread.
pub struct StdoutWriter {
    tx: Option<SyncSender<Bytes>>,
    pending: Option<Bytes>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl StdoutWriter {
    /// Starts the thread.
    pub fn start() -> StdoutWriter {
        let (tx, rx) = mpsc::sync_channel::<Bytes>(DEPTH);
        let thread = std::thread::spawn(move || {
            let mut out = std::io::stdout().lock();
            for chunk in rx {
                out.write_all(&chunk)?;
                out.flush()?;
            }
            out.flush()
        });
        StdoutWriter {
            tx: Some(tx),
            pending: None,
            thread: Some(thread),
        }
    }

    /// Whether a new chunk can be queued now (else leave it in the pipe: backpressure).
    pub fn ready(&mut self) -> bool {
        let Some(chunk) = self.pending.take() else {
            return true;
        };
        self.offer(chunk)
    }

    /// Queues a chunk; `false` if the channel is full (the chunk is kept and retried by
    /// [`StdoutWriter::ready`]).
    pub fn offer(&mut self, chunk: Bytes) -> bool {
        let Some(tx) = &self.tx else {
            return true;
        };
        match tx.try_send(chunk) {
            Ok(()) => true,
            Err(TrySendError::Full(c)) => {
                self.pending = Some(c);
                false
            }
            Err(TrySendError::Disconnected(_)) => true,
        }
    }

    /// Queues a chunk, waiting for room (only after the reactor stopped).
    pub fn send_blocking(&mut self, chunk: Bytes) {
        if let Some(tx) = &self.tx {
            if let Some(p) = self.pending.take() {
                let _ = tx.send(p);
            }
            let _ = tx.send(chunk);
        }
    }

    /// Flushes everything and waits for the thread.
    pub fn finish(mut self) -> std::io::Result<()> {
        if let (Some(tx), Some(chunk)) = (&self.tx, self.pending.take()) {
            let _ = tx.send(chunk);
        }
        drop(self.tx.take());
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("stdout thread panicked")),
            None => Ok(()),
        }
    }
}

/// Moves stdin into the pipe and the pipe's output to stdout as far as each side takes.
/// `stdin` becomes `None` once its end was passed on.
pub fn pump_pipe(
    pipe: &mut burrow::app::Pipe,
    transport: &mut burrow::transport::Transport,
    stdin: &mut Option<StdinReader>,
    stdout: &mut StdoutWriter,
) {
    if let Some(input) = stdin.as_mut() {
        loop {
            match input.next() {
                Input::Data(d) => {
                    let n = pipe.push_input(transport, d);
                    if n == 0 {
                        break;
                    }
                    input.consumed(n);
                }
                Input::Eof => {
                    pipe.input_eof(transport);
                    *stdin = None;
                    break;
                }
                Input::Empty => break,
            }
        }
    }
    while stdout.ready() {
        let Some(chunk) = pipe.poll_output() else {
            break;
        };
        if !stdout.offer(chunk) {
            break;
        }
    }
}
