//! Roles and failover with real processes: two `pairbd daemon`s replicating
//! over QUIC on loopback, XFS on the Primary's NBD export through nbdfuse and
//! a loop device, and Maildir deliveries as a careful MTA makes them.
//!
//! - A failover drill: the Primary is SIGKILLed in the middle of deliveries
//!   (at a point a seeded RNG picks from the count of acknowledged messages),
//!   the survivor is promoted without --force, XFS replays its log there and
//!   passes `xfs_repair -n`, and every acknowledged message is there with the
//!   right content. The killed node comes back Secondary, is Outdated and
//!   synced, and the next round fails over the other way. Set
//!   `PAIRBD_FAILOVER_SEED` to replay a run and `PAIRBD_FAILOVER_ROUNDS` to
//!   change the number of rounds.
//! - A planned switchover and back (unmount, detach, demote, promote).
//! - `demote` refuses while an NBD client is attached and names it;
//!   `demote --force` cuts it off.
//!
//! These tests use FUSE, loop devices and mounts: each takes
//! [`common::exclusive_lock`], and every mount, loop device and process is
//! torn down on drop, also when a test fails.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::pair::{self, PairFiles, NODES};
use common::xfs::{create_maildir, fnv1a64, mail_body, try_deliver, NbdFuse, XfsOnNbd};
use common::{exclusive_lock, require_tool, Daemon, TestDir};

/// The volume: mkfs.xfs refuses less than 300 MB.
const SIZE: u64 = 384 << 20;

/// How long the deliveries may take to reach a count, or to stop, before the
/// test fails (generous: two cores are shared by everything).
const DELIVERY_LIMIT: Duration = Duration::from_secs(120);

// ----- small helpers --------------------------------------------------------

/// xorshift64*: the drill's kill points and message sizes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The message with number `index` of a run with `seed`: 1–8 KiB.
fn mail(seed: u64, index: u32) -> Vec<u8> {
    let mix = splitmix(seed ^ u64::from(index).rotate_left(32));
    let length = 1024 + (mix % (7 * 1024)) as usize;
    mail_body(index, mix, length)
}

fn mail_name(index: u32) -> String {
    format!("{index}.pairbd")
}

fn mail_index(name: &str) -> Option<u32> {
    name.strip_suffix(".pairbd")?.parse().ok()
}

/// An acknowledged message: the MTA told the sender "250 OK" for it.
#[derive(Clone, Debug)]
struct Acked {
    name: String,
    length: usize,
    checksum: u64,
}

fn maildir_of(xfs: &XfsOnNbd) -> PathBuf {
    xfs.mount_dir.join("user")
}

/// Every acknowledged message is in new/ with its length and checksum, and
/// every message in new/ (acknowledged or not) is complete: it was renamed
/// there only after its fsync returned. Returns how many messages that were
/// never acknowledged are there too.
fn check_maildir(maildir: &Path, acked: &[Acked], seed: u64) -> usize {
    let new = maildir.join("new");
    for a in acked {
        let path = new.join(&a.name);
        let content = fs::read(&path)
            .unwrap_or_else(|e| panic!("acknowledged message {} is missing: {e}", path.display()));
        assert_eq!(
            (content.len(), fnv1a64(&content)),
            (a.length, a.checksum),
            "acknowledged message {} has the wrong content",
            a.name
        );
    }
    let names: HashSet<&str> = acked.iter().map(|a| a.name.as_str()).collect();
    let mut extra = 0;
    for entry in fs::read_dir(&new).expect("read new/") {
        let name = entry.expect("a directory entry").file_name();
        let name = name.to_string_lossy();
        if names.contains(name.as_ref()) {
            continue;
        }
        let index = mail_index(&name).unwrap_or_else(|| panic!("a stranger in new/: {name}"));
        let content = fs::read(new.join(name.as_ref())).expect("read a message");
        assert!(
            content == mail(seed, index),
            "unacknowledged message {name} is in new/ but incomplete or corrupt ({} bytes)",
            content.len()
        );
        extra += 1;
    }
    extra
}

fn log_of(files: &PairFiles, node: &str) -> String {
    fs::read_to_string(files.dir.join(format!("{node}.log"))).unwrap_or_default()
}

/// Polls a node's log until `needle` occurs more than `before` times.
fn wait_for_log_count(files: &PairFiles, node: &str, needle: &str, before: usize) {
    let start = Instant::now();
    while log_of(files, node).matches(needle).count() <= before {
        assert!(
            start.elapsed() < pair::WAIT_LIMIT,
            "{node}'s log never said {needle:?} (again):\n{}",
            log_of(files, node)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `pairbd demote [--force] --json` on `node`: (exit success, the answer).
fn demote(files: &PairFiles, node: &str, force: bool) -> (bool, serde_json::Value) {
    let mut args = vec!["demote", "--json"];
    if force {
        args.push("--force");
    }
    let out = files.cli(node, &args);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "demote --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), answer)
}

fn role(files: &PairFiles, node: &str) -> String {
    files.status(node)["role"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

// ----- deliveries in the background ----------------------------------------

enum Event {
    Acked,
    Ended {
        next_index: u32,
        error: Option<String>,
    },
}

/// An MTA delivering messages one after another from a thread, recording
/// each in the shared ledger once its last fsync returned.
struct Deliveries {
    stop: Arc<AtomicBool>,
    events: mpsc::Receiver<Event>,
    thread: Option<JoinHandle<()>>,
    acked: usize,
    ended: Option<(u32, Option<String>)>,
}

impl Deliveries {
    fn start(maildir: PathBuf, first: u32, seed: u64, ledger: Arc<Mutex<Vec<Acked>>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut index = first;
            let error = loop {
                if flag.load(Ordering::SeqCst) {
                    break None;
                }
                let name = mail_name(index);
                let content = mail(seed, index);
                index += 1;
                match try_deliver(&maildir, &name, &content) {
                    Ok(()) => {
                        ledger.lock().unwrap().push(Acked {
                            name,
                            length: content.len(),
                            checksum: fnv1a64(&content),
                        });
                        let _ = tx.send(Event::Acked);
                    }
                    Err(e) => break Some(format!("{name}: {e}")),
                }
            };
            let _ = tx.send(Event::Ended {
                next_index: index,
                error,
            });
        });
        Deliveries {
            stop,
            events,
            thread: Some(thread),
            acked: 0,
            ended: None,
        }
    }

    fn next_event(&mut self, what: &str) {
        match self.events.recv_timeout(DELIVERY_LIMIT) {
            Ok(Event::Acked) => self.acked += 1,
            Ok(Event::Ended { next_index, error }) => self.ended = Some((next_index, error)),
            Err(e) => panic!(
                "the deliveries never {what} ({e}); {} acknowledged",
                self.acked
            ),
        }
    }

    /// Waits until `count` messages of this run were acknowledged.
    fn wait_acked(&mut self, count: usize) {
        while self.acked < count {
            self.next_event("reached their count");
            if let Some((_, error)) = &self.ended {
                panic!(
                    "the deliveries ended after {} acknowledged messages: {error:?}",
                    self.acked
                );
            }
        }
    }

    /// Stops the deliveries and waits for the thread: (the first index not
    /// yet used, the error that ended them if any).
    fn finish(&mut self) -> (u32, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        while self.ended.is_none() {
            self.next_event("stopped");
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the delivery thread panicked");
        }
        self.ended.clone().expect("ended")
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        // Never join here: on a failing test the thread may be blocked on a
        // dead mount until the XfsOnNbd guard (dropped later) tears it down.
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ----- the tests -------------------------------------------------------------

#[test]
fn failover_drill_keeps_every_acknowledged_message() {
    let _lock = exclusive_lock();
    let seed = env_u64("PAIRBD_FAILOVER_SEED").unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        splitmix(now.as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    let rounds = env_u64("PAIRBD_FAILOVER_ROUNDS").unwrap_or(10);
    eprintln!(
        "failover drill: seed {seed} (PAIRBD_FAILOVER_SEED={seed} replays it), {rounds} rounds"
    );
    let mut rng = Rng::new(seed);
    let test_start = Instant::now();

    let dir = TestDir::new("failover-drill");
    let files = pair::setup(&dir, SIZE, "");
    let mut daemons: [Option<Daemon>; 2] = [Some(files.start("alpha")), Some(files.start("beta"))];
    files.promote("alpha", true);
    files.wait_in_sync();
    let mut primary = 0;
    let mut xfs = XfsOnNbd::attach(&dir, &files.uri("alpha"));
    xfs.mkfs();
    xfs.mount();
    create_maildir(&maildir_of(&xfs));

    let ledger: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut next_index = 0;
    for round in 1..=rounds {
        let round_start = Instant::now();
        let (dead, survivor) = (NODES[primary], NODES[1 - primary]);
        let kill_after = rng.range(5, 60) as usize;
        let mut deliveries =
            Deliveries::start(maildir_of(&xfs), next_index, seed, Arc::clone(&ledger));
        deliveries.wait_acked(kill_after);
        // The power cut of the primary, while the MTA is delivering.
        daemons[primary].take().expect("the primary runs").kill();
        let nbdfuse_gone = xfs.fuse.exit_status();
        // nbdfuse may have aborted by itself; either way, its end makes all
        // I/O on the mount fail instead of waiting for the dead server.
        xfs.fuse.kill();
        let (next, error) = deliveries.finish();
        next_index = next;
        xfs.crash_teardown();
        let acked = ledger.lock().unwrap().clone();
        let acked_this_round = deliveries.acked;

        // The survivor stayed up while its primary vanished: no --force.
        files.promote(survivor, false);
        assert_eq!(role(&files, survivor), "Primary");
        let mut fresh = XfsOnNbd::attach(&dir, &files.uri(survivor));
        fresh.mount(); // log recovery
        fresh.unmount();
        fresh.repair_check();
        fresh.mount();
        let unacked_present = check_maildir(&maildir_of(&fresh), &acked, seed);
        xfs = fresh;
        let st = files.status(survivor);
        assert_eq!(st["peer_sync_needed"], true, "{st:#}");

        // The killed node returns: Secondary, behind the new primary,
        // Outdated, then synced.
        let log = log_of(&files, dead);
        let outdated_before = log.matches("this node is Outdated").count();
        let synced_before = log
            .matches("full sync finished: this node is UpToDate")
            .count();
        let restarted = files.start(dead);
        assert!(
            restarted.ready_line.contains("Secondary"),
            "{dead} came back as: {}",
            restarted.ready_line
        );
        assert_eq!(role(&files, dead), "Secondary");
        daemons[primary] = Some(restarted);
        files.wait_in_sync();
        wait_for_log_count(&files, dead, "this node is Outdated", outdated_before);
        wait_for_log_count(
            &files,
            dead,
            "full sync finished: this node is UpToDate",
            synced_before,
        );
        assert_eq!(role(&files, survivor), "Primary");
        assert_eq!(role(&files, dead), "Secondary");
        eprintln!(
            "round {round}: killed {dead} after {kill_after} acknowledged deliveries \
             ({acked_this_round} in all this round, {} total; deliveries ended with {error:?}; \
             nbdfuse {}); {unacked_present} unacknowledged message(s) present; \
             {survivor} promoted without --force; round took {:.1?}",
            acked.len(),
            match nbdfuse_gone {
                Some(status) => format!("had ended by itself: {status}"),
                None => "was killed by the test".to_string(),
            },
            round_start.elapsed()
        );
        primary = 1 - primary;
    }

    let acked = ledger.lock().unwrap().clone();
    check_maildir(&maildir_of(&xfs), &acked, seed);
    xfs.detach();
    files.wait_in_sync();
    for daemon in daemons.iter_mut() {
        assert!(daemon.take().expect("running").stop().success());
    }
    files.assert_data_equal();
    eprintln!(
        "failover drill: {rounds} rounds, {} acknowledged messages, all kept; {:.1?}",
        acked.len(),
        test_start.elapsed()
    );
}

/// Delivers `count` messages from `first` on, sequentially; each is
/// acknowledged once `try_deliver` returned.
fn deliver_all(maildir: &Path, first: u32, count: u32, seed: u64, ledger: &mut Vec<Acked>) {
    for index in first..first + count {
        let name = mail_name(index);
        let content = mail(seed, index);
        try_deliver(maildir, &name, &content).unwrap_or_else(|e| panic!("delivering {name}: {e}"));
        ledger.push(Acked {
            name,
            length: content.len(),
            checksum: fnv1a64(&content),
        });
    }
}

/// A planned switchover from `from` to `to`: the mount is gone, so `demote`
/// needs no --force and `promote` none either.
fn switch_over(files: &PairFiles, from: &str, to: &str) {
    // nbdfuse has exited; the daemon notices its connections close on its
    // own time (bounded), and only then is the node "detached".
    files.wait_for(from, "no client attached", |s| {
        s["clients"].as_array().is_some_and(|c| c.is_empty())
    });
    let (ok, answer) = demote(files, from, false);
    assert!(
        ok,
        "demote {from} refused after its client detached: {answer:#}"
    );
    assert_eq!(role(files, from), "Secondary");
    files.promote(to, false);
    assert_eq!(role(files, to), "Primary");
    let (st, _) = files.wait_for(from, "the peer Primary", |s| {
        s["connection"] == "Connected" && s["peer"]["role"] == "Primary"
    });
    assert_eq!(st["disk"], "UpToDate", "{st:#}");
}

#[test]
fn planned_switchover_and_back_with_deliveries_around_it() {
    let _lock = exclusive_lock();
    const N: u32 = 150;
    let seed = 0x5717_c40e;
    let dir = TestDir::new("failover-switchover");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let mut ledger = Vec::new();

    // On alpha: a file system and N messages.
    let mut xfs = XfsOnNbd::attach(&dir, &files.uri("alpha"));
    xfs.mkfs();
    xfs.mount();
    create_maildir(&maildir_of(&xfs));
    deliver_all(&maildir_of(&xfs), 0, N, seed, &mut ledger);
    xfs.detach();

    // Over to beta: the old messages are there; N more.
    switch_over(&files, "alpha", "beta");
    let mut xfs = XfsOnNbd::attach(&dir, &files.uri("beta"));
    xfs.mount();
    assert_eq!(check_maildir(&maildir_of(&xfs), &ledger, seed), 0);
    deliver_all(&maildir_of(&xfs), N, N, seed, &mut ledger);
    xfs.detach();

    // And back to alpha: everything is there, and the file system is clean.
    switch_over(&files, "beta", "alpha");
    let mut xfs = XfsOnNbd::attach(&dir, &files.uri("alpha"));
    xfs.repair_check();
    xfs.mount();
    assert_eq!(check_maildir(&maildir_of(&xfs), &ledger, seed), 0);
    assert_eq!(
        fs::read_dir(maildir_of(&xfs).join("tmp")).unwrap().count(),
        0
    );
    deliver_all(&maildir_of(&xfs), 2 * N, N, seed, &mut ledger);
    xfs.detach();

    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
}

#[test]
fn demote_is_refused_while_a_client_is_attached_and_force_cuts_it_off() {
    let _lock = exclusive_lock();
    require_tool("nbdinfo");
    const SMALL: u64 = 64 << 20;
    let dir = TestDir::new("failover-demote");
    let files = pair::setup(&dir, SMALL, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();

    let mut fuse = NbdFuse::start(&dir, &files.uri("alpha"));
    let disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fuse.file())
        .expect("open the nbdfuse file");
    let mut block = vec![0u8; 4096];
    disk.read_exact_at(&mut block, 0)
        .expect("read through nbdfuse");
    files.wait_for("alpha", "the client attached", |s| {
        s["clients"].as_array().is_some_and(|c| !c.is_empty())
    });

    // Plain: refused, on stderr, naming the reason.
    let out = files.cli("alpha", &["demote"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "demote with a client attached succeeded"
    );
    assert!(stderr.contains("attached"), "{stderr}");
    // JSON: the error names every attached client by number and address.
    let (ok, answer) = demote(&files, "alpha", false);
    assert!(!ok && answer["ok"] == false, "{answer:#}");
    let error = answer["error"].as_str().expect("an error text");
    assert!(error.contains("attached"), "{error}");
    let clients = answer["status"]["clients"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!clients.is_empty(), "{answer:#}");
    for client in &clients {
        let id = format!("#{}", client["id"]);
        let address = client["address"].as_str().expect("an address");
        assert!(
            error.contains(&id) && error.contains(address),
            "{error} does not name {client}"
        );
    }
    let st = files.status("alpha");
    assert_eq!(st["role"], "Primary", "{st:#}");
    // The client was not disturbed.
    disk.read_exact_at(&mut block, 1 << 20)
        .expect("read through nbdfuse after the refused demote");

    // --force: Secondary, the client cut off.
    let (ok, answer) = demote(&files, "alpha", true);
    assert!(ok, "demote --force refused: {answer:#}");
    assert_eq!(role(&files, "alpha"), "Secondary");
    files.wait_for("alpha", "no client attached", |s| {
        s["clients"].as_array().is_some_and(|c| c.is_empty())
    });
    // A block never read before (so not in the page cache) cannot be read.
    let read = disk.read_exact_at(&mut block, 32 << 20);
    assert!(
        read.is_err() || fuse.has_exited(),
        "nbdfuse still reads after demote --force"
    );
    eprintln!(
        "after demote --force: read {:?}, nbdfuse exit {:?}",
        read.err(),
        fuse.exit_status()
    );
    // And a new client is refused by the Secondary.
    let out = Command::new("nbdinfo")
        .arg(files.uri("alpha"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the demoted node accepted a client");
    drop(disk);
    fuse.kill();
    drop(fuse);

    // The pair is healthy: the peer can take over without --force.
    files.promote("beta", false);
    assert_eq!(role(&files, "beta"), "Primary");
    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
}
