//! `rio bench`: fio's workloads on rio's queues, with trustworthy accounting.
//!
//! - [`spec`]: the workload (fio's vocabulary) and its validation;
//! - [`verify`]: block headers (offset, seed, CRC32C) written and checked;
//! - [`run`]: one pinned thread per job, each with its own queue, keeping `iodepth` in flight;
//! - [`report`]: merged hdrhistograms, fio-like JSON and a human summary.

pub mod report;
pub mod rng;
pub mod run;
pub mod spec;
pub mod verify;

pub use report::BenchResult;
pub use run::{BenchError, Progress, run};
pub use spec::{BenchSpec, RwMode};
