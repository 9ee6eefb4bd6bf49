//! The daemon's side of the replication link: binds the QUIC endpoint, dials
//! (lower node id) or accepts (higher), and pumps frames between a link and
//! the driver. A link's reader and writer tasks end when it fails; the driver
//! then tells the core, and the dialer dials again with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pairbd_config::{NodeConfig, ResourceConfig};
use pairbd_link::{Endpoint, Identity, Link, LinkConfig};
use pairbd_repl_core::Message;
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

/// Runs one link until it fails; returns when it is gone.
fn run(link: Link, driver: Arc<Driver>) -> impl std::future::Future<Output = ()> {
    let conn = link.handle();
    let (mut sender, mut receiver) = link.split();
    let close_conn = conn.clone();
    let (id, mut outgoing) = driver.link_up(Box::new(move |reason: &str| close_conn.close(reason)));
    let writer_driver = Arc::clone(&driver);
    let limits = driver.batch_limits();
    let writer = tokio::spawn(async move {
        let mut batch: Vec<Msg> = Vec::with_capacity(limits.messages);
        while let Some(msg) = outgoing.recv().await {
            collect_batch(msg, &mut outgoing, &limits, &mut batch).await;
            if let Err(e) = sender.send_batch(&batch).await {
                writer_driver.link_lost(id, &format!("sending failed: {e}"));
                return;
            }
            for msg in &batch {
                writer_driver.frames.count_sent(msg);
            }
            batch.clear();
        }
    });
    async move {
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
            driver.messages(id, &mut batch);
            if let Some(e) = failed {
                driver.link_lost(id, &e.to_string());
                break;
            }
        }
        writer.abort();
        conn.close("link finished");
    }
}

/// Fills `batch` with `first` and what follows it: everything already
/// queued goes out in one write (one wake-up of quinn's connection driver
/// instead of one per frame), up to the batch limits. With a batch delay,
/// the writer also waits up to that long (from the first message) for more
/// messages while the batch is not full; tokio's timer rounds the wait up
/// to its 1 ms tick.
async fn collect_batch(
    first: Msg,
    outgoing: &mut mpsc::Receiver<Msg>,
    limits: &BatchLimits,
    batch: &mut Vec<Msg>,
) {
    let deadline = (!limits.delay.is_zero()).then(|| tokio::time::Instant::now() + limits.delay);
    let mut bytes = frame_bytes(&first);
    batch.push(first);
    while batch.len() < limits.messages && bytes < limits.bytes {
        let next = match outgoing.try_recv() {
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
        let Some(msg) = next else { break };
        // Acks the core emitted in separate steps (disk completions that
        // ran as tasks), queued side by side: one frame. Only what is
        // already queued (or arrives within the batch delay) is merged, and
        // no other message changes place.
        if batch.last_mut().is_some_and(|last| last.absorb_acks(&msg)) {
            continue;
        }
        bytes += frame_bytes(&msg);
        batch.push(msg);
    }
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
