//! pairbd's on-disk metadata: what a node must remember across crashes (role,
//! disk state, generation identifiers, whether the peer needs a sync), in a
//! format that is never torn.
//!
//! Two 4096-byte slots, each a complete record protected by crc32c and carrying
//! a write counter. A write goes to the slot that does not hold the newest valid
//! record, then fdatasync; reading takes the valid slot with the highest
//! counter. A crash in the middle of a write leaves the other slot, the previous
//! state, intact. ("fdatasync" here and below: since the metadata may share its
//! file with the data, a write is made durable by itself, with RWF_DSYNC, not by
//! an fdatasync of the whole file; see `write_durable`.)
//!
//! Internal metadata occupies the last [`META_RESERVED_BYTES`] of the backing
//! store (the slots at the start of that area, the rest kept for bitmaps), so
//! the data area is `[0, backing length - META_RESERVED_BYTES)` and the slots
//! can be found without knowing the configured size: a changed `size` in the
//! configuration is then reported as a mismatch instead of being looked for
//! (and, worse, created) inside the data. External metadata is a file of its
//! own whose first 8 KiB are the two slots.
//!
//! The dirty bitmap follows the slots: internal, in the rest of the reserved
//! area ([`BITMAP_CAPACITY_INTERNAL_BYTES`], enough for 31 GiB at 4 KiB per
//! bit or 507 GiB at 64 KiB); external, from byte 8192 of the file on (it
//! grows as needed). Pages are written in place and made durable before the
//! slot that follows them (`write_with_bitmap`): the slot is the commit
//! point, so a torn page is harmless (docs/DURABILITY.md argues it).

mod format;

pub use format::{decode_slot, encode_slot, MetaRecord, SlotError, FORMAT_VERSION, SLOT_BYTES};

use pairbd_repl_core::bitmap::{BitmapPage, BITMAP_PAGE_BYTES};

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pairbd_repl_core::activity_log::AL_EXTENTS_MAX;
use pairbd_repl_core::{ActivityLogImage, PersistentState};

/// Bytes reserved at the end of a backing store for internal metadata (room
/// for bitmaps later).
pub const META_RESERVED_BYTES: u64 = 1 << 20;

/// Bytes of bitmap the reserved area of internal metadata holds.
pub const BITMAP_CAPACITY_INTERNAL_BYTES: u64 = META_RESERVED_BYTES - 2 * SLOT_BYTES as u64;

/// Where a node's metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// In the last [`META_RESERVED_BYTES`] of the backing store.
    Internal { backing: PathBuf },
    /// In a file of its own.
    External { path: PathBuf },
}

impl MetaLocation {
    /// The file that holds the metadata.
    pub fn path(&self) -> &Path {
        match self {
            MetaLocation::Internal { backing } => backing,
            MetaLocation::External { path } => path,
        }
    }
}

/// Why metadata could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no pairbd metadata on {path}; run `pairbd create-md` for this node first")]
    Missing { path: PathBuf },
    #[error("the metadata on {path} is corrupt (both copies fail their checksum); recreate it with `pairbd create-md --force` (the node then needs a full sync)")]
    Corrupt { path: PathBuf },
    #[error("the metadata on {path} has format version {found}; this pairbd reads version {supported} — run a newer pairbd")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the metadata on {path} belongs to node {node} (id {node_id}) of resource {resource}; check --node and the configuration, or run `pairbd create-md --force` to take it over")]
    Foreign {
        path: PathBuf,
        node: String,
        node_id: u8,
        resource: String,
    },
    #[error("the metadata on {path} describes {recorded} bytes of data but the configuration says {configured}; pairbd cannot resize a resource — restore the old size or recreate both nodes")]
    SizeMismatch {
        path: PathBuf,
        recorded: u64,
        configured: u64,
    },
    #[error("metadata already exists on {path} (node {node}, resource {resource}); pass --force to overwrite it")]
    Exists {
        path: PathBuf,
        node: String,
        resource: String,
    },
    #[error("{path} is {actual} bytes, too small for {needed} bytes of data and metadata")]
    TooSmall {
        path: PathBuf,
        actual: u64,
        needed: u64,
    },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("a metadata write failed earlier; restart the node")]
    Poisoned,
    /// Tests only: a simulated crash at a metadata write.
    #[doc(hidden)]
    #[error("simulated crash at a metadata write (tests)")]
    TestCrash,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The byte offset of slot 0: the start of the reserved area at the end of the
/// backing store for internal metadata, the start of an external file.
fn slots_offset(location: &MetaLocation, file_len: u64) -> Result<u64, MetaError> {
    match location {
        MetaLocation::External { .. } => Ok(0),
        MetaLocation::Internal { backing } => {
            file_len
                .checked_sub(META_RESERVED_BYTES)
                .ok_or_else(|| MetaError::TooSmall {
                    path: backing.clone(),
                    actual: file_len,
                    needed: META_RESERVED_BYTES,
                })
        }
    }
}

/// The length of a regular file, or the size of a block device (whose inode
/// says 0; seeking to its end asks the driver).
fn file_len(file: &File, path: &Path) -> Result<u64, MetaError> {
    let meta = file.metadata().map_err(io("stat", path))?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0)).map_err(io("seek", path))
    } else {
        Ok(meta.len())
    }
}

/// What reading both slots found.
enum Found {
    Record { record: MetaRecord, slot: usize },
    Missing,
    Corrupt,
    Newer(u32),
}

fn read_slots(file: &File, path: &Path, offset: u64) -> Result<Found, MetaError> {
    let mut best: Option<(MetaRecord, usize)> = None;
    let mut all_zero = true;
    let mut newer = None;
    for slot in 0..2 {
        let mut buf = vec![0u8; SLOT_BYTES];
        let at = offset + (slot * SLOT_BYTES) as u64;
        // A short file reads as zeroes past its end.
        let mut filled = 0;
        while filled < SLOT_BYTES {
            let n = file
                .read_at(&mut buf[filled..], at + filled as u64)
                .map_err(io("read", path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if buf.iter().any(|&b| b != 0) {
            all_zero = false;
        }
        match decode_slot(&buf) {
            Ok(record) => {
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| record.counter > b.counter)
                {
                    best = Some((record, slot));
                }
            }
            Err(SlotError::NewerFormat(v)) => newer = Some(v),
            Err(_) => {}
        }
    }
    // A slot a newer pairbd wrote (checksum valid) wins over an older one of
    // ours: falling back to the older record would resurrect a stale state and
    // our next write would overwrite the newer one.
    Ok(match (newer, best) {
        (Some(v), _) => Found::Newer(v),
        (None, Some((record, slot))) => Found::Record { record, slot },
        (None, None) if all_zero => Found::Missing,
        (None, None) => Found::Corrupt,
    })
}

/// Tests only: where a simulated crash strikes a metadata write.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPhase {
    /// Before anything of the write reached the file.
    Before,
    /// Half of the new slot written and synced (a torn write).
    Torn,
    /// After the write and its fdatasync completed.
    After,
}

impl std::str::FromStr for CrashPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<CrashPhase, String> {
        match s {
            "before" => Ok(CrashPhase::Before),
            "torn" => Ok(CrashPhase::Torn),
            "after" => Ok(CrashPhase::After),
            other => Err(format!("crash phase {other:?}: use before, torn or after")),
        }
    }
}

/// An open metadata area: the last record, and the means to write the next.
#[derive(Debug)]
pub struct MetaStore {
    file: File,
    path: PathBuf,
    offset: u64,
    record: MetaRecord,
    /// The slot holding `record`.
    slot: usize,
    poisoned: bool,
    /// Internal metadata (the bitmap area is bounded by the reserved area).
    internal: bool,
    /// Tests only: the write (counted from 1) at which to simulate a crash.
    crash: Option<(u64, CrashPhase)>,
    writes: u64,
}

impl MetaStore {
    /// Reads and checks the metadata at `location`. For internal metadata the
    /// recorded data size must fit in front of the reserved area.
    pub fn open(location: &MetaLocation) -> Result<MetaStore, MetaError> {
        let path = location.path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    MetaError::Missing {
                        path: path.to_path_buf(),
                    }
                } else {
                    io("open", path)(e)
                }
            })?;
        let len = file_len(&file, path)?;
        let offset = slots_offset(location, len)?;
        match read_slots(&file, path, offset)? {
            Found::Record { record, slot } => {
                let internal = matches!(location, MetaLocation::Internal { .. });
                if internal && record.data_size_bytes > offset {
                    return Err(MetaError::TooSmall {
                        path: path.to_path_buf(),
                        actual: len,
                        needed: record.data_size_bytes.saturating_add(META_RESERVED_BYTES),
                    });
                }
                Ok(MetaStore {
                    file,
                    path: path.to_path_buf(),
                    offset,
                    record,
                    slot,
                    poisoned: false,
                    internal,
                    crash: None,
                    writes: 0,
                })
            }
            Found::Missing => Err(MetaError::Missing {
                path: path.to_path_buf(),
            }),
            Found::Corrupt => Err(MetaError::Corrupt {
                path: path.to_path_buf(),
            }),
            Found::Newer(found) => Err(MetaError::NewerFormat {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            }),
        }
    }

    /// The newest record.
    pub fn record(&self) -> &MetaRecord {
        &self.record
    }

    /// The file holding the metadata, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the metadata belongs to this node of this resource and
    /// describes the configured data size: starting on somebody else's
    /// metadata would replicate the wrong data.
    pub fn verify(
        &self,
        node_id: u8,
        node_name: &str,
        resource: &str,
        data_size_bytes: u64,
    ) -> Result<(), MetaError> {
        let r = &self.record;
        if r.node_id != node_id || r.node_name != node_name || r.resource != resource {
            return Err(MetaError::Foreign {
                path: self.path.clone(),
                node: r.node_name.clone(),
                node_id: r.node_id,
                resource: r.resource.clone(),
            });
        }
        if r.data_size_bytes != data_size_bytes {
            return Err(MetaError::SizeMismatch {
                path: self.path.clone(),
                recorded: r.data_size_bytes,
                configured: data_size_bytes,
            });
        }
        Ok(())
    }

    /// Tests only: the `nth` write from now (counted from 1) fails with
    /// [`MetaError::TestCrash`] at `phase`, leaving the file as a crash there
    /// would; the caller then ends the process at once.
    #[doc(hidden)]
    pub fn crash_for_tests(&mut self, nth: u64, phase: CrashPhase) {
        self.crash = Some((self.writes + nth, phase));
    }

    /// Writes done through this store since it was opened.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// How many bytes of bitmap the area holds (`None`: unbounded, external
    /// metadata grows its file).
    pub fn bitmap_capacity_bytes(&self) -> Option<u64> {
        self.internal.then_some(BITMAP_CAPACITY_INTERNAL_BYTES)
    }

    /// Reads `len` bytes of the bitmap area (past the end of the file:
    /// zeroes).
    pub fn read_bitmap(&self, len: u64) -> Result<Vec<u8>, MetaError> {
        let len = usize::try_from(len).map_err(|_| MetaError::Invalid {
            what: "bitmap",
            detail: format!("{len} bytes"),
        })?;
        let mut buf = vec![0u8; len];
        let at = self.offset + 2 * SLOT_BYTES as u64;
        let mut filled = 0;
        while filled < len {
            let n = self
                .file
                .read_at(&mut buf[filled..], at + filled as u64)
                .map_err(io("read", &self.path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok(buf)
    }

    /// Writes the bitmap `pages` (recorded at `granularity` bytes per bit)
    /// and makes them durable, then writes `state` as [`MetaStore::write`]
    /// does. Each of the two steps counts as one write for the crash hook
    /// (a torn bitmap write leaves half of its first page).
    pub fn write_with_bitmap(
        &mut self,
        state: PersistentState,
        granularity: u64,
        pages: &[BitmapPage],
    ) -> Result<(), MetaError> {
        if !pages.is_empty() {
            self.write_pages(granularity, pages)?;
        }
        self.write(state)
    }

    /// [`MetaStore::write_with_bitmap`], with the activity log the slot
    /// records (in the slot itself: it is committed with the state).
    pub fn write_with_activity_log(
        &mut self,
        state: PersistentState,
        granularity: u64,
        pages: &[BitmapPage],
        activity_log: &ActivityLogImage,
    ) -> Result<(), MetaError> {
        if activity_log.extents.len() > AL_EXTENTS_MAX {
            return Err(MetaError::Invalid {
                what: "activity log",
                detail: format!(
                    "{} extents, at most {AL_EXTENTS_MAX} fit a slot",
                    activity_log.extents.len()
                ),
            });
        }
        if !pages.is_empty() {
            self.write_pages(granularity, pages)?;
        }
        let previous = std::mem::replace(&mut self.record.activity_log, activity_log.clone());
        let result = self.write(state);
        if result.is_err() {
            // What is on disk is unknown (the store is poisoned anyway).
            self.record.activity_log = previous;
        }
        result
    }

    fn write_pages(&mut self, granularity: u64, pages: &[BitmapPage]) -> Result<(), MetaError> {
        if self.poisoned {
            return Err(MetaError::Poisoned);
        }
        let area = self.offset + 2 * SLOT_BYTES as u64;
        for p in pages {
            let end = (u64::from(p.index) + 1) * BITMAP_PAGE_BYTES as u64;
            if p.bytes.len() != BITMAP_PAGE_BYTES
                || self.bitmap_capacity_bytes().is_some_and(|cap| end > cap)
            {
                self.poisoned = true;
                return Err(MetaError::Invalid {
                    what: "bitmap page",
                    detail: format!(
                        "page {} of {} bytes does not fit the bitmap area",
                        p.index,
                        p.bytes.len()
                    ),
                });
            }
        }
        let at = |p: &BitmapPage| area + u64::from(p.index) * BITMAP_PAGE_BYTES as u64;
        self.writes += 1;
        let crash = self
            .crash
            .filter(|(n, _)| *n == self.writes)
            .map(|(_, phase)| phase);
        match crash {
            Some(CrashPhase::Before) => {
                self.poisoned = true;
                return Err(MetaError::TestCrash);
            }
            Some(CrashPhase::Torn) => {
                self.poisoned = true;
                let p = &pages[0];
                self.file
                    .write_all_at(&p.bytes[..BITMAP_PAGE_BYTES / 2], at(p))
                    .map_err(io("write", &self.path))?;
                self.file.sync_data().map_err(io("fdatasync", &self.path))?;
                return Err(MetaError::TestCrash);
            }
            _ => {}
        }
        let blocks: Vec<(u64, &[u8])> = pages.iter().map(|p| (at(p), &p.bytes[..])).collect();
        let result =
            write_all_durable(&self.file, &blocks).map_err(io("durable write", &self.path));
        if result.is_err() {
            self.poisoned = true;
        }
        result?;
        // The next slot records the granularity these pages were written at.
        self.record.bitmap_granularity_bytes = granularity;
        if crash == Some(CrashPhase::After) {
            self.poisoned = true;
            return Err(MetaError::TestCrash);
        }
        Ok(())
    }

    /// Writes `state` atomically (the other slot, then fdatasync). After a
    /// failure the store refuses further writes: what is on disk is unknown.
    pub fn write(&mut self, state: PersistentState) -> Result<(), MetaError> {
        if self.poisoned {
            return Err(MetaError::Poisoned);
        }
        self.writes += 1;
        let crash = self
            .crash
            .filter(|(n, _)| *n == self.writes)
            .map(|(_, phase)| phase);
        let mut next = self.record.clone();
        // A counter at its maximum can only come from a crafted file; refusing
        // is better than wrapping, which would make the older slot win.
        next.counter = self
            .record
            .counter
            .checked_add(1)
            .ok_or_else(|| MetaError::Invalid {
                what: "write counter",
                detail: format!("{} has reached its maximum", self.path.display()),
            })?;
        next.state = state;
        next.format_version = FORMAT_VERSION;
        let slot = 1 - self.slot;
        match crash {
            Some(CrashPhase::Before) => {
                self.poisoned = true;
                return Err(MetaError::TestCrash);
            }
            Some(CrashPhase::Torn) => {
                self.poisoned = true;
                let buf = encode_slot(&next);
                let at = self.offset + (slot * SLOT_BYTES) as u64;
                self.file
                    .write_all_at(&buf[..SLOT_BYTES / 2], at)
                    .map_err(io("write", &self.path))?;
                self.file.sync_data().map_err(io("fdatasync", &self.path))?;
                return Err(MetaError::TestCrash);
            }
            _ => {}
        }
        let result = self.write_slot(slot, &next);
        if result.is_err() {
            self.poisoned = true;
        }
        result?;
        self.record = next;
        self.slot = slot;
        if crash == Some(CrashPhase::After) {
            self.poisoned = true;
            return Err(MetaError::TestCrash);
        }
        Ok(())
    }

    fn write_slot(&self, slot: usize, record: &MetaRecord) -> Result<(), MetaError> {
        let buf = encode_slot(record);
        let at = self.offset + (slot * SLOT_BYTES) as u64;
        write_durable(&self.file, &buf, at).map_err(io("durable write", &self.path))
    }
}

/// Writes `bytes` at `offset` and makes them durable, and only them: a write with
/// RWF_DSYNC, after which the kernel writes back this range alone and flushes the
/// device's cache (or writes it with FUA). Not `fdatasync`: with internal metadata
/// the file is the backing store, and fdatasync would first write back every dirty
/// page of the Primary's data, hundreds of MiB under a stream of large writes, while
/// the writes waiting for this activity-log entry wait too. The data's durability
/// is the store's flushes' business (docs/DURABILITY.md).
///
/// Everything the device completed before the cache flush is durable after it,
/// which `write_all_durable` uses for several blocks.
///
/// Where the kernel has no RWF_DSYNC (before Linux 4.7: EOPNOTSUPP, or ENOSYS
/// for pwritev2 itself) it falls back to a plain write and fdatasync.
fn write_durable(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use rustix::io::{pwritev2, Errno, ReadWriteFlags};
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        let at = offset + done as u64;
        match pwritev2(
            file,
            &[std::io::IoSlice::new(rest)],
            at,
            ReadWriteFlags::DSYNC,
        ) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                file.write_all_at(rest, at)?;
                return file.sync_data();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes every `(offset, bytes)` block and makes them all durable, and only them:
/// the blocks but the last are written, then written back and waited for
/// (`write_back_and_wait`), so that they are on the device before the last one's
/// durable write (`write_durable`) flushes its cache.
fn write_all_durable(file: &File, blocks: &[(u64, &[u8])]) -> std::io::Result<()> {
    let Some(((last_at, last), rest)) = blocks.split_last() else {
        return Ok(());
    };
    for (at, bytes) in rest {
        file.write_all_at(bytes, *at)?;
    }
    let start = rest.iter().map(|(at, _)| *at).min();
    let end = rest.iter().map(|(at, b)| at + b.len() as u64).max();
    if let (Some(start), Some(end)) = (start, end) {
        write_back_and_wait(file, start, end)?;
    }
    write_durable(file, last, *last_at)
}

/// Writes the dirty pages of `[start, end)` back and waits until the device has
/// completed them (sync_file_range WAIT_BEFORE | WRITE | WAIT_AFTER): on the
/// device, perhaps in its volatile cache, until the next cache flush.
fn write_back_and_wait(file: &File, start: u64, end: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let overflow = |_| std::io::Error::from_raw_os_error(libc::EOVERFLOW);
    let offset = libc::off64_t::try_from(start).map_err(overflow)?;
    let len = libc::off64_t::try_from(end.saturating_sub(start)).map_err(overflow)?;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    loop {
        // SAFETY: sync_file_range reads no memory of ours; `file` is open.
        let r = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// `pairbd create-md`: creates the backing file if missing (or extends a short
/// regular file) to `data_size_bytes` (plus [`META_RESERVED_BYTES`] for
/// internal metadata), then writes fresh metadata (Secondary, Inconsistent) to
/// both slots. Refuses to overwrite valid metadata, or metadata of a newer
/// format, unless `force`.
pub fn create_md(
    backing: &Path,
    location: &MetaLocation,
    data_size_bytes: u64,
    node_id: u8,
    node_name: &str,
    resource: &str,
    force: bool,
) -> Result<MetaRecord, MetaError> {
    if data_size_bytes == 0 || data_size_bytes % 4096 != 0 {
        return Err(MetaError::Invalid {
            what: "size",
            detail: format!("{data_size_bytes} bytes is not a positive multiple of 4096"),
        });
    }
    let record =
        MetaRecord::new(data_size_bytes, node_id, node_name, resource).map_err(|detail| {
            MetaError::Invalid {
                what: "names",
                detail,
            }
        })?;
    let internal = matches!(location, MetaLocation::Internal { .. });
    let reserved = if internal { META_RESERVED_BYTES } else { 0 };
    let needed = data_size_bytes
        .checked_add(reserved)
        .ok_or_else(|| MetaError::Invalid {
            what: "size",
            detail: format!("{data_size_bytes} bytes is too large"),
        })?;
    ensure_size(backing, needed)?;
    let meta_path = location.path();
    if !internal {
        ensure_size(meta_path, (2 * SLOT_BYTES) as u64)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(meta_path)
        .map_err(io("open", meta_path))?;
    let len = file_len(&file, meta_path)?;
    let offset = slots_offset(location, len)?;
    if !force {
        match read_slots(&file, meta_path, offset)? {
            Found::Record { record, .. } => {
                return Err(MetaError::Exists {
                    path: meta_path.to_path_buf(),
                    node: record.node_name,
                    resource: record.resource,
                })
            }
            Found::Newer(found) => {
                return Err(MetaError::NewerFormat {
                    path: meta_path.to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                })
            }
            Found::Missing | Found::Corrupt => {}
        }
    }
    let store = MetaStore {
        file,
        path: meta_path.to_path_buf(),
        offset,
        record: record.clone(),
        slot: 0,
        poisoned: false,
        internal,
        crash: None,
        writes: 0,
    };
    let mut second = record.clone();
    second.counter += 1;
    store.write_slot(0, &record)?;
    store.write_slot(1, &second)?;
    Ok(second)
}

/// Creates `path` at `len` bytes if missing; extends a shorter regular file;
/// checks a block device is large enough.
fn ensure_size(path: &Path, len: u64) -> Result<(), MetaError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("open", path))?;
    let meta = file.metadata().map_err(io("stat", path))?;
    if meta.file_type().is_block_device() {
        let actual = file_len(&file, path)?;
        if actual < len {
            return Err(MetaError::TooSmall {
                path: path.to_path_buf(),
                actual,
                needed: len,
            });
        }
        return Ok(());
    }
    if !meta.is_file() {
        return Err(MetaError::Invalid {
            what: "backing",
            detail: format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        });
    }
    if meta.len() < len {
        file.set_len(len).map_err(io("extend", path))?;
        file.sync_all().map_err(io("fsync", path))?;
    }
    Ok(())
}
