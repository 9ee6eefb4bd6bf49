//! Partitions of a real network: each daemon runs in a network namespace of
//! its own, joined by a veth pair; nftables rules inside a namespace cut the
//! link. (NBD clients reach the daemons over Unix sockets in the test
//! directory, which namespaces do not hide.)
//!
//! 1. A partition while the primary writes, then a heal: the peer is
//!    resynced and the data areas end equal.
//! 2. A partition during which the operator promotes the secondary and both
//!    sides write: on heal both nodes report split brain, stay StandAlone,
//!    and neither node's data changes.

mod common;

use std::io::Read;
use std::process::Command;

use common::pair::{self, PairFiles};
use common::{require_tool, run_ok, Daemon, TestDir, NETNS_ENV};

const SIZE: u64 = 16 << 20;

/// Two namespaces and a veth pair between them; removed on drop.
struct Net {
    ns: [String; 2],
}

impl Net {
    fn new(tag: &str) -> Net {
        let id = std::process::id();
        let ns = [format!("pbd-{tag}-a-{id}"), format!("pbd-{tag}-b-{id}")];
        let net = Net { ns };
        let [a, b] = &net.ns;
        for n in &net.ns {
            run_ok(Command::new("ip").args(["netns", "add", n]));
            run_ok(Command::new("ip").args(["-n", n, "link", "set", "lo", "up"]));
        }
        run_ok(Command::new("ip").args([
            "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "vb", "netns", b,
        ]));
        for (n, dev, addr) in [(a, "va", "10.77.0.1/24"), (b, "vb", "10.77.0.2/24")] {
            run_ok(Command::new("ip").args(["-n", n, "addr", "add", addr, "dev", dev]));
            run_ok(Command::new("ip").args(["-n", n, "link", "set", dev, "up"]));
        }
        net
    }

    /// Drops everything to and from the peer inside namespace `i`.
    fn cut(&self, i: usize) {
        let peer = if i == 0 { "10.77.0.2" } else { "10.77.0.1" };
        let rules = format!(
            "table inet pbdcut {{\n chain input {{ type filter hook input priority 0; policy accept; ip saddr {peer} drop; }}\n chain output {{ type filter hook output priority 0; policy accept; ip daddr {peer} drop; }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{}.nft", self.ns[i]));
        std::fs::write(&path, rules).unwrap();
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.ns[i], "nft", "-f"])
                .arg(&path),
        );
    }

    fn heal(&self, i: usize) {
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns[i],
            "nft",
            "delete",
            "table",
            "inet",
            "pbdcut",
        ]));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn start(files: &PairFiles, net: &Net, node: &str) -> Daemon {
    let ns = if node == "alpha" {
        &net.ns[0]
    } else {
        &net.ns[1]
    };
    files.start_env(node, &[(NETNS_ENV, ns.as_str())])
}

fn setup(dir: &TestDir) -> PairFiles {
    let files = pair::setup(dir, SIZE, "");
    files.write_config(
        "",
        &[
            "replication = \"10.77.0.1:7789\"",
            "replication = \"10.77.0.2:7789\"",
        ],
    );
    files
}

fn qemu_io(files: &PairFiles, node: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(files.uri(node));
    let out = run_ok(&mut c);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
}

fn digest(files: &PairFiles, node: &str) -> u64 {
    let mut f = std::fs::File::open(files.backing(node)).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    f.read_exact(&mut buf).unwrap();
    buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn preconditions() {
    require_tool("ip");
    require_tool("nft");
    require_tool("qemu-io");
}

#[test]
fn a_partition_then_a_heal_resyncs_the_peer() {
    preconditions();
    let _lock = common::exclusive_lock();
    let dir = TestDir::new("netns-heal");
    let net = Net::new("heal");
    let files = setup(&dir);
    let a = start(&files, &net, "alpha");
    let b = start(&files, &net, "beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    qemu_io(&files, "alpha", &["write -P 0x41 0 1M", "flush"]);
    net.cut(0);
    files.wait_for("alpha", "the partition noticed", |s| {
        s["connection"] != "Connected"
    });
    files.wait_for("beta", "the partition noticed", |s| {
        s["connection"] != "Connected"
    });
    // The primary carries on alone and records that the peer needs a sync.
    qemu_io(&files, "alpha", &["write -P 0x42 2M 1M", "flush"]);
    assert_eq!(files.status("alpha")["peer_sync_needed"], true);
    assert_eq!(files.status("beta")["role"], "Secondary");
    net.heal(0);
    files.wait_in_sync();
    assert!(a.stop().success());
    assert!(b.stop().success());
    files.assert_data_equal();
}

#[test]
fn writes_on_both_sides_of_a_partition_are_a_split_brain_that_changes_no_data() {
    preconditions();
    let _lock = common::exclusive_lock();
    let dir = TestDir::new("netns-split");
    let net = Net::new("split");
    let files = setup(&dir);
    let _a = start(&files, &net, "alpha");
    let _b = start(&files, &net, "beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    net.cut(1);
    files.wait_for("beta", "the partition noticed", |s| {
        s["connection"] != "Connected"
    });
    // The operator promotes beta (it saw its primary vanish: no --force).
    files.promote("beta", false);
    qemu_io(&files, "alpha", &["write -P 0x61 0 64k", "flush"]);
    qemu_io(&files, "beta", &["write -P 0x62 1M 64k", "flush"]);
    let before = [digest(&files, "alpha"), digest(&files, "beta")];
    net.heal(1);
    for node in ["alpha", "beta"] {
        let (s, _) = files.wait_for(node, "StandAlone", |s| s["connection"] == "StandAlone");
        let why = s["last_disconnect"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(why.contains("split brain"), "{node}: {why}");
    }
    assert_eq!([digest(&files, "alpha"), digest(&files, "beta")], before);
}
