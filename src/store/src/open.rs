//! Opening a backing store: create-if-missing, size checks, locking, O_DIRECT alignment.
//!
//! Everything here runs once per open, off the hot path, so it favours clear errors over
//! speed.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, FlockOperation, StatxFlags};
use tracing::info;

use crate::buf::BUF_ALIGN_BYTES;
use crate::config::StoreConfig;
use crate::durability::open_another;
use crate::error::StoreError;

/// Sizes must be a multiple of this (the classic sector size).
pub(crate) const SECTOR_BYTES: u64 = 512;

/// Alignment assumed for O_DIRECT on a regular file whose filesystem does not report
/// its own through statx(STATX_DIOALIGN).
const FALLBACK_DIRECT_ALIGN_BYTES: u64 = 4096;

/// An opened, locked and sized backing store.
#[derive(Debug)]
pub(crate) struct Backing {
    pub file: File,
    pub size_bytes: u64,
    pub is_block_device: bool,
    /// Required alignment of offsets and lengths: 1 without O_DIRECT.
    pub io_align_bytes: u64,
    /// Whether fallocate(ZERO_RANGE) is done without writing zeroes: always on regular
    /// files; on block devices only when the device has a write-zeroes command.
    pub zero_range_fast: bool,
}

/// Opens (and if configured, creates) the backing store described by `cfg`.
pub(crate) fn open_backing(cfg: &StoreConfig) -> Result<Backing, StoreError> {
    let path = cfg.path.as_path();
    if let Some(size_bytes) = cfg.create_size_bytes {
        check_size(path, size_bytes)?;
    }
    match std::fs::metadata(path) {
        Ok(meta) => check_file_type(path, &meta.file_type())?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let Some(size_bytes) = cfg.create_size_bytes else {
                return Err(StoreError::MissingSize {
                    path: path.to_owned(),
                });
            };
            if cfg.read_only {
                // A read-only open never creates anything.
                return Err(open_error(path, err));
            }
            create_file(path, size_bytes)?;
        }
        Err(err) => return Err(open_error(path, err)),
    }

    let file = open_file(cfg)?;
    let meta = file.metadata().map_err(|err| open_error(path, err))?;
    // The path may have been replaced between the two looks; trust the descriptor.
    check_file_type(path, &meta.file_type())?;
    lock_file(path, &file, cfg.read_only)?;

    let is_block_device = meta.file_type().is_block_device();
    let size_bytes = if is_block_device {
        (&file)
            .seek(SeekFrom::End(0))
            .map_err(|err| open_error(path, err))?
    } else {
        meta.len()
    };
    check_size(path, size_bytes)?;
    if let Some(expected_bytes) = cfg.create_size_bytes {
        if expected_bytes != size_bytes {
            return Err(StoreError::SizeMismatch {
                path: path.to_owned(),
                expected_bytes,
                actual_bytes: size_bytes,
            });
        }
    }

    let size_bytes = match cfg.data_size_bytes {
        Some(limit) if limit > size_bytes => {
            return Err(StoreError::InvalidConfig(format!(
                "{} is {size_bytes} bytes, smaller than the {limit}-byte data area",
                path.display()
            )))
        }
        Some(limit) => limit,
        None => size_bytes,
    };

    let io_align_bytes = if cfg.direct_io {
        direct_io_alignment(path, &file, is_block_device)?
    } else {
        1
    };
    if size_bytes % io_align_bytes != 0 {
        return Err(StoreError::InvalidConfig(format!(
            "{} is {size_bytes} bytes, not a multiple of the {io_align_bytes}-byte O_DIRECT \
             alignment, so its tail could not be reached",
            path.display()
        )));
    }
    let zero_range_fast = !is_block_device || block_device_has_write_zeroes(meta.rdev());
    Ok(Backing {
        file,
        size_bytes,
        is_block_device,
        io_align_bytes,
        zero_range_fast,
    })
}

fn open_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Open {
        path: path.to_owned(),
        source,
    }
}

fn check_size(path: &Path, size_bytes: u64) -> Result<(), StoreError> {
    if size_bytes == 0 || size_bytes % SECTOR_BYTES != 0 {
        return Err(StoreError::InvalidSize {
            path: path.to_owned(),
            size_bytes,
        });
    }
    Ok(())
}

fn check_file_type(path: &Path, file_type: &std::fs::FileType) -> Result<(), StoreError> {
    if file_type.is_file() || file_type.is_block_device() {
        Ok(())
    } else {
        Err(StoreError::UnsupportedFileType {
            path: path.to_owned(),
        })
    }
}

/// Creates a sparse regular file of `size_bytes` and makes its existence and size
/// durable (file and parent directory fsynced), so a crash right after the first
/// acknowledged flush cannot lose the whole file.
fn create_file(path: &Path, size_bytes: u64) -> Result<(), StoreError> {
    let file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        // Someone created it since we looked: open it like any existing store.
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(err) => return Err(open_error(path, err)),
    };
    file.set_len(size_bytes)
        .and_then(|()| file.sync_all())
        .map_err(|err| open_error(path, err))?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| open_error(path, err))?;
    info!(path = %path.display(), size_bytes, "created backing store file");
    Ok(())
}

fn open_file(cfg: &StoreConfig) -> Result<File, StoreError> {
    let path = cfg.path.as_path();
    let mut flags = libc::O_CLOEXEC;
    if cfg.direct_io {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(!cfg.read_only)
        .custom_flags(flags)
        .open(path)
        .map_err(|err| {
            if cfg.direct_io && err.raw_os_error() == Some(libc::EINVAL) {
                StoreError::DirectIoUnsupported {
                    path: path.to_owned(),
                }
            } else {
                open_error(path, err)
            }
        })
}

/// Opens the O_DIRECT read-only description of `main`'s file for
/// `StoreConfig::direct_reads`, with the alignment its reads need; `None` (logged)
/// where the filesystem has no O_DIRECT (tmpfs before Linux 6.6, for one).
pub(crate) fn open_direct_read_file(
    path: &Path,
    main: &File,
    is_block_device: bool,
) -> Result<Option<(File, u64)>, StoreError> {
    let main_meta = main.metadata().map_err(|err| open_error(path, err))?;
    let file = match open_another(path, &main_meta, false, libc::O_CLOEXEC | libc::O_DIRECT) {
        Ok(file) => file,
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            info!(
                path = %path.display(),
                "O_DIRECT is not supported here: reads go through the page cache"
            );
            return Ok(None);
        }
        Err(err) => return Err(open_error(path, err)),
    };
    match direct_io_alignment(path, &file, is_block_device) {
        Ok(align_bytes) => Ok(Some((file, align_bytes))),
        Err(StoreError::DirectIoUnsupported { .. }) => {
            info!(
                path = %path.display(),
                "O_DIRECT alignment unusable here: reads go through the page cache"
            );
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Takes an advisory lock for the store's lifetime (released when the descriptor
/// closes): exclusive for read-write, shared for read-only. Two daemons writing one
/// backing store would corrupt it silently; this makes the second one fail loudly.
fn lock_file(path: &Path, file: &File, read_only: bool) -> Result<(), StoreError> {
    let operation = if read_only {
        FlockOperation::NonBlockingLockShared
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    match rustix::fs::flock(file, operation) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Locked {
            path: path.to_owned(),
        }),
        Err(err) => Err(open_error(path, err.into())),
    }
}

/// The alignment O_DIRECT needs for offsets and lengths on this file, from
/// statx(STATX_DIOALIGN) (Linux 6.1+), else the device's logical block size, else 4096.
fn direct_io_alignment(path: &Path, file: &File, is_block_device: bool) -> Result<u64, StoreError> {
    let unsupported = || StoreError::DirectIoUnsupported {
        path: path.to_owned(),
    };
    if let Ok(stx) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        if stx.stx_mask & StatxFlags::DIOALIGN.bits() != 0 {
            let offset_align = u64::from(stx.stx_dio_offset_align);
            let mem_align = stx.stx_dio_mem_align as usize;
            if offset_align == 0 || mem_align > BUF_ALIGN_BYTES {
                return Err(unsupported());
            }
            return Ok(offset_align);
        }
    }
    if is_block_device {
        let sector =
            rustix::fs::ioctl_blksszget(file).map_err(|err| open_error(path, err.into()))?;
        return Ok(u64::from(sector).max(1));
    }
    Ok(FALLBACK_DIRECT_ALIGN_BYTES)
}

/// Whether the block device `rdev` can zero ranges without data transfer (a
/// REQ_OP_WRITE_ZEROES command). Without it the kernel's ZERO_RANGE writes zero pages
/// itself, which is not "fast".
fn block_device_has_write_zeroes(rdev: u64) -> bool {
    let major = rustix::fs::major(rdev);
    let minor = rustix::fs::minor(rdev);
    // A whole disk has queue/ itself; a partition shares its parent disk's queue.
    ["queue", "../queue"].iter().any(|queue| {
        let sysfs = format!("/sys/dev/block/{major}:{minor}/{queue}/write_zeroes_max_bytes");
        std::fs::read_to_string(sysfs)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .is_some_and(|max_bytes| max_bytes > 0)
    })
}
