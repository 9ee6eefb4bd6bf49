//! Small panic-free helpers for reading and writing big-endian wire fields.
//!
//! Everything that parses client bytes goes through these, so that a short or malformed
//! message turns into `None` instead of an out-of-bounds panic.

/// A cursor over a byte slice that hands out big-endian fields until the bytes run out.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// Takes the next `count` bytes, or `None` (consuming nothing) if fewer remain.
    pub(crate) fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(count);
        self.rest = tail;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Copies as many bytes of `input` as fit into the unfilled tail of `buffer` (which holds
/// `*filled` bytes already), advances `*filled` and returns how many bytes were copied.
///
/// Used to assemble fixed-size messages from input that may arrive one byte at a time.
pub(crate) fn fill(buffer: &mut [u8], filled: &mut usize, input: &[u8]) -> usize {
    let mut copied = 0;
    for (slot, byte) in buffer.iter_mut().skip(*filled).zip(input) {
        *slot = *byte;
        copied += 1;
    }
    *filled += copied;
    copied
}

/// Appends `bytes` to `out` after a big-endian u32 length, truncating `bytes` to `u32::MAX`
/// so that the length always describes exactly what follows.
pub(crate) fn put_length_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend(bytes.iter().take(length as usize));
}

/// Returns the longest prefix of `text` that is at most `max_bytes` long and ends on a
/// character boundary, so that truncated messages stay valid UTF-8.
pub(crate) fn truncate_utf8(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_returns_none_when_short_and_keeps_position() {
        let mut reader = Reader::new(&[0, 1, 2]);
        assert_eq!(reader.u32(), None);
        assert_eq!(reader.u16(), Some(1));
        assert_eq!(reader.u16(), None);
        assert_eq!(reader.take(1), Some(&[2u8][..]));
        assert!(reader.is_empty());
    }

    #[test]
    fn fill_copies_only_what_fits() {
        let mut buffer = [0u8; 4];
        let mut filled = 0;
        assert_eq!(fill(&mut buffer, &mut filled, &[1, 2, 3]), 3);
        assert_eq!(fill(&mut buffer, &mut filled, &[4, 5, 6]), 1);
        assert_eq!(filled, 4);
        assert_eq!(buffer, [1, 2, 3, 4]);
        assert_eq!(fill(&mut buffer, &mut filled, &[7]), 0);
    }

    #[test]
    fn truncate_utf8_stops_on_a_character_boundary() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
        assert_eq!(truncate_utf8("é", 0), "");
    }
}
