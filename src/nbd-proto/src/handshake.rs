//! The server side of the NBD fixed-newstyle handshake, as a sans-IO state machine.
//!
//! The driver feeds the client's bytes in with [`Handshake::handle_input`], drains the
//! server's bytes with [`Handshake::poll_transmit`] and watches [`Handshake::outcome`]. The
//! machine never reads a socket and copes with input split at any byte boundary.
//!
//! What pairbd supports: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`, `NBD_OPT_GO`,
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT`. Every other option (TLS, structured replies,
//! metadata contexts, extended headers, unknown codes) is answered with
//! `NBD_REP_ERR_UNSUP` and negotiation goes on, as the spec's baseline requires.
//!
//! Memory is bounded: option data is buffered only for the options that need it and only up
//! to [`HandshakeLimits::max_option_length`]; longer options are skipped as they stream past.
//! Pending output is bounded because every option produces a bounded reply and at most
//! [`HandshakeLimits::max_options`] options are answered.

use crate::consts::*;
use crate::wire::{fill, put_length_prefixed, truncate_utf8, Reader};

/// Length of the server greeting: "NBDMAGIC", "IHAVEOPT" and the 16-bit handshake flags.
pub const SERVER_GREETING_LEN: usize = 18;
/// Length of an option header sent by the client: magic, option code, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header sent by the server: magic, option, type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// The spec's hard limit on the length of any string (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;
/// Default for [`HandshakeLimits::max_option_length`].
pub const DEFAULT_MAX_OPTION_LENGTH: u32 = 64 * 1024;
/// Default for [`HandshakeLimits::max_options`].
pub const DEFAULT_MAX_OPTIONS: u32 = 256;
/// Options announcing more data than this are answered with `NBD_REP_ERR_TOO_BIG` and
/// the connection is closed without reading the data (no legitimate option comes near;
/// the spec's own limit for strings is 4096 bytes).
pub const MAX_SKIP_LENGTH: u32 = 32 * 1024 * 1024;

/// The handshake flags pairbd sends: fixed newstyle, and willingness to drop the zeroes.
pub const SERVER_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
/// Every client flag pairbd understands; any other bit set by a client closes the connection.
pub const KNOWN_CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// Number of zero bytes that follow the `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
const EXPORT_NAME_ZERO_PADDING: usize = 124;
/// How much of a client-chosen export name is echoed back in messages and logs.
const ECHOED_NAME_MAX_BYTES: usize = 256;

/// The block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment; a power of two no larger than 64 KiB.
    pub minimum: u32,
    /// Size at which aligned requests are efficient; a power of two, at least 512.
    pub preferred: u32,
    /// Largest request length the server accepts (`0xffffffff` for no limit).
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// The spec's defaults for a server that states no constraints.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: u32::MAX,
        }
    }
}

/// One export the server offers, as the handshake presents it to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name; "" is a valid name. A client asking for the empty name gets the
    /// default export, which is `exports[0]`.
    pub name: String,
    /// Sent as `NBD_INFO_DESCRIPTION` when the client asks for it (not sent when empty).
    pub description: String,
    /// Size of the export in bytes.
    pub size_bytes: u64,
    /// Transmission flags (`NBD_FLAG_HAS_FLAGS` etc.), computed by the driver.
    pub transmission_flags: u16,
    /// Block size constraints, always sent with `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: BlockSizes,
    /// When `Some`, the export exists but is not served now (e.g. the node is Secondary).
    /// `NBD_OPT_INFO` and `NBD_OPT_GO` are answered with `NBD_REP_ERR_POLICY` carrying this
    /// text; `NBD_OPT_EXPORT_NAME` closes the connection with
    /// [`CloseReason::ExportRefused`]. The export is still listed by `NBD_OPT_LIST`.
    pub refusal: Option<String>,
}

/// Limits that keep a hostile client from making the handshake use unbounded memory or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Longest option data that is buffered and parsed. Longer options are skipped without
    /// buffering and answered with `NBD_REP_ERR_TOO_BIG` (`NBD_OPT_EXPORT_NAME`, which
    /// cannot return an error, closes the connection instead).
    pub max_option_length: u32,
    /// Most options one connection may send; the next one closes the connection.
    pub max_options: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_option_length: DEFAULT_MAX_OPTION_LENGTH,
            max_options: DEFAULT_MAX_OPTIONS,
        }
    }
}

/// Where the handshake stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still negotiating: feed more input.
    Negotiating,
    /// Transmission phase begins with export `exports[export_index]`. Any input bytes that
    /// the caller has not had consumed belong to the transmission phase.
    Transmission {
        /// Index into the exports given to [`Handshake::new`].
        export_index: usize,
        /// Whether the client set `NBD_FLAG_C_NO_ZEROES` (already honoured by the handshake).
        no_zeroes: bool,
    },
    /// The connection must be closed after the pending output is written.
    Closed(CloseReason),
}

/// Why the handshake ended without entering transmission; the text is meant for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT` (a soft disconnect); it was acknowledged.
    #[error("client aborted the negotiation")]
    ClientAborted,
    /// An option did not start with the IHAVEOPT magic, so the stream cannot be framed.
    #[error("client sent an option without the IHAVEOPT magic")]
    BadMagic,
    /// The client set flag bits this server does not know; the spec says to drop it.
    #[error("client set unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (it cannot return an error).
    #[error("client asked for unknown export {0:?}")]
    UnknownExportName(String),
    /// `NBD_OPT_EXPORT_NAME` named an export that is refused now; carries the refusal text.
    #[error("export refused: {0}")]
    ExportRefused(String),
    /// The client sent more options than [`HandshakeLimits::max_options`].
    #[error("client sent too many options")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` was longer than [`HandshakeLimits::max_option_length`].
    #[error("client sent a {length}-byte NBD_OPT_EXPORT_NAME, longer than allowed")]
    ExportNameTooLong {
        /// The option data length the client announced.
        length: u32,
    },
    /// An option announced more than [`MAX_SKIP_LENGTH`] bytes of data: not worth
    /// streaming past (qemu-nbd's CVE-2017-15119 was a server that did).
    #[error("client announced a {length}-byte option; the limit is {MAX_SKIP_LENGTH}")]
    OptionTooLong {
        /// The option data length the client announced.
        length: u32,
    },
}

/// What to answer once the data of a skipped option has streamed past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipReply {
    /// The option is not supported: `NBD_REP_ERR_UNSUP`.
    Unsupported,
    /// The option is longer than the buffering limit: `NBD_REP_ERR_TOO_BIG`.
    TooBig,
    /// The option must not carry data (`NBD_OPT_LIST`): `NBD_REP_ERR_INVALID`.
    UnexpectedData,
}

/// The part of the client's stream the machine expects next.
#[derive(Debug)]
enum State {
    /// The 32-bit client flags that answer the greeting.
    ClientFlags { buffer: [u8; 4], filled: usize },
    /// A 16-byte option header.
    OptionHeader {
        buffer: [u8; OPTION_HEADER_LEN],
        filled: usize,
    },
    /// Option data that is buffered because the option is parsed; `expected` is at most
    /// `max_option_length`, and `data` only grows as bytes actually arrive.
    OptionData {
        option: u32,
        expected: usize,
        data: Vec<u8>,
    },
    /// Option data that streams past unbuffered, followed by the error reply `then`.
    SkipData {
        option: u32,
        remaining: u32,
        then: SkipReply,
    },
    /// Negotiation is over (transmission or closed); no more input is consumed.
    Finished,
}

/// The information requests of an `NBD_OPT_INFO`/`NBD_OPT_GO` that change the reply.
#[derive(Debug, Default, Clone, Copy)]
struct InfoRequests {
    name: bool,
    description: bool,
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    exports: Vec<ExportInfo>,
    limits: HandshakeLimits,
    state: State,
    outcome: Outcome,
    output: Vec<u8>,
    client_flags: u32,
    options_received: u32,
    last_refusal: Option<String>,
}

impl Handshake {
    /// Starts a handshake offering `exports` (the first is the default export) and queues
    /// the server greeting: "NBDMAGIC", "IHAVEOPT", `FIXED_NEWSTYLE | NO_ZEROES`.
    pub fn new(exports: Vec<ExportInfo>, limits: HandshakeLimits) -> Self {
        let mut output = Vec::with_capacity(SERVER_GREETING_LEN);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
        Handshake {
            exports,
            limits,
            state: State::ClientFlags {
                buffer: [0; 4],
                filled: 0,
            },
            outcome: Outcome::Negotiating,
            output,
            client_flags: 0,
            options_received: 0,
            last_refusal: None,
        }
    }

    /// Consumes bytes from `input` and returns how many it consumed.
    ///
    /// It never consumes past the end of the option that ends negotiation (`NBD_OPT_GO`,
    /// `NBD_OPT_EXPORT_NAME`), so bytes that follow stay with the caller for the transmission
    /// phase. It may consume part of a message and keeps whatever state it needs, so input
    /// may arrive one byte at a time. Once the outcome is no longer
    /// [`Outcome::Negotiating`] it consumes nothing.
    pub fn handle_input(&mut self, input: &[u8]) -> usize {
        let mut consumed = 0;
        while self.outcome == Outcome::Negotiating {
            let rest = input.get(consumed..).unwrap_or(&[]);
            if rest.is_empty() {
                break;
            }
            let used = self.step(rest);
            consumed += used;
            // Every step on non-empty input either consumes a byte or ends negotiation;
            // this guard only turns a broken invariant into a stall instead of a spin.
            if used == 0 {
                break;
            }
        }
        consumed
    }

    /// Appends the pending output bytes to `out` and forgets them.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.output);
    }

    /// Where the handshake stands.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// Number of output bytes waiting for [`Handshake::poll_transmit`].
    pub fn pending_transmit_len(&self) -> usize {
        self.output.len()
    }

    /// The exports this handshake offers, in the order given to [`Handshake::new`].
    pub fn exports(&self) -> &[ExportInfo] {
        &self.exports
    }

    /// The client flags the client sent (0 until they have arrived).
    pub fn client_flags(&self) -> u32 {
        self.client_flags
    }

    /// How many option headers the client has sent so far.
    pub fn options_received(&self) -> u32 {
        self.options_received
    }

    /// The refusal text of the last `NBD_OPT_INFO`/`NBD_OPT_GO` answered with
    /// `NBD_REP_ERR_POLICY`, so the driver can log why a client that then leaves was refused.
    pub fn last_refusal(&self) -> Option<&str> {
        self.last_refusal.as_deref()
    }

    /// Processes a prefix of `input` (never empty) for the current state and returns how
    /// many bytes it used.
    fn step(&mut self, input: &[u8]) -> usize {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::ClientFlags {
                mut buffer,
                mut filled,
            } => {
                let used = fill(&mut buffer, &mut filled, input);
                if filled == buffer.len() {
                    self.on_client_flags(u32::from_be_bytes(buffer));
                } else {
                    self.state = State::ClientFlags { buffer, filled };
                }
                used
            }
            State::OptionHeader {
                mut buffer,
                mut filled,
            } => {
                let used = fill(&mut buffer, &mut filled, input);
                if filled == buffer.len() {
                    self.on_option_header(&buffer);
                } else {
                    self.state = State::OptionHeader { buffer, filled };
                }
                used
            }
            State::OptionData {
                option,
                expected,
                mut data,
            } => {
                let wanted = expected.saturating_sub(data.len());
                let chunk = input.get(..wanted).unwrap_or(input);
                data.extend_from_slice(chunk);
                if data.len() >= expected {
                    self.on_option_data(option, &data);
                } else {
                    self.state = State::OptionData {
                        option,
                        expected,
                        data,
                    };
                }
                chunk.len()
            }
            State::SkipData {
                option,
                remaining,
                then,
            } => {
                let available = u32::try_from(input.len()).unwrap_or(u32::MAX);
                let used = remaining.min(available);
                let remaining = remaining - used;
                if remaining == 0 {
                    self.on_skipped(option, then);
                } else {
                    self.state = State::SkipData {
                        option,
                        remaining,
                        then,
                    };
                }
                used as usize
            }
            State::Finished => 0,
        }
    }

    fn on_client_flags(&mut self, flags: u32) {
        self.client_flags = flags;
        if flags & !KNOWN_CLIENT_FLAGS != 0 {
            self.close(CloseReason::UnknownClientFlags(flags));
            return;
        }
        // A client without NBD_FLAG_C_FIXED_NEWSTYLE is still served: the spec lets servers
        // honour fixed newstyle anyway, and such a client only ever sends EXPORT_NAME,
        // whose reply is the same in both dialects.
        self.expect_option_header();
    }

    fn expect_option_header(&mut self) {
        self.state = State::OptionHeader {
            buffer: [0; OPTION_HEADER_LEN],
            filled: 0,
        };
    }

    fn on_option_header(&mut self, header: &[u8; OPTION_HEADER_LEN]) {
        let mut reader = Reader::new(header);
        let (Some(magic), Some(option), Some(length)) = (reader.u64(), reader.u32(), reader.u32())
        else {
            // Unreachable for a 16-byte header; closing is the safe answer all the same.
            self.close(CloseReason::BadMagic);
            return;
        };
        if magic != IHAVEOPT {
            self.close(CloseReason::BadMagic);
            return;
        }
        self.options_received = self.options_received.saturating_add(1);
        if self.options_received > self.limits.max_options {
            self.close(CloseReason::TooManyOptions);
            return;
        }
        match option {
            NBD_OPT_ABORT => {
                // The spec says to ignore any data sent with ABORT; the connection closes, so
                // there is no need to read it.
                self.push_reply(option, NBD_REP_ACK, &[]);
                self.close(CloseReason::ClientAborted);
            }
            NBD_OPT_EXPORT_NAME if length > self.limits.max_option_length => {
                // EXPORT_NAME cannot return an error, so the only answer is to hang up.
                self.close(CloseReason::ExportNameTooLong { length });
            }
            _ if length > MAX_SKIP_LENGTH => {
                self.push_error(option, NBD_REP_ERR_TOO_BIG, "option data too long");
                self.close(CloseReason::OptionTooLong { length });
            }
            _ if length > self.limits.max_option_length => {
                self.skip(option, length, SkipReply::TooBig)
            }
            NBD_OPT_EXPORT_NAME | NBD_OPT_INFO | NBD_OPT_GO => {
                // `length` is at most max_option_length here, so this bounds the buffer.
                let expected = length as usize;
                if expected == 0 {
                    self.on_option_data(option, &[]);
                } else {
                    self.state = State::OptionData {
                        option,
                        expected,
                        data: Vec::new(),
                    };
                }
            }
            NBD_OPT_LIST if length == 0 => {
                self.reply_list();
                self.expect_option_header();
            }
            NBD_OPT_LIST => self.skip(option, length, SkipReply::UnexpectedData),
            _ => self.skip(option, length, SkipReply::Unsupported),
        }
    }

    /// Streams past `length` bytes of option data and then answers with `then`.
    fn skip(&mut self, option: u32, length: u32, then: SkipReply) {
        if length == 0 {
            self.on_skipped(option, then);
        } else {
            self.state = State::SkipData {
                option,
                remaining: length,
                then,
            };
        }
    }

    fn on_skipped(&mut self, option: u32, then: SkipReply) {
        let (reply_type, message) = match then {
            SkipReply::Unsupported => (NBD_REP_ERR_UNSUP, "option not supported by pairbd"),
            SkipReply::TooBig => (NBD_REP_ERR_TOO_BIG, "option data too long"),
            SkipReply::UnexpectedData => (NBD_REP_ERR_INVALID, "option must not carry data"),
        };
        self.push_error(option, reply_type, message);
        self.expect_option_header();
    }

    /// Handles a buffered option whose data is complete.
    fn on_option_data(&mut self, option: u32, data: &[u8]) {
        match option {
            NBD_OPT_EXPORT_NAME => self.on_export_name(data),
            NBD_OPT_INFO | NBD_OPT_GO => {
                self.on_info_or_go(option, data);
                if self.outcome == Outcome::Negotiating {
                    self.expect_option_header();
                }
            }
            // Only the options above are ever buffered; answering keeps the stream framed
            // even if that changes.
            _ => {
                self.push_error(option, NBD_REP_ERR_UNSUP, "option not supported by pairbd");
                self.expect_option_header();
            }
        }
    }

    fn on_export_name(&mut self, name: &[u8]) {
        let Some(index) = self.find_export(name) else {
            self.close(CloseReason::UnknownExportName(echo_name(name)));
            return;
        };
        let Some(export) = self.exports.get(index) else {
            self.close(CloseReason::UnknownExportName(echo_name(name)));
            return;
        };
        if let Some(refusal) = &export.refusal {
            let refusal = refusal.clone();
            self.close(CloseReason::ExportRefused(refusal));
            return;
        }
        self.output
            .extend_from_slice(&export.size_bytes.to_be_bytes());
        self.output
            .extend_from_slice(&export.transmission_flags.to_be_bytes());
        let no_zeroes = self.no_zeroes();
        if !no_zeroes {
            self.output
                .extend_from_slice(&[0; EXPORT_NAME_ZERO_PADDING]);
        }
        self.outcome = Outcome::Transmission {
            export_index: index,
            no_zeroes,
        };
    }

    fn on_info_or_go(&mut self, option: u32, data: &[u8]) {
        let Some((name, requests)) = parse_info_request(data) else {
            self.push_error(
                option,
                NBD_REP_ERR_INVALID,
                "option data lengths do not add up",
            );
            return;
        };
        let Some(index) = self.find_export(name) else {
            let message = format!("unknown export \"{}\"", echo_name(name));
            self.push_error(option, NBD_REP_ERR_UNKNOWN, &message);
            return;
        };
        let Some(export) = self.exports.get(index) else {
            return;
        };
        if let Some(refusal) = &export.refusal {
            let refusal = refusal.clone();
            self.push_error(option, NBD_REP_ERR_POLICY, &refusal);
            self.last_refusal = Some(refusal);
            return;
        }
        let export = export.clone();
        self.push_info_replies(option, &export, requests);
        self.push_reply(option, NBD_REP_ACK, &[]);
        if option == NBD_OPT_GO {
            self.outcome = Outcome::Transmission {
                export_index: index,
                no_zeroes: self.no_zeroes(),
            };
        }
    }

    fn push_info_replies(&mut self, option: u32, export: &ExportInfo, requests: InfoRequests) {
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size_bytes.to_be_bytes());
        info.extend_from_slice(&export.transmission_flags.to_be_bytes());
        self.push_reply(option, NBD_REP_INFO, &info);

        // Sent unrequested: the spec allows it, and a client that understands it (qemu,
        // nbdkit's tools) learns the constraints even though nbd-client never asks.
        let sizes = export.block_sizes;
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&sizes.minimum.to_be_bytes());
        info.extend_from_slice(&sizes.preferred.to_be_bytes());
        info.extend_from_slice(&sizes.maximum.to_be_bytes());
        self.push_reply(option, NBD_REP_INFO, &info);

        if requests.name {
            let mut info = NBD_INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(truncate_utf8(&export.name, MAX_STRING_LEN).as_bytes());
            self.push_reply(option, NBD_REP_INFO, &info);
        }
        if requests.description && !export.description.is_empty() {
            let mut info = NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(truncate_utf8(&export.description, MAX_STRING_LEN).as_bytes());
            self.push_reply(option, NBD_REP_INFO, &info);
        }
    }

    /// One `NBD_REP_SERVER` per export, refused ones included (the client learns of the
    /// refusal when it tries to use one), then `NBD_REP_ACK`.
    fn reply_list(&mut self) {
        let mut payloads = Vec::with_capacity(self.exports.len());
        for export in &self.exports {
            let mut payload = Vec::new();
            put_length_prefixed(&mut payload, export.name.as_bytes());
            payloads.push(payload);
        }
        for payload in payloads {
            self.push_reply(NBD_OPT_LIST, NBD_REP_SERVER, &payload);
        }
        self.push_reply(NBD_OPT_LIST, NBD_REP_ACK, &[]);
    }

    /// The export a client's name selects: the empty name is the default export
    /// (`exports[0]`), any other name must match exactly.
    fn find_export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return if self.exports.is_empty() {
                None
            } else {
                Some(0)
            };
        }
        self.exports
            .iter()
            .position(|export| export.name.as_bytes() == name)
    }

    fn no_zeroes(&self) -> bool {
        self.client_flags & NBD_FLAG_C_NO_ZEROES != 0
    }

    fn push_error(&mut self, option: u32, reply_type: u32, message: &str) {
        let message = truncate_utf8(message, MAX_STRING_LEN);
        self.push_reply(option, reply_type, message.as_bytes());
    }

    fn push_reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        self.output.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&reply_type.to_be_bytes());
        put_length_prefixed(&mut self.output, payload);
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = State::Finished;
        self.outcome = Outcome::Closed(reason);
    }
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: a 32-bit name length, the name, a
/// 16-bit count of information requests and that many 16-bit requests, with nothing left
/// over. Returns `None` when the lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], InfoRequests)> {
    let mut reader = Reader::new(data);
    let name_length = usize::try_from(reader.u32()?).ok()?;
    let name = reader.take(name_length)?;
    let count = reader.u16()?;
    let mut requests = InfoRequests::default();
    for _ in 0..count {
        match reader.u16()? {
            NBD_INFO_NAME => requests.name = true,
            NBD_INFO_DESCRIPTION => requests.description = true,
            // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; the spec says to
            // ignore requests the server does not understand.
            _ => {}
        }
    }
    if !reader.is_empty() {
        return None;
    }
    Some((name, requests))
}

/// A client-chosen name made safe to echo in a message or a log line: lossily decoded and
/// cut short.
fn echo_name(name: &[u8]) -> String {
    let prefix = name.get(..ECHOED_NAME_MAX_BYTES).unwrap_or(name);
    let text = String::from_utf8_lossy(prefix);
    truncate_utf8(&text, ECHOED_NAME_MAX_BYTES).to_owned()
}

#[cfg(test)]
mod tests;
