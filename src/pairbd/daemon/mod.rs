//! `pairbd daemon`: one node of a replicated pair, in the foreground.
//!
//! Start-up: read the configuration, open and check the metadata, open the
//! backing store (its data area), start the replication core behind its
//! driver, the QUIC link (the lower node id dials, the other accepts), the
//! NBD server (which refuses clients unless this node is Primary) and the
//! control socket; then print one `ready` line on stdout. SIGINT/SIGTERM: stop
//! serving, finish in-flight requests, record a clean stop in the metadata,
//! flush, exit. A fail-stop of the core exits with an error.
//!
//! A planned restart (`pairbd restart`, the control command `restart`) stops
//! the same way but leaves the metadata as a crash would (a Primary stays
//! Primary on disk), writes a restart marker naming the current generation
//! beside the control socket, and exits with [`RESTART_EXIT_CODE`] (systemd's
//! `RestartForceExitStatus=` starts it again). The next start of a node that
//! finds the marker, and its metadata still Primary on that generation, uses
//! `after-crash = resume-primary` for that one start: the core's existing rule
//! then makes it Primary again only once the peer connects, is Secondary and
//! holds no newer data. The marker is removed at that start, used or not.

pub mod control;
pub mod driver;
mod link;
mod notify;
mod protect;
pub mod volume;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use pairbd_config::{Config, Engine, MetaLocation, NodeConfig, ResourceConfig};
use pairbd_meta::MetaStore;
use pairbd_nbd_server::{ConnectionLimits, ExportConfig, Server};
use pairbd_repl_core::{AdminCommand, AfterCrash, AfterSplitBrain, Node, OnPeerLoss};
use pairbd_store::{EngineChoice, Store, StoreConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use driver::Driver;
use volume::ReplicatedVolume;

/// Tests only: set in a daemon's environment, its store simulates a volatile
/// disk cache, and the control socket accepts `{"command": "power-cut",
/// "seed": N}` (see `pairbd_store::Store::power_cut`).
pub const TEST_VOLATILE_ENV: &str = "PAIRBD_TEST_VOLATILE_STORE";

/// Tests only: `N:before|torn|after` — the daemon dies at its N-th metadata
/// write, at that phase (see `pairbd_meta::CrashPhase`).
pub const TEST_META_CRASH_ENV: &str = "PAIRBD_TEST_META_CRASH";

/// The exit code of a daemon stopped for a planned restart (EX_TEMPFAIL).
pub const RESTART_EXIT_CODE: u8 = 75;

/// How `pairbd daemon` ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonExit {
    /// A clean stop: the role was left (a Primary demoted itself).
    Stopped,
    /// A planned restart: a Primary stays Primary on disk and resumes when safe.
    Restart,
}

/// The restart marker of a node whose control socket is `control`.
pub fn restart_marker_path(control: &std::path::Path) -> std::path::PathBuf {
    let mut path = control.as_os_str().to_owned();
    path.push(".restart");
    std::path::PathBuf::from(path)
}

/// Reads and removes the restart marker; true if it allows resuming the Primary
/// role recorded in `persisted` (same resource, node and current generation).
fn take_restart_marker(
    control: &std::path::Path,
    res: &ResourceConfig,
    node: &NodeConfig,
    persisted: &pairbd_repl_core::PersistentState,
) -> bool {
    let path = restart_marker_path(control);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) => {
            warn!(
                "cannot read the restart marker {}: {e}; ignoring it",
                path.display()
            );
            return false;
        }
    };
    if let Err(e) = std::fs::remove_file(&path) {
        warn!("cannot remove the restart marker {}: {e}", path.display());
    }
    let marker: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let matches = marker["resource"] == res.name.as_str()
        && marker["node"] == node.name.as_str()
        && marker["generation"].as_str()
            == Some(format!("{:016x}", persisted.current_generation).as_str())
        && persisted.role == pairbd_repl_core::Role::Primary;
    if !matches {
        warn!(
            "the restart marker {} does not match this node's metadata ({}); a normal start",
            path.display(),
            text.trim()
        );
    }
    matches
}

/// Where `pairbd` looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/pairbd/pairbd.toml";

/// The metadata location of a node as the meta crate wants it.
pub fn meta_location(node: &NodeConfig) -> pairbd_meta::MetaLocation {
    match &node.meta {
        MetaLocation::Internal => pairbd_meta::MetaLocation::Internal {
            backing: node.backing.clone(),
        },
        MetaLocation::External(path) => pairbd_meta::MetaLocation::External { path: path.clone() },
    }
}

/// Checks that the metadata belongs to this node and resource, at this size.
pub fn check_record(
    record: &pairbd_meta::MetaRecord,
    res: &ResourceConfig,
    node: &NodeConfig,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    if record.resource != res.name || record.node_name != node.name || record.node_id != node.id {
        bail!(
            "the metadata on {} belongs to node {} (id {}) of resource {}, not node {} (id {}) of \
             resource {}; check --node and the configuration, or run `pairbd create-md --force`",
            path.display(),
            record.node_name,
            record.node_id,
            record.resource,
            node.name,
            node.id,
            res.name
        );
    }
    if record.data_size_bytes != res.size_bytes {
        bail!(
            "the metadata on {} describes {} bytes of data, the configuration {}; pairbd cannot \
             resize a resource",
            path.display(),
            record.data_size_bytes,
            res.size_bytes
        );
    }
    Ok(())
}

/// Runs `pairbd daemon` to completion.
pub fn run(config: &Config, node_name: &str, resource: Option<&str>) -> anyhow::Result<DaemonExit> {
    let res = config.resource(resource)?.clone();
    // Before any thread exists: the I/O-flusher flag is inherited by threads
    // created later, not by those already running.
    protect::apply();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pairbd-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon(res, node_name.to_string()))
}

/// The dirty bitmap's granularity: the configured one, which must fit the
/// metadata area, or the smallest from 4 KiB up whose bitmap fits it.
fn bitmap_granularity(res: &ResourceConfig, capacity: Option<u64>) -> anyhow::Result<u64> {
    use pairbd_repl_core::bitmap::{
        bitmap_area_bytes, GRANULARITY_MAX_BYTES, GRANULARITY_MIN_BYTES,
    };
    let fits = |g: u64| capacity.is_none_or(|cap| bitmap_area_bytes(res.size_bytes, g) <= cap);
    match res.bitmap_granularity_bytes {
        Some(g) if fits(g) => Ok(g),
        Some(g) => anyhow::bail!(
            "bitmap-granularity = {g} bytes needs {} bytes of bitmap for {} bytes of data, more than the {} bytes internal metadata holds: choose a larger granularity, or external metadata (`meta = PATH`)",
            bitmap_area_bytes(res.size_bytes, g),
            res.size_bytes,
            capacity.unwrap_or(0)
        ),
        None => {
            let mut g = GRANULARITY_MIN_BYTES;
            while !fits(g) {
                g *= 2;
                anyhow::ensure!(
                    g <= GRANULARITY_MAX_BYTES,
                    "{} bytes of data are too many for a dirty bitmap in internal metadata; use external metadata (`meta = PATH`)",
                    res.size_bytes
                );
            }
            Ok(g)
        }
    }
}

async fn daemon(res: ResourceConfig, node_name: String) -> anyhow::Result<DaemonExit> {
    let local = res.local(&node_name)?.clone();
    let peer = res.peer(&node_name)?.clone();

    let location = meta_location(&local);
    let meta = MetaStore::open(&location).with_context(|| {
        format!(
            "cannot use the metadata of node {} (run `pairbd create-md --node {} {}` first if \
             this node is new)",
            local.name, local.name, res.name
        )
    })?;
    check_record(meta.record(), &res, &local, location.path())?;
    let mut meta = meta;
    if let Some(spec) = std::env::var_os(TEST_META_CRASH_ENV) {
        let spec = spec.to_string_lossy().to_string();
        let (n, phase) = spec
            .split_once(':')
            .and_then(|(n, p)| Some((n.parse::<u64>().ok()?, p.parse().ok()?)))
            .with_context(|| format!("{TEST_META_CRASH_ENV}={spec}: use N:before|torn|after"))?;
        warn!("{TEST_META_CRASH_ENV} is set: this daemon dies at its metadata write {n} ({spec}; tests only)");
        meta.crash_for_tests(n, phase);
    }
    let persisted = meta.record().state;
    let planned_restart = take_restart_marker(&local.control, &res, &local, &persisted);
    let granularity = bitmap_granularity(&res, meta.bitmap_capacity_bytes())?;
    let bitmap_bytes = pairbd_repl_core::bitmap::bitmap_area_bytes(res.size_bytes, granularity);
    let bitmap_image = meta
        .read_bitmap(bitmap_bytes)
        .context("cannot read the dirty bitmap")?;
    let recorded_granularity = meta.record().bitmap_granularity_bytes;
    let recorded_al = meta.record().activity_log.clone();

    let mut store_cfg = StoreConfig::new(local.backing.clone());
    store_cfg.engine = match res.engine {
        Engine::Auto => EngineChoice::Auto,
        Engine::Uring => EngineChoice::Uring,
        Engine::Pool => EngineChoice::Pool,
    };
    store_cfg.direct_io = res.direct_io;
    store_cfg.direct_reads = res.direct_reads;
    store_cfg.aio_reads = res.aio_reads;
    store_cfg.data_size_bytes = Some(res.size_bytes);
    if std::env::var_os(TEST_VOLATILE_ENV).is_some() {
        warn!(
            "{TEST_VOLATILE_ENV} is set: the store keeps an undo log of unflushed writes for \
             simulated power cuts (tests only; slow)"
        );
        store_cfg.volatile_for_tests = true;
    }
    let store = Store::open(&store_cfg)
        .with_context(|| format!("cannot open the backing store {}", local.backing.display()))?;
    let engine = store.engine_kind().to_string();
    if persisted.role == pairbd_repl_core::Role::Primary {
        // Stopped as Primary (a crash or a planned restart): what the store
        // holds, page cache included, becomes durable before anything reads
        // it. The activity log says where it may differ from the peer, and a
        // resync from this store must not copy data that a power cut of this
        // node could still take back (docs/DURABILITY.md).
        store
            .flush()
            .await
            .context("cannot flush the backing store after an unclean stop")?;
    }

    let core_cfg = pairbd_repl_core::Config {
        node_name: local.name.clone(),
        resource: res.name.clone(),
        size_bytes: res.size_bytes,
        on_peer_loss: match res.on_peer_loss {
            pairbd_config::OnPeerLoss::Continue => OnPeerLoss::Continue,
            pairbd_config::OnPeerLoss::SuspendIo => OnPeerLoss::SuspendIo,
        },
        ack_timeout: res.ack_timeout,
        sync_chunk_bytes: res.sync_chunk_bytes,
        sync_window: res.sync_window,
        probe_timeout: res.ping_timeout,
        generation_seed: control::random_u64(),
        after_crash: match res.after_crash {
            _ if planned_restart => AfterCrash::ResumePrimary,
            pairbd_config::AfterCrash::Secondary => AfterCrash::Secondary,
            pairbd_config::AfterCrash::ResumePrimary => AfterCrash::ResumePrimary,
        },
        bitmap_granularity_bytes: granularity,
        sync_rate_bytes_per_sec: res.sync_rate_bytes_per_sec,
        sync_rate_min_bytes_per_sec: res.sync_rate_min_bytes_per_sec,
        al_extent_bytes: res.al_extent_bytes,
        al_extents: res.al_extents,
        max_inflight_bytes: res.max_inflight_bytes,
        bulk_lane_bytes: res.bulk_lane_bytes,
        after_split_brain: match res.after_split_brain {
            pairbd_config::AfterSplitBrain::Disconnect => AfterSplitBrain::Disconnect,
            pairbd_config::AfterSplitBrain::DiscardZeroChanges => {
                AfterSplitBrain::DiscardZeroChanges
            }
        },
    };
    let mut node = Node::new(core_cfg, persisted, Instant::now());
    node.restore_metadata(recorded_granularity, &bitmap_image, &recorded_al);
    if recorded_granularity != 0 && recorded_granularity != granularity {
        warn!(
            "the dirty bitmap was kept at {recorded_granularity} bytes per bit, the configuration says {granularity}: it counts as all dirty (one full sync)"
        );
    }
    let dirty = node.bitmap().dirty_bytes();
    if dirty > 0 {
        info!("dirty bitmap: {dirty} bytes out of sync at {granularity} bytes per bit");
    }
    if planned_restart {
        info!(
            "restarted after a planned restart as Primary: starting as Secondary, Primary again \
             once the peer connects, is Secondary and holds no newer data"
        );
    } else if persisted.role == pairbd_repl_core::Role::Primary {
        info!("the metadata says Primary: this node stopped uncleanly; it starts as Secondary");
    }
    if persisted.role == pairbd_repl_core::Role::Primary {
        match recorded_al.ranges(res.size_bytes) {
            Some(r) => info!(
                "activity log: {} hot extent(s) of {} bytes are marked out of sync (not the \
                 whole volume)",
                r.len(),
                recorded_al.extent_bytes
            ),
            None => warn!(
                "no usable activity log recorded (older metadata, or a write spanning most of \
                 the volume was in flight): the whole volume counts as out of sync"
            ),
        }
    }
    let batch = driver::BatchLimits {
        messages: res.batch_messages,
        bytes: usize::try_from(res.batch_bytes).unwrap_or(usize::MAX),
        delay: res.batch_delay,
        bulk_lane_bytes: res.bulk_lane_bytes,
    };
    let driver = Driver::new(node, store.clone(), meta, batch, res.merge_bytes);
    tokio::spawn(Arc::clone(&driver).run_timers());

    let endpoint = link::start(&res, &local, &peer, Arc::clone(&driver))?;

    let volume = Arc::new(ReplicatedVolume {
        driver: Arc::clone(&driver),
        resource: res.name.clone(),
    });
    // A node without listen addresses serves no clients (it can still replicate).
    let server = if local.listen.is_empty() {
        None
    } else {
        Some(
            Server::bind(
                Arc::clone(&volume),
                ExportConfig {
                    name: res.export.clone(),
                },
                &local.listen,
                ConnectionLimits::default(),
            )
            .await?,
        )
    };
    if let Some(server) = &server {
        let _ = driver.clients.set(server.clients());
    }
    let addresses: Vec<String> = server
        .iter()
        .flat_map(|s| s.local_addresses())
        .map(|a| a.to_string())
        .collect();

    let control = control::bind(&local.control)?;
    let control_task = tokio::spawn(control::serve(control, Arc::clone(&driver), engine.clone()));

    let status = driver.status();
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "pairbd daemon: ready: resource {}, node {}, {} / {}, {} engine, replication {}, \
             nbd on {}, control {}",
            res.name,
            local.name,
            pairbd_repl_core::role_name(status.role),
            pairbd_repl_core::disk_name(status.disk),
            engine,
            endpoint
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            if addresses.is_empty() {
                "nothing".to_string()
            } else {
                addresses.join(" ")
            },
            local.control.display()
        )?;
        stdout.flush()?;
    }

    let notifier = Arc::new(notify::Notifier::from_env());
    notifier.send(&format!(
        "READY=1\nSTATUS={}\nMAINPID={}\n",
        notify::status_line(&driver),
        std::process::id()
    ));
    let notify_task = tokio::spawn(notify::run(Arc::clone(&notifier), Arc::clone(&driver)));

    let shutdown = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let trigger = shutdown.clone();
    let failed = driver.failed.clone();
    let restart = driver.restart.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT: finishing in-flight requests, then stopping"),
            _ = terminate.recv() => info!("SIGTERM: finishing in-flight requests, then stopping"),
            _ = restart.cancelled() => info!("restart: finishing in-flight requests, then stopping for a restart"),
            _ = failed.cancelled() => error!("the node failed: stopping"),
        }
        trigger.cancel();
    });
    match server {
        Some(server) => server.run(shutdown).await,
        None => shutdown.cancelled().await,
    }
    control_task.abort();
    notify_task.abort();
    notifier.send("STOPPING=1\nSTATUS=stopping\n");
    let _ = std::fs::remove_file(&local.control);

    if let Some(reason) = driver
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        endpoint.close();
        bail!("node {} failed: {reason}", local.name);
    }
    if driver.restart.is_cancelled() {
        return stop_for_restart(&driver, &store, endpoint, &local, &res).await;
    }
    // A clean stop: the metadata records it, so this node comes back without
    // the suspicion an unclean primary carries.
    match driver.admin(AdminCommand::Shutdown).await {
        Ok(_) => {}
        Err(e) => error!("recording the clean stop failed: {e}"),
    }
    store
        .flush()
        .await
        .context("the final flush of the backing store failed")?;
    endpoint.close();
    info!("stopped");
    Ok(DaemonExit::Stopped)
}

/// The planned restart's stop: no clients are left (the server finished their
/// requests), the store is flushed, the metadata is left as it is, and the marker
/// names the generation the restarted node may resume.
async fn stop_for_restart(
    driver: &Arc<Driver>,
    store: &Store,
    endpoint: Arc<pairbd_link::Endpoint>,
    local: &NodeConfig,
    res: &ResourceConfig,
) -> anyhow::Result<DaemonExit> {
    store
        .flush()
        .await
        .context("the final flush of the backing store failed")?;
    let persisted = driver.persisted();
    if persisted.role == pairbd_repl_core::Role::Primary {
        let marker = serde_json::json!({
            "resource": res.name,
            "node": local.name,
            "generation": format!("{:016x}", persisted.current_generation),
        });
        let path = restart_marker_path(&local.control);
        let temporary = restart_marker_path(&path);
        std::fs::write(&temporary, format!("{marker}\n"))
            .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
            .and_then(|()| std::fs::rename(&temporary, &path))
            .with_context(|| format!("cannot write the restart marker {}", path.display()))?;
        info!(
            "stopped for a restart as Primary (generation {:016x}); marker {}",
            persisted.current_generation,
            path.display()
        );
    } else {
        info!("stopped for a restart (not Primary: nothing to resume)");
    }
    endpoint.close();
    Ok(DaemonExit::Restart)
}
