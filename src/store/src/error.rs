//! `StoreError`: every way a store operation or an open can fail.

use std::io;
use std::path::PathBuf;

/// An error from opening or using a store. A store I/O failure is always returned as
/// one of these, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The path could not be opened, created or examined.
    #[error("cannot open backing store {path}: {source}")]
    Open {
        /// The configured path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The path does not exist and the configuration gives no size to create it with.
    #[error("backing store {path} does not exist and no size is configured to create it with")]
    MissingSize {
        /// The configured path.
        path: PathBuf,
    },
    /// The existing store's size differs from the configured size.
    #[error("backing store {path} is {actual_bytes} bytes, but the configured size is {expected_bytes} bytes")]
    SizeMismatch {
        /// The configured path.
        path: PathBuf,
        /// The configured size.
        expected_bytes: u64,
        /// The size found on disk.
        actual_bytes: u64,
    },
    /// The size is zero or not a multiple of 512.
    #[error("backing store {path} would be {size_bytes} bytes; the size must be greater than 0 and a multiple of 512")]
    InvalidSize {
        /// The configured path.
        path: PathBuf,
        /// The offending size.
        size_bytes: u64,
    },
    /// The path is a directory, a character device, a FIFO or a socket.
    #[error("backing store {path} is neither a regular file nor a block device")]
    UnsupportedFileType {
        /// The configured path.
        path: PathBuf,
    },
    /// Another open store (in this or another process) holds the lock on the path.
    #[error("backing store {path} is already in use (another process holds its lock)")]
    Locked {
        /// The configured path.
        path: PathBuf,
    },
    /// O_DIRECT was asked for, but the filesystem or device refuses it.
    #[error("backing store {path}: direct I/O (O_DIRECT) is not supported here")]
    DirectIoUnsupported {
        /// The configured path.
        path: PathBuf,
    },
    /// The io_uring engine was asked for explicitly and cannot run here.
    #[error("the io_uring engine is unavailable: {source}")]
    EngineUnavailable {
        /// Why the ring could not be set up or did not work.
        #[source]
        source: io::Error,
    },
    /// A configuration value is out of its range.
    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),
    /// A write, discard or zeroing on a store opened read-only.
    #[error("the store is read-only")]
    ReadOnly,
    /// The request reaches past the end of the store (or overflows).
    #[error("request at offset {offset} with length {len} reaches past the end of the store ({size_bytes} bytes)")]
    OutOfRange {
        /// Request offset in bytes.
        offset: u64,
        /// Request length in bytes.
        len: u64,
        /// Store size in bytes.
        size_bytes: u64,
    },
    /// O_DIRECT is on and the request is not aligned to the device's block size.
    #[error("request at offset {offset} with length {len} is not aligned to {align_bytes} bytes, as O_DIRECT requires")]
    Unaligned {
        /// Request offset in bytes.
        offset: u64,
        /// Request length in bytes.
        len: u64,
        /// The required alignment of offset and length.
        align_bytes: u64,
    },
    /// A single read or write is longer than the configured maximum.
    #[error("request length {len} exceeds the maximum of {max_bytes} bytes")]
    TooLarge {
        /// Request length in bytes.
        len: u64,
        /// The configured `max_request_bytes`.
        max_bytes: u64,
    },
    /// A vectored write with no buffer or more than `max` of them.
    #[error("a vectored write of {pieces} buffers (1 to {max} allowed)")]
    TooManyPieces { pieces: usize, max: usize },
    /// Zeroing was asked to be fast only, and the filesystem or device can only do it by
    /// writing zeroes (NBD's FAST_ZERO gets `NBD_ENOTSUP` from this).
    #[error("the operation cannot be done quickly here (it would need to write zeroes)")]
    NotSupported,
    /// An earlier flush or FUA write failed, so data that was not yet flushed may be lost
    /// even if a later fdatasync succeeds; every flush and FUA write fails until the
    /// store is reopened.
    #[error("I/O error: the store is poisoned by an earlier failed flush or FUA write; unflushed writes may be lost; reopen the store")]
    Poisoned,
    /// The kernel reported an I/O error.
    #[error("I/O error on the backing store: {0}")]
    Io(#[from] io::Error),
    /// The store was closed (or its engine thread died); the request was not carried out.
    #[error("the store's I/O engine has stopped")]
    EngineStopped,
}

impl StoreError {
    /// The errno that best describes this error to a block-device client: the kernel's
    /// errno for `Io`, `EIO` for a poisoned or stopped store, `EROFS` for read-only,
    /// `ENOSPC` for out of range (as NBD asks for writes past the end), `EOPNOTSUPP` for
    /// `NotSupported`, `EINVAL` for the rest.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Io(err) => err.raw_os_error().unwrap_or(libc::EIO),
            StoreError::Poisoned | StoreError::EngineStopped => libc::EIO,
            StoreError::ReadOnly => libc::EROFS,
            StoreError::OutOfRange { .. } => libc::ENOSPC,
            StoreError::NotSupported => libc::EOPNOTSUPP,
            _ => libc::EINVAL,
        }
    }
}
