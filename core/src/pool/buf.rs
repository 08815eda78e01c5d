//! [`PoolBuf`]: a buffer from a core's pool, returned home on drop.

use std::ptr::NonNull;

use super::PoolError;
use super::class::CorePool;

/// A buffer from a core's pool: pinned, 4 KiB-aligned (and aligned to its size up to its
/// region's page size), inside one of the core's [`regions`](super::Pools::regions). Dropping
/// it returns it to its home core from any thread.
///
/// Contents are not cleared between uses unless the pool was configured `zero_on_free`.
pub struct PoolBuf {
    core: NonNull<CorePool>,
    ptr: NonNull<u8>,
    len: usize,
    class: u8,
}

// SAFETY: a PoolBuf exclusively owns its byte range (no other PoolBuf or free list entry covers
// it while it lives), like a Box<[u8]>. Its CorePool is Sync and outlives it (Pools leaks the
// cores when buffers are outstanding at shutdown), and Drop returns it through the lock-free
// path when run on a thread other than the owner.
unsafe impl Send for PoolBuf {}
// SAFETY: `&PoolBuf` only gives `&[u8]` of the owned range and metadata reads.
unsafe impl Sync for PoolBuf {}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("home_core", &self.home_core())
            .finish()
    }
}

impl PoolBuf {
    /// # Safety
    /// `addr` is a free buffer of class `class` of `core`, just taken off a free list, and
    /// `core` outlives the PoolBuf.
    #[inline]
    pub(crate) unsafe fn new(core: &CorePool, addr: usize, class: usize, len: usize) -> PoolBuf {
        PoolBuf {
            core: NonNull::from(core),
            // SAFETY: buffers are carved from mmap'ed regions, which never start at (or wrap
            // to) address 0; `addr` comes from a free list of such buffers (caller contract).
            ptr: unsafe { NonNull::new_unchecked(addr as *mut u8) },
            len,
            class: class as u8,
        }
    }

    #[inline]
    fn core_pool(&self) -> &CorePool {
        // SAFETY: the CorePool outlives every PoolBuf of it (Pools::drop leaks the cores while
        // any buffer is out), and it is only ever accessed through shared references.
        unsafe { self.core.as_ref() }
    }

    /// Bytes the next I/O transfers.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes available (the size class).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.core_pool().classes[self.class as usize].size
    }

    /// The core whose pool this buffer returns to.
    pub fn home_core(&self) -> usize {
        self.core_pool().core
    }

    /// Change the transfer length; fails if it exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<(), PoolError> {
        let capacity = self.capacity();
        if len > capacity {
            return Err(PoolError::BadLen { len, capacity });
        }
        self.len = len;
        Ok(())
    }

    /// Address of the first byte (for backends and DMA).
    #[inline]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Address of the first byte, for a device or the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The first `len()` bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: [ptr, ptr+capacity) lies in a live region of the home core (the region is
        // unmapped only when all its buffers are free, and at shutdown only when none is out),
        // len <= capacity, and this PoolBuf owns the range exclusively. No I/O is in flight on
        // it while safe code holds the PoolBuf (a submitted buffer is moved into the queue).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The first `len()` bytes, mutable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl PoolBuf {
    #[cold]
    #[inline(never)]
    fn zero(ptr: NonNull<u8>, size: usize) {
        // SAFETY: the dropping PoolBuf still owns the whole [ptr, ptr+capacity) range (see
        // as_slice); `size` is its class size.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, size) };
    }
}

impl Drop for PoolBuf {
    #[inline(always)]
    fn drop(&mut self) {
        let core = self.core_pool();
        let class = &core.classes[self.class as usize];
        if core.zero_on_free {
            PoolBuf::zero(self.ptr, class.size);
        }
        let addr = self.ptr.as_ptr() as usize;
        if core.is_owner() {
            // SAFETY: is_owner() just checked that this thread is the owner.
            unsafe { class.owner_put(addr) };
        } else {
            // The last access to the pool (see remote_put).
            class.remote_put(addr);
        }
    }
}
