//! A small blocking NBD client for the integration tests that must put exact bytes on
//! the wire: malformed requests, pipelines, handshakes cut short.
//!
//! Every message is built and parsed with the codec crate's client-side encoders and
//! decoders (`pairbd_nbd_proto::client`, `transmission`), never with ad-hoc byte arrays,
//! except where a test deliberately sends garbage ([`RawClient::send_raw`]).
//!
//! Every socket read and write has a timeout ([`IO_TIMEOUT`]), so a server that hangs
//! fails the test with a message instead of hanging it. The timeout is a failure bound,
//! never a way to synchronise.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use pairbd_nbd_proto::client::{
    decode_option_reply_header, decode_server_greeting, encode_client_flags, encode_info_request,
    encode_option,
};
use pairbd_nbd_proto::consts;
use pairbd_nbd_proto::handshake::{OPTION_REPLY_HEADER_LEN, SERVER_GREETING_LEN};
use pairbd_nbd_proto::transmission::{
    decode_simple_reply, encode_request_header, RequestHeader, REQUEST_HEADER_LEN,
    SIMPLE_REPLY_HEADER_LEN,
};

/// How long one socket read or write may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The client flags a well-behaved modern client sends.
pub const CLIENT_FLAGS: u32 = consts::NBD_FLAG_C_FIXED_NEWSTYLE | consts::NBD_FLAG_C_NO_ZEROES;

/// One option reply: its header fields and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn is_error(&self) -> bool {
        self.reply_type & consts::NBD_REP_FLAG_ERROR != 0
    }
}

/// What the server told us about the export in `NBD_REP_INFO` (or the
/// `NBD_OPT_EXPORT_NAME` reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportDetails {
    pub size: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum), when the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: Option<(u32, u32, u32)>,
}

/// One simple reply as read off the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// 0 for success, else the NBD error value.
    pub error: u32,
    /// The read data (only for a successful reply with a data length > 0).
    pub data: Vec<u8>,
}

/// A blocking NBD client over a Unix socket.
pub struct RawClient {
    stream: UnixStream,
    /// The handshake flags of the server greeting (0 if not read).
    pub handshake_flags: u16,
    next_handle: u64,
}

/// Makes a test-friendly panic message out of an IO error on the socket.
fn fail(what: &str, error: io::Error) -> ! {
    if matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        panic!("{what}: the server did not respond within {IO_TIMEOUT:?}");
    }
    if error.kind() == io::ErrorKind::UnexpectedEof {
        panic!("{what}: the server closed the connection mid-message");
    }
    panic!("{what}: {error}");
}

impl RawClient {
    /// Opens the socket and does nothing else (the server's greeting stays unread).
    pub fn connect_raw(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", socket.display()));
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .expect("set write timeout");
        RawClient {
            stream,
            handshake_flags: 0,
            // The Linux client puts a sequence number in the high 32 bits; so do we.
            next_handle: 0xA5A5_0001_0000_0000,
        }
    }

    /// Connects and reads the greeting, sending nothing yet.
    pub fn connect_greeting_only(socket: &Path) -> RawClient {
        let mut client = RawClient::connect_raw(socket);
        client.read_greeting();
        client
    }

    /// Connects, reads the greeting and sends the usual client flags
    /// (FIXED_NEWSTYLE | NO_ZEROES): the connection is ready for options.
    pub fn connect(socket: &Path) -> RawClient {
        let mut client = RawClient::connect_greeting_only(socket);
        client.send_client_flags(CLIENT_FLAGS);
        client
    }

    /// Connects and enters transmission on export `name` with `NBD_OPT_GO`.
    pub fn open(socket: &Path, name: &str) -> (RawClient, ExportDetails) {
        let mut client = RawClient::connect(socket);
        let details = client.go(name);
        (client, details)
    }

    /// Reads and checks the server greeting; returns its handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let mut bytes = [0u8; SERVER_GREETING_LEN];
        self.read_exact_or_fail(&mut bytes, "reading the server greeting");
        let flags = decode_server_greeting(&bytes)
            .unwrap_or_else(|error| panic!("bad server greeting: {error}"));
        assert_ne!(
            flags & consts::NBD_FLAG_FIXED_NEWSTYLE,
            0,
            "the server must speak fixed newstyle"
        );
        self.handshake_flags = flags;
        flags
    }

    pub fn send_client_flags(&mut self, flags: u32) {
        self.send_raw(&encode_client_flags(flags));
    }

    /// Sends one option (header and data), reading no reply.
    pub fn send_option(&mut self, code: u32, data: &[u8]) {
        self.send_raw(&encode_option(code, data));
    }

    /// Sends one option, tolerating a server that closes the socket while we write.
    pub fn try_send_option(&mut self, code: u32, data: &[u8]) -> io::Result<()> {
        self.try_send_raw(&encode_option(code, data))
    }

    /// Reads one option reply; checks it answers `option`.
    pub fn read_option_reply(&mut self, option: u32) -> OptionReply {
        self.try_read_option_reply(option)
            .unwrap_or_else(|error| fail("reading an option reply", error))
    }

    /// Reads one option reply; an EOF or socket error is returned, a malformed one panics.
    pub fn try_read_option_reply(&mut self, option: u32) -> io::Result<OptionReply> {
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        let header = decode_option_reply_header(&header)
            .unwrap_or_else(|error| panic!("bad option reply: {error}"));
        assert_eq!(
            header.option, option,
            "an option reply must name the option it answers (reply type {:#x})",
            header.reply_type
        );
        let mut data = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut data)?;
        Ok(OptionReply {
            option: header.option,
            reply_type: header.reply_type,
            data,
        })
    }

    /// Sends an option and reads its replies up to and including the ACK or the first
    /// error reply.
    pub fn opt(&mut self, code: u32, data: &[u8]) -> Vec<OptionReply> {
        self.send_option(code, data);
        self.read_option_replies(code)
    }

    /// Reads replies to `code` up to and including the ACK or the first error reply.
    pub fn read_option_replies(&mut self, code: u32) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply(code);
            let last = reply.reply_type == consts::NBD_REP_ACK || reply.is_error();
            replies.push(reply);
            if last {
                return replies;
            }
            assert!(
                replies.len() < 1000,
                "the server sends option replies without end"
            );
        }
    }

    /// `NBD_OPT_INFO` (or GO) for `name`, asking for the block sizes: the raw replies.
    pub fn opt_info(&mut self, code: u32, name: &str) -> Vec<OptionReply> {
        let data = encode_info_request(name.as_bytes(), &[consts::NBD_INFO_BLOCK_SIZE]);
        self.opt(code, &data)
    }

    /// `NBD_OPT_GO` for `name`; panics unless the server accepts it.
    pub fn go(&mut self, name: &str) -> ExportDetails {
        let replies = self.opt_info(consts::NBD_OPT_GO, name);
        let last = replies.last().expect("at least one reply");
        assert_eq!(
            last.reply_type,
            consts::NBD_REP_ACK,
            "NBD_OPT_GO {name:?} failed: {replies:?}"
        );
        parse_info_replies(&replies)
            .unwrap_or_else(|| panic!("NBD_OPT_GO {name:?}: no NBD_INFO_EXPORT in {replies:?}"))
    }

    /// `NBD_OPT_EXPORT_NAME`: returns the export details, or the error if the server
    /// closed the connection instead (as it must for an unknown name).
    pub fn export_name(&mut self, name: &str) -> io::Result<ExportDetails> {
        self.send_option(consts::NBD_OPT_EXPORT_NAME, name.as_bytes());
        let mut bytes = [0u8; 10];
        self.stream.read_exact(&mut bytes)?;
        let size = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        let transmission_flags = u16::from_be_bytes(bytes[8..].try_into().expect("2 bytes"));
        // We asked for NO_ZEROES, so no 124 zero bytes follow.
        Ok(ExportDetails {
            size,
            transmission_flags,
            block_sizes: None,
        })
    }

    /// A fresh handle with the high 32 bits set.
    pub fn next_handle(&mut self) -> u64 {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(0x0000_0001_0000_0003);
        handle
    }

    /// Sends one request header followed by `payload` (which may be shorter or longer
    /// than `length` when a test wants that).
    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.try_send_request(flags, kind, handle, offset, length, payload)
            .unwrap_or_else(|error| fail("sending a request", error));
    }

    pub fn try_send_request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let header = encode_request_header(&RequestHeader {
            flags,
            kind,
            handle,
            offset,
            length,
        });
        debug_assert_eq!(header.len(), REQUEST_HEADER_LEN);
        if payload.is_empty() {
            self.stream.write_all(&header)
        } else if payload.len() <= 64 * 1024 {
            let mut bytes = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(payload);
            self.stream.write_all(&bytes)
        } else {
            self.stream.write_all(&header)?;
            self.stream.write_all(payload)
        }
    }

    /// Reads one reply header: `(handle, error)`. Panics on EOF, timeout or bad magic.
    pub fn read_reply_header(&mut self) -> (u64, u32) {
        match self.try_read_reply_header() {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!("the server closed the connection where a reply was due"),
            Err(error) => fail("reading a reply", error),
        }
    }

    /// Reads one reply header; `Ok(None)` is a clean EOF before its first byte.
    /// EOF inside a header is an error (`UnexpectedEof`).
    pub fn try_read_reply_header(&mut self) -> io::Result<Option<(u64, u32)>> {
        let mut bytes = [0u8; SIMPLE_REPLY_HEADER_LEN];
        let first = loop {
            match self.stream.read(&mut bytes[..1]) {
                Ok(count) => break count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(error) => return Err(error),
            }
        };
        if first == 0 {
            return Ok(None);
        }
        self.stream.read_exact(&mut bytes[1..])?;
        let reply =
            decode_simple_reply(&bytes).unwrap_or_else(|error| panic!("bad simple reply: {error}"));
        Ok(Some(reply))
    }

    /// Reads `length` bytes of read data.
    pub fn read_data(&mut self, length: usize) -> Vec<u8> {
        let mut data = vec![0u8; length];
        self.read_exact_or_fail(&mut data, "reading the data of a read reply");
        data
    }

    /// Reads one reply; `data_length(handle)` says how many data bytes follow a
    /// successful reply to that handle (0 for everything but READ).
    pub fn read_reply(&mut self, data_length: impl FnOnce(u64) -> usize) -> Reply {
        let (handle, error) = self.read_reply_header();
        let data = if error == 0 {
            self.read_data(data_length(handle))
        } else {
            Vec::new()
        };
        Reply {
            handle,
            error,
            data,
        }
    }

    /// One request without payload, waiting for its reply: the error value (0 = success).
    pub fn command(&mut self, flags: u16, kind: u16, offset: u64, length: u32) -> u32 {
        let handle = self.next_handle();
        self.send_request(flags, kind, handle, offset, length, &[]);
        let reply = self.read_reply(|_| 0);
        assert_eq!(reply.handle, handle, "the reply names another request");
        reply.error
    }

    /// A WRITE of `data` at `offset`, waiting for its reply: the error value.
    pub fn write_at(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let handle = self.next_handle();
        let length = u32::try_from(data.len()).expect("payload fits u32");
        self.send_request(flags, consts::NBD_CMD_WRITE, handle, offset, length, data);
        let reply = self.read_reply(|_| 0);
        assert_eq!(reply.handle, handle, "the reply names another request");
        reply.error
    }

    /// A READ, waiting for its reply: the data, or the error value.
    pub fn read_at(&mut self, flags: u16, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let handle = self.next_handle();
        self.send_request(flags, consts::NBD_CMD_READ, handle, offset, length, &[]);
        let reply = self.read_reply(|_| length as usize);
        assert_eq!(reply.handle, handle, "the reply names another request");
        if reply.error == 0 {
            Ok(reply.data)
        } else {
            Err(reply.error)
        }
    }

    /// A READ that must succeed.
    pub fn read_ok(&mut self, offset: u64, length: u32) -> Vec<u8> {
        self.read_at(0, offset, length).unwrap_or_else(|error| {
            panic!("READ {length} bytes at {offset} failed with error {error}")
        })
    }

    /// A WRITE that must succeed.
    pub fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let error = self.write_at(0, offset, data);
        assert_eq!(error, 0, "WRITE {} bytes at {offset} failed", data.len());
    }

    /// Sends `NBD_CMD_DISC` (no reply is due).
    pub fn disconnect(&mut self) {
        let handle = self.next_handle();
        self.send_request(0, consts::NBD_CMD_DISC, handle, 0, 0, &[]);
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes)
            .unwrap_or_else(|error| fail("sending bytes", error));
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes our sending direction (the server sees EOF) while still reading.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Reads until the server closes the connection; returns whatever arrived first.
    /// A reset counts as a close. Panics if the server neither closes nor sends
    /// anything within the timeout.
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut received = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return received,
                Ok(count) => received.extend_from_slice(&chunk[..count]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return received,
                Err(error) => fail("waiting for the server to close the connection", error),
            }
        }
    }

    /// Asserts that the server closes the connection without sending anything more.
    pub fn expect_closed(&mut self, context: &str) {
        let received = self.read_to_eof();
        assert!(
            received.is_empty(),
            "{context}: expected the server to close the connection, but it sent {} bytes: {:02x?}",
            received.len(),
            &received[..received.len().min(64)]
        );
    }

    /// The underlying socket, for tests that need it.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn read_exact_or_fail(&mut self, buffer: &mut [u8], what: &str) {
        if let Err(error) = self.stream.read_exact(buffer) {
            fail(what, error);
        }
    }
}

/// The export details in the replies to `NBD_OPT_INFO`/`NBD_OPT_GO`, if an
/// `NBD_INFO_EXPORT` is among them.
pub fn parse_info_replies(replies: &[OptionReply]) -> Option<ExportDetails> {
    let mut details: Option<ExportDetails> = None;
    let mut block_sizes = None;
    for reply in replies
        .iter()
        .filter(|reply| reply.reply_type == consts::NBD_REP_INFO)
    {
        assert!(
            reply.data.len() >= 2,
            "NBD_REP_INFO without an info type: {reply:?}"
        );
        let info = u16::from_be_bytes([reply.data[0], reply.data[1]]);
        let body = &reply.data[2..];
        match info {
            consts::NBD_INFO_EXPORT => {
                assert_eq!(
                    body.len(),
                    10,
                    "NBD_INFO_EXPORT must carry 10 bytes: {reply:?}"
                );
                details = Some(ExportDetails {
                    size: u64::from_be_bytes(body[..8].try_into().expect("8 bytes")),
                    transmission_flags: u16::from_be_bytes(
                        body[8..10].try_into().expect("2 bytes"),
                    ),
                    block_sizes: None,
                });
            }
            consts::NBD_INFO_BLOCK_SIZE => {
                assert_eq!(
                    body.len(),
                    12,
                    "NBD_INFO_BLOCK_SIZE must carry 12 bytes: {reply:?}"
                );
                let word = |index: usize| {
                    u32::from_be_bytes(body[index * 4..index * 4 + 4].try_into().expect("4 bytes"))
                };
                block_sizes = Some((word(0), word(1), word(2)));
            }
            _ => {}
        }
    }
    details.map(|details| ExportDetails {
        block_sizes,
        ..details
    })
}

/// The export names in the replies to `NBD_OPT_LIST`.
pub fn parse_list_replies(replies: &[OptionReply]) -> Vec<String> {
    replies
        .iter()
        .filter(|reply| reply.reply_type == consts::NBD_REP_SERVER)
        .map(|reply| {
            assert!(reply.data.len() >= 4, "NBD_REP_SERVER too short: {reply:?}");
            let length = u32::from_be_bytes(reply.data[..4].try_into().expect("4 bytes")) as usize;
            assert!(
                4 + length <= reply.data.len(),
                "NBD_REP_SERVER name overruns: {reply:?}"
            );
            String::from_utf8_lossy(&reply.data[4..4 + length]).into_owned()
        })
        .collect()
}

/// A deterministic 4 KiB-ish pattern that differs for every `seed`, never all zeroes.
pub fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(length + 8);
    while data.len() < length {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data.truncate(length);
    data
}

/// The resident set size of process `pid`, in bytes.
pub fn vm_rss_bytes(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS line in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}
