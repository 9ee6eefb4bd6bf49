//! The configuration: a good file, and each kind of mistake named by line and key.

use std::path::Path;
use std::time::Duration;

use pairbd_config::{
    AfterCrash, Config, ConfigError, Engine, ListenAddr, MetaLocation, OnPeerLoss,
};

const GOOD: &str = r#"[resource.mail]
size = "1GiB"
on-peer-loss = "suspend-io"
ping-timeout = "500ms"
sync-chunk = "256KiB"
sync-window = 4
engine = "pool"

[resource.mail.node.alpha]
id = 1
backing = "alpha.img"
listen = ["unix:alpha.sock", "tcp:127.0.0.1:10809"]
replication = "127.0.0.1:7789"
connect = "127.0.0.1:7799"
certificate = "certs/alpha.crt"
key = "/etc/pairbd/alpha.key"
control = "alpha.ctl"

[resource.mail.node.beta]
id = 2
backing = "/dev/vdb"
meta = "beta.meta"
replication = "127.0.0.1:7790"
certificate = "beta.crt"
key = "beta.key"
control = "beta.ctl"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/pairbd/pairbd.toml"))
}

fn error(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

#[test]
fn a_good_file_parses_with_defaults_and_resolved_paths() {
    let c = parse(GOOD).unwrap();
    let r = c.resource(None).unwrap();
    assert_eq!(r.size_bytes, 1 << 30);
    assert_eq!(r.export, "mail");
    assert_eq!(r.on_peer_loss, OnPeerLoss::SuspendIo);
    assert_eq!(r.ping_timeout, Duration::from_millis(500));
    assert_eq!(r.ack_timeout, Duration::from_secs(5));
    assert_eq!(r.sync_chunk_bytes, 256 << 10);
    assert_eq!(r.sync_window, 4);
    assert_eq!(r.batch_messages, 256);
    assert_eq!(r.batch_bytes, 4 << 20);
    assert_eq!(r.engine, Engine::Pool);
    assert_eq!(r.after_crash, AfterCrash::Secondary);
    let a = r.local("alpha").unwrap();
    assert_eq!(a.backing, Path::new("/etc/pairbd/alpha.img"));
    assert_eq!(a.certificate, Path::new("/etc/pairbd/certs/alpha.crt"));
    assert_eq!(a.key, Path::new("/etc/pairbd/alpha.key"));
    assert_eq!(
        a.listen[0],
        ListenAddr::Unix("/etc/pairbd/alpha.sock".into())
    );
    assert_eq!(a.connect.to_string(), "127.0.0.1:7799");
    assert_eq!(a.meta, MetaLocation::Internal);
    let b = r.peer("alpha").unwrap();
    assert_eq!(b.name, "beta");
    assert_eq!(b.connect, b.replication, "connect defaults to replication");
    assert_eq!(
        b.meta,
        MetaLocation::External("/etc/pairbd/beta.meta".into())
    );
    assert_eq!(c.select_node(Some("beta")).unwrap(), "beta");
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let e = error(&GOOD.replace("backing = \"alpha.img\"", "bakcing = \"alpha.img\""));
    assert!(e.contains("line 11"), "{e}");
    assert!(e.contains("bakcing"), "{e}");
    assert!(e.contains("resource.mail.node.alpha"), "{e}");
    assert!(
        e.ends_with("resource.mail.node.alpha: unknown key \"bakcing\"; allowed here: id, backing, meta, listen, replication, connect, certificate, key, control"),
        "{e}"
    );
    let e = error(&format!("colour = 1\n{GOOD}"));
    assert!(e.contains("line 1") && e.contains("colour"), "{e}");
    let e = error(&GOOD.replace("sync-window = 4", "sync-windows = 4"));
    assert!(e.contains("line 6") && e.contains("sync-windows"), "{e}");
}

#[test]
fn values_of_the_wrong_type_name_their_key() {
    let e = error(&GOOD.replace("sync-window = 4", "sync-window = \"four\""));
    assert!(
        e.contains("line 6")
            && e.contains("resource.mail.sync-window: invalid type")
            && e.contains("expected an integer"),
        "{e}"
    );
    let e = error(&GOOD.replace("backing = \"alpha.img\"", "backing = 7"));
    assert!(
        e.contains("line 11") && e.contains("resource.mail.node.alpha.backing: invalid type"),
        "{e}"
    );
}

#[test]
fn bad_values_name_line_key_and_what_is_allowed() {
    let e = error(&GOOD.replace("size = \"1GiB\"", "size = \"1 gallon\""));
    assert!(
        e.contains("line 2") && e.contains("resource.mail.size"),
        "{e}"
    );
    let e = error(&GOOD.replace("size = \"1GiB\"", "size = 1000"));
    assert!(e.contains("multiple of 4096"), "{e}");
    let e = error(&GOOD.replace("\"500ms\"", "\"soon\""));
    assert!(e.contains("line 4") && e.contains("ping-timeout"), "{e}");
    let e = error(&GOOD.replace("\"suspend-io\"", "\"panic\""));
    assert!(
        e.contains("line 3") && e.contains("\"continue\", \"suspend-io\""),
        "{e}"
    );
    let e = error(&GOOD.replace("engine = \"pool\"", "engine = \"spdk\""));
    assert!(e.contains("\"auto\", \"uring\", \"pool\""), "{e}");
    let e = error(&GOOD.replace("\"256KiB\"", "\"1000\""));
    assert!(e.contains("sync-chunk"), "{e}");
    let e = error(&GOOD.replace("replication = \"127.0.0.1:7789\"", "replication = \"here\""));
    assert!(e.contains("line 13") && e.contains("replication"), "{e}");
    let e = error(&GOOD.replace("\"unix:alpha.sock\"", "\"udp:1\""));
    assert!(e.contains("listen"), "{e}");
    let e = error(&GOOD.replace("id = 1", "id = 300"));
    assert!(e.contains("line 10") && e.contains("0 to 255"), "{e}");
    let e = error(&GOOD.replace("sync-window = 4", "sync-window = \"four\""));
    assert!(e.contains("line 6"), "{e}");
    let e = error(&GOOD.replace("sync-window = 4", "batch-messages = 0"));
    assert!(
        e.contains("line 6")
            && e.contains("resource.mail.batch-messages")
            && e.contains("1 to 4096"),
        "{e}"
    );
    let e = error(&GOOD.replace("sync-window = 4", "batch-bytes = \"1KiB\""));
    assert!(
        e.contains("line 6") && e.contains("resource.mail.batch-bytes"),
        "{e}"
    );
    let c = parse(&GOOD.replace(
        "sync-window = 4",
        "batch-messages = 16\nbatch-bytes = \"1MiB\"",
    ))
    .unwrap();
    let r = c.resource(None).unwrap();
    assert_eq!((r.batch_messages, r.batch_bytes), (16, 1 << 20));
}

#[test]
fn merge_bytes_defaults_bounds_and_zero() {
    let r = parse(GOOD).unwrap().resource(None).unwrap().clone();
    assert_eq!(r.merge_bytes, pairbd_config::DEFAULT_MERGE_BYTES);
    for (value, want) in [("0", 0), ("\"64KiB\"", 64 << 10), ("\"16MiB\"", 16 << 20)] {
        let c = parse(&GOOD.replace("sync-window = 4", &format!("merge-bytes = {value}"))).unwrap();
        assert_eq!(c.resource(None).unwrap().merge_bytes, want, "{value}");
    }
    for bad in ["\"1KiB\"", "\"32MiB\"", "-1", "\"lots\""] {
        let e = error(&GOOD.replace("sync-window = 4", &format!("merge-bytes = {bad}")));
        assert!(
            e.contains("line 6") && e.contains("resource.mail.merge-bytes"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn bulk_lane_bytes_defaults_bounds_and_zero() {
    let r = parse(GOOD).unwrap().resource(None).unwrap().clone();
    assert_eq!(r.bulk_lane_bytes, pairbd_config::DEFAULT_BULK_LANE_BYTES);
    assert_eq!(r.bulk_lane_bytes, 64 << 10);
    for (value, want) in [("0", 0), ("\"4KiB\"", 4 << 10), ("\"32MiB\"", 32 << 20)] {
        let c =
            parse(&GOOD.replace("sync-window = 4", &format!("bulk-lane-bytes = {value}"))).unwrap();
        assert_eq!(c.resource(None).unwrap().bulk_lane_bytes, want, "{value}");
    }
    for bad in ["\"1KiB\"", "\"64MiB\"", "-1", "\"big\""] {
        let e = error(&GOOD.replace("sync-window = 4", &format!("bulk-lane-bytes = {bad}")));
        assert!(
            e.contains("line 6") && e.contains("resource.mail.bulk-lane-bytes"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn batch_delay_and_the_in_flight_window() {
    let r = parse(GOOD).unwrap().resource(None).unwrap().clone();
    assert_eq!(r.batch_delay, Duration::ZERO, "no batch delay by default");
    assert_eq!(r.max_inflight_bytes, 16 << 20);
    assert_eq!(
        r.max_inflight_bytes,
        pairbd_config::MAX_INFLIGHT_BYTES_DEFAULT
    );
    let with = |line: &str| {
        parse(&GOOD.replace("sync-window = 4", line)).map(|c| c.resource(None).unwrap().clone())
    };
    assert_eq!(
        with("batch-delay = \"0\"").unwrap().batch_delay,
        Duration::ZERO
    );
    assert_eq!(
        with("batch-delay = \"200us\"").unwrap().batch_delay,
        Duration::from_micros(200)
    );
    assert_eq!(
        with("batch-delay = \"10ms\"").unwrap().batch_delay,
        Duration::from_millis(10)
    );
    assert_eq!(
        with("max-inflight-bytes = \"1MiB\"")
            .unwrap()
            .max_inflight_bytes,
        1 << 20
    );
    assert_eq!(
        with("max-inflight-bytes = 65536")
            .unwrap()
            .max_inflight_bytes,
        65536
    );
    for (line, words) in [
        ("batch-delay = \"11ms\"", "0 to 10ms"),
        ("batch-delay = \"1s\"", "0 to 10ms"),
        ("batch-delay = \"5\"", "give a unit"),
        ("max-inflight-bytes = \"1KiB\"", "4KiB to 1GiB"),
        ("max-inflight-bytes = \"2GiB\"", "4KiB to 1GiB"),
        ("max-inflight-bytes = \"lots\"", "not a size"),
    ] {
        let e = with(line).expect_err(line).to_string();
        let key = line.split(' ').next().unwrap();
        assert!(
            e.contains("line 6")
                && e.contains(&format!("resource.mail.{key}"))
                && e.contains(words),
            "{line}: {e}"
        );
    }
}

#[test]
fn missing_and_structural_mistakes() {
    let e = error(&GOOD.replace("size = \"1GiB\"\n", ""));
    assert!(
        e.contains("resource.mail.size") && e.contains("missing"),
        "{e}"
    );
    let e = error(&GOOD.replace("key = \"beta.key\"\n", ""));
    assert!(e.contains("resource.mail.node.beta.key"), "{e}");
    let e = error(&GOOD.replace("id = 2", "id = 1"));
    assert!(e.contains("used by both"), "{e}");
    let one = &GOOD[..GOOD.find("[resource.mail.node.beta]").unwrap()];
    assert!(error(one).contains("exactly two nodes"));
    let three = format!("{GOOD}\n[resource.mail.node.gamma]\nid = 3\n");
    assert!(error(&three).contains("exactly two nodes"));
    assert!(error("").contains("no [resource.NAME]"));
    let e = error("[resource.mail\nsize = 1");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn node_and_resource_selection_explain_themselves() {
    let c = parse(GOOD).unwrap();
    let e = c.select_node(Some("gamma")).unwrap_err().to_string();
    assert!(e.contains("alpha, beta"), "{e}");
    let e = c.resource(Some("news")).unwrap_err().to_string();
    assert!(e.contains("mail"), "{e}");
    // Unless this machine happens to be called alpha or beta.
    if let Err(e) = c.select_node(None) {
        assert!(e.to_string().contains("pass --node"), "{e}");
    }
}

#[test]
fn after_crash_takes_its_two_values_and_names_a_typo() {
    let c = parse(&GOOD.replace(
        "engine = \"pool\"",
        "engine = \"pool\"\nafter-crash = \"resume-primary\"",
    ))
    .unwrap();
    assert_eq!(
        c.resource(None).unwrap().after_crash,
        AfterCrash::ResumePrimary
    );
    let e = error(&GOOD.replace(
        "engine = \"pool\"",
        "engine = \"pool\"\nafter-crash = \"primary\"",
    ));
    assert!(e.contains("line 8"), "{e}");
    assert!(e.contains("after-crash"), "{e}");
}

#[test]
fn bitmap_granularity_and_after_split_brain_are_checked() {
    let r = parse(GOOD).unwrap();
    let r = r.resource(None).unwrap();
    assert_eq!(r.bitmap_granularity_bytes, None);
    assert_eq!(
        r.after_split_brain,
        pairbd_config::AfterSplitBrain::Disconnect
    );
    let text = GOOD.replace(
        "engine = \"pool\"",
        "engine = \"pool\"\nbitmap-granularity = \"64KiB\"\nafter-split-brain = \"discard-zero-changes\"\nsync-rate = \"100MiB\"",
    );
    let c = parse(&text).unwrap();
    let r = c.resource(None).unwrap();
    assert_eq!(r.bitmap_granularity_bytes, Some(64 << 10));
    assert_eq!(r.sync_rate_bytes_per_sec, Some(100 << 20));
    assert_eq!(
        r.after_split_brain,
        pairbd_config::AfterSplitBrain::DiscardZeroChanges
    );
    let e = error(&GOOD.replace("engine = \"pool\"", "bitmap-granularity = \"3KiB\""));
    assert!(e.contains("bitmap-granularity"), "{e}");
    let e = error(&GOOD.replace("engine = \"pool\"", "after-split-brain = \"merge\""));
    assert!(e.contains("after-split-brain"), "{e}");
}

#[test]
fn direct_reads_default_on_and_parse_as_a_boolean() {
    let r = parse(GOOD).unwrap().resource(None).unwrap().clone();
    assert!(r.direct_reads, "on by default");
    assert!(!r.direct_io);
    for (value, want) in [("false", false), ("true", true)] {
        let c =
            parse(&GOOD.replace("sync-window = 4", &format!("direct-reads = {value}"))).unwrap();
        assert_eq!(c.resource(None).unwrap().direct_reads, want, "{value}");
        let c = parse(&GOOD.replace("sync-window = 4", &format!("aio-reads = {value}"))).unwrap();
        assert_eq!(c.resource(None).unwrap().aio_reads, want, "{value}");
    }
    assert!(r.aio_reads, "on by default");
    // A wrong type names the line and the type wanted (as for every typed key).
    for bad in ["\"no\"", "0"] {
        let e = error(&GOOD.replace("sync-window = 4", &format!("direct-reads = {bad}")));
        assert!(e.contains("line 6") && e.contains("boolean"), "{bad}: {e}");
    }
}
