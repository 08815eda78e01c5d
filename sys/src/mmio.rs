//! Mappings of device memory (PCI BARs through VFIO or sysfs `resourceN` files), touched only
//! through volatile accessors. Both `vfio` and `pci` hand these out; neither owns the type.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A shared mapping of device memory (a PCI BAR), unmapped on drop.
///
/// Device registers are touched only through the volatile accessors: a Rust reference into
/// memory the device can change is undefined behaviour.
#[derive(Debug)]
pub struct MmioRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is device memory owned by this value; the accessors are volatile and take
// `&self`, as register access is by nature shared (the device itself is a concurrent writer).
// Which thread may write which register (e.g. one doorbell per queue) is the driver's protocol.
unsafe impl Send for MmioRegion {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for MmioRegion {}

impl MmioRegion {
    /// mmap `len` bytes of `fd` at `offset`, shared, read/write.
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<MmioRegion> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new shared mapping at a kernel-chosen address; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmioRegion {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL without MAP_FIXED"),
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, width: usize) {
        assert!(
            off.is_multiple_of(width) && off.checked_add(width).is_some_and(|e| e <= self.len),
            "MMIO access of {width} bytes at {off:#x} outside or misaligned in a {:#x}-byte region",
            self.len
        );
    }

    /// Volatile 32-bit read at byte offset `off` (must be 4-aligned and inside the region).
    pub fn read32(&self, off: usize) -> u32 {
        self.check(off, 4);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long as `self`.
        unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() }
    }

    /// Volatile 32-bit write at byte offset `off` (must be 4-aligned and inside the region).
    pub fn write32(&self, off: usize, v: u32) {
        self.check(off, 4);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long as `self`.
        unsafe { self.ptr.as_ptr().add(off).cast::<u32>().write_volatile(v) }
    }

    /// Volatile 64-bit read at byte offset `off` (must be 8-aligned and inside the region).
    pub fn read64(&self, off: usize) -> u64 {
        self.check(off, 8);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long as `self`.
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().read_volatile() }
    }

    /// Volatile 64-bit write at byte offset `off` (must be 8-aligned and inside the region).
    pub fn write64(&self, off: usize, v: u64) {
        self.check(off, 8);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long as `self`.
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().write_volatile(v) }
    }
}

impl Drop for MmioRegion {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and no references into it exist (accessors are by value).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
