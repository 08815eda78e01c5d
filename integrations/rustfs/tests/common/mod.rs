//! RustFS's object layer as a library: `rustfs-ecstore`'s `ECStore` over four local drives
//! (one erasure set, 2 data + 2 parity), driven through the same traits its S3 server
//! calls. `run` is the same sequence for every backend; each backend runs in its own test
//! binary, because the backend factory is process-wide (as in a server).

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustfs_ecstore::api::disk::endpoint::Endpoint;
use rustfs_ecstore::api::layout::{EndpointServerPools, Endpoints, PoolEndpoints};
use rustfs_ecstore::api::object::{ObjectOptions, PutObjReader};
use rustfs_ecstore::api::storage::{ECStore, init_local_disks};
use rustfs_heal_contracts::heal_channel::{HealOpts, HealScanMode};
use rustfs_storage_api::{
    BucketOperations, HTTPRangeSpec, HealOperations, MakeBucketOptions, ObjectIO, ObjectOperations,
};
use tokio::io::AsyncReadExt;

pub const BUCKET: &str = "rio-objects";

/// Deterministic bytes that differ at every offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a run did, for the backend-specific checks of the caller.
#[derive(Debug, Default)]
pub struct Outcome {
    pub verified_bytes: u64,
    pub objects: usize,
}

/// Four drives under the target directory (a real file system: O_DIRECT is taken there).
pub fn drives(tag: &str) -> (tempfile::TempDir, Vec<PathBuf>) {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::Builder::new()
        .prefix(tag)
        .tempdir_in(base)
        .unwrap();
    let paths: Vec<PathBuf> = (1..=4)
        .map(|i| dir.path().join(format!("drive{i}")))
        .collect();
    for p in &paths {
        std::fs::create_dir_all(p).unwrap();
    }
    (dir, paths)
}

pub async fn store(paths: &[PathBuf]) -> Arc<ECStore> {
    let mut endpoints = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let mut e = Endpoint::try_from(p.to_str().unwrap()).expect("a local drive endpoint");
        e.set_pool_index(0);
        e.set_set_index(0);
        e.set_disk_index(i);
        endpoints.push(e);
    }
    let pools = EndpointServerPools(vec![PoolEndpoints {
        legacy: false,
        set_count: 1,
        drives_per_set: paths.len(),
        endpoints: Endpoints::from(endpoints),
        cmd_line: "rio-rustfs object layer test".to_string(),
        platform: format!(
            "OS: {} | Arch: {}",
            std::env::consts::OS,
            std::env::consts::ARCH
        ),
    }]);
    init_local_disks(pools.clone()).await.expect("local disks");
    let s = ECStore::new(
        "127.0.0.1:0".parse().unwrap(),
        pools,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("the object layer over four drives");
    // Bucket metadata (versioning, lock, quota...) as the server sets it up at start.
    rustfs_ecstore::api::bucket::metadata_sys::init_bucket_metadata_sys(s.clone(), Vec::new())
        .await;
    s
}

async fn put(s: &ECStore, name: &str, data: &[u8]) {
    let mut r = PutObjReader::from_vec(data.to_vec());
    let info = s
        .put_object(BUCKET, name, &mut r, &ObjectOptions::default())
        .await
        .unwrap_or_else(|e| panic!("put {name} ({} bytes): {e}", data.len()));
    assert_eq!(info.size, data.len() as i64, "put {name}: size recorded");
}

/// GET `name` (whole, or the inclusive byte range `range`) and compare with `want`.
async fn get(s: &ECStore, name: &str, range: Option<(i64, i64)>, want: &[u8]) -> u64 {
    let spec = range.map(|(start, end)| HTTPRangeSpec {
        is_suffix_length: false,
        start,
        end,
    });
    let mut r = s
        .get_object_reader(
            BUCKET,
            name,
            spec,
            http::HeaderMap::new(),
            &ObjectOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("get {name} {range:?}: {e}"));
    let mut got = Vec::new();
    r.stream
        .read_to_end(&mut got)
        .await
        .unwrap_or_else(|e| panic!("get {name} {range:?}: reading the body: {e}"));
    assert!(
        got == want,
        "get {name} {range:?}: {} bytes back, {} expected, or content differs",
        got.len(),
        want.len()
    );
    got.len() as u64
}

/// Every file of `name` on drive `d` (its xl.meta and part files) removed, as if the drive
/// lost them.
fn lose(drive: &Path, name: &str) {
    let p = drive.join(BUCKET).join(name);
    std::fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
}

fn has_parts(drive: &Path, name: &str) -> bool {
    let dir = drive.join(BUCKET).join(name);
    let meta = dir.join("xl.meta").is_file();
    let parts = std::fs::read_dir(&dir)
        .map(|it| {
            it.flatten()
                .any(|e| e.path().is_dir() && e.path().join("part.1").is_file())
        })
        .unwrap_or(false);
    meta && parts
}

/// The sequence every backend runs: put, get, ranged get, overwrite, delete, and heal after
/// a drive's files vanish, every byte compared.
pub async fn run(paths: &[PathBuf]) -> Outcome {
    let s = store(paths).await;
    s.make_bucket(BUCKET, &MakeBucketOptions::default())
        .await
        .expect("make bucket");
    let mut out = Outcome::default();
    // 4 KiB and 64 KiB live inline in xl.meta; 300 KiB, 1 MiB and 5 MiB + 17 are part
    // files (shards of 150 KiB, 512 KiB; five blocks with a short last one).
    let sizes = [4096usize, 65_536, 300_000, 1 << 20, (5 << 20) + 17];
    let mut objects = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let name = format!("dir/obj-{i}-{n}");
        let data = pattern(i as u64 + 1, n);
        put(&s, &name, &data).await;
        objects.push((name, data));
    }
    for (name, data) in &objects {
        out.verified_bytes += get(&s, name, None, data).await;
        let n = data.len() as i64;
        for (a, b) in [
            (0, 0),
            (1, 4096),
            (4095, 4096),
            (n / 3, n / 2),
            (n - 1, n - 1),
            ((n - 100).max(0), n - 1),
        ] {
            if a <= b && b < n {
                out.verified_bytes +=
                    get(&s, name, Some((a, b)), &data[a as usize..=b as usize]).await;
            }
        }
    }
    // Overwrite with a different size and content; the old bytes must not come back.
    for (i, (name, data)) in objects.iter_mut().enumerate() {
        let new = pattern(100 + i as u64, data.len() * 2 / 3 + 1);
        put(&s, name, &new).await;
        *data = new;
        out.verified_bytes += get(&s, name, None, data).await;
    }
    // Delete: gone, the others untouched.
    let (gone, _) = objects.remove(0);
    s.delete_object(BUCKET, &gone, ObjectOptions::default())
        .await
        .expect("delete");
    let e = s
        .get_object_reader(
            BUCKET,
            &gone,
            None,
            http::HeaderMap::new(),
            &ObjectOptions::default(),
        )
        .await;
    assert!(e.is_err(), "a deleted object is not found");
    // A drive loses an object's files: every object is still served (from the other three),
    // then heal puts the files back, checked by losing two other drives' files afterwards
    // (2 + 2: only the healed drive and the fourth can then serve it).
    let big = objects.last().unwrap().clone();
    lose(&paths[0], &big.0);
    for (name, data) in &objects {
        out.verified_bytes += get(&s, name, None, data).await;
    }
    let opts = HealOpts {
        scan_mode: HealScanMode::Normal,
        ..Default::default()
    };
    let (_item, err) = s
        .heal_object(BUCKET, &big.0, "", &opts)
        .await
        .expect("heal");
    assert!(err.is_none(), "heal reported {err:?}");
    assert!(
        has_parts(&paths[0], &big.0),
        "heal wrote the object back on drive 1"
    );
    lose(&paths[1], &big.0);
    lose(&paths[2], &big.0);
    out.verified_bytes += get(&s, &big.0, None, &big.1).await;
    out.verified_bytes += get(&s, &big.0, Some((777, 3_000_000)), &big.1[777..=3_000_000]).await;
    out.objects = objects.len();
    out
}

/// Many large objects at once: `n` PUTs of about `size` bytes in flight together, then `n`
/// whole GETs and `n` ranged GETs together, every byte compared.
pub async fn concurrent(paths: &[PathBuf], n: usize, size: usize) -> Outcome {
    let s = store(paths).await;
    s.make_bucket(BUCKET, &MakeBucketOptions::default())
        .await
        .expect("make bucket");
    let objects: Vec<(String, Arc<Vec<u8>>)> = (0..n)
        .map(|i| {
            let len = size + i * 4099;
            (
                format!("many/obj-{i}-{len}"),
                Arc::new(pattern(1000 + i as u64, len)),
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for (name, data) in &objects {
        let (s, name, data) = (Arc::clone(&s), name.clone(), Arc::clone(data));
        tasks.push(tokio::spawn(async move { put(&s, &name, &data).await }));
    }
    for t in tasks {
        t.await.expect("a PUT task");
    }
    let mut tasks = Vec::new();
    for (i, (name, data)) in objects.iter().enumerate() {
        let (s, name, data) = (Arc::clone(&s), name.clone(), Arc::clone(data));
        tasks.push(tokio::spawn(async move {
            let whole = get(&s, &name, None, &data).await;
            // An unaligned range across several erasure blocks.
            let (a, b) = (1 + i * 7919, data.len() - 1 - i * 13);
            whole + get(&s, &name, Some((a as i64, b as i64)), &data[a..=b]).await
        }));
    }
    let mut out = Outcome {
        objects: objects.len(),
        ..Default::default()
    };
    for t in tasks {
        out.verified_bytes += t.await.expect("a GET task");
    }
    out
}
