//! [`Pools`]: construction, `get`, growth, maintenance, statistics, shutdown.

use std::marker::PhantomData;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::*;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_utils::Backoff;

use super::class::{ClassPool, CorePool, GrowState, Region, thread_token};
use super::numa::Numa;
use super::region::{Mapping, PagePolicy};
use super::{
    ClassStats, CoreStats, PoolBuf, PoolConfig, PoolError, RegionEvent, RegionEventKind,
    RegionInfo, Strategy,
};

const NO_CORE: u32 = u32::MAX;

/// The per-core buffer pools of a process (or runtime). `Send + Sync`; share it by `Arc`.
pub struct Pools {
    /// Never reallocated: `PoolBuf`s point into it.
    cores: Box<[CorePool]>,
    /// OS CPU number -> index into `cores`.
    index: Box<[u32]>,
    /// Class sizes, ascending.
    sizes: Box<[usize]>,
    /// `by_shift[s]` = index of the smallest class >= 2^s (or sizes.len()).
    by_shift: [u8; 65],
    cfg: PoolConfig,
    numa: Numa,
    epoch: Instant,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field(
                "cores",
                &self.cores.iter().map(|c| c.core).collect::<Vec<_>>(),
            )
            .field("cfg", &self.cfg)
            .field("numa", &self.numa)
            .finish()
    }
}

/// Proof that the calling thread is a core's home thread; dropping it (on that thread: it is
/// `!Send`) unbinds and hands the thread's private free list back to the shared queue.
#[must_use = "the binding ends when the guard is dropped"]
pub struct OwnerGuard {
    pools: Arc<Pools>,
    idx: usize,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for OwnerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerGuard")
            .field("core", &self.core())
            .finish()
    }
}

impl OwnerGuard {
    pub fn core(&self) -> usize {
        self.pools.cores[self.idx].core
    }

    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// Hand this thread's private free lists to the shared queues, so other threads can take
    /// those buffers. For an owner about to sleep: buffers returned on its thread would
    /// otherwise sit in its stash, out of reach of a thread waiting in `get`.
    pub fn flush(&self) {
        for c in self.pools.cores[self.idx].classes.iter() {
            // SAFETY: the guard is !Send, so this runs on the thread that bound the core, which
            // is still its owner (only this guard's drop clears the token).
            unsafe { c.owner_flush() };
        }
    }
}

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        let cp = &self.pools.cores[self.idx];
        for c in cp.classes.iter() {
            // SAFETY: the guard is !Send, so we run on the thread that bound the core and it is
            // still the owner (only this guard clears the token).
            unsafe { c.owner_flush() };
        }
        // Release: the flushed list and the owner-only counters are visible to the next owner
        // (its Acquire CAS) and to shutdown.
        cp.owner.store(0, Release);
    }
}

fn lock(m: &Mutex<GrowState>) -> MutexGuard<'_, GrowState> {
    // A panic in a hook while holding the lock leaves consistent state (regions are pushed
    // only after success): keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pools {
    /// Map the initial buffers of every core in `cores` (OS CPU numbers) on its NUMA node.
    pub fn new(cfg: PoolConfig, cores: &[usize]) -> Result<Arc<Pools>, PoolError> {
        Self::with_numa(cfg, cores, Numa::detect())
    }

    pub(crate) fn with_numa(
        cfg: PoolConfig,
        cores: &[usize],
        numa: Numa,
    ) -> Result<Arc<Pools>, PoolError> {
        let sizes = cfg.validate()?;
        if cores.is_empty() {
            return Err(PoolError::Config {
                reason: "no cores".into(),
            });
        }
        let mut index = vec![NO_CORE; cores.iter().max().map_or(0, |m| m + 1)];
        for (i, &c) in cores.iter().enumerate() {
            if index[c] != NO_CORE {
                return Err(PoolError::Config {
                    reason: format!("core {c} listed twice"),
                });
            }
            index[c] = i as u32;
        }
        let mut by_shift = [sizes.len() as u8; 65];
        for (s, slot) in by_shift.iter_mut().enumerate() {
            if let Some(i) = sizes.iter().position(|&z| s < 64 && z >= (1usize << s)) {
                *slot = i as u8;
            }
        }
        let initial = cfg.initial_bytes(&sizes);
        let mut built = Vec::with_capacity(cores.len());
        for &core in cores {
            let classes: Vec<ClassPool> = sizes
                .iter()
                .map(|&s| ClassPool::new(s, cfg.max_bytes_per_core / s))
                .collect();
            built.push(CorePool {
                core,
                placement: numa.placement_for(core),
                owner: AtomicU64::new(0),
                zero_on_free: cfg.zero_on_free,
                classes: classes.into_boxed_slice(),
                grow: Mutex::new(GrowState {
                    regions: Vec::new(),
                    mapped: 0,
                    next_id: 0,
                }),
                generation: AtomicU64::new(0),
            });
        }
        let pools = Arc::new(Pools {
            cores: built.into_boxed_slice(),
            index: index.into_boxed_slice(),
            sizes: sizes.into_boxed_slice(),
            by_shift,
            cfg,
            numa,
            epoch: Instant::now(),
        });
        if initial > 0 {
            for cp in pools.cores.iter() {
                let mut st = lock(&cp.grow);
                pools.add_region(cp, &mut st, None, initial)?;
            }
        }
        Ok(pools)
    }

    /// Map a region for `class` (or all classes for the initial region), announce it, carve it.
    fn add_region(
        &self,
        cp: &CorePool,
        st: &mut GrowState,
        class: Option<usize>,
        bytes: usize,
    ) -> Result<(), PoolError> {
        let pages = match class {
            // Growth is in small steps: 1 GiB pages only for the initial region.
            Some(_) if self.cfg.pages == PagePolicy::Huge1G => PagePolicy::Huge2M,
            _ => self.cfg.pages,
        };
        let map = Mapping::new(bytes, pages, &self.numa, cp.core)?;
        if st.mapped + map.len() > self.cfg.max_bytes_per_core {
            // Rounded up to a page size past the cap: give it back.
            return Err(PoolError::Map {
                core: cp.core,
                bytes: map.len(),
                reason: format!(
                    "would exceed max_bytes_per_core ({} mapped of {})",
                    st.mapped, self.cfg.max_bytes_per_core
                ),
            });
        }
        let region = Region {
            id: st.next_id,
            map,
            class,
            buffers: 0,
        };
        let info = region_info(&region);
        if let Some(hook) = &self.cfg.on_region {
            hook(&RegionEvent {
                core: cp.core,
                kind: RegionEventKind::Mapped,
                region: info,
            })
            .map_err(|reason| PoolError::Hook {
                core: cp.core,
                reason,
            })?;
        }
        st.next_id += 1;
        st.mapped += region.map.len();
        let base = region.map.as_ptr() as usize;
        let buffers = match class {
            None => cp.classes.len() * self.cfg.initial_per_class,
            Some(ci) => region.map.len() / cp.classes[ci].size,
        };
        st.regions.push(Region { buffers, ..region });
        // The region is announced before any of its buffers can be taken: a thread that takes
        // one and hands it to a poller has seen this generation, so the poller, checking the
        // generation after it received the buffer, maps the region before using it.
        cp.generation.fetch_add(1, Release);
        match class {
            None => {
                // Largest class first: every section starts aligned to its class size.
                let mut off = 0;
                for (ci, c) in cp.classes.iter().enumerate().rev() {
                    for _ in 0..self.cfg.initial_per_class {
                        c.push_shared(base + off);
                        off += self.sizes[ci];
                    }
                    c.capacity.fetch_add(self.cfg.initial_per_class, Relaxed);
                }
            }
            Some(ci) => {
                let c = &cp.classes[ci];
                for i in 0..buffers {
                    c.push_shared(base + i * c.size);
                }
                c.capacity.fetch_add(buffers, Relaxed);
                c.grown.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    #[inline]
    fn core_index(&self, core: usize) -> Result<usize, PoolError> {
        match self.index.get(core) {
            Some(&i) if i != NO_CORE => Ok(i as usize),
            _ => Err(PoolError::UnknownCore { core }),
        }
    }

    #[inline]
    fn class_for(&self, len: usize) -> Result<usize, PoolError> {
        let largest = self.sizes[self.sizes.len() - 1];
        if len > largest {
            return Err(PoolError::TooLarge {
                requested: len,
                largest,
            });
        }
        let shift = len.max(1).next_power_of_two().trailing_zeros() as usize;
        let ci = self.by_shift[shift] as usize;
        if ci >= self.sizes.len() {
            return Err(PoolError::TooLarge {
                requested: len,
                largest: self.sizes[self.sizes.len() - 1],
            });
        }
        Ok(ci)
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Make the calling thread `core`'s home thread until the guard is dropped.
    pub fn bind_current_thread(self: &Arc<Self>, core: usize) -> Result<OwnerGuard, PoolError> {
        let idx = self.core_index(core)?;
        let me = thread_token();
        // Acquire: see the previous owner's flushed list and counters.
        match self.cores[idx]
            .owner
            .compare_exchange(0, me, Acquire, Relaxed)
        {
            Ok(_) => Ok(OwnerGuard {
                pools: Arc::clone(self),
                idx,
                _not_send: PhantomData,
            }),
            Err(_) => Err(PoolError::AlreadyBound { core }),
        }
    }

    /// A buffer of at least `len` bytes (`len()` = `len`) from `core`'s pool. If the class is
    /// empty: grow (adaptive strategy), else wait for a return until `deadline` (`None`: do not
    /// wait), then [`PoolError::Exhausted`].
    #[inline(always)]
    pub fn get(
        &self,
        core: usize,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<PoolBuf, PoolError> {
        let cp = &self.cores[self.core_index(core)?];
        let ci = self.class_for(len)?;
        let c = &cp.classes[ci];
        let owner = cp.is_owner();
        if let Some(addr) = take(c, owner) {
            c.count_hit(owner);
            // SAFETY: addr was just taken off class ci's free list of cp; cp lives in
            // self.cores, which outlives every PoolBuf (see Drop for Pools).
            return Ok(unsafe { PoolBuf::new(cp, addr, ci, len) });
        }
        self.get_slow(cp, ci, len, owner, deadline)
    }

    /// A buffer if one is free right now: no waiting, no growth, not counted as a miss. For
    /// optional work (read-ahead) that must not grow the pool or allocate when it runs dry.
    pub fn try_get(&self, core: usize, len: usize) -> Option<PoolBuf> {
        let cp = &self.cores[self.core_index(core).ok()?];
        let ci = self.class_for(len).ok()?;
        let c = &cp.classes[ci];
        let owner = cp.is_owner();
        let addr = take(c, owner)?;
        c.count_hit(owner);
        // SAFETY: as in get.
        Some(unsafe { PoolBuf::new(cp, addr, ci, len) })
    }

    #[cold]
    fn get_slow(
        &self,
        cp: &CorePool,
        ci: usize,
        len: usize,
        owner: bool,
        deadline: Option<Instant>,
    ) -> Result<PoolBuf, PoolError> {
        let c = &cp.classes[ci];
        c.count_miss(owner, self.now_ns());
        // A thread about to wait must not sit on free buffers other threads need: an owner's
        // stash is invisible to them, and two owners each waiting for the other core's
        // buffers while holding their own would wait out their deadlines (seen in the 8-thread
        // stress test). Every stash this thread owns goes to the shared queues first.
        for other in self.cores.iter().filter(|o| o.is_owner()) {
            for oc in other.classes.iter() {
                // SAFETY: is_owner() just said this thread owns `other`.
                unsafe { oc.owner_flush() };
            }
        }
        let start = Instant::now();
        let mut grow_tried = false;
        let backoff = Backoff::new();
        loop {
            // Sustained misses grow the class; so does one caller that has waited a while
            // (a single thread needing more buffers than the class holds is demand too).
            if !grow_tried
                && let Strategy::Adaptive {
                    grow_after_misses, ..
                } = self.cfg.strategy
                && (c.miss_streak.load(Relaxed) >= grow_after_misses
                    || start.elapsed() >= Duration::from_millis(1))
            {
                grow_tried = true;
                self.try_grow(cp, ci);
            }
            if let Some(addr) = take(c, owner) {
                // SAFETY: as in get.
                return Ok(unsafe { PoolBuf::new(cp, addr, ci, len) });
            }
            let now = Instant::now();
            match deadline {
                Some(d) if now < d => {
                    if backoff.is_completed() {
                        std::thread::sleep((d - now).min(Duration::from_micros(50)));
                    } else {
                        backoff.snooze();
                    }
                }
                _ => {
                    return Err(PoolError::Exhausted {
                        core: cp.core,
                        class: c.size,
                        in_use: c.in_use().max(0) as usize,
                        capacity: c.capacity.load(Relaxed),
                        // Without a deadline the call never sleeps: it waited for nothing.
                        waited: if deadline.is_some() {
                            now - start
                        } else {
                            Duration::ZERO
                        },
                    });
                }
            }
        }
    }

    /// Add a growth region to class `ci` if the cap allows. Never blocks on the growth lock.
    fn try_grow(&self, cp: &CorePool, ci: usize) {
        let Ok(mut st) = cp.grow.try_lock() else {
            return;
        };
        let c = &cp.classes[ci];
        if c.miss_streak.load(Relaxed) < 1 {
            return; // someone grew it meanwhile
        }
        let room = self.cfg.max_bytes_per_core.saturating_sub(st.mapped);
        let want = c.size.saturating_mul(self.cfg.initial_per_class.max(1));
        // Whole 2 MiB pages when there is room for them (the region then fits hugepages).
        let huge = want.next_multiple_of(2 << 20);
        let bytes = if huge <= room {
            huge
        } else {
            // What is left, in whole buffers (4 KiB pages, rounded exactly).
            (room.min(want) / c.size) * c.size
        };
        if bytes < c.size {
            return;
        }
        match self.add_region(cp, &mut st, Some(ci), bytes) {
            Ok(()) => {
                c.miss_streak.store(0, Relaxed);
                tracing::debug!(
                    core = cp.core,
                    class = c.size,
                    bytes,
                    "buffer pool class grown"
                );
            }
            Err(e) => {
                tracing::warn!(core = cp.core, class = c.size, error = %e, "buffer pool cannot grow")
            }
        }
    }

    /// Release growth regions that are entirely free, of classes that have seen no miss for
    /// `idle_release` (adaptive strategy only). Call it from the core's home thread (it then
    /// also reclaims that thread's private list) or for a core with no home thread; for a core
    /// bound to another thread only the shared free queue is considered. Returns the bytes
    /// unmapped. Allocates (maintenance path).
    pub fn maintain(&self, core: usize) -> Result<usize, PoolError> {
        let Strategy::Adaptive { idle_release, .. } = self.cfg.strategy else {
            return Ok(0);
        };
        let cp = &self.cores[self.core_index(core)?];
        let me = thread_token();
        let mut claimed = false;
        let owner = cp.is_owner() || {
            claimed = cp.owner.compare_exchange(0, me, Acquire, Relaxed).is_ok();
            claimed
        };
        let now = self.now_ns();
        let mut st = lock(&cp.grow);
        let mut freed = 0;
        for (ci, c) in cp.classes.iter().enumerate() {
            if !st.regions.iter().any(|r| r.class == Some(ci)) {
                continue;
            }
            if now.saturating_sub(c.last_miss_ns.load(Relaxed)) < idle_release.as_nanos() as u64 {
                continue;
            }
            if owner {
                // SAFETY: we are the owner (bound, or claimed just above).
                unsafe { c.owner_flush() };
            }
            let mut free = Vec::new();
            while let Some(a) = c.shared.pop() {
                free.push(a);
            }
            let mut keep = Vec::with_capacity(st.regions.len());
            for r in std::mem::take(&mut st.regions) {
                if r.class != Some(ci) {
                    keep.push(r);
                    continue;
                }
                let n = free.iter().filter(|&&a| r.map.contains(a)).count();
                if n != r.buffers {
                    keep.push(r);
                    continue;
                }
                free.retain(|&a| !r.map.contains(a));
                c.capacity.fetch_sub(r.buffers, Relaxed);
                c.released.fetch_add(1, Relaxed);
                st.mapped -= r.map.len();
                freed += r.map.len();
                cp.generation.fetch_add(1, Release);
                let ok = match &self.cfg.on_region {
                    Some(hook) => hook(&RegionEvent {
                        core: cp.core,
                        kind: RegionEventKind::Unmapping,
                        region: region_info(&r),
                    })
                    .inspect_err(|e| {
                        tracing::warn!(core = cp.core, error = %e, "region hook refused an unmap; leaking the region")
                    })
                    .is_ok(),
                    None => true,
                };
                if ok {
                    drop(r);
                } else {
                    std::mem::forget(r);
                }
            }
            st.regions = keep;
            for a in free {
                c.push_shared(a);
            }
        }
        drop(st);
        if claimed {
            cp.owner.store(0, Release);
        }
        Ok(freed)
    }

    /// Every mapping of `core`'s pool, for DMA mapping / io_uring registration.
    pub fn regions(&self, core: usize) -> Result<Vec<RegionInfo>, PoolError> {
        let cp = &self.cores[self.core_index(core)?];
        Ok(lock(&cp.grow).regions.iter().map(region_info).collect())
    }

    /// Changes to `core`'s region list so far (each map and unmap adds one).
    #[inline]
    pub fn generation(&self, core: usize) -> Result<u64, PoolError> {
        Ok(self.cores[self.core_index(core)?].generation.load(Acquire))
    }

    /// The configured cores (OS CPU numbers), in configuration order.
    pub fn cores(&self) -> Vec<usize> {
        self.cores.iter().map(|c| c.core).collect()
    }

    /// Size classes, ascending.
    pub fn classes(&self) -> &[usize] {
        &self.sizes
    }

    /// NUMA nodes of the machine as the pools see them (1 on a single-node machine).
    pub fn numa_nodes(&self) -> usize {
        self.numa.nodes().max(1)
    }

    /// Bytes handed out and not yet returned, all cores.
    pub fn in_use(&self) -> usize {
        self.cores
            .iter()
            .flat_map(|cp| cp.classes.iter())
            .map(|c| c.in_use().max(0) as usize * c.size)
            .sum()
    }

    pub fn stats(&self) -> Vec<CoreStats> {
        self.cores
            .iter()
            .map(|cp| {
                let st = lock(&cp.grow);
                CoreStats {
                    core: cp.core,
                    placement: st
                        .regions
                        .first()
                        .map_or(cp.placement, |r| r.map.placement()),
                    mapped_bytes: st.mapped,
                    regions: st.regions.len(),
                    classes: cp
                        .classes
                        .iter()
                        .map(|c| ClassStats {
                            size: c.size,
                            capacity: c.capacity.load(Relaxed),
                            in_use: c.in_use().max(0) as usize,
                            hits: c.own.hits.load(Relaxed) + c.sh.hits.load(Relaxed),
                            misses: c.own.misses.load(Relaxed) + c.sh.misses.load(Relaxed),
                            remote_returns: c.sh.remote_returns.load(Relaxed),
                            high_water: c.high_water.load(Relaxed).max(0) as usize,
                            grown: c.grown.load(Relaxed),
                            released: c.released.load(Relaxed),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

#[inline(always)]
fn take(c: &ClassPool, owner: bool) -> Option<usize> {
    if owner {
        // SAFETY: `owner` is the core's is_owner() evaluated on this thread during this call; only
        // this thread could clear it (by dropping its guard, which it is not doing now).
        unsafe { c.owner_take() }
    } else {
        c.shared_take()
    }
}

fn region_info(r: &Region) -> RegionInfo {
    RegionInfo {
        id: r.id,
        ptr: r.map.as_ptr(),
        len: r.map.len(),
        pages: r.map.kind(),
        placement: r.map.placement(),
        class: r.class,
    }
}

impl Drop for Pools {
    fn drop(&mut self) {
        // No guard is alive (each holds an Arc), so every owner-only counter was published
        // with Release when its guard dropped; remote returns publish with their Release
        // decrement (their last access).
        let out: i64 = self.cores.iter().map(|c| c.outstanding()).sum();
        if out != 0 {
            tracing::warn!(
                outstanding = out,
                "buffer pools dropped with buffers still out; leaking their memory"
            );
            let cores = std::mem::take(&mut self.cores);
            std::mem::forget(cores);
        }
        // Otherwise the cores (and their regions) drop normally: munmap, after telling the hook.
        else if let Some(hook) = &self.cfg.on_region {
            for cp in self.cores.iter() {
                let mut st = lock(&cp.grow);
                for r in std::mem::take(&mut st.regions) {
                    let ev = RegionEvent {
                        core: cp.core,
                        kind: RegionEventKind::Unmapping,
                        region: region_info(&r),
                    };
                    if hook(&ev).is_err() {
                        std::mem::forget(r);
                    }
                }
            }
        }
    }
}

// Compile-time check: the pools are shared across threads, buffers move between them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Pools>();
    send_sync::<PoolBuf>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PoolConfig {
        PoolConfig {
            classes: vec![65536, 4096, 8192],
            initial_per_class: 2,
            pages: PagePolicy::Normal,
            strategy: Strategy::Fixed,
            ..Default::default()
        }
    }

    #[test]
    fn lengths_map_to_the_smallest_class_that_fits() {
        let p = Pools::with_numa(cfg(), &[0], Numa::from_map(vec![Some(0)])).unwrap();
        assert_eq!(p.classes(), &[4096, 8192, 65536]);
        for (len, class) in [(0, 0), (1, 0), (4096, 0), (4097, 1), (8192, 1), (8193, 2)] {
            assert_eq!(p.class_for(len).unwrap(), class, "len {len}");
        }
        assert_eq!(p.class_for(65536).unwrap(), 2);
        assert!(p.class_for(65537).is_err());
        assert!(p.class_for(usize::MAX).is_err());
    }

    #[test]
    fn initial_region_sections_are_aligned_to_their_class() {
        let p = Pools::with_numa(cfg(), &[0], Numa::from_map(vec![Some(0)])).unwrap();
        let bufs: Vec<PoolBuf> = [65536, 65536, 8192, 8192, 4096, 4096]
            .iter()
            .map(|&s| p.get(0, s, None).unwrap())
            .collect();
        let r = p.regions(0).unwrap()[0];
        for b in &bufs {
            let a = b.as_ptr() as usize;
            assert_eq!(a % 4096, 0);
            assert_eq!((a - r.ptr as usize) % b.capacity(), 0);
            assert!(a >= r.ptr as usize && a + b.capacity() <= r.ptr as usize + r.len);
        }
    }

    #[test]
    fn unknown_node_on_a_multi_node_map_is_unbound_not_an_error() {
        let numa = Numa::from_map(vec![Some(0), Some(1)]);
        let p = Pools::with_numa(cfg(), &[1], numa).unwrap();
        assert_eq!(p.numa_nodes(), 2);
        assert_eq!(p.stats()[0].placement, super::super::Placement::Unbound);
        assert!(p.get(1, 4096, None).is_ok());
    }
}
