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
        },
        current_generation: 0xABCDEF,
        peer_sync_needed: true,
        unclean_primary: false,
    }
}

fn all_messages() -> Vec<Message<Vec<u8>>> {
    vec![
        Message::Hello(hello()),
        Message::State(NodeState {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
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

proptest! {
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
