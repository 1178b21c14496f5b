//! Application protocols on top of [`crate::transport`]: file transfer, pipes, benchmarks.
//!
//! Every machine here is sans-IO with respect to the network: it gets `now` and transport
//! events, and acts on a `&mut Transport` (open, write, read, finish). The file machines do
//! file-system I/O themselves (files are not the network).
//!
//! | command                     | machine                                   |
//! |-----------------------------|-------------------------------------------|
//! | `burrow send PEER FILE...`  | [`FileSender`]                            |
//! | `burrow pipe PEER`          | [`Pipe::open`]                            |
//! | `burrow bench PEER`         | [`BenchClient`]                           |
//! | `burrow listen [--out DIR] [--pipe]` | [`Listener`] (owns a [`file_recv::FileReceiver`], the accepted [`Pipe`] and a [`bench::BenchServer`]) |
//!
//! The wire format of the streams is in [`protocol`].
//!
//! # Driving order
//!
//! Each machine offers the same four calls:
//!
//! - `handle_event(now, &mut Transport, &Event) -> bool`: feed every event from
//!   [`Transport::poll_event`](crate::transport::Transport::poll_event); `true` means the
//!   machine used it. A `ConnectionLost` is seen by every machine that had that connection.
//! - `on_tick(now, &mut Transport)`: push more data (blocked writes, newly allowed streams,
//!   benchmark deadlines, pipe output drained by the driver).
//! - `poll_timeout() -> Option<Instant>`: when `on_tick` must run at the latest.
//! - `is_done()`, then the typed outcome (`summary()`, `outcome()`, `poll_report()`).
//!
//! One turn of the glue's loop after any input (datagram, timeout, stdin bytes):
//!
//! 1. `transport.poll_event()` until `None`, handing each event to the machines
//!    (the client-side machines are created/started at `Connected`: apply the allow list
//!    there first, then [`FileSender::start`], [`Pipe::open`] or [`BenchClient::new`]);
//! 2. `on_tick(now, ..)` on every machine;
//! 3. drain `transport.poll_transmit(now)` (and loop to 1 while events keep coming, since
//!    transmitting can free flow-control window and emit `StreamWritable`);
//! 4. sleep until the minimum of the transport's and the machines' `poll_timeout()`.
//!
//! A process-level `send` is finished when [`FileSender::is_done`]; then close the
//! connection and keep draining transmits briefly so the close reaches the peer.
//!
//! # Per command (sketch)
//!
//! ```text
//! send:   let (files, skipped) = FileSender::plan(&args)?;     // before connecting
//!         let mut m = FileSender::new(FileSenderConfig::default(), files, skipped);
//!         on Connected{conn}: m.start(now, &mut t, conn)
//!         bar: m.progress()  (bytes_done / bytes_total, current files)
//!         exit: m.summary(); non-zero unless summary.is_success()
//! listen: let mut m = Listener::new(ListenConfig { out_dir, overwrite, pipe, bench: true });
//!         on Connected{peer}: refuse (t.close) peers not in --allow, else nothing to do
//!         m.poll_report() -> ListenReport::{File(FileReport::Received{..}), Refused, ...}
//!         --pipe: m.pipe_mut() once Some: stdin -> push_input / input_eof,
//!                 poll_output -> stdout; exit when m.is_done()
//! pipe:   on Connected{conn}: let mut m = Pipe::open(&mut t, conn); same stdin/stdout
//!         handling; exit with m.outcome()
//! bench:  on Connected{conn}: BenchClient::new(BenchConfig { seconds, reverse, streams,
//!         datagram_rate }, conn); print m.samples() as they grow, m.summary() at the end
//! ```

pub mod bench;
pub mod file_recv;
pub mod file_send;
pub mod listen;
pub mod pipe;
pub mod protocol;
mod safe_fs;

#[cfg(test)]
mod tests;

pub use bench::{BenchClient, BenchConfig, BenchSummary};
pub use file_recv::{FileReceiverConfig, FileReport};
pub use file_send::{FileSender, FileSenderConfig, SendProgress, SendSummary};
pub use listen::{ListenConfig, ListenReport, Listener};
pub use pipe::{Pipe, PipeError, PipeStats};

use std::time::Instant;

use crate::transport::{Event, Transport};

/// The common shape of every application machine, for a glue that drives them uniformly
/// (see "Driving order" above).
pub trait Machine {
    /// Feeds one transport event; `true` if the machine used it.
    fn handle_event(&mut self, now: Instant, transport: &mut Transport, event: &Event) -> bool;
    /// Pushes more data; runs deadlines that passed.
    fn on_tick(&mut self, now: Instant, transport: &mut Transport);
    /// When [`Machine::on_tick`] must run next at the latest.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Whether the machine's work is over.
    fn is_done(&self) -> bool;
}

macro_rules! impl_machine {
    ($t:ty) => {
        impl Machine for $t {
            fn handle_event(&mut self, now: Instant, t: &mut Transport, e: &Event) -> bool {
                <$t>::handle_event(self, now, t, e)
            }
            fn on_tick(&mut self, now: Instant, t: &mut Transport) {
                <$t>::on_tick(self, now, t)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$t>::poll_timeout(self)
            }
            fn is_done(&self) -> bool {
                <$t>::is_done(self)
            }
        }
    };
}

impl_machine!(FileSender);
impl_machine!(Listener);
impl_machine!(Pipe);
impl_machine!(BenchClient);
