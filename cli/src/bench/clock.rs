//! The bench's per-I/O clock (fio's `clocksource`).
//!
//! A job reads its clock once per reaped batch, at the first completion, before the next I/O
//! goes out: that reading is both the latency end of what completed and the submission stamp
//! of what is issued next, so it sits on the path between a completion and the next command.
//! `clock_gettime` costs 20-25 ns on hardware and ~110 ns in the TCG guest, where it cost the
//! QD1 loop up to 15% of its IOPS (0-15% over 11 runs) against up to 4% for the CPU's
//! time-stamp counter (docs/DESIGN.md, "The bench's clock"). SPDK's `spdk_nvme_perf` stamps
//! with the TSC, as fio does with `clocksource=cpu`.
//!
//! The TSC is used only where the kernel keeps time with it (its current clocksource is
//! `tsc`): the kernel has then checked that it runs at a constant rate, through idle states,
//! and in step on every CPU. Its rate is measured once per process against CLOCK_MONOTONIC
//! over 20 ms (the error is the bracketing clock reads' width over 20 ms: parts per million).
//! Elsewhere, or with `--clocksource clock_gettime`, the job reads CLOCK_MONOTONIC.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `--clocksource`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockSource {
    /// The CPU's counter where the kernel trusts it, else `clock_gettime`.
    #[default]
    Auto,
    /// The CPU's time-stamp counter; an error where it cannot be trusted.
    Cpu,
    /// CLOCK_MONOTONIC.
    ClockGettime,
}

impl ClockSource {
    pub fn parse(s: &str) -> Result<ClockSource, String> {
        match s {
            "auto" => Ok(ClockSource::Auto),
            "cpu" => Ok(ClockSource::Cpu),
            "clock_gettime" => Ok(ClockSource::ClockGettime),
            _ => Err(format!(
                "'{s}': expected auto, cpu or clock_gettime (fio's gettimeofday is not offered)"
            )),
        }
    }
}

/// The clock a run uses, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClockReport {
    /// `cpu` or `clock_gettime`.
    pub source: &'static str,
    pub reason: String,
    /// The counter's measured rate, with `cpu`.
    pub tsc_mhz: Option<f64>,
}

/// The resolved clock: nanoseconds per TSC tick in 32.32 fixed point, or none.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mult: Option<u64>,
}

impl Clock {
    /// The clock `want` asks for on this host; `Err` only for `cpu` where the TSC cannot be
    /// trusted.
    pub fn resolve(want: ClockSource) -> Result<(Clock, ClockReport), String> {
        let mono = |reason: String| {
            (
                Clock { mult: None },
                ClockReport {
                    source: "clock_gettime",
                    reason,
                    tsc_mhz: None,
                },
            )
        };
        if want == ClockSource::ClockGettime {
            return Ok(mono("asked for (--clocksource clock_gettime)".into()));
        }
        match tsc_calibration() {
            Ok(mult) => Ok((
                Clock { mult: Some(mult) },
                ClockReport {
                    source: "cpu",
                    reason: format!(
                        "the CPU's time-stamp counter, which the kernel keeps time with{}",
                        if want == ClockSource::Cpu {
                            " (--clocksource cpu)"
                        } else {
                            ""
                        }
                    ),
                    tsc_mhz: Some((1u128 << 32) as f64 / mult as f64 * 1e3),
                },
            )),
            Err(why) if want == ClockSource::Cpu => Err(format!(
                "--clocksource cpu: {why}; use auto or clock_gettime"
            )),
            Err(why) => Ok(mono(format!("clock_gettime: {why}"))),
        }
    }

    /// A job's clock, starting now.
    pub fn start(self) -> JobClock {
        JobClock {
            t0: Instant::now(),
            tsc0: self.mult.map_or(0, |_| tsc()),
            clock: self,
        }
    }
}

/// Nanoseconds since a job's start.
#[derive(Clone, Copy, Debug)]
pub struct JobClock {
    /// The start on CLOCK_MONOTONIC, and on the TSC when `clock` uses it.
    t0: Instant,
    tsc0: u64,
    clock: Clock,
}

impl JobClock {
    /// The same clock, counting from now.
    pub fn restart(self) -> JobClock {
        self.clock.start()
    }

    /// Nanoseconds since the job started (0 if the clock reads earlier).
    #[inline]
    pub fn now_ns(&self) -> u64 {
        match self.clock.mult {
            Some(mult) => ticks_to_ns(tsc().saturating_sub(self.tsc0), mult),
            None => since(self.t0, Instant::now()),
        }
    }
}

#[inline]
fn ticks_to_ns(ticks: u64, mult: u64) -> u64 {
    // 128-bit product: an hour of a 5 GHz counter (2^44 ticks) times a 32.32 multiplier
    // overflows 64 bits.
    ((ticks as u128 * mult as u128) >> 32) as u64
}

/// Nanoseconds from `t0` to `t` (0 if `t` is earlier).
#[inline]
fn since(t0: Instant, t: Instant) -> u64 {
    // In u64 (585 years of nanoseconds), not `as_nanos`' u128.
    let d = t.saturating_duration_since(t0);
    d.as_secs() * 1_000_000_000 + u64::from(d.subsec_nanos())
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn tsc() -> u64 {
    // SAFETY: RDTSC reads a counter and has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn tsc() -> u64 {
    0
}

/// Nanoseconds per tick (32.32); why not, where the TSC cannot be trusted. The kernel's
/// clocksource is read at every call (its watchdog can drop the TSC while a process lives);
/// the rate is measured once per process.
fn tsc_calibration() -> Result<u64, String> {
    static RATE: OnceLock<Result<u64, String>> = OnceLock::new();
    if !cfg!(target_arch = "x86_64") {
        return Err("no time-stamp counter on this architecture".into());
    }
    let cs = kernel_clocksource().map_err(|e| {
        format!("cannot read {CLOCKSOURCE} ({e}), so the TSC is not known to be trusted")
    })?;
    if cs != "tsc" {
        return Err(format!(
            "the kernel keeps time with {cs}, not the TSC (not known constant and in step across CPUs)"
        ));
    }
    RATE.get_or_init(|| calibrate(Duration::from_millis(20)))
        .clone()
}

const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";

/// The clock the kernel keeps time with (`tsc`, `hpet`, `kvm-clock`, ...).
fn kernel_clocksource() -> std::io::Result<String> {
    std::fs::read_to_string(CLOCKSOURCE).map(|s| s.trim().to_string())
}

/// The TSC's rate against CLOCK_MONOTONIC over `span`.
fn calibrate(span: Duration) -> Result<u64, String> {
    // A counter reading and the monotonic time at it: the middle of the tightest of a few
    // bracketing pairs of clock reads.
    let pair = || {
        let mut best: Option<(Duration, Instant, u64)> = None;
        for _ in 0..8 {
            let a = Instant::now();
            let c = tsc();
            let b = Instant::now();
            let w = b - a;
            if best.is_none_or(|(bw, _, _)| w < bw) {
                best = Some((w, a + w / 2, c));
            }
        }
        let (_, t, c) = best.expect("eight tries");
        (t, c)
    };
    let (t0, c0) = pair();
    std::thread::sleep(span);
    let (t1, c1) = pair();
    let ns = since(t0, t1);
    let ticks = c1.wrapping_sub(c0);
    // 100 MHz to 10 GHz: anything else is not a working counter.
    if ticks < ns / 10 || ticks > ns.saturating_mul(10) {
        return Err(format!(
            "the TSC moved {ticks} ticks in {ns} ns, not a plausible rate"
        ));
    }
    Ok((((ns as u128) << 32) / ticks as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_convert_with_the_measured_rate_without_overflow() {
        // 3 GHz: 1/3 ns per tick.
        let mult = ((1u128 << 32) / 3) as u64;
        assert_eq!(ticks_to_ns(3_000, mult), 999);
        // An hour of a 5 GHz counter still converts (2^44 ticks).
        let five = ((1u128 << 32) / 5) as u64;
        let ns = ticks_to_ns(18_000_000_000_000, five);
        assert!(
            (3_599_999_000_000..=3_600_000_000_000).contains(&ns),
            "{ns}"
        );
    }

    #[test]
    fn the_source_names_parse_and_others_are_refused() {
        assert_eq!(ClockSource::parse("auto"), Ok(ClockSource::Auto));
        assert_eq!(ClockSource::parse("cpu"), Ok(ClockSource::Cpu));
        assert_eq!(
            ClockSource::parse("clock_gettime"),
            Ok(ClockSource::ClockGettime)
        );
        assert!(ClockSource::parse("gettimeofday").is_err());
    }

    #[test]
    fn clock_gettime_is_used_when_asked_and_counts_from_the_start() {
        let (c, r) = Clock::resolve(ClockSource::ClockGettime).unwrap();
        assert_eq!(r.source, "clock_gettime");
        let j = c.start();
        let a = j.now_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = j.now_ns();
        assert!(b >= a + 2_000_000, "{a} {b}");
    }

    #[test]
    fn the_tsc_clock_agrees_with_clock_monotonic_where_the_kernel_trusts_it() {
        let tsc_before = kernel_clocksource().is_ok_and(|c| c == "tsc");
        let resolved = Clock::resolve(ClockSource::Cpu);
        let tsc_after = kernel_clocksource().is_ok_and(|c| c == "tsc");
        let (c, r) = match resolved {
            Ok(x) => x,
            Err(why) => {
                // Only a host whose kernel did not keep time with the TSC may get here (read
                // on both sides: the kernel's watchdog may switch clocksource meanwhile).
                assert!(!(tsc_before && tsc_after), "refused on a TSC host: {why}");
                assert!(why.contains("--clocksource cpu"), "{why}");
                eprintln!("not run here: {why}");
                return;
            }
        };
        assert_eq!(r.source, "cpu");
        // The job's start on the counter lies between `s0` and `s1`, and its reading below
        // between `b0` and `b1`: the elapsed time it reports lies in [b0 - s1, b1 - s0],
        // whatever the host's scheduling did meanwhile; a rate off by more than 1% falls
        // outside.
        let s0 = Instant::now();
        let j = c.start();
        let s1 = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let b0 = Instant::now();
        let ns = j.now_ns();
        let b1 = Instant::now();
        let (lo, hi) = (since(s1, b0), since(s0, b1));
        let slack = hi / 100;
        assert!(
            ns + slack >= lo && ns <= hi + slack,
            "tsc {ns} ns, monotonic {lo}..{hi} ns"
        );
    }
}
