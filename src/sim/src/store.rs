//! A simulated backing store with a volatile cache: what reads see (the page
//! cache) and what survives a power cut (the durable layer) are kept apart.
//!
//! Every block carries a version number. A plain write changes the cache and
//! leaves the block dirty; a FUA write reaches the durable layer at once; a
//! flush makes durable what was written before the flush was submitted (its
//! snapshot), not what completed while it ran. On power loss each dirty block
//! independently keeps its durable version or any one of its unflushed
//! versions — so unflushed writes may be lost, may survive, may survive in an
//! older version, and a write of several blocks may tear between blocks.
//! Blocks never tear inside themselves (sector atomicity).

use std::collections::BTreeMap;

use crate::content::BLOCK_BYTES;
use crate::rng::Rng;

/// Which block versions a flush covers: taken when the flush is submitted.
#[derive(Debug, Clone, Default)]
pub struct FlushSnapshot(Vec<(usize, u64)>);

/// One node's simulated disk.
#[derive(Debug, Clone)]
pub struct SimStore {
    cache: Vec<u8>,
    durable: Vec<u8>,
    cache_version: Vec<u64>,
    durable_version: Vec<u64>,
    /// Per dirty block, its unflushed versions (newer than the durable one),
    /// oldest first.
    dirty: BTreeMap<usize, Vec<(u64, Vec<u8>)>>,
    next_version: u64,
}

impl SimStore {
    /// A store of `blocks` zeroed blocks.
    pub fn new(blocks: usize) -> SimStore {
        SimStore {
            cache: vec![0; blocks * BLOCK_BYTES],
            durable: vec![0; blocks * BLOCK_BYTES],
            cache_version: vec![0; blocks],
            durable_version: vec![0; blocks],
            dirty: BTreeMap::new(),
            next_version: 1,
        }
    }

    /// The number of blocks.
    pub fn blocks(&self) -> usize {
        self.cache_version.len()
    }

    /// Block `b` as reads see it.
    pub fn cached(&self, b: usize) -> &[u8] {
        &self.cache[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES]
    }

    /// Block `b` as a power cut would leave it if no dirty version survived.
    pub fn durable(&self, b: usize) -> &[u8] {
        &self.durable[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES]
    }

    /// Reads `len` bytes at `offset` from the cache.
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.cache[start..end].to_vec()
    }

    /// Writes `data` at `offset`, block by block; `fua`: durable at once.
    /// The caller checked the range.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let start = offset as usize;
        let end = start + data.len();
        let first = start / BLOCK_BYTES;
        let last = end.div_ceil(BLOCK_BYTES);
        self.cache[start..end].copy_from_slice(data);
        for b in first..last {
            self.touch(b, fua);
        }
    }

    /// Zeroes `len` bytes at `offset` (trim and write-zeroes read back zeroes).
    pub fn zero(&mut self, offset: u64, len: u64) {
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.cache[start..end].fill(0);
        for b in start / BLOCK_BYTES..end.div_ceil(BLOCK_BYTES) {
            self.touch(b, false);
        }
    }

    fn touch(&mut self, b: usize, fua: bool) {
        let v = self.next_version;
        self.next_version += 1;
        self.cache_version[b] = v;
        let bytes = self.cached(b).to_vec();
        if fua {
            self.durable[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES].copy_from_slice(&bytes);
            self.durable_version[b] = v;
            self.dirty.remove(&b);
        } else {
            self.dirty.entry(b).or_default().push((v, bytes));
        }
    }

    /// Puts `bytes` at block `b` in the cache and the durable layer at once,
    /// bypassing the write path (bit rot, or a write that went around the
    /// replication): its unflushed versions are gone with it.
    pub fn corrupt(&mut self, b: usize, bytes: &[u8]) {
        let range = b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES;
        self.cache[range.clone()].copy_from_slice(bytes);
        self.durable[range].copy_from_slice(bytes);
        let v = self.next_version;
        self.next_version += 1;
        self.cache_version[b] = v;
        self.durable_version[b] = v;
        self.dirty.remove(&b);
    }

    /// What a flush submitted now covers.
    pub fn flush_snapshot(&self) -> FlushSnapshot {
        FlushSnapshot(
            self.dirty
                .keys()
                .map(|&b| (b, self.cache_version[b]))
                .collect(),
        )
    }

    /// A flush completed: its snapshot is durable.
    pub fn flush_complete(&mut self, snap: &FlushSnapshot) {
        for &(b, v) in &snap.0 {
            if self.durable_version[b] >= v {
                continue;
            }
            let Some(versions) = self.dirty.get_mut(&b) else {
                continue;
            };
            let Some(bytes) = versions
                .iter()
                .find(|(ver, _)| *ver == v)
                .map(|x| x.1.clone())
            else {
                continue;
            };
            self.durable[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES].copy_from_slice(&bytes);
            self.durable_version[b] = v;
            versions.retain(|(ver, _)| *ver > v);
            if versions.is_empty() {
                self.dirty.remove(&b);
            }
        }
    }

    /// Everything in the cache becomes durable (a clean shutdown's flush).
    pub fn flush_all(&mut self) {
        self.durable.copy_from_slice(&self.cache);
        self.durable_version.copy_from_slice(&self.cache_version);
        self.dirty.clear();
    }

    /// Power loss (or a failed flush, after which the kernel dropped the dirty
    /// pages): each dirty block keeps its durable version or one of its
    /// unflushed ones, chosen by `rng`. Returns how many blocks lost their
    /// newest version.
    pub fn lose_cache(&mut self, rng: &mut Rng) -> usize {
        let mut lost = 0;
        for (b, versions) in std::mem::take(&mut self.dirty) {
            // Index 0: the durable version; 1..: the unflushed ones.
            let pick = rng.below(versions.len() as u64 + 1) as usize;
            if pick < versions.len() {
                lost += 1;
            }
            if pick > 0 {
                let (v, bytes) = &versions[pick - 1];
                self.durable[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES].copy_from_slice(bytes);
                self.durable_version[b] = *v;
            }
            let range = b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES;
            self.cache[range.clone()].copy_from_slice(&self.durable[range]);
            self.cache_version[b] = self.durable_version[b];
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_what_was_written_before_it_was_submitted() {
        let mut s = SimStore::new(4);
        s.write(0, &[1; BLOCK_BYTES], false);
        let snap = s.flush_snapshot();
        s.write(0, &[2; BLOCK_BYTES], false);
        s.flush_complete(&snap);
        assert_eq!(s.durable(0)[0], 1);
        assert_eq!(s.cached(0)[0], 2);
        let mut rng = Rng::new(1);
        s.lose_cache(&mut rng);
        assert!(s.cached(0)[0] == 1 || s.cached(0)[0] == 2);
        assert_eq!(s.cached(0), s.durable(0));
    }

    #[test]
    fn a_corruption_is_durable_at_once_and_replaces_unflushed_versions() {
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let mut s = SimStore::new(2);
            s.write(0, &[1; BLOCK_BYTES], false);
            s.corrupt(0, &[9; BLOCK_BYTES]);
            assert_eq!(s.cached(0)[0], 9);
            assert_eq!(s.durable(0)[0], 9);
            s.write(0, &[2; BLOCK_BYTES], false);
            s.lose_cache(&mut rng);
            assert!(s.cached(0)[0] == 9 || s.cached(0)[0] == 2);
        }
    }

    /// A merged write is one `write` of its pieces back to back: a power
    /// cut keeps or loses each block on its own, exactly as for separate
    /// unflushed writes, so every mix of old and new pieces is possible.
    #[test]
    fn a_power_cut_during_a_merged_write_keeps_or_loses_each_piece_on_its_own() {
        let mut rng = Rng::new(5);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut s = SimStore::new(3);
            s.write(0, &[1; 3 * BLOCK_BYTES], false);
            s.flush_all();
            let mut merged = vec![2; BLOCK_BYTES];
            merged.extend_from_slice(&[3; BLOCK_BYTES]);
            merged.extend_from_slice(&[4; BLOCK_BYTES]);
            s.write(0, &merged, false);
            s.lose_cache(&mut rng);
            let kept: Vec<bool> = (0..3)
                .map(|b| {
                    let byte = s.cached(b)[0];
                    assert!(byte == 1 || byte == 2 + b as u8, "block {b} holds {byte}");
                    byte != 1
                })
                .collect();
            seen.insert(kept);
        }
        assert_eq!(seen.len(), 8, "not every mix of pieces survived: {seen:?}");
    }

    #[test]
    fn fua_is_durable_and_power_loss_never_goes_behind_it() {
        let mut rng = Rng::new(2);
        for _ in 0..100 {
            let mut s = SimStore::new(2);
            s.write(0, &[1; BLOCK_BYTES], false);
            s.write(0, &[2; BLOCK_BYTES], true);
            s.write(0, &[3; BLOCK_BYTES], false);
            s.lose_cache(&mut rng);
            assert!(s.cached(0)[0] >= 2);
        }
    }
}
