//! The link's two lanes in the core: a client write of at least
//! `bulk_lane_bytes` may travel on the bulk lane, which the main lane (acks,
//! flushes, small writes) overtakes. The secondary checks sequence numbers
//! per lane and takes only writes from the bulk lane; the primary does not
//! let a FlushAck that overtook a bulk write trim that write from the
//! transfer log, so a power cut of the secondary after the FlushAck still
//! leaves the write's region marked for resync.

mod harness;

use harness::Pair;
use pairbd_repl_core::{ClientOp, Lane, Message, OnPeerLoss, RequestId};

const A: usize = 0;
const B: usize = 1;
const BULK: u64 = 64 << 10;

fn pair() -> Pair {
    Pair::synced_with(OnPeerLoss::Continue, |c| c.bulk_lane_bytes = BULK)
}

/// Takes the first message in beta's inbox that `pick` chooses.
fn take_for_beta(p: &mut Pair, pick: impl Fn(&Message<Vec<u8>>) -> bool) -> Message<Vec<u8>> {
    let at = p.nodes[B]
        .inbox
        .iter()
        .position(pick)
        .expect("such a message on its way to beta");
    p.nodes[B].inbox.remove(at).expect("present")
}

/// Hands `msg` to beta as arriving on `lane`, then runs beta's side: its
/// disk operations complete and its answers reach alpha.
fn beta_receives(p: &mut Pair, lane: Lane, msg: Message<Vec<u8>>) {
    let now = p.now;
    p.nodes[B].node.handle_message_on(now, lane, msg);
    p.drain();
    while !p.nodes[B].disk_queue.is_empty() {
        p.complete_disk(B, 0);
    }
    p.deliver_all(A);
}

fn complete_alpha_disks(p: &mut Pair) {
    while !p.nodes[A].disk_queue.is_empty() {
        p.complete_disk(A, 0);
    }
}

/// A bulk write leaves alpha, then a FLUSH, which the main lane carries past
/// it: beta receives the Flush and answers it. Returns the write's and the
/// flush's requests and the write, still on its way to beta.
fn flush_overtakes_a_bulk_write(p: &mut Pair) -> (RequestId, RequestId, Message<Vec<u8>>) {
    let w = p.write(A, 0, 7, BULK as usize);
    complete_alpha_disks(p);
    let f = p.client(A, ClientOp::Flush);
    complete_alpha_disks(p);
    let write = take_for_beta(p, |m| matches!(m, Message::Write { .. }));
    assert_eq!(write.lane(BULK), Lane::Bulk);
    let flush = take_for_beta(p, |m| matches!(m, Message::Flush { .. }));
    beta_receives(p, Lane::Main, flush);
    (w, f, write)
}

#[test]
fn a_flush_ack_that_overtook_a_bulk_write_leaves_it_in_the_transfer_log() {
    let mut p = pair();
    let (w, f, write) = flush_overtakes_a_bulk_write(&mut p);
    assert_eq!(p.reply(A, f), Some(&Ok(())), "the flush is answered");
    assert_eq!(p.reply(A, w), None, "the write is not: beta lacks it");
    // The write arrives after the flush, lands in beta's page cache only,
    // and is acknowledged.
    beta_receives(&mut p, Lane::Bulk, write);
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert!(p.link_up, "{:?}", p.disconnects);
    // Beta's flush did not cover it: the link goes (say, beta lost power),
    // and alpha must mark the write's region for the resync.
    p.cut_link("the peer lost power");
    p.run_until_idle();
    assert!(
        p.nodes[A].node.bitmap().dirty_bytes() >= BULK,
        "the bulk write's region is marked: {} dirty bytes",
        p.nodes[A].node.bitmap().dirty_bytes()
    );
}

#[test]
fn a_later_flush_covers_the_overtaken_write() {
    let mut p = pair();
    let (w, f, write) = flush_overtakes_a_bulk_write(&mut p);
    beta_receives(&mut p, Lane::Bulk, write);
    assert_eq!(p.reply(A, f), Some(&Ok(())));
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    // A second FLUSH, sent with nothing in flight, covers everything.
    let f2 = p.client(A, ClientOp::Flush);
    p.run_until_idle();
    assert_eq!(p.reply(A, f2), Some(&Ok(())));
    p.cut_link("the peer lost power");
    p.run_until_idle();
    assert_eq!(
        p.nodes[A].node.bitmap().dirty_bytes(),
        0,
        "the second flush covered the write: nothing to resync"
    );
}

#[test]
fn without_a_bulk_lane_a_flush_covers_every_write_below_it() {
    // One lane: the secondary received every lower write before the Flush
    // and waited for it, so the FlushAck covers the write in flight.
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let w = p.write(A, 0, 7, BULK as usize);
    let f = p.client(A, ClientOp::Flush);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    assert_eq!(p.reply(A, f), Some(&Ok(())));
    p.cut_link("the peer lost power");
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.bitmap().dirty_bytes(), 0);
}

#[test]
fn sequence_numbers_rise_per_lane_and_the_lanes_may_overtake_each_other() {
    let mut p = pair();
    let big = p.write(A, 0, 1, BULK as usize);
    let small = p.write(A, 512 << 10, 2, 4096);
    complete_alpha_disks(&mut p);
    let write_big = take_for_beta(&mut p, |m| matches!(m, Message::Write { offset: 0, .. }));
    let write_small = take_for_beta(&mut p, |m| matches!(m, Message::Write { .. }));
    assert_eq!(write_small.lane(BULK), Lane::Main);
    // The small write (higher seq, main lane) arrives first.
    beta_receives(&mut p, Lane::Main, write_small);
    beta_receives(&mut p, Lane::Bulk, write_big);
    assert!(p.link_up, "{:?}", p.disconnects);
    assert_eq!(p.reply(A, small), Some(&Ok(())));
    assert_eq!(p.reply(A, big), Some(&Ok(())));
    p.run_until_idle();
    p.assert_same("after overtaking");
}

#[test]
fn a_bulk_lane_seq_that_goes_backwards_drops_the_link() {
    let mut p = pair();
    p.write(A, 0, 1, BULK as usize);
    p.write(A, 512 << 10, 2, BULK as usize);
    complete_alpha_disks(&mut p);
    let first = take_for_beta(&mut p, |m| matches!(m, Message::Write { .. }));
    let second = take_for_beta(&mut p, |m| matches!(m, Message::Write { .. }));
    beta_receives(&mut p, Lane::Bulk, second);
    assert!(p.link_up);
    beta_receives(&mut p, Lane::Bulk, first);
    assert!(!p.link_up);
    assert!(
        p.disconnects.iter().any(|d| d.contains("does not follow")),
        "{:?}",
        p.disconnects
    );
}

#[test]
fn anything_but_a_write_on_the_bulk_lane_drops_the_link() {
    let mut p = pair();
    p.client(
        A,
        ClientOp::Trim {
            offset: 0,
            length: 256 << 10,
        },
    );
    complete_alpha_disks(&mut p);
    let trim = take_for_beta(&mut p, |m| matches!(m, Message::Trim { .. }));
    beta_receives(&mut p, Lane::Bulk, trim);
    assert!(!p.link_up);
    assert!(
        p.disconnects
            .iter()
            .any(|d| d.contains("only writes travel on the bulk lane")),
        "{:?}",
        p.disconnects
    );
}
