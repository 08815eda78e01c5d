//! Read-ahead measured: QD1 reads through `DiskFile` with prefetch on and off, sequential and
//! random, on a real file (io_uring, O_DIRECT).
//!
//! ```text
//! cargo run --release --example prefetch -- --file /var/tmp/rio-prefetch.dat [--size 1g]
//!     [--bs 4k] [--seconds 2] [--rounds 3]
//! ```
//! Each (pattern, prefetch) pair runs `--rounds` times for `--seconds`, alternating on and off
//! so drift hits both alike; the on/off ratio is taken within each round and its median
//! reported (IOPS columns: medians). Sequential reads check every
//! block's content against what was written. Last line:
//! `PREFETCH seq_on=<iops> seq_off=<iops> seq_gain=<on/off> rand_on=<iops> rand_off=<iops> rand_loss=<1 - on/off>`.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rio::EngineConfig;
use rio::config::{BackendChoice, parse_size};
use rio::pool::{PagePolicy, PoolConfig};
use rio::runtime::{DiskFile, IdlePolicy, RuntimeConfig};
use rio::tune::PrefetchConfig;

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn block_on<F: Future>(f: F, w: &Waker) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(w);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(1));
    }
}

struct Args {
    file: String,
    size: u64,
    bs: u64,
    seconds: f64,
    rounds: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        file: "/var/tmp/rio-prefetch.dat".to_string(),
        size: 1 << 30,
        bs: 4096,
        seconds: 2.0,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--file" => a.file = v,
            "--size" => a.size = parse_size(&v)?,
            "--bs" => a.bs = parse_size(&v)?,
            "--seconds" => a.seconds = v.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--rounds" => a.rounds = v.parse().map_err(|e| format!("--rounds: {e}"))?,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.bs == 0 || !a.bs.is_multiple_of(4096) || a.size < 64 * a.bs {
        return Err("--bs must be a multiple of 4k and --size at least 64 blocks".into());
    }
    Ok(a)
}

fn open(a: &Args, prefetch: bool) -> Result<DiskFile, String> {
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        hugepages: false,
        ..EngineConfig::default()
    };
    let rt = RuntimeConfig {
        cores: Some(vec![0]),
        depth: 128,
        idle: IdlePolicy::default(),
        pool: PoolConfig {
            pages: PagePolicy::Normal,
            initial_per_class: 128,
            ..PoolConfig::default()
        },
        prefetch: PrefetchConfig {
            enabled: prefetch,
            ..PrefetchConfig::default()
        },
        ..RuntimeConfig::default()
    };
    DiskFile::open(&a.file, Some(a.size), &cfg, rt).map_err(|e| e.to_string())
}

/// Fill the file with a pattern that names each block, so reads can be checked.
fn layout(f: &DiskFile, a: &Args, w: &Waker) -> Result<(), String> {
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < a.size {
        let n = chunk.min(a.size - off);
        let mut b = f.buffer(n as usize).map_err(|e| e.to_string())?;
        for (i, blk) in b.as_mut_slice().chunks_mut(8).enumerate() {
            blk.copy_from_slice(&(off + i as u64 * 8).to_le_bytes()[..blk.len()]);
        }
        block_on(f.write_at(off, b), w).map_err(|f| f.to_string())?;
        off += n;
    }
    block_on(f.sync_data(), w).map_err(|e| e.to_string())
}

/// QD1 reads for `secs`: sequential from a random start, or uniform random. Returns IOPS.
fn run(f: &DiskFile, a: &Args, seq: bool, seed: u64, w: &Waker) -> Result<f64, String> {
    let blocks = a.size / a.bs;
    let mut x = seed | 1;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % blocks
    };
    let mut blk = rnd();
    let mut buf = Some(f.buffer(a.bs as usize).map_err(|e| e.to_string())?);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < a.seconds {
        let off = blk * a.bs;
        let (_, b) = block_on(f.read_at(off, buf.take().unwrap()), w)
            .map_err(|f| format!("read at {off}: {f}"))?;
        let b = b.ok_or("read returned no buffer")?;
        let got = u64::from_le_bytes(b.as_slice()[..8].try_into().unwrap());
        if got != off {
            return Err(format!("block at {off} holds the data of {got}"));
        }
        buf = Some(b);
        n += 1;
        blk = if seq { (blk + 1) % blocks } else { rnd() };
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("prefetch: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let a = args()?;
    let w = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let on = open(&a, true)?;
    let off = open(&a, false)?;
    layout(&off, &a, &w)?;
    let mut r: [Vec<f64>; 4] = Default::default();
    for round in 0..a.rounds {
        let seed = 0x9E37_79B9_7F4A_7C15 ^ round as u64;
        for (i, (seq, f)) in [(true, &on), (true, &off), (false, &on), (false, &off)]
            .into_iter()
            .enumerate()
        {
            let iops = run(f, &a, seq, seed, &w)?;
            println!(
                "round {round}: {} prefetch={} {:.0} IOPS",
                if seq { "sequential" } else { "random" },
                if i % 2 == 0 { "on " } else { "off" },
                iops
            );
            r[i].push(iops);
        }
    }
    if let Some((p, s)) = on.prefetch_stats() {
        println!("read-ahead after the last run: {p:?} {s:?}");
    }
    // Ratios are taken within each round (on and off ran back to back) and their median
    // reported: this disk's IOPS drift by ±15% between rounds, which a ratio of medians taken
    // from different rounds would report as a gain or a loss.
    let ratio = |on: &[f64], off: &[f64]| median(on.iter().zip(off).map(|(a, b)| a / b).collect());
    let (seq_gain, rand_ratio) = (ratio(&r[0], &r[1]), ratio(&r[2], &r[3]));
    let [son, soff, ron, roff] = r.map(median);
    println!(
        "PREFETCH seq_on={son:.0} seq_off={soff:.0} seq_gain={seq_gain:.3} rand_on={ron:.0} rand_off={roff:.0} rand_loss={:.3}",
        1.0 - rand_ratio
    );
    on.runtime().shutdown();
    off.runtime().shutdown();
    Ok(())
}
