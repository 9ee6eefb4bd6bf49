//! The client half of the NBD handshake, blocking, for `pairbd attach`: connect to
//! one node's NBD address, negotiate the export with `NBD_OPT_GO` (fixed newstyle,
//! no zeroes), and hand back the connected socket in transmission phase with the
//! export's size and transmission flags — what the kernel's NBD driver takes over
//! through netlink. Messages are built and parsed by `pairbd_nbd_proto::client`.
//!
//! A Secondary refuses the export (an `NBD_REP_ERR_*` reply naming its role), which
//! is how attach finds the Primary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use pairbd_config::ListenAddr;
use pairbd_nbd_proto::client::{
    decode_option_reply_header, decode_server_greeting, encode_client_flags, encode_info_request,
    encode_option,
};
use pairbd_nbd_proto::consts::{
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_INFO_EXPORT,
    NBD_OPT_GO, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO,
};

/// Largest option-reply payload accepted (pairbd's are tens of bytes; error texts a
/// few hundred).
const REPLY_PAYLOAD_MAX: u32 = 64 * 1024;
/// Option replies accepted before the final one.
const REPLIES_MAX: usize = 32;

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size_bytes: u64,
    /// `NBD_FLAG_*` transmission flags.
    pub flags: u16,
}

/// Why a node did not hand over a connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an NBD server: {0}")]
    Protocol(String),
    #[error("refused the export: {0}")]
    Refused(String),
}

/// Connects to `address` and negotiates `export`; `limit` bounds the connect and
/// each read and write of the handshake.
pub fn open(
    address: &ListenAddr,
    export: &str,
    limit: Duration,
) -> Result<(OwnedFd, Export), HandshakeError> {
    match address {
        ListenAddr::Tcp(socket) => {
            let stream =
                TcpStream::connect_timeout(socket, limit).map_err(HandshakeError::Connect)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(limit))?;
            stream.set_write_timeout(Some(limit))?;
            let mut stream = stream;
            let export = negotiate(&mut stream, export)?;
            // The kernel's receive thread must never see a timeout of ours.
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(None)?;
            Ok((OwnedFd::from(stream), export))
        }
        ListenAddr::Unix(path) => {
            let mut stream = UnixStream::connect(path).map_err(HandshakeError::Connect)?;
            stream.set_read_timeout(Some(limit))?;
            stream.set_write_timeout(Some(limit))?;
            let export = negotiate(&mut stream, export)?;
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(None)?;
            Ok((OwnedFd::from(stream), export))
        }
    }
}

/// The handshake on any byte stream (tested against the real server in
/// tests/kernel_guest.rs and tests/kernel_restart.rs).
pub fn negotiate(stream: &mut (impl Read + Write), export: &str) -> Result<Export, HandshakeError> {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting)?;
    let flags =
        decode_server_greeting(&greeting).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Protocol(
            "the server does not speak fixed newstyle".into(),
        ));
    }
    stream.write_all(&encode_client_flags(
        NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
    ))?;
    stream.write_all(&encode_option(
        NBD_OPT_GO,
        &encode_info_request(export.as_bytes(), &[]),
    ))?;
    let mut found = None;
    for _ in 0..REPLIES_MAX {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header)?;
        let header = decode_option_reply_header(&header)
            .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        if header.length > REPLY_PAYLOAD_MAX {
            return Err(HandshakeError::Protocol(format!(
                "an option reply of {} bytes",
                header.length
            )));
        }
        let mut payload = vec![0u8; header.length as usize];
        stream.read_exact(&mut payload)?;
        if header.option != NBD_OPT_GO {
            return Err(HandshakeError::Protocol(format!(
                "a reply to option {} instead of NBD_OPT_GO",
                header.option
            )));
        }
        if header.reply_type & NBD_REP_FLAG_ERROR != 0 {
            let text = String::from_utf8_lossy(&payload).trim().to_string();
            return Err(HandshakeError::Refused(if text.is_empty() {
                format!("error {:#x}", header.reply_type)
            } else {
                text
            }));
        }
        match header.reply_type {
            NBD_REP_INFO
                if payload.len() >= 12 && payload[..2] == NBD_INFO_EXPORT.to_be_bytes() =>
            {
                let size = u64::from_be_bytes(payload[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes(payload[10..12].try_into().unwrap_or_default());
                found = Some(Export {
                    size_bytes: size,
                    flags,
                });
            }
            NBD_REP_ACK => {
                return found.ok_or_else(|| {
                    HandshakeError::Protocol("NBD_OPT_GO ended without NBD_INFO_EXPORT".into())
                });
            }
            _ => {}
        }
    }
    Err(HandshakeError::Protocol(
        "too many option replies".to_string(),
    ))
}
