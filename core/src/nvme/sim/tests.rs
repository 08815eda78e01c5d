//! Tests of the model through a minimal hand-written host: rings in page-aligned memory,
//! registers and doorbells through atomics, polling on the phase tag.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rio_sys::mem::Mapping;

use super::*;
use crate::nvme::spec::{
    AsyncEvent, Cc, CompletionEntry, Csts, DsmRange, IdentifyController, IdentifyNamespace,
    SglDescriptor, SmartLog, Status, SubmissionEntry, admin_opcode, async_event_notice,
    async_event_type, feature, io_opcode, log_page,
};

const WAIT: Duration = Duration::from_secs(5);

struct Qp {
    qid: u16,
    sq: u64,
    cq: u64,
    size: u32,
    tail: u32,
    head: u32,
    phase: bool,
    cid: u16,
}

struct Host {
    sim: SimController,
    dstrd: u8,
    mem: Vec<Mapping>,
    admin: Qp,
    dbbuf: Option<(u64, u64)>,
    /// MMIO doorbell writes made while shadow doorbells were on.
    mmio_rings: std::cell::Cell<u32>,
}

impl Host {
    fn new(cfg: SimConfig) -> Host {
        let sim = SimController::start(cfg).expect("start");
        let dstrd = sim.dstrd();
        let mut h = Host {
            sim,
            dstrd,
            mem: Vec::new(),
            admin: Qp {
                qid: 0,
                sq: 0,
                cq: 0,
                size: 32,
                tail: 0,
                head: 0,
                phase: true,
                cid: 0,
            },
            dbbuf: None,
            mmio_rings: std::cell::Cell::new(0),
        };
        h.enable();
        h
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        let (p, len) = self.sim.bar();
        assert!(off + 4 <= len);
        // SAFETY: in bounds of the live, page-aligned BAR; accessed only atomically.
        unsafe { AtomicU32::from_ptr(p.add(off).cast()) }
    }
    fn reg(&self, off: usize) -> u32 {
        self.word(off).load(Ordering::Acquire)
    }
    fn set_reg(&self, off: usize, v: u32) {
        self.word(off).store(v, Ordering::Release)
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let m = Mapping::anonymous(len, false, false).unwrap();
        let a = m.as_ptr() as u64;
        self.mem.push(m);
        a
    }

    fn wait_csts(&self, f: impl Fn(Csts) -> bool) -> Csts {
        let t = Instant::now();
        loop {
            let c = Csts(self.reg(reg::CSTS));
            if f(c) {
                return c;
            }
            assert!(t.elapsed() < WAIT, "CSTS stuck at {:#x}", c.0);
            std::thread::yield_now();
        }
    }

    /// Programs AQA/ASQ/ACQ (64-bit registers as two halves) and sets CC.EN.
    fn enable(&mut self) {
        let size = self.admin.size;
        let sq = self.alloc(4096);
        let cq = self.alloc(4096);
        self.admin = Qp {
            qid: 0,
            sq,
            cq,
            size,
            tail: 0,
            head: 0,
            phase: true,
            cid: 0,
        };
        self.set_reg(reg::AQA, (size - 1) << 16 | (size - 1));
        self.set_reg(reg::ASQ, sq as u32);
        self.set_reg(reg::ASQ + 4, (sq >> 32) as u32);
        self.set_reg(reg::ACQ, cq as u32);
        self.set_reg(reg::ACQ + 4, (cq >> 32) as u32);
        self.set_reg(reg::CC, Cc::nvm_default(0).with_enable(true).0);
        self.wait_csts(|c| c.rdy());
    }

    fn disable(&mut self) {
        self.set_reg(reg::CC, Cc::nvm_default(0).0);
        self.wait_csts(|c| !c.rdy());
        self.dbbuf = None;
    }

    fn qp(&mut self, qid: u16) -> &mut Qp {
        assert_eq!(qid, 0);
        &mut self.admin
    }

    fn push(&self, q: &mut Qp, mut cmd: SubmissionEntry) -> u16 {
        cmd.cid = q.cid;
        q.cid = q.cid.wrapping_add(1) % 0x8000;
        let slot = q.sq + q.tail as u64 * 64;
        // SAFETY: the slot is inside the SQ allocation (tail < size) and the model does not read
        // it until the doorbell store below publishes it.
        unsafe { std::ptr::write(slot as *mut SubmissionEntry, cmd) };
        q.tail = (q.tail + 1) % q.size;
        self.ring_sq(q);
        cmd.cid
    }

    fn ring_sq(&self, q: &Qp) {
        match self.dbbuf {
            Some((shadow, ei)) if q.qid != 0 => {
                let i = spec::shadow_sq_tail_index(q.qid, self.dstrd) as u64 * 4;
                // SAFETY: the shadow and EventIdx pages are live host memory; both sides
                // access them atomically.
                let (db, ev) = unsafe {
                    (
                        AtomicU32::from_ptr((shadow + i) as *mut u32),
                        AtomicU32::from_ptr((ei + i) as *mut u32),
                    )
                };
                let old = db.swap(q.tail, Ordering::SeqCst);
                // The MMIO write is needed only when the controller's EventIdx was crossed.
                if spec::shadow_doorbell_need_event(
                    ev.load(Ordering::SeqCst) as u16,
                    q.tail as u16,
                    old as u16,
                ) {
                    self.set_reg(spec::sq_tail_doorbell(q.qid, self.dstrd), q.tail);
                    self.mmio_rings.set(self.mmio_rings.get() + 1);
                }
            }
            _ => self.set_reg(spec::sq_tail_doorbell(q.qid, self.dstrd), q.tail),
        }
    }

    fn ring_cq(&self, q: &Qp) {
        match self.dbbuf {
            Some((shadow, _)) if q.qid != 0 => {
                let i = spec::shadow_cq_head_index(q.qid, self.dstrd) as u64 * 4;
                // SAFETY: as in `ring_sq`.
                unsafe { AtomicU32::from_ptr((shadow + i) as *mut u32) }
                    .store(q.head, Ordering::Release);
            }
            _ => self.set_reg(spec::cq_head_doorbell(q.qid, self.dstrd), q.head),
        }
    }

    fn try_reap(&self, q: &mut Qp, timeout: Duration) -> Option<CompletionEntry> {
        let slot = q.cq + q.head as u64 * 16;
        let t = Instant::now();
        loop {
            // SAFETY: the CQ slot is live; the model stores the status word atomically, last.
            let st =
                unsafe { AtomicU16::from_ptr((slot + 14) as *mut u16) }.load(Ordering::Acquire);
            if (st & 1 != 0) == q.phase {
                break;
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::hint::spin_loop();
        }
        // SAFETY: the Acquire load above saw the new phase, so the whole entry is written; the
        // model does not touch this slot again until the head doorbell moves past it.
        let e = unsafe { std::ptr::read_volatile(slot as *const CompletionEntry) };
        q.head = (q.head + 1) % q.size;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        self.ring_cq(q);
        Some(e)
    }

    fn reap(&self, q: &mut Qp) -> CompletionEntry {
        self.try_reap(q, WAIT).expect("no completion within 5 s")
    }

    fn admin(&mut self, cmd: SubmissionEntry) -> CompletionEntry {
        let mut q = std::mem::replace(self.qp(0), dummy_qp());
        let cid = self.push(&mut q, cmd);
        let e = self.reap(&mut q);
        *self.qp(0) = q;
        assert_eq!(e.cid, cid);
        assert_eq!(e.sq_id, 0);
        e
    }

    /// Submits an admin command without waiting for it.
    fn admin_push(&mut self, cmd: SubmissionEntry) -> u16 {
        let mut q = std::mem::replace(&mut self.admin, dummy_qp());
        let cid = self.push(&mut q, cmd);
        self.admin = q;
        cid
    }

    /// The next admin completion, if one arrives within `timeout`.
    fn admin_reap(&mut self, timeout: Duration) -> Option<CompletionEntry> {
        let mut q = std::mem::replace(&mut self.admin, dummy_qp());
        let e = self.try_reap(&mut q, timeout);
        self.admin = q;
        e
    }

    fn admin_ok(&mut self, cmd: SubmissionEntry) -> u32 {
        let e = self.admin(cmd);
        assert!(
            e.status().is_success(),
            "admin {:#x}: {}",
            cmd.opcode,
            e.status()
        );
        e.dw0
    }

    fn create_qp(&mut self, qid: u16, size: u32) -> Qp {
        self.create_qp2(qid, size, size)
    }

    fn create_qp2(&mut self, qid: u16, sq_size: u32, cq_size: u32) -> Qp {
        let cq = self.alloc(cq_size as usize * 16);
        let sq = self.alloc(sq_size as usize * 64);
        self.admin_ok(SubmissionEntry::create_io_cq(qid, cq_size, cq, true, None));
        self.admin_ok(SubmissionEntry::create_io_sq(
            qid,
            sq_size,
            sq,
            qid,
            true,
            spec::QueuePriority::Medium,
        ));
        assert_eq!(
            sq_size, cq_size,
            "Qp tracks one size; use raw rings for mixed sizes"
        );
        Qp {
            qid,
            sq,
            cq,
            size: sq_size,
            tail: 0,
            head: 0,
            phase: true,
            cid: 0,
        }
    }

    fn io(&self, q: &mut Qp, cmd: SubmissionEntry) -> CompletionEntry {
        let cid = self.push(q, cmd);
        let e = self.reap(q);
        assert_eq!(e.cid, cid);
        assert_eq!(e.sq_id, q.qid);
        e
    }
}

fn dummy_qp() -> Qp {
    Qp {
        qid: 0,
        sq: 0,
        cq: 0,
        size: 1,
        tail: 0,
        head: 0,
        phase: true,
        cid: 0,
    }
}

fn bytes(addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: `addr` is a live test allocation of at least `len` bytes, not being written now.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

fn fill(addr: u64, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    // SAFETY: `addr` is a live test allocation of at least `len` bytes owned by the test.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, len) };
}

fn put_u64s(addr: u64, vals: &[u64]) {
    // SAFETY: the list page is a live test allocation large enough for `vals`.
    unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), addr as *mut u64, vals.len()) };
}

fn st(sct: u8, sc: u8) -> Status {
    Status::new(sct, sc).with_dnr(true)
}

#[test]
fn registers_after_start() {
    let h = Host::new(SimConfig::default());
    let cap = spec::Cap(h.reg(reg::CAP) as u64 | (h.reg(reg::CAP + 4) as u64) << 32);
    assert_eq!(cap.mqes(), 1023);
    assert!(cap.cqr());
    assert_eq!(cap.to(), 10);
    assert_eq!(cap.dstrd(), 0);
    assert!(cap.supports_nvm_command_set());
    assert_eq!((cap.mpsmin(), cap.mpsmax()), (0, 4));
    assert_eq!(spec::Vs(h.reg(reg::VS)), spec::Vs::V1_4);
    let (p, len) = h.sim.bar();
    assert_eq!(p as usize % 4096, 0);
    assert!(len >= 0x1000 + 2 * 65 * 4);
}

#[test]
fn identify() {
    let mut h = Host::new(SimConfig::parse("ns=2,ns2bs=4096,size=64M").unwrap());
    let buf = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(buf));
    let c = IdentifyController::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!(c.vid, SIM_VID);
    assert_eq!(c.model(), "rio software NVMe controller");
    assert_eq!(c.serial(), "RIOSIM0001");
    assert_eq!(c.mdts, 5);
    assert_eq!(c.mdts_bytes(4096), Some(128 << 10));
    assert_eq!((c.sqes, c.cqes, c.nn), (0x66, 0x44, 2));
    assert!(c.supports_dbbuf() && c.supports_dsm() && c.supports_write_zeroes());
    assert!(c.volatile_write_cache());
    assert!(!c.supports_sgl());
    assert_eq!(c.version(), spec::Vs::V1_4);

    h.admin_ok(SubmissionEntry::identify_namespace(2, buf));
    let n = IdentifyNamespace::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!(
        (n.block_size(), n.nsze, n.size_bytes()),
        (4096, 16384, 64 << 20)
    );
    h.admin_ok(SubmissionEntry::identify_namespace(1, buf));
    let n = IdentifyNamespace::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!((n.block_size(), n.nsze), (512, 131072));
    let e = h.admin(SubmissionEntry::identify_namespace(3, buf));
    assert_eq!(e.status(), st(0, 0x0B));

    h.admin_ok(SubmissionEntry::identify_active_ns_list(0, buf));
    assert_eq!(spec::parse_ns_list(&bytes(buf, 4096)), vec![1, 2]);
    h.admin_ok(SubmissionEntry::identify_active_ns_list(1, buf));
    assert_eq!(spec::parse_ns_list(&bytes(buf, 4096)), vec![2]);

    let e = h.admin(SubmissionEntry::new(0xC5));
    assert_eq!(e.status(), st(0, 0x01));
}

#[test]
fn features_and_queue_errors() {
    let mut h = Host::new(SimConfig {
        max_io_queues: 4,
        ..SimConfig::default()
    });
    let dw0 = h.admin_ok(SubmissionEntry::set_num_queues(16, 2));
    assert_eq!(spec::decode_num_queues(dw0), (4, 2));
    assert_eq!(
        spec::decode_num_queues(h.admin_ok(SubmissionEntry::get_num_queues())),
        (4, 2)
    );
    h.admin_ok(SubmissionEntry::set_features(
        spec::feature::VOLATILE_WRITE_CACHE,
        0,
        false,
    ));
    let g = SubmissionEntry::get_features(spec::feature::VOLATILE_WRITE_CACHE, 0, 0);
    assert_eq!(h.admin_ok(g), 0);
    let e = h.admin(SubmissionEntry::set_features(0x7F, 0, false));
    assert_eq!(e.status(), st(0, 0x02));

    let mem = h.alloc(1 << 16);
    // qid beyond the granted CQ count
    let e = h.admin(SubmissionEntry::create_io_cq(3, 16, mem, true, None));
    assert_eq!(e.status(), st(1, 0x01));
    // PC = 0
    let e = h.admin(SubmissionEntry::create_io_cq(1, 16, mem, false, None));
    assert_eq!(e.status(), st(0, 0x02));
    // too big
    let e = h.admin(SubmissionEntry::create_io_cq(1, 2048, mem, true, None));
    assert_eq!(e.status(), st(1, 0x02));
    // SQ without its CQ
    let e = h.admin(SubmissionEntry::create_io_sq(
        1,
        16,
        mem,
        1,
        true,
        spec::QueuePriority::Medium,
    ));
    assert_eq!(e.status(), st(1, 0x00));
    let _q = h.create_qp(1, 16);
    // qid in use
    let e = h.admin(SubmissionEntry::create_io_cq(1, 16, mem, true, None));
    assert_eq!(e.status(), st(1, 0x01));
    // Number of Queues after queues exist
    let e = h.admin(SubmissionEntry::set_num_queues(2, 2));
    assert_eq!(e.status(), st(0, 0x0C));
    // CQ still used by SQ 1
    let e = h.admin(SubmissionEntry::delete_io_cq(1));
    assert_eq!(e.status(), st(1, 0x0C));
    h.admin_ok(SubmissionEntry::delete_io_sq(1));
    h.admin_ok(SubmissionEntry::delete_io_cq(1));
    let e = h.admin(SubmissionEntry::delete_io_sq(1));
    assert_eq!(e.status(), st(1, 0x01));
}

/// Builds a buffer and its PRPs: (host, offset, len) -> (buffer, prp1, prp2).
type PrpBuilder = dyn Fn(&mut Host, u64, usize) -> (u64, u64, u64);

fn rw_roundtrip(h: &mut Host, q: &mut Qp, slba: u64, len: usize, prp: &PrpBuilder) {
    let (wbuf, wp1, wp2) = prp(h, 0, len);
    fill(wbuf, len, slba as u8);
    let nlb = (len / 512) as u32;
    let e = h.io(q, SubmissionEntry::write(1, slba, nlb, wp1, wp2));
    assert!(e.status().is_success(), "write {len}: {}", e.status());
    let (rbuf, rp1, rp2) = prp(h, 0, len);
    let e = h.io(q, SubmissionEntry::read(1, slba, nlb, rp1, rp2));
    assert!(e.status().is_success(), "read {len}: {}", e.status());
    let w = bytes(wbuf, len);
    assert!(bytes(rbuf, len) == w, "data mismatch for {len} bytes");
    assert!(h.sim.namespace_data(1, slba * 512, len) == w);
}

/// Allocates a contiguous buffer of `len` bytes starting `off` bytes into a page and builds its
/// PRP1/PRP2 (with chained list pages when needed). Returns (buffer, prp1, prp2).
fn build_prps(h: &mut Host, off: u64, len: usize) -> (u64, u64, u64) {
    const PS: u64 = 4096;
    let base = h.alloc(len + off as usize + 4096);
    let buf = base + off;
    let first = (PS - off).min(len as u64);
    let mut pages = Vec::new();
    let mut a = base + PS;
    let mut rem = len as u64 - first;
    while rem > 0 {
        pages.push(a);
        a += PS;
        rem = rem.saturating_sub(PS);
    }
    let prp2 = match pages.len() {
        0 => 0,
        1 => pages[0],
        _ => {
            // 511 data entries + chain pointer per full list page.
            let nlists = pages.len().div_ceil(511);
            let lists = h.alloc(nlists * 4096);
            let mut idx = 0;
            for l in 0..nlists {
                let page = lists + l as u64 * 4096;
                let left = pages.len() - idx;
                if left <= 512 {
                    put_u64s(page, &pages[idx..]);
                    break;
                }
                let mut ents: Vec<u64> = pages[idx..idx + 511].to_vec();
                ents.push(page + 4096);
                put_u64s(page, &ents);
                idx += 511;
            }
            lists
        }
    };
    (buf, buf, prp2)
}

#[test]
fn read_write_prp_forms() {
    let mut h = Host::new(SimConfig::parse("mdts=0,size=64M").unwrap());
    let mut q = h.create_qp(1, 64);
    // PRP1 only, page aligned and with an in-page offset
    rw_roundtrip(&mut h, &mut q, 0, 4096, &|h, _, l| build_prps(h, 0, l));
    rw_roundtrip(&mut h, &mut q, 8, 1024, &|h, _, l| build_prps(h, 512, l));
    // PRP1 + PRP2 (offset buffer crossing one page boundary, and two whole pages)
    rw_roundtrip(&mut h, &mut q, 16, 4096, &|h, _, l| build_prps(h, 2048, l));
    rw_roundtrip(&mut h, &mut q, 32, 8192, &|h, _, l| build_prps(h, 0, l));
    // PRP list
    rw_roundtrip(&mut h, &mut q, 64, 64 << 10, &|h, _, l| build_prps(h, 0, l));
    rw_roundtrip(&mut h, &mut q, 256, 60 << 10, &|h, _, l| {
        build_prps(h, 1024, l)
    });
    // exactly 512 list entries (fits one list page), and chained lists (> 512 entries)
    rw_roundtrip(&mut h, &mut q, 1024, 513 * 4096, &|h, _, l| {
        build_prps(h, 0, l)
    });
    rw_roundtrip(&mut h, &mut q, 8192, 3 << 20, &|h, _, l| {
        build_prps(h, 0, l)
    });
    rw_roundtrip(&mut h, &mut q, 16384, 32 << 20, &|h, _, l| {
        build_prps(h, 0, l)
    });
    let s = h.sim.stats();
    assert_eq!(s.write_cmds, 9);
    assert_eq!(s.read_cmds, 9);
    assert_eq!(s.bytes_read, s.bytes_written);

    // Misaligned second entry -> PRP Offset Invalid.
    let buf = h.alloc(3 * 4096);
    let e = h.io(&mut q, SubmissionEntry::read(1, 0, 16, buf, buf + 4096 + 8));
    assert_eq!(e.status(), st(0, 0x13));
    // Zero PRP1 -> Data Transfer Error.
    let e = h.io(&mut q, SubmissionEntry::read(1, 0, 1, 0, 0));
    assert_eq!(e.status(), st(0, 0x04));
}

#[test]
fn command_checks() {
    let mut h = Host::new(SimConfig::parse("size=1M").unwrap());
    let mut q = h.create_qp(1, 16);
    let buf = h.alloc(1 << 20);
    // 256 KiB > MDTS 128 KiB
    let e = h.io(&mut q, SubmissionEntry::read(1, 0, 512, buf, buf + 4096));
    assert_eq!(e.status(), st(0, 0x02));
    assert!(e.status().dnr());
    // out of range (1 MiB = 2048 blocks)
    let e = h.io(&mut q, SubmissionEntry::read(1, 2047, 2, buf, buf + 4096));
    assert_eq!(e.status(), st(0, 0x80));
    let e = h.io(&mut q, SubmissionEntry::read(1, u64::MAX, 1, buf, 0));
    assert_eq!(e.status(), st(0, 0x80));
    // bad namespace
    let e = h.io(&mut q, SubmissionEntry::read(2, 0, 1, buf, 0));
    assert_eq!(e.status(), st(0, 0x0B));
    let e = h.io(&mut q, SubmissionEntry::read(0, 0, 1, buf, 0));
    assert_eq!(e.status(), st(0, 0x0B));
    // flush, unknown opcode
    assert!(
        h.io(&mut q, SubmissionEntry::flush(1))
            .status()
            .is_success()
    );
    assert!(
        h.io(&mut q, SubmissionEntry::flush(spec::NSID_ALL))
            .status()
            .is_success()
    );
    let e = h.io(
        &mut q,
        SubmissionEntry::new(io_opcode::COMPARE).with_nsid(1),
    );
    assert_eq!(e.status(), st(0, 0x01));
    // last block is fine
    let e = h.io(&mut q, SubmissionEntry::write(1, 2047, 1, buf, 0));
    assert!(e.status().is_success());
    assert_eq!(h.sim.stats().other_io_cmds, 1);
}

#[test]
fn write_zeroes_and_deallocate() {
    let mut h = Host::new(SimConfig::parse("size=16M,bs=4096").unwrap());
    let mut q = h.create_qp(1, 16);
    let buf = h.alloc(64 << 10);
    fill(buf, 64 << 10, 7);
    let (b, p1, p2) = build_prps(&mut h, 0, 64 << 10);
    fill(b, 64 << 10, 9);
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, 0, 16, p1, p2))
            .status()
            .is_success()
    );
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, 100, 16, p1, p2))
            .status()
            .is_success()
    );
    assert!(h.sim.namespace_data(1, 4096, 4096).iter().any(|&x| x != 0));
    // Write Zeroes blocks 1..3
    let e = h.io(&mut q, SubmissionEntry::write_zeroes(1, 1, 2, true));
    assert!(e.status().is_success());
    assert!(h.sim.namespace_data(1, 4096, 8192).iter().all(|&x| x == 0));
    assert!(h.sim.namespace_data(1, 0, 4096).iter().any(|&x| x != 0));
    assert!(
        h.sim
            .namespace_data(1, 3 * 4096, 4096)
            .iter()
            .any(|&x| x != 0)
    );
    // DSM deallocate two ranges; one out of range fails the whole command
    let ranges = h.alloc(4096);
    let r = [DsmRange::new(5, 3), DsmRange::new(100, 16)];
    let raw: Vec<u8> = r.iter().flat_map(|x| *x.as_bytes()).collect();
    // SAFETY: `ranges` is a live 4 KiB test page.
    unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), ranges as *mut u8, raw.len()) };
    let e = h.io(&mut q, SubmissionEntry::deallocate(1, 2, ranges));
    assert!(e.status().is_success());
    assert!(
        h.sim
            .namespace_data(1, 5 * 4096, 3 * 4096)
            .iter()
            .all(|&x| x == 0)
    );
    assert!(
        h.sim
            .namespace_data(1, 100 * 4096, 16 * 4096)
            .iter()
            .all(|&x| x == 0)
    );
    assert!(
        h.sim
            .namespace_data(1, 4 * 4096, 4096)
            .iter()
            .any(|&x| x != 0)
    );
    let bad = DsmRange::new(4095, 2);
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(bad.as_bytes().as_ptr(), ranges as *mut u8, 16) };
    let e = h.io(&mut q, SubmissionEntry::deallocate(1, 1, ranges));
    assert_eq!(e.status(), st(0, 0x80));
    let s = h.sim.stats();
    assert_eq!((s.write_zeroes_cmds, s.dsm_cmds), (1, 2));
}

#[test]
fn queue_wrap_and_phase() {
    let mut h = Host::new(SimConfig::default());
    let mut q = h.create_qp(1, 4);
    let buf = h.alloc(4096);
    let mut flips = 0;
    let mut last_phase = true;
    for i in 0..100u64 {
        let cid = h.push(&mut q, SubmissionEntry::write(1, i, 1, buf, 0));
        let e = h.reap(&mut q);
        assert_eq!(e.cid, cid);
        assert!(e.status().is_success());
        assert_eq!(
            e.sq_head as u32, q.tail,
            "sq_head is the head after consuming"
        );
        if e.phase() != last_phase {
            flips += 1;
            last_phase = e.phase();
        }
    }
    assert_eq!(flips, 24); // 100 entries over a 4-entry ring
    // Pipelined: 3 outstanding at a time (a 4-entry queue holds 3).
    for _ in 0..20 {
        let mut cids = vec![];
        for k in 0..3 {
            cids.push(h.push(&mut q, SubmissionEntry::read(1, k, 1, buf, 0)));
        }
        for cid in cids {
            assert_eq!(h.reap(&mut q).cid, cid);
        }
    }
    assert!(h.sim.stats().max_inflight >= 1);
}

#[test]
fn full_cq_holds_completions() {
    let mut h = Host::new(SimConfig::default());
    // SQ of 16 entries on a CQ of 4: the model may post only 3 before the head moves.
    let cq = h.alloc(4096);
    let sq = h.alloc(4096);
    h.admin_ok(SubmissionEntry::create_io_cq(1, 4, cq, true, None));
    h.admin_ok(SubmissionEntry::create_io_sq(
        1,
        16,
        sq,
        1,
        true,
        spec::QueuePriority::Medium,
    ));
    let mut sqp = Qp {
        qid: 1,
        sq,
        cq: 0,
        size: 16,
        tail: 0,
        head: 0,
        phase: true,
        cid: 0,
    };
    let mut cqp = Qp {
        qid: 1,
        sq: 0,
        cq,
        size: 4,
        tail: 0,
        head: 0,
        phase: true,
        cid: 0,
    };
    let buf = h.alloc(4096);
    for i in 0..8 {
        h.push(&mut sqp, SubmissionEntry::read(1, i, 1, buf, 0));
    }
    std::thread::sleep(Duration::from_millis(20));
    // Only 3 entries were written: slot 3 still has phase 0.
    // SAFETY: live CQ page.
    let st3 =
        unsafe { AtomicU16::from_ptr((cq + 3 * 16 + 14) as *mut u16) }.load(Ordering::Acquire);
    assert_eq!(st3 & 1, 0);
    let mut got = vec![];
    for _ in 0..8 {
        got.push(h.reap(&mut cqp).cid);
    }
    assert_eq!(got, (0..8).collect::<Vec<u16>>());
}

#[test]
fn shadow_doorbells() {
    let mut h = Host::new(SimConfig::default());
    let shadow = h.alloc(4096);
    let ei = h.alloc(4096);
    h.admin_ok(SubmissionEntry::doorbell_buffer_config(shadow, ei));
    h.dbbuf = Some((shadow, ei));
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    fill(buf, 4096, 3);
    // 20 commands through an 8-entry ring; the MMIO doorbell is written only when EventIdx
    // asks for it (here: each time, as the model has caught up between commands).
    for i in 0..20 {
        let e = h.io(&mut q, SubmissionEntry::write(1, i, 8, buf, 0));
        assert!(e.status().is_success());
    }
    assert!(h.mmio_rings.get() >= 1);
    assert_eq!(h.sim.namespace_data(1, 19 * 512, 4096), bytes(buf, 4096));
    // EventIdx follows the consumed tail.
    let sqi = spec::shadow_sq_tail_index(1, 0) as u64 * 4;
    // SAFETY: live EventIdx page, accessed atomically.
    let ev = unsafe { AtomicU32::from_ptr((ei + sqi) as *mut u32) }.load(Ordering::Acquire);
    assert_eq!(ev, q.tail);
    // Admin queue still uses MMIO doorbells (checked by `admin` working at all).
    h.admin_ok(SubmissionEntry::get_num_queues());
    // Without OACS bit 8 the command is unknown.
    let mut h2 = Host::new(SimConfig::parse("dbbuf=0").unwrap());
    let e = h2.admin(SubmissionEntry::doorbell_buffer_config(shadow, ei));
    assert_eq!(e.status(), st(0, 0x01));
}

#[test]
fn reset_drops_queues() {
    let mut h = Host::new(SimConfig::default());
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    h.disable();
    assert_eq!(h.sim.stats().resets, 1);
    assert_eq!(h.reg(spec::sq_tail_doorbell(1, 0)), 0);
    assert_eq!(h.reg(spec::cq_head_doorbell(0, 0)), 0);
    h.enable();
    // qid 1 is free again, and works from scratch.
    let mut q = h.create_qp(1, 8);
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    // shutdown notification
    h.set_reg(
        reg::CC,
        Cc::nvm_default(0)
            .with_enable(true)
            .with_shn(Cc::SHN_NORMAL)
            .0,
    );
    h.wait_csts(|c| c.shutdown_complete());
}

#[test]
fn invalid_enable_sets_cfs() {
    let sim = SimController::start(SimConfig::default()).unwrap();
    let (p, _) = sim.bar();
    // SAFETY: BAR words, accessed atomically.
    let w = |off: usize| unsafe { AtomicU32::from_ptr(p.add(off).cast::<u32>()) };
    w(reg::AQA).store(0x001F_001F, Ordering::Release);
    w(reg::CC).store(Cc::nvm_default(0).with_enable(true).0, Ordering::Release); // ASQ = 0
    let t = Instant::now();
    while !Csts(w(reg::CSTS).load(Ordering::Acquire)).cfs() {
        assert!(t.elapsed() < WAIT);
        std::thread::yield_now();
    }
    w(reg::CC).store(0, Ordering::Release);
    while Csts(w(reg::CSTS).load(Ordering::Acquire)).cfs() {
        assert!(t.elapsed() < WAIT);
        std::thread::yield_now();
    }
}

#[test]
fn delete_sq_aborts_outstanding() {
    let mut h = Host::new(SimConfig {
        faults: vec![Fault::DropCompletion {
            admin: false,
            opcode: io_opcode::WRITE,
            nth: 0,
        }],
        latency: Latency::Fixed(Duration::from_secs(3)),
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    let w = h.push(&mut q, SubmissionEntry::write(1, 0, 1, buf, 0));
    let r = h.push(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0)); // timed, 3 s
    std::thread::sleep(Duration::from_millis(20));
    assert!(h.try_reap(&mut q, Duration::from_millis(10)).is_none());
    h.admin_ok(SubmissionEntry::delete_io_sq(1));
    let mut got = [h.reap(&mut q), h.reap(&mut q)];
    got.sort_by_key(|e| e.cid);
    assert_eq!((got[0].cid, got[1].cid), (w, r));
    for e in got {
        assert_eq!(e.status(), st(0, 0x08));
    }
    h.admin_ok(SubmissionEntry::delete_io_cq(1));
}

#[test]
fn fault_error_status() {
    let injected = Status::new(2, 0x81); // Unrecovered Read Error
    let mut h = Host::new(SimConfig {
        faults: vec![
            Fault::ErrorStatus {
                admin: false,
                opcode: io_opcode::READ,
                nth: 2,
                status: injected,
            },
            Fault::ErrorStatus {
                admin: true,
                opcode: admin_opcode::GET_FEATURES,
                nth: 0,
                status: Status::new(0, 0x06),
            },
        ],
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    let st_of = |h: &Host, q: &mut Qp| h.io(q, SubmissionEntry::read(1, 0, 1, buf, 0)).status();
    assert!(st_of(&h, &mut q).is_success());
    assert_eq!(st_of(&h, &mut q), injected);
    assert!(st_of(&h, &mut q).is_success());
    for _ in 0..2 {
        let e = h.admin(SubmissionEntry::get_num_queues());
        assert_eq!(e.status(), Status::new(0, 0x06));
    }
    assert_eq!(h.sim.stats().faults_injected, 3);
    // The error log records them, newest first.
    let log = h.alloc(4096);
    h.admin_ok(SubmissionEntry::get_error_log(4, log, 0));
    let e0 = spec::ErrorLogEntry::from_prefix(&bytes(log, 64)).unwrap();
    assert_eq!((e0.error_count, e0.sqid), (3, 0));
    let e2 = spec::ErrorLogEntry::from_prefix(&bytes(log + 128, 64)).unwrap();
    assert_eq!((e2.error_count, e2.sqid, e2.status()), (1, 1, injected));
}

#[test]
fn fault_drop_then_abort() {
    let mut h = Host::new(SimConfig {
        faults: vec![
            Fault::DropCompletion {
                admin: false,
                opcode: io_opcode::READ,
                nth: 1,
            },
            Fault::DropCompletion {
                admin: true,
                opcode: admin_opcode::KEEP_ALIVE,
                nth: 1,
            },
        ],
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    let cid = h.push(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0));
    assert!(h.try_reap(&mut q, Duration::from_millis(50)).is_none());
    // later commands still work
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    // Abort of an unknown cid: not aborted.
    assert_eq!(h.admin_ok(SubmissionEntry::abort(1, 0x7777)), 1);
    assert_eq!(h.admin_ok(SubmissionEntry::abort(1, cid)), 0);
    let e = h.reap(&mut q);
    assert_eq!((e.cid, e.status()), (cid, st(0, 0x07)));
    assert_eq!(h.sim.stats().aborts_honoured, 1);

    // A dropped admin command, aborted from the same admin queue.
    let mut aq = std::mem::replace(&mut h.admin, dummy_qp());
    let ka = h.push(&mut aq, SubmissionEntry::new(admin_opcode::KEEP_ALIVE));
    assert!(h.try_reap(&mut aq, Duration::from_millis(50)).is_none());
    let ab = h.push(&mut aq, SubmissionEntry::abort(0, ka));
    let mut got = [h.reap(&mut aq), h.reap(&mut aq)];
    got.sort_by_key(|e| e.cid);
    assert_eq!((got[0].cid, got[0].status()), (ka, st(0, 0x07)));
    assert_eq!((got[1].cid, got[1].dw0), (ab, 0));
    h.admin = aq;
}

#[test]
fn fault_bad_and_stale_cid() {
    let mut h = Host::new(SimConfig {
        faults: vec![Fault::BadCid { nth: 2 }, Fault::StaleCid { nth: 3 }],
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    let c2 = h.push(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0));
    let e = h.reap(&mut q);
    assert_eq!(e.cid, 0xFFFF);
    let c3 = h.push(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0));
    let (a, b) = (h.reap(&mut q), h.reap(&mut q));
    assert_eq!((a.cid, b.cid), (c3, c3));
    assert!(a.status().is_success() && b.status().is_success());
    assert_eq!(h.admin_ok(SubmissionEntry::abort(1, c2)), 0);
    let e = h.reap(&mut q);
    assert_eq!((e.cid, e.status()), (c2, st(0, 0x07)));
    assert_eq!(h.sim.stats().faults_injected, 2);
}

#[test]
fn fault_ignore_abort_needs_reset() {
    let mut h = Host::new(SimConfig {
        faults: vec![
            Fault::DropCompletion {
                admin: false,
                opcode: io_opcode::WRITE,
                nth: 1,
            },
            Fault::IgnoreAbort,
        ],
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    let cid = h.push(&mut q, SubmissionEntry::write(1, 0, 1, buf, 0));
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(h.admin_ok(SubmissionEntry::abort(1, cid)), 1);
    assert!(h.try_reap(&mut q, Duration::from_millis(50)).is_none());
    h.disable();
    h.enable();
    let mut q = h.create_qp(1, 8);
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    assert!(h.try_reap(&mut q, Duration::from_millis(20)).is_none());
    assert_eq!(h.sim.stats().aborts_honoured, 0);
}

#[test]
fn fault_fatal() {
    let mut h = Host::new(SimConfig {
        faults: vec![Fault::Fatal { after_io: 3 }],
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    for _ in 0..3 {
        assert!(
            h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
                .status()
                .is_success()
        );
    }
    h.wait_csts(|c| c.cfs());
    h.push(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0));
    assert!(h.try_reap(&mut q, Duration::from_millis(50)).is_none());
    h.disable();
    assert!(!Csts(h.reg(reg::CSTS)).cfs());
    h.enable();
    let mut q = h.create_qp(1, 8);
    for _ in 0..5 {
        assert!(
            h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
                .status()
                .is_success()
        );
    }
}

#[test]
fn latency_fixed_and_knee() {
    let mut h = Host::new(SimConfig::parse("lat=5ms").unwrap());
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    let t = Instant::now();
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    assert!(t.elapsed() >= Duration::from_millis(5));

    let mut h = Host::new(SimConfig::parse("knee=1,base=1ms,per_qd=4ms").unwrap());
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    let t = Instant::now();
    for _ in 0..3 {
        h.push(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0));
    }
    for _ in 0..3 {
        assert!(h.reap(&mut q).status().is_success());
    }
    // the third command saw 3 in flight: 1 ms + (3 - 1) * 4 ms
    assert!(t.elapsed() >= Duration::from_millis(9));
}

#[test]
fn smart_log_counts() {
    let mut h = Host::new(SimConfig::default());
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(64 << 10);
    let (_, p1, p2) = build_prps(&mut h, 0, 64 << 10);
    for _ in 0..10 {
        assert!(
            h.io(&mut q, SubmissionEntry::write(1, 0, 128, p1, p2))
                .status()
                .is_success()
        );
    }
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0))
            .status()
            .is_success()
    );
    let log = h.alloc(4096);
    h.admin_ok(SubmissionEntry::get_smart_log(spec::NSID_ALL, log));
    let s = SmartLog::from_prefix(&bytes(log, 512)).unwrap();
    assert_eq!(s.temperature_kelvin(), 310);
    assert_eq!(s.host_write_commands(), 10);
    assert_eq!(s.host_read_commands(), 1);
    assert_eq!(s.data_units_written(), 2); // 1280 units of 512 B -> 2 thousands (rounded up)
    assert_eq!(s.data_units_read(), 1);
    let e = h.admin(SubmissionEntry::get_log_page(0x70, 0, 512, 0, log, 0));
    assert_eq!(e.status(), st(1, 0x09));
}

#[test]
fn no_data_mode_moves_nothing() {
    let mut h = Host::new(SimConfig::parse("data=0,size=64G").unwrap());
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    fill(buf, 4096, 1);
    let before = bytes(buf, 4096);
    let last = (64u64 << 30) / 512 - 8;
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, last, 8, buf, 0))
            .status()
            .is_success()
    );
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, last, 8, buf, 0))
            .status()
            .is_success()
    );
    assert_eq!(bytes(buf, 4096), before);
    assert!(h.sim.namespace_data(1, 0, 16).iter().all(|&b| b == 0));
    assert_eq!(h.sim.stats().bytes_read, 4096);
}

#[test]
fn big_lazy_namespace() {
    let mut h = Host::new(SimConfig::parse("size=64G,bs=4096").unwrap());
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    fill(buf, 4096, 5);
    let last = (64u64 << 30) / 4096 - 1;
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, last, 1, buf, 0))
            .status()
            .is_success()
    );
    assert_eq!(h.sim.namespace_data(1, last * 4096, 4096), bytes(buf, 4096));
}

#[test]
fn ready_delay() {
    let cfg = SimConfig {
        ready_delay: Duration::from_millis(30),
        ..SimConfig::default()
    };
    let t = Instant::now();
    let h = Host::new(cfg);
    assert!(t.elapsed() >= Duration::from_millis(30));
    drop(h);
}

#[test]
fn throughput_smoke() {
    // Not a benchmark: checks that a pipelined loop runs without loss on a small ring.
    let mut h = Host::new(SimConfig::parse("data=0").unwrap());
    let mut q = h.create_qp(1, 64);
    let buf = h.alloc(4096);
    let n = 20_000u32;
    let mut sent = 0;
    let mut done = 0;
    let mut outstanding = 0;
    while done < n {
        while outstanding < 32 && sent < n {
            h.push(
                &mut q,
                SubmissionEntry::read(1, (sent % 1000) as u64 * 8, 8, buf, 0),
            );
            sent += 1;
            outstanding += 1;
        }
        assert!(h.reap(&mut q).status().is_success());
        done += 1;
        outstanding -= 1;
    }
    let s = h.sim.stats();
    assert_eq!(s.read_cmds, n as u64);
    // Inline completion: a command leaves the model as soon as it is fetched.
    assert_eq!(s.max_inflight, 1);
}

#[test]
fn parse_good() {
    assert_eq!(SimConfig::parse("").unwrap(), SimConfig::default());
    let c = SimConfig::parse(
        "sim://size=4G,bs=4096&ns=3,ns2bs=512,lat=10us,mdts=0,mqes=255,qpairs=8,data=0,dbbuf=0",
    )
    .unwrap();
    assert_eq!(c.namespaces.len(), 3);
    assert_eq!(
        c.namespaces[1],
        SimNamespace {
            block_size: 512,
            size_bytes: 4 << 30
        }
    );
    assert_eq!(c.namespaces[2].block_size, 4096);
    assert_eq!(c.latency, Latency::Fixed(Duration::from_micros(10)));
    assert_eq!((c.mdts, c.mqes, c.max_io_queues), (0, 255, 8));
    assert!(!c.store_data && !c.dbbuf);
    let c = SimConfig::parse("knee=8,base=20us,per_qd=5us,size=512k").unwrap();
    assert_eq!(
        c.latency,
        Latency::Knee {
            base: Duration::from_micros(20),
            knee_qd: 8,
            per_qd: Duration::from_micros(5)
        }
    );
    assert_eq!(c.namespaces[0].size_bytes, 512 << 10);
    let c = SimConfig::parse("knee=8,per_qd=5us,change_after=3s,knee2=4,per_qd2=10us").unwrap();
    assert_eq!(
        c.latency_change,
        Some((
            Duration::from_secs(3),
            Latency::Knee {
                base: Duration::ZERO,
                knee_qd: 4,
                per_qd: Duration::from_micros(10)
            }
        ))
    );
    assert_eq!(SimConfig::parse("lat=0").unwrap().latency, Latency::None);
    assert_eq!(
        SimConfig::parse("lat=2ms").unwrap().latency,
        Latency::Fixed(Duration::from_millis(2))
    );
    assert_eq!(
        SimConfig::parse("size=1T").unwrap().namespaces[0].size_bytes,
        1 << 40
    );
    assert_eq!(
        SimConfig::parse("size=3GiB").unwrap().namespaces[0].size_bytes,
        3 << 30
    );
    assert!(SimConfig::parse("inline=1").unwrap().inline);
    assert!(!SimConfig::parse("size=1M").unwrap().inline);
    assert_eq!(SimConfig::parse("cpu=1").unwrap().cpu, Some(1));
}

#[test]
fn parse_bad() {
    for (spec, word) in [
        ("bogus=1", "bogus"),
        ("size=abc", "size"),
        ("size=1X", "size"),
        ("bs=1024", "bs"),
        ("ns=0", "ns"),
        ("ns=2,ns3bs=512", "ns3bs"),
        ("lat=10", "lat"),
        ("lat=fast", "lat"),
        ("knee=8", "per_qd"),
        ("per_qd=5us", "knee"),
        ("lat=1ms,knee=2,per_qd=1us", "knee"),
        ("knee2=4", "change_after"),
        ("change_after=1s,knee2=4", "per_qd2"),
        ("mdts=99", "mdts"),
        ("mqes=0", "mqes"),
        ("qpairs=0", "qpairs"),
        ("data=2", "data"),
        ("dbbuf=maybe", "dbbuf"),
        ("size", "size"),
        ("size=1G,size=2G", "size"),
        ("size=1000,bs=4096", "size"),
    ] {
        let e = SimConfig::parse(spec).expect_err(spec);
        assert!(e.contains(word), "{spec}: {e}");
        assert!(!e.contains('\n'));
    }
}

#[test]
fn start_refuses_bad_config() {
    for bad in [
        SimConfig {
            dstrd: 16,
            ..SimConfig::default()
        },
        SimConfig {
            bar_bytes: Some(0x1004),
            ..SimConfig::default()
        },
        SimConfig {
            // Admin doorbells at 0x1000 and 0x1000 + (4 << 4).
            dstrd: 4,
            bar_bytes: Some(0x1008),
            ..SimConfig::default()
        },
        SimConfig {
            dstrd: 15,
            max_io_queues: 65534,
            ..SimConfig::default()
        },
        SimConfig {
            faults: vec![Fault::Transient {
                opcode: io_opcode::READ,
                nth: 0,
                times: 1,
                status: Status::new(0, 0x06),
            }],
            ..SimConfig::default()
        },
    ] {
        assert!(SimController::start(bad.clone()).is_err(), "{bad:?}");
    }
    let bad = SimConfig {
        namespaces: vec![SimNamespace {
            block_size: 1024,
            size_bytes: 1 << 20,
        }],
        ..SimConfig::default()
    };
    assert!(SimController::start(bad).is_err());
}

// ----- SGLs ----------------------------------------------------------------------------------

fn put_bytes(addr: u64, data: &[u8]) {
    // SAFETY: `addr` is a live test allocation with room for `data`, not in use by the model.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

fn put_sgl(addr: u64, descs: &[SglDescriptor]) {
    let raw: Vec<u8> = descs.iter().flat_map(|d| *d.as_bytes()).collect();
    put_bytes(addr, &raw);
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Copies `data` into the host pieces of an SGL, in order.
fn scatter(pieces: &[(u64, usize)], data: &[u8]) {
    let mut o = 0;
    for &(a, n) in pieces {
        put_bytes(a, &data[o..o + n]);
        o += n;
    }
    assert_eq!(o, data.len());
}

/// The contents of the host pieces of an SGL, in order.
fn gather(pieces: &[(u64, usize)]) -> Vec<u8> {
    pieces.iter().flat_map(|&(a, n)| bytes(a, n)).collect()
}

/// An SGL for `len` (> 2000) bytes in three Data Blocks of odd lengths at unaligned addresses,
/// chained Segment -> [Data Block, Last Segment] -> [Data Block, Data Block], the lists at
/// unaligned addresses too. Returns SGL1 and the pieces.
fn sgl_chain(h: &mut Host, len: usize) -> (SglDescriptor, Vec<(u64, usize)>) {
    let a = h.alloc(len + 3 * 4096);
    let pieces = vec![
        (a + 3, 1001),
        (a + 4096 + 1, 999),
        (a + 2 * 4096 + 7, len - 2000),
    ];
    let lists = h.alloc(4096);
    let (l1, l2) = (lists + 8, lists + 260);
    put_sgl(
        l1,
        &[
            SglDescriptor::data_block(pieces[0].0, pieces[0].1 as u32),
            SglDescriptor::last_segment(l2, 2),
        ],
    );
    put_sgl(
        l2,
        &[
            SglDescriptor::data_block(pieces[1].0, pieces[1].1 as u32),
            SglDescriptor::data_block(pieces[2].0, pieces[2].1 as u32),
        ],
    );
    (SglDescriptor::segment(l1, 2), pieces)
}

#[test]
fn sgl_transfers_match_prps() {
    let mut h = Host::new(SimConfig::parse("sgl=1,size=16M").unwrap());
    let id = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(id));
    let c = IdentifyController::from_prefix(&bytes(id, 4096)).unwrap();
    assert_eq!(c.sgls, 1);
    assert!(c.supports_sgl() && !c.sgl_dword_aligned());
    let mut q = h.create_qp(1, 16);
    let len = 8192;
    let nlb = (len / 512) as u32;

    // Written through PRPs, read back through the SGL chain.
    let (wbuf, p1, p2) = build_prps(&mut h, 0, len);
    fill(wbuf, len, 0x11);
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, 0, nlb, p1, p2))
            .status()
            .is_success()
    );
    let (sgl, pieces) = sgl_chain(&mut h, len);
    let e = h.io(&mut q, SubmissionEntry::read(1, 0, nlb, 0, 0).with_sgl(sgl));
    assert!(e.status().is_success(), "{}", e.status());
    assert!(gather(&pieces) == bytes(wbuf, len));

    // The same data written through the SGL chain and through PRPs lands identically.
    let data = pattern(len, 0x42);
    scatter(&pieces, &data);
    let e = h.io(
        &mut q,
        SubmissionEntry::write(1, 100, nlb, 0, 0).with_sgl(sgl),
    );
    assert!(e.status().is_success(), "{}", e.status());
    put_bytes(wbuf, &data);
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, 200, nlb, p1, p2))
            .status()
            .is_success()
    );
    assert!(h.sim.namespace_data(1, 100 * 512, len) == data);
    assert!(h.sim.namespace_data(1, 200 * 512, len) == data);
    let (rbuf, r1, r2) = build_prps(&mut h, 0, len);
    assert!(
        h.io(&mut q, SubmissionEntry::read(1, 100, nlb, r1, r2))
            .status()
            .is_success()
    );
    assert!(bytes(rbuf, len) == data);

    // One Data Block in SGL1, unaligned.
    let buf = h.alloc(2 * 4096);
    put_bytes(buf + 5, &data[..1024]);
    let one = SglDescriptor::data_block(buf + 5, 1024);
    let e = h.io(
        &mut q,
        SubmissionEntry::write(1, 300, 2, 0, 0).with_sgl(one),
    );
    assert!(e.status().is_success());
    assert!(h.sim.namespace_data(1, 300 * 512, 1024) == data[..1024]);

    // A Segment list may end with a Segment: Segment -> [DB, Segment] -> [DB, Last Segment]
    // -> [DB], with zero-length Data Blocks in between.
    let lists = h.alloc(4096);
    let d = h.alloc(3 * 4096);
    let (l1, l2, l3) = (lists, lists + 512, lists + 1024);
    put_sgl(
        l1,
        &[
            SglDescriptor::data_block(d + 1, 511),
            SglDescriptor::segment(l2, 3),
        ],
    );
    put_sgl(
        l2,
        &[
            SglDescriptor::data_block(0, 0),
            SglDescriptor::data_block(d + 4096, 2048),
            SglDescriptor::last_segment(l3, 1),
        ],
    );
    put_sgl(l3, &[SglDescriptor::data_block(d + 8192 + 9, 1537)]);
    let pieces = [(d + 1, 511), (d + 4096, 2048), (d + 8192 + 9, 1537)];
    let e = h.io(
        &mut q,
        SubmissionEntry::read(1, 100, 8, 0, 0).with_sgl(SglDescriptor::segment(l1, 2)),
    );
    assert!(e.status().is_success(), "{}", e.status());
    assert!(gather(&pieces) == data[..4096]);

    // Dataset Management takes its ranges through an SGL too.
    let r = h.alloc(4096);
    put_bytes(r + 3, DsmRange::new(300, 2).as_bytes());
    let dsm = SubmissionEntry::deallocate(1, 1, 0).with_sgl(SglDescriptor::data_block(r + 3, 16));
    assert!(h.io(&mut q, dsm).status().is_success());
    assert!(
        h.sim
            .namespace_data(1, 300 * 512, 1024)
            .iter()
            .all(|&b| b == 0)
    );

    let s = h.sim.stats();
    assert_eq!(s.sgl_cmds, 5);
    assert_eq!(s.write_cmds, 4);
}

#[test]
fn sgl_errors_move_no_data() {
    let mut h = Host::new(SimConfig::parse("sgl=1,size=16M").unwrap());
    let mut q = h.create_qp(1, 16);
    let (wbuf, p1, p2) = build_prps(&mut h, 0, 4096);
    fill(wbuf, 4096, 0x5A);
    assert!(
        h.io(&mut q, SubmissionEntry::write(1, 0, 8, p1, p2))
            .status()
            .is_success()
    );
    let before = h.sim.namespace_data(1, 0, 4096);
    let buf = h.alloc(2 * 4096);
    let lists = h.alloc(32 * 4096);
    let db = SglDescriptor::data_block;
    let with_id = |d: SglDescriptor, id: u8| SglDescriptor { id, ..d };
    let l1 = lists + 4096;

    // (SGL1, what the list at `l1` holds, expected status)
    let mut cases: Vec<(SglDescriptor, Vec<SglDescriptor>, Status)> = vec![
        (db(buf, 4095), vec![], st(0, 0x0F)),
        (db(buf, 4097), vec![], st(0, 0x0F)),
        (with_id(db(buf, 4096), 0x10), vec![], st(0, 0x11)), // Bit Bucket
        (with_id(db(buf, 4096), 0x01), vec![], st(0, 0x11)), // subtype 1
        (with_id(db(buf, 4096), 0x50), vec![], st(0, 0x11)), // reserved type
        (db(0, 4096), vec![], st(0, 0x04)),
        (SglDescriptor::segment(l1, 0), vec![], st(0, 0x0E)),
        (
            SglDescriptor {
                len: 20,
                ..SglDescriptor::segment(l1, 1)
            },
            vec![],
            st(0, 0x0E),
        ),
        (
            SglDescriptor::last_segment(l1, 2),
            vec![db(buf, 2048), db(buf + 2048, 1000)],
            st(0, 0x0F),
        ),
        (
            SglDescriptor::last_segment(l1, 2),
            vec![db(buf, 2048), with_id(db(buf + 2048, 2048), 0x10)],
            st(0, 0x11),
        ),
        // A segment descriptor in a Last Segment list, or before the end of a Segment list.
        (
            SglDescriptor::last_segment(l1, 2),
            vec![db(buf, 2048), SglDescriptor::last_segment(l1 + 512, 1)],
            st(0, 0x0D),
        ),
        (
            SglDescriptor::segment(l1, 2),
            vec![SglDescriptor::last_segment(l1 + 512, 1), db(buf, 2048)],
            st(0, 0x0D),
        ),
        // A Segment that points at itself: bounded, never a hang.
        (
            SglDescriptor::segment(l1, 1),
            vec![SglDescriptor::segment(l1, 1)],
            st(0, 0x0E),
        ),
    ];
    // More descriptors than the model reads for one command.
    let mut many = vec![db(0, 0); 4096];
    many.push(db(buf, 4096));
    cases.push((SglDescriptor::last_segment(l1, 4097), many, st(0, 0x0E)));

    for (i, (sgl1, list, want)) in cases.iter().enumerate() {
        put_sgl(l1, list);
        put_bytes(buf, &[0xEE; 8192]);
        let e = h.io(
            &mut q,
            SubmissionEntry::write(1, 0, 8, 0, 0).with_sgl(*sgl1),
        );
        assert_eq!(e.status(), *want, "write case {i}");
        assert!(
            h.sim.namespace_data(1, 0, 4096) == before,
            "case {i} wrote data"
        );
        let e = h.io(&mut q, SubmissionEntry::read(1, 0, 8, 0, 0).with_sgl(*sgl1));
        assert_eq!(e.status(), *want, "read case {i}");
        assert!(
            bytes(buf, 8192).iter().all(|&b| b == 0xEE),
            "case {i} read data"
        );
    }

    // Exactly 4096 descriptors is fine.
    let mut most = vec![db(0, 0); 4095];
    most.push(db(buf, 4096));
    put_sgl(l1, &most);
    let e = h.io(
        &mut q,
        SubmissionEntry::write(1, 0, 8, 0, 0).with_sgl(SglDescriptor::last_segment(l1, 4096)),
    );
    assert!(e.status().is_success(), "{}", e.status());

    // PSDT 10b and 11b are Invalid Field.
    for psdt in [0x80u8, 0xC0] {
        let mut c = SubmissionEntry::read(1, 0, 8, 0, 0).with_sgl(db(buf, 4096));
        c.flags = (c.flags & 0x3F) | psdt;
        assert_eq!(h.io(&mut q, c).status(), st(0, 0x02));
    }
    // Admin commands take PRPs only.
    let mut c = SubmissionEntry::identify_controller(buf);
    c.flags |= 0x40;
    assert_eq!(h.admin(c).status(), st(0, 0x02));
    assert_eq!(h.sim.stats().sgl_cmds, 2 * cases.len() as u64 + 1);

    // Without SGL support, PSDT 01b is Invalid Field and Identify says no SGLs.
    let mut h = Host::new(SimConfig::parse("size=16M").unwrap());
    let mut q = h.create_qp(1, 16);
    let buf = h.alloc(4096);
    let e = h.io(
        &mut q,
        SubmissionEntry::read(1, 0, 8, 0, 0).with_sgl(db(buf, 4096)),
    );
    assert_eq!(e.status(), st(0, 0x02));
    h.admin_ok(SubmissionEntry::identify_controller(buf));
    let c = IdentifyController::from_prefix(&bytes(buf, 4096)).unwrap();
    assert!(!c.supports_sgl());
    assert_eq!(h.sim.stats().sgl_cmds, 0);
}

// ----- asynchronous events ---------------------------------------------------------------

fn smart_event(bit: u8) -> AsyncEvent {
    AsyncEvent {
        kind: async_event_type::SMART_HEALTH,
        info: bit,
        log_page: log_page::SMART_HEALTH,
    }
}

const NS_CHANGED: AsyncEvent = AsyncEvent {
    kind: async_event_type::NOTICE,
    info: async_event_notice::NS_ATTRIBUTE_CHANGED,
    log_page: log_page::CHANGED_NS_LIST,
};

const FW_ACTIVATION: AsyncEvent = AsyncEvent {
    kind: async_event_type::NOTICE,
    info: async_event_notice::FIRMWARE_ACTIVATION_STARTING,
    log_page: log_page::FIRMWARE_SLOT,
};

/// Reaps the completion of AER `cid`, which must report `want`.
fn expect_event(h: &mut Host, cid: u16, want: AsyncEvent) {
    let e = h.admin_reap(WAIT).expect("no event reported within 5 s");
    assert_eq!(e.cid, cid);
    assert!(e.status().is_success(), "{}", e.status());
    assert_eq!(AsyncEvent::from_dw0(e.dw0), want);
}

#[test]
fn async_events_wait_for_their_log_page() {
    let mut h = Host::new(SimConfig::default());
    let id = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(id));
    let c = IdentifyController::from_prefix(&bytes(id, 4096)).unwrap();
    assert!(c.oaes_ns_attribute() && c.oaes_firmware_activation());

    // Raised before any request: they wait for one.
    h.sim.raise_event(smart_event(1));
    h.sim.raise_event(smart_event(2));
    h.sim.raise_event(NS_CHANGED);
    std::thread::sleep(Duration::from_millis(10));
    let a1 = h.admin_push(SubmissionEntry::async_event_request());
    expect_event(&mut h, a1, smart_event(1));
    // The second SMART event waits for the SMART log; the notice goes ahead of it.
    let a2 = h.admin_push(SubmissionEntry::async_event_request());
    expect_event(&mut h, a2, NS_CHANGED);
    let a3 = h.admin_push(SubmissionEntry::async_event_request());
    assert!(h.admin_reap(Duration::from_millis(50)).is_none());
    // Reading another log, or the SMART log with RAE set, releases nothing.
    let log = h.alloc(4096);
    h.admin_ok(SubmissionEntry::get_firmware_slot_log(log));
    let mut rae = SubmissionEntry::get_smart_log(spec::NSID_ALL, log);
    rae.cdw10 |= 1 << 15;
    h.admin_ok(rae);
    assert!(h.admin_reap(Duration::from_millis(50)).is_none());
    // Reading it (any length) does, after the Get Log Page completes.
    let g = h.admin_push(SubmissionEntry::get_log_page(
        log_page::SMART_HEALTH,
        spec::NSID_ALL,
        4,
        0,
        log,
        0,
    ));
    let e = h.admin_reap(WAIT).unwrap();
    assert_eq!((e.cid, e.status()), (g, Status::SUCCESS));
    expect_event(&mut h, a3, smart_event(2));
    assert_eq!(h.sim.stats().events_reported, 3);

    // At most 4 outstanding requests.
    let mut aers = vec![];
    for _ in 0..5 {
        aers.push(h.admin_push(SubmissionEntry::async_event_request()));
    }
    let e = h.admin_reap(WAIT).unwrap();
    assert_eq!((e.cid, e.status()), (aers[4], st(1, 0x05)));
    // A reset discards outstanding requests, not queued events.
    h.disable();
    h.enable();
    // The SMART page's event was reported and never read: after the reset it may come again.
    h.sim.raise_event(smart_event(3));
    h.sim.raise_event(FW_ACTIVATION);
    std::thread::sleep(Duration::from_millis(10));
    h.disable();
    h.enable();
    let a = h.admin_push(SubmissionEntry::async_event_request());
    expect_event(&mut h, a, smart_event(3));
    let a = h.admin_push(SubmissionEntry::async_event_request());
    expect_event(&mut h, a, FW_ACTIVATION);
    assert_eq!(h.sim.stats().events_reported, 5);
}

#[test]
fn async_events_from_other_threads() {
    for inline in [false, true] {
        let mut h = Host::new(SimConfig {
            inline,
            ..SimConfig::default()
        });
        let mut q = h.create_qp(1, 16);
        let buf = h.alloc(4096);
        let mut aers = vec![];
        for _ in 0..4 {
            aers.push(h.admin_push(SubmissionEntry::async_event_request()));
        }
        let events: Vec<AsyncEvent> = (0..4)
            .map(|i| AsyncEvent {
                kind: async_event_type::VENDOR,
                info: i,
                log_page: 0xC0 + i,
            })
            .collect();
        let sim = &h.sim;
        std::thread::scope(|s| {
            for ev in &events {
                s.spawn(move || sim.raise_event(*ev));
            }
            for i in 0..200 {
                let e = h.io(&mut q, SubmissionEntry::write(1, i, 1, buf, 0));
                assert!(e.status().is_success());
            }
        });
        let mut got = vec![];
        for _ in 0..4 {
            let e = h.admin_reap(WAIT).expect("event");
            assert!(aers.contains(&e.cid) && e.status().is_success());
            got.push(AsyncEvent::from_dw0(e.dw0));
        }
        got.sort_by_key(|e| e.info);
        assert_eq!(got, events, "inline={inline}");
    }
}

#[test]
fn resize_namespace_reports_changes() {
    let mut h = Host::new(SimConfig::parse("ns=3,size=8M").unwrap());
    let mut q = h.create_qp(1, 16);
    let buf = h.alloc(4096);
    let a = h.admin_push(SubmissionEntry::async_event_request());
    h.sim.resize_namespace(2, 4 << 20).unwrap();
    expect_event(&mut h, a, NS_CHANGED);
    h.admin_ok(SubmissionEntry::identify_namespace(2, buf));
    let n = IdentifyNamespace::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!((n.nsze, n.ncap, n.nuse), (8192, 8192, 8192));
    let e = h.io(&mut q, SubmissionEntry::read(2, 8191, 1, buf, 0));
    assert!(e.status().is_success());
    let e = h.io(&mut q, SubmissionEntry::read(2, 8192, 1, buf, 0));
    assert_eq!(e.status(), st(0, 0x80));

    // Refused: no such namespace, not whole blocks, beyond the size at start.
    assert!(h.sim.resize_namespace(4, 1 << 20).is_err());
    assert!(h.sim.resize_namespace(0, 1 << 20).is_err());
    assert!(h.sim.resize_namespace(1, 1000).is_err());
    assert!(h.sim.resize_namespace(1, 0).is_err());
    assert!(h.sim.resize_namespace(1, 16 << 20).is_err());
    // Grows back up to its size at start.
    h.sim.resize_namespace(3, 2 << 20).unwrap();
    h.sim.resize_namespace(2, 8 << 20).unwrap();
    let e = h.io(&mut q, SubmissionEntry::read(2, 16383, 1, buf, 0));
    assert!(e.status().is_success());

    // The Changed Namespace List: ascending, zero-terminated; RAE keeps it, reading clears it.
    let log = h.alloc(4096);
    let mut rae = SubmissionEntry::get_changed_ns_list(log);
    rae.cdw10 |= 1 << 15;
    h.admin_ok(rae);
    assert_eq!(spec::parse_ns_list(&bytes(log, 4096)), vec![2, 3]);
    h.admin_ok(SubmissionEntry::get_changed_ns_list(log));
    assert_eq!(spec::parse_ns_list(&bytes(log, 4096)), vec![2, 3]);
    h.admin_ok(SubmissionEntry::get_changed_ns_list(log));
    assert!(spec::parse_ns_list(&bytes(log, 4096)).is_empty());
    // The two later notices: one per read of the log.
    let a = h.admin_push(SubmissionEntry::async_event_request());
    expect_event(&mut h, a, NS_CHANGED);
    let a = h.admin_push(SubmissionEntry::async_event_request());
    assert!(h.admin_reap(Duration::from_millis(50)).is_none());
    h.admin_push(SubmissionEntry::get_changed_ns_list(log));
    assert!(h.admin_reap(WAIT).unwrap().status().is_success());
    expect_event(&mut h, a, NS_CHANGED);
}

#[test]
fn critical_warning_and_firmware_activation() {
    let mut h = Host::new(SimConfig::default());
    let a1 = h.admin_push(SubmissionEntry::async_event_request());
    let a2 = h.admin_push(SubmissionEntry::async_event_request());
    h.sim.set_critical_warning(0b0110);
    expect_event(&mut h, a1, smart_event(1));
    h.sim.activate_firmware("2.0-rc1");
    expect_event(&mut h, a2, FW_ACTIVATION);

    let buf = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(buf));
    let c = IdentifyController::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!(c.firmware(), "2.0-rc1");
    h.admin_ok(SubmissionEntry::get_firmware_slot_log(buf));
    let fw = bytes(buf, 512);
    assert_eq!(fw[0], 1);
    assert_eq!(&fw[8..16], b"2.0-rc1 ");
    h.admin_ok(SubmissionEntry::get_smart_log(spec::NSID_ALL, buf));
    assert_eq!(
        SmartLog::from_prefix(&bytes(buf, 512))
            .unwrap()
            .critical_warning,
        0b0110
    );
    // Cleared: nothing to report.
    h.sim.set_critical_warning(0);
    h.admin_ok(SubmissionEntry::get_smart_log(spec::NSID_ALL, buf));
    assert_eq!(bytes(buf, 1)[0], 0);
    h.admin_push(SubmissionEntry::async_event_request());
    assert!(h.admin_reap(Duration::from_millis(50)).is_none());
    assert_eq!(h.sim.stats().events_reported, 2);
}

// ----- retry delays, transient errors, late admin completions ---------------------------------

#[test]
fn crdt_and_host_behavior_support() {
    let mut h = Host::new(SimConfig {
        crdt: [5, 10, 20],
        ..SimConfig::default()
    });
    let buf = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(buf));
    let c = IdentifyController::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!((c.crdt1, c.crdt2, c.crdt3), (5, 10, 20));
    assert_eq!(c.retry_delay_ms(2), Some(1000));

    let hbs = feature::HOST_BEHAVIOR_SUPPORT;
    let get = SubmissionEntry::get_features(hbs, feature::SEL_CURRENT, 0).with_prp(buf, 0);
    fill(buf, 4096, 0x33);
    h.admin_ok(get);
    assert!(bytes(buf, 512).iter().all(|&b| b == 0));
    put_bytes(buf, &[1]);
    h.admin_ok(SubmissionEntry::set_features(hbs, 0, false).with_prp(buf, 0));
    fill(buf, 4096, 0x33);
    h.admin_ok(get);
    let d = bytes(buf, 512);
    assert_eq!(d[0], 1);
    assert!(d[1..].iter().all(|&b| b == 0));
    put_bytes(buf, &[2]);
    let e = h.admin(SubmissionEntry::set_features(hbs, 0, false).with_prp(buf, 0));
    assert_eq!(e.status(), st(0, 0x02));
}

#[test]
fn fault_transient_keeps_its_status_bits() {
    let busy = Status::new(0, 0x82).with_crd(2).with_more(true); // Namespace Not Ready
    let failed = Status::new(0, 0x06).with_crd(3).with_dnr(true);
    let mut h = Host::new(SimConfig {
        faults: vec![
            Fault::Transient {
                opcode: io_opcode::WRITE,
                nth: 2,
                times: 3,
                status: busy,
            },
            Fault::ErrorStatus {
                admin: false,
                opcode: io_opcode::READ,
                nth: 1,
                status: failed,
            },
        ],
        ..SimConfig::default()
    });
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    fill(buf, 512, 9);
    for i in 1..=6u64 {
        let e = h.io(&mut q, SubmissionEntry::write(1, i, 1, buf, 0));
        let hit = (2..=4).contains(&i);
        if hit {
            assert_eq!(e.status(), busy, "write {i}");
            assert_eq!(e.status().raw(), busy.raw());
            assert!(e.status().crd() == 2 && e.status().more() && !e.status().dnr());
        } else {
            assert!(e.status().is_success(), "write {i}");
        }
        let stored = h.sim.namespace_data(1, i * 512, 512);
        assert_eq!(stored == bytes(buf, 512), !hit, "write {i}");
    }
    let e = h.io(&mut q, SubmissionEntry::read(1, 0, 1, buf, 0));
    assert_eq!(e.status().raw(), failed.raw());
    assert!(e.status().crd() == 3 && e.status().dnr());
    assert_eq!(h.sim.stats().faults_injected, 4);
}

#[test]
fn fault_delay_admin() {
    let delay = Duration::from_millis(400);
    let mut h = Host::new(SimConfig {
        faults: vec![
            Fault::DelayAdmin {
                opcode: admin_opcode::GET_FEATURES,
                nth: 2,
                delay,
            },
            Fault::DelayAdmin {
                opcode: admin_opcode::DOORBELL_BUFFER_CONFIG,
                nth: 1,
                delay,
            },
            Fault::DelayAdmin {
                opcode: admin_opcode::GET_LOG_PAGE,
                nth: 1,
                delay: Duration::from_millis(100),
            },
        ],
        ..SimConfig::default()
    });
    h.admin_ok(SubmissionEntry::get_num_queues());
    let t = Instant::now();
    let slow = h.admin_push(SubmissionEntry::get_num_queues());
    // Other admin commands go on meanwhile.
    h.admin_ok(SubmissionEntry::new(admin_opcode::KEEP_ALIVE));
    let e = h.admin_reap(WAIT).unwrap();
    assert!(t.elapsed() >= delay);
    assert_eq!((e.cid, e.status()), (slow, Status::SUCCESS));
    assert_eq!(spec::decode_num_queues(e.dw0), (64, 64));

    // Doorbell Buffer Config takes effect when fetched, completes late.
    let shadow = h.alloc(4096);
    let ei = h.alloc(4096);
    let t = Instant::now();
    let dbbc = h.admin_push(SubmissionEntry::doorbell_buffer_config(shadow, ei));
    h.dbbuf = Some((shadow, ei));
    let mut q = h.create_qp(1, 8);
    let buf = h.alloc(4096);
    for i in 0..3 {
        let e = h.io(&mut q, SubmissionEntry::read(1, i, 1, buf, 0));
        assert!(e.status().is_success());
    }
    let sqi = spec::shadow_sq_tail_index(1, 0) as u64 * 4;
    // SAFETY: live EventIdx page, accessed atomically.
    let ev = unsafe { AtomicU32::from_ptr((ei + sqi) as *mut u32) }.load(Ordering::Acquire);
    assert_eq!(ev, q.tail);
    let e = h.admin_reap(WAIT).unwrap();
    assert!(t.elapsed() >= delay);
    assert_eq!((e.cid, e.status()), (dbbc, Status::SUCCESS));

    // A reset before the delay discards the completion.
    let log = h.alloc(4096);
    h.admin_push(SubmissionEntry::get_error_log(1, log, 0));
    // Fetched and executed (its DelayAdmin fault counted), its completion not posted yet.
    while h.sim.stats().faults_injected < 3 {
        std::thread::yield_now();
    }
    h.disable();
    h.enable();
    assert!(h.admin_reap(Duration::from_millis(300)).is_none());
    h.admin_ok(SubmissionEntry::get_num_queues());
    assert_eq!(h.sim.stats().faults_injected, 3);
}

// ----- registers, namespaces, PCI identity ---------------------------------------------------

#[test]
fn registers_of_a_buggy_device() {
    // CAP reads exactly what is configured; the model works on its own settings.
    let raw = 0x0123_4567_89AB_CDEF;
    let mut h = Host::new(SimConfig {
        raw_cap: Some(raw),
        ..SimConfig::default()
    });
    assert_eq!(
        h.reg(reg::CAP) as u64 | (h.reg(reg::CAP + 4) as u64) << 32,
        raw
    );
    h.admin_ok(SubmissionEntry::get_num_queues());

    // A BAR with room for the admin doorbells only: queues beyond it can be created, their
    // doorbells are never rung, and nothing outside the BAR is touched.
    let mut h = Host::new(SimConfig {
        bar_bytes: Some(0x1008),
        ..SimConfig::default()
    });
    assert_eq!(h.sim.bar().1, 0x1008);
    let cq = h.alloc(4096);
    let sq = h.alloc(4096);
    h.admin_ok(SubmissionEntry::create_io_cq(1, 8, cq, true, None));
    h.admin_ok(SubmissionEntry::create_io_sq(
        1,
        8,
        sq,
        1,
        true,
        spec::QueuePriority::Medium,
    ));
    let shadow = h.alloc(4096);
    let ei = h.alloc(4096);
    h.admin_ok(SubmissionEntry::doorbell_buffer_config(shadow, ei));
    h.admin_ok(SubmissionEntry::delete_io_sq(1));
    h.admin_ok(SubmissionEntry::delete_io_cq(1));
    h.disable();
    h.enable();
    h.admin_ok(SubmissionEntry::get_num_queues());

    // The largest stride CAP.DSTRD can express.
    let mut h = Host::new(SimConfig::parse("dstrd=15,qpairs=4").unwrap());
    let cap = spec::Cap(h.reg(reg::CAP) as u64 | (h.reg(reg::CAP + 4) as u64) << 32);
    assert_eq!(cap.dstrd(), 15);
    assert!(h.sim.bar().1 >= spec::cq_head_doorbell(4, 15) + 4);
    let buf = h.alloc(4096);
    for qid in [1, 4] {
        let mut q = h.create_qp(qid, 8);
        let e = h.io(&mut q, SubmissionEntry::write(1, qid as u64, 1, buf, 0));
        assert!(e.status().is_success());
    }
    h.disable();
    h.enable();

    // Shadow doorbells with a stride whose slots fall outside the buffer page: those queues
    // keep using their MMIO doorbells (the test host rings MMIO only).
    let mut h = Host::new(SimConfig::parse("dstrd=10,qpairs=2").unwrap());
    let shadow = h.alloc(4096);
    let ei = h.alloc(4096);
    h.admin_ok(SubmissionEntry::doorbell_buffer_config(shadow, ei));
    let mut q = h.create_qp(2, 8);
    let buf = h.alloc(4096);
    for i in 0..5 {
        let e = h.io(&mut q, SubmissionEntry::read(1, i, 1, buf, 0));
        assert!(e.status().is_success());
    }
    assert!(bytes(ei, 4096).iter().all(|&b| b == 0));
}

#[test]
fn many_namespaces() {
    let mut h = Host::new(SimConfig::parse("ns=1100,size=1M").unwrap());
    let buf = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(buf));
    let c = IdentifyController::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!(c.nn, 1100);
    // The active namespace list: nsids above the start, at most 1024 a page.
    for (start, want) in [
        (0u32, (1..=1024).collect::<Vec<u32>>()),
        (1024, (1025..=1100).collect()),
        (500, (501..=1100).collect()),
        (1099, vec![1100]),
        (1100, vec![]),
    ] {
        fill(buf, 4096, 0xFF);
        h.admin_ok(SubmissionEntry::identify_active_ns_list(start, buf));
        assert_eq!(
            spec::parse_ns_list(&bytes(buf, 4096)),
            want,
            "start {start}"
        );
    }
    let mut q = h.create_qp(1, 8);
    fill(buf, 512, 4);
    let e = h.io(&mut q, SubmissionEntry::write(1100, 2047, 1, buf, 0));
    assert!(e.status().is_success());
    assert_eq!(h.sim.namespace_data(1100, 2047 * 512, 512), bytes(buf, 512));
    h.admin_ok(SubmissionEntry::identify_namespace(1100, buf));
    let n = IdentifyNamespace::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!(n.nsze, 2048);

    // More than 1024 changed: the Changed Namespace List holds 0xFFFFFFFF alone.
    for nsid in 1..=1025 {
        h.sim.resize_namespace(nsid, 512 << 10).unwrap();
    }
    let log = h.alloc(4096);
    h.admin_ok(SubmissionEntry::get_changed_ns_list(log));
    let l = bytes(log, 4096);
    assert_eq!(l[..4], [0xFF; 4]);
    assert!(l[4..].iter().all(|&b| b == 0));
    h.admin_ok(SubmissionEntry::get_changed_ns_list(log));
    assert!(spec::parse_ns_list(&bytes(log, 4096)).is_empty());

    // A controller without the active namespace list.
    let mut h = Host::new(SimConfig::parse("nslist=0,ns=2").unwrap());
    let buf = h.alloc(4096);
    let e = h.admin(SubmissionEntry::identify_active_ns_list(0, buf));
    assert_eq!(e.status(), st(0, 0x02));
    h.admin_ok(SubmissionEntry::identify_namespace(2, buf));
}

#[test]
fn pci_identity() {
    let h = Host::new(SimConfig::default());
    assert_eq!(h.sim.pci_id(), (SIM_VID, SIM_DEVICE_ID));
    let mut h = Host::new(SimConfig::parse("pci=8086:0a54").unwrap());
    assert_eq!(h.sim.pci_id(), (0x8086, 0x0a54));
    let buf = h.alloc(4096);
    h.admin_ok(SubmissionEntry::identify_controller(buf));
    let c = IdentifyController::from_prefix(&bytes(buf, 4096)).unwrap();
    assert_eq!((c.vid, c.ssvid), (0x8086, SIM_SSVID));
}

#[test]
fn parse_new_options() {
    let c = SimConfig::parse(
        "sgl=1,crdt=1:2:3,cap=0x10,bar=0x2000,nslist=0,pci=1B36:0010,dstrd=1,ns=2000,size=1M",
    )
    .unwrap();
    assert!(c.sgl && !c.active_ns_list);
    assert_eq!(c.crdt, [1, 2, 3]);
    assert_eq!(c.raw_cap, Some(0x10));
    assert_eq!(c.bar_bytes, Some(0x2000));
    assert_eq!(c.pci_id, (0x1b36, 0x0010));
    assert_eq!((c.dstrd, c.namespaces.len()), (1, 2000));
    assert_eq!(SimConfig::parse("dstrd=15").unwrap().dstrd, 15);
    let c = SimConfig::parse("crdt=7,bar=8k,cap=42").unwrap();
    assert_eq!(c.crdt, [7, 0, 0]);
    assert_eq!(c.bar_bytes, Some(8192));
    assert_eq!(c.raw_cap, Some(42));
    let d = SimConfig::default();
    assert!(!d.sgl && d.active_ns_list);
    assert_eq!((d.crdt, d.raw_cap, d.bar_bytes), ([0; 3], None, None));
    assert_eq!(d.pci_id, (SIM_VID, SIM_DEVICE_ID));
    for (spec, word) in [
        ("sgl=2", "sgl"),
        ("crdt=1:2:3:4", "crdt"),
        ("crdt=70000", "crdt"),
        ("crdt=a", "crdt"),
        ("cap=xyz", "cap"),
        ("cap=0xg", "cap"),
        ("bar=0x1004", "bar"),
        ("bar=4k", "bar"),
        ("bar=2G", "bar"),
        ("dstrd=4,bar=0x1008", "bar"),
        ("pci=1b36", "pci"),
        ("pci=12345:1", "pci"),
        ("pci=zz:00", "pci"),
        ("dstrd=16", "dstrd"),
        ("dstrd=15,qpairs=65534", "dstrd"),
        ("ns=65537", "ns"),
        ("nslist=x", "nslist"),
    ] {
        let e = SimConfig::parse(spec).expect_err(spec);
        assert!(e.contains(word), "{spec}: {e}");
        assert!(!e.contains('\n'));
    }
}

/// `cargo test --release --lib nvme::sim::tests::throughput_report -- --ignored --nocapture`:
/// 4 KiB reads at QD32 with `data=0`, driven by this test host (its cost included).
#[test]
#[ignore = "measurement, run by hand in release mode"]
fn throughput_report() {
    let mut h = Host::new(SimConfig::parse("data=0").unwrap());
    let mut q = h.create_qp(1, 256);
    let buf = h.alloc(4096);
    let n = 2_000_000u32;
    let (mut sent, mut done, mut outstanding) = (0u32, 0u32, 0u32);
    let t = Instant::now();
    while done < n {
        while outstanding < 32 && sent < n {
            let slba = (sent % 100_000) as u64 * 8;
            h.push(&mut q, SubmissionEntry::read(1, slba, 8, buf, 0));
            sent += 1;
            outstanding += 1;
        }
        h.reap(&mut q);
        done += 1;
        outstanding -= 1;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{n} 4 KiB reads in {secs:.3} s: {:.2} M commands/s",
        n as f64 / secs / 1e6
    );
}
