//! One metadata slot, pure: a fixed little-endian layout, crc32c at the end.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `PAIRBDMD` |
//! | 8..12 | format version |
//! | 12..20 | write counter |
//! | 20..28 | data size in bytes |
//! | 28 | node id |
//! | 29 | role (0 Secondary, 1 Primary) |
//! | 30 | disk state (0 Inconsistent, 1 Outdated, 2 UpToDate) |
//! | 31 | flags (bit 0: peer needs a sync; format 3, bit 1: the activity log's whole-volume entry) |
//! | 32..40 | current generation |
//! | 40..48 | bitmap generation |
//! | 48..64 | history generations |
//! | 64..128 | node name (length byte + up to 63 bytes) |
//! | 128..192 | resource name (length byte + up to 63 bytes) |
//! | 192 | format 2: log2 of the dirty bitmap's granularity (0: no bitmap recorded) |
//! | 193 | format 3: log2 of the activity log's extent size (0: no log recorded) |
//! | 194..196 | format 3: number of activity-log extents `n` (at most 960) |
//! | 200..200+4n | format 3: the extents' indexes, ascending, u32 each |
//! | 4092..4096 | crc32c of bytes 0..4092 |
//!
//! Everything else is zero. Format 1 (before the dirty bitmap) is read as a
//! record with no bitmap, format 2 (before the activity log) as one with no
//! log: a node that crashed as Primary under format 2 trusts no bitmap, as
//! before. The activity log lives in the slot, so the slot's atomicity (two
//! alternating slots) covers it too. Decoding checks every field; any byte
//! sequence yields a record or an error, never a panic.

use pairbd_repl_core::activity_log::AL_EXTENTS_MAX;
use pairbd_repl_core::{ActivityLogImage, DiskState, PersistentState, Role};

/// The size of one slot.
pub const SLOT_BYTES: usize = 4096;
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 3;
const AL_AT: usize = 200;
const MAGIC: &[u8; 8] = b"PAIRBDMD";
const NAME_MAX: usize = 63;
const CRC_AT: usize = SLOT_BYTES - 4;

/// One metadata record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRecord {
    /// The format version it was read in (or will be written in).
    pub format_version: u32,
    /// Increases with every write; the higher valid slot wins.
    pub counter: u64,
    /// The data area's size in bytes.
    pub data_size_bytes: u64,
    /// The node's id in the configuration.
    pub node_id: u8,
    /// The node's name.
    pub node_name: String,
    /// The resource's name.
    pub resource: String,
    /// What the replication core persists.
    pub state: PersistentState,
    /// Bytes per bit of the dirty bitmap in the bitmap area (0: none
    /// recorded). Written with the pages (`MetaStore::write_with_bitmap`).
    pub bitmap_granularity_bytes: u64,
    /// The activity log (format 3; empty with `extent_bytes` 0 before).
    pub activity_log: ActivityLogImage,
}

impl MetaRecord {
    /// A fresh record (Secondary, Inconsistent); names must fit.
    pub fn new(
        data_size_bytes: u64,
        node_id: u8,
        node_name: &str,
        resource: &str,
    ) -> Result<MetaRecord, String> {
        for (what, name) in [("node name", node_name), ("resource name", resource)] {
            if name.is_empty() || name.len() > NAME_MAX {
                return Err(format!("the {what} {name:?} must be 1 to {NAME_MAX} bytes"));
            }
        }
        Ok(MetaRecord {
            format_version: FORMAT_VERSION,
            counter: 1,
            data_size_bytes,
            node_id,
            node_name: node_name.to_string(),
            resource: resource.to_string(),
            state: PersistentState::fresh(),
            bitmap_granularity_bytes: 0,
            activity_log: ActivityLogImage::default(),
        })
    }
}

/// Why a slot does not hold a usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot is {0} bytes, not {SLOT_BYTES}")]
    Length(usize),
    #[error("no pairbd magic")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("format version {0} is newer than this pairbd")]
    NewerFormat(u32),
    #[error("invalid {0}")]
    Field(&'static str),
}

fn put_name(buf: &mut [u8], name: &str) {
    let bytes = name.as_bytes();
    let n = bytes.len().min(NAME_MAX);
    buf[0] = n as u8;
    buf[1..1 + n].copy_from_slice(&bytes[..n]);
}

fn get_name(buf: &[u8], what: &'static str) -> Result<String, SlotError> {
    let n = buf[0] as usize;
    if n == 0 || n > NAME_MAX || buf[1 + n..].iter().any(|&b| b != 0) {
        return Err(SlotError::Field(what));
    }
    String::from_utf8(buf[1..1 + n].to_vec()).map_err(|_| SlotError::Field(what))
}

/// Encodes a record into one slot.
pub fn encode_slot(r: &MetaRecord) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[0..8].copy_from_slice(MAGIC);
    // A record keeps the format it was read in (so a slot re-encodes to its
    // own bytes); `MetaStore::write` moves it to FORMAT_VERSION.
    b[8..12].copy_from_slice(&r.format_version.to_le_bytes());
    b[12..20].copy_from_slice(&r.counter.to_le_bytes());
    b[20..28].copy_from_slice(&r.data_size_bytes.to_le_bytes());
    b[28] = r.node_id;
    b[29] = match r.state.role {
        Role::Secondary => 0,
        Role::Primary => 1,
    };
    b[30] = match r.state.disk {
        DiskState::Inconsistent => 0,
        DiskState::Outdated => 1,
        DiskState::UpToDate => 2,
    };
    let al = &r.activity_log;
    let al_recorded = r.format_version >= 3
        && al.extent_bytes.is_power_of_two()
        && al.extents.len() <= AL_EXTENTS_MAX;
    b[31] = u8::from(r.state.peer_sync_needed) | (u8::from(al_recorded && al.whole) << 1);
    b[32..40].copy_from_slice(&r.state.current_generation.to_le_bytes());
    b[40..48].copy_from_slice(&r.state.bitmap_generation.to_le_bytes());
    b[48..56].copy_from_slice(&r.state.history_generations[0].to_le_bytes());
    b[56..64].copy_from_slice(&r.state.history_generations[1].to_le_bytes());
    put_name(&mut b[64..128], &r.node_name);
    put_name(&mut b[128..192], &r.resource);
    b[192] = if r.format_version >= 2 && r.bitmap_granularity_bytes.is_power_of_two() {
        r.bitmap_granularity_bytes.trailing_zeros() as u8
    } else {
        0
    };
    if al_recorded {
        b[193] = al.extent_bytes.trailing_zeros() as u8;
        b[194..196].copy_from_slice(&(al.extents.len() as u16).to_le_bytes());
        for (i, e) in al.extents.iter().enumerate() {
            b[AL_AT + 4 * i..AL_AT + 4 * i + 4].copy_from_slice(&e.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The activity log of a format-3 slot whose checksum matched.
fn decode_al(b: &[u8]) -> Result<ActivityLogImage, SlotError> {
    let log2 = b[193];
    let n = usize::from(u16::from_le_bytes([b[194], b[195]]));
    let whole = b[31] & 2 != 0;
    if log2 == 0 {
        if n != 0 || whole {
            return Err(SlotError::Field("activity log"));
        }
        return Ok(ActivityLogImage::default());
    }
    if !(12..=40).contains(&log2) || n > AL_EXTENTS_MAX || b[196..AL_AT].iter().any(|&x| x != 0) {
        return Err(SlotError::Field("activity log"));
    }
    let mut extents = Vec::with_capacity(n);
    for i in 0..n {
        let at = AL_AT + 4 * i;
        let e = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if extents.last().is_some_and(|&prev| prev >= e) {
            return Err(SlotError::Field("activity log order"));
        }
        extents.push(e);
    }
    if b[AL_AT + 4 * n..CRC_AT].iter().any(|&x| x != 0) {
        return Err(SlotError::Field("reserved bytes"));
    }
    Ok(ActivityLogImage {
        extent_bytes: 1 << log2,
        extents,
        whole,
    })
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Decodes one slot.
pub fn decode_slot(b: &[u8]) -> Result<MetaRecord, SlotError> {
    if b.len() != SLOT_BYTES {
        return Err(SlotError::Length(b.len()));
    }
    if &b[0..8] != MAGIC {
        return Err(SlotError::Magic);
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[CRC_AT..]);
    if u32::from_le_bytes(crc) != crc32c::crc32c(&b[..CRC_AT]) {
        return Err(SlotError::Checksum);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[8..12]);
    let version = u32::from_le_bytes(v);
    if version > FORMAT_VERSION {
        return Err(SlotError::NewerFormat(version));
    }
    if version == 0 {
        return Err(SlotError::Field("format version"));
    }
    let role = match b[29] {
        0 => Role::Secondary,
        1 => Role::Primary,
        _ => return Err(SlotError::Field("role")),
    };
    let disk = match b[30] {
        0 => DiskState::Inconsistent,
        1 => DiskState::Outdated,
        2 => DiskState::UpToDate,
        _ => return Err(SlotError::Field("disk state")),
    };
    let flags_max = if version >= 3 { 3 } else { 1 };
    if b[31] > flags_max {
        return Err(SlotError::Field("flags"));
    }
    let (log2, reserved_from) = if version >= 2 {
        (b[192], 193)
    } else {
        (0, 192)
    };
    let activity_log = if version >= 3 {
        decode_al(b)?
    } else {
        if b[reserved_from..CRC_AT].iter().any(|&x| x != 0) {
            return Err(SlotError::Field("reserved bytes"));
        }
        ActivityLogImage::default()
    };
    if log2 != 0 && !(12..=20).contains(&log2) {
        return Err(SlotError::Field("bitmap granularity"));
    }
    Ok(MetaRecord {
        format_version: version,
        counter: u64_at(b, 12),
        data_size_bytes: u64_at(b, 20),
        node_id: b[28],
        node_name: get_name(&b[64..128], "node name")?,
        resource: get_name(&b[128..192], "resource name")?,
        state: PersistentState {
            role,
            disk,
            current_generation: u64_at(b, 32),
            bitmap_generation: u64_at(b, 40),
            history_generations: [u64_at(b, 48), u64_at(b, 56)],
            peer_sync_needed: b[31] & 1 == 1,
        },
        bitmap_granularity_bytes: if log2 == 0 { 0 } else { 1 << log2 },
        activity_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> MetaRecord {
        let mut r = MetaRecord::new(1 << 30, 2, "beta", "mail").unwrap();
        r.counter = 42;
        r.state.role = Role::Primary;
        r.state.disk = DiskState::UpToDate;
        r.state.current_generation = 0xDEAD_BEEF;
        r.state.history_generations = [7, 8];
        r.state.peer_sync_needed = true;
        r.bitmap_granularity_bytes = 65536;
        r.activity_log = ActivityLogImage {
            extent_bytes: 4 << 20,
            extents: vec![0, 7, 4095],
            whole: false,
        };
        r
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(decode_slot(&encode_slot(&r)).unwrap(), r);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let b = encode_slot(&sample());
        for byte in (0..SLOT_BYTES).step_by(7) {
            let mut c = b;
            c[byte] ^= 0x10;
            assert!(decode_slot(&c).is_err(), "flip at {byte} accepted");
        }
    }

    #[test]
    fn newer_formats_are_named() {
        let mut b = encode_slot(&sample());
        b[8..12].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_slot(&b), Err(SlotError::NewerFormat(9)));
    }

    #[test]
    fn format_1_reads_as_no_bitmap() {
        let mut r = sample();
        r.activity_log = ActivityLogImage::default();
        let mut b = encode_slot(&r);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[192] = 0;
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        let r = decode_slot(&b).unwrap();
        assert_eq!(r.bitmap_granularity_bytes, 0);
        assert_eq!(r.format_version, 1);
        b[192] = 16;
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_slot(&b), Err(SlotError::Field("reserved bytes")));
    }

    fn reformat(b: &mut [u8; SLOT_BYTES], version: u32) {
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn format_2_reads_as_no_activity_log_and_refuses_one() {
        let mut r = sample();
        r.activity_log = ActivityLogImage::default();
        let mut b = encode_slot(&r);
        reformat(&mut b, 2);
        let d = decode_slot(&b).unwrap();
        assert_eq!(d.format_version, 2);
        assert_eq!(d.activity_log, ActivityLogImage::default());
        assert_eq!(d.bitmap_granularity_bytes, 65536);
        // Format 2 has no log: its bytes are reserved there.
        let mut b = encode_slot(&sample());
        reformat(&mut b, 2);
        assert_eq!(decode_slot(&b), Err(SlotError::Field("reserved bytes")));
    }

    #[test]
    fn a_full_activity_log_fits_and_the_whole_entry_round_trips() {
        let mut r = sample();
        r.activity_log = ActivityLogImage {
            extent_bytes: 1 << 16,
            extents: (0..AL_EXTENTS_MAX as u32).map(|i| i * 3).collect(),
            whole: true,
        };
        assert_eq!(decode_slot(&encode_slot(&r)).unwrap(), r);
    }

    #[test]
    fn unordered_extents_are_refused() {
        let mut b = encode_slot(&sample());
        b[AL_AT..AL_AT + 4].copy_from_slice(&9u32.to_le_bytes());
        reformat(&mut b, 3);
        assert_eq!(decode_slot(&b), Err(SlotError::Field("activity log order")));
    }

    #[test]
    fn names_must_fit() {
        assert!(MetaRecord::new(4096, 1, &"x".repeat(64), "r").is_err());
        assert!(MetaRecord::new(4096, 1, "", "r").is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode_slot(&bytes);
        }

        #[test]
        fn valid_slots_with_random_fields_round_trip(counter: u64, size: u64, gen: u64, flag: bool) {
            let mut r = sample();
            r.counter = counter;
            r.data_size_bytes = size;
            r.state.current_generation = gen;
            r.state.peer_sync_needed = flag;
            prop_assert_eq!(decode_slot(&encode_slot(&r)).unwrap(), r);
        }
    }
}
