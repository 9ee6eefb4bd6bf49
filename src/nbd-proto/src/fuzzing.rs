//! Entry points that drive the codec with arbitrary bytes and check its invariants, shared
//! by the cargo-fuzz targets in `fuzz/`, the corpus replay test and the property tests.
//!
//! The codec itself must never panic on input; these functions panic (through `assert!`)
//! only when an invariant of the codec is broken, which is exactly what a fuzzer should
//! report.

use crate::client::{decode_server_greeting, split_option_replies};
use crate::consts::*;
use crate::handshake::{
    BlockSizes, CloseReason, ExportInfo, Handshake, HandshakeLimits, Outcome, MAX_STRING_LEN,
    SERVER_GREETING_LEN, SERVER_HANDSHAKE_FLAGS,
};
use crate::transmission::{
    decode_request_header, decode_simple_reply, encode_request_header, encode_simple_reply,
    validate, Command, ExportLimits, RequestHeader, Validated, REQUEST_HEADER_LEN,
};
use crate::wire::Reader;

/// Limits that make the oversized-option and too-many-options paths easy to reach.
pub const SMALL_HANDSHAKE_LIMITS: HandshakeLimits = HandshakeLimits {
    max_option_length: 64,
    max_options: 8,
};

/// The exports every fuzzed handshake offers: a served default export and a refused one.
pub fn fuzz_exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "mail".to_owned(),
            description: "maildir volume".to_owned(),
            size_bytes: 1 << 30,
            transmission_flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA,
            block_sizes: BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20,
            },
            refusal: None,
        },
        ExportInfo {
            name: "standby".to_owned(),
            description: String::new(),
            size_bytes: 1 << 20,
            transmission_flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY,
            block_sizes: BlockSizes::default(),
            refusal: Some("this node is Secondary".to_owned()),
        },
    ]
}

/// Drives a [`Handshake`] with `data` and, if it reaches transmission, the request decoder
/// with the bytes left over.
///
/// `data[0]` selects the chunking (1 to 64 bytes per `handle_input` call, bits 0-5) and the
/// limits (bit 6: [`SMALL_HANDSHAKE_LIMITS`]); the rest is the client's byte stream,
/// starting with the 32-bit client flags.
pub fn fuzz_handshake(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let chunk_len = 1 + usize::from(control & 0x3f);
    let limits = if control & 0x40 != 0 {
        SMALL_HANDSHAKE_LIMITS
    } else {
        HandshakeLimits::default()
    };
    let exports = fuzz_exports();
    let mut handshake = Handshake::new(exports.clone(), limits);

    let consumed = feed_in_chunks(&mut handshake, stream, |_| chunk_len);
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    check_server_stream(&output, handshake.outcome(), &exports);
    assert!(
        handshake.options_received() <= limits.max_options.saturating_add(1),
        "more options were read than the limit allows"
    );

    let leftover = stream.get(consumed..).unwrap_or(&[]);
    if let Outcome::Transmission { export_index, .. } = *handshake.outcome() {
        let export = exports.get(export_index);
        assert!(
            export.is_some_and(|e| e.refusal.is_none()),
            "entered transmission on a refused or unknown export"
        );
        if let Some(export) = export {
            let limits = ExportLimits {
                size_bytes: export.size_bytes,
                read_only: export.transmission_flags & NBD_FLAG_READ_ONLY != 0,
                max_payload: export.block_sizes.maximum,
                alignment: export.block_sizes.minimum,
            };
            drive_requests(leftover, &limits);
        }
    }
}

/// Feeds `stream` to `handshake` in chunks whose lengths `next_chunk_len` chooses (given
/// the chunk index; 0 is treated as 1), checking that no call consumes more than offered
/// and that input is only left over once negotiation has ended. Returns the bytes consumed.
pub fn feed_in_chunks(
    handshake: &mut Handshake,
    stream: &[u8],
    mut next_chunk_len: impl FnMut(usize) -> usize,
) -> usize {
    let mut consumed = 0;
    let mut chunk_index = 0;
    while consumed < stream.len() {
        let chunk_len = next_chunk_len(chunk_index).max(1);
        chunk_index += 1;
        let end = consumed.saturating_add(chunk_len).min(stream.len());
        let chunk = stream.get(consumed..end).unwrap_or(&[]);
        let used = handshake.handle_input(chunk);
        assert!(
            used <= chunk.len(),
            "handle_input consumed more than it was offered"
        );
        consumed += used;
        if used < chunk.len() {
            assert_ne!(
                *handshake.outcome(),
                Outcome::Negotiating,
                "handle_input left input unconsumed while still negotiating"
            );
            break;
        }
    }
    if *handshake.outcome() != Outcome::Negotiating {
        let rest = stream.get(consumed..).unwrap_or(&[]);
        assert_eq!(
            handshake.handle_input(rest),
            0,
            "input consumed after negotiation ended"
        );
    }
    consumed
}

/// Checks that everything a handshake sent is well framed: the greeting, then complete
/// option replies, then (only after `NBD_OPT_EXPORT_NAME`) the export size and flags with
/// or without the zero padding; and that the last reply matches the outcome.
pub fn check_server_stream(output: &[u8], outcome: &Outcome, exports: &[ExportInfo]) {
    let greeting = output
        .get(..SERVER_GREETING_LEN)
        .and_then(|bytes| <&[u8; SERVER_GREETING_LEN]>::try_from(bytes).ok());
    let Some(greeting) = greeting else {
        panic!("the server greeting is missing");
    };
    assert_eq!(decode_server_greeting(greeting), Ok(SERVER_HANDSHAKE_FLAGS));
    let rest = output.get(SERVER_GREETING_LEN..).unwrap_or(&[]);
    let (replies, used) = split_option_replies(rest);
    let tail = rest.get(used..).unwrap_or(&[]);

    for (header, payload) in &replies {
        if header.reply_type & NBD_REP_FLAG_ERROR != 0 {
            assert!(payload.len() <= MAX_STRING_LEN, "error message too long");
            assert!(
                std::str::from_utf8(payload).is_ok(),
                "error message is not UTF-8"
            );
        }
    }
    let last = replies
        .last()
        .map(|(header, _)| (header.option, header.reply_type));

    if !tail.is_empty() {
        let Outcome::Transmission {
            export_index,
            no_zeroes,
        } = *outcome
        else {
            panic!("unframed bytes after the option replies: {tail:?}");
        };
        let Some(export) = exports.get(export_index) else {
            panic!("transmission on an export that does not exist");
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(&export.size_bytes.to_be_bytes());
        expected.extend_from_slice(&export.transmission_flags.to_be_bytes());
        if !no_zeroes {
            expected.extend_from_slice(&[0; 124]);
        }
        assert_eq!(tail, expected.as_slice(), "bad NBD_OPT_EXPORT_NAME reply");
        return;
    }
    match outcome {
        Outcome::Transmission { .. } => {
            assert_eq!(
                last,
                Some((NBD_OPT_GO, NBD_REP_ACK)),
                "GO must end with an ACK"
            );
        }
        Outcome::Closed(CloseReason::ClientAborted) => {
            assert_eq!(
                last,
                Some((NBD_OPT_ABORT, NBD_REP_ACK)),
                "ABORT must be acknowledged"
            );
        }
        Outcome::Negotiating | Outcome::Closed(_) => {}
    }
}

/// Drives the request decoder and validator with arbitrary bytes.
///
/// The first 14 bytes choose the export limits (size u64, read-only bit u8, max payload
/// u32, alignment as a power of two from the low 4 bits of a u8, shifts above 12 meaning 1);
/// the rest is the client's transmission-phase stream of headers and WRITE payloads.
pub fn fuzz_request(data: &[u8]) {
    let mut reader = Reader::new(data);
    let limits = (|| {
        let size_bytes = reader.u64()?;
        let read_only = reader.take(1)?.first()? & 1 != 0;
        let max_payload = reader.u32()?;
        let shift = reader.take(1)?.first()? & 0x0f;
        let alignment = if shift > 12 { 1 } else { 1u32 << shift };
        Some(ExportLimits {
            size_bytes,
            read_only,
            max_payload,
            alignment,
        })
    })();
    let Some(limits) = limits else {
        return;
    };
    let stream = data.get(14..).unwrap_or(&[]);
    drive_requests(stream, &limits);
}

/// Walks a transmission-phase stream: decodes each header, checks the verdict, skips the
/// WRITE payloads the way a driver would and round-trips the encoders. Stops at the first
/// bad magic, at DISC, or when the bytes run out.
pub fn drive_requests(stream: &[u8], limits: &ExportLimits) {
    let mut reader = Reader::new(stream);
    while let Some(bytes) = reader.take(REQUEST_HEADER_LEN) {
        let Ok(bytes) = <&[u8; REQUEST_HEADER_LEN]>::try_from(bytes) else {
            return;
        };
        let Ok(header) = decode_request_header(bytes) else {
            return;
        };
        assert_eq!(
            &encode_request_header(&header),
            bytes,
            "request header did not round-trip"
        );
        let verdict = validate(&header, limits);
        check_verdict(&header, limits, &verdict);

        let (payload, error) = match verdict {
            Validated::Accept(Command::Disconnect) => return,
            Validated::Accept(Command::Write { length, .. }) => (length, None),
            Validated::Accept(_) => (0, None),
            Validated::Reject {
                error,
                payload_to_discard,
            } => (payload_to_discard, Some(error)),
        };
        let reply = encode_simple_reply(header.handle, error);
        let decoded = decode_simple_reply(&reply);
        assert_eq!(decoded, Ok((header.handle, error.map_or(0, |e| e.errno()))));

        let Ok(payload) = usize::try_from(payload) else {
            return;
        };
        if reader.take(payload).is_none() {
            return;
        }
    }
}

/// Checks a verdict of [`validate`] against the rules it promises.
pub fn check_verdict(header: &RequestHeader, limits: &ExportLimits, verdict: &Validated) {
    let end = header.offset.checked_add(u64::from(header.length));
    let in_bounds = end.is_some_and(|end| end <= limits.size_bytes);
    let aligned = limits.alignment <= 1
        || (header.offset % u64::from(limits.alignment) == 0
            && header.length % limits.alignment == 0);
    match *verdict {
        Validated::Accept(command) => match command {
            Command::Disconnect => assert_eq!(header.kind, NBD_CMD_DISC),
            Command::Flush => assert_eq!(header.kind, NBD_CMD_FLUSH),
            Command::Read { offset, length } => {
                assert_eq!(header.kind, NBD_CMD_READ);
                assert_eq!((offset, length), (header.offset, header.length));
                assert!(in_bounds && aligned && length <= limits.max_payload);
            }
            Command::Write { offset, length, .. } => {
                assert_eq!(header.kind, NBD_CMD_WRITE);
                assert_eq!((offset, length), (header.offset, header.length));
                assert!(in_bounds && aligned && length <= limits.max_payload);
                assert!(!limits.read_only);
            }
            Command::Trim { offset, length, .. } | Command::WriteZeroes { offset, length, .. } => {
                assert!(header.kind == NBD_CMD_TRIM || header.kind == NBD_CMD_WRITE_ZEROES);
                assert_eq!((offset, length), (header.offset, header.length));
                assert!(in_bounds && aligned && !limits.read_only);
            }
            Command::Cache { offset, length } => {
                assert_eq!(header.kind, NBD_CMD_CACHE);
                assert_eq!((offset, length), (header.offset, header.length));
                assert!(in_bounds && aligned);
            }
        },
        Validated::Reject {
            payload_to_discard, ..
        } => {
            assert_ne!(
                header.kind, NBD_CMD_DISC,
                "DISC has no reply to carry an error"
            );
            let expected = if header.kind == NBD_CMD_WRITE {
                header.length
            } else {
                0
            };
            assert_eq!(payload_to_discard, expected, "wrong payload to discard");
        }
    }
}
