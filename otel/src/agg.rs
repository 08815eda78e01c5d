//! The aggregator thread: windows in, instrument updates and per-interval figures out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use hdrhistogram::Histogram;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter, ObservableCounter, ObservableGauge};
use rio_sys::rusage::{CpuTimes, process_cpu};

use super::alerts::{AlertEngine, IntervalStats};
use super::hist::{BucketHist, bounds_ns};
use super::names::*;
use super::{DirSample, Labels, Msg, Sample, Shared, TelemetryConfig, direction, lock};
use rio::OpKind;

/// The SDK's observable instruments; their callbacks read [`Shared`].
pub(crate) struct Observers {
    _gauges: Vec<ObservableGauge<f64>>,
    _ugauges: Vec<ObservableGauge<u64>>,
    _counters: Vec<ObservableCounter<u64>>,
}

impl Observers {
    pub(crate) fn register(meter: &Meter, shared: &Arc<Shared>) -> Observers {
        let mut gauges = Vec::new();
        for (i, name) in [
            IO_DURATION_P50,
            IO_DURATION_P95,
            IO_DURATION_P99,
            IO_DURATION_P999,
        ]
        .into_iter()
        .enumerate()
        {
            let s = Arc::clone(shared);
            gauges.push(
                meter
                    .f64_observable_gauge(name)
                    .with_unit("s")
                    .with_description("I/O latency percentile over the last interval")
                    .with_callback(move |o| {
                        for (attrs, p) in &lock(&s.gauges).pct {
                            o.observe(p[i], attrs);
                        }
                    })
                    .build(),
            );
        }
        let s = Arc::clone(shared);
        gauges.push(
            meter
                .f64_observable_gauge(IO_IOPS)
                .with_unit("{operation}/s")
                .with_description("I/Os per second over the last interval")
                .with_callback(move |o| {
                    for (attrs, v) in &lock(&s.gauges).iops {
                        o.observe(*v, attrs);
                    }
                })
                .build(),
        );
        let s = Arc::clone(shared);
        gauges.push(
            meter
                .f64_observable_gauge(CPU_PER_IO)
                .with_unit("s")
                .with_description("process CPU time (user + system) per I/O, last interval")
                .with_callback(move |o| {
                    if let Some(v) = lock(&s.gauges).cpu_per_io {
                        o.observe(v, &[]);
                    }
                })
                .build(),
        );
        let s = Arc::clone(shared);
        gauges.push(
            meter
                .f64_observable_gauge(POOL_UTILIZATION)
                .with_unit("1")
                .with_description("buffers in use over buffers carved, per core and class")
                .with_callback(move |o| {
                    pool_each(&s, |attrs, c| {
                        if c.capacity > 0 {
                            o.observe(c.in_use as f64 / c.capacity as f64, attrs);
                        }
                    })
                })
                .build(),
        );
        let mut ugauges = Vec::new();
        for (name, desc, batch) in [
            (QUEUE_DEPTH, "queue depth in force per job", false),
            (
                QUEUE_SUBMIT_BATCH,
                "submission batch in force per job",
                true,
            ),
        ] {
            let s = Arc::clone(shared);
            ugauges.push(
                meter
                    .u64_observable_gauge(name)
                    .with_unit(if batch { "{command}" } else { "{operation}" })
                    .with_description(desc)
                    .with_callback(move |o| {
                        for (attrs, d, b) in &lock(&s.gauges).depth {
                            o.observe(if batch { *b } else { *d }, attrs);
                        }
                    })
                    .build(),
            );
        }
        for (name, cap) in [(POOL_IN_USE, false), (POOL_CAPACITY, true)] {
            let s = Arc::clone(shared);
            ugauges.push(
                meter
                    .u64_observable_gauge(name)
                    .with_unit("{buffer}")
                    .with_description(if cap {
                        "pool buffers carved, per core and class"
                    } else {
                        "pool buffers in use, per core and class"
                    })
                    .with_callback(move |o| {
                        pool_each(&s, |attrs, c| {
                            o.observe(if cap { c.capacity } else { c.in_use } as u64, attrs)
                        })
                    })
                    .build(),
            );
        }
        let s = Arc::clone(shared);
        ugauges.push(
            meter
                .u64_observable_gauge(NVME_CRITICAL_WARNING)
                .with_unit("1")
                .with_description("SMART critical warning bits the controller last reported")
                .with_callback(move |o| {
                    for c in lock(&s.controllers).iter() {
                        o.observe(
                            c.critical_warning() as u64,
                            &[KeyValue::new(ATTR_DEVICE, c.name.clone())],
                        );
                    }
                })
                .build(),
        );
        let mut counters = Vec::new();
        let s = Arc::clone(shared);
        counters.push(
            meter
                .u64_observable_counter(NVME_EVENTS)
                .with_unit("{event}")
                .with_description("asynchronous events the controller reported")
                .with_callback(move |o| {
                    for c in lock(&s.controllers).iter() {
                        o.observe(
                            c.events_total(),
                            &[KeyValue::new(ATTR_DEVICE, c.name.clone())],
                        );
                    }
                })
                .build(),
        );
        let s = Arc::clone(shared);
        counters.push(
            meter
                .u64_observable_counter(DROPPED)
                .with_unit("{batch}")
                .with_description("telemetry dropped: windows without room, failed exports")
                .with_callback(move |o| {
                    o.observe(
                        s.dropped_windows.load(Relaxed),
                        &[KeyValue::new(ATTR_STAGE, "window")],
                    );
                    o.observe(
                        s.failed_exports.load(Relaxed),
                        &[KeyValue::new(ATTR_STAGE, "export")],
                    );
                })
                .build(),
        );
        let s = Arc::clone(shared);
        counters.push(
            meter
                .u64_observable_counter(EXPORTS)
                .with_unit("{batch}")
                .with_description("export batches the collector took")
                .with_callback(move |o| o.observe(s.exports.load(Relaxed), &[]))
                .build(),
        );
        Observers {
            _gauges: gauges,
            _ugauges: ugauges,
            _counters: counters,
        }
    }
}

fn pool_each(s: &Shared, mut f: impl FnMut(&[KeyValue], &rio::pool::ClassStats)) {
    for p in lock(&s.pools).iter() {
        for core in p.stats() {
            for c in &core.classes {
                let attrs = [
                    KeyValue::new(ATTR_POOL_CORE, core.core as i64),
                    KeyValue::new(ATTR_POOL_CLASS, c.size as i64),
                ];
                f(&attrs, c);
            }
        }
    }
}

/// One (backend, device, direction) series.
struct Series {
    attrs: Vec<KeyValue>,
    /// This interval's latencies (ns), for the percentiles.
    interval: Histogram<u64>,
    interval_ios: u64,
    /// Index into `Shared::hists` and the gauges.
    idx: usize,
}

pub(crate) struct Aggregator {
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    eval: Duration,
    bounds: Vec<u64>,
    ops: Counter<u64>,
    bytes: Counter<u64>,
    errors: Counter<u64>,
    alerts: Counter<u64>,
    decisions: Counter<u64>,
    series: HashMap<(Arc<Labels>, bool), Series>,
    jobs: HashMap<(Arc<Labels>, u32), (u32, u32, usize)>,
    interval_errors: u64,
    t0: Instant,
    last_close: Instant,
    last_cpu: CpuTimes,
    pool_misses: HashMap<(usize, usize, usize), u64>,
    engine: AlertEngine,
}

impl Aggregator {
    pub(crate) fn new(
        cfg: &TelemetryConfig,
        meter: &Meter,
        shared: Arc<Shared>,
        rx: Receiver<Msg>,
    ) -> Aggregator {
        let now = Instant::now();
        Aggregator {
            shared,
            rx,
            eval: cfg.eval_interval.max(Duration::from_millis(10)),
            bounds: bounds_ns(cfg.target_latency_us),
            ops: meter
                .u64_counter(IO_OPERATIONS)
                .with_unit("{operation}")
                .with_description("completed I/Os")
                .build(),
            bytes: meter
                .u64_counter(IO_BYTES)
                .with_unit("By")
                .with_description("bytes moved")
                .build(),
            errors: meter
                .u64_counter(IO_ERRORS)
                .with_unit("{error}")
                .with_description("failed I/Os by NVMe or OS status")
                .build(),
            alerts: meter
                .u64_counter(ALERTS)
                .with_unit("{alert}")
                .with_description("alerts raised, by kind")
                .build(),
            decisions: meter
                .u64_counter(TUNER_DECISIONS)
                .with_unit("{decision}")
                .with_description("changes of the queue depth in force")
                .build(),
            series: HashMap::new(),
            jobs: HashMap::new(),
            interval_errors: 0,
            t0: now,
            last_close: now,
            last_cpu: process_cpu(),
            pool_misses: HashMap::new(),
            engine: AlertEngine::new(cfg.rules.clone()),
        }
    }

    pub(crate) fn run(mut self) {
        let mut next = Instant::now() + self.eval;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Window(s)) => self.window(*s),
                Ok(Msg::Error {
                    labels,
                    op,
                    error_type,
                }) => {
                    let mut attrs = base_attrs(&labels, op == OpKind::Read);
                    attrs.push(KeyValue::new(ATTR_ERROR_TYPE, error_type));
                    self.errors.add(1, &attrs);
                    self.interval_errors += 1;
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    // Windows sent before the stop are already drained (FIFO).
                    self.close_interval(Instant::now());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if now >= next {
                self.close_interval(now);
                next = (next + self.eval).max(now + self.eval / 2);
            }
        }
    }

    fn series(&mut self, labels: &Arc<Labels>, read: bool) -> &mut Series {
        let shared = &self.shared;
        let bounds = &self.bounds;
        self.series
            .entry((Arc::clone(labels), read))
            .or_insert_with(|| {
                let attrs = base_attrs(labels, read);
                let mut h = lock(&shared.hists);
                h.push((attrs.clone(), BucketHist::new(bounds.clone())));
                let idx = h.len() - 1;
                lock(&shared.gauges).pct.push((attrs.clone(), [0.0; 4]));
                lock(&shared.gauges).iops.push((attrs.clone(), 0.0));
                Series {
                    attrs,
                    interval: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                        .expect("valid histogram bounds"),
                    interval_ios: 0,
                    idx,
                }
            })
    }

    fn window(&mut self, s: Sample) {
        for (read, d) in [(true, &s.read), (false, &s.write)] {
            if d.ios == 0 {
                continue;
            }
            self.record(&s.labels, read, d);
        }
        let key = (Arc::clone(&s.labels), s.job);
        match self.jobs.get_mut(&key) {
            Some((depth, batch, idx)) => {
                if *depth != s.iodepth {
                    let up = s.iodepth > *depth;
                    let mut attrs = base_attrs(&s.labels, true);
                    attrs.retain(|k| k.key.as_str() != ATTR_DIRECTION);
                    attrs.push(KeyValue::new(ATTR_DECISION, if up { "up" } else { "down" }));
                    self.decisions.add(1, &attrs);
                    tracing::info!(
                        job = s.job,
                        from = *depth,
                        to = s.iodepth,
                        "queue depth in force changed"
                    );
                }
                *depth = s.iodepth;
                *batch = s.batch;
                let mut g = lock(&self.shared.gauges);
                if let Some(e) = g.depth.get_mut(*idx) {
                    e.1 = s.iodepth as u64;
                    e.2 = s.batch as u64;
                }
            }
            None => {
                let mut attrs = base_attrs(&s.labels, true);
                attrs.retain(|k| k.key.as_str() != ATTR_DIRECTION);
                attrs.push(KeyValue::new(ATTR_JOB, s.job as i64));
                let mut g = lock(&self.shared.gauges);
                g.depth.push((attrs, s.iodepth as u64, s.batch as u64));
                let idx = g.depth.len() - 1;
                drop(g);
                self.jobs.insert(key, (s.iodepth, s.batch, idx));
            }
        }
    }

    fn record(&mut self, labels: &Arc<Labels>, read: bool, d: &DirSample) {
        let ops = self.ops.clone();
        let bytes = self.bytes.clone();
        let shared = Arc::clone(&self.shared);
        let se = self.series(labels, read);
        ops.add(d.ios, &se.attrs);
        bytes.add(d.bytes, &se.attrs);
        for &(v, n) in &d.values {
            se.interval.saturating_record_n(v.max(1), n);
        }
        se.interval_ios += d.ios;
        if let Some((_, h)) = lock(&shared.hists).get_mut(se.idx) {
            h.add_compact(&d.values);
        }
    }

    /// Percentiles, IOPS, CPU per I/O, alerts and trends of the interval ending `now`.
    fn close_interval(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last_close).as_secs_f64();
        self.last_close = now;
        let mut ios = 0u64;
        let mut p99_ns = 0u64;
        {
            let mut g = lock(&self.shared.gauges);
            for se in self.series.values_mut() {
                let n = se.interval_ios;
                ios += n;
                if let Some(e) = g.iops.get_mut(se.idx) {
                    e.1 = if dt > 0.0 { n as f64 / dt } else { 0.0 };
                }
                if n > 0 && !se.interval.is_empty() {
                    let q = |p: f64| se.interval.value_at_quantile(p) as f64 * 1e-9;
                    if let Some(e) = g.pct.get_mut(se.idx) {
                        e.1 = [q(0.50), q(0.95), q(0.99), q(0.999)];
                    }
                    p99_ns = p99_ns.max(se.interval.value_at_quantile(0.99));
                }
                se.interval.reset();
                se.interval_ios = 0;
            }
            let cpu = process_cpu();
            let used =
                (cpu.user + cpu.system).saturating_sub(self.last_cpu.user + self.last_cpu.system);
            self.last_cpu = cpu;
            if ios > 0 {
                g.cpu_per_io = Some(used.as_secs_f64() / ios as f64);
            }
        }
        let stats = IntervalStats {
            t: now.saturating_duration_since(self.t0).as_secs_f64(),
            ios,
            errors: std::mem::take(&mut self.interval_errors),
            iops: if dt > 0.0 { ios as f64 / dt } else { 0.0 },
            p99_us: p99_ns as f64 / 1000.0,
            pools_exhausted: self.pools_exhausted(),
            critical_warnings: lock(&self.shared.controllers)
                .iter()
                .map(|c| (c.name.clone(), c.critical_warning()))
                .collect(),
        };
        for a in self.engine.evaluate(&stats) {
            tracing::warn!(
                alert = a.kind.name(),
                value = a.value,
                threshold = a.threshold,
                action = a.kind.action(),
                "alert: {}",
                a.message
            );
            self.alerts
                .add(1, &[KeyValue::new(ATTR_ALERT_KIND, a.kind.name())]);
            self.shared.alerts_by_kind[a.kind as usize].fetch_add(1, Relaxed);
            let mut r = lock(&self.shared.recent_alerts);
            if r.len() == 64 {
                r.remove(0);
            }
            r.push(a);
        }
        let trends: Vec<_> = [
            self.engine.iops.trend(IO_IOPS),
            self.engine.p99.trend(IO_DURATION_P99),
        ]
        .into_iter()
        .flatten()
        .collect();
        *lock(&self.shared.trends) = trends;
    }

    /// Classes with every buffer in use whose gets missed since the last interval.
    fn pools_exhausted(&mut self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let pools: Vec<_> = lock(&self.shared.pools).clone();
        for (pi, p) in pools.iter().enumerate() {
            for core in p.stats() {
                for c in &core.classes {
                    let key = (pi, core.core, c.size);
                    let before = self.pool_misses.insert(key, c.misses).unwrap_or(0);
                    if c.capacity > 0 && c.in_use >= c.capacity && c.misses > before {
                        out.push((core.core, c.size));
                    }
                }
            }
        }
        out
    }
}

fn base_attrs(l: &Labels, read: bool) -> Vec<KeyValue> {
    vec![
        KeyValue::new(
            ATTR_DIRECTION,
            direction(if read { OpKind::Read } else { OpKind::Write }),
        ),
        KeyValue::new(ATTR_BACKEND, l.backend.clone()),
        KeyValue::new(ATTR_DEVICE, l.device.clone()),
    ]
}
