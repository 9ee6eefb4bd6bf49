//! `AlignedBuf`: the one buffer type that carries payloads in and out of the store.
//!
//! Every data buffer is a single heap allocation aligned to 4096 bytes, so it can be
//! handed to the kernel for O_DIRECT I/O on any device with a logical block size of
//! 4096 or less. The allocation never moves while the buffer is alive, which is what
//! lets the io_uring engine give its address to the kernel.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every `AlignedBuf` allocation, in bytes.
pub const BUF_ALIGN_BYTES: usize = 4096;

/// A heap buffer aligned to [`BUF_ALIGN_BYTES`], zero-initialised at creation.
///
/// It dereferences to `[u8]`; its length can shrink ([`AlignedBuf::truncate`]) but
/// never grow, so it never reallocates.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Vec<u8>`); nothing else holds
// the pointer, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`; all mutation goes through `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to 4096.
    ///
    /// # Panics
    /// When `len` rounded up to the alignment overflows `isize` (a programmer error), or
    /// aborts through `handle_alloc_error` when memory is exhausted, like `Vec`.
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: Self::dangling(),
                len: 0,
                capacity: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf {
            ptr,
            len,
            capacity: len,
        }
    }

    /// Allocates an aligned buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `new_len` bytes, keeping the allocation. Does nothing
    /// when `new_len >= len()`.
    pub fn truncate(&mut self, new_len: usize) {
        self.len = self.len.min(new_len);
    }

    /// Pointer to the first byte (aligned to 4096).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first byte (aligned to 4096).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, BUF_ALIGN_BYTES)
            .expect("AlignedBuf length must not overflow isize when rounded to 4096")
    }

    fn dangling() -> NonNull<u8> {
        // A non-null, 4096-aligned address without provenance: never dereferenced for
        // more than zero bytes, which is allowed for any non-null aligned pointer.
        NonNull::new(std::ptr::without_provenance_mut::<u8>(BUF_ALIGN_BYTES))
            .expect("BUF_ALIGN_BYTES is not zero")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity == 0 {
            return;
        }
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout (capacity is
        // the allocated size and never changes) and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len <= capacity` initialised bytes (zeroed at
        // allocation), or is an aligned dangling pointer with `len == 0`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Clone for AlignedBuf {
    /// Copies the payload into a new aligned allocation.
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::from_slice(self)
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &AlignedBuf) -> bool {
        **self == **other
    }
}

impl Eq for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The payload of a write: owned, or shared with another consumer (for example the
/// replication sender) so that it is not copied.
#[derive(Debug)]
pub(crate) enum WriteBuf {
    Owned(AlignedBuf),
    Shared(Arc<AlignedBuf>),
}

impl Deref for WriteBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            WriteBuf::Owned(buf) => buf,
            WriteBuf::Shared(buf) => buf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for len in [1, 511, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn empty_buffer_is_aligned_and_empty() {
        let buf = AlignedBuf::zeroed(0);
        assert!(buf.is_empty());
        assert_eq!(buf.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
        assert_eq!(&*buf, &[] as &[u8]);
        let clone = buf.clone();
        assert!(clone.is_empty());
    }

    #[test]
    fn from_slice_copies_and_truncate_shrinks() {
        let mut buf = AlignedBuf::from_slice(b"hello world");
        assert_eq!(&*buf, b"hello world");
        buf[0] = b'j';
        buf.truncate(5);
        assert_eq!(&*buf, b"jello");
        buf.truncate(100);
        assert_eq!(buf.len(), 5);
        assert_eq!(buf.clone(), buf);
    }

    #[test]
    fn buffers_move_across_threads() {
        let buf = AlignedBuf::from_slice(&[7u8; 8192]);
        let sum = std::thread::spawn(move || buf.iter().map(|&b| u64::from(b)).sum::<u64>())
            .join()
            .expect("thread");
        assert_eq!(sum, 7 * 8192);
    }
}
