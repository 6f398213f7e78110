//! The Prometheus endpoint (`GET /metrics` on `--metrics-listen`), encoded by
//! `prometheus-client` in the OpenMetrics text format. The step-time histogram is observed as
//! each step ends ([`Metrics`]); everything else is read at each scrape from the same snapshot
//! `GetStatus` serves and the core's totals ([`StatusCollector`]), so the two always agree. A
//! value not known yet (the loss before the first step) is left out.

use crate::state::Shared;
use crate::status::snapshot;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proto::transport::Conn;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bounds (seconds) of the step-latency histogram buckets.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

/// What is observed as it happens (the driver observes; the endpoint reads).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Wall time of each training step.
    pub step_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            step_seconds: Histogram::new(BUCKETS),
        }
    }
}

/// The registry the endpoint encodes.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "dtrain_step_seconds",
        "Wall time of a training step",
        shared.metrics.step_seconds.clone(),
    );
    registry.register_collector(Box::new(StatusCollector(shared)));
    registry
}

/// Renders the metrics in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The status values, read from the `GetStatus` snapshot at each scrape.
pub struct StatusCollector(Arc<Shared>);

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = snapshot(&self.0);
        let lost = self.0.core().lost_total();
        let gauges = [
            ("dtrain_step", "Steps applied so far", Some(s.step as f64)),
            (
                "dtrain_epoch",
                "Current epoch (1-based)",
                Some(s.epoch as f64),
            ),
            (
                "dtrain_total_steps",
                "Steps the job will run",
                Some(s.total_steps as f64),
            ),
            ("dtrain_loss", "Training loss of the last step", s.last_loss),
            (
                "dtrain_validation_accuracy",
                "Last validation accuracy",
                s.last_validation_accuracy,
            ),
            (
                "dtrain_images_per_second",
                "Training throughput (moving average)",
                Some(s.images_per_sec),
            ),
            (
                "dtrain_live_workers",
                "Workers currently live",
                Some(s.live_workers as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                put(&mut encoder, name, help, ConstGauge::new(v))?;
            }
        }
        // Totals since the coordinator started; encoded with the `_total` suffix.
        let counters = [
            (
                "dtrain_examples_seen",
                "Training examples processed",
                s.examples_seen,
            ),
            (
                "dtrain_gradient_bytes_received",
                "Gradient bytes received from workers",
                s.bytes_received,
            ),
            (
                "dtrain_task_bytes_sent",
                "Parameter and image bytes sent to workers",
                s.bytes_sent,
            ),
            (
                "dtrain_worker_failures",
                "Times a worker was declared lost",
                lost,
            ),
            (
                "dtrain_bad_inputs",
                "Submissions refused as bad input",
                s.bad_inputs,
            ),
            (
                "dtrain_refused_handshakes",
                "Connections refused at the TLS handshake",
                s.refused_handshakes,
            ),
            (
                "dtrain_refused_calls",
                "Calls refused as unauthenticated",
                s.refused_calls,
            ),
        ];
        for (name, help, value) in counters {
            put(&mut encoder, name, help, ConstCounter::new(value))?;
        }
        Ok(())
    }
}

/// Encodes one metric under its name and help text.
fn put(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Serves `/metrics` on the connections of `incoming` (plain or TLS, see
/// `proto::transport`) until `stop`.
pub async fn serve(
    shared: Arc<Shared>,
    incoming: mpsc::Receiver<Conn>,
    local: SocketAddr,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let registry = Arc::new(registry(shared));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
            }
        }),
    );
    axum::serve(Incoming { incoming, local }, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// The accepted connections as an axum listener.
struct Incoming {
    incoming: mpsc::Receiver<Conn>,
    local: SocketAddr,
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.incoming.recv().await {
            Some(conn) => {
                let peer = conn.info().remote;
                (conn, peer)
            }
            // The acceptor stopped (shutdown): wait for the graceful shutdown to end serving.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
