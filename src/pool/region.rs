//! The mappings pool buffers are carved from. Every system call of the pools is here, each
//! with its `// SAFETY:` argument.
//!
//! `rio_sys::mem::Mapping` maps and populates in one step and knows 2 MiB pages only; a pool
//! needs 1 GiB pages and has to bind a mapping to a NUMA node *before* its pages are faulted
//! in, so it maps in three steps: reserve (mmap without populate), bind, populate
//! (`MADV_POPULATE_WRITE`, which reports a failure instead of a SIGBUS), then `mlock` for 4 KiB
//! pages. (This belongs in `rio-sys` once that crate grows a node-aware mapping.)

use std::ptr::NonNull;

use super::PoolError;
use super::numa::{Numa, Placement};

/// Page size of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    Huge1G,
    Huge2M,
    /// 4 KiB pages, locked with `mlock`.
    Normal,
}

impl PageKind {
    pub fn bytes(self) -> usize {
        match self {
            PageKind::Huge1G => 1 << 30,
            PageKind::Huge2M => 2 << 20,
            PageKind::Normal => 4 << 10,
        }
    }
}

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

const MAP_HUGE_SHIFT: libc::c_int = 26;
const MAP_HUGE_2MB: libc::c_int = 21 << MAP_HUGE_SHIFT;
const MAP_HUGE_1GB: libc::c_int = 30 << MAP_HUGE_SHIFT;

/// A populated, pinned (hugetlb or mlocked), possibly NUMA-bound anonymous mapping, owned;
/// unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    kind: PageKind,
    placement: Placement,
}

// SAFETY: a Mapping uniquely owns its region of process memory, like a Box<[u8]>; moving the
// owner to another thread creates no aliasing.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only exposes the address, length and page kind; access to the bytes goes
// through raw pointers whose users (PoolBuf) argue their own exclusivity.
unsafe impl Sync for Mapping {}

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
        let extra = match kind {
            PageKind::Huge1G => libc::MAP_HUGETLB | MAP_HUGE_1GB,
            PageKind::Huge2M => libc::MAP_HUGETLB | MAP_HUGE_2MB,
            PageKind::Normal => 0,
        };
        // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing
        // memory. Without MAP_NORESERVE, a hugetlb mapping reserves its pages here (ENOMEM if
        // the pool cannot supply them) rather than at fault time.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap NULL"))?;
        // From here on, dropping `m` unmaps.
        let mut m = Mapping {
            ptr,
            len,
            kind,
            placement: Placement::SingleNode,
        };
        {
            // SAFETY: the range is our own fresh mapping, readable and writable, referenced by
            // nothing else (no buffer has been carved and no device knows it). hwloc only
            // uses the address and length of this slice (mbind); nothing reads the bytes.
            let area = unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), m.len) };
            m.placement = numa.bind(area, cpu);
        }
        // SAFETY: populating our own mapping; MADV_POPULATE_WRITE faults the pages in (on the
        // bound node) and fails with an error, not a signal, if they cannot be supplied.
        let r = unsafe { libc::madvise(p, len, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) || kind != PageKind::Normal {
                return Err(e);
            }
            // Kernel older than 5.14: mlock below populates 4 KiB pages.
        }
        if kind == PageKind::Normal {
            // SAFETY: locking exactly our own live mapping.
            if unsafe { libc::mlock(p, len) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(m)
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn kind(&self) -> PageKind {
        self.kind
    }
    pub(crate) fn placement(&self) -> Placement {
        self.placement
    }
    pub(crate) fn contains(&self, addr: usize) -> bool {
        let base = self.ptr.as_ptr() as usize;
        addr >= base && addr < base + self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; the pool drops a region only when every buffer carved
        // from it is back on a free list (none is reachable), and it leaks the regions instead
        // when buffers are still out at shutdown.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
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
