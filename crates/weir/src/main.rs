//! `weir`: the fault-tolerant workflow engine's one binary. `weir server` runs a node; every other
//! subcommand is a client of a running cluster (or, for `validate`, of nothing at all).

mod bench;
mod cli;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the server allocates many small short-lived objects per step (JSON values,
/// HTTP buffers); glibc's allocator showed up at over 10% of server CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// weir: a fault-tolerant workflow engine.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a weir node.
    Server(server::ServerArgs),
    /// Run a benchmark workload against a server and print figures.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(cli::Command),
}

fn main() -> ExitCode {
    let parsed = Cli::parse();
    match parsed.command {
        Command::Server(args) => match server::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match bench::run(parsed.global, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Client(command) => cli::run(parsed.global, command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        // Goal: clap's own checks (unique names, valid defaults) pass for every subcommand, so
        // that no subcommand panics on first use.
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
