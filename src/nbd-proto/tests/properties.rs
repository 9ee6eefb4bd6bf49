//! Property tests: arbitrary bytes in arbitrary chunking never make the codec panic or
//! over-consume, chunking never changes what the handshake answers, and every encoder
//! round-trips through its decoder.

use pairbd_nbd_proto::client::{encode_client_flags, encode_info_request, encode_option};
use pairbd_nbd_proto::consts::*;
use pairbd_nbd_proto::fuzzing::{
    check_server_stream, check_verdict, feed_in_chunks, fuzz_exports, fuzz_handshake, fuzz_request,
    SMALL_HANDSHAKE_LIMITS,
};
use pairbd_nbd_proto::handshake::{Handshake, HandshakeLimits, Outcome};
use pairbd_nbd_proto::transmission::{
    decode_request_header, decode_simple_reply, encode_request_header, encode_simple_reply,
    validate, ExportLimits, RequestHeader, REQUEST_HEADER_LEN,
};
use pairbd_nbd_proto::NbdError;
use proptest::prelude::*;

/// Options a client might send: mostly well-formed ones of every kind pairbd knows, some
/// with arbitrary codes and data.
fn option_strategy() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just(Vec::new()),
        Just(b"mail".to_vec()),
        Just(b"standby".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    let requests = proptest::collection::vec(0u16..6, 0..5);
    prop_oneof![
        (name.clone(), requests.clone())
            .prop_map(|(n, r)| encode_option(NBD_OPT_INFO, &encode_info_request(&n, &r))),
        (name.clone(), requests)
            .prop_map(|(n, r)| encode_option(NBD_OPT_GO, &encode_info_request(&n, &r))),
        name.prop_map(|n| encode_option(NBD_OPT_EXPORT_NAME, &n)),
        Just(encode_option(NBD_OPT_LIST, &[])),
        Just(encode_option(NBD_OPT_ABORT, &[])),
        Just(encode_option(NBD_OPT_STRUCTURED_REPLY, &[])),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(code, data)| encode_option(code, &data)),
        proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

/// A client stream: client flags (usually valid) followed by a few options.
fn negotiation_strategy() -> impl Strategy<Value = Vec<u8>> {
    let flags = prop_oneof![4 => 0u32..4, 1 => any::<u32>()];
    (flags, proptest::collection::vec(option_strategy(), 0..8)).prop_map(|(flags, options)| {
        let mut stream = encode_client_flags(flags).to_vec();
        for option in options {
            stream.extend_from_slice(&option);
        }
        stream
    })
}

fn limits_strategy() -> impl Strategy<Value = HandshakeLimits> {
    prop_oneof![
        Just(HandshakeLimits::default()),
        Just(SMALL_HANDSHAKE_LIMITS),
        (0u32..128, 0u32..10).prop_map(|(max_option_length, max_options)| HandshakeLimits {
            max_option_length,
            max_options
        }),
    ]
}

fn export_limits_strategy() -> impl Strategy<Value = ExportLimits> {
    (
        prop_oneof![any::<u64>(), 0u64..(1 << 20)],
        any::<bool>(),
        any::<u32>(),
        prop_oneof![any::<u32>(), (0u32..13).prop_map(|shift| 1 << shift)],
    )
        .prop_map(
            |(size_bytes, read_only, max_payload, alignment)| ExportLimits {
                size_bytes,
                read_only,
                max_payload,
                alignment,
            },
        )
}

/// Runs a whole stream through a handshake with the given chunk lengths (cycled) and
/// returns (bytes consumed, output, outcome).
fn run(stream: &[u8], limits: HandshakeLimits, chunks: &[usize]) -> (usize, Vec<u8>, Outcome) {
    let mut handshake = Handshake::new(fuzz_exports(), limits);
    let consumed = feed_in_chunks(&mut handshake, stream, |index| {
        chunks
            .get(index % chunks.len().max(1))
            .copied()
            .unwrap_or(1)
    });
    let mut output = Vec::new();
    handshake.poll_transmit(&mut output);
    (consumed, output, handshake.outcome().clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_break_the_handshake(
        stream in proptest::collection::vec(any::<u8>(), 0..2048),
        limits in limits_strategy(),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let (consumed, output, outcome) = run(&stream, limits, &chunks);
        prop_assert!(consumed <= stream.len());
        check_server_stream(&output, &outcome, &fuzz_exports());
    }

    #[test]
    fn plausible_negotiations_never_break_the_handshake(
        stream in negotiation_strategy(),
        limits in limits_strategy(),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let (consumed, output, outcome) = run(&stream, limits, &chunks);
        prop_assert!(consumed <= stream.len());
        check_server_stream(&output, &outcome, &fuzz_exports());
        if let Outcome::Transmission { export_index, .. } = outcome {
            prop_assert_eq!(export_index, 0, "only the served export can be entered");
        }
    }

    #[test]
    fn chunking_never_changes_the_result(
        stream in negotiation_strategy(),
        limits in limits_strategy(),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let whole = run(&stream, limits, &[usize::MAX]);
        let bytewise = run(&stream, limits, &[1]);
        let chunked = run(&stream, limits, &chunks);
        prop_assert_eq!(&whole, &bytewise);
        prop_assert_eq!(&whole, &chunked);
    }

    #[test]
    fn arbitrary_headers_never_break_decode_or_validate(
        bytes in proptest::array::uniform28(any::<u8>()),
        limits in export_limits_strategy(),
    ) {
        if let Ok(header) = decode_request_header(&bytes) {
            prop_assert_eq!(encode_request_header(&header), bytes);
            let verdict = validate(&header, &limits);
            check_verdict(&header, &limits, &verdict);
        }
    }

    #[test]
    fn plausible_headers_get_verdicts_that_keep_their_promises(
        flags in prop_oneof![0u16..64, any::<u16>()],
        kind in prop_oneof![0u16..10, any::<u16>()],
        handle in any::<u64>(),
        offset in prop_oneof![0u64..(1 << 21), any::<u64>()],
        length in prop_oneof![0u32..(1 << 17), any::<u32>()],
        limits in export_limits_strategy(),
    ) {
        let header = RequestHeader { flags, kind, handle, offset, length };
        let bytes = encode_request_header(&header);
        prop_assert_eq!(bytes.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(decode_request_header(&bytes), Ok(header));
        check_verdict(&header, &limits, &validate(&header, &limits));
    }

    #[test]
    fn simple_replies_round_trip(handle in any::<u64>(), error in proptest::option::of(0usize..8)) {
        let error = error.and_then(|index| NbdError::ALL.get(index).copied());
        let bytes = encode_simple_reply(handle, error);
        prop_assert_eq!(decode_simple_reply(&bytes), Ok((handle, error.map_or(0, NbdError::errno))));
    }

    #[test]
    fn fuzz_entry_points_accept_anything(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        fuzz_handshake(&data);
        fuzz_request(&data);
    }
}
