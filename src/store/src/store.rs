//! `Store`: request validation, the in-flight limit, durability rules and zeroing
//! fallbacks, in front of whichever engine runs.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{oneshot, Semaphore};
use tracing::info;

use crate::aio::{AioRead, AioReader};
use crate::buf::{AlignedBuf, WriteBuf};
use crate::config::{EngineKind, StoreConfig};
use crate::durability::{open_sync_files, Durability, SyncLease, MAIN_FILE_INDEX};
use crate::engine::{Engine, FallocMode, Op, Request, MAX_WRITE_PIECES};
use crate::error::StoreError;
use crate::fault::{FaultPoint, Faults};
use crate::nowait;
use crate::open::{open_backing, open_direct_read_file, SECTOR_BYTES};

/// Zeroes are written in pieces of at most this many bytes when the filesystem cannot
/// zero a range itself.
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// A backing store: a regular file or a block device, with an I/O engine.
///
/// Cheap to clone (an `Arc` inside); all clones share one engine. The futures of its
/// methods are `Send` and need no tokio runtime of the store's own. Dropping the last
/// clone, or calling [`Store::close`], stops the engine after in-flight work finishes.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Declared first so it is dropped (threads joined) before anything else.
    engine: Engine,
    /// With io_uring and buffered I/O: the pool that reads what the page cache misses
    /// (see `StoreConfig::buffered_reads_on_pool`).
    read_engine: Option<Engine>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    flush_group: FlushGroup,
    /// The store's files (the main description first); the engine holds them too.
    files: Arc<[File]>,
    /// Whether buffered reads try the inline RWF_NOWAIT path first.
    inline_nowait: bool,
    /// Set by `close`: the inline paths then refuse, as the stopped engine does.
    closed: AtomicBool,
    /// Largest buffered plain write done inline; non-zero also inlines the fdatasync.
    inline_sync_max_bytes: usize,
    /// Largest buffered write whose writeback starts right after it (0: none).
    early_writeback_max_bytes: usize,
    durability: Arc<Durability>,
    zeroing: ZeroingSupport,
    faults: Faults,
    /// Tests only: the change log a simulated power cut undoes.
    volatile: Option<crate::volatile::Volatile>,
    path: PathBuf,
    size_bytes: u64,
    read_only: bool,
    direct_io: bool,
    /// The O_DIRECT read description (see `StoreConfig::direct_reads`): its index in
    /// `files` and the alignment its reads need.
    direct_read: Option<DirectRead>,
    /// Native AIO for the O_DIRECT reads (see `StoreConfig::aio_reads`).
    aio: Option<AioReader>,
    /// Cleared when cachestat(2) fails (kernels before 6.5): direct reads then never
    /// look in the page cache.
    cachestat_works: AtomicBool,
    io_align_bytes: u64,
    is_block_device: bool,
    zero_range_fast: bool,
    max_request_bytes: usize,
}

/// Where aligned reads go when `StoreConfig::direct_reads` is on.
#[derive(Debug, Clone, Copy)]
struct DirectRead {
    file_index: usize,
    align_bytes: u64,
}

/// The state of group commit.
///
/// - `changes` counts store changes (writes, vectored writes, fallocates) that have
///   completed in the kernel, successful or not; it is raised after the change
///   completes and before its caller hears of it.
/// - `synced` is the highest `changes` value read just before an fdatasync that then
///   succeeded started: every change counted up to it is durable.
/// - `turn` lets one fdatasync run at a time; the flushes queued behind it usually
///   find themselves covered when they get it.
///
/// A flush reads `changes` when it is requested: every change it must cover is
/// counted by then. If `synced` has reached that value, a successful fdatasync that
/// started after all of them completed has already made them durable, and the flush
/// returns without one (a FLUSH that follows another with no write between them,
/// which fio and file systems send often); otherwise it runs its own.
///
/// `changes` starts at 1, `synced` at 0: the first flush of a store always runs an
/// fdatasync, which covers what an earlier process left in the page cache (a node
/// that stopped as Primary flushes at start for exactly that) and the file's set-up.
#[derive(Debug)]
struct FlushGroup {
    requested: AtomicU64,
    changes: Arc<AtomicU64>,
    synced: AtomicU64,
    issued: AtomicU64,
    turn: tokio::sync::Mutex<()>,
}

impl Default for FlushGroup {
    fn default() -> FlushGroup {
        FlushGroup {
            requested: AtomicU64::new(0),
            changes: Arc::new(AtomicU64::new(1)),
            synced: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl FlushGroup {
    /// Counts a change that has just completed (see the type's comment).
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
}

/// Which fallocate modes the filesystem may still support: cleared on the first
/// EOPNOTSUPP, so that later requests skip straight to what works.
#[derive(Debug)]
struct ZeroingSupport {
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
}

impl ZeroingSupport {
    fn flag(&self, mode: FallocMode) -> &AtomicBool {
        match mode {
            FallocMode::PunchHole => &self.punch_hole,
            FallocMode::ZeroRange => &self.zero_range,
        }
    }

    fn may_work(&self, mode: FallocMode) -> bool {
        self.flag(mode).load(Ordering::Relaxed)
    }

    /// Returns true the first time `mode` is found unsupported.
    fn mark_unsupported(&self, mode: FallocMode) -> bool {
        self.flag(mode).swap(false, Ordering::Relaxed)
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("engine", &self.engine_kind())
            .field("size_bytes", &self.inner.size_bytes)
            .field("read_only", &self.inner.read_only)
            .field("direct_io", &self.inner.direct_io)
            .field("poisoned", &self.is_poisoned())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating a regular file if configured) and starts the engine.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        cfg.validate().map_err(StoreError::InvalidConfig)?;
        let backing = open_backing(cfg)?;
        let sync_file_count = if cfg.read_only {
            0
        } else {
            cfg.max_sync_in_flight
        };
        let sync_files = open_sync_files(&cfg.path, &backing.file, cfg.direct_io, sync_file_count)
            .map_err(|source| StoreError::Open {
                path: cfg.path.clone(),
                source,
            })?;
        let direct_read_file = if cfg.direct_reads && !cfg.direct_io {
            open_direct_read_file(&cfg.path, &backing.file, backing.is_block_device)?
        } else {
            None
        };
        let direct_read = direct_read_file
            .as_ref()
            .map(|(_, align_bytes)| DirectRead {
                file_index: 1 + sync_file_count,
                align_bytes: *align_bytes,
            });
        let files: Arc<[File]> = std::iter::once(backing.file)
            .chain(sync_files)
            .chain(direct_read_file.map(|(file, _)| file))
            .collect();
        let engine = Engine::start(cfg, Arc::clone(&files))?;
        let aio = match direct_read {
            Some(direct) if cfg.aio_reads => {
                match AioReader::start(Arc::clone(&files), direct.file_index, cfg.max_in_flight) {
                    Ok(aio) => Some(aio),
                    Err(reason) => {
                        info!(%reason, "direct reads go through the engine, not native AIO");
                        None
                    }
                }
            }
            _ => None,
        };
        let read_engine =
            if cfg.buffered_reads_on_pool && !cfg.direct_io && engine.kind() == EngineKind::Uring {
                info!(
                    threads = cfg.pool_threads,
                    "reads that miss the page cache use a thread pool beside the ring"
                );
                Some(Engine::start_pool(cfg, Arc::clone(&files))?)
            } else {
                None
            };
        info!(
            path = %cfg.path.display(),
            engine = %engine.kind(),
            size_bytes = backing.size_bytes,
            block_device = backing.is_block_device,
            read_only = cfg.read_only,
            direct_io = cfg.direct_io,
            direct_reads = direct_read.is_some(),
            aio_reads = aio.is_some(),
            "backing store opened with the {} engine",
            engine.kind()
        );
        Ok(Store {
            inner: Arc::new(Inner {
                engine,
                read_engine,
                in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
                max_in_flight: cfg.max_in_flight,
                flush_group: FlushGroup::default(),
                files,
                inline_nowait: cfg.inline_nowait && !cfg.direct_io,
                closed: AtomicBool::new(false),
                inline_sync_max_bytes: if cfg.direct_io {
                    0
                } else {
                    cfg.inline_sync_max_bytes
                },
                early_writeback_max_bytes: if cfg.direct_io {
                    0
                } else {
                    cfg.early_writeback_max_bytes
                },
                durability: Arc::new(Durability::new(sync_file_count)),
                zeroing: ZeroingSupport {
                    punch_hole: AtomicBool::new(true),
                    zero_range: AtomicBool::new(true),
                },
                faults: Faults::default(),
                volatile: cfg.volatile_for_tests.then(Default::default),
                path: cfg.path.clone(),
                size_bytes: backing.size_bytes,
                read_only: cfg.read_only,
                direct_io: cfg.direct_io,
                direct_read,
                aio,
                cachestat_works: AtomicBool::new(true),
                io_align_bytes: backing.io_align_bytes,
                is_block_device: backing.is_block_device,
                zero_range_fast: backing.zero_range_fast,
                max_request_bytes: cfg.max_request_bytes,
            }),
        })
    }

    /// The engine that runs this store.
    pub fn engine_kind(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// Size in bytes (a multiple of 512).
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    /// Whether the store was opened read-only.
    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Whether the store was opened with O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.inner.direct_io
    }

    /// Whether O_DIRECT reads are submitted with native AIO (see
    /// `StoreConfig::aio_reads`).
    pub fn aio_reads(&self) -> bool {
        self.inner.aio.is_some()
    }

    /// Reads answered through native AIO so far (`pairbd status --json`, tests).
    pub fn aio_reads_done(&self) -> u64 {
        self.inner.aio.as_ref().map_or(0, AioReader::reads_done)
    }

    /// Whether aligned reads bypass the page cache through an O_DIRECT description
    /// while writes stay buffered (`StoreConfig::direct_reads`, where the filesystem
    /// allows it).
    pub fn direct_reads(&self) -> bool {
        self.inner.direct_read.is_some()
    }

    /// Alignment every request's offset and length must have: the O_DIRECT alignment
    /// of the file or device, or 1 without O_DIRECT.
    pub fn io_alignment(&self) -> u64 {
        self.inner.io_align_bytes
    }

    /// Whether the store is a block device (else a regular file).
    pub fn is_block_device(&self) -> bool {
        self.inner.is_block_device
    }

    /// The configured path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Longest single read or write accepted.
    pub fn max_request_bytes(&self) -> usize {
        self.inner.max_request_bytes
    }

    /// Operations currently holding an in-flight slot (at most `max_in_flight`).
    pub fn in_flight_ops(&self) -> usize {
        self.inner.max_in_flight - self.inner.in_flight.available_permits()
    }

    /// Whether a flush or FUA write has failed since the store was opened; if so every
    /// flush and FUA write fails with `StoreError::Poisoned` until it is reopened.
    pub fn is_poisoned(&self) -> bool {
        self.inner.durability.is_poisoned()
    }

    /// Reads `len` bytes at `offset`. Parts of a regular file past its end (inside the
    /// store's size) read as zeroes.
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, StoreError> {
        self.check_transfer(offset, len)?;
        if len == 0 {
            return Ok(AlignedBuf::zeroed(0));
        }
        if let Some(file_index) = self.direct_read_file(offset, len) {
            // From the page cache only where cachestat finds every page there (say,
            // a block written moments ago): a RWF_NOWAIT read that misses would start
            // a buffered read of the range, which the O_DIRECT read would repeat.
            if self.inline_read_allowed() && self.fully_cached(offset, len) {
                let mut buf = AlignedBuf::for_overwrite(len);
                if nowait::try_read(&self.inner.files[MAIN_FILE_INDEX], offset, &mut buf)? == len {
                    return Ok(buf);
                }
            }
            if let Some(aio) = self.aio_allowed() {
                let permit = Arc::clone(&self.inner.in_flight)
                    .acquire_owned()
                    .await
                    .map_err(|_| StoreError::EngineStopped)?;
                match aio.read(offset, len, permit).await {
                    AioRead::Done(buf) => return Ok(buf),
                    AioRead::Failed(err) => return Err(StoreError::Io(err)),
                    // Refused without blocking, short, or EINVAL: the engine below.
                    AioRead::Retry => {}
                }
            }
            let buf = AlignedBuf::for_overwrite(len);
            match self
                .engine_read(&self.inner.engine, offset, buf, Some(file_index))
                .await
            {
                // O_DIRECT refused this one (say, a short read at the end of a file
                // whose length is not aligned): read it through the cache below.
                Err(StoreError::Io(err)) if err.raw_os_error() == Some(libc::EINVAL) => {}
                result => return result,
            }
        }
        // The engine fills every byte (zeroes past the end of a short file).
        let mut buf = AlignedBuf::for_overwrite(len);
        if self.inline_read_allowed()
            && nowait::try_read(&self.inner.files[0], offset, &mut buf)? == len
        {
            return Ok(buf);
        }
        let engine = self
            .inner
            .read_engine
            .as_ref()
            .unwrap_or(&self.inner.engine);
        self.engine_read(engine, offset, buf, None).await
    }

    /// The O_DIRECT read description's index, if there is one and the read is aligned
    /// for it (see `StoreConfig::direct_reads`).
    fn direct_read_file(&self, offset: u64, len: usize) -> Option<usize> {
        let direct = self.inner.direct_read?;
        (offset % direct.align_bytes == 0 && len as u64 % direct.align_bytes == 0)
            .then_some(direct.file_index)
    }

    /// Fills `buf` from `offset` on `engine`, through the description at
    /// `direct_read_file` if given (else the main one).
    async fn engine_read(
        &self,
        engine: &Engine,
        offset: u64,
        buf: AlignedBuf,
        direct_read_file: Option<usize>,
    ) -> Result<AlignedBuf, StoreError> {
        match self
            .execute_request(engine, Op::Read { offset, buf }, None, direct_read_file)
            .await?
        {
            Op::Read { buf, .. } => Ok(buf),
            other => unreachable!("the engine answered a read with {}", other.name()),
        }
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable when this returns Ok
    /// (buffered: a plain write, then a group-commit flush; O_DIRECT: RWF_DSYNC);
    /// without, only after a later successful [`Store::flush`].
    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), StoreError> {
        self.write_buf(offset, WriteBuf::Owned(data), fua).await
    }

    /// Like [`Store::write`], for a payload that someone else (say, the replication
    /// sender) holds too; it is not copied.
    pub async fn write_shared(
        &self,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.write_buf(offset, WriteBuf::Shared(data), fua).await
    }

    async fn write_buf(&self, offset: u64, buf: WriteBuf, fua: bool) -> Result<(), StoreError> {
        if fua && !self.inner.direct_io {
            // Buffered FUA rides on group commit: the plain write completes, then a
            // flush requested after that covers it. FUA writes and FLUSHes that
            // arrive together share one fdatasync, where RWF_DSYNC would run one
            // per write. (With O_DIRECT, RWF_DSYNC stays: the device does the FUA
            // write in one command, no cache flush of everything else.)
            self.write_once(offset, buf, false).await?;
            return self.flush().await;
        }
        self.write_once(offset, buf, fua).await
    }

    /// One store write: plain, or (O_DIRECT only) with RWF_DSYNC.
    async fn write_once(&self, offset: u64, buf: WriteBuf, fua: bool) -> Result<(), StoreError> {
        self.check_writable()?;
        self.check_transfer(offset, buf.len())?;
        let sync = if fua {
            Some(self.sync_lease().await?)
        } else {
            None
        };
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(v) = &self.inner.volatile {
            let file = &self.inner.files[0];
            if fua {
                v.before_fua(offset, &buf).map_err(StoreError::Io)?;
            } else {
                v.before_change(file, offset, buf.len() as u64)
                    .map_err(StoreError::Io)?;
            }
        }
        if !fua && self.inline_write_allowed(buf.len()) {
            // Like an engine write, a failed plain write does not poison the store: it
            // claimed no durability.
            let file = &self.inner.files[0];
            let written = if buf.len() <= nowait::SMALL_WRITE_BYTES {
                nowait::write_all(file, offset, &buf)
            } else {
                nowait::blocking(|| nowait::write_all(file, offset, &buf))
            };
            self.inner.flush_group.changed();
            if written.is_ok() {
                self.start_writeback(offset, buf.len());
            }
            return written.map_err(StoreError::Io);
        }
        self.execute(Op::Write { offset, buf, fua }, sync).await?;
        Ok(())
    }

    /// Writes `bufs` back to back from `offset` as one store write (`pwritev2`, or
    /// IORING_OP_WRITEV): adjacent writes merged into one. Never FUA; like a plain
    /// [`Store::write`] it is durable only after a later successful [`Store::flush`], a
    /// failure does not poison the store, and a power cut before that flush may keep or
    /// lose each of its blocks independently, as for separate writes. Each buffer must
    /// keep the store's O_DIRECT alignment on its own (every [`AlignedBuf`] starts
    /// aligned; its length must be a multiple of [`Store::io_alignment`]); at most
    /// [`MAX_WRITE_PIECES`] buffers; the total is bounded like one write's length.
    pub async fn write_vectored_shared(
        &self,
        offset: u64,
        bufs: Vec<Arc<AlignedBuf>>,
    ) -> Result<(), StoreError> {
        self.check_writable()?;
        if bufs.is_empty() || bufs.len() > MAX_WRITE_PIECES {
            return Err(StoreError::TooManyPieces {
                pieces: bufs.len(),
                max: MAX_WRITE_PIECES,
            });
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.check_transfer(offset, total)?;
        let mut at = offset;
        for buf in &bufs {
            self.check_alignment(at, buf.len() as u64)?;
            at += buf.len() as u64;
        }
        if total == 0 {
            return Ok(());
        }
        if let Some(v) = &self.inner.volatile {
            v.before_change(&self.inner.files[0], offset, total as u64)
                .map_err(StoreError::Io)?;
        }
        let bufs: Vec<WriteBuf> = bufs.into_iter().map(WriteBuf::Shared).collect();
        if self.inline_write_allowed(total) {
            let file = &self.inner.files[0];
            let written = if total <= nowait::SMALL_WRITE_BYTES {
                nowait::write_vectored_all(file, offset, &bufs)
            } else {
                nowait::blocking(|| nowait::write_vectored_all(file, offset, &bufs))
            };
            self.inner.flush_group.changed();
            if written.is_ok() {
                self.start_writeback(offset, total);
            }
            return written.map_err(StoreError::Io);
        }
        self.execute(Op::WriteVectored { offset, bufs }, None)
            .await?;
        Ok(())
    }

    /// Makes every write that completed before this call durable (fdatasync). After a
    /// failure the store is poisoned. A no-op on a read-only store.
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.inner.read_only {
            return Ok(());
        }
        // Group commit: flushes that arrive while an fdatasync runs are all served by
        // the next single fdatasync. A flush is covered by any fdatasync that *starts*
        // after the flush was requested, because every write it must cover completed
        // before the request.
        let group = &self.inner.flush_group;
        group.requested.fetch_add(1, Ordering::SeqCst);
        let must_cover = group.changes.load(Ordering::SeqCst);
        let _turn = group.turn.lock().await;
        // A closed or poisoned store fails every flush, covered or not.
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::EngineStopped);
        }
        if self.inner.durability.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        if group.synced.load(Ordering::SeqCst) >= must_cover {
            return Ok(());
        }
        // Read before the fdatasync starts (and before the test-only watermark): it
        // counts only changes that completed before then, which the fdatasync covers.
        let covers = group.changes.load(Ordering::SeqCst);
        let watermark = self.inner.volatile.as_ref().map(|v| v.flush_started());
        let sync = self.sync_lease().await?;
        group.issued.fetch_add(1, Ordering::Relaxed);
        if self.inline_flush_allowed() {
            // Group commit holds `turn`, so at most one thread per store blocks here.
            let file = &self.inner.files[sync.file_index()];
            if let Err(err) = nowait::blocking_briefly(|| nowait::fdatasync(file)) {
                // Poison before the lease is released, as the engine does.
                sync.durability().poison("flush", &err);
                return Err(StoreError::Io(err));
            }
            drop(sync);
        } else {
            self.execute(Op::Flush, Some(sync)).await?;
        }
        if let (Some(v), Some(w)) = (&self.inner.volatile, watermark) {
            v.flushed(w).map_err(StoreError::Io)?;
        }
        // Only a successful fdatasync covers anyone: after a failure the store is
        // poisoned and every later flush fails.
        group.synced.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    /// Tests only: a simulated power cut of a store opened with
    /// `volatile_for_tests` — unflushed changes are kept, lost or torn by
    /// `seed`, the result made durable, and every later change fails. The
    /// caller is expected to end the process, as a power cut does.
    #[doc(hidden)]
    pub fn power_cut(&self, seed: u64) -> Result<crate::PowerCutReport, StoreError> {
        let Some(v) = &self.inner.volatile else {
            return Err(StoreError::InvalidConfig(
                "power_cut needs a store opened with volatile_for_tests".into(),
            ));
        };
        v.power_cut(&self.inner.files[0], seed)
            .map_err(StoreError::Io)
    }

    /// How many fdatasyncs `flush` has issued (fewer than flushes requested when group
    /// commit served several with one).
    pub fn fdatasyncs_issued(&self) -> u64 {
        self.inner.flush_group.issued.load(Ordering::Relaxed)
    }

    /// How many flushes were requested of `flush` (each served by one of the
    /// [`Store::fdatasyncs_issued`], or failed).
    pub fn flushes_requested(&self) -> u64 {
        self.inner.flush_group.requested.load(Ordering::Relaxed)
    }

    /// Deallocates a range, which then reads as zeroes (fallocate PUNCH_HOLE, falling
    /// back to ZERO_RANGE, then to writing zeroes). Durable after a later flush.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.zero_range(offset, len, false, false).await
    }

    /// Makes a range read as zeroes. `keep_allocated` keeps its blocks allocated
    /// (ZERO_RANGE) instead of punching a hole. With `fast_only`, fails with
    /// `StoreError::NotSupported` instead of falling back to writing zeroes. Durable
    /// after a later flush.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
    ) -> Result<(), StoreError> {
        self.zero_range(offset, len, keep_allocated, fast_only)
            .await
    }

    /// Stops the engine after the work already queued or in flight has finished, and
    /// waits (without blocking a runtime thread) until its threads have exited and the
    /// file is closed. Other clones of this store then fail with `EngineStopped`.
    pub async fn close(self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.in_flight.close();
        self.inner.durability.close();
        if let Some(aio) = &self.inner.aio {
            aio.stop().await;
        }
        self.inner.engine.stop().await;
        if let Some(read_engine) = &self.inner.read_engine {
            read_engine.stop().await;
        }
    }

    /// Makes the next `count` operations of kind `point` fail with `errno` without
    /// reaching the disk, as if the kernel had returned it. For tests.
    #[doc(hidden)]
    pub fn inject_errors(&self, point: FaultPoint, count: u32, errno: i32) {
        self.inner.faults.arm(point, count, errno);
    }

    async fn zero_range(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
    ) -> Result<(), StoreError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.check_alignment(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(v) = &self.inner.volatile {
            v.before_change(&self.inner.files[0], offset, len)
                .map_err(StoreError::Io)?;
        }
        // fallocate on a block device works on whole sectors only.
        let fallocate_possible =
            !self.inner.is_block_device || (offset % SECTOR_BYTES == 0 && len % SECTOR_BYTES == 0);
        let modes: &[FallocMode] = if keep_allocated {
            &[FallocMode::ZeroRange]
        } else {
            &[FallocMode::PunchHole, FallocMode::ZeroRange]
        };
        for &mode in modes.iter().filter(|_| fallocate_possible) {
            if !self.inner.zeroing.may_work(mode) {
                continue;
            }
            // On a block device without a write-zeroes command, the kernel's ZERO_RANGE
            // writes zero pages itself: correct, but not fast.
            if fast_only && mode == FallocMode::ZeroRange && !self.inner.zero_range_fast {
                continue;
            }
            match self
                .execute(Op::Fallocate { offset, len, mode }, None)
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Io(err)) if is_unsupported(&err) => {
                    if self.inner.zeroing.mark_unsupported(mode) {
                        info!(
                            path = %self.inner.path.display(),
                            mode = ?mode,
                            "fallocate mode not supported here; falling back"
                        );
                    }
                }
                Err(err) => return Err(err),
            }
        }
        if fast_only {
            return Err(StoreError::NotSupported);
        }
        self.write_zero_chunks(offset, len).await
    }

    /// The last resort: write zero buffers, one chunk at a time, reusing one buffer.
    async fn write_zero_chunks(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        // With O_DIRECT, len is aligned and ZERO_CHUNK_BYTES is a multiple of any
        // alignment up to 4096, so every chunk stays aligned.
        let chunk_bytes = len.min(ZERO_CHUNK_BYTES as u64) as usize;
        let mut buf = AlignedBuf::zeroed(chunk_bytes);
        let mut done = 0u64;
        while done < len {
            let part = (len - done).min(chunk_bytes as u64) as usize;
            buf.truncate(part);
            let op = Op::Write {
                offset: offset + done,
                buf: WriteBuf::Owned(buf),
                fua: false,
            };
            buf = match self.execute(op, None).await? {
                Op::Write {
                    buf: WriteBuf::Owned(buf),
                    ..
                } => buf,
                other => unreachable!("the engine answered a write with {}", other.name()),
            };
            done += part as u64;
        }
        Ok(())
    }

    // When a request runs on the caller's thread instead of the engine (see `nowait`).
    // All three stand aside while a fault is armed, so that every request of a fault
    // test meets the injection point in `execute_on`.

    /// Whether cachestat(2) finds every page of the range in the page cache; false
    /// (from then on) where there is no cachestat.
    fn fully_cached(&self, offset: u64, len: usize) -> bool {
        if !self.inner.cachestat_works.load(Ordering::Relaxed) {
            return false;
        }
        match nowait::fully_cached(&self.inner.files[MAIN_FILE_INDEX], offset, len as u64) {
            Ok(cached) => cached,
            Err(err) => {
                // No cachestat here (before Linux 6.5, a seccomp filter, a file
                // system without a page cache): never ask again.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
                ) {
                    self.inner.cachestat_works.store(false, Ordering::Relaxed);
                }
                false
            }
        }
    }

    /// An O_DIRECT read first tries native AIO.
    fn aio_allowed(&self) -> Option<&AioReader> {
        self.inner
            .aio
            .as_ref()
            .filter(|aio| aio.running() && !self.inner.faults.any_armed())
    }

    /// A buffered read first tries RWF_NOWAIT from the page cache.
    fn inline_read_allowed(&self) -> bool {
        self.inner.inline_nowait && !self.inner.faults.any_armed()
    }

    /// After a small buffered write: asks the kernel to start writing its pages to the
    /// disk now (sync_file_range(SYNC_FILE_RANGE_WRITE), which does not wait), so the
    /// FLUSH that usually follows finds them written or on their way instead of
    /// starting their writeback itself (see `StoreConfig::early_writeback_max_bytes`).
    /// A hint only: it promises nothing, and its failure is ignored: it reports no
    /// writeback error, and every flush still runs fdatasync on its own description.
    fn start_writeback(&self, offset: u64, len: usize) {
        if len == 0 || len > self.inner.early_writeback_max_bytes {
            return;
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        let fd = self.inner.files[MAIN_FILE_INDEX].as_raw_fd();
        // SAFETY: sync_file_range reads no memory of ours; `fd` is open for the
        // store's lifetime.
        unsafe {
            libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// A buffered plain (non-FUA) write of `len` bytes is written right here.
    fn inline_write_allowed(&self, len: usize) -> bool {
        len <= self.inner.inline_sync_max_bytes && !self.inner.faults.any_armed()
    }

    /// The group-commit fdatasync runs right here (whenever inline writes are on: both
    /// save the same two thread hand-offs).
    fn inline_flush_allowed(&self) -> bool {
        self.inner.inline_sync_max_bytes > 0 && !self.inner.faults.any_armed()
    }

    /// Runs one op through the engine, holding an in-flight permit until the engine
    /// has completed it (even if this future is dropped first).
    async fn execute(&self, op: Op, sync: Option<SyncLease>) -> Result<Op, StoreError> {
        self.execute_on(&self.inner.engine, op, sync).await
    }

    /// Like `execute`, on a given engine (the main one, or the read pool).
    async fn execute_on(
        &self,
        engine: &Engine,
        op: Op,
        sync: Option<SyncLease>,
    ) -> Result<Op, StoreError> {
        self.execute_request(engine, op, sync, None).await
    }

    /// `execute_on`, with a read sent to the description at `direct_read_file`.
    async fn execute_request(
        &self,
        engine: &Engine,
        op: Op,
        sync: Option<SyncLease>,
        direct_read_file: Option<usize>,
    ) -> Result<Op, StoreError> {
        let permit = Arc::clone(&self.inner.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::EngineStopped)?;
        if let Some(err) = self.inner.faults.take(&op) {
            if sync.is_some() {
                self.inner.durability.poison(op.name(), &err);
            }
            return Err(StoreError::Io(err));
        }
        let (reply, result) = oneshot::channel();
        // A change is counted by the engine when it completes, before its result is
        // sent, even if this future has been dropped by then.
        let changes = (!matches!(op, Op::Read { .. } | Op::Flush))
            .then(|| Arc::clone(&self.inner.flush_group.changes));
        let request = Request {
            op,
            reply,
            permit,
            sync,
            direct_read_file,
            changes,
        };
        if engine.submit(request).is_err() {
            return Err(StoreError::EngineStopped);
        }
        match result.await {
            Ok(Ok(op)) => Ok(op),
            Ok(Err(err)) => Err(StoreError::Io(err)),
            // The engine dropped the request: it stopped before running it.
            Err(_) => Err(StoreError::EngineStopped),
        }
    }

    /// A sync description for a flush or FUA write, checking the poison flag only
    /// after the lease is held (see `durability`).
    async fn sync_lease(&self) -> Result<SyncLease, StoreError> {
        let lease = self
            .inner
            .durability
            .lease()
            .await
            .ok_or(StoreError::EngineStopped)?;
        if self.inner.durability.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        Ok(lease)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.inner.read_only {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn check_transfer(&self, offset: u64, len: usize) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::EngineStopped);
        }
        if len > self.inner.max_request_bytes {
            return Err(StoreError::TooLarge {
                len: len as u64,
                max_bytes: self.inner.max_request_bytes as u64,
            });
        }
        self.check_range(offset, len as u64)?;
        self.check_alignment(offset, len as u64)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size_bytes => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size_bytes: self.inner.size_bytes,
            }),
        }
    }

    fn check_alignment(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let align_bytes = self.inner.io_align_bytes;
        if offset % align_bytes != 0 || len % align_bytes != 0 {
            return Err(StoreError::Unaligned {
                offset,
                len,
                align_bytes,
            });
        }
        Ok(())
    }
}

/// EOPNOTSUPP (the same value as ENOTSUP on Linux), or ENOSYS from ancient kernels.
fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time check: every future the store returns can move between threads.
    #[allow(dead_code)]
    fn futures_are_send(store: &Store) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&store.read(0, 0));
        is_send(&store.write(0, AlignedBuf::zeroed(0), false));
        is_send(&store.write_shared(0, Arc::new(AlignedBuf::zeroed(0)), true));
        is_send(&store.write_vectored_shared(0, Vec::new()));
        is_send(&store.flush());
        is_send(&store.discard(0, 0));
        is_send(&store.write_zeroes(0, 0, false, false));
        is_send(&store.clone().close());
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<Store>();
    }

    /// A store on a temp file with one completed (unflushed) write.
    async fn store_with_one_write() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = StoreConfig::new(dir.path().join("group.img"));
        cfg.create_size_bytes = Some(1 << 20);
        let store = Store::open(&cfg).expect("open");
        store
            .write(0, AlignedBuf::from_slice(&[1u8; 4096]), false)
            .await
            .expect("write");
        (dir, store)
    }

    /// Buffered FUA writes ride on group commit: 16 FUA writes queued behind a
    /// running fdatasync (the test holds the turn) none of them answered yet, are
    /// all served by the one fdatasync that follows, and each reads back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_fua_writes_share_one_fdatasync() {
        let (_dir, store) = store_with_one_write().await;
        let turn = store.inner.flush_group.turn.lock().await;
        let mut writes = Vec::new();
        for i in 0..16u8 {
            let store = store.clone();
            writes.push(tokio::spawn(async move {
                let data = AlignedBuf::from_slice(&[i + 1; 4096]);
                store.write(u64::from(i) * 4096 + 8192, data, true).await
            }));
        }
        while store.inner.flush_group.requested.load(Ordering::SeqCst) < 16 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            store.fdatasyncs_issued(),
            0,
            "a FUA write synced on its own"
        );
        drop(turn);
        for w in writes {
            w.await.expect("join").expect("FUA write");
        }
        assert_eq!(store.fdatasyncs_issued(), 1);
        assert_eq!(store.flushes_requested(), 16);
        for i in 0..16u8 {
            let got = store
                .read(u64::from(i) * 4096 + 8192, 4096)
                .await
                .expect("read");
            assert!(
                got.as_ref().iter().all(|&b| b == i + 1),
                "FUA write {i} lost"
            );
        }
        store.close().await;
    }

    /// Holds the group-commit turn while `count` flushes register behind it, then
    /// releases it; returns the flushes' join handles.
    async fn flushes_queued_behind_the_turn(
        store: &Store,
        count: u64,
    ) -> Vec<tokio::task::JoinHandle<Result<(), StoreError>>> {
        let turn = store.inner.flush_group.turn.lock().await;
        let mut flushes = Vec::new();
        for _ in 0..count {
            let store = store.clone();
            flushes.push(tokio::spawn(async move { store.flush().await }));
        }
        while store.inner.flush_group.requested.load(Ordering::SeqCst) < count {
            tokio::task::yield_now().await;
        }
        drop(turn);
        flushes
    }

    /// Flushes that queue behind a running fdatasync are all served by the next one:
    /// while the test holds the turn, 32 flushes register; releasing it lets exactly
    /// one fdatasync cover them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_flushes_share_one_fdatasync() {
        let (_dir, store) = store_with_one_write().await;
        let flushes = flushes_queued_behind_the_turn(&store, 32).await;
        for flush in flushes {
            flush.await.expect("join").expect("flush");
        }
        assert_eq!(store.fdatasyncs_issued(), 1);
        // No change since that fdatasync started: the next flush needs none.
        store.flush().await.expect("flush");
        assert_eq!(store.fdatasyncs_issued(), 1);
        // After a write, a flush runs its own.
        store
            .write(4096, AlignedBuf::from_slice(&[2u8; 4096]), false)
            .await
            .expect("write");
        store.flush().await.expect("flush");
        assert_eq!(store.fdatasyncs_issued(), 2);
        store.close().await;
    }

    /// Every kind of change counts for group commit: after a discard, a zeroing, a
    /// merged write and a FUA write (through the engine, or inline) a flush finds
    /// them covered only by an fdatasync that started after them; with no change in
    /// between, a flush runs none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_change_needs_a_new_fdatasync() {
        /// Checks that `change` made the next flush run an fdatasync and the one
        /// after it none.
        async fn flushes_after(store: &Store, name: &str, change: Result<(), StoreError>) {
            change.expect(name);
            let before = store.fdatasyncs_issued();
            store.flush().await.expect("flush");
            let after = store.fdatasyncs_issued();
            // A buffered FUA write has already run its own fdatasync.
            if name != "FUA write" {
                assert_eq!(after, before + 1, "no fdatasync after a {name}");
            }
            store.flush().await.expect("flush");
            assert_eq!(
                store.fdatasyncs_issued(),
                after,
                "an idle flush synced after a {name}"
            );
        }
        let (_dir, store) = store_with_one_write().await;
        store.flush().await.expect("flush");
        assert_eq!(store.fdatasyncs_issued(), 1);
        let discard = store.discard(0, 4096).await;
        flushes_after(&store, "discard", discard).await;
        let zeroes = store.write_zeroes(8192, 4096, true, false).await;
        flushes_after(&store, "zeroing", zeroes).await;
        let bufs = vec![
            Arc::new(AlignedBuf::from_slice(&[3u8; 4096])),
            Arc::new(AlignedBuf::from_slice(&[5u8; 4096])),
        ];
        let merged = store.write_vectored_shared(16384, bufs).await;
        flushes_after(&store, "merged write", merged).await;
        let before = store.fdatasyncs_issued();
        let fua = store
            .write(32768, AlignedBuf::from_slice(&[4u8; 4096]), true)
            .await;
        assert_eq!(
            store.fdatasyncs_issued(),
            before + 1,
            "FUA without fdatasync"
        );
        flushes_after(&store, "FUA write", fua).await;
        store.close().await;
    }

    /// The first flush of a store runs an fdatasync even with no write of its own:
    /// it must cover what an earlier process left in the page cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_flush_always_syncs() {
        let (dir, store) = store_with_one_write().await;
        store.close().await;
        // Reopened: dirty pages of the earlier store may still be in the cache.
        let mut cfg = StoreConfig::new(dir.path().join("group.img"));
        cfg.create_size_bytes = None;
        let store = Store::open(&cfg).expect("reopen");
        store.flush().await.expect("flush");
        assert_eq!(
            store.fdatasyncs_issued(),
            1,
            "the first flush skipped fdatasync"
        );
        store.flush().await.expect("flush");
        assert_eq!(store.fdatasyncs_issued(), 1);
        store.close().await;
    }

    /// A poisoned store fails every flush, also one with no change to cover.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poisoned_store_fails_even_an_idle_flush() {
        let (_dir, store) = store_with_one_write().await;
        store.inject_errors(FaultPoint::Flush, 1, libc::EIO);
        assert!(store.flush().await.is_err());
        assert!(store.is_poisoned());
        assert!(
            matches!(store.flush().await, Err(StoreError::Poisoned)),
            "an idle flush of a poisoned store succeeded"
        );
        store.close().await;
    }

    /// A failed fdatasync covers nobody: every flush queued behind it fails too (the
    /// store is poisoned), none is answered as if the failed one had covered it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_flushes_behind_a_failed_fdatasync_all_fail() {
        let (_dir, store) = store_with_one_write().await;
        store.inject_errors(FaultPoint::Flush, 1, libc::EIO);
        let flushes = flushes_queued_behind_the_turn(&store, 8).await;
        for flush in flushes {
            assert!(
                flush.await.expect("join").is_err(),
                "a flush succeeded after a failed fdatasync"
            );
        }
        assert!(store.is_poisoned());
        assert_eq!(store.inner.flush_group.synced.load(Ordering::SeqCst), 0);
        store.close().await;
    }
}
