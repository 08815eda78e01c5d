//! Helpers shared by the bench binaries.

/// Undo an earlier bench's pinning of this thread: allow every online CPU again. Threads
/// inherit their creator's CPU set, so a model or poller thread spawned from a pinned thread
/// would otherwise share its one CPU. Returns the online CPUs.
pub fn unpin_current() -> Vec<usize> {
    // SAFETY: sysconf has no memory effects; cpu_set_t is plain data, initialised by CPU_ZERO
    // and CPU_SET within its size; sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let n = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for c in 0..n {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        (0..n).collect()
    }
}
