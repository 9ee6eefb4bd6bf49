//! The in-flight window and the batch delay on real daemons over real QUIC:
//! with a small `max-inflight-bytes`, several fio NBD connections writing
//! 1 MiB and 4 KiB blocks at queue depth 32 complete while the link stays up
//! the whole time (the window applied backpressure instead), and both stores
//! hold the same data; a non-zero `batch-delay` replicates every write too,
//! and the default is no delay.

mod common;

use std::process::Command;

use common::pair::{self, PairFiles};
use common::{require_tool, run_ok, TestDir};

const SIZE: u64 = 64 << 20;

/// fio over NBD on the primary: three connections writing 1 MiB blocks
/// sequentially (16 MiB each) and one writing 4 KiB blocks at random in the
/// last 16 MiB, all at queue depth 32.
fn fio_writes(files: &PairFiles) {
    let out = run_ok(
        Command::new("fio")
            .args([
                "--ioengine=nbd",
                "--direct=1",
                "--randrepeat=0",
                "--group_reporting",
                "--iodepth=32",
            ])
            .arg(format!("--uri={}", files.uri("alpha")))
            .args([
                "--name=seq",
                "--rw=write",
                "--bs=1m",
                "--numjobs=3",
                "--size=16m",
                "--offset_increment=16m",
                "--name=rand",
                "--rw=randwrite",
                "--bs=4k",
                "--numjobs=1",
                "--offset=48m",
                "--size=16m",
                "--number_ios=4096",
            ]),
    );
    assert!(out.status.success(), "{out:?}");
}

fn window_of(files: &PairFiles, node: &str) -> serde_json::Value {
    files.status(node)["window"].clone()
}

#[test]
fn a_small_window_applies_backpressure_and_the_link_stays_up() {
    require_tool("fio");
    let dir = TestDir::new("window-small");
    let files = pair::setup(&dir, SIZE, "max-inflight-bytes = \"256KiB\"\n");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let before = files.status("alpha");
    assert_eq!(
        before["window"]["max_inflight_bytes"],
        256 << 10,
        "{before}"
    );
    let losses_before = before["link_losses"].as_u64().expect("link_losses");

    fio_writes(&files);

    let st = files.status("alpha");
    let w = &st["window"];
    eprintln!("figure: window after fio: {w}");
    // Each 1 MiB write is larger than the window: it went alone, so writes
    // waited for room (deterministic: 96 MiB were written by 4 connections).
    assert!(
        w["writes_waited_total"].as_u64().unwrap_or(0) > 0,
        "the window never bound: {st}"
    );
    assert_eq!(w["inflight_bytes"], 0, "{st}");
    assert_eq!(w["writes_waiting"], 0, "{st}");
    // The link stayed up: no loss, nothing marked for a resync.
    assert_eq!(st["link_losses"].as_u64(), Some(losses_before), "{st}");
    assert_eq!(st["connection"], "Connected", "{st}");
    assert_eq!(st["peer_sync_needed"], false, "{st}");
    assert_eq!(st["bitmap"]["out_of_sync_bytes"], 0, "{st}");
    assert_eq!(window_of(&files, "beta")["inflight_bytes"], 0);
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
    // fio wrote (non-zero) data everywhere it was told to.
    let alpha = std::fs::read(files.backing("alpha")).unwrap();
    for mib in 0..48usize {
        let block = &alpha[mib << 20..(mib + 1) << 20];
        assert!(block.iter().any(|&x| x != 0), "MiB {mib} was not written");
    }
}

#[test]
fn a_batch_delay_replicates_every_write_and_none_is_the_default() {
    require_tool("fio");
    // The default first: no delay.
    let dir = TestDir::new("window-delay-default");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let st = files.status("alpha");
    assert_eq!(st["batch"]["delay_us"], 0, "{st}");
    assert_eq!(st["window"]["max_inflight_bytes"], 16 << 20, "{st}");
    assert!(a.stop().success());

    let dir = TestDir::new("window-delay");
    let files = pair::setup(&dir, SIZE, "batch-delay = \"2ms\"\n");
    let a = files.start("alpha");
    let b = files.start("beta");
    assert_eq!(files.status("alpha")["batch"]["delay_us"], 2000);
    files.promote("alpha", true);
    files.wait_in_sync();
    let losses_before = files.status("alpha")["link_losses"].as_u64();
    fio_writes(&files);
    let st = files.status("alpha");
    assert_eq!(st["link_losses"].as_u64(), losses_before, "{st}");
    assert_eq!(st["peer_sync_needed"], false, "{st}");
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
}
