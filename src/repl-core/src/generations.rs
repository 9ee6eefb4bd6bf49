//! Generation identifiers: which of two nodes holds the newer data.
//!
//! DRBD's scheme, reduced to what a pair needs. Each node keeps a current
//! identifier (the line of history its data is on), a bitmap identifier (the
//! line it left when it began the current one without its peer; 0 once the
//! peer caught up) and two history identifiers. A new generation begins on the
//! first write a primary acknowledges without its peer, and on a forced
//! promotion — never on a promotion alone, so a failover without writes does
//! not fork the data. Comparing two nodes' identifiers at connect time gives
//! the [`Verdict`]; it is symmetric: what one node concludes, the other
//! concludes mirrored.

use crate::{DiskState, Generations};

/// What a node concludes about its data and its peer's when they meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Same line of history (a sync may still be owed for other reasons: a
    /// lost transfer log, an unclean primary).
    Same,
    /// This node's data is newer: the peer must be synced from it.
    Ahead,
    /// The peer's data is newer: this node is Outdated until synced.
    Behind,
    /// Both moved on from the same point: split brain.
    SplitBrain,
    /// No common history at all: these copies were never one.
    Unrelated,
}

impl Verdict {
    /// The verdict as the peer sees it.
    pub fn mirrored(self) -> Verdict {
        match self {
            Verdict::Ahead => Verdict::Behind,
            Verdict::Behind => Verdict::Ahead,
            other => other,
        }
    }
}

fn has_data(disk: DiskState) -> bool {
    disk != DiskState::Inconsistent
}

/// Compares this node's data with the peer's. Pure and symmetric:
/// `compare(a, b) == compare(b, a).mirrored()`.
pub fn compare(
    my_disk: DiskState,
    mine: Generations,
    peer_disk: DiskState,
    peer: Generations,
) -> Verdict {
    match (has_data(my_disk), has_data(peer_disk)) {
        (false, false) => return Verdict::Same,
        (false, true) => return Verdict::Behind,
        (true, false) => return Verdict::Ahead,
        (true, true) => {}
    }
    if mine.current == peer.current {
        return match (my_disk, peer_disk) {
            (DiskState::Outdated, DiskState::UpToDate) => Verdict::Behind,
            (DiskState::UpToDate, DiskState::Outdated) => Verdict::Ahead,
            _ => Verdict::Same,
        };
    }
    if mine.current == 0 {
        return Verdict::Behind;
    }
    if peer.current == 0 {
        return Verdict::Ahead;
    }
    let i_left_peers = mine.bitmap != 0 && mine.bitmap == peer.current;
    let peer_left_mine = peer.bitmap != 0 && peer.bitmap == mine.current;
    if i_left_peers && !peer_left_mine {
        return Verdict::Ahead;
    }
    if peer_left_mine && !i_left_peers {
        return Verdict::Behind;
    }
    if mine.bitmap != 0 && mine.bitmap == peer.bitmap {
        return Verdict::SplitBrain;
    }
    let in_my_history = mine.history.contains(&peer.current);
    let in_peer_history = peer.history.contains(&mine.current);
    match (in_my_history, in_peer_history) {
        (true, false) => Verdict::Ahead,
        (false, true) => Verdict::Behind,
        _ => {
            // Both moved on from a shared past further back: still a split
            // brain, not unrelated data.
            let mine_all = [mine.bitmap, mine.history[0], mine.history[1]];
            let peer_all = [peer.bitmap, peer.history[0], peer.history[1]];
            if mine_all.iter().any(|g| *g != 0 && peer_all.contains(g)) {
                Verdict::SplitBrain
            } else {
                Verdict::Unrelated
            }
        }
    }
}

/// The identifiers as status shows them: `C:B:H1:H2` in hex.
pub fn describe(g: Generations) -> String {
    format!(
        "{:016X}:{:016X}:{:016X}:{:016X}",
        g.current, g.bitmap, g.history[0], g.history[1]
    )
}

/// A small deterministic generator for new identifiers (splitmix64), seeded
/// by the driver with real randomness and by the simulator with its seed.
#[derive(Debug, Clone)]
pub struct GenerationSource(u64);

impl GenerationSource {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> GenerationSource {
        GenerationSource(seed)
    }

    /// The next identifier, never 0.
    pub fn next_id(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        z.max(1)
    }
}
