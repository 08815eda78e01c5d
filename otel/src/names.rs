//! Metric and attribute names, in one place: the exporter, the docs table (docs/TELEMETRY.md,
//! checked by a test), the Grafana dashboard and `scripts/otel-check` all use these.
//!
//! Names follow OpenTelemetry conventions: dot-separated, a `rio.` namespace, durations in
//! seconds (`s`), sizes in bytes (`By`), counts as `{unit}` annotations; standard attributes
//! (`disk.io.direction`, `system.device`, `error.type`) where a convention exists.

/// I/O latency, submission to completion (histogram, explicit buckets).
pub const IO_DURATION: &str = "rio.io.duration";
/// Latency percentiles of the last interval, from the per-job hdrhistograms (gauges).
pub const IO_DURATION_P50: &str = "rio.io.duration.p50";
pub const IO_DURATION_P95: &str = "rio.io.duration.p95";
pub const IO_DURATION_P99: &str = "rio.io.duration.p99";
pub const IO_DURATION_P999: &str = "rio.io.duration.p999";
/// Completed I/Os (counter).
pub const IO_OPERATIONS: &str = "rio.io.operations";
/// Bytes moved (counter).
pub const IO_BYTES: &str = "rio.io.bytes";
/// Failed I/Os by NVMe or OS status (counter).
pub const IO_ERRORS: &str = "rio.io.errors";
/// I/Os per second over the last interval (gauge).
pub const IO_IOPS: &str = "rio.io.iops";
/// Queue depth in force per job: the tuner's choice when it runs (gauge).
pub const QUEUE_DEPTH: &str = "rio.queue.depth";
/// Submission batch in force per job (gauge).
pub const QUEUE_SUBMIT_BATCH: &str = "rio.queue.submit_batch";
/// Changes of the queue depth in force (counter; the tuner's decisions).
pub const TUNER_DECISIONS: &str = "rio.tuner.decisions";
/// Pool buffers in use (gauge).
pub const POOL_IN_USE: &str = "rio.pool.buffers.in_use";
/// Pool buffers carved (gauge).
pub const POOL_CAPACITY: &str = "rio.pool.buffers.capacity";
/// In use over capacity (gauge, 0..1).
pub const POOL_UTILIZATION: &str = "rio.pool.utilization";
/// Process CPU time (user + system) per I/O over the last interval (gauge).
pub const CPU_PER_IO: &str = "rio.cpu.time_per_io";
/// Alerts raised, by kind (counter).
pub const ALERTS: &str = "rio.alerts";
/// SMART critical warning bits an NVMe controller last reported (0: none).
pub const NVME_CRITICAL_WARNING: &str = "rio.nvme.critical_warning";
/// Asynchronous events an NVMe controller reported.
pub const NVME_EVENTS: &str = "rio.nvme.events";
/// Telemetry data dropped (counter): windows the exporter had no room for, failed exports.
pub const DROPPED: &str = "rio.telemetry.dropped";
/// Export batches that reached the collector (counter).
pub const EXPORTS: &str = "rio.telemetry.exports";

/// `read` or `write` (OpenTelemetry semantic convention for disk I/O).
pub const ATTR_DIRECTION: &str = "disk.io.direction";
/// `nvme`, `uring` or `psync`.
pub const ATTR_BACKEND: &str = "rio.backend";
/// The target: a path, `pcie://...` or `sim://...`.
pub const ATTR_DEVICE: &str = "system.device";
/// Bench job index.
pub const ATTR_JOB: &str = "rio.job";
/// Low-cardinality failure class: `nvme_sct<N>_sc<N>`, `os_<ERRNO>`, `short_transfer`, ...
pub const ATTR_ERROR_TYPE: &str = "error.type";
/// `p99_above_target`, `error_rate`, `iops_drop`, `pool_exhaustion`.
pub const ATTR_ALERT_KIND: &str = "rio.alert.kind";
/// `window` (no room in the exporter's queue) or `export` (the collector did not take a batch).
pub const ATTR_STAGE: &str = "rio.telemetry.stage";
/// `up` or `down`.
pub const ATTR_DECISION: &str = "rio.tuner.direction";
/// Pool core and size class.
pub const ATTR_POOL_CORE: &str = "rio.pool.core";
pub const ATTR_POOL_CLASS: &str = "rio.pool.class_size";

/// Every exported metric: (name, instrument, unit). docs/TELEMETRY.md lists exactly these.
pub const METRICS: &[(&str, &str, &str)] = &[
    (IO_DURATION, "histogram", "s"),
    (IO_DURATION_P50, "gauge", "s"),
    (IO_DURATION_P95, "gauge", "s"),
    (IO_DURATION_P99, "gauge", "s"),
    (IO_DURATION_P999, "gauge", "s"),
    (IO_OPERATIONS, "counter", "{operation}"),
    (IO_BYTES, "counter", "By"),
    (IO_ERRORS, "counter", "{error}"),
    (IO_IOPS, "gauge", "{operation}/s"),
    (QUEUE_DEPTH, "gauge", "{operation}"),
    (QUEUE_SUBMIT_BATCH, "gauge", "{command}"),
    (TUNER_DECISIONS, "counter", "{decision}"),
    (POOL_IN_USE, "gauge", "{buffer}"),
    (POOL_CAPACITY, "gauge", "{buffer}"),
    (POOL_UTILIZATION, "gauge", "1"),
    (CPU_PER_IO, "gauge", "s"),
    (ALERTS, "counter", "{alert}"),
    (NVME_CRITICAL_WARNING, "gauge", "1"),
    (NVME_EVENTS, "counter", "{event}"),
    (DROPPED, "counter", "{batch}"),
    (EXPORTS, "counter", "{batch}"),
];
