//! A real filesystem on a pairbd NBD export without the kernel's nbd module:
//! `nbdfuse` exposes the export as a file ([`NbdFuse`]), a loop device on that
//! file takes XFS ([`XfsOnNbd`]), and the mount is where a test delivers mail
//! the way a careful MTA does (Maildir: tmp/, fsync, rename into new/, fsync
//! the directory).
//!
//! Everything is torn down in reverse on drop, also after the NBD server died
//! under it: nbdfuse is killed first (which aborts the FUSE connection, so no
//! I/O can hang on a dead server), then the mount, the loop device and the
//! FUSE mount go, lazily if need be. A failing test leaves no mounts, loop
//! devices or processes behind. Tests that use this take
//! [`super::exclusive_lock`].

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{require_tool, run_ok, TestDir};

/// Numbers the attachments of one test process, so that every attachment gets
/// fresh directories (a lazily unmounted predecessor never gets in the way).
static ATTACHMENTS: AtomicU32 = AtomicU32::new(0);

/// How long nbdfuse may take to serve its file, or to exit once unmounted.
const NBDFUSE_LIMIT: Duration = Duration::from_secs(60);

/// Runs a command, ignoring its outcome (for best-effort teardown).
fn quietly(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.display().to_string();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

/// `nbdfuse DIR/disk URI`: an NBD export as the file `DIR/disk`.
pub struct NbdFuse {
    /// The FUSE mount point (holding the one file `disk`).
    pub dir: PathBuf,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

impl NbdFuse {
    /// Starts nbdfuse on `uri` and waits (bounded) until it serves the file.
    /// Panics if nbdfuse exits first, e.g. because the server refused it.
    pub fn start(dir: &TestDir, uri: &str) -> NbdFuse {
        for tool in ["nbdfuse", "fusermount3"] {
            require_tool(tool);
        }
        let n = ATTACHMENTS.fetch_add(1, Ordering::SeqCst);
        let fuse_dir = dir.join(&format!("fuse-{n}"));
        fs::create_dir_all(&fuse_dir).unwrap();
        let pidfile = dir.join(&format!("nbdfuse-{n}.pid"));
        let child = Command::new("nbdfuse")
            .arg("--pidfile")
            .arg(&pidfile)
            .arg(fuse_dir.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut fuse = NbdFuse {
            dir: fuse_dir,
            child: Some(child),
            exit: None,
        };
        // nbdfuse writes its pid file once it serves the file: wait for that, bounded.
        let deadline = Instant::now() + NBDFUSE_LIMIT;
        while !pidfile.exists() {
            assert!(Instant::now() < deadline, "nbdfuse never became ready");
            if fuse.has_exited() {
                panic!("nbdfuse on {uri} exited early: {:?}", fuse.exit);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        fuse
    }

    /// The file that is the export.
    pub fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Whether nbdfuse has exited (by itself, or killed).
    pub fn has_exited(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            self.exit = Some(status);
            self.child = None;
            return true;
        }
        self.child.is_none()
    }

    /// How nbdfuse ended, if it did.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.has_exited();
        self.exit
    }

    /// SIGKILL (a no-op if nbdfuse already exited, e.g. aborted because its
    /// server died mid-flush). The process's end aborts the FUSE connection:
    /// all I/O on the file fails from then on instead of waiting. The FUSE
    /// mount stays until [`NbdFuse::unmount`] or drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.exit = Some(status);
            }
        }
    }

    /// Unmounts the FUSE file system; nbdfuse then exits by itself (it is
    /// killed if it does not within the limit). Returns whether everything
    /// went cleanly.
    pub fn unmount(&mut self) -> bool {
        let mut clean = true;
        if is_mount_point(&self.dir) {
            // Releasing a loop device's backing file can lag a little behind
            // `losetup -d`: retry a busy unmount for a bounded time.
            let deadline = Instant::now() + NBDFUSE_LIMIT;
            loop {
                if quietly(Command::new("fusermount3").arg("-u").arg(&self.dir)) {
                    break;
                }
                if Instant::now() > deadline {
                    clean = false;
                    quietly(Command::new("umount").arg("-l").arg(&self.dir));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + NBDFUSE_LIMIT;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        self.exit = Some(status);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        clean = false;
                        let _ = child.kill();
                        self.exit = child.wait().ok();
                        break;
                    }
                }
            }
        }
        clean
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Never wait on a server that may be gone: kill first.
            self.kill();
        }
        self.unmount();
    }
}

/// nbdfuse, a loop device and an XFS mount, torn down in reverse order on drop.
pub struct XfsOnNbd {
    pub mount_dir: PathBuf,
    loop_device: Option<String>,
    mounted: bool,
    /// Declared last: dropped after the mount and the loop device are gone.
    pub fuse: NbdFuse,
}

impl XfsOnNbd {
    /// nbdfuse on `uri`, and a loop device on its file.
    pub fn attach(dir: &TestDir, uri: &str) -> XfsOnNbd {
        for tool in ["losetup", "mkfs.xfs", "xfs_repair", "mount", "umount"] {
            require_tool(tool);
        }
        let fuse = NbdFuse::start(dir, uri);
        let mount_dir = fuse.dir.with_file_name(format!(
            "mnt-{}",
            fuse.dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("fuse-"))
                .unwrap_or("x")
        ));
        fs::create_dir_all(&mount_dir).unwrap();
        let mut setup = XfsOnNbd {
            mount_dir,
            loop_device: None,
            mounted: false,
            fuse,
        };
        let output = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .arg(setup.fuse.file()),
        );
        setup.loop_device = Some(String::from_utf8_lossy(&output.stdout).trim().to_string());
        setup
    }

    pub fn device(&self) -> &str {
        self.loop_device.as_deref().expect("loop device")
    }

    /// `mkfs.xfs -q` on the loop device.
    pub fn mkfs(&self) {
        run_ok(Command::new("mkfs.xfs").args(["-q", self.device()]));
    }

    /// Mounts the file system (replaying its log if it was not unmounted).
    pub fn mount(&mut self) {
        run_ok(
            Command::new("mount")
                .arg(self.device())
                .arg(&self.mount_dir),
        );
        self.mounted = true;
    }

    pub fn unmount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mount_dir));
        self.mounted = false;
    }

    /// `xfs_repair -n`: checks the (unmounted) file system; fails the test
    /// with its report if it finds anything.
    pub fn repair_check(&self) {
        assert!(
            !self.mounted,
            "xfs_repair -n needs an unmounted file system"
        );
        run_ok(Command::new("xfs_repair").arg("-n").arg(self.device()));
    }

    /// The clean teardown of a healthy attachment: unmount, detach the loop
    /// device, unmount the FUSE file system (nbdfuse then exits). Fails the
    /// test if a step fails.
    pub fn detach(&mut self) {
        if self.mounted {
            self.unmount();
        }
        if let Some(device) = self.loop_device.take() {
            run_ok(Command::new("losetup").args(["-d", &device]));
        }
        assert!(self.fuse.unmount(), "nbdfuse did not unmount cleanly");
    }

    /// The teardown after the NBD server died (or of a failing test): kill
    /// nbdfuse first so that nothing waits on the dead server, then unmount
    /// (lazily if the file system is busy), detach the loop device and the
    /// FUSE mount. Never fails, never hangs on the server.
    pub fn crash_teardown(&mut self) {
        self.fuse.kill();
        if self.mounted
            && !quietly(Command::new("umount").arg(&self.mount_dir))
            && is_mount_point(&self.mount_dir)
        {
            quietly(Command::new("umount").arg("-l").arg(&self.mount_dir));
        }
        self.mounted = false;
        if let Some(device) = self.loop_device.take() {
            quietly(Command::new("losetup").args(["-d", &device]));
        }
        self.fuse.unmount();
    }
}

impl Drop for XfsOnNbd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.crash_teardown();
        } else {
            if self.mounted && !quietly(Command::new("umount").arg(&self.mount_dir)) {
                quietly(Command::new("umount").arg("-l").arg(&self.mount_dir));
            }
            self.mounted = false;
            if let Some(device) = self.loop_device.take() {
                quietly(Command::new("losetup").args(["-d", &device]));
            }
            self.fuse.unmount();
        }
    }
}

/// The content of message `index`: deterministic, 1–24 KiB, naming itself.
pub fn message(index: u32) -> Vec<u8> {
    let length = 1024 + (index as usize * 7919) % (23 * 1024);
    mail_body(index, u64::from(index), length)
}

/// A mail of `length` bytes: headers naming `index`, then letters from `seed`.
pub fn mail_body(index: u32, seed: u64, length: usize) -> Vec<u8> {
    let header = format!("Message-Id: <{index}@pairbd.test>\r\nSubject: delivery {index}\r\n\r\n");
    let mut body = header.into_bytes();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while body.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        body.push(b'a' + (state % 26) as u8);
    }
    body
}

/// Creates `maildir` with its tmp/, new/ and cur/, durably.
pub fn create_maildir(maildir: &Path) {
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    File::open(maildir).unwrap().sync_all().unwrap();
    if let Some(parent) = maildir.parent() {
        File::open(parent).unwrap().sync_all().unwrap();
    }
}

/// One Maildir delivery as a careful MTA does it: write to tmp/NAME, fsync the
/// file, rename into new/NAME, fsync new/. Once this returns Ok the message
/// is acknowledged: it must survive any crash.
pub fn try_deliver(maildir: &Path, name: &str, content: &[u8]) -> std::io::Result<()> {
    let tmp = maildir.join("tmp").join(name);
    let mut file = File::create(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, maildir.join("new").join(name))?;
    File::open(maildir.join("new"))?.sync_all()
}

/// [`try_deliver`] of [`message`]`(index)` as `INDEX.pairbd`; panics on error.
pub fn deliver(maildir: &Path, index: u32) {
    let name = format!("{index}.pairbd");
    try_deliver(maildir, &name, &message(index))
        .unwrap_or_else(|e| panic!("delivering {name}: {e}"));
}

/// FNV-1a, 64 bits: the checksum of an acknowledged message.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in data {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
