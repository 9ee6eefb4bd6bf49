//! systemd integration: the unit files in kernel-glue/systemd pass
//! `systemd-analyze verify` without a single complaint, and the daemon speaks
//! the notification protocol of `Type=notify` units — READY=1 once it serves,
//! STATUS= with its role and link kept current, WATCHDOG=1 while its core
//! answers, STOPPING=1 on a clean stop — to a socket the test plays systemd on.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pair::{self, WAIT_LIMIT};
use common::{pairbd_binary, require_tool, TestDir};

/// Runs `systemd-analyze verify` on `units` (file names in `dir`), returning
/// success and everything it printed.
fn verify(dir: &Path, units: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units.iter().map(|u| dir.join(u)))
        .current_dir(dir)
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_unit_files_verify_cleanly() {
    require_tool("systemd-analyze");
    let dir = TestDir::new("systemd-units");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-glue/systemd");
    for unit in ["pairbd@.service", "pairbd-attach@.service"] {
        // verify checks that ExecStart= exists: point it at the built binary.
        let text = std::fs::read_to_string(src.join(unit))
            .unwrap()
            .replace("/usr/sbin/pairbd", pairbd_binary());
        std::fs::write(dir.join(unit), text).unwrap();
    }
    let (ok, text) = verify(
        dir.path(),
        &["pairbd@mail.service", "pairbd-attach@mail.service"],
    );
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    // The check can fail: a typo is reported.
    let broken = std::fs::read_to_string(dir.join("pairbd@.service"))
        .unwrap()
        .replace("Type=notify", "Type=notfy");
    std::fs::write(dir.join("broken@.service"), broken).unwrap();
    let (_, text) = verify(dir.path(), &["broken@mail.service"]);
    assert!(text.contains("notfy"), "{text}");
}

/// Collects notifications until `pred` holds on one of them.
fn expect(sock: &UnixDatagram, seen: &mut Vec<String>, what: &str, pred: impl Fn(&str) -> bool) {
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        if seen.iter().any(|m| pred(m)) {
            return;
        }
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "no notification {what}; got {seen:#?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
}

#[test]
fn the_daemon_notifies_ready_status_watchdog_and_stopping() {
    let dir = TestDir::new("systemd-notify");
    let files = pair::setup(&dir, 16 << 20, "");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.display().to_string();
    let a = files.start_env(
        "alpha",
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "200000")],
    );
    let _b = files.start("beta");
    let mut seen = Vec::new();
    expect(&sock, &mut seen, "READY=1", |m| {
        m.lines().any(|l| l == "READY=1") && m.contains("STATUS=mail Secondary/")
    });
    expect(&sock, &mut seen, "a watchdog pet", |m| {
        m.contains("WATCHDOG=1")
    });
    files.promote("alpha", true);
    expect(&sock, &mut seen, "STATUS as Primary", |m| {
        m.contains("STATUS=mail Primary/UpToDate")
    });
    // The pets go on (only new notifications count from here).
    seen.clear();
    expect(&sock, &mut seen, "more watchdog pets", |m| {
        m.contains("WATCHDOG=1")
    });
    assert!(a.stop().success());
    expect(&sock, &mut seen, "STOPPING=1", |m| m.contains("STOPPING=1"));
}
