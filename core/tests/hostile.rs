//! The driver against a hostile device: one script per misbehaviour of
//! `SimController::misbehave` (other command ids, arbitrary status fields and entries,
//! duplicates, drops, garbage EventIdx values) and mixed; the inputs the fuzzer
//! (`fuzz/fuzz_targets/hostile_device.rs`) finds become tests here. Every command
//! completes exactly once, with data or a typed error; nothing panics.

#[path = "support/hostile.rs"]
mod hostile;

use hostile::Harness;

/// `n` reads and writes of blocks 0.., then the script.
fn input(n: u8, script: &[u8]) -> Vec<u8> {
    let mut v = vec![n - 1];
    for i in 0..n {
        v.extend([i % 2, i, 0]);
    }
    v.extend_from_slice(script);
    v
}

#[test]
fn every_misbehaviour_alone() {
    let mut h = Harness::new();
    let scripts: &[(&str, &[u8])] = &[
        ("normal", &[0, 0, 0, 0]),
        ("another command id", &[1, 0x34, 0x12, 1, 0, 0]),
        (
            "arbitrary status",
            &[2, 0xff, 0xff, 2, 0x02, 0x00, 2, 0x81, 0x40],
        ),
        ("twice", &[3, 3, 3, 3]),
        ("never", &[4, 4]),
        (
            "arbitrary entry",
            &[5, 1, 2, 3, 4, 0xff, 0xff, 9, 0, 0, 0, 0x02, 0x80],
        ),
        (
            "sq head and id",
            &[6, 0xff, 0xff, 0x07, 0x00, 6, 0, 0, 1, 0],
        ),
        ("EventIdx", &[7, 0xff, 0xff, 0xff, 0xff, 7, 0, 0, 0, 0]),
    ];
    for (what, script) in scripts {
        let before = h.stats();
        h.run(&input(8, script))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!h.dead(), "{what}: the controller died");
        // The device did misbehave, and the driver saw it.
        let after = h.stats();
        let bad = after.bad_completions - before.bad_completions;
        let timeouts = after.timeouts - before.timeouts;
        match *what {
            "twice" | "another command id" | "arbitrary entry" | "sq head and id" => {
                assert!(bad > 0, "{what}: no bad completion counted: {after:?}")
            }
            "never" => assert!(timeouts >= 2, "{what}: {after:?}"),
            _ => {}
        }
    }
}

#[test]
fn a_mixed_script_and_a_device_that_drops_everything() {
    let mut h = Harness::new();
    let mixed: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for round in 0..4 {
        h.run(&input(16, &mixed[round * 16..])).unwrap();
        if h.dead() {
            h = Harness::new();
        }
    }
    // Every command dropped: each is aborted after its timeout and completes failed.
    h.run(&input(16, &[4; 16])).unwrap();
}

// A crash `scripts/fuzz` finds in `hostile_device` (its input in fuzz/artifacts/) becomes a
// test here: `Harness::new().run(&input)` must return `Ok`. None has been found so far.
