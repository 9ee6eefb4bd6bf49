//! The kernel glue on a real Linux kernel: a Debian kernel under qemu (tests/common/guest.rs,
//! kernel-glue/guest/) is the mail host, attached to a replicated pair of real
//! `pairbd daemon`s with the kernel's NBD client.
//!
//! - Attach: `nbd-client -b 4096 -C 2` (two connections, each a fresh server connection
//!   through its own relay), mkfs.xfs (which discards the whole device), Maildir
//!   deliveries with fsync (XFS's log writes carry FUA), unmount, `xfs_repair -n`, detach;
//!   then a second attach with `pairbd attach` (over netlink, with its supervisor;
//!   fresh connections again, /dev/pairbd/mail), idle for a while, one more delivery, every message checked, `pairbd detach`; then
//!   the documented /etc/nbdtab line. The relays count the NBD requests: TRIM,
//!   FLUSH and FUA reached pairbd; after both daemons stop cleanly the nodes' data areas
//!   are equal, and the secondary's backing file lost its blocks to the discards.
//! - The failover drill with a power cut of the mail host: the guest delivers messages
//!   and prints each acknowledged one and each step of a delivery; at a point a seeded
//!   RNG picks (a number of acknowledgements seen, then a step of the next delivery:
//!   writing and fsyncing the file, renaming it, fsyncing the directory), the host
//!   SIGKILLs qemu (the mail host's page cache is gone)
//!   and the Primary daemon, promotes the Secondary without --force, restarts the killed
//!   node (it returns Secondary and is synced), and boots the guest again, attached with
//!   `pairbd attach` to the new Primary: XFS replays its log, every acknowledged message
//!   is there with its checksum, every message present is complete, `xfs_repair -n` is
//!   clean. `PAIRBD_GUEST_SEED` replays a run, `PAIRBD_GUEST_ROUNDS` (default 5) sets
//!   the number of power cuts.
//!
//! - A power cut of the whole site: the mail host, the Primary (for good) and the
//!   Secondary, whose store (PAIRBD_TEST_VOLATILE_STORE) loses, keeps or tears what was
//!   not flushed. The Secondary refuses to promote itself without --force, and once forced
//!   holds every acknowledged message: FLUSH and FUA were honoured on its disk.
//! - `pairbd attach` on a node itself (no guest): its plan (`--dry-run`: netlink by
//!   default), and the nbd-client commands of its fallback, which negotiate with the
//!   real daemons over their Unix sockets.
//!
//! The guest runs under TCG (no KVM): a boot takes seconds, so volumes are the smallest
//! mkfs.xfs accepts and messages are small. Durations are printed for whoever tunes the
//! tests; nothing asserts on them.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::guest::{
    guest_image, mail_host_config, md5_hex, message_body, message_number, stripped_pairbd, Guest,
    GuestConfig, GuestFile, NBD_PORT, NODE_ADDRESSES,
};
use common::pair::{self, PairFiles, NODES};
use common::{Daemon, TestDir};

/// The volume: mkfs.xfs refuses less than 300 MB.
const SIZE: u64 = 320 << 20;

/// How long one boot of the guest may take, script included (TCG on two shared cores).
const BOOT_LIMIT: Duration = Duration::from_secs(600);

const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;

/// Messages delivered in the attach test's first attach (one more follows the idle
/// period of the second).
const ATTACH_MESSAGES: u64 = 40;

/// How long the attach test leaves its second attachment idle before using it again.
const IDLE_SECONDS: u64 = 25;

/// A drill round's power cut comes after this many acknowledged messages (inclusive)...
const KILL_AFTER_MIN: u64 = 3;
const KILL_AFTER_MAX: u64 = 40;
/// ... at this step of the next delivery (maildir.sh's STEP lines), or right at the
/// acknowledgement.
const KILL_STEPS: [&str; 4] = ["ack", "write", "rename", "dirsync"];
/// Message numbers reserved per round (more than any round delivers before its cut).
const NUMBERS_PER_ROUND: u64 = 1000;

const DRILL_ROUNDS_DEFAULT: u64 = 5;

// ----- helpers ----------------------------------------------------------------------

/// xorshift64* seeded through splitmix64: the drill's kill points.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Both nodes, each at its guest address.
fn forwards(files: &PairFiles) -> Vec<(String, PathBuf)> {
    NODES
        .iter()
        .zip(NODE_ADDRESSES)
        .map(|(node, address)| (address.to_string(), files.socket(node)))
        .collect()
}

/// The files every boot needs besides the script: the pairbd binary and the mail
/// host's configuration (each node at its guest address).
fn mail_host_files(dir: &TestDir) -> Vec<GuestFile> {
    vec![
        GuestFile::new("/usr/local/bin/pairbd", stripped_pairbd(dir.path()), 0o755),
        GuestFile::new("/etc/pairbd/pairbd.toml", mail_host_config(SIZE), 0o644),
    ]
}

fn boot(dir: &TestDir, files: &PairFiles, name: &str, script: String) -> Guest {
    Guest::boot(
        dir.path(),
        GuestConfig {
            name: name.to_string(),
            script,
            files: mail_host_files(dir),
            forwards: forwards(files),
            cpus: CPUS,
            memory_mib: MEMORY_MIB,
        },
    )
}

/// Bytes a file occupies on disk.
fn allocated_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Old contents on both disks (a non-zero pattern over each data area, metadata
/// untouched), so that the discards of mkfs.xfs show as holes afterwards.
fn fill_data_areas(files: &PairFiles) {
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    for node in NODES {
        let file = OpenOptions::new()
            .write(true)
            .open(files.backing(node))
            .expect("open the backing file");
        let mut offset = 0;
        while offset < files.size_bytes {
            let n = (files.size_bytes - offset).min(chunk.len() as u64) as usize;
            file.write_all_at(&chunk[..n], offset).expect("fill");
            offset += n as u64;
        }
        file.sync_all().expect("sync the backing file");
    }
}

/// The value of `key=` in a line of `key=value` words.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn lines_with<'a>(transcript: &'a [String], prefix: &'a str) -> impl Iterator<Item = &'a str> {
    transcript
        .iter()
        .filter_map(move |line| line.strip_prefix(prefix))
}

/// Expected MD5s of messages, by number, computed once each.
#[derive(Default)]
struct Checksums(HashMap<u64, String>);

impl Checksums {
    fn of(&mut self, name: &str) -> &str {
        let number =
            message_number(name).unwrap_or_else(|| panic!("{name:?} is not a message name"));
        self.0
            .entry(number)
            .or_insert_with(|| md5_hex(&message_body(number)))
    }
}

/// Checks a report of the Maildir (`HAVE NAME MD5` lines): every acknowledged message
/// is there with its checksum, and every message there is complete (it was renamed
/// into new/ only after its fsync returned). Returns how many were never acknowledged.
fn check_maildir(
    have: &BTreeMap<String, String>,
    acked: &BTreeMap<String, String>,
    checksums: &mut Checksums,
    context: &str,
) -> usize {
    for (name, sum) in acked {
        match have.get(name) {
            None => panic!("{context}: acknowledged message {name} is missing"),
            Some(found) => assert_eq!(
                found, sum,
                "{context}: acknowledged message {name} has the wrong checksum"
            ),
        }
    }
    let mut unacknowledged = 0;
    for (name, sum) in have {
        assert_eq!(
            sum,
            checksums.of(name),
            "{context}: message {name} in new/ is not the message delivered (torn or stale)"
        );
        if !acked.contains_key(name) {
            unacknowledged += 1;
        }
    }
    unacknowledged
}

// ----- attach -----------------------------------------------------------------------

fn attach_script() -> String {
    let alpha = NODE_ADDRESSES[0];
    let late = ATTACH_MESSAGES + 1;
    format!(
        r#". /guest/maildir.sh
dev=/dev/nbd0
# 1. The kernel client by hand, with the options pairbd attach uses.
nbd-client {alpha} {NBD_PORT} $dev -N mail -b 4096 -C 2 -t 60 >/tmp/nbd-client.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/nbd-client.log >&3; fail "nbd-client"; }}
q=/sys/block/nbd0/queue
say "QUEUE logical_block_size=$(cat $q/logical_block_size) fua=$(cat $q/fua) write_cache=$(tr ' ' _ <$q/write_cache) discard_max_bytes=$(cat $q/discard_max_bytes)"
mkfs.xfs -f -q $dev || fail "mkfs.xfs"
mount $dev /mnt || fail "mount"
maildir_create /mnt/maildir
deliver_range /mnt/maildir 1 {ATTACH_MESSAGES}
umount /mnt || fail "umount"
repair_check $dev
nbd-client -d $dev >/dev/null 2>&1 || fail "nbd-client -d"
[ -e /sys/block/nbd0/pid ] && fail "nbd0 is still connected after nbd-client -d"
say "DETACHED"
# 2. A second attach after the detach, by pairbd attach: fresh connections again.
pairbd --config /etc/pairbd/pairbd.toml attach mail >/tmp/attach.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/attach.log >&3; fail "pairbd attach"; }}
say "ATTACHED $(cat /tmp/attach.log)"
say "LINK $(readlink /dev/pairbd/mail)"
if pairbd --config /etc/pairbd/pairbd.toml attach mail >/tmp/again.log 2>&1; then
  fail "a second pairbd attach of an attached resource succeeded"
fi
say "AGAIN $(cat /tmp/again.log)"
mount /dev/pairbd/mail /mnt || fail "mount /dev/pairbd/mail"
# An idle period (not a synchronisation): the connections must outlive it (socat as a
# per-connection relay lost its connection after ~18 s).
sleep {IDLE_SECONDS}
deliver /mnt/maildir {late}
maildir_report /mnt/maildir
umount /mnt || fail "umount /dev/pairbd/mail"
repair_check /dev/pairbd/mail
pairbd --config /etc/pairbd/pairbd.toml detach mail >/tmp/detach.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/detach.log >&3; fail "pairbd detach"; }}
say "DETACH $(cat /tmp/detach.log)"
[ -e /dev/pairbd/mail ] && fail "/dev/pairbd/mail is still there after pairbd detach"
[ -e /sys/block/nbd0/pid ] && fail "nbd0 is still connected after pairbd detach"
# 3. The /etc/nbdtab line of docs/OPERATIONS.md.
echo "nbd0 {alpha} mail port={NBD_PORT},bs=4096,conns=2,timeout=30" >/etc/nbdtab
nbd-client nbd0 >/tmp/nbdtab.log 2>&1 ||
  {{ sed 's/^/LOG /' /tmp/nbdtab.log >&3; fail "nbd-client nbd0 (nbdtab)"; }}
[ -e /sys/block/nbd0/pid ] || fail "nbd-client nbd0 did not connect nbd0"
mount /dev/nbd0 /mnt || fail "mount (nbdtab)"
say "NBDTAB logical_block_size=$(cat $q/logical_block_size) messages=$(ls /mnt/maildir/new | wc -l)"
umount /mnt || fail "umount (nbdtab)"
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d (nbdtab)"
# 4. The Unix-socket form pairbd attach uses on a node itself is accepted (there is no
#    server at this path: the connection must fail, not the argument parsing).
nbd-client -u /run/no-such.sock /dev/nbd1 -N mail -b 4096 -C 2 -t 30 >/tmp/unix.log 2>&1 &&
  fail "nbd-client -u to a missing socket succeeded"
say "UNIX $(tr '\n' ' ' </tmp/unix.log)"
say "DONE"
"#
    )
}

#[test]
fn the_kernel_client_attaches_with_two_connections_and_trim_and_fua_reach_both_nodes() {
    let image = guest_image();
    eprintln!("guest image {}:\n{}", image.dir.display(), image.manifest);
    let dir = TestDir::new("guest-attach");
    let files = pair::setup(&dir, SIZE, "");
    fill_data_areas(&files);
    let alpha = files.start("alpha");
    let beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let beta_before = allocated_bytes(&files.backing("beta"));
    assert!(
        beta_before >= SIZE,
        "the secondary's data area should be allocated before mkfs ({beta_before} bytes)"
    );

    let mut guest = boot(&dir, &files, "attach", attach_script());
    let code = guest.wait_for_exit(Instant::now() + BOOT_LIMIT);
    let transcript = guest.transcript.clone();
    let report = guest.report();
    assert_eq!(code, 0, "the guest script failed\n{report}");
    assert!(
        !transcript.iter().any(|l| l.starts_with("FAIL")),
        "{report}"
    );

    // The kernel took pairbd's export as advertised: 4096-byte blocks, a volatile
    // write cache with FUA (so XFS sends FLUSH and FUA), and discards.
    let queue = lines_with(&transcript, "QUEUE ")
        .next()
        .expect("QUEUE line");
    assert_eq!(field(queue, "logical_block_size"), "4096", "{queue}");
    assert_eq!(field(queue, "fua"), "1", "{queue}");
    assert_eq!(field(queue, "write_cache"), "write_back", "{queue}");
    assert_ne!(field(queue, "discard_max_bytes"), "0", "{queue}");

    for repair in lines_with(&transcript, "REPAIR ") {
        assert_eq!(repair, "0", "xfs_repair -n found problems\n{report}");
    }
    assert_eq!(lines_with(&transcript, "REPAIR ").count(), 2, "{report}");

    let acked: BTreeMap<String, String> = lines_with(&transcript, "ACK ")
        .map(|rest| {
            let (name, sum) = rest.split_once(' ').expect("ACK NAME MD5");
            (name.to_string(), sum.to_string())
        })
        .collect();
    assert_eq!(acked.len() as u64, ATTACH_MESSAGES + 1, "{report}");
    let have: BTreeMap<String, String> = lines_with(&transcript, "HAVE ")
        .map(|rest| {
            let (name, sum) = rest.split_once(' ').expect("HAVE NAME MD5");
            (name.to_string(), sum.to_string())
        })
        .collect();
    let mut checksums = Checksums::default();
    let extra = check_maildir(&have, &acked, &mut checksums, "after re-attaching");
    assert_eq!(extra, 0, "messages nobody delivered are in new/");

    // pairbd attach named the device, refused a second attach, and detach undid it.
    let attached = lines_with(&transcript, "ATTACHED ")
        .next()
        .expect("ATTACHED");
    assert!(
        attached.contains("/dev/pairbd/mail -> /dev/nbd0") && attached.contains("node alpha"),
        "{attached}"
    );
    assert_eq!(lines_with(&transcript, "LINK ").next(), Some("/dev/nbd0"));
    let again = lines_with(&transcript, "AGAIN ").next().expect("AGAIN");
    assert!(again.contains("already attached as /dev/nbd0"), "{again}");
    let nbdtab = lines_with(&transcript, "NBDTAB ").next().expect("NBDTAB");
    assert_eq!(field(nbdtab, "logical_block_size"), "4096", "{nbdtab}");
    assert_eq!(
        field(nbdtab, "messages"),
        (ATTACH_MESSAGES + 1).to_string(),
        "{nbdtab}"
    );
    let unix = lines_with(&transcript, "UNIX ").next().expect("UNIX");
    // nbd-client's message for a Unix socket it cannot connect to (a host name it
    // cannot resolve, or a usage error, reads differently).
    assert!(
        unix.contains("CONNECT failed"),
        "nbd-client -u PATH DEVICE was not understood: {unix}"
    );

    // Every guest connection reached a fresh server connection: two per attach, each
    // with its own handshake, each ended by the client's disconnect request.
    guest.wait_relays_finished();
    let stats = guest.relay_stats();
    drop(guest);
    let to_alpha: Vec<&serde_json::Value> = stats
        .iter()
        .filter(|s| s["socket"] == files.socket("alpha").display().to_string())
        .collect();
    assert_eq!(to_alpha.len(), 6, "three attaches with -C 2: {stats:#?}");
    assert!(
        stats.len() == 6,
        "no connection should have gone to beta (alpha accepted): {stats:#?}"
    );
    for s in &to_alpha {
        assert_eq!(s["options"].as_u64().map(|n| n >= 1), Some(true), "{s}");
        assert_eq!(s["requests"]["DISC"], 1, "{s}");
        assert!(s.get("parse").is_none(), "{s}");
    }
    let total = |key: &str| -> u64 {
        to_alpha
            .iter()
            .map(|s| s["requests"][key].as_u64().unwrap_or(0))
            .sum()
    };
    let fua: u64 = to_alpha
        .iter()
        .map(|s| s["fua"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "requests over 6 connections: WRITE {} READ {} FLUSH {} TRIM {} WRITE_ZEROES {} FUA {fua}",
        total("WRITE"),
        total("READ"),
        total("FLUSH"),
        total("TRIM"),
        total("WRITE_ZEROES")
    );
    let busy = to_alpha
        .iter()
        .filter(|s| s["requests"]["WRITE"].as_u64().unwrap_or(0) > 0)
        .count();
    eprintln!("connections that carried writes: {busy} of 6");
    assert!(total("TRIM") >= 1, "mkfs.xfs sent no discard: {stats:#?}");
    assert!(total("FLUSH") >= 1, "no FLUSH reached pairbd: {stats:#?}");
    assert!(fua >= 1, "no FUA write reached pairbd: {stats:#?}");
    let attaches = alpha.log_text().matches("client attached").count();
    assert_eq!(attaches, 6, "alpha's log should show 6 NBD clients");

    // Both nodes hold the same data; the discards reached the secondary's disk.
    let status = files.status("alpha");
    assert_eq!(
        status["clients"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
    files.assert_data_equal();
    let beta_after = allocated_bytes(&files.backing("beta"));
    eprintln!(
        "secondary's backing file: {beta_before} bytes allocated before mkfs, {beta_after} after"
    );
    assert!(
        beta_after < SIZE / 2,
        "the discards of mkfs.xfs did not free the secondary's blocks ({beta_after} bytes allocated)"
    );
}

// ----- pairbd attach on a node itself (no guest) ----------------------------------------

/// On a host that is a node itself, `pairbd attach` dials the Unix sockets, the local
/// node first, then the other; the commands it would run (`--dry-run`) negotiate with
/// the real daemons: two connections to the Primary, a refusal from the Secondary.
/// This machine's kernel has no nbd module, so nbd-client stops after the handshake
/// (and `pairbd attach` itself says so before trying); the guest tests above attach
/// for real.
#[test]
fn pairbd_attach_names_the_nbd_client_commands_and_they_reach_the_primary() {
    common::require_tool("nbd-client");
    let dir = TestDir::new("attach-commands");
    let files = pair::setup(&dir, 16 << 20, "");
    let alpha = files.start("alpha");
    let _beta = files.start("beta");
    files.promote("alpha", true);
    files.wait_in_sync();
    let pairbd = |args: &[&str]| {
        std::process::Command::new(common::pairbd_binary())
            .arg("--config")
            .arg(&files.config)
            .args(args)
            .output()
            .expect("run pairbd")
    };
    // The default: the kernel's netlink interface with a supervisor.
    let out = pairbd(&["attach", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let plan = text.lines().next().unwrap_or_default();
    assert!(
        plan.starts_with("netlink NBD_CMD_CONNECT /dev/nbdN: 2 connection(s)")
            && plan.contains("dead-connection timeout 120s")
            && plan.find("alpha (unix:") < plan.find("beta (unix:"),
        "{text}"
    );
    // The fallback: nbd-client.
    let out = pairbd(&["attach", "--nbd-client", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let command = |node: &str| {
        format!(
            "nbd-client -u {} /dev/nbdN -N mail -b 4096 -C 2 -t 30",
            files.socket(node).display()
        )
    };
    assert_eq!(
        lines,
        [
            command("alpha").as_str(),
            command("beta").as_str(),
            "ln -sfn /dev/nbdN /dev/pairbd/mail"
        ],
        "{text}"
    );
    let out = pairbd(&[
        "--node",
        "beta",
        "attach",
        "--device",
        "/dev/nbd3",
        "--timeout",
        "5",
        "--nbd-client",
        "--dry-run",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some(
            format!(
                "nbd-client -u {} /dev/nbd3 -N mail -b 4096 -C 2 -t 5",
                files.socket("beta").display()
            )
            .as_str()
        )
    );
    let out = pairbd(&["detach"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not attached on this host"),
        "{out:?}"
    );

    if std::path::Path::new("/sys/module/nbd").exists() {
        eprintln!(
            "this kernel has the nbd module: not running nbd-client against the daemons here"
        );
        return;
    }
    let out = pairbd(&["attach"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no nbd module"),
        "{out:?}"
    );
    // The commands themselves: nbd-client negotiates before it needs the kernel.
    let run = |node: &str| {
        let argv: Vec<String> = command(node)
            .replace("/dev/nbdN", "/dev/nbd0")
            .split(' ')
            .skip(1)
            .map(str::to_string)
            .collect();
        let out = std::process::Command::new("nbd-client")
            .args(&argv)
            .output()
            .expect("run nbd-client");
        assert!(!out.status.success(), "no kernel nbd here: {out:?}");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let to_primary = run("alpha");
    assert_eq!(
        to_primary.matches("Negotiation: ..size = 16MB").count(),
        2,
        "two connections should negotiate with the Primary: {to_primary}"
    );
    let to_secondary = run("beta");
    eprintln!("nbd-client against the Secondary: {}", to_secondary.trim());
    assert!(
        !to_secondary.contains("Negotiation: ..size"),
        "the Secondary should refuse the export: {to_secondary}"
    );
    assert_eq!(alpha.log_text().matches("client attached").count(), 2);
}

// ----- the failover drill -------------------------------------------------------------

/// One boot of the drill: attach with `pairbd attach` (it finds the Primary), create the
/// filesystem on the first boot, mount (log recovery), report the Maildir, unmount,
/// `xfs_repair -n`, then mount again and deliver until the power cut (or, on the last
/// boot, detach and stop).
fn drill_script(fresh: bool, deliver: Option<(u64, u64)>) -> String {
    let mut script = String::from(
        r#". /guest/maildir.sh
pairbd --config /etc/pairbd/pairbd.toml attach mail >/tmp/attach.log 2>&1 ||
  { sed 's/^/LOG /' /tmp/attach.log >&3; fail "pairbd attach"; }
say "ATTACHED $(cat /tmp/attach.log)"
dev=/dev/pairbd/mail
"#,
    );
    if fresh {
        script.push_str("mkfs.xfs -f -q $dev || fail \"mkfs.xfs\"\n");
        script.push_str("mount $dev /mnt || fail \"mount\"\nmaildir_create /mnt/maildir\n");
    } else {
        script.push_str("mount $dev /mnt || fail \"mount after the power cut\"\n");
    }
    script.push_str(
        r#"say "RECOVERY $(recovery_count)"
maildir_report /mnt/maildir
umount /mnt || fail "umount"
repair_check $dev
"#,
    );
    match deliver {
        Some((first, last)) => script.push_str(&format!(
            "mount $dev /mnt || fail \"mount again\"\nsay DELIVERING\n\
             deliver_range /mnt/maildir {first} {last}\nsay DELIVERED-ALL\n"
        )),
        None => script.push_str(
            "pairbd --config /etc/pairbd/pairbd.toml detach mail >/dev/null 2>&1 || fail detach\n\
             say DONE\n",
        ),
    }
    script
}

/// What one boot reported.
#[derive(Default)]
struct Boot {
    attached: String,
    recoveries: u64,
    have: BTreeMap<String, String>,
    in_tmp: BTreeMap<String, String>,
    /// Messages whose fsync returned (the guest went on to rename them).
    fsynced: Vec<String>,
    new_count: usize,
    tmp_count: usize,
    repair: Option<i32>,
    acked: Vec<(String, String)>,
}

impl Boot {
    /// Takes one result line; panics on a failure the guest reported.
    fn take(&mut self, line: &str, guest: &Guest) {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (name, sum) = rest.split_once(' ').expect("ACK NAME MD5");
            self.acked.push((name.to_string(), sum.to_string()));
        } else if let Some(rest) = line.strip_prefix("HAVE ") {
            let (name, sum) = rest.split_once(' ').expect("HAVE NAME MD5");
            self.have.insert(name.to_string(), sum.to_string());
        } else if let Some(rest) = line.strip_prefix("TMP ") {
            let (name, sum) = rest.split_once(' ').expect("TMP NAME MD5");
            self.in_tmp.insert(name.to_string(), sum.to_string());
        } else if let Some(name) = line
            .strip_prefix("STEP ")
            .and_then(|step| step.strip_suffix(" rename"))
        {
            self.fsynced.push(name.to_string());
        } else if let Some(rest) = line.strip_prefix("COUNT ") {
            self.new_count = field(rest, "new").parse().expect("new=N");
            self.tmp_count = field(rest, "tmp").parse().expect("tmp=N");
        } else if let Some(rest) = line.strip_prefix("REPAIR ") {
            self.repair = Some(rest.trim().parse().expect("REPAIR RC"));
        } else if let Some(rest) = line.strip_prefix("RECOVERY ") {
            self.recoveries = rest.trim().parse().expect("RECOVERY N");
        } else if let Some(rest) = line.strip_prefix("ATTACHED ") {
            self.attached = rest.to_string();
        } else if line.starts_with("FAIL") || line == "DELIVERED-ALL" {
            panic!("guest {}: {line}\n{}", guest.name, guest.report());
        }
    }
}

/// What the drill carries from boot to boot.
#[derive(Default)]
struct Ledger {
    /// Every acknowledged message, with its MD5.
    acked: BTreeMap<String, String>,
    /// Every message whose fsync returned.
    fsynced: BTreeSet<String>,
    checksums: Checksums,
    /// Log recoveries seen at mount.
    recoveries: u64,
}

impl Ledger {
    /// Checks a boot's report of the Maildir against everything acknowledged before.
    fn check(&mut self, result: &Boot, guest: &Guest, context: &str) {
        assert_eq!(
            result.repair,
            Some(0),
            "{context}: xfs_repair -n\n{}",
            guest.report()
        );
        assert_eq!(result.have.len(), result.new_count, "{context}");
        assert_eq!(result.in_tmp.len(), result.tmp_count, "{context}");
        let extra = check_maildir(&result.have, &self.acked, &mut self.checksums, context);
        // A message left in tmp/ (its rename was lost) whose fsync returned is complete
        // all the same.
        let mut fsynced_in_tmp = 0;
        for (name, sum) in &result.in_tmp {
            if self.fsynced.contains(name) {
                fsynced_in_tmp += 1;
                assert_eq!(
                    sum,
                    self.checksums.of(name),
                    "{context}: tmp/{name} was fsynced but is not the message written"
                );
            }
        }
        self.recoveries += result.recoveries;
        eprintln!(
            "{context}: attached ({}), log recoveries {}, {} messages in new/ \
             ({} acknowledged, {extra} not), {} in tmp/ ({fsynced_in_tmp} of them fsynced)",
            result.attached,
            result.recoveries,
            result.have.len(),
            self.acked.len(),
            result.tmp_count,
        );
    }

    /// Records what a boot acknowledged and fsynced.
    fn record(&mut self, result: Boot, context: &str) {
        self.fsynced.extend(result.fsynced);
        for (name, sum) in result.acked {
            assert_eq!(&sum, self.checksums.of(&name), "{context}: ACK of {name}");
            self.acked.insert(name, sum);
        }
    }
}

/// Where a boot's power cut comes: after this many acknowledgements, at this step.
struct CutPoint {
    after_acks: u64,
    step: &'static str,
}

impl CutPoint {
    fn random(rng: &mut Rng) -> CutPoint {
        CutPoint {
            after_acks: rng.range(KILL_AFTER_MIN, KILL_AFTER_MAX),
            step: KILL_STEPS[rng.range(0, KILL_STEPS.len() as u64 - 1) as usize],
        }
    }
}

/// Reads one boot's results: checks the Maildir against `ledger` when the guest
/// reports it (and that `pairbd attach` reached `primary`), then, given a `cut`,
/// SIGKILLs qemu at that point and calls `then` (the daemons' part of the power cut),
/// or else waits for the guest's clean exit. Records the acknowledgements in `ledger`.
fn run_boot(
    mut guest: Guest,
    ledger: &mut Ledger,
    primary: &str,
    cut: Option<CutPoint>,
    context: &str,
    then: impl FnOnce(),
) {
    let booted = Instant::now();
    let deadline = booted + BOOT_LIMIT;
    let mut checked = booted;
    let mut result = Boot::default();
    let mut then = Some(then);
    while let Some(line) = guest.next_line(deadline) {
        result.take(&line, &guest);
        if line == "DELIVERING" || line == "DONE" {
            checked = Instant::now();
            ledger.check(&result, &guest, context);
            assert!(
                result.attached.contains(&format!("node {primary}")),
                "{context}: pairbd attach should reach the Primary {primary}: {}",
                result.attached
            );
        }
        let Some(point) = &cut else { continue };
        let at_step = point.step == "ack"
            || line
                .strip_prefix("STEP ")
                .is_some_and(|step| step.ends_with(&format!(" {}", point.step)));
        if result.acked.len() as u64 == point.after_acks && at_step {
            // The power cut of the mail host; the lines it had sent were in the pipe.
            for late in guest.power_cut() {
                result.take(&late, &guest);
            }
            if let Some(then) = then.take() {
                then();
            }
            break;
        }
    }
    match &cut {
        None => {
            let code = guest.wait_for_exit(deadline);
            assert_eq!(code, 0, "{context}\n{}", guest.report());
        }
        Some(point) => {
            assert!(
                then.is_none(),
                "{context}: the guest stopped before the power cut\n{}",
                guest.report()
            );
            // Durations are reported for whoever tunes the test; nothing depends on them.
            eprintln!(
                "{context}: power cut after {} acknowledged deliveries, at {} \
                 ({} seen in all); boot and check {:.1}s, deliveries {:.1}s",
                point.after_acks,
                point.step,
                result.acked.len(),
                (checked - booted).as_secs_f64(),
                checked.elapsed().as_secs_f64()
            );
        }
    }
    ledger.record(result, context);
}

/// The run's seed: `PAIRBD_GUEST_SEED`, or the clock.
fn drill_seed(what: &str) -> u64 {
    let seed = env_u64("PAIRBD_GUEST_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("{what}: seed {seed} (PAIRBD_GUEST_SEED={seed} replays it)");
    seed
}

#[test]
fn failover_drill_with_a_power_cut_of_the_mail_host() {
    let image = guest_image();
    eprintln!("guest image {}:\n{}", image.dir.display(), image.manifest);
    let seed = drill_seed("failover drill");
    let rounds = env_u64("PAIRBD_GUEST_ROUNDS").unwrap_or(DRILL_ROUNDS_DEFAULT);
    eprintln!("failover drill: {rounds} rounds");
    let mut rng = Rng::new(seed);

    let dir = TestDir::new("guest-drill");
    let files = pair::setup(&dir, SIZE, "");
    let mut daemons: [Option<Daemon>; 2] = [Some(files.start("alpha")), Some(files.start("beta"))];
    files.promote("alpha", true);
    files.wait_in_sync();

    let mut primary = 0;
    let mut ledger = Ledger::default();
    for round in 0..=rounds {
        let last_boot = round == rounds;
        let cut = CutPoint::random(&mut rng);
        let first = 1 + round * NUMBERS_PER_ROUND;
        let deliver = (!last_boot).then_some((first, first + NUMBERS_PER_ROUND - 1));
        let context = format!("seed {seed}, round {round}");
        let guest = boot(
            &dir,
            &files,
            &format!("drill-{round}"),
            drill_script(round == 0, deliver),
        );
        // The Primary dies with the mail host.
        let dead = &mut daemons[primary];
        run_boot(
            guest,
            &mut ledger,
            NODES[primary],
            (!last_boot).then_some(cut),
            &context,
            || dead.take().expect("the primary runs").kill(),
        );
        if last_boot {
            break;
        }

        // Failover: the survivor is promoted without --force; the dead node returns as
        // Secondary, learns that the survivor moved on, and is synced.
        let survivor = 1 - primary;
        let failover = Instant::now();
        files.promote(NODES[survivor], false);
        daemons[primary] = Some(files.start(NODES[primary]));
        files.wait_in_sync();
        eprintln!(
            "{context}: {} promoted, {} back and synced in {:.1}s",
            NODES[survivor],
            NODES[primary],
            failover.elapsed().as_secs_f64()
        );
        let status = files.status(NODES[primary]);
        assert_eq!(status["role"], "Secondary", "{context}: {status}");
        primary = survivor;
    }
    assert!(
        rounds == 0 || ledger.recoveries >= 1,
        "XFS never replayed its log after a power cut (seed {seed})"
    );
    for daemon in daemons.iter_mut() {
        assert!(daemon.take().expect("daemon").stop().success());
    }
    files.assert_data_equal();
}

/// The test-only power cut of a daemon's store (PAIRBD_TEST_VOLATILE_STORE): writes
/// not yet flushed are lost, kept or torn by `seed`, and the process ends at once.
fn power_cut_store(files: &PairFiles, node: &str, seed: u64, mut daemon: Daemon) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut control =
        std::os::unix::net::UnixStream::connect(files.dir.join(format!("{node}.ctl")))
            .expect("connect to the control socket");
    writeln!(control, "{{\"command\": \"power-cut\", \"seed\": {seed}}}").expect("send");
    let mut answer = String::new();
    BufReader::new(&control)
        .read_line(&mut answer)
        .expect("the power-cut answer");
    assert!(answer.contains("\"power_cut\":true"), "{node}: {answer}");
    let deadline = Instant::now() + pair::WAIT_LIMIT;
    while daemon.is_running() {
        assert!(
            Instant::now() < deadline,
            "{node} kept running after its power cut"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    answer
}

/// The whole site loses power in the middle of deliveries: the mail host, the Primary
/// (it never returns) and the Secondary, whose store loses (or keeps, or tears) every
/// write not yet flushed. The Secondary alone cannot know whether the Primary moved on,
/// so it refuses promotion until forced; then every acknowledged message must be on
/// it: the kernel's FLUSH and FUA were honoured on the Secondary's disk before the
/// mail host was told its fsync was done.
#[test]
fn a_power_cut_of_the_whole_site_loses_no_acknowledged_message() {
    guest_image();
    let seed = drill_seed("site power cut");
    let mut rng = Rng::new(seed);
    let dir = TestDir::new("guest-site-cut");
    let files = pair::setup(&dir, SIZE, "");
    let alpha = files.start("alpha");
    let beta = files.start_env("beta", &[("PAIRBD_TEST_VOLATILE_STORE", "1")]);
    files.promote("alpha", true);
    files.wait_in_sync();

    let mut ledger = Ledger::default();
    let context = format!("seed {seed}, site power cut");
    let guest = boot(
        &dir,
        &files,
        "site-1",
        drill_script(true, Some((1, NUMBERS_PER_ROUND))),
    );
    let mut lost = String::new();
    run_boot(
        guest,
        &mut ledger,
        "alpha",
        Some(CutPoint::random(&mut rng)),
        &context,
        || {
            lost = power_cut_store(&files, "beta", seed, beta);
            alpha.kill();
        },
    );
    eprintln!(
        "{context}: the Secondary's store at the cut: {}",
        lost.trim()
    );

    let beta = files.start("beta");
    let refused = files.cli("beta", &["promote"]);
    assert!(
        !refused.status.success(),
        "{context}: a node restarted alone must not promote itself without --force"
    );
    let reason = String::from_utf8_lossy(&refused.stderr);
    assert!(reason.contains("without its peer"), "{context}: {reason}");
    files.promote("beta", true);
    let guest = boot(&dir, &files, "site-2", drill_script(false, None));
    run_boot(
        guest,
        &mut ledger,
        "beta",
        None,
        &format!("{context}, on beta"),
        || {},
    );
    assert!(beta.stop().success());
}
