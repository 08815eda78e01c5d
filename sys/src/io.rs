//! Positional I/O on raw memory, for the thread-pool backend, and `fallocate`/`fdatasync`.
//!
//! The engine's buffers are handed to worker threads as raw pointers while the queue keeps
//! ownership of the buffer object; these wrappers are the only place that dereferences them.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::cvt;

/// `pread(2)` into `len` bytes at `buf`. Returns bytes read (short on end of file).
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes and not accessed by anyone else until the call
/// returns.
pub unsafe fn pread_raw(
    fd: BorrowedFd<'_>,
    buf: *mut u8,
    len: usize,
    offset: u64,
) -> std::io::Result<usize> {
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes of writes and unaliased.
    let n = unsafe { libc::pread64(fd.as_raw_fd(), buf.cast(), len, offset as libc::off64_t) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `pwrite(2)` of `len` bytes at `buf`. Returns bytes written.
///
/// # Safety
/// `buf` must be valid for reads of `len` bytes and not written by anyone until the call returns.
pub unsafe fn pwrite_raw(
    fd: BorrowedFd<'_>,
    buf: *const u8,
    len: usize,
    offset: u64,
) -> std::io::Result<usize> {
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes of reads.
    let n = unsafe { libc::pwrite64(fd.as_raw_fd(), buf.cast(), len, offset as libc::off64_t) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `fdatasync(2)`.
pub fn fdatasync(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: no memory is passed; an invalid fd yields EBADF.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) })?;
    Ok(())
}

/// `fallocate(2)` with `mode` (e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: no memory is passed; bad arguments yield an errno.
    cvt(unsafe {
        libc::fallocate64(
            fd.as_raw_fd(),
            mode,
            offset as libc::off64_t,
            len as libc::off64_t,
        )
    })?;
    Ok(())
}

/// `fcntl(F_GETFL)`: the file status flags and access mode of an open file.
pub fn fcntl_getfl(fd: BorrowedFd<'_>) -> std::io::Result<i32> {
    // SAFETY: F_GETFL takes no argument and passes no memory; an invalid fd yields EBADF.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// The size in bytes of an open file (`fstat(2)`'s `st_size`).
pub fn file_size(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live out-parameter of the right type.
    cvt(unsafe { libc::fstat64(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_size as u64)
}

/// A new non-blocking, close-on-exec `eventfd(2)` counter starting at 0.
pub fn eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: no memory is passed.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just created by eventfd and is owned by no one else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Add 1 to an eventfd counter (wakes whoever waits to read it). A full counter (EAGAIN) is
/// not an error: the reader has a wake-up pending anyway.
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let one: u64 = 1;
    // SAFETY: `one` is 8 readable bytes, alive for the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
    Ok(())
}

/// `preadv2(2)` of `len` bytes at `buf` with `RWF_NOWAIT`: only what the page cache holds now,
/// never waiting for the device. `Err(EAGAIN)` when nothing could be read without waiting;
/// a short count when only part was cached (or at the end of the file).
///
/// # Safety
/// As for [`pread_raw`].
pub unsafe fn pread_nowait_raw(
    fd: BorrowedFd<'_>,
    buf: *mut u8,
    len: usize,
    offset: u64,
) -> std::io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    };
    // SAFETY: one iovec over memory the caller guarantees valid for `len` bytes of writes.
    let n = unsafe {
        libc::preadv2(
            fd.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `cachestat(2)`'s syscall number (the same on every architecture; Linux 6.5+).
const SYS_CACHESTAT: libc::c_long = 451;

/// How many of the pages covering `[offset, offset + len)` of `fd` the page cache holds now
/// (`cachestat(2)`: a look, with no side effect; unlike a `RWF_NOWAIT` read, a miss starts no
/// read-ahead). `Err(ENOSYS)` before Linux 6.5.
pub fn cached_pages(fd: BorrowedFd<'_>, offset: u64, len: u64) -> std::io::Result<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off: offset, len };
    let mut st = Stat::default();
    // SAFETY: both structs are live, of the kernel's layout (struct cachestat_range and
    // struct cachestat), and outlive the call; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(st.nr_cache)
    }
}
