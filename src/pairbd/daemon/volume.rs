//! The replicated volume the NBD server serves: the same serving path as
//! `pairbd serve`, with every change going through the replication core.
//! Reads go to the local store directly (the primary's copy is the current
//! one); only a primary accepts clients.

use std::sync::Arc;

use pairbd_nbd_server::{Volume, VolumeError};
use pairbd_repl_core::{role_name, ClientOp, ReplyError};
use pairbd_store::AlignedBuf;

use super::driver::{Driver, SharedBuf};

/// See the module documentation.
pub struct ReplicatedVolume {
    pub driver: Arc<Driver>,
    pub resource: String,
}

fn reply_error(e: ReplyError) -> VolumeError {
    match e {
        ReplyError::NotPrimary | ReplyError::Stopping => VolumeError::Shutdown,
        ReplyError::OutOfRange => VolumeError::OutOfRange,
        ReplyError::Io(m) => VolumeError::Io(m),
    }
}

impl ReplicatedVolume {
    fn check_aligned(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        let store = self.driver.store();
        if store.direct_io() {
            let a = store.io_alignment();
            if offset % a != 0 || length % a != 0 {
                return Err(VolumeError::Unaligned);
            }
        }
        Ok(())
    }
}

impl Volume for ReplicatedVolume {
    fn size_bytes(&self) -> u64 {
        self.driver.store().size_bytes()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn alignment(&self) -> u32 {
        Volume::alignment(self.driver.store())
    }

    fn description(&self) -> String {
        format!(
            "pairbd replicated resource {}, {} engine",
            self.resource,
            self.driver.store().engine_kind()
        )
    }

    fn refusal(&self) -> Option<String> {
        if self.driver.serves_clients() {
            return None;
        }
        let s = self.driver.status();
        Some(format!(
            "pairbd: resource {} on node {} is {}, not Primary; connect to the primary",
            s.resource,
            s.node_name,
            role_name(s.role)
        ))
    }

    async fn read(&self, offset: u64, length: usize) -> Result<AlignedBuf, VolumeError> {
        if !self.driver.serves_clients() {
            return Err(VolumeError::Shutdown);
        }
        Ok(self.driver.store().read(offset, length).await?)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        self.check_aligned(offset, data.len() as u64)?;
        self.driver
            .submit(ClientOp::Write {
                offset,
                payload: SharedBuf(Arc::new(data)),
                fua,
            })
            .await
            .map_err(reply_error)
    }

    async fn flush(&self) -> Result<(), VolumeError> {
        self.driver
            .submit(ClientOp::Flush)
            .await
            .map_err(reply_error)
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        self.driver
            .submit(ClientOp::Trim { offset, length })
            .await
            .map_err(reply_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast_only: bool,
    ) -> Result<(), VolumeError> {
        if fast_only {
            // Both nodes would have to promise a fast zeroing; answering
            // ENOTSUP lets the client write zeroes itself, as the spec allows.
            return Err(VolumeError::NotSupported);
        }
        self.driver
            .submit(ClientOp::WriteZeroes {
                offset,
                length,
                no_hole,
            })
            .await
            .map_err(reply_error)
    }
}
