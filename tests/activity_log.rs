//! The activity log on real daemons: a Primary SIGKILLed while writes run
//! comes back with only its logged extents out of sync (not the volume), and
//! the failover's resync copies at most those; a planned `pairbd restart`
//! costs the same activity-log resync. Both data areas end identical. Also
//! prints the figure: metadata writes per random 4 KiB application write.

mod common;

use std::process::{Command, Stdio};

use common::pair::{self, PairFiles};
use common::{require_tool, TestDir};

const SIZE: u64 = 64 << 20;
const EXTENT: u64 = 1 << 20;
const EXTENTS: u64 = 8;

fn config() -> String {
    format!("al-extent-size = \"1MiB\"\nal-extents = {EXTENTS}\n")
}

fn bitmap(s: &serde_json::Value, key: &str) -> u64 {
    s["bitmap"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has bitmap.{key}: {s:#}"))
}

fn meta_writes(files: &PairFiles, node: &str) -> u64 {
    files.status(node)["meta_writes"].as_u64().unwrap_or(0)
}

/// `count` 4 KiB writes at pseudo-random 4 KiB-aligned offsets of the
/// volume, as qemu-io commands.
fn random_writes(count: u64, salt: u64) -> Vec<String> {
    (0..count)
        .map(|k| {
            let page = (k * 7919 + salt * 104_729) % (SIZE / 4096);
            format!("write -P {} {} 4096", (k + salt) % 250 + 1, page * 4096)
        })
        .collect()
}

fn qemu_io(files: &PairFiles, node: &str, cmds: &[String]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(files.uri(node));
    c
}

#[test]
fn a_killed_primary_resyncs_only_its_logged_extents() {
    require_tool("qemu-io");
    let dir = TestDir::new("al-kill");
    let files = pair::setup(&dir, SIZE, &config());
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();

    // The figure: metadata writes per application write, random 4 KiB.
    let before = meta_writes(&files, "alpha");
    let writes = random_writes(256, 1);
    let out = qemu_io(&files, "alpha", &writes).output().expect("qemu-io");
    assert!(out.status.success(), "{out:?}");
    let cost = meta_writes(&files, "alpha") - before;
    eprintln!(
        "figure: {} random 4 KiB writes over {} MiB cost {cost} metadata writes \
         (activity log of {EXTENTS} x {} KiB)",
        writes.len(),
        SIZE >> 20,
        EXTENT >> 10
    );
    assert!(cost <= writes.len() as u64, "at most one per write");

    // Writes running when the Primary is killed: the kill waits until some
    // of them have cost metadata writes.
    let mut writer = qemu_io(&files, "alpha", &random_writes(4000, 2))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let running = meta_writes(&files, "alpha");
    files.wait_for("alpha", "writes running", |s| {
        s["meta_writes"].as_u64().unwrap_or(0) >= running + 4
    });
    alpha.kill();
    let _ = writer.wait();
    files.wait_for("beta", "the peer gone", |s| s["connection"] != "Connected");

    let alpha = files.start("alpha");
    let log = alpha.log_text();
    assert!(log.contains("activity log:"), "{log}");
    files.wait_for("alpha", "connected", |s| s["connection"] == "Connected");
    let dirty = bitmap(&files.status("alpha"), "out_of_sync_bytes");
    eprintln!("after the kill: {dirty} bytes out of sync on alpha (volume {SIZE})");
    assert!(dirty > 0, "writes were running: their extents are marked");
    assert!(dirty <= EXTENTS * EXTENT, "{dirty} > the log's extents");

    // Failover: beta is promoted and resyncs alpha's logged extents.
    let b_before = bitmap(&files.status("beta"), "resynced_bytes");
    files.promote("beta", false);
    files.wait_in_sync();
    let resynced = bitmap(&files.status("beta"), "resynced_bytes") - b_before;
    eprintln!(
        "figure: bytes resynced after a primary SIGKILL: {resynced} (log {} bytes, volume \
         {SIZE})",
        EXTENTS * EXTENT
    );
    assert!(resynced > 0 && resynced <= EXTENTS * EXTENT, "{resynced}");
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
    files.assert_data_equal();
}

#[test]
fn a_planned_restart_costs_only_an_activity_log_resync() {
    require_tool("qemu-io");
    let dir = TestDir::new("al-restart");
    let files = pair::setup(&dir, SIZE, &config());
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let out = qemu_io(&files, "alpha", &random_writes(64, 3))
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "{out:?}");

    let out = files.cli("alpha", &["restart", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(alpha.stop_after_signal().code(), Some(75));
    files.wait_for("beta", "the peer gone", |s| s["connection"] != "Connected");
    let alpha = files.start("alpha");
    files.wait_for("alpha", "Primary again", |s| {
        s["role"] == "Primary" && s["connection"] == "Connected"
    });
    files.wait_in_sync();
    let s = files.status("alpha");
    let resynced = bitmap(&s, "resynced_bytes");
    eprintln!("figure: a planned restart resynced {resynced} bytes (volume {SIZE})");
    assert!(resynced <= EXTENTS * EXTENT, "{resynced}: {s:#}");
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
    files.assert_data_equal();
}

/// The figure for docs: metadata writes per application write with the
/// default log (257 × 4 MiB) on a 4 GiB volume, random 4 KiB writes by fio at
/// queue depth 1 and 32 (prints it; asserts only that the log cost at most
/// one metadata write per application write).
#[test]
#[ignore = "a figure: run with --ignored --nocapture"]
fn figure_metadata_writes_per_random_write() {
    require_tool("fio");
    let size: u64 = 4 << 30;
    let dir = TestDir::new("al-figure");
    let files = pair::setup(&dir, size, "");
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    for depth in [1u32, 32, 1, 32] {
        let ios = 4000u64;
        let before = meta_writes(&files, "alpha");
        let out = Command::new("fio")
            .args([
                "--name=al",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--norandommap",
                "--randrepeat=0",
            ])
            .arg(format!("--uri={}", files.uri("alpha")))
            .arg(format!("--size={size}"))
            .arg(format!("--iodepth={depth}"))
            .arg(format!("--number_ios={ios}"))
            .output()
            .expect("fio");
        assert!(out.status.success(), "{out:?}");
        let cost = meta_writes(&files, "alpha") - before;
        eprintln!(
            "figure: queue depth {depth}: {ios} random 4 KiB writes over {} GiB cost {cost} \
             metadata writes ({:.2} per write; log 257 x 4 MiB)",
            size >> 30,
            cost as f64 / ios as f64
        );
        assert!(cost <= ios + 4, "{cost}");
    }
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
}
