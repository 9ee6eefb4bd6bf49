//! The thread-pool engine: N threads doing blocking preadv2/pwritev2/fdatasync/fallocate.
//!
//! It runs wherever the plain syscalls do, which is why it is the fallback when
//! io_uring is blocked (seccomp in containers answers io_uring_setup with EPERM).
//! Requests wait in one bounded queue; the in-flight permits guarantee that the queue
//! never holds more than `max_in_flight` requests, so it never grows.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use rustix::io::{Errno, ReadWriteFlags};

use super::{remaining_slices, total_len, Op, Request, Threads, MAX_RETRIES, MAX_TRANSFER_BYTES};
use crate::buf::{AlignedBuf, WriteBuf};

#[derive(Debug)]
pub(crate) struct PoolEngine {
    shared: Arc<PoolShared>,
    threads: Threads,
}

#[derive(Debug)]
struct PoolShared {
    queue: Mutex<PoolQueue>,
    ready: Condvar,
}

#[derive(Debug)]
struct PoolQueue {
    requests: VecDeque<Request>,
    shutdown: bool,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolQueue> {
        // A worker never panics while holding the lock; if one did, the queue itself is
        // still consistent (push/pop are single steps).
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PoolEngine {
    pub(crate) fn start(
        files: Arc<[File]>,
        thread_count: usize,
        max_in_flight: usize,
    ) -> io::Result<PoolEngine> {
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(PoolQueue {
                requests: VecDeque::with_capacity(max_in_flight),
                shutdown: false,
            }),
            ready: Condvar::new(),
        });
        let engine = PoolEngine {
            shared,
            threads: Threads::default(),
        };
        for index in 0..thread_count {
            let shared = Arc::clone(&engine.shared);
            let files = Arc::clone(&files);
            // On failure `engine` is dropped, which stops the threads already started.
            engine
                .threads
                .spawn(format!("pairbd-pool-{index}"), move || {
                    worker(&shared, &files)
                })?;
        }
        Ok(engine)
    }

    pub(crate) fn submit(&self, request: Request) -> Result<(), Request> {
        let mut queue = self.shared.lock();
        if queue.shutdown {
            return Err(request);
        }
        queue.requests.push_back(request);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }

    pub(crate) fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.ready.notify_all();
    }

    pub(crate) fn threads(&self) -> &Threads {
        &self.threads
    }
}

impl Drop for PoolEngine {
    /// Also runs when `start` fails half-way, so no started thread is left waiting.
    fn drop(&mut self) {
        self.shutdown();
        self.threads.join();
    }
}

/// One pool thread: takes requests until shutdown and an empty queue.
fn worker(shared: &PoolShared, files: &[File]) {
    loop {
        let request = {
            let mut queue = shared.lock();
            loop {
                if let Some(request) = queue.requests.pop_front() {
                    break request;
                }
                if queue.shutdown {
                    return;
                }
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let mut request = request;
        let fd = files[request.file_index()].as_fd();
        let result = execute(fd, &mut request.op);
        request.complete(result);
    }
}

/// Carries out one op completely with blocking syscalls.
fn execute(fd: BorrowedFd<'_>, op: &mut Op) -> io::Result<()> {
    match op {
        Op::Read { offset, buf } => read_full(fd, *offset, buf),
        Op::Write { offset, buf, fua } => {
            let flags = if *fua {
                ReadWriteFlags::DSYNC
            } else {
                ReadWriteFlags::empty()
            };
            write_full(fd, *offset, buf, flags)
        }
        Op::WriteVectored { offset, bufs } => {
            write_vectored_full(fd, *offset, bufs, ReadWriteFlags::empty())
        }
        // Never retried, not even after EINTR: whether a failed fdatasync consumed the
        // file's writeback error is unknown, so any failure must poison the store.
        Op::Flush => rustix::fs::fdatasync(fd).map_err(io::Error::from),
        Op::Fallocate { offset, len, mode } => {
            retry_interrupted(|| rustix::fs::fallocate(fd, mode.flags(), *offset, *len))
        }
    }
}

/// Reads all of `buf` from `offset`, looping over short reads; past end-of-file the
/// rest of the buffer is zeroed (a regular file shorter than the store reads as zeroes).
fn read_full(fd: BorrowedFd<'_>, offset: u64, buf: &mut AlignedBuf) -> io::Result<()> {
    let mut done = 0;
    let mut retries = 0;
    while done < buf.len() {
        let end = buf.len().min(done + MAX_TRANSFER_BYTES);
        let mut slices = [IoSliceMut::new(&mut buf[done..end])];
        match rustix::io::preadv2(
            fd,
            &mut slices,
            offset + done as u64,
            ReadWriteFlags::empty(),
        ) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(count) => done += count,
            Err(err) => retry_or_fail(err, &mut retries)?,
        }
    }
    Ok(())
}

/// Writes all of `data` at `offset` with `flags` on every syscall (so with DSYNC each
/// part is durable before the next starts), looping over short writes.
pub(crate) fn write_full(
    fd: BorrowedFd<'_>,
    offset: u64,
    data: &[u8],
    flags: ReadWriteFlags,
) -> io::Result<()> {
    let mut done = 0;
    let mut retries = 0;
    while done < data.len() {
        let end = data.len().min(done + MAX_TRANSFER_BYTES);
        let slices = [IoSlice::new(&data[done..end])];
        match rustix::io::pwritev2(fd, &slices, offset + done as u64, flags) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => done += count,
            Err(err) => retry_or_fail(err, &mut retries)?,
        }
    }
    Ok(())
}

/// Writes all of `bufs`, back to back from `offset`, with `pwritev2` (one call for
/// up to `IOV_MAX` buffers), looping over short writes.
pub(crate) fn write_vectored_full(
    fd: BorrowedFd<'_>,
    offset: u64,
    bufs: &[WriteBuf],
    flags: ReadWriteFlags,
) -> io::Result<()> {
    let total = total_len(bufs);
    let mut done = 0;
    let mut retries = 0;
    while done < total {
        let slices: Vec<IoSlice<'_>> = remaining_slices(bufs, done)
            .into_iter()
            .map(IoSlice::new)
            .collect();
        match rustix::io::pwritev2(fd, &slices, offset + done as u64, flags) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => done += count,
            Err(err) => retry_or_fail(err, &mut retries)?,
        }
    }
    Ok(())
}

/// EINTR and EAGAIN are retried a bounded number of times; anything else is the error.
fn retry_or_fail(err: Errno, retries: &mut u32) -> io::Result<()> {
    if (err == Errno::INTR || err == Errno::AGAIN) && *retries < MAX_RETRIES {
        *retries += 1;
        Ok(())
    } else {
        Err(err.into())
    }
}

fn retry_interrupted(mut call: impl FnMut() -> rustix::io::Result<()>) -> io::Result<()> {
    let mut retries = 0;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(err) => retry_or_fail(err, &mut retries)?,
        }
    }
}
