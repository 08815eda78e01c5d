//! The mappings pool buffers are carved from.
//!
//! A pool has to bind a mapping to a NUMA node *before* its pages are faulted in, so it maps
//! in three steps, all system calls in `rio_sys::mem`: reserve (mmap without populate), bind
//! (hwloc), then populate and lock.

use super::PoolError;
use super::numa::{Numa, Placement};

pub use rio_sys::mem::PageKind;

/// Which page sizes to try for pool memory, largest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PagePolicy {
    /// 1 GiB pages where reserved, else 2 MiB, else 4 KiB + mlock.
    Huge1G,
    /// 2 MiB pages where reserved, else 4 KiB + mlock.
    #[default]
    Huge2M,
    /// 4 KiB pages + mlock only.
    Normal,
}

impl PagePolicy {
    fn chain(self) -> &'static [PageKind] {
        match self {
            PagePolicy::Huge1G => &[PageKind::Huge1G, PageKind::Huge2M, PageKind::Normal],
            PagePolicy::Huge2M => &[PageKind::Huge2M, PageKind::Normal],
            PagePolicy::Normal => &[PageKind::Normal],
        }
    }
}

/// A populated, pinned (hugetlb or mlocked), possibly NUMA-bound anonymous mapping, owned;
/// unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    map: rio_sys::mem::Mapping,
    placement: Placement,
}

impl Mapping {
    /// Map at least `len` bytes for `cpu`'s pool, trying the page sizes of `policy` in order.
    /// A page size is skipped when the hugetlb pool cannot supply it; 4 KiB pages are taken
    /// only if they can be locked.
    pub(crate) fn new(
        len: usize,
        policy: PagePolicy,
        numa: &Numa,
        cpu: usize,
    ) -> Result<Mapping, PoolError> {
        let mut tried: Vec<String> = Vec::new();
        for &kind in policy.chain() {
            let plen = len.next_multiple_of(kind.bytes());
            // A 1 GiB page for a region that needs far less would strand most of it.
            if kind == PageKind::Huge1G && plen > 2 * len {
                tried.push("1 GiB pages: region too small".into());
                continue;
            }
            match Self::try_kind(plen, kind, numa, cpu) {
                Ok(m) => {
                    if kind == PageKind::Normal && policy != PagePolicy::Normal {
                        tracing::warn!(
                            core = cpu,
                            bytes = plen,
                            pages = plen / 4096,
                            tried = %tried.join("; "),
                            "no hugepages reserved for this buffer pool region: using 4 KiB pages locked with mlock. \
                             Cost: {}x more TLB entries and IOMMU/registration entries than 2 MiB pages, \
                             slower DMA mapping, and the locked bytes count against RLIMIT_MEMLOCK \
                             (reserve hugepages with `rio setup hugepages` to avoid this)",
                            PageKind::Huge2M.bytes() / 4096
                        );
                    }
                    return Ok(m);
                }
                Err(e) if kind != PageKind::Normal => {
                    tried.push(format!("{kind:?}: {e}"));
                }
                Err(e) => {
                    return Err(PoolError::Map {
                        core: cpu,
                        bytes: plen,
                        reason: format!(
                            "{}; {e} (raise RLIMIT_MEMLOCK / `ulimit -l`, run with CAP_IPC_LOCK, or reserve hugepages)",
                            tried.join("; ")
                        ),
                    });
                }
            }
        }
        Err(PoolError::Map {
            core: cpu,
            bytes: len,
            reason: tried.join("; "),
        })
    }

    fn try_kind(len: usize, kind: PageKind, numa: &Numa, cpu: usize) -> std::io::Result<Mapping> {
        let mut map = rio_sys::mem::Mapping::reserve(len, kind)?;
        // SAFETY: the range is our own fresh mapping, referenced by nothing else (no buffer has
        // been carved and no device knows it). hwloc only uses the address and length of this
        // slice (mbind); nothing reads the bytes, and no page has been faulted in yet.
        let area = unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) };
        let placement = numa.bind(area, cpu);
        map.populate_and_lock()?;
        Ok(Mapping { map, placement })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
    pub(crate) fn kind(&self) -> PageKind {
        self.map.kind()
    }
    pub(crate) fn placement(&self) -> Placement {
        self.placement
    }
    pub(crate) fn contains(&self, addr: usize) -> bool {
        self.map.contains(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_pages_are_zeroed_locked_and_aligned() {
        let numa = Numa::from_map(vec![Some(0)]);
        let m = Mapping::new(10_000, PagePolicy::Normal, &numa, 0).unwrap();
        assert_eq!(m.len(), 12_288);
        assert_eq!(m.kind(), PageKind::Normal);
        assert_eq!(m.as_ptr() as usize % 4096, 0);
        assert_eq!(m.placement(), Placement::SingleNode);
        // SAFETY: the mapping is live, 12 KiB long, and only this test refers to it.
        let s = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert!(s.iter().all(|&b| b == 0));
        let locked = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmLck:"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
            .unwrap();
        assert!(locked >= 12, "VmLck {locked} kB");
    }

    #[test]
    fn huge_policy_falls_back_when_nothing_is_reserved() {
        let numa = Numa::from_map(vec![Some(0)]);
        let m = Mapping::new(4 << 20, PagePolicy::Huge1G, &numa, 0).unwrap();
        // Either the host has 2 MiB pages reserved or it fell back to locked 4 KiB pages;
        // a 4 MiB region never takes a 1 GiB page.
        assert_ne!(m.kind(), PageKind::Huge1G);
        assert_eq!(m.len(), 4 << 20);
    }
}
