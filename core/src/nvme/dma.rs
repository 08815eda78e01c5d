//! DMA memory: how the controller sees the process's memory.
//!
//! Three ways, chosen when a controller is opened:
//! - **Identity** (the software model): the "device" is a thread of this process, so an I/O
//!   virtual address is the virtual address.
//! - **IOMMU** (vfio-pci): regions are mapped into the controller's IOMMU domain once, at IOVAs
//!   rio allocates itself from the ranges the IOMMU reports (`VFIO_IOMMU_GET_INFO`). rio never
//!   assumes iova = vaddr: a guest IOMMU may have only 39 address bits while user addresses use
//!   47.
//! - **Physical** (uio_pci_generic, opt-in): the device has no IOMMU in front of it and is
//!   given physical addresses read from `/proc/self/pagemap`. Only hugepage memory (pinned,
//!   physically contiguous per 2 MiB page) is accepted.
//!
//! A [`DmaRegion`] is a mapped range plus its translation; [`DmaMem`] is memory the driver
//! allocates for itself (queue rings, PRP lists, identify pages) and maps on creation.

use std::ops::RangeInclusive;
use std::sync::Mutex;

use rio_sys::mem::{Mapping, PageKind};

use crate::error::{Error, Result};

const HUGE: u64 = 2 << 20;

/// The IOVA allocator of one VFIO container: first fit over the usable ranges, freed ranges
/// reused. Allocation happens at queue creation, never per I/O.
#[derive(Debug)]
pub(crate) struct IovaAllocator {
    /// Free ranges, sorted, non-overlapping: (start, len).
    free: Vec<(u64, u64)>,
}

impl IovaAllocator {
    /// Usable `ranges` as the IOMMU reports them. IOVA 0 and the first 1 MiB are left out so a
    /// zero address is never a valid mapping (it catches unset PRP entries).
    pub fn new(ranges: &[RangeInclusive<u64>]) -> IovaAllocator {
        let mut free: Vec<(u64, u64)> = ranges
            .iter()
            .filter_map(|r| {
                let start = (*r.start()).max(1 << 20).next_multiple_of(HUGE);
                let end = r.end().saturating_add(1) & !(HUGE - 1);
                (end > start).then(|| (start, end - start))
            })
            .collect();
        free.sort();
        IovaAllocator { free }
    }

    /// `len` bytes aligned to 2 MiB (the IOMMU maps hugepages with one entry then).
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.next_multiple_of(HUGE);
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Some(start)
    }

    pub fn free(&mut self, start: u64, len: u64) {
        let len = len.next_multiple_of(HUGE);
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        // Merge with neighbours.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// How a controller's DMA addresses are made.
pub(crate) enum Mapper {
    Identity,
    Iommu {
        container: rio_sys::vfio::Container,
        iovas: Mutex<IovaAllocator>,
    },
    Physical,
}

impl std::fmt::Debug for Mapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mapper::Identity => "identity",
            Mapper::Iommu { .. } => "iommu",
            Mapper::Physical => "physical",
        })
    }
}

/// How addresses inside a region translate.
#[derive(Debug)]
enum Translation {
    /// iova = base + (vaddr - region start).
    Linear(u64),
    /// One physical address per 2 MiB page.
    Pages(Vec<u64>),
}

/// A range of process memory the controller can address.
#[derive(Debug)]
pub(crate) struct DmaRegion {
    vaddr: usize,
    len: usize,
    tr: Translation,
    /// IOVA range to unmap on release (IOMMU mode).
    mapped: Option<(u64, u64)>,
}

impl DmaRegion {
    /// Device address of `ptr`, which must lie inside the region.
    #[inline]
    pub fn iova(&self, ptr: *const u8) -> u64 {
        let off = (ptr as usize).wrapping_sub(self.vaddr);
        debug_assert!(off < self.len, "pointer outside DMA region");
        match &self.tr {
            Translation::Linear(base) => base + off as u64,
            Translation::Pages(pages) => pages[off >> 21] + (off as u64 & (HUGE - 1)),
        }
    }

    /// The device-contiguous runs of `ptr..ptr+len` (inside the region), in order: one for a
    /// linear (IOMMU or identity) translation, one per physically contiguous stretch of 2 MiB
    /// pages otherwise.
    pub fn runs(&self, ptr: *const u8, len: usize, mut f: impl FnMut(u64, usize)) {
        match &self.tr {
            Translation::Linear(_) => f(self.iova(ptr), len),
            Translation::Pages(_) => {
                let mut start = self.iova(ptr);
                let mut run = 0usize;
                let mut off = 0usize;
                while off < len {
                    let p = ptr.wrapping_add(off);
                    let to_boundary =
                        HUGE as usize - ((p as usize - self.vaddr) & (HUGE as usize - 1));
                    let n = to_boundary.min(len - off);
                    let iova = self.iova(p);
                    if run > 0 && iova != start + run as u64 {
                        f(start, run);
                        start = iova;
                        run = 0;
                    }
                    run += n;
                    off += n;
                }
                if run > 0 {
                    f(start, run);
                }
            }
        }
    }

    pub fn starts_at(&self, ptr: *const u8) -> bool {
        ptr as usize == self.vaddr
    }

    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        p >= self.vaddr && p.saturating_add(len) <= self.vaddr + self.len
    }
}

impl Mapper {
    /// Make `vaddr..vaddr+len` addressable by the device.
    ///
    /// # Safety
    /// The memory must stay mapped and unmoved until [`Mapper::release`] is called for the
    /// returned region (the device may read or write it at any time in between).
    pub unsafe fn map(&self, vaddr: *mut u8, len: usize, kind: PageKind) -> Result<DmaRegion> {
        let base = vaddr as usize;
        let tr = match self {
            Mapper::Identity => Translation::Linear(base as u64),
            Mapper::Iommu { container, iovas } => {
                let span = (len as u64).next_multiple_of(HUGE);
                let iova = iovas
                    .lock()
                    .expect("iova allocator poisoned")
                    .alloc(span)
                    .ok_or_else(|| Error::BufferUnavailable {
                        requested: len,
                        reason: "the IOMMU's address space is exhausted".into(),
                    })?;
                // Map exactly the region (page multiple); the IOVA span reserved is rounded to
                // 2 MiB so later regions start hugepage-aligned.
                let maplen = (len as u64).next_multiple_of(4096);
                // SAFETY: the caller keeps the memory mapped until `release` unmaps it.
                if let Err(e) = unsafe { container.map_dma(vaddr, maplen, iova) } {
                    iovas
                        .lock()
                        .expect("iova allocator poisoned")
                        .free(iova, span);
                    return Err(Error::BufferUnavailable {
                        requested: len,
                        reason: format!("VFIO_IOMMU_MAP_DMA of {maplen} bytes failed: {e}"),
                    });
                }
                return Ok(DmaRegion {
                    vaddr: base,
                    len,
                    tr: Translation::Linear(iova),
                    mapped: Some((iova, maplen)),
                });
            }
            Mapper::Physical => {
                // Hugetlb pages (2 MiB or 1 GiB) are physically contiguous per 2 MiB.
                if !kind.is_huge() || !base.is_multiple_of(HUGE as usize) {
                    return Err(Error::BufferUnavailable {
                        requested: len,
                        reason: "physical-address DMA (uio_pci_generic) needs memory on 2 MiB \
                                 hugepages: reserve some with `rio setup hugepages`"
                            .into(),
                    });
                }
                let mut pages = Vec::new();
                for off in (0..len).step_by(HUGE as usize) {
                    let pa = rio_sys::pagemap::virt_to_phys(base + off).map_err(|e| {
                        Error::BufferUnavailable {
                            requested: len,
                            reason: format!("cannot read the physical address: {e}"),
                        }
                    })?;
                    pages.push(pa);
                }
                Translation::Pages(pages)
            }
        };
        Ok(DmaRegion {
            vaddr: base,
            len,
            tr,
            mapped: None,
        })
    }

    /// Undo [`Mapper::map`]. After this the device can no longer reach the memory (IOMMU mode).
    pub fn release(&self, region: &mut DmaRegion) {
        if let (Mapper::Iommu { container, iovas }, Some((iova, len))) =
            (self, region.mapped.take())
        {
            match container.unmap_dma(iova, len) {
                Ok(()) => iovas
                    .lock()
                    .expect("iova allocator poisoned")
                    .free(iova, len.next_multiple_of(HUGE)),
                // Keep the IOVA range reserved: something may still be mapped there.
                Err(e) => tracing::error!(iova, len, error = %e, "VFIO_IOMMU_UNMAP_DMA failed"),
            }
        }
    }
}

/// Memory the driver owns and the device reads or writes: rings, PRP lists, identify pages.
/// Zeroed, page aligned, pinned (hugepages when reserved, else locked 4 KiB pages).
#[derive(Debug)]
pub(crate) struct DmaMem {
    /// Dropped in `Drop` unless leaked.
    map: std::mem::ManuallyDrop<Mapping>,
    region: DmaRegion,
    /// Never give the memory back: a device may still write it.
    leaked: bool,
}

impl DmaMem {
    pub fn new(mapper: &Mapper, len: usize, huge: bool) -> Result<DmaMem> {
        let huge = huge || matches!(mapper, Mapper::Physical);
        let map = Mapping::anonymous(len, huge, true).map_err(|e| Error::BufferUnavailable {
            requested: len,
            reason: format!("cannot map DMA memory: {e}"),
        })?;
        if !map.locked() && !matches!(mapper, Mapper::Identity) {
            return Err(Error::BufferUnavailable {
                requested: len,
                reason: "cannot pin DMA memory (mlock failed; raise RLIMIT_MEMLOCK or reserve \
                         hugepages)"
                    .into(),
            });
        }
        // SAFETY: the mapping is owned by the returned value, which releases the region in
        // its owner's drop before the mapping is unmapped (see `DmaMem::release`).
        let region = unsafe { mapper.map(map.as_ptr(), map.len(), map.kind())? };
        Ok(DmaMem {
            map: std::mem::ManuallyDrop::new(map),
            region,
            leaked: false,
        })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Device address of byte `off`.
    #[inline]
    pub fn iova(&self, off: usize) -> u64 {
        self.region.iova(self.map.as_ptr().wrapping_add(off))
    }

    pub fn zero(&mut self) {
        // SAFETY: the mapping is live and `len` bytes long; no device access is in progress
        // when the owner zeroes it (queues are deleted or the controller is disabled).
        unsafe { std::ptr::write_bytes(self.map.as_ptr(), 0, self.map.len()) }
    }

    /// Unmap from the device and free. A `DmaMem` dropped without this keeps its IOMMU
    /// mapping until the VFIO container closes: VFIO holds the pages pinned meanwhile, so the
    /// device never reaches memory the process reuses. (With physical addresses there is no
    /// such guard: the controller stops bus mastering before its memory is dropped.)
    pub fn release(mut self, mapper: &Mapper) {
        self.unmap(mapper);
    }

    /// Remove the device's mapping (IOMMU mode); the memory itself is freed on drop.
    pub fn unmap(&mut self, mapper: &Mapper) {
        mapper.release(&mut self.region);
    }

    /// Never return this memory to the system (the device may still write it): dropping the
    /// value then frees nothing.
    pub fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for DmaMem {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: `map` is dropped exactly once, here, and never used afterwards.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.map) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iova_allocator_respects_ranges_and_reuses() {
        // A 39-bit IOMMU with a hole, as a guest's intel-iommu reports.
        let mut a = IovaAllocator::new(&[0..=0xFEDF_FFFF, 0xFEF0_0000..=(1 << 39) - 1]);
        let x = a.alloc(4096).unwrap();
        assert!(x >= 1 << 20 && x.is_multiple_of(HUGE));
        let y = a.alloc(5 << 20).unwrap();
        assert_eq!(y, x + HUGE);
        let z = a.alloc(1 << 38).unwrap();
        assert!(z + (1 << 38) <= 1 << 39);
        assert!(
            z >= 0xFEF0_0000,
            "a range that does not fit skips the first window"
        );
        a.free(y, 5 << 20);
        assert_eq!(a.alloc(2 << 20), Some(y), "freed range is reused first-fit");
        a.free(x, 4096);
        a.free(y, 2 << 20);
        // x, y merged back into one range with the rest of y's old span.
        assert_eq!(a.alloc(6 << 20), Some(x));
        assert!(a.alloc(1 << 40).is_none());
    }

    #[test]
    fn identity_translation() {
        let m = DmaMem::new(&Mapper::Identity, 8192, false).unwrap();
        assert_eq!(m.iova(100), m.ptr() as u64 + 100);
        m.release(&Mapper::Identity);
    }
}
