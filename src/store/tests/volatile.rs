//! The power-cut simulation of a test store: flushed and FUA data always
//! survive, unflushed writes survive, vanish or tear by seed, and a cut store
//! refuses further changes.

mod common;

use common::{config, open, pattern, temp_dir, MIB};
use pairbd_store::EngineChoice;

const BLOCK: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_only_what_was_never_flushed() {
    let mut outcomes = [0u32; 3]; // new, old, torn
    for seed in 0..24u64 {
        let dir = temp_dir();
        let mut cfg = config(&dir, "v.img", 4 * MIB, EngineChoice::Auto);
        cfg.volatile_for_tests = true;
        let store = open(&cfg);
        let flushed = pattern(1, BLOCK);
        let before = pattern(2, BLOCK);
        let after = pattern(3, BLOCK);
        store.write(0, flushed.clone(), false).await.unwrap();
        store.write(MIB, before.clone(), false).await.unwrap();
        store.flush().await.unwrap();
        // Unflushed: an overwrite, a write to fresh space, a trim.
        store.write(MIB, after.clone(), false).await.unwrap();
        store.write(2 * MIB, after.clone(), false).await.unwrap();
        store.discard(0, 4096).await.unwrap();
        let report = store.power_cut(seed).unwrap();
        assert_eq!(report.fua_kept, 0);
        assert_eq!(report.kept + report.dropped + report.torn, 3);
        // Every later change fails: the power is off.
        assert!(store.write(3 * MIB, after.clone(), false).await.is_err());
        drop(store);
        let bytes = std::fs::read(dir.path().join("v.img")).unwrap();
        // The flushed block: its first 4 KiB trimmed or not, the rest intact.
        let head = &bytes[..4096];
        assert!(head == &flushed[..4096] || head.iter().all(|b| *b == 0));
        assert_eq!(&bytes[4096..BLOCK], &flushed[4096..]);
        // Each 4 KiB piece of the unflushed overwrite is old or new.
        let m = MIB as usize;
        for (i, piece) in bytes[m..m + BLOCK].chunks(4096).enumerate() {
            let range = i * 4096..(i + 1) * 4096;
            assert!(piece == &before[range.clone()] || piece == &after[range]);
        }
        let fresh = &bytes[2 * m..2 * m + BLOCK];
        let whole_new = fresh == &after[..];
        let whole_old = fresh.iter().all(|b| *b == 0);
        outcomes[if whole_new {
            0
        } else if whole_old {
            1
        } else {
            2
        }] += 1;
        for (i, chunk) in fresh.chunks(4096).enumerate() {
            let new = &after[i * 4096..(i + 1) * 4096];
            assert!(chunk == new || chunk.iter().all(|b| *b == 0));
        }
    }
    assert!(
        outcomes.iter().all(|n| *n > 0),
        "24 seeds show kept, lost and torn writes: {outcomes:?}"
    );
}

/// A buffered FUA write is a plain write and a flush: after it, a power cut
/// keeps it and everything written before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_fua_write_is_durable_with_everything_before_it() {
    for seed in 0..8u64 {
        let dir = temp_dir();
        let mut cfg = config(&dir, "f.img", 4 * MIB, EngineChoice::Auto);
        cfg.volatile_for_tests = true;
        let store = open(&cfg);
        let earlier = pattern(5, BLOCK);
        let fua = pattern(6, BLOCK);
        store.write(0, earlier.clone(), false).await.unwrap();
        store.write(MIB, fua.clone(), true).await.unwrap();
        let report = store.power_cut(seed).unwrap();
        assert_eq!(report.kept + report.dropped + report.torn, 0, "{report:?}");
        drop(store);
        let bytes = std::fs::read(dir.path().join("f.img")).unwrap();
        let m = MIB as usize;
        assert_eq!(&bytes[..BLOCK], &earlier[..]);
        assert_eq!(&bytes[m..m + BLOCK], &fua[..]);
    }
}

/// A merged (vectored) write is recorded like a plain write: a power cut keeps,
/// loses or tears it, each 4 KiB piece old or new on its own, and a flush before
/// the cut makes it all durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_keeps_or_loses_each_piece_of_a_merged_write() {
    use std::sync::Arc;
    let mut mixed = false;
    for seed in 0..24u64 {
        let dir = temp_dir();
        let mut cfg = config(&dir, "v.img", 4 * MIB, EngineChoice::Auto);
        cfg.volatile_for_tests = true;
        let store = open(&cfg);
        let pieces: Vec<Arc<pairbd_store::AlignedBuf>> =
            (0..8).map(|i| Arc::new(pattern(10 + i, 4096))).collect();
        store
            .write_vectored_shared(MIB, pieces.clone())
            .await
            .unwrap();
        // A merged write flushed before the cut always survives.
        store
            .write_vectored_shared(2 * MIB, pieces.clone())
            .await
            .unwrap();
        if seed % 2 == 0 {
            store.flush().await.unwrap();
        }
        let report = store.power_cut(seed).unwrap();
        assert!(report.kept + report.dropped + report.torn <= 2);
        drop(store);
        let bytes = std::fs::read(dir.path().join("v.img")).unwrap();
        let mut news = 0;
        for (i, p) in pieces.iter().enumerate() {
            let at = MIB as usize + i * 4096;
            let chunk = &bytes[at..at + 4096];
            assert!(
                chunk == &p[..] || chunk.iter().all(|b| *b == 0),
                "piece {i}"
            );
            news += usize::from(chunk == &p[..]);
            if seed % 2 == 0 {
                assert_eq!(chunk, &p[..], "a flushed piece {i} was lost");
                let at2 = 2 * MIB as usize + i * 4096;
                assert_eq!(&bytes[at2..at2 + 4096], &p[..]);
            }
        }
        mixed |= news > 0 && news < pieces.len();
    }
    assert!(
        mixed,
        "no power cut tore a merged write into old and new pieces"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_store_has_no_power_cut() {
    let dir = temp_dir();
    let store = open(&config(&dir, "o.img", MIB, EngineChoice::Auto));
    assert!(store.power_cut(1).is_err());
}
