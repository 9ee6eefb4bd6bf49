//! Data-path tests, each run on both engines over real temp files: round trips,
//! FUA and flush, discard and zeroing, limits, errors, O_DIRECT, the poison rule,
//! cancellation and close.

mod common;

use std::sync::Arc;

use common::{allocated_blocks, assert_zeroes, config, open, pattern, temp_dir, MIB};
use pairbd_store::{
    AlignedBuf, EngineChoice, FaultPoint, Store, StoreConfig, StoreError, MAX_WRITE_PIECES,
};

on_both_engines!(
    vectored_write_round_trip_and_limits,
    vectored_write_inline_and_direct,
    inline_fast_path_round_trip,
    round_trip_at_various_offsets_and_sizes,
    fua_write_and_flush,
    discard_reads_back_zeroes,
    write_zeroes_reads_back_zeroes_and_keeps_allocation,
    fast_only_zeroing_and_fallback_to_writing_zeroes,
    thousand_concurrent_tasks_stay_within_max_in_flight,
    ten_thousand_4k_writes_complete,
    out_of_range_and_too_large_requests_fail,
    read_only_store_rejects_writes,
    direct_io_round_trip_and_alignment,
    failed_flush_poisons_until_reopen,
    failed_fua_write_poisons_until_reopen,
    read_past_end_of_file_returns_zeroes,
    cancelled_request_releases_its_slot,
    close_stops_engine_for_all_clones,
);

async fn round_trip_at_various_offsets_and_sizes(engine: EngineChoice) {
    let dir = temp_dir();
    let size = 64 * MIB;
    let store = open(&config(&dir, "store", size, engine));
    assert_eq!(store.size_bytes(), size);
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (4096, 4096),
        (1, 1),
        (12_345, 70_000),
        (3 * MIB + 512, 128 * 1024),
        (size - 4096, 4096),
        (size - 1, 1),
        (16 * MIB, 32 << 20),
    ];
    for (seed, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(seed as u64, len);
        store
            .write(offset, data.clone(), false)
            .await
            .unwrap_or_else(|err| panic!("write {len} at {offset}: {err}"));
        let back = store.read(offset, len).await.expect("read");
        assert!(
            back == data,
            "read back differs at offset {offset} len {len}"
        );
    }
    // Never written: zeroes.
    assert_zeroes(
        &store.read(8 * MIB, 65_536).await.expect("read"),
        "unwritten",
    );
    // A shared payload is written without being consumed.
    let shared = Arc::new(pattern(99, 8192));
    store
        .write_shared(40 * MIB, Arc::clone(&shared), true)
        .await
        .expect("write_shared");
    assert!(store.read(40 * MIB, 8192).await.expect("read") == *shared);
    // Zero-length requests are accepted and do nothing.
    assert!(store.read(0, 0).await.expect("empty read").is_empty());
    store
        .write(size, AlignedBuf::zeroed(0), false)
        .await
        .expect("empty write");
    store.close().await;

    // The data is in the file itself, where a fresh open (other engine too) sees it.
    let mut cfg = StoreConfig::new(dir.path().join("store"));
    cfg.engine = EngineChoice::Pool;
    let reopened = Store::open(&cfg).expect("reopen");
    let (offset, len) = cases[3];
    assert!(reopened.read(offset, len).await.expect("read") == pattern(3, len));
}

async fn fua_write_and_flush(engine: EngineChoice) {
    let dir = temp_dir();
    let store = open(&config(&dir, "store", 8 * MIB, engine));
    let data = pattern(1, 64 * 1024);
    store
        .write(4096, data.clone(), true)
        .await
        .expect("FUA write");
    assert!(store.read(4096, data.len()).await.expect("read") == data);
    store
        .write(MIB, pattern(2, 4096), false)
        .await
        .expect("write");
    store.flush().await.expect("flush");
    store.flush().await.expect("second flush");
    // Many flushes and FUA writes at once: more than max_sync_in_flight (16).
    let mut tasks = Vec::new();
    for index in 0..64u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            if index % 2 == 0 {
                store.flush().await
            } else {
                store
                    .write(2 * MIB + index * 4096, pattern(index, 4096), true)
                    .await
            }
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("flush or FUA write");
    }
    assert!(!store.is_poisoned());
    store.close().await;
}

async fn discard_reads_back_zeroes(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", 16 * MIB, engine);
    let store = open(&cfg);
    store
        .write(MIB, pattern(1, 4 * MIB as usize), false)
        .await
        .expect("write");
    store.flush().await.expect("flush");
    let blocks_before = allocated_blocks(&cfg.path);

    store.discard(2 * MIB, MIB).await.expect("discard");
    assert_zeroes(
        &store.read(2 * MIB, MIB as usize).await.expect("read"),
        "discarded",
    );
    let head = store.read(MIB, MIB as usize).await.expect("read");
    assert!(
        head[..] == pattern(1, 4 * MIB as usize)[..MIB as usize],
        "data before the hole changed"
    );

    // Unaligned edges: the partial blocks are zeroed, the neighbours kept.
    store
        .discard(3 * MIB + 100, 5000)
        .await
        .expect("unaligned discard");
    let around = store.read(3 * MIB, 8192).await.expect("read");
    let original = pattern(1, 4 * MIB as usize);
    let base = (2 * MIB) as usize;
    assert!(around[..100] == original[base..base + 100]);
    assert_zeroes(&around[100..5100], "unaligned discard");
    assert!(around[5100..] == original[base + 5100..base + 8192]);

    store.flush().await.expect("flush");
    assert!(
        allocated_blocks(&cfg.path) <= blocks_before,
        "discard allocated blocks"
    );
    // Zero-length discards are fine; ranges past the end are not.
    store.discard(0, 0).await.expect("empty discard");
    assert!(matches!(
        store.discard(15 * MIB, 2 * MIB).await,
        Err(StoreError::OutOfRange { .. })
    ));
    store.close().await;
}

async fn write_zeroes_reads_back_zeroes_and_keeps_allocation(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", 16 * MIB, engine);
    let store = open(&cfg);
    store
        .write(0, pattern(5, 8 * MIB as usize), false)
        .await
        .expect("write");
    store.flush().await.expect("flush");
    let blocks_written = allocated_blocks(&cfg.path);
    assert!(blocks_written >= 8 * MIB / 512, "test data not allocated");

    store
        .write_zeroes(MIB, 2 * MIB, true, false)
        .await
        .expect("zero, keep allocated");
    assert_zeroes(
        &store.read(MIB, 2 * MIB as usize).await.expect("read"),
        "zeroed range",
    );
    store.flush().await.expect("flush");
    assert!(
        allocated_blocks(&cfg.path) >= blocks_written,
        "keep_allocated released blocks: {} < {blocks_written}",
        allocated_blocks(&cfg.path)
    );

    store
        .write_zeroes(4 * MIB, 2 * MIB, false, false)
        .await
        .expect("zero, may deallocate");
    assert_zeroes(
        &store.read(4 * MIB, 2 * MIB as usize).await.expect("read"),
        "punched range",
    );
    let tail = store.read(6 * MIB, 2 * MIB as usize).await.expect("read");
    assert!(
        tail[..] == pattern(5, 8 * MIB as usize)[6 * MIB as usize..],
        "neighbour changed"
    );
    store.flush().await.expect("flush");
    assert!(allocated_blocks(&cfg.path) <= blocks_written);

    // Lengths beyond 4 GiB are accepted by the API (here: a big sparse store).
    drop(store);
    let big = open(&config(&dir, "big", 6 << 30, engine));
    big.write((5 << 30) - 4096, pattern(6, 8192), false)
        .await
        .expect("write");
    big.write_zeroes(0, 6 << 30, false, false)
        .await
        .expect("zero 6 GiB");
    assert_zeroes(
        &big.read((5 << 30) - 4096, 8192).await.expect("read"),
        "6 GiB zeroing",
    );
    big.close().await;
}

async fn fast_only_zeroing_and_fallback_to_writing_zeroes(engine: EngineChoice) {
    let dir = temp_dir();
    let store = open(&config(&dir, "store", 8 * MIB, engine));
    // The test filesystem supports fallocate, so fast zeroing works both ways.
    store
        .write(0, pattern(1, 2 * MIB as usize), false)
        .await
        .expect("write");
    store
        .write_zeroes(0, MIB, true, true)
        .await
        .expect("fast zero, keep allocated");
    store
        .write_zeroes(MIB, MIB, false, true)
        .await
        .expect("fast zero, deallocate");
    assert_zeroes(
        &store.read(0, 2 * MIB as usize).await.expect("read"),
        "fast zeroes",
    );

    // A filesystem without PUNCH_HOLE and ZERO_RANGE (simulated): fast_only refuses.
    store
        .write(0, pattern(2, 3 * MIB as usize + 1000), false)
        .await
        .expect("write");
    store.inject_errors(FaultPoint::Fallocate, 2, libc::EOPNOTSUPP);
    assert!(matches!(
        store.write_zeroes(0, MIB, false, true).await,
        Err(StoreError::NotSupported)
    ));
    // Nothing was zeroed by the refused request.
    assert!(store.read(0, 4096).await.expect("read")[..] == pattern(2, 4096)[..]);
    // Without fast_only it writes zeroes instead (in 1 MiB chunks; 2 MiB + 1000 here).
    store
        .write_zeroes(100, 2 * MIB + 1000, true, false)
        .await
        .expect("slow zero");
    let back = store.read(0, 3 * MIB as usize + 1000).await.expect("read");
    let original = pattern(2, 3 * MIB as usize + 1000);
    assert!(back[..100] == original[..100]);
    assert_zeroes(&back[100..2 * MIB as usize + 1100], "written zeroes");
    assert!(back[2 * MIB as usize + 1100..] == original[2 * MIB as usize + 1100..]);
    // The store remembers: fast_only keeps failing, discard keeps working.
    assert!(matches!(
        store.write_zeroes(0, 4096, true, true).await,
        Err(StoreError::NotSupported)
    ));
    store
        .discard(3 * MIB, 1000)
        .await
        .expect("discard by writing zeroes");
    assert_zeroes(
        &store.read(3 * MIB, 1000).await.expect("read"),
        "discard fallback",
    );
    store.close().await;
}

async fn thousand_concurrent_tasks_stay_within_max_in_flight(engine: EngineChoice) {
    let dir = temp_dir();
    let mut cfg = config(&dir, "store", 8 * MIB, engine);
    cfg.max_in_flight = 8;
    cfg.pool_threads = 4;
    let store = open(&cfg);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let monitor = {
        let store = store.clone();
        let running = Arc::clone(&running);
        tokio::spawn(async move {
            let mut peak = 0;
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(store.in_flight_ops());
                tokio::task::yield_now().await;
            }
            peak
        })
    };
    let mut tasks = Vec::new();
    for index in 0..1000u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let offset = (index % 2048) * 4096;
            let data = pattern(index, 4096);
            store.write(offset, data.clone(), index % 10 == 0).await?;
            let back = store.read(offset, 4096).await?;
            assert!(back == data, "task {index} read back other data");
            Ok::<(), StoreError>(())
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("write and read");
    }
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let peak = monitor.await.expect("monitor");
    assert!(peak <= 8, "{peak} operations in flight, limit 8");
    assert_eq!(store.in_flight_ops(), 0);
    store.close().await;
}

async fn ten_thousand_4k_writes_complete(engine: EngineChoice) {
    let dir = temp_dir();
    let store = open(&config(&dir, "store", 64 * MIB, engine));
    let mut tasks = Vec::with_capacity(10_000);
    for index in 0..10_000u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut data = AlignedBuf::zeroed(4096);
            data[..8].copy_from_slice(&index.to_le_bytes());
            store.write(index * 4096, data, false).await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("write");
    }
    store.flush().await.expect("flush");
    for index in [0u64, 1, 4999, 9999] {
        let back = store.read(index * 4096, 4096).await.expect("read");
        assert_eq!(back[..8], index.to_le_bytes());
    }
    store.close().await;
}

async fn out_of_range_and_too_large_requests_fail(engine: EngineChoice) {
    let dir = temp_dir();
    let size = 4 * MIB;
    let store = open(&config(&dir, "store", size, engine));
    let out_of_range = |result: Result<_, StoreError>| matches!(result, Err(StoreError::OutOfRange { size_bytes, .. }) if size_bytes == size);
    assert!(out_of_range(store.read(size - 512, 1024).await.map(drop)));
    assert!(out_of_range(store.read(size, 1).await.map(drop)));
    assert!(out_of_range(store.read(u64::MAX, 1).await.map(drop)));
    assert!(out_of_range(
        store.write(size - 1, pattern(1, 2), false).await
    ));
    assert!(out_of_range(
        store.write(u64::MAX - 1, pattern(1, 4096), true).await
    ));
    assert!(out_of_range(store.discard(size - 4096, 8192).await));
    assert!(out_of_range(
        store.write_zeroes(1, u64::MAX, false, false).await
    ));
    let err = store.read(0, 32 * MIB as usize + 1).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    let err = store.read(size, 1).await.unwrap_err();
    assert!(err.to_string().contains(&size.to_string()), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    // Nothing was written by the refused requests.
    assert_zeroes(&store.read(size - 4096, 4096).await.expect("read"), "tail");
    store.close().await;
}

async fn read_only_store_rejects_writes(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", MIB, engine);
    let store = open(&cfg);
    store
        .write(0, pattern(7, 4096), false)
        .await
        .expect("write");
    store.flush().await.expect("flush");
    store.close().await;

    let mut ro_cfg = cfg.clone();
    ro_cfg.read_only = true;
    let ro = open(&ro_cfg);
    assert!(ro.read_only());
    assert!(ro.read(0, 4096).await.expect("read") == pattern(7, 4096));
    let read_only = |result: Result<(), StoreError>| matches!(result, Err(StoreError::ReadOnly));
    assert!(read_only(ro.write(0, pattern(8, 4096), false).await));
    assert!(read_only(ro.write(0, pattern(8, 4096), true).await));
    assert!(read_only(ro.discard(0, 4096).await));
    assert!(read_only(ro.write_zeroes(0, 4096, true, false).await));
    ro.flush()
        .await
        .expect("flush of a read-only store is a no-op");
    assert!(ro.read(0, 4096).await.expect("read") == pattern(7, 4096));
    // A second read-only opener may share the file.
    let ro_too = open(&ro_cfg);
    ro_too.close().await;
    ro.close().await;
}

async fn direct_io_round_trip_and_alignment(engine: EngineChoice) {
    let dir = temp_dir();
    let mut cfg = config(&dir, "store", 32 * MIB, engine);
    cfg.direct_io = true;
    let store = match Store::open(&cfg) {
        Err(StoreError::DirectIoUnsupported { path }) => {
            eprintln!(
                "SKIPPED: the filesystem of {} refuses O_DIRECT",
                path.display()
            );
            return;
        }
        other => other.expect("open with O_DIRECT"),
    };
    assert!(store.direct_io());
    let align = store.io_alignment();
    assert!(
        (512..=4096).contains(&align) && align.is_power_of_two(),
        "alignment {align}"
    );

    for (seed, (offset, len)) in [
        (0u64, 4096usize),
        (MIB, 1 << 20),
        (8 * MIB + 4096, 12 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(seed as u64, len);
        store
            .write(offset, data.clone(), seed == 1)
            .await
            .expect("direct write");
        assert!(store.read(offset, len).await.expect("direct read") == data);
    }
    store.flush().await.expect("flush");

    let unaligned =
        |result: Result<(), StoreError>| matches!(result, Err(StoreError::Unaligned { .. }));
    assert!(unaligned(store.read(100, 4096).await.map(drop)));
    assert!(unaligned(store.read(0, 100).await.map(drop)));
    assert!(unaligned(
        store.write(4096 + 1, pattern(1, 4096), false).await
    ));
    assert!(unaligned(store.write(0, pattern(1, 4097), true).await));
    assert!(unaligned(store.discard(0, 1).await));

    store
        .write_zeroes(MIB, 4096, true, false)
        .await
        .expect("zero");
    assert_zeroes(&store.read(MIB, 4096).await.expect("read"), "direct zeroes");
    // The zero-writing fallback keeps O_DIRECT alignment.
    store.inject_errors(FaultPoint::Fallocate, 2, libc::EOPNOTSUPP);
    store
        .write_zeroes(8 * MIB, 3 * MIB, false, false)
        .await
        .expect("fallback zero");
    assert_zeroes(
        &store.read(8 * MIB, 3 * MIB as usize).await.expect("read"),
        "fallback zeroes",
    );
    store.close().await;
}

async fn failed_flush_poisons_until_reopen(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", 4 * MIB, engine);
    let store = open(&cfg);
    store
        .write(0, pattern(1, 4096), false)
        .await
        .expect("write");
    store.inject_errors(FaultPoint::Flush, 1, libc::EIO);
    match store.flush().await {
        Err(StoreError::Io(err)) => assert_eq!(err.raw_os_error(), Some(libc::EIO)),
        other => panic!("expected the injected EIO, got {other:?}"),
    }
    assert!(store.is_poisoned());
    // The real fdatasync would succeed now; the store still refuses to claim durability.
    let err = store.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::Poisoned), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("I/O error"), "{err}");
    assert!(matches!(
        store.write(4096, pattern(2, 4096), true).await,
        Err(StoreError::Poisoned)
    ));
    // Reads and plain writes still work: they promise nothing about durability.
    store
        .write(8192, pattern(3, 4096), false)
        .await
        .expect("plain write");
    assert!(store.read(0, 4096).await.expect("read") == pattern(1, 4096));
    assert!(matches!(store.flush().await, Err(StoreError::Poisoned)));
    store.close().await;

    let reopened = open(&StoreConfig {
        create_size_bytes: None,
        ..cfg
    });
    assert!(!reopened.is_poisoned());
    reopened.flush().await.expect("flush after reopen");
    reopened
        .write(0, pattern(4, 4096), true)
        .await
        .expect("FUA after reopen");
    reopened.close().await;
}

/// Injects one EIO at `point`, then checks that a FUA write fails with it and
/// leaves the store poisoned: later flushes and FUA writes refuse.
async fn fua_failure_poisons(store: Store, point: FaultPoint) {
    store.inject_errors(point, 1, libc::EIO);
    assert!(matches!(
        store.write(0, pattern(1, 4096), true).await,
        Err(StoreError::Io(_))
    ));
    assert!(store.is_poisoned());
    assert!(matches!(store.flush().await, Err(StoreError::Poisoned)));
    assert!(matches!(
        store.write(0, pattern(1, 4096), true).await,
        Err(StoreError::Poisoned)
    ));
    store.close().await;
}

async fn failed_fua_write_poisons_until_reopen(engine: EngineChoice) {
    let dir = temp_dir();
    // Buffered: a FUA write is a plain write and a group-commit flush; the
    // flush's failure fails the write and poisons the store.
    let cfg = config(&dir, "store", 4 * MIB, engine);
    fua_failure_poisons(open(&cfg), FaultPoint::Flush).await;
    // O_DIRECT: a FUA write is one RWF_DSYNC write; its failure poisons.
    let mut direct = config(&dir, "direct", 4 * MIB, engine);
    direct.direct_io = true;
    match Store::open(&direct) {
        Err(StoreError::DirectIoUnsupported { path }) => {
            eprintln!(
                "SKIPPED (O_DIRECT part): {} refuses O_DIRECT",
                path.display()
            );
        }
        other => {
            let store = other.expect("open with O_DIRECT");
            fua_failure_poisons(store, FaultPoint::FuaWrite).await;
        }
    }
    // A failed plain write does not poison.
    let store = open(&cfg);
    store.inject_errors(FaultPoint::Write, 1, libc::EIO);
    assert!(store.write(0, pattern(1, 4096), false).await.is_err());
    assert!(!store.is_poisoned());
    store.flush().await.expect("flush");
    store.close().await;
}

async fn read_past_end_of_file_returns_zeroes(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", MIB, engine);
    let store = open(&cfg);
    store
        .write(0, pattern(1, 8192), false)
        .await
        .expect("write");
    store.flush().await.expect("flush");
    // Someone shortens the file behind the store's back.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.path)
        .and_then(|file| file.set_len(4096))
        .expect("truncate");
    let back = store.read(0, 64 * 1024).await.expect("read across EOF");
    assert!(back[..4096] == pattern(1, 8192)[..4096]);
    assert_zeroes(&back[4096..], "past EOF");
    assert_zeroes(
        &store.read(512 * 1024, 4096).await.expect("read"),
        "beyond EOF",
    );
    store.close().await;
}

async fn cancelled_request_releases_its_slot(engine: EngineChoice) {
    let dir = temp_dir();
    let store = open(&config(&dir, "store", 64 * MIB, engine));
    store
        .write(0, pattern(1, 32 << 20), false)
        .await
        .expect("write");
    for _ in 0..4 {
        // Polled once (submitted), then dropped.
        tokio::select! {
            biased;
            _ = store.read(0, 32 << 20) => {}
            _ = std::future::ready(()) => {}
        }
        tokio::select! {
            biased;
            _ = store.flush() => {}
            _ = std::future::ready(()) => {}
        }
    }
    // The engine finishes the abandoned ops and frees their slots.
    for _ in 0..10_000 {
        if store.in_flight_ops() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(store.in_flight_ops(), 0);
    assert!(store.read(0, 4096).await.expect("read") == pattern(1, 4096));
    store.flush().await.expect("flush");
    store.close().await;
}

async fn close_stops_engine_for_all_clones(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", MIB, engine);
    let store = open(&cfg);
    let clone = store.clone();
    store.write(0, pattern(1, 4096), true).await.expect("write");
    store.close().await;
    assert!(matches!(
        clone.read(0, 4096).await,
        Err(StoreError::EngineStopped)
    ));
    assert!(matches!(
        clone.flush().await,
        Err(StoreError::EngineStopped)
    ));
    drop(clone);
    // The file and its lock were released: it opens again, data intact.
    let again = open(&cfg);
    assert!(again.read(0, 4096).await.expect("read") == pattern(1, 4096));
    drop(again);
    let third = open(&cfg);
    third.close().await;
}

/// Pieces of `sizes` bytes (patterns seeded from `seed`), and their concatenation.
fn pieces(seed: u64, sizes: &[usize]) -> (Vec<Arc<AlignedBuf>>, Vec<u8>) {
    let bufs: Vec<Arc<AlignedBuf>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| Arc::new(pattern(seed * 10_000 + i as u64, len)))
        .collect();
    let joined = bufs.iter().flat_map(|b| b.iter().copied()).collect();
    (bufs, joined)
}

/// A vectored write (merged adjacent writes) lands its buffers back to back, leaves
/// the bytes around it alone, takes up to IOV_MAX buffers, refuses none or more, and
/// fails like a plain write: an error, no poison.
async fn vectored_write_round_trip_and_limits(engine: EngineChoice) {
    let dir = temp_dir();
    let store = open(&config(&dir, "store", 16 * MIB, engine));
    let around = pattern(7, 64 * 1024);
    store
        .write(MIB - 8192, around.clone(), false)
        .await
        .expect("write around");
    let (bufs, joined) = pieces(1, &[4096, 1000, 8192, 512, 3]);
    store
        .write_vectored_shared(MIB - 4096, bufs)
        .await
        .expect("vectored write");
    let back = store.read(MIB - 8192, 64 * 1024).await.expect("read");
    assert_eq!(&back[..4096], &around[..4096], "bytes before it changed");
    assert_eq!(&back[4096..4096 + joined.len()], &joined[..]);
    assert_eq!(
        &back[4096 + joined.len()..],
        &around[4096 + joined.len()..],
        "bytes after it changed"
    );
    // IOV_MAX buffers in one write; one more is refused, as is none.
    let (bufs, joined) = pieces(2, &vec![4096; MAX_WRITE_PIECES]);
    store
        .write_vectored_shared(4 * MIB, bufs)
        .await
        .expect("IOV_MAX buffers");
    assert!(store.read(4 * MIB, joined.len()).await.expect("read")[..] == joined[..]);
    let (too_many, _) = pieces(3, &vec![512; MAX_WRITE_PIECES + 1]);
    assert!(matches!(
        store.write_vectored_shared(0, too_many).await,
        Err(StoreError::TooManyPieces { .. })
    ));
    assert!(matches!(
        store.write_vectored_shared(0, Vec::new()).await,
        Err(StoreError::TooManyPieces { pieces: 0, .. })
    ));
    let (past_end, _) = pieces(4, &[4096, 4096]);
    assert!(matches!(
        store.write_vectored_shared(16 * MIB - 4096, past_end).await,
        Err(StoreError::OutOfRange { .. })
    ));
    // A failed vectored write is a failed plain write: no poison.
    store.inject_errors(FaultPoint::Write, 1, libc::EIO);
    let (bufs, _) = pieces(5, &[4096, 4096]);
    assert!(matches!(
        store.write_vectored_shared(0, bufs).await,
        Err(StoreError::Io(_))
    ));
    assert!(!store.is_poisoned());
    store
        .flush()
        .await
        .expect("flush after a failed plain write");
    store.close().await;
}

/// The inline path writes a merged write on the caller's thread (small and large),
/// and O_DIRECT takes aligned buffers as they are and refuses an unaligned one.
async fn vectored_write_inline_and_direct(engine: EngineChoice) {
    let dir = temp_dir();
    let mut cfg = config(&dir, "inline", 16 * MIB, engine);
    cfg.inline_sync_max_bytes = pairbd_store::DEFAULT_INLINE_SYNC_MAX_BYTES;
    let inline = open(&cfg);
    for (at, sizes) in [
        (0u64, vec![4096, 4096, 8192]),
        (2 * MIB, vec![64 * 1024; 8]),
    ] {
        let (bufs, joined) = pieces(at + 1, &sizes);
        inline
            .write_vectored_shared(at, bufs)
            .await
            .expect("inline vectored write");
        assert!(inline.read(at, joined.len()).await.expect("read")[..] == joined[..]);
    }
    inline.close().await;

    let mut cfg = config(&dir, "direct", 16 * MIB, engine);
    cfg.direct_io = true;
    let direct = match Store::open(&cfg) {
        Err(StoreError::DirectIoUnsupported { .. }) => {
            eprintln!("SKIPPED: O_DIRECT is refused here");
            return;
        }
        other => other.expect("open with O_DIRECT"),
    };
    let (bufs, joined) = pieces(9, &[4096, 12288, 4096]);
    direct
        .write_vectored_shared(MIB, bufs)
        .await
        .expect("direct vectored write");
    assert!(direct.read(MIB, joined.len()).await.expect("read")[..] == joined[..]);
    let (unaligned, _) = pieces(10, &[4096, 100]);
    assert!(matches!(
        direct.write_vectored_shared(0, unaligned).await,
        Err(StoreError::Unaligned { .. })
    ));
    direct.close().await;
}

/// The inline paths (on by default) and the engine agree: data written
/// through either reads back through either, including reads that straddle cached and
/// uncached pages and the zeroes past the end of a short file.
async fn inline_fast_path_round_trip(engine: EngineChoice) {
    let dir = temp_dir();
    let mut cfg = config(&dir, "inline", 8 * MIB, engine);
    cfg.inline_nowait = true;
    cfg.inline_sync_max_bytes = pairbd_store::DEFAULT_INLINE_SYNC_MAX_BYTES;
    cfg.buffered_reads_on_pool = true;
    let inline = open(&cfg);
    let mut engine_only_cfg = cfg.clone();
    engine_only_cfg.inline_nowait = false;
    engine_only_cfg.inline_sync_max_bytes = 0;
    engine_only_cfg.buffered_reads_on_pool = false;
    for (index, (offset, len)) in [(0u64, 4096usize), (5000, 10_000), (3 * MIB, 1 << 20)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(index as u64 + 1, len);
        inline
            .write(offset, AlignedBuf::from_slice(&data), false)
            .await
            .expect("inline write");
        assert_eq!(
            &*inline.read(offset, len).await.expect("inline read"),
            &data[..]
        );
    }
    inline.flush().await.expect("flush");
    let clone = inline.clone();
    inline.close().await;
    // Closed is closed, whichever path a request would have taken.
    assert!(matches!(
        clone
            .write(0, AlignedBuf::from_slice(&[9u8; 4096]), false)
            .await,
        Err(StoreError::EngineStopped)
    ));
    assert!(matches!(
        clone.read(0, 4096).await,
        Err(StoreError::EngineStopped)
    ));
    drop(clone); // it holds the store's lock until dropped
                 // Reopened without the fast path, the engine reads what the fast path wrote.
    let engine_only = open(&engine_only_cfg);
    assert_eq!(
        &*engine_only.read(0, 4096).await.unwrap(),
        &pattern(1, 4096)[..]
    );
    assert_eq!(
        &*engine_only.read(5000, 10_000).await.unwrap(),
        &pattern(2, 10_000)[..]
    );
    engine_only.close().await;
}
