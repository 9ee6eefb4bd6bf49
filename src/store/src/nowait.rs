//! The inline paths: I/O done on the caller's thread instead of an engine thread.
//!
//! - A buffered read tried with `RWF_NOWAIT`, which the kernel completes only from the
//!   page cache and otherwise refuses with EAGAIN (then the engine reads).
//! - A small buffered plain write (a copy into the page cache) and the group-commit
//!   fdatasync, done with ordinary blocking syscalls.
//!
//! Each saves two thread hand-offs to an engine thread and back, which is most of the
//! latency of a small request. The semantics are the engine's: when these return, the
//! write has completed into the page cache, or the fdatasync has made every earlier
//! completed write durable.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};

use rustix::io::{preadv2, pwritev2, Errno, ReadWriteFlags};

/// Writes all of `data` at `offset` on this thread (a small buffered write: a copy
/// into the page cache). It may block briefly (dirty-page throttling); the caller
/// bounds the size.
pub(crate) fn write_all(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        match pwritev2(
            file,
            &[IoSlice::new(&data[done..])],
            offset + done as u64,
            ReadWriteFlags::empty(),
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the store took no bytes",
                ))
            }
            Ok(written) => done += written,
            Err(Errno::INTR) => {}
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
    Ok(())
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

fn would_block(errno: Errno) -> bool {
    // EOPNOTSUPP/EINVAL: this file (system) does not support RWF_NOWAIT at all.
    errno == Errno::AGAIN || errno == Errno::OPNOTSUPP || errno == Errno::INVAL
}
