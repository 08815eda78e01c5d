//! An in-process software NVMe controller: the same registers, queues, doorbells and PRPs as a
//! PCIe controller, over ordinary process memory with identity translation (every queue base,
//! PRP or doorbell-buffer address the driver writes is a plain virtual address of this process).
//! A device thread ("rio-sim") plays the controller by polling; the driver gets a pointer to the
//! model's BAR0 and accesses its 32-bit registers atomically, as MMIO.
//!
//! Behaviour follows the NVMe base specification as QEMU's `hw/nvme/ctrl.c` implements it:
//!
//! - CC.EN 0->1 reads AQA/ASQ/ACQ (64-bit registers may be written as two halves) and sets
//!   CSTS.RDY after [`SimConfig::ready_delay`]; an invalid setup (zero or misaligned queue bases,
//!   MPS outside CAP, admin queues under 2 entries) sets CSTS.CFS instead. CC.EN 1->0 drops all
//!   queues, withheld and timed commands, the doorbell-buffer configuration, zeroes the doorbell
//!   registers and clears CSTS.RDY and CFS. CC.SHN != 0 sets CSTS.SHST = 2.
//! - Completions: dw0..cid stored first, the status half-word (with the phase tag) last with a
//!   Release store. A full CQ (per its head doorbell) holds completions back until there is room.
//! - Doorbell Buffer Config: for I/O queues the model then takes SQ tails and CQ heads from the
//!   shadow buffer only (MMIO doorbell writes are just kicks it does not need) and writes each
//!   value it consumed to the EventIdx buffer, as QEMU does. The admin queue always uses MMIO.
//! - Errors produced by the model carry DNR; faults are described on [`Fault`].
//! - SGLs ([`SimConfig::sgl`]): Read, Write and Dataset Management with PSDT 01b take their
//!   data from SGL1: a Data Block, or a chain of Segment / Last Segment descriptor lists.
//! - Asynchronous events ([`SimController::raise_event`]): the oldest outstanding Asynchronous
//!   Event Request completes with the event; an event of a log page already reported waits
//!   until the host reads that page with Get Log Page (RAE clear).
//!
//! The memory contract is that of DMA, see [`SimController::bar`].

mod admin;
mod cache;
mod config;
mod device;
mod host;
mod hostile;
mod io;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use cache::{PowerCut, PowerCutReport};
pub use config::{Fault, Latency, SimConfig, SimNamespace};

use crate::nvme::spec::{self, AsyncEvent, async_event_notice, async_event_type, log_page, reg};
use host::{Bar, Counter, NsMem};

/// PCI vendor id of the model unless [`SimConfig::pci_id`] says otherwise, reported in
/// Identify Controller (Red Hat, the owner of QEMU's emulated devices).
pub const SIM_VID: u16 = 0x1b36;
/// PCI device id of the model unless [`SimConfig::pci_id`] says otherwise.
pub const SIM_DEVICE_ID: u16 = 0x0001;
/// PCI subsystem vendor id reported in Identify Controller ("rio" in no registry: 0x7210).
pub const SIM_SSVID: u16 = 0x7210;

/// Counters of the model, as of the moment [`SimController::stats`] was called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Admin commands fetched.
    pub admin_cmds: u64,
    /// I/O commands fetched, by opcode class.
    pub read_cmds: u64,
    pub write_cmds: u64,
    pub flush_cmds: u64,
    pub write_zeroes_cmds: u64,
    pub dsm_cmds: u64,
    pub other_io_cmds: u64,
    /// Bytes moved by successful Read / Write commands (counted also when `store_data` is off).
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Aborts that found and completed their target.
    pub aborts_honoured: u64,
    /// CC.EN 1->0 transitions.
    pub resets: u64,
    /// Faults that fired (one per affected command; IgnoreAbort is not counted).
    pub faults_injected: u64,
    /// Most commands fetched and not yet completed at once (all queues, withheld ones included).
    pub max_inflight: u64,
    /// Inline model: passes that found work, run on polling threads by
    /// [`SimController::service`] (the device thread's own passes are not counted).
    pub inline_passes: u64,
    /// Read, Write and Dataset Management commands whose data pointer the model took as an
    /// SGL (PSDT 01b with [`SimConfig::sgl`]), whether or not the SGL was valid.
    pub sgl_cmds: u64,
    /// Asynchronous Event Requests completed with an event.
    pub events_reported: u64,
    /// Completions held back because their CQ was full by the head doorbell the model read
    /// (posted later, once the host freed slots). A driver that rings the CQ head before
    /// every SQ tail never causes one.
    pub cq_full_holds: u64,
}

impl SimStats {
    /// All I/O commands fetched.
    pub fn io_cmds(&self) -> u64 {
        self.read_cmds
            + self.write_cmds
            + self.flush_cmds
            + self.write_zeroes_cmds
            + self.dsm_cmds
            + self.other_io_cmds
    }
}

#[derive(Default)]
pub(crate) struct StatCounters {
    admin: Counter,
    reads: Counter,
    writes: Counter,
    flushes: Counter,
    write_zeroes: Counter,
    dsm: Counter,
    other_io: Counter,
    bytes_read: Counter,
    bytes_written: Counter,
    aborts: Counter,
    resets: Counter,
    faults_injected: Counter,
    max_inflight: Counter,
    inline_passes: Counter,
    sgl_cmds: Counter,
    events_reported: Counter,
    cq_full_holds: Counter,
}

pub(crate) struct NsInfo {
    block_size: u32,
    /// Current size in blocks (Identify NSZE/NCAP/NUSE, the I/O range checks); changed by
    /// [`SimController::resize_namespace`] from any thread.
    blocks: AtomicU64,
    /// Size at start: the most `blocks` may grow to (the size of `mem`).
    max_blocks: u64,
    /// `None` when `store_data` is off.
    mem: Option<NsMem>,
}

impl NsInfo {
    /// Current size in blocks.
    #[inline]
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }
}

/// Locks `m`, going on after a panic elsewhere (the guarded data stays consistent: every
/// critical section of the model is a few plain assignments).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Changed Namespace List log (NVMe 1.4 §5.14.1.4): the namespaces changed since the host
/// last read it.
#[derive(Default)]
pub(crate) struct ChangedNs {
    ids: BTreeSet<u32>,
    /// More than 1024 changed: the log holds 0xFFFFFFFF alone.
    overflow: bool,
}

impl ChangedNs {
    const MAX: usize = 1024;

    fn add(&mut self, nsid: u32) {
        if self.overflow {
            return;
        }
        self.ids.insert(nsid);
        if self.ids.len() > ChangedNs::MAX {
            self.overflow = true;
            self.ids.clear();
        }
    }

    /// The 4 KiB log page: ascending nsids, zero-terminated (or 0xFFFFFFFF alone).
    pub(crate) fn page(&self) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        if self.overflow {
            v[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        } else {
            for (slot, id) in v.chunks_exact_mut(4).zip(&self.ids) {
                slot.copy_from_slice(&id.to_le_bytes());
            }
        }
        v
    }

    pub(crate) fn clear(&mut self) {
        self.ids.clear();
        self.overflow = false;
    }
}

/// Asynchronous events raised from any thread and the controller state the event conveniences
/// of [`SimController`] change; the device takes the events in its pass.
pub(crate) struct EventLine {
    /// Events were queued that the device has not taken yet (checked each pass).
    pending: AtomicBool,
    queue: Mutex<VecDeque<AsyncEvent>>,
    /// The Changed Namespace List log.
    pub(crate) changed_ns: Mutex<ChangedNs>,
    /// SMART / Health Information byte 0.
    pub(crate) critical_warning: AtomicU8,
    /// Identify FR and the firmware revision of slot 1.
    pub(crate) firmware: Mutex<String>,
}

impl EventLine {
    fn new(firmware: &str) -> EventLine {
        EventLine {
            pending: AtomicBool::new(false),
            queue: Mutex::new(VecDeque::new()),
            changed_ns: Mutex::new(ChangedNs::default()),
            critical_warning: AtomicU8::new(0),
            firmware: Mutex::new(firmware.to_string()),
        }
    }

    fn raise(&self, ev: AsyncEvent) {
        let mut q = lock(&self.queue);
        q.push_back(ev);
        // Set under the lock, after the push: the device clears the flag before it drains.
        self.pending.store(true, Ordering::Release);
    }

    /// Moves the events raised since the last call to `into` (the device's queue).
    #[inline]
    pub(crate) fn take(&self, into: &mut VecDeque<AsyncEvent>) {
        // A plain load first: the swap (a locked instruction) only when there is something.
        if self.pending.load(Ordering::Relaxed) && self.pending.swap(false, Ordering::AcqRel) {
            into.extend(lock(&self.queue).drain(..));
        }
    }
}

/// A power cut asked of the device ([`SimController::power_cut`]) and its outcome.
#[derive(Default)]
pub(crate) struct PowerLine {
    /// A cut is asked for and not done yet (the device checks it each pass).
    pending: AtomicBool,
    request: Mutex<Option<PowerCut>>,
    done: Mutex<Option<PowerCutReport>>,
}

impl PowerLine {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take_request(&self) -> Option<PowerCut> {
        PowerLine::lock(&self.request).take()
    }

    pub(crate) fn finish(&self, report: PowerCutReport) {
        *PowerLine::lock(&self.done) = Some(report);
        self.pending.store(false, Ordering::Release);
    }
}

/// State shared between the handle and the device thread.
pub(crate) struct Shared {
    bar: Bar,
    ns: Vec<NsInfo>,
    stop: AtomicBool,
    stats: StatCounters,
    power: PowerLine,
    /// The hostile script ([`SimController::misbehave`]) and whether one is running.
    hostile: Mutex<std::collections::VecDeque<u8>>,
    hostile_on: AtomicBool,
    /// Asynchronous events and the state they report.
    events: EventLine,
}

/// CAP for a configuration: MQES, CQR=1, TO, DSTRD, CSS=NVM, MPSMIN=0 (4 KiB), MPSMAX=4 (64 KiB).
pub(crate) fn cap_value(cfg: &SimConfig) -> u64 {
    cfg.mqes as u64
        | 1 << 16
        | (cfg.timeout_500ms_units as u64) << 24
        | (cfg.dstrd as u64 & 0xF) << 32
        | (spec::Cap::CSS_NVM as u64) << 37
        | 4u64 << 52
}

/// A running software NVMe controller. Dropping it stops and joins the device thread.
pub struct SimController {
    sh: Arc<Shared>,
    dstrd: u8,
    pci_id: (u16, u16),
    cpu: Option<usize>,
    /// The device, shared with the polling threads (inline model only).
    inline: Option<Arc<Mutex<device::Device>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimController {
    /// Validates `cfg`, allocates BAR0 and the namespaces, and starts the device thread.
    pub fn start(cfg: SimConfig) -> std::io::Result<SimController> {
        cfg.validate()
            .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidInput, m))?;
        let bar = Bar::new(cfg.bar_len())?;
        bar.store64(reg::CAP, cfg.raw_cap.unwrap_or_else(|| cap_value(&cfg)));
        bar.store(reg::VS, spec::Vs::V1_4.0);
        let mut ns = Vec::with_capacity(cfg.namespaces.len());
        for n in &cfg.namespaces {
            let blocks = n.size_bytes / n.block_size as u64;
            ns.push(NsInfo {
                block_size: n.block_size,
                blocks: AtomicU64::new(blocks),
                max_blocks: blocks,
                mem: if cfg.store_data {
                    Some(NsMem::new(n.size_bytes)?)
                } else {
                    None
                },
            });
        }
        let sh = Arc::new(Shared {
            bar,
            ns,
            stop: AtomicBool::new(false),
            stats: StatCounters::default(),
            power: PowerLine::default(),
            hostile: Mutex::new(std::collections::VecDeque::new()),
            hostile_on: AtomicBool::new(false),
            events: EventLine::new(&cfg.firmware),
        });
        let dstrd = cfg.dstrd;
        let pci_id = cfg.pci_id;
        let cpu = cfg.cpu;
        let pinned = cpu;
        let inline = cfg.inline;
        let dev = device::Device::new(Arc::clone(&sh), cfg);
        let (dev, shared_dev) = if inline {
            (None, Some(Arc::new(Mutex::new(dev))))
        } else {
            (Some(dev), None)
        };
        let for_thread = shared_dev.clone();
        let thread = std::thread::Builder::new()
            .name("rio-sim".to_string())
            .spawn(move || {
                if let Some(c) = cpu
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: c })
                {
                    tracing::warn!(cpu = c, "could not pin the model's thread");
                }
                match (dev, for_thread) {
                    (Some(dev), _) => dev.run(),
                    (None, Some(shared)) => device::Device::run_inline(&shared),
                    (None, None) => unreachable!("one of the two is set"),
                }
            })?;
        Ok(SimController {
            sh,
            dstrd,
            pci_id,
            cpu: pinned,
            inline: shared_dev,
            thread: Some(thread),
        })
    }

    /// BAR0: the registers at the offsets of [`spec::reg`], doorbells from 0x1000 with stride
    /// `4 << dstrd`; page aligned, zeroed except CAP and VS; valid until `self` is dropped. The
    /// length is [`SimConfig::bar_bytes`] when set (then possibly not a whole page, and without
    /// the doorbells of higher queue ids): never access the pointer past it.
    ///
    /// Access it only with aligned 32-bit atomic loads and stores (e.g.
    /// `AtomicU32::from_ptr`), as MMIO. Every address the driver hands the model through it or
    /// through commands (queue bases, PRPs and PRP lists, doorbell buffers) must stay valid and
    /// must not be reused while the model may use it — while the queue or doorbell buffer exists
    /// or the command is outstanding — exactly the contract of DMA to a real controller. Data
    /// buffers are read/written by the device thread with plain copies.
    pub fn bar(&self) -> (*mut u8, usize) {
        (self.sh.bar.as_ptr(), self.sh.bar.len())
    }

    /// CAP.DSTRD of this controller (as configured; [`SimConfig::raw_cap`] may make CAP say
    /// otherwise).
    pub fn dstrd(&self) -> u8 {
        self.dstrd
    }

    /// PCI (vendor, device) id of this controller ([`SimConfig::pci_id`]).
    pub fn pci_id(&self) -> (u16, u16) {
        self.pci_id
    }

    /// Raises an asynchronous event, from any thread. It is queued in the device; the oldest
    /// outstanding Asynchronous Event Request completes with Success and dword 0 =
    /// `ev.to_dw0()`, at once or when the host sends one. As on a real controller, once an
    /// event of log page L has been reported, later events of log page L wait (in order, none
    /// lost) until the host reads log page L with Get Log Page (any length, RAE clear); events
    /// of other log pages go ahead. A controller reset discards outstanding requests and what
    /// the host has not read yet, but keeps queued events.
    pub fn raise_event(&self, ev: AsyncEvent) {
        self.sh.events.raise(ev);
    }

    /// Resizes namespace `nsid` (1-based) to `size_bytes`: Identify Namespace NSZE, NCAP and
    /// NUSE and the I/O range checks follow at once. Records `nsid` in the Changed Namespace
    /// List log and raises a Namespace Attribute Changed notice (log page 04h). Blocks beyond
    /// a shrunk end keep their contents, unreachable until the namespace grows back.
    ///
    /// Fails with `InvalidInput` if the namespace does not exist, or `size_bytes` is zero, not
    /// a multiple of the block size, or beyond the namespace's size at start.
    pub fn resize_namespace(&self, nsid: u32, size_bytes: u64) -> std::io::Result<()> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let ns = nsid
            .checked_sub(1)
            .and_then(|i| self.sh.ns.get(i as usize))
            .ok_or_else(|| bad(format!("namespace {nsid} does not exist")))?;
        let bs = ns.block_size as u64;
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(bad(format!(
                "namespace {nsid}: size {size_bytes} is not a nonzero multiple of its block size {bs}"
            )));
        }
        let blocks = size_bytes / bs;
        if blocks > ns.max_blocks {
            return Err(bad(format!(
                "namespace {nsid}: {size_bytes} bytes is beyond its size at start ({} bytes)",
                ns.max_blocks * bs
            )));
        }
        ns.blocks.store(blocks, Ordering::Release);
        lock(&self.sh.events.changed_ns).add(nsid);
        self.raise_event(AsyncEvent {
            kind: async_event_type::NOTICE,
            info: async_event_notice::NS_ATTRIBUTE_CHANGED,
            log_page: log_page::CHANGED_NS_LIST,
        });
        Ok(())
    }

    /// Sets the SMART / Health Information log's critical warning byte to `bits` (see
    /// [`spec::critical_warning`]) and, when a bit is set, raises a SMART / Health event whose
    /// information is the index of the lowest set bit (log page 02h). `0` clears the warning
    /// and raises nothing.
    pub fn set_critical_warning(&self, bits: u8) {
        self.sh
            .events
            .critical_warning
            .store(bits, Ordering::Release);
        if bits != 0 {
            self.raise_event(AsyncEvent {
                kind: async_event_type::SMART_HEALTH,
                info: bits.trailing_zeros() as u8,
                log_page: log_page::SMART_HEALTH,
            });
        }
    }

    /// Activates firmware `revision` (at most 8 bytes are reported): Identify FR and the
    /// Firmware Slot Information log (slot 1) report it from now on, and a Firmware Activation
    /// Starting notice is raised (log page 03h).
    pub fn activate_firmware(&self, revision: &str) {
        *lock(&self.sh.events.firmware) = revision.to_string();
        self.raise_event(AsyncEvent {
            kind: async_event_type::NOTICE,
            info: async_event_notice::FIRMWARE_ACTIVATION_STARTING,
            log_page: log_page::FIRMWARE_SLOT,
        });
    }

    /// Whether the device works on the polling threads ([`SimConfig::inline`]).
    pub fn is_inline(&self) -> bool {
        self.inline.is_some()
    }

    /// Inline model: run one pass of the device on the calling thread (fetch what the
    /// doorbells announce, execute, post completions). Skipped if another thread is in a pass
    /// (it does the same work). Returns whether it did work; always `false` for a threaded
    /// model, whose own thread does the work.
    #[inline]
    pub fn service(&self) -> bool {
        let Some(dev) = &self.inline else {
            return false;
        };
        let Some(mut d) = device::Device::try_lock(dev) else {
            return false;
        };
        let work = d.pass();
        if work {
            // Under the device lock: one writer at a time.
            self.sh.stats.inline_passes.add(1);
        }
        work
    }

    /// The CPU the device thread is pinned to, if any.
    pub fn cpu(&self) -> Option<usize> {
        self.cpu
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let s = &self.sh.stats;
        SimStats {
            admin_cmds: s.admin.get(),
            read_cmds: s.reads.get(),
            write_cmds: s.writes.get(),
            flush_cmds: s.flushes.get(),
            write_zeroes_cmds: s.write_zeroes.get(),
            dsm_cmds: s.dsm.get(),
            other_io_cmds: s.other_io.get(),
            bytes_read: s.bytes_read.get(),
            bytes_written: s.bytes_written.get(),
            aborts_honoured: s.aborts.get(),
            resets: s.resets.get(),
            faults_injected: s.faults_injected.get(),
            max_inflight: s.max_inflight.get(),
            inline_passes: s.inline_passes.get(),
            sgl_cmds: s.sgl_cmds.get(),
            events_reported: s.events_reported.get(),
            cq_full_holds: s.cq_full_holds.get(),
        }
    }

    /// Cuts the power and brings it back: the write cache loses what `how` says of the blocks
    /// written since the last Flush (only with [`SimConfig::write_cache`]; otherwise every
    /// completed write was durable and nothing is lost), and the controller restarts in its
    /// power-on state: not ready, CC zero, every queue and command in flight gone, as after a
    /// real outage. The driver sees CSTS.RDY clear, resets the controller and goes on; the
    /// commands it had outstanding fail. Returns which unflushed blocks were lost and kept.
    /// Waits for the device (at most 10 s) to carry it out.
    pub fn power_cut(&self, how: PowerCut) -> std::io::Result<PowerCutReport> {
        let p = &self.sh.power;
        *PowerLine::lock(&p.done) = None;
        *PowerLine::lock(&p.request) = Some(how);
        p.pending.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = PowerLine::lock(&p.done).take() {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the model's device did not carry out the power cut within 10 s",
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// From now on, I/O completions follow `script` (see the table in `hostile.rs`: other
    /// command ids, arbitrary status fields and entries, duplicates, drops, garbage EventIdx
    /// values) until it is used up; an empty script ends one early. For fuzzing the driver:
    /// whatever the device does, every command must complete exactly once, with data or a
    /// typed error, and nothing may panic.
    pub fn misbehave(&self, script: &[u8]) {
        let mut s = self.sh.hostile.lock().unwrap_or_else(|p| p.into_inner());
        s.clear();
        s.extend(script.iter().copied());
        self.sh.hostile_on.store(!s.is_empty(), Ordering::Relaxed);
    }

    /// Copies `len` bytes at byte `offset` of namespace `nsid` (1-based). Peek at ranges whose
    /// writes have completed and that no outstanding command touches. Returns zeros when
    /// `store_data` is off.
    ///
    /// # Panics
    /// If the namespace does not exist or the range exceeds it (a test bug).
    pub fn namespace_data(&self, nsid: u32, offset: u64, len: usize) -> Vec<u8> {
        let ns = nsid
            .checked_sub(1)
            .and_then(|i| self.sh.ns.get(i as usize))
            .unwrap_or_else(|| panic!("namespace {nsid} does not exist"));
        let size = ns.blocks() * ns.block_size as u64;
        assert!(
            offset.checked_add(len as u64).is_some_and(|e| e <= size),
            "range beyond namespace {nsid}"
        );
        let mut out = vec![0u8; len];
        if let Some(mem) = ns.mem.as_ref() {
            mem.peek(offset, &mut out);
        }
        out
    }
}

impl Drop for SimController {
    fn drop(&mut self) {
        self.sh
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// Compile-time check of the brief's requirement (the BAR pointer is shared with driver
// threads): every field is Send + Sync by construction (`Bar` and `NsMem` argue theirs).
const _: fn() = || {
    fn is<T: Send + Sync>() {}
    is::<SimController>();
};
