//! Helpers shared by the store's integration tests: temp stores on a real filesystem
//! (under the target directory, not /tmp, which may be tmpfs and refuse O_DIRECT),
//! payload patterns, and a macro that runs a test body on both engines.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use pairbd_store::{AlignedBuf, EngineChoice, EngineKind, Store, StoreConfig};
use tempfile::TempDir;

pub const MIB: u64 = 1 << 20;

/// A fresh directory under Cargo's per-target temp dir.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("pairbd-store-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create temp dir under CARGO_TARGET_TMPDIR")
}

/// A config for `name` inside `dir`, created with `size_bytes`, on `engine`.
pub fn config(dir: &TempDir, name: &str, size_bytes: u64, engine: EngineChoice) -> StoreConfig {
    let mut cfg = StoreConfig::new(dir.path().join(name));
    cfg.create_size_bytes = Some(size_bytes);
    cfg.engine = engine;
    // These tests are about the engines: keep the inline fast path out of their way
    // (`inline_fast_path_round_trip` covers it).
    cfg.inline_nowait = false;
    cfg.inline_sync_max_bytes = 0;
    cfg.buffered_reads_on_pool = false;
    // Direct reads through the engine too (tests/aio.rs covers native AIO).
    cfg.aio_reads = false;
    cfg
}

/// Opens a store and checks it runs the engine asked for.
pub fn open(cfg: &StoreConfig) -> Store {
    let store = Store::open(cfg).expect("open store");
    let expected = match cfg.engine {
        EngineChoice::Uring => Some(EngineKind::Uring),
        EngineChoice::Pool => Some(EngineKind::Pool),
        EngineChoice::Auto => None,
    };
    if let Some(kind) = expected {
        assert_eq!(store.engine_kind(), kind);
    }
    store
}

/// Opens the store of `cfg` again (it exists), with one setting changed by `change`.
#[allow(dead_code)]
pub fn reopen_with(cfg: &StoreConfig, change: impl FnOnce(&mut StoreConfig)) -> Store {
    let mut again = cfg.clone();
    again.create_size_bytes = None;
    change(&mut again);
    open(&again)
}

/// Deterministic, position-dependent bytes (never all zero), so misplaced data shows.
pub fn pattern(seed: u64, len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for byte in buf.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = (state as u8) | 1;
    }
    buf
}

pub fn assert_zeroes(data: &[u8], what: &str) {
    if let Some(at) = data.iter().position(|&b| b != 0) {
        panic!("{what}: byte {at} is {:#x}, expected zero", data[at]);
    }
}

/// Allocated 512-byte blocks of a file (st_blocks).
pub fn allocated_blocks(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat store file").blocks()
}

/// Runs `async fn name(engine: EngineChoice)` as two tests, `name::uring` and
/// `name::pool`, each on a two-worker multi-thread runtime.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn uring() {
                    super::$name(pairbd_store::EngineChoice::Uring).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn pool() {
                    super::$name(pairbd_store::EngineChoice::Pool).await
                }
            }
        )*
    };
}

/// Drops the file's clean cached pages (after a flush, all of them).
#[allow(dead_code)]
pub fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open for fadvise");
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED)");
}

/// cachestat(2)'s counts for `[offset, offset + len)` of the file (Linux 6.5+).
#[allow(dead_code)]
pub fn cachestat(path: &Path, offset: u64, len: u64) -> pairbd_store::CacheStat {
    let file = std::fs::File::open(path).expect("open for cachestat");
    pairbd_store::cachestat(&file, offset, len).expect("cachestat(2) (Linux 6.5+)")
}
