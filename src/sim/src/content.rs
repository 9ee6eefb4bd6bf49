//! What the simulated clients write: every block a write touches says which
//! write it came from (write id, block number, client, client sequence), and
//! the rest of the block is a pattern derived from those, so a checker can
//! tell exactly which write a block holds, or that it holds bytes no write
//! put there (a torn or misplaced block).

/// Bytes per block: the unit of client writes and of the checkers. The
/// simulated disk writes each block atomically (sector atomicity); a write
/// of several blocks can tear between them.
pub const BLOCK_BYTES: usize = 512;

const HEADER_BYTES: usize = 32;

/// What a block holds, as a checker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zeroes: never written, or trimmed / zeroed.
    Zero,
    /// The block as write `id` wrote it.
    Write(u64),
    /// The simulator's deliberate corruption of this block (bit rot, or a
    /// write that bypassed replication: the online-verify scenario).
    Injected,
    /// Bytes that no write put at this block.
    Garbage,
}

/// The first word of an injected corruption: no write id (they count up
/// from 1) comes near it.
const INJECTED_MAGIC: u64 = 0xBAD0_B10C_0000_0000;

/// The bytes the simulator's corruption puts at `block`: recognisable (so
/// the checkers tell it from a lost write) and unlike any write's.
pub fn corruption(block: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_BYTES];
    out[0..8].copy_from_slice(&INJECTED_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    for (i, chunk) in out[HEADER_BYTES..].chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(INJECTED_MAGIC, block, i).to_le_bytes());
    }
    out
}

fn pattern_word(write_id: u64, block: u64, i: usize) -> u64 {
    let mut z = write_id
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(block.wrapping_mul(0xD6E8_FEB8_6659_FD93))
        .wrapping_add(i as u64);
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 29)
}

/// The bytes write `write_id` (the `seq`-th write of `client`) puts at
/// `block`. Write ids start at 1, so a written block is never all zeroes.
pub fn encode(write_id: u64, block: u64, client: u32, seq: u64) -> Vec<u8> {
    debug_assert!(write_id != 0, "write id 0 is the initial zeroes");
    let mut out = vec![0u8; BLOCK_BYTES];
    out[0..8].copy_from_slice(&write_id.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..20].copy_from_slice(&client.to_le_bytes());
    out[20..28].copy_from_slice(&seq.to_le_bytes());
    for (i, chunk) in out[HEADER_BYTES..].chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(write_id, block, i).to_le_bytes());
    }
    out
}

/// What the bytes of block `block` are.
pub fn decode(bytes: &[u8], block: u64) -> Content {
    if bytes.len() != BLOCK_BYTES {
        return Content::Garbage;
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let write_id = word(0);
    if write_id == 0 {
        return if bytes.iter().all(|b| *b == 0) {
            Content::Zero
        } else {
            Content::Garbage
        };
    }
    if word(8) != block {
        return Content::Garbage;
    }
    if write_id == INJECTED_MAGIC {
        return if bytes == corruption(block) {
            Content::Injected
        } else {
            Content::Garbage
        };
    }
    let pattern_ok = bytes[HEADER_BYTES..]
        .chunks_exact(8)
        .enumerate()
        .all(|(i, c)| c == pattern_word(write_id, block, i).to_le_bytes());
    if pattern_ok {
        Content::Write(write_id)
    } else {
        Content::Garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_names_its_write_and_detects_damage() {
        let b = encode(42, 7, 3, 9);
        assert_eq!(decode(&b, 7), Content::Write(42));
        assert_eq!(decode(&b, 8), Content::Garbage, "misplaced");
        let mut torn = b.clone();
        torn[300] ^= 1;
        assert_eq!(decode(&torn, 7), Content::Garbage);
        assert_eq!(decode(&[0; BLOCK_BYTES], 7), Content::Zero);
        assert_eq!(decode(&corruption(7), 7), Content::Injected);
        assert_eq!(decode(&corruption(7), 8), Content::Garbage, "misplaced");
    }
}
