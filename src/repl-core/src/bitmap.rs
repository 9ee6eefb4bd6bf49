//! The dirty bitmap: which regions of the data area may differ between this
//! node and its peer, one bit per `granularity` bytes.
//!
//! Pure bookkeeping. A bit is set (`mark`) when a write may be missing on the
//! peer: a write answered without it, or a write of the transfer log when the
//! link went. A bit is cleared (`clear_bits`) only after the resync target
//! flushed that region's data. The on-disk copy is kept page by page: every
//! page whose bits changed since it was last handed out for writing is
//! "unsaved", and `take_unsaved_pages` hands those out (the core puts them
//! into its next metadata write).
//!
//! Limits: the bitmap of a volume of `size` bytes has `ceil(size /
//! granularity)` bits, allocated once; nothing here grows with the workload.

use std::collections::BTreeSet;

/// Bytes in one bitmap page as stored on disk (32768 bits).
pub const BITMAP_PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = BITMAP_PAGE_BYTES / 8;
const BITS_PER_PAGE: u64 = (BITMAP_PAGE_BYTES * 8) as u64;

/// The smallest and largest granularities (bytes per bit) accepted.
pub const GRANULARITY_MIN_BYTES: u64 = 4096;
/// See [`GRANULARITY_MIN_BYTES`].
pub const GRANULARITY_MAX_BYTES: u64 = 1 << 20;

/// One page of the bitmap for the driver to write at
/// `index * BITMAP_PAGE_BYTES` of the bitmap area: little-endian 64-bit words,
/// bit `i` of the volume is bit `i % 64` of word `i / 64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapPage {
    /// The page's index in the bitmap area.
    pub index: u32,
    /// Exactly [`BITMAP_PAGE_BYTES`] bytes.
    pub bytes: Vec<u8>,
}

/// The bytes of bitmap area a volume of `size_bytes` needs at `granularity`,
/// in whole pages.
pub fn bitmap_area_bytes(size_bytes: u64, granularity: u64) -> u64 {
    let bits = size_bytes.div_ceil(granularity.max(1));
    bits.div_ceil(BITS_PER_PAGE) * BITMAP_PAGE_BYTES as u64
}

/// Whether `granularity` is a power of two within the accepted bounds.
pub fn granularity_valid(granularity: u64) -> bool {
    granularity.is_power_of_two()
        && (GRANULARITY_MIN_BYTES..=GRANULARITY_MAX_BYTES).contains(&granularity)
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    granularity: u64,
    size_bytes: u64,
    bits: u64,
    words: Vec<u64>,
    set: u64,
    unsaved: BTreeSet<u32>,
}

impl DirtyBitmap {
    /// An empty bitmap for a volume of `size_bytes` at `granularity` bytes
    /// per bit (a power of two; the caller validated it).
    pub fn new(size_bytes: u64, granularity: u64) -> DirtyBitmap {
        let granularity = granularity.max(1);
        let bits = size_bytes.div_ceil(granularity);
        let pages = bits.div_ceil(BITS_PER_PAGE) as usize;
        DirtyBitmap {
            granularity,
            size_bytes,
            bits,
            words: vec![0; pages * WORDS_PER_PAGE],
            set: 0,
            unsaved: BTreeSet::new(),
        }
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Number of set bits.
    pub fn set_bits(&self) -> u64 {
        self.set
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.set == 0
    }

    /// The bytes of the data area the set bits cover (the last bit may be
    /// shorter than the granularity).
    pub fn dirty_bytes(&self) -> u64 {
        if self.set == 0 {
            return 0;
        }
        let mut bytes = self.set * self.granularity;
        if self.test(self.bits - 1) {
            let last = self.size_bytes - (self.bits - 1) * self.granularity;
            bytes -= self.granularity - last;
        }
        bytes
    }

    /// The byte range bit `bit` covers.
    pub fn bit_range(&self, bit: u64, count: u64) -> (u64, u64) {
        let start = bit * self.granularity;
        let end = ((bit + count) * self.granularity).min(self.size_bytes);
        (start, end - start)
    }

    fn test(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set_bit(&mut self, bit: u64) -> bool {
        let w = &mut self.words[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        if *w & mask != 0 {
            return false;
        }
        *w |= mask;
        self.set += 1;
        self.unsaved.insert((bit / BITS_PER_PAGE) as u32);
        true
    }

    fn clear_bit(&mut self, bit: u64) {
        let w = &mut self.words[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        if *w & mask != 0 {
            *w &= !mask;
            self.set -= 1;
            self.unsaved.insert((bit / BITS_PER_PAGE) as u32);
        }
    }

    /// Sets every bit that `[offset, offset + length)` touches (clamped to the
    /// volume); returns the bytes newly marked.
    pub fn mark(&mut self, offset: u64, length: u64) -> u64 {
        if length == 0 || offset >= self.size_bytes {
            return 0;
        }
        let end = offset.saturating_add(length).min(self.size_bytes);
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        let mut newly = 0;
        for bit in first..=last {
            if self.set_bit(bit) {
                let (_, len) = self.bit_range(bit, 1);
                newly += len;
            }
        }
        newly
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        for bit in 0..self.bits {
            self.set_bit(bit);
        }
    }

    /// Clears `count` bits from `bit`.
    pub fn clear_bits(&mut self, bit: u64, count: u64) {
        for b in bit..(bit + count).min(self.bits) {
            self.clear_bit(b);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        if self.set == 0 {
            return;
        }
        self.clear_bits(0, self.bits);
    }

    /// Sets every bit set in `other` (same volume and granularity).
    pub fn union(&mut self, other: &DirtyBitmap) {
        for bit in other.iter_set() {
            self.set_bit(bit);
        }
    }

    fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }

    /// The first run of set bits at or after `from`, at most `max_bits` long:
    /// `(first bit, bit count)`.
    pub fn next_run(&self, from: u64, max_bits: u64) -> Option<(u64, u64)> {
        let mut bit = from;
        // Skip whole empty words.
        while bit < self.bits {
            let w = self.words[(bit / 64) as usize] >> (bit % 64);
            if w == 0 {
                bit = (bit / 64 + 1) * 64;
                continue;
            }
            bit += w.trailing_zeros() as u64;
            break;
        }
        if bit >= self.bits {
            return None;
        }
        let mut count = 0;
        while count < max_bits.max(1) && bit + count < self.bits && self.test(bit + count) {
            count += 1;
        }
        Some((bit, count))
    }

    /// The dirty regions as byte ranges `(offset, length)`, adjacent bits
    /// merged.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((bit, count)) = self.next_run(at, u64::MAX) {
            out.push(self.bit_range(bit, count));
            at = bit + count;
        }
        out
    }

    /// Hands out the pages changed since they were last handed out.
    pub fn take_unsaved_pages(&mut self) -> Vec<BitmapPage> {
        let pages = std::mem::take(&mut self.unsaved);
        pages.into_iter().map(|p| self.page(p)).collect()
    }

    /// Whether pages changed since they were last handed out.
    pub fn has_unsaved_pages(&self) -> bool {
        !self.unsaved.is_empty()
    }

    /// Page `index` as stored on disk.
    pub fn page(&self, index: u32) -> BitmapPage {
        let start = index as usize * WORDS_PER_PAGE;
        let mut bytes = Vec::with_capacity(BITMAP_PAGE_BYTES);
        for w in &self.words[start..start + WORDS_PER_PAGE] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        BitmapPage { index, bytes }
    }

    /// Loads the on-disk image (`bitmap_area_bytes` long; shorter reads as
    /// zeroes). Bits past the volume's end are ignored.
    pub fn load(&mut self, image: &[u8]) {
        self.set = 0;
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            if let Some(src) = image.get(i * 8..i * 8 + 8) {
                b.copy_from_slice(src);
            }
            *w = u64::from_le_bytes(b);
        }
        // Bits past the end would make a sync read past the volume.
        for bit in self.bits..(self.words.len() as u64 * 64) {
            self.words[(bit / 64) as usize] &= !(1 << (bit % 64));
        }
        self.set = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.unsaved.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_bit_a_range_touches() {
        let mut b = DirtyBitmap::new(10 * 4096 + 100, 4096);
        assert_eq!(b.bits(), 11);
        assert_eq!(b.mark(4000, 200), 8192);
        assert_eq!(b.ranges(), vec![(0, 8192)]);
        assert_eq!(b.mark(10 * 4096, 4096), 100, "the short last bit");
        assert_eq!(b.dirty_bytes(), 8192 + 100);
        b.clear_bits(0, 1);
        assert_eq!(b.ranges(), vec![(4096, 4096), (40960, 100)]);
    }

    #[test]
    fn runs_and_pages() {
        let mut b = DirtyBitmap::new(1 << 30, 4096);
        b.mark(5 * 4096, 3 * 4096);
        b.mark(100_000 * 4096, 1);
        assert_eq!(b.next_run(0, 2), Some((5, 2)));
        assert_eq!(b.next_run(7, 10), Some((7, 1)));
        assert_eq!(b.next_run(8, 10), Some((100_000, 1)));
        let pages = b.take_unsaved_pages();
        assert_eq!(
            pages.iter().map(|p| p.index).collect::<Vec<_>>(),
            vec![0, 3]
        );
        assert!(!b.has_unsaved_pages());
        let mut image = vec![0u8; bitmap_area_bytes(1 << 30, 4096) as usize];
        for p in &pages {
            let at = p.index as usize * BITMAP_PAGE_BYTES;
            image[at..at + BITMAP_PAGE_BYTES].copy_from_slice(&p.bytes);
        }
        let mut c = DirtyBitmap::new(1 << 30, 4096);
        c.load(&image);
        assert_eq!(c.ranges(), b.ranges());
        assert_eq!(c.set_bits(), 4);
    }

    #[test]
    fn set_all_covers_the_volume_exactly() {
        let mut b = DirtyBitmap::new(3 * 65536 + 4096, 65536);
        b.set_all();
        assert_eq!(b.dirty_bytes(), 3 * 65536 + 4096);
        assert_eq!(b.ranges(), vec![(0, 3 * 65536 + 4096)]);
        b.clear_all();
        assert!(b.is_empty());
    }
}
