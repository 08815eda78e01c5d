//! Per-core DMA buffer pools.
//!
//! One [`CorePool`](Pools) per configured core, each carved from large pinned mappings on that
//! core's NUMA node (1 GiB / 2 MiB hugepages where reserved, else 4 KiB pages locked with
//! `mlock` and a warning; see [`PagePolicy`]). Buffers come in power-of-two size classes
//! (4 KiB … 1 MiB by default), 4 KiB-aligned, and aligned to their size up to the page size of
//! their region.
//!
//! # Threads
//!
//! - **The home core's thread** is the thread that called [`Pools::bind_current_thread`] for
//!   that core and still holds the returned [`OwnerGuard`] (at most one per core; the guard is
//!   `!Send`). Its `get`s and drops use an owner-only free list (at most
//!   [`OWNER_CACHE`] buffers per class) with no atomic read-modify-write and no lock.
//! - **Any other thread** may `get` from any core and drop any buffer: those paths use a
//!   lock-free bounded queue per class (crossbeam `ArrayQueue`). A buffer dropped on another
//!   thread is pushed there ("remote return") and the home thread takes it back on a later
//!   `get` (it drains the queue in batches when its own list is empty). Nothing is lost if no
//!   thread is ever bound: then every operation takes the shared path.
//! - Pollers (the runtime, later) call [`Pools::maintain`] from the home thread when idle; it
//!   releases adaptive growth that has been idle.
//!
//! # Exhaustion
//!
//! [`Pools::get`] with a deadline waits (spin, then yield, then short sleeps) until a buffer
//! comes back or the deadline passes, then returns [`PoolError::Exhausted`]. No deadline
//! means no wait. It never panics and never falls back to heap memory.
//!
//! # Integration (DMA mapping, io_uring registration)
//!
//! [`Pools::regions`] lists every mapping of a core with [`Pools::generation`] counting
//! changes; [`PoolConfig::on_region`] is called for each region *before* any buffer of it is
//! handed out (initial regions included) and before a region is unmapped, so a backend can
//! map/register it once (and unmap it). A hook that fails a new region makes the growth fail
//! (the region is unmapped); one that fails an unmap makes the pool leak the region rather than
//! unmap memory a device may still reach.
//!
//! # Hot path
//!
//! After warm-up, `get` and drop allocate nothing (tested with a counting global allocator in
//! `tests/pool.rs`).

mod buf;
mod class;
mod numa;

/// CPUs of NUMA node `node` (hwloc), for placing pollers near a device.
pub(crate) fn cpus_of_node(node: u32) -> Vec<usize> {
    let numa = numa::Numa::detect();
    (0..4096)
        .filter(|&c| numa.node_of(c) == Some(node))
        .collect()
}
mod pools;
mod region;

use std::sync::Arc;
use std::time::Duration;

pub use buf::PoolBuf;
pub use numa::Placement;
pub use pools::{OwnerGuard, Pools};
pub use region::{PageKind, PagePolicy};

/// Most buffers of a class the home thread keeps on its own free list; above it, returns go to
/// the shared queue so other threads can take them.
pub const OWNER_CACHE: usize = 256;

/// Largest accepted size class (1 GiB).
pub const MAX_CLASS: usize = 1 << 30;

/// How a pool sizes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Only the initial buffers; a miss waits for a return.
    Fixed,
    /// Grow a class by a region after `grow_after_misses` misses since its last growth (up to
    /// `max_bytes_per_core`), and unmap growth regions that are entirely free once the class has
    /// seen no miss for `idle_release` (checked by [`Pools::maintain`]).
    Adaptive {
        grow_after_misses: u32,
        idle_release: Duration,
    },
}

/// A region event passed to [`PoolConfig::on_region`].
#[derive(Clone, Copy, Debug)]
pub struct RegionEvent {
    pub core: usize,
    pub kind: RegionEventKind,
    pub region: RegionInfo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionEventKind {
    /// The region was mapped; none of its buffers has been handed out yet.
    Mapped,
    /// The region is about to be unmapped; all of its buffers are free.
    Unmapping,
}

/// One mapping of a core's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Unique within the core, increasing.
    pub id: u64,
    pub ptr: *mut u8,
    pub len: usize,
    pub pages: PageKind,
    pub placement: Placement,
    /// The size class whose buffers fill this region; `None` for the initial region (all
    /// classes).
    pub class: Option<usize>,
}

// SAFETY: RegionInfo is a description (address, length); it grants no access by itself, and
// every dereference of `ptr` is the holder's own `unsafe` responsibility.
unsafe impl Send for RegionInfo {}
// SAFETY: as for Send: plain data.
unsafe impl Sync for RegionInfo {}

/// Hook for region events (see the module documentation). An `Err` from a `Mapped` event
/// cancels the region; from an `Unmapping` event, the region is leaked instead of unmapped.
pub type RegionHook = Arc<dyn Fn(&RegionEvent) -> Result<(), String> + Send + Sync>;

/// Configuration of [`Pools`].
#[derive(Clone)]
pub struct PoolConfig {
    /// Buffer sizes: powers of two, at least 4096 bytes, at most [`MAX_CLASS`]. Default
    /// 4 KiB ..= 1 MiB.
    pub classes: Vec<usize>,
    /// Buffers of each class carved at start, per core (default 16). Adaptive growth adds
    /// regions of the same count (rounded up to fill whole 2 MiB pages).
    pub initial_per_class: usize,
    /// Hard cap of mapped bytes per core (default 256 MiB). The initial region must fit.
    pub max_bytes_per_core: usize,
    pub strategy: Strategy,
    /// Zero a buffer's whole capacity when it is returned (for hosts sharing buffers between
    /// tenants). Fresh memory is zero, so every buffer handed out is then all zeroes.
    pub zero_on_free: bool,
    pub pages: PagePolicy,
    pub on_region: Option<RegionHook>,
}

impl std::fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolConfig")
            .field("classes", &self.classes)
            .field("initial_per_class", &self.initial_per_class)
            .field("max_bytes_per_core", &self.max_bytes_per_core)
            .field("strategy", &self.strategy)
            .field("zero_on_free", &self.zero_on_free)
            .field("pages", &self.pages)
            .field("on_region", &self.on_region.is_some())
            .finish()
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            classes: (12..=20).map(|s| 1usize << s).collect(),
            initial_per_class: 16,
            max_bytes_per_core: 256 << 20,
            strategy: Strategy::Adaptive {
                grow_after_misses: 8,
                idle_release: Duration::from_secs(30),
            },
            zero_on_free: false,
            pages: PagePolicy::Huge2M,
            on_region: None,
        }
    }
}

impl PoolConfig {
    /// Check the configuration; returns the classes sorted ascending.
    pub(crate) fn validate(&self) -> Result<Vec<usize>, PoolError> {
        let bad = |reason: String| Err(PoolError::Config { reason });
        if self.classes.is_empty() {
            return bad("no size classes".into());
        }
        let mut c = self.classes.clone();
        c.sort_unstable();
        c.dedup();
        if c.len() > 64 {
            return bad("more than 64 size classes".into());
        }
        for &s in &c {
            if !s.is_power_of_two() || !(4096..=MAX_CLASS).contains(&s) {
                return bad(format!(
                    "size class {s} is not a power of two between 4096 and {MAX_CLASS}"
                ));
            }
        }
        let initial = self.initial_bytes(&c);
        if initial > self.max_bytes_per_core {
            return bad(format!(
                "the initial buffers need {initial} bytes per core, more than max_bytes_per_core ({})",
                self.max_bytes_per_core
            ));
        }
        if let Strategy::Adaptive {
            grow_after_misses: 0,
            ..
        } = self.strategy
        {
            return bad("grow_after_misses must be at least 1".into());
        }
        if self.initial_per_class == 0 && self.strategy == Strategy::Fixed {
            return bad("a fixed pool with no initial buffers can hand out nothing".into());
        }
        Ok(c)
    }

    pub(crate) fn initial_bytes(&self, classes: &[usize]) -> usize {
        classes
            .iter()
            .map(|&s| s.saturating_mul(self.initial_per_class))
            .fold(0usize, usize::saturating_add)
    }
}

/// Errors of the buffer pools. (`crate::Error` gains a `From<PoolError>` in `src/error.rs`.)
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid buffer pool configuration: {reason}")]
    Config { reason: String },

    #[error("core {core} has no buffer pool")]
    UnknownCore { core: usize },

    #[error("buffer of {requested} bytes requested; the largest size class is {largest}")]
    TooLarge { requested: usize, largest: usize },

    #[error(
        "buffer pool of core {core} exhausted for {class}-byte buffers ({in_use} of {capacity} in use, waited {waited:?})"
    )]
    Exhausted {
        core: usize,
        class: usize,
        in_use: usize,
        capacity: usize,
        waited: Duration,
    },

    #[error("cannot map {bytes} bytes of buffer pool memory for core {core}: {reason}")]
    Map {
        core: usize,
        bytes: usize,
        reason: String,
    },

    #[error("core {core}'s buffer pool is already bound to another thread")]
    AlreadyBound { core: usize },

    #[error("region hook refused a new region of core {core}: {reason}")]
    Hook { core: usize, reason: String },

    #[error("length {len} exceeds the buffer capacity {capacity}")]
    BadLen { len: usize, capacity: usize },
}

/// Statistics of one core's pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreStats {
    pub core: usize,
    pub placement: Placement,
    /// Bytes mapped (all regions).
    pub mapped_bytes: usize,
    pub regions: usize,
    pub classes: Vec<ClassStats>,
}

/// Statistics of one size class of a core. Counters are read without stopping the pool, so
/// under concurrent traffic they are a near-instant view, not one atomic snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    pub size: usize,
    /// Buffers carved (free + in use).
    pub capacity: usize,
    pub in_use: usize,
    /// `get`s served at once.
    pub hits: u64,
    /// `get`s that found the class empty (then grew, waited, or failed).
    pub misses: u64,
    /// Buffers returned from a thread other than the home thread.
    pub remote_returns: u64,
    /// Most buffers in use at once.
    pub high_water: usize,
    /// Growth regions mapped / released so far.
    pub grown: u64,
    pub released: u64,
}
