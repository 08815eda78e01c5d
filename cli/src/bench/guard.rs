//! Writes never destroy data the user did not offer.
//!
//! A block device or a `pcie://` controller is written only with `--force` (checked where the
//! target is chosen). A regular file that already exists is written (a write workload, or the
//! layout a `--verify` read needs) only when rio laid it out itself, which it records in an
//! extended attribute ([`MARKER`]) on every file it creates, or with `--force`; and with
//! `--force` only, whoever runs rio (root too), when its permission bits deny writing. Both are
//! decided before anything is written.
//!
//! On a file system without user extended attributes a created file cannot be marked: a later
//! write run on it then needs `--force` (the safe side).

use std::ffi::CStr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The extended attribute rio sets on the files it creates and lays out.
pub const MARKER: &CStr = c"user.rio.layout";
/// Its value.
pub const MARKER_VALUE: &[u8] = b"rio-bench/1";

/// Why a write run must not touch the existing regular file at `path` without `--force`, as
/// one line naming `--force`; `None` when it may (rio's marker is on it and its permission
/// bits allow writing), or when `path` is not a regular file (other rules apply there).
pub fn write_refusal(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mode = meta.mode() & 0o7777;
    if !mode_allows_write(mode, meta.uid(), meta.gid()) {
        return Some(format!(
            "{}: its permission bits (mode {mode:04o}) deny writing; pass --force to write it anyway",
            path.display()
        ));
    }
    if !is_marked(path) {
        return Some(format!(
            "{}: an existing file rio did not lay out; this run writes it and destroys its contents; pass --force to allow it",
            path.display()
        ));
    }
    None
}

/// Whether rio's marker is on the file at `path`.
pub fn is_marked(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    matches!(
        rio_sys::xattr::get(f.as_fd(), MARKER, 64),
        Ok(Some(v)) if v == MARKER_VALUE
    )
}

/// Marks the file at `path` as laid out by rio.
pub fn mark(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    rio_sys::xattr::set(f.as_fd(), MARKER, MARKER_VALUE)
}

/// Whether the permission bits let the calling user write a file of `mode` owned by
/// `uid:gid`. Root is judged by the bits too (any write bit set): the kernel would let it
/// write anything, and a file whose every write bit is off says "do not write me".
fn mode_allows_write(mode: u32, uid: u32, gid: u32) -> bool {
    // SAFETY: geteuid, getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 {
        return mode & 0o222 != 0;
    }
    if euid == uid {
        return mode & 0o200 != 0;
    }
    if egid == gid || in_groups(gid) {
        return mode & 0o020 != 0;
    }
    mode & 0o002 != 0
}

fn in_groups(gid: u32) -> bool {
    // SAFETY: with size 0 getgroups only returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n <= 0 {
        return false;
    }
    let mut g = vec![0 as libc::gid_t; n as usize];
    // SAFETY: `g` has room for `n` entries.
    let n = unsafe { libc::getgroups(n, g.as_mut_ptr()) };
    n > 0 && g[..n as usize].contains(&gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_judged_by_the_bits() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        assert!(!mode_allows_write(0o444, 1000, 1000));
        assert!(!mode_allows_write(0o500, 0, 0));
        assert!(mode_allows_write(0o644, 1000, 1000));
        assert!(mode_allows_write(0o464, 1000, 1000));
        assert!(mode_allows_write(0o446, 1000, 1000));
    }

    #[test]
    fn refusals_name_force_and_marked_files_pass() {
        let d = std::env::temp_dir().join(format!("rio-guard-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f");
        std::fs::write(&p, b"user data").unwrap();
        let why = write_refusal(&p).expect("an unmarked file is refused");
        assert!(
            why.contains("--force") && why.contains("did not lay out"),
            "{why}"
        );
        if mark(&p).is_ok() {
            assert!(is_marked(&p));
            assert_eq!(write_refusal(&p), None);
            // Read-only by its bits: refused even though rio laid it out.
            let mut perm = std::fs::metadata(&p).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
            std::fs::set_permissions(&p, perm).unwrap();
            let why = write_refusal(&p).expect("mode 0444 is refused");
            assert!(
                why.contains("mode 0444") && why.contains("--force"),
                "{why}"
            );
        }
        // Not a regular file: other rules.
        assert_eq!(write_refusal(&d), None);
        assert_eq!(write_refusal(&d.join("missing")), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
