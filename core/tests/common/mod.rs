//! Shared helpers for integration tests: temporary files, loop devices, and the rule that
//! a test needing privileges fails under CI=true and skips (with the reason) elsewhere.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// True when running in CI, where every test must run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skip (outside CI) or fail (in CI) because `what` is missing.
pub fn missing(what: &str) -> Option<std::convert::Infallible> {
    if in_ci() {
        panic!("CI=true and this test needs {what}");
    }
    eprintln!("SKIPPED: this test needs {what}");
    None
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loop block device over a sparse backing file, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    /// Attach a loop device of `size` bytes (logical block size `lbs`), or `None` (outside CI)
    /// when not root or losetup is unavailable.
    pub fn new(size: u64, lbs: u32) -> Option<LoopDev> {
        Self::with_args(size, lbs, &[])
    }

    /// Read-only loop device.
    pub fn read_only(size: u64) -> Option<LoopDev> {
        Self::with_args(size, 512, &["--read-only"])
    }

    fn with_args(size: u64, lbs: u32, extra: &[&str]) -> Option<LoopDev> {
        if !is_root() {
            missing("root (to attach loop devices)")?;
        }
        let dir = tempfile::tempdir_in(backing_dir()).expect("temp dir");
        let backing = dir.path().join("backing.img");
        let f = std::fs::File::create(&backing).expect("create backing");
        f.set_len(size).expect("size backing");
        drop(f);
        let lbs_arg = format!("--sector-size={lbs}");
        let mut args = vec!["--find", "--show", lbs_arg.as_str()];
        args.extend_from_slice(extra);
        let out = match Command::new("losetup").args(&args).arg(&backing).output() {
            Ok(o) => o,
            Err(e) => {
                missing(&format!("losetup ({e})"))?;
                unreachable!()
            }
        };
        if !out.status.success() {
            missing(&format!(
                "a free loop device (losetup: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            ))?;
        }
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Some(LoopDev {
            path,
            backing,
            _dir: dir,
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Directory for backing files: on a real file system (O_DIRECT must work).
pub fn backing_dir() -> PathBuf {
    std::env::var_os("RIO_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// A temporary regular file of `size` bytes filled with `byte`.
pub fn temp_file(size: usize, byte: u8) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(backing_dir()).expect("temp dir");
    let p = dir.path().join("data");
    std::fs::write(&p, vec![byte; size]).expect("write temp file");
    (dir, p)
}

/// CRC of a file's contents, to prove a failed command wrote nothing.
pub fn digest(p: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).expect("read for digest"))
}

/// Run `cmd`, panicking with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic, position-dependent content.
pub fn pattern(off: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (((off as usize + i) as u64 * 2654435761) >> 7) as u8 ^ seed)
        .collect()
}

/// Write `pattern(off, len, seed)` at `off` through `q` (blocking).
pub fn write_pattern(q: &mut rio::Queue, off: u64, len: usize, seed: u8) {
    let mut b = q.alloc_buf(len).unwrap();
    b.as_mut_slice().copy_from_slice(&pattern(off, len, seed));
    q.write(off, b).expect("write");
}

/// Read `len` bytes at `off` through `q` (blocking).
pub fn read_back(q: &mut rio::Queue, off: u64, len: usize) -> Vec<u8> {
    let b = q.alloc_buf(len).unwrap();
    q.read(off, b).expect("read").as_slice().to_vec()
}

/// The engine settings of the driver-on-model tests: no hugepages, a 16 MiB arena.
pub fn sim_engine_config() -> rio::EngineConfig {
    rio::EngineConfig {
        hugepages: false,
        buffer_pool_bytes: 16 << 20,
        ..rio::EngineConfig::default()
    }
}

/// A model with one namespace of `size` bytes in 512-byte blocks.
pub fn sim_one_ns(size: u64) -> rio::nvme::sim::SimConfig {
    rio::nvme::sim::SimConfig {
        namespaces: vec![rio::nvme::sim::SimNamespace {
            block_size: 512,
            size_bytes: size,
        }],
        ..rio::nvme::sim::SimConfig::default()
    }
}

/// The driver brought up on the model `s`, namespace 1, read-write.
pub fn open_sim_rw(cfg: &rio::EngineConfig, s: rio::nvme::sim::SimConfig) -> rio::Engine {
    let rw = rio::target::OpenOptions {
        write: true,
        direct: true,
        create: false,
    };
    rio::Engine::open_sim(cfg, s, 1, rw).expect("driver brings up the model")
}

/// A run-to-completion loop through `Queue::wait_each` at the queue's depth over `blocks`
/// 4 KiB blocks: every completion handed over once, with its data, and the handler's
/// resubmissions served. The blocks are written first.
pub fn wait_each_round_trip(q: &mut rio::Queue, blocks: u64) {
    const BS: usize = 4096;
    for b in 0..blocks {
        write_pattern(q, b * BS as u64, BS, b as u8);
    }
    let mut next = 0u64;
    while next < blocks && q.in_flight() < q.depth() {
        let buf = q.alloc_buf(BS).unwrap();
        q.submit_read(next * BS as u64, buf, next).unwrap();
        next += 1;
    }
    let mut seen = vec![0u32; blocks as usize];
    let mut handed = 0usize;
    while q.in_flight() > 0 {
        handed += q
            .wait_each(1, std::time::Duration::from_secs(20), |q, c| {
                let b = c.token;
                assert_eq!(c.offset, b * BS as u64);
                let buf = c.buf.expect("a read hands its buffer back");
                assert_eq!(c.result.expect("read ok"), BS as u64);
                assert_eq!(&buf[..], &pattern(c.offset, BS, b as u8)[..], "block {b}");
                seen[b as usize] += 1;
                if next < blocks {
                    q.submit_read(next * BS as u64, buf, next).unwrap();
                    next += 1;
                }
            })
            .unwrap();
    }
    assert_eq!(handed, blocks as usize);
    assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
}

/// Eight 4 KiB reads in flight, a `wait_each(8, ..)` whose handler panics at its
/// `panic_at`-th call: the panic reaches the caller, the next calls hand every other
/// completion over once with its data, and the queue goes on working. Returns how many calls
/// the panicking `wait_each` made.
pub fn wait_each_panic_loses_nothing(q: &mut rio::Queue, panic_at: u32) -> u32 {
    use std::time::Duration;
    const BS: usize = 4096;
    for b in 0..8u64 {
        write_pattern(q, b * BS as u64, BS, b as u8 ^ 0x5a);
    }
    for t in 0..8u64 {
        let buf = q.alloc_buf(BS).unwrap();
        q.submit_read(t * BS as u64, buf, t).unwrap();
    }
    let mut seen = vec![0u32; 8];
    let mut calls = 0u32;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        q.wait_each(8, Duration::from_secs(20), |_, c| {
            seen[c.token as usize] += 1;
            calls += 1;
            if calls == panic_at {
                panic!("handler panics on purpose");
            }
        })
    }));
    let payload = caught.expect_err("the handler's panic reaches the caller");
    assert_eq!(
        payload.downcast_ref::<&str>().copied(),
        Some("handler panics on purpose")
    );
    // Until a call hands nothing over with nothing in flight: what is missing then was lost.
    // Bounded, and with a short wait: a completion the queue lost leaves its slot in flight
    // for ever, which must fail the test, not hang it.
    for round in 0.. {
        assert!(
            round < 200,
            "completions lost: {seen:?}, {} in flight",
            q.in_flight()
        );
        let n = q
            .wait_each(1, Duration::from_millis(20), |_, c| {
                let b = c.token;
                let buf = c.buf.expect("a read hands its buffer back");
                assert_eq!(c.result.expect("read ok"), BS as u64);
                assert_eq!(
                    &buf[..],
                    &pattern(c.offset, BS, b as u8 ^ 0x5a)[..],
                    "block {b}"
                );
                seen[b as usize] += 1;
            })
            .unwrap();
        if n == 0 && q.in_flight() == 0 {
            break;
        }
    }
    assert_eq!(seen, vec![1; 8], "each completion handed over once");
    let buf = read_back(q, 3 * BS as u64, BS);
    assert_eq!(&buf[..], &pattern(3 * BS as u64, BS, 3 ^ 0x5a)[..]);
    calls
}
