//! The `rio` command line: every subcommand's options as clap parses them, and the bench
//! workload they describe ([`BenchArgs::spec`]). In the library so that tests and the fuzz
//! target (`fuzz/fuzz_targets/bench_args.rs`) drive the same parser the binary does.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rio::config::parse_size;

use crate::bench::spec::parse_duration;
use crate::bench::{BenchSpec, RwMode};

#[derive(Parser, Debug)]
#[command(
    name = "rio",
    version,
    about = "NVMe I/O engine: benchmark and set up drives"
)]
pub struct Cli {
    /// Engine configuration file (TOML); environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log lines on stderr as text or JSON (overrides log_format / RIO_LOG_FORMAT).
    #[arg(long = "log-format", global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Measure IOPS, bandwidth and latency with fio's workload vocabulary.
    Bench(BenchArgs),
    /// Probe a target at queue depths 1, 2, 4, … and print the curve rio learns (IOPS, mean,
    /// p50, p99 per depth), the knee, and the depth it would choose under --lat-target.
    Tune(TuneArgs),
    /// Describe a target: for pcie:// and sim:// the controller's identity, limits,
    /// namespaces with their LBA formats, and SMART/health.
    Info(InfoArgs),
    /// Prepare a host for the userspace driver: hugepages, and moving NVMe controllers between
    /// the kernel's nvme driver and vfio-pci.
    Setup(crate::setup::SetupArgs),
}

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Target: a file, block device, pcie://ADDR or sim://... (read-only unless --rw writes).
    #[arg(long)]
    pub filename: String,
    /// randread (default), read, randwrite, write or randrw.
    #[arg(long, default_value = "randread", value_parser = rw_arg)]
    pub rw: RwMode,
    /// Block size.
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    pub bs: u64,
    /// p99 target the choice must meet (default: config / RUSTFS_TARGET_LATENCY_US; without
    /// one the knee is reported).
    #[arg(long = "lat-target", value_parser = dur_arg)]
    pub lat_target: Option<Duration>,
    /// Deepest depth probed.
    #[arg(long = "iodepth-max", default_value_t = 256)]
    pub iodepth_max: u32,
    /// Time at each depth.
    #[arg(long, default_value = "500ms", value_parser = dur_arg)]
    pub step: Duration,
    /// Bytes of the target to work on (default: all of it).
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,
    /// Allow writing a raw block device or pcie:// target, an existing file rio did not lay
    /// out, or a file whose permission bits deny writing.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// pcie://ADDR, `trtype:PCIe traddr:ADDR`, sim://..., a block device or a file.
    pub target: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

pub fn rw_arg(s: &str) -> Result<RwMode, String> {
    RwMode::parse(s)
}

pub fn dur_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// `--iodepth`: a number or `auto`.
#[derive(Clone, Copy, Debug)]
pub enum Depth {
    Fixed(u32),
    Auto,
}

pub fn depth_arg(s: &str) -> Result<Depth, String> {
    if s == "auto" {
        return Ok(Depth::Auto);
    }
    s.parse::<u32>()
        .map(Depth::Fixed)
        .map_err(|_| format!("expected a number or 'auto', got '{s}'"))
}

pub fn scope_arg(s: &str) -> Result<crate::bench::autotune::Scope, String> {
    crate::bench::autotune::Scope::parse(s)
}

pub fn bool01(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("expected 0 or 1, got '{s}'")),
    }
}

pub fn verify_arg(s: &str) -> Result<bool, String> {
    match s {
        "1" | "crc32c" | "true" => Ok(true),
        "0" | "none" | "false" => Ok(false),
        _ => Err(format!("expected crc32c, 1 or 0, got '{s}'")),
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Target: a file or block device. Without it, a temporary 1 GiB file in $RIO_BENCH_DIR
    /// (or the system temporary directory) is laid out, used and removed.
    #[arg(long)]
    pub filename: Option<String>,
    /// read, write, randread, randwrite or randrw.
    #[arg(long, default_value = "randread", value_parser = rw_arg)]
    pub rw: RwMode,
    /// Percentage of reads in randrw.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,
    /// Block size (4k, 128k, 1m ...).
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    pub bs: u64,
    /// Operations in flight per job, or `auto`: the tuner picks the depth that gives the most
    /// IOPS while p99 stays under --lat-target (within 1..=--iodepth-max).
    #[arg(long, default_value = "32", value_parser = depth_arg)]
    pub iodepth: Depth,
    /// Upper bound of the depth with --iodepth auto (per job).
    #[arg(long = "iodepth-max", default_value_t = 256)]
    pub iodepth_max: u32,
    /// p99 latency target (200us, 1ms ...): reported against, and steered by --iodepth auto.
    /// Default: config / RIO_TARGET_LATENCY_US / RUSTFS_TARGET_LATENCY_US.
    #[arg(long = "lat-target", value_parser = dur_arg)]
    pub lat_target: Option<Duration>,
    /// With --iodepth auto: one tuner per job's queue (`queue`) or one for the device
    /// (`device`), its depth split over the jobs.
    #[arg(long = "tune-scope", default_value = "queue", value_parser = scope_arg)]
    pub tune_scope: crate::bench::autotune::Scope,
    /// Jobs: one thread and one queue each, pinned one per core (a single job only on the
    /// polled userspace drivers, vfio and spdk, to the first allowed core).
    #[arg(long, default_value_t = 1)]
    pub numjobs: u32,
    /// Bytes of the region to work on, per job (default: to the end of the target; 1 GiB for
    /// the temporary file).
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,
    /// Start of the region in bytes.
    #[arg(long, default_value = "0", value_parser = size_arg)]
    pub offset: u64,
    /// Stop after this long (10, 10s, 500ms, 2m), measured after the ramp.
    #[arg(long, value_parser = dur_arg)]
    pub runtime: Option<Duration>,
    /// Run for --runtime, wrapping over the region, instead of stopping after --size.
    #[arg(long = "time_based", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "1", value_parser = bool01, default_value = "0")]
    pub time_based: bool,
    /// Run this long before measuring.
    #[arg(long = "ramp_time", value_parser = dur_arg)]
    pub ramp_time: Option<Duration>,
    /// 1: O_DIRECT (bypass the page cache); 0: buffered.
    #[arg(long, action = clap::ArgAction::Set, default_value = "1", value_parser = bool01)]
    pub direct: bool,
    /// Write blocks with a header (offset, seed, CRC32C) and check everything read back.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "crc32c", value_parser = verify_arg, default_value = "0")]
    pub verify: bool,
    /// Write nothing: read the region (--offset, --size, --bs) that earlier --verify runs
    /// wrote, check every block's header, and report each bad block (fio's verify_only).
    /// Exit 1 when any is bad.
    #[arg(long = "verify-only", alias = "verify_only")]
    pub verify_only: bool,
    /// auto, uring, psync, vfio or spdk (overrides config and RIO_BACKEND). spdk: an installed
    /// SPDK's NVMe driver, in a rio built with `--features spdk`.
    #[arg(long)]
    pub backend: Option<String>,
    /// normal or json.
    #[arg(long = "output-format", default_value = "normal", value_parser = ["normal", "json"])]
    pub output_format: String,
    /// Allow writing a raw block device (its contents are destroyed), an existing file rio did
    /// not lay out (rio marks the files it creates), or a file whose permission bits deny
    /// writing (also as root).
    #[arg(long)]
    pub force: bool,
    /// Create --filename if it does not exist (needs --size).
    #[arg(long)]
    pub create: bool,
    /// Submit to the kernel as soon as this many operations are queued (fio's option; 0: once
    /// per reaped batch). Default 1, as fio: measured faster on devices that idle while a batch
    /// accumulates (docs/DESIGN.md).
    #[arg(long = "iodepth_batch_submit", default_value_t = 1)]
    pub iodepth_batch_submit: u32,
    /// io_uring submission-queue polling thread.
    #[arg(long)]
    pub sqpoll: bool,
    /// The clock of latencies and submission stamps (fio's option): auto (the CPU's
    /// time-stamp counter where the kernel keeps time with it, else clock_gettime), cpu, or
    /// clock_gettime.
    #[arg(long, default_value = "auto", value_parser = crate::bench::clock::ClockSource::parse)]
    pub clocksource: crate::bench::clock::ClockSource,
    /// Seed for offsets and data.
    #[arg(long, default_value_t = 0x5249_4f21)]
    pub seed: u64,
    /// Export metrics and spans over OTLP while running (endpoint and protocol from the
    /// standard OTEL_EXPORTER_OTLP_* variables or the otel_* config knobs; docs/TELEMETRY.md).
    #[arg(long)]
    pub otel: bool,
    /// Write plots of the run (latency histogram and CDF, IOPS, p99 and queue depth over
    /// time, LBA heat map) to FILE.html or FILE.svg.
    #[arg(long, value_name = "FILE", value_parser = report_arg)]
    pub report: Option<PathBuf>,
}

pub fn report_arg(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    crate::bench::plot::ReportFormat::from_path(&p)
        .map(|_| p)
        .map_err(|_| format!("'{s}': expected a file name ending in .html or .svg"))
}

impl BenchArgs {
    /// The workload these options describe, checked ([`BenchSpec::validate`]); a one-line
    /// usage error otherwise. `target_latency_us` is the p99 target from the configuration
    /// (`--lat-target` already applied to it), which `--iodepth auto` needs.
    pub fn spec(&self, target_latency_us: Option<u64>) -> Result<BenchSpec, String> {
        let bs = u32::try_from(self.bs)
            .map_err(|_| format!("invalid --bs: {} is too large", self.bs))?;
        let spec = BenchSpec {
            rw: self.rw,
            rwmixread: self.rwmixread,
            bs,
            iodepth: match self.iodepth {
                Depth::Fixed(n) => n,
                Depth::Auto => self.iodepth_max,
            },
            numjobs: self.numjobs,
            size: self.size.unwrap_or(0),
            offset: self.offset,
            runtime: self.runtime,
            time_based: self.time_based,
            ramp_time: self.ramp_time.unwrap_or_default(),
            verify: self.verify,
            seed: self.seed,
            clocksource: self.clocksource,
            auto: match self.iodepth {
                Depth::Fixed(_) => None,
                Depth::Auto => {
                    let Some(us) = target_latency_us else {
                        return Err(
                            "--iodepth auto needs a p99 target: --lat-target, or RUSTFS_TARGET_LATENCY_US"
                                .to_string(),
                        );
                    };
                    Some(crate::bench::autotune::AutoDepth {
                        target_p99: Duration::from_micros(us),
                        scope: self.tune_scope,
                    })
                }
            },
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }
}
