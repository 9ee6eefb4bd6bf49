//! Every magic number and code of the NBD protocol that pairbd speaks or recognises.
//!
//! The names follow `doc/proto.md` of the NBD project so that the spec can be searched for
//! them. Values the spec sends as 16-bit fields are `u16` here, 32-bit fields `u32`, so that
//! a constant cannot be put in a field of the wrong width without a visible cast.

// ---- Magic numbers ----

/// First 8 bytes the server sends: ASCII "NBDMAGIC" (also known as `INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second 8 bytes of the newstyle greeting, and the magic that starts every client option:
/// ASCII "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every fixed-newstyle option reply sent by the server.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that starts every transmission-phase request (`NBD_REQUEST_MAGIC`).
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic that starts every simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks; pairbd never negotiates them but names the value.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- Handshake flags (16 bits, sent by the server in the greeting) ----

/// The server speaks fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server will leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME` if asked.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- Client flags (32 bits, the client's answer to the greeting) ----

/// The client speaks fixed newstyle negotiation.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Option codes ----

/// Choose an export and enter transmission; cannot return errors.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Abort the negotiation (soft disconnect).
pub const NBD_OPT_ABORT: u32 = 2;
/// List the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension; not in use.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Ask about an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Ask about an export and enter transmission on success.
pub const NBD_OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Negotiate extended (64-bit) headers.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---- Option reply types ----

/// The option succeeded, or the list of replies to it is complete.
pub const NBD_REP_ACK: u32 = 1;
/// One export in the answer to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// One item of information in the answer to `NBD_OPT_INFO` or `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;

/// Bit 31 marks every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR + 1;
/// The option is valid but server policy forbids it.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR + 2;
/// The option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR + 3;
/// The option is not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR + 4;
/// TLS must be negotiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR + 5;
/// The requested export is not available.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR + 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR + 7;
/// The client must request block size constraints first.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR + 8;
/// The request or its reply is too large to process.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR + 9;

// ---- Information types in NBD_REP_INFO ----

/// Export size and transmission flags; mandatory before a successful ACK.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission flags (16 bits, sent with the export size) ----

/// Always set: the flags field is meaningful.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// The server understands `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The server understands `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// The server understands `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// The server understands `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The server understands `NBD_CMD_FLAG_DF` (structured replies only).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA are visible across all connections to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The server understands `NBD_CMD_RESIZE`.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// The server understands `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// The server understands `NBD_CMD_FLAG_FAST_ZERO`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Command types ----

/// Read `length` bytes at `offset`.
pub const NBD_CMD_READ: u16 = 0;
/// Write the `length` bytes that follow the header at `offset`.
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect; no reply.
pub const NBD_CMD_DISC: u16 = 2;
/// Make every completed write durable.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard a range (a hint).
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch a range (a hint).
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes to a range; no payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query block status (needs structured replies and metadata contexts).
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Resize the export (experimental extension).
pub const NBD_CMD_RESIZE: u16 = 8;

// ---- Command flags ----

/// Force unit access: reply only once the data written by this command is durable.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES` must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment a structured read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_BLOCK_STATUS` wants one extent only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_WRITE_ZEROES` must fail fast with `NBD_ENOTSUP` unless it is fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// The length field is a payload length (extended headers only).
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
