//! The `fleetctl` binary: parses the command line, runs it on a
//! single-threaded runtime and turns a failure into its message on
//! standard error and its exit code (see [`fleetctl::failure::Exit`]).

use std::process::ExitCode;

use clap::Parser;
use fleetctl::cli::Cli;
use fleetctl::failure::Failure;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fleetctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fleetctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { exit, error }) => {
            eprintln!("fleetctl: {error:#}");
            ExitCode::from(exit.code())
        }
    }
}
