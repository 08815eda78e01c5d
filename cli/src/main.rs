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

use clap::Parser;
use rio::config::{BackendChoice, EngineConfig, LogFormat};
use rio::target::{OpenOptions, TargetSpec};
use rio::{Engine, Error};
use rio_cli::bench::run::{Phase, Progress, RunOptions};
use rio_cli::bench::series::{NoSink, WindowSink};
use rio_cli::bench::{BenchError, BenchSpec};
use rio_otel::{Telemetry, TelemetryConfig};

use rio_cli::args::{BenchArgs, Cli, Cmd, InfoArgs, TuneArgs};

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
        || matches!(
            TargetSpec::parse(&a.filename),
            TargetSpec::Pcie { .. } | TargetSpec::Trid { .. }
        );
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
    let spec = a.spec(cfg.target_latency_us).map_err(usage)?;
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
        TargetSpec::Pcie { .. } | TargetSpec::Trid { .. }
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
    if let (Some(t), Some(c)) = (telemetry, engine.controller()) {
        // The userspace driver's controller: its health events become metrics and alerts.
        t.watch_nvme(Arc::clone(c));
    }
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
