//! Seeds that found bugs in the core. Each one breaks an invariant when its
//! fix in `src/repl-core/src/node.rs` is reverted (checked when the fix was
//! made, against this version of the simulator), and must replay clean now.
//! A change to the simulator that changes what a seed does makes these seeds
//! weaker, not wrong: `src/repl-core/tests/sim_found.rs` keeps a
//! deterministic scenario for the fixes as well.

use pairbd_sim::{run_seed, Options};

/// (seed, the bug it found — what breaks with the fix reverted).
const FOUND: &[(u64, &str)] = &[
    (
        3061,
        "liveness: with the activity log full, a steady stream of writes to its hot extents \
         starved a write to a cold one, and the sync chunk waiting behind it",
    ),
    (
        4917,
        "split brain: a demotion dropped a sync whose SyncDone was out but unacknowledged \
         without rejoining the peer's line; a later write did not begin a generation",
    ),
    (
        2623,
        "liveness: a rate-limited sync chunk whose turn came while another input moved the \
         core's clock on was never timed",
    ),
    (
        3283,
        "liveness: a demotion without --force under suspend-io waited forever for its own \
         flush of both stores, held by the suspension",
    ),
    (
        3428,
        "liveness: `demote --force` waited forever for requests held by suspend-io",
    ),
    (
        3911,
        "liveness: `demote --force` waited forever for requests held by suspend-io \
         (the peer, Primary too, never came back)",
    ),
    (
        827,
        "liveness: a link lost during a forced demotion suspended the requests the demotion \
         waited for",
    ),
    (
        0,
        "liveness: a link lost during a forced demotion suspended the requests it waited for",
    ),
    (
        7,
        "divergence: a clean stop erased the unclean-primary mark before any sync settled it",
    ),
    (
        95,
        "divergence: a clean stop erased the unclean-primary mark before any sync settled it",
    ),
    (
        82,
        "divergence: a primary left the role without flushing; a power cut of a Secondary \
         then lost acknowledged writes unnoticed",
    ),
    (
        398,
        "divergence: a primary left the role without flushing both stores",
    ),
    (
        4408,
        "split brain: a crashed primary resuming (after-crash = resume-primary) served before \
         its promotion was durable and synced its peer over acknowledged writes",
    ),
    (
        6249,
        "lost write: a resuming crashed primary served before its promotion was durable",
    ),
    (
        283,
        "divergence: a node stayed UpToDate though its peer's hello said it owed a sync on the \
         same generation",
    ),
    (
        642,
        "divergence: a node stayed UpToDate though its peer owed it a sync",
    ),
    (
        6296,
        "split brain: a lost SyncDoneAck left the source's bitmap generation set; its later \
         writes alone began no new generation and the split passed for 'ahead'",
    ),
    (
        7762,
        "split brain: a lost SyncDoneAck left the source's bitmap generation set",
    ),
    (
        30,
        "flush durability: chunks of a sync abandoned by a demotion counted in the next sync, \
         which finished with a stale range on an 'UpToDate' target",
    ),
    (
        1576,
        "flush durability: chunks of an abandoned sync counted in the next one",
    ),
];

#[test]
fn seeds_that_found_core_bugs_replay_clean() {
    let mut failures = Vec::new();
    for &(seed, what) in FOUND {
        // Without the online-verify scenario (drawn in 40% of the profiles
        // since) and the merging scenario (50%): each seed replays the very
        // run that found its bug.
        let mut opts = Options::new(seed);
        opts.verify_scenario = false;
        // Nor the batching scenario (drawn in half of them since).
        opts.batch_scenario = false;
        opts.merge_scenario = false;
        // Nor the in-flight window scenario (drawn in 40% of the profiles).
        opts.window_scenario = false;
        // Nor the lanes scenario (drawn in 35% of the seeds).
        opts.lanes_scenario = false;
        let outcome = run_seed(opts);
        if outcome.violation.is_some() {
            failures.push(format!("regression ({what}):\n{}", outcome.report(None)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
