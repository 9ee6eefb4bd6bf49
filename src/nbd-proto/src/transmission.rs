//! Transmission-phase framing: request headers in, validated commands out, simple replies.
//!
//! [`decode_request_header`] frames the 28-byte request header, [`validate`] decides with
//! no IO whether pairbd will execute it (bounds with checked arithmetic, read-only exports,
//! payload limits, alignment, a flag allowlist per command), and [`encode_simple_reply`]
//! builds the 16-byte reply header. Structured replies and extended headers are never
//! negotiated, so requests that use them are rejected with `EINVAL`.
//!
//! Zero-length requests: the spec says clients SHOULD NOT send them, that a server's
//! behaviour is unspecified and that it SHOULD NOT disconnect. pairbd accepts them when the
//! offset lies within the export (offset == size included) and the alignment holds, so the
//! driver answers success without touching the disk; an offset past the end gets the same
//! error as any other out-of-range request.

use crate::consts::*;
use crate::wire::Reader;
use crate::NbdError;

/// Length of a (compact) request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header (read data, if any, follows it).
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;

/// Command flags accepted on every command. FUA is honoured where the command writes and
/// ignored elsewhere (the spec says servers MUST accept it on all commands once
/// `NBD_FLAG_SEND_FUA` is advertised, and the Linux client sets it on flushes). DF and
/// REQ_ONE only matter for structured replies and block status, which pairbd never
/// negotiates, so they are ignored rather than failing a request of a confused client.
const FLAGS_ACCEPTED_EVERYWHERE: u16 = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE;
/// Command flags accepted on `NBD_CMD_WRITE_ZEROES` in addition.
const FLAGS_ACCEPTED_ON_WRITE_ZEROES: u16 = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;

/// A decoded request header. Field names follow the spec; `kind` is the command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque client handle, echoed in the reply with all 64 bits.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the range, and of the payload that follows a WRITE).
    pub length: u32,
}

/// A header that cannot be framed; the connection cannot continue after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header did not start with the expected magic number.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
}

/// What the validator needs to know about the export being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Size of the export in bytes.
    pub size_bytes: u64,
    /// Whether writes (WRITE, TRIM, WRITE_ZEROES) are refused with `EPERM`.
    pub read_only: bool,
    /// Largest READ or WRITE length accepted; larger ones get `EINVAL`.
    pub max_payload: u32,
    /// 1 (or 0) accepts any offset; otherwise offset and length of READ, WRITE, TRIM,
    /// WRITE_ZEROES and CACHE must be multiples of it, else `EINVAL`.
    pub alignment: u32,
}

/// A request pairbd will execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u32,
    },
    /// Write the `length` payload bytes that follow the header (the caller reads them).
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte count, also the payload length.
        length: u32,
        /// Reply only once the data is durable.
        fua: bool,
    },
    /// Make every write completed so far durable.
    Flush,
    /// Discard a range (a hint).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u32,
        /// Reply only once the effect is durable.
        fua: bool,
    },
    /// Write zeroes to a range; no payload.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u32,
        /// Reply only once the zeroes are durable.
        fua: bool,
        /// The range must stay allocated (no hole may be punched).
        no_hole: bool,
        /// Fail fast with `ENOTSUP` unless zeroing is faster than writing.
        fast_zero: bool,
    },
    /// Prefetch a range (a hint).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u32,
    },
    /// The client is leaving: finish outstanding requests, send no reply, close.
    Disconnect,
}

/// The validator's verdict on a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated {
    /// Execute this command.
    Accept(Command),
    /// Reply with `error`; the request's WRITE payload (`payload_to_discard` bytes, 0 for
    /// other commands) is still on the wire and must be read and dropped by the caller.
    /// It can be up to 4 GiB long, so it must be discarded in bounded chunks (or the
    /// connection closed, which the spec allows for a payload large enough to be abuse).
    Reject {
        /// The error for the reply.
        error: NbdError,
        /// Payload bytes that follow the header and must be skipped.
        payload_to_discard: u32,
    },
}

/// Decodes a request header, checking only the magic; [`validate`] judges the rest.
pub fn decode_request_header(
    bytes: &[u8; REQUEST_HEADER_LEN],
) -> Result<RequestHeader, HeaderError> {
    let mut reader = Reader::new(bytes);
    // A 28-byte array always holds these fields; the zero defaults are never used.
    let magic = reader.u32().unwrap_or(0);
    if magic != NBD_REQUEST_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: reader.u16().unwrap_or(0),
        kind: reader.u16().unwrap_or(0),
        handle: reader.u64().unwrap_or(0),
        offset: reader.u64().unwrap_or(0),
        length: reader.u32().unwrap_or(0),
    })
}

/// Encodes a request header, for tests and pairbd's own clients.
pub fn encode_request_header(header: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut bytes = [0u8; REQUEST_HEADER_LEN];
    let fields = NBD_REQUEST_MAGIC
        .to_be_bytes()
        .into_iter()
        .chain(header.flags.to_be_bytes())
        .chain(header.kind.to_be_bytes())
        .chain(header.handle.to_be_bytes())
        .chain(header.offset.to_be_bytes())
        .chain(header.length.to_be_bytes());
    for (slot, byte) in bytes.iter_mut().zip(fields) {
        *slot = byte;
    }
    bytes
}

/// Decides whether a request will be executed, following the spec's error rules:
///
/// - unknown command types (including BLOCK_STATUS and RESIZE, never negotiated): `EINVAL`,
///   nothing to discard (there is no way to know whether a payload follows);
/// - DISC is always accepted, whatever its flags, offset and length: it has no reply in
///   which an error could travel;
/// - unknown flag bits, flags that belong to another command, PAYLOAD_LEN: `EINVAL`;
/// - WRITE, TRIM, WRITE_ZEROES on a read-only export: `EPERM`;
/// - READ or WRITE longer than `max_payload`: `EINVAL` (TRIM and WRITE_ZEROES carry no
///   payload and are never rejected for their size);
/// - past the end or overflowing: READ, TRIM, CACHE `EINVAL`, WRITE, WRITE_ZEROES `ENOSPC`;
/// - offset or length not a multiple of `alignment`: `EINVAL`;
/// - FLUSH ignores offset and length.
///
/// A rejected WRITE always reports its whole payload in `payload_to_discard`.
pub fn validate(header: &RequestHeader, limits: &ExportLimits) -> Validated {
    let kind = header.kind;
    let payload_to_discard = if kind == NBD_CMD_WRITE {
        header.length
    } else {
        0
    };
    let reject = |error| Validated::Reject {
        error,
        payload_to_discard,
    };

    let accepted_flags = match kind {
        NBD_CMD_DISC => return Validated::Accept(Command::Disconnect),
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_CACHE => {
            FLAGS_ACCEPTED_EVERYWHERE
        }
        NBD_CMD_WRITE_ZEROES => FLAGS_ACCEPTED_EVERYWHERE | FLAGS_ACCEPTED_ON_WRITE_ZEROES,
        _ => {
            return Validated::Reject {
                error: NbdError::Inval,
                payload_to_discard: 0,
            }
        }
    };
    if header.flags & !accepted_flags != 0 {
        return reject(NbdError::Inval);
    }
    if kind == NBD_CMD_FLUSH {
        return Validated::Accept(Command::Flush);
    }

    let writes = matches!(kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if writes && limits.read_only {
        return reject(NbdError::Perm);
    }
    let carries_payload = matches!(kind, NBD_CMD_READ | NBD_CMD_WRITE);
    if carries_payload && header.length > limits.max_payload {
        return reject(NbdError::Inval);
    }
    let in_bounds = header
        .offset
        .checked_add(u64::from(header.length))
        .is_some_and(|end| end <= limits.size_bytes);
    if !in_bounds {
        let error = match kind {
            NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES => NbdError::NoSpc,
            _ => NbdError::Inval,
        };
        return reject(error);
    }
    if limits.alignment > 1 {
        let alignment = u64::from(limits.alignment);
        if header.offset % alignment != 0 || u64::from(header.length) % alignment != 0 {
            return reject(NbdError::Inval);
        }
    }

    let offset = header.offset;
    let length = header.length;
    let fua = header.flags & NBD_CMD_FLAG_FUA != 0;
    let command = match kind {
        NBD_CMD_READ => Command::Read { offset, length },
        NBD_CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        NBD_CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: header.flags & NBD_CMD_FLAG_NO_HOLE != 0,
            fast_zero: header.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
        // Only CACHE is left: every other type returned above.
        _ => Command::Cache { offset, length },
    };
    Validated::Accept(command)
}

/// Encodes a simple reply header: magic, error (0 for success), handle. For a successful
/// READ the data follows it.
pub fn encode_simple_reply(handle: u64, error: Option<NbdError>) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut bytes = [0u8; SIMPLE_REPLY_HEADER_LEN];
    let errno = error.map_or(0, NbdError::errno);
    let fields = NBD_SIMPLE_REPLY_MAGIC
        .to_be_bytes()
        .into_iter()
        .chain(errno.to_be_bytes())
        .chain(handle.to_be_bytes());
    for (slot, byte) in bytes.iter_mut().zip(fields) {
        *slot = byte;
    }
    bytes
}

/// Decodes a simple reply header into `(handle, error value)`, for pairbd's own test
/// clients. The error value is raw: 0 for success, see [`NbdError::from_errno`].
pub fn decode_simple_reply(
    bytes: &[u8; SIMPLE_REPLY_HEADER_LEN],
) -> Result<(u64, u32), HeaderError> {
    let mut reader = Reader::new(bytes);
    // A 16-byte array always holds these fields; the zero defaults are never used.
    let magic = reader.u32().unwrap_or(0);
    if magic != NBD_SIMPLE_REPLY_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    let error = reader.u32().unwrap_or(0);
    let handle = reader.u64().unwrap_or(0);
    Ok((handle, error))
}

#[cfg(test)]
mod tests;
