//! Roles and failover in the pure core: generation identifiers, the verdict
//! at connect, failover and the returning old primary, split brain, the
//! promotion probe, forced demotion and the after-crash choice.

mod harness;

use std::time::Duration;

use harness::{config, Pair, Rng};
use pairbd_repl_core::generations::{compare, Verdict};
use pairbd_repl_core::{
    AdminCommand, AdminId, AfterCrash, ConnectionState, DiskOp, DiskState, Generations, OnPeerLoss,
    ReplyError, Role,
};

const A: usize = 0;
const B: usize = 1;

#[track_caller]
fn assert_same(a: &[u8], b: &[u8], what: &str) {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: stores differ at byte {i}: {} vs {}", a[i], b[i]);
    }
}

fn promote(force: bool) -> AdminCommand {
    AdminCommand::Promote {
        force,
        new_generation: 0xF0F0 + force as u64,
    }
}

fn gens(p: &Pair, i: usize) -> Generations {
    p.nodes[i].node.status(p.now).generations
}

/// Sends an admin command without running anything else; returns its id.
fn start_admin(p: &mut Pair, i: usize, id: u64, cmd: AdminCommand) -> AdminId {
    let id = AdminId(id);
    p.nodes[i].node.handle_admin(p.now, id, cmd);
    p.drain();
    id
}

#[test]
fn the_verdict_is_symmetric_and_names_the_newer_side() {
    let disks = [
        DiskState::Inconsistent,
        DiskState::Outdated,
        DiskState::UpToDate,
    ];
    let mut rng = Rng::new(3);
    // Small identifier space so that matches happen often.
    let g = |rng: &mut Rng| Generations {
        current: rng.below(4),
        bitmap: rng.below(4),
        history: [rng.below(4), rng.below(4)],
    };
    for _ in 0..20_000 {
        let (da, db) = (disks[rng.below(3) as usize], disks[rng.below(3) as usize]);
        let (ga, gb) = (g(&mut rng), g(&mut rng));
        assert_eq!(
            compare(da, ga, db, gb),
            compare(db, gb, da, ga).mirrored(),
            "{da:?} {ga:?} / {db:?} {gb:?}"
        );
    }
    let base = Generations {
        current: 10,
        bitmap: 0,
        history: [0, 0],
    };
    let moved_on = Generations {
        current: 11,
        bitmap: 10,
        history: [0, 0],
    };
    let also_moved_on = Generations {
        current: 12,
        bitmap: 10,
        history: [0, 0],
    };
    let up = DiskState::UpToDate;
    assert_eq!(compare(up, base, up, base), Verdict::Same);
    assert_eq!(compare(up, moved_on, up, base), Verdict::Ahead);
    assert_eq!(compare(up, base, up, moved_on), Verdict::Behind);
    assert_eq!(
        compare(up, moved_on, up, also_moved_on),
        Verdict::SplitBrain
    );
    let stranger = Generations {
        current: 99,
        bitmap: 98,
        history: [97, 0],
    };
    assert_eq!(compare(up, base, up, stranger), Verdict::Unrelated);
    assert_eq!(
        compare(DiskState::Inconsistent, stranger, up, base),
        Verdict::Behind
    );
}

#[test]
fn failover_then_the_old_primary_returns_as_an_outdated_secondary_and_syncs() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let before = gens(&p, A);
    let w = p.write(A, 0, 1, 8192);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    // alpha's daemon dies; beta stayed up and UpToDate: failover.
    p.restart(A);
    assert_eq!(p.nodes[A].node.role(), Role::Secondary);
    p.admin(B, promote(false))
        .expect("a secondary that saw its primary vanish promotes");
    assert_eq!(gens(&p, B), before, "a promotion alone begins nothing");
    // The first write without the peer begins a new generation.
    let w = p.write(B, 4096, 2, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(B, w), Some(&Ok(())));
    let after = gens(&p, B);
    assert_ne!(after.current, before.current);
    assert_eq!(after.bitmap, before.current);
    assert_eq!(p.nodes[B].meta.current_generation, after.current, "durable");
    // alpha returns: it learns it is behind, becomes Outdated, then syncs.
    p.connect();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.role(), Role::Secondary);
    assert_eq!(p.nodes[B].node.role(), Role::Primary);
    assert_eq!(p.nodes[A].node.disk(), DiskState::UpToDate);
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "after the resync");
    assert_eq!(gens(&p, A).current, after.current);
    assert_eq!(gens(&p, B).bitmap, 0, "the peer caught up");
    assert_eq!(gens(&p, B).history[0], before.current);
    assert_eq!(p.nodes[A].data[4096], 2);
}

#[test]
fn a_behind_secondary_is_outdated_on_disk_and_refuses_promotion() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    let w = p.write(A, 0, 7, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    // Demote alpha while apart; both Secondary when they meet again.
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    p.connect();
    p.run_until_idle();
    assert_eq!(p.nodes[B].node.disk(), DiskState::Outdated);
    assert_eq!(p.nodes[B].meta.disk, DiskState::Outdated, "persisted");
    let e = p.admin(B, promote(false)).unwrap_err();
    assert!(e.contains("Outdated"), "{e}");
    // Promoting the node with the newer data syncs the other.
    p.admin(A, promote(false)).unwrap();
    p.run_until_idle();
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "after the sync");
}

#[test]
fn a_promotion_without_writes_never_forks_the_data() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    // beta is promoted while apart but writes nothing; alpha writes on.
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    p.admin(B, promote(false)).unwrap();
    p.admin(B, AdminCommand::Demote { force: false }).unwrap();
    p.admin(A, promote(false)).unwrap();
    let w = p.write(A, 0, 5, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    p.connect();
    p.run_until_idle();
    assert_eq!(
        p.nodes[A].node.status(p.now).connection,
        ConnectionState::Connected
    );
    assert_eq!(p.nodes[B].node.disk(), DiskState::UpToDate);
    assert_eq!(p.nodes[B].data[0], 5);
}

#[test]
fn a_primary_behind_its_secondary_does_not_connect_until_demoted() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    // beta takes over and writes; alpha stays Primary without writing.
    p.admin(B, promote(false)).unwrap();
    let w = p.write(B, 0, 9, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(B, w), Some(&Ok(())));
    p.admin(B, AdminCommand::Demote { force: false }).unwrap();
    p.connect();
    p.run_until_idle();
    assert!(!p.link_up, "a primary with older data must not connect");
    let why = p.disconnects.join(" | ");
    assert!(why.contains("newer data"), "{why}");
    assert_eq!(p.nodes[A].data[0], 0, "nothing was synced either way");
    // alpha demotes; then they connect and beta (promoted) syncs alpha.
    p.admin(A, AdminCommand::Demote { force: false }).unwrap();
    p.connect();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.disk(), DiskState::Outdated);
    p.admin(B, promote(false)).unwrap();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.disk(), DiskState::UpToDate);
    assert_eq!(p.nodes[A].data[0], 9);
}

#[test]
fn split_brain_is_reported_by_both_and_changes_no_data() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    p.cut_link("partition");
    let w = p.write(A, 0, 0xA1, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(A, w), Some(&Ok(())));
    p.restart(B);
    let e = p.admin(B, promote(false)).unwrap_err();
    assert!(e.contains("--force"), "{e}");
    p.admin(B, promote(true)).unwrap();
    let w = p.write(B, 8192, 0xB2, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(B, w), Some(&Ok(())));
    let (da, db) = (p.nodes[A].data.clone(), p.nodes[B].data.clone());
    p.connect();
    p.run_until_idle();
    // Each keeps the link a moment (so the other reads its hello), then
    // closes it.
    p.advance(Duration::from_secs(2));
    assert!(!p.link_up);
    for i in [A, B] {
        let st = p.nodes[i].node.status(p.now);
        assert_eq!(st.connection, ConnectionState::StandAlone, "node {i}");
        let why = st.last_disconnect.unwrap();
        assert!(why.contains("split brain"), "{why}");
        assert!(p.nodes[i].node.is_standalone());
        assert_eq!(st.role, Role::Primary);
    }
    assert_eq!(p.nodes[A].data, da);
    assert_eq!(p.nodes[B].data, db);
    // A StandAlone node refuses new links until `connect`; then it checks
    // again and stays StandAlone.
    p.connect();
    p.run_until_idle();
    assert!(!p.link_up);
    assert_eq!(
        p.admin(A, AdminCommand::Connect).unwrap(),
        "left StandAlone: connecting to the peer"
    );
    p.admin(B, AdminCommand::Connect).unwrap();
    p.connect();
    p.run_until_idle();
    p.advance(Duration::from_secs(2));
    assert!(p.nodes[A].node.is_standalone() && p.nodes[B].node.is_standalone());
    assert_eq!(p.nodes[A].data, da);
    assert_eq!(p.nodes[B].data, db);
}

#[test]
fn a_node_restarted_alone_refuses_promotion_and_force_starts_a_generation() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let before = gens(&p, B);
    p.restart(A);
    p.restart(B);
    let e = p.admin(B, promote(false)).unwrap_err();
    assert!(e.contains("started without its peer"), "{e}");
    assert!(e.contains("--force"), "{e}");
    p.admin(B, promote(true)).unwrap();
    let g = gens(&p, B);
    assert_ne!(g.current, before.current, "forced: a new generation");
    assert_eq!(g.bitmap, before.current);
    assert!(p.nodes[B].meta.peer_sync_needed);
    // alpha (same old generation) comes back: it is behind and gets synced.
    p.connect();
    p.run_until_idle();
    assert_eq!(
        p.nodes[A].node.status(p.now).connection,
        ConnectionState::Connected
    );
    assert_eq!(p.nodes[A].node.disk(), DiskState::UpToDate);
    assert_eq!(gens(&p, A).current, g.current);
}

#[test]
fn an_inconsistent_node_refuses_promotion() {
    let mut p = Pair::new(OnPeerLoss::Continue);
    let e = p.admin(A, promote(false)).unwrap_err();
    assert!(e.contains("Inconsistent"), "{e}");
    assert_eq!(p.nodes[A].node.role(), Role::Secondary);
}

#[test]
fn a_silent_primary_peer_is_probed_and_counted_as_lost() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    // alpha freezes: nothing it would send arrives any more.
    let id = start_admin(&mut p, B, 900, promote(false));
    assert!(
        !p.nodes[B].admin.contains_key(&id),
        "waits for the probe's answer"
    );
    p.nodes[A].inbox.clear();
    p.advance(Duration::from_millis(999));
    assert!(!p.nodes[B].admin.contains_key(&id));
    p.advance(Duration::from_millis(2));
    // The link is dropped, the promotion goes on once Primary is durable.
    while !p.nodes[B].meta_queue.is_empty() {
        p.complete_meta(B);
    }
    let r = p.nodes[B].admin.remove(&id).expect("answered");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(p.nodes[B].node.role(), Role::Primary);
    assert!(p.disconnects.iter().any(|d| d.contains("probe")));
}

#[test]
fn a_primary_peer_that_answers_the_probe_refuses_the_promotion() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let e = p.admin(B, promote(false)).unwrap_err();
    assert!(e.contains("answered a probe"), "{e}");
    assert!(e.contains("demote"), "{e}");
    assert_eq!(p.nodes[B].node.role(), Role::Secondary);
    assert!(p.link_up);
}

#[test]
fn forced_demotion_fails_held_requests_and_waits_for_running_ones() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let running = p.write(A, 0, 3, 4096);
    // Overlaps the running write: held by the overlap rule, not started.
    let held = p.write(A, 0, 4, 4096);
    let e = p
        .admin(A, AdminCommand::Demote { force: false })
        .unwrap_err();
    assert!(e.contains("in flight"), "{e}");
    // The refused demotion ran everything to completion; start over.
    assert!(p.reply(A, running).is_some() && p.reply(A, held).is_some());
    let running = p.write(A, 0, 5, 4096);
    let held = p.write(A, 0, 6, 4096);
    let id = start_admin(&mut p, A, 901, AdminCommand::Demote { force: true });
    assert_eq!(p.reply(A, held), Some(&Err(ReplyError::NotPrimary)));
    assert!(
        !p.nodes[A].admin.contains_key(&id),
        "waits for the running write"
    );
    assert!(p.nodes[A].node.status(p.now).demoting);
    let refused = p.write(A, 8192, 7, 4096);
    assert_eq!(p.reply(A, refused), Some(&Err(ReplyError::NotPrimary)));
    p.run_until_idle();
    assert_eq!(p.reply(A, running), Some(&Ok(())));
    assert_eq!(
        p.nodes[A].admin.remove(&id).unwrap().unwrap(),
        "demoted to Secondary"
    );
    assert_eq!(p.nodes[A].meta.role, Role::Secondary);
    assert_eq!(p.nodes[B].data[0], 5, "the running write reached both");
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "after the demotion");
    let _ = DiskOp::<Vec<u8>>::Flush;
}

#[test]
fn after_crash_resume_primary_waits_for_a_secondary_peer_without_newer_data() {
    let mut p = Pair::synced(OnPeerLoss::Continue);
    let mut cfg = config("alpha", OnPeerLoss::Continue);
    cfg.after_crash = AfterCrash::ResumePrimary;
    p.restart_with(A, cfg.clone());
    assert_eq!(p.nodes[A].node.role(), Role::Secondary, "never while alone");
    p.connect();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.role(), Role::Primary, "resumed");
    assert_eq!(p.nodes[A].meta.role, Role::Primary);
    assert_same(&p.nodes[A].data, &p.nodes[B].data, "resynced");
    // If beta took over and wrote meanwhile, alpha stays Secondary.
    p.restart_with(A, cfg);
    p.admin(B, promote(false)).unwrap();
    let w = p.write(B, 0, 0x42, 4096);
    p.run_until_idle();
    assert_eq!(p.reply(B, w), Some(&Ok(())));
    p.connect();
    p.run_until_idle();
    assert_eq!(p.nodes[A].node.role(), Role::Secondary);
    assert_eq!(p.nodes[A].data[0], 0x42);
}

/// Random failovers: writes race a crash of the primary at a random point;
/// the survivor promotes without --force and holds every acknowledged write;
/// the old primary returns, is synced, and the stores converge. Never a split
/// brain, never a refused failover.
#[test]
fn random_failovers_keep_every_acknowledged_write_and_converge() {
    const BLOCK: u64 = 4096;
    const BLOCKS: u64 = 64;
    for seed in 0..150u64 {
        let mut rng = Rng::new(seed);
        let mut p = Pair::synced(OnPeerLoss::Continue);
        let mut primary = A;
        let mut value: u8 = 1;
        // Per block: the values it may hold (the last acknowledged one and
        // every one written after it).
        let mut allowed: Vec<Vec<u8>> = vec![vec![0]; BLOCKS as usize];
        for round in 0..3 {
            let mut pending = Vec::new();
            for _ in 0..rng.below(12) + 1 {
                let block = rng.below(BLOCKS);
                value = value.wrapping_add(1).max(1);
                let id = p.write(primary, block * BLOCK, value, BLOCK as usize);
                allowed[block as usize].push(value);
                pending.push((id, block, value));
                for _ in 0..rng.below(6) {
                    p.step_random(&mut rng);
                }
            }
            for _ in 0..rng.below(20) {
                p.step_random(&mut rng);
            }
            // Whatever was acknowledged is now the only past value allowed.
            for (id, block, v) in &pending {
                if p.reply(primary, *id) == Some(&Ok(())) {
                    let a = &mut allowed[*block as usize];
                    let at = a.iter().position(|x| x == v).unwrap();
                    a.drain(..at);
                }
            }
            // The primary's daemon dies here.
            p.restart(primary);
            let survivor = 1 - primary;
            p.admin(survivor, promote(false))
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: failover refused: {e}"));
            for (b, allowed) in allowed.iter_mut().enumerate() {
                let got = p.nodes[survivor].data[b * BLOCK as usize];
                assert!(
                    allowed.contains(&got),
                    "seed {seed} round {round}: block {b} holds {got}, allowed {allowed:?}"
                );
                *allowed = vec![got];
            }
            // The survivor writes alone, then the old primary returns.
            let w = p.write(survivor, 0, value.wrapping_add(100), BLOCK as usize);
            p.run_until_idle();
            assert_eq!(p.reply(survivor, w), Some(&Ok(())));
            allowed[0] = vec![value.wrapping_add(100)];
            p.connect();
            p.run_until_idle();
            for i in [A, B] {
                let st = p.nodes[i].node.status(p.now);
                assert_eq!(
                    st.connection,
                    ConnectionState::Connected,
                    "seed {seed} round {round} node {i}: {:?}",
                    st.last_disconnect
                );
            }
            assert_eq!(p.nodes[primary].node.disk(), DiskState::UpToDate);
            assert_same(
                &p.nodes[A].data,
                &p.nodes[B].data,
                &format!("seed {seed} round {round}"),
            );
            primary = survivor;
        }
    }
}
