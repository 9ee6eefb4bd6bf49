//! How the store uses the page cache, on both engines over real temp files: aligned
//! reads bypass it through the O_DIRECT read description (`direct_reads`) and still
//! see every completed write, flushed or not; small buffered writes start their own
//! writeback (`early_writeback_max_bytes`). Observed with mincore(2) and cachestat(2)
//! on the backing file, so each test fails if the store did the other thing.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use common::{cachestat, config, evict, open, pattern, reopen_with, temp_dir, MIB};
use pairbd_store::{AlignedBuf, EngineChoice, FaultPoint, StoreError};

on_both_engines!(
    direct_reads_bypass_the_page_cache_and_see_unflushed_writes,
    a_direct_read_refused_with_einval_is_read_through_the_cache,
    small_buffered_writes_start_their_writeback_at_once,
);

/// Pages of `[offset, offset + len)` of the file resident in the page cache (mincore
/// on a shared read-only mapping, which maps the file's cached pages).
fn resident_pages(path: &Path, offset: u64, len: usize) -> usize {
    let file = File::open(path).expect("open for mincore");
    let page = 4096usize;
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; only
    // mincore looks at it, nothing reads through it.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; len.div_ceil(page)];
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }
}

async fn direct_reads_bypass_the_page_cache_and_see_unflushed_writes(engine: EngineChoice) {
    let dir = temp_dir();
    let size = 16 * MIB;
    let mut cfg = config(&dir, "store", size, engine);
    cfg.inline_nowait = true;
    cfg.inline_sync_max_bytes = pairbd_store::DEFAULT_INLINE_SYNC_MAX_BYTES;
    assert!(cfg.direct_reads, "on by default");
    let store = open(&cfg);
    // The test directory takes O_DIRECT (the direct_io tests need it too).
    assert!(store.direct_reads());

    // Unflushed buffered writes (dirty pages) read back at once, through O_DIRECT
    // where aligned and through the cache where not.
    for i in 0..64u64 {
        let offset = (i * 37 % 4000) * 4096;
        let data = pattern(i, 8192);
        store
            .write(offset, AlignedBuf::from_slice(&data), false)
            .await
            .expect("write");
        assert!(
            store.read(offset, 8192).await.expect("aligned read")[..] == data[..],
            "aligned read of an unflushed write at {offset}"
        );
        assert!(
            store
                .read(offset + 100, 1000)
                .await
                .expect("unaligned read")[..]
                == data[100..1100],
            "unaligned read of an unflushed write at {offset}"
        );
    }

    // A flushed, evicted region read back aligned stays out of the page cache.
    let region = 8 * MIB;
    let len = 256 * 1024;
    let data = pattern(1000, len);
    store
        .write(region, AlignedBuf::from_slice(&data), false)
        .await
        .expect("write region");
    store.flush().await.expect("flush");
    evict(&cfg.path);
    assert_eq!(resident_pages(&cfg.path, region, len), 0, "evicted");
    assert!(store.read(region, len).await.expect("read region")[..] == data[..]);
    assert_eq!(
        resident_pages(&cfg.path, region, len),
        0,
        "an aligned read went through the page cache"
    );
    store.close().await;

    // With direct_reads off, the same read fills the page cache.
    let store = reopen_with(&cfg, |c| c.direct_reads = false);
    assert!(!store.direct_reads());
    evict(&cfg.path);
    assert!(store.read(region, len).await.expect("read region")[..] == data[..]);
    assert_eq!(
        resident_pages(&cfg.path, region, len),
        len / 4096,
        "a cached read left the region out of the page cache"
    );
    store.close().await;
}

async fn small_buffered_writes_start_their_writeback_at_once(engine: EngineChoice) {
    let dir = temp_dir();
    let mut cfg = config(&dir, "store", 16 * MIB, engine);
    cfg.inline_sync_max_bytes = pairbd_store::DEFAULT_INLINE_SYNC_MAX_BYTES;
    assert_eq!(
        cfg.early_writeback_max_bytes,
        pairbd_store::DEFAULT_EARLY_WRITEBACK_MAX_BYTES
    );
    let store = open(&cfg);
    // Small writes: none of their pages is left dirty once the write returns (each is
    // under writeback or already written). Periodic writeback takes pages dirty for
    // 30 s, so without the early start they would still be dirty here.
    let small = [(0u64, 4096usize), (MIB, 8192), (2 * MIB + 4096, 32 * 1024)];
    for (i, &(offset, len)) in small.iter().enumerate() {
        store
            .write(offset, pattern(i as u64, len), false)
            .await
            .expect("small write");
        let stat = cachestat(&cfg.path, offset, len as u64);
        let (cached, dirty) = (stat.cached, stat.dirty);
        assert!(cached > 0, "the write went through the page cache");
        assert_eq!(dirty, 0, "a {len}-byte write left dirty pages at {offset}");
    }
    // A write above the bound is left to the kernel's writeback: dirty until flushed.
    let big = 128 * 1024;
    store
        .write(8 * MIB, pattern(9, big), false)
        .await
        .expect("larger write");
    let dirty = cachestat(&cfg.path, 8 * MIB, big as u64).dirty;
    assert_eq!(
        dirty,
        (big / 4096) as u64,
        "a larger write started its writeback"
    );
    store.flush().await.expect("flush");
    assert_eq!(
        cachestat(&cfg.path, 0, 16 * MIB).dirty,
        0,
        "dirty after a flush"
    );
    store.close().await;

    // Off (0): a small write stays dirty until the flush.
    let store = reopen_with(&cfg, |c| c.early_writeback_max_bytes = 0);
    store
        .write(4 * MIB, pattern(20, 4096), false)
        .await
        .expect("small write");
    assert_eq!(
        cachestat(&cfg.path, 4 * MIB, 4096).dirty,
        1,
        "dirty without the hint"
    );
    store.flush().await.expect("flush");
    store.close().await;
}

async fn a_direct_read_refused_with_einval_is_read_through_the_cache(engine: EngineChoice) {
    let dir = temp_dir();
    let cfg = config(&dir, "store", 4 * MIB, engine);
    let store = open(&cfg);
    assert!(store.direct_reads());
    let data = pattern(7, 8192);
    store
        .write(MIB, AlignedBuf::from_slice(&data), false)
        .await
        .expect("write");
    // O_DIRECT's EINVAL (the next read op fails with it): read again, cached.
    store.inject_errors(FaultPoint::Read, 1, libc::EINVAL);
    assert!(store.read(MIB, 8192).await.expect("fallback read")[..] == data[..]);
    // Any other error is the read's answer, not retried.
    store.inject_errors(FaultPoint::Read, 1, libc::EIO);
    match store.read(MIB, 8192).await {
        Err(StoreError::Io(err)) => assert_eq!(err.raw_os_error(), Some(libc::EIO)),
        other => panic!("expected EIO, got {:?}", other.map(|b| b.len())),
    }
    assert!(store.read(MIB, 8192).await.expect("read")[..] == data[..]);
    store.close().await;
}
