//! The `pairbd` command line: one binary, clap subcommands.
//!
//! This file only parses arguments, sets up logging and the runtime, and hands over to
//! the subcommand modules; errors reach the user through `anyhow` here, at the edge.

mod admin;
mod attach;
mod daemon;
mod demo;
mod serve;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// pairbd: a replicated block device for mail servers, served over NBD.
#[derive(Debug, Parser)]
#[command(name = "pairbd", version, about, long_about = None)]
struct Cli {
    /// The configuration file describing the pair.
    #[arg(long, global = true, value_name = "FILE", env = "PAIRBD_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name in the configuration [default: the hostname].
    #[arg(long, global = true, value_name = "NAME", env = "PAIRBD_NODE")]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run this node of a replicated pair in the foreground.
    Daemon(admin::ResourceArg),
    /// Write a self-signed certificate and key for a node: DIR/NAME.crt, DIR/NAME.key.
    GenCert(admin::GenCertArgs),
    /// Create the backing file if missing and write fresh metadata for this node.
    CreateMd(admin::CreateMdArgs),
    /// Make this node Primary (--force: also from Inconsistent/Outdated data).
    Promote(admin::PromoteArgs),
    /// Make this node Secondary (refused while NBD clients are attached, unless --force).
    Demote(admin::DemoteArgs),
    /// Leave StandAlone (after a split brain or unrelated data) and try the peer again
    /// (--discard-my-data: on the node whose split-brain changes are to be thrown away).
    Connect(admin::ConnectArgs),
    /// Release writes held by on-peer-loss = "suspend-io" (they then go to this node only).
    ResumeIo(admin::ResourceArg),
    /// Stop the daemon for a restart (upgrade) under live mounts: a Primary stays Primary
    /// on disk and resumes once its peer agrees; the daemon exits with code 75, which
    /// the systemd unit restarts.
    Restart(admin::RestartArgs),
    /// Throw this Secondary's data away: it becomes Inconsistent and receives a full sync.
    Invalidate(admin::ResourceArg),
    /// On the Primary: compare both copies block by block; differing blocks are marked out of sync.
    Verify(admin::ResourceArg),
    /// On the Primary: resync the blocks a verify marked out of sync (a reconnect does too).
    ResyncMarked(admin::ResourceArg),
    /// Show role, disk state, peer connection and sync progress, like `drbdadm status`.
    Status(admin::StatusArgs),
    /// Serve one unreplicated volume over NBD in the foreground.
    Serve(serve::ServeArgs),
    /// Run a replicated pair on local files (both nodes on this machine), for trying pairbd out.
    Demo(demo::DemoArgs),
    /// On a mail host: attach the resource's Primary as /dev/nbdN and name it /dev/pairbd/RESOURCE; a supervisor reconnects after daemon restarts.
    Attach(attach::AttachArgs),
    /// On a mail host: disconnect /dev/pairbd/RESOURCE, stop its supervisor and remove the name.
    Detach(attach::DetachArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let ctx = admin::Context {
        config: cli.config,
        node: cli.node,
    };
    let result = match cli.command {
        Command::Serve(args) => serve::run(args).map(|()| ExitCode::SUCCESS),
        Command::Daemon(args) => admin::daemon(&ctx, args),
        Command::GenCert(args) => admin::gen_cert(&ctx, args),
        Command::CreateMd(args) => admin::create_md(&ctx, args),
        Command::Promote(args) => admin::promote(&ctx, args),
        Command::Demote(args) => admin::demote(&ctx, args),
        Command::Connect(args) => admin::connect(&ctx, args),
        Command::ResumeIo(args) => admin::simple(&ctx, args, "resume-io"),
        Command::Restart(args) => admin::restart(&ctx, args),
        Command::Invalidate(args) => admin::simple(&ctx, args, "invalidate"),
        Command::Verify(args) => admin::simple(&ctx, args, "verify"),
        Command::ResyncMarked(args) => admin::simple(&ctx, args, "resync-marked"),
        Command::Status(args) => admin::status(&ctx, args),
        Command::Demo(args) => demo::run(args),
        Command::Attach(args) => attach::attach(&ctx, args),
        Command::Detach(args) => attach::detach(&ctx, args),
    };
    match result {
        Ok(code) => code,
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
