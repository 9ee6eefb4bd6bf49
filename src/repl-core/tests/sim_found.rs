//! Bugs the simulator (`src/sim`) found in the core, each replayed here as one
//! deterministic scenario, so that a regression shows even after the
//! simulator's seeds have moved on (its own regression seeds are in
//! `src/sim/tests/regressions.rs`).

mod harness;

use harness::{config, Pair};
use pairbd_repl_core::{AdminCommand, AfterCrash, ClientOp, OnPeerLoss, Role};

const A: usize = 0;
const B: usize = 1;

/// Two Secondaries keep no transfer log: a write that is durable on neither
/// would be lost, unnoticed, by a power cut. So a demotion flushes both first.
#[test]
fn a_demotion_makes_every_acknowledged_write_durable_on_both() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 4096, 7, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert_ne!(p.nodes[B].durable[4096], 7, "not flushed yet");
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    assert_eq!(p.nodes[A].meta.role, Role::Secondary);
    assert_eq!(p.nodes[A].durable[4096], 7, "flushed on the demoted node");
    assert_eq!(p.nodes[B].durable[4096], 7, "flushed on the peer");
}

/// A node that came back from a crash as Primary keeps that mark through a
/// clean stop: its data may still differ from the peer's.
#[test]
fn a_clean_stop_keeps_the_mark_of_an_earlier_crash() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.write(A, 0, 3, 4096);
    p.run_until_idle();
    p.restart(A);
    assert_eq!(p.nodes[A].meta.role, Role::Primary, "crashed as Primary");
    p.admin(A, AdminCommand::Shutdown).unwrap();
    assert_eq!(
        p.nodes[A].meta.role,
        Role::Primary,
        "the clean stop erased the crash mark"
    );
}

/// A flush the peer did not confirm before the link went changes no data:
/// the peer needs a sync, but no new generation begins (else the next
/// meeting after a failover would be a split brain).
#[test]
fn an_unconfirmed_flush_begins_no_new_generation() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.write(A, 0, 5, 4096);
    p.run_until_idle();
    let before = p.nodes[A].node.status(p.now).generations;
    let f = p.client(A, ClientOp::Flush);
    p.cut_link("test cut");
    p.run_until_idle();
    assert_eq!(p.reply(A, f), Some(&Ok(())));
    let st = p.nodes[A].node.status(p.now);
    assert_eq!(st.generations, before, "a new generation began");
    assert!(st.peer_sync_needed, "the peer still needs a sync");
}

/// A crashed primary resuming by itself (`after-crash = resume-primary`)
/// serves only once its promotion is durable, as any promotion: its
/// metadata already said Primary before.
#[test]
fn a_resuming_primary_serves_only_once_its_promotion_is_durable() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.write(A, 0, 9, 4096);
    p.run_until_idle();
    let mut cfg = config("alpha", OnPeerLoss::Continue);
    cfg.after_crash = AfterCrash::ResumePrimary;
    p.restart_with(A, cfg);
    p.connect();
    // Alpha reads beta's hello and resumes; its metadata write is pending.
    p.deliver(A);
    assert_eq!(p.nodes[A].node.role(), Role::Primary);
    assert!(!p.nodes[A].meta_queue.is_empty());
    assert!(
        !p.nodes[A].node.serves_clients(),
        "serves before the promotion is durable"
    );
    p.run_until_idle();
    assert!(p.nodes[A].node.serves_clients());
}

/// A sync source demoted mid-sync sends no more chunks: the target learns it
/// from the source's State and stops being "the target of a running sync",
/// so it can take part in the next sync (or a forced promotion).
#[test]
fn a_target_stops_waiting_when_its_sync_source_is_demoted() {
    let mut p = Pair::new(OnPeerLoss::Continue);
    p.connect();
    p.run_until_idle();
    let id = pairbd_repl_core::AdminId(900);
    p.nodes[A].node.handle_admin(
        p.now,
        id,
        AdminCommand::Promote {
            force: true,
            new_generation: 5,
        },
    );
    p.drain();
    p.complete_meta(A); // promotion durable: State and SyncStart go out
    p.deliver(B); // State
    p.deliver(B); // SyncStart: beta (Inconsistent already) answers SyncReady
    assert!(
        p.nodes[B].node.status(p.now).sync.is_some(),
        "beta is the target"
    );
    p.admin(A, AdminCommand::Demote { force: true }).unwrap();
    assert!(
        p.nodes[B].node.status(p.now).sync.is_none(),
        "beta still waits for a sync nobody runs"
    );
    p.admin(
        B,
        AdminCommand::Promote {
            force: true,
            new_generation: 6,
        },
    )
    .unwrap();
}

/// Seed 3283: a demotion without --force under suspend-io, with no client
/// request left, waited forever for its own flush of both stores, which the
/// suspension held (and a later `demote --force` was refused as "already
/// waiting").
#[test]
fn a_demotion_under_suspend_io_is_not_held_by_the_suspension() {
    let mut p = Pair::synced(OnPeerLoss::SuspendIo);
    let w = p.write(A, 0, 3, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    p.cut_link("partition");
    assert!(p.nodes[A].node.status(p.now).io_suspended);
    let r = p.admin(A, AdminCommand::Demote { force: false });
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(p.nodes[A].node.role(), pairbd_repl_core::Role::Secondary);
    assert!(p.nodes[A].meta.peer_sync_needed, "the mark stays");
}
