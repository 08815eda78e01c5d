//! The per-core, per-class free lists and counters: the hot path.
//!
//! Each class has an owner-only stack (touched only by the core's bound thread, no atomic
//! read-modify-write) and a shared lock-free bounded queue (returns from other threads, gets
//! from other threads, fresh buffers). Counters written only by the owner are atomics updated
//! with a plain load + store (a `mov` on x86) so that `stats()` may read them from any thread
//! without a data race.

use std::cell::{Cell, UnsafeCell};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

use super::OWNER_CACHE;
use super::numa::Placement;
use super::region::Mapping;

thread_local! {
    static TOKEN: Cell<u64> = const { Cell::new(0) };
}
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A process-unique, non-zero number for the calling thread (never reused).
#[inline]
pub(crate) fn thread_token() -> u64 {
    TOKEN.with(|t| {
        let v = t.get();
        if v != 0 {
            v
        } else {
            let v = NEXT_TOKEN.fetch_add(1, Relaxed);
            t.set(v);
            v
        }
    })
}

#[inline]
fn bump(a: &AtomicU64, by: u64) {
    // Owner-only counter: no other thread writes it, so load + store loses nothing.
    a.store(a.load(Relaxed).wrapping_add(by), Relaxed);
}

#[derive(Default)]
pub(crate) struct OwnerCounters {
    /// Gets minus returns done on the owner path (may go negative: a buffer taken by another
    /// thread and returned by the owner).
    pub(crate) out: AtomicI64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
}

#[derive(Default)]
pub(crate) struct SharedCounters {
    pub(crate) out: AtomicI64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) remote_returns: AtomicU64,
}

pub(crate) struct ClassPool {
    pub(crate) size: usize,
    /// Owner-only free stack; capacity OWNER_CACHE, never reallocated.
    local: UnsafeCell<Vec<usize>>,
    pub(crate) own: CachePadded<OwnerCounters>,
    /// Free buffers anyone may take. Capacity: every buffer the class can ever have.
    pub(crate) shared: ArrayQueue<usize>,
    pub(crate) sh: CachePadded<SharedCounters>,
    pub(crate) high_water: AtomicI64,
    pub(crate) capacity: AtomicUsize,
    /// Misses since the last growth (adaptive strategy).
    pub(crate) miss_streak: AtomicU32,
    /// Time of the last miss, nanoseconds since the pools' epoch.
    pub(crate) last_miss_ns: AtomicU64,
    pub(crate) grown: AtomicU64,
    pub(crate) released: AtomicU64,
}

// SAFETY: every field is Sync except `local`, which is only accessed through the `unsafe`
// methods below whose contract is that the caller is the core's owner thread (checked with
// `CorePool::is_owner` before each call), so at most one thread ever touches it at a time;
// ownership changes hands only through the Release/Acquire of `CorePool::owner`.
unsafe impl Sync for ClassPool {}

impl ClassPool {
    pub(crate) fn new(size: usize, max_buffers: usize) -> ClassPool {
        ClassPool {
            size,
            local: UnsafeCell::new(Vec::with_capacity(OWNER_CACHE)),
            own: Default::default(),
            shared: ArrayQueue::new(max_buffers.max(1)),
            sh: Default::default(),
            high_water: AtomicI64::new(0),
            capacity: AtomicUsize::new(0),
            miss_streak: AtomicU32::new(0),
            last_miss_ns: AtomicU64::new(0),
            grown: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn in_use(&self) -> i64 {
        self.own.out.load(Relaxed) + self.sh.out.load(Acquire)
    }

    /// Publish a free buffer to the shared queue.
    #[inline]
    pub(crate) fn push_shared(&self, addr: usize) {
        // Cannot fail: the queue holds every buffer the class can have (see Pools::new).
        let r = self.shared.push(addr);
        debug_assert!(r.is_ok(), "shared free queue overflow");
    }

    /// Take a free buffer on the owner path.
    ///
    /// # Safety
    /// The caller is the core's owner thread.
    #[inline]
    pub(crate) unsafe fn owner_take(&self) -> Option<usize> {
        // SAFETY: the caller is the owner, the only thread touching `local` (contract).
        let local = unsafe { &mut *self.local.get() };
        let addr = match local.pop() {
            Some(a) => a,
            // SAFETY: the caller is the owner (contract, passed on).
            None => unsafe { self.owner_refill() }?,
        };
        // Owner-only counter: load + store, and the value is reused for the high-water mark
        // (atomic loads are not merged by the compiler, so `in_use()` would load it again).
        let out = self.own.out.load(Relaxed) + 1;
        self.own.out.store(out, Relaxed);
        let now = out + self.sh.out.load(Acquire);
        if now > self.high_water.load(Relaxed) {
            self.raise_high_water(now);
        }
        Some(addr)
    }

    /// The owner's stack is empty: take back remote returns, a batch at a time so other
    /// threads can still get. Out of line so the owner's fast path stays small enough to
    /// inline into callers.
    ///
    /// # Safety
    /// The caller is the core's owner thread.
    #[cold]
    #[inline(never)]
    unsafe fn owner_refill(&self) -> Option<usize> {
        // SAFETY: the caller is the owner, the only thread touching `local` (contract).
        let local = unsafe { &mut *self.local.get() };
        let first = self.shared.pop()?;
        for _ in 0..32 {
            match self.shared.pop() {
                Some(a) => local.push(a),
                None => break,
            }
        }
        Some(first)
    }

    /// Return a buffer on the owner path.
    ///
    /// # Safety
    /// The caller is the core's owner thread.
    #[inline]
    pub(crate) unsafe fn owner_put(&self, addr: usize) {
        // SAFETY: the caller is the owner, the only thread touching `local` (contract).
        let local = unsafe { &mut *self.local.get() };
        if local.len() < OWNER_CACHE {
            local.push(addr); // within the reserved capacity: no allocation
        } else {
            self.owner_spill(addr);
        }
        self.own.out.store(self.own.out.load(Relaxed) - 1, Relaxed);
    }

    /// The owner's stack is full: the buffer goes to the shared queue.
    #[cold]
    #[inline(never)]
    fn owner_spill(&self, addr: usize) {
        self.push_shared(addr);
    }

    /// Move the owner's stack to the shared queue (unbinding, maintenance).
    ///
    /// # Safety
    /// The caller is the core's owner thread.
    pub(crate) unsafe fn owner_flush(&self) {
        // SAFETY: the caller is the owner (contract).
        let local = unsafe { &mut *self.local.get() };
        while let Some(a) = local.pop() {
            self.push_shared(a);
        }
    }

    /// Out of line: it keeps `Pools::get`'s owner path small enough to inline.
    #[inline(never)]
    pub(crate) fn shared_take(&self) -> Option<usize> {
        let addr = self.shared.pop()?;
        let now = self.sh.out.fetch_add(1, AcqRel) + 1 + self.own.out.load(Relaxed);
        if now > self.high_water.load(Relaxed) {
            self.raise_high_water(now);
        }
        Some(addr)
    }

    /// Raises the high-water mark to `now` buffers out, at most the class's capacity: the two
    /// counters can overstate what is out for a moment (a remote return publishes its buffer
    /// before its decrement lands, so a taker may count it twice), and no more buffers than
    /// the class holds can ever be out. Cold: it runs only when the mark moves.
    #[cold]
    #[inline(never)]
    fn raise_high_water(&self, now: i64) {
        let cap = self.capacity.load(Relaxed) as i64;
        self.high_water.fetch_max(now.min(cap), Relaxed);
    }

    /// Return a buffer from a thread that is not the owner. The Release decrement is the
    /// last access to the pool, so a shutdown that reads the counter as zero may free it.
    /// Out of line: it keeps the owner's return path in `PoolBuf::drop` small.
    #[inline(never)]
    pub(crate) fn remote_put(&self, addr: usize) {
        self.push_shared(addr);
        self.sh.remote_returns.fetch_add(1, Relaxed);
        self.sh.out.fetch_sub(1, Release);
    }

    #[inline]
    pub(crate) fn count_hit(&self, owner: bool) {
        if owner {
            bump(&self.own.hits, 1);
        } else {
            self.sh.hits.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn count_miss(&self, owner: bool, now_ns: u64) {
        if owner {
            bump(&self.own.misses, 1);
        } else {
            self.sh.misses.fetch_add(1, Relaxed);
        }
        self.miss_streak.fetch_add(1, Relaxed);
        self.last_miss_ns.store(now_ns, Relaxed);
    }
}

/// A region and the buffers carved from it.
pub(crate) struct Region {
    pub(crate) id: u64,
    pub(crate) map: Mapping,
    pub(crate) class: Option<usize>,
    pub(crate) buffers: usize,
}

pub(crate) struct GrowState {
    pub(crate) regions: Vec<Region>,
    pub(crate) mapped: usize,
    pub(crate) next_id: u64,
}

pub(crate) struct CorePool {
    pub(crate) core: usize,
    pub(crate) placement: Placement,
    /// Token of the bound thread, 0 if none.
    pub(crate) owner: AtomicU64,
    pub(crate) zero_on_free: bool,
    pub(crate) classes: Box<[ClassPool]>,
    pub(crate) grow: Mutex<GrowState>,
    pub(crate) generation: AtomicU64,
}

impl CorePool {
    /// Whether the calling thread is this core's owner. Only the owner stores its own token
    /// and it clears it itself, so a thread can never see its own token here unless it is the
    /// owner right now (coherence of one location); Relaxed is enough for that.
    #[inline]
    pub(crate) fn is_owner(&self) -> bool {
        self.owner.load(Relaxed) == thread_token()
    }

    /// Buffers handed out and not yet returned, all classes.
    pub(crate) fn outstanding(&self) -> i64 {
        self.classes.iter().map(|c| c.in_use()).sum()
    }
}
