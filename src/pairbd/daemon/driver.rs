//! The driver: runs what the replication core emits, and feeds it what happens.
//!
//! The core (`pairbd_repl_core::Node`) sits behind one mutex. Every input —
//! a client request, a disk or metadata completion, a peer message, a link
//! event, a timer, an admin command — takes the lock, calls the core, and
//! executes its outputs before letting go. Executing never blocks: disk
//! operations and metadata writes are spawned, messages go into the link's
//! queue, replies into oneshot channels. Because outputs are executed under the
//! lock, messages reach the link in exactly the order the core emitted them.
//!
//! Merging: the disk operations of one drain of the core (everything it has
//! queued after one input, or after one batch of received messages, which
//! `messages` hands it under one lock) go through the core's merge planner
//! (`pairbd_repl_core::merge`) after the round's other outputs were executed:
//! exactly adjacent plain writes, ascending and consecutive in emission
//! order, become one vectored store write of at most `merge-bytes`. Nothing
//! waits for a merge partner. The planner never moves an operation past
//! another, so the order guarantees above are untouched; a merged write
//! reports every piece to the core under one lock, all done or all failed
//! with the same error.
//!
//! The queues here are bounded by what feeds them: client requests by the NBD
//! server's per-connection limits, sync chunks by the sync window, disk and
//! metadata completions by the operations in flight. The link's send queue
//! also has a hard bound (`LINK_QUEUE_MESSAGES`): a peer that stops taking
//! data costs the link, never unbounded memory.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use pairbd_link::{LinkHandle, LinkStats};
use pairbd_meta::MetaStore;
use pairbd_nbd_server::Clients;
use pairbd_repl_core::{
    plan_disk_ops, ActivityLogImage, AdminCommand, AdminError, AdminId, BitmapPage, ClientOp,
    DiskOp, DiskOpId, DiskResult, Lane, MergeLimits, MergedWrite, Message, MetaWriteId, Node,
    Output, Payload, PersistentState, PlannedOp, ReplyError, RequestId, Status,
};
use pairbd_store::{AlignedBuf, Store};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// A payload shared by the local store write and the peer message: no copy.
#[derive(Clone, Debug)]
pub struct SharedBuf(pub Arc<AlignedBuf>);

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

impl Payload for SharedBuf {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self) -> &[u8] {
        self.0.as_ref()
    }
}

/// A message as the daemon handles it.
pub type Msg = Message<SharedBuf>;

/// The most messages queued for the link's writer. What feeds the queue is
/// bounded already (client requests by the NBD server's per-connection
/// limits, sync and verify chunks by their windows, acks by what the peer
/// sent), so it fills only if the peer stops taking data while the primary
/// keeps producing; then the link is dropped instead of the queue growing.
pub const LINK_QUEUE_MESSAGES: usize = 65536;

/// The largest plain write the driver tries on its own thread (see `drive`):
/// the store's own bound for a write it does on the caller's thread without
/// `block_in_place`, so an inline write never blocks under the core's lock.
const INLINE_WRITE_BYTES: usize = pairbd_store::SMALL_WRITE_BYTES;

/// Whether `op` is a small plain write the store does on the caller's thread.
fn inline_write(op: &DiskOp<SharedBuf>) -> bool {
    matches!(op, DiskOp::Write { payload, fua: false, .. } if payload.0.len() <= INLINE_WRITE_BYTES)
}

/// What merging did since the daemon started (`pairbd status --json`,
/// `"writes"`): the core's write operations against the store writes that
/// carried them out.
#[derive(Debug, Default)]
pub struct WriteCounters {
    /// Write operations the core emitted (client writes on a Primary, peer
    /// writes and sync chunks on a Secondary).
    pub write_ops: AtomicU64,
    /// Store writes issued for them (a merged write counts once).
    pub store_writes: AtomicU64,
    /// Merged store writes (each carrying two or more write operations).
    /// The write operations they carried are derived: every other store
    /// write carried one.
    pub merged_writes: AtomicU64,
}

impl WriteCounters {
    fn count(&self, planned: &PlannedOp<SharedBuf>) {
        match planned {
            PlannedOp::Single {
                op: DiskOp::Write { .. },
                ..
            } => {
                self.write_ops.fetch_add(1, Ordering::Relaxed);
                self.store_writes.fetch_add(1, Ordering::Relaxed);
            }
            PlannedOp::Single { .. } => {}
            PlannedOp::Merged(m) => {
                let pieces = m.pieces.len() as u64;
                self.write_ops.fetch_add(pieces, Ordering::Relaxed);
                self.store_writes.fetch_add(1, Ordering::Relaxed);
                self.merged_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters as JSON numbers.
    pub fn to_json(&self) -> serde_json::Value {
        let write_ops = self.write_ops.load(Ordering::Relaxed);
        let store_writes = self.store_writes.load(Ordering::Relaxed);
        let merged_writes = self.merged_writes.load(Ordering::Relaxed);
        let single_writes = store_writes.saturating_sub(merged_writes);
        serde_json::json!({
            "write_ops": write_ops,
            "store_writes": store_writes,
            "merged_writes": merged_writes,
            "merged_ops": write_ops.saturating_sub(single_writes),
        })
    }
}

/// A store operation on its way (polled once inline, or as a task).
type DiskRun = std::pin::Pin<Box<dyn Future<Output = DiskResult<SharedBuf>> + Send>>;

/// How much the link batches: frames written to the stream in one write,
/// and frames received that are handled under one lock.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// The most messages in one batch.
    pub messages: usize,
    /// A batch closes once it holds this many bytes (headers and payloads).
    pub bytes: usize,
    /// How long the writer may wait for more messages before it writes a
    /// batch that is not full (`batch-delay`; zero: only what is already
    /// queued goes together).
    pub delay: std::time::Duration,
    /// Client writes of at least this many bytes go on the link's bulk lane
    /// (`bulk-lane-bytes`; 0: everything on the main lane).
    pub bulk_lane_bytes: u64,
}

/// Frames on the replication link since the daemon started, for status
/// (what batching saves is seen here: acks per ack frame, frames per write).
#[derive(Debug, Default)]
pub struct FrameCounters {
    /// Frames written to the link, and those of them that were Ack/Acks.
    pub sent: AtomicU64,
    pub ack_frames_sent: AtomicU64,
    /// Writes (and sync chunks) those ack frames acknowledged.
    pub acks_sent: AtomicU64,
    /// Frames read from the link, and those of them that were Ack/Acks.
    pub received: AtomicU64,
    pub ack_frames_received: AtomicU64,
    /// Writes (and sync chunks) the received ack frames acknowledged.
    pub acks_received: AtomicU64,
    /// Of the frames sent and received, those on the bulk lane.
    pub bulk_sent: AtomicU64,
    pub bulk_received: AtomicU64,
}

impl FrameCounters {
    /// Counts a frame written to the link.
    pub fn count_sent(&self, msg: &Msg) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(seqs) = msg.acked_seqs() {
            self.ack_frames_sent.fetch_add(1, Ordering::Relaxed);
            self.acks_sent
                .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        }
    }

    /// Counts a frame written to the link's bulk lane.
    pub fn count_bulk_sent(&self, msg: &Msg) {
        self.bulk_sent.fetch_add(1, Ordering::Relaxed);
        self.count_sent(msg);
    }

    /// Counts a frame read from the link's bulk lane.
    pub fn count_bulk_received(&self, msg: &Msg) {
        self.bulk_received.fetch_add(1, Ordering::Relaxed);
        self.count_received(msg);
    }

    /// Counts a frame read from the link.
    pub fn count_received(&self, msg: &Msg) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(seqs) = msg.acked_seqs() {
            self.ack_frames_received.fetch_add(1, Ordering::Relaxed);
            self.acks_received
                .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        }
    }

    /// The counters as status shows them.
    pub fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "sent": get(&self.sent),
            "ack_frames_sent": get(&self.ack_frames_sent),
            "acks_sent": get(&self.acks_sent),
            "received": get(&self.received),
            "ack_frames_received": get(&self.ack_frames_received),
            "acks_received": get(&self.acks_received),
            "bulk_sent": get(&self.bulk_sent),
            "bulk_received": get(&self.bulk_received),
        })
    }
}

/// The current link to the peer, as the driver sees it.
struct CurrentLink {
    id: u64,
    tx: mpsc::Sender<Msg>,
    /// The connection under the link (close it, read its counters).
    conn: LinkHandle,
}

struct Inner {
    node: Node<SharedBuf>,
    next_request: u64,
    replies: HashMap<u64, oneshot::Sender<Result<(), ReplyError>>>,
    next_admin: u64,
    admins: HashMap<u64, oneshot::Sender<Result<String, AdminError>>>,
    link: Option<CurrentLink>,
    next_link: u64,
    /// The deadline the timer task sleeps until; it is woken only when the
    /// core's next deadline comes earlier.
    armed: Option<Instant>,
}

/// See the module documentation.
pub struct Driver {
    inner: Mutex<Inner>,
    store: Store,
    meta: Arc<Mutex<MetaStore>>,
    timer: Notify,
    /// Cancelled when the node fail-stops.
    pub failed: CancellationToken,
    /// Set when the node fail-stopped, with the reason.
    pub failure: Mutex<Option<String>>,
    /// The NBD server's attached clients (unset on a node that serves none).
    pub clients: OnceLock<Clients>,
    /// Woken when the node may dial its peer again (it left StandAlone).
    pub reconnect: Notify,
    /// Cancelled by the control command `restart`: stop for a planned restart.
    pub restart: CancellationToken,
    batch: BatchLimits,
    /// Frames on the replication link (status).
    pub frames: FrameCounters,
    /// The merge planner's bounds (`merge-bytes`; 0: off).
    merge: MergeLimits,
    /// What merging did.
    pub writes: WriteCounters,
    /// Client requests not yet handed to the core (see `submit`).
    submitted: Mutex<Vec<Submitted>>,
}

/// A client request waiting for the core's lock, with its reply channel.
type Submitted = (ClientOp<SharedBuf>, oneshot::Sender<Result<(), ReplyError>>);

impl Driver {
    pub fn new(
        node: Node<SharedBuf>,
        store: Store,
        meta: MetaStore,
        batch: BatchLimits,
        merge_bytes: u64,
    ) -> Arc<Driver> {
        // A merged write is one store request: it may not exceed the store's
        // largest.
        let merge_bytes = merge_bytes.min(store.max_request_bytes() as u64);
        Arc::new(Driver {
            inner: Mutex::new(Inner {
                node,
                next_request: 1,
                replies: HashMap::new(),
                next_admin: 1,
                admins: HashMap::new(),
                link: None,
                next_link: 1,
                armed: None,
            }),
            store,
            meta: Arc::new(Mutex::new(meta)),
            timer: Notify::new(),
            failed: CancellationToken::new(),
            failure: Mutex::new(None),
            clients: OnceLock::new(),
            reconnect: Notify::new(),
            restart: CancellationToken::new(),
            batch,
            frames: FrameCounters::default(),
            merge: MergeLimits::new(merge_bytes),
            writes: WriteCounters::default(),
            submitted: Mutex::new(Vec::new()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug that already stopped a task;
        // the core's state is still the last consistent one it left.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs every output the core has, under the lock (see the module doc).
    ///
    /// The round's disk operations are planned together (merging adjacent
    /// plain writes) once its other outputs were executed. Small plain
    /// writes, merged or not (up to `INLINE_WRITE_BYTES`, no FUA), are tried
    /// right here, after the messages of the same round went to the link:
    /// the store copies them into the page cache on this thread, and their
    /// completion goes back to the core at once, saving a task, a wake-up
    /// and a second lock per write on each node. A write the store cannot
    /// finish at once (an engine write, a full queue) continues as a task.
    fn drive(self: &Arc<Self>, inner: &mut Inner) {
        let mut disk: Vec<(DiskOpId, DiskOp<SharedBuf>)> = Vec::new();
        loop {
            while let Some(out) = inner.node.poll() {
                match out {
                    Output::Disk { id, op } => disk.push((id, op)),
                    out => self.execute(inner, out),
                }
            }
            if disk.is_empty() {
                break;
            }
            for planned in plan_disk_ops(disk.drain(..), &self.merge) {
                self.writes.count(&planned);
                match planned {
                    PlannedOp::Single { id, op } if inline_write(&op) => {
                        let run = Box::pin(Arc::clone(self).run_disk(op));
                        self.run_inline(inner, vec![id], run);
                    }
                    PlannedOp::Single { id, op } => self.spawn_disk(id, op),
                    PlannedOp::Merged(m) => {
                        let inline = m.len_bytes() <= INLINE_WRITE_BYTES as u64;
                        let ids: Vec<DiskOpId> = m.ids().collect();
                        let run = Box::pin(Arc::clone(self).run_merged(m));
                        if inline {
                            self.run_inline(inner, ids, run);
                        } else {
                            self.spawn_running(ids, run);
                        }
                    }
                }
            }
        }
        let next = inner.node.poll_timeout();
        if next.is_some() && inner.armed.is_none_or(|armed| next < Some(armed)) {
            inner.armed = next;
            self.timer.notify_one();
        }
    }

    /// Polls a small write's future once, on this thread and under the lock:
    /// if the store finished it, every operation it carries out (`ids`) is
    /// reported at once; otherwise it continues as a task.
    fn run_inline(self: &Arc<Self>, inner: &mut Inner, ids: Vec<DiskOpId>, mut run: DiskRun) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match run.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => {
                let now = Instant::now();
                for id in ids {
                    inner.node.handle_disk(now, id, result.clone());
                }
            }
            // The first poll registered no waker; the task polls again with
            // its own.
            std::task::Poll::Pending => self.spawn_running(ids, run),
        }
    }

    /// Executes one output of the core (the lock is held).
    fn execute(self: &Arc<Self>, inner: &mut Inner, out: Output<SharedBuf>) {
        match out {
            Output::Disk { id, op } => self.spawn_disk(id, op),
            Output::WriteMeta {
                id,
                state,
                bitmap,
                activity_log,
            } => {
                let granularity = inner.node.bitmap().granularity();
                self.spawn_meta(id, state, granularity, bitmap, activity_log)
            }
            Output::Send(m) => {
                let full = match &inner.link {
                    // A closed queue means the link is going; the core hears
                    // of it through link_lost.
                    Some(link) => {
                        matches!(link.tx.try_send(m), Err(mpsc::error::TrySendError::Full(_)))
                    }
                    None => false,
                };
                if full {
                    // The peer has not taken LINK_QUEUE_MESSAGES messages:
                    // drop the link rather than grow (the transfer log
                    // marks what the peer may lack; it resyncs).
                    let reason =
                        format!("the link's send queue is full ({LINK_QUEUE_MESSAGES} messages)");
                    if let Some(link) = inner.link.take() {
                        link.conn.close(&reason);
                    }
                    warn!("replication link dropped: {reason}");
                    inner.node.handle_disconnected(Instant::now(), &reason);
                }
            }
            Output::Reply { id, result } => {
                if let Some(tx) = inner.replies.remove(&id.0) {
                    let _ = tx.send(result);
                }
            }
            Output::Disconnect { reason } => {
                if let Some(link) = inner.link.take() {
                    link.conn.close(&reason);
                }
            }
            Output::AdminDone { id, result } => {
                if let Some(tx) = inner.admins.remove(&id.0) {
                    let _ = tx.send(result);
                }
            }
            Output::FailStop { reason } => {
                error!("fail-stop: {reason}");
                *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                if let Some(link) = inner.link.take() {
                    link.conn.close("node failed");
                }
                self.failed.cancel();
            }
        }
    }

    fn spawn_disk(self: &Arc<Self>, id: DiskOpId, op: DiskOp<SharedBuf>) {
        self.spawn_running(vec![id], Box::pin(Arc::clone(self).run_disk(op)));
    }

    /// Finishes a store operation as a task and reports every operation of
    /// the core it carries out (one, or a merged write's pieces) with its
    /// result, under one lock.
    fn spawn_running(self: &Arc<Self>, ids: Vec<DiskOpId>, run: DiskRun) {
        let driver = Arc::clone(self);
        tokio::spawn(async move {
            let result = run.await;
            let mut inner = driver.lock();
            let now = Instant::now();
            for id in ids {
                inner.node.handle_disk(now, id, result.clone());
            }
            driver.drive(&mut inner);
        });
    }

    /// Runs a merged write as one vectored store write.
    async fn run_merged(self: Arc<Self>, m: MergedWrite<SharedBuf>) -> DiskResult<SharedBuf> {
        let bufs = m.pieces.into_iter().map(|(_, p)| p.0).collect();
        match self.store.write_vectored_shared(m.offset, bufs).await {
            Ok(()) => DiskResult::Done,
            Err(e) => DiskResult::Failed(e.to_string()),
        }
    }

    /// Runs one disk operation on the store.
    async fn run_disk(self: Arc<Self>, op: DiskOp<SharedBuf>) -> DiskResult<SharedBuf> {
        let store = &self.store;
        let result = match op {
            DiskOp::Write {
                offset,
                payload,
                fua,
            } => store
                .write_shared(offset, payload.0, fua)
                .await
                .map(|()| DiskResult::Done),
            DiskOp::Trim { offset, length } => store
                .discard(offset, length)
                .await
                .map(|()| DiskResult::Done),
            DiskOp::WriteZeroes {
                offset,
                length,
                no_hole,
            } => store
                .write_zeroes(offset, length, no_hole, false)
                .await
                .map(|()| DiskResult::Done),
            DiskOp::Flush => store.flush().await.map(|()| DiskResult::Done),
            DiskOp::Read { offset, length } => match usize::try_from(length) {
                Ok(len) => store
                    .read(offset, len)
                    .await
                    .map(|b| DiskResult::Read(SharedBuf(Arc::new(b)))),
                Err(_) => Ok(DiskResult::Failed(format!("read of {length} bytes"))),
            },
        };
        result.unwrap_or_else(|e| DiskResult::Failed(e.to_string()))
    }

    fn spawn_meta(
        self: &Arc<Self>,
        id: MetaWriteId,
        state: PersistentState,
        granularity: u64,
        bitmap: Vec<BitmapPage>,
        activity_log: ActivityLogImage,
    ) {
        let driver = Arc::clone(self);
        tokio::spawn(async move {
            let meta = Arc::clone(&driver.meta);
            let result = tokio::task::spawn_blocking(move || {
                // The core has at most one metadata write in flight, so the
                // pages and slots are written in the order it emitted them.
                let mut meta = meta.lock().unwrap_or_else(|e| e.into_inner());
                match meta.write_with_activity_log(state, granularity, &bitmap, &activity_log) {
                    Ok(()) => Ok(()),
                    Err(pairbd_meta::MetaError::TestCrash) => {
                        // Tests only (PAIRBD_TEST_META_CRASH): the process dies
                        // here, as in a crash at this point of the write.
                        error!("simulated crash at a metadata write; exiting");
                        // SAFETY: _exit ends the process immediately.
                        unsafe { libc::_exit(137) }
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
            .unwrap_or_else(|e| Err(format!("metadata writer panicked: {e}")));
            let mut inner = driver.lock();
            inner.node.handle_meta_done(Instant::now(), id, result);
            driver.drive(&mut inner);
        });
    }

    /// Hands a client request to the core; resolves with its reply.
    ///
    /// Requests that arrive while another thread holds the core's lock wait
    /// in `submitted` and are all handed to the core by whichever thread
    /// takes the lock next, and their outputs drained together: one batch
    /// window, so that adjacent writes submitted together can merge. Nothing
    /// waits for a batch; requests in flight together carry no order between
    /// them (NBD), and each is handed over only after it arrived. A submitter
    /// dropped while it waits (its connection cut off) leaves its request to
    /// the next one, which hands it over with the others; its reply then goes
    /// nowhere, as for any request whose client left.
    pub async fn submit(self: &Arc<Self>, op: ClientOp<SharedBuf>) -> Result<(), ReplyError> {
        let (tx, rx) = oneshot::channel();
        let write = matches!(op, ClientOp::Write { fua: false, .. });
        // Bounded by the requests in flight (the NBD server's per-connection
        // limits): each entry's submitter is here, waiting for its reply.
        self.submitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((op, tx));
        if write && self.merge.enabled() {
            // Let the requests the NBD server has already read and spawned
            // (runnable now, typically a client's whole queue) add
            // themselves first: one pass of the scheduler, no timer; with
            // nothing else runnable it returns at once.
            tokio::task::yield_now().await;
        }
        {
            let mut inner = self.lock();
            let batch =
                std::mem::take(&mut *self.submitted.lock().unwrap_or_else(|e| e.into_inner()));
            if !batch.is_empty() {
                let now = Instant::now();
                for (op, tx) in batch {
                    let id = inner.next_request;
                    inner.next_request += 1;
                    inner.replies.insert(id, tx);
                    inner.node.handle_client(now, RequestId(id), op);
                }
                self.drive(&mut inner);
            }
        }
        rx.await.unwrap_or(Err(ReplyError::Stopping))
    }

    /// An operator command; resolves when the core answers.
    pub async fn admin(self: &Arc<Self>, cmd: AdminCommand) -> Result<String, AdminError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.lock();
            let id = inner.next_admin;
            inner.next_admin += 1;
            inner.admins.insert(id, tx);
            inner.node.handle_admin(Instant::now(), AdminId(id), cmd);
            self.drive(&mut inner);
        }
        rx.await
            .unwrap_or_else(|_| Err(AdminError("the node stopped".into())))
    }

    pub fn status(&self) -> Status {
        self.lock().node.status(Instant::now())
    }

    /// Metadata writes since the daemon started.
    /// The state the metadata holds now (what a restart would start from).
    pub fn persisted(&self) -> pairbd_repl_core::PersistentState {
        self.meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record()
            .state
    }

    pub fn meta_writes(&self) -> u64 {
        self.meta.lock().unwrap_or_else(|e| e.into_inner()).writes()
    }

    pub fn serves_clients(&self) -> bool {
        self.lock().node.serves_clients()
    }

    /// Whether the node refuses to link with its peer (split brain).
    pub fn is_standalone(&self) -> bool {
        self.lock().node.is_standalone()
    }

    /// The attached NBD clients.
    pub fn attached_clients(&self) -> Vec<pairbd_nbd_server::ClientInfo> {
        self.clients.get().map(|c| c.list()).unwrap_or_default()
    }

    /// The current link's QUIC counters (none while there is no link).
    pub fn link_stats(&self) -> Option<LinkStats> {
        self.lock().link.as_ref().map(|l| l.conn.stats())
    }

    /// A new authenticated link: it replaces the current one. Returns its id
    /// and the receiving end of its outgoing queue.
    pub fn link_up(self: &Arc<Self>, conn: LinkHandle) -> (u64, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(LINK_QUEUE_MESSAGES);
        let mut inner = self.lock();
        if let Some(old) = inner.link.take() {
            old.conn.close("replaced by a new connection");
            inner
                .node
                .handle_disconnected(Instant::now(), "replaced by a new connection");
        }
        let id = inner.next_link;
        inner.next_link += 1;
        inner.link = Some(CurrentLink { id, tx, conn });
        inner.node.handle_connected(Instant::now());
        self.drive(&mut inner);
        (id, rx)
    }

    /// Link `id` failed or closed.
    pub fn link_lost(self: &Arc<Self>, id: u64, reason: &str) {
        let mut inner = self.lock();
        if inner.link.as_ref().is_some_and(|l| l.id == id) {
            if let Some(link) = inner.link.take() {
                link.conn.close(reason);
            }
            warn!("replication link lost: {reason}");
            inner.node.handle_disconnected(Instant::now(), reason);
            self.drive(&mut inner);
        }
    }

    /// Messages arrived on link `id`, in order: all handled under one lock,
    /// their outputs executed once. Empties `msgs`.
    pub fn messages(self: &Arc<Self>, id: u64, msgs: &mut Vec<Msg>) {
        let mut inner = self.lock();
        if inner.link.as_ref().is_some_and(|l| l.id == id) {
            let now = Instant::now();
            for msg in msgs.drain(..) {
                inner.node.handle_message(now, msg);
            }
            self.drive(&mut inner);
        }
        msgs.clear();
    }

    /// A message that arrived on link `id`'s bulk lane (after every main-lane
    /// frame sent before it was handed over).
    pub fn bulk_message(self: &Arc<Self>, id: u64, msg: Msg) {
        let mut inner = self.lock();
        if inner.link.as_ref().is_some_and(|l| l.id == id) {
            let now = Instant::now();
            inner.node.handle_message_on(now, Lane::Bulk, msg);
            self.drive(&mut inner);
        }
    }

    /// How many messages, and about how many bytes, travel or are handled
    /// together.
    pub fn batch_limits(&self) -> BatchLimits {
        self.batch
    }

    /// Runs the core's timers until the node fails.
    pub async fn run_timers(self: Arc<Self>) {
        loop {
            let deadline = {
                let mut inner = self.lock();
                inner.armed = inner.node.poll_timeout();
                inner.armed
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {
                    let mut inner = self.lock();
                    inner.node.handle_timeout(Instant::now());
                    self.drive(&mut inner);
                }
                _ = self.timer.notified() => {}
                _ = self.failed.cancelled() => return,
            }
        }
    }
}
