//! `evald` binary: parse arguments, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = evald::cli::Cli::parse();
    // The service sets up its own logging (files + stderr) once it has read its config.
    match cli.command {
        evald::cli::Command::Serve(_) => {}
        // The supervisor logs a worker's records once, with its own time and fields.
        evald::cli::Command::Worker(_) => evald::logging::init_worker(),
        _ => evald::logging::init_cli(),
    }
    match evald::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<evald::cli::Exit>() {
            Some(evald::cli::Exit(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
