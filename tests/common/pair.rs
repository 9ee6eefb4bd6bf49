//! A replicated pair of real `pairbd daemon` processes for the integration
//! tests: certificates from `pairbd gen-cert`, a configuration file, metadata
//! from `pairbd create-md`, both daemons on loopback and Unix sockets in the
//! test's directory, and the CLI (`status --json`, `promote`) to drive them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{pairbd_binary, run_ok, Daemon, TestDir};

pub const NODES: [&str; 2] = ["alpha", "beta"];

/// How long a pair may take to reach a state a test waits for.
pub const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// The files of a configured pair.
pub struct PairFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub size_bytes: u64,
    pub replication: [String; 2],
}

/// A free UDP port on loopback (the kernel picks it; the socket is closed at
/// once, so another process could take it, which is unlikely in a test run).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// Writes certificates, the configuration and both nodes' metadata.
/// `resource_extra` is appended to the `[resource.mail]` table.
pub fn setup(dir: &TestDir, size_bytes: u64, resource_extra: &str) -> PairFiles {
    setup_with(dir, size_bytes, resource_extra, &["", ""])
}

/// Like [`setup`], with extra keys for each node's table (keys given here
/// replace the defaults, e.g. `backing` or `meta`).
pub fn setup_with(
    dir: &TestDir,
    size_bytes: u64,
    resource_extra: &str,
    node_extra: &[&str; 2],
) -> PairFiles {
    let certs = dir.join("certs");
    for node in NODES {
        run_ok(Command::new(pairbd_binary()).args([
            "gen-cert",
            "--node",
            node,
            "--out",
            &certs.display().to_string(),
        ]));
    }
    let replication = [
        format!("127.0.0.1:{}", free_udp_port()),
        format!("127.0.0.1:{}", free_udp_port()),
    ];
    let files = PairFiles {
        dir: dir.path().to_path_buf(),
        config: dir.join("pairbd.toml"),
        size_bytes,
        replication,
    };
    files.write_config(resource_extra, node_extra);
    for node in NODES {
        run_ok(Command::new(pairbd_binary()).args([
            "create-md",
            "--config",
            &files.config.display().to_string(),
            "--node",
            node,
            "mail",
        ]));
    }
    files
}

impl PairFiles {
    /// (Re)writes the configuration; `node_extra[i]` is appended to node i's table.
    pub fn write_config(&self, resource_extra: &str, node_extra: &[&str; 2]) {
        let mut text = format!(
            "[resource.mail]\nsize = {}\nping-timeout = \"1s\"\nack-timeout = \"5s\"\n{resource_extra}\n",
            self.size_bytes
        );
        for (i, node) in NODES.iter().enumerate() {
            let has = |key: &str| {
                node_extra[i]
                    .lines()
                    .any(|l| l.trim_start().starts_with(key))
            };
            text.push_str(&format!(
                "\n[resource.mail.node.{node}]\nid = {}\n\
                 listen = [\"unix:{node}.sock\"]\ncontrol = \"{node}.ctl\"\n",
                i + 1,
            ));
            if !has("replication") {
                text.push_str(&format!("replication = \"{}\"\n", self.replication[i]));
            }
            if !has("backing") {
                text.push_str(&format!("backing = \"{node}.img\"\n"));
            }
            if !has("certificate") {
                text.push_str(&format!("certificate = \"certs/{node}.crt\"\n"));
            }
            if !has("key") {
                text.push_str(&format!("key = \"certs/{node}.key\"\n"));
            }
            text.push_str(node_extra[i]);
            text.push('\n');
        }
        std::fs::write(&self.config, text).expect("write the configuration");
    }

    pub fn backing(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.img"))
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.sock"))
    }

    pub fn uri(&self, node: &str) -> String {
        format!("nbd+unix:///mail?socket={}", self.socket(node).display())
    }

    /// Starts `pairbd daemon` for `node` and waits for its ready line.
    pub fn start(&self, node: &str) -> Daemon {
        self.start_env(node, &[])
    }

    /// Like [`PairFiles::start`], with extra environment variables.
    pub fn start_env(&self, node: &str, env: &[(&str, &str)]) -> Daemon {
        let args: Vec<String> = [
            "daemon",
            "--config",
            &self.config.display().to_string(),
            "--node",
            node,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Daemon::spawn_logged_env(
            &args,
            self.socket(node),
            self.backing(node),
            self.dir.join(format!("{node}.log")),
            env,
        )
    }

    /// Runs `pairbd --config F --node N ARGS...`.
    pub fn cli(&self, node: &str, args: &[&str]) -> Output {
        Command::new(pairbd_binary())
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(node)
            .args(args)
            .output()
            .expect("run pairbd")
    }

    /// `pairbd status --json` of `node`.
    pub fn status(&self, node: &str) -> serde_json::Value {
        let out = self.cli(node, &["status", "--json"]);
        assert!(
            out.status.success(),
            "pairbd status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Polls `node`'s status until `pred` holds; panics with the last status
    /// after [`WAIT_LIMIT`]. Returns the status and how long it took.
    pub fn wait_for(
        &self,
        node: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Duration) {
        let start = Instant::now();
        loop {
            let s = self.status(node);
            if pred(&s) {
                return (s, start.elapsed());
            }
            if start.elapsed() > WAIT_LIMIT {
                panic!("{node} never reached {what}; last status: {s:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both nodes are connected and both disks UpToDate.
    pub fn wait_in_sync(&self) {
        for node in NODES {
            self.wait_for(node, "Connected/UpToDate on both sides", |s| {
                s["connection"] == "Connected"
                    && s["disk"] == "UpToDate"
                    && s["peer"]["disk"] == "UpToDate"
                    && s["sync"].is_null()
            });
        }
    }

    /// `pairbd promote [--force]` on `node`; panics if refused.
    pub fn promote(&self, node: &str, force: bool) {
        let mut args = vec!["promote"];
        if force {
            args.push("--force");
        }
        // The one refusal that asks to be retried: the link is in its
        // handshake (a daemon just started). Polled like `wait_for`.
        let start = Instant::now();
        let mut out = self.cli(node, &args);
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("being set up")
            && start.elapsed() < WAIT_LIMIT
        {
            std::thread::sleep(Duration::from_millis(50));
            out = self.cli(node, &args);
        }
        assert!(
            out.status.success(),
            "promote {node} refused: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Compares the data areas of both backing files byte for byte (the
    /// metadata after them legitimately differs).
    pub fn assert_data_equal(&self) {
        assert_files_equal(
            &self.backing("alpha"),
            &self.backing("beta"),
            self.size_bytes,
        );
    }
}

/// Compares the first `len` bytes of two files, naming the first difference.
pub fn assert_files_equal(a: &Path, b: &Path, len: u64) {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).expect("open a");
    let mut fb = std::fs::File::open(b).expect("open b");
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let n = ((len - offset) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                offset + i as u64
            );
        }
        offset += n as u64;
    }
}
