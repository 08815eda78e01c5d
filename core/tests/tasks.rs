//! Tasks on the pollers (`Runtime::spawn`): futures polled on a poller's own thread, their I/O
//! handed to its queue without crossing a thread. On the software controller model, through the
//! real NVMe driver.
//!
//! A failing wait never hangs the test: handles are joined with a timeout, and a runtime whose
//! poller may be stuck is leaked rather than shut down (shutting down joins the poller).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rio::nvme::sim::{Latency, SimConfig, SimNamespace};
use rio::pool::{PagePolicy, PoolConfig};
use rio::runtime::{IdlePolicy, JoinError, JoinHandle, Runtime, RuntimeConfig};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, OpKind};

fn runtime(latency: Latency, depth: u32, idle: IdlePolicy) -> Arc<Runtime> {
    runtime_with(latency, depth, idle, None)
}

fn runtime_with(
    latency: Latency,
    depth: u32,
    idle: IdlePolicy,
    on_complete: Option<rio::runtime::CompletionHandler>,
) -> Arc<Runtime> {
    let cfg = EngineConfig {
        hugepages: false,
        ..EngineConfig::default()
    };
    let sim = SimConfig {
        namespaces: vec![SimNamespace {
            block_size: 512,
            size_bytes: 64 << 20,
        }],
        latency,
        ..SimConfig::default()
    };
    let e = Engine::open_sim(
        &cfg,
        sim,
        1,
        OpenOptions {
            write: true,
            direct: true,
            create: false,
        },
    )
    .unwrap();
    Runtime::start(
        e,
        RuntimeConfig {
            cores: Some(vec![0]),
            depth,
            idle,
            pool: PoolConfig {
                pages: PagePolicy::Normal,
                initial_per_class: 64,
                ..PoolConfig::default()
            },
            on_complete,
            ..RuntimeConfig::default()
        },
    )
    .unwrap()
}

fn sleepy() -> IdlePolicy {
    IdlePolicy::SleepAfter {
        polls: 1000,
        max_sleep: Duration::from_millis(1),
    }
}

/// The task's output, or a failed test that leaves the (possibly stuck) runtime alone.
fn join<T>(h: JoinHandle<T>, rt: &Arc<Runtime>, what: &str) -> Result<T, JoinError> {
    match h.join_timeout(Duration::from_secs(20)) {
        Ok(out) => out,
        Err(_) => {
            std::mem::forget(Arc::clone(rt));
            panic!("{what}: the task did not finish in 20 s");
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

/// Write then read back, in a task on the poller.
async fn write_then_read(rt: Arc<Runtime>, k: u64) -> Result<String, String> {
    let on = std::thread::current().name().unwrap_or("").to_string();
    let data = pattern(k, 8192);
    let mut b = rt.try_buffer(8192).ok_or("no buffer")?;
    b.as_mut_slice().copy_from_slice(&data);
    let (n, b) = rt
        .submit(OpKind::Write, k * 8192, 8192, Some(b))
        .await
        .map_err(|f| f.to_string())?;
    assert_eq!(n, 8192);
    let mut b = b.ok_or("the write gave its buffer back")?;
    b.as_mut_slice().fill(0);
    let (n, b) = rt
        .submit(OpKind::Read, k * 8192, 8192, Some(b))
        .await
        .map_err(|f| f.to_string())?;
    assert_eq!(n, 8192);
    if b.as_ref().map(|b| b.as_slice()) != Some(&data[..]) {
        return Err(format!("task {k}: the data read back differs"));
    }
    Ok(on)
}

#[test]
fn tasks_run_on_the_poller_and_read_back_what_they_wrote() {
    let rt = runtime(Latency::None, 32, sleepy());
    let handles: Vec<_> = (0..16)
        .map(|k| rt.spawn(write_then_read(Arc::clone(&rt), k)))
        .collect();
    for (k, h) in handles.into_iter().enumerate() {
        let on = join(h, &rt, "write then read")
            .expect("the task finished")
            .unwrap_or_else(|e| panic!("task {k}: {e}"));
        assert_eq!(on, "rio-poll-0", "task {k} ran on {on}, not the poller");
    }
    rt.shutdown();
    assert_eq!(rt.pools().in_use(), 0, "every buffer is back in its pool");
}

#[test]
fn more_tasks_than_slots_wait_for_slots_on_the_poller() {
    // Depth 4: 64 slots. 400 tasks each with a flush in flight at once, on a model that holds
    // each command 1 ms: most find no slot and must wait on the poller's thread, which is
    // also the only thread that frees them. (Flushes: no buffer each, so the pool is not
    // what runs out.)
    let rt = runtime(Latency::Fixed(Duration::from_millis(1)), 4, sleepy());
    let done = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..400u64)
        .map(|k| {
            let (rt2, done) = (Arc::clone(&rt), Arc::clone(&done));
            rt.spawn(async move {
                let (n, b) = rt2
                    .submit(OpKind::Flush, 0, 0, None)
                    .await
                    .map_err(|f| format!("task {k}: {f}"))?;
                assert!(b.is_none());
                done.fetch_add(1, Ordering::Relaxed);
                Ok::<u64, String>(n)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(join(h, &rt, "400 tasks").expect("finished"), Ok(0));
    }
    assert_eq!(done.load(Ordering::Relaxed), 400);
    rt.shutdown();
    assert_eq!(rt.pools().in_use(), 0, "every buffer is back in its pool");
}

#[test]
fn a_panicking_task_ends_alone() {
    let rt = runtime(Latency::None, 32, sleepy());
    let h = rt.spawn(async { panic!("boom in a task") });
    match join(h, &rt, "panicking task") {
        Err(e @ JoinError::Panicked(_)) => assert_eq!(e.message(), Some("boom in a task")),
        Err(e) => panic!("expected a panic, got {e}"),
        Ok(()) => panic!("expected a panic, the task finished"),
    }
    // The poller and its queue go on.
    let h = rt.spawn(write_then_read(Arc::clone(&rt), 3));
    join(h, &rt, "after the panic").unwrap().unwrap();
    rt.shutdown();
}

/// A future completed by another thread: its wake comes from off the poller.
#[derive(Clone, Default)]
struct Flag(Arc<Mutex<(bool, Option<Waker>)>>);

impl Flag {
    fn set(&self) {
        let w = {
            let mut s = self.0.lock().unwrap();
            s.0 = true;
            s.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl Future for Flag {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.lock().unwrap();
        if s.0 {
            return Poll::Ready(());
        }
        s.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[test]
fn a_wake_from_another_thread_reaches_a_sleeping_poller() {
    // The poller sleeps up to a minute when idle: only the wake's own unpark gets the task
    // going within the join's 20 s.
    let rt = runtime(
        Latency::None,
        32,
        IdlePolicy::SleepAfter {
            polls: 100,
            max_sleep: Duration::from_secs(60),
        },
    );
    let flag = Flag::default();
    let (f, rt2) = (flag.clone(), Arc::clone(&rt));
    let h = rt.spawn(async move {
        f.await;
        write_then_read(rt2, 5).await
    });
    // Let the task run once and the poller go to sleep.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!h.is_finished());
    assert!(
        rt.poller_parked(0),
        "the poller sleeps while its task waits"
    );
    flag.set();
    join(h, &rt, "woken from another thread").unwrap().unwrap();
    // A task spawned while the poller sleeps wakes it too.
    std::thread::sleep(Duration::from_millis(100));
    let h = rt.spawn(write_then_read(Arc::clone(&rt), 6));
    join(h, &rt, "spawned onto a sleeping poller")
        .unwrap()
        .unwrap();
    rt.shutdown();
}

#[test]
fn shutdown_cancels_waiting_tasks_and_refuses_new_ones() {
    let rt = runtime(Latency::None, 32, sleepy());
    let h = rt.spawn(std::future::pending::<()>());
    std::thread::sleep(Duration::from_millis(20));
    rt.shutdown();
    assert!(matches!(
        join(h, &rt, "waiting task"),
        Err(JoinError::Cancelled)
    ));
    let h = rt.spawn(async { 1 });
    assert!(matches!(
        join(h, &rt, "after shutdown"),
        Err(JoinError::Cancelled)
    ));
    assert!(
        rt.spawn_on(1, async {}).is_err(),
        "one poller: index 1 refused"
    );
}

#[test]
fn a_task_may_shut_down_the_runtime_it_holds_last() {
    let rt = runtime(Latency::None, 32, sleepy());
    let rt2 = Arc::clone(&rt);
    let h = rt.spawn(async move {
        let r = write_then_read(Arc::clone(&rt2), 9).await;
        // The poller cannot wait for itself to exit: this returns, the poller exits after.
        rt2.shutdown();
        r
    });
    drop(rt);
    match h.join_timeout(Duration::from_secs(20)) {
        Ok(out) => {
            out.unwrap().unwrap();
        }
        // The runtime is gone from here; a stuck poller is leaked with it.
        Err(_) => panic!("a task that shut its own runtime down did not finish in 20 s"),
    }
}

/// `write_then_read` through `submit_local`, in a task built on the poller.
async fn write_then_read_local(rt: Arc<Runtime>, k: u64) -> Result<u64, String> {
    // Not Send: a task made by `spawn_local` may hold this across awaits.
    let seen = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let data = pattern(k, 8192);
    let mut b = rt.try_buffer(8192).ok_or("no buffer")?;
    b.as_mut_slice().copy_from_slice(&data);
    let (n, b) = rt
        .submit_local(OpKind::Write, k * 8192, 8192, Some(b))
        .await
        .map_err(|f| f.to_string())?;
    seen.set(seen.get() + n);
    let mut b = b.ok_or("the write gave its buffer back")?;
    b.as_mut_slice().fill(0);
    let (n, b) = rt
        .submit_local(OpKind::Read, k * 8192, 8192, Some(b))
        .await
        .map_err(|f| f.to_string())?;
    seen.set(seen.get() + n);
    if b.as_ref().map(|b| b.as_slice()) != Some(&data[..]) {
        return Err(format!("task {k}: the data read back differs"));
    }
    Ok(seen.get())
}

#[test]
fn local_tasks_read_back_what_they_wrote() {
    let rt = runtime(Latency::None, 32, sleepy());
    let handles: Vec<_> = (0..16)
        .map(|k| {
            let rt2 = Arc::clone(&rt);
            rt.spawn_local(move || write_then_read_local(rt2, k))
        })
        .collect();
    for (k, h) in handles.into_iter().enumerate() {
        let n = join(h, &rt, "local write then read")
            .expect("the task finished")
            .unwrap_or_else(|e| panic!("task {k}: {e}"));
        assert_eq!(n, 16384);
    }
    // Off the poller, submit_local is an ordinary submission.
    let b = rt.try_buffer(4096).unwrap();
    let w = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut f = std::pin::pin!(rt.submit_local(OpKind::Read, 0, 4096, Some(b)));
    let t0 = std::time::Instant::now();
    let (n, b) = loop {
        if let Poll::Ready(r) = f.as_mut().poll(&mut Context::from_waker(&w)) {
            break r.map_err(|f| f.error).unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no completion");
        std::thread::park_timeout(Duration::from_millis(10));
    };
    assert_eq!(n, 4096);
    assert_eq!(b.unwrap().as_slice(), &pattern(0, 8192)[..4096]);
    rt.shutdown();
    assert_eq!(rt.pools().in_use(), 0, "every buffer is back in its pool");
}

struct Unpark(std::thread::Thread);
impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

#[test]
fn local_futures_wait_for_slots_and_free_them_when_dropped_in_flight() {
    // 64 slots, each command held 2 ms. First 200 local futures made and dropped at once
    // (abandoned in flight, most waiting for a slot): the poller must free every slot they
    // held, or the 400 tasks after them could never all get one.
    let rt = runtime(Latency::Fixed(Duration::from_millis(2)), 4, sleepy());
    let rt2 = Arc::clone(&rt);
    let h = rt.spawn_local(move || async move {
        let futs: Vec<_> = (0..200u64)
            .map(|k| {
                let b = rt2.try_buffer(4096);
                rt2.submit_local(OpKind::Read, k * 4096, 4096, b)
            })
            .collect();
        drop(futs);
    });
    join(h, &rt, "dropping in flight").unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..400u64)
        .map(|k| {
            let (rt2, done) = (Arc::clone(&rt), Arc::clone(&done));
            rt.spawn_local(move || async move {
                let (n, _) = rt2
                    .submit_local(OpKind::Flush, 0, 0, None)
                    .await
                    .map_err(|f| format!("task {k}: {f}"))?;
                done.fetch_add(1, Ordering::Relaxed);
                Ok::<u64, String>(n)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(join(h, &rt, "400 local tasks").expect("finished"), Ok(0));
    }
    assert_eq!(done.load(Ordering::Relaxed), 400);
    rt.shutdown();
    assert_eq!(rt.pools().in_use(), 0, "every buffer is back in its pool");
}

#[test]
fn a_panic_while_making_a_local_task_ends_it_alone() {
    let rt = runtime(Latency::None, 32, sleepy());
    let h = rt.spawn_local(|| -> std::future::Ready<()> { panic!("boom while making") });
    match join(h, &rt, "panicking constructor") {
        Err(e @ JoinError::Panicked(_)) => assert_eq!(e.message(), Some("boom while making")),
        Err(e) => panic!("expected a panic, got {e}"),
        Ok(()) => panic!("expected a panic, the task finished"),
    }
    let rt2 = Arc::clone(&rt);
    let h = rt.spawn_local(move || write_then_read_local(rt2, 2));
    join(h, &rt, "after the panic").unwrap().unwrap();
    rt.shutdown();
    // A local task spawned after shutdown is never made: cancelled.
    assert!(matches!(
        join(rt.spawn_local(|| async { 1 }), &rt, "after shutdown"),
        Err(JoinError::Cancelled)
    ));
}

/// Pending once, waking itself: a task awaiting it in a loop is always runnable.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[test]
fn shutdown_ends_a_task_that_keeps_itself_runnable() {
    let rt = runtime(Latency::None, 32, sleepy());
    let h = rt.spawn(async {
        loop {
            YieldNow(false).await;
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    let (tx, rx) = std::sync::mpsc::channel();
    let rt2 = Arc::clone(&rt);
    std::thread::spawn(move || {
        rt2.shutdown();
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        std::mem::forget(rt);
        panic!("shutdown did not return in 20 s beside a task that keeps itself runnable");
    }
    assert!(matches!(
        join(h, &rt, "yielding task"),
        Err(JoinError::Cancelled)
    ));
}

#[test]
fn submit_tagged_on_the_poller_with_no_free_slot_is_refused_not_waited_for() {
    let handled = Arc::new(AtomicU64::new(0));
    let h2 = Arc::clone(&handled);
    let handler: rio::runtime::CompletionHandler = Arc::new(
        move |_d: rio::runtime::Done, _rs: &mut rio::runtime::Resubmit<'_>| {
            h2.fetch_add(1, Ordering::Relaxed);
        },
    );
    // 64 slots, each command held 20 ms: the task holds every slot with its own futures.
    let rt = runtime_with(
        Latency::Fixed(Duration::from_millis(20)),
        4,
        sleepy(),
        Some(handler),
    );
    let rt2 = Arc::clone(&rt);
    let h = rt.spawn_local(move || async move {
        let held: Vec<_> = (0..64)
            .map(|_| rt2.submit_local(OpKind::Flush, 0, 0, None))
            .collect();
        let r = rt2.submit_tagged(OpKind::Flush, 0, 0, None, 1);
        for f in held {
            f.await.map_err(|f| f.to_string())?;
        }
        match r {
            Err(f) if matches!((&f.error, &f.buf), (rio::Error::QueueFull { .. }, None)) => Ok(()),
            Err(f) => Err(format!("refused with {f}, not QueueFull")),
            Ok(()) => Err("taken with every slot held".to_string()),
        }
    });
    join(h, &rt, "submit_tagged on the poller")
        .unwrap()
        .unwrap();
    rt.shutdown();
    assert_eq!(handled.load(Ordering::Relaxed), 0);
}

/// Run `f` to its end on this thread (parks between polls).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A future that is ready at once and panics when dropped.
struct PanicOnDrop(&'static str);

impl Future for PanicOnDrop {
    type Output = u32;
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<u32> {
        Poll::Ready(7)
    }
}

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("{}", self.0);
    }
}

#[test]
fn a_panic_in_a_finished_tasks_drop_does_not_stop_the_poller() {
    let rt = runtime(Latency::None, 32, sleepy());
    // The task's output is delivered; its future panics when the poller drops it after.
    let h = rt.spawn(PanicOnDrop("boom in a finished task's drop"));
    assert_eq!(join(h, &rt, "panicking drop").expect("finished"), 7);
    // The poller survived it: its next task runs and its queue serves it.
    let h = rt.spawn(write_then_read(Arc::clone(&rt), 11));
    join(h, &rt, "after the panicking drop").unwrap().unwrap();
    rt.shutdown();
    assert_eq!(rt.pools().in_use(), 0, "every buffer is back in its pool");
}

/// Pending until dropped, which panics.
struct PendingPanicOnDrop;

impl Future for PendingPanicOnDrop {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
}

impl Drop for PendingPanicOnDrop {
    fn drop(&mut self) {
        panic!("boom in a waiting task's drop");
    }
}

/// How many events said a panic was caught on a poller (a process-wide subscriber: the
/// events come from the pollers' threads).
fn panics_reported() -> u64 {
    use tracing::field::{Field, Visit};
    static SEEN: AtomicU64 = AtomicU64::new(0);
    struct Count;
    struct Message(bool);
    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" && format!("{value:?}").contains("panicked on a poller") {
                self.0 = true;
            }
        }
    }
    impl tracing::Subscriber for Count {
        // Errors only: the rest of the process's logging stays off (and cheap).
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            *m.level() == tracing::Level::ERROR
        }
        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Some(tracing::level_filters::LevelFilter::ERROR)
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            let mut m = Message(false);
            e.record(&mut m);
            if m.0 {
                SEEN.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        tracing::subscriber::set_global_default(Count).expect("the only subscriber");
    });
    SEEN.load(Ordering::SeqCst)
}

#[test]
fn a_panic_in_a_tasks_drop_at_shutdown_still_cancels_the_others() {
    let before = panics_reported();
    let rt = runtime(Latency::None, 32, sleepy());
    // First in the poller's slab, so dropped first at shutdown.
    let bad = rt.spawn(PendingPanicOnDrop);
    let others: Vec<_> = (0..3)
        .map(|_| rt.spawn(std::future::pending::<()>()))
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    rt.shutdown();
    assert!(matches!(
        join(bad, &rt, "the task whose drop panics"),
        Err(JoinError::Cancelled)
    ));
    for h in others {
        assert!(matches!(
            join(h, &rt, "a task dropped after the panicking one"),
            Err(JoinError::Cancelled)
        ));
    }
    // Caught and reported on the poller (not propagated out of its thread). At least one:
    // other tests in this process may report theirs meanwhile.
    assert!(
        panics_reported() > before,
        "the panic in the task's drop was not caught on the poller"
    );
}

#[test]
fn join_error_is_send_and_sync_and_keeps_the_payload() {
    fn send_sync<T: Send + Sync + std::error::Error + 'static>(_: &T) {}
    let rt = runtime(Latency::None, 32, sleepy());
    let h = rt.spawn(async { std::panic::panic_any(42u64) });
    let e = join(h, &rt, "panic with a number").unwrap_err();
    send_sync(&e);
    match e {
        JoinError::Panicked(p) => {
            assert_eq!(p.message(), None);
            assert_eq!(
                p.into_payload().downcast::<u64>().ok().map(|b| *b),
                Some(42)
            );
        }
        JoinError::Cancelled => panic!("expected a panic"),
    }
    rt.shutdown();
}

#[test]
fn a_task_waiting_for_a_slot_another_thread_frees_does_not_sleep_out_the_idle_timeout() {
    // Depth 16: 64 slots. This thread holds all of them with finished, untaken flushes; a
    // task then finds none. The poller, idle, would sleep up to a minute: the slot this
    // thread frees after must reach the task well within the join's 20 s.
    let rt = runtime(
        Latency::None,
        16,
        IdlePolicy::SleepAfter {
            polls: 100,
            max_sleep: Duration::from_secs(60),
        },
    );
    let mut held: Vec<_> = (0..64)
        .map(|_| rt.submit(OpKind::Flush, 0, 0, None))
        .collect();
    let rt2 = Arc::clone(&rt);
    let h = rt.spawn(async move {
        rt2.submit(OpKind::Flush, 0, 0, None)
            .await
            .map(|(n, _)| n)
            .map_err(|f| f.to_string())
    });
    // The task ran and waits; the poller has nothing else to do and goes to sleep.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!h.is_finished(), "the task found a slot free");
    // One slot back, from this thread: its flush is done, its result never taken.
    drop(held.pop());
    assert_eq!(join(h, &rt, "waiting for a slot").unwrap(), Ok(0));
    drop(held);
    rt.shutdown();
}

#[test]
fn tasks_that_keep_the_queue_full_do_not_starve_other_threads() {
    // Depth 2, each command held 1 ms, and eight tasks each flushing in a loop: there is
    // always a task ready for the room a completion makes. A flush from another thread
    // must still get its turn.
    let rt = runtime(Latency::Fixed(Duration::from_millis(1)), 2, sleepy());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (rt2, stop, served) = (Arc::clone(&rt), Arc::clone(&stop), Arc::clone(&served));
            rt.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rt2.submit(OpKind::Flush, 0, 0, None)
                        .await
                        .map_err(|f| f.to_string())?;
                    if n == 0 {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
                Ok::<u64, String>(n)
            })
        })
        .collect();
    // Each task gets its turn too (their overflow waits in order, not last in first out).
    for _ in 0..2000 {
        if served.load(Ordering::Relaxed) == 8 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if served.load(Ordering::Relaxed) != 8 {
        stop.store(true, Ordering::Relaxed);
        std::mem::forget(rt);
        panic!(
            "only {} of 8 busy tasks had a flush done in 20 s",
            served.load(Ordering::Relaxed)
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let rt2 = Arc::clone(&rt);
    std::thread::spawn(move || {
        let r = block_on(rt2.submit(OpKind::Flush, 0, 0, None));
        let _ = tx.send(r.map(|(n, _)| n).map_err(|f| f.to_string()));
    });
    let r = rx.recv_timeout(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    match r {
        Ok(r) => assert_eq!(r, Ok(0)),
        Err(_) => {
            std::mem::forget(rt);
            panic!("another thread's flush did not get in within 20 s beside busy tasks");
        }
    }
    for h in tasks {
        join(h, &rt, "busy task").unwrap().unwrap();
    }
    rt.shutdown();
}

#[test]
fn a_poller_ended_by_a_handlers_panic_fails_what_waits_and_refuses_what_comes() {
    let handler: rio::runtime::CompletionHandler = Arc::new(
        |_d: rio::runtime::Done, _rs: &mut rio::runtime::Resubmit<'_>| {
            panic!("boom in a completion handler");
        },
    );
    // Each command held 300 ms: the tagged flush completes (and its handler panics) while
    // the plain one, sent 100 ms later, is still in flight.
    let rt = runtime_with(
        Latency::Fixed(Duration::from_millis(300)),
        32,
        sleepy(),
        Some(handler),
    );
    assert!(rt.submit_tagged(OpKind::Flush, 0, 0, None, 1).is_ok());
    std::thread::sleep(Duration::from_millis(100));
    let in_flight = rt.submit(OpKind::Flush, 0, 0, None);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(block_on(in_flight).is_err());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(failed) => assert!(failed, "an I/O in flight on a poller that died succeeded"),
        Err(_) => {
            std::mem::forget(rt);
            panic!("an I/O in flight on a poller that died waited 20 s");
        }
    }
    // The handler's panic ends the poller. Spawns made before that run; after, they must
    // be refused (cancelled), not left waiting for a poller that is gone.
    let mut refused = false;
    for _ in 0..200 {
        match rt.spawn(async {}).join_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => std::thread::sleep(Duration::from_millis(10)),
            Ok(Err(JoinError::Cancelled)) => {
                refused = true;
                break;
            }
            Ok(Err(e)) => panic!("unexpected: {e}"),
            Err(_) => {
                std::mem::forget(rt);
                panic!("a task spawned on a dead poller waited 20 s");
            }
        }
    }
    assert!(refused, "the poller never ended");
    // A submission from another thread fails at once instead of waiting in the inbox.
    let (tx, rx) = std::sync::mpsc::channel();
    let rt2 = Arc::clone(&rt);
    std::thread::spawn(move || {
        let r = block_on(rt2.submit(OpKind::Flush, 0, 0, None));
        let _ = tx.send(r.is_err());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(failed) => assert!(failed, "a submission to a dead poller succeeded"),
        Err(_) => {
            std::mem::forget(rt);
            panic!("a submission to a dead poller waited 20 s");
        }
    }
    rt.shutdown();
}

#[test]
fn tasks_on_two_pollers_shutting_down_at_once_do_not_wait_for_each_other() {
    // Two pollers, a task on each, both calling `shutdown`: a poller must not wait for the
    // other to exit (each would wait for the other).
    let cfg = EngineConfig {
        hugepages: false,
        ..EngineConfig::default()
    };
    let e = Engine::open_sim(
        &cfg,
        SimConfig {
            namespaces: vec![SimNamespace {
                block_size: 512,
                size_bytes: 16 << 20,
            }],
            ..SimConfig::default()
        },
        1,
        OpenOptions {
            write: true,
            direct: true,
            create: false,
        },
    )
    .unwrap();
    let rt = Runtime::start(
        e,
        RuntimeConfig {
            cores: Some(vec![0, 1]),
            idle: sleepy(),
            pool: PoolConfig {
                pages: PagePolicy::Normal,
                initial_per_class: 8,
                ..PoolConfig::default()
            },
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    // The first task's `shutdown` runs first; the second's while the first is still in its
    // call (when it used to be waiting for the second's poller to exit). Both block their
    // pollers meanwhile, a test's shortcut.
    let first_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (rt2, first_in) = (Arc::clone(&rt), Arc::clone(&first_in));
            rt.spawn_on(i, async move {
                if i == 0 {
                    first_in.store(true, Ordering::SeqCst);
                } else {
                    while !first_in.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                rt2.shutdown();
            })
            .expect("two pollers")
        })
        .collect();
    for h in handles {
        if h.join_timeout(Duration::from_secs(20)).is_err() {
            std::mem::forget(rt);
            panic!("a task that shut the runtime down from its poller did not finish in 20 s");
        }
    }
    // From this thread, the pollers' exit is waited for.
    rt.shutdown();
}
