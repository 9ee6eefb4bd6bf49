//! Split brain on real daemons, resolved with the dirty bitmaps: each node
//! alone is forced Primary and writes; they meet, both report split brain and
//! stay StandAlone; `pairbd connect --discard-my-data` on the sacrificed node
//! and `pairbd connect` on the survivor roll the victim back by resyncing only
//! the union of both nodes' dirty regions, and the data areas end identical.

mod common;

use std::process::Command;

use common::pair::{self, PairFiles};
use common::{require_tool, run_ok, TestDir};

const SIZE: u64 = 64 << 20;

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

fn bitmap(s: &serde_json::Value, key: &str) -> u64 {
    s["bitmap"][key].as_u64().unwrap_or_else(|| panic!("{s:#}"))
}

#[test]
fn discard_my_data_rolls_the_victim_back_with_the_bitmaps() {
    require_tool("qemu-io");
    let dir = TestDir::new("split-brain-discard");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    // Each node, alone, is forced Primary and writes; both stop cleanly (the
    // bitmap reaches the metadata before Secondary does).
    for (node, cmds) in [
        (
            "alpha",
            ["write -P 0x11 1048576 65536", "write -P 0x12 8M 4096"],
        ),
        (
            "beta",
            ["write -P 0x22 1048576 65536", "write -P 0x23 20M 8192"],
        ),
    ] {
        let d = files.start(node);
        files.promote(node, true);
        qemu_io(&files, node, &cmds);
        assert!(d.stop().success());
    }
    let a = files.start("alpha");
    let b = files.start("beta");
    for node in ["alpha", "beta"] {
        let (s, _) = files.wait_for(node, "StandAlone", |s| s["connection"] == "StandAlone");
        let why = s["last_disconnect"].as_str().unwrap_or_default();
        assert!(why.contains("split brain"), "{node}: {why}");
    }
    // The victim gives its changes up; the survivor connects.
    let out = files.cli("beta", &["connect", "--discard-my-data", "mail"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = files.cli("alpha", &["connect", "mail"]);
    assert!(out.status.success());
    files.wait_for("alpha", "Connected", |s| s["connection"] == "Connected");
    files.wait_for("beta", "Outdated", |s| s["disk"] == "Outdated");
    files.promote("alpha", false);
    files.wait_in_sync();
    let s = files.status("alpha");
    let resynced = bitmap(&s, "resynced_bytes");
    eprintln!("split brain rolled back: {resynced} bytes resynced of {SIZE}");
    // alpha's 64 KiB + 4 KiB and beta's 64 KiB (the same) + 8 KiB.
    assert_eq!(resynced, 65536 + 4096 + 8192, "{s:#}");
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
    // beta holds alpha's data where both wrote, and its own writes elsewhere
    // are gone.
    let beta = std::fs::read(files.backing("beta")).unwrap();
    assert!(beta[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x11));
    assert!(beta[20 << 20..(20 << 20) + 8192].iter().all(|&x| x == 0));
}
