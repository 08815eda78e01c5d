//! The same integration suite for both kernel-path backends, on a temporary file and on a loop
//! block device (read, write, flush, write-zeroes, deallocate, alignment and range errors, many
//! operations in flight, buffers handed back on rejection).

mod common;

use std::time::Duration;

use common::{LoopDev, temp_file};
use rio::config::BackendChoice;
use rio::target::OpenOptions;
use rio::{Completion, Engine, EngineConfig, Error, OpKind};

fn open_rw(cfg: &EngineConfig, path: &std::path::Path) -> Engine {
    Engine::open(
        cfg,
        path.to_str().unwrap(),
        OpenOptions {
            write: true,
            direct: true,
            create: false,
        },
    )
    .expect("open engine")
}

fn engine(backend: BackendChoice, path: &std::path::Path) -> Engine {
    let cfg = EngineConfig {
        backend,
        queue_depth: 64,
        buffer_pool_bytes: 16 << 20,
        ..Default::default()
    };
    let e = Engine::open(
        &cfg,
        path.to_str().unwrap(),
        OpenOptions {
            write: true,
            direct: true,
            create: false,
        },
    )
    .expect("open engine");
    assert_eq!(
        e.selection().backend.name(),
        match backend {
            BackendChoice::Psync => "psync",
            _ => "uring",
        }
    );
    e
}

fn pattern(off: u64, i: usize) -> u8 {
    (off as usize / 512 + i * 7) as u8
}

/// Write distinct data at many offsets with all in flight, read it back, check every byte.
fn write_read_verify(e: &Engine) {
    let mut q = e.queue(Some(32)).unwrap();
    let lbs = q.geometry().block_size as u64;
    let bs = 4096u64.max(lbs);
    let mut out: Vec<Completion> = Vec::new();
    for i in 0..32u64 {
        let off = i * bs * 3;
        let mut b = q.alloc_buf(bs as usize).unwrap();
        for (j, x) in b.iter_mut().enumerate() {
            *x = pattern(off, j);
        }
        q.submit_write(off, b, i).unwrap();
    }
    assert_eq!(q.in_flight(), 32);
    let mut seen = [false; 32];
    while out.len() < 32 {
        q.wait(32, Duration::from_secs(10), &mut out).unwrap();
    }
    for c in out.drain(..) {
        assert_eq!(c.op, OpKind::Write);
        assert_eq!(c.result.as_ref().copied().unwrap(), bs);
        assert!(!seen[c.token as usize], "token {} completed twice", c.token);
        seen[c.token as usize] = true;
        assert!(c.buf.is_some(), "write hands its buffer back");
    }
    assert!(seen.iter().all(|&s| s));
    q.flush().unwrap();
    for i in 0..32u64 {
        let off = i * bs * 3;
        let b = q.read(off, q.alloc_buf(bs as usize).unwrap()).unwrap();
        for (j, x) in b.iter().enumerate() {
            assert_eq!(*x, pattern(off, j), "byte {j} at offset {off}");
        }
    }
    assert_eq!(q.in_flight(), 0);
}

fn zeroes_and_deallocate(e: &Engine) {
    let mut q = e.queue(None).unwrap();
    let len = 64 * 1024u64;
    for off in [0u64, 1 << 20] {
        let mut b = q.alloc_buf(len as usize).unwrap();
        b.fill(0xee);
        q.write(off, b).unwrap();
    }
    q.write_zeroes(0, len).unwrap();
    let b = q.read(0, q.alloc_buf(len as usize).unwrap()).unwrap();
    assert!(b.iter().all(|&x| x == 0), "write-zeroes left data");
    q.deallocate(1 << 20, len).unwrap();
    let b = q.read(1 << 20, q.alloc_buf(len as usize).unwrap()).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "deallocate on a file or loop device reads back zeroes"
    );
    q.flush().unwrap();
}

fn errors_and_buffer_return(e: &Engine) {
    let mut q = e.queue(Some(4)).unwrap();
    let geo = q.geometry();
    let lbs = geo.block_size as u64;
    // Misaligned offset: rejected, names the alignment, buffer handed back.
    let b = q.alloc_buf(8192).unwrap();
    let rej = q.submit_read(lbs / 2, b, 1).unwrap_err();
    assert!(matches!(rej.error, Error::Alignment { .. }));
    assert!(rej.error.to_string().contains(&format!("({lbs} bytes)")));
    let mut b = rej.buf.expect("buffer handed back");
    // Misaligned length.
    if lbs > 1 {
        b.set_len(lbs as usize + 1).unwrap();
        let rej = q.submit_write(0, b, 2).unwrap_err();
        assert!(matches!(rej.error, Error::Alignment { what: "length", .. }));
        b = rej.buf.unwrap();
        b.set_len(4096).unwrap();
    }
    // Past the end.
    let rej = q.submit_read(geo.size, b, 3).unwrap_err();
    assert!(matches!(rej.error, Error::OutOfRange { .. }));
    // Straddling the end, its first block inside.
    let mut b = rej.buf.unwrap();
    b.set_len(2 * lbs as usize).unwrap();
    let rej = q.submit_read(geo.size - lbs, b, 3).unwrap_err();
    assert!(matches!(rej.error, Error::OutOfRange { .. }));
    let mut b = rej.buf.unwrap();
    b.set_len(4096).unwrap();
    assert!(matches!(
        q.submit_deallocate(geo.size - lbs, 2 * lbs, 4),
        Err(Error::OutOfRange { .. })
    ));
    // A buffer from another queue's arena is refused.
    let other = e.queue(Some(1)).unwrap();
    let foreign = other.alloc_buf(4096).unwrap();
    let rej = q.submit_read(0, foreign, 5).unwrap_err();
    assert!(rej.error.to_string().contains("another queue"));
    // Queue full.
    for t in 0..4 {
        q.submit_read(0, q.alloc_buf(4096).unwrap(), 10 + t)
            .unwrap();
    }
    let rej = q.submit_read(0, b, 99).unwrap_err();
    assert!(matches!(rej.error, Error::QueueFull { depth: 4 }));
    let mut out = Vec::new();
    while out.len() < 4 {
        q.wait(4, Duration::from_secs(10), &mut out).unwrap();
    }
    assert!(out.iter().all(|c| c.result.is_ok()));
    // The last block exactly: accepted, and read whole.
    let mut last = out.pop().unwrap().buf.unwrap();
    last.set_len(lbs as usize).unwrap();
    q.submit_read(geo.size - lbs, last, 7).unwrap();
    out.clear();
    q.wait(1, Duration::from_secs(10), &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].result.as_ref().ok(), Some(&lbs));
    // Poll with nothing in flight returns nothing and does not block.
    out.clear();
    assert_eq!(q.poll(&mut out).unwrap(), 0);
    // Every buffer is back in the arena once dropped.
    drop(out);
    drop(rej);
    assert_eq!(q.arena().in_use(), 0);
}

fn read_only_rejects_writes(path: &std::path::Path, backend: BackendChoice) {
    let cfg = EngineConfig {
        backend,
        ..Default::default()
    };
    let e = Engine::open(
        &cfg,
        path.to_str().unwrap(),
        OpenOptions {
            write: false,
            direct: true,
            create: false,
        },
    )
    .unwrap();
    let mut q = e.queue(Some(2)).unwrap();
    let rej = q
        .submit_write(0, q.alloc_buf(4096).unwrap(), 0)
        .unwrap_err();
    assert!(matches!(rej.error, Error::Unsupported { .. }));
    assert!(rej.buf.is_some());
}

macro_rules! suite {
    ($m:ident, $backend:expr) => {
        mod $m {
            use super::*;

            #[test]
            fn file_write_read_verify() {
                let (_d, p) = temp_file(8 << 20, 0);
                write_read_verify(&engine($backend, &p));
            }

            #[test]
            fn file_zeroes_and_deallocate() {
                let (_d, p) = temp_file(8 << 20, 0x11);
                zeroes_and_deallocate(&engine($backend, &p));
            }

            #[test]
            fn file_errors_and_buffer_return() {
                let (_d, p) = temp_file(8 << 20, 0);
                errors_and_buffer_return(&engine($backend, &p));
            }

            #[test]
            fn file_read_only() {
                let (_d, p) = temp_file(1 << 20, 0);
                read_only_rejects_writes(&p, $backend);
            }

            #[test]
            fn loop_write_read_verify() {
                for lbs in [512, 4096] {
                    let Some(l) = LoopDev::new(64 << 20, lbs) else {
                        return;
                    };
                    let e = engine($backend, &l.path);
                    assert_eq!(e.target().geometry.block_size, lbs);
                    write_read_verify(&e);
                }
            }

            #[test]
            fn loop_zeroes_and_deallocate() {
                let Some(l) = LoopDev::new(64 << 20, 512) else {
                    return;
                };
                zeroes_and_deallocate(&engine($backend, &l.path));
            }

            #[test]
            fn loop_errors_and_buffer_return() {
                let Some(l) = LoopDev::new(64 << 20, 4096) else {
                    return;
                };
                errors_and_buffer_return(&engine($backend, &l.path));
            }
        }
    };
}

suite!(uring, BackendChoice::Uring);
suite!(psync, BackendChoice::Psync);

#[test]
fn auto_prefers_uring_and_explains() {
    let (_d, p) = temp_file(1 << 20, 0);
    let e = Engine::open(
        &EngineConfig::default(),
        p.to_str().unwrap(),
        OpenOptions {
            write: false,
            direct: true,
            create: false,
        },
    )
    .unwrap();
    assert_eq!(e.selection().backend.name(), "uring");
    assert!(e.selection().reason.contains("regular file"));
}

#[test]
fn pcie_targets_are_refused_before_touching_the_device() {
    // Opening reads sysfs only; a missing function or one that is not an NVMe controller is
    // refused with the reason (the host's own devices are never bound or written here).
    let e = Engine::open(
        &EngineConfig::default(),
        "pcie://0000:ff:1f.7",
        OpenOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("0000:ff:1f.7") && e.is_usage(),
        "{e}"
    );
    let non_nvme = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .find(|d| {
            std::fs::read_to_string(d.path().join("class")).is_ok_and(|c| c.trim() != "0x010802")
        });
    let Some(d) = non_nvme else {
        common::missing("a PCI device that is not an NVMe controller (to be refused)");
        return;
    };
    {
        let addr = d.file_name().to_string_lossy().into_owned();
        let e = Engine::open(
            &EngineConfig::default(),
            &format!("pcie://{addr}"),
            OpenOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not an NVMe controller"), "{e}");
    }
}

#[test]
fn uring_sqpoll_passes_the_suite() {
    let (_d, p) = temp_file(8 << 20, 0);
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        sqpoll: true,
        sqpoll_idle_ms: 10,
        ..Default::default()
    };
    let e = open_rw(&cfg, &p);
    write_read_verify(&e);
    zeroes_and_deallocate(&e);
}

#[test]
fn uring_eager_submission_passes_the_suite() {
    let (_d, p) = temp_file(8 << 20, 0);
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        submit_batch: 1,
        ..Default::default()
    };
    let e = open_rw(&cfg, &p);
    write_read_verify(&e);
    errors_and_buffer_return(&e);
}

/// An io_uring queue (a directory target) with a read of a pipe in flight, token 7, that
/// nothing completes while `body` runs; then the pipe is written and the read must complete.
/// (psync's `pread` refuses a pipe at once: nothing to wait for.)
fn with_a_pipe_read_in_flight(body: impl FnOnce(&mut rio::Queue, &mut Vec<Completion>)) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        backend: BackendChoice::Uring,
        hugepages: false,
        ..EngineConfig::default()
    };
    let e = Engine::open_dir(&cfg, dir.path()).unwrap();
    let mut q = e.queue(Some(4)).unwrap();
    let (r, mut w) = std::io::pipe().unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` and `r` outlive the read: it is reaped below before either is dropped.
    unsafe {
        use std::os::fd::AsFd;
        q.submit_fd(OpKind::Read, r.as_fd(), 0, buf.as_mut_ptr(), 4096, 7, true)
            .unwrap();
    }
    let mut out = Vec::new();
    body(&mut q, &mut out);
    // The read ends: written, completed, reaped.
    std::io::Write::write_all(&mut w, &[5u8; 4096]).unwrap();
    let n = q.wait(1, Duration::from_secs(10), &mut out).unwrap();
    assert_eq!(n, 1);
    assert_eq!(out[0].token, 7);
    assert_eq!(buf[..8], [5u8; 8]);
}

/// `Queue::wait` with nothing completing returns after its timeout, not twice it: the first
/// call to the backend waits the whole timeout, and the queue must not wait it again (it did,
/// counting a second deadline from when the first wait ended). A read of a pipe nobody writes
/// stays in flight on io_uring (psync's `pread` refuses a pipe at once: nothing to wait for).
#[test]
fn wait_with_nothing_completing_returns_after_one_timeout() {
    with_a_pipe_read_in_flight(|q, out| {
        let t0 = std::time::Instant::now();
        let n = q.wait(1, Duration::from_secs(1), out).unwrap();
        let waited = t0.elapsed();
        assert_eq!(n, 0, "nothing can complete");
        // At least the timeout; and not a second one (2 s): the margin is for a host that
        // is slow to wake the waiter, not a measure of rio's speed.
        assert!(
            waited >= Duration::from_millis(990) && waited < Duration::from_millis(1800),
            "waited {waited:?} for a 1 s timeout"
        );
    });
}
