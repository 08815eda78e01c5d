//! Pool get + put against `std::alloc` with 4 KiB alignment, and the cost of a remote return.
//!
//! `cargo bench --bench pool`

use std::alloc::{Layout, alloc, dealloc};
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rio::pool::{PagePolicy, PoolConfig, Pools, Strategy};

fn cfg() -> PoolConfig {
    PoolConfig {
        classes: vec![4096, 65536, 1 << 20],
        initial_per_class: 64,
        max_bytes_per_core: 256 << 20,
        strategy: Strategy::Fixed,
        pages: PagePolicy::Huge2M,
        ..Default::default()
    }
}

fn get_put(c: &mut Criterion) {
    let pools = Pools::new(cfg(), &[0, 1]).unwrap();
    let _g = pools.bind_current_thread(0).unwrap();
    let mut g = c.benchmark_group("get_put");
    for size in [4096usize, 65536, 1 << 20] {
        g.bench_function(format!("pool_owner/{size}"), |b| {
            b.iter(|| {
                let buf = pools.get(0, black_box(size), None).unwrap();
                black_box(buf.as_ptr());
            })
        });
        g.bench_function(format!("pool_shared/{size}"), |b| {
            // Core 1 has no home thread: the lock-free path.
            b.iter(|| {
                let buf = pools.get(1, black_box(size), None).unwrap();
                black_box(buf.as_ptr());
            })
        });
        let layout = Layout::from_size_align(size, 4096).unwrap();
        g.bench_function(format!("std_alloc_4k_aligned/{size}"), |b| {
            b.iter(|| {
                // SAFETY: layout has a non-zero size; the pointer is freed with the same layout.
                unsafe {
                    let p = alloc(layout);
                    assert!(!p.is_null());
                    black_box(p);
                    dealloc(p, layout);
                }
            })
        });
    }
    g.finish();
}

fn remote_return(c: &mut Criterion) {
    let pools = Pools::new(cfg(), &[0]).unwrap();
    let _g = pools.bind_current_thread(0).unwrap();
    let (tx, rx) = crossbeam_channel::bounded::<Vec<rio::pool::PoolBuf>>(1);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let dropper = std::thread::spawn(move || {
        while let Ok(v) = rx.recv() {
            drop(v);
            done_tx.send(()).unwrap();
        }
    });
    const BATCH: usize = 32;
    let mut g = c.benchmark_group("remote_return");
    // Per buffer: owner get, drop on another thread (lock-free push), owner takes it back.
    g.throughput(criterion::Throughput::Elements(BATCH as u64));
    g.bench_function("get_here_drop_there_x32", |b| {
        let p = Arc::clone(&pools);
        b.iter(|| {
            let mut v = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                v.push(p.get(0, 4096, None).unwrap());
            }
            tx.send(v).unwrap();
            done_rx.recv().unwrap();
        })
    });
    g.bench_function("get_here_drop_here_x32", |b| {
        let p = Arc::clone(&pools);
        b.iter(|| {
            let mut v = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                v.push(p.get(0, 4096, None).unwrap());
            }
            drop(black_box(v));
        })
    });
    g.finish();
    drop(tx);
    dropper.join().unwrap();
}

criterion_group!(benches, get_put, remote_return);
criterion_main!(benches);
