//! The replication wire format of pairbd, pure: typed messages between the two
//! nodes of a pair, and the frame codec that turns them into bytes and back.
//!
//! A frame is a fixed little-endian header (magic, version, kind, sequence,
//! offset, length, payload length, crc32c of the payload, crc32c of the header)
//! with its payload beside it. Data payloads (writes, sync chunks) are never
//! re-encoded: the codec checks their crc and hands them through as the caller's
//! buffer type `P`. Control payloads (hello, state) are postcard-encoded.
//!
//! Architecture invariant: no IO, no clock, no tokio or quinn. Any byte sequence
//! fed to the decoder yields a message or a `FrameError`, never a panic.

use serde::{Deserialize, Serialize};

mod codec;
pub use codec::*;

/// The role of a node, as DRBD names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Serves the volume to clients and replicates every write to the peer.
    Primary,
    /// Receives the primary's writes; serves no client.
    Secondary,
}

/// What a node knows about the quality of its own copy of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    /// Not a valid copy: fresh, or a sync into it has not completed.
    Inconsistent,
    /// A consistent but older copy: the peer moved on without it.
    Outdated,
    /// The current data.
    UpToDate,
}

/// The first message each side sends on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's node name from the configuration.
    pub node_name: String,
    /// The resource this connection replicates.
    pub resource: String,
    /// The usable size of the sender's data area, in bytes.
    pub size_bytes: u64,
    /// The sender's role, disk state and generation identifiers.
    pub state: NodeState,
    /// The sender, as primary, holds writes its peer may be missing and owes
    /// it a sync.
    pub peer_sync_needed: bool,
    /// The sender was primary and stopped without a clean demotion: writes may
    /// have been in flight, so its peer's copy may differ in those regions.
    pub unclean_primary: bool,
    /// The operator chose this node's data to be thrown away if the two
    /// nodes are found in split brain (`pairbd connect --discard-my-data`).
    pub discard_my_data: bool,
    /// Bytes the sender's dirty bitmap marks (0: it changed nothing the peer
    /// may lack — the case an automatic split-brain policy may resolve).
    pub dirty_bytes: u64,
}

/// A node's role, disk state and generation identifiers, sent on every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Primary or secondary.
    pub role: Role,
    /// The quality of the node's data.
    pub disk: DiskState,
    /// Which line of history the node's data belongs to.
    pub generations: Generations,
}

/// DRBD's generation identifiers: random numbers that name a line of history
/// of the data. Two nodes whose current identifiers match hold the same data
/// (up to what a sync repairs); a node whose bitmap or history identifier is
/// the other's current one moved on from it. 0 means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// The generation the node's data belongs to now.
    pub current: u64,
    /// The generation the node's data left when it began the current one
    /// without its peer (0 once the peer has caught up).
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

/// Part of the sender's dirty bitmap, as byte ranges `(offset, length)`
/// (so the two nodes may use different granularities). Each side sends its
/// whole bitmap right after its hello, in batches of at most
/// [`DIRTY_RANGES_MAX`] ranges; the batch with `last` set ends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRanges {
    /// Regions where the sender's data may differ from the receiver's.
    pub ranges: Vec<(u64, u64)>,
    /// The sender's bitmap is complete with this batch.
    pub last: bool,
}

/// The most ranges one `DirtyRanges` message carries (postcard needs at most
/// 20 bytes a range: well inside the control payload limit).
pub const DIRTY_RANGES_MAX: usize = 2048;

/// The answer to `VerifyRequest`: crc32c of each 4096-byte block of the
/// range as the secondary's store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReply {
    /// The request's sequence number.
    pub seq: u64,
    /// One crc32c per block, in order.
    pub crcs: Vec<u32>,
}

/// Acknowledgements of several writes in one message: every write, trim,
/// write-zeroes or sync chunk named reached the secondary's store (durably
/// if it was sent with FUA), exactly as that many `Ack`s would say.
///
/// The sequence numbers are strictly increasing (so each batch has one
/// encoding and none is named twice), at least 2 (one goes as `Ack`) and at
/// most [`ACKS_MAX`]. They need not be contiguous: writes complete out of
/// order on the secondary, so a batch is a set, never "everything below".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckBatch {
    /// The acknowledged sequence numbers, strictly increasing.
    pub seqs: Vec<u64>,
}

/// The most acknowledgements one `Acks` message carries (postcard needs at
/// most 10 bytes a sequence number: well inside the control payload limit).
pub const ACKS_MAX: usize = 1024;

impl AckBatch {
    /// Why the batch is not one the protocol allows, if it is not.
    pub fn problem(&self) -> Option<String> {
        let n = self.seqs.len();
        if n < 2 {
            return Some(format!("{n} sequence numbers (a batch has at least 2)"));
        }
        if n > ACKS_MAX {
            return Some(format!("{n} sequence numbers (limit {ACKS_MAX})"));
        }
        if let Some(w) = self.seqs.windows(2).find(|w| w[0] >= w[1]) {
            return Some(format!(
                "sequence numbers not strictly increasing ({} then {})",
                w[0], w[1]
            ));
        }
        None
    }
}

/// Bytes per checksum of online verify.
pub const VERIFY_BLOCK_BYTES: u64 = 4096;
/// The longest range one `VerifyRequest` may ask for (its reply's crcs fit
/// the control payload limit).
pub const VERIFY_MAX_BYTES: u64 = 8 << 20;

/// One replication message. `P` is the caller's payload buffer type.
///
/// Sequence numbers are assigned by the primary, one counter for every message
/// that carries one, strictly increasing per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<P> {
    /// Opens a connection (both directions).
    Hello(Hello),
    /// The sender's role or disk state changed.
    State(NodeState),
    /// Primary → secondary: write `payload` at `offset`; `fua`: durable before
    /// the acknowledgement.
    Write {
        seq: u64,
        offset: u64,
        payload: P,
        fua: bool,
    },
    /// Primary → secondary: discard (punch a hole; reads back zeroes).
    Trim { seq: u64, offset: u64, length: u64 },
    /// Primary → secondary: write zeroes; `no_hole`: keep it allocated.
    WriteZeroes {
        seq: u64,
        offset: u64,
        length: u64,
        no_hole: bool,
    },
    /// Primary → secondary: make durable every write numbered below `seq`.
    Flush { seq: u64 },
    /// Secondary → primary: the write, trim, write-zeroes or sync chunk `seq`
    /// reached the secondary's store (durably if it was sent with FUA).
    Ack { seq: u64 },
    /// Secondary → primary: `Ack` for each sequence number of the batch
    /// (acknowledgements that became due together travel in one message).
    Acks(AckBatch),
    /// Secondary → primary: every write numbered below `seq` is durable.
    FlushAck { seq: u64 },
    /// Primary → secondary: a full sync begins; become Inconsistent first.
    SyncStart { total_bytes: u64 },
    /// Secondary → primary: Inconsistent is on disk; send the chunks.
    SyncReady,
    /// Primary → secondary: one chunk of the full sync.
    SyncData { seq: u64, offset: u64, payload: P },
    /// Primary → secondary: every chunk was sent; flush, then become UpToDate.
    SyncDone { seq: u64 },
    /// Secondary → primary: the sync is durable and UpToDate is on disk.
    SyncDoneAck { seq: u64 },
    /// Either way: are you there? Answered with `Pong` carrying the same `seq`
    /// (a promotion probes a peer that looks connected and Primary).
    Ping { seq: u64 },
    /// The answer to `Ping`.
    Pong { seq: u64 },
    /// Either way, after the hello: a batch of the sender's dirty regions.
    DirtyRanges(DirtyRanges),
    /// Primary → secondary (online verify): read this range after every
    /// earlier write to it and answer with its blocks' checksums.
    VerifyRequest { seq: u64, offset: u64, length: u64 },
    /// Secondary → primary: the checksums of `VerifyRequest` `seq`.
    VerifyReply(VerifyReply),
}

/// Which of the link's two streams a message travels on. Messages of one
/// lane arrive in the order they were sent; the lanes overtake each other.
/// Only client writes of at least the sender's `bulk-lane-bytes` take the
/// bulk lane (so a 1 MiB write does not hold up the small writes, acks and
/// flushes behind it); everything else keeps the main lane's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The ordered stream every message may take.
    Main,
    /// The stream of large client writes (lower priority).
    Bulk,
}

impl<P: AsRef<[u8]>> Message<P> {
    /// The lane this message takes when writes of at least `bulk_min` bytes
    /// go on the bulk lane (`0`: no bulk lane, everything on the main one).
    pub fn lane(&self, bulk_min: u64) -> Lane {
        match self {
            Message::Write { payload, .. }
                if bulk_min > 0 && payload.as_ref().len() as u64 >= bulk_min =>
            {
                Lane::Bulk
            }
            _ => Lane::Main,
        }
    }
}

impl<P> Message<P> {
    /// The data payload of a write or sync chunk (sent beside the header as
    /// it is); `None` for every other kind.
    pub fn data_payload(&self) -> Option<&P> {
        match self {
            Message::Write { payload, .. } | Message::SyncData { payload, .. } => Some(payload),
            _ => None,
        }
    }

    /// The sequence numbers an `Ack` or `Acks` acknowledges; `None` for
    /// every other kind.
    pub fn acked_seqs(&self) -> Option<&[u64]> {
        match self {
            Message::Ack { seq } => Some(std::slice::from_ref(seq)),
            Message::Acks(b) => Some(&b.seqs),
            _ => None,
        }
    }

    /// Folds the acknowledgement of write `seq` into this `Ack` or `Acks`
    /// (an `Ack` becomes an `Acks`), keeping the batch valid. False, and
    /// nothing changed, if this is another kind, the batch is full
    /// ([`ACKS_MAX`]) or already names `seq`.
    pub fn absorb_ack(&mut self, seq: u64) -> bool {
        match self {
            Message::Ack { seq: first } => {
                if *first == seq {
                    return false;
                }
                let seqs = if *first < seq {
                    vec![*first, seq]
                } else {
                    vec![seq, *first]
                };
                *self = Message::Acks(AckBatch { seqs });
                true
            }
            Message::Acks(b) => {
                if b.seqs.len() >= ACKS_MAX {
                    return false;
                }
                match b.seqs.binary_search(&seq) {
                    Ok(_) => false,
                    Err(at) => {
                        b.seqs.insert(at, seq);
                        true
                    }
                }
            }
            _ => false,
        }
    }

    /// Folds every acknowledgement of `other` (an `Ack` or `Acks`) into this
    /// `Ack` or `Acks`, if all of them fit one valid batch; false, and
    /// nothing changed, otherwise. The driver uses it to merge acks already
    /// queued side by side for the link.
    pub fn absorb_acks(&mut self, other: &Message<P>) -> bool {
        let (Some(mine), Some(theirs)) = (self.acked_seqs(), other.acked_seqs()) else {
            return false;
        };
        // Both sides are valid batches (sorted, no duplicate): all of
        // `theirs` joins, or nothing changes.
        if mine.len() + theirs.len() > ACKS_MAX
            || theirs.iter().any(|s| mine.binary_search(s).is_ok())
        {
            return false;
        }
        // In place: the link writer folds acks one frame at a time, so the
        // batch is not rebuilt for each.
        for &seq in theirs {
            let folded = self.absorb_ack(seq);
            debug_assert!(folded, "checked above: {seq} fits and is new");
        }
        true
    }

    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::State(_) => "state",
            Message::Write { .. } => "write",
            Message::Trim { .. } => "trim",
            Message::WriteZeroes { .. } => "write-zeroes",
            Message::Flush { .. } => "flush",
            Message::Ack { .. } => "ack",
            Message::Acks(_) => "acks",
            Message::FlushAck { .. } => "flush-ack",
            Message::SyncStart { .. } => "sync-start",
            Message::SyncReady => "sync-ready",
            Message::SyncData { .. } => "sync-data",
            Message::SyncDone { .. } => "sync-done",
            Message::SyncDoneAck { .. } => "sync-done-ack",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::DirtyRanges(_) => "dirty-ranges",
            Message::VerifyRequest { .. } => "verify-request",
            Message::VerifyReply(_) => "verify-reply",
        }
    }
}
