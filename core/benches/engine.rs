//! Criterion benches of the engine's own costs, each beside a peer measured in the same run:
//! - buffer arena get/put against `std::alloc` with 4 KiB alignment;
//! - one QD32 batch of 4 KiB reads served from the page cache (buffered, so the device is out
//!   of the picture): uring against psync, the software cost per I/O of each backend;
//! - the same QD32 batch and a QD1 round trip through the userspace NVMe driver on the
//!   software controller model (no data copy, no latency: what is left is the driver's cost
//!   per I/O plus the model's, on the other core), beside uring on the page cache;
//! - a QD32 batch through the runtime's async API (futures, per-core poller thread) against the
//!   same batch on a `Queue` used directly, both on the model and on the page cache;
//!   (`benches/async_vs_queue.rs` holds QD32 instead, in alternating rounds).
//!
//! The bench's verify block fill and check are measured in the CLI crate (`cli/benches/verify.rs`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rio::buf::Arena;
use rio::config::BackendChoice;
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig};

#[path = "util/mod.rs"]
mod util;
use util::unpin_current;

/// An 8 MiB file of ones in /var/tmp (a real file system, for the page-cache benches).
fn page_cache_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("bench.dat");
    std::fs::write(&path, vec![1u8; 8 << 20]).unwrap();
    (dir, path)
}

fn buffers(c: &mut Criterion) {
    let mut g = c.benchmark_group("buffer_4k_get_put");
    let arena = Arena::new(4 << 20, false).unwrap();
    g.bench_function("rio_arena", |b| {
        b.iter(|| black_box(arena.alloc(4096).unwrap()));
    });
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    g.bench_function("std_alloc_aligned", |b| {
        b.iter(|| {
            // SAFETY: layout has non-zero size; the pointer is freed with the same layout.
            unsafe {
                let p = std::alloc::alloc(layout);
                black_box(p);
                std::alloc::dealloc(p, layout);
            }
        });
    });
    g.finish();
}

fn queue_batch(c: &mut Criterion) {
    let (_dir, path) = page_cache_file();
    let mut g = c.benchmark_group("qd32_batch_4k_read_page_cache");
    g.measurement_time(Duration::from_secs(3));
    for backend in [
        BackendChoice::Uring,
        BackendChoice::Psync,
        BackendChoice::Vfio,
    ] {
        let cfg = EngineConfig {
            backend,
            direct: false,
            hugepages: false,
            ..Default::default()
        };
        let target = match backend {
            BackendChoice::Vfio => "sim://size=64m,data=0".to_string(),
            _ => path.to_str().unwrap().to_string(),
        };
        let e = Engine::open(&cfg, &target, OpenOptions::default()).unwrap();
        let mut q = e.queue(Some(32)).unwrap();
        let mut bufs: Vec<_> = (0..32).map(|_| Some(q.alloc_buf(4096).unwrap())).collect();
        let mut out = Vec::with_capacity(32);
        let name = match backend {
            BackendChoice::Vfio => "nvme_driver_on_sim".to_string(),
            _ => format!("{backend:?}").to_lowercase(),
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                for (i, buf) in bufs.iter_mut().enumerate() {
                    q.submit_read(
                        i as u64 * 4096 * 7 % (8 << 20),
                        buf.take().unwrap(),
                        i as u64,
                    )
                    .unwrap();
                }
                let mut n = 0;
                while n < 32 {
                    n += q.wait(32 - n, Duration::from_secs(5), &mut out).unwrap();
                }
                for c in out.drain(..) {
                    bufs[c.token as usize] = c.buf;
                }
            });
        });
    }
    g.finish();
}

fn qd1_round_trip(c: &mut Criterion) {
    let (_dir, path) = page_cache_file();
    let mut g = c.benchmark_group("qd1_4k_read_round_trip");
    g.measurement_time(Duration::from_secs(3));
    for (name, backend, target) in [
        (
            "uring_page_cache",
            BackendChoice::Uring,
            path.to_str().unwrap().to_string(),
        ),
        (
            "nvme_driver_on_sim",
            BackendChoice::Vfio,
            "sim://size=64m,data=0".to_string(),
        ),
    ] {
        let cfg = EngineConfig {
            backend,
            direct: false,
            hugepages: false,
            ..Default::default()
        };
        let e = Engine::open(&cfg, &target, OpenOptions::default()).unwrap();
        let mut q = e.queue(Some(1)).unwrap();
        let mut buf = Some(q.alloc_buf(4096).unwrap());
        let mut out = Vec::with_capacity(1);
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7) % 2048;
                q.submit_read(i * 4096, buf.take().unwrap(), i).unwrap();
                while q.wait(1, Duration::from_secs(5), &mut out).unwrap() == 0 {}
                buf = out.pop().unwrap().buf;
            });
        });
    }
    g.finish();
}

fn async_vs_queue(c: &mut Criterion) {
    use rio::runtime::{IdlePolicy, Runtime, RuntimeConfig};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    /// Like an executor's: waking sets a flag (and unparks); the task is polled again only
    /// after a wake.
    struct ThreadWaker {
        thread: std::thread::Thread,
        woken: std::sync::atomic::AtomicBool,
    }
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.woken.store(true, std::sync::atomic::Ordering::Release);
            self.thread.unpark();
        }
    }
    let (_dir, path) = page_cache_file();
    let file = path.to_str().unwrap().to_string();
    let cpus = unpin_current();
    let last_cpu = cpus.last().copied().unwrap_or(0);
    for (group, target, direct) in [
        (
            "qd32_batch_4k_read_on_sim_async_vs_queue",
            "sim://size=64m,data=0".to_string(),
            true,
        ),
        ("qd32_batch_4k_read_page_cache_async_vs_queue", file, false),
    ] {
        // On the page cache: this thread on the first CPU, the poller on the last (two busy
        // threads, two cores), and the waiting side spins briefly before it parks, as
        // executors do. On the model, three busy threads share two cores: no pinning, park
        // at once (spinning would take the CPU from the poller or the model).
        let spin = !target.starts_with("sim://");
        if spin && let Some(&first) = cpus.first() {
            core_affinity::set_for_current(core_affinity::CoreId { id: first });
        }
        let mut g = c.benchmark_group(group);
        g.measurement_time(Duration::from_secs(3));
        let cfg = EngineConfig {
            hugepages: false,
            direct,
            ..Default::default()
        };
        // Direct: the queue on this thread.
        {
            let e = Engine::open(&cfg, &target, OpenOptions::default()).unwrap();
            let mut q = e.queue(Some(32)).unwrap();
            let mut bufs: Vec<_> = (0..32).map(|_| Some(q.alloc_buf(4096).unwrap())).collect();
            let mut out = Vec::with_capacity(32);
            g.bench_function("queue", |b| {
                b.iter(|| {
                    for (i, buf) in bufs.iter_mut().enumerate() {
                        q.submit_read(i as u64 * 4096, buf.take().unwrap(), i as u64)
                            .unwrap();
                    }
                    let mut n = 0;
                    while n < 32 {
                        n += q.wait(32 - n, Duration::from_secs(5), &mut out).unwrap();
                    }
                    for c in out.drain(..) {
                        bufs[c.token as usize] = c.buf;
                    }
                });
            });
        }
        // Async: 32 futures to a poller on another core, awaited here.
        {
            let e = Engine::open(&cfg, &target, OpenOptions::default()).unwrap();
            let rt = Runtime::start(
                e,
                RuntimeConfig {
                    depth: 64,
                    idle: IdlePolicy::BusyPoll,
                    // Page cache: one poller on the last CPU. Model: the default (every CPU but the
                    // model's), so the poller shares a CPU with this thread, which parks.
                    cores: spin.then(|| vec![last_cpu]),
                    ..RuntimeConfig::default()
                },
            )
            .unwrap();
            let tw = Arc::new(ThreadWaker {
                thread: std::thread::current(),
                woken: std::sync::atomic::AtomicBool::new(false),
            });
            let waker = Waker::from(Arc::clone(&tw));
            let mut cx = Context::from_waker(&waker);
            let mut bufs: Vec<_> = (0..32)
                .map(|_| Some(rt.buffer(4096, Duration::from_secs(1)).unwrap()))
                .collect();
            let mut futs = Vec::with_capacity(32);
            g.bench_function("runtime_async", |b| {
                b.iter(|| {
                    for (i, buf) in bufs.iter_mut().enumerate() {
                        futs.push(rt.submit(rio::OpKind::Read, i as u64 * 4096, 4096, buf.take()));
                    }
                    for (i, f) in futs.iter_mut().enumerate() {
                        let mut f = std::pin::Pin::new(f);
                        loop {
                            tw.woken.store(false, std::sync::atomic::Ordering::Relaxed);
                            if let Poll::Ready(r) = f.as_mut().poll(&mut cx) {
                                bufs[i] = r.unwrap().1;
                                break;
                            }
                            // Wait for the wake: spin a little (page cache) then park.
                            let mut spins = 0u32;
                            while !tw.woken.load(std::sync::atomic::Ordering::Acquire) {
                                spins += 1;
                                if !spin || spins > 2000 {
                                    std::thread::park_timeout(Duration::from_millis(1));
                                } else {
                                    std::hint::spin_loop();
                                }
                            }
                        }
                    }
                    futs.clear();
                });
            });
            drop(bufs);
            rt.shutdown();
        }
        g.finish();
    }
}

criterion_group!(
    benches,
    buffers,
    queue_batch,
    qd1_round_trip,
    async_vs_queue
);
criterion_main!(benches);
