//! The workload of a benchmark, in fio's vocabulary, and its validation against the target.

use std::time::Duration;

use rio::error::{Error, Result};
use rio::target::Geometry;

/// fio's `--rw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
}

impl RwMode {
    pub fn parse(s: &str) -> std::result::Result<RwMode, String> {
        Ok(match s {
            "read" => RwMode::Read,
            "write" => RwMode::Write,
            "randread" => RwMode::RandRead,
            "randwrite" => RwMode::RandWrite,
            "randrw" => RwMode::RandRw,
            _ => {
                return Err(format!(
                    "unknown --rw '{s}' (expected read, write, randread, randwrite or randrw)"
                ));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::RandRead => "randread",
            RwMode::RandWrite => "randwrite",
            RwMode::RandRw => "randrw",
        }
    }

    pub fn random(self) -> bool {
        matches!(self, RwMode::RandRead | RwMode::RandWrite | RwMode::RandRw)
    }

    pub fn writes(self) -> bool {
        matches!(self, RwMode::Write | RwMode::RandWrite | RwMode::RandRw)
    }

    pub fn reads(self) -> bool {
        matches!(self, RwMode::Read | RwMode::RandRead | RwMode::RandRw)
    }

    /// Percentage of reads.
    pub fn read_percent(self, rwmixread: u32) -> u32 {
        match self {
            RwMode::Read | RwMode::RandRead => 100,
            RwMode::Write | RwMode::RandWrite => 0,
            RwMode::RandRw => rwmixread,
        }
    }
}

/// A benchmark workload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchSpec {
    pub rw: RwMode,
    /// Percentage of reads for `randrw`.
    pub rwmixread: u32,
    /// Block size in bytes.
    pub bs: u32,
    /// Operations in flight per job.
    pub iodepth: u32,
    /// Jobs (threads, each with its own queue, pinned one per core).
    pub numjobs: u32,
    /// Bytes of the region each job works on (and does, unless time-based). 0: to the end.
    pub size: u64,
    /// Start of the region.
    pub offset: u64,
    /// Stop after this long (measured after the ramp).
    #[serde(with = "opt_secs")]
    pub runtime: Option<Duration>,
    /// Keep going over the region until `runtime` passes.
    pub time_based: bool,
    /// Run this long before measuring.
    #[serde(with = "secs")]
    pub ramp_time: Duration,
    /// Write verifiable blocks and check what is read back.
    pub verify: bool,
    /// Seed of offsets and data.
    pub seed: u64,
    /// `--iodepth auto`: the tuner picks each window's depth within `1..=iodepth`.
    pub auto: Option<super::autotune::AutoDepth>,
    /// The per-I/O clock (fio's `clocksource`).
    pub clocksource: super::clock::ClockSource,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

mod opt_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

impl Default for BenchSpec {
    fn default() -> Self {
        BenchSpec {
            rw: RwMode::RandRead,
            rwmixread: 50,
            bs: 4096,
            iodepth: 32,
            numjobs: 1,
            size: 0,
            offset: 0,
            runtime: None,
            time_based: false,
            ramp_time: Duration::ZERO,
            verify: false,
            seed: 0x5249_4f21,
            auto: None,
            clocksource: super::clock::ClockSource::Auto,
        }
    }
}

/// Largest `--iodepth` accepted.
pub const MAX_IODEPTH: u32 = 4096;
/// Largest `--numjobs` accepted.
pub const MAX_JOBS: u32 = 256;
/// Largest `--bs` accepted (the largest buffer class).
pub const MAX_BS: u32 = 1 << rio::buf::MAX_CLASS_SHIFT;

fn bad(name: &str, reason: impl Into<String>) -> Error {
    Error::config(name, reason)
}

impl BenchSpec {
    /// Checks that need no target.
    pub fn validate(&self) -> Result<()> {
        if self.iodepth == 0 || self.iodepth > MAX_IODEPTH {
            return Err(bad(
                "--iodepth",
                format!("expected 1..={MAX_IODEPTH}, got {}", self.iodepth),
            ));
        }
        if self.numjobs == 0 || self.numjobs > MAX_JOBS {
            return Err(bad(
                "--numjobs",
                format!("expected 1..={MAX_JOBS}, got {}", self.numjobs),
            ));
        }
        if self.bs == 0 || self.bs > MAX_BS {
            return Err(bad(
                "--bs",
                format!("expected 1..={MAX_BS} bytes, got {}", self.bs),
            ));
        }
        if self.rwmixread > 100 {
            return Err(bad(
                "--rwmixread",
                format!("expected 0..=100, got {}", self.rwmixread),
            ));
        }
        if let Some(a) = &self.auto
            && a.target_p99.is_zero()
        {
            return Err(bad("--lat-target", "must be above zero"));
        }
        if self.time_based && self.runtime.is_none() {
            return Err(bad("--time_based", "needs --runtime"));
        }
        if self.verify && (self.bs as usize) < super::verify::HEADER {
            return Err(bad(
                "--bs",
                format!(
                    "--verify needs blocks of at least {} bytes",
                    super::verify::HEADER
                ),
            ));
        }
        Ok(())
    }

    /// Resolve `size` against the target and check alignment and range. Returns the region
    /// size in bytes.
    pub fn resolve(&self, geo: &Geometry) -> Result<u64> {
        let lbs = geo.block_size as u64;
        if !(self.bs as u64).is_multiple_of(lbs) {
            return Err(Error::Alignment {
                what: "--bs",
                value: self.bs as u64,
                align_name: "target's logical block size",
                align: lbs,
            });
        }
        if !self.offset.is_multiple_of(lbs) {
            return Err(Error::Alignment {
                what: "--offset",
                value: self.offset,
                align_name: "target's logical block size",
                align: lbs,
            });
        }
        if self.offset >= geo.size {
            return Err(Error::OutOfRange {
                offset: self.offset,
                len: self.size,
                size: geo.size,
            });
        }
        let size = if self.size == 0 {
            geo.size - self.offset
        } else {
            self.size
        };
        match self.offset.checked_add(size) {
            Some(end) if end <= geo.size => {}
            _ => {
                return Err(Error::OutOfRange {
                    offset: self.offset,
                    len: size,
                    size: geo.size,
                });
            }
        }
        let per_job = if self.verify {
            size / self.numjobs as u64
        } else {
            size
        };
        if self.verify && per_job / self.bs as u64 <= self.iodepth as u64 {
            return Err(bad(
                "--size",
                format!(
                    "--verify needs more blocks per job than --iodepth ({} blocks of {} bytes, iodepth {})",
                    per_job / self.bs as u64,
                    self.bs,
                    self.iodepth
                ),
            ));
        }
        if per_job < self.bs as u64 {
            return Err(bad(
                "--size",
                format!(
                    "region of {per_job} bytes per job is smaller than one block of --bs {}",
                    self.bs
                ),
            ));
        }
        Ok(size)
    }
}

/// Parse fio-style durations: `10` (seconds), `500ms`, `10s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 10, 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" | "sec" => v,
        "ms" | "msec" => v / 1000.0,
        "us" | "usec" => v / 1e6,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("'{s}' has an unknown unit '{unit}'")),
    };
    if !secs.is_finite() || !(0.0..=31_536_000.0).contains(&secs) {
        return Err(format!("'{s}' is out of range (0 to 1 year)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            block_size: 512,
            mem_align: 512,
            size: 1 << 30,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn validation() {
        let mut s = BenchSpec::default();
        s.validate().unwrap();
        s.iodepth = 0;
        assert!(s.validate().unwrap_err().to_string().contains("--iodepth"));
        s.iodepth = 100_000;
        assert!(s.validate().is_err());
        s = BenchSpec {
            time_based: true,
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }

    #[test]
    fn resolve_against_geometry() {
        let s = BenchSpec::default();
        assert_eq!(s.resolve(&geo()).unwrap(), 1 << 30);
        let s = BenchSpec {
            bs: 1000,
            ..Default::default()
        };
        let e = s.resolve(&geo()).unwrap_err().to_string();
        assert!(e.contains("--bs 1000") && e.contains("512"), "{e}");
        let s = BenchSpec {
            offset: 1 << 29,
            size: 1 << 30,
            ..Default::default()
        };
        assert!(matches!(s.resolve(&geo()), Err(Error::OutOfRange { .. })));
        let s = BenchSpec {
            offset: 100,
            ..Default::default()
        };
        assert!(s.resolve(&geo()).is_err());
    }
}
