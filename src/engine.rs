//! The engine: an open target, the backend chosen for it, and a factory of per-core queues.

use std::rc::Rc;

use crate::backend::psync::PsyncQueue;
use crate::backend::uring::{self, UringOptions, UringQueue};
use crate::backend::{BackendQueue, is_refusal};
use crate::buf::Arena;
use crate::config::{BackendChoice, EngineConfig, Switch};
use crate::error::{Error, Result};
use crate::queue::Queue;
use crate::target::{OpenOptions, Target, TargetKind, TargetSpec};

/// The backend that serves an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Uring,
    Psync,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::Psync => "psync",
        }
    }
}

/// Which backend was chosen and why, for logs and reports.
#[derive(Clone, Debug, serde::Serialize)]
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
}

impl Engine {
    /// Open `target` (a path; `pcie://` and `sim://` are recognised) for reading, or for
    /// reading and writing, choose the backend per `config.backend`, and log the choice.
    pub fn open(config: &EngineConfig, target: &str, opts: OpenOptions) -> Result<Engine> {
        let path = match TargetSpec::parse(target) {
            TargetSpec::Path(p) => p,
            TargetSpec::Pcie { addr, .. } => {
                return Err(Error::BackendUnavailable {
                    backend: "vfio",
                    reason: format!(
                        "PCIe target {addr} needs the userspace NVMe driver, which this build does not have yet"
                    ),
                });
            }
            TargetSpec::Sim(_) => {
                return Err(Error::BackendUnavailable {
                    backend: "sim",
                    reason: "the software controller model is not part of this build yet".into(),
                });
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
        })
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
        let depth = depth.max(1);
        let file = self.target.file.try_clone().map_err(|e| Error::Os {
            op: "duplicate handle of",
            path: self.target.path.clone(),
            source: e,
        })?;
        let arena = Arena::new(
            arena_bytes.max(self.config.buffer_pool_bytes),
            self.config.hugepages,
        )?;
        let backend = match self.selection.backend {
            BackendKind::Uring => {
                let opts = UringOptions {
                    sqpoll: self.config.sqpoll.then_some(self.config.sqpoll_idle_ms),
                    iopoll: self.selection.iopoll,
                    submit_batch: self.config.submit_batch,
                };
                let (q, feats) =
                    UringQueue::new(file, arena.region(), depth, opts).map_err(|e| {
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

/// The backend-selection rules (docs/DESIGN.md, "Backend selection").
fn select(config: &EngineConfig, target: &Target) -> Result<Selection> {
    let what = match &target.kind {
        TargetKind::File => "regular file".to_string(),
        TargetKind::BlockDevice { name, .. } => format!("block device {name}"),
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
