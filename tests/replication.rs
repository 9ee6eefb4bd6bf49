//! Two real `pairbd daemon` processes replicating over real QUIC on loopback,
//! driven by real NBD clients and the real CLI: the data lands on both stores
//! byte for byte, syncs fill a fresh or returning secondary, wrong
//! certificates and bad frames change nothing, and a killed peer is noticed.

mod common;

use std::process::Command;
use std::time::Instant;

use common::pair::{self, PairFiles};
use common::{require_tool, run_ok, write_random_file, TestDir};

const SIZE: u64 = 64 << 20;

fn nbdcopy_in(files: &PairFiles, node: &str, src: &std::path::Path) {
    run_ok(Command::new("nbdcopy").arg(src).arg(files.uri(node)));
}

fn qemu_io(files: &PairFiles, node: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(files.uri(node));
    let out = run_ok(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io: {text}");
}

fn log_of(files: &PairFiles, node: &str) -> String {
    std::fs::read_to_string(files.dir.join(format!("{node}.log"))).unwrap_or_default()
}

/// Polls a node's log until it contains `needle` (bounded like `wait_for`).
fn wait_for_log(files: &PairFiles, node: &str, needle: &str) {
    let start = Instant::now();
    while !log_of(files, node).contains(needle) {
        assert!(
            start.elapsed() < pair::WAIT_LIMIT,
            "{node}'s log never said {needle:?}:\n{}",
            log_of(files, node)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn writes_on_the_primary_reach_both_stores_byte_for_byte() {
    require_tool("nbdcopy");
    require_tool("qemu-io");
    let dir = TestDir::new("repl-writes");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    // The secondary refuses NBD clients, naming its role.
    let out = Command::new("nbdinfo")
        .arg(files.uri("beta"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the secondary accepted a client");

    let src = dir.join("src.img");
    write_random_file(&src, 48 << 20, 7);
    nbdcopy_in(&files, "alpha", &src);
    qemu_io(
        &files,
        "alpha",
        &[
            "write -f -P 0x5a 1048576 65536",
            "write -z 2097152 131072",
            "discard 4194304 1048576",
            "write -P 0x33 50331648 12288",
            "flush",
        ],
    );
    let st = files.status("alpha");
    assert_eq!(st["peer_sync_needed"], false, "{st}");
    // The FUA write and the FLUSH each asked both stores for a flush (a
    // buffered FUA write is a write plus a group-commit flush), and every
    // flush was served by some fdatasync, never more fdatasyncs than flushes.
    for node in ["alpha", "beta"] {
        let st = files.status(node);
        let requested = st["flushes"]["requested"]
            .as_u64()
            .expect("flushes.requested");
        let fdatasyncs = st["flushes"]["fdatasyncs"]
            .as_u64()
            .expect("flushes.fdatasyncs");
        assert!(requested >= 2, "{node}: {st}");
        assert!((1..=requested).contains(&fdatasyncs), "{node}: {st}");
        // How the store does its I/O, as opened: AIO reads are O_DIRECT reads.
        let store = &st["store"];
        let flag = |k: &str| {
            store[k]
                .as_bool()
                .unwrap_or_else(|| panic!("store.{k}: {st}"))
        };
        assert!(!flag("aio_reads") || flag("direct_reads"), "{node}: {st}");
        assert!(!flag("direct_io"), "{node}: the pair runs buffered: {st}");
        assert!(store["aio_reads_done"].as_u64().is_some(), "{node}: {st}");
    }
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
    // And what the client wrote is what both stores hold.
    let alpha = std::fs::read(files.backing("alpha")).unwrap();
    let source = std::fs::read(&src).unwrap();
    assert!(alpha[8 << 20..48 << 20] == source[8 << 20..48 << 20]);
    assert!(alpha[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x5a));
    assert!(alpha[2 << 20..(2 << 20) + 131072].iter().all(|&x| x == 0));
    assert!(alpha[4 << 20..5 << 20].iter().all(|&x| x == 0));
    assert!(alpha[48 << 20..(48 << 20) + 12288]
        .iter()
        .all(|&x| x == 0x33));
}

#[test]
fn a_written_volume_syncs_fully_and_again_after_the_secondary_was_away() {
    require_tool("nbdcopy");
    let dir = TestDir::new("repl-sync");
    let files = pair::setup(&dir, SIZE, "sync-chunk = \"256KiB\"\n");
    // Alpha alone: forced primary of a fresh pair, written before beta exists.
    let a = files.start("alpha");
    files.promote("alpha", true);
    let src = dir.join("src.img");
    write_random_file(&src, SIZE as usize, 11);
    nbdcopy_in(&files, "alpha", &src);
    let st = files.status("alpha");
    assert_eq!(st["connection"], "Disconnected");
    assert_eq!(st["peer_sync_needed"], true, "{st}");

    let b = files.start("beta");
    files.wait_in_sync();
    assert!(log_of(&files, "beta").contains("full sync finished: this node is UpToDate"));
    assert_eq!(files.status("alpha")["peer_sync_needed"], false);

    // Beta dies; alpha keeps serving alone and remembers the peer needs a sync.
    b.kill();
    files.wait_for("alpha", "the peer gone", |s| {
        s["connection"] == "Disconnected"
    });
    let more = dir.join("more.img");
    write_random_file(&more, 8 << 20, 12);
    run_ok(Command::new("nbdcopy").arg(&more).arg(files.uri("alpha")));
    let (st, _) = files.wait_for("alpha", "peer-sync-needed", |s| {
        s["peer_sync_needed"] == true
    });
    assert!(st["peer"].is_null());

    let b = files.start("beta");
    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
    let alpha = std::fs::read(files.backing("alpha")).unwrap();
    assert!(alpha[..8 << 20] == std::fs::read(&more).unwrap()[..]);
}

#[test]
fn a_peer_with_the_wrong_certificate_is_refused_and_nothing_changes() {
    let dir = TestDir::new("repl-wrong-cert");
    let files = pair::setup(&dir, SIZE, "");
    // An impostor beta: same name, its own key; it trusts alpha's real cert.
    run_ok(Command::new(common::pairbd_binary()).args([
        "gen-cert",
        "--node",
        "beta",
        "--out",
        &dir.join("impostor").display().to_string(),
    ]));
    let before_a = std::fs::read(files.backing("alpha")).unwrap();
    let before_b = std::fs::read(files.backing("beta")).unwrap();
    let a = files.start("alpha");
    let real = std::fs::read_to_string(&files.config).unwrap();
    let fake = real
        .replace("certs/beta.crt", "impostor/beta.crt")
        .replace("certs/beta.key", "impostor/beta.key");
    std::fs::write(&files.config, fake).unwrap();
    let b = files.start("beta");
    std::fs::write(&files.config, real).unwrap();
    // Alpha dials and refuses the impostor's certificate; the impostor
    // refuses nothing it has not seen, and gets no connection either.
    wait_for_log(&files, "alpha", "cannot connect to the peer");
    wait_for_log(&files, "beta", "refused a replication connection");
    assert_eq!(files.status("alpha")["connection"], "Disconnected");
    assert_eq!(files.status("beta")["connection"], "Disconnected");
    assert!(a.stop().success());
    assert!(b.stop().success());
    assert!(std::fs::read(files.backing("alpha")).unwrap() == before_a);
    assert!(std::fs::read(files.backing("beta")).unwrap() == before_b);
}

/// The main lane of `link`, with its bulk lane kept open beside it: a closed bulk
/// lane would race the main lane's error to the peer's log.
fn main_lane(
    link: pairbd_link::Link,
) -> (
    pairbd_link::FrameSender,
    pairbd_link::FrameReceiver,
    (pairbd_link::FrameSender, pairbd_link::FrameReceiver),
) {
    let lanes = link.split_lanes();
    (lanes.main_tx, lanes.main_rx, (lanes.bulk_tx, lanes.bulk_rx))
}

#[test]
fn garbage_and_bad_frames_on_the_replication_port_change_nothing() {
    use pairbd_link::{Endpoint, Identity, LinkConfig};
    let dir = TestDir::new("repl-garbage");
    let files = pair::setup(&dir, SIZE, "");
    let before = std::fs::read(files.backing("beta")).unwrap();
    let b = files.start("beta");
    let beta_addr: std::net::SocketAddr = files.replication[1].parse().unwrap();
    // Plain UDP garbage, small and large.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in [1usize, 17, 1200, 1500, 60000] {
        let junk: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
        udp.send_to(&junk, beta_addr).unwrap();
    }
    // Authenticated as alpha, but sending bad frames.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let certs = dir.join("certs");
        let identity = Identity::load(&certs.join("alpha.crt"), &certs.join("alpha.key")).unwrap();
        let peer_cert = pairbd_link::load_certificate(&certs.join("beta.crt")).unwrap();
        let endpoint = Endpoint::bind(LinkConfig {
            identity,
            peer_cert,
            bind: "127.0.0.1:0".parse().unwrap(),
            ping_timeout: std::time::Duration::from_secs(1),
        })
        .unwrap();
        // 1: garbage bytes.
        let link = endpoint.connect(beta_addr).await.unwrap();
        let (mut tx, mut rx, _bulk) = main_lane(link);
        tx.send_raw(&[0xEE; 200]).await.unwrap();
        // Beta's hello and dirty ranges may come first; then the close.
        let mut closed = false;
        for _ in 0..3 {
            if rx.recv(|n| vec![0u8; n]).await.is_err() {
                closed = true;
                break;
            }
        }
        assert!(closed, "the garbage closed the connection");
        // 2: a well-formed header announcing a payload far over the limit.
        let link = endpoint.connect(beta_addr).await.unwrap();
        let (mut tx, mut rx, _bulk) = main_lane(link);
        let mut head =
            pairbd_repl_proto::encode_frame::<Vec<u8>>(&pairbd_repl_proto::Message::Flush {
                seq: 1,
            })
            .header;
        head[5] = 3; // a write
        head[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        head[32..40].copy_from_slice(&u64::from(u32::MAX).to_le_bytes());
        let crc = crc32c_of(&head[..40]);
        head[40..44].copy_from_slice(&crc.to_le_bytes());
        tx.send_raw(&head).await.unwrap();
        let mut ended = false;
        for _ in 0..3 {
            if rx.recv(|n| vec![0u8; n]).await.is_err() {
                ended = true;
                break;
            }
        }
        assert!(ended, "beta kept a connection that sent an oversized frame");
        // 3: a peer speaking protocol version 1 (its hello's version byte).
        let link = endpoint.connect(beta_addr).await.unwrap();
        let (mut tx, mut rx, _bulk) = main_lane(link);
        let mut hello =
            pairbd_repl_proto::encode_to_vec::<Vec<u8>>(&pairbd_repl_proto::Message::Flush {
                seq: 1,
            });
        hello[4] = 1;
        let crc = crc32c_of(&hello[..40]);
        hello[40..44].copy_from_slice(&crc.to_le_bytes());
        tx.send_raw(&hello).await.unwrap();
        let mut refused = false;
        for _ in 0..3 {
            if rx.recv(|n| vec![0u8; n]).await.is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "beta kept a connection speaking version 1");
        // 4: a batch of acks over the bound.
        let link = endpoint.connect(beta_addr).await.unwrap();
        let (mut tx, mut rx, _bulk) = main_lane(link);
        let acks = pairbd_repl_proto::Message::<Vec<u8>>::Acks(pairbd_repl_proto::AckBatch {
            seqs: (1..=pairbd_repl_proto::ACKS_MAX as u64 + 1).collect(),
        });
        tx.send_raw(&pairbd_repl_proto::encode_to_vec(&acks))
            .await
            .unwrap();
        let mut dropped = false;
        for _ in 0..3 {
            if rx.recv(|n| vec![0u8; n]).await.is_err() {
                dropped = true;
                break;
            }
        }
        assert!(
            dropped,
            "beta kept a connection that sent 1025 acks in one frame"
        );
        endpoint.close();
    });
    wait_for_log(&files, "beta", "(limit 33554432)");
    wait_for_log(
        &files,
        "beta",
        "unsupported protocol version 1 (this node speaks 3)",
    );
    wait_for_log(&files, "beta", "1025 sequence numbers (limit 1024)");
    assert_eq!(files.status("beta")["disk"], "Inconsistent");
    // The real alpha still connects afterwards.
    let a = files.start("alpha");
    files.wait_for("beta", "connected to the real alpha", |s| {
        s["connection"] == "Connected"
    });
    assert!(a.stop().success());
    assert!(b.stop().success());
    assert!(std::fs::read(files.backing("beta")).unwrap() == before);
}

/// crc32c (Castagnoli), bitwise: the test builds one header by hand.
fn crc32c_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_killed_peer_is_noticed_on_either_side() {
    let dir = TestDir::new("repl-kill");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    // The secondary dies.
    let killed = Instant::now();
    b.kill();
    let (_, took) = files.wait_for("alpha", "the lost secondary", |s| {
        s["connection"] == "Disconnected"
    });
    eprintln!(
        "primary noticed the killed secondary after {:?} (ping timeout 1s)",
        killed.elapsed().max(took)
    );
    let b = files.start("beta");
    files.wait_in_sync();
    // The primary dies.
    let killed = Instant::now();
    a.kill();
    files.wait_for("beta", "the lost primary", |s| {
        s["connection"] == "Disconnected"
    });
    eprintln!(
        "secondary noticed the killed primary after {:?} (ping timeout 1s)",
        killed.elapsed()
    );
    assert!(b.stop().success());
}

#[test]
fn a_frozen_secondary_is_dropped_and_resynced_when_it_thaws() {
    require_tool("qemu-io");
    let dir = TestDir::new("repl-frozen");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    // SIGSTOP: the peer's socket stays open but nothing answers.
    common::signal(b.pid(), "STOP");
    qemu_io(&files, "alpha", &["write -P 0x77 0 1048576", "flush"]);
    let (st, _) = files.wait_for("alpha", "the frozen peer dropped", |s| {
        s["connection"] == "Disconnected" && s["peer_sync_needed"] == true
    });
    assert!(st["last_disconnect"].is_string(), "{st}");
    common::signal(b.pid(), "CONT");
    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
    let beta = std::fs::read(files.backing("beta")).unwrap();
    assert!(beta[..1 << 20].iter().all(|&x| x == 0x77));
}

#[test]
fn suspend_io_holds_writes_until_resume_io() {
    require_tool("qemu-io");
    let dir = TestDir::new("repl-suspend");
    let files = pair::setup(&dir, SIZE, "on-peer-loss = \"suspend-io\"\n");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    b.kill();
    files.wait_for("alpha", "the peer gone", |s| {
        s["connection"] == "Disconnected"
    });
    let mut writer = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 65536 4096",
            &files.uri("alpha"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (st, _) = files.wait_for("alpha", "a held write", |s| {
        s["io_suspended"] == true && s["requests_in_flight"].as_u64() >= Some(1)
    });
    assert_eq!(st["role"], "Primary");
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the write was answered while suspended"
    );
    let out = files.cli("alpha", &["resume-io"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = writer.wait().unwrap();
    assert!(status.success());
    let st = files.status("alpha");
    assert_eq!(st["io_suspended"], false);
    assert_eq!(st["peer_sync_needed"], true);
    assert!(a.stop().success());
}

/// Frames on the replication link per application write, with batched
/// acknowledgements: fio random 4 KiB writes at queue depth 1 and 32, and
/// sequential 1 MiB writes at depth 4. Before batching every replicated
/// write cost one Ack frame back; the figure shows what it costs now.
/// A figure, not a check: `cargo nextest run --test replication
/// figure_frames_per_write --run-ignored ignored-only --no-capture`.
#[test]
#[ignore = "a figure (fio); run by hand"]
fn figure_frames_per_write() {
    require_tool("fio");
    let dir = TestDir::new("repl-frames");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let frames = |node: &str| files.status(node)["link_frames"].clone();
    let get = |v: &serde_json::Value, k: &str| v[k].as_u64().expect("a counter");
    for (rw, bs, depth, ios) in [
        ("randwrite", "4k", 1u32, 2000u64),
        ("randwrite", "4k", 32, 8000),
        ("write", "1m", 4, 64),
    ] {
        let (a0, b0) = (frames("alpha"), frames("beta"));
        let out = Command::new("fio")
            .args(["--name=frames", "--ioengine=nbd", "--randrepeat=0"])
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={bs}"))
            .arg(format!("--uri={}", files.uri("alpha")))
            .arg(format!("--size={SIZE}"))
            .arg(format!("--iodepth={depth}"))
            .arg(format!("--number_ios={ios}"))
            .output()
            .expect("fio");
        assert!(out.status.success(), "{out:?}");
        let (a1, b1) = (frames("alpha"), frames("beta"));
        let d = |x: &serde_json::Value, y: &serde_json::Value, k: &str| get(y, k) - get(x, k);
        let acks = d(&b0, &b1, "acks_sent");
        let ack_frames = d(&b0, &b1, "ack_frames_sent");
        eprintln!(
            "figure: {rw} {bs} depth {depth}, {ios} writes: primary sent {} frames, secondary \
             sent {} ({ack_frames} ack frames for {acks} acks, {:.2} acks per frame; \
             {:.3} frames back per write)",
            d(&a0, &a1, "sent"),
            d(&b0, &b1, "sent"),
            acks as f64 / ack_frames.max(1) as f64,
            d(&b0, &b1, "sent") as f64 / ios as f64
        );
        assert!(acks >= ios, "{acks} acks for {ios} writes");
        assert_eq!(d(&a0, &a1, "acks_received"), acks);
    }
    assert!(a.stop().success());
    assert!(b.stop().success());
}
