//! The replication link: QUIC (quinn) with mutual TLS 1.3 on pinned
//! certificates, carrying replication frames on two ordered streams (the
//! main and the bulk lane).
//!
//! Each node has a self-signed certificate ([`generate_certificate`]) and trusts
//! exactly one other certificate, its peer's, compared byte for byte; any other
//! certificate — same name or not — fails the handshake, which is logged and
//! changes nothing. TLS 1.3 only (QUIC allows nothing else), no 0-RTT.
//!
//! A connection carries two bidirectional streams, the link's two lanes
//! (`pairbd_repl_proto::Lane`): the main stream, which the dialer opens first
//! and on which it sends first, and the bulk stream, which the dialer opens
//! second and starts with [`BULK_PREAMBLE`]. quinn's fair queuing sends the
//! two streams' data in turns, packet by packet, so a 1 MiB write on the bulk
//! stream delays the acks, flushes and small writes queued behind it by
//! about one packet, not by the whole write. [`Link::split_lanes`] gives a
//! [`FrameSender`] and a [`FrameReceiver`] per lane ([`Link::split`]: the
//! main lane only); data payloads go out beside their header without a copy
//! and come in straight into a buffer the caller allocates (aligned, for the
//! store).

mod pinned;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use pairbd_repl_proto::{
    decode_frame, decode_header, try_encode_frame, FrameError, Message, HEADER_LEN,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::warn;

/// The ALPN protocol name of the replication link.
pub const ALPN: &[u8] = b"pairbd/1";
/// The first bytes on the bulk stream: the dialer writes them as soon as it
/// opened the stream (a QUIC stream is announced by its first data), and
/// the acceptor checks them, so the two streams cannot be mistaken for each
/// other.
pub const BULK_PREAMBLE: &[u8; 8] = b"PBDRBULK";

/// The TLS server name the dialer presents (certificates are pinned, so the
/// name is not what decides trust).
const SERVER_NAME: &str = "pairbd-peer";

/// Link failures.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A certificate or key file could not be read or parsed.
    #[error("{what} {path}: {detail}")]
    File {
        what: &'static str,
        path: String,
        detail: String,
    },
    /// The TLS or transport configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The UDP address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Dialing failed: unreachable, or the handshake failed (a wrong
    /// certificate on either side ends up here).
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    /// [`Endpoint::close`] was called.
    #[error("the endpoint is closed")]
    EndpointClosed,
    /// The connection died (timed out, closed by the peer, reset).
    #[error("connection lost: {0}")]
    Connection(String),
    /// The peer finished the stream cleanly.
    #[error("the peer closed the stream")]
    Closed,
    /// The peer sent bytes that are not a valid frame; drop the connection.
    #[error("bad frame from the peer: {0}")]
    Frame(#[from] FrameError),
    /// A local message breaks a protocol limit; nothing was sent.
    #[error("cannot send a {kind} message: {source}")]
    Unsendable {
        kind: &'static str,
        #[source]
        source: FrameError,
    },
    /// The receive allocator returned a buffer of the wrong size.
    #[error("the payload buffer has {got} bytes, the frame needs {expected}")]
    BufferSize { expected: usize, got: usize },
    /// An authenticated peer opened no stream in time (logged by `accept`).
    #[error("the peer at {addr} opened no stream within {waited:?}")]
    NoStream { addr: SocketAddr, waited: Duration },
    /// rcgen could not make a certificate.
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// A node's certificate and private key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a PEM certificate and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, LinkError> {
        Ok(Identity {
            cert: load_certificate(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| LinkError::File {
                what: "private key",
                path: key.display().to_string(),
                detail: e.to_string(),
            })?,
        })
    }

    /// Parses PEM text (tests).
    pub fn from_pem(cert: &str, key: &str) -> Result<Identity, LinkError> {
        let bad = |what: &'static str| {
            move |e: rustls_pki_types::pem::Error| LinkError::File {
                what,
                path: "(memory)".into(),
                detail: e.to_string(),
            }
        };
        Ok(Identity {
            cert: CertificateDer::from_pem_slice(cert.as_bytes()).map_err(bad("certificate"))?,
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(bad("private key"))?,
        })
    }
}

/// Loads one PEM certificate.
pub fn load_certificate(path: &Path) -> Result<CertificateDer<'static>, LinkError> {
    CertificateDer::from_pem_file(path).map_err(|e| LinkError::File {
        what: "certificate",
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// A self-signed certificate (ECDSA P-256) for `node_name`: (cert PEM, key PEM).
pub fn generate_certificate(node_name: &str) -> Result<(String, String), LinkError> {
    let ck = rcgen::generate_simple_self_signed(vec![node_name.to_string()])
        .map_err(|e| LinkError::Generate(e.to_string()))?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

/// How to set up an endpoint.
pub struct LinkConfig {
    /// This node's certificate and key.
    pub identity: Identity,
    /// The only certificate this node trusts: its peer's.
    pub peer_cert: CertificateDer<'static>,
    /// The UDP address to bind.
    pub bind: SocketAddr,
    /// A peer silent this long is gone (keep-alives go out at a quarter of it).
    pub ping_timeout: Duration,
}

/// A QUIC endpoint that both accepts and dials.
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// How long an accepted peer may take to open its stream.
    ping_timeout: Duration,
}

/// The largest UDP payload path MTU discovery searches for, and the largest
/// this endpoint accepts (quinn's `max_udp_payload_size`, which caps the
/// peer's discovery; its default, 1472, kept every link at Ethernet size
/// even on loopback or jumbo frames).
///
/// Not the 8952 of jumbo frames: quinn sends up to 10 datagrams in one
/// segmentation-offload (GSO) call, and the kernel refuses a call of more
/// than 64 KiB; quinn takes the refusal for a lost MTU probe, so 10 × 8952
/// bytes lost every batch, and its black-hole detection fell back to 1200
/// bytes (measured: 54 packets lost and an MTU of 1200 after a 1 GiB sync on
/// loopback). 10 × 6500 bytes fits. On loopback a 1 GiB full sync then
/// moves 166,000 datagrams instead of 746,000 and runs nearly twice as fast.
const MTU_UPPER_BOUND: u16 = 6500;

/// SO_RCVBUF / SO_SNDBUF asked for on the link's UDP socket (the kernel
/// caps it at net.core.rmem_max / wmem_max). The default (208 KiB) drops
/// datagrams of a burst of large writes, and each drop makes QUIC halve its
/// congestion window.
const UDP_BUFFER_BYTES: usize = 8 << 20;

fn transport(ping_timeout: Duration) -> Result<TransportConfig, LinkError> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(ping_timeout).map_err(|e| LinkError::Tls(e.to_string()))?,
    ));
    t.keep_alive_interval(Some(ping_timeout / 4));
    // Room for several 32 MiB writes in flight: a window below one frame
    // would stall every large write on a round trip.
    t.stream_receive_window(VarInt::from_u32(128 << 20));
    t.receive_window(VarInt::from_u32(256 << 20));
    t.send_window(256 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(4));
    // Path MTU discovery may climb past Ethernet's 1500 bytes where the path
    // allows it (jumbo frames, loopback): a 1 MiB write then costs a few
    // dozen packets to encrypt and process instead of ~730. Where the path
    // is 1500 bytes, discovery stops there as before.
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    Ok(t)
}

impl Endpoint {
    /// Binds `cfg.bind` with this node's identity and its peer's pinned certificate.
    pub fn bind(cfg: LinkConfig) -> Result<Endpoint, LinkError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = |e: rustls::Error| LinkError::Tls(e.to_string());
        let pinned = Arc::new(pinned::PinnedPeer::new(
            cfg.peer_cert.clone(),
            Arc::clone(&provider),
        ));
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(pinned.clone())
            .with_single_cert(
                vec![cfg.identity.cert.clone()],
                cfg.identity.key.clone_key(),
            )
            .map_err(tls)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(pinned)
            .with_client_auth_cert(vec![cfg.identity.cert], cfg.identity.key)
            .map_err(tls)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let transport = Arc::new(transport(cfg.ping_timeout)?);
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).map_err(|e| LinkError::Tls(e.to_string()))?,
        ));
        server_cfg.transport_config(Arc::clone(&transport));
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client).map_err(|e| LinkError::Tls(e.to_string()))?,
        ));
        client_cfg.transport_config(transport);
        let bind_err = |source| LinkError::Bind {
            addr: cfg.bind,
            source,
        };
        let socket = std::net::UdpSocket::bind(cfg.bind).map_err(bind_err)?;
        let sock = socket2::SockRef::from(&socket);
        if let Err(e) = sock.set_recv_buffer_size(UDP_BUFFER_BYTES) {
            warn!("cannot set the link's UDP receive buffer: {e}");
        }
        if let Err(e) = sock.set_send_buffer_size(UDP_BUFFER_BYTES) {
            warn!("cannot set the link's UDP send buffer: {e}");
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| LinkError::Tls("no async runtime for the endpoint".into()))?;
        let mut endpoint_cfg = quinn::EndpointConfig::default();
        endpoint_cfg
            .max_udp_payload_size(MTU_UPPER_BOUND)
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        let endpoint = quinn::Endpoint::new(endpoint_cfg, Some(server_cfg), socket, runtime)
            .map_err(bind_err)?;
        Ok(Endpoint {
            endpoint,
            client: client_cfg,
            ping_timeout: cfg.ping_timeout,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Dials the peer; the returned link has both streams open. The peer's
    /// `accept` sees a stream only once data is on it: the bulk stream's
    /// preamble announces both at once, and the dialer sends first on the
    /// main stream (its hello).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Link, LinkError> {
        let err = |detail: String| LinkError::Connect { addr, detail };
        let conn = self.dial(addr).await?;
        let (send, recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        let (mut bulk_send, bulk_recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        bulk_send
            .write_all(BULK_PREAMBLE)
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(Link::new(conn, send, recv, bulk_send, bulk_recv))
    }

    /// Dials and authenticates the peer (no stream yet).
    async fn dial(&self, addr: SocketAddr) -> Result<quinn::Connection, LinkError> {
        let err = |detail: String| LinkError::Connect { addr, detail };
        self.endpoint
            .connect_with(self.client.clone(), addr, SERVER_NAME)
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))
    }

    /// Tests only: dials and authenticates, then opens `streams` streams and
    /// writes `first_bytes` on the last of them (which announces it and the
    /// ones before it), as a broken or older peer would.
    #[doc(hidden)]
    pub async fn connect_partial(
        &self,
        addr: SocketAddr,
        streams: usize,
        first_bytes: &[u8],
    ) -> Result<LinkHandle, LinkError> {
        let err = |detail: String| LinkError::Connect { addr, detail };
        let conn = self.dial(addr).await?;
        for i in 0..streams {
            let (mut send, _recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
            if i + 1 == streams {
                send.write_all(first_bytes)
                    .await
                    .map_err(|e| err(e.to_string()))?;
            }
            // Kept open: dropping it would finish the stream.
            std::mem::forget(send);
        }
        Ok(LinkHandle { conn })
    }

    /// The next authenticated connection that opens both streams; failed
    /// handshakes and connections without them are logged and skipped.
    pub async fn accept(&self) -> Result<Link, LinkError> {
        loop {
            let incoming = self
                .endpoint
                .accept()
                .await
                .ok_or(LinkError::EndpointClosed)?;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!("refused a replication connection from {remote}: {e}");
                    continue;
                }
            };
            // An authenticated peer that opens no stream must not hold up the
            // connections behind it (keep-alives would keep it alive forever).
            match tokio::time::timeout(self.ping_timeout, accept_lanes(&conn)).await {
                Ok(Ok((send, recv, bulk_send, bulk_recv))) => {
                    return Ok(Link::new(conn, send, recv, bulk_send, bulk_recv))
                }
                Ok(Err(e)) => {
                    warn!("replication connection from {remote} did not open its streams: {e}");
                    conn.close(VarInt::from_u32(2), b"streams not opened");
                }
                Err(_) => {
                    let e = LinkError::NoStream {
                        addr: remote,
                        waited: self.ping_timeout,
                    };
                    warn!("{e}");
                    conn.close(VarInt::from_u32(2), b"no stream opened");
                }
            }
        }
    }

    /// Closes every connection of this endpoint.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutdown");
    }
}

/// One connection to the peer and its stream.
/// The acceptor's side of opening the lanes: the main stream, then the
/// bulk stream with its preamble.
async fn accept_lanes(
    conn: &quinn::Connection,
) -> Result<
    (
        quinn::SendStream,
        quinn::RecvStream,
        quinn::SendStream,
        quinn::RecvStream,
    ),
    String,
> {
    let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let (bulk_send, mut bulk_recv) = conn
        .accept_bi()
        .await
        .map_err(|e| format!("no bulk stream (a peer older than protocol 3?): {e}"))?;
    let mut preamble = [0u8; BULK_PREAMBLE.len()];
    bulk_recv
        .read_exact(&mut preamble)
        .await
        .map_err(|e| format!("the bulk stream ended before its preamble: {e}"))?;
    if &preamble != BULK_PREAMBLE {
        return Err(format!(
            "the second stream starts with {preamble:02x?}, not the bulk preamble"
        ));
    }
    Ok((send, recv, bulk_send, bulk_recv))
}

pub struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    bulk_send: quinn::SendStream,
    bulk_recv: quinn::RecvStream,
}

/// A link's two lanes, each a sender and a receiver.
pub struct Lanes {
    pub main_tx: FrameSender,
    pub main_rx: FrameReceiver,
    pub bulk_tx: FrameSender,
    pub bulk_rx: FrameReceiver,
}

/// A handle that can close a link or wait for its end.
#[derive(Clone)]
pub struct LinkHandle {
    conn: quinn::Connection,
}

/// What the QUIC connection under a link has done since it came up (for
/// status: packets per write, losses, the path's MTU and round trip).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// The smoothed round-trip time estimate.
    pub rtt: Duration,
    /// The congestion window, bytes.
    pub cwnd: u64,
    /// The path MTU in use (UDP payload bytes).
    pub mtu: u16,
    /// UDP datagrams sent and received, and the system calls that moved them
    /// (one call carries several datagrams where the kernel allows it).
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub send_calls: u64,
    pub receive_calls: u64,
    /// QUIC packets declared lost, and the congestion events they caused.
    pub lost_packets: u64,
    pub congestion_events: u64,
    /// ACK frames sent and received (QUIC's own, not replication acks).
    pub acks_sent: u64,
    pub acks_received: u64,
}

impl LinkHandle {
    /// The connection's counters so far.
    pub fn stats(&self) -> LinkStats {
        let s = self.conn.stats();
        LinkStats {
            rtt: s.path.rtt,
            cwnd: s.path.cwnd,
            mtu: s.path.current_mtu,
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            send_calls: s.udp_tx.ios,
            receive_calls: s.udp_rx.ios,
            lost_packets: s.path.lost_packets,
            congestion_events: s.path.congestion_events,
            acks_sent: s.frame_tx.acks,
            acks_received: s.frame_rx.acks,
        }
    }

    /// Closes the connection, telling the peer why.
    pub fn close(&self, reason: &str) {
        let reason: Vec<u8> = reason.bytes().take(200).collect();
        self.conn.close(VarInt::from_u32(1), &reason);
    }

    /// Resolves when the connection is gone, with the reason.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }
}

impl Link {
    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Closes the connection, telling the peer why (at most 200 bytes of it).
    pub fn close(&self, reason: &str) {
        self.handle().close(reason);
    }

    /// Resolves when the connection is gone (closed by either side, or the
    /// peer silent for the ping timeout), with the reason.
    pub fn closed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let handle = self.handle();
        async move { handle.closed().await }
    }

    /// A handle to close the link or await its end.
    pub fn handle(&self) -> LinkHandle {
        LinkHandle {
            conn: self.conn.clone(),
        }
    }

    /// Splits into the sending and the receiving half.
    fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        bulk_send: quinn::SendStream,
        bulk_recv: quinn::RecvStream,
    ) -> Link {
        // The two streams keep quinn's default priority: with its fair
        // queuing (on by default) their data take turns packet by packet,
        // so a frame on the main stream waits for at most about one packet
        // of bulk data, never for a whole 1 MiB write. A strictly higher
        // priority for the main stream would starve the bulk stream, and
        // the acks of its writes past `ack-timeout`, for as long as small
        // writes kept a slow link full.
        Link {
            conn,
            send,
            recv,
            bulk_send,
            bulk_recv,
        }
    }

    /// The main lane only (the bulk stream is closed).
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (
            FrameSender { send: self.send },
            FrameReceiver::new(self.recv),
        )
    }

    /// Both lanes.
    pub fn split_lanes(self) -> Lanes {
        Lanes {
            main_tx: FrameSender { send: self.send },
            main_rx: FrameReceiver::new(self.recv),
            bulk_tx: FrameSender {
                send: self.bulk_send,
            },
            bulk_rx: FrameReceiver::new(self.bulk_recv),
        }
    }
}

/// Sends frames in order.
pub struct FrameSender {
    send: quinn::SendStream,
}

impl FrameSender {
    /// Sends one message: its header, then its payload, without copying a
    /// data payload. A message the peer would refuse (see
    /// [`try_encode_frame`]) is not sent: [`LinkError::Unsendable`].
    pub async fn send<P>(&mut self, msg: &Message<P>) -> Result<(), LinkError>
    where
        P: AsRef<[u8]> + Clone + Send + 'static,
    {
        let mut chunks = Vec::with_capacity(2);
        push_frame(&mut chunks, &[], msg)?;
        self.write_chunks(&mut chunks).await
    }

    /// Sends several messages in order with one write: fewer wake-ups than
    /// one `send` each. Nothing is sent if any message is unsendable.
    pub async fn send_batch<P>(&mut self, msgs: &[Message<P>]) -> Result<(), LinkError>
    where
        P: AsRef<[u8]> + Clone + Send + 'static,
    {
        let mut chunks = Vec::with_capacity(2 * msgs.len());
        for msg in msgs {
            push_frame(&mut chunks, &[], msg)?;
        }
        self.write_chunks(&mut chunks).await
    }

    /// Sends messages on the bulk stream, each after an 8-byte count (little
    /// endian) of the frames its sender had written to the main stream
    /// before it: the receiver hands a bulk message on only after that many
    /// main frames ([`FrameReceiver::recv_bulk`]), so the main lane may
    /// overtake the bulk lane but never the reverse.
    pub async fn send_bulk_batch<P>(&mut self, msgs: &[(u64, Message<P>)]) -> Result<(), LinkError>
    where
        P: AsRef<[u8]> + Clone + Send + 'static,
    {
        let mut chunks = Vec::with_capacity(2 * msgs.len());
        for (after_main, msg) in msgs {
            push_frame(&mut chunks, &after_main.to_le_bytes(), msg)?;
        }
        self.write_chunks(&mut chunks).await
    }

    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), LinkError> {
        self.send
            .write_all_chunks(chunks)
            .await
            .map_err(|e| LinkError::Connection(e.to_string()))
    }

    /// Writes raw bytes (tests of the receiving side's checks).
    #[doc(hidden)]
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| LinkError::Connection(e.to_string()))
    }
}

/// Appends `prefix` and a message's header (one copy), then its payload. The
/// data payload is shared, not copied: `Bytes::from_owner` keeps a clone of the
/// caller's buffer (an `Arc` bump for shared buffers) until quinn has sent it.
fn push_frame<P>(chunks: &mut Vec<Bytes>, prefix: &[u8], msg: &Message<P>) -> Result<(), LinkError>
where
    P: AsRef<[u8]> + Clone + Send + 'static,
{
    let frame = try_encode_frame(msg).map_err(|source| LinkError::Unsendable {
        kind: msg.name(),
        source,
    })?;
    // `prefix` (the bulk lane's tag) shares the header's one copy.
    chunks.push(Bytes::from([prefix, &frame.header[..]].concat()));
    match msg.data_payload() {
        Some(payload) => chunks.push(Bytes::from_owner(payload.clone())),
        None if !frame.control.is_empty() => chunks.push(Bytes::from(frame.control)),
        None => {}
    }
    Ok(())
}

/// Receives frames in order.
///
/// It reads the stream in the chunks quinn hands up and keeps what it has not
/// parsed yet, so that [`FrameReceiver::try_recv_buffered`] can return every
/// frame that has already arrived without waiting: the driver then handles a
/// burst of frames under one lock. The buffer holds at most one frame's
/// header plus whatever a single chunk brought beyond it (a chunk is at most
/// the QUIC receive window), and a payload is copied once, from the chunks
/// into the caller's buffer.
pub struct FrameReceiver {
    recv: quinn::RecvStream,
    /// Received chunks not yet parsed, oldest first.
    buffered: VecDeque<Bytes>,
    /// The bytes in `buffered`.
    buffered_len: usize,
}

impl FrameReceiver {
    fn new(recv: quinn::RecvStream) -> FrameReceiver {
        FrameReceiver {
            recv,
            buffered: VecDeque::new(),
            buffered_len: 0,
        }
    }

    /// The next message of the bulk stream, with the count of main-stream
    /// frames its sender wrote before it (see
    /// [`FrameSender::send_bulk_batch`]). Errors as for `recv`.
    pub async fn recv_bulk<B, F>(&mut self, alloc: F) -> Result<(u64, Message<B>), LinkError>
    where
        F: FnOnce(usize) -> B,
        B: AsRef<[u8]> + AsMut<[u8]>,
    {
        let mut count = [0u8; 8];
        self.fill_exact(&mut count).await?;
        let msg = self.recv(alloc).await?;
        Ok((u64::from_le_bytes(count), msg))
    }

    /// The next message; its payload is read into `alloc(len)`, which must
    /// return a buffer of exactly `len` bytes (0 for kinds without payload).
    /// Any bad frame is an error (the caller drops the connection); the end
    /// of the stream is [`LinkError::Closed`].
    pub async fn recv<B, F>(&mut self, alloc: F) -> Result<Message<B>, LinkError>
    where
        F: FnOnce(usize) -> B,
        B: AsRef<[u8]> + AsMut<[u8]>,
    {
        let mut head = [0u8; HEADER_LEN];
        self.fill_exact(&mut head).await?;
        let header = decode_header(&head)?;
        let mut payload = alloc(header.payload_len());
        if payload.as_ref().len() != header.payload_len() {
            return Err(LinkError::BufferSize {
                expected: header.payload_len(),
                got: payload.as_ref().len(),
            });
        }
        self.fill_exact(payload.as_mut()).await?;
        Ok(decode_frame(&header, payload)?)
    }

    /// The next message if all of it has already arrived (from quinn's
    /// buffers too), without waiting; `Ok(None)` otherwise. Errors as
    /// [`FrameReceiver::recv`].
    pub fn try_recv_buffered<B, F>(&mut self, alloc: F) -> Result<Option<Message<B>>, LinkError>
    where
        F: FnOnce(usize) -> B,
        B: AsRef<[u8]> + AsMut<[u8]>,
    {
        let mut head = [0u8; HEADER_LEN];
        if !self.peek_ready(&mut head)? {
            return Ok(None);
        }
        let header = decode_header(&head)?;
        let total = HEADER_LEN + header.payload_len();
        while self.buffered_len < total {
            if !self.pull_ready()? {
                return Ok(None);
            }
        }
        self.take_buffered(&mut head);
        let mut payload = alloc(header.payload_len());
        if payload.as_ref().len() != header.payload_len() {
            return Err(LinkError::BufferSize {
                expected: header.payload_len(),
                got: payload.as_ref().len(),
            });
        }
        let copied = self.take_buffered(payload.as_mut());
        debug_assert_eq!(copied, header.payload_len());
        Ok(Some(decode_frame(&header, payload)?))
    }

    /// Copies the first `HEADER_LEN` buffered bytes into `head` without
    /// consuming them, pulling what quinn already holds if needed; false if
    /// fewer have arrived.
    fn peek_ready(&mut self, head: &mut [u8; HEADER_LEN]) -> Result<bool, LinkError> {
        while self.buffered_len < HEADER_LEN {
            if !self.pull_ready()? {
                return Ok(false);
            }
        }
        let mut done = 0;
        for chunk in &self.buffered {
            let n = chunk.len().min(HEADER_LEN - done);
            head[done..done + n].copy_from_slice(&chunk[..n]);
            done += n;
            if done == HEADER_LEN {
                break;
            }
        }
        Ok(true)
    }

    /// Moves one chunk quinn has already received into the buffer, without
    /// waiting (`read_chunk` is cancel-safe, so polling it once loses
    /// nothing); false if none is there.
    fn pull_ready(&mut self) -> Result<bool, LinkError> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let polled = {
            let read = std::pin::pin!(self.recv.read_chunk(usize::MAX, true));
            read.poll(&mut cx)
        };
        match polled {
            std::task::Poll::Pending => Ok(false),
            std::task::Poll::Ready(r) => {
                let chunk = chunk_or_error(r)?;
                self.push(chunk);
                Ok(true)
            }
        }
    }

    fn push(&mut self, chunk: Bytes) {
        self.buffered_len += chunk.len();
        self.buffered.push_back(chunk);
    }

    /// Moves up to `dst.len()` buffered bytes into `dst`; returns how many.
    fn take_buffered(&mut self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        while done < dst.len() {
            let Some(front) = self.buffered.front_mut() else {
                break;
            };
            let n = front.len().min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.buffered.pop_front();
            }
            done += n;
        }
        self.buffered_len -= done;
        done
    }

    /// Fills `dst` from the buffer, then from the stream.
    async fn fill_exact(&mut self, dst: &mut [u8]) -> Result<(), LinkError> {
        let mut done = self.take_buffered(dst);
        while done < dst.len() {
            let chunk = chunk_or_error(self.recv.read_chunk(usize::MAX, true).await)?;
            self.push(chunk);
            done += self.take_buffered(&mut dst[done..]);
        }
        Ok(())
    }
}

fn chunk_or_error(r: Result<Option<quinn::Chunk>, quinn::ReadError>) -> Result<Bytes, LinkError> {
    match r {
        Ok(Some(chunk)) => Ok(chunk.bytes),
        Ok(None) => Err(LinkError::Closed),
        Err(e) => Err(LinkError::Connection(e.to_string())),
    }
}
