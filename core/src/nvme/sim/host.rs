//! Every memory access of the model: the BAR0 page(s) it shares with the driver, host memory the
//! driver hands it by address (queues, PRPs, PRP lists, shadow doorbells: identity
//! translation), and the RAM behind each namespace. All `unsafe` of the model lives here.
//!
//! The contract for host addresses is the DMA contract of a real controller: an address the
//! driver writes into a queue base register, a queue-creation command, a PRP entry or Doorbell
//! Buffer Config names process memory that stays valid (mapped, and not reused for anything
//! else) for as long as the model may use it — while the command is outstanding, or while the
//! queue or doorbell buffer exists. The model never forms a Rust reference into such memory: it
//! copies through raw pointers, and the words the two sides hand over concurrently (doorbells,
//! CQE status words, shadow doorbells and EventIdx) are accessed as atomics, as the driver does.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::nvme::spec::{CompletionEntry, SubmissionEntry};

/// The model's BAR0: zeroed, page-aligned process memory of 32-bit registers, mapped lazily
/// (a large doorbell stride costs address space, not memory). `len` may be less than the
/// mapping (a BAR that is not a whole number of pages): nothing past `len` is ever touched.
pub(crate) struct Bar {
    map: LazyMem,
    len: usize,
}

impl Bar {
    pub(crate) fn new(len: usize) -> std::io::Result<Bar> {
        Ok(Bar {
            map: LazyMem::new(len as u64)?,
            len,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The register at `off`, or `None` past the BAR (or misaligned): the model never touches
    /// memory outside it.
    fn word(&self, off: usize) -> Option<&AtomicU32> {
        if !off.is_multiple_of(4) || off.checked_add(4).is_none_or(|end| end > self.len) {
            return None;
        }
        // SAFETY: `off` is in bounds and 4-byte aligned (the mapping is page aligned), the mapping
        // lives as long as `self`, and every party accesses BAR words only atomically.
        Some(unsafe { AtomicU32::from_ptr(self.as_ptr().add(off).cast::<u32>()) })
    }

    /// Acquire load of the 32-bit register at `off`; 0 past the BAR (a doorbell there is
    /// never rung).
    pub(crate) fn load(&self, off: usize) -> u32 {
        self.word(off).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Release store of the 32-bit register at `off`; nothing past the BAR.
    pub(crate) fn store(&self, off: usize, v: u32) {
        if let Some(w) = self.word(off) {
            w.store(v, Ordering::Release)
        }
    }

    /// Consume a doorbell write: if the register holds something other than `idle`, reset it
    /// to `idle` and return true. A write that lands between the load and the reset is not
    /// lost (compare-and-swap).
    pub(crate) fn take_write(&self, off: usize, idle: u32) -> bool {
        let Some(w) = self.word(off) else {
            return false;
        };
        let mut v = w.load(Ordering::Acquire);
        while v != idle {
            match w.compare_exchange(v, idle, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
        false
    }

    /// A 64-bit register, read as two 32-bit halves (the driver may write it that way).
    pub(crate) fn load64(&self, off: usize) -> u64 {
        self.load(off) as u64 | (self.load(off + 4) as u64) << 32
    }

    pub(crate) fn store64(&self, off: usize, v: u64) {
        self.store(off, v as u32);
        self.store(off + 4, (v >> 32) as u32);
    }
}

/// Host memory named by address (identity translation). Methods are safe to call because the
/// driver guaranteed, by handing out the address, the DMA contract described in the module doc.
/// Callers pass only addresses the driver handed to the model, never zero.
pub(crate) mod dma {
    use super::*;

    /// Reads the submission entry at `addr` (8-byte aligned: the slot of a page-aligned SQ).
    /// Call only after an Acquire load of the tail doorbell that published it.
    pub(crate) fn read_sqe(addr: u64) -> SubmissionEntry {
        // SAFETY: DMA contract: the SQ slot is live queue memory; the driver wrote it before its
        // Release store of the tail doorbell, which our Acquire load observed, and it does not
        // touch the slot again until the model's CQE reports the head past it.
        unsafe { std::ptr::read_volatile(addr as *const SubmissionEntry) }
    }

    /// Writes a completion entry: dw0, dw1, dw2 and the command id first (Relaxed), the status
    /// half-word (holding the phase tag) last with Release, so a driver that sees the new phase
    /// with an Acquire load sees the whole entry.
    pub(crate) fn write_cqe(addr: u64, e: &CompletionEntry) {
        let p = addr as *mut u8;
        // SAFETY: DMA contract: the CQ slot is live, 16-byte aligned queue memory the driver has
        // released to the controller (its head doorbell is past it). The driver polls the status
        // word concurrently, so every word is written atomically.
        unsafe {
            AtomicU32::from_ptr(p.cast::<u32>()).store(e.dw0, Ordering::Relaxed);
            AtomicU32::from_ptr(p.add(4).cast::<u32>()).store(e.dw1, Ordering::Relaxed);
            let dw2 = e.sq_head as u32 | (e.sq_id as u32) << 16;
            AtomicU32::from_ptr(p.add(8).cast::<u32>()).store(dw2, Ordering::Relaxed);
            AtomicU16::from_ptr(p.add(12).cast::<u16>()).store(e.cid, Ordering::Relaxed);
            AtomicU16::from_ptr(p.add(14).cast::<u16>()).store(e.status, Ordering::Release);
        }
    }

    /// Acquire load of a 32-bit word of a shadow doorbell / EventIdx buffer.
    pub(crate) fn load_u32(addr: u64) -> u32 {
        // SAFETY: DMA contract: the doorbell buffer page stays valid while configured; it is
        // 4-byte aligned (page base + 4 * index) and both sides access it atomically.
        unsafe { AtomicU32::from_ptr(addr as *mut u32).load(Ordering::Acquire) }
    }

    /// Release store of a 32-bit word of a shadow doorbell / EventIdx buffer.
    pub(crate) fn store_u32(addr: u64, v: u32) {
        // SAFETY: as for `load_u32`.
        unsafe { AtomicU32::from_ptr(addr as *mut u32).store(v, Ordering::Release) }
    }

    /// Reads one PRP list entry (8-byte aligned: list offsets are checked by the caller).
    pub(crate) fn read_u64(addr: u64) -> u64 {
        // SAFETY: DMA contract: the PRP list belongs to an outstanding command and the driver does
        // not modify it until that command completes.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    }

    /// Copies `len` bytes from host memory at `addr` into `dst`.
    pub(crate) fn read_into(addr: u64, dst: *mut u8, len: usize) {
        // SAFETY: DMA contract for the source (a data buffer of an outstanding command); `dst` is
        // model-owned memory of at least `len` bytes (namespace RAM, checked by the caller's
        // bounds test, or a local buffer). The ranges cannot overlap: namespace RAM is a private
        // mapping the driver never sees.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst, len) }
    }

    /// Copies `len` bytes from `src` to host memory at `addr`.
    pub(crate) fn write_from(addr: u64, src: *const u8, len: usize) {
        // SAFETY: as for `read_into`, the other way round.
        unsafe { std::ptr::copy_nonoverlapping(src, addr as *mut u8, len) }
    }

    /// Zeroes `len` bytes of host memory at `addr`.
    pub(crate) fn zero(addr: u64, len: usize) {
        // SAFETY: DMA contract: a data buffer of an outstanding command.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) }
    }
}

/// An anonymous `MAP_NORESERVE` mapping, zero-filled lazily by the kernel: it costs only the
/// pages actually touched.
pub(crate) struct LazyMem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: uniquely owned process memory (like a Box<[u8]>) that is only ever accessed through
// raw pointers or atomics (no `&`/`&mut` into it is formed); its users say who may write what
// when: namespace RAM is written by the device only, BAR words are accessed atomically.
unsafe impl Send for LazyMem {}
// SAFETY: as above.
unsafe impl Sync for LazyMem {}

impl LazyMem {
    fn new(len: u64) -> std::io::Result<LazyMem> {
        let len =
            usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing
        // memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(LazyMem { ptr, len })
    }
}

impl Drop for LazyMem {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; the device thread that used it has been joined and the
        // driver's BAR pointer does not outlive the `SimController`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The RAM of one namespace (lazily zero-filled). Only the device (the thread in a pass)
/// writes it; `SimController::namespace_data` reads it with raw copies (see there).
pub(crate) struct NsMem {
    map: LazyMem,
}

impl NsMem {
    pub(crate) fn new(len: u64) -> std::io::Result<NsMem> {
        Ok(NsMem {
            map: LazyMem::new(len)?,
        })
    }

    /// Pointer to byte `off`; `off + len` must have been bounds-checked against the namespace.
    pub(crate) fn at(&self, off: u64, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len as u64)
                .is_some_and(|end| end <= self.map.len as u64),
            "namespace access out of bounds"
        );
        // SAFETY: in bounds of the live mapping (checked above).
        unsafe { self.map.ptr.as_ptr().add(off as usize) }
    }

    /// Zeroes `[off, off + len)`: whole pages go back to the kernel (they read as zeros again),
    /// partial pages at the edges are cleared in place.
    pub(crate) fn zero_range(&self, off: u64, len: u64) {
        const PAGE: u64 = 4096;
        let end = off + len;
        let _ = self.at(off, len as usize);
        let a = off.next_multiple_of(PAGE).min(end);
        let b = (end / PAGE * PAGE).max(a);
        // SAFETY: every range below lies within the mapping (checked by `at`); MADV_DONTNEED on a
        // private anonymous mapping only replaces whole pages with zero-fill pages. The device
        // thread is the only writer of namespace memory.
        unsafe {
            std::ptr::write_bytes(
                self.map.ptr.as_ptr().add(off as usize),
                0,
                (a - off) as usize,
            );
            if b > a {
                let r = libc::madvise(
                    self.map.ptr.as_ptr().add(a as usize).cast(),
                    (b - a) as usize,
                    libc::MADV_DONTNEED,
                );
                if r != 0 {
                    std::ptr::write_bytes(
                        self.map.ptr.as_ptr().add(a as usize),
                        0,
                        (b - a) as usize,
                    );
                }
            }
            std::ptr::write_bytes(self.map.ptr.as_ptr().add(b as usize), 0, (end - b) as usize);
        }
    }

    /// Copies `data` into `[off, off + data.len())` (the write cache restoring a block). Only
    /// the device (the thread in a pass) writes namespace memory.
    pub(crate) fn poke(&self, off: u64, data: &[u8]) {
        let dst = self.at(off, data.len());
        // SAFETY: `dst` is in bounds (checked by `at`); `data` is a distinct, caller-owned
        // buffer; the caller is the device, the only writer of namespace memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// Copies `[off, off + out.len())` into `out`.
    pub(crate) fn peek(&self, off: u64, out: &mut [u8]) {
        let src = self.at(off, out.len());
        // SAFETY: `src` is in bounds (checked by `at`); `out` is a distinct, caller-owned buffer.
        // The device thread may be writing this range if a command touching it is outstanding;
        // callers peek at data whose commands completed (documented on `namespace_data`).
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }
}

/// Single-writer counter: the device thread is the only writer, readers take snapshots.
/// A load plus a store instead of a locked read-modify-write keeps the hot path cheap.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub(crate) fn max(&self, v: u64) {
        if v > self.0.load(Ordering::Relaxed) {
            self.0.store(v, Ordering::Relaxed);
        }
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
