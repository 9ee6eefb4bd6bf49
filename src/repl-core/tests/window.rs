//! The in-flight window in the core: client write payload bytes sent to the
//! peer and not yet acknowledged stay within `max_inflight_bytes`; a write
//! that does not fit waits unstarted, later writes wait behind it, acks
//! release them in arrival order, one write larger than the window goes
//! alone, flushes do not wait for it, and a lost link releases the waiting
//! writes as writes without the peer (marked in the dirty bitmap).

mod harness;

use harness::Pair;
use pairbd_repl_core::{ClientOp, DiskOp, Message, OnPeerLoss, RequestId};

// Every write here stays inside the first activity-log extent (64 KiB, hot
// after the first write), so that only the window holds writes back.
const A: usize = 0;
const B: usize = 1;

fn pair_with_window(bytes: u64) -> Pair {
    Pair::synced_with(OnPeerLoss::Continue, |c| c.max_inflight_bytes = bytes)
}

/// Offsets of the writes alpha has sent that beta has not handled yet.
fn writes_to_beta(p: &Pair) -> Vec<u64> {
    p.nodes[B]
        .inbox
        .iter()
        .filter_map(|m| match m {
            Message::Write { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect()
}

/// Alpha's local writes submitted to its store and not completed.
fn local_writes(p: &Pair) -> Vec<u64> {
    p.nodes[A]
        .disk_queue
        .iter()
        .filter_map(|(_, op)| match op {
            DiskOp::Write { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect()
}

/// Beta handles everything alpha sent and completes its disk operations;
/// its acks wait in alpha's inbox. Returns the write offsets in the order
/// beta received them.
fn beta_takes_all(p: &mut Pair) -> Vec<u64> {
    let seen = writes_to_beta(p);
    while !p.nodes[B].inbox.is_empty() {
        p.deliver(B);
    }
    while !p.nodes[B].disk_queue.is_empty() {
        p.complete_disk(B, 0);
    }
    seen
}

/// Alpha's local store completes everything submitted to it.
fn alpha_disks_done(p: &mut Pair) {
    while !p.nodes[A].disk_queue.is_empty() {
        p.complete_disk(A, 0);
    }
}

fn window(p: &Pair) -> (u64, usize) {
    let s = p.nodes[A].node.status(p.now);
    (s.inflight_bytes, s.window_waiting)
}

fn answered(p: &Pair, ids: &[RequestId]) -> Vec<bool> {
    ids.iter()
        .map(|id| p.reply(A, *id) == Some(&Ok(())))
        .collect()
}

#[test]
fn the_window_binds_and_acks_release_waiting_writes_in_order() {
    let mut p = pair_with_window(8192);
    let ids: Vec<_> = (0..4u64)
        .map(|k| p.write(A, k * 8192, k as u8 + 1, 4096))
        .collect();
    assert_eq!(writes_to_beta(&p), vec![0, 8192], "two fit the window");
    assert_eq!(
        local_writes(&p),
        vec![0, 8192],
        "the waiting ones are unstarted"
    );
    assert_eq!(window(&p), (8192, 2));
    let mut order = beta_takes_all(&mut p);
    alpha_disks_done(&mut p);
    // One ack makes room for one more write, not yet for the last.
    p.deliver(A);
    assert_eq!(answered(&p, &ids), vec![true, false, false, false]);
    assert_eq!(writes_to_beta(&p), vec![16384]);
    assert_eq!(window(&p), (8192, 1));
    p.deliver(A);
    assert_eq!(writes_to_beta(&p), vec![16384, 24576]);
    assert_eq!(window(&p), (8192, 0));
    order.extend(beta_takes_all(&mut p));
    p.run_until_idle();
    assert_eq!(
        order,
        vec![0, 8192, 16384, 24576],
        "arrival order on the wire"
    );
    assert_eq!(answered(&p, &ids), vec![true; 4]);
    assert_eq!(window(&p), (0, 0), "every ack returned its bytes");
    assert_eq!(p.nodes[A].node.status(p.now).window_waited, 2);
    p.assert_same("after the window drained");
    let s = p.nodes[A].node.status(p.now);
    assert_eq!(s.link_losses, 0);
    assert!(!s.peer_sync_needed, "nothing went without the peer");
}

#[test]
fn a_later_write_that_fits_does_not_overtake_a_waiting_one() {
    let mut p = pair_with_window(16384);
    let first = p.write(A, 0, 1, 8192);
    // 8192 + 16384 does not fit: the large write waits ...
    let large = p.write(A, 16384, 2, 16384);
    // ... and the small one behind it waits too, although it would fit.
    let small = p.write(A, 49152, 3, 4096);
    assert_eq!(writes_to_beta(&p), vec![0]);
    assert_eq!(window(&p), (8192, 2));
    let mut order = beta_takes_all(&mut p);
    alpha_disks_done(&mut p);
    p.deliver(A);
    // The window is empty: the large write goes; the small one still does
    // not fit beside it.
    assert_eq!(writes_to_beta(&p), vec![16384]);
    assert_eq!(window(&p), (16384, 1));
    order.extend(beta_takes_all(&mut p));
    p.run_until_idle();
    order.push(49152);
    assert_eq!(order, vec![0, 16384, 49152]);
    assert_eq!(answered(&p, &[first, large, small]), vec![true; 3]);
    p.assert_same("after the large write");
}

#[test]
fn a_write_larger_than_the_window_goes_alone() {
    let mut p = pair_with_window(4096);
    let big = p.write(A, 0, 9, 32768);
    assert_eq!(writes_to_beta(&p), vec![0], "nothing in flight: it goes");
    assert_eq!(window(&p), (32768, 0));
    let next = p.write(A, 40960, 8, 512);
    assert_eq!(
        writes_to_beta(&p),
        vec![0],
        "the next one waits for its ack"
    );
    assert_eq!(window(&p), (32768, 1));
    p.run_until_idle();
    assert_eq!(answered(&p, &[big, next]), vec![true, true]);
    assert_eq!(window(&p), (0, 0));
    p.assert_same("after the oversized write");
}

#[test]
fn overlapping_writes_keep_their_order_through_the_window() {
    let mut p = pair_with_window(4096);
    let a = p.write(A, 0, 1, 4096);
    let b = p.write(A, 32768, 2, 4096);
    // Overlaps the first: waits for it (the overlap rule) and behind the
    // second (the window).
    let c = p.write(A, 2048, 3, 4096);
    assert_eq!(writes_to_beta(&p), vec![0]);
    let mut order = Vec::new();
    for _ in 0..3 {
        order.extend(beta_takes_all(&mut p));
        alpha_disks_done(&mut p);
        while !p.nodes[A].inbox.is_empty() {
            p.deliver(A);
        }
    }
    p.run_until_idle();
    assert_eq!(order, vec![0, 32768, 2048]);
    assert_eq!(answered(&p, &[a, b, c]), vec![true; 3]);
    assert_eq!(&p.nodes[B].data[0..2048], &[1u8; 2048][..]);
    assert_eq!(&p.nodes[B].data[2048..6144], &[3u8; 4096][..]);
    p.assert_same("after overlapping writes");
}

#[test]
fn a_flush_does_not_wait_for_writes_waiting_for_the_window() {
    // A write still waiting for the window is not completed (its client has
    // no answer), so no flush has to cover it; the flush covers the write
    // that was sent and acknowledged before it.
    let mut p = pair_with_window(4096);
    let sent = p.write(A, 0, 1, 4096);
    let waiting = p.write(A, 32768, 2, 4096);
    beta_takes_all(&mut p);
    alpha_disks_done(&mut p);
    // Alpha has not heard the ack yet: the second write still waits.
    let flush = p.client(A, ClientOp::Flush);
    assert!(
        p.nodes[B]
            .inbox
            .iter()
            .any(|m| matches!(m, Message::Flush { .. })),
        "the flush goes to the peer at once"
    );
    assert_eq!(window(&p).1, 1);
    // Beta takes the flush, alpha hears the write's ack first: that
    // releases the waiting write, which is sent behind the flush.
    beta_takes_all(&mut p);
    alpha_disks_done(&mut p);
    while !p.nodes[A].inbox.is_empty() {
        p.deliver(A);
    }
    assert_eq!(answered(&p, &[sent, flush]), vec![true, true]);
    assert_eq!(p.reply(A, waiting), None, "not covered, not answered yet");
    assert_eq!(
        &p.nodes[B].durable[0..4096],
        &[1u8; 4096][..],
        "the flush made the acknowledged write durable on the peer"
    );
    p.run_until_idle();
    assert_eq!(p.reply(A, waiting), Some(&Ok(())));
    p.assert_same("after the flush");
}

#[test]
fn a_lost_link_releases_waiting_writes_as_writes_without_the_peer() {
    let mut p = pair_with_window(4096);
    let ids: Vec<_> = (0..3u64)
        .map(|k| p.write(A, k * 16384, k as u8 + 1, 4096))
        .collect();
    assert_eq!(window(&p), (4096, 2));
    assert_eq!(local_writes(&p), vec![0]);
    p.cut_link("test cut");
    assert_eq!(window(&p), (0, 0), "no ack will come: the window is empty");
    assert_eq!(
        local_writes(&p),
        vec![0, 16384, 32768],
        "the waiting writes start on this store"
    );
    p.run_until_idle();
    assert_eq!(answered(&p, &ids), vec![true; 3]);
    let s = p.nodes[A].node.status(p.now);
    assert!(s.peer_sync_needed);
    assert_eq!(s.link_losses, 1);
    // The sent write (transfer log) and both released ones are marked.
    assert_eq!(s.out_of_sync_bytes, 3 * 4096);
    p.connect();
    p.run_until_idle();
    assert_eq!(window(&p), (0, 0));
    p.assert_same("after the resync");
    // The window works on the new link as on the first.
    let w = p.write(A, 0, 7, 4096);
    let x = p.write(A, 16384, 8, 4096);
    assert_eq!(window(&p), (4096, 1));
    p.run_until_idle();
    assert_eq!(answered(&p, &[w, x]), vec![true, true]);
    p.assert_same("after writes on the new link");
}
