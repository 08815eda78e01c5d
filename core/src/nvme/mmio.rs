//! Register access to a controller's BAR0.
//!
//! The same code drives a real controller (BAR0 mapped through VFIO or sysfs) and the software
//! model (BAR0 in ordinary memory watched by the model's thread). Every access is a single
//! aligned 32-bit atomic load or store: on x86-64 that compiles to the plain `mov` an MMIO
//! access needs, and against the model it is a well-defined cross-thread access. 64-bit
//! registers are accessed as two 32-bit halves, low first, as Linux's `lo_hi_writeq` does
//! (controllers must accept it; some reject 64-bit accesses).

use std::sync::atomic::{AtomicU32, Ordering};

use super::spec;

/// BAR0 registers of one controller. Cheap to copy; the owner of the mapping (the controller)
/// outlives every copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Regs {
    base: *mut u8,
    len: usize,
}

// SAFETY: `Regs` is a pointer to device registers (or the model's register memory) that every
// access touches atomically; the controller keeps the mapping alive while any `Regs` exists.
unsafe impl Send for Regs {}
// SAFETY: as above; concurrent atomic accesses to distinct or equal registers are sound.
unsafe impl Sync for Regs {}

impl Regs {
    /// # Safety
    /// `base..base+len` must be a live mapping of the controller's BAR0 (or the model's register
    /// page), 4-byte aligned, that stays mapped for as long as this value or a copy is used.
    pub unsafe fn new(base: *mut u8, len: usize) -> Regs {
        Regs { base, len }
    }

    #[inline]
    fn word(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "register offset {off:#x} outside BAR0 ({:#x} bytes)",
            self.len
        );
        // SAFETY: `off` is aligned and inside the live mapping (checked above, contract of
        // `new`); AtomicU32 has the layout of u32.
        unsafe { AtomicU32::from_ptr(self.base.add(off).cast()) }
    }

    #[inline]
    pub fn read32(&self, off: usize) -> u32 {
        self.word(off).load(Ordering::Acquire)
    }

    #[inline]
    pub fn write32(&self, off: usize, v: u32) {
        self.word(off).store(v, Ordering::Release)
    }

    pub fn read64(&self, off: usize) -> u64 {
        let lo = self.read32(off) as u64;
        let hi = self.read32(off + 4) as u64;
        hi << 32 | lo
    }

    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    pub fn cap(&self) -> spec::Cap {
        spec::Cap(self.read64(spec::reg::CAP))
    }

    pub fn cc(&self) -> spec::Cc {
        spec::Cc(self.read32(spec::reg::CC))
    }

    pub fn set_cc(&self, cc: spec::Cc) {
        self.write32(spec::reg::CC, cc.0)
    }

    pub fn csts(&self) -> spec::Csts {
        spec::Csts(self.read32(spec::reg::CSTS))
    }

    /// Bytes of BAR0 mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Address of a doorbell register, for a queue pair to keep (checked once here, then
    /// written without bounds checks on the hot path); `None` when it lies outside BAR0.
    pub fn doorbell(&self, off: usize) -> Option<Doorbell> {
        if !off.is_multiple_of(4) || off.checked_add(4)? > self.len {
            return None;
        }
        let w = self.word(off);
        Some(Doorbell(w as *const AtomicU32))
    }
}

/// One doorbell register.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Doorbell(*const AtomicU32);

// SAFETY: points at a register of a mapping that outlives the queue pair owning the doorbell;
// it is only written atomically.
unsafe impl Send for Doorbell {}
// SAFETY: as above.
unsafe impl Sync for Doorbell {}

impl Doorbell {
    #[inline]
    pub fn write(&self, v: u32) {
        // SAFETY: created by `Regs::doorbell` from a checked offset of a mapping the controller
        // keeps alive while its queue pairs exist.
        unsafe { (*self.0).store(v, Ordering::Release) }
    }
}
