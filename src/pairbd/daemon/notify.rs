//! systemd's notification protocol (`sd_notify`), for `Type=notify` units:
//! `READY=1` once the node serves, `STATUS=` with its role, disk and link (kept
//! current), `WATCHDOG=1` at half the unit's `WatchdogSec=` while the
//! replication core answers, and `STOPPING=1` on a clean stop.
//!
//! The protocol is one datagram per message to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`). Without
//! that variable every call is a no-op. Written here rather than taken from a
//! crate: it is a dozen lines.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::driver::Driver;

/// The notification socket, if systemd gave one.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; a missing or unusable one gives a silent notifier.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        let path = path.to_string_lossy().to_string();
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        };
        match (UnixDatagram::unbound(), addr) {
            (Ok(sock), Ok(addr)) => Notifier {
                socket: Some((sock, addr)),
            },
            (Err(e), _) | (_, Err(e)) => {
                warn!("NOTIFY_SOCKET={path} is unusable ({e}); not notifying systemd");
                Notifier { socket: None }
            }
        }
    }

    /// Sends one notification (newline-separated `KEY=VALUE` lines).
    pub fn send(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                warn!("notifying systemd failed: {e}");
            }
        }
    }

    /// Whether systemd listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }
}

/// `$WATCHDOG_USEC` (for this process, per `$WATCHDOG_PID`), if set.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// A one-line status: role, disk, link and peer.
pub fn status_line(driver: &Driver) -> String {
    let s = driver.status();
    let peer = match &s.peer {
        Some(p) => format!(
            ", peer {} {}/{}",
            p.node_name,
            pairbd_repl_core::role_name(p.role),
            pairbd_repl_core::disk_name(p.disk)
        ),
        None => String::new(),
    };
    let sync = s
        .sync
        .map(|y| format!(", sync {:.1}%", y.percent()))
        .unwrap_or_default();
    format!(
        "{} {}/{}, {}{peer}{sync}",
        s.resource,
        pairbd_repl_core::role_name(s.role),
        pairbd_repl_core::disk_name(s.disk),
        s.connection.name()
    )
}

/// Keeps STATUS= current and pets the watchdog while the core answers (the
/// status is read under the core's lock, so a wedged core stops the pets and
/// systemd restarts the daemon). Runs until the task is dropped.
pub async fn run(notifier: Arc<Notifier>, driver: Arc<Driver>) {
    if !notifier.enabled() {
        return;
    }
    let watchdog = watchdog_interval();
    let tick = watchdog
        .map(|w| (w / 2).min(Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1));
    let mut last = String::new();
    loop {
        let line = status_line(&driver);
        let mut message = String::new();
        if line != last {
            message.push_str(&format!("STATUS={line}\n"));
            last = line;
        }
        if watchdog.is_some() && !driver.failed.is_cancelled() {
            message.push_str("WATCHDOG=1\n");
        }
        if !message.is_empty() {
            notifier.send(&message);
        }
        tokio::time::sleep(tick).await;
    }
}
