//! The registry of attached clients: who is connected (for `pairbd demote`,
//! which refuses while clients are attached and names them) and a way to cut
//! them all off at once (`demote --force`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// One attached client, as status and refusals show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The server's connection number.
    pub id: u64,
    /// The client's address (or the Unix socket's path).
    pub peer: String,
    /// The export it attached to.
    pub export: String,
    /// When it finished the handshake.
    pub since: SystemTime,
}

struct Entry {
    info: ClientInfo,
    kill: CancellationToken,
}

/// The attached clients of one server; cheap to clone, shared.
#[derive(Clone, Default)]
pub struct Clients(Arc<Mutex<BTreeMap<u64, Entry>>>);

impl Clients {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The clients attached now, oldest first.
    pub fn list(&self) -> Vec<ClientInfo> {
        self.map().values().map(|e| e.info.clone()).collect()
    }

    /// Cuts every attached client off at once: their connections stop
    /// reading, replies not yet sent are dropped, the sockets close (the
    /// clients see their in-flight requests fail). Returns who was cut off.
    pub fn disconnect_all(&self) -> Vec<ClientInfo> {
        let map = self.map();
        for e in map.values() {
            e.kill.cancel();
        }
        map.values().map(|e| e.info.clone()).collect()
    }

    /// Registers an attached client; it leaves the registry when the guard
    /// is dropped.
    pub(crate) fn attach(&self, info: ClientInfo, kill: CancellationToken) -> Attached {
        let id = info.id;
        self.map().insert(id, Entry { info, kill });
        Attached {
            clients: self.clone(),
            id,
        }
    }
}

/// A registered client; dropping it unregisters.
pub(crate) struct Attached {
    clients: Clients,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.clients.map().remove(&self.id);
    }
}
