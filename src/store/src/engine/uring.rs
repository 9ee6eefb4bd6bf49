//! The io_uring engine: one ring, owned by one dedicated ring thread.
//!
//! Wake-up protocol. Submitters push a request on a bounded channel; the ring thread
//! keeps an IORING_OP_READ armed on an eventfd, so a write to the eventfd completes a
//! CQE and ends the ring thread's wait. To keep the hot path free of syscalls, a
//! submitter writes the eventfd only when the ring thread has announced that it is
//! about to sleep:
//!
//! ```text
//! submitter:   push(request); fence(SeqCst); if sleeping.swap(false) { write(eventfd) }
//! ring thread: sleeping.store(true); fence(SeqCst); if channel empty { submit_and_wait(1) }
//! ```
//!
//! Either the ring thread's re-check sees the pushed request, or the submitter's swap
//! sees `true` and writes the eventfd (the two SeqCst fences forbid both missing each
//! other). A stale `true` only costs one spurious wake-up.
//!
//! Buffers: every op owns its buffers inside a slot of `RingThread::slots` until its
//! CQE is reaped, so the kernel never sees freed memory. The thread exits only when no
//! slot is occupied and the eventfd read has completed; on an impossible ring state it
//! aborts the process instead of unwinding, because unwinding would free buffers that
//! the kernel may still write into.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use rustix::event::{eventfd, EventfdFlags};
use tracing::error;

use super::{remaining_slices, total_len, Op, Request, Threads, MAX_RETRIES, MAX_TRANSFER_BYTES};

/// The most io-wq workers for bounded (buffered read) work with buffered I/O.
const BUFFERED_IO_WORKERS: u32 = 32;

/// `user_data` of the eventfd read; slot indexes are always smaller.
const WAKE_USER_DATA: u64 = u64::MAX;
/// `user_data` of the probe NOP at start-up.
const PROBE_USER_DATA: u64 = u64::MAX - 1;

#[derive(Debug)]
pub(crate) struct UringEngine {
    requests: SyncSender<Request>,
    shared: Arc<UringShared>,
    threads: Threads,
}

#[derive(Debug)]
struct UringShared {
    /// Set by the ring thread just before it blocks in the kernel.
    sleeping: AtomicBool,
    /// Set once by `shutdown`.
    shutdown: AtomicBool,
    /// Non-blocking eventfd whose read the ring thread keeps armed.
    wake_fd: OwnedFd,
}

impl UringShared {
    fn wake(&self) {
        // An eventfd write fails only if the counter would overflow u64::MAX - 1, which
        // 1-increments cannot reach while the ring thread keeps reading; a failure would
        // at worst delay the ring thread until its next completion, so it is only logged.
        if let Err(err) = rustix::io::write(&self.wake_fd, &1u64.to_ne_bytes()) {
            error!(error = %err, "cannot wake the io_uring thread");
        }
    }
}

impl UringEngine {
    /// Sets up the ring, checks that it works (every opcode we use is supported and a
    /// NOP completes), and starts the ring thread. An error means io_uring is not
    /// usable here (EPERM/ENOSYS under seccomp, io_uring_disabled, old kernels).
    pub(crate) fn start(
        files: Arc<[File]>,
        entries: u32,
        max_in_flight: usize,
        direct_io: bool,
    ) -> io::Result<UringEngine> {
        let mut ring = IoUring::new(entries)?;
        probe(&mut ring)?;
        if !direct_io {
            // Buffered reads that miss the page cache run on io-wq workers; the kernel's
            // default (4 per CPU) starves a queue depth of 32 on a small machine. This
            // only raises a ceiling: idle workers exit.
            let mut workers = [BUFFERED_IO_WORKERS, 0];
            ring.submitter().register_iowq_max_workers(&mut workers)?;
        }
        let wake_fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let (requests, receiver) = sync_channel(max_in_flight);
        let shared = Arc::new(UringShared {
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            wake_fd,
        });
        // One CQE slot stays free for the eventfd read, so the completion queue can
        // never overflow: at most `slot_count + 1` ops are in the kernel at once.
        let cq_entries = ring.params().cq_entries() as usize;
        let slot_count = max_in_flight.min(cq_entries - 1).max(1);
        let ring_thread = RingThread {
            ring,
            requests: receiver,
            shared: Arc::clone(&shared),
            fds: files
                .iter()
                .map(|file| types::Fd(file.as_raw_fd()))
                .collect(),
            _files: files,
            slots: (0..slot_count).map(|_| None).collect(),
            buffered: !direct_io,
            free_slots: (0..slot_count).rev().collect(),
            wake_buf: Box::new([0u8; 8]),
            wake_armed: false,
            channel_open: true,
            completions: Vec::with_capacity(cq_entries),
        };
        let engine = UringEngine {
            requests,
            shared,
            threads: Threads::default(),
        };
        engine
            .threads
            .spawn("pairbd-uring".to_owned(), move || ring_thread.run())?;
        Ok(engine)
    }

    pub(crate) fn submit(&self, request: Request) -> Result<(), Request> {
        // Never blocks: every queued request holds one of `max_in_flight` permits, and
        // the channel has room for `max_in_flight` requests.
        self.requests.send(request).map_err(|err| err.0)?;
        fence(Ordering::SeqCst);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
        Ok(())
    }

    pub(crate) fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake();
    }

    pub(crate) fn threads(&self) -> &Threads {
        &self.threads
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shutdown();
        self.threads.join();
    }
}

/// Checks that the ring supports every opcode we use and that a NOP round trip works
/// (some sandboxes allow io_uring_setup but not io_uring_enter).
fn probe(ring: &mut IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        ("NOP", opcode::Nop::CODE),
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("WRITEV", opcode::Writev::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("FALLOCATE", opcode::Fallocate::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring does not support IORING_OP_{name}"),
            ));
        }
    }
    let nop = opcode::Nop::new().build().user_data(PROBE_USER_DATA);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full at start-up"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring probe NOP did not complete"))?;
    if cqe.user_data() != PROBE_USER_DATA {
        return Err(io::Error::other(
            "io_uring probe NOP completed with wrong user_data",
        ));
    }
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

/// An op in the kernel (or between two parts of a short transfer).
#[derive(Debug)]
struct Slot {
    request: Request,
    /// Bytes transferred so far (reads and writes).
    done_bytes: usize,
    /// EINTR/EAGAIN resubmissions so far.
    retries: u32,
    /// A vectored write's iovec array for its SQE in the kernel (rebuilt for each
    /// part); empty for other ops.
    iovecs: IoVecs,
}

/// The iovec array of a vectored write's SQE. It points into the slot's own
/// buffers and stays untouched (heap storage that never moves) until the CQE is
/// reaped.
#[derive(Debug, Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs point into buffers owned by the same slot, which moves between
// threads with them (only before its SQE is pushed: slots live on the ring thread);
// they are plain addresses, never dereferenced here.
unsafe impl Send for IoVecs {}

/// What to do with a slot after one of its CQEs.
enum Next {
    Resubmit,
    Complete(io::Result<()>),
}

struct RingThread {
    ring: IoUring,
    requests: Receiver<Request>,
    shared: Arc<UringShared>,
    /// The file table: main description, then sync descriptions.
    fds: Vec<types::Fd>,
    /// Keeps the descriptors in `fds` open for as long as the ring may use them.
    _files: Arc<[File]>,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    /// Buffered I/O (no O_DIRECT): reads go straight to io-wq (IOSQE_ASYNC).
    buffered: bool,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    channel_open: bool,
    /// Reused buffer of (user_data, result) pairs taken off the completion queue.
    completions: Vec<(u64, i32)>,
}

impl RingThread {
    fn run(mut self) {
        self.arm_wake();
        loop {
            self.take_requests();
            if self.stopping() && self.idle() {
                break;
            }
            self.submit_or_wait();
            self.reap();
        }
        debug_assert!(self.idle(), "ring thread exiting with ops in the kernel");
    }

    fn stopping(&self) -> bool {
        !self.channel_open || self.shared.shutdown.load(Ordering::SeqCst)
    }

    /// No op and no eventfd read in the kernel.
    fn idle(&self) -> bool {
        self.free_slots.len() == self.slots.len() && !self.wake_armed
    }

    /// Moves queued requests into free slots and their SQEs into the ring.
    fn take_requests(&mut self) {
        while !self.free_slots.is_empty() && self.channel_open {
            match self.requests.try_recv() {
                Ok(request) => self.start(request),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.channel_open = false,
            }
        }
    }

    /// Submits pending SQEs; when there is nothing to reap, blocks for a completion
    /// after announcing the sleep (see the module comment).
    fn submit_or_wait(&mut self) {
        if !self.ring.completion().is_empty() {
            // Completions to reap first; submit without waiting if anything is queued.
            if !self.ring.submission().is_empty() {
                self.enter(0);
            }
            return;
        }
        let may_take_more = !self.free_slots.is_empty() && !self.stopping();
        if may_take_more {
            self.shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            match self.requests.try_recv() {
                Ok(request) => {
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                    self.start(request);
                    self.enter(0);
                    return;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.channel_open = false,
            }
        }
        self.enter(1);
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }

    /// io_uring_enter: submits the SQ and waits for `want` completions. EINTR, EAGAIN
    /// and EBUSY return to the loop, which reaps and tries again.
    fn enter(&mut self, want: usize) {
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(err) => match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                    if self.ring.completion().is_empty() {
                        // Out of kernel resources with nothing to reap: back off briefly.
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                _ => fatal(&format!("io_uring_enter failed: {err}")),
            },
        }
    }

    fn start(&mut self, request: Request) {
        let Some(index) = self.free_slots.pop() else {
            fatal("a request was taken with no free io_uring slot");
        };
        self.slots[index] = Some(Slot {
            request,
            done_bytes: 0,
            retries: 0,
            iovecs: IoVecs::default(),
        });
        self.push_slot(index);
    }

    /// Pushes the SQE for the next part of the slot's op.
    fn push_slot(&mut self, index: usize) {
        let Some(slot) = self.slots[index].as_mut() else {
            fatal("pushing an SQE for an empty io_uring slot");
        };
        let fd = self.fds[slot.request.file_index()];
        // A read through the O_DIRECT read description is not buffered, whatever the
        // main description is.
        let buffered = self.buffered && slot.request.direct_read_file.is_none();
        let entry = build_entry(fd, slot, buffered).user_data(index as u64);
        self.push(&entry);
    }

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every buffer the entry points at is owned by a slot (or is
            // `wake_buf`) and stays allocated and untouched until its CQE is reaped.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Submission queue full: hand its entries to the kernel to make room.
            self.enter(0);
        }
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.shared.wake_fd.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_USER_DATA);
        self.push(&entry);
        self.wake_armed = true;
    }

    /// Takes every available CQE and acts on it.
    fn reap(&mut self) {
        loop {
            self.completions.clear();
            let capacity = self.completions.capacity();
            for cqe in self.ring.completion().take(capacity) {
                self.completions.push((cqe.user_data(), cqe.result()));
            }
            if self.completions.is_empty() {
                return;
            }
            for at in 0..self.completions.len() {
                let (user_data, result) = self.completions[at];
                self.on_completion(user_data, result);
            }
        }
    }

    fn on_completion(&mut self, user_data: u64, result: i32) {
        if user_data == WAKE_USER_DATA {
            self.wake_armed = false;
            if !self.shared.shutdown.load(Ordering::SeqCst) {
                self.arm_wake();
            }
            return;
        }
        let index = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            fatal(&format!("completion for unknown io_uring slot {user_data}"));
        };
        match advance(slot, result) {
            Next::Resubmit => self.push_slot(index),
            Next::Complete(outcome) => {
                let Some(slot) = self.slots[index].take() else {
                    fatal("completing an empty io_uring slot");
                };
                self.free_slots.push(index);
                slot.request.complete(outcome);
            }
        }
    }
}

/// The SQE for the next part of a slot's op.
fn build_entry(fd: types::Fd, slot: &mut Slot, buffered: bool) -> squeue::Entry {
    let done = slot.done_bytes;
    match &mut slot.request.op {
        Op::Read { offset, buf } => {
            let end = buf.len().min(done + MAX_TRANSFER_BYTES);
            let part = &mut buf[done..end];
            let entry = opcode::Read::new(fd, part.as_mut_ptr(), part.len() as u32)
                .offset(*offset + done as u64)
                .build();
            // A buffered read that misses the cache would first be tried inline on the
            // ring thread, fail with EAGAIN and then be punted anyway: with a cold cache
            // (the mail server's usual case) going to io-wq directly is cheaper.
            if buffered {
                entry.flags(squeue::Flags::ASYNC)
            } else {
                entry
            }
        }
        Op::Write { offset, buf, fua } => {
            let end = buf.len().min(done + MAX_TRANSFER_BYTES);
            let part = &buf[done..end];
            let rw_flags = if *fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, part.as_ptr(), part.len() as u32)
                .offset(*offset + done as u64)
                .rw_flags(rw_flags)
                .build()
        }
        Op::WriteVectored { offset, bufs } => {
            slot.iovecs.0 = remaining_slices(bufs, done)
                .into_iter()
                .map(|part| libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                })
                .collect();
            opcode::Writev::new(fd, slot.iovecs.0.as_ptr(), slot.iovecs.0.len() as u32)
                .offset(*offset + done as u64)
                .build()
        }
        Op::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(mode.flags().bits() as i32)
            .build(),
    }
}

/// Applies one CQE result to a slot: progress, retry, or completion.
fn advance(slot: &mut Slot, result: i32) -> Next {
    if result < 0 {
        let errno = -result;
        let retryable = errno == libc::EINTR || errno == libc::EAGAIN;
        // A failed fsync is never retried: see `pool::execute`.
        let is_flush = matches!(slot.request.op, Op::Flush);
        if retryable && !is_flush && slot.retries < MAX_RETRIES {
            slot.retries += 1;
            return Next::Resubmit;
        }
        return Next::Complete(Err(io::Error::from_raw_os_error(errno)));
    }
    let count = result as usize;
    match &mut slot.request.op {
        Op::Read { buf, .. } => {
            if count == 0 {
                // End of file inside the store's size: the rest reads as zeroes.
                buf[slot.done_bytes..].fill(0);
                return Next::Complete(Ok(()));
            }
            slot.done_bytes += count;
            if slot.done_bytes < buf.len() {
                Next::Resubmit
            } else {
                Next::Complete(Ok(()))
            }
        }
        Op::Write { buf, .. } => {
            if count == 0 {
                return Next::Complete(Err(io::ErrorKind::WriteZero.into()));
            }
            slot.done_bytes += count;
            if slot.done_bytes < buf.len() {
                Next::Resubmit
            } else {
                Next::Complete(Ok(()))
            }
        }
        Op::WriteVectored { bufs, .. } => {
            if count == 0 {
                return Next::Complete(Err(io::ErrorKind::WriteZero.into()));
            }
            slot.done_bytes += count;
            if slot.done_bytes < total_len(bufs) {
                Next::Resubmit
            } else {
                Next::Complete(Ok(()))
            }
        }
        Op::Flush | Op::Fallocate { .. } => Next::Complete(Ok(())),
    }
}

/// Fail-stop for an impossible ring state. Unwinding is not an option: it would free
/// slot buffers while the kernel may still write into them.
fn fatal(message: &str) -> ! {
    error!(
        invariant = message,
        "io_uring engine invariant broken; aborting"
    );
    eprintln!("pairbd-store: io_uring engine invariant broken: {message}");
    std::process::abort();
}
