//! Block-device ioctls (`<linux/fs.h>`): geometry, discard and zero-out.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::cvt;

/// `_IOR(0x12, 114, size_t)`: device size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: logical sector size.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `_IO(0x12, 123)`: physical sector size.
const BLKPBSZGET: libc::c_ulong = 0x127b;
/// `_IO(0x12, 119)`: discard a byte range (`u64[2]` = offset, length).
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range (`u64[2]` = offset, length).
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Size of the block device in bytes.
pub fn size_bytes(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical block size: the unit of offsets and lengths for direct I/O.
pub fn logical_block_size(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET as _, &mut v as *mut libc::c_int) })?;
    Ok(v as u32)
}

/// Physical block size (the device's atomic write unit, usually).
pub fn physical_block_size(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKPBSZGET as _, &mut v as *mut libc::c_uint) })?;
    Ok(v)
}

/// Discard (trim) `len` bytes at `offset`. Synchronous.
pub fn discard(fd: BorrowedFd<'_>, offset: u64, len: u64) -> std::io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, a live local array.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) })?;
    Ok(())
}

/// Zero `len` bytes at `offset` (the device may use Write Zeroes). Synchronous.
pub fn zeroout(fd: BorrowedFd<'_>, offset: u64, len: u64) -> std::io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 from the pointer, a live local array.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) })?;
    Ok(())
}
