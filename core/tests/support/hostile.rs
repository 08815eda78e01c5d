//! The driver against a hostile device (`SimController::misbehave`): shared by
//! `core/tests/hostile.rs` (fixed scripts, one per behaviour, and every crash the fuzzer found)
//! and the fuzz target `fuzz/fuzz_targets/hostile_device.rs` (arbitrary scripts).
//!
//! Input: byte 0 is the number of commands (1..=16, mod 16), then 3 bytes per command
//! (kind: read, write or flush; a block number), then the device's script. Judged: every
//! command completes exactly once (with data or a typed error) within a generous bound,
//! nothing completes that was not submitted, and nothing panics.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rio::nvme::sim::{SimConfig, SimNamespace};
use rio::target::OpenOptions;
use rio::{Engine, EngineConfig, Error, Queue};

const BS: u64 = 512;
const BLOCKS: u64 = 8192;

pub struct Harness {
    // Field order: the queue goes before its engine.
    queue: Queue,
    engine: Engine,
}

impl Harness {
    pub fn new() -> Harness {
        let cfg = EngineConfig {
            hugepages: false,
            buffer_pool_bytes: 8 << 20,
            queue_depth: 32,
            // Short timeouts: a dropped command is aborted after 20 ms, a controller that
            // does not answer its admin queue is reset after 200 ms.
            nvme_timeout_ms: 20,
            nvme_admin_timeout_ms: 200,
            ..EngineConfig::default()
        };
        let sim = SimConfig {
            namespaces: vec![SimNamespace {
                block_size: BS as u32,
                size_bytes: BS * BLOCKS,
            }],
            max_io_queues: 4,
            ..SimConfig::default()
        };
        let rw = OpenOptions {
            write: true,
            direct: true,
            create: false,
        };
        let engine = Engine::open_sim(&cfg, sim, 1, rw).expect("driver brings up the model");
        let queue = engine.queue(None).expect("a queue pair");
        Harness { queue, engine }
    }

    /// The driver's counters for the harness's queue.
    pub fn stats(&self) -> rio::NvmeQueueStats {
        self.queue.nvme_stats().expect("an NVMe queue")
    }

    /// Whether the controller gave up (a reset failed): the harness must be built again.
    pub fn dead(&self) -> bool {
        self.engine.controller().is_some_and(|c| c.is_dead())
    }

    /// Runs one input; `Err` describes a broken invariant.
    pub fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let (n, rest) = match input.split_first() {
            Some((n, rest)) => ((*n as usize % 16) + 1, rest),
            None => return Ok(()),
        };
        let ops: Vec<(u8, u64)> = rest
            .chunks(3)
            .take(n)
            .map(|c| {
                let kind = c[0] % 3;
                let block = u16::from_le_bytes([
                    c.get(1).copied().unwrap_or(0),
                    c.get(2).copied().unwrap_or(0),
                ]) as u64
                    % (BLOCKS - 8);
                (kind, block)
            })
            .collect();
        let script = rest.get(ops.len() * 3..).unwrap_or(&[]);
        let sim = self
            .engine
            .controller()
            .and_then(|c| c.sim())
            .expect("a model");
        sim.misbehave(script);
        let q = &mut self.queue;
        let mut expected: HashMap<u64, u32> = HashMap::new();
        for (token, &(kind, block)) in ops.iter().enumerate() {
            let token = token as u64;
            let r = match kind {
                0 => {
                    let b = q.alloc_buf(4096).map_err(|e| format!("alloc: {e}"))?;
                    q.submit_read(block * BS, b, token).map_err(|r| r.error)
                }
                1 => {
                    let mut b = q.alloc_buf(4096).map_err(|e| format!("alloc: {e}"))?;
                    b.fill(token as u8);
                    q.submit_write(block * BS, b, token).map_err(|r| r.error)
                }
                _ => q.submit_flush(token),
            };
            match r {
                Ok(()) => {
                    expected.insert(token, 0);
                }
                // Refused at submission (the queue is being revived after a reset, or the
                // controller is dead): a typed error, and nothing to wait for.
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while expected.values().any(|&n| n == 0) {
            if Instant::now() > deadline {
                sim.misbehave(&[]);
                return Err(format!("commands never completed: {expected:?}"));
            }
            match q.wait(1, Duration::from_millis(100), &mut out) {
                Ok(_) | Err(Error::BadNvmeCompletion { .. }) => {}
                // Typed errors (a dead controller included): what was outstanding must still
                // come back, failed, exactly once.
                Err(e) => {
                    let _ = e.to_string();
                }
            }
            for c in out.drain(..) {
                match expected.get_mut(&c.token) {
                    Some(n) => {
                        *n += 1;
                        if *n > 1 {
                            sim.misbehave(&[]);
                            return Err(format!("token {} completed twice", c.token));
                        }
                        if let Err(e) = &c.result {
                            let _ = e.to_string();
                        }
                    }
                    None => {
                        sim.misbehave(&[]);
                        return Err(format!("completion for unknown token {}", c.token));
                    }
                }
            }
        }
        sim.misbehave(&[]);
        // Nothing more may surface: duplicates and strays were the driver's to drop.
        for _ in 0..3 {
            let _ = q.poll(&mut out);
            if let Some(c) = out.first() {
                return Err(format!(
                    "a completion after every command finished: token {}",
                    c.token
                ));
            }
        }
        Ok(())
    }
}
