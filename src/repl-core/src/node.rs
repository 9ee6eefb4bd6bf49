//! `Node`: one node of a replicated pair for one resource, as a state machine.
//!
//! The rules it keeps (docs/PROTOCOL.md argues them step by step):
//! - A client write is answered only when the local store completed it and the
//!   peer acknowledged that it reached the peer's store — or, with the peer
//!   away, only once "the peer needs a sync" is durable in the metadata.
//! - A client flush is answered only when both stores flushed (same fallback).
//! - Overlapping writes start one after the other in arrival order (see
//!   `ops`), so both stores see them in the same order.
//! - The secondary flushes only after every earlier-numbered write reached its
//!   store, and acknowledges only what its store completed.
//! - A message or reply that depends on metadata leaves only after the driver
//!   reported that metadata durable.
//! - A primary leaves the role (demotion, clean stop) only after both stores
//!   flushed, or after "the peer needs a sync" is durable.
//! - A region a write may be missing on the peer for is marked in the dirty
//!   bitmap (writes without the peer; the transfer log at link loss); a bit is
//!   cleared only after the sync target flushed that region's data.
//! - The in-flight window: client write payload bytes sent to the peer and
//!   not yet acknowledged stay within `max_inflight_bytes` (one larger write
//!   may go alone). A write that does not fit waits unstarted, locally too,
//!   in the operation table (so overlapping writes keep their order), and
//!   every later write waits behind it (so writes reach the peer in arrival
//!   order and a large one is not starved by small ones); acks release them.
//!   Flushes, trims and write-zeroes carry no payload and do not wait for it:
//!   a write still waiting is not completed, so no flush has to cover it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use pairbd_repl_proto::Hello;

use crate::activity_log::{ActivityLog, ActivityLogImage, Admit};
use crate::bitmap::DirtyBitmap;
use crate::generations::{self, GenerationSource, Verdict};
use crate::ops::{OpTable, Range};
use crate::resync_rate::ResyncRate;
use crate::status::{ConnectionState, PeerStatus, Status, SyncStatus, VerifyResult};
use crate::{
    AdminCommand, AdminError, AdminId, AfterCrash, AfterSplitBrain, ClientOp, Config, DirtyRanges,
    DiskOp, DiskOpId, DiskResult, DiskState, Lane, Message, MetaWriteId, NodeState, OnPeerLoss,
    Output, Payload, PersistentState, ReplyError, RequestId, Role,
};
use pairbd_repl_proto::{VerifyReply, DIRTY_RANGES_MAX, VERIFY_BLOCK_BYTES, VERIFY_MAX_BYTES};

/// Differing ranges a verify remembers for status (the count is exact).
const VERIFY_RANGES_MAX: usize = 64;

/// Writes the transfer log remembers one by one; beyond it, their regions go
/// to a spill bitmap (bounded by the volume) until a peer flush covers them.
const TRANSFER_LOG_MAX: usize = 1 << 16;

/// Sync chunks acknowledged but not yet flushed by the target, in bytes,
/// after which the source asks the target to flush (so that their bits can
/// be cleared and an interrupted resync resumes after them).
const SYNC_FLUSH_CHUNKS: u64 = 8;

/// A deliberately broken variant of the core (feature `mutations`, never in a
/// real build): the simulator switches one on to prove its checkers catch it.
#[cfg(feature = "mutations")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Answer a client write once the local store has it, before the peer's ack.
    ReplyBeforePeerAck,
    /// Answer a client flush after the local flush alone; the peer never flushes.
    FlushNotForwarded,
    /// Forget the transfer log on link loss: no "peer needs a sync" for it.
    TransferLogIgnored,
    /// Let an Outdated node promote without --force.
    PromoteOutdated,
    /// Clear a dirty bit as soon as the target acknowledged the sync chunk,
    /// before the target flushed it.
    BitClearedBeforeTargetFlush,
    /// Submit a write to a cold extent once its activity-log entry is
    /// requested, before the metadata write carrying it completed.
    WriteBeforeAlEntryDurable,
    /// Online verify reads a chunk without taking its extent lock: writes
    /// in flight can be reported as differences.
    VerifyIgnoresExtentLock,
    /// Online verify reports differing blocks but marks none out of sync:
    /// resync-marked repairs nothing.
    VerifyMarksNothing,
    /// The primary reads a batch of acks as cumulative: every write up to
    /// the batch's highest sequence number counts as acknowledged, although
    /// writes complete out of order on the secondary.
    AcksCumulative,
    /// The write-merging planner (`merge`) also merges a plain write that
    /// starts after a gap, laying it back to back with the one before it:
    /// its bytes land at the wrong offset, and the block it was meant for
    /// keeps its old contents.
    MergeAcrossGap,
    /// The in-flight window keeps the bytes of writes whose acks a lost link
    /// took with it: after enough link losses nothing fits any more.
    WindowKeptAfterLinkLoss,
    /// Writes that waited for the window when the link went are answered
    /// as if the peer had them, neither replicated nor marked out of sync.
    WindowReleasedUnmarked,
    /// A FlushAck is taken to cover every write numbered below the Flush,
    /// including writes on the bulk lane that the Flush overtook: they leave
    /// the transfer log before the peer holds them durably.
    FlushCoversOvertaken,
}

/// The request id of the flush a primary runs on both nodes before it
/// leaves the role (see `check_demote`); its reply goes to no client.
const LEAVING_FLUSH: RequestId = RequestId(u64::MAX);

/// The request id of the flush a primary runs on both nodes when its
/// activity log is full of idle extents that no flush covered yet (see
/// `al_make_room`); its reply goes to no client.
const AL_FLUSH: RequestId = RequestId(u64::MAX - 1);

/// The request id of the flush a sync source runs before it reads its first
/// chunk (see `maybe_start_sync`); its reply goes to no client.
const SYNC_SOURCE_FLUSH: RequestId = RequestId(u64::MAX - 2);

/// Whether a request still needs the peer's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerAck {
    /// Sent; the acknowledgement is outstanding.
    Waiting,
    /// Acknowledged by the peer.
    Done,
    /// Not replicated (peer away): covered by "peer needs a sync" instead.
    NotNeeded,
}

enum Op<P> {
    /// A client write, trim or write-zeroes on the primary.
    ClientWrite {
        req: RequestId,
        op: ClientOp<P>,
        local_done: bool,
        peer: PeerAck,
    },
    /// A client flush on the primary.
    ClientFlush {
        req: RequestId,
        local_done: bool,
        peer: PeerAck,
    },
    /// A write, trim, zeroing or sync chunk from the primary, on the secondary.
    PeerWrite {
        seq: u64,
        epoch: u64,
        op: DiskOp<P>,
        sync_bytes: u64,
    },
    /// A flush (or the final flush of a sync) requested by the primary.
    PeerFlush {
        seq: u64,
        epoch: u64,
        sync_done: bool,
    },
    /// An online-verify chunk on the primary: read and checksummed, then
    /// compared with the secondary's checksums (`crcs` once read).
    VerifyChunk {
        offset: u64,
        length: u64,
        epoch: u64,
        crcs: Option<Vec<u32>>,
    },
    /// The secondary's read for a VerifyRequest.
    PeerVerify { seq: u64, epoch: u64 },
    /// A sync chunk on the primary: read, then sent, then acknowledged. It
    /// covers `bits` bits of the dirty bitmap from `bit`.
    SyncChunk {
        offset: u64,
        length: u64,
        bit: u64,
        bits: u64,
        epoch: u64,
        sent: bool,
    },
}

/// The crc32c of each `VERIFY_BLOCK_BYTES` block of `bytes`.
fn block_crcs(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(VERIFY_BLOCK_BYTES as usize)
        .map(crc32c::crc32c)
        .collect()
}

impl<P> Op<P> {
    fn is_client(&self) -> bool {
        matches!(self, Op::ClientWrite { .. } | Op::ClientFlush { .. })
    }
}

/// What the primary waits for from the peer, by sequence number.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Op(u64),
    SyncDone,
    /// A flush the sync source asked for, to clear the bits of the chunks
    /// acknowledged before it.
    SyncFlush,
    /// The checksums of a verify chunk (its operation id).
    Verify(u64),
}

/// Work deferred until a metadata version is durable.
enum Deferred {
    Admin(AdminId, String),
    SendState,
    SyncReady,
    SyncDoneAck(u64),
    StartSync,
}

#[derive(Debug, Clone)]
struct PeerInfo {
    name: String,
    state: NodeState,
    peer_sync_needed: bool,
    unclean_primary: bool,
    /// The generations said the peer's data is older than this node's.
    behind: bool,
    /// The peer's dirty bitmap as its DirtyRanges messages carried it (none
    /// if empty so far).
    dirty: Option<Box<DirtyBitmap>>,
    /// The peer's last DirtyRanges batch arrived.
    dirty_done: bool,
}

/// A promotion waiting for a peer that looks connected and Primary to
/// answer a probe.
struct Probe {
    admin: AdminId,
    force: bool,
    new_generation: u64,
    seq: u64,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncPhase {
    WaitingReady,
    Sending,
    DoneSent,
}

struct SyncSource {
    epoch: u64,
    phase: SyncPhase,
    /// The next bitmap bit to look at.
    next_bit: u64,
    done_bytes: u64,
    total_bytes: u64,
    full: bool,
    in_flight: usize,
    started: Instant,
    /// Chunks the target acknowledged, not yet covered by a target flush:
    /// (SyncData seq, first bit, bits).
    unflushed: Vec<(u64, u64, u64)>,
    /// A SyncFlush is outstanding.
    flush_pending: bool,
    /// With a rate limit: no chunk starts before this.
    next_chunk_at: Instant,
    /// This node's store was flushed after the sync began (chunks are read
    /// only then).
    store_flushed: bool,
}

struct VerifySource {
    epoch: u64,
    next_offset: u64,
    done_bytes: u64,
    in_flight: usize,
    started: Instant,
    next_chunk_at: Instant,
    result: VerifyResult,
}

struct SyncTarget {
    done_bytes: u64,
    total_bytes: u64,
    started: Instant,
}

/// One node of a pair, for one resource. See the crate documentation.
pub struct Node<P> {
    cfg: Config,
    /// The state as it should be: what status shows, what the next metadata
    /// write carries.
    wanted: PersistentState,
    /// The state as the metadata holds it.
    persisted: PersistentState,
    meta_version: u64,
    durable_version: u64,
    meta_in_flight: Option<(MetaWriteId, PersistentState)>,
    deferred: Vec<(u64, Deferred)>,

    conn: ConnectionState,
    epoch: u64,
    peer: Option<PeerInfo>,
    handshake_deadline: Option<Instant>,
    peer_lost_while_up: bool,
    unclean_primary: bool,
    last_disconnect: Option<String>,

    next_seq: u64,
    last_write_seq_sent: u64,
    peer_flushed_below: u64,
    peer_pending: BTreeMap<u64, (Pending, Instant)>,

    ops: OpTable<Op<P>>,
    sec_last_seq: u64,
    /// The last sequence number received on the bulk lane (writes only).
    sec_last_bulk_seq: u64,
    sec_incomplete: BTreeSet<u64>,
    sec_flushes: VecDeque<(u64, bool)>,

    sync: Option<SyncSource>,
    sync_target: Option<SyncTarget>,
    verify: Option<VerifySource>,
    last_verify: Option<VerifyResult>,
    /// Regions the peer may lack (see `bitmap`).
    bitmap: DirtyBitmap,
    /// Writes sent to the peer since its last completed flush: (seq, range).
    transfer_log: VecDeque<(u64, Range)>,
    /// Transfer-log regions beyond `TRANSFER_LOG_MAX`, and the highest
    /// sequence among them.
    transfer_spill: Option<(Box<DirtyBitmap>, u64)>,
    marked_bytes: u64,
    resynced_bytes: u64,
    /// The hot extents (see `activity_log`).
    al: ActivityLog,
    /// Flushes running, by operation id, with their activity-log tokens.
    al_flush_tokens: BTreeMap<u64, u64>,
    /// An `AL_FLUSH` is running.
    al_flush_running: bool,
    /// A crash as Primary is covered by the activity log it recorded: the
    /// bitmap holds its extents, and is trusted.
    al_covers_crash: bool,
    /// The running `SYNC_SOURCE_FLUSH`: its operation id and the sync's epoch.
    sync_source_flush: Option<(u64, u64)>,
    /// A verify marked differing blocks: they wait for `resync-marked` (or
    /// the next connection) instead of resyncing by themselves.
    marked_held: bool,
    /// The sync rate, yielding to client I/O.
    resync_rate: ResyncRate,
    /// The in-flight window: payload bytes of each client write sent to the
    /// peer and not yet acknowledged, by sequence number, and their sum.
    window_sent: BTreeMap<u64, u64>,
    /// Flushes sent while a bulk-lane write numbered below them was still
    /// unacknowledged: flush seq → the lowest such write. Their FlushAck
    /// covers only the writes below that (the Flush overtook the rest).
    flush_covers: BTreeMap<u64, u64>,
    window_bytes: u64,
    /// Client writes waiting for room in the window, by operation id (an id
    /// whose operation has gone or started is stale and skipped).
    window_waiting: BTreeSet<u64>,
    /// Times a client write began to wait for the window since the node
    /// started.
    window_waited: u64,
    /// Links lost (after a handshake began) since the node started.
    link_losses: u64,
    /// `connect --discard-my-data`: a split brain makes this node the sync
    /// target (until a sync into it finishes).
    discard_my_data: bool,
    io_suspended: bool,
    failed: Option<String>,
    probe: Option<Probe>,
    next_ping: u64,
    demoting: Option<AdminId>,
    /// The metadata version that records the last promotion: the node serves
    /// only once it is durable (an unclean primary's metadata already says
    /// Primary before its promotion is written).
    promotion_version: u64,
    /// A demotion ran its flush of both stores (see `check_demote`).
    leaving_flushed: bool,
    gen_source: GenerationSource,
    now: Instant,
    out: VecDeque<Output<P>>,
    #[cfg(feature = "mutations")]
    mutation: Option<Mutation>,
    /// `WindowReleasedUnmarked`: the writes waiting for the window at the
    /// last link loss.
    #[cfg(feature = "mutations")]
    window_unmarked: BTreeSet<u64>,
}

impl<P: Payload> Node<P> {
    /// A node starting from the state its metadata holds. A node whose
    /// metadata says Primary stopped uncleanly; it comes back Secondary.
    pub fn new(cfg: Config, persisted: PersistentState, now: Instant) -> Node<P> {
        let unclean_primary = persisted.role == Role::Primary;
        let cfg_seed = cfg.generation_seed;
        let al = ActivityLog::new(cfg.al_extent_bytes, cfg.al_extents);
        let resync_rate =
            ResyncRate::new(cfg.sync_rate_bytes_per_sec, cfg.sync_rate_min_bytes_per_sec);
        let mut wanted = persisted;
        wanted.role = Role::Secondary;
        let mut bitmap = DirtyBitmap::new(cfg.size_bytes, cfg.bitmap_granularity_bytes);
        // Until `restore_bitmap` says otherwise: a sync owed with no bitmap
        // known covers everything, and so does a crash as Primary (writes may
        // have been in flight or unrecorded anywhere; an activity log would
        // narrow this).
        if persisted.peer_sync_needed || unclean_primary {
            bitmap.set_all();
        }
        Node {
            cfg,
            wanted,
            persisted,
            meta_version: 0,
            durable_version: 0,
            meta_in_flight: None,
            deferred: Vec::new(),
            conn: ConnectionState::Disconnected,
            epoch: 0,
            peer: None,
            handshake_deadline: None,
            peer_lost_while_up: false,
            unclean_primary,
            last_disconnect: None,
            next_seq: 1,
            last_write_seq_sent: 0,
            peer_flushed_below: 0,
            peer_pending: BTreeMap::new(),
            ops: OpTable::new(),
            sec_last_seq: 0,
            sec_last_bulk_seq: 0,
            sec_incomplete: BTreeSet::new(),
            sec_flushes: VecDeque::new(),
            sync: None,
            sync_target: None,
            verify: None,
            last_verify: None,
            bitmap,
            transfer_log: VecDeque::new(),
            transfer_spill: None,
            marked_bytes: 0,
            resynced_bytes: 0,
            al,
            al_flush_tokens: BTreeMap::new(),
            al_flush_running: false,
            al_covers_crash: false,
            sync_source_flush: None,
            marked_held: false,
            resync_rate,
            window_sent: BTreeMap::new(),
            flush_covers: BTreeMap::new(),
            window_bytes: 0,
            window_waiting: BTreeSet::new(),
            window_waited: 0,
            link_losses: 0,
            discard_my_data: false,
            io_suspended: false,
            failed: None,
            probe: None,
            next_ping: 1,
            demoting: None,
            promotion_version: 0,
            leaving_flushed: false,
            gen_source: GenerationSource::new(cfg_seed),
            now,
            out: VecDeque::new(),
            #[cfg(feature = "mutations")]
            mutation: None,
            #[cfg(feature = "mutations")]
            window_unmarked: BTreeSet::new(),
        }
    }

    /// Loads the dirty bitmap the metadata area holds, written at
    /// `recorded_granularity` bytes per bit (0: none recorded). Called once,
    /// right after `new`. A node that stopped as Primary uncleanly keeps every
    /// bit set (see `new`); a bitmap of another granularity (or none, with a
    /// sync owed or bits set) counts as all dirty: a mixed image cannot be
    /// trusted, and all-set is right under any reading.
    pub fn restore_bitmap(&mut self, recorded_granularity: u64, image: &[u8]) {
        self.restore_metadata(recorded_granularity, image, &ActivityLogImage::default());
    }

    /// `restore_bitmap`, with the activity log the metadata recorded. A
    /// node that stopped as Primary uncleanly with a log recorded (and a
    /// bitmap of this granularity) trusts its bitmap plus the log's extents:
    /// only those may differ from the peer (docs/DURABILITY.md). Without a
    /// log (older metadata, or the whole-volume entry) it keeps every bit set.
    pub fn restore_metadata(
        &mut self,
        recorded_granularity: u64,
        image: &[u8],
        al: &ActivityLogImage,
    ) {
        if self.unclean_primary {
            let ranges = al.ranges(self.cfg.size_bytes);
            if let (Some(ranges), true) =
                (ranges, recorded_granularity == self.bitmap.granularity())
            {
                self.bitmap.load(image);
                for (offset, length) in ranges {
                    self.mark(offset, length);
                }
                self.al_covers_crash = true;
            }
            return;
        }
        if recorded_granularity == self.bitmap.granularity() {
            self.bitmap.load(image);
        } else if self.persisted.peer_sync_needed || image.iter().any(|&b| b != 0) {
            self.bitmap.set_all();
        } else {
            self.bitmap.clear_all();
            self.bitmap.take_unsaved_pages();
        }
    }

    /// The dirty bitmap (tests and the simulator look at it).
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// The activity log (tests and the simulator look at it).
    pub fn activity_log(&self) -> &ActivityLog {
        &self.al
    }

    /// Crashed as Primary with nothing recording where writes were in
    /// flight: every bit is set, and the peer must not trust the bitmap.
    fn crash_uncovered(&self) -> bool {
        self.unclean_primary && !self.al_covers_crash
    }

    /// Marks `[offset, offset + length)` out of sync.
    fn mark(&mut self, offset: u64, length: u64) {
        self.marked_bytes += self.bitmap.mark(offset, length);
    }

    /// Switches a deliberately broken variant on (or off): the simulator's
    /// proof that its checkers can fail.
    #[cfg(feature = "mutations")]
    pub fn set_mutation(&mut self, mutation: Option<Mutation>) {
        self.mutation = mutation;
    }

    #[cfg(feature = "mutations")]
    fn mutated(&self, m: Mutation) -> bool {
        self.mutation == Some(m)
    }

    // ----- outputs -------------------------------------------------------

    /// The next thing the driver must do.
    pub fn poll(&mut self) -> Option<Output<P>> {
        self.out.pop_front()
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.failed.is_some() {
            return None;
        }
        let ack = self
            .peer_pending
            .values()
            .map(|(_, sent)| *sent)
            .min()
            .map(|sent| sent + self.cfg.ack_timeout);
        // The sync-ready answer is awaited under the ack timeout too.
        let ready = self
            .sync
            .as_ref()
            .filter(|s| s.phase == SyncPhase::WaitingReady)
            .map(|s| s.started + self.cfg.ack_timeout);
        let probe = self.probe.as_ref().map(|p| p.deadline);
        // A rate-limited sync waits for its next chunk's turn.
        let paced = self
            .sync
            .as_ref()
            .filter(|s| s.phase == SyncPhase::Sending && s.next_chunk_at > self.now)
            .map(|s| s.next_chunk_at);
        // A paced chunk whose turn came while another input moved the clock
        // on (pump_sync runs only from a timeout, an ack or SyncReady): due
        // now, so that the driver calls handle_timeout. (Found by the
        // simulator.)
        let paced = paced.or_else(|| {
            self.sync
                .as_ref()
                .filter(|s| {
                    s.phase == SyncPhase::Sending
                        && s.store_flushed
                        && self.resync_rate.paced()
                        && s.in_flight < self.cfg.sync_window.max(1)
                        && self.bitmap.next_run(s.next_bit, 1).is_some()
                })
                .map(|s| s.next_chunk_at)
        });
        let verify_paced = self
            .verify
            .as_ref()
            .filter(|v| v.next_chunk_at > self.now && v.next_offset < self.cfg.size_bytes)
            .map(|v| v.next_chunk_at);
        [
            ack,
            self.handshake_deadline,
            ready,
            probe,
            paced,
            verify_paced,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether this node serves clients now (Primary, durably).
    pub fn serves_clients(&self) -> bool {
        self.failed.is_none()
            && self.demoting.is_none()
            && self.wanted.role == Role::Primary
            && self.persisted.role == Role::Primary
            && self.durable_version >= self.promotion_version
    }

    /// Whether the node refuses to link with its peer until `Connect`.
    pub fn is_standalone(&self) -> bool {
        self.conn == ConnectionState::StandAlone
    }

    fn my_state(&self) -> NodeState {
        NodeState {
            role: self.wanted.role,
            disk: self.wanted.disk,
            generations: self.wanted.generations(),
        }
    }

    /// The role as status reports it.
    pub fn role(&self) -> Role {
        self.wanted.role
    }

    /// The disk state as status reports it.
    pub fn disk(&self) -> DiskState {
        self.wanted.disk
    }

    /// The state the metadata holds.
    pub fn persisted(&self) -> PersistentState {
        self.persisted
    }

    /// Why the node failed, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Everything status shows.
    pub fn status(&self, now: Instant) -> Status {
        let sync = if let Some(s) = &self.sync {
            Some(SyncStatus {
                source: true,
                full: s.full,
                done_bytes: s.done_bytes,
                total_bytes: s.total_bytes,
                elapsed_secs: now.saturating_duration_since(s.started).as_secs_f64(),
            })
        } else {
            self.sync_target.as_ref().map(|t| SyncStatus {
                source: false,
                full: false,
                done_bytes: t.done_bytes,
                total_bytes: t.total_bytes,
                elapsed_secs: now.saturating_duration_since(t.started).as_secs_f64(),
            })
        };
        Status {
            resource: self.cfg.resource.clone(),
            node_name: self.cfg.node_name.clone(),
            role: self.wanted.role,
            disk: self.wanted.disk,
            connection: self.conn,
            peer: self.peer.as_ref().map(|p| PeerStatus {
                node_name: p.name.clone(),
                role: p.state.role,
                disk: p.state.disk,
                generations: p.state.generations,
            }),
            sync,
            peer_sync_needed: self.wanted.peer_sync_needed,
            io_suspended: self.io_suspended,
            on_peer_loss: self.cfg.on_peer_loss,
            requests_in_flight: self.ops.iter().filter(|(_, op)| op.is_client()).count(),
            last_disconnect: self.last_disconnect.clone(),
            failed: self.failed.clone(),
            generations: self.wanted.generations(),
            demoting: self.demoting.is_some(),
            verify: self.verify.as_ref().map(|v| SyncStatus {
                source: true,
                full: true,
                done_bytes: v.done_bytes,
                total_bytes: self.cfg.size_bytes,
                elapsed_secs: now.saturating_duration_since(v.started).as_secs_f64(),
            }),
            last_verify: self.last_verify.clone(),
            out_of_sync_bytes: self.bitmap.dirty_bytes(),
            marked_bytes: self.marked_bytes,
            resynced_bytes: self.resynced_bytes,
            bitmap_granularity_bytes: self.bitmap.granularity(),
            inflight_bytes: self.window_bytes,
            max_inflight_bytes: self.cfg.max_inflight_bytes,
            window_waiting: self
                .window_waiting
                .iter()
                .filter(|&&w| self.window_waiter_live(w))
                .count(),
            window_waited: self.window_waited,
            link_losses: self.link_losses,
        }
    }

    // ----- client requests -----------------------------------------------

    /// A client request that changes data. Reads bypass the core.
    pub fn handle_client(&mut self, now: Instant, req: RequestId, op: ClientOp<P>) {
        self.now = now;
        self.resync_rate.note_app_io(now);
        if self.failed.is_some() {
            self.reply(req, Err(ReplyError::Stopping));
            return;
        }
        if !self.serves_clients() {
            self.reply(req, Err(ReplyError::NotPrimary));
            return;
        }
        let range = match &op {
            ClientOp::Write {
                offset, payload, ..
            } => Some(Range::new(*offset, payload.len() as u64)),
            ClientOp::Trim { offset, length } | ClientOp::WriteZeroes { offset, length, .. } => {
                Some(Range::new(*offset, *length))
            }
            ClientOp::Flush => None,
        };
        if let Some(r) = range {
            let fits = r.start <= self.cfg.size_bytes
                && r.start.checked_add(r.end - r.start).is_some()
                && r.end <= self.cfg.size_bytes;
            if !fits {
                self.reply(req, Err(ReplyError::OutOfRange));
                return;
            }
        }
        let data = match op {
            ClientOp::Flush => Op::ClientFlush {
                req,
                local_done: false,
                peer: PeerAck::NotNeeded,
            },
            op => Op::ClientWrite {
                req,
                op,
                local_done: false,
                peer: PeerAck::NotNeeded,
            },
        };
        let id = self.ops.insert(range, data);
        if self.ops.may_start(id) && !self.client_io_held() {
            self.start_op(id);
        }
    }

    /// Client writes and flushes wait while the link is handshaking (they will
    /// be replicated once it is up, or not at all if it fails) and while
    /// `suspend-io` holds them.
    fn client_io_held(&self) -> bool {
        self.conn == ConnectionState::Handshaking || self.io_suspended
    }

    fn peer_replicates(&self) -> bool {
        self.conn == ConnectionState::Connected
            && self
                .peer
                .as_ref()
                .is_some_and(|p| p.state.role == Role::Secondary)
    }

    fn alloc_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn start_op(&mut self, id: u64) {
        if !self.window_admits(id) || !self.admit_write(id) {
            return;
        }
        self.ops.activate(id);
        let range_of = self.ops.range(id);
        let replicate = self.peer_replicates();
        #[cfg(feature = "mutations")]
        let replicate_flush = replicate && !self.mutated(Mutation::FlushNotForwarded);
        #[cfg(not(feature = "mutations"))]
        let replicate_flush = replicate;
        let now = self.now;
        let mut note_missing = false;
        let mut written: Option<Range> = None;
        let mut send: Option<Message<P>> = None;
        let mut disk: Option<DiskOp<P>> = None;
        let mut seq_used = None;
        let next_seq = self.next_seq;
        #[cfg(feature = "mutations")]
        let unmarked = self.window_unmarked.remove(&id);
        #[cfg(not(feature = "mutations"))]
        let unmarked = false;
        match self.ops.get_mut(id) {
            Some(Op::ClientWrite { op, peer, .. }) => {
                let (d, m) = match op.clone() {
                    ClientOp::Write {
                        offset,
                        payload,
                        fua,
                    } => (
                        DiskOp::Write {
                            offset,
                            payload: payload.clone(),
                            fua,
                        },
                        Message::Write {
                            seq: next_seq,
                            offset,
                            payload,
                            fua,
                        },
                    ),
                    ClientOp::Trim { offset, length } => (
                        DiskOp::Trim { offset, length },
                        Message::Trim {
                            seq: next_seq,
                            offset,
                            length,
                        },
                    ),
                    ClientOp::WriteZeroes {
                        offset,
                        length,
                        no_hole,
                    } => (
                        DiskOp::WriteZeroes {
                            offset,
                            length,
                            no_hole,
                        },
                        Message::WriteZeroes {
                            seq: next_seq,
                            offset,
                            length,
                            no_hole,
                        },
                    ),
                    ClientOp::Flush => unreachable_flush(),
                };
                written = Some(match &d {
                    DiskOp::Write {
                        offset, payload, ..
                    } => Range::new(*offset, payload.len() as u64),
                    DiskOp::Trim { offset, length }
                    | DiskOp::WriteZeroes { offset, length, .. } => Range::new(*offset, *length),
                    DiskOp::Flush | DiskOp::Read { .. } => Range::new(0, 0),
                });
                disk = Some(d);
                if replicate {
                    *peer = PeerAck::Waiting;
                    send = Some(m);
                    seq_used = Some(next_seq);
                } else if unmarked {
                    *peer = PeerAck::Done;
                } else {
                    *peer = PeerAck::NotNeeded;
                    note_missing = true;
                }
            }
            Some(Op::ClientFlush { peer, .. }) => {
                self.al_flush_tokens.insert(id, self.al.flush_started());
                disk = Some(DiskOp::Flush);
                if replicate_flush {
                    *peer = PeerAck::Waiting;
                    send = Some(Message::Flush { seq: next_seq });
                    seq_used = Some(next_seq);
                } else {
                    *peer = PeerAck::NotNeeded;
                }
            }
            Some(Op::PeerWrite { op, .. }) => disk = Some(op.clone()),
            Some(Op::PeerFlush { .. }) => disk = Some(DiskOp::Flush),
            Some(Op::SyncChunk { offset, length, .. })
            | Some(Op::VerifyChunk { offset, length, .. }) => {
                disk = Some(DiskOp::Read {
                    offset: *offset,
                    length: *length,
                })
            }
            Some(Op::PeerVerify { .. }) => {
                if let Some(r) = range_of {
                    disk = Some(DiskOp::Read {
                        offset: r.start,
                        length: r.end - r.start,
                    })
                }
            }
            None => {}
        }
        if let Some(seq) = seq_used {
            self.next_seq += 1;
            if let Some(Message::Write { payload, .. }) = &send {
                let bytes = payload.len() as u64;
                self.window_sent.insert(seq, bytes);
                self.window_bytes += bytes;
            }
            if matches!(send, Some(Message::Flush { .. })) {
                self.note_flush_covers(seq);
            } else {
                self.last_write_seq_sent = seq;
                if let Some(r) = written {
                    self.log_transfer(seq, r);
                }
            }
            self.peer_pending.insert(seq, (Pending::Op(id), now));
        }
        if let Some(d) = disk {
            self.out.push_back(Output::Disk {
                id: DiskOpId(id),
                op: d,
            });
        }
        if let Some(m) = send {
            self.out.push_back(Output::Send(m));
        }
        if note_missing {
            if let Some(r) = written {
                self.mark(r.start, r.end - r.start);
            }
            self.note_unreplicated_write();
        }
    }

    /// Whether waiting operation `w` is still a write waiting for the window.
    fn window_waiter_live(&self, w: u64) -> bool {
        self.ops.get(w).is_some() && !self.ops.is_active(w)
    }

    /// The in-flight window's gate of a client write with a payload (a no-op
    /// for other operations, and while the peer does not replicate: then
    /// nothing is sent). Operation `id` may start if no earlier write waits
    /// for the window and its bytes fit, or nothing is in flight (a write
    /// larger than the window goes alone). Otherwise it waits, and
    /// `start_ready` tries it again after the next ack.
    fn window_admits(&mut self, id: u64) -> bool {
        let bytes = match self.ops.get(id) {
            Some(Op::ClientWrite {
                op: ClientOp::Write { payload, .. },
                ..
            }) => payload.len() as u64,
            _ => return true,
        };
        if bytes == 0 || !self.peer_replicates() {
            self.window_waiting.remove(&id);
            return true;
        }
        // Only the oldest live waiter matters: drop stale ones before it.
        let earlier_waits = loop {
            match self.window_waiting.first().copied() {
                Some(w) if w < id && !self.window_waiter_live(w) => {
                    self.window_waiting.remove(&w);
                }
                Some(w) => break w < id,
                None => break false,
            }
        };
        let fits = self.window_bytes == 0
            || self.window_bytes.saturating_add(bytes) <= self.cfg.max_inflight_bytes;
        if earlier_waits || !fits {
            if self.window_waiting.insert(id) {
                self.window_waited += 1;
            }
            return false;
        }
        self.window_waiting.remove(&id);
        true
    }

    /// The activity-log gate of a client write (a no-op for other
    /// operations): it starts only once every extent it touches is durably
    /// in the log. Returns whether operation `id` may start now; if not, the
    /// metadata write it waits for is requested (or room is being made), and
    /// `start_ready` tries it again when that completes.
    fn admit_write(&mut self, id: u64) -> bool {
        if !matches!(self.ops.get(id), Some(Op::ClientWrite { .. })) {
            return true;
        }
        let Some(r) = self.ops.range(id) else {
            return true;
        };
        #[cfg(feature = "mutations")]
        let unchecked = self.mutated(Mutation::WriteBeforeAlEntryDurable);
        #[cfg(not(feature = "mutations"))]
        let unchecked = false;
        let (offset, length) = (r.start, r.end - r.start);
        match self
            .al
            .admit(offset, length, self.durable_version, unchecked)
        {
            Admit::Ready => true,
            Admit::Waiting { new_entries } => {
                if new_entries {
                    // Batching: a metadata write not yet emitted (one is in
                    // flight and another already requested) carries the new
                    // entries too.
                    let v = match self.meta_in_flight {
                        Some((running, _)) if self.meta_version > running.0 => self.meta_version,
                        _ => self.request_meta(),
                    };
                    self.al.requested(v);
                    if unchecked {
                        return self.al.admit(offset, length, self.durable_version, true)
                            == Admit::Ready;
                    }
                }
                false
            }
            Admit::Full => {
                self.al_make_room();
                false
            }
        }
    }

    /// The activity log is full: if idle extents wait only for a flush of
    /// both stores to become evictable, runs one (answered to no client).
    fn al_make_room(&mut self) {
        if self.al_flush_running || !self.al.flush_would_help() {
            return;
        }
        self.al_flush_running = true;
        let data = Op::ClientFlush {
            req: AL_FLUSH,
            local_done: false,
            peer: PeerAck::NotNeeded,
        };
        let op = self.ops.insert(None, data);
        self.start_op(op);
    }

    /// A client write or flush finished (answered): the activity log hears
    /// of it.
    fn al_op_finished(&mut self, id: u64, req: RequestId) {
        if req == SYNC_SOURCE_FLUSH && self.sync_source_flush.is_some_and(|(op, _)| op == id) {
            let epoch = self.sync_source_flush.take().map(|(_, e)| e);
            if let Some(s) = self.sync.as_mut().filter(|s| Some(s.epoch) == epoch) {
                s.store_flushed = true;
            }
            self.pump_sync();
        }
        if let Some(token) = self.al_flush_tokens.remove(&id) {
            if req == AL_FLUSH {
                self.al_flush_running = false;
            }
            // A whole-volume entry that goes is recorded by the next
            // metadata write there is (none is needed for it alone).
            self.al.flushed(token, self.durable_version);
        } else if let Some(r) = self.ops.range(id) {
            self.al.complete(r.start, r.end - r.start);
        }
    }

    /// Remembers a write sent to the peer until a peer flush covers it.
    fn log_transfer(&mut self, seq: u64, r: Range) {
        if self.transfer_log.len() < TRANSFER_LOG_MAX {
            self.transfer_log.push_back((seq, r));
            return;
        }
        let (size, granularity) = (self.cfg.size_bytes, self.bitmap.granularity());
        let spill = self
            .transfer_spill
            .get_or_insert_with(|| (Box::new(DirtyBitmap::new(size, granularity)), 0));
        spill.0.mark(r.start, r.end - r.start);
        spill.1 = seq;
    }

    /// Flush `seq` leaves for the peer now. A write on the bulk lane that is
    /// numbered below it and not acknowledged yet may arrive at the peer
    /// after it (the main lane overtakes the bulk lane), so the peer's flush
    /// need not cover it: the FlushAck will cover only the writes below the
    /// lowest such write. (A write not acknowledged is not completed, so no
    /// client FLUSH owes it durability; only the transfer log cares.)
    fn note_flush_covers(&mut self, seq: u64) {
        let bulk = self.cfg.bulk_lane_bytes;
        if bulk == 0 {
            return;
        }
        #[cfg(feature = "mutations")]
        if self.mutated(Mutation::FlushCoversOvertaken) {
            return;
        }
        let overtaken = self
            .window_sent
            .range(..seq)
            .find(|(_, bytes)| **bytes >= bulk)
            .map(|(s, _)| *s);
        if let Some(lowest) = overtaken {
            self.flush_covers.insert(seq, lowest);
        }
    }

    /// FlushAck `seq` arrived: the sync chunks below it are durable on the
    /// peer (they travel on the main lane, in order), and so is every write
    /// below `seq` that the Flush did not overtake.
    fn peer_flushed(&mut self, seq: u64) {
        let covered = self.flush_covers.remove(&seq).unwrap_or(seq);
        self.peer_flushed_below = self.peer_flushed_below.max(covered);
        self.trim_transfer_log(covered);
        self.sync_flushed(seq);
    }

    /// A peer flush completed: writes numbered below `seq` are durable there.
    fn trim_transfer_log(&mut self, seq: u64) {
        while self.transfer_log.front().is_some_and(|(s, _)| *s < seq) {
            self.transfer_log.pop_front();
        }
        if self
            .transfer_spill
            .as_ref()
            .is_some_and(|(_, max)| *max < seq)
        {
            self.transfer_spill = None;
        }
    }

    /// The link is gone: every write the peer has not flushed may be missing
    /// there (a power cut loses its cache): its region is marked.
    fn mark_transfer_log(&mut self) {
        let log = std::mem::take(&mut self.transfer_log);
        for (_, r) in log {
            self.mark(r.start, r.end - r.start);
        }
        if let Some((spill, _)) = self.transfer_spill.take() {
            let before = self.bitmap.dirty_bytes();
            self.bitmap.union(&spill);
            self.marked_bytes += self.bitmap.dirty_bytes() - before;
        }
    }

    /// Starts every waiting operation that the overlap rule and the holds allow.
    fn start_ready(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let held = self.client_io_held();
        for id in self.ops.startable() {
            let is_client = self.ops.get(id).is_some_and(|op| op.is_client());
            if is_client && held {
                continue;
            }
            self.start_op(id);
        }
    }

    /// Replies that were not confirmed by the peer may leave only once "the
    /// peer needs a sync" is durable and no suspend holds them.
    fn unconfirmed_reply_allowed(&self) -> bool {
        (!self.wanted.peer_sync_needed || self.persisted.peer_sync_needed) && !self.io_suspended
    }

    fn try_finish(&mut self, id: u64) {
        let allowed = self.unconfirmed_reply_allowed();
        #[cfg(feature = "mutations")]
        let early = self.mutated(Mutation::ReplyBeforePeerAck)
            && matches!(self.ops.get(id), Some(Op::ClientWrite { .. }));
        #[cfg(not(feature = "mutations"))]
        let early = false;
        let done = match self.ops.get(id) {
            Some(Op::ClientWrite {
                req,
                local_done,
                peer,
                ..
            })
            | Some(Op::ClientFlush {
                req,
                local_done,
                peer,
            }) => {
                // The flush of a demotion answers no client: suspend-io does
                // not hold it (it would wait forever for a peer that may never
                // return, and block the demotion), only the durable mark
                // does. (Found by the simulator.)
                let leaving_allowed = *req == LEAVING_FLUSH
                    && (!self.wanted.peer_sync_needed || self.persisted.peer_sync_needed);
                let confirmed = match peer {
                    PeerAck::Done => true,
                    PeerAck::NotNeeded => allowed || leaving_allowed,
                    PeerAck::Waiting => early,
                };
                (*local_done && confirmed).then_some(*req)
            }
            _ => None,
        };
        if let Some(req) = done {
            self.al_op_finished(id, req);
            self.ops.remove(id);
            self.reply(req, Ok(()));
            self.check_demote();
        }
    }

    fn try_finish_all(&mut self) {
        for id in self.ops.ids() {
            self.try_finish(id);
        }
        self.start_ready();
    }

    fn reply(&mut self, id: RequestId, result: Result<(), ReplyError>) {
        if id == LEAVING_FLUSH || id == AL_FLUSH || id == SYNC_SOURCE_FLUSH {
            return;
        }
        self.out.push_back(Output::Reply { id, result });
    }

    // ----- disk completions ----------------------------------------------

    /// A disk operation the core emitted has completed.
    pub fn handle_disk(&mut self, now: Instant, id: DiskOpId, result: DiskResult<P>) {
        self.now = now;
        if self.failed.is_some() {
            return;
        }
        let id = id.0;
        if !self.ops.is_active(id) {
            self.fail_stop(format!(
                "invariant broken: disk completion for operation {id}, which is not running"
            ));
            return;
        }
        if let DiskResult::Failed(msg) = &result {
            self.fail_stop(format!("local store failed: {msg}"));
            return;
        }
        let connected_epoch = (self.conn == ConnectionState::Connected).then_some(self.epoch);
        match self.ops.get_mut(id) {
            Some(Op::ClientWrite { local_done, .. }) | Some(Op::ClientFlush { local_done, .. }) => {
                *local_done = true;
                self.try_finish(id);
                self.start_ready();
            }
            Some(Op::PeerWrite {
                seq,
                epoch,
                sync_bytes,
                ..
            }) => {
                let (seq, epoch, sync_bytes) = (*seq, *epoch, *sync_bytes);
                self.ops.remove(id);
                if connected_epoch == Some(epoch) {
                    self.sec_incomplete.remove(&seq);
                    if let Some(t) = &mut self.sync_target {
                        t.done_bytes += sync_bytes;
                    }
                    self.send_ack(seq);
                    self.check_sec_flushes();
                }
                self.start_ready();
            }
            Some(Op::PeerFlush {
                seq,
                epoch,
                sync_done,
            }) => {
                let (seq, epoch, sync_done) = (*seq, *epoch, *sync_done);
                self.ops.remove(id);
                if connected_epoch == Some(epoch) {
                    if sync_done {
                        self.finish_sync_target(seq);
                    } else {
                        self.out.push_back(Output::Send(Message::FlushAck { seq }));
                    }
                }
            }
            Some(Op::PeerVerify { seq, epoch }) => {
                let (seq, epoch) = (*seq, *epoch);
                let crcs = match &result {
                    DiskResult::Read(payload) => block_crcs(payload.bytes()),
                    _ => {
                        self.fail_stop(format!(
                            "invariant broken: verify read {seq} completed without data"
                        ));
                        return;
                    }
                };
                self.ops.remove(id);
                if connected_epoch == Some(epoch) {
                    self.out
                        .push_back(Output::Send(Message::VerifyReply(VerifyReply {
                            seq,
                            crcs,
                        })));
                }
                self.start_ready();
            }
            Some(Op::VerifyChunk {
                offset,
                length,
                epoch,
                crcs,
            }) => {
                let (offset, length, epoch) = (*offset, *length, *epoch);
                if crcs.is_some() {
                    self.fail_stop(format!(
                        "invariant broken: verify chunk at {offset} completed twice"
                    ));
                    return;
                }
                let live = self.verify.as_ref().is_some_and(|v| v.epoch == epoch)
                    && connected_epoch == Some(epoch);
                let payload = match &result {
                    DiskResult::Read(p) if p.len() as u64 == length => p,
                    _ => {
                        self.fail_stop(format!(
                            "invariant broken: verify read at {offset} returned no or short data"
                        ));
                        return;
                    }
                };
                if !live {
                    self.ops.remove(id);
                    self.start_ready();
                    return;
                }
                let local = block_crcs(payload.bytes());
                if let Some(Op::VerifyChunk { crcs, .. }) = self.ops.get_mut(id) {
                    *crcs = Some(local);
                }
                let seq = self.alloc_seq();
                self.peer_pending.insert(seq, (Pending::Verify(id), now));
                self.out.push_back(Output::Send(Message::VerifyRequest {
                    seq,
                    offset,
                    length,
                }));
            }
            Some(Op::SyncChunk {
                offset,
                length,
                epoch,
                sent,
                ..
            }) => {
                let (offset, length, epoch, was_sent) = (*offset, *length, *epoch, *sent);
                let live = self.sync.as_ref().is_some_and(|s| s.epoch == epoch)
                    && connected_epoch == Some(epoch);
                if was_sent {
                    self.fail_stop(format!(
                        "invariant broken: sync chunk at {offset} completed twice"
                    ));
                    return;
                }
                let DiskResult::Read(payload) = result else {
                    self.fail_stop(format!(
                        "invariant broken: sync read at {offset} completed without data"
                    ));
                    return;
                };
                if !live || payload.len() as u64 != length {
                    if live {
                        self.fail_stop(format!(
                            "invariant broken: sync read at {offset} returned {} bytes, not {length}",
                            payload.len()
                        ));
                        return;
                    }
                    self.ops.remove(id);
                    self.start_ready();
                    self.maybe_start_sync();
                    return;
                }
                if let Some(Op::SyncChunk { sent, .. }) = self.ops.get_mut(id) {
                    *sent = true;
                }
                let seq = self.alloc_seq();
                self.last_write_seq_sent = seq;
                self.peer_pending.insert(seq, (Pending::Op(id), now));
                self.out.push_back(Output::Send(Message::SyncData {
                    seq,
                    offset,
                    payload,
                }));
            }
            None => {}
        }
    }

    /// Acknowledges peer write `seq`. Acks due in the same step travel in
    /// one message: if the last message queued (not yet polled by the
    /// driver) is an `Ack` or `Acks` with room, `seq` joins it, so the
    /// order of the messages on the wire is that of one ack each, minus the
    /// frames. Nothing waits for a batch to fill: what is queued goes out
    /// when the driver drains this step's outputs.
    fn send_ack(&mut self, seq: u64) {
        // A message queued before a Disconnect belongs to the old link: an
        // ack never joins it (acks are due only while connected, so this
        // does not happen today; the rule keeps it so).
        let last_send = self
            .out
            .iter_mut()
            .rev()
            .take_while(|o| !matches!(o, Output::Disconnect { .. }))
            .find_map(|o| match o {
                Output::Send(m) => Some(m),
                _ => None,
            });
        if last_send.is_some_and(|m| m.absorb_ack(seq)) {
            return;
        }
        self.out.push_back(Output::Send(Message::Ack { seq }));
    }

    fn fail_stop(&mut self, reason: String) {
        if self.failed.is_some() {
            return;
        }
        tracing::error!(resource = %self.cfg.resource, "{reason}");
        self.failed = Some(reason.clone());
        for id in self.ops.ids() {
            if let Some(Op::ClientWrite { req, .. } | Op::ClientFlush { req, .. }) =
                self.ops.remove(id)
            {
                self.reply(req, Err(ReplyError::Io(reason.clone())));
            }
        }
        self.out.push_back(Output::FailStop { reason });
    }

    // ----- metadata ------------------------------------------------------

    fn request_meta(&mut self) -> u64 {
        self.meta_version += 1;
        if self.meta_in_flight.is_none() {
            self.emit_meta();
        }
        self.meta_version
    }

    fn emit_meta(&mut self) {
        let id = MetaWriteId(self.meta_version);
        self.meta_in_flight = Some((id, self.wanted));
        let bitmap = self.bitmap.take_unsaved_pages();
        self.out.push_back(Output::WriteMeta {
            id,
            state: self.wanted,
            bitmap,
            activity_log: self.al.image(),
        });
    }

    fn defer(&mut self, version: u64, what: Deferred) {
        if version <= self.durable_version {
            self.run_deferred(what);
        } else {
            self.deferred.push((version, what));
        }
    }

    /// The metadata write `id` completed (or failed: the node stops).
    pub fn handle_meta_done(&mut self, now: Instant, id: MetaWriteId, result: Result<(), String>) {
        self.now = now;
        if self.failed.is_some() {
            return;
        }
        let Some((in_flight, state)) = self.meta_in_flight.take() else {
            self.fail_stop(format!(
                "invariant broken: metadata completion {} with no write running",
                id.0
            ));
            return;
        };
        if in_flight != id {
            self.fail_stop(format!(
                "invariant broken: metadata completion {} while {} runs",
                id.0, in_flight.0
            ));
            return;
        }
        if let Err(e) = result {
            self.fail_stop(format!("metadata write failed: {e}"));
            return;
        }
        self.persisted = state;
        self.durable_version = id.0;
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(v, _)| *v <= self.durable_version);
        self.deferred = later;
        for (_, what) in ready {
            self.run_deferred(what);
        }
        if self.meta_version > self.durable_version {
            self.emit_meta();
        }
        self.try_finish_all();
    }

    fn run_deferred(&mut self, what: Deferred) {
        match what {
            Deferred::Admin(id, msg) => self.out.push_back(Output::AdminDone {
                id,
                result: Ok(msg),
            }),
            Deferred::SendState => self.send_state(),
            Deferred::SyncReady => {
                if self.sync_target.is_some() && self.conn == ConnectionState::Connected {
                    self.send_state();
                    self.out.push_back(Output::Send(Message::SyncReady));
                }
            }
            Deferred::SyncDoneAck(seq) => {
                if self.conn == ConnectionState::Connected {
                    self.send_state();
                    self.out
                        .push_back(Output::Send(Message::SyncDoneAck { seq }));
                }
            }
            Deferred::StartSync => self.maybe_start_sync(),
        }
    }

    fn send_state(&mut self) {
        if self.conn == ConnectionState::Connected {
            let state = self.my_state();
            self.out.push_back(Output::Send(Message::State(state)));
        }
    }

    /// Records durably that the peer may be missing writes.
    fn note_peer_missing(&mut self) {
        if !self.wanted.peer_sync_needed {
            self.wanted.peer_sync_needed = true;
            self.request_meta();
        }
    }

    /// A write is about to be acknowledged without the peer: the data leaves
    /// the line of history the peer is on. The first such write begins a new
    /// generation (in the same metadata write that records the sync owed,
    /// which the reply waits for).
    fn note_unreplicated_write(&mut self) {
        let rotate = self.wanted.role == Role::Primary && self.wanted.bitmap_generation == 0;
        if rotate {
            self.begin_generation();
        }
        if rotate || !self.wanted.peer_sync_needed {
            self.wanted.peer_sync_needed = true;
            self.request_meta();
        }
    }

    /// The peer is on this node's current line again: the bitmap identifier
    /// goes to history (the next write without the peer begins a new one).
    fn rejoin_line(&mut self) {
        let mut g = self.wanted.generations();
        if g.bitmap != 0 {
            g.history = [g.bitmap, g.history[0]];
            g.bitmap = 0;
            self.wanted.set_generations(g);
            self.request_meta();
        }
    }

    /// Begins a new generation: the current one becomes the bitmap one (or,
    /// if this node already left its peer's line, history).
    fn begin_generation(&mut self) {
        let mut g = self.wanted.generations();
        if g.bitmap == 0 {
            g.bitmap = g.current;
        } else if g.current != 0 {
            g.history = [g.current, g.history[0]];
        }
        g.current = self.gen_source.next_id();
        tracing::info!(
            resource = %self.cfg.resource,
            "new data generation {:016X} (left {:016X})",
            g.current,
            g.bitmap
        );
        self.wanted.set_generations(g);
    }

    // ----- the link ------------------------------------------------------

    /// A new authenticated link to the peer is up (it replaces any old one).
    pub fn handle_connected(&mut self, now: Instant) {
        self.now = now;
        if self.conn == ConnectionState::StandAlone {
            let why = self.last_disconnect.clone().unwrap_or_default();
            self.out.push_back(Output::Disconnect {
                reason: format!("this node is StandAlone ({why}); `pairbd connect` retries"),
            });
            return;
        }
        if self.conn != ConnectionState::Disconnected {
            self.lose_peer("replaced by a new connection".into());
        }
        if self.failed.is_some() {
            self.out.push_back(Output::Disconnect {
                reason: "this node has failed".into(),
            });
            return;
        }
        self.epoch += 1;
        // A new connection repairs what a verify marked.
        self.marked_held = false;
        self.conn = ConnectionState::Handshaking;
        self.handshake_deadline = Some(now + self.cfg.ack_timeout);
        self.next_seq = 1;
        self.last_write_seq_sent = 0;
        self.peer_flushed_below = 0;
        self.sec_last_seq = 0;
        self.sec_last_bulk_seq = 0;
        self.out.push_back(Output::Send(Message::Hello(Hello {
            node_name: self.cfg.node_name.clone(),
            resource: self.cfg.resource.clone(),
            size_bytes: self.cfg.size_bytes,
            state: self.my_state(),
            peer_sync_needed: self.wanted.peer_sync_needed,
            unclean_primary: self.crash_uncovered(),
            discard_my_data: self.discard_my_data,
            dirty_bytes: self.bitmap.dirty_bytes(),
        })));
        // Then this node's dirty regions: the peer's half of the union a
        // resync covers.
        let ranges = self.bitmap.ranges();
        let batches = ranges.len().div_ceil(DIRTY_RANGES_MAX).max(1);
        let mut rest = ranges.as_slice();
        for i in 0..batches {
            let n = rest.len().min(DIRTY_RANGES_MAX);
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            self.out
                .push_back(Output::Send(Message::DirtyRanges(DirtyRanges {
                    ranges: batch.to_vec(),
                    last: i + 1 == batches,
                })));
        }
    }

    /// The link to the peer is gone (the driver noticed; the core may also
    /// decide it with `Output::Disconnect`).
    pub fn handle_disconnected(&mut self, now: Instant, reason: &str) {
        self.now = now;
        match self.conn {
            ConnectionState::Disconnected => {}
            ConnectionState::StandAlone => self.handshake_deadline = None,
            _ => self.lose_peer(reason.to_string()),
        }
    }

    fn drop_link(&mut self, reason: String) {
        tracing::warn!(resource = %self.cfg.resource, "dropping the link: {reason}");
        self.out.push_back(Output::Disconnect {
            reason: reason.clone(),
        });
        self.lose_peer(reason);
    }

    fn lose_peer(&mut self, reason: String) {
        let was_connected = self.conn == ConnectionState::Connected;
        self.conn = ConnectionState::Disconnected;
        self.handshake_deadline = None;
        self.peer = None;
        self.last_disconnect = Some(reason);
        if was_connected {
            self.peer_lost_while_up = true;
        }
        // The transfer log: every write sent since the last completed peer
        // flush may be missing on the peer (a power cut there loses it).
        let transfer_log_dirty =
            self.last_write_seq_sent >= self.peer_flushed_below && self.last_write_seq_sent > 0;
        #[cfg(feature = "mutations")]
        let transfer_log_dirty = transfer_log_dirty && !self.mutated(Mutation::TransferLogIgnored);
        // Writes still waiting for their ack are in the transfer log too.
        #[cfg(feature = "mutations")]
        let forget = self.mutated(Mutation::TransferLogIgnored);
        #[cfg(not(feature = "mutations"))]
        let forget = false;
        if forget {
            self.transfer_log.clear();
            self.transfer_spill = None;
        } else {
            self.mark_transfer_log();
        }
        let mut unconfirmed = false;
        let mut flush_unconfirmed = false;
        for id in self.ops.ids() {
            let active = self.ops.is_active(id);
            let remove = match self.ops.get_mut(id) {
                Some(Op::ClientWrite { peer, .. }) if *peer == PeerAck::Waiting => {
                    *peer = PeerAck::NotNeeded;
                    unconfirmed = true;
                    false
                }
                // A flush changes no data: the peer needs a sync, but no new
                // generation begins (that would make a split brain of the
                // next meeting). (Found by the simulator.)
                Some(Op::ClientFlush { peer, .. }) if *peer == PeerAck::Waiting => {
                    *peer = PeerAck::NotNeeded;
                    flush_unconfirmed = true;
                    false
                }
                // A chunk still being read is dropped when its read ends.
                Some(Op::SyncChunk { sent, .. }) => *sent || !active,
                Some(Op::VerifyChunk { crcs, .. }) => crcs.is_some() || !active,
                Some(Op::PeerVerify { .. }) => !active,
                // Running ones finish silently (their epoch is stale); waiting
                // ones were never acknowledged: drop them.
                Some(Op::PeerWrite { .. }) | Some(Op::PeerFlush { .. }) => !active,
                _ => false,
            };
            if remove {
                self.ops.remove(id);
            }
        }
        self.peer_pending.clear();
        self.sec_incomplete.clear();
        self.sec_flushes.clear();
        // The window: no ack of this link will come. Waiting writes start
        // below (try_finish_all), as for a peer that is away: unreplicated,
        // marked in the bitmap; or, after a reconnect, through the window.
        self.link_losses += 1;
        self.window_sent.clear();
        self.flush_covers.clear();
        #[cfg(feature = "mutations")]
        if self.mutated(Mutation::WindowReleasedUnmarked) {
            let live: Vec<u64> = self
                .window_waiting
                .iter()
                .copied()
                .filter(|&w| self.window_waiter_live(w))
                .collect();
            self.window_unmarked.extend(live);
        }
        self.window_waiting.clear();
        #[cfg(feature = "mutations")]
        let keep_window = self.mutated(Mutation::WindowKeptAfterLinkLoss);
        #[cfg(not(feature = "mutations"))]
        let keep_window = false;
        if !keep_window {
            self.window_bytes = 0;
        }
        // SyncDone went out, its acknowledgement did not come: the target
        // took this node's current generation, or it is still Inconsistent
        // (behind whatever the generations say). Either way the two are not
        // apart any more, as if SyncDoneAck had come. (Found by the simulator.)
        if self
            .sync
            .take()
            .is_some_and(|s| s.phase == SyncPhase::DoneSent)
        {
            self.rejoin_line();
        }
        self.sync_target = None;
        if self.verify.take().is_some() {
            tracing::warn!(resource = %self.cfg.resource, "online verify stopped: the link went");
        }
        if self.wanted.role == Role::Primary {
            if unconfirmed {
                self.note_unreplicated_write();
            } else if transfer_log_dirty || flush_unconfirmed {
                self.note_peer_missing();
            }
            // Not while demoting: the demotion waits for its requests, and
            // held ones would never finish. (Found by the simulator.)
            if self.cfg.on_peer_loss == OnPeerLoss::SuspendIo && self.demoting.is_none() {
                self.io_suspended = true;
            }
        }
        self.try_finish_all();
        // A promotion that waited for the peer's answer goes on without it.
        if let Some(p) = self.probe.take() {
            if let Err(e) = self.promote(p.admin, p.force, p.new_generation) {
                self.out.push_back(Output::AdminDone {
                    id: p.admin,
                    result: Err(e),
                });
            }
        }
    }

    /// A message from the peer that arrived on the link's main lane.
    pub fn handle_message(&mut self, now: Instant, msg: Message<P>) {
        self.handle_message_on(now, Lane::Main, msg);
    }

    /// A message from the peer, decoded by the driver, with the lane it
    /// arrived on. Each lane is ordered on its own: the main lane carries
    /// every kind, the bulk lane only client writes (see `Lane`).
    pub fn handle_message_on(&mut self, now: Instant, lane: Lane, msg: Message<P>) {
        self.now = now;
        if self.failed.is_some()
            || matches!(
                self.conn,
                ConnectionState::Disconnected | ConnectionState::StandAlone
            )
        {
            return;
        }
        let name = msg.name();
        if lane == Lane::Bulk && !matches!(msg, Message::Write { .. }) {
            self.drop_link(format!(
                "protocol violation ({name}): only writes travel on the bulk lane"
            ));
            return;
        }
        if let Err(reason) = self.dispatch(lane, msg) {
            self.drop_link(format!("protocol violation ({name}): {reason}"));
        }
    }

    fn dispatch(&mut self, lane: Lane, msg: Message<P>) -> Result<(), String> {
        if self.conn == ConnectionState::Handshaking && !matches!(msg, Message::Hello(_)) {
            return Err("expected hello first".into());
        }
        match msg {
            Message::Hello(h) => self.on_hello(h),
            Message::State(s) => {
                let peer = self.peer.as_mut().ok_or("state before hello")?;
                peer.state = s;
                if s.role == Role::Primary && self.wanted.role == Role::Primary {
                    return Err("both nodes are Primary".into());
                }
                if s.role == Role::Primary {
                    // The peer's promotion ends any probe and any claim of
                    // this node to be ahead of it (it was checked at hello).
                    peer.behind = false;
                }
                if s.role == Role::Secondary && self.sync_target.take().is_some() {
                    // The source was demoted mid-sync (it sends no more): this
                    // node stays Inconsistent, and the next primary may start
                    // a new sync. (Found by the simulator.)
                    tracing::warn!(resource = %self.cfg.resource, "the sync source was demoted: this node stays Inconsistent");
                }
                self.maybe_start_sync();
                self.start_ready();
                Ok(())
            }
            Message::Write {
                seq,
                offset,
                payload,
                fua,
            } => {
                let len = payload.len() as u64;
                self.on_peer_write(
                    lane,
                    seq,
                    offset,
                    len,
                    DiskOp::Write {
                        offset,
                        payload,
                        fua,
                    },
                    0,
                )
            }
            Message::Trim {
                seq,
                offset,
                length,
            } => self.on_peer_write(
                Lane::Main,
                seq,
                offset,
                length,
                DiskOp::Trim { offset, length },
                0,
            ),
            Message::WriteZeroes {
                seq,
                offset,
                length,
                no_hole,
            } => self.on_peer_write(
                Lane::Main,
                seq,
                offset,
                length,
                DiskOp::WriteZeroes {
                    offset,
                    length,
                    no_hole,
                },
                0,
            ),
            Message::SyncData {
                seq,
                offset,
                payload,
            } => {
                if self.sync_target.is_none() {
                    return Err("sync data while no sync runs".into());
                }
                let len = payload.len() as u64;
                self.on_peer_write(
                    Lane::Main,
                    seq,
                    offset,
                    len,
                    DiskOp::Write {
                        offset,
                        payload,
                        fua: false,
                    },
                    len,
                )
            }
            Message::Flush { seq } => {
                self.check_from_primary(seq)?;
                self.sec_flushes.push_back((seq, false));
                self.check_sec_flushes();
                Ok(())
            }
            Message::SyncDone { seq } => {
                self.check_from_primary(seq)?;
                if self.sync_target.is_none() {
                    return Err("sync done while no sync runs".into());
                }
                self.sec_flushes.push_back((seq, true));
                self.check_sec_flushes();
                Ok(())
            }
            Message::Ping { seq } => {
                self.out.push_back(Output::Send(Message::Pong { seq }));
                Ok(())
            }
            Message::Pong { seq } => {
                if self.probe.as_ref().is_some_and(|p| p.seq == seq) {
                    if let Some(p) = self.probe.take() {
                        self.probe_answered(p);
                    }
                }
                Ok(())
            }
            Message::DirtyRanges(d) => self.on_dirty_ranges(d),
            Message::VerifyRequest {
                seq,
                offset,
                length,
            } => {
                self.check_from_primary(seq)?;
                let fits = offset
                    .checked_add(length)
                    .is_some_and(|end| end <= self.cfg.size_bytes);
                if !fits || length == 0 || length > VERIFY_MAX_BYTES {
                    return Err(format!("verify of {length} bytes at {offset}"));
                }
                let id = self.ops.insert(
                    Some(Range::new(offset, length)),
                    Op::PeerVerify {
                        seq,
                        epoch: self.epoch,
                    },
                );
                if self.ops.may_start(id) {
                    self.start_op(id);
                }
                Ok(())
            }
            Message::VerifyReply(r) => self.on_verify_reply(r),
            Message::Ack { seq } => self.on_ack(seq, false),
            Message::Acks(batch) => {
                #[cfg(feature = "mutations")]
                if self.mutated(Mutation::AcksCumulative) {
                    return self.on_acks_cumulative(&batch.seqs);
                }
                // Exactly N single acks, in order (the batch is sorted).
                for seq in batch.seqs {
                    self.on_ack(seq, false)?;
                }
                Ok(())
            }
            Message::FlushAck { seq } => self.on_ack(seq, true),
            Message::SyncDoneAck { seq } => {
                match self.peer_pending.remove(&seq) {
                    Some((Pending::SyncDone, _)) => {}
                    _ => return Err(format!("unexpected sync-done-ack {seq}")),
                }
                // The target flushed everything before SyncDone: every chunk's
                // bits go.
                self.sync_flushed(seq);
                self.sync = None;
                if let Some(p) = &mut self.peer {
                    p.state.disk = DiskState::UpToDate;
                    p.unclean_primary = false;
                    p.peer_sync_needed = false;
                    p.dirty = None;
                }
                let before = self.wanted;
                self.wanted.peer_sync_needed = false;
                if self.wanted.bitmap_generation != 0 {
                    // The peer is on this node's line again.
                    let mut g = self.wanted.generations();
                    g.history = [g.bitmap, g.history[0]];
                    g.bitmap = 0;
                    self.wanted.set_generations(g);
                }
                if self.wanted != before || self.bitmap.has_unsaved_pages() {
                    self.request_meta();
                }
                if let Some(p) = &mut self.peer {
                    p.behind = false;
                }
                tracing::info!(resource = %self.cfg.resource, "sync finished: the peer is UpToDate");
                Ok(())
            }
            Message::SyncStart { total_bytes } => {
                if self.wanted.role != Role::Secondary || !self.peer_is_primary() {
                    return Err("sync start but this node is not a secondary of a primary".into());
                }
                if total_bytes > self.cfg.size_bytes {
                    return Err(format!(
                        "sync of {total_bytes} bytes but the volume has {}",
                        self.cfg.size_bytes
                    ));
                }
                if self.sync_target.is_some() {
                    return Err("sync start while a sync runs".into());
                }
                self.sync_target = Some(SyncTarget {
                    done_bytes: 0,
                    total_bytes,
                    started: self.now,
                });
                tracing::info!(resource = %self.cfg.resource, "full sync starting: this node is the target");
                // Inconsistent (and no longer an unclean primary) must be on
                // disk before the first chunk overwrites anything.
                self.wanted.disk = DiskState::Inconsistent;
                let version = if self.wanted != self.persisted {
                    self.request_meta()
                } else {
                    self.meta_version
                };
                self.unclean_primary = false;
                self.defer(version, Deferred::SyncReady);
                Ok(())
            }
            Message::SyncReady => match &mut self.sync {
                Some(s) if s.phase == SyncPhase::WaitingReady => {
                    s.phase = SyncPhase::Sending;
                    self.pump_sync();
                    Ok(())
                }
                _ => Err("sync ready while no sync waits for it".into()),
            },
        }
    }

    /// A split brain, unless one side's data is to be discarded: by the
    /// operator (`connect --discard-my-data`), or by `after-split-brain =
    /// "discard-zero-changes"` when exactly one side changed nothing. Both
    /// nodes reach the mirrored answer from the two hellos.
    fn resolve_split_brain(&self, h: &Hello) -> Verdict {
        let auto = self.cfg.after_split_brain == AfterSplitBrain::DiscardZeroChanges;
        let my_zero = self.bitmap.is_empty() && !self.crash_uncovered();
        let peer_zero = h.dirty_bytes == 0 && !h.unclean_primary;
        let i_discard = self.discard_my_data || (auto && my_zero && !peer_zero);
        let peer_discards = h.discard_my_data || (auto && peer_zero && !my_zero);
        match (i_discard, peer_discards) {
            (true, false) => {
                tracing::warn!(resource = %self.cfg.resource, "split brain resolved: this node's changes are discarded; it syncs from {}", h.node_name);
                Verdict::Behind
            }
            (false, true) => {
                tracing::warn!(resource = %self.cfg.resource, "split brain resolved: {}'s changes are discarded; this node's data wins", h.node_name);
                Verdict::Ahead
            }
            _ => Verdict::SplitBrain,
        }
    }

    fn on_verify_reply(&mut self, r: VerifyReply) -> Result<(), String> {
        let Some((Pending::Verify(id), _)) = self.peer_pending.remove(&r.seq) else {
            return Err(format!("verify reply {} to no request", r.seq));
        };
        let Some(Op::VerifyChunk {
            offset,
            length,
            crcs: Some(local),
            ..
        }) = self.ops.remove(id)
        else {
            return Err(format!("verify reply {} for no chunk", r.seq));
        };
        if local.len() != r.crcs.len() {
            return Err(format!(
                "verify reply {} has {} checksums, not {}",
                r.seq,
                r.crcs.len(),
                local.len()
            ));
        }
        let mut differing = Vec::new();
        for (i, (a, b)) in local.iter().zip(&r.crcs).enumerate() {
            if a != b {
                let at = offset + i as u64 * VERIFY_BLOCK_BYTES;
                differing.push((at, VERIFY_BLOCK_BYTES.min(offset + length - at)));
            }
        }
        #[cfg(feature = "mutations")]
        let marks = !self.mutated(Mutation::VerifyMarksNothing);
        #[cfg(not(feature = "mutations"))]
        let marks = true;
        if marks {
            for &(at, len) in &differing {
                self.mark(at, len);
            }
        }
        if let Some(v) = &mut self.verify {
            v.done_bytes += length;
            v.in_flight -= 1;
            for (at, len) in differing {
                v.result.differing_blocks += 1;
                let ranges = &mut v.result.ranges;
                let n = ranges.len();
                match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == at => last.1 += len,
                    _ if n < VERIFY_RANGES_MAX => ranges.push((at, len)),
                    _ => {}
                }
            }
        }
        self.start_ready();
        self.pump_verify();
        Ok(())
    }

    /// Starts verify chunks up to the window (and the sync rate), and ends
    /// the verify when every chunk was compared: differing blocks were
    /// marked, and a resync of them starts.
    fn pump_verify(&mut self) {
        let chunk = self
            .cfg
            .sync_chunk_bytes
            .clamp(VERIFY_BLOCK_BYTES, VERIFY_MAX_BYTES);
        let window = self.cfg.sync_window.max(1);
        let rate = self.cfg.sync_rate_bytes_per_sec.filter(|r| *r > 0);
        loop {
            let Some(v) = &mut self.verify else { return };
            if v.in_flight >= window
                || v.next_offset >= self.cfg.size_bytes
                || (rate.is_some() && v.next_chunk_at > self.now)
            {
                break;
            }
            let offset = v.next_offset;
            let length = chunk.min(self.cfg.size_bytes - offset);
            v.next_offset += length;
            v.in_flight += 1;
            if let Some(rate) = rate {
                let nanos = u128::from(length) * 1_000_000_000 / u128::from(rate);
                let pause = std::time::Duration::from_nanos(nanos.min(u64::MAX as u128) as u64);
                v.next_chunk_at = v.next_chunk_at.max(self.now) + pause;
            }
            let epoch = v.epoch;
            #[cfg(feature = "mutations")]
            let locked = !self.mutated(Mutation::VerifyIgnoresExtentLock);
            #[cfg(not(feature = "mutations"))]
            let locked = true;
            let id = self.ops.insert(
                locked.then(|| Range::new(offset, length)),
                Op::VerifyChunk {
                    offset,
                    length,
                    epoch,
                    crcs: None,
                },
            );
            if self.ops.may_start(id) {
                self.start_op(id);
            }
        }
        let done = self
            .verify
            .as_ref()
            .is_some_and(|v| v.in_flight == 0 && v.next_offset >= self.cfg.size_bytes);
        if done {
            if let Some(v) = self.verify.take() {
                tracing::info!(
                    resource = %self.cfg.resource,
                    "online verify finished: {} bytes compared, {} blocks differ",
                    v.result.checked_bytes.max(v.done_bytes),
                    v.result.differing_blocks
                );
                let mut result = v.result;
                result.checked_bytes = v.done_bytes;
                // The operator repairs them with `resync-marked` (after
                // looking at them, if they wish), or the next connection does.
                self.marked_held = result.differing_blocks > 0;
                self.last_verify = Some(result);
            }
            self.maybe_start_sync();
        }
    }

    fn on_dirty_ranges(&mut self, d: DirtyRanges) -> Result<(), String> {
        let (size, granularity) = (self.cfg.size_bytes, self.bitmap.granularity());
        let peer = self.peer.as_mut().ok_or("dirty ranges before hello")?;
        if peer.dirty_done {
            return Err("dirty ranges after the last batch".into());
        }
        if d.ranges.len() > DIRTY_RANGES_MAX {
            return Err(format!("{} dirty ranges in one batch", d.ranges.len()));
        }
        for &(offset, length) in &d.ranges {
            let fits = offset.checked_add(length).is_some_and(|end| end <= size);
            if !fits || length == 0 {
                return Err(format!(
                    "dirty range of {length} bytes at {offset} outside the volume ({size} bytes)"
                ));
            }
            peer.dirty
                .get_or_insert_with(|| Box::new(DirtyBitmap::new(size, granularity)))
                .mark(offset, length);
        }
        if d.last {
            peer.dirty_done = true;
            self.maybe_start_sync();
        }
        Ok(())
    }

    fn peer_is_primary(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| p.state.role == Role::Primary)
    }

    fn check_from_primary(&mut self, seq: u64) -> Result<(), String> {
        self.check_from_primary_on(Lane::Main, seq)
    }

    /// A replicated request from the primary: sequence numbers rise on each
    /// lane (the lanes overtake each other, so not across them; the primary
    /// never has two overlapping writes in flight, so their order on the
    /// stores does not depend on it).
    fn check_from_primary_on(&mut self, lane: Lane, seq: u64) -> Result<(), String> {
        if self.wanted.role != Role::Secondary || !self.peer_is_primary() {
            return Err(
                "replicated request but this node is not the secondary of a primary".into(),
            );
        }
        let last = match lane {
            Lane::Main => &mut self.sec_last_seq,
            Lane::Bulk => &mut self.sec_last_bulk_seq,
        };
        if seq <= *last {
            return Err(format!("sequence {seq} does not follow {}", *last));
        }
        *last = seq;
        Ok(())
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), String> {
        if self.conn != ConnectionState::Handshaking {
            return Err("second hello".into());
        }
        if h.resource != self.cfg.resource {
            return Err(format!(
                "the peer replicates resource {:?}, not {:?}",
                h.resource, self.cfg.resource
            ));
        }
        if h.node_name == self.cfg.node_name {
            return Err(format!("the peer calls itself {:?} too", h.node_name));
        }
        if h.size_bytes != self.cfg.size_bytes {
            return Err(format!(
                "the peer's volume has {} bytes, this node's {}",
                h.size_bytes, self.cfg.size_bytes
            ));
        }
        let mine = self.wanted.generations();
        let theirs = h.state.generations;
        let mut verdict = generations::compare(self.wanted.disk, mine, h.state.disk, theirs);
        if verdict == Verdict::SplitBrain {
            verdict = self.resolve_split_brain(&h);
        }
        let both = format!(
            "this node {} has generations {}, the peer {} has {}",
            self.cfg.node_name,
            generations::describe(mine),
            h.node_name,
            generations::describe(theirs)
        );
        match verdict {
            Verdict::SplitBrain | Verdict::Unrelated => {
                let what = if verdict == Verdict::SplitBrain {
                    "split brain: both nodes changed the data while apart"
                } else {
                    "unrelated data: the two copies share no history"
                };
                let reason = format!("{what} ({both}); staying StandAlone, no data changed");
                tracing::error!(resource = %self.cfg.resource, "{reason}");
                // The link stays open for a moment so that the peer reads this
                // node's hello and comes to the same verdict; then it closes.
                // Nothing is exchanged meanwhile (StandAlone ignores messages).
                self.conn = ConnectionState::StandAlone;
                self.peer = None;
                self.last_disconnect = Some(reason);
                self.handshake_deadline = Some(self.now + self.cfg.probe_timeout);
                self.start_ready();
                return Ok(());
            }
            _ => {}
        }
        if h.state.role == Role::Primary && self.wanted.role == Role::Primary {
            return Err("both nodes are Primary: demote one".into());
        }
        if verdict == Verdict::Behind && self.wanted.role == Role::Primary {
            return Err(format!(
                "the peer {} holds newer data but this node is Primary ({both}); demote this \
                 node and it will sync from the peer",
                h.node_name
            ));
        }
        if verdict == Verdict::Ahead && h.state.role == Role::Primary {
            return Err(format!(
                "the peer {} is Primary but this node holds newer data ({both}); demote the peer",
                h.node_name
            ));
        }
        tracing::info!(
            resource = %self.cfg.resource,
            peer = %h.node_name,
            "connected: peer is {:?}/{:?}, data {:?}",
            h.state.role,
            h.state.disk,
            verdict
        );
        let mut state = h.state;
        if verdict == Verdict::Ahead && state.disk == DiskState::UpToDate {
            state.disk = DiskState::Outdated;
        }
        self.peer = Some(PeerInfo {
            name: h.node_name,
            state,
            peer_sync_needed: h.peer_sync_needed,
            unclean_primary: h.unclean_primary,
            behind: verdict == Verdict::Ahead,
            dirty: None,
            dirty_done: false,
        });
        self.conn = ConnectionState::Connected;
        self.handshake_deadline = None;
        self.io_suspended = false;
        if verdict == Verdict::Same && mine.current == theirs.current {
            // The peer took this node's current generation (a sync into it
            // finished but its acknowledgement was lost with the link): one
            // line again, so the next write without the peer must begin a new
            // generation, or a split brain would pass for "ahead". (Found by
            // the simulator.)
            self.rejoin_line();
        }
        // A peer that records "peer needs a sync" on the same line holds
        // writes this node may have lost (its cache, in a power cut while the
        // peer could not mark it): not a valid current copy until synced
        // either. (Found by the simulator.)
        let peer_owes_sync =
            verdict == Verdict::Same && h.peer_sync_needed && self.wanted.role == Role::Secondary;
        if (verdict == Verdict::Behind || peer_owes_sync) && self.wanted.disk == DiskState::UpToDate
        {
            // The peer moved on without this node: not a valid current copy
            // any more, even after a restart.
            tracing::warn!(resource = %self.cfg.resource, "the peer holds newer data: this node is Outdated ({both})");
            self.wanted.disk = DiskState::Outdated;
            let v = self.request_meta();
            self.defer(v, Deferred::SendState);
        }
        if self.unclean_primary
            && self.cfg.after_crash == AfterCrash::ResumePrimary
            && matches!(verdict, Verdict::Same | Verdict::Ahead)
            && self.wanted.disk == DiskState::UpToDate
            && state.role == Role::Secondary
        {
            tracing::info!(resource = %self.cfg.resource, "after-crash = resume-primary: the peer is Secondary with no newer data; becoming Primary again");
            let g = self.gen_source.next_id();
            self.become_primary(None, false, g);
        }
        // Writes that waited on a lost link without the peer's ack are now
        // covered by the sync that follows.
        self.maybe_start_sync();
        self.try_finish_all();
        Ok(())
    }

    fn on_peer_write(
        &mut self,
        lane: Lane,
        seq: u64,
        offset: u64,
        length: u64,
        op: DiskOp<P>,
        sync_bytes: u64,
    ) -> Result<(), String> {
        self.check_from_primary_on(lane, seq)?;
        let fits = offset
            .checked_add(length)
            .is_some_and(|end| end <= self.cfg.size_bytes);
        if !fits {
            return Err(format!(
                "write of {length} bytes at {offset} past the end ({} bytes)",
                self.cfg.size_bytes
            ));
        }
        let id = self.ops.insert(
            Some(Range::new(offset, length)),
            Op::PeerWrite {
                seq,
                epoch: self.epoch,
                op,
                sync_bytes,
            },
        );
        self.sec_incomplete.insert(seq);
        if self.ops.may_start(id) {
            self.start_op(id);
        }
        Ok(())
    }

    fn check_sec_flushes(&mut self) {
        while let Some(&(seq, sync_done)) = self.sec_flushes.front() {
            if self.sec_incomplete.range(..seq).next().is_some() {
                break;
            }
            self.sec_flushes.pop_front();
            let id = self.ops.insert(
                None,
                Op::PeerFlush {
                    seq,
                    epoch: self.epoch,
                    sync_done,
                },
            );
            self.start_op(id);
        }
    }

    fn finish_sync_target(&mut self, seq: u64) {
        self.sync_target = None;
        self.wanted.disk = DiskState::UpToDate;
        self.wanted.role = Role::Secondary;
        // Its own data was replaced: it owes the peer nothing any more, and
        // its own dirty regions (sent at connect) were part of the sync.
        self.wanted.peer_sync_needed = false;
        self.bitmap.clear_all();
        self.discard_my_data = false;
        // The peer's dirty regions (sent at connect) now hold the peer's
        // data here too: they must not seed a later sync the other way.
        if let Some(p) = &mut self.peer {
            p.dirty = None;
        }
        if let Some(p) = &self.peer {
            let source = p.state.generations;
            let mut g = self.wanted.generations();
            if g.current != source.current {
                g.history = if g.current != 0 {
                    [g.current, g.history[0]]
                } else {
                    source.history
                };
                g.current = source.current;
            }
            g.bitmap = 0;
            self.wanted.set_generations(g);
        }
        let v = self.request_meta();
        tracing::info!(resource = %self.cfg.resource, "full sync finished: this node is UpToDate");
        self.defer(v, Deferred::SyncDoneAck(seq));
    }

    fn on_ack(&mut self, seq: u64, flush: bool) -> Result<(), String> {
        let id = match self.peer_pending.remove(&seq) {
            Some((Pending::Op(id), _)) => {
                if !flush {
                    if let Some(bytes) = self.window_sent.remove(&seq) {
                        self.window_bytes -= bytes;
                    }
                }
                id
            }
            Some((Pending::SyncFlush, _)) if flush => {
                self.peer_flushed(seq);
                return Ok(());
            }
            // Already taken as acknowledged by a cumulative batch (a mutation).
            #[cfg(feature = "mutations")]
            None if !flush && self.mutated(Mutation::AcksCumulative) => return Ok(()),
            _ => return Err(format!("acknowledgement of unknown sequence {seq}")),
        };
        if flush {
            self.peer_flushed(seq);
        }
        match self.ops.get_mut(id) {
            Some(Op::ClientWrite { peer, .. }) if !flush => {
                *peer = PeerAck::Done;
                self.try_finish(id);
                self.start_ready();
                Ok(())
            }
            Some(Op::ClientFlush { peer, .. }) if flush => {
                *peer = PeerAck::Done;
                self.try_finish(id);
                // A finished flush may make room in the activity log.
                self.start_ready();
                Ok(())
            }
            Some(Op::SyncChunk {
                length,
                sent,
                bit,
                bits,
                ..
            }) if !flush && *sent => {
                let (length, bit, bits) = (*length, *bit, *bits);
                self.ops.remove(id);
                self.resynced_bytes += length;
                #[cfg(feature = "mutations")]
                let early = self.mutated(Mutation::BitClearedBeforeTargetFlush);
                #[cfg(not(feature = "mutations"))]
                let early = false;
                if early {
                    self.bitmap.clear_bits(bit, bits);
                }
                if let Some(s) = &mut self.sync {
                    s.done_bytes += length;
                    s.in_flight -= 1;
                    // The bits are cleared once the target flushed the chunk.
                    s.unflushed.push((seq, bit, bits));
                }
                self.request_sync_flush();
                self.start_ready();
                self.pump_sync();
                self.maybe_start_sync();
                Ok(())
            }
            // The write was already answered early (a mutation).
            #[cfg(feature = "mutations")]
            None if !flush && self.mutation == Some(Mutation::ReplyBeforePeerAck) => {
                self.start_ready();
                Ok(())
            }
            _ => Err(format!("acknowledgement {seq} of the wrong kind")),
        }
    }

    /// The `AcksCumulative` mutation: every write or sync chunk waiting
    /// for its ack up to the batch's highest sequence number counts as
    /// acknowledged (wrong: writes complete out of order on the secondary).
    #[cfg(feature = "mutations")]
    fn on_acks_cumulative(&mut self, seqs: &[u64]) -> Result<(), String> {
        let top = seqs.iter().copied().max().unwrap_or(0);
        let covered: Vec<u64> = self
            .peer_pending
            .range(..=top)
            .filter(|(_, (p, _))| match p {
                Pending::Op(id) => matches!(
                    self.ops.get(*id),
                    Some(Op::ClientWrite { .. } | Op::SyncChunk { sent: true, .. })
                ),
                _ => false,
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in covered {
            self.on_ack(seq, false)?;
        }
        Ok(())
    }

    // ----- sync (source side) ----------------------------------------------

    /// Asks the target to flush once enough acknowledged chunks wait for it,
    /// so that their bits can be cleared (and an interrupted resync resumes
    /// after them).
    fn request_sync_flush(&mut self) {
        let chunk = self.cfg.sync_chunk_bytes.max(1);
        let Some(s) = &self.sync else { return };
        let waiting: u64 = s
            .unflushed
            .iter()
            .map(|&(_, _, bits)| bits * self.bitmap.granularity())
            .sum();
        if s.flush_pending || s.phase != SyncPhase::Sending || waiting < SYNC_FLUSH_CHUNKS * chunk {
            return;
        }
        let seq = self.alloc_seq();
        self.peer_pending
            .insert(seq, (Pending::SyncFlush, self.now));
        if let Some(s) = &mut self.sync {
            s.flush_pending = true;
        }
        self.note_flush_covers(seq);
        self.out.push_back(Output::Send(Message::Flush { seq }));
    }

    /// The target flushed every write numbered below `seq`: the bits of the
    /// sync chunks among them are cleared.
    fn sync_flushed(&mut self, seq: u64) {
        let Some(s) = &mut self.sync else { return };
        s.flush_pending = false;
        let mut done = Vec::new();
        s.unflushed.retain(|&(chunk_seq, bit, bits)| {
            if chunk_seq < seq {
                done.push((bit, bits));
                false
            } else {
                true
            }
        });
        for (bit, bits) in done {
            self.bitmap.clear_bits(bit, bits);
        }
    }

    fn maybe_start_sync(&mut self) {
        if self.marked_held
            || self.sync.is_some()
            || self.conn != ConnectionState::Connected
            || !self.serves_clients()
            || self.wanted.disk != DiskState::UpToDate
        {
            return;
        }
        // Chunks of an abandoned sync (demoted mid-way, same connection) carry
        // the same epoch: they must be gone before a new sync counts its own.
        // (Found by the simulator.)
        if self
            .ops
            .iter()
            .any(|(_, op)| matches!(op, Op::SyncChunk { .. }))
        {
            return;
        }
        let Some(peer) = &self.peer else { return };
        // The sync set needs the peer's bitmap: wait for its last batch.
        if peer.state.role != Role::Secondary || !peer.dirty_done {
            return;
        }
        let peer_dirty = peer.dirty.as_ref().is_some_and(|d| !d.is_empty());
        // A peer that crashed as primary may hold unacknowledged writes this
        // node never saw: they are overwritten, as the failover requires.
        let needed = peer.state.disk != DiskState::UpToDate
            || self.wanted.peer_sync_needed
            || peer.unclean_primary
            || peer.behind
            || peer_dirty
            || !self.bitmap.is_empty();
        if !needed {
            return;
        }
        // The bitmaps describe the difference only if the peer's data is on
        // this node's current line, or where this node left it (its bitmap
        // generation), and the peer did not crash as Primary (its in-flight
        // writes are recorded nowhere). Otherwise: everything.
        let mine = self.wanted.generations();
        let theirs = peer.state.generations.current;
        // After a split brain resolved by discarding the peer's side, both
        // left the same generation (their bitmap identifiers are equal): each
        // side's bitmap holds its changes since, and the union is the
        // difference.
        let peer_left_same = {
            let pb = peer.state.generations.bitmap;
            pb != 0 && pb == mine.bitmap && peer.behind
        };
        let common =
            theirs != 0 && (theirs == mine.current || theirs == mine.bitmap) || peer_left_same;
        let quick = common && !peer.unclean_primary;
        let name = peer.name.clone();
        if quick {
            if let Some(d) = self.peer.as_mut().and_then(|p| p.dirty.take()) {
                self.bitmap.union(&d);
            }
        } else {
            self.bitmap.set_all();
        }
        let total_bytes = self.bitmap.dirty_bytes();
        tracing::info!(
            resource = %self.cfg.resource,
            peer = %name,
            "{} starting: this node is the source, {total_bytes} bytes",
            if quick { "resync of the dirty regions" } else { "full sync" }
        );
        self.sync = Some(SyncSource {
            epoch: self.epoch,
            phase: SyncPhase::WaitingReady,
            next_bit: 0,
            done_bytes: 0,
            total_bytes,
            full: !quick,
            in_flight: 0,
            started: self.now,
            unflushed: Vec::new(),
            flush_pending: false,
            next_chunk_at: self.now,
            store_flushed: false,
        });
        self.out
            .push_back(Output::Send(Message::SyncStart { total_bytes }));
        // What this store holds may not be durable (data the node received
        // as a Secondary, or from before a crash): it is made durable before
        // a chunk of it is sent, or a power cut here could take back what
        // the target keeps, where no activity log or bitmap records it.
        // (Found by the simulator once the activity log replaced the full
        // sync after a crash as Primary.)
        let data = Op::ClientFlush {
            req: SYNC_SOURCE_FLUSH,
            local_done: false,
            peer: PeerAck::NotNeeded,
        };
        let op = self.ops.insert(None, data);
        self.sync_source_flush = Some((op, self.epoch));
        self.start_op(op);
    }

    fn pump_sync(&mut self) {
        let Some(s) = &self.sync else { return };
        if s.phase != SyncPhase::Sending || !s.store_flushed {
            return;
        }
        let granularity = self.bitmap.granularity();
        let max_bits = (self.cfg.sync_chunk_bytes / granularity).max(1);
        let window = self.cfg.sync_window.max(1);
        let mut exhausted = false;
        let rate = self.resync_rate.rate(self.now);
        loop {
            let Some(s) = &mut self.sync else { return };
            if s.in_flight >= window {
                break;
            }
            let Some((bit, bits)) = self.bitmap.next_run(s.next_bit, max_bits) else {
                exhausted = true;
                break;
            };
            if rate.is_some() && s.next_chunk_at > self.now {
                break;
            }
            let (offset, length) = self.bitmap.bit_range(bit, bits);
            s.next_bit = bit + bits;
            if let Some(rate) = rate {
                // The chunk's share of a second at the configured rate.
                let nanos = u128::from(length) * 1_000_000_000 / u128::from(rate);
                let pause = std::time::Duration::from_nanos(nanos.min(u64::MAX as u128) as u64);
                s.next_chunk_at = s.next_chunk_at.max(self.now) + pause;
            }
            s.in_flight += 1;
            let epoch = s.epoch;
            let id = self.ops.insert(
                Some(Range::new(offset, length)),
                Op::SyncChunk {
                    offset,
                    length,
                    bit,
                    bits,
                    epoch,
                    sent: false,
                },
            );
            if self.ops.may_start(id) {
                self.start_op(id);
            }
        }
        let Some(s) = &mut self.sync else { return };
        if s.in_flight == 0 && exhausted {
            s.phase = SyncPhase::DoneSent;
            let seq = self.alloc_seq();
            self.peer_pending.insert(seq, (Pending::SyncDone, self.now));
            self.out.push_back(Output::Send(Message::SyncDone { seq }));
        }
    }

    // ----- timers and admin ------------------------------------------------

    /// Time passed; acts on expired deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.failed.is_some() {
            return;
        }
        if self.handshake_deadline.is_some_and(|d| now >= d) {
            if self.conn == ConnectionState::StandAlone {
                self.handshake_deadline = None;
                let reason = self.last_disconnect.clone().unwrap_or_default();
                self.out.push_back(Output::Disconnect { reason });
                return;
            }
            self.drop_link("the peer sent no hello in time".into());
            return;
        }
        if self.probe.as_ref().is_some_and(|p| now >= p.deadline) {
            // Silence counts as loss: lose_peer resumes the promotion.
            self.drop_link(format!(
                "the peer did not answer a probe within {:?}",
                self.cfg.probe_timeout
            ));
            return;
        }
        if self
            .sync
            .as_ref()
            .is_some_and(|s| s.phase == SyncPhase::Sending && s.next_chunk_at <= now)
        {
            self.pump_sync();
        }
        if self.verify.as_ref().is_some_and(|v| v.next_chunk_at <= now) {
            self.pump_verify();
        }
        if let Some(s) = &self.sync {
            if s.phase == SyncPhase::WaitingReady && now >= s.started + self.cfg.ack_timeout {
                self.drop_link("the peer did not answer the sync start in time".into());
                return;
            }
        }
        let oldest = self.peer_pending.iter().min_by_key(|(_, (_, sent))| *sent);
        if let Some((&seq, &(_, sent))) = oldest {
            if now >= sent + self.cfg.ack_timeout {
                self.drop_link(format!(
                    "the peer left request {seq} unacknowledged for {:?}",
                    self.cfg.ack_timeout
                ));
            }
        }
    }

    /// An operator command; answered with `Output::AdminDone`.
    pub fn handle_admin(&mut self, now: Instant, id: AdminId, cmd: AdminCommand) {
        self.now = now;
        let result = self.admin(id, cmd);
        if let Err(e) = result {
            self.out.push_back(Output::AdminDone { id, result: Err(e) });
        }
    }

    fn admin(&mut self, id: AdminId, cmd: AdminCommand) -> Result<(), AdminError> {
        if let Some(f) = &self.failed {
            return Err(AdminError(format!("this node has failed: {f}")));
        }
        match cmd {
            AdminCommand::Promote {
                force,
                new_generation,
            } => self.promote(id, force, new_generation),
            AdminCommand::Demote { force } => {
                if self.wanted.role == Role::Secondary {
                    self.out.push_back(Output::AdminDone {
                        id,
                        result: Ok("already Secondary".into()),
                    });
                    return Ok(());
                }
                if self.demoting.is_some() {
                    return Err(AdminError(
                        "a demotion is already waiting for client requests to finish".into(),
                    ));
                }
                let busy = self.ops.iter().filter(|(_, op)| op.is_client()).count();
                if busy > 0 && !force {
                    return Err(AdminError(format!(
                        "{busy} client requests are in flight; disconnect the clients first, \
                         or pass --force"
                    )));
                }
                self.demoting = Some(id);
                if force {
                    // Requests not started yet (held by suspend-io or the
                    // overlap rule) fail; running ones finish first.
                    for op_id in self.ops.ids() {
                        if self.ops.is_active(op_id) {
                            continue;
                        }
                        if let Some(Op::ClientWrite { .. } | Op::ClientFlush { .. }) =
                            self.ops.get(op_id)
                        {
                            if let Some(Op::ClientWrite { req, .. } | Op::ClientFlush { req, .. }) =
                                self.ops.remove(op_id)
                            {
                                self.reply(req, Err(ReplyError::NotPrimary));
                            }
                        }
                    }
                    // Running ones held only by suspend-io would wait forever
                    // if the peer cannot return (e.g. it is Primary too):
                    // they finish on this node alone, which already recorded
                    // that the peer needs a sync. (Found by the simulator.)
                    if self.io_suspended {
                        self.io_suspended = false;
                        self.try_finish_all();
                    }
                }
                self.check_demote();
                Ok(())
            }
            AdminCommand::Verify => {
                let peer_ok = self.conn == ConnectionState::Connected
                    && self.peer.as_ref().is_some_and(|p| {
                        p.state.role == Role::Secondary
                            && p.state.disk == DiskState::UpToDate
                            && !p.behind
                    });
                if !self.serves_clients() || !peer_ok {
                    return Err(AdminError(
                        "verify runs on the Primary while it is connected to an UpToDate \
                         Secondary"
                            .into(),
                    ));
                }
                if self.sync.is_some() || self.verify.is_some() {
                    return Err(AdminError(
                        "a sync or a verify is running; wait for it to end".into(),
                    ));
                }
                self.verify = Some(VerifySource {
                    epoch: self.epoch,
                    next_offset: 0,
                    done_bytes: 0,
                    in_flight: 0,
                    started: self.now,
                    next_chunk_at: self.now,
                    result: VerifyResult {
                        checked_bytes: 0,
                        differing_blocks: 0,
                        ranges: Vec::new(),
                    },
                });
                tracing::info!(resource = %self.cfg.resource, "online verify starting");
                self.pump_verify();
                self.out.push_back(Output::AdminDone {
                    id,
                    result: Ok(
                        "verify started; `pairbd status` shows its progress and result".into(),
                    ),
                });
                Ok(())
            }
            AdminCommand::ResyncMarked => {
                let connected = self.conn == ConnectionState::Connected
                    && self
                        .peer
                        .as_ref()
                        .is_some_and(|p| p.state.role == Role::Secondary);
                if !self.serves_clients() || !connected {
                    return Err(AdminError(
                        "resync-marked runs on the Primary while it is connected to its \
                         Secondary (a reconnect repairs marked blocks too)"
                            .into(),
                    ));
                }
                if self.sync.is_some() || self.verify.is_some() {
                    return Err(AdminError(
                        "a sync or a verify is running; wait for it to end".into(),
                    ));
                }
                let dirty = self.bitmap.dirty_bytes();
                self.marked_held = false;
                let msg = if dirty == 0 {
                    "nothing is marked out of sync".to_string()
                } else {
                    self.maybe_start_sync();
                    format!("resync of {dirty} marked bytes started")
                };
                self.out.push_back(Output::AdminDone {
                    id,
                    result: Ok(msg),
                });
                Ok(())
            }
            AdminCommand::Invalidate => {
                if self.wanted.role == Role::Primary {
                    return Err(AdminError(
                        "this node is Primary: its data is the current copy; demote it first \
                         (`pairbd demote`), then invalidate it"
                            .into(),
                    ));
                }
                if self.sync_target.is_some() {
                    return Err(AdminError(
                        "a sync into this node is running: it is Inconsistent already and \
                         receives only what the source marked; wait for it to finish, then \
                         invalidate again"
                            .into(),
                    ));
                }
                // Every region counts as differing: the peer's next sync (its
                // union with this node's bitmap) copies the whole volume.
                self.bitmap.set_all();
                self.wanted.disk = DiskState::Inconsistent;
                let v = self.request_meta();
                self.defer(
                    v,
                    Deferred::Admin(
                        id,
                        "invalidated: this node is Inconsistent and receives a full sync from \
                         the Primary"
                            .into(),
                    ),
                );
                if self.conn == ConnectionState::Connected {
                    // A fresh hello carries the new bitmap and disk state.
                    self.drop_link("invalidated: reconnecting for a full sync".into());
                }
                Ok(())
            }
            AdminCommand::ConnectDiscardingMyData => {
                if self.wanted.role == Role::Primary {
                    return Err(AdminError(
                        "this node is Primary: its data cannot be discarded while it serves; \
                         demote it first (`pairbd demote`), then connect --discard-my-data"
                            .into(),
                    ));
                }
                self.discard_my_data = true;
                self.admin(id, AdminCommand::Connect)
            }
            AdminCommand::Connect => {
                let msg = if self.conn == ConnectionState::StandAlone {
                    self.conn = ConnectionState::Disconnected;
                    if self.handshake_deadline.take().is_some() {
                        self.out.push_back(Output::Disconnect {
                            reason: "leaving StandAlone: a fresh link follows".into(),
                        });
                    }
                    "left StandAlone: connecting to the peer"
                } else {
                    "not StandAlone"
                };
                self.out.push_back(Output::AdminDone {
                    id,
                    result: Ok(msg.into()),
                });
                Ok(())
            }
            AdminCommand::ResumeIo => {
                let msg = if self.io_suspended {
                    self.io_suspended = false;
                    self.try_finish_all();
                    "I/O resumed: writes proceed on this node alone"
                } else {
                    "I/O is not suspended"
                };
                self.out.push_back(Output::AdminDone {
                    id,
                    result: Ok(msg.into()),
                });
                Ok(())
            }
            AdminCommand::Shutdown => {
                // A node that came back from a crash as Primary keeps that
                // mark until a sync or a promotion settles it: its data may
                // differ from the peer's. (Found by the simulator.)
                let primary_on_disk = self.persisted.role == Role::Primary && !self.unclean_primary;
                if self.wanted.role == Role::Primary && self.demoting.is_none() {
                    // Leaves the role as a forced demotion does (the driver
                    // stopped serving; both stores flush first).
                    return self.admin(id, AdminCommand::Demote { force: true });
                } else if self.wanted.role == Role::Primary || primary_on_disk {
                    self.wanted.role = Role::Secondary;
                    let v = self.request_meta();
                    self.defer(v, Deferred::Admin(id, "stopped cleanly".into()));
                } else {
                    self.out.push_back(Output::AdminDone {
                        id,
                        result: Ok("stopped cleanly".into()),
                    });
                }
                Ok(())
            }
        }
    }

    /// Completes a demotion once no client request is left.
    fn check_demote(&mut self) {
        let Some(id) = self.demoting else { return };
        if self.ops.iter().any(|(_, op)| op.is_client()) {
            return;
        }
        // Writes not yet durable would be lost, unnoticed, by a power cut of
        // either node while both are Secondary (no transfer log then): both
        // stores flush once first. A link lost meanwhile marks "peer needs a
        // sync" as usual. (Found by the simulator.)
        if !self.leaving_flushed {
            self.leaving_flushed = true;
            let data = Op::ClientFlush {
                req: LEAVING_FLUSH,
                local_done: false,
                peer: PeerAck::NotNeeded,
            };
            let op = self.ops.insert(None, data);
            self.start_op(op);
            return;
        }
        self.demoting = None;
        match self.sync.take() {
            // SyncDone went out and its acknowledgement did not come yet: the
            // target may have taken this node's current generation, so the
            // two are on one line again, as `lose_peer` assumes too; without
            // this, a later write here would not begin a new generation and a
            // split brain would pass for "behind". (Found by the simulator.)
            Some(s) if s.phase == SyncPhase::DoneSent => self.rejoin_line(),
            Some(_) => {
                tracing::warn!(resource = %self.cfg.resource, "demoted during a full sync: the peer stays Inconsistent");
            }
            None => {}
        }
        if self.verify.take().is_some() {
            tracing::warn!(resource = %self.cfg.resource, "demoted during an online verify: it stops");
        }
        self.wanted.role = Role::Secondary;
        self.io_suspended = false;
        self.marked_held = false;
        // Both stores flushed and no client write is left: nothing the log
        // covers can differ any more.
        self.al.clear();
        let v = self.request_meta();
        self.defer(v, Deferred::SendState);
        self.defer(v, Deferred::Admin(id, "demoted to Secondary".into()));
    }

    fn promote(&mut self, id: AdminId, force: bool, new_generation: u64) -> Result<(), AdminError> {
        if self.wanted.role == Role::Primary {
            self.out.push_back(Output::AdminDone {
                id,
                result: Ok("already Primary".into()),
            });
            return Ok(());
        }
        if self.probe.is_some() {
            return Err(AdminError(
                "a promotion is already waiting for the peer's answer".into(),
            ));
        }
        if self.conn == ConnectionState::Handshaking {
            return Err(AdminError(
                "the link to the peer is being set up; retry in a moment".into(),
            ));
        }
        if self.conn == ConnectionState::Connected && self.peer_is_primary() {
            // It looks alive; ask. Silence within the probe timeout counts as
            // loss (handle_timeout), an answer as a refusal (probe_answered).
            let seq = self.next_ping;
            self.next_ping += 1;
            self.out.push_back(Output::Send(Message::Ping { seq }));
            self.probe = Some(Probe {
                admin: id,
                force,
                new_generation,
                seq,
                deadline: self.now + self.cfg.probe_timeout,
            });
            return Ok(());
        }
        self.check_promotable(force)?;
        self.become_primary(Some(id), force, new_generation);
        Ok(())
    }

    fn probe_answered(&mut self, p: Probe) {
        let result = if self.peer_is_primary() {
            let name = self
                .peer
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_default();
            Err(AdminError(format!(
                "the peer {name} is Primary and answered a probe: two Primaries would fork the \
                 data; demote {name} first (`pairbd demote` there), then promote this node"
            )))
        } else {
            self.check_promotable(p.force)
        };
        match result {
            Ok(()) => self.become_primary(Some(p.admin), p.force, p.new_generation),
            Err(e) => self.out.push_back(Output::AdminDone {
                id: p.admin,
                result: Err(e),
            }),
        }
    }

    /// The refusals of a promotion that no probe can change.
    fn check_promotable(&self, force: bool) -> Result<(), AdminError> {
        if self.sync_target.is_some() {
            return Err(AdminError(
                "this node is the target of a running sync: its data is Inconsistent until the \
                 sync ends; wait for it (`pairbd status` shows the progress)"
                    .into(),
            ));
        }
        if self.demoting.is_some() {
            return Err(AdminError("a demotion is running".into()));
        }
        if force {
            return Ok(());
        }
        let peer_name = self
            .peer
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_else(|| "the peer".into());
        match self.wanted.disk {
            DiskState::UpToDate => {}
            DiskState::Inconsistent => {
                return Err(AdminError(
                    "this node's disk is Inconsistent (never synced, or a sync into it did not \
                     finish): it holds no valid copy. Promote the node with the good data; on a \
                     new pair, or if this node's data must win anyway, pass --force"
                        .into(),
                ))
            }
            #[cfg(feature = "mutations")]
            DiskState::Outdated if self.mutated(Mutation::PromoteOutdated) => {}
            DiskState::Outdated => {
                return Err(AdminError(format!(
                    "this node's disk is Outdated: {peer_name} moved on without it. Promote \
                     {peer_name} (this node then syncs from it), or pass --force to make this \
                     node's older data the current copy"
                )))
            }
        }
        if self.conn != ConnectionState::Connected && !self.peer_lost_while_up {
            return Err(AdminError(format!(
                "this node started without its peer and cannot tell whether {peer_name} was \
                 promoted and wrote meanwhile; bring {peer_name} up (they connect and compare \
                 generations), or pass --force if {peer_name} is gone for good"
            )));
        }
        Ok(())
    }

    /// The promotion itself, once allowed. `admin`: who to answer (none for
    /// the automatic resumption after a crash).
    fn become_primary(&mut self, admin: Option<AdminId>, force: bool, new_generation: u64) {
        let mut msg = String::from("promoted to Primary");
        if force && self.wanted.disk != DiskState::UpToDate {
            msg.push_str(&format!(
                " (forced: this node's {:?} data is now the current copy)",
                self.wanted.disk
            ));
            if self.wanted.disk == DiskState::Inconsistent {
                // Whatever this node holds is now the data: no bitmap says
                // where the peer differs from it.
                self.bitmap.set_all();
            }
            self.wanted.disk = DiskState::UpToDate;
        }
        let current = self.wanted.current_generation;
        let connected_in_sync = self.conn == ConnectionState::Connected
            && self.peer.as_ref().is_some_and(|p| {
                p.state.generations.current == current
                    && p.state.disk == DiskState::UpToDate
                    && !p.behind
            });
        if self.wanted.current_generation == 0 || (force && !connected_in_sync) {
            // A forced promotion without a peer on the same line starts a new
            // generation at once: this node's data wins from here on.
            let mut g = self.wanted.generations();
            if g.current != 0 {
                if g.bitmap == 0 {
                    g.bitmap = g.current;
                } else {
                    g.history = [g.current, g.history[0]];
                }
            }
            g.current = new_generation.max(1);
            self.wanted.set_generations(g);
            msg.push_str(&format!(", new generation {:016X}", g.current));
        }
        if (force && !connected_in_sync) || self.unclean_primary {
            // This node's data wins: whatever the peer holds must be replaced.
            self.wanted.peer_sync_needed = true;
        }
        self.unclean_primary = false;
        // A node that serves is not one whose data the operator gave up.
        self.discard_my_data = false;
        self.wanted.role = Role::Primary;
        let v = self.request_meta();
        self.promotion_version = v;
        self.leaving_flushed = false;
        self.defer(v, Deferred::SendState);
        self.defer(v, Deferred::StartSync);
        if let Some(id) = admin {
            self.defer(v, Deferred::Admin(id, msg));
        }
    }
}

fn unreachable_flush() -> ! {
    // ClientWrite never holds a Flush: handle_client files flushes as
    // ClientFlush. Reaching this is a programming error.
    panic!("invariant broken: a flush filed as a client write")
}
