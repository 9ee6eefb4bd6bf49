//! Power cuts of the real daemons' stores. Each daemon runs with
//! PAIRBD_TEST_VOLATILE_STORE: its store keeps an undo log of unflushed
//! changes, and on the control command `power-cut` loses, keeps or tears them
//! by seed and ends the process at once. A client writes numbered blocks
//! (flushing now and then) while the secondary, the primary or both lose
//! power; afterwards a per-block checker reads the survivor through NBD, the
//! lost node is restarted and synced, and both data areas are compared.

mod common;
#[path = "common/raw_client.rs"]
mod raw_client;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::pair::{self, PairFiles};
use common::TestDir;
use raw_client::RawClient;

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;
const BLOCKS: u64 = 256;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;

/// One write the client issued, in issue order per block.
#[derive(Debug, Clone, Copy)]
struct Issued {
    seq: u64,
    acked: bool,
    /// A FLUSH issued after this write's acknowledgement completed.
    flushed: bool,
}

#[derive(Default)]
struct History {
    blocks: Vec<Vec<Issued>>,
    acked: u64,
}

fn block_bytes(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![(seq % 251) as u8 + 1; BLOCK];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

/// The seq a block holds (0: never written), checking it is whole.
fn decode(block: u64, bytes: &[u8]) -> u64 {
    if bytes.iter().all(|b| *b == 0) {
        return 0;
    }
    let b = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(b, block, "block {block} holds another block's data");
    assert_eq!(bytes, &block_bytes(block, seq)[..], "block {block} is torn");
    seq
}

/// Writes random blocks on `socket` until told to stop or the server goes;
/// a FLUSH after every 8 writes.
fn writer(
    socket: std::path::PathBuf,
    seed: u64,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    next_seq: Arc<AtomicU64>,
) {
    let (mut client, _) = RawClient::open(&socket, "mail");
    let mut rng = seed | 1;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let block = rng % BLOCKS;
        let seq = next_seq.fetch_add(1, Ordering::SeqCst);
        history.lock().unwrap().blocks[block as usize].push(Issued {
            seq,
            acked: false,
            flushed: false,
        });
        let handle = client.next_handle();
        let data = block_bytes(block, seq);
        if client
            .try_send_request(
                0,
                NBD_CMD_WRITE,
                handle,
                block * BLOCK as u64,
                BLOCK as u32,
                &data,
            )
            .is_err()
        {
            return;
        }
        match client.try_read_reply_header() {
            Ok(Some((h, 0))) if h == handle => {
                let mut hist = history.lock().unwrap();
                let w = hist.blocks[block as usize].last_mut().unwrap();
                w.acked = true;
                hist.acked += 1;
            }
            _ => return,
        }
        n += 1;
        if n % 8 == 0 {
            // Everything acknowledged so far is covered by this flush.
            let covered: Vec<(usize, usize)> = {
                let hist = history.lock().unwrap();
                hist.blocks
                    .iter()
                    .enumerate()
                    .flat_map(|(b, ws)| {
                        ws.iter()
                            .enumerate()
                            .filter(|(_, w)| w.acked)
                            .map(move |(i, _)| (b, i))
                    })
                    .collect()
            };
            let handle = client.next_handle();
            if client
                .try_send_request(0, NBD_CMD_FLUSH, handle, 0, 0, &[])
                .is_err()
            {
                return;
            }
            match client.try_read_reply_header() {
                Ok(Some((h, 0))) if h == handle => {
                    let mut hist = history.lock().unwrap();
                    for (b, i) in covered {
                        hist.blocks[b][i].flushed = true;
                    }
                }
                _ => return,
            }
        }
    }
}

/// Sends the test-only power-cut command to `node`'s daemon and waits for it
/// to exit.
fn power_cut(files: &PairFiles, node: &str, seed: u64, daemon: common::Daemon) -> String {
    let mut s = UnixStream::connect(files.dir.join(format!("{node}.ctl"))).unwrap();
    writeln!(s, "{{\"command\": \"power-cut\", \"seed\": {seed}}}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"power_cut\":true"), "{node}: {line}");
    // The process ends by itself; reap it.
    let mut daemon = daemon;
    let deadline = std::time::Instant::now() + pair::WAIT_LIMIT;
    while daemon.is_running() {
        assert!(std::time::Instant::now() < deadline, "{node} kept running");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    line
}

/// Checks every block read through `node`'s NBD export against the history.
/// `need_flushed`: only flushed writes are promised (both nodes lost power);
/// otherwise every acknowledged write is (a node that kept power had it).
fn check_blocks(files: &PairFiles, node: &str, history: &History, need_flushed: bool) -> u64 {
    let (mut client, _) = RawClient::open(&files.socket(node), "mail");
    let mut checked = 0;
    for block in 0..BLOCKS {
        let got = decode(block, &client.read_ok(block * BLOCK as u64, BLOCK as u32));
        let ws = &history.blocks[block as usize];
        // The newest write that must have survived, and what may follow it.
        let floor = ws
            .iter()
            .rposition(|w| if need_flushed { w.flushed } else { w.acked });
        let allowed: Vec<u64> = match floor {
            Some(i) => ws[i..].iter().map(|w| w.seq).collect(),
            None => std::iter::once(0).chain(ws.iter().map(|w| w.seq)).collect(),
        };
        assert!(
            allowed.contains(&got),
            "{node}: block {block} holds write {got}; allowed {allowed:?} (history {ws:?})"
        );
        checked += u64::from(floor.is_some());
    }
    client.disconnect();
    checked
}

/// The seeds a test runs: three by default; `PAIRBD_POWER_CUT_SEEDS=N` runs
/// N (the long variant).
fn seeds(base: u64) -> Vec<u64> {
    let n = std::env::var("PAIRBD_POWER_CUT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3u64);
    (0..n).map(|i| base + i * 100 + 1).collect()
}

struct Run {
    _dir: TestDir,
    files: PairFiles,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    next_seq: Arc<AtomicU64>,
}

fn start(name: &str) -> (Run, common::Daemon, common::Daemon) {
    // Every daemon of this test binary simulates a volatile disk cache.
    std::env::set_var("PAIRBD_TEST_VOLATILE_STORE", "1");
    let dir = TestDir::new(name);
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let history = Arc::new(Mutex::new(History {
        blocks: vec![Vec::new(); BLOCKS as usize],
        acked: 0,
    }));
    (
        Run {
            _dir: dir,
            files,
            history,
            stop: Arc::new(AtomicBool::new(false)),
            next_seq: Arc::new(AtomicU64::new(1)),
        },
        a,
        b,
    )
}

impl Run {
    fn spawn_writer(&self, node: &str, seed: u64) -> std::thread::JoinHandle<()> {
        self.stop.store(false, Ordering::SeqCst);
        let socket = self.files.socket(node);
        let (h, s, n) = (
            Arc::clone(&self.history),
            Arc::clone(&self.stop),
            Arc::clone(&self.next_seq),
        );
        std::thread::spawn(move || writer(socket, seed, h, s, n))
    }

    fn wait_acked(&self, at_least: u64) {
        let deadline = std::time::Instant::now() + pair::WAIT_LIMIT;
        while self.history.lock().unwrap().acked < at_least {
            assert!(std::time::Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

#[test]
fn a_power_cut_of_the_secondary_is_repaired_by_the_resync() {
    for seed in seeds(10) {
        let (run, a, b) = start(&format!("pc-secondary-{seed}"));
        let w = run.spawn_writer("alpha", seed);
        run.wait_acked(60 + seed % 97);
        let answer = power_cut(&run.files, "beta", seed, b);
        eprintln!("seed {seed}: beta {answer}");
        // The primary keeps serving alone.
        let acked = run.history.lock().unwrap().acked;
        run.wait_acked(acked + 40);
        run.stop.store(true, Ordering::SeqCst);
        w.join().unwrap();
        let checked = check_blocks(&run.files, "alpha", &run.history.lock().unwrap(), false);
        assert!(checked > 0);
        let b = run.files.start("beta");
        run.files.wait_in_sync();
        assert!(a.stop().success());
        assert!(b.stop().success());
        run.files.assert_data_equal();
    }
}

#[test]
fn a_power_cut_of_the_primary_loses_no_acknowledged_write_on_failover() {
    for seed in seeds(20) {
        let (run, a, b) = start(&format!("pc-primary-{seed}"));
        let w = run.spawn_writer("alpha", seed);
        run.wait_acked(60 + seed % 89);
        let answer = power_cut(&run.files, "alpha", seed, a);
        eprintln!("seed {seed}: alpha {answer}");
        w.join().unwrap();
        run.files.promote("beta", false);
        let checked = check_blocks(&run.files, "beta", &run.history.lock().unwrap(), false);
        assert!(checked > 0);
        // The old primary returns, learns it is behind, and is synced.
        let a = run.files.start("alpha");
        run.files.wait_in_sync();
        assert_eq!(run.files.status("alpha")["role"], "Secondary");
        assert!(a.stop().success());
        assert!(b.stop().success());
        run.files.assert_data_equal();
    }
}

#[test]
fn a_power_cut_of_both_nodes_keeps_every_flushed_write() {
    for seed in seeds(30) {
        let (run, a, b) = start(&format!("pc-both-{seed}"));
        let w = run.spawn_writer("alpha", seed);
        run.wait_acked(60 + seed % 83);
        power_cut(&run.files, "alpha", seed, a);
        power_cut(&run.files, "beta", seed + 1000, b);
        w.join().unwrap();
        let a = run.files.start("alpha");
        let b = run.files.start("beta");
        run.files
            .wait_for("alpha", "connected", |s| s["connection"] == "Connected");
        // Both came back Secondary. Either may be promoted (they are connected
        // and on one generation): alternate, so that both nodes' flushes are
        // checked.
        let survivor = if (seed / 100) % 2 == 0 {
            "alpha"
        } else {
            "beta"
        };
        run.files.promote(survivor, false);
        let checked = check_blocks(&run.files, survivor, &run.history.lock().unwrap(), true);
        eprintln!("seed {seed}: {checked} blocks on {survivor} had a flushed write");
        run.files.wait_in_sync();
        assert!(a.stop().success());
        assert!(b.stop().success());
        run.files.assert_data_equal();
    }
}
