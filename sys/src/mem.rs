//! Anonymous mappings for I/O buffers: hugepage-backed when asked and available, else normal
//! pages, optionally locked.

use std::ptr::NonNull;

/// Page size of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugepages from the hugetlb pool.
    Huge2M,
    /// Ordinary 4 KiB pages.
    Normal,
}

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
            if let Ok(ptr) = map(hlen, libc::MAP_HUGETLB | libc::MAP_POPULATE) {
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
