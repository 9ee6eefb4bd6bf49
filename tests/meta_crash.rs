//! A crash at every metadata write of the real daemons, in every phase of the
//! write (before it, torn halfway, after its fdatasync), recovers.
//!
//! One scenario — a fresh pair's first promotion and sync, writes, a
//! secondary killed and resynced (a new generation on the primary), a
//! switchover — is run once to count each daemon's metadata writes, then once
//! per crash point with `PAIRBD_TEST_META_CRASH=N:PHASE` on one daemon
//! incarnation. Whatever the crash interrupted, the operator's recovery (restart
//! the dead daemon; if no node is Primary, promote one without --force — or,
//! if the very first promotion was lost, force it as at set-up) must end with
//! both nodes Connected and UpToDate, every acknowledged write present, no
//! split brain, and equal data areas.

mod common;

use std::process::Command;

use common::pair::{self, PairFiles, WAIT_LIMIT};
use common::{Daemon, TestDir};

const SIZE: u64 = 16 << 20;
const MIB: u64 = 1 << 20;

/// One daemon process of the scenario: which node, which start of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incarnation {
    Alpha,
    BetaFirst,
    BetaSecond,
}

#[derive(Debug, Clone, Copy)]
struct Crash {
    at: Incarnation,
    nth: u64,
    phase: &'static str,
}

#[derive(Default, Debug)]
struct Outcome {
    /// Metadata writes each incarnation made (baseline run only).
    writes: [u64; 3],
    /// Whether the crash struck (the daemon died at it).
    struck: bool,
    /// Patterns acknowledged: (offset, byte).
    acked: Vec<(u64, u8)>,
}

fn qemu_io_ok(files: &PairFiles, node: &str, cmds: &[&str]) -> bool {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(files.uri(node));
    match c.output() {
        Ok(out) => out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        Err(_) => false,
    }
}

fn cli_ok(files: &PairFiles, node: &str, args: &[&str]) -> bool {
    files.cli(node, args).status.success()
}

fn status_or_null(files: &PairFiles, node: &str) -> serde_json::Value {
    let out = files.cli(node, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

struct Nodes<'a> {
    files: &'a PairFiles,
    alpha: Option<Daemon>,
    beta: Option<Daemon>,
    crash: Option<Crash>,
    outcome: Outcome,
}

impl Nodes<'_> {
    fn env_for(&self, inc: Incarnation) -> Vec<(&'static str, String)> {
        match self.crash {
            Some(c) if c.at == inc => {
                vec![("PAIRBD_TEST_META_CRASH", format!("{}:{}", c.nth, c.phase))]
            }
            _ => Vec::new(),
        }
    }

    fn start(&mut self, node: &str, inc: Incarnation) {
        let env = self.env_for(inc);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let d = self.files.start_env(node, &env);
        if node == "alpha" {
            self.alpha = Some(d);
        } else {
            self.beta = Some(d);
        }
    }

    /// Whether the crash has struck: the crashing daemon exited by itself.
    fn crashed(&mut self) -> bool {
        if self.outcome.struck {
            return true;
        }
        for d in [&mut self.alpha, &mut self.beta].into_iter().flatten() {
            if !d.is_running() {
                self.outcome.struck = true;
            }
        }
        self.outcome.struck
    }

    /// Polls until `pred` holds on `node`, or the crash strikes (false).
    fn wait(&mut self, node: &str, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
        let start = std::time::Instant::now();
        loop {
            if self.crashed() {
                return false;
            }
            if pred(&status_or_null(self.files, node)) {
                return true;
            }
            assert!(start.elapsed() < WAIT_LIMIT, "{node} never got there");
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
    }

    fn in_sync(&mut self) -> bool {
        for node in ["alpha", "beta"] {
            let ok = self.wait(node, |s| {
                s["connection"] == "Connected"
                    && s["disk"] == "UpToDate"
                    && s["peer"]["disk"] == "UpToDate"
                    && s["sync"].is_null()
            });
            if !ok {
                return false;
            }
        }
        true
    }

    fn write(&mut self, node: &str, offset: u64, byte: u8) {
        if qemu_io_ok(
            self.files,
            node,
            &[&format!("write -P {byte} {offset} 65536"), "flush"],
        ) {
            self.outcome.acked.push((offset, byte));
        }
    }

    fn meta_writes(&self, node: &str) -> u64 {
        status_or_null(self.files, node)["meta_writes"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The scenario; returns at the first sign of the crash.
    fn run(&mut self) {
        self.start("alpha", Incarnation::Alpha);
        self.start("beta", Incarnation::BetaFirst);
        if !cli_ok(self.files, "alpha", &["promote", "--force"]) || !self.in_sync() {
            return;
        }
        self.write("alpha", MIB, 0x11);
        if self.crashed() {
            return;
        }
        self.outcome.writes[1] = self.meta_writes("beta");
        if let Some(b) = self.beta.take() {
            b.kill();
        }
        if !self.wait("alpha", |s| s["connection"] != "Connected") {
            return;
        }
        self.write("alpha", 2 * MIB, 0x22);
        if self.crashed() {
            return;
        }
        self.start("beta", Incarnation::BetaSecond);
        if !self.in_sync() {
            return;
        }
        if !cli_ok(self.files, "alpha", &["demote"]) || self.crashed() {
            return;
        }
        if !cli_ok(self.files, "beta", &["promote"]) || self.crashed() {
            return;
        }
        self.write("beta", 3 * MIB, 0x33);
        if self.crashed() {
            return;
        }
        self.outcome.writes[0] = self.meta_writes("alpha");
        self.outcome.writes[2] = self.meta_writes("beta");
        // A clean stop writes metadata too (Primary → Secondary on beta).
        for d in [self.alpha.take(), self.beta.take()].into_iter().flatten() {
            let status = d.stop();
            if status.code() == Some(137) {
                self.outcome.struck = true;
            }
        }
        self.outcome.writes[2] += 1;
    }

    /// The operator's recovery, then the checks.
    fn recover_and_check(&mut self, what: &str) {
        self.crash = None;
        // Restart whatever died (a daemon that is dying as we look shows up
        // on a later turn), until both have a link.
        let start = std::time::Instant::now();
        loop {
            for node in ["alpha", "beta"] {
                let slot = if node == "alpha" {
                    &mut self.alpha
                } else {
                    &mut self.beta
                };
                if !slot.as_mut().is_some_and(|d| d.is_running()) {
                    if let Some(d) = slot.take() {
                        d.kill();
                    }
                    *slot = Some(self.files.start(node));
                }
            }
            let linked = ["alpha", "beta"].map(|n| status_or_null(self.files, n));
            if linked
                .iter()
                .all(|s| s["connection"] == "Connected" || s["connection"] == "StandAlone")
            {
                for s in &linked {
                    assert_eq!(s["connection"], "Connected", "{what}: {s:#}");
                }
                break;
            }
            assert!(
                start.elapsed() < WAIT_LIMIT,
                "{what}: never linked: {linked:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        let primary = ["alpha", "beta"]
            .into_iter()
            .find(|n| self.files.status(n)["role"] == "Primary");
        let primary = match primary {
            Some(p) => p,
            None => {
                let promoted = ["alpha", "beta"]
                    .into_iter()
                    .find(|n| cli_ok(self.files, n, &["promote"]));
                match promoted {
                    Some(p) => p,
                    None => {
                        // Only a pair that never finished its first promotion
                        // may need --force (both Inconsistent, as at set-up).
                        for n in ["alpha", "beta"] {
                            let s = self.files.status(n);
                            assert_eq!(
                                s["disk"], "Inconsistent",
                                "{what}: no node promotes without --force: {s:#}"
                            );
                        }
                        self.files.promote("alpha", true);
                        "alpha"
                    }
                }
            }
        };
        self.files.wait_in_sync();
        for &(offset, byte) in &self.outcome.acked {
            assert!(
                qemu_io_ok(
                    self.files,
                    primary,
                    &[&format!("read -P {byte} {offset} 65536")]
                ),
                "{what}: acknowledged write {byte:#x} at {offset} lost on {primary}"
            );
        }
        for d in [self.alpha.take(), self.beta.take()].into_iter().flatten() {
            assert!(d.stop().success(), "{what}: unclean stop");
        }
        self.files.assert_data_equal();
    }
}

fn scenario(name: &str, crash: Option<Crash>) -> Outcome {
    let dir = TestDir::new(name);
    let files = pair::setup(&dir, SIZE, "");
    let mut nodes = Nodes {
        files: &files,
        alpha: None,
        beta: None,
        crash,
        outcome: Outcome::default(),
    };
    nodes.run();
    if let Some(c) = crash {
        // The dying daemon says so in its log (appended across restarts).
        let node = if c.at == Incarnation::Alpha {
            "alpha"
        } else {
            "beta"
        };
        let log =
            std::fs::read_to_string(files.dir.join(format!("{node}.log"))).unwrap_or_default();
        nodes.outcome.struck = log.contains("simulated crash at a metadata write");
    }
    let what = format!("{crash:?}");
    nodes.recover_and_check(&what);
    std::mem::take(&mut nodes.outcome)
}

fn every_crash_point(phase: &'static str) {
    common::require_tool("qemu-io");
    let baseline = scenario(&format!("meta-baseline-{phase}"), None);
    assert!(!baseline.struck);
    assert_eq!(baseline.acked.len(), 3, "the scenario's writes");
    let mut tried = 0;
    let mut struck = 0;
    for (i, at) in [
        Incarnation::Alpha,
        Incarnation::BetaFirst,
        Incarnation::BetaSecond,
    ]
    .into_iter()
    .enumerate()
    {
        assert!(baseline.writes[i] > 0, "{at:?} wrote no metadata");
        for nth in 1..=baseline.writes[i] {
            let crash = Crash { at, nth, phase };
            let out = scenario(&format!("meta-{phase}-{i}-{nth}"), Some(crash));
            tried += 1;
            struck += u64::from(out.struck);
            eprintln!("{crash:?}: struck {}", out.struck);
        }
    }
    eprintln!(
        "metadata crash points, phase {phase}: {tried} tried, {struck} struck, all recovered \
         (writes per incarnation: {:?})",
        baseline.writes
    );
    assert_eq!(struck, tried, "every crash point must be reached");
}

#[test]
fn a_crash_before_any_metadata_write_recovers() {
    every_crash_point("before");
}

#[test]
fn a_torn_metadata_write_recovers() {
    every_crash_point("torn");
}

#[test]
fn a_crash_after_any_metadata_write_recovers() {
    every_crash_point("after");
}
