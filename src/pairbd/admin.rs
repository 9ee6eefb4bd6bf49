//! The operator's subcommands: `daemon`, `gen-cert`, `create-md`, `promote`,
//! `demote`, `connect`, `resume-io` and `status`. Those that talk to a running daemon find
//! its control socket in the configuration.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use pairbd_config::Config;
use serde_json::{json, Value};

use crate::daemon;

/// The global options.
pub struct Context {
    pub config: Option<PathBuf>,
    pub node: Option<String>,
}

impl Context {
    fn load(&self) -> anyhow::Result<(Config, String)> {
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(daemon::DEFAULT_CONFIG));
        let config = Config::load(&path)?;
        let node = config.select_node(self.node.as_deref())?.to_string();
        Ok((config, node))
    }
}

/// A subcommand that takes an optional resource name.
#[derive(Debug, Args)]
pub struct ResourceArg {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    resource: ResourceArg,
    /// On the node the operator sacrifices after a split brain: its changes
    /// are rolled back (the peer resyncs both nodes' dirty regions onto it).
    /// The node must be Secondary.
    #[arg(long)]
    discard_my_data: bool,
}

/// Arguments of `gen-cert`.
#[derive(Debug, Args)]
pub struct GenCertArgs {
    /// The directory to write NAME.crt and NAME.key into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Overwrite an existing certificate and key.
    #[arg(long)]
    force: bool,
}

/// Arguments of `create-md`.
#[derive(Debug, Args)]
pub struct CreateMdArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// Overwrite existing pairbd metadata (this node then needs a full sync).
    #[arg(long)]
    force: bool,
}

/// Arguments of `promote`.
#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// Promote even an Inconsistent or Outdated node: its data becomes the
    /// current copy and the peer is overwritten by a full sync.
    #[arg(long)]
    force: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `demote`.
#[derive(Debug, Args)]
pub struct DemoteArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// Cut attached NBD clients off (their in-flight requests fail) instead
    /// of refusing.
    #[arg(long)]
    force: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// Restart a Primary even when its peer is not connected, Secondary and
    /// UpToDate (it then cannot resume Primary by itself).
    #[arg(long)]
    force: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Print one field of the JSON status, e.g. `role`, `disk`, `connection`,
    /// `peer.disk` (strings bare, other values as JSON; missing: nothing, exit 1).
    #[arg(long, value_name = "PATH", conflicts_with = "json")]
    field: Option<String>,
    /// Follow a running sync with a live progress bar (refreshed every second;
    /// one line per refresh when not on a terminal, or one JSON status with
    /// --json) until no sync runs, then print the status.
    #[arg(long, conflicts_with = "field")]
    watch: bool,
}

pub fn daemon(ctx: &Context, args: ResourceArg) -> anyhow::Result<ExitCode> {
    let (config, node) = ctx.load()?;
    Ok(
        match daemon::run(&config, &node, args.resource.as_deref())? {
            daemon::DaemonExit::Stopped => ExitCode::SUCCESS,
            daemon::DaemonExit::Restart => ExitCode::from(daemon::RESTART_EXIT_CODE),
        },
    )
}

pub fn gen_cert(ctx: &Context, args: GenCertArgs) -> anyhow::Result<ExitCode> {
    let Some(name) = ctx.node.clone() else {
        bail!("gen-cert needs --node NAME: the certificate names the node");
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("--node {name:?}: use letters, digits, '-', '_' and '.' only");
    }
    let (cert, key) = pairbd_link::generate_certificate(&name)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let cert_path = args.out.join(format!("{name}.crt"));
    let key_path = args.out.join(format!("{name}.key"));
    write_new(&cert_path, cert.as_bytes(), 0o644, args.force)?;
    write_new(&key_path, key.as_bytes(), 0o600, args.force)?;
    println!(
        "wrote {} and {}; give the certificate (not the key) to the peer",
        cert_path.display(),
        key_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes a private key readable by its owner only; refuses to replace one.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_new(path, data, 0o600, false)
}

fn write_new(path: &Path, data: &[u8], mode: u32, force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).with_context(|| {
        if path.exists() && !force {
            format!("{} exists; pass --force to replace it", path.display())
        } else {
            format!("cannot write {}", path.display())
        }
    })?;
    file.write_all(data)?;
    file.sync_all()?;
    Ok(())
}

pub fn create_md(ctx: &Context, args: CreateMdArgs) -> anyhow::Result<ExitCode> {
    let (config, node) = ctx.load()?;
    let res = config.resource(args.resource.as_deref())?;
    let local = res.local(&node)?;
    let location = daemon::meta_location(local);
    let record = pairbd_meta::create_md(
        &local.backing,
        &location,
        res.size_bytes,
        local.id,
        &local.name,
        &res.name,
        args.force,
    )?;
    println!(
        "created the metadata of node {} (id {}) of resource {} on {}: {} bytes of data, \
         Secondary, Inconsistent",
        record.node_name,
        record.node_id,
        record.resource,
        location.path().display(),
        record.data_size_bytes
    );
    Ok(ExitCode::SUCCESS)
}

fn control_path(ctx: &Context, resource: Option<&str>) -> anyhow::Result<PathBuf> {
    let (config, node) = ctx.load()?;
    let res = config.resource(resource)?;
    Ok(res.local(&node)?.control.clone())
}

fn ask(path: &PathBuf, request: Value) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::control::request(path, request))
}

/// Prints an admin answer; a refusal is an error exit with the daemon's reason.
fn report(answer: &Value, json_out: bool) -> ExitCode {
    let ok = answer["ok"].as_bool().unwrap_or(false);
    if json_out {
        println!("{answer}");
    } else if ok {
        println!("{}", answer["message"].as_str().unwrap_or("done"));
    } else {
        eprintln!(
            "pairbd: refused: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn promote(ctx: &Context, args: PromoteArgs) -> anyhow::Result<ExitCode> {
    let path = control_path(ctx, args.resource.as_deref())?;
    let answer = ask(&path, json!({"command": "promote", "force": args.force}))?;
    Ok(report(&answer, args.json))
}

pub fn demote(ctx: &Context, args: DemoteArgs) -> anyhow::Result<ExitCode> {
    let path = control_path(ctx, args.resource.as_deref())?;
    let answer = ask(&path, json!({"command": "demote", "force": args.force}))?;
    Ok(report(&answer, args.json))
}

pub fn restart(ctx: &Context, args: RestartArgs) -> anyhow::Result<ExitCode> {
    let path = control_path(ctx, args.resource.as_deref())?;
    let answer = ask(&path, json!({"command": "restart", "force": args.force}))?;
    Ok(report(&answer, args.json))
}

pub fn simple(ctx: &Context, args: ResourceArg, command: &str) -> anyhow::Result<ExitCode> {
    let path = control_path(ctx, args.resource.as_deref())?;
    let answer = ask(&path, json!({"command": command}))?;
    Ok(report(&answer, args.json))
}

pub fn connect(ctx: &Context, args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let path = control_path(ctx, args.resource.resource.as_deref())?;
    let answer = ask(
        &path,
        json!({"command": "connect", "discard_my_data": args.discard_my_data}),
    )?;
    Ok(report(&answer, args.resource.json))
}

pub fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let path = control_path(ctx, args.resource.as_deref())?;
    let answer = ask(&path, json!({"command": "status"}))?;
    if !answer["ok"].as_bool().unwrap_or(false) {
        return Ok(report(&answer, args.json));
    }
    if args.watch {
        return watch(&path, answer, args.json);
    }
    let s = &answer["status"];
    if args.json {
        println!("{s}");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = &args.field {
        let mut v = s;
        for key in path.split('.') {
            v = &v[key];
        }
        return Ok(match v {
            Value::Null => ExitCode::FAILURE,
            Value::String(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            other => {
                println!("{other}");
                ExitCode::SUCCESS
            }
        });
    }
    print!("{}", human_status(s));
    Ok(ExitCode::SUCCESS)
}

/// `status --watch`: a progress bar while a sync runs (indicatif draws
/// nothing when stderr is not a terminal: then a line per refresh), then the
/// status. The refresh interval is the display's pace, not a synchronisation.
fn watch(path: &PathBuf, mut answer: Value, json_out: bool) -> anyhow::Result<ExitCode> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg}\n[{bar:40}] {percent}% ({bytes}/{total_bytes})")
            .context("the progress bar template")?
            .progress_chars("=> "),
    );
    loop {
        if !answer["ok"].as_bool().unwrap_or(false) {
            bar.finish_and_clear();
            return Ok(report(&answer, json_out));
        }
        let s = &answer["status"];
        let Some(y) = s["sync"].as_object() else {
            bar.finish_and_clear();
            if json_out {
                println!("{s}");
            } else {
                print!("{}", human_status(s));
            }
            return Ok(ExitCode::SUCCESS);
        };
        let done = y["done_bytes"].as_u64().unwrap_or(0);
        let total = y["total_bytes"].as_u64().unwrap_or(0);
        let kind = match y["kind"].as_str() {
            Some("full") => "full sync",
            Some("bitmap") => "resync of the dirty regions",
            _ => "sync",
        };
        let eta = y["eta_secs"]
            .as_f64()
            .map(|e| format!(", ETA {e:.0}s"))
            .unwrap_or_default();
        let text = |v: &Value| v.as_str().unwrap_or("?").to_string();
        let msg = format!(
            "{} {kind}, this node is the {}: {:.1} MiB/s{eta}",
            text(&s["resource"]),
            text(&y["direction"]),
            y["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1048576.0
        );
        if json_out {
            println!("{s}");
        } else if bar.is_hidden() {
            println!(
                "{msg}: {:.1}% ({done} of {total} bytes)",
                y["percent"].as_f64().unwrap_or(0.0)
            );
        } else {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(msg);
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        answer = ask(path, json!({"command": "status"}))?;
    }
}

/// `drbdadm status`-like text.
fn human_status(s: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let mut out = format!(
        "{} role:{} disk:{}\n",
        text(&s["resource"]),
        text(&s["role"]),
        text(&s["disk"])
    );
    match s["peer"].as_object() {
        Some(p) => out.push_str(&format!(
            "  {} connection:{} role:{} disk:{}\n",
            text(&p["node"]),
            text(&s["connection"]),
            text(&p["role"]),
            text(&p["disk"])
        )),
        None => {
            out.push_str(&format!("  peer connection:{}", text(&s["connection"])));
            if let Some(r) = s["last_disconnect"].as_str() {
                out.push_str(&format!(" (last: {r})"));
            }
            out.push('\n');
        }
    }
    if let Some(g) = s["generations"].as_object() {
        out.push_str(&format!(
            "  generations: current {} bitmap {} history {}\n",
            text(&g["current"]),
            text(&g["bitmap"]),
            g["history"]
                .as_array()
                .map(|h| h.iter().map(text).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        ));
    }
    if let Some(clients) = s["clients"].as_array() {
        for c in clients {
            out.push_str(&format!(
                "  client #{} {} export {}\n",
                c["id"],
                text(&c["address"]),
                text(&c["export"])
            ));
        }
    }
    if s["connection"] == "StandAlone" {
        out.push_str(
            "  StandAlone: no link to the peer until `pairbd connect` (see docs/OPERATIONS.md)\n",
        );
    }
    if s["demoting"].as_bool() == Some(true) {
        out.push_str("  demoting: waiting for client requests in flight to finish\n");
    }
    if let Some(y) = s["sync"].as_object() {
        let eta = y["eta_secs"]
            .as_f64()
            .map(|e| format!(", ETA {e:.0}s"))
            .unwrap_or_default();
        out.push_str(&format!(
            "    {} ({}): {:.1}% done ({} of {} bytes), {:.1} MiB/s{eta}\n",
            match y["kind"].as_str() {
                Some("full") => "full sync",
                Some("bitmap") => "resync of the dirty regions",
                _ => "sync",
            },
            if y["direction"] == "source" {
                "this node is the source"
            } else {
                "this node is the target"
            },
            y["percent"].as_f64().unwrap_or(0.0),
            y["done_bytes"].as_u64().unwrap_or(0),
            y["total_bytes"].as_u64().unwrap_or(0),
            y["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1048576.0
        ));
    }
    if let Some(v) = s["verify"].as_object() {
        out.push_str(&format!(
            "    verify: {:.1}% compared\n",
            v["percent"].as_f64().unwrap_or(0.0)
        ));
    }
    if let Some(v) = s["last_verify"].as_object() {
        out.push_str(&format!(
            "  last verify: {} bytes compared, {} 4 KiB blocks differed{}\n",
            v["checked_bytes"].as_u64().unwrap_or(0),
            v["differing_blocks"].as_u64().unwrap_or(0),
            if v["differing_blocks"].as_u64().unwrap_or(0) > 0 {
                " (marked out of sync and resynced)"
            } else {
                ""
            }
        ));
    }
    if let Some(b) = s["bitmap"].as_object() {
        let oos = b["out_of_sync_bytes"].as_u64().unwrap_or(0);
        let marked = b["marked_bytes"].as_u64().unwrap_or(0);
        let resynced = b["resynced_bytes"].as_u64().unwrap_or(0);
        if oos > 0 || marked > 0 || resynced > 0 {
            out.push_str(&format!(
                "  out of sync: {oos} bytes (since start: {marked} bytes marked, {resynced} \
                 bytes resynced; {} bytes per bit)\n",
                b["granularity_bytes"].as_u64().unwrap_or(0)
            ));
        }
    }
    if let Some(w) = s["writes"].as_object() {
        let ops = w["write_ops"].as_u64().unwrap_or(0);
        if ops > 0 {
            out.push_str(&format!(
                "  writes: {ops} write ops in {} store writes ({} merged, carrying {} ops)\n",
                w["store_writes"].as_u64().unwrap_or(0),
                w["merged_writes"].as_u64().unwrap_or(0),
                w["merged_ops"].as_u64().unwrap_or(0)
            ));
        }
    }
    if let Some(w) = s["window"].as_object() {
        let inflight = w["inflight_bytes"].as_u64().unwrap_or(0);
        let waiting = w["writes_waiting"].as_u64().unwrap_or(0);
        if inflight > 0 || waiting > 0 {
            out.push_str(&format!(
                "  in flight to the peer: {inflight} of {} bytes, {waiting} write(s) waiting \
                 for room\n",
                w["max_inflight_bytes"].as_u64().unwrap_or(0)
            ));
        }
    }
    if s["peer_sync_needed"].as_bool() == Some(true) {
        out.push_str(
            "  note: writes since the peer left exist on this node only; the peer needs a sync\n",
        );
    }
    if s["io_suspended"].as_bool() == Some(true) {
        out.push_str("  note: I/O suspended until the peer returns or `pairbd resume-io`\n");
    }
    if let Some(f) = s["failed"].as_str() {
        out.push_str(&format!("  FAILED: {f}\n"));
    }
    out
}
