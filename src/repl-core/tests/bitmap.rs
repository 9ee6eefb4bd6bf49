//! The dirty bitmap in the core: what a partition, a secondary power cut and
//! an interrupted resync leave to sync, and that a bit goes only after the
//! target flushed its data.

mod harness;

use harness::{Pair, GRANULARITY, SIZE};
use pairbd_repl_core::{AdminCommand, ConnectionState, DiskState, Message, OnPeerLoss};

const A: usize = 0;
const B: usize = 1;

#[test]
fn a_partition_resyncs_only_the_regions_written_meanwhile() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let synced_before = p.nodes[A].node.status(p.now).resynced_bytes;
    p.cut_link("partition");
    // Three regions, one of them twice, one straddling two bits.
    for (offset, byte, len) in [
        (0u64, 1u8, 512usize),
        (8 * GRANULARITY, 2, 4096),
        (8 * GRANULARITY, 3, 4096),
        (20 * GRANULARITY + 2048, 4, 4096),
    ] {
        let id = p.write(A, offset, byte, len);
        p.run_until_idle();
        assert_eq!(p.reply(A, id), Some(&Ok(())));
    }
    let status = p.nodes[A].node.status(p.now);
    assert_eq!(status.out_of_sync_bytes, 4 * GRANULARITY);
    assert_eq!(status.marked_bytes, 4 * GRANULARITY);
    p.connect();
    let starts = p.run_until_idle();
    assert_eq!(
        starts,
        vec![4 * GRANULARITY],
        "one resync of the dirty bits"
    );
    let a = p.nodes[A].node.status(p.now);
    assert_eq!(a.resynced_bytes - synced_before, 4 * GRANULARITY);
    assert_eq!(a.out_of_sync_bytes, 0);
    assert!(!a.peer_sync_needed);
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    p.assert_same("after the resync");
    // Cleared on disk too.
    assert!(p.nodes[A].bitmap_image.iter().all(|&b| b == 0));
}

#[test]
fn a_secondary_power_cut_resyncs_its_unflushed_writes() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    // Flushed: durable on both, not in the transfer log any more.
    let w = p.write(A, 0, 9, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    let f = p.client(A, pairbd_repl_core::ClientOp::Flush);
    p.run_until_idle();
    assert_eq!(p.reply(A, f), Some(&Ok(())));
    // Acknowledged by both, flushed by neither.
    let w = p.write(A, 32 * GRANULARITY, 7, 8192);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    // Beta loses power: its page cache is gone.
    p.nodes[B].data = p.nodes[B].durable.clone();
    p.restart(B);
    assert_eq!(
        p.nodes[A].node.status(p.now).out_of_sync_bytes,
        2 * GRANULARITY,
        "the transfer log's write is marked, the flushed one is not"
    );
    p.connect();
    let starts = p.run_until_idle();
    assert_eq!(starts, vec![2 * GRANULARITY]);
    p.assert_same("after the power cut and resync");
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
}

#[test]
fn an_interrupted_resync_resumes_after_what_the_target_flushed() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    for k in 0..16u64 {
        let id = p.write(A, k * 65536, k as u8 + 1, 65536);
        p.run_until_idle();
        assert_eq!(p.reply(A, id), Some(&Ok(())));
    }
    assert_eq!(p.nodes[A].node.status(p.now).out_of_sync_bytes, SIZE);
    p.connect();
    // Step until the source asked for (and got) a flush of acknowledged
    // chunks: some bits are gone, the rest still set.
    let mut cut = false;
    for _ in 0..100_000 {
        if p.nodes[A].node.status(p.now).out_of_sync_bytes < SIZE {
            cut = true;
            break;
        }
        if !p.nodes[A].disk_queue.is_empty() {
            p.complete_disk(A, 0);
        } else if !p.nodes[B].disk_queue.is_empty() {
            p.complete_disk(B, 0);
        } else if !p.nodes[B].meta_queue.is_empty() {
            p.complete_meta(B);
        } else if !p.nodes[A].meta_queue.is_empty() {
            p.complete_meta(A);
        } else if !p.nodes[B].inbox.is_empty() {
            p.deliver(B);
        } else if !p.nodes[A].inbox.is_empty() {
            p.deliver(A);
        } else {
            break;
        }
    }
    assert!(cut, "some bits were cleared during the resync");
    let left = p.nodes[A].node.status(p.now).out_of_sync_bytes;
    assert!(left > 0);
    p.cut_link("interrupted");
    assert_eq!(p.nodes[B].node.disk(), DiskState::Inconsistent);
    p.connect();
    let starts = p.run_until_idle();
    assert_eq!(starts, vec![left], "the second resync covers what was left");
    p.assert_same("after the resumed resync");
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
}

#[test]
fn a_bit_is_kept_until_the_target_flushed_its_chunk() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    let id = p.write(A, 0, 5, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, id), Some(&Ok(())));
    p.connect();
    // Deliver until beta acknowledged the chunk but has not flushed it.
    let mut acked = false;
    for _ in 0..10_000 {
        if let Some(Message::Ack { .. }) = p.nodes[A].inbox.front() {
            p.deliver(A);
            acked = true;
            break;
        }
        if !p.nodes[A].disk_queue.is_empty() {
            p.complete_disk(A, 0);
        } else if !p.nodes[B].disk_queue.is_empty() {
            p.complete_disk(B, 0);
        } else if !p.nodes[B].meta_queue.is_empty() {
            p.complete_meta(B);
        } else if !p.nodes[A].meta_queue.is_empty() {
            p.complete_meta(A);
        } else if !p.nodes[B].inbox.is_empty() {
            p.deliver(B);
        } else if !p.nodes[A].inbox.is_empty() {
            p.deliver(A);
        } else {
            break;
        }
    }
    assert!(acked);
    assert_eq!(
        p.nodes[A].node.status(p.now).out_of_sync_bytes,
        GRANULARITY,
        "acknowledged, not flushed: the bit stays"
    );
    // Beta loses power before its flush: the chunk is gone there.
    p.nodes[B].data = p.nodes[B].durable.clone();
    p.restart(B);
    p.connect();
    p.run_until_idle();
    p.assert_same("after the second resync");
    assert_eq!(p.nodes[A].node.status(p.now).out_of_sync_bytes, 0);
}

#[test]
fn a_peer_with_no_common_generation_gets_a_full_sync() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    let id = p.write(A, 0, 5, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, id), Some(&Ok(())));
    // Beta's metadata is recreated (create-md --force): no shared history.
    p.nodes[B].meta = pairbd_repl_core::PersistentState::fresh();
    p.restart(B);
    p.connect();
    let starts = p.run_until_idle();
    assert_eq!(starts, vec![SIZE], "a full sync");
    p.assert_same("after the full sync");
}

#[test]
fn a_primary_restarted_cleanly_keeps_its_bitmap() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    let id = p.write(A, 40 * GRANULARITY, 5, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, id), Some(&Ok(())));
    // A clean stop writes the bitmap pages before Secondary.
    assert!(p.admin(A, AdminCommand::Demote { force: true }).is_ok());
    p.restart(A);
    assert_eq!(
        p.nodes[A].node.status(p.now).out_of_sync_bytes,
        GRANULARITY,
        "the bitmap came back from the metadata"
    );
    p.connect();
    p.run_until_idle();
    assert!(p
        .admin(
            A,
            AdminCommand::Promote {
                force: false,
                new_generation: 99
            }
        )
        .is_ok());
    p.run_until_idle();
    // The restarted node counts from its start: one bit resynced.
    assert_eq!(p.nodes[A].node.status(p.now).resynced_bytes, GRANULARITY);
    p.assert_same("after the resync");
    assert_eq!(
        p.nodes[A].node.status(p.now).connection,
        ConnectionState::Connected
    );
}

#[test]
fn invalidate_makes_the_next_sync_a_full_one() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let e = p.admin(A, AdminCommand::Invalidate).unwrap_err();
    assert!(e.contains("Primary"), "{e}");
    // Beta's store silently differs from alpha's (a bad disk, say).
    p.nodes[B].data[12345] ^= 0xFF;
    p.admin(B, AdminCommand::Invalidate).unwrap();
    assert_eq!(p.nodes[B].meta.disk, DiskState::Inconsistent, "durably");
    assert!(!p.link_up, "the link is renewed");
    p.connect();
    let starts = p.run_until_idle();
    assert_eq!(starts, vec![SIZE], "a full sync");
    p.assert_same("after the full sync");
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
}

#[test]
fn a_rate_limited_resync_paces_its_chunks_by_the_clock() {
    // 64 KiB chunks at 64 KiB/s: one chunk per simulated second.
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    for k in 0..4u64 {
        let id = p.write(A, k * 65536, 3, 65536);
        p.run_until_idle();
        assert_eq!(p.reply(A, id), Some(&Ok(())));
    }
    // alpha stops cleanly and comes back with the rate limit.
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    let mut cfg = p.nodes[A].node_config();
    cfg.sync_rate_bytes_per_sec = Some(65536);
    p.restart_with(A, cfg);
    p.connect();
    p.run_until_idle();
    p.admin(
        A,
        AdminCommand::Promote {
            force: false,
            new_generation: 5,
        },
    )
    .unwrap();
    p.run_until_idle();
    let sync = p.nodes[A].node.status(p.now).sync.expect("a sync runs");
    assert_eq!(sync.done_bytes, 65536, "only the first chunk went at once");
    assert!(
        p.nodes[A].node.poll_timeout().is_some(),
        "the next chunk's turn is armed"
    );
    for _ in 0..3 {
        p.advance(std::time::Duration::from_secs(1));
        p.run_until_idle();
    }
    assert!(
        p.nodes[A].node.status(p.now).sync.is_none(),
        "done after 3 s"
    );
    p.assert_same("after the paced resync");
}

#[test]
fn verify_finds_exactly_the_corrupted_blocks_and_the_resync_repairs_them() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    assert!(
        p.admin(B, AdminCommand::Verify).is_err(),
        "not on a Secondary"
    );
    // Two adjacent blocks and one far away, corrupted behind the pair's back.
    for at in [40_960usize, 45_056, 700_000] {
        p.nodes[B].data[at] ^= 0x55;
    }
    // A write in flight during the verify is no difference.
    let w = p.write(A, 0, 9, 4096);
    p.admin(A, AdminCommand::Verify).unwrap();
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    let st = p.nodes[A].node.status(p.now);
    let result = st.last_verify.expect("a verify result");
    assert_eq!(result.checked_bytes, SIZE);
    assert_eq!(result.differing_blocks, 3);
    assert_eq!(result.ranges, vec![(40_960, 8192), (696_320, 4096)]);
    assert!(st.verify.is_none());
    // Marked, not repaired yet: that waits for resync-marked.
    assert!(st.sync.is_none());
    assert_eq!(st.out_of_sync_bytes, 3 * 4096);
    assert_ne!(p.nodes[A].data[40_960], p.nodes[B].data[40_960]);
    assert!(
        p.admin(B, AdminCommand::ResyncMarked).is_err(),
        "not on a Secondary"
    );
    let msg = p.admin(A, AdminCommand::ResyncMarked).unwrap();
    assert!(msg.contains("12288"), "{msg}");
    p.run_until_idle();
    let st = p.nodes[A].node.status(p.now);
    p.assert_same("after the resync of the marked blocks");
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    assert_eq!(st.out_of_sync_bytes, 0);
}

/// A pair with four dirty 64 KiB regions on alpha, alpha Secondary again,
/// configured by `f`, connected, ready to be promoted.
fn four_dirty_regions(f: impl Fn(&mut pairbd_repl_core::Config)) -> Pair {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    for k in 0..4u64 {
        let id = p.write(A, k * 65536, 3, 65536);
        p.run_until_idle();
        assert_eq!(p.reply(A, id), Some(&Ok(())));
    }
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    let mut cfg = p.nodes[A].node_config();
    f(&mut cfg);
    p.restart_with(A, cfg);
    p.connect();
    p.run_until_idle();
    p
}

#[test]
fn the_resync_yields_to_application_io_and_runs_unpaced_without_it() {
    let min = |c: &mut pairbd_repl_core::Config| {
        c.sync_rate_bytes_per_sec = None;
        c.sync_rate_min_bytes_per_sec = Some(65536);
    };
    let promote = AdminCommand::Promote {
        force: false,
        new_generation: 5,
    };
    // No client I/O: the minimum does not apply, the resync runs at once.
    let mut p = four_dirty_regions(min);
    p.admin(A, promote.clone()).unwrap();
    p.run_until_idle();
    assert!(p.nodes[A].node.status(p.now).sync.is_none(), "done at once");
    p.assert_same("after the unpaced resync");

    // A client request has just arrived (any request counts, even one a
    // Secondary refuses): the resync drops to the minimum, one 64 KiB chunk
    // per second, until the clients have been quiet for a moment.
    let mut p = four_dirty_regions(min);
    let refused = p.write(A, 0, 1, 4096);
    assert!(p.reply(A, refused).is_some_and(|r| r.is_err()));
    p.admin(A, promote).unwrap();
    p.run_until_idle();
    let sync = p.nodes[A].node.status(p.now).sync.expect("a sync runs");
    assert_eq!(sync.done_bytes, 65536, "only the first chunk went at once");
    p.advance(std::time::Duration::from_secs(1));
    p.run_until_idle();
    assert!(
        p.nodes[A].node.status(p.now).sync.is_none(),
        "quiet clients: the rest went unpaced"
    );
    p.assert_same("after the yielding resync");
}
