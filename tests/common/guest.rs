//! A real Linux kernel as the mail host: a Debian kernel booted under qemu (TCG, no KVM)
//! from the initramfs that kernel-glue/guest/build-initramfs.sh builds and caches, with
//! the kernel's NBD client, XFS, busybox and a per-run script.
//!
//! - The guest's network is qemu's user-mode network with `restrict=on`: nothing leaves
//!   qemu except connections to the forwarded addresses ([`NODE_ADDRESSES`], port
//!   [`NBD_PORT`]). Each guest connection to one of them starts its own
//!   kernel-glue/guest/relay.py (`guestfwd=...-cmd:`), which connects a fresh Unix stream
//!   to that node's NBD socket, so `nbd-client -C 2`, detach and re-attach and reconnects
//!   all reach fresh server connections. The relays log to `relay.log` (with counts of
//!   the NBD requests they carried, see [`Guest::relay_stats`]).
//! - The per-run files (/guest/run.sh, kernel-glue/guest/maildir.sh, anything else) are
//!   a second cpio archive appended to the cached initramfs; the kernel unpacks both.
//! - The script's results come back on the second serial port (fd 3 in the script) as
//!   lines, read here from qemu's stdout; the kernel console goes to `console-NAME.log`.
//! - [`Guest::power_cut`] SIGKILLs qemu: the mail host's page cache is gone, only what
//!   reached the NBD server remains.
//!
//! Every qemu and relay process is killed when its [`Guest`] is dropped, also when a
//! test panics. A missing qemu or package fails the test (CI installs them all through
//! tests/install-deps.sh).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use super::require_tool;

/// The guest addresses forwarded to the nodes' NBD sockets: alpha, beta.
pub const NODE_ADDRESSES: [&str; 2] = ["10.0.2.100", "10.0.2.101"];
/// The NBD port on those addresses.
pub const NBD_PORT: u16 = 10809;

/// How long the guest may take to exit by itself once its script is done, and how long
/// relays may take to finish after the guest is gone.
const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// The cached kernel and initramfs.
pub struct GuestImage {
    pub dir: PathBuf,
    /// What qemu's -kernel takes: an uncompressed vmlinux (PVH) or a bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub manifest: String,
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Builds the guest (or finds it in the cache) once per test process.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        for tool in ["qemu-system-x86_64", "python3", "cpio", "depmod", "md5sum"] {
            require_tool(tool);
        }
        let script = repo_path("kernel-glue/guest/build-initramfs.sh");
        let output = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}); run `sudo bash tests/install-deps.sh` if a package is missing:\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let dir = PathBuf::from(stdout.lines().last().expect("the build directory").trim());
        let manifest = fs::read_to_string(dir.join("manifest.txt")).expect("manifest.txt");
        GuestImage {
            kernel: dir.join("kernel"),
            initramfs: dir.join("initramfs.cpio"),
            dir,
            manifest,
        }
    })
}

/// The Python that runs the relays: Debian's (tests/install-deps.sh installs it), not
/// a shim that might print to the stream.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A file for the per-run archive.
pub struct GuestFile {
    /// The absolute path inside the guest.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl GuestFile {
    pub fn new(path: &str, data: impl Into<Vec<u8>>, mode: u32) -> GuestFile {
        GuestFile {
            path: path.to_string(),
            data: data.into(),
            mode,
        }
    }
}

/// What to boot.
pub struct GuestConfig {
    /// Names this boot's files in the test directory.
    pub name: String,
    /// /guest/run.sh; kernel-glue/guest/maildir.sh is at /guest/maildir.sh.
    pub script: String,
    pub files: Vec<GuestFile>,
    /// `(guest address, host Unix socket)`: connections to the address on [`NBD_PORT`]
    /// are relayed to the socket.
    pub forwards: Vec<(String, PathBuf)>,
    pub cpus: u32,
    pub memory_mib: u32,
}

/// A running guest.
pub struct Guest {
    qemu: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Every result line received so far.
    pub transcript: Vec<String>,
    pub name: String,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub relay_log: PathBuf,
    ended: bool,
}

impl Guest {
    /// Boots a guest; its files go to `dir` (`initrd-NAME.cpio`, `console-NAME.log`,
    /// `qemu-NAME.log`, and the shared `relay.log`).
    pub fn boot(dir: &Path, config: GuestConfig) -> Guest {
        let image = guest_image();
        let mut files = vec![
            GuestFile::new("/guest/run.sh", config.script.clone(), 0o755),
            GuestFile::new(
                "/guest/maildir.sh",
                fs::read(repo_path("kernel-glue/guest/maildir.sh")).expect("maildir.sh"),
                0o644,
            ),
        ];
        files.extend(config.files);
        let initrd = dir.join(format!("initrd-{}.cpio", config.name));
        fs::copy(&image.initramfs, &initrd).expect("copy the initramfs");
        let mut out = fs::OpenOptions::new()
            .append(true)
            .open(&initrd)
            .expect("open the initrd");
        out.write_all(&newc_archive(&files))
            .expect("append the per-run archive");
        drop(out);

        let console_log = dir.join(format!("console-{}.log", config.name));
        let qemu_log = dir.join(format!("qemu-{}.log", config.name));
        let relay_log = dir.join("relay.log");
        let relay = repo_path("kernel-glue/guest/relay.py");
        let mut netdev = String::from("user,id=n0,restrict=on,ipv6=off");
        for (address, socket) in &config.forwards {
            let command = [
                python(),
                "-I",
                "-S",
                &relay.display().to_string(),
                &socket.display().to_string(),
                &relay_log.display().to_string(),
            ]
            .iter()
            .map(|word| {
                assert!(!word.contains('\''), "{word:?}: no quotes in relay paths");
                format!("'{word}'")
            })
            .collect::<Vec<_>>()
            .join(" ");
            // qemu's option syntax: a comma in a value is written twice.
            netdev.push_str(&format!(
                ",guestfwd=tcp:{address}:{NBD_PORT}-cmd:{}",
                command.replace(',', ",,")
            ));
        }
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot"])
        .args(["-smp", &config.cpus.to_string()])
        .args(["-m", &config.memory_mib.to_string()])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .args(["-serial", "stdio"])
        .args(["-netdev", &netdev])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&qemu_log).expect("qemu log")));
        let mut child = qemu.spawn().expect("start qemu-system-x86_64");
        let stdout = child.stdout.take().expect("qemu stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            // Raw bytes up to each newline: the guest's tty is raw, and a power cut may
            // leave half a line.
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                line.clear();
                if sender.send(text).is_err() {
                    break;
                }
            }
        });
        Guest {
            qemu: Some(child),
            lines,
            transcript: Vec::new(),
            name: config.name,
            console_log,
            qemu_log,
            relay_log,
            ended: false,
        }
    }

    /// The next result line, or None once the guest's output ended (qemu exited).
    /// Panics at `deadline`.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        if self.ended {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.transcript.push(line.clone());
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.ended = true;
                None
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "guest {} gave no result in time\n{}",
                    self.name,
                    self.report()
                )
            }
        }
    }

    /// Reads the remaining lines until the guest powers off, and returns its script's
    /// exit code (from init's "PAIRBD-GUEST-EXIT N" line).
    pub fn wait_for_exit(&mut self, deadline: Instant) -> i32 {
        while self.next_line(deadline).is_some() {}
        let code = self
            .transcript
            .iter()
            .rev()
            .find_map(|line| line.strip_prefix("PAIRBD-GUEST-EXIT "))
            .and_then(|code| code.trim().parse().ok());
        let Some(code) = code else {
            panic!(
                "guest {} ended without reporting an exit code\n{}",
                self.name,
                self.report()
            );
        };
        let limit = Instant::now() + EXIT_LIMIT;
        let qemu = self.qemu.as_mut().expect("qemu running");
        loop {
            match qemu.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(20)),
                _ => panic!("qemu did not exit after the guest powered off"),
            }
        }
        self.qemu = None;
        code
    }

    /// The power cut of the mail host: SIGKILL qemu. Returns the lines the guest had
    /// already sent (they were in the pipe).
    pub fn power_cut(&mut self) -> Vec<String> {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        let mut late = Vec::new();
        let deadline = Instant::now() + EXIT_LIMIT;
        while let Some(line) = self.next_line(deadline) {
            late.push(line);
        }
        late
    }

    /// The transcript and the end of the kernel console, for failure messages.
    pub fn report(&self) -> String {
        let console = fs::read_to_string(&self.console_log).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(60).collect();
        let qemu = fs::read_to_string(&self.qemu_log).unwrap_or_default();
        format!(
            "--- results of {} ---\n{}\n--- console (last 60 lines of {}) ---\n{}\n--- qemu stderr ---\n{qemu}",
            self.name,
            self.transcript.join("\n"),
            self.console_log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        )
    }

    /// The `stats` records of every relay that finished (one per guest connection).
    pub fn relay_stats(&self) -> Vec<serde_json::Value> {
        relay_stats(&self.relay_log)
    }

    /// Waits until every relay started so far has finished, killing the stragglers
    /// at `deadline`.
    pub fn wait_relays_finished(&self) {
        let deadline = Instant::now() + EXIT_LIMIT;
        loop {
            let running = running_relays(&self.relay_log);
            if running.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                kill_relays(&self.relay_log);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        kill_relays(&self.relay_log);
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}

/// Relays started per the log and still alive: qemu starts them detached (they are
/// not our children), so they are found by the pids they log, checked against their
/// command line so that a recycled pid is never touched.
fn running_relays(log: &Path) -> Vec<u32> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut state: HashMap<u32, bool> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        let (Some(pid), Some(_time), Some(event)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        match event {
            "start" => {
                state.insert(pid, true);
            }
            "exit" => {
                state.insert(pid, false);
            }
            _ => {}
        }
    }
    let wanted = log.display().to_string();
    state
        .into_iter()
        .filter(|&(_, running)| running)
        .map(|(pid, _)| pid)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| {
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    cmdline.contains("relay.py") && cmdline.contains(&wanted)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn kill_relays(log: &Path) {
    for pid in running_relays(log) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// The `stats` JSON of every finished relay in `log`.
pub fn relay_stats(log: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(" stats ").map(|(_, json)| json))
        .map(|json| serde_json::from_str(json).expect("relay stats are JSON"))
        .collect()
}

/// A cpio archive in the "newc" format the kernel unpacks, with an entry for every
/// parent directory of the files.
pub fn newc_archive(files: &[GuestFile]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let name_size = name.len() + 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{name_size:08X}{:08X}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let mut directories: Vec<String> = Vec::new();
    for file in files {
        let relative = file.path.trim_start_matches('/');
        let mut parent = Path::new(relative).parent();
        let mut chain = Vec::new();
        while let Some(dir) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(dir.display().to_string());
            parent = dir.parent();
        }
        for dir in chain.into_iter().rev() {
            if !directories.contains(&dir) {
                directories.push(dir);
            }
        }
    }
    let mut ino = 1;
    for dir in &directories {
        entry(&mut out, ino, dir, 0o040755, &[]);
        ino += 1;
    }
    for file in files {
        entry(
            &mut out,
            ino,
            file.path.trim_start_matches('/'),
            0o100000 | file.mode,
            &file.data,
        );
        ino += 1;
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

// ----- the messages of kernel-glue/guest/maildir.sh, recomputed on the host ---------

/// `message_length N` of maildir.sh.
pub fn message_length(number: u64) -> usize {
    (600 + (number * 7919) % 6000) as usize
}

/// The body of message `N.msg`: `yes "LINE" | head -c LENGTH`.
pub fn message_body(number: u64) -> Vec<u8> {
    let line =
        format!("pairbd drill message {number}.msg: the quick brown fox jumps over the lazy dog\n");
    line.bytes().cycle().take(message_length(number)).collect()
}

/// The number of a message name `N.msg`.
pub fn message_number(name: &str) -> Option<u64> {
    name.strip_suffix(".msg")?.parse().ok()
}

/// MD5 of `data` as lowercase hex, from the host's md5sum (coreutils).
pub fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run md5sum");
    child
        .stdin
        .take()
        .expect("md5sum stdin")
        .write_all(data)
        .expect("feed md5sum");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("md5sum stdout")
        .read_to_string(&mut out)
        .expect("read md5sum");
    assert!(child.wait().expect("wait for md5sum").success());
    out.split_whitespace().next().expect("a digest").to_string()
}

/// The configuration a mail host (the guest) uses with `pairbd attach`: the pair's
/// resource, each node reachable at its forwarded guest address.
pub fn mail_host_config(size_bytes: u64) -> String {
    let mut text = format!("[resource.mail]\nsize = {size_bytes}\n");
    for (i, node) in super::pair::NODES.iter().enumerate() {
        text.push_str(&format!(
            "\n[resource.mail.node.{node}]\nid = {}\nlisten = [\"tcp:{}:{NBD_PORT}\"]\n\
             backing = \"{node}.img\"\nreplication = \"127.0.0.1:{}\"\n\
             certificate = \"{node}.crt\"\nkey = \"{node}.key\"\ncontrol = \"{node}.ctl\"\n",
            i + 1,
            NODE_ADDRESSES[i],
            7789 + i
        ));
    }
    text
}

/// The pairbd binary without its debug information (a smaller initramfs), for the
/// guest's /usr/local/bin/pairbd.
pub fn stripped_pairbd(dir: &Path) -> Vec<u8> {
    let out = dir.join("pairbd-stripped");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(super::pairbd_binary())
        .arg(&out)
        .status()
        .expect("run objcopy (binutils)");
    assert!(status.success(), "objcopy --strip-debug failed");
    fs::read(&out).expect("read the stripped binary")
}
