//! NVMe: the base-specification layer and the polled userspace driver.
//!
//! - [`spec`]: wire structures, registers, status codes (pure data).
//! - `mmio`, `dma`, `ring`: register access, DMA address translation, queue rings.
//! - [`Controller`]: bring-up, admin queue, namespaces, I/O queue creation, abort, reset.
//! - [`sim`]: the software controller model the host tests and `sim://` run the driver on.
//!
//! The I/O path itself (trackers, PRP lists, splitting, polling) is the `nvme` backend in
//! `crate::backend::nvme`, behind the same [`crate::Queue`] as io_uring.

pub(crate) mod ctrl;
pub(crate) mod dma;
pub(crate) mod mmio;
pub(crate) mod ring;
pub mod sim;
pub mod spec;

pub use ctrl::{Controller, Namespace, NvmeOptions};
