//! Store configuration: which file, which engine, and the limits.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Which I/O engine to run, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it (a ring can be set up and a probe op
    /// completes), otherwise the thread pool.
    #[default]
    Auto,
    /// io_uring, or fail to open.
    Uring,
    /// The thread pool, even where io_uring works.
    Pool,
}

impl EngineChoice {
    /// The configuration spelling: `auto`, `uring` or `pool`.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Uring => "uring",
            EngineChoice::Pool => "pool",
        }
    }
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an [`EngineChoice`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown store engine {0:?}: expected \"auto\", \"uring\" or \"pool\"")]
pub struct ParseEngineChoiceError(pub String);

impl FromStr for EngineChoice {
    type Err = ParseEngineChoiceError;

    fn from_str(text: &str) -> Result<EngineChoice, ParseEngineChoiceError> {
        match text {
            "auto" => Ok(EngineChoice::Auto),
            "uring" | "io_uring" => Ok(EngineChoice::Uring),
            "pool" | "thread-pool" => Ok(EngineChoice::Pool),
            other => Err(ParseEngineChoiceError(other.to_owned())),
        }
    }
}

/// The engine a store actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// One io_uring on a dedicated ring thread.
    Uring,
    /// A pool of threads doing preadv2/pwritev2/fdatasync/fallocate.
    Pool,
}

impl EngineKind {
    /// The name used in logs and status output: `io_uring` or `thread-pool`.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Pool => "thread-pool",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default largest buffered plain write done on the caller's thread (and whether the
/// flush is: any non-zero value). 1 MiB: measured on the 1 MiB sequential-write bench
/// job, the hand-off to an engine thread cost ~15 % of throughput.
pub const DEFAULT_INLINE_SYNC_MAX_BYTES: usize = 1024 * 1024;
/// Default of `StoreConfig::early_writeback_max_bytes`: Maildir's writes (4–32 KiB)
/// and a little more.
pub const DEFAULT_EARLY_WRITEBACK_MAX_BYTES: usize = 64 * 1024;

/// Default number of io_uring submission queue entries.
pub const DEFAULT_URING_ENTRIES: u32 = 256;
/// Default number of thread-pool threads.
pub const DEFAULT_POOL_THREADS: usize = 8;
/// Default maximum number of operations in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Default number of flushes and FUA writes in flight at once (each needs its own
/// open file description; see the `durability` module).
pub const DEFAULT_MAX_SYNC_IN_FLIGHT: usize = 16;
/// Default maximum length of one read or write: 32 MiB, NBD's customary payload limit.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 << 20;

/// Upper bounds on the configuration values, so that a typo cannot ask for a million
/// threads. They are well above anything useful.
pub(crate) const MAX_URING_ENTRIES: u32 = 32_768;
pub(crate) const MAX_POOL_THREADS: usize = 1024;
pub(crate) const MAX_MAX_IN_FLIGHT: usize = 65_536;
pub(crate) const MAX_MAX_REQUEST_BYTES: usize = 1 << 30;
pub(crate) const MAX_MAX_SYNC_IN_FLIGHT: usize = 256;

/// How to open a backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// A regular file or a block device.
    pub path: PathBuf,
    /// Create a regular file of this size when `path` does not exist; when it exists,
    /// its size must equal this. `None`: the path must exist, and its size is used.
    pub create_size_bytes: Option<u64>,
    /// Open O_RDONLY; writes, discards and zeroing fail with `StoreError::ReadOnly`.
    pub read_only: bool,
    /// Open with O_DIRECT. Requests must then be aligned to `Store::io_alignment()`.
    /// This bypasses the page cache; it is not durability (flush/FUA still decide that).
    pub direct_io: bool,
    /// With buffered I/O (`direct_io` off): read through a separate O_DIRECT
    /// description where a read's offset and length are aligned for it, so reads go to
    /// the disk without the page cache (a block device's readers keep their own
    /// cache), while writes stay buffered and group-committed. The kernel writes dirty
    /// cached pages of the range back before an O_DIRECT read, so a read still returns
    /// every completed write. Where the filesystem has no O_DIRECT, or for an
    /// unaligned read, reads stay buffered.
    pub direct_reads: bool,
    /// Whether those O_DIRECT reads are submitted with Linux native AIO on the
    /// caller's thread and reaped by the caller's tokio reactor (one thread wake-up
    /// per read) instead of going through the engine (see `aio`). Needs a tokio
    /// runtime at open; without one, or where the kernel refuses, reads use the
    /// engine. A read AIO cannot start without blocking goes to the engine too.
    pub aio_reads: bool,
    /// Which engine to run.
    pub engine: EngineChoice,
    /// io_uring submission queue entries (the completion queue is twice as large).
    pub uring_entries: u32,
    /// Threads of the thread-pool engine.
    pub pool_threads: usize,
    /// Operations in flight at most; callers beyond it wait asynchronously.
    pub max_in_flight: usize,
    /// Longest single read or write, in bytes (discard and zeroing are not limited).
    pub max_request_bytes: usize,
    /// Flushes and FUA writes in flight at most (each holds one extra open file
    /// description of the store); more wait asynchronously.
    pub max_sync_in_flight: usize,
    /// Try buffered reads and plain writes on the caller's thread with RWF_NOWAIT
    /// first (page-cache hits then skip the engine); off, every request goes to the
    /// engine. Ignored with O_DIRECT.
    pub inline_nowait: bool,
    /// Buffered plain writes up to this many bytes, and the group-commit fdatasync, run
    /// on the caller's thread instead of an engine thread (0: never). A small buffered
    /// write is a copy into the page cache, and group commit runs one fdatasync at a
    /// time; handing either to another thread and back costs more than doing it (two
    /// wake-ups of a sleeping CPU, tens of microseconds on a small VM). Ignored with
    /// O_DIRECT.
    pub inline_sync_max_bytes: usize,
    /// Buffered writes up to this many bytes start their own writeback as soon as
    /// they are in the page cache (sync_file_range(SYNC_FILE_RANGE_WRITE), not
    /// waited for), so the FLUSH that follows a mail server's small writes waits
    /// mostly for the journal and the disk cache, as with O_DIRECT writes, instead
    /// of writing the pages back first (0: never). Larger writes are left to the
    /// kernel's writeback, which batches them better (measured: starting 1 MiB
    /// sequential writes early cost a quarter of their throughput). Durability is
    /// unchanged: only a flush or FUA promises anything. Ignored with O_DIRECT.
    pub early_writeback_max_bytes: usize,
    /// With the io_uring engine and buffered I/O, send reads that miss the page cache
    /// to `pool_threads` blocking threads instead of the ring. io_uring cannot read a
    /// missing page without blocking either: it punts the read to its own worker
    /// threads (io-wq), and going through the ring thread as well costs two more
    /// thread hand-offs per read (measured: 4 KiB cold random reads at queue depth 32,
    /// 30–44k IOPS through the ring, 46–60k through the pool, on 2 cores).
    pub buffered_reads_on_pool: bool,
    /// Serve only the first this-many bytes of the backing store (the rest holds
    /// pairbd's internal metadata, which requests must never reach). `None`: all.
    pub data_size_bytes: Option<u64>,
    /// Tests only: remember unflushed changes so that `Store::power_cut` can
    /// lose them as a disk cache would (see `volatile`). Slow: every change
    /// first reads the range it overwrites.
    #[doc(hidden)]
    pub volatile_for_tests: bool,
}

impl StoreConfig {
    /// A configuration with the defaults: must exist, read-write, buffered I/O, automatic
    /// engine choice, 256 ring entries, 8 pool threads, 256 operations in flight,
    /// 32 MiB requests, 16 flushes/FUA writes in flight.
    pub fn new(path: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            create_size_bytes: None,
            read_only: false,
            direct_io: false,
            direct_reads: true,
            aio_reads: true,
            engine: EngineChoice::Auto,
            uring_entries: DEFAULT_URING_ENTRIES,
            pool_threads: DEFAULT_POOL_THREADS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_sync_in_flight: DEFAULT_MAX_SYNC_IN_FLIGHT,
            inline_nowait: true,
            inline_sync_max_bytes: DEFAULT_INLINE_SYNC_MAX_BYTES,
            early_writeback_max_bytes: DEFAULT_EARLY_WRITEBACK_MAX_BYTES,
            buffered_reads_on_pool: true,
            data_size_bytes: None,
            volatile_for_tests: false,
        }
    }

    /// Checks the limits; returns a message naming the bad field.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_URING_ENTRIES).contains(&self.uring_entries) {
            return Err(format!(
                "uring_entries is {}; it must be between 1 and {MAX_URING_ENTRIES}",
                self.uring_entries
            ));
        }
        if !(1..=MAX_POOL_THREADS).contains(&self.pool_threads) {
            return Err(format!(
                "pool_threads is {}; it must be between 1 and {MAX_POOL_THREADS}",
                self.pool_threads
            ));
        }
        if !(1..=MAX_MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(format!(
                "max_in_flight is {}; it must be between 1 and {MAX_MAX_IN_FLIGHT}",
                self.max_in_flight
            ));
        }
        if !(1..=MAX_MAX_REQUEST_BYTES).contains(&self.max_request_bytes) {
            return Err(format!(
                "max_request_bytes is {}; it must be between 1 and {MAX_MAX_REQUEST_BYTES}",
                self.max_request_bytes
            ));
        }
        if !(1..=MAX_MAX_SYNC_IN_FLIGHT).contains(&self.max_sync_in_flight) {
            return Err(format!(
                "max_sync_in_flight is {}; it must be between 1 and {MAX_MAX_SYNC_IN_FLIGHT}",
                self.max_sync_in_flight
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_choice_parses_and_displays() {
        for choice in [EngineChoice::Auto, EngineChoice::Uring, EngineChoice::Pool] {
            assert_eq!(choice.to_string().parse::<EngineChoice>(), Ok(choice));
        }
        assert_eq!("io_uring".parse::<EngineChoice>(), Ok(EngineChoice::Uring));
        let err = "fast".parse::<EngineChoice>().unwrap_err();
        assert!(err.to_string().contains("\"fast\""), "{err}");
    }

    #[test]
    fn engine_kind_displays() {
        assert_eq!(EngineKind::Uring.to_string(), "io_uring");
        assert_eq!(EngineKind::Pool.to_string(), "thread-pool");
    }

    #[test]
    fn defaults_are_valid_and_limits_checked() {
        let cfg = StoreConfig::new("/dev/null");
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.max_in_flight, 256);
        assert_eq!(cfg.pool_threads, 8);
        let bad = StoreConfig {
            max_in_flight: 0,
            ..cfg.clone()
        };
        assert!(bad.validate().unwrap_err().contains("max_in_flight"));
        let bad = StoreConfig {
            pool_threads: 0,
            ..cfg
        };
        assert!(bad.validate().unwrap_err().contains("pool_threads"));
    }
}
