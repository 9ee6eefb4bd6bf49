//! Opening a store: creation, size checks, file types, locking, configuration, and the
//! automatic engine choice.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{config, temp_dir, MIB};
use pairbd_store::{EngineChoice, EngineKind, Store, StoreConfig, StoreError};

#[test]
fn missing_file_without_size_is_refused() {
    let dir = temp_dir();
    let path = dir.path().join("absent");
    let err = Store::open(&StoreConfig::new(&path)).unwrap_err();
    assert!(matches!(err, StoreError::MissingSize { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("absent") && message.contains("no size"),
        "{message}"
    );
    assert!(!path.exists());
}

#[test]
fn missing_file_is_created_with_the_configured_size() {
    let dir = temp_dir();
    let cfg = config(&dir, "new", 3 * MIB, EngineChoice::Auto);
    let store = Store::open(&cfg).expect("create");
    assert_eq!(store.size_bytes(), 3 * MIB);
    let meta = std::fs::metadata(&cfg.path).expect("stat");
    assert_eq!(meta.len(), 3 * MIB);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    drop(store);
    // Existing and matching: opens; without a size: takes the file's size.
    Store::open(&cfg).expect("reopen with the same size");
    let store = Store::open(&StoreConfig::new(&cfg.path)).expect("reopen without size");
    assert_eq!(store.size_bytes(), 3 * MIB);
}

#[test]
fn size_mismatch_names_both_sizes() {
    let dir = temp_dir();
    let cfg = config(&dir, "store", MIB, EngineChoice::Pool);
    drop(Store::open(&cfg).expect("create"));
    let err = Store::open(&StoreConfig {
        create_size_bytes: Some(2 * MIB),
        ..cfg.clone()
    })
    .unwrap_err();
    match &err {
        StoreError::SizeMismatch {
            expected_bytes,
            actual_bytes,
            ..
        } => assert_eq!((*expected_bytes, *actual_bytes), (2 * MIB, MIB)),
        other => panic!("expected SizeMismatch, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("1048576") && message.contains("2097152"),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(&cfg.path).expect("stat").len(),
        MIB,
        "file was resized"
    );
}

#[test]
fn sizes_must_be_positive_multiples_of_512() {
    let dir = temp_dir();
    for size in [0, 1000, 4097] {
        let cfg = config(&dir, &format!("bad-{size}"), size, EngineChoice::Pool);
        let err = Store::open(&cfg).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidSize { size_bytes, .. } if size_bytes == size),
            "{err}"
        );
        assert!(!cfg.path.exists(), "a file of invalid size was created");
    }
    let odd = dir.path().join("odd");
    std::fs::write(&odd, vec![0u8; 1000]).expect("write odd file");
    let err = Store::open(&StoreConfig::new(&odd)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InvalidSize {
                size_bytes: 1000,
                ..
            }
        ),
        "{err}"
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").expect("write empty file");
    let err = Store::open(&StoreConfig::new(&empty)).unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidSize { size_bytes: 0, .. }),
        "{err}"
    );
}

#[test]
fn directories_and_character_devices_are_refused() {
    let dir = temp_dir();
    let err = Store::open(&StoreConfig::new(dir.path())).unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedFileType { .. }),
        "{err}"
    );
    let err = Store::open(&StoreConfig::new("/dev/null")).unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedFileType { .. }),
        "{err}"
    );
}

#[test]
fn read_only_open_never_creates() {
    let dir = temp_dir();
    let mut cfg = config(&dir, "absent", MIB, EngineChoice::Pool);
    cfg.read_only = true;
    let err = Store::open(&cfg).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(!cfg.path.exists());
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = temp_dir();
    let cfg = config(&dir, "store", MIB, EngineChoice::Pool);
    let first = Store::open(&cfg).expect("first");
    let err = Store::open(&cfg).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    let mut ro = cfg.clone();
    ro.read_only = true;
    assert!(matches!(Store::open(&ro), Err(StoreError::Locked { .. })));
    drop(first);
    let reader = Store::open(&ro).expect("reader");
    assert!(matches!(Store::open(&cfg), Err(StoreError::Locked { .. })));
    drop(reader);
    Store::open(&cfg).expect("writer after the reader closed");
}

#[test]
fn invalid_configuration_is_refused() {
    let dir = temp_dir();
    let base = config(&dir, "store", MIB, EngineChoice::Pool);
    for cfg in [
        StoreConfig {
            max_in_flight: 0,
            ..base.clone()
        },
        StoreConfig {
            pool_threads: 0,
            ..base.clone()
        },
        StoreConfig {
            uring_entries: 0,
            ..base.clone()
        },
        StoreConfig {
            max_request_bytes: 0,
            ..base.clone()
        },
        StoreConfig {
            max_sync_in_flight: 0,
            ..base.clone()
        },
    ] {
        let err = Store::open(&cfg).unwrap_err();
        assert!(matches!(err, StoreError::InvalidConfig(_)), "{err}");
    }
    assert!(!base.path.exists());
}

#[test]
fn auto_picks_io_uring_here_and_overrides_work() {
    let dir = temp_dir();
    let cfg = config(&dir, "store", MIB, EngineChoice::Auto);
    let auto = Store::open(&cfg).expect("auto");
    assert_eq!(
        auto.engine_kind(),
        EngineKind::Uring,
        "io_uring is allowed on this machine"
    );
    assert_eq!(auto.engine_kind().to_string(), "io_uring");
    drop(auto);
    for (choice, kind) in [
        ("pool", EngineKind::Pool),
        ("uring", EngineKind::Uring),
        ("auto", EngineKind::Uring),
    ] {
        let store = Store::open(&StoreConfig {
            engine: choice.parse().expect("engine choice"),
            ..cfg.clone()
        })
        .expect("open");
        assert_eq!(store.engine_kind(), kind, "engine = {choice}");
    }
}

#[test]
fn a_data_area_limit_keeps_requests_off_the_tail() {
    let dir = temp_dir();
    let cfg = config(&dir, "store", 3 * MIB, EngineChoice::Pool);
    drop(Store::open(&cfg).expect("create"));
    let limited = StoreConfig {
        create_size_bytes: None,
        data_size_bytes: Some(2 * MIB),
        ..cfg.clone()
    };
    let store = Store::open(&limited).expect("open with a limit");
    assert_eq!(store.size_bytes(), 2 * MIB);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let err = runtime
        .block_on(store.write(2 * MIB, pairbd_store::AlignedBuf::zeroed(4096), false))
        .unwrap_err();
    assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
    drop(store);
    let too_big = StoreConfig {
        data_size_bytes: Some(4 * MIB),
        ..limited
    };
    let err = Store::open(&too_big).unwrap_err();
    assert!(err.to_string().contains("smaller than"), "{err}");
}
