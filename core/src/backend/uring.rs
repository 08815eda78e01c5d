//! io_uring backend: O_DIRECT, the queue's arena and its owner's regions (a buffer pool's,
//! also those added while it runs) registered as fixed buffers (READ_FIXED/WRITE_FIXED), the
//! target registered as a fixed file, one `io_uring_enter` per poll batch, optional SQPOLL,
//! IOPOLL on NVMe devices with poll queues.
//!
//! Without SQPOLL the ring is created SINGLE_ISSUER + DEFER_TASKRUN + TASKRUN_FLAG (kernel
//! 6.1+; older kernels fall back to a plain ring): completions are posted only when the owning
//! thread enters with GETEVENTS, and the kernel raises a flag when some are waiting, so a poll
//! with nothing to submit and nothing signalled costs no syscall.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{IoUring, opcode, types};

use super::{RawOp, Reaped};
use crate::error::{Error, Result};
use crate::op::OpKind;

/// Options the engine resolved for a ring.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UringOptions {
    pub sqpoll: Option<u32>,
    pub iopoll: bool,
    /// Submit as soon as this many SQEs are pending (0: only at the next poll or wait).
    pub submit_batch: u32,
}

/// Largest single registered buffer the kernel accepts.
const MAX_REG: usize = 1 << 30;

/// Entries of the fixed-buffer table when it is registered sparse (kernel 5.13+): regions
/// (in pieces of at most 1 GiB) are put in and taken out one by one, while I/O is in flight.
/// The kernel allows 16384; a pool has a handful of regions per core.
const TABLE_SLOTS: usize = 1024;

pub(crate) struct UringQueue {
    ring: IoUring,
    file: File,
    fixed_file: bool,
    /// Registered memory: (start address, length, index of its first fixed buffer). Each
    /// region is registered in pieces of at most 1 GiB.
    fixed_bufs: Vec<(usize, usize, u16)>,
    /// The regions registered at creation (arena first), for re-registration without one of
    /// them; used only when the table is not sparse.
    registered: Vec<(usize, usize)>,
    /// The fixed-buffer table is sparse: regions go in and out one by one (which entries are
    /// taken follows from `fixed_bufs`). Not on an old kernel: there the regions given at
    /// creation are registered in one go, and regions added later are used unregistered.
    sparse: bool,
    /// SQEs pushed and not yet handed to the kernel.
    pending: u32,
    submit_batch: u32,
    iopoll: bool,
    /// Completions of operations done inline (non-read/write ops on an IOPOLL ring).
    inline_done: Vec<Reaped>,
    abandoned: bool,
    /// The owner's wake-up eventfd, if it set one (see [`UringQueue::arm_wake`]).
    wake: Option<Wake>,
}

/// A read of an eventfd kept in the ring while its owner blocks for completions, so that
/// another thread can cut the wait short by signalling the eventfd.
struct Wake {
    fd: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Where the kernel puts the counter (8 bytes, heap: it must not move while armed).
    buf: *mut u64,
    armed: bool,
}

/// `user_data` of the wake-up read: never a slot (slots are u32).
const WAKE_TOKEN: u64 = u64::MAX;

/// What the ring ended up with, for the log.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct UringFeatures {
    pub fixed_buffers: bool,
    pub fixed_file: bool,
    pub sqpoll: bool,
    pub iopoll: bool,
    pub defer_taskrun: bool,
}

impl UringQueue {
    /// Build a ring for `depth` operations over `file`, registering `regions` (base, len: the
    /// queue's arena, and any memory the caller added) as fixed buffers.
    /// The `io::Error` of `io_uring_setup` is returned as is so the caller can decide whether
    /// it is a refusal (fall back) or a failure.
    pub fn new(
        file: File,
        regions: &[(*mut u8, usize)],
        depth: u32,
        opts: UringOptions,
    ) -> std::io::Result<(UringQueue, UringFeatures)> {
        let entries = depth.next_power_of_two().max(8);
        let build = |defer: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(entries * 2);
            if let Some(idle) = opts.sqpoll {
                b.setup_sqpoll(idle);
            } else if defer {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }
            if opts.iopoll {
                b.setup_iopoll();
            }
            b.build(entries)
        };
        let (ring, defer) = match build(opts.sqpoll.is_none()) {
            Ok(r) => (r, opts.sqpoll.is_none()),
            // EINVAL: a kernel older than 6.1 that lacks DEFER_TASKRUN.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && opts.sqpoll.is_none() => {
                (build(false)?, false)
            }
            Err(e) => return Err(e),
        };
        let mut feats = UringFeatures {
            sqpoll: opts.sqpoll.is_some(),
            iopoll: opts.iopoll,
            defer_taskrun: defer,
            ..Default::default()
        };
        let fixed_file = ring.submitter().register_files(&[file.as_raw_fd()]).is_ok();
        feats.fixed_file = fixed_file;
        let mut q = UringQueue {
            ring,
            file,
            fixed_file,
            fixed_bufs: Vec::new(),
            registered: regions.iter().map(|&(b, l)| (b as usize, l)).collect(),
            sparse: false,
            pending: 0,
            submit_batch: opts.submit_batch,
            iopoll: opts.iopoll,
            inline_done: Vec::new(),
            abandoned: false,
            wake: None,
        };
        let pieces: usize = q.registered.iter().map(|&(_, l)| l.div_ceil(MAX_REG)).sum();
        if pieces <= TABLE_SLOTS
            && q.ring
                .submitter()
                .register_buffers_sparse(TABLE_SLOTS as u32)
                .is_ok()
        {
            q.sparse = true;
            for (base, len) in q.registered.clone() {
                // SAFETY: the queue's arena and the regions its owner gave, which are kept
                // alive for as long as this ring exists (the Queue owns the arena and drops
                // the ring first; the regions are the caller's contract; an abandoned queue
                // leaks the arena).
                if let Err(e) = unsafe { q.register_region(base, len) } {
                    tracing::warn!(error = %e, "io_uring: cannot register a buffer region; its I/O goes unregistered");
                }
            }
        } else {
            let (iovecs, table) = iovec_table(q.registered.iter().copied());
            // SAFETY: as above.
            match unsafe { q.ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => q.fixed_bufs = table,
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring: cannot register buffers; using unregistered I/O")
                }
            }
        }
        feats.fixed_buffers = !q.fixed_bufs.is_empty();
        Ok((q, feats))
    }

    /// Put `[base, base+len)` in free entries of the sparse fixed-buffer table (pieces of at
    /// most 1 GiB, consecutive entries).
    ///
    /// # Safety
    /// The memory must stay mapped until it is taken out ([`UringQueue::remove_region`]) or
    /// the ring is dropped.
    unsafe fn register_region(&mut self, base: usize, len: usize) -> std::io::Result<()> {
        let (iovecs, _) = iovec_table(std::iter::once((base, len)));
        let n = iovecs.len();
        if n == 0 {
            return Ok(()); // an empty region: nothing to register
        }
        // The first run of `n` free entries: at 0 or right after a registered region.
        let taken = |i: usize| {
            self.fixed_bufs.iter().any(|&(_, l, f)| {
                let f = f as usize;
                i < f + l.div_ceil(MAX_REG) && f < i + n
            })
        };
        let first = std::iter::once(0)
            .chain(
                self.fixed_bufs
                    .iter()
                    .map(|&(_, l, f)| f as usize + l.div_ceil(MAX_REG)),
            )
            .filter(|&i| i + n <= TABLE_SLOTS && !taken(i))
            .min()
            .ok_or_else(|| std::io::Error::other("the fixed-buffer table is full"))?;
        // SAFETY: the caller keeps the memory mapped while it is registered.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(first as u32, &iovecs, None)?
        };
        self.fixed_bufs.push((base, len, first as u16));
        Ok(())
    }

    /// A region the owner added after creation (a pool that grew): registered in the sparse
    /// table, so its I/O uses fixed buffers too (no page pinning per O_DIRECT operation). On
    /// an old kernel (no sparse table), a full table or a refusal (RLIMIT_MEMLOCK), its I/O
    /// stays unregistered: slower, never wrong.
    ///
    /// # Safety
    /// As for [`UringQueue::register_region`].
    pub unsafe fn add_region(&mut self, ptr: *mut u8, len: usize) {
        let base = ptr as usize;
        if !self.sparse || self.fixed_bufs.iter().any(|&(b, _, _)| b == base) {
            return;
        }
        // SAFETY: caller contract.
        if let Err(e) = unsafe { self.register_region(base, len) } {
            tracing::debug!(error = %e, len, "io_uring: a new buffer region stays unregistered");
        }
    }

    /// Let `fd` (an eventfd) interrupt blocking waits: see [`UringQueue::arm_wake`]. Not on an
    /// IOPOLL ring (it takes only reads and writes of polled files).
    pub fn set_wake_fd(&mut self, fd: std::sync::Arc<std::os::fd::OwnedFd>) -> bool {
        if self.iopoll || self.wake.is_some() {
            return false;
        }
        self.wake = Some(Wake {
            fd,
            buf: Box::into_raw(Box::new(0u64)),
            armed: false,
        });
        true
    }

    /// Make sure a read of the wake-up eventfd is queued, so that a blocking wait returns
    /// when another thread signals it. Returns false when there is no wake-up fd or no room
    /// in the submission queue (the caller must not block then).
    pub fn arm_wake(&mut self) -> bool {
        let Some(w) = &mut self.wake else {
            return false;
        };
        if w.armed {
            return true;
        }
        let sqe = opcode::Read::new(types::Fd(w.fd.as_raw_fd()), w.buf.cast(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: the 8-byte target is heap memory owned by this queue, freed only after the
        // read completed (or leaked with the ring, see Drop); the eventfd is kept open by the
        // Arc held here.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return false;
        }
        w.armed = true;
        self.pending += 1;
        true
    }

    /// Stop using a region (a pool gave it back). The caller (`Queue::remove_region`) has
    /// checked that nothing is in flight. A sparse table empties the region's entries; a
    /// table registered in one go is registered again without it.
    pub fn remove_region(&mut self, ptr: *mut u8) {
        let base = ptr as usize;
        if self.sparse {
            let Some(i) = self.fixed_bufs.iter().position(|&(b, _, _)| b == base) else {
                return; // never registered: nothing to do
            };
            // Never used again whatever the kernel says: the owner may unmap the memory and map
            // another region at the same address, which must not meet a stale entry.
            let (_, len, first) = self.fixed_bufs.remove(i);
            let n = len.div_ceil(MAX_REG);
            let empty = vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                n
            ];
            // SAFETY: empty entries (a null base and length) register no memory.
            if let Err(e) = unsafe {
                self.ring
                    .submitter()
                    .register_buffers_update(first as u32, &empty, None)
            } {
                // The kernel keeps its pin on the old pages until the entries are overwritten
                // (a later region may take them) or the ring is dropped; rio no longer
                // refers to them.
                tracing::warn!(error = %e, "io_uring: cannot unregister a buffer region");
            }
            return;
        }
        let Some(i) = self.registered.iter().position(|&(b, _)| b == base) else {
            return; // never registered (added later): nothing to do
        };
        self.registered.remove(i);
        let _ = self.ring.submitter().unregister_buffers();
        let (iovecs, table) = iovec_table(self.registered.iter().copied());
        // SAFETY: the remaining regions are the arena and regions the owner still keeps alive
        // (contract of `Engine::queue_with_regions`).
        self.fixed_bufs = match unsafe { self.ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => table,
            Err(e) => {
                tracing::warn!(error = %e, "io_uring: re-registering buffers failed; using unregistered I/O");
                Vec::new()
            }
        };
    }

    /// Regions registered as fixed buffers.
    pub fn registered_regions(&self) -> usize {
        self.fixed_bufs.len()
    }

    /// Index of the registered buffer that holds `[addr, addr+len)`, if any.
    #[inline]
    fn buf_index(&self, addr: *mut u8, len: u64) -> Option<u16> {
        for &(base, blen, first) in &self.fixed_bufs {
            let Some(a) = (addr as usize).checked_sub(base) else {
                continue;
            };
            let end = a + len as usize;
            if end > blen {
                continue;
            }
            let idx = a / MAX_REG;
            return (idx == (end - 1) / MAX_REG).then_some(first + idx as u16);
        }
        None
    }

    /// The registered buffer for `op`'s data, unless the data goes through the page cache:
    /// the kernel then copies it, and copies to or from a registered buffer (a bvec: a
    /// `memcpy` per page) ran ~1.4x slower than to a user address (`copy_to_user`) here
    /// (a 516 KiB cached read: 140 against 100 µs).
    #[inline]
    fn fixed_index(&self, op: &RawOp) -> Option<u16> {
        if op.cached {
            None
        } else {
            self.buf_index(op.addr, op.len)
        }
    }

    #[inline]
    pub fn push(&mut self, slot: u32, op: &RawOp) -> Result<()> {
        if self.iopoll && !matches!(op.op, OpKind::Read | OpKind::Write) {
            // An IOPOLL ring accepts only reads and writes: do the rest synchronously.
            let res = self.inline(op);
            self.inline_done.push(Reaped::ok(slot, res));
            return Ok(());
        }
        let raw = self.file.as_raw_fd();
        macro_rules! build {
            ($fd:expr) => {{
                let fd = $fd;
                match op.op {
                    OpKind::Read => match self.fixed_index(op) {
                        Some(i) => opcode::ReadFixed::new(fd, op.addr, op.len as u32, i)
                            .offset(op.offset)
                            .build(),
                        None => opcode::Read::new(fd, op.addr, op.len as u32)
                            .offset(op.offset)
                            .build(),
                    },
                    OpKind::Write => match self.fixed_index(op) {
                        Some(i) => opcode::WriteFixed::new(fd, op.addr, op.len as u32, i)
                            .offset(op.offset)
                            .build(),
                        None => opcode::Write::new(fd, op.addr, op.len as u32)
                            .offset(op.offset)
                            .build(),
                    },
                    OpKind::Flush => opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                    OpKind::WriteZeroes => opcode::Fallocate::new(fd, op.len)
                        .offset(op.offset)
                        .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                        .build(),
                    OpKind::Deallocate => opcode::Fallocate::new(fd, op.len)
                        .offset(op.offset)
                        .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                        .build(),
                }
            }};
        }
        let sqe = if op.fd >= 0 {
            build!(types::Fd(op.fd))
        } else if self.fixed_file {
            build!(types::Fixed(0))
        } else {
            build!(types::Fd(raw))
        }
        .user_data(slot as u64);
        // SAFETY: the SQE's buffer (if any) is the arena memory of a buffer the Queue holds in
        // its in-flight table until this slot's CQE is reaped; the file is owned by self, or
        // is a caller's file kept open until then (contract of `Queue::submit_fd`).
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| Error::QueueFull {
            depth: self.ring.params().sq_entries(),
        })?;
        self.pending += 1;
        if self.submit_batch > 0 && self.pending >= self.submit_batch {
            // Hand a full batch to the kernel now rather than at the next poll.
            enter_result(self.ring.submit())?;
            self.pending = self.ring.submission().len() as u32;
        }
        Ok(())
    }

    /// SQEs gathered before `io_uring_enter` (0: only at the next poll or wait).
    pub fn submit_batch(&self) -> u32 {
        self.submit_batch
    }

    pub fn set_submit_batch(&mut self, n: u32) {
        self.submit_batch = n.min(self.ring.params().sq_entries());
    }

    fn inline(&self, op: &RawOp) -> i32 {
        use std::os::fd::{AsFd, BorrowedFd};
        let fd = if op.fd >= 0 {
            // SAFETY: the queue's owner keeps a caller's file open until this operation's
            // completion is reaped (contract of `Queue::submit_fd`), which is after this call.
            unsafe { BorrowedFd::borrow_raw(op.fd) }
        } else {
            self.file.as_fd()
        };
        let r = match op.op {
            OpKind::Flush => rio_sys::io::fdatasync(fd),
            OpKind::WriteZeroes => rio_sys::io::fallocate(
                fd,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                op.offset,
                op.len,
            ),
            OpKind::Deallocate => rio_sys::io::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                op.offset,
                op.len,
            ),
            OpKind::Read | OpKind::Write => unreachable!("reads and writes go through the ring"),
        };
        match r {
            Ok(()) => 0,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    #[inline]
    pub fn reap(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Reaped>,
    ) -> Result<bool> {
        out.append(&mut self.inline_done);
        let start = out.len();
        let want = want.saturating_sub(out.len() as u32);
        let must_enter = {
            let sq = self.ring.submission();
            self.pending > 0 || sq.taskrun() || sq.cq_overflow()
        } || self.iopoll
            || want > 0;
        let mut waited = true;
        if must_enter {
            let sub = self.ring.submitter();
            let r = match (want, timeout) {
                (0, _) => sub.submit(),
                (w, Some(t)) => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    sub.submit_with_args(w as usize, &args)
                }
                (w, None) => sub.submit_and_wait(w as usize),
            };
            waited = enter_result(r)?;
            self.pending = self.ring.submission().len() as u32;
        }
        for cqe in self.ring.completion() {
            if cqe.user_data() == WAKE_TOKEN {
                // The owner was woken (or the read failed): re-armed before its next wait.
                if let Some(w) = &mut self.wake {
                    w.armed = false;
                }
                continue;
            }
            out.push(Reaped::ok(cqe.user_data() as u32, cqe.result()));
        }
        // A wait with a timeout that ended short: the timeout passed (the kernel reports
        // ETIME only when the call submitted nothing, so that is not a test) or a signal
        // came; either way the caller should not wait again. Not when the call did not wait
        // (completions to reap first), nor on an IOPOLL ring, whose wait ignores the timeout
        // and may return early: the caller keeps its deadline.
        Ok(waited
            && !self.iopoll
            && want > 0
            && timeout.is_some()
            && ((out.len() - start) as u32) < want)
    }

    pub fn abandon(&mut self) {
        self.abandoned = true;
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        if self.abandoned {
            // Closing the ring makes the kernel cancel and wait for its requests in a worker;
            // the buffers they target are leaked by the queue, so nothing is freed under them.
            tracing::debug!("dropping io_uring with requests outstanding");
        }
        if let Some(w) = &self.wake
            && !w.armed
        {
            // SAFETY: `buf` came from Box::into_raw and no read targets it (not armed).
            drop(unsafe { Box::from_raw(w.buf) });
        }
        // An armed read is cancelled when the ring closes: its 8 bytes are leaked rather
        // than freed under it.
    }
}

/// Map an `io_uring_enter` result to whether the call's wait is over: ETIME (a wait timed
/// out), EINTR (a signal such as Ctrl-C: the wait ends early, the caller re-checks its stop
/// flag) and EAGAIN (no resources now) are not failures, and end the wait; EBUSY (completions
/// must be reaped before more can be submitted; SQEs stay queued) is not one either, but the
/// call did not wait, and its caller, having reaped, may wait again.
fn enter_result(r: std::io::Result<usize>) -> Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EAGAIN)
            ) =>
        {
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(e) => Err(Error::Os {
            op: "io_uring_enter",
            path: "io_uring".into(),
            source: e,
        }),
    }
}

/// Probe: can this process create an io_uring at all? Returns the setup error if not.
pub(crate) fn probe() -> std::io::Result<()> {
    IoUring::new(2).map(drop)
}

/// Whether `fd` for block device `name` supports polled I/O (nvme with poll queues).
pub(crate) fn device_has_poll_queues(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/block/{name}/queue/io_poll"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

/// The iovecs registering `regions` (each in pieces of at most 1 GiB) and the lookup table of
/// (start, length, index of the first piece).
fn iovec_table(
    regions: impl Iterator<Item = (usize, usize)>,
) -> (Vec<libc::iovec>, Vec<(usize, usize, u16)>) {
    let mut iovecs: Vec<libc::iovec> = Vec::new();
    let mut table = Vec::new();
    for (base, len) in regions {
        table.push((base, len, iovecs.len() as u16));
        iovecs.extend((0..len.div_ceil(MAX_REG)).map(|i| libc::iovec {
            iov_base: (base + i * MAX_REG) as *mut libc::c_void,
            iov_len: (len - i * MAX_REG).min(MAX_REG),
        }));
    }
    (iovecs, table)
}
