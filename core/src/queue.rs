//! The per-core queue: submit operations with a user token, poll completions.
//!
//! A [`Queue`] is owned by one thread (it is neither `Send` nor `Sync`). Data moves through
//! [`IoBuf`]s the queue hands out; a submitted buffer is owned by the queue until its completion
//! is reaped and then comes back in the [`Completion`]. Submissions are batched: the backend
//! sees them at the next [`Queue::poll`] or [`Queue::wait`], which costs one `io_uring_enter` at
//! most (none when nothing is pending and no completion has been signalled).

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::backend::{BackendQueue, Fail, RawOp, Reaped};
use crate::buf::{Arena, IoBuf};
use crate::error::{Error, IoError, IoErrorKind, Result};
use crate::target::Geometry;

pub use crate::op::OpKind;

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The token given at submission.
    pub token: u64,
    pub op: OpKind,
    pub offset: u64,
    /// Bytes asked for.
    pub len: u64,
    /// Bytes transferred, or why it failed. A read or write that moved fewer bytes than asked is
    /// an error ([`IoErrorKind::Short`]).
    pub result: std::result::Result<u64, IoError>,
    /// The buffer of a read or write, handed back.
    pub buf: Option<IoBuf>,
}

/// A submission the queue refused. The buffer, if any, is handed back: nothing is lost.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Rejected {
    #[source]
    pub error: Error,
    pub buf: Option<IoBuf>,
}

impl From<Rejected> for Error {
    fn from(r: Rejected) -> Error {
        r.error
    }
}

struct Slot {
    token: u64,
    op: OpKind,
    offset: u64,
    len: u64,
    buf: Option<IoBuf>,
}

/// One queue pair's worth of I/O state, owned by one thread.
pub struct Queue {
    backend: BackendQueue,
    arena: Rc<Arena>,
    geometry: Geometry,
    writable: bool,
    depth: u32,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    reaped: Vec<Reaped>,
    /// Completions reaped by a blocking helper on behalf of `poll`, or left by a `wait_each`
    /// handler that panicked.
    ready: VecDeque<Completion>,
    /// The submission fast path's checks, precomputed (see `Masks`).
    masks: Masks,
    _not_send: PhantomData<*const ()>,
}

/// What a read or write with a buffer from the queue's arena must satisfy, in the form the
/// submission fast path tests with a few instructions: offset and length multiples of the block
/// size (`block`: block size - 1), the address of the DMA alignment (`mem`: alignment - 1).
/// A geometry whose sizes are not powers of two gets all-ones masks: every submission then
/// takes the general path, which checks by division.
#[derive(Clone, Copy)]
struct Masks {
    block: u64,
    mem: usize,
}

impl Masks {
    fn of(g: Geometry) -> Masks {
        let (bs, al) = (g.block_size as u64, g.mem_align as usize);
        if bs.is_power_of_two() && (al.is_power_of_two() || al == 0) {
            Masks {
                block: bs - 1,
                mem: al.saturating_sub(1),
            }
        } else {
            Masks {
                block: u64::MAX,
                mem: usize::MAX,
            }
        }
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("backend", &self.backend.name())
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// How long blocking helpers and `Drop` wait for a completion before giving up.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

impl Queue {
    pub(crate) fn new(
        backend: BackendQueue,
        arena: Rc<Arena>,
        geometry: Geometry,
        writable: bool,
        depth: u32,
    ) -> Queue {
        Queue {
            backend,
            arena,
            geometry,
            writable,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            reaped: Vec::with_capacity(depth as usize),
            ready: VecDeque::new(),
            masks: Masks::of(geometry),
            _not_send: PhantomData,
        }
    }

    /// Name of the backend serving this queue.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Commands gathered per doorbell (vfio, model, with MMIO doorbells) or per
    /// `io_uring_enter` (uring; 0 means only when the queue polls or waits). Always 1 on psync,
    /// on SPDK, and on the userspace driver with shadow doorbells (each submission updates the
    /// shadow tail at once; the MMIO write is the controller's EventIdx's call).
    pub fn submit_batch(&self) -> u32 {
        self.backend.submit_batch()
    }

    /// Sets the submission batch (the tuner's knob); no effect on psync, SPDK, or shadow
    /// doorbells (above). Commands never wait on a timer to fill a batch: a partial batch goes
    /// out at the next poll that sees the device idle-ish (nvme) or at the next poll/wait
    /// (uring).
    pub fn set_submit_batch(&mut self, n: u32) {
        self.backend.set_submit_batch(n)
    }

    /// How many memory regions (the queue's arena, the regions given to
    /// `queue_with_regions` or `add_region`) io_uring has registered as fixed buffers; `None`
    /// on the other backends.
    pub fn registered_regions(&self) -> Option<usize> {
        match &self.backend {
            BackendQueue::Uring(q) => Some(q.registered_regions()),
            _ => None,
        }
    }

    /// Counters of the userspace NVMe driver's queue pair (`None` on kernel backends).
    pub fn nvme_stats(&self) -> Option<crate::backend::nvme::NvmeQueueStats> {
        match &self.backend {
            BackendQueue::Nvme(q) => Some(q.stats()),
            _ => None,
        }
    }

    /// Alignment and size of the target.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Maximum operations in flight.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> u32 {
        self.depth - self.free.len() as u32
    }

    /// A buffer from this queue's registered arena, with `len()` = `len`.
    pub fn alloc_buf(&self, len: usize) -> Result<IoBuf> {
        self.arena.alloc(len)
    }

    /// The arena buffers come from (for statistics).
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    fn check(&self, op: OpKind, offset: u64, len: u64) -> Result<()> {
        if op != OpKind::Read && !self.writable {
            return Err(Error::Unsupported {
                op,
                backend: "a target opened read-only",
            });
        }
        if op != OpKind::Flush {
            self.geometry.check_range(offset, len)?;
        }
        if matches!(op, OpKind::Read | OpKind::Write) && len > crate::MAX_IO_BYTES {
            // Results are reported as an i32 byte count (as io_uring's are), and Linux moves
            // at most this much per read or write anyway.
            return Err(Error::TooLarge {
                len,
                max: crate::MAX_IO_BYTES,
            });
        }
        if self.free.is_empty() {
            return Err(Error::QueueFull { depth: self.depth });
        }
        Ok(())
    }

    /// A read or write of a buffer from this queue's arena (what a storage loop submits, once
    /// per I/O): checked with masks and compares, the slot filled, the backend called; no
    /// error is built here. Anything else, and anything that fails a check, goes to
    /// `submit`, which checks the same things again and says what is wrong.
    #[inline]
    fn submit_data(
        &mut self,
        op: OpKind,
        offset: u64,
        buf: IoBuf,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        let len = buf.len() as u64;
        if !(buf.is_from(&self.arena) && self.data_fits(op, offset, len, buf.as_ptr() as usize)) {
            return self.submit(op, offset, len, Some(buf), token);
        }
        let raw = RawOp::on_target(op, offset, len, buf.as_ptr());
        self.enqueue(raw, Some(buf), token)
    }

    /// The fast path's checks of a read or write (`op` is one) at `addr`: offset, length and
    /// address by the masks, the range inside the target, the target's mode, a free slot.
    /// False sends the submission to the general checks, which say what is wrong.
    #[inline]
    fn data_fits(&self, op: OpKind, offset: u64, len: u64, addr: usize) -> bool {
        let m = self.masks;
        (offset | len) & m.block == 0
            && len != 0
            && len <= crate::MAX_IO_BYTES
            && offset <= self.geometry.size
            && len <= self.geometry.size - offset
            && (op == OpKind::Read || self.writable)
            && addr & m.mem == 0
            && !self.free.is_empty()
    }

    /// Every submission's checks and their errors (out of line: the per-I/O reads and writes
    /// take `submit_data`).
    #[inline(never)]
    fn submit(
        &mut self,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        if let Err(error) = self.check(op, offset, len) {
            return Err(Rejected { error, buf });
        }
        if let Some(b) = &buf {
            let align = self.geometry.mem_align as usize;
            if !b.is_from(&self.arena) {
                return Err(Rejected {
                    error: Error::BufferUnavailable {
                        requested: b.len(),
                        reason: "buffer belongs to another queue's arena".into(),
                    },
                    buf,
                });
            }
            let misaligned = if align.is_power_of_two() {
                b.as_ptr() as usize & (align - 1) != 0
            } else {
                !(b.as_ptr() as usize).is_multiple_of(align)
            };
            if align > 1 && misaligned {
                let error = Error::Alignment {
                    what: "buffer address",
                    value: b.as_ptr() as u64,
                    align_name: "DMA alignment",
                    align: align as u64,
                };
                return Err(Rejected { error, buf });
            }
        }
        let addr = buf.as_ref().map_or(std::ptr::null_mut(), |b| b.as_ptr());
        let raw = RawOp::on_target(op, offset, len, addr);
        self.enqueue(raw, buf, token)
    }

    /// Hand a checked operation to the backend and record it in a free slot (the caller
    /// checked that one is free).
    #[inline]
    fn enqueue(
        &mut self,
        raw: RawOp,
        buf: Option<IoBuf>,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        // The slot is filled before the backend sees the operation: a backend that completes
        // it at once (SPDK, when `wait_each` submits from inside its completion callback)
        // finds it in place.
        let slot = self.free.pop().expect("checked non-empty");
        // Written into the entry, known empty: an assignment over an `Option` the compiler
        // cannot see is empty builds the slot on the stack, drops the old value, then copies
        // it in, and that copy stalled on store forwarding (a fifth of `submit`'s samples).
        match &mut self.slots[slot as usize] {
            e @ None => {
                *e = Some(Slot {
                    token,
                    op: raw.op,
                    offset: raw.offset,
                    len: raw.len,
                    buf,
                })
            }
            Some(_) => unreachable!("slot {slot} is on the free list and in use"),
        }
        if let Err(error) = self.backend.push(slot, &raw) {
            let buf = self.slots[slot as usize].take().and_then(|s| s.buf);
            self.free.push(slot);
            return Err(Rejected { error, buf });
        }
        Ok(())
    }

    /// Queue `op` on memory the queue does not own (a buffer pool's, registered with
    /// [`crate::Engine::queue_with_regions`]). The completion carries no buffer. Offsets,
    /// lengths and the address are checked like any submission.
    ///
    /// # Safety
    /// For a read or write, `addr..addr+len` must stay valid (and, for a read, not be read or
    /// written by anyone else) until this operation's completion has been reaped; the kernel or
    /// the device writes into it meanwhile. For the vfio backend it must lie in a region given
    /// to `queue_with_regions` (else the submission is rejected).
    #[inline]
    pub unsafe fn submit_raw(
        &mut self,
        op: OpKind,
        offset: u64,
        addr: *mut u8,
        len: u64,
        token: u64,
    ) -> Result<()> {
        // A read or write that passes the fast path's checks (`submit_data`'s) goes straight
        // to the slot; anything else to the general checks.
        if matches!(op, OpKind::Read | OpKind::Write)
            && !addr.is_null()
            && self.data_fits(op, offset, len, addr as usize)
        {
            let raw = RawOp::on_target(op, offset, len, addr);
            return self.enqueue(raw, None, token).map_err(Error::from);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.submit_raw_general(op, offset, addr, len, token) }
    }

    /// `submit_raw`'s checks and their errors, out of line.
    ///
    /// # Safety
    /// As for `submit_raw`.
    #[inline(never)]
    unsafe fn submit_raw_general(
        &mut self,
        op: OpKind,
        offset: u64,
        addr: *mut u8,
        len: u64,
        token: u64,
    ) -> Result<()> {
        if matches!(op, OpKind::Read | OpKind::Write) {
            let align = self.geometry.mem_align as usize;
            // A mask when the alignment is a power of two (always, in practice): a division
            // here was a measurable part of a runtime submission.
            let misaligned = if align.is_power_of_two() {
                addr as usize & (align - 1) != 0
            } else {
                align > 1 && !(addr as usize).is_multiple_of(align)
            };
            if addr.is_null() || misaligned {
                return Err(Error::Alignment {
                    what: "buffer address",
                    value: addr as u64,
                    align_name: "DMA alignment",
                    align: align as u64,
                });
            }
        }
        let addr = if matches!(op, OpKind::Read | OpKind::Write) {
            addr
        } else {
            std::ptr::null_mut()
        };
        self.check(op, offset, len)?;
        let raw = RawOp::on_target(op, offset, len, addr);
        self.enqueue(raw, None, token).map_err(Error::from)
    }

    /// [`submit_raw`](Self::submit_raw) on another file than the queue's target: any file the
    /// caller opened (io_uring and psync queues only; a [`crate::Engine::open_dir`] runtime
    /// serves the files of a directory this way). The file's own open mode rules: with
    /// O_DIRECT, offsets, lengths and the address must meet its alignment, or the kernel fails
    /// the operation with EINVAL. The target's size does not bound the offset. `cached`: the
    /// file is open without O_DIRECT (the data is copied through the page cache; io_uring
    /// then passes a plain address rather than a registered buffer, which it copies faster).
    ///
    /// # Safety
    /// As for `submit_raw`, and `fd` must stay open (not closed, not reused) until this
    /// operation's completion has been reaped.
    // submit_raw's arguments plus the file and how it is open: a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn submit_fd(
        &mut self,
        op: OpKind,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        addr: *mut u8,
        len: u64,
        token: u64,
        cached: bool,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        if !self.backend.serves_files() {
            return Err(Error::Unsupported {
                op,
                backend: "a userspace NVMe driver (a namespace has no files; open a file through io_uring or psync)",
            });
        }
        let data = matches!(op, OpKind::Read | OpKind::Write);
        if data && addr.is_null() && len > 0 {
            return Err(Error::Alignment {
                what: "buffer address",
                value: 0,
                align_name: "a buffer",
                align: 1,
            });
        }
        if data && len > crate::MAX_IO_BYTES {
            return Err(Error::TooLarge {
                len,
                max: crate::MAX_IO_BYTES,
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: i64::MAX as u64,
            });
        }
        if self.free.is_empty() {
            return Err(Error::QueueFull { depth: self.depth });
        }
        let addr = if data { addr } else { std::ptr::null_mut() };
        let raw = RawOp {
            op,
            offset,
            len,
            addr,
            fd: fd.as_raw_fd(),
            cached,
        };
        self.enqueue(raw, None, token).map_err(Error::from)
    }

    /// Make more external memory usable by `submit_raw` after the queue was built (a pool that
    /// grew): mapped into the IOMMU for the vfio backend; registered as fixed buffers by
    /// io_uring where the kernel has a sparse buffer table (5.13+), else used unregistered
    /// (same results, a little more kernel work per operation).
    ///
    /// # Safety
    /// As for [`crate::Engine::queue_with_regions`]: the memory stays mapped and unmoved until
    /// the queue is dropped.
    pub unsafe fn add_region(
        &mut self,
        ptr: *mut u8,
        len: usize,
        kind: rio_sys::mem::PageKind,
    ) -> Result<()> {
        match &mut self.backend {
            // SAFETY: caller contract.
            BackendQueue::Nvme(q) => unsafe { q.add_region(ptr, len, kind) },
            #[cfg(feature = "spdk")]
            // SAFETY: caller contract.
            BackendQueue::Spdk(q) => unsafe { q.add_region(ptr, len, kind) },
            BackendQueue::Uring(q) => {
                // SAFETY: caller contract (the memory stays mapped until `remove_region`).
                unsafe { q.add_region(ptr, len) };
                Ok(())
            }
            BackendQueue::Psync(_) => Ok(()),
        }
    }

    /// Stop using a region given to `queue_with_regions` or `add_region` (a pool gave it back):
    /// unmapped from the IOMMU, or io_uring's fixed buffers registered again without it. Only
    /// with nothing in flight on this queue (else `Error::InUse`). Afterwards the caller may
    /// unmap the memory.
    pub fn remove_region(&mut self, ptr: *mut u8) -> Result<()> {
        let in_flight = self.in_flight();
        if in_flight > 0 {
            return Err(Error::InUse {
                path: "queue".into(),
                reason: format!("{in_flight} operations in flight; remove regions when idle"),
            });
        }
        match &mut self.backend {
            BackendQueue::Nvme(q) => {
                q.remove_region(ptr);
                Ok(())
            }
            BackendQueue::Uring(q) => {
                q.remove_region(ptr);
                Ok(())
            }
            #[cfg(feature = "spdk")]
            BackendQueue::Spdk(q) => {
                q.remove_region(ptr);
                Ok(())
            }
            BackendQueue::Psync(_) => Ok(()),
        }
    }

    /// Queue a read of `buf.len()` bytes at `offset` into `buf`.
    #[inline]
    pub fn submit_read(
        &mut self,
        offset: u64,
        buf: IoBuf,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        self.submit_data(OpKind::Read, offset, buf, token)
    }

    /// Queue a write of `buf.len()` bytes from `buf` at `offset`.
    #[inline]
    pub fn submit_write(
        &mut self,
        offset: u64,
        buf: IoBuf,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        self.submit_data(OpKind::Write, offset, buf, token)
    }

    /// Queue a flush of the device's volatile write cache (fdatasync on the kernel path).
    pub fn submit_flush(&mut self, token: u64) -> Result<()> {
        self.submit(OpKind::Flush, 0, 0, None, token)
            .map_err(Error::from)
    }

    /// Queue zeroing `len` bytes at `offset`.
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, token: u64) -> Result<()> {
        self.submit(OpKind::WriteZeroes, offset, len, None, token)
            .map_err(Error::from)
    }

    /// Queue deallocating (trimming) `len` bytes at `offset`.
    pub fn submit_deallocate(&mut self, offset: u64, len: u64, token: u64) -> Result<()> {
        self.submit(OpKind::Deallocate, offset, len, None, token)
            .map_err(Error::from)
    }

    /// Hand pending submissions to the backend and append finished operations to `out`
    /// without blocking. Returns how many were appended.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        self.reap(0, None, out)
    }

    /// Like [`Queue::poll`], but block until at least `min` operations have finished or
    /// `timeout` passes (then fewer may be returned). `min` is capped at the number in flight.
    /// A signal (Ctrl-C) can end the wait early on io_uring, also with fewer.
    pub fn wait(
        &mut self,
        min: usize,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<usize> {
        self.reap(min, Some(timeout), out)
    }

    /// [`Queue::wait`], each completion handed to `each` with a [`Submitter`] for this queue,
    /// so that `each` can submit the next operation at once (run to completion, as a device
    /// loop does). Returns how many were handed over.
    ///
    /// On SPDK's driver `each` runs inside SPDK's completion callback, before SPDK writes the
    /// completion queue's head: what it submits reaches the device with the same poll's
    /// doorbell, in SPDK's own order (callbacks, CQ head, SQ tail), as `spdk_nvme_perf`
    /// submits; completions are handed over one by one as SPDK finds them. Elsewhere they
    /// are reaped first, then handed over in order, as `wait` and a loop over its output would,
    /// except that on the userspace driver the doorbell writes the handlers' submissions need
    /// are held until the whole batch has been handed over, then made once (see
    /// `NvmeQueue::batch_begin`). The handler gets a [`Submitter`], not the queue: it can
    /// submit and read the queue's state, but not poll, wait, drop or replace the queue it is
    /// called from.
    ///
    /// A panic in `each` propagates out of `wait_each` (on SPDK's driver it is caught at
    /// SPDK's C boundary and resumed after SPDK returns). What finished besides stays in the
    /// queue and is handed over by the next call: nothing is lost.
    #[inline]
    pub fn wait_each<F: FnMut(&mut Submitter<'_>, Completion)>(
        &mut self,
        min: usize,
        timeout: Duration,
        mut each: F,
    ) -> Result<usize> {
        #[cfg(feature = "spdk")]
        if matches!(self.backend, BackendQueue::Spdk(_)) {
            return self.wait_each_spdk(min, timeout, &mut each);
        }
        // Each completion is built where it is handed over, not pushed into a vector first: a
        // `Completion` stored into a vector is built on the stack and copied, and the copy
        // stalled on store forwarding (half of `reap_once`'s samples on the inline model).
        let mut handed = 0usize;
        // Left by a blocking helper for `poll`, or by a handler that panicked: first, in order.
        while let Some(c) = self.ready.pop_front() {
            handed += 1;
            each(&mut Submitter { q: self }, c);
        }
        // Capped at what can finish (as `wait` caps it, and the SPDK path): the handler's own
        // submissions do not raise it.
        let min = min.min(handed + self.in_flight() as usize);
        let mut deadline: Option<Instant> = None;
        let mut left = Some(timeout);
        loop {
            let want = min.saturating_sub(handed).min(self.in_flight() as usize) as u32;
            let mut reaped = std::mem::take(&mut self.reaped);
            reaped.clear();
            let res = self.backend.reap(want, left, &mut reaped);
            let mut bad = None;
            {
                // What `each` has not been given when it panics is completed into `ready`,
                // first in line for the next call (the guard's drop).
                struct Rest<'a> {
                    q: &'a mut Queue,
                    reaped: Vec<Reaped>,
                    next: usize,
                }
                impl Drop for Rest<'_> {
                    fn drop(&mut self) {
                        for &r in &self.reaped[self.next..] {
                            if let Ok(c) = self.q.complete(r) {
                                self.q.ready.push_back(c);
                            }
                        }
                        self.reaped.clear();
                        self.q.reaped = std::mem::take(&mut self.reaped);
                        self.q.backend.batch_end();
                    }
                }
                // Doorbells the handlers' submissions need are written once, when the batch
                // has been handed over (`Rest`'s drop; see `NvmeQueue::batch_begin`).
                self.backend.batch_begin();
                let mut rest = Rest {
                    q: self,
                    reaped,
                    next: 0,
                };
                while let Some(&r) = rest.reaped.get(rest.next) {
                    rest.next += 1;
                    match rest.q.take_slot(r) {
                        Ok(slot) => {
                            handed += 1;
                            let c = Completion {
                                token: slot.token,
                                op: slot.op,
                                offset: slot.offset,
                                len: slot.len,
                                result: Self::result_of(&slot, r),
                                buf: slot.buf,
                            };
                            each(&mut Submitter { q: rest.q }, c);
                        }
                        Err(e) => bad = Some(e),
                    }
                }
            }
            // What was reaped has been handed over either way; then the errors.
            let timed_out = res?;
            if let Some(e) = bad {
                return Err(e);
            }
            if handed >= min
                || self.in_flight() == 0
                || timed_out
                || left.is_some_and(|l| l.is_zero())
            {
                return Ok(handed);
            }
            // Short of `min` with time left (a backend may return early, e.g. on a signal):
            // wait for the rest of the timeout, counted from the first call (the clock is
            // read only then, as in `reap`).
            let now = Instant::now();
            let d = *deadline.get_or_insert_with(|| now + timeout);
            left = Some(d.saturating_duration_since(now));
        }
    }

    #[cfg(feature = "spdk")]
    #[inline]
    fn wait_each_spdk<F: FnMut(&mut Submitter<'_>, Completion)>(
        &mut self,
        min: usize,
        timeout: Duration,
        each: &mut F,
    ) -> Result<usize> {
        use std::cell::Cell;
        let handed = Cell::new(0usize);
        let bad: Cell<Option<Error>> = Cell::new(None);
        // Left by a blocking helper for `poll`: first, in order.
        while let Some(c) = self.ready.pop_front() {
            handed.set(handed.get() + 1);
            each(&mut Submitter { q: self }, c);
        }
        let min = min.min(handed.get() + self.in_flight() as usize);
        let this: *mut Queue = self;
        // The backend, derived anew from the queue's pointer at each use: the hook's reference
        // to the whole queue ends any pointer derived from it before.
        let owner = this;
        let mut spdk = || -> *mut crate::backend::spdk::SpdkQueue {
            // SAFETY: `owner` is `self`; this reference ends with the statement (only the
            // pointer is kept, and used before the hook's next reference).
            match unsafe { &mut (*owner).backend } {
                BackendQueue::Spdk(sq) => sq,
                _ => unreachable!("checked by the caller"),
            }
        };
        // From here on the queue is reached only through `this`, one short-lived reference at
        // a time: the hook makes its own from inside SPDK's callback.
        let mut hook = |r: Reaped| {
            // SAFETY: `this` is the queue this call borrows mutably; no other reference to it
            // is alive while the hook runs (`poll_each` holds none across SPDK's call, nor
            // while it hands over what finished outside a callback), and this one ends before
            // the hook returns. `each` sees it only through a `Submitter`, which cannot drop,
            // replace or poll the queue: SPDK's queue pair and the slot contexts `poll_each`
            // is using stay in place.
            let q = unsafe { &mut *this };
            // Built where it is handed over (as in the generic `wait_each`): no `Result`
            // around it to be copied through the stack.
            match q.take_slot(r) {
                Ok(slot) => {
                    handed.set(handed.get() + 1);
                    let c = Completion {
                        token: slot.token,
                        op: slot.op,
                        offset: slot.offset,
                        len: slot.len,
                        result: Self::result_of(&slot, r),
                        buf: slot.buf,
                    };
                    each(&mut Submitter { q }, c);
                }
                Err(e) => {
                    let first = bad.take().unwrap_or(e);
                    bad.set(Some(first));
                }
            }
        };
        let mut deadline: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            // SAFETY: `spdk` derives the backend from `self` at each call; no reference to the
            // queue is alive across the call; the hook does not poll (`each` has only a
            // `Submitter`, which cannot).
            unsafe { crate::backend::spdk::SpdkQueue::poll_each(&mut spdk, &mut hook) };
            // SAFETY: as above.
            let idle = unsafe { (*this).in_flight() } == 0;
            if handed.get() >= min || idle {
                break;
            }
            // As `spin_reap`: the clock first read 64 polls in, a yield after 20,000 spins.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                let now = Instant::now();
                if now >= *deadline.get_or_insert(now + timeout) {
                    break;
                }
                if spins > 20_000 {
                    std::thread::yield_now();
                }
            }
        }
        match bad.take() {
            Some(e) => Err(e),
            None => Ok(handed.get()),
        }
    }

    fn reap(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> Result<usize> {
        let before = out.len();
        out.extend(self.ready.drain(..));
        // The clock is read only if the first call to the backend falls short (it has the
        // whole timeout): a clock read can cost a system call and an emulated timer access
        // (a VM whose TSC is unusable), so the common case reads none here.
        let mut deadline: Option<Instant> = None;
        let mut left = timeout;
        loop {
            let got = out.len() - before;
            let want = min.saturating_sub(got).min(self.in_flight() as usize) as u32;
            let timed_out = self.reap_once(want, left, out, before)?;
            let got = out.len() - before;
            let satisfied = got >= min || self.in_flight() == 0;
            if timeout.is_none() || satisfied || timed_out || left.is_some_and(|l| l.is_zero()) {
                return Ok(got);
            }
            // Short of `min` with time left (a backend may return early, e.g. on a signal):
            // wait for the rest of the timeout, counted from the first call.
            let now = Instant::now();
            let d = *deadline.get_or_insert_with(|| now + timeout.unwrap_or_default());
            left = Some(d.saturating_duration_since(now));
        }
    }

    /// One call to the backend; completions appended to `out` (on error, everything appended
    /// since `before` goes to `ready` instead: nothing reaped is lost). True when the
    /// backend's wait ended at `timeout`.
    fn reap_once(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        before: usize,
    ) -> Result<bool> {
        self.reaped.clear();
        let res = self.backend.reap(want, timeout, &mut self.reaped);
        let mut bad = None;
        for i in 0..self.reaped.len() {
            let r = self.reaped[i];
            if let Err(e) = self.complete_into(r, out) {
                bad = Some(e);
            }
        }
        match (res, bad) {
            (Ok(timed_out), None) => Ok(timed_out),
            (Err(e), _) | (Ok(_), Some(e)) => {
                self.ready.extend(out.drain(before..));
                Err(e)
            }
        }
    }

    /// Let `fd` (an eventfd) wake [`Queue::wait_or_wake`] from another thread. Returns
    /// whether the backend can wait that way (io_uring without IOPOLL); elsewhere
    /// `wait_or_wake` always returns `None` and the owner keeps polling.
    pub fn set_wake_fd(&mut self, fd: std::sync::Arc<std::os::fd::OwnedFd>) -> bool {
        self.backend.set_wake_fd(fd)
    }

    /// Block until an operation completes, the wake-up fd ([`Queue::set_wake_fd`]) is
    /// signalled, or `timeout` passes, whichever is first; completions are appended to `out`
    /// as by [`Queue::poll`]. `None`: this queue cannot wait that way (no wake-up fd, a
    /// backend that only polls, or no room for the wake-up read): nothing was done.
    pub fn wait_or_wake(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<Option<usize>> {
        let before = out.len();
        if !self.ready.is_empty() {
            out.extend(self.ready.drain(..));
            return Ok(Some(out.len() - before));
        }
        if !self.backend.arm_wake() {
            return Ok(None);
        }
        self.reap_once(1, Some(timeout), out, before)?;
        Ok(Some(out.len() - before))
    }

    /// The completion of `r` (SPDK's handler path, and what a panicking `wait_each` handler
    /// leaves; polls use `complete_into`).
    fn complete(&mut self, r: Reaped) -> Result<Completion> {
        let slot = self.take_slot(r)?;
        Ok(Completion {
            token: slot.token,
            op: slot.op,
            offset: slot.offset,
            len: slot.len,
            result: Self::result_of(&slot, r),
            buf: slot.buf,
        })
    }

    /// [`Queue::complete`] straight into `out`: the completion is written into the vector's
    /// memory rather than built on the stack and copied there (a copy that stalled on store
    /// forwarding for a quarter of `reap_once`'s samples).
    #[inline]
    fn complete_into(&mut self, r: Reaped, out: &mut Vec<Completion>) -> Result<()> {
        let slot = self.take_slot(r)?;
        out.push(Completion {
            token: slot.token,
            op: slot.op,
            offset: slot.offset,
            len: slot.len,
            result: Self::result_of(&slot, r),
            buf: slot.buf,
        });
        Ok(())
    }

    /// The slot `r` names, taken out of the table and freed.
    #[inline]
    fn take_slot(&mut self, r: Reaped) -> Result<Slot> {
        // The backend is trusted less than the queue's own bookkeeping: a slot id that is out
        // of range or not in flight is reported, never used to index blindly.
        let slot = self
            .slots
            .get_mut(r.slot as usize)
            .and_then(Option::take)
            .ok_or_else(|| Error::BadCompletion {
                backend: self.backend.name(),
                slot: r.slot,
            })?;
        self.free.push(r.slot);
        Ok(slot)
    }

    /// What the operation in `slot` came to, by the backend's report `r`: a read or write
    /// that moved what it asked for by compares alone (a `match` on the failure's kind
    /// compiles to a jump table, an indirect jump per I/O); anything else out of line.
    #[inline]
    fn result_of(slot: &Slot, r: Reaped) -> std::result::Result<u64, IoError> {
        if matches!(r.fail, Fail::None)
            && matches!(slot.op, OpKind::Read | OpKind::Write)
            && r.res >= 0
            && r.res as u64 == slot.len
        {
            return Ok(slot.len);
        }
        Self::result_general(slot, r)
    }

    #[cold]
    #[inline(never)]
    fn result_general(slot: &Slot, r: Reaped) -> std::result::Result<u64, IoError> {
        let fail = |kind| {
            Err(IoError {
                op: slot.op,
                offset: slot.offset,
                len: slot.len,
                kind,
            })
        };
        if let Some(kind) = match r.fail {
            Fail::None => None,
            Fail::Nvme(e) => Some(IoErrorKind::Nvme(e)),
            Fail::TimedOut { after_ms } => Some(IoErrorKind::TimedOut { after_ms }),
            Fail::Reset { fatal } => Some(IoErrorKind::ControllerReset { fatal }),
            Fail::Errno(e) => Some(IoErrorKind::Os(e)),
        } {
            fail(kind)
        } else if r.res < 0 {
            fail(IoErrorKind::Os(-r.res))
        } else {
            let done = r.res as u64;
            match slot.op {
                OpKind::Read | OpKind::Write if done != slot.len => {
                    fail(IoErrorKind::Short { done: done as u32 })
                }
                OpKind::Read | OpKind::Write => Ok(done),
                _ => Ok(slot.len),
            }
        }
    }

    /// Wait for the completion of `token`, stashing others for the next `poll`.
    fn wait_token(&mut self, token: u64) -> Result<Completion> {
        let deadline = Instant::now() + DEFAULT_WAIT;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(DEFAULT_WAIT));
            }
            self.reap(1, Some(left), &mut got)?;
            let mut found = None;
            for c in got.drain(..) {
                if found.is_none() && c.token == token {
                    found = Some(c);
                } else {
                    self.ready.push_back(c);
                }
            }
            if let Some(c) = found {
                return Ok(c);
            }
        }
    }

    /// Blocking read into `buf` at `offset`; returns the filled buffer.
    pub fn read(&mut self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let token = self.private_token();
        self.submit_read(offset, buf, token)?;
        let c = self.wait_token(token)?;
        c.result?;
        Ok(c.buf.expect("read completion carries its buffer"))
    }

    /// Blocking write of `buf` at `offset`; returns the buffer for reuse.
    pub fn write(&mut self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let token = self.private_token();
        self.submit_write(offset, buf, token)?;
        let c = self.wait_token(token)?;
        c.result?;
        Ok(c.buf.expect("write completion carries its buffer"))
    }

    /// Blocking flush.
    pub fn flush(&mut self) -> Result<()> {
        let token = self.private_token();
        self.submit_flush(token)?;
        self.wait_token(token)?.result?;
        Ok(())
    }

    /// Blocking write-zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let token = self.private_token();
        self.submit_write_zeroes(offset, len, token)?;
        self.wait_token(token)?.result?;
        Ok(())
    }

    /// Blocking deallocate (trim).
    pub fn deallocate(&mut self, offset: u64, len: u64) -> Result<()> {
        let token = self.private_token();
        self.submit_deallocate(offset, len, token)?;
        self.wait_token(token)?.result?;
        Ok(())
    }

    /// Blocking helpers use tokens from the top of the space, documented as reserved.
    fn private_token(&self) -> u64 {
        u64::MAX - self.free.len() as u64
    }

    /// Reap every operation in flight (bounded by `timeout`), dropping their buffers.
    /// Returns the number still in flight afterwards.
    pub fn drain(&mut self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        let mut sink = Vec::new();
        while self.in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if self.reap(1, Some(left), &mut sink).is_err() {
                break;
            }
            sink.clear();
        }
        self.in_flight()
    }
}

/// What a [`Queue::wait_each`] handler may do with the queue it is called from: submit,
/// and read the queue's state (through `Deref`). It cannot poll, wait, drop or replace the
/// queue: on SPDK's driver the handler runs inside SPDK's completion callback, where the
/// queue pair and its slot contexts must stay as they are until SPDK returns.
pub struct Submitter<'a> {
    q: &'a mut Queue,
}

impl std::ops::Deref for Submitter<'_> {
    type Target = Queue;
    #[inline]
    fn deref(&self) -> &Queue {
        self.q
    }
}

impl std::fmt::Debug for Submitter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Submitter").field(&*self.q).finish()
    }
}

impl Submitter<'_> {
    /// [`Queue::submit_read`].
    #[inline]
    pub fn submit_read(
        &mut self,
        offset: u64,
        buf: IoBuf,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        self.q.submit_read(offset, buf, token)
    }

    /// [`Queue::submit_write`].
    #[inline]
    pub fn submit_write(
        &mut self,
        offset: u64,
        buf: IoBuf,
        token: u64,
    ) -> std::result::Result<(), Rejected> {
        self.q.submit_write(offset, buf, token)
    }

    /// [`Queue::submit_flush`].
    pub fn submit_flush(&mut self, token: u64) -> Result<()> {
        self.q.submit_flush(token)
    }

    /// [`Queue::submit_write_zeroes`].
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, token: u64) -> Result<()> {
        self.q.submit_write_zeroes(offset, len, token)
    }

    /// [`Queue::submit_deallocate`].
    pub fn submit_deallocate(&mut self, offset: u64, len: u64, token: u64) -> Result<()> {
        self.q.submit_deallocate(offset, len, token)
    }

    /// [`Queue::submit_raw`].
    ///
    /// # Safety
    /// As for [`Queue::submit_raw`].
    pub unsafe fn submit_raw(
        &mut self,
        op: OpKind,
        offset: u64,
        addr: *mut u8,
        len: u64,
        token: u64,
    ) -> Result<()> {
        // SAFETY: the caller's contract is `submit_raw`'s.
        unsafe { self.q.submit_raw(op, offset, addr, len, token) }
    }

    /// [`Queue::submit_fd`].
    ///
    /// # Safety
    /// As for [`Queue::submit_fd`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn submit_fd(
        &mut self,
        op: OpKind,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        addr: *mut u8,
        len: u64,
        token: u64,
        cached: bool,
    ) -> Result<()> {
        // SAFETY: the caller's contract is `submit_fd`'s.
        unsafe { self.q.submit_fd(op, fd, offset, addr, len, token, cached) }
    }
}

impl Queue {
    /// A [`Submitter`] for this queue: the handle a [`Queue::wait_each`] handler gets, for
    /// code that submits both from inside a handler and outside one.
    #[inline]
    pub fn submitter(&mut self) -> Submitter<'_> {
        Submitter { q: self }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let left = self.drain(DEFAULT_WAIT);
        if left > 0 {
            // The kernel (or a worker thread) may still write into these buffers: leak the
            // arena and the in-flight buffers rather than free memory under an active DMA.
            tracing::error!(
                in_flight = left,
                "queue dropped with operations that never completed; leaking their buffers"
            );
            for s in self.slots.iter_mut() {
                if let Some(slot) = s.take() {
                    std::mem::forget(slot.buf);
                }
            }
            std::mem::forget(Rc::clone(&self.arena));
            self.backend.abandon();
        }
    }
}
