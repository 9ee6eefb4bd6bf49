//! The replication state machine of pairbd, pure (quinn-proto's shape).
//!
//! Architecture invariant: no IO, no clock, no tokio, quinn or io-uring. Time is
//! passed in. The driver feeds inputs with `handle_*` and drains outputs with
//! `poll`/`poll_timeout`; it executes what comes out and reports completions.

pub use pairbd_repl_proto::{DiskState, NodeState, Role};

/// What a node keeps in its metadata, written atomically before anything that
/// depends on it is told to a client or to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistentState {
    /// Primary from the moment a promotion is persisted until a clean demotion
    /// or shutdown: found Primary at start-up, the node stopped uncleanly.
    pub role: Role,
    /// The quality of this node's data.
    pub disk: DiskState,
    /// DRBD's current generation identifier (0: never promoted).
    pub current_generation: u64,
    /// DRBD's bitmap generation identifier (0: none).
    pub bitmap_generation: u64,
    /// DRBD's history generation identifiers, newest first (0: none).
    pub history_generations: [u64; 2],
    /// As primary: the peer may be missing writes and needs a sync.
    pub peer_sync_needed: bool,
}

impl PersistentState {
    /// The state `create-md` writes: a secondary with no valid data.
    pub fn fresh() -> PersistentState {
        PersistentState {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            current_generation: 0,
            bitmap_generation: 0,
            history_generations: [0, 0],
            peer_sync_needed: false,
        }
    }
}
