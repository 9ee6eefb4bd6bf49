//! In-process tests of the replication core: two nodes, a simulated link and
//! simulated stores, no sockets, deterministic.

mod harness;

use std::time::Duration;

use harness::{Pair, Rng, SIZE};
use pairbd_repl_core::{
    AdminCommand, ClientOp, ConnectionState, DiskOp, DiskState, Message, OnPeerLoss, ReplyError,
    Role,
};

/// Compares two stores, naming the first differing byte instead of printing
/// a megabyte.
#[track_caller]
fn assert_same(a: &[u8], b: &[u8], what: impl std::fmt::Display) {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: stores differ at byte {i}: {} vs {}", a[i], b[i]);
    }
    assert_eq!(a.len(), b.len());
}

const A: usize = 0;
const B: usize = 1;

fn pos(p: &Pair, i: usize, pred: impl Fn(&DiskOp<Vec<u8>>) -> bool) -> usize {
    p.nodes[i]
        .disk_queue
        .iter()
        .position(|(_, op)| pred(op))
        .expect("such a disk operation is queued")
}

#[test]
fn a_fresh_pair_syncs_from_the_forced_primary() {
    let mut p = Pair::new(OnPeerLoss::Continue);
    // Data on alpha before the pair ever connected (e.g. an existing volume).
    p.nodes[A].data[4096..8192].fill(0xAB);
    p.nodes[A].data[SIZE as usize - 1] = 0xCD;
    p.connect();
    p.run_until_idle();
    assert_eq!(
        p.nodes[A].node.status(p.now).connection,
        ConnectionState::Connected
    );
    let refused = p.admin(
        A,
        AdminCommand::Promote {
            force: false,
            new_generation: 1,
        },
    );
    assert!(refused.unwrap_err().contains("Inconsistent"));
    p.admin(
        A,
        AdminCommand::Promote {
            force: true,
            new_generation: 1,
        },
    )
    .unwrap();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.role(), Role::Primary);
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    assert_eq!(
        p.nodes[B].meta.disk,
        DiskState::UpToDate,
        "UpToDate persisted"
    );
    assert!(!p.nodes[A].meta.peer_sync_needed);
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "");
    assert_same(
        &p.nodes[B].durable,
        &p.nodes[A].data,
        "sync flushed on the target",
    );
    let st = p.nodes[A].node.status(p.now);
    assert_eq!(st.peer.unwrap().disk, DiskState::UpToDate);
}

#[test]
fn a_write_is_answered_only_after_both_stores_have_it() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 8192, 1, 4096);
    // The local write completes first: no reply yet.
    let k = pos(&p, A, |op| matches!(op, DiskOp::Write { .. }));
    p.complete_disk(A, k);
    assert!(p.reply(A, w).is_none());
    // The peer receives it but its store has not completed it.
    p.deliver(B);
    assert!(p.reply(A, w).is_none());
    assert!(p.nodes[A].inbox.is_empty(), "no ack before the store write");
    p.complete_disk(B, 0);
    assert_eq!(p.nodes[B].data[8192], 1);
    p.deliver(A);
    assert_eq!(p.reply(A, w), Some(&Ok(())));
}

#[test]
fn the_peer_ack_alone_does_not_answer_a_write() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 0, 9, 512);
    p.deliver(B);
    p.complete_disk(B, 0);
    p.deliver(A);
    assert!(p.reply(A, w).is_none(), "local write still running");
    p.complete_disk(A, 0);
    assert_eq!(p.reply(A, w), Some(&Ok(())));
}

#[test]
fn a_flush_waits_for_both_flushes() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 0, 5, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert_ne!(p.nodes[B].durable[0], 5);
    let f = p.client(A, ClientOp::Flush);
    let k = pos(&p, A, |op| matches!(op, DiskOp::Flush));
    p.complete_disk(A, k);
    assert!(p.reply(A, f).is_none(), "local flush alone is not enough");
    p.deliver(B);
    assert!(p.nodes[A].inbox.is_empty());
    p.complete_disk(B, 0);
    assert_eq!(
        p.nodes[B].durable[0], 5,
        "the secondary's flush made it durable"
    );
    p.deliver(A);
    assert_eq!(p.reply(A, f), Some(&Ok(())));
}

#[test]
fn the_secondary_flushes_only_after_earlier_writes_reached_its_store() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let _w = p.write(A, 0, 3, 4096);
    let _f = p.client(A, ClientOp::Flush);
    p.deliver(B); // the write
    p.deliver(B); // the flush
    assert_eq!(
        p.nodes[B].disk_queue.len(),
        1,
        "flush held behind the write"
    );
    assert!(matches!(p.nodes[B].disk_queue[0].1, DiskOp::Write { .. }));
    p.complete_disk(B, 0);
    assert!(matches!(p.nodes[B].disk_queue[0].1, DiskOp::Flush));
}

#[test]
fn overlapping_writes_land_in_order_on_both_nodes() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w1 = p.write(A, 0, 1, 8192);
    let w2 = p.write(A, 4096, 2, 8192);
    let w3 = p.write(A, 65536, 3, 4096);
    // w2 overlaps w1: neither its local write nor its message may exist yet.
    let writes: Vec<u64> = p.nodes[A]
        .disk_queue
        .iter()
        .filter_map(|(_, op)| match op {
            DiskOp::Write { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![0, 65536]);
    assert_eq!(p.nodes[B].inbox.len(), 2);
    // Finish w1 on both; then w2 starts.
    let k = pos(&p, A, |op| matches!(op, DiskOp::Write { offset: 0, .. }));
    p.complete_disk(A, k);
    p.deliver(B);
    p.deliver(B);
    let k = pos(&p, B, |op| matches!(op, DiskOp::Write { offset: 0, .. }));
    p.complete_disk(B, k);
    p.deliver(A);
    assert_eq!(p.reply(A, w1), Some(&Ok(())));
    assert!(p.nodes[A]
        .disk_queue
        .iter()
        .any(|(_, op)| matches!(op, DiskOp::Write { offset: 4096, .. })));
    p.run_until_idle();
    assert_eq!(p.reply(A, w2), Some(&Ok(())));
    assert_eq!(p.reply(A, w3), Some(&Ok(())));
    assert_eq!(p.nodes[A].data[4096], 2);
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "");
}

#[test]
fn random_schedules_never_diverge() {
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let mut p = Pair::synced(OnPeerLoss::Continue);
        let mut last: Vec<Option<u8>> = vec![None; 16];
        let mut outstanding = Vec::new();
        for n in 0..60u64 {
            let block = rng.below(16);
            let op = rng.below(10);
            let id = if op < 7 {
                let byte = (n % 250) as u8 + 1;
                let len = 4096 * (1 + rng.below(2));
                let len = len.min((16 - block) * 4096);
                p.client(
                    A,
                    ClientOp::Write {
                        offset: block * 4096,
                        payload: vec![byte; len as usize],
                        fua: rng.below(4) == 0,
                    },
                )
            } else if op < 8 {
                p.client(
                    A,
                    ClientOp::Trim {
                        offset: block * 4096,
                        length: 4096,
                    },
                )
            } else {
                p.client(A, ClientOp::Flush)
            };
            outstanding.push(id);
            for _ in 0..rng.below(6) {
                p.step_random(&mut rng);
            }
            last[block as usize] = Some(0);
        }
        while p.step_random(&mut rng) {}
        for id in outstanding {
            assert_eq!(p.reply(A, id), Some(&Ok(())), "seed {seed}: {id:?}");
        }
        assert_same(
            &p.nodes[A].data,
            &p.nodes[B].data,
            format!("seed {seed}: copies diverged"),
        );
        assert!(p.nodes[A].failed.is_none() && p.nodes[B].failed.is_none());
    }
}

#[test]
fn writes_during_a_full_sync_end_identical() {
    for seed in 0..50u64 {
        let mut rng = Rng::new(seed);
        let mut p = Pair::new(OnPeerLoss::Continue);
        for (i, b) in p.nodes[A].data.iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        p.connect();
        p.run_until_idle();
        p.nodes[A].node.handle_admin(
            p.now,
            pairbd_repl_core::AdminId(99),
            AdminCommand::Promote {
                force: true,
                new_generation: 3,
            },
        );
        p.drain();
        for n in 0..40u64 {
            // Writes are refused until the promotion is durable.
            if p.nodes[A].node.serves_clients() {
                let block = rng.below(SIZE / 4096);
                p.write(A, block * 4096, (n as u8) | 0x80, 4096);
            }
            for _ in 0..rng.below(8) {
                p.step_random(&mut rng);
            }
        }
        while p.step_random(&mut rng) {}
        assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate, "seed {seed}");
        assert_same(&p.nodes[A].data, &p.nodes[B].data, format!("seed {seed}"));
    }
}

#[test]
fn link_loss_with_unflushed_writes_marks_the_peer_before_answering() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    // An acknowledged but unflushed write: in the transfer log.
    let w = p.write(A, 0, 1, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    // A write in flight when the link goes.
    let w2 = p.write(A, 8192, 2, 4096);
    let k = pos(&p, A, |op| matches!(op, DiskOp::Write { .. }));
    p.complete_disk(A, k);
    p.cut_link("test cut");
    assert!(
        p.reply(A, w2).is_none(),
        "answered before the peer-needs-sync mark is durable"
    );
    assert_eq!(p.nodes[A].meta_queue.len(), 1);
    assert!(p.nodes[A].meta_queue[0].1.peer_sync_needed);
    p.complete_meta(A);
    assert_eq!(p.reply(A, w2), Some(&Ok(())));
    // Writes while apart are answered by this node alone.
    let w3 = p.write(A, 12288, 3, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w3), Some(&Ok(())));
    let st = p.nodes[A].node.status(p.now);
    assert!(st.peer_sync_needed);
    // The peer returns: it is synced and the mark cleared.
    p.connect();
    p.run_until_idle();
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "");
    assert!(!p.nodes[A].meta.peer_sync_needed);
}

#[test]
fn link_loss_after_a_peer_flush_needs_no_sync() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.write(A, 0, 1, 4096);
    p.client(A, ClientOp::Flush);
    p.run_until_idle();
    p.cut_link("test cut");
    assert!(p.nodes[A].meta_queue.is_empty());
    assert!(!p.nodes[A].node.status(p.now).peer_sync_needed);
}

#[test]
fn suspend_io_holds_writes_until_resume() {
    let mut p = Pair::synced(OnPeerLoss::SuspendIo);
    p.cut_link("test cut");
    let w = p.write(A, 0, 4, 4096);
    p.run_until_idle();
    assert!(p.reply(A, w).is_none(), "held while suspended");
    assert!(p.nodes[A].node.status(p.now).io_suspended);
    p.admin(A, AdminCommand::ResumeIo).unwrap();
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
}

#[test]
fn suspend_io_releases_on_reconnect() {
    let mut p = Pair::synced(OnPeerLoss::SuspendIo);
    p.cut_link("test cut");
    let w = p.write(A, 0, 4, 4096);
    p.run_until_idle();
    assert!(p.reply(A, w).is_none());
    p.connect();
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "");
}

#[test]
fn a_silent_peer_is_dropped_after_the_ack_timeout() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 0, 1, 4096);
    let k = pos(&p, A, |op| matches!(op, DiskOp::Write { .. }));
    p.complete_disk(A, k);
    // Beta never processes its inbox.
    p.advance(Duration::from_secs(1));
    assert!(p.link_up);
    p.advance(Duration::from_secs(5));
    assert!(!p.link_up, "dropped");
    assert!(p.disconnects.iter().any(|r| r.contains("unacknowledged")));
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert!(p.nodes[A].meta.peer_sync_needed);
}

#[test]
fn a_secondary_refuses_client_writes() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(B, 0, 1, 4096);
    assert_eq!(p.reply(B, w), Some(&Err(ReplyError::NotPrimary)));
}

#[test]
fn out_of_range_requests_are_refused() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, SIZE - 512, 1, 4096);
    assert_eq!(p.reply(A, w), Some(&Err(ReplyError::OutOfRange)));
    let t = p.client(
        A,
        ClientOp::Trim {
            offset: u64::MAX - 10,
            length: 100,
        },
    );
    assert_eq!(p.reply(A, t), Some(&Err(ReplyError::OutOfRange)));
}

#[test]
fn a_peer_write_past_the_end_drops_the_link_and_touches_nothing() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let before = p.nodes[B].data.clone();
    p.nodes[B].inbox.push_back(Message::Write {
        seq: 1000,
        offset: SIZE - 100,
        payload: vec![7; 4096],
        fua: false,
    });
    p.deliver(B);
    assert!(!p.link_up);
    assert!(p.disconnects[0].contains("past the end"));
    assert!(p.nodes[B].disk_queue.is_empty());
    assert_same(&p.nodes[B].data, &before, "");
}

#[test]
fn data_from_a_peer_that_is_not_primary_is_refused() {
    let mut p = Pair::new(OnPeerLoss::Continue);
    p.connect();
    p.run_until_idle();
    p.nodes[B].inbox.push_back(Message::Write {
        seq: 1,
        offset: 0,
        payload: vec![7; 4096],
        fua: false,
    });
    p.deliver(B);
    assert!(!p.link_up);
    assert!(p.nodes[B].disk_queue.is_empty());
}

#[test]
fn promotion_is_refused_while_the_peer_is_primary() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let e = p
        .admin(
            B,
            AdminCommand::Promote {
                force: true,
                new_generation: 9,
            },
        )
        .unwrap_err();
    assert!(e.contains("Primary"), "{e}");
    // After a demotion of alpha, beta (UpToDate, connected) may promote.
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    p.admin(
        B,
        AdminCommand::Promote {
            force: false,
            new_generation: 9,
        },
    )
    .unwrap();
    assert_eq!(p.nodes[B].meta.role, Role::Primary);
    let w = p.write(B, 0, 8, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(B, w), Some(&Ok(())));
    assert_eq!(p.nodes[A].data[0], 8);
}

#[test]
fn demotion_is_refused_with_requests_in_flight() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let _w = p.write(A, 0, 1, 4096);
    let id = pairbd_repl_core::AdminId(500);
    p.nodes[A]
        .node
        .handle_admin(p.now, id, AdminCommand::Demote { force: false });
    p.drain();
    let r = p.nodes[A].admin.remove(&id).unwrap();
    assert!(r.unwrap_err().contains("in flight"));
}

#[test]
fn a_local_store_error_fail_stops_the_node() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 0, 1, 4096);
    p.nodes[A].fail_next_disk = true;
    let k = pos(&p, A, |op| matches!(op, DiskOp::Write { .. }));
    p.complete_disk(A, k);
    assert!(p.nodes[A]
        .failed
        .as_deref()
        .unwrap()
        .contains("simulated EIO"));
    assert!(matches!(p.reply(A, w), Some(Err(ReplyError::Io(_)))));
    let w2 = p.write(A, 0, 1, 4096);
    assert_eq!(p.reply(A, w2), Some(&Err(ReplyError::Stopping)));
}

#[test]
fn an_unclean_primary_returning_as_secondary_is_resynced() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.write(A, 0, 1, 4096);
    p.run_until_idle();
    // Alpha crashes as primary: its metadata still says Primary.
    assert_eq!(p.nodes[A].meta.role, Role::Primary);
    p.restart(A);
    // A write alpha's store had that beta never got (in flight at the crash).
    p.nodes[A].data[100] = 0xEE;
    // Beta takes over (it saw its peer go) and alpha returns.
    p.admin(
        B,
        AdminCommand::Promote {
            force: false,
            new_generation: 11,
        },
    )
    .unwrap();
    p.connect();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.role(), Role::Secondary);
    assert_same(
        &p.nodes[A].data,
        &p.nodes[B].data,
        "alpha's stray write replaced",
    );
    assert_eq!(p.nodes[A].meta.role, Role::Secondary);
}

#[test]
fn both_primary_refuse_to_connect() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("apart");
    p.admin(
        B,
        AdminCommand::Promote {
            force: false,
            new_generation: 12,
        },
    )
    .unwrap();
    p.connect();
    p.run_until_idle();
    assert!(!p.link_up);
    assert!(p
        .disconnects
        .iter()
        .any(|r| r.contains("both nodes are Primary")));
}

#[test]
fn random_link_cuts_always_converge_after_reconnect() {
    for seed in 0..150u64 {
        let mut rng = Rng::new(seed ^ 0xC0FFEE);
        let mut p = Pair::synced(OnPeerLoss::Continue);
        let mut ids = Vec::new();
        for n in 0..80u64 {
            match rng.below(20) {
                0 if p.link_up => p.cut_link("random cut"),
                1 if !p.link_up => p.connect(),
                2..=3 => ids.push(p.client(A, ClientOp::Flush)),
                _ => {
                    let block = rng.below(SIZE / 4096 - 1);
                    ids.push(p.write(
                        A,
                        block * 4096,
                        (n as u8) | 1,
                        4096 * (1 + rng.below(2) as usize),
                    ));
                }
            }
            for _ in 0..rng.below(6) {
                p.step_random(&mut rng);
            }
        }
        if !p.link_up {
            p.connect();
        }
        while p.step_random(&mut rng) {}
        for id in ids {
            assert_eq!(p.reply(A, id), Some(&Ok(())), "seed {seed}: {id:?}");
        }
        let st = p.nodes[A].node.status(p.now);
        assert_eq!(st.connection, ConnectionState::Connected, "seed {seed}");
        assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate, "seed {seed}");
        assert!(!st.peer_sync_needed, "seed {seed}");
        assert_same(&p.nodes[A].data, &p.nodes[B].data, format!("seed {seed}"));
    }
}
