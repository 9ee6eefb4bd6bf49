//! The two I/O engines behind one interface.
//!
//! A `Request` carries an `Op` (which owns its buffers), the oneshot on which the
//! result goes back, and the in-flight permit. Engines are thin: they carry an op out
//! fully (looping over short reads and writes) and send the op back with its buffers,
//! or the kernel's error. Validation, poisoning and zeroing fallbacks live in the
//! store layer, identical for both engines.

pub(crate) mod pool;
pub(crate) mod uring;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::fs::FallocateFlags;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::{error, info};

use crate::buf::{AlignedBuf, WriteBuf};
use crate::config::{EngineChoice, EngineKind, StoreConfig};
use crate::durability::{SyncLease, MAIN_FILE_INDEX};
use crate::error::StoreError;

/// The longest single read or write syscall / SQE. Linux caps one transfer at
/// 0x7ffff000 bytes anyway; longer requests are split like short transfers.
pub(crate) const MAX_TRANSFER_BYTES: usize = 1 << 30;

/// The most buffers one vectored write may gather: Linux's `IOV_MAX`, the most one
/// `pwritev2` (or IORING_OP_WRITEV) takes.
pub const MAX_WRITE_PIECES: usize = 1024;

/// How often an op may be retried after EINTR/EAGAIN before it is failed.
pub(crate) const MAX_RETRIES: u32 = 64;

/// Which fallocate(2) mode to run; both keep the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FallocMode {
    /// FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: deallocates; reads back zeroes.
    PunchHole,
    /// FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE: zeroes and keeps blocks allocated.
    ZeroRange,
}

impl FallocMode {
    pub(crate) fn flags(self) -> FallocateFlags {
        match self {
            FallocMode::PunchHole => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            FallocMode::ZeroRange => FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        }
    }
}

/// One operation, owning its buffers for as long as the kernel may use them.
#[derive(Debug)]
pub(crate) enum Op {
    /// Fill `buf` from `offset`; bytes past end-of-file read as zeroes.
    Read { offset: u64, buf: AlignedBuf },
    /// Write all of `buf` at `offset`; durable before completion when `fua`.
    Write {
        offset: u64,
        buf: WriteBuf,
        fua: bool,
    },
    /// Write the buffers back to back from `offset` (a vectored write: merged
    /// adjacent writes), never FUA.
    WriteVectored { offset: u64, bufs: Vec<WriteBuf> },
    /// fdatasync.
    Flush,
    /// fallocate(mode, offset, len).
    Fallocate {
        offset: u64,
        len: u64,
        mode: FallocMode,
    },
}

/// The result an engine sends back: the op with its buffers, or the kernel's error.
pub(crate) type OpResult = io::Result<Op>;

impl Op {
    /// The op's name in logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { fua: true, .. } => "FUA write",
            Op::Write { fua: false, .. } => "write",
            Op::WriteVectored { .. } => "vectored write",
            Op::Flush => "flush",
            Op::Fallocate { .. } => "fallocate",
        }
    }
}

/// The bytes of `bufs` (back to back) from byte `done` on, as at most
/// [`MAX_WRITE_PIECES`] slices: what is left of a vectored write after a short one.
pub(crate) fn remaining_slices(bufs: &[WriteBuf], done: usize) -> Vec<&[u8]> {
    let mut skip = done;
    let mut slices = Vec::with_capacity(bufs.len().min(MAX_WRITE_PIECES));
    for buf in bufs {
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        slices.push(&buf[skip..]);
        skip = 0;
        if slices.len() == MAX_WRITE_PIECES {
            break;
        }
    }
    slices
}

/// The total length of a vectored write's buffers.
pub(crate) fn total_len(bufs: &[WriteBuf]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// An op on its way through an engine.
#[derive(Debug)]
pub(crate) struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<OpResult>,
    /// Held until the op has completed in the kernel, so the in-flight limit counts
    /// ops whose caller has stopped waiting too.
    pub permit: OwnedSemaphorePermit,
    /// For flushes and FUA writes: the description the op must run on.
    pub sync: Option<SyncLease>,
    /// For reads through the store's O_DIRECT read description: its index in the
    /// engine's file table (see `StoreConfig::direct_reads`).
    pub direct_read_file: Option<usize>,
    /// For ops that change the store: the group-commit change counter, raised when
    /// the op completes (successful or not), before the result is sent.
    pub changes: Option<Arc<AtomicU64>>,
}

impl Request {
    /// Index in the engine's file table of the description to run the op on.
    pub(crate) fn file_index(&self) -> usize {
        if let Some(index) = self.direct_read_file {
            return index;
        }
        self.sync
            .as_ref()
            .map_or(MAIN_FILE_INDEX, SyncLease::file_index)
    }

    /// Finishes the request, in this order: a failed sync op poisons the store; the
    /// result goes back (the caller may have gone: then it is dropped); the sync
    /// description and the in-flight permit are released. Poisoning first means no
    /// later sync op can take this description, or return, before the poison is seen.
    pub(crate) fn complete(self, result: io::Result<()>) {
        let Request {
            op,
            reply,
            permit,
            sync,
            direct_read_file: _,
            changes,
        } = self;
        if let (Err(err), Some(lease)) = (&result, &sync) {
            lease.durability().poison(op.name(), err);
        }
        if let Some(changes) = changes {
            changes.fetch_add(1, Ordering::SeqCst);
        }
        let _ = reply.send(result.map(|()| op));
        drop(sync);
        drop(permit);
    }
}

/// The engine threads' handles and exit signals, shared by both engines.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    handles: Mutex<Vec<JoinHandle<()>>>,
    exited: Mutex<Vec<oneshot::Receiver<()>>>,
}

impl Threads {
    /// Spawns a named engine thread. Its exit signal fires when `body` has returned
    /// and everything it owned has been dropped.
    pub(crate) fn spawn(
        &self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        let (exit_tx, exit_rx) = oneshot::channel::<()>();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Declared first, dropped last: fires after `body`'s values are gone.
            let _exit_signal = exit_tx;
            body();
        })?;
        lock(&self.handles).push(handle);
        lock(&self.exited).push(exit_rx);
        Ok(())
    }

    /// Waits without blocking a runtime thread until every engine thread has exited.
    pub(crate) async fn exited(&self) {
        let signals = std::mem::take(&mut *lock(&self.exited));
        for signal in signals {
            // An error means the sender was dropped: the thread is gone either way.
            let _ = signal.await;
        }
    }

    /// Joins every engine thread (blocking), logging a thread that panicked.
    pub(crate) fn join(&self) {
        let handles = std::mem::take(&mut *lock(&self.handles));
        for handle in handles {
            let name = handle.thread().name().unwrap_or("engine").to_owned();
            if handle.join().is_err() {
                error!(thread = %name, "store engine thread panicked");
            }
        }
    }
}

/// Locks `mutex`, also after a panic elsewhere poisoned it (the data it guards stays
/// consistent: no holder panics mid-update).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running engine. Dropping it stops its threads after queued and in-flight work
/// has finished (each engine's `Drop` shuts down and joins).
#[derive(Debug)]
pub(crate) enum Engine {
    Uring(uring::UringEngine),
    Pool(pool::PoolEngine),
}

impl Engine {
    /// Starts the configured engine on `file`. `Auto` tries io_uring and falls back to
    /// the pool when the ring cannot be set up or its probe fails.
    ///
    /// `files` is the file table: the main description at index 0, then the sync
    /// descriptions.
    pub(crate) fn start(cfg: &StoreConfig, files: Arc<[File]>) -> Result<Engine, StoreError> {
        let start_uring = |files| {
            uring::UringEngine::start(files, cfg.uring_entries, cfg.max_in_flight, cfg.direct_io)
        };
        let engine = match cfg.engine {
            EngineChoice::Uring => start_uring(files)
                .map(Engine::Uring)
                .map_err(|source| StoreError::EngineUnavailable { source })?,
            EngineChoice::Pool => Engine::start_pool(cfg, files)?,
            EngineChoice::Auto => match start_uring(Arc::clone(&files)) {
                Ok(engine) => Engine::Uring(engine),
                Err(err) => {
                    info!(error = %err, "io_uring is unavailable; using the thread-pool engine");
                    Engine::start_pool(cfg, files)?
                }
            },
        };
        Ok(engine)
    }

    pub(crate) fn start_pool(cfg: &StoreConfig, files: Arc<[File]>) -> Result<Engine, StoreError> {
        pool::PoolEngine::start(files, cfg.pool_threads, cfg.max_in_flight)
            .map(Engine::Pool)
            .map_err(|source| StoreError::Open {
                path: cfg.path.clone(),
                source,
            })
    }

    pub(crate) fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Pool(_) => EngineKind::Pool,
        }
    }

    /// Hands a request to the engine; gives it back when the engine has stopped.
    pub(crate) fn submit(&self, request: Request) -> Result<(), Request> {
        match self {
            Engine::Uring(engine) => engine.submit(request),
            Engine::Pool(engine) => engine.submit(request),
        }
    }

    /// Asks the engine threads to finish queued and in-flight work, then exit.
    pub(crate) fn shutdown(&self) {
        match self {
            Engine::Uring(engine) => engine.shutdown(),
            Engine::Pool(engine) => engine.shutdown(),
        }
    }

    fn threads(&self) -> &Threads {
        match self {
            Engine::Uring(engine) => engine.threads(),
            Engine::Pool(engine) => engine.threads(),
        }
    }

    /// Waits asynchronously for the threads to exit, then reaps them.
    pub(crate) async fn stop(&self) {
        self.shutdown();
        self.threads().exited().await;
        self.threads().join();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::durability::Durability;

    /// A sync op that fails after its caller stopped waiting still poisons the store,
    /// and only then gives its description back.
    #[tokio::test]
    async fn failed_sync_op_poisons_even_when_nobody_waits() {
        let durability = Arc::new(Durability::new(1));
        let lease = durability.lease().await.expect("lease");
        let permit = Arc::new(Semaphore::new(1))
            .acquire_owned()
            .await
            .expect("permit");
        let (reply, result) = oneshot::channel();
        drop(result);
        let request = Request {
            op: Op::Flush,
            reply,
            permit,
            sync: Some(lease),
            direct_read_file: None,
            changes: None,
        };
        assert_eq!(request.file_index(), 1);
        assert!(!durability.is_poisoned());
        request.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
        assert!(durability.is_poisoned());
        let again = durability.lease().await.expect("the description came back");
        assert_eq!(again.file_index(), 1);
    }

    /// A plain op's failure does not poison; a sync op's success does not either.
    #[tokio::test]
    async fn only_failed_sync_ops_poison() {
        let durability = Arc::new(Durability::new(1));
        let semaphore = Arc::new(Semaphore::new(2));
        let (reply, _result) = oneshot::channel();
        Request {
            op: Op::Flush,
            reply,
            permit: Arc::clone(&semaphore)
                .acquire_owned()
                .await
                .expect("permit"),
            sync: Some(durability.lease().await.expect("lease")),
            direct_read_file: None,
            changes: None,
        }
        .complete(Ok(()));
        let (reply, _result) = oneshot::channel();
        let request = Request {
            op: Op::Read {
                offset: 0,
                buf: AlignedBuf::zeroed(512),
            },
            reply,
            permit: Arc::clone(&semaphore)
                .acquire_owned()
                .await
                .expect("permit"),
            sync: None,
            direct_read_file: None,
            changes: None,
        };
        assert_eq!(request.file_index(), MAIN_FILE_INDEX);
        request.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
        assert!(!durability.is_poisoned());
        assert_eq!(semaphore.available_permits(), 2);
    }
}
