//! The replication state machine of pairbd, pure (quinn-proto's shape).
//!
//! One [`Node`] per resource and node. The driver feeds it inputs with
//! `handle_*` (client requests, disk completions, metadata completions, peer
//! messages, link events, timer expiries, admin commands) and drains what it
//! must do with [`Node::poll`] and [`Node::poll_timeout`]: disk operations,
//! metadata writes, peer messages, client replies, disconnects and fail-stops.
//!
//! Architecture invariant: no IO, no clock, no tokio, quinn or io-uring. Time is
//! passed in as `Instant`s the driver (or a simulator) chooses. Nothing told to a
//! client or to the peer depends on metadata the driver has not yet reported
//! durable.

pub mod activity_log;
pub mod bitmap;
pub mod generations;
pub mod merge;
mod node;
mod ops;
pub mod resync_rate;
mod status;

pub use activity_log::{ActivityLog, ActivityLogImage};
pub use bitmap::{BitmapPage, DirtyBitmap};
pub use generations::Verdict;
pub use merge::{plan_disk_ops, MergeLimits, MergedWrite, PlannedOp, MERGE_PIECES_MAX};
#[cfg(feature = "mutations")]
pub use node::Mutation;
pub use node::Node;
pub use pairbd_repl_proto::{
    AckBatch, DirtyRanges, DiskState, Generations, Hello, Lane, Message, NodeState, Role,
};
pub use status::{
    disk_name, role_name, ConnectionState, PeerStatus, Status, SyncStatus, VerifyResult,
};

use std::sync::Arc;
use std::time::Duration;

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

    /// The generation identifiers as the wire carries them.
    pub fn generations(&self) -> Generations {
        Generations {
            current: self.current_generation,
            bitmap: self.bitmap_generation,
            history: self.history_generations,
        }
    }

    /// Sets the generation identifiers.
    pub fn set_generations(&mut self, g: Generations) {
        self.current_generation = g.current;
        self.bitmap_generation = g.bitmap;
        self.history_generations = g.history;
    }
}

/// A payload buffer: the core never looks inside, it only needs the length and
/// cheap clones (one for the local store, one for the peer).
pub trait Payload: Clone {
    /// The payload's length in bytes.
    fn len(&self) -> usize;
    /// The bytes (online verify checksums them; nothing else looks inside).
    fn bytes(&self) -> &[u8];
    /// Whether the payload is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Payload for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl<T: AsRef<[u8]> + ?Sized> Payload for Arc<T> {
    fn len(&self) -> usize {
        self.as_ref().as_ref().len()
    }
    fn bytes(&self) -> &[u8] {
        self.as_ref().as_ref()
    }
}

/// What a primary does with writes while its peer is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPeerLoss {
    /// Keep serving on one node (DRBD's fencing dont-care): writes acknowledged
    /// meanwhile exist on this node only until the peer is synced again.
    Continue,
    /// Hold writes and flushes until the peer returns or `resume-io`.
    SuspendIo,
}

/// The node's fixed parameters.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name.
    pub node_name: String,
    /// The resource's name.
    pub resource: String,
    /// The size of the data area in bytes.
    pub size_bytes: u64,
    /// The policy while the peer is away.
    pub on_peer_loss: OnPeerLoss,
    /// A peer that leaves a request unacknowledged this long is dropped.
    pub ack_timeout: Duration,
    /// Bytes per full-sync chunk.
    pub sync_chunk_bytes: u64,
    /// Full-sync chunks in flight at once.
    pub sync_window: usize,
    /// How long a promotion waits for a peer that looks connected and
    /// Primary to answer a probe before it counts the peer as lost.
    pub probe_timeout: Duration,
    /// Seeds the generator of new generation identifiers (the driver passes
    /// real randomness).
    pub generation_seed: u64,
    /// What a node that stopped as Primary without a clean demotion does.
    pub after_crash: AfterCrash,
    /// Bytes of the data area per bit of the dirty bitmap (a power of two,
    /// 4 KiB to 1 MiB; see `bitmap`).
    pub bitmap_granularity_bytes: u64,
    /// What a split brain does without the operator.
    pub after_split_brain: AfterSplitBrain,
    /// The most bytes per second a sync source reads and sends (`None`: as
    /// fast as the window allows), so that a resync leaves the disks to the
    /// clients.
    pub sync_rate_bytes_per_sec: Option<u64>,
    /// The rate a sync drops to while clients are active (`None`: it does
    /// not yield; see `resync_rate`).
    pub sync_rate_min_bytes_per_sec: Option<u64>,
    /// Bytes per activity-log extent (a power of two, 64 KiB to 1 GiB; see
    /// `activity_log`).
    pub al_extent_bytes: u64,
    /// Extents the activity log holds at most (8 to 960): after a crash as
    /// Primary at most this many extents are resynced.
    pub al_extents: usize,
    /// The in-flight window: the most client write payload bytes sent to the
    /// peer and not yet acknowledged. A write that would exceed it waits,
    /// unstarted, and later writes wait behind it; acks release them in
    /// arrival order. A single larger write still goes when nothing else is
    /// in flight. `u64::MAX`: no window. (Sync chunks keep their own window,
    /// `sync_window` chunks.)
    pub max_inflight_bytes: u64,
    /// Client writes of at least this many bytes travel on the link's bulk
    /// lane, which the main lane may overtake (`0`: one lane). The core does
    /// not choose the lane (the driver routes by `Message::lane`); it needs
    /// the threshold to know which writes a Flush may overtake, and so which
    /// writes a FlushAck does not cover (see `flush_covers`).
    pub bulk_lane_bytes: u64,
}

/// What a node does when it finds itself in split brain with its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSplitBrain {
    /// Both go StandAlone until the operator resolves it (the default).
    #[default]
    Disconnect,
    /// DRBD's discard-zero-changes: if exactly one node changed nothing the
    /// other lacks (an empty dirty bitmap, not a crashed primary), its side
    /// is discarded and it syncs from the other; otherwise StandAlone. Both
    /// nodes should be configured alike.
    DiscardZeroChanges,
}

/// What a node that crashed as Primary does when it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterCrash {
    /// Start as Secondary and wait for an operator (or cluster manager) to
    /// promote a node: the default, as DRBD does.
    #[default]
    Secondary,
    /// Start as Secondary, and become Primary again by itself once the peer
    /// connects, is Secondary and holds no newer data (it never resumes while
    /// the peer is away: it cannot tell whether the peer took over).
    ResumePrimary,
}

/// The driver's token for a client request, echoed in its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// The core's token for a disk operation, echoed in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskOpId(pub u64);

/// The core's token for a metadata write, echoed in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetaWriteId(pub u64);

/// The driver's token for an admin command, echoed in its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdminId(pub u64);

/// A client request that changes data (reads go to the store directly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp<P> {
    /// Write `payload` at `offset`; `fua`: durable before the reply.
    Write { offset: u64, payload: P, fua: bool },
    /// Discard; reads back zeroes.
    Trim { offset: u64, length: u64 },
    /// Write zeroes; `no_hole`: keep the range allocated.
    WriteZeroes {
        offset: u64,
        length: u64,
        no_hole: bool,
    },
    /// Make every completed write durable on both nodes.
    Flush,
}

/// A disk operation for the driver to run on this node's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp<P> {
    /// Write `payload` at `offset`; `fua`: durable before completion.
    Write { offset: u64, payload: P, fua: bool },
    /// Punch a hole that reads back as zeroes.
    Trim { offset: u64, length: u64 },
    /// Write zeroes; `no_hole`: keep the range allocated.
    WriteZeroes {
        offset: u64,
        length: u64,
        no_hole: bool,
    },
    /// fdatasync: every completed write becomes durable.
    Flush,
    /// Read `length` bytes at `offset` (the full-sync source).
    Read { offset: u64, length: u64 },
}

/// How a disk operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskResult<P> {
    /// A write, trim, zeroing or flush completed.
    Done,
    /// A read completed with these bytes.
    Read(P),
    /// The store failed; the message says how.
    Failed(String),
}

/// Why a client request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Only the primary accepts writes.
    #[error("this node is not primary")]
    NotPrimary,
    /// The request lies outside the volume.
    #[error("request outside the volume")]
    OutOfRange,
    /// The local store failed; the node is stopping.
    #[error("local store failed: {0}")]
    Io(String),
    /// The node is stopping and will not carry the request out.
    #[error("node stopping")]
    Stopping,
}

/// Operator commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// Become primary. `force` also makes an Inconsistent or Outdated node
    /// UpToDate (the fresh-pair and last-resort case). `new_generation` is a
    /// random identifier from the driver, used if a new generation begins.
    Promote { force: bool, new_generation: u64 },
    /// Become secondary. Refused while client requests are in flight unless
    /// `force`: then requests not yet started fail, running ones finish, and
    /// the demotion completes when none is left (the driver has already cut
    /// the clients off).
    Demote { force: bool },
    /// Leave StandAlone (after a split brain) and try the peer again.
    Connect,
    /// `Connect`, and if the nodes are found in split brain, throw this
    /// node's changes away: it becomes the sync target of the other, which
    /// copies the union of both dirty bitmaps (or everything, without a
    /// common bitmap generation). Refused on a Primary.
    ConnectDiscardingMyData,
    /// Release writes held by `on-peer-loss = "suspend-io"`.
    ResumeIo,
    /// `pairbd verify`: on a Primary connected to an UpToDate Secondary,
    /// compare both copies block by block (crc32c of 4 KiB); blocks that
    /// differ are marked in the dirty bitmap, and repaired by
    /// `ResyncMarked` or the next reconnect.
    Verify,
    /// `pairbd resync-marked`: on a Primary connected to its Secondary,
    /// resync the regions marked out of sync (by a verify) now.
    ResyncMarked,
    /// `pairbd invalidate`: this Secondary's data stops counting (it becomes
    /// Inconsistent, durably) and the next sync into it covers everything.
    Invalidate,
    /// Clean shutdown: record that this node stopped cleanly.
    Shutdown,
}

/// Why an admin command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AdminError(pub String);

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<P> {
    /// Run this operation on the local store; report with `handle_disk`.
    Disk { id: DiskOpId, op: DiskOp<P> },
    /// Persist this state atomically; report with `handle_meta_done`. The
    /// bitmap pages (those changed since the last write) go to the bitmap
    /// area first, made durable before the state is written: the state's
    /// slot is the commit point (docs/DURABILITY.md). The activity log is
    /// recorded in the same slot.
    WriteMeta {
        id: MetaWriteId,
        state: PersistentState,
        bitmap: Vec<BitmapPage>,
        activity_log: ActivityLogImage,
    },
    /// Send this message to the peer, in order.
    Send(Message<P>),
    /// Answer a client request.
    Reply {
        id: RequestId,
        result: Result<(), ReplyError>,
    },
    /// Drop the link (the driver reconnects with backoff); the core already
    /// treats the peer as lost.
    Disconnect { reason: String },
    /// Answer an admin command.
    AdminDone {
        id: AdminId,
        result: Result<String, AdminError>,
    },
    /// Stop the node: an invariant broke or the local store failed. Nothing
    /// more may be written; the reason names what happened.
    FailStop { reason: String },
}
