//! Tasks on the pollers (thread-per-core): futures that a poller thread polls between its
//! queue's polls, so their I/O never crosses a thread.
//!
//! A future polled on another thread hands every request to the poller through the core's
//! inbox and gets its completion back through the slot and the waker: several cache-line
//! transfers between two CPUs per I/O (docs/DESIGN.md, "The runtime's async API"). A task
//! spawned with [`Runtime::spawn`](super::Runtime::spawn) runs on the poller itself: its
//! submissions go straight to that poller's queue, its completions wake it into a run
//! list only that thread touches, and the poller runs every woken task once per poll, so one
//! poll of the queue completes many I/Os and one submission call sends what the tasks asked
//! for next. This is how Seastar, glommio and SPDK's reactors run: the cost is that a task
//! must not block (a blocking call stops the poller and every task and I/O of its core).
//!
//! ```text
//!  spawn ─► spawned[core] (SegQueue) ─► poller(core): slab of tasks
//!                                         │ poll woken tasks ─► Queue (reqs above the cap)
//!                                         └◄─ runq (poller-only) ◄─ waker ◄─ completion
//! ```
//!
//! Wakes from other threads (a task waiting on a channel, say) go through a lock-free queue
//! and unpark the poller. A panic in a task is caught at its poll and handed to its
//! [`JoinHandle`]; the poller and its other tasks go on.

use std::any::Any;
use std::cell::UnsafeCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use super::CoreShared;

/// Why a task gave no output. `Send + Sync` (it can go into `anyhow::Error` and the like).
pub enum JoinError {
    /// The task panicked; [`Panic::into_payload`] gives what it panicked with
    /// ([`std::panic::resume_unwind`] it to propagate).
    Panicked(Panic),
    /// The runtime shut down before the task finished (or was already shut down when it was
    /// spawned): the task was dropped.
    Cancelled,
}

/// A task's panic: its payload, reachable by value or by `&mut` only, so the error can be
/// shared between threads whatever the payload is (a panic payload is `Send`, not `Sync`).
pub struct Panic(Box<dyn Any + Send + 'static>);

// SAFETY: through `&Panic` nothing reaches the payload except `message`, which calls only
// `Any::type_id` (no access to the value) and then reads a `&str` or `String`, both `Sync`.
// Everything else takes `self` or `&mut self`.
unsafe impl Sync for Panic {}

impl Panic {
    /// The panic's message when it was a string, as `std` prints it.
    pub fn message(&self) -> Option<&str> {
        let p = &*self.0;
        p.downcast_ref::<&str>()
            .copied()
            .or_else(|| p.downcast_ref::<String>().map(String::as_str))
    }

    /// What the task panicked with.
    pub fn into_payload(self) -> Box<dyn Any + Send + 'static> {
        self.0
    }

    /// What the task panicked with, to inspect or replace.
    pub fn payload_mut(&mut self) -> &mut (dyn Any + Send + 'static) {
        &mut *self.0
    }
}

impl std::fmt::Debug for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.message() {
            Some(m) => write!(f, "Panic({m:?})"),
            None => f.write_str("Panic(..)"),
        }
    }
}

impl JoinError {
    /// The panic's message when it was a string, as `std` prints it.
    pub fn message(&self) -> Option<&str> {
        match self {
            JoinError::Panicked(p) => p.message(),
            JoinError::Cancelled => None,
        }
    }

    /// Propagate the task's panic on this thread (a `Cancelled` becomes a panic that says so).
    pub fn resume(self) -> ! {
        match self {
            JoinError::Panicked(p) => std::panic::resume_unwind(p.into_payload()),
            JoinError::Cancelled => panic!("{}", JoinError::Cancelled),
        }
    }
}

impl std::fmt::Debug for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Panicked(_) => match self.message() {
                Some(m) => write!(f, "the task panicked: {m}"),
                None => f.write_str("the task panicked"),
            },
            JoinError::Cancelled => f.write_str("the runtime shut down before the task finished"),
        }
    }
}

impl std::error::Error for JoinError {}

/// A task's output, once there is one, and who waits for it.
struct JoinCell<T> {
    state: Mutex<JoinState<T>>,
    done: Condvar,
}

struct JoinState<T> {
    out: Option<Result<T, JoinError>>,
    /// The output was taken (by the handle).
    taken: bool,
    waker: Option<Waker>,
}

impl<T> JoinCell<T> {
    fn new() -> Arc<JoinCell<T>> {
        Arc::new(JoinCell {
            state: Mutex::new(JoinState {
                out: None,
                taken: false,
                waker: None,
            }),
            done: Condvar::new(),
        })
    }

    /// Set the output unless there is one already (a task sets it once; its drop sets
    /// `Cancelled` only if it never did).
    fn set(&self, out: Result<T, JoinError>) {
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.out.is_some() || s.taken {
                return;
            }
            s.out = Some(out);
            s.waker.take()
        };
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Waits for a spawned task: `.await` it (any executor), or [`join`](Self::join) from a
/// thread. Dropping it detaches the task, which runs on.
pub struct JoinHandle<T> {
    cell: Arc<JoinCell<T>>,
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished (its output, or why there is none, is waiting).
    pub fn is_finished(&self) -> bool {
        let s = self.cell.state.lock().unwrap_or_else(|p| p.into_inner());
        s.out.is_some() || s.taken
    }

    /// Block this thread until the task finished. Never call it on a poller thread (from a
    /// task or a completion handler): the task could then never run.
    pub fn join(self) -> Result<T, JoinError> {
        let mut s = self.cell.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(out) = s.out.take() {
                s.taken = true;
                return out;
            }
            s = self.cell.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// [`join`](Self::join) for at most `wait`; the handle comes back if the task is not done.
    pub fn join_timeout(self, wait: Duration) -> Result<Result<T, JoinError>, JoinHandle<T>> {
        let until = Instant::now() + wait;
        {
            let mut s = self.cell.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(out) = s.out.take() {
                    s.taken = true;
                    return Ok(out);
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                s = self
                    .cell
                    .done
                    .wait_timeout(s, until - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Err(self)
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.cell.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(out) = s.out.take() {
            s.taken = true;
            return Poll::Ready(out);
        }
        // Polled again after it gave its output: the Future contract leaves this unspecified;
        // pending forever is the quiet choice.
        if !s.taken {
            match &s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => s.waker = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

/// Drop `v` on the poller: a panic in its drop (a task's future's `Drop`, the waker of a
/// handle it wakes) is reported, not propagated. Unwinding would end the poller thread, and
/// with it every task and I/O of its core.
pub(super) fn drop_on_poller<T>(v: T, what: &str) {
    if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(v))) {
        report_panic(what, p);
    }
}

fn report_panic(what: &str, p: Box<dyn Any + Send + 'static>) {
    let p = Panic(p);
    tracing::error!(
        panic = p.message().unwrap_or("(not a string)"),
        "{what} panicked on a poller; the poller goes on"
    );
    // The payload's own drop could panic too: it is leaked instead.
    std::mem::forget(p);
}

/// The user's future with its output's destination; what a poller holds per task.
struct TaskFut<F: Future> {
    fut: F,
    cell: Arc<JoinCell<F::Output>>,
}

impl<F: Future> Future for TaskFut<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `fut` is structurally pinned: it is never moved out of `self` (no method
        // hands it out, `TaskFut` has no `Unpin` impl of its own, and `Drop` only reads `cell`).
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: as above: `fut` stays where it is for as long as the `TaskFut` lives.
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        let out = match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(v)) => Ok(v),
            Err(p) => Err(JoinError::Panicked(Panic(p))),
        };
        // `set` wakes whoever awaits the handle: a panic in that waker is not this task's,
        // and must not unwind the poller (the output is stored before the wake).
        let cell = &this.cell;
        if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| cell.set(out))) {
            report_panic("a join handle's waker", p);
        }
        Poll::Ready(())
    }
}

impl<F: Future> Drop for TaskFut<F> {
    fn drop(&mut self) {
        // A no-op when the task finished (the cell is set once).
        self.cell.set(Err(JoinError::Cancelled));
    }
}

/// A task as the poller holds it (a `Send` one, or one made on the poller's thread).
pub(super) type LocalTask = Pin<Box<dyn Future<Output = ()> + 'static>>;

/// A task as the spawner hands it to the poller.
pub(super) enum Spawn {
    /// A `Send` future, made by the spawner.
    Task(Pin<Box<dyn Future<Output = ()> + Send + 'static>>),
    /// A constructor run on the poller's thread; its future need not be `Send`. `None` when
    /// the constructor panicked (its handle has the panic).
    Local(Box<dyn FnOnce() -> Option<LocalTask> + Send + 'static>),
}

/// Cancels a handle whose task is dropped before it was made (a `Spawn::Local` never run).
struct CellGuard<T>(Option<Arc<JoinCell<T>>>);

impl<T> Drop for CellGuard<T> {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.set(Err(JoinError::Cancelled));
        }
    }
}

/// Wrap the constructor `f` for a poller; the handle gets its future's output.
pub(super) fn local_task<F, Fut>(f: F) -> (Spawn, JoinHandle<Fut::Output>)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    let cell = JoinCell::new();
    let guard = CellGuard(Some(Arc::clone(&cell)));
    let make = move || -> Option<LocalTask> {
        let mut guard = guard;
        let cell = guard.0.take()?;
        match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(fut) => Some(Box::pin(TaskFut { fut, cell })),
            Err(p) => {
                cell.set(Err(JoinError::Panicked(Panic(p))));
                None
            }
        }
    };
    (Spawn::Local(Box::new(make)), JoinHandle { cell })
}

/// Wrap `fut` for a poller; the handle gets its output.
pub(super) fn task<F>(fut: F) -> (Spawn, JoinHandle<F::Output>)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let cell = JoinCell::new();
    let t = TaskFut {
        fut,
        cell: Arc::clone(&cell),
    };
    (Spawn::Task(Box::pin(t)), JoinHandle { cell })
}

/// A handle whose task never ran (the runtime was shut down).
pub(super) fn cancelled<T>() -> JoinHandle<T> {
    let cell = JoinCell::new();
    cell.set(Err(JoinError::Cancelled));
    JoinHandle { cell }
}

/// A task id: its index in the poller's slab and the generation of that entry, so a stale
/// waker (kept past its task's end) never runs the entry's next task.
fn id_of(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

/// What a task's waker points at.
struct Header {
    id: u64,
    /// Queued to run: a task is queued once however often it is woken before it runs.
    queued: AtomicBool,
    cs: Arc<CoreShared>,
}

impl Wake for Header {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.cs.on_poller() {
            // The poller's own thread (a completion): a load and a store instead of a swap.
            // A wake from another thread racing with it may queue the task twice: one
            // spurious poll, which futures allow.
            if !self.queued.load(Ordering::Acquire) {
                self.queued.store(true, Ordering::Release);
                // SAFETY: on the core's poller thread (checked above), the only thread that
                // touches `runq`; no reference to it is held across this call (the poller
                // swaps the list out before it polls tasks).
                unsafe { (*self.cs.tasks.runq.get()).push(self.id) };
            }
        } else if !self.queued.swap(true, Ordering::AcqRel) {
            self.cs.tasks.wake_remote(&self.cs, self.id);
        }
    }
}

/// What a core's pollers and the other threads share about its tasks.
pub(super) struct CoreTasks {
    /// Tasks spawned on this core, not yet taken by the poller.
    spawned: crossbeam_queue::SegQueue<Spawn>,
    /// Wakes from other threads.
    remote: crossbeam_queue::SegQueue<u64>,
    /// The poller has exited: a task spawned now is dropped (cancelled) by its spawner, and
    /// a submission to the core is refused. Read by every submission from another thread:
    /// on a cache line of its own, not beside the lists the poller writes per I/O.
    closed: crossbeam_utils::CachePadded<AtomicBool>,
    /// Wakes on the poller thread: touched only by that thread.
    pub(super) runq: UnsafeCell<Vec<u64>>,
    /// Requests that tasks (any code on the poller thread) submitted: touched only by that
    /// thread, moved by the poller to the list it feeds in turn with its inbox.
    pub(super) reqs: UnsafeCell<Vec<super::Request>>,
    /// Futures on the poller thread waiting for a free slot: touched only by that thread.
    slot_waiters: UnsafeCell<Vec<Waker>>,
    /// Slots freed on the poller thread, for its own next submissions (no atomic): touched
    /// only by that thread, at most half the slots (the rest stay on the shared list).
    pub(super) free: UnsafeCell<Vec<u32>>,
}

// SAFETY: the `UnsafeCell`s are accessed only from the core's poller thread (each access
// checks `CoreShared::on_poller` first, or runs in the poller's own loop); everything else is
// Sync. What `spawned` holds is Send (a Send future, or a Send constructor).
unsafe impl Sync for CoreTasks {}

impl CoreTasks {
    pub(super) fn new(nslots: usize) -> CoreTasks {
        CoreTasks {
            spawned: crossbeam_queue::SegQueue::new(),
            remote: crossbeam_queue::SegQueue::new(),
            closed: crossbeam_utils::CachePadded::new(AtomicBool::new(false)),
            runq: UnsafeCell::new(Vec::new()),
            reqs: UnsafeCell::new(Vec::with_capacity(nslots)),
            slot_waiters: UnsafeCell::new(Vec::new()),
            free: UnsafeCell::new(Vec::with_capacity(nslots / 2 + 1)),
        }
    }

    fn wake_remote(&self, cs: &CoreShared, id: u64) {
        self.remote.push(id);
        // Pairs with the poller's fence after it announced it sleeps: one side sees the
        // other (the wake, or the poller's flag).
        std::sync::atomic::fence(Ordering::SeqCst);
        cs.wake_poller();
    }

    /// Hand `task` to the poller. False (the task dropped: cancelled) once the poller exited.
    pub(super) fn spawn(&self, cs: &CoreShared, task: Spawn) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        self.spawned.push(task);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            // The poller exited between the check and the push, and may not have drained
            // this one: drop what is left (dropping a task cancels it).
            while let Some(t) = self.spawned.pop() {
                drop(t);
            }
            return false;
        }
        cs.wake_poller();
        true
    }

    /// On the poller thread, a future found no free slot: wake it when one is freed.
    pub(super) fn wait_for_slot(&self, cs: &CoreShared, waker: &Waker) {
        debug_assert!(cs.on_poller());
        // SAFETY: called on the core's poller thread only (the caller checked); no reference
        // to the list is held across calls.
        unsafe { (*self.slot_waiters.get()).push(waker.clone()) };
    }

    /// A future on the poller's thread waits for a free slot. On the poller thread only.
    pub(super) fn slot_wanted(&self) -> bool {
        // SAFETY: on the poller thread (the caller's loop); no reference into the list is
        // held meanwhile.
        !unsafe { &*self.slot_waiters.get() }.is_empty()
    }

    /// The poller is exiting: what is spawned from now on is cancelled, and submissions to
    /// its core are refused.
    pub(super) fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The poller has exited.
    pub(super) fn is_closed(&self) -> bool {
        // SeqCst: a remote future's check pairs with `mark_closed` (see `fail_late`); a
        // plain load on x86 all the same.
        self.closed.load(Ordering::SeqCst)
    }

    /// Anything for the poller to do here (checked before it sleeps).
    pub(super) fn pending_from_others(&self) -> bool {
        !self.spawned.is_empty() || !self.remote.is_empty()
    }
}

/// A poller's tasks: the slab it polls them from. Lives on the poller's stack.
pub(super) struct Tasks {
    slab: Vec<Entry>,
    free: Vec<u32>,
    /// The list swapped with `CoreTasks::runq` to run it.
    running: Vec<u64>,
}

struct Entry {
    generation: u32,
    task: Option<(LocalTask, Arc<Header>, Waker)>,
}

impl Tasks {
    pub(super) fn new() -> Tasks {
        Tasks {
            slab: Vec::new(),
            free: Vec::new(),
            running: Vec::new(),
        }
    }

    /// Take new tasks and wakes from other threads, then poll every woken task once. Returns
    /// whether any task ran. On the poller thread only.
    pub(super) fn run(&mut self, cs: &Arc<CoreShared>) -> bool {
        let ct = &cs.tasks;
        // Futures waiting for a slot: their turn when one is free.
        // SAFETY: the poller thread (this function's caller); the list is not borrowed
        // elsewhere (only `wait_for_slot` touches it, from code the poller runs, not now).
        let waiting = !unsafe { &*ct.slot_waiters.get() }.is_empty();
        // SAFETY: as above.
        if waiting && (!cs.free.is_empty() || !unsafe { &*ct.free.get() }.is_empty()) {
            // Taken out first: a waker that polls inline may register in the list again.
            // SAFETY: as above; no reference into the cell is held across the wakes.
            let waiters = std::mem::take(unsafe { &mut *ct.slot_waiters.get() });
            for w in waiters {
                w.wake();
            }
        }
        while let Some(sp) = ct.spawned.pop() {
            let t = match sp {
                Spawn::Task(t) => t,
                Spawn::Local(make) => match make() {
                    Some(t) => t,
                    None => continue,
                },
            };
            let id = self.insert(cs, t);
            // SAFETY: as for `waiters`: only this thread touches the run list.
            unsafe { (*ct.runq.get()).push(id) };
        }
        while let Some(id) = ct.remote.pop() {
            // SAFETY: as above.
            unsafe { (*ct.runq.get()).push(id) };
        }
        // SAFETY: as above; the run list is swapped out, so wakes during the polls below push
        // into the (empty) list left in the cell and no reference into it is held meanwhile.
        std::mem::swap(&mut self.running, unsafe { &mut *ct.runq.get() });
        if self.running.is_empty() {
            return false;
        }
        let mut running = std::mem::take(&mut self.running);
        for &id in &running {
            let index = id as u32 as usize;
            let Some(e) = self.slab.get_mut(index) else {
                continue;
            };
            if u64::from(e.generation) != id >> 32 {
                continue;
            }
            let Some((fut, header, waker)) = &mut e.task else {
                continue;
            };
            // Cleared before the poll: a wake during it queues the task again.
            header.queued.store(false, Ordering::Release);
            let mut cx = Context::from_waker(waker);
            // TaskFut catches the user's panic; the poll itself does not unwind.
            if fut.as_mut().poll(&mut cx).is_ready() {
                let done = e.task.take();
                e.generation = e.generation.wrapping_add(1);
                self.free.push(index as u32);
                drop_on_poller(done, "a finished task's drop");
            }
        }
        running.clear();
        self.running = running;
        true
    }

    fn insert(&mut self, cs: &Arc<CoreShared>, task: LocalTask) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(Entry {
                    generation: 0,
                    task: None,
                });
                (self.slab.len() - 1) as u32
            }
        };
        let e = &mut self.slab[index as usize];
        let id = id_of(index, e.generation);
        let header = Arc::new(Header {
            id,
            // Queued: it runs once now, which registers its wakers.
            queued: AtomicBool::new(true),
            cs: Arc::clone(cs),
        });
        let waker = Waker::from(Arc::clone(&header));
        e.task = Some((task, header, waker));
        id
    }

    /// Slots in the poller's private list back on the shared one (the poller is idle:
    /// submitters on other threads may be waiting for them).
    pub(super) fn give_back_slots(cs: &CoreShared) {
        // SAFETY: the poller thread, as in `run`.
        let l = unsafe { &mut *cs.tasks.free.get() };
        for slot in l.drain(..) {
            let _ = cs.free.push(slot);
        }
    }

    /// The poller exits: every task left is dropped (its handle says cancelled), and so is
    /// every task spawned from now on.
    pub(super) fn close(&mut self, cs: &CoreShared) {
        cs.tasks.mark_closed();
        while let Some(t) = cs.tasks.spawned.pop() {
            drop_on_poller(t, "a task never run, dropped at shutdown,");
        }
        for e in &mut self.slab {
            drop_on_poller(e.task.take(), "a task dropped at shutdown");
        }
        // SAFETY: the poller thread, as in `run`.
        drop_on_poller(
            std::mem::take(unsafe { &mut *cs.tasks.slot_waiters.get() }),
            "a slot waiter's waker",
        );
        Self::give_back_slots(cs);
        // Tasks' wakers kept in slots hold their core (a cycle: this core, or another whose
        // task awaited an I/O here): let them go. Every operation that waited here was
        // completed by the exit first (`PollerExit::fail_what_waits`), and a future that
        // raced it waits for its completion without a waker (`fail_late`).
        for s in cs.slots.iter() {
            // SAFETY: the poller thread, the only one that touches `local_waker`.
            drop_on_poller(unsafe { (*s.local_waker.get()).take() }, "a task's waker");
            drop_on_poller(s.waker.take(), "a future's waker");
        }
    }
}
