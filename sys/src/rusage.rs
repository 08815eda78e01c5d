//! Process CPU time, as `getrusage(RUSAGE_SELF)` reports it.

use std::time::Duration;

/// User and system CPU time consumed by the whole process so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: Duration,
    pub system: Duration,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// CPU times of the calling process (all threads).
pub fn process_cpu() -> CpuTimes {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live out-parameter; RUSAGE_SELF cannot fail with a valid pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return CpuTimes::default();
    }
    CpuTimes {
        user: tv(ru.ru_utime),
        system: tv(ru.ru_stime),
    }
}
