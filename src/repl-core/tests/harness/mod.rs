//! An in-process pair for the core's tests: two `Node`s wired through a
//! simulated ordered link and simulated stores, stepped deterministically.
//!
//! Each store keeps what its node wrote (the page cache) and what was flushed
//! (the platter), so tests can ask what a power cut would leave. Disk
//! operations complete only when a test (or the seeded stepper) says so, in any
//! order, which is how concurrent IO behaves.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use pairbd_repl_core::bitmap::{bitmap_area_bytes, BITMAP_PAGE_BYTES};
use pairbd_repl_core::{
    ActivityLogImage, AdminCommand, AdminId, AfterCrash, BitmapPage, ClientOp, Config, DiskOp,
    DiskOpId, DiskResult, Message, MetaWriteId, Node, OnPeerLoss, Output, PersistentState,
    ReplyError, RequestId,
};

/// The harness's bitmap granularity (bytes per bit).
pub const GRANULARITY: u64 = 4096;

pub const SIZE: u64 = 1 << 20;

/// The harness's activity-log extent (16 extents in the volume) and
/// capacity (half of them: eviction happens in ordinary tests).
pub const AL_EXTENT: u64 = 64 * 1024;
pub const AL_EXTENTS: usize = 8;

/// A tiny deterministic generator (xorshift64*), so tests need no crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub struct Sim {
    pub node: Node<Vec<u8>>,
    /// The configuration the node runs with.
    pub cfg: Config,
    /// What reads return: completed writes.
    pub data: Vec<u8>,
    /// What survives a power cut: flushed writes.
    pub durable: Vec<u8>,
    pub meta: PersistentState,
    /// The bitmap area as the metadata holds it.
    pub bitmap_image: Vec<u8>,
    /// The activity log as the metadata holds it.
    pub al_image: ActivityLogImage,
    /// Metadata writes completed (for cost figures).
    pub meta_writes: u64,
    pub disk_queue: Vec<(DiskOpId, DiskOp<Vec<u8>>)>,
    pub meta_queue: VecDeque<(
        MetaWriteId,
        PersistentState,
        Vec<BitmapPage>,
        ActivityLogImage,
    )>,
    pub inbox: VecDeque<Message<Vec<u8>>>,
    pub replies: BTreeMap<RequestId, Result<(), ReplyError>>,
    pub admin: BTreeMap<AdminId, Result<String, String>>,
    pub failed: Option<String>,
    pub fail_next_disk: bool,
}

pub struct Pair {
    pub now: Instant,
    pub nodes: [Sim; 2],
    pub link_up: bool,
    pub disconnects: Vec<String>,
    /// `client` completes at once the metadata writes a request caused that
    /// change nothing but the activity log (so tests that step a write by
    /// hand see its disk operation right away). Activity-log tests turn it
    /// off.
    pub auto_al: bool,
    /// Per sender: `Ack`/`Acks` messages sent, and the writes they acknowledged.
    pub ack_messages: [u64; 2],
    pub acked_writes: [u64; 2],
    next_req: u64,
    next_admin: u64,
}

pub fn config(name: &str, on_peer_loss: OnPeerLoss) -> Config {
    Config {
        node_name: name.into(),
        resource: "mail".into(),
        size_bytes: SIZE,
        on_peer_loss,
        ack_timeout: Duration::from_secs(5),
        sync_chunk_bytes: 64 * 1024,
        sync_window: 4,
        probe_timeout: Duration::from_secs(1),
        // Every node (and every restart) draws its own identifiers, as the
        // daemon's random seed makes sure.
        generation_seed: SEEDS.fetch_add(0x1234_5678_9ABC, std::sync::atomic::Ordering::Relaxed),
        after_crash: AfterCrash::Secondary,
        bitmap_granularity_bytes: GRANULARITY,
        after_split_brain: pairbd_repl_core::AfterSplitBrain::Disconnect,
        sync_rate_bytes_per_sec: None,
        sync_rate_min_bytes_per_sec: None,
        al_extent_bytes: AL_EXTENT,
        al_extents: AL_EXTENTS,
        max_inflight_bytes: u64::MAX,
        bulk_lane_bytes: 0,
    }
}

static SEEDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Sim {
    /// The node's configuration (for a restart with changes).
    pub fn node_config(&self) -> Config {
        self.cfg.clone()
    }

    fn new(cfg: Config, meta: PersistentState, now: Instant) -> Sim {
        Sim {
            node: Node::new(cfg.clone(), meta, now),
            cfg,
            data: vec![0; SIZE as usize],
            durable: vec![0; SIZE as usize],
            meta,
            bitmap_image: vec![0; bitmap_area_bytes(SIZE, GRANULARITY) as usize],
            al_image: ActivityLogImage::default(),
            meta_writes: 0,
            disk_queue: Vec::new(),
            meta_queue: VecDeque::new(),
            inbox: VecDeque::new(),
            replies: BTreeMap::new(),
            admin: BTreeMap::new(),
            failed: None,
            fail_next_disk: false,
        }
    }
}

impl Pair {
    pub fn new(policy: OnPeerLoss) -> Pair {
        Pair::new_with(policy, |_| {})
    }

    /// `new`, with both configurations changed by `f`.
    pub fn new_with(policy: OnPeerLoss, f: impl Fn(&mut Config)) -> Pair {
        let now = Instant::now();
        let cfg = |name| {
            let mut c = config(name, policy);
            f(&mut c);
            c
        };
        Pair {
            now,
            nodes: [
                Sim::new(cfg("alpha"), PersistentState::fresh(), now),
                Sim::new(cfg("beta"), PersistentState::fresh(), now),
            ],
            link_up: false,
            disconnects: Vec::new(),
            auto_al: true,
            ack_messages: [0; 2],
            acked_writes: [0; 2],
            next_req: 1,
            next_admin: 1,
        }
    }

    /// A connected pair, alpha Primary and beta UpToDate after the initial sync.
    pub fn synced(policy: OnPeerLoss) -> Pair {
        Pair::synced_with(policy, |_| {})
    }

    /// `synced`, with both configurations changed by `f`.
    pub fn synced_with(policy: OnPeerLoss, f: impl Fn(&mut Config)) -> Pair {
        let mut p = Pair::new_with(policy, f);
        p.connect();
        p.run_until_idle();
        let r = p.admin(
            0,
            AdminCommand::Promote {
                force: true,
                new_generation: 7,
            },
        );
        assert!(r.is_ok(), "{r:?}");
        p.run_until_idle();
        assert!(p.nodes[1].node.status(p.now).sync.is_none());
        assert_eq!(
            p.nodes[1].node.disk(),
            pairbd_repl_core::DiskState::UpToDate
        );
        p
    }

    pub fn connect(&mut self) {
        self.link_up = true;
        for i in 0..2 {
            self.nodes[i].inbox.clear();
            self.nodes[i].node.handle_connected(self.now);
        }
        self.drain();
    }

    pub fn cut_link(&mut self, reason: &str) {
        self.link_up = false;
        for i in 0..2 {
            self.nodes[i].inbox.clear();
            self.nodes[i].node.handle_disconnected(self.now, reason);
        }
        self.drain();
    }

    pub fn client(&mut self, i: usize, op: ClientOp<Vec<u8>>) -> RequestId {
        let id = RequestId(self.next_req);
        self.next_req += 1;
        self.nodes[i].node.handle_client(self.now, id, op);
        self.drain();
        while self.auto_al
            && self.nodes[i]
                .meta_queue
                .front()
                .is_some_and(|(_, state, _, _)| *state == self.nodes[i].meta)
        {
            self.complete_meta(i);
        }
        id
    }

    pub fn write(&mut self, i: usize, offset: u64, byte: u8, len: usize) -> RequestId {
        self.client(
            i,
            ClientOp::Write {
                offset,
                payload: vec![byte; len],
                fua: false,
            },
        )
    }

    /// Sends an admin command and runs until it is answered.
    pub fn admin(&mut self, i: usize, cmd: AdminCommand) -> Result<String, String> {
        let id = AdminId(self.next_admin);
        self.next_admin += 1;
        self.nodes[i].node.handle_admin(self.now, id, cmd);
        self.drain();
        self.run_until_idle();
        self.nodes[i]
            .admin
            .remove(&id)
            .expect("admin command answered")
    }

    pub fn reply(&self, i: usize, id: RequestId) -> Option<&Result<(), ReplyError>> {
        self.nodes[i].replies.get(&id)
    }

    /// Moves every output of both nodes to where it goes.
    pub fn drain(&mut self) {
        loop {
            let mut any = false;
            for i in 0..2 {
                while let Some(out) = self.nodes[i].node.poll() {
                    any = true;
                    self.route(i, out);
                }
            }
            if !any {
                break;
            }
        }
    }

    fn route(&mut self, i: usize, out: Output<Vec<u8>>) {
        match out {
            Output::Disk { id, op } => self.nodes[i].disk_queue.push((id, op)),
            Output::WriteMeta {
                id,
                state,
                bitmap,
                activity_log,
            } => self.nodes[i]
                .meta_queue
                .push_back((id, state, bitmap, activity_log)),
            Output::Send(m) => {
                if let Some(seqs) = m.acked_seqs() {
                    self.ack_messages[i] += 1;
                    self.acked_writes[i] += seqs.len() as u64;
                }
                if self.link_up {
                    self.nodes[1 - i].inbox.push_back(m);
                }
            }
            Output::Reply { id, result } => {
                let old = self.nodes[i].replies.insert(id, result);
                assert!(old.is_none(), "request {id:?} answered twice");
            }
            Output::Disconnect { reason } => {
                self.disconnects.push(reason.clone());
                if self.link_up {
                    self.link_up = false;
                    for s in &mut self.nodes {
                        s.inbox.clear();
                    }
                    self.nodes[1 - i]
                        .node
                        .handle_disconnected(self.now, &reason);
                }
            }
            Output::AdminDone { id, result } => {
                self.nodes[i].admin.insert(id, result.map_err(|e| e.0));
            }
            Output::FailStop { reason } => self.nodes[i].failed = Some(reason),
        }
    }

    /// Completes disk operation `k` of node `i`'s queue.
    pub fn complete_disk(&mut self, i: usize, k: usize) {
        let (id, op) = self.nodes[i].disk_queue.remove(k);
        let result = self.apply_disk(i, op);
        self.nodes[i].node.handle_disk(self.now, id, result);
        self.drain();
    }

    /// Completes every disk operation of node `i`'s queue that `pick`
    /// chooses, all in one step (as the daemon's driver completes inline
    /// writes), and drains the outputs only then.
    pub fn complete_disks_together(
        &mut self,
        i: usize,
        pick: impl Fn(&DiskOp<Vec<u8>>) -> bool,
    ) -> usize {
        let (chosen, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.nodes[i].disk_queue)
            .into_iter()
            .partition(|(_, op)| pick(op));
        self.nodes[i].disk_queue = rest;
        let n = chosen.len();
        for (id, op) in chosen {
            let result = self.apply_disk(i, op);
            self.nodes[i].node.handle_disk(self.now, id, result);
        }
        self.drain();
        n
    }

    fn apply_disk(&mut self, i: usize, op: DiskOp<Vec<u8>>) -> DiskResult<Vec<u8>> {
        let s = &mut self.nodes[i];
        if std::mem::take(&mut s.fail_next_disk) {
            DiskResult::Failed("simulated EIO".into())
        } else {
            match op {
                DiskOp::Write {
                    offset,
                    payload,
                    fua,
                } => {
                    let r = offset as usize..offset as usize + payload.len();
                    s.data[r.clone()].copy_from_slice(&payload);
                    if fua {
                        s.durable[r].copy_from_slice(&payload);
                    }
                    DiskResult::Done
                }
                DiskOp::Trim { offset, length } | DiskOp::WriteZeroes { offset, length, .. } => {
                    s.data[offset as usize..(offset + length) as usize].fill(0);
                    DiskResult::Done
                }
                DiskOp::Flush => {
                    s.durable.copy_from_slice(&s.data);
                    DiskResult::Done
                }
                DiskOp::Read { offset, length } => {
                    DiskResult::Read(s.data[offset as usize..(offset + length) as usize].to_vec())
                }
            }
        }
    }

    pub fn complete_meta(&mut self, i: usize) {
        let (id, state, pages, al) = self.nodes[i]
            .meta_queue
            .pop_front()
            .expect("a metadata write");
        self.nodes[i].al_image = al;
        self.nodes[i].meta_writes += 1;
        for p in pages {
            let at = p.index as usize * BITMAP_PAGE_BYTES;
            self.nodes[i].bitmap_image[at..at + BITMAP_PAGE_BYTES].copy_from_slice(&p.bytes);
        }
        self.nodes[i].meta = state;
        self.nodes[i].node.handle_meta_done(self.now, id, Ok(()));
        self.drain();
    }

    /// Delivers the next message waiting for node `i`.
    pub fn deliver(&mut self, i: usize) {
        let m = self.nodes[i].inbox.pop_front().expect("a message");
        self.nodes[i].node.handle_message(self.now, m);
        self.drain();
    }

    /// Delivers every message waiting for node `i` in one step (as the
    /// daemon's driver hands a received batch to the core under one lock),
    /// draining the outputs only then.
    pub fn deliver_all(&mut self, i: usize) {
        while let Some(m) = self.nodes[i].inbox.pop_front() {
            self.nodes[i].node.handle_message(self.now, m);
        }
        self.drain();
    }

    /// `run_until_idle` in bursts: each round completes every disk operation
    /// of a node together and delivers every waiting message together.
    pub fn run_until_idle_batched(&mut self) {
        for _ in 0..1_000_000 {
            let mut any = false;
            for i in 0..2 {
                if !self.nodes[i].meta_queue.is_empty() {
                    self.complete_meta(i);
                    any = true;
                }
                if self.complete_disks_together(i, |_| true) > 0 {
                    any = true;
                }
                if !self.nodes[i].inbox.is_empty() {
                    self.deliver_all(i);
                    any = true;
                }
            }
            if !any {
                return;
            }
        }
        panic!("the pair never went idle");
    }

    /// Does one pending thing chosen by `rng`; false when nothing is pending.
    pub fn step_random(&mut self, rng: &mut Rng) -> bool {
        let mut choices = Vec::new();
        for i in 0..2 {
            for k in 0..self.nodes[i].disk_queue.len() {
                choices.push((0, i, k));
            }
            if !self.nodes[i].meta_queue.is_empty() {
                choices.push((1, i, 0));
            }
            if !self.nodes[i].inbox.is_empty() {
                choices.push((2, i, 0));
            }
        }
        if choices.is_empty() {
            return false;
        }
        let (kind, i, k) = choices[rng.below(choices.len() as u64) as usize];
        match kind {
            0 => self.complete_disk(i, k),
            1 => self.complete_meta(i),
            _ => self.deliver(i),
        }
        true
    }

    /// Completes everything pending, oldest first, until nothing is left;
    /// returns the byte counts of the `SyncStart`s delivered meanwhile.
    pub fn run_until_idle(&mut self) -> Vec<u64> {
        let mut sync_starts = Vec::new();
        for _ in 0..1_000_000 {
            let mut any = false;
            for i in 0..2 {
                if !self.nodes[i].meta_queue.is_empty() {
                    self.complete_meta(i);
                    any = true;
                }
                if !self.nodes[i].disk_queue.is_empty() {
                    self.complete_disk(i, 0);
                    any = true;
                }
                if let Some(Message::SyncStart { total_bytes }) = self.nodes[i].inbox.front() {
                    sync_starts.push(*total_bytes);
                }
                if !self.nodes[i].inbox.is_empty() {
                    self.deliver(i);
                    any = true;
                }
            }
            if !any {
                return sync_starts;
            }
        }
        panic!("the pair never went idle");
    }

    /// Panics, naming the first differing byte, unless both nodes' data are equal.
    #[track_caller]
    pub fn assert_same(&self, what: &str) {
        let (a, b) = (&self.nodes[0].data, &self.nodes[1].data);
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            panic!("{what}: stores differ at byte {i}: {} vs {}", a[i], b[i]);
        }
    }

    /// The daemon of node `i` crashes and restarts (its page cache survives,
    /// its unfinished disk and metadata writes are lost) while the link is down.
    pub fn restart(&mut self, i: usize) {
        self.restart_with(
            i,
            config(if i == 0 { "alpha" } else { "beta" }, OnPeerLoss::Continue),
        );
    }

    /// `restart` with a configuration of the test's choosing.
    pub fn restart_with(&mut self, i: usize, cfg: Config) {
        if self.link_up {
            self.cut_link("peer restarted");
        }
        let s = &mut self.nodes[i];
        s.disk_queue.clear();
        s.meta_queue.clear();
        s.inbox.clear();
        s.node = Node::new(cfg.clone(), s.meta, self.now);
        s.cfg = cfg;
        s.node
            .restore_metadata(GRANULARITY, &s.bitmap_image, &s.al_image);
        s.failed = None;
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        for i in 0..2 {
            if self.nodes[i]
                .node
                .poll_timeout()
                .is_some_and(|t| t <= self.now)
            {
                self.nodes[i].node.handle_timeout(self.now);
            }
        }
        self.drain();
    }
}
