//! Power loss, on the software model's volatile write cache (`SimConfig::write_cache`) through
//! the real driver: what a Flush made durable survives a cut, what it did not is lost block by
//! block (never torn inside a block), and the driver gets the controller back by itself.

mod common;

use common::{pattern, read_back, write_pattern};

use rio::nvme::sim::{PowerCut, PowerCutReport, SimConfig, SimNamespace};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, Error, IoErrorKind, Queue};

const BS: u64 = 4096;
const RW: OpenOptions = OpenOptions {
    write: true,
    direct: true,
    create: false,
};

fn engine() -> Engine {
    engine_over(BS as u32, 16 << 20, true)
}

/// The real driver over a model of one namespace; `write_cache`: model what a cut loses.
fn engine_over(block_size: u32, size_bytes: u64, write_cache: bool) -> Engine {
    let cfg = EngineConfig {
        hugepages: false,
        buffer_pool_bytes: 16 << 20,
        ..EngineConfig::default()
    };
    let sim = SimConfig {
        namespaces: vec![SimNamespace {
            block_size,
            size_bytes,
        }],
        write_cache,
        ..SimConfig::default()
    };
    Engine::open_sim(&cfg, sim, 1, RW).expect("driver brings up the model")
}

fn cut(e: &Engine, how: PowerCut) -> PowerCutReport {
    e.controller()
        .and_then(|c| c.sim())
        .expect("a model behind the engine")
        .power_cut(how)
        .expect("the model carries out the cut")
}

/// Reads `len` bytes at `off`, retrying while the driver recovers from the cut: the first
/// command after it finds the controller not ready and fails with a typed error, the reset
/// that follows brings the queue back.
fn read_after_cut(q: &mut Queue, off: u64, len: usize) -> (Vec<u8>, u32) {
    let mut failures = 0;
    loop {
        let b = q.alloc_buf(len).unwrap();
        match q.read(off, b) {
            Ok(b) => return (b.as_slice().to_vec(), failures),
            Err(Error::Io(e)) if matches!(e.kind, IoErrorKind::ControllerReset { .. }) => {
                failures += 1;
                assert!(
                    failures < 5,
                    "the driver did not get the controller back: {e}"
                );
            }
            Err(e) => panic!("read after the cut: {e}"),
        }
    }
}

/// Blocks `[first, first + n)` written with `seed` as one command each of `per` blocks.
fn write_blocks(q: &mut Queue, first: u64, n: u64, per: u64, seed: u8) {
    let mut b = first;
    while b < first + n {
        let k = per.min(first + n - b);
        write_pattern(q, b * BS, (k * BS) as usize, seed);
        b += k;
    }
}

#[test]
fn flushed_data_survives_and_unflushed_blocks_are_lost_whole() {
    for seed in [1u64, 2, 3, 0xdead_beef] {
        let e = engine();
        let mut q = e.queue(None).unwrap();
        // Blocks 0..64: seed 1, flushed (durable).
        write_blocks(&mut q, 0, 64, 8, 1);
        q.flush().unwrap();
        // Then, unflushed: blocks 0..32 rewritten with seed 2 (in 4-block commands, so a cut
        // can tear a command), blocks 64..96 written for the first time with seed 3.
        write_blocks(&mut q, 0, 32, 4, 2);
        write_blocks(&mut q, 64, 32, 4, 3);
        // Read back before the cut: the cache serves the newest data.
        assert_eq!(read_back(&mut q, 0, 4096), pattern(0, 4096, 2));

        let r = cut(&e, PowerCut::Torn { seed });
        let unflushed: Vec<(u32, u64)> = (0..32).chain(64..96).map(|b| (1, b)).collect();
        let mut seen: Vec<(u32, u64)> = r.lost.iter().chain(&r.kept).copied().collect();
        seen.sort_unstable();
        assert_eq!(
            seen, unflushed,
            "the cut accounts for exactly the unflushed blocks"
        );
        assert!(
            !r.lost.is_empty() && !r.kept.is_empty(),
            "seed {seed}: {r:?}"
        );

        let (_, failures) = read_after_cut(&mut q, 32 * BS, BS as usize);
        assert!(
            failures >= 1,
            "the first read after the cut must fail: it was in no queue"
        );
        let stats = q.nvme_stats().expect("an NVMe queue");
        assert!(
            stats.resets >= 1,
            "the driver reset the controller: {stats:?}"
        );
        for b in 0..96u64 {
            let got = read_back(&mut q, b * BS, BS as usize);
            let lost = r.lost.contains(&(1, b));
            let want = match b {
                // Flushed and not written since: always there.
                32..64 => pattern(b * BS, BS as usize, 1),
                0..32 if lost => pattern(b * BS, BS as usize, 1),
                0..32 => pattern(b * BS, BS as usize, 2),
                _ if lost => vec![0; BS as usize],
                _ => pattern(b * BS, BS as usize, 3),
            };
            assert!(got == want, "seed {seed}: block {b} (lost: {lost})");
        }
        // Acknowledged after a Flush, once more: survives a cut that loses everything.
        write_blocks(&mut q, 200, 16, 16, 9);
        q.flush().unwrap();
        let r = cut(&e, PowerCut::LoseAll);
        assert_eq!(r, PowerCutReport::default(), "nothing unflushed");
        let (got, _) = read_after_cut(&mut q, 200 * BS, (16 * BS) as usize);
        assert_eq!(got, pattern(200 * BS, (16 * BS) as usize, 9));
    }
}

#[test]
fn lose_all_reverts_every_unflushed_block_and_keeps_nothing() {
    let e = engine();
    let mut q = e.queue(None).unwrap();
    write_blocks(&mut q, 0, 16, 16, 5);
    q.flush().unwrap();
    write_blocks(&mut q, 8, 16, 2, 6);
    let r = cut(&e, PowerCut::LoseAll);
    assert_eq!(r.lost, (8..24).map(|b| (1, b)).collect::<Vec<_>>());
    assert!(r.kept.is_empty());
    let (got, _) = read_after_cut(&mut q, 0, (24 * BS) as usize);
    let mut want = pattern(0, (16 * BS) as usize, 5);
    want.extend(vec![0; (8 * BS) as usize]);
    assert!(got == want);
    // The queue keeps working after the reset, writes and all.
    write_pattern(&mut q, 0, 8192, 7);
    assert_eq!(read_back(&mut q, 0, 8192), pattern(0, 8192, 7));
}

#[test]
fn without_the_cache_model_a_cut_loses_nothing_and_the_driver_recovers() {
    let e = engine_over(512, 4 << 20, false);
    let mut q = e.queue(None).unwrap();
    write_pattern(&mut q, 0, 65536, 4);
    let r = cut(&e, PowerCut::LoseAll);
    assert_eq!(r, PowerCutReport::default());
    let (got, _) = read_after_cut(&mut q, 0, 65536);
    assert_eq!(got, pattern(0, 65536, 4));
    // A second queue opened after the cut works from the start.
    let mut q2 = e.queue(None).unwrap();
    assert_eq!(read_back(&mut q2, 0, 512), pattern(0, 512, 4));
}

#[test]
fn a_queue_opened_after_a_cut_gets_the_controller_back_first() {
    let e = engine();
    {
        let mut q = e.queue(None).unwrap();
        write_blocks(&mut q, 0, 8, 8, 3);
        q.flush().unwrap();
    }
    // No queue is open to notice the cut: the next queue pair's creation must (admin commands
    // to a controller that lost power would only time out).
    cut(&e, PowerCut::LoseAll);
    let mut q = e
        .queue(None)
        .expect("a queue pair on the controller, reset after the cut");
    assert_eq!(
        read_back(&mut q, 0, 8 * BS as usize),
        pattern(0, 8 * BS as usize, 3)
    );
}
