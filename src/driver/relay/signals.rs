//! A stop pipe the relay loop watches: SIGINT/SIGTERM write a byte to it (the self-pipe
//! trick), and so does a [`StopHandle`] (for an in-process relay, e.g. `burrow demo`).
//!
//! Why not the `signal-hook` crate: the self-pipe is twenty lines on `libc` (already a
//! dependency) plus `mio::net::UnixStream::pair`. The handler only calls `write(2)`, which
//! is async-signal-safe.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use mio::net::UnixStream;

static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_signal: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid local byte. A full
        // socket buffer (EAGAIN) is fine: a wake-up is already pending.
        unsafe {
            libc::write(fd, (&byte as *const u8).cast(), 1);
        }
    }
}

/// The read end the loop registers; readable once a stop was asked for.
pub struct StopPipe {
    pub(crate) read: UnixStream,
    write: UnixStream,
}

/// Asks a running relay to shut down (from any thread).
#[derive(Debug)]
pub struct StopHandle(std::os::unix::net::UnixStream);

impl StopHandle {
    /// Asks the relay to stop; it finishes its current turn, tells sessions it is shutting
    /// down and returns from `run`.
    pub fn stop(&self) {
        let _ = (&self.0).write(&[1]);
    }
}

impl StopPipe {
    /// A fresh pipe.
    pub fn new() -> io::Result<StopPipe> {
        let (read, write) = UnixStream::pair()?;
        Ok(StopPipe { read, write })
    }

    /// Makes SIGINT and SIGTERM write to this pipe (one pipe per process).
    pub fn install_signal_handlers(&self) -> io::Result<()> {
        WRITE_FD.store(self.write.as_raw_fd(), Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: installing a handler that only performs an async-signal-safe write.
            let r = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(sig, &action, std::ptr::null_mut())
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// A handle that stops the relay from another thread.
    pub fn handle(&self) -> io::Result<StopHandle> {
        // SAFETY: dup(2) of a descriptor we own; the new descriptor is owned by the handle.
        let fd = unsafe { libc::dup(self.write.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor from dup, owned by nobody else.
        let stream =
            unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(StopHandle(stream))
    }

    /// Empties the pipe; true if a stop had been asked for.
    pub(crate) fn drain(&mut self) -> bool {
        let mut buf = [0u8; 64];
        let mut got = false;
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => return got,
                Ok(_) => got = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return got,
            }
        }
    }
}

impl std::fmt::Debug for StopPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopPipe")
    }
}
