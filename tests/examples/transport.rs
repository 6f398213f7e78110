//! Transport benchmark with null compute: the real coordinator binary and N "null workers" in
//! this process that register, take their shard of each step (the real 13.1 MB parameters and
//! their images) and answer at once with zero gradients of the real size. So each step costs
//! only what the distributed step adds to the computing: the task down, the gradients up, the
//! coordinator's decode, reduction, SGD and encode. Printed per direction in GB/s, against a
//! plain memcpy of the same bytes and the same bytes over a bare loopback TCP socket, both
//! measured in this run. The download's time runs from the reply's headers to its last byte:
//! the parameters stream while the coordinator's SGD pass writes them (protocol 6), so it holds
//! that pass, the bytes in flight and the worker's receive; a worker asks for the next step as
//! soon as it has answered, so the time from the ask also holds the wait for the coordinator's
//! reduction, printed beside it. The upload's runs from the call to its
//! answer (the worker's encode, the bytes, the coordinator's receive, decode and checks).
//!
//!   cargo run -p cluster-tests --example transport [-- STEPS [FLAGS]]  (default 60; 1, 2, 4 workers)
//!   e.g. `-- 30 --wire-format bf16`: FLAGS go to the coordinator.
//!
//! A change to the coordinator is measured against the binary before it in the same run:
//! `TRANSPORT_BASELINE=/path/to/old/coordinator` alternates runs of the two (`TRANSPORT_RUNS`
//! pairs per worker count, default 3, each pair in the other order than the last) and prints
//! each run's ms per step and the ratio of the means. The null workers are this build's, so
//! both binaries must speak its protocol.

use bytes::Bytes;
use cluster_tests::*;
use proto::{GetWorkRequest, NodeGradient, RegisterRequest, SubmitRequest, Work};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};

const WARMUP: u64 = 5;

/// What one null worker saw: the time and bytes of its GetWork calls that carried a task (the
/// download) and of its submissions (the upload), over the timed steps.
#[derive(Default, Clone, Copy)]
struct Seen {
    /// From the ask to the reply's last byte.
    asked_secs: f64,
    down_secs: f64,
    down_bytes: f64,
    up_secs: f64,
    up_bytes: f64,
}

/// A channel that notes when each reply's headers arrive (its future resolves then; the body
/// follows).
#[derive(Clone)]
struct Stamped<S> {
    inner: S,
    headers_at: Arc<Mutex<Option<Instant>>>,
}

impl<S, B> Service<http::Request<B>> for Stamped<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let reply = self.inner.call(req);
        let headers_at = self.headers_at.clone();
        Box::pin(async move {
            let r = reply.await;
            *headers_at.lock().expect("not poisoned") = Some(Instant::now());
            r
        })
    }
}

async fn null_worker(url: String, name: String, steps: u64) -> anyhow::Result<Seen> {
    let security = ClientSecurity::none();
    let headers_at = Arc::new(Mutex::new(None));
    let channel = security.endpoint(&url)?.connect().await?;
    let mut client = proto::trainer_client::TrainerClient::new(Stamped {
        inner: security.authorize(channel),
        headers_at: headers_at.clone(),
    })
    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES);
    let reg = client
        .register(RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            model: String::new(),
            backend: "null".into(),
            device: "none".into(),
            threads: 1,
            name,
        })
        .await?
        .into_inner();
    // Encoded once: a Bytes clone shares it, as a real worker's encoded sum is sent as is.
    let width = reg.wire_format().bytes_per_value();
    let values = reg.parameter_count as usize;
    let zeros = Bytes::from(vec![0u8; reg.parameter_count as usize * width]);
    let mut seen = Seen::default();
    loop {
        let asked = Instant::now();
        let mut replies = client
            .get_work(GetWorkRequest {
                worker_id: reg.worker_id,
                incarnation: reg.incarnation,
            })
            .await?
            .into_inner();
        let work = proto::receive_work(&mut replies, values, width).await?;
        let got = asked.elapsed().as_secs_f64();
        let headers = headers_at.lock().expect("not poisoned").take();
        let in_flight = headers.map_or(got, |h| h.elapsed().as_secs_f64());
        let (task, params) = match work {
            Work::Task(task, params) => (task, params),
            Work::Shutdown(_) => return Ok(seen),
            Work::Wait => continue,
        };
        let timed = task.step >= WARMUP && task.step < WARMUP + steps;
        let task_bytes = (params.len() + task.images.len() + task.labels.len()) as f64;
        // As a real worker sends them: each node's gradient in parts.
        let parts: Vec<SubmitRequest> = task
            .nodes
            .iter()
            .map(|n| NodeGradient {
                node: Some(*n),
                gradient: zeros.clone(),
                loss_sum: 0.0,
                offset: 0,
            })
            .flat_map(|whole| proto::gradient_parts(whole, width))
            .map(|part| SubmitRequest {
                worker_id: reg.worker_id,
                incarnation: reg.incarnation,
                task_id: task.task_id,
                step: task.step,
                nodes: vec![part],
            })
            .collect();
        let up_bytes = (task.nodes.len() * zeros.len()) as f64;
        let sent = Instant::now();
        // A straggler's shard may have gone to another worker as a backup (its answer is then
        // refused as late): a race the real worker also swallows.
        match client.submit_gradients(tokio_stream::iter(parts)).await {
            Err(s) if s.code() == tonic::Code::Aborted => continue,
            r => r?,
        };
        if timed {
            seen.asked_secs += got;
            seen.down_secs += in_flight;
            seen.down_bytes += task_bytes;
            seen.up_secs += sent.elapsed().as_secs_f64();
            seen.up_bytes += up_bytes;
        }
    }
}

/// Seconds per step and what each worker saw, for `workers` null workers.
async fn run(
    coordinator: &str,
    workers: usize,
    steps: u64,
    extra: &[String],
) -> anyhow::Result<(f64, Vec<Seen>)> {
    let dir = scratch(&format!("transport-{workers}"));
    let ck = dir.join("ck");
    let total = WARMUP + steps;
    let w = workers.to_string();
    let mut args: Vec<String> = [
        "--workers",
        &w,
        "--max-steps",
        &total.to_string(),
        "--eval-every",
        "1000000",
        "--validation-size",
        "10",
        "--test-size",
        "10",
        "--checkpoint-every",
        "0",
        "--heartbeat-timeout",
        "60",
        "--checkpoint-url",
        ck.to_str().unwrap_or("ck"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let mut c = Proc::start(coordinator, "coordinator", &dir, &coordinator_args(&args))?;
    let url = c.grpc_url()?;
    let tasks: Vec<_> = (0..workers)
        .map(|i| tokio::spawn(null_worker(url.clone(), format!("null{i}"), steps)))
        .collect();
    // Steps timed from the status: from step WARMUP to the last.
    let (mut t0, mut t1) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while t1.is_none() && Instant::now() < deadline && !tasks.iter().any(|t| t.is_finished()) {
        if let Some(s) = get_status(&url).await {
            if s.step >= WARMUP && t0.is_none() {
                t0 = Some((Instant::now(), s.step));
            }
            if s.step >= total {
                t1 = Some((Instant::now(), s.step));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (Some((a, sa)), Some((b, sb))) = (t0, t1) else {
        // A null worker that stopped says why.
        for t in tasks {
            if t.is_finished() {
                t.await??;
            } else {
                t.abort();
            }
        }
        anyhow::bail!("the job did not finish\n{}", c.tail());
    };
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await??);
    }
    c.wait_exit(Duration::from_secs(60))?;
    Ok(((b - a).as_secs_f64() / (sb - sa) as f64, seen))
}

/// GB/s of `bytes` bytes sent over a plain loopback TCP socket to a reader that answers one
/// byte when it has them all (median of 20): the floor under any protocol on this machine.
async fn tcp_gbps(bytes: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; bytes];
        loop {
            match s.read_exact(&mut buf).await {
                Ok(_) => s.write_all(b"k").await?,
                Err(_) => return anyhow::Ok(()),
            }
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let data = vec![1u8; bytes];
    let mut times = Vec::new();
    let mut ack = [0u8; 1];
    for _ in 0..20 {
        let t = Instant::now();
        s.write_all(&data).await?;
        s.read_exact(&mut ack).await?;
        times.push(t.elapsed().as_secs_f64());
    }
    drop(s);
    reader.await??;
    times.sort_by(f64::total_cmp);
    Ok(bytes as f64 / times[times.len() / 2] / 1e9)
}

/// GB/s of a plain copy of `bytes` bytes (best of 20), in this process.
fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// Alternating runs of this build's coordinator and the `baseline` binary: ms per step of each
/// run, and the ratio of the means (this build over the baseline).
async fn against_baseline(
    baseline: &str,
    runs: usize,
    steps: u64,
    extra: &[String],
) -> anyhow::Result<()> {
    println!("this build's coordinator against {baseline}, {runs} alternating runs each");
    for workers in [1, 2, 4] {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        // Each pair in the other order than the last, so neither binary always runs first.
        for i in 0..runs {
            for first in [i % 2 == 0, i % 2 == 1] {
                let (bin, times) = if first {
                    (baseline, &mut before)
                } else {
                    ("coordinator", &mut after)
                };
                times.push(run(bin, workers, steps, extra).await?.0 * 1e3);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let shown = |v: &[f64]| {
            let runs: Vec<String> = v.iter().map(|ms| format!("{ms:.1}")).collect();
            runs.join(", ")
        };
        println!(
            "{workers} worker(s): baseline {:.2} ms/step ({}), this build {:.2} ms/step ({}): {:.3}x",
            mean(&before),
            shown(&before),
            mean(&after),
            shown(&after),
            mean(&after) / mean(&before)
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // The null workers allocate as real ones do (the coordinator binary does this itself).
    common::process::keep_large_buffers();
    let steps: u64 = std::env::args().nth(1).map_or(Ok(60), |s| s.parse())?;
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let params = common::model::ModelSpec::SEED.param_count() * 4;
    let copy = memcpy_gbps(params);
    println!(
        "null compute, seed convnet ({:.1} MB of parameters), batch 128 in 4 micro-batches, {steps} timed steps",
        params as f64 / 1e6
    );
    let tcp = rt.block_on(tcp_gbps(params))?;
    println!(
        "memcpy of {:.1} MB: {copy:.2} GB/s; the same bytes over a bare loopback TCP socket: {tcp:.2} GB/s",
        params as f64 / 1e6
    );
    if let Ok(baseline) = std::env::var("TRANSPORT_BASELINE") {
        let runs: usize =
            match std::env::var("TRANSPORT_RUNS") {
                Ok(s) => s.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    anyhow::anyhow!("TRANSPORT_RUNS={s}: want a whole number >= 1")
                })?,
                Err(_) => 3,
            };
        return rt.block_on(against_baseline(&baseline, runs, steps, &extra));
    }
    for workers in [1, 2, 4] {
        let (step, seen) = rt.block_on(run("coordinator", workers, steps, &extra))?;
        let sum = |f: fn(&Seen) -> f64| seen.iter().map(f).sum::<f64>();
        let down = sum(|s| s.down_bytes) / sum(|s| s.down_secs) / 1e9;
        let asked = sum(|s| s.down_bytes) / sum(|s| s.asked_secs) / 1e9;
        let up = sum(|s| s.up_bytes) / sum(|s| s.up_secs) / 1e9;
        let moved = (sum(|s| s.down_bytes) + sum(|s| s.up_bytes)) / steps as f64;
        println!(
            "{workers} worker(s): {:>6.2} ms/step ({:.1} MB moved per step); task down {down:.2} GB/s ({:.2}x memcpy, {:.2}x TCP; {asked:.2} GB/s from the ask), gradients up {up:.2} GB/s ({:.2}x memcpy, {:.2}x TCP)",
            step * 1e3,
            moved / 1e6,
            down / copy,
            down / tcp,
            up / copy,
            up / tcp
        );
    }
    Ok(())
}
