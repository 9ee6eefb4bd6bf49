//! Batched acknowledgements: acks that become due in the same step travel
//! in one `Acks` message, nothing waits for a batch to fill, and the primary
//! handles a batch exactly as that many single acks — for client writes,
//! trims, write-zeroes, FUA writes and sync chunks.

mod harness;

use harness::{Pair, SIZE};
use pairbd_repl_core::{
    AckBatch, AdminCommand, ClientOp, DiskOp, DiskState, Message, OnPeerLoss, ReplyError, RequestId,
};

const A: usize = 0;
const B: usize = 1;

/// Eight writes of every replicated kind on the primary, each sent to the
/// secondary and applied to the primary's own store; returns their ids.
fn eight_writes(p: &mut Pair) -> Vec<RequestId> {
    let mut ids = Vec::new();
    for n in 0..8u64 {
        let offset = n * 8192;
        let op = match n {
            3 => ClientOp::Trim {
                offset,
                length: 4096,
            },
            5 => ClientOp::WriteZeroes {
                offset,
                length: 4096,
                no_hole: true,
            },
            6 => ClientOp::Write {
                offset,
                payload: vec![0x60; 4096],
                fua: true,
            },
            _ => ClientOp::Write {
                offset,
                payload: vec![n as u8 + 1; 4096],
                fua: false,
            },
        };
        ids.push(p.client(A, op));
    }
    p.complete_disks_together(A, |_| true);
    p.deliver_all(B);
    assert_eq!(p.nodes[B].disk_queue.len(), 8, "every write reached beta");
    ids
}

fn answered(p: &Pair, ids: &[RequestId]) -> usize {
    ids.iter()
        .filter(|id| p.reply(A, **id) == Some(&Ok::<(), ReplyError>(())))
        .count()
}

#[test]
fn writes_completed_in_one_step_are_acknowledged_in_one_message() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let before = (p.ack_messages[B], p.acked_writes[B]);
    let ids = eight_writes(&mut p);
    assert_eq!(answered(&p, &ids), 0, "answered before the peer's ack");
    p.complete_disks_together(B, |_| true);
    assert_eq!(p.ack_messages[B] - before.0, 1, "one message");
    assert_eq!(p.acked_writes[B] - before.1, 8, "for all eight writes");
    let Some(Message::Acks(AckBatch { seqs })) = p.nodes[A].inbox.front() else {
        panic!("expected one Acks, got {:?}", p.nodes[A].inbox);
    };
    assert_eq!(seqs.len(), 8);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(p.nodes[A].inbox.len(), 1);
    p.deliver(A);
    assert_eq!(answered(&p, &ids), 8, "every client answered");
    assert!(p.link_up);
    p.run_until_idle();
    p.assert_same("after the batch");
}

#[test]
fn a_batch_acknowledges_only_what_it_names() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let ids = eight_writes(&mut p);
    // The secondary completes the last four first (writes complete out of
    // order): their batch names seqs above the first four's, which must
    // stay unanswered — a batch is a set, not "everything below".
    let queue: Vec<u64> = p.nodes[B]
        .disk_queue
        .iter()
        .map(|(_, op)| match op {
            DiskOp::Write { offset, .. }
            | DiskOp::Trim { offset, .. }
            | DiskOp::WriteZeroes { offset, .. } => *offset,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(queue.len(), 8);
    p.complete_disks_together(B, |op| {
        matches!(op, DiskOp::Write { offset, .. }
            | DiskOp::Trim { offset, .. }
            | DiskOp::WriteZeroes { offset, .. } if *offset >= 4 * 8192)
    });
    p.deliver(A);
    let done: Vec<bool> = ids.iter().map(|id| p.reply(A, *id).is_some()).collect();
    assert_eq!(
        done,
        [false, false, false, false, true, true, true, true],
        "only the named writes are answered"
    );
    p.complete_disks_together(B, |_| true);
    p.deliver(A);
    assert_eq!(answered(&p, &ids), 8);
    p.run_until_idle();
    p.assert_same("after both batches");
}

#[test]
fn acks_due_in_separate_steps_are_sent_at_once_one_by_one() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let before = p.ack_messages[B];
    let ids = eight_writes(&mut p);
    for k in 0..8 {
        p.complete_disk(B, 0);
        // Nothing waits for a batch to fill: the ack is out at once.
        assert_eq!(p.ack_messages[B] - before, k + 1);
        assert!(matches!(p.nodes[A].inbox.back(), Some(Message::Ack { .. })));
    }
    p.deliver_all(A);
    assert_eq!(answered(&p, &ids), 8);
}

#[test]
fn an_ack_batch_naming_an_unknown_write_drops_the_link() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 0, 9, 4096);
    p.complete_disks_together(A, |_| true);
    let seq = match p.nodes[B].inbox.pop_front() {
        Some(Message::Write { seq, .. }) => seq,
        other => panic!("expected the write, got {other:?}"),
    };
    p.nodes[A].inbox.push_back(Message::Acks(AckBatch {
        seqs: vec![seq, seq + 1000],
    }));
    p.deliver(A);
    assert!(!p.link_up);
    assert!(
        p.disconnects
            .iter()
            .any(|d| d.contains("acknowledgement of unknown sequence")),
        "{:?}",
        p.disconnects
    );
    // As with single acks, the write named first was acknowledged; the
    // lost link then needs nothing more for it.
    assert!(p.reply(A, w).is_some());
}

#[test]
fn a_full_sync_and_writes_in_bursts_end_identical_with_batched_acks() {
    let mut p = Pair::new(OnPeerLoss::Continue);
    for (i, b) in p.nodes[A].data.iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ 0x5A;
    }
    p.connect();
    p.run_until_idle_batched();
    let r = p.admin(
        A,
        AdminCommand::Promote {
            force: true,
            new_generation: 11,
        },
    );
    assert!(r.is_ok(), "{r:?}");
    let mut ids = Vec::new();
    for n in 0..64u64 {
        if p.nodes[A].node.serves_clients() {
            let block = (n * 37) % (SIZE / 4096);
            ids.push(p.write(A, block * 4096, n as u8 | 0x80, 4096));
        }
        if n % 8 == 7 {
            p.run_until_idle_batched();
        }
    }
    p.run_until_idle_batched();
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    assert_eq!(answered(&p, &ids), ids.len());
    assert!(!ids.is_empty());
    p.assert_same("after the sync");
    // Sync chunks and writes were acknowledged in batches.
    assert!(
        p.acked_writes[B] > p.ack_messages[B],
        "{} acks in {} messages",
        p.acked_writes[B],
        p.ack_messages[B]
    );
    assert!(p.link_up, "{:?}", p.disconnects);
}
