//! The `rio` command's library: what the binary runs, public so that tests, benches and scripts
//! can drive it (`rio_cli::bench::run_with`, `rio_cli::setup::run`).
//!
//! - [`bench`](mod@bench): the fio-like benchmark (job specs, the run loop with its windows, verify,
//!   `--iodepth auto`, `rio tune`'s probe, JSON/human reports, SVG/HTML plots);
//! - [`setup`]: hugepages and vfio-pci binding, as careful as SPDK's `setup.sh`.
//!
//! The engine is the `rio` crate and the OpenTelemetry export is `rio-otel`; this crate is the
//! only one that knows about command lines, terminals and plots.

pub mod args;
pub mod bench;
pub mod setup;
