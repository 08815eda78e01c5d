//! The userspace NVMe backend: one I/O queue pair of a [`Controller`] per [`crate::Queue`],
//! polled by the thread that owns it. Serves `pcie://` targets (vfio-pci) and `sim://` (the
//! same driver against the software controller model).
//!
//! Per queue pair: trackers indexed by command id, each with two preallocated PRP list pages;
//! requests larger than MDTS split into several commands (a backlog holds what does not fit
//! the SQ yet); one doorbell write per poll batch while the device is busy, at once when it is
//! idle (`push`); completions validated against the tracker
//! table (the device is untrusted input); timeouts escalate abort → controller reset, after
//! which every outstanding request completes exactly once with an error.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Fail, RawOp, Reaped};
use crate::config::SglMode;
use crate::error::{Error, Result};
use crate::nvme::ctrl::{AbortSubmit, AbortTicket, Controller, PAGE};
use crate::nvme::dma::{DmaMem, DmaRegion};
use crate::nvme::ring::Ring;
use crate::nvme::spec::{self, DsmRange, NvmeError, SglDescriptor, SubmissionEntry};
use crate::op::OpKind;

/// Command ids: low 12 bits index the tracker, high 4 bits count its reuses, so a stale
/// completion for a reused tracker is recognised (as Linux's nvme driver does).
const CID_INDEX_BITS: u32 = 12;
const CID_INDEX_MASK: u16 = (1 << CID_INDEX_BITS) - 1;
/// How often (ms) outstanding commands are checked against the timeout, and the admin queue
/// polled for abort answers and asynchronous events.
const SCAN_MS: u64 = 10;
/// Generic status "Command Abort Requested".
const ABORT_REQUESTED: u8 = spec::generic_status::ABORT_REQUESTED;
/// Commands gathered before an SQ doorbell while the device is busy (see `poll_once`).
const DOORBELL_BATCH: u16 = 8;
/// Largest doorbell batch a caller may set.
pub(crate) const MAX_DOORBELL_BATCH: u16 = 256;
/// Largest Write Zeroes / Deallocate per command, in blocks.
const MAX_ZERO_BLOCKS: u64 = spec::MAX_NLB as u64;
const MAX_DEALLOC_BLOCKS: u64 = u32::MAX as u64;
/// PRP entries one tracker's two list pages hold: 512 + 512, less the chain entry.
const PRP_LIST_ENTRIES: usize = 2 * (PAGE / 8) - 1;
/// Re-creating a queue pair after a reset: first retry after this long, doubling up to the
/// maximum while it keeps failing.
const REVIVE_BACKOFF_MIN_MS: u64 = 1;
const REVIVE_BACKOFF_MAX_MS: u64 = 1000;

#[derive(Clone, Copy, Debug, Default)]
struct Tracker {
    active: bool,
    epoch: u8,
    /// Counted as timed out already (an abort may still be waiting for its turn).
    timed_out: bool,
    /// Retries of this piece so far.
    retries: u8,
    slot: u32,
    opcode: u8,
    /// The piece of the request this command carries: byte offset into it, and length.
    pos: u64,
    len: u64,
    submitted_ms: u64,
    /// When an abort was sent (0: none).
    abort_ms: u64,
    /// Waiting to be sent again at this time (0: not waiting); its completion arrived with a
    /// status that allows a retry.
    retry_due_ms: u64,
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

impl Req {
    /// Bytes to transfer (1 for a flush: it is one command).
    #[inline]
    fn total(&self) -> u64 {
        match self.op.op {
            OpKind::Flush => 1,
            _ => self.op.len,
        }
    }
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct NvmeQueueStats {
    pub commands: u64,
    pub doorbells: u64,
    pub bad_completions: u64,
    pub aborts: u64,
    /// Aborts that had to wait: the controller-wide abort limit was reached, or the admin
    /// queue was busy.
    pub aborts_deferred: u64,
    pub resets: u64,
    pub timeouts: u64,
    /// Commands sent again after a status that allowed it.
    pub retries: u64,
    /// Commands whose data was described with an SGL.
    pub sgl_commands: u64,
}

/// Whether the queue pair exists on the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnDevice {
    Yes,
    /// Certainly not (deleted by a reset, or its creation failed with an error status).
    No,
    /// Unknown (a creation that did not complete): its id and memory are never reused.
    Unknown,
}

pub(crate) struct NvmeQueue {
    ctrl: Arc<Controller>,
    sim: bool,
    /// The controller is an inline model: each poll runs a pass of the device first.
    sim_inline: bool,
    nsid: u32,
    lba_shift: u32,
    /// The controller's namespace epoch when the geometry above was read.
    ns_epoch: u64,
    /// Why new I/O is refused for good (the namespace changed under the queue).
    ns_broken: Option<String>,
    ring: Option<Ring>,
    generation: u64,
    trackers: Vec<Tracker>,
    /// The abort sent for each tracker, while one is outstanding.
    tickets: Vec<Option<Arc<AbortTicket>>>,
    free: Vec<u16>,
    /// Trackers waiting to be sent again (see `Tracker::retry_due_ms`).
    retrying: Vec<u16>,
    /// Two PRP list pages per tracker (or SGL segments).
    prp: Option<DmaMem>,
    /// DMA mappings of the queue's arena and of any memory its owner added.
    regions: Vec<DmaRegion>,
    reqs: Vec<Req>,
    backlog: VecDeque<u32>,
    max_xfer: u64,
    sgl: SglMode,
    /// The controller supports SGLs and the options allow them.
    sgl_ok: bool,
    max_retries: u8,
    timeout_ms: Option<u64>,
    abort_ms: u64,
    last_scan_ms: u64,
    /// When the SQ doorbell was last rung.
    last_ring_ms: u64,
    /// CLOCK_MONOTONIC_COARSE, refreshed at each poll and push.
    now_ms: u64,
    /// A protocol violation seen while reaping, reported after the batch is handed over.
    pending_error: Option<Error>,
    stats: NvmeQueueStats,
    /// Commands gathered before the SQ doorbell rings while the device is busy (MMIO
    /// doorbells only; with shadow doorbells every submission updates the shadow tail).
    doorbell_batch: u16,
    abandoned: bool,
    /// Inside a batch of completions being handed over (`batch_begin`..`batch_end`).
    in_batch: bool,
    /// A doorbell write held until the end of that batch (`push`): the MMIO write a shadow
    /// doorbell's EventIdx asked for, or the whole doorbell without shadow doorbells.
    owed: bool,
    /// The same for the CQ head's shadow doorbell.
    owed_cq: bool,
    /// The CQ head is owed because the controller needs the room (`cq_room_low`): its MMIO
    /// write then goes before the SQ tail's, else after it (`pay_owed`).
    owed_cq_room: bool,
    /// Completions produced outside a poll (a recovery in `push`), handed over by the next one.
    stash: Vec<Reaped>,
    on_device: OnDevice,
    /// Re-creating the queue pair failed: not before this time again, and why.
    revive_at_ms: u64,
    revive_backoff_ms: u64,
    revive_error: Option<String>,
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
        let ns_epoch = ctrl.namespace_epoch();
        let ns = ctrl.namespace(nsid).ok_or_else(|| Error::Controller {
            ctrl: ctrl.name.clone(),
            reason: format!("namespace {nsid} is not active"),
        })?;
        let max_xfer = ctrl.max_xfer() as u64;
        if max_xfer < ns.block_size as u64 {
            return Err(Error::Controller {
                ctrl: ctrl.name.clone(),
                reason: format!(
                    "largest transfer (MDTS) {max_xfer} B is smaller than namespace {nsid}'s block ({} B)",
                    ns.block_size
                ),
            });
        }
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
        // The stamps can be old by up to SCAN_MS (a command carries the last poll's clock,
        // and `poll_once` moves it only after a longer gap) and the coarse clock can be a tick
        // behind at either end: the limit is checked with that much added, so a command never
        // times out before it was at the device for the whole limit (it may be reported late
        // by up to twice SCAN_MS and a tick, the scan interval included).
        let timeout_ms = opts
            .command_timeout
            .map(|t| t.as_millis().max(1) as u64 + SCAN_MS + coarse_tick_ms());
        let sim = ctrl.sim().is_some();
        let sim_inline = ctrl.sim().is_some_and(|s| s.is_inline());
        let sgl_ok = ctrl.uses_sgl();
        if opts.sgl == SglMode::Always && !sgl_ok {
            tracing::warn!(ctrl = %ctrl.name, "nvme_sgl=always, but the controller does not support SGLs: using PRPs");
        }
        tracing::debug!(
            ctrl = %ctrl.name,
            qid = ring.qid,
            entries = ring.entries,
            trackers = ntr,
            sgl = sgl_ok,
            "I/O queue pair created"
        );
        let now = coarse_ms();
        Ok(NvmeQueue {
            abort_ms: opts.admin_timeout.as_millis().max(1) as u64,
            ctrl,
            sim,
            sim_inline,
            nsid,
            lba_shift,
            ns_epoch,
            ns_broken: None,
            ring: Some(ring),
            generation,
            trackers: vec![Tracker::default(); ntr],
            tickets: vec![None; ntr],
            free: (0..ntr as u16).rev().collect(),
            retrying: Vec::new(),
            prp: Some(prp),
            regions: mapped,
            reqs: Vec::with_capacity(depth as usize),
            backlog: VecDeque::with_capacity(depth as usize),
            max_xfer,
            sgl: opts.sgl,
            sgl_ok,
            max_retries: opts.max_retries,
            timeout_ms,
            last_scan_ms: now,
            last_ring_ms: now,
            now_ms: now,
            pending_error: None,
            stats: NvmeQueueStats::default(),
            doorbell_batch: DOORBELL_BATCH,
            abandoned: false,
            in_batch: false,
            owed: false,
            owed_cq: false,
            owed_cq_room: false,
            stash: Vec::new(),
            on_device: OnDevice::Yes,
            revive_at_ms: 0,
            revive_backoff_ms: REVIVE_BACKOFF_MIN_MS,
            revive_error: None,
        })
    }

    pub fn backend_name(&self) -> &'static str {
        if self.sim { "sim" } else { "vfio" }
    }

    /// Commands gathered per SQ doorbell while the device is busy: 1 with shadow doorbells
    /// (each submission updates the shadow tail at once; see `push`).
    pub fn submit_batch(&self) -> u32 {
        if self.ring.as_ref().is_some_and(|r| r.has_shadow()) {
            1
        } else {
            self.doorbell_batch as u32
        }
    }

    /// Sets the doorbell batch (1 rings for every poll with new commands; clamped to
    /// 1..=[`MAX_DOORBELL_BATCH`]). Used with MMIO doorbells only.
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
        // Commands are stamped with the last poll's clock (`now_ms`), not a clock read per
        // command (3% of the inline model's time): the device may see them only at a later
        // poll's doorbell (MMIO doorbells, a busy device), and `poll_once` moves the stamps
        // of commands queued across a stall of the owner forward. A stamp is then old by at
        // most SCAN_MS, which the timeout check allows for (see `timeout_ms` in `new`): never
        // early.
        if self.ctrl.generation() != self.generation || self.on_device != OnDevice::Yes {
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
        if let Some(why) = &self.ns_broken {
            return Err(Error::Controller {
                ctrl: self.ctrl.name.clone(),
                reason: why.clone(),
            });
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
        let req = Req {
            op: *op,
            region,
            issued: 0,
            outstanding: 0,
            fail: Fail::None,
            active: true,
        };
        if i >= self.reqs.len() {
            self.reqs.resize(
                i + 1,
                Req {
                    active: false,
                    ..req
                },
            );
        }
        self.reqs[i] = req;
        if !self.backlog.is_empty() || !self.issue(slot) {
            self.backlog.push_back(slot);
        }
        // Rung now, not at the owner's next poll, when the device holds nothing else: until
        // then (the owner's other handlers, its loop, the poll's own work) the device would
        // sit idle, so every instruction on the way is latency. Measured in the TCG guest
        // (docs/DESIGN.md): 4K QD1 +3% and +12% in two boots (medians of 6 alternating
        // rounds). And always with shadow doorbells: a doorbell is then a store to memory the
        // controller re-reads while it works (an MMIO write only when its EventIdx asks), so
        // a busy controller picks the command up without being told, where a batch held back
        // for the poll let it run dry and wait for an MMIO write and its wake-up (QEMU's
        // controller: with the batch, twice the MMIO doorbells per command; without, 4K QD32
        // +1% to +31%, median +6%, 6 alternating rounds, SPDK's order). With MMIO doorbells and
        // a busy device, submissions gather for the poll's doorbell (`poll_once`). With MMIO
        // doorbells the CQ head goes first, as there: the controller must find room for the
        // completions of what starts; with shadow doorbells only when that room is short
        // (`cq_room_low`; why, in `poll_once`).
        // The command carries the last poll's clock; after a stall of the owner the next poll
        // moves such stamps forward (`poll_once`), so a timeout can only come late.
        if let Some(ring) = self.ring.as_mut() {
            let unrung = ring.sq_unrung();
            let active = (self.trackers.len() - self.free.len()) as u16;
            if unrung > 0 && (ring.has_shadow() || active == unrung) {
                // The shadow values go out now; the MMIO writes are owed, and made at once
                // unless a batch is being handed over (`batch_begin`).
                if ring.has_shadow() {
                    // The CQ head goes along when the ring needs the room, or when this is
                    // the only command at the device (why, in `poll_once`).
                    let room = cq_room_low(ring, active);
                    let (cq, sq) = ring.ring_both_shadow(room || active == 1);
                    self.owed_cq |= cq;
                    self.owed_cq_room |= cq && room;
                    self.owed |= sq;
                } else {
                    self.owed = true;
                }
                self.last_ring_ms = self.now_ms;
                if !self.in_batch {
                    self.pay_owed();
                }
            }
        }
        Ok(())
    }

    /// The owner starts handing over a batch of completions, whose handlers may submit
    /// (`Queue::wait_each`). Until [`NvmeQueue::batch_end`], a submission that needs an MMIO
    /// doorbell write holds it back (`push`): one write then starts them all (and one for the
    /// CQ head, before it). With shadow doorbells the shadow values are still updated at each
    /// submission, so a controller in the middle of a pass over the queue takes the command
    /// without being told. Why: an MMIO write is the costly part of a doorbell (an uncached
    /// write; under QEMU it also takes the emulator's big lock, which its device thread holds
    /// while it works), and a write per submission made each time the controller had caught up
    /// split its passes over the queue: at 4K QD32 in the TCG guest, SQ doorbell writes per
    /// I/O 0.165 against `spdk_nvme_perf`'s 0.031 with a TCG plugin slowing the guest, 0.05-0.06
    /// against 0.031 under QEMU's tracing; held to the batch's end, 0.031 and 0.032
    /// (docs/DESIGN.md, "rio against SPDK", session 25).
    #[inline]
    pub fn batch_begin(&mut self) {
        self.in_batch = true;
    }

    /// The batch is handed over: the doorbell write held back, if any, now.
    #[inline]
    pub fn batch_end(&mut self) {
        self.in_batch = false;
        self.pay_owed();
    }

    /// Write the doorbell `push` owes (at once, or held to a batch's end), unless the queue
    /// pair is gone meanwhile (a reset: nothing of it is outstanding any more).
    #[inline]
    fn pay_owed(&mut self) {
        if !self.owed && !self.owed_cq {
            return;
        }
        let (sq, cq, room) = (self.owed, self.owed_cq, self.owed_cq_room);
        self.owed = false;
        self.owed_cq = false;
        self.owed_cq_room = false;
        if self.ctrl.generation() != self.generation || self.on_device != OnDevice::Yes {
            return;
        }
        if let Some(ring) = self.ring.as_mut() {
            if ring.has_shadow() {
                // Both shadow values are already out (`ring_both_shadow`): the MMIO writes only
                // wake the controller. The CQ head's goes first when the controller needs its
                // room for the completions of what starts; otherwise (the head riding along with
                // a lone command, QD1) the SQ tail's goes first, so that the command starts one
                // MMIO write sooner (under QEMU, each is a trip through its big lock). SPDK's
                // driver, with its default of a doorbell per command, writes the SQ tail from
                // inside its completion loop and the CQ head after it, the same order. Measured
                // in the TCG guest, 4K QD1, against CQ-first, three boots of 10 alternating
                // rounds of 3 s: per-round medians 1.08, 1.00 and 1.02, 20 of 30 rounds above 1
                // (docs/DESIGN.md, "rio against SPDK", session 27): a small gain at most, in an
                // emulator whose runs swing by a quarter.
                if cq && room {
                    ring.write_cq_db();
                }
                if sq {
                    ring.write_sq_db();
                    self.stats.doorbells += 1;
                }
                if cq && !room {
                    ring.write_cq_db();
                }
            } else {
                ring.ring_cq();
                if ring.ring_sq() {
                    self.stats.doorbells += 1;
                }
            }
        }
    }

    /// Whether a read or write piece of `n` bytes at `addr` goes out with an SGL: when the
    /// controller takes them and the options say so (`auto`: only where a PRP list would be
    /// needed, i.e. past the second memory page).
    #[inline]
    fn use_sgl(&self, iova: u64, n: u64) -> bool {
        if !self.sgl_ok {
            return false;
        }
        match self.sgl {
            SglMode::Always => true,
            SglMode::Off => false,
            SglMode::Auto => n > first_page_bytes(iova) + PAGE as u64,
        }
    }

    /// Length of the next command of request `req` starting `pos` bytes into it: at most
    /// MDTS, at most what the tracker's PRP list describes for this buffer's offset within a
    /// page, a whole number of blocks.
    #[inline]
    fn piece_len(&self, req: &Req, pos: u64) -> u64 {
        let rest = req.total() - pos;
        match req.op.op {
            OpKind::Flush => 1,
            OpKind::WriteZeroes => rest.min(MAX_ZERO_BLOCKS << self.lba_shift),
            OpKind::Deallocate => rest.min(MAX_DEALLOC_BLOCKS << self.lba_shift),
            OpKind::Read | OpKind::Write => {
                let n = rest.min(self.max_xfer);
                let iova = self.regions[req.region as usize]
                    .iova(req.op.addr.wrapping_add(pos as usize) as *const u8);
                let n = if self.use_sgl(iova, n) {
                    n
                } else {
                    // PRP1 covers the rest of the first page, the list the pages after it.
                    n.min(first_page_bytes(iova) + (PRP_LIST_ENTRIES * PAGE) as u64)
                };
                // Whole blocks; never 0 (max_xfer >= block size, checked at creation, and the
                // PRP span is at least 4 MiB - 4 KiB).
                let bs_mask = (1u64 << self.lba_shift) - 1;
                (n & !bs_mask).max(1 << self.lba_shift).min(rest)
            }
        }
    }

    /// The command for bytes `pos..pos+n` of request `slot` on tracker `t` (its list pages
    /// are written here). `Err(errno)` if the buffer cannot be described (a driver bug: the
    /// piece length is chosen to fit). Inlined into `issue`, so the 64-byte entry is built in
    /// registers and stored into the ring once, not returned through a stack copy (which
    /// stalled on store forwarding: a third of `issue`'s samples).
    #[inline(always)]
    fn command(
        &mut self,
        slot: u32,
        t: u16,
        pos: u64,
        n: u64,
    ) -> std::result::Result<SubmissionEntry, i32> {
        // The fields, not a copy of the whole request (80 bytes, per command).
        let (kind, offset, addr, region) = {
            let r = &self.reqs[slot as usize];
            (r.op.op, r.op.offset, r.op.addr, r.region)
        };
        let slba = (offset + pos) >> self.lba_shift;
        let list_off = t as usize * 2 * PAGE;
        let lists = self.prp.as_ref().expect("prp pages present");
        Ok(match kind {
            OpKind::Read | OpKind::Write => {
                let nlb = (n >> self.lba_shift) as u32;
                let region = &self.regions[region as usize];
                let addr = addr.wrapping_add(pos as usize);
                let base = if kind == OpKind::Read {
                    SubmissionEntry::read(self.nsid, slba, nlb, 0, 0)
                } else {
                    SubmissionEntry::write(self.nsid, slba, nlb, 0, 0)
                };
                if self.use_sgl(region.iova(addr), n) {
                    let d =
                        build_sgl(region, addr, n as usize, lists, list_off).ok_or(libc::EINVAL)?;
                    self.stats.sgl_commands += 1;
                    base.with_sgl(d)
                } else {
                    let (p1, p2) = build_prps(region, addr, n as usize, lists, list_off)
                        .ok_or(libc::EINVAL)?;
                    base.with_prp(p1, p2)
                }
            }
            OpKind::Flush => SubmissionEntry::flush(self.nsid),
            OpKind::WriteZeroes => {
                SubmissionEntry::write_zeroes(self.nsid, slba, (n >> self.lba_shift) as u32, false)
            }
            OpKind::Deallocate => {
                let range = DsmRange::new(slba, (n >> self.lba_shift) as u32);
                // SAFETY: the tracker's list pages are live DMA memory owned by this queue
                // and not in use by the device (the tracker is not outstanding).
                unsafe {
                    std::ptr::write_volatile(lists.ptr().add(list_off).cast::<DsmRange>(), range)
                };
                SubmissionEntry::deallocate(self.nsid, 1, lists.iova(list_off))
            }
        })
    }

    /// Turn as much of request `slot` into commands as trackers and SQ space allow. Returns
    /// true when the whole request is issued (or failed).
    #[inline]
    fn issue(&mut self, slot: u32) -> bool {
        let now = self.now_ms;
        loop {
            let (total, issued, failed) = {
                let r = &self.reqs[slot as usize];
                (r.total(), r.issued, r.fail != Fail::None)
            };
            if issued >= total {
                return true;
            }
            if failed {
                // A piece failed: do not issue the rest (the request completes when its last
                // outstanding piece does; handed over by the next poll if none is).
                self.reqs[slot as usize].issued = total;
                let mut done = std::mem::take(&mut self.stash);
                self.complete_if_done(slot, &mut done);
                self.stash = done;
                return true;
            }
            // No SQ-space check: trackers are one fewer than the ring's entries, so a free
            // tracker means a free slot (the SQ head the device reports is not trusted).
            let Some(t) = self.free.pop() else {
                return false;
            };
            let pos = issued;
            let n = self.piece_len(&self.reqs[slot as usize], pos);
            let cmd = match self.command(slot, t, pos, n) {
                Ok(c) => c,
                Err(errno) => {
                    self.free.push(t);
                    let r = &mut self.reqs[slot as usize];
                    r.fail = Fail::Errno(errno);
                    r.issued = total;
                    let mut done = std::mem::take(&mut self.stash);
                    self.complete_if_done(slot, &mut done);
                    self.stash = done;
                    return true;
                }
            };
            let tr = &mut self.trackers[t as usize];
            tr.epoch = tr.epoch.wrapping_add(1) & 0xF;
            let cid = (tr.epoch as u16) << CID_INDEX_BITS | t;
            *tr = Tracker {
                active: true,
                epoch: tr.epoch,
                timed_out: false,
                retries: 0,
                slot,
                opcode: cmd.opcode,
                pos,
                len: n,
                submitted_ms: now,
                abort_ms: 0,
                retry_due_ms: 0,
            };
            self.tickets[t as usize] = None;
            self.ring
                .as_mut()
                .expect("ring present while the queue lives")
                .push(&cmd.with_cid(cid));
            let r = &mut self.reqs[slot as usize];
            r.issued += n;
            r.outstanding += 1;
            self.stats.commands += 1;
            if r.issued >= total {
                // The common case, one command per request: done without another pass.
                return true;
            }
        }
    }

    /// Send again the pieces whose retry delay has passed (same tracker, new epoch).
    fn resend_due(&mut self) {
        let now = self.now_ms;
        let mut i = 0;
        while i < self.retrying.len() {
            let t = self.retrying[i];
            let tr = self.trackers[t as usize];
            if tr.retry_due_ms > now {
                i += 1;
                continue;
            }
            self.retrying.swap_remove(i);
            let cmd = match self.command(tr.slot, t, tr.pos, tr.len) {
                Ok(c) => c,
                Err(_) => unreachable!("the same piece was described before"),
            };
            let tr = &mut self.trackers[t as usize];
            tr.epoch = tr.epoch.wrapping_add(1) & 0xF;
            tr.retry_due_ms = 0;
            tr.submitted_ms = now;
            tr.abort_ms = 0;
            tr.timed_out = false;
            let cid = (tr.epoch as u16) << CID_INDEX_BITS | t;
            self.tickets[t as usize] = None;
            self.ring
                .as_mut()
                .expect("ring present")
                .push(&cmd.with_cid(cid));
            self.stats.commands += 1;
            self.stats.retries += 1;
        }
    }

    pub fn reap(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Reaped>,
    ) -> Result<bool> {
        let start = out.len();
        out.append(&mut self.stash);
        // The stash counts toward `want`: the helper counts from the length at its entry.
        let want = want.saturating_sub((out.len() - start) as u32);
        super::spin_reap(want, timeout, out, |out| {
            self.poll_once(out)?;
            match self.pending_error.take() {
                Some(e) => Err(e),
                None => Ok(false),
            }
        })
    }

    /// Submit what is pending, collect completions, check timeouts.
    #[inline]
    fn poll_once(&mut self, out: &mut Vec<Reaped>) -> Result<()> {
        // The clock first: commands issued from the backlog below are stamped with it, and an
        // owner that did not poll for a long while must not see fresh commands time out.
        let now = coarse_ms();
        let before = std::mem::replace(&mut self.now_ms, now);
        if now.saturating_sub(before) > SCAN_MS {
            // The owner did not poll for a while: what it queued meanwhile carries the last
            // poll's clock (`push`), though it may have been queued just now. Counted from
            // now (a timeout can come late by the stall; within SCAN_MS the check's margin
            // covers the stamp's age).
            for t in self.trackers.iter_mut() {
                if t.active && t.submitted_ms >= before {
                    t.submitted_ms = now;
                }
            }
        }
        if self.ctrl.generation() != self.generation {
            return self.recover(out, false);
        }
        if self.on_device != OnDevice::Yes {
            return self.revive();
        }
        // A doorbell held back by a batch that ended without `batch_end` (only if the
        // owner's guard itself failed; a panicking handler still ends the batch): written
        // before anything else.
        self.in_batch = false;
        self.pay_owed();
        if self.sim_inline
            && let Some(sim) = self.ctrl.sim()
        {
            // The model's device works here: fetch what the last doorbell announced, post
            // its completions for the reap below.
            sim.service();
        }
        if !self.retrying.is_empty() {
            self.resend_due();
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
        // The CQ head is not written in the poll that consumed the entries but later, after
        // the owner has reacted to them (usually by submitting more): right before the next
        // SQ doorbell (below; SPDK's order: completions, callbacks, CQ head, SQ tail), or at
        // the first poll that finds nothing new, or once half the ring is held. Measured in
        // the TCG guest (docs/DESIGN.md, "rio against SPDK"): a CQ-head write right behind
        // the controller's completion post met QEMU's device model still holding its lock,
        // and 4K QD1 went from 20-22k to 26-42k IOPS when it moved. The controller never
        // finds the CQ full for it: every SQ doorbell is preceded by a CQ doorbell, so the
        // entries it has posted and not seen freed belong to commands outstanding at that
        // moment, at most the tracker count (entries - 1). (Writing the CQ head only when
        // that bound needs it, one doorbell per I/O at QD1 instead of two, measured the same
        // in the guest, so the head is kept fresh.)
        //
        // With shadow doorbells the head goes back only once half the ring is held, or with a
        // submission that needs the room (`cq_room_low` in `push`, which keeps the bound
        // above), or with a submission the device gets alone. A controller that shadows the
        // head re-reads it whenever it posts and asks for an MMIO write (its CQ EventIdx) each
        // time the head passes the value it last read, i.e. when the head moves while it is
        // posting; under QEMU that write waited for the big lock the device thread holds then
        // (the vCPU's lock waits fell from ~4,700/s to ~3,600/s without it), and 4K QD32 in
        // the TCG guest went +9% to +40% per round, 13 of 14 rounds in three boots. A device
        // that holds nothing else is not posting: there the head still goes with the
        // submission, as before (4K QD1 against not giving it back there: per-round medians
        // 1.065 and 1.05 in two boots, 21 of 26 rounds above 1; why, not found).
        // docs/DESIGN.md, "rio against SPDK", session 26.
        if (reaped == 0 && !ring.has_shadow()) || ring.cq_unrung() >= ring.entries / 2 {
            ring.ring_cq();
        }
        // Doorbell coalescing with MMIO doorbells (SPDK's delay_cmd_submit, made adaptive):
        // new commands wait for a batch while the device is busy and completions keep coming,
        // so the doorbell (an uncached MMIO write) is touched once per batch instead of once
        // per command. Rung at once when the device might go idle: nothing completed in this
        // poll, or it holds only a few commands. Bounded: each poll that reaps lowers the
        // count at the device, so the doorbell rings within that many completions. With
        // shadow doorbells nothing waits (`push`): what is left here came from the backlog.
        let unrung = ring.sq_unrung();
        if unrung > 0 {
            let active = (self.trackers.len() - self.free.len()) as u16;
            let at_device = active.saturating_sub(unrung);
            if reaped == 0
                || ring.has_shadow()
                || unrung >= self.doorbell_batch
                || at_device < self.doorbell_batch
            {
                // Slots first, so the commands about to start find room for their completions.
                ring.ring_cq();
                if ring.ring_sq() {
                    self.stats.doorbells += 1;
                }
                if now.saturating_sub(self.last_ring_ms) > SCAN_MS {
                    // The owner queued commands and did not poll for a while: the device sees
                    // them only now, so their timeouts count from now.
                    for t in self.trackers.iter_mut() {
                        if t.active && t.submitted_ms >= self.last_ring_ms {
                            t.submitted_ms = now;
                        }
                    }
                }
                self.last_ring_ms = now;
            }
        }
        if now.saturating_sub(self.last_scan_ms) >= SCAN_MS {
            self.last_scan_ms = now;
            self.scan(now, out)?;
        }
        Ok(())
    }

    /// Take the completions the controller has posted, at most a ring's worth per poll (a
    /// device that keeps posting cannot pin the poller); returns how many entries were read.
    /// A completion is used only if its SQ id is this queue's and its command id names an
    /// active tracker of the current epoch that is not waiting for a retry: the device is
    /// untrusted input.
    fn reap_cq(&mut self, out: &mut Vec<Reaped>) -> u32 {
        let now = self.now_ms;
        let ring = self.ring.as_mut().expect("ring present");
        let qid = ring.qid;
        let limit = ring.entries as u32;
        let mut reaped = 0u32;
        while reaped < limit {
            let Some(cqe) = self.ring.as_mut().expect("ring present").next_cqe() else {
                break;
            };
            reaped += 1;
            let idx = (cqe.cid & CID_INDEX_MASK) as usize;
            let epoch = (cqe.cid >> CID_INDEX_BITS) as u8;
            let valid = cqe.sq_id == qid
                && self
                    .trackers
                    .get(idx)
                    .is_some_and(|t| t.active && t.epoch == epoch && t.retry_due_ms == 0);
            if !valid {
                self.stats.bad_completions += 1;
                tracing::warn!(
                    ctrl = %self.ctrl.name,
                    qid,
                    cid = cqe.cid,
                    sq_id = cqe.sq_id,
                    "completion for a command id that is not outstanding (stale, duplicate or out of range); dropped"
                );
                self.pending_error.get_or_insert(Error::BadNvmeCompletion {
                    ctrl: self.ctrl.name.clone(),
                    qid,
                    cid: cqe.cid,
                    sq_id: cqe.sq_id,
                });
                continue;
            }
            let status = cqe.status();
            let tr = self.trackers[idx];
            let aborted = tr.abort_ms != 0;
            let slot = tr.slot;
            if !status.is_success() {
                let req = &self.reqs[slot as usize];
                let retry = !status.dnr()
                    && !aborted
                    && tr.retries < self.max_retries
                    && req.fail == Fail::None
                    && !(status.sct_raw() == 0 && status.sc() == ABORT_REQUESTED);
                if retry {
                    // DNR clear: the controller says the same command may succeed. After the
                    // delay it asks for (CRD selects CRDT1..3, 100 ms units), on this tracker.
                    let delay = self
                        .ctrl
                        .identify_data()
                        .retry_delay_ms(status.crd())
                        .unwrap_or(0);
                    let t = &mut self.trackers[idx];
                    t.retries += 1;
                    t.retry_due_ms = now.saturating_add(delay).max(1);
                    self.retrying.push(idx as u16);
                    tracing::debug!(ctrl = %self.ctrl.name, qid, cid = cqe.cid, %status,
                        retry = t.retries, delay_ms = delay, "retrying a command");
                    continue;
                }
            }
            self.trackers[idx].active = false;
            self.tickets[idx] = None;
            self.free.push(idx as u16);
            let req = &mut self.reqs[slot as usize];
            req.outstanding -= 1;
            if !status.is_success() && req.fail == Fail::None {
                req.fail = if aborted && status.sct_raw() == 0 && status.sc() == ABORT_REQUESTED {
                    Fail::TimedOut {
                        after_ms: coarse_ms().saturating_sub(tr.submitted_ms),
                    }
                } else {
                    Fail::Nvme(NvmeError::new(false, tr.opcode, status))
                };
            }
            self.complete_if_done(slot, out);
        }
        reaped
    }

    /// Hand over request `slot` if nothing of it is outstanding and it is fully issued or
    /// failed.
    fn complete_if_done(&mut self, slot: u32, out: &mut Vec<Reaped>) {
        let req = &mut self.reqs[slot as usize];
        let total = req.total();
        if !req.active || req.outstanding != 0 || (req.issued < total && req.fail == Fail::None) {
            return;
        }
        if req.issued < total {
            // Failed before everything was issued: it may still sit in the backlog.
            self.backlog.retain(|&s| s != slot);
        }
        req.active = false;
        out.push(Reaped {
            slot,
            // Lengths are at most `MAX_IO_BYTES` (checked at submission), so this fits.
            res: match req.op.op {
                OpKind::Read | OpKind::Write => i32::try_from(req.op.len).unwrap_or(i32::MAX),
                _ => 0,
            },
            fail: req.fail,
        });
    }

    /// Every 10 ms: a fatal controller status resets the controller; the admin queue is
    /// polled (abort answers, asynchronous events); a namespace change is picked up; with
    /// timeouts on, a command past its deadline is aborted (asynchronously, within the
    /// controller-wide abort limit), and one that has not completed `abort_ms` after its abort
    /// (or whose abort failed) resets the controller.
    fn scan(&mut self, now: u64, out: &mut Vec<Reaped>) -> Result<()> {
        // Checked idle or not (one register read per 10 ms): a controller that failed is reset
        // now rather than at the next command.
        let busy = self.free.len() < self.trackers.len();
        if let Some(why) = self.ctrl.fatal_status() {
            tracing::error!(ctrl = %self.ctrl.name, reason = why, "controller needs a reset");
            return self.reset_and_recover(out, why, true);
        }
        self.ctrl.poll_admin();
        if self.ctrl.namespace_epoch() != self.ns_epoch {
            self.namespace_changed();
        }
        let Some(limit) = self.timeout_ms else {
            return Ok(());
        };
        if !busy {
            return Ok(());
        }
        let qid = self.qid();
        let mut reset = None;
        for i in 0..self.trackers.len() {
            let t = self.trackers[i];
            if !t.active || t.retry_due_ms != 0 {
                continue;
            }
            let age = now.saturating_sub(t.submitted_ms);
            if t.abort_ms == 0 && age >= limit {
                let cid = (t.epoch as u16) << CID_INDEX_BITS | i as u16;
                if !t.timed_out {
                    self.stats.timeouts += 1;
                    self.trackers[i].timed_out = true;
                    tracing::warn!(
                        ctrl = %self.ctrl.name,
                        qid,
                        cid,
                        opcode = spec::opcode_name(false, t.opcode),
                        after_ms = age,
                        "command timed out; aborting"
                    );
                }
                match self.ctrl.submit_abort(qid, cid) {
                    Ok(AbortSubmit::Sent(ticket)) => {
                        self.stats.aborts += 1;
                        self.trackers[i].abort_ms = now.max(1);
                        self.tickets[i] = Some(ticket);
                    }
                    Ok(AbortSubmit::Deferred) => {
                        // The abort limit is controller-wide: others' aborts are still out,
                        // or the admin queue is busy. Try at the next scan; if that never
                        // comes, the commands holding the limit reset the controller.
                        self.stats.aborts_deferred += 1;
                        if age >= limit + 2 * self.abort_ms {
                            reset = Some("a timed-out command could not be aborted in time");
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(ctrl = %self.ctrl.name, qid, cid, error = %e, "abort failed");
                        reset = Some("an abort could not be sent");
                        break;
                    }
                }
            } else if t.abort_ms != 0 {
                let state = self.tickets[i].as_ref().map(|k| k.state());
                if state == Some(AbortTicket::FAILED) {
                    reset = Some("an abort failed");
                    break;
                }
                if now.saturating_sub(t.abort_ms) >= self.abort_ms {
                    reset = Some(if state == Some(AbortTicket::DECLINED) {
                        "the controller declined an abort and the command did not complete"
                    } else {
                        "a command did not complete after its abort"
                    });
                    break;
                }
            }
        }
        if let Some(why) = reset {
            return self.reset_and_recover(out, why, false);
        }
        Ok(())
    }

    /// The controller re-read its namespaces: take a new size as it is; a new block size, or
    /// the namespace gone, stops this queue (commands sized for the old blocks would address
    /// the wrong data).
    fn namespace_changed(&mut self) {
        self.ns_epoch = self.ctrl.namespace_epoch();
        match self.ctrl.namespace(self.nsid) {
            Some(ns) if ns.block_size.trailing_zeros() == self.lba_shift => {
                tracing::info!(ctrl = %self.ctrl.name, nsid = self.nsid, blocks = ns.blocks,
                    "namespace changed; geometry re-read");
            }
            Some(ns) => {
                self.ns_broken = Some(format!(
                    "namespace {} was reformatted ({} B blocks, was {} B): open the target again",
                    self.nsid,
                    ns.block_size,
                    1u32 << self.lba_shift
                ));
            }
            None => {
                self.ns_broken = Some(format!("namespace {} is no longer active", self.nsid));
            }
        }
        if let Some(why) = &self.ns_broken {
            tracing::error!(ctrl = %self.ctrl.name, nsid = self.nsid, "{why}");
        }
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
        // The reset deleted the queue pair: it is certainly gone in the new generation.
        self.generation = self.ctrl.generation();
        self.on_device = OnDevice::No;
        self.revive_at_ms = 0;
        self.revive_backoff_ms = REVIVE_BACKOFF_MIN_MS;
        self.revive()
    }

    /// Create the queue pair again after a reset; until that works the queue refuses work.
    /// Failed attempts back off (1 ms doubling to 1 s) instead of sending admin commands at
    /// every poll.
    fn revive(&mut self) -> Result<()> {
        let refuse = |why: String| Error::Controller {
            ctrl: self.ctrl.name.clone(),
            reason: why,
        };
        if self.ctrl.is_dead() {
            return Err(refuse(
                "the controller failed to reset and is unusable".into(),
            ));
        }
        if self.on_device == OnDevice::Unknown {
            // A creation that did not complete: only a reset makes the id usable again.
            let _ = self.ctrl.reset(
                self.generation,
                "creating an I/O queue pair did not complete",
            );
            return Err(refuse(format!(
                "queue pair {} is in an unknown state; the controller is being reset",
                self.qid()
            )));
        }
        let now = coarse_ms();
        if now < self.revive_at_ms {
            return Err(refuse(format!(
                "cannot create queue pair {} again after a reset (next try in {} ms): {}",
                self.qid(),
                self.revive_at_ms - now,
                self.revive_error.as_deref().unwrap_or("unknown error")
            )));
        }
        let ring = self.ring.as_mut().expect("ring present");
        let qid = ring.qid;
        match self.ctrl.recreate_io_ring(ring) {
            Ok(generation) => {
                self.generation = generation;
                self.on_device = OnDevice::Yes;
                self.revive_backoff_ms = REVIVE_BACKOFF_MIN_MS;
                self.revive_error = None;
                Ok(())
            }
            Err(f) => {
                self.on_device = if f.gone {
                    OnDevice::No
                } else {
                    OnDevice::Unknown
                };
                self.revive_at_ms = now + self.revive_backoff_ms;
                self.revive_backoff_ms = (self.revive_backoff_ms * 2).min(REVIVE_BACKOFF_MAX_MS);
                let msg = f.error.to_string();
                self.revive_error = Some(msg.clone());
                Err(refuse(format!(
                    "cannot create queue pair {qid} again after a reset: {msg}"
                )))
            }
        }
    }

    fn fail_all(&mut self, out: &mut Vec<Reaped>, fatal: bool) {
        // What a held-back doorbell would have started is failed here.
        self.owed = false;
        self.owed_cq = false;
        self.owed_cq_room = false;
        let now = coarse_ms();
        for (i, t) in self.trackers.iter_mut().enumerate() {
            if t.active {
                t.active = false;
                t.retry_due_ms = 0;
                self.free.push(i as u16);
                self.tickets[i] = None;
                let req = &mut self.reqs[t.slot as usize];
                if t.abort_ms != 0 && req.fail == Fail::None {
                    // It timed out (and caused or preceded the reset).
                    req.fail = Fail::TimedOut {
                        after_ms: now.saturating_sub(t.submitted_ms),
                    };
                }
            }
        }
        self.retrying.clear();
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
        if self.abandoned || self.on_device == OnDevice::Unknown {
            // Commands may still be in the device, or the queue pair may exist on it: keep
            // the rings, lists and arena mapped.
            tracing::error!(ctrl = %self.ctrl.name, qid = self.qid(),
                "dropping a queue pair the device may still use; its memory is kept");
            if let Some(mut r) = self.ring.take() {
                r.leak();
                std::mem::forget(r);
            }
            if let Some(mut p) = self.prp.take() {
                p.leak();
                std::mem::forget(p);
            }
            std::mem::forget(std::mem::take(&mut self.regions));
            return;
        }
        if let Some(ring) = self.ring.take() {
            match self.on_device {
                OnDevice::Yes => self.ctrl.delete_io_ring(ring, self.generation),
                _ => self.ctrl.release_ring(ring),
            }
        }
        if let Some(p) = self.prp.take() {
            p.release(mapper);
        }
        for mut r in std::mem::take(&mut self.regions) {
            mapper.release(&mut r);
        }
    }
}

/// Whether the CQ head must be given back before `active` commands (those at the device or
/// about to be, each owed one completion entry) may be there: the entries the controller may
/// count as taken, those consumed and not given back plus one for each active command, would
/// otherwise exceed what a ring of `entries` holds (full is tail + 1 == head), and a controller
/// that finds its CQ full stops posting until told. The sum grows only with submissions
/// (consuming a completion moves one from active to consumed; one consumed for a command that
/// waits for its retry leaves that command counted as active too, an overestimate, and its
/// resend goes out from `poll_once` with the CQ head), so checking it at each submission in
/// `push` keeps it.
#[inline]
fn cq_room_low(ring: &Ring, active: u16) -> bool {
    ring.cq_unrung() as u32 + active as u32 > ring.entries as u32 - 1
}

/// Bytes from a device address to the end of its memory page.
#[inline]
fn first_page_bytes(iova: u64) -> u64 {
    PAGE as u64 - (iova & (PAGE as u64 - 1))
}

/// PRP1/PRP2 for `len` bytes at `addr` (NVMe 1.4 §4.3): PRP2 unused, a second page, or a list
/// in the tracker's two list pages (the last entry of the first page chains to the second when
/// more than 512 entries are needed). `None` when the list pages cannot describe it (the
/// caller sizes pieces so that this does not happen).
#[inline]
fn build_prps(
    arena: &DmaRegion,
    addr: *mut u8,
    len: usize,
    lists: &DmaMem,
    list_off: usize,
) -> Option<(u64, u64)> {
    let prp1 = arena.iova(addr);
    let first = first_page_bytes(prp1) as usize;
    if len <= first {
        return Some((prp1, 0));
    }
    let rest = len - first;
    let second = addr.wrapping_add(first);
    if rest <= PAGE {
        return Some((prp1, arena.iova(second)));
    }
    let pages = rest.div_ceil(PAGE);
    if pages > PRP_LIST_ENTRIES {
        return None;
    }
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
        // SAFETY: `pages <= PRP_LIST_ENTRIES` keeps `slot < 2 * PER_PAGE`: inside the
        // tracker's two list pages.
        unsafe {
            list.add(slot)
                .write(arena.iova(second.wrapping_add(p * PAGE)))
        };
        slot += 1;
    }
    Some((prp1, lists.iova(list_off)))
}

/// SGL1 for `len` bytes at `addr` (NVMe 1.4 §4.4): one Data Block descriptor when the buffer
/// is contiguous in device address space (always behind an IOMMU), else a Last Segment
/// descriptor pointing at the Data Block descriptors written in the tracker's list page.
#[inline]
fn build_sgl(
    arena: &DmaRegion,
    addr: *mut u8,
    len: usize,
    lists: &DmaMem,
    list_off: usize,
) -> Option<SglDescriptor> {
    const MAX: usize = 2 * PAGE / SglDescriptor::BYTES;
    let mut first = None;
    let mut count = 0usize;
    let list = lists.ptr().wrapping_add(list_off).cast::<SglDescriptor>();
    let mut overflow = false;
    arena.runs(addr, len, |iova, n| {
        let d = SglDescriptor::data_block(iova, n as u32);
        if count == 0 {
            first = Some(d);
        }
        if count < MAX {
            // SAFETY: `count < MAX`: inside the tracker's two list pages.
            unsafe { std::ptr::write_volatile(list.add(count), d) };
        } else {
            overflow = true;
        }
        count += 1;
    });
    if overflow {
        return None;
    }
    match count {
        1 => first,
        0 => None,
        n => Some(SglDescriptor::last_segment(lists.iova(list_off), n as u32)),
    }
}

/// The coarse clock's resolution (its tick), rounded up to whole milliseconds.
fn coarse_tick_ms() -> u64 {
    static TICK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer.
        let r = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        if r != 0 {
            // Linux's coarsest: HZ=100.
            return 10;
        }
        (ts.tv_sec as u64 * 1000 + (ts.tv_nsec as u64).div_ceil(1_000_000)).max(1)
    })
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
