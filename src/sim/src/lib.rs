//! A deterministic simulator of a pairbd pair (TigerBeetle's VOPR and
//! FoundationDB's simulation, at the scale of two nodes): two real
//! `pairbd_repl_core::Node`s driven through a simulated network, simulated
//! disks with volatile caches, crashes, power cuts, I/O errors and a
//! simulated operator, all decided by one seed, with checkers that run all
//! the time and at the end. A failing seed replays exactly.
//!
//! A run has a safety phase (faults everywhere, see `operator`) and a
//! liveness phase (faults heal; the pair must be back in service within a
//! bounded simulated time), then settles and compares both stores whole,
//! sometimes after a last power cut of both nodes. The invariants are listed
//! in docs/TESTING.md; `checker` explains the model that checks them.
//!
//! Architecture invariant: like the core, no IO, no clock, no threads —
//! simulated time only, so a run is a pure function of its seed (and of the
//! mutation switched on, if any).

pub mod checker;
pub mod content;
pub mod figures;
pub mod net;
mod operator;
pub mod rng;
pub mod store;
mod verify;
mod workload;
pub mod world;

pub use checker::Violation;
pub use figures::Figures;
pub use pairbd_repl_core::Mutation;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Decides everything.
    pub seed: u64,
    /// A deliberately broken variant of the core, to prove the checkers.
    pub mutation: Option<Mutation>,
    /// Print the run's story as it happens.
    pub trace: bool,
    /// With `trace`, also every message delivered and disk operation done.
    pub trace_all: bool,
    /// Simulated length of the safety phase.
    pub safety_ms: u64,
    /// How long the pair may take to come back once faults heal.
    pub liveness_ms: u64,
    /// A run that needs more events than this is stuck.
    pub max_events: u64,
    /// Whether the online-verify scenario may run (in the profiles that
    /// draw it). Off, every seed replays the run it had before the scenario
    /// existed (the regression seeds do).
    pub verify_scenario: bool,
    /// Whether the batching scenario may run (in the profiles that draw
    /// it): the drivers hand every message that has arrived to the core in
    /// one step and complete small plain writes in the step that submitted
    /// them, as the daemon's driver does, so acks batch. Off, every seed
    /// replays the run it had before the scenario existed.
    pub batch_scenario: bool,
    /// Whether the merging scenario may run (half the seeds draw it, from
    /// their own random stream): merged store writes, batched message
    /// delivery, bursts of adjacent client writes. Off, every seed replays
    /// the run it had before the scenario existed (the regression seeds do).
    pub merge_scenario: bool,
    /// Whether the in-flight window scenario may run (in the profiles that
    /// draw it: a small `max_inflight_bytes`, sometimes a slow link). Off,
    /// every seed replays the run it had before the scenario existed.
    pub window_scenario: bool,
    /// Whether the lanes scenario may run (35% of the seeds draw it, from
    /// their own random stream: client writes of at least a drawn size take
    /// a bulk lane that the main lane overtakes). Off, every seed replays
    /// the run it had before the scenario existed.
    pub lanes_scenario: bool,
}

impl Options {
    /// The defaults `cargo test` and the swarm use, for `seed`.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            mutation: None,
            trace: false,
            trace_all: false,
            safety_ms: 5_000,
            liveness_ms: 60_000,
            max_events: 3_000_000,
            verify_scenario: true,
            batch_scenario: true,
            merge_scenario: true,
            window_scenario: true,
            lanes_scenario: true,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The run's seed.
    pub seed: u64,
    /// What happened.
    pub figures: Figures,
    /// The first broken invariant, if any.
    pub violation: Option<Violation>,
    /// The last lines of the run's story (for a report).
    pub story: Vec<String>,
}

impl Outcome {
    /// A report naming the seed, the violation, the replay command and the
    /// story's end.
    pub fn report(&self, mutation: Option<Mutation>) -> String {
        let mut out = String::new();
        if let Some(v) = &self.violation {
            let m = mutation
                .map(|m| format!(" --mutation {}", mutation_name(m)))
                .unwrap_or_default();
            out.push_str(&format!(
                "seed {} failed: {v}\nreplay: cargo run -p pairbd-sim --release -- --seed {}{m} --trace\nlast events:\n",
                self.seed, self.seed
            ));
            for line in &self.story {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Runs one seed.
pub fn run_seed(opts: Options) -> Outcome {
    let seed = opts.seed;
    let mut sim = world::Sim::new(opts);
    let violation = sim.run();
    let mut figures = sim.figures;
    figures.seeds = 1;
    figures.window_seeds = u64::from(sim.max_inflight_bytes != u64::MAX);
    figures.lanes_seeds = u64::from(sim.bulk_lane_bytes != 0);
    if let Some(v) = &violation {
        figures.failed_seeds = 1;
        match v {
            Violation::LostWrite { .. } => figures.lost += 1,
            Violation::Divergence { blocks, .. } => figures.divergent_blocks += *blocks as u64,
            Violation::UndetectedSplitBrain(_) => figures.undetected_split_brains += 1,
            Violation::UnsafePromotion { .. } => figures.unsafe_promotions += 1,
            Violation::Liveness(_) => figures.liveness_timeouts += 1,
            Violation::Verify(_) => figures.verify_violations += 1,
            Violation::CoreFailStop { .. } | Violation::Panic(_) | Violation::Contract(_) => {}
        }
    }
    Outcome {
        seed,
        figures,
        violation,
        story: sim.trace_tail(60),
    }
}

/// The results of many seeds.
#[derive(Debug, Clone, Default)]
pub struct Swarm {
    /// Everything added up.
    pub figures: Figures,
    /// The runs that failed.
    pub failures: Vec<Outcome>,
}

/// Runs every seed in `seeds` with the given mutation, one after the other.
pub fn run_seeds(seeds: std::ops::Range<u64>, mutation: Option<Mutation>) -> Swarm {
    let make = |seed| {
        let mut opts = Options::new(seed);
        opts.mutation = mutation;
        opts
    };
    run_swarm(seeds, 1, make, false)
}

/// Runs every seed in `seeds` on `jobs` threads. Each run is single-threaded
/// and depends only on its options, so the results do not depend on `jobs`;
/// failures come back in seed order. `stop_on_failure`: no new seed starts
/// after a failure.
pub fn run_swarm(
    seeds: std::ops::Range<u64>,
    jobs: usize,
    make: impl Fn(u64) -> Options + Sync,
    stop_on_failure: bool,
) -> Swarm {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    let next = AtomicU64::new(seeds.start);
    let stop = AtomicBool::new(false);
    let swarm = Mutex::new(Swarm::default());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= seeds.end || stop.load(Ordering::Relaxed) {
                    return;
                }
                let outcome = run_seed(make(seed));
                let failed = outcome.violation.is_some();
                let mut s = swarm.lock().unwrap_or_else(|e| e.into_inner());
                s.figures.add(&outcome.figures);
                if failed {
                    s.failures.push(outcome);
                    if stop_on_failure {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut swarm = swarm.into_inner().unwrap_or_else(|e| e.into_inner());
    swarm.failures.sort_by_key(|o| o.seed);
    swarm
}

/// The command-line name of a mutation.
pub fn mutation_name(m: Mutation) -> &'static str {
    match m {
        Mutation::ReplyBeforePeerAck => "reply-before-peer-ack",
        Mutation::FlushNotForwarded => "flush-not-forwarded",
        Mutation::TransferLogIgnored => "transfer-log-ignored",
        Mutation::PromoteOutdated => "promote-outdated",
        Mutation::BitClearedBeforeTargetFlush => "bit-cleared-before-target-flush",
        Mutation::WriteBeforeAlEntryDurable => "write-before-al-entry-durable",
        Mutation::VerifyIgnoresExtentLock => "verify-ignores-extent-lock",
        Mutation::VerifyMarksNothing => "verify-marks-nothing",
        Mutation::AcksCumulative => "acks-cumulative",
        Mutation::MergeAcrossGap => "merge-across-gap",
        Mutation::WindowKeptAfterLinkLoss => "window-kept-after-link-loss",
        Mutation::WindowReleasedUnmarked => "window-released-unmarked",
        Mutation::FlushCoversOvertaken => "flush-covers-overtaken",
    }
}

/// Every mutation.
pub const MUTATIONS: [Mutation; 13] = [
    Mutation::ReplyBeforePeerAck,
    Mutation::FlushNotForwarded,
    Mutation::TransferLogIgnored,
    Mutation::PromoteOutdated,
    Mutation::BitClearedBeforeTargetFlush,
    Mutation::WriteBeforeAlEntryDurable,
    Mutation::VerifyIgnoresExtentLock,
    Mutation::VerifyMarksNothing,
    Mutation::AcksCumulative,
    Mutation::MergeAcrossGap,
    Mutation::WindowKeptAfterLinkLoss,
    Mutation::WindowReleasedUnmarked,
    Mutation::FlushCoversOvertaken,
];

/// The mutation with this command-line name.
pub fn parse_mutation(name: &str) -> Option<Mutation> {
    MUTATIONS.into_iter().find(|m| mutation_name(*m) == name)
}
