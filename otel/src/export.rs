//! OTLP export: the SDK's collected metrics, encoded with `opentelemetry-proto`, plus the
//! latency histograms built from the hdrhistograms, sent over HTTP/protobuf (blocking reqwest,
//! on the SDK's reader thread) or gRPC (tonic, on a one-worker tokio runtime). No retries: a
//! batch the collector does not take is dropped and counted. Spans go through
//! `opentelemetry-otlp`'s span exporter.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::{KeyValue, Value};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1 as pc;
use opentelemetry_proto::tonic::metrics::v1 as pm;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use prost::Message;

use super::names::IO_DURATION;
use super::{Protocol, Shared, TelemetryConfig, TelemetryError, lock};

/// Where export batches go.
pub(crate) enum Transport {
    Http {
        client: reqwest::blocking::Client,
        url: String,
    },
    Grpc {
        rt: Arc<tokio::runtime::Runtime>,
        client: MetricsServiceClient<tonic::transport::Channel>,
        timeout: Duration,
    },
}

impl Transport {
    pub(crate) fn new(
        cfg: &TelemetryConfig,
        rt: Option<&Arc<tokio::runtime::Runtime>>,
    ) -> Result<Transport, TelemetryError> {
        let err = |reason: String| TelemetryError::Exporter {
            what: "metrics",
            reason,
        };
        match (cfg.protocol, rt) {
            (Protocol::HttpProtobuf, _) => Ok(Transport::Http {
                client: reqwest::blocking::Client::builder()
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.timeout)
                    .build()
                    .map_err(|e| err(e.to_string()))?,
                url: cfg.metrics_endpoint.clone(),
            }),
            (Protocol::Grpc, Some(rt)) => {
                let _guard = rt.enter();
                let channel = tonic::transport::Channel::from_shared(cfg.metrics_endpoint.clone())
                    .map_err(|e| err(format!("endpoint {}: {e}", cfg.metrics_endpoint)))?
                    .connect_timeout(cfg.timeout)
                    .timeout(cfg.timeout)
                    .connect_lazy();
                Ok(Transport::Grpc {
                    rt: Arc::clone(rt),
                    client: MetricsServiceClient::new(channel),
                    timeout: cfg.timeout,
                })
            }
            (Protocol::Grpc, None) => Err(err("gRPC needs a runtime".into())),
        }
    }

    fn send(&self, req: ExportMetricsServiceRequest) -> Result<(), String> {
        match self {
            Transport::Http { client, url } => {
                let r = client
                    .post(url)
                    .header("content-type", "application/x-protobuf")
                    .body(req.encode_to_vec())
                    .send()
                    .map_err(|e| format!("POST {url}: {e}"))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("POST {url}: HTTP {}", r.status()))
                }
            }
            Transport::Grpc {
                rt,
                client,
                timeout,
            } => {
                let mut c = client.clone();
                rt.block_on(async move {
                    match tokio::time::timeout(*timeout, c.export(req)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(s)) => Err(format!("gRPC export: {s}")),
                        Err(_) => Err(format!("gRPC export: no answer in {timeout:?}")),
                    }
                })
            }
        }
    }
}

/// The SDK's push exporter: encodes, appends the latency histograms, sends, counts.
pub(crate) struct OtlpMetricExporter {
    transport: Transport,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OtlpMetricExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpMetricExporter")
    }
}

impl OtlpMetricExporter {
    pub(crate) fn new(transport: Transport, shared: Arc<Shared>) -> Self {
        OtlpMetricExporter { transport, shared }
    }

    fn export_now(&self, rm: &ResourceMetrics) -> OTelSdkResult {
        let mut req = ExportMetricsServiceRequest::from(rm);
        append_histograms(&mut req, &self.shared);
        match self.transport.send(req) {
            Ok(()) => {
                self.shared.exports.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                let n = self.shared.failed_exports.fetch_add(1, Relaxed) + 1;
                // The first failure says why; later ones are counted (rio.telemetry.dropped).
                if n == 1 {
                    tracing::warn!(error = %e, "telemetry export failed; batch dropped");
                } else {
                    tracing::debug!(error = %e, dropped = n, "telemetry export failed");
                }
                Err(OTelSdkError::InternalFailure(e))
            }
        }
    }
}

impl PushMetricExporter for OtlpMetricExporter {
    fn export(
        &self,
        metrics: &ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // The reader calls this on its own thread; sending there keeps the future trivial.
        std::future::ready(self.export_now(metrics))
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn any_value(v: &Value) -> pc::AnyValue {
    use pc::any_value::Value as V;
    let value = match v {
        Value::Bool(b) => V::BoolValue(*b),
        Value::I64(i) => V::IntValue(*i),
        Value::F64(f) => V::DoubleValue(*f),
        other => V::StringValue(other.as_str().into_owned()),
    };
    pc::AnyValue { value: Some(value) }
}

fn proto_attrs(a: &[KeyValue]) -> Vec<pc::KeyValue> {
    a.iter()
        .map(|kv| pc::KeyValue {
            key: kv.key.as_str().to_string(),
            value: Some(any_value(&kv.value)),
            ..Default::default()
        })
        .collect()
}

/// The latency histograms as an OTLP metric (cumulative, seconds), or None before any I/O.
pub(crate) fn histogram_metric(shared: &Shared) -> Option<pm::Metric> {
    let now = nanos(SystemTime::now());
    let start = nanos(shared.start);
    let points: Vec<pm::HistogramDataPoint> = lock(&shared.hists)
        .iter()
        .filter(|(_, h)| h.count > 0)
        .map(|(attrs, h)| pm::HistogramDataPoint {
            attributes: proto_attrs(attrs),
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: h.count,
            sum: Some(h.sum * 1e-9),
            bucket_counts: h.counts.clone(),
            explicit_bounds: h.bounds.iter().map(|&b| b as f64 * 1e-9).collect(),
            exemplars: Vec::new(),
            flags: 0,
            min: Some(h.min as f64 * 1e-9),
            max: Some(h.max as f64 * 1e-9),
        })
        .collect();
    if points.is_empty() {
        return None;
    }
    Some(pm::Metric {
        name: IO_DURATION.into(),
        description: "I/O latency, submission to completion".into(),
        unit: "s".into(),
        metadata: Vec::new(),
        data: Some(pm::metric::Data::Histogram(pm::Histogram {
            data_points: points,
            aggregation_temporality: pm::AggregationTemporality::Cumulative as i32,
        })),
    })
}

/// Puts the histograms in the "rio" scope of the request (creating what is missing).
pub(crate) fn append_histograms(req: &mut ExportMetricsServiceRequest, shared: &Shared) {
    let Some(metric) = histogram_metric(shared) else {
        return;
    };
    if req.resource_metrics.is_empty() {
        req.resource_metrics.push(pm::ResourceMetrics {
            resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                attributes: proto_attrs(&[KeyValue::new("service.name", "rio")]),
                ..Default::default()
            }),
            scope_metrics: Vec::new(),
            schema_url: String::new(),
        });
    }
    let rm = &mut req.resource_metrics[0];
    let i = match rm
        .scope_metrics
        .iter()
        .position(|s| s.scope.as_ref().is_some_and(|s| s.name == "rio"))
    {
        Some(i) => i,
        None => {
            rm.scope_metrics.push(pm::ScopeMetrics {
                scope: Some(pc::InstrumentationScope {
                    name: "rio".into(),
                    ..Default::default()
                }),
                metrics: Vec::new(),
                schema_url: String::new(),
            });
            rm.scope_metrics.len() - 1
        }
    };
    rm.scope_metrics[i].metrics.push(metric);
}

/// The span pipeline: OTLP over the configured protocol, batched on the SDK's thread.
pub(crate) fn tracer_provider(
    cfg: &TelemetryConfig,
    rt: Option<&Arc<tokio::runtime::Runtime>>,
    resource: opentelemetry_sdk::Resource,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    let err = |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter {
        what: "span",
        reason: e.to_string(),
    };
    let exporter = match (cfg.protocol, rt) {
        (Protocol::Grpc, Some(rt)) => {
            let _guard = rt.enter();
            SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.traces_endpoint.clone())
                .with_timeout(cfg.timeout)
                .build()
                .map_err(err)?
        }
        _ => SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.traces_endpoint.clone())
            .with_timeout(cfg.timeout)
            .build()
            .map_err(err)?,
    };
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
