//! Replays the fuzz corpus in `fuzz/corpus/slot` through the slot decoder, so
//! CI (stable Rust, no cargo-fuzz) runs every seed a fuzzer saved there, with
//! the fuzz target's own check: a slot that decodes re-encodes to its bytes.
//!
//! The seeds are generated here: after changing one, run
//! `cargo test -p pairbd-meta --test corpus -- --ignored write_seed_corpus`.

use std::fs;
use std::path::{Path, PathBuf};

use pairbd_meta::{decode_slot, encode_slot, MetaRecord, SlotError, SLOT_BYTES};
use pairbd_repl_core::{DiskState, Role};
use proptest::prelude::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/slot")
}

fn check(bytes: &[u8]) -> Result<MetaRecord, SlotError> {
    let r = decode_slot(bytes);
    if let Ok(record) = &r {
        assert_eq!(&encode_slot(record)[..], bytes, "decode/encode round trip");
    }
    r
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let fresh = MetaRecord::new(1 << 30, 1, "alpha", "mail").unwrap();
    let mut busy = MetaRecord::new(100 << 30, 2, "beta-node.example", "mail-store").unwrap();
    busy.counter = 1234;
    busy.state.role = Role::Primary;
    busy.state.disk = DiskState::UpToDate;
    busy.state.current_generation = 0x1122_3344_5566_7788;
    busy.state.bitmap_generation = 0x99AA_BBCC_DDEE_FF00;
    busy.state.history_generations = [7, 8];
    busy.state.peer_sync_needed = true;
    let good = encode_slot(&busy).to_vec();
    let mut bad_crc = good.clone();
    bad_crc[40] ^= 1;
    let mut bad_role = good.clone();
    bad_role[29] = 9;
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    vec![
        ("fresh", encode_slot(&fresh).to_vec()),
        ("busy", good.clone()),
        ("torn-half", {
            let mut t = good.clone();
            t[SLOT_BYTES / 2..].fill(0);
            t
        }),
        ("bad-crc", bad_crc),
        ("bad-role-crc-ok", resealed(bad_role)),
        ("newer-version-crc-ok", resealed(newer)),
        ("short", good[..100].to_vec()),
        ("zeroes", vec![0; SLOT_BYTES]),
    ]
}

/// Recomputes the crc so that a field error, not the checksum, is met.
fn resealed(mut b: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&b[..SLOT_BYTES - 4]);
    b[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn every_corpus_file_decodes_or_is_refused_without_panic() {
    let dir = corpus_dir();
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let bytes = fs::read(entry.unwrap().path()).unwrap();
        let _ = check(&bytes);
        n += 1;
    }
    assert!(n >= seeds().len(), "the corpus holds the seeds ({n} files)");
}

#[test]
fn the_seeds_decode_as_intended() {
    for (name, bytes) in seeds() {
        let r = check(&bytes);
        match name {
            "fresh" | "busy" => assert!(r.is_ok(), "{name}: {r:?}"),
            "bad-crc" | "torn-half" => assert_eq!(r, Err(SlotError::Checksum), "{name}"),
            "bad-role-crc-ok" => assert!(matches!(r, Err(SlotError::Field(_))), "{name}: {r:?}"),
            "newer-version-crc-ok" => assert_eq!(r, Err(SlotError::NewerFormat(99))),
            "short" => assert_eq!(r, Err(SlotError::Length(100))),
            "zeroes" => assert_eq!(r, Err(SlotError::Magic)),
            other => panic!("unknown seed {other}"),
        }
    }
}

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let _ = check(&bytes);
    }

    #[test]
    fn a_slot_with_one_flipped_bit_is_refused(index in 0usize..SLOT_BYTES, bit in 0u8..8) {
        let record = MetaRecord::new(1 << 30, 1, "alpha", "mail").unwrap();
        let mut b = encode_slot(&record).to_vec();
        b[index] ^= 1 << bit;
        prop_assert!(check(&b).is_err());
    }
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
