//! The figures a run (or a swarm of runs) ends with.

use std::fmt;

use crate::checker::CheckerCounts;

/// Counts of what happened and what was checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Seeds run.
    pub seeds: u64,
    /// Seeds that broke an invariant.
    pub failed_seeds: u64,
    /// Simulated events processed.
    pub events: u64,
    /// Simulated time, in ms.
    pub sim_ms: u64,
    /// Client requests handed to a core (reads excluded).
    pub client_ops: u64,
    /// Writes acknowledged to clients.
    pub writes_acked: u64,
    /// Acknowledged writes some check found where they had to be.
    pub acked_writes_checked: u64,
    /// Client reads checked.
    pub reads_checked: u64,
    /// Flushes acknowledged.
    pub flushes_acked: u64,
    /// Failovers (the primary killed or power-cut, the other promoted).
    pub failovers: u64,
    /// Failovers the survivor refused (it was not a valid copy).
    pub failovers_refused: u64,
    /// Planned switchovers.
    pub switchovers: u64,
    /// Promotions without --force that succeeded.
    pub promotions: u64,
    /// Promotions with --force that succeeded.
    pub forced_promotions: u64,
    /// Power cuts (each node counted).
    pub power_cuts: u64,
    /// Process kills.
    pub kills: u64,
    /// Injected I/O errors that struck.
    pub eio: u64,
    /// Connections reset.
    pub link_cuts: u64,
    /// Partitions (full or one-way).
    pub partitions: u64,
    /// Connections made.
    pub connections: u64,
    /// Syncs finished (full or from the bitmaps): a Secondary became UpToDate.
    pub syncs: u64,
    /// Times a node went StandAlone.
    pub standalone_episodes: u64,
    /// ... of which without both nodes having changed data apart (the
    /// generations saw a split that the data did not show: safe, but the
    /// operator had to resolve it).
    pub standalone_without_data_split: u64,
    /// Split brains the operator resolved by discarding a side.
    pub split_brains_resolved: u64,
    /// Times the two stores were compared in service.
    pub divergence_checks: u64,
    /// Whole-store comparisons at the end of a run.
    pub final_compares: u64,
    /// Safety-phase samples (one per injected action) ...
    pub samples: u64,
    /// ... of which the pair was in service (a Primary serving, connected to
    /// an UpToDate Secondary).
    pub samples_in_service: u64,
    /// Online verifies that ran to the end (scenario and repair).
    pub verifies: u64,
    /// 4 KiB blocks the simulator corrupted on a Secondary's store.
    pub blocks_corrupted: u64,
    /// 4 KiB blocks the verifies reported as differing.
    pub blocks_found: u64,
    /// Corrupted 4 KiB blocks with no corrupted byte left on either store at
    /// the end of the run (resynced, or overwritten by a client).
    pub blocks_repaired: u64,
    /// Corrupted 4 KiB blocks that ended on both stores (the corrupted node
    /// became the Primary first, and the resync carried its blocks over).
    pub blocks_carried_over: u64,
    /// Runs with the batching scenario (the drivers hand bursts of messages
    /// to the core and complete small writes in the same step).
    pub batching_runs: u64,
    /// Ack/Acks messages sent ...
    pub ack_messages: u64,
    /// ... and the writes and sync chunks they acknowledged.
    pub acks: u64,
    /// Verifies that reported a block nobody corrupted, or missed one.
    pub verify_violations: u64,
    /// Acknowledged writes found missing.
    pub lost: u64,
    /// Blocks that differed while the pair said it was in sync.
    pub divergent_blocks: u64,
    /// Split brains joined without StandAlone.
    pub undetected_split_brains: u64,
    /// Promotions of an Inconsistent or Outdated node without --force.
    pub unsafe_promotions: u64,
    /// Runs that did not come back into service in time.
    pub liveness_timeouts: u64,
    /// Runs with the merging scenario.
    pub merge_runs: u64,
    /// Bursts of adjacent client writes handed to a core together.
    pub client_bursts: u64,
    /// Message batches of more than one message handled together.
    pub message_batches: u64,
    /// Merged store writes (each carrying two or more of the core's writes).
    pub merged_writes: u64,
    /// The core's writes carried by merged store writes.
    pub merged_pieces: u64,
    /// Merged store writes in flight when their node was killed, lost
    /// power or fail-stopped (each landed whole or not at all; a power cut
    /// then keeps or loses each of its blocks on its own).
    pub merged_writes_at_stops: u64,
    /// Seeds whose cores ran with a small in-flight window.
    pub window_seeds: u64,
    /// Client requests handed to a core while writes waited for room in
    /// its in-flight window (the window bound).
    pub window_waits: u64,
    /// Seeds whose link had a bulk lane (the lanes scenario).
    pub lanes_seeds: u64,
    /// Messages sent on a bulk lane.
    pub bulk_messages: u64,
    /// Main-lane messages that arrived while a bulk-lane message sent
    /// before them was still in flight (they overtook it) ...
    pub lane_overtakes: u64,
    /// ... of which flushes.
    pub flush_overtakes: u64,
}

impl Figures {
    /// Takes the checker's counts.
    pub fn absorb(&mut self, c: CheckerCounts) {
        self.writes_acked = c.writes_acked;
        self.acked_writes_checked = c.acked_writes_checked;
        self.reads_checked = c.reads_checked;
        self.flushes_acked = c.flushes_acked;
    }

    /// Adds another run's figures.
    pub fn add(&mut self, o: &Figures) {
        macro_rules! add {
            ($($field:ident),*) => { $( self.$field += o.$field; )* };
        }
        add!(
            seeds,
            failed_seeds,
            events,
            sim_ms,
            client_ops,
            writes_acked,
            acked_writes_checked,
            reads_checked,
            flushes_acked,
            failovers,
            failovers_refused,
            switchovers,
            promotions,
            forced_promotions,
            power_cuts,
            kills,
            eio,
            link_cuts,
            partitions,
            connections,
            syncs,
            standalone_episodes,
            standalone_without_data_split,
            split_brains_resolved,
            divergence_checks,
            final_compares,
            samples,
            samples_in_service,
            lost,
            divergent_blocks,
            undetected_split_brains,
            unsafe_promotions,
            liveness_timeouts,
            verifies,
            blocks_corrupted,
            blocks_found,
            blocks_repaired,
            blocks_carried_over,
            verify_violations,
            batching_runs,
            ack_messages,
            acks,
            merge_runs,
            client_bursts,
            message_batches,
            merged_writes,
            merged_pieces,
            merged_writes_at_stops,
            window_seeds,
            window_waits,
            lanes_seeds,
            bulk_messages,
            lane_overtakes,
            flush_overtakes
        );
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seeds {} (failed {}), events {}, simulated {:.1}s",
            self.seeds,
            self.failed_seeds,
            self.events,
            self.sim_ms as f64 / 1000.0
        )?;
        writeln!(
            f,
            "client ops {}, writes acknowledged {}, acknowledged writes checked {}, reads checked {}, flushes {}",
            self.client_ops, self.writes_acked, self.acked_writes_checked, self.reads_checked, self.flushes_acked
        )?;
        writeln!(
            f,
            "failovers {} (refused {}), switchovers {}, promotions without --force {}, forced {}, power cuts {}, kills {}, EIO {}",
            self.failovers,
            self.failovers_refused,
            self.switchovers,
            self.promotions,
            self.forced_promotions,
            self.power_cuts,
            self.kills,
            self.eio
        )?;
        writeln!(
            f,
            "link resets {}, partitions {}, connections {}, syncs completed (full or bitmap) {}, StandAlone {} (no data split {}), split brains resolved {}, store comparisons {} (final {})",
            self.link_cuts,
            self.partitions,
            self.connections,
            self.syncs,
            self.standalone_episodes,
            self.standalone_without_data_split,
            self.split_brains_resolved,
            self.divergence_checks,
            self.final_compares
        )?;
        writeln!(
            f,
            "online verifies {}, 4 KiB blocks corrupted {}, found {}, repaired {} (carried over to both stores {})",
            self.verifies,
            self.blocks_corrupted,
            self.blocks_found,
            self.blocks_repaired,
            self.blocks_carried_over
        )?;
        writeln!(
            f,
            "batching runs {}, acks {} in {} messages ({:.2} per message)",
            self.batching_runs,
            self.acks,
            self.ack_messages,
            self.acks as f64 / self.ack_messages.max(1) as f64
        )?;
        writeln!(
            f,
            "merging scenario runs {}, client bursts {}, message batches {}, merged store writes {} carrying {} writes ({} in flight at a stop)",
            self.merge_runs,
            self.client_bursts,
            self.message_batches,
            self.merged_writes,
            self.merged_pieces,
            self.merged_writes_at_stops
        )?;
        writeln!(
            f,
            "in-flight window: seeds with a small window {}, requests submitted while writes waited for it {}",
            self.window_seeds, self.window_waits
        )?;
        writeln!(
            f,
            "lanes: seeds with a bulk lane {}, bulk-lane messages {}, main-lane messages that overtook one {} (flushes {})",
            self.lanes_seeds, self.bulk_messages, self.lane_overtakes, self.flush_overtakes
        )?;
        writeln!(
            f,
            "in service at {:.0}% of the safety phase's samples",
            self.samples_in_service as f64 * 100.0 / self.samples.max(1) as f64
        )?;
        write!(
            f,
            "lost {}, divergent blocks {}, undetected split brains {}, unsafe promotions {}, liveness timeouts {}, wrong verify reports {}",
            self.lost,
            self.divergent_blocks,
            self.undetected_split_brains,
            self.unsafe_promotions,
            self.liveness_timeouts,
            self.verify_violations
        )
    }
}
