//! After a power cut, `rio bench --verify-only` names exactly the blocks that did not
//! survive: the bench's verified writes on the software model with its volatile write cache
//! modelled, a Flush after the first region only, a cut, and a verify-only pass over both.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;

use rio::nvme::sim::{PowerCut, SimConfig, SimNamespace};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, Error};
use rio_cli::bench::run::RunOptions;
use rio_cli::bench::{BenchSpec, Progress, RwMode, check, run};

const BS: u64 = 4096;
const REGION: u64 = 2 << 20;

fn engine() -> Engine {
    let cfg = EngineConfig {
        hugepages: false,
        buffer_pool_bytes: 16 << 20,
        ..EngineConfig::default()
    };
    let sim = SimConfig {
        namespaces: vec![SimNamespace {
            block_size: BS as u32,
            size_bytes: 8 << 20,
        }],
        write_cache: true,
        ..SimConfig::default()
    };
    let rw = OpenOptions {
        write: true,
        direct: true,
        create: false,
    };
    Engine::open_sim(&cfg, sim, 1, rw).expect("driver brings up the model")
}

/// A sequential verified write of `[offset, offset + REGION)`, each block once.
fn write_region(e: &Engine, offset: u64) {
    let spec = BenchSpec {
        rw: RwMode::Write,
        bs: BS as u32,
        iodepth: 8,
        size: REGION,
        offset,
        verify: true,
        ..Default::default()
    };
    let r = run(
        e,
        &spec,
        RunOptions { layout: false },
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .expect("the write run");
    assert_eq!(r.verified_blocks, Some(REGION / BS));
}

/// The first command after a cut finds the controller not ready; the reset that follows
/// brings it back. One read on a queue of its own takes that hit.
fn recover(e: &Engine) {
    let mut q = e.queue(None).unwrap();
    for _ in 0..5 {
        let b = q.alloc_buf(BS as usize).unwrap();
        match q.read(0, b) {
            Ok(_) => return,
            Err(Error::Io(_)) => continue,
            Err(e) => panic!("read after the cut: {e}"),
        }
    }
    panic!("the driver did not get the controller back");
}

#[test]
fn verify_only_after_a_cut_reports_exactly_the_unflushed_blocks_lost() {
    for how in [
        PowerCut::LoseAll,
        PowerCut::Torn { seed: 7 },
        PowerCut::Torn { seed: 99 },
    ] {
        let e = engine();
        // Region A, then a Flush: durable. Region B: written, never flushed.
        write_region(&e, 0);
        e.queue(None).unwrap().flush().unwrap();
        write_region(&e, REGION);
        let report = e
            .controller()
            .and_then(|c| c.sim())
            .expect("a model")
            .power_cut(how)
            .expect("the cut");
        let b_blocks: BTreeSet<u64> = (REGION / BS..2 * REGION / BS).collect();
        let unflushed: BTreeSet<u64> = report
            .lost
            .iter()
            .chain(&report.kept)
            .map(|x| x.1)
            .collect();
        assert_eq!(
            unflushed, b_blocks,
            "{how:?}: the cut saw exactly region B unflushed"
        );
        recover(&e);

        let spec = BenchSpec {
            rw: RwMode::Read,
            bs: BS as u32,
            iodepth: 16,
            size: 2 * REGION,
            ..Default::default()
        };
        let r = check::check_region(&e, &spec, &AtomicBool::new(false), &Progress::default())
            .expect("the verify-only pass");
        assert_eq!(r.blocks, 2 * REGION / BS);
        let bad: BTreeSet<u64> = r.bad_blocks.iter().map(|b| b.offset / BS).collect();
        let lost: BTreeSet<u64> = report.lost.iter().map(|x| x.1).collect();
        assert_eq!(r.bad as usize, lost.len(), "{how:?}");
        assert_eq!(
            bad, lost,
            "{how:?}: verify-only names exactly the lost blocks"
        );
        if how == PowerCut::LoseAll {
            assert_eq!(lost, b_blocks);
        } else {
            assert!(
                !lost.is_empty() && lost.len() < b_blocks.len(),
                "{how:?}: {}",
                lost.len()
            );
        }
        // A lost block of B was never on the medium: no header at all.
        assert!(
            r.bad_blocks
                .iter()
                .all(|b| b.reason.contains("no rio verify header"))
        );
    }
}
