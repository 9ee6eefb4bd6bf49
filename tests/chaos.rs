//! A Jepsen-style run against two real daemons: two independent clients (ours
//! over a raw NBD socket, and python3-libnbd) write numbered blocks and log
//! every operation with its invoke and complete times, while a seeded chaos
//! proxy between the daemons drops, duplicates, reorders and delays datagrams,
//! partitions the link (both ways, then one way), a secondary is paused with
//! SIGSTOP, and the primary is killed and the operator fails over. Then the
//! history is checked per block against what the final primary holds (every
//! acknowledged write, or a later one), the pair must end in sync, and the two
//! data areas equal. It prints its figures: operations, faults, failovers,
//! lost acknowledged writes (0).

mod common;
#[path = "common/raw_client.rs"]
mod raw_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::chaos::{ChaosProxy, Faults};
use common::pair::{self, PairFiles, WAIT_LIMIT};
use common::{require_tool, Daemon, TestDir};
use raw_client::RawClient;

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;
/// Blocks [0, 128) belong to our client, [128, 256) to python3-libnbd's.
const OURS: u64 = 128;
const THEIRS: u64 = 128;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;

/// One write in a client's history, in issue order per block.
#[derive(Debug, Clone, Copy)]
struct Op {
    value: u64,
    /// Some(true): acknowledged; None: no answer (indeterminate).
    ok: Option<bool>,
    /// When the request was sent and its reply read, in seconds since the
    /// run began (complete: none for an indeterminate one).
    invoke: f64,
    complete: Option<f64>,
}

fn block_bytes(block: u64, value: u64) -> Vec<u8> {
    let mut b = vec![(value % 251) as u8 + 1; BLOCK];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&value.to_le_bytes());
    b
}

fn decode(block: u64, bytes: &[u8]) -> u64 {
    if bytes.iter().all(|b| *b == 0) {
        return 0;
    }
    let value = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(
        bytes,
        &block_bytes(block, value)[..],
        "block {block} is torn or misplaced"
    );
    value
}

/// The file naming the primary's NBD socket, which both clients read on
/// every reconnect.
fn set_primary(file: &Path, socket: &Path) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, socket.display().to_string()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Our client: QD1 writes to random blocks in [0, OURS), a flush every 8,
/// reconnecting to the current primary whenever the connection breaks.
fn our_client(
    epoch: Instant,
    primary: PathBuf,
    seed: u64,
    history: Arc<Mutex<Vec<Vec<Op>>>>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) {
    let mut rng = seed | 1;
    let mut value = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let socket = PathBuf::from(std::fs::read_to_string(&primary).unwrap());
        let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) else {
            std::thread::sleep(Duration::from_millis(20)); // retry backoff
            continue;
        };
        drop(stream);
        let client = std::panic::catch_unwind(|| RawClient::open(&socket, "mail").0);
        let Ok(mut client) = client else {
            std::thread::sleep(Duration::from_millis(20)); // not Primary yet
            continue;
        };
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = rng % OURS;
            value += 1;
            let i = {
                let mut h = history.lock().unwrap();
                h[block as usize].push(Op {
                    value,
                    ok: None,
                    invoke: epoch.elapsed().as_secs_f64(),
                    complete: None,
                });
                h[block as usize].len() - 1
            };
            let handle = client.next_handle();
            let data = block_bytes(block, value);
            let sent = client.try_send_request(
                0,
                NBD_CMD_WRITE,
                handle,
                block * BLOCK as u64,
                BLOCK as u32,
                &data,
            );
            let reply = sent
                .ok()
                .and_then(|()| client.try_read_reply_header().ok().flatten());
            match reply {
                Some((h, 0)) if h == handle => {
                    let op = &mut history.lock().unwrap()[block as usize][i];
                    op.ok = Some(true);
                    op.complete = Some(epoch.elapsed().as_secs_f64());
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                _ => break, // indeterminate; reconnect
            }
            n += 1;
            if n % 8 == 0 {
                let handle = client.next_handle();
                let ok = client
                    .try_send_request(0, NBD_CMD_FLUSH, handle, 0, 0, &[])
                    .is_ok()
                    && matches!(client.try_read_reply_header(), Ok(Some((_, 0))));
                if !ok {
                    break;
                }
            }
        }
    }
}

/// Reads python3-libnbd's JSON-lines log into per-block histories.
fn their_history(log: &Path) -> (Vec<Vec<Op>>, u64, u64) {
    let mut h = vec![Vec::new(); (OURS + THEIRS) as usize];
    let (mut acked, mut unknown) = (0, 0);
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        let block = v["block"].as_u64().unwrap();
        let ok = v["ok"].as_bool();
        match ok {
            Some(true) => acked += 1,
            _ => unknown += 1,
        }
        h[block as usize].push(Op {
            value: v["value"].as_u64().unwrap(),
            ok: if ok == Some(true) { Some(true) } else { None },
            invoke: v["invoke"].as_f64().unwrap_or(0.0),
            complete: v["complete"].as_f64(),
        });
    }
    (h, acked, unknown)
}

/// Checks one block: what `got` holds must be the last acknowledged write
/// or a later one (acknowledged or not); returns whether it had an ack.
fn check_block(block: u64, got: u64, ops: &[Op]) -> bool {
    let last_ack = ops.iter().rposition(|o| o.ok == Some(true));
    let allowed: Vec<u64> = match last_ack {
        Some(i) => ops[i..].iter().map(|o| o.value).collect(),
        None => std::iter::once(0)
            .chain(ops.iter().map(|o| o.value))
            .collect(),
    };
    assert!(
        allowed.contains(&got),
        "LOST: block {block} holds {got}, allowed {allowed:?}; history {ops:?}"
    );
    last_ack.is_some()
}

struct Cluster {
    files: PairFiles,
    nodes: [Option<Daemon>; 2],
    proxy: ChaosProxy,
}

impl Cluster {
    fn wait(&self, node: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        self.files.wait_for(node, what, pred);
    }
}

fn wait_acked(counter: &AtomicU64, at_least: u64, what: &str) {
    let start = Instant::now();
    while counter.load(Ordering::SeqCst) < at_least {
        assert!(start.elapsed() < WAIT_LIMIT, "clients stalled: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_jepsen_style_run_loses_no_acknowledged_write() {
    require_tool("/usr/bin/python3");
    let seed: u64 = std::env::var("PAIRBD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    eprintln!("chaos seed {seed} (PAIRBD_CHAOS_SEED replays it)");
    let dir = TestDir::new("chaos");
    let files = pair::setup(&dir, SIZE, "");
    let beta_addr: std::net::SocketAddr = files.replication[1].parse().unwrap();
    let proxy = ChaosProxy::start(beta_addr, seed);
    // alpha dials beta through the proxy.
    files.write_config("", &["", &format!("connect = \"{}\"", proxy.addr)]);
    let mut c = Cluster {
        nodes: [Some(files.start("alpha")), Some(files.start("beta"))],
        files,
        proxy,
    };
    c.files.promote("alpha", true);
    c.files.wait_in_sync();

    let primary_file = dir.join("primary");
    let stop_file = dir.join("stop");
    let py_log = dir.join("python-client.log");
    set_primary(&primary_file, &c.files.socket("alpha"));
    let history = Arc::new(Mutex::new(vec![Vec::new(); OURS as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let ours = {
        let (p, h, s, a) = (
            primary_file.clone(),
            Arc::clone(&history),
            Arc::clone(&stop),
            Arc::clone(&acked),
        );
        let epoch = Instant::now();
        std::thread::spawn(move || our_client(epoch, p, seed, h, s, a))
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/chaos_client.py");
    let mut python: Child = Command::new("/usr/bin/python3")
        .arg(&script)
        .args([
            primary_file.display().to_string(),
            stop_file.display().to_string(),
            py_log.display().to_string(),
            OURS.to_string(),
            THEIRS.to_string(),
            seed.to_string(),
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the python3-libnbd client");
    let mut faults = 0u64;
    let mut failovers = 0u64;

    // 1. A bad network: drops, duplicates, reordering, delays, both ways.
    c.proxy.set(Faults {
        drop_pct: 3,
        dup_pct: 5,
        reorder_pct: 5,
        delay_ms: 3,
        cut: false,
    });
    wait_acked(&acked, 150, "under network chaos");
    c.proxy.set(Faults::default());
    c.wait("alpha", "in sync after chaos", |s| {
        s["connection"] == "Connected" && s["peer"]["disk"] == "UpToDate"
    });

    // 2. A partition: the primary carries on alone, then the peer is resynced.
    c.proxy.set(Faults {
        cut: true,
        ..Faults::default()
    });
    faults += 1;
    c.wait("alpha", "the partition noticed", |s| {
        s["connection"] != "Connected"
    });
    let n = acked.load(Ordering::SeqCst);
    wait_acked(&acked, n + 60, "during the partition");
    c.proxy.set(Faults::default());
    c.files.wait_in_sync();

    // 3. A paused secondary (SIGSTOP), dropped by the primary, then resumed.
    let beta_pid = c.nodes[1].as_ref().unwrap().pid();
    common::signal(beta_pid, "STOP");
    faults += 1;
    c.wait("alpha", "the paused peer dropped", |s| {
        s["connection"] != "Connected"
    });
    let n = acked.load(Ordering::SeqCst);
    wait_acked(&acked, n + 40, "with the peer paused");
    common::signal(beta_pid, "CONT");
    c.files.wait_in_sync();

    // 4. A one-way partition (dialer → peer only).
    c.proxy.set_direction(
        0,
        Faults {
            cut: true,
            ..Faults::default()
        },
    );
    faults += 1;
    c.wait("alpha", "the one-way cut noticed", |s| {
        s["connection"] != "Connected"
    });
    c.proxy.set(Faults::default());
    c.files.wait_in_sync();

    // 5. The primary dies under load; the operator fails over to beta.
    let n = acked.load(Ordering::SeqCst);
    wait_acked(&acked, n + 30, "before the kill");
    c.nodes[0].take().unwrap().kill();
    faults += 1;
    c.files.promote("beta", false);
    failovers += 1;
    set_primary(&primary_file, &c.files.socket("beta"));
    let n = acked.load(Ordering::SeqCst);
    wait_acked(&acked, n + 100, "after the failover");
    // The old primary returns and is synced from beta.
    c.nodes[0] = Some(c.files.start("alpha"));
    c.files.wait_in_sync();
    let n = acked.load(Ordering::SeqCst);
    wait_acked(&acked, n + 30, "with the pair whole again");

    // Stop the clients and check every block.
    stop.store(true, Ordering::SeqCst);
    std::fs::write(&stop_file, b"").unwrap();
    ours.join().unwrap();
    assert!(python.wait().unwrap().success(), "the python client failed");
    let ours_h = history.lock().unwrap().clone();
    // Our history beside python3-libnbd's, for inspection after a failure.
    let mut lines = String::new();
    for (block, ops) in ours_h.iter().enumerate() {
        for o in ops {
            lines.push_str(&format!(
                "{{\"op\": \"write\", \"block\": {block}, \"value\": {}, \"invoke\": {}, \"complete\": {}, \"ok\": {}}}\n",
                o.value,
                o.invoke,
                o.complete.map_or("null".into(), |c| c.to_string()),
                o.ok.map_or("null", |_| "true")
            ));
        }
    }
    std::fs::write(dir.join("our-client.log"), lines).unwrap();
    let (theirs_h, py_acked, py_unknown) = their_history(&py_log);
    assert!(py_acked > 0, "python3-libnbd wrote nothing");
    let (mut reader, _) = RawClient::open(&c.files.socket("beta"), "mail");
    let mut checked = 0;
    for block in 0..OURS + THEIRS {
        let got = decode(block, &reader.read_ok(block * BLOCK as u64, BLOCK as u32));
        let ops = if block < OURS {
            &ours_h[block as usize]
        } else {
            &theirs_h[block as usize]
        };
        checked += u64::from(check_block(block, got, ops));
    }
    reader.disconnect();
    c.files.wait_in_sync();
    for d in c.nodes.iter_mut().filter_map(Option::take) {
        assert!(d.stop().success());
    }
    c.files.assert_data_equal();
    let our_ops: usize = ours_h.iter().map(Vec::len).sum();
    let our_acked = ours_h
        .iter()
        .flatten()
        .filter(|o| o.ok == Some(true))
        .count();
    eprintln!(
        "chaos seed {seed}: operations: ours {our_ops} ({our_acked} acknowledged), \
         python3-libnbd {} ({py_acked} acknowledged, {py_unknown} indeterminate); faults: \
         {faults} partitions/pauses/kills plus proxy {}; failovers {failovers}; blocks \
         checked {checked}; lost acknowledged writes 0; data areas equal",
        py_acked + py_unknown,
        c.proxy.stats.summary()
    );
    assert!(c.proxy.stats.faults() > 0, "the proxy injected nothing");
}
