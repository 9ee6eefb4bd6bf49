//! Replays the fuzz corpus in `fuzz/corpus/frame` through the decoder, so CI
//! (stable Rust, no cargo-fuzz) runs every seed a fuzzer saved there.
//!
//! The seeds are generated here: after changing one, run
//! `cargo test -p pairbd-repl-proto --test corpus -- --ignored write_seed_corpus`.

use std::fs;
use std::path::{Path, PathBuf};

use pairbd_repl_proto::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame")
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = Hello {
        node_name: "alpha".into(),
        resource: "mail".into(),
        size_bytes: 1 << 30,
        state: NodeState {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            generations: Generations::default(),
        },
        peer_sync_needed: false,
        unclean_primary: true,
        discard_my_data: false,
        dirty_bytes: 0,
    };
    let mut out: Vec<(&'static str, Vec<u8>)> = vec![
        ("hello", encode_to_vec::<Vec<u8>>(&Message::Hello(hello))),
        (
            "state",
            encode_to_vec::<Vec<u8>>(&Message::State(NodeState {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                generations: Generations::default(),
            })),
        ),
        (
            "write",
            encode_to_vec(&Message::Write {
                seq: 1,
                offset: 4096,
                payload: vec![0xAB; 4096],
                fua: false,
            }),
        ),
        (
            "write-fua",
            encode_to_vec(&Message::Write {
                seq: 2,
                offset: 0,
                payload: vec![1; 512],
                fua: true,
            }),
        ),
        (
            "trim",
            encode_to_vec::<Vec<u8>>(&Message::Trim {
                seq: 3,
                offset: 0,
                length: 1 << 32,
            }),
        ),
        (
            "zeroes",
            encode_to_vec::<Vec<u8>>(&Message::WriteZeroes {
                seq: 4,
                offset: 0,
                length: 8192,
                no_hole: true,
            }),
        ),
        (
            "flush",
            encode_to_vec::<Vec<u8>>(&Message::Flush { seq: 5 }),
        ),
        ("ack", encode_to_vec::<Vec<u8>>(&Message::Ack { seq: 1 })),
        (
            "flush-ack",
            encode_to_vec::<Vec<u8>>(&Message::FlushAck { seq: 5 }),
        ),
        (
            "sync-start",
            encode_to_vec::<Vec<u8>>(&Message::SyncStart {
                total_bytes: 1 << 30,
            }),
        ),
        ("sync-ready", encode_to_vec::<Vec<u8>>(&Message::SyncReady)),
        (
            "sync-data",
            encode_to_vec(&Message::SyncData {
                seq: 6,
                offset: 0,
                payload: vec![7; 8192],
            }),
        ),
        (
            "sync-done",
            encode_to_vec::<Vec<u8>>(&Message::SyncDone { seq: 7 }),
        ),
        (
            "sync-done-ack",
            encode_to_vec::<Vec<u8>>(&Message::SyncDoneAck { seq: 7 }),
        ),
    ];
    let mut several = Vec::new();
    for (_, b) in &out {
        several.extend_from_slice(b);
    }
    out.push(("several", several));
    let write = out[2].1.clone();
    out.push(("truncated", write[..100].to_vec()));
    let mut flipped = write.clone();
    flipped[200] ^= 1;
    out.push(("bad-payload-crc", flipped));
    let mut huge = write[..HEADER_LEN].to_vec();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    out.push(("huge-length-bad-crc", huge));
    out.push((
        "garbage",
        b"GET / HTTP/1.1\r\nHost: pairbd\r\n\r\n".to_vec(),
    ));
    out.push(("empty", Vec::new()));
    out.push((
        "range-overflow",
        encode_to_vec::<Vec<u8>>(&Message::WriteZeroes {
            seq: 8,
            offset: u64::MAX,
            length: 1,
            no_hole: false,
        }),
    ));
    // An ack whose unused offset field is set, header crc resealed.
    let mut unused = out[7].1.clone();
    unused[24] = 1;
    let crc = crc32c::crc32c(&unused[..40]);
    unused[40..44].copy_from_slice(&crc.to_le_bytes());
    out.push(("unused-field", unused));
    out.push((
        "acks",
        encode_to_vec::<Vec<u8>>(&Message::Acks(AckBatch {
            seqs: vec![2, 3, 5, 8, 1 << 40],
        })),
    ));
    out.push((
        "acks-full",
        encode_to_vec::<Vec<u8>>(&Message::Acks(AckBatch {
            seqs: (1..=ACKS_MAX as u64).collect(),
        })),
    ));
    out.push((
        "acks-over-limit",
        encode_to_vec::<Vec<u8>>(&Message::Acks(AckBatch {
            seqs: (1..=ACKS_MAX as u64 + 1).collect(),
        })),
    ));
    out.push((
        "acks-unsorted",
        encode_to_vec::<Vec<u8>>(&Message::Acks(AckBatch {
            seqs: vec![9, 4, 7],
        })),
    ));
    // A version-1 peer's frame (the ack seed with its version byte set back).
    let mut v1 = out[7].1.clone();
    v1[4] = 1;
    let crc = crc32c::crc32c(&v1[..40]);
    v1[40..44].copy_from_slice(&crc.to_le_bytes());
    out.push(("version-1", v1));
    out
}

#[test]
#[ignore = "writes the seed corpus; run by hand after changing a seed"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds() {
        fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

#[test]
fn the_corpus_replays_without_panics() {
    let mut count = 0;
    for entry in fs::read_dir(corpus_dir()).expect("the corpus directory exists") {
        let bytes = fs::read(entry.unwrap().path()).unwrap();
        let mut rest = &bytes[..];
        while let Ok((_, used)) = decode_all(rest) {
            rest = &rest[used..];
        }
        count += 1;
    }
    assert!(count >= seeds().len(), "only {count} corpus files");
}

#[test]
fn the_broken_seeds_are_refused() {
    let broken = [
        "truncated",
        "bad-payload-crc",
        "huge-length-bad-crc",
        "garbage",
        "empty",
        "range-overflow",
        "unused-field",
        "acks-over-limit",
        "acks-unsorted",
        "version-1",
    ];
    for (name, bytes) in seeds() {
        if broken.contains(&name) {
            assert!(decode_all(&bytes).is_err(), "{name} accepted");
        }
    }
}

#[test]
fn the_valid_seeds_decode() {
    let valid = seeds().into_iter().take(14).chain(
        seeds()
            .into_iter()
            .filter(|(n, _)| *n == "acks" || *n == "acks-full"),
    );
    let mut count = 0;
    for (name, bytes) in valid {
        let (_, used) = decode_all(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(used, bytes.len(), "{name}");
        count += 1;
    }
    assert_eq!(count, 16);
}

#[test]
fn the_corpus_on_disk_is_what_the_generator_writes() {
    // A seed written by an older codec (another protocol version) would
    // replay only as a refusal, testing nothing: regenerate with
    // write_seed_corpus after a change to the format.
    for (name, bytes) in seeds() {
        let on_disk = fs::read(corpus_dir().join(format!("seed-{name}")))
            .unwrap_or_else(|e| panic!("seed-{name}: {e}"));
        assert!(on_disk == bytes, "seed-{name} is stale");
    }
}
