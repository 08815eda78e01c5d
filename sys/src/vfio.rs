//! VFIO type1 (`<linux/vfio.h>`): containers, groups, devices, DMA mapping and BAR mapping.
//!
//! Three layers, as in rust-vmm's vfio-ioctls: the uAPI structures (`#[repr(C)]`, sizes checked
//! at compile time); one private `ioctls` module that issues every ioctl, each with a
//! `// SAFETY:` argument; the safe types on top. Under `#[cfg(test)]` the `ioctls` module is
//! replaced by a twin with the same signatures that answers from a per-thread fake kernel, so the
//! logic here (argsz negotiation, capability chains, viability, region bounds) is tested without
//! `/dev/vfio`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use crate::mmio::MmioRegion;

// ---------------------------------------------------------------------------------------------
// uAPI (linux/vfio.h)

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls carry no size in the number (argsz is in-band).
const fn vfio_io(n: u32) -> libc::c_ulong {
    ((VFIO_TYPE << 8) | (VFIO_BASE + n)) as libc::c_ulong
}

const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_DEVICE_RESET: libc::c_ulong = vfio_io(11);
const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

const _: () = assert!(VFIO_GET_API_VERSION == 0x3b64);
const _: () = assert!(VFIO_IOMMU_UNMAP_DMA == 0x3b72);

/// The only VFIO API version there has ever been.
pub const VFIO_API_VERSION: i32 = 0;
/// Type1 IOMMU (x86 VT-d / AMD-Vi, ARM SMMU).
pub const VFIO_TYPE1_IOMMU: u32 = 1;
/// Type1 v2: unmap semantics fixed (no partial unmaps of a mapping); preferred.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;

/// `vfio_group_status.flags`: every device in the group is bound to a VFIO-safe driver.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// `vfio_group_status.flags`: the group is attached to a container.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;

const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// `vfio_device_info.flags`: the device supports `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `vfio_device_info.flags`: a PCI device.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `vfio_region_info.flags`: region supports read.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `vfio_region_info.flags`: region supports write.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `vfio_region_info.flags`: region supports mmap.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// Region index of BAR0 (BARs are 0..=5).
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// Region index of PCI configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// IOVA space assumed when the kernel reports no IOVA-range capability (39 bits: the smallest
/// address width of current VT-d implementations with 3-level tables).
pub const DEFAULT_IOVA_RANGE: RangeInclusive<u64> = 0..=(1u64 << 39) - 1;

/// PCI configuration-space Command register offset and bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;
const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_group_status {
    argsz: u32,
    flags: u32,
}

/// `struct vfio_info_cap_header`: links the capability chain of `*_GET_INFO` answers.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_info_cap_header {
    id: u16,
    version: u16,
    /// Offset of the next capability from the start of the info structure; 0 ends the chain.
    next: u32,
}

/// `struct vfio_iommu_type1_info` (fixed part; capabilities follow at `cap_offset`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_iommu_type1_info {
    argsz: u32,
    flags: u32,
    iova_pgsizes: u64,
    cap_offset: u32,
    pad: u32,
}

/// `struct vfio_iova_range`, an element of `vfio_iommu_type1_info_cap_iova_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_iova_range {
    start: u64,
    end: u64,
}

/// `struct vfio_iommu_type1_info_cap_iova_range` (fixed part; `nr_iovas` ranges follow).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_iommu_type1_info_cap_iova_range {
    header: vfio_info_cap_header,
    nr_iovas: u32,
    reserved: u32,
}

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_iommu_type1_dma_map {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the dirty-bitmap tail).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_iommu_type1_dma_unmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

/// `struct vfio_device_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_device_info {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    cap_offset: u32,
    pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct vfio_region_info {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

const _: () = assert!(size_of::<vfio_group_status>() == 8);
const _: () = assert!(size_of::<vfio_info_cap_header>() == 8);
const _: () = assert!(size_of::<vfio_iommu_type1_info>() == 24);
const _: () = assert!(size_of::<vfio_iova_range>() == 16);
const _: () = assert!(size_of::<vfio_iommu_type1_info_cap_iova_range>() == 16);
const _: () = assert!(size_of::<vfio_iommu_type1_dma_map>() == 32);
const _: () = assert!(size_of::<vfio_iommu_type1_dma_unmap>() == 24);
const _: () = assert!(size_of::<vfio_device_info>() == 24);
const _: () = assert!(size_of::<vfio_region_info>() == 32);
const _: () = assert!(std::mem::offset_of!(vfio_iommu_type1_info, cap_offset) == 16);
const _: () = assert!(std::mem::offset_of!(vfio_region_info, size) == 16);

// ---------------------------------------------------------------------------------------------
// The ioctls. Nothing outside this module calls `ioctl(2)`.

#[cfg(not(test))]
mod ioctls {
    use std::ffi::CStr;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use super::*;
    use crate::cvt;

    pub(super) fn get_api_version(fd: BorrowedFd<'_>) -> io::Result<i32> {
        // SAFETY: VFIO_GET_API_VERSION takes no argument and touches no user memory.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_GET_API_VERSION as _) })
    }

    pub(super) fn check_extension(fd: BorrowedFd<'_>, ext: u32) -> io::Result<i32> {
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value; no user memory.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_CHECK_EXTENSION as _,
                ext as libc::c_ulong,
            )
        })
    }

    pub(super) fn set_iommu(fd: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value; no user memory.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_SET_IOMMU as _, kind as libc::c_ulong) })?;
        Ok(())
    }

    pub(super) fn group_get_status(
        fd: BorrowedFd<'_>,
        status: &mut vfio_group_status,
    ) -> io::Result<()> {
        // SAFETY: the kernel writes at most `argsz` (= its size) bytes into the live struct.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_GROUP_GET_STATUS as _,
                status as *mut vfio_group_status,
            )
        })?;
        Ok(())
    }

    pub(super) fn group_set_container(
        fd: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let cfd: libc::c_int = container.as_raw_fd();
        // SAFETY: the kernel reads one int (the container fd) from a live local.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_GROUP_SET_CONTAINER as _,
                &cfd as *const libc::c_int,
            )
        })?;
        Ok(())
    }

    pub(super) fn group_get_device_fd(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
        // SAFETY: the kernel reads a NUL-terminated string from `name`, which outlives the call.
        let dfd = cvt(unsafe {
            libc::ioctl(fd.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr())
        })?;
        // SAFETY: on success the ioctl returned a new file descriptor that nothing else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(dfd) }))
    }

    pub(super) fn device_get_info(
        fd: BorrowedFd<'_>,
        info: &mut vfio_device_info,
    ) -> io::Result<()> {
        // SAFETY: the kernel writes at most `argsz` (= its size) bytes into the live struct.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_DEVICE_GET_INFO as _,
                info as *mut vfio_device_info,
            )
        })?;
        Ok(())
    }

    pub(super) fn device_get_region_info(
        fd: BorrowedFd<'_>,
        info: &mut vfio_region_info,
    ) -> io::Result<()> {
        // SAFETY: the kernel writes at most `argsz` (= its size) bytes into the live struct.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO as _,
                info as *mut vfio_region_info,
            )
        })?;
        Ok(())
    }

    pub(super) fn device_reset(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_DEVICE_RESET as _) })?;
        Ok(())
    }

    /// `buf` starts with a `vfio_iommu_type1_info` whose `argsz` is `buf.len()`.
    pub(super) fn iommu_get_info(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
        assert!(buf.len() >= size_of::<vfio_iommu_type1_info>());
        // SAFETY: the kernel writes at most `argsz` bytes, and argsz == buf.len() (the caller
        // set it); the buffer is live and exclusively borrowed for the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_IOMMU_GET_INFO as _, buf.as_mut_ptr()) })?;
        Ok(())
    }

    pub(super) fn iommu_map_dma(
        fd: BorrowedFd<'_>,
        map: &vfio_iommu_type1_dma_map,
    ) -> io::Result<()> {
        // SAFETY: the kernel reads the live struct. The memory it names is pinned by the kernel;
        // keeping it mapped is the caller's (`Container::map_dma`'s) contract.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_IOMMU_MAP_DMA as _,
                map as *const vfio_iommu_type1_dma_map,
            )
        })?;
        Ok(())
    }

    pub(super) fn iommu_unmap_dma(
        fd: BorrowedFd<'_>,
        unmap: &mut vfio_iommu_type1_dma_unmap,
    ) -> io::Result<()> {
        // SAFETY: the kernel reads the live struct and writes back the unmapped size into it.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VFIO_IOMMU_UNMAP_DMA as _,
                unmap as *mut vfio_iommu_type1_dma_unmap,
            )
        })?;
        Ok(())
    }
}

/// The test twin of `ioctls`: same signatures, answers from [`fake::FAKE`] (per thread).
#[cfg(test)]
mod ioctls {
    use std::ffi::CStr;
    use std::fs::File;
    use std::io;
    use std::os::fd::BorrowedFd;

    use super::fake::FAKE;
    use super::*;

    fn err(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    pub(super) fn get_api_version(_fd: BorrowedFd<'_>) -> io::Result<i32> {
        Ok(FAKE.with_borrow(|f| f.api_version))
    }

    pub(super) fn check_extension(_fd: BorrowedFd<'_>, ext: u32) -> io::Result<i32> {
        Ok(FAKE.with_borrow(|f| f.extensions.contains(&ext)) as i32)
    }

    pub(super) fn set_iommu(_fd: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
        FAKE.with_borrow_mut(|f| {
            if !f.container_set || !f.extensions.contains(&kind) {
                return Err(err(libc::EINVAL));
            }
            f.iommu = Some(kind);
            Ok(())
        })
    }

    pub(super) fn group_get_status(
        _fd: BorrowedFd<'_>,
        status: &mut vfio_group_status,
    ) -> io::Result<()> {
        assert_eq!(status.argsz as usize, size_of::<vfio_group_status>());
        status.flags = FAKE.with_borrow(|f| {
            f.group_flags
                | if f.container_set {
                    VFIO_GROUP_FLAGS_CONTAINER_SET
                } else {
                    0
                }
        });
        Ok(())
    }

    pub(super) fn group_set_container(
        _fd: BorrowedFd<'_>,
        _container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        FAKE.with_borrow_mut(|f| {
            if f.group_flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
                return Err(err(libc::EPERM));
            }
            f.container_set = true;
            Ok(())
        })
    }

    pub(super) fn group_get_device_fd(_fd: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
        FAKE.with_borrow_mut(|f| {
            if name.to_str().ok() != Some(f.device_name.as_str()) {
                return Err(err(libc::ENODEV));
            }
            let path = f.device_file.clone().ok_or_else(|| err(libc::ENODEV))?;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
        })
    }

    pub(super) fn device_get_info(
        _fd: BorrowedFd<'_>,
        info: &mut vfio_device_info,
    ) -> io::Result<()> {
        assert_eq!(info.argsz as usize, size_of::<vfio_device_info>());
        FAKE.with_borrow(|f| {
            info.flags = f.device_flags;
            info.num_regions = f.regions.len() as u32;
            info.num_irqs = 5;
        });
        Ok(())
    }

    pub(super) fn device_get_region_info(
        _fd: BorrowedFd<'_>,
        info: &mut vfio_region_info,
    ) -> io::Result<()> {
        assert_eq!(info.argsz as usize, size_of::<vfio_region_info>());
        FAKE.with_borrow(|f| {
            let &(flags, size, offset) = f
                .regions
                .get(info.index as usize)
                .ok_or(err(libc::EINVAL))?;
            info.flags = flags;
            info.size = size;
            info.offset = offset;
            info.cap_offset = 0;
            Ok(())
        })
    }

    pub(super) fn device_reset(_fd: BorrowedFd<'_>) -> io::Result<()> {
        FAKE.with_borrow_mut(|f| f.resets += 1);
        Ok(())
    }

    pub(super) fn iommu_get_info(_fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
        FAKE.with_borrow_mut(|f| {
            f.get_info_calls += 1;
            if f.iommu.is_none() {
                return Err(err(libc::EINVAL));
            }
            let argsz = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert_eq!(argsz, buf.len(), "argsz must describe the buffer");
            // Build the full answer as the kernel would, then copy what fits.
            let mut full = vec![0u8; 24];
            let mut flags = VFIO_IOMMU_INFO_PGSIZES;
            let mut caps: Vec<(u16, Vec<u8>)> = Vec::new();
            if f.other_cap_first {
                // A DMA-available cap (id 3): header + u32 avail + pad.
                caps.push((3, vec![0u8; 8]));
            }
            if let Some(r) = &f.iova_ranges {
                let mut body = Vec::new();
                body.extend_from_slice(&(r.len() as u32).to_ne_bytes());
                body.extend_from_slice(&0u32.to_ne_bytes());
                for &(s, e) in r {
                    body.extend_from_slice(&s.to_ne_bytes());
                    body.extend_from_slice(&e.to_ne_bytes());
                }
                caps.push((VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, body));
            }
            let mut cap_offset = 0u32;
            if !caps.is_empty() {
                flags |= VFIO_IOMMU_INFO_CAPS;
                cap_offset = full.len() as u32;
                let n = caps.len();
                for (i, (id, body)) in caps.into_iter().enumerate() {
                    let here = full.len();
                    let next = if i + 1 == n {
                        0
                    } else {
                        (here + 8 + body.len()) as u32
                    };
                    full.extend_from_slice(&id.to_ne_bytes());
                    full.extend_from_slice(&1u16.to_ne_bytes());
                    full.extend_from_slice(&next.to_ne_bytes());
                    full.extend_from_slice(&body);
                }
            }
            let total = full.len() as u32;
            full[0..4].copy_from_slice(&total.to_ne_bytes());
            full[4..8].copy_from_slice(&flags.to_ne_bytes());
            full[8..16].copy_from_slice(&f.pgsizes.to_ne_bytes());
            if buf.len() >= full.len() {
                full[16..20].copy_from_slice(&cap_offset.to_ne_bytes());
                buf[..full.len()].copy_from_slice(&full);
            } else {
                // Too small for the caps: the kernel reports the size needed, no cap_offset.
                buf[..24].copy_from_slice(&full[..24]);
            }
            Ok(())
        })
    }

    pub(super) fn iommu_map_dma(
        _fd: BorrowedFd<'_>,
        map: &vfio_iommu_type1_dma_map,
    ) -> io::Result<()> {
        assert_eq!(map.argsz as usize, size_of::<vfio_iommu_type1_dma_map>());
        FAKE.with_borrow_mut(|f| {
            if f.iommu.is_none() {
                return Err(err(libc::EINVAL));
            }
            f.maps.push((map.vaddr, map.iova, map.size, map.flags));
            Ok(())
        })
    }

    pub(super) fn iommu_unmap_dma(
        _fd: BorrowedFd<'_>,
        unmap: &mut vfio_iommu_type1_dma_unmap,
    ) -> io::Result<()> {
        assert_eq!(
            unmap.argsz as usize,
            size_of::<vfio_iommu_type1_dma_unmap>()
        );
        FAKE.with_borrow_mut(|f| {
            let before = f.maps.len();
            f.maps.retain(|&(_, iova, size, _)| {
                !(iova >= unmap.iova && iova + size <= unmap.iova + unmap.size)
            });
            unmap.size = if f.maps.len() == before {
                0
            } else {
                unmap.size
            };
            Ok(())
        })
    }
}

#[cfg(test)]
mod fake {
    use std::cell::RefCell;
    use std::path::PathBuf;

    /// What the fake kernel answers, and what it was asked to do.
    pub(super) struct Fake {
        pub api_version: i32,
        pub extensions: Vec<u32>,
        pub iommu: Option<u32>,
        pub group_flags: u32,
        pub container_set: bool,
        pub pgsizes: u64,
        pub iova_ranges: Option<Vec<(u64, u64)>>,
        pub other_cap_first: bool,
        pub get_info_calls: u32,
        pub device_name: String,
        pub device_file: Option<PathBuf>,
        pub device_flags: u32,
        /// (flags, size, offset) per region index.
        pub regions: Vec<(u32, u64, u64)>,
        pub resets: u32,
        /// (vaddr, iova, size, flags)
        pub maps: Vec<(u64, u64, u64, u32)>,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                api_version: 0,
                extensions: vec![1, 3],
                iommu: None,
                group_flags: super::VFIO_GROUP_FLAGS_VIABLE,
                container_set: false,
                pgsizes: 0x4020_1000,
                iova_ranges: None,
                other_cap_first: false,
                get_info_calls: 0,
                device_name: "0000:00:04.0".into(),
                device_file: None,
                device_flags: super::VFIO_DEVICE_FLAGS_PCI | super::VFIO_DEVICE_FLAGS_RESET,
                regions: Vec::new(),
                resets: 0,
                maps: Vec::new(),
            }
        }
    }

    thread_local! {
        pub(super) static FAKE: RefCell<Fake> = RefCell::new(Fake::default());
    }
}

// ---------------------------------------------------------------------------------------------
// Safe types

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))
}

/// A VFIO container (`/dev/vfio/vfio`): one IOMMU address space shared by its groups.
#[derive(Debug)]
pub struct Container {
    file: File,
    /// `VFIO_TYPE1V2_IOMMU` when the kernel offers it, else `VFIO_TYPE1_IOMMU`.
    kind: u32,
}

impl Container {
    /// Open `/dev/vfio/vfio`, check the API version and that a type1 IOMMU is available.
    pub fn open() -> io::Result<Container> {
        Container::from_file(open_rw(Path::new("/dev/vfio/vfio"))?)
    }

    fn from_file(file: File) -> io::Result<Container> {
        let v = ioctls::get_api_version(file.as_fd())?;
        if v != VFIO_API_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("VFIO API version {v} (expected {VFIO_API_VERSION})"),
            ));
        }
        let kind = if ioctls::check_extension(file.as_fd(), VFIO_TYPE1V2_IOMMU)? > 0 {
            VFIO_TYPE1V2_IOMMU
        } else if ioctls::check_extension(file.as_fd(), VFIO_TYPE1_IOMMU)? > 0 {
            VFIO_TYPE1_IOMMU
        } else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "VFIO has no type1 IOMMU backend (is vfio_iommu_type1 loaded and an IOMMU enabled?)",
            ));
        };
        Ok(Container { file, kind })
    }

    /// The IOMMU model [`Container::set_iommu`] selects (`VFIO_TYPE1V2_IOMMU` or `VFIO_TYPE1_IOMMU`).
    pub fn iommu_kind(&self) -> u32 {
        self.kind
    }

    /// Select the type1 IOMMU model. Valid only once a group is attached ([`Group::attach`]).
    pub fn set_iommu(&self) -> io::Result<()> {
        ioctls::set_iommu(self.file.as_fd(), self.kind).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("VFIO_SET_IOMMU (type {}): {e}", self.kind),
            )
        })
    }

    /// `VFIO_IOMMU_GET_INFO`, growing the buffer to the size the kernel asks for when there is a
    /// capability chain. Returns the fixed part and the whole answer.
    fn get_info(&self) -> io::Result<(vfio_iommu_type1_info, Vec<u8>)> {
        let mut size = size_of::<vfio_iommu_type1_info>();
        for _ in 0..4 {
            let mut buf = vec![0u8; size];
            buf[0..4].copy_from_slice(&(size as u32).to_ne_bytes());
            ioctls::iommu_get_info(self.file.as_fd(), &mut buf)
                .map_err(|e| io::Error::new(e.kind(), format!("VFIO_IOMMU_GET_INFO: {e}")))?;
            let info = vfio_iommu_type1_info {
                argsz: rd_u32(&buf, 0).unwrap_or(0),
                flags: rd_u32(&buf, 4).unwrap_or(0),
                iova_pgsizes: rd_u64(&buf, 8).unwrap_or(0),
                cap_offset: rd_u32(&buf, 16).unwrap_or(0),
                pad: 0,
            };
            if info.argsz as usize > size {
                size = info.argsz as usize;
                continue;
            }
            return Ok((info, buf));
        }
        Err(io::Error::other(
            "VFIO_IOMMU_GET_INFO: the kernel kept asking for a larger buffer",
        ))
    }

    /// The IOVA ranges the IOMMU accepts, from the `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`
    /// capability; [`DEFAULT_IOVA_RANGE`] when the kernel does not report one.
    pub fn iova_ranges(&self) -> io::Result<Vec<RangeInclusive<u64>>> {
        let (info, buf) = self.get_info()?;
        if info.flags & VFIO_IOMMU_INFO_CAPS == 0 || info.cap_offset == 0 {
            return Ok(vec![DEFAULT_IOVA_RANGE]);
        }
        match parse_iova_cap(&buf, info.cap_offset as usize)? {
            Some(r) => Ok(r),
            None => Ok(vec![DEFAULT_IOVA_RANGE]),
        }
    }

    /// Bitmap of the IOMMU page sizes (bit n set: 2^n bytes supported).
    pub fn pgsize_bitmap(&self) -> io::Result<u64> {
        let (info, _) = self.get_info()?;
        if info.flags & VFIO_IOMMU_INFO_PGSIZES == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "VFIO_IOMMU_GET_INFO reported no page sizes",
            ));
        }
        Ok(info.iova_pgsizes)
    }

    /// Map `len` bytes at `vaddr` for device reads and writes at `iova`. The kernel pins the
    /// pages.
    ///
    /// # Safety
    /// The memory must stay mapped (and must not be reused for anything the device must not
    /// see) until [`Container::unmap_dma`] of the same range returns: the device may read or
    /// write it at any moment in between.
    pub unsafe fn map_dma(&self, vaddr: *mut u8, len: u64, iova: u64) -> io::Result<()> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "map_dma of 0 bytes",
            ));
        }
        let map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len,
        };
        ioctls::iommu_map_dma(self.file.as_fd(), &map).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("VFIO_IOMMU_MAP_DMA {vaddr:p}+{len:#x} at iova {iova:#x}: {e}"),
            )
        })
    }

    /// Remove the mapping(s) covering exactly `iova..iova+len`.
    pub fn unmap_dma(&self, iova: u64, len: u64) -> io::Result<()> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len,
        };
        ioctls::iommu_unmap_dma(self.file.as_fd(), &mut unmap).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("VFIO_IOMMU_UNMAP_DMA iova {iova:#x}+{len:#x}: {e}"),
            )
        })?;
        if unmap.size != len {
            return Err(io::Error::other(format!(
                "VFIO_IOMMU_UNMAP_DMA iova {iova:#x}+{len:#x}: kernel unmapped {:#x} bytes",
                unmap.size
            )));
        }
        Ok(())
    }
}

fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Walk the capability chain starting at `off` and return the IOVA ranges if the chain has
/// them. Every offset is bounds-checked and the walk is bounded (the buffer is kernel data, but
/// a corrupt chain must not loop or read out of bounds).
fn parse_iova_cap(buf: &[u8], mut off: usize) -> io::Result<Option<Vec<RangeInclusive<u64>>>> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("VFIO_IOMMU_GET_INFO: {what}"),
        )
    };
    for _ in 0..64 {
        let id = rd_u16(buf, off).ok_or_else(|| bad("capability header out of bounds"))?;
        let next = rd_u32(buf, off + 4).ok_or_else(|| bad("capability header out of bounds"))?;
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = rd_u32(buf, off + 8).ok_or_else(|| bad("IOVA capability truncated"))? as usize;
            let base = off + size_of::<vfio_iommu_type1_info_cap_iova_range>();
            let mut v = Vec::with_capacity(n.min(64));
            for i in 0..n {
                let at = base + i * size_of::<vfio_iova_range>();
                let (Some(s), Some(e)) = (rd_u64(buf, at), rd_u64(buf, at + 8)) else {
                    return Err(bad("IOVA range list truncated"));
                };
                if s > e {
                    return Err(bad("IOVA range with start above end"));
                }
                v.push(s..=e);
            }
            return Ok(Some(v));
        }
        if next == 0 {
            return Ok(None);
        }
        off = next as usize;
    }
    Err(bad("capability chain too long (loop?)"))
}

/// A VFIO group (`/dev/vfio/<id>`): the unit of isolation; all its devices go to one container.
#[derive(Debug)]
pub struct Group {
    id: u32,
    file: File,
}

impl Group {
    /// Open `/dev/vfio/<id>` and check that it is viable (every device in the IOMMU group bound
    /// to vfio-pci or no driver). If not, the error names the devices to unbind.
    pub fn open(id: u32) -> io::Result<Group> {
        let file = open_rw(&PathBuf::from(format!("/dev/vfio/{id}")))?;
        Group::from_file(id, file, Path::new("/sys"))
    }

    fn from_file(id: u32, file: File, sysfs_root: &Path) -> io::Result<Group> {
        let mut st = vfio_group_status {
            argsz: size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        ioctls::group_get_status(file.as_fd(), &mut st).map_err(|e| {
            io::Error::new(e.kind(), format!("VFIO_GROUP_GET_STATUS group {id}: {e}"))
        })?;
        if st.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            let blockers: Vec<String> = crate::pci::group_members(sysfs_root, id)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| !m.dma_safe())
                .map(|m| {
                    format!(
                        "{} (bound to {})",
                        m.name,
                        m.driver.as_deref().unwrap_or("?")
                    )
                })
                .collect();
            let who = if blockers.is_empty() {
                "some of its devices are bound to non-VFIO drivers".to_string()
            } else {
                format!("unbind {} or bind them to vfio-pci", blockers.join(", "))
            };
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("VFIO group {id} is not viable: {who}"),
            ));
        }
        Ok(Group { id, file })
    }

    /// The IOMMU group number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Attach the group to `c` (`VFIO_GROUP_SET_CONTAINER`). Call [`Container::set_iommu`] after
    /// the first group is attached.
    pub fn attach(&self, c: &Container) -> io::Result<()> {
        ioctls::group_set_container(self.file.as_fd(), c.file.as_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("VFIO_GROUP_SET_CONTAINER group {}: {e}", self.id),
            )
        })
    }

    /// Get the device `pci_addr` (`0000:00:04.0`) of this group (`VFIO_GROUP_GET_DEVICE_FD`).
    /// The group must be attached to a container with its IOMMU set.
    pub fn device(&self, pci_addr: &str) -> io::Result<Device> {
        let name = CString::new(pci_addr)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "PCI address contains NUL"))?;
        let file = ioctls::group_get_device_fd(self.file.as_fd(), &name).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "VFIO_GROUP_GET_DEVICE_FD {pci_addr} in group {}: {e}",
                    self.id
                ),
            )
        })?;
        let mut di = vfio_device_info {
            argsz: size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        ioctls::device_get_info(file.as_fd(), &mut di).map_err(|e| {
            io::Error::new(e.kind(), format!("VFIO_DEVICE_GET_INFO {pci_addr}: {e}"))
        })?;
        Ok(Device {
            name: pci_addr.to_string(),
            file,
            info: DeviceInfo {
                flags: di.flags,
                num_regions: di.num_regions,
                num_irqs: di.num_irqs,
            },
        })
    }
}

/// `VFIO_DEVICE_GET_INFO` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// The device supports `VFIO_DEVICE_RESET`.
    pub fn can_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }
}

/// `VFIO_DEVICE_GET_REGION_INFO` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device file (for pread/pwrite/mmap).
    pub offset: u64,
}

impl RegionInfo {
    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }
    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }
    pub fn mmappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// A VFIO device file descriptor.
#[derive(Debug)]
pub struct Device {
    name: String,
    file: File,
    info: DeviceInfo,
}

impl Device {
    /// Flags and region/IRQ counts, read when the device was opened.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The PCI address the device was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Region `index` (BARs 0..=5, config space 7).
    pub fn region(&self, index: u32) -> io::Result<RegionInfo> {
        if index >= self.info.num_regions {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: region {index} does not exist ({} regions)",
                    self.name, self.info.num_regions
                ),
            ));
        }
        let mut ri = vfio_region_info {
            argsz: size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        ioctls::device_get_region_info(self.file.as_fd(), &mut ri).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "VFIO_DEVICE_GET_REGION_INFO {} region {index}: {e}",
                    self.name
                ),
            )
        })?;
        Ok(RegionInfo {
            index,
            flags: ri.flags,
            size: ri.size,
            offset: ri.offset,
        })
    }

    /// mmap region `index` (a BAR) read/write and shared.
    pub fn map_region(&self, index: u32) -> io::Result<MmioRegion> {
        let r = self.region(index)?;
        if !r.mmappable() || r.size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: region {index} cannot be mmapped (flags {:#x}, size {:#x})",
                    self.name, r.flags, r.size
                ),
            ));
        }
        let len = usize::try_from(r.size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "region larger than the address space",
            )
        })?;
        MmioRegion::map(self.file.as_fd(), len, r.offset).map_err(|e| {
            io::Error::new(e.kind(), format!("mmap {} region {index}: {e}", self.name))
        })
    }

    fn config_range(&self, offset: u64, len: usize) -> io::Result<u64> {
        let r = self.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= r.size => Ok(r.offset + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: config access {offset:#x}+{len} beyond config space ({:#x} bytes)",
                    self.name, r.size
                ),
            )),
        }
    }

    /// Read PCI configuration space at `offset`.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = self.config_range(offset, buf.len())?;
        self.file.read_exact_at(buf, at)
    }

    /// Write PCI configuration space at `offset`.
    pub fn write_config(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let at = self.config_range(offset, buf.len())?;
        self.file.write_all_at(buf, at)
    }

    /// Enable memory decoding and bus mastering in the Command register, and disable INTx
    /// (rio polls completion queues).
    pub fn enable_bus_master(&self) -> io::Result<()> {
        let mut b = [0u8; 2];
        self.read_config(PCI_COMMAND, &mut b)?;
        let cmd = u16::from_le_bytes(b)
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_INTX_DISABLE;
        self.write_config(PCI_COMMAND, &cmd.to_le_bytes())
    }

    /// Function-level (or other) reset, if the device supports one.
    pub fn reset(&self) -> io::Result<()> {
        if !self.info.can_reset() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: device does not support VFIO_DEVICE_RESET", self.name),
            ));
        }
        ioctls::device_reset(self.file.as_fd())
            .map_err(|e| io::Error::new(e.kind(), format!("VFIO_DEVICE_RESET {}: {e}", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FAKE, Fake};
    use super::*;
    use crate::testutil::TempDir;

    fn devnull() -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
    }

    fn container() -> Container {
        Container::from_file(devnull()).unwrap()
    }

    fn reset(f: Fake) {
        FAKE.set(f);
    }

    #[test]
    fn ioctl_numbers() {
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
    }

    #[test]
    fn container_prefers_type1v2_and_checks_version() {
        reset(Fake::default());
        assert_eq!(container().iommu_kind(), VFIO_TYPE1V2_IOMMU);
        reset(Fake {
            extensions: vec![VFIO_TYPE1_IOMMU],
            ..Fake::default()
        });
        assert_eq!(container().iommu_kind(), VFIO_TYPE1_IOMMU);
        reset(Fake {
            extensions: vec![],
            ..Fake::default()
        });
        let e = Container::from_file(devnull()).unwrap_err();
        assert!(e.to_string().contains("no type1"), "{e}");
        reset(Fake {
            api_version: 1,
            ..Fake::default()
        });
        let e = Container::from_file(devnull()).unwrap_err();
        assert!(e.to_string().contains("API version 1"), "{e}");
    }

    #[test]
    fn set_iommu_needs_a_group() {
        reset(Fake::default());
        let c = container();
        assert!(c.set_iommu().is_err());
        let g = Group::from_file(7, devnull(), Path::new("/nonexistent")).unwrap();
        g.attach(&c).unwrap();
        c.set_iommu().unwrap();
        assert_eq!(FAKE.with_borrow(|f| f.iommu), Some(VFIO_TYPE1V2_IOMMU));
    }

    fn attached() -> Container {
        let c = container();
        Group::from_file(7, devnull(), Path::new("/nonexistent"))
            .unwrap()
            .attach(&c)
            .unwrap();
        c.set_iommu().unwrap();
        c
    }

    #[test]
    fn iova_ranges_from_cap_chain_after_argsz_retry() {
        reset(Fake {
            iova_ranges: Some(vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)]),
            other_cap_first: true,
            ..Fake::default()
        });
        let c = attached();
        let r = c.iova_ranges().unwrap();
        assert_eq!(r, vec![0..=0xfedf_ffff, 0xfef0_0000..=(1u64 << 48) - 1]);
        // First call with the bare struct, second with the size the kernel asked for.
        assert_eq!(FAKE.with_borrow(|f| f.get_info_calls), 2);
        assert_eq!(c.pgsize_bitmap().unwrap(), 0x4020_1000);
    }

    #[test]
    fn iova_ranges_default_without_cap() {
        reset(Fake::default());
        let c = attached();
        assert_eq!(c.iova_ranges().unwrap(), vec![DEFAULT_IOVA_RANGE]);
        assert_eq!(*DEFAULT_IOVA_RANGE.end(), 0x7f_ffff_ffff);
    }

    #[test]
    fn corrupt_cap_chains_are_errors() {
        // Header points past the end.
        assert!(parse_iova_cap(&[0u8; 24], 40).is_err());
        // A chain that loops on itself.
        let mut b = vec![0u8; 32];
        b[24..26].copy_from_slice(&9u16.to_ne_bytes());
        b[28..32].copy_from_slice(&24u32.to_ne_bytes());
        assert!(
            parse_iova_cap(&b, 24)
                .unwrap_err()
                .to_string()
                .contains("loop")
        );
        // IOVA cap claiming more ranges than present.
        let mut b = vec![0u8; 24 + 16 + 16];
        b[24..26].copy_from_slice(&1u16.to_ne_bytes());
        b[32..36].copy_from_slice(&2u32.to_ne_bytes());
        assert!(
            parse_iova_cap(&b, 24)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }

    #[test]
    fn map_and_unmap_dma() {
        reset(Fake::default());
        let c = attached();
        let mut page = vec![0u8; 4096];
        // SAFETY: the fake kernel never touches the memory.
        unsafe { c.map_dma(page.as_mut_ptr(), 4096, 0x10_0000) }.unwrap();
        let m = FAKE.with_borrow(|f| f.maps.clone());
        assert_eq!(m, vec![(page.as_ptr() as u64, 0x10_0000, 4096, 3)]);
        c.unmap_dma(0x10_0000, 4096).unwrap();
        // Nothing mapped there any more: the kernel reports 0 bytes unmapped.
        assert!(c.unmap_dma(0x10_0000, 4096).is_err());
        // SAFETY: as above; a zero length is refused before the ioctl.
        assert!(unsafe { c.map_dma(page.as_mut_ptr(), 0, 0) }.is_err());
    }

    #[test]
    fn non_viable_group_names_the_devices_to_unbind() {
        let t = TempDir::new();
        let g = t.path().join("kernel/iommu_groups/12/devices");
        std::fs::create_dir_all(&g).unwrap();
        let drivers = t.path().join("bus/pci/drivers");
        for d in ["nvme", "vfio-pci", "pcieport"] {
            std::fs::create_dir_all(drivers.join(d)).unwrap();
        }
        for (dev, drv) in [
            ("0000:01:00.0", Some("vfio-pci")),
            ("0000:01:00.1", Some("nvme")),
            ("0000:00:1c.0", Some("pcieport")),
            ("0000:01:00.2", None),
        ] {
            let d = t.path().join("bus/pci/devices").join(dev);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), "0x010802\n").unwrap();
            if let Some(drv) = drv {
                std::os::unix::fs::symlink(drivers.join(drv), d.join("driver")).unwrap();
            }
            std::os::unix::fs::symlink(&d, g.join(dev)).unwrap();
        }
        reset(Fake {
            group_flags: 0,
            ..Fake::default()
        });
        let e = Group::from_file(12, devnull(), t.path()).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("group 12 is not viable"), "{s}");
        assert!(s.contains("0000:01:00.1 (bound to nvme)"), "{s}");
        assert!(
            !s.contains("01:00.0") && !s.contains("1c.0") && !s.contains("01:00.2"),
            "{s}"
        );
    }

    fn fake_device(t: &TempDir) -> Device {
        // BAR0 at 0 (16 KiB, mmap-able), config space at 64 KiB (256 bytes, no mmap).
        let path = t.path().join("device");
        let f = File::create(&path).unwrap();
        f.set_len(0x10000 + 256).unwrap();
        f.write_all_at(&0x0010u16.to_le_bytes(), 0x10000 + 4)
            .unwrap();
        let mut regions = vec![(0u32, 0u64, 0u64); 9];
        regions[0] = (7, 0x4000, 0);
        regions[7] = (3, 256, 0x10000);
        reset(Fake {
            device_file: Some(path),
            regions,
            ..Fake::default()
        });
        let g = Group::from_file(7, devnull(), Path::new("/nonexistent")).unwrap();
        assert!(g.device("0000:00:05.0").is_err());
        g.device("0000:00:04.0").unwrap()
    }

    #[test]
    fn device_regions_config_and_bus_master() {
        let t = TempDir::new();
        let d = fake_device(&t);
        assert_eq!(d.info().num_regions, 9);
        let r = d.region(7).unwrap();
        assert!(r.readable() && r.writable() && !r.mmappable());
        assert!(d.region(9).is_err());
        assert!(d.map_region(7).is_err(), "config space is not mmap-able");

        d.enable_bus_master().unwrap();
        let mut b = [0u8; 2];
        d.read_config(4, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0x0416);
        assert!(d.read_config(255, &mut b).is_err(), "past config space");
        assert!(d.write_config(u64::MAX, &b).is_err());

        d.reset().unwrap();
        assert_eq!(FAKE.with_borrow(|f| f.resets), 1);
    }

    #[test]
    fn bar_mapping_is_volatile_and_bounded() {
        let t = TempDir::new();
        let d = fake_device(&t);
        let bar = d.map_region(0).unwrap();
        assert_eq!(bar.len(), 0x4000);
        bar.write32(0x1000, 0xdead_beef);
        assert_eq!(bar.read32(0x1000), 0xdead_beef);
        bar.write64(0x8, 0x1122_3344_5566_7788);
        assert_eq!(bar.read64(0x8), 0x1122_3344_5566_7788);
        drop(bar);
        // The shared mapping wrote through to the file.
        let mut b = [0u8; 4];
        File::open(t.path().join("device"))
            .unwrap()
            .read_exact_at(&mut b, 0x1000)
            .unwrap();
        assert_eq!(u32::from_ne_bytes(b), 0xdead_beef);
        let bar = d.map_region(0).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bar.read32(0x4000)));
        assert!(r.is_err(), "out-of-bounds MMIO must not happen");
    }

    #[test]
    fn reset_unsupported_is_an_error() {
        let t = TempDir::new();
        let d = fake_device(&t);
        let d = Device {
            info: DeviceInfo {
                flags: VFIO_DEVICE_FLAGS_PCI,
                ..d.info
            },
            ..d
        };
        assert_eq!(d.reset().unwrap_err().kind(), io::ErrorKind::Unsupported);
    }
}
