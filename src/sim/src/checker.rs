//! The checkers: a model of what each node's store must hold, built only from
//! what clients were told and from the faults the simulator injected — never
//! from the core's own bookkeeping — and compared with the stores.
//!
//! Every write (and trim) gets an id; each block keeps the ids of the writes
//! that touched it in the order the core received them. For each node and
//! block the model keeps `hold`, the oldest position in that list the node's
//! cached block may show (it may show that write or any later one: a write
//! in flight may or may not have landed), and `dhold`, the same for what a
//! power cut must leave.
//!
//! - A write acknowledged while the pair was replicating (Connected, no sync
//!   owed) raises `hold` on both nodes — at that moment, and checked then,
//!   both stores must have it (protocol C). Acknowledged with the peer away,
//!   it raises only the acknowledging node's `hold`, and if the peer's store
//!   lacks it, that node has *diverged*: its data left the peer's line.
//! - FUA raises `dhold`; a completed FLUSH raises `dhold` to the `hold` of
//!   the moment it was submitted, on every node that took part — and the
//!   durable layers are checked then.
//! - A power cut (or a failed flush: the kernel dropped the dirty pages)
//!   lowers `hold` to `dhold`: unflushed writes may go, nothing older
//!   reappears (invariant 2).
//! - A finished full sync gives the target everything the source held when
//!   it sent SyncDone, durably; the nodes are one line again.
//! - A promotion without --force checks the new primary against its `hold`
//!   (invariant 1: it holds every write acknowledged while both had it,
//!   unless it lost power since: then, like a disk after a power cut, the
//!   volume may roll back to what was flushed). What the other node held
//!   beyond that, and did not hold alone, is given up with the roll-back.
//! - A forced promotion, and an operator discarding a node's data, restart
//!   the model from the state the operator chose.
//!
//! Beside the model: invariant 3 compares the stores whenever the pair is
//! in service and at rest; invariant 4 flags two diverged nodes that connect
//! instead of going StandAlone; invariant 5 checks every promotion without
//! --force; invariant 6 is the liveness phase's deadline (in `world`).

use std::collections::BTreeMap;

use crate::content::{decode, Content};
use crate::store::SimStore;

/// A broken invariant: the first one a run meets ends it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Invariants 1 and 2: a block holds less than it must.
    #[error(
        "acknowledged write lost (invariant {invariant}): node {node} block {block} holds \
         {found}, but must hold write #{required} or a later one — {context}"
    )]
    LostWrite {
        invariant: u8,
        node: usize,
        block: usize,
        found: String,
        required: u64,
        context: String,
    },
    /// Invariant 3: the pair says it is in sync and is not.
    #[error(
        "silent divergence (invariant 3): both nodes Connected and UpToDate, {blocks} block(s) \
         differ; first: block {first} holds {a} on node 0 and {b} on node 1"
    )]
    Divergence {
        blocks: usize,
        first: usize,
        a: String,
        b: String,
    },
    /// Invariant 4: both changed the data apart and were joined anyway, or a
    /// sync overwrote data no operator gave up.
    #[error("undetected split brain (invariant 4): {0}")]
    UndetectedSplitBrain(String),
    /// Invariant 5.
    #[error(
        "unsafe promotion (invariant 5): node {node} became Primary without --force while {disk}"
    )]
    UnsafePromotion { node: usize, disk: String },
    /// Invariant 6.
    #[error("liveness (invariant 6): {0}")]
    Liveness(String),
    /// Online verify reported a block that nobody corrupted (a write in
    /// flight, say), or missed one that differs.
    #[error("online verify: {0}")]
    Verify(String),
    /// The core stopped although the simulator injected no fault.
    #[error("node {node} fail-stopped without an injected fault: {reason}")]
    CoreFailStop { node: usize, reason: String },
    /// The core panicked.
    #[error("the core panicked: {0}")]
    Panic(String),
    /// The core broke the driver contract (e.g. answered a request twice).
    #[error("driver contract broken: {0}")]
    Contract(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Pending,
    Acked,
    Refused,
    Failed,
}

#[derive(Debug, Clone)]
struct WriteRec {
    zero: bool,
    first_block: usize,
    /// Position in each touched block's list, in block order.
    positions: Vec<usize>,
    fua: bool,
    /// The nodes' power epochs and the model epoch when it was submitted.
    power: [u64; 2],
    reset: u64,
    state: WriteState,
}

impl WriteRec {
    fn position(&self, block: usize) -> Option<usize> {
        block
            .checked_sub(self.first_block)
            .and_then(|k| self.positions.get(k).copied())
    }
}

/// What a flush must make durable, taken when it was submitted.
#[derive(Debug, Clone)]
pub struct FlushSnapshot {
    hold: [Vec<usize>; 2],
    power: [u64; 2],
    reset: u64,
}

/// What a read may return, taken when it was submitted.
#[derive(Debug, Clone, Copy)]
pub struct ReadSnapshot {
    node: usize,
    block: usize,
    min: usize,
    power: u64,
    reset: u64,
}

impl ReadSnapshot {
    /// The block read.
    pub fn block(&self) -> usize {
        self.block
    }
}

#[derive(Debug, Clone)]
struct SyncSnapshot {
    hold: Vec<usize>,
    power: [u64; 2],
    reset: u64,
}

/// Counts for the run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckerCounts {
    /// Writes acknowledged to a client.
    pub writes_acked: u64,
    /// Acknowledged writes some check found where they had to be.
    pub acked_writes_checked: u64,
    /// Client reads checked against the model.
    pub reads_checked: u64,
    /// Flushes acknowledged to a client.
    pub flushes_acked: u64,
}

/// The model (see the module documentation).
pub struct Checker {
    blocks: usize,
    writes: Vec<WriteRec>,
    /// Per block, write ids in the order the cores received them; position 0
    /// is the initial zeroes (write id 0).
    log: Vec<Vec<u64>>,
    hold: [Vec<usize>; 2],
    dhold: [Vec<usize>; 2],
    /// Whether `hold[n][b]` came from a write only node `n` had.
    alone: [Vec<bool>; 2],
    diverged: [bool; 2],
    power: [u64; 2],
    reset: u64,
    flushes: BTreeMap<u64, FlushSnapshot>,
    sync: [Option<SyncSnapshot>; 2],
    verified: Vec<bool>,
    /// Blocks the simulator corrupted on purpose (the online-verify
    /// scenario): while a node's block holds exactly that corruption, it is
    /// no lost write (the fault destroyed it), on either node (a failover
    /// or a resync may carry it over). The whole-store comparison at the end
    /// makes no exception: verify and resync-marked must have repaired it.
    injected: Vec<bool>,
    counts: CheckerCounts,
}

fn describe(c: Content) -> String {
    match c {
        Content::Zero => "zeroes".into(),
        Content::Write(id) => format!("write #{id}"),
        Content::Injected => "the simulator's injected corruption".into(),
        Content::Garbage => "bytes no write put there".into(),
    }
}

impl Checker {
    /// A model of two zeroed stores of `blocks` blocks.
    pub fn new(blocks: usize) -> Checker {
        Checker {
            blocks,
            writes: vec![WriteRec {
                zero: true,
                first_block: 0,
                positions: vec![0; blocks],
                fua: false,
                power: [0; 2],
                reset: 0,
                state: WriteState::Acked,
            }],
            log: vec![vec![0]; blocks],
            hold: [vec![0; blocks], vec![0; blocks]],
            dhold: [vec![0; blocks], vec![0; blocks]],
            alone: [vec![false; blocks], vec![false; blocks]],
            diverged: [false; 2],
            power: [0; 2],
            reset: 0,
            flushes: BTreeMap::new(),
            sync: [None, None],
            verified: vec![false],
            injected: vec![false; blocks],
            counts: CheckerCounts::default(),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> CheckerCounts {
        self.counts
    }

    /// Whether node `n` changed the data without its peer since they were last
    /// one line.
    pub fn diverged(&self, n: usize) -> bool {
        self.diverged[n]
    }

    /// Whether node `n` holds a block whose acknowledged write only it has
    /// (a divergence by writes, not only declared by a forced promotion).
    pub fn changed_alone(&self, n: usize) -> bool {
        self.alone[n].iter().any(|&a| a)
    }

    /// The blocks write `id` touches: (first, count).
    pub fn write_blocks(&self, id: u64) -> Option<(usize, usize)> {
        self.writes
            .get(id as usize)
            .map(|w| (w.first_block, w.positions.len()))
    }

    /// The id the next write will get.
    pub fn next_write_id(&self) -> u64 {
        self.writes.len() as u64
    }

    /// A write (or, `zero`, a trim or write-zeroes) of `count` blocks from
    /// `first` reaches a core; returns its id.
    pub fn submit_write(&mut self, first: usize, count: usize, zero: bool, fua: bool) -> u64 {
        let id = self.writes.len() as u64;
        let mut positions = Vec::with_capacity(count);
        for b in first..first + count {
            positions.push(self.log[b].len());
            self.log[b].push(id);
        }
        self.writes.push(WriteRec {
            zero,
            first_block: first,
            positions,
            fua,
            power: self.power,
            reset: self.reset,
            state: WriteState::Pending,
        });
        self.verified.push(false);
        id
    }

    fn content_ok(&self, block: usize, content: Content, min: usize) -> bool {
        match content {
            Content::Write(id) => self
                .writes
                .get(id as usize)
                .and_then(|w| w.position(block))
                .is_some_and(|p| p >= min && self.log[block].get(p) == Some(&id)),
            Content::Zero => self.log[block][min.min(self.log[block].len())..]
                .iter()
                .any(|id| self.writes[*id as usize].zero),
            Content::Injected => self.injected[block],
            Content::Garbage => false,
        }
    }

    /// Whether the simulator corrupted `block` (on either node) in this run.
    pub fn was_corrupted(&self, block: usize) -> bool {
        self.injected[block]
    }

    /// The simulator corrupts `block` on a node's store on purpose.
    pub fn corrupted(&mut self, block: usize) {
        self.injected[block] = true;
    }

    /// The list position of what a block holds (for a reset).
    fn position_of(&self, block: usize, content: Content) -> usize {
        match content {
            Content::Write(id) => self
                .writes
                .get(id as usize)
                .and_then(|w| w.position(block))
                .unwrap_or(0),
            Content::Zero | Content::Injected | Content::Garbage => self.log[block]
                .iter()
                .rposition(|id| self.writes[*id as usize].zero)
                .unwrap_or(0),
        }
    }

    fn lost(
        &self,
        invariant: u8,
        node: usize,
        block: usize,
        found: Content,
        min: usize,
        context: &str,
    ) -> Violation {
        Violation::LostWrite {
            invariant,
            node,
            block,
            found: describe(found),
            required: self.log[block][min],
            context: context.into(),
        }
    }

    fn mark_verified(&mut self, block: usize, min: usize) {
        let id = self.log[block][min] as usize;
        if id != 0 && !self.verified[id] && self.writes[id].state == WriteState::Acked {
            self.verified[id] = true;
            self.counts.acked_writes_checked += 1;
        }
    }

    /// Checks node `n`'s cached blocks against its `hold`.
    pub fn check_node(
        &mut self,
        n: usize,
        store: &SimStore,
        invariant: u8,
        context: &str,
    ) -> Result<(), Violation> {
        for b in 0..self.blocks {
            let c = decode(store.cached(b), b as u64);
            let min = self.hold[n][b];
            if !self.content_ok(b, c, min) {
                return Err(self.lost(invariant, n, b, c, min, context));
            }
            self.mark_verified(b, min);
        }
        Ok(())
    }

    /// A write was answered with success by node `n`. `replicated`: the
    /// node's status then said Connected with no sync owed.
    pub fn write_acked(
        &mut self,
        id: u64,
        n: usize,
        replicated: bool,
        stores: [&SimStore; 2],
    ) -> Result<(), Violation> {
        let s = 1 - n;
        let Some(w) = self.writes.get_mut(id as usize) else {
            return Err(Violation::Contract(format!(
                "reply for unknown write #{id}"
            )));
        };
        w.state = WriteState::Acked;
        let w = w.clone();
        self.counts.writes_acked += 1;
        let peer_counts = replicated && w.power[s] == self.power[s] && w.reset == self.reset;
        for (k, &pos) in w.positions.iter().enumerate() {
            let b = w.first_block + k;
            let local = decode(stores[n].cached(b), b as u64);
            if !self.content_ok(b, local, pos) {
                return Err(self.lost(
                    1,
                    n,
                    b,
                    local,
                    pos,
                    "answered before the local store completed it",
                ));
            }
            raise(&mut self.hold[n][b], pos);
            if w.fua {
                let d = decode(stores[n].durable(b), b as u64);
                if !self.content_ok(b, d, pos) {
                    return Err(self.lost(2, n, b, d, pos, "FUA write answered, not durable"));
                }
                raise(&mut self.dhold[n][b], pos);
            }
            let on_peer = decode(stores[s].cached(b), b as u64);
            if peer_counts {
                if !self.content_ok(b, on_peer, pos) {
                    return Err(self.lost(
                        1,
                        s,
                        b,
                        on_peer,
                        pos,
                        "answered while replicating, but the peer's store does not hold it \
                         (protocol C)",
                    ));
                }
                raise(&mut self.hold[s][b], pos);
                self.alone[n][b] = false;
                self.alone[s][b] = false;
                if w.fua {
                    let d = decode(stores[s].durable(b), b as u64);
                    if !self.content_ok(b, d, pos) {
                        return Err(self.lost(
                            2,
                            s,
                            b,
                            d,
                            pos,
                            "FUA write answered while replicating, not durable on the peer",
                        ));
                    }
                    raise(&mut self.dhold[s][b], pos);
                }
            } else if !replicated
                && w.power[s] == self.power[s]
                && !self.content_ok(b, on_peer, pos)
            {
                // (If the peer lost power since, it may have had the write:
                // no telling, so no claim.)
                self.alone[n][b] = true;
                self.diverged[n] = true;
            }
        }
        Ok(())
    }

    /// A write was refused before it started (never applied).
    pub fn write_refused(&mut self, id: u64) {
        if let Some(w) = self.writes.get_mut(id as usize) {
            w.state = WriteState::Refused;
        }
    }

    /// A write failed (it may or may not have been applied).
    pub fn write_failed(&mut self, id: u64) {
        if let Some(w) = self.writes.get_mut(id as usize) {
            w.state = WriteState::Failed;
        }
    }

    /// A client flush (request `req`) reaches a core.
    pub fn submit_flush(&mut self, req: u64) {
        self.flushes.insert(
            req,
            FlushSnapshot {
                hold: self.hold.clone(),
                power: self.power,
                reset: self.reset,
            },
        );
    }

    /// The flush `req` ended (`ok`: with success) on node `n`.
    pub fn flush_done(
        &mut self,
        req: u64,
        n: usize,
        ok: bool,
        replicated: bool,
        stores: [&SimStore; 2],
    ) -> Result<(), Violation> {
        let Some(snap) = self.flushes.remove(&req) else {
            return Err(Violation::Contract(format!(
                "reply for unknown flush {req}"
            )));
        };
        if !ok {
            return Ok(());
        }
        self.counts.flushes_acked += 1;
        let mut covered = vec![n];
        if replicated {
            covered.push(1 - n);
        }
        for m in covered {
            if snap.power[m] != self.power[m] || snap.reset != self.reset {
                continue;
            }
            for b in 0..self.blocks {
                let want = snap.hold[m][b];
                let d = decode(stores[m].durable(b), b as u64);
                if !self.content_ok(b, d, want) {
                    let what = if m == n {
                        "flush answered, but this node's durable layer lacks it"
                    } else {
                        "flush answered while replicating, but the peer's durable layer lacks it"
                    };
                    return Err(self.lost(2, m, b, d, want, what));
                }
                raise(&mut self.dhold[m][b], want);
            }
        }
        Ok(())
    }

    /// A flush that will never be answered (its node died).
    pub fn flush_dropped(&mut self, req: u64) {
        self.flushes.remove(&req);
    }

    /// A client read of `block` on node `n` starts.
    pub fn read_started(&self, n: usize, block: usize) -> ReadSnapshot {
        ReadSnapshot {
            node: n,
            block,
            min: self.hold[n][block],
            power: self.power[n],
            reset: self.reset,
        }
    }

    /// The read returned `bytes`.
    pub fn read_done(&mut self, snap: ReadSnapshot, bytes: &[u8]) -> Result<(), Violation> {
        if snap.power != self.power[snap.node] || snap.reset != self.reset {
            return Ok(());
        }
        let c = decode(bytes, snap.block as u64);
        if !self.content_ok(snap.block, c, snap.min) {
            return Err(self.lost(
                1,
                snap.node,
                snap.block,
                c,
                snap.min,
                "a client read returned an older block",
            ));
        }
        self.counts.reads_checked += 1;
        Ok(())
    }

    /// Node `n` lost its cache (power cut, or the kernel dropped dirty pages
    /// after a failed flush); the store already shows it.
    pub fn cache_lost(
        &mut self,
        n: usize,
        store: &SimStore,
        context: &str,
    ) -> Result<(), Violation> {
        self.power[n] += 1;
        self.hold[n] = self.dhold[n].clone();
        self.alone[n] = vec![false; self.blocks];
        self.check_node(n, store, 2, context)
    }

    /// Node `n` was promoted without --force: it holds what it must, and what
    /// the other node held beyond that with it (not alone) is given up.
    pub fn promoted(&mut self, n: usize, stores: [&SimStore; 2]) -> Result<(), Violation> {
        self.check_node(n, stores[n], 1, "promoted without --force")?;
        let y = 1 - n;
        for b in 0..self.blocks {
            if self.hold[y][b] > self.hold[n][b] && !self.alone[y][b] {
                self.hold[y][b] = self.hold[n][b];
                lower(&mut self.dhold[y][b], self.hold[y][b]);
            }
        }
        Ok(())
    }

    /// Node `n` was promoted with --force: its data is the truth from here
    /// on; `new_line`: it began a new generation (a declared divergence).
    /// `in_flight`: blocks a write already issued to this node's disk will
    /// still change (e.g. a chunk of an interrupted sync on a stalled disk):
    /// part of what the operator chose, so no baseline there.
    pub fn forced(&mut self, n: usize, stores: [&SimStore; 2], new_line: bool, in_flight: &[bool]) {
        self.reset += 1;
        let y = 1 - n;
        for (b, &writing) in in_flight.iter().enumerate().take(self.blocks) {
            let at = if writing {
                0
            } else {
                self.position_of(b, decode(stores[n].cached(b), b as u64))
            };
            self.hold[n][b] = at;
            lower(&mut self.dhold[n][b], at);
            lower(&mut self.hold[y][b], at);
            let h = self.hold[y][b];
            lower(&mut self.dhold[y][b], h);
            self.alone[n][b] = false;
            self.alone[y][b] = false;
        }
        // The operator chose this node's data: what only the other node had
        // is given up by that choice (until it changes data apart again).
        self.diverged[y] = false;
        if new_line {
            self.diverged[n] = true;
        }
    }

    /// The operator gave up node `n`'s data (create-md on the split brain's
    /// victim): it must hold nothing until synced.
    pub fn discarded(&mut self, n: usize) {
        self.reset += 1;
        self.hold[n] = vec![0; self.blocks];
        self.dhold[n] = vec![0; self.blocks];
        self.alone[n] = vec![false; self.blocks];
        self.diverged[n] = false;
    }

    /// Node `source` sent SyncDone: the target will hold at least this.
    pub fn sync_done_sent(&mut self, source: usize) {
        self.sync[1 - source] = Some(SyncSnapshot {
            hold: self.hold[source].clone(),
            power: self.power,
            reset: self.reset,
        });
    }

    /// The source received SyncDoneAck: the target holds, durably, what the
    /// source held at SyncDone; the two are one line again.
    pub fn sync_finished(
        &mut self,
        source: usize,
        stores: [&SimStore; 2],
    ) -> Result<(), Violation> {
        let t = 1 - source;
        // Whatever only one of them had is now on both, or was overwritten
        // (which the check below catches).
        self.diverged = [false; 2];
        let Some(snap) = self.sync[t].take() else {
            return Ok(());
        };
        // The source may lose power after SyncDone: the target has it all.
        if snap.power[t] != self.power[t] || snap.reset != self.reset {
            return Ok(());
        }
        for b in 0..self.blocks {
            let want = snap.hold[b];
            let d = decode(stores[t].durable(b), b as u64);
            if !self.content_ok(b, d, want) {
                return Err(self.lost(
                    2,
                    t,
                    b,
                    d,
                    want,
                    "full sync finished, but the target's durable layer lacks it",
                ));
            }
            let cached = decode(stores[t].cached(b), b as u64);
            if !self.content_ok(b, cached, self.hold[t][b]) {
                return Err(Violation::UndetectedSplitBrain(format!(
                    "a full sync from node {source} overwrote block {b} of node {t}, which had to \
                     hold write #{} (it holds {}), and no operator gave that data up",
                    self.log[b][self.hold[t][b]],
                    describe(cached)
                )));
            }
            raise(&mut self.hold[t][b], want);
            raise(&mut self.dhold[t][b], want);
            self.alone[t][b] = false;
            self.alone[source][b] = false;
        }
        self.check_node(t, stores[t], 1, "after a full sync")
    }

    /// What block `b` of `store` holds, described for a report.
    pub fn describe_block(store: &SimStore, b: usize) -> String {
        describe(decode(store.cached(b), b as u64))
    }
}

fn raise(slot: &mut usize, to: usize) {
    *slot = (*slot).max(to);
}

fn lower(slot: &mut usize, to: usize) {
    *slot = (*slot).min(to);
}
