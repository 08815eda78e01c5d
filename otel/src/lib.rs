//! OpenTelemetry export of what rio measures: latency histograms and percentiles, IOPS, bytes,
//! errors by status, queue depth and the tuner's choices, pool occupancy, CPU per I/O; alerts
//! and trends; spans through `tracing-opentelemetry`.
//!
//! Nothing here runs on the I/O path. A bench job already closes a [`Window`] every 100 ms
//! (counts plus an hdrhistogram per direction); [`TelemetrySink`] copies the window's few
//! numbers and the histogram's recorded values (hundreds of pairs) into a bounded channel and
//! returns: a full channel drops the window and counts it. The aggregator thread turns windows
//! into instrument updates, closes an interval every second (percentiles, IOPS, CPU per I/O,
//! alert rules, trends), and the SDK's periodic reader exports on its own thread. A collector
//! that is down or slow costs failed exports (counted, `rio.telemetry.dropped{stage=export}`)
//! and never blocks a job; the cumulative state is bounded by the number of series.
//!
//! The latency histogram is built here from the hdrhistograms' values (one update per
//! distinct value, not per I/O: at 12M IOPS a per-I/O SDK record would cost a core), and
//! appended to the SDK's collected metrics when they are encoded for OTLP.
//!
//! - [`names`]: every metric and attribute name;
//! - [`hist`]: the exported histogram's buckets;
//! - [`alerts`], [`trends`]: the rules and the trailing trends;
//! - `agg`: the aggregator thread; `export`: OTLP over HTTP/protobuf and gRPC.

mod agg;
pub mod alerts;
mod export;
pub mod hist;
pub mod names;
pub mod trends;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Sender, TrySendError};
use opentelemetry::KeyValue;

pub use alerts::{Alert, AlertKind, AlertRules};
pub use trends::{Direction, Trend};

use rio::OpKind;
use rio::config::EngineConfig;
use rio::error::{IoError, IoErrorKind};
use rio::pool::Pools;
use rio::window::{DirCount, Window, WindowSink};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting (environment variable or config knob) is invalid.
    #[error("telemetry configuration: {0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error("building the OTLP {what} exporter: {reason}")]
    Exporter { what: &'static str, reason: String },
    /// A thread or runtime could not be started.
    #[error("starting the telemetry {what}: {source}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// OTLP transport: the setting lives with the other settings in [`rio::config`].
pub use rio::config::OtelProtocol as Protocol;

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    pub protocol: Protocol,
    /// Metrics endpoint: the full URL for HTTP (`.../v1/metrics`), the base for gRPC.
    pub metrics_endpoint: String,
    /// Traces endpoint, likewise.
    pub traces_endpoint: String,
    /// Export spans too.
    pub traces: bool,
    /// How often the SDK exports.
    pub export_interval: Duration,
    /// Per-export timeout (and the bound on the final flush).
    pub timeout: Duration,
    /// How often percentiles, IOPS, CPU per I/O, alerts and trends are computed.
    pub eval_interval: Duration,
    /// Windows the exporter's queue holds before dropping.
    pub queue_windows: usize,
    pub rules: AlertRules,
    /// Latency target (µs): bucket bounds are dense around it and the p99 rule uses it.
    pub target_latency_us: Option<u64>,
}

fn base_url(b: &str) -> String {
    b.trim_end_matches('/').to_string()
}

impl TelemetryConfig {
    /// From the standard `OTEL_*` variables, falling back on the engine's config knobs
    /// (`otel_endpoint`, `otel_protocol`, `otel_interval_ms`) and then on OTLP's defaults.
    pub fn from_env(cfg: &EngineConfig) -> Result<TelemetryConfig, TelemetryError> {
        Self::resolve(cfg, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`Self::from_env`] with an explicit environment (for tests).
    pub fn resolve(
        cfg: &EngineConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<TelemetryConfig, TelemetryError> {
        let protocol = match env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .or_else(|| cfg.otel_protocol.clone())
        {
            Some(p) => Protocol::parse(&p).map_err(TelemetryError::Config)?,
            None => Protocol::HttpProtobuf,
        };
        let base = env("OTEL_EXPORTER_OTLP_ENDPOINT")
            .or_else(|| cfg.otel_endpoint.clone())
            .unwrap_or_else(|| match protocol {
                Protocol::HttpProtobuf => "http://localhost:4318".into(),
                Protocol::Grpc => "http://localhost:4317".into(),
            });
        let signal = |var: &str, path: &str| {
            env(var).unwrap_or_else(|| match protocol {
                Protocol::HttpProtobuf => format!("{}{path}", base_url(&base)),
                Protocol::Grpc => base_url(&base),
            })
        };
        let metrics_endpoint = signal("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "/v1/metrics");
        let traces_endpoint = signal("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces");
        for e in [&metrics_endpoint, &traces_endpoint] {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(TelemetryError::Config(format!(
                    "OTLP endpoint '{e}' must start with http:// or https://"
                )));
            }
        }
        let ms = |var: &str| -> Result<Option<u64>, TelemetryError> {
            env(var)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        TelemetryError::Config(format!("{var}: expected milliseconds, got '{v}'"))
                    })
                })
                .transpose()
        };
        let interval = ms("OTEL_METRIC_EXPORT_INTERVAL")?.unwrap_or(cfg.otel_interval_ms);
        let timeout = ms("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")?
            .or(ms("OTEL_EXPORTER_OTLP_TIMEOUT")?)
            .unwrap_or(10_000);
        if interval == 0 || timeout == 0 {
            return Err(TelemetryError::Config(
                "export interval and timeout must be above 0 ms".into(),
            ));
        }
        let traces = env("OTEL_TRACES_EXPORTER").is_none_or(|v| v != "none");
        Ok(TelemetryConfig {
            protocol,
            metrics_endpoint,
            traces_endpoint,
            traces,
            export_interval: Duration::from_millis(interval),
            timeout: Duration::from_millis(timeout),
            eval_interval: Duration::from_secs(1),
            queue_windows: 256,
            rules: AlertRules {
                p99_target_us: cfg.target_latency_us,
                ..AlertRules::default()
            },
            target_latency_us: cfg.target_latency_us,
        })
    }
}

/// Counters of the telemetry pipeline itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TelemetryStats {
    /// Windows handed to the exporter.
    pub windows: u64,
    /// Windows dropped because the exporter's queue was full.
    pub dropped_windows: u64,
    /// Export batches the collector took.
    pub exports: u64,
    /// Export batches that failed (collector down, slow or refusing): dropped.
    pub failed_exports: u64,
    /// Alerts raised.
    pub alerts: u64,
}

/// Gauge values of the last interval, read by the SDK's callbacks at export.
#[derive(Default)]
pub(crate) struct Gauges {
    /// (attributes, [p50, p95, p99, p99.9] seconds).
    pct: Vec<(Vec<KeyValue>, [f64; 4])>,
    iops: Vec<(Vec<KeyValue>, f64)>,
    /// (attributes, depth, batch) per job.
    depth: Vec<(Vec<KeyValue>, u64, u64)>,
    cpu_per_io: Option<f64>,
}

/// State shared by the sink, the aggregator and the exporter.
pub(crate) struct Shared {
    windows: AtomicU64,
    dropped_windows: AtomicU64,
    exports: AtomicU64,
    failed_exports: AtomicU64,
    alerts_by_kind: [AtomicU64; 5],
    /// Cumulative latency histograms per series (attributes), appended at export.
    hists: Mutex<Vec<(Vec<KeyValue>, hist::BucketHist)>>,
    gauges: Mutex<Gauges>,
    trends: Mutex<Vec<Trend>>,
    recent_alerts: Mutex<Vec<Alert>>,
    pools: Mutex<Vec<Arc<Pools>>>,
    controllers: Mutex<Vec<Arc<rio::nvme::Controller>>>,
    start: SystemTime,
}

/// Locks, recovering the data if a holder panicked (the state stays usable for export).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a job's window looks like on its way to the aggregator.
pub(crate) struct DirSample {
    ios: u64,
    bytes: u64,
    values: Vec<(u64, u64)>,
}

pub(crate) struct Sample {
    labels: Arc<Labels>,
    job: u32,
    iodepth: u32,
    batch: u32,
    read: DirSample,
    write: DirSample,
}

/// Backend and device of a sink's windows.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct Labels {
    backend: String,
    device: String,
}

pub(crate) enum Msg {
    Window(Box<Sample>),
    Error {
        labels: Arc<Labels>,
        op: OpKind,
        error_type: String,
    },
    Stop,
}

/// A running telemetry pipeline. Dropping it (or [`Telemetry::shutdown`]) flushes, bounded by
/// the export timeout.
pub struct Telemetry {
    cfg: TelemetryConfig,
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    agg: Option<JoinHandle<()>>,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    _rt: Option<Arc<tokio::runtime::Runtime>>,
    _observers: agg::Observers,
}

impl Telemetry {
    /// Starts the exporter (and the tokio runtime gRPC needs), the aggregator thread and,
    /// when `cfg.traces`, the span exporter.
    pub fn start(cfg: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let rt = match cfg.protocol {
            Protocol::Grpc => Some(Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("rio-otel-rt")
                    .enable_all()
                    .build()
                    .map_err(|source| TelemetryError::Start {
                        what: "gRPC runtime",
                        source,
                    })?,
            )),
            Protocol::HttpProtobuf => None,
        };
        let shared = Arc::new(Shared {
            windows: AtomicU64::new(0),
            dropped_windows: AtomicU64::new(0),
            exports: AtomicU64::new(0),
            failed_exports: AtomicU64::new(0),
            alerts_by_kind: Default::default(),
            hists: Mutex::new(Vec::new()),
            gauges: Mutex::new(Gauges::default()),
            trends: Mutex::new(Vec::new()),
            recent_alerts: Mutex::new(Vec::new()),
            pools: Mutex::new(Vec::new()),
            controllers: Mutex::new(Vec::new()),
            start: SystemTime::now(),
        });
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("rio")
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let transport = export::Transport::new(&cfg, rt.as_ref())?;
        let exporter = export::OtlpMetricExporter::new(transport, Arc::clone(&shared));
        let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
            .with_interval(cfg.export_interval)
            .build();
        let meters = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource.clone())
            .build();
        let meter = opentelemetry::metrics::MeterProvider::meter(&meters, "rio");
        let observers = agg::Observers::register(&meter, &shared);
        let tracer = if cfg.traces {
            Some(export::tracer_provider(&cfg, rt.as_ref(), resource)?)
        } else {
            None
        };
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_windows.max(1));
        let aggregator = agg::Aggregator::new(&cfg, &meter, Arc::clone(&shared), rx);
        let agg = std::thread::Builder::new()
            .name("rio-otel-agg".into())
            .spawn(move || aggregator.run())
            .map_err(|source| TelemetryError::Start {
                what: "aggregator thread",
                source,
            })?;
        tracing::info!(
            protocol = cfg.protocol.name(),
            endpoint = %cfg.metrics_endpoint,
            interval_ms = cfg.export_interval.as_millis() as u64,
            "OpenTelemetry export on"
        );
        Ok(Telemetry {
            cfg,
            shared,
            tx,
            agg: Some(agg),
            meters: Some(meters),
            tracer,
            _rt: rt,
            _observers: observers,
        })
    }

    pub fn config(&self) -> &TelemetryConfig {
        &self.cfg
    }

    /// A [`WindowSink`] for a bench on `backend` and `device` (the series' attributes).
    pub fn sink(&self, backend: &str, device: &str) -> TelemetrySink {
        TelemetrySink {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
            labels: Arc::new(Labels {
                backend: backend.to_string(),
                device: device.to_string(),
            }),
        }
    }

    /// Exports `pools`' occupancy per core and class (`rio.pool.*`) and feeds the
    /// pool-exhaustion alert from it.
    pub fn watch_pools(&self, pools: Arc<Pools>) {
        lock(&self.shared.pools).push(pools);
    }

    /// Exports an NVMe controller's health (`rio.nvme.critical_warning`,
    /// `rio.nvme.events`) and raises the `device_health` alert when its asynchronous events
    /// report a SMART critical warning.
    pub fn watch_nvme(&self, ctrl: Arc<rio::nvme::Controller>) {
        let mut c = lock(&self.shared.controllers);
        if !c.iter().any(|x| Arc::ptr_eq(x, &ctrl)) {
            c.push(ctrl);
        }
    }

    /// Trends of IOPS and p99 latency over the trailing window (see [`Trend`]).
    pub fn performance_trends(&self) -> Vec<Trend> {
        lock(&self.shared.trends).clone()
    }

    /// The seed's name for [`Self::performance_trends`].
    pub fn get_performance_trends(&self) -> Vec<Trend> {
        self.performance_trends()
    }

    /// The latest alerts (up to 64), oldest first.
    pub fn recent_alerts(&self) -> Vec<Alert> {
        lock(&self.shared.recent_alerts).clone()
    }

    pub fn stats(&self) -> TelemetryStats {
        let s = &self.shared;
        TelemetryStats {
            windows: s.windows.load(Relaxed),
            dropped_windows: s.dropped_windows.load(Relaxed),
            exports: s.exports.load(Relaxed),
            failed_exports: s.failed_exports.load(Relaxed),
            alerts: s.alerts_by_kind.iter().map(|a| a.load(Relaxed)).sum(),
        }
    }

    /// A `tracing` layer exporting spans (None when traces are off). Give it its own filter.
    pub fn tracing_layer<S>(
        &self,
    ) -> Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        let t = self.tracer.as_ref()?.tracer("rio");
        Some(tracing_opentelemetry::layer().with_tracer(t))
    }

    /// Closes the last interval, exports what is left and stops, waiting at most the export
    /// timeout (plus a second) for the collector.
    pub fn shutdown(mut self) -> TelemetryStats {
        self.finish();
        self.stats()
    }

    fn finish(&mut self) {
        let Some(agg) = self.agg.take() else {
            return;
        };
        // The aggregator drains what is queued, then closes the interval.
        let _ = self.tx.send(Msg::Stop);
        let _ = agg.join();
        let meters = self.meters.take();
        let tracer = self.tracer.take();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let flusher = std::thread::Builder::new()
            .name("rio-otel-flush".into())
            .spawn(move || {
                if let Some(m) = meters
                    && let Err(e) = m.shutdown()
                {
                    tracing::debug!(error = %e, "metrics provider shutdown");
                }
                if let Some(t) = tracer
                    && let Err(e) = t.shutdown()
                {
                    tracing::debug!(error = %e, "tracer provider shutdown");
                }
                let _ = done_tx.send(());
            });
        let bound = self.cfg.timeout + Duration::from_secs(1);
        let t0 = Instant::now();
        if flusher.is_ok() && done_rx.recv_timeout(bound).is_err() {
            tracing::warn!(
                waited_ms = t0.elapsed().as_millis() as u64,
                "telemetry: the collector did not take the final export in time; dropped"
            );
            self.shared.failed_exports.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The [`WindowSink`] that feeds a [`Telemetry`]. Cheap: a few copies and a `try_send`.
pub struct TelemetrySink {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    labels: Arc<Labels>,
}

impl TelemetrySink {
    fn send(&self, m: Msg) {
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped_windows.fetch_add(1, Relaxed);
            }
        }
    }
}

impl WindowSink for TelemetrySink {
    fn window(&self, w: &Window) {
        self.shared.windows.fetch_add(1, Relaxed);
        let dir = |d: &DirCount| DirSample {
            ios: d.ios,
            bytes: d.bytes,
            values: hist::compact(&d.hist),
        };
        self.send(Msg::Window(Box::new(Sample {
            labels: Arc::clone(&self.labels),
            job: w.job,
            iodepth: w.iodepth,
            batch: w.batch,
            read: dir(&w.read),
            write: dir(&w.write),
        })));
    }

    fn io_error(&self, _job: u32, e: &IoError) {
        self.send(Msg::Error {
            labels: Arc::clone(&self.labels),
            op: e.op,
            error_type: error_type(&e.kind),
        });
    }
}

/// The `error.type` of a failed I/O: low-cardinality, names the NVMe or OS status.
pub fn error_type(k: &IoErrorKind) -> String {
    match k {
        IoErrorKind::Os(e) => format!("os_{}", errno_name(*e)),
        IoErrorKind::Short { .. } => "short_transfer".into(),
        IoErrorKind::Nvme(e) => {
            format!("nvme_sct{:#x}_sc{:#04x}", e.status.sct_raw(), e.status.sc())
        }
        IoErrorKind::TimedOut { .. } => "timed_out".into(),
        IoErrorKind::ControllerReset { .. } => "controller_reset".into(),
    }
}

fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EINVAL => "EINVAL",
        libc::EAGAIN => "EAGAIN",
        libc::EBADF => "EBADF",
        libc::EFAULT => "EFAULT",
        libc::ENOMEM => "ENOMEM",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EROFS => "EROFS",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EILSEQ => "EILSEQ",
        _ => return format!("errno{e}"),
    };
    n.to_string()
}

fn direction(op: OpKind) -> &'static str {
    match op {
        OpKind::Read => "read",
        _ => "write",
    }
}

/// Compile-time check: the telemetry sink fits the runtime's `RuntimeConfig::sink`.
#[cfg(test)]
#[allow(dead_code)]
fn telemetry_sink_fits(t: &Telemetry) -> rio::runtime::RuntimeConfig {
    rio::runtime::RuntimeConfig {
        sink: Some(Arc::new(t.sink("uring", "/dev/nvme0n1"))),
        ..rio::runtime::RuntimeConfig::default()
    }
}

#[cfg(test)]
mod tests;
