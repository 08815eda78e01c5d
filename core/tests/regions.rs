//! External memory through `Engine::queue_with_regions` and `Queue::submit_raw`: what buffer
//! pools shared by a runtime's threads build on. The same checks on every backend.

mod common;

use std::time::Duration;

use rio::config::BackendChoice;
use rio::nvme::sim::{SimConfig, SimNamespace};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, Error, OpKind, Queue};
use rio_sys::mem::{Mapping, PageKind};

const RW: OpenOptions = OpenOptions {
    write: true,
    direct: true,
    create: false,
};

fn bytes(m: &Mapping, off: usize, len: usize) -> Vec<u8> {
    assert!(off + len <= m.len());
    // SAFETY: in bounds of a live mapping; read only while no I/O on it is in flight.
    unsafe { std::slice::from_raw_parts(m.as_ptr().add(off), len) }.to_vec()
}

fn fill(m: &Mapping, off: usize, len: usize) {
    assert!(off + len <= m.len());
    for i in 0..len {
        // SAFETY: in bounds of a live mapping; no I/O on it is in flight.
        unsafe { m.as_ptr().add(off + i).write((i * 7 % 251) as u8) };
    }
}

fn wait_one(q: &mut Queue) -> rio::Completion {
    let mut out = Vec::new();
    while out.is_empty() {
        q.wait(1, Duration::from_secs(10), &mut out).unwrap();
    }
    out.pop().unwrap()
}

/// Write a pattern from external memory, read it back into another part of it, compare.
fn round_trip(e: &Engine) {
    let m = Mapping::anonymous(4 << 20, false, true).unwrap();
    // SAFETY: `m` outlives `q` (declared before it, dropped after it).
    let mut q =
        unsafe { e.queue_with_regions(8, 1 << 20, &[(m.as_ptr(), m.len(), m.kind())]) }.unwrap();
    fill(&m, 0, 65536);
    // SAFETY: the range is inside `m`, untouched until the completion is reaped.
    unsafe { q.submit_raw(OpKind::Write, 8192, m.as_ptr(), 65536, 1) }.unwrap();
    let c = wait_one(&mut q);
    assert_eq!(c.result.unwrap(), 65536);
    assert!(c.buf.is_none());
    // SAFETY: as above, a disjoint part of `m`.
    unsafe { q.submit_raw(OpKind::Read, 8192, m.as_ptr().add(1 << 20), 65536, 2) }.unwrap();
    wait_one(&mut q).result.unwrap();
    assert_eq!(bytes(&m, 1 << 20, 65536), bytes(&m, 0, 65536));
    // Misaligned or out-of-range submissions are refused before anything is queued.
    let size = e.target().geometry.size;
    // SAFETY: refused before use.
    let r = unsafe { q.submit_raw(OpKind::Read, size, m.as_ptr(), 4096, 3) };
    assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
    assert_eq!(q.in_flight(), 0);
    drop(q);
}

#[test]
fn external_memory_on_the_nvme_driver_must_be_mapped() {
    let cfg = EngineConfig {
        hugepages: false,
        ..EngineConfig::default()
    };
    let sim = SimConfig {
        namespaces: vec![SimNamespace {
            block_size: 512,
            size_bytes: 16 << 20,
        }],
        ..SimConfig::default()
    };
    let e = Engine::open_sim(&cfg, sim, 1, RW).unwrap();
    round_trip(&e);
    // Memory that was never mapped for DMA is refused, not handed to the device.
    let stray = Mapping::anonymous(1 << 20, false, true).unwrap();
    let mut q = e.queue(Some(4)).unwrap();
    // SAFETY: refused before use.
    let r = unsafe { q.submit_raw(OpKind::Read, 0, stray.as_ptr(), 4096, 1) };
    assert!(matches!(r, Err(Error::BufferUnavailable { .. })), "{r:?}");
    // After add_region it is usable.
    // SAFETY: `stray` outlives `q` (dropped explicitly below, after `q`).
    unsafe { q.add_region(stray.as_ptr(), stray.len(), PageKind::Normal) }.unwrap();
    // SAFETY: in `stray`, untouched until reaped.
    unsafe { q.submit_raw(OpKind::Read, 0, stray.as_ptr(), 4096, 2) }.unwrap();
    wait_one(&mut q).result.unwrap();
    drop(q);
    drop(stray);
}

#[test]
fn external_memory_on_the_kernel_backends() {
    for backend in [BackendChoice::Uring, BackendChoice::Psync] {
        let (_d, p) = common::temp_file(16 << 20, 0);
        let cfg = EngineConfig {
            backend,
            hugepages: false,
            ..EngineConfig::default()
        };
        let e = Engine::open(&cfg, p.to_str().unwrap(), RW).unwrap();
        round_trip(&e);
    }
}

/// A region added after the queue was built (a pool that grew) is registered with io_uring as
/// fixed buffers too, taken out again when the pool gives it back, and its entries reused; I/O
/// on it is right in every state.
#[test]
fn io_uring_registers_regions_added_later() {
    let (_d, p) = common::temp_file(16 << 20, 0);
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        hugepages: false,
        ..EngineConfig::default()
    };
    let e = Engine::open(&cfg, p.to_str().unwrap(), RW).unwrap();
    let a = Mapping::anonymous(2 << 20, false, true).unwrap();
    let b = Mapping::anonymous(2 << 20, false, true).unwrap();
    // SAFETY: `a` and `b` outlive `q` (declared before it, dropped after it).
    let mut q =
        unsafe { e.queue_with_regions(8, 1 << 20, &[(a.as_ptr(), a.len(), a.kind())]) }.unwrap();
    // The queue's arena and `a`.
    assert_eq!(q.registered_regions(), Some(2));
    // SAFETY: `b` stays mapped until after `q` is dropped.
    unsafe { q.add_region(b.as_ptr(), b.len(), b.kind()) }.unwrap();
    assert_eq!(q.registered_regions(), Some(3));
    // Adding the same region again changes nothing.
    // SAFETY: as above.
    unsafe { q.add_region(b.as_ptr(), b.len(), b.kind()) }.unwrap();
    assert_eq!(q.registered_regions(), Some(3));
    let through = |q: &mut Queue, m: &Mapping, off: u64, seed: usize| {
        for i in 0..65536 {
            // SAFETY: in bounds of a live mapping; no I/O on it is in flight.
            unsafe { m.as_ptr().add(i).write((i * 7 + seed) as u8) };
        }
        // SAFETY: the range is inside `m`, untouched until the completion is reaped.
        unsafe { q.submit_raw(OpKind::Write, off, m.as_ptr(), 65536, 1) }.unwrap();
        assert_eq!(wait_one(q).result.unwrap(), 65536);
        // SAFETY: as above, a disjoint part of `m`.
        unsafe { q.submit_raw(OpKind::Read, off, m.as_ptr().add(1 << 20), 65536, 2) }.unwrap();
        assert_eq!(wait_one(q).result.unwrap(), 65536);
        assert_eq!(bytes(m, 1 << 20, 65536), bytes(m, 0, 65536));
    };
    through(&mut q, &b, 0, 1);
    through(&mut q, &a, 65536, 2);
    q.remove_region(b.as_ptr()).unwrap();
    assert_eq!(q.registered_regions(), Some(2));
    // Unregistered memory still does I/O (without fixed buffers).
    through(&mut q, &b, 131072, 3);
    q.remove_region(a.as_ptr()).unwrap();
    assert_eq!(q.registered_regions(), Some(1));
    // The freed entries are used again.
    // SAFETY: as above.
    unsafe { q.add_region(b.as_ptr(), b.len(), b.kind()) }.unwrap();
    assert_eq!(q.registered_regions(), Some(2));
    through(&mut q, &b, 196608, 4);
}
