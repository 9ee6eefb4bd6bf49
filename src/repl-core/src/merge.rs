//! The write-merging planner: adjacent plain writes that the core emitted
//! together become one store write (a vectored write), pure like the rest of
//! the core.
//!
//! A driver (the daemon's, or the simulator's world) drains the core's
//! outputs in one go — a *batch window*: what is already queued, nothing
//! waits for more — and hands the disk operations among them, in emission
//! order, to [`plan_disk_ops`]. The plan replaces every run of consecutive
//! plain writes whose ranges are exactly adjacent and ascending (each starts
//! where the previous one ends) by one [`MergedWrite`], up to a byte bound
//! and a piece bound (`IOV_MAX`). Everything else passes through unchanged.
//!
//! What ends a group (the next operation is emitted on its own, or starts a
//! new group):
//! - a flush, a trim, a write-zeroes or a read;
//! - a FUA write (never merged: its durability promise stays its own);
//! - a write that does not start exactly where the group ends: one before it,
//!   one with a gap, and so any write overlapping the group (overlapping
//!   writes are never merged);
//! - the byte bound or the piece bound.
//!
//! Why this keeps every ordering the protocol promises (docs/DURABILITY.md,
//! "Merging adjacent writes"): a group is a run of *consecutive* operations,
//! so the plan never moves an operation past another one; the merged write
//! only lets the pieces complete together (some later than they would have
//! alone, none earlier than it was emitted). The core never has two
//! overlapping operations in flight (`ops`), so operations emitted together
//! may run in any order already; a flush covers only writes that completed
//! before it was emitted (the secondary emits a peer flush only once the
//! writes it covers completed), which merging cannot change. A merged write
//! that fails fails every piece with the same error; a power cut during one
//! leaves each block old or new, as separate unflushed writes would.

use crate::{DiskOp, DiskOpId, Payload};

#[cfg(feature = "mutations")]
use crate::node::Mutation;

/// The most pieces in one merged write: Linux's `IOV_MAX` (one `pwritev2`).
pub const MERGE_PIECES_MAX: usize = 1024;

/// How much one merged write may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeLimits {
    bytes_max: u64,
    pieces_max: usize,
    #[cfg(feature = "mutations")]
    mutation: Option<Mutation>,
}

impl MergeLimits {
    /// Merged writes of at most `bytes_max` bytes and [`MERGE_PIECES_MAX`]
    /// pieces; `bytes_max == 0` disables merging.
    pub fn new(bytes_max: u64) -> MergeLimits {
        MergeLimits {
            bytes_max,
            pieces_max: MERGE_PIECES_MAX,
            #[cfg(feature = "mutations")]
            mutation: None,
        }
    }

    /// No merging: every operation is planned on its own.
    pub fn disabled() -> MergeLimits {
        MergeLimits::new(0)
    }

    /// The same limits with at most `pieces_max` pieces per merged write
    /// (clamped to 2..=`MERGE_PIECES_MAX`).
    pub fn with_pieces_max(mut self, pieces_max: usize) -> MergeLimits {
        self.pieces_max = pieces_max.clamp(2, MERGE_PIECES_MAX);
        self
    }

    /// The most bytes in one merged write (0: merging is off).
    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// The most pieces in one merged write.
    pub fn pieces_max(&self) -> usize {
        self.pieces_max
    }

    /// Whether merging is on.
    pub fn enabled(&self) -> bool {
        self.bytes_max > 0
    }

    /// A deliberately broken planner (feature `mutations`, the simulator
    /// only); only [`Mutation::MergeAcrossGap`] changes anything here.
    #[cfg(feature = "mutations")]
    pub fn with_mutation(mut self, mutation: Option<Mutation>) -> MergeLimits {
        self.mutation = mutation;
        self
    }

    #[cfg(feature = "mutations")]
    fn merges_across_gaps(&self) -> bool {
        self.mutation == Some(Mutation::MergeAcrossGap)
    }

    #[cfg(not(feature = "mutations"))]
    fn merges_across_gaps(&self) -> bool {
        false
    }
}

/// Several adjacent plain writes as one store write: piece `k` goes at
/// `offset` plus the lengths of the pieces before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedWrite<P> {
    /// Where the first piece goes.
    pub offset: u64,
    /// The constituent writes in emission (and address) order: each id is
    /// reported to the core when the merged write completes.
    pub pieces: Vec<(DiskOpId, P)>,
}

impl<P: Payload> MergedWrite<P> {
    /// Bytes written in all.
    pub fn len_bytes(&self) -> u64 {
        self.pieces.iter().map(|(_, p)| p.len() as u64).sum()
    }
}

impl<P> MergedWrite<P> {
    /// The constituent operations' ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = DiskOpId> + '_ {
        self.pieces.iter().map(|(id, _)| *id)
    }
}

/// One store operation of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedOp<P> {
    /// An operation as the core emitted it.
    Single { id: DiskOpId, op: DiskOp<P> },
    /// Two or more adjacent plain writes (never FUA) as one.
    Merged(MergedWrite<P>),
}

impl<P> PlannedOp<P> {
    /// The ids of the core's operations this store operation carries out.
    pub fn ids(&self) -> Vec<DiskOpId> {
        match self {
            PlannedOp::Single { id, .. } => vec![*id],
            PlannedOp::Merged(m) => m.ids().collect(),
        }
    }
}

/// The group being built: consecutive adjacent plain writes.
struct Group<P> {
    offset: u64,
    end: u64,
    first: (DiskOpId, P),
    /// The pieces after the first: empty, and so not allocated, for a lone
    /// write (what every random write stays).
    more: Vec<(DiskOpId, P)>,
}

impl<P: Payload> Group<P> {
    fn pieces(&self) -> usize {
        1 + self.more.len()
    }

    fn close(self, plan: &mut Vec<PlannedOp<P>>) {
        let Group {
            offset,
            first,
            more,
            ..
        } = self;
        if more.is_empty() {
            let (id, payload) = first;
            plan.push(PlannedOp::Single {
                id,
                op: DiskOp::Write {
                    offset,
                    payload,
                    fua: false,
                },
            });
        } else {
            let mut pieces = Vec::with_capacity(1 + more.len());
            pieces.push(first);
            pieces.extend(more);
            plan.push(PlannedOp::Merged(MergedWrite { offset, pieces }));
        }
    }
}

/// Plans the store operations for `ops`, the disk operations one drain of
/// the core produced, in emission order (see the module documentation).
/// Every input operation appears in exactly one planned operation, and
/// reading the plan's ids in order gives the input's order.
pub fn plan_disk_ops<P: Payload>(
    ops: impl IntoIterator<Item = (DiskOpId, DiskOp<P>)>,
    limits: &MergeLimits,
) -> Vec<PlannedOp<P>> {
    let ops = ops.into_iter();
    let mut plan = Vec::with_capacity(ops.size_hint().0);
    let mut group: Option<Group<P>> = None;
    for (id, op) in ops {
        let mergeable = match &op {
            DiskOp::Write {
                offset,
                payload,
                fua: false,
            } if limits.enabled()
                && !payload.is_empty()
                && (payload.len() as u64) <= limits.bytes_max =>
            {
                Some((*offset, payload.len() as u64))
            }
            _ => None,
        };
        let Some((offset, len)) = mergeable else {
            if let Some(g) = group.take() {
                g.close(&mut plan);
            }
            plan.push(PlannedOp::Single { id, op });
            continue;
        };
        let DiskOp::Write { payload, .. } = op else {
            unreachable!("only plain writes are mergeable")
        };
        if let Some(g) = &mut group {
            let adjacent = offset == g.end || (limits.merges_across_gaps() && offset > g.end);
            let fits =
                (g.end - g.offset) + len <= limits.bytes_max && g.pieces() < limits.pieces_max;
            if adjacent && fits {
                // The mutation lays a piece after a gap back to back with
                // the one before it, at the wrong offset.
                g.end += len;
                g.more.push((id, payload));
                continue;
            }
        }
        if let Some(g) = group.take() {
            g.close(&mut plan);
        }
        group = Some(Group {
            offset,
            end: offset + len,
            first: (id, payload),
            more: Vec::new(),
        });
    }
    if let Some(g) = group.take() {
        g.close(&mut plan);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(id: u64, offset: u64, len: usize, fua: bool) -> (DiskOpId, DiskOp<Vec<u8>>) {
        (
            DiskOpId(id),
            DiskOp::Write {
                offset,
                payload: vec![id as u8; len],
                fua,
            },
        )
    }

    fn shapes(plan: &[PlannedOp<Vec<u8>>]) -> Vec<Vec<u64>> {
        plan.iter()
            .map(|p| p.ids().iter().map(|id| id.0).collect())
            .collect()
    }

    #[test]
    fn adjacent_ascending_writes_merge_into_one() {
        let ops = vec![
            write(1, 0, 4096, false),
            write(2, 4096, 4096, false),
            write(3, 8192, 8192, false),
        ];
        let plan = plan_disk_ops(ops, &MergeLimits::new(1 << 20));
        assert_eq!(shapes(&plan), vec![vec![1, 2, 3]]);
        let PlannedOp::Merged(m) = &plan[0] else {
            panic!("not merged: {plan:?}")
        };
        assert_eq!(m.offset, 0);
        assert_eq!(m.len_bytes(), 16384);
    }

    #[test]
    fn flush_fua_trim_read_gap_descent_and_overlap_end_a_group() {
        let ops = vec![
            write(1, 0, 4096, false),
            write(2, 4096, 4096, false),
            (DiskOpId(3), DiskOp::Flush),
            write(4, 8192, 4096, false),
            write(5, 12288, 4096, true), // FUA: alone
            write(6, 16384, 4096, false),
            write(7, 20480, 4096, false),
            write(8, 28672, 4096, false), // gap
            write(9, 32768, 4096, false),
            write(10, 28672, 4096, false), // descends, overlaps 8
            (
                DiskOpId(11),
                DiskOp::Trim {
                    offset: 32768,
                    length: 4096,
                },
            ),
            write(12, 36864, 4096, false),
            (
                DiskOpId(13),
                DiskOp::Read {
                    offset: 0,
                    length: 4096,
                },
            ),
            write(14, 40960, 4096, false),
            (
                DiskOpId(15),
                DiskOp::WriteZeroes {
                    offset: 45056,
                    length: 4096,
                    no_hole: false,
                },
            ),
            write(16, 45056, 4096, false),
        ];
        let plan = plan_disk_ops(ops, &MergeLimits::new(1 << 20));
        assert_eq!(
            shapes(&plan),
            vec![
                vec![1, 2],
                vec![3],
                vec![4],
                vec![5],
                vec![6, 7],
                vec![8, 9],
                vec![10],
                vec![11],
                vec![12],
                vec![13],
                vec![14],
                vec![15],
                vec![16],
            ]
        );
    }

    #[test]
    fn the_byte_and_piece_bounds_hold() {
        let ops: Vec<_> = (0..10).map(|i| write(i, i * 4096, 4096, false)).collect();
        let plan = plan_disk_ops(ops.clone(), &MergeLimits::new(3 * 4096));
        assert_eq!(
            shapes(&plan),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]
        );
        let plan = plan_disk_ops(ops, &MergeLimits::new(1 << 20).with_pieces_max(4));
        assert_eq!(
            shapes(&plan),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
        );
        // A write larger than the bound stays alone; so does everything with
        // merging off.
        let plan = plan_disk_ops(
            vec![
                write(1, 0, 4096, false),
                write(2, 4096, 8192, false),
                write(3, 12288, 4096, false),
            ],
            &MergeLimits::new(4096),
        );
        assert_eq!(shapes(&plan), vec![vec![1], vec![2], vec![3]]);
        let plan = plan_disk_ops(
            vec![write(1, 0, 4096, false), write(2, 4096, 4096, false)],
            &MergeLimits::disabled(),
        );
        assert_eq!(shapes(&plan), vec![vec![1], vec![2]]);
    }

    #[test]
    fn a_single_write_comes_back_unchanged() {
        let ops = vec![write(1, 8192, 4096, false)];
        let plan = plan_disk_ops(ops.clone(), &MergeLimits::new(1 << 20));
        assert_eq!(
            plan,
            vec![PlannedOp::Single {
                id: ops[0].0,
                op: ops[0].1.clone()
            }]
        );
    }

    /// An arbitrary disk operation over a small volume of 16 blocks of 512
    /// bytes, so that adjacency, gaps and overlaps are all common.
    fn any_op() -> impl Strategy<Value = DiskOp<Vec<u8>>> {
        let write = (0u64..16, 1usize..4, prop::bool::weighted(0.15), any::<u8>()).prop_map(
            |(block, blocks, fua, fill)| DiskOp::Write {
                offset: block * 512,
                payload: vec![fill; blocks * 512],
                fua,
            },
        );
        prop_oneof![
            8 => write,
            1 => Just(DiskOp::Flush),
            1 => (0u64..16).prop_map(|b| DiskOp::Trim { offset: b * 512, length: 512 }),
            1 => (0u64..16).prop_map(|b| DiskOp::WriteZeroes {
                offset: b * 512,
                length: 1024,
                no_hole: true
            }),
            1 => (0u64..16).prop_map(|b| DiskOp::Read { offset: b * 512, length: 512 }),
        ]
    }

    /// A sequential run, the common case of a streaming writer, now and then
    /// interrupted.
    fn mostly_sequential() -> impl Strategy<Value = Vec<DiskOp<Vec<u8>>>> {
        prop::collection::vec((1usize..4, 0u8..10), 0..40).prop_map(|steps| {
            let mut at = 0u64;
            steps
                .into_iter()
                .map(|(blocks, kind)| {
                    let len = blocks as u64 * 512;
                    let op = match kind {
                        0 => DiskOp::Flush,
                        1 => DiskOp::Write {
                            offset: at,
                            payload: vec![1; len as usize],
                            fua: true,
                        },
                        2 => {
                            at += 512;
                            DiskOp::Write {
                                offset: at,
                                payload: vec![2; len as usize],
                                fua: false,
                            }
                        }
                        _ => DiskOp::Write {
                            offset: at,
                            payload: vec![kind; len as usize],
                            fua: false,
                        },
                    };
                    at += len;
                    op
                })
                .collect()
        })
    }

    /// The planner's contract, checked on any input.
    fn check_plan(input: Vec<DiskOp<Vec<u8>>>, limits: MergeLimits) -> Result<(), TestCaseError> {
        let ops: Vec<(DiskOpId, DiskOp<Vec<u8>>)> = input
            .into_iter()
            .enumerate()
            .map(|(i, op)| (DiskOpId(i as u64 + 1), op))
            .collect();
        let plan = plan_disk_ops(ops.clone(), &limits);
        // Every input operation exactly once, in the input's order: nothing
        // is reordered, so no overlapping operations swap either.
        let ids: Vec<DiskOpId> = plan.iter().flat_map(PlannedOp::ids).collect();
        let want: Vec<DiskOpId> = ops.iter().map(|(id, _)| *id).collect();
        prop_assert_eq!(ids, want);
        let by_id = |id: DiskOpId| &ops[(id.0 - 1) as usize].1;
        for p in &plan {
            match p {
                PlannedOp::Single { id, op } => prop_assert_eq!(op, by_id(*id)),
                PlannedOp::Merged(m) => {
                    prop_assert!(m.pieces.len() >= 2);
                    prop_assert!(m.pieces.len() <= limits.pieces_max());
                    prop_assert!(m.len_bytes() <= limits.bytes_max());
                    // Exactly adjacent, ascending, plain, the same bytes.
                    let mut at = m.offset;
                    for (id, payload) in &m.pieces {
                        let DiskOp::Write {
                            offset,
                            payload: original,
                            fua,
                        } = by_id(*id)
                        else {
                            return Err(TestCaseError::fail("merged a non-write"));
                        };
                        prop_assert!(!*fua, "merged a FUA write");
                        prop_assert_eq!(*offset, at);
                        prop_assert_eq!(payload, original);
                        at += payload.len() as u64;
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_batch_is_planned_without_reordering_loss_or_overreach(
            input in prop::collection::vec(any_op(), 0..48),
            bytes_max in prop_oneof![Just(0u64), 512u64..4096, Just(1u64 << 20)],
            pieces_max in 2usize..8,
        ) {
            check_plan(input, MergeLimits::new(bytes_max).with_pieces_max(pieces_max))?;
        }

        #[test]
        fn sequential_batches_merge_within_bounds(
            input in mostly_sequential(),
            bytes_max in 512u64..8192,
        ) {
            let plain_adjacent_pairs = input
                .windows(2)
                .filter(|w| matches!(
                    (&w[0], &w[1]),
                    (DiskOp::Write { offset: a, payload: pa, fua: false },
                     DiskOp::Write { offset: b, payload: pb, fua: false })
                        if a + pa.len() as u64 == *b
                            && (pa.len() + pb.len()) as u64 <= bytes_max
                ))
                .count();
            let ops = input.len();
            check_plan(input.clone(), MergeLimits::new(bytes_max))?;
            // Merging is not just allowed but done: with adjacent pairs that
            // fit, the plan has fewer operations than the input.
            let plan = plan_disk_ops(
                input.into_iter().enumerate().map(|(i, op)| (DiskOpId(i as u64), op)),
                &MergeLimits::new(bytes_max),
            );
            if plain_adjacent_pairs > 0 {
                prop_assert!(plan.len() < ops);
            } else {
                prop_assert_eq!(plan.len(), ops);
            }
        }
    }
}
