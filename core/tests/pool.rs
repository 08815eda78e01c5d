//! Per-core buffer pools: cross-thread returns, exhaustion, zeroing, leaks, NUMA fallback,
//! growth and release, statistics, a stress test, and zero heap allocations on the hot path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rio::pool::{
    PagePolicy, Placement, PoolBuf, PoolConfig, PoolError, Pools, RegionEventKind, Strategy,
};

/// Counts heap allocations of the calling thread only (tests run in parallel threads).
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; the counter is a const-initialised
// thread-local Cell with no destructor, so touching it never allocates or recurses.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

fn small(initial: usize) -> PoolConfig {
    PoolConfig {
        classes: vec![4096, 8192, 65536],
        initial_per_class: initial,
        max_bytes_per_core: 64 << 20,
        strategy: Strategy::Fixed,
        pages: PagePolicy::Normal,
        ..Default::default()
    }
}

fn class(p: &Pools, core: usize, size: usize) -> rio::pool::ClassStats {
    p.stats()
        .into_iter()
        .find(|c| c.core == core)
        .unwrap()
        .classes
        .into_iter()
        .find(|c| c.size == size)
        .unwrap()
}

#[test]
fn buffers_freed_on_other_threads_come_home() {
    let p = Pools::new(small(32), &[0]).unwrap();
    let _g = p.bind_current_thread(0).unwrap();
    let bufs: Vec<PoolBuf> = (0..32).map(|_| p.get(0, 4096, None).unwrap()).collect();
    let addrs: HashSet<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
    assert_eq!(addrs.len(), 32);
    assert!(p.get(0, 4096, None).is_err(), "all 32 are out");
    std::thread::spawn(move || {
        for b in bufs {
            assert_eq!(b.home_core(), 0);
            drop(b);
        }
    })
    .join()
    .unwrap();
    let s = class(&p, 0, 4096);
    assert_eq!(s.remote_returns, 32);
    assert_eq!(s.in_use, 0);
    // The home thread gets every one of them back.
    let again: Vec<PoolBuf> = (0..32).map(|_| p.get(0, 4096, None).unwrap()).collect();
    let back: HashSet<usize> = again.iter().map(|b| b.as_ptr() as usize).collect();
    assert_eq!(back, addrs);
}

#[test]
fn exhaustion_waits_until_the_deadline_then_errors() {
    let p = Pools::new(small(2), &[0]).unwrap();
    let held: Vec<PoolBuf> = (0..2).map(|_| p.get(0, 8000, None).unwrap()).collect();
    assert_eq!(held[0].capacity(), 8192);
    // No deadline: no wait (judged by what the pool says it did; the clock only bounds a
    // hang, generously, as a busy host can stall any thread for tens of milliseconds).
    let t = Instant::now();
    let e = p.get(0, 8000, None).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "no deadline: no wait");
    assert!(
        matches!(
            e,
            PoolError::Exhausted {
                class: 8192,
                in_use: 2,
                capacity: 2,
                waited: Duration::ZERO,
                ..
            }
        ),
        "{e}"
    );

    let t = Instant::now();
    let e = p
        .get(0, 8000, Some(Instant::now() + Duration::from_millis(100)))
        .unwrap_err();
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    // Bounded: it gives up soon after the deadline (generous: CI machines are busy).
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(e.to_string().contains("exhausted"), "{e}");
    // Still full, nothing came from the heap.
    assert_eq!(class(&p, 0, 8192).in_use, 2);
    assert_eq!(class(&p, 0, 8192).capacity, 2);

    // A waiter is served by a return from another thread before its deadline.
    let mut held = held;
    let one = held.pop().unwrap();
    let addr = one.as_ptr() as usize;
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        drop(one);
    });
    let t = Instant::now();
    let b = p
        .get(0, 8000, Some(Instant::now() + Duration::from_secs(60)))
        .unwrap();
    // Woken by the return, not by its deadline (a minute; bound generous for a busy host).
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(b.as_ptr() as usize, addr);
    h.join().unwrap();
}

#[test]
fn zero_on_free_clears_returned_buffers() {
    let cfg = PoolConfig {
        zero_on_free: true,
        ..small(1)
    };
    let p = Pools::new(cfg, &[0]).unwrap();
    for round in 0..3u8 {
        let mut b = p.get(0, 4096, None).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "round {round}: buffer not zeroed"
        );
        b.fill(0xA5);
        // Shorten: zeroing still covers the whole capacity.
        b.set_len(10).unwrap();
    }
    // Without the option, contents survive (documented: not cleared).
    let p = Pools::new(small(1), &[0]).unwrap();
    p.get(0, 4096, None).unwrap().fill(7);
    assert!(p.get(0, 4096, None).unwrap().iter().all(|&x| x == 7));
}

#[test]
fn counts_are_back_to_full_at_shutdown_and_regions_are_released() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = Arc::clone(&events);
    let cfg = PoolConfig {
        on_region: Some(Arc::new(move |e: &rio::pool::RegionEvent| {
            ev.lock()
                .unwrap()
                .push((e.core, e.kind, e.region.ptr as usize));
            Ok(())
        })),
        ..small(8)
    };
    let p = Pools::new(cfg, &[0, 1]).unwrap();
    {
        let mut v = Vec::new();
        for i in 0..8 {
            v.push(p.get(i % 2, 4096 << (i % 3), None).unwrap());
        }
        assert!(p.in_use() > 0);
        let h = std::thread::spawn(move || drop(v));
        h.join().unwrap();
    }
    assert_eq!(p.in_use(), 0);
    for cs in p.stats() {
        for c in cs.classes {
            assert_eq!(c.in_use, 0);
            assert_eq!(c.capacity, 8);
        }
    }
    drop(p);
    let ev = events.lock().unwrap();
    let mapped: Vec<_> = ev
        .iter()
        .filter(|e| e.1 == RegionEventKind::Mapped)
        .collect();
    let unmapped: Vec<_> = ev
        .iter()
        .filter(|e| e.1 == RegionEventKind::Unmapping)
        .collect();
    assert_eq!(mapped.len(), 2, "one initial region per core");
    assert_eq!(
        unmapped.len(),
        2,
        "every region unmapped at shutdown: {ev:?}"
    );
}

#[test]
fn single_numa_node_fallback() {
    let p = Pools::new(small(4), &[0]).unwrap();
    let nodes = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("node")
                        .is_some_and(|s| s.parse::<u32>().is_ok())
                })
                .count()
        })
        .unwrap_or(1)
        .max(1);
    assert_eq!(p.numa_nodes(), nodes);
    let regions = p.regions(0).unwrap();
    assert_eq!(regions.len(), 1);
    if nodes == 1 {
        assert_eq!(p.stats()[0].placement, Placement::SingleNode);
        assert_eq!(regions[0].placement, Placement::SingleNode);
    } else {
        assert!(matches!(p.stats()[0].placement, Placement::Bound(_)));
    }
    // And it serves buffers.
    let mut b = p.get(0, 4096, None).unwrap();
    b.fill(1);
    let (base, len) = (regions[0].ptr as usize, regions[0].len);
    assert!((base..base + len).contains(&(b.as_ptr() as usize)));
}

#[test]
fn stats_count_hits_misses_remote_returns_and_high_water() {
    let p = Pools::new(small(4), &[3]).unwrap();
    let g = p.bind_current_thread(3).unwrap();
    assert!(matches!(
        p.bind_current_thread(3),
        Err(PoolError::AlreadyBound { core: 3 })
    ));
    let a: Vec<PoolBuf> = (0..4).map(|_| p.get(3, 1, None).unwrap()).collect();
    assert!(p.get(3, 1, None).is_err());
    assert!(p.get(3, 1, None).is_err());
    let s = class(&p, 3, 4096);
    assert_eq!(
        (s.hits, s.misses, s.in_use, s.high_water, s.capacity),
        (4, 2, 4, 4, 4)
    );
    let (two, local): (Vec<_>, Vec<_>) = a.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    std::thread::spawn(move || drop(two)).join().unwrap();
    drop(local);
    let s = class(&p, 3, 4096);
    assert_eq!((s.remote_returns, s.in_use, s.high_water), (2, 0, 4));
    // Another thread's gets count too.
    let p2 = Arc::clone(&p);
    std::thread::spawn(move || {
        let _b = p2.get(3, 100, None).unwrap();
    })
    .join()
    .unwrap();
    let s = class(&p, 3, 4096);
    assert_eq!((s.hits, s.misses, s.remote_returns, s.in_use), (5, 2, 3, 0));
    assert_eq!(p.stats()[0].classes.len(), 3);
    drop(g);
    // Unbound: a new thread may bind.
    let p3 = Arc::clone(&p);
    std::thread::spawn(move || p3.bind_current_thread(3).map(drop))
        .join()
        .unwrap()
        .unwrap();
    assert!(matches!(
        p.get(9, 1, None),
        Err(PoolError::UnknownCore { core: 9 })
    ));
    assert!(matches!(
        p.get(3, 65537, None),
        Err(PoolError::TooLarge { largest: 65536, .. })
    ));
    assert!(p.get(3, 1, None).unwrap().set_len(4097).is_err());
}

#[test]
fn adaptive_grows_on_misses_up_to_the_cap_and_releases_idle_regions() {
    let maps = Arc::new(Mutex::new((0usize, 0usize)));
    let m = Arc::clone(&maps);
    let cfg = PoolConfig {
        classes: vec![4096, 1 << 20],
        initial_per_class: 1,
        max_bytes_per_core: 8 << 20,
        strategy: Strategy::Adaptive {
            grow_after_misses: 2,
            idle_release: Duration::from_millis(50),
        },
        pages: PagePolicy::Normal,
        on_region: Some(Arc::new(move |e: &rio::pool::RegionEvent| {
            let mut m = m.lock().unwrap();
            match e.kind {
                RegionEventKind::Mapped => m.0 += 1,
                RegionEventKind::Unmapping => m.1 += 1,
            }
            Ok(())
        })),
        ..Default::default()
    };
    let p = Pools::new(cfg, &[0]).unwrap();
    let _g = p.bind_current_thread(0).unwrap();
    let gen0 = p.generation(0).unwrap();
    let mut held = vec![p.get(0, 1 << 20, None).unwrap()];
    // First miss: not sustained yet.
    assert!(p.get(0, 1 << 20, None).is_err());
    // Second miss: grows by a 2 MiB region = two 1 MiB buffers.
    held.push(p.get(0, 1 << 20, None).unwrap());
    held.push(p.get(0, 1 << 20, None).unwrap());
    let s = class(&p, 0, 1 << 20);
    assert_eq!((s.capacity, s.grown, s.in_use), (3, 1, 3));
    assert_eq!(p.regions(0).unwrap().len(), 2);
    assert!(p.generation(0).unwrap() > gen0);
    assert_eq!(maps.lock().unwrap().0, 2);
    // Grow until the cap (8 MiB; the initial region takes 1 MiB + 4 KiB, rounded to 2 MiB
    // of 4 KiB pages... or exactly, on 4 KiB pages: 1 MiB + 4 KiB).
    let mut errs = 0;
    for _ in 0..40 {
        match p.get(0, 1 << 20, None) {
            Ok(b) => held.push(b),
            Err(PoolError::Exhausted { .. }) => errs += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(errs > 0);
    let st = &p.stats()[0];
    assert!(st.mapped_bytes <= 8 << 20, "{}", st.mapped_bytes);
    assert!(held.len() >= 6, "{}", held.len());
    // Return everything; after the idle period, maintenance unmaps the growth regions.
    let n = held.len();
    held.clear();
    assert_eq!(p.maintain(0).unwrap(), 0, "not idle yet");
    std::thread::sleep(Duration::from_millis(80));
    let freed = p.maintain(0).unwrap();
    assert!(freed >= (n - 1) << 20, "freed {freed}");
    assert_eq!(p.regions(0).unwrap().len(), 1);
    let s = class(&p, 0, 1 << 20);
    assert_eq!((s.capacity, s.in_use), (1, 0));
    let m = *maps.lock().unwrap();
    assert_eq!(
        m.0 - 1,
        m.1,
        "every growth region announced and released: {m:?}"
    );
    // Still serves.
    assert!(p.get(0, 1 << 20, None).is_ok());
}

#[test]
fn a_refusing_hook_cancels_pool_creation() {
    let cfg = PoolConfig {
        on_region: Some(Arc::new(|_e: &rio::pool::RegionEvent| {
            Err("no IOMMU space".into())
        })),
        ..small(1)
    };
    let e = Pools::new(cfg, &[0]).unwrap_err();
    assert!(e.to_string().contains("no IOMMU space"), "{e}");
}

#[test]
fn bad_configurations_are_refused() {
    for (cfg, what) in [
        (
            PoolConfig {
                classes: vec![],
                ..small(1)
            },
            "no size classes",
        ),
        (
            PoolConfig {
                classes: vec![3000],
                ..small(1)
            },
            "power of two",
        ),
        (
            PoolConfig {
                max_bytes_per_core: 4096,
                ..small(4)
            },
            "max_bytes_per_core",
        ),
        (
            PoolConfig {
                initial_per_class: 0,
                ..small(1)
            },
            "nothing",
        ),
    ] {
        let e = Pools::new(cfg, &[0]).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    assert!(Pools::new(small(1), &[]).is_err());
    assert!(Pools::new(small(1), &[0, 0]).is_err());
}

#[test]
fn no_heap_allocation_on_the_hot_path() {
    let p = Pools::new(small(64), &[0, 1]).unwrap();
    let _g = p.bind_current_thread(0).unwrap();
    let sizes = [4096usize, 100, 8192, 65536, 5000];
    let mut ring: [Option<PoolBuf>; 8] = Default::default();
    let mut round = |n: usize| {
        for i in 0..n {
            // Owner path, with some buffers held across iterations.
            let b = p.get(0, sizes[i % sizes.len()], None).unwrap();
            ring[i % 8] = Some(b);
            // Shared path: core 1 has no home thread here.
            let mut c = p.get(1, 4096, None).unwrap();
            c[0] = i as u8;
            drop(c);
        }
    };
    round(1000); // warm-up (thread-locals, first misses)
    let before = allocs();
    round(100_000);
    let after = allocs();
    assert_eq!(after - before, 0, "heap allocations on the hot path");
}

#[test]
fn stress_8_threads_100k_ops_with_verification() {
    const THREADS: usize = 8;
    const OPS: usize = 100_000;
    let cfg = PoolConfig {
        classes: vec![4096, 8192, 16384, 65536],
        initial_per_class: 64,
        max_bytes_per_core: 64 << 20,
        strategy: Strategy::Fixed,
        pages: PagePolicy::Huge2M,
        ..Default::default()
    };
    let cores = [0usize, 1];
    let p = Pools::new(cfg, &cores).unwrap();
    // At most 8 x (5 held + 2 queued) = 56 buffers out: below any class's 64.
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS)
        .map(|_| crossbeam_channel::bounded::<PoolBuf>(2))
        .unzip();
    let handles: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(t, rx)| {
            let p = Arc::clone(&p);
            let next = txs[(t + 1) % THREADS].clone();
            std::thread::spawn(move || {
                // Threads 0 and 1 are the home threads of cores 0 and 1.
                let _g = (t < cores.len()).then(|| p.bind_current_thread(cores[t]).unwrap());
                let sizes = [4096usize, 3000, 8192, 16384, 65536, 12000];
                let mut expect = vec![0u8; 65536];
                let mut held: Vec<(PoolBuf, u8)> = Vec::new();
                let deadline = || Some(Instant::now() + Duration::from_secs(10));
                for i in 0..OPS {
                    let core = cores[(i + t) % cores.len()];
                    let len = sizes[(i * 7 + t) % sizes.len()];
                    let mut b = p.get(core, len, deadline()).unwrap();
                    assert_eq!(b.len(), len);
                    assert_eq!(b.home_core(), core);
                    let pat = (t * 37 + i) as u8;
                    b.fill(pat);
                    held.push((b, pat));
                    if held.len() > 4 || i % 3 == 0 {
                        let (b, pat) = held.remove(0);
                        expect[..b.len()].fill(pat);
                        assert!(
                            b.as_slice() == &expect[..b.len()],
                            "thread {t} op {i}: corrupted"
                        );
                        if i % 5 == 0 {
                            // Return it from another thread.
                            let _ = next.try_send(b);
                        }
                    }
                    // Drop what the neighbour sent us (remote returns for most).
                    while let Ok(b) = rx.try_recv() {
                        drop(b);
                    }
                }
                drop(next);
                for (b, pat) in held {
                    expect[..b.len()].fill(pat);
                    assert!(b.as_slice() == &expect[..b.len()]);
                }
                rx
            })
        })
        .collect();
    drop(txs);
    let rxs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop(rxs); // buffers still in channels are returned here
    assert_eq!(p.in_use(), 0);
    let mut remote = 0;
    for cs in p.stats() {
        for c in cs.classes {
            assert_eq!(c.in_use, 0);
            assert_eq!(c.capacity, 64);
            assert!(c.high_water <= 64);
            remote += c.remote_returns;
        }
    }
    assert!(remote > 0);
    // Every get is counted once: a hit, or a miss (it waited for a return). How many had to
    // wait depends on scheduling, so only the total is checked.
    let (hits, misses): (u64, u64) = p
        .stats()
        .iter()
        .flat_map(|c| c.classes.iter())
        .fold((0, 0), |(h, m), c| (h + c.hits, m + c.misses));
    assert_eq!(
        hits + misses,
        (THREADS * OPS) as u64,
        "hits {hits} misses {misses}"
    );
}
