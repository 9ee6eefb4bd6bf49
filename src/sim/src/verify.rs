//! The online-verify scenario: the simulator corrupts a few 4 KiB blocks
//! directly on the Secondary's store (bit rot, or a write that went around
//! the replication), the operator runs `verify` on the Primary and, once it
//! finished, `resync-marked`; the checker compares what verify reported with
//! what was corrupted.
//!
//! The rule a verify that ran to the end (same core, same connection) must
//! keep, checked when the operator sees it finished:
//! - it reports only 4 KiB blocks the simulator corrupted in this run: any
//!   other block (a write in flight, say) is a violation;
//! - it reports every block in which, now, exactly one of the two stores
//!   holds injected bytes in some sector. A corrupted block that clients
//!   overwrote whole meanwhile (through the replicated path) may or may not
//!   be reported: the write repaired it. A sector cannot turn corrupt again
//!   while the verify runs without a power cut or a sync, both of which end
//!   the connection and so the verify;
//! - its count equals the blocks its ranges name (while it names fewer than
//!   the 64 ranges it keeps).
//!
//! The scenario draws from its own random stream and only in the profiles
//! that enable it, so other seeds replay the runs they had before. If
//! corruption is still there when the pair settles at the end (the verify was
//! interrupted, or its resync was), the operator runs verify and
//! resync-marked again before the final comparison, which allows no
//! exception.

use pairbd_repl_core::{AdminCommand, VerifyResult};
use pairbd_repl_proto::VERIFY_BLOCK_BYTES;

use crate::checker::Violation;
use crate::content::{corruption, decode, Content, BLOCK_BYTES};
use crate::operator::Task;
use crate::world::{Event, Phase, Sim, NAMES};

const PATIENCE_US: u64 = 30_000_000;
/// Settle-phase verifies run to repair leftover corruption, at most.
const REPAIR_VERIFIES_MAX: u32 = 3;
/// Simulator blocks per verify block.
const SECTORS: usize = VERIFY_BLOCK_BYTES as usize / BLOCK_BYTES;

/// The verify task's progress.
#[derive(Debug, Clone)]
pub struct VerifyTask {
    primary: usize,
    /// 0: waiting for the verify command's answer; 1: verify running;
    /// 2: waiting for resync-marked's answer.
    step: u8,
    admin: u64,
    since: u64,
    /// The primary's incarnation and connection when the verify started.
    inc: u64,
    conn: Option<u64>,
}

impl Sim {
    fn injected(&self, n: usize, b: usize) -> bool {
        decode(self.nodes[n].store.cached(b), b as u64) == Content::Injected
    }

    /// Whether some block holds injected bytes on one store only.
    pub fn injected_differs(&self) -> bool {
        (0..self.profile.blocks).any(|b| self.injected(0, b) != self.injected(1, b))
    }

    /// The scenario's turn: corrupt and verify when the pair is in service.
    pub fn verify_scenario(&mut self) {
        if self.phase != Phase::Safety {
            return;
        }
        let gap = self.verify_rng.between(300_000, 2_000_000);
        self.schedule(self.now + gap, Event::VerifyScenario);
        if !self.in_service() {
            return;
        }
        let Some(p) = self.attached else { return };
        if self.injected_differs() {
            // An earlier verify was interrupted: the operator runs it again.
            self.note(format!("corruption left: verify again on {}", NAMES[p]));
            self.start_verify(p);
            return;
        }
        let s = 1 - p;
        let vblocks = self.profile.blocks.div_ceil(SECTORS) as u64;
        let count = self.verify_rng.between(1, vblocks.min(3));
        let mut chosen = Vec::new();
        while (chosen.len() as u64) < count {
            let vb = self.verify_rng.below(vblocks) as usize;
            if !chosen.contains(&vb) {
                chosen.push(vb);
            }
        }
        chosen.sort_unstable();
        for &vb in &chosen {
            let last = ((vb + 1) * SECTORS).min(self.profile.blocks);
            for b in vb * SECTORS..last {
                self.nodes[s].store.corrupt(b, &corruption(b as u64));
                self.checker.corrupted(b);
            }
            self.corrupted.push(vb as u64);
        }
        self.figures.blocks_corrupted += count;
        self.note(format!(
            "{}'s store: 4 KiB blocks {chosen:?} corrupted; verify on {}",
            NAMES[s], NAMES[p]
        ));
        self.start_verify(p);
    }

    fn start_verify(&mut self, p: usize) {
        let Some(admin) = self.admin(p, AdminCommand::Verify) else {
            return;
        };
        self.task = Some(Task::Verify(VerifyTask {
            primary: p,
            step: 0,
            admin,
            since: self.now,
            inc: self.nodes[p].inc,
            conn: self.net.held_by(p),
        }));
        self.schedule(self.now + 20_000, Event::OperatorStep);
    }

    /// In the settle phase, before the final comparison: corruption that a
    /// verify has not repaired yet gets another verify (at most a few).
    /// Returns whether one started.
    pub fn repair_leftover_corruption(&mut self) -> bool {
        if self.repair_verifies >= REPAIR_VERIFIES_MAX || !self.injected_differs() {
            return false;
        }
        let Some(p) = self.attached else { return false };
        self.repair_verifies += 1;
        self.note(format!(
            "corruption left on one store: verify again on {}",
            NAMES[p]
        ));
        self.start_verify(p);
        self.task.is_some()
    }

    /// At the end of a run (the stores were found identical): each
    /// corruption whose block holds no injected bytes any more counts as
    /// repaired; the others were carried over to both stores (the corrupted
    /// node became the Primary before a verify found it, and the resync
    /// copied its blocks: verify cannot know which copy is right).
    pub fn count_repaired(&mut self) {
        for &vb in &self.corrupted {
            let first = vb as usize * SECTORS;
            let last = (first + SECTORS).min(self.profile.blocks);
            if (first..last).all(|b| !self.injected(0, b) && !self.injected(1, b)) {
                self.figures.blocks_repaired += 1;
            } else {
                self.figures.blocks_carried_over += 1;
            }
        }
    }

    /// Advances the verify task.
    pub fn verify_step(&mut self, mut t: VerifyTask) -> Option<Task> {
        let p = t.primary;
        if self.nodes[p].inc != t.inc || !self.nodes[p].up() {
            self.note("verify abandoned: the primary went down".to_string());
            return None;
        }
        let answer = self.admins.get(&t.admin).and_then(|a| a.answer.clone());
        let patient = self.now < t.since + PATIENCE_US;
        match t.step {
            0 => match answer {
                None if patient => Some(Task::Verify(t)),
                Some(Ok(_)) => {
                    t.step = 1;
                    Some(Task::Verify(t))
                }
                other => {
                    self.note(format!("verify not started: {other:?}"));
                    None
                }
            },
            1 => {
                let st = self.status(p)?;
                let same_link = self.net.held_by(p) == t.conn
                    && st.connection == pairbd_repl_core::ConnectionState::Connected;
                if !same_link {
                    self.note("verify stopped: the link went".to_string());
                    return None;
                }
                if st.verify.is_some() {
                    return patient.then_some(Task::Verify(t));
                }
                let Some(result) = st.last_verify else {
                    self.fail(Violation::Verify(
                        "the verify ended on the same connection without a result".into(),
                    ));
                    return None;
                };
                self.figures.verifies += 1;
                self.figures.blocks_found += result.differing_blocks;
                self.note(format!(
                    "verify finished: {} blocks differ {:?}",
                    result.differing_blocks, result.ranges
                ));
                if let Err(v) = self.check_verify(&result) {
                    self.fail(v);
                    return None;
                }
                if result.differing_blocks == 0 {
                    return None;
                }
                t.admin = self.admin(p, AdminCommand::ResyncMarked)?;
                t.step = 2;
                t.since = self.now;
                Some(Task::Verify(t))
            }
            _ => match answer {
                None if patient => Some(Task::Verify(t)),
                other => {
                    self.note(format!("resync-marked: {other:?}"));
                    None
                }
            },
        }
    }

    /// The rule of the module documentation.
    fn check_verify(&self, result: &VerifyResult) -> Result<(), Violation> {
        let size = (self.profile.blocks * BLOCK_BYTES) as u64;
        let vblocks = self.profile.blocks.div_ceil(SECTORS);
        let mut reported = vec![false; vblocks];
        let mut named = 0u64;
        for &(at, len) in &result.ranges {
            let aligned =
                at % VERIFY_BLOCK_BYTES == 0 && (len % VERIFY_BLOCK_BYTES == 0 || at + len == size);
            if !aligned || len == 0 || at + len > size {
                return Err(Violation::Verify(format!(
                    "range {at}+{len} is not a run of 4 KiB blocks of the {size}-byte volume"
                )));
            }
            let first = (at / VERIFY_BLOCK_BYTES) as usize;
            let last = (at + len).div_ceil(VERIFY_BLOCK_BYTES) as usize;
            for r in &mut reported[first..last] {
                if *r {
                    return Err(Violation::Verify(format!("block at {at} reported twice")));
                }
                *r = true;
                named += 1;
            }
        }
        if result.ranges.len() < 64 && named != result.differing_blocks {
            return Err(Violation::Verify(format!(
                "{} differing blocks counted, {named} named by the ranges {:?}",
                result.differing_blocks, result.ranges
            )));
        }
        for (vb, &was_reported) in reported.iter().enumerate() {
            let sectors = vb * SECTORS..((vb + 1) * SECTORS).min(self.profile.blocks);
            let corrupted = sectors.clone().any(|b| self.checker.was_corrupted(b));
            let differs = sectors
                .clone()
                .any(|b| self.injected(0, b) != self.injected(1, b));
            if was_reported && !corrupted {
                return Err(Violation::Verify(format!(
                    "4 KiB block {vb} reported as differing, but nobody corrupted it \
                     (ranges {:?})",
                    result.ranges
                )));
            }
            if differs && !was_reported {
                return Err(Violation::Verify(format!(
                    "4 KiB block {vb} holds injected corruption on one store only, but the \
                     verify did not report it (ranges {:?})",
                    result.ranges
                )));
            }
        }
        Ok(())
    }
}
