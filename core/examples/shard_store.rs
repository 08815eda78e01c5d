//! Erasure-coded shards stored and read the way RustFS lays them out, from many tokio tasks,
//! through rio's `DiskFile`.
//!
//! Each object is split into `DATA` data shards plus one XOR parity shard. A shard is a series
//! of 1 MiB blocks; each block is preceded by a 32-byte checksum header (RustFS's bitrot
//! layout). For direct I/O the header sits in its own 4 KiB sector just before the block, so a
//! shard block occupies 1 MiB + 4 KiB on the device.
//!
//! ```text
//! cargo run --release --example shard_store                       # on the software model
//! cargo run --release --example shard_store -- --target /path/f   # on a file (created)
//! cargo run --release --example shard_store -- --objects 64 --blocks 4
//! ```
//! Writes every object concurrently (one tokio task per shard block), reads them back and
//! verifies headers and data, then damages one shard block of an object and shows that the
//! read detects it (checksum) and rebuilds it from parity. Exit status 0 when all checks pass.

use std::sync::Arc;
use std::time::Instant;

use rio::EngineConfig;
use rio::pool::{PagePolicy, PoolConfig};
use rio::runtime::{DiskFile, RuntimeConfig};

const DATA: usize = 4;
const SHARDS: usize = DATA + 1;
const BLOCK: usize = 1 << 20;
const HEADER: usize = 4096;
const SLOT: u64 = (BLOCK + HEADER) as u64;
const MAGIC: u32 = 0x5253_4842; // "RSHB"
/// Shard blocks in flight at once (each holds a header and a data buffer from the pools): a
/// store bounds its concurrency rather than let every task wait on the pool.
const IN_FLIGHT: usize = 16;

struct Args {
    target: String,
    objects: usize,
    blocks: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        target: String::new(),
        objects: 16,
        blocks: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match k.as_str() {
            "--target" => a.target = val("--target")?,
            "--objects" => {
                a.objects = val("--objects")?
                    .parse()
                    .map_err(|e| format!("--objects: {e}"))?
            }
            "--blocks" => {
                a.blocks = val("--blocks")?
                    .parse()
                    .map_err(|e| format!("--blocks: {e}"))?
            }
            "-h" | "--help" => {
                return Err(
                    "usage: shard_store [--target FILE|sim://...] [--objects N] [--blocks N]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.objects == 0 || a.blocks == 0 {
        return Err("--objects and --blocks must be at least 1".into());
    }
    Ok(a)
}

/// Where shard block `b` of shard `s` of object `o` lives.
fn slot(a: &Args, o: usize, s: usize, b: usize) -> u64 {
    (((o * SHARDS + s) * a.blocks) + b) as u64 * SLOT
}

/// Deterministic object content: byte `i` of data shard `s`, block `b`, object `o`.
fn fill_data(buf: &mut [u8], o: usize, s: usize, b: usize) {
    let seed = (o as u64) << 32 | (s as u64) << 16 | b as u64;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// The 32-byte block header: magic, object, shard, block, data length, CRC32C of the data.
fn header(o: usize, s: usize, b: usize, data: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&(o as u64).to_le_bytes());
    h[12..14].copy_from_slice(&(s as u16).to_le_bytes());
    h[14..18].copy_from_slice(&(b as u32).to_le_bytes());
    h[18..22].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[22..26].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
    h
}

/// The expected content of shard `s` (parity for `s == DATA`), block `b`, object `o`.
fn expected(o: usize, s: usize, b: usize) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    if s < DATA {
        fill_data(&mut out, o, s, b);
    } else {
        let mut d = vec![0u8; BLOCK];
        for ds in 0..DATA {
            fill_data(&mut d, o, ds, b);
            for (x, y) in out.iter_mut().zip(&d) {
                *x ^= y;
            }
        }
    }
    out
}

async fn write_block(f: &DiskFile, at: u64, o: usize, s: usize, b: usize) -> Result<(), String> {
    let data = expected(o, s, b);
    let mut hb = f.buffer(HEADER).map_err(|e| e.to_string())?;
    hb.as_mut_slice().fill(0);
    hb.as_mut_slice()[..32].copy_from_slice(&header(o, s, b, &data));
    let mut db = f.buffer(BLOCK).map_err(|e| e.to_string())?;
    db.as_mut_slice().copy_from_slice(&data);
    // Header and block in flight together.
    let (h, d) = tokio::join!(f.write_at(at, hb), f.write_at(at + HEADER as u64, db));
    h.map_err(|(e, _)| e.to_string())?;
    d.map_err(|(e, _)| e.to_string())?;
    Ok(())
}

/// Read a shard block and check it against its header. `Ok(None)`: the block is damaged.
async fn read_block(
    f: &DiskFile,
    at: u64,
    o: usize,
    s: usize,
    b: usize,
) -> Result<Option<Vec<u8>>, String> {
    let hb = f.buffer(HEADER).map_err(|e| e.to_string())?;
    let db = f.buffer(BLOCK).map_err(|e| e.to_string())?;
    let (h, d) = tokio::join!(f.read_at(at, hb), f.read_at(at + HEADER as u64, db));
    let (_, hb) = h.map_err(|(e, _)| e.to_string())?;
    let (_, db) = d.map_err(|(e, _)| e.to_string())?;
    let (hb, db) = (
        hb.expect("read returns its buffer"),
        db.expect("read returns its buffer"),
    );
    let data = db.as_slice();
    let ok = hb.as_slice()[..32] == header(o, s, b, data);
    Ok(ok.then(|| data.to_vec()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("shard_store: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let a = Arc::new(args()?);
    let need = slot(&a, a.objects, 0, 0);
    let target = if a.target.is_empty() {
        format!("sim://size={}m", need.div_ceil(1 << 20) + 1)
    } else {
        a.target.clone()
    };
    let cfg = EngineConfig {
        hugepages: true,
        ..EngineConfig::default()
    };
    let rt = RuntimeConfig {
        depth: 64,
        pool: PoolConfig {
            pages: PagePolicy::Huge2M,
            initial_per_class: 32,
            ..PoolConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let f = DiskFile::open(&target, Some(need), &cfg, rt).map_err(|e| e.to_string())?;
    println!(
        "shard_store: {} objects x {} shards ({DATA}+1 parity) x {} blocks of 1 MiB on {target} ({} pollers on cores {:?})",
        a.objects,
        SHARDS,
        a.blocks,
        f.runtime().cores().len(),
        f.runtime().cores()
    );

    // Write: one task per shard block, all in flight together.
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for o in 0..a.objects {
        for s in 0..SHARDS {
            for b in 0..a.blocks {
                let (f, a, limit) = (f.clone(), Arc::clone(&a), Arc::clone(&limit));
                tasks.spawn(async move {
                    let _p = limit.acquire().await.map_err(|e| e.to_string())?;
                    write_block(&f, slot(&a, o, s, b), o, s, b).await
                });
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    f.sync_data().await.map_err(|e| e.to_string())?;
    let bytes = (a.objects * SHARDS * a.blocks * (BLOCK + HEADER)) as f64;
    println!(
        "  wrote {:.0} MiB in {:.2?} ({:.0} MiB/s)",
        bytes / 1048576.0,
        t.elapsed(),
        bytes / 1048576.0 / t.elapsed().as_secs_f64()
    );

    // Read back and verify every shard block.
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for o in 0..a.objects {
        for s in 0..SHARDS {
            for b in 0..a.blocks {
                let (f, a, limit) = (f.clone(), Arc::clone(&a), Arc::clone(&limit));
                tasks.spawn(async move {
                    let _p = limit.acquire().await.map_err(|e| e.to_string())?;
                    match read_block(&f, slot(&a, o, s, b), o, s, b).await? {
                        Some(d) if d == expected(o, s, b) => Ok(()),
                        _ => Err(format!(
                            "object {o} shard {s} block {b}: checksum or data mismatch"
                        )),
                    }
                });
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    println!(
        "  read and verified {:.0} MiB in {:.2?}",
        bytes / 1048576.0,
        t.elapsed()
    );

    // Damage shard 1, block 0 of object 0 (bitrot), then read the object: the checksum catches
    // it and parity rebuilds it.
    let mut junk = f.buffer(4096).map_err(|e| e.to_string())?;
    junk.as_mut_slice().fill(0xEE);
    f.write_at(slot(&a, 0, 1, 0) + HEADER as u64 + 8192, junk)
        .await
        .map_err(|(e, _)| e.to_string())?;
    let mut shards = Vec::new();
    for s in 0..SHARDS {
        shards.push(read_block(&f, slot(&a, 0, s, 0), 0, s, 0).await?);
    }
    let bad: Vec<usize> = (0..SHARDS).filter(|&s| shards[s].is_none()).collect();
    if bad != vec![1] {
        return Err(format!(
            "expected exactly shard 1 to fail its checksum, got {bad:?}"
        ));
    }
    let mut rebuilt = vec![0u8; BLOCK];
    for s in (0..SHARDS).filter(|&s| s != 1) {
        for (x, y) in rebuilt.iter_mut().zip(shards[s].as_ref().expect("intact")) {
            *x ^= y;
        }
    }
    if rebuilt != expected(0, 1, 0) {
        return Err("parity reconstruction of the damaged shard does not match".into());
    }
    println!(
        "  bitrot in object 0 shard 1 detected by its header checksum and rebuilt from parity"
    );
    let st = f.runtime().pools().stats();
    let in_use = f.runtime().pools().in_use();
    f.runtime().shutdown();
    println!(
        "  pools: {} cores, {} buffers in use at the end",
        st.len(),
        in_use
    );
    println!("shard_store: OK");
    Ok(())
}
