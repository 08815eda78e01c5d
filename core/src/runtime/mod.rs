//! The embedding runtime: one pinned poller thread per configured core, each owning that core's
//! queue and buffer pool; any thread (tokio tasks included) submits through a per-core lock-free
//! inbox and gets a runtime-agnostic future (a `Waker`, no executor dependency).
//!
//! ```text
//!  task ──IoFuture──► inbox[core] (ArrayQueue) ──► poller(core): Queue::submit_raw ──► device
//!    ▲                                                   │ poll
//!    └──── waker.wake() ◄── slot[token] ◄────────────────┘
//! ```
//!
//! - Requests live in a per-core slab of slots allocated once; a future holds a slot index and
//!   its epoch. No heap allocation per I/O.
//! - The buffer (a [`PoolBuf`]) travels with the request; the poller keeps it until the
//!   completion is reaped. A future dropped while its I/O is in flight marks the slot
//!   abandoned: the poller then drops the buffer (home to its pool) and frees the slot.
//! - Submissions are batched: the poller takes everything waiting in the inbox, then polls once.
//! - Idle policy: busy-poll, or sleep after N empty polls (`IdlePolicy`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::op::OpKind;
use crate::pool::{PoolBuf, PoolConfig, Pools};
use crate::queue::{Completion, Queue};

mod file;
mod files;
mod task;
pub use file::DiskFile;
pub use files::{Files, InlineReads, OpenFile, ReadBytes, SeqWriter};
pub use task::{JoinError, JoinHandle, Panic};

/// What a poller does when a poll found nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin: lowest latency, a full core per poller.
    BusyPoll,
    /// After `polls` empty polls with nothing in flight, park until woken by a submission
    /// (or `max_sleep` passes).
    SleepAfter { polls: u32, max_sleep: Duration },
    /// After `spin` empty polls, sleep even with I/O in flight: parked when nothing is in
    /// flight (as `SleepAfter`), otherwise blocked in the kernel until a completion arrives,
    /// a submission comes in (the submitter signals an eventfd the ring is reading), or
    /// `max_sleep` passes. For hosts whose I/Os are long against a poll (a file server's
    /// reads of hundreds of microseconds) and whose CPUs have other work: a spinning poller
    /// takes a core from them. Where the backend cannot block so (psync, the userspace
    /// drivers), the poller spins while I/O is in flight, as `SleepAfter` does.
    Block { spin: u32, max_sleep: Duration },
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy::SleepAfter {
            polls: 10_000,
            max_sleep: Duration::from_millis(1),
        }
    }
}

/// Configuration of a [`Runtime`].
#[derive(Clone)]
pub struct RuntimeConfig {
    /// OS CPU numbers to run pollers on (default: every CPU `core_affinity` reports, capped at
    /// 4; for a `sim://` target, every CPU but the model's).
    pub cores: Option<Vec<usize>>,
    /// Operations in flight per core (1 to [`MAX_DEPTH`]).
    pub depth: u32,
    pub idle: IdlePolicy,
    pub pool: PoolConfig,
    /// Read-ahead for `DiskFile` streams (on by default; see [`crate::tune::prefetch`]).
    pub prefetch: crate::tune::PrefetchConfig,
    /// p99 latency target. With one, each poller runs a queue-depth tuner
    /// ([`crate::tune::qd`]) that caps its in-flight depth within `1..=depth` (requests over
    /// the cap wait in the inbox), and [`Runtime::recommendations`] reports what it learned.
    pub target_p99: Option<Duration>,
    /// Each poller's 100 ms windows (latency histograms, counts, depth in force) and failed
    /// I/Os go here: e.g. `rio_otel::Telemetry::sink` (crate `rio-otel`), to export
    /// the runtime's metrics. `job` in a window is the poller's position.
    pub sink: Option<Arc<dyn crate::window::WindowSink + Send>>,
    /// The run-to-completion API: with a handler, [`Runtime::submit_tagged`] operations
    /// complete by a call of it on the poller thread (no future, no wake-up of another
    /// thread), and the handler may submit more through its [`Resubmit`] without a trip
    /// through the inbox. One poll completes many I/Os in one go.
    pub on_complete: Option<CompletionHandler>,
}

/// A finished [`Runtime::submit_tagged`] operation, as its handler receives it.
#[derive(Debug)]
pub struct Done {
    /// The tag given at submission.
    pub tag: u64,
    /// Bytes transferred, or why it failed (a short transfer is an error, as for futures).
    pub result: Result<u64>,
    /// The operation's buffer, back (nothing is lost).
    pub buf: Option<PoolBuf>,
}

/// Handler of the run-to-completion API ([`RuntimeConfig::on_complete`]). It runs on a
/// poller thread, between polls: it should be short and must not block (a slow handler
/// delays every completion of its core).
pub type CompletionHandler = Arc<dyn Fn(Done, &mut Resubmit<'_>) + Send + Sync>;

/// Submission from inside a [`CompletionHandler`]: the operation goes straight to this
/// poller's queue (no inbox, no wake-up), on this core: written to the queue before the
/// handler returns, sent to the device with the poller's next poll (or earlier, when a
/// submission batch fills), as the operations of a direct [`Queue`] user are; when the depth
/// cap in force is reached, it waits for the poller's next submissions instead.
pub struct Resubmit<'a> {
    cs: &'a CoreShared,
    local: &'a mut std::collections::VecDeque<Request>,
    /// Slots of tagged operations that completed in this poll, kept on the poller: a
    /// resubmission takes one of these first (no atomic), the shared free list only after.
    free: &'a mut Vec<u32>,
    stop: bool,
    /// The poller's queue and what it needs to submit at once (None: defer to `local`).
    now: Option<Direct<'a>>,
}

/// What [`Resubmit`] needs to hand an operation to the queue itself.
struct Direct<'a> {
    poller: &'a Poller,
    q: &'a mut Queue,
    inflight: &'a mut [Held],
    dones: &'a mut Vec<Done>,
    regions: &'a mut (u64, usize),
    limit: u32,
    /// Slots submitted here, when metering: stamped with one clock read once the poll's
    /// handlers have run (the device gets them with the next poll, as the inbox's).
    stamp: Option<&'a mut Vec<u32>>,
}

impl Resubmit<'_> {
    /// Submit `op` on this core, completing through the handler with `tag`. Refused (the
    /// buffer handed back) when the runtime is shutting down, when no slot is free, or when
    /// the buffer belongs to another core's pool. `Ok` means taken, not yet accepted by the
    /// queue: an operation the queue refuses (out of range, say) comes back to the handler
    /// as a failed [`Done`] with its buffer, after this poll's completions were handled.
    pub fn submit(
        &mut self,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
        tag: u64,
    ) -> std::result::Result<(), Box<IoFailure>> {
        if self.stop {
            return Err(IoFailure::new(shut_down(), buf));
        }
        if let Some(b) = &buf
            && b.home_core() != self.cs.core
        {
            return Err(IoFailure::new(
                Error::BufferUnavailable {
                    requested: b.len(),
                    reason: format!(
                        "a handler on core {} resubmits on its own core; this buffer belongs to core {}",
                        self.cs.core,
                        b.home_core()
                    ),
                },
                buf,
            ));
        }
        let Some(slot) = self.free.pop().or_else(|| self.cs.free.pop()) else {
            return Err(IoFailure::new(
                Error::QueueFull {
                    depth: self.cs.slots.len() as u32,
                },
                buf,
            ));
        };
        match &mut self.now {
            // Straight to the queue (no `Request` built and moved: this runs once per I/O).
            // A failure at submission reaches the handler later, as a `Done` (as for a
            // deferred one).
            Some(d) if d.q.in_flight() < d.limit => {
                let (generation, known) = &mut *d.regions;
                d.poller.sync_regions(d.q, generation, known);
                if let Some(stamp) = &mut d.stamp {
                    stamp.push(slot);
                }
                let mut buf = buf;
                let (addr, len) = data_of(&mut buf, op, len);
                // SAFETY: the buffer is kept in `inflight` (owned by this poller) until the
                // completion of this slot is reaped; it lies in a pool region the queue maps
                // (`sync_regions` above added any new one).
                match unsafe { d.q.submit_raw(op, offset, addr, len, slot as u64) } {
                    Ok(()) => d.inflight[slot as usize].hold(buf, None, Some(tag)),
                    Err(e) => {
                        let _ = self.cs.free.push(slot);
                        d.dones.push(Done {
                            tag,
                            result: Err(e),
                            buf,
                        });
                    }
                }
            }
            _ => self.local.push_back(Request {
                op,
                offset,
                len,
                buf,
                slot,
                file: None,
                cached: false,
                tag: Some(tag),
            }),
        }
        Ok(())
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cores: None,
            depth: 128,
            idle: IdlePolicy::default(),
            pool: PoolConfig::default(),
            prefetch: crate::tune::PrefetchConfig::default(),
            target_p99: None,
            sink: None,
            on_complete: None,
        }
    }
}

/// The most operations in flight per core a runtime takes (an NVMe queue's largest size);
/// it also keeps slot numbers within the 31 bits a future's word has for them.
pub const MAX_DEPTH: u32 = 65536;
const _: () = assert!((MAX_DEPTH as usize) * 4 <= 1 << 31);

/// The longest an idle poller sleeps while a future on its thread waits for a free slot.
const SLOT_WAIT_NAP: Duration = Duration::from_micros(100);

/// How often an idle poller runs pool maintenance.
const MAINTAIN_EVERY: Duration = Duration::from_millis(100);

const FREE: u8 = 0;
const PENDING: u8 = 1;
const DONE: u8 = 2;
const ABANDONED: u8 = 3;

/// One request's rendezvous between a future and a poller. Cache-line aligned: the poller
/// completes one slot while the submitter polls the next.
#[repr(align(128))]
struct Slot {
    state: AtomicU8,
    /// Bumped each time the slot is reused: a stale future never sees a newer request.
    epoch: AtomicU32,
    /// Written by the poller while the slot is PENDING (or ABANDONED), read by the future once
    /// it saw DONE: the state's release/acquire hand-over makes the accesses exclusive.
    result: std::cell::UnsafeCell<SlotResult>,
    /// Lock-free registration (the `atomic-waker` crate, as in futures and smol), for a
    /// future polled off the poller's thread.
    waker: atomic_waker::AtomicWaker,
    /// A future polled off the poller's thread registered in `waker` (set before it
    /// registers, SeqCst, and read SeqCst by the poller after it published DONE: one of the
    /// two sees the other). Reset when the slot is armed again.
    remote: AtomicBool,
    /// The waker of a future polled on the poller's own thread (a task): touched only by
    /// that thread, so registering and waking take no atomic operation, and it is kept
    /// across reuses of the slot (the next registration of the same task clones nothing).
    /// A stale one only causes a spurious wake.
    local_waker: std::cell::UnsafeCell<Option<std::task::Waker>>,
    /// The slot serves a [`LocalIo`]: every access to it is on the poller's thread, so its
    /// state moves with plain stores (no compare-and-swap against a drop elsewhere).
    local_only: AtomicBool,
}

/// A slot's result, stored whole in its final layout. The poller writes it when the I/O
/// completes; the future reads it back, in a later poll, as one aligned copy of the whole
/// value. The copies that follow (the future's `Poll`, the caller's `await`, `match` and
/// destructuring) move it with the same wide, aligned accesses, so each load finds one store
/// to forward from. Built from its parts on the future's side instead (field by field, or
/// `Option::take`'s copy of the bytes after the tag), every such hop was a store-forwarding
/// stall: a wide load spanning several narrow stores (perf annotate, a task's `poll`).
struct SlotResult {
    out: std::mem::MaybeUninit<IoOutput>,
    /// `out` holds a value (set, not yet taken or cleared).
    full: bool,
}

impl Default for SlotResult {
    fn default() -> Self {
        SlotResult {
            out: std::mem::MaybeUninit::uninit(),
            full: false,
        }
    }
}

impl SlotResult {
    #[inline(always)]
    fn set(&mut self, res: Result<u64>, buf: Option<PoolBuf>) {
        debug_assert!(!self.full, "a slot's result is set once per use");
        self.out.write(match res {
            Ok(n) => Ok((n, buf)),
            Err(e) => Err(IoFailure::new(e, buf)),
        });
        self.full = true;
    }

    #[inline(always)]
    fn take(&mut self) -> IoOutput {
        assert!(self.full, "a slot's result is taken once, after it was set");
        self.full = false;
        // SAFETY: `full` said `out` holds a value; it is marked empty above, so it is read
        // (moved out) exactly once.
        unsafe { self.out.assume_init_read() }
    }

    /// Drop what it holds (the buffer goes home).
    fn clear(&mut self) {
        if std::mem::take(&mut self.full) {
            // SAFETY: `full` said `out` holds a value, and it is now marked empty.
            unsafe { self.out.assume_init_drop() };
        }
    }
}

impl Drop for SlotResult {
    fn drop(&mut self) {
        self.clear();
    }
}

struct Request {
    op: OpKind,
    offset: u64,
    len: u64,
    buf: Option<PoolBuf>,
    slot: u32,
    /// A host file instead of the runtime's target (a [`Files`] runtime): held by the poller
    /// until the completion is reaped, so it cannot be closed under the kernel.
    file: Option<Arc<std::os::fd::OwnedFd>>,
    /// `file` is open without O_DIRECT (see `Queue::submit_fd`).
    cached: bool,
    /// A run-to-completion operation: completes through the handler with this tag.
    tag: Option<u64>,
}

// SAFETY: a Slot's `result` is accessed by one side at a time, handed over through `state`
// (see `result`); `local_waker` only by the core's poller thread (every access checks
// `on_poller` first or runs in the poller itself); everything else in it is Sync.
unsafe impl Sync for Slot {}

/// What a core's submitters and its poller share.
struct CoreShared {
    core: usize,
    slots: Box<[Slot]>,
    free: crossbeam_queue::ArrayQueue<u32>,
    inbox: crossbeam_queue::ArrayQueue<Request>,
    sleeping: AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
    /// The poller waits in the kernel for completions (`IdlePolicy::Block`); a submitter that
    /// clears this signals `wake_fd`.
    in_kernel: AtomicBool,
    /// The eventfd the poller's ring reads while it waits in the kernel.
    wake_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// The core's depth tuner (with a p99 target): the poller locks it once per window.
    tuner: Option<Mutex<crate::tune::QdTuner>>,
    /// Where the poller's windows go (telemetry), if anywhere.
    sink: Option<Arc<dyn crate::window::WindowSink + Send>>,
    /// Position of this core in the runtime (the windows' `job`).
    index: u32,
    /// The run-to-completion handler, if configured.
    on_complete: Option<CompletionHandler>,
    /// Tasks spawned on this core's poller ([`Runtime::spawn`]).
    tasks: task::CoreTasks,
    /// What has been failed on this core since its poller died, shared by the poller's own
    /// exit (`PollerExit::fail_what_waits`) and futures that find the core closed
    /// (`fail_late`). Never touched while the poller lives.
    dead: std::sync::Mutex<DeadCore>,
}

/// [`CoreShared::dead`]: which arming of each slot has been claimed for failing, so that
/// every waiting operation is completed exactly once, by whoever claimed it, outside the
/// lock (completing wakes wakers: no user code runs under it).
#[derive(Default)]
struct DeadCore {
    /// The exit has drained the inbox and scanned the slots.
    drained: bool,
    /// The poller ended by a panic (else by shutdown): which error the failed get.
    panicked: bool,
    /// Per slot, the epoch of the arming last claimed (empty until the exit).
    claimed: Vec<Option<u32>>,
}

impl DeadCore {
    /// Claims `slot` for failing if it waits (PENDING, or ABANDONED by its future) and this
    /// arming of it was not claimed already. The epoch is read on both sides of the state, so
    /// the state read belongs to that arming: a slot completed by another claimer, freed and
    /// taken again by a late submitter meanwhile is not claimed under its old arming.
    fn claim(&mut self, cs: &CoreShared, slot: u32) -> bool {
        let s = &cs.slots[slot as usize];
        let epoch = s.epoch.load(Ordering::SeqCst);
        // SeqCst: pairs with a remote submission's SeqCst arming (`arm_remote`) and its
        // future's SeqCst look at `closed` (see `fail_late`).
        let waiting = matches!(s.state.load(Ordering::SeqCst), PENDING | ABANDONED);
        if !waiting || s.epoch.load(Ordering::SeqCst) != epoch {
            return false;
        }
        let c = &mut self.claimed[slot as usize];
        if *c == Some(epoch) {
            return false;
        }
        *c = Some(epoch);
        true
    }

    /// Claims every slot still waiting (PENDING, or ABANDONED by its future). `LocalIo`
    /// slots only on the dead poller's own thread (`on_poller_thread`): their wakers are
    /// that thread's.
    fn claim_waiting(&mut self, cs: &CoreShared, on_poller_thread: bool, out: &mut Vec<u32>) {
        for (slot, s) in cs.slots.iter().enumerate() {
            if !on_poller_thread && s.local_only.load(Ordering::Relaxed) {
                continue;
            }
            if self.claim(cs, slot as u32) {
                out.push(slot as u32);
            }
        }
    }
}

thread_local! {
    /// The core whose poller runs on this thread (null elsewhere): code on a poller thread
    /// submits to that poller without the inbox.
    static ON_POLLER: std::cell::Cell<*const CoreShared> =
        const { std::cell::Cell::new(std::ptr::null()) };
    /// While the poller on this thread runs its tasks: its queue and tables, for their
    /// submissions to go straight to the queue (null otherwise).
    static TASK_DIRECT: std::cell::Cell<*const TaskDirect> =
        const { std::cell::Cell::new(std::ptr::null()) };
}

/// A poller's tasks, closed when its loop ends however it ends: a panic that unwinds the
/// loop (a run-to-completion handler's) must not leave the core open to spawns that no
/// poller will run, nor `TASK_DIRECT` pointing into the dead loop's stack.
struct PollerExit<'a> {
    cs: &'a CoreShared,
    tasks: task::Tasks,
    /// What tasks and handlers handed over above the depth cap, fed to the queue in turn
    /// with the inbox.
    local: std::collections::VecDeque<Request>,
}

impl Drop for PollerExit<'_> {
    fn drop(&mut self) {
        TASK_DIRECT.with(|c| c.set(std::ptr::null()));
        // After a shutdown nothing should wait here, but a submission from another thread
        // that passed the runtime's `stop` check just before the loop's last look at the
        // inbox would wait forever.
        self.fail_what_waits(std::thread::panicking());
        // Drops every task left (a panic in one's drop is caught and reported).
        self.tasks.close(self.cs);
        ON_POLLER.with(|c| c.set(std::ptr::null()));
    }
}

impl PollerExit<'_> {
    /// The loop ended, by a shutdown or unwinding (`panicked`: a run-to-completion handler
    /// panicked): no poll will complete anything any more. Every future still waiting on
    /// this core gets an error instead of waiting forever: requests not yet sent with their
    /// buffers, operations in flight without them (the device may still write into those:
    /// the in-flight table leaks them). A submission racing this is caught by its own
    /// future (`fail_late`).
    #[cold]
    fn fail_what_waits(&mut self, panicked: bool) {
        let cs = self.cs;
        // New submissions to this core fail from now on (`submit` checks it), and a future
        // armed after the scan below finds the core closed when it polls (`fail_late`).
        cs.tasks.mark_closed();
        let mut with_buf = Vec::new();
        let mut slots = Vec::new();
        let mut dropped = Vec::new();
        let panicked = {
            let mut dead = cs.dead.lock().unwrap_or_else(|p| p.into_inner());
            dead.claimed = vec![None; cs.slots.len()];
            dead.panicked = panicked;
            // SAFETY: the poller's own thread (this guard lives on its stack), the only one
            // that touches `reqs`; no reference into it is live while the loop unwinds.
            let reqs = std::mem::take(unsafe { &mut *cs.tasks.reqs.get() });
            let waiting = self.local.drain(..).chain(reqs);
            // Each request here was armed before the poller took it or stopped: its slot
            // waits for exactly this request.
            for req in waiting.chain(std::iter::from_fn(|| cs.inbox.pop())) {
                match req.tag {
                    // A tagged operation has no future: its slot and buffer go back.
                    Some(_) => {
                        drop(req.buf);
                        let _ = cs.free.push(req.slot);
                    }
                    None => {
                        if dead.claim(cs, req.slot) {
                            with_buf.push((req.slot, req.buf));
                        } else {
                            dropped.push(req);
                        }
                    }
                }
            }
            dead.claim_waiting(cs, true, &mut slots);
            dead.drained = true;
            panicked
        };
        drop(dropped);
        with_buf.extend(slots.into_iter().map(|slot| (slot, None)));
        cs.fail_dead(with_buf, panicked, true);
    }
}

impl CoreShared {
    /// Completes the `claimed` slots (with their buffers, if any) with an error on a core
    /// whose poller ended (`panicked`: by a handler's panic, else by shutdown); the caller
    /// claimed them (`DeadCore::claim`), so no one else completes them. In two passes: every
    /// result published first (no user code runs), then the wakers woken and dropped. A
    /// future whose slot is claimed waits for its publication (`fail_late`), so it must not
    /// wait for a waker that might poll it inline or block on what that future holds. Off
    /// the poller's thread (`on_poller_thread` false) the poller-side waker cells are not
    /// touched: that thread may be dropping them (`Tasks::close`); only remote-armed slots
    /// are claimed there.
    #[cold]
    fn fail_dead(
        &self,
        claimed: Vec<(u32, Option<PoolBuf>)>,
        panicked: bool,
        on_poller_thread: bool,
    ) {
        let error = || {
            if panicked {
                Error::BackendUnavailable {
                    backend: "runtime",
                    reason: format!(
                        "the poller of core {} ended (a completion handler panicked)",
                        self.core
                    ),
                }
            } else {
                shut_down()
            }
        };
        let mut to_wake = Vec::with_capacity(claimed.len());
        let mut stale_wakers = Vec::new();
        for (slot, buf) in claimed {
            let s = &self.slots[slot as usize];
            if on_poller_thread && s.local_only.load(Ordering::Relaxed) {
                // A `LocalIo` of this (the poller's) thread: as in `complete`.
                if s.state.load(Ordering::Relaxed) == PENDING {
                    // SAFETY: PENDING, claimed: only this thread touches the result.
                    unsafe { (*s.result.get()).set(Err(error()), buf) };
                    s.state.store(DONE, Ordering::Release);
                    to_wake.push(slot);
                } else {
                    drop(buf);
                    s.state.store(FREE, Ordering::Release);
                    self.free_local(slot);
                }
                continue;
            }
            // SAFETY: claimed PENDING or ABANDONED: only this claimer writes the result, and
            // the future reads it only once DONE (released by the CAS below).
            unsafe { (*s.result.get()).set(Err(error()), buf) };
            match s
                .state
                .compare_exchange(PENDING, DONE, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => to_wake.push(slot),
                Err(_) => {
                    // Abandoned: the future is gone; only this claimer sees the slot.
                    // SAFETY: as above, ABANDONED.
                    unsafe { (*s.result.get()).clear() };
                    stale_wakers.push(s.waker.take());
                    s.state.store(FREE, Ordering::Release);
                    let _ = self.free.push(slot);
                }
            }
        }
        // Wakers are user code: a panic in one must not abort an unwind nor reach the future
        // that found the core dead, nor keep the others from being woken.
        let caught = |r: std::thread::Result<()>| {
            if r.is_err() {
                tracing::error!(
                    core = self.core,
                    "a waker panicked while its core's ended poller's operations were failed"
                );
            }
        };
        for slot in to_wake {
            let s = &self.slots[slot as usize];
            if on_poller_thread {
                caught(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                    || wake_local(s),
                )));
            }
            caught(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                || s.waker.wake(),
            )));
        }
        caught(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || drop(stale_wakers),
        )));
    }

    /// A future from another thread found its core closed while it waits: its poller died.
    /// A submission that passed the `closed` check just before the poller's exit may have
    /// armed its slot after the exit's scan, and its request gone to an inbox no one reads;
    /// fail such slots here. Dekker's pattern: the submitter armed SeqCst, then its poll
    /// loads `closed` SeqCst; the exit stores `closed` SeqCst, then scans SeqCst. So either
    /// the exit's scan saw the slot armed, or this poll sees the core closed. Requests
    /// found in the inbox now are dropped with their buffers (their slots are failed by the
    /// scan, without them: a late request may even name a slot freed and armed again).
    /// Slots are claimed under `dead` and completed after it is released, so a waker that
    /// polls a future inline finds the lock free.
    #[cold]
    #[inline(never)]
    fn fail_late(&self, mine: u32) {
        let mut late = Vec::new();
        let mut slots = Vec::new();
        let panicked = {
            let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
            if !dead.drained {
                // The exit has not scanned yet: it will, and it sees this slot armed (the
                // lock orders the arming before its scan); it completes and wakes before it
                // drops the wakers.
                return;
            }
            late.extend(std::iter::from_fn(|| self.inbox.pop()));
            dead.claim_waiting(self, false, &mut slots);
            dead.panicked
        };
        for req in late {
            if req.tag.is_some() {
                let _ = self.free.push(req.slot);
            }
        }
        self.fail_dead(
            slots.into_iter().map(|slot| (slot, None)).collect(),
            panicked,
            false,
        );
        // `mine` was claimed by this call or by another one, which publishes its result as
        // soon as it is out of the lock, before it runs any waker (`fail_dead`); the exit may
        // drop the waker this future registered meanwhile, so wait for the publication here
        // rather than for a wake.
        let s = &self.slots[mine as usize];
        while s.state.load(Ordering::SeqCst) != DONE {
            std::thread::yield_now();
        }
    }
}

/// What a task's submission needs to reach the queue itself (as [`Resubmit`]'s direct path).
/// Raw pointers: the poller publishes them in `TASK_DIRECT` only for the duration of
/// `Tasks::run`, during which its loop touches none of these objects.
struct TaskDirect {
    poller: *const Poller,
    q: *mut Queue,
    /// The in-flight table's first entry (one entry per slot).
    inflight: *mut Held,
    regions: *mut (u64, usize),
    limit: u32,
    /// The slots to stamp for the meter; null without one.
    stamp: *mut Vec<u32>,
}

impl CoreShared {
    /// This thread is this core's poller (a task or a handler runs on it).
    #[inline]
    fn on_poller(&self) -> bool {
        ON_POLLER.with(|c| std::ptr::eq(c.get(), self))
    }

    /// A free slot, made pending for a new request: its epoch. The caller took the slot
    /// from a free list, so it alone writes the epoch now: a load and a store, no RMW.
    /// `local_only`: for a [`LocalIo`], which never leaves the poller's thread.
    #[inline]
    fn arm(&self, slot: u32, local_only: bool) -> u32 {
        self.arm_with(slot, local_only, Ordering::Release)
    }

    /// [`arm`](Self::arm) for a submission from another thread than the poller's: the state
    /// is published SeqCst, for a poller that dies meanwhile (see `fail_late`).
    #[inline]
    fn arm_remote(&self, slot: u32) -> u32 {
        self.arm_with(slot, false, Ordering::SeqCst)
    }

    #[inline(always)]
    fn arm_with(&self, slot: u32, local_only: bool, publish: Ordering) -> u32 {
        let s = &self.slots[slot as usize];
        let epoch = s.epoch.load(Ordering::Relaxed).wrapping_add(1);
        s.epoch.store(epoch, Ordering::Release);
        s.remote.store(false, Ordering::Relaxed);
        s.local_only.store(local_only, Ordering::Relaxed);
        s.state.store(PENDING, publish);
        epoch
    }

    /// A free slot for a submission on the poller's own thread: its private list first.
    #[inline]
    fn take_local(&self) -> Option<u32> {
        // SAFETY: called on the poller's thread only (the callers checked `on_poller`); no
        // reference into the list outlives this call.
        unsafe { (*self.tasks.free.get()).pop() }.or_else(|| self.free.pop())
    }

    /// How many slots are free now: the shared list, and on the poller's own thread
    /// (`local`) also its private one.
    #[inline]
    fn free_now(&self, local: bool) -> usize {
        let private = if local {
            // SAFETY: on the poller's thread (the caller checked `on_poller`); no reference
            // into the list outlives this call.
            unsafe { (*self.tasks.free.get()).len() }
        } else {
            0
        };
        self.free.len() + private
    }

    /// A slot freed on the poller's own thread: into its private list (no atomic) while that
    /// holds less than half the slots, so submitters on other threads always find the rest.
    #[inline]
    fn free_local(&self, slot: u32) {
        // SAFETY: as in `take_local`.
        let l = unsafe { &mut *self.tasks.free.get() };
        if l.len() < self.slots.len() / 2 {
            l.push(slot);
        } else {
            let _ = self.free.push(slot);
        }
    }

    /// Send an armed slot's operation: on the poller's own thread while it runs its tasks,
    /// straight to its queue (below the depth cap); else handed to the poller.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn issue(
        &self,
        local: bool,
        slot: u32,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
        file: Option<Arc<std::os::fd::OwnedFd>>,
        cached: bool,
    ) {
        if local && file.is_none() {
            let d = TASK_DIRECT.with(|c| c.get());
            if !d.is_null() {
                // SAFETY: non-null only while this thread's poller runs its tasks (this is one
                // of them: `local`), and the objects it points to live on that poller's stack
                // for that whole call, untouched by the poller meanwhile. Each reference made
                // here ends before anything that could submit again runs (`complete` below
                // may wake a waker; the queue reference is not used after it).
                let d = unsafe { &*d };
                // SAFETY: as above.
                let q = unsafe { &mut *d.q };
                if q.in_flight() < d.limit {
                    // SAFETY: as above.
                    let (generation, known) = unsafe { &mut *d.regions };
                    // SAFETY: as above.
                    unsafe { (*d.poller).sync_regions(q, generation, known) };
                    if !d.stamp.is_null() {
                        // SAFETY: as above.
                        unsafe { (*d.stamp).push(slot) };
                    }
                    let mut buf = buf;
                    let (addr, dlen) = data_of(&mut buf, op, len);
                    // SAFETY: the buffer is kept in the poller's in-flight table until the
                    // completion of this slot is reaped; it lies in a pool region the queue
                    // maps (`sync_regions` above added any new one).
                    match unsafe { q.submit_raw(op, offset, addr, dlen, slot as u64) } {
                        // SAFETY: the table has an entry per slot; as above for the pointer.
                        Ok(()) => unsafe { (*d.inflight.add(slot as usize)).hold(buf, None, None) },
                        Err(e) => complete(self, slot, Err(e), buf),
                    }
                    return;
                }
            }
        }
        // Built once, where it is handed over (moving it again was a store-forwarding stall).
        self.hand(
            local,
            Request {
                op,
                offset,
                len,
                buf,
                slot,
                file,
                cached,
                tag: None,
            },
        );
    }

    /// Hand a request to the core's poller: from its own thread into the list it feeds to
    /// its queue in turn with its inbox; from any other thread through the inbox.
    #[inline(always)]
    fn hand(&self, on_poller: bool, req: Request) {
        if on_poller {
            // SAFETY: on the poller thread (checked), the only thread that touches `reqs`;
            // the poller holds no reference into it while it runs other code (it moves the
            // list's contents out in one call).
            unsafe { (*self.tasks.reqs.get()).push(req) };
        } else {
            self.push_request(req);
        }
    }

    /// Hand a request to the core's poller through the inbox. The inbox has as many places
    /// as there are slots, and this request holds one: the push cannot find it full for long
    /// (only while the poller is between pops).
    fn push_request(&self, mut req: Request) {
        loop {
            match self.inbox.push(req) {
                Ok(()) => break,
                // A full inbox on a core whose poller ended never empties: the request's
                // future (if it has one) fails through `fail_late`.
                Err(r) if self.tasks.is_closed() => {
                    drop(r);
                    break;
                }
                Err(r) => {
                    req = r;
                    self.wake_poller();
                    std::thread::yield_now();
                }
            }
        }
        self.wake_poller();
    }

    /// After a request went into the inbox: wake the poller if it sleeps. The flags are read
    /// SeqCst after the inbox push (a SeqCst update), and the poller sets them SeqCst before
    /// it checks the inbox a last time: one of the two sides sees the other.
    fn wake_poller(&self) {
        if self.sleeping.load(Ordering::SeqCst)
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
        if self.in_kernel.load(Ordering::SeqCst)
            && self.in_kernel.swap(false, Ordering::SeqCst)
            && let Some(fd) = &self.wake_fd
        {
            use std::os::fd::AsFd;
            if let Err(e) = rio_sys::io::eventfd_signal(fd.as_fd()) {
                tracing::warn!(core = self.core, error = %e, "cannot wake the poller");
            }
        }
    }
}

/// The runtime: pollers, pools, and the engine they serve.
pub struct Runtime {
    engine: Arc<Engine>,
    pools: Arc<Pools>,
    cores: Vec<Arc<CoreShared>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    next: AtomicU32,
    prefetch: crate::tune::PrefetchConfig,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field(
                "cores",
                &self.cores.iter().map(|c| c.core).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Runtime {
    /// Start pollers for `engine` (an open target) on the configured cores.
    pub fn start(engine: Engine, cfg: RuntimeConfig) -> Result<Arc<Runtime>> {
        if cfg.depth > MAX_DEPTH {
            return Err(Error::config(
                "depth",
                format!(
                    "{} operations in flight per core is more than {MAX_DEPTH}, the most a queue takes",
                    cfg.depth
                ),
            ));
        }
        let engine = Arc::new(engine);
        let cores = match cfg.cores.clone() {
            Some(c) if !c.is_empty() => c,
            _ => default_cores(&engine),
        };
        let mut pool_cfg = cfg.pool.clone();
        let user_hook = pool_cfg.on_region.take();
        // A region the pool gives back must first leave the queue that maps it (IOMMU, io_uring
        // registration). Pollers run the pool's maintenance themselves, when idle, with their
        // queue published in a thread-local; from any other thread the unmap is refused and the
        // region kept.
        pool_cfg.on_region = Some(Arc::new(move |ev: &crate::pool::RegionEvent| {
            if ev.kind == crate::pool::RegionEventKind::Unmapping {
                release_from_poller_queue(ev)?;
            }
            match &user_hook {
                Some(h) => h(ev),
                None => Ok(()),
            }
        }));
        let pools = Pools::new(pool_cfg, &cores)?;
        let depth = cfg.depth.max(1);
        let nslots = (depth as usize * 4).max(64);
        let stop = Arc::new(AtomicBool::new(false));
        let mut shared = Vec::new();
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<()>>(cores.len());
        for &core in &cores {
            let cs = Arc::new(CoreShared {
                core,
                slots: (0..nslots)
                    .map(|_| Slot {
                        state: AtomicU8::new(FREE),
                        epoch: AtomicU32::new(0),
                        result: std::cell::UnsafeCell::new(SlotResult::default()),
                        waker: atomic_waker::AtomicWaker::new(),
                        remote: AtomicBool::new(false),
                        local_only: AtomicBool::new(false),
                        local_waker: std::cell::UnsafeCell::new(None),
                    })
                    .collect(),
                free: {
                    let q = crossbeam_queue::ArrayQueue::new(nslots);
                    for i in 0..nslots as u32 {
                        let _ = q.push(i);
                    }
                    q
                },
                inbox: crossbeam_queue::ArrayQueue::new(nslots),
                sleeping: AtomicBool::new(false),
                thread: std::sync::OnceLock::new(),
                in_kernel: AtomicBool::new(false),
                wake_fd: match cfg.idle {
                    IdlePolicy::Block { .. } => match rio_sys::io::eventfd() {
                        Ok(fd) => Some(Arc::new(fd)),
                        Err(e) => {
                            tracing::warn!(error = %e, "no eventfd: pollers spin while I/O is in flight");
                            None
                        }
                    },
                    _ => None,
                },
                sink: cfg.sink.clone(),
                on_complete: cfg.on_complete.clone(),
                tasks: task::CoreTasks::new(nslots),
                dead: std::sync::Mutex::new(DeadCore::default()),
                index: shared.len() as u32,
                tuner: cfg.target_p99.map(|t| {
                    let mut c = crate::tune::QdConfig::new(t, depth);
                    c.initial = depth.min(8);
                    Mutex::new(crate::tune::QdTuner::new(c))
                }),
            });
            let poller = Poller {
                engine: Arc::clone(&engine),
                pools: Arc::clone(&pools),
                shared: Arc::clone(&cs),
                stop: Arc::clone(&stop),
                depth,
                idle: cfg.idle,
            };
            let tx: Sender<Result<()>> = ready_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("rio-poll-{core}"))
                .spawn(move || poller.run(tx))
                .map_err(|e| Error::BackendUnavailable {
                    backend: "runtime",
                    reason: format!("cannot start a poller thread: {e}"),
                })?;
            let _ = cs.thread.set(h.thread().clone());
            shared.push(cs);
            threads.push(h);
        }
        let rt = Runtime {
            engine,
            pools,
            cores: shared,
            stop,
            threads: Mutex::new(threads),
            next: AtomicU32::new(0),
            prefetch: cfg.prefetch,
        };
        wait_ready(&ready_rx, rt.cores.len()).inspect_err(|_| rt.shutdown())?;
        Ok(Arc::new(rt))
    }

    /// Open `target` with `config` and start a runtime configured from it
    /// ([`EngineConfig::runtime_config`](crate::config::EngineConfig::runtime_config): pools, depth, idle policy).
    pub fn open(target: &str, config: &crate::config::EngineConfig) -> Result<Arc<Runtime>> {
        let engine = Engine::open(
            config,
            target,
            crate::target::OpenOptions {
                write: true,
                direct: true,
                create: false,
            },
        )?;
        Runtime::start(engine, config.runtime_config())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// What the pollers' depth tuners learned, per core: the measured curve, the depth in
    /// force, and advice in words (the seed's `get_optimization_recommendations`). Without a
    /// p99 target there is no tuner, and the advice says how to get one.
    pub fn recommendations(&self) -> Recommendations {
        let per_core = self
            .cores
            .iter()
            .map(|cs| match &cs.tuner {
                None => CoreAdvice {
                    core: cs.core,
                    depth: None,
                    target_p99_us: None,
                    curve: Vec::new(),
                    slope: 0.0,
                    confidence: 0.0,
                    advice: vec![
                        "no p99 target: set RUSTFS_TARGET_LATENCY_US (or RuntimeConfig::target_p99) and rio will choose the queue depth under it"
                            .to_string(),
                    ],
                },
                Some(t) => {
                    let t = t.lock().unwrap_or_else(|p| p.into_inner());
                    CoreAdvice {
                        core: cs.core,
                        depth: Some(t.depth()),
                        target_p99_us: Some(t.config().target_p99.as_secs_f64() * 1e6),
                        curve: t.curve(),
                        slope: t.slope(),
                        confidence: t.confidence(),
                        advice: crate::tune::recommendations(&t),
                    }
                }
            })
            .collect();
        Recommendations { per_core }
    }

    /// Read-ahead settings `DiskFile`s of this runtime start with.
    pub fn prefetch_config(&self) -> crate::tune::PrefetchConfig {
        self.prefetch
    }

    /// Whether the poller of `core` is parked (idle, nothing in flight): a submission to it
    /// costs a wake-up. A hint, read without ordering; `false` for a core without a poller.
    pub fn poller_parked(&self, core: usize) -> bool {
        self.cores
            .iter()
            .find(|c| c.core == core)
            .is_some_and(|c| c.sleeping.load(Ordering::Relaxed))
    }

    /// The cores pollers run on.
    pub fn cores(&self) -> Vec<usize> {
        self.cores.iter().map(|c| c.core).collect()
    }

    /// A pool buffer of `len` bytes from the next core's pool (round robin), waiting up to
    /// `wait` when the pool is exhausted. The seed's `get_optimized_buffer`.
    pub fn buffer(&self, len: usize, wait: Duration) -> Result<PoolBuf> {
        let core = self.cores[self.pick()].core;
        self.pools
            .get(core, len, Some(Instant::now() + wait))
            .map_err(|e| Error::BufferUnavailable {
                requested: len,
                reason: e.to_string(),
            })
    }

    /// A pool buffer of `len` bytes if one is free now (round robin over the cores): no wait,
    /// no pool growth, no allocation. For optional work such as read-ahead.
    pub fn try_buffer(&self, len: usize) -> Option<PoolBuf> {
        self.pools.try_get(self.cores[self.pick()].core, len)
    }

    /// The core for a new buffer or task: on a poller's thread (a task), that poller's own
    /// (its I/O then never leaves the thread); elsewhere the next one, round robin.
    fn pick(&self) -> usize {
        let here = ON_POLLER.with(|c| c.get());
        if !here.is_null()
            && let Some(i) = self
                .cores
                .iter()
                .position(|c| std::ptr::eq(Arc::as_ptr(c), here))
        {
            return i;
        }
        self.next.fetch_add(1, Ordering::Relaxed) as usize % self.cores.len()
    }

    /// Run `fut` on a poller's thread, polled between that poller's polls of its queue
    /// (thread-per-core, as Seastar and SPDK's reactors run): the I/O it submits through this
    /// runtime goes to that poller's queue without crossing a thread, and its completions
    /// wake it there. Called from a task, the new task goes to the same poller; elsewhere,
    /// round robin. Buffers a task takes with [`try_buffer`](Self::try_buffer) come from its
    /// poller's pool.
    ///
    /// A task must not block: a blocking call (a lock held elsewhere, a blocking read,
    /// [`JoinHandle::join`], [`buffer`](Self::buffer) waiting for an empty pool) stops the
    /// poller, and with it every task and I/O of its core. A task that keeps the runtime
    /// (an `Arc<Runtime>`) keeps it alive: [`shutdown`](Self::shutdown) ends it, and then
    /// every task still waiting is dropped (its handle says [`JoinError::Cancelled`]). A
    /// panic in a task ends that task only ([`JoinError::Panicked`]).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let i = self.pick();
        self.spawn_at(i, fut)
    }

    /// [`spawn`](Self::spawn) for a future that need not be `Send`: `make` runs on the
    /// poller's thread and builds it there, where it stays. Such a task can hold
    /// [`LocalIo`]s ([`submit_local`](Self::submit_local)), `Rc`s and `RefCell`s across its
    /// awaits. A panic in `make` ends the task as one in the future does.
    pub fn spawn_local<F, Fut>(&self, make: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        if self.stop.load(Ordering::Acquire) {
            return task::cancelled();
        }
        let (t, handle) = task::local_task(make);
        let cs = &self.cores[self.pick()];
        let _ = cs.tasks.spawn(cs, t);
        handle
    }

    /// [`spawn`](Self::spawn) on the poller of `cores()[index]`.
    pub fn spawn_on<F>(&self, index: usize, fut: F) -> Result<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if index >= self.cores.len() {
            return Err(Error::config(
                "spawn_on",
                format!(
                    "core index {index} is out of range: the runtime has {} poller(s)",
                    self.cores.len()
                ),
            ));
        }
        Ok(self.spawn_at(index, fut))
    }

    fn spawn_at<F>(&self, index: usize, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.stop.load(Ordering::Acquire) {
            return task::cancelled();
        }
        let (t, handle) = task::task(fut);
        let cs = &self.cores[index];
        // Refused once the poller exited: the task is dropped, its handle says cancelled.
        let _ = cs.tasks.spawn(cs, t);
        handle
    }

    /// Submit `op` on `buf` (reads and writes) at `offset`; the future resolves when it
    /// completed, giving the buffer back. Runs on the core the buffer belongs to.
    #[inline]
    pub fn submit(&self, op: OpKind, offset: u64, len: u64, buf: Option<PoolBuf>) -> IoFuture {
        self.submit_inner(op, offset, len, buf, false, None)
            .unwrap_or_else(|_| unreachable!("a required submission always waits for a slot"))
    }

    /// [`submit`](Self::submit) for a task on a poller made by
    /// [`spawn_local`](Self::spawn_local) (awaiting it makes a future `!Send`, so a
    /// [`spawn`](Self::spawn) task cannot): the future borrows the runtime instead of counting a
    /// reference, and never leaves the poller's thread (it is not `Send`), so its completion
    /// takes no atomic read-modify-write either. Called anywhere else, or with a buffer of
    /// another core's pool, it works as `submit` does (the future then wraps an [`IoFuture`]).
    #[inline]
    pub fn submit_local(
        &self,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
    ) -> LocalIo<'_> {
        let here = ON_POLLER.with(|c| c.get());
        let cs = match &buf {
            Some(b) => self.cores.iter().find(|c| c.core == b.home_core()),
            None => self
                .cores
                .iter()
                .find(|c| std::ptr::eq(Arc::as_ptr(c), here)),
        };
        let Some(cs) = cs.filter(|c| std::ptr::eq(Arc::as_ptr(c), here)) else {
            return LocalIo::shared(&self.cores[0], self.submit(op, offset, len, buf));
        };
        if self.stop.load(Ordering::Acquire) {
            return LocalIo::shared(cs, IoFuture::failed(Arc::clone(cs), shut_down(), buf));
        }
        let Some(slot) = cs.take_local() else {
            // Only this thread frees slots: the future takes one when a poll finds one.
            let req = Request {
                op,
                offset,
                len,
                buf,
                slot: u32::MAX,
                file: None,
                cached: false,
                tag: None,
            };
            return LocalIo::cold(cs, LocalCold::Deferred(req));
        };
        cs.arm(slot, true);
        cs.issue(true, slot, op, offset, len, buf, None, false);
        LocalIo {
            cs,
            word: slot_word(slot),
            _not_send: std::marker::PhantomData,
        }
    }

    /// [`submit`](Self::submit) on a file of the host's instead of the runtime's target (a
    /// runtime over a directory, [`Engine::open_dir`]; io_uring and psync only). The runtime
    /// holds `file` until the operation completed. The file's open mode rules: with O_DIRECT,
    /// the offset and length must meet its alignment (pool buffers always do), or the
    /// operation fails with EINVAL. A read past the end of the file is short.
    pub fn submit_file(
        &self,
        file: &Arc<std::os::fd::OwnedFd>,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
    ) -> IoFuture {
        self.submit_inner(op, offset, len, buf, false, Some((Arc::clone(file), false)))
            .unwrap_or_else(|_| unreachable!("a required submission always waits for a slot"))
    }

    /// [`submit_file`](Self::submit_file) on a file open without O_DIRECT: the kernel copies
    /// through the page cache, and io_uring does that copy faster into a plain address than
    /// into a registered buffer (measured ~1.4x on a 516 KiB cached read), so the operation
    /// passes the buffer's address unregistered.
    pub fn submit_cached_file(
        &self,
        file: &Arc<std::os::fd::OwnedFd>,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
    ) -> IoFuture {
        self.submit_inner(op, offset, len, buf, false, Some((Arc::clone(file), true)))
            .unwrap_or_else(|_| unreachable!("a required submission always waits for a slot"))
    }

    /// [`submit`](Self::submit) for optional work (read-ahead): only if more than half of the
    /// core's slots are free right now, never waiting. The other half stays for the host's own
    /// requests, which a read-ahead that holds finished reads must never starve. The buffer
    /// comes back when it is refused.
    pub fn try_submit(
        &self,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: PoolBuf,
    ) -> std::result::Result<IoFuture, Option<PoolBuf>> {
        self.submit_inner(op, offset, len, Some(buf), true, None)
    }

    /// The run-to-completion API: submit `op` on `buf` at `offset`; when it completes, the
    /// runtime's handler ([`RuntimeConfig::on_complete`]) is called with `tag` on the poller
    /// thread. No future, no waker. Runs on the core the buffer belongs to. Refused (the
    /// buffer handed back) without a handler, or once the runtime is shutting down.
    pub fn submit_tagged(
        &self,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
        tag: u64,
    ) -> std::result::Result<(), Box<IoFailure>> {
        if self.cores[0].on_complete.is_none() {
            return Err(IoFailure::new(
                Error::config(
                    "on_complete",
                    "submit_tagged needs a completion handler (RuntimeConfig::on_complete)",
                ),
                buf,
            ));
        }
        let cs = self.core_for(&buf);
        if self.stop.load(Ordering::Acquire) || cs.tasks.is_closed() {
            return Err(IoFailure::new(shut_down(), buf));
        }
        // On the poller's own thread (a task or a handler) waiting for a slot would never
        // end: only that thread frees them.
        let slot = if cs.on_poller() {
            match cs.take_local() {
                Some(s) => s,
                None => {
                    let depth = cs.slots.len() as u32;
                    return Err(IoFailure::new(Error::QueueFull { depth }, buf));
                }
            }
        } else {
            match self.take_slot(&cs, false) {
                Some(s) => s,
                None => return Err(IoFailure::new(shut_down(), buf)),
            }
        };
        cs.push_request(Request {
            op,
            offset,
            len,
            buf,
            slot,
            file: None,
            cached: false,
            tag: Some(tag),
        });
        Ok(())
    }

    fn core_for(&self, buf: &Option<PoolBuf>) -> Arc<CoreShared> {
        let idx = match buf {
            Some(b) => self
                .cores
                .iter()
                .position(|c| c.core == b.home_core())
                .unwrap_or(0),
            // A task's stays on its own poller.
            None => self.pick(),
        };
        Arc::clone(&self.cores[idx])
    }

    /// A free slot of `cs`; waiting (yielding) is the backpressure of a full core. `None`
    /// when `optional` and none is free, or when the runtime shuts down meanwhile (pollers
    /// complete everything before they exit, so a slot always frees up while they run).
    fn take_slot(&self, cs: &CoreShared, optional: bool) -> Option<u32> {
        loop {
            if let Some(s) = cs.free.pop() {
                return Some(s);
            }
            if optional || self.stop.load(Ordering::Acquire) || cs.tasks.is_closed() {
                return None;
            }
            cs.wake_poller();
            std::thread::yield_now();
        }
    }

    /// [`try_submit`](Self::try_submit) on a host file (read-ahead of a [`Files`] file).
    pub fn try_submit_file(
        &self,
        file: &Arc<std::os::fd::OwnedFd>,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: PoolBuf,
    ) -> std::result::Result<IoFuture, Option<PoolBuf>> {
        self.submit_inner(
            op,
            offset,
            len,
            Some(buf),
            true,
            Some((Arc::clone(file), false)),
        )
    }

    /// `optional`: refuse (giving the buffer back) unless more than half the core's slots are
    /// free, and never wait for one.
    fn submit_inner(
        &self,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
        optional: bool,
        file: Option<(Arc<std::os::fd::OwnedFd>, bool)>,
    ) -> std::result::Result<IoFuture, Option<PoolBuf>> {
        let (file, cached) = match file {
            Some((f, c)) => (Some(f), c),
            None => (None, false),
        };
        let cs = self.core_for(&buf);
        // Shut down, or this core's poller is gone (a handler's panic ended it): nothing
        // would serve the request.
        if self.stop.load(Ordering::Acquire) || cs.tasks.is_closed() {
            return Ok(IoFuture::failed(cs, shut_down(), buf));
        }
        // On the poller's own thread (a task): never wait for a slot here, since only this
        // thread frees them; the future takes one when it is polled.
        let local = cs.on_poller();
        if optional && cs.free_now(local) <= cs.slots.len() / 2 {
            return Err(buf);
        }
        let slot = if local {
            match cs.take_local() {
                Some(s) => s,
                None if optional => return Err(buf),
                None => {
                    let req = Request {
                        op,
                        offset,
                        len,
                        buf,
                        slot: u32::MAX,
                        file,
                        cached,
                        tag: None,
                    };
                    return Ok(IoFuture::deferred(cs, req));
                }
            }
        } else {
            match self.take_slot(&cs, optional) {
                Some(s) => s,
                None if optional => return Err(buf),
                None => return Ok(IoFuture::failed(cs, shut_down(), buf)),
            }
        };
        let epoch = if local {
            cs.arm(slot, false)
        } else {
            cs.arm_remote(slot)
        };
        cs.issue(local, slot, op, offset, len, buf, file, cached);
        Ok(IoFuture {
            cs,
            word: io_word(slot, epoch),
        })
    }

    /// Stop the pollers after they drained what was submitted, and wait for them to exit.
    /// Idempotent. Called on one of this runtime's pollers (by a task or a handler), it only
    /// tells them to stop: a later call from another thread (or the drop) waits for them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in &self.cores {
            if let Some(t) = c.thread.get() {
                t.unpark();
            }
            c.wake_poller();
        }
        // A task (or handler) on a poller that shuts the runtime down, or drops its last
        // handle: that poller exits when this call returns, so it cannot wait for itself;
        // nor for the others (two pollers doing this at once would wait for each other).
        // Their handles stay, for a later call from another thread to join.
        if self.cores.iter().any(|c| c.on_poller()) {
            return;
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn shut_down() -> Error {
    Error::BackendUnavailable {
        backend: "runtime",
        reason: "the runtime is shut down".into(),
    }
}

fn wait_ready(rx: &Receiver<Result<()>>, n: usize) -> Result<()> {
    for _ in 0..n {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Timeout(Duration::from_secs(60))),
        }
    }
    Ok(())
}

/// Cores for pollers when none are configured: those on the NVMe controller's NUMA node (for
/// `pcie://` targets whose PCI device reports one), else all that `core_affinity` reports; at
/// most 4, leaving out the software model's CPU when there is more than one.
fn default_cores(engine: &Engine) -> Vec<usize> {
    let mut cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if let crate::target::TargetKind::Nvme { controller, .. } = &engine.target().kind
        && let Ok(addr) = controller.parse::<rio_sys::pci::PciAddr>()
        && let Ok(dev) = rio_sys::pci::device(std::path::Path::new("/sys"), &addr)
        && let Some(node) = dev.numa_node.filter(|&n| n >= 0)
    {
        let near = crate::pool::cpus_of_node(node as u32);
        let local: Vec<usize> = cores.iter().copied().filter(|c| near.contains(c)).collect();
        if !local.is_empty() {
            tracing::info!(node, cores = ?local, "pollers on the NVMe controller's NUMA node");
            cores = local;
        }
    }
    if let Some(m) = engine
        .controller()
        .and_then(|c| c.sim())
        .and_then(|s| s.cpu())
        && cores.len() > 1
    {
        cores.retain(|&c| c != m);
    }
    cores.truncate(4);
    if cores.is_empty() {
        cores.push(0);
    }
    cores
}

/// A submitted operation; resolves to the bytes transferred and the buffer.
///
/// Two words (a scalar pair, moved in registers: it is moved with every await of every I/O,
/// and as three words built with narrow stores it was copied with wide loads, a
/// store-forwarding stall): the core, and `word`, which holds the slot and its epoch
/// (`io_word`: odd), or nothing (`NO_IO`: finished), or, on the rare paths, a boxed [`Cold`]
/// (its pointer: even, since the box is aligned).
pub struct IoFuture {
    cs: Arc<CoreShared>,
    word: u64,
}

/// `IoFuture::word` when it holds neither a slot nor a [`Cold`].
const NO_IO: u64 = u64::MAX;

/// `IoFuture::word` holding `slot` (below 2^31) armed at `epoch`.
#[inline(always)]
fn io_word(slot: u32, epoch: u32) -> u64 {
    debug_assert!(slot < 1 << 31);
    (u64::from(epoch) << 32) | (u64::from(slot) << 1) | 1
}

enum Cold {
    /// Failed before submission.
    Failed(Error, Option<PoolBuf>),
    /// Made on the poller's thread when no slot was free: submitted when a poll finds one.
    Deferred(Request),
}

impl IoFuture {
    /// Whether the operation has finished (awaiting it will not wait).
    pub fn is_done(&self) -> bool {
        match self.cold_ref() {
            Some(Cold::Failed(..)) => true,
            Some(Cold::Deferred(_)) => false,
            None => self.slot().is_some_and(|(slot, _)| {
                self.cs.slots[slot as usize].state.load(Ordering::Acquire) == DONE
            }),
        }
    }

    /// The slot and epoch this future holds, if it holds one.
    #[inline(always)]
    fn slot(&self) -> Option<(u32, u32)> {
        (self.word & 1 == 1 && self.word != NO_IO)
            .then_some((((self.word as u32) >> 1), (self.word >> 32) as u32))
    }

    /// The boxed rare state, if that is what this future holds.
    fn cold_ref(&self) -> Option<&Cold> {
        // SAFETY: an even word came from `cold_word` (`with_cold`) and this future still
        // owns the box (`take_cold` clears the word).
        (self.word & 1 == 0).then(|| unsafe { &*cold_at::<Cold>(self.word as usize) })
    }

    /// The boxed rare state, taken out (the future then holds nothing).
    fn take_cold(&mut self) -> Option<Box<Cold>> {
        if self.word & 1 != 0 {
            return None;
        }
        // SAFETY: as in `cold_ref`; the word is cleared, so the box is rebuilt only once.
        let b = unsafe { cold_back::<Cold>(self.word as usize) };
        self.word = NO_IO;
        Some(b)
    }

    #[cold]
    fn with_cold(cs: Arc<CoreShared>, c: Cold) -> IoFuture {
        IoFuture {
            cs,
            word: cold_word(c) as u64,
        }
    }

    fn failed(cs: Arc<CoreShared>, e: Error, buf: Option<PoolBuf>) -> IoFuture {
        IoFuture::with_cold(cs, Cold::Failed(e, buf))
    }

    fn deferred(cs: Arc<CoreShared>, req: Request) -> IoFuture {
        IoFuture::with_cold(cs, Cold::Deferred(req))
    }

    /// The rare states' poll: a failure's output, or a deferred submission's start. `None`:
    /// the future now holds a slot; poll it.
    #[cold]
    fn poll_cold(&mut self, cx: &mut Context<'_>) -> Option<Poll<IoOutput>> {
        match self.cold_ref()? {
            Cold::Failed(..) => {
                let Some(Cold::Failed(e, b)) = self.take_cold().map(|c| *c) else {
                    unreachable!()
                };
                Some(Poll::Ready(Err(IoFailure::new(e, b))))
            }
            Cold::Deferred(_) => match self.start_deferred(cx) {
                Ok(true) => None,
                Ok(false) => Some(Poll::Pending),
                Err(e) => {
                    let buf = match self.take_cold().map(|c| *c) {
                        Some(Cold::Deferred(r)) => r.buf,
                        _ => None,
                    };
                    Some(Poll::Ready(Err(IoFailure::new(e, buf))))
                }
            },
        }
    }

    /// A deferred request's submission: with a slot now, or `false` (the waker registered to
    /// run when one is free on the poller's thread). Off the poller's thread (the future was
    /// sent away), it waits for a slot as any submitter does.
    #[cold]
    fn start_deferred(&mut self, cx: &mut Context<'_>) -> std::result::Result<bool, Error> {
        let local = self.cs.on_poller();
        let slot = loop {
            // Off the poller: once it exited, nothing would drain the inbox (and its slots
            // are all back on the free list, so a pop would succeed).
            if !local && self.cs.tasks.is_closed() {
                return Err(shut_down());
            }
            let free = if local {
                self.cs.take_local()
            } else {
                self.cs.free.pop()
            };
            if let Some(s) = free {
                break s;
            }
            if local {
                self.cs.tasks.wait_for_slot(&self.cs, cx.waker());
                return Ok(false);
            }
            self.cs.wake_poller();
            std::thread::yield_now();
        };
        let Some(Cold::Deferred(req)) = self.take_cold().map(|c| *c) else {
            unreachable!("a deferred future holds its request");
        };
        let epoch = if local {
            self.cs.arm(slot, false)
        } else {
            self.cs.arm_remote(slot)
        };
        self.word = io_word(slot, epoch);
        self.cs.hand(local, Request { slot, ..req });
        Ok(true)
    }
}

/// The future of [`Runtime::submit_local`]: an operation submitted by a task on its own
/// poller. Not `Send`: it is polled and dropped on the thread that made it.
///
/// Two words (a scalar pair, so it is returned and moved in registers: built in memory
/// with narrow stores and copied with wide loads, it stalled on store forwarding where the
/// task's state machine took it in): the core, and `word`, which holds either the slot
/// (`slot_word`: odd), or nothing (`NO_SLOT`), or, rarely, a boxed [`LocalCold`] (its
/// pointer: even, since the box is aligned).
pub struct LocalIo<'a> {
    cs: &'a CoreShared,
    word: usize,
    _not_send: std::marker::PhantomData<*const ()>,
}

/// A future's rare state boxed, as the word it keeps in place of a slot: the box's address,
/// which is even (the box is aligned), while slot words are odd.
fn cold_word<C>(c: C) -> usize {
    Box::into_raw(Box::new(c)).expose_provenance()
}

/// The state boxed by [`cold_word`].
///
/// # Safety
/// `w` came from `cold_word::<C>` and the box was not taken back ([`cold_back`]); the
/// reference lives no longer than the future that owns the word.
unsafe fn cold_at<'a, C>(w: usize) -> &'a mut C {
    // SAFETY: the caller's promise: `w` is a live box's address, its provenance exposed.
    unsafe { &mut *std::ptr::with_exposed_provenance_mut::<C>(w) }
}

/// The box made by [`cold_word`], taken back: called once per word (the caller clears it).
///
/// # Safety
/// As for [`cold_at`], and no reference from `cold_at` is live.
unsafe fn cold_back<C>(w: usize) -> Box<C> {
    // SAFETY: the caller's promise, as above; the box is rebuilt only once.
    unsafe { Box::from_raw(std::ptr::with_exposed_provenance_mut::<C>(w)) }
}

// Boxed rare states have even addresses, so they never look like a slot's (odd) word.
const _: () = assert!(std::mem::align_of::<Cold>() >= 2 && std::mem::align_of::<LocalCold>() >= 2);

/// `LocalIo::word` when it holds no slot and nothing else (finished).
const NO_SLOT: usize = usize::MAX;

/// `LocalIo::word` holding `slot`.
#[inline(always)]
fn slot_word(slot: u32) -> usize {
    ((slot as usize) << 1) | 1
}

enum LocalCold {
    /// Made where no free slot was: submitted when a poll finds one.
    Deferred(Request),
    /// Not on this core's poller: an ordinary future.
    Shared(IoFuture),
}

impl<'a> LocalIo<'a> {
    /// `cs`: any core of the runtime (unused while `cold` holds the future).
    #[cold]
    fn shared(cs: &'a CoreShared, f: IoFuture) -> LocalIo<'a> {
        LocalIo::cold(cs, LocalCold::Shared(f))
    }

    #[cold]
    fn cold(cs: &'a CoreShared, c: LocalCold) -> LocalIo<'a> {
        LocalIo {
            cs,
            word: cold_word(c),
            _not_send: std::marker::PhantomData,
        }
    }

    /// The slot this future holds, if it holds one.
    #[inline(always)]
    fn slot(&self) -> Option<u32> {
        (self.word & 1 == 1 && self.word != NO_SLOT).then_some((self.word >> 1) as u32)
    }

    /// The boxed rare state, if that is what this future holds.
    #[inline(always)]
    fn cold_ref(&self) -> Option<&LocalCold> {
        // SAFETY: an even word came from `cold_word` (`cold`) and this future still owns the
        // box (`take_cold` clears the word).
        (self.word & 1 == 0).then(|| unsafe { &*cold_at::<LocalCold>(self.word) })
    }

    /// The boxed rare state, taken out (the future then holds nothing).
    fn take_cold(&mut self) -> Option<Box<LocalCold>> {
        if self.word & 1 != 0 {
            return None;
        }
        // SAFETY: as in `cold_ref`; the word is cleared, so the box is rebuilt only once.
        let b = unsafe { cold_back::<LocalCold>(self.word) };
        self.word = NO_SLOT;
        Some(b)
    }

    /// Whether the operation has finished (awaiting it will not wait).
    pub fn is_done(&self) -> bool {
        match self.cold_ref() {
            Some(LocalCold::Shared(f)) => f.is_done(),
            Some(LocalCold::Deferred(_)) => false,
            None => self.slot().is_some_and(|slot| {
                self.cs.slots[slot as usize].state.load(Ordering::Relaxed) == DONE
            }),
        }
    }

    /// A deferred submission: sent now if a slot is free, else the waker is kept for when
    /// one is. False: still waiting.
    #[cold]
    fn start_deferred(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(slot) = self.cs.take_local() else {
            self.cs.tasks.wait_for_slot(self.cs, cx.waker());
            return false;
        };
        let Some(LocalCold::Deferred(req)) = self.take_cold().map(|c| *c) else {
            unreachable!("a deferred future holds its request");
        };
        self.cs.arm(slot, true);
        self.word = slot_word(slot);
        self.cs.issue(
            true, slot, req.op, req.offset, req.len, req.buf, None, false,
        );
        true
    }

    /// The rare states' poll: a shared future's, or a deferred submission's start. `None`:
    /// the future now holds a slot; poll it.
    #[cold]
    fn poll_cold(&mut self, cx: &mut Context<'_>) -> Option<Poll<IoOutput>> {
        if self.word & 1 != 0 {
            return None;
        }
        // SAFETY: as in `cold_ref`, and no other reference to the box is live.
        match unsafe { cold_at::<LocalCold>(self.word) } {
            LocalCold::Shared(f) => Some(Pin::new(f).poll(cx)),
            LocalCold::Deferred(_) => {
                if self.start_deferred(cx) {
                    None
                } else {
                    Some(Poll::Pending)
                }
            }
        }
    }
}

impl Future for LocalIo<'_> {
    type Output = IoOutput;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoOutput> {
        if self.word & 1 == 0
            && let Some(p) = self.poll_cold(cx)
        {
            return p;
        }
        let cs = self.cs;
        let slot = (self.word >> 1) as u32;
        let s = &cs.slots[slot as usize];
        if s.state.load(Ordering::Relaxed) != DONE {
            // SAFETY: this future is on the poller's thread (it is not `Send` and was made
            // there), the only thread that touches `local_waker`; no reference into the cell
            // outlives this block.
            let lw = unsafe { &mut *s.local_waker.get() };
            match lw {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *lw = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        // SAFETY: DONE, on the poller's thread: the poller wrote the result and will not touch
        // the slot again until it is freed below.
        let out = unsafe { (*s.result.get()).take() };
        s.state.store(FREE, Ordering::Relaxed);
        cs.free_local(slot);
        self.word = NO_SLOT;
        Poll::Ready(out)
    }
}

impl Drop for LocalIo<'_> {
    fn drop(&mut self) {
        let Some(slot) = self.slot() else {
            drop(self.take_cold());
            return;
        };
        let s = &self.cs.slots[slot as usize];
        if s.state.load(Ordering::Relaxed) == PENDING {
            // In flight: the poller frees the slot (and drops the buffer) when it completes.
            s.state.store(ABANDONED, Ordering::Relaxed);
            return;
        }
        // Done but never polled.
        // SAFETY: DONE, on the poller's thread: as in `poll`.
        unsafe { (*s.result.get()).clear() };
        s.state.store(FREE, Ordering::Relaxed);
        self.cs.free_local(slot);
    }
}

// A scalar pair, as `LocalIo`'s comment says.
const _: () = assert!(std::mem::size_of::<LocalIo<'static>>() == 2 * std::mem::size_of::<usize>());

/// Output of an [`IoFuture`]: on success the bytes transferred and the buffer; on failure the
/// error and the buffer. The buffer is `None` on failure only where it cannot come back: an
/// operation in flight when its poller died (the device may still write it) or one that
/// raced that death or a shutdown (its request is dropped with the core, or sooner).
pub type IoOutput = std::result::Result<(u64, Option<PoolBuf>), Box<IoFailure>>;

/// A failed operation of an [`IoFuture`]: the error and, where it can come back, the buffer.
/// Boxed in [`IoOutput`], so that the output every successful I/O moves (through the slot,
/// `Poll`, `await` and the caller's `match`) is the count and the buffer, 48 bytes, not 88
/// with an [`Error`] inline: a local task's I/O on the page cache gained 4-5% by it, 15% on
/// the inline model (`async_vs_queue`). A failure's one allocation is off that path; a read
/// cut short by the end of a file is such a failure (`Files` turns it back into a count), so
/// each file's last read pays it once. `?` turns it into its [`Error`] (the buffer goes home).
#[derive(Debug)]
pub struct IoFailure {
    pub error: Error,
    pub buf: Option<PoolBuf>,
}

const _: () = assert!(std::mem::size_of::<IoOutput>() <= 48);

impl IoFailure {
    /// Boxed, as [`IoOutput`] holds it.
    #[cold]
    pub fn new(error: Error, buf: Option<PoolBuf>) -> Box<IoFailure> {
        Box::new(IoFailure { error, buf })
    }
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<Box<IoFailure>> for Error {
    fn from(f: Box<IoFailure>) -> Error {
        f.error
    }
}

impl Future for IoFuture {
    type Output = IoOutput;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoOutput> {
        if self.word & 1 == 0
            && let Some(p) = self.poll_cold(cx)
        {
            return p;
        }
        let slot = (self.word as u32) >> 1;
        let s = &self.cs.slots[slot as usize];
        let local = self.cs.on_poller();
        if s.state.load(Ordering::Acquire) != DONE {
            if local {
                // SAFETY: on the poller's thread, the only one that touches `local_waker`
                // (`complete` runs there too, so it cannot complete meanwhile); no reference
                // into the cell outlives this block.
                let lw = unsafe { &mut *s.local_waker.get() };
                match lw {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *lw = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            s.remote.store(true, Ordering::SeqCst);
            s.waker.register(cx.waker());
            // Re-check after publishing the waker: the poller may have completed meanwhile.
            if s.state.load(Ordering::SeqCst) != DONE {
                // A poller that died may have missed this slot (see `fail_late`).
                if !self.cs.tasks.is_closed() {
                    return Poll::Pending;
                }
                self.cs.fail_late(slot);
                if s.state.load(Ordering::SeqCst) != DONE {
                    return Poll::Pending;
                }
            }
            // Completed meanwhile: the poller may not have seen the registration, and a
            // waker left in the slot would keep whatever it holds (a task's core) alive.
            drop(s.waker.take());
        }
        // SAFETY: the state is DONE (acquired above): the poller has written the result and
        // will not touch the slot again until it is freed below; this future is its only user.
        let out = unsafe { (*s.result.get()).take() };
        // The waker was taken by the poller (or, if stored after that, is stale and harmless:
        // a spurious wake is allowed by the Future contract).
        s.state.store(FREE, Ordering::Release);
        if local {
            self.cs.free_local(slot);
        } else {
            let _ = self.cs.free.push(slot);
        }
        self.word = NO_IO;
        Poll::Ready(out)
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        let Some((slot, epoch)) = self.slot() else {
            drop(self.take_cold());
            return;
        };
        let s = &self.cs.slots[slot as usize];
        if s.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        // In flight: the poller frees the slot (and drops the buffer) when it completes.
        if s.state
            .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return;
        }
        // Already done but never polled: free it here (the buffer goes home on drop).
        // SAFETY: the state is DONE (the CAS above failed with an acquire load): as in `poll`.
        unsafe { (*s.result.get()).clear() };
        drop(s.waker.take());
        s.state.store(FREE, Ordering::Release);
        let _ = self.cs.free.push(slot);
    }
}

// A scalar pair, as `IoFuture`'s comment says.
const _: () = assert!(std::mem::size_of::<IoFuture>() == 16);
// `IoFuture` owns its `Cold` through an integer, which hides it from the auto traits: what
// it holds must be `Send` and `Sync` for the future's own (automatic) impls to be right.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cold>();
};

/// What [`Runtime::recommendations`] returns: per core, structured data and advice in words
/// (`Display` prints the words).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Recommendations {
    pub per_core: Vec<CoreAdvice>,
}

/// One poller's tuner, as seen from outside.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CoreAdvice {
    pub core: usize,
    /// Depth cap in force (`None`: no tuner).
    pub depth: Option<u32>,
    pub target_p99_us: Option<f64>,
    /// Measured: queue depth, smoothed p99 (µs), smoothed IOPS, windows.
    pub curve: Vec<(u32, f64, f64, u64)>,
    pub slope: f64,
    pub confidence: f64,
    pub advice: Vec<String>,
}

impl std::fmt::Display for Recommendations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.per_core {
            match c.depth {
                Some(d) => writeln!(f, "core {}: queue depth {d}", c.core)?,
                None => writeln!(f, "core {}:", c.core)?,
            }
            for a in &c.advice {
                writeln!(f, "  - {a}")?;
            }
        }
        Ok(())
    }
}

/// A poller's 100 ms measurement window, kept when a tuner or a window sink wants it: the
/// same [`Window`](crate::window::Window) a bench job keeps (one histogram update per
/// completion), handed to the sink and to the tuner when it closes.
struct Meter {
    /// Submission time per slot.
    started: Box<[Instant]>,
    win: crate::window::Window,
    t0: Instant,
    start: Instant,
    /// Depth cap in force.
    limit: u32,
    /// Heat-map column of a byte offset `o`: `(o * heat_mul) >> 64`.
    heat_mul: u128,
}

impl Meter {
    const LEN: Duration = Duration::from_millis(100);

    /// One completed read or write of `bytes`.
    #[inline]
    fn record(&mut self, c: &Completion, bytes: u64, now: Instant) {
        let ns = now
            .saturating_duration_since(self.started[c.token as usize])
            .as_nanos() as u64;
        let slice = ((c.offset as u128 * self.heat_mul) >> 64) as usize;
        self.win.record(c.op, bytes, ns, slice);
    }

    /// Closes the window if it is due: hands it to the sink, feeds the tuner (which may move
    /// the cap), and starts the next.
    /// Returns the submission batch the tuner chose, if it decided.
    fn maybe_close(&mut self, now: Instant, cs: &CoreShared, batch: u32) -> Option<u32> {
        let len = now.saturating_duration_since(self.start);
        if len < Self::LEN {
            return None;
        }
        let mut chosen = None;
        let core = cs.core;
        if self.win.ios() > 0 {
            self.win.len = len;
            self.win.iodepth = self.limit;
            self.win.batch = batch;
            self.win.measuring = true;
            if let Some(sink) = &cs.sink {
                sink.window(&self.win);
            }
        }
        if let Some(tuner) = &cs.tuner
            && self.win.ios() > 0
        {
            let w = &self.win;
            let mean = w.mean_ns();
            let mut t = tuner.lock().unwrap_or_else(|p| p.into_inner());
            let span = tracing::info_span!("tune.decision", core, qd = tracing::field::Empty);
            let _in = span.enter();
            let d = t.observe(self.limit, w.pct(99.0), mean, w.iops(), w.ios());
            span.record("qd", d.qd);
            self.limit = t.depth();
            chosen = Some(t.batch());
            tracing::debug!(
                target: "rio::tune",
                core,
                qd_was = d.qd_was,
                qd = d.qd,
                reason = ?d.reason,
                measured_p99_us = d.measured_p99_us,
                measured_iops = d.measured_iops,
                predicted_p99_us = d.predicted_p99_us,
                confidence = d.confidence,
                "runtime queue depth decision"
            );
        }
        self.win.reset(now.saturating_duration_since(self.t0));
        self.start = now;
        chosen
    }
}

/// One core's poller: owns the queue and is the pool's home thread for that core.
struct Poller {
    engine: Arc<Engine>,
    pools: Arc<Pools>,
    shared: Arc<CoreShared>,
    stop: Arc<AtomicBool>,
    depth: u32,
    idle: IdlePolicy,
}

impl Poller {
    /// Pool growth: map the core's new regions for DMA before a buffer from them is used.
    /// Called after each request is taken (the pool announces a region before any of its
    /// buffers can be taken, and the request was sent after its buffer was taken, so the
    /// generation read here covers that buffer); one atomic load and compare when nothing
    /// changed, inlined (it runs before every submission), the mapping out of line.
    #[inline(always)]
    fn sync_regions(&self, q: &mut Queue, generation: &mut u64, known: &mut usize) {
        match self.pools.generation(self.shared.core) {
            Ok(g) if g != *generation => self.map_new_regions(q, g, generation, known),
            _ => {}
        }
    }

    #[cold]
    #[inline(never)]
    fn map_new_regions(&self, q: &mut Queue, g: u64, generation: &mut u64, known: &mut usize) {
        let core = self.shared.core;
        *generation = g;
        if let Ok(regions) = self.pools.regions(core) {
            let seen = *known;
            for r in regions.iter().filter(|r| r.id as usize >= seen) {
                // SAFETY: as for the initial regions (setup in `run`): the pools, held
                // through self.pools, keep the region mapped until their unmapping hook has
                // taken it out of this queue.
                if let Err(e) = unsafe { q.add_region(r.ptr, r.len, r.pages) } {
                    tracing::error!(core, error = %e, "cannot map a new pool region");
                }
                *known = (*known).max(r.id as usize + 1);
            }
        }
    }

    fn run(self, ready: Sender<Result<()>>) {
        let core = self.shared.core;
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            tracing::warn!(core, "could not pin the poller thread");
        }
        let setup = || -> Result<(crate::pool::OwnerGuard, Queue, u64, usize)> {
            let guard =
                self.pools
                    .bind_current_thread(core)
                    .map_err(|e| Error::BufferUnavailable {
                        requested: 0,
                        reason: e.to_string(),
                    })?;
            // The generation first: a region added between the two reads is then seen as
            // new by sync_regions (and mapped once: it skips ids below `known`).
            let generation = self.pools.generation(core).unwrap_or(0);
            let regions = self
                .pools
                .regions(core)
                .map_err(|e| Error::BufferUnavailable {
                    requested: 0,
                    reason: e.to_string(),
                })?;
            let regs: Vec<_> = regions.iter().map(|r| (r.ptr, r.len, r.pages)).collect();
            // SAFETY: the pools (held by this poller through `self.pools`, and by the runtime)
            // outlive the queue, which is dropped at the end of `run`; regions are never
            // unmapped while a queue maps them (see `Runtime::start`: the runtime's pools keep
            // their memory until they are dropped, after every poller has exited).
            let q = unsafe { self.engine.queue_with_regions(self.depth, 1 << 20, &regs)? };
            let known = regions
                .iter()
                .map(|r| r.id)
                .max()
                .map_or(0, |m| m as usize + 1);
            Ok((guard, q, generation, known))
        };
        let (guard, mut q, mut regions) = match setup() {
            Ok((g, q, generation, known)) => {
                let _ = ready.send(Ok(()));
                (g, q, (generation, known))
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let cs = &*self.shared;
        // Blocking in the kernel needs the ring to read the wake-up eventfd.
        let can_block = cs
            .wake_fd
            .as_ref()
            .is_some_and(|fd| q.set_wake_fd(Arc::clone(fd)));
        let mut inflight = InFlight((0..cs.slots.len()).map(|_| Held::default()).collect());
        // The completions waiting for the handler (at most a slot each: no growth). What
        // handlers and tasks hand over above the depth cap is `exit.local`, below.
        let mut dones: Vec<Done> = Vec::with_capacity(cs.slots.len());
        // Slots of tagged operations completed in this poll, for the handlers' resubmissions;
        // what they leave goes back to the shared free list before the next poll.
        let mut free_local: Vec<u32> = Vec::with_capacity(cs.slots.len());
        // Slots handlers submitted in this poll, to be stamped for the meter.
        let mut stamp: Vec<u32> = Vec::with_capacity(cs.slots.len());
        let mut comps: Vec<Completion> = Vec::with_capacity(self.depth as usize);
        let mut empty = 0u32;
        let mut last_maintain = Instant::now();
        let size = self.engine.target().geometry.size.max(1);
        // A directory runtime serves host files, whose reads may run past their end (a range
        // widened to the O_DIRECT alignment): short there is the end of the file, which
        // `Files` takes as a count, so the windows count it as a read, not a failure.
        let short_is_eof = self.engine.target().geometry.size == 0;
        let mut meter = (cs.tuner.is_some() || cs.sink.is_some()).then(|| Meter {
            started: vec![Instant::now(); cs.slots.len()].into_boxed_slice(),
            win: crate::window::Window::new(cs.index),
            t0: Instant::now(),
            start: Instant::now(),
            limit: cs.tuner.as_ref().map_or(self.depth, |t| {
                t.lock().unwrap_or_else(|p| p.into_inner()).depth()
            }),
            // A directory runtime (size 0) serves many files: no heat map of offsets.
            heat_mul: if self.engine.target().geometry.size == 0 {
                0
            } else {
                ((crate::window::HEAT_BUCKETS as u128) << 64) / size as u128
            },
        });
        ON_POLLER.with(|c| c.set(Arc::as_ptr(&self.shared)));
        // The tasks, closed when the loop ends, also by an unwind (a run-to-completion
        // handler's panic): their handles then say cancelled, and spawns are refused.
        let mut exit = PollerExit {
            cs,
            tasks: task::Tasks::new(),
            // First in, first out: a request that waits is not overtaken by later ones.
            local: std::collections::VecDeque::with_capacity(cs.slots.len()),
        };
        let mut polls_after_stop = 0u32;
        // Which list `feed` takes from first: the two alternate, so neither the tasks' and
        // handlers' overflow nor the other threads' inbox can starve the other.
        let mut inbox_first = false;
        loop {
            let limit = meter.as_ref().map_or(self.depth, |m| m.limit);
            // What waits (other threads' requests, the overflow of tasks and handlers) goes
            // first to the room the last poll made: tasks, which run next and submit straight
            // to the queue, would otherwise take all of it while they keep it full.
            let mut work = self.feed(
                &mut q,
                &mut exit.local,
                &mut inbox_first,
                &mut inflight,
                &mut dones,
                &mut regions,
                meter.is_some().then_some(&mut stamp),
                limit,
            );
            // Woken tasks run first. While they run, what they submit goes straight to the
            // queue (below the depth cap): the queue and the poller's tables are published
            // to them through `TASK_DIRECT`, and this loop touches none of them meanwhile.
            let direct = TaskDirect {
                poller: &self,
                q: &mut q,
                inflight: inflight.as_mut_ptr(),
                regions: &mut regions,
                limit,
                stamp: if meter.is_some() {
                    &mut stamp
                } else {
                    std::ptr::null_mut()
                },
            };
            TASK_DIRECT.with(|c| c.set(&direct));
            work |= exit.tasks.run(&self.shared);
            TASK_DIRECT.with(|c| c.set(std::ptr::null()));
            // SAFETY: this is the poller thread, the only one that touches `reqs`, and no
            // other reference to it is live during this call.
            let reqs = unsafe { &mut *cs.tasks.reqs.get() };
            if !reqs.is_empty() {
                // Each request holds a slot, so both lists together fit `local`'s capacity.
                exit.local.extend(reqs.drain(..));
            }
            work |= self.feed(
                &mut q,
                &mut exit.local,
                &mut inbox_first,
                &mut inflight,
                &mut dones,
                &mut regions,
                meter.is_some().then_some(&mut stamp),
                limit,
            );
            // What was fed and what tasks sent to the queue starts now (one clock read for
            // all of it), with the poll that hands it to the device.
            if let Some(m) = &mut meter
                && !stamp.is_empty()
            {
                let now = Instant::now();
                for slot in stamp.drain(..) {
                    m.started[slot as usize] = now;
                }
            }
            // `comps` is empty here, or holds what a kernel wait (below) reaped.
            if let Err(e) = q.poll(&mut comps) {
                tracing::warn!(core, error = %e, "poll reported an error");
            }
            if let Some(m) = &mut meter
                && !comps.is_empty()
            {
                let now = Instant::now();
                for c in &comps {
                    match &c.result {
                        // Flushes and the like carry no data: they would skew the write
                        // latency the window reports.
                        Ok(_) if matches!(c.op, OpKind::Read | OpKind::Write) => {
                            m.record(c, c.len, now)
                        }
                        Ok(_) => {}
                        Err(crate::error::IoError {
                            kind: crate::error::IoErrorKind::Short { done },
                            ..
                        }) if short_is_eof && c.op == OpKind::Read => {
                            m.record(c, u64::from(*done), now)
                        }
                        Err(e) => {
                            if let Some(sink) = &cs.sink {
                                sink.io_error(cs.index, e);
                            }
                        }
                    }
                }
                if let Some(b) = m.maybe_close(now, cs, q.submit_batch()) {
                    q.set_submit_batch(b);
                }
            }
            if !comps.is_empty() {
                work = true;
                // Read once per poll: a handler's resubmissions are refused once it is set.
                let stop = self.stop.load(Ordering::Acquire);
                // The cap as the window just closed (if it did) left it.
                let limit = meter.as_ref().map_or(self.depth, |m| m.limit);
                // One `Resubmit` for the whole poll (built for each completion, it cost ~20
                // instructions per I/O on the inline model): the loop reaches the poller's
                // in-flight table and free list through it too.
                let mut rs = Resubmit {
                    cs,
                    local: &mut exit.local,
                    free: &mut free_local,
                    stop,
                    now: Some(Direct {
                        poller: &self,
                        q: &mut q,
                        inflight: &mut inflight,
                        dones: &mut dones,
                        regions: &mut regions,
                        limit,
                        stamp: meter.is_some().then_some(&mut stamp),
                    }),
                };
                for c in comps.drain(..) {
                    let Some(d) = rs.now.as_mut() else {
                        unreachable!("set above, and a handler cannot unset it")
                    };
                    let held = std::mem::take(&mut d.inflight[c.token as usize]);
                    match (held.tag, &cs.on_complete) {
                        // Run-to-completion: the handler runs here, one completion at a time
                        // (no staging of `Done`s). The slot goes back first, to this poller's
                        // own list: a handler that resubmits takes it again without an atomic.
                        (Some(tag), Some(h)) => {
                            rs.free.push(c.token as u32);
                            h(
                                Done {
                                    tag,
                                    result: c.result.map_err(Error::Io),
                                    buf: held.buf,
                                },
                                &mut rs,
                            );
                        }
                        // A tag without a handler cannot be submitted (`submit_tagged` refuses).
                        (Some(_), None) => {
                            let _ = cs.free.push(c.token as u32);
                        }
                        (None, _) => {
                            complete(cs, c.token as u32, c.result.map_err(Error::Io), held.buf)
                        }
                    }
                }
            }
            // Tagged operations that failed at submission (`Poller::submit`).
            if !dones.is_empty()
                && let Some(h) = &cs.on_complete
            {
                work = true;
                let mut rs = Resubmit {
                    cs,
                    local: &mut exit.local,
                    free: &mut free_local,
                    stop: self.stop.load(Ordering::Acquire),
                    // Resubmissions of failed submissions wait for the next poll (no
                    // recursion through `dones`).
                    now: None,
                };
                for d in dones.drain(..) {
                    h(d, &mut rs);
                }
            }
            // What the handlers submitted is stamped with the next poll, which hands it to
            // the device (with what is fed and what tasks send before it).
            // Slots the handlers did not take again: back where every submitter finds them.
            for slot in free_local.drain(..) {
                let _ = cs.free.push(slot);
            }
            // Shutting down with nothing in flight or queued: done once a poll found nothing to
            // do, or after a thousand polls in which only tasks ran (a task that keeps itself
            // runnable, yielding in a loop, must not keep the poller, and `shutdown`, waiting).
            if self.stop.load(Ordering::Acquire)
                && q.in_flight() == 0
                && cs.inbox.is_empty()
                && exit.local.is_empty()
                && !cs.tasks.pending_from_others()
            {
                polls_after_stop += 1;
                if !work || polls_after_stop > 1000 {
                    break;
                }
            }
            if work {
                empty = 0;
                continue;
            }
            // Idle: slots kept for this thread's tasks go back where every submitter finds them.
            task::Tasks::give_back_slots(cs);
            empty = empty.saturating_add(1);
            // An idle poller still closes its last window (for the sink and the tuner).
            if empty.is_multiple_of(1024)
                && let Some(m) = &mut meter
                && m.win.ios() > 0
                && let Some(b) = m.maybe_close(Instant::now(), cs, q.submit_batch())
            {
                q.set_submit_batch(b);
            }
            if empty.is_multiple_of(1024)
                && q.in_flight() == 0
                && last_maintain.elapsed() >= MAINTAIN_EVERY
            {
                last_maintain = Instant::now();
                self.maintain(&mut q);
            }
            let (polls, mut max_sleep, block) = match self.idle {
                IdlePolicy::BusyPoll => {
                    std::hint::spin_loop();
                    continue;
                }
                IdlePolicy::SleepAfter { polls, max_sleep } => (polls, max_sleep, false),
                IdlePolicy::Block { spin, max_sleep } => (spin, max_sleep, can_block),
            };
            if cs.tasks.slot_wanted() {
                // A future on this thread waits for a slot. A slot that another thread frees
                // (taking its result, dropping its future) does not wake this poller (that
                // would cost every such free a fence): it looks again this often instead.
                if !cs.free.is_empty() {
                    continue;
                }
                max_sleep = max_sleep.min(SLOT_WAIT_NAP);
            }
            if empty < polls {
                std::hint::spin_loop();
            } else if q.in_flight() == 0 {
                // Buffers the host dropped on this thread sit in its private stash: a host
                // thread waiting in `Runtime::buffer` could not take them while this poller
                // sleeps.
                guard.flush();
                cs.sleeping.store(true, Ordering::SeqCst);
                // Pairs with the fence of a task's spawn or wake from another thread.
                std::sync::atomic::fence(Ordering::SeqCst);
                if cs.inbox.is_empty()
                    && !cs.tasks.pending_from_others()
                    && !self.stop.load(Ordering::Acquire)
                {
                    std::thread::park_timeout(max_sleep);
                }
                cs.sleeping.store(false, Ordering::SeqCst);
            } else if block {
                // As before parking: buffers dropped on this thread go where others find them.
                guard.flush();
                cs.in_kernel.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                if cs.inbox.is_empty()
                    && !cs.tasks.pending_from_others()
                    && !self.stop.load(Ordering::Acquire)
                {
                    // What completed meanwhile lands in `comps`, handled with the next poll.
                    match q.wait_or_wake(max_sleep, &mut comps) {
                        Ok(Some(_)) => {}
                        Ok(None) => std::hint::spin_loop(),
                        Err(e) => tracing::warn!(core, error = %e, "wait reported an error"),
                    }
                }
                cs.in_kernel.store(false, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        // Nothing in flight: the tasks still waiting (on something other than this queue)
        // are dropped, and so is any spawned from now on (`exit`'s drop).
        drop(exit);
    }

    /// Submit waiting requests while the queue is below `limit`: from the poller's own list
    /// (what tasks and handlers handed over) and the inbox (other threads), alternately;
    /// their slots go to `stamp` (with a meter). Returns whether it submitted any.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn feed(
        &self,
        q: &mut Queue,
        local: &mut std::collections::VecDeque<Request>,
        inbox_first: &mut bool,
        inflight: &mut [Held],
        dones: &mut Vec<Done>,
        regions: &mut (u64, usize),
        mut stamp: Option<&mut Vec<u32>>,
        limit: u32,
    ) -> bool {
        let cs = &*self.shared;
        let mut fed = false;
        while q.in_flight() < limit {
            let req = if *inbox_first {
                cs.inbox.pop().or_else(|| local.pop_front())
            } else {
                local.pop_front().or_else(|| cs.inbox.pop())
            };
            let Some(req) = req else {
                break;
            };
            *inbox_first = !*inbox_first;
            fed = true;
            self.sync_regions(q, &mut regions.0, &mut regions.1);
            if let Some(stamp) = stamp.as_deref_mut() {
                // Stamped with the poll that hands it to the device.
                stamp.push(req.slot);
            }
            self.submit(q, req, inflight, dones);
        }
        fed
    }

    /// Give idle pool memory back (adaptive pools): the pool unmaps regions whose buffers are
    /// all free and idle; the hook takes each out of this queue first.
    fn maintain(&self, q: &mut Queue) {
        let core = self.shared.core;
        POLLER_QUEUE.with(|c| c.set((q as *mut Queue, core)));
        let r = self.pools.maintain(core);
        POLLER_QUEUE.with(|c| c.set((std::ptr::null_mut(), usize::MAX)));
        match r {
            Ok(0) => {}
            Ok(n) => tracing::debug!(core, bytes = n, "pool memory given back"),
            Err(e) => tracing::warn!(core, error = %e, "pool maintenance failed"),
        }
    }

    fn submit(
        &self,
        q: &mut Queue,
        mut req: Request,
        inflight: &mut [Held],
        dones: &mut Vec<Done>,
    ) {
        let (addr, len) = data_of(&mut req.buf, req.op, req.len);
        let r = match &req.file {
            // SAFETY: the buffer is kept in `inflight` (owned by this poller) until the
            // completion of this token is reaped; it lies in a pool region the queue maps.
            None => unsafe { q.submit_raw(req.op, req.offset, addr, len, req.slot as u64) },
            // SAFETY: as above, and the file is kept open by the `Arc` held in `inflight`
            // until then too.
            Some(f) => unsafe {
                use std::os::fd::AsFd;
                q.submit_fd(
                    req.op,
                    f.as_fd(),
                    req.offset,
                    addr,
                    len,
                    req.slot as u64,
                    req.cached,
                )
            },
        };
        match r {
            Ok(()) => inflight[req.slot as usize].hold(req.buf.take(), req.file.take(), req.tag),
            Err(e) => match req.tag {
                Some(tag) => {
                    let _ = self.shared.free.push(req.slot);
                    dones.push(Done {
                        tag,
                        result: Err(e),
                        buf: req.buf.take(),
                    });
                }
                None => complete(&self.shared, req.slot, Err(e), req.buf.take()),
            },
        }
    }
}

/// A poller's in-flight table. If the poller's loop unwinds (a handler's panic) with I/O in
/// flight, the device or the kernel may still write into the buffers it holds after the
/// queue is gone: they are leaked, never handed back to the pool for reuse. (On a normal exit
/// nothing is in flight and the table is empty.)
struct InFlight(Vec<Held>);

impl std::ops::Deref for InFlight {
    type Target = Vec<Held>;
    fn deref(&self) -> &Vec<Held> {
        &self.0
    }
}

impl std::ops::DerefMut for InFlight {
    fn deref_mut(&mut self) -> &mut Vec<Held> {
        &mut self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::mem::forget(std::mem::take(&mut self.0));
        }
    }
}

/// What the poller keeps for an operation in flight: its buffer and, for a host file, the
/// file (so neither is freed or closed under the kernel).
#[derive(Default)]
struct Held {
    buf: Option<PoolBuf>,
    _file: Option<Arc<std::os::fd::OwnedFd>>,
    /// A run-to-completion operation's tag.
    tag: Option<u64>,
}

impl Held {
    /// Fill this entry for an operation just submitted. It is empty (taken when its last
    /// operation completed), so nothing is dropped: the out-of-line drop of a `PoolBuf` is
    /// called only if that ever fails to hold.
    #[inline]
    fn hold(
        &mut self,
        buf: Option<PoolBuf>,
        file: Option<Arc<std::os::fd::OwnedFd>>,
        tag: Option<u64>,
    ) {
        let old = std::mem::replace(
            self,
            Held {
                buf,
                _file: file,
                tag,
            },
        );
        if old.buf.is_some() || old._file.is_some() {
            drop(old);
        } else {
            std::mem::forget(old);
        }
    }
}

/// The address and length a submission hands the queue: a read or write moves its buffer's
/// length from its start; other operations carry no data.
#[inline]
fn data_of(buf: &mut Option<PoolBuf>, op: OpKind, len: u64) -> (*mut u8, u64) {
    let addr = buf
        .as_mut()
        .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
    let len = match (&*buf, op) {
        (Some(b), OpKind::Read | OpKind::Write) => b.len() as u64,
        _ => len,
    };
    (addr, len)
}

thread_local! {
    /// The queue of the poller running on this thread, while it runs pool maintenance.
    static POLLER_QUEUE: std::cell::Cell<(*mut Queue, usize)> =
        const { std::cell::Cell::new((std::ptr::null_mut(), usize::MAX)) };
}

/// Unmapping hook: take the region out of this poller's queue, or refuse (not on a poller
/// thread, another core's region, or I/O in flight).
fn release_from_poller_queue(ev: &crate::pool::RegionEvent) -> std::result::Result<(), String> {
    let (q, core) = POLLER_QUEUE.with(|c| c.get());
    if q.is_null() || core != ev.core {
        return Err("only the core's poller may release its pool regions".into());
    }
    // SAFETY: set by `Poller::maintain` to its own queue for the duration of the call that
    // runs this hook, on this thread; no other reference to the queue is live meanwhile.
    let q = unsafe { &mut *q };
    q.remove_region(ev.region.ptr).map_err(|e| e.to_string())
}

/// Hand a result to the slot's future (or, if the future is gone, drop it and free the slot).
#[inline(always)]
fn complete(cs: &CoreShared, slot: u32, res: Result<u64>, buf: Option<PoolBuf>) {
    let s = &cs.slots[slot as usize];
    if s.local_only.load(Ordering::Relaxed) {
        // A `LocalIo`: it and this poller share the thread, nothing races.
        if s.state.load(Ordering::Relaxed) == PENDING {
            // SAFETY: PENDING: the future has not taken a result; only this thread accesses
            // the slot.
            unsafe { (*s.result.get()).set(res, buf) };
            s.state.store(DONE, Ordering::Release);
            wake_local(s);
        } else {
            // Abandoned (the future was dropped in flight): the slot is free again.
            drop((res, buf));
            s.state.store(FREE, Ordering::Release);
            cs.free_local(slot);
        }
        return;
    }
    // SAFETY: the slot is PENDING or ABANDONED: only this poller accesses the result until the
    // state becomes DONE (released by the CAS below).
    unsafe { (*s.result.get()).set(res, buf) };
    match s
        .state
        .compare_exchange(PENDING, DONE, Ordering::SeqCst, Ordering::Acquire)
    {
        Ok(_) => {
            wake_local(s);
            // A future polled elsewhere (or moved elsewhere after a poll here).
            if s.remote.load(Ordering::SeqCst) {
                s.waker.wake();
            }
        }
        Err(_) => {
            // Abandoned: nobody will poll it (and a waker it registered will not be woken).
            // SAFETY: ABANDONED: the future is gone; only this poller sees the slot.
            unsafe { (*s.result.get()).clear() };
            drop(s.waker.take());
            s.state.store(FREE, Ordering::Release);
            let _ = cs.free.push(slot);
        }
    }
}

/// Wake the task on this poller that waits for `s`, if one does: by reference, its waker left
/// in place (the task's next I/O on this slot registers without a clone). Taken out for the
/// call, so a waker that polls the future inline (allowed, if odd) finds the cell free.
#[inline(always)]
fn wake_local(s: &Slot) {
    // SAFETY: called by the poller (on its thread), the only thread that touches
    // `local_waker`; no reference into the cell is held across the wake.
    if let Some(w) = unsafe { (*s.local_waker.get()).take() } {
        w.wake_by_ref();
        // SAFETY: as above.
        let cell = unsafe { &mut *s.local_waker.get() };
        if cell.is_none() {
            *cell = Some(w);
        }
    }
}

/// The runtime reads its settings from the engine's knobs (`rio::config` is plain data and knows
/// none of its readers).
impl crate::config::EngineConfig {
    /// The runtime's configuration (pools, pollers) from these knobs: pools capped at
    /// `buffer_pool_bytes` per core, on hugepages when `hugepages`.
    pub fn runtime_config(&self) -> RuntimeConfig {
        use crate::pool::{PagePolicy, PoolConfig, Strategy};
        let pool = PoolConfig {
            initial_per_class: self.pool_initial_buffers,
            max_bytes_per_core: self.buffer_pool_bytes,
            strategy: if self.pool_adaptive {
                PoolConfig::default().strategy
            } else {
                Strategy::Fixed
            },
            zero_on_free: self.pool_zero_on_free,
            pages: if self.hugepages {
                PagePolicy::Huge2M
            } else {
                PagePolicy::Normal
            },
            ..PoolConfig::default()
        };
        RuntimeConfig {
            depth: self.queue_depth,
            idle: if self.busy_poll {
                IdlePolicy::BusyPoll
            } else {
                IdlePolicy::default()
            },
            pool,
            prefetch: crate::tune::PrefetchConfig {
                enabled: self.prefetch,
                budget: self.prefetch_budget_bytes,
            },
            target_p99: self.target_latency_us.map(std::time::Duration::from_micros),
            ..RuntimeConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::sim::{Latency, SimConfig, SimNamespace};
    use crate::target::OpenOptions;
    use std::time::Duration;

    /// Polls `f` on this thread until it is ready (a parking waker).
    fn block_on<F: Future + Unpin>(mut f: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(out) = Pin::new(&mut f).poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    }

    /// A runtime on the model, one core, whose completion handler panics (ending the
    /// poller), once `gate` (if any) is set; each command held 20 ms.
    fn dying_runtime(depth: u32, gate: Option<Arc<AtomicBool>>) -> Arc<Runtime> {
        let cfg = crate::EngineConfig {
            hugepages: false,
            ..crate::EngineConfig::default()
        };
        let sim = SimConfig {
            namespaces: vec![SimNamespace {
                block_size: 512,
                size_bytes: 16 << 20,
            }],
            latency: Latency::Fixed(Duration::from_millis(20)),
            ..SimConfig::default()
        };
        let opts = OpenOptions {
            write: true,
            direct: true,
            create: false,
        };
        let e = Engine::open_sim(&cfg, sim, 1, opts).unwrap();
        let handler: CompletionHandler = Arc::new(move |_d: Done, _rs: &mut Resubmit<'_>| {
            // The poller waits here (at most 20 s) until the test has done what needs it
            // alive.
            let until = Instant::now() + Duration::from_secs(20);
            while gate.as_ref().is_some_and(|g| !g.load(Ordering::SeqCst)) && Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("boom in a completion handler (expected by this test)");
        });
        Runtime::start(
            e,
            RuntimeConfig {
                cores: Some(vec![0]),
                depth,
                idle: IdlePolicy::SleepAfter {
                    polls: 100,
                    max_sleep: Duration::from_millis(1),
                },
                pool: crate::pool::PoolConfig {
                    pages: crate::pool::PagePolicy::Normal,
                    initial_per_class: 8,
                    ..crate::pool::PoolConfig::default()
                },
                on_complete: Some(handler),
                ..RuntimeConfig::default()
            },
        )
        .unwrap()
    }

    /// `fut`'s output, polled on another thread; None after 20 s.
    fn resolve(fut: IoFuture) -> Option<IoOutput> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(block_on(fut));
        });
        rx.recv_timeout(Duration::from_secs(20)).ok()
    }

    /// `fut` fails with the dead poller's error; returns the buffer it gave back. `what` names
    /// it if it waits 20 s instead (the runtime is then leaked, not joined).
    fn fails_gone(rt: &Arc<Runtime>, fut: IoFuture, what: &str) -> Option<PoolBuf> {
        let Some(out) = resolve(fut) else {
            std::mem::forget(Arc::clone(rt));
            panic!("{what} waited 20 s");
        };
        let IoFailure { error: e, buf } = *out.expect_err("an I/O on a dead poller succeeded");
        assert!(e.to_string().contains("handler panicked"), "{e}");
        buf
    }

    /// Every slot of `cs` but `leaked` is on its free list, each once: a slot completed
    /// twice is pushed twice. (`leaked`: the slot of the operation whose handler panicked,
    /// which the unwinding poller never frees.)
    fn slots_free_once(cs: &CoreShared, leaked: usize) {
        let mut free: Vec<u32> = std::iter::from_fn(|| cs.free.pop()).collect();
        for &f in &free {
            let _ = cs.free.push(f);
        }
        free.sort_unstable();
        let listed = free.len();
        free.dedup();
        assert_eq!(listed, free.len(), "a slot is on the free list twice");
        assert_eq!(
            listed,
            cs.slots.len() - leaked,
            "slots missing from the free list"
        );
        assert!(
            free.iter()
                .all(|&f| cs.slots[f as usize].state.load(Ordering::SeqCst) == FREE)
        );
    }

    /// A submission from another thread that passed the `closed` (or `stop`) check before
    /// the poller ended, armed and queued after its exit (what `submit` does past the
    /// check): its future.
    fn late_submission(cs: &Arc<CoreShared>) -> IoFuture {
        let slot = cs.free.pop().expect("a free slot");
        let epoch = cs.arm_remote(slot);
        cs.issue(false, slot, OpKind::Flush, 0, 0, None, None, false);
        IoFuture {
            cs: Arc::clone(cs),
            word: io_word(slot, epoch),
        }
    }

    /// Waits until the dead poller's exit has failed what waited.
    fn wait_drained(cs: &CoreShared) {
        let until = Instant::now() + Duration::from_secs(20);
        while !cs.dead.lock().unwrap_or_else(|p| p.into_inner()).drained {
            assert!(Instant::now() < until, "the poller did not end in 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A read queued behind the depth when its poller dies fails once, with its buffer.
    #[test]
    fn a_request_queued_when_its_poller_dies_fails_once_with_its_buffer() {
        let gate = Arc::new(AtomicBool::new(false));
        let rt = dying_runtime(1, Some(Arc::clone(&gate)));
        let cs = Arc::clone(&rt.cores[0]);
        let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
        // The flush fills the depth; the read waits behind it; the flush's handler panics
        // only once the read is queued.
        rt.submit_tagged(OpKind::Flush, 0, 0, None, 1).unwrap();
        let read = rt.submit(OpKind::Read, 0, 4096, Some(buf));
        gate.store(true, Ordering::SeqCst);
        wait_drained(&cs);
        let buf = fails_gone(&rt, read, "a read queued on a poller that died");
        assert_eq!(
            buf.map(|b| b.len()),
            Some(4096),
            "the read's buffer came back"
        );
        // Failed once: its slot is free again, not failed a second time meanwhile.
        slots_free_once(&cs, 1);
        rt.shutdown();
    }

    /// A submission that passed the `closed` check just before its core's poller died, and
    /// armed its slot and queued its request only after the poller's exit had failed what
    /// waited (the race `fail_late` closes, staged here step by step): its future fails
    /// instead of waiting forever.
    #[test]
    fn a_submission_that_raced_its_pollers_death_fails_instead_of_waiting() {
        let rt = dying_runtime(8, None);
        let cs = Arc::clone(&rt.cores[0]);
        rt.submit_tagged(OpKind::Flush, 0, 0, None, 1).unwrap();
        // The handler's panic ends the poller; its exit fails what waits.
        wait_drained(&cs);
        // Two late submitters: the first to poll fails both (each is failed once).
        let (a, b) = (late_submission(&cs), late_submission(&cs));
        fails_gone(&rt, a, "a submission that raced its poller's death");
        fails_gone(&rt, b, "a second submission that raced its poller's death");
        slots_free_once(&cs, 1);
        rt.shutdown();
    }

    /// A late future whose waker polls another late future inline (allowed, if odd), both
    /// claimed by the same `fail_late`: every result is published before any waker runs, so
    /// the inner poll finds its result instead of waiting for a claimer that is up the
    /// stack (it hung when each slot was completed and woken in turn).
    #[test]
    fn a_waker_polling_another_late_future_inline_finds_it_failed() {
        struct PollsOther {
            other: Mutex<Option<IoFuture>>,
            out: Mutex<Option<IoOutput>>,
        }
        impl std::task::Wake for PollsOther {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref()
            }
            fn wake_by_ref(self: &Arc<Self>) {
                let mut other = self.other.lock().unwrap();
                if let Some(f) = other.as_mut() {
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    if let Poll::Ready(out) = Pin::new(f).poll(&mut cx) {
                        *self.out.lock().unwrap() = Some(out);
                        *other = None;
                    }
                }
            }
        }
        let rt = dying_runtime(8, None);
        let cs = Arc::clone(&rt.cores[0]);
        rt.submit_tagged(OpKind::Flush, 0, 0, None, 1).unwrap();
        wait_drained(&cs);
        let (a, b) = (late_submission(&cs), late_submission(&cs));
        let slot = |f: &IoFuture| (f.word as u32) >> 1;
        // The lower slot is claimed and completed first: its waker polls the other.
        let (first, second) = if slot(&a) < slot(&b) { (a, b) } else { (b, a) };
        let inline = Arc::new(PollsOther {
            other: Mutex::new(Some(second)),
            out: Mutex::new(None),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Arc::clone(&inline);
        std::thread::spawn(move || {
            let waker = std::task::Waker::from(w);
            let mut first = first;
            let out = Pin::new(&mut first).poll(&mut Context::from_waker(&waker));
            let _ = tx.send(out.is_ready());
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(ready) => assert!(ready, "the first late future did not fail at once"),
            Err(_) => {
                std::mem::forget(rt);
                panic!("a waker polling another late future inline hung");
            }
        }
        let out = inline.out.lock().unwrap().take();
        let e = out
            .expect("the inner poll found its result")
            .expect_err("an I/O on a dead poller succeeded")
            .error;
        assert!(e.to_string().contains("handler panicked"), "{e}");
        rt.shutdown();
    }

    /// The same race with a shutdown: a submission past the runtime's `stop` check, queued
    /// after its poller's last look at the inbox, fails as shut down.
    #[test]
    fn a_submission_that_raced_a_shutdown_fails_instead_of_waiting() {
        let rt = dying_runtime(8, None);
        let cs = Arc::clone(&rt.cores[0]);
        rt.shutdown();
        let fut = late_submission(&cs);
        let Some(out) = resolve(fut) else {
            std::mem::forget(rt);
            panic!("a submission that raced a shutdown waited 20 s");
        };
        let e = out.expect_err("an I/O after shutdown succeeded").error;
        assert!(e.to_string().contains("shut down"), "{e}");
        slots_free_once(&cs, 0);
    }
}
