//! The clients and the shape of a run: each seed draws its own profile
//! (swarm testing: some runs hammer one fault, some have none of it), and a
//! few clients issue writes, FUA writes, reads, flushes, trims and
//! write-zeroes over a small hot set of blocks to whichever node the
//! operator attached them to.

use pairbd_repl_core::{AfterCrash, AfterSplitBrain, ClientOp, OnPeerLoss};

use crate::checker::ReadSnapshot;
use crate::content::{encode, BLOCK_BYTES};
use crate::rng::Rng;
use crate::world::{Event, Phase, ReqKind, Sim};

/// Client operations, in the order of `Profile::ops`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    FuaWrite,
    Read,
    Flush,
    Trim,
    WriteZeroes,
}

const OPS: [Op; 6] = [
    Op::Write,
    Op::FuaWrite,
    Op::Read,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
];

/// The faults and operator actions of the safety phase, in the order of
/// `Profile::faults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    CutLink,
    FullPartition,
    OneWayPartition,
    DelaySpike,
    EioOnWrite,
    EioOnFlush,
    DiskStall,
    Kill,
    PowerCut,
    PowerCutBoth,
    CleanRestart,
    Switchover,
    Failover,
    ForcedPromotion,
    Promote,
    Demote,
    Connect,
    ResumeIo,
    /// The clients pause (a quiet spell: faults then strike with nothing in
    /// flight).
    Lull,
}

/// Every action, in weight order.
pub const ACTIONS: [Action; 19] = [
    Action::CutLink,
    Action::FullPartition,
    Action::OneWayPartition,
    Action::DelaySpike,
    Action::EioOnWrite,
    Action::EioOnFlush,
    Action::DiskStall,
    Action::Kill,
    Action::PowerCut,
    Action::PowerCutBoth,
    Action::CleanRestart,
    Action::Switchover,
    Action::Failover,
    Action::ForcedPromotion,
    Action::Promote,
    Action::Demote,
    Action::Connect,
    Action::ResumeIo,
    Action::Lull,
];

/// What one seed's run looks like.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Blocks in the volume.
    pub blocks: usize,
    /// Most operations go to the first `hot_blocks` blocks.
    pub hot_blocks: usize,
    /// Full-sync chunk size, in blocks.
    pub sync_chunk_blocks: usize,
    /// Full-sync chunks in flight.
    pub sync_window: usize,
    /// The primary's policy while its peer is away.
    pub on_peer_loss: OnPeerLoss,
    /// What a crashed primary does when it starts again.
    pub after_crash: AfterCrash,
    /// Whether a split brain with one side unchanged resolves itself.
    pub after_split_brain: AfterSplitBrain,
    /// The sync rate limit (a simulated volume of 32 KiB takes 125 ms at
    /// 256 KiB/s: the pacing timer runs, the liveness phase still ends).
    pub sync_rate_bytes_per_sec: Option<u64>,
    /// Bytes per activity-log extent (2 to 8 blocks: several extents in the
    /// simulated volume).
    pub al_extent_bytes: u64,
    /// Extents the activity log holds (small: eviction and a full log are
    /// common).
    pub al_extents: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests in flight per client, at most.
    pub max_depth: u64,
    /// A client's pause between requests, at most (µs).
    pub think_us: u64,
    /// Weights of the client operations (see `OPS`).
    pub ops: [u64; 6],
    /// Weights of the safety phase's actions (see `ACTIONS`).
    pub faults: [u64; 19],
    /// Mean pause between two actions (µs).
    pub chaos_mean_us: u64,
}

impl Profile {
    /// Draws a profile.
    pub fn draw(rng: &mut Rng) -> Profile {
        let blocks = [16, 32, 64][rng.below(3) as usize];
        let base_faults: [u64; 19] = [6, 3, 3, 4, 2, 2, 2, 2, 2, 1, 2, 3, 3, 1, 3, 2, 2, 1, 3];
        let mut faults = base_faults;
        // Swarm testing: each action is left out of some runs entirely, and
        // made ten times as likely in others.
        for w in faults.iter_mut() {
            match rng.below(6) {
                0 => *w = 0,
                1 => *w *= 10,
                _ => {}
            }
        }
        if faults.iter().all(|w| *w == 0) {
            faults[0] = 1;
        }
        let mut p = Profile {
            blocks,
            hot_blocks: rng.between(2, (blocks / 2) as u64) as usize,
            sync_chunk_blocks: [1, 4, 8][rng.below(3) as usize],
            sync_window: rng.between(1, 4) as usize,
            on_peer_loss: if rng.percent(25) {
                OnPeerLoss::SuspendIo
            } else {
                OnPeerLoss::Continue
            },
            after_crash: if rng.percent(15) {
                AfterCrash::ResumePrimary
            } else {
                AfterCrash::Secondary
            },
            after_split_brain: if rng.percent(30) {
                AfterSplitBrain::DiscardZeroChanges
            } else {
                AfterSplitBrain::Disconnect
            },
            sync_rate_bytes_per_sec: rng.percent(30).then_some(256 << 10),
            clients: rng.between(1, 4) as usize,
            max_depth: rng.between(1, 4),
            think_us: [200, 2_000, 20_000][rng.below(3) as usize],
            ops: [
                rng.between(20, 60),
                rng.between(0, 15),
                rng.between(0, 25),
                rng.between(2, 20),
                rng.between(0, 10),
                rng.between(0, 5),
            ],
            faults,
            chaos_mean_us: [100_000, 300_000, 800_000, 2_000_000][rng.below(4) as usize],
            al_extent_bytes: 0,
            al_extents: 0,
        };
        // The activity log's shape is derived from what was drawn rather than
        // drawn itself, so that every seed keeps the run it had before the
        // log existed (the regression seeds replay what they found).
        p.al_extent_bytes = [1024, 2048, 4096][(p.hot_blocks + p.clients) % 3];
        p.al_extents = [2, 3, 4, 8][(p.sync_window + p.max_depth as usize) % 4];
        p
    }

    /// The pause before the next action.
    pub fn chaos_gap_us(&self, rng: &mut Rng) -> u64 {
        rng.between(self.chaos_mean_us / 4, self.chaos_mean_us * 7 / 4)
    }
}

/// One client (an NBD connection of the mail host).
#[derive(Debug, Clone)]
pub struct Client {
    /// Its number, written into its blocks.
    pub id: usize,
    /// Requests it keeps in flight, at most.
    pub depth: u64,
    /// Requests in flight now (reads included).
    pub outstanding: u64,
    seq: u64,
}

impl Client {
    /// A client with `depth` requests in flight at most.
    pub fn new(id: usize, depth: u64) -> Client {
        Client {
            id,
            depth,
            outstanding: 0,
            seq: 0,
        }
    }
}

impl Sim {
    fn pick_blocks(&mut self, count: usize) -> usize {
        let span = if self.rng.percent(80) {
            self.profile.hot_blocks
        } else {
            self.profile.blocks
        };
        self.rng.below((span.max(count) - count + 1) as u64) as usize
    }

    /// A client's turn: it issues its next request if it may.
    pub fn client_tick(&mut self, c: usize) {
        if matches!(self.phase, Phase::Settle { .. } | Phase::Done) {
            return;
        }
        let pause = self.rng.between(20, self.profile.think_us);
        self.schedule(self.now + pause, Event::ClientTick { client: c });
        if self.clients[c].outstanding >= self.clients[c].depth || self.now < self.lull_until {
            return;
        }
        let Some(n) = self.attached else { return };
        if !self.serves(n) {
            return;
        }
        let op = OPS[self.rng.weighted(&self.profile.ops)];
        if op == Op::Write && self.merge.is_some() && self.merge_rng.percent(35) {
            self.burst(c, n);
            return;
        }
        self.clients[c].seq += 1;
        let seq = self.clients[c].seq;
        let count = if self.rng.percent(25) { 2 } else { 1 };
        match op {
            Op::Write | Op::FuaWrite => {
                let first = self.pick_blocks(count);
                let (id, op) = self.write_request(c, seq, first, count, op == Op::FuaWrite);
                self.submit(c, n, ReqKind::Write(id), op);
            }
            Op::Trim | Op::WriteZeroes => {
                let first = self.pick_blocks(count);
                let id = self.checker.submit_write(first, count, true, false);
                let (offset, length) = ((first * BLOCK_BYTES) as u64, (count * BLOCK_BYTES) as u64);
                let op = if op == Op::Trim {
                    ClientOp::Trim { offset, length }
                } else {
                    ClientOp::WriteZeroes {
                        offset,
                        length,
                        no_hole: self.rng.percent(50),
                    }
                };
                self.submit(c, n, ReqKind::Write(id), op);
            }
            Op::Flush => self.submit(c, n, ReqKind::Flush, ClientOp::Flush),
            Op::Read => {
                let block = self.pick_blocks(1);
                let snap = self.checker.read_started(n, block);
                self.clients[c].outstanding += 1;
                let inc = self.nodes[n].inc;
                let at = self.now + self.rng.between(10, 500);
                self.schedule(
                    at,
                    Event::ReadDone {
                        client: c,
                        node: n,
                        inc,
                        snap,
                    },
                );
            }
        }
    }

    /// The merging scenario: a burst of 2 to 5 writes of 1 or 2 blocks,
    /// mostly exactly adjacent and ascending (a streaming writer), now and
    /// then with a gap, a FUA write or a flush among them, handed to the
    /// core together so that their disk operations share one drain.
    fn burst(&mut self, c: usize, n: usize) {
        let count = self.merge_rng.between(2, 5) as usize;
        let mut shape = Vec::with_capacity(count);
        let mut span = 0;
        for _ in 0..count {
            let gap = usize::from(span > 0 && self.merge_rng.one_in(6));
            let blocks = if self.merge_rng.percent(25) { 2 } else { 1 };
            let fua = self.merge_rng.one_in(8);
            let flush_before = span > 0 && self.merge_rng.one_in(10);
            shape.push((span + gap, blocks, fua, flush_before));
            span += gap + blocks;
        }
        let first = self.pick_blocks(span);
        let mut reqs = Vec::with_capacity(count + 2);
        for (at, blocks, fua, flush_before) in shape {
            if flush_before {
                reqs.push((ReqKind::Flush, ClientOp::Flush));
            }
            self.clients[c].seq += 1;
            let seq = self.clients[c].seq;
            let (id, op) = self.write_request(c, seq, first + at, blocks, fua);
            reqs.push((ReqKind::Write(id), op));
        }
        self.figures.client_bursts += 1;
        self.submit_many(c, n, reqs);
    }

    /// A client write of `count` blocks from `first`: registered with the
    /// checker, its payload the blocks' encoded contents.
    fn write_request(
        &mut self,
        c: usize,
        seq: u64,
        first: usize,
        count: usize,
        fua: bool,
    ) -> (u64, ClientOp<Vec<u8>>) {
        let id = self.checker.submit_write(first, count, false, fua);
        let mut payload = Vec::with_capacity(count * BLOCK_BYTES);
        for b in first..first + count {
            payload.extend_from_slice(&encode(id, b as u64, c as u32, seq));
        }
        let op = ClientOp::Write {
            offset: (first * BLOCK_BYTES) as u64,
            payload,
            fua,
        };
        (id, op)
    }

    /// A read completes: it returns what the node's cache holds now.
    pub fn read_done(&mut self, c: usize, n: usize, inc: u64, snap: ReadSnapshot) {
        self.clients[c].outstanding -= 1;
        if self.nodes[n].inc != inc || !self.serves(n) {
            return;
        }
        let block = snap.block();
        let bytes = self.nodes[n].store.cached(block).to_vec();
        if let Err(v) = self.checker.read_done(snap, &bytes) {
            self.fail(v);
        }
    }
}
