//! The controller: bring-up, the admin queue, namespaces, I/O queue creation, abort and reset.
//!
//! One [`Controller`] per PCI function (or model instance), shared by the queues of every
//! thread through an `Arc`. The admin queue sits behind a mutex: it is used at bring-up, when a
//! thread creates or deletes its queue pair, to abort a timed-out command and to reset. The
//! I/O path never takes the lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::dma::{DmaMem, IovaAllocator, Mapper};
use super::mmio::Regs;
use super::ring::{Ring, Shadow};
use super::sim::{SimConfig, SimController};
use super::spec::{
    self, Cap, Cc, CompletionEntry, IdentifyController, IdentifyNamespace, NvmeError, SmartLog,
    SubmissionEntry,
};
use crate::error::{Error, Result};

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

struct Admin {
    ring: Ring,
    next_cid: u16,
    /// One page for identify data, log pages and DSM-free admin payloads.
    page: DmaMem,
}

/// An NVMe controller driven from userspace.
pub struct Controller {
    pub name: String,
    regs: Regs,
    cap: Cap,
    opts: NvmeOptions,
    admin: Mutex<Admin>,
    ident: Box<IdentifyController>,
    namespaces: Vec<Namespace>,
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
            .field("namespaces", &self.namespaces.len())
            .finish()
    }
}

fn ctrl_err(name: &str, reason: impl Into<String>) -> Error {
    Error::Controller {
        ctrl: name.to_string(),
        reason: reason.into(),
    }
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
        // SAFETY: the model's BAR memory lives as long as `sim`, which the controller owns and
        // drops last.
        let regs = unsafe { Regs::new(base, len) };
        Controller::bring_up(
            "sim".into(),
            regs,
            Mapper::Identity,
            Transport::Sim(sim),
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
                Controller::bring_up(name.clone(), regs, mapper, transport, opts)?
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
        opts: &NvmeOptions,
    ) -> Result<Arc<Controller>> {
        let span = tracing::info_span!("nvme_bring_up", ctrl = %name);
        let _g = span.enter();
        let cap = regs.cap();
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
        let admin_ring = Ring::new(
            &mapper,
            0,
            ADMIN_ENTRIES,
            regs.doorbell(spec::sq_tail_doorbell(0, cap.dstrd())),
            regs.doorbell(spec::cq_head_doorbell(0, cap.dstrd())),
            false,
        )?;
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
            }),
            ident: Box::new(IdentifyController::zeroed()),
            namespaces: Vec::new(),
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
        let admin = self.admin.get_mut().expect("admin queue poisoned");
        let t = self.opts.admin_timeout;
        let prp = admin.page.iova(0);
        exec(
            &self.regs,
            &self.name,
            admin,
            SubmissionEntry::identify_controller(prp),
            t,
        )?;
        // SAFETY: the page is 4 KiB of live memory the controller just filled.
        let bytes = unsafe { std::slice::from_raw_parts(admin.page.ptr(), PAGE) };
        *self.ident = IdentifyController::from_prefix(bytes).expect("page holds 4 KiB");
        let want = self.opts.max_io_queues.max(1);
        let dw0 = exec(
            &self.regs,
            &self.name,
            admin,
            SubmissionEntry::set_num_queues(want, want),
            t,
        )?
        .dw0;
        let (sqs, cqs) = spec::decode_num_queues(dw0);
        self.io_queues = sqs.min(cqs).min(want as u32) as u16;
        self.qids = Mutex::new(vec![false; self.io_queues as usize + 1]);
        let mdts = self
            .ident
            .mdts_bytes(self.cap.min_page_size())
            .unwrap_or(u64::MAX);
        self.max_xfer = mdts.min(MAX_XFER_CAP as u64) as u32;

        // Active namespaces (CNS 2), then each one's geometry.
        exec(
            &self.regs,
            &self.name,
            admin,
            SubmissionEntry::identify_active_ns_list(0, prp),
            t,
        )?;
        // SAFETY: as above.
        let list =
            spec::parse_ns_list(unsafe { std::slice::from_raw_parts(admin.page.ptr(), PAGE) });
        let mut namespaces = Vec::new();
        for nsid in list {
            exec(
                &self.regs,
                &self.name,
                admin,
                SubmissionEntry::identify_namespace(nsid, prp),
                t,
            )?;
            // SAFETY: as above.
            let b = unsafe { std::slice::from_raw_parts(admin.page.ptr(), PAGE) };
            let ns = IdentifyNamespace::from_prefix(b).expect("page holds 4 KiB");
            match Namespace::from_identify(nsid, &ns) {
                Ok(Some(n)) => namespaces.push(n),
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(ctrl = %self.name, nsid, reason = %why, "namespace not usable; skipped")
                }
            }
        }
        self.namespaces = namespaces;

        if self.opts.shadow_doorbells && self.ident.supports_dbbuf() {
            match DmaMem::new(&self.mapper, 2 * PAGE, false) {
                Err(e) => {
                    tracing::warn!(error = %e, "no memory for shadow doorbells; using MMIO doorbells")
                }
                Ok(mem) => {
                    let cmd = SubmissionEntry::doorbell_buffer_config(mem.iova(0), mem.iova(PAGE));
                    match exec(&self.regs, &self.name, admin, cmd, t) {
                        Ok(_) => {
                            self.dbbuf = Some(mem);
                            // Every queue id must have its slots inside the shadow page (a
                            // controller reads the shadow of any queue once configured).
                            let stride = 4usize << self.cap.dstrd();
                            let fits = ((PAGE / stride).saturating_sub(2) / 2) as u16;
                            if self.io_queues > fits {
                                self.io_queues = fits;
                                self.qids = Mutex::new(vec![false; fits as usize + 1]);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Doorbell Buffer Config failed; using MMIO doorbells");
                            mem.release(&self.mapper);
                        }
                    }
                }
            }
        }
        tracing::info!(
            ctrl = %self.name,
            model = %self.ident.model(),
            namespaces = self.namespaces.len(),
            io_queues = self.io_queues,
            max_xfer = self.max_xfer,
            shadow_doorbells = self.dbbuf.is_some(),
            "controller ready"
        );
        Ok(())
    }

    pub fn identify_data(&self) -> &IdentifyController {
        &self.ident
    }

    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
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

    /// CSTS.CFS: the controller hit a fatal error.
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

    /// Run one admin command synchronously.
    pub(crate) fn admin_command(&self, cmd: SubmissionEntry) -> Result<CompletionEntry> {
        let mut a = self.ready_admin()?;
        exec(&self.regs, &self.name, &mut a, cmd, self.opts.admin_timeout)
    }

    /// A new I/O queue pair with `entries` slots (clamped to CAP.MQES), on a free queue id,
    /// and the controller generation it was created in.
    pub(crate) fn create_io_ring(&self, entries: u16) -> Result<(Ring, u64)> {
        let entries = (entries as u32).clamp(2, self.cap.max_queue_entries().min(4096)) as u16;
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
        let ring = Ring::new(
            &self.mapper,
            qid,
            entries,
            self.regs.doorbell(spec::sq_tail_doorbell(qid, d)),
            self.regs.doorbell(spec::cq_head_doorbell(qid, d)),
            self.opts.hugepages,
        );
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => {
                self.qids.lock().expect("qid table poisoned")[qid as usize] = false;
                return Err(e);
            }
        };
        ring.set_shadow(self.shadow_of(qid));
        match self.create_queues_on_device(&ring) {
            Ok(generation) => Ok((ring, generation)),
            Err(e) => {
                self.forget_ring(ring, &e);
                Err(e)
            }
        }
    }

    /// After a failed create or delete: if the controller answered with an error status it
    /// holds no queue on these rings, so they and the id are freed. Otherwise (a timeout, a
    /// dead controller) it might still use them: the id stays reserved and the memory leaks.
    fn forget_ring(&self, ring: Ring, e: &Error) {
        if matches!(e, Error::Nvme { .. }) {
            self.qids.lock().expect("qid table poisoned")[ring.qid as usize] = false;
            ring.release(&self.mapper);
        } else {
            tracing::error!(ctrl = %self.name, qid = ring.qid, error = %e,
                "queue pair state unknown; keeping its id reserved and its memory mapped");
            std::mem::forget(ring);
        }
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
    /// lock: a reset (which holds the lock throughout) cannot slip in between.
    fn create_queues_on_device(&self, ring: &Ring) -> Result<u64> {
        let mut a = self.ready_admin()?;
        let generation = self.generation();
        let t = self.opts.admin_timeout;
        let n = ring.entries as u32;
        let cq = SubmissionEntry::create_io_cq(ring.qid, n, ring.cq_iova(), true, None);
        exec(&self.regs, &self.name, &mut a, cq, t)?;
        let sq = SubmissionEntry::create_io_sq(
            ring.qid,
            n,
            ring.sq_iova(),
            ring.qid,
            true,
            spec::QueuePriority::Medium,
        );
        if let Err(e) = exec(&self.regs, &self.name, &mut a, sq, t) {
            let del = SubmissionEntry::delete_io_cq(ring.qid);
            if let Err(d) = exec(&self.regs, &self.name, &mut a, del, t) {
                tracing::warn!(ctrl = %self.name, qid = ring.qid, error = %d,
                    "deleting the CQ of a half-created queue pair failed");
            }
            return Err(e);
        }
        Ok(generation)
    }

    /// After a reset: the controller forgot every I/O queue; create this one again. Returns
    /// the generation it now lives in.
    pub(crate) fn recreate_io_ring(&self, ring: &mut Ring) -> Result<u64> {
        ring.reset();
        self.create_queues_on_device(ring)
    }

    /// Wait until no reset is in progress (a reset holds the admin lock from the generation
    /// bump until the controller is enabled again, or marked dead and quiesced).
    pub(crate) fn wait_reset_done(&self) {
        drop(self.admin.lock().expect("admin queue poisoned"));
    }

    /// Delete a queue pair (SQ first, then its CQ) and free its memory and id. If the
    /// controller does not confirm, the id stays reserved and the memory leaks (it may still
    /// be in use by the device).
    pub(crate) fn delete_io_ring(&self, ring: Ring, created_in: u64) {
        if created_in == self.generation() && !self.is_dead() {
            let r = self
                .admin_command(SubmissionEntry::delete_io_sq(ring.qid))
                .and_then(|_| self.admin_command(SubmissionEntry::delete_io_cq(ring.qid)));
            if let Err(e) = r {
                tracing::warn!(ctrl = %self.name, qid = ring.qid, error = %e,
                    "deleting an I/O queue pair failed");
                let e = if matches!(e, Error::Nvme { .. }) {
                    // An error status on delete leaves the queue's state unknown.
                    ctrl_err(&self.name, "delete refused")
                } else {
                    e
                };
                self.forget_ring(ring, &e);
                return;
            }
        }
        // Otherwise the queue is gone already: the controller was reset since, or marked dead
        // (and quiesced, bus mastering off). Its memory is safe to free.
        self.qids.lock().expect("qid table poisoned")[ring.qid as usize] = false;
        ring.release(&self.mapper);
    }

    /// Abort Command Limit (ACL + 1): aborts the controller accepts at once.
    pub(crate) fn abort_limit(&self) -> u32 {
        self.ident.abort_limit()
    }

    /// Ask the controller to abort command `cid` of queue `sqid`. `Ok(true)` when the
    /// controller says it aborted it (the command then completes with "Command Abort
    /// Requested").
    pub(crate) fn abort(&self, sqid: u16, cid: u16) -> Result<bool> {
        let c = self.admin_command(SubmissionEntry::abort(sqid, cid))?;
        Ok(c.dw0 & 1 == 0)
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
            let t = self.opts.admin_timeout;
            let n = self.io_queues.max(1);
            exec(
                &self.regs,
                &self.name,
                &mut admin,
                SubmissionEntry::set_num_queues(n, n),
                t,
            )?;
            if let Some(mem) = &self.dbbuf {
                // Other threads may be storing into their shadow slots right now (they have
                // not polled yet): zero with atomic stores, not a plain memset.
                let words = mem.ptr().cast::<std::sync::atomic::AtomicU32>();
                for i in 0..2 * PAGE / 4 {
                    // SAFETY: `i` indexes the two live, aligned pages of the doorbell buffer.
                    unsafe { (*words.add(i)).store(0, Ordering::Relaxed) };
                }
                let cmd = SubmissionEntry::doorbell_buffer_config(mem.iova(0), mem.iova(PAGE));
                exec(&self.regs, &self.name, &mut admin, cmd, t)?;
            }
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
    /// Best effort; the model stops on CC.EN=0 anyway.
    fn quiesce(&self) {
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
        if let Err(e) = r {
            tracing::error!(ctrl = %self.name, error = %e, "could not disable bus mastering");
        }
    }

    /// SMART / health log (controller-wide).
    pub fn smart_log(&self) -> Result<SmartLog> {
        let mut a = self.admin()?;
        let prp = a.page.iova(0);
        exec(
            &self.regs,
            &self.name,
            &mut a,
            SubmissionEntry::get_smart_log(spec::NSID_ALL, prp),
            self.opts.admin_timeout,
        )?;
        // SAFETY: the page is live and the controller filled its first 512 bytes.
        let b = unsafe { std::slice::from_raw_parts(a.page.ptr(), PAGE) };
        Ok(SmartLog::from_prefix(b).expect("page holds a SMART log"))
    }

    /// Valid entries of the error log (at most one page's worth).
    pub fn error_log(&self) -> Result<Vec<spec::ErrorLogEntry>> {
        let mut a = self.admin()?;
        let entries = (self.ident.elpe as u32 + 1).min((PAGE / spec::ErrorLogEntry::SIZE) as u32);
        let prp = a.page.iova(0);
        exec(
            &self.regs,
            &self.name,
            &mut a,
            SubmissionEntry::get_error_log(entries, prp, 0),
            self.opts.admin_timeout,
        )?;
        // SAFETY: as above.
        let b = unsafe { std::slice::from_raw_parts(a.page.ptr(), PAGE) };
        Ok(b.chunks_exact(spec::ErrorLogEntry::SIZE)
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

/// Submit one admin command and spin for its completion.
fn exec(
    regs: &Regs,
    name: &str,
    admin: &mut Admin,
    cmd: SubmissionEntry,
    timeout: Duration,
) -> Result<CompletionEntry> {
    let cid = admin.next_cid;
    admin.next_cid = admin.next_cid.wrapping_add(1) & 0x0FFF;
    let cmd = cmd.with_cid(cid);
    let opcode = cmd.opcode;
    // Stale entries from an earlier timed-out command are consumed first.
    while let Some(c) = admin.ring.next_cqe() {
        tracing::warn!(cid = c.cid, "discarding a late admin completion");
    }
    admin.ring.ring_cq();
    if admin.ring.sq_space() == 0 {
        return Err(ctrl_err(
            name,
            "admin submission queue full (controller not consuming)",
        ));
    }
    admin.ring.push(&cmd);
    admin.ring.ring_sq();
    let deadline = Instant::now() + timeout;
    let mut spins = 0u32;
    loop {
        if let Some(c) = admin.ring.next_cqe() {
            admin.ring.ring_cq();
            if c.cid != cid {
                tracing::warn!(
                    want = cid,
                    got = c.cid,
                    "admin completion for an unknown command id; ignored"
                );
                continue;
            }
            return c
                .into_result(true, opcode)
                .map(|_| c)
                .map_err(|error: NvmeError| Error::Nvme {
                    ctrl: name.to_string(),
                    error,
                });
        }
        spins += 1;
        if spins.is_multiple_of(256) {
            let csts = regs.csts();
            if csts.cfs() || csts.is_all_ones() {
                return Err(ctrl_err(
                    name,
                    format!(
                        "controller fatal status (CSTS.CFS) during {}",
                        spec::opcode_name(true, opcode)
                    ),
                ));
            }
            if Instant::now() >= deadline {
                return Err(ctrl_err(
                    name,
                    format!(
                        "admin command {} timed out after {timeout:?}",
                        spec::opcode_name(true, opcode)
                    ),
                ));
            }
            if spins > 4096 {
                std::thread::yield_now();
            }
        }
        std::hint::spin_loop();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Orderly shutdown notification, then disable; bounded by CAP.TO. The DMA memory is
        // released only after the controller stopped using it.
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
        if self.regs.csts().rdy() {
            // Its DMA memory stays pinned by the IOMMU mapping until the container closes, so
            // the device cannot scribble on memory the process reuses meanwhile.
            tracing::error!(ctrl = %self.name, "controller did not stop within CAP.TO");
        }
        if let Some(m) = self.dbbuf.take() {
            m.release(&self.mapper);
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
