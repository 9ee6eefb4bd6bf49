//! A restart of the Primary's daemon under a live mount, on a real Linux kernel (the
//! qemu guest of tests/common/guest.rs) attached with `pairbd attach` over the
//! kernel's nbd netlink interface.
//!
//! The guest attaches (two connections, a short request timeout so that requests
//! lost with a dead socket are retried soon, a long dead-connection timeout), kills
//! the attach supervisor and attaches again (a new supervisor adopts the device), makes
//! XFS, mounts it and delivers Maildir messages with fsync, printing each
//! acknowledged one. While it delivers (each time while a message is being written
//! and fsynced), the host disturbs the Primary's daemon four times: a planned
//! restart (`pairbd restart`: the daemon finishes in-flight requests, exits with code
//! 75 leaving a restart marker, and is started again), a crash (SIGKILL, then started
//! again, with `after-crash = "resume-primary"`), each time becoming Primary again
//! once its peer agrees; a hang (SIGSTOP until the guest's kernel has timed the
//! requests in flight out and the supervisor reconnects, then SIGKILL and start,
//! as systemd's watchdog would); and a failover (SIGKILL, `pairbd promote` on the
//! other node, the killed one restarted: it stays Secondary). Each time the attach supervisor in
//! the guest hands the kernel new sockets to whichever node is Primary
//! (`NBD_CMD_RECONFIGURE` after `NBD_CMD_LINK_DEAD`).
//!
//! Then: every delivery succeeded (the guest script stops at the first failure),
//! the kernel logged no I/O error, every acknowledged message is in new/ with its
//! checksum, `xfs_repair -n` is clean, and after both daemons stop the two stores'
//! data areas are identical. The host waits on result lines and status, never on
//! sleeps; durations are printed, never asserted.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{
    guest_image, mail_host_config, md5_hex, message_body, message_number, stripped_pairbd, Guest,
    GuestConfig, GuestFile, NODE_ADDRESSES,
};
use common::pair::{self, PairFiles, NODES};
use common::{Daemon, TestDir};

/// The volume: mkfs.xfs refuses less than 300 MB.
const SIZE: u64 = 320 << 20;
/// How long the whole guest run may take (TCG on two shared cores).
const RUN_LIMIT: Duration = Duration::from_secs(900);
/// Messages the guest delivers: enough for the four events with [`ACKS_BETWEEN`]
/// deliveries before, between and after them, with room to spare.
const MESSAGES: u64 = 120;
/// Acknowledged deliveries before the first restart, and between the Primary's
/// return and the next restart (and before the end of the test).
const ACKS_BETWEEN: usize = 12;
/// The request timeout and dead-connection timeout given to `pairbd attach`.
const TIMEOUT_SECONDS: u32 = 10;
/// How long the guest may take to notice a hung daemon (its request timeout, with
/// a wide margin for TCG on shared cores).
const HANG_LIMIT: Duration = Duration::from_secs(180);
const DEAD_TIMEOUT_SECONDS: u32 = 600;

fn script() -> String {
    format!(
        r#". /guest/maildir.sh
pairbd --config /etc/pairbd/pairbd.toml attach mail --timeout {TIMEOUT_SECONDS} \
  --dead-timeout {DEAD_TIMEOUT_SECONDS} >/tmp/attach.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/attach.log >&3; fail "pairbd attach"; }}
say "ATTACHED $(cat /tmp/attach.log)"
dev=/dev/pairbd/mail
# A supervisor that dies is replaced by attaching again: the new one adopts the
# device, and every event below is handled by it.
first=$(cat /sys/block/nbd0/pid)
kill -9 $first
while [ -d /proc/$first ] && ! grep -q '^State:.*[ZX]' /proc/$first/status 2>/dev/null; do
  sleep 1
done
pairbd --config /etc/pairbd/pairbd.toml attach mail --timeout {TIMEOUT_SECONDS} \
  --dead-timeout {DEAD_TIMEOUT_SECONDS} >/tmp/adopt.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/adopt.log >&3; fail "pairbd attach (adopt)"; }}
say "ADOPTED $(cat /tmp/adopt.log)"
mkfs.xfs -f -q $dev || fail "mkfs.xfs"
mount $dev /mnt || fail "mount"
maildir_create /mnt/maildir
say DELIVERING
deliver_range /mnt/maildir 1 {MESSAGES}
say DELIVERED
maildir_report /mnt/maildir
umount /mnt || fail "umount"
repair_check $dev
dmesg | grep -iE "I/O error|Buffer I/O|blk_update_request|critical medium" | sed 's/^/KERNEL-ERROR /' >&3
dmesg | grep -iE "nbd" | sed 's/^/KERNEL-NBD /' >&3
sed 's/^/SUPERVISOR /' /run/pairbd/attach-mail.log >&3
say "SUPERVISORS $(ps | grep -c '[-]-supervise')"
pairbd --config /etc/pairbd/pairbd.toml detach mail >/tmp/detach.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/detach.log >&3; fail "pairbd detach"; }}
say "DONE"
"#
    )
}

fn boot(dir: &TestDir, files: &PairFiles) -> Guest {
    Guest::boot(
        dir.path(),
        GuestConfig {
            name: "restart".to_string(),
            script: script(),
            files: vec![
                GuestFile::new("/usr/local/bin/pairbd", stripped_pairbd(dir.path()), 0o755),
                GuestFile::new("/etc/pairbd/pairbd.toml", mail_host_config(SIZE), 0o644),
            ],
            forwards: NODES
                .iter()
                .zip(NODE_ADDRESSES)
                .map(|(node, address)| (address.to_string(), files.socket(node)))
                .collect::<Vec<(String, PathBuf)>>(),
            cpus: 2,
            memory_mib: 512,
        },
    )
}

/// What the host does to the Primary's daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// `pairbd restart`, then start it again: it resumes Primary.
    Planned,
    /// SIGKILL, then start it again: it resumes Primary (after-crash = resume-primary).
    Crash,
    /// SIGKILL, promote the other node (no --force), start the killed one again: it
    /// returns Secondary, and the guest's supervisor finds the new Primary.
    Failover,
    /// SIGSTOP (a hung daemon with the guest's requests in flight): the guest's
    /// kernel times them out after `--timeout`, marks the sockets dead and queues the
    /// requests again; once the supervisor is seen reconnecting, SIGKILL and start
    /// again (as systemd's watchdog would): it resumes Primary and the requests that
    /// were in flight complete on the new sockets.
    Hang,
}

/// Relays started so far (one per guest connection; see tests/common/guest.rs).
fn relays_started(relay_log: &Path) -> usize {
    std::fs::read_to_string(relay_log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.split(' ').nth(2) == Some("start"))
        .count()
}

/// Does `event` to the Primary (`daemons[primary]`) and waits until the pair has a
/// Primary again with its peer connected. Returns the new Primary's index and how
/// long the pair had none.
fn disturb(
    files: &PairFiles,
    daemons: &mut [Option<Daemon>; 2],
    primary: usize,
    event: Event,
    relay_log: &Path,
) -> (usize, Duration) {
    let started = Instant::now();
    let node = NODES[primary];
    let daemon = daemons[primary].take().expect("the Primary runs");
    match event {
        Event::Planned => {
            let out = files.cli(node, &["restart", "--json"]);
            assert!(
                out.status.success(),
                "pairbd restart: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let status = daemon.stop_after_signal();
            assert_eq!(
                status.code(),
                Some(75),
                "a planned restart exits with 75: {status}"
            );
            assert!(
                files.dir.join(format!("{node}.ctl.restart")).exists(),
                "the planned restart left no marker"
            );
        }
        Event::Crash | Event::Failover => daemon.kill(),
        Event::Hang => {
            let before = relays_started(relay_log);
            common::signal(daemon.pid(), "STOP");
            // The guest's kernel gives up on the stopped daemon after its request
            // timeout; the supervisor's first new connection shows it did.
            let limit = Instant::now() + HANG_LIMIT;
            while relays_started(relay_log) == before {
                assert!(
                    Instant::now() < limit,
                    "the guest never reconnected while the daemon hung"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            daemon.kill();
        }
    }
    let next = if event == Event::Failover {
        let survivor = 1 - primary;
        files.wait_for(NODES[survivor], "the peer gone", |s| {
            s["connection"] != "Connected"
        });
        files.promote(NODES[survivor], false);
        survivor
    } else {
        primary
    };
    daemons[primary] = Some(files.start(node));
    files.wait_for(NODES[next], "Primary with its peer", |s| {
        s["role"] == "Primary" && s["connection"] == "Connected"
    });
    let other = files.status(NODES[1 - next]);
    assert_eq!(other["role"], "Secondary", "{other}");
    (next, started.elapsed())
}

#[test]
fn restarting_the_primary_daemon_under_a_live_mount_fails_no_guest_io() {
    let image = guest_image();
    eprintln!("guest image {}:\n{}", image.dir.display(), image.manifest);
    let dir = TestDir::new("guest-restart");
    let files = pair::setup(&dir, SIZE, "after-crash = \"resume-primary\"\n");
    let mut daemons = [Some(files.start("alpha")), Some(files.start("beta"))];
    files.promote("alpha", true);
    files.wait_in_sync();

    let booted = Instant::now();
    let deadline = booted + RUN_LIMIT;
    let mut guest = boot(&dir, &files);
    let mut plan = vec![Event::Planned, Event::Crash, Event::Hang, Event::Failover].into_iter();
    let mut primary = 0;
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut last_ack: Option<Instant> = None;
    // Acknowledgements counted since the last event, once deliveries began.
    let mut acks_at_last_event = None;
    let mut events = Vec::new();
    while let Some(line) = guest.next_line(deadline) {
        if line.starts_with("FAIL") {
            panic!("the guest failed: {line}\n{}", guest.report());
        }
        if line == "DELIVERING" {
            acks_at_last_event = Some(0);
        }
        if line == "DELIVERED" {
            break;
        }
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (name, sum) = rest.split_once(' ').expect("ACK NAME MD5");
            acked.insert(name.to_string(), sum.to_string());
            // The longest pause between two acknowledgements after an event is how
            // long the guest's deliveries waited for it.
            if let (Some(previous), Some(event)) = (last_ack, events.last_mut()) {
                let (_, _, _, longest): &mut (Event, usize, Duration, Duration) = event;
                *longest = (*longest).max(previous.elapsed());
            }
            last_ack = Some(Instant::now());
            continue;
        }
        // Events come while a delivery writes and fsyncs its message: I/O in flight.
        if !line.starts_with("STEP ") || !line.ends_with(" write") {
            continue;
        }
        let Some(since) = acks_at_last_event else {
            continue;
        };
        if acked.len() < since + ACKS_BETWEEN {
            continue;
        }
        match plan.next() {
            Some(event) => {
                let at = acked.len();
                let relay_log = guest.relay_log.clone();
                let (next, gone) = disturb(&files, &mut daemons, primary, event, &relay_log);
                eprintln!(
                    "{event:?} of {}'s daemon after {at} acknowledged deliveries: {} Primary \
                     with its peer {:.1}s later",
                    NODES[primary],
                    NODES[next],
                    gone.as_secs_f64()
                );
                primary = next;
                events.push((event, at, gone, Duration::ZERO));
                acks_at_last_event = Some(acked.len());
            }
            None => acks_at_last_event = None,
        }
    }
    assert_eq!(events.len(), 4, "the guest stopped delivering too early");
    let code = guest.wait_for_exit(deadline);
    let transcript = guest.transcript.clone();
    let report = guest.report();
    assert_eq!(code, 0, "the guest script failed\n{report}");
    let lines = |prefix: &'static str| {
        transcript
            .iter()
            .filter_map(move |line| line.strip_prefix(prefix))
    };
    let kernel_errors: Vec<&str> = lines("KERNEL-ERROR ").collect();
    assert!(
        kernel_errors.is_empty(),
        "the guest's kernel logged I/O errors:\n{}\n{report}",
        kernel_errors.join("\n")
    );
    // The hang made the kernel time requests out and queue them again (no error).
    assert!(
        lines("KERNEL-NBD ").any(|l| l.contains("timed out")),
        "the guest's kernel never timed a request out during the hang\n{report}"
    );
    let adopted = lines("ADOPTED ").next().expect("ADOPTED");
    assert!(adopted.contains("re-supervised mail"), "{adopted}");
    assert_eq!(
        lines("SUPERVISORS ").next(),
        Some("1"),
        "one supervisor before the detach\n{report}"
    );
    let supervisor: Vec<&str> = lines("SUPERVISOR ").collect();
    eprintln!("attach supervisor's log:\n{}", supervisor.join("\n"));
    eprintln!(
        "guest kernel's nbd lines:\n{}",
        lines("KERNEL-NBD ").collect::<Vec<_>>().join("\n")
    );
    let reconfigured = supervisor
        .iter()
        .filter(|l| l.contains("reconfigured"))
        .count();
    assert!(
        reconfigured >= events.len(),
        "the supervisor reconfigured the device {reconfigured} times for {} events\n{report}",
        events.len()
    );
    assert!(
        supervisor
            .iter()
            .any(|l| l.contains("reconfigured") && l.contains("to node beta")),
        "after the failover the supervisor should have found beta\n{report}"
    );
    assert_eq!(lines("REPAIR ").collect::<Vec<_>>(), ["0"], "{report}");

    let have: BTreeMap<String, String> = lines("HAVE ")
        .map(|rest| {
            let (name, sum) = rest.split_once(' ').expect("HAVE NAME MD5");
            (name.to_string(), sum.to_string())
        })
        .collect();
    for (name, sum) in &acked {
        let expected = md5_hex(&message_body(message_number(name).expect("N.msg")));
        assert_eq!(sum, &expected, "the guest acknowledged a wrong {name}");
        assert_eq!(
            have.get(name),
            Some(sum),
            "acknowledged message {name} is missing or changed\n{report}"
        );
    }
    assert_eq!(
        have.len(),
        acked.len(),
        "new/ holds unacknowledged messages"
    );
    eprintln!(
        "{} messages delivered and checked across {} events in {:.1}s:",
        acked.len(),
        events.len(),
        booted.elapsed().as_secs_f64()
    );
    for (event, at, gone, longest) in &events {
        eprintln!(
            "  {event:?} at {at} acknowledged: a Primary again after {:.1}s; the longest \
             pause between two acknowledgements after it {:.1}s",
            gone.as_secs_f64(),
            longest.as_secs_f64()
        );
    }

    files.wait_in_sync();
    for daemon in daemons.iter_mut() {
        assert!(daemon.take().expect("daemon").stop().success());
    }
    files.assert_data_equal();
}
