//! Raw Linux interfaces for rio.
//!
//! Every `unsafe` call into the kernel that no well-kept crate wraps lives here, each with a
//! `// SAFETY:` argument. The functions above this crate are safe except where the kernel will
//! later read or write user memory through a raw pointer: those are `unsafe fn` and their
//! `# Safety` section says what the caller must keep alive.
//!
//! Later layers add VFIO ioctls, PCI sysfs, pagemap and SPDK bindings here.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod blk;
pub mod hugepages;
pub mod io;
pub mod mem;
pub mod mmio;
pub mod pagemap;
pub mod pci;
pub mod rusage;
pub mod stat;
pub mod vfio;
pub mod xattr;

#[cfg(test)]
mod testutil;

use std::io::Error;

/// Turn a libc return value into an `io::Result`, reading `errno` on -1.
pub(crate) fn cvt(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret == -1 {
        Err(Error::last_os_error())
    } else {
        Ok(ret)
    }
}
