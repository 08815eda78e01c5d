//! The device thread: register polling (CC.EN / CC.SHN), queue state, fetching commands, the
//! latency queue, posting completions with the phase tag and CQ-full hold-back, faults and reset.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::cache::{PowerCutReport, WriteCache};
use super::config::{Fault, Latency, SimConfig};
use super::host::dma;
use super::{Shared, cap_value};
use crate::nvme::spec::{
    self, Aqa, AsyncEvent, Cc, CompletionEntry, ErrorLogEntry, Status, SubmissionEntry, reg,
};

/// Generic status with DNR set (every error the model itself produces has DNR).
pub(super) const fn generic(sc: u8) -> Status {
    Status::new(0, sc).with_dnr(true)
}

/// Command-specific status with DNR set.
pub(super) const fn specific(sc: u8) -> Status {
    Status::new(1, sc).with_dnr(true)
}

pub(super) mod sc {
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE: u8 = 0x0B;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0C;
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: u8 = 0x0D;
    pub const INVALID_NUMBER_OF_SGL_DESCRIPTORS: u8 = 0x0E;
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0F;
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    pub const PRP_OFFSET_INVALID: u8 = 0x13;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    // command specific
    pub const CQ_INVALID: u8 = 0x00;
    pub const INVALID_QID: u8 = 0x01;
    pub const INVALID_QSIZE: u8 = 0x02;
    pub const AER_LIMIT: u8 = 0x05;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const INVALID_QUEUE_DELETION: u8 = 0x0C;
}

/// Commands fetched per submission queue per pass, for fairness between queues.
const BURST: u32 = 128;
/// Empty polling passes before the thread starts yielding, then sleeping.
const SPIN_PASSES: u32 = 50_000;
const YIELD_PASSES: u32 = 2_000;
const MAX_SLEEP: Duration = Duration::from_micros(100);
/// Between passes of an inline model's device thread.
const INLINE_NAP: Duration = Duration::from_micros(50);
/// The longest nap of an inline model's thread, while the host's polls do the work: how
/// late it notices that the host stopped polling.
const INLINE_NAP_BUSY: Duration = Duration::from_millis(1);
/// What an I/O SQ's MMIO doorbell register is reset to after the model consumed a write, in
/// shadow doorbell mode (no valid tail has this value).
pub(super) const DOORBELL_IDLE: u32 = u32::MAX;
/// Entries kept in the error log (Identify ELPE + 1).
pub(super) const ERROR_LOG_ENTRIES: usize = 64;

pub(super) struct Sq {
    pub(super) base: u64,
    pub(super) size: u32,
    pub(super) head: u32,
    pub(super) cqid: u16,
    /// Commands fetched from this queue whose completion has not been posted yet.
    pub(super) inflight: u32,
    /// Shadow doorbells: whether the queue is being looked at (an MMIO doorbell write arms
    /// it; catching up with the shadow tail disarms it).
    pub(super) armed: bool,
    pub(super) known_tail: u32,
}

pub(super) struct Cq {
    pub(super) base: u64,
    pub(super) size: u32,
    pub(super) tail: u32,
    pub(super) head: u32,
    pub(super) phase: bool,
    /// Completions waiting for room (the CQ was full).
    pub(super) backlog: VecDeque<Post>,
    /// Number of SQs bound to this CQ.
    pub(super) users: u16,
}

/// A completion to post.
#[derive(Clone, Copy, Debug)]
pub(super) struct Post {
    pub(super) sqid: u16,
    pub(super) cid: u16,
    pub(super) status: Status,
    pub(super) dw0: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Normal,
    /// Post with cid 0xFFFF and keep the real command outstanding.
    BadCid,
    /// Post twice.
    Stale,
}

/// An I/O completion waiting for its due time.
struct Timed {
    due: Instant,
    seq: u64,
    post: Post,
    kind: Kind,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// A command the model keeps outstanding without completing it (DropCompletion, BadCid, AER).
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub(super) sqid: u16,
    pub(super) cid: u16,
    pub(super) aer: bool,
}

struct FaultState {
    fault: Fault,
    count: u64,
}

pub(super) struct Device {
    /// When the device started (for `latency_change`).
    born: Instant,
    pub(super) sh: Arc<Shared>,
    pub(super) cfg: SimConfig,
    // register-level state
    enabled: bool,
    shn: u8,
    rdy: bool,
    cfs: bool,
    shst: u8,
    pending_rdy: Option<(Instant, bool)>,
    pub(super) page_size: u64,
    pub(super) cc: Cc,
    // queues, indexed by qid (0 = admin)
    pub(super) sqs: Vec<Option<Sq>>,
    pub(super) cqs: Vec<Option<Cq>>,
    /// Active I/O SQ ids in creation order.
    pub(super) io_sqs: Vec<u16>,
    /// Granted I/O queue counts (1-based).
    pub(super) granted_sqs: u16,
    pub(super) granted_cqs: u16,
    /// Shadow doorbell and EventIdx page addresses (Doorbell Buffer Config).
    pub(super) dbbuf: Option<(u64, u64)>,
    pub(super) held: Vec<Held>,
    timed: BinaryHeap<Reverse<Timed>>,
    /// Admin commands fetched and not executed yet (LateAdmin), with when to run them.
    pub(super) late_admin: Vec<(Instant, SubmissionEntry)>,
    seq: u64,
    backlogged: usize,
    faults: Vec<FaultState>,
    has_faults: bool,
    ignore_abort: bool,
    io_seen: u64,
    fatal_fired: bool,
    pub(super) inflight: u64,
    pub(super) vwc_enabled: bool,
    /// The write cache's loss model (`SimConfig::write_cache`).
    pub(super) cache: Option<WriteCache>,
    pub(super) error_log: [ErrorLogEntry; ERROR_LOG_ENTRIES],
    pub(super) error_count: u64,
    pub(super) started: Instant,
    /// Events raised and not reported yet, oldest first.
    pub(super) events: VecDeque<AsyncEvent>,
    /// Log pages (bit per id) with an event reported and not read since: their further events
    /// wait.
    pub(super) reported: [u64; 4],
    /// Host Behavior Support byte 0 (Advanced Command Retry Enable).
    pub(super) acre: u8,
    /// Asynchronous Event Configuration (Set Features 0Bh), reported back by Get Features.
    pub(super) aec: u32,
    /// The pieces of the SGL of the command in hand (reused from command to command).
    pub(super) sgl_pieces: Vec<(u64, u32)>,
}

impl Device {
    pub(super) fn new(sh: Arc<Shared>, cfg: SimConfig) -> Device {
        let n = cfg.max_io_queues as usize + 1;
        let ignore_abort = cfg.faults.contains(&Fault::IgnoreAbort);
        let faults: Vec<FaultState> = cfg
            .faults
            .iter()
            .filter(|f| **f != Fault::IgnoreAbort)
            .map(|&fault| FaultState { fault, count: 0 })
            .collect();
        let cache = cfg
            .write_cache
            .then(|| WriteCache::new(&sh.ns, cfg.write_cache_max));
        Device {
            born: Instant::now(),
            sh,
            enabled: false,
            shn: 0,
            rdy: false,
            cfs: false,
            shst: 0,
            pending_rdy: None,
            page_size: 4096,
            cc: Cc(0),
            sqs: (0..n).map(|_| None).collect(),
            cqs: (0..n).map(|_| None).collect(),
            io_sqs: Vec::with_capacity(n),
            granted_sqs: cfg.max_io_queues,
            granted_cqs: cfg.max_io_queues,
            dbbuf: None,
            held: Vec::with_capacity(64),
            timed: BinaryHeap::with_capacity(1024),
            late_admin: Vec::new(),
            seq: 0,
            backlogged: 0,
            has_faults: !faults.is_empty(),
            faults,
            ignore_abort,
            io_seen: 0,
            fatal_fired: false,
            inflight: 0,
            vwc_enabled: cfg.vwc,
            cache,
            error_log: [ErrorLogEntry::zeroed(); ERROR_LOG_ENTRIES],
            error_count: 0,
            started: Instant::now(),
            events: VecDeque::new(),
            reported: [0; 4],
            acre: 0,
            aec: 0,
            sgl_pieces: Vec::new(),
            cfg,
        }
    }

    /// One pass over registers, queues, timed completions and backlogs; whether it did work.
    #[inline]
    pub(super) fn pass(&mut self) -> bool {
        if self.sh.power.pending.load(Ordering::Acquire) {
            self.lose_power();
        }
        self.sh.events.take(&mut self.events);
        let mut work = self.poll_registers();
        if self.rdy && !self.cfs {
            if !self.events.is_empty() {
                work |= self.deliver_events();
            }
            work |= self.poll_admin();
            work |= self.poll_io();
            if !self.timed.is_empty() {
                work |= self.poll_timed();
            }
            if !self.late_admin.is_empty() {
                work |= self.run_late_admin();
            }
            if self.backlogged > 0 {
                work |= self.flush_backlogs();
            }
        }
        work
    }

    /// The inline model's device if no other thread is in a pass. A panic in a pass leaves
    /// the device as consistent as the threaded model's would be: keep going.
    pub(super) fn try_lock(
        dev: &std::sync::Mutex<Device>,
    ) -> Option<std::sync::MutexGuard<'_, Device>> {
        match dev.try_lock() {
            Ok(d) => Some(d),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The device thread of an inline model: a pass, then a nap (the driver's polls do the
    /// I/O work; this thread serves bring-up, admin commands and timed completions, and keeps
    /// I/O moving when nobody polls). The nap is short while a CSTS.RDY change is due.
    pub(super) fn run_inline(dev: &std::sync::Mutex<Device>) {
        // The host's polls do the model's work (`SimController::service`); this thread covers
        // for a host that is not polling (registers, admin commands while the driver sleeps).
        // While the host's passes keep finding work, its naps stretch to INLINE_NAP_BUSY:
        // at 50 us each, its wakes preempted the polling thread whenever the two shared a
        // CPU (it inherits the creating thread's affinity), 17k context switches a second
        // and a fifth of the inline model's IOPS.
        let mut nap = INLINE_NAP;
        let mut seen = u64::MAX;
        loop {
            // try_lock: a poller in a pass is doing this work already, and waiting for it
            // would make its unlock a futex wake (a syscall on the data path).
            let (due, host) = match Device::try_lock(dev) {
                Some(mut d) => {
                    if d.sh.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    d.pass();
                    (d.pending_rdy.is_some(), d.sh.stats.inline_passes.get())
                }
                None => (false, seen.wrapping_add(1)),
            };
            nap = if due {
                Duration::from_micros(5)
            } else if host != seen {
                // The host passed (or is in a pass) since the last look: it is polling.
                (nap * 2).clamp(INLINE_NAP, INLINE_NAP_BUSY)
            } else {
                INLINE_NAP
            };
            seen = host;
            std::thread::sleep(nap);
        }
    }

    /// The polling loop of the device thread.
    pub(super) fn run(mut self) {
        let mut idle: u32 = 0;
        let mut sleep = Duration::from_micros(5);
        while !self.sh.stop.load(Ordering::Relaxed) {
            let work = self.pass();
            if work {
                idle = 0;
                sleep = Duration::from_micros(5);
                continue;
            }
            idle = idle.saturating_add(1);
            if idle < SPIN_PASSES || self.pending_rdy.is_some() {
                std::hint::spin_loop();
            } else if idle < SPIN_PASSES + YIELD_PASSES {
                std::thread::yield_now();
            } else {
                let mut d = sleep;
                if let Some(Reverse(t)) = self.timed.peek() {
                    d = d.min(t.due.saturating_duration_since(Instant::now()));
                }
                std::thread::sleep(d);
                sleep = (sleep * 2).min(MAX_SLEEP);
            }
        }
    }

    // ----- registers --------------------------------------------------------------------

    fn write_csts(&self) {
        let v = self.rdy as u32 | (self.cfs as u32) << 1 | (self.shst as u32 & 3) << 2;
        self.sh.bar.store(reg::CSTS, v);
    }

    fn poll_registers(&mut self) -> bool {
        let mut work = false;
        if let Some((at, rdy)) = self.pending_rdy
            && Instant::now() >= at
        {
            self.rdy = rdy;
            self.pending_rdy = None;
            self.write_csts();
            work = true;
        }
        let cc = Cc(self.sh.bar.load(reg::CC));
        if cc.en() != self.enabled {
            self.enabled = cc.en();
            if cc.en() {
                self.enable(cc);
            } else {
                self.disable();
            }
            work = true;
        }
        if cc.shn() != self.shn {
            self.shn = cc.shn();
            self.shst = if self.shn != 0 {
                spec::Csts::SHST_COMPLETE
            } else {
                spec::Csts::SHST_NORMAL
            };
            self.write_csts();
            work = true;
        }
        work
    }

    fn set_rdy_later(&mut self, rdy: bool) {
        if self.cfg.ready_delay.is_zero() {
            self.rdy = rdy;
            self.pending_rdy = None;
        } else {
            self.pending_rdy = Some((Instant::now() + self.cfg.ready_delay, rdy));
        }
        self.write_csts();
    }

    /// CC.EN 0 -> 1: validate the admin queue registers and CC, then become ready. An invalid
    /// configuration sets CSTS.CFS (as QEMU does) and the controller stays not ready.
    fn enable(&mut self, cc: Cc) {
        let bar = &self.sh.bar;
        let aqa = Aqa(bar.load(reg::AQA));
        let asq = bar.load64(reg::ASQ);
        let acq = bar.load64(reg::ACQ);
        let cap = spec::Cap(cap_value(&self.cfg));
        let ps = cc.page_size();
        let ok = cc.mps() >= cap.mpsmin()
            && cc.mps() <= cap.mpsmax()
            && asq != 0
            && acq != 0
            && asq.is_multiple_of(ps)
            && acq.is_multiple_of(ps)
            && aqa.asqs() >= 1
            && aqa.acqs() >= 1
            && matches!(cc.css(), Cc::CSS_NVM | Cc::CSS_ALL_IO | Cc::CSS_ADMIN_ONLY);
        if !ok {
            self.cfs = true;
            self.write_csts();
            return;
        }
        self.cc = cc;
        self.page_size = ps;
        // Doorbells start at zero with the controller: writes to them while it was disabled
        // (a driver that submitted before noticing a power loss) mean nothing.
        self.zero_doorbells();
        self.cqs[0] = Some(Cq {
            base: acq,
            size: aqa.cq_entries(),
            tail: 0,
            head: 0,
            phase: true,
            backlog: VecDeque::with_capacity(aqa.sq_entries() as usize + 8),
            users: 1,
        });
        self.sqs[0] = Some(Sq {
            base: asq,
            size: aqa.sq_entries(),
            head: 0,
            cqid: 0,
            inflight: 0,
            armed: false,
            known_tail: 0,
        });
        self.granted_sqs = self.cfg.max_io_queues;
        self.granted_cqs = self.cfg.max_io_queues;
        self.vwc_enabled = self.cfg.vwc;
        self.acre = 0;
        self.aec = 0;
        self.set_rdy_later(true);
    }

    /// A power cut asked for by [`SimController::power_cut`](super::SimController::power_cut):
    /// the write cache loses what the cut loses, and the controller comes back in its
    /// power-on state (CC, AQA, ASQ, ACQ zero; not ready; no queues, commands or completions
    /// in flight). Namespace contents survive as the cut left them.
    fn lose_power(&mut self) {
        let how = self.sh.power.take_request();
        let report = match (self.cache.as_mut(), how) {
            (Some(c), Some(h)) => c.cut(&self.sh.ns, h),
            _ => PowerCutReport::default(),
        };
        if self.enabled || self.rdy || self.cfs {
            self.disable();
        }
        self.enabled = false;
        self.pending_rdy = None;
        self.rdy = false;
        self.cfs = false;
        self.shn = 0;
        self.shst = 0;
        self.vwc_enabled = self.cfg.vwc;
        self.sh.bar.store(reg::CC, 0);
        self.sh.bar.store(reg::AQA, 0);
        self.sh.bar.store64(reg::ASQ, 0);
        self.sh.bar.store64(reg::ACQ, 0);
        self.write_csts();
        self.sh.power.finish(report);
    }

    fn zero_doorbells(&self) {
        let d = self.cfg.dstrd;
        for qid in 0..=self.cfg.max_io_queues {
            for off in [
                spec::sq_tail_doorbell(qid, d),
                spec::cq_head_doorbell(qid, d),
            ] {
                if off >= self.sh.bar.len() {
                    return;
                }
                // Only the ones written: a large stride spreads them over many pages, which
                // stay untouched (and cost no memory) until a driver writes them.
                if self.sh.bar.load(off) != 0 {
                    self.sh.bar.store(off, 0);
                }
            }
        }
    }

    /// CC.EN 1 -> 0: controller reset. Everything queue-related is forgotten.
    fn disable(&mut self) {
        self.sh.stats.resets.add(1);
        for q in self.sqs.iter_mut() {
            *q = None;
        }
        for q in self.cqs.iter_mut() {
            *q = None;
        }
        self.io_sqs.clear();
        self.dbbuf = None;
        // Outstanding AERs go with the rest; queued events stay, and what was reported is
        // forgotten (the host re-initialises and may not have seen it).
        self.held.clear();
        self.reported = [0; 4];
        self.timed.clear();
        self.late_admin.clear();
        self.backlogged = 0;
        self.inflight = 0;
        self.zero_doorbells();
        self.cfs = false;
        self.set_rdy_later(false);
    }

    fn fail(&mut self) {
        self.cfs = true;
        self.write_csts();
    }

    // ----- doorbells ----------------------------------------------------------------------

    /// Current SQ tail as the driver published it. With Doorbell Buffer Config, I/O queues
    /// behave as QEMU's controller does: the shadow tail is read only after an MMIO doorbell
    /// write, and from then on until the controller has caught up with it (EventIdx is set to
    /// each value read). A driver that skips the MMIO write when EventIdx does not ask it to is
    /// correct; one that trusts a stale EventIdx stalls here as it would on QEMU.
    fn sq_tail(&mut self, qid: u16) -> u32 {
        let dstrd = self.cfg.dstrd;
        match self.dbbuf {
            Some((shadow, ei))
                if qid != 0 && self.in_shadow_page(spec::shadow_sq_tail_index(qid, dstrd)) =>
            {
                // Every MMIO write is an event (the register is reset to a value no driver
                // writes, so writing the same tail twice is seen twice).
                let rang = self
                    .sh
                    .bar
                    .take_write(spec::sq_tail_doorbell(qid, dstrd), DOORBELL_IDLE);
                let Some(sq) = self.sqs[qid as usize].as_mut() else {
                    return 0;
                };
                if rang {
                    sq.armed = true;
                }
                if sq.armed {
                    let i = spec::shadow_sq_tail_index(qid, dstrd) as u64 * 4;
                    // Publish EventIdx, then look again (full barrier between): a driver that
                    // stored a new tail before seeing this EventIdx must be seen here, or it
                    // skipped its MMIO write for nothing (the ordering QEMU's loop keeps).
                    let mut t = dma::load_u32(shadow + i);
                    loop {
                        dma::store_u32(ei + i, t);
                        std::sync::atomic::fence(Ordering::SeqCst);
                        let again = dma::load_u32(shadow + i);
                        if again == t {
                            break;
                        }
                        t = again;
                    }
                    sq.known_tail = t;
                    if t == sq.head {
                        sq.armed = false;
                    }
                }
                sq.known_tail
            }
            _ => self.sh.bar.load(spec::sq_tail_doorbell(qid, dstrd)),
        }
    }

    fn cq_head(&self, qid: u16) -> u32 {
        let dstrd = self.cfg.dstrd;
        match self.dbbuf {
            Some((shadow, ei))
                if qid != 0 && self.in_shadow_page(spec::shadow_cq_head_index(qid, dstrd)) =>
            {
                let i = spec::shadow_cq_head_index(qid, dstrd) as u64 * 4;
                let h = dma::load_u32(shadow + i);
                dma::store_u32(ei + i, h);
                h
            }
            _ => self.sh.bar.load(spec::cq_head_doorbell(qid, dstrd)),
        }
    }

    /// Whether slot `index` (in `u32` units) of the shadow doorbell and EventIdx buffers lies
    /// inside their one memory page. A queue whose slot does not (a large doorbell stride)
    /// uses its MMIO doorbells: the model never touches host memory past those pages.
    pub(super) fn in_shadow_page(&self, index: usize) -> bool {
        (index as u64 + 1) * 4 <= self.page_size
    }

    // ----- fetching -------------------------------------------------------------------------

    /// Fetches up to BURST commands from SQ `qid`. Returns the number fetched.
    fn fetch(&mut self, qid: u16) -> u32 {
        let tail = self.sq_tail(qid);
        let mut n = 0;
        while let Some(sq) = self.sqs[qid as usize].as_mut() {
            // A tail beyond the queue is an invalid doorbell write: ignored.
            if tail >= sq.size || sq.head == tail || n >= BURST || self.cfs {
                break;
            }
            let e = dma::read_sqe(sq.base + sq.head as u64 * spec::SQE_SIZE as u64);
            sq.head = if sq.head + 1 == sq.size {
                0
            } else {
                sq.head + 1
            };
            sq.inflight += 1;
            let sq_inflight = sq.inflight;
            self.inflight += 1;
            self.sh.stats.max_inflight.max(self.inflight);
            n += 1;
            if qid == 0 {
                self.admin_command(&e);
            } else {
                self.io_command(qid, sq_inflight, &e);
            }
        }
        n
    }

    fn poll_admin(&mut self) -> bool {
        self.fetch(0) > 0
    }

    fn poll_io(&mut self) -> bool {
        let mut work = false;
        let mut i = 0;
        // Index loop: an I/O command cannot change the queue list, but keep it robust.
        while i < self.io_sqs.len() && !self.cfs {
            let qid = self.io_sqs[i];
            work |= self.fetch(qid) > 0;
            i += 1;
        }
        work
    }

    // ----- faults ---------------------------------------------------------------------------

    /// ErrorStatus and Transient faults for this command (counted before it executes). The
    /// status is used exactly as configured (CRD, More and DNR included).
    pub(super) fn fault_status(&mut self, admin: bool, opcode: u8) -> Option<Status> {
        if !self.has_faults {
            return None;
        }
        let mut hit = None;
        for f in self.faults.iter_mut() {
            match f.fault {
                Fault::ErrorStatus {
                    admin: a,
                    opcode: o,
                    nth,
                    status,
                } if a == admin && o == opcode => {
                    f.count += 1;
                    if hit.is_none() && (nth == 0 || f.count == nth) {
                        hit = Some(status);
                    }
                }
                Fault::Transient {
                    opcode: o,
                    nth,
                    times,
                    status,
                } if !admin && o == opcode => {
                    f.count += 1;
                    if hit.is_none() && f.count >= nth && f.count - nth < times {
                        hit = Some(status);
                    }
                }
                _ => {}
            }
        }
        if hit.is_some() {
            self.sh.stats.faults_injected.add(1);
        }
        hit
    }

    /// DropCompletion / BadCid / StaleCid faults for a command that has executed.
    fn fault_kind(&mut self, admin: bool, opcode: u8) -> Option<Result<Kind, ()>> {
        if !self.has_faults {
            return None;
        }
        let io_seen = self.io_seen;
        let mut hit = None;
        for f in self.faults.iter_mut() {
            let this = match f.fault {
                Fault::DropCompletion {
                    admin: a,
                    opcode: o,
                    nth,
                } if a == admin && o == opcode => {
                    f.count += 1;
                    (nth == 0 || f.count == nth).then_some(Err(()))
                }
                Fault::BadCid { nth } if !admin && io_seen == nth => Some(Ok(Kind::BadCid)),
                Fault::StaleCid { nth } if !admin && io_seen == nth => Some(Ok(Kind::Stale)),
                _ => None,
            };
            if hit.is_none() {
                hit = this;
            }
        }
        if hit.is_some() {
            self.sh.stats.faults_injected.add(1);
        }
        hit
    }

    /// Admin commands whose LateAdmin delay has passed: executed and completed now.
    fn run_late_admin(&mut self) -> bool {
        let now = Instant::now();
        let mut work = false;
        let mut i = 0;
        while i < self.late_admin.len() {
            if self.late_admin[i].0 <= now {
                let (_, e) = self.late_admin.remove(i);
                self.execute_admin(&e);
                work = true;
            } else {
                i += 1;
            }
        }
        work
    }

    /// LateAdmin faults for an admin command just fetched: how long to leave it alone.
    pub(super) fn fault_late(&mut self, opcode: u8) -> Option<Duration> {
        self.fault_admin_delay(opcode, true)
    }

    /// DelayAdmin faults for an admin command that has executed: how long after its fetch
    /// (now) it completes.
    fn fault_delay(&mut self, opcode: u8) -> Option<Duration> {
        self.fault_admin_delay(opcode, false)
    }

    /// Counts `opcode` against the LateAdmin (`late`) or DelayAdmin faults; the delay of the
    /// one whose turn it is.
    fn fault_admin_delay(&mut self, opcode: u8, late: bool) -> Option<Duration> {
        if !self.has_faults {
            return None;
        }
        let mut hit = None;
        for f in self.faults.iter_mut() {
            let (o, nth, delay) = match f.fault {
                Fault::LateAdmin { opcode, nth, delay } if late => (opcode, nth, delay),
                Fault::DelayAdmin { opcode, nth, delay } if !late => (opcode, nth, delay),
                _ => continue,
            };
            if o == opcode {
                f.count += 1;
                if hit.is_none() && f.count == nth {
                    hit = Some(delay);
                }
            }
        }
        if hit.is_some() {
            self.sh.stats.faults_injected.add(1);
        }
        hit
    }

    fn check_fatal(&mut self) {
        if !self.has_faults || self.fatal_fired {
            return;
        }
        let fire = self
            .faults
            .iter()
            .any(|f| matches!(f.fault, Fault::Fatal { after_io } if self.io_seen >= after_io));
        if fire {
            self.fatal_fired = true;
            self.sh.stats.faults_injected.add(1);
            self.fail();
        }
    }

    // ----- completing -----------------------------------------------------------------------

    /// Finishes an admin command that executed inline: completes it now, later (DelayAdmin)
    /// or never (DropCompletion).
    pub(super) fn finish_admin(&mut self, e: &SubmissionEntry, status: Status, dw0: u32) {
        if let Some(Err(())) = self.fault_kind(true, e.opcode) {
            self.hold(0, e.cid, false);
            return;
        }
        let post = Post {
            sqid: 0,
            cid: e.cid,
            status,
            dw0,
        };
        match self.fault_delay(e.opcode) {
            Some(delay) => {
                // With the I/O completions that wait for their time: a reset drops them all.
                self.seq += 1;
                self.timed.push(Reverse(Timed {
                    due: Instant::now() + delay,
                    seq: self.seq,
                    post,
                    kind: Kind::Normal,
                }));
            }
            None => self.complete(post),
        }
    }

    /// Finishes an I/O command: applies the completion faults, then completes now or after the
    /// configured latency.
    pub(super) fn finish_io(
        &mut self,
        qid: u16,
        sq_inflight: u32,
        e: &SubmissionEntry,
        status: Status,
        dw0: u32,
    ) {
        self.io_seen += 1;
        if self.sh.hostile_on.load(Ordering::Relaxed)
            && self.hostile_completion(
                qid,
                e,
                Post {
                    sqid: qid,
                    cid: e.cid,
                    status,
                    dw0,
                },
            )
        {
            self.check_fatal();
            return;
        }
        let kind = match self.fault_kind(false, e.opcode) {
            Some(Err(())) => {
                self.hold(qid, e.cid, false);
                self.check_fatal();
                return;
            }
            Some(Ok(k)) => k,
            None => Kind::Normal,
        };
        let post = Post {
            sqid: qid,
            cid: e.cid,
            status,
            dw0,
        };
        let latency = match self.cfg.latency_change {
            Some((after, l)) if self.born.elapsed() >= after => l,
            _ => self.cfg.latency,
        };
        let delay = match latency {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Knee {
                base,
                knee_qd,
                per_qd,
            } => base + per_qd * sq_inflight.saturating_sub(knee_qd),
        };
        if delay.is_zero() {
            self.complete_kind(post, kind);
        } else {
            self.seq += 1;
            self.timed.push(Reverse(Timed {
                due: Instant::now() + delay,
                seq: self.seq,
                post,
                kind,
            }));
        }
        self.check_fatal();
    }

    pub(super) fn hold(&mut self, sqid: u16, cid: u16, aer: bool) {
        self.held.push(Held { sqid, cid, aer });
    }

    fn poll_timed(&mut self) -> bool {
        let now = Instant::now();
        let mut work = false;
        while let Some(Reverse(t)) = self.timed.peek() {
            if t.due > now {
                break;
            }
            let Some(Reverse(t)) = self.timed.pop() else {
                break;
            };
            self.complete_kind(t.post, t.kind);
            work = true;
        }
        work
    }

    fn complete_kind(&mut self, post: Post, kind: Kind) {
        match kind {
            Kind::Normal => self.complete(post),
            Kind::BadCid => {
                self.post(Post {
                    cid: 0xFFFF,
                    ..post
                });
                self.hold(post.sqid, post.cid, false);
            }
            Kind::Stale => {
                self.complete(post);
                self.post(post);
            }
        }
    }

    /// Completes a command: it leaves the in-flight count, and its CQE is posted.
    pub(super) fn complete(&mut self, post: Post) {
        if let Some(sq) = self.sqs[post.sqid as usize].as_mut() {
            sq.inflight = sq.inflight.saturating_sub(1);
        }
        self.inflight = self.inflight.saturating_sub(1);
        if !post.status.is_success() {
            self.log_error(post);
        }
        self.post(post);
    }

    fn log_error(&mut self, post: Post) {
        self.error_count += 1;
        let mut e = ErrorLogEntry::zeroed();
        e.error_count = self.error_count;
        e.sqid = post.sqid;
        e.cid = post.cid;
        e.status = post.status.to_cqe_status(false);
        e.param_error_location = 0xFFFF;
        self.error_log[(self.error_count as usize - 1) % ERROR_LOG_ENTRIES] = e;
    }

    /// Posts a CQE to the CQ of `post.sqid`, or queues it until the CQ has room.
    pub(super) fn post(&mut self, post: Post) {
        let Some(cqid) = self.sqs[post.sqid as usize].as_ref().map(|s| s.cqid) else {
            return; // the SQ is gone (deleted): nowhere to report
        };
        let has_backlog = self.cqs[cqid as usize]
            .as_ref()
            .is_some_and(|c| !c.backlog.is_empty());
        if (has_backlog || !self.try_post(cqid, post))
            && let Some(cq) = self.cqs[cqid as usize].as_mut()
        {
            cq.backlog.push_back(post);
            self.backlogged += 1;
            self.sh.stats.cq_full_holds.add(1);
        }
    }

    /// Writes one CQE if the CQ has room (refreshing the head doorbell when it looks full).
    fn try_post(&mut self, cqid: u16, post: Post) -> bool {
        let sq_head = self.sqs[post.sqid as usize]
            .as_ref()
            .map_or(0, |s| s.head as u16);
        let full = {
            let Some(cq) = self.cqs[cqid as usize].as_ref() else {
                return true; // CQ gone: drop
            };
            next(cq.tail, cq.size) == cq.head
        };
        if full {
            let head = self.cq_head(cqid);
            let Some(cq) = self.cqs[cqid as usize].as_mut() else {
                return true;
            };
            if head < cq.size {
                cq.head = head;
            }
            if next(cq.tail, cq.size) == cq.head {
                return false;
            }
        }
        let Some(cq) = self.cqs[cqid as usize].as_mut() else {
            return true;
        };
        let e = CompletionEntry {
            dw0: post.dw0,
            dw1: 0,
            sq_head,
            sq_id: post.sqid,
            cid: post.cid,
            status: post.status.to_cqe_status(cq.phase),
        };
        dma::write_cqe(cq.base + cq.tail as u64 * spec::CQE_SIZE as u64, &e);
        cq.tail = next(cq.tail, cq.size);
        if cq.tail == 0 {
            cq.phase = !cq.phase;
        }
        true
    }

    fn flush_backlogs(&mut self) -> bool {
        let mut work = false;
        for cqid in 0..self.cqs.len() {
            while let Some(post) = self.cqs[cqid]
                .as_ref()
                .and_then(|c| c.backlog.front().copied())
            {
                if !self.try_post(cqid as u16, post) {
                    break;
                }
                if let Some(cq) = self.cqs[cqid].as_mut() {
                    cq.backlog.pop_front();
                }
                self.backlogged -= 1;
                work = true;
            }
        }
        work
    }

    // ----- queue management used by admin commands --------------------------------------

    /// Completes every outstanding command of SQ `qid` with "Aborted due to SQ Deletion"
    /// (timed and held ones), before the queue goes away.
    pub(super) fn abort_sq_commands(&mut self, qid: u16) {
        let status = generic(sc::ABORTED_SQ_DELETION);
        if self.held.iter().any(|h| h.sqid == qid) {
            // Order-preserving: the oldest AER must stay first among the rest.
            let (gone, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|h| h.sqid == qid);
            self.held = keep;
            for h in gone {
                self.complete(Post {
                    sqid: qid,
                    cid: h.cid,
                    status,
                    dw0: 0,
                });
            }
        }
        if self.timed.iter().any(|t| t.0.post.sqid == qid) {
            let mut rest = std::mem::take(&mut self.timed).into_vec();
            let mut j = 0;
            while j < rest.len() {
                if rest[j].0.post.sqid == qid {
                    let t = rest.swap_remove(j).0;
                    self.complete(Post {
                        status,
                        dw0: 0,
                        ..t.post
                    });
                } else {
                    j += 1;
                }
            }
            self.timed = BinaryHeap::from(rest);
        }
    }

    /// Abort (admin): completes a withheld command with "Command Abort Requested". Returns
    /// whether it was found (Abort dw0 bit 0 = 0 means aborted).
    pub(super) fn abort(&mut self, sqid: u16, cid: u16) -> bool {
        if self.ignore_abort {
            return false;
        }
        let Some(i) = self
            .held
            .iter()
            .position(|h| h.sqid == sqid && h.cid == cid && !h.aer)
        else {
            return false;
        };
        // Order-preserving: the oldest AER must stay first.
        self.held.remove(i);
        self.sh.stats.aborts.add(1);
        self.complete(Post {
            sqid,
            cid,
            status: generic(sc::ABORT_REQUESTED),
            dw0: 0,
        });
        true
    }

    pub(super) fn aer_count(&self) -> usize {
        self.held.iter().filter(|h| h.aer).count()
    }

    /// Reports queued events on outstanding AERs, oldest with oldest: an event waits while its
    /// log page has a reported event the host has not read. Returns whether it reported any.
    pub(super) fn deliver_events(&mut self) -> bool {
        let mut work = false;
        while !self.events.is_empty() {
            let Some(a) = self.held.iter().position(|h| h.aer) else {
                break;
            };
            let reported = self.reported;
            let Some(i) = self
                .events
                .iter()
                .position(|ev| !log_bit(&reported, ev.log_page))
            else {
                break;
            };
            let Some(ev) = self.events.remove(i) else {
                break;
            };
            let h = self.held.remove(a);
            self.reported[ev.log_page as usize / 64] |= 1 << (ev.log_page % 64);
            self.sh.stats.events_reported.add(1);
            self.complete(Post {
                sqid: h.sqid,
                cid: h.cid,
                status: Status::SUCCESS,
                dw0: ev.to_dw0(),
            });
            work = true;
        }
        work
    }

    /// The host read log page `lid` (RAE clear): its next event may be reported (from the
    /// next pass on, after the Get Log Page completion).
    pub(super) fn log_page_read(&mut self, lid: u8) {
        self.reported[lid as usize / 64] &= !(1 << (lid % 64));
    }

    /// Removes the CQ's pending backlog (the CQ is being deleted).
    pub(super) fn drop_backlog(&mut self, cqid: u16) {
        if let Some(cq) = self.cqs[cqid as usize].as_mut() {
            self.backlogged -= cq.backlog.len();
            cq.backlog.clear();
        }
    }

    pub(super) fn reserve_for_sq(&mut self, cqid: u16, size: u32) {
        if let Some(cq) = self.cqs[cqid as usize].as_mut() {
            cq.backlog.reserve(size as usize + 2);
        }
        self.timed.reserve(size as usize + 2);
        self.held.reserve(4);
    }
}

/// Whether log page `lid`'s bit is set in a 256-bit set.
fn log_bit(set: &[u64; 4], lid: u8) -> bool {
    set[lid as usize / 64] & (1 << (lid % 64)) != 0
}

const fn next(i: u32, size: u32) -> u32 {
    if i + 1 == size { 0 } else { i + 1 }
}

/// Result of an admin or I/O handler: complete with this status and dw0, or keep outstanding.
pub(super) type Outcome = (Status, u32);

pub(super) const OK: Outcome = (Status::SUCCESS, 0);
