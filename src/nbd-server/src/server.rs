//! The accept loops: bind every listen address, accept connections, and on shutdown
//! stop accepting and wait until every connection has answered what it accepted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::clients::Clients;
use crate::connection::{self, ConnectionContext, ConnectionLimits};
use crate::listen::{ListenAddr, Listener};
use crate::volume::Volume;

/// The export a server offers.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The export name; clients asking for "" get this export too.
    pub name: String,
}

/// A server that failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: ListenAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No listen address was given.
    #[error("no listen address")]
    NoListener,
}

/// An NBD server with its listeners bound.
pub struct Server<V> {
    volume: Arc<V>,
    export: ExportConfig,
    limits: ConnectionLimits,
    listeners: Vec<(ListenAddr, Listener)>,
    clients: Clients,
}

impl<V: Volume> Server<V> {
    /// Binds every address; fails if any cannot be bound.
    pub async fn bind(
        volume: Arc<V>,
        export: ExportConfig,
        addresses: &[ListenAddr],
        limits: ConnectionLimits,
    ) -> Result<Self, ServerError> {
        if addresses.is_empty() {
            return Err(ServerError::NoListener);
        }
        let mut listeners = Vec::with_capacity(addresses.len());
        for address in addresses {
            let listener = Listener::bind(address)
                .await
                .map_err(|source| ServerError::Bind {
                    address: address.clone(),
                    source,
                })?;
            let bound = match &listener {
                Listener::Tcp(tcp) => tcp
                    .local_addr()
                    .map(ListenAddr::Tcp)
                    .unwrap_or(address.clone()),
                Listener::Unix(..) => address.clone(),
            };
            listeners.push((bound, listener));
        }
        Ok(Server {
            volume,
            export,
            limits,
            listeners,
            clients: Clients::default(),
        })
    }

    /// The addresses actually bound (a TCP port 0 shows the port chosen).
    pub fn local_addresses(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .map(|(address, _)| address.clone())
            .collect()
    }

    /// The registry of attached clients (valid before and during `run`).
    pub fn clients(&self) -> Clients {
        self.clients.clone()
    }

    /// Serves until `shutdown` is cancelled, then waits for every connection to answer
    /// the requests it accepted.
    pub async fn run(self, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let next_id = Arc::new(AtomicU64::new(1));
        let slots = Arc::new(Semaphore::new(self.limits.normalised().max_connections));
        let accept_loops = TaskTracker::new();
        for (address, listener) in self.listeners {
            let state = AcceptState {
                volume: Arc::clone(&self.volume),
                export: self.export.clone(),
                limits: self.limits.clone(),
                shutdown: shutdown.clone(),
                connections: connections.clone(),
                next_id: Arc::clone(&next_id),
                slots: Arc::clone(&slots),
                clients: self.clients.clone(),
            };
            accept_loops.spawn(accept_loop(address, listener, state));
        }
        accept_loops.close();
        accept_loops.wait().await;
        connections.close();
        connections.wait().await;
    }
}

struct AcceptState<V> {
    volume: Arc<V>,
    export: ExportConfig,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    connections: TaskTracker,
    next_id: Arc<AtomicU64>,
    /// One permit per connection held; accepting waits for a free one.
    slots: Arc<Semaphore>,
    clients: Clients,
}

impl<V: Volume> AcceptState<V> {
    fn context(&self, peer: String) -> ConnectionContext<V> {
        ConnectionContext {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            export_name: self.export.name.clone(),
            volume: Arc::clone(&self.volume),
            limits: self.limits.clone(),
            shutdown: self.shutdown.clone(),
            clients: self.clients.clone(),
        }
    }
}

async fn accept_loop<V: Volume>(address: ListenAddr, listener: Listener, state: AcceptState<V>) {
    info!(%address, "listening");
    loop {
        let slot = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            slot = Arc::clone(&state.slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        // Accepting is the only part that differs between TCP and Unix sockets.
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            accepted = accept(&listener, &address) => accepted,
        };
        match accepted {
            Ok(Accepted {
                reader,
                writer,
                peer,
            }) => {
                let context = state.context(peer);
                state.connections.spawn(async move {
                    connection::serve(context, reader, writer).await;
                    drop(slot);
                });
            }
            Err(error) => accept_failed(&address, error).await,
        }
    }
    info!(%address, "stopped listening");
}

/// An accepted connection, as the two halves the connection task drives.
struct Accepted {
    reader: Box<dyn AsyncRead + Unpin + Send>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    peer: String,
}

async fn accept(listener: &Listener, address: &ListenAddr) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(tcp) => {
            let (stream, peer) = tcp.accept().await?;
            // Small replies (and FLUSH answers) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let (reader, writer) = stream.into_split();
            Ok(Accepted {
                reader: Box::new(reader),
                writer: Box::new(writer),
                peer: peer.to_string(),
            })
        }
        Listener::Unix(unix, _) => {
            let (stream, _) = unix.accept().await?;
            let (reader, writer) = stream.into_split();
            Ok(Accepted {
                reader: Box::new(reader),
                writer: Box::new(writer),
                peer: address.to_string(),
            })
        }
    }
}

async fn accept_failed(address: &ListenAddr, error: std::io::Error) {
    // EMFILE and friends: log, give the system a moment, keep serving the others.
    warn!(%address, %error, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
