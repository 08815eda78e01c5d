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
pub mod quirks;
pub(crate) mod ring;
pub mod sim;
pub mod spec;

pub use crate::config::SglMode;
pub use ctrl::{Controller, ControllerEvent, Namespace, NvmeOptions};
pub use quirks::Quirks;

/// The driver reads its options from the engine's knobs (`rio::config` is plain data and knows
/// none of its readers).
impl crate::config::EngineConfig {
    /// The NVMe driver's options.
    pub fn nvme_options(&self) -> NvmeOptions {
        NvmeOptions {
            io_queue_entries: (self.nvme_queue_entries > 0).then_some(self.nvme_queue_entries),
            command_timeout: (self.nvme_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.nvme_timeout_ms)),
            admin_timeout: std::time::Duration::from_millis(self.nvme_admin_timeout_ms),
            shadow_doorbells: self.nvme_shadow_doorbells,
            hugepages: self.hugepages,
            max_io_queues: 64,
            allow_unsafe_dma: self.allow_unsafe_dma,
            sgl: self.nvme_sgl,
            max_retries: self.nvme_retries,
        }
    }
}
