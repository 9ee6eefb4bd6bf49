//! The daemon side of a restart under live mounts, with real daemons and no guest:
//! `pairbd restart` stops a Primary so that the restarted daemon resumes Primary
//! once its peer agrees (same generation, peer Secondary) — also with the default
//! `after-crash = "secondary"` — and never when the peer was promoted meanwhile
//! (a Primary whose peer is away is not restarted unless forced);
//! a restarted Secondary stays Secondary; a marker that does not match the
//! metadata is ignored. (A crash with `after-crash = "resume-primary"` is in
//! tests/roles.rs; under a live mount in tests/kernel_restart.rs.)

mod common;

use std::process::Command;

use common::pair::{self, PairFiles};
use common::{require_tool, Daemon, TestDir};

const SIZE: u64 = 16 << 20;

/// `pairbd restart` on `node`, then the daemon's exit: code 75.
fn planned_restart(files: &PairFiles, node: &str, daemon: Daemon) {
    let out = files.cli(node, &["restart", "--json"]);
    assert!(
        out.status.success(),
        "pairbd restart: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(answer["ok"], true, "{answer}");
    let status = daemon.stop_after_signal();
    assert_eq!(status.code(), Some(75), "{status}");
}

fn marker(files: &PairFiles, node: &str) -> std::path::PathBuf {
    files.dir.join(format!("{node}.ctl.restart"))
}

/// Writes through the Primary's NBD socket (qemu-io), so that the restart has data
/// to keep.
fn write_pattern(files: &PairFiles, node: &str, pattern: u8) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P {pattern} 0 1M"))
        .arg(files.uri(node))
        .output()
        .expect("run qemu-io");
    assert!(out.status.success(), "qemu-io: {out:?}");
}

#[test]
fn a_planned_restart_of_the_primary_resumes_primary_once_the_peer_agrees() {
    require_tool("qemu-io");
    let dir = TestDir::new("restart-planned");
    // The default after-crash policy (secondary): the marker alone allows resuming.
    let files = pair::setup(&dir, SIZE, "");
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    write_pattern(&files, "alpha", 0x5a);
    let generation = files.status("alpha")["generations"].clone();

    planned_restart(&files, "alpha", alpha);
    assert!(marker(&files, "alpha").exists());
    files.wait_for("beta", "the peer gone", |s| s["connection"] != "Connected");
    assert_eq!(files.status("beta")["role"], "Secondary");
    let alpha = files.start("alpha");
    assert!(
        !marker(&files, "alpha").exists(),
        "the marker is consumed at start"
    );
    let (s, waited) = files.wait_for("alpha", "Primary again", |s| {
        s["role"] == "Primary" && s["connection"] == "Connected"
    });
    eprintln!("Primary again {:.2}s after the start", waited.as_secs_f64());
    assert_eq!(s["disk"], "UpToDate", "{s}");
    assert_eq!(files.status("beta")["role"], "Secondary");
    assert!(
        alpha.log_text().contains("planned restart"),
        "{}",
        alpha.log_text()
    );
    eprintln!(
        "generations before {generation}, after {}",
        s["generations"]
    );
    // It serves again, and the pair stays in sync.
    write_pattern(&files, "alpha", 0xa5);
    files.wait_in_sync();

    // A restart of the Secondary leaves no marker and it comes back Secondary.
    planned_restart(&files, "beta", beta);
    assert!(!marker(&files, "beta").exists());
    let beta = files.start("beta");
    files.wait_in_sync();
    assert_eq!(files.status("beta")["role"], "Secondary");
    assert_eq!(files.status("alpha")["role"], "Primary");
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
    files.assert_data_equal();
}

#[test]
fn a_restarted_primary_stays_secondary_when_the_peer_was_promoted_meanwhile() {
    require_tool("qemu-io");
    let dir = TestDir::new("restart-peer-promoted");
    let files = pair::setup(&dir, SIZE, "after-crash = \"resume-primary\"\n");
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    write_pattern(&files, "alpha", 0x11);

    // A Primary whose peer is away could not resume: refused unless forced.
    let beta = {
        assert!(beta.stop().success());
        files.wait_for("alpha", "the peer gone", |s| s["connection"] != "Connected");
        let out = files.cli("alpha", &["restart"]);
        assert!(!out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--force"), "{text}");
        assert_eq!(files.status("alpha")["role"], "Primary");
        let beta = files.start("beta");
        files.wait_in_sync();
        beta
    };

    planned_restart(&files, "alpha", alpha);
    files.wait_for("beta", "the peer gone", |s| s["connection"] != "Connected");
    // The operator (or Pacemaker) fails over while alpha is down, and beta writes.
    files.promote("beta", false);
    write_pattern(&files, "beta", 0x22);

    let alpha = files.start("alpha");
    // alpha learns that beta moved on: it stays Secondary and is synced from beta.
    files.wait_in_sync();
    let a = files.status("alpha");
    let b = files.status("beta");
    assert_eq!(a["role"], "Secondary", "{a}");
    assert_eq!(b["role"], "Primary", "{b}");
    assert_eq!(a["connection"], "Connected", "no split brain: {a}");
    assert!(!marker(&files, "alpha").exists());

    // A SIGKILL of the (new) Primary beta with resume-primary while alpha is away:
    // beta never resumes without its peer; alpha, promoted meanwhile, keeps the
    // role, and beta returns Secondary.
    beta.kill();
    files.wait_for("alpha", "the peer gone", |s| s["connection"] != "Connected");
    files.promote("alpha", false);
    let beta = files.start("beta");
    files.wait_in_sync();
    assert_eq!(files.status("beta")["role"], "Secondary");
    assert_eq!(files.status("alpha")["role"], "Primary");
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
    files.assert_data_equal();
}

#[test]
fn a_restart_marker_that_does_not_match_the_metadata_is_ignored() {
    let dir = TestDir::new("restart-stale-marker");
    let files = pair::setup(&dir, SIZE, "");
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    planned_restart(&files, "alpha", alpha);
    // A marker naming another generation (left from an older restart, or copied).
    std::fs::write(
        marker(&files, "alpha"),
        "{\"resource\": \"mail\", \"node\": \"alpha\", \"generation\": \"0000000000000001\"}\n",
    )
    .unwrap();
    let alpha = files.start("alpha");
    assert!(!marker(&files, "alpha").exists());
    files.wait_for("alpha", "connected", |s| s["connection"] == "Connected");
    // The default policy applies: it waits, Secondary, for an operator.
    let a = files.status("alpha");
    assert_eq!(a["role"], "Secondary", "{a}");
    assert!(
        alpha.log_text().contains("does not match"),
        "{}",
        alpha.log_text()
    );
    drop(beta);
    drop(alpha);
}
