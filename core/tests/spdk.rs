//! The SPDK backend (cargo feature `spdk`) on a real (emulated) NVMe controller.
//!
//! Built only with the feature, against an installed SPDK, and `#[ignore]`d: `scripts/vm-test
//! --spdk DIR` builds this binary and runs it (`--ignored`) inside the VM with
//! `RIO_TEST_SPDK_PCI` set to a controller bound to vfio-pci (namespace 1, 512-byte blocks),
//! after rio's own driver has had its turn; `scripts/spdk-tcp DIR` runs it on the host with
//! `RIO_TEST_SPDK_TARGET` set to an NVMe/TCP transport ID served by SPDK's own `nvmf_tgt`.
//! Run with `--ignored` but without either variable, a test fails under CI=true and skips
//! otherwise, saying what is missing.
//!
//! What they hold SPDK's completion path to: `Queue::wait_each` hands every completion over
//! once, from inside SPDK's callback, and takes the handler's resubmissions; a panic in the
//! handler (caught at SPDK's C boundary) propagates and loses nothing; memory SPDK does not
//! know is refused at submission, with nothing left in flight.

#![cfg(feature = "spdk")]

mod common;

use common::{pattern, write_pattern};

use rio::config::BackendChoice;
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, Error, OpKind};

const RW: OpenOptions = OpenOptions {
    write: true,
    direct: true,
    create: false,
};

const BS: usize = 4096;

/// The target: `RIO_TEST_SPDK_TARGET` (any target SPDK serves, e.g. an NVMe/TCP transport
/// ID with `ns:1`), else `pcie://$RIO_TEST_SPDK_PCI/ns=1`.
fn target() -> Option<String> {
    if let Ok(t) = std::env::var("RIO_TEST_SPDK_TARGET")
        && !t.is_empty()
    {
        return Some(t);
    }
    match std::env::var("RIO_TEST_SPDK_PCI") {
        Ok(v) if !v.is_empty() => Some(format!("pcie://{v}/ns=1")),
        _ => {
            common::missing(
                "RIO_TEST_SPDK_PCI=<PCI address of an NVMe controller bound to vfio-pci, with SPDK's environment usable> (scripts/vm-test --spdk sets it inside the VM), or RIO_TEST_SPDK_TARGET=<an SPDK transport ID with ns:N> (scripts/spdk-tcp sets it)",
            )?;
            None
        }
    }
}

fn open(target: &str) -> Engine {
    let config = EngineConfig {
        buffer_pool_bytes: 8 << 20,
        backend: BackendChoice::Spdk,
        ..EngineConfig::default()
    };
    let e = Engine::open(&config, target, RW)
        .unwrap_or_else(|e| panic!("open {target} with --backend spdk: {e}"));
    assert_eq!(e.selection().backend, rio::BackendKind::Spdk);
    e
}

/// A run-to-completion loop at depth 8 over 64 blocks: every completion handed over once,
/// with its data, and the handler's resubmissions (made inside SPDK's callback) served.
#[test]
#[ignore = "needs SPDK and an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test --spdk"]
fn spdk_wait_each_hands_every_completion_over_and_takes_resubmissions() {
    let Some(a) = target() else { return };
    let e = open(&a);
    let mut q = e.queue(Some(8)).unwrap();
    common::wait_each_round_trip(&mut q, 64);
}

/// A handler that panics inside SPDK's completion callback: the panic reaches the caller of
/// `wait_each` (not an abort at the C boundary), every other completion is handed over by
/// the next calls, and the queue goes on working.
#[test]
#[ignore = "needs SPDK and an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test --spdk"]
fn spdk_a_panicking_handler_propagates_and_loses_nothing() {
    let Some(a) = target() else { return };
    let e = open(&a);
    let mut q = e.queue(Some(8)).unwrap();
    common::wait_each_panic_loses_nothing(&mut q, 1);
}

/// `submit_raw` on memory SPDK was never given is refused with the reason (SPDK would fail
/// it as an untranslatable address), and nothing is left in flight.
#[test]
#[ignore = "needs SPDK and an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test --spdk"]
fn spdk_refuses_memory_it_does_not_know() {
    let Some(a) = target() else { return };
    let e = open(&a);
    let mut q = e.queue(Some(4)).unwrap();
    let layout = std::alloc::Layout::from_size_align(BS, BS).unwrap();
    // SAFETY: a non-zero-sized layout.
    let mem = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!mem.is_null());
    // SAFETY: `mem` is valid for BS bytes until freed below; the submission is refused, so
    // nothing writes into it.
    let r = unsafe { q.submit_raw(OpKind::Read, 0, mem, BS as u64, 1) };
    match r {
        Err(Error::BufferUnavailable { reason, .. }) => {
            assert!(reason.contains("registered with SPDK"), "{reason}")
        }
        other => panic!("expected BufferUnavailable, got {other:?}"),
    }
    assert_eq!(q.in_flight(), 0);
    // SAFETY: allocated above with this layout, not used by anyone.
    unsafe { std::alloc::dealloc(mem, layout) };
    // The queue still serves its own memory.
    write_pattern(&mut q, 0, BS, 9);
    let buf = q.read(0, q.alloc_buf(BS).unwrap()).unwrap();
    assert_eq!(&buf[..], &pattern(0, BS, 9)[..]);
}
