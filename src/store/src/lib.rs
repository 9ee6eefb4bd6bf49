//! pairbd's backing store: a regular file or a block device, read and written through
//! one of two engines behind one interface.
//!
//! - The io_uring engine runs one ring on a dedicated thread (`engine::uring`).
//! - The thread-pool engine runs N threads doing preadv2/pwritev2/fdatasync/fallocate
//!   (`engine::pool`); it is chosen automatically where io_uring is blocked.
//!
//! Durability is the product, and its rules live here, not in the callers:
//! a write with `fua` is durable when it completes; `flush` makes every write that
//! completed before it durable; once a flush or FUA write has failed the store is
//! poisoned and every later flush and FUA write fails until it is reopened (see
//! `durability`). O_DIRECT is a cache choice, never a durability promise.
//!
//! Latency: buffered reads first try an inline `RWF_NOWAIT` read on the caller's
//! thread (a page-cache hit needs no engine); small buffered plain writes and the
//! group-commit fdatasync run on the caller's thread too (`inline_sync_max_bytes`).
//! Aligned reads go around the page cache through an O_DIRECT description, submitted
//! with Linux native AIO on the caller's thread and reaped on the caller's runtime
//! (`aio`); a range the cache holds in full is read from it. Everything else, and
//! everything with O_DIRECT, goes to the engine.
//!
//! Every operation is bounded: at most `max_in_flight` operations run at once and
//! callers beyond that wait asynchronously. The store needs no runtime of its own:
//! opened inside a tokio runtime (with its IO driver), it reaps AIO reads there;
//! opened elsewhere, the engine does all reads.

mod aio;
mod buf;
mod config;
mod durability;
mod engine;
mod error;
mod fault;
mod nowait;
mod open;
mod store;
mod volatile;

pub use buf::{AlignedBuf, BUF_ALIGN_BYTES};
pub use config::{
    EngineChoice, EngineKind, ParseEngineChoiceError, StoreConfig,
    DEFAULT_EARLY_WRITEBACK_MAX_BYTES, DEFAULT_INLINE_SYNC_MAX_BYTES, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_SYNC_IN_FLIGHT, DEFAULT_POOL_THREADS,
    DEFAULT_URING_ENTRIES,
};
pub use engine::MAX_WRITE_PIECES;
pub use error::StoreError;
#[doc(hidden)]
pub use fault::FaultPoint;
pub use nowait::SMALL_WRITE_BYTES;
#[doc(hidden)]
pub use nowait::{cachestat, CacheStat};
pub use store::{Store, ZERO_CHUNK_BYTES};
#[doc(hidden)]
pub use volatile::PowerCutReport;
