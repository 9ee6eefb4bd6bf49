//! The node's state as `pairbd status` reports it: plain data, computed from
//! the core on demand.

use crate::{DiskState, Generations, OnPeerLoss, Role};

/// The state of the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// No link to the peer.
    Disconnected,
    /// A link exists; the hellos are being exchanged.
    Handshaking,
    /// The peer is known and replicating.
    Connected,
    /// The nodes' data diverged (split brain) or is unrelated: no link is
    /// made until the operator says so (`pairbd connect`).
    StandAlone,
}

impl ConnectionState {
    /// The name shown in status.
    pub fn name(self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "Disconnected",
            ConnectionState::Handshaking => "Handshaking",
            ConnectionState::Connected => "Connected",
            ConnectionState::StandAlone => "StandAlone",
        }
    }
}

/// What this node knows about its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's node name.
    pub node_name: String,
    /// The peer's role.
    pub role: Role,
    /// The peer's disk state.
    pub disk: DiskState,
    /// The peer's generation identifiers.
    pub generations: Generations,
}

/// A running sync (a full sync or a quick resync of the dirty bitmap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncStatus {
    /// True when this node is the source (primary), false when the target.
    pub source: bool,
    /// Source only: true for a full sync (no common bitmap generation, a
    /// crashed primary), false for a resync of the dirty regions. A target
    /// learns only the byte count.
    pub full: bool,
    /// Bytes acknowledged by the target so far (source) or written (target).
    pub done_bytes: u64,
    /// Bytes to sync in all.
    pub total_bytes: u64,
    /// Seconds since the sync started (per the driver's clock).
    pub elapsed_secs: f64,
}

impl SyncStatus {
    /// Percent done, 0–100.
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            100.0
        } else {
            self.done_bytes as f64 * 100.0 / self.total_bytes as f64
        }
    }

    /// Bytes per second since the start.
    pub fn rate_bytes_per_sec(&self) -> f64 {
        if self.elapsed_secs <= 0.0 {
            0.0
        } else {
            self.done_bytes as f64 / self.elapsed_secs
        }
    }

    /// Seconds left at the current rate, if a rate is known.
    pub fn eta_secs(&self) -> Option<f64> {
        let rate = self.rate_bytes_per_sec();
        (rate > 0.0).then(|| (self.total_bytes - self.done_bytes) as f64 / rate)
    }
}

/// Everything `pairbd status` shows for one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The resource's name.
    pub resource: String,
    /// This node's name.
    pub node_name: String,
    /// This node's role.
    pub role: Role,
    /// This node's disk state.
    pub disk: DiskState,
    /// The link.
    pub connection: ConnectionState,
    /// The peer, once a hello arrived on the current link.
    pub peer: Option<PeerStatus>,
    /// A full sync in progress.
    pub sync: Option<SyncStatus>,
    /// As primary: writes may be on this node only; the peer needs a sync.
    pub peer_sync_needed: bool,
    /// Writes held by `on-peer-loss = "suspend-io"`.
    pub io_suspended: bool,
    /// The configured policy while the peer is away.
    pub on_peer_loss: OnPeerLoss,
    /// Client requests the core has not answered yet.
    pub requests_in_flight: usize,
    /// Why the link last went down, if it did.
    pub last_disconnect: Option<String>,
    /// Set once the node failed: it stopped and writes nothing more.
    pub failed: Option<String>,
    /// This node's generation identifiers.
    pub generations: Generations,
    /// A demotion waits for client requests to finish.
    pub demoting: bool,
    /// Bytes this node's dirty bitmap marks out of sync now.
    pub out_of_sync_bytes: u64,
    /// Bytes newly marked out of sync since the node started (writes without
    /// the peer, the transfer log at link loss).
    pub marked_bytes: u64,
    /// Bytes sent by syncs (as source) and acknowledged by the target since
    /// the node started.
    pub resynced_bytes: u64,
    /// The dirty bitmap's granularity (bytes per bit).
    pub bitmap_granularity_bytes: u64,
    /// An online verify in progress (as a sync: bytes compared of the volume).
    pub verify: Option<SyncStatus>,
    /// The last finished verify: bytes compared, 4 KiB blocks that differed,
    /// and the first differing ranges (offset, length).
    pub last_verify: Option<VerifyResult>,
    /// Client write payload bytes sent to the peer and not yet acknowledged
    /// (the in-flight window's fill).
    pub inflight_bytes: u64,
    /// The window's size (`max-inflight-bytes`; `u64::MAX`: none).
    pub max_inflight_bytes: u64,
    /// Client writes waiting for room in the in-flight window.
    pub window_waiting: usize,
    /// Times a client write began to wait for room in the window since the
    /// node started.
    pub window_waited: u64,
    /// Links to the peer lost (after a handshake began) since the node
    /// started.
    pub link_losses: u64,
}

/// What an online verify found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyResult {
    /// Bytes compared.
    pub checked_bytes: u64,
    /// 4 KiB blocks whose checksums differed (marked out of sync).
    pub differing_blocks: u64,
    /// The first differing ranges, adjacent blocks merged (at most 64).
    pub ranges: Vec<(u64, u64)>,
}

/// Display names for roles and disk states (DRBD's spelling).
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "Primary",
        Role::Secondary => "Secondary",
    }
}

/// Display name of a disk state.
pub fn disk_name(disk: DiskState) -> &'static str {
    match disk {
        DiskState::Inconsistent => "Inconsistent",
        DiskState::Outdated => "Outdated",
        DiskState::UpToDate => "UpToDate",
    }
}
