//! `burrow-relay`: burrow's rendezvous, STUN and fallback relay server.
//!
//! The relay logic is the sans-IO [`burrow::relay::RelayCore`] in the library; this binary
//! adds the command line and config file ([`settings`]); the single-threaded mio driver,
//! the metrics HTTP responder and signal handling are `burrow::driver::relay`, shared with
//! the in-process relay of `burrow demo`.

mod settings;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = settings::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let settings = match <settings::Settings as settings::Load>::load(cli) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let server = burrow::driver::relay::StopPipe::new()
        .and_then(|stop| {
            stop.install_signal_handlers()?;
            burrow::driver::relay::bind(settings, stop)
        })
        .and_then(|server| server.run());
    match server {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
