//! A power-cut simulation for tests: the store remembers every change made
//! since the last completed flush, and on command undoes a seeded choice of
//! them, as a disk with a volatile write cache may lose, keep or tear any
//! write it was never told to make durable.
//!
//! Off unless `StoreConfig::volatile_for_tests` is set. The model:
//! - before a plain write, trim or zeroing runs, the old contents of its range
//!   are saved (an *undo* entry; ranges of zeroes are saved as such);
//! - a FUA write with RWF_DSYNC (an O_DIRECT store) is durable at once: its
//!   data is saved as a *redo* entry, so that undoing an older overlapping
//!   write cannot take it back (a buffered store's FUA write is a plain write
//!   and a flush, modelled as those);
//! - a successful flush drops every entry recorded before the flush started;
//! - a power cut walks the undo entries newest first and, per entry, keeps the
//!   write, drops it, or tears it (a random subset of its 4 KiB pieces reverts),
//!   then replays the redo entries in order and fdatasyncs. The caller then
//!   ends the process at once, as a power cut would.
//!
//! Any outcome it produces is one a real disk may produce: writes not covered
//! by a completed flush may be lost, partly or wholly, in any order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

/// Pieces that tear independently.
const TEAR_BYTES: u64 = 4096;
/// Saved contents are kept in pieces of this size (zero pieces cost nothing).
const SAVE_CHUNK_BYTES: u64 = 1 << 20;

enum Saved {
    Zeroes(u64),
    Bytes(Vec<u8>),
}

enum Entry {
    Undo {
        seq: u64,
        offset: u64,
        old: Vec<Saved>,
    },
    Redo {
        seq: u64,
        offset: u64,
        data: Vec<u8>,
    },
}

impl Entry {
    fn seq(&self) -> u64 {
        match self {
            Entry::Undo { seq, .. } | Entry::Redo { seq, .. } => *seq,
        }
    }
}

/// What a power cut did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Unflushed changes that survived whole.
    pub kept: u64,
    /// Unflushed changes lost whole.
    pub dropped: u64,
    /// Unflushed changes lost in part.
    pub torn: u64,
    /// FUA writes replayed (they were durable).
    pub fua_kept: u64,
}

#[derive(Default)]
struct Log {
    next_seq: u64,
    entries: Vec<Entry>,
    /// Set by a power cut: every later change fails (the power is off).
    cut: bool,
}

fn power_is_off() -> std::io::Error {
    std::io::Error::other("the test store's power was cut")
}

/// The change log of a volatile test store.
#[derive(Default)]
pub(crate) struct Volatile {
    log: Mutex<Log>,
}

fn read_range(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<Saved>> {
    let mut out = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(SAVE_CHUNK_BYTES);
        let mut buf = vec![0u8; n as usize];
        let mut filled = 0usize;
        while filled < buf.len() {
            let got = file.read_at(&mut buf[filled..], at + filled as u64)?;
            if got == 0 {
                break; // past the end of a short file: zeroes
            }
            filled += got;
        }
        if buf.iter().all(|b| *b == 0) {
            out.push(Saved::Zeroes(n));
        } else {
            out.push(Saved::Bytes(buf));
        }
        at += n;
    }
    Ok(out)
}

/// splitmix64, so that a seed replays the same cut.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Volatile {
    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Before a plain write, trim or zeroing of `len` bytes at `offset`.
    pub(crate) fn before_change(&self, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        let mut log = self.lock();
        if log.cut {
            return Err(power_is_off());
        }
        let old = read_range(file, offset, len)?;
        log.next_seq += 1;
        let seq = log.next_seq;
        log.entries.push(Entry::Undo { seq, offset, old });
        Ok(())
    }

    /// Before a FUA write of `data` at `offset`.
    pub(crate) fn before_fua(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut log = self.lock();
        if log.cut {
            return Err(power_is_off());
        }
        log.next_seq += 1;
        let seq = log.next_seq;
        log.entries.push(Entry::Redo {
            seq,
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    /// When a flush starts: the watermark its success will clear up to.
    pub(crate) fn flush_started(&self) -> u64 {
        self.lock().next_seq
    }

    /// A flush that started at `watermark` succeeded — unless the power was
    /// cut meanwhile: the cut may have undone what the fdatasync covered, and
    /// a real power cut would never let the flush be reported, so it fails.
    /// (Reporting it let a secondary acknowledge a peer flush for writes its
    /// cut had just undone; the dirty bitmap then skipped them.)
    pub(crate) fn flushed(&self, watermark: u64) -> std::io::Result<()> {
        let mut log = self.lock();
        if log.cut {
            return Err(power_is_off());
        }
        log.entries.retain(|e| e.seq() > watermark);
        Ok(())
    }

    /// Undoes a seeded choice of the unflushed changes in `file` and makes
    /// the result durable. Every later change fails (the caller ends the
    /// process next; a change already past its hook may still land, which is
    /// one more outcome a real power cut allows for a write never flushed).
    pub(crate) fn power_cut(&self, file: &File, seed: u64) -> std::io::Result<PowerCutReport> {
        let mut log = self.lock();
        log.cut = true;
        let mut rng = seed;
        let mut report = PowerCutReport::default();
        let entries = std::mem::take(&mut log.entries);
        for e in entries.iter().rev() {
            let Entry::Undo { offset, old, .. } = e else {
                continue;
            };
            let choice = next(&mut rng) % 3;
            if choice == 0 {
                report.kept += 1;
                continue;
            }
            let tear = choice == 2;
            if tear {
                report.torn += 1;
            } else {
                report.dropped += 1;
            }
            let mut at = *offset;
            for piece in old {
                let (len, bytes) = match piece {
                    Saved::Zeroes(n) => (*n, None),
                    Saved::Bytes(b) => (b.len() as u64, Some(b)),
                };
                let mut p = 0;
                while p < len {
                    let n = TEAR_BYTES.min(len - p);
                    if !tear || next(&mut rng) % 2 == 0 {
                        let zeroes;
                        let data: &[u8] = match bytes {
                            Some(b) => &b[p as usize..(p + n) as usize],
                            None => {
                                zeroes = vec![0u8; n as usize];
                                &zeroes
                            }
                        };
                        file.write_all_at(data, at + p)?;
                    }
                    p += n;
                }
                at += len;
            }
        }
        for e in &entries {
            if let Entry::Redo { offset, data, .. } = e {
                file.write_all_at(data, *offset)?;
                report.fua_kept += 1;
            }
        }
        file.sync_data()?;
        Ok(report)
    }
}
