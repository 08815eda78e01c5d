//! `statx(2)` for direct-I/O alignment (`STATX_DIOALIGN`, Linux 6.1+).

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::cvt;

/// Direct-I/O alignment requirements reported by the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DioAlign {
    /// Required alignment of user memory, in bytes (0: not reported / O_DIRECT unsupported).
    pub mem_align: u32,
    /// Required alignment of file offsets and lengths, in bytes (0: not reported).
    pub offset_align: u32,
}

/// Query `STATX_DIOALIGN` for an open file. Returns zeros when the kernel or file system does
/// not report it (older kernels, or file systems without O_DIRECT support).
pub fn dio_align(fd: BorrowedFd<'_>) -> std::io::Result<DioAlign> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid NUL-terminated string, `stx` a live out-parameter; with
    // AT_EMPTY_PATH the call describes `fd` itself.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    })?;
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(DioAlign::default());
    }
    Ok(DioAlign {
        mem_align: stx.stx_dio_mem_align,
        offset_align: stx.stx_dio_offset_align,
    })
}
