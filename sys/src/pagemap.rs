//! Virtual-to-physical translation through `/proc/self/pagemap` (for the uio path, where the
//! device sees physical addresses; with vfio the IOMMU translates instead).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PM_PFN_MASK: u64 = (1 << 55) - 1;
const PM_SWAPPED: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

/// Physical address of `vaddr` in this process. The page must be resident (touch or lock it
/// first; hugetlb pages always are). Needs CAP_SYS_ADMIN: without it the kernel reports PFN 0,
/// which is an error here.
pub fn virt_to_phys(vaddr: usize) -> io::Result<u64> {
    virt_to_phys_in(Path::new("/proc/self/pagemap"), vaddr as u64, page_size())
}

/// [`virt_to_phys`] against any pagemap-format file (tests use a fake one).
pub fn virt_to_phys_in(pagemap: &Path, vaddr: u64, page_size: u64) -> io::Result<u64> {
    let f = File::open(pagemap)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", pagemap.display())))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (vaddr / page_size) * 8)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("read {} for {vaddr:#x}: {e}", pagemap.display()),
            )
        })?;
    let entry = u64::from_ne_bytes(b);
    if entry & PM_PRESENT == 0 {
        let why = if entry & PM_SWAPPED != 0 {
            "swapped out"
        } else {
            "not present (touch or mlock it first)"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("page of {vaddr:#x} is {why}"),
        ));
    }
    let pfn = entry & PM_PFN_MASK;
    if pfn == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} hides page frame numbers: translating {vaddr:#x} needs CAP_SYS_ADMIN",
                pagemap.display()
            ),
        ));
    }
    Ok(pfn * page_size + vaddr % page_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn fake_pagemap_entries() {
        let t = TempDir::new();
        let p = t.path().join("pagemap");
        let mut data = vec![0u8; 8 * 4];
        data[8..16].copy_from_slice(&(PM_PRESENT | 0x1234).to_ne_bytes());
        data[16..24].copy_from_slice(&PM_PRESENT.to_ne_bytes()); // present, PFN hidden
        data[24..32].copy_from_slice(&PM_SWAPPED.to_ne_bytes());
        std::fs::write(&p, &data).unwrap();
        assert_eq!(
            virt_to_phys_in(&p, 4096 + 0x10, 4096).unwrap(),
            0x1234 * 4096 + 0x10
        );
        assert!(
            virt_to_phys_in(&p, 0, 4096)
                .unwrap_err()
                .to_string()
                .contains("not present")
        );
        let e = virt_to_phys_in(&p, 2 * 4096, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("CAP_SYS_ADMIN"));
        assert!(
            virt_to_phys_in(&p, 3 * 4096, 4096)
                .unwrap_err()
                .to_string()
                .contains("swapped")
        );
    }

    #[test]
    fn real_pagemap_answers_or_explains() {
        let m = crate::mem::Mapping::anonymous(4096, false, true).unwrap();
        // SAFETY: the mapping is live and one page long.
        unsafe { m.as_ptr().write_volatile(1) };
        match virt_to_phys(m.as_ptr() as usize) {
            Ok(pa) => assert_eq!(pa % 4096, 0),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
    }
}
