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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of every `AlignedBuf` allocation, in bytes.
pub const BUF_ALIGN_BYTES: usize = 4096;

/// A heap buffer aligned to [`BUF_ALIGN_BYTES`]: zeroed when new ([`AlignedBuf::zeroed`]),
/// or holding a recycled buffer's old bytes ([`AlignedBuf::for_overwrite`]); always
/// initialised.
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
        // Recyclable sizes are allocated at their class size so that the allocation
        // can serve any later request of the class.
        let capacity = size_class(len).map_or(len, class_capacity);
        let layout = Self::layout(capacity);
        // SAFETY: `layout` has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len, capacity }
    }

    /// A buffer of `len` bytes whose contents are unspecified (but initialised): for a
    /// caller that overwrites all of it, such as a WRITE payload read off a socket or
    /// a READ filled by the store. It reuses a recently freed allocation of the same
    /// size class when one is cached, which spares large requests an mmap, page
    /// faults and an munmap each.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf::zeroed(0);
        }
        if let Some(class) = size_class(len) {
            if let Some(ptr) = RECYCLER.take(class) {
                return AlignedBuf {
                    ptr,
                    len,
                    capacity: class_capacity(class),
                };
            }
        }
        AlignedBuf::zeroed(len)
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
        if let Some(class) = size_class(self.capacity) {
            if class_capacity(class) == self.capacity && RECYCLER.give(class, self.ptr) {
                return;
            }
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

/// The smallest recycled size class: 4 KiB.
const MIN_CLASS_SHIFT: u32 = 12;
/// The largest recycled size class: 32 MiB, the largest NBD payload pairbd accepts.
const MAX_CLASS_SHIFT: u32 = 25;
const CLASS_COUNT: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// At most this many bytes of freed buffers are kept for reuse, over all classes.
const RECYCLE_BUDGET_BYTES: usize = 64 << 20;
/// At most this many buffers are kept per class.
const RECYCLE_MAX_PER_CLASS: usize = 64;

/// The size class of a buffer of `len` bytes: the power of two at or above it.
fn size_class(len: usize) -> Option<usize> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS_SHIFT);
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn class_capacity(class: usize) -> usize {
    1usize << (class as u32 + MIN_CLASS_SHIFT)
}

/// A freed allocation waiting for reuse.
struct FreeBuf(NonNull<u8>);

// SAFETY: a `FreeBuf` is an allocation nobody references any more; it is owned by the
// recycler until handed to exactly one new `AlignedBuf`.
unsafe impl Send for FreeBuf {}

/// The process-wide cache of freed buffers: bounded in count per class and in bytes
/// overall, so that it can never hold more than [`RECYCLE_BUDGET_BYTES`].
struct Recycler {
    classes: [Mutex<Vec<FreeBuf>>; CLASS_COUNT],
    cached_bytes: AtomicUsize,
}

static RECYCLER: Recycler = Recycler {
    classes: [const { Mutex::new(Vec::new()) }; CLASS_COUNT],
    cached_bytes: AtomicUsize::new(0),
};

impl Recycler {
    fn take(&self, class: usize) -> Option<NonNull<u8>> {
        let free = self.classes[class].lock().ok()?.pop()?;
        self.cached_bytes
            .fetch_sub(class_capacity(class), Ordering::Relaxed);
        Some(free.0)
    }

    /// Keeps `ptr` for reuse; returns false (the caller frees it) when over budget.
    fn give(&self, class: usize, ptr: NonNull<u8>) -> bool {
        let bytes = class_capacity(class);
        let Ok(mut list) = self.classes[class].lock() else {
            return false;
        };
        if list.len() >= RECYCLE_MAX_PER_CLASS {
            return false;
        }
        let reserved =
            self.cached_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cached| {
                    (cached + bytes <= RECYCLE_BUDGET_BYTES).then_some(cached + bytes)
                });
        if reserved.is_err() {
            return false;
        }
        list.push(FreeBuf(ptr));
        true
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

    fn local_recycler() -> Recycler {
        Recycler {
            classes: [const { Mutex::new(Vec::new()) }; CLASS_COUNT],
            cached_bytes: AtomicUsize::new(0),
        }
    }

    /// Takes a buffer's allocation out of it, as `Drop` would hand it to the recycler.
    fn into_raw(buf: AlignedBuf) -> NonNull<u8> {
        let ptr = buf.ptr;
        std::mem::forget(buf);
        ptr
    }

    #[test]
    fn the_recycler_reuses_allocations_and_keeps_to_its_budget() {
        let recycler = local_recycler();
        let class = size_class(100_000).expect("a recycled class");
        let ptr = into_raw(AlignedBuf::zeroed(100_000));
        assert!(recycler.give(class, ptr));
        assert_eq!(
            recycler.cached_bytes.load(Ordering::Relaxed),
            class_capacity(class)
        );
        assert_eq!(
            recycler.take(class),
            Some(ptr),
            "the same allocation comes back"
        );
        assert_eq!(recycler.take(class), None, "and only once");
        assert_eq!(recycler.cached_bytes.load(Ordering::Relaxed), 0);
        // 32 MiB buffers: two fit the 64 MiB budget, a third does not.
        let big = CLASS_COUNT - 1;
        let buffers: Vec<NonNull<u8>> = (0..3)
            .map(|_| into_raw(AlignedBuf::zeroed(32 << 20)))
            .collect();
        assert!(recycler.give(big, buffers[0]));
        assert!(recycler.give(big, buffers[1]));
        assert!(!recycler.give(big, buffers[2]), "over the byte budget");
        assert_eq!(
            recycler.cached_bytes.load(Ordering::Relaxed),
            RECYCLE_BUDGET_BYTES
        );
        for _ in 0..2 {
            let ptr = recycler.take(big).expect("cached");
            // SAFETY: test-only: `ptr` is a 32 MiB class allocation we own again.
            unsafe { alloc::dealloc(ptr.as_ptr(), AlignedBuf::layout(class_capacity(big))) };
        }
        // SAFETY: as above, for the buffer the recycler refused.
        unsafe { alloc::dealloc(buffers[2].as_ptr(), AlignedBuf::layout(class_capacity(big))) };
        // SAFETY: as above, for the 100 000-byte buffer's class allocation.
        unsafe { alloc::dealloc(ptr.as_ptr(), AlignedBuf::layout(class_capacity(class))) };
    }

    #[test]
    fn for_overwrite_gives_the_asked_length_aligned() {
        for len in [1, 4096, 100_000, 1 << 20, 40 << 20] {
            let mut buf = AlignedBuf::for_overwrite(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
            buf.fill(0xff);
        }
        assert!(AlignedBuf::zeroed(4096).iter().all(|&b| b == 0));
    }

    #[test]
    fn size_classes_cover_4k_to_32m() {
        assert_eq!(size_class(1), Some(0));
        assert_eq!(size_class(4096), Some(0));
        assert_eq!(size_class(4097), Some(1));
        assert_eq!(size_class(32 << 20), Some(CLASS_COUNT - 1));
        assert_eq!(size_class((32 << 20) + 1), None);
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
