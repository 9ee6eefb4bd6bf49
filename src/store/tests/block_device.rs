//! A block device as the store, on both engines: a loop device over a temp image.
//! Skipped, with a message, where loop devices cannot be attached (not root, no
//! /dev/loop-control, or a sandbox that forbids it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_zeroes, pattern, temp_dir, MIB};
use pairbd_store::{EngineChoice, Store, StoreConfig, StoreError};

/// An attached loop device, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> Option<LoopDevice> {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output();
        match output {
            Ok(output) if output.status.success() => {
                let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                Some(LoopDevice { path: path.into() })
            }
            Ok(output) => {
                eprintln!(
                    "SKIPPED: cannot attach a loop device: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(err) => {
                eprintln!("SKIPPED: cannot run losetup: {err}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

on_both_engines!(block_device_store);

async fn block_device_store(engine: EngineChoice) {
    let dir = temp_dir();
    let image = dir.path().join("image");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(64 * MIB))
        .expect("create image");
    let Some(device) = LoopDevice::attach(&image) else {
        return;
    };
    let mut cfg = StoreConfig::new(&device.path);
    cfg.engine = engine;

    // A device is never created or resized: a wrong size is an error.
    let err = Store::open(&StoreConfig {
        create_size_bytes: Some(32 * MIB),
        ..cfg.clone()
    })
    .unwrap_err();
    assert!(
        matches!(err, StoreError::SizeMismatch { expected_bytes, actual_bytes, .. }
            if expected_bytes == 32 * MIB && actual_bytes == 64 * MIB),
        "{err}"
    );

    let store = Store::open(&cfg).expect("open device");
    assert!(store.is_block_device());
    assert_eq!(store.size_bytes(), 64 * MIB);
    let data = pattern(1, 8 * MIB as usize);
    store.write(MIB, data.clone(), false).await.expect("write");
    store
        .write(20 * MIB, pattern(2, 4096), true)
        .await
        .expect("FUA write");
    store.flush().await.expect("flush");
    assert!(store.read(MIB, data.len()).await.expect("read") == data);

    store.discard(2 * MIB, MIB).await.expect("discard");
    assert_zeroes(
        &store.read(2 * MIB, MIB as usize).await.expect("read"),
        "discarded",
    );
    store
        .write_zeroes(4 * MIB, MIB, true, false)
        .await
        .expect("zero, keep allocated");
    assert_zeroes(
        &store.read(4 * MIB, MIB as usize).await.expect("read"),
        "zeroed",
    );
    // Sub-sector ranges cannot use fallocate on a device: fast_only refuses, the slow
    // path writes zeroes.
    assert!(matches!(
        store.write_zeroes(6 * MIB + 100, 1000, false, true).await,
        Err(StoreError::NotSupported)
    ));
    store
        .write_zeroes(6 * MIB + 100, 1000, false, false)
        .await
        .expect("sub-sector zero");
    let back = store.read(6 * MIB, 4096).await.expect("read");
    let base = (5 * MIB) as usize;
    assert!(back[..100] == data[base..base + 100]);
    assert_zeroes(&back[100..1100], "sub-sector zeroes");
    assert!(back[1100..] == data[base + 1100..base + 4096]);
    store.close().await;

    // O_DIRECT on the device.
    let direct = Store::open(&StoreConfig {
        direct_io: true,
        ..cfg.clone()
    })
    .expect("open device with O_DIRECT");
    let align = direct.io_alignment();
    assert!(align >= 512 && align.is_power_of_two(), "alignment {align}");
    direct
        .write(0, pattern(3, 64 * 1024), true)
        .await
        .expect("direct FUA write");
    assert!(direct.read(0, 64 * 1024).await.expect("read") == pattern(3, 64 * 1024));
    assert!(matches!(
        direct.read(1, 4096).await,
        Err(StoreError::Unaligned { .. })
    ));
    direct.close().await;

    let read_only = Store::open(&StoreConfig {
        read_only: true,
        ..cfg
    })
    .expect("open device read-only");
    assert!(read_only.read(20 * MIB, 4096).await.expect("read") == pattern(2, 4096));
    assert!(matches!(
        read_only.write(0, pattern(4, 512), false).await,
        Err(StoreError::ReadOnly)
    ));
    read_only.close().await;
    drop(device);
}
