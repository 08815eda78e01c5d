//! `rio bench --report` and `--otel` end to end: report files, and export to a real collector
//! (rotel, from PyPI: `pip install rotel`). Without rotel-agent the collector test skips with
//! a message, and fails under CI=true.

#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIM: &str = "sim://size=256m,data=0";

fn rio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rio"));
    c.env_remove("RIO_LOG").env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k.starts_with("RIO_OTEL") {
            c.env_remove(k);
        }
    }
    c
}

fn bench(extra: &[&str]) -> std::process::Output {
    rio()
        .args([
            "bench",
            "--filename",
            SIM,
            "--iodepth",
            "8",
            "--runtime",
            "1",
        ])
        .arg("--time_based")
        .args(extra)
        .output()
        .expect("run rio")
}

#[test]
fn report_svg_and_html() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["svg", "html"] {
        let p = dir.path().join(format!("run.{ext}"));
        let out = bench(&["--report", p.to_str().unwrap(), "--output-format", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&p).expect("report written");
        // The run's own windows say how many heat-map columns there are (one per 100 ms
        // window that closed: fewer on a loaded host, so not a fixed count).
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON result");
        let mut cols: Vec<i64> = v["series"]
            .as_array()
            .expect("a series")
            .iter()
            .map(|p| (p["t"].as_f64().expect("t") * 10.0).round() as i64)
            .collect();
        cols.sort_unstable();
        cols.dedup();
        assert!(!cols.is_empty(), "no window in the result");
        for title in rio_cli::bench::plot::TITLES {
            assert!(text.contains(title), "{ext} report lacks '{title}'");
        }
        // One outer <svg> for the .svg file, plus one per plot.
        let svgs = text.matches("<svg").count();
        assert_eq!(svgs, if ext == "svg" { 7 } else { 6 }, "{ext}");
        // The heat map draws 64 LBA rows per column; the histogram draws bars.
        let rects = text.matches("<rect").count();
        assert!(
            rects > 64 * cols.len(),
            "{ext}: {rects} rects, {} columns",
            cols.len()
        );
        // Line plots: CDF, IOPS, p99, depth.
        assert!(text.matches("<polyline").count() >= 4, "{ext}");
        if ext == "html" {
            assert!(text.starts_with("<!DOCTYPE html>"));
            assert!(text.contains("<table class=\"summary\">") && text.contains("IOPS"));
        } else {
            assert!(text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
            assert!(text.trim_end().ends_with("</svg>"));
        }
    }
}

#[test]
fn report_bad_extension_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.png");
    let t0 = Instant::now();
    let out = rio()
        .args([
            "bench",
            "--filename",
            SIM,
            "--runtime",
            "120",
            "--time_based",
        ])
        .args(["--report", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".html or .svg"), "{err}");
    // Refused before the 120 s run (a loaded host takes well under a minute to start and
    // stop a process).
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the run did not start"
    );
    assert!(!p.exists());
}

#[test]
fn log_format_json_flag() {
    let out = rio()
        .env("RIO_LOG", "info")
        .args(["--log-format", "json"])
        .args([
            "bench",
            "--filename",
            SIM,
            "--runtime",
            "200ms",
            "--time_based",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON log line in: {err}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("log line is JSON");
    assert!(v["level"].is_string() && v["fields"].is_object(), "{v}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rotel_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROTEL_AGENT") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.is_file()).then_some(p)
}

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn export_reaches_rotel_over_http_and_grpc() {
    let Some(agent) = rotel_agent() else {
        common::missing("rotel-agent (pip install rotel)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for proto in ["http/protobuf", "grpc"] {
        let (gp, hp) = (free_port(), free_port());
        let log = dir
            .path()
            .join(format!("rotel-{}.log", proto.replace('/', "-")));
        let child = Command::new(&agent)
            .args(["start", "--exporter", "blackhole"])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{gp}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{hp}")])
            .args(["--debug-log", "metrics"])
            .args(["--debug-log-verbosity", "detailed"])
            .args(["--pid-file", dir.path().join("rotel.pid").to_str().unwrap()])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rotel-agent");
        let _agent = Agent(child);
        let port = if proto == "grpc" { gp } else { hp };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "rotel did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = rio()
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", proto)
            .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
            .args([
                "bench",
                "--filename",
                SIM,
                "--iodepth",
                "16",
                "--runtime",
                "2",
            ])
            .args(["--time_based", "--otel"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains(" 0 dropped"), "{proto}: {err}");
        // The debug exporter writes each batch as it arrives; give it a moment.
        let t0 = Instant::now();
        let text = loop {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            if t.contains("Name: rio.io.duration\n") || t0.elapsed() > Duration::from_secs(5) {
                break t;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            text.contains("Name: rio.io.duration\n"),
            "{proto}: no histogram"
        );
        assert!(text.contains("DataType: Histogram"));
        for g in ["p50", "p95", "p99", "p999"] {
            assert!(
                text.contains(&format!("Name: rio.io.duration.{g}\n")),
                "{proto}: no {g}"
            );
        }
        // Plausible values: the last p99 above zero and at least the last p50.
        let last = |name: &str| -> f64 {
            let at = text.rfind(&format!("Name: {name}\n")).unwrap();
            let v = text[at..]
                .lines()
                .find(|l| l.starts_with("Value: "))
                .unwrap();
            v["Value: ".len()..].trim().parse().unwrap()
        };
        let (p50, p99) = (last("rio.io.duration.p50"), last("rio.io.duration.p99"));
        assert!(
            p99 > 0.0 && p99 >= p50 && p99 < 1.0,
            "{proto}: p50 {p50} p99 {p99}"
        );
        let at = text.rfind("Name: rio.io.duration\n").unwrap();
        let count: u64 = text[at..]
            .lines()
            .find(|l| l.starts_with("Count: "))
            .unwrap()["Count: ".len()..]
            .trim()
            .parse()
            .unwrap();
        assert!(count > 1000, "{proto}: histogram count {count}");
    }
}
