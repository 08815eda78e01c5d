//! Telemetry tests against an in-process OTLP/HTTP receiver (decodes what rio sends).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1 as pm;
use prost::Message;

use super::*;
use rio::window::Window;

/// A minimal OTLP/HTTP receiver: keeps every metrics request body, answers 200.
struct Receiver {
    port: u16,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let metrics = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (m, p) = (Arc::clone(&metrics), Arc::clone(&paths));
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                let (m, p) = (Arc::clone(&m), Arc::clone(&p));
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; len];
                        if r.read_exact(&mut body).is_err() {
                            return;
                        }
                        if path.ends_with("/v1/metrics") {
                            m.lock()
                                .unwrap()
                                .push(ExportMetricsServiceRequest::decode(&body[..]).unwrap());
                        }
                        p.lock().unwrap().push(path);
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        Receiver {
            port,
            metrics,
            paths,
        }
    }

    /// The last request's metrics by name.
    fn last(&self) -> HashMap<String, pm::Metric> {
        let reqs = self.metrics.lock().unwrap();
        let mut out = HashMap::new();
        if let Some(req) = reqs.last() {
            for rm in &req.resource_metrics {
                for sm in &rm.scope_metrics {
                    for m in &sm.metrics {
                        out.insert(m.name.clone(), m.clone());
                    }
                }
            }
        }
        out
    }
}

fn cfg_for(endpoint: &str) -> TelemetryConfig {
    let env = |k: &str| match k {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.to_string()),
        "OTEL_METRIC_EXPORT_INTERVAL" => Some("60000".into()),
        "OTEL_EXPORTER_OTLP_TIMEOUT" => Some("1000".into()),
        _ => None,
    };
    let mut c = TelemetryConfig::resolve(&EngineConfig::default(), &env).unwrap();
    c.eval_interval = Duration::from_millis(20);
    c
}

/// A window of `n` reads at `lat_ns` (and one write at 4x).
fn window(job: u32, n: u64, lat_ns: u64, depth: u32) -> Window {
    let mut w = Window::new(job);
    for i in 0..n {
        w.record(OpKind::Read, 4096, lat_ns + i % 7, (i % 64) as usize);
    }
    w.record(OpKind::Write, 8192, lat_ns * 4, 0);
    w.len = Duration::from_millis(100);
    w.iodepth = depth;
    w.batch = 1;
    w
}

fn gauge(m: &pm::Metric, dir: &str) -> f64 {
    let Some(pm::metric::Data::Gauge(g)) = &m.data else {
        panic!("{} is not a gauge", m.name)
    };
    let p = g
        .data_points
        .iter()
        .find(|p| {
            p.attributes.iter().any(|a| {
                a.key == names::ATTR_DIRECTION
                    && format!("{:?}", a.value).contains(&format!("\"{dir}\""))
            })
        })
        .unwrap_or_else(|| panic!("{} has no {dir} point", m.name));
    match p.value {
        Some(pm::number_data_point::Value::AsDouble(v)) => v,
        Some(pm::number_data_point::Value::AsInt(v)) => v as f64,
        None => panic!("no value"),
    }
}

fn sum(m: &pm::Metric) -> i64 {
    let Some(pm::metric::Data::Sum(s)) = &m.data else {
        panic!("{} is not a sum", m.name)
    };
    s.data_points
        .iter()
        .map(|p| match p.value {
            Some(pm::number_data_point::Value::AsInt(v)) => v,
            _ => 0,
        })
        .sum()
}

#[test]
fn config_precedence() {
    let mut cfg = EngineConfig {
        otel_endpoint: Some("http://cfg:9999/".into()),
        otel_protocol: Some("grpc".into()),
        otel_interval_ms: 700,
        ..EngineConfig::default()
    };
    let none = |_: &str| None;
    let c = TelemetryConfig::resolve(&cfg, &none).unwrap();
    assert_eq!(c.protocol, Protocol::Grpc);
    assert_eq!(c.metrics_endpoint, "http://cfg:9999");
    assert_eq!(c.export_interval, Duration::from_millis(700));

    let env = |k: &str| match k {
        "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/protobuf".into()),
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4318".into()),
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some("http://t:1/x".into()),
        "OTEL_METRIC_EXPORT_INTERVAL" => Some("1500".into()),
        _ => None,
    };
    let c = TelemetryConfig::resolve(&cfg, &env).unwrap();
    assert_eq!(c.protocol, Protocol::HttpProtobuf);
    assert_eq!(c.metrics_endpoint, "http://env:4318/v1/metrics");
    assert_eq!(c.traces_endpoint, "http://t:1/x");
    assert_eq!(c.export_interval, Duration::from_millis(1500));

    cfg.otel_protocol = None;
    cfg.otel_endpoint = None;
    let c = TelemetryConfig::resolve(&cfg, &none).unwrap();
    assert_eq!(c.metrics_endpoint, "http://localhost:4318/v1/metrics");
    assert_eq!(c.timeout, Duration::from_secs(10));

    let bad = |k: &str| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "http/json".to_string());
    let e = TelemetryConfig::resolve(&cfg, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("http/json"), "{e}");
    let bad = |k: &str| (k == "OTEL_METRIC_EXPORT_INTERVAL").then(|| "soon".to_string());
    assert!(TelemetryConfig::resolve(&cfg, &bad).is_err());
    let bad = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "localhost:4318".to_string());
    assert!(TelemetryConfig::resolve(&cfg, &bad).is_err());
}

#[test]
fn exports_histogram_percentiles_counters_and_depth_changes() {
    let rx = Receiver::start();
    let mut cfg = cfg_for(&format!("http://127.0.0.1:{}", rx.port));
    cfg.traces = false;
    let t = Telemetry::start(cfg).unwrap();
    let sink = t.sink("nvme", "sim://test");
    // Two jobs, 1000 reads at ~50 µs each per window; job 1 changes its depth once.
    for i in 0..10 {
        sink.window(&window(0, 1000, 50_000, 32));
        sink.window(&window(1, 1000, 50_000, if i < 5 { 32 } else { 16 }));
    }
    sink.io_error(
        0,
        &IoError {
            op: OpKind::Read,
            offset: 0,
            len: 4096,
            kind: IoErrorKind::Os(libc::EIO),
        },
    );
    let stats = t.shutdown();
    assert_eq!(stats.windows, 20);
    assert_eq!(stats.dropped_windows, 0);
    assert!(stats.exports >= 1, "{stats:?}");
    assert_eq!(stats.failed_exports, 0);

    let m = rx.last();
    let h = &m[names::IO_DURATION];
    assert_eq!(h.unit, "s");
    let Some(pm::metric::Data::Histogram(hd)) = &h.data else {
        panic!("not a histogram")
    };
    let read = hd
        .data_points
        .iter()
        .find(|p| format!("{:?}", p.attributes).contains("\"read\""))
        .unwrap();
    assert_eq!(read.count, 20_000);
    assert_eq!(read.bucket_counts.iter().sum::<u64>(), 20_000);
    assert_eq!(read.bucket_counts.len(), read.explicit_bounds.len() + 1);
    let mean = read.sum.unwrap() / read.count as f64;
    assert!((mean - 50e-6).abs() < 1e-6, "{mean}");
    assert!(format!("{:?}", read.attributes).contains("sim://test"));

    let p50 = gauge(&m[names::IO_DURATION_P50], "read");
    let p99 = gauge(&m[names::IO_DURATION_P99], "read");
    let p99w = gauge(&m[names::IO_DURATION_P99], "write");
    assert!((49e-6..51e-6).contains(&p50), "{p50}");
    assert!(p99 >= p50 && p99 < 51e-6, "{p99}");
    assert!((199e-6..201e-6).contains(&p99w), "{p99w}");
    for name in [names::IO_DURATION_P95, names::IO_DURATION_P999] {
        assert!(gauge(&m[name], "read") >= p50);
    }
    assert_eq!(sum(&m[names::IO_OPERATIONS]), 20_020);
    assert_eq!(sum(&m[names::IO_BYTES]), 20_000 * 4096 + 20 * 8192);
    assert_eq!(sum(&m[names::IO_ERRORS]), 1);
    assert!(format!("{:?}", m[names::IO_ERRORS]).contains("os_EIO"));
    assert_eq!(sum(&m[names::TUNER_DECISIONS]), 1);
    assert!(format!("{:?}", m[names::TUNER_DECISIONS]).contains("\"down\""));
    let Some(pm::metric::Data::Gauge(d)) = &m[names::QUEUE_DEPTH].data else {
        panic!()
    };
    let depths: Vec<_> = d
        .data_points
        .iter()
        .map(|p| match p.value {
            Some(pm::number_data_point::Value::AsInt(v)) => v,
            _ => -1,
        })
        .collect();
    assert!(depths.contains(&32) && depths.contains(&16), "{depths:?}");
    assert!(m.contains_key(names::CPU_PER_IO));
    assert!(m.contains_key(names::IO_IOPS));
    assert!(m.contains_key(names::DROPPED));
    assert!(rx.paths.lock().unwrap().iter().all(|p| p == "/v1/metrics"));
}

#[test]
fn a_down_collector_costs_counted_drops_not_stalls() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = cfg_for(&format!("http://127.0.0.1:{port}"));
    cfg.export_interval = Duration::from_millis(50);
    cfg.queue_windows = 4;
    let t = Telemetry::start(cfg).unwrap();
    let sink = t.sink("uring", "/dev/null");
    let w = window(0, 100, 10_000, 8);
    let t0 = Instant::now();
    for _ in 0..2000 {
        sink.window(&w);
    }
    let per = t0.elapsed() / 2000;
    // Each call copies ~a hundred values and try-sends: far below a millisecond.
    assert!(per < Duration::from_millis(1), "{per:?} per window");
    std::thread::sleep(Duration::from_millis(300));
    let s = t.stats();
    assert!(s.dropped_windows > 0, "{s:?}");
    assert!(s.failed_exports > 0, "{s:?}");
    let t1 = Instant::now();
    let s = t.shutdown();
    assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());
    assert_eq!(s.exports, 0);
}

#[test]
fn alerts_and_trends_through_the_pipeline() {
    let rx = Receiver::start();
    let mut cfg = cfg_for(&format!("http://127.0.0.1:{}", rx.port));
    cfg.traces = false;
    cfg.rules.p99_target_us = Some(10);
    cfg.target_latency_us = Some(10);
    let t = Telemetry::start(cfg).unwrap();
    let sink = t.sink("nvme", "sim://a");
    // p99 1 ms against a 10 µs target, for many 20 ms intervals.
    for _ in 0..12 {
        sink.window(&window(0, 500, 1_000_000, 4));
        std::thread::sleep(Duration::from_millis(25));
    }
    let alerts = t.recent_alerts();
    assert!(
        alerts.iter().any(|a| a.kind == AlertKind::P99AboveTarget),
        "{alerts:?}"
    );
    let trends = t.get_performance_trends();
    assert!(
        trends.iter().any(|x| x.metric == names::IO_IOPS),
        "{trends:?}"
    );
    let s = t.shutdown();
    assert!(s.alerts >= 1);
    let m = rx.last();
    assert!(format!("{:?}", m[names::ALERTS]).contains("p99_above_target"));
    // Buckets are dense around the 10 µs target.
    let Some(pm::metric::Data::Histogram(h)) = &m[names::IO_DURATION].data else {
        panic!()
    };
    assert!(h.data_points[0].explicit_bounds.contains(&10e-6));
}

#[test]
fn pool_occupancy_gauges() {
    use rio::pool::{PagePolicy, PoolConfig};
    let rx = Receiver::start();
    let mut cfg = cfg_for(&format!("http://127.0.0.1:{}", rx.port));
    cfg.traces = false;
    let t = Telemetry::start(cfg).unwrap();
    let pools = Pools::new(
        PoolConfig {
            classes: vec![4096],
            initial_per_class: 4,
            max_bytes_per_core: 1 << 20,
            pages: PagePolicy::Normal,
            ..PoolConfig::default()
        },
        &[0],
    )
    .unwrap();
    t.watch_pools(Arc::clone(&pools));
    let held: Vec<_> = (0..3).map(|_| pools.get(0, 4096, None).unwrap()).collect();
    t.shutdown();
    let m = rx.last();
    let val = |name: &str| -> f64 {
        let Some(pm::metric::Data::Gauge(g)) = &m[name].data else {
            panic!("{name}")
        };
        match g.data_points[0].value {
            Some(pm::number_data_point::Value::AsInt(v)) => v as f64,
            Some(pm::number_data_point::Value::AsDouble(v)) => v,
            None => -1.0,
        }
    };
    assert_eq!(val(names::POOL_IN_USE), 3.0);
    let cap = val(names::POOL_CAPACITY);
    assert!(cap >= 4.0, "{cap}");
    assert!((val(names::POOL_UTILIZATION) - 3.0 / cap).abs() < 1e-9);
    drop(held);
}

#[test]
fn error_types_name_the_status() {
    use rio::nvme::spec::{NvmeError, Status};
    assert_eq!(error_type(&IoErrorKind::Os(libc::EIO)), "os_EIO");
    assert_eq!(error_type(&IoErrorKind::Os(9999)), "os_errno9999");
    assert_eq!(
        error_type(&IoErrorKind::Nvme(NvmeError::new(
            false,
            2,
            Status::new(2, 0x81)
        ))),
        "nvme_sct0x2_sc0x81"
    );
    assert_eq!(
        error_type(&IoErrorKind::TimedOut { after_ms: 1 }),
        "timed_out"
    );
}

#[test]
fn every_metric_is_documented() {
    let doc = include_str!("../../docs/TELEMETRY.md");
    for (name, inst, unit) in names::METRICS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("docs/TELEMETRY.md has no row for {name}"));
        assert!(
            row.contains(inst) && row.contains(&format!("`{unit}`")),
            "{row}"
        );
    }
    let dash = include_str!("../../grafana/rio-dashboard.json");
    let v: serde_json::Value = serde_json::from_str(dash).expect("dashboard is JSON");
    assert!(v["panels"].as_array().is_some_and(|p| p.len() >= 6));
    for name in [
        names::IO_DURATION,
        names::IO_DURATION_P99,
        names::IO_IOPS,
        names::QUEUE_DEPTH,
        names::IO_ERRORS,
        names::ALERTS,
    ] {
        let prom = name.replace('.', "_");
        assert!(dash.contains(&prom), "dashboard lacks {name}");
    }
}
