//! One NBD connection: the handshake, then the transmission phase.
//!
//! The transmission phase: the reader parses request headers, reads WRITE payloads
//! straight into aligned buffers, and spawns one task per request that calls the
//! volume. Each task then writes its own reply through the shared [`ReplySink`] —
//! unless another task is writing at that moment, in which case it queues the reply
//! and that writer sends it in the same batch. Replies leave in completion order, not
//! request order, with no hand-off to a writer thread on the way. Two semaphores bound
//! the requests and the payload bytes in flight: when either is exhausted the reader
//! stops reading the socket, which is the backpressure the client sees.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pairbd_nbd_proto::consts;
use pairbd_nbd_proto::handshake::{BlockSizes, ExportInfo, Handshake, HandshakeLimits, Outcome};
use pairbd_nbd_proto::transmission::{
    decode_request_header, encode_simple_reply, validate, Command, ExportLimits, Validated,
    REQUEST_HEADER_LEN,
};
use pairbd_nbd_proto::NbdError;
use pairbd_store::AlignedBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clients::{ClientInfo, Clients};
use crate::volume::{Volume, VolumeError};

/// The largest READ or WRITE payload a client may send (advertised as the maximum
/// block size). TRIM and WRITE_ZEROES carry no payload and are not limited by it.
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;

/// The bounds of one connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Requests accepted but not yet answered.
    pub max_in_flight_requests: usize,
    /// READ and WRITE payload bytes held in memory for requests not yet answered.
    /// At least [`MAX_PAYLOAD_BYTES`], so the largest single request always fits.
    pub max_in_flight_bytes: usize,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// Connections the server holds at once (over all listeners); further clients
    /// wait in the listen backlog until one closes.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_in_flight_requests: 256,
            max_in_flight_bytes: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 128,
        }
    }
}

impl ConnectionLimits {
    pub(crate) fn normalised(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_in_flight_requests: self.max_in_flight_requests.max(1),
            max_in_flight_bytes: self.max_in_flight_bytes.max(MAX_PAYLOAD_BYTES as usize),
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections.max(1),
        }
    }
}

/// What the connection serves, fixed when it was accepted.
pub(crate) struct ConnectionContext<V> {
    pub id: u64,
    pub peer: String,
    pub export_name: String,
    pub volume: Arc<V>,
    pub limits: ConnectionLimits,
    pub shutdown: CancellationToken,
    pub clients: Clients,
}

/// A reply on its way to the writer half. The permits travel with it so that the
/// bytes of a READ stay accounted for until they are on the socket.
struct Reply {
    handle: u64,
    error: Option<NbdError>,
    data: Option<AlignedBuf>,
    _request_permit: OwnedSemaphorePermit,
    _bytes_permit: Option<OwnedSemaphorePermit>,
}

/// Serves one connection until the client disconnects, misbehaves, or the server
/// shuts down. In every case the requests already accepted are answered first.
pub(crate) async fn serve<R, W, V>(context: ConnectionContext<V>, reader: R, mut writer: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    V: Volume,
{
    let limits = context.limits.normalised();
    let mut reader = reader;
    let handshake = tokio::select! {
        _ = context.shutdown.cancelled() => return,
        result = tokio::time::timeout(
            limits.handshake_timeout,
            negotiate(&context, &mut reader, &mut writer),
        ) => result,
    };
    let leftover = match handshake {
        Err(_) => {
            info!(conn = context.id, peer = %context.peer, "handshake timed out; closing");
            return;
        }
        Ok(Err(error)) => {
            debug!(conn = context.id, peer = %context.peer, %error, "handshake ended");
            return;
        }
        Ok(Ok(leftover)) => leftover,
    };
    info!(conn = context.id, peer = %context.peer, export = %context.export_name, "client attached");
    let kill = CancellationToken::new();
    let _attached = context.clients.attach(
        ClientInfo {
            id: context.id,
            peer: context.peer.clone(),
            export: context.export_name.clone(),
            since: std::time::SystemTime::now(),
        },
        kill.clone(),
    );
    let reader = BufReader::with_capacity(256 * 1024, std::io::Cursor::new(leftover).chain(reader));
    let outcome = transmit(&context, &limits, reader, writer, kill).await;
    info!(conn = context.id, peer = %context.peer, outcome, "client detached");
}

/// Why the handshake did not reach the transmission phase.
#[derive(Debug, thiserror::Error)]
enum HandshakeEnd {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("client closed the connection during the handshake")]
    Eof,
    #[error("closed by the handshake: {0}")]
    Closed(String),
}

/// Runs the fixed-newstyle handshake; returns the bytes already read that belong to
/// the transmission phase.
async fn negotiate<R, W, V>(
    context: &ConnectionContext<V>,
    reader: &mut R,
    writer: &mut W,
) -> Result<Vec<u8>, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    V: Volume,
{
    let mut handshake = Handshake::new(vec![export_info(context)], HandshakeLimits::default());
    let mut input: Vec<u8> = Vec::with_capacity(4096);
    let mut output: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        handshake.poll_transmit(&mut output);
        if !output.is_empty() {
            writer.write_all(&output).await?;
            writer.flush().await?;
            output.clear();
        }
        match handshake.outcome() {
            Outcome::Negotiating => {}
            Outcome::Transmission { .. } => return Ok(input),
            Outcome::Closed(reason) => return Err(HandshakeEnd::Closed(reason.to_string())),
        }
        if !input.is_empty() {
            let consumed = handshake.handle_input(&input);
            input.drain(..consumed.min(input.len()));
            if consumed > 0 {
                continue;
            }
        }
        let read = reader.read(&mut chunk).await?;
        if read == 0 {
            return Err(HandshakeEnd::Eof);
        }
        input.extend_from_slice(&chunk[..read]);
    }
}

fn export_info<V: Volume>(context: &ConnectionContext<V>) -> ExportInfo {
    let volume = &context.volume;
    let mut flags = consts::NBD_FLAG_HAS_FLAGS
        | consts::NBD_FLAG_SEND_FLUSH
        | consts::NBD_FLAG_SEND_FUA
        | consts::NBD_FLAG_SEND_TRIM
        | consts::NBD_FLAG_SEND_WRITE_ZEROES
        | consts::NBD_FLAG_SEND_FAST_ZERO
        | consts::NBD_FLAG_SEND_CACHE
        | consts::NBD_FLAG_CAN_MULTI_CONN;
    if volume.read_only() {
        flags |= consts::NBD_FLAG_READ_ONLY;
    }
    ExportInfo {
        name: context.export_name.clone(),
        description: volume.description(),
        size_bytes: volume.size_bytes(),
        transmission_flags: flags,
        block_sizes: BlockSizes {
            // 512 even for buffered I/O (which takes any offset): the kernel client's
            // sector size, and what qemu and libnbd round their requests to.
            minimum: volume.alignment().max(512),
            preferred: 4096,
            maximum: MAX_PAYLOAD_BYTES,
        },
        refusal: volume.refusal(),
    }
}

/// The transmission phase. Returns a short word for the log saying how it ended.
async fn transmit<R, W, V>(
    context: &ConnectionContext<V>,
    limits: &ConnectionLimits,
    mut reader: R,
    writer: W,
    kill: CancellationToken,
) -> &'static str
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
    V: Volume,
{
    let export_limits = ExportLimits {
        size_bytes: context.volume.size_bytes(),
        read_only: context.volume.read_only(),
        max_payload: MAX_PAYLOAD_BYTES,
        alignment: context.volume.alignment(),
    };
    // Cancelled by server shutdown, and by a reply writer when the socket breaks.
    let stop_reading = context.shutdown.child_token();
    let replies = Arc::new(ReplySink::new(writer, stop_reading.clone()));
    // An operator's cut (`demote --force`): stop reading, drop the replies
    // still owed, close the socket.
    let cut = {
        let replies = Arc::clone(&replies);
        let kill = kill.clone();
        tokio::spawn(async move {
            kill.cancelled().await;
            replies.kill().await;
        })
    };
    let requests = Arc::new(Semaphore::new(limits.max_in_flight_requests));
    let bytes = Arc::new(Semaphore::new(limits.max_in_flight_bytes));

    let ending = loop {
        let mut header_bytes = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = stop_reading.cancelled() => break "stopped",
            read = reader.read_exact(&mut header_bytes) => match read {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break "client closed",
                Err(_) => break "socket error",
            },
        }
        let header = match decode_request_header(&header_bytes) {
            Ok(header) => header,
            Err(error) => {
                warn!(conn = context.id, peer = %context.peer, %error, "bad request; closing the connection");
                break "bad request magic";
            }
        };
        let Some(request_permit) =
            until_stopped(&stop_reading, requests.clone().acquire_many_owned(1)).await
        else {
            break "stopped";
        };
        let command = match validate(&header, &export_limits) {
            Validated::Accept(command) => command,
            Validated::Reject {
                error,
                payload_to_discard,
            } => {
                debug!(
                    conn = context.id,
                    kind = header.kind,
                    offset = header.offset,
                    length = header.length,
                    ?error,
                    "request rejected"
                );
                if discard(&mut reader, payload_to_discard).await.is_err() {
                    break "client closed";
                }
                let reply = Reply {
                    handle: header.handle,
                    error: Some(error),
                    data: None,
                    _request_permit: request_permit,
                    _bytes_permit: None,
                };
                replies.push(reply).await;
                continue;
            }
        };
        let handle = header.handle;
        let volume = Arc::clone(&context.volume);
        let replies = Arc::clone(&replies);
        match command {
            Command::Disconnect => break "client disconnected",
            Command::Write {
                offset,
                length,
                fua,
            } => {
                let Some(bytes_permit) =
                    until_stopped(&stop_reading, bytes.clone().acquire_many_owned(length)).await
                else {
                    break "stopped";
                };
                let mut payload = AlignedBuf::for_overwrite(length as usize);
                if reader.read_exact(&mut payload).await.is_err() {
                    break "client closed mid-write";
                }
                tokio::spawn(async move {
                    let error = volume.write(offset, payload, fua).await.err();
                    send(
                        &replies,
                        handle,
                        error,
                        None,
                        request_permit,
                        Some(bytes_permit),
                    )
                    .await;
                });
            }
            Command::Read { offset, length } => {
                let Some(bytes_permit) =
                    until_stopped(&stop_reading, bytes.clone().acquire_many_owned(length)).await
                else {
                    break "stopped";
                };
                tokio::spawn(async move {
                    let (data, error) = match volume.read(offset, length as usize).await {
                        Ok(data) => (Some(data), None),
                        Err(error) => (None, Some(error)),
                    };
                    send(
                        &replies,
                        handle,
                        error,
                        data,
                        request_permit,
                        Some(bytes_permit),
                    )
                    .await;
                });
            }
            Command::Flush => {
                tokio::spawn(async move {
                    let error = volume.flush().await.err();
                    send(&replies, handle, error, None, request_permit, None).await;
                });
            }
            Command::Trim {
                offset,
                length,
                fua,
            } => {
                tokio::spawn(async move {
                    let mut result = volume.trim(offset, u64::from(length)).await;
                    if result.is_ok() && fua {
                        result = volume.flush().await;
                    }
                    send(&replies, handle, result.err(), None, request_permit, None).await;
                });
            }
            Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast_zero,
            } => {
                tokio::spawn(async move {
                    let mut result = volume
                        .write_zeroes(offset, u64::from(length), no_hole, fast_zero)
                        .await;
                    if result.is_ok() && fua {
                        result = volume.flush().await;
                    }
                    send(&replies, handle, result.err(), None, request_permit, None).await;
                });
            }
            Command::Cache { .. } => {
                // The page cache (or the disk) already serves reads; nothing to prefetch.
                send(&replies, handle, None, None, request_permit, None).await;
            }
        }
    };
    // Every accepted request still answers: each holds a request permit until its
    // reply is written (or the socket is gone), so holding them all means done.
    // A client that stopped reading cannot hold up a server shutdown for ever: after
    // shutdown it gets SHUTDOWN_GRACE to take its replies, then the socket is dropped.
    let all = u32::try_from(limits.max_in_flight_requests).unwrap_or(u32::MAX);
    let shutdown_deadline = async {
        context.shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = kill.cancelled() => {
            info!(conn = context.id, peer = %context.peer, "disconnected by the operator");
        }
        _ = requests.acquire_many(all) => replies.close().await,
        _ = shutdown_deadline => {
            warn!(conn = context.id, peer = %context.peer,
                  "shutdown: the client did not take all its replies in time; dropping the connection");
        }
    }
    if kill.is_cancelled() {
        // The cut task closes the socket (it may wait for a reply being
        // written); let it run.
        return "disconnected by the operator";
    }
    cut.abort();
    ending
}

/// How long a connection may take, after server shutdown began, to deliver the replies
/// of requests it had accepted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Waits for a semaphore permit unless the reader is told to stop first.
async fn until_stopped(
    stop_reading: &CancellationToken,
    acquire: impl std::future::Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = stop_reading.cancelled() => None,
        permit = acquire => permit.ok(),
    }
}

async fn send<W: AsyncWrite + Unpin + Send>(
    replies: &ReplySink<W>,
    handle: u64,
    error: Option<VolumeError>,
    data: Option<AlignedBuf>,
    request_permit: OwnedSemaphorePermit,
    bytes_permit: Option<OwnedSemaphorePermit>,
) {
    if let Some(error) = &error {
        warn!(handle, %error, "request failed");
    }
    let reply = Reply {
        handle,
        error: error.map(|error| error.nbd_error()),
        data,
        _request_permit: request_permit,
        _bytes_permit: bytes_permit,
    };
    replies.push(reply).await;
}

/// Reads and drops `length` bytes: the payload of a rejected WRITE.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, length: u32) -> io::Result<()> {
    let mut remaining = u64::from(length);
    let mut sink = [0u8; 64 * 1024];
    while remaining > 0 {
        let want = remaining.min(sink.len() as u64) as usize;
        reader.read_exact(&mut sink[..want]).await?;
        remaining -= want as u64;
    }
    Ok(())
}

/// The reply side of a connection, shared by its request tasks.
///
/// A task queues its reply, then tries to become the writer: the writer drains the
/// queue into the socket (one batch, one flush), lets go, and looks at the queue once
/// more, because a task that queued while it was writing found the writer busy and
/// left its reply to it. The queue is bounded by the connection's request permits,
/// which the queued replies hold.
struct ReplySink<W> {
    queue: Mutex<VecDeque<Reply>>,
    writer: tokio::sync::Mutex<BufWriter<W>>,
    /// Set when a write to the socket failed: later replies are dropped unsent.
    broken: AtomicBool,
    /// Cancelled when the socket breaks, so that the reader stops too. (Server
    /// shutdown cancels it as well; that must not drop replies, hence `broken`.)
    stop_reading: CancellationToken,
}

impl<W: AsyncWrite + Unpin + Send> ReplySink<W> {
    fn new(writer: W, stop_reading: CancellationToken) -> ReplySink<W> {
        ReplySink {
            queue: Mutex::new(VecDeque::new()),
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(64 * 1024, writer)),
            broken: AtomicBool::new(false),
            stop_reading,
        }
    }

    fn queue_is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn take_queued(&self) -> VecDeque<Reply> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sends `reply`, now or as part of the batch of the task writing at this moment.
    async fn push(&self, reply: Reply) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(reply);
        loop {
            let Ok(mut writer) = self.writer.try_lock() else {
                // Whoever holds the writer looks at the queue again before it is done.
                return;
            };
            let batch = self.take_queued();
            if batch.is_empty() {
                // Let go first, then look once more: a task that queued between our
                // look and our letting go found us busy and relies on that second look.
                drop(writer);
                if self.queue_is_empty() {
                    return;
                }
                continue;
            }
            if self.broken.load(Ordering::Relaxed) {
                // The socket is gone: nobody will read these; dropping them releases
                // their permits.
                continue;
            }
            let mut result = Ok(());
            for reply in batch {
                if result.is_ok() {
                    result = write_reply(&mut *writer, reply).await;
                }
            }
            if result.is_ok() {
                result = writer.flush().await;
            }
            if result.is_err() {
                self.broken.store(true, Ordering::Relaxed);
                self.stop_reading.cancel();
            }
        }
    }

    /// Cuts the connection off: later replies are dropped, the reader stops,
    /// the write side closes.
    async fn kill(&self) {
        self.broken.store(true, Ordering::Relaxed);
        self.stop_reading.cancel();
        let mut writer = self.writer.lock().await;
        let _ = writer.get_mut().shutdown().await;
    }

    /// Closes the write side once every reply is out.
    async fn close(&self) {
        let mut writer = self.writer.lock().await;
        let _ = writer.shutdown().await;
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(writer: &mut W, reply: Reply) -> io::Result<()> {
    writer
        .write_all(&encode_simple_reply(reply.handle, reply.error))
        .await?;
    if reply.error.is_none() {
        if let Some(data) = &reply.data {
            writer.write_all(data).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The transmission phase against an in-memory volume over an in-process pipe:
    //! pipelined requests, the request limit's backpressure, and replies that back up
    //! while the client is still sending.

    use std::collections::HashMap;

    use pairbd_nbd_proto::transmission::{decode_simple_reply, encode_request_header};
    use pairbd_nbd_proto::transmission::{RequestHeader, SIMPLE_REPLY_HEADER_LEN};
    use tokio::io::DuplexStream;

    use super::*;

    const VOLUME_BYTES: usize = 8 << 20;

    /// An in-memory volume. With `defer`, every read and write returns `Pending` once
    /// before completing (as a call that waits for a disk or a peer does).
    struct MemVolume {
        data: Mutex<Vec<u8>>,
        defer: bool,
        flushes: std::sync::atomic::AtomicU64,
    }

    impl MemVolume {
        fn new(defer: bool) -> MemVolume {
            MemVolume {
                data: Mutex::new(vec![0; VOLUME_BYTES]),
                defer,
                flushes: std::sync::atomic::AtomicU64::new(0),
            }
        }

        async fn maybe_defer(&self) {
            if self.defer {
                tokio::task::yield_now().await;
            }
        }
    }

    impl Volume for MemVolume {
        fn size_bytes(&self) -> u64 {
            VOLUME_BYTES as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn alignment(&self) -> u32 {
            1
        }
        fn description(&self) -> String {
            "test".into()
        }
        async fn read(&self, offset: u64, length: usize) -> Result<AlignedBuf, VolumeError> {
            self.maybe_defer().await;
            let data = self.data.lock().expect("lock");
            let start = offset as usize;
            Ok(AlignedBuf::from_slice(&data[start..start + length]))
        }
        async fn write(
            &self,
            offset: u64,
            payload: AlignedBuf,
            _fua: bool,
        ) -> Result<(), VolumeError> {
            self.maybe_defer().await;
            let mut data = self.data.lock().expect("lock");
            let start = offset as usize;
            data[start..start + payload.len()].copy_from_slice(&payload);
            Ok(())
        }
        async fn flush(&self) -> Result<(), VolumeError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn trim(&self, _offset: u64, _length: u64) -> Result<(), VolumeError> {
            Ok(())
        }
        async fn write_zeroes(
            &self,
            _offset: u64,
            _length: u64,
            _no_hole: bool,
            _fast_only: bool,
        ) -> Result<(), VolumeError> {
            Ok(())
        }
    }

    /// A transmission phase running on one end of a pipe; the test holds the other.
    struct Harness {
        client: DuplexStream,
        volume: Arc<MemVolume>,
        server: tokio::task::JoinHandle<&'static str>,
    }

    impl Harness {
        /// `pipe_bytes` is the buffer of each direction of the pipe.
        fn start(volume: MemVolume, max_in_flight_requests: usize, pipe_bytes: usize) -> Harness {
            let (client, server_end) = tokio::io::duplex(pipe_bytes);
            let volume = Arc::new(volume);
            let limits = ConnectionLimits {
                max_in_flight_requests,
                ..ConnectionLimits::default()
            };
            let context = ConnectionContext {
                id: 1,
                peer: "test".into(),
                export_name: String::new(),
                volume: Arc::clone(&volume),
                limits: limits.clone(),
                shutdown: CancellationToken::new(),
                clients: Clients::default(),
            };
            let server = tokio::spawn(async move {
                let (reader, writer) = tokio::io::split(server_end);
                let reader = BufReader::with_capacity(256 * 1024, reader);
                transmit(
                    &context,
                    &limits.normalised(),
                    reader,
                    writer,
                    CancellationToken::new(),
                )
                .await
            });
            Harness {
                client,
                volume,
                server,
            }
        }

        /// Reads `count` replies; `read_lengths` names the handles of READs and their
        /// lengths. Returns the data of each READ by handle, and checks that every reply
        /// is a success and no handle is answered twice.
        async fn replies(
            &mut self,
            count: usize,
            read_lengths: &HashMap<u64, usize>,
        ) -> HashMap<u64, Vec<u8>> {
            let mut answered = HashMap::new();
            for _ in 0..count {
                let mut header = [0u8; SIMPLE_REPLY_HEADER_LEN];
                self.client
                    .read_exact(&mut header)
                    .await
                    .expect("reply header");
                let (handle, error) = decode_simple_reply(&header).expect("reply magic");
                assert_eq!(error, 0, "request {handle} failed");
                let mut data = vec![0u8; read_lengths.get(&handle).copied().unwrap_or(0)];
                self.client.read_exact(&mut data).await.expect("read data");
                assert!(
                    answered.insert(handle, data).is_none(),
                    "request {handle} answered twice"
                );
            }
            answered
        }

        /// Closes the client's side and waits for the server to finish.
        async fn finish(self) -> &'static str {
            drop(self.client);
            self.server.await.expect("transmit task")
        }
    }

    fn request(kind: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
        encode_request_header(&RequestHeader {
            flags: 0,
            kind,
            handle,
            offset,
            length,
        })
        .to_vec()
    }

    fn pattern(seed: u64, length: usize) -> Vec<u8> {
        (0..length)
            .map(|index| (seed as usize * 131 + index * 7 % 251) as u8)
            .collect()
    }

    /// 24 writes (every fourth one 128 KiB) and a flush, pipelined in one burst, are
    /// each answered once; then 24 pipelined reads return what was written.
    async fn pipelined_writes_then_reads(defer: bool) {
        let mut harness = Harness::start(MemVolume::new(defer), 256, 4 << 20);
        let length = |index: u64| if index % 4 == 3 { 128 * 1024 } else { 4096 };
        let offset = |index: u64| index * 256 * 1024;
        let mut burst = Vec::new();
        for index in 0..24u64 {
            burst.extend(request(
                consts::NBD_CMD_WRITE,
                index,
                offset(index),
                length(index),
            ));
            burst.extend(pattern(index, length(index) as usize));
        }
        burst.extend(request(consts::NBD_CMD_FLUSH, 100, 0, 0));
        harness.client.write_all(&burst).await.expect("send writes");
        harness.replies(25, &HashMap::new()).await;
        assert_eq!(harness.volume.flushes.load(Ordering::SeqCst), 1);

        let mut burst = Vec::new();
        let mut read_lengths = HashMap::new();
        for index in 0..24u64 {
            burst.extend(request(
                consts::NBD_CMD_READ,
                1000 + index,
                offset(index),
                length(index),
            ));
            read_lengths.insert(1000 + index, length(index) as usize);
        }
        harness.client.write_all(&burst).await.expect("send reads");
        let data = harness.replies(24, &read_lengths).await;
        for index in 0..24u64 {
            assert!(
                data[&(1000 + index)] == pattern(index, length(index) as usize),
                "read {index} did not return what was written"
            );
        }
        assert_eq!(harness.finish().await, "client closed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_are_all_answered() {
        pipelined_writes_then_reads(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_are_all_answered_when_calls_wait() {
        pipelined_writes_then_reads(true).await;
    }

    /// With one request permit, a burst of 64 small writes is still answered: the
    /// reader waits for each reply to return the permit before it takes the next
    /// request, and never waits for itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_request_permit_still_serves_a_burst() {
        let mut harness = Harness::start(MemVolume::new(false), 1, 4 << 20);
        let mut burst = Vec::new();
        for index in 0..64u64 {
            burst.extend(request(consts::NBD_CMD_WRITE, index, index * 4096, 4096));
            burst.extend(pattern(index, 4096));
        }
        harness.client.write_all(&burst).await.expect("send");
        // A deadlock shows as this bound expiring, not as a hung test run.
        tokio::time::timeout(
            Duration::from_secs(60),
            harness.replies(64, &HashMap::new()),
        )
        .await
        .expect("the 64 writes were not all answered");
        assert_eq!(harness.finish().await, "client closed");
    }

    /// A lone request is answered without the client sending anything more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_request_is_answered_without_more_input() {
        let mut harness = Harness::start(MemVolume::new(false), 256, 4 << 20);
        let mut burst = request(consts::NBD_CMD_WRITE, 7, 4096, 512);
        burst.extend(pattern(7, 512));
        harness.client.write_all(&burst).await.expect("send");
        let answered =
            tokio::time::timeout(Duration::from_secs(60), harness.replies(1, &HashMap::new()))
                .await
                .expect("the lone write was not answered");
        assert!(answered.contains_key(&7));
        assert_eq!(harness.finish().await, "client closed");
    }

    /// A client that sends all its requests before reading any reply (as the raw test
    /// client does) over a pipe much smaller than the replies: the reader must keep
    /// reading while the socket refuses more replies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_keeps_reading_while_replies_back_up() {
        let mut harness = Harness::start(MemVolume::new(false), 256, 64 * 1024);
        let mut burst = Vec::new();
        let mut read_lengths = HashMap::new();
        for index in 0..48u64 {
            let offset = index * 64 * 1024;
            if index % 2 == 1 {
                burst.extend(request(consts::NBD_CMD_READ, index, offset, 64 * 1024));
                read_lengths.insert(index, 64 * 1024);
            } else {
                burst.extend(request(consts::NBD_CMD_WRITE, index, offset, 64 * 1024));
                burst.extend(pattern(index, 64 * 1024));
            }
        }
        // 1.5 MiB of requests and 1.5 MiB of replies through 64 KiB pipes: the send
        // completes only if the server reads on while its replies wait.
        tokio::time::timeout(Duration::from_secs(60), harness.client.write_all(&burst))
            .await
            .expect("the server stopped reading while its replies backed up")
            .expect("send");
        let answered = harness.replies(48, &read_lengths).await;
        assert_eq!(answered.len(), 48);
        assert_eq!(harness.finish().await, "client closed");
    }
}
