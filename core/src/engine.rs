//! The engine: an open target, the backend chosen for it, and a factory of per-core queues.

use std::rc::Rc;
use std::sync::Arc;

use crate::backend::nvme::NvmeQueue;
use crate::backend::psync::PsyncQueue;
use crate::backend::uring::{self, UringOptions, UringQueue};
use crate::backend::{BackendQueue, is_refusal};
use crate::buf::Arena;
use crate::config::{BackendChoice, EngineConfig, Switch};
use crate::error::{Error, Result};
use crate::nvme::Controller;
use crate::nvme::sim::SimConfig;
use crate::queue::Queue;
use crate::target::{Geometry, OpenOptions, Target, TargetKind, TargetSpec};

/// The backend that serves an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum BackendKind {
    Uring,
    Psync,
    /// The userspace NVMe driver on a controller bound to vfio-pci (or uio_pci_generic).
    Vfio,
    /// The userspace NVMe driver on the software controller model.
    Sim,
    /// An installed SPDK's userspace NVMe driver (cargo feature `spdk`).
    Spdk,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::Psync => "psync",
            BackendKind::Vfio => "vfio",
            BackendKind::Sim => "sim",
            BackendKind::Spdk => "spdk",
        }
    }
}

/// Which backend was chosen and why, for logs and reports.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Selection {
    pub backend: BackendKind,
    pub reason: String,
    /// io_uring: polled completions.
    pub iopoll: bool,
}

/// An open target with its backend.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    target: Target,
    selection: Selection,
    /// The controller, for targets the userspace NVMe driver serves.
    nvme: Option<Arc<Controller>>,
    /// The controller attached through SPDK, for the `spdk` backend.
    #[cfg(feature = "spdk")]
    spdk: Option<Arc<crate::backend::spdk::SpdkCtrl>>,
}

impl Engine {
    /// Open `target` (a path; `pcie://` and `sim://` are recognised) for reading, or for
    /// reading and writing, choose the backend per `config.backend`, and log the choice.
    pub fn open(config: &EngineConfig, target: &str, opts: OpenOptions) -> Result<Engine> {
        let path = match TargetSpec::parse(target) {
            TargetSpec::Path(p) => p,
            TargetSpec::Pcie { addr, nsid } if config.backend == BackendChoice::Spdk => {
                let trid = format!("trtype:PCIe traddr:{addr}");
                return Engine::open_spdk(config, target, &trid, Some(&addr), nsid, opts);
            }
            TargetSpec::Pcie { addr, nsid } => {
                return Engine::open_nvme(config, target, Some(&addr), None, nsid, opts);
            }
            TargetSpec::Trid { trid, nsid } => {
                if !matches!(config.backend, BackendChoice::Spdk | BackendChoice::Auto) {
                    return Err(Error::BackendUnavailable {
                        backend: config.backend_name(),
                        reason: format!(
                            "{target} is an SPDK transport ID: only the spdk backend serves it"
                        ),
                    });
                }
                return Engine::open_spdk(config, target, &trid, None, nsid, opts);
            }
            TargetSpec::Sim(params) => {
                let mut cfg = SimConfig::parse(&params)
                    .map_err(|reason| Error::config("sim:// target", reason))?;
                // Like a device, the model works beside the driver, not on its core: it gets
                // the last CPU unless `cpu=` says otherwise (bench keeps its jobs off it).
                let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
                if cfg.cpu.is_none() && ncpu > 1 {
                    cfg.cpu = core_affinity::get_core_ids().and_then(|c| c.last().map(|c| c.id));
                }
                return Engine::open_nvme(config, target, None, Some(cfg), 1, opts);
            }
        };
        let opts = OpenOptions {
            direct: opts.direct && config.direct,
            ..opts
        };
        let target = Target::open(&path, opts)?;
        let selection = select(config, &target)?;
        tracing::info!(
            backend = selection.backend.name(),
            reason = %selection.reason,
            target = %target.path.display(),
            "backend selected"
        );
        Ok(Engine {
            config: config.clone(),
            target,
            selection,
            nvme: None,
            #[cfg(feature = "spdk")]
            spdk: None,
        })
    }

    /// Open the directory `dir` for a runtime that serves any number of its files by
    /// descriptor ([`crate::runtime::Files`], `Queue::submit_fd`): one ring (or psync pool)
    /// per core for all of them, instead of one runtime per file. The backend is chosen as for
    /// a regular file (`io_uring`, else `psync` where it is refused) and logged.
    pub fn open_dir(config: &EngineConfig, dir: &std::path::Path) -> Result<Engine> {
        let target = Target::open_dir(
            dir,
            OpenOptions {
                write: true,
                direct: config.direct,
                create: false,
            },
        )?;
        let selection = select(config, &target)?;
        tracing::info!(
            backend = selection.backend.name(),
            reason = %selection.reason,
            dir = %target.path.display(),
            "backend selected"
        );
        Ok(Engine {
            config: config.clone(),
            target,
            selection,
            nvme: None,
            #[cfg(feature = "spdk")]
            spdk: None,
        })
    }

    /// Start a software controller model built from `sim` (faults, latency, namespaces) and
    /// open namespace `nsid` of it through the real driver. `sim://` targets do the same from a
    /// string; this is for tests and embedders that need faults.
    pub fn open_sim(
        config: &EngineConfig,
        sim: SimConfig,
        nsid: u32,
        opts: OpenOptions,
    ) -> Result<Engine> {
        Engine::open_nvme(
            config,
            &format!("sim://(ns={nsid})"),
            None,
            Some(sim),
            nsid,
            opts,
        )
    }

    /// Open a namespace through the userspace NVMe driver: a PCI function (`addr`) or a fresh
    /// software model (`sim`).
    fn open_nvme(
        config: &EngineConfig,
        target: &str,
        addr: Option<&str>,
        sim: Option<SimConfig>,
        nsid: u32,
        opts: OpenOptions,
    ) -> Result<Engine> {
        if config.backend == BackendChoice::Spdk {
            return Err(Error::BackendUnavailable {
                backend: "spdk",
                reason: format!(
                    "{target} is rio's software controller model, which only rio's own driver \
                     serves (--backend vfio or auto)"
                ),
            });
        }
        if matches!(config.backend, BackendChoice::Uring | BackendChoice::Psync) {
            return Err(Error::BackendUnavailable {
                backend: config.backend_name(),
                reason: format!(
                    "{target} is driven by rio's userspace NVMe driver (backend vfio); for the kernel \
                     path use the controller's block device /dev/nvmeXnY"
                ),
            });
        }
        if nsid == 0 {
            return Err(Error::config(
                "target",
                format!("{target}: namespace ids start at 1 (pcie://ADDR/ns=N)"),
            ));
        }
        let nopts = config.nvme_options();
        let (ctrl, kind) = match (addr, sim) {
            (Some(a), _) => (Controller::open_pcie(a, &nopts)?, BackendKind::Vfio),
            (None, Some(cfg)) => (Controller::open_sim(cfg, &nopts)?, BackendKind::Sim),
            (None, None) => unreachable!("open_nvme needs an address or a model"),
        };
        let ns = ctrl.namespace(nsid).ok_or_else(|| Error::NotFound {
            path: format!(
                "{target} (namespace {nsid}; active: {})",
                ctrl.namespaces()
                    .iter()
                    .map(|n| n.nsid.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .into(),
        })?;
        if ns.metadata_size > 0 {
            return Err(Error::BadTarget {
                path: target.into(),
                what: format!(
                    "namespace {nsid} is formatted with {} bytes of metadata per block, which rio does not support",
                    ns.metadata_size
                ),
            });
        }
        let id = ctrl.identify_data();
        let selection = Selection {
            backend: kind,
            reason: format!(
                "{} target: userspace NVMe driver ({}, {} I/O queue pairs, max transfer {} KiB, {} doorbells)",
                if kind == BackendKind::Sim {
                    "sim://"
                } else {
                    "pcie://"
                },
                if kind == BackendKind::Sim {
                    "software controller model".to_string()
                } else {
                    format!("{} over vfio", id.model())
                },
                ctrl.io_queue_count(),
                ctrl.max_xfer() / 1024,
                if ctrl.shadow_doorbells() {
                    "shadow"
                } else {
                    "MMIO"
                },
            ),
            iopoll: false,
        };
        tracing::info!(backend = kind.name(), reason = %selection.reason, "backend selected");
        let target = namespace_target(
            target,
            ctrl.name.clone(),
            nsid,
            ns.block_size,
            ns.size_bytes,
            opts.write,
        );
        Ok(Engine {
            config: config.clone(),
            target,
            selection,
            nvme: Some(ctrl),
            #[cfg(feature = "spdk")]
            spdk: None,
        })
    }

    /// Open namespace `nsid` of the controller `trid` names through SPDK's NVMe driver.
    #[cfg(not(feature = "spdk"))]
    fn open_spdk(
        _config: &EngineConfig,
        target: &str,
        _trid: &str,
        _pci: Option<&str>,
        _nsid: u32,
        _opts: OpenOptions,
    ) -> Result<Engine> {
        Err(Error::BackendUnavailable {
            backend: "spdk",
            reason: format!(
                "{target}: this rio was built without SPDK support; rebuild it with `--features \
                 spdk` and SPDK_DIR set to an installed SPDK (README, \"SPDK\"), or use rio's own \
                 driver (--backend vfio) for pcie:// targets"
            ),
        })
    }

    /// Open namespace `nsid` of the controller `trid` names through SPDK's NVMe driver.
    #[cfg(feature = "spdk")]
    fn open_spdk(
        config: &EngineConfig,
        target: &str,
        trid: &str,
        pci: Option<&str>,
        nsid: u32,
        opts: OpenOptions,
    ) -> Result<Engine> {
        if nsid == 0 {
            return Err(Error::config(
                "target",
                format!("{target}: namespace ids start at 1"),
            ));
        }
        let ctrl = crate::backend::spdk::SpdkCtrl::connect(trid, pci, nsid)?;
        let selection = Selection {
            backend: BackendKind::Spdk,
            reason: format!(
                "{} requested: SPDK's userspace NVMe driver ({} at {trid}, namespace {nsid}, max transfer {} KiB)",
                if config.backend == BackendChoice::Spdk {
                    "spdk"
                } else {
                    "an SPDK transport ID"
                },
                ctrl.model,
                ctrl.max_xfer / 1024,
            ),
            iopoll: false,
        };
        tracing::info!(backend = "spdk", reason = %selection.reason, "backend selected");
        let target = namespace_target(
            target,
            trid.to_string(),
            nsid,
            ctrl.block_size,
            ctrl.size_bytes,
            opts.write,
        );
        Ok(Engine {
            config: config.clone(),
            target,
            selection,
            nvme: None,
            spdk: Some(ctrl),
        })
    }

    /// The NVMe controller behind this engine, for `pcie://` and `sim://` targets.
    pub fn controller(&self) -> Option<&Arc<Controller>> {
        self.nvme.as_ref()
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn target_mut(&mut self) -> &mut Target {
        &mut self.target
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// A new queue for the calling thread, with its own buffer arena and its own handle on the
    /// target. `depth` overrides `config.queue_depth` when given.
    pub fn queue(&self, depth: Option<u32>) -> Result<Queue> {
        let depth = depth.unwrap_or(self.config.queue_depth);
        self.queue_sized(depth, self.config.buffer_pool_bytes)
    }

    /// A new queue with `depth` slots and an arena of at least `arena_bytes` (the configured
    /// size is the floor): for callers that know their buffer needs, like `rio bench`.
    pub fn queue_sized(&self, depth: u32, arena_bytes: usize) -> Result<Queue> {
        // SAFETY: no added regions.
        unsafe { self.queue_with_regions(depth, arena_bytes, &[]) }
    }

    /// A queue that can also do I/O on memory it does not own (`Queue::submit_raw`): each of
    /// `regions` is registered with io_uring as fixed buffers / mapped into the IOMMU for the
    /// NVMe driver, once, here. For buffer pools shared by the threads of a runtime.
    ///
    /// # Safety
    /// Every region must stay mapped and unmoved until the returned queue is dropped (the
    /// device may read or write it whenever an operation on it is in flight).
    pub unsafe fn queue_with_regions(
        &self,
        depth: u32,
        arena_bytes: usize,
        regions: &[(*mut u8, usize, rio_sys::mem::PageKind)],
    ) -> Result<Queue> {
        let depth = depth.max(1);
        let arena = Arena::new(
            arena_bytes.max(self.config.buffer_pool_bytes),
            self.config.hugepages,
        )?;
        #[cfg(feature = "spdk")]
        if let Some(ctrl) = &self.spdk {
            let (base, len) = arena.region();
            let mut all = vec![(base, len, arena.page_kind())];
            all.extend_from_slice(regions);
            let q = crate::backend::spdk::SpdkQueue::new(Arc::clone(ctrl), &all, depth)?;
            return Ok(Queue::new(
                BackendQueue::Spdk(q),
                arena,
                self.target.geometry,
                self.target.writable,
                depth,
            ));
        }
        if let (Some(ctrl), TargetKind::Nvme { nsid, .. }) = (&self.nvme, &self.target.kind) {
            let (base, len) = arena.region();
            let mut all = vec![(base, len, arena.page_kind())];
            all.extend_from_slice(regions);
            let q = NvmeQueue::new(Arc::clone(ctrl), *nsid, &all, depth)?;
            return Ok(Queue::new(
                BackendQueue::Nvme(q),
                arena,
                self.target.geometry,
                self.target.writable,
                depth,
            ));
        }
        let file = self
            .target
            .file
            .as_ref()
            .expect("kernel-path targets have a file")
            .try_clone()
            .map_err(|e| Error::Os {
                op: "duplicate handle of",
                path: self.target.path.clone(),
                source: e,
            })?;
        let mut regs = vec![arena.region()];
        regs.extend(regions.iter().map(|&(p, l, _)| (p, l)));
        let backend = match self.selection.backend {
            BackendKind::Uring => {
                let opts = UringOptions {
                    sqpoll: self.config.sqpoll.then_some(self.config.sqpoll_idle_ms),
                    iopoll: self.selection.iopoll,
                    submit_batch: self.config.submit_batch,
                };
                let (q, feats) = UringQueue::new(file, &regs, depth, opts).map_err(|e| {
                    Error::BackendUnavailable {
                        backend: "uring",
                        reason: format!("cannot create ring: {e}"),
                    }
                })?;
                tracing::debug!(?feats, depth, "io_uring queue ready");
                BackendQueue::Uring(q)
            }
            BackendKind::Psync => BackendQueue::Psync(
                PsyncQueue::new(file, depth, self.config.psync_threads).map_err(|e| {
                    Error::BackendUnavailable {
                        backend: "psync",
                        reason: format!("cannot start worker threads: {e}"),
                    }
                })?,
            ),
            BackendKind::Vfio | BackendKind::Sim | BackendKind::Spdk => {
                unreachable!("NVMe targets return above")
            }
        };
        Ok(Queue::new(
            backend,
            Rc::clone(&arena),
            self.target.geometry,
            self.target.writable,
            depth,
        ))
    }
}

/// The target of an NVMe namespace served by a userspace driver (rio's or SPDK's).
fn namespace_target(
    target: &str,
    controller: String,
    nsid: u32,
    block_size: u32,
    size: u64,
    write: bool,
) -> Target {
    Target {
        path: target.into(),
        kind: TargetKind::Nvme { controller, nsid },
        geometry: Geometry {
            block_size,
            // PRP entries need dword alignment; buffers are page aligned anyway.
            mem_align: 4,
            size,
        },
        direct: true,
        writable: write,
        file: None,
    }
}

/// The backend-selection rules (docs/DESIGN.md, "Backend selection").
fn select(config: &EngineConfig, target: &Target) -> Result<Selection> {
    let what = match &target.kind {
        TargetKind::File => "regular file".to_string(),
        TargetKind::BlockDevice { name, .. } => format!("block device {name}"),
        TargetKind::Nvme { .. } => unreachable!("NVMe targets are selected in open_nvme"),
        TargetKind::Directory => "the files of a directory".to_string(),
    };
    let poll_capable = match &target.kind {
        TargetKind::BlockDevice { name, nvme: true } => uring::device_has_poll_queues(name),
        _ => false,
    };
    let iopoll = match config.iopoll {
        Switch::Off => false,
        Switch::On if !target.direct => {
            return Err(Error::config(
                "iopoll",
                "polled completions need direct I/O (O_DIRECT)",
            ));
        }
        Switch::On => true,
        Switch::Auto => poll_capable && target.direct && !config.sqpoll,
    };
    let iopoll_note = if iopoll {
        ", polled completions (IOPOLL)"
    } else {
        ""
    };
    match config.backend {
        BackendChoice::Vfio => Err(Error::BackendUnavailable {
            backend: "vfio",
            reason: format!(
                "the vfio backend drives NVMe controllers directly (pcie://ADDR[/ns=N] after `rio setup bind`); {what} belongs to the kernel"
            ),
        }),
        BackendChoice::Spdk => Err(Error::BackendUnavailable {
            backend: "spdk",
            reason: format!(
                "the spdk backend drives NVMe controllers through SPDK (pcie://ADDR[/ns=N] after `rio setup bind`, or an SPDK transport ID); {what} belongs to the kernel"
            ),
        }),
        BackendChoice::Psync => Ok(Selection {
            backend: BackendKind::Psync,
            reason: format!("psync requested for {what}"),
            iopoll: false,
        }),
        BackendChoice::Uring => match uring::probe() {
            Ok(()) => Ok(Selection {
                backend: BackendKind::Uring,
                reason: format!("uring requested for {what}{iopoll_note}"),
                iopoll,
            }),
            Err(e) => Err(Error::BackendUnavailable {
                backend: "uring",
                reason: format!("io_uring_setup failed: {e}"),
            }),
        },
        BackendChoice::Auto => match uring::probe() {
            Ok(()) => Ok(Selection {
                backend: BackendKind::Uring,
                reason: format!("io_uring is available and the target is a {what}{iopoll_note}"),
                iopoll,
            }),
            Err(e) if is_refusal(&e) => Ok(Selection {
                backend: BackendKind::Psync,
                reason: format!(
                    "io_uring_setup refused ({e}; seccomp or kernel.io_uring_disabled): falling back to psync for {what}"
                ),
                iopoll: false,
            }),
            Err(e) => Err(Error::BackendUnavailable {
                backend: "uring",
                reason: format!("io_uring_setup failed: {e}"),
            }),
        },
    }
}
