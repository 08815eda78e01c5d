//! Engine configuration: built in code, read from a TOML file, or from environment variables.
//!
//! Every knob is declared once in [`KNOBS`] with its file key, its environment variables, its
//! accepted range and its parser, so the three sources validate identically and the
//! documentation table (docs/CONFIG.md) can be checked against the code by a test.

use std::path::Path;

use crate::error::{Error, Result};

/// Which I/O backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum BackendChoice {
    /// Classify the target, try the best backend, fall back on refusal (logged).
    #[default]
    Auto,
    /// io_uring with O_DIRECT, registered buffers and files.
    Uring,
    /// A thread pool doing pread/pwrite (for hosts whose seccomp forbids io_uring).
    Psync,
    /// The userspace NVMe driver (`pcie://` targets through vfio-pci; `sim://` through the
    /// software controller model).
    Vfio,
    /// An installed SPDK's userspace NVMe driver (`pcie://` and SPDK transport-ID targets);
    /// needs rio built with the cargo feature `spdk`.
    Spdk,
}

impl BackendChoice {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Self::Uring),
            "psync" | "pread" => Ok(Self::Psync),
            "vfio" | "nvme" => Ok(Self::Vfio),
            "spdk" => Ok(Self::Spdk),
            _ => Err(format!(
                "expected one of auto, uring, psync, vfio, spdk; got '{s}'"
            )),
        }
    }
}

/// Tri-state switch for features that are used only when the target supports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Switch {
    #[default]
    Auto,
    On,
    Off,
}

impl Switch {
    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" | "true" | "1" | "yes" => Ok(Self::On),
            "off" | "false" | "0" | "no" => Ok(Self::Off),
            _ => Err(format!("expected auto, on or off; got '{s}'")),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// OTLP transport for the telemetry exporter (`rio-otel` reads it; plain data here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum OtelProtocol {
    /// `http/protobuf` (port 4318).
    HttpProtobuf,
    /// `grpc` (port 4317).
    Grpc,
}

impl OtelProtocol {
    pub fn parse(s: &str) -> Result<OtelProtocol, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http/protobuf" | "http" => Ok(OtelProtocol::HttpProtobuf),
            "grpc" => Ok(OtelProtocol::Grpc),
            other => Err(format!(
                "OTLP protocol '{other}' is not supported (use http/protobuf or grpc)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OtelProtocol::HttpProtobuf => "http/protobuf",
            OtelProtocol::Grpc => "grpc",
        }
    }
}

/// Configuration of an [`crate::Engine`].
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct EngineConfig {
    /// Backend choice.
    pub backend: BackendChoice,
    /// Maximum operations in flight per queue (ring size for io_uring).
    pub queue_depth: u32,
    /// Open kernel-path targets with O_DIRECT (bypass the page cache).
    pub direct: bool,
    /// Bytes of I/O buffer memory per queue (the arena buffers are carved from).
    pub buffer_pool_bytes: usize,
    /// Back buffers with 2 MiB hugepages when the hugetlb pool has them.
    pub hugepages: bool,
    /// io_uring: kernel submission-queue polling thread.
    pub sqpoll: bool,
    /// io_uring: SQPOLL thread idle time before it sleeps, in milliseconds.
    pub sqpoll_idle_ms: u32,
    /// io_uring: hand SQEs to the kernel as soon as this many are pending (0: once per
    /// `poll`/`wait`, one `io_uring_enter` per batch).
    pub submit_batch: u32,
    /// io_uring: polled completions (IOPOLL). `Auto` uses them on NVMe devices with poll queues.
    pub iopoll: Switch,
    /// psync: worker threads per queue.
    pub psync_threads: u32,
    /// Latency target for p99, in microseconds (bench reports against it; the tuner uses it).
    pub target_latency_us: Option<u64>,
    /// Report throughput and latency every second while running.
    pub realtime_monitoring: bool,
    /// Log format of the CLI.
    pub log_format: LogFormat,
    /// NVMe driver: entries per I/O queue (0: twice the queue depth, 64..=1024, capped by the
    /// controller's CAP.MQES).
    pub nvme_queue_entries: u16,
    /// NVMe driver: abort a command outstanding this long, in milliseconds (0: never).
    pub nvme_timeout_ms: u64,
    /// NVMe driver: admin command timeout, and how long an abort may take before the
    /// controller is reset, in milliseconds.
    pub nvme_admin_timeout_ms: u64,
    /// NVMe driver: use shadow doorbells when the controller offers Doorbell Buffer Config.
    pub nvme_shadow_doorbells: bool,
    /// NVMe driver: when reads and writes use SGLs instead of PRPs.
    pub nvme_sgl: SglMode,
    /// NVMe driver: retries of a command that failed with a status allowing one (DNR clear),
    /// after the delay the controller asks for (CRD); 0: none.
    pub nvme_retries: u8,
    /// NVMe driver: accept controllers bound to uio_pci_generic (no IOMMU: the device can DMA
    /// anywhere in physical memory).
    pub allow_unsafe_dma: bool,
    /// Runtime pools: buffers of each size class carved per core at start.
    pub pool_initial_buffers: usize,
    /// Runtime pools: grow a class on sustained misses (adaptive) or never (fixed).
    pub pool_adaptive: bool,
    /// Runtime pools: zero a buffer when it is returned (hosts sharing buffers between tenants).
    pub pool_zero_on_free: bool,
    /// Runtime pollers: busy-poll (true) or park after a run of empty polls (false).
    pub busy_poll: bool,
    /// `DiskFile` read-ahead for sequential and strided streams, and its budget per stream.
    pub prefetch: bool,
    pub prefetch_budget_bytes: u64,
    /// Export metrics and spans over OTLP (see docs/TELEMETRY.md).
    pub otel_export: bool,
    /// OTLP base endpoint when `OTEL_EXPORTER_OTLP_ENDPOINT` is not set.
    pub otel_endpoint: Option<String>,
    /// OTLP protocol (`http/protobuf` or `grpc`) when `OTEL_EXPORTER_OTLP_PROTOCOL` is not set.
    pub otel_protocol: Option<String>,
    /// Metric export interval when `OTEL_METRIC_EXPORT_INTERVAL` is not set, in milliseconds.
    pub otel_interval_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            backend: BackendChoice::Auto,
            queue_depth: 128,
            direct: true,
            buffer_pool_bytes: 64 << 20,
            hugepages: true,
            sqpoll: false,
            sqpoll_idle_ms: 100,
            submit_batch: 0,
            iopoll: Switch::Auto,
            psync_threads: 8,
            target_latency_us: None,
            realtime_monitoring: false,
            log_format: LogFormat::Text,
            nvme_queue_entries: 0,
            nvme_timeout_ms: 30_000,
            nvme_admin_timeout_ms: 5_000,
            nvme_shadow_doorbells: true,
            nvme_sgl: SglMode::Auto,
            nvme_retries: 3,
            allow_unsafe_dma: false,
            pool_initial_buffers: 16,
            pool_adaptive: true,
            pool_zero_on_free: false,
            busy_poll: false,
            prefetch: true,
            prefetch_budget_bytes: 8 << 20,
            otel_export: false,
            otel_endpoint: None,
            otel_protocol: None,
            otel_interval_ms: 5_000,
        }
    }
}

impl EngineConfig {
    /// Name of the configured backend choice, for messages.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            BackendChoice::Auto => "auto",
            BackendChoice::Uring => "uring",
            BackendChoice::Psync => "psync",
            BackendChoice::Vfio => "vfio",
            BackendChoice::Spdk => "spdk",
        }
    }
}

/// One configuration knob: where it comes from and how it is validated.
pub struct Knob {
    /// Key in the TOML file.
    pub key: &'static str,
    /// Environment variables, in order of precedence (first set wins).
    pub env: &'static [&'static str],
    /// Accepted values, for error messages and docs.
    pub accepted: &'static str,
    /// What it does.
    pub help: &'static str,
    apply: fn(&mut EngineConfig, &str) -> std::result::Result<(), String>,
}

fn int_in<T>(s: &str, lo: u64, hi: u64) -> std::result::Result<T, String>
where
    T: TryFrom<u64>,
{
    let v = parse_size(s).map_err(|_| format!("expected an integer in {lo}..={hi}, got '{s}'"))?;
    if v < lo || v > hi {
        return Err(format!("expected a value in {lo}..={hi}, got {v}"));
    }
    T::try_from(v).map_err(|_| format!("value {v} out of range"))
}

fn boolean(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("expected true or false, got '{s}'")),
    }
}

/// All knobs. The documentation table in docs/CONFIG.md lists exactly these.
pub const KNOBS: &[Knob] = &[
    Knob {
        key: "backend",
        env: &["RIO_BACKEND"],
        accepted: "auto, uring, psync, vfio, spdk",
        help: "I/O backend; auto classifies the target and falls back on refusal",
        apply: |c, s| {
            c.backend = BackendChoice::parse(s)?;
            Ok(())
        },
    },
    Knob {
        key: "queue_depth",
        env: &["RIO_QUEUE_DEPTH"],
        accepted: "1..=4096",
        help: "maximum operations in flight per queue",
        apply: |c, s| {
            c.queue_depth = int_in(s, 1, 4096)?;
            Ok(())
        },
    },
    Knob {
        key: "direct",
        env: &["RIO_DIRECT"],
        accepted: "true, false",
        help: "open kernel-path targets with O_DIRECT",
        apply: |c, s| {
            c.direct = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "buffer_pool_bytes",
        env: &["RIO_BUFFER_POOL_BYTES", "RUSTFS_MAX_BUFFER_POOL_SIZE"],
        accepted: "1M..=64G (suffixes k, M, G)",
        help: "I/O buffer memory per queue; buffers are carved from it and registered once",
        apply: |c, s| {
            c.buffer_pool_bytes = int_in(s, 1 << 20, 64 << 30)?;
            Ok(())
        },
    },
    Knob {
        key: "hugepages",
        env: &["RIO_HUGEPAGES"],
        accepted: "true, false",
        help: "back buffers with 2 MiB hugepages when reserved (falls back to 4 KiB pages)",
        apply: |c, s| {
            c.hugepages = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "sqpoll",
        env: &["RIO_SQPOLL"],
        accepted: "true, false",
        help: "io_uring kernel submission polling thread",
        apply: |c, s| {
            c.sqpoll = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "sqpoll_idle_ms",
        env: &["RIO_SQPOLL_IDLE_MS"],
        accepted: "1..=60000",
        help: "idle time before the SQPOLL thread sleeps",
        apply: |c, s| {
            c.sqpoll_idle_ms = int_in(s, 1, 60_000)?;
            Ok(())
        },
    },
    Knob {
        key: "submit_batch",
        env: &["RIO_SUBMIT_BATCH"],
        accepted: "0..=4096",
        help: "io_uring: submit once this many operations are pending; 0 submits once per poll",
        apply: |c, s| {
            c.submit_batch = int_in(s, 0, 4096)?;
            Ok(())
        },
    },
    Knob {
        key: "iopoll",
        env: &["RIO_IOPOLL"],
        accepted: "auto, on, off",
        help: "io_uring polled completions; auto uses them on NVMe devices with poll queues",
        apply: |c, s| {
            c.iopoll = Switch::parse(s)?;
            Ok(())
        },
    },
    Knob {
        key: "psync_threads",
        env: &["RIO_PSYNC_THREADS"],
        accepted: "1..=256",
        help: "worker threads per queue of the psync backend",
        apply: |c, s| {
            c.psync_threads = int_in(s, 1, 256)?;
            Ok(())
        },
    },
    Knob {
        key: "target_latency_us",
        env: &["RIO_TARGET_LATENCY_US", "RUSTFS_TARGET_LATENCY_US"],
        accepted: "10..=10000000",
        help: "p99 latency target in microseconds: bench reports against it, --iodepth auto and the runtime's pollers choose their queue depth under it",
        apply: |c, s| {
            c.target_latency_us = Some(int_in(s, 10, 10_000_000)?);
            Ok(())
        },
    },
    Knob {
        key: "realtime_monitoring",
        env: &[
            "RIO_REALTIME_MONITORING",
            "RUSTFS_ENABLE_REALTIME_MONITORING",
        ],
        accepted: "true, false",
        help: "log IOPS, bandwidth and p99 every second while running",
        apply: |c, s| {
            c.realtime_monitoring = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "nvme_queue_entries",
        env: &["RIO_NVME_QUEUE_ENTRIES"],
        accepted: "0, 2..=4096",
        help: "NVMe driver: entries per I/O queue pair; 0 sizes it from the queue depth",
        apply: |c, s| {
            let v: u16 = int_in(s, 0, 4096)?;
            if v == 1 {
                return Err("a queue needs at least 2 entries".into());
            }
            c.nvme_queue_entries = v;
            Ok(())
        },
    },
    Knob {
        key: "nvme_timeout_ms",
        env: &["RIO_NVME_TIMEOUT_MS"],
        accepted: "0..=3600000",
        help: "NVMe driver: abort a command outstanding this long (ms); 0 disables timeouts",
        apply: |c, s| {
            c.nvme_timeout_ms = int_in(s, 0, 3_600_000)?;
            Ok(())
        },
    },
    Knob {
        key: "nvme_admin_timeout_ms",
        env: &["RIO_NVME_ADMIN_TIMEOUT_MS"],
        accepted: "10..=600000",
        help: "NVMe driver: admin command timeout, and how long an abort may take before the controller is reset (ms)",
        apply: |c, s| {
            c.nvme_admin_timeout_ms = int_in(s, 10, 600_000)?;
            Ok(())
        },
    },
    Knob {
        key: "nvme_shadow_doorbells",
        env: &["RIO_NVME_SHADOW_DOORBELLS"],
        accepted: "true, false",
        help: "NVMe driver: use shadow doorbells (Doorbell Buffer Config) when the controller offers them",
        apply: |c, s| {
            c.nvme_shadow_doorbells = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "nvme_sgl",
        env: &["RIO_NVME_SGL"],
        accepted: "auto, off, always",
        help: "NVMe driver: describe buffers with SGLs when the controller supports them and a transfer spans more than two pages (auto), never (off), or for every read and write (always)",
        apply: |c, s| {
            c.nvme_sgl = s.parse()?;
            Ok(())
        },
    },
    Knob {
        key: "nvme_retries",
        env: &["RIO_NVME_RETRIES"],
        accepted: "0..=10",
        help: "NVMe driver: retries of a command that failed with a status allowing a retry (DNR clear), each after the delay the controller asks for (CRD)",
        apply: |c, s| {
            c.nvme_retries = int_in(s, 0, 10)?;
            Ok(())
        },
    },
    Knob {
        key: "allow_unsafe_dma",
        env: &["RIO_ALLOW_UNSAFE_DMA"],
        accepted: "true, false",
        help: "NVMe driver: accept controllers bound to uio_pci_generic, which can DMA to any physical memory (no IOMMU)",
        apply: |c, s| {
            c.allow_unsafe_dma = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "pool_initial_buffers",
        env: &[
            "RIO_POOL_INITIAL_BUFFERS",
            "RUSTFS_BUFFER_POOL_INITIAL_SIZE",
        ],
        accepted: "1..=65536",
        help: "runtime pools: buffers of each size class carved per core at start",
        apply: |c, s| {
            c.pool_initial_buffers = int_in(s, 1, 65536)?;
            Ok(())
        },
    },
    Knob {
        key: "pool_strategy",
        env: &["RIO_POOL_STRATEGY", "RUSTFS_BUFFER_POOL_STRATEGY"],
        accepted: "adaptive, fixed",
        help: "runtime pools: grow a size class on sustained misses and give idle memory back (adaptive), or keep the initial buffers (fixed)",
        apply: |c, s| {
            c.pool_adaptive = match s.to_ascii_lowercase().as_str() {
                "adaptive" | "dynamic" => true,
                "fixed" | "static" => false,
                _ => return Err(format!("expected adaptive or fixed, got '{s}'")),
            };
            Ok(())
        },
    },
    Knob {
        key: "pool_zero_on_free",
        env: &["RIO_POOL_ZERO_ON_FREE"],
        accepted: "true, false",
        help: "runtime pools: zero a buffer when it is returned",
        apply: |c, s| {
            c.pool_zero_on_free = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "busy_poll",
        env: &["RIO_BUSY_POLL"],
        accepted: "true, false",
        help: "runtime pollers spin without pause (true) or park after 10,000 empty polls (false)",
        apply: |c, s| {
            c.busy_poll = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "prefetch",
        env: &["RIO_PREFETCH"],
        accepted: "true, false",
        help: "DiskFile read-ahead for sequential and strided streams (turns itself off for random ones)",
        apply: |c, s| {
            c.prefetch = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "prefetch_budget",
        env: &["RIO_PREFETCH_BUDGET"],
        accepted: "64k..=1g",
        help: "bytes each DiskFile stream may hold read ahead",
        apply: |c, s| {
            let v = parse_size(s).map_err(|e| e.to_string())?;
            if !((64 << 10)..=(1 << 30)).contains(&v) {
                return Err(format!("expected 64k..=1g, got {s}"));
            }
            c.prefetch_budget_bytes = v;
            Ok(())
        },
    },
    Knob {
        key: "log_format",
        env: &["RIO_LOG_FORMAT"],
        accepted: "text, json",
        help: "format of log lines on stderr",
        apply: |c, s| {
            c.log_format = match s.to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(format!("expected text or json, got '{s}'")),
            };
            Ok(())
        },
    },
    Knob {
        key: "otel_export",
        env: &["RIO_OTEL"],
        accepted: "true, false",
        help: "export metrics and spans over OTLP (`rio bench --otel` turns it on too)",
        apply: |c, s| {
            c.otel_export = boolean(s)?;
            Ok(())
        },
    },
    Knob {
        key: "otel_endpoint",
        env: &["RIO_OTEL_ENDPOINT"],
        accepted: "http:// or https:// URL",
        help: "OTLP base endpoint; OTEL_EXPORTER_OTLP_ENDPOINT (and the per-signal variables) take precedence",
        apply: |c, s| {
            if !(s.starts_with("http://") || s.starts_with("https://")) {
                return Err(format!("expected an http:// or https:// URL, got '{s}'"));
            }
            c.otel_endpoint = Some(s.to_string());
            Ok(())
        },
    },
    Knob {
        key: "otel_protocol",
        env: &["RIO_OTEL_PROTOCOL"],
        accepted: "http/protobuf, grpc",
        help: "OTLP transport; OTEL_EXPORTER_OTLP_PROTOCOL takes precedence",
        apply: |c, s| {
            OtelProtocol::parse(s)?;
            c.otel_protocol = Some(s.to_ascii_lowercase());
            Ok(())
        },
    },
    Knob {
        key: "otel_interval_ms",
        env: &["RIO_OTEL_INTERVAL_MS"],
        accepted: "100..=3600000",
        help: "metric export interval; OTEL_METRIC_EXPORT_INTERVAL takes precedence",
        apply: |c, s| {
            c.otel_interval_ms = int_in(s, 100, 3_600_000)?;
            Ok(())
        },
    },
];

impl EngineConfig {
    /// Set a knob by its file key, validating the value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let knob = KNOBS
            .iter()
            .find(|k| k.key == key)
            .ok_or_else(|| Error::config(key, "unknown configuration key"))?;
        (knob.apply)(self, value.trim()).map_err(|r| Error::config(key, r))
    }

    /// Defaults overlaid with the environment (see [`EngineConfig::apply_env`]).
    pub fn from_env() -> Result<Self> {
        let mut c = Self::default();
        c.apply_env(|k| std::env::var(k).ok())?;
        Ok(c)
    }

    /// Overlay values from environment variables, read through `get` (testable without touching
    /// the process environment). Where a knob has several variables, the first that is set wins
    /// (rio's own name before the RustFS-style one). An invalid value is an error naming the
    /// variable and the accepted range.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        for knob in KNOBS {
            if let Some((var, val)) = knob.env.iter().find_map(|v| get(v).map(|x| (*v, x))) {
                (knob.apply)(self, val.trim()).map_err(|r| Error::config(var, r))?;
            }
        }
        Ok(())
    }

    /// Overlay values from a TOML document (flat `key = value` pairs; an `[engine]` table is
    /// also accepted). Unknown keys are errors, so a typo is not silently ignored.
    pub fn apply_toml(&mut self, text: &str, origin: &str) -> Result<()> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::config(origin, one_line(&e.to_string())))?;
        let table = match table.get("engine") {
            Some(toml::Value::Table(t)) if table.len() == 1 => t.clone(),
            _ => table,
        };
        for (k, v) in &table {
            let s = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(Error::config(
                        format!("{origin}: key {k}"),
                        format!(
                            "expected a string, integer or boolean, got {}",
                            other.type_str()
                        ),
                    ));
                }
            };
            let knob = KNOBS
                .iter()
                .find(|n| n.key == k)
                .ok_or_else(|| Error::config(format!("{origin}: key {k}"), "unknown key"))?;
            (knob.apply)(self, s.trim())
                .map_err(|r| Error::config(format!("{origin}: key {k}"), r))?;
        }
        Ok(())
    }

    /// Defaults, then the TOML file, then the environment (environment wins, as operators
    /// expect from container deployments).
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut c = Self::default();
        if let Some(p) = file {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Error::config(
                    format!("config file {}", p.display()),
                    format!("cannot read: {e}"),
                )
            })?;
            c.apply_toml(&text, &p.display().to_string())?;
        }
        c.apply_env(|k| std::env::var(k).ok())?;
        Ok(c)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parse a byte count with an optional binary suffix, as fio does: `4096`, `4k`, `4K`, `4KiB`,
/// `1m`, `2G`, `1t`. Suffixes are powers of 1024.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size"));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}' has an unknown unit '{suffix}'")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// When the driver describes data buffers with scatter-gather lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum SglMode {
    /// When the controller supports SGLs and a transfer would need a PRP list (more than two
    /// memory pages): one descriptor per contiguous piece instead of one entry per page.
    #[default]
    Auto,
    /// PRPs only.
    Off,
    /// Every read and write through an SGL (the controller must support them); for testing
    /// the SGL path.
    Always,
}

impl std::str::FromStr for SglMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(SglMode::Auto),
            "off" | "prp" => Ok(SglMode::Off),
            "always" | "on" => Ok(SglMode::Always),
            _ => Err(format!("'{s}' is not auto, off or always")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216t").is_err());
    }

    #[test]
    fn rustfs_variables_map_to_knobs() {
        let mut c = EngineConfig::default();
        c.apply_env(env(&[
            ("RUSTFS_TARGET_LATENCY_US", "500"),
            ("RUSTFS_MAX_BUFFER_POOL_SIZE", "128M"),
            ("RUSTFS_ENABLE_REALTIME_MONITORING", "true"),
        ]))
        .unwrap();
        assert_eq!(c.target_latency_us, Some(500));
        assert_eq!(c.buffer_pool_bytes, 128 << 20);
        assert!(c.realtime_monitoring);
    }

    #[test]
    fn rio_variable_wins_over_rustfs_one() {
        let mut c = EngineConfig::default();
        c.apply_env(env(&[
            ("RIO_TARGET_LATENCY_US", "100"),
            ("RUSTFS_TARGET_LATENCY_US", "900"),
        ]))
        .unwrap();
        assert_eq!(c.target_latency_us, Some(100));
    }

    #[test]
    fn invalid_env_names_variable_and_range() {
        let mut c = EngineConfig::default();
        let e = c
            .apply_env(env(&[("RUSTFS_TARGET_LATENCY_US", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RUSTFS_TARGET_LATENCY_US"), "{e}");
        assert!(e.contains("10..=10000000"), "{e}");
        let e = c
            .apply_env(env(&[("RIO_QUEUE_DEPTH", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RIO_QUEUE_DEPTH") && e.contains("1..=4096"),
            "{e}"
        );
    }

    #[test]
    fn toml_file() {
        let mut c = EngineConfig::default();
        c.apply_toml(
            "backend = \"psync\"\nqueue_depth = 64\nhugepages = false\nbuffer_pool_bytes = \"32M\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.backend, BackendChoice::Psync);
        assert_eq!(c.queue_depth, 64);
        assert!(!c.hugepages);
        assert_eq!(c.buffer_pool_bytes, 32 << 20);
        let mut d = EngineConfig::default();
        d.apply_toml("[engine]\nqueue_depth = 8\n", "t.toml")
            .unwrap();
        assert_eq!(d.queue_depth, 8);
    }

    #[test]
    fn toml_errors_are_one_line_and_name_the_key() {
        let mut c = EngineConfig::default();
        let e = c
            .apply_toml("queue_depht = 3", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue_depht") && e.contains("unknown"), "{e}");
        let e = c
            .apply_toml("queue_depth = [1]", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue_depth"), "{e}");
        let e = c
            .apply_toml("queue_depth = = 3", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        let e = c
            .apply_toml("queue_depth = 99999", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1..=4096"), "{e}");
    }

    #[test]
    fn every_knob_is_documented() {
        let doc = include_str!("../../docs/CONFIG.md");
        for k in KNOBS {
            assert!(
                doc.contains(&format!("`{}`", k.key)),
                "docs/CONFIG.md lacks key {}",
                k.key
            );
            for v in k.env {
                assert!(
                    doc.contains(&format!("`{v}`")),
                    "docs/CONFIG.md lacks variable {v}"
                );
            }
            assert!(
                doc.contains(k.accepted),
                "docs/CONFIG.md lacks range of {}",
                k.key
            );
        }
    }
}
