//! Real I/O errors from the backing store reach the NBD client, and a failed flush
//! poisons the store until the daemon reopens it.
//!
//! The backing "file" is an nbdfuse mount of nbdkit's file plugin behind its error
//! filter: while a trigger file exists, every request to nbdkit fails with EIO, so the
//! kernel really fails pairbd's writeback and fdatasync — no mock in pairbd's path.

mod common;
#[path = "common/raw_client.rs"]
mod raw_client;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{exclusive_lock, require_tool, Daemon, TestDir};
use pairbd_nbd_proto::consts::NBD_CMD_FLUSH;
use pairbd_nbd_proto::NbdError;
use raw_client::RawClient;

/// A child process that is killed on drop.
struct Guarded(Option<Child>);

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for a pid file that a starting tool writes once it serves (bounded).
fn wait_for_pidfile(pidfile: &Path, child: &mut Guarded, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "{what} never became ready");
        if let Some(Ok(Some(status))) = child.0.as_mut().map(|c| c.try_wait()) {
            panic!("{what} exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nbdkit (memory + error filter) exposed as a file by nbdfuse; unmounted on drop.
struct FailingDisk {
    fuse_dir: PathBuf,
    trigger: PathBuf,
    nbdfuse: Guarded,
    _nbdkit: Guarded,
}

impl FailingDisk {
    fn start(dir: &TestDir) -> FailingDisk {
        for tool in ["nbdkit", "nbdfuse", "fusermount3"] {
            require_tool(tool);
        }
        let trigger = dir.join("fail-now");
        let socket = dir.join("nbdkit.sock");
        let nbdkit_pid = dir.join("nbdkit.pid");
        // The file plugin (unlike memory) supports FLUSH, so fsync reaches the filter.
        let image = dir.join("nbdkit.img");
        fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let mut nbdkit = Guarded(Some(
            Command::new("nbdkit")
                .args(["--foreground", "--unix"])
                .arg(&socket)
                .arg("--pidfile")
                .arg(&nbdkit_pid)
                .args([
                    "--filter=error",
                    "memory",
                    "size=64M",
                    "error=EIO",
                    "error-rate=100%",
                ])
                .arg(format!("error-file={}", trigger.display()))
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn nbdkit"),
        ));
        wait_for_pidfile(&nbdkit_pid, &mut nbdkit, "nbdkit");
        let fuse_dir = dir.join("fuse");
        fs::create_dir_all(&fuse_dir).unwrap();
        let fuse_pid = dir.join("nbdfuse.pid");
        let mut nbdfuse = Guarded(Some(
            Command::new("nbdfuse")
                .arg("--pidfile")
                .arg(&fuse_pid)
                .arg(fuse_dir.join("disk"))
                .arg(format!("nbd+unix:///?socket={}", socket.display()))
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn nbdfuse"),
        ));
        wait_for_pidfile(&fuse_pid, &mut nbdfuse, "nbdfuse");
        FailingDisk {
            fuse_dir,
            trigger,
            nbdfuse,
            _nbdkit: nbdkit,
        }
    }

    fn disk(&self) -> PathBuf {
        self.fuse_dir.join("disk")
    }

    fn fail(&self, failing: bool) {
        if failing {
            fs::write(&self.trigger, b"").unwrap();
        } else {
            fs::remove_file(&self.trigger).unwrap();
        }
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        if let Some(mut child) = self.nbdfuse.0.take() {
            let _ = child.wait();
        }
    }
}

fn serve_on(dir: &TestDir, backing: &Path, name: &str) -> Daemon {
    let socket = dir.join(&format!("{name}.sock"));
    let args: Vec<String> = vec![
        "serve".into(),
        "--backing".into(),
        backing.display().to_string(),
        "--listen".into(),
        format!("unix:{}", socket.display()),
    ];
    Daemon::spawn(dir, &args, socket, backing.to_path_buf())
}

/// A loop device on a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        require_tool("losetup");
        let output = common::run_ok(Command::new("losetup").args(["-f", "--show"]).arg(file));
        LoopDevice(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_failing_store_write_reaches_the_client_as_eio() {
    let _lock = exclusive_lock();
    let dir = TestDir::new("store-write-error");
    let disk = FailingDisk::start(&dir);
    // nbdfuse writes through to nbdkit at once, so the write itself fails.
    let daemon = serve_on(&dir, &disk.disk(), "direct");
    let (mut client, _) = RawClient::open(&daemon.socket, "");
    client.write_ok(0, &[0x11; 4096]);
    disk.fail(true);
    assert_eq!(
        client.write_at(0, 8192, &[0x22; 4096]),
        NbdError::Io.errno()
    );
    disk.fail(false);
    client.write_ok(8192, &[0x22; 4096]);
    assert_eq!(client.read_ok(8192, 4096), vec![0x22; 4096]);
    client.disconnect();
    drop(client);
    assert!(daemon.stop().success());
}

#[test]
fn a_failed_flush_poisons_the_store_until_the_daemon_restarts() {
    let _lock = exclusive_lock();
    let dir = TestDir::new("store-flush-error");
    let disk = FailingDisk::start(&dir);
    // A loop device on the FUSE file gives real writeback: pairbd's writes land in the
    // loop device's page cache and fail only when fdatasync writes them back.
    let device = LoopDevice::attach(&disk.disk());
    let backing = PathBuf::from(&device.0);

    let daemon = serve_on(&dir, &backing, "first");
    let (mut client, _) = RawClient::open(&daemon.socket, "");
    client.write_ok(0, &[0x11; 4096]);
    assert_eq!(
        client.command(0, NBD_CMD_FLUSH, 0, 0),
        0,
        "a healthy flush failed"
    );

    disk.fail(true);
    client.write_ok(8192, &[0x22; 4096]);
    assert_eq!(
        client.command(0, NBD_CMD_FLUSH, 0, 0),
        NbdError::Io.errno(),
        "flush on a failing disk"
    );

    // The disk recovers, and the kernel would report success to the next fdatasync —
    // but the pages the failed one could not write may be gone: pairbd must not claim
    // durability again until it reopens the store.
    disk.fail(false);
    assert_eq!(
        client.command(0, NBD_CMD_FLUSH, 0, 0),
        NbdError::Io.errno(),
        "flush after a failed flush"
    );
    let fua = pairbd_nbd_proto::consts::NBD_CMD_FLAG_FUA;
    assert_eq!(
        client.write_at(fua, 12288, &[0x33; 4096]),
        NbdError::Io.errno(),
        "FUA write after a failed flush"
    );
    assert_eq!(
        client.read_ok(0, 4096),
        vec![0x11; 4096],
        "reads still work"
    );
    client.disconnect();
    drop(client);
    let log = daemon.log_text();
    let _ = daemon.stop();
    assert!(log.contains("poisoned"), "the daemon never said why: {log}");

    // A restart reopens the store: flushes work again.
    let daemon = serve_on(&dir, &backing, "second");
    let (mut client, _) = RawClient::open(&daemon.socket, "");
    client.write_ok(16384, &[0x44; 4096]);
    assert_eq!(
        client.command(0, NBD_CMD_FLUSH, 0, 0),
        0,
        "flush after reopening"
    );
    client.disconnect();
    drop(client);
    assert!(daemon.stop().success());
}

#[test]
fn a_store_error_on_the_primary_fail_stops_it_and_the_peer_notices() {
    let _lock = exclusive_lock();
    let dir = TestDir::new("pair-store-error");
    let disk = FailingDisk::start(&dir);
    // Alpha's data lives on the failing disk (metadata beside it, so that the
    // failure hits the data path first).
    let alpha_extra = format!(
        "backing = \"{}\"\nmeta = \"alpha.meta\"",
        disk.disk().display()
    );
    let files = common::pair::setup_with(&dir, 32 << 20, "", &[&alpha_extra, ""]);
    let mut a = files.start("alpha");
    let b = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let (mut client, _) = RawClient::open(&files.socket("alpha"), "mail");
    client.write_ok(0, &[0x11; 4096]);
    disk.fail(true);
    let errno = client.write_at(0, 8192, &[0x22; 4096]);
    assert_eq!(
        errno,
        NbdError::Io.errno(),
        "the failed write was not reported as EIO"
    );
    drop(client);
    // The primary stops by itself, saying why.
    let deadline = Instant::now() + common::pair::WAIT_LIMIT;
    while a.is_running() {
        assert!(
            Instant::now() < deadline,
            "alpha kept running after a store error"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.log_text().contains("fail-stop"), "{}", a.log_text());
    disk.fail(false);
    files.wait_for("beta", "the failed primary gone", |s| {
        s["connection"] == "Disconnected"
    });
    // Beta keeps what was acknowledged.
    assert!(b.stop().success());
    let beta = std::fs::read(files.backing("beta")).unwrap();
    assert!(beta[..4096].iter().all(|&x| x == 0x11));
}
