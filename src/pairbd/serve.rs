//! `pairbd serve`: one unreplicated volume on a local store, served over NBD in the
//! foreground until SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use pairbd_nbd_server::{ConnectionLimits, ExportConfig, ListenAddr, Server, Volume};
use pairbd_store::{EngineChoice, Store, StoreConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::size::parse_size;

/// Arguments of `pairbd serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The backing store: a file (created at --size if missing) or a block device.
    #[arg(long, value_name = "PATH")]
    backing: PathBuf,
    /// The volume size when the backing file must be created (e.g. 2GiB); checked against an existing file.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
    /// Where to listen: unix:PATH or tcp:HOST:PORT; repeat for several [default: tcp:127.0.0.1:10809].
    #[arg(long = "listen", value_name = "ADDRESS")]
    listen: Vec<ListenAddr>,
    /// The export name; clients asking for the empty name get it too.
    #[arg(long, value_name = "NAME", default_value = "")]
    export: String,
    /// Refuse writes (the export is advertised read-only).
    #[arg(long)]
    read_only: bool,
    /// The disk I/O engine: auto (io_uring where the kernel allows it), uring, or pool.
    #[arg(long, value_name = "ENGINE", default_value = "auto")]
    engine: EngineChoice,
    /// Open the backing store with O_DIRECT (requests must then be 512-byte aligned).
    #[arg(long)]
    direct_io: bool,
    /// Read through the page cache. By default aligned reads bypass it (O_DIRECT) while
    /// writes stay buffered: the client keeps its own cache.
    #[arg(long, conflicts_with = "direct_io")]
    cached_reads: bool,
    /// Send those O_DIRECT reads through the I/O engine's thread. By default they are
    /// submitted with Linux native AIO on the serving thread (one thread wake-up less).
    #[arg(long, conflicts_with_all = ["direct_io", "cached_reads"])]
    engine_reads: bool,
    /// Requests one connection may have in flight before it stops reading (1-65536).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_in_flight_requests: u32,
    /// Payload bytes one connection may hold in flight (32MiB-4GiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_in_flight_bytes)]
    max_in_flight_bytes: u64,
    /// Client connections served at once; more wait until one closes (1-65536).
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_connections: u32,
}

/// Parses --max-in-flight-bytes: a size from 32 MiB (the largest request) to 4 GiB.
fn parse_in_flight_bytes(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if !(32 << 20..=4 << 30).contains(&bytes) {
        return Err(format!("{text:?} must be between 32MiB and 4GiB"));
    }
    Ok(bytes)
}

/// Runs `pairbd serve` to completion.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pairbd-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(size) = args.size {
        if size == 0 || size % 512 != 0 {
            bail!("--size {size} must be a positive multiple of 512 bytes");
        }
    }
    let mut config = StoreConfig::new(args.backing.clone());
    config.create_size_bytes = args.size;
    config.read_only = args.read_only;
    config.direct_io = args.direct_io;
    config.direct_reads = !args.cached_reads;
    config.aio_reads = !args.engine_reads;
    config.engine = args.engine;
    let store = Store::open(&config)
        .with_context(|| format!("cannot open the backing store {}", args.backing.display()))?;
    if store.direct_io() && store.io_alignment() > 512 {
        bail!(
            "{} needs {}-byte aligned O_DIRECT I/O, but the kernel's NBD client sends 512-byte \
             aligned requests (nbd-client never asks for the block size); serve it without --direct-io",
            args.backing.display(),
            store.io_alignment()
        );
    }
    info!(
        backing = %args.backing.display(),
        size_bytes = store.size_bytes(),
        engine = %store.engine_kind(),
        direct_io = store.direct_io(),
        direct_reads = store.direct_reads(),
        aio_reads = store.aio_reads(),
        read_only = store.read_only(),
        "backing store open"
    );
    let listen = if args.listen.is_empty() {
        vec!["tcp:127.0.0.1:10809"
            .parse()
            .expect("the default listen address parses")]
    } else {
        args.listen.clone()
    };
    let limits = ConnectionLimits {
        max_in_flight_requests: args.max_in_flight_requests as usize,
        max_in_flight_bytes: usize::try_from(args.max_in_flight_bytes).unwrap_or(usize::MAX),
        max_connections: args.max_connections as usize,
        ..ConnectionLimits::default()
    };
    let volume = Arc::new(store);
    let server = Server::bind(
        Arc::clone(&volume),
        ExportConfig {
            name: args.export.clone(),
        },
        &listen,
        limits,
    )
    .await?;
    let addresses: Vec<String> = server
        .local_addresses()
        .iter()
        .map(ToString::to_string)
        .collect();
    announce_ready(
        &args.export,
        volume.size_bytes(),
        &addresses,
        &volume.engine_kind().to_string(),
    )?;

    let shutdown = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT: finishing in-flight requests, then stopping"),
            _ = terminate.recv() => info!("SIGTERM: finishing in-flight requests, then stopping"),
        }
        trigger.cancel();
    });
    server.run(shutdown).await;
    if !volume.read_only() {
        // A clean stop leaves every completed write durable, flushed or not.
        Volume::flush(volume.as_ref())
            .await
            .context("the final flush of the backing store failed")?;
    }
    info!(
        flushes = volume.flushes_requested(),
        fdatasyncs = volume.fdatasyncs_issued(),
        "stopped"
    );
    Ok(())
}

/// Tells whoever started us (a user, a test, a benchmark) that clients may connect now.
fn announce_ready(
    export: &str,
    size_bytes: u64,
    addresses: &[String],
    engine: &str,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "pairbd serve: ready: export {export:?}, {size_bytes} bytes, {engine} engine, listening on {}",
        addresses.join(" ")
    )?;
    stdout.flush()?;
    Ok(())
}
