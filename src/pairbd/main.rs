//! The `pairbd` command line: one binary, clap subcommands.
//!
//! This file only parses arguments, sets up logging and the runtime, and hands over to
//! the subcommand modules; errors reach the user through `anyhow` here, at the edge.

mod serve;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// pairbd: a replicated block device for mail servers, served over NBD.
#[derive(Debug, Parser)]
#[command(name = "pairbd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one unreplicated volume over NBD in the foreground.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pairbd: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr as plain lines (systemd's journal adds the timestamps it needs);
/// `RUST_LOG` selects what is shown, `info` by default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd the journal would keep the escapes.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
