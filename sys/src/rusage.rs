//! CPU time: the whole process's, as `getrusage(RUSAGE_SELF)` reports it, and each thread's.

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

/// Time one thread of this process has spent on a CPU, by the scheduler's own account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadCpu {
    pub tid: i32,
    /// The thread's name as the kernel keeps it (`comm`: at most 15 bytes).
    pub name: String,
    /// Nanoseconds on a CPU, user and system together (`/proc/self/task/<tid>/schedstat`'s
    /// first field: the scheduler's sum of run time, exact to the nanosecond, where
    /// `getrusage` and `stat` count in ticks).
    pub on_cpu_ns: u64,
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`: exact, any kernel).
pub fn thread_cpu_now() -> Duration {
    // SAFETY: timespec is plain old data; all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a live out-parameter and the clock id is valid; it cannot fail then.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of every live thread of this process. Threads that exit while the directory is
/// read are left out; `None` when the kernel keeps no per-thread `schedstat` (built without
/// `CONFIG_SCHED_INFO`, or a kernel that shows zeros there unless schedstats are on) or
/// `/proc` is not mounted.
pub fn threads_cpu() -> Option<Vec<ThreadCpu>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(sched) = std::fs::read_to_string(dir.join("schedstat")) else {
            if !dir.exists() {
                continue; // the thread exited meanwhile
            }
            return None;
        };
        let on_cpu_ns = parse_schedstat(&sched)?;
        let name = std::fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_string())
            .unwrap_or_default();
        out.push(ThreadCpu {
            tid,
            name,
            on_cpu_ns,
        });
    }
    // Every thread at zero: the kernel keeps no count (a running thread's own count may
    // still be zero: the scheduler adds a slice when it ends, so this thread is not the test).
    if out.iter().all(|t| t.on_cpu_ns == 0) {
        return None;
    }
    Some(out)
}

/// The first field of a `schedstat` line ("<on cpu ns> <waiting ns> <timeslices>").
fn parse_schedstat(s: &str) -> Option<u64> {
    s.split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_first_field() {
        assert_eq!(parse_schedstat("221750 2108237 2\n"), Some(221_750));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn a_named_thread_that_spins_is_seen_with_its_time() {
        let Some(before) = threads_cpu() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: /proc/self/task/*/schedstat is missing (kernel without CONFIG_SCHED_INFO?)"
            );
            eprintln!("skipped: this kernel offers no /proc/self/task/*/schedstat");
            return;
        };
        assert!(!before.is_empty(), "this thread at least is listed");
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::Builder::new()
            .name("rio-cpu-probe".into())
            .spawn(move || {
                // Work the thread certainly did (not time it was given): a CPU-time clock
                // read by the thread itself, advanced past 20 ms.
                let start = thread_cpu_now();
                while thread_cpu_now() - start < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                tx.send((tid, thread_cpu_now())).unwrap();
                done_rx.recv().unwrap();
            })
            .unwrap();
        let (tid, own) = rx.recv().unwrap();
        // The scheduler adds a running thread's time when it stops running: read once the
        // probe sleeps on the channel (a state, waited for; the bound only ends a hang).
        let stat = format!("/proc/self/task/{tid}/stat");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let s = std::fs::read_to_string(&stat).unwrap();
            let state = s
                .rsplit(')')
                .next()
                .unwrap()
                .split_ascii_whitespace()
                .next();
            if state == Some("S") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "probe never slept: {s}"
            );
            std::thread::yield_now();
        }
        let after = threads_cpu().expect("schedstat was readable a moment ago");
        done_tx.send(()).unwrap();
        h.join().unwrap();
        let probe = after
            .iter()
            .find(|t| t.name == "rio-cpu-probe")
            .expect("the probe thread is listed by its name");
        // The scheduler's count includes at least what the thread measured of itself.
        assert!(
            probe.on_cpu_ns >= 20_000_000,
            "probe thread: {} ns on CPU by schedstat, {own:?} by its own clock",
            probe.on_cpu_ns
        );
    }
}
