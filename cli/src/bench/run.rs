//! The benchmark runner: an optional layout pass, then one pinned thread per job, each owning
//! a queue and keeping `iodepth` operations in flight, then (with `--verify` on writes) a
//! read-back pass. Latency is taken from submission to reaping, one clock read per reaped batch.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rio_sys::rusage::{CpuTimes, ThreadCpu, process_cpu, thread_cpu_now, threads_cpu};

use super::autotune::{DeviceTuner, JobTuner, Scope};
use super::clock::{Clock, JobClock};
use super::report::{BenchResult, JobOutcome};
use super::rng::Rng;
use super::series::{HEAT_BUCKETS, NoSink, Point, WINDOW, Window, WindowSink};
use super::spec::BenchSpec;
use super::verify;
use rio::OpKind;
use rio::buf::IoBuf;
use rio::engine::Engine;
use rio::error::{Error, IoError};
use rio::queue::{Completion, Queue, Submitter};

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad input or setup failure (exit status 2 for usage errors).
    #[error(transparent)]
    Setup(#[from] Error),
    /// An I/O failed while running.
    #[error("I/O error: {0}")]
    Io(#[from] IoError),
    /// Data read back did not match what was written.
    #[error("verify failed at offset {offset}: {reason}")]
    Verify { offset: u64, reason: String },
}

/// Phase of a job, for progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Layout = 0,
    Ramp = 1,
    Measure = 2,
    Verify = 3,
    Done = 4,
}

/// Live counters, updated once per reaped batch, read by the progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub ios: AtomicU64,
    pub bytes: AtomicU64,
    phase: AtomicU8,
    /// Bytes the current phase will move in all (0: time-based, unknown).
    pub total: AtomicU64,
}

impl Progress {
    /// Count `ios` and `bytes` done by this progress's job, from its own thread: a job's
    /// counters have one writer (the others only read them), so a load and a store do what an
    /// atomic add would, without its locked instruction per reaped batch.
    #[inline]
    fn add_own(&self, ios: u64, bytes: u64) {
        self.ios.store(self.ios.load(Relaxed) + ios, Relaxed);
        self.bytes.store(self.bytes.load(Relaxed) + bytes, Relaxed);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Layout,
            1 => Phase::Ramp,
            2 => Phase::Measure,
            3 => Phase::Verify,
            _ => Phase::Done,
        }
    }
    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }
}

/// Options of one run that are not part of the workload.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Write the whole region first (verifiable blocks), as fio lays out its files.
    pub layout: bool,
}

/// Run `spec` on `engine`. `stop` ends the run early (Ctrl-C): the result so far is returned.
/// `progress` is called about every 100 ms from the calling thread while jobs run.
pub fn run(
    engine: &Engine,
    spec: &BenchSpec,
    opts: RunOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BenchResult, BenchError> {
    run_with(engine, spec, opts, stop, &NoSink, progress)
}

/// [`run`], with `sink` shown every [`Window`] as a job closes it (on the job's thread).
pub fn run_with(
    engine: &Engine,
    spec: &BenchSpec,
    opts: RunOptions,
    stop: &AtomicBool,
    sink: &dyn WindowSink,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BenchResult, BenchError> {
    spec.validate()?;
    let region = spec.resolve(&engine.target().geometry)?;
    let bs = spec.bs as u64;
    let shared = Progress::default();
    let mut layout_secs = None;
    if opts.layout {
        let t = Instant::now();
        let _span = tracing::info_span!("bench.layout", bytes = region).entered();
        layout(engine, spec, region, stop, &shared, progress)?;
        layout_secs = Some(t.elapsed().as_secs_f64());
    }
    // Regions: disjoint slices when verifying (so no job reads a block another is writing),
    // else every job covers the whole region, as fio's jobs do.
    let per_job = if spec.verify {
        region / spec.numjobs as u64 / bs * bs
    } else {
        region / bs * bs
    };
    // Resolved once per run (the TSC's rate is measured once per process), before any job.
    let (job_clock, clock_report) =
        Clock::resolve(spec.clocksource).map_err(|m| Error::config("--clocksource", m))?;
    tracing::debug!(source = clock_report.source, reason = %clock_report.reason, "bench clock");
    let mut cores = core_affinity::get_core_ids().unwrap_or_default();
    // The software model's device thread owns a core (see `Engine::open` for sim://): jobs
    // go on the others, all of them pinned, or a job sharing the model's core time-slices
    // with it in lock step (measured: 4.6M against 14M IOPS at QD128).
    let model_cpu = engine
        .controller()
        .and_then(|c| c.sim())
        .and_then(|m| m.cpu());
    if let Some(m) = model_cpu
        && cores.len() > 1
    {
        cores.retain(|c| c.id != m);
    }
    let device_tuner = spec.auto.filter(|a| a.scope == Scope::Device).map(|a| {
        DeviceTuner::new(
            rio::tune::QdConfig::new(a.target_p99, spec.iodepth * spec.numjobs),
            spec.numjobs,
        )
    });
    let device_tuner = device_tuner.as_ref();
    let clock = Clocks::default();
    let run_span = tracing::info_span!(
        "bench.run",
        rw = spec.rw.name(),
        bs = spec.bs,
        iodepth = spec.iodepth,
        numjobs = spec.numjobs
    );
    let _run = run_span.enter();
    let progs: Vec<Progress> = (0..spec.numjobs).map(|_| Progress::default()).collect();
    let outcomes: Vec<Result<JobOutcome, BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..spec.numjobs as usize)
            .map(|i| {
                let start = if spec.verify {
                    spec.offset + i as u64 * per_job
                } else {
                    spec.offset
                };
                // Several jobs are spread one per core. A single job on a kernel backend is
                // not pinned: the scheduler keeps it off the core that takes the device's
                // interrupts where those are not per-queue (virtio, most SATA/SAS), which
                // pinning could not know. On a polled userspace driver (no interrupts) it is,
                // to the first allowed core, as SPDK's apps pin their reactor (`-c 0x1`):
                // measured in the TCG guest (4K QD1, 4 alternating rounds, medians), an
                // unpinned job did 0.89 of the IOPS of one pinned to CPU 0, which did 0.97 of
                // `spdk_nvme_perf`'s on CPU 0.
                let polled = matches!(
                    engine.selection().backend,
                    rio::BackendKind::Vfio | rio::BackendKind::Spdk
                );
                let core = job_core(spec.numjobs, model_cpu.is_some() || polled, &cores, i);
                let (prog, clock) = (&progs[i], &clock);
                let job_span = tracing::info_span!(parent: &run_span, "bench.job", job = i);
                std::thread::Builder::new()
                    .name(format!("rio-job-{i}"))
                    .spawn_scoped(s, move || {
                        let _span = job_span.entered();
                        if let Some(c) = core {
                            core_affinity::set_for_current(c);
                        }
                        let r = Job::new(engine, spec, opts, job_clock, i as u64, start, per_job)
                            .and_then(|mut j| {
                                j.tuner = match spec.auto {
                                    None => None,
                                    Some(a) if a.scope == Scope::Queue => {
                                        Some(JobTuner::Queue(Box::new(rio::tune::QdTuner::new(
                                            rio::tune::QdConfig::new(a.target_p99, spec.iodepth),
                                        ))))
                                    }
                                    Some(_) => device_tuner.map(JobTuner::Device),
                                };
                                j.run(stop, prog, clock, sink)
                            });
                        prog.set_phase(Phase::Done);
                        if r.is_err() {
                            // One job's failure ends the others too.
                            stop.store(true, Relaxed);
                        }
                        r
                    })
                    .expect("spawn job thread")
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            let agg = Progress::default();
            let mut phase = Phase::Done;
            for p in &progs {
                agg.ios.fetch_add(p.ios.load(Relaxed), Relaxed);
                agg.bytes.fetch_add(p.bytes.load(Relaxed), Relaxed);
                agg.total.fetch_add(p.total.load(Relaxed), Relaxed);
                phase = phase.min_by(p.phase());
            }
            agg.set_phase(phase);
            progress(&agg);
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("job thread panicked"))
            .collect()
    });
    let mut jobs = Vec::new();
    let mut series = Vec::new();
    for o in outcomes {
        let mut o = o?;
        series.append(&mut o.series);
        jobs.push(o);
    }
    series.sort_by(|a: &Point, b: &Point| a.t.total_cmp(&b.t).then(a.job.cmp(&b.job)));
    let process = match (
        *clock.cpu_start.lock().unwrap(),
        *clock.cpu_end.lock().unwrap(),
    ) {
        (Some(a), Some(b)) => Some((b.user - a.user, b.system - a.system)),
        _ => None,
    };
    let by_thread = match (
        &*clock.threads_start.lock().unwrap(),
        &*clock.threads_end.lock().unwrap(),
    ) {
        (Some(a), Some(b)) => super::report::thread_shares(a, b, &jobs),
        _ => Vec::new(),
    };
    Ok(BenchResult::build(
        engine,
        spec,
        jobs,
        super::report::CpuUse { process, by_thread },
        super::report::RunFacts {
            interrupted: stop.load(Relaxed),
            layout_seconds: layout_secs,
            clock: clock_report,
        },
        series,
    ))
}

impl Phase {
    fn min_by(self, other: Phase) -> Phase {
        if (other as u8) < (self as u8) {
            other
        } else {
            self
        }
    }
}

/// CPU samples at the start and end of the measured window (taken once, by the first job to
/// start measuring and the last job to stop).
#[derive(Default)]
struct Clocks {
    cpu_start: Mutex<Option<CpuTimes>>,
    cpu_end: Mutex<Option<CpuTimes>>,
    /// Each thread's CPU time at the same two moments (`threads_cpu`).
    threads_start: Mutex<Option<Vec<ThreadCpu>>>,
    threads_end: Mutex<Option<Vec<ThreadCpu>>>,
    started: AtomicUsize,
    ended: AtomicUsize,
}

/// With `--iodepth auto`, a window is stretched until it holds this many I/Os (the tuner's
/// `min_samples`) or reaches `MAX_WINDOW`.
const MIN_WINDOW_IOS: u64 = 20;
const MAX_WINDOW: Duration = Duration::from_secs(1);

/// Bytes of arena a job needs: `depth` buffers of `bs` rounded up to their size class.
pub(crate) fn arena_for(depth: u32, bs: u64) -> usize {
    let class = (bs as usize).next_power_of_two().max(4096);
    depth as usize * class + (2 << 20)
}

fn layout(
    engine: &Engine,
    spec: &BenchSpec,
    region: u64,
    stop: &AtomicBool,
    prog: &Progress,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(), BenchError> {
    const DEPTH: u32 = 8;
    let bs = spec.bs as u64;
    let chunk = ((1u64 << 20) / bs).max(1) * bs;
    let end = spec.offset + region / bs * bs;
    let mut q = engine.queue_sized(DEPTH, arena_for(DEPTH, chunk))?;
    prog.set_phase(Phase::Layout);
    prog.total.store(end - spec.offset, Relaxed);
    let mut free: Vec<IoBuf> = Vec::new();
    for _ in 0..DEPTH {
        free.push(q.alloc_buf(chunk as usize)?);
    }
    let mut done = Vec::new();
    let mut next = spec.offset;
    let mut last_tick = Instant::now();
    while next < end || q.in_flight() > 0 {
        while next < end && !free.is_empty() && !stop.load(Relaxed) {
            let len = chunk.min(end - next);
            let mut b = free.pop().expect("non-empty");
            b.set_len(len as usize)?;
            for (i, blk) in b.chunks_exact_mut(bs as usize).enumerate() {
                let off = next + i as u64 * bs;
                verify::fill_block(blk, off, verify::seed_for(spec.seed, off, 0));
            }
            q.submit_write(next, b, next).map_err(Error::from)?;
            next += len;
        }
        if stop.load(Relaxed) && q.in_flight() == 0 {
            break;
        }
        q.wait(1, rio::queue::DEFAULT_WAIT, &mut done)?;
        for c in done.drain(..) {
            prog.bytes.fetch_add(c.len, Relaxed);
            c.result?;
            free.push(c.buf.expect("write returns its buffer"));
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            last_tick = Instant::now();
            progress(prog);
        }
    }
    q.flush()?;
    Ok(())
}

struct Job<'a> {
    spec: &'a BenchSpec,
    q: Queue,
    idx: u64,
    /// The job's clock: nanoseconds from the moment it is ready to submit.
    clock: JobClock,
    /// What to submit next and what each token has in flight.
    g: Gen<'a>,
    /// The window being filled, and when it closes.
    win: Window,
    win_end: u64,
    /// Heat-map column of a byte offset `o` in the region: `(o * heat_mul) >> 64`.
    heat_mul: u128,
    /// `--iodepth auto`: the tuner, the depth in force, and the idle tokens.
    tuner: Option<JobTuner<'a>>,
    depth: u32,
    idle: Vec<usize>,
    /// What the last reaped batch completed (op, bytes, latency, offset), recorded into the
    /// window after the batch's handler has issued the next I/Os.
    done: Vec<(OpKind, u64, u64, u64)>,
    decisions: u64,
    /// End of the last window whose p99 broke the target (seconds from start).
    last_breach: Option<f64>,
}

/// A job's stream of operations: which block next, read or write, with which buffer, and
/// what each token has in flight. Kept apart from the queue so that the completion handler
/// of [`Queue::wait_each`] can borrow it beside the queue.
struct Gen<'a> {
    spec: &'a BenchSpec,
    idx: u64,
    start: u64,
    nblocks: u64,
    bs: u64,
    rng: Rng,
    cursor: u64,
    read_pct: u64,
    /// Seed last written to each block (0: unknown), when verifying.
    seeds: Vec<u64>,
    generation: u64,
    /// Per token: submission time (nanoseconds from the job's start: a latency is one
    /// subtraction), offset in flight (u64::MAX: none), and the idle buffer.
    submitted: Vec<u64>,
    inflight_off: Vec<u64>,
    bufs: Vec<Option<IoBuf>>,
    /// Bytes issued so far, and the most the job issues.
    issued: u64,
    limit: u64,
}

impl<'a> Job<'a> {
    fn new(
        engine: &'a Engine,
        spec: &'a BenchSpec,
        opts: RunOptions,
        clock: Clock,
        idx: u64,
        start: u64,
        len: u64,
    ) -> Result<Job<'a>, BenchError> {
        let bs = spec.bs as u64;
        let nblocks = len / bs;
        let q = engine.queue_sized(spec.iodepth, arena_for(spec.iodepth, bs))?;
        let mut rng = Rng::new(spec.seed ^ (idx + 1).wrapping_mul(0x9e37_79b9));
        let mut bufs = Vec::with_capacity(spec.iodepth as usize);
        for _ in 0..spec.iodepth {
            let mut b = q.alloc_buf(bs as usize)?;
            rng.fill(&mut b);
            bufs.push(Some(b));
        }
        let seeds = if spec.verify {
            if nblocks > (256 << 20) / 8 {
                return Err(Error::config(
                    "--verify",
                    format!("{nblocks} blocks per job is too many to track; give a smaller --size or larger --bs"),
                )
                .into());
            }
            (0..nblocks)
                .map(|b| {
                    if opts.layout {
                        verify::seed_for(spec.seed, start + b * bs, 0)
                    } else {
                        0
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Job {
            spec,
            q,
            idx,
            clock: clock.start(),
            g: Gen {
                spec,
                idx,
                start,
                nblocks,
                bs,
                rng,
                cursor: 0,
                read_pct: spec.rw.read_percent(spec.rwmixread) as u64,
                seeds,
                generation: 1,
                submitted: vec![0; spec.iodepth as usize],
                inflight_off: vec![u64::MAX; spec.iodepth as usize],
                bufs,
                issued: 0,
                limit: if spec.time_based { u64::MAX } else { len },
            },
            win: Window::new(idx as u32),
            win_end: 0,
            heat_mul: ((HEAT_BUCKETS as u128) << 64) / (nblocks * bs).max(1) as u128,
            tuner: None,
            depth: spec.iodepth,
            idle: Vec::with_capacity(spec.iodepth as usize),
            done: Vec::with_capacity(spec.iodepth as usize),
            decisions: 0,
            last_breach: None,
        })
    }

    fn run(
        &mut self,
        stop: &AtomicBool,
        prog: &Progress,
        clock: &Clocks,
        sink: &dyn WindowSink,
    ) -> Result<JobOutcome, BenchError> {
        let spec = self.spec;
        // The clock starts when the job is ready to submit (queue built, buffers filled).
        // All of the loop's times are nanoseconds on it.
        self.clock = self.clock.restart();
        self.win.reset(Duration::ZERO);
        if let Some(t) = &self.tuner {
            self.depth = t.depth().clamp(1, spec.iodepth);
            self.q.set_submit_batch(t.batch());
        }
        self.win.iodepth = self.depth;
        self.win.batch = self.q.submit_batch();
        self.win_end = ns(WINDOW);
        let mut series = Vec::new();
        let measure_at = ns(spec.ramp_time);
        // The measured phase lasts `runtime` from the reap that starts it: a host that starved
        // this thread across the end of the ramp (a reap due at `measure_at` coming a second
        // late) still gets a measured phase with I/Os in it, instead of one that ended before
        // it began.
        let end_at = std::cell::Cell::new(spec.runtime.map(|r| measure_at.saturating_add(ns(r))));
        let mut out = JobOutcome::new();
        let mut measuring = false;
        let mut cpu_from: Option<Duration> = None;
        let mut window_start = 0u64;
        let mut last_done = 0u64;
        prog.set_phase(if spec.ramp_time.is_zero() {
            Phase::Measure
        } else {
            Phase::Ramp
        });
        prog.total
            .store(if spec.time_based { 0 } else { self.g.limit }, Relaxed);
        let mut now = self.clock.now_ns();
        let can_issue = |g: &Gen, now: u64| {
            !stop.load(Relaxed) && end_at.get().is_none_or(|e| now < e) && g.issued < g.limit
        };
        for t in (0..spec.iodepth as usize).rev() {
            self.idle.push(t);
        }
        self.fill(now, &can_issue)?;
        if !measuring && now >= measure_at {
            measuring = true;
            window_start = now;
            clock.start();
            cpu_from = Some(thread_cpu_now());
            end_at.set(spec.runtime.map(|r| now.saturating_add(ns(r))));
        }
        while self.q.in_flight() > 0 {
            // Each completion is handled as it is reaped and its token issued again at once:
            // on SPDK's driver inside SPDK's completion callback (its own run-to-completion
            // order, as `spdk_nvme_perf`), elsewhere right after the reap. One clock read per
            // reaped batch, at its first completion: its latency end and the next I/O's start.
            let (mut n, mut bytes) = (0u64, 0u64);
            let mut reaped_at: Option<u64> = None;
            let mut failed: Option<BenchError> = None;
            let (g, job, done, idle, depth, heat_mul, clk) = (
                &mut self.g,
                self.win.job,
                &mut self.done,
                &mut self.idle,
                self.depth,
                self.heat_mul,
                self.clock,
            );
            self.q
                .wait_each(1, Duration::from_secs(1), |q, c| {
                    let token = c.token as usize;
                    if failed.is_some() {
                        // The job is ending with an error: keep the buffer, issue nothing.
                        g.bufs[token] = c.buf;
                        return;
                    }
                    let now_ns = *reaped_at.get_or_insert_with(|| clk.now_ns());
                    let lat = now_ns.saturating_sub(g.submitted[token]);
                    g.inflight_off[token] = u64::MAX;
                    if let Err(e) = c.result {
                        sink.io_error(job, &e);
                        failed = Some(e.into());
                        return;
                    }
                    if c.op == OpKind::Read
                        && spec.verify
                        && let Err(e) = g.check_read(&c)
                    {
                        failed = Some(e);
                        g.bufs[token] = c.buf;
                        return;
                    }
                    // Recorded after the batch, once the next I/Os are out (below): the
                    // histogram and the heat map are no part of the next I/O's latency.
                    done.push((c.op, c.len, lat, c.offset));
                    // Straight back out with its buffer while under the depth (the common
                    // case); parked when the tuner lowered the depth, picked up by `fill`
                    // when it rises again.
                    match c.buf {
                        Some(buf) if q.in_flight() < depth && can_issue(g, now_ns) => {
                            if let Err(e) = g.issue(q, token, buf, now_ns) {
                                failed = Some(e);
                            }
                        }
                        buf => {
                            g.bufs[token] = buf;
                            idle.push(token);
                        }
                    }
                })
                .map_err(BenchError::from)?;
            // One histogram update per I/O: the window's. Measured windows are added to the
            // job's totals when they close. The heat column by a multiply, not a division (a
            // 64-bit divide per I/O cost the model 10% of its IOPS).
            for &(op, len, lat, offset) in &self.done {
                let slice = (((offset - self.g.start) as u128 * heat_mul) >> 64) as usize;
                self.win.record(op, len, lat, slice);
                n += 1;
                bytes += len;
            }
            self.done.clear();
            if let Some(e) = failed {
                return Err(e);
            }
            now = reaped_at.unwrap_or_else(|| self.clock.now_ns());
            if !measuring && now >= measure_at {
                // The ramp's last window (with this batch) closes here, so no window straddles
                // the start of the measurement (measured windows are what the result adds up).
                if self.win.ios() > 0 {
                    self.close_window(now, false, sink, &mut series, &mut out);
                }
                measuring = true;
                window_start = now;
                end_at.set(spec.runtime.map(|r| now.saturating_add(ns(r))));
                out = JobOutcome::new();
                prog.set_phase(Phase::Measure);
                clock.start();
                cpu_from = Some(thread_cpu_now());
            }
            if !self.idle.is_empty() {
                self.fill(now, &can_issue)?;
            }
            if n > 0 {
                last_done = now;
                prog.add_own(n, bytes);
            }
            // A window closes after 100 ms, or, on a slow device, once it holds enough I/Os
            // to say something (the tuner skips windows of fewer than 20), at most after 1 s.
            if now >= self.win_end
                && (self.tuner.is_none()
                    || self.win.ios() >= MIN_WINDOW_IOS
                    || now >= self.win_end + ns(MAX_WINDOW - WINDOW))
            {
                self.close_window(now, measuring, sink, &mut series, &mut out);
            }
        }
        if self.win.ios() > 0 {
            self.close_window(now, measuring, sink, &mut series, &mut out);
        }
        out.series = series;
        if let Some(t) = &self.tuner {
            t.leave(self.idx as u32);
            let end = now as f64 / 1e9;
            let converged = match self.last_breach {
                None => Some(0.0),
                Some(b) if b < end - 0.15 => Some(b),
                Some(_) => None,
            };
            out.tuner = Some(t.report(converged, self.decisions));
        }
        out.window = if measuring {
            Duration::from_nanos(last_done.saturating_sub(window_start))
        } else {
            Duration::ZERO
        };
        // This thread's own time over its measured phase: a job's thread may have ended by
        // the time the last job takes the process's closing snapshot.
        out.thread_cpu = cpu_from.map(|t| thread_cpu_now().saturating_sub(t));
        clock.end(self.spec.numjobs as usize);
        if spec.verify && spec.rw.writes() {
            prog.set_phase(Phase::Verify);
            let _span = tracing::info_span!("bench.verify").entered();
            out.verified = self.read_back(stop, prog)?;
        } else if spec.verify {
            out.verified = out.read.ios;
        }
        Ok(out)
    }

    /// Issues idle tokens while fewer than `depth` operations are in flight.
    #[inline]
    fn fill<F: Fn(&Gen, u64) -> bool>(
        &mut self,
        now_ns: u64,
        can_issue: &F,
    ) -> Result<(), BenchError> {
        while self.q.in_flight() < self.depth && can_issue(&self.g, now_ns) {
            let Some(t) = self.idle.pop() else { break };
            let buf = self.g.bufs[t]
                .take()
                .expect("an idle token holds its buffer");
            self.g.issue(&mut self.q.submitter(), t, buf, now_ns)?;
        }
        Ok(())
    }

    /// Hands the window ending at `now` to the sink and the series, and starts the next.
    fn close_window(
        &mut self,
        now: u64,
        measuring: bool,
        sink: &dyn WindowSink,
        series: &mut Vec<Point>,
        out: &mut JobOutcome,
    ) {
        let end = Duration::from_nanos(now);
        self.win.len = end.saturating_sub(self.win.start);
        self.win.measuring = measuring;
        if measuring {
            out.add_window(&self.win);
            // Telemetry's cost on this thread: two clock reads per 100 ms window.
            let t = Instant::now();
            sink.window(&self.win);
            out.sink += t.elapsed();
        } else {
            sink.window(&self.win);
        }
        series.push(Point::from(&self.win));
        if let Some(t) = &mut self.tuner {
            let target_ns = self.spec.auto.map_or(0, |a| a.target_p99.as_nanos() as u64);
            if self.win.ios() > 0 && self.win.pct(99.0) > target_ns {
                self.last_breach = Some(end.as_secs_f64());
            }
            // A span per decision (exported with the bench's spans when tracing export is
            // on), the event inside it carrying the inputs and the estimate.
            let span = tracing::info_span!(
                "tune.decision",
                job = self.idx,
                qd = tracing::field::Empty,
                reason = tracing::field::Empty
            );
            let _in = span.enter();
            if let Some(d) = t.window(&self.win) {
                self.decisions += 1;
                span.record("qd", d.qd);
                span.record("reason", tracing::field::debug(d.reason));
                tracing::debug!(
                    target: "rio::tune",
                    job = self.idx,
                    qd_was = d.qd_was,
                    qd = d.qd,
                    batch = d.batch,
                    reason = ?d.reason,
                    measured_p99_us = d.measured_p99_us,
                    measured_iops = d.measured_iops,
                    best_qd = d.best_qd,
                    predicted_p99_us = d.predicted_p99_us,
                    predicted_iops = d.predicted_iops,
                    confidence = d.confidence,
                    "queue depth decision"
                );
            }
            self.depth = t.depth().clamp(1, self.spec.iodepth);
            self.q.set_submit_batch(t.batch());
        }
        self.win.reset(end);
        self.win.iodepth = self.depth;
        self.win.batch = self.q.submit_batch();
        self.win_end = now + ns(WINDOW);
    }

    /// Read back every block this job wrote (or laid out) and check it.
    fn read_back(&mut self, stop: &AtomicBool, prog: &Progress) -> Result<u64, BenchError> {
        let mut next = 0u64;
        let mut checked = 0u64;
        let mut comps = Vec::new();
        prog.bytes.store(0, Relaxed);
        prog.total.store(self.g.nblocks * self.g.bs, Relaxed);
        loop {
            for t in 0..self.g.bufs.len() {
                if self.g.bufs[t].is_none() {
                    continue;
                }
                while next < self.g.nblocks && self.g.seeds[next as usize] == 0 {
                    next += 1;
                }
                if next >= self.g.nblocks || stop.load(Relaxed) {
                    break;
                }
                let buf = self.g.bufs[t].take().expect("idle");
                let off = self.g.start + next * self.g.bs;
                self.q
                    .submit_read(off, buf, t as u64)
                    .map_err(|r| BenchError::Setup(r.error))?;
                next += 1;
            }
            if self.q.in_flight() == 0 {
                break;
            }
            self.q.wait(1, Duration::from_secs(1), &mut comps)?;
            for c in comps.drain(..) {
                let token = c.token as usize;
                if let Err(e) = c.result {
                    return Err(e.into());
                }
                self.g.check_read(&c)?;
                prog.bytes.fetch_add(c.len, Relaxed);
                checked += 1;
                self.g.bufs[token] = c.buf;
            }
        }
        Ok(checked)
    }
}

impl Gen<'_> {
    /// Choose the next block: sequential cursor or uniform random, avoiding blocks in flight
    /// when verifying a mixed workload.
    #[inline]
    fn next_block(&mut self) -> u64 {
        if !self.spec.rw.random() {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % self.nblocks;
            return b;
        }
        let mut b = self.rng.below(self.nblocks);
        if self.spec.verify && self.spec.rw.writes() {
            // Two operations on one block in flight at once could complete in either order,
            // and the seed table could no longer say what the block holds. Re-roll, then scan;
            // a free block exists because validation keeps nblocks > iodepth under --verify.
            let busy = |j: &Self, b: u64| j.inflight_off.contains(&(j.start + b * j.bs));
            let mut tries = 0;
            while busy(self, b) {
                tries += 1;
                b = if tries < 32 {
                    self.rng.below(self.nblocks)
                } else {
                    (b + 1) % self.nblocks
                };
            }
        }
        b
    }

    #[inline]
    fn issue(
        &mut self,
        q: &mut Submitter<'_>,
        token: usize,
        mut buf: IoBuf,
        now_ns: u64,
    ) -> Result<(), BenchError> {
        let block = self.next_block();
        let offset = self.start + block * self.bs;
        let is_read =
            self.read_pct == 100 || (self.read_pct > 0 && self.rng.below(100) < self.read_pct);
        self.submitted[token] = now_ns;
        self.inflight_off[token] = offset;
        self.issued += self.bs;
        let r = if is_read {
            q.submit_read(offset, buf, token as u64)
        } else {
            if self.spec.verify {
                let seed = verify::seed_for(self.spec.seed ^ self.idx, offset, self.generation);
                self.generation += 1;
                verify::fill_block(&mut buf, offset, seed);
                self.seeds[block as usize] = seed;
            }
            q.submit_write(offset, buf, token as u64)
        };
        r.map_err(|rej| BenchError::Setup(rej.error))
    }

    fn check_read(&self, c: &Completion) -> Result<(), BenchError> {
        let buf = c.buf.as_ref().expect("read returns its buffer");
        let block = (c.offset - self.start) / self.bs;
        let expect = self.seeds[block as usize];
        verify::check_block(buf, c.offset, (expect != 0).then_some(expect)).map_err(|reason| {
            BenchError::Verify {
                offset: c.offset,
                reason,
            }
        })
    }
}

/// The core job `i` of `numjobs` is pinned to, if any: one per core, in order, when there are
/// several jobs or `always` (a polled driver, or the model's device on a core of its own);
/// a single job otherwise runs where the scheduler puts it.
fn job_core(
    numjobs: u32,
    always: bool,
    cores: &[core_affinity::CoreId],
    i: usize,
) -> Option<core_affinity::CoreId> {
    ((numjobs > 1 || always) && !cores.is_empty()).then(|| cores[i % cores.len()])
}

/// A span in nanoseconds (saturating: 585 years).
#[inline]
fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Clocks {
    fn start(&self) {
        if self.started.fetch_add(1, Relaxed) == 0 {
            *self.threads_start.lock().unwrap() = threads_cpu();
            *self.cpu_start.lock().unwrap() = Some(process_cpu());
        }
    }
    fn end(&self, jobs: usize) {
        if self.ended.fetch_add(1, Relaxed) + 1 == jobs {
            *self.cpu_end.lock().unwrap() = Some(process_cpu());
            *self.threads_end.lock().unwrap() = threads_cpu();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::job_core;
    use core_affinity::CoreId;

    #[test]
    fn a_single_job_is_pinned_only_when_asked_and_several_go_one_per_core() {
        let cores = [CoreId { id: 2 }, CoreId { id: 5 }];
        // A kernel backend: a single job floats.
        assert_eq!(job_core(1, false, &cores, 0), None);
        // A polled driver (or the model's own core): the first allowed core.
        assert_eq!(job_core(1, true, &cores, 0), Some(CoreId { id: 2 }));
        // Several jobs: one per core, in order, wrapping.
        let got: Vec<_> = (0..3).map(|i| job_core(3, false, &cores, i)).collect();
        assert_eq!(
            got,
            vec![
                Some(CoreId { id: 2 }),
                Some(CoreId { id: 5 }),
                Some(CoreId { id: 2 })
            ]
        );
        // Nothing to pin to (the affinity could not be read).
        assert_eq!(job_core(3, true, &[], 1), None);
    }
}
