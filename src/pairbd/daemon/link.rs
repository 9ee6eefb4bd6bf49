//! The daemon's side of the replication link: binds the QUIC endpoint, dials
//! (lower node id) or accepts (higher), and pumps frames between a link and
//! the driver. A link's reader and writer tasks end when it fails; the driver
//! then tells the core, and the dialer dials again with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pairbd_config::{NodeConfig, ResourceConfig};
use pairbd_link::{Endpoint, Identity, Link, LinkConfig};
use pairbd_repl_core::{Lane, Message};
use pairbd_store::AlignedBuf;
use tracing::{info, warn};

use tokio::sync::mpsc;

use super::driver::{BatchLimits, Driver, Msg, SharedBuf};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Binds the endpoint and starts dialing or accepting in the background.
pub fn start(
    res: &ResourceConfig,
    local: &NodeConfig,
    peer: &NodeConfig,
    driver: Arc<Driver>,
) -> anyhow::Result<Arc<Endpoint>> {
    let identity = Identity::load(&local.certificate, &local.key)
        .with_context(|| format!("cannot load node {}'s certificate and key", local.name))?;
    let peer_cert = pairbd_link::load_certificate(&peer.certificate)
        .with_context(|| format!("cannot load the peer {}'s certificate", peer.name))?;
    let endpoint = Arc::new(
        Endpoint::bind(LinkConfig {
            identity,
            peer_cert,
            bind: local.replication,
            ping_timeout: res.ping_timeout,
        })
        .with_context(|| format!("cannot bind the replication address {}", local.replication))?,
    );
    if local.id < peer.id {
        tokio::spawn(dial(Arc::clone(&endpoint), peer.connect, driver));
    } else {
        tokio::spawn(accept(Arc::clone(&endpoint), driver));
    }
    Ok(endpoint)
}

async fn dial(endpoint: Arc<Endpoint>, addr: std::net::SocketAddr, driver: Arc<Driver>) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        if driver.failed.is_cancelled() {
            return;
        }
        if driver.is_standalone() {
            // Split brain: no link until the operator says `pairbd connect`.
            tokio::select! {
                _ = driver.reconnect.notified() => {}
                _ = driver.failed.cancelled() => return,
            }
            backoff = BACKOFF_MIN;
            continue;
        }
        match endpoint.connect(addr).await {
            Ok(link) => {
                info!("replication link to {addr} up");
                last_error.clear();
                backoff = BACKOFF_MIN;
                let closed = run(link, Arc::clone(&driver));
                closed.await;
            }
            Err(e) => {
                let text = e.to_string();
                // Say it once, not at every retry.
                if text != last_error {
                    warn!("cannot connect to the peer at {addr}: {text}; retrying");
                    last_error = text;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = driver.failed.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn accept(endpoint: Arc<Endpoint>, driver: Arc<Driver>) {
    loop {
        tokio::select! {
            link = endpoint.accept() => match link {
                Ok(link) => {
                    info!("replication link from {} up", link.remote_address());
                    // Runs in the background; a newer link replaces it.
                    tokio::spawn(run(link, Arc::clone(&driver)));
                }
                Err(e) => {
                    warn!("replication endpoint stopped accepting: {e}");
                    return;
                }
            },
            _ = driver.failed.cancelled() => return,
        }
    }
}

/// Bulk-lane messages handed from the main writer to the bulk writer and
/// not yet written (each at least `bulk-lane-bytes`; the in-flight window
/// bounds their bytes, this their number).
const BULK_QUEUE: usize = 1024;

/// Runs one link until it fails; returns when it is gone.
///
/// The link has two lanes (docs/PROTOCOL.md, "Two lanes"). One writer task
/// takes the core's messages in order; client writes of at least
/// `bulk-lane-bytes` go to a second task that writes them on the bulk
/// stream, each tagged with the number of main-stream frames written before
/// it. On the receiving side the main reader hands frames to the core as
/// they come; the bulk reader hands a bulk message over only once the main
/// reader has handed over as many frames as its tag says. So the main lane
/// overtakes the bulk lane, never the reverse.
fn run(link: Link, driver: Arc<Driver>) -> impl std::future::Future<Output = ()> {
    let conn = link.handle();
    let lanes = link.split_lanes();
    let (mut sender, mut receiver) = (lanes.main_tx, lanes.main_rx);
    let (mut bulk_sender, mut bulk_receiver) = (lanes.bulk_tx, lanes.bulk_rx);
    let (id, mut outgoing) = driver.link_up(conn.clone());
    let limits = driver.batch_limits();
    let (bulk_tx, mut bulk_rx) = mpsc::channel::<(u64, Msg)>(BULK_QUEUE);
    let bulk_driver = Arc::clone(&driver);
    let bulk_writer = tokio::spawn(async move {
        let mut batch: Vec<(u64, Msg)> = Vec::new();
        while let Some(first) = bulk_rx.recv().await {
            let mut bytes = frame_bytes(&first.1);
            batch.push(first);
            while batch.len() < limits.messages && bytes < limits.bytes {
                match bulk_rx.try_recv() {
                    Ok(next) => {
                        bytes += frame_bytes(&next.1);
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = bulk_sender.send_bulk_batch(&batch).await {
                bulk_driver.link_lost(id, &format!("sending on the bulk lane failed: {e}"));
                return;
            }
            for (_, msg) in &batch {
                bulk_driver.frames.count_bulk_sent(msg);
            }
            batch.clear();
        }
    });
    let writer_driver = Arc::clone(&driver);
    let writer = tokio::spawn(async move {
        let mut batch: Vec<Msg> = Vec::with_capacity(limits.messages);
        // Frames written to the main stream so far.
        let mut main_frames: u64 = 0;
        while let Some(msg) = outgoing.recv().await {
            let lanes = Lanes {
                bulk: &bulk_tx,
                main_frames,
            };
            if !collect_batch(msg, &mut outgoing, &limits, &mut batch, lanes).await {
                return;
            }
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = sender.send_batch(&batch).await {
                writer_driver.link_lost(id, &format!("sending failed: {e}"));
                return;
            }
            main_frames += batch.len() as u64;
            for msg in &batch {
                writer_driver.frames.count_sent(msg);
            }
            batch.clear();
        }
    });
    // The main frames handed to the core so far, for the bulk reader.
    let (handed_tx, mut handed_rx) = tokio::sync::watch::channel(0u64);
    let bulk_reader_driver = Arc::clone(&driver);
    let bulk_reader = tokio::spawn(async move {
        loop {
            let (after_main, msg) = match bulk_receiver.recv_bulk(AlignedBuf::for_overwrite).await {
                Ok(m) => m,
                Err(e) => {
                    bulk_reader_driver.link_lost(id, &format!("bulk lane: {e}"));
                    return;
                }
            };
            // The main frames sent before it come first (the main reader
            // ends, and drops the sender, when the link fails). Anything but
            // a write here is refused by the core, which drops the link
            // naming it.
            if handed_rx.wait_for(|n| *n >= after_main).await.is_err() {
                return;
            }
            let msg = share(msg);
            bulk_reader_driver.frames.count_bulk_received(&msg);
            bulk_reader_driver.bulk_message(id, msg);
        }
    });
    async move {
        let mut handed: u64 = 0;
        let mut batch = Vec::with_capacity(limits.messages);
        loop {
            let first = match receiver.recv(AlignedBuf::for_overwrite).await {
                Ok(msg) => msg,
                Err(e) => {
                    driver.link_lost(id, &e.to_string());
                    break;
                }
            };
            batch.push(share(first));
            // Frames that have already arrived are handled with it, under
            // one lock of the driver.
            let mut failed = None;
            while batch.len() < limits.messages {
                match receiver.try_recv_buffered(AlignedBuf::for_overwrite) {
                    Ok(Some(msg)) => batch.push(share(msg)),
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            for msg in &batch {
                driver.frames.count_received(msg);
            }
            handed += batch.len() as u64;
            driver.messages(id, &mut batch);
            handed_tx.send_replace(handed);
            if let Some(e) = failed {
                driver.link_lost(id, &e.to_string());
                break;
            }
        }
        writer.abort();
        bulk_writer.abort();
        bulk_reader.abort();
        conn.close("link finished");
    }
}

/// Fills `batch` with `first` and what follows it, except bulk-lane
/// messages, which go to the bulk writer in order (false: it is gone):
/// everything already queued goes out in one write (one wake-up of quinn's connection driver
/// instead of one per frame), up to the batch limits. With a batch delay,
/// the writer also waits up to that long (from the first message) for more
/// messages while the batch is not full; tokio's timer rounds the wait up
/// to its 1 ms tick.
async fn collect_batch(
    first: Msg,
    outgoing: &mut mpsc::Receiver<Msg>,
    limits: &BatchLimits,
    batch: &mut Vec<Msg>,
    lanes: Lanes<'_>,
) -> bool {
    let deadline = (!limits.delay.is_zero()).then(|| tokio::time::Instant::now() + limits.delay);
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        if msg.lane(limits.bulk_lane_bytes) == Lane::Bulk {
            // To the bulk writer, tagged with the main frames before it: the
            // ones written already and the ones batched ahead of it.
            let after_main = lanes.main_frames + batch.len() as u64;
            if lanes.bulk.send((after_main, msg)).await.is_err() {
                return false;
            }
        } else if !batch.last_mut().is_some_and(|last| last.absorb_acks(&msg)) {
            // Acks the core emitted in separate steps (disk completions that
            // ran as tasks), queued side by side: one frame. Only what is
            // already queued (or arrives within the batch delay) is merged,
            // and no other message changes place.
            bytes += frame_bytes(&msg);
            batch.push(msg);
        }
        if batch.len() >= limits.messages || bytes >= limits.bytes {
            break;
        }
        next = match outgoing.try_recv() {
            Ok(msg) => Some(msg),
            Err(mpsc::error::TryRecvError::Empty) => match deadline {
                Some(at) => tokio::time::timeout_at(at, outgoing.recv())
                    .await
                    .ok()
                    .flatten(),
                None => None,
            },
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
    }
    true
}

/// Where `collect_batch` hands bulk-lane messages.
struct Lanes<'a> {
    /// The bulk writer's queue.
    bulk: &'a mpsc::Sender<(u64, Msg)>,
    /// Frames written to the main stream before this batch.
    main_frames: u64,
}

/// Header and payload bytes of a message on the wire (control payloads
/// counted as nothing: they are small).
fn frame_bytes(msg: &Msg) -> usize {
    pairbd_repl_proto::HEADER_LEN + msg.data_payload().map_or(0, |p| p.0.len())
}

/// A received payload becomes shareable (the store writes it without a copy).
fn share(msg: Message<AlignedBuf>) -> Msg {
    match msg {
        Message::Hello(h) => Message::Hello(h),
        Message::State(s) => Message::State(s),
        Message::Write {
            seq,
            offset,
            payload,
            fua,
        } => Message::Write {
            seq,
            offset,
            payload: SharedBuf(Arc::new(payload)),
            fua,
        },
        Message::Trim {
            seq,
            offset,
            length,
        } => Message::Trim {
            seq,
            offset,
            length,
        },
        Message::WriteZeroes {
            seq,
            offset,
            length,
            no_hole,
        } => Message::WriteZeroes {
            seq,
            offset,
            length,
            no_hole,
        },
        Message::Flush { seq } => Message::Flush { seq },
        Message::Ack { seq } => Message::Ack { seq },
        Message::Acks(b) => Message::Acks(b),
        Message::FlushAck { seq } => Message::FlushAck { seq },
        Message::SyncStart { total_bytes } => Message::SyncStart { total_bytes },
        Message::SyncReady => Message::SyncReady,
        Message::SyncData {
            seq,
            offset,
            payload,
        } => Message::SyncData {
            seq,
            offset,
            payload: SharedBuf(Arc::new(payload)),
        },
        Message::SyncDone { seq } => Message::SyncDone { seq },
        Message::SyncDoneAck { seq } => Message::SyncDoneAck { seq },
        Message::Ping { seq } => Message::Ping { seq },
        Message::Pong { seq } => Message::Pong { seq },
        Message::DirtyRanges(d) => Message::DirtyRanges(d),
        Message::VerifyRequest {
            seq,
            offset,
            length,
        } => Message::VerifyRequest {
            seq,
            offset,
            length,
        },
        Message::VerifyReply(r) => Message::VerifyReply(r),
    }
}
