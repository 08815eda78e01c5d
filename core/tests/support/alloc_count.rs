//! A global allocator that counts heap allocations on the threads an I/O runs on, for the
//! tests that check rio allocates nothing per I/O (`runtime.rs`, `run_to_completion.rs`).
//! A test file installs it with `#[global_allocator]` and serializes its counting tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// Counts allocations while `COUNTING` is set, on the threads an I/O can run on: the one that
/// armed the counter (`arm`) and rio's own (named `rio-...`: pollers, the model). The test
/// harness's threads are left out: on a loaded host its main thread, a test thread that has
/// just finished (sending its result) or one just started (waiting for `SERIAL`) can get the
/// CPU during another test's count and allocate for the harness.
pub struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// The thread that armed the counter.
static ARMED: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// This thread's name starts with `rio-`: 0 not known yet, 1 yes, 2 no. (A `const` cell
    /// without a destructor: reading it never allocates.)
    static RIO: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

fn tid() -> i32 {
    // SAFETY: a plain system call without arguments.
    unsafe { libc::gettid() }
}

/// This thread is one of rio's (its name read with `prctl`, which needs no allocation).
fn rio_thread() -> bool {
    RIO.try_with(|r| {
        if r.get() == 0 {
            let mut name = [0u8; 16];
            // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `name`.
            let ok = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0;
            r.set(if ok && name.starts_with(b"rio-") {
                1
            } else {
                2
            });
        }
        r.get() == 1
    })
    .unwrap_or(false)
}

fn counted() -> bool {
    COUNTING.load(Ordering::Relaxed) && (rio_thread() || tid() == ARMED.load(Ordering::Relaxed))
}

/// Starts counting on this thread and rio's, from zero.
pub fn arm() {
    ALLOCS.store(0, Ordering::SeqCst);
    ARMED.store(tid(), Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
}

/// The first allocations counted: the allocating thread's id and the size, so that a failure
/// says where they came from (`allocations_seen`).
static SEEN: [(AtomicI32, AtomicUsize); 8] =
    [const { (AtomicI32::new(0), AtomicUsize::new(0)) }; 8];

fn count(l: Layout) {
    let i = ALLOCS.fetch_add(1, Ordering::Relaxed) as usize;
    if let Some((tid, size)) = SEEN.get(i) {
        tid.store(self::tid(), Ordering::Relaxed);
        size.store(l.size(), Ordering::Relaxed);
    }
}

/// The allocations counted since the last reset, by thread (its name from /proc while it
/// lives) and size: what a failing count prints.
pub fn allocations_seen() -> String {
    let n = (ALLOCS.load(Ordering::SeqCst) as usize).min(SEEN.len());
    SEEN[..n]
        .iter()
        .map(|(tid, size)| {
            let tid = tid.load(Ordering::Relaxed);
            let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "exited".into());
            format!(
                "{} bytes on thread {tid} ({name})",
                size.load(Ordering::Relaxed)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// SAFETY: forwards to the system allocator; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if counted() {
            count(l);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if counted() {
            count(Layout::from_size_align(n, l.align()).unwrap_or(l));
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

/// Stops counting; returns the allocations counted since `arm`.
pub fn disarm() -> u64 {
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCS.load(Ordering::SeqCst)
}
