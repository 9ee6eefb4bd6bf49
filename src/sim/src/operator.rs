//! The simulated operator and the faults of the safety phase.
//!
//! `chaos` picks the next fault or operator action from the seed's profile.
//! Operator actions that take several steps (a switchover is: detach the
//! clients, wait for their requests, demote, promote the other node) run as
//! one `Task` at a time, like a person at a console. `manage` is the cluster
//! manager: it restarts stopped nodes, resolves a split brain by discarding
//! one side (create-md on the victim, connect on the survivor, as
//! docs/OPERATIONS.md says), demotes a primary the peer refuses, and
//! promotes a node when the pair has none. In the liveness phase it runs
//! every 100 ms and the pair must come back into service by the deadline.

use pairbd_repl_core::{AdminCommand, ConnectionState, DiskState, PersistentState, Role};

use crate::checker::Violation;
use crate::verify::VerifyTask;
use crate::workload::{Action, ACTIONS};
use crate::world::{Death, Event, Phase, Sim, NAMES};

const STEP_US: u64 = 20_000;
const ADMIN_PATIENCE_US: u64 = 10_000_000;

/// A multi-step operator action in progress.
#[derive(Debug, Clone)]
pub enum Task {
    /// The new pair's first promotion (`promote --force`).
    Initial { admin: Option<u64> },
    /// Planned switchover: demote `from`, then promote `to`.
    Switchover {
        from: usize,
        to: usize,
        step: u8,
        admin: Option<u64>,
        since: u64,
    },
    /// Kill (or power-cut) the primary, wait, promote the other without --force.
    Failover {
        victim: usize,
        promote_at: u64,
        admin: Option<u64>,
    },
    /// SIGTERM: detach, wait, shutdown command, flush, stop, start again.
    CleanRestart {
        node: usize,
        step: u8,
        admin: Option<u64>,
        since: u64,
    },
    /// One admin command, waiting for its answer.
    Single { admin: u64, since: u64 },
    /// Online verify on the Primary, then resync-marked (`verify.rs`).
    Verify(VerifyTask),
}

impl Task {
    /// The first promotion of a new pair.
    pub fn initial() -> Task {
        Task::Initial { admin: None }
    }
}

impl Sim {
    fn answer(&self, admin: u64) -> Option<Result<String, String>> {
        self.admins.get(&admin).and_then(|a| a.answer.clone())
    }

    fn new_generation(&mut self) -> u64 {
        self.rng.next_u64() | 1
    }

    fn promote_cmd(&mut self, force: bool) -> AdminCommand {
        AdminCommand::Promote {
            force,
            new_generation: self.new_generation(),
        }
    }

    fn start_task(&mut self, task: Task) {
        self.task = Some(task);
        self.schedule(self.now + STEP_US, Event::OperatorStep);
    }

    fn single(&mut self, n: usize, cmd: AdminCommand) {
        if let Some(admin) = self.admin(n, cmd) {
            self.start_task(Task::Single {
                admin,
                since: self.now,
            });
        }
    }

    /// Advances the running task.
    pub fn operator_step(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        self.task = self.advance(task);
        if self.task.is_some() {
            self.schedule(self.now + STEP_US, Event::OperatorStep);
        }
    }

    fn advance(&mut self, task: Task) -> Option<Task> {
        match task {
            Task::Initial { admin: None } => {
                let cmd = self.promote_cmd(true);
                let admin = self.admin(0, cmd);
                Some(Task::Initial { admin })
            }
            Task::Initial { admin: Some(a) } => match self.answer(a) {
                None => Some(Task::Initial { admin: Some(a) }),
                Some(Ok(_)) => None,
                Some(Err(_)) => Some(Task::Initial { admin: None }),
            },
            Task::Single { admin, since } => {
                if self.answer(admin).is_none() && self.now < since + ADMIN_PATIENCE_US {
                    Some(Task::Single { admin, since })
                } else {
                    None
                }
            }
            Task::Switchover {
                from,
                to,
                step,
                admin,
                since,
            } => self.switchover(from, to, step, admin, since),
            Task::Failover {
                victim,
                promote_at,
                admin,
            } => self.failover(victim, promote_at, admin),
            Task::CleanRestart {
                node,
                step,
                admin,
                since,
            } => self.clean_restart(node, step, admin, since),
            Task::Verify(t) => self.verify_step(t),
        }
    }

    fn requests_on(&self, n: usize) -> usize {
        self.requests.values().filter(|r| r.node == n).count()
    }

    fn switchover(
        &mut self,
        from: usize,
        to: usize,
        step: u8,
        admin: Option<u64>,
        since: u64,
    ) -> Option<Task> {
        let next = |step, admin, since| {
            Some(Task::Switchover {
                from,
                to,
                step,
                admin,
                since,
            })
        };
        match step {
            // Clients detached (by `chaos`); wait for their requests, then demote.
            0 => {
                if !self.nodes[from].up() {
                    return None;
                }
                let idle = self.requests_on(from) == 0;
                let impatient = self.now > since + 2_000_000;
                if !idle && !impatient {
                    return next(0, None, since);
                }
                let a = self.admin(from, AdminCommand::Demote { force: !idle })?;
                next(1, Some(a), self.now)
            }
            1 => match admin.and_then(|a| self.answer(a)) {
                None if self.now < since + ADMIN_PATIENCE_US => next(1, admin, since),
                Some(Ok(_)) => {
                    let cmd = self.promote_cmd(false);
                    let a = self.admin(to, cmd)?;
                    next(2, Some(a), self.now)
                }
                _ => None,
            },
            2 => match admin.and_then(|a| self.answer(a)) {
                None if self.now < since + ADMIN_PATIENCE_US => next(2, admin, since),
                Some(Err(_)) => {
                    // The other node refused: the old primary takes it back.
                    let cmd = self.promote_cmd(false);
                    let a = self.admin(from, cmd)?;
                    next(3, Some(a), self.now)
                }
                _ => None,
            },
            _ => match admin.and_then(|a| self.answer(a)) {
                None if self.now < since + ADMIN_PATIENCE_US => next(3, admin, since),
                _ => None,
            },
        }
    }

    fn failover(&mut self, victim: usize, promote_at: u64, admin: Option<u64>) -> Option<Task> {
        let survivor = 1 - victim;
        match admin {
            None if self.now < promote_at => Some(Task::Failover {
                victim,
                promote_at,
                admin,
            }),
            None => {
                let cmd = self.promote_cmd(false);
                let a = self.admin(survivor, cmd)?;
                Some(Task::Failover {
                    victim,
                    promote_at,
                    admin: Some(a),
                })
            }
            Some(a) => match self.answer(a) {
                None if self.now < promote_at + ADMIN_PATIENCE_US => Some(Task::Failover {
                    victim,
                    promote_at,
                    admin,
                }),
                Some(Err(e)) => {
                    self.figures.failovers_refused += 1;
                    self.note(format!("failover to {} refused: {e}", NAMES[survivor]));
                    None
                }
                _ => None,
            },
        }
    }

    fn clean_restart(
        &mut self,
        n: usize,
        step: u8,
        admin: Option<u64>,
        since: u64,
    ) -> Option<Task> {
        if !self.nodes[n].up() {
            return None;
        }
        match step {
            0 => {
                if self.requests_on(n) > 0 && self.now < since + 2_000_000 {
                    return Some(Task::CleanRestart {
                        node: n,
                        step,
                        admin,
                        since,
                    });
                }
                let a = self.admin(n, AdminCommand::Shutdown)?;
                Some(Task::CleanRestart {
                    node: n,
                    step: 1,
                    admin: Some(a),
                    since: self.now,
                })
            }
            _ => match admin.and_then(|a| self.answer(a)) {
                None if self.now < since + ADMIN_PATIENCE_US => Some(Task::CleanRestart {
                    node: n,
                    step,
                    admin,
                    since,
                }),
                Some(Ok(_)) => {
                    // The daemon flushes the store at exit.
                    self.nodes[n].store.flush_all();
                    self.stop_node(n, Death::Clean);
                    let delay = self.rng.between(100_000, 2_000_000);
                    self.schedule_restart(n, delay);
                    None
                }
                _ => None,
            },
        }
    }

    /// The split brain's resolution: the victim's data is given up, the
    /// survivor connects and syncs it. Either with `connect
    /// --discard-my-data` on a StandAlone Secondary victim (the bitmaps say
    /// what to roll back), or the old way: create-md --force on the victim.
    fn discard(&mut self, victim: usize) {
        let survivor = 1 - victim;
        let bitmap_way =
            self.nodes[victim].core.as_ref().is_some_and(|c| {
                c.is_standalone() && c.role() == pairbd_repl_core::Role::Secondary
            }) && self.rng.percent(60);
        if bitmap_way {
            self.note(format!(
                "operator resolves the split brain: connect --discard-my-data on {}",
                NAMES[victim]
            ));
            self.figures.split_brains_resolved += 1;
            self.checker.discarded(victim);
            self.single(victim, AdminCommand::ConnectDiscardingMyData);
            if self.nodes[survivor]
                .core
                .as_ref()
                .is_some_and(|c| c.is_standalone())
            {
                self.single(survivor, AdminCommand::Connect);
            }
            return;
        }
        self.note(format!(
            "operator resolves the split brain: {} gives up its data",
            NAMES[victim]
        ));
        self.figures.split_brains_resolved += 1;
        self.stop_node(victim, Death::Clean);
        self.nodes[victim].meta = PersistentState::fresh();
        self.checker.discarded(victim);
        self.schedule_restart(victim, 100_000);
        if self.nodes[survivor]
            .core
            .as_ref()
            .is_some_and(|c| c.is_standalone())
        {
            self.single(survivor, AdminCommand::Connect);
        }
    }

    // ----- the safety phase's faults ----------------------------------------

    /// Injects the next fault or operator action.
    pub fn chaos(&mut self) {
        if self.phase != Phase::Safety {
            return;
        }
        if self.now >= self.opts.safety_ms * 1000 {
            self.begin_liveness();
            return;
        }
        let gap = self.profile.chaos_gap_us(&mut self.rng);
        self.schedule(self.now + gap, Event::Chaos);
        self.figures.samples += 1;
        if self.in_service() {
            self.figures.samples_in_service += 1;
        }
        let action = ACTIONS[self.rng.weighted(&self.profile.faults)];
        let n = self.rng.below(2) as usize;
        let busy = self.task.is_some();
        let primary = (0..2).find(|&i| self.serves(i));
        match action {
            Action::CutLink => self.cut_link(),
            Action::FullPartition => {
                let d = self.rng.between(200_000, 4_000_000);
                self.note(format!("full partition for {}ms", d / 1000));
                self.figures.partitions += 1;
                self.partition(0, d);
                self.partition(1, d);
            }
            Action::OneWayPartition => {
                let d = self.rng.between(200_000, 4_000_000);
                self.note(format!(
                    "one-way partition {}→{} for {}ms",
                    NAMES[n],
                    NAMES[1 - n],
                    d / 1000
                ));
                self.figures.partitions += 1;
                self.partition(n, d);
            }
            Action::DelaySpike => {
                let extra = self.rng.between(1_000, 400_000);
                let until = self.now + self.rng.between(10_000, 2_000_000);
                self.net.spike[n] = Some((until, extra));
            }
            Action::EioOnWrite => self.nodes[n].fail_next_write = true,
            Action::EioOnFlush => self.nodes[n].fail_next_flush = true,
            Action::DiskStall => {
                self.nodes[n].stall_until = self.now + self.rng.between(100_000, 1_000_000);
            }
            Action::Kill => self.stop_node(n, Death::Kill),
            Action::PowerCut => self.stop_node(n, Death::PowerCut),
            Action::PowerCutBoth => {
                self.note("power cut of both nodes".to_string());
                self.stop_node(0, Death::PowerCut);
                self.stop_node(1, Death::PowerCut);
            }
            _ if busy => {}
            Action::CleanRestart => {
                if self.nodes[n].up() {
                    if self.attached == Some(n) {
                        self.attached = None;
                    }
                    self.start_task(Task::CleanRestart {
                        node: n,
                        step: 0,
                        admin: None,
                        since: self.now,
                    });
                }
            }
            Action::Switchover => {
                if let Some(p) = primary {
                    self.figures.switchovers += 1;
                    self.attached = None;
                    self.start_task(Task::Switchover {
                        from: p,
                        to: 1 - p,
                        step: 0,
                        admin: None,
                        since: self.now,
                    });
                }
            }
            Action::Failover => {
                if let Some(p) = primary {
                    self.figures.failovers += 1;
                    let how = if self.rng.percent(50) {
                        Death::Kill
                    } else {
                        Death::PowerCut
                    };
                    self.note(format!("failover: {} dies ({how:?})", NAMES[p]));
                    self.stop_node(p, how);
                    let promote_at = self.now + self.rng.between(0, 1_500_000);
                    self.start_task(Task::Failover {
                        victim: p,
                        promote_at,
                        admin: None,
                    });
                }
            }
            Action::ForcedPromotion => {
                let cmd = self.promote_cmd(true);
                self.single(n, cmd);
            }
            Action::Promote => {
                // A hurried operator often picks the wrong node: one that is
                // not UpToDate, if there is one.
                let disk = |i: usize| self.nodes[i].core.as_ref().map(|c| c.disk());
                let stale = (0..2)
                    .find(|&i| disk(i) == Some(DiskState::Outdated))
                    .or_else(|| (0..2).find(|&i| disk(i) == Some(DiskState::Inconsistent)));
                let n = stale.filter(|_| self.rng.percent(70)).unwrap_or(n);
                let cmd = self.promote_cmd(false);
                self.single(n, cmd);
            }
            Action::Demote => {
                if self.attached == Some(n) {
                    self.attached = None;
                }
                let force = self.rng.percent(50);
                self.single(n, AdminCommand::Demote { force });
            }
            Action::Connect => self.single(n, AdminCommand::Connect),
            Action::ResumeIo => self.single(n, AdminCommand::ResumeIo),
            Action::Lull => {
                if self.rng.percent(50) {
                    self.lull_until = self.now + self.rng.between(200_000, 2_000_000);
                } else {
                    // A quiet night in which the secondary loses power and
                    // comes back before anyone writes: only the transfer log
                    // knows what it may have lost.
                    self.lull_until = self.now + self.rng.between(3_000_000, 6_000_000);
                    let victim = primary.map_or(n, |p| 1 - p);
                    self.note(format!("quiet spell; {} will lose power", NAMES[victim]));
                    let at = self.now + self.rng.between(50_000, 800_000);
                    self.schedule(at, Event::PowerCut { node: victim });
                }
            }
        }
        if self.violation.is_none() {
            self.checkpoint();
        }
    }

    fn begin_liveness(&mut self) {
        let deadline = self.now + self.opts.liveness_ms * 1000;
        self.phase = Phase::Liveness { deadline };
        self.note("liveness phase: every fault heals".to_string());
        for d in 0..2 {
            if self.net.blocked[d] {
                self.heal_direction(d);
            }
            self.net.spike[d] = None;
            self.nodes[d].fail_next_write = false;
            self.nodes[d].fail_next_flush = false;
            self.nodes[d].stall_until = 0;
        }
    }

    // ----- the cluster manager ----------------------------------------------

    /// The manager's periodic turn (and the phase changes it watches).
    pub fn manage_tick(&mut self) {
        match self.phase {
            Phase::Safety => {
                let gap = self.rng.between(50_000, 400_000);
                self.schedule(self.now + gap, Event::Manage);
                if self.rng.percent(80) {
                    self.manage();
                }
            }
            Phase::Liveness { deadline } => {
                self.schedule(self.now + 100_000, Event::Manage);
                if self.in_service() {
                    let power_cut_next = !self.final_power_cut_done && self.rng.percent(50);
                    self.phase = Phase::Settle {
                        deadline: self.now + 20_000_000,
                        power_cut_next,
                    };
                    self.note("in service again: clients stop, the pair settles".to_string());
                    return;
                }
                if self.now > deadline {
                    let what = self.describe_state();
                    self.fail(Violation::Liveness(format!(
                        "not back in service {}s after the faults healed: {what}",
                        self.opts.liveness_ms / 1000
                    )));
                    return;
                }
                self.manage();
            }
            Phase::Settle {
                deadline,
                power_cut_next,
            } => {
                self.schedule(self.now + 100_000, Event::Manage);
                self.settle(deadline, power_cut_next);
            }
            Phase::Done => {}
        }
    }

    fn settle(&mut self, deadline: u64, power_cut_next: bool) {
        if !(self.settled() && self.in_service()) {
            if self.now > deadline {
                let what = self.describe_state();
                self.fail(Violation::Liveness(format!(
                    "the pair never settled: {what}"
                )));
            } else if !self.in_service() {
                self.manage();
            }
            return;
        }
        // Corruption a verify has not repaired yet: verify again first.
        if self.repair_leftover_corruption() {
            return;
        }
        // At rest and in service: the whole stores must be identical.
        self.checkpoint();
        if self.violation.is_some() {
            return;
        }
        if !self.check_divergence(true) {
            if self.violation.is_none() {
                self.fail(Violation::Liveness(
                    "settled, but not in service for the final comparison".into(),
                ));
            }
            return;
        }
        self.figures.final_compares += 1;
        if power_cut_next {
            self.note("final check: both nodes lose power at rest".to_string());
            self.final_power_cut_done = true;
            self.stop_node(0, Death::PowerCut);
            self.stop_node(1, Death::PowerCut);
            self.phase = Phase::Liveness {
                deadline: self.now + self.opts.liveness_ms * 1000,
            };
            for c in 0..self.clients.len() {
                self.schedule(
                    self.now + 500_000 + c as u64,
                    Event::ClientTick { client: c },
                );
            }
        } else {
            self.count_repaired();
            self.phase = Phase::Done;
        }
    }

    /// One Primary serving the clients, one UpToDate Secondary, Connected,
    /// nothing owed, no operator task running.
    pub fn in_service(&self) -> bool {
        let (Some(a), Some(b)) = (self.status(0), self.status(1)) else {
            return false;
        };
        let Some(p) = (0..2).find(|&i| self.serves(i)) else {
            return false;
        };
        let st = if p == 0 { &a } else { &b };
        a.connection == ConnectionState::Connected
            && b.connection == ConnectionState::Connected
            && a.role != b.role
            && a.disk == DiskState::UpToDate
            && b.disk == DiskState::UpToDate
            && a.sync.is_none()
            && b.sync.is_none()
            && !st.peer_sync_needed
            && !st.io_suspended
            && self.task.is_none()
            && self.attached == Some(p)
    }

    fn describe_state(&self) -> String {
        let mut parts = Vec::new();
        for (n, name) in NAMES.iter().enumerate() {
            match self.status(n) {
                None => parts.push(format!("{name} down")),
                Some(st) => parts.push(format!(
                    "{} {:?}/{:?}/{:?} sync {:?} psn {} suspended {} last disconnect {:?}",
                    name,
                    st.role,
                    st.disk,
                    st.connection,
                    st.sync.map(|s| s.percent()),
                    st.peer_sync_needed,
                    st.io_suspended,
                    st.last_disconnect
                )),
            }
        }
        parts.push(format!(
            "task {:?}, attached {:?}, requests {}",
            self.task,
            self.attached,
            self.requests.len()
        ));
        parts.join("; ")
    }

    /// The cluster manager's decision, one step at a time.
    fn manage(&mut self) {
        if self.task.is_some() || self.violation.is_some() {
            return;
        }
        let liveness = !matches!(self.phase, Phase::Safety);
        for n in 0..2 {
            if !self.nodes[n].up() && (liveness || !self.nodes[n].restart_scheduled) {
                self.start_node(n);
            }
        }
        let (Some(a), Some(b)) = (self.status(0), self.status(1)) else {
            return;
        };
        let st = [a, b];
        if st
            .iter()
            .any(|s| s.connection == ConnectionState::StandAlone)
        {
            if liveness || self.rng.percent(50) {
                // Usually the node the clients used last survives.
                let victim = match self.attached {
                    Some(p) if self.rng.percent(75) => 1 - p,
                    _ => self.rng.below(2) as usize,
                };
                self.discard(victim);
                if let Phase::Liveness { .. } = self.phase {
                    self.phase = Phase::Liveness {
                        deadline: self.now + self.opts.liveness_ms * 1000,
                    };
                }
            }
            return;
        }
        let primaries: Vec<usize> = (0..2).filter(|&n| st[n].role == Role::Primary).collect();
        if primaries.len() == 2 {
            let keep = self.attached.unwrap_or_else(|| self.rng.below(2) as usize);
            self.demote(1 - keep);
            return;
        }
        let connected = st
            .iter()
            .all(|s| s.connection == ConnectionState::Connected);
        if !connected {
            // A primary the peer refuses must step down.
            for &p in &primaries {
                let refused_here = st[p]
                    .last_disconnect
                    .as_deref()
                    .is_some_and(|r| r.contains("demote this node"));
                let refused_there = st[1 - p]
                    .last_disconnect
                    .as_deref()
                    .is_some_and(|r| r.contains("demote the peer"));
                if refused_here || refused_there {
                    self.demote(p);
                    return;
                }
            }
            return;
        }
        if let Some(&p) = primaries.first() {
            if self.attached != Some(p) && self.serves(p) {
                self.note(format!("clients attach to {}", NAMES[p]));
                self.attached = Some(p);
            }
            return;
        }
        // Connected, no primary: promote the node with the good data.
        let candidates: Vec<usize> = (0..2)
            .filter(|&n| st[n].disk == DiskState::UpToDate && st[n].sync.is_none())
            .collect();
        if candidates.is_empty() {
            // Nobody has valid data: the operator must choose (--force).
            let n = if st[0].disk == DiskState::Outdated {
                0
            } else if st[1].disk == DiskState::Outdated {
                1
            } else {
                self.rng.below(2) as usize
            };
            let cmd = self.promote_cmd(true);
            self.single(n, cmd);
            return;
        }
        // In the safety phase the operator sometimes promotes without reading
        // the status first (the core must refuse what is unsafe).
        let n = if !liveness && self.rng.percent(30) {
            self.rng.below(2) as usize
        } else {
            candidates[self.rng.below(candidates.len() as u64) as usize]
        };
        let cmd = self.promote_cmd(false);
        self.single(n, cmd);
    }

    fn demote(&mut self, n: usize) {
        if self.attached == Some(n) {
            self.attached = None;
        }
        self.single(n, AdminCommand::Demote { force: true });
    }
}
