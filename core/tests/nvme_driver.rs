//! The userspace NVMe driver's robustness (issue 14): each test makes the software model
//! present one device behaviour the driver once mishandled (a panic, a leak, a needless reset,
//! a stale buffer) and judges what the driver did about it. No root, no hardware.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{pattern, read_back, write_pattern};

use rio::nvme::sim::{Fault, SimConfig, SimNamespace};
use rio::nvme::spec::{self, AsyncEvent, Status, admin_opcode, io_opcode};
use rio::nvme::{Controller, NvmeOptions, SglMode};
use rio::{Completion, Engine, EngineConfig, Error, IoErrorKind, OpKind, Queue};

fn config() -> EngineConfig {
    common::sim_engine_config()
}

/// Timeouts short enough for a test, long enough that no healthy command is aborted while
/// test threads, model threads and other test binaries share two cores.
fn fast_timeouts() -> EngineConfig {
    EngineConfig {
        nvme_timeout_ms: 1000,
        nvme_admin_timeout_ms: 1000,
        ..config()
    }
}

fn sim(size: u64) -> SimConfig {
    common::sim_one_ns(size)
}

fn open(cfg: &EngineConfig, s: SimConfig) -> Engine {
    common::open_sim_rw(cfg, s)
}

fn opts() -> NvmeOptions {
    NvmeOptions {
        hugepages: false,
        ..NvmeOptions::default()
    }
}

/// Wait until `n` completions arrived (errors included), tokens each seen once.
fn wait_all(q: &mut Queue, n: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while got.len() < n {
        out.clear();
        match q.wait(1, Duration::from_secs(30), &mut out) {
            Ok(_) => {}
            Err(Error::BadNvmeCompletion { .. }) => {}
            Err(e) => panic!("wait: {e}"),
        }
        for c in out.drain(..) {
            assert!(seen.insert(c.token), "token {} completed twice", c.token);
            got.push(c);
        }
    }
    got
}

fn model(e: &Engine) -> &rio::nvme::sim::SimController {
    e.controller().unwrap().sim().unwrap()
}

// ----- 1. PRP lists for large transfers from buffers not page-aligned ------------------------

#[test]
fn four_mib_from_an_unaligned_buffer_is_split_not_a_panic() {
    // No MDTS: the driver's cap (4 MiB) is the limit. From a buffer 8 bytes past a page
    // boundary, 4 MiB touches 1025 pages: more than one tracker's PRP list can hold.
    let mut s = sim(64 << 20);
    s.mdts = 0;
    let cfg = EngineConfig {
        buffer_pool_bytes: 32 << 20,
        ..config()
    };
    let e = open(&cfg, s);
    let mut q = e.queue(Some(4)).unwrap();
    let len = 4usize << 20;
    let mut wbuf = q.alloc_buf(len + 4096).unwrap();
    let rbuf = q.alloc_buf(len + 4096).unwrap();
    for shift in [8usize, 512, 4092] {
        let off = (shift as u64) << 12;
        let data = pattern(off, len, shift as u8);
        wbuf.as_mut_slice()[shift..shift + len].copy_from_slice(&data);
        let w = wbuf.as_mut_slice().as_mut_ptr().wrapping_add(shift);
        let r = rbuf.as_slice().as_ptr().cast_mut().wrapping_add(shift);
        // SAFETY: both buffers stay alive and untouched until the completions are reaped.
        unsafe {
            q.submit_raw(OpKind::Write, off, w, len as u64, 1).unwrap();
            for c in wait_all(&mut q, 1) {
                c.result.unwrap();
            }
            q.submit_raw(OpKind::Read, off, r, len as u64, 2).unwrap();
            for c in wait_all(&mut q, 1) {
                assert_eq!(c.result.unwrap(), len as u64);
            }
        }
        assert!(
            rbuf.as_slice()[shift..shift + len] == data[..],
            "shift {shift}"
        );
        assert_eq!(model(&e).namespace_data(1, off, len), data);
    }
    // Each 4 MiB transfer needed two commands (one list cannot describe 1025 pages).
    let st = model(&e).stats();
    assert_eq!((st.write_cmds, st.read_cmds), (6, 6), "{st:?}");
}

// ----- 3. Transfers past 2 GiB ---------------------------------------------------------------

#[test]
fn transfers_past_two_gib_are_refused_at_submission() {
    let mut s = sim(8 << 30);
    s.store_data = false;
    let e = open(&config(), s);
    let mut q = e.queue(Some(4)).unwrap();
    let mut b = q.alloc_buf(4096).unwrap();
    let p = b.as_mut_slice().as_mut_ptr();
    for len in [2u64 << 30, 3 << 30, rio::MAX_IO_BYTES + 512] {
        // SAFETY: refused before anything reaches the device.
        let r = unsafe { q.submit_raw(OpKind::Read, 0, p, len, 1) };
        match r {
            Err(Error::TooLarge { len: l, max }) => {
                assert_eq!((l, max), (len, rio::MAX_IO_BYTES))
            }
            other => panic!("{len}: {other:?}"),
        }
    }
    assert_eq!(q.in_flight(), 0);
    assert_eq!(model(&e).stats().read_cmds, 0);
}

// ----- 7. Commands stamped with a stale clock ------------------------------------------------

#[test]
fn a_command_submitted_after_a_long_pause_does_not_time_out_at_once() {
    let e = open(&fast_timeouts(), sim(8 << 20));
    let mut q = e.queue(Some(4)).unwrap();
    write_pattern(&mut q, 0, 4096, 1);
    // One command in flight, then no poll for longer than the timeout, then another one.
    let a = q.alloc_buf(4096).unwrap();
    q.submit_read(0, a, 1).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let b = q.alloc_buf(4096).unwrap();
    q.submit_read(0, b, 2).unwrap();
    for c in wait_all(&mut q, 2) {
        assert_eq!(c.buf.as_ref().unwrap().as_slice(), &pattern(0, 4096, 1)[..]);
        c.result.unwrap();
    }
    let st = q.nvme_stats().unwrap();
    assert_eq!((st.timeouts, st.aborts), (0, 0), "{st:?}");
}

// ----- 4. Registers a device may present -----------------------------------------------------

#[test]
fn cap_values_that_would_panic_fail_bring_up_with_a_typed_error() {
    let base = sim(8 << 20);
    let cap = Controller::open_sim(base.clone(), &opts()).unwrap().cap().0;
    // MQES = 0.
    let s = SimConfig {
        raw_cap: Some(cap & !0xFFFF),
        ..base.clone()
    };
    match Controller::open_sim(s, &opts()) {
        Err(Error::Controller { reason, .. }) => assert!(reason.contains("MQES"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A doorbell stride that puts even the admin doorbells past BAR0.
    let s = SimConfig {
        raw_cap: Some(cap | 0xF << 32),
        bar_bytes: Some(0x2000),
        ..base.clone()
    };
    match Controller::open_sim(s, &opts()) {
        Err(Error::Controller { reason, .. }) => assert!(reason.contains("DSTRD"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn doorbells_past_bar0_limit_the_queues_instead_of_panicking() {
    // BAR0 holds the admin doorbells and one I/O queue pair's: 2 granted queues are cut to 1.
    let s = SimConfig {
        bar_bytes: Some(0x1010),
        max_io_queues: 2,
        dbbuf: false,
        ..sim(8 << 20)
    };
    let e = open(&config(), s);
    assert_eq!(e.controller().unwrap().io_queue_count(), 1);
    let mut q = e.queue(Some(4)).unwrap();
    write_pattern(&mut q, 0, 8192, 3);
    assert_eq!(read_back(&mut q, 0, 8192), pattern(0, 8192, 3));
    match e.queue(Some(4)) {
        Err(Error::Controller { reason, .. }) => assert!(reason.contains("in use"), "{reason}"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn a_doorbell_stride_too_wide_for_shadow_doorbells_uses_mmio_doorbells() {
    for dstrd in [9u8, 12] {
        let s = SimConfig {
            dstrd,
            max_io_queues: 2,
            ..sim(8 << 20)
        };
        let e = open(&config(), s);
        let c = e.controller().unwrap();
        assert!(!c.shadow_doorbells(), "dstrd {dstrd}");
        assert!(c.io_queue_count() >= 1);
        let mut q = e.queue(Some(4)).unwrap();
        write_pattern(&mut q, 4096, 4096, dstrd);
        assert_eq!(read_back(&mut q, 4096, 4096), pattern(4096, 4096, dstrd));
    }
}

// ----- 2 and 5. Memory a timed-out admin command may still write -----------------------------

#[test]
fn shadow_doorbell_buffer_of_a_timed_out_config_is_never_reused() {
    let mut s = sim(8 << 20);
    s.faults = vec![Fault::DelayAdmin {
        opcode: admin_opcode::DOORBELL_BUFFER_CONFIG,
        nth: 1,
        delay: Duration::from_millis(600),
    }];
    let cfg = EngineConfig {
        nvme_admin_timeout_ms: 200,
        ..config()
    };
    let e = open(&cfg, s);
    let c = e.controller().unwrap();
    assert!(!c.shadow_doorbells());
    assert_eq!(c.retired_pages(), 1, "the buffer is kept, not freed");
    // Queues made after it (whose rings could have reused that memory) work, past the time
    // the late command would have landed.
    let mut q = e.queue(Some(8)).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    for i in 0..64u64 {
        write_pattern(&mut q, i * 4096, 4096, i as u8);
    }
    for i in 0..64u64 {
        assert_eq!(
            read_back(&mut q, i * 4096, 4096),
            pattern(i * 4096, 4096, i as u8)
        );
    }
}

#[test]
fn a_late_admin_transfer_cannot_reach_the_next_commands_data() {
    let mut s = sim(8 << 20);
    s.faults = vec![
        // The SMART log read is left alone by the device until 1.3 s: the driver gives up at
        // 1 s, and the SMART data lands at 1.3 s.
        Fault::LateAdmin {
            opcode: admin_opcode::GET_LOG_PAGE,
            nth: 1,
            delay: Duration::from_millis(1300),
        },
        // The error log read next (from ~1 s) transfers its data at once and completes at
        // ~1.6 s: the late SMART data lands between the two.
        Fault::DelayAdmin {
            opcode: admin_opcode::GET_LOG_PAGE,
            nth: 2,
            delay: Duration::from_millis(600),
        },
    ];
    let o = NvmeOptions {
        admin_timeout: Duration::from_millis(1000),
        ..opts()
    };
    let c = Controller::open_sim(s, &o).unwrap();
    match c.smart_log() {
        Err(Error::Controller { reason, .. }) => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.retired_pages(), 1);
    // Nothing failed on this controller: its error log is empty. SMART data in the page would
    // parse as an entry with a non-zero error count.
    let entries = c.error_log().unwrap();
    assert!(
        entries.is_empty(),
        "error log read from a clean page: {entries:?}"
    );
    assert_eq!(c.smart_log().unwrap().critical_warning, 0);
}

// ----- 6. Queue ids and memory after a failed re-create; backoff -----------------------------

#[test]
fn a_queue_whose_re_create_failed_gives_its_id_back_and_retries_with_backoff() {
    let mut s = sim(8 << 20);
    s.max_io_queues = 1;
    s.faults = vec![Fault::Fatal { after_io: 2 }];
    // Re-creating the CQ after the reset fails (an error status) on attempts 2..=30.
    for nth in 2..=30 {
        s.faults.push(Fault::ErrorStatus {
            admin: true,
            opcode: admin_opcode::CREATE_IO_CQ,
            nth,
            status: Status::new(0, 0x06).with_dnr(true),
        });
    }
    let e = open(&fast_timeouts(), s);
    let mut q = e.queue(Some(4)).unwrap();
    write_pattern(&mut q, 0, 4096, 1);
    let b = q.alloc_buf(4096).unwrap();
    let _ = q.submit_read(0, b, 7);
    // The fatal status resets the controller; creating the queue again keeps failing.
    let mut out = Vec::new();
    let start = Instant::now();
    let mut polls = 0u32;
    let mut failed = false;
    while start.elapsed() < Duration::from_millis(300) {
        polls += 1;
        out.clear();
        if q.wait(0, Duration::from_millis(1), &mut out).is_err() {
            failed = true;
        }
    }
    assert!(failed, "re-creating the queue pair kept failing");
    let elapsed_ms = start.elapsed().as_millis() as f64;
    let creates = model(&e).stats().admin_cmds;
    // Backing off (1 ms doubling): about log2(elapsed) attempts, not one per poll. Counted
    // loosely: every admin command of the model, bring-up's included (under 20).
    assert!(
        (creates as f64) < 20.0 + 3.0 * (elapsed_ms + 1.0).log2(),
        "{creates} admin commands in {elapsed_ms} ms over {polls} polls"
    );
    drop(q);
    // The id came back: new queue pairs on the only id the controller grants are refused by
    // the device (the injected error) until its faults run out, never for want of an id.
    let mut q = None;
    for _ in 0..40 {
        match e.queue(Some(4)) {
            Ok(x) => {
                q = Some(x);
                break;
            }
            Err(Error::Nvme { error, .. }) => assert_eq!(error.status.sc(), 0x06),
            Err(other) => panic!("{other}"),
        }
    }
    let mut q = q.expect("a queue pair once the device stops refusing");
    assert_eq!(read_back(&mut q, 0, 4096), pattern(0, 4096, 1));
}

// ----- 8. Aborts: asynchronous, within the controller-wide limit -----------------------------

#[test]
fn more_timeouts_than_the_abort_limit_defer_aborts_instead_of_resetting() {
    let mut s = sim(8 << 20);
    // Six reads lost; every abort takes 300 ms to answer. The model accepts 4 aborts at once
    // (Identify ACL = 3).
    s.faults = (1..=6)
        .map(|nth| Fault::DropCompletion {
            admin: false,
            opcode: io_opcode::READ,
            nth,
        })
        .chain((1..=6).map(|nth| Fault::DelayAdmin {
            opcode: admin_opcode::ABORT,
            nth,
            delay: Duration::from_millis(300),
        }))
        .collect();
    let cfg = EngineConfig {
        nvme_timeout_ms: 500,
        nvme_admin_timeout_ms: 2000,
        ..config()
    };
    let e = open(&cfg, s);
    let c = e.controller().unwrap().clone();
    assert_eq!(c.identify_data().abort_limit(), 4);
    let mut q = e.queue(Some(8)).unwrap();
    for t in 0..6u64 {
        let b = q.alloc_buf(4096).unwrap();
        q.submit_read(t * 4096, b, t).unwrap();
    }
    let mut got = Vec::new();
    let mut out = Vec::new();
    let mut most = 0;
    while got.len() < 6 {
        out.clear();
        q.wait(0, Duration::from_millis(5), &mut out).unwrap();
        most = most.max(c.aborts_outstanding());
        got.append(&mut out);
    }
    for c in &got {
        let k = &c.result.as_ref().unwrap_err().kind;
        assert!(matches!(k, IoErrorKind::TimedOut { .. }), "{k:?}");
    }
    let st = q.nvme_stats().unwrap();
    assert_eq!((st.timeouts, st.aborts, st.resets), (6, 6, 0), "{st:?}");
    assert!(st.aborts_deferred >= 1, "{st:?}");
    assert!(most <= 4, "{most} aborts outstanding at once");
    assert_eq!(model(&e).stats().resets, 0);
    // The queue goes on.
    write_pattern(&mut q, 0, 4096, 5);
    assert_eq!(read_back(&mut q, 0, 4096), pattern(0, 4096, 5));
}

// ----- Retries of transient errors -----------------------------------------------------------

#[test]
fn transient_errors_are_retried_after_the_delay_the_controller_asks_for() {
    let mut s = sim(8 << 20);
    s.crdt = [1, 0, 0];
    // Namespace Not Ready (generic 0x82), DNR clear, CRD 1: retry after CRDT1 = 100 ms.
    let transient = Status::new(0, 0x82).with_crd(1);
    s.faults = vec![Fault::Transient {
        opcode: io_opcode::READ,
        nth: 2,
        times: 2,
        status: transient,
    }];
    let e = open(&config(), s);
    let mut q = e.queue(Some(4)).unwrap();
    write_pattern(&mut q, 0, 4096, 9);
    assert_eq!(read_back(&mut q, 0, 4096), pattern(0, 4096, 9));
    let t = Instant::now();
    assert_eq!(read_back(&mut q, 0, 4096), pattern(0, 4096, 9));
    assert!(
        t.elapsed() >= Duration::from_millis(190),
        "two retries, each after CRDT1 (100 ms): {:?}",
        t.elapsed()
    );
    assert_eq!(q.nvme_stats().unwrap().retries, 2);
}

#[test]
fn retries_are_bounded_and_dnr_is_honoured() {
    let mut s = sim(8 << 20);
    s.faults = vec![
        Fault::Transient {
            opcode: io_opcode::READ,
            nth: 1,
            times: 100,
            status: Status::new(0, 0x82),
        },
        Fault::Transient {
            opcode: io_opcode::WRITE,
            nth: 1,
            times: 1,
            status: Status::new(0, 0x82).with_dnr(true),
        },
    ];
    let e = open(&config(), s);
    let mut q = e.queue(Some(4)).unwrap();
    let b = q.alloc_buf(4096).unwrap();
    let err = q.read(0, b).unwrap_err();
    assert!(
        matches!(&err, Error::Io(e) if matches!(e.kind, IoErrorKind::Nvme(n) if n.status.sc() == 0x82)),
        "{err}"
    );
    assert_eq!(q.nvme_stats().unwrap().retries, 3, "the default bound");
    let b = q.alloc_buf(4096).unwrap();
    assert!(q.write(0, b).is_err(), "DNR set: no retry");
    assert_eq!(q.nvme_stats().unwrap().retries, 3);
}

// ----- Asynchronous events -------------------------------------------------------------------

#[test]
fn namespace_change_health_warning_and_firmware_notice_are_handled() {
    let e = open(&config(), sim(8 << 20));
    let c = e.controller().unwrap().clone();
    let mut q = e.queue(Some(4)).unwrap();
    let epoch = c.namespace_epoch();
    model(&e).resize_namespace(1, 4 << 20).unwrap();
    poll_until(&mut q, || c.namespace_epoch() != epoch);
    assert_eq!(c.namespace(1).unwrap().size_bytes, 4 << 20);
    // The queue goes on (same block size).
    write_pattern(&mut q, 0, 4096, 2);
    assert_eq!(read_back(&mut q, 0, 4096), pattern(0, 4096, 2));

    model(&e).set_critical_warning(spec::critical_warning::TEMPERATURE);
    poll_until(&mut q, || c.critical_warning() != 0);
    assert_eq!(c.critical_warning(), spec::critical_warning::TEMPERATURE);

    model(&e).activate_firmware("RIO2.0");
    poll_until(&mut q, || c.events_total() >= 3);
    let ev = c.events();
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(ev[0].what.contains("nsid 1"), "{ev:?}");
    assert!(ev[1].what.contains("critical warning 0x02"), "{ev:?}");
    assert!(ev[2].what.contains("RIO2.0"), "{ev:?}");
    assert_eq!(model(&e).stats().events_reported, 3);
}

#[test]
fn events_are_handled_without_io_and_after_a_reset() {
    let mut s = sim(8 << 20);
    s.faults = vec![Fault::Fatal { after_io: 1 }];
    let e = open(&fast_timeouts(), s);
    let c = e.controller().unwrap().clone();
    let mut q = e.queue(Some(4)).unwrap();
    let b = q.alloc_buf(4096).unwrap();
    let _ = q.read(0, b);
    // The fatal status reset the controller; the events were armed again.
    poll_until(&mut q, || model(&e).stats().resets >= 1);
    write_pattern(&mut q, 0, 4096, 1);
    model(&e).raise_event(AsyncEvent {
        kind: spec::async_event_type::SMART_HEALTH,
        info: 0,
        log_page: spec::log_page::SMART_HEALTH,
    });
    // An idle host asks for them itself.
    let t = Instant::now();
    while c.events_total() == 0 {
        c.poll_events().unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "event never handled");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.events()[0].kind, spec::async_event_type::SMART_HEALTH);
}

fn poll_until(q: &mut Queue, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    let mut out = Vec::new();
    while !f() {
        out.clear();
        let _ = q.wait(0, Duration::from_millis(2), &mut out);
        assert!(t.elapsed() < Duration::from_secs(30), "condition never met");
    }
}

// ----- Quirks and namespace enumeration ------------------------------------------------------

#[test]
fn namespaces_past_the_first_list_page_and_without_a_list() {
    let many = SimConfig {
        namespaces: (0..1100)
            .map(|_| SimNamespace {
                block_size: 512,
                size_bytes: 1 << 20,
            })
            .collect(),
        ..SimConfig::default()
    };
    let c = Controller::open_sim(many.clone(), &opts()).unwrap();
    let ids: Vec<u32> = c.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, (1..=1100).collect::<Vec<_>>());
    drop(c);
    // No active namespace list (Invalid Field for CNS 02h): probed one by one.
    let s = SimConfig {
        active_ns_list: false,
        namespaces: many.namespaces[..3].to_vec(),
        ..SimConfig::default()
    };
    let c = Controller::open_sim(s, &opts()).unwrap();
    assert_eq!(c.namespaces().len(), 3);
}

#[test]
fn the_quirks_table_is_keyed_by_pci_id() {
    // QEMU's old controller id: the table says it has no active namespace list, and the driver
    // does not ask for one (the model would answer it, so only the quirk explains the probe).
    let s = SimConfig {
        pci_id: (0x8086, 0x5845),
        ..sim(8 << 20)
    };
    let c = Controller::open_sim(s, &opts()).unwrap();
    assert!(c.quirks().no_active_ns_list);
    assert_eq!(c.pci_id(), (0x8086, 0x5845));
    assert_eq!(c.namespaces().len(), 1);
    let s = SimConfig {
        pci_id: (0x1b36, 0x0010),
        ..sim(8 << 20)
    };
    let c = Controller::open_sim(s, &opts()).unwrap();
    assert!(c.quirks().bogus_ns_ids && !c.quirks().no_active_ns_list);
}

// ----- SGLs ----------------------------------------------------------------------------------

#[test]
fn sgl_and_prp_paths_move_the_same_bytes() {
    for mode in [SglMode::Always, SglMode::Auto, SglMode::Off] {
        let mut s = sim(64 << 20);
        s.sgl = true;
        s.mdts = 0;
        let cfg = EngineConfig {
            nvme_sgl: mode,
            buffer_pool_bytes: 32 << 20,
            ..config()
        };
        let e = open(&cfg, s);
        let mut q = e.queue(Some(4)).unwrap();
        let shapes = [512usize, 4096, 8192, 12288, 65536, 1 << 20, 4 << 20];
        for (i, len) in shapes.into_iter().enumerate() {
            let off = (i as u64) << 22;
            write_pattern(&mut q, off, len, i as u8 ^ 0x55);
            assert_eq!(
                read_back(&mut q, off, len),
                pattern(off, len, i as u8 ^ 0x55),
                "{mode:?} {len}"
            );
            assert_eq!(
                model(&e).namespace_data(1, off, len),
                pattern(off, len, i as u8 ^ 0x55)
            );
        }
        let st = model(&e).stats();
        let qs = q.nvme_stats().unwrap();
        assert_eq!(st.sgl_cmds, qs.sgl_commands, "{mode:?}");
        match mode {
            SglMode::Always => assert_eq!(st.sgl_cmds, st.read_cmds + st.write_cmds),
            // Only transfers past two pages need a list: 12 KiB and up, 4 of the 7 shapes.
            SglMode::Auto => assert_eq!(st.sgl_cmds, 2 * 4, "{st:?}"),
            SglMode::Off => assert_eq!(st.sgl_cmds, 0),
        }
    }
}

#[test]
fn sgl_always_on_a_controller_without_sgls_falls_back_to_prps() {
    let cfg = EngineConfig {
        nvme_sgl: SglMode::Always,
        ..config()
    };
    let e = open(&cfg, sim(8 << 20));
    let mut q = e.queue(Some(4)).unwrap();
    write_pattern(&mut q, 0, 65536, 4);
    assert_eq!(read_back(&mut q, 0, 65536), pattern(0, 65536, 4));
    assert_eq!(model(&e).stats().sgl_cmds, 0);
}
