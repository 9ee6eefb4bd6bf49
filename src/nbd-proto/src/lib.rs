//! The NBD protocol codec of pairbd: bytes in, decisions and bytes out.
//!
//! This crate holds everything about the NBD wire protocol that can be decided without
//! touching a socket, a disk or a clock: the fixed-newstyle handshake as a sans-IO state
//! machine ([`handshake::Handshake`]), and the decoding, validation and encoding of
//! transmission-phase requests and simple replies ([`transmission`]). The tokio driver in
//! `pairbd-nbd-server` moves the bytes; it makes no protocol decisions of its own.
//!
//! Architecture invariant: the crate is pure. Its only runtime dependency is `thiserror`;
//! it performs no IO, starts no threads and reads no clock, so every behaviour can be
//! driven byte by byte from tests, property tests and fuzzers.
//!
//! Architecture invariant: no input bytes can make it panic, and no length sent by a
//! client makes it allocate beyond the fixed limits it was given.
//!
//! The authority for every detail is the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd repository).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod consts;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod transmission;
mod wire;

pub use error::NbdError;
