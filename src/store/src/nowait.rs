//! The inline fast path: a buffered read or write tried on the caller's thread with
//! `RWF_NOWAIT`, which the kernel completes only if it can do so without blocking
//! (the pages are cached, no block allocation or writeback wait is needed) and
//! otherwise refuses with EAGAIN.
//!
//! A page-cache hit then costs one syscall on the caller's thread instead of two thread
//! hand-offs to an engine thread and back, which is most of the latency of a small
//! request. Whatever the fast path cannot finish goes to the engine as before, so the
//! semantics are the engine's: a write has completed into the page cache when this
//! returns, exactly as an engine write would have.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};

use rustix::io::{preadv2, pwritev2, Errno, ReadWriteFlags};

/// Writes as much of `data` at `offset` as the kernel takes without blocking; returns
/// the number of bytes written (0 when it would block or the file system cannot say).
pub(crate) fn try_write(file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
    match pwritev2(file, &[IoSlice::new(data)], offset, ReadWriteFlags::NOWAIT) {
        Ok(written) => Ok(written),
        Err(errno) if would_block(errno) => Ok(0),
        Err(errno) => Err(io::Error::from(errno)),
    }
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

fn would_block(errno: Errno) -> bool {
    // EOPNOTSUPP/EINVAL: this file (system) does not support RWF_NOWAIT at all.
    errno == Errno::AGAIN || errno == Errno::OPNOTSUPP || errno == Errno::INVAL
}
