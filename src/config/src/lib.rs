//! pairbd's configuration: one TOML file describes a pair; both nodes read the
//! same file and `--node` (or the hostname) picks the local one.
//!
//! ```toml
//! [resource.mail]
//! size = "1GiB"
//! [resource.mail.node.alpha]
//! id = 1
//! backing = "alpha.img"
//! replication = "127.0.0.1:7789"
//! certificate = "alpha.crt"
//! key = "alpha.key"
//! control = "alpha.ctl"
//! [resource.mail.node.beta]
//! ...
//! ```
//!
//! Every error names the file, the line and the key (`resource.mail.node.alpha.id`),
//! and says what is wrong; unknown keys are errors. Relative paths are taken
//! relative to the configuration file's directory.

mod parse;

pub use parse::MAX_INFLIGHT_BYTES_DEFAULT;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use pairbd_nbd_server::ListenAddr;

/// A configuration error, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something in the file is wrong.
    #[error("config {path} line {line}: {key}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    /// A choice outside the file is wrong (node, resource).
    #[error("config {path}: {message}")]
    Selection { path: PathBuf, message: String },
    /// A node asked of a resource that does not have it.
    #[error("resource {resource} has no node named {node:?}; its nodes are: {known}")]
    NoSuchNode {
        resource: String,
        node: String,
        known: String,
    },
}

/// What a primary does while its peer is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPeerLoss {
    /// Keep serving on one node.
    Continue,
    /// Hold writes until the peer returns or `resume-io`.
    SuspendIo,
}

/// What a node that crashed as Primary does when it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start as Secondary and wait for an operator or cluster manager.
    Secondary,
    /// Become Primary again once the peer connects as a Secondary without
    /// newer data (never while the peer is away).
    ResumePrimary,
}

/// What a node does when it finds itself in split brain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSplitBrain {
    /// StandAlone until the operator resolves it (the default).
    Disconnect,
    /// Discard the side that changed nothing, if exactly one did.
    DiscardZeroChanges,
}

/// The disk engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring where the kernel allows it, else the thread pool.
    Auto,
    /// io_uring.
    Uring,
    /// The thread pool.
    Pool,
}

/// Where a node keeps its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// Behind the data area of the backing store.
    Internal,
    /// In its own file.
    External(PathBuf),
}

/// One node of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub id: u8,
    pub backing: PathBuf,
    pub meta: MetaLocation,
    pub listen: Vec<ListenAddr>,
    /// The UDP address this node's QUIC endpoint binds.
    pub replication: SocketAddr,
    /// The address the peer dials to reach this node.
    pub connect: SocketAddr,
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub control: PathBuf,
}

/// The default `merge-bytes`: adjacent writes emitted together are merged
/// into store writes of up to this many bytes (docs/OPERATIONS.md).
pub const DEFAULT_MERGE_BYTES: u64 = 1 << 20;

/// The largest `merge-bytes` accepted (half the store's largest request).
pub const MERGE_BYTES_MAX: u64 = 16 << 20;

/// The default `bulk-lane-bytes`: client writes of at least this many bytes
/// travel on the link's bulk lane, so that the small writes, acks and
/// flushes behind them are not held up (docs/PROTOCOL.md, "Two lanes").
pub const DEFAULT_BULK_LANE_BYTES: u64 = 64 << 10;

/// One replicated resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    pub name: String,
    pub size_bytes: u64,
    pub export: String,
    pub on_peer_loss: OnPeerLoss,
    pub after_crash: AfterCrash,
    pub after_split_brain: AfterSplitBrain,
    pub ping_timeout: Duration,
    pub ack_timeout: Duration,
    pub sync_chunk_bytes: u64,
    pub sync_window: usize,
    /// The most replication messages written to the link in one write, or
    /// handled under one lock when received (`batch-messages`, default 256).
    pub batch_messages: usize,
    /// A batch of replication messages closes once it holds this many
    /// bytes (`batch-bytes`, default 4 MiB). Only what is already queued is
    /// batched: nothing waits for a batch to fill.
    pub batch_bytes: u64,
    /// The most bytes one merged store write may hold (`merge-bytes`,
    /// default [`DEFAULT_MERGE_BYTES`]; 0: no merging): adjacent plain
    /// writes the core emits together become one vectored store write.
    pub merge_bytes: u64,
    /// How long the link's writer may wait for more queued messages before
    /// it writes a batch that is not full (`batch-delay`, 0 to 10 ms;
    /// default 0: only what is already queued is batched).
    pub batch_delay: Duration,
    /// The in-flight window: the most client write payload bytes sent to
    /// the peer and not yet acknowledged (`max-inflight-bytes`, 4 KiB to
    /// 1 GiB, default 16 MiB). Beyond it writes wait (backpressure).
    pub max_inflight_bytes: u64,
    /// Client writes of at least this many bytes travel on the link's bulk
    /// lane, a second QUIC stream of lower priority that the main lane
    /// overtakes (`bulk-lane-bytes`, 0 or 4 KiB to 32 MiB, default
    /// [`DEFAULT_BULK_LANE_BYTES`]; 0: one stream for everything). Only the
    /// sender's setting matters: the nodes need not agree.
    pub bulk_lane_bytes: u64,
    /// Bytes per bit of the dirty bitmap; `None`: the daemon picks the
    /// smallest from 4 KiB up whose bitmap fits the metadata area.
    pub bitmap_granularity_bytes: Option<u64>,
    /// The most bytes per second a sync sends (`None`: unlimited).
    pub sync_rate_bytes_per_sec: Option<u64>,
    /// The rate a sync drops to while clients are active (`sync-rate-min`;
    /// `None`: it does not yield).
    pub sync_rate_min_bytes_per_sec: Option<u64>,
    /// Bytes per activity-log extent (`al-extent-size`, default 4 MiB).
    pub al_extent_bytes: u64,
    /// Extents in the activity log (`al-extents`, default 257).
    pub al_extents: usize,
    pub engine: Engine,
    pub direct_io: bool,
    /// `direct-reads` (default true): aligned reads bypass the page cache through an
    /// O_DIRECT description while writes stay buffered. Ignored with `direct-io`.
    pub direct_reads: bool,
    /// `aio-reads` (default true): those O_DIRECT reads are submitted with Linux native
    /// AIO on the caller's thread instead of through the engine's thread.
    pub aio_reads: bool,
    pub nodes: BTreeMap<String, NodeConfig>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub resources: BTreeMap<String, ResourceConfig>,
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Checks configuration text; `path` names it in errors and anchors
    /// relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse::parse(text, path)
    }

    fn selection(&self, message: String) -> ConfigError {
        ConfigError::Selection {
            path: self.path.clone(),
            message,
        }
    }

    fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .resources
            .values()
            .flat_map(|r| r.nodes.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The local node: `node` if given (it must be a node of some resource),
    /// else the node named like this machine's short hostname.
    pub fn select_node(&self, node: Option<&str>) -> Result<&str, ConfigError> {
        self.select_node_for_host(node, hostname)
    }

    /// [`Config::select_node`] with the hostname lookup passed in, so that
    /// tests do not depend on the machine's name.
    fn select_node_for_host(
        &self,
        node: Option<&str>,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<&str, ConfigError> {
        let (wanted, from_host) = match node {
            Some(n) => (n.to_string(), false),
            None => (hostname().unwrap_or_default(), true),
        };
        let found = self
            .resources
            .values()
            .flat_map(|r| r.nodes.keys())
            .find(|n| **n == wanted);
        match found {
            Some(name) => Ok(name.as_str()),
            None if from_host => Err(self.selection(format!(
                "no node named after this host ({wanted}); pass --node one of: {}",
                self.node_names().join(", ")
            ))),
            None => Err(self.selection(format!(
                "no node named {wanted:?}; the nodes are: {}",
                self.node_names().join(", ")
            ))),
        }
    }

    /// The resource named `name`, or the only one.
    pub fn resource(&self, name: Option<&str>) -> Result<&ResourceConfig, ConfigError> {
        let names: Vec<&str> = self.resources.keys().map(String::as_str).collect();
        match name {
            Some(n) => self.resources.get(n).ok_or_else(|| {
                self.selection(format!(
                    "no resource named {n:?}; the resources are: {}",
                    names.join(", ")
                ))
            }),
            None => match self.resources.values().next() {
                Some(only) if self.resources.len() == 1 => Ok(only),
                _ => Err(self.selection(format!(
                    "several resources ({}); name one",
                    names.join(", ")
                ))),
            },
        }
    }
}

impl ResourceConfig {
    fn no_such_node(&self, node: &str) -> ConfigError {
        ConfigError::NoSuchNode {
            resource: self.name.clone(),
            node: node.to_string(),
            known: self
                .nodes
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// The node named `node` in this resource.
    pub fn local(&self, node: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.get(node).ok_or_else(|| self.no_such_node(node))
    }

    /// The other node of this resource (parsing guarantees there are two).
    pub fn peer(&self, node: &str) -> Result<&NodeConfig, ConfigError> {
        self.local(node)?;
        self.nodes
            .values()
            .find(|n| n.name != node)
            .ok_or_else(|| self.no_such_node(node))
    }
}

fn hostname() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = text.trim();
    // The short name: nodes are usually named like hosts without their domain.
    Some(name.split('.').next().unwrap_or(name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_NODES: &str = r#"
[resource.mail]
size = "1MiB"
[resource.mail.node.alpha]
id = 1
backing = "a.img"
replication = "127.0.0.1:7789"
certificate = "a.crt"
key = "a.key"
control = "a.ctl"
[resource.mail.node.beta]
id = 2
backing = "b.img"
replication = "127.0.0.1:7790"
certificate = "b.crt"
key = "b.key"
control = "b.ctl"
"#;

    fn config() -> Config {
        Config::parse(TWO_NODES, Path::new("/etc/pairbd/pairbd.toml")).unwrap()
    }

    #[test]
    fn the_hostname_picks_the_node_or_the_error_says_what_to_pass() {
        let c = config();
        let host = || Some("beta".to_string());
        assert_eq!(c.select_node_for_host(None, host).unwrap(), "beta");
        let e = c
            .select_node_for_host(None, || Some("mx1".to_string()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config /etc/pairbd/pairbd.toml: no node named after this host (mx1); \
             pass --node one of: alpha, beta"
        );
        // An explicit --node is never overridden by the hostname.
        let e = c
            .select_node_for_host(Some("gamma"), || Some("alpha".to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no node named \"gamma\""), "{e}");
    }

    #[test]
    fn local_and_peer_name_the_resource_and_its_nodes() {
        let c = config();
        let r = c.resource(None).unwrap();
        assert_eq!(r.peer("beta").unwrap().name, "alpha");
        let e = r.peer("gamma").unwrap_err().to_string();
        assert_eq!(
            e,
            "resource mail has no node named \"gamma\"; its nodes are: alpha, beta"
        );
    }
}
