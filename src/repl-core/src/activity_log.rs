//! The activity log (DRBD's AL): the set of "hot" extents of the data area
//! a Primary may be writing to, kept durable so that a crash as Primary
//! costs a resync of those extents, not of the whole volume.
//!
//! Pure bookkeeping; the node drives it (see `node.rs`, `admit_write`).
//! The rules:
//! - A write may be submitted to either store only once every extent it
//!   touches is in the log *durably* (the metadata write that carries it
//!   completed). `admit` adds the missing extents and says whether the
//!   write must wait; the extents it adds ride in the next metadata write,
//!   together with every other extent requested meanwhile (batching: one
//!   metadata write for all the cold extents wanted while one is in flight).
//! - An extent leaves the log (to make room, least recently used first)
//!   only when no write to it is in flight and every write to it completed
//!   before a flush that both stores finished (or, peer away, that the local
//!   store finished: the dirty bitmap covers the peer then). The metadata
//!   write that drops it carries every unsaved bitmap page first, so bits set
//!   for writes to it are durable before the log forgets it.
//! - A write touching more than a quarter of the log's extents (a large
//!   trim or zeroing) takes the "whole volume" entry instead: after a crash
//!   with it recorded, the whole volume is resynced, as without a log.
//!
//! After a crash as Primary, the recorded extents (plus the persisted bitmap)
//! are all that may differ between the two nodes (docs/DURABILITY.md).
//!
//! Limits: at most `extents` entries (configured, at most
//! [`AL_EXTENTS_MAX`], which fit in one metadata slot), plus the whole-volume
//! entry.

use std::collections::BTreeMap;

/// The most extents a log may hold: what one 4 KiB metadata slot carries.
pub const AL_EXTENTS_MAX: usize = 960;
/// The fewest extents a log may hold.
pub const AL_EXTENTS_MIN: usize = 8;
/// The smallest extent.
pub const AL_EXTENT_MIN_BYTES: u64 = 64 * 1024;
/// The largest extent.
pub const AL_EXTENT_MAX_BYTES: u64 = 1 << 30;
/// The default extent: 4 MiB (DRBD's).
pub const AL_EXTENT_DEFAULT_BYTES: u64 = 4 << 20;
/// The default number of extents (see docs/OPERATIONS.md for the choice).
pub const AL_EXTENTS_DEFAULT: usize = 257;

/// Whether `bytes` is a valid extent size (a power of two within bounds).
pub fn extent_bytes_valid(bytes: u64) -> bool {
    bytes.is_power_of_two() && (AL_EXTENT_MIN_BYTES..=AL_EXTENT_MAX_BYTES).contains(&bytes)
}

/// Whether `n` is a valid number of extents.
pub fn extents_valid(n: usize) -> bool {
    (AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&n)
}

/// The activity log as a metadata write records it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActivityLogImage {
    /// Bytes per extent; 0: no log recorded (metadata older than the log),
    /// which after a crash as Primary means "trust nothing".
    pub extent_bytes: u64,
    /// The hot extents' indexes, ascending.
    pub extents: Vec<u32>,
    /// A write spanning most of the volume may have been in flight: after a
    /// crash, everything is out of sync.
    pub whole: bool,
}

impl ActivityLogImage {
    /// The byte ranges the image says may differ after a crash, clamped to a
    /// volume of `size_bytes`; `None`: the whole volume (no log recorded, or
    /// the whole-volume entry).
    pub fn ranges(&self, size_bytes: u64) -> Option<Vec<(u64, u64)>> {
        if self.extent_bytes == 0 || self.whole {
            return None;
        }
        Some(
            self.extents
                .iter()
                .filter_map(|&e| {
                    let start = u64::from(e).checked_mul(self.extent_bytes)?;
                    (start < size_bytes).then(|| (start, self.extent_bytes.min(size_bytes - start)))
                })
                .collect(),
        )
    }
}

/// What `admit` decided for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Every extent is durably in the log: the write may be submitted (it
    /// now holds a reference on its extents until `complete`).
    Ready,
    /// Extents were added (or are still being written): wait for the
    /// metadata write that carries them. `new_entries`: the log changed and
    /// a metadata write must be requested.
    Waiting { new_entries: bool },
    /// No room: every extent is in use or not yet flushed. A flush of both
    /// stores, or writes completing, will make room.
    Full,
}

#[derive(Debug, Clone)]
struct Extent {
    /// Writes submitted and not completed.
    refs: u32,
    /// The completion stamp of its last completed write (0: none since it
    /// entered the log).
    done_stamp: u64,
    /// The metadata version that records it (`u64::MAX`: not requested yet).
    version: u64,
    /// Added for a write that has not taken its reference yet.
    reserved: bool,
    /// For least-recently-used eviction.
    used: u64,
}

impl Extent {
    fn new(clock: u64) -> Extent {
        Extent {
            refs: 0,
            done_stamp: 0,
            version: u64::MAX,
            reserved: true,
            used: clock,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    extent_bytes: u64,
    capacity: usize,
    extents: BTreeMap<u32, Extent>,
    whole: Option<Extent>,
    /// Completion stamps: a write completing gets the current value; a
    /// flush starting takes it as its token and moves it on.
    stamp: u64,
    /// Every write stamped at or below this is durable on both stores.
    flushed_upto: u64,
    clock: u64,
    /// Metadata writes that carried a changed log (for figures).
    transactions: u64,
    /// A write found no room: until one that needs room gets it, writes to
    /// hot extents wait too, so that the hot extents drain (DRBD's
    /// "starving"); otherwise a steady stream to them would hold them busy
    /// forever and starve the cold write (and any sync chunk behind it).
    starving: bool,
}

impl ActivityLog {
    /// An empty log of `capacity` extents of `extent_bytes` (validated by
    /// the configuration).
    pub fn new(extent_bytes: u64, capacity: usize) -> ActivityLog {
        ActivityLog {
            extent_bytes: extent_bytes.max(1),
            capacity: capacity.max(1),
            extents: BTreeMap::new(),
            whole: None,
            stamp: 1,
            flushed_upto: 0,
            clock: 0,
            transactions: 0,
            starving: false,
        }
    }

    /// Bytes per extent.
    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    /// Extents in the log now.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether the log holds nothing.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty() && self.whole.is_none()
    }

    /// Metadata writes requested because the log changed.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    fn span(&self, offset: u64, length: u64) -> (u32, u32) {
        let first = offset / self.extent_bytes;
        let last = (offset + length.max(1) - 1) / self.extent_bytes;
        (
            u32::try_from(first).unwrap_or(u32::MAX),
            u32::try_from(last).unwrap_or(u32::MAX),
        )
    }

    fn takes_whole(&self, first: u32, last: u32) -> bool {
        (last - first) as usize >= (self.capacity / 4).max(1)
    }

    fn evictable(&self, e: &Extent, durable_version: u64) -> bool {
        e.refs == 0
            && !e.reserved
            && e.version <= durable_version
            && e.done_stamp <= self.flushed_upto
    }

    /// Whether a flush of both stores would make room (some extent is idle
    /// but holds writes no flush covered yet).
    pub fn flush_would_help(&self) -> bool {
        self.extents
            .values()
            .chain(self.whole.iter())
            .any(|e| e.refs == 0 && e.done_stamp > self.flushed_upto)
    }

    /// A write of `[offset, offset + length)` wants to start. `durable` is
    /// the newest metadata version the driver reported durable. On
    /// `Ready`, the write holds its extents until `complete`. With
    /// `unchecked` (a mutation), extents not yet durable count as durable.
    pub fn admit(&mut self, offset: u64, length: u64, durable: u64, unchecked: bool) -> Admit {
        self.clock += 1;
        let clock = self.clock;
        let (first, last) = self.span(offset, length);
        if self.takes_whole(first, last) {
            let e = self.whole.get_or_insert_with(|| Extent::new(clock));
            e.used = clock;
            if e.version == u64::MAX {
                return Admit::Waiting { new_entries: true };
            }
            if e.version > durable && !unchecked {
                return Admit::Waiting { new_entries: false };
            }
            e.refs += 1;
            e.reserved = false;
            return Admit::Ready;
        }
        let missing: Vec<u32> = (first..=last)
            .filter(|i| !self.extents.contains_key(i))
            .collect();
        // Writes that reserved their extents before the log ran short go
        // on: they hold those extents either way, and drain them.
        let all_reserved = (first..=last).all(|i| self.extents.get(&i).is_some_and(|e| e.reserved));
        if self.starving && missing.is_empty() && !all_reserved {
            return Admit::Waiting { new_entries: false };
        }
        if self.extents.len() + missing.len() > self.capacity {
            let need = self.extents.len() + missing.len() - self.capacity;
            let mut victims: Vec<(u64, u32)> = self
                .extents
                .iter()
                .filter(|(i, e)| !(first..=last).contains(*i) && self.evictable(e, durable))
                .map(|(&i, e)| (e.used, i))
                .collect();
            if victims.len() < need {
                self.starving = true;
                return Admit::Full;
            }
            self.starving = false;
            victims.sort_unstable();
            for (_, i) in victims.into_iter().take(need) {
                self.extents.remove(&i);
            }
        }
        let new_entries = !missing.is_empty();
        for i in missing {
            self.extents.insert(i, Extent::new(clock));
        }
        let mut ready = true;
        let mut unrequested = false;
        for i in first..=last {
            if let Some(e) = self.extents.get_mut(&i) {
                e.used = clock;
                unrequested |= e.version == u64::MAX;
                ready &= e.version <= durable || (unchecked && e.version != u64::MAX);
            }
        }
        if !ready || unrequested {
            // The hot extents this write needs stay too, until it runs.
            for i in first..=last {
                if let Some(e) = self.extents.get_mut(&i) {
                    e.reserved = true;
                }
            }
            return Admit::Waiting {
                new_entries: new_entries || unrequested,
            };
        }
        for i in first..=last {
            if let Some(e) = self.extents.get_mut(&i) {
                e.refs += 1;
                e.reserved = false;
            }
        }
        Admit::Ready
    }

    /// The extents added since the last call are carried by metadata
    /// version `version` (the node requested it).
    pub fn requested(&mut self, version: u64) {
        let mut any = false;
        for e in self.extents.values_mut().chain(self.whole.iter_mut()) {
            if e.version == u64::MAX {
                e.version = version;
                any = true;
            }
        }
        if any {
            self.transactions += 1;
        }
    }

    /// A write admitted with `Ready` completed (answered): its extents are
    /// idle again once no other write holds them, and hold data no flush
    /// covers yet.
    pub fn complete(&mut self, offset: u64, length: u64) {
        let (first, last) = self.span(offset, length);
        let stamp = self.stamp;
        if self.takes_whole(first, last) {
            if let Some(e) = &mut self.whole {
                e.refs = e.refs.saturating_sub(1);
                e.done_stamp = stamp;
            }
            return;
        }
        for i in first..=last {
            if let Some(e) = self.extents.get_mut(&i) {
                e.refs = e.refs.saturating_sub(1);
                e.done_stamp = stamp;
            }
        }
    }

    /// A flush of both stores starts; returns its token for `flushed`.
    pub fn flush_started(&mut self) -> u64 {
        let token = self.stamp;
        self.stamp += 1;
        token
    }

    /// The flush with `token` completed on both stores (or on this one with
    /// the peer away, whose writes the dirty bitmap covers): every write
    /// completed before it started is durable; the whole-volume entry goes
    /// if nothing holds it.
    pub fn flushed(&mut self, token: u64, durable: u64) {
        self.flushed_upto = self.flushed_upto.max(token);
        let drop_whole = self
            .whole
            .as_ref()
            .is_some_and(|e| self.evictable(e, durable));
        if drop_whole {
            self.whole = None;
        }
    }

    /// Forgets everything (the node is no longer Primary, so it submits no
    /// client writes; the next metadata write records an empty log).
    pub fn clear(&mut self) {
        self.extents.clear();
        self.whole = None;
        self.starving = false;
    }

    /// The log as the next metadata write records it: every extent in it,
    /// durable or being added.
    pub fn image(&self) -> ActivityLogImage {
        ActivityLogImage {
            extent_bytes: self.extent_bytes,
            extents: self.extents.keys().copied().collect(),
            whole: self.whole.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_cold_extent_waits_for_its_metadata_write() {
        let mut al = ActivityLog::new(4 * MIB, 8);
        assert_eq!(
            al.admit(0, 4096, 0, false),
            Admit::Waiting { new_entries: true }
        );
        al.requested(1);
        assert_eq!(
            al.admit(0, 4096, 0, false),
            Admit::Waiting { new_entries: false }
        );
        assert_eq!(al.admit(0, 4096, 1, false), Admit::Ready);
        assert_eq!(al.image().extents, vec![0]);
        al.complete(0, 4096);
    }

    #[test]
    fn the_whole_volume_entry_takes_large_ranges() {
        let mut al = ActivityLog::new(4 * MIB, 8);
        assert_eq!(
            al.admit(0, 64 * MIB, 0, false),
            Admit::Waiting { new_entries: true }
        );
        al.requested(1);
        assert_eq!(al.admit(0, 64 * MIB, 1, false), Admit::Ready);
        assert!(al.image().whole);
        assert_eq!(al.image().ranges(1 << 30), None);
        al.complete(0, 64 * MIB);
        let t = al.flush_started();
        al.flushed(t, 1);
        assert!(!al.image().whole);
    }

    #[test]
    fn image_ranges_clamp_to_the_volume() {
        let img = ActivityLogImage {
            extent_bytes: 4 * MIB,
            extents: vec![0, 2, 100],
            whole: false,
        };
        assert_eq!(
            img.ranges(10 * MIB),
            Some(vec![(0, 4 * MIB), (8 * MIB, 2 * MIB)])
        );
        assert_eq!(ActivityLogImage::default().ranges(10 * MIB), None);
    }
}
