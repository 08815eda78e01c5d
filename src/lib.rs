//! rio: an NVMe I/O engine with per-core queues over io_uring or a pread/pwrite thread pool
//! (a polled userspace driver over VFIO joins them later).
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
//! Layers (docs/DESIGN.md): `rio-sys` (raw kernel interfaces) → `target`, `buf` (memory) →
//! `backend` (uring, psync) → `queue`, `engine` (the API) → `bench` and the CLI.

#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
pub mod bench;
pub mod buf;
pub mod config;
pub mod engine;
pub mod error;
pub mod info;
pub mod nvme;
pub mod pool;
pub mod queue;
pub mod runtime;
pub mod setup;
pub mod target;
pub mod telemetry;
pub mod tune;

pub use backend::nvme::NvmeQueueStats;
pub use backend::uring::UringFeatures;
pub use buf::IoBuf;
pub use config::EngineConfig;
pub use engine::{BackendKind, Engine, Selection};
pub use error::{Error, IoError, IoErrorKind, Result};
pub use queue::{Completion, OpKind, Queue, Rejected};
