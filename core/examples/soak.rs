//! Soak: a mixed workload with faults injected, for a long time, watched for leaks.
//!
//! ```text
//! cargo run --release --example soak -- --minutes 30 [--sample-secs 10] [--dir /var/tmp]
//! ```
//! (`scripts/soak` runs it and judges the last line.) Three workloads run side by side:
//! - **model**: a `Queue` on the userspace driver over the software model, random reads,
//!   writes and flushes; every other round the device misbehaves (`SimController::misbehave`:
//!   error statuses, lost completions the driver must time out and abort), and every 40th
//!   round the power is cut (`SimController::power_cut`), which the driver answers with a
//!   controller reset. Every command must complete exactly once, each fault as a typed error.
//! - **uring**: a `Queue` on a file through io_uring, random reads and writes whose data is
//!   checked, with reads past the end of the file now and then (a fault of the kernel path: a
//!   typed short-read error).
//! - **runtime**: `DiskFile`s over io_uring from tokio tasks, with pool buffers, some futures
//!   dropped in flight (their buffers must come back).
//!
//! Every `--sample-secs` it prints the RSS, open descriptors and pool buffers in use; at the
//! end, after the runtime shut down, the last line:
//! `SOAK minutes=M ios=N faults=F rss_growth_kib=K leaks=L lost=X dup=Y typed_errors=E untyped=U fd_growth=D`
//! (RSS growth from the first sample, after warm-up, to the last). Exit 1 if anything leaked,
//! was lost or duplicated, or a fault came back untyped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rio::nvme::sim::{PowerCut, SimConfig, SimNamespace};
use rio::pool::{PagePolicy, PoolConfig};
use rio::rng::Rng;
use rio::runtime::{DiskFile, RuntimeConfig};
use rio::target::OpenOptions;
use rio::{BackendKind, Engine, EngineConfig, Error, IoErrorKind, Queue};

#[derive(Default)]
struct Totals {
    ios: AtomicU64,
    faults: AtomicU64,
    typed_errors: AtomicU64,
    untyped: AtomicU64,
    lost: AtomicU64,
    dup: AtomicU64,
    data_errors: AtomicU64,
}

struct Args {
    minutes: f64,
    sample: Duration,
    dir: std::path::PathBuf,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        minutes: 30.0,
        sample: Duration::from_secs(10),
        dir: std::env::var_os("RIO_TEST_DIR")
            .map(Into::into)
            .unwrap_or_else(|| "/var/tmp".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = |n: &str| it.next().ok_or(format!("{n} needs a value"));
        match k.as_str() {
            "--minutes" => {
                a.minutes = v("--minutes")?
                    .parse()
                    .map_err(|e| format!("--minutes: {e}"))?
            }
            "--sample-secs" => {
                a.sample = Duration::from_secs_f64(
                    v("--sample-secs")?
                        .parse()
                        .map_err(|e| format!("--sample-secs: {e}"))?,
                )
            }
            "--dir" => a.dir = v("--dir")?.into(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.minutes.is_nan() || a.minutes <= 0.0 {
        return Err("--minutes must be positive".into());
    }
    Ok(a)
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        hugepages: false,
        buffer_pool_bytes: 16 << 20,
        queue_depth: 32,
        nvme_timeout_ms: 50,
        nvme_admin_timeout_ms: 500,
        ..EngineConfig::default()
    }
}

/// The model workload: rounds of 32 commands, faults on every other round.
fn model(stop: &AtomicBool, t: &Totals) -> Result<(), String> {
    const BS: u64 = 4096;
    const BLOCKS: u64 = 16384;
    let sim = SimConfig {
        namespaces: vec![SimNamespace {
            block_size: BS as u32,
            size_bytes: BS * BLOCKS,
        }],
        max_io_queues: 4,
        ..SimConfig::default()
    };
    let rw = OpenOptions {
        write: true,
        direct: true,
        create: false,
    };
    let e = Engine::open_sim(&engine_config(), sim, 1, rw).map_err(|e| e.to_string())?;
    let mut q = e.queue(None).map_err(|e| e.to_string())?;
    let model = e.controller().and_then(|c| c.sim()).ok_or("no model")?;
    // Touch the whole namespace first: its RAM is then resident from the start, and memory
    // growth during the soak is rio's, not the model's namespace filling up.
    for blk in (0..BLOCKS).step_by(32) {
        let b = q.alloc_buf((32 * BS) as usize).map_err(|e| e.to_string())?;
        q.write(blk * BS, b).map_err(|e| e.to_string())?;
    }
    let mut rng = Rng::new(42);
    let mut round = 0u64;
    while !stop.load(Relaxed) {
        round += 1;
        if round.is_multiple_of(40) {
            model
                .power_cut(PowerCut::LoseAll)
                .map_err(|e| e.to_string())?;
            t.faults.fetch_add(1, Relaxed);
        }
        // Faults: an error status (generic Data Transfer Error, DNR) on some commands and a
        // lost completion on others; the rest complete normally.
        let mut script = Vec::new();
        let mut injected = 0;
        if round.is_multiple_of(2) {
            for _ in 0..32 {
                match rng.next_u64() % 8 {
                    0 => {
                        script.extend([2u8, 0x08, 0x80]);
                        injected += 1;
                    }
                    1 => {
                        script.push(4);
                        injected += 1;
                    }
                    _ => script.push(0),
                }
            }
        }
        model.misbehave(&script);
        let mut pending: HashMap<u64, u32> = HashMap::new();
        for token in 0..32u64 {
            let off = rng.next_u64() % BLOCKS * BS;
            let r = match rng.next_u64() % 5 {
                0 => q.submit_flush(token),
                1 | 2 => {
                    let mut b = q.alloc_buf(BS as usize).map_err(|e| e.to_string())?;
                    b.fill(token as u8);
                    q.submit_write(off, b, token).map_err(|r| r.error)
                }
                _ => {
                    let b = q.alloc_buf(BS as usize).map_err(|e| e.to_string())?;
                    q.submit_read(off, b, token).map_err(|r| r.error)
                }
            };
            match r {
                Ok(()) => {
                    pending.insert(token, 0);
                }
                Err(e) => account_error(&e, t),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        while pending.values().any(|n| *n == 0) && Instant::now() < deadline {
            match q.wait(1, Duration::from_millis(200), &mut out) {
                Ok(_) | Err(Error::BadNvmeCompletion { .. }) => {}
                Err(e) => account_error(&e, t),
            }
            for c in out.drain(..) {
                t.ios.fetch_add(1, Relaxed);
                match pending.get_mut(&c.token) {
                    Some(n) => {
                        *n += 1;
                        if *n > 1 {
                            t.dup.fetch_add(1, Relaxed);
                        }
                    }
                    None => {
                        t.dup.fetch_add(1, Relaxed);
                    }
                }
                if let Err(e) = &c.result {
                    account_io_error(e.kind.clone(), t);
                }
            }
        }
        model.misbehave(&[]);
        t.faults.fetch_add(injected, Relaxed);
        t.lost.fetch_add(
            pending.values().filter(|n| **n == 0).count() as u64,
            Relaxed,
        );
    }
    Ok(())
}

fn account_error(e: &Error, t: &Totals) {
    match e {
        Error::Io(io) => account_io_error(io.kind.clone(), t),
        _ => {
            let _ = e.to_string();
            t.typed_errors.fetch_add(1, Relaxed);
        }
    }
}

fn account_io_error(k: IoErrorKind, t: &Totals) {
    // Every kind is typed; Os errors must carry an errno.
    if let IoErrorKind::Os(0) = k {
        t.untyped.fetch_add(1, Relaxed);
    }
    t.typed_errors.fetch_add(1, Relaxed);
}

/// The io_uring workload: data checked on every read; reads past the end now and then.
fn uring(dir: &std::path::Path, stop: &AtomicBool, t: &Totals) -> Result<(), String> {
    const BS: u64 = 4096;
    const BLOCKS: u64 = 4096;
    let path = dir.join(format!("rio-soak-{}.dat", std::process::id()));
    let _cleanup = Remove(path.clone());
    let cfg = EngineConfig {
        backend: rio::config::BackendChoice::Uring,
        ..engine_config()
    };
    let mut e = Engine::open(
        &cfg,
        path.to_str().ok_or("path")?,
        OpenOptions {
            write: true,
            direct: true,
            create: true,
        },
    )
    .map_err(|e| e.to_string())?;
    e.target_mut()
        .ensure_len(BS * BLOCKS)
        .map_err(|e| e.to_string())?;
    if e.selection().backend != BackendKind::Uring {
        return Err(format!("expected io_uring, got {:?}", e.selection()));
    }
    let mut q: Queue = e.queue(None).map_err(|e| e.to_string())?;
    let mut shadow = vec![0u8; BLOCKS as usize];
    let mut rng = Rng::new(7);
    while !stop.load(Relaxed) {
        let mut out = Vec::new();
        let mut tokens = HashMap::new();
        for token in 0..32u64 {
            let blk = rng.next_u64() % BLOCKS;
            // No two commands of a round on one block: the data check knows what is there.
            if tokens.values().any(|(b, _)| *b == blk) {
                continue;
            }
            let op = rng.next_u64() % 16;
            let r = if op == 0 {
                // Past the end: the kernel returns a short read.
                let b = q.alloc_buf(BS as usize).map_err(|e| e.to_string())?;
                t.faults.fetch_add(1, Relaxed);
                q.submit_read(BS * (BLOCKS + 4), b, token)
            } else if op < 6 {
                let v = (rng.next_u64() as u8).max(1);
                let mut b = q.alloc_buf(BS as usize).map_err(|e| e.to_string())?;
                b.fill(v);
                shadow[blk as usize] = v;
                q.submit_write(blk * BS, b, token)
            } else {
                let b = q.alloc_buf(BS as usize).map_err(|e| e.to_string())?;
                q.submit_read(blk * BS, b, token)
            };
            match r {
                Ok(()) => {
                    tokens.insert(token, (blk, op));
                }
                Err(r) => account_error(&r.error, t),
            }
        }
        let mut seen: HashMap<u64, u32> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.len() < tokens.len() && Instant::now() < deadline {
            if let Err(e) = q.wait(1, Duration::from_millis(200), &mut out) {
                account_error(&e, t);
            }
            for c in out.drain(..) {
                t.ios.fetch_add(1, Relaxed);
                let n = seen.entry(c.token).or_insert(0);
                *n += 1;
                if *n > 1 || !tokens.contains_key(&c.token) {
                    t.dup.fetch_add(1, Relaxed);
                }
                match (&c.result, tokens.get(&c.token)) {
                    (Err(e), _) => account_io_error(e.kind.clone(), t),
                    (Ok(_), Some((blk, op))) if *op >= 6 => {
                        let want = shadow[*blk as usize];
                        let b = c.buf.as_ref().ok_or("a read returns its buffer")?;
                        if b.as_slice().iter().any(|&x| x != want) {
                            t.data_errors.fetch_add(1, Relaxed);
                        }
                    }
                    (Ok(_), Some((_, 0))) => {
                        // A read past the end that succeeded: not what the kernel does.
                        t.untyped.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
            }
        }
        t.lost.fetch_add(
            tokens.keys().filter(|k| !seen.contains_key(k)).count() as u64,
            Relaxed,
        );
    }
    Ok(())
}

struct Remove(std::path::PathBuf);
impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The runtime workload: tokio tasks on `DiskFile`s, some futures dropped in flight.
async fn runtime(f: DiskFile, stop: Arc<AtomicBool>, t: Arc<Totals>) {
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let (f, stop, t) = (f.clone(), Arc::clone(&stop), Arc::clone(&t));
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + task);
            let blocks = f.len() / 65536;
            while !stop.load(Relaxed) {
                let off = rng.next_u64() % blocks * 65536;
                let Ok(b) = f.buffer(65536) else {
                    t.typed_errors.fetch_add(1, Relaxed);
                    continue;
                };
                let fut: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    if rng.next_u64().is_multiple_of(3) {
                        Box::pin(f.write_at(off, b))
                    } else {
                        Box::pin(f.read_at(off, b))
                    };
                if rng.next_u64().is_multiple_of(16) {
                    // Abandoned in flight: the buffer must still come back to the pool.
                    let _ = tokio::time::timeout(Duration::from_micros(1), fut).await;
                    t.faults.fetch_add(1, Relaxed);
                    continue;
                }
                match fut.await {
                    Ok(_) => {
                        t.ios.fetch_add(1, Relaxed);
                    }
                    Err(f) => account_error(&f.error, &t),
                }
            }
        }));
    }
    for h in tasks {
        let _ = h.await;
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let t = Arc::new(Totals::default());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.minutes * 60.0);

    let file = a
        .dir
        .join(format!("rio-soak-rt-{}.dat", std::process::id()));
    let scratch = Remove(file.clone());
    let rt_cfg = RuntimeConfig {
        pool: PoolConfig {
            pages: PagePolicy::Normal,
            max_bytes_per_core: 32 << 20,
            ..PoolConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let cfg = EngineConfig {
        backend: rio::config::BackendChoice::Uring,
        ..engine_config()
    };
    let f = match DiskFile::open(
        file.to_str().expect("UTF-8 path"),
        Some(64 << 20),
        &cfg,
        rt_cfg,
    ) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("soak: runtime: {e}");
            drop(scratch); // `exit` runs no destructors
            std::process::exit(1);
        }
    };
    let pools = Arc::clone(f.runtime().pools());

    let mut failures = Vec::new();
    let bad = std::thread::scope(|s| {
        let m = s.spawn(|| model(&stop, &t));
        let u = s.spawn(|| uring(&a.dir, &stop, &t));
        let rt = {
            let (f, stop, t) = (f.clone(), Arc::clone(&stop), Arc::clone(&t));
            s.spawn(move || {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_time()
                    .build()
                    .expect("tokio runtime")
                    .block_on(runtime(f, stop, t))
            })
        };
        let mut first: Option<(u64, u64)> = None;
        let mut last = (0, 0);
        while Instant::now() < end {
            std::thread::sleep(a.sample.min(end.saturating_duration_since(Instant::now())));
            let (rss, fd) = (rss_kib(), fds());
            if first.is_none() && start.elapsed() >= a.sample {
                first = Some((rss, fd));
            }
            last = (rss, fd);
            println!(
                "soak: t={:.0}s rss_kib={rss} fds={fd} pool_in_use={} ios={} faults={} typed_errors={} lost={} dup={}",
                start.elapsed().as_secs_f64(),
                pools.in_use(),
                t.ios.load(Relaxed),
                t.faults.load(Relaxed),
                t.typed_errors.load(Relaxed),
                t.lost.load(Relaxed),
                t.dup.load(Relaxed),
            );
        }
        stop.store(true, Relaxed);
        for (name, r) in [("model", m.join()), ("uring", u.join())] {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("{name}: {e}")),
                Err(_) => failures.push(format!("{name}: panicked")),
            }
        }
        if rt.join().is_err() {
            failures.push("runtime: panicked".into());
        }
        let first = first.unwrap_or(last);
        let rt = Arc::clone(f.runtime());
        drop(f);
        rt.shutdown();
        let leaks = pools.in_use() as u64 + last.1.saturating_sub(first.1);
        let rss_growth = last.0 as i64 - first.0 as i64;
        let untyped = t.untyped.load(Relaxed) + t.data_errors.load(Relaxed);
        for f in &failures {
            eprintln!("soak: {f}");
        }
        println!(
            "SOAK minutes={:.1} ios={} faults={} rss_growth_kib={rss_growth} leaks={leaks} lost={} dup={} typed_errors={} untyped={untyped} fd_growth={}",
            start.elapsed().as_secs_f64() / 60.0,
            t.ios.load(Relaxed),
            t.faults.load(Relaxed),
            t.lost.load(Relaxed),
            t.dup.load(Relaxed),
            t.typed_errors.load(Relaxed),
            last.1 as i64 - first.1 as i64,
        );
        !failures.is_empty()
            || leaks > 0
            || untyped > 0
            || t.lost.load(Relaxed) > 0
            || t.dup.load(Relaxed) > 0
    });
    // The scratch file goes before `exit`, which runs no destructors (each run used to leave
    // its 64 MiB file behind).
    drop(scratch);
    std::process::exit(if bad { 1 } else { 0 });
}
