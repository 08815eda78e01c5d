//! Criterion bench of `rio bench --verify`'s cost per 4 KiB block: the header and data pattern
//! written (fill), and checked (CRC32C and data regenerated) on the way back.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rio_cli::bench::verify;

fn verify_blocks(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify_4k_block");
    let mut block = vec![0u8; 4096];
    g.bench_function("fill", |b| {
        b.iter(|| verify::fill_block(black_box(&mut block), 8192, 42));
    });
    verify::fill_block(&mut block, 8192, 42);
    g.bench_function("check", |b| {
        b.iter(|| verify::check_block(black_box(&block), 8192, Some(42)).unwrap());
    });
    g.finish();
}

criterion_group!(benches, verify_blocks);
criterion_main!(benches);
