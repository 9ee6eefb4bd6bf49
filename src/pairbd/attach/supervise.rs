//! The attach supervisor: the process that configures /dev/nbdN through the kernel's
//! netlink interface and then stays with it, so that a restart of the Primary's
//! daemon (or a failover to the other node) costs the mail host no I/O error.
//!
//! 1. It joins the nbd multicast group first (so no `LINK_DEAD` can slip past), opens
//!    the connections to the Primary (the first node that accepts the export: a
//!    Secondary refuses it) and hands them to the kernel with `NBD_CMD_CONNECT`,
//!    with a request timeout and a dead-connection timeout.
//! 2. When the kernel announces `NBD_CMD_LINK_DEAD` for the device, it opens as many
//!    fresh connections to whichever node is Primary now (retrying until one is, or
//!    until the device is disconnected) and passes them with `NBD_CMD_RECONFIGURE`;
//!    the kernel puts each in place of a dead socket (surplus ones are dropped).
//!    Meanwhile the kernel holds new requests for up to the dead-connection timeout
//!    and retries the ones lost with the old sockets once their request timeout
//!    passes.
//! 3. When the device is no longer connected (`pairbd detach`, or the kernel gave
//!    up), it exits.
//!
//! A device whose supervisor died (the kernel's pid attribute names a process that
//! is gone) is adopted by a new one (`pairbd attach` again): it skips the connect,
//! replaces any socket that died meanwhile, and supervises from there.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use pairbd_config::ListenAddr;

use super::handshake::{self, Export};
use super::netlink::{self, ConnectRequest, Family, GenlSocket, NetlinkError};
use super::Candidate;

/// How long one connection attempt and each handshake step may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How often the supervisor looks whether its device is still connected while no
/// event arrives.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Pauses between rounds of reconnection attempts: from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What the supervisor needs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub candidates: Vec<Candidate>,
    pub export: String,
    pub connections: u32,
    /// N of /dev/nbdN.
    pub index: u32,
    pub block_size_bytes: u64,
    pub timeout_seconds: u64,
    pub dead_conn_timeout_seconds: u64,
    /// Adopt a device already connected by the supervisor with this pid, which is
    /// gone (no NBD_CMD_CONNECT then).
    pub adopted_from: Option<u32>,
}

/// A set of connections to one node, in transmission phase.
pub struct Connections {
    pub node: String,
    pub address: ListenAddr,
    pub sockets: Vec<OwnedFd>,
    pub export: Export,
}

/// Opens `plan.connections` connections to the first node that accepts the export;
/// the refusals otherwise.
pub fn open_to_primary(plan: &Plan) -> Result<Connections, Vec<String>> {
    let mut refusals = Vec::new();
    'nodes: for candidate in &plan.candidates {
        let mut sockets = Vec::new();
        let mut export = None;
        for _ in 0..plan.connections {
            match handshake::open(&candidate.address, &plan.export, HANDSHAKE_LIMIT) {
                Ok((socket, found)) => {
                    if export.is_some_and(|e| e != found) {
                        refusals.push(format!(
                            "node {} ({}): its connections disagree about the export",
                            candidate.node, candidate.address
                        ));
                        continue 'nodes;
                    }
                    export = Some(found);
                    sockets.push(socket);
                }
                Err(error) => {
                    refusals.push(format!(
                        "node {} ({}): {error}",
                        candidate.node, candidate.address
                    ));
                    continue 'nodes;
                }
            }
        }
        if let Some(export) = export {
            return Ok(Connections {
                node: candidate.node.clone(),
                address: candidate.address.clone(),
                sockets,
                export,
            });
        }
    }
    Err(refusals)
}

/// Why the supervisor could not attach.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("no node accepted the attach (is one of them Primary?):\n  {}", .0.join("\n  "))]
    NoPrimary(Vec<String>),
}

fn log(text: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "{}.{:03} pairbd attach[{}]: {text}",
        now.as_secs(),
        now.subsec_millis(),
        std::process::id()
    );
}

/// The pid the kernel shows for a connected device: the process that configured it.
pub fn device_pid(index: u32) -> Option<u32> {
    let path = format!("/sys/block/nbd{index}/pid");
    std::fs::read_to_string(Path::new(&path))
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
}

/// The device is still connected under the configuration this supervisor looks
/// after: configured by this process, or by the dead supervisor it adopted.
fn still_ours(plan: &Plan) -> bool {
    device_pid(plan.index)
        .is_some_and(|pid| pid == std::process::id() || Some(pid) == plan.adopted_from)
}

/// Configures the device and reports on `report` (one line: `ok MESSAGE` or
/// `error MESSAGE`), then supervises it until it is disconnected.
pub fn run(
    plan: &Plan,
    report: &mut dyn Write,
    describe: impl Fn(&Connections) -> String,
) -> Result<(), SuperviseError> {
    let (mut requests, family) = netlink::nbd_family()?;
    let events = GenlSocket::open()?;
    events.join_group(netlink::nbd_group(&family)?)?;
    events.set_receive_timeout(Some(IDLE_CHECK))?;

    if let Some(previous) = plan.adopted_from {
        let message = format!("adopted from pid {previous}, netlink");
        log(&format!("/dev/nbd{}: {message}", plan.index));
        let _ = writeln!(report, "ok {message}");
        let _ = report.flush();
        // A socket may have died while nobody supervised: new sockets replace any
        // dead one (the kernel drops those it has no place for).
        reconnect(
            plan,
            &mut requests,
            &family,
            "adopted: replacing any socket that died",
        );
        supervise(plan, &mut requests, &family, &events);
        return Ok(());
    }
    let connections = open_to_primary(plan).map_err(SuperviseError::NoPrimary)?;
    let fds: Vec<i32> = connections.sockets.iter().map(|s| s.as_raw_fd()).collect();
    let request = ConnectRequest {
        index: plan.index,
        size_bytes: connections.export.size_bytes,
        block_size_bytes: plan.block_size_bytes,
        timeout_seconds: plan.timeout_seconds,
        dead_conn_timeout_seconds: plan.dead_conn_timeout_seconds,
        server_flags: u64::from(connections.export.flags),
    };
    requests.connect(family.id, &request, &fds)?;
    // The kernel holds its own references to the sockets now.
    let message = describe(&connections);
    drop(connections);
    log(&format!("connected /dev/nbd{}: {message}", plan.index));
    let _ = writeln!(report, "ok {message}");
    let _ = report.flush();

    supervise(plan, &mut requests, &family, &events);
    Ok(())
}

fn supervise(plan: &Plan, requests: &mut GenlSocket, family: &Family, events: &GenlSocket) {
    loop {
        let dead = match events.receive() {
            Ok(messages) => messages
                .iter()
                .any(|m| netlink::link_dead_index(m, family.id) == Some(plan.index)),
            Err(NetlinkError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            Err(e) => {
                // ENOBUFS: events were lost; a reconfiguration with no dead socket
                // costs nothing but the connections, so assume the worst.
                log(&format!("receiving events: {e}; reconnecting to be sure"));
                true
            }
        };
        if !still_ours(plan) {
            log(&format!(
                "/dev/nbd{} is no longer connected by this supervisor: exiting",
                plan.index
            ));
            return;
        }
        if dead {
            reconnect(plan, requests, family, "a connection died");
        }
    }
}

/// Fresh connections to the Primary in place of the dead ones; retries until a
/// node accepts or the device is gone.
fn reconnect(plan: &Plan, requests: &mut GenlSocket, family: &Family, why: &str) {
    let started = Instant::now();
    log(&format!("/dev/nbd{}: {why}; reconnecting", plan.index));
    let mut pause = RETRY_FIRST;
    let mut attempts = 0u64;
    loop {
        if !still_ours(plan) {
            return;
        }
        attempts += 1;
        match open_to_primary(plan) {
            Ok(connections) => {
                let fds: Vec<i32> = connections.sockets.iter().map(|s| s.as_raw_fd()).collect();
                match requests.reconfigure(family.id, plan.index, &fds) {
                    Ok(()) => {
                        log(&format!(
                            "/dev/nbd{}: reconfigured with {} new connection(s) to node {} ({}) \
                             after {:.1}s and {attempts} attempt(s)",
                            plan.index,
                            fds.len(),
                            connections.node,
                            connections.address,
                            started.elapsed().as_secs_f64()
                        ));
                        return;
                    }
                    Err(e) => log(&format!("NBD_CMD_RECONFIGURE failed: {e}")),
                }
            }
            Err(refusals) => {
                if attempts == 1 || attempts % 20 == 0 {
                    log(&format!(
                        "no Primary yet (attempt {attempts}): {}",
                        refusals.join("; ")
                    ));
                }
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(RETRY_MAX);
    }
}
