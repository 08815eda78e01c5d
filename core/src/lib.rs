//! rio: an NVMe I/O engine with per-core queues: a polled userspace NVMe driver over VFIO, io_uring
//! over the kernel, or a pread/pwrite thread pool, behind one API.
//!
//! ```no_run
//! use rio::{Engine, EngineConfig, target::OpenOptions};
//! let cfg = EngineConfig::from_env()?;
//! let engine = Engine::open(&cfg, "/tmp/data", OpenOptions { write: true, direct: true, create: false })?;
//! let mut q = engine.queue(None)?;
//! let mut buf = q.alloc_buf(4096)?;
//! buf.fill(0xab);
//! let buf = q.write(0, buf)?;
//! let buf = q.read(0, buf)?;
//! assert!(buf.iter().all(|&b| b == 0xab));
//! # Ok::<(), rio::Error>(())
//! ```
//!
//! This crate is the engine an embedder takes; its dependencies are those of an I/O engine
//! (libc, io-uring, crossbeam, hwlocality, ndarray, hdrhistogram, tracing, thiserror, toml):
//! no command line, no HTTP, no plotting. OpenTelemetry export is the `rio-otel` crate (its
//! `Telemetry::sink` plugs into [`runtime::RuntimeConfig::sink`]); the `rio` command is
//! `rio-cli`. The `serde` feature derives `Serialize` on the public report types.
//!
//! Modules, lowest layer first; a module imports only from layers below its own (checked by
//! `tests/layers.rs`, pictured in docs/DESIGN.md):
//! 1. [`op`], [`nvme::spec`], [`pool`], [`tune`], [`rng`], [`units`]: leaves (no crate imports);
//! 2. [`error`];
//! 3. [`buf`], [`target`], [`config`] (plain settings), [`window`], [`nvme::sim`];
//! 4. [`nvme`] (the driver: controller, rings, DMA);
//! 5. `backend` (io_uring, psync, the driver's I/O path);
//! 6. [`queue`];
//! 7. [`engine`];
//! 8. [`runtime`], [`info`].

#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
pub mod buf;
pub mod config;
pub mod engine;
pub mod error;
pub mod info;
pub mod nvme;
pub mod op;
pub mod pool;
pub mod queue;
pub mod rng;
pub mod runtime;
pub mod target;
pub mod tune;
pub mod units;
pub mod window;

pub use backend::nvme::NvmeQueueStats;
pub use backend::uring::UringFeatures;
pub use buf::IoBuf;
pub use config::EngineConfig;
pub use engine::{BackendKind, Engine, Selection};
pub use error::{Error, IoError, IoErrorKind, Result};
pub use op::OpKind;
pub use queue::{Completion, Queue, Rejected, Submitter};
pub use window::{Window, WindowSink};

/// The largest read or write one operation may move: Linux's limit for a single read or
/// write (`MAX_RW_COUNT`, 2 GiB less 4 KiB), which also keeps byte counts inside the i32 a
/// completion reports. Larger transfers are refused with [`Error::TooLarge`].
pub const MAX_IO_BYTES: u64 = 0x7FFF_F000;
