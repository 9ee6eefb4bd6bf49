//! `pairbd attach` and `pairbd detach`: the mail host's side. `attach` connects
//! /dev/nbdX to the resource's Primary and names it `/dev/pairbd/RESOURCE` itself
//! (Debian 12's nbd-client sets nothing a udev rule could match); `detach` disconnects
//! the device and removes the name.
//!
//! Two ways to configure the kernel's NBD client:
//! - netlink (the default where the kernel offers the "nbd" generic-netlink family):
//!   `attach` starts a supervisor process (`supervise.rs`) that does the NBD handshake
//!   itself (`handshake.rs`), passes the connected sockets to the kernel with
//!   `NBD_CMD_CONNECT` and a dead-connection timeout (`netlink.rs`), and stays: when
//!   the daemon restarts (or another node is promoted) it reconnects and hands the
//!   new sockets over with `NBD_CMD_RECONFIGURE`, so the mail host's I/O waits instead
//!   of failing. Debian 12's nbd-client (3.24) does neither over netlink.
//! - nbd-client (`--nbd-client`, or where netlink is missing): the old way, with
//!   no reconnection: a restart of the Primary's daemon fails I/O after `--timeout`.
//!
//! Which node is Primary is not written down anywhere the mail host can read, so `attach`
//! tries the nodes of the configuration in turn (the node named like this host first,
//! then by id; `--node` names one): a Secondary refuses NBD clients, so the first node
//! whose export the client can open is the Primary. The handshake comes before anything
//! touches the kernel, so a refused attempt leaves the device unconfigured.
//!
//! The settings, and why:
//! - block size 4096: the kernel's default 512 works, but costs a read-modify-write
//!   in the page cache on XFS's 4 KiB blocks.
//! - 2 connections, so that the kernel's queues are not serialised on one socket
//!   (pairbd makes a FLUSH on one connection cover writes on all of them).
//! - `--timeout 30`: a request unanswered this long is retried on another socket (the
//!   kernel marks its socket dead, which the supervisor replaces); with nbd-client,
//!   without any timeout the kernel would wait forever on a dead server.
//! - `--dead-timeout 120` (netlink only): how long the kernel holds new requests while
//!   every socket is dead, waiting for the supervisor's new ones; after it, I/O fails
//!   (so a mail host whose pair is gone for good can still unmount).

pub mod handshake;
pub mod netlink;
pub mod supervise;

use std::io::{BufRead, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use pairbd_config::{Config, ListenAddr, NodeConfig, ResourceConfig};

use crate::admin::Context;
use crate::daemon::DEFAULT_CONFIG;

/// Where the stable device names live.
pub const LINK_DIR: &str = "/dev/pairbd";

/// Where the attach supervisors log: `attach-RESOURCE.log`.
pub const LOG_DIR: &str = "/run/pairbd";

/// How long one nbd-client run may take (TCP connect to a dead host, a handshake
/// that never ends) before it is killed and the next node is tried.
const NBD_CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// How long `detach` waits for the kernel to release a disconnected device.
const RELEASE_LIMIT: Duration = Duration::from_secs(30);

/// The block size given to the kernel.
const BLOCK_SIZE_BYTES: u64 = 4096;

/// Arguments of `attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
    /// The NBD device to use [default: the first one not connected].
    #[arg(long, value_name = "/dev/nbdN")]
    device: Option<PathBuf>,
    /// Connections to the server.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: u32,
    /// Seconds after which the kernel retries a request the server has not answered
    /// (on a new connection; with --nbd-client, after which it fails); 0 waits forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u32,
    /// Seconds the kernel holds I/O while every connection is dead, waiting for the
    /// supervisor to reconnect (a daemon restart, a failover), before failing it.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    dead_timeout: u32,
    /// Use nbd-client (no reconnection) instead of the kernel's netlink interface.
    #[arg(long)]
    nbd_client: bool,
    /// Print what would be done, in order, and do nothing.
    #[arg(long)]
    dry_run: bool,
    /// Internal: run as the supervisor of --device (started by attach itself).
    #[arg(long, hide = true, requires = "device")]
    supervise: bool,
    /// Internal, with --supervise: adopt the device the (dead) supervisor PID
    /// configured.
    #[arg(long, hide = true, value_name = "PID", requires = "supervise")]
    adopt: Option<u32>,
}

/// Arguments of `detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The resource [default: the only one in the configuration].
    #[arg(value_name = "RESOURCE")]
    resource: Option<String>,
}

/// One way to reach one node's NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    pub address: ListenAddr,
}

pub fn attach(ctx: &Context, args: AttachArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(ctx)?;
    let resource = config.resource(args.resource.as_deref())?;
    let candidates = candidates(resource, ctx.node.as_deref(), &local_hostname())?;
    let link = Path::new(LINK_DIR).join(&resource.name);
    if args.supervise {
        return run_supervisor(resource, candidates, &args);
    }
    if args.dry_run {
        let device = args
            .device
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/nbdN"));
        if args.nbd_client {
            for candidate in &candidates {
                let argv = nbd_client_args(candidate, &device, &resource.export, &args);
                println!("nbd-client {}", shell_words(&argv));
            }
        } else {
            let nodes: Vec<String> = candidates
                .iter()
                .map(|c| format!("{} ({})", c.node, c.address))
                .collect();
            println!(
                "netlink NBD_CMD_CONNECT {}: {} connection(s) to export {:?} on the first node \
                 that accepts it of: {}; block size {BLOCK_SIZE_BYTES}, timeout {}s, \
                 dead-connection timeout {}s; then supervise (reconnect on LINK_DEAD)",
                device.display(),
                args.connections,
                resource.export,
                nodes.join(", "),
                args.timeout,
                args.dead_timeout
            );
        }
        println!("ln -sfn {} {}", device.display(), link.display());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(device) = attached_device(&link) {
        if !args.nbd_client {
            if let Some(previous) = orphaned_by(&device) {
                let message = start_supervisor(ctx, resource, &device, &args, Some(previous))?;
                println!(
                    "re-supervised {}: {} -> {} ({message})",
                    resource.name,
                    link.display(),
                    device.display(),
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
        bail!(
            "{} is already attached as {} ({}); `pairbd detach {}` first",
            resource.name,
            device.display(),
            link.display(),
            resource.name
        );
    }
    ensure_nbd_module()?;
    let device = match &args.device {
        Some(device) => {
            let name = nbd_name(device)?;
            if is_connected(&name) {
                bail!("{} is in use (connected to a server)", device.display());
            }
            device.clone()
        }
        None => first_free_device()?,
    };
    let use_netlink = !args.nbd_client
        && match netlink::nbd_family() {
            Ok(_) => true,
            Err(error) => {
                eprintln!(
                    "pairbd attach: the kernel's nbd netlink interface is unusable ({error}); \
                     falling back to nbd-client, which cannot reconnect after a daemon restart"
                );
                false
            }
        };
    let message = if use_netlink {
        start_supervisor(ctx, resource, &device, &args, None)?
    } else {
        attach_with_nbd_client(resource, &candidates, &device, &args)?
    };
    make_link(&link, &device)?;
    println!(
        "attached {}: {} -> {} ({message})",
        resource.name,
        link.display(),
        device.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// The old way: nbd-client against each node in turn. Returns where it attached.
fn attach_with_nbd_client(
    resource: &ResourceConfig,
    candidates: &[Candidate],
    device: &Path,
    args: &AttachArgs,
) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut refusals = Vec::new();
    for candidate in candidates {
        let argv = nbd_client_args(candidate, device, &resource.export, args);
        match runtime.block_on(run_nbd_client(&argv)) {
            Ok(()) => {
                return Ok(format!(
                    "node {}, {}, nbd-client",
                    candidate.node, candidate.address
                ))
            }
            Err(error) => refusals.push(format!(
                "node {} ({}): {error:#}",
                candidate.node, candidate.address
            )),
        }
    }
    bail!(
        "no node of {} accepted the attach (is one of them Primary?):\n  {}",
        resource.name,
        refusals.join("\n  ")
    )
}

/// Starts `pairbd attach --supervise` in its own process group, logging to
/// /run/pairbd/attach-RESOURCE.log, and waits for its one report line.
fn start_supervisor(
    ctx: &Context,
    resource: &ResourceConfig,
    device: &Path,
    args: &AttachArgs,
    adopt: Option<u32>,
) -> anyhow::Result<String> {
    use std::os::unix::process::CommandExt as _;
    std::fs::create_dir_all(LOG_DIR).with_context(|| format!("cannot create {LOG_DIR}"))?;
    let log_path = Path::new(LOG_DIR).join(format!("attach-{}.log", resource.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the pairbd binary")?;
    let mut command = std::process::Command::new(exe);
    if let Some(config) = &ctx.config {
        command.arg("--config").arg(config);
    }
    if let Some(node) = &ctx.node {
        command.arg("--node").arg(node);
    }
    command
        .arg("attach")
        .arg(&resource.name)
        .arg("--device")
        .arg(device)
        .arg("--connections")
        .arg(args.connections.to_string())
        .arg("--timeout")
        .arg(args.timeout.to_string())
        .arg("--dead-timeout")
        .arg(args.dead_timeout.to_string())
        .arg("--supervise");
    if let Some(pid) = adopt {
        command.arg("--adopt").arg(pid.to_string());
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        // Its own process group: a ^C meant for attach's caller does not reach it.
        .process_group(0);
    let mut child = command
        .spawn()
        .context("cannot start the attach supervisor")?;
    let stdout = child.stdout.take().context("the supervisor's stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the supervisor's report")?;
    if let Some(message) = line.trim_end().strip_prefix("ok ") {
        return Ok(format!(
            "{message}, supervised by pid {} (log {})",
            child.id(),
            log_path.display()
        ));
    }
    let status = child.wait().context("waiting for the supervisor")?;
    let text = line
        .trim_end()
        .strip_prefix("error ")
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "the supervisor exited ({status}); see {}",
                log_path.display()
            )
        });
    bail!("{}", text.replace("\\n", "\n"))
}

/// `attach --supervise`: configure the device, report on stdout, then supervise it.
fn run_supervisor(
    resource: &ResourceConfig,
    candidates: Vec<Candidate>,
    args: &AttachArgs,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let device = args
        .device
        .as_deref()
        .context("--supervise needs --device")?;
    let index = device_index(device)?;
    let plan = supervise::Plan {
        candidates,
        export: resource.export.clone(),
        connections: args.connections,
        index,
        block_size_bytes: BLOCK_SIZE_BYTES,
        timeout_seconds: u64::from(args.timeout),
        dead_conn_timeout_seconds: u64::from(args.dead_timeout),
        adopted_from: args.adopt,
    };
    let mut stdout = std::io::stdout();
    let result = supervise::run(&plan, &mut stdout, |c| {
        format!(
            "node {}, {}, {} connection(s), netlink",
            c.node,
            c.address,
            c.sockets.len()
        )
    });
    if let Err(error) = &result {
        let _ = writeln!(stdout, "error {}", error.to_string().replace('\n', "\\n"));
        let _ = stdout.flush();
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// N of /dev/nbdN.
fn device_index(device: &Path) -> anyhow::Result<u32> {
    let name = nbd_name(device)?;
    name.trim_start_matches("nbd")
        .parse()
        .with_context(|| format!("{} has no device number", device.display()))
}

pub fn detach(ctx: &Context, args: DetachArgs) -> anyhow::Result<ExitCode> {
    let name = match args.resource {
        Some(name) => name,
        None => load_config(ctx)?.resource(None)?.name.clone(),
    };
    let link = Path::new(LINK_DIR).join(&name);
    let device = match std::fs::read_link(&link) {
        Ok(device) => device,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            bail!(
                "{name} is not attached on this host (no {})",
                link.display()
            )
        }
        Err(error) => return Err(error).context(format!("cannot read {}", link.display())),
    };
    let nbd = nbd_name(&device)?;
    let index = device_index(&device)?;
    // The supervisor first, so that it does not reconnect what is being taken down.
    for pid in supervisor_pids(&device) {
        // SAFETY: kill(2) takes no pointers; pid names a supervisor of this device
        // (checked by its command line just before).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let by_netlink =
        netlink::nbd_family().and_then(|(mut socket, family)| socket.disconnect(family.id, index));
    if let Err(error) = by_netlink {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let argv = vec!["-d".to_string(), device.display().to_string()];
        runtime
            .block_on(run_nbd_client(&argv))
            .with_context(|| format!("cannot detach {} (netlink: {error})", device.display()))?;
    }
    // The kernel releases the device (and its pid attribute) once its last reference
    // goes; a new attach of it before that would find it busy.
    let deadline = Instant::now() + RELEASE_LIMIT;
    while is_connected(&nbd) {
        if Instant::now() > deadline {
            bail!(
                "{} is still connected {}s after the disconnect",
                device.display(),
                RELEASE_LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
    println!("detached {name}: {} ({})", device.display(), link.display());
    Ok(ExitCode::SUCCESS)
}

/// For a connected device configured over netlink by a supervisor that is gone: that
/// supervisor's pid. (nbd-client's ioctl configuration lives only as long as its
/// process: a connected device whose process is gone was configured over netlink.)
fn orphaned_by(device: &Path) -> Option<u32> {
    let pid = supervise::device_pid(device_index(device).ok()?)?;
    (!process_alive(pid)).then_some(pid)
}

/// A process exists and is not a zombie (an orphaned supervisor killed under a PID 1
/// that has not reaped it yet is gone all the same).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses; STATE follows the
    // last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("");
    !matches!(state, "Z" | "X" | "")
}

/// The pids of the attach supervisors of `device` (the one that configured it, or
/// one that adopted it): processes whose command line is `... attach ... --device
/// DEVICE ... --supervise`.
fn supervisor_pids(device: &Path) -> Vec<u32> {
    let wanted = device.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            words.contains(&&b"--supervise"[..])
                && words.contains(&&b"attach"[..])
                && words
                    .windows(2)
                    .any(|pair| pair[0] == b"--device" && pair[1] == wanted)
        })
        .collect()
}

fn load_config(ctx: &Context) -> anyhow::Result<Config> {
    let path = ctx
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    Ok(Config::load(&path)?)
}

/// The nodes to try, in order, each with the addresses this host can use: `only` if
/// given, else the node named `hostname` first, then the others by id.
fn candidates(
    resource: &ResourceConfig,
    only: Option<&str>,
    hostname: &str,
) -> anyhow::Result<Vec<Candidate>> {
    let mut nodes: Vec<&NodeConfig> = match only {
        Some(name) => vec![resource.local(name)?],
        None => resource.nodes.values().collect(),
    };
    nodes.sort_by_key(|node| (node.name != hostname, node.id));
    let mut list = Vec::new();
    for node in nodes {
        let local = node.name == hostname;
        for address in &node.listen {
            if let Some(address) = reachable(address, local) {
                list.push(Candidate {
                    node: node.name.clone(),
                    address,
                });
            }
        }
    }
    if list.is_empty() {
        bail!(
            "no NBD listen address of {} is usable from this host (a unix: socket must \
             exist here; tcp:0.0.0.0 or tcp:[::] only names the node it runs on)",
            resource.name
        );
    }
    Ok(list)
}

/// The address to dial for a listen address, if this host can use it: a Unix socket
/// only where it exists, an unspecified IP (listen on all) only on that node itself.
fn reachable(address: &ListenAddr, local: bool) -> Option<ListenAddr> {
    match address {
        ListenAddr::Unix(path) => path.exists().then(|| address.clone()),
        ListenAddr::Tcp(socket) if socket.ip().is_unspecified() => local.then(|| {
            let loopback = match socket.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            ListenAddr::Tcp(SocketAddr::new(loopback, socket.port()))
        }),
        ListenAddr::Tcp(_) => Some(address.clone()),
    }
}

fn nbd_client_args(
    candidate: &Candidate,
    device: &Path,
    export: &str,
    args: &AttachArgs,
) -> Vec<String> {
    let mut argv = Vec::new();
    match &candidate.address {
        ListenAddr::Unix(path) => {
            argv.push("-u".to_string());
            argv.push(path.display().to_string());
        }
        ListenAddr::Tcp(socket) => {
            argv.push(socket.ip().to_string());
            argv.push(socket.port().to_string());
        }
    }
    argv.push(device.display().to_string());
    for (option, value) in [
        ("-N", export.to_string()),
        ("-b", "4096".to_string()),
        ("-C", args.connections.to_string()),
        ("-t", args.timeout.to_string()),
    ] {
        argv.push(option.to_string());
        argv.push(value);
    }
    argv
}

/// Runs nbd-client with `argv`; its output becomes the error when it fails.
async fn run_nbd_client(argv: &[String]) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("nbd-client")
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run nbd-client (install the Debian package nbd-client)")?;
    let output = tokio::time::timeout(NBD_CLIENT_LIMIT, child.wait_with_output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "nbd-client did not finish within {}s",
                NBD_CLIENT_LIMIT.as_secs()
            )
        })?
        .context("nbd-client")?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    bail!(
        "nbd-client failed ({}): {}",
        output.status,
        text.replace('\n', "; ")
    )
}

/// The device behind `link` if the link exists and its device is connected.
fn attached_device(link: &Path) -> Option<PathBuf> {
    let device = std::fs::read_link(link).ok()?;
    let name = nbd_name(&device).ok()?;
    is_connected(&name).then_some(device)
}

/// `nbd3` for `/dev/nbd3`; an error for anything that is not an NBD device name.
fn nbd_name(device: &Path) -> anyhow::Result<String> {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let number = name.strip_prefix("nbd").unwrap_or_default();
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{} is not an NBD device (/dev/nbdN)", device.display());
    }
    if !Path::new("/sys/block").join(name).exists() {
        bail!(
            "{} does not exist (nbd nbds_max too small?)",
            device.display()
        );
    }
    Ok(name.to_string())
}

/// The kernel shows a `pid` attribute for an NBD device while it is connected.
fn is_connected(name: &str) -> bool {
    Path::new("/sys/block").join(name).join("pid").exists()
}

fn ensure_nbd_module() -> anyhow::Result<()> {
    if Path::new("/sys/module/nbd").exists() {
        return Ok(());
    }
    let output = std::process::Command::new("modprobe")
        .arg("nbd")
        .output()
        .context("cannot run modprobe")?;
    if !Path::new("/sys/module/nbd").exists() {
        bail!(
            "this kernel has no nbd module (modprobe nbd: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn first_free_device() -> anyhow::Result<PathBuf> {
    let mut numbers: Vec<u32> = std::fs::read_dir("/sys/block")
        .context("cannot list /sys/block")?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix("nbd")?
                .parse()
                .ok()
        })
        .collect();
    numbers.sort_unstable();
    numbers
        .into_iter()
        .find(|n| !is_connected(&format!("nbd{n}")))
        .map(|n| PathBuf::from(format!("/dev/nbd{n}")))
        .ok_or_else(|| {
            anyhow::anyhow!("every NBD device is in use (load nbd with a larger nbds_max)")
        })
}

fn make_link(link: &Path, device: &Path) -> anyhow::Result<()> {
    let dir = link.parent().unwrap_or(Path::new(LINK_DIR));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match std::fs::remove_file(link) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error).context(format!("cannot replace {}", link.display())),
    }
    std::os::unix::fs::symlink(device, link)
        .with_context(|| format!("cannot create {}", link.display()))
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| {
            name.trim()
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

/// Arguments joined for display, quoted where a shell would need it.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            if !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b))
            {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/pairbd/pairbd.toml")).expect("a valid config")
    }

    const TWO_TCP_NODES: &str = r#"
[resource.mail]
size = "1GiB"
[resource.mail.node.alpha]
id = 1
backing = "a.img"
listen = ["tcp:10.0.0.1:10809"]
replication = "10.0.0.1:7789"
certificate = "alpha.crt"
key = "alpha.key"
control = "alpha.ctl"
[resource.mail.node.beta]
id = 2
backing = "b.img"
listen = ["tcp:0.0.0.0:10810", "unix:/nonexistent/beta.sock"]
replication = "10.0.0.2:7789"
certificate = "beta.crt"
key = "beta.key"
control = "beta.ctl"
"#;

    #[test]
    fn nodes_are_tried_by_id_with_this_host_first() {
        let config = config(TWO_TCP_NODES);
        let resource = config.resource(None).unwrap();
        let remote = candidates(resource, None, "mailhost").unwrap();
        // beta listens on all addresses only: from elsewhere it cannot be named, and its
        // Unix socket does not exist here.
        assert_eq!(
            remote,
            vec![Candidate {
                node: "alpha".into(),
                address: "tcp:10.0.0.1:10809".parse().unwrap()
            }]
        );
        let on_beta = candidates(resource, None, "beta").unwrap();
        assert_eq!(on_beta[0].node, "beta");
        assert_eq!(on_beta[0].address, "tcp:127.0.0.1:10810".parse().unwrap());
        assert_eq!(on_beta[1].node, "alpha");
        let only = candidates(resource, Some("alpha"), "beta").unwrap();
        assert_eq!(only.len(), 1);
        assert!(candidates(resource, Some("gamma"), "beta").is_err());
    }

    #[test]
    fn nbd_client_gets_the_options_pairbd_needs() {
        let args = AttachArgs {
            resource: None,
            device: None,
            connections: 2,
            timeout: 30,
            dead_timeout: 120,
            nbd_client: true,
            dry_run: true,
            supervise: false,
            adopt: None,
        };
        let tcp = Candidate {
            node: "alpha".into(),
            address: "tcp:10.0.0.1:10809".parse().unwrap(),
        };
        assert_eq!(
            nbd_client_args(&tcp, Path::new("/dev/nbd1"), "mail", &args).join(" "),
            "10.0.0.1 10809 /dev/nbd1 -N mail -b 4096 -C 2 -t 30"
        );
        let unix = Candidate {
            node: "alpha".into(),
            address: "unix:/run/pairbd/mail.sock".parse().unwrap(),
        };
        assert_eq!(
            nbd_client_args(&unix, Path::new("/dev/nbd0"), "", &args),
            [
                "-u",
                "/run/pairbd/mail.sock",
                "/dev/nbd0",
                "-N",
                "",
                "-b",
                "4096",
                "-C",
                "2",
                "-t",
                "30"
            ]
        );
        assert_eq!(shell_words(&["-N".into(), "".into()]), "-N ''");
    }

    #[test]
    fn only_nbd_devices_are_accepted() {
        assert!(nbd_name(Path::new("/dev/sda")).is_err());
        assert!(nbd_name(Path::new("/dev/nbd")).is_err());
        assert!(nbd_name(Path::new("/dev/nbd0p1")).is_err());
    }
}
