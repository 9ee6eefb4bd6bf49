//! The inline paths: I/O done on the caller's thread instead of an engine thread.
//!
//! - A buffered read tried with `RWF_NOWAIT`, which the kernel completes only from the
//!   page cache and otherwise refuses with EAGAIN (then the engine reads).
//! - A buffered plain write (a copy into the page cache) and the group-commit
//!   fdatasync, done with ordinary blocking syscalls; writes over 64 KiB inside
//!   `block_in_place`, so that the worker's other tasks move to another thread instead
//!   of waiting; the fdatasync (one per store at a time) right on the worker when the
//!   runtime has another one (`blocking_briefly`).
//!
//! Each saves two thread hand-offs to an engine thread and back, which is most of the
//! latency of a small request. The semantics are the engine's: when these return, the
//! write has completed into the page cache, or the fdatasync has made every earlier
//! completed write durable.

use std::fs::File;
use std::io::{self, IoSliceMut};

use rustix::io::{preadv2, Errno, ReadWriteFlags};

/// Writes up to this size are a copy of a few microseconds: done right here. Larger ones
/// (up to `inline_sync_max_bytes`) go through [`blocking`].
pub const SMALL_WRITE_BYTES: usize = 64 * 1024;

/// Writes all of `data` at `offset` on this thread (a small buffered write: a copy
/// into the page cache), with the pool engine's loop (short writes, bounded EINTR
/// retries). It may block briefly (dirty-page throttling); the caller bounds the size.
pub(crate) fn write_all(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::os::fd::AsFd;
    crate::engine::pool::write_full(file.as_fd(), offset, data, ReadWriteFlags::empty())
}

/// Writes `bufs` back to back at `offset` on this thread with `pwritev2` (a merged
/// write: a copy into the page cache), as `write_all` does for one buffer.
pub(crate) fn write_vectored_all(
    file: &File,
    offset: u64,
    bufs: &[crate::buf::WriteBuf],
) -> io::Result<()> {
    use std::os::fd::AsFd;
    crate::engine::pool::write_vectored_full(file.as_fd(), offset, bufs, ReadWriteFlags::empty())
}

/// fdatasync on this thread, never retried (see `durability`).
pub(crate) fn fdatasync(file: &File) -> io::Result<()> {
    rustix::fs::fdatasync(file).map_err(io::Error::from)
}

/// Reads into `buf` at `offset` what the page cache holds without blocking; returns the
/// number of bytes read (short at end of file or where the cache has a gap).
pub(crate) fn try_read(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    match preadv2(
        file,
        &mut [IoSliceMut::new(buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(read) => Ok(read),
        Err(errno) if would_block(errno) => Ok(0),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

/// cachestat(2)'s page counts for a range of a file.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStat {
    /// Pages in the page cache (dirty ones included).
    pub cached: u64,
    /// Dirty pages.
    pub dirty: u64,
    /// Pages under writeback.
    pub writeback: u64,
}

/// cachestat(2) (Linux 6.5+) for `[offset, offset + len)` of `file`: counts pages,
/// starts no I/O. Also used by the tests to observe the store.
#[doc(hidden)]
pub fn cachestat(file: &File, offset: u64, len: u64) -> io::Result<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// cachestat's number on every architecture Rust targets (alpha, 561, is none).
    const SYS_CACHESTAT: libc::c_long = 451;
    use std::os::fd::AsRawFd;
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both structs have the kernel's layout and outlive the call.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CacheStat {
        cached: stat.nr_cache,
        dirty: stat.nr_dirty,
        writeback: stat.nr_writeback,
    })
}

/// Whether every page of `[offset, offset + len)` is in the page cache (cachestat,
/// rounded out to whole pages). An error is cachestat's.
pub(crate) fn fully_cached(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let page = page_bytes();
    let first = offset / page;
    let Some(end) = offset.checked_add(len) else {
        return Ok(false);
    };
    let end = end.div_ceil(page);
    let stat = cachestat(file, first * page, (end - first) * page)?;
    Ok(stat.cached >= end - first)
}

/// The page size, read once.
fn page_bytes() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| rustix::param::page_size() as u64)
}

fn would_block(errno: Errno) -> bool {
    // EOPNOTSUPP/EINVAL: this file (system) does not support RWF_NOWAIT at all.
    errno == Errno::AGAIN || errno == Errno::OPNOTSUPP || errno == Errno::INVAL
}

/// Runs `work`, which blocks for about a disk flush (the group-commit fdatasync; at
/// most one per store at a time), on this thread, leaving the worker's other tasks
/// where they are when the runtime has another worker to take them: handing them to
/// a new thread (`block_in_place`) costs more than the wait, in wake-ups and CPU
/// (measured: a node of the pair spent a quarter less CPU per write without it, and
/// job a's replicated FLUSH was no slower). On a runtime with a single worker it is
/// [`blocking`].
pub(crate) fn blocking_briefly<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle)
            if handle.runtime_flavor() == RuntimeFlavor::MultiThread
                && handle.metrics().num_workers() >= 2 =>
        {
            work()
        }
        _ => blocking(work),
    }
}

/// Runs `work`, which may block for a while (a large copy into the page cache), on
/// this thread. Inside a multi-threaded tokio runtime it first hands this
/// worker's other tasks to another thread (`block_in_place`), so that they do not wait
/// behind it; elsewhere it just runs it.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}
