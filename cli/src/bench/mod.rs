//! `rio bench`: fio's workloads on rio's queues, with trustworthy accounting.
//!
//! - [`spec`]: the workload (fio's vocabulary) and its validation;
//! - [`verify`]: block headers (offset, seed, CRC32C) written and checked;
//! - [`clock`]: the per-I/O clock (the TSC where the kernel trusts it, else clock_gettime);
//! - [`run`](mod@run): one pinned thread per job, each with its own queue, keeping `iodepth` in flight;
//! - [`series`]: per-window samples (100 ms) for the tuner, telemetry and `--report`;
//! - [`report`]: merged hdrhistograms, fio-like JSON and a human summary;
//! - [`plot`]: `--report` as SVG or HTML plots.

pub mod autotune;
pub mod check;
pub mod clock;
pub mod guard;
pub mod plot;
pub mod probe;
pub mod report;
pub use rio::rng;
pub mod run;
pub mod series;
pub mod spec;
pub mod verify;

pub use report::BenchResult;
pub use run::{BenchError, Progress, run, run_with};
pub use series::{Point, Window, WindowSink};
pub use spec::{BenchSpec, RwMode};
