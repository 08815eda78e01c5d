//! The runtime's async API, and its run-to-completion (callback) API, against direct `Queue`
//! use, QD32 held (fio's `iodepth=32`: each completion is resubmitted at once), 4 KiB reads,
//! in alternating rounds.
//!
//! `cargo bench --bench async_vs_queue [-- --rounds N --secs S]`
//!
//! Targets:
//! - the page cache (io_uring, buffered): the kernel's copy is the device;
//! - the inline software model (`sim://data=0,inline=1`): the model's work runs on whichever
//!   thread polls the queue, so the comparison needs two CPUs, not three;
//! - with three CPUs or more, the threaded model (`sim://data=0,cpu=N`), its device thread
//!   pinned to a middle CPU: the condition issue 4 states.
//!
//! The runtime's poller runs on the last CPU, and so does the direct `Queue` during its
//! rounds: every side does its I/O on the same CPU (on this 2-vCPU VM the two CPUs need not
//! be equally fast: one takes the virtual devices' interrupts). The async side's submitting
//! thread runs on the first CPU: a minimal executor, one task per in-flight read, a run
//! queue, and a task polled only after its waker ran.
//!
//! The tasks side: the same futures, polled on the poller's own thread (`Runtime::spawn`,
//! thread-per-core): 32 tasks, each reading, awaiting, reading again. The local tasks side:
//! the same with `Runtime::spawn_local` and `Runtime::submit_local` (futures that borrow the
//! runtime and stay on the poller's thread).
//!
//! The callback side: a runtime whose handler (`RuntimeConfig::on_complete`) runs on the poller
//! and resubmits each completed read through its `Resubmit`; the submitting thread only waits.
//!
//! Each round runs every side for `--secs` (default 1 s), each paired with a direct `Queue`
//! run of the same length right beside it (before or after it, alternating pair by pair):
//! a side's ratio in a round is its IOPS over its own pair's `Queue` IOPS. The order of the
//! sides rotates between rounds, and the verdict is the median of the per-round ratios.
//! Single runs on this machine move by 10-40% (the host: a bench thread given 100% of a CPU
//! ran 6.6M to 9.8M IOPS in runs seconds apart), so a ratio of two runs further apart would
//! say little.
//!
//! It first prints the round trip of one cache line between the submitter's CPU and the
//! poller's, measured in the same run: the floor under every hand-off the async API makes (a
//! request one way, a completion the other, for each I/O).
//!
//! `-- --test` (as `cargo bench -- --test` passes it) runs one short round and gives no
//! verdict.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rio::runtime::{Done, IoFuture, Resubmit, Runtime, RuntimeConfig};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, OpKind, Queue};

#[path = "util/mod.rs"]
mod util;

const QD: usize = 32;

/// Waking queues the task once (a flag dedupes repeated wakes) and unparks the executor, as
/// tokio's current-thread scheduler does.
struct TaskWaker {
    idx: usize,
    queued: AtomicBool,
    run: Arc<RunQueue>,
}

struct RunQueue {
    q: crossbeam_queue::ArrayQueue<usize>,
    thread: std::thread::Thread,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            // Cannot fail: each task is queued at most once and the queue holds them all.
            let _ = self.run.q.push(self.idx);
            self.run.thread.unpark();
        }
    }
}

/// QD32 on a `Queue` on this thread. Returns the completions in `secs`.
fn queue_round(q: &mut Queue, out: &mut Vec<rio::Completion>, secs: f64) -> (u64, Duration) {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    loop {
        q.wait(1, Duration::from_secs(5), out).expect("wait");
        for c in out.drain(..) {
            done += 1;
            c.result.expect("read");
            let buf = c.buf.expect("a read carries its buffer");
            q.submit_read(c.token * 4096, buf, c.token).expect("submit");
        }
        // The clock is read once per wait, not per I/O.
        if Instant::now() >= until {
            return (done, start.elapsed());
        }
    }
}

struct AsyncSide {
    rt: Arc<Runtime>,
    run: Arc<RunQueue>,
    tasks: Vec<Arc<TaskWaker>>,
    wakers: Vec<Waker>,
    futs: Vec<IoFuture>,
}

impl AsyncSide {
    fn new(rt: Arc<Runtime>) -> AsyncSide {
        let run = Arc::new(RunQueue {
            q: crossbeam_queue::ArrayQueue::new(QD),
            thread: std::thread::current(),
        });
        let tasks: Vec<_> = (0..QD)
            .map(|idx| {
                Arc::new(TaskWaker {
                    idx,
                    // Every task starts queued: its first poll registers its waker.
                    queued: AtomicBool::new(true),
                    run: Arc::clone(&run),
                })
            })
            .collect();
        let wakers = tasks.iter().map(|t| Waker::from(Arc::clone(t))).collect();
        let futs = (0..QD)
            .map(|i| {
                run.q.push(i).expect("room for every task");
                let buf = rt
                    .buffer(4096, Duration::from_secs(1))
                    .expect("pool buffer");
                rt.submit(OpKind::Read, i as u64 * 4096, 4096, Some(buf))
            })
            .collect();
        AsyncSide {
            rt,
            run,
            tasks,
            wakers,
            futs,
        }
    }

    /// QD32 through the runtime: poll woken tasks; a task whose read is done reads again.
    fn round(&mut self, secs: f64) -> (u64, Duration) {
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(secs);
        let mut done = 0u64;
        let mut spins = 0u32;
        loop {
            let Some(i) = self.run.q.pop() else {
                if Instant::now() >= until {
                    return (done, start.elapsed());
                }
                // Idle executor: spin a little, then park.
                spins += 1;
                if spins > 2000 {
                    std::thread::park_timeout(Duration::from_millis(1));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            };
            spins = 0;
            self.tasks[i].queued.store(false, Ordering::SeqCst);
            let mut cx = Context::from_waker(&self.wakers[i]);
            while let Poll::Ready(r) = Pin::new(&mut self.futs[i]).poll(&mut cx) {
                done += 1;
                let (_, buf) = r.expect("read");
                self.futs[i] = self.rt.submit(OpKind::Read, i as u64 * 4096, 4096, buf);
            }
            if done.is_multiple_of(1024) && Instant::now() >= until {
                return (done, start.elapsed());
            }
        }
    }
}

/// QD32 through tasks on the poller (`Runtime::spawn`): each task reads, awaits its future,
/// and reads again; its buffer comes from the poller's own pool. The submitting thread only
/// waits.
fn task_round(rt: &Arc<Runtime>, secs: f64) -> (u64, Duration) {
    let running = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..QD as u64)
        .map(|i| {
            let (rt2, run, d) = (Arc::clone(rt), Arc::clone(&running), Arc::clone(&done));
            rt.spawn(async move {
                let mut buf = Some(rt2.try_buffer(4096).expect("a buffer of the poller's pool"));
                while run.load(Ordering::Relaxed) {
                    let (_, b) = rt2
                        .submit(OpKind::Read, i * 4096, 4096, buf.take())
                        .await
                        .expect("read");
                    buf = b;
                    // Every task runs on the one poller thread: one writer, a load and a
                    // store, as the direct side's local count costs.
                    d.store(d.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed);
    let t = start.elapsed();
    running.store(false, Ordering::Relaxed);
    for h in handles {
        h.join_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("a task did not end"))
            .expect("task");
    }
    (n, t)
}

/// [`task_round`] with tasks made on the poller (`spawn_local`) and `submit_local` futures.
fn local_task_round(rt: &Arc<Runtime>, secs: f64) -> (u64, Duration) {
    let running = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..QD as u64)
        .map(|i| {
            let (rt2, run, d) = (Arc::clone(rt), Arc::clone(&running), Arc::clone(&done));
            rt.spawn_local(move || async move {
                let mut buf = Some(rt2.try_buffer(4096).expect("a buffer of the poller's pool"));
                while run.load(Ordering::Relaxed) {
                    let (_, b) = rt2
                        .submit_local(OpKind::Read, i * 4096, 4096, buf.take())
                        .await
                        .expect("read");
                    buf = b;
                    d.store(d.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed);
    let t = start.elapsed();
    running.store(false, Ordering::Relaxed);
    for h in handles {
        h.join_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("a task did not end"))
            .expect("task");
    }
    (n, t)
}

/// QD32 through the run-to-completion API: the handler resubmits on the poller.
struct CallbackSide {
    rt: Arc<Runtime>,
    running: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    lanes: Arc<AtomicU64>,
}

impl CallbackSide {
    fn new(cfg: &EngineConfig, target: &str, cpu: usize) -> CallbackSide {
        let running = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let lanes = Arc::new(AtomicU64::new(0));
        let (r, d, l) = (Arc::clone(&running), Arc::clone(&done), Arc::clone(&lanes));
        let rt = Runtime::start(
            Engine::open(cfg, target, OpenOptions::default())
                .expect("open for the callback runtime"),
            RuntimeConfig {
                depth: 64,
                cores: Some(vec![cpu]),
                on_complete: Some(Arc::new(move |c: Done, rs: &mut Resubmit<'_>| {
                    c.result.expect("read");
                    // One writer (the runtime has one core, so one poller): a load and a
                    // store, as the direct side's local count costs, not a locked add.
                    d.store(d.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                    let resubmitted = r.load(Ordering::Relaxed)
                        && rs
                            .submit(OpKind::Read, c.tag * 4096, 4096, c.buf, c.tag)
                            .is_ok();
                    if !resubmitted {
                        l.fetch_sub(1, Ordering::Release);
                    }
                })),
                ..RuntimeConfig::default()
            },
        )
        .expect("callback runtime");
        CallbackSide {
            rt,
            running,
            done,
            lanes,
        }
    }

    fn round(&mut self, secs: f64) -> (u64, Duration) {
        self.running.store(true, Ordering::Release);
        self.lanes.store(QD as u64, Ordering::Release);
        let start = Instant::now();
        let from = self.done.load(Ordering::Relaxed);
        for i in 0..QD as u64 {
            let buf = self
                .rt
                .buffer(4096, Duration::from_secs(1))
                .expect("pool buffer");
            self.rt
                .submit_tagged(OpKind::Read, i * 4096, 4096, Some(buf), i)
                .expect("submit");
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        let n = self.done.load(Ordering::Relaxed) - from;
        let t = start.elapsed();
        self.running.store(false, Ordering::Release);
        // Let the lanes end (each stops at its next completion) before the next round.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.lanes.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "callback lanes did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
        (n, t)
    }
}

/// The floor of any hand-off between two threads: one cache line passed back and forth between
/// `a` and `b` (each side waits for the other's store, then stores). Returns ns per round trip
/// (two line transfers), median of 5 slices of `secs / 5`.
fn line_round_trip_ns(a: usize, b: usize, secs: f64) -> f64 {
    #[repr(align(128))]
    struct Line(AtomicU64);
    let line = Arc::new(Line(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let (l2, s2) = (Arc::clone(&line), Arc::clone(&stop));
    let peer = std::thread::spawn(move || {
        core_affinity::set_for_current(core_affinity::CoreId { id: b });
        // Answers odd values with the next even one.
        while !s2.load(Ordering::Relaxed) {
            let v = l2.0.load(Ordering::Acquire);
            if v % 2 == 1 {
                l2.0.store(v + 1, Ordering::Release);
            } else {
                std::hint::spin_loop();
            }
        }
    });
    core_affinity::set_for_current(core_affinity::CoreId { id: a });
    let mut slices = Vec::with_capacity(5);
    for _ in 0..5 {
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(secs / 5.0);
        let mut trips = 0u64;
        let mut v = line.0.load(Ordering::Acquire);
        while !trips.is_multiple_of(1024) || Instant::now() < until {
            line.0.store(v + 1, Ordering::Release);
            while line.0.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            v += 2;
            trips += 1;
        }
        slices.push(start.elapsed().as_nanos() as f64 / trips as f64);
    }
    stop.store(true, Ordering::Relaxed);
    peer.join().expect("ping-pong peer");
    median(&mut slices)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        Some(i) => match args.get(i + 1).map(|v| v.parse()) {
            Some(Ok(v)) => v,
            _ => {
                eprintln!("async_vs_queue: {name} needs a number");
                std::process::exit(2);
            }
        },
        None => default,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let test = args.iter().any(|a| a == "--test");
    let (rounds, secs) = if test {
        (1, 0.05)
    } else {
        (arg(&args, "--rounds", 7usize), arg(&args, "--secs", 1.0f64))
    };
    if rounds == 0 || secs.is_nan() || secs <= 0.0 {
        eprintln!("async_vs_queue: --rounds and --secs must be positive");
        std::process::exit(2);
    }
    let cpus = util::unpin_current();
    let first = cpus.first().copied().unwrap_or(0);
    let last = cpus.last().copied().unwrap_or(0);
    let dir = tempfile::tempdir_in("/var/tmp").expect("temporary directory in /var/tmp");
    let path = dir.path().join("async_vs_queue.dat");
    std::fs::write(&path, vec![1u8; 8 << 20]).expect("write the page-cache file");
    let mut targets = vec![
        (
            "page_cache",
            path.to_str().expect("utf-8 path").to_string(),
            false,
        ),
        (
            "inline_sim",
            "sim://size=64m,data=0,inline=1".to_string(),
            true,
        ),
    ];
    // The issue's own condition: the threaded model, its device thread on a CPU of its own.
    // That takes a third CPU (submitter, poller, model all busy at once).
    if cpus.len() >= 3 {
        let mid = cpus[cpus.len() / 2];
        targets.push((
            "threaded_sim",
            format!("sim://size=64m,data=0,cpu={mid}"),
            true,
        ));
    } else {
        println!(
            "async_vs_queue: threaded model skipped: it needs 3 CPUs (model, poller, submitter), this machine has {}",
            cpus.len()
        );
    }
    println!("async_vs_queue: QD{QD} held, 4 KiB reads, {rounds} rounds of {secs} s per side");
    if first != last {
        // What a cross-thread hand-off costs at least on this machine, measured now: the
        // async API moves a request's and a completion's cache lines between the submitter's
        // CPU and the poller's for every I/O; the direct Queue and the callback API do not.
        println!(
            "async_vs_queue: one cache line's round trip between CPU {first} and CPU {last}: {:.0} ns",
            line_round_trip_ns(first, last, if test { 0.05 } else { 0.5 })
        );
    }
    for (name, target, direct) in targets {
        let cfg = EngineConfig {
            hugepages: false,
            direct,
            ..Default::default()
        };
        // This thread (the executor's) on the first CPU; the poller on the last, and this
        // thread there too while it drives the direct Queue.
        let pin = |id| core_affinity::set_for_current(core_affinity::CoreId { id });
        pin(first);
        let e = Engine::open(&cfg, &target, OpenOptions::default()).expect("open for Queue");
        let mut q = e.queue(Some(QD as u32)).expect("queue");
        for i in 0..QD as u64 {
            let buf = q.alloc_buf(4096).expect("buffer");
            q.submit_read(i * 4096, buf, i).expect("submit");
        }
        let mut out = Vec::with_capacity(QD);
        let rt = Runtime::start(
            Engine::open(&cfg, &target, OpenOptions::default()).expect("open for the runtime"),
            RuntimeConfig {
                depth: 64,
                cores: Some(vec![last]),
                // The default idle policy: the poller parks between async rounds instead of
                // spinning through the Queue's.
                ..RuntimeConfig::default()
            },
        )
        .expect("runtime");
        let mut side = AsyncSide::new(Arc::clone(&rt));
        let mut cb = CallbackSide::new(&cfg, &target, last);
        // Warm-up.
        pin(last);
        queue_round(&mut q, &mut out, secs / 4.0);
        pin(first);
        side.round(secs / 4.0);
        task_round(&rt, secs / 4.0);
        local_task_round(&rt, secs / 4.0);
        cb.round(secs / 4.0);
        let (mut qsum, mut asum, mut tsum, mut lsum, mut csum) = (
            (0u64, Duration::ZERO),
            (0u64, Duration::ZERO),
            (0u64, Duration::ZERO),
            (0u64, Duration::ZERO),
            (0u64, Duration::ZERO),
        );
        let mut ratios = Vec::with_capacity(rounds);
        let mut tratios = Vec::with_capacity(rounds);
        let mut lratios = Vec::with_capacity(rounds);
        let mut cratios = Vec::with_capacity(rounds);
        for r in 0..rounds {
            // Each side is paired with a direct Queue run right beside it (before it or after
            // it, alternately) and judged against that run: on this VM a
            // thread's speed per CPU-second moves by 20% and more within seconds (the host),
            // so a ratio to a Queue run seconds away measured the host as much as the API.
            // The order of the sides rotates each round.
            let (mut qsides, mut ar, mut tr, mut lr, mut cr) = (
                [(0u64, Duration::ZERO); 4],
                (0, Duration::ZERO),
                (0, Duration::ZERO),
                (0, Duration::ZERO),
                (0, Duration::ZERO),
            );
            for k in 0..4 {
                let which = (r + k) % 4;
                let mut run_queue = || {
                    pin(last);
                    let x = queue_round(&mut q, &mut out, secs);
                    pin(first);
                    x
                };
                // Alternating pair by pair, so every round has as many of each order.
                let queue_first = (r + k) % 2 == 0;
                let qx = if queue_first { Some(run_queue()) } else { None };
                let sx = match which {
                    0 => side.round(secs),
                    1 => task_round(&rt, secs),
                    2 => local_task_round(&rt, secs),
                    _ => cb.round(secs),
                };
                let qx = qx.unwrap_or_else(run_queue);
                qsides[which] = qx;
                match which {
                    0 => ar = sx,
                    1 => tr = sx,
                    2 => lr = sx,
                    _ => cr = sx,
                }
            }
            let iops = |(n, t): (u64, Duration)| n as f64 / t.as_secs_f64();
            let ratio = iops(ar) / iops(qsides[0]);
            let tratio = iops(tr) / iops(qsides[1]);
            let lratio = iops(lr) / iops(qsides[2]);
            let cratio = iops(cr) / iops(qsides[3]);
            let qr = qsides
                .iter()
                .fold((0u64, Duration::ZERO), |a, x| (a.0 + x.0, a.1 + x.1));
            println!(
                "  {name} round {r}: queue {:.0} IOPS (mean of the 4 runs), async {:.0} ({ratio:.3}), tasks {:.0} ({tratio:.3}), local tasks {:.0} ({lratio:.3}), callback {:.0} ({cratio:.3})",
                iops(qr),
                iops(ar),
                iops(tr),
                iops(lr),
                iops(cr)
            );
            ratios.push(ratio);
            tratios.push(tratio);
            lratios.push(lratio);
            cratios.push(cratio);
            qsum = (qsum.0 + qr.0, qsum.1 + qr.1);
            asum = (asum.0 + ar.0, asum.1 + ar.1);
            tsum = (tsum.0 + tr.0, tsum.1 + tr.1);
            lsum = (lsum.0 + lr.0, lsum.1 + lr.1);
            csum = (csum.0 + cr.0, csum.1 + cr.1);
        }
        drop(side); // in-flight futures may be dropped: the poller frees their slots
        rt.shutdown();
        cb.rt.shutdown();
        while q.in_flight() > 0 {
            q.wait(QD, Duration::from_secs(5), &mut out).expect("drain");
            out.clear();
        }
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = median(&mut ratios);
        let clo = cratios.iter().copied().fold(f64::INFINITY, f64::min);
        let chi = cratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let cm = median(&mut cratios);
        let tlo = tratios.iter().copied().fold(f64::INFINITY, f64::min);
        let thi = tratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let tm = median(&mut tratios);
        let llo = lratios.iter().copied().fold(f64::INFINITY, f64::min);
        let lhi = lratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lm = median(&mut lratios);
        let iops = |(n, t): (u64, Duration)| n as f64 / t.as_secs_f64().max(1e-9);
        if test {
            println!("  {name}: test mode, one short round, no verdict");
        } else {
            println!(
                "ASYNC_VS_QUEUE target={name} queue_iops={:.0} async_iops={:.0} median_ratio={m:.3} lower={:.1}% rounds_min={lo:.3} rounds_max={hi:.3}",
                iops(qsum),
                iops(asum),
                (1.0 - m) * 100.0
            );
            println!(
                "TASKS_VS_QUEUE target={name} queue_iops={:.0} tasks_iops={:.0} median_ratio={tm:.3} lower={:.1}% rounds_min={tlo:.3} rounds_max={thi:.3}",
                iops(qsum),
                iops(tsum),
                (1.0 - tm) * 100.0
            );
            println!(
                "LOCAL_TASKS_VS_QUEUE target={name} queue_iops={:.0} local_tasks_iops={:.0} median_ratio={lm:.3} lower={:.1}% rounds_min={llo:.3} rounds_max={lhi:.3}",
                iops(qsum),
                iops(lsum),
                (1.0 - lm) * 100.0
            );
            println!(
                "CALLBACK_VS_QUEUE target={name} queue_iops={:.0} callback_iops={:.0} median_ratio={cm:.3} lower={:.1}% rounds_min={clo:.3} rounds_max={chi:.3}",
                iops(qsum),
                iops(csum),
                (1.0 - cm) * 100.0
            );
        }
    }
}
