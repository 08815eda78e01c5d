//! Extended attributes on open files (`fgetxattr(2)`, `fsetxattr(2)`): the marker rio puts on
//! the files it lays out, so a later run knows them from a user's data.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The value of attribute `name` of `fd`, at most `max` bytes; `Ok(None)` when the file has
/// no such attribute or its file system keeps no extended attributes.
pub fn get(fd: BorrowedFd<'_>, name: &CStr, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    // SAFETY: `name` is NUL-terminated; `buf` is live and writable for `buf.len()` bytes.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// Sets attribute `name` of `fd` to `value` (created or replaced).
pub fn set(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; `value` is live and readable for its length.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    crate::cvt(r).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn set_then_get_and_absent() {
        let dir = crate::testutil::TempDir::new();
        let p = dir.path().join("f");
        let f = std::fs::File::create(&p).unwrap();
        let name = c"user.rio.test";
        assert_eq!(get(f.as_fd(), name, 64).unwrap(), None);
        match set(f.as_fd(), name, b"v1") {
            Ok(()) => assert_eq!(
                get(f.as_fd(), name, 64).unwrap().as_deref(),
                Some(&b"v1"[..])
            ),
            // A file system without user xattrs (old tmpfs): nothing to check here.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => panic!("fsetxattr: {e}"),
        }
    }
}
