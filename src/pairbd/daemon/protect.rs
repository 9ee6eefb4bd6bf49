//! Protection against the userspace block-device deadlock.
//!
//! The mail host may mount the device this daemon serves on the same machine
//! (or the daemon's own machine may be under memory pressure while the mail
//! host's writeback waits on us). The kernel then reclaims memory by writing
//! back dirty pages — possibly of the very device we serve. If the daemon
//! itself needs memory to make progress (a page fault on its heap, an
//! allocation that enters direct reclaim), it waits on writeback that waits on
//! the daemon: a deadlock. Three measures, as other userspace block servers
//! use them:
//!
//! - `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: the daemon's memory is
//!   never paged out, so serving a request never waits on swap-in.
//! - `prctl(PR_SET_IO_FLUSHER)`: the kernel treats the daemon's threads as
//!   part of the I/O path (no I/O from their own reclaim, no throttling on
//!   the device's dirty limits). Per thread, inherited by threads created
//!   later: it is set before the async runtime starts its workers.
//! - `oom_score_adj = -900`: under memory exhaustion the OOM killer picks
//!   another process first (not -1000: an operator must still be able to kill
//!   a runaway daemon).
//!
//! Each needs privileges (CAP_IPC_LOCK, CAP_SYS_RESOURCE); a daemon without
//! them starts anyway and says which protection is missing.

use tracing::{info, warn};

/// `PR_SET_IO_FLUSHER` from linux/prctl.h (Linux 5.6); the libc crate does
/// not name it.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// The OOM score adjustment the daemon asks for.
pub const OOM_SCORE_ADJ: i32 = -900;

/// Applies every protection it can; logs what it did and what failed.
/// Call before any thread is started.
pub fn apply() {
    let mut done = Vec::new();
    // SAFETY: mlockall takes flags only and changes this process's paging.
    let locked =
        unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if locked == 0 {
        done.push("memory locked");
    } else {
        warn!(
            "mlockall failed ({}): the daemon's memory may be paged out, which can deadlock \
             a device served to this machine; run as root or grant CAP_IPC_LOCK",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: prctl with integer arguments; PR_SET_IO_FLUSHER affects only
    // the calling thread (and threads it creates later).
    let flusher = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if flusher == 0 {
        done.push("I/O flusher");
    } else {
        warn!(
            "PR_SET_IO_FLUSHER failed ({}): memory reclaim may wait on this daemon's own \
             device; run as root or grant CAP_SYS_RESOURCE",
            std::io::Error::last_os_error()
        );
    }
    match std::fs::write("/proc/self/oom_score_adj", OOM_SCORE_ADJ.to_string()) {
        Ok(()) => done.push("OOM score adjusted"),
        Err(e) => warn!("cannot lower the OOM score ({e}): the OOM killer may pick this daemon"),
    }
    if !done.is_empty() {
        info!(
            "protected against the block-device deadlock: {}",
            done.join(", ")
        );
    }
}
