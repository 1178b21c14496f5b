//! SIGINT/SIGTERM → a byte on a socket pair that the mio loop watches (the self-pipe trick).
//!
//! Why not the `signal-hook` crate: it is not in this workspace yet, and the self-pipe is
//! twenty lines on `libc` (already a dependency) plus `mio::net::UnixStream::pair`. The
//! handler only calls `write(2)`, which is async-signal-safe.

use std::io::{self, Read};
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

/// The read end the loop registers; readable once a signal arrived.
pub struct SignalPipe {
    pub read: UnixStream,
    _write: UnixStream,
}

impl SignalPipe {
    /// Installs handlers for SIGINT and SIGTERM.
    pub fn install() -> io::Result<SignalPipe> {
        let (read, write) = UnixStream::pair()?;
        WRITE_FD.store(write.as_raw_fd(), Ordering::Relaxed);
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
        Ok(SignalPipe {
            read,
            _write: write,
        })
    }

    /// Empties the pipe; true if a signal had arrived.
    pub fn drain(&mut self) -> bool {
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
