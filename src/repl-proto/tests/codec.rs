//! The frame codec: every message round-trips, every malformation is named,
//! and no byte sequence panics the decoder.

use pairbd_repl_proto::*;
use proptest::prelude::*;

fn hello() -> Hello {
    Hello {
        node_name: "alpha".into(),
        resource: "mail".into(),
        size_bytes: 1 << 30,
        state: NodeState {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            generations: Generations {
                current: 0xABCDEF,
                bitmap: 0x1234,
                history: [0x55, 0],
            },
        },
        peer_sync_needed: true,
        unclean_primary: false,
        discard_my_data: true,
        dirty_bytes: 1 << 20,
    }
}

fn all_messages() -> Vec<Message<Vec<u8>>> {
    vec![
        Message::Hello(hello()),
        Message::State(NodeState {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            generations: Generations::default(),
        }),
        Message::Write {
            seq: 1,
            offset: 4096,
            payload: vec![7; 4096],
            fua: true,
        },
        Message::Write {
            seq: 2,
            offset: 0,
            payload: vec![1; 512],
            fua: false,
        },
        Message::Trim {
            seq: 3,
            offset: 0,
            length: 4 << 30,
        },
        Message::WriteZeroes {
            seq: 4,
            offset: 8192,
            length: 1 << 20,
            no_hole: true,
        },
        Message::Flush { seq: 5 },
        Message::Ack { seq: 1 },
        Message::FlushAck { seq: 5 },
        Message::SyncStart {
            total_bytes: 1 << 30,
        },
        Message::SyncReady,
        Message::SyncData {
            seq: 6,
            offset: 1 << 20,
            payload: vec![3; 65536],
        },
        Message::SyncDone { seq: 7 },
        Message::SyncDoneAck { seq: 7 },
        Message::Ping { seq: 8 },
        Message::Pong { seq: 8 },
        Message::DirtyRanges(pairbd_repl_proto::DirtyRanges {
            ranges: vec![(0, 4096), (1 << 20, 65536)],
            last: true,
        }),
        Message::VerifyRequest {
            seq: 9,
            offset: 1 << 20,
            length: 1 << 20,
        },
        Message::VerifyReply(pairbd_repl_proto::VerifyReply {
            seq: 9,
            crcs: vec![1, 2, 0xFFFF_FFFF],
        }),
    ]
}

#[test]
fn every_message_round_trips() {
    for m in all_messages() {
        let bytes = encode_to_vec(&m);
        let (back, used) = decode_all(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, m);
    }
}

fn reseal(bytes: &mut [u8]) {
    let crc = crc32c::crc32c(&bytes[..40]);
    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn malformed_frames_are_named() {
    let good = encode_to_vec(&Message::Write {
        seq: 1,
        offset: 0,
        payload: vec![9u8; 4096],
        fua: false,
    });
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(decode_all(&b), Err(FrameError::BadMagic(_))));
    let mut b = good.clone();
    b[4] = 2;
    reseal(&mut b);
    assert_eq!(
        decode_all(&b).unwrap_err(),
        FrameError::UnsupportedVersion {
            got: 2,
            supported: 1
        }
    );
    let mut b = good.clone();
    b[20] ^= 1;
    assert_eq!(decode_all(&b).unwrap_err(), FrameError::HeaderChecksum);
    let mut b = good.clone();
    b[5] = 99;
    reseal(&mut b);
    assert_eq!(decode_all(&b).unwrap_err(), FrameError::UnknownKind(99));
    let mut b = good.clone();
    b[6] = 0x80;
    reseal(&mut b);
    assert!(matches!(decode_all(&b), Err(FrameError::BadFlags { .. })));
    let mut b = good.clone();
    b[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode_all(&b), Err(FrameError::Oversized { .. })));
    let mut b = good.clone();
    b[100] ^= 1;
    assert!(matches!(
        decode_all(&b),
        Err(FrameError::PayloadChecksum { .. })
    ));
    let mut b = good.clone();
    b[32..40].copy_from_slice(&1u64.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(
        decode_all(&b),
        Err(FrameError::InconsistentLength { .. })
    ));
    let mut b = good.clone();
    b[44] = 1;
    reseal(&mut b);
    assert_eq!(decode_all(&b).unwrap_err(), FrameError::Reserved);
    assert!(matches!(
        decode_all(&good[..30]),
        Err(FrameError::Incomplete { .. })
    ));
    assert!(matches!(
        decode_all(&good[..100]),
        Err(FrameError::Incomplete { .. })
    ));
    // A flush frame may carry no payload.
    let mut b = encode_to_vec::<Vec<u8>>(&Message::Flush { seq: 1 });
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    reseal(&mut b);
    b.push(0);
    assert!(matches!(decode_all(&b), Err(FrameError::Oversized { .. })));
    // A control payload with trailing bytes.
    let state = encode_to_vec::<Vec<u8>>(&Message::State(NodeState {
        role: Role::Primary,
        disk: DiskState::Outdated,
        generations: Generations::default(),
    }));
    let mut b = state.clone();
    b.push(0);
    let len = (b.len() - HEADER_LEN) as u32;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&b[HEADER_LEN..]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode_all(&b), Err(FrameError::Control { .. })));
}

#[test]
fn every_single_bit_flip_is_caught() {
    for m in all_messages() {
        let good = encode_to_vec(&m);
        for i in (0..good.len()).step_by(13) {
            let mut b = good.clone();
            b[i] ^= 0x04;
            assert!(
                decode_all(&b).is_err(),
                "{} with bit flip at {i} accepted",
                m.name()
            );
        }
    }
}

#[test]
fn every_header_bit_flip_is_caught() {
    for m in all_messages() {
        let good = encode_to_vec(&m);
        for bit in 0..HEADER_LEN * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_all(&b).is_err(),
                "{} with header bit {bit} flipped accepted",
                m.name()
            );
        }
    }
}

/// A valid frame with header bytes `at..` replaced by `value`, crc resealed.
fn patched(msg: &Message<Vec<u8>>, at: usize, value: &[u8]) -> Vec<u8> {
    let mut b = encode_to_vec(msg);
    b[at..at + value.len()].copy_from_slice(value);
    reseal(&mut b);
    b
}

#[test]
fn fields_a_kind_does_not_use_must_be_zero() {
    let flush = Message::Flush { seq: 3 };
    let b = patched(&flush, 24, &7u64.to_le_bytes());
    assert_eq!(
        decode_all(&b).unwrap_err(),
        FrameError::UnusedField {
            kind: "flush",
            field: "offset",
            value: 7
        }
    );
    let ready = Message::SyncReady;
    let b = patched(&ready, 16, &1u64.to_le_bytes());
    assert!(matches!(
        decode_all(&b),
        Err(FrameError::UnusedField { field: "seq", .. })
    ));
    let start = Message::SyncStart { total_bytes: 9 };
    let b = patched(&start, 24, &1u64.to_le_bytes());
    assert!(matches!(
        decode_all(&b),
        Err(FrameError::UnusedField {
            field: "offset",
            ..
        })
    ));
}

#[test]
fn a_range_past_u64_max_is_refused() {
    let trim = Message::<Vec<u8>>::Trim {
        seq: 1,
        offset: u64::MAX - 10,
        length: 11,
    };
    let bytes = encode_to_vec(&trim);
    assert_eq!(
        decode_all(&bytes).unwrap_err(),
        FrameError::RangeOverflow {
            kind: "trim",
            offset: u64::MAX - 10,
            length: 11
        }
    );
    assert!(matches!(
        try_encode_frame(&trim),
        Err(FrameError::RangeOverflow { .. })
    ));
    // Up to the very end is fine.
    let edge = Message::<Vec<u8>>::Trim {
        seq: 1,
        offset: u64::MAX - 10,
        length: 10,
    };
    assert_eq!(decode_all(&encode_to_vec(&edge)).unwrap().0, edge);
}

#[test]
fn an_empty_write_is_refused() {
    let empty = Message::Write {
        seq: 1,
        offset: 0,
        payload: Vec::<u8>::new(),
        fua: false,
    };
    assert!(matches!(
        decode_all(&encode_to_vec(&empty)),
        Err(FrameError::InconsistentLength { .. })
    ));
    assert!(matches!(
        try_encode_frame(&empty),
        Err(FrameError::InconsistentLength { .. })
    ));
}

#[test]
fn an_oversized_hello_cannot_be_encoded() {
    let mut h = hello();
    h.node_name = "x".repeat(70_000);
    let e = try_encode_frame::<Vec<u8>>(&Message::Hello(h)).unwrap_err();
    assert!(
        matches!(e, FrameError::Oversized { kind: "hello", .. }),
        "{e}"
    );
}

#[test]
fn a_malformed_control_payload_is_named() {
    // An unknown Role discriminant.
    let garbage = [9u8, 0];
    let mut b = encode_to_vec::<Vec<u8>>(&Message::State(NodeState {
        role: Role::Primary,
        disk: DiskState::UpToDate,
        generations: Generations::default(),
    }));
    b.truncate(HEADER_LEN);
    b.extend_from_slice(&garbage);
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    b[12..16].copy_from_slice(&crc32c::crc32c(&garbage).to_le_bytes());
    reseal(&mut b);
    let e = decode_all(&b).unwrap_err();
    assert!(
        matches!(e, FrameError::Control { kind: "state", .. }),
        "{e}"
    );
}

#[test]
fn decode_frame_checks_the_payload_size() {
    let bytes = encode_to_vec(&Message::SyncData {
        seq: 1,
        offset: 0,
        payload: vec![1u8; 100],
    });
    let h = decode_header(bytes.first_chunk::<HEADER_LEN>().unwrap()).unwrap();
    assert_eq!(h.payload_len(), 100);
    assert_eq!(h.kind_name(), "sync-data");
    assert_eq!(
        decode_frame(&h, vec![1u8; 99]).unwrap_err(),
        FrameError::PayloadSize {
            kind: "sync-data",
            expected: 100,
            got: 99
        }
    );
}

#[test]
fn error_messages_show_the_values() {
    let mut b = encode_to_vec::<Vec<u8>>(&Message::Ack { seq: 1 });
    b[0..4].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    let text = decode_all(&b).unwrap_err().to_string();
    assert!(text.contains("0xdeadbeef"), "{text}");
    let b = patched(&Message::Ack { seq: 1 }, 4, &[7]);
    let text = decode_all(&b).unwrap_err().to_string();
    assert!(text.contains('7') && text.contains('1'), "{text}");
}

fn any_message() -> impl Strategy<Value = Message<Vec<u8>>> {
    let payload = || proptest::collection::vec(any::<u8>(), 0..1500);
    let role = prop_oneof![Just(Role::Primary), Just(Role::Secondary)];
    let disk = prop_oneof![
        Just(DiskState::Inconsistent),
        Just(DiskState::Outdated),
        Just(DiskState::UpToDate)
    ];
    let state = (role, disk, any::<[u64; 4]>()).prop_map(|(role, disk, g)| NodeState {
        role,
        disk,
        generations: Generations {
            current: g[0],
            bitmap: g[1],
            history: [g[2], g[3]],
        },
    });
    let hello = (
        ".{0,40}",
        ".{0,40}",
        any::<u64>(),
        state.clone(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(node_name, resource, size_bytes, state, sync, unclean)| {
            Message::Hello(Hello {
                node_name,
                resource,
                size_bytes,
                state,
                peer_sync_needed: sync,
                unclean_primary: unclean,
                discard_my_data: sync && !unclean,
                dirty_bytes: size_bytes / 3,
            })
        });
    prop_oneof![
        hello,
        state.prop_map(Message::State),
        (any::<u64>(), any::<u64>(), payload(), any::<bool>()).prop_map(
            |(seq, offset, payload, fua)| Message::Write {
                seq,
                offset,
                payload,
                fua
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, offset, length)| {
            Message::Trim {
                seq,
                offset,
                length,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(seq, offset, length, no_hole)| Message::WriteZeroes {
                seq,
                offset,
                length,
                no_hole
            }
        ),
        any::<u64>().prop_map(|seq| Message::Flush { seq }),
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        any::<u64>().prop_map(|seq| Message::FlushAck { seq }),
        any::<u64>().prop_map(|total_bytes| Message::SyncStart { total_bytes }),
        Just(Message::SyncReady),
        (any::<u64>(), any::<u64>(), payload()).prop_map(|(seq, offset, payload)| {
            Message::SyncData {
                seq,
                offset,
                payload,
            }
        }),
        any::<u64>().prop_map(|seq| Message::SyncDone { seq }),
        any::<u64>().prop_map(|seq| Message::SyncDoneAck { seq }),
        any::<u64>().prop_map(|seq| Message::Ping { seq }),
        any::<u64>().prop_map(|seq| Message::Pong { seq }),
    ]
}

proptest! {
    /// The encoder and the decoder agree: what `try_encode_frame` accepts
    /// decodes back to the same message, and what it refuses the decoder
    /// refuses too (so the link never sends a frame the peer drops on).
    #[test]
    fn every_message_round_trips_or_is_refused_by_both(m in any_message()) {
        let bytes = encode_to_vec(&m);
        match try_encode_frame(&m) {
            Ok(frame) => {
                prop_assert_eq!(&frame.header[..], &bytes[..HEADER_LEN]);
                let (back, used) = decode_all(&bytes).unwrap();
                prop_assert_eq!(used, bytes.len());
                prop_assert_eq!(back, m);
            }
            Err(e) => prop_assert_eq!(decode_all(&bytes).unwrap_err(), e),
        }
    }

    #[test]
    fn frames_back_to_back_decode_in_order(ms in proptest::collection::vec(any_message(), 1..6)) {
        let ms: Vec<_> = ms.into_iter().filter(|m| try_encode_frame(m).is_ok()).collect();
        let mut bytes = Vec::new();
        for m in &ms {
            bytes.extend_from_slice(&encode_to_vec(m));
        }
        let mut rest = &bytes[..];
        for m in &ms {
            let (back, used) = decode_all(rest).unwrap();
            prop_assert_eq!(&back, m);
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn a_truncated_frame_is_incomplete(m in any_message(), cut in any::<prop::sample::Index>()) {
        prop_assume!(try_encode_frame(&m).is_ok());
        let bytes = encode_to_vec(&m);
        let cut = cut.index(bytes.len());
        let is_incomplete = matches!(decode_all(&bytes[..cut]), Err(FrameError::Incomplete { .. }));
        prop_assert!(is_incomplete);
    }

    #[test]
    fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_all(&bytes);
    }

    #[test]
    fn headers_with_a_valid_crc_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 48..200)) {
        bytes[0..4].copy_from_slice(b"PBDR");
        bytes[4] = 1;
        reseal(&mut bytes);
        let _ = decode_all(&bytes);
    }

    #[test]
    fn writes_round_trip(seq: u64, offset: u64, fua: bool, payload in proptest::collection::vec(any::<u8>(), 1..2000)) {
        let m = Message::Write { seq, offset, payload, fua };
        let bytes = encode_to_vec(&m);
        prop_assert_eq!(decode_all(&bytes).unwrap().0, m);
    }
}
