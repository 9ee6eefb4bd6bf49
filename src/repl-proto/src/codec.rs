//! The frame codec: a fixed 48-byte little-endian header (zerocopy) and the
//! payload beside it. Data payloads pass through untouched (their crc32c is
//! checked); control payloads are postcard.
//!
//! Header layout (all little-endian): magic u32, version u8, kind u8, flags
//! u16, payload_len u32, payload_crc u32, seq u64, offset u64, length u64,
//! header_crc u32 (crc32c of the 40 bytes before it), reserved u32 (zero).
//! A field a kind does not use must be zero, so every message has exactly one
//! encoding and a corrupted or foreign frame is refused rather than guessed at.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{AckBatch, DirtyRanges, Hello, Message, NodeState, VerifyReply};

/// The header's size in bytes.
pub const HEADER_LEN: usize = 48;
/// The largest write or sync-chunk payload.
pub const MAX_DATA_PAYLOAD: u32 = 32 << 20;
/// The largest control payload.
pub const MAX_CONTROL_PAYLOAD: u32 = 64 << 10;
/// The protocol version this code speaks. 2: the `Acks` message (and the
/// hello's discard-my-data and dirty-bytes fields, added without a bump).
/// 3: the bulk lane (a second stream; docs/PROTOCOL.md, "Two lanes").
pub const PROTOCOL_VERSION: u8 = 3;
/// "PBDR", little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PBDR");

/// Flag: the write must be durable before its acknowledgement.
pub const FLAG_FUA: u16 = 1;
/// Flag: zeroing keeps the range allocated.
pub const FLAG_NO_HOLE: u16 = 2;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHeader {
    magic: U32,
    version: u8,
    kind: u8,
    flags: U16,
    payload_len: U32,
    payload_crc: U32,
    seq: U64,
    offset: U64,
    length: U64,
    header_crc: U32,
    reserved: U32,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);
/// The header crc covers every byte before its own field.
const CRC_COVERS: usize = 40;
const _: () = assert!(std::mem::offset_of!(RawHeader, header_crc) == CRC_COVERS);

/// Message kinds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    State = 2,
    Write = 3,
    Trim = 4,
    WriteZeroes = 5,
    Flush = 6,
    Ack = 7,
    FlushAck = 8,
    SyncStart = 9,
    SyncReady = 10,
    SyncData = 11,
    SyncDone = 12,
    SyncDoneAck = 13,
    Ping = 14,
    Pong = 15,
    DirtyRanges = 16,
    VerifyRequest = 17,
    VerifyReply = 18,
    Acks = 19,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => State,
            3 => Write,
            4 => Trim,
            5 => WriteZeroes,
            6 => Flush,
            7 => Ack,
            8 => FlushAck,
            9 => SyncStart,
            10 => SyncReady,
            11 => SyncData,
            12 => SyncDone,
            13 => SyncDoneAck,
            14 => Ping,
            15 => Pong,
            16 => DirtyRanges,
            17 => VerifyRequest,
            18 => VerifyReply,
            19 => Acks,
            _ => return None,
        })
    }

    fn is_data(self) -> bool {
        matches!(self, Kind::Write | Kind::SyncData)
    }

    fn is_control(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::State | Kind::DirtyRanges | Kind::VerifyReply | Kind::Acks
        )
    }

    /// Which of seq, offset and length the kind carries; the others must be 0.
    fn uses(self) -> (bool, bool, bool) {
        match self {
            Kind::Hello
            | Kind::State
            | Kind::SyncReady
            | Kind::DirtyRanges
            | Kind::VerifyReply
            | Kind::Acks => (false, false, false),
            Kind::Write | Kind::Trim | Kind::WriteZeroes | Kind::SyncData | Kind::VerifyRequest => {
                (true, true, true)
            }
            Kind::Flush
            | Kind::Ack
            | Kind::FlushAck
            | Kind::SyncDone
            | Kind::SyncDoneAck
            | Kind::Ping
            | Kind::Pong => (true, false, false),
            Kind::SyncStart => (false, false, true),
        }
    }

    /// The largest payload the kind may carry.
    fn payload_limit(self) -> u32 {
        if self.is_data() {
            MAX_DATA_PAYLOAD
        } else if self.is_control() {
            MAX_CONTROL_PAYLOAD
        } else {
            0
        }
    }

    fn allowed_flags(self) -> u16 {
        match self {
            Kind::Write => FLAG_FUA,
            Kind::WriteZeroes => FLAG_NO_HOLE,
            _ => 0,
        }
    }
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    pub flags: u16,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl FrameHeader {
    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        self.payload_len as usize
    }

    /// The kind's name, for logs.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Hello => "hello",
        Kind::State => "state",
        Kind::Write => "write",
        Kind::Trim => "trim",
        Kind::WriteZeroes => "write-zeroes",
        Kind::Flush => "flush",
        Kind::Ack => "ack",
        Kind::FlushAck => "flush-ack",
        Kind::SyncStart => "sync-start",
        Kind::SyncReady => "sync-ready",
        Kind::SyncData => "sync-data",
        Kind::SyncDone => "sync-done",
        Kind::SyncDoneAck => "sync-done-ack",
        Kind::Ping => "ping",
        Kind::Pong => "pong",
        Kind::DirtyRanges => "dirty-ranges",
        Kind::VerifyRequest => "verify-request",
        Kind::VerifyReply => "verify-reply",
        Kind::Acks => "acks",
    }
}

/// Why bytes are not a valid frame. Any of these drops the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {got} (this node speaks {supported})")]
    UnsupportedVersion { got: u8, supported: u8 },
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("flags {flags:#06x} not allowed on a {kind} frame")]
    BadFlags { kind: &'static str, flags: u16 },
    #[error("{kind} frame with a {len}-byte payload (limit {limit})")]
    Oversized {
        kind: &'static str,
        len: u32,
        limit: u32,
    },
    #[error("{kind} frame: length {length} disagrees with payload length {payload_len}")]
    InconsistentLength {
        kind: &'static str,
        length: u64,
        payload_len: u32,
    },
    #[error("{kind} frame: range at offset {offset} of {length} bytes overflows u64")]
    RangeOverflow {
        kind: &'static str,
        offset: u64,
        length: u64,
    },
    #[error("{kind} frame: the unused {field} field is {value}, not 0")]
    UnusedField {
        kind: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("{kind} frame: the header announces {expected} payload bytes, {got} were given")]
    PayloadSize {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("payload checksum mismatch on {kind} frame {seq}")]
    PayloadChecksum { kind: &'static str, seq: u64 },
    #[error("malformed {kind} payload: {detail}")]
    Control { kind: &'static str, detail: String },
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete { needed: usize },
}

/// Checks a header: every field is valid for its kind, so the payload that
/// follows can be allocated (`payload_len`, bounded by the kind's limit) and
/// read before [`decode_frame`] checks its crc.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    // Same size, alignment 1: checked at compile time, no error path.
    let raw: RawHeader = zerocopy::transmute!(*bytes);
    if raw.magic.get() != MAGIC {
        return Err(FrameError::BadMagic(raw.magic.get()));
    }
    // The version is judged before the crc: a newer peer may checksum
    // differently, and "unsupported version" is the message that helps.
    if raw.version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            got: raw.version,
            supported: PROTOCOL_VERSION,
        });
    }
    if crc32c::crc32c(&bytes[..CRC_COVERS]) != raw.header_crc.get() {
        return Err(FrameError::HeaderChecksum);
    }
    if raw.reserved.get() != 0 {
        return Err(FrameError::Reserved);
    }
    let kind = Kind::from_u8(raw.kind).ok_or(FrameError::UnknownKind(raw.kind))?;
    let name = kind_name(kind);
    let flags = raw.flags.get();
    if flags & !kind.allowed_flags() != 0 {
        return Err(FrameError::BadFlags { kind: name, flags });
    }
    let payload_len = raw.payload_len.get();
    let limit = kind.payload_limit();
    if payload_len > limit {
        return Err(FrameError::Oversized {
            kind: name,
            len: payload_len,
            limit,
        });
    }
    let (seq, offset, length) = (raw.seq.get(), raw.offset.get(), raw.length.get());
    let (uses_seq, uses_offset, uses_length) = kind.uses();
    for (used, field, value) in [
        (uses_seq, "seq", seq),
        (uses_offset, "offset", offset),
        (uses_length, "length", length),
    ] {
        if !used && value != 0 {
            return Err(FrameError::UnusedField {
                kind: name,
                field,
                value,
            });
        }
    }
    if kind.is_data() && (payload_len == 0 || length != u64::from(payload_len)) {
        return Err(FrameError::InconsistentLength {
            kind: name,
            length,
            payload_len,
        });
    }
    // A range past u64::MAX cannot be a place on any disk; the core checks
    // the device size, this only keeps its arithmetic from overflowing.
    if uses_offset && offset.checked_add(length).is_none() {
        return Err(FrameError::RangeOverflow {
            kind: name,
            offset,
            length,
        });
    }
    Ok(FrameHeader {
        kind,
        flags,
        seq,
        offset,
        length,
        payload_len,
        payload_crc: raw.payload_crc.get(),
    })
}

fn control<T: serde::de::DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| FrameError::Control {
        kind: kind_name(kind),
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(FrameError::Control {
            kind: kind_name(kind),
            detail: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

/// A decoded batch of acks, if the protocol allows it (2 to `ACKS_MAX`
/// strictly increasing sequence numbers).
fn ack_batch(b: AckBatch) -> Result<AckBatch, FrameError> {
    match b.problem() {
        None => Ok(b),
        Some(detail) => Err(FrameError::Control {
            kind: kind_name(Kind::Acks),
            detail,
        }),
    }
}

/// Builds the message of a checked header and its payload.
pub fn decode_frame<P: AsRef<[u8]>>(h: &FrameHeader, payload: P) -> Result<Message<P>, FrameError> {
    let bytes = payload.as_ref();
    if bytes.len() != h.payload_len() {
        return Err(FrameError::PayloadSize {
            kind: h.kind_name(),
            expected: h.payload_len(),
            got: bytes.len(),
        });
    }
    if crc32c::crc32c(bytes) != h.payload_crc {
        return Err(FrameError::PayloadChecksum {
            kind: h.kind_name(),
            seq: h.seq,
        });
    }
    let seq = h.seq;
    Ok(match h.kind {
        Kind::Hello => Message::Hello(control::<Hello>(h.kind, bytes)?),
        Kind::State => Message::State(control::<NodeState>(h.kind, bytes)?),
        Kind::Write => Message::Write {
            seq,
            offset: h.offset,
            payload,
            fua: h.flags & FLAG_FUA != 0,
        },
        Kind::Trim => Message::Trim {
            seq,
            offset: h.offset,
            length: h.length,
        },
        Kind::WriteZeroes => Message::WriteZeroes {
            seq,
            offset: h.offset,
            length: h.length,
            no_hole: h.flags & FLAG_NO_HOLE != 0,
        },
        Kind::Flush => Message::Flush { seq },
        Kind::Ack => Message::Ack { seq },
        Kind::FlushAck => Message::FlushAck { seq },
        Kind::SyncStart => Message::SyncStart {
            total_bytes: h.length,
        },
        Kind::SyncReady => Message::SyncReady,
        Kind::SyncData => Message::SyncData {
            seq,
            offset: h.offset,
            payload,
        },
        Kind::SyncDone => Message::SyncDone { seq },
        Kind::SyncDoneAck => Message::SyncDoneAck { seq },
        Kind::Ping => Message::Ping { seq },
        Kind::Pong => Message::Pong { seq },
        Kind::DirtyRanges => Message::DirtyRanges(control::<DirtyRanges>(h.kind, bytes)?),
        Kind::VerifyRequest => Message::VerifyRequest {
            seq,
            offset: h.offset,
            length: h.length,
        },
        Kind::VerifyReply => Message::VerifyReply(control::<VerifyReply>(h.kind, bytes)?),
        Kind::Acks => Message::Acks(ack_batch(control::<AckBatch>(h.kind, bytes)?)?),
    })
}

/// A frame ready to send: the header, then `control` (for control kinds) or
/// the message's own data payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub header: [u8; HEADER_LEN],
    pub control: Vec<u8>,
}

/// Encodes a message's header (and control payload).
///
/// The caller keeps a message within the protocol's limits (a data payload
/// of 1..=[`MAX_DATA_PAYLOAD`] bytes, a range within u64). A message outside
/// them still encodes, but into a frame the peer refuses; use
/// [`try_encode_frame`] to learn that before sending.
pub fn encode_frame<P: AsRef<[u8]>>(msg: &Message<P>) -> EncodedFrame {
    encode(msg).0
}

/// Encodes a message, or says why the peer's decoder would refuse it.
pub fn try_encode_frame<P: AsRef<[u8]>>(msg: &Message<P>) -> Result<EncodedFrame, FrameError> {
    let (frame, problem) = encode(msg);
    if let Some(e) = problem {
        return Err(e);
    }
    // The peer checks this header with `decode_header`; checking it here
    // first means a message it would refuse is never sent.
    decode_header(&frame.header)?;
    Ok(frame)
}

/// The frame, and the control payload's serialisation error if any (then
/// the control payload is empty).
fn encode<P: AsRef<[u8]>>(msg: &Message<P>) -> (EncodedFrame, Option<FrameError>) {
    let mut problem = None;
    // A value the peer's decoder refuses although it serialises.
    let mut invalid = None;
    let mut serialise = |kind: Kind, r: postcard::Result<Vec<u8>>| {
        r.unwrap_or_else(|e| {
            problem = Some(FrameError::Control {
                kind: kind_name(kind),
                detail: e.to_string(),
            });
            Vec::new()
        })
    };
    let mut control = Vec::new();
    let mut data: Option<&[u8]> = None;
    let (kind, seq, offset, length, flags) = match msg {
        Message::Hello(h) => {
            control = serialise(Kind::Hello, postcard::to_stdvec(h));
            (Kind::Hello, 0, 0, 0, 0)
        }
        Message::State(s) => {
            control = serialise(Kind::State, postcard::to_stdvec(s));
            (Kind::State, 0, 0, 0, 0)
        }
        Message::Write {
            seq,
            offset,
            payload,
            fua,
        } => {
            data = Some(payload.as_ref());
            let len = payload.as_ref().len() as u64;
            (
                Kind::Write,
                *seq,
                *offset,
                len,
                if *fua { FLAG_FUA } else { 0 },
            )
        }
        Message::Trim {
            seq,
            offset,
            length,
        } => (Kind::Trim, *seq, *offset, *length, 0),
        Message::WriteZeroes {
            seq,
            offset,
            length,
            no_hole,
        } => (
            Kind::WriteZeroes,
            *seq,
            *offset,
            *length,
            if *no_hole { FLAG_NO_HOLE } else { 0 },
        ),
        Message::Flush { seq } => (Kind::Flush, *seq, 0, 0, 0),
        Message::Ack { seq } => (Kind::Ack, *seq, 0, 0, 0),
        Message::Acks(b) => {
            control = serialise(Kind::Acks, postcard::to_stdvec(b));
            invalid = b.problem().map(|detail| FrameError::Control {
                kind: kind_name(Kind::Acks),
                detail,
            });
            (Kind::Acks, 0, 0, 0, 0)
        }
        Message::FlushAck { seq } => (Kind::FlushAck, *seq, 0, 0, 0),
        Message::SyncStart { total_bytes } => (Kind::SyncStart, 0, 0, *total_bytes, 0),
        Message::SyncReady => (Kind::SyncReady, 0, 0, 0, 0),
        Message::SyncData {
            seq,
            offset,
            payload,
        } => {
            data = Some(payload.as_ref());
            let len = payload.as_ref().len() as u64;
            (Kind::SyncData, *seq, *offset, len, 0)
        }
        Message::SyncDone { seq } => (Kind::SyncDone, *seq, 0, 0, 0),
        Message::SyncDoneAck { seq } => (Kind::SyncDoneAck, *seq, 0, 0, 0),
        Message::Ping { seq } => (Kind::Ping, *seq, 0, 0, 0),
        Message::Pong { seq } => (Kind::Pong, *seq, 0, 0, 0),
        Message::DirtyRanges(d) => {
            control = serialise(Kind::DirtyRanges, postcard::to_stdvec(d));
            (Kind::DirtyRanges, 0, 0, 0, 0)
        }
        Message::VerifyRequest {
            seq,
            offset,
            length,
        } => (Kind::VerifyRequest, *seq, *offset, *length, 0),
        Message::VerifyReply(r) => {
            control = serialise(Kind::VerifyReply, postcard::to_stdvec(r));
            (Kind::VerifyReply, 0, 0, 0, 0)
        }
    };
    let body: &[u8] = data.unwrap_or(&control);
    // Saturate rather than truncate: u32::MAX is over every limit, so an
    // impossible size is refused instead of passing as a smaller one.
    let payload_len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut raw = RawHeader {
        magic: U32::new(MAGIC),
        version: PROTOCOL_VERSION,
        kind: kind as u8,
        flags: U16::new(flags),
        payload_len: U32::new(payload_len),
        payload_crc: U32::new(crc32c::crc32c(body)),
        seq: U64::new(seq),
        offset: U64::new(offset),
        length: U64::new(length),
        header_crc: U32::new(0),
        reserved: U32::new(0),
    };
    let crc = crc32c::crc32c(&raw.as_bytes()[..CRC_COVERS]);
    raw.header_crc = U32::new(crc);
    let header: [u8; HEADER_LEN] = zerocopy::transmute!(raw);
    (EncodedFrame { header, control }, problem.or(invalid))
}

/// Encodes a whole frame into one buffer (tests, fuzzing, corpora).
pub fn encode_to_vec<P: AsRef<[u8]>>(msg: &Message<P>) -> Vec<u8> {
    let f = encode_frame(msg);
    let mut out = f.header.to_vec();
    match msg.data_payload() {
        Some(payload) => out.extend_from_slice(payload.as_ref()),
        None => out.extend_from_slice(&f.control),
    }
    out
}

/// Decodes one frame from the front of `bytes`; returns it and the bytes used.
pub fn decode_all(bytes: &[u8]) -> Result<(Message<Vec<u8>>, usize), FrameError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Incomplete {
            needed: HEADER_LEN - bytes.len(),
        });
    };
    let h = decode_header(head)?;
    let end = HEADER_LEN + h.payload_len();
    if bytes.len() < end {
        return Err(FrameError::Incomplete {
            needed: end - bytes.len(),
        });
    }
    let msg = decode_frame(&h, bytes[HEADER_LEN..end].to_vec())?;
    Ok((msg, end))
}
