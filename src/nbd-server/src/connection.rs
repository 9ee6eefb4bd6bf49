//! One NBD connection: the handshake, then the transmission phase.
//!
//! The transmission phase runs as two halves. The reader half parses request headers,
//! reads WRITE payloads straight into aligned buffers, and spawns one task per request
//! that calls the volume; those tasks hand their replies to the writer half through a
//! bounded channel, so replies leave in completion order, not request order. Two
//! semaphores bound the requests and the payload bytes in flight: when either is
//! exhausted the reader stops reading the socket, which is the backpressure the client
//! sees.

use std::io;
use std::sync::Arc;
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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_in_flight_requests: 256,
            max_in_flight_bytes: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    fn normalised(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_in_flight_requests: self.max_in_flight_requests.max(1),
            max_in_flight_bytes: self.max_in_flight_bytes.max(MAX_PAYLOAD_BYTES as usize),
            handshake_timeout: self.handshake_timeout,
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
    let handshake = tokio::time::timeout(
        limits.handshake_timeout,
        negotiate(&context, &mut reader, &mut writer),
    )
    .await;
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
    let reader = BufReader::with_capacity(256 * 1024, std::io::Cursor::new(leftover).chain(reader));
    let outcome = transmit(&context, &limits, reader, writer).await;
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
        refusal: None,
    }
}

/// The transmission phase. Returns a short word for the log saying how it ended.
async fn transmit<R, W, V>(
    context: &ConnectionContext<V>,
    limits: &ConnectionLimits,
    mut reader: R,
    writer: W,
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
    let (reply_sender, reply_receiver) = mpsc::channel::<Reply>(limits.max_in_flight_requests);
    // Cancelled by the writer when the socket breaks, and by server shutdown.
    let stop_reading = context.shutdown.child_token();
    let writer_task = tokio::spawn(write_replies(writer, reply_receiver, stop_reading.clone()));
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
        let Ok(request_permit) = requests.clone().acquire_owned().await else {
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
                if reply_sender.send(reply).await.is_err() {
                    break "socket error";
                }
                continue;
            }
        };
        let handle = header.handle;
        let volume = Arc::clone(&context.volume);
        let replies = reply_sender.clone();
        match command {
            Command::Disconnect => break "client disconnected",
            Command::Write {
                offset,
                length,
                fua,
            } => {
                let Ok(bytes_permit) = bytes.clone().acquire_many_owned(length).await else {
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
                let Ok(bytes_permit) = bytes.clone().acquire_many_owned(length).await else {
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
    // Every accepted request still answers: the writer ends once the last request
    // task has dropped its sender.
    drop(reply_sender);
    let _ = writer_task.await;
    ending
}

async fn send(
    replies: &mpsc::Sender<Reply>,
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
    // A closed channel means the socket is gone; the client will never read this reply.
    let _ = replies.send(reply).await;
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

/// The writer half: writes replies as they complete, batching whatever is queued
/// into one socket write.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut replies: mpsc::Receiver<Reply>,
    stop_reading: CancellationToken,
) {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    while let Some(reply) = replies.recv().await {
        let mut next = Some(reply);
        let mut result = Ok(());
        while let Some(reply) = next.take() {
            result = write_reply(&mut writer, reply).await;
            if result.is_err() {
                break;
            }
            next = replies.try_recv().ok();
        }
        if result.is_ok() {
            result = writer.flush().await;
        }
        if result.is_err() {
            stop_reading.cancel();
            return;
        }
    }
    let _ = writer.shutdown().await;
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
