//! The daemon protects itself against the userspace block-device deadlock:
//! its memory is locked, its threads are I/O flushers, its OOM score is low
//! (see src/pairbd/daemon/protect.rs). Read back from /proc of the real
//! process. Where the test runs without a capability (containers often drop
//! CAP_SYS_RESOURCE even for root), the daemon must say so instead.

mod common;

use common::pair;
use common::TestDir;

/// PF_MEMALLOC_NOIO and PF_LOCAL_THROTTLE, which PR_SET_IO_FLUSHER sets.
const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
const PF_LOCAL_THROTTLE: u64 = 0x0010_0000;

fn stat_flags(path: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    // The command name (field 2) may hold spaces; fields after its ')' are
    // fixed: state is field 3, flags field 9.
    let after = &text[text.rfind(')').unwrap() + 2..];
    after.split(' ').nth(6).unwrap().parse().unwrap()
}

/// Whether this process (and so the daemon it starts) holds capability `bit`.
fn have_capability(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << bit) != 0
}

const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_RESOURCE: u32 = 24;

#[test]
fn the_daemon_locks_its_memory_flags_its_threads_and_lowers_its_oom_score() {
    let dir = TestDir::new("protect");
    let files = pair::setup(&dir, 16 << 20, "");
    let d = files.start("alpha");
    let proc = std::path::PathBuf::from(format!("/proc/{}", d.pid()));
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck in /proc/PID/status");
    let log = d.log_text();
    if have_capability(CAP_IPC_LOCK) {
        assert!(locked_kib > 0, "memory not locked:\n{status}");
    } else {
        assert!(log.contains("mlockall failed"), "{log}");
    }
    if !have_capability(CAP_SYS_RESOURCE) {
        assert!(log.contains("PR_SET_IO_FLUSHER failed"), "{log}");
        assert!(log.contains("CAP_SYS_RESOURCE"), "{log}");
        assert!(log.contains("cannot lower the OOM score"), "{log}");
        eprintln!("no CAP_SYS_RESOURCE here: checked the daemon's warnings instead");
        return;
    }
    let adj = std::fs::read_to_string(proc.join("oom_score_adj")).unwrap();
    assert_eq!(adj.trim(), "-900", "{log}");
    // Every thread, the runtime's workers included, is an I/O flusher.
    let mut threads = 0;
    for task in std::fs::read_dir(proc.join("task")).unwrap() {
        let flags = stat_flags(&task.unwrap().path().join("stat"));
        assert_eq!(
            flags & (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE),
            PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE,
            "flags {flags:#x}"
        );
        threads += 1;
    }
    assert!(threads > 1, "the runtime's threads were checked too");
    assert!(log.contains("protected against the block-device deadlock"));
}
