//! `rio bench --verify-only`: read a region that earlier `--verify` runs wrote and check every
//! block's header (magic, offset, block size, CRC32C over header and data), without writing
//! anything (fio's `verify_only`). Unlike the verify phase of a write run it does not stop at
//! the first bad block: it reports each one, so after a crash or a power cut it names exactly
//! the blocks that did not survive.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

use super::run::{BenchError, Phase, Progress};
use super::spec::BenchSpec;
use super::verify;
use rio::engine::Engine;
use rio::error::Error;

/// The most bad blocks listed one by one; all are counted.
pub const MAX_LISTED: usize = 1000;

/// One block that failed its check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadBlock {
    pub offset: u64,
    pub reason: String,
}

/// What a verify-only pass found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// First byte checked and bytes checked.
    pub offset: u64,
    pub size: u64,
    pub bs: u32,
    /// Blocks read and checked.
    pub blocks: u64,
    /// Blocks that failed.
    pub bad: u64,
    /// The first [`MAX_LISTED`] found (reads complete about in offset order), sorted.
    pub bad_blocks: Vec<BadBlock>,
    pub seconds: f64,
    /// Stopped early (Ctrl-C): `blocks` says how far it got.
    pub interrupted: bool,
}

impl CheckReport {
    /// The summary for a terminal.
    pub fn to_human(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "verify-only: {} blocks of {} B checked from offset {} in {:.2}s: {} bad{}\n",
            self.blocks,
            self.bs,
            self.offset,
            self.seconds,
            self.bad,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        for b in self.bad_blocks.iter().take(20) {
            let _ = writeln!(s, "  bad block at offset {}: {}", b.offset, b.reason);
        }
        if self.bad > 20 {
            let _ = writeln!(
                s,
                "  ... {} more (the JSON output lists up to {MAX_LISTED})",
                self.bad - 20
            );
        }
        s
    }
}

/// Reads `spec`'s region (`offset`, `size`, `bs`) with `iodepth` reads in flight and checks
/// every block. I/O errors end the pass (they are not data verdicts); bad blocks do not.
pub fn check_region(
    engine: &Engine,
    spec: &BenchSpec,
    stop: &AtomicBool,
    prog: &Progress,
) -> Result<CheckReport, BenchError> {
    spec.validate()?;
    let region = spec.resolve(&engine.target().geometry)?;
    let bs = spec.bs as u64;
    let nblocks = region / bs;
    let depth = spec.iodepth.max(1);
    let t0 = Instant::now();
    let mut q = engine.queue_sized(depth, super::run::arena_for(depth, bs))?;
    let mut free = Vec::with_capacity(depth as usize);
    for _ in 0..depth {
        free.push(q.alloc_buf(bs as usize)?);
    }
    prog.set_phase(Phase::Verify);
    prog.total.store(nblocks * bs, Relaxed);
    let mut report = CheckReport {
        offset: spec.offset,
        size: nblocks * bs,
        bs: spec.bs,
        blocks: 0,
        bad: 0,
        bad_blocks: Vec::new(),
        seconds: 0.0,
        interrupted: false,
    };
    let mut next = 0u64;
    let mut done = Vec::new();
    loop {
        while next < nblocks && !stop.load(Relaxed) {
            let Some(b) = free.pop() else { break };
            let off = spec.offset + next * bs;
            q.submit_read(off, b, off)
                .map_err(|r| BenchError::Setup(r.error))?;
            next += 1;
        }
        if q.in_flight() == 0 {
            break;
        }
        q.wait(1, rio::queue::DEFAULT_WAIT, &mut done)?;
        for c in done.drain(..) {
            let off = c.token;
            c.result.map_err(Error::from)?;
            let buf = c.buf.expect("a read returns its buffer");
            if let Err(reason) = verify::check_block(buf.as_slice(), off, None) {
                report.bad += 1;
                if report.bad_blocks.len() < MAX_LISTED {
                    report.bad_blocks.push(BadBlock {
                        offset: off,
                        reason,
                    });
                }
            }
            report.blocks += 1;
            prog.bytes.fetch_add(bs, Relaxed);
            free.push(buf);
        }
    }
    report.interrupted = stop.load(Relaxed) && report.blocks < nblocks;
    report.bad_blocks.sort_by_key(|b| b.offset);
    report.seconds = t0.elapsed().as_secs_f64();
    prog.set_phase(Phase::Done);
    Ok(report)
}
