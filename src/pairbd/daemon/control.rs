//! The control socket: how `pairbd status`, `promote`, `demote` and
//! `resume-io` talk to a running daemon.
//!
//! A Unix socket; each connection carries one JSON request line and gets one
//! JSON answer line: `{"command": "status"}`, `{"command": "promote",
//! "force": false}`, `{"command": "demote", "force": false}`,
//! `{"command": "resume-io"}`, `{"command": "connect"}` (with
//! `"discard_my_data": true` on a split brain's sacrificed node), `{"command":
//! "restart"}` (stop for a planned restart, see `daemon/mod.rs`).
//! Answers are `{"ok": true, "message": ..., "status": {...}}` or
//! `{"ok": false, "error": ...}`. A malformed request gets an error answer; it
//! never disturbs the node.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use pairbd_nbd_server::ClientInfo;
use pairbd_repl_core::{disk_name, role_name, AdminCommand, Generations, OnPeerLoss, Status};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::driver::Driver;

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 4096;

fn generations_json(g: &Generations) -> Value {
    json!({
        "current": format!("{:016X}", g.current),
        "bitmap": format!("{:016X}", g.bitmap),
        "history": [format!("{:016X}", g.history[0]), format!("{:016X}", g.history[1])],
    })
}

fn client_json(c: &ClientInfo) -> Value {
    json!({
        "id": c.id,
        "address": c.peer,
        "export": c.export,
        "since_unix": c.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

/// Names attached clients for a refusal: "#3 127.0.0.1:4711 (export mail)".
fn describe_clients(clients: &[ClientInfo]) -> String {
    clients
        .iter()
        .map(|c| format!("#{} {} (export {})", c.id, c.peer, c.export))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Status as JSON: the `--json` form of `pairbd status`.
pub fn status_json(s: &Status, engine: &str, clients: &[ClientInfo]) -> Value {
    json!({
        "resource": s.resource,
        "node": s.node_name,
        "role": role_name(s.role),
        "disk": disk_name(s.disk),
        "connection": s.connection.name(),
        "peer": s.peer.as_ref().map(|p| json!({
            "node": p.node_name,
            "role": role_name(p.role),
            "disk": disk_name(p.disk),
            "generations": generations_json(&p.generations),
        })),
        "sync": s.sync.map(|y| json!({
            "direction": if y.source { "source" } else { "target" },
            "kind": if !y.source { "unknown" } else if y.full { "full" } else { "bitmap" },
            "percent": (y.percent() * 10.0).round() / 10.0,
            "done_bytes": y.done_bytes,
            "total_bytes": y.total_bytes,
            "rate_bytes_per_sec": y.rate_bytes_per_sec().round(),
            "eta_secs": y.eta_secs().map(|e| e.round()),
        })),
        "peer_sync_needed": s.peer_sync_needed,
        "verify": s.verify.map(|y| json!({
            "percent": (y.percent() * 10.0).round() / 10.0,
            "done_bytes": y.done_bytes,
            "total_bytes": y.total_bytes,
            "rate_bytes_per_sec": y.rate_bytes_per_sec().round(),
            "eta_secs": y.eta_secs().map(|e| e.round()),
        })),
        "last_verify": s.last_verify.as_ref().map(|v| json!({
            "checked_bytes": v.checked_bytes,
            "differing_blocks": v.differing_blocks,
            "ranges": v.ranges,
        })),
        "bitmap": json!({
            "granularity_bytes": s.bitmap_granularity_bytes,
            "out_of_sync_bytes": s.out_of_sync_bytes,
            "marked_bytes": s.marked_bytes,
            "resynced_bytes": s.resynced_bytes,
        }),
        "io_suspended": s.io_suspended,
        "on_peer_loss": match s.on_peer_loss {
            OnPeerLoss::Continue => "continue",
            OnPeerLoss::SuspendIo => "suspend-io",
        },
        "requests_in_flight": s.requests_in_flight,
        "window": json!({
            "inflight_bytes": s.inflight_bytes,
            "max_inflight_bytes": s.max_inflight_bytes,
            "writes_waiting": s.window_waiting,
            "writes_waited_total": s.window_waited,
        }),
        "link_losses": s.link_losses,
        "last_disconnect": s.last_disconnect,
        "failed": s.failed,
        "generation": format!("{:016X}", s.generations.current),
        "generations": generations_json(&s.generations),
        "demoting": s.demoting,
        "clients": clients.iter().map(client_json).collect::<Vec<_>>(),
        "engine": engine,
    })
}

/// Binds the control socket, replacing a stale one left by a dead daemon.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon answers on the control socket {}; is this node already running?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))
}

/// Serves control connections until the task is dropped.
pub async fn serve(listener: UnixListener, driver: Arc<Driver>, engine: String) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let driver = Arc::clone(&driver);
                let engine = engine.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, driver, &engine).await {
                        warn!("control connection: {e:#}");
                    }
                });
            }
            Err(e) => warn!("control socket accept: {e}"),
        }
    }
}

async fn handle(stream: UnixStream, driver: Arc<Driver>, engine: &str) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let answer = answer(&line, &driver, engine).await;
    let mut text = answer.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    if answer["power_cut"] == true {
        // The simulated power cut is done: end the process at once, with no
        // clean stop, no flush, no destructor — as the power going off would.
        let _ = write.shutdown().await;
        // SAFETY: _exit ends the process immediately; nothing after it runs.
        unsafe { libc::_exit(137) };
    }
    Ok(())
}

async fn answer(line: &str, driver: &Arc<Driver>, engine: &str) -> Value {
    let request: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    let force = request
        .get("force")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let cmd = match request.get("command").and_then(Value::as_str) {
        Some("status") => {
            let mut status = status_json(&driver.status(), engine, &driver.attached_clients());
            status["meta_writes"] = json!(driver.meta_writes());
            // Group commit at a glance: flushes asked of this node's store
            // (client flushes on a Primary, the peer's on a Secondary, the
            // core's own) and the fdatasyncs that served them.
            status["flushes"] = json!({
                "requested": driver.store().flushes_requested(),
                "fdatasyncs": driver.store().fdatasyncs_issued(),
            });
            // How the store does its I/O (docs/OPERATIONS.md: direct-io,
            // direct-reads, aio-reads), as opened: a setting the file system
            // refused shows here as false.
            let store = driver.store();
            status["store"] = json!({
                "direct_io": store.direct_io(),
                "direct_reads": store.direct_reads(),
                "aio_reads": store.aio_reads(),
                "aio_reads_done": store.aio_reads_done(),
            });
            status["link_frames"] = driver.frames.json();
            status["quic"] = driver.link_stats().map_or(Value::Null, |q| {
                json!({
                    "rtt_us": u64::try_from(q.rtt.as_micros()).unwrap_or(u64::MAX),
                    "cwnd_bytes": q.cwnd,
                    "mtu": q.mtu,
                    "datagrams_sent": q.datagrams_sent,
                    "datagrams_received": q.datagrams_received,
                    "send_calls": q.send_calls,
                    "receive_calls": q.receive_calls,
                    "lost_packets": q.lost_packets,
                    "congestion_events": q.congestion_events,
                    "acks_sent": q.acks_sent,
                    "acks_received": q.acks_received,
                })
            });
            status["writes"] = driver.writes.to_json();
            let batch = driver.batch_limits();
            status["batch"] = json!({
                "messages": batch.messages,
                "bytes": batch.bytes,
                "delay_us": u64::try_from(batch.delay.as_micros()).unwrap_or(u64::MAX),
                "bulk_lane_bytes": batch.bulk_lane_bytes,
            });
            return json!({"ok": true, "status": status});
        }
        Some("promote") => AdminCommand::Promote {
            force,
            new_generation: random_u64(),
        },
        Some("demote") => {
            let clients = driver.attached_clients();
            if !clients.is_empty() {
                if !force {
                    return json!({
                        "ok": false,
                        "error": format!(
                            "{} NBD client(s) attached: {}; unmount and detach them first (or \
                             pass --force, which cuts them off and fails their in-flight requests)",
                            clients.len(),
                            describe_clients(&clients)
                        ),
                        "status": status_json(&driver.status(), engine, &clients),
                    });
                }
                if let Some(registry) = driver.clients.get() {
                    let cut = registry.disconnect_all();
                    warn!("demote --force: cutting off {}", describe_clients(&cut));
                }
            }
            AdminCommand::Demote { force }
        }
        Some("restart") => {
            // A planned restart: the daemon stops serving (the clients' in-flight
            // requests finish), flushes, and exits for its supervisor to start it
            // again; a Primary resumes its role once its peer agrees.
            let status = status_json(&driver.status(), engine, &driver.attached_clients());
            let role = status["role"].as_str().unwrap_or_default().to_string();
            let peer_agrees = status["connection"] == "Connected"
                && status["peer"]["role"] == "Secondary"
                && status["peer"]["disk"] == "UpToDate";
            if role == "Primary" && !peer_agrees && !force {
                return json!({
                    "ok": false,
                    "error": "the peer is not connected, Secondary and UpToDate: a restarted \
                              Primary resumes only once its peer agrees, so the mail hosts' I/O \
                              would wait for an operator; fix the peer first, or pass --force",
                    "status": status,
                });
            }
            driver.restart.cancel();
            info!("restart requested (role {role})");
            return json!({
                "ok": true,
                "message": format!(
                    "stopping for a restart ({role}; exit code {})",
                    super::RESTART_EXIT_CODE
                ),
                "status": status,
            });
        }
        Some("resume-io") => AdminCommand::ResumeIo,
        Some("invalidate") => AdminCommand::Invalidate,
        Some("verify") => AdminCommand::Verify,
        Some("resync-marked") => AdminCommand::ResyncMarked,
        Some("connect") => {
            if request.get("discard_my_data").and_then(Value::as_bool) == Some(true) {
                AdminCommand::ConnectDiscardingMyData
            } else {
                AdminCommand::Connect
            }
        }
        Some("power-cut") => {
            // Tests only (see TEST_VOLATILE_ENV): refused by an ordinary store.
            let seed = request.get("seed").and_then(Value::as_u64).unwrap_or(0);
            return match driver.store().power_cut(seed) {
                Ok(r) => {
                    warn!(
                        "simulated power cut (seed {seed}): {} unflushed changes kept, {} lost, \
                         {} torn, {} FUA writes kept; exiting",
                        r.kept, r.dropped, r.torn, r.fua_kept
                    );
                    json!({"ok": true, "power_cut": true, "kept": r.kept, "dropped": r.dropped,
                           "torn": r.torn, "fua_kept": r.fua_kept})
                }
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            };
        }
        Some(other) => return json!({"ok": false, "error": format!("unknown command {other:?}")}),
        None => return json!({"ok": false, "error": "the request names no command"}),
    };
    let name = request["command"].as_str().unwrap_or_default().to_string();
    let connect = matches!(
        cmd,
        AdminCommand::Connect | AdminCommand::ConnectDiscardingMyData
    );
    let result = driver.admin(cmd).await;
    if connect && result.is_ok() {
        driver.reconnect.notify_one();
    }
    let status = status_json(&driver.status(), engine, &driver.attached_clients());
    match result {
        Ok(message) => {
            info!("{name}{}: {message}", if force { " --force" } else { "" });
            json!({"ok": true, "message": message, "status": status})
        }
        Err(e) => {
            warn!("{name} refused: {e}");
            json!({"ok": false, "error": e.to_string(), "status": status})
        }
    }
}

/// A random number: new generation identifiers (and their generator's seed)
/// must differ between the nodes and between restarts.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        bytes = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    u64::from_le_bytes(bytes) | 1
}

/// The client side: sends one request, returns the answer.
pub async fn request(path: &PathBuf, request: Value) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the daemon on {} (is `pairbd daemon` running for this node?)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = request.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(line.trim()).context("malformed answer from the daemon")
}
