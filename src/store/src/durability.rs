//! The poison rule and the sync descriptors that make it airtight.
//!
//! Linux reports a writeback error to each *open file description* once (errseq), on
//! whichever fsync/fdatasync/RWF_DSYNC write on that description checks first. If two
//! sync ops ran on one description at once, one could consume the error that the other
//! needed, and the other would report success for data that never reached the disk.
//! So every sync op (flush or FUA write) runs on a description of its own, leased from
//! a small pool of extra opens of the same file; plain reads and writes use the main
//! description, which never syncs.
//!
//! The failure is recorded by the engine thread when the op completes — before the
//! lease is returned, and whether or not the caller still waits — and every sync op
//! checks the poison flag after taking its lease. Together: once any sync op has
//! failed, no later flush or FUA write can report success, until the store is reopened.

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::error;

/// Index of the main description in the engine's file table.
pub(crate) const MAIN_FILE_INDEX: usize = 0;

/// Shared between the store and its engine threads.
pub(crate) struct Durability {
    poisoned: AtomicBool,
    /// Indexes (into the engine's file table) of the sync descriptions not leased.
    free_sync_files: Mutex<Vec<usize>>,
    /// One permit per free sync description.
    sync_files_available: Arc<Semaphore>,
}

impl fmt::Debug for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Durability")
            .field("poisoned", &self.is_poisoned())
            .finish_non_exhaustive()
    }
}

impl Durability {
    /// `sync_file_count` sync descriptions live at indexes `1..=sync_file_count`.
    pub(crate) fn new(sync_file_count: usize) -> Durability {
        Durability {
            poisoned: AtomicBool::new(false),
            free_sync_files: Mutex::new((1..=sync_file_count).collect()),
            sync_files_available: Arc::new(Semaphore::new(sync_file_count)),
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Records that a flush or FUA write failed; logs the first time only.
    pub(crate) fn poison(&self, what: &str, err: &io::Error) {
        if !self.poisoned.swap(true, Ordering::SeqCst) {
            error!(
                operation = what,
                error = %err,
                "backing store poisoned: a {what} failed, so writes not yet flushed may be \
                 lost; every later flush and FUA write fails until the store is reopened"
            );
        }
    }

    /// Waits for a free sync description. `None` when the store is closing.
    pub(crate) async fn lease(self: &Arc<Durability>) -> Option<SyncLease> {
        let permit = Arc::clone(&self.sync_files_available)
            .acquire_owned()
            .await
            .ok()?;
        let file_index = self
            .free_sync_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .expect("a sync-file permit guarantees a free sync file index");
        Some(SyncLease {
            durability: Arc::clone(self),
            file_index,
            _permit: permit,
        })
    }

    /// Wakes lease waiters with `None`; used at close.
    pub(crate) fn close(&self) {
        self.sync_files_available.close();
    }
}

/// Exclusive use of one sync description, held by a flush or FUA write until the
/// engine has completed it.
pub(crate) struct SyncLease {
    durability: Arc<Durability>,
    file_index: usize,
    // Dropped after `drop` has returned the index, so a permit always finds one.
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for SyncLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncLease")
            .field("file_index", &self.file_index)
            .finish_non_exhaustive()
    }
}

impl SyncLease {
    pub(crate) fn file_index(&self) -> usize {
        self.file_index
    }

    pub(crate) fn durability(&self) -> &Durability {
        &self.durability
    }
}

impl Drop for SyncLease {
    fn drop(&mut self) {
        self.durability
            .free_sync_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.file_index);
    }
}

/// Opens `count` more descriptions of `main`'s file with the same access mode, checking
/// that each is the same inode (the path could have been replaced meanwhile).
pub(crate) fn open_sync_files(
    path: &std::path::Path,
    main: &File,
    direct_io: bool,
    count: usize,
) -> io::Result<Vec<File>> {
    let main_meta = main.metadata()?;
    let mut flags = libc::O_CLOEXEC;
    if direct_io {
        flags |= libc::O_DIRECT;
    }
    (0..count)
        .map(|_| open_another(path, &main_meta, true, flags))
        .collect()
}

/// Opens one more description of the store's file at `path` (read-only unless
/// `write`, with `flags`), checking that it is the inode `main_meta` describes: the
/// path could have been replaced since the store's main description was opened.
pub(crate) fn open_another(
    path: &std::path::Path,
    main_meta: &std::fs::Metadata,
    write: bool,
    flags: i32,
) -> io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.dev() != main_meta.dev() || meta.ino() != main_meta.ino() {
        return Err(io::Error::other(
            "the path was replaced by another file while the store was being opened",
        ));
    }
    Ok(file)
}
