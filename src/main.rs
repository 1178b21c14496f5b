//! `burrow`: the command-line front end of a burrow node.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
