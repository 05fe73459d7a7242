//! `moe-ep`: benchmark dispatch/combine (`bench`) and list backends (`info`).

mod bench;
mod check;
mod cli;
mod info;
mod plot;
mod report;
mod workload;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        cli::Command::Bench(args) => bench::run(args),
        cli::Command::Info => {
            info::run();
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}
