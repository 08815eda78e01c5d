//! I/O buffers handed out by the engine.
//!
//! Each [`crate::Queue`] owns one [`Arena`]: a single anonymous mapping (2 MiB hugepages when
//! reserved, else 4 KiB pages, locked) that is registered once with the backend (io_uring fixed
//! buffers today, the IOMMU for the vfio backend later). [`IoBuf`]s are carved from it in
//! power-of-two size classes (4 KiB up to 16 MiB) and return to their class's free list on drop.
//! There is no per-I/O mapping, registration or heap allocation once a class has warmed up.
//!
//! Ownership: an `IoBuf` given to `Queue::submit_*` moves into the queue's in-flight table and
//! comes back in the `Completion`; the memory is never reachable from safe code while the kernel
//! may write it. The arena outlives every buffer (each holds an `Rc` to it), and a queue that is
//! dropped with operations in flight that it cannot reap leaks the arena rather than unmap memory
//! the kernel might still write.

use std::cell::RefCell;
use std::rc::Rc;

use rio_sys::mem::{Mapping, PageKind};

use crate::error::{Error, Result};

/// Smallest buffer class: 4 KiB (also the alignment of every buffer).
pub const MIN_CLASS_SHIFT: u32 = 12;
/// Largest buffer class: 16 MiB.
pub const MAX_CLASS_SHIFT: u32 = 24;
const NCLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// The memory all of a queue's buffers come from.
pub struct Arena {
    map: Mapping,
    state: RefCell<ArenaState>,
}

struct ArenaState {
    /// Next never-used byte of the mapping.
    bump: usize,
    /// Free offsets per size class.
    free: [Vec<usize>; NCLASSES],
    in_use: usize,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("bytes", &self.map.len())
            .field("pages", &self.map.kind())
            .finish()
    }
}

impl Arena {
    /// Map `bytes` of buffer memory, on hugepages if `huge` and the pool has them.
    pub fn new(bytes: usize, huge: bool) -> Result<Rc<Arena>> {
        let map = Mapping::anonymous(bytes, huge, true).map_err(|e| Error::BufferUnavailable {
            requested: bytes,
            reason: format!("cannot map buffer arena: {e}"),
        })?;
        if map.kind() == PageKind::Normal && huge {
            tracing::debug!(
                bytes,
                "no hugepages reserved for the buffer arena; using 4 KiB pages (more TLB misses)"
            );
        }
        if !map.locked() {
            tracing::warn!(
                bytes,
                "could not mlock the buffer arena; pages may be swapped"
            );
        }
        Ok(Rc::new(Arena {
            map,
            state: RefCell::new(ArenaState {
                bump: 0,
                free: Default::default(),
                in_use: 0,
            }),
        }))
    }

    /// Base address and length, for registering the arena with a backend.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.map.as_ptr(), self.map.len())
    }

    /// Whether the arena sits on hugepages.
    pub fn page_kind(&self) -> PageKind {
        self.map.kind()
    }

    pub fn on_hugepages(&self) -> bool {
        self.map.kind().is_huge()
    }

    /// Bytes currently handed out.
    pub fn in_use(&self) -> usize {
        self.state.borrow().in_use
    }

    /// Total bytes of the arena.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Hand out a buffer of `len` bytes (its capacity is `len` rounded up to a power of two,
    /// at least 4 KiB), aligned to 4 KiB.
    pub fn alloc(self: &Rc<Self>, len: usize) -> Result<IoBuf> {
        let shift = class_shift(len).ok_or_else(|| Error::BufferUnavailable {
            requested: len,
            reason: format!(
                "larger than the largest buffer class ({} bytes)",
                1usize << MAX_CLASS_SHIFT
            ),
        })?;
        let size = 1usize << shift;
        let class = (shift - MIN_CLASS_SHIFT) as usize;
        let mut st = self.state.borrow_mut();
        let offset = match st.free[class].pop() {
            Some(o) => o,
            None => {
                // Carve fresh memory, aligned to the class size (buddy-like placement keeps
                // large buffers from straddling more hugepages than needed).
                let start = st.bump.next_multiple_of(size.min(2 << 20));
                if start + size > self.map.len() {
                    return Err(Error::BufferUnavailable {
                        requested: len,
                        reason: format!(
                            "buffer arena exhausted ({} of {} bytes in use; raise buffer_pool_bytes)",
                            st.in_use,
                            self.map.len()
                        ),
                    });
                }
                // Alignment padding below `start` becomes 4 KiB buffers rather than waste.
                let mut pad = st.bump;
                while pad < start {
                    st.free[0].push(pad);
                    pad += 1 << MIN_CLASS_SHIFT;
                }
                st.bump = start + size;
                start
            }
        };
        st.in_use += size;
        drop(st);
        Ok(IoBuf {
            arena: Rc::clone(self),
            offset,
            len,
            class: class as u8,
        })
    }

    fn free(&self, offset: usize, class: u8) {
        let mut st = self.state.borrow_mut();
        st.in_use -= 1usize << (class as u32 + MIN_CLASS_SHIFT);
        st.free[class as usize].push(offset);
    }
}

fn class_shift(len: usize) -> Option<u32> {
    let shift = len.max(1).next_power_of_two().trailing_zeros();
    let shift = shift.max(MIN_CLASS_SHIFT);
    (shift <= MAX_CLASS_SHIFT).then_some(shift)
}

/// A buffer from a queue's arena: 4 KiB-aligned, registered with the backend, returned to the
/// arena on drop. Not `Send`: it belongs to its queue's thread.
///
/// Contents are not zeroed between uses.
pub struct IoBuf {
    arena: Rc<Arena>,
    offset: usize,
    len: usize,
    class: u8,
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl IoBuf {
    /// Bytes the next I/O will transfer.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes available (the size class).
    pub fn capacity(&self) -> usize {
        1usize << (self.class as u32 + MIN_CLASS_SHIFT)
    }

    /// Change the transfer length; fails if it exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::BufferUnavailable {
                requested: len,
                reason: format!("buffer capacity is {}", self.capacity()),
            });
        }
        self.len = len;
        Ok(())
    }

    /// Address of the first byte (for backends and DMA).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        // The offset is within the mapping by construction in Arena::alloc.
        self.arena.map.as_ptr().wrapping_add(self.offset)
    }

    /// Whether this buffer belongs to `arena` (registered-buffer ops need that).
    pub(crate) fn is_from(&self, arena: &Rc<Arena>) -> bool {
        Rc::ptr_eq(&self.arena, arena)
    }

    /// The first `len()` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: [offset, offset+capacity) lies inside the live mapping (Arena::alloc checked
        // it against the mapping length; the Rc keeps the mapping alive), len <= capacity, and
        // the range is owned exclusively by this IoBuf. No I/O is in flight on it: a submitted
        // buffer is moved into the queue and unreachable until its completion is reaped.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The first `len()` bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        self.arena.free(self.offset, self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up() {
        assert_eq!(class_shift(1), Some(12));
        assert_eq!(class_shift(4096), Some(12));
        assert_eq!(class_shift(4097), Some(13));
        assert_eq!(class_shift(1 << 24), Some(24));
        assert_eq!(class_shift((1 << 24) + 1), None);
    }

    #[test]
    fn alloc_free_reuse_and_alignment() {
        let a = Arena::new(4 << 20, false).unwrap();
        let b1 = a.alloc(4096).unwrap();
        let p1 = b1.as_ptr();
        assert_eq!(p1 as usize % 4096, 0);
        assert_eq!(a.in_use(), 4096);
        drop(b1);
        assert_eq!(a.in_use(), 0);
        let b2 = a.alloc(100).unwrap();
        assert_eq!(b2.as_ptr(), p1, "freed buffer is reused");
        assert_eq!(b2.len(), 100);
        assert_eq!(b2.capacity(), 4096);
        let big = a.alloc(1 << 20).unwrap();
        assert_eq!(big.as_ptr() as usize % (1 << 20), 0);
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let a = Arena::new(1 << 20, false).unwrap();
        let mut v = Vec::new();
        for _ in 0..256 {
            v.push(a.alloc(4096).unwrap());
        }
        let e = a.alloc(4096).unwrap_err().to_string();
        assert!(e.contains("exhausted"), "{e}");
        v.pop();
        assert!(a.alloc(4096).is_ok());
        assert!(a.alloc(32 << 20).is_err());
    }

    #[test]
    fn buffers_do_not_overlap_and_keep_their_contents() {
        let a = Arena::new(4 << 20, false).unwrap();
        let mut bufs: Vec<IoBuf> = (0..20).map(|i| a.alloc(4096 << (i % 4)).unwrap()).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8));
        }
        let mut ranges: Vec<(usize, usize)> = bufs
            .iter()
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.capacity()))
            .collect();
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "overlap {w:?}");
        }
    }

    #[test]
    fn set_len_is_bounded() {
        let a = Arena::new(1 << 20, false).unwrap();
        let mut b = a.alloc(4096).unwrap();
        assert!(b.set_len(8192).is_err());
        b.set_len(512).unwrap();
        assert_eq!(b.as_slice().len(), 512);
    }
}
