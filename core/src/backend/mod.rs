//! Backends: the engines behind a [`crate::Queue`], and the rules that choose one.
//!
//! Dispatch is an enum, not a trait object: the set is closed (uring, psync; vfio and the
//! software model join later) and the hot path stays free of indirect calls.

pub(crate) mod nvme;
pub(crate) mod psync;
#[cfg(feature = "spdk")]
pub(crate) mod spdk;
pub(crate) mod uring;

use std::time::Duration;

use crate::error::Result;
use crate::op::OpKind;

/// One operation as a backend sees it. `addr` points into the queue's arena and stays valid
/// until the backend reports the slot complete (the queue owns the buffer meanwhile).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawOp {
    pub op: OpKind,
    pub offset: u64,
    pub len: u64,
    pub addr: *mut u8,
    /// A file of the caller's instead of the queue's own target (`-1`: the target). Kernel
    /// backends only; the queue's owner keeps it open until the completion is reaped.
    pub fd: i32,
    /// The file goes through the page cache (no O_DIRECT): the kernel copies, and it copies
    /// into a plain user address faster than into a registered buffer (io_uring).
    pub cached: bool,
}

impl RawOp {
    /// An operation on the queue's own target (no file of the caller's), through O_DIRECT or
    /// the device.
    #[inline]
    pub fn on_target(op: OpKind, offset: u64, len: u64, addr: *mut u8) -> RawOp {
        RawOp {
            op,
            offset,
            len,
            addr,
            fd: -1,
            cached: false,
        }
    }
}

/// A backend's completion: the queue slot and the kernel-style result (bytes, or -errno), or
/// a failure that an errno cannot describe.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reaped {
    pub slot: u32,
    pub res: i32,
    pub fail: Fail,
}

impl Reaped {
    pub fn ok(slot: u32, res: i32) -> Reaped {
        Reaped {
            slot,
            res,
            fail: Fail::None,
        }
    }
}

/// Failures of the NVMe driver, typed rather than squeezed into an errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fail {
    None,
    Nvme(crate::nvme::spec::NvmeError),
    TimedOut {
        after_ms: u64,
    },
    Reset {
        fatal: bool,
    },
    /// The driver could not build the command (an errno, e.g. EINVAL).
    Errno(i32),
}

// One per queue, created once and never moved on the hot path: the size difference between
// variants costs nothing, while boxing would add a pointer chase per operation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum BackendQueue {
    Uring(uring::UringQueue),
    Psync(psync::PsyncQueue),
    Nvme(nvme::NvmeQueue),
    #[cfg(feature = "spdk")]
    Spdk(spdk::SpdkQueue),
}

impl BackendQueue {
    /// The owner starts handing over a batch of completions whose handlers may submit: the
    /// userspace driver holds back doorbell writes until [`BackendQueue::batch_end`] (see
    /// `NvmeQueue::batch_begin`). Nothing on the other backends.
    #[inline]
    pub fn batch_begin(&mut self) {
        if let BackendQueue::Nvme(q) = self {
            q.batch_begin()
        }
    }

    #[inline]
    pub fn batch_end(&mut self) {
        if let BackendQueue::Nvme(q) = self {
            q.batch_end()
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            BackendQueue::Uring(_) => "uring",
            BackendQueue::Psync(_) => "psync",
            BackendQueue::Nvme(q) => q.backend_name(),
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(_) => "spdk",
        }
    }

    #[inline]
    pub fn push(&mut self, slot: u32, op: &RawOp) -> Result<()> {
        match self {
            BackendQueue::Uring(q) => q.push(slot, op),
            BackendQueue::Psync(q) => q.push(slot, op),
            BackendQueue::Nvme(q) => q.push(slot, op),
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(q) => q.push(slot, op),
        }
    }

    /// Submit what is pending and collect completions into `out`. With `want > 0`, block until
    /// at least that many arrived or `timeout` passed (`None`: no deadline is the caller's
    /// responsibility; the queue always passes one when blocking). True when a wait with a
    /// timeout ended short of `want`: the timeout passed (or, on io_uring, a signal came), so
    /// the caller must not wait again.
    #[inline]
    pub fn reap(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Reaped>,
    ) -> Result<bool> {
        match self {
            BackendQueue::Uring(q) => q.reap(want, timeout, out),
            BackendQueue::Psync(q) => q.reap(want, timeout, out),
            BackendQueue::Nvme(q) => q.reap(want, timeout, out),
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(q) => q.reap(want, timeout, out),
        }
    }

    /// Whether operations may name a file of the caller's (`RawOp::fd`): the kernel backends;
    /// a userspace driver (rio's or SPDK's) serves a namespace, which has no files.
    pub fn serves_files(&self) -> bool {
        matches!(self, BackendQueue::Uring(_) | BackendQueue::Psync(_))
    }

    /// Commands gathered per doorbell or `io_uring_enter` (psync: every operation is its own
    /// call, so 1).
    pub fn submit_batch(&self) -> u32 {
        match self {
            BackendQueue::Uring(q) => q.submit_batch(),
            BackendQueue::Psync(_) => 1,
            BackendQueue::Nvme(q) => q.submit_batch(),
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(q) => q.submit_batch(),
        }
    }

    /// Sets the submission batch; a no-op on psync.
    pub fn set_submit_batch(&mut self, n: u32) {
        match self {
            BackendQueue::Uring(q) => q.set_submit_batch(n),
            BackendQueue::Psync(_) => {}
            BackendQueue::Nvme(q) => q.set_submit_batch(n),
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(q) => q.set_submit_batch(n),
        }
    }

    /// Let `fd` (an eventfd) cut short a blocking wait ([`BackendQueue::arm_wake`]); false
    /// where the backend cannot wait that way (psync, the userspace drivers, IOPOLL rings).
    pub fn set_wake_fd(&mut self, fd: std::sync::Arc<std::os::fd::OwnedFd>) -> bool {
        match self {
            BackendQueue::Uring(q) => q.set_wake_fd(fd),
            _ => false,
        }
    }

    /// Prepare a wait that the wake-up fd interrupts; false: the backend cannot (spin instead).
    pub fn arm_wake(&mut self) -> bool {
        match self {
            BackendQueue::Uring(q) => q.arm_wake(),
            _ => false,
        }
    }

    /// The queue is being dropped with operations that never completed: do not wait for them
    /// (the queue leaks their memory instead).
    pub fn abandon(&mut self) {
        match self {
            BackendQueue::Uring(q) => q.abandon(),
            BackendQueue::Psync(q) => q.abandon(),
            BackendQueue::Nvme(q) => q.abandon(),
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(q) => q.abandon(),
        }
    }
}

/// Waiting in poll mode, shared by the polled drivers (rio's NVMe driver, SPDK's): call `poll`
/// until `want` completions were added to `out` (counted from its length at entry), or
/// `timeout` passed (counted from the first clock read, 64 polls in: the wait may run that
/// much longer, and a short wait reads no clock); without a timeout, poll once. `poll`
/// returns `true` when nothing more can arrive (nothing in flight). After 20,000 spins the
/// thread yields between polls (tests run many queues, and the software model may need this
/// core).
#[inline]
pub(crate) fn spin_reap(
    want: u32,
    timeout: Option<Duration>,
    out: &mut Vec<Reaped>,
    mut poll: impl FnMut(&mut Vec<Reaped>) -> Result<bool>,
) -> Result<bool> {
    let start = out.len();
    let Some(timeout) = timeout else {
        poll(out)?;
        return Ok(false);
    };
    // The deadline is set at the first clock read, after 64 polls: a wait that is over sooner
    // (the common case at low depth) reads no clock at all.
    let mut deadline = None;
    let mut spins = 0u32;
    loop {
        let idle = poll(out)?;
        let got = (out.len() - start) as u32;
        if got >= want || idle {
            return Ok(false);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            let now = std::time::Instant::now();
            if now >= *deadline.get_or_insert(now + timeout) {
                return Ok(true);
            }
            if spins > 20_000 {
                std::thread::yield_now();
            }
        }
        // No PAUSE between polls, as SPDK's pollers: each poll reads the completion queue
        // anyway, and under emulation (QEMU TCG) a PAUSE leaves the vCPU's translated code on
        // every spin (docs/DESIGN.md, "rio against SPDK").
    }
}

/// Whether an errno from `io_uring_setup` means "refused by policy" (seccomp, sysctl
/// `kernel.io_uring_disabled`, no kernel support): the cases where falling back is right.
pub(crate) fn is_refusal(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::ENOSYS | libc::EACCES)
    )
}
