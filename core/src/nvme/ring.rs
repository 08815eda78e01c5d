//! One submission/completion queue pair's rings: the mechanics shared by the admin queue and
//! the I/O queues (entries, phase tags, doorbells, shadow doorbells). Command bookkeeping lives
//! with the owners ([`super::ctrl`] for admin, [`crate::backend::nvme`] for I/O).

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering, fence};

use super::dma::{DmaMem, Mapper};
use super::mmio::Doorbell;
use super::spec::{CompletionEntry, SubmissionEntry};
use crate::error::Result;

/// Shadow doorbell and EventIdx slots of one queue (Doorbell Buffer Config).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shadow {
    pub sq_tail: *const AtomicU32,
    pub sq_event: *const AtomicU32,
    pub cq_head: *const AtomicU32,
    pub cq_event: *const AtomicU32,
}

// SAFETY: the pointers are slots of the controller's doorbell buffer, which outlives its
// queues; they are accessed atomically by the single thread that owns the ring.
unsafe impl Send for Shadow {}
// SAFETY: as above.
unsafe impl Sync for Shadow {}

/// Rings of one queue pair, in DMA memory.
#[derive(Debug)]
pub(crate) struct Ring {
    pub qid: u16,
    pub entries: u16,
    sq: DmaMem,
    cq: DmaMem,
    sq_tail: u16,
    /// Last SQ tail value the controller was told.
    sq_tail_rung: u16,
    /// SQ head as last reported by a completion: entries before it are free.
    sq_head: u16,
    cq_head: u16,
    cq_head_rung: u16,
    phase: bool,
    sq_db: Doorbell,
    cq_db: Doorbell,
    shadow: Option<Shadow>,
    /// Completions whose SQ head field was out of range (device protocol violations).
    pub bad_sq_head: u64,
}

impl Ring {
    pub fn new(
        mapper: &Mapper,
        qid: u16,
        entries: u16,
        sq_db: Doorbell,
        cq_db: Doorbell,
        huge: bool,
    ) -> Result<Ring> {
        let sq = DmaMem::new(mapper, entries as usize * 64, huge)?;
        let cq = DmaMem::new(mapper, entries as usize * 16, huge)?;
        Ok(Ring {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_tail_rung: 0,
            sq_head: 0,
            cq_head: 0,
            cq_head_rung: 0,
            phase: true,
            sq_db,
            cq_db,
            shadow: None,
            bad_sq_head: 0,
        })
    }

    pub fn sq_iova(&self) -> u64 {
        self.sq.iova(0)
    }

    pub fn cq_iova(&self) -> u64 {
        self.cq.iova(0)
    }

    /// Back to the state of a freshly created queue (after the controller forgot it).
    pub fn reset(&mut self) {
        self.sq.zero();
        self.cq.zero();
        self.sq_tail = 0;
        self.sq_tail_rung = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.cq_head_rung = 0;
        self.phase = true;
        self.clear_shadow();
    }

    /// Use shadow doorbells. Their slots, and the EventIdx slots beside them, may still hold
    /// the values of an earlier queue with the same id; both restart at 0 with this ring.
    /// A stale shadow tail makes the controller fetch entries that were never written; a stale
    /// EventIdx makes the driver skip MMIO doorbell writes a controller like QEMU's waits for
    /// (measured: the first 16 commands of a re-created queue never completed).
    pub fn set_shadow(&mut self, shadow: Option<Shadow>) {
        self.shadow = shadow;
        self.clear_shadow();
    }

    /// Whether the doorbells are shadowed (Doorbell Buffer Config): a doorbell is then a
    /// store to memory the controller reads, and an MMIO write only when its EventIdx asks.
    #[inline]
    pub fn has_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    fn clear_shadow(&self) {
        if let Some(s) = self.shadow {
            // SAFETY: slots in the live doorbell buffer; the queue does not exist on the
            // device (not created yet, or deleted, or the controller was reset), so the
            // controller neither reads nor writes them now.
            unsafe {
                (*s.sq_tail).store(0, Ordering::Release);
                (*s.cq_head).store(0, Ordering::Release);
                (*s.sq_event).store(0, Ordering::Release);
                (*s.cq_event).store(0, Ordering::Release);
            }
        }
    }

    /// Free SQ slots (one is always left empty: full is tail + 1 == head).
    #[inline]
    pub fn sq_space(&self) -> u16 {
        self.entries - 1 - self.distance(self.sq_head, self.sq_tail)
    }

    /// Entries written since the last SQ doorbell.
    #[inline]
    pub fn sq_unrung(&self) -> u16 {
        self.distance(self.sq_tail_rung, self.sq_tail)
    }

    /// Completion entries consumed whose slots the controller has not been given back yet
    /// (the CQ head doorbell lags [`Ring::next_cqe`] until [`Ring::ring_cq`]).
    pub fn cq_unrung(&self) -> u16 {
        self.distance(self.cq_head_rung, self.cq_head)
    }

    /// Ring distance from `from` to `to` (no division: entries need not be a power of two).
    #[inline]
    fn distance(&self, from: u16, to: u16) -> u16 {
        if to >= from {
            to - from
        } else {
            to + self.entries - from
        }
    }

    /// Copy `cmd` into the next SQ slot. The caller checked `sq_space() > 0`. The controller
    /// sees it at the next [`Ring::ring_sq`].
    #[inline]
    pub fn push(&mut self, cmd: &SubmissionEntry) {
        debug_assert!(self.sq_space() > 0);
        let slot = self.sq.ptr().wrapping_add(self.sq_tail as usize * 64);
        // SAFETY: `sq_tail < entries`, so the slot lies inside the SQ mapping; the controller
        // does not read slots at or past the tail it was told.
        unsafe { std::ptr::write_volatile(slot.cast::<SubmissionEntry>(), *cmd) };
        self.sq_tail += 1;
        if self.sq_tail == self.entries {
            self.sq_tail = 0;
        }
    }

    /// Tell the controller about new SQ entries: one doorbell write per batch, or none when a
    /// shadow doorbell shows the controller is already looking.
    /// Returns whether the MMIO doorbell was written.
    #[inline]
    pub fn ring_sq(&mut self) -> bool {
        if self.sq_tail == self.sq_tail_rung {
            return false;
        }
        let old = self.sq_tail_rung;
        self.sq_tail_rung = self.sq_tail;
        if let Some(s) = self.shadow {
            // SAFETY: slots in the live doorbell buffer (see `reset`).
            let need = unsafe { shadow_update(s.sq_tail, s.sq_event, self.sq_tail, old) };
            if !need {
                return false;
            }
        }
        // The entries were written with ordinary stores; the doorbell store is a release, and
        // on x86 stores to write-back memory are visible to the device before a later store
        // to the (uncached) doorbell.
        self.sq_db.write(self.sq_tail as u32);
        true
    }

    /// [`Ring::ring_cq`] (only `with_cq`) then [`Ring::ring_sq`] for shadow doorbells (the
    /// caller checked [`Ring::has_shadow`]), with one full fence for both, and without the
    /// MMIO writes the controller's EventIdx values ask for: those are returned, (CQ head, SQ
    /// tail), for the caller to make later with [`Ring::write_cq_db`] and
    /// [`Ring::write_sq_db`].
    #[inline]
    pub fn ring_both_shadow(&mut self, with_cq: bool) -> (bool, bool) {
        debug_assert!(
            self.shadow.is_some(),
            "ring_both_shadow without shadow doorbells"
        );
        let Some(s) = self.shadow else {
            return (false, false);
        };
        let cq = (with_cq && self.cq_head != self.cq_head_rung).then_some(self.cq_head_rung);
        let sq = (self.sq_tail != self.sq_tail_rung).then_some(self.sq_tail_rung);
        if cq.is_none() && sq.is_none() {
            return (false, false);
        }
        if cq.is_some() {
            self.cq_head_rung = self.cq_head;
        }
        self.sq_tail_rung = self.sq_tail;
        // SAFETY: slots in the live doorbell buffer (see `reset`); as in `shadow_update`: the
        // new values, a full fence, then the controller's EventIdx values.
        unsafe {
            if cq.is_some() {
                (*s.cq_head).store(self.cq_head as u32, Ordering::Release);
            }
            if sq.is_some() {
                (*s.sq_tail).store(self.sq_tail as u32, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            let need = |event: *const AtomicU32, new: u16, old: Option<u16>| {
                old.is_some_and(|old| {
                    let ev = (*event).load(Ordering::Acquire) as u16;
                    super::spec::shadow_doorbell_need_event(ev, new, old)
                })
            };
            (
                need(s.cq_event, self.cq_head, cq),
                need(s.sq_event, self.sq_tail, sq),
            )
        }
    }

    /// Write the CQ head to the MMIO doorbell (owed by [`Ring::ring_both_shadow`]).
    #[inline]
    pub fn write_cq_db(&mut self) {
        self.cq_db.write(self.cq_head_rung as u32);
    }

    /// Write the SQ tail to the MMIO doorbell (owed by [`Ring::ring_both_shadow`]).
    #[inline]
    pub fn write_sq_db(&mut self) {
        self.sq_db.write(self.sq_tail_rung as u32);
    }

    /// The next completion, if the controller has posted one. Advances the CQ head (the
    /// doorbell is written by [`Ring::ring_cq`]).
    #[inline]
    pub fn next_cqe(&mut self) -> Option<CompletionEntry> {
        let slot = self.cq.ptr().wrapping_add(self.cq_head as usize * 16);
        // SAFETY: `cq_head < entries`, inside the CQ mapping; the status word is read
        // atomically first and the rest only once its phase says the entry is complete.
        let status = unsafe { (*slot.add(14).cast::<AtomicU16>()).load(Ordering::Acquire) };
        if (status & 1 != 0) != self.phase {
            return None;
        }
        // SAFETY: as above; the acquire load orders this read after the controller's write.
        let cqe = unsafe { std::ptr::read_volatile(slot.cast::<CompletionEntry>()) };
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        // The device is untrusted: an SQ head outside the ring is ignored (and counted).
        if cqe.sq_head < self.entries {
            self.sq_head = cqe.sq_head;
        } else {
            self.bad_sq_head += 1;
        }
        Some(cqe)
    }

    /// Release consumed CQ entries to the controller.
    #[inline]
    pub fn ring_cq(&mut self) {
        if self.cq_head == self.cq_head_rung {
            return;
        }
        let old = self.cq_head_rung;
        self.cq_head_rung = self.cq_head;
        if let Some(s) = self.shadow {
            // SAFETY: slots in the live doorbell buffer.
            let need = unsafe { shadow_update(s.cq_head, s.cq_event, self.cq_head, old) };
            if !need {
                return;
            }
        }
        self.cq_db.write(self.cq_head as u32);
    }

    pub fn release(self, mapper: &Mapper) {
        self.sq.release(mapper);
        self.cq.release(mapper);
    }

    /// Remove the device's mappings of the rings (IOMMU mode); memory is freed on drop.
    pub fn unmap(&mut self, mapper: &Mapper) {
        self.sq.unmap(mapper);
        self.cq.unmap(mapper);
    }

    /// Never return the rings' memory to the system (the device may still use it).
    pub fn leak(&mut self) {
        self.sq.leak();
        self.cq.leak();
    }
}

/// Store `new` in a shadow doorbell and say whether the MMIO doorbell must be written too
/// (the controller's EventIdx was crossed), as NVMe 1.3 §7.13 and SPDK do.
///
/// # Safety
/// Both pointers point into the live doorbell buffer.
unsafe fn shadow_update(db: *const AtomicU32, event: *const AtomicU32, new: u16, old: u16) -> bool {
    // SAFETY: caller contract.
    unsafe {
        (*db).store(new as u32, Ordering::Release);
        // Full barrier: the controller must either see the new shadow value or we must see its
        // updated EventIdx (store-load ordering).
        fence(Ordering::SeqCst);
        let ev = (*event).load(Ordering::Acquire) as u16;
        super::spec::shadow_doorbell_need_event(ev, new, old)
    }
}
