//! The table of operations a node has accepted and not finished, in arrival
//! order, with the overlap rule that orders writes.
//!
//! Invariant: an operation with a byte range starts only when no earlier
//! operation (waiting or active) overlaps it. So overlapping writes reach each
//! store one after the other, in arrival order, and because the primary sends
//! a write to the peer only when it starts it, the secondary never has two
//! overlapping writes in flight either.

use std::collections::BTreeMap;

/// A half-open byte range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn new(offset: u64, length: u64) -> Range {
        Range {
            start: offset,
            end: offset.saturating_add(length),
        }
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

struct Entry<T> {
    range: Option<Range>,
    active: bool,
    data: T,
}

/// Accepted operations keyed by a strictly increasing id.
pub(crate) struct OpTable<T> {
    entries: BTreeMap<u64, Entry<T>>,
    next_id: u64,
    waiting: usize,
}

impl<T> OpTable<T> {
    pub fn new() -> OpTable<T> {
        OpTable {
            entries: BTreeMap::new(),
            next_id: 1,
            waiting: 0,
        }
    }

    /// Adds a waiting operation and returns its id.
    pub fn insert(&mut self, range: Option<Range>, data: T) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                range,
                active: false,
                data,
            },
        );
        self.waiting += 1;
        id
    }

    /// Whether operation `id` may start: no earlier operation overlaps it.
    pub fn may_start(&self, id: u64) -> bool {
        let Some(entry) = self.entries.get(&id) else {
            return false;
        };
        if entry.active {
            return false;
        }
        let Some(range) = entry.range else {
            return true;
        };
        !self
            .entries
            .range(..id)
            .any(|(_, e)| e.range.is_some_and(|r| r.overlaps(&range)))
    }

    /// Marks a waiting operation active.
    pub fn activate(&mut self, id: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            if !entry.active {
                entry.active = true;
                self.waiting -= 1;
            }
        }
    }

    /// Removes an operation, returning its data.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let entry = self.entries.remove(&id)?;
        if !entry.active {
            self.waiting -= 1;
        }
        Some(entry.data)
    }

    /// The byte range of operation `id`, if it has one.
    pub fn range(&self, id: u64) -> Option<Range> {
        self.entries.get(&id).and_then(|e| e.range)
    }

    pub fn get(&self, id: u64) -> Option<&T> {
        self.entries.get(&id).map(|e| &e.data)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.entries.get_mut(&id).map(|e| &mut e.data)
    }

    pub fn is_active(&self, id: u64) -> bool {
        self.entries.get(&id).is_some_and(|e| e.active)
    }

    /// Ids of waiting operations that may start now, in arrival order.
    pub fn startable(&self) -> Vec<u64> {
        if self.waiting == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut earlier: Vec<Range> = Vec::new();
        for (&id, entry) in &self.entries {
            let blocked = entry
                .range
                .is_some_and(|r| earlier.iter().any(|e| e.overlaps(&r)));
            if !entry.active && !blocked {
                out.push(id);
            }
            if let Some(r) = entry.range {
                earlier.push(r);
            }
        }
        out
    }

    pub fn ids(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.entries.iter().map(|(&id, e)| (id, &e.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_operations_start_in_arrival_order() {
        let mut t = OpTable::new();
        let a = t.insert(Some(Range::new(0, 4096)), 'a');
        let b = t.insert(Some(Range::new(4096, 4096)), 'b');
        let c = t.insert(Some(Range::new(2048, 4096)), 'c');
        let f = t.insert(None, 'f');
        assert_eq!(t.startable(), vec![a, b, f]);
        t.activate(a);
        t.activate(b);
        t.activate(f);
        assert!(!t.may_start(c));
        t.remove(a);
        assert!(!t.may_start(c), "b still overlaps c");
        t.remove(b);
        assert!(t.may_start(c));
        assert_eq!(t.startable(), vec![c]);
    }

    #[test]
    fn a_later_write_waits_behind_an_earlier_waiting_one() {
        let mut t = OpTable::new();
        let a = t.insert(Some(Range::new(0, 10)), ());
        t.activate(a);
        let b = t.insert(Some(Range::new(5, 10)), ());
        let c = t.insert(Some(Range::new(12, 10)), ());
        assert!(!t.may_start(b));
        assert!(!t.may_start(c), "c overlaps the waiting b");
        assert!(t.startable().is_empty());
    }
}
