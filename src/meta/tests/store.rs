//! The metadata store on real files: create, reopen, alternate slots, survive
//! a torn slot, refuse missing, corrupt and existing metadata, and never touch
//! the data area.

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
    let mut m = MetaStore::open(&loc, DATA).unwrap();
    assert_eq!(m.record(), &rec);
    assert_eq!(m.record().state.disk, DiskState::Inconsistent);
    let mut st = m.record().state;
    st.role = Role::Primary;
    st.disk = DiskState::UpToDate;
    m.write(st).unwrap();
    st.current_generation = 99;
    m.write(st).unwrap();
    let m2 = MetaStore::open(&loc, DATA).unwrap();
    assert_eq!(m2.record().state, st);
    assert_eq!(m2.record().counter, rec.counter + 2);
}

#[test]
fn a_torn_newest_slot_falls_back_to_the_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let mut m = MetaStore::open(&loc, DATA).unwrap();
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
    let newest = MetaStore::open(&loc, DATA).unwrap().record().counter;
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
    let m2 = MetaStore::open(&loc, DATA).unwrap();
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
    let e = MetaStore::open(&loc, DATA).err().unwrap();
    assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("create-md"));
    f.write_all_at(&vec![0u8; 2 * SLOT_BYTES], DATA).unwrap();
    let e = MetaStore::open(&loc, DATA).err().unwrap();
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
    let mut m = MetaStore::open(&loc, DATA).unwrap();
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
    let e = MetaStore::open(&loc, DATA).err().unwrap();
    assert!(matches!(e, MetaError::Missing { .. }), "{e}");
    create_md(&backing, &loc, DATA, 2, "beta", "mail", false).unwrap();
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), DATA);
    let m = MetaStore::open(&loc, DATA).unwrap();
    assert_eq!(m.record().node_name, "beta");
}

#[test]
fn a_too_small_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, loc) = internal(&dir);
    create_md(&backing, &loc, DATA, 1, "alpha", "mail", false).unwrap();
    let e = MetaStore::open(&loc, DATA * 2).err().unwrap();
    assert!(matches!(e, MetaError::TooSmall { .. }), "{e}");
}
