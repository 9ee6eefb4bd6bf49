//! The link's two lanes on real daemons over real QUIC: under fio writing
//! 1 MiB blocks on three NBD connections and 4 KiB blocks with a FLUSH every
//! 8 writes on a fourth, the 1 MiB writes travel on the bulk lane (the
//! counters of both nodes agree), the link stays up, nothing is marked for
//! a resync, and both stores hold the same data; with `bulk-lane-bytes = 0`
//! nothing takes the bulk lane and the same holds.

mod common;

use std::process::Command;

use common::pair::{self, PairFiles};
use common::{require_tool, run_ok, TestDir};

const SIZE: u64 = 64 << 20;

/// fio over NBD on the primary: three connections writing 1 MiB blocks
/// sequentially (16 MiB each) at queue depth 8, and one writing 4 KiB
/// blocks at random in the last 16 MiB at queue depth 4, flushing every 8
/// writes.
fn fio_mixed(files: &PairFiles) {
    let out = run_ok(
        Command::new("fio")
            .args([
                "--ioengine=nbd",
                "--direct=1",
                "--randrepeat=0",
                "--group_reporting",
            ])
            .arg(format!("--uri={}", files.uri("alpha")))
            .args([
                "--name=big",
                "--rw=write",
                "--bs=1m",
                "--iodepth=8",
                "--numjobs=3",
                "--size=16m",
                "--offset_increment=16m",
                "--name=small",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=4",
                "--fsync=8",
                "--numjobs=1",
                "--offset=48m",
                "--size=16m",
                "--number_ios=4096",
            ]),
    );
    assert!(out.status.success(), "{out:?}");
}

/// Runs the mixed fio job on a fresh pair with `resource_extra`; returns
/// alpha's and beta's link frame counters afterwards.
fn run_pair(name: &str, resource_extra: &str) -> (serde_json::Value, serde_json::Value) {
    let dir = TestDir::new(name);
    let files = pair::setup(&dir, SIZE, resource_extra);
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let before = files.status("alpha");
    let losses_before = before["link_losses"].as_u64().expect("link_losses");

    fio_mixed(&files);

    let st = files.status("alpha");
    assert_eq!(st["link_losses"].as_u64(), Some(losses_before), "{st}");
    assert_eq!(st["connection"], "Connected", "{st}");
    assert_eq!(st["peer_sync_needed"], false, "{st}");
    assert_eq!(st["bitmap"]["out_of_sync_bytes"], 0, "{st}");
    let frames = (
        st["link_frames"].clone(),
        files.status("beta")["link_frames"].clone(),
    );
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
    let alpha = std::fs::read(files.backing("alpha")).unwrap();
    for mib in 0..48usize {
        let block = &alpha[mib << 20..(mib + 1) << 20];
        assert!(block.iter().any(|&x| x != 0), "MiB {mib} was not written");
    }
    frames
}

#[test]
fn large_writes_take_the_bulk_lane_and_both_stores_agree() {
    require_tool("fio");
    let (alpha, beta) = run_pair("lanes-default", "");
    eprintln!("figure: link frames alpha {alpha} beta {beta}");
    // 48 MiB in 1 MiB writes: 48 bulk frames (the sync at connect is
    // empty, sync chunks never take the bulk lane).
    assert_eq!(alpha["bulk_sent"], 48, "alpha {alpha}");
    assert_eq!(beta["bulk_received"], 48, "beta {beta}");
    assert_eq!(beta["bulk_sent"], 0, "beta sends no writes: {beta}");
}

#[test]
fn with_bulk_lane_bytes_zero_everything_takes_the_main_lane() {
    require_tool("fio");
    let (alpha, beta) = run_pair("lanes-off", "bulk-lane-bytes = 0\n");
    assert_eq!(alpha["bulk_sent"], 0, "alpha {alpha}");
    assert_eq!(beta["bulk_received"], 0, "beta {beta}");
    assert!(
        beta["received"].as_u64().unwrap_or(0) >= 48 + 4096,
        "every write reached beta on the main lane: {beta}"
    );
}
