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
        Message::Acks(AckBatch {
            seqs: vec![1, 2, 4, 300, u64::MAX],
        }),
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
    b[4] = 4;
    reseal(&mut b);
    assert_eq!(
        decode_all(&b).unwrap_err(),
        FrameError::UnsupportedVersion {
            got: 4,
            supported: 3
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
    assert!(text.contains('7') && text.contains('3'), "{text}");
}

/// A frame carrying `payload` as the control payload of an `Acks` frame.
fn acks_frame_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut b = encode_to_vec::<Vec<u8>>(&Message::Acks(AckBatch { seqs: vec![1, 2] }));
    b.truncate(HEADER_LEN);
    b.extend_from_slice(payload);
    b[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    reseal(&mut b);
    b
}

#[test]
fn a_version_1_frame_is_refused_naming_both_versions() {
    // A version-1 peer's first message is its hello.
    let mut b = encode_to_vec::<Vec<u8>>(&Message::Hello(hello()));
    b[4] = 1;
    reseal(&mut b);
    let e = decode_all(&b).unwrap_err();
    assert_eq!(
        e,
        FrameError::UnsupportedVersion {
            got: 1,
            supported: 3
        }
    );
    assert_eq!(
        e.to_string(),
        "unsupported protocol version 1 (this node speaks 3)"
    );
}

#[test]
fn an_ack_batch_round_trips_up_to_its_bound_and_no_further() {
    let full = Message::<Vec<u8>>::Acks(AckBatch {
        seqs: (0..ACKS_MAX as u64)
            .map(|i| u64::MAX - 3 * i)
            .rev()
            .collect(),
    });
    let bytes = encode_to_vec(&full);
    assert!(bytes.len() - HEADER_LEN <= MAX_CONTROL_PAYLOAD as usize);
    assert_eq!(decode_all(&bytes).unwrap().0, full);
    assert!(try_encode_frame(&full).is_ok());

    let over = Message::<Vec<u8>>::Acks(AckBatch {
        seqs: (1..=ACKS_MAX as u64 + 1).collect(),
    });
    let e = try_encode_frame(&over).unwrap_err();
    assert_eq!(decode_all(&encode_to_vec(&over)).unwrap_err(), e);
    assert!(
        matches!(&e, FrameError::Control { kind: "acks", detail } if detail.contains("limit 1024")),
        "{e}"
    );
}

#[test]
fn malformed_ack_batches_are_named() {
    for (seqs, says) in [
        (vec![], "0 sequence numbers"),
        (vec![7], "1 sequence numbers"),
        (vec![3, 2], "not strictly increasing (3 then 2)"),
        (vec![1, 5, 5, 9], "not strictly increasing (5 then 5)"),
    ] {
        let m = Message::<Vec<u8>>::Acks(AckBatch { seqs });
        let e = decode_all(&encode_to_vec(&m)).unwrap_err();
        assert!(
            matches!(&e, FrameError::Control { kind: "acks", detail } if detail.contains(says)),
            "{e}"
        );
        assert_eq!(try_encode_frame(&m).unwrap_err(), e);
    }
    // Postcard garbage: a length prefix promising more than the payload
    // holds, and a valid batch with a trailing byte.
    let e = decode_all(&acks_frame_with_payload(&[200, 1, 1])).unwrap_err();
    assert!(matches!(e, FrameError::Control { kind: "acks", .. }), "{e}");
    let e = decode_all(&acks_frame_with_payload(&[2, 1, 2, 0])).unwrap_err();
    assert_eq!(
        e,
        FrameError::Control {
            kind: "acks",
            detail: "1 trailing bytes".into()
        }
    );
    // Nothing but the payload may carry sequence numbers.
    let b = patched(
        &Message::<Vec<u8>>::Acks(AckBatch { seqs: vec![1, 2] }),
        16,
        &[1],
    );
    assert!(matches!(
        decode_all(&b).unwrap_err(),
        FrameError::UnusedField {
            kind: "acks",
            field: "seq",
            value: 1
        }
    ));
}

#[test]
fn acks_fold_into_one_valid_batch() {
    let mut m = Message::<Vec<u8>>::Ack { seq: 9 };
    assert!(m.absorb_ack(4));
    assert!(!m.absorb_ack(9), "a sequence number is acknowledged once");
    assert!(m.absorb_ack(12));
    assert_eq!(
        m,
        Message::Acks(AckBatch {
            seqs: vec![4, 9, 12]
        })
    );
    assert!(m.absorb_acks(&Message::Acks(AckBatch { seqs: vec![1, 10] })));
    assert!(m.absorb_acks(&Message::Ack { seq: 11 }));
    assert_eq!(m.acked_seqs(), Some(&[1, 4, 9, 10, 11, 12][..]));
    assert!(!m.absorb_acks(&Message::Ack { seq: 4 }), "a duplicate");
    assert!(!m.absorb_acks(&Message::FlushAck { seq: 20 }));
    let mut flush_ack = Message::<Vec<u8>>::FlushAck { seq: 20 };
    assert!(!flush_ack.absorb_ack(21));
    assert!(!flush_ack.absorb_acks(&Message::Ack { seq: 21 }));
    // Full at ACKS_MAX.
    let mut full = Message::<Vec<u8>>::Acks(AckBatch {
        seqs: (1..=ACKS_MAX as u64).collect(),
    });
    assert!(!full.absorb_ack(5000));
    assert!(!full.absorb_acks(&Message::Ack { seq: 5000 }));
    let mut ack = Message::<Vec<u8>>::Ack { seq: 5000 };
    assert!(!ack.absorb_acks(&full));
    assert!(try_encode_frame(&full).is_ok());
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
        // Mostly valid batches (sorted, deduplicated), some not: both sides
        // must agree either way.
        (
            proptest::collection::vec(any::<u64>(), 0..1100),
            any::<bool>()
        )
            .prop_map(|(mut seqs, tidy)| {
                if tidy {
                    seqs.sort_unstable();
                    seqs.dedup();
                }
                Message::Acks(AckBatch { seqs })
            }),
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
        bytes[4] = PROTOCOL_VERSION;
        reseal(&mut bytes);
        let _ = decode_all(&bytes);
    }

    /// However acks are folded together, the result is one valid batch
    /// naming each of them once.
    #[test]
    fn folded_acks_stay_a_valid_batch(seqs in proptest::collection::vec(1u64..5000, 1..1200)) {
        let mut m = Message::<Vec<u8>>::Ack { seq: seqs[0] };
        let mut named = std::collections::BTreeSet::from([seqs[0]]);
        for &s in &seqs[1..] {
            let folded = if s % 2 == 0 { m.absorb_ack(s) } else { m.absorb_acks(&Message::Ack { seq: s }) };
            prop_assert_eq!(folded, named.len() < ACKS_MAX && !named.contains(&s));
            if folded {
                named.insert(s);
            }
        }
        let got: Vec<u64> = m.acked_seqs().unwrap().to_vec();
        prop_assert_eq!(got, named.iter().copied().collect::<Vec<_>>());
        if named.len() >= 2 {
            prop_assert!(try_encode_frame(&m).is_ok());
            prop_assert_eq!(decode_all(&encode_to_vec(&m)).unwrap().0, m);
        }
    }

    #[test]
    fn writes_round_trip(seq: u64, offset: u64, fua: bool, payload in proptest::collection::vec(any::<u8>(), 1..2000)) {
        let m = Message::Write { seq, offset, payload, fua };
        let bytes = encode_to_vec(&m);
        prop_assert_eq!(decode_all(&bytes).unwrap().0, m);
    }
}
