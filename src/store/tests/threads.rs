//! Closing or dropping a store leaves no engine thread behind. Its own test binary with
//! a single test, so that no other test's threads are counted.

mod common;

use common::{config, pattern, temp_dir, MIB};
use pairbd_store::{EngineChoice, Store};

/// Threads of this process whose name marks them as store engine threads.
fn engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("list /proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("pairbd-"))
        .count()
}

/// Engine threads name themselves once running, so a count taken right after open
/// may lag; wait (bounded) until it reaches `expected`.
fn engine_threads_eventually(expected: usize) -> usize {
    for _ in 0..5_000 {
        if engine_threads() == expected {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    engine_threads()
}

#[test]
fn close_and_drop_leave_no_engine_threads() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = temp_dir();
    assert_eq!(engine_threads(), 0);
    for engine in [EngineChoice::Uring, EngineChoice::Pool] {
        let mut cfg = config(&dir, &format!("store-{engine}"), MIB, engine);
        cfg.pool_threads = 3;
        let store = Store::open(&cfg).expect("open");
        let expected = if engine == EngineChoice::Pool { 3 } else { 1 };
        assert_eq!(engine_threads_eventually(expected), expected, "{engine}");
        runtime.block_on(async {
            store.write(0, pattern(1, 4096), true).await.expect("write");
            store.close().await;
        });
        assert_eq!(engine_threads(), 0, "{engine} after close");

        let store = Store::open(&cfg).expect("reopen");
        let clone = store.clone();
        runtime.block_on(async {
            // Leave work queued when the last handle goes away.
            let pending = clone.write(4096, pattern(2, 4096), false);
            drop(store);
            pending.await.expect("write through the last handle");
        });
        drop(clone);
        assert_eq!(engine_threads(), 0, "{engine} after drop");
    }
}
