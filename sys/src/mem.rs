//! Anonymous mappings for I/O buffers: hugepage-backed when asked and available, else normal
//! pages, optionally locked.

use std::ptr::NonNull;

/// Page size of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// 1 GiB hugepages from the hugetlb pool.
    Huge1G,
    /// 2 MiB hugepages from the hugetlb pool.
    Huge2M,
    /// Ordinary 4 KiB pages.
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

    /// Whether pages of this kind are physically contiguous over 2 MiB (hugetlb pages).
    pub fn is_huge(self) -> bool {
        self != PageKind::Normal
    }
}

const MAP_HUGE_SHIFT: libc::c_int = 26;
const MAP_HUGE_2MB: libc::c_int = 21 << MAP_HUGE_SHIFT;
const MAP_HUGE_1GB: libc::c_int = 30 << MAP_HUGE_SHIFT;

/// An anonymous, page-aligned, zero-filled mapping owned by this value; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    kind: PageKind,
    locked: bool,
}

// SAFETY: a Mapping is a uniquely owned region of process memory, like a Box<[u8]>; moving the
// owner to another thread does not create aliasing.
unsafe impl Send for Mapping {}
// SAFETY: shared references only expose the address and length; writing through the pointer
// is the caller's responsibility (and `unsafe`).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes (rounded up to the page size). With `huge`, try 2 MiB hugepages first and
    /// fall back to normal pages when the hugetlb pool cannot supply them. With `lock`, `mlock`
    /// the region (best effort: failure is reported by [`Mapping::locked`]).
    pub fn anonymous(len: usize, huge: bool, lock: bool) -> std::io::Result<Mapping> {
        const HUGE: usize = 2 << 20;
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if huge {
            let hlen = len.div_ceil(HUGE) * HUGE;
            if let Ok(ptr) = map(hlen, libc::MAP_HUGETLB | MAP_HUGE_2MB | libc::MAP_POPULATE) {
                return Ok(Mapping {
                    ptr,
                    len: hlen,
                    kind: PageKind::Huge2M,
                    locked: true, // hugetlb pages are never swapped
                });
            }
        }
        let plen = len.div_ceil(4096) * 4096;
        let ptr = map(plen, libc::MAP_POPULATE)?;
        let mut m = Mapping {
            ptr,
            len: plen,
            kind: PageKind::Normal,
            locked: false,
        };
        if lock {
            // SAFETY: the range is exactly our own live mapping.
            m.locked = unsafe { libc::mlock(m.ptr.as_ptr().cast(), m.len) } == 0;
        }
        Ok(m)
    }

    /// Map `len` bytes (a multiple of `kind`'s page size) without faulting any page in, so
    /// the caller can set a memory policy (NUMA binding) first; then [`Mapping::populate_and_lock`].
    /// For hugetlb kinds the pages are reserved here (ENOMEM if the pool cannot supply them).
    pub fn reserve(len: usize, kind: PageKind) -> std::io::Result<Mapping> {
        if len == 0 || !len.is_multiple_of(kind.bytes()) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let extra = match kind {
            PageKind::Huge1G => libc::MAP_HUGETLB | MAP_HUGE_1GB,
            PageKind::Huge2M => libc::MAP_HUGETLB | MAP_HUGE_2MB,
            PageKind::Normal => 0,
        };
        Ok(Mapping {
            ptr: map(len, extra)?,
            len,
            kind,
            locked: kind.is_huge(), // hugetlb pages are never swapped
        })
    }

    /// Fault every page in (`MADV_POPULATE_WRITE`: a failure is an error, not a SIGBUS), and
    /// lock 4 KiB pages with `mlock` (which also populates on kernels older than 5.14).
    pub fn populate_and_lock(&mut self) -> std::io::Result<()> {
        // SAFETY: populating exactly our own live mapping.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) || self.kind.is_huge() {
                return Err(e);
            }
        }
        if !self.locked {
            // SAFETY: locking exactly our own live mapping.
            if unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            self.locked = true;
        }
        Ok(())
    }

    /// Whether `addr` lies in the mapping.
    pub fn contains(&self, addr: usize) -> bool {
        let base = self.ptr.as_ptr() as usize;
        addr >= base && addr < base + self.len
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
    pub fn kind(&self) -> PageKind {
        self.kind
    }
    pub fn locked(&self) -> bool {
        self.locked
    }
}

fn map(len: usize, extra: libc::c_int) -> std::io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
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
    Ok(NonNull::new(p.cast()).expect("mmap returned NULL without MAP_FIXED"))
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nobody holds pointers into it past our lifetime (the
        // engine leaks a Mapping rather than drop it while the kernel may still write to it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_mapping_is_zeroed_and_aligned() {
        let m = Mapping::anonymous(10_000, false, false).unwrap();
        assert_eq!(m.len(), 12_288);
        assert_eq!(m.as_ptr() as usize % 4096, 0);
        // SAFETY: the mapping is live and 12 KiB long.
        let s = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert!(s.iter().all(|&b| b == 0));
    }

    #[test]
    fn zero_length_is_an_error() {
        assert!(Mapping::anonymous(0, false, false).is_err());
    }
}
