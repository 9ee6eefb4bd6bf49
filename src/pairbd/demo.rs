//! `pairbd demo`: a replicated pair on local files, in one command — the
//! README's first command. It writes certificates, a configuration and both
//! nodes' metadata into a directory (once), starts both daemons as child
//! processes, makes alpha Primary, prints how to attach and watch, and stops
//! both cleanly on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::daemon::control;
use crate::size::parse_size;

/// Arguments of `pairbd demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the pair's files live (kept between runs).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/pairbd-demo")]
    dir: PathBuf,
    /// The volume size when the pair is first created.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// The first of four ports on 127.0.0.1: NBD of alpha and beta (TCP),
    /// replication of alpha and beta (UDP).
    #[arg(long, value_name = "PORT", default_value_t = 10809)]
    base_port: u16,
}

fn config_text(size: u64, port: u16) -> String {
    let mut text = format!(
        "# The pairbd demo pair: two nodes on this machine.\n\
         [resource.mail]\nsize = {size}\n"
    );
    for (i, node) in ["alpha", "beta"].iter().enumerate() {
        let i16 = i as u16;
        text.push_str(&format!(
            "\n[resource.mail.node.{node}]\nid = {}\nbacking = \"{node}.img\"\n\
             listen = [\"unix:{node}.sock\", \"tcp:127.0.0.1:{}\"]\n\
             replication = \"127.0.0.1:{}\"\ncertificate = \"{node}.crt\"\nkey = \"{node}.key\"\n\
             control = \"{node}.ctl\"\n",
            i + 1,
            port + i16,
            port + 2 + i16,
        ));
    }
    text
}

fn prepare(dir: &Path, size: u64, port: u16) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("pairbd.toml");
    if !config.exists() {
        if size == 0 || size % 4096 != 0 {
            bail!("--size must be a positive multiple of 4096 bytes");
        }
        for node in ["alpha", "beta"] {
            let (cert, key) = pairbd_link::generate_certificate(node)?;
            std::fs::write(dir.join(format!("{node}.crt")), cert)?;
            crate::admin::write_private(&dir.join(format!("{node}.key")), key.as_bytes())?;
        }
        std::fs::write(&config, config_text(size, port))?;
        println!("pairbd demo: created a pair in {}", dir.display());
    }
    let cfg = pairbd_config::Config::load(&config)?;
    let res = cfg.resource(None)?;
    for node in res.nodes.values() {
        let location = crate::daemon::meta_location(node);
        if pairbd_meta::MetaStore::open(&location).is_err() {
            pairbd_meta::create_md(
                &node.backing,
                &location,
                res.size_bytes,
                node.id,
                &node.name,
                &res.name,
                false,
            )?;
        }
    }
    Ok(config)
}

async fn start(config: &Path, node: &str) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the pairbd binary")?;
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(["--node", node, "daemon"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if line.contains("ready") {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(child);
        }
    }
    bail!("the {node} daemon stopped before it was ready (its log is above)")
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let config = prepare(&args.dir, args.size, args.base_port)?;
    let cfg = pairbd_config::Config::load(&config)?;
    let res = cfg.resource(None)?.clone();
    let mut alpha = start(&config, "alpha").await?;
    let mut beta = start(&config, "beta").await?;
    let ctl = res.local("alpha")?.control.clone();
    // Wait for the link before promoting, so that a second run promotes the
    // UpToDate alpha without --force.
    let mut status = json!(null);
    for _ in 0..100 {
        status = control::request(&ctl, json!({"command": "status"})).await?;
        if status["status"]["connection"] == "Connected" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let s = &status["status"];
    if s["role"] != "Primary" {
        let force = s["disk"] != "UpToDate";
        let answer = control::request(&ctl, json!({"command": "promote", "force": force})).await?;
        if answer["ok"] != true {
            bail!("promoting alpha failed: {}", answer["error"]);
        }
    }
    let alpha_node = res.local("alpha")?;
    println!(
        "pairbd demo: ready: alpha is Primary and serves export \"{}\" on {}; beta replicates it.\n\
         attach: nbdinfo nbd://127.0.0.1:{}/{}   (or nbdfuse, or nbd-client 127.0.0.1 {} /dev/nbd0 -N {})\n\
         watch:  pairbd --config {} --node alpha status   (add --json for scripts)\n\
         stop:   Ctrl-C",
        res.export,
        alpha_node
            .listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        args.base_port,
        res.export,
        args.base_port,
        res.export,
        config.display()
    );
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
        s = alpha.wait() => bail!("the alpha daemon stopped: {s:?}"),
        s = beta.wait() => bail!("the beta daemon stopped: {s:?}"),
    }
    for child in [&mut alpha, &mut beta] {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid we spawned and still own; no memory involved.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    alpha.wait().await?;
    beta.wait().await?;
    println!("pairbd demo: stopped; run it again to resume the same pair");
    Ok(ExitCode::SUCCESS)
}
