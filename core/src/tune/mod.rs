//! The online tuner: what rio learns about a device while it runs, and what it sets from it.
//!
//! - [`rls`]: recursive least squares with forgetting (ndarray), bounded covariance;
//! - [`qd`]: queue depth (and submission batch) under a p99 target, per queue or device;
//! - [`pattern`]: classifies a stream's accesses (sequential, strided, random, bursty);
//! - [`prefetch`]: read-ahead for sequential and strided streams within a memory budget.
//!
//! Every decision is a `tracing` event on target `rio::tune` with its inputs, the estimate,
//! the chosen value and a confidence figure.

pub mod pattern;
pub mod prefetch;
pub mod qd;
pub mod rls;

pub use pattern::{Classifier, Pattern};
pub use prefetch::{PrefetchConfig, PrefetchStats, Prefetcher};
pub use qd::{Decision, QdConfig, QdTuner, Reason, recommendations};
pub use rls::Rls;
