//! The `rio` binary, end to end: bad input gives one line on stderr, exit status 2, no panic
//! and no write; good input runs and reports.

#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{LoopDev, digest, sh, temp_file};

fn rio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rio"));
    c.env_remove("RIO_LOG").env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("RIO_") || k.starts_with("RUSTFS_") {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    rio().args(args).output().expect("run rio")
}

/// Assert exit status 2 with exactly one non-empty line on stderr containing `needle`.
fn assert_usage_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2; stderr: {err}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "stderr {:?} lacks {needle:?}",
        lines[0]
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A 1 MiB forced write to `dev`, which the tests expect to be refused.
fn forced_write(dev: &str) -> Output {
    run(&[
        "bench",
        "--filename",
        dev,
        "--rw",
        "write",
        "--force",
        "--size",
        "1m",
    ])
}

/// A file system mounted for the length of a test; unmounted on drop, also when it panics.
///
/// Read-only and without loading the journal (`ro,noload`): ext4 then writes nothing to the
/// device, neither at mount nor at unmount, so a digest taken before the mount judges what rio
/// did while it was mounted (a read-write mount rewrites the superblock on its own).
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(dev: &str) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        sh(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "ro,noload",
                dev,
                dir.path().to_str().unwrap(),
            ],
        );
        Mounted(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Each bad input on a real file: exit 2, one line, and the file is unchanged.
#[test]
fn bad_inputs_on_a_file() {
    let (_d, p) = temp_file(1 << 20, 0x5a);
    let f = p.to_str().unwrap();
    let before = digest(&p);
    let cases: &[(&[&str], &str)] = &[
        (&["--rw", "write", "--size", "2m"], "past the end"),
        (&["--rw", "write", "--offset", "2m"], "past the end"),
        (&["--rw", "write", "--bs", "1000"], "multiple of"),
        (&["--rw", "write", "--offset", "100"], "multiple of"),
        (&["--rw", "write", "--iodepth", "0"], "--iodepth"),
        (&["--rw", "write", "--iodepth", "100000"], "--iodepth"),
        (&["--rw", "write", "--numjobs", "0"], "--numjobs"),
        (&["--rw", "writ"], "unknown --rw"),
        (&["--rw", "write", "--bs", "4q"], "unknown unit"),
        (&["--rw", "write", "--bs", "64m"], "--bs"),
        (&["--rw", "write", "--runtime", "soon"], "not a duration"),
        (&["--rw", "write", "--time_based"], "needs --runtime"),
        (&["--rw", "randrw", "--rwmixread", "101"], "--rwmixread"),
        (&["--rw", "write", "--backend", "dpdk"], "--backend"),
        (
            &["--rw", "write", "--backend", "spdk"],
            "spdk backend drives nvme",
        ),
        (&["--rw", "write", "--direct", "2"], "--direct"),
        (
            &["--rw", "write", "--clocksource", "gettimeofday"],
            "--clocksource",
        ),
        (&["--rw", "write", "--nonsense"], "--nonsense"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["bench", "--filename", f];
        all.extend_from_slice(args);
        let out = run(&all);
        assert_usage_error(&out, needle);
        assert_eq!(digest(&p), before, "{args:?} wrote to the target");
    }
}

#[test]
fn bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    assert_usage_error(
        &run(&["bench", "--filename", missing.to_str().unwrap()]),
        "no such file",
    );
    assert!(!missing.exists(), "a missing target must not be created");
    assert_usage_error(
        &run(&["bench", "--filename", dir.path().to_str().unwrap()]),
        "directory",
    );
    assert_usage_error(
        &run(&["bench", "--filename", "/dev/null"]),
        "character device",
    );
    assert_usage_error(
        &run(&["bench", "--filename", missing.to_str().unwrap(), "--create"]),
        "--create needs --size",
    );
}

#[test]
fn bad_configuration() {
    let (_d, p) = temp_file(1 << 20, 0);
    let f = p.to_str().unwrap();
    let cfg = p.with_file_name("rio.toml");
    std::fs::write(&cfg, "queue_depth = = 3\n").unwrap();
    assert_usage_error(
        &run(&["--config", cfg.to_str().unwrap(), "bench", "--filename", f]),
        "rio.toml",
    );
    std::fs::write(&cfg, "queue_dept = 3\n").unwrap();
    assert_usage_error(
        &run(&["--config", cfg.to_str().unwrap(), "bench", "--filename", f]),
        "queue_dept",
    );
    assert_usage_error(
        &run(&[
            "--config",
            "/nonexistent/rio.toml",
            "bench",
            "--filename",
            f,
        ]),
        "config",
    );
    let out = rio()
        .args(["bench", "--filename", f])
        .env("RUSTFS_TARGET_LATENCY_US", "fast")
        .output()
        .unwrap();
    assert_usage_error(&out, "RUSTFS_TARGET_LATENCY_US");
    let out = rio()
        .args(["bench", "--filename", f])
        .env("RIO_BACKEND", "bogus")
        .output()
        .unwrap();
    assert_usage_error(&out, "RIO_BACKEND");
}

#[test]
fn immutable_file_refuses_writes() {
    if !common::is_root() {
        common::missing("root (chattr +i)");
        return;
    }
    let (_d, p) = temp_file(1 << 20, 7);
    if Command::new("chattr")
        .arg("+i")
        .arg(&p)
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        common::missing("chattr +i support on the test file system");
        return;
    }
    let before = digest(&p);
    let out = run(&["bench", "--filename", p.to_str().unwrap(), "--rw", "write"]);
    let _ = Command::new("chattr").arg("-i").arg(&p).status();
    assert_usage_error(&out, "cannot be opened for writing");
    assert_eq!(digest(&p), before);
}

#[test]
fn read_only_block_device_refuses_writes() {
    let Some(l) = LoopDev::read_only(16 << 20) else {
        return;
    };
    let out = run(&[
        "bench",
        "--filename",
        l.path.to_str().unwrap(),
        "--rw",
        "write",
        "--force",
    ]);
    assert_usage_error(&out, "cannot be opened for writing");
}

#[test]
fn block_device_writes_need_force_and_an_unused_device() {
    let Some(l) = LoopDev::new(64 << 20, 512) else {
        return;
    };
    let dev = l.path.to_str().unwrap();
    let before = digest(&l.backing);
    assert_usage_error(
        &run(&["bench", "--filename", dev, "--rw", "write", "--size", "1m"]),
        "--force",
    );
    assert_eq!(digest(&l.backing), before);
    // Reads need no --force.
    let out = run(&[
        "bench",
        "--filename",
        dev,
        "--rw",
        "randread",
        "--size",
        "4m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Mounted: refused even with --force, and says where.
    sh("mkfs.ext4", &["-q", "-F", dev]);
    let before = digest(&l.backing);
    let mnt = Mounted::new(dev);
    let out = forced_write(dev);
    drop(mnt);
    assert_usage_error(&out, "mounted on");
    assert_eq!(digest(&l.backing), before);

    // Swap: refused.
    sh("mkswap", &["-q", dev]);
    sh("swapon", &[dev]);
    let out = forced_write(dev);
    sh("swapoff", &[dev]);
    assert_usage_error(&out, "swap");

    // Unused and forced: writes and verifies.
    let out = run(&[
        "bench",
        "--filename",
        dev,
        "--rw",
        "randwrite",
        "--force",
        "--size",
        "8m",
        "--verify",
        "--output-format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["verified_blocks"].as_u64().unwrap() > 0);
}

#[test]
fn partition_in_use_blocks_whole_disk() {
    let Some(l) = LoopDev::new(64 << 20, 512) else {
        return;
    };
    let dev = l.path.to_str().unwrap();
    // One partition, then re-read the table so the kernel creates loopNp1.
    let mut sf = Command::new("sfdisk")
        .args(["-q", dev])
        .stdin(Stdio::piped())
        .spawn()
        .expect("sfdisk");
    use std::io::Write;
    sf.stdin.take().unwrap().write_all(b"2048,,L\n").unwrap();
    assert!(sf.wait().unwrap().success());
    sh("partx", &["-a", dev]);
    let part = format!("{dev}p1");
    for _ in 0..50 {
        if Path::new(&part).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sh("mkfs.ext4", &["-q", "-F", &part]);
    let before = digest(&l.backing);
    let mnt = Mounted::new(&part);
    let out = forced_write(dev);
    drop(mnt);
    let _ = Command::new("partx").args(["-d", dev]).status();
    assert_usage_error(&out, "p1 is mounted on");
    assert_eq!(
        digest(&l.backing),
        before,
        "the refused write changed the disk"
    );
}

#[test]
fn default_target_runs_and_is_removed() {
    let dir = tempfile::tempdir_in(common::backing_dir()).unwrap();
    let out = rio()
        .args([
            "bench",
            "--size",
            "32m",
            "--runtime",
            "1",
            "--output-format",
            "json",
        ])
        .env("RIO_BENCH_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = &v["jobs"][0];
    assert!(job["read"]["iops"].as_f64().unwrap() > 0.0);
    for p in [
        "50.000000",
        "90.000000",
        "95.000000",
        "99.000000",
        "99.900000",
        "99.990000",
    ] {
        assert!(
            job["read"]["lat_ns"]["percentile"][p].as_u64().unwrap() > 0,
            "{p}"
        );
    }
    assert!(
        job["read"]["lat_ns"]["min"].as_u64().unwrap()
            <= job["read"]["lat_ns"]["max"].as_u64().unwrap()
    );
    assert!(job["usr_cpu"].as_f64().is_some() && job["sys_cpu"].as_f64().is_some());
    // Where the CPU went: the job thread, by its name, with the time it ran.
    let threads = v["cpu_by_thread"].as_array().expect("cpu_by_thread");
    if std::path::Path::new("/proc/thread-self/schedstat").exists() {
        let job0 = threads
            .iter()
            .find(|t| t["name"] == "rio-job-0")
            .unwrap_or_else(|| panic!("no rio-job-0 in {threads:?}"));
        assert!(job0["cpu_s"].as_f64().unwrap() > 0.0, "{threads:?}");
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no per-thread schedstat"
        );
        eprintln!("skipped the per-thread CPU check: no /proc/thread-self/schedstat");
    }
    assert!(v["sink_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["backend"]["backend"], "uring");
    assert!(v["layout_seconds"].as_f64().is_some());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary bench file left behind"
    );
}

#[test]
fn verify_mixed_workload_both_backends() {
    // rio creates the file (and marks it), so both runs may write it without --force.
    let d = tempfile::tempdir_in(common::backing_dir()).unwrap();
    let p = d.path().join("mixed.dat");
    for (i, backend) in ["uring", "psync"].into_iter().enumerate() {
        let create: &[&str] = if i == 0 {
            &["--create", "--size", "16m"]
        } else {
            &[]
        };
        let out = run(&[
            &[
                "bench",
                "--filename",
                p.to_str().unwrap(),
                "--rw",
                "randrw",
                "--verify",
                "--numjobs",
                "2",
                "--iodepth",
                "16",
                "--backend",
                backend,
                "--output-format",
                "json",
            ][..],
            create,
        ]
        .concat());
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["backend"]["backend"], backend);
        assert!(v["verified_blocks"].as_u64().unwrap() > 0);
        assert!(v["jobs"][0]["write"]["total_ios"].as_u64().unwrap() > 0);
        assert!(v["jobs"][0]["read"]["total_ios"].as_u64().unwrap() > 0);
    }
}

/// An existing file rio did not lay out, or one whose permission bits deny writing, is
/// written only with --force: refused with exit 2 and one line naming it, before anything is
/// written. Files rio creates carry its marker, and later write runs on them need nothing.
#[test]
fn existing_files_rio_did_not_lay_out_need_force() {
    let (_d, p) = temp_file(1 << 20, 0x5a);
    let f = p.to_str().unwrap();
    let before = digest(&p);
    for args in [
        &["--rw", "write"][..],
        &["--rw", "randrw"][..],
        // A verified read lays the file out first: that writes too.
        &["--rw", "randread", "--verify"][..],
    ] {
        let out = run(&[&["bench", "--filename", f][..], args].concat());
        assert_usage_error(&out, "--force");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("did not lay out"),
            "{args:?}"
        );
        assert_eq!(digest(&p), before, "{args:?} wrote to the user's file");
    }
    let out = run(&[
        "tune",
        "--filename",
        f,
        "--rw",
        "randwrite",
        "--step",
        "100ms",
    ]);
    assert_usage_error(&out, "--force");
    assert_eq!(digest(&p), before);
    // Reads need nothing, and change nothing.
    let out = run(&["bench", "--filename", f, "--rw", "randread", "--size", "1m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(digest(&p), before);
    // --force: the user offered it.
    let out = run(&["bench", "--filename", f, "--rw", "write", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(digest(&p), before);

    // A file rio creates is marked, and written again without --force.
    let d = tempfile::tempdir_in(common::backing_dir()).unwrap();
    let mine = d.path().join("mine.dat");
    let m = mine.to_str().unwrap();
    let out = run(&[
        "bench",
        "--filename",
        m,
        "--create",
        "--size",
        "2m",
        "--rw",
        "write",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !rio_cli::bench::guard::is_marked(&mine) {
        common::missing("user extended attributes on the test file system (rio's marker)");
        return;
    }
    let out = run(&["bench", "--filename", m, "--rw", "randwrite", "--verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Its permission bits deny writing: refused, also for root, unless forced.
    let mut perm = std::fs::metadata(&mine).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
    std::fs::set_permissions(&mine, perm).unwrap();
    let before = digest(&mine);
    let out = run(&["bench", "--filename", m, "--rw", "write"]);
    assert_usage_error(&out, "--force");
    assert!(String::from_utf8_lossy(&out.stderr).contains("mode 0444"));
    assert_eq!(digest(&mine), before);
    if common::is_root() {
        let out = run(&["bench", "--filename", m, "--rw", "write", "--force"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn human_output_names_backend_and_percentiles() {
    let (_d, p) = temp_file(8 << 20, 0);
    let out = run(&[
        "bench",
        "--filename",
        p.to_str().unwrap(),
        "--rw",
        "read",
        "--bs",
        "128k",
    ]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("backend: uring"), "{s}");
    assert!(s.contains("p99.99="), "{s}");
    assert!(s.contains("IOPS="), "{s}");
    assert!(s.contains("  clock: "), "{s}");
}

/// The clock a run used is reported, and `--clocksource` chooses it: `clock_gettime` when
/// asked; with `auto`, the TSC exactly where the kernel keeps time with it.
#[test]
fn the_bench_reports_the_clock_it_used() {
    let (_d, p) = temp_file(8 << 20, 0);
    let source = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--filename",
            p.to_str().unwrap(),
            "--rw",
            "randread",
            "--output-format",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["jobs"][0]["read"]["iops"].as_f64().unwrap() > 0.0, "{v}");
        (
            v["clock"]["source"].as_str().unwrap().to_string(),
            v["options"]["clocksource"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        source(&["--clocksource", "clock_gettime"]),
        ("clock_gettime".to_string(), "clock_gettime".to_string())
    );
    // The kernel's clocksource, read on both sides of the run: its watchdog may switch it
    // meanwhile, and then either answer is right.
    let tsc = || {
        cfg!(target_arch = "x86_64")
            && std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .is_ok_and(|c| c.trim() == "tsc")
    };
    let before = tsc();
    let (used, asked) = source(&[]);
    let after = tsc();
    assert_eq!(asked, "auto");
    if before == after {
        let want = if before { "cpu" } else { "clock_gettime" };
        assert_eq!(used, want);
    } else {
        assert!(used == "cpu" || used == "clock_gettime", "{used}");
    }
}

#[test]
fn ctrl_c_prints_the_result_so_far() {
    let (_d, p) = temp_file(16 << 20, 0);
    let child = rio()
        .args([
            "bench",
            "--filename",
            p.to_str().unwrap(),
            "--runtime",
            "600",
            "--time_based",
            "--output-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill with a valid pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "run did not stop on SIGINT (a 600 s run; the bound is generous for a loaded host)"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["interrupted"], true);
    assert!(v["jobs"][0]["read"]["total_ios"].as_u64().unwrap() > 0);
}

/// Install a seccomp filter that refuses io_uring_setup with EPERM, as Docker's default
/// profile does, in the child before exec.
fn deny_io_uring(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe; the filter program lives on the closure's stack during the call.
    unsafe {
        cmd.pre_exec(|| {
            const SYS_IO_URING_SETUP: u32 = 425;
            const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
            let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
            let prog = [
                f(0x20, 0, 0, 4), // ld arch
                f(0x15, 0, 3, AUDIT_ARCH_X86_64),
                f(0x20, 0, 0, 0), // ld nr
                f(0x15, 0, 1, SYS_IO_URING_SETUP),
                f(0x06, 0, 0, 0x0005_0000 | libc::EPERM as u32), // ret ERRNO(EPERM)
                f(0x06, 0, 0, 0x7fff_0000),                      // ret ALLOW
            ];
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &fprog as *const _ as usize, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn seccomp_refusal_falls_back_to_psync_and_explicit_uring_fails() {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    let (_d, p) = temp_file(8 << 20, 0);
    let mut c = rio();
    c.args([
        "bench",
        "--filename",
        p.to_str().unwrap(),
        "--output-format",
        "json",
    ])
    .env("RIO_LOG", "info");
    deny_io_uring(&mut c);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backend"]["backend"], "psync");
    assert!(v["backend"]["reason"].as_str().unwrap().contains("refused"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("backend selected") && log.contains("psync"),
        "{log}"
    );

    let mut c = rio();
    c.args([
        "bench",
        "--filename",
        p.to_str().unwrap(),
        "--backend",
        "uring",
    ]);
    deny_io_uring(&mut c);
    assert_usage_error(&c.output().unwrap(), "backend uring is unavailable");
}

/// A bench stopped (SIGSTOP) across the end of its ramp and past the end its runtime would
/// have had still measures I/Os: the measured phase lasts `--runtime` from the reap that
/// starts it. (It used to end before it began when the first reap after the ramp came after
/// `ramp + runtime`: a starved host's `total_ios` of 0; at depth 1 that reap holds the only
/// I/O.) Wherever the stop lands, the I/O issued at the start of the measured phase completes
/// inside it.
#[test]
fn a_bench_starved_across_the_end_of_its_ramp_still_measures() {
    let child = rio()
        .args([
            "bench",
            "--filename",
            "sim://size=64m,data=0",
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "1",
            "--ramp_time",
            "1",
            "--runtime",
            "1",
            "--time_based",
            "--output-format",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run rio");
    let pid = child.id() as libc::pid_t;
    std::thread::sleep(std::time::Duration::from_millis(700));
    // SAFETY: signals to the child this test started and still owns (not yet waited for).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_millis(1800));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = child.wait_with_output().expect("wait for rio");
    assert!(
        out.status.success(),
        "rio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let ios = r["jobs"][0]["read"]["total_ios"]
        .as_u64()
        .expect("total_ios");
    assert!(ios > 0, "no I/O measured: {r}");
}
