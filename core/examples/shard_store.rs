//! Erasure-coded objects stored the way RustFS lays them out on its drives, from many tokio
//! tasks, through one rio runtime serving every file (`rio::runtime::Files`).
//!
//! RustFS's layout (rustfs-ecstore 1.0.1): an object is cut into 1 MiB erasure blocks; each
//! block into `DATA` data shards of ceil(1 MiB / DATA) bytes plus parity; shard `s` of every
//! block goes to drive `s`, in one file per object part (`<drive>/<bucket>/<object>/<data
//! dir>/part.1`). In that file each shard block is a 32-byte hash followed by the shard, one
//! after the other: block `k` starts at `k * (shard + 32)`, so after the first block nothing
//! is 4 KiB aligned. RustFS hashes with HighwayHash256; this example fills the 32 bytes with
//! CRC32C over the shard and its coordinates (same size, same place, no extra dependency).
//! Parity here is one XOR shard (RustFS uses Reed-Solomon; the I/O is the same).
//!
//! ```text
//! cargo run --release --example shard_store                       # in a temporary directory
//! cargo run --release --example shard_store -- --dir /mnt/drives  # under this directory
//! cargo run --release --example shard_store -- --objects 64 --blocks 4
//! ```
//! Writes every object concurrently (one task per shard file, streamed through a
//! `SeqWriter`), reads every shard block back at its unaligned offset and verifies hash and
//! data, then damages one shard block of an object and shows that the read detects it (hash)
//! and rebuilds it from parity. Exit status 0 when all checks pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rio::EngineConfig;
use rio::runtime::{Files, OpenFile};

const DATA: usize = 4;
const SHARDS: usize = DATA + 1;
/// RustFS's erasure block.
const BLOCK: usize = 1 << 20;
/// Bytes of one shard of one block: ceil(BLOCK / DATA).
const SHARD: usize = BLOCK.div_ceil(DATA);
/// The hash before each shard block.
const HASH: usize = 32;
/// Bytes of one shard block in a part file.
const STRIDE: u64 = (HASH + SHARD) as u64;
/// Shard files written or read at once: a store bounds its concurrency rather than let
/// every task wait on the pool.
const IN_FLIGHT: usize = 16;

struct Args {
    dir: Option<PathBuf>,
    objects: usize,
    blocks: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        dir: None,
        objects: 16,
        blocks: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = Some(PathBuf::from(val("--dir")?)),
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
                return Err("usage: shard_store [--dir DIR] [--objects N] [--blocks N]".into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.objects == 0 || a.blocks == 0 {
        return Err("--objects and --blocks must be at least 1".into());
    }
    Ok(a)
}

/// Where shard `s` of object `o` lives: drive `s`, RustFS-style path.
fn part_path(o: usize, s: usize) -> PathBuf {
    Path::new(&format!("drive{s}"))
        .join("bucket")
        .join(format!("object-{o}"))
        .join("data-dir")
        .join("part.1")
}

/// Deterministic object content: data shard `s`, block `b`, object `o`.
fn fill_data(buf: &mut [u8], o: usize, s: usize, b: usize) {
    let seed = (o as u64) << 32 | (s as u64) << 16 | b as u64;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// The 32-byte hash of a shard block (CRC32C of the shard and of its coordinates, repeated:
/// stands in for RustFS's HighwayHash256).
fn hash(o: usize, s: usize, b: usize, data: &[u8]) -> [u8; HASH] {
    let mut h = [0u8; HASH];
    let c = crc32c::crc32c(data);
    let id = crc32c::crc32c_append(
        c,
        &[
            (o as u64).to_le_bytes(),
            (s as u64).to_le_bytes(),
            (b as u64).to_le_bytes(),
        ]
        .concat(),
    );
    for (i, w) in h.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&(if i % 2 == 0 { c } else { id }).to_le_bytes());
    }
    h
}

/// The expected content of shard `s` (parity for `s == DATA`), block `b`, object `o`.
fn expected(o: usize, s: usize, b: usize) -> Vec<u8> {
    let mut out = vec![0u8; SHARD];
    if s < DATA {
        fill_data(&mut out, o, s, b);
    } else {
        let mut d = vec![0u8; SHARD];
        for ds in 0..DATA {
            fill_data(&mut d, o, ds, b);
            for (x, y) in out.iter_mut().zip(&d) {
                *x ^= y;
            }
        }
    }
    out
}

/// Write shard file `s` of object `o`: hash + shard for each block, streamed.
async fn write_shard(fs: &Arc<Files>, blocks: usize, o: usize, s: usize) -> Result<(), String> {
    let rel = part_path(o, s);
    std::fs::create_dir_all(fs.dir().join(rel.parent().expect("has a parent")))
        .map_err(|e| format!("{}: {e}", rel.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(true);
    let f = fs.open_file(&rel, &opts).map_err(|e| e.to_string())?;
    let mut w = f.writer(0);
    for b in 0..blocks {
        let data = expected(o, s, b);
        w.write(&hash(o, s, b, &data))
            .await
            .map_err(|e| e.to_string())?;
        w.write(&data).await.map_err(|e| e.to_string())?;
    }
    w.finish().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Read a shard block at its (unaligned) offset and check it against its hash. `Ok(None)`:
/// the block is damaged.
async fn read_block(f: &OpenFile, o: usize, s: usize, b: usize) -> Result<Option<Vec<u8>>, String> {
    let block = f
        .read_at(b as u64 * STRIDE, STRIDE as usize)
        .await
        .map_err(|e| e.to_string())?;
    if block.len() != STRIDE as usize {
        return Err(format!(
            "object {o} shard {s} block {b}: short ({} bytes)",
            block.len()
        ));
    }
    let (h, data) = block.split_at(HASH);
    Ok((h == hash(o, s, b, data)).then(|| data.to_vec()))
}

fn open_read(fs: &Arc<Files>, o: usize, s: usize) -> Result<OpenFile, String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    fs.open_file(&part_path(o, s), &opts)
        .map_err(|e| e.to_string())
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
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("rio-shard-store")
                .tempdir_in("/var/tmp")
                .or_else(|_| tempfile::tempdir())
                .map_err(|e| format!("temporary directory: {e}"))?;
            tmp.path().to_path_buf()
        }
    };
    let cfg = EngineConfig {
        hugepages: true,
        ..EngineConfig::default()
    };
    let fs = Files::open(&dir, &cfg).map_err(|e| e.to_string())?;
    println!(
        "shard_store: {} objects x {} blocks of 1 MiB, {DATA}+1 shards of {SHARD} bytes (+{HASH}-byte hash each) on {SHARDS} drives under {} ({} backend, {} pollers on cores {:?})",
        a.objects,
        a.blocks,
        dir.display(),
        fs.runtime().engine().selection().backend.name(),
        fs.runtime().cores().len(),
        fs.runtime().cores()
    );

    // Write: one task per shard file, IN_FLIGHT at once.
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for o in 0..a.objects {
        for s in 0..SHARDS {
            let (fs, a, limit) = (Arc::clone(&fs), Arc::clone(&a), Arc::clone(&limit));
            tasks.spawn(async move {
                let _p = limit.acquire().await.map_err(|e| e.to_string())?;
                write_shard(&fs, a.blocks, o, s).await
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let bytes = (a.objects * SHARDS * a.blocks) as f64 * STRIDE as f64;
    println!(
        "  wrote {:.0} MiB in {:.2?} ({:.0} MiB/s)",
        bytes / 1048576.0,
        t.elapsed(),
        bytes / 1048576.0 / t.elapsed().as_secs_f64()
    );
    let probe = open_read(&fs, 0, 0)?;
    let want = (a.blocks as u64) * STRIDE;
    let len = probe.len().map_err(|e| e.to_string())?;
    if len != want {
        return Err(format!(
            "part file of shard 0 is {len} bytes, expected {want}"
        ));
    }

    // Read back and verify every shard block, at its unaligned offset.
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for o in 0..a.objects {
        for s in 0..SHARDS {
            let (fs, a, limit) = (Arc::clone(&fs), Arc::clone(&a), Arc::clone(&limit));
            tasks.spawn(async move {
                let _p = limit.acquire().await.map_err(|e| e.to_string())?;
                let f = open_read(&fs, o, s)?;
                for b in 0..a.blocks {
                    match read_block(&f, o, s, b).await? {
                        Some(d) if d == expected(o, s, b) => {}
                        _ => {
                            return Err(format!(
                                "object {o} shard {s} block {b}: hash or data mismatch"
                            ));
                        }
                    }
                }
                Ok(())
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    println!(
        "  read and verified {:.0} MiB in {:.2?} (every block at offset k * {STRIDE})",
        bytes / 1048576.0,
        t.elapsed()
    );

    // Damage shard 1, last block, of object 0 (bitrot, written behind rio's back), then read
    // that block of every shard: the hash catches it and parity rebuilds it.
    let last = a.blocks - 1;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(part_path(0, 1)))
            .map_err(|e| e.to_string())?;
        f.write_all_at(&[0xEE; 100], last as u64 * STRIDE + HASH as u64 + 8191)
            .map_err(|e| e.to_string())?;
    }
    let mut shards = Vec::new();
    for s in 0..SHARDS {
        shards.push(read_block(&open_read(&fs, 0, s)?, 0, s, last).await?);
    }
    let bad: Vec<usize> = (0..SHARDS).filter(|&s| shards[s].is_none()).collect();
    if bad != vec![1] {
        return Err(format!(
            "expected exactly shard 1 to fail its hash, got {bad:?}"
        ));
    }
    let mut rebuilt = vec![0u8; SHARD];
    for s in (0..SHARDS).filter(|&s| s != 1) {
        for (x, y) in rebuilt.iter_mut().zip(shards[s].as_ref().expect("intact")) {
            *x ^= y;
        }
    }
    if rebuilt != expected(0, 1, last) {
        return Err("parity reconstruction of the damaged shard does not match".into());
    }
    println!(
        "  bitrot in object 0 shard 1 block {last} detected by its hash and rebuilt from parity"
    );
    let in_use = fs.runtime().pools().in_use();
    let cores = fs.runtime().pools().stats().len();
    fs.runtime().shutdown();
    println!("  pools: {cores} cores, {in_use} buffers in use at the end");
    println!("shard_store: OK");
    Ok(())
}
