//! Native AIO for the O_DIRECT reads (`aio_reads`), on real temp files, beside each
//! engine: cold aligned reads are answered through AIO with the right bytes; reads
//! of pages the page cache holds in full (dirty ones too) come from the cache and
//! leave them dirty; closing waits for the reads in the kernel; without a runtime at
//! open the engine reads; dropping the store closes its files.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{cachestat, config, evict, open, pattern, reopen_with, temp_dir, MIB};
use pairbd_store::{AlignedBuf, EngineChoice, Store, StoreConfig, StoreError};

on_both_engines!(
    cold_aligned_reads_are_answered_through_aio,
    pages_the_cache_holds_are_read_from_it_and_stay_dirty,
    close_waits_for_aio_reads_in_flight,
);

/// The config of these tests: direct reads with AIO, the store's defaults otherwise
/// as far as reads go.
fn aio_config(dir: &tempfile::TempDir, size: u64, engine: EngineChoice) -> StoreConfig {
    let mut cfg = config(dir, "store", size, engine);
    cfg.aio_reads = true;
    cfg.inline_nowait = true;
    cfg.inline_sync_max_bytes = pairbd_store::DEFAULT_INLINE_SYNC_MAX_BYTES;
    cfg
}

/// Writes `count` patterns of `len` bytes at scattered aligned offsets, flushes and
/// evicts the file; returns the offsets with their data.
async fn cold_data(store: &Store, path: &Path, count: u64, len: usize) -> Vec<(u64, AlignedBuf)> {
    let mut written = Vec::new();
    for i in 0..count {
        let offset = (i * 97 % 2000) * 4096;
        let data = pattern(i + 1, len);
        store
            .write(offset, AlignedBuf::from_slice(&data), false)
            .await
            .expect("write");
        written.push((offset, data));
    }
    store.flush().await.expect("flush");
    evict(path);
    written.sort_by_key(|(offset, _)| *offset);
    written.dedup_by_key(|(offset, _)| *offset);
    written
}

async fn cold_aligned_reads_are_answered_through_aio(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = aio_config(&dir, 16 * MIB, engine);
    let store = open(&cfg);
    assert!(store.aio_reads(), "no AIO inside a runtime with IO");
    let data = cold_data(&store, &cfg.path, 64, 4096).await;
    // Read back concurrently (many in the kernel at once), each checked.
    let mut reads = Vec::new();
    for (offset, expected) in data.iter().cloned() {
        let store = store.clone();
        reads.push(tokio::spawn(async move {
            let got = store.read(offset, 4096).await.expect("read");
            assert!(got[..] == expected[..], "wrong bytes at {offset}");
        }));
    }
    for read in reads {
        read.await.expect("read task");
    }
    // A cold read the kernel starts without blocking is answered by AIO; the rest go
    // to the engine, so only "some" can be asserted, and each read was checked.
    assert!(store.aio_reads_done() > 0, "no read went through AIO");
    // Larger and unaligned reads: right bytes either way.
    let big = pattern(99, 1 << 20);
    store
        .write(12 * MIB, AlignedBuf::from_slice(&big), false)
        .await
        .expect("write");
    store.flush().await.expect("flush");
    evict(&cfg.path);
    assert!(store.read(12 * MIB, 1 << 20).await.expect("1 MiB read")[..] == big[..]);
    assert!(store.read(12 * MIB + 100, 5000).await.expect("unaligned")[..] == big[100..5100]);
    store.close().await;

    // With aio_reads off, the engine answers every read.
    let store = reopen_with(&cfg, |c| c.aio_reads = false);
    assert!(!store.aio_reads());
    evict(&cfg.path);
    for (offset, expected) in &data {
        assert!(store.read(*offset, 4096).await.expect("read")[..] == expected[..]);
    }
    assert_eq!(store.aio_reads_done(), 0);
    store.close().await;
}

async fn pages_the_cache_holds_are_read_from_it_and_stay_dirty(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = aio_config(&dir, 16 * MIB, engine);
    let store = open(&cfg);
    // 128 KiB: above the early-writeback bound, so its pages stay dirty until a flush.
    let len = 128 * 1024;
    let data = pattern(5, len);
    store
        .write(MIB, AlignedBuf::from_slice(&data), false)
        .await
        .expect("write");
    let pages = (len / 4096) as u64;
    assert_eq!(
        cachestat(&cfg.path, MIB, len as u64).dirty,
        pages,
        "dirty after the write"
    );
    let done = store.aio_reads_done();
    assert!(store.read(MIB, len).await.expect("read")[..] == data[..]);
    assert!(store.read(MIB + 8192, 4096).await.expect("read")[..] == data[8192..12288]);
    // An O_DIRECT read would have written the range back first.
    assert_eq!(
        cachestat(&cfg.path, MIB, len as u64).dirty,
        pages,
        "a read of cached pages went to the disk"
    );
    assert_eq!(
        store.aio_reads_done(),
        done,
        "cached pages read through AIO"
    );
    store.close().await;
}

async fn close_waits_for_aio_reads_in_flight(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = aio_config(&dir, 16 * MIB, engine);
    let store = open(&cfg);
    let data = Arc::new(cold_data(&store, &cfg.path, 256, 4096).await);
    let mut reads = Vec::new();
    for at in 0..data.len() {
        let store = store.clone();
        let data = Arc::clone(&data);
        reads.push(tokio::spawn(async move {
            let (offset, expected) = &data[at];
            match store.read(*offset, 4096).await {
                Ok(got) => assert!(got[..] == expected[..], "wrong bytes at {offset}"),
                Err(StoreError::EngineStopped) => {}
                Err(err) => panic!("read at {offset}: {err}"),
            }
        }));
    }
    // Close while reads are in the kernel: close returns once they are done; each
    // read ends with its bytes or EngineStopped, none hangs.
    tokio::task::yield_now().await;
    store.clone().close().await;
    for read in reads {
        read.await.expect("read task");
    }
    assert!(matches!(
        store.read(0, 4096).await,
        Err(StoreError::EngineStopped)
    ));
}

/// Opened outside any runtime, the store reads through the engine.
#[test]
fn a_store_opened_outside_a_runtime_reads_through_the_engine() {
    let dir = temp_dir();
    let cfg = aio_config(&dir, 4 * MIB, EngineChoice::Auto);
    let store = Store::open(&cfg).expect("open");
    assert!(!store.aio_reads());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let data = pattern(3, 8192);
        store
            .write(0, AlignedBuf::from_slice(&data), false)
            .await
            .expect("write");
        store.flush().await.expect("flush");
        evict(&cfg.path);
        assert!(store.read(0, 8192).await.expect("read")[..] == data[..]);
        store.close().await;
    });
}

/// Descriptors of this process open on `path`.
fn open_descriptors(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

/// Dropping a store without `close` stops the AIO reaper, which held the files:
/// every descriptor of the backing file is closed.
#[tokio::test(flavor = "current_thread")]
async fn dropping_the_store_closes_its_files() {
    let dir = temp_dir();
    let cfg = aio_config(&dir, 4 * MIB, EngineChoice::Uring);
    let store = open(&cfg);
    assert!(store.aio_reads());
    let data = cold_data(&store, &cfg.path, 4, 4096).await;
    assert!(store.read(data[0].0, 4096).await.expect("read")[..] == data[0].1[..]);
    assert!(open_descriptors(&cfg.path) > 0);
    drop(store);
    // The reaper runs on this (current-thread) runtime: let it see the stop.
    for _ in 0..1000 {
        if open_descriptors(&cfg.path) == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        open_descriptors(&cfg.path),
        0,
        "a descriptor outlived the store"
    );
}
