//! Unit tests of the handshake state machine: one test per rule of the option haggling.

use super::*;
use crate::client::{
    encode_client_flags, encode_info_request, encode_option, split_option_replies,
    OptionReplyHeader,
};
use crate::fuzzing::{check_server_stream, feed_in_chunks};
use crate::transmission::{encode_request_header, RequestHeader};

const BOTH_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

fn export(name: &str, size_bytes: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: format!("{name} volume"),
        size_bytes,
        transmission_flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
        block_sizes: BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25,
        },
        refusal: None,
    }
}

/// Three exports: "mail" (the default), "archive" with no description, and "standby",
/// which is refused.
fn exports() -> Vec<ExportInfo> {
    let mut archive = export("archive", 2 << 30);
    archive.description.clear();
    let mut standby = export("standby", 3 << 30);
    standby.refusal = Some("this node is Secondary".to_owned());
    vec![export("mail", 1 << 30), archive, standby]
}

/// A handshake that has received `client_flags` and whose greeting was already drained.
fn started(client_flags: u32, limits: HandshakeLimits) -> Handshake {
    let mut handshake = Handshake::new(exports(), limits);
    assert_eq!(
        handshake.handle_input(&encode_client_flags(client_flags)),
        4
    );
    let mut greeting = Vec::new();
    handshake.poll_transmit(&mut greeting);
    assert_eq!(greeting.len(), SERVER_GREETING_LEN);
    handshake
}

/// Feeds `input` (asserting all of it is consumed) and returns the option replies sent.
fn exchange(handshake: &mut Handshake, input: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
    assert_eq!(handshake.handle_input(input), input.len());
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    let (replies, used) = split_option_replies(&output);
    assert_eq!(used, output.len(), "unframed output: {output:?}");
    replies
}

fn kinds(replies: &[(OptionReplyHeader, Vec<u8>)]) -> Vec<(u32, u32)> {
    replies
        .iter()
        .map(|(h, _)| (h.option, h.reply_type))
        .collect()
}

fn go(name: &str, requests: &[u16]) -> Vec<u8> {
    encode_option(NBD_OPT_GO, &encode_info_request(name.as_bytes(), requests))
}

fn info(name: &str, requests: &[u16]) -> Vec<u8> {
    encode_option(
        NBD_OPT_INFO,
        &encode_info_request(name.as_bytes(), requests),
    )
}

fn info_type(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_both_flags() {
    let mut handshake = Handshake::new(exports(), HandshakeLimits::default());
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
    expected.extend_from_slice(&[0, 3]);
    assert_eq!(output, expected);
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
    // poll_transmit forgets what it handed out.
    output.clear();
    handshake.poll_transmit(&mut output);
    assert!(output.is_empty());
}

#[test]
fn default_limits_are_64_kib_and_256_options() {
    let limits = HandshakeLimits::default();
    assert_eq!(limits.max_option_length, 64 * 1024);
    assert_eq!(limits.max_options, 256);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut handshake = Handshake::new(exports(), HandshakeLimits::default());
    let mut input = encode_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | 4).to_vec();
    input.extend_from_slice(&go("", &[]));
    assert_eq!(handshake.handle_input(&input), 4);
    assert_eq!(
        handshake.outcome(),
        &Outcome::Closed(CloseReason::UnknownClientFlags(5))
    );
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    assert_eq!(
        output.len(),
        SERVER_GREETING_LEN,
        "nothing but the greeting is sent"
    );
}

#[test]
fn client_without_fixed_newstyle_can_still_use_export_name() {
    let mut handshake = started(0, HandshakeLimits::default());
    let input = encode_option(NBD_OPT_EXPORT_NAME, b"mail");
    assert_eq!(handshake.handle_input(&input), input.len());
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    assert_eq!(output.len(), 8 + 2 + 124);
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 0,
            no_zeroes: false
        }
    );
}

#[test]
fn export_name_reply_has_size_flags_and_124_zeroes() {
    let mut handshake = started(NBD_FLAG_C_FIXED_NEWSTYLE, HandshakeLimits::default());
    let input = encode_option(NBD_OPT_EXPORT_NAME, b"archive");
    assert_eq!(handshake.handle_input(&input), input.len());
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    let mut expected = (2u64 << 30).to_be_bytes().to_vec();
    expected.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
    expected.extend_from_slice(&[0; 124]);
    assert_eq!(output, expected);
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 1,
            no_zeroes: false
        }
    );
}

#[test]
fn export_name_with_no_zeroes_omits_the_padding() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let input = encode_option(NBD_OPT_EXPORT_NAME, b"");
    assert_eq!(handshake.handle_input(&input), input.len());
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    let mut expected = (1u64 << 30).to_be_bytes().to_vec();
    expected.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
    assert_eq!(
        output, expected,
        "the empty name selects the default export, exports[0]"
    );
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 0,
            no_zeroes: true
        }
    );
}

#[test]
fn export_name_unknown_closes_without_a_reply() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &encode_option(NBD_OPT_EXPORT_NAME, b"nope"));
    assert!(replies.is_empty());
    assert_eq!(
        handshake.outcome(),
        &Outcome::Closed(CloseReason::UnknownExportName("nope".to_owned()))
    );
}

#[test]
fn export_name_refused_closes_with_the_refusal() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(
        &mut handshake,
        &encode_option(NBD_OPT_EXPORT_NAME, b"standby"),
    );
    assert!(replies.is_empty());
    assert_eq!(
        handshake.outcome(),
        &Outcome::Closed(CloseReason::ExportRefused(
            "this node is Secondary".to_owned()
        ))
    );
}

#[test]
fn export_name_too_long_closes_without_reading_it() {
    let limits = HandshakeLimits {
        max_option_length: 16,
        max_options: 10,
    };
    let mut handshake = started(BOTH_FLAGS, limits);
    let input = encode_option(NBD_OPT_EXPORT_NAME, &[b'x'; 17]);
    assert_eq!(
        handshake.handle_input(&input),
        16,
        "only the header is consumed"
    );
    assert_eq!(
        handshake.outcome(),
        &Outcome::Closed(CloseReason::ExportNameTooLong { length: 17 })
    );
}

#[test]
fn go_default_export_sends_export_and_block_size_then_ack() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &go("", &[]));
    assert_eq!(
        kinds(&replies),
        vec![
            (NBD_OPT_GO, NBD_REP_INFO),
            (NBD_OPT_GO, NBD_REP_INFO),
            (NBD_OPT_GO, NBD_REP_ACK)
        ]
    );
    let mut export_info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    export_info.extend_from_slice(&(1u64 << 30).to_be_bytes());
    export_info.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
    assert_eq!(replies[0].1, export_info);
    let mut block_size = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    block_size.extend_from_slice(&512u32.to_be_bytes());
    block_size.extend_from_slice(&4096u32.to_be_bytes());
    block_size.extend_from_slice(&(1u32 << 25).to_be_bytes());
    assert_eq!(replies[1].1, block_size);
    assert!(replies[2].1.is_empty());
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 0,
            no_zeroes: true
        }
    );
}

#[test]
fn go_sends_no_zero_padding_even_without_no_zeroes() {
    let mut handshake = started(NBD_FLAG_C_FIXED_NEWSTYLE, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &go("mail", &[]));
    assert_eq!(replies.last().map(|(h, _)| h.reply_type), Some(NBD_REP_ACK));
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 0,
            no_zeroes: false
        }
    );
}

#[test]
fn go_sends_name_and_description_when_requested() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(
        &mut handshake,
        &go("", &[NBD_INFO_DESCRIPTION, NBD_INFO_NAME, 0x7777]),
    );
    let infos: Vec<&Vec<u8>> = replies
        .iter()
        .filter(|(h, _)| h.reply_type == NBD_REP_INFO)
        .map(|(_, p)| p)
        .collect();
    let types: Vec<u16> = infos.iter().map(|p| info_type(p)).collect();
    assert_eq!(
        types,
        vec![
            NBD_INFO_EXPORT,
            NBD_INFO_BLOCK_SIZE,
            NBD_INFO_NAME,
            NBD_INFO_DESCRIPTION
        ]
    );
    assert_eq!(
        &infos[2][2..],
        b"mail",
        "the canonical name of the default export"
    );
    assert_eq!(&infos[3][2..], b"mail volume");
    assert_eq!(replies.last().map(|(h, _)| h.reply_type), Some(NBD_REP_ACK));
}

#[test]
fn go_skips_an_empty_description() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &go("archive", &[NBD_INFO_DESCRIPTION]));
    let types: Vec<u16> = replies
        .iter()
        .filter(|(h, _)| h.reply_type == NBD_REP_INFO)
        .map(|(_, p)| info_type(p))
        .collect();
    assert_eq!(types, vec![NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE]);
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 1,
            no_zeroes: true
        }
    );
}

#[test]
fn info_answers_like_go_but_keeps_negotiating() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &info("archive", &[NBD_INFO_NAME]));
    assert_eq!(
        kinds(&replies),
        vec![
            (NBD_OPT_INFO, NBD_REP_INFO),
            (NBD_OPT_INFO, NBD_REP_INFO),
            (NBD_OPT_INFO, NBD_REP_INFO),
            (NBD_OPT_INFO, NBD_REP_ACK)
        ]
    );
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
    let replies = exchange(&mut handshake, &go("archive", &[]));
    assert_eq!(kinds(&replies).last(), Some(&(NBD_OPT_GO, NBD_REP_ACK)));
    assert_eq!(
        handshake.outcome(),
        &Outcome::Transmission {
            export_index: 1,
            no_zeroes: true
        }
    );
}

#[test]
fn go_unknown_export_is_an_error_and_negotiation_continues() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &go("nope", &[]));
    assert_eq!(kinds(&replies), vec![(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN)]);
    let message = String::from_utf8(replies[0].1.clone()).unwrap();
    assert!(message.contains("nope"), "{message}");
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
    let replies = exchange(&mut handshake, &go("mail", &[]));
    assert_eq!(kinds(&replies).last(), Some(&(NBD_OPT_GO, NBD_REP_ACK)));
}

#[test]
fn go_with_no_exports_at_all_is_unknown() {
    let mut handshake = Handshake::new(Vec::new(), HandshakeLimits::default());
    handshake.handle_input(&encode_client_flags(BOTH_FLAGS));
    handshake.poll_transmit(&mut Vec::new());
    let replies = exchange(&mut handshake, &go("", &[]));
    assert_eq!(kinds(&replies), vec![(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN)]);
}

#[test]
fn go_and_info_on_a_refused_export_get_policy_with_the_refusal_text() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    assert_eq!(handshake.last_refusal(), None);
    for option in [info("standby", &[]), go("standby", &[NBD_INFO_NAME])] {
        let replies = exchange(&mut handshake, &option);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0.reply_type, NBD_REP_ERR_POLICY);
        assert_eq!(replies[0].1, b"this node is Secondary");
        assert_eq!(handshake.outcome(), &Outcome::Negotiating);
    }
    assert_eq!(handshake.last_refusal(), Some("this node is Secondary"));
}

#[test]
fn go_with_lengths_that_do_not_add_up_is_invalid() {
    let well_formed = encode_info_request(b"mail", &[NBD_INFO_NAME]);
    let mut name_too_long = well_formed.clone();
    name_too_long[3] = 200;
    let mut count_too_high = well_formed.clone();
    count_too_high[9] = 2;
    let mut trailing = well_formed.clone();
    trailing.push(0);
    let cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0, 0, 0],
        vec![0, 0, 0, 0],
        vec![0, 0, 0, 0, 0],
        well_formed[..well_formed.len() - 1].to_vec(),
        name_too_long,
        count_too_high,
        trailing,
        vec![0xff, 0xff, 0xff, 0xff, 0, 0],
    ];
    for option in [NBD_OPT_GO, NBD_OPT_INFO] {
        for data in &cases {
            let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
            let replies = exchange(&mut handshake, &encode_option(option, data));
            assert_eq!(
                kinds(&replies),
                vec![(option, NBD_REP_ERR_INVALID)],
                "{data:?}"
            );
            assert_eq!(handshake.outcome(), &Outcome::Negotiating);
        }
    }
}

#[test]
fn list_sends_every_export_including_refused_ones_then_ack() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &encode_option(NBD_OPT_LIST, &[]));
    assert_eq!(
        kinds(&replies),
        vec![
            (NBD_OPT_LIST, NBD_REP_SERVER),
            (NBD_OPT_LIST, NBD_REP_SERVER),
            (NBD_OPT_LIST, NBD_REP_SERVER),
            (NBD_OPT_LIST, NBD_REP_ACK)
        ]
    );
    let mut expected = 4u32.to_be_bytes().to_vec();
    expected.extend_from_slice(b"mail");
    assert_eq!(replies[0].1, expected);
    assert_eq!(&replies[2].1[4..], b"standby");
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
}

#[test]
fn list_with_data_is_invalid() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let replies = exchange(&mut handshake, &encode_option(NBD_OPT_LIST, b"junk"));
    assert_eq!(kinds(&replies), vec![(NBD_OPT_LIST, NBD_REP_ERR_INVALID)]);
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
}

#[test]
fn abort_is_acknowledged_then_closes() {
    for data in [&b""[..], b"ignored"] {
        let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
        let input = encode_option(NBD_OPT_ABORT, data);
        assert_eq!(
            handshake.handle_input(&input),
            16,
            "ABORT's data is never read"
        );
        let mut output = Vec::new();
        handshake.poll_transmit(&mut output);
        let (replies, used) = split_option_replies(&output);
        assert_eq!(used, output.len());
        assert_eq!(kinds(&replies), vec![(NBD_OPT_ABORT, NBD_REP_ACK)]);
        assert_eq!(
            handshake.outcome(),
            &Outcome::Closed(CloseReason::ClientAborted)
        );
    }
}

#[test]
fn unsupported_options_get_err_unsup_and_negotiation_continues() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let unsupported = [
        (NBD_OPT_STARTTLS, Vec::new()),
        (NBD_OPT_STRUCTURED_REPLY, Vec::new()),
        (NBD_OPT_LIST_META_CONTEXT, vec![0, 0, 0, 0, 0, 0, 0, 0]),
        (
            NBD_OPT_SET_META_CONTEXT,
            vec![0, 0, 0, 4, b'm', b'a', b'i', b'l', 0, 0, 0, 0],
        ),
        (NBD_OPT_EXTENDED_HEADERS, Vec::new()),
        (NBD_OPT_PEEK_EXPORT, Vec::new()),
        (0, Vec::new()),
        (0x1234, b"some data".to_vec()),
        (u32::MAX, Vec::new()),
    ];
    for (option, data) in unsupported {
        let replies = exchange(&mut handshake, &encode_option(option, &data));
        assert_eq!(kinds(&replies), vec![(option, NBD_REP_ERR_UNSUP)]);
        assert!(std::str::from_utf8(&replies[0].1).is_ok());
        assert_eq!(handshake.outcome(), &Outcome::Negotiating);
    }
    let replies = exchange(&mut handshake, &go("mail", &[]));
    assert_eq!(kinds(&replies).last(), Some(&(NBD_OPT_GO, NBD_REP_ACK)));
}

#[test]
fn bad_option_magic_closes() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let mut input = go("mail", &[]);
    input[0] = b'X';
    assert_eq!(handshake.handle_input(&input), 16);
    assert_eq!(handshake.outcome(), &Outcome::Closed(CloseReason::BadMagic));
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    assert!(output.is_empty());
}

#[test]
fn oversized_option_is_skipped_streaming_and_answered_too_big() {
    let limits = HandshakeLimits {
        max_option_length: 32,
        max_options: 10,
    };
    let mut handshake = started(BOTH_FLAGS, limits);
    // A GO whose data is far beyond the limit and arrives in pieces; the state machine
    // must skip it without buffering and then answer.
    let mut input = encode_option(NBD_OPT_GO, &vec![0; 1 << 20]);
    input.extend_from_slice(&go("mail", &[]));
    let go_len = input.len() - go("mail", &[]).len();
    let mut output = Vec::new();
    let mut consumed = 0;
    for chunk in input[..go_len].chunks(4096) {
        consumed += handshake.handle_input(chunk);
        handshake.poll_transmit(&mut output);
        if consumed < go_len {
            assert!(
                output.is_empty(),
                "no answer before the data has streamed past"
            );
        }
    }
    assert_eq!(consumed, go_len);
    let (replies, _) = split_option_replies(&output);
    assert_eq!(kinds(&replies), vec![(NBD_OPT_GO, NBD_REP_ERR_TOO_BIG)]);
    let replies = exchange(&mut handshake, &input[go_len..]);
    assert_eq!(kinds(&replies).last(), Some(&(NBD_OPT_GO, NBD_REP_ACK)));
}

#[test]
fn oversized_options_of_every_kind_are_answered_too_big() {
    let limits = HandshakeLimits {
        max_option_length: 8,
        max_options: 10,
    };
    for option in [NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_STARTTLS, 0x9999] {
        let mut handshake = started(BOTH_FLAGS, limits);
        let replies = exchange(&mut handshake, &encode_option(option, &[0; 9]));
        assert_eq!(kinds(&replies), vec![(option, NBD_REP_ERR_TOO_BIG)]);
        assert_eq!(handshake.outcome(), &Outcome::Negotiating);
    }
}

#[test]
fn option_exactly_at_the_limit_is_parsed() {
    let data = encode_info_request(b"mail", &[]);
    let limits = HandshakeLimits {
        max_option_length: u32::try_from(data.len()).unwrap(),
        max_options: 10,
    };
    let mut handshake = started(BOTH_FLAGS, limits);
    let replies = exchange(&mut handshake, &encode_option(NBD_OPT_GO, &data));
    assert_eq!(kinds(&replies).last(), Some(&(NBD_OPT_GO, NBD_REP_ACK)));
}

#[test]
fn too_many_options_close_the_connection() {
    let limits = HandshakeLimits {
        max_option_length: 1024,
        max_options: 3,
    };
    let mut handshake = started(BOTH_FLAGS, limits);
    for _ in 0..3 {
        let replies = exchange(&mut handshake, &encode_option(NBD_OPT_LIST, &[]));
        assert_eq!(replies.len(), 4);
    }
    let input = go("mail", &[]);
    assert_eq!(handshake.handle_input(&input), 16);
    assert_eq!(
        handshake.outcome(),
        &Outcome::Closed(CloseReason::TooManyOptions)
    );
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    assert!(output.is_empty(), "the option over the limit gets no reply");
}

/// A whole realistic negotiation: LIST, INFO, an unsupported option, then GO.
fn whole_negotiation() -> Vec<u8> {
    let mut input = encode_client_flags(BOTH_FLAGS).to_vec();
    input.extend_from_slice(&encode_option(NBD_OPT_STRUCTURED_REPLY, &[]));
    input.extend_from_slice(&encode_option(NBD_OPT_LIST, &[]));
    input.extend_from_slice(&info("", &[NBD_INFO_BLOCK_SIZE]));
    input.extend_from_slice(&go("nope", &[]));
    input.extend_from_slice(&go("mail", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION]));
    input
}

#[test]
fn byte_at_a_time_gives_the_same_result_as_all_at_once() {
    let input = whole_negotiation();

    let mut whole = Handshake::new(exports(), HandshakeLimits::default());
    assert_eq!(whole.handle_input(&input), input.len());
    let mut whole_output = Vec::new();
    whole.poll_transmit(&mut whole_output);

    let mut bytewise = Handshake::new(exports(), HandshakeLimits::default());
    let mut bytewise_output = Vec::new();
    for byte in &input {
        assert_eq!(bytewise.handle_input(std::slice::from_ref(byte)), 1);
        bytewise.poll_transmit(&mut bytewise_output);
    }

    assert_eq!(bytewise_output, whole_output);
    assert_eq!(bytewise.outcome(), whole.outcome());
    assert_eq!(
        whole.outcome(),
        &Outcome::Transmission {
            export_index: 0,
            no_zeroes: true
        }
    );
    check_server_stream(&whole_output, whole.outcome(), &exports());
}

#[test]
fn empty_input_consumes_nothing() {
    let mut handshake = Handshake::new(exports(), HandshakeLimits::default());
    assert_eq!(handshake.handle_input(&[]), 0);
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
}

#[test]
fn bytes_after_go_are_left_for_the_transmission_phase() {
    let mut input = whole_negotiation();
    let negotiation_len = input.len();
    let request = encode_request_header(&RequestHeader {
        flags: 0,
        kind: 0,
        handle: 7,
        offset: 0,
        length: 512,
    });
    input.extend_from_slice(&request);
    for chunk_len in [1, 3, 16, 1000, input.len()] {
        let mut handshake = Handshake::new(exports(), HandshakeLimits::default());
        let consumed = feed_in_chunks(&mut handshake, &input, |_| chunk_len);
        assert_eq!(consumed, negotiation_len, "chunks of {chunk_len}");
        assert!(matches!(handshake.outcome(), Outcome::Transmission { .. }));
        assert_eq!(handshake.handle_input(&request), 0);
    }
}

#[test]
fn bytes_after_export_name_are_left_for_the_transmission_phase() {
    let mut input = encode_client_flags(BOTH_FLAGS).to_vec();
    input.extend_from_slice(&encode_option(NBD_OPT_EXPORT_NAME, b"mail"));
    let negotiation_len = input.len();
    input.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]);
    let mut handshake = Handshake::new(exports(), HandshakeLimits::default());
    assert_eq!(handshake.handle_input(&input), negotiation_len);
}

#[test]
fn nothing_is_consumed_after_close() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let input = encode_option(NBD_OPT_ABORT, &[]);
    handshake.handle_input(&input);
    assert_eq!(handshake.handle_input(&go("mail", &[])), 0);
}

#[test]
fn long_refusal_and_description_are_cut_to_the_string_limit() {
    let mut long = export("long", 4096);
    long.refusal = Some("é".repeat(3000));
    long.description = "d".repeat(5000);
    let mut served = long.clone();
    served.name = "served".to_owned();
    served.refusal = None;
    let mut handshake = Handshake::new(vec![long, served], HandshakeLimits::default());
    handshake.handle_input(&encode_client_flags(BOTH_FLAGS));
    handshake.poll_transmit(&mut Vec::new());
    let replies = exchange(&mut handshake, &go("long", &[]));
    assert_eq!(replies[0].1.len(), MAX_STRING_LEN);
    assert!(std::str::from_utf8(&replies[0].1).is_ok());
    let replies = exchange(&mut handshake, &go("served", &[NBD_INFO_DESCRIPTION]));
    let description = &replies[2].1;
    assert_eq!(info_type(description), NBD_INFO_DESCRIPTION);
    assert_eq!(description.len(), 2 + MAX_STRING_LEN);
}

#[test]
fn close_reasons_read_well_in_logs() {
    assert_eq!(
        CloseReason::UnknownClientFlags(4).to_string(),
        "client set unknown client flags 0x4"
    );
    assert_eq!(
        CloseReason::ExportRefused("this node is Secondary".to_owned()).to_string(),
        "export refused: this node is Secondary"
    );
}

#[test]
fn an_option_announcing_more_than_32_mib_is_refused_and_closes_without_reading_it() {
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&0x4242u32.to_be_bytes());
    header.extend_from_slice(&(MAX_SKIP_LENGTH + 1).to_be_bytes());
    assert_eq!(handshake.handle_input(&header), header.len());
    assert_eq!(
        handshake.outcome(),
        &Outcome::Closed(CloseReason::OptionTooLong {
            length: MAX_SKIP_LENGTH + 1
        })
    );
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    let reply = crate::client::decode_option_reply_header(output.first_chunk().unwrap()).unwrap();
    assert_eq!(reply.reply_type, NBD_REP_ERR_TOO_BIG);
    // Exactly at the limit, the data is still streamed past (and answered).
    let mut handshake = started(BOTH_FLAGS, HandshakeLimits::default());
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&0x4242u32.to_be_bytes());
    header.extend_from_slice(&MAX_SKIP_LENGTH.to_be_bytes());
    handshake.handle_input(&header);
    assert_eq!(handshake.outcome(), &Outcome::Negotiating);
}
