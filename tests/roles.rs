//! Role changes that could lose or fork data are refused by real daemons, with
//! a reason and what would make them succeed: promoting while the peer is
//! Primary, promoting an Inconsistent node, promoting a node restarted
//! without its peer (and --force, which starts a new generation), and a split
//! brain made with forced promotions on both sides, reported by both nodes
//! while no data changes.

mod common;

use std::io::Read;
use std::process::{Command, Output};

use common::pair::{self, PairFiles};
use common::{require_tool, run_ok, TestDir};

const SIZE: u64 = 16 << 20;

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

/// A refused command: non-zero exit, and the `--json` answer's error.
fn refusal(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a refusal, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json answer");
    assert_eq!(v["ok"], false);
    v["error"].as_str().expect("an error text").to_string()
}

/// A digest of a node's data area (FNV-1a over the bytes).
fn data_digest(files: &PairFiles, node: &str) -> u64 {
    let mut f = std::fs::File::open(files.backing(node)).unwrap();
    let mut left = files.size_bytes;
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    while left > 0 {
        let n = f.read(&mut buf[..left.min(1 << 20) as usize]).unwrap();
        assert!(n > 0, "backing file shorter than the data area");
        for &b in &buf[..n] {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        left -= n as u64;
    }
    h
}

#[test]
fn promotion_is_refused_while_the_peer_is_primary() {
    let dir = TestDir::new("roles-peer-primary");
    let files = pair::setup(&dir, SIZE, "");
    let _a = files.start("alpha");
    let _b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let e = refusal(&files.cli("beta", &["promote", "--json"]));
    assert!(e.contains("alpha is Primary"), "{e}");
    assert!(e.contains("demote"), "{e}");
    // Not even --force makes two Primaries.
    let e = refusal(&files.cli("beta", &["promote", "--force", "--json"]));
    assert!(e.contains("Primary"), "{e}");
    assert_eq!(files.status("beta")["role"], "Secondary");
    assert_eq!(files.status("alpha")["role"], "Primary");
}

#[test]
fn an_inconsistent_node_refuses_promotion_until_forced() {
    let dir = TestDir::new("roles-inconsistent");
    let files = pair::setup(&dir, SIZE, "");
    let _a = files.start("alpha");
    let _b = files.start("beta");
    files.wait_for("alpha", "connected", |s| s["connection"] == "Connected");
    let e = refusal(&files.cli("alpha", &["promote", "--json"]));
    assert!(e.contains("Inconsistent"), "{e}");
    assert!(e.contains("--force"), "{e}");
    assert_eq!(files.status("alpha")["role"], "Secondary");
    files.promote("alpha", true);
    files.wait_in_sync();
}

#[test]
fn a_node_restarted_without_its_peer_refuses_promotion_and_force_starts_a_generation() {
    require_tool("qemu-io");
    let dir = TestDir::new("roles-restarted-alone");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let before = files.status("beta")["generations"].clone();
    assert!(a.stop().success());
    assert!(b.stop().success());
    // beta comes back alone: it cannot tell whether alpha moved on.
    let b = files.start("beta");
    let e = refusal(&files.cli("beta", &["promote", "--json"]));
    assert!(e.contains("started without its peer"), "{e}");
    assert!(e.contains("--force"), "{e}");
    assert_eq!(files.status("beta")["role"], "Secondary");
    let out = files.cli("beta", &["promote", "--force", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = files.status("beta")["generations"].clone();
    assert_ne!(after["current"], before["current"], "a new generation");
    assert_eq!(after["bitmap"], before["current"], "it left the old one");
    // alpha returns: it is behind, and syncs from beta.
    qemu_io(&files, "beta", &["write -P 0x77 0 65536", "flush"]);
    let a = files.start("alpha");
    files.wait_in_sync();
    let s = files.status("alpha");
    assert_eq!(s["role"], "Secondary");
    assert_eq!(s["generations"]["current"], after["current"]);
    drop(a);
    drop(b);
    files.assert_data_equal();
}

#[test]
fn split_brain_from_forced_promotions_is_reported_by_both_and_changes_no_data() {
    require_tool("qemu-io");
    let dir = TestDir::new("roles-split-brain");
    let files = pair::setup(&dir, SIZE, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    // Each node, alone, is forced to Primary and takes writes.
    for (node, pattern) in [("alpha", "0x11"), ("beta", "0x22")] {
        let d = files.start(node);
        files.promote(node, true);
        qemu_io(
            &files,
            node,
            &[&format!("write -P {pattern} 1048576 65536"), "flush"],
        );
        assert!(d.stop().success());
    }
    let digests = [data_digest(&files, "alpha"), data_digest(&files, "beta")];
    assert_ne!(digests[0], digests[1]);
    let _a = files.start("alpha");
    let _b = files.start("beta");
    for node in ["alpha", "beta"] {
        let (s, _) = files.wait_for(node, "StandAlone", |s| s["connection"] == "StandAlone");
        let why = s["last_disconnect"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(why.contains("split brain"), "{node}: {why}");
        assert!(why.contains("generations"), "{node}: {why}");
        let out = files.cli(node, &["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("StandAlone"), "{text}");
    }
    // `connect` retries; the verdict is the same, and still nothing moves.
    for node in ["alpha", "beta"] {
        let out = files.cli(node, &["connect", "--json"]);
        assert!(out.status.success());
    }
    for node in ["alpha", "beta"] {
        files.wait_for(node, "StandAlone again", |s| {
            s["connection"] == "StandAlone"
        });
    }
    assert_eq!(data_digest(&files, "alpha"), digests[0]);
    assert_eq!(data_digest(&files, "beta"), digests[1]);
}

#[test]
fn a_secondary_refuses_nbd_clients_naming_its_role() {
    require_tool("nbdinfo");
    let dir = TestDir::new("roles-secondary-refuses");
    let files = pair::setup(&dir, SIZE, "");
    let _a = files.start("alpha");
    let _b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    // libnbd shows the server's error text in its debug output.
    let out = Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(files.uri("beta"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the secondary accepted a client");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Secondary"), "{text}");
    assert!(text.contains("not Primary"), "{text}");
    // The primary serves.
    let out = Command::new("nbdinfo")
        .arg(files.uri("alpha"))
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn after_crash_resume_primary_takes_the_role_back_once_the_peer_agrees() {
    let dir = TestDir::new("roles-resume-primary");
    let files = pair::setup(&dir, SIZE, "after-crash = \"resume-primary\"\n");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    a.kill();
    // beta notices the loss and stays Secondary: nobody promoted it.
    files.wait_for("beta", "the peer lost", |s| s["connection"] != "Connected");
    let _a = files.start("alpha");
    let (s, _) = files.wait_for("alpha", "Primary again", |s| {
        s["role"] == "Primary" && s["peer"]["disk"] == "UpToDate"
    });
    assert_eq!(s["connection"], "Connected");
    files.wait_in_sync();
    drop(b);
}
