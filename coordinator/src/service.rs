//! The `Trainer` gRPC service: validates and converts each request, hands it to the round
//! state machine, and maps refusals to gRPC status codes. Bad input is logged with its sender,
//! counted in status, and never stops training.

use crate::core::{Accepted, CoreError, Submission, WorkerInfo};
use crate::state::{Abandoned, Shared, StepData, WireParams};
use common::codec::{PartsDecoder, WireFormat};
use common::tree::Node;
use futures::{Stream, StreamExt};
use proto::trainer_server::Trainer;
use proto::{
    FailureReport, FailureResponse, GetWorkRequest, GetWorkResponse, HeartbeatRequest,
    HeartbeatResponse, NodeRange, RegisterRequest, RegisterResponse, Shutdown, SubmitRequest,
    SubmitResponse, Task, TensorPart, Wait, get_work_response::Reply,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// How long `GetWork` holds a request open before answering `wait`.
const LONG_POLL: Duration = Duration::from_secs(2);

pub struct TrainerService {
    shared: Arc<Shared>,
}

impl TrainerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        TrainerService { shared }
    }

    /// Counts bad input from `worker`, quarantining a repeat offender.
    fn bad_input(&self, worker: u64, peer: &str, reason: &str) -> Status {
        warn!(worker, peer, reason, "refused bad input");
        self.shared.status().bad_inputs += 1;
        if self.shared.core().record_bad_input(worker, reason) {
            warn!(worker, peer, "worker quarantined after repeated bad input");
            self.shared.notify();
        }
        Status::invalid_argument(reason.to_string())
    }

    /// Maps a refusal of the state machine to its gRPC status, counting bad input.
    fn refuse(&self, worker: u64, peer: &str, e: CoreError) -> Status {
        if e.is_bad_input() {
            let status = core_status(e.clone());
            let _ = self.bad_input(worker, peer, &e.to_string());
            status
        } else {
            core_status(e)
        }
    }

    /// A node whose parts have all come: its gradient, checked (whole, finite, its norm within
    /// the bound), with its loss.
    fn close(
        &self,
        worker: u64,
        address: &str,
        step: u64,
        data: &Option<Arc<StepData>>,
        open: OpenNode,
    ) -> Result<(Node, Vec<f32>, f64), Status> {
        let node = open.node;
        let (values, norm) = open.values.finish().map_err(|e| {
            let why = format!("gradient of the wrong length: {e}");
            self.bad_input(worker, address, &why)
        })?;
        let examples = data
            .as_ref()
            .and_then(|d| d.leaves.get(node.lo as usize..node.hi as usize))
            .map_or(1, |l| l.iter().map(|r| r.len()).sum::<usize>());
        let bound = self.shared.max_node_grad_norm;
        if let Err(why) = check_gradient(norm, open.loss_sum, examples, bound) {
            if why.over_bound {
                // Honest workers of a diverging model send such gradients too.
                self.shared.core().numeric_trouble(worker, step, &why.text);
                self.shared.notify();
            }
            return Err(self.bad_input(worker, address, &why.text));
        }
        Ok((node, values, open.loss_sum))
    }

    /// Refuses a call from a worker registered with an earlier coordinator process: its id may
    /// belong to another worker now.
    fn check_incarnation(&self, worker: u64, incarnation: u64) -> Result<(), Status> {
        if incarnation == self.shared.incarnation {
            return Ok(());
        }
        Err(Status::not_found(format!(
            "worker {worker} registered with an earlier coordinator process; register again"
        )))
    }
}

fn core_status(e: CoreError) -> Status {
    match e {
        CoreError::Full(_) => Status::resource_exhausted(e.to_string()),
        CoreError::UnknownWorker(_) => Status::not_found(e.to_string()),
        CoreError::Quarantined(_) => Status::permission_denied(e.to_string()),
        CoreError::StaleStep { .. } | CoreError::GivenUp(_) => Status::aborted(e.to_string()),
        CoreError::Duplicate(_) => Status::already_exists(e.to_string()),
        CoreError::UnknownTask(_)
        | CoreError::NotYourTask { .. }
        | CoreError::WrongNodes { .. } => Status::invalid_argument(e.to_string()),
    }
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let address = proto::transport::peer_name(&req);
        let r = req.into_inner();
        if r.protocol_version != proto::PROTOCOL_VERSION {
            warn!(%address, got = r.protocol_version, "refused worker with another protocol version");
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this coordinator speaks version {}",
                r.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        let model = self.shared.model;
        if !r.model.is_empty() && r.model != model.kind.to_string() {
            warn!(%address, wanted = r.model, "refused worker built for another model");
            return Err(Status::failed_precondition(format!(
                "this job trains model {}, the worker insists on {}",
                model.kind, r.model
            )));
        }
        let info = WorkerInfo {
            name: r.name,
            address,
            backend: r.backend,
            device: r.device,
            threads: r.threads,
        };
        let id = self
            .shared
            .core()
            .register(info.clone(), Instant::now())
            .map_err(|e| {
                warn!(address = info.address, error = %e, "refused a registration");
                core_status(e)
            })?;
        info!(
            worker = id,
            name = info.name,
            address = info.address,
            backend = info.backend,
            device = info.device,
            "worker registered"
        );
        self.shared.notify();
        Ok(Response::new(RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: self.shared.heartbeat_interval_ms,
            model: model.kind.to_string(),
            pool: model.pool.to_string(),
            keep_prob: self.shared.keep_prob,
            parameter_count: self.shared.param_count as u64,
            incarnation: self.shared.incarnation,
            wire_format: match self.shared.wire {
                WireFormat::F32 => proto::WireFormat::F32,
                WireFormat::Bf16 => proto::WireFormat::Bf16,
            } as i32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let id = r.worker_id;
        self.check_incarnation(id, r.incarnation)?;
        let revived = self
            .shared
            .core()
            .touch(id, Instant::now())
            .map_err(core_status)?;
        if revived {
            info!(worker = id, "worker is back");
            self.shared.notify();
        }
        Ok(Response::new(HeartbeatResponse {}))
    }

    type GetWorkStream = WorkStream;

    async fn get_work(&self, req: Request<GetWorkRequest>) -> Result<Response<WorkStream>, Status> {
        let r = req.into_inner();
        let id = r.worker_id;
        self.check_incarnation(id, r.incarnation)?;
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut changed = self.shared.subscribe();
        loop {
            changed.borrow_and_update();
            let assignment = {
                let mut core = self.shared.core();
                if let Some(why) = core.finished() {
                    return Ok(reply(Reply::Shutdown(Shutdown {
                        reason: why.to_string(),
                    })));
                }
                core.next_task(id, Instant::now()).map_err(core_status)?
            };
            if let Some(a) = assignment {
                let data = self.shared.step_data().filter(|d| d.step == a.step);
                if let Some(data) = data {
                    let first = data.leaves[a.leaves.start as usize].start;
                    let last = data.leaves[a.leaves.end as usize - 1].end;
                    let px = common::mnist::PIXELS;
                    if a.backup {
                        info!(worker = id, step = a.step, leaves = ?a.leaves, "backup shard for a straggler");
                    }
                    let param_bytes = self.shared.param_count * self.shared.wire.bytes_per_value();
                    self.shared.status().task_bytes_sent +=
                        (param_bytes + (last - first) * (px + 1)) as u64;
                    let task = Task {
                        task_id: a.task_id,
                        step: a.step,
                        first_leaf: a.leaves.start,
                        leaf_sizes: a
                            .leaves
                            .clone()
                            .map(|l| data.leaves[l as usize].len() as u32)
                            .collect(),
                        images: bytes::Bytes::copy_from_slice(
                            &data.batch.images[first * px..last * px],
                        ),
                        labels: bytes::Bytes::copy_from_slice(&data.batch.labels[first..last]),
                        nodes: a
                            .nodes
                            .iter()
                            .map(|n| NodeRange { lo: n.lo, hi: n.hi })
                            .collect(),
                        seed: data.seed,
                    };
                    let first = GetWorkResponse {
                        reply: Some(Reply::Task(task)),
                    };
                    let parts = param_parts(data.params.clone(), self.shared.wire);
                    let stream = futures::stream::once(async { Ok(first) }).chain(parts);
                    return Ok(Response::new(Box::pin(stream)));
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Ok(reply(Reply::Wait(Wait {
                    reason: "no shard free".into(),
                })));
            }
        }
    }

    async fn submit_gradients(
        &self,
        req: Request<Streaming<SubmitRequest>>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let address = proto::transport::peer_name(&req);
        let mut parts = req.into_inner();
        let Some(first) = parts.message().await? else {
            return Err(Status::invalid_argument("empty submission"));
        };
        let header = (
            first.worker_id,
            first.incarnation,
            first.task_id,
            first.step,
        );
        let (worker, incarnation, task_id, step) = header;
        self.check_incarnation(worker, incarnation)?;
        // The cheap checks (sender, step, task) before any gradient is decoded.
        // (The core's lock is released before `refuse`, which takes it again.)
        let expected = self
            .shared
            .core()
            .expected_nodes(worker, task_id, step, Instant::now());
        let expected = expected.map_err(|e| self.refuse(worker, &address, e))?;
        let data = self.shared.step_data().filter(|d| d.step == step);
        // The nodes as their parts come in (a node's first part in the task's node order, its
        // parts at any offset); each checked once all have come.
        let mut open: Vec<OpenNode> = Vec::with_capacity(expected.len());
        let mut bytes = 0u64;
        let mut part = Some(first);
        while let Some(p) = part {
            if (p.worker_id, p.incarnation, p.task_id, p.step) != header {
                return Err(self.bad_input(
                    worker,
                    &address,
                    "the parts of one submission name different tasks",
                ));
            }
            for g in p.nodes {
                let Some(range) = g.node else {
                    return Err(self.bad_input(worker, &address, "gradient without its tree node"));
                };
                let node = Node::new(range.lo, range.hi);
                let at = match open.iter().position(|o| o.node == node) {
                    Some(at) => at,
                    None if expected.get(open.len()) == Some(&node) => {
                        open.push(OpenNode {
                            node,
                            values: PartsDecoder::new(self.shared.wire, self.shared.param_count),
                            loss_sum: 0.0,
                        });
                        open.len() - 1
                    }
                    None => {
                        let mut got: Vec<Node> = open.iter().map(|o| o.node).collect();
                        got.push(node);
                        let e = CoreError::WrongNodes {
                            got,
                            want: expected.clone(),
                        };
                        return Err(self.refuse(worker, &address, e));
                    }
                };
                let o = &mut open[at];
                o.values.push_at(g.offset, &g.gradient).map_err(|e| {
                    let why = format!("node {}..{}: {e}", o.node.lo, o.node.hi);
                    self.bad_input(worker, &address, &why)
                })?;
                o.loss_sum += g.loss_sum;
                bytes += g.gradient.len() as u64;
            }
            part = parts.message().await?;
        }
        // A worker that gives a submission up cancels its call, and hyper ends a request body
        // reset with CANCEL as if it were complete: a submission that ends before every node
        // is whole is abandoned, not malformed, and does not count against its sender. (What
        // it cost is what any cancelled call costs.)
        let whole = open.len() == expected.len() && open.iter().all(|o| o.values.is_complete());
        if !whole {
            let have: usize = open.iter().map(|o| o.values.decoded()).sum();
            return Err(Status::cancelled(format!(
                "the submission ended after {have} of {} values: taken as given up",
                expected.len() * self.shared.param_count
            )));
        }
        let mut nodes = Vec::with_capacity(open.len());
        let mut loss_sum = 0.0;
        for o in open {
            let (node, values, loss) = self.close(worker, &address, step, &data, o)?;
            loss_sum += loss;
            nodes.push((node, values));
        }
        let sub = Submission {
            worker,
            task_id,
            step,
            nodes,
            loss_sum,
        };
        let outcome = self.shared.core().submit(sub, Instant::now());
        match outcome {
            Ok(accepted) => {
                self.shared.status().gradient_bytes_received += bytes;
                self.shared.notify();
                Ok(Response::new(SubmitResponse {
                    accepted: accepted == Accepted::Used,
                }))
            }
            Err(e) => Err(self.refuse(worker, &address, e)),
        }
    }

    async fn report_failure(
        &self,
        req: Request<FailureReport>,
    ) -> Result<Response<FailureResponse>, Status> {
        let address = proto::transport::peer_name(&req);
        let r = req.into_inner();
        let worker = r.worker_id;
        self.check_incarnation(worker, r.incarnation)?;
        let kind = match proto::FailureKind::try_from(r.kind) {
            Ok(proto::FailureKind::Unspecified) | Err(_) => {
                return Err(self.bad_input(worker, &address, "failure report of no known kind"));
            }
            Ok(kind) => kind,
        };
        // A report is the worker's word; keep what it may cost us (log, status) bounded.
        let reason: String = r.reason.chars().take(MAX_REASON_CHARS).collect();
        warn!(
            worker,
            peer = address,
            step = r.step,
            task = r.task_id,
            ?kind,
            reason,
            "worker could not compute its shard; handing it out again"
        );
        let failed = {
            let mut core = self.shared.core();
            let failed = core.fail_task(worker, r.task_id, r.step, &reason, Instant::now());
            if failed.is_ok() && kind == proto::FailureKind::NonFinite {
                core.numeric_trouble(worker, r.step, &reason);
            }
            failed
        };
        failed.map_err(|e| self.refuse(worker, &address, e))?;
        self.shared.notify();
        Ok(Response::new(FailureResponse {}))
    }
}

/// The longest failure reason kept from a worker's report.
const MAX_REASON_CHARS: usize = 500;

/// Why a node's gradient cannot be used.
struct Unusable {
    text: String,
    /// Finite, but over `--max-node-grad-norm`.
    over_bound: bool,
}

/// A node of a submission whose parts are coming in.
struct OpenNode {
    node: Node,
    values: PartsDecoder,
    loss_sum: f64,
}

/// Checks a node's gradient by its L2 norm (taken while it was decoded, NaN or infinite when a
/// value is): no NaN or infinite value (or loss), and a norm per example within `bound`
/// (`--max-node-grad-norm`).
fn check_gradient(
    norm: f64,
    loss_sum: f64,
    examples: usize,
    bound: Option<f64>,
) -> Result<(), Unusable> {
    if !norm.is_finite() || !loss_sum.is_finite() {
        return Err(Unusable {
            text: "gradient contains NaN or Inf".into(),
            over_bound: false,
        });
    }
    let per_example = norm / examples.max(1) as f64;
    match bound {
        Some(b) if per_example > b => Err(Unusable {
            text: format!(
                "gradient norm {per_example:.3e} per example is over the bound {b:e} (--max-node-grad-norm)"
            ),
            over_bound: true,
        }),
        _ => Ok(()),
    }
}

/// The replies of one `GetWork` call.
type WorkStream = Pin<Box<dyn Stream<Item = Result<GetWorkResponse, Status>> + Send>>;

/// A one-message reply: a wait or a shutdown.
fn reply(r: Reply) -> Response<WorkStream> {
    let only = GetWorkResponse { reply: Some(r) };
    Response::new(Box::pin(futures::stream::once(async { Ok(only) })))
}

/// `params` as the messages that follow a task: each part as soon as it is written, then the
/// end; ABORTED instead when the parts stop coming (the step's SGD pass failed).
fn param_parts(
    params: WireParams,
    format: WireFormat,
) -> impl Stream<Item = Result<GetWorkResponse, Status>> {
    /// Where the stream is: the next part's index and its first value.
    struct Next {
        params: WireParams,
        index: usize,
        offset: u64,
    }
    let width = format.bytes_per_value();
    let start = Next {
        params,
        index: 0,
        offset: 0,
    };
    // `None` once the stream has ended with an error.
    futures::stream::unfold(Some(start), move |next| async move {
        let Next {
            mut params,
            index,
            offset,
        } = next?;
        match params.part(index).await {
            Ok(Some(values)) => {
                let after = Next {
                    offset: offset + (values.len() / width) as u64,
                    index: index + 1,
                    params,
                };
                let part = GetWorkResponse {
                    reply: Some(Reply::Params(TensorPart { values, offset })),
                };
                Some((Ok(part), Some(after)))
            }
            Ok(None) => None,
            Err(Abandoned) => {
                let why = "the step was abandoned before its parameters were whole";
                Some((Err(Status::aborted(why)), None))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// The offset and length of each part of a stream, or the code it ended with.
    async fn parts(
        params: WireParams,
        format: WireFormat,
    ) -> Vec<Result<(u64, usize), tonic::Code>> {
        let replies: Vec<_> = param_parts(params, format).collect().await;
        replies
            .into_iter()
            .map(|r| match r {
                Ok(GetWorkResponse {
                    reply: Some(Reply::Params(p)),
                }) => Ok((p.offset, p.values.len())),
                Ok(other) => panic!("not a part: {other:?}"),
                Err(status) => Err(status.code()),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_task_streams_every_part_with_its_offset_then_ends() {
        let values = proto::TENSOR_PART_BYTES / 2;
        let params = WireParams::whole(WireFormat::Bf16, &vec![1.0; 2 * values + 3]);
        let got = parts(params, WireFormat::Bf16).await;
        let p = proto::TENSOR_PART_BYTES;
        let v = values as u64;
        assert_eq!(got, [Ok((0, p)), Ok((v, p)), Ok((2 * v, 6))]);
    }

    #[tokio::test]
    async fn a_task_whose_pass_gives_up_gets_the_parts_written_then_aborted() {
        let (mut writer, params) = WireParams::channel(WireFormat::F32);
        writer.write(&vec![1.0; proto::TENSOR_PART_BYTES / 4 + 1]);
        drop(writer);
        let got = parts(params, WireFormat::F32).await;
        let aborted = Err(tonic::Code::Aborted);
        assert_eq!(got, [Ok((0, proto::TENSOR_PART_BYTES)), aborted]);
    }
}
