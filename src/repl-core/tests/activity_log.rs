//! The activity log in the core: a write to a cold extent waits for its
//! durable entry, cold entries wanted together share one metadata write, an
//! extent leaves the log only idle and flushed, and a crash as Primary at
//! each step costs a resync of the logged extents only.

mod harness;

use harness::{Pair, AL_EXTENT, AL_EXTENTS, SIZE};
use pairbd_repl_core::{AdminCommand, AfterCrash, ClientOp, DiskOp, OnPeerLoss};

const A: usize = 0;
const B: usize = 1;

fn disk_writes(p: &Pair, i: usize) -> usize {
    p.nodes[i]
        .disk_queue
        .iter()
        .filter(|(_, op)| matches!(op, DiskOp::Write { .. }))
        .count()
}

fn write_done(p: &mut Pair, extent: u64, byte: u8) {
    let w = p.write(A, extent * AL_EXTENT + 4096, byte, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
}

#[test]
fn a_write_to_a_cold_extent_waits_for_its_durable_entry() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.auto_al = false;
    let w = p.write(A, 3 * AL_EXTENT, 1, 4096);
    assert_eq!(disk_writes(&p, A), 0, "not on the local store yet");
    assert!(p.nodes[B].inbox.is_empty(), "not sent to the peer yet");
    assert_eq!(p.nodes[A].meta_queue.len(), 1);
    assert_eq!(p.nodes[A].meta_queue[0].3.extents, vec![3]);
    p.complete_meta(A);
    assert_eq!(disk_writes(&p, A), 1);
    assert_eq!(p.nodes[B].inbox.len(), 1);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    // A hot extent costs nothing.
    let before = p.nodes[A].meta_writes;
    let w = p.write(A, 3 * AL_EXTENT + 8192, 2, 4096);
    assert_eq!(disk_writes(&p, A), 1);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert_eq!(p.nodes[A].meta_writes, before);
}

#[test]
fn cold_writes_arriving_together_cost_one_metadata_write() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.auto_al = false;
    let first = p.write(A, 0, 1, 4096);
    assert_eq!(p.nodes[A].meta_queue.len(), 1, "the first one's entry");
    // Four more cold extents while that metadata write is in flight.
    let rest: Vec<_> = (1..5u64)
        .map(|e| p.write(A, e * AL_EXTENT, e as u8, 4096))
        .collect();
    assert_eq!(p.nodes[A].meta_queue.len(), 1, "batched, not emitted yet");
    p.complete_meta(A);
    assert_eq!(disk_writes(&p, A), 1, "only the first one may go");
    assert_eq!(p.nodes[A].meta_queue.len(), 1, "one write for the four");
    assert_eq!(p.nodes[A].meta_queue[0].3.extents, vec![0, 1, 2, 3, 4]);
    p.complete_meta(A);
    assert_eq!(disk_writes(&p, A), 5);
    p.run_until_idle();
    for id in std::iter::once(first).chain(rest) {
        assert_eq!(p.reply(A, id), Some(&Ok(())));
    }
    p.assert_same("after the batched writes");
}

#[test]
fn a_full_log_evicts_the_least_recently_used_idle_flushed_extent() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    // Extent 0 gets a write that stays in flight on alpha's store.
    let held_write = p.write(A, 100, 0x11, 512);
    let k = p.nodes[A]
        .disk_queue
        .iter()
        .position(|(_, op)| matches!(op, DiskOp::Write { .. }))
        .expect("the write is submitted");
    let held = p.nodes[A].disk_queue.remove(k);
    for e in 1..AL_EXTENTS as u64 {
        write_done(&mut p, e, e as u8);
    }
    assert_eq!(p.nodes[A].node.activity_log().len(), AL_EXTENTS);
    // No flush yet: nothing is evictable, so the core flushes both stores
    // by itself (answered to no client) before it drops extent 1.
    assert_ne!(p.nodes[B].durable[(AL_EXTENT + 4096) as usize], 1);
    write_done(&mut p, 12, 12);
    assert_eq!(
        p.nodes[B].durable[(AL_EXTENT + 4096) as usize],
        1,
        "flushed on the peer before its extent left the log"
    );
    assert_eq!(p.nodes[A].data[(AL_EXTENT + 4096) as usize], 1);
    let logged = &p.nodes[A].al_image.extents;
    assert!(logged.contains(&12));
    assert!(
        logged.contains(&0),
        "extent 0 has a write in flight: it stays"
    );
    assert!(!logged.contains(&1), "extent 1 was the least recently used");
    assert_eq!(logged.len(), AL_EXTENTS);
    // The held write finishes.
    p.nodes[A].disk_queue.push(held);
    p.run_until_idle();
    assert_eq!(p.reply(A, held_write), Some(&Ok(())));
    p.assert_same("after eviction");
}

/// Alpha crashes as Primary with a write on its store that never reached
/// beta; `resume`: alpha takes the role back by itself, otherwise beta is
/// promoted (the failover). Either way only the logged extents are synced.
fn crash_with_a_write_in_flight(resume: bool) {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    for e in [1u64, 4, 9] {
        write_done(&mut p, e, e as u8);
    }
    let w = p.write(A, 9 * AL_EXTENT + 8192, 0xEE, 4096);
    let k = p.nodes[A]
        .disk_queue
        .iter()
        .position(|(_, op)| matches!(op, DiskOp::Write { .. }))
        .expect("submitted");
    p.complete_disk(A, k);
    assert!(p.reply(A, w).is_none());
    let mut cfg = p.nodes[A].node_config();
    if resume {
        cfg.after_crash = AfterCrash::ResumePrimary;
    }
    p.restart_with(A, cfg);
    assert_eq!(
        p.nodes[A].node.bitmap().dirty_bytes(),
        3 * AL_EXTENT,
        "the logged extents, not the whole volume ({SIZE} bytes)"
    );
    assert_ne!(
        p.nodes[A].data[(9 * AL_EXTENT + 8192) as usize],
        p.nodes[B].data[(9 * AL_EXTENT + 8192) as usize]
    );
    p.connect();
    p.run_until_idle();
    let source = if resume {
        A
    } else {
        let r = p.admin(
            B,
            AdminCommand::Promote {
                force: false,
                new_generation: 11,
            },
        );
        assert!(r.is_ok(), "{r:?}");
        p.run_until_idle();
        B
    };
    assert!(p.nodes[source].node.serves_clients());
    assert_eq!(
        p.nodes[source].node.status(p.now).resynced_bytes,
        3 * AL_EXTENT
    );
    p.assert_same("after the activity-log resync");
    assert_eq!(p.nodes[A].node.bitmap().dirty_bytes(), 0);
    assert_eq!(p.nodes[B].node.bitmap().dirty_bytes(), 0);
}

#[test]
fn a_crash_as_primary_then_failover_syncs_only_the_logged_extents() {
    crash_with_a_write_in_flight(false);
}

#[test]
fn a_crash_as_primary_then_resuming_syncs_only_the_logged_extents() {
    crash_with_a_write_in_flight(true);
}

#[test]
fn a_crash_during_the_log_write_leaves_the_previous_log() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    write_done(&mut p, 2, 2);
    p.auto_al = false;
    let w = p.write(A, 7 * AL_EXTENT, 7, 4096);
    assert_eq!(p.nodes[A].meta_queue.len(), 1);
    // The crash loses the metadata write: the write was never submitted.
    p.restart(A);
    assert!(p.reply(A, w).is_none());
    assert_eq!(p.nodes[A].al_image.extents, vec![2]);
    assert_eq!(p.nodes[A].node.bitmap().dirty_bytes(), AL_EXTENT);
    // After the log write, before the data: the extent is logged, so it is
    // resynced although nothing was written there.
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.auto_al = false;
    let _w = p.write(A, 7 * AL_EXTENT, 7, 4096);
    p.complete_meta(A);
    p.nodes[A].disk_queue.clear();
    p.restart(A);
    assert_eq!(p.nodes[A].al_image.extents, vec![7]);
    assert_eq!(p.nodes[A].node.bitmap().dirty_bytes(), AL_EXTENT);
    p.connect();
    p.run_until_idle();
    let r = p.admin(
        B,
        AdminCommand::Promote {
            force: false,
            new_generation: 5,
        },
    );
    assert!(r.is_ok(), "{r:?}");
    p.run_until_idle();
    assert_eq!(p.nodes[B].node.status(p.now).resynced_bytes, AL_EXTENT);
    p.assert_same("after the resync");
}

#[test]
fn a_write_spanning_most_of_the_volume_takes_the_whole_volume_entry() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let t = p.client(
        A,
        ClientOp::Trim {
            offset: 0,
            length: SIZE,
        },
    );
    assert!(p.nodes[A].al_image.whole, "recorded before the trim starts");
    assert!(p.nodes[A].al_image.extents.is_empty());
    // Crash with the trim in flight: everything counts as out of sync.
    p.restart(A);
    assert!(p.reply(A, t).is_none());
    assert_eq!(p.nodes[A].node.bitmap().dirty_bytes(), SIZE);
    // Completed and flushed, the entry goes.
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let t = p.client(
        A,
        ClientOp::Trim {
            offset: 0,
            length: SIZE,
        },
    );
    p.run_until_idle();
    assert_eq!(p.reply(A, t), Some(&Ok(())));
    let f = p.client(A, ClientOp::Flush);
    p.run_until_idle();
    assert_eq!(p.reply(A, f), Some(&Ok(())));
    write_done(&mut p, 3, 3);
    assert!(!p.nodes[A].al_image.whole);
    assert_eq!(p.nodes[A].al_image.extents, vec![3]);
}

#[test]
fn metadata_without_a_log_still_means_a_full_sync_after_a_crash() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    write_done(&mut p, 1, 1);
    // As if the slot were format 2: no log recorded.
    p.nodes[A].al_image = Default::default();
    p.restart(A);
    assert_eq!(p.nodes[A].node.bitmap().dirty_bytes(), SIZE);
}
