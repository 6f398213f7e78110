//! The Prometheus text endpoint (`GET /metrics` on `--metrics-listen`). Every value is read from
//! the same snapshot `GetStatus` serves, so the two always agree.

use crate::state::Shared;
use crate::status::snapshot;
use proto::transport::Conn;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bounds (seconds) of the step-latency histogram buckets.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

/// Renders the metrics in the Prometheus text exposition format.
pub fn render(shared: &Shared) -> String {
    let s = snapshot(shared);
    let steps: Vec<f64> = shared.status().step_seconds.clone();
    let failures: u64 = s.workers.iter().map(|w| w.failures).sum();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "dtrain_step",
        "Steps applied so far.",
        "gauge",
        s.step as f64,
    );
    gauge(
        "dtrain_epoch",
        "Current epoch (1-based).",
        "gauge",
        s.epoch as f64,
    );
    gauge(
        "dtrain_total_steps",
        "Steps the job will run.",
        "gauge",
        s.total_steps as f64,
    );
    gauge(
        "dtrain_loss",
        "Training loss of the last step.",
        "gauge",
        s.last_loss,
    );
    gauge(
        "dtrain_validation_accuracy",
        "Last validation accuracy.",
        "gauge",
        s.last_validation_accuracy,
    );
    gauge(
        "dtrain_images_per_second",
        "Training throughput (moving average).",
        "gauge",
        s.images_per_sec,
    );
    gauge(
        "dtrain_live_workers",
        "Workers currently live.",
        "gauge",
        s.live_workers as f64,
    );
    gauge(
        "dtrain_examples_seen_total",
        "Training examples processed.",
        "counter",
        s.examples_seen as f64,
    );
    gauge(
        "dtrain_gradient_bytes_received_total",
        "Gradient bytes received from workers.",
        "counter",
        s.bytes_received as f64,
    );
    gauge(
        "dtrain_task_bytes_sent_total",
        "Parameter and image bytes sent to workers.",
        "counter",
        s.bytes_sent as f64,
    );
    gauge(
        "dtrain_worker_failures_total",
        "Times a worker was declared lost.",
        "counter",
        failures as f64,
    );
    gauge(
        "dtrain_bad_inputs_total",
        "Submissions refused as bad input.",
        "counter",
        s.bad_inputs as f64,
    );
    gauge(
        "dtrain_refused_handshakes_total",
        "Connections refused at the TLS handshake.",
        "counter",
        s.refused_handshakes as f64,
    );
    gauge(
        "dtrain_refused_calls_total",
        "Calls refused as unauthenticated.",
        "counter",
        s.refused_calls as f64,
    );
    let _ = writeln!(
        out,
        "# HELP dtrain_step_seconds Wall time of a training step.\n# TYPE dtrain_step_seconds histogram"
    );
    for le in BUCKETS {
        let n = steps.iter().filter(|&&t| t <= le).count();
        let _ = writeln!(out, "dtrain_step_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "dtrain_step_seconds_bucket{{le=\"+Inf\"}} {}",
        steps.len()
    );
    let _ = writeln!(out, "dtrain_step_seconds_sum {}", steps.iter().sum::<f64>());
    let _ = writeln!(out, "dtrain_step_seconds_count {}", steps.len());
    out
}

/// Serves `/metrics` on the connections of `incoming` (plain or TLS, see
/// `proto::transport`) until `stop`.
pub async fn serve(
    shared: Arc<Shared>,
    incoming: mpsc::Receiver<Conn>,
    local: SocketAddr,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let shared = shared.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(&shared),
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
