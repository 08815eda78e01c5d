//! `rio`: the command-line front end.
//!
//! Exit status: 0 success (also after Ctrl-C, with the partial result printed), 1 the run
//! failed (I/O error, verify mismatch), 2 bad input (one line on stderr, nothing written).

use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rio::config::{BackendChoice, EngineConfig, LogFormat, parse_size};
use rio::target::{OpenOptions, TargetSpec};
use rio::{Engine, Error};
use rio_cli::bench::run::{Phase, Progress, RunOptions};
use rio_cli::bench::series::{NoSink, WindowSink};
use rio_cli::bench::spec::parse_duration;
use rio_cli::bench::{BenchError, BenchSpec, RwMode};
use rio_otel::{Telemetry, TelemetryConfig};

#[derive(Parser, Debug)]
#[command(
    name = "rio",
    version,
    about = "NVMe I/O engine: benchmark and set up drives"
)]
struct Cli {
    /// Engine configuration file (TOML); environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log lines on stderr as text or JSON (overrides log_format / RIO_LOG_FORMAT).
    #[arg(long = "log-format", global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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
    Setup(rio_cli::setup::SetupArgs),
}

#[derive(clap::Args, Debug)]
struct TuneArgs {
    /// Target: a file, block device, pcie://ADDR or sim://... (read-only unless --rw writes).
    #[arg(long)]
    filename: String,
    /// randread (default), read, randwrite, write or randrw.
    #[arg(long, default_value = "randread", value_parser = rw_arg)]
    rw: RwMode,
    /// Block size.
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    bs: u64,
    /// p99 target the choice must meet (default: config / RUSTFS_TARGET_LATENCY_US; without
    /// one the knee is reported).
    #[arg(long = "lat-target", value_parser = dur_arg)]
    lat_target: Option<Duration>,
    /// Deepest depth probed.
    #[arg(long = "iodepth-max", default_value_t = 256)]
    iodepth_max: u32,
    /// Time at each depth.
    #[arg(long, default_value = "500ms", value_parser = dur_arg)]
    step: Duration,
    /// Bytes of the target to work on (default: all of it).
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// Allow writing a raw block device or pcie:// target, an existing file rio did not lay
    /// out, or a file whose permission bits deny writing.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct InfoArgs {
    /// pcie://ADDR, `trtype:PCIe traddr:ADDR`, sim://..., a block device or a file.
    target: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

fn rw_arg(s: &str) -> Result<RwMode, String> {
    RwMode::parse(s)
}

fn dur_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// `--iodepth`: a number or `auto`.
#[derive(Clone, Copy, Debug)]
enum Depth {
    Fixed(u32),
    Auto,
}

fn depth_arg(s: &str) -> Result<Depth, String> {
    if s == "auto" {
        return Ok(Depth::Auto);
    }
    s.parse::<u32>()
        .map(Depth::Fixed)
        .map_err(|_| format!("expected a number or 'auto', got '{s}'"))
}

fn scope_arg(s: &str) -> Result<rio_cli::bench::autotune::Scope, String> {
    rio_cli::bench::autotune::Scope::parse(s)
}

fn bool01(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("expected 0 or 1, got '{s}'")),
    }
}

fn verify_arg(s: &str) -> Result<bool, String> {
    match s {
        "1" | "crc32c" | "true" => Ok(true),
        "0" | "none" | "false" => Ok(false),
        _ => Err(format!("expected crc32c, 1 or 0, got '{s}'")),
    }
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Target: a file or block device. Without it, a temporary 1 GiB file in $RIO_BENCH_DIR
    /// (or the system temporary directory) is laid out, used and removed.
    #[arg(long)]
    filename: Option<String>,
    /// read, write, randread, randwrite or randrw.
    #[arg(long, default_value = "randread", value_parser = rw_arg)]
    rw: RwMode,
    /// Percentage of reads in randrw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Block size (4k, 128k, 1m ...).
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    bs: u64,
    /// Operations in flight per job, or `auto`: the tuner picks the depth that gives the most
    /// IOPS while p99 stays under --lat-target (within 1..=--iodepth-max).
    #[arg(long, default_value = "32", value_parser = depth_arg)]
    iodepth: Depth,
    /// Upper bound of the depth with --iodepth auto (per job).
    #[arg(long = "iodepth-max", default_value_t = 256)]
    iodepth_max: u32,
    /// p99 latency target (200us, 1ms ...): reported against, and steered by --iodepth auto.
    /// Default: config / RIO_TARGET_LATENCY_US / RUSTFS_TARGET_LATENCY_US.
    #[arg(long = "lat-target", value_parser = dur_arg)]
    lat_target: Option<Duration>,
    /// With --iodepth auto: one tuner per job's queue (`queue`) or one for the device
    /// (`device`), its depth split over the jobs.
    #[arg(long = "tune-scope", default_value = "queue", value_parser = scope_arg)]
    tune_scope: rio_cli::bench::autotune::Scope,
    /// Jobs: one thread and one queue each, pinned one per core.
    #[arg(long, default_value_t = 1)]
    numjobs: u32,
    /// Bytes of the region to work on, per job (default: to the end of the target; 1 GiB for
    /// the temporary file).
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// Start of the region in bytes.
    #[arg(long, default_value = "0", value_parser = size_arg)]
    offset: u64,
    /// Stop after this long (10, 10s, 500ms, 2m), measured after the ramp.
    #[arg(long, value_parser = dur_arg)]
    runtime: Option<Duration>,
    /// Run for --runtime, wrapping over the region, instead of stopping after --size.
    #[arg(long = "time_based", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "1", value_parser = bool01, default_value = "0")]
    time_based: bool,
    /// Run this long before measuring.
    #[arg(long = "ramp_time", value_parser = dur_arg)]
    ramp_time: Option<Duration>,
    /// 1: O_DIRECT (bypass the page cache); 0: buffered.
    #[arg(long, action = clap::ArgAction::Set, default_value = "1", value_parser = bool01)]
    direct: bool,
    /// Write blocks with a header (offset, seed, CRC32C) and check everything read back.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "crc32c", value_parser = verify_arg, default_value = "0")]
    verify: bool,
    /// Write nothing: read the region (--offset, --size, --bs) that earlier --verify runs
    /// wrote, check every block's header, and report each bad block (fio's verify_only).
    /// Exit 1 when any is bad.
    #[arg(long = "verify-only", alias = "verify_only")]
    verify_only: bool,
    /// auto, uring or psync (overrides config and RIO_BACKEND).
    #[arg(long)]
    backend: Option<String>,
    /// normal or json.
    #[arg(long = "output-format", default_value = "normal", value_parser = ["normal", "json"])]
    output_format: String,
    /// Allow writing a raw block device (its contents are destroyed), an existing file rio did
    /// not lay out (rio marks the files it creates), or a file whose permission bits deny
    /// writing (also as root).
    #[arg(long)]
    force: bool,
    /// Create --filename if it does not exist (needs --size).
    #[arg(long)]
    create: bool,
    /// Submit to the kernel as soon as this many operations are queued (fio's option; 0: once
    /// per reaped batch). Default 1, as fio: measured faster on devices that idle while a batch
    /// accumulates (docs/DESIGN.md).
    #[arg(long = "iodepth_batch_submit", default_value_t = 1)]
    iodepth_batch_submit: u32,
    /// io_uring submission-queue polling thread.
    #[arg(long)]
    sqpoll: bool,
    /// Seed for offsets and data.
    #[arg(long, default_value_t = 0x5249_4f21)]
    seed: u64,
    /// Export metrics and spans over OTLP while running (endpoint and protocol from the
    /// standard OTEL_EXPORTER_OTLP_* variables or the otel_* config knobs; docs/TELEMETRY.md).
    #[arg(long)]
    otel: bool,
    /// Write plots of the run (latency histogram and CDF, IOPS, p99 and queue depth over
    /// time, LBA heat map) to FILE.html or FILE.svg.
    #[arg(long, value_name = "FILE", value_parser = report_arg)]
    report: Option<PathBuf>,
}

fn report_arg(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    rio_cli::bench::plot::ReportFormat::from_path(&p)
        .map(|_| p)
        .map_err(|_| format!("'{s}': expected a file name ending in .html or .svg"))
}

/// A failure with its exit status.
struct Fail {
    code: u8,
    msg: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail {
            code: if e.is_usage() { 2 } else { 1 },
            msg: e.to_string(),
        }
    }
}

impl From<BenchError> for Fail {
    fn from(e: BenchError) -> Fail {
        match e {
            BenchError::Setup(e) => e.into(),
            other => Fail {
                code: 1,
                msg: other.to_string(),
            },
        }
    }
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail {
        code: 2,
        msg: msg.into(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("rio: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("rio: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(cfg: &EngineConfig, telemetry: Option<&Telemetry>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RIO_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match cfg.log_format {
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        LogFormat::Text => fmt.without_time().with_filter(filter).boxed(),
    };
    // Spans exported over OTLP have their own filter (RIO_TRACE_FILTER, default info).
    let otel = telemetry.and_then(|t| t.tracing_layer()).map(|l| {
        let f = std::env::var("RIO_TRACE_FILTER").unwrap_or_else(|_| "info".into());
        l.with_filter(
            tracing_subscriber::EnvFilter::try_new(&f)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
}

fn real_main(cli: Cli) -> Result<(), Fail> {
    let mut cfg = EngineConfig::load(cli.config.as_deref())?;
    if let Some(f) = &cli.log_format {
        cfg.log_format = if f == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    cfg.otel_export |= matches!(&cli.cmd, Cmd::Bench(a) if a.otel);
    // Before telemetry starts: its p99 alert uses the same target.
    if let Cmd::Bench(a) = &cli.cmd
        && let Some(t) = a.lat_target
    {
        let us = t.as_micros();
        if !(10..=10_000_000).contains(&us) {
            return Err(usage(format!(
                "invalid --lat-target: expected 10us..=10s, got {us}us"
            )));
        }
        cfg.target_latency_us = Some(us as u64);
    }
    let telemetry = if cfg.otel_export {
        let tc = TelemetryConfig::from_env(&cfg).map_err(|e| usage(e.to_string()))?;
        Some(Telemetry::start(tc).map_err(|e| usage(e.to_string()))?)
    } else {
        None
    };
    init_logging(&cfg, telemetry.as_ref());
    let r = run_cmd(cli, cfg, telemetry.as_ref());
    if let Some(t) = telemetry {
        let s = t.shutdown();
        eprintln!(
            "rio: telemetry: {} export batches taken, {} dropped (collector down or slow), {} windows dropped, {} alerts",
            s.exports, s.failed_exports, s.dropped_windows, s.alerts
        );
    }
    r
}

fn run_cmd(cli: Cli, mut cfg: EngineConfig, telemetry: Option<&Telemetry>) -> Result<(), Fail> {
    match cli.cmd {
        Cmd::Bench(a) => {
            if let Some(b) = &a.backend {
                cfg.backend = BackendChoice::parse(b)
                    .map_err(|r| usage(format!("invalid --backend: {r}")))?;
            }
            cfg.sqpoll |= a.sqpoll;
            if a.iodepth_batch_submit > 4096 {
                return Err(usage(format!(
                    "invalid --iodepth_batch_submit: expected 0..=4096, got {}",
                    a.iodepth_batch_submit
                )));
            }
            cfg.submit_batch = a.iodepth_batch_submit;
            bench(cfg, a, telemetry)
        }
        Cmd::Tune(a) => tune(cfg, a),
        Cmd::Info(a) => info(cfg, a),
        Cmd::Setup(a) => {
            let _span = tracing::info_span!("setup").entered();
            rio_cli::setup::run(&a, Path::new("/sys")).map_err(Fail::from)
        }
    }
}

fn tune(cfg: EngineConfig, a: TuneArgs) -> Result<(), Fail> {
    if a.iodepth_max == 0 || a.iodepth_max > rio_cli::bench::spec::MAX_IODEPTH {
        return Err(usage(format!(
            "invalid --iodepth-max: expected 1..={}, got {}",
            rio_cli::bench::spec::MAX_IODEPTH,
            a.iodepth_max
        )));
    }
    if a.step < Duration::from_millis(100) {
        return Err(usage("invalid --step: at least 100ms"));
    }
    let target = match a.lat_target {
        Some(t) if !(10..=10_000_000).contains(&t.as_micros()) => {
            return Err(usage(format!(
                "invalid --lat-target: expected 10us..=10s, got {}us",
                t.as_micros()
            )));
        }
        Some(t) => Some(t),
        None => cfg.target_latency_us.map(Duration::from_micros),
    };
    let spec = BenchSpec {
        rw: a.rw,
        bs: u32_arg("--bs", a.bs)?,
        size: a.size.unwrap_or(0),
        ..BenchSpec::default()
    };
    spec.validate()?;
    let raw = is_block_device(Path::new(&a.filename))
        || matches!(TargetSpec::parse(&a.filename), TargetSpec::Pcie { .. });
    if spec.rw.writes() && raw && !a.force {
        return Err(usage(format!(
            "{}: --rw {} writes the raw device and destroys its contents; pass --force to allow it",
            a.filename,
            spec.rw.name()
        )));
    }
    let engine = Engine::open(
        &cfg,
        &a.filename,
        OpenOptions {
            write: spec.rw.writes(),
            direct: true,
            create: false,
        },
    )?;
    spec.resolve(&engine.target().geometry)?;
    if spec.rw.writes()
        && !a.force
        && let Some(why) = rio_cli::bench::guard::write_refusal(Path::new(&a.filename))
    {
        return Err(usage(why));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let r = rio_cli::bench::probe::probe(&engine, &spec, a.iodepth_max, a.step, target, &stop)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serializes")
        );
    } else {
        println!(
            "rio tune: {} bs={} on {} ({}), {} per depth{}",
            spec.rw.name(),
            spec.bs,
            a.filename,
            engine.selection().backend.name(),
            humantime(a.step),
            target.map_or(String::new(), |t| format!(", p99 target {}", humantime(t)))
        );
        print!("{}", r.to_human());
    }
    Ok(())
}

fn humantime(d: Duration) -> String {
    if d.as_millis() < 1 {
        format!("{}us", d.as_micros())
    } else if d.as_secs() < 1 || d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

fn info(cfg: EngineConfig, a: InfoArgs) -> Result<(), Fail> {
    let engine = Engine::open(&cfg, &a.target, OpenOptions::default())?;
    if a.json {
        match rio::info::ControllerInfo::of_engine(&engine) {
            Some(i) => println!(
                "{}",
                serde_json::to_string_pretty(&i).expect("info serializes")
            ),
            None => println!(
                "{}",
                serde_json::json!({
                    "target": engine.target().path,
                    "kind": engine.target().kind,
                    "geometry": engine.target().geometry,
                    "backend": engine.selection(),
                })
            ),
        }
    } else {
        print!("{}", rio::info::describe(&engine)?);
    }
    Ok(())
}

/// Removes the temporary benchmark directory on drop (also after Ctrl-C or an error).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> Result<TempDir, Fail> {
    let base = std::env::var_os("RIO_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = base.join(format!("rio-bench-{}-{nanos:08x}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        usage(format!(
            "cannot create a temporary directory in {} (set RIO_BENCH_DIR): {e}",
            base.display()
        ))
    })?;
    Ok(TempDir(dir))
}

fn u32_arg(name: &str, v: u64) -> Result<u32, Fail> {
    u32::try_from(v).map_err(|_| usage(format!("invalid {name}: {v} is too large")))
}

fn bench(cfg: EngineConfig, a: BenchArgs, telemetry: Option<&Telemetry>) -> Result<(), Fail> {
    let spec = BenchSpec {
        rw: a.rw,
        rwmixread: a.rwmixread,
        bs: u32_arg("--bs", a.bs)?,
        iodepth: match a.iodepth {
            Depth::Fixed(n) => n,
            Depth::Auto => a.iodepth_max,
        },
        numjobs: a.numjobs,
        size: a.size.unwrap_or(0),
        offset: a.offset,
        runtime: a.runtime,
        time_based: a.time_based,
        ramp_time: a.ramp_time.unwrap_or_default(),
        verify: a.verify,
        seed: a.seed,
        auto: match a.iodepth {
            Depth::Fixed(_) => None,
            Depth::Auto => {
                let Some(us) = cfg.target_latency_us else {
                    return Err(usage(
                        "--iodepth auto needs a p99 target: --lat-target, or RUSTFS_TARGET_LATENCY_US"
                            .to_string(),
                    ));
                };
                Some(rio_cli::bench::autotune::AutoDepth {
                    target_p99: Duration::from_micros(us),
                    scope: a.tune_scope,
                })
            }
        },
    };
    spec.validate()?;
    let json = a.output_format == "json";

    // Decide the target, whether it is created and laid out, and whether the run writes.
    let mut _tmp = None;
    let (path, create) = match &a.filename {
        None => {
            let t = temp_dir()?;
            let p = t.0.join("rio-bench.dat");
            _tmp = Some(t);
            (p, true)
        }
        Some(f) if !matches!(TargetSpec::parse(f), TargetSpec::Path(_)) => {
            if a.create {
                return Err(usage(format!(
                    "{f}: --create applies to files; pcie:// and sim:// targets exist already"
                )));
            }
            (PathBuf::from(f), false)
        }
        Some(f) => {
            let p = PathBuf::from(f);
            let exists = std::fs::symlink_metadata(&p).is_ok();
            if !exists && !a.create {
                return Err(usage(format!(
                    "{f}: no such file or device (pass --create --size N to create a file, or omit --filename for a temporary one)"
                )));
            }
            if !exists && a.size.is_none() {
                return Err(usage("--create needs --size"));
            }
            (p, !exists)
        }
    };
    if a.verify_only {
        return verify_only(&cfg, &a, &spec, &path, create);
    }
    let layout = create || (spec.verify && spec.rw.reads());
    let writes = spec.rw.writes() || layout;
    let raw_pcie = matches!(
        TargetSpec::parse(&path.to_string_lossy()),
        TargetSpec::Pcie { .. }
    );
    if writes && (is_block_device(&path) || raw_pcie) && !a.force {
        return Err(usage(format!(
            "{}: this run writes the raw device and destroys its contents; pass --force to allow it",
            path.display()
        )));
    }
    let setup_span = tracing::info_span!("bench.setup", target = %path.display());
    let mut engine = setup_span.in_scope(|| {
        Engine::open(
            &cfg,
            &path.to_string_lossy(),
            OpenOptions {
                write: writes,
                direct: a.direct,
                create,
            },
        )
    })?;
    if create {
        let len = spec.offset + a.size.unwrap_or(1 << 30);
        // Check the workload against the size the file will have before creating data.
        let mut geo = engine.target().geometry;
        geo.size = len;
        spec.resolve(&geo)?;
        engine.target_mut().ensure_len(len)?;
        // Ours: a later write run on it needs no --force.
        if let Err(e) = rio_cli::bench::guard::mark(&path) {
            tracing::warn!(
                file = %path.display(),
                error = %e,
                "cannot mark the file as rio's (no user extended attributes here?): a later write run on it will need --force"
            );
        }
    }
    spec.resolve(&engine.target().geometry)?;
    // An existing file rio did not lay out, or whose permission bits deny writing: refused
    // before anything is written (rio_cli::bench::guard).
    if writes
        && !create
        && !a.force
        && let Some(why) = rio_cli::bench::guard::write_refusal(&path)
    {
        return Err(usage(why));
    }

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second Ctrl-C exits at once; the first ends the run and prints what ran.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let mut display = Display::new(&cfg, std::io::stderr().is_terminal());
    let sink = telemetry.map(|t| {
        t.sink(
            engine.selection().backend.name(),
            &engine.target().path.display().to_string(),
        )
    });
    let sink: &dyn WindowSink = match &sink {
        Some(s) => s,
        None => &NoSink,
    };
    let result = rio_cli::bench::run_with(
        &engine,
        &spec,
        RunOptions { layout },
        &stop,
        sink,
        &mut |p| display.tick(p),
    );
    display.finish();
    let result = result?;
    if json {
        println!("{}", result.to_json());
    } else {
        print!("{}", result.to_human());
    }
    if let Some(p) = &a.report {
        rio_cli::bench::plot::write_report(&result, p).map_err(|e| Fail {
            code: 1,
            msg: e.to_string(),
        })?;
    }
    Ok(())
}

/// `rio bench --verify-only`: check every block of the region, write nothing.
fn verify_only(
    cfg: &EngineConfig,
    a: &BenchArgs,
    spec: &BenchSpec,
    path: &Path,
    create: bool,
) -> Result<(), Fail> {
    if create || a.create {
        return Err(usage(
            "--verify-only checks an existing target; it creates nothing",
        ));
    }
    if a.rw.writes() || a.verify {
        return Err(usage(
            "--verify-only writes nothing: it takes no write workload (--rw) and no --verify",
        ));
    }
    let engine = Engine::open(
        cfg,
        &path.to_string_lossy(),
        OpenOptions {
            write: false,
            direct: a.direct,
            create: false,
        },
    )?;
    let spec = BenchSpec {
        numjobs: 1,
        ..spec.clone()
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let prog = rio_cli::bench::Progress::default();
    let r = rio_cli::bench::check::check_region(&engine, &spec, &stop, &prog)?;
    if a.output_format == "json" {
        let v = serde_json::json!({ "verify_only": r });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        print!("{}", r.to_human());
    }
    if r.bad > 0 {
        let first = &r.bad_blocks[0];
        return Err(Fail {
            code: 1,
            msg: format!(
                "verify-only: {} of {} blocks bad (first at offset {}: {})",
                r.bad, r.blocks, first.offset, first.reason
            ),
        });
    }
    Ok(())
}

fn is_block_device(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Progress bar on a terminal, and the once-a-second log of realtime monitoring.
struct Display {
    bar: Option<indicatif::ProgressBar>,
    monitor: bool,
    last: Instant,
    last_ios: u64,
    last_bytes: u64,
    started: Instant,
}

impl Display {
    fn new(cfg: &EngineConfig, tty: bool) -> Display {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr_with_hz(4),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .expect("valid template"),
            );
            b
        });
        Display {
            bar,
            monitor: cfg.realtime_monitoring,
            last: Instant::now(),
            last_ios: 0,
            last_bytes: 0,
            started: Instant::now(),
        }
    }

    fn tick(&mut self, p: &Progress) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        if dt < 1.0 && self.bar.is_none() {
            return;
        }
        if dt < 0.25 {
            return;
        }
        let ios = p.ios.load(Ordering::Relaxed);
        let bytes = p.bytes.load(Ordering::Relaxed);
        let iops = ios.saturating_sub(self.last_ios) as f64 / dt;
        let bw = bytes.saturating_sub(self.last_bytes) as f64 / dt;
        let total = p.total.load(Ordering::Relaxed);
        let phase = match p.phase() {
            Phase::Layout => "laying out",
            Phase::Ramp => "ramping",
            Phase::Measure => "running",
            Phase::Verify => "verifying",
            Phase::Done => "finishing",
        };
        let pct = if total > 0 {
            format!(" {:.0}%", 100.0 * bytes.min(total) as f64 / total as f64)
        } else {
            String::new()
        };
        let msg = format!(
            "{phase}{pct}: {} IOPS, {}/s",
            rio_cli::bench::report::human_count(iops),
            rio_cli::bench::report::human_bytes(bw as u64)
        );
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
            b.tick();
        }
        if self.monitor && dt >= 1.0 {
            tracing::info!(
                phase,
                iops = iops as u64,
                bytes_per_sec = bw as u64,
                elapsed_s = self.started.elapsed().as_secs(),
                "progress"
            );
        }
        if dt >= 1.0 || self.bar.is_some() {
            self.last = now;
            self.last_ios = ios;
            self.last_bytes = bytes;
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
