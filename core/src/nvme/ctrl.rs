//! The controller: bring-up, the admin queue, namespaces, I/O queue creation, abort and reset.
//!
//! One [`Controller`] per PCI function (or model instance), shared by the queues of every
//! thread through an `Arc`. The admin queue sits behind a mutex: it is used at bring-up, when a
//! thread creates or deletes its queue pair, to abort a timed-out command and to reset. The
//! I/O path never takes the lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError, Weak};
use std::time::{Duration, Instant, SystemTime};

use super::dma::{DmaMem, IovaAllocator, Mapper};
use super::mmio::Regs;
use super::quirks::{self, Quirks};
use super::ring::{Ring, Shadow};
use super::sim::{SimConfig, SimController};
use super::spec::{
    self, AsyncEvent, Cap, Cc, CompletionEntry, IdentifyController, IdentifyNamespace, NvmeError,
    SmartLog, SubmissionEntry, async_event_notice, async_event_type, log_page,
};
use crate::config::SglMode;
use crate::error::{Error, Result};

// The driver's memory-ordering argument (ordinary stores to DMA memory become visible to the
// device before a later store to a doorbell; a completion's fields are read after its phase
// bit) holds for x86-64's total store order. Other architectures need explicit DMA barriers
// that rio does not have yet, so `pcie://` refuses to open there (see `Controller::open_pcie`);
// the software model needs none (it is an ordinary thread using atomics).
#[cfg(not(target_arch = "x86_64"))]
const DMA_ORDERING: Option<&str> = Some(
    "rio's userspace NVMe driver orders DMA with x86-64's store ordering and has no DMA \
     barriers for this architecture yet; use the uring backend",
);
#[cfg(target_arch = "x86_64")]
const DMA_ORDERING: Option<&str> = None;

/// Admin queue entries.
const ADMIN_ENTRIES: u16 = 32;
/// The driver's memory page size (CC.MPS = 0).
pub(crate) const PAGE: usize = 4096;
/// Largest transfer of one command when the controller sets no MDTS: what one tracker's two
/// PRP list pages can describe (1 + 511 + 512 pages).
pub(crate) const MAX_XFER_CAP: u32 = 4 << 20;

/// Options of the driver, from [`crate::config::EngineConfig`].
#[derive(Clone, Debug)]
pub struct NvmeOptions {
    /// Entries per I/O queue; `None`: sized from the queue depth (twice it, 64..=1024), capped
    /// by CAP.MQES.
    pub io_queue_entries: Option<u16>,
    /// A command outstanding this long is aborted; `None` disables timeouts.
    pub command_timeout: Option<Duration>,
    /// How long an abort may take before the controller is reset; also the admin command
    /// timeout.
    pub admin_timeout: Duration,
    /// Use shadow doorbells when the controller offers Doorbell Buffer Config.
    pub shadow_doorbells: bool,
    /// Queue memory on hugepages when reserved.
    pub hugepages: bool,
    /// I/O queue pairs to ask the controller for.
    pub max_io_queues: u16,
    /// Accept a controller bound to uio_pci_generic (no IOMMU: the device can reach all
    /// memory).
    pub allow_unsafe_dma: bool,
    /// When reads and writes describe their buffers with SGLs instead of PRPs.
    pub sgl: SglMode,
    /// Retries of a command that failed with a status that allows one (DNR clear), each after
    /// the delay the controller asks for (CRD / CRDT); 0 disables retries.
    pub max_retries: u8,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        NvmeOptions {
            io_queue_entries: None,
            command_timeout: Some(Duration::from_secs(30)),
            admin_timeout: Duration::from_secs(5),
            shadow_doorbells: true,
            hugepages: true,
            max_io_queues: 64,
            allow_unsafe_dma: false,
            sgl: SglMode::Auto,
            max_retries: 3,
        }
    }
}

/// One active namespace.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Namespace {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
    pub size_bytes: u64,
    pub metadata_size: u16,
    /// All LBA formats: (data size, metadata size, relative performance 0 best..3).
    pub lba_formats: Vec<(u32, u16, u8)>,
    pub current_format: u8,
    pub thin_provisioned: bool,
}

impl Namespace {
    /// The namespace an Identify Namespace structure describes: `Ok(None)` for an inactive
    /// one (NSZE 0), an error naming the field when rio cannot use it (a block size that is
    /// not a power of two from 512 B to 64 KiB, metadata with each block, a size that does
    /// not fit in bytes). The device is untrusted input: nothing here panics.
    pub fn from_identify(
        nsid: u32,
        ns: &IdentifyNamespace,
    ) -> std::result::Result<Option<Namespace>, String> {
        if ns.nsze == 0 {
            return Ok(None);
        }
        let bs = ns.block_size();
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!(
                "LBA format {} has block size {bs} (LBADS {}): rio needs 512 B..=64 KiB",
                ns.current_format_index(),
                ns.current_format().lbads
            ));
        }
        if ns.metadata_size() > 0 {
            // rio sends no metadata pointer: a device would DMA separate metadata to address
            // 0, and interleaved metadata changes the layout of every block.
            return Err(format!(
                "formatted with {} bytes of metadata per block ({}): rio transfers no metadata",
                ns.metadata_size(),
                if ns.extended_metadata() {
                    "interleaved"
                } else {
                    "separate"
                }
            ));
        }
        let size_bytes = ns
            .nsze
            .checked_mul(bs as u64)
            .ok_or_else(|| format!("NSZE {} blocks of {bs} B overflows a byte count", ns.nsze))?;
        Ok(Some(Namespace {
            nsid,
            block_size: bs,
            blocks: ns.nsze,
            size_bytes,
            metadata_size: ns.metadata_size(),
            lba_formats: (0..ns.num_lba_formats())
                .filter_map(|i| ns.lba_format(i))
                .map(|f| (f.data_size(), f.ms, f.relative_performance()))
                .collect(),
            current_format: ns.current_format_index(),
            thin_provisioned: ns.thin_provisioned(),
        }))
    }
}

/// What keeps the BAR mapped and the device reachable.
enum Transport {
    Sim(SimController),
    Vfio {
        _bar: rio_sys::vfio::MmioRegion,
        _device: rio_sys::vfio::Device,
        _group: rio_sys::vfio::Group,
    },
    Uio {
        _bar: rio_sys::pci::MmioResource,
        addr: rio_sys::pci::PciAddr,
    },
}

/// PCI configuration space: the command register and its Bus Master Enable bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Admin entries rio keeps for commands it does not wait for (aborts, event requests), so a
/// synchronous command always finds room.
const ADMIN_ASYNC_MAX: usize = 16;
/// Asynchronous Event Requests kept outstanding (Linux keeps one; events of one kind are held
/// back by the controller until their log page is read, so more buy little).
const AERS: usize = 1;
/// Events remembered for [`Controller::events`].
const EVENTS_KEPT: usize = 64;

/// State of an abort rio sent without waiting for it ([`Controller::submit_abort`]).
#[derive(Debug, Default)]
pub(crate) struct AbortTicket(AtomicU8);

impl AbortTicket {
    /// The controller says it aborted the command (it completes as "Command Abort Requested").
    pub const ABORTED: u8 = 1;
    /// The controller did not abort it (it may still complete).
    pub const DECLINED: u8 = 2;
    /// The Abort command itself failed.
    pub const FAILED: u8 = 3;

    pub fn state(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release)
    }
}

/// What [`Controller::submit_abort`] did.
pub(crate) enum AbortSubmit {
    Sent(Arc<AbortTicket>),
    /// Not now: the admin queue is busy, or as many aborts as the controller accepts at once
    /// (Identify ACL, controller-wide) are outstanding. Try again later.
    Deferred,
}

/// An admin command rio submitted and does not wait for.
#[derive(Debug)]
enum Pending {
    Abort { cid: u16, ticket: Arc<AbortTicket> },
    Event { cid: u16 },
}

impl Pending {
    fn cid(&self) -> u16 {
        match self {
            Pending::Abort { cid, .. } | Pending::Event { cid } => *cid,
        }
    }
}

struct Admin {
    ring: Ring,
    next_cid: u16,
    /// One page for identify data, log pages and other admin payloads. Replaced (the old one
    /// retired) when a command that transfers into it times out.
    page: DmaMem,
    pending: Vec<Pending>,
    /// Events reported and not handled yet (their log pages are read outside the completion
    /// loop).
    events_due: VecDeque<AsyncEvent>,
    /// Memory a timed-out command may still write into: never freed, never reused.
    retired: Vec<DmaMem>,
}

/// An asynchronous event the controller reported, and what rio did about it.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ControllerEvent {
    /// Seconds since the Unix epoch when rio handled it.
    pub at_unix_s: f64,
    /// [`spec::async_event_type`].
    pub kind: u8,
    /// Asynchronous Event Information.
    pub info: u8,
    /// The log page read to clear it.
    pub log_page: u8,
    /// What happened, for people: e.g. "namespace attribute changed: nsid 1 re-read (2097152
    /// blocks of 512 B)".
    pub what: String,
}

/// An NVMe controller driven from userspace.
pub struct Controller {
    pub name: String,
    regs: Regs,
    cap: Cap,
    opts: NvmeOptions,
    admin: Mutex<Admin>,
    ident: Box<IdentifyController>,
    namespaces: RwLock<Vec<Namespace>>,
    /// Bumped when a namespace's geometry is re-read after a Namespace Attribute Changed event.
    ns_epoch: AtomicU64,
    /// PCI vendor and device id (the model's own for `sim://`).
    pci_id: (u16, u16),
    quirks: Quirks,
    events: Mutex<VecDeque<ControllerEvent>>,
    events_total: AtomicU64,
    /// The SMART critical warning bits last reported (0: none).
    critical_warning: AtomicU8,
    max_xfer: u32,
    io_queues: u16,
    qids: Mutex<Vec<bool>>,
    /// Bumped by every reset: queues created under an older generation are gone.
    generation: AtomicU64,
    /// A reset failed: the controller is unusable.
    dead: AtomicBool,
    dbbuf: Option<DmaMem>,
    mapper: Mapper,
    /// Declared last: dropped after everything that uses the BAR or DMA memory.
    transport: Transport,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("mapper", &self.mapper)
            .field("namespaces", &self.namespaces().len())
            .finish()
    }
}

fn ctrl_err(name: &str, reason: impl Into<String>) -> Error {
    Error::Controller {
        ctrl: name.to_string(),
        reason: reason.into(),
    }
}

/// A failed queue creation: the error, and whether the controller certainly holds nothing on
/// the rings (it answered with an error status and the half-created CQ was deleted).
#[derive(Debug)]
pub(crate) struct CreateFailed {
    pub error: Error,
    pub gone: bool,
}

/// Invalid Queue Identifier: the queue does not exist (on delete, it is gone).
fn is_invalid_qid(e: &Error) -> bool {
    matches!(e, Error::Nvme { error, .. }
        if error.status.sct_raw() == 1 && error.status.sc() == spec::command_specific_status::INVALID_QID)
}

/// Controllers this process has open, so two engines on the same PCI function share one
/// driver instance (VFIO lets a group be opened once).
static OPEN: Mutex<Vec<(String, Weak<Controller>)>> = Mutex::new(Vec::new());

/// Bring-up states (NVMe 1.4 §7.6.1), each with a bounded wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Disable,
    WaitNotReady,
    ConfigureAdmin,
    Enable,
    WaitReady,
    Done,
}

impl Controller {
    /// Start a software controller model and bring it up with the real driver.
    pub fn open_sim(cfg: SimConfig, opts: &NvmeOptions) -> Result<Arc<Controller>> {
        let sim = SimController::start(cfg)
            .map_err(|e| ctrl_err("sim", format!("cannot start the model: {e}")))?;
        let (base, len) = sim.bar();
        let pci_id = sim.pci_id();
        // SAFETY: the model's BAR memory lives as long as `sim`, which the controller owns and
        // drops last.
        let regs = unsafe { Regs::new(base, len) };
        Controller::bring_up(
            "sim".into(),
            regs,
            Mapper::Identity,
            Transport::Sim(sim),
            pci_id,
            opts,
        )
    }

    /// Open the controller at PCI address `addr` (bound to vfio-pci, or to uio_pci_generic
    /// with `allow_unsafe_dma`), or return the instance this process already has open.
    pub fn open_pcie(addr: &str, opts: &NvmeOptions) -> Result<Arc<Controller>> {
        let sysfs = std::path::Path::new("/sys");
        let pa: rio_sys::pci::PciAddr = addr
            .parse()
            .map_err(|e| Error::config("target", format!("{addr}: {e}")))?;
        let name = pa.to_string();
        if let Some(why) = DMA_ORDERING {
            return Err(Error::BackendUnavailable {
                backend: "vfio",
                reason: why.into(),
            });
        }
        let mut open = OPEN.lock().expect("controller registry poisoned");
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(c) = open
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(c);
        }
        let dev = rio_sys::pci::device(sysfs, &pa).map_err(|e| Error::NotFound {
            path: format!("pcie://{name} ({e})").into(),
        })?;
        if dev.class != 0x010802 {
            return Err(Error::BadTarget {
                path: format!("pcie://{name}").into(),
                what: format!("is not an NVMe controller (PCI class {:#08x})", dev.class),
            });
        }
        let pci_id = (dev.vendor, dev.device);
        let ctrl = match dev.driver.as_deref() {
            Some("vfio-pci") => {
                let group_id = dev
                    .iommu_group
                    .ok_or_else(|| ctrl_err(&name, "bound to vfio-pci but has no IOMMU group"))?;
                let vf = |what: &str, e: std::io::Error| ctrl_err(&name, format!("{what}: {e}"));
                let container =
                    rio_sys::vfio::Container::open().map_err(|e| vf("open /dev/vfio/vfio", e))?;
                let group = rio_sys::vfio::Group::open(group_id)
                    .map_err(|e| vf(&format!("open /dev/vfio/{group_id}"), e))?;
                group
                    .attach(&container)
                    .map_err(|e| vf("attach the IOMMU group", e))?;
                container
                    .set_iommu()
                    .map_err(|e| vf("set the type1 IOMMU", e))?;
                let device = group
                    .device(&name)
                    .map_err(|e| vf("get the device fd", e))?;
                let bar = device.map_region(0).map_err(|e| vf("map BAR0", e))?;
                device
                    .enable_bus_master()
                    .map_err(|e| vf("enable bus mastering", e))?;
                let ranges = container
                    .iova_ranges()
                    .map_err(|e| vf("read the IOVA ranges", e))?;
                tracing::debug!(ctrl = %name, ?ranges, "IOMMU address ranges");
                // SAFETY: the BAR mapping is owned by the transport, dropped last.
                let regs = unsafe { Regs::new(bar.as_ptr(), bar.len()) };
                let mapper = Mapper::Iommu {
                    container,
                    iovas: Mutex::new(IovaAllocator::new(&ranges)),
                };
                let transport = Transport::Vfio {
                    _bar: bar,
                    _device: device,
                    _group: group,
                };
                Controller::bring_up(name.clone(), regs, mapper, transport, pci_id, opts)?
            }
            Some("uio_pci_generic")
                if opts.allow_unsafe_dma && rio_sys::pci::iommu_translates(sysfs, &pa) =>
            {
                return Err(Error::BackendUnavailable {
                    backend: "vfio",
                    reason: format!(
                        "{name} is bound to uio_pci_generic but the IOMMU translates its DMA \
                         (domain {}): physical addresses would fault; bind it to vfio-pci, or boot \
                         with iommu=pt",
                        rio_sys::pci::iommu_domain_type(sysfs, &pa)
                            .unwrap_or_else(|| "unknown".into())
                    ),
                });
            }
            Some("uio_pci_generic") if opts.allow_unsafe_dma => {
                tracing::warn!(
                    ctrl = %name,
                    "uio_pci_generic: no IOMMU protects this process; the controller can DMA to any physical memory"
                );
                let bar = rio_sys::pci::map_resource(sysfs, &pa, 0)
                    .map_err(|e| ctrl_err(&name, format!("map BAR0 through sysfs: {e}")))?;
                rio_sys::pci::enable_bus_master(sysfs, &pa)
                    .map_err(|e| ctrl_err(&name, format!("enable bus mastering: {e}")))?;
                // SAFETY: the BAR mapping is owned by the transport, dropped last.
                let regs = unsafe { Regs::new(bar.as_ptr(), bar.len()) };
                Controller::bring_up(
                    name.clone(),
                    regs,
                    Mapper::Physical,
                    Transport::Uio {
                        _bar: bar,
                        addr: pa,
                    },
                    pci_id,
                    opts,
                )?
            }
            Some("uio_pci_generic") => {
                return Err(Error::BackendUnavailable {
                    backend: "vfio",
                    reason: format!(
                        "{name} is bound to uio_pci_generic, which gives the device unrestricted DMA; \
                         set allow_unsafe_dma (RIO_ALLOW_UNSAFE_DMA=1) to accept that, or bind it to vfio-pci"
                    ),
                });
            }
            Some(d) => {
                return Err(Error::BackendUnavailable {
                    backend: "vfio",
                    reason: format!(
                        "{name} is bound to the kernel driver {d}; run `rio setup bind {name}` first \
                         (or use its /dev/nvmeXnY block device with the uring backend)"
                    ),
                });
            }
            None => {
                return Err(Error::BackendUnavailable {
                    backend: "vfio",
                    reason: format!("{name} is bound to no driver; run `rio setup bind {name}`"),
                });
            }
        };
        open.push((name, Arc::downgrade(&ctrl)));
        Ok(ctrl)
    }

    fn bring_up(
        name: String,
        regs: Regs,
        mapper: Mapper,
        transport: Transport,
        pci_id: (u16, u16),
        opts: &NvmeOptions,
    ) -> Result<Arc<Controller>> {
        let span = tracing::info_span!("nvme_bring_up", ctrl = %name);
        let _g = span.enter();
        let cap = regs.cap();
        let quirks = match quirks::lookup(pci_id.0, pci_id.1) {
            Some((what, q)) => {
                tracing::info!(ctrl = %name, vendor = format_args!("{:04x}", pci_id.0),
                    device = format_args!("{:04x}", pci_id.1), quirks = ?q, "known controller: {what}");
                q
            }
            None => Quirks::default(),
        };
        if cap.0 == u64::MAX {
            return Err(ctrl_err(
                &name,
                "BAR0 reads all ones: the device is gone or not enabled",
            ));
        }
        if !cap.supports_nvm_command_set() {
            return Err(ctrl_err(
                &name,
                "the controller does not support the NVM command set",
            ));
        }
        if cap.min_page_size() > PAGE as u64 {
            return Err(ctrl_err(
                &name,
                format!(
                    "minimum memory page size {} is above 4 KiB",
                    cap.min_page_size()
                ),
            ));
        }
        // The device is untrusted input: registers that would make the driver index past BAR0
        // or size a queue at zero end bring-up with an error, never a panic.
        if cap.mqes() == 0 {
            return Err(ctrl_err(
                &name,
                "CAP.MQES is 0 (queues of one entry): no usable queue size",
            ));
        }
        let bar_len = regs.len();
        if spec::cq_head_doorbell(0, cap.dstrd()) + 4 > bar_len {
            return Err(ctrl_err(
                &name,
                format!(
                    "CAP.DSTRD {} puts the admin queue's doorbells past BAR0 ({bar_len:#x} bytes)",
                    cap.dstrd()
                ),
            ));
        }
        let admin_dbs = regs
            .doorbell(spec::sq_tail_doorbell(0, cap.dstrd()))
            .zip(regs.doorbell(spec::cq_head_doorbell(0, cap.dstrd())))
            .expect("checked above: the admin doorbells lie inside BAR0");
        let admin_ring = Ring::new(&mapper, 0, ADMIN_ENTRIES, admin_dbs.0, admin_dbs.1, false)?;
        let page = DmaMem::new(&mapper, PAGE, false)?;
        let mut c = Controller {
            name,
            regs,
            cap,
            opts: opts.clone(),
            admin: Mutex::new(Admin {
                ring: admin_ring,
                next_cid: 0,
                page,
                pending: Vec::new(),
                events_due: VecDeque::new(),
                retired: Vec::new(),
            }),
            ident: Box::new(IdentifyController::zeroed()),
            namespaces: RwLock::new(Vec::new()),
            ns_epoch: AtomicU64::new(0),
            pci_id,
            quirks,
            events: Mutex::new(VecDeque::new()),
            events_total: AtomicU64::new(0),
            critical_warning: AtomicU8::new(0),
            max_xfer: 0,
            io_queues: 0,
            qids: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            dbbuf: None,
            mapper,
            transport,
        };
        let mut admin = c.admin.lock().expect("admin queue poisoned");
        c.enable(&mut admin)?;
        drop(admin);
        c.identify()?;
        let a = c.admin.get_mut().expect("admin queue poisoned");
        // Events are an extra: a controller that refuses them still serves I/O.
        arm_events(
            &c.regs,
            &c.name,
            &c.mapper,
            &c.ident,
            a,
            c.opts.admin_timeout,
        );
        Ok(Arc::new(c))
    }

    /// Disable, program the admin queue, enable: the state machine of NVMe 1.4 §7.6.1 with
    /// every wait bounded by CAP.TO.
    fn enable(&self, admin: &mut Admin) -> Result<()> {
        let to = self.cap.timeout().max(Duration::from_millis(500));
        let mut step = Step::Disable;
        let mut deadline = Instant::now() + to;
        while step != Step::Done {
            tracing::debug!(?step, "bring-up");
            step = match step {
                Step::Disable => {
                    let cc = self.regs.cc();
                    if cc.en() && !self.regs.csts().rdy() {
                        // Clearing EN while the controller is still becoming ready is undefined
                        // (NVMe 1.4 §3.1.5): let it finish first (bounded; go on regardless).
                        let _ =
                            self.wait_csts(deadline, to, "CSTS.RDY before disabling", false, |c| {
                                c.rdy()
                            });
                    }
                    if cc.en() {
                        self.regs.set_cc(cc.with_enable(false));
                        std::thread::sleep(self.quirks.delay_before_ready_check);
                    }
                    deadline = Instant::now() + to;
                    Step::WaitNotReady
                }
                Step::WaitNotReady => {
                    // CFS may stay set until the reset completes: not an error here.
                    self.wait_csts(
                        deadline,
                        to,
                        "CSTS.RDY to clear after disabling",
                        false,
                        |c| !c.rdy(),
                    )?;
                    Step::ConfigureAdmin
                }
                Step::ConfigureAdmin => {
                    admin.ring.reset();
                    admin.next_cid = 0;
                    // The disabled controller forgot every command: nothing is outstanding.
                    admin.pending.clear();
                    self.regs.write32(
                        spec::reg::AQA,
                        spec::Aqa::new(ADMIN_ENTRIES, ADMIN_ENTRIES).0,
                    );
                    self.regs.write64(spec::reg::ASQ, admin.ring.sq_iova());
                    self.regs.write64(spec::reg::ACQ, admin.ring.cq_iova());
                    Step::Enable
                }
                Step::Enable => {
                    let mps =
                        Cc::mps_for_page_size(PAGE as u64).expect("4 KiB is a valid page size");
                    self.regs.set_cc(Cc::nvm_default(mps).with_enable(true));
                    std::thread::sleep(self.quirks.delay_before_ready_check);
                    deadline = Instant::now() + to;
                    Step::WaitReady
                }
                Step::WaitReady => {
                    self.wait_csts(deadline, to, "CSTS.RDY after enabling", true, |c| c.rdy())?;
                    Step::Done
                }
                Step::Done => Step::Done,
            };
        }
        Ok(())
    }

    fn wait_csts(
        &self,
        deadline: Instant,
        to: Duration,
        what: &str,
        fatal_is_error: bool,
        ok: impl Fn(spec::Csts) -> bool,
    ) -> Result<()> {
        loop {
            let csts = self.regs.csts();
            if csts.is_all_ones() {
                return Err(ctrl_err(
                    &self.name,
                    format!("CSTS reads all ones while waiting for {what}: device lost"),
                ));
            }
            if csts.cfs() && fatal_is_error {
                return Err(ctrl_err(
                    &self.name,
                    format!("controller fatal status (CSTS.CFS) while waiting for {what}"),
                ));
            }
            if ok(csts) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ctrl_err(
                    &self.name,
                    format!("timed out after {to:?} (CAP.TO) waiting for {what}"),
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Identify the controller and its namespaces, negotiate queues, set up shadow doorbells.
    fn identify(&mut self) -> Result<()> {
        let t = self.opts.admin_timeout;
        let (regs, name, mapper) = (&self.regs, self.name.as_str(), &self.mapper);
        let admin = self.admin.get_mut().expect("admin queue poisoned");
        let (_, page) = exec_page(regs, name, mapper, admin, t, |p| {
            SubmissionEntry::identify_controller(p)
        })?;
        *self.ident = IdentifyController::from_prefix(&page[..]).expect("page holds 4 KiB");
        let want = self.opts.max_io_queues.max(1);
        let dw0 = exec(
            regs,
            name,
            mapper,
            admin,
            SubmissionEntry::set_num_queues(want, want),
            t,
            false,
        )?
        .dw0;
        let (sqs, cqs) = spec::decode_num_queues(dw0);
        let mut io_queues = sqs.min(cqs).min(want as u32) as u16;
        // Every granted queue's doorbells must lie inside BAR0 (CAP.DSTRD comes from the
        // device).
        let d = self.cap.dstrd();
        let in_bar = (0..=io_queues)
            .take_while(|&q| spec::cq_head_doorbell(q, d) + 4 <= regs.len())
            .count()
            .saturating_sub(1) as u16;
        if in_bar < io_queues {
            tracing::warn!(ctrl = %name, granted = io_queues, usable = in_bar, dstrd = d,
                bar = regs.len(), "doorbells of some granted I/O queues lie past BAR0; using fewer");
            io_queues = in_bar;
        }
        if io_queues == 0 {
            return Err(ctrl_err(
                name,
                format!(
                    "no usable I/O queue pair (granted {}, doorbell stride {} B, BAR0 {:#x} bytes)",
                    sqs.min(cqs),
                    4u32 << d,
                    regs.len()
                ),
            ));
        }
        let mdts = self
            .ident
            .mdts_bytes(self.cap.min_page_size())
            .unwrap_or(u64::MAX);
        self.max_xfer = mdts.min(MAX_XFER_CAP as u64) as u32;

        let ids = namespace_ids(regs, name, mapper, admin, t, &self.ident, &self.quirks)?;
        let mut namespaces = Vec::new();
        for nsid in ids {
            if let Some(n) = identify_namespace(regs, name, mapper, admin, t, nsid)? {
                namespaces.push(n);
            }
        }
        *self.namespaces.get_mut().expect("namespace table poisoned") = namespaces;

        if self.opts.shadow_doorbells && self.ident.supports_dbbuf() {
            // Every queue id must have its slots inside the shadow page (a controller reads the
            // shadow of any queue once configured).
            let stride = 4usize << d;
            let fits = ((PAGE / stride).saturating_sub(2) / 2).min(u16::MAX as usize) as u16;
            if fits == 0 {
                tracing::warn!(ctrl = %name, dstrd = d,
                    "doorbell stride too large for a one-page shadow buffer; using MMIO doorbells");
            } else {
                match DmaMem::new(mapper, 2 * PAGE, false) {
                    Err(e) => {
                        tracing::warn!(error = %e, "no memory for shadow doorbells; using MMIO doorbells")
                    }
                    Ok(mem) => {
                        let cmd =
                            SubmissionEntry::doorbell_buffer_config(mem.iova(0), mem.iova(PAGE));
                        match exec(regs, name, mapper, admin, cmd, t, false) {
                            Ok(_) => {
                                self.dbbuf = Some(mem);
                                io_queues = io_queues.min(fits);
                            }
                            Err(e @ Error::Nvme { .. }) => {
                                tracing::warn!(error = %e, "Doorbell Buffer Config failed; using MMIO doorbells");
                                mem.release(mapper);
                            }
                            Err(e) => {
                                // No answer: the controller may still take the buffer and write
                                // EventIdx into it later. Keep the memory out of reuse, and reset
                                // the controller so the command is forgotten for sure.
                                tracing::warn!(error = %e,
                                    "Doorbell Buffer Config did not complete; resetting and using MMIO doorbells");
                                admin.retired.push(mem);
                                let cur = SubmissionEntry::set_num_queues(io_queues, io_queues);
                                self.reenable_during_bring_up(cur)?;
                            }
                        }
                    }
                }
            }
        }
        self.io_queues = io_queues;
        self.qids = Mutex::new(vec![false; io_queues as usize + 1]);

        if [self.ident.crdt1, self.ident.crdt2, self.ident.crdt3] != [0; 3] {
            // Advanced Command Retry Enable: the controller sets CRD in completions only when
            // the host says it honours it (Host Behavior Support, byte 0 = ACRE).
            let admin = self.admin.get_mut().expect("admin queue poisoned");
            if let Err(e) = exec_host_behavior(&self.regs, &self.name, &self.mapper, admin, t) {
                tracing::debug!(ctrl = %self.name, error = %e, "Host Behavior Support (ACRE) not accepted");
            }
        }
        tracing::info!(
            ctrl = %self.name,
            model = %self.ident.model(),
            namespaces = self.namespaces.get_mut().map(|n| n.len()).unwrap_or(0),
            io_queues = self.io_queues,
            max_xfer = self.max_xfer,
            shadow_doorbells = self.dbbuf.is_some(),
            sgl = self.ident.supports_sgl(),
            "controller ready"
        );
        Ok(())
    }

    /// Bring-up found the controller in an unknown state (a configuration command did not
    /// complete): disable and enable it again, and repeat the queue negotiation.
    fn reenable_during_bring_up(&mut self, num_queues: SubmissionEntry) -> Result<()> {
        let mut admin = self.admin.lock().expect("admin queue poisoned");
        self.enable(&mut admin)?;
        exec(
            &self.regs,
            &self.name,
            &self.mapper,
            &mut admin,
            num_queues,
            self.opts.admin_timeout,
            false,
        )?;
        Ok(())
    }

    pub fn identify_data(&self) -> &IdentifyController {
        &self.ident
    }

    /// The active namespaces rio can use (re-read when the controller reports a change).
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.namespaces
            .read()
            .expect("namespace table poisoned")
            .clone()
    }

    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        self.namespaces
            .read()
            .expect("namespace table poisoned")
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
    }

    /// Bumped whenever a namespace's geometry was re-read (Namespace Attribute Changed).
    pub fn namespace_epoch(&self) -> u64 {
        self.ns_epoch.load(Ordering::Acquire)
    }

    /// PCI vendor and device id (the model's for `sim://`).
    pub fn pci_id(&self) -> (u16, u16) {
        self.pci_id
    }

    /// What the quirks table says about this controller.
    pub fn quirks(&self) -> Quirks {
        self.quirks
    }

    /// Whether reads and writes may use SGLs (the controller supports them and the options
    /// allow it).
    pub fn uses_sgl(&self) -> bool {
        self.opts.sgl != SglMode::Off && self.ident.supports_sgl()
    }

    /// The last asynchronous events the controller reported (at most 64), oldest first.
    pub fn events(&self) -> Vec<ControllerEvent> {
        self.events
            .lock()
            .expect("event log poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Asynchronous events handled since bring-up.
    pub fn events_total(&self) -> u64 {
        self.events_total.load(Ordering::Acquire)
    }

    /// SMART critical warning bits the controller last reported through an event (0: none;
    /// [`spec::critical_warning`]).
    pub fn critical_warning(&self) -> u8 {
        self.critical_warning.load(Ordering::Acquire)
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// Largest transfer of one command (MDTS, capped by the driver's PRP list space).
    pub fn max_xfer(&self) -> u32 {
        self.max_xfer
    }

    pub fn io_queue_count(&self) -> u16 {
        self.io_queues
    }

    pub fn shadow_doorbells(&self) -> bool {
        self.dbbuf.is_some()
    }

    pub(crate) fn options(&self) -> &NvmeOptions {
        &self.opts
    }

    pub(crate) fn mapper(&self) -> &Mapper {
        &self.mapper
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a reset failed and the controller is unusable for good (every command fails).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Why the controller cannot go on as it is, if it cannot: CSTS.CFS, all ones (the device
    /// is gone from the bus), or not ready while rio has it enabled (it lost power or was reset
    /// from outside, and every queue with it). Each calls for a reset.
    pub(crate) fn fatal_status(&self) -> Option<&'static str> {
        let c = self.regs.csts();
        if c.is_all_ones() {
            Some("controller gone (CSTS reads all ones)")
        } else if c.cfs() {
            Some("controller fatal status (CSTS.CFS)")
        } else if !c.rdy() {
            Some("controller not ready (it lost power, or was reset from outside)")
        } else {
            None
        }
    }

    /// The admin queue, after a reset if the controller needs one ([`Self::fatal_status`]: it
    /// lost power, failed, or was reset from outside since rio enabled it): admin commands to
    /// a controller that is not ready would only time out. The I/O queues notice the new
    /// generation at their next poll and create themselves again.
    fn ready_admin(&self) -> Result<MutexGuard<'_, Admin>> {
        if let Some(why) = self.fatal_status() {
            self.reset(self.generation(), why)?;
        }
        self.admin()
    }

    fn admin(&self) -> Result<MutexGuard<'_, Admin>> {
        if self.is_dead() {
            return Err(ctrl_err(
                &self.name,
                "the controller failed to reset and is unusable",
            ));
        }
        Ok(self.admin.lock().expect("admin queue poisoned"))
    }

    fn exec(&self, a: &mut Admin, cmd: SubmissionEntry) -> Result<CompletionEntry> {
        exec(
            &self.regs,
            &self.name,
            &self.mapper,
            a,
            cmd,
            self.opts.admin_timeout,
            false,
        )
    }

    /// Collect admin completions rio does not wait for (abort answers, asynchronous events)
    /// and handle the events (read their log pages, re-read changed namespaces). Called by the
    /// I/O queues as they poll; never blocks on the admin lock (a busy admin queue is polled
    /// by its holder).
    pub(crate) fn poll_admin(&self) {
        if self.is_dead() {
            return;
        }
        let mut a = match self.admin.try_lock() {
            Ok(a) => a,
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return,
        };
        reap_admin(&self.name, &mut a);
        if !a.events_due.is_empty() {
            self.handle_events(&mut a);
        }
    }

    /// Handle asynchronous events now (waiting for the admin queue if another thread uses
    /// it). The I/O queues do this on their own as they poll; a host whose queues sit idle
    /// calls this. Returns the events handled.
    pub fn poll_events(&self) -> Result<usize> {
        let mut a = self.admin()?;
        reap_admin(&self.name, &mut a);
        Ok(self.handle_events(&mut a))
    }

    fn handle_events(&self, a: &mut Admin) -> usize {
        let mut n = 0;
        while let Some(ev) = a.events_due.pop_front() {
            n += 1;
            let what = match self.handle_event(a, ev) {
                Ok(w) => w,
                Err(e) => format!("{}: handling failed: {e}", ev.name()),
            };
            tracing::warn!(ctrl = %self.name, event = ev.name(), kind = ev.kind, info = ev.info,
                log_page = ev.log_page, "asynchronous event: {what}");
            let mut log = self.events.lock().expect("event log poisoned");
            if log.len() == EVENTS_KEPT {
                log.pop_front();
            }
            log.push_back(ControllerEvent {
                at_unix_s: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                kind: ev.kind,
                info: ev.info,
                log_page: ev.log_page,
                what,
            });
            self.events_total.fetch_add(1, Ordering::AcqRel);
        }
        n
    }

    /// Read the event's log page (which clears it, so the controller reports the next one of
    /// its kind) and act on it.
    fn handle_event(&self, a: &mut Admin, ev: AsyncEvent) -> Result<String> {
        let t = self.opts.admin_timeout;
        let (regs, name, mapper) = (&self.regs, self.name.as_str(), &self.mapper);
        let lid = ev.log_page;
        let len = match lid {
            log_page::CHANGED_NS_LIST => PAGE as u32,
            log_page::SMART_HEALTH => SmartLog::SIZE as u32,
            _ => 512,
        };
        let (_, page) = exec_page(regs, name, mapper, a, t, |p| {
            SubmissionEntry::get_log_page(lid, spec::NSID_ALL, len, 0, p, 0)
        })?;
        Ok(match (ev.kind, ev.info) {
            (async_event_type::NOTICE, async_event_notice::NS_ATTRIBUTE_CHANGED) => {
                let changed = spec::parse_ns_list(&page[..]);
                let all = changed.first() == Some(&0xFFFF_FFFF);
                let known: Vec<u32> = self.namespaces().iter().map(|n| n.nsid).collect();
                let ids: Vec<u32> = if all { known } else { changed };
                let mut out = Vec::new();
                for nsid in ids {
                    let fresh = identify_namespace(regs, name, mapper, a, t, nsid)?;
                    let mut table = self.namespaces.write().expect("namespace table poisoned");
                    table.retain(|n| n.nsid != nsid);
                    match fresh {
                        Some(n) => {
                            out.push(format!(
                                "nsid {nsid} re-read ({} blocks of {} B)",
                                n.blocks, n.block_size
                            ));
                            table.push(n);
                            table.sort_by_key(|n| n.nsid);
                        }
                        None => out.push(format!("nsid {nsid} is gone or unusable")),
                    }
                }
                self.ns_epoch.fetch_add(1, Ordering::AcqRel);
                format!("namespace attribute changed: {}", out.join(", "))
            }
            (async_event_type::SMART_HEALTH, _) => {
                let log = SmartLog::from_prefix(&page[..]).expect("page holds a SMART log");
                self.critical_warning
                    .store(log.critical_warning, Ordering::Release);
                format!(
                    "SMART/health warning: critical warning {:#04x}, {} °C, {}% spare",
                    log.critical_warning,
                    log.temperature_celsius(),
                    log.avail_spare
                )
            }
            (async_event_type::NOTICE, async_event_notice::FIRMWARE_ACTIVATION_STARTING) => {
                // Firmware Slot Information: byte 0 = active slot (bits 2:0), then 8 bytes per
                // slot from byte 8.
                let slot = (page[0] & 0x7).max(1) as usize;
                let rev = &page[8 * slot..8 * slot + 8];
                let rev = String::from_utf8_lossy(rev).trim().to_string();
                format!("firmware activation starting (slot {slot}: {rev})")
            }
            _ => format!(
                "{} (info {:#04x}, log page {lid:#04x} read)",
                ev.name(),
                ev.info
            ),
        })
    }

    /// Send an Abort for command `cid` of queue `sqid` without waiting for its answer; poll
    /// the ticket. Never blocks: a busy admin queue or the controller-wide abort limit (ACL)
    /// defers it.
    pub(crate) fn submit_abort(&self, sqid: u16, cid: u16) -> Result<AbortSubmit> {
        if self.is_dead() {
            return Err(ctrl_err(
                &self.name,
                "the controller failed to reset and is unusable",
            ));
        }
        let mut a = match self.admin.try_lock() {
            Ok(a) => a,
            Err(TryLockError::WouldBlock) => return Ok(AbortSubmit::Deferred),
            Err(TryLockError::Poisoned(_)) => {
                return Err(ctrl_err(&self.name, "admin queue poisoned"));
            }
        };
        reap_admin(&self.name, &mut a);
        let aborting = a
            .pending
            .iter()
            .filter(|p| matches!(p, Pending::Abort { .. }))
            .count();
        if aborting >= self.ident.abort_limit() as usize {
            return Ok(AbortSubmit::Deferred);
        }
        let ticket = Arc::new(AbortTicket::default());
        let sent = submit_async(
            &mut a,
            SubmissionEntry::abort(sqid, cid),
            Pending::Abort {
                cid: 0,
                ticket: ticket.clone(),
            },
        );
        Ok(if sent {
            AbortSubmit::Sent(ticket)
        } else {
            AbortSubmit::Deferred
        })
    }

    /// Abort commands outstanding on the admin queue now (at most Identify ACL + 1,
    /// controller-wide).
    pub fn aborts_outstanding(&self) -> usize {
        self.admin
            .lock()
            .map(|a| {
                a.pending
                    .iter()
                    .filter(|p| matches!(p, Pending::Abort { .. }))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Admin pages retired after timeouts (kept out of reuse).
    pub fn retired_pages(&self) -> usize {
        self.admin.lock().map(|a| a.retired.len()).unwrap_or(0)
    }

    /// A new I/O queue pair with `entries` slots (clamped to CAP.MQES), on a free queue id,
    /// and the controller generation it was created in.
    pub(crate) fn create_io_ring(&self, entries: u16) -> Result<(Ring, u64)> {
        // CAP.MQES >= 1 was checked at bring-up, so the bounds are ordered.
        let max = self.cap.max_queue_entries().clamp(2, 4096);
        let entries = (entries as u32).clamp(2, max) as u16;
        let qid = {
            let mut q = self.qids.lock().expect("qid table poisoned");
            let i = (1..q.len()).find(|&i| !q[i]).ok_or_else(|| {
                ctrl_err(
                    &self.name,
                    format!(
                        "all {} I/O queue pairs the controller granted are in use",
                        self.io_queues
                    ),
                )
            })?;
            q[i] = true;
            i as u16
        };
        let d = self.cap.dstrd();
        let dbs = self
            .regs
            .doorbell(spec::sq_tail_doorbell(qid, d))
            .zip(self.regs.doorbell(spec::cq_head_doorbell(qid, d)));
        let ring = match dbs {
            Some((sq_db, cq_db)) => Ring::new(
                &self.mapper,
                qid,
                entries,
                sq_db,
                cq_db,
                self.opts.hugepages,
            ),
            None => Err(ctrl_err(
                &self.name,
                format!("doorbells of queue {qid} lie past BAR0"),
            )),
        };
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => {
                self.qids.lock().expect("qid table poisoned")[qid as usize] = false;
                return Err(e);
            }
        };
        ring.set_shadow(self.shadow_of(qid));
        match self.create_queues_on_device(&ring) {
            Ok(generation) => {
                std::thread::sleep(self.quirks.delay_after_queue_create);
                Ok((ring, generation))
            }
            Err(f) => {
                let e = f.error;
                if f.gone {
                    self.release_ring(ring);
                } else {
                    self.forget_ring(ring, &e);
                }
                Err(e)
            }
        }
    }

    /// Free a queue pair's id and memory: the controller holds no queue on them.
    pub(crate) fn release_ring(&self, ring: Ring) {
        self.qids.lock().expect("qid table poisoned")[ring.qid as usize] = false;
        ring.release(&self.mapper);
    }

    /// After a create or delete whose outcome is unknown (a timeout, a dead controller) the
    /// controller might still use the rings: the id stays reserved and the memory leaks.
    pub(crate) fn forget_ring(&self, ring: Ring, e: &Error) {
        tracing::error!(ctrl = %self.name, qid = ring.qid, error = %e,
            "queue pair state unknown; keeping its id reserved and its memory mapped");
        std::mem::forget(ring);
    }

    fn shadow_of(&self, qid: u16) -> Option<Shadow> {
        let mem = self.dbbuf.as_ref()?;
        let d = self.cap.dstrd();
        let base = mem.ptr().cast::<std::sync::atomic::AtomicU32>();
        let (si, ci) = (
            spec::shadow_sq_tail_index(qid, d),
            spec::shadow_cq_head_index(qid, d),
        );
        if (ci + 1) * 4 > PAGE {
            return None;
        }
        Some(Shadow {
            sq_tail: base.wrapping_add(si),
            cq_head: base.wrapping_add(ci),
            sq_event: base.wrapping_add(PAGE / 4 + si),
            cq_event: base.wrapping_add(PAGE / 4 + ci),
        })
    }

    /// Create CQ then SQ in one admin-lock section, and return the generation read under that
    /// lock: a reset (which holds the lock throughout) cannot slip in between. On failure,
    /// says whether the controller certainly holds nothing on these rings.
    fn create_queues_on_device(&self, ring: &Ring) -> std::result::Result<u64, CreateFailed> {
        let unknown = |error| CreateFailed { error, gone: false };
        let mut a = self.ready_admin().map_err(unknown)?;
        let generation = self.generation();
        let n = ring.entries as u32;
        let cq = SubmissionEntry::create_io_cq(ring.qid, n, ring.cq_iova(), true, None);
        self.exec(&mut a, cq).map_err(|error| CreateFailed {
            gone: matches!(error, Error::Nvme { .. }),
            error,
        })?;
        let sq = SubmissionEntry::create_io_sq(
            ring.qid,
            n,
            ring.sq_iova(),
            ring.qid,
            true,
            spec::QueuePriority::Medium,
        );
        if let Err(error) = self.exec(&mut a, sq) {
            let sq_gone = matches!(error, Error::Nvme { .. });
            let del = SubmissionEntry::delete_io_cq(ring.qid);
            let cq_gone = match self.exec(&mut a, del) {
                Ok(_) => true,
                Err(d) => {
                    tracing::warn!(ctrl = %self.name, qid = ring.qid, error = %d,
                        "deleting the CQ of a half-created queue pair failed");
                    is_invalid_qid(&d)
                }
            };
            return Err(CreateFailed {
                error,
                gone: sq_gone && cq_gone,
            });
        }
        Ok(generation)
    }

    /// After a reset: the controller forgot every I/O queue; create this one again. Returns
    /// the generation it now lives in, or the error and whether the controller certainly
    /// holds nothing on the rings.
    pub(crate) fn recreate_io_ring(
        &self,
        ring: &mut Ring,
    ) -> std::result::Result<u64, CreateFailed> {
        ring.reset();
        let g = self.create_queues_on_device(ring)?;
        std::thread::sleep(self.quirks.delay_after_queue_create);
        Ok(g)
    }

    /// Wait until no reset is in progress (a reset holds the admin lock from the generation
    /// bump until the controller is enabled again, or marked dead and quiesced).
    pub(crate) fn wait_reset_done(&self) {
        drop(self.admin.lock().expect("admin queue poisoned"));
    }

    /// Delete a queue pair created in generation `created_in` (SQ first, then its CQ, under
    /// one hold of the admin lock) and free its memory and id. A queue the controller no
    /// longer has (a reset since, or it answers Invalid Queue Identifier) is freed at once; if
    /// the controller's answer leaves the state unknown, the id stays reserved and the memory
    /// leaks (the device may still use it).
    pub(crate) fn delete_io_ring(&self, ring: Ring, created_in: u64) {
        if created_in == self.generation() && !self.is_dead() {
            let r = self.ready_admin().and_then(|mut a| {
                if self.generation() != created_in {
                    // `ready_admin` reset the controller: the queue is gone.
                    return Ok(());
                }
                let sq = self.exec(&mut a, SubmissionEntry::delete_io_sq(ring.qid));
                match sq {
                    Ok(_) => {}
                    Err(e) if is_invalid_qid(&e) => {}
                    Err(e) => return Err(e),
                }
                match self.exec(&mut a, SubmissionEntry::delete_io_cq(ring.qid)) {
                    Ok(_) => Ok(()),
                    Err(e) if is_invalid_qid(&e) => Ok(()),
                    Err(e) => Err(e),
                }
            });
            if let Err(e) = r {
                tracing::warn!(ctrl = %self.name, qid = ring.qid, error = %e,
                    "deleting an I/O queue pair failed");
                if !self.is_dead() {
                    self.forget_ring(ring, &e);
                    return;
                }
            }
        }
        // Otherwise the queue is gone already: the controller was reset since, or marked dead
        // (and quiesced, bus mastering off). Its memory is safe to free.
        self.release_ring(ring);
    }

    /// Reset the controller (disable, enable, renegotiate), e.g. because a command did not
    /// complete after an abort. Every queue pair is gone afterwards: their owners notice the new
    /// generation, fail what they had outstanding and create their queues again.
    ///
    /// `seen` is the generation the caller's decision was based on: if another queue reset the
    /// controller meanwhile, nothing is done (one reset per failure, not one per queue).
    pub(crate) fn reset(&self, seen: u64, why: &str) -> Result<()> {
        let mut admin = self.admin()?;
        let gen_before = self.generation();
        if gen_before != seen {
            return Ok(());
        }
        tracing::warn!(ctrl = %self.name, reason = why, "resetting controller");
        self.generation.fetch_add(1, Ordering::AcqRel);
        let r = self.enable(&mut admin).and_then(|()| {
            let n = self.io_queues.max(1);
            self.exec(&mut admin, SubmissionEntry::set_num_queues(n, n))?;
            if let Some(mem) = &self.dbbuf {
                // Other threads may be storing into their shadow slots right now (they have
                // not polled yet): zero with atomic stores, not a plain memset.
                let words = mem.ptr().cast::<std::sync::atomic::AtomicU32>();
                for i in 0..2 * PAGE / 4 {
                    // SAFETY: `i` indexes the two live, aligned pages of the doorbell buffer.
                    unsafe { (*words.add(i)).store(0, Ordering::Relaxed) };
                }
                let cmd = SubmissionEntry::doorbell_buffer_config(mem.iova(0), mem.iova(PAGE));
                self.exec(&mut admin, cmd)?;
            }
            arm_events(
                &self.regs,
                &self.name,
                &self.mapper,
                &self.ident,
                &mut admin,
                self.opts.admin_timeout,
            );
            Ok(())
        });
        match &r {
            Ok(()) => {
                tracing::warn!(ctrl = %self.name, generation = gen_before + 1, "controller reset done")
            }
            Err(e) => {
                tracing::error!(ctrl = %self.name, error = %e, "controller reset failed; marking it unusable");
                // The controller may still be running: stop its DMA before anyone's buffers
                // are handed back (callers fail their commands once this returns).
                self.quiesce();
                self.dead.store(true, Ordering::Release);
            }
        }
        r.map_err(|e| ctrl_err(&self.name, format!("controller reset ({why}) failed: {e}")))
    }

    /// Stop the device's DMA for good: clear Bus Master Enable in its PCI command register.
    /// Returns whether that is certain (the model stops on CC.EN=0 anyway).
    fn quiesce(&self) -> bool {
        self.regs.set_cc(self.regs.cc().with_enable(false));
        let r = match &self.transport {
            Transport::Sim(_) => Ok(()),
            Transport::Vfio { _device, .. } => {
                let mut cmd = [0u8; 2];
                _device.read_config(PCI_COMMAND, &mut cmd).and_then(|()| {
                    let v = u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER;
                    _device.write_config(PCI_COMMAND, &v.to_le_bytes())
                })
            }
            Transport::Uio { addr, .. } => {
                let sysfs = std::path::Path::new("/sys");
                let mut cmd = [0u8; 2];
                rio_sys::pci::read_config(sysfs, addr, PCI_COMMAND, &mut cmd).and_then(|()| {
                    let v = u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER;
                    rio_sys::pci::write_config(sysfs, addr, PCI_COMMAND, &v.to_le_bytes())
                })
            }
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(ctrl = %self.name, error = %e, "could not disable bus mastering");
                false
            }
        }
    }

    /// Set Features for a feature without a data buffer (e.g. temperature threshold,
    /// volatile write cache, arbitration); returns completion dword 0. Features with a data
    /// structure are refused.
    pub fn set_features(&self, fid: u8, cdw11: u32) -> Result<u32> {
        use spec::feature;
        let no_data = matches!(
            fid,
            feature::ARBITRATION
                | feature::POWER_MANAGEMENT
                | feature::TEMPERATURE_THRESHOLD
                | feature::ERROR_RECOVERY
                | feature::VOLATILE_WRITE_CACHE
                | feature::INTERRUPT_COALESCING
                | feature::WRITE_ATOMICITY
                | feature::ASYNC_EVENT_CONFIG
                | feature::KEEP_ALIVE_TIMER
                | feature::NON_OPERATIONAL_POWER_STATE_CONFIG
        );
        if !no_data {
            return Err(Error::config(
                "feature",
                format!("feature {fid:#04x} needs a data buffer or is managed by rio"),
            ));
        }
        let mut a = self.ready_admin()?;
        Ok(self
            .exec(&mut a, SubmissionEntry::set_features(fid, cdw11, false))?
            .dw0)
    }

    /// SMART / health log (controller-wide).
    pub fn smart_log(&self) -> Result<SmartLog> {
        let mut a = self.admin()?;
        let (_, page) = exec_page(
            &self.regs,
            &self.name,
            &self.mapper,
            &mut a,
            self.opts.admin_timeout,
            |p| SubmissionEntry::get_smart_log(spec::NSID_ALL, p),
        )?;
        Ok(SmartLog::from_prefix(&page[..]).expect("page holds a SMART log"))
    }

    /// Valid entries of the error log (at most one page's worth).
    pub fn error_log(&self) -> Result<Vec<spec::ErrorLogEntry>> {
        let mut a = self.admin()?;
        let entries = (self.ident.elpe as u32 + 1).min((PAGE / spec::ErrorLogEntry::SIZE) as u32);
        let (_, page) = exec_page(
            &self.regs,
            &self.name,
            &self.mapper,
            &mut a,
            self.opts.admin_timeout,
            |p| SubmissionEntry::get_error_log(entries, p, 0),
        )?;
        Ok(page
            .chunks_exact(spec::ErrorLogEntry::SIZE)
            .take(entries as usize)
            .filter_map(spec::ErrorLogEntry::from_prefix)
            .filter(|e| e.is_valid())
            .collect())
    }

    /// The software model behind this controller, if it is one.
    pub fn sim(&self) -> Option<&SimController> {
        match &self.transport {
            Transport::Sim(s) => Some(s),
            _ => None,
        }
    }
}

/// Submit one admin command and spin for its completion. Completions of commands rio does not
/// wait for (aborts, event requests) that arrive meanwhile are handed to [`dispatch`].
///
/// `data`: the command transfers into the admin page. If it times out, the controller may
/// still write the page later, so the page is retired (kept mapped, never reused) and a new
/// one takes its place.
fn exec(
    regs: &Regs,
    name: &str,
    mapper: &Mapper,
    admin: &mut Admin,
    cmd: SubmissionEntry,
    timeout: Duration,
    data: bool,
) -> Result<CompletionEntry> {
    // Completions that arrived since the last admin call go where they belong first.
    reap_admin(name, admin);
    let Some(cid) = alloc_cid(admin) else {
        return Err(ctrl_err(
            name,
            "admin submission queue full (controller not consuming)",
        ));
    };
    let cmd = cmd.with_cid(cid);
    let opcode = cmd.opcode;
    admin.ring.push(&cmd);
    admin.ring.ring_sq();
    let deadline = Instant::now() + timeout;
    let mut spins = 0u32;
    loop {
        // Bounded per pass: a device posting completions without end cannot pin this thread
        // past the deadline.
        let mut seen = 0u16;
        while seen < admin.ring.entries {
            let Some(c) = admin.ring.next_cqe() else {
                break;
            };
            seen += 1;
            if c.cid == cid && c.sq_id == 0 {
                admin.ring.ring_cq();
                return c
                    .into_result(true, opcode)
                    .map(|_| c)
                    .map_err(|error: NvmeError| Error::Nvme {
                        ctrl: name.to_string(),
                        error,
                    });
            }
            dispatch(name, admin, c);
        }
        if seen > 0 {
            admin.ring.ring_cq();
        }
        spins += 1;
        if spins.is_multiple_of(256) {
            let csts = regs.csts();
            let fatal = csts.cfs() || csts.is_all_ones();
            let late = Instant::now() >= deadline;
            if fatal || late {
                if data {
                    retire_page(name, mapper, admin);
                }
                return Err(ctrl_err(
                    name,
                    if fatal {
                        format!(
                            "controller fatal status (CSTS.CFS) during {}",
                            spec::opcode_name(true, opcode)
                        )
                    } else {
                        format!(
                            "admin command {} timed out after {timeout:?}",
                            spec::opcode_name(true, opcode)
                        )
                    },
                ));
            }
            if spins > 4096 {
                std::thread::yield_now();
            }
        }
        std::hint::spin_loop();
    }
}

/// Run a command that transfers into the admin page (its address is passed to `cmd`), and
/// copy the page out.
fn exec_page(
    regs: &Regs,
    name: &str,
    mapper: &Mapper,
    admin: &mut Admin,
    timeout: Duration,
    cmd: impl FnOnce(u64) -> SubmissionEntry,
) -> Result<(CompletionEntry, Box<[u8; PAGE]>)> {
    let c = exec(
        regs,
        name,
        mapper,
        admin,
        cmd(admin.page.iova(0)),
        timeout,
        true,
    )?;
    Ok((c, read_page(&admin.page)))
}

/// A copy of the admin page. Read with volatile loads through a raw pointer, never through a
/// reference: the page is DMA memory a device (a misbehaving one late) may write at any time.
fn read_page(page: &DmaMem) -> Box<[u8; PAGE]> {
    let mut out = Box::new([0u8; PAGE]);
    let src = page.ptr().cast::<u64>();
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        // SAFETY: `i < PAGE / 8`: inside the live, page-aligned admin page.
        let v = unsafe { std::ptr::read_volatile(src.add(i)) };
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

/// Fill the start of the admin page (data the controller reads), the rest zeroed.
fn write_page(page: &DmaMem, data: &[u8]) {
    let dst = page.ptr();
    for i in 0..PAGE {
        // SAFETY: `i < PAGE`: inside the live admin page; no command uses it now (the caller
        // holds the admin lock and submits the command that reads it next).
        unsafe { std::ptr::write_volatile(dst.add(i), data.get(i).copied().unwrap_or(0)) };
    }
}

/// A command that used the admin page timed out: keep that page out of reuse for good (the
/// controller may still write it) and take a fresh one.
fn retire_page(name: &str, mapper: &Mapper, admin: &mut Admin) {
    match DmaMem::new(mapper, PAGE, false) {
        Ok(fresh) => {
            let old = std::mem::replace(&mut admin.page, fresh);
            admin.retired.push(old);
            tracing::warn!(ctrl = %name, retired = admin.retired.len(),
                "admin page retired after a timeout (a late transfer cannot reach new data)");
        }
        Err(e) => {
            tracing::error!(ctrl = %name, error = %e,
                "no memory to replace the admin page after a timeout; keeping it")
        }
    }
}

/// A free command id: not one of an outstanding command rio does not wait for. `None` when the
/// submission queue has no room.
fn alloc_cid(admin: &mut Admin) -> Option<u16> {
    if admin.ring.sq_space() == 0 {
        return None;
    }
    loop {
        let cid = admin.next_cid;
        admin.next_cid = admin.next_cid.wrapping_add(1) & 0x0FFF;
        if !admin.pending.iter().any(|p| p.cid() == cid) {
            return Some(cid);
        }
    }
}

/// Submit a command rio does not wait for. False when there is no room (the admin queue keeps
/// room for one synchronous command).
fn submit_async(admin: &mut Admin, cmd: SubmissionEntry, kind: Pending) -> bool {
    if admin.pending.len() >= ADMIN_ASYNC_MAX || admin.ring.sq_space() < 2 {
        return false;
    }
    let Some(cid) = alloc_cid(admin) else {
        return false;
    };
    let pending = match kind {
        Pending::Abort { ticket, .. } => Pending::Abort { cid, ticket },
        Pending::Event { .. } => Pending::Event { cid },
    };
    admin.ring.push(&cmd.with_cid(cid));
    admin.ring.ring_sq();
    admin.pending.push(pending);
    true
}

/// Take every admin completion posted (at most a ring's worth) and hand each to [`dispatch`].
fn reap_admin(name: &str, admin: &mut Admin) {
    let mut seen = 0u16;
    while seen < admin.ring.entries {
        let Some(c) = admin.ring.next_cqe() else {
            break;
        };
        seen += 1;
        dispatch(name, admin, c);
    }
    if seen > 0 {
        admin.ring.ring_cq();
    }
}

/// A completion for something other than the synchronous command being waited for: an abort's
/// answer, an asynchronous event (the request is submitted again), or a late completion of a
/// command that timed out (dropped).
fn dispatch(name: &str, admin: &mut Admin, c: CompletionEntry) {
    let i = (c.sq_id == 0)
        .then(|| admin.pending.iter().position(|p| p.cid() == c.cid))
        .flatten();
    let Some(i) = i else {
        tracing::warn!(ctrl = %name, cid = c.cid, sq_id = c.sq_id,
            "admin completion for no outstanding command (late, or from a misbehaving device); dropped");
        return;
    };
    let ok = c.status().is_success();
    match admin.pending.swap_remove(i) {
        Pending::Abort { ticket, .. } => ticket.set(if !ok {
            AbortTicket::FAILED
        } else if c.dw0 & 1 == 0 {
            AbortTicket::ABORTED
        } else {
            AbortTicket::DECLINED
        }),
        Pending::Event { .. } if ok => {
            admin.events_due.push_back(AsyncEvent::from_dw0(c.dw0));
            submit_async(
                admin,
                SubmissionEntry::async_event_request(),
                Pending::Event { cid: 0 },
            );
        }
        Pending::Event { .. } => {
            // Not re-armed: an error here (e.g. the limit) would come back at once.
            tracing::warn!(ctrl = %name, status = %c.status(),
                "Asynchronous Event Request failed; no more events from this controller")
        }
    }
}

/// Ask for the events rio handles and leave Asynchronous Event Requests outstanding. Best
/// effort: a controller that refuses serves I/O all the same.
fn arm_events(
    regs: &Regs,
    name: &str,
    mapper: &Mapper,
    ident: &IdentifyController,
    admin: &mut Admin,
    timeout: Duration,
) {
    let mut mask = spec::aec::CRITICAL_WARNINGS;
    if ident.oaes_ns_attribute() {
        mask |= spec::aec::NS_ATTRIBUTE;
    }
    if ident.oaes_firmware_activation() {
        mask |= spec::aec::FIRMWARE_ACTIVATION;
    }
    let cmd = SubmissionEntry::set_async_event_config(mask);
    if let Err(e) = exec(regs, name, mapper, admin, cmd, timeout, false) {
        tracing::debug!(ctrl = %name, error = %e, "Asynchronous Event Configuration refused");
    }
    let limit = (ident.aerl as usize + 1).min(AERS);
    let have = admin
        .pending
        .iter()
        .filter(|p| matches!(p, Pending::Event { .. }))
        .count();
    for _ in have..limit {
        let cmd = SubmissionEntry::async_event_request();
        if !submit_async(admin, cmd, Pending::Event { cid: 0 }) {
            break;
        }
    }
}

/// Set Features Host Behavior Support with ACRE = 1.
fn exec_host_behavior(
    regs: &Regs,
    name: &str,
    mapper: &Mapper,
    admin: &mut Admin,
    timeout: Duration,
) -> Result<CompletionEntry> {
    write_page(&admin.page, &[1]);
    let mut cmd = SubmissionEntry::set_features(spec::feature::HOST_BEHAVIOR_SUPPORT, 0, false);
    cmd.prp1 = admin.page.iova(0);
    exec(regs, name, mapper, admin, cmd, timeout, false)
}

/// The namespace ids to identify: the active namespace list, page after page (1024 ids each),
/// or, for a controller without one (a quirk, or Invalid Field for CNS 02h), 1..=NN.
fn namespace_ids(
    regs: &Regs,
    name: &str,
    mapper: &Mapper,
    admin: &mut Admin,
    timeout: Duration,
    ident: &IdentifyController,
    quirks: &Quirks,
) -> Result<Vec<u32>> {
    /// Namespaces probed one by one at most (each is an Identify command).
    const SCAN_MAX: u32 = 4096;
    /// Namespace ids taken from the active list at most: each is identified at bring-up, and a
    /// device claiming billions must not hold bring-up for hours.
    const LIST_MAX: usize = 65536;
    let scan = || {
        if ident.nn > SCAN_MAX {
            tracing::warn!(ctrl = %name, nn = ident.nn, "probing only the first {SCAN_MAX} namespace ids");
        }
        (1..=ident.nn.min(SCAN_MAX)).collect::<Vec<u32>>()
    };
    if quirks.no_active_ns_list {
        return Ok(scan());
    }
    let mut ids = Vec::new();
    let mut start = 0u32;
    // Ids rise from page to page, and at most LIST_MAX are taken: the loop ends.
    loop {
        let r = exec_page(regs, name, mapper, admin, timeout, |p| {
            SubmissionEntry::identify_active_ns_list(start, p)
        });
        let page = match r {
            Ok((_, page)) => page,
            Err(Error::Nvme { error, .. })
                if ids.is_empty()
                    && error.status.sct_raw() == 0
                    && error.status.sc() == spec::generic_status::INVALID_FIELD =>
            {
                tracing::info!(ctrl = %name,
                    "no active namespace list (Identify CNS 02h refused); probing namespace ids one by one");
                return Ok(scan());
            }
            Err(e) => return Err(e),
        };
        let list = spec::parse_ns_list(&page[..]);
        let full = list.len() == PAGE / 4;
        // Ids must rise past `start`: anything else is a device bug, cut off here.
        let mut last = start;
        for id in list {
            if id <= last || id >= 0xFFFF_FFFE {
                tracing::warn!(ctrl = %name, nsid = id, after = last, "active namespace list out of order; stopped reading it");
                return Ok(ids);
            }
            if ids.len() == LIST_MAX {
                tracing::warn!(ctrl = %name, "more than {LIST_MAX} active namespaces; using the first {LIST_MAX}");
                return Ok(ids);
            }
            ids.push(id);
            last = id;
        }
        if !full {
            break;
        }
        start = last;
    }
    Ok(ids)
}

/// Identify one namespace: `Ok(None)` when it is inactive or unusable (logged).
fn identify_namespace(
    regs: &Regs,
    name: &str,
    mapper: &Mapper,
    admin: &mut Admin,
    timeout: Duration,
    nsid: u32,
) -> Result<Option<Namespace>> {
    let (_, page) = exec_page(regs, name, mapper, admin, timeout, |p| {
        SubmissionEntry::identify_namespace(nsid, p)
    })?;
    let ns = IdentifyNamespace::from_prefix(&page[..]).expect("page holds 4 KiB");
    match Namespace::from_identify(nsid, &ns) {
        Ok(n) => Ok(n),
        Err(why) => {
            tracing::warn!(ctrl = %name, nsid, reason = %why, "namespace not usable; skipped");
            Ok(None)
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Orderly shutdown notification, then disable; bounded by CAP.TO.
        let to = self.cap.timeout().max(Duration::from_millis(500));
        let cc = self.regs.cc();
        if cc.en() && !self.is_dead() {
            self.regs.set_cc(cc.with_shn(Cc::SHN_NORMAL));
            let deadline = Instant::now() + to;
            while !self.regs.csts().shutdown_complete() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        self.regs.set_cc(self.regs.cc().with_enable(false));
        let deadline = Instant::now() + to;
        while self.regs.csts().rdy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        let stopped = !self.regs.csts().rdy();
        if !stopped {
            tracing::error!(ctrl = %self.name, "controller did not stop within CAP.TO");
        }
        // Whatever the controller says, bus mastering goes off before any of its memory goes
        // back to the system: with physical addresses (uio) nothing else keeps a late write
        // from landing in memory the process or the kernel reuses.
        let quiet = self.quiesce();
        let mapper = &self.mapper;
        let iommu = matches!(mapper, Mapper::Iommu { .. });
        // Behind an IOMMU, unmapping is what protects the memory; otherwise only a stopped or
        // quiesced device makes freeing it safe.
        let free = iommu || stopped || quiet;
        let admin = match self.admin.get_mut() {
            Ok(a) => a,
            Err(p) => p.into_inner(),
        };
        let mut owned: Vec<&mut DmaMem> = admin.retired.iter_mut().collect();
        owned.push(&mut admin.page);
        if let Some(m) = self.dbbuf.as_mut() {
            owned.push(m);
        }
        for m in owned {
            m.unmap(mapper);
            if !free {
                m.leak();
            }
        }
        admin.ring.unmap(mapper);
        if !free {
            admin.ring.leak();
            tracing::error!(ctrl = %self.name,
                "bus mastering could not be disabled: the controller's DMA memory is leaked, not freed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(nsze: u64, lbads: u8, ms: u16) -> IdentifyNamespace {
        let mut n = IdentifyNamespace::zeroed();
        n.nsze = nsze;
        n.lbaf[0].lbads = lbads;
        n.lbaf[0].ms = ms;
        n
    }

    #[test]
    fn identify_namespace_is_checked_before_use() {
        assert!(
            Namespace::from_identify(1, &ns(0, 12, 0))
                .unwrap()
                .is_none()
        );
        let n = Namespace::from_identify(1, &ns(8, 12, 0)).unwrap().unwrap();
        assert_eq!((n.block_size, n.size_bytes), (4096, 32768));
        // Block sizes the device may claim and rio cannot use: 0 (LBADS past 31), 256 B,
        // 128 KiB; a size past u64; metadata with every block.
        for (lbads, why) in [(40, "block size 0"), (8, "256"), (17, "131072")] {
            let e = Namespace::from_identify(1, &ns(8, lbads, 0)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let e = Namespace::from_identify(1, &ns(u64::MAX, 12, 0)).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        let e = Namespace::from_identify(1, &ns(8, 12, 8)).unwrap_err();
        assert!(e.contains("metadata"), "{e}");
    }
}
