//! `burrow-relay`: burrow's rendezvous, STUN and fallback relay server.
//!
//! The relay logic is the sans-IO [`burrow::relay::RelayCore`] in the library; this binary
//! adds the command line and config file ([`settings`]), a single-threaded mio driver
//! ([`driver`]), the metrics HTTP responder ([`http`]) and signal handling ([`signals`]).

#[cfg(target_os = "linux")]
mod batch;
mod driver;
mod http;
mod settings;
mod signals;

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
    let settings = match settings::Settings::load(cli) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    match driver::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
