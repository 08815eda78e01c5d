//! The runtime's run-to-completion API (`RuntimeConfig::on_complete`, `Runtime::submit_tagged`,
//! `Resubmit`): completions reach the handler on the poller with their tag, data and buffer;
//! a handler keeps a queue depth by resubmitting; failures arrive typed; shutdown ends even
//! while handlers resubmit; no heap allocation per I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rio::config::BackendChoice;
use rio::pool::{PagePolicy, PoolConfig};
use rio::runtime::{CompletionHandler, Done, IdlePolicy, Resubmit, Runtime, RuntimeConfig};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, Error, OpKind};

#[path = "support/alloc_count.rs"]
mod alloc_count;

#[global_allocator]
static GLOBAL: alloc_count::Counting = alloc_count::Counting;

/// Tests here share the allocation counter: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BLOCKS: u64 = 1024;
const QD: u64 = 16;

/// A file whose 4 KiB block `i` is filled with the byte `i % 251`.
fn data_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("blocks");
    let mut v = Vec::with_capacity((BLOCKS * 4096) as usize);
    for i in 0..BLOCKS {
        v.extend(std::iter::repeat_n((i % 251) as u8, 4096));
    }
    std::fs::write(&p, v).unwrap();
    (d, p)
}

fn start(path: &std::path::Path, handler: CompletionHandler) -> Arc<Runtime> {
    start_with(path, handler, None)
}

fn start_with(
    path: &std::path::Path,
    handler: CompletionHandler,
    sink: Option<Arc<dyn rio::WindowSink + Send>>,
) -> Arc<Runtime> {
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        hugepages: false,
        ..EngineConfig::default()
    };
    let e = Engine::open(&cfg, path.to_str().unwrap(), OpenOptions::default()).unwrap();
    Runtime::start(
        e,
        RuntimeConfig {
            cores: Some(vec![0]),
            depth: 32,
            idle: IdlePolicy::SleepAfter {
                polls: 1000,
                max_sleep: Duration::from_millis(1),
            },
            pool: PoolConfig {
                pages: PagePolicy::Normal,
                initial_per_class: 64,
                ..PoolConfig::default()
            },
            on_complete: Some(handler),
            sink,
            ..RuntimeConfig::default()
        },
    )
    .unwrap()
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    // Bounded: the work is a few thousand reads; a minute means something is stuck.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// State the handler of the QD test shares with the test.
struct Tally {
    seen: Vec<AtomicU64>,
    done: AtomicU64,
    bad: AtomicU64,
    refused: AtomicU64,
    total: u64,
}

impl Tally {
    fn new(total: u64) -> Arc<Tally> {
        Arc::new(Tally {
            seen: (0..total).map(|_| AtomicU64::new(0)).collect(),
            done: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            total,
        })
    }
}

/// The QD lanes of `qd_handler`: tags 0..QD, each its first read.
fn start_lanes(rt: &Runtime) {
    for tag in 0..QD {
        let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
        rt.submit_tagged(OpKind::Read, (tag % BLOCKS) * 4096, 4096, Some(buf), tag)
            .unwrap();
    }
}

fn qd_handler(t: Arc<Tally>) -> CompletionHandler {
    Arc::new(move |d: Done, rs: &mut Resubmit<'_>| {
        let Done { tag, result, buf } = d;
        let buf = buf.expect("a read hands its buffer back");
        let want = ((tag % BLOCKS) % 251) as u8;
        if result.is_err() || buf.as_slice().iter().any(|&b| b != want) {
            t.bad.fetch_add(1, Ordering::Relaxed);
        }
        t.seen[tag as usize].fetch_add(1, Ordering::Relaxed);
        let n = t.done.fetch_add(1, Ordering::Relaxed) + 1;
        // Keep QD reads in flight: the next tag of this lane, same buffer.
        let next = tag + QD;
        if next < t.total
            && rs
                .submit(OpKind::Read, (next % BLOCKS) * 4096, 4096, Some(buf), next)
                .is_err()
        {
            t.refused.fetch_add(1, Ordering::Relaxed);
        }
        let _ = n;
    })
}

#[test]
fn a_handler_keeps_the_depth_and_every_read_arrives_once_with_its_data() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, path) = data_file();
    let total = 20_000u64;
    let t = Tally::new(total);
    let rt = start(&path, qd_handler(Arc::clone(&t)));
    start_lanes(&rt);
    // Measure allocations once the lanes run: none per I/O on the poller.
    wait_until("the first thousand reads", || {
        t.done.load(Ordering::Relaxed) >= 1000
    });
    alloc_count::arm();
    let from = t.done.load(Ordering::Relaxed);
    wait_until("ten thousand more reads", || {
        t.done.load(Ordering::Relaxed) >= from + 10_000
    });
    let allocs = alloc_count::disarm();
    wait_until("every read", || t.done.load(Ordering::Relaxed) == total);
    assert_eq!(
        t.bad.load(Ordering::Relaxed),
        0,
        "a read failed or carried the wrong data"
    );
    assert_eq!(
        t.refused.load(Ordering::Relaxed),
        0,
        "a resubmission was refused"
    );
    for (i, s) in t.seen.iter().enumerate() {
        assert_eq!(
            s.load(Ordering::Relaxed),
            1,
            "tag {i} completed {s:?} times"
        );
    }
    // The buffers went home (dropped by the handler after the last read of each lane).
    wait_until("buffers back in the pool", || rt.pools().in_use() == 0);
    rt.shutdown();
    // Counted on the poller and on this thread (which only sleeps and reads counters).
    assert_eq!(
        allocs,
        0,
        "{allocs} heap allocations over 10,000 reads: {}",
        alloc_count::allocations_seen()
    );
}

/// Windows of the reads a sink is given.
#[derive(Default)]
struct Reads {
    ios: AtomicU64,
    min_p50_ns: AtomicU64,
}

impl rio::WindowSink for Reads {
    fn window(&self, w: &rio::Window) {
        self.ios.fetch_add(w.read.ios, Ordering::Relaxed);
        self.min_p50_ns.fetch_min(w.pct(50.0), Ordering::Relaxed);
    }
}

/// With a meter (a telemetry sink), every read a handler resubmitted is counted once in the
/// poller's windows, none lost and none twice, each with a latency above zero.
#[test]
fn a_meter_counts_every_resubmitted_read_once() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, path) = data_file();
    let total = 5_000u64;
    let t = Tally::new(total);
    let sink = Arc::new(Reads {
        ios: AtomicU64::new(0),
        min_p50_ns: AtomicU64::new(u64::MAX),
    });
    let rt = start_with(&path, qd_handler(Arc::clone(&t)), Some(sink.clone()));
    start_lanes(&rt);
    wait_until("every read", || t.done.load(Ordering::Relaxed) == total);
    // The last window closes once the poller is idle.
    wait_until("every read in a window", || {
        sink.ios.load(Ordering::Relaxed) >= total
    });
    assert_eq!(sink.ios.load(Ordering::Relaxed), total);
    assert_eq!(t.bad.load(Ordering::Relaxed), 0);
    assert!(sink.min_p50_ns.load(Ordering::Relaxed) > 0);
    rt.shutdown();
}

#[test]
fn without_a_handler_submit_tagged_is_refused_and_the_buffer_comes_back() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, path) = data_file();
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        hugepages: false,
        ..EngineConfig::default()
    };
    let e = Engine::open(&cfg, path.to_str().unwrap(), OpenOptions::default()).unwrap();
    let rt = Runtime::start(
        e,
        RuntimeConfig {
            cores: Some(vec![0]),
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
    match rt.submit_tagged(OpKind::Read, 0, 4096, Some(buf), 7) {
        Err(f) if matches!((&f.error, &f.buf), (Error::Config { .. }, Some(_))) => {}
        other => panic!("expected a Config error with the buffer back, got {other:?}"),
    }
}

#[test]
fn a_failed_operation_reaches_the_handler_typed_with_its_buffer() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, path) = data_file();
    let got: Arc<Mutex<Vec<(u64, String, bool)>>> = Arc::default();
    let g = Arc::clone(&got);
    let rt = start(
        &path,
        Arc::new(move |d: Done, _: &mut Resubmit<'_>| {
            let what = match &d.result {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("err {e}"),
            };
            g.lock().unwrap().push((d.tag, what, d.buf.is_some()));
        }),
    );
    // Past the end of the file: refused at submission (out of range), reported through the
    // handler, not lost.
    let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
    rt.submit_tagged(OpKind::Read, BLOCKS * 4096, 4096, Some(buf), 42)
        .unwrap();
    let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
    rt.submit_tagged(OpKind::Read, 4096, 4096, Some(buf), 43)
        .unwrap();
    wait_until("both completions", || got.lock().unwrap().len() == 2);
    let mut v = got.lock().unwrap().clone();
    v.sort();
    assert_eq!(v[0].0, 42);
    assert!(v[0].1.starts_with("err"), "{:?}", v[0]);
    assert!(v[0].2, "the failed read's buffer is handed back");
    assert_eq!(v[1], (43, "ok 4096".to_string(), true));
}

/// A handler's resubmission goes to the queue before the handler returns; one the queue
/// refuses (past the end of the file) comes back to the handler as a failed `Done` with its
/// buffer, after the handler returned (no recursion), and the poller goes on.
#[test]
fn a_resubmission_refused_at_submission_reaches_the_handler_with_its_buffer() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, path) = data_file();
    let got: Arc<Mutex<Vec<(u64, String, bool)>>> = Arc::default();
    let depth = Arc::new(AtomicU64::new(0));
    let (g, dp) = (Arc::clone(&got), Arc::clone(&depth));
    let rt = start(
        &path,
        Arc::new(move |d: Done, rs: &mut Resubmit<'_>| {
            assert_eq!(dp.fetch_add(1, Ordering::SeqCst), 0, "a handler re-entered");
            let what = match &d.result {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("err {e}"),
            };
            g.lock().unwrap().push((d.tag, what, d.buf.is_some()));
            match d.tag {
                // Out of range: refused by the queue, not by `Resubmit` (which only checks
                // the buffer's core, the slots and shutdown).
                1 => assert!(
                    rs.submit(OpKind::Read, BLOCKS * 4096, 4096, d.buf, 2)
                        .is_ok()
                ),
                // Then a good one from the failed one's buffer.
                2 => assert!(rs.submit(OpKind::Read, 8192, 4096, d.buf, 3).is_ok()),
                _ => {}
            }
            dp.fetch_sub(1, Ordering::SeqCst);
        }),
    );
    let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
    rt.submit_tagged(OpKind::Read, 4096, 4096, Some(buf), 1)
        .unwrap();
    wait_until("three completions", || got.lock().unwrap().len() == 3);
    let v = got.lock().unwrap().clone();
    assert_eq!(v[0], (1, "ok 4096".to_string(), true));
    assert_eq!(v[1].0, 2);
    assert!(v[1].1.starts_with("err"), "{:?}", v[1]);
    assert!(v[1].2, "the refused read's buffer is handed back");
    assert_eq!(v[2], (3, "ok 4096".to_string(), true));
    wait_until("buffers back in the pool", || rt.pools().in_use() == 0);
    rt.shutdown();
}

#[test]
fn shutdown_ends_while_handlers_resubmit_and_gives_every_buffer_back() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, path) = data_file();
    let refused = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let (r2, d2) = (Arc::clone(&refused), Arc::clone(&done));
    let rt = start(
        &path,
        Arc::new(move |d: Done, rs: &mut Resubmit<'_>| {
            d2.fetch_add(1, Ordering::Relaxed);
            // Forever, until the runtime refuses.
            if let Err(f) = rs.submit(
                OpKind::Read,
                (d.tag % BLOCKS) * 4096,
                4096,
                d.buf,
                d.tag + 1,
            ) {
                assert!(matches!(f.error, Error::BackendUnavailable { .. }), "{f}");
                r2.fetch_add(1, Ordering::Relaxed);
            }
        }),
    );
    for tag in 0..QD {
        let buf = rt.buffer(4096, Duration::from_secs(5)).unwrap();
        rt.submit_tagged(OpKind::Read, tag * 4096, 4096, Some(buf), tag * 1_000_000)
            .unwrap();
    }
    wait_until("some reads", || done.load(Ordering::Relaxed) > 1000);
    rt.shutdown(); // returns only when the poller exited: the test would hang otherwise
    assert_eq!(
        refused.load(Ordering::Relaxed),
        QD,
        "each lane ends with one refusal"
    );
    assert_eq!(rt.pools().in_use(), 0, "every buffer went home");
    match rt.submit_tagged(OpKind::Read, 0, 4096, None, 1) {
        Err(f) if matches!((&f.error, &f.buf), (Error::BackendUnavailable { .. }, None)) => {}
        other => panic!("expected a refusal after shutdown, got {other:?}"),
    }
}
