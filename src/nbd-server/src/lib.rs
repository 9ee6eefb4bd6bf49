//! The NBD server driver: the thin tokio layer between sockets and a [`Volume`].
//!
//! Everything protocol-shaped (handshake state machine, request validation, reply
//! encoding) lives in the pure `pairbd-nbd-proto` crate; this crate only moves bytes
//! between sockets and that codec, and turns accepted commands into [`Volume`] calls.
//! The volume is a plain local store today (`pairbd serve`); the replicated volume of
//! the daemon implements the same trait, so the serving path stays the same.
//!
//! Architecture invariants:
//! - A reply leaves only after the volume call it answers has completed.
//! - Every connection bounds its in-flight requests and in-flight bytes; when a bound
//!   is reached the connection stops reading from its socket (backpressure).
//! - Bad bytes on one connection close that connection only.

mod clients;
mod connection;
mod listen;
mod server;
mod volume;

pub use clients::{ClientInfo, Clients};
pub use connection::ConnectionLimits;
pub use listen::{ListenAddr, ListenAddrError};
pub use server::{ExportConfig, Server, ServerError};
pub use volume::{Volume, VolumeError};
