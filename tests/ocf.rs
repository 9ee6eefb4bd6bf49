//! The Pacemaker OCF resource agent (kernel-glue/ocf/pairbd) passes
//! `ocf-tester` (Debian's resource-agents) on one node whose peer is running
//! and in sync; and its monitor action reports the roles and refuses nothing
//! pairbd would refuse. crm_attribute fails without a cluster: the agent only
//! warns.

mod common;

use std::path::Path;
use std::process::Command;

use common::pair::{self, PairFiles};
use common::{pairbd_binary, require_tool, TestDir};

fn agent() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-glue/ocf/pairbd")
}

fn params(files: &PairFiles, state: &Path) -> Vec<(String, String)> {
    vec![
        ("resource".into(), "mail".into()),
        ("config".into(), files.config.display().to_string()),
        ("node".into(), "alpha".into()),
        ("binary".into(), pairbd_binary().into()),
        ("state_dir".into(), state.display().to_string()),
    ]
}

/// Runs one agent action with OCF_RESKEY_* set; returns its exit code.
fn action(files: &PairFiles, state: &Path, name: &str) -> i32 {
    let mut c = Command::new(agent());
    c.arg(name);
    for (k, v) in params(files, state) {
        c.env(format!("OCF_RESKEY_{k}"), v);
    }
    c.env("OCF_ROOT", "/usr/lib/ocf");
    c.status().expect("run the agent").code().unwrap_or(-1)
}

/// A pair in sync, alpha stopped cleanly, beta running Secondary.
fn in_sync_peer(dir: &TestDir) -> (PairFiles, common::Daemon) {
    let files = pair::setup(dir, 16 << 20, "");
    let a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let out = files.cli("alpha", &["demote"]);
    assert!(out.status.success());
    assert!(a.stop().success());
    (files, b)
}

#[test]
fn the_agent_passes_ocf_tester() {
    require_tool("ocf-tester");
    require_tool("xmllint");
    let dir = TestDir::new("ocf-tester");
    let (files, _beta) = in_sync_peer(&dir);
    let state = dir.join("state");
    let mut c = Command::new("ocf-tester");
    c.args(["-v", "-n", "pairbd-mail"]);
    for (k, v) in params(&files, &state) {
        c.arg("-o").arg(format!("{k}={v}"));
    }
    c.arg(agent());
    let out = c.output().expect("run ocf-tester");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ocf-tester failed:\n{text}");
    assert!(text.contains("passed all tests"), "{text}");
    eprintln!("{text}");
    // ocf-tester left the daemon stopped.
    assert_eq!(action(&files, &state, "monitor"), 7, "not running");
}

#[test]
fn monitor_reports_roles_and_promote_never_forces() {
    let dir = TestDir::new("ocf-roles");
    let (files, beta) = in_sync_peer(&dir);
    let state = dir.join("state");
    assert_eq!(action(&files, &state, "monitor"), 7);
    assert_eq!(action(&files, &state, "start"), 0);
    assert_eq!(action(&files, &state, "monitor"), 0, "running, Unpromoted");
    assert_eq!(action(&files, &state, "promote"), 0);
    assert_eq!(action(&files, &state, "monitor"), 8, "running, Promoted");
    assert_eq!(action(&files, &state, "demote"), 0);
    assert_eq!(action(&files, &state, "monitor"), 0);
    assert_eq!(action(&files, &state, "stop"), 0);
    // Alone after a restart, alpha cannot tell whether beta moved on: the
    // agent's promote fails as pairbd refuses (no --force, ever).
    drop(beta);
    assert_eq!(action(&files, &state, "start"), 0);
    assert_eq!(action(&files, &state, "promote"), 1);
    assert_eq!(action(&files, &state, "monitor"), 0, "still Unpromoted");
    assert_eq!(action(&files, &state, "stop"), 0);
}
