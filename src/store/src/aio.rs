//! Linux native AIO for reads through the O_DIRECT read description.
//!
//! Why not the ring: an io_uring read completes as task work of the thread that
//! submitted it, so a read through the ring thread costs two thread wake-ups besides
//! the caller's own (ring thread up to submit, ring thread up to reap). Native AIO on
//! an O_DIRECT description completes in the block layer's completion context: the
//! event lands in the AIO ring and signals an eventfd that the caller's tokio reactor
//! polls. The caller submits with `io_submit` on its own thread, and a reaper task on
//! the same runtime turns events into results: one wake-up, as in qemu's `aio=native`.
//! On a small, busy machine each wake-up saved is tens of microseconds of a 4 KiB
//! read (docs/DURABILITY.md, "READ", has the figures).
//!
//! Only O_DIRECT reads come here, submitted with `RWF_NOWAIT`: a read the kernel
//! cannot start without blocking the submitting thread (a lock held, no free request
//! tag) is refused with EAGAIN, at submission or as its event, and the store sends it
//! through the ring instead. So are short reads and anything refused with EINVAL; only
//! other errors are final.
//!
//! Buffers: each read's buffer sits in a slot of `Shared::slots` from `io_submit`
//! until its event is reaped, and is never touched in between. `io_destroy` (on drop)
//! waits for every submitted read to finish before the slots are freed, so the kernel
//! never writes into freed memory, even if the reaper is gone.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::event::{eventfd, EventfdFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};
use tracing::{debug, error, info};

use crate::buf::AlignedBuf;
use crate::engine::lock;

/// `IOCB_CMD_PREAD` (linux/aio_abi.h).
const IOCB_CMD_PREAD: u16 = 0;
/// `IOCB_FLAG_RESFD`: signal `aio_resfd` (an eventfd) on completion.
const IOCB_FLAG_RESFD: u32 = 1;
/// Events reaped per `io_getevents` call.
const REAP_BATCH: usize = 64;

/// `struct iocb` (linux/aio_abi.h): the kernel copies it during `io_submit`.
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    #[cfg(target_endian = "little")]
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event` (linux/aio_abi.h).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// How one read ended.
#[derive(Debug)]
pub(crate) enum AioRead {
    /// Every byte was read.
    Done(AlignedBuf),
    /// Not done here (refused without blocking, short, EINVAL, or the reader is
    /// stopping): do it another way.
    Retry,
    /// The kernel's final answer.
    Failed(io::Error),
}

/// A read in the kernel: its buffer and who waits for it.
struct Slot {
    buf: AlignedBuf,
    len: usize,
    reply: oneshot::Sender<AioRead>,
    /// The store's in-flight permit, held until the kernel is done with the buffer.
    _permit: OwnedSemaphorePermit,
}

struct Shared {
    ctx: libc::c_ulong,
    /// Signalled once per completed read (IOCB_FLAG_RESFD).
    events: AsyncFd<OwnedFd>,
    slots: Mutex<Slots>,
    /// Reads submitted and not yet reaped.
    in_flight: AtomicUsize,
    /// Reads answered in full here (tests look).
    done: AtomicU64,
    /// Set by `stop`, and when the reaper has ended: new reads go elsewhere.
    stopped: AtomicBool,
    /// Wakes the reaper to stop, and `stop` when the last read is reaped.
    stop_reaper: Notify,
    idle: Notify,
    /// Keeps the read description open while reads are in the kernel.
    _files: Arc<[File]>,
    fd: i32,
}

#[derive(Default)]
struct Slots {
    used: Vec<Option<Slot>>,
    free: Vec<usize>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Waits for every read still in the kernel; only then are the slots (and
        // their buffers) freed, after this body.
        // SAFETY: `ctx` came from io_setup and is destroyed once, here.
        let rc = unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
        if rc != 0 {
            error!(error = %io::Error::last_os_error(), "io_destroy failed");
        }
    }
}

/// Native AIO reads of one O_DIRECT description, reaped on a tokio runtime.
pub(crate) struct AioReader {
    shared: Arc<Shared>,
    /// Resolves once the reaper task has ended and dropped its share of `Shared`,
    /// the store's files included (so their lock is released by the time `stop`
    /// returns and the store is dropped).
    reaper_ended: Mutex<Option<oneshot::Receiver<()>>>,
}

impl std::fmt::Debug for AioReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioReader")
            .field("in_flight", &self.shared.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl AioReader {
    /// Sets up an AIO context for `max_in_flight` reads of `files[file_index]` and
    /// starts its reaper on the current tokio runtime. `None` with a reason when
    /// there is no runtime here or the kernel refuses (then reads use the ring).
    pub(crate) fn start(
        files: Arc<[File]>,
        file_index: usize,
        max_in_flight: usize,
    ) -> Result<AioReader, String> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "no tokio runtime at open".to_owned())?;
        let fd = files[file_index].as_raw_fd();
        let mut ctx: libc::c_ulong = 0;
        let nr = libc::c_long::try_from(max_in_flight.max(1)).unwrap_or(libc::c_long::MAX);
        // SAFETY: io_setup writes the context id into `ctx`, which we own.
        let rc = unsafe { libc::syscall(libc::SYS_io_setup, nr, &mut ctx as *mut libc::c_ulong) };
        if rc != 0 {
            return Err(format!("io_setup: {}", io::Error::last_os_error()));
        }
        let destroy = |ctx: libc::c_ulong| {
            // SAFETY: nothing was submitted on `ctx` yet.
            unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
        };
        let event_fd = match eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(err) => {
                destroy(ctx);
                return Err(format!("eventfd: {err}"));
            }
        };
        let registered = {
            let _guard = handle.enter();
            // Registration panics in a runtime without its IO driver: no AIO there.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: the AsyncFd owns `event_fd`, which stays open and the same
                // for its whole life.
                unsafe { AsyncFd::register_with_interest(event_fd, Interest::READABLE) }
            }))
        };
        let events = match registered {
            Ok(Ok(events)) => events,
            Ok(Err(err)) => {
                destroy(ctx);
                return Err(format!("registering the eventfd: {err}"));
            }
            Err(_) => {
                destroy(ctx);
                return Err("the tokio runtime has no IO driver".to_owned());
            }
        };
        let shared = Arc::new(Shared {
            ctx,
            events,
            slots: Mutex::new(Slots::default()),
            in_flight: AtomicUsize::new(0),
            done: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            stop_reaper: Notify::new(),
            idle: Notify::new(),
            _files: files,
            fd,
        });
        let (ended_tx, ended_rx) = oneshot::channel();
        let reaper_shared = Arc::clone(&shared);
        handle.spawn(async move {
            reap(reaper_shared).await;
            // `reap` has dropped its references by now.
            let _ = ended_tx.send(());
        });
        Ok(AioReader {
            shared,
            reaper_ended: Mutex::new(Some(ended_rx)),
        })
    }

    /// Reads `len` bytes at `offset` (both aligned for O_DIRECT) into a new buffer.
    pub(crate) async fn read(
        &self,
        offset: u64,
        len: usize,
        permit: OwnedSemaphorePermit,
    ) -> AioRead {
        match self.submit(offset, len, permit) {
            Some(result) => result.await.unwrap_or(AioRead::Retry),
            None => AioRead::Retry,
        }
    }

    /// Submits one read; `None` if it was not submitted.
    fn submit(
        &self,
        offset: u64,
        len: usize,
        permit: OwnedSemaphorePermit,
    ) -> Option<oneshot::Receiver<AioRead>> {
        let shared = &self.shared;
        let (Ok(aio_offset), Ok(aio_nbytes)) = (i64::try_from(offset), u64::try_from(len)) else {
            return None;
        };
        // Counted before `stopped` is checked (both SeqCst): either `stop` sees this
        // read in flight and waits for it, or this sees `stopped` and backs out.
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if shared.stopped.load(Ordering::SeqCst) {
            shared.finished();
            return None;
        }
        let mut buf = AlignedBuf::for_overwrite(len);
        let (reply, result) = oneshot::channel();
        let mut iocb = Iocb {
            aio_lio_opcode: IOCB_CMD_PREAD,
            aio_fildes: shared.fd as u32,
            aio_buf: buf.as_mut_ptr() as u64,
            aio_nbytes,
            aio_offset,
            aio_rw_flags: libc::RWF_NOWAIT,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: shared.events.get_ref().as_raw_fd() as u32,
            ..Iocb::default()
        };
        // The slot is filled before io_submit: the event may be reaped before
        // io_submit even returns. (Moving `buf` into it moves no bytes.)
        let index = lock(&shared.slots).insert(Slot {
            buf,
            len,
            reply,
            _permit: permit,
        });
        iocb.aio_data = index as u64;
        let mut iocbs = [&mut iocb as *mut Iocb];
        // SAFETY: `iocb` is valid for the call (the kernel copies it); the buffer it
        // points at lives in slot `index` until the event is reaped.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                shared.ctx,
                1 as libc::c_long,
                iocbs.as_mut_ptr(),
            )
        };
        if rc != 1 {
            // Not submitted: the slot is ours again.
            let err = io::Error::last_os_error();
            let slot = lock(&shared.slots).take(index);
            shared.finished();
            drop(slot);
            if err.raw_os_error() == Some(libc::EAGAIN) {
                debug!(error = %err, "AIO read not submitted; using the engine");
            } else {
                // Not a passing condition (no RWF_NOWAIT here, no AIO for this
                // file): every later read would be refused too.
                shared.give_up(&err);
            }
            return None;
        }
        Some(result)
    }

    /// Refuses new reads, waits until every submitted one has been reaped, then stops
    /// the reaper and waits until it has ended (a reaper dropped with its runtime
    /// counts as ended).
    pub(crate) async fn stop(&self) {
        let shared = &self.shared;
        shared.stopped.store(true, Ordering::SeqCst);
        loop {
            let idle = shared.idle.notified();
            if shared.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
        shared.stop_reaper.notify_one();
        let ended = lock(&self.reaper_ended).take();
        if let Some(ended) = ended {
            let _ = ended.await;
        }
    }

    /// Reads answered in full through AIO so far.
    pub(crate) fn reads_done(&self) -> u64 {
        self.shared.done.load(Ordering::Relaxed)
    }

    /// Whether reads may come here (not stopped, reaper running).
    pub(crate) fn running(&self) -> bool {
        !self.shared.stopped.load(Ordering::SeqCst)
    }
}

impl Drop for AioReader {
    /// Stops the reaper, which then drops the context: `io_destroy` waits for any
    /// read still in the kernel before the buffers go.
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.stop_reaper.notify_one();
    }
}

impl Slots {
    fn insert(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(index) => {
                self.used[index] = Some(slot);
                index
            }
            None => {
                self.used.push(Some(slot));
                self.used.len() - 1
            }
        }
    }

    fn take(&mut self, index: usize) -> Option<Slot> {
        let slot = self.used.get_mut(index).and_then(Option::take);
        if slot.is_some() {
            self.free.push(index);
        }
        slot
    }
}

impl Shared {
    /// One read fewer in the kernel; wakes `stop` after the last.
    fn finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Sends every later read to the engine (the reads in flight are still reaped).
    fn give_up(&self, err: &io::Error) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            info!(error = %err, "native AIO refuses these reads; they go to the engine");
        }
    }

    /// Reaps every available event without waiting; false if io_getevents failed.
    fn reap_available(&self, events: &mut [IoEvent; REAP_BATCH]) -> bool {
        loop {
            let mut timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            match self.get_events(0, events, &mut timeout) {
                Ok(got) => {
                    for event in &events[..got] {
                        complete(self, event);
                    }
                    if got < REAP_BATCH {
                        return true;
                    }
                }
                Err(err) => {
                    error!(error = %err, "io_getevents failed; reads go to the engine");
                    return false;
                }
            }
        }
    }

    /// io_getevents for at least `min` events (EINTR retried); a null `timeout`
    /// waits as long as it takes.
    fn get_events(
        &self,
        min: usize,
        events: &mut [IoEvent; REAP_BATCH],
        timeout: *mut libc::timespec,
    ) -> io::Result<usize> {
        loop {
            // SAFETY: `events` has room for REAP_BATCH events; `timeout` is null or
            // points at a live timespec.
            let got = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    min as libc::c_long,
                    REAP_BATCH as libc::c_long,
                    events.as_mut_ptr(),
                    timeout,
                )
            };
            if got >= 0 {
                return Ok(got as usize);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

/// When the reaper ends for any reason (stopped, an error, or its runtime shutting
/// down): marks the reader stopped, then waits for the reads still in the kernel
/// and answers them, so that neither a read nor `stop` waits for a reaper that is
/// gone. (Blocking, but only for reads already on the device.)
struct ReaperGone(Arc<Shared>);

impl Drop for ReaperGone {
    fn drop(&mut self) {
        let shared = &self.0;
        shared.stopped.store(true, Ordering::SeqCst);
        let mut events = [IoEvent::default(); REAP_BATCH];
        while shared.in_flight.load(Ordering::SeqCst) > 0 {
            match shared.get_events(1, &mut events, std::ptr::null_mut()) {
                Ok(got) => {
                    for event in &events[..got] {
                        complete(shared, event);
                    }
                }
                Err(err) => {
                    // The reads' buffers stay in their slots until io_destroy.
                    error!(error = %err, "io_getevents failed while draining AIO reads");
                    return;
                }
            }
        }
    }
}

/// The reaper: waits for the eventfd, then takes every available event and sends
/// each read its result. Ends once the reader is stopped and no read is in flight.
async fn reap(shared: Arc<Shared>) {
    let gone = ReaperGone(Arc::clone(&shared));
    let shared = &gone.0;
    let mut events = [IoEvent::default(); REAP_BATCH];
    loop {
        if shared.stopped.load(Ordering::SeqCst) && shared.in_flight.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut ready = tokio::select! {
            biased;
            ready = shared.events.readable() => match ready {
                Ok(ready) => ready,
                Err(err) => {
                    error!(error = %err, "AIO eventfd failed; reads go to the engine");
                    return;
                }
            },
            // Only a wake-up: the loop's check decides.
            _ = shared.stop_reaper.notified() => continue,
        };
        // Clear the counter before reaping, so an event that lands after the
        // io_getevents below signals it again.
        let mut count = [0u8; 8];
        let _ = rustix::io::read(shared.events.get_ref(), &mut count);
        ready.clear_ready();
        if !shared.reap_available(&mut events) {
            return;
        }
    }
}

fn complete(shared: &Shared, event: &IoEvent) {
    let index = usize::try_from(event.data).unwrap_or(usize::MAX);
    let Some(slot) = lock(&shared.slots).take(index) else {
        error!(slot = event.data, "AIO event for an unknown read");
        return;
    };
    shared.finished();
    let Slot {
        buf, len, reply, ..
    } = slot;
    let outcome = match event.res {
        res if res >= 0 && res as u64 == len as u64 => {
            shared.done.fetch_add(1, Ordering::Relaxed);
            AioRead::Done(buf)
        }
        // Short (end of file), or refused without blocking: elsewhere.
        res if res >= 0 => AioRead::Retry,
        res if -res == i64::from(libc::EAGAIN) || -res == i64::from(libc::EINVAL) => AioRead::Retry,
        res => AioRead::Failed(io::Error::from_raw_os_error(-res as i32)),
    };
    let _ = reply.send(outcome);
}
