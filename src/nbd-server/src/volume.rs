//! The [`Volume`] trait: what the NBD driver needs from whatever stores the data.
//!
//! `pairbd serve` hands the driver a local [`pairbd_store::Store`]; the replicated
//! daemon hands it a volume that also waits for the peer. Each method completes only
//! when its effect has the durability the NBD command promises (FUA: durable before
//! completion; flush: every write completed before the call is durable).

use std::future::Future;

use pairbd_nbd_proto::NbdError;
use pairbd_store::{AlignedBuf, Store, StoreError};

/// Why a volume operation failed, in the terms the NBD client will see.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request does not fit the volume (should have been caught by validation).
    #[error("request out of range")]
    OutOfRange,
    /// The volume does not accept writes.
    #[error("volume is read-only")]
    ReadOnly,
    /// The operation cannot be done the way it was asked (e.g. a fast zero).
    #[error("operation not supported")]
    NotSupported,
    /// The request is not aligned the way the volume needs.
    #[error("request not aligned")]
    Unaligned,
    /// The volume is shutting down.
    #[error("volume is shutting down")]
    Shutdown,
    /// The data may not be where the client expects it.
    #[error("I/O error: {0}")]
    Io(String),
}

impl VolumeError {
    /// The NBD error code the client receives for this failure.
    pub fn nbd_error(&self) -> NbdError {
        match self {
            VolumeError::OutOfRange => NbdError::Inval,
            VolumeError::ReadOnly => NbdError::Perm,
            VolumeError::NotSupported => NbdError::NotSup,
            VolumeError::Unaligned => NbdError::Inval,
            VolumeError::Shutdown => NbdError::Shutdown,
            VolumeError::Io(_) => NbdError::Io,
        }
    }
}

impl From<StoreError> for VolumeError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::ReadOnly => VolumeError::ReadOnly,
            StoreError::OutOfRange { .. } => VolumeError::OutOfRange,
            StoreError::Unaligned { .. } => VolumeError::Unaligned,
            StoreError::NotSupported => VolumeError::NotSupported,
            StoreError::EngineStopped => VolumeError::Shutdown,
            other => VolumeError::Io(other.to_string()),
        }
    }
}

/// A block volume the NBD driver can serve.
pub trait Volume: Send + Sync + 'static {
    /// The size the clients see, in bytes.
    fn size_bytes(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// The alignment requests must have (1 when any byte offset works).
    fn alignment(&self) -> u32;
    /// A short human description (shown by `nbdinfo`).
    fn description(&self) -> String;
    /// Why the volume refuses new clients now (a replicated volume on a
    /// secondary, say), or `None` when it accepts them. Checked at each handshake.
    fn refusal(&self) -> Option<String> {
        None
    }
    /// Reads `length` bytes at `offset`.
    fn read(
        &self,
        offset: u64,
        length: usize,
    ) -> impl Future<Output = Result<AlignedBuf, VolumeError>> + Send;
    /// Writes `data` at `offset`; with `fua` it is durable before completion.
    fn write(
        &self,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Discards a range; it reads back as zeroes afterwards.
    fn trim(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Zeroes a range; `no_hole` keeps it allocated, `fast_only` refuses slow zeroing.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast_only: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;
}

impl Volume for Store {
    fn size_bytes(&self) -> u64 {
        Store::size_bytes(self)
    }

    fn read_only(&self) -> bool {
        Store::read_only(self)
    }

    fn alignment(&self) -> u32 {
        // O_DIRECT needs the device's alignment (512 or 4096); buffered I/O takes any
        // offset.
        if self.direct_io() {
            u32::try_from(self.io_alignment()).unwrap_or(4096)
        } else {
            1
        }
    }

    fn description(&self) -> String {
        format!("pairbd local store, {} engine", self.engine_kind())
    }

    async fn read(&self, offset: u64, length: usize) -> Result<AlignedBuf, VolumeError> {
        Ok(Store::read(self, offset, length).await?)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        Ok(Store::write(self, offset, data, fua).await?)
    }

    async fn flush(&self) -> Result<(), VolumeError> {
        Ok(Store::flush(self).await?)
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        Ok(Store::discard(self, offset, length).await?)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast_only: bool,
    ) -> Result<(), VolumeError> {
        Ok(Store::write_zeroes(self, offset, length, no_hole, fast_only).await?)
    }
}
