//! The benchmark runner as a library: verify catches corruption with its offset; counts add up.

#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::AtomicBool;

use rio::target::OpenOptions;
use rio::{Engine, EngineConfig};
use rio_cli::bench::run::RunOptions;
use rio_cli::bench::{BenchError, BenchSpec, RwMode, run};

fn open(p: &std::path::Path) -> Engine {
    Engine::open(
        &EngineConfig::default(),
        p.to_str().unwrap(),
        OpenOptions {
            write: true,
            direct: true,
            create: false,
        },
    )
    .unwrap()
}

#[test]
fn verify_reports_corruption_with_its_offset() {
    let (_d, p) = common::temp_file(4 << 20, 0);
    let stop = AtomicBool::new(false);
    let spec = BenchSpec {
        rw: RwMode::Read,
        verify: true,
        iodepth: 8,
        ..Default::default()
    };
    // Lay out verifiable blocks and read them all back: clean.
    let r = run(
        &open(&p),
        &spec,
        RunOptions { layout: true },
        &stop,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.verified_blocks, Some(1024));
    assert_eq!(r.job().read.total_ios, 1024);
    // The 100 ms windows add up to the run, and the sequential pass lit every heat column
    // (1024 blocks over 64 columns: 16 each).
    let mut heat = vec![0u64; 64];
    for p in &r.series {
        for (h, v) in heat.iter_mut().zip(&p.heat) {
            *h += *v as u64;
        }
    }
    assert_eq!(heat, vec![16u64; 64]);

    // Flip one byte in the block at 3 MiB + 4 KiB, then read without laying out again.
    let bad = (3 << 20) + 4096 + 100;
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(bad)).unwrap();
    f.write_all(&[0xff]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let e = run(
        &open(&p),
        &spec,
        RunOptions { layout: false },
        &stop,
        &mut |_| {},
    )
    .unwrap_err();
    match e {
        BenchError::Verify { offset, reason } => {
            assert_eq!(offset, (3 << 20) + 4096);
            assert!(reason.contains("CRC32C"), "{reason}");
        }
        other => panic!("expected a verify error, got {other}"),
    }
}

#[test]
fn random_writes_with_verify_read_back_every_written_block() {
    let (_d, p) = common::temp_file(2 << 20, 0);
    let stop = AtomicBool::new(false);
    let spec = BenchSpec {
        rw: RwMode::RandWrite,
        verify: true,
        iodepth: 16,
        numjobs: 2,
        ..Default::default()
    };
    let r = run(&open(&p), &spec, RunOptions::default(), &stop, &mut |_| {}).unwrap();
    let w = &r.job().write;
    // Each job writes its 1 MiB slice's worth of 4 KiB blocks (with repeats: random offsets).
    assert_eq!(w.total_ios, 512);
    let verified = r.verified_blocks.unwrap();
    assert!(verified > 0 && verified <= 512, "{verified}");
    assert!(w.lat_ns.min > 0 && w.lat_ns.min <= w.lat_ns.max);
}

#[test]
fn stop_flag_ends_a_time_based_run() {
    let (_d, p) = common::temp_file(4 << 20, 0);
    let stop = AtomicBool::new(true);
    let spec = BenchSpec {
        rw: RwMode::RandRead,
        runtime: Some(std::time::Duration::from_secs(600)),
        time_based: true,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let r = run(&open(&p), &spec, RunOptions::default(), &stop, &mut |_| {}).unwrap();
    assert!(r.interrupted);
    // A 600 s run: well under it, however loaded the host.
    assert!(t.elapsed() < std::time::Duration::from_secs(120));
}
