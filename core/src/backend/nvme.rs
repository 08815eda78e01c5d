//! The userspace NVMe backend: one I/O queue pair of a [`Controller`] per [`crate::Queue`],
//! polled by the thread that owns it. Serves `pcie://` targets (vfio-pci) and `sim://` (the
//! same driver against the software controller model).
//!
//! Per queue pair: trackers indexed by command id, each with two preallocated PRP list pages;
//! requests larger than MDTS split into several commands (a backlog holds what does not fit
//! the SQ yet); one doorbell write per poll batch; completions validated against the tracker
//! table (the device is untrusted input); timeouts escalate abort → controller reset, after
//! which every outstanding request completes exactly once with an error.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Fail, RawOp, Reaped};
use crate::error::{Error, Result};
use crate::nvme::ctrl::{Controller, PAGE};
use crate::nvme::dma::{DmaMem, DmaRegion};
use crate::nvme::ring::Ring;
use crate::nvme::spec::{self, DsmRange, NvmeError, SubmissionEntry};
use crate::op::OpKind;

/// Command ids: low 12 bits index the tracker, high 4 bits count its reuses, so a stale
/// completion for a reused tracker is recognised (as Linux's nvme driver does).
const CID_INDEX_BITS: u32 = 12;
const CID_INDEX_MASK: u16 = (1 << CID_INDEX_BITS) - 1;
/// How often (ms) outstanding commands are checked against the timeout.
const SCAN_MS: u64 = 10;
/// Generic status "Command Abort Requested".
const ABORT_REQUESTED: u8 = 0x07;
/// Commands gathered before an SQ doorbell while the device is busy (see `poll_once`).
const DOORBELL_BATCH: u16 = 8;
/// Largest doorbell batch a caller may set.
pub(crate) const MAX_DOORBELL_BATCH: u16 = 256;
/// Largest Write Zeroes / Deallocate per command, in blocks.
const MAX_ZERO_BLOCKS: u64 = spec::MAX_NLB as u64;
const MAX_DEALLOC_BLOCKS: u64 = u32::MAX as u64;

#[derive(Clone, Copy, Debug, Default)]
struct Tracker {
    active: bool,
    epoch: u8,
    slot: u32,
    opcode: u8,
    submitted_ms: u64,
    /// When an abort was sent (0: none).
    abort_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Req {
    op: RawOp,
    /// Which DMA region holds the buffer.
    region: u16,
    /// Bytes (or, for flush, 1) handed to commands so far.
    issued: u64,
    outstanding: u32,
    fail: Fail,
    active: bool,
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct NvmeQueueStats {
    pub commands: u64,
    pub doorbells: u64,
    pub bad_completions: u64,
    pub aborts: u64,
    pub resets: u64,
    pub timeouts: u64,
}

pub(crate) struct NvmeQueue {
    ctrl: Arc<Controller>,
    sim: bool,
    /// The controller is an inline model: each poll runs a pass of the device first.
    sim_inline: bool,
    nsid: u32,
    lba_shift: u32,
    ring: Option<Ring>,
    generation: u64,
    trackers: Vec<Tracker>,
    free: Vec<u16>,
    /// Two PRP list pages per tracker.
    prp: Option<DmaMem>,
    /// DMA mappings of the queue's arena and of any memory its owner added.
    regions: Vec<DmaRegion>,
    reqs: Vec<Req>,
    backlog: VecDeque<u32>,
    max_xfer: u64,
    timeout_ms: Option<u64>,
    abort_ms: u64,
    last_scan_ms: u64,
    /// CLOCK_MONOTONIC_COARSE at the last poll.
    now_ms: u64,
    /// A protocol violation seen while reaping, reported after the batch is handed over.
    pending_error: Option<Error>,
    stats: NvmeQueueStats,
    /// Commands gathered before the SQ doorbell rings while the device is busy.
    doorbell_batch: u16,
    abandoned: bool,
    /// Completions produced outside a poll (a recovery in `push`), handed over by the next one.
    stash: Vec<Reaped>,
    /// The queue pair exists on the controller (false after a reset until re-created).
    live: bool,
}

impl NvmeQueue {
    /// A queue pair on `ctrl` for namespace `nsid`, sized for `depth` requests, with the
    /// arena `arena` mapped for DMA once.
    pub fn new(
        ctrl: Arc<Controller>,
        nsid: u32,
        regions: &[(*mut u8, usize, rio_sys::mem::PageKind)],
        depth: u32,
    ) -> Result<NvmeQueue> {
        let ns = ctrl.namespace(nsid).ok_or_else(|| Error::Controller {
            ctrl: ctrl.name.clone(),
            reason: format!("namespace {nsid} is not active"),
        })?;
        let lba_shift = ns.block_size.trailing_zeros();
        let opts = ctrl.options().clone();
        let entries = opts.io_queue_entries.unwrap_or_else(|| {
            (depth.saturating_mul(2).clamp(64, 1024)).next_power_of_two() as u16
        });
        let (ring, generation) = ctrl.create_io_ring(entries)?;
        let ntr = (ring.entries as usize - 1).min(CID_INDEX_MASK as usize + 1);
        let mapper = ctrl.mapper();
        let prp = match DmaMem::new(mapper, ntr * 2 * PAGE, opts.hugepages) {
            Ok(m) => m,
            Err(e) => {
                ctrl.delete_io_ring(ring, generation);
                return Err(e);
            }
        };
        let mut mapped = Vec::with_capacity(regions.len());
        for &(ptr, len, kind) in regions {
            // SAFETY: the arena outlives this backend (the queue drops its backend first) and
            // added regions are kept alive by the queue's owner (contract of
            // `Engine::queue_with_regions`); all are unmapped from the device in `Drop`.
            match unsafe { mapper.map(ptr, len, kind) } {
                Ok(r) => mapped.push(r),
                Err(e) => {
                    for mut r in mapped {
                        mapper.release(&mut r);
                    }
                    prp.release(mapper);
                    ctrl.delete_io_ring(ring, generation);
                    return Err(e);
                }
            }
        }
        let max_xfer = ctrl.max_xfer() as u64;
        let timeout_ms = opts.command_timeout.map(|t| t.as_millis().max(1) as u64);
        let sim = ctrl.sim().is_some();
        let sim_inline = ctrl.sim().is_some_and(|s| s.is_inline());
        tracing::debug!(
            ctrl = %ctrl.name,
            qid = ring.qid,
            entries = ring.entries,
            trackers = ntr,
            "I/O queue pair created"
        );
        Ok(NvmeQueue {
            abort_ms: opts.admin_timeout.as_millis().max(1) as u64,
            ctrl,
            sim,
            sim_inline,
            nsid,
            lba_shift,
            ring: Some(ring),
            generation,
            trackers: vec![Tracker::default(); ntr],
            free: (0..ntr as u16).rev().collect(),
            prp: Some(prp),
            regions: mapped,
            reqs: Vec::with_capacity(depth as usize),
            backlog: VecDeque::with_capacity(depth as usize),
            max_xfer,
            timeout_ms,
            last_scan_ms: coarse_ms(),
            now_ms: coarse_ms(),
            pending_error: None,
            stats: NvmeQueueStats::default(),
            doorbell_batch: DOORBELL_BATCH,
            abandoned: false,
            stash: Vec::new(),
            live: true,
        })
    }

    pub fn backend_name(&self) -> &'static str {
        if self.sim { "sim" } else { "vfio" }
    }

    /// Commands gathered per SQ doorbell while the device is busy.
    pub fn submit_batch(&self) -> u32 {
        self.doorbell_batch as u32
    }

    /// Sets the doorbell batch (1 rings for every poll with new commands; clamped to
    /// 1..=[`MAX_DOORBELL_BATCH`]).
    pub fn set_submit_batch(&mut self, n: u32) {
        self.doorbell_batch = n.clamp(1, MAX_DOORBELL_BATCH as u32) as u16;
    }

    pub fn stats(&self) -> NvmeQueueStats {
        self.stats
    }

    pub fn qid(&self) -> u16 {
        self.ring.as_ref().map_or(0, |r| r.qid)
    }

    #[inline]
    pub fn push(&mut self, slot: u32, op: &RawOp) -> Result<()> {
        if self.ctrl.generation() != self.generation || !self.live {
            // Another queue reset the controller: fail what this queue had outstanding (handed
            // over at the next poll) and create the queue pair again before taking more.
            let mut failed = std::mem::take(&mut self.stash);
            let r = if self.ctrl.generation() != self.generation {
                self.recover(&mut failed, false)
            } else {
                self.revive()
            };
            self.stash = failed;
            r?;
        }
        if self.free.len() == self.trackers.len() {
            // Idle until now: the clock of the last poll may be old (timeouts are measured
            // from it).
            self.now_ms = coarse_ms();
        }
        let region = if op.len > 0 && !op.addr.is_null() {
            match self
                .regions
                .iter()
                .position(|r| r.contains(op.addr, op.len as usize))
            {
                Some(i) => i as u16,
                None => {
                    return Err(Error::BufferUnavailable {
                        requested: op.len as usize,
                        reason: "buffer is not in memory DMA-mapped for this queue".into(),
                    });
                }
            }
        } else {
            0
        };
        let i = slot as usize;
        if i >= self.reqs.len() {
            self.reqs.resize(
                i + 1,
                Req {
                    op: *op,
                    region: 0,
                    issued: 0,
                    outstanding: 0,
                    fail: Fail::None,
                    active: false,
                },
            );
        }
        self.reqs[i] = Req {
            op: *op,
            region,
            issued: 0,
            outstanding: 0,
            fail: Fail::None,
            active: true,
        };
        if !self.backlog.is_empty() || !self.issue(slot) {
            self.backlog.push_back(slot);
        }
        Ok(())
    }

    /// Turn as much of request `slot` into commands as trackers and SQ space allow. Returns
    /// true when the whole request is issued.
    #[inline]
    fn issue(&mut self, slot: u32) -> bool {
        // Stamped with the clock of the last poll: timeouts are coarse (tens of ms at least),
        // and this keeps clock reads off the per-command path.
        let now = self.now_ms;
        let ring = self
            .ring
            .as_mut()
            .expect("ring present while the queue lives");
        let req = &mut self.reqs[slot as usize];
        let total = match req.op.op {
            OpKind::Flush => 1,
            _ => req.op.len,
        };
        while req.issued < total {
            if req.fail != Fail::None {
                // A piece failed: do not issue the rest.
                req.issued = total;
                break;
            }
            // No SQ-space check: trackers are one fewer than the ring's entries, so a free
            // tracker means a free slot (the SQ head the device reports is not trusted).
            let Some(t) = self.free.pop() else {
                return false;
            };
            let tr = &mut self.trackers[t as usize];
            tr.epoch = tr.epoch.wrapping_add(1) & 0xF;
            let cid = (tr.epoch as u16) << CID_INDEX_BITS | t;
            let prp = self.prp.as_ref().expect("prp pages present");
            let list_off = t as usize * 2 * PAGE;
            let op = req.op;
            let pos = op.offset + req.issued;
            let slba = pos >> self.lba_shift;
            let (cmd, n) = match op.op {
                OpKind::Read | OpKind::Write => {
                    let n = (total - req.issued).min(self.max_xfer);
                    let nlb = (n >> self.lba_shift) as u32;
                    let region = &self.regions[req.region as usize];
                    let addr = op.addr.wrapping_add(req.issued as usize);
                    let (prp1, prp2) = build_prps(region, addr, n as usize, prp, list_off);
                    let cmd = if op.op == OpKind::Read {
                        SubmissionEntry::read(self.nsid, slba, nlb, prp1, prp2)
                    } else {
                        SubmissionEntry::write(self.nsid, slba, nlb, prp1, prp2)
                    };
                    (cmd, n)
                }
                OpKind::Flush => (SubmissionEntry::flush(self.nsid), 1),
                OpKind::WriteZeroes => {
                    let n = (total - req.issued).min(MAX_ZERO_BLOCKS << self.lba_shift);
                    let nlb = (n >> self.lba_shift) as u32;
                    (
                        SubmissionEntry::write_zeroes(self.nsid, slba, nlb, false),
                        n,
                    )
                }
                OpKind::Deallocate => {
                    let n = (total - req.issued).min(MAX_DEALLOC_BLOCKS << self.lba_shift);
                    let range = DsmRange::new(slba, (n >> self.lba_shift) as u32);
                    // SAFETY: the tracker's list pages are live DMA memory owned by this queue
                    // and not in use by the device (the tracker was free).
                    unsafe {
                        std::ptr::write_volatile(prp.ptr().add(list_off).cast::<DsmRange>(), range)
                    };
                    (
                        SubmissionEntry::deallocate(self.nsid, 1, prp.iova(list_off)),
                        n,
                    )
                }
            };
            tr.active = true;
            tr.slot = slot;
            tr.opcode = cmd.opcode;
            tr.submitted_ms = now;
            tr.abort_ms = 0;
            ring.push(&cmd.with_cid(cid));
            req.issued += n;
            req.outstanding += 1;
            self.stats.commands += 1;
        }
        true
    }

    pub fn reap(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Reaped>,
    ) -> Result<()> {
        let start = out.len();
        out.append(&mut self.stash);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut spins = 0u32;
        loop {
            self.poll_once(out)?;
            if let Some(e) = self.pending_error.take() {
                return Err(e);
            }
            let got = (out.len() - start) as u32;
            if got >= want || deadline.is_none() {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(());
                }
                // Share the core after a while (tests run many queues; the model may need
                // this core to make progress).
                if spins > 20_000 {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Submit what is pending, collect completions, check timeouts.
    #[inline]
    fn poll_once(&mut self, out: &mut Vec<Reaped>) -> Result<()> {
        if self.ctrl.generation() != self.generation {
            return self.recover(out, false);
        }
        if !self.live {
            return self.revive();
        }
        if self.sim_inline
            && let Some(sim) = self.ctrl.sim()
        {
            // The model's device works here: fetch what the last doorbell announced, post
            // its completions for the reap below.
            sim.service();
        }
        // Backlog first (requests waiting for trackers), then one doorbell for everything.
        while let Some(&slot) = self.backlog.front() {
            if self.issue(slot) {
                self.backlog.pop_front();
            } else {
                break;
            }
        }
        let reaped = self.reap_cq(out);
        let ring = self.ring.as_mut().expect("ring present");
        if reaped > 0 {
            ring.ring_cq();
        }
        // Doorbell coalescing (SPDK's delay_cmd_submit, made adaptive): new commands wait for
        // a batch while the device is busy and completions keep coming, so the doorbell (an
        // uncached MMIO write, or a shadow-doorbell cache line the device keeps reading) is
        // touched once per batch instead of once per command. Rung at once when the device
        // might go idle: nothing completed in this poll, or it holds only a few commands.
        // Bounded: each poll that reaps lowers the count at the device, so the doorbell rings
        // within that many completions.
        let unrung = ring.sq_unrung();
        if unrung > 0 {
            let active = (self.trackers.len() - self.free.len()) as u16;
            let at_device = active.saturating_sub(unrung);
            if (reaped == 0 || unrung >= self.doorbell_batch || at_device < self.doorbell_batch)
                && ring.ring_sq()
            {
                self.stats.doorbells += 1;
            }
        }
        let now = coarse_ms();
        self.now_ms = now;
        if self.free.len() < self.trackers.len() && now.saturating_sub(self.last_scan_ms) >= SCAN_MS
        {
            self.last_scan_ms = now;
            self.scan(now, out)?;
        }
        Ok(())
    }

    /// Take every completion the controller has posted; returns how many entries were read.
    /// A completion is used only if its SQ id is this queue's and its command id names an
    /// active tracker of the current epoch: the device is untrusted input.
    fn reap_cq(&mut self, out: &mut Vec<Reaped>) -> u32 {
        let ring = self.ring.as_mut().expect("ring present");
        let mut reaped = 0u32;
        while let Some(cqe) = ring.next_cqe() {
            reaped += 1;
            let idx = (cqe.cid & CID_INDEX_MASK) as usize;
            let epoch = (cqe.cid >> CID_INDEX_BITS) as u8;
            let valid = cqe.sq_id == ring.qid
                && self
                    .trackers
                    .get(idx)
                    .is_some_and(|t| t.active && t.epoch == epoch);
            if !valid {
                self.stats.bad_completions += 1;
                tracing::warn!(
                    ctrl = %self.ctrl.name,
                    qid = ring.qid,
                    cid = cqe.cid,
                    sq_id = cqe.sq_id,
                    "completion for a command id that is not outstanding (stale, duplicate or out of range); dropped"
                );
                self.pending_error.get_or_insert(Error::BadNvmeCompletion {
                    ctrl: self.ctrl.name.clone(),
                    qid: ring.qid,
                    cid: cqe.cid,
                    sq_id: cqe.sq_id,
                });
                continue;
            }
            let tr = &mut self.trackers[idx];
            tr.active = false;
            let slot = tr.slot;
            let aborted = tr.abort_ms != 0;
            let submitted = tr.submitted_ms;
            let opcode = tr.opcode;
            self.free.push(idx as u16);
            let req = &mut self.reqs[slot as usize];
            req.outstanding -= 1;
            let status = cqe.status();
            if !status.is_success() && req.fail == Fail::None {
                req.fail = if aborted && status.sct_raw() == 0 && status.sc() == ABORT_REQUESTED {
                    Fail::TimedOut {
                        after_ms: coarse_ms().saturating_sub(submitted),
                    }
                } else {
                    Fail::Nvme(NvmeError::new(false, opcode, status))
                };
            }
            let total = if req.op.op == OpKind::Flush {
                1
            } else {
                req.op.len
            };
            if req.outstanding == 0 && (req.issued >= total || req.fail != Fail::None) {
                if req.issued < total {
                    // Failed before everything was issued: it may still sit in the backlog.
                    self.backlog.retain(|&s| s != slot);
                }
                req.active = false;
                out.push(Reaped {
                    slot,
                    res: match req.op.op {
                        OpKind::Read | OpKind::Write => req.op.len as i32,
                        _ => 0,
                    },
                    fail: req.fail,
                });
            }
        }
        reaped
    }

    /// Every 10 ms while commands are outstanding: a fatal controller status resets the
    /// controller; with timeouts on, a command past its deadline is aborted, and one that has
    /// not completed `abort_ms` after its abort (or whose abort itself failed) resets it.
    fn scan(&mut self, now: u64, out: &mut Vec<Reaped>) -> Result<()> {
        if let Some(why) = self.ctrl.fatal_status() {
            tracing::error!(ctrl = %self.ctrl.name, reason = why, "controller needs a reset");
            return self.reset_and_recover(out, why, true);
        }
        let Some(limit) = self.timeout_ms else {
            return Ok(());
        };
        let qid = self.qid();
        let mut aborting = self
            .trackers
            .iter()
            .filter(|t| t.active && t.abort_ms != 0)
            .count();
        let abort_limit = self.ctrl.abort_limit().max(1) as usize;
        let mut reset = None;
        for i in 0..self.trackers.len() {
            let t = self.trackers[i];
            if !t.active {
                continue;
            }
            if t.abort_ms == 0 && now.saturating_sub(t.submitted_ms) >= limit {
                self.stats.timeouts += 1;
                let cid = (t.epoch as u16) << CID_INDEX_BITS | i as u16;
                tracing::warn!(
                    ctrl = %self.ctrl.name,
                    qid,
                    cid,
                    opcode = spec::opcode_name(false, t.opcode),
                    after_ms = now - t.submitted_ms,
                    "command timed out; aborting"
                );
                if aborting >= abort_limit {
                    // More aborts than the controller accepts at once (Identify ACL): the
                    // device is not keeping up with anything; reset instead.
                    reset = Some("more commands timed out than the abort limit allows");
                    break;
                }
                self.stats.aborts += 1;
                aborting += 1;
                match self.ctrl.abort(qid, cid) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(ctrl = %self.ctrl.name, qid, cid, "controller declined the abort")
                    }
                    Err(e) => {
                        // The admin queue did not answer either: no point in waiting more.
                        tracing::warn!(ctrl = %self.ctrl.name, qid, cid, error = %e, "abort failed");
                        self.trackers[i].abort_ms = coarse_ms().max(1);
                        reset = Some("an abort failed");
                        break;
                    }
                }
                self.trackers[i].abort_ms = coarse_ms().max(1);
            } else if t.abort_ms != 0 && now.saturating_sub(t.abort_ms) >= self.abort_ms {
                reset = Some("a command did not complete after its abort");
            }
        }
        if let Some(why) = reset {
            return self.reset_and_recover(out, why, false);
        }
        Ok(())
    }

    fn reset_and_recover(&mut self, out: &mut Vec<Reaped>, why: &str, fatal: bool) -> Result<()> {
        self.stats.resets += 1;
        // Another queue may have reset it meanwhile: then only recover.
        let r = self.ctrl.reset(self.generation, why);
        let rec = self.recover(out, fatal);
        r.and(rec)
    }

    /// The controller was reset (by this queue or another): once the reset is over, completions
    /// it had posted are taken as they are, everything else outstanding on this queue completes
    /// with an error, exactly once, and the queue pair is created again.
    fn recover(&mut self, out: &mut Vec<Reaped>, fatal: bool) -> Result<()> {
        // The reset holds the admin lock until the controller is disabled and enabled again (or
        // quiesced): only then may buffers go back to their owners.
        self.ctrl.wait_reset_done();
        self.reap_cq(out);
        self.fail_all(out, fatal);
        self.live = false;
        self.generation = self.ctrl.generation();
        self.revive()
    }

    /// Create the queue pair again after a reset; until that works the queue refuses work.
    fn revive(&mut self) -> Result<()> {
        if self.ctrl.is_dead() {
            return Err(Error::Controller {
                ctrl: self.ctrl.name.clone(),
                reason: "the controller failed to reset and is unusable".into(),
            });
        }
        let ring = self.ring.as_mut().expect("ring present");
        match self.ctrl.recreate_io_ring(ring) {
            Ok(generation) => {
                self.generation = generation;
                self.live = true;
                Ok(())
            }
            Err(e) => Err(Error::Controller {
                ctrl: self.ctrl.name.clone(),
                reason: format!(
                    "cannot create queue pair {} again after a reset: {e}",
                    ring.qid
                ),
            }),
        }
    }

    fn fail_all(&mut self, out: &mut Vec<Reaped>, fatal: bool) {
        let now = coarse_ms();
        for (i, t) in self.trackers.iter_mut().enumerate() {
            if t.active {
                t.active = false;
                self.free.push(i as u16);
                let req = &mut self.reqs[t.slot as usize];
                if t.abort_ms != 0 && req.fail == Fail::None {
                    // It timed out (and caused or preceded the reset).
                    req.fail = Fail::TimedOut {
                        after_ms: now.saturating_sub(t.submitted_ms),
                    };
                }
            }
        }
        self.backlog.clear();
        for (slot, req) in self.reqs.iter_mut().enumerate() {
            if req.active {
                req.active = false;
                req.outstanding = 0;
                let fail = match req.fail {
                    Fail::None => Fail::Reset { fatal },
                    f => f,
                };
                out.push(Reaped {
                    slot: slot as u32,
                    res: 0,
                    fail,
                });
            }
        }
    }

    pub fn abandon(&mut self) {
        self.abandoned = true;
    }

    /// Unmap a region from the device (a pool gave it back). The caller guarantees no I/O on
    /// it is in flight. Unknown regions are ignored.
    pub fn remove_region(&mut self, ptr: *mut u8) {
        if let Some(i) = self.regions.iter().position(|r| r.starts_at(ptr))
            && i > 0
        {
            let mut r = self.regions.remove(i);
            self.ctrl.mapper().release(&mut r);
            // Requests hold region indexes: none is in flight (the caller's guarantee), so
            // re-indexing is safe.
        }
    }

    /// Map more memory for DMA (e.g. a buffer pool that grew).
    ///
    /// # Safety
    /// The memory stays mapped and unmoved until this queue is dropped.
    pub unsafe fn add_region(
        &mut self,
        ptr: *mut u8,
        len: usize,
        kind: rio_sys::mem::PageKind,
    ) -> Result<()> {
        // SAFETY: caller contract.
        let r = unsafe { self.ctrl.mapper().map(ptr, len, kind)? };
        self.regions.push(r);
        Ok(())
    }
}

impl Drop for NvmeQueue {
    fn drop(&mut self) {
        let mapper = self.ctrl.mapper();
        if self.abandoned {
            // Commands may still be in the device: keep the rings, lists and arena mapped.
            tracing::error!(ctrl = %self.ctrl.name, qid = self.qid(), "abandoning a queue pair with commands outstanding");
            std::mem::forget(self.ring.take());
            std::mem::forget(self.prp.take());
            std::mem::forget(std::mem::take(&mut self.regions));
            return;
        }
        if let Some(ring) = self.ring.take() {
            self.ctrl.delete_io_ring(ring, self.generation);
        }
        if let Some(p) = self.prp.take() {
            p.release(mapper);
        }
        for mut r in std::mem::take(&mut self.regions) {
            mapper.release(&mut r);
        }
    }
}

/// PRP1/PRP2 for `len` bytes at `addr` (NVMe 1.4 §4.3): PRP2 unused, a second page, or a list
/// in the tracker's two list pages (the last entry of the first page chains to the second when
/// more than 512 entries are needed).
#[inline]
fn build_prps(
    arena: &DmaRegion,
    addr: *mut u8,
    len: usize,
    lists: &DmaMem,
    list_off: usize,
) -> (u64, u64) {
    let prp1 = arena.iova(addr);
    let first = PAGE - (prp1 as usize & (PAGE - 1));
    if len <= first {
        return (prp1, 0);
    }
    let rest = len - first;
    let second = addr.wrapping_add(first);
    if rest <= PAGE {
        return (prp1, arena.iova(second));
    }
    let pages = rest.div_ceil(PAGE);
    const PER_PAGE: usize = PAGE / 8;
    let list = lists.ptr().wrapping_add(list_off).cast::<u64>();
    let mut slot = 0usize;
    for p in 0..pages {
        if slot == PER_PAGE - 1 && pages - p > 1 {
            // Chain: the last entry of list page 0 points at list page 1.
            // SAFETY: index < 2 pages of u64s inside the tracker's list area.
            unsafe { list.add(slot).write(lists.iova(list_off + PAGE)) };
            slot += 1;
        }
        assert!(slot < 2 * PER_PAGE, "transfer exceeds the PRP list space");
        // SAFETY: as above (max_xfer bounds `pages` to what two list pages hold).
        unsafe {
            list.add(slot)
                .write(arena.iova(second.wrapping_add(p * PAGE)))
        };
        slot += 1;
    }
    (prp1, lists.iova(list_off))
}

/// Milliseconds of CLOCK_MONOTONIC_COARSE: a few ns to read, plenty for command timeouts.
#[inline]
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC_COARSE is always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}
