//! The metadata store on real files: create, reopen, alternate slots, survive
//! a torn slot, refuse missing, corrupt, newer, foreign, resized and existing
//! metadata, and never touch the data area.

use std::os::unix::fs::FileExt;

use pairbd_meta::{create_md, MetaError, MetaLocation, MetaStore, META_RESERVED_BYTES, SLOT_BYTES};
use pairbd_repl_core::{DiskState, Role};

const DATA: u64 = 4 << 20;

fn internal(dir: &tempfile::TempDir) -> (std::path::PathBuf, MetaLocation) {
    let backing = dir.path().join("b.img");
    let loc = MetaLocation::Internal {
        backing: backing.clone(),
    };
    (backing, loc)
}

#[test]
fn create_then_open_then_write_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    let rec = create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    assert_eq!(
        std::fs::metadata(&backing).unwrap().len(),
        DATA + META_RESERVED_BYTES
    );
    let mut m = MetaStore::open(&loc).unwrap();
    assert_eq!(m.record(), &rec);
    assert_eq!(m.record().state.disk, DiskState::Inconsistent);
    let mut st = m.record().state;
    st.role = Role::Primary;
    st.disk = DiskState::UpToDate;
    m.write(st).unwrap();
    st.current_generation = 99;
    m.write(st).unwrap();
    let m2 = MetaStore::open(&loc).unwrap();
    assert_eq!(m2.record().state, st);
    assert_eq!(m2.record().counter, rec.counter + 2);
}

#[test]
fn a_torn_newest_slot_falls_back_to_the_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let mut m = MetaStore::open(&loc).unwrap();
    let before = m.record().state;
    let mut st = before;
    st.disk = DiskState::UpToDate;
    m.write(st).unwrap();
    // Find the slot holding the newest record and tear it (half zeroes).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backing)
        .unwrap();
    let newest = MetaStore::open(&loc).unwrap().record().counter;
    for slot in 0..2u64 {
        let mut buf = vec![0u8; SLOT_BYTES];
        f.read_at(&mut buf, DATA + slot * SLOT_BYTES as u64)
            .unwrap();
        if let Ok(r) = pairbd_meta::decode_slot(&buf) {
            if r.counter == newest {
                f.write_all_at(&vec![0u8; 2048], DATA + slot * SLOT_BYTES as u64 + 2048)
                    .unwrap();
            }
        }
    }
    let m2 = MetaStore::open(&loc).unwrap();
    assert_eq!(
        m2.record().state,
        before,
        "the previous state survives a torn write"
    );
}

#[test]
fn both_slots_corrupt_or_zero_are_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.write_all_at(&[0xFF; 16], DATA + 100).unwrap();
    f.write_all_at(&[0xFF; 16], DATA + SLOT_BYTES as u64 + 100)
        .unwrap();
    let e = MetaStore::open(&loc).err().unwrap();
    assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("create-md"));
    f.write_all_at(&vec![0u8; 2 * SLOT_BYTES], DATA).unwrap();
    let e = MetaStore::open(&loc).err().unwrap();
    assert!(matches!(e, MetaError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("create-md"));
}

#[test]
fn create_refuses_existing_metadata_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let e = create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", true).unwrap();
}

#[test]
fn metadata_writes_never_touch_the_data_area() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let pattern: Vec<u8> = (0..DATA).map(|i| (i * 7 % 251) as u8).collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&backing)
        .unwrap();
    f.write_all_at(&pattern, 0).unwrap();
    let mut m = MetaStore::open(&loc).unwrap();
    for g in 0..10 {
        let mut st = m.record().state;
        st.current_generation = g;
        m.write(st).unwrap();
    }
    let mut back = vec![0u8; DATA as usize];
    f.read_at(&mut back, 0).unwrap();
    assert!(back == pattern, "the data area changed");
}

#[test]
fn external_metadata_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b.img");
    let loc = MetaLocation::External {
        path: dir.path().join("b.meta"),
    };
    let e = MetaStore::open(&loc).err().unwrap();
    assert!(matches!(e, MetaError::Missing { .. }), "{e}");
    create_md(&backing, &loc, DATA, 2, "beta", "mail", false).unwrap();
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), DATA);
    let m = MetaStore::open(&loc).unwrap();
    assert_eq!(m.record().node_name, "beta");
}

#[test]
fn a_shrunk_backing_is_refused_and_foreign_or_resized_metadata_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let m = MetaStore::open(&loc).unwrap();
    m.verify(1, "alpha", "mail", DATA).unwrap();
    let e = m.verify(2, "beta", "mail", DATA).unwrap_err();
    assert!(matches!(e, MetaError::Foreign { node_id: 1, .. }), "{e}");
    assert!(
        e.to_string().contains("node alpha (id 1) of resource mail"),
        "{e}"
    );
    let e = m.verify(1, "alpha", "mail", DATA * 2).unwrap_err();
    assert!(
        matches!(e, MetaError::SizeMismatch { recorded: DATA, configured, .. } if configured == DATA * 2),
        "{e}"
    );
    // Moving the metadata to a backing too short for the recorded data size
    // (here: copying the reserved area onto a smaller file) must not let the
    // data area overlap the metadata.
    let small = dir.path().join("small.img");
    let mut tail = vec![0u8; META_RESERVED_BYTES as usize];
    std::fs::File::open(&backing)
        .unwrap()
        .read_exact_at(&mut tail, DATA)
        .unwrap();
    let f = std::fs::File::create(&small).unwrap();
    f.write_all_at(&tail, DATA / 2).unwrap();
    let e = MetaStore::open(&MetaLocation::Internal { backing: small })
        .err()
        .unwrap();
    assert!(matches!(e, MetaError::TooSmall { .. }), "{e}");
    // A file shorter than the reserved area cannot hold internal metadata.
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, [0u8; 4096]).unwrap();
    let e = MetaStore::open(&MetaLocation::Internal { backing: tiny })
        .err()
        .unwrap();
    assert!(matches!(e, MetaError::TooSmall { .. }), "{e}");
}

#[test]
fn internal_metadata_sits_in_the_last_mebibyte_of_a_larger_backing() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    // An existing file larger than needed keeps its size; the metadata goes
    // to its end, never into the data area in front of it.
    let len = DATA + 3 * META_RESERVED_BYTES;
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(len)
        .unwrap();
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), len);
    let f = std::fs::File::open(&backing).unwrap();
    let mut slot = vec![0u8; SLOT_BYTES];
    f.read_exact_at(&mut slot, len - META_RESERVED_BYTES)
        .unwrap();
    assert_eq!(pairbd_meta::decode_slot(&slot).unwrap().node_name, "alpha");
    let mut front = vec![0u8; (len - META_RESERVED_BYTES) as usize];
    f.read_exact_at(&mut front, 0).unwrap();
    assert!(front.iter().all(|&b| b == 0), "the data area was written");
    assert_eq!(
        MetaStore::open(&loc).unwrap().record().data_size_bytes,
        DATA
    );
}

#[test]
fn writes_alternate_between_the_two_slots() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let f = std::fs::File::open(&backing).unwrap();
    let counters = || -> [u64; 2] {
        let mut out = [0u64; 2];
        for (slot, c) in out.iter_mut().enumerate() {
            let mut buf = vec![0u8; SLOT_BYTES];
            f.read_exact_at(&mut buf, DATA + (slot * SLOT_BYTES) as u64)
                .unwrap();
            *c = pairbd_meta::decode_slot(&buf).unwrap().counter;
        }
        out
    };
    let mut m = MetaStore::open(&loc).unwrap();
    let mut previous = counters();
    for generation in 1..=4 {
        let mut st = m.record().state;
        st.current_generation = generation;
        m.write(st).unwrap();
        let now = counters();
        // Exactly one slot changed, and it now holds the newest counter,
        // while the other still holds the previous record.
        let changed: Vec<usize> = (0..2).filter(|&i| now[i] != previous[i]).collect();
        assert_eq!(changed.len(), 1, "{previous:?} -> {now:?}");
        assert_eq!(now[changed[0]], previous.iter().max().unwrap() + 1);
        assert_eq!(now[1 - changed[0]], *previous.iter().max().unwrap());
        previous = now;
    }
}

#[test]
fn a_slot_of_a_newer_format_is_refused_even_beside_an_older_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backing)
        .unwrap();
    let mut slot = vec![0u8; SLOT_BYTES];
    f.read_exact_at(&mut slot, DATA).unwrap();
    slot[8..12].copy_from_slice(&7u32.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..SLOT_BYTES - 4]);
    slot[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&slot, DATA).unwrap();
    let e = MetaStore::open(&loc).err().unwrap();
    assert!(matches!(e, MetaError::NewerFormat { found: 7, .. }), "{e}");
    let e = create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap_err();
    assert!(matches!(e, MetaError::NewerFormat { .. }), "{e}");
}

#[test]
fn a_crash_at_any_phase_of_a_write_leaves_the_old_or_the_new_state() {
    use pairbd_meta::CrashPhase;
    for (phase, expect_new) in [
        (CrashPhase::Before, false),
        (CrashPhase::Torn, false),
        (CrashPhase::After, true),
    ] {
        for nth in 1..=3u64 {
            let dir = tempfile::tempdir().unwrap();
            let (backing, loc) = internal(&dir);
            create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
            let mut m = MetaStore::open(&loc).unwrap();
            m.crash_for_tests(nth, phase);
            let mut st = m.record().state;
            let mut last_ok = st;
            for g in 1..=nth {
                st.current_generation = g;
                match m.write(st) {
                    Ok(()) => last_ok = st,
                    Err(MetaError::TestCrash) => {
                        assert_eq!(g, nth, "{phase:?}: crashed at the wrong write");
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(matches!(m.write(st), Err(MetaError::Poisoned)));
            let reopened = MetaStore::open(&loc).unwrap().record().state;
            let want = if expect_new { st } else { last_ok };
            assert_eq!(reopened, want, "{phase:?} at write {nth}");
        }
    }
}

#[test]
fn bitmap_pages_round_trip_and_a_torn_page_write_keeps_the_slot() {
    use pairbd_meta::CrashPhase;
    use pairbd_repl_core::bitmap::{bitmap_area_bytes, DirtyBitmap};
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let mut m = MetaStore::open(&loc).unwrap();
    assert_eq!(m.record().bitmap_granularity_bytes, 0);
    let mut bits = DirtyBitmap::new(DATA, 4096);
    bits.mark(12288, 100);
    bits.mark(DATA - 1, 1);
    let mut st = m.record().state;
    st.peer_sync_needed = true;
    m.write_with_bitmap(st, 4096, &bits.take_unsaved_pages())
        .unwrap();
    assert_eq!(m.writes(), 2, "the pages, then the slot");
    let m2 = MetaStore::open(&loc).unwrap();
    assert_eq!(m2.record().bitmap_granularity_bytes, 4096);
    let image = m2.read_bitmap(bitmap_area_bytes(DATA, 4096)).unwrap();
    let mut back = DirtyBitmap::new(DATA, 4096);
    back.load(&image);
    assert_eq!(back.ranges(), bits.ranges());
    // A crash halfway through the next page write: the slot still holds
    // the last state (the pages are committed by the slot after them).
    let mut m3 = MetaStore::open(&loc).unwrap();
    m3.crash_for_tests(1, CrashPhase::Torn);
    bits.set_all();
    st.peer_sync_needed = false;
    assert!(matches!(
        m3.write_with_bitmap(st, 4096, &bits.take_unsaved_pages()),
        Err(MetaError::TestCrash)
    ));
    let m4 = MetaStore::open(&loc).unwrap();
    assert!(m4.record().state.peer_sync_needed);
    // The data area is untouched by any of it.
    let mut first = vec![0u8; 4096];
    std::fs::File::open(&backing)
        .unwrap()
        .read_at(&mut first, DATA - 4096)
        .unwrap();
    assert!(first.iter().all(|&b| b == 0));
}

/// Dirty pages of `[offset, offset + len)` (cachestat(2), Linux 6.5+), or None
/// where the kernel has no cachestat.
fn dirty_pages(file: &std::fs::File, offset: u64, len: u64) -> Option<u64> {
    pairbd_store::cachestat(file, offset, len)
        .ok()
        .map(|c| c.dirty)
}

/// A metadata write makes itself durable, not the whole file: with internal
/// metadata the file is the backing store, and the Primary's dirty data must not
/// be written back (and waited for) before an activity-log entry is durable.
#[test]
fn a_metadata_write_leaves_the_datas_dirty_pages_to_the_store() {
    // A disk file system: tmpfs has no writeback, so nothing could be seen.
    let base = std::env::var_os("PAIRBD_DISK_TMPDIR").unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base).unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&backing)
        .unwrap();
    let mut m = MetaStore::open(&loc).unwrap();
    let data = vec![0x5au8; DATA as usize];
    // The kernel's own writeback may clean the pages at any moment (other
    // tests fill the page cache too): a few tries, each of which an fdatasync
    // would fail for sure.
    let mut kept = None;
    for g in 0..3u64 {
        f.write_all_at(&data, 0).unwrap();
        let Some(before) = dirty_pages(&f, 0, DATA) else {
            eprintln!("skipped: no cachestat(2) on this kernel");
            return;
        };
        if before == 0 {
            eprintln!("skipped: {} keeps no dirty pages", dir.path().display());
            return;
        }
        let mut st = m.record().state;
        st.current_generation = 100 + g;
        m.write(st).unwrap();
        if dirty_pages(&f, 0, DATA).unwrap() > 0 {
            kept = Some(100 + g);
            break;
        }
        f.sync_data().unwrap();
    }
    let written = kept.expect("every metadata write wrote the data area back");
    // And the write itself is there, in the slot a reopen reads.
    drop(m);
    assert_eq!(
        MetaStore::open(&loc)
            .unwrap()
            .record()
            .state
            .current_generation,
        written
    );
}
