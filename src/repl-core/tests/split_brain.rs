//! Split brain resolved with the dirty bitmaps: `connect --discard-my-data`
//! on the sacrificed node rolls its changes back by resyncing the union of
//! both nodes' bitmaps (not the whole volume), and the opt-in
//! discard-zero-changes policy resolves the case where one side wrote nothing.

mod harness;

use std::time::Duration;

use harness::{Pair, GRANULARITY};
use pairbd_repl_core::{
    AdminCommand, AfterSplitBrain, ConnectionState, DiskState, OnPeerLoss, Role,
};

const A: usize = 0;
const B: usize = 1;

fn promote(force: bool) -> AdminCommand {
    AdminCommand::Promote {
        force,
        new_generation: 0xBEEF,
    }
}

/// alpha writes on while apart; beta restarts, is forced Primary and
/// writes `beta_writes` blocks. Both end StandAlone.
fn split(p: &mut Pair, beta_writes: &[u64]) {
    p.cut_link("partition");
    let w = p.write(A, 0, 0xA1, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    p.restart_with(B, p.nodes[B].node_config());
    p.admin(B, promote(true)).unwrap();
    for &offset in beta_writes {
        let w = p.write(B, offset, 0xB2, 4096);
        p.run_until_idle();
        assert_eq!(p.reply(B, w), Some(&Ok(())));
    }
}

fn both_standalone(p: &Pair) -> bool {
    [A, B].iter().all(|&i| p.nodes[i].node.is_standalone())
}

#[test]
fn discard_my_data_rolls_the_victim_back_with_both_bitmaps() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    split(&mut p, &[8 * GRANULARITY, 30 * GRANULARITY]);
    p.connect();
    p.run_until_idle();
    p.advance(Duration::from_secs(2));
    assert!(both_standalone(&p), "split brain detected by both");
    let survivor_data = p.nodes[A].data.clone();
    // The victim must be Secondary to give its data up.
    let e = p
        .admin(B, AdminCommand::ConnectDiscardingMyData)
        .unwrap_err();
    assert!(e.contains("demote"), "{e}");
    p.admin(B, AdminCommand::Demote { force: false }).unwrap();
    p.admin(B, AdminCommand::ConnectDiscardingMyData).unwrap();
    p.admin(A, AdminCommand::Connect).unwrap();
    p.connect();
    let starts = p.run_until_idle();
    // alpha's bit (block 0) and beta's two bits: the union, not the volume.
    assert_eq!(starts, vec![3 * GRANULARITY]);
    p.assert_same("after the roll-back");
    assert_eq!(p.nodes[A].data, survivor_data, "the survivor kept its data");
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    assert_eq!(p.nodes[B].node.role(), Role::Secondary);
    assert_eq!(
        p.nodes[A].node.status(p.now).connection,
        ConnectionState::Connected
    );
    assert_eq!(
        p.nodes[B].meta.current_generation,
        p.nodes[A].meta.current_generation
    );
    // A later partition and write is an ordinary resync, not a split brain.
    p.cut_link("again");
    let w = p.write(A, 50 * GRANULARITY, 7, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    p.connect();
    assert_eq!(p.run_until_idle(), vec![GRANULARITY]);
    p.assert_same("after the next resync");
}

#[test]
fn both_discarding_stays_a_split_brain() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    split(&mut p, &[8 * GRANULARITY]);
    p.connect();
    p.run_until_idle();
    p.advance(Duration::from_secs(2));
    assert!(both_standalone(&p));
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    p.admin(B, AdminCommand::Demote { force: false }).unwrap();
    p.admin(A, AdminCommand::ConnectDiscardingMyData).unwrap();
    p.admin(B, AdminCommand::ConnectDiscardingMyData).unwrap();
    let (da, db) = (p.nodes[A].data.clone(), p.nodes[B].data.clone());
    p.connect();
    p.run_until_idle();
    p.advance(Duration::from_secs(2));
    assert!(both_standalone(&p));
    assert_eq!(p.nodes[A].data, da);
    assert_eq!(p.nodes[B].data, db);
}

#[test]
fn discard_zero_changes_resolves_only_when_one_side_wrote_nothing() {
    for policy in [
        AfterSplitBrain::Disconnect,
        AfterSplitBrain::DiscardZeroChanges,
    ] {
        let mut p = Pair::synced_with(OnPeerLoss::Continue, |c| c.after_split_brain = policy);
        p.cut_link("partition");
        let w = p.write(A, 0, 0xA1, 4096);
        p.run_until_idle();
        assert_eq!(p.reply(A, w), Some(&Ok(())));
        // beta is forced Primary (a new generation at once) and writes
        // nothing, then is demoted again.
        p.restart_with(B, p.nodes[B].node_config());
        p.admin(B, promote(true)).unwrap();
        p.admin(B, AdminCommand::Demote { force: false }).unwrap();
        p.connect();
        let starts = p.run_until_idle();
        p.advance(Duration::from_secs(2));
        match policy {
            AfterSplitBrain::Disconnect => {
                assert!(both_standalone(&p), "{policy:?}");
                assert!(starts.is_empty());
            }
            AfterSplitBrain::DiscardZeroChanges => {
                assert!(!both_standalone(&p), "{policy:?}");
                assert_eq!(starts, vec![GRANULARITY], "alpha's one dirty bit");
                p.assert_same("after the automatic resolution");
                assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
            }
        }
    }
}
