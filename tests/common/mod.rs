//! Shared helpers for the integration tests: start the real `pairbd` binary on a
//! per-test directory, wait until it says it is ready, run real NBD clients, and clean
//! up every process on drop.
//!
//! Readiness is a line on the daemon's stdout, never a sleep. Per-test names (a fresh
//! directory under Cargo's target tmpdir, which is on a real disk, unlike /tmp) keep
//! tests independent so they can run in parallel; tests that need FUSE, loop devices
//! and mounts also take [`exclusive_lock`].

#![allow(dead_code)]

pub mod chaos;
pub mod guest;
pub mod pair;
pub mod xfs;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a daemon may take to print its ready line before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh directory for one test, removed when dropped (unless the test panicked,
/// so that its logs can be read).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).expect("create the target tmpdir");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(base)
            .expect("create the test directory");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("test dir present").path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("test files kept for inspection in {}", dir.keep().display());
            }
        }
    }
}

/// A running `pairbd serve`.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub backing: PathBuf,
    pub log: PathBuf,
    pub ready_line: String,
}

/// Where the binary under test is.
/// Not an environment variable: passed in `env` to the spawn functions, it
/// runs the daemon inside that network namespace.
pub const NETNS_ENV: &str = "@netns";

pub fn pairbd_binary() -> &'static str {
    env!("CARGO_BIN_EXE_pairbd")
}

impl Daemon {
    /// Starts `pairbd serve` on `dir/backing.img` (created at `size` if missing),
    /// listening on `dir/nbd.sock`, with extra arguments appended.
    pub fn serve(dir: &TestDir, size: &str, extra: &[&str]) -> Daemon {
        let backing = dir.join("backing.img");
        let socket = dir.join("nbd.sock");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--backing".into(),
            backing.display().to_string(),
            "--size".into(),
            size.into(),
            "--listen".into(),
            format!("unix:{}", socket.display()),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        Daemon::spawn(dir, &args, socket, backing)
    }

    /// Starts the binary with exactly these arguments and waits for its ready line.
    pub fn spawn(dir: &TestDir, args: &[String], socket: PathBuf, backing: PathBuf) -> Daemon {
        let log = dir.join(&format!("daemon-{}.log", std::process::id()));
        Daemon::spawn_logged(args, socket, backing, log)
    }

    /// Like [`Daemon::spawn`], logging to `log` (appended: a restarted daemon
    /// keeps one log).
    pub fn spawn_logged(
        args: &[String],
        socket: PathBuf,
        backing: PathBuf,
        log: PathBuf,
    ) -> Daemon {
        Daemon::spawn_logged_env(args, socket, backing, log, &[])
    }

    /// Like [`Daemon::spawn_logged`], with extra environment variables.
    pub fn spawn_logged_env(
        args: &[String],
        socket: PathBuf,
        backing: PathBuf,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Daemon {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the daemon log");
        let (program, args) = match env.iter().find(|(k, _)| *k == NETNS_ENV) {
            // Run inside a network namespace: `ip netns exec NS pairbd ARGS`
            // (ip execs pairbd, so the pid is the daemon's).
            Some((_, ns)) => {
                let mut all = vec![
                    "netns".to_string(),
                    "exec".to_string(),
                    ns.to_string(),
                    pairbd_binary().to_string(),
                ];
                all.extend(args.iter().cloned());
                ("ip", all)
            }
            None => (pairbd_binary(), args.to_vec()),
        };
        let env: Vec<(&str, &str)> = env
            .iter()
            .copied()
            .filter(|(k, _)| *k != NETNS_ENV)
            .collect();
        let mut child = Command::new(program)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn pairbd");
        let stdout = child.stdout.take().expect("daemon stdout");
        let (lines, ready) = mpsc::channel();
        std::thread::spawn(move || {
            // Forward every stdout line; keep draining so the daemon never blocks on it.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            socket,
            backing,
            log,
            ready_line: String::new(),
        };
        loop {
            match ready.recv_timeout(READY_TIMEOUT) {
                Ok(line) if line.contains("ready") => {
                    daemon.ready_line = line;
                    return daemon;
                }
                Ok(_) => continue,
                Err(_) => {
                    let status = daemon
                        .child
                        .as_mut()
                        .and_then(|child| child.try_wait().ok().flatten());
                    panic!(
                        "pairbd {args:?} never became ready (exit status {status:?}); its log:\n{}",
                        daemon.log_text()
                    );
                }
            }
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// An NBD URI for the export named `export` ("" for the default).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        signal(child.id(), "TERM");
        child.wait().expect("wait for pairbd")
    }

    /// Waits for an exit a signal already asked for.
    pub fn stop_after_signal(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        child.wait().expect("wait for pairbd")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|child| child.try_wait()),
            Some(Ok(None))
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- pairbd log ({}) ---\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
        }
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Fails the test with a clear message when a client tool is missing: CI installs
/// them all (tests/install-deps.sh), so a missing tool is a broken set-up, not a skip.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run `sudo bash tests/install-deps.sh` (Debian packages the tests need)"
    );
}

/// Runs a command, failing the test with its output if it does not succeed.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Writes `len` bytes of deterministic pseudo-random data (from `seed`) to `path`.
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    let mut file = File::create(path).expect("create data file");
    let mut state = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in chunk.chunks_mut(8) {
            // xorshift64*: fast, deterministic, good enough to defeat compression and holes.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let value = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            word.copy_from_slice(&value[..word.len()]);
        }
        let take = left.min(chunk.len());
        file.write_all(&chunk[..take]).expect("write data file");
        left -= take;
    }
    file.sync_all().expect("sync data file");
}

/// An exclusive, cross-process lock for tests that use FUSE, loop devices or mounts,
/// so that they never run at the same time (nextest runs test binaries in parallel).
pub struct ExclusiveLock {
    _file: File,
}

pub fn exclusive_lock() -> ExclusiveLock {
    use std::os::fd::AsRawFd;
    let file = File::create("/tmp/pairbd-tests-system.lock").expect("create the lock file");
    // SAFETY: flock on a file descriptor we own; it blocks until the lock is free and
    // is released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock failed");
    ExclusiveLock { _file: file }
}
