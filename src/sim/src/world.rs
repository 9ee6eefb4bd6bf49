//! The simulated world: two real cores, their disks, their metadata, the
//! link between them, the clients and the operator, stepped by one event
//! queue in simulated time. Everything random comes from the run's seed, so
//! a run replays exactly.
//!
//! The world plays the daemon's driver for each core, as `src/pairbd/daemon`
//! does: it runs disk operations and metadata writes (completing them after
//! a random latency, in any order), carries messages, reports link changes,
//! fires timers, and stops the node on a fail-stop. It never decides
//! anything the core decides.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pairbd_repl_core::bitmap::{bitmap_area_bytes, BITMAP_PAGE_BYTES};
use pairbd_repl_core::{
    plan_disk_ops, ActivityLogImage, AdminCommand, AdminId, BitmapPage, ClientOp, Config,
    ConnectionState, DiskOp, DiskOpId, DiskResult, DiskState, Lane, MergeLimits, Message,
    MetaWriteId, Node, Output, PersistentState, PlannedOp, ReplyError, RequestId, Role, Status,
};

use crate::checker::{Checker, ReadSnapshot, Violation};
use crate::content::{decode, Content, BLOCK_BYTES};
use crate::figures::Figures;
use crate::net::{Lanes, Net};
use crate::operator::Task;
use crate::rng::Rng;
use crate::store::{FlushSnapshot, SimStore};
use crate::workload::{Client, Profile};
use crate::Options;

/// The nodes' names (node 0 has the lower id and dials).
pub const NAMES: [&str; 2] = ["alpha", "beta"];

/// Mixed into the seed for the online-verify scenario's random stream.
const VERIFY_STREAM: u64 = 0x7E21_F1ED_0B5E_55ED;

/// Mixed into the seed for the batching scenario's random stream.
const BATCH_STREAM: u64 = 0xBA7C_4ED0_AC50_0001;

/// The most messages one delivery hands to a core in the batching scenario
/// (the daemon's default `batch-messages`).
const BATCH_MESSAGES: usize = 64;

/// How this run's drivers batch (the batching scenario).
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// A delivery also takes the messages that arrive within this many µs
    /// (the receiving driver woke up that much later and finds them queued).
    pub gather_us: u64,
    /// One small plain write in this many goes to the disk as a task
    /// (completed later) instead of inline.
    pub task_one_in: u64,
}

/// Mixed into the seed for the merging scenario's random stream.
const MERGE_STREAM: u64 = 0x3E26_E0AD_1ACE_0B17;

/// The most messages a receiver handles in one batch in the merging
/// scenario (the daemon's `batch-messages` is 256; the simulated volume is
/// small).
const DELIVER_BATCH_MAX: usize = 64;

/// Mixed into the seed for the in-flight window scenario's random stream.
const WINDOW_STREAM: u64 = 0x3A1D_0F5E_7B1D_C0DE;

/// Mixed into the seed for the lanes scenario's random stream.
const LANES_STREAM: u64 = 0x1A7E_5B01_C0FF_EE42;

/// QUIC's idle timeout, the daemon's default ping-timeout.
pub const PING_TIMEOUT_US: u64 = 1_000_000;
const BACKOFF_MIN_US: u64 = 100_000;
/// The simulated nodes' dirty-bitmap granularity: 2 blocks per bit, so a
/// bit covers blocks written by different requests and the small simulated
/// volumes still have 8 to 32 bits. (The daemon's minimum is 4 KiB; the core
/// takes any granularity.)
pub const BITMAP_GRANULARITY: u64 = 1024;
const BACKOFF_MAX_US: u64 = 2_000_000;

/// How a node stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// SIGKILL or a crash: the page cache survives, in-flight IO may land.
    Kill,
    /// Power lost: only the durable layer and the metadata survive.
    PowerCut,
    /// The core fail-stopped and the daemon exited.
    FailStop,
    /// A clean stop (the caller already flushed).
    Clean,
}

/// Something scheduled.
#[derive(Debug, Clone)]
pub enum Event {
    /// The online-verify scenario's turn (its own random stream).
    VerifyScenario,
    DiskDone {
        node: usize,
        inc: u64,
        id: u64,
    },
    MetaDone {
        node: usize,
        inc: u64,
        id: MetaWriteId,
    },
    Deliver {
        conn: u64,
        sender: usize,
        lane: Lane,
    },
    Timer {
        node: usize,
        inc: u64,
    },
    /// `node`'s driver learns its connection `conn` is gone.
    LinkLost {
        node: usize,
        conn: u64,
        reason: &'static str,
    },
    /// The receiver of a blocked direction hears nothing for a ping-timeout.
    Idle {
        sender: usize,
        conn: u64,
        token: u64,
    },
    Dial,
    Restart {
        node: usize,
        inc: u64,
    },
    ClientTick {
        client: usize,
    },
    ReadDone {
        client: usize,
        node: usize,
        inc: u64,
        snap: ReadSnapshot,
    },
    Heal {
        sender: usize,
        token: u64,
    },
    /// A power cut planned by an earlier action.
    PowerCut {
        node: usize,
    },
    Chaos,
    OperatorStep,
    Manage,
}

/// A disk operation handed to the simulated store, not yet completed.
pub struct PendingDisk {
    /// The store operation (a merged write is one `Write` of its pieces'
    /// bytes, back to back).
    pub op: DiskOp<Vec<u8>>,
    pub flush: Option<FlushSnapshot>,
    pub fail: bool,
    /// The core's other operations this one carries out (a merged write's
    /// pieces after the first, whose id keys the pending table): each is
    /// reported with the same result.
    pub also: Vec<u64>,
}

/// One node: its core (while the process runs), disk and metadata.
pub struct SimNode {
    pub core: Option<Node<Vec<u8>>>,
    /// Bumped at every stop, so events of an earlier process are ignored.
    pub inc: u64,
    pub store: SimStore,
    /// The metadata as it is on disk.
    pub meta: PersistentState,
    /// The dirty bitmap area as it is on disk.
    pub bitmap_image: Vec<u8>,
    /// The activity log as the metadata slot holds it.
    pub al_image: ActivityLogImage,
    pub meta_pending: Option<(
        MetaWriteId,
        PersistentState,
        Vec<BitmapPage>,
        ActivityLogImage,
    )>,
    pub disk_pending: BTreeMap<u64, PendingDisk>,
    pub armed: Option<u64>,
    pub fail_next_write: bool,
    pub fail_next_flush: bool,
    /// Disk operations are slow (seconds) until then.
    pub stall_until: u64,
    pub failstop: Option<String>,
    /// An injected fault may explain a fail-stop.
    pub fault_injected: bool,
    /// A restart is scheduled (so the manager does not start it twice).
    pub restart_scheduled: bool,
    pub was_standalone: bool,
    /// Served clients after the last event.
    pub serving: bool,
    /// A forced promotion completed in this event (the model was reset).
    pub just_forced: bool,
}

impl SimNode {
    fn write_bitmap_pages(&mut self, pages: &[BitmapPage]) {
        for p in pages {
            let at = p.index as usize * BITMAP_PAGE_BYTES;
            self.bitmap_image[at..at + BITMAP_PAGE_BYTES].copy_from_slice(&p.bytes);
        }
    }

    /// A crash while the pages were being written: a prefix of them landed,
    /// the next one only in part.
    fn tear_bitmap_pages(&mut self, pages: &[BitmapPage], rng: &mut Rng) {
        if pages.is_empty() {
            return;
        }
        let whole = rng.below(pages.len() as u64) as usize;
        self.write_bitmap_pages(&pages[..whole]);
        let p = &pages[whole];
        let part = rng.below(BITMAP_PAGE_BYTES as u64) as usize;
        let at = p.index as usize * BITMAP_PAGE_BYTES;
        self.bitmap_image[at..at + part].copy_from_slice(&p.bytes[..part]);
    }

    fn new(blocks: usize) -> SimNode {
        SimNode {
            core: None,
            inc: 0,
            store: SimStore::new(blocks),
            meta: PersistentState::fresh(),
            bitmap_image: vec![
                0;
                bitmap_area_bytes((blocks * BLOCK_BYTES) as u64, BITMAP_GRANULARITY)
                    as usize
            ],
            al_image: ActivityLogImage::default(),
            meta_pending: None,
            disk_pending: BTreeMap::new(),
            armed: None,
            fail_next_write: false,
            fail_next_flush: false,
            stall_until: 0,
            failstop: None,
            fault_injected: false,
            restart_scheduled: false,
            was_standalone: false,
            serving: false,
            just_forced: false,
        }
    }

    /// Whether the process runs.
    pub fn up(&self) -> bool {
        self.core.is_some()
    }
}

/// What a client request is, for its reply.
#[derive(Debug, Clone, Copy)]
pub enum ReqKind {
    Write(u64),
    Flush,
}

/// A client request handed to a core.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub client: usize,
    pub node: usize,
    pub kind: ReqKind,
}

/// An admin command handed to a core.
#[derive(Debug, Clone)]
pub struct AdminWait {
    pub node: usize,
    pub cmd: AdminCommand,
    pub answer: Option<Result<String, String>>,
    pub generation_before: u64,
}

/// The run's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Faults everywhere.
    Safety,
    /// Faults healed; the pair must come back by `deadline`.
    Liveness { deadline: u64 },
    /// In service again: clients stop, everything settles, then the stores are
    /// compared (and, `power_cut_next`, both nodes lose power once more).
    Settle { deadline: u64, power_cut_next: bool },
    /// Finished.
    Done,
}

/// The world.
pub struct Sim {
    pub opts: Options,
    pub profile: Profile,
    pub rng: Rng,
    /// Simulated time in µs since the start.
    pub now: u64,
    base: Instant,
    events: BTreeMap<(u64, u64), Event>,
    next_event: u64,
    pub nodes: [SimNode; 2],
    pub net: Net,
    dial_pending: bool,
    dial_backoff: u64,
    pub clients: Vec<Client>,
    pub requests: BTreeMap<u64, Request>,
    next_request: u64,
    pub admins: BTreeMap<u64, AdminWait>,
    next_admin: u64,
    /// The node the clients use (the mail host attached to it).
    pub attached: Option<usize>,
    pub checker: Checker,
    pub task: Option<Task>,
    pub phase: Phase,
    pub figures: Figures,
    pub violation: Option<Violation>,
    trace: Vec<String>,
    pub final_power_cut_done: bool,
    /// Clients issue nothing until then (a quiet spell).
    pub lull_until: u64,
    /// The online-verify scenario's own random stream: seeds whose profile
    /// leaves the scenario out replay the runs they had before it existed.
    pub verify_rng: Rng,
    /// Whether this seed runs the online-verify scenario.
    pub verify_scenario: bool,
    /// The batching scenario's own random stream (as `verify_rng`).
    pub batch_rng: Rng,
    /// This run's drivers batch as the daemon's does (`None`: one message
    /// per step, every disk operation completes on its own).
    pub batching: Option<Batching>,
    /// Verifies the settle phase ran to repair corruption still present.
    pub repair_verifies: u32,
    /// The 4 KiB blocks corrupted in this run, one entry per corruption.
    pub corrupted: Vec<u64>,
    /// The merging scenario's own random stream (as `verify_rng`).
    pub merge_rng: Rng,
    /// Whether this seed runs the merging scenario, and with which bounds:
    /// the world plans each drain's disk operations with the core's merge
    /// planner (as the daemon's driver does), a receiver handles every
    /// message that has arrived in one batch, and clients send bursts of
    /// adjacent writes handled together.
    pub merge: Option<MergeLimits>,
    /// The cores' in-flight window (`u64::MAX`: none). Drawn from a random
    /// stream of its own, so that seeds without the scenario replay the runs
    /// they had before it existed.
    pub max_inflight_bytes: u64,
    /// The cores' `bulk_lane_bytes` (0: one lane), drawn by the lanes
    /// scenario from its own random stream, as the window.
    pub bulk_lane_bytes: u64,
}

impl Sim {
    /// A world for one seed.
    pub fn new(opts: Options) -> Sim {
        let mut rng = Rng::new(opts.seed);
        let profile = Profile::draw(&mut rng);
        let blocks = profile.blocks;
        let lat = [
            (rng.between(30, 200), rng.between(300, 1_500)),
            (rng.between(30, 200), rng.between(300, 1_500)),
        ];
        let clients: Vec<Client> = (0..profile.clients)
            .map(|i| Client::new(i, rng.between(1, profile.max_depth)))
            .collect();
        let mut verify_rng = Rng::new(opts.seed ^ VERIFY_STREAM);
        let verify_scenario = verify_rng.percent(40) && opts.verify_scenario;
        let mut batch_rng = Rng::new(opts.seed ^ BATCH_STREAM);
        let batching = batch_rng.percent(50).then(|| Batching {
            gather_us: batch_rng.between(0, 2_000),
            task_one_in: batch_rng.between(2, 8),
        });
        let batching = batching.filter(|_| opts.batch_scenario);
        // Half the batching runs also give their clients deep queues (4 to
        // 16 requests each), as a mail host under load has: more writes
        // complete in one step, and more complete out of order.
        let mut clients = clients;
        if batching.is_some() && batch_rng.percent(50) {
            for c in &mut clients {
                c.depth = batch_rng.between(4, 16);
            }
        }
        let figures = Figures {
            batching_runs: u64::from(batching.is_some()),
            ..Figures::default()
        };
        let mut merge_rng = Rng::new(opts.seed ^ MERGE_STREAM);
        let merge = (merge_rng.percent(50) && opts.merge_scenario).then(|| {
            let bytes_max = [2, 4, 8, 64][merge_rng.below(4) as usize] * BLOCK_BYTES as u64;
            let pieces_max = [2, 3, 1024][merge_rng.below(3) as usize];
            MergeLimits::new(bytes_max)
                .with_pieces_max(pieces_max)
                .with_mutation(opts.mutation)
        });
        let mut window_rng = Rng::new(opts.seed ^ WINDOW_STREAM);
        let window_scenario = window_rng.percent(40) && opts.window_scenario;
        // A window of one or two blocks binds at every second write; 4 KiB
        // (8 blocks) only when several clients keep requests in flight. Half
        // of these profiles also get a slow link (the acks that release the
        // window take 2–20 ms), on top of the delay spikes.
        let mut lat = lat;
        let max_inflight_bytes = if window_scenario {
            if window_rng.percent(50) {
                for d in &mut lat {
                    let lo = window_rng.between(2_000, 10_000);
                    *d = (lo, lo + window_rng.between(0, 10_000));
                }
            }
            [512, 1024, 1536, 4096][window_rng.below(4) as usize]
        } else {
            u64::MAX
        };
        // The lanes scenario: client writes of at least `bulk_lane_bytes`
        // take the bulk lane, which waits an extra delay behind the main one
        // (so flushes, acks and small writes overtake the writes sent before
        // them). The simulated writes are 1 or 2 blocks: a threshold of one
        // block sends every client write on the bulk lane, one of two blocks
        // the two-block writes (a quarter of the plain writes, and those of
        // the merging scenario's bursts).
        let mut lanes_rng = Rng::new(opts.seed ^ LANES_STREAM);
        let lanes = (lanes_rng.percent(35) && opts.lanes_scenario).then(|| {
            let bulk_lane_bytes = [1, 2][lanes_rng.below(2) as usize] * BLOCK_BYTES as u64;
            let bulk_delay_max_us = [2_000, 10_000, 40_000][lanes_rng.below(3) as usize];
            let power_cut_one_in = lanes_rng
                .percent(50)
                .then(|| [4, 16][lanes_rng.below(2) as usize]);
            Lanes {
                bulk_lane_bytes,
                bulk_delay_max_us,
                power_cut_one_in,
                rng: lanes_rng.fork(),
            }
        });
        let bulk_lane_bytes = lanes.as_ref().map_or(0, |l| l.bulk_lane_bytes);
        Sim {
            profile,
            rng,
            now: 0,
            base: Instant::now(),
            events: BTreeMap::new(),
            next_event: 0,
            nodes: [SimNode::new(blocks), SimNode::new(blocks)],
            net: Net::new(lat, lanes),
            dial_pending: false,
            dial_backoff: BACKOFF_MIN_US,
            clients,
            requests: BTreeMap::new(),
            next_request: 1,
            admins: BTreeMap::new(),
            next_admin: 1,
            attached: None,
            checker: Checker::new(blocks),
            task: None,
            phase: Phase::Safety,
            figures,
            violation: None,
            trace: Vec::new(),
            final_power_cut_done: false,
            lull_until: 0,
            verify_rng,
            verify_scenario,
            batch_rng,
            batching,
            repair_verifies: 0,
            corrupted: Vec::new(),
            merge_rng,
            merge,
            max_inflight_bytes,
            bulk_lane_bytes,
            opts,
        }
    }

    // ----- time and events -------------------------------------------------

    /// The simulated time as the core sees it.
    pub fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    fn to_us(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.base);
        let us = d.as_micros() as u64;
        if Duration::from_micros(us) < d {
            us + 1
        } else {
            us
        }
    }

    /// Schedules `event` at simulated time `at` (never in the past).
    pub fn schedule(&mut self, at: u64, event: Event) {
        let at = at.max(self.now);
        self.events.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    /// Records a line of the run's story (printed live with `trace`, and the
    /// last lines with a violation).
    pub fn note(&mut self, line: impl Into<String>) {
        let line = format!("{:>10.3}ms  {}", self.now as f64 / 1000.0, line.into());
        if self.opts.trace {
            println!("{line}");
        }
        if self.trace.len() >= 4096 {
            self.trace.drain(..2048);
        }
        self.trace.push(line);
    }

    /// With `trace`: both nodes' role, disk, link, generations and marks.
    pub fn note_states(&mut self) {
        if !self.opts.trace {
            return;
        }
        for (n, name) in NAMES.iter().enumerate() {
            let line = match self.status(n) {
                None => format!("    {name} down (metadata {:?})", self.nodes[n].meta),
                Some(st) => format!(
                    "    {} {:?}/{:?}/{:?} gens {} psn {} sync {:?} diverged {} dirty {}",
                    name,
                    st.role,
                    st.disk,
                    st.connection,
                    pairbd_repl_core::generations::describe(st.generations),
                    st.peer_sync_needed,
                    st.sync.map(|s| (s.source, s.percent() as u32)),
                    self.checker.diverged(n),
                    st.out_of_sync_bytes
                ),
            };
            self.note(line);
        }
    }

    /// The last `n` lines of the story.
    pub fn trace_tail(&self, n: usize) -> Vec<String> {
        self.trace[self.trace.len().saturating_sub(n)..].to_vec()
    }

    /// Records a broken invariant (the first one ends the run).
    pub fn fail(&mut self, v: Violation) {
        if self.violation.is_none() {
            self.note(format!("VIOLATION: {v}"));
            self.violation = Some(v);
        }
    }

    /// Runs until the run ends; returns the first violation, if any.
    pub fn run(&mut self) -> Option<Violation> {
        self.start();
        let max_events = self.opts.max_events;
        while self.violation.is_none() && self.phase != Phase::Done {
            let Some(((at, _), event)) = self.events.pop_first() else {
                self.fail(Violation::Liveness("nothing left to happen".into()));
                break;
            };
            self.now = at;
            // The verify scenario's ticks are not counted, so that the
            // checks' cadence (every 64 events) stays that of the runs
            // before the scenario existed.
            if !matches!(event, Event::VerifyScenario) {
                self.figures.events += 1;
            }
            if self.figures.events > max_events {
                self.fail(Violation::Liveness(format!(
                    "more than {max_events} events: the run does not end"
                )));
                break;
            }
            self.handle(event);
            self.after_event();
        }
        self.figures.sim_ms = self.now / 1000;
        let lanes = self.net.lane_counts;
        self.figures.bulk_messages = lanes.bulk_messages;
        self.figures.lane_overtakes = lanes.overtakes;
        self.figures.flush_overtakes = lanes.flush_overtakes;
        self.figures.absorb(self.checker.counts());
        self.violation.clone()
    }

    fn start(&mut self) {
        self.note(format!(
            "seed {} profile {:?} mutation {:?} batching {:?}",
            self.opts.seed, self.profile, self.opts.mutation, self.batching
        ));
        if let Some(limits) = self.merge {
            self.figures.merge_runs += 1;
            self.note(format!(
                "merging scenario: at most {} bytes and {} pieces per merged write",
                limits.bytes_max(),
                limits.pieces_max()
            ));
        }
        if let Some(l) = &self.net.lanes {
            let line = format!(
                "lanes scenario: writes of {} bytes or more take the bulk lane, {} µs extra delay at most, \
                 a power cut after one flush in {:?} that overtook a bulk write",
                l.bulk_lane_bytes, l.bulk_delay_max_us, l.power_cut_one_in
            );
            self.note(line);
        }
        for n in 0..2 {
            self.start_node(n);
        }
        // A new pair: the operator forces the first primary (docs/OPERATIONS.md).
        self.task = Some(Task::initial());
        self.schedule(50_000, Event::OperatorStep);
        for c in 0..self.clients.len() {
            self.schedule(100_000 + c as u64, Event::ClientTick { client: c });
        }
        let first_chaos = self.profile.chaos_gap_us(&mut self.rng) + 500_000;
        self.schedule(first_chaos, Event::Chaos);
        self.schedule(1_000_000, Event::Manage);
        if self.verify_scenario {
            let first = 800_000 + self.verify_rng.between(0, 2_000_000);
            self.schedule(first, Event::VerifyScenario);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::DiskDone { node, inc, id } => self.disk_done(node, inc, id),
            Event::MetaDone { node, inc, id } => self.meta_done(node, inc, id),
            Event::Deliver { conn, sender, lane } => self.deliver(conn, sender, lane),
            Event::Timer { node, inc } => self.timer(node, inc),
            Event::LinkLost { node, conn, reason } => self.link_lost(node, conn, reason),
            Event::Idle {
                sender,
                conn,
                token,
            } => self.idle(sender, conn, token),
            Event::Dial => self.dial(),
            Event::Restart { node, inc } => {
                if self.nodes[node].inc == inc && !self.nodes[node].up() {
                    self.start_node(node);
                }
            }
            Event::ClientTick { client } => self.client_tick(client),
            Event::ReadDone {
                client,
                node,
                inc,
                snap,
            } => self.read_done(client, node, inc, snap),
            Event::Heal { sender, token } => self.heal(sender, token),
            Event::PowerCut { node } => {
                if self.phase == Phase::Safety {
                    self.stop_node(node, Death::PowerCut);
                }
            }
            Event::Chaos => self.chaos(),
            Event::OperatorStep => self.operator_step(),
            Event::Manage => self.manage_tick(),
            Event::VerifyScenario => self.verify_scenario(),
        }
    }

    // ----- driving a core --------------------------------------------------

    /// Runs `f` on node `n`'s core (if it runs) and carries out its outputs.
    pub fn with_core(&mut self, n: usize, f: impl FnOnce(&mut Node<Vec<u8>>, Instant)) {
        if self.call_core(n, f) {
            self.drain(n);
        }
    }

    /// Runs `f` on node `n`'s core, if it runs; false if it does not, or
    /// if `f` panicked (a violation).
    fn call_core(&mut self, n: usize, f: impl FnOnce(&mut Node<Vec<u8>>, Instant)) -> bool {
        let now = self.instant();
        let Some(core) = self.nodes[n].core.as_mut() else {
            return false;
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(core, now)));
        if let Err(panic) = result {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.fail(Violation::Panic(format!("node {n}: {msg}")));
            return false;
        }
        true
    }

    /// Carries out node `n`'s outputs. In the batching scenario, as the
    /// daemon's driver does, small plain writes complete right after the
    /// round's other outputs went out, and their completions go back to
    /// the core before the next round is drained (so their acks, due in
    /// one step, batch).
    fn drain(&mut self, n: usize) {
        loop {
            let inc = self.nodes[n].inc;
            let mut inline = Vec::new();
            // The merging scenario plans the disk operations of the whole
            // drain (the batch window) together, after the other outputs,
            // as the daemon's driver does.
            let mut disk = Vec::new();
            while let Some(out) = self.nodes[n].core.as_mut().and_then(|c| c.poll()) {
                match out {
                    Output::Disk { id, op } if self.merge.is_some() => disk.push((id, op)),
                    Output::Disk { id, op } if self.inline_write(n, &op) => inline.push((id, op)),
                    out => self.route(n, out),
                }
            }
            if let Some(limits) = self.merge {
                for planned in plan_disk_ops(disk, &limits) {
                    match planned {
                        PlannedOp::Single { id, op } if self.inline_write(n, &op) => {
                            inline.push((id, op))
                        }
                        PlannedOp::Single { id, op } => self.submit_disk(n, id, op),
                        PlannedOp::Merged(m) => {
                            self.figures.merged_writes += 1;
                            self.figures.merged_pieces += m.pieces.len() as u64;
                            let ids: Vec<u64> = m.ids().map(|id| id.0).collect();
                            let mut payload = Vec::with_capacity(m.len_bytes() as usize);
                            for (_, p) in &m.pieces {
                                payload.extend_from_slice(p);
                            }
                            let op = DiskOp::Write {
                                offset: m.offset,
                                payload,
                                fua: false,
                            };
                            self.submit_store_op(n, ids, op);
                        }
                    }
                }
            }
            // A node stopped meanwhile never submitted them.
            if inline.is_empty() || self.nodes[n].inc != inc || !self.nodes[n].up() {
                break;
            }
            for (id, op) in inline {
                let p = PendingDisk {
                    op,
                    flush: None,
                    fail: false,
                    also: Vec::new(),
                };
                let result = self.apply_disk(n, &p);
                if self.opts.trace_all {
                    self.note(format!(
                        "{} disk done inline: {}",
                        NAMES[n],
                        describe_disk(&p.op)
                    ));
                }
                if !self.call_core(n, |c, now| c.handle_disk(now, id, result)) {
                    break;
                }
            }
        }
        self.arm(n);
        if let Some(reason) = self.nodes[n].failstop.take() {
            if !self.nodes[n].fault_injected {
                self.fail(Violation::CoreFailStop { node: n, reason });
            } else {
                self.note(format!("{} fail-stops: {reason}", NAMES[n]));
            }
            self.stop_node(n, Death::FailStop);
        }
    }

    /// Whether node `n`'s driver completes `op` inline (batching scenario):
    /// a plain write, on a disk that is not stalled or about to fail, and
    /// not one of those the draw sends to the disk as a task.
    fn inline_write(&mut self, n: usize, op: &DiskOp<Vec<u8>>) -> bool {
        let Some(b) = self.batching else {
            return false;
        };
        let node = &self.nodes[n];
        matches!(op, DiskOp::Write { fua: false, .. })
            && !node.fail_next_write
            && node.stall_until <= self.now
            && !self.batch_rng.one_in(b.task_one_in)
    }

    fn arm(&mut self, n: usize) {
        let Some(t) = self.nodes[n].core.as_ref().and_then(|c| c.poll_timeout()) else {
            return;
        };
        let at = self.to_us(t).max(self.now);
        if self.nodes[n].armed.is_none_or(|armed| at < armed) {
            self.nodes[n].armed = Some(at);
            let inc = self.nodes[n].inc;
            self.schedule(at, Event::Timer { node: n, inc });
        }
    }

    fn timer(&mut self, n: usize, inc: u64) {
        if self.nodes[n].inc != inc {
            return;
        }
        if self.nodes[n].armed.is_some_and(|a| a <= self.now) {
            self.nodes[n].armed = None;
        }
        let now = self.instant();
        let due = self.nodes[n]
            .core
            .as_ref()
            .and_then(|c| c.poll_timeout())
            .is_some_and(|t| t <= now);
        if due {
            self.with_core(n, |c, now| c.handle_timeout(now));
        } else {
            self.arm(n);
        }
    }

    fn route(&mut self, n: usize, out: Output<Vec<u8>>) {
        match out {
            Output::Disk { id, op } => self.submit_disk(n, id, op),
            Output::WriteMeta {
                id,
                state,
                bitmap,
                activity_log,
            } => {
                self.nodes[n].meta_pending = Some((id, state, bitmap, activity_log));
                let at = self.now + self.rng.between(50, 2_000);
                let inc = self.nodes[n].inc;
                self.schedule(at, Event::MetaDone { node: n, inc, id });
            }
            Output::Send(msg) => self.send(n, msg),
            Output::Reply { id, result } => self.on_reply(n, id.0, result),
            Output::Disconnect { reason } => {
                self.note(format!("{} drops the link: {reason}", NAMES[n]));
                self.close_link_end(n, true);
            }
            Output::AdminDone { id, result } => self.on_admin_done(n, id, result),
            Output::FailStop { reason } => {
                self.nodes[n].failstop = Some(reason);
            }
        }
    }

    // ----- disks and metadata ----------------------------------------------

    fn submit_disk(&mut self, n: usize, id: DiskOpId, op: DiskOp<Vec<u8>>) {
        self.submit_store_op(n, vec![id.0], op);
    }

    /// Hands one store operation, carrying out the core's operations `ids`
    /// (one, or a merged write's pieces), to the simulated store.
    fn submit_store_op(&mut self, n: usize, ids: Vec<u64>, op: DiskOp<Vec<u8>>) {
        let Some((&first, also)) = ids.split_first() else {
            return;
        };
        let also = also.to_vec();
        let node = &mut self.nodes[n];
        let fail = match op {
            DiskOp::Write { .. } | DiskOp::Trim { .. } | DiskOp::WriteZeroes { .. } => {
                std::mem::take(&mut node.fail_next_write)
            }
            DiskOp::Flush => std::mem::take(&mut node.fail_next_flush),
            DiskOp::Read { .. } => false,
        };
        if fail {
            node.fault_injected = true;
        }
        let flush = matches!(op, DiskOp::Flush).then(|| node.store.flush_snapshot());
        let stalled = node.stall_until > self.now;
        node.disk_pending.insert(
            first,
            PendingDisk {
                op,
                flush,
                fail,
                also,
            },
        );
        let latency = if stalled {
            self.rng.between(500_000, 7_000_000)
        } else if self.rng.one_in(20) {
            self.rng.between(1_000, 30_000)
        } else {
            self.rng.between(10, 400)
        };
        let inc = self.nodes[n].inc;
        self.schedule(
            self.now + latency,
            Event::DiskDone {
                node: n,
                inc,
                id: first,
            },
        );
    }

    /// Applies a completed disk operation to the store; the result for the core.
    fn apply_disk(&mut self, n: usize, p: &PendingDisk) -> DiskResult<Vec<u8>> {
        let store = &mut self.nodes[n].store;
        match &p.op {
            DiskOp::Write {
                offset,
                payload,
                fua,
            } => {
                store.write(*offset, payload, *fua);
                DiskResult::Done
            }
            DiskOp::Trim { offset, length } | DiskOp::WriteZeroes { offset, length, .. } => {
                store.zero(*offset, *length);
                DiskResult::Done
            }
            DiskOp::Flush => {
                if let Some(snap) = &p.flush {
                    store.flush_complete(snap);
                }
                DiskResult::Done
            }
            DiskOp::Read { offset, length } => DiskResult::Read(store.read(*offset, *length)),
        }
    }

    fn disk_done(&mut self, n: usize, inc: u64, id: u64) {
        if self.nodes[n].inc != inc {
            return;
        }
        let Some(p) = self.nodes[n].disk_pending.remove(&id) else {
            return;
        };
        let result = if p.fail {
            self.figures.eio += 1;
            if matches!(p.op, DiskOp::Flush) {
                // After a failed fdatasync the kernel may have dropped the
                // dirty pages it could not write: unflushed data is gone.
                let mut rng = self.rng.fork();
                self.nodes[n].store.lose_cache(&mut rng);
                self.note(format!("{}: EIO on flush, unflushed data lost", NAMES[n]));
                let stores = [&self.nodes[0].store, &self.nodes[1].store];
                if let Err(v) =
                    self.checker
                        .cache_lost(n, stores[n], "after a failed flush on this node")
                {
                    self.fail(v);
                }
            } else {
                self.note(format!("{}: EIO on a write", NAMES[n]));
            }
            DiskResult::Failed("simulated EIO".into())
        } else {
            self.apply_disk(n, &p)
        };
        if self.opts.trace_all {
            let merged = if p.also.is_empty() {
                String::new()
            } else {
                format!(" (merged: {} writes)", p.also.len() + 1)
            };
            self.note(format!(
                "{} disk done: {}{merged}",
                NAMES[n],
                describe_disk(&p.op)
            ));
        }
        // Every operation the store operation carried out, with one result,
        // under one call (as the driver reports a merged write under one
        // lock).
        let ids: Vec<u64> = std::iter::once(id).chain(p.also).collect();
        self.with_core(n, |c, now| {
            for id in ids {
                c.handle_disk(now, DiskOpId(id), result.clone());
            }
        });
    }

    fn meta_done(&mut self, n: usize, inc: u64, id: MetaWriteId) {
        if self.nodes[n].inc != inc {
            return;
        }
        match self.nodes[n].meta_pending.take() {
            Some((pending, state, pages, al)) if pending == id => {
                self.nodes[n].write_bitmap_pages(&pages);
                self.nodes[n].al_image = al;
                // A Secondary becomes UpToDate only at the end of a full sync:
                // the sync is over, whether or not the source hears of it.
                let synced = self.nodes[n].meta.disk != DiskState::UpToDate
                    && state.disk == DiskState::UpToDate
                    && state.role == Role::Secondary;
                self.nodes[n].meta = state;
                if synced {
                    self.figures.syncs += 1;
                    let stores = [&self.nodes[0].store, &self.nodes[1].store];
                    if let Err(v) = self.checker.sync_finished(1 - n, stores) {
                        self.fail(v);
                    }
                }
                self.with_core(n, |c, now| c.handle_meta_done(now, id, Ok(())));
            }
            other => self.nodes[n].meta_pending = other,
        }
    }

    // ----- nodes starting and stopping -------------------------------------

    fn config(&mut self, n: usize) -> Config {
        Config {
            node_name: NAMES[n].into(),
            resource: "mail".into(),
            size_bytes: (self.profile.blocks * BLOCK_BYTES) as u64,
            on_peer_loss: self.profile.on_peer_loss,
            ack_timeout: Duration::from_secs(5),
            sync_chunk_bytes: (self.profile.sync_chunk_blocks * BLOCK_BYTES) as u64,
            sync_window: self.profile.sync_window,
            probe_timeout: Duration::from_micros(PING_TIMEOUT_US),
            generation_seed: self.rng.next_u64(),
            after_crash: self.profile.after_crash,
            bitmap_granularity_bytes: BITMAP_GRANULARITY,
            after_split_brain: self.profile.after_split_brain,
            sync_rate_bytes_per_sec: self.profile.sync_rate_bytes_per_sec,
            sync_rate_min_bytes_per_sec: None,
            al_extent_bytes: self.profile.al_extent_bytes,
            al_extents: self.profile.al_extents,
            max_inflight_bytes: self.max_inflight_bytes,
            bulk_lane_bytes: self.bulk_lane_bytes,
        }
    }

    /// Starts node `n`'s daemon from its metadata.
    pub fn start_node(&mut self, n: usize) {
        if self.nodes[n].up() {
            return;
        }
        // A node that stopped as Primary makes what its store holds (the
        // page cache survives a killed process) durable before it starts, as
        // the daemon does: its activity log says where the data may differ
        // from the peer's, and a resync from this store must not copy data
        // that a power cut of this node could still take back.
        if self.nodes[n].meta.role == Role::Primary {
            self.nodes[n].store.flush_all();
        }
        let cfg = self.config(n);
        let mut core = Node::new(cfg, self.nodes[n].meta, self.instant());
        core.restore_metadata(
            BITMAP_GRANULARITY,
            &self.nodes[n].bitmap_image,
            &self.nodes[n].al_image,
        );
        core.set_mutation(self.opts.mutation);
        let node = &mut self.nodes[n];
        node.core = Some(core);
        node.armed = None;
        node.fault_injected = false;
        node.restart_scheduled = false;
        node.was_standalone = false;
        self.note(format!(
            "{} starts ({:?}, {:?}, psn {})",
            NAMES[n],
            self.nodes[n].meta.role,
            self.nodes[n].meta.disk,
            self.nodes[n].meta.peer_sync_needed
        ));
        if n == 0 {
            self.dial_backoff = BACKOFF_MIN_US;
            self.want_dial(0);
        }
        self.drain(n);
    }

    /// Stops node `n`'s daemon.
    pub fn stop_node(&mut self, n: usize, how: Death) {
        if !self.nodes[n].up() {
            return;
        }
        self.note(format!("{} stops: {how:?}", NAMES[n]));
        let mut rng = self.rng.fork();
        let node = &mut self.nodes[n];
        node.core = None;
        node.inc += 1;
        node.armed = None;
        node.failstop = None;
        node.stall_until = 0;
        node.fail_next_write = false;
        node.fail_next_flush = false;
        // The kernel may still carry out IO the process had submitted.
        let pending = std::mem::take(&mut node.disk_pending);
        let merged_in_flight = pending.values().filter(|p| !p.also.is_empty()).count();
        self.figures.merged_writes_at_stops += merged_in_flight as u64;
        let node = &mut self.nodes[n];
        let meta = node.meta_pending.take();
        let mut landed = Vec::new();
        for (_, p) in pending {
            if !p.fail && how != Death::FailStop && rng.percent(50) {
                landed.push(p);
            }
        }
        for p in &landed {
            self.apply_disk(n, p);
        }
        let node = &mut self.nodes[n];
        if let Some((_, state, pages, al)) = meta {
            // The bitmap pages go first (durably), then the slot, which is
            // atomic (two slots): pages and slot, the pages alone (some of
            // them, one torn), or nothing.
            match rng.below(4) {
                0 | 1 => {
                    node.write_bitmap_pages(&pages);
                    node.meta = state;
                    node.al_image = al;
                }
                2 => node.tear_bitmap_pages(&pages, &mut rng),
                _ => {}
            }
        }
        match how {
            Death::PowerCut => {
                self.figures.power_cuts += 1;
                let lost = self.nodes[n].store.lose_cache(&mut rng);
                self.note(format!(
                    "{}: power lost, {lost} dirty block(s) lost their newest version",
                    NAMES[n]
                ));
                let stores = [&self.nodes[0].store, &self.nodes[1].store];
                if let Err(v) =
                    self.checker
                        .cache_lost(n, stores[n], "after a power cut of this node")
                {
                    self.fail(v);
                }
            }
            Death::Kill => self.figures.kills += 1,
            Death::FailStop | Death::Clean => {}
        }
        // Its clients' requests are cut off; nobody answers them.
        let cut: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.node == n)
            .map(|(id, _)| *id)
            .collect();
        for id in cut {
            if let Some(r) = self.requests.remove(&id) {
                self.clients[r.client].outstanding -= 1;
                if let ReqKind::Flush = r.kind {
                    self.checker.flush_dropped(id);
                }
            }
        }
        for a in self.admins.values_mut() {
            if a.node == n && a.answer.is_none() {
                a.answer = Some(Err("the node stopped".into()));
            }
        }
        if self.attached == Some(n) {
            self.attached = None;
        }
        // A daemon that exits closes the connection (the peer learns it at
        // once); a killed or powered-off one just goes silent.
        if matches!(how, Death::Clean | Death::FailStop) {
            self.close_link_end(n, true);
        } else if self.net.close_end(n, false) {
            let conn = self.net.conn.as_ref().map(|c| c.id);
            if let Some(conn) = conn {
                let at = self.now + PING_TIMEOUT_US + self.rng.below(100_000);
                self.schedule(
                    at,
                    Event::LinkLost {
                        node: 1 - n,
                        conn,
                        reason: "the peer went silent (idle timeout)",
                    },
                );
            }
        }
        if matches!(self.phase, Phase::Safety) && how != Death::Clean {
            let delay = self.rng.between(100_000, 1_500_000);
            self.schedule_restart(n, delay);
        }
    }

    /// Starts node `n` again after `delay_us`.
    pub fn schedule_restart(&mut self, n: usize, delay_us: u64) {
        self.nodes[n].restart_scheduled = true;
        let inc = self.nodes[n].inc;
        self.schedule(self.now + delay_us, Event::Restart { node: n, inc });
    }

    // ----- the link ----------------------------------------------------------

    fn send(&mut self, n: usize, msg: Message<Vec<u8>>) {
        match msg {
            Message::SyncDone { .. } if self.net.held_by(n).is_some() => {
                self.checker.sync_done_sent(n);
            }
            _ => {}
        }
        if let Some(seqs) = msg.acked_seqs() {
            self.figures.ack_messages += 1;
            self.figures.acks += seqs.len() as u64;
        }
        let conn = self.net.held_by(n);
        if let Some((lane, at)) = self.net.send(n, msg, self.now, &mut self.rng) {
            if let Some(conn) = conn {
                self.schedule(
                    at,
                    Event::Deliver {
                        conn,
                        sender: n,
                        lane,
                    },
                );
            }
        }
    }

    /// Messages from `sender` on `lane` arrive. A delivery batch comes from
    /// one lane only, as the daemon has one receiver task per stream.
    fn deliver(&mut self, conn: u64, sender: usize, lane: Lane) {
        let Some(msg) = self.net.pop_arrived(conn, sender, lane, self.now) else {
            return;
        };
        let receiver = 1 - sender;
        if self.net.held_by(receiver) != Some(conn) {
            return;
        }
        // The batching and merging scenarios: every message that has arrived
        // (in the batching scenario, also within the driver's wake-up delay)
        // goes to the core in one step, as the daemon's reader hands a
        // received batch over under one lock (`try_recv_buffered`), so their
        // acks batch and their writes share one drain.
        let flush_overtakes = self.net.lane_counts.flush_overtakes;
        let mut batch = vec![msg];
        // The bulk lane's messages go one at a time, as the daemon's bulk
        // reader hands each over on its own once the main frames sent before
        // it were handed over (gathering later ones early could pass those).
        let gather = match (self.batching, self.merge.is_some()) {
            _ if lane == Lane::Bulk => None,
            (Some(b), _) => Some(b.gather_us),
            (None, true) => Some(0),
            (None, false) => None,
        };
        if let Some(gather_us) = gather {
            while batch.len() < BATCH_MESSAGES.min(DELIVER_BATCH_MAX) {
                match self
                    .net
                    .pop_arrived(conn, sender, lane, self.now + gather_us)
                {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            if batch.len() > 1 {
                self.figures.message_batches += 1;
            }
        }
        if self.net.lane_counts.flush_overtakes > flush_overtakes {
            self.flush_overtook(receiver);
        }
        if self.opts.trace_all {
            for msg in &batch {
                let line = format!(
                    "{} → {}: {}{}",
                    NAMES[sender],
                    NAMES[receiver],
                    describe_message(msg),
                    if lane == Lane::Bulk {
                        " (bulk lane)"
                    } else {
                        ""
                    }
                );
                self.note(line);
            }
        }
        self.with_core(receiver, |c, now| {
            for msg in batch {
                c.handle_message_on(now, lane, msg);
            }
        });
    }

    /// The lanes scenario: a flush overtook a bulk write on its way to
    /// `receiver`, whose acknowledgement of the flush will not cover that
    /// write. Now and then the receiver loses power soon after (once the
    /// write may have landed in its page cache only, or while it is still
    /// in flight).
    fn flush_overtook(&mut self, receiver: usize) {
        if self.phase != Phase::Safety {
            return;
        }
        let Some(l) = self.net.lanes.as_mut() else {
            return;
        };
        let Some(one_in) = l.power_cut_one_in else {
            return;
        };
        if !l.rng.one_in(one_in) {
            return;
        }
        let at = self.now + l.rng.between(0, l.bulk_delay_max_us * 2);
        self.note(format!(
            "a flush overtook a bulk write: {} will lose power",
            NAMES[receiver]
        ));
        self.schedule(at, Event::PowerCut { node: receiver });
    }

    /// Node `n`'s driver closes its end (its core said so): the peer learns
    /// it from the close, or by its idle timeout if that direction is cut.
    fn close_link_end(&mut self, n: usize, closed_by_core: bool) {
        let Some(conn) = self.net.held_by(n) else {
            return;
        };
        self.net.close_end(n, closed_by_core);
        if self.net.held_by(1 - n) == Some(conn) {
            let at = if self.net.blocked[n] {
                self.now + PING_TIMEOUT_US
            } else {
                self.now + self.net.delay(n, self.now, &mut self.rng)
            };
            self.schedule(
                at,
                Event::LinkLost {
                    node: 1 - n,
                    conn,
                    reason: "the peer closed the connection",
                },
            );
        }
        if n == 0 {
            self.want_dial(BACKOFF_MIN_US);
        }
    }

    fn link_lost(&mut self, n: usize, conn: u64, reason: &'static str) {
        if self.net.held_by(n) != Some(conn) {
            return;
        }
        self.close_link_end(n, false);
        self.with_core(n, |c, now| c.handle_disconnected(now, reason));
    }

    fn idle(&mut self, sender: usize, conn: u64, token: u64) {
        if !self.net.blocked[sender] || self.net.block_token[sender] != token {
            return;
        }
        let receiver = 1 - sender;
        self.link_lost(receiver, conn, "the peer went silent (idle timeout)");
    }

    fn want_dial(&mut self, delay: u64) {
        if !self.dial_pending {
            self.dial_pending = true;
            self.schedule(self.now + delay, Event::Dial);
        }
    }

    /// Node 0 dials (as the daemon with the lower id does), with backoff.
    fn dial(&mut self) {
        self.dial_pending = false;
        let Some(core) = self.nodes[0].core.as_ref() else {
            return;
        };
        if self.net.held_by(0).is_some() {
            return;
        }
        if core.is_standalone() {
            // Waits for `pairbd connect`.
            self.want_dial(100_000);
            return;
        }
        let reachable = self.nodes[1].up() && !self.net.blocked[0] && !self.net.blocked[1];
        if !reachable {
            let wait = self.dial_backoff;
            self.dial_backoff = (self.dial_backoff * 2).min(BACKOFF_MAX_US);
            self.want_dial(wait);
            return;
        }
        self.dial_backoff = BACKOFF_MIN_US;
        if self.net.held_by(1).is_some() {
            // The acceptor's driver replaces its old link.
            self.close_link_end(1, false);
            self.with_core(1, |c, now| {
                c.handle_disconnected(now, "replaced by a new connection")
            });
        }
        self.net.conn = None;
        let id = self.net.open();
        self.figures.connections += 1;
        self.note(format!("link {id} up"));
        self.note_states();
        let first = self.rng.below(2) as usize;
        for n in [first, 1 - first] {
            if self.net.held_by(n) == Some(id) {
                self.with_core(n, |c, now| c.handle_connected(now));
            }
        }
    }

    /// Blocks the direction from `sender` for `duration_us`.
    pub fn partition(&mut self, sender: usize, duration_us: u64) {
        let token = self.net.block(sender);
        if let Some(conn) = self.net.conn.as_ref().map(|c| c.id) {
            let at = self.now + PING_TIMEOUT_US + self.rng.below(200_000);
            self.schedule(
                at,
                Event::Idle {
                    sender,
                    conn,
                    token,
                },
            );
        }
        self.schedule(self.now + duration_us, Event::Heal { sender, token });
    }

    fn heal(&mut self, sender: usize, token: u64) {
        if self.net.block_token[sender] != token || !self.net.blocked[sender] {
            return;
        }
        self.heal_direction(sender);
    }

    /// Lets packets from `sender` through again.
    pub fn heal_direction(&mut self, sender: usize) {
        let times = self.net.unblock(sender, self.now, &mut self.rng);
        if let Some(conn) = self.net.conn.as_ref().map(|c| c.id) {
            for (lane, at) in times {
                self.schedule(at, Event::Deliver { conn, sender, lane });
            }
        }
        self.note(format!(
            "direction {}→{} healed",
            NAMES[sender],
            NAMES[1 - sender]
        ));
    }

    /// Resets the connection at once (both ends learn it shortly).
    pub fn cut_link(&mut self) {
        let Some(conn) = self.net.conn.as_ref().map(|c| c.id) else {
            return;
        };
        self.figures.link_cuts += 1;
        self.note(format!("link {conn} reset"));
        // Everything in flight is lost with the connection.
        self.net.reset();
        for n in 0..2 {
            let at = self.now + self.rng.between(0, 5_000);
            self.schedule(
                at,
                Event::LinkLost {
                    node: n,
                    conn,
                    reason: "connection reset",
                },
            );
        }
    }

    // ----- clients and admin -----------------------------------------------

    /// Hands a client request to node `n`'s core.
    pub fn submit(&mut self, client: usize, n: usize, kind: ReqKind, op: ClientOp<Vec<u8>>) {
        self.submit_many(client, n, vec![(kind, op)]);
        if self.max_inflight_bytes != u64::MAX {
            let st = self.status(n);
            if st.is_some_and(|s| s.window_waiting > 0) {
                self.figures.window_waits += 1;
            }
        }
    }

    /// Hands several client requests to node `n`'s core in one go (the
    /// merging scenario's bursts: requests the driver found queued together
    /// and handled under one lock), so their disk operations share a drain.
    pub fn submit_many(
        &mut self,
        client: usize,
        n: usize,
        reqs: Vec<(ReqKind, ClientOp<Vec<u8>>)>,
    ) {
        let mut ops = Vec::with_capacity(reqs.len());
        for (kind, op) in reqs {
            let id = self.next_request;
            self.next_request += 1;
            self.requests.insert(
                id,
                Request {
                    client,
                    node: n,
                    kind,
                },
            );
            self.clients[client].outstanding += 1;
            self.figures.client_ops += 1;
            if let ReqKind::Flush = kind {
                self.checker.submit_flush(id);
            }
            ops.push((id, op));
        }
        self.with_core(n, |c, now| {
            for (id, op) in ops {
                c.handle_client(now, RequestId(id), op);
            }
        });
    }

    fn replicating(&self, n: usize) -> bool {
        self.nodes[n].core.as_ref().is_some_and(|c| {
            let st = c.status(self.instant());
            st.connection == ConnectionState::Connected && !st.peer_sync_needed
        })
    }

    fn on_reply(&mut self, n: usize, id: u64, result: Result<(), ReplyError>) {
        let Some(r) = self.requests.remove(&id) else {
            self.fail(Violation::Contract(format!(
                "{} answered request {id}, which it does not have (twice?)",
                NAMES[n]
            )));
            return;
        };
        if r.node != n {
            self.fail(Violation::Contract(format!(
                "{} answered request {id} of the other node",
                NAMES[n]
            )));
            return;
        }
        self.clients[r.client].outstanding -= 1;
        let replicated = result.is_ok() && self.replicating(n);
        let stores = [&self.nodes[0].store, &self.nodes[1].store];
        let checked = match (r.kind, &result) {
            (ReqKind::Write(w), Ok(())) => self.checker.write_acked(w, n, replicated, stores),
            (ReqKind::Write(w), Err(ReplyError::NotPrimary | ReplyError::OutOfRange)) => {
                self.checker.write_refused(w);
                Ok(())
            }
            (ReqKind::Write(w), Err(_)) => {
                self.checker.write_failed(w);
                Ok(())
            }
            (ReqKind::Flush, _) => {
                self.checker
                    .flush_done(id, n, result.is_ok(), replicated, stores)
            }
        };
        if let Err(v) = checked {
            self.fail(v);
        }
    }

    /// Hands an admin command to node `n`; `None` if it is down.
    pub fn admin(&mut self, n: usize, cmd: AdminCommand) -> Option<u64> {
        let core = self.nodes[n].core.as_ref()?;
        let generation_before = core.status(self.instant()).generations.current;
        let id = self.next_admin;
        self.next_admin += 1;
        self.note(format!("operator → {}: {cmd:?}", NAMES[n]));
        self.admins.insert(
            id,
            AdminWait {
                node: n,
                cmd: cmd.clone(),
                answer: None,
                generation_before,
            },
        );
        self.with_core(n, |c, now| c.handle_admin(now, AdminId(id), cmd));
        Some(id)
    }

    fn on_admin_done(
        &mut self,
        n: usize,
        id: AdminId,
        result: Result<String, pairbd_repl_core::AdminError>,
    ) {
        let result = result.map_err(|e| e.0);
        self.note(format!("{} answers: {result:?}", NAMES[n]));
        self.note_states();
        let Some(wait) = self.admins.get_mut(&id.0) else {
            return;
        };
        wait.answer = Some(result.clone());
        let (cmd, gen_before) = (wait.cmd.clone(), wait.generation_before);
        let Ok(msg) = result else { return };
        if let AdminCommand::Promote { force, .. } = cmd {
            if msg.starts_with("already") {
                return;
            }
            let new_line = self
                .status(n)
                .as_ref()
                .is_some_and(|s| s.generations.current != gen_before);
            // A forced promotion that began no new generation is one the
            // core carried out as an ordinary promotion (an UpToDate node:
            // `--force` changes nothing there), and the peer's line can
            // still win at the next meeting: it is checked as one
            // (`watch_promotions`), not as the operator choosing this node's
            // data. (Found by seed 1917 of the merging scenario: a
            // "forced" promotion during an unnoticed partition, whose node
            // then crashed before writing, was resynced from the other
            // Primary as it must be, and the model had adopted its data.)
            if force && new_line {
                let stores = [&self.nodes[0].store, &self.nodes[1].store];
                self.figures.forced_promotions += 1;
                let in_flight = self.blocks_in_flight(n);
                self.checker.forced(n, stores, new_line, &in_flight);
                self.nodes[n].just_forced = true;
            }
            self.attached = Some(n);
        }
    }

    /// Node `n`'s status, if it runs.
    pub fn status(&self, n: usize) -> Option<Status> {
        self.nodes[n]
            .core
            .as_ref()
            .map(|c| c.status(self.instant()))
    }

    /// Whether node `n` runs as Primary and serves clients.
    pub fn serves(&self, n: usize) -> bool {
        self.nodes[n]
            .core
            .as_ref()
            .is_some_and(|c| c.serves_clients())
    }

    // ----- continuous checks -----------------------------------------------

    fn after_event(&mut self) {
        if self.violation.is_some() {
            return;
        }
        self.watch_promotions();
        self.watch_standalone();
        self.check_split_brain();
        if self.figures.events % 64 == 0 {
            self.checkpoint();
        }
    }

    /// Every node's blocks against the model, and the stores against each
    /// other when the pair is in service and at rest.
    pub fn checkpoint(&mut self) {
        for n in 0..2 {
            let stores = [&self.nodes[0].store, &self.nodes[1].store];
            if let Err(v) = self.checker.check_node(n, stores[n], 1, "continuous check") {
                self.fail(v);
                return;
            }
        }
        self.check_divergence(false);
    }

    /// Invariant 3: Connected, one Primary and one Secondary, both UpToDate,
    /// no sync running or owed, nothing in flight on the link or to the
    /// metadata: every block not being written must be identical.
    pub fn check_divergence(&mut self, whole: bool) -> bool {
        let (Some(a), Some(b)) = (self.status(0), self.status(1)) else {
            return false;
        };
        let in_service = a.connection == ConnectionState::Connected
            && b.connection == ConnectionState::Connected
            && a.role != b.role
            && a.disk == pairbd_repl_core::DiskState::UpToDate
            && b.disk == pairbd_repl_core::DiskState::UpToDate
            && a.sync.is_none()
            && b.sync.is_none()
            && !(if a.role == Role::Primary { &a } else { &b }).peer_sync_needed
            && self.net.quiet()
            && self.nodes.iter().all(|n| n.meta_pending.is_none());
        if !in_service {
            return false;
        }
        if whole && !self.settled() {
            return false;
        }
        let mut busy = vec![false; self.profile.blocks];
        for r in self.requests.values() {
            if let ReqKind::Write(w) = r.kind {
                if let Some((first, count)) = self.workload_blocks(w) {
                    busy[first..first + count]
                        .iter_mut()
                        .for_each(|x| *x = true);
                }
            }
        }
        for n in 0..2 {
            for (b, writing) in self.blocks_in_flight(n).into_iter().enumerate() {
                busy[b] |= writing;
            }
        }
        // Corruption the simulator injected is no divergence until the final
        // comparison: verify and resync-marked must have repaired it by then.
        let injected = |blk: usize| {
            !whole
                && (0..2).any(|n| {
                    decode(self.nodes[n].store.cached(blk), blk as u64) == Content::Injected
                })
        };
        let differ: Vec<usize> = (0..self.profile.blocks)
            .filter(|&blk| {
                !busy[blk]
                    && self.nodes[0].store.cached(blk) != self.nodes[1].store.cached(blk)
                    && !injected(blk)
            })
            .collect();
        if let Some(&first) = differ.first() {
            self.fail(Violation::Divergence {
                blocks: differ.len(),
                first,
                a: Checker::describe_block(&self.nodes[0].store, first),
                b: Checker::describe_block(&self.nodes[1].store, first),
            });
            return false;
        }
        self.figures.divergence_checks += 1;
        true
    }

    /// The blocks a write issued to node `n`'s disk will still change.
    fn blocks_in_flight(&self, n: usize) -> Vec<bool> {
        let mut busy = vec![false; self.profile.blocks];
        for p in self.nodes[n].disk_pending.values() {
            if let Some((offset, len)) = disk_range(&p.op) {
                let first = (offset as usize) / BLOCK_BYTES;
                let last = ((offset + len) as usize).div_ceil(BLOCK_BYTES);
                busy[first..last].iter_mut().for_each(|x| *x = true);
            }
        }
        busy
    }

    /// Nothing in flight anywhere: no request, no disk or metadata write, no
    /// message.
    pub fn settled(&self) -> bool {
        self.requests.is_empty()
            && self.net.quiet()
            && self
                .nodes
                .iter()
                .all(|n| n.disk_pending.is_empty() && n.meta_pending.is_none())
    }

    fn workload_blocks(&self, write: u64) -> Option<(usize, usize)> {
        self.checker.write_blocks(write)
    }

    /// Every promotion without --force (by the operator, or a crashed
    /// primary resuming by itself): invariant 5, then invariant 1.
    fn watch_promotions(&mut self) {
        for n in 0..2 {
            let serving = self.serves(n);
            let edge = serving && !self.nodes[n].serving;
            self.nodes[n].serving = serving;
            if !edge || std::mem::take(&mut self.nodes[n].just_forced) {
                continue;
            }
            self.figures.promotions += 1;
            let disk = self.nodes[n].core.as_ref().map(|c| c.disk());
            if let Some(disk) = disk.filter(|d| *d != pairbd_repl_core::DiskState::UpToDate) {
                self.fail(Violation::UnsafePromotion {
                    node: n,
                    disk: format!("{disk:?}"),
                });
                return;
            }
            let stores = [&self.nodes[0].store, &self.nodes[1].store];
            if let Err(v) = self.checker.promoted(n, stores) {
                self.fail(v);
                return;
            }
        }
    }

    fn watch_standalone(&mut self) {
        for (n, name) in NAMES.iter().enumerate() {
            let standalone = self.nodes[n]
                .core
                .as_ref()
                .is_some_and(|c| c.is_standalone());
            if standalone && !self.nodes[n].was_standalone {
                self.figures.standalone_episodes += 1;
                let real = self.checker.diverged(0) && self.checker.diverged(1);
                if !real {
                    self.figures.standalone_without_data_split += 1;
                }
                self.note(format!(
                    "{} is StandAlone (checker: {})",
                    name,
                    if real {
                        "both changed data apart"
                    } else {
                        "not both changed data"
                    }
                ));
            }
            self.nodes[n].was_standalone = standalone;
        }
    }

    /// Invariant 4: two nodes that both changed the data apart must never be
    /// Connected to each other.
    fn check_split_brain(&mut self) {
        if !(self.checker.diverged(0) && self.checker.diverged(1)) {
            return;
        }
        let Some(conn) = self.net.conn.as_ref() else {
            return;
        };
        if !(conn.open[0] && conn.open[1]) {
            return;
        }
        let connected = (0..2).all(|n| {
            self.nodes[n]
                .core
                .as_ref()
                .is_some_and(|c| c.status(self.instant()).connection == ConnectionState::Connected)
        });
        // `after-split-brain = "discard-zero-changes"`: a node that diverged
        // only by a forced promotion, with no write of its own, is
        // discarded by the policy, as an operator would: the model gives its
        // data up. (A wrong choice still fails the sync's checks.)
        let zero_changes = (0..2).find(|&n| !self.checker.changed_alone(n));
        if connected
            && self.profile.after_split_brain
                == pairbd_repl_core::AfterSplitBrain::DiscardZeroChanges
        {
            if let Some(victim) = zero_changes {
                self.note(format!(
                    "discard-zero-changes: {} changed nothing alone; its data is given up",
                    NAMES[victim]
                ));
                self.checker.discarded(victim);
                return;
            }
        }
        if connected {
            self.fail(Violation::UndetectedSplitBrain(
                "both nodes acknowledged writes the other does not have, and they connected \
                 instead of going StandAlone"
                    .into(),
            ));
        }
    }
}

fn disk_range(op: &DiskOp<Vec<u8>>) -> Option<(u64, u64)> {
    match op {
        DiskOp::Write {
            offset, payload, ..
        } => Some((*offset, payload.len() as u64)),
        DiskOp::Trim { offset, length } | DiskOp::WriteZeroes { offset, length, .. } => {
            Some((*offset, *length))
        }
        DiskOp::Flush | DiskOp::Read { .. } => None,
    }
}

fn describe_message(msg: &Message<Vec<u8>>) -> String {
    match msg {
        Message::Write {
            seq,
            offset,
            payload,
            fua,
        } => format!(
            "write seq {seq} block {} ×{}{}",
            offset / BLOCK_BYTES as u64,
            payload.len() / BLOCK_BYTES,
            if *fua { " fua" } else { "" }
        ),
        Message::SyncData {
            seq,
            offset,
            payload,
        } => format!(
            "sync-data seq {seq} block {} ×{}",
            offset / BLOCK_BYTES as u64,
            payload.len() / BLOCK_BYTES
        ),
        Message::Hello(h) => format!(
            "hello {:?} psn {} unclean {}",
            h.state, h.peer_sync_needed, h.unclean_primary
        ),
        other => format!("{other:?}"),
    }
}

fn describe_disk(op: &DiskOp<Vec<u8>>) -> String {
    match disk_range(op) {
        Some((offset, len)) => format!(
            "{} block {} ×{}",
            match op {
                DiskOp::Write { fua: true, .. } => "write fua",
                DiskOp::Write { .. } => "write",
                DiskOp::Trim { .. } => "trim",
                _ => "write-zeroes",
            },
            offset / BLOCK_BYTES as u64,
            len / BLOCK_BYTES as u64
        ),
        None => match op {
            DiskOp::Flush => "flush".into(),
            _ => "read".into(),
        },
    }
}
