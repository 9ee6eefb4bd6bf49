//! From TOML text to a checked `Config`: serde does the shape (unknown keys,
//! types), the checks below do the values; both report file, line and key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{
    AfterCrash, AfterSplitBrain, Config, ConfigError, Engine, ListenAddr, MetaLocation, NodeConfig,
    OnPeerLoss, ResourceConfig, DEFAULT_BULK_LANE_BYTES, DEFAULT_MERGE_BYTES, MERGE_BYTES_MAX,
};

/// The longest `batch-delay`: a batch waits at most this long for company.
const BATCH_DELAY_MAX: Duration = Duration::from_millis(10);

/// `max-inflight-bytes` when unset (docs/OPERATIONS.md argues the figure).
pub const MAX_INFLIGHT_BYTES_DEFAULT: u64 = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    resource: BTreeMap<String, Spanned<RawResource>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    size: Option<Spanned<SizeValue>>,
    export: Option<String>,
    on_peer_loss: Option<Spanned<String>>,
    after_crash: Option<Spanned<String>>,
    after_split_brain: Option<Spanned<String>>,
    ping_timeout: Option<Spanned<String>>,
    ack_timeout: Option<Spanned<String>>,
    sync_chunk: Option<Spanned<SizeValue>>,
    sync_window: Option<Spanned<i64>>,
    bitmap_granularity: Option<Spanned<SizeValue>>,
    sync_rate: Option<Spanned<SizeValue>>,
    batch_messages: Option<Spanned<i64>>,
    batch_bytes: Option<Spanned<SizeValue>>,
    merge_bytes: Option<Spanned<SizeValue>>,
    batch_delay: Option<Spanned<String>>,
    max_inflight_bytes: Option<Spanned<SizeValue>>,
    bulk_lane_bytes: Option<Spanned<SizeValue>>,
    sync_rate_min: Option<Spanned<SizeValue>>,
    al_extent_size: Option<Spanned<SizeValue>>,
    al_extents: Option<Spanned<i64>>,
    engine: Option<Spanned<String>>,
    direct_io: Option<bool>,
    direct_reads: Option<bool>,
    aio_reads: Option<bool>,
    #[serde(default)]
    node: BTreeMap<String, Spanned<RawNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    id: Option<Spanned<i64>>,
    backing: Option<String>,
    meta: Option<String>,
    #[serde(default)]
    listen: Vec<Spanned<String>>,
    replication: Option<Spanned<String>>,
    connect: Option<Spanned<String>>,
    certificate: Option<String>,
    key: Option<String>,
    control: Option<String>,
}

/// Turns byte offsets into line numbers and builds errors.
struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
    base: PathBuf,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn err(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::At {
            path: self.path.to_path_buf(),
            line: self.line(offset),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// Parses "1GiB", "512M", "4096", or an integer, as bytes (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4096, 512MiB, 1GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return Err(format!("{text:?}: unknown unit (use KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses "250ms", "1s", "2m".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 1s, 2m)"))?;
    match unit.trim() {
        "us" | "µs" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" | "min" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{text:?}: give a unit: us, ms, s or m")),
    }
}

fn size_value(ctx: &Ctx, v: &Spanned<SizeValue>, key: &str) -> Result<u64, ConfigError> {
    let r = match v.get_ref() {
        SizeValue::Int(i) => u64::try_from(*i).map_err(|_| format!("{i} is negative")),
        SizeValue::Text(t) => parse_size(t),
    };
    r.map_err(|m| ctx.err(v.span().start, key, m))
}

/// A duration key: `default` when absent; a bare "0" is zero; `ok` says
/// whether a value is allowed, `rule` what the error says if not.
fn duration_value(
    ctx: &Ctx,
    v: &Option<Spanned<String>>,
    key: &str,
    default: Duration,
    ok: impl Fn(Duration) -> bool,
    rule: &str,
) -> Result<Duration, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let text = v.get_ref().trim();
    let d = if text == "0" {
        Duration::ZERO
    } else {
        parse_duration(text).map_err(|m| ctx.err(v.span().start, key, m))?
    };
    if !ok(d) {
        return Err(ctx.err(v.span().start, key, rule));
    }
    Ok(d)
}

/// A timeout: more than 0, at most 60 s.
fn timeout_ok(d: Duration) -> bool {
    !d.is_zero() && d <= Duration::from_secs(60)
}

const TIMEOUT_RULE: &str = "must be more than 0 and at most 60s";

/// A size key: `default` when absent; `ok` says whether a value is allowed,
/// `rule` what the error says if not.
fn size_or(
    ctx: &Ctx,
    v: &Option<Spanned<SizeValue>>,
    key: &str,
    default: u64,
    ok: impl Fn(u64) -> bool,
    rule: &str,
) -> Result<u64, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let b = size_value(ctx, v, key)?;
    if !ok(b) {
        return Err(ctx.err(v.span().start, key, rule));
    }
    Ok(b)
}

fn choice<T: Copy>(
    ctx: &Ctx,
    v: &Option<Spanned<String>>,
    key: &str,
    default: T,
    options: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    options
        .iter()
        .find(|(name, _)| *name == v.get_ref().as_str())
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let allowed: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            ctx.err(
                v.span().start,
                key,
                format!("{:?} is not one of {}", v.get_ref(), allowed.join(", ")),
            )
        })
}

fn socket_addr(ctx: &Ctx, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
    v.get_ref().parse().map_err(|_| {
        ctx.err(
            v.span().start,
            key,
            format!("{:?} is not an address like 127.0.0.1:7789", v.get_ref()),
        )
    })
}

pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let ctx = Ctx {
        text,
        path,
        base: path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        ConfigError::At {
            path: path.to_path_buf(),
            line: ctx.line(offset),
            key: error_key(text, offset, e.message()),
            message: plain_message(e.message().trim()),
        }
    })?;
    if raw.resource.is_empty() {
        return Err(ctx.err(
            0,
            "resource",
            "no [resource.NAME] table: nothing to replicate",
        ));
    }
    let mut resources = BTreeMap::new();
    for (name, r) in &raw.resource {
        let res = resource(&ctx, name, r)?;
        resources.insert(name.clone(), res);
    }
    Ok(Config {
        path: path.to_path_buf(),
        resources,
    })
}

/// Rewrites serde's wording (fields, backquotes) in the file's terms (keys),
/// so that `unknown field `bakcing`` reads `unknown key "bakcing"`.
fn plain_message(message: &str) -> String {
    for (prefix, noun) in [
        ("unknown field `", "key"),
        ("missing field `", "required key"),
    ] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let Some((name, rest)) = rest.split_once('`') else {
                break;
            };
            let what = if noun == "key" { "unknown" } else { "missing" };
            let allowed = rest
                .trim_start_matches(", expected ")
                .trim_start_matches("one of ")
                .replace('`', "");
            return if allowed.is_empty() {
                format!("{what} {noun} {name:?}")
            } else {
                format!("{what} {noun} {name:?}; allowed here: {allowed}")
            };
        }
    }
    // serde names Rust types; the file has TOML ones.
    message
        .replace("expected i64", "expected an integer")
        .replace("expected u64", "expected an integer")
}

/// The key a TOML/serde error at `offset` is about: the table, plus the key of
/// the `key = value` line the offset falls in, so that a value of the wrong type
/// reads `resource.mail.al-extents: invalid type ...`. An unknown or missing key
/// is already named by its message, after the table it belongs in.
fn error_key(text: &str, offset: usize, message: &str) -> String {
    let table = key_at(text, offset);
    let named = ["unknown field", "missing field"]
        .iter()
        .any(|p| message.trim_start().starts_with(p));
    match line_key(text, offset) {
        Some(key) if !named && table == "top level" => key,
        Some(key) if !named => format!("{table}.{key}"),
        _ => table,
    }
}

/// The key of the `key = value` line holding `offset`, if that line is one.
fn line_key(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text.get(start..end)?.trim();
    if line.starts_with('[') || line.starts_with('#') {
        return None;
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty()).then(|| key.to_string())
}

/// The dotted key nearest before `offset`, for serde errors (which know the
/// position but not the table).
fn key_at(text: &str, offset: usize) -> String {
    let end = offset.min(text.len());
    let mut table = String::new();
    for line in text[..end].lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    if table.is_empty() {
        "top level".to_string()
    } else {
        table
    }
}

fn resource(
    ctx: &Ctx,
    name: &str,
    r: &Spanned<RawResource>,
) -> Result<ResourceConfig, ConfigError> {
    let at = r.span().start;
    let key = format!("resource.{name}");
    let raw = r.get_ref();
    if name.is_empty() || name.len() > 63 {
        return Err(ctx.err(at, &key, "resource names are 1 to 63 characters"));
    }
    let size_v = raw.size.as_ref().ok_or_else(|| {
        ctx.err(
            at,
            &format!("{key}.size"),
            "missing: the usable data size, e.g. size = \"1GiB\"",
        )
    })?;
    let size_bytes = size_value(ctx, size_v, &format!("{key}.size"))?;
    if size_bytes == 0 || size_bytes % 4096 != 0 {
        return Err(ctx.err(
            size_v.span().start,
            &format!("{key}.size"),
            format!("{size_bytes} bytes: must be a positive multiple of 4096"),
        ));
    }
    let sync_chunk_bytes = match &raw.sync_chunk {
        None => 1 << 20,
        Some(v) => {
            let k = format!("{key}.sync-chunk");
            let b = size_value(ctx, v, &k)?;
            if b % 4096 != 0 || !(4096..=32 << 20).contains(&b) {
                return Err(ctx.err(
                    v.span().start,
                    &k,
                    "must be a multiple of 4096 from 4KiB to 32MiB",
                ));
            }
            b
        }
    };
    let bitmap_granularity_bytes = match &raw.bitmap_granularity {
        None => None,
        Some(v) => {
            let k = format!("{key}.bitmap-granularity");
            let b = size_value(ctx, v, &k)?;
            if !b.is_power_of_two() || !(4096..=1 << 20).contains(&b) {
                return Err(ctx.err(
                    v.span().start,
                    &k,
                    "must be a power of two from 4KiB to 1MiB",
                ));
            }
            Some(b)
        }
    };
    // Bytes per second; 0 or absent: unlimited.
    let sync_rate_bytes_per_sec = match &raw.sync_rate {
        None => None,
        Some(v) => {
            let k = format!("{key}.sync-rate");
            let b = size_value(ctx, v, &k)?;
            (b > 0).then_some(b)
        }
    };
    // Bytes per second while clients are active; 0 or absent: no yielding.
    let sync_rate_min_bytes_per_sec = match &raw.sync_rate_min {
        None => None,
        Some(v) => {
            let k = format!("{key}.sync-rate-min");
            let b = size_value(ctx, v, &k)?;
            (b > 0).then_some(b)
        }
    };
    // The activity log (bounds: pairbd-repl-core's activity_log module; at
    // most 960 extents fit a metadata slot).
    let al_extent_bytes = match &raw.al_extent_size {
        None => 4 << 20,
        Some(v) => {
            let k = format!("{key}.al-extent-size");
            let b = size_value(ctx, v, &k)?;
            if !b.is_power_of_two() || !(64 << 10..=1 << 30).contains(&b) {
                return Err(ctx.err(
                    v.span().start,
                    &k,
                    "must be a power of two from 64KiB to 1GiB",
                ));
            }
            b
        }
    };
    let al_extents = match &raw.al_extents {
        None => 257,
        Some(v) => {
            let n = *v.get_ref();
            if !(8..=960).contains(&n) {
                return Err(ctx.err(
                    v.span().start,
                    &format!("{key}.al-extents"),
                    "must be 8 to 960",
                ));
            }
            n as usize
        }
    };
    let sync_window = match &raw.sync_window {
        None => 8,
        Some(v) => {
            let w = *v.get_ref();
            if !(1..=256).contains(&w) {
                return Err(ctx.err(
                    v.span().start,
                    &format!("{key}.sync-window"),
                    "must be 1 to 256",
                ));
            }
            w as usize
        }
    };
    let batch_messages = match &raw.batch_messages {
        None => 256,
        Some(v) => {
            let n = *v.get_ref();
            if !(1..=4096).contains(&n) {
                return Err(ctx.err(
                    v.span().start,
                    &format!("{key}.batch-messages"),
                    "must be 1 to 4096",
                ));
            }
            n as usize
        }
    };
    let batch_bytes = size_or(
        ctx,
        &raw.batch_bytes,
        &format!("{key}.batch-bytes"),
        4 << 20,
        |b| (4096..=64 << 20).contains(&b),
        "must be from 4KiB to 64MiB",
    )?;
    let merge_bytes = size_or(
        ctx,
        &raw.merge_bytes,
        &format!("{key}.merge-bytes"),
        DEFAULT_MERGE_BYTES,
        |b| b == 0 || (4096..=MERGE_BYTES_MAX).contains(&b),
        "must be 0 (no merging) or from 4KiB to 16MiB",
    )?;
    // How long the link's writer may wait for more messages before it
    // writes a batch that is not full; 0 (the default): only what is
    // already queued is batched.
    let batch_delay = duration_value(
        ctx,
        &raw.batch_delay,
        &format!("{key}.batch-delay"),
        Duration::ZERO,
        |d| d <= BATCH_DELAY_MAX,
        "must be from 0 to 10ms (e.g. \"0\", \"200us\", \"1ms\")",
    )?;
    let max_inflight_bytes = size_or(
        ctx,
        &raw.max_inflight_bytes,
        &format!("{key}.max-inflight-bytes"),
        MAX_INFLIGHT_BYTES_DEFAULT,
        |b| (4096..=1 << 30).contains(&b),
        "must be from 4KiB to 1GiB",
    )?;
    let bulk_lane_bytes = size_or(
        ctx,
        &raw.bulk_lane_bytes,
        &format!("{key}.bulk-lane-bytes"),
        DEFAULT_BULK_LANE_BYTES,
        |b| b == 0 || (4096..=32 << 20).contains(&b),
        "must be 0 (one lane) or from 4KiB to 32MiB",
    )?;
    let on_peer_loss = choice(
        ctx,
        &raw.on_peer_loss,
        &format!("{key}.on-peer-loss"),
        OnPeerLoss::Continue,
        &[
            ("continue", OnPeerLoss::Continue),
            ("suspend-io", OnPeerLoss::SuspendIo),
        ],
    )?;
    let after_crash = choice(
        ctx,
        &raw.after_crash,
        &format!("{key}.after-crash"),
        AfterCrash::Secondary,
        &[
            ("secondary", AfterCrash::Secondary),
            ("resume-primary", AfterCrash::ResumePrimary),
        ],
    )?;
    let after_split_brain = choice(
        ctx,
        &raw.after_split_brain,
        &format!("{key}.after-split-brain"),
        AfterSplitBrain::Disconnect,
        &[
            ("disconnect", AfterSplitBrain::Disconnect),
            ("discard-zero-changes", AfterSplitBrain::DiscardZeroChanges),
        ],
    )?;
    let engine = choice(
        ctx,
        &raw.engine,
        &format!("{key}.engine"),
        Engine::Auto,
        &[
            ("auto", Engine::Auto),
            ("uring", Engine::Uring),
            ("pool", Engine::Pool),
        ],
    )?;
    let ping_timeout = duration_value(
        ctx,
        &raw.ping_timeout,
        &format!("{key}.ping-timeout"),
        Duration::from_secs(1),
        timeout_ok,
        TIMEOUT_RULE,
    )?;
    let ack_timeout = duration_value(
        ctx,
        &raw.ack_timeout,
        &format!("{key}.ack-timeout"),
        Duration::from_secs(5),
        timeout_ok,
        TIMEOUT_RULE,
    )?;
    if raw.node.len() != 2 {
        return Err(ctx.err(
            at,
            &format!("{key}.node"),
            format!(
                "a resource has exactly two nodes ([{key}.node.NAME] tables); found {}",
                raw.node.len()
            ),
        ));
    }
    let mut nodes = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (node_name, n) in &raw.node {
        let node = node(ctx, &key, node_name, n)?;
        if !ids.insert(node.id) {
            let span = n
                .get_ref()
                .id
                .as_ref()
                .map(|s| s.span().start)
                .unwrap_or(n.span().start);
            return Err(ctx.err(
                span,
                &format!("{key}.node.{node_name}.id"),
                format!("id {} is used by both nodes; give each its own", node.id),
            ));
        }
        nodes.insert(node_name.clone(), node);
    }
    Ok(ResourceConfig {
        name: name.to_string(),
        size_bytes,
        export: raw.export.clone().unwrap_or_else(|| name.to_string()),
        on_peer_loss,
        after_crash,
        after_split_brain,
        ping_timeout,
        ack_timeout,
        sync_chunk_bytes,
        sync_window,
        bitmap_granularity_bytes,
        sync_rate_bytes_per_sec,
        batch_messages,
        batch_bytes,
        merge_bytes,
        batch_delay,
        max_inflight_bytes,
        bulk_lane_bytes,
        sync_rate_min_bytes_per_sec,
        al_extent_bytes,
        al_extents,
        engine,
        direct_io: raw.direct_io.unwrap_or(false),
        direct_reads: raw.direct_reads.unwrap_or(true),
        aio_reads: raw.aio_reads.unwrap_or(true),
        nodes,
    })
}

fn node(
    ctx: &Ctx,
    res_key: &str,
    name: &str,
    n: &Spanned<RawNode>,
) -> Result<NodeConfig, ConfigError> {
    let at = n.span().start;
    let key = format!("{res_key}.node.{name}");
    let raw = n.get_ref();
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ctx.err(
            at,
            &key,
            "node names are 1 to 63 letters, digits, '-', '_' or '.'",
        ));
    }
    let missing = |field: &str, hint: &str| {
        ctx.err(at, &format!("{key}.{field}"), format!("missing: {hint}"))
    };
    let id_v = raw
        .id
        .as_ref()
        .ok_or_else(|| missing("id", "a number 0 to 255, distinct per node"))?;
    let id = u8::try_from(*id_v.get_ref())
        .map_err(|_| ctx.err(id_v.span().start, &format!("{key}.id"), "must be 0 to 255"))?;
    let backing = raw
        .backing
        .as_deref()
        .ok_or_else(|| missing("backing", "the backing file or block device"))?;
    let replication_v = raw.replication.as_ref().ok_or_else(|| {
        missing(
            "replication",
            "the UDP address to replicate on, e.g. 127.0.0.1:7789",
        )
    })?;
    let replication = socket_addr(ctx, replication_v, &format!("{key}.replication"))?;
    let connect = match &raw.connect {
        Some(v) => socket_addr(ctx, v, &format!("{key}.connect"))?,
        None => replication,
    };
    let mut listen = Vec::new();
    for l in &raw.listen {
        let addr: ListenAddr = l.get_ref().parse().map_err(|e| {
            ctx.err(
                l.span().start,
                &format!("{key}.listen"),
                format!("{:?}: {e}", l.get_ref()),
            )
        })?;
        listen.push(match addr {
            ListenAddr::Unix(p) => ListenAddr::Unix(ctx.resolve(&p.to_string_lossy())),
            other => other,
        });
    }
    let meta = match raw.meta.as_deref() {
        None | Some("internal") => MetaLocation::Internal,
        Some(p) => MetaLocation::External(ctx.resolve(p)),
    };
    Ok(NodeConfig {
        name: name.to_string(),
        id,
        backing: ctx.resolve(backing),
        meta,
        listen,
        replication,
        connect,
        certificate: ctx.resolve(
            raw.certificate.as_deref().ok_or_else(|| {
                missing("certificate", "this node's certificate (pairbd gen-cert)")
            })?,
        ),
        key: ctx.resolve(
            raw.key
                .as_deref()
                .ok_or_else(|| missing("key", "this node's private key (pairbd gen-cert)"))?,
        ),
        control: ctx.resolve(
            raw.control
                .as_deref()
                .ok_or_else(|| missing("control", "this node's control socket path"))?,
        ),
    })
}
