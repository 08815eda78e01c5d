//! The userspace NVMe driver on a real (emulated) NVMe controller bound to vfio-pci.
//!
//! These need a controller bound to vfio-pci behind an IOMMU, so they are `#[ignore]`d on the
//! host and run inside the test VM by `scripts/vm-test` (`--ignored`), which sets:
//! - `RIO_TEST_PCI`: controller A (namespace 1 with 512-byte blocks, namespace 2 with 4096);
//! - `RIO_TEST_PCI_SMALL_MDTS`: controller B (namespace 1, MDTS of 16 KiB).
//!
//! Run with `--ignored` but without those variables, a test fails under CI=true and skips
//! otherwise, saying what is missing.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{pattern, read_back, write_pattern};

use rio::target::OpenOptions;
use rio::{Engine, EngineConfig};

const RW: OpenOptions = OpenOptions {
    write: true,
    direct: true,
    create: false,
};

fn pci(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            common::missing(&format!(
                "{var}=<PCI address of an NVMe controller bound to vfio-pci> (scripts/vm-test sets it inside the VM)"
            ))?;
            None
        }
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        buffer_pool_bytes: 8 << 20,
        ..EngineConfig::default()
    }
}

fn open(addr: &str, nsid: u32) -> Engine {
    Engine::open(&config(), &format!("pcie://{addr}/ns={nsid}"), RW)
        .unwrap_or_else(|e| panic!("open pcie://{addr}/ns={nsid}: {e}"))
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_identify_namespaces_and_health() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    let e = open(&a, 1);
    let c = e.controller().expect("pcie target has a controller");
    let ns: Vec<(u32, u32)> = c
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.block_size))
        .collect();
    assert_eq!(ns, vec![(1, 512), (2, 4096)]);
    assert!(
        c.identify_data().model().contains("QEMU"),
        "{:?}",
        c.identify_data().model()
    );
    let info = rio::info::ControllerInfo::of(c);
    assert!(info.smart.is_some(), "SMART log: {:?}", info.smart_error);
    let text = info.to_human();
    assert!(text.contains("ns 2:") && text.contains("4096 B"), "{text}");
    assert_eq!(e.selection().backend, rio::BackendKind::Vfio);
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_round_trips_every_prp_shape_on_both_namespaces() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    for nsid in [1u32, 2] {
        let e = open(&a, nsid);
        let mut q = e.queue(Some(8)).unwrap();
        for (i, len) in [4096usize, 8192, 12288, 65536, 256 << 10]
            .into_iter()
            .enumerate()
        {
            let off = (i as u64) << 20;
            write_pattern(&mut q, off, len, nsid as u8 + i as u8);
            assert_eq!(
                read_back(&mut q, off, len),
                pattern(off, len, nsid as u8 + i as u8),
                "ns {nsid} len {len}"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_splits_requests_larger_than_mdts() {
    let Some(b) = pci("RIO_TEST_PCI_SMALL_MDTS") else {
        return;
    };
    let e = open(&b, 1);
    assert_eq!(e.controller().unwrap().max_xfer(), 16 << 10);
    let mut q = e.queue(Some(4)).unwrap();
    let before = q.nvme_stats().unwrap().commands;
    write_pattern(&mut q, 1 << 20, 1 << 20, 0x5a);
    assert_eq!(
        read_back(&mut q, 1 << 20, 1 << 20),
        pattern(1 << 20, 1 << 20, 0x5a)
    );
    let st = q.nvme_stats().unwrap();
    assert_eq!(
        st.commands - before,
        2 * 64,
        "1 MiB in 16 KiB commands, twice"
    );
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_flush_write_zeroes_deallocate() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    let e = open(&a, 1);
    let mut q = e.queue(Some(4)).unwrap();
    let base = 8 << 20;
    write_pattern(&mut q, base, 65536, 3);
    q.flush().unwrap();
    q.write_zeroes(base + 4096, 8192).unwrap();
    let got = read_back(&mut q, base, 65536);
    let want = pattern(base, 65536, 3);
    assert_eq!(&got[..4096], &want[..4096]);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&got[12288..], &want[12288..]);
    // Deallocate is advisory on this model: only that it completes is checked.
    q.deallocate(base + 32768, 16384).unwrap();
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_small_queue_wraps_and_nothing_is_lost() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    let cfg = EngineConfig {
        nvme_queue_entries: 4,
        ..config()
    };
    let e = Engine::open(&cfg, &format!("pcie://{a}/ns=1"), RW).unwrap();
    let mut q = e.queue(Some(16)).unwrap();
    let total = 2000u64;
    let (mut next, mut seen, mut out) = (0u64, HashSet::new(), Vec::new());
    while seen.len() < total as usize {
        while next < total && q.in_flight() < 16 {
            let b = q.alloc_buf(4096).unwrap();
            q.submit_read((next % 4096) * 4096, b, next).unwrap();
            next += 1;
        }
        out.clear();
        q.wait(1, Duration::from_secs(30), &mut out).unwrap();
        for c in out.drain(..) {
            c.result.expect("read");
            assert!(seen.insert(c.token), "token {} twice", c.token);
        }
    }
    assert_eq!(q.arena().in_use(), 0);
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_queue_pairs_per_thread_and_reopen() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    {
        let e = std::sync::Arc::new(open(&a, 1));
        let hs: Vec<_> = (0..2u8)
            .map(|t| {
                let e = std::sync::Arc::clone(&e);
                std::thread::spawn(move || {
                    let mut q = e.queue(Some(8)).unwrap();
                    let base = (16u64 + t as u64 * 8) << 20;
                    for i in 0..32u64 {
                        write_pattern(&mut q, base + i * 8192, 8192, t);
                    }
                    for i in 0..32u64 {
                        let off = base + i * 8192;
                        assert_eq!(read_back(&mut q, off, 8192), pattern(off, 8192, t));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
    // The controller was shut down when the last engine went; it comes up again and the data
    // is still there.
    let e = open(&a, 1);
    let mut q = e.queue(Some(2)).unwrap();
    let off = 16u64 << 20;
    assert_eq!(read_back(&mut q, off, 8192), pattern(off, 8192, 0));
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_sgl_and_prp_paths_on_qemu() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    for mode in [rio::nvme::SglMode::Always, rio::nvme::SglMode::Off] {
        let cfg = EngineConfig {
            nvme_sgl: mode,
            buffer_pool_bytes: 16 << 20,
            ..config()
        };
        let e = Engine::open(&cfg, &format!("pcie://{a}/ns=1"), RW).unwrap();
        let c = e.controller().unwrap();
        assert!(
            c.identify_data().supports_sgl(),
            "QEMU's controller offers SGLs"
        );
        assert_eq!(c.pci_id(), (0x1b36, 0x0010));
        assert!(c.quirks().bogus_ns_ids, "QEMU's entry of the quirks table");
        let mut q = e.queue(Some(8)).unwrap();
        let mut lens = vec![4096usize, 8192, 12288, 65536, 256 << 10];
        lens.push(c.max_xfer() as usize * 3 + 4096);
        for (i, len) in lens.into_iter().enumerate() {
            let off = (8 + i as u64) << 21;
            let seed = i as u8
                ^ if mode == rio::nvme::SglMode::Off {
                    0x11
                } else {
                    0x77
                };
            write_pattern(&mut q, off, len, seed);
            assert_eq!(
                read_back(&mut q, off, len),
                pattern(off, len, seed),
                "{mode:?} len {len}"
            );
        }
        // A buffer 8 bytes past a page boundary, across several commands.
        let len = c.max_xfer() as usize * 2;
        let mut w = q.alloc_buf(len + 4096).unwrap();
        let r = q.alloc_buf(len + 4096).unwrap();
        let off = 40u64 << 20;
        let data = pattern(off, len, 0x3c);
        w.as_mut_slice()[8..8 + len].copy_from_slice(&data);
        let mut out = Vec::new();
        // SAFETY: both buffers outlive the operations, which are reaped before they drop.
        unsafe {
            let wp = w.as_mut_slice().as_mut_ptr().add(8);
            q.submit_raw(rio::OpKind::Write, off, wp, len as u64, 1)
                .unwrap();
            q.wait(1, Duration::from_secs(60), &mut out).unwrap();
            out.pop().unwrap().result.unwrap();
            let rp = r.as_slice().as_ptr().cast_mut().add(8);
            q.submit_raw(rio::OpKind::Read, off, rp, len as u64, 2)
                .unwrap();
            q.wait(1, Duration::from_secs(60), &mut out).unwrap();
            out.pop().unwrap().result.unwrap();
        }
        assert!(r.as_slice()[8..8 + len] == data[..], "{mode:?} unaligned");
        let st = q.nvme_stats().unwrap();
        match mode {
            rio::nvme::SglMode::Always => {
                assert_eq!(st.sgl_commands, st.commands, "{st:?}")
            }
            _ => assert_eq!(st.sgl_commands, 0, "{st:?}"),
        }
    }
}

#[test]
#[ignore = "needs an NVMe controller on vfio-pci: run inside the VM by scripts/vm-test"]
fn vfio_temperature_event_reaches_the_driver() {
    let Some(a) = pci("RIO_TEST_PCI") else { return };
    let e = open(&a, 1);
    let c = e.controller().unwrap().clone();
    // A temperature threshold below QEMU's fixed composite temperature (323 K) makes the
    // controller raise a SMART/health event (critical warning bit 1).
    let prev = c.events_total();
    c.set_features(rio::nvme::spec::feature::TEMPERATURE_THRESHOLD, 300)
        .unwrap();
    let t = std::time::Instant::now();
    while c.events_total() == prev {
        c.poll_events().unwrap();
        assert!(t.elapsed() < Duration::from_secs(60), "no event from QEMU");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(
        c.critical_warning() & rio::nvme::spec::critical_warning::TEMPERATURE,
        0,
        "{:?}",
        c.events()
    );
    // Put the threshold back (QEMU's default, 343 K) for the tests after this one.
    c.set_features(rio::nvme::spec::feature::TEMPERATURE_THRESHOLD, 343)
        .unwrap();
}
