//! The client side of the handshake wire format, for tests, fuzz seeds and pairbd's own
//! test clients.
//!
//! The server never uses these; they exist so that every test builds client messages and
//! reads server replies through one audited encoder and decoder instead of ad-hoc byte
//! arrays.

use crate::consts::*;
use crate::handshake::{OPTION_REPLY_HEADER_LEN, SERVER_GREETING_LEN};
use crate::wire::{put_length_prefixed, Reader};

/// A server message a client cannot frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The greeting or an option reply did not start with the expected magic.
    #[error("bad magic {0:#018x}")]
    BadMagic(u64),
}

/// The header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the payload that follows.
    pub length: u32,
}

/// The client flags word, as sent after the greeting.
pub fn encode_client_flags(flags: u32) -> [u8; 4] {
    flags.to_be_bytes()
}

/// One option: IHAVEOPT, the option code, the data length and the data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + data.len());
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    put_length_prefixed(&mut bytes, data);
    bytes
}

/// The data of `NBD_OPT_INFO` or `NBD_OPT_GO`: name length, name, request count, requests.
pub fn encode_info_request(name: &[u8], info_requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::with_capacity(6 + name.len() + 2 * info_requests.len());
    put_length_prefixed(&mut data, name);
    let count = u16::try_from(info_requests.len()).unwrap_or(u16::MAX);
    data.extend_from_slice(&count.to_be_bytes());
    for request in info_requests.iter().take(usize::from(count)) {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// Decodes the server greeting and returns its handshake flags.
pub fn decode_server_greeting(bytes: &[u8; SERVER_GREETING_LEN]) -> Result<u16, ReplyError> {
    let mut reader = Reader::new(bytes);
    // An 18-byte array always holds these fields; the zero defaults are never used.
    let magic = reader.u64().unwrap_or(0);
    if magic != NBDMAGIC {
        return Err(ReplyError::BadMagic(magic));
    }
    let magic = reader.u64().unwrap_or(0);
    if magic != IHAVEOPT {
        return Err(ReplyError::BadMagic(magic));
    }
    Ok(reader.u16().unwrap_or(0))
}

/// Decodes an option reply header.
pub fn decode_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ReplyError> {
    let mut reader = Reader::new(bytes);
    // A 20-byte array always holds these fields; the zero defaults are never used.
    let magic = reader.u64().unwrap_or(0);
    if magic != NBD_REP_MAGIC {
        return Err(ReplyError::BadMagic(magic));
    }
    Ok(OptionReplyHeader {
        option: reader.u32().unwrap_or(0),
        reply_type: reader.u32().unwrap_or(0),
        length: reader.u32().unwrap_or(0),
    })
}

/// Splits a byte stream into complete option replies (header and payload) and returns them
/// with the number of bytes they span. Stops at the first incomplete reply or at bytes
/// without the reply magic (such as an `NBD_OPT_EXPORT_NAME` reply).
pub fn split_option_replies(bytes: &[u8]) -> (Vec<(OptionReplyHeader, Vec<u8>)>, usize) {
    let mut replies = Vec::new();
    let mut reader = Reader::new(bytes);
    let mut used = 0;
    while let Some(header) = reader.take(OPTION_REPLY_HEADER_LEN) {
        let Ok(header) = <&[u8; OPTION_REPLY_HEADER_LEN]>::try_from(header) else {
            break;
        };
        let Ok(header) = decode_option_reply_header(header) else {
            break;
        };
        let Ok(length) = usize::try_from(header.length) else {
            break;
        };
        let Some(payload) = reader.take(length) else {
            break;
        };
        used += OPTION_REPLY_HEADER_LEN + length;
        replies.push((header, payload.to_vec()));
    }
    (replies, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_encoding_matches_the_spec_layout() {
        let bytes = encode_option(NBD_OPT_GO, &[9, 8]);
        assert_eq!(&bytes[..8], b"IHAVEOPT");
        assert_eq!(&bytes[8..12], &7u32.to_be_bytes());
        assert_eq!(&bytes[12..16], &2u32.to_be_bytes());
        assert_eq!(&bytes[16..], &[9, 8]);
    }

    #[test]
    fn info_request_encoding_matches_the_spec_layout() {
        let data = encode_info_request(b"ab", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]);
        assert_eq!(data, vec![0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 3]);
    }

    #[test]
    fn split_stops_at_foreign_bytes() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&NBD_OPT_LIST.to_be_bytes());
        bytes.extend_from_slice(&NBD_REP_ACK.to_be_bytes());
        bytes.extend_from_slice(&0u32.to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3]);
        let (replies, used) = split_option_replies(&bytes);
        assert_eq!(replies.len(), 1);
        assert_eq!(used, 20);
        assert_eq!(replies[0].0.reply_type, NBD_REP_ACK);
    }

    #[test]
    fn greeting_decoding_rejects_bad_magic() {
        let mut bytes = [0u8; SERVER_GREETING_LEN];
        bytes[..8].copy_from_slice(b"NBDMAGIC");
        assert_eq!(decode_server_greeting(&bytes), Err(ReplyError::BadMagic(0)));
        bytes[8..16].copy_from_slice(b"IHAVEOPT");
        bytes[17] = 3;
        assert_eq!(decode_server_greeting(&bytes), Ok(3));
    }
}
