//! Interoperability with independent NBD clients: nbdinfo, nbdcopy, qemu-img,
//! qemu-io, fio's nbd engine, and XFS on nbdfuse + a loop device. Each test starts the
//! real `pairbd serve` binary on its own backing file and socket.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::xfs::{deliver, message, XfsOnNbd};
use common::{exclusive_lock, require_tool, run_ok, write_random_file, Daemon, TestDir};

const MIB: usize = 1 << 20;

fn nbdinfo_json(daemon: &Daemon, export: &str) -> serde_json::Value {
    require_tool("nbdinfo");
    let output = run_ok(Command::new("nbdinfo").args(["--json", &daemon.uri(export)]));
    serde_json::from_slice(&output.stdout).expect("nbdinfo prints JSON")
}

fn first_export(info: &serde_json::Value) -> &serde_json::Value {
    &info["exports"][0]
}

#[test]
fn nbdinfo_shows_flags_and_block_sizes() {
    let dir = TestDir::new("nbdinfo");
    let daemon = Daemon::serve(&dir, "64MiB", &["--export", "mail"]);
    let info = nbdinfo_json(&daemon, "mail");
    let export = first_export(&info);
    assert_eq!(export["export-name"], "mail", "{info:#}");
    assert_eq!(export["export-size"], 64 * MIB as u64, "{info:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
        "can_fast_zero",
    ] {
        assert_eq!(export[flag], true, "{flag} in {info:#}");
    }
    assert_eq!(export["is_read_only"], false, "{info:#}");
    assert_eq!(export["block_size_minimum"], 512, "{info:#}");
    assert_eq!(export["block_size_preferred"], 4096, "{info:#}");
    assert_eq!(export["block_size_maximum"], 32 * MIB as u64, "{info:#}");
    // The empty name reaches the default export.
    let default = nbdinfo_json(&daemon, "");
    assert_eq!(first_export(&default)["export-size"], 64 * MIB as u64);
    assert!(daemon.stop().success());
}

#[test]
fn serves_over_tcp_on_loopback() {
    let dir = TestDir::new("tcp");
    let args: Vec<String> = [
        "serve",
        "--backing",
        &dir.join("backing.img").display().to_string(),
        "--size",
        "8MiB",
        "--listen",
        "tcp:127.0.0.1:0",
        "--export",
        "t",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Daemon::spawn(
        &dir,
        &args,
        dir.join("unused.sock"),
        dir.join("backing.img"),
    );
    // The ready line names the port the kernel chose.
    let address = daemon
        .ready_line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("tcp:"))
        .unwrap_or_else(|| panic!("no tcp address in {:?}", daemon.ready_line))
        .to_string();
    require_tool("nbdinfo");
    let output = run_ok(Command::new("nbdinfo").args(["--json", &format!("nbd://{address}/t")]));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        first_export(&info)["export-size"],
        8 * MIB as u64,
        "{info:#}"
    );
    assert!(daemon.stop().success());
}

#[test]
fn read_only_export_is_advertised_and_refuses_writes() {
    require_tool("qemu-io");
    let dir = TestDir::new("readonly");
    write_random_file(&dir.join("backing.img"), 4 * MIB, 7);
    let original = fs::read(dir.join("backing.img")).unwrap();
    let daemon = Daemon::serve(&dir, "4MiB", &["--read-only"]);
    let info = nbdinfo_json(&daemon, "");
    assert_eq!(first_export(&info)["is_read_only"], true, "{info:#}");
    let output = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4096", &daemon.uri("")])
        .output()
        .expect("run qemu-io");
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(
        !text.contains("wrote 4096/4096"),
        "a write to a read-only export succeeded: {text}"
    );
    assert!(daemon.stop().success());
    let after = fs::read(dir.join("backing.img")).unwrap();
    assert!(after == original, "the read-only backing file changed");
}

/// Compares two files chunk by chunk; returns the first differing offset.
fn first_difference(left: &Path, right: &Path) -> Option<u64> {
    let mut a = File::open(left).unwrap_or_else(|e| panic!("open {}: {e}", left.display()));
    let mut b = File::open(right).unwrap_or_else(|e| panic!("open {}: {e}", right.display()));
    let (mut buf_a, mut buf_b) = (vec![0u8; MIB], vec![0u8; MIB]);
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut a, &mut buf_a);
        let m = read_full(&mut b, &mut buf_b);
        if n != m || buf_a[..n] != buf_b[..m] {
            let index = buf_a[..n]
                .iter()
                .zip(&buf_b[..m])
                .position(|(x, y)| x != y)
                .unwrap_or(n.min(m));
            return Some(offset + index as u64);
        }
        if n == 0 {
            return None;
        }
        offset += n as u64;
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).expect("read") {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

fn nbdcopy_round_trip(name: &str, engine: &str) {
    require_tool("nbdcopy");
    let dir = TestDir::new(name);
    let source = dir.join("source.img");
    write_random_file(&source, 256 * MIB, 42);
    let daemon = Daemon::serve(&dir, "256MiB", &["--engine", engine]);
    assert!(
        daemon.ready_line.contains(if engine == "pool" {
            "thread-pool"
        } else {
            "io_uring"
        }),
        "{}",
        daemon.ready_line
    );
    let uri = daemon.uri("");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16", "--flush"])
            .arg(&source)
            .arg(&uri),
    );
    let copy = dir.join("copy.img");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", &uri])
            .arg(&copy),
    );
    assert_eq!(
        first_difference(&source, &copy),
        None,
        "data read back differs from data written"
    );
    assert!(daemon.stop().success());
    assert_eq!(
        first_difference(&source, &dir.join("backing.img")),
        None,
        "backing store differs"
    );
}

#[test]
fn nbdcopy_round_trip_io_uring() {
    nbdcopy_round_trip("nbdcopy-uring", "uring");
}

#[test]
fn nbdcopy_round_trip_thread_pool() {
    nbdcopy_round_trip("nbdcopy-pool", "pool");
}

#[test]
fn qemu_img_compare_matches_source_and_detects_a_change() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = TestDir::new("qemu-img");
    let source = dir.join("source.img");
    write_random_file(&source, 32 * MIB, 3);
    let daemon = Daemon::serve(&dir, "32MiB", &["--export", "vol"]);
    let uri = daemon.uri("vol");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&uri),
    );
    // The comparison can fail: change one sector and it must say so.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 1048576 512", &uri]));
    let status = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&uri)
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "qemu-img compare missed a changed sector"
    );
    assert!(daemon.stop().success());
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri);
    let output = run_ok(&mut command);
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    text
}

#[test]
fn qemu_io_fua_writes_and_odd_offset_reads() {
    require_tool("qemu-io");
    let dir = TestDir::new("qemu-io");
    let daemon = Daemon::serve(&dir, "16MiB", &[]);
    let uri = daemon.uri("");
    let text = qemu_io(
        &uri,
        &[
            "write -f -P 0xa5 0 65536",
            "write -f -P 0x5a 65536 4096",
            "read -P 0xa5 1001 777",
            "read -P 0xa5 3 65533",
            "read -P 0x5a 65537 4095",
            "write -z 8192 4096",
            "read -P 0 8192 4096",
            "flush",
        ],
    );
    assert!(text.contains("wrote 65536/65536"), "{text}");
    assert!(text.contains("read 777/777"), "{text}");
    // An unaligned write: qemu does read-modify-write around it (minimum block 512).
    qemu_io(
        &uri,
        &[
            "write -P 0x33 70001 10",
            "read -P 0x33 70001 10",
            "read -P 0x5a 65536 4096",
        ],
    )
    .contains("wrote 10/10")
    .then_some(())
    .expect("unaligned write");
    assert!(daemon.stop().success());
    // The data landed in the backing file at the right offsets. (This cannot tell FUA
    // from a plain write: the clean stop flushes. FUA durability needs the power-cut
    // store of the faults milestone.)
    let backing = fs::read(dir.join("backing.img")).unwrap();
    assert!(backing[..8192].iter().all(|&b| b == 0xa5));
    assert!(backing[8192..12288].iter().all(|&b| b == 0));
    assert!(backing[65536..69632].iter().all(|&b| b == 0x5a));
    assert!(backing[70001..70011].iter().all(|&b| b == 0x33));
}

fn fio_verify(name: &str, extra: &[&str]) {
    require_tool("fio");
    let dir = TestDir::new(name);
    let daemon = Daemon::serve(&dir, "128MiB", extra);
    let report_path = dir.join("fio.json");
    let output = run_ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", daemon.uri("")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=64M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--fsync=64",
        "--output-format=json",
        &format!("--output={}", report_path.display()),
    ]));
    // fio's nbd engine prints a line of its own on stdout, so the report goes to a file.
    let report: serde_json::Value = serde_json::from_slice(&fs::read(&report_path).unwrap())
        .unwrap_or_else(|e| {
            panic!(
                "fio JSON: {e}; stdout: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job:#}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 64 * MIB as u64,
        "{job:#}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 64 * MIB as u64,
        "verify read nothing: {job:#}"
    );
    assert!(daemon.stop().success());
}

#[test]
fn fio_random_writes_verify_crc32c() {
    fio_verify("fio-verify", &[]);
}

#[test]
fn fio_random_writes_verify_crc32c_direct_io() {
    fio_verify("fio-verify-direct", &["--direct-io"]);
}

#[test]
fn xfs_maildir_deliveries_on_nbdfuse_survive_remount_and_repair() {
    let _lock = exclusive_lock();
    let dir = TestDir::new("xfs-maildir");
    let daemon = Daemon::serve(&dir, "512MiB", &["--export", "mail"]);
    let mut xfs = XfsOnNbd::attach(&dir, &daemon.uri("mail"));
    run_ok(Command::new("mkfs.xfs").args(["-q", xfs.device()]));
    xfs.mount();
    let maildir = xfs.mount_dir.join("user");
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    const MESSAGES: u32 = 2000;
    for index in 0..MESSAGES {
        deliver(&maildir, index);
    }
    xfs.unmount();
    run_ok(Command::new("xfs_repair").arg("-n").arg(xfs.device()));
    xfs.mount();
    for index in 0..MESSAGES {
        let path = maildir.join("new").join(format!("{index}.pairbd"));
        let content = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(content == message(index), "message {index} is corrupt");
    }
    assert_eq!(fs::read_dir(maildir.join("tmp")).unwrap().count(), 0);
    xfs.detach();
    assert!(daemon.stop().success());
}
