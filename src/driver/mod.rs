//! The only code that touches mio, sockets and the clock.
