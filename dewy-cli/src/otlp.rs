//! `--otlp-endpoint`: pushes the metrics of `/metrics` over OTLP/gRPC
//! (`host:port`, as Dewy) or OTLP/HTTP (protobuf, an `http(s)://` URL) with
//! the opentelemetry SDK. The scrape endpoint does not depend on it.
//!
//! The SDK's periodic reader runs on its own thread and the exporter uses a
//! blocking HTTP client, which must be built and dropped outside the tokio
//! runtime; so the provider lives on a dedicated thread. Its observable
//! instruments read a snapshot of the metric families (server and assets
//! mode: [`crate::metrics::families`]; container mode: its own) that a tokio
//! task refreshes (reading dewy's status is async).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};

use crate::metrics::Family;

/// What the pushed metrics are read from.
pub(crate) trait Source: Send + Sync + 'static {
    /// The metric families now (as `/metrics` renders them).
    fn families(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Family>> + Send + '_>>;
    /// The durations (seconds) of deploys finished since the last call.
    fn new_durations(&self) -> Vec<f64>;
}

impl Source for dewy_core::Deployer {
    fn families(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Family>> + Send + '_>> {
        Box::pin(crate::metrics::families(self))
    }

    fn new_durations(&self) -> Vec<f64> {
        self.metrics().deployment_duration.take_new()
    }
}

/// The running exporter; [`Otlp::stop`] sends the last export.
#[derive(Debug)]
pub(crate) struct Otlp {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    refresh: tokio::task::JoinHandle<()>,
}

/// Starts pushing every `interval` to `target`.
pub(crate) async fn start(target: &crate::config::Otlp, interval: Duration, source: Arc<dyn Source>) -> Otlp {
    let first = source.families().await;
    let snapshot: Arc<Mutex<Vec<Family>>> = Arc::new(Mutex::new(first.clone()));
    let refresh = {
        let (snapshot, source) = (snapshot.clone(), source.clone());
        let every = (interval / 2).max(Duration::from_millis(200));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = source.families().await;
                *snapshot.lock().expect("metrics snapshot") = now;
            }
        })
    };
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let target = target.clone();
    let endpoint = match &target {
        crate::config::Otlp::Grpc { target, insecure } => {
            format!("{}://{target}", if *insecure { "http" } else { "https" })
        }
        crate::config::Otlp::Http(url) => url.clone(),
    };
    // The gRPC client's connection task runs on dewy's runtime; the SDK's
    // exports block on it from the thread below.
    let runtime = tokio::runtime::Handle::current();
    let thread = std::thread::spawn(move || {
        let built = match &target {
            crate::config::Otlp::Grpc { insecure, .. } => {
                let _entered = runtime.enter();
                let mut builder = opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(10));
                if !insecure {
                    builder = builder.with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
                }
                builder.build()
            }
            crate::config::Otlp::Http(_) => opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(10))
                .build(),
        };
        let exporter = match built {
            Ok(e) => e,
            Err(err) => {
                tracing::error!(endpoint, error = %err, "Cannot set up the OTLP exporter; metrics are not pushed");
                let _ = stopped.recv();
                return;
            }
        };
        // Exports are driven below (force_flush every interval) so that a
        // collector that is down is logged; the reader's own timer is idle.
        let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
            .with_interval(Duration::from_secs(365 * 24 * 3600))
            .build();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("dewy").build())
            .build();
        let meter = provider.meter("dewy");
        let observe = |name: &'static str, snapshot: Arc<Mutex<Vec<Family>>>| {
            move |obs: &dyn opentelemetry::metrics::AsyncInstrument<u64>| {
                let snapshot = snapshot.lock().expect("metrics snapshot");
                for f in snapshot.iter().filter(|f| f.name == name) {
                    for (labels, v) in &f.samples {
                        let attrs: Vec<KeyValue> = labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
                        obs.observe(*v, &attrs);
                    }
                }
            }
        };
        let mut counters = Vec::new();
        let mut gauges = Vec::new();
        // Histograms are not observable in OpenTelemetry: the deploy
        // durations are recorded one by one below instead.
        for f in first.iter().filter(|f| f.kind != "histogram") {
            if f.kind == "counter" {
                counters.push(
                    meter
                        .u64_observable_counter(f.name)
                        .with_description(f.help)
                        .with_callback(observe(f.name, snapshot.clone()))
                        .build(),
                );
            } else {
                gauges.push(
                    meter
                        .u64_observable_gauge(f.name)
                        .with_description(f.help)
                        .with_callback(observe(f.name, snapshot.clone()))
                        .build(),
                );
            }
        }
        // The deploy-duration histogram: each deploy's duration recorded as
        // it is taken from dewy-core, with Dewy's buckets.
        let duration = meter
            .f64_histogram("dewy_deployment_duration_seconds")
            .with_description("Durations of successful deploys, in seconds (Dewy's buckets).")
            .with_unit("s")
            .with_boundaries(dewy_core::DEPLOYMENT_BUCKETS.iter().map(|b| *b as f64).collect())
            .build();
        let command: Vec<KeyValue> = first
            .iter()
            .find_map(|f| f.histogram.as_ref())
            .map(|(labels, _)| labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect())
            .unwrap_or_default();
        let record_durations = || {
            for secs in source.new_durations() {
                duration.record(secs, &command);
            }
        };
        record_durations();
        tracing::info!(endpoint, interval = %humantime::format_duration(interval), "Pushing metrics over OTLP");
        // One WARN when pushes start failing (then every 10 minutes while
        // they fail), one INFO when they work again.
        let mut failing_since: Option<std::time::Instant> = None;
        let mut warned_at: Option<std::time::Instant> = None;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
            record_durations();
            match provider.force_flush() {
                Ok(()) => {
                    if failing_since.take().is_some() {
                        tracing::info!(endpoint, "OTLP metrics push works again");
                    }
                    warned_at = None;
                }
                Err(err) => {
                    failing_since.get_or_insert_with(std::time::Instant::now);
                    if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) {
                        tracing::warn!(endpoint, error = %err, "OTLP metrics push failed; retrying every interval");
                        warned_at = Some(std::time::Instant::now());
                    }
                }
            }
        }
        record_durations();
        if let Err(err) = provider.shutdown() {
            tracing::warn!(error = %err, "OTLP exporter shutdown");
        }
        drop((counters, gauges));
    });
    Otlp { stop, thread, refresh }
}

impl Otlp {
    /// Sends the last export and stops.
    pub(crate) async fn stop(self) {
        self.refresh.abort();
        let _ = self.stop.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}
