//! `rio bench`'s options, through the binary's own parser (`rio_cli::args::Cli`): NUL-separated
//! arguments, then the workload they describe, checked against a target's geometry. Bad input
//! must come back as an error, never a panic.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use rio::target::Geometry;
use rio_cli::args::{Cli, Cmd};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let geometry = parts.next().unwrap_or("");
    let args = std::iter::once("rio".to_string()).chain(parts.map(str::to_string));
    let Ok(cli) = Cli::try_parse_from(args) else {
        return;
    };
    if let Cmd::Bench(a) = cli.cmd {
        for target in [None, Some(1000)] {
            if let Ok(spec) = a.spec(target) {
                // A geometry from the first field: size and logical block size.
                let mut g = geometry.split(',');
                let size = g
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(1 << 30);
                let lbs = g.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(512);
                if lbs.is_power_of_two() && (512..=65536).contains(&lbs) {
                    let geo = Geometry {
                        size,
                        block_size: lbs,
                        mem_align: 4096,
                    };
                    let _ = spec.resolve(&geo);
                }
            }
        }
    }
});
