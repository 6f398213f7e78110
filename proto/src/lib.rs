//! The gRPC contract of the training cluster: generated tonic/prost types for `dtrain.v1`, the
//! protocol version and the message-size bound; and [`transport`], the
//! one place its servers and channels are set up (TLS, tokens, bounds).
//!
//! Protobuf types stop at the edge: the coordinator and worker convert them into domain types
//! (validating as they go) right after decoding.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("dtrain.v1");
}
pub use generated::*;

pub mod transport;

use prost::bytes::{Bytes, BytesMut};

/// Encoded `FileDescriptorSet` of `dtrain.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dtrain_descriptor");

/// Bumped on any incompatible change of the contract. A worker whose version differs is refused
/// at registration with `FAILED_PRECONDITION`.
pub const PROTOCOL_VERSION: u32 = 7;

/// The largest gRPC message either side accepts or sends: 64 MiB. Tensors travel in parts of
/// [`TENSOR_PART_BYTES`] (a task's parameters after it, see [`receive_params`]; a submission's
/// gradients, see [`gradient_parts`]), so the bound is for a task's images: the coordinator checks
/// both sizes for its job at start ([`largest_task_bytes`], [`largest_submission_part_bytes`]);
/// no valid job comes near the bound (the largest, all 55,000 training images in one batch of
/// one-image micro-batches sent to one worker, is 45 MB: a unit test in the coordinator checks
/// it). Anything larger is refused by tonic with `OUT_OF_RANGE` before it is buffered whole.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Protobuf framing around the tensors of one message (tags, lengths, the header fields), and
/// per leaf or node (its size or range), generously counted.
const FRAMING_BYTES: usize = 1024;
const FRAMING_BYTES_PER_LEAF: usize = 16;

/// An upper bound of the encoded size of a task (its parameters follow it in parts) whose shard
/// holds `images` images in `leaves` micro-batches (a whole batch at worst).
pub fn largest_task_bytes(images: usize, leaves: usize) -> usize {
    images * (784 + 1) + leaves * 2 * FRAMING_BYTES_PER_LEAF + FRAMING_BYTES
}

/// The most tensor bytes in one message: 1 MiB, the HTTP/2 frame size, so a part is one frame on
/// the wire and the receiver decodes (or copies) each while the next is in flight.
pub const TENSOR_PART_BYTES: usize = 1024 * 1024;

/// A piece of a node's gradient (`whole`, in a wire format of `value_bytes` bytes per value,
/// starting at value `whole.offset`) as the parts of a submission: slices of at most
/// [`TENSOR_PART_BYTES`] (whole values, sharing its memory), each with its offset, the loss on
/// the first.
pub fn gradient_parts(whole: NodeGradient, value_bytes: usize) -> Vec<NodeGradient> {
    let part_len = TENSOR_PART_BYTES / value_bytes * value_bytes;
    let gradient = &whole.gradient;
    let starts = (0..gradient.len().max(1)).step_by(part_len);
    starts
        .map(|start| NodeGradient {
            node: whole.node,
            gradient: gradient.slice(start..(start + part_len).min(gradient.len())),
            loss_sum: if start == 0 { whole.loss_sum } else { 0.0 },
            offset: whole.offset + (start / value_bytes) as u64,
        })
        .collect()
}

/// An upper bound of the encoded size of one message of a submission: at most one node's
/// whole gradient (workers send parts of [`TENSOR_PART_BYTES`]; the bound allows a whole node).
pub fn largest_submission_part_bytes(params: usize) -> usize {
    params * 4 + FRAMING_BYTES
}

impl WireFormat {
    /// How many bytes a value takes on the wire.
    pub fn bytes_per_value(self) -> usize {
        match self {
            WireFormat::F32 => 4,
            WireFormat::Bf16 => 2,
        }
    }
}

/// What a `GetWork` call brought.
#[derive(Debug)]
pub enum Work {
    /// A task and its parameters, whole, in the job's wire format.
    Task(Task, Bytes),
    /// Nothing to do yet: ask again.
    Wait,
    /// The job is over, for this reason.
    Shutdown(String),
}

/// The first message of a `GetWork` reply.
#[derive(Debug)]
pub enum Offer {
    /// A task; its parameters follow ([`receive_params`]).
    Task(Task),
    /// Nothing to do yet: ask again.
    Wait,
    /// The job is over, for this reason.
    Shutdown(String),
}

/// Reads the reply stream of a `GetWork` call: its first message, and after a task the parts of
/// its parameters (`values` values of `value_bytes` bytes), whole (see [`receive_params`]).
pub async fn receive_work(
    replies: &mut tonic::Streaming<GetWorkResponse>,
    values: usize,
    value_bytes: usize,
) -> Result<Work, tonic::Status> {
    Ok(match receive_offer(replies).await? {
        Offer::Task(task) => {
            let mut params = Bytes::new();
            let rest = receive_params(replies, values, value_bytes, values, |all| params = all);
            rest.await?;
            Work::Task(task, params)
        }
        Offer::Wait => Work::Wait,
        Offer::Shutdown(reason) => Work::Shutdown(reason),
    })
}

/// Reads the first message of a `GetWork` reply stream.
pub async fn receive_offer(
    replies: &mut tonic::Streaming<GetWorkResponse>,
) -> Result<Offer, tonic::Status> {
    use get_work_response::Reply;
    match replies.message().await? {
        Some(GetWorkResponse {
            reply: Some(Reply::Task(task)),
        }) => Ok(Offer::Task(task)),
        Some(GetWorkResponse {
            reply: Some(Reply::Shutdown(s)),
        }) => Ok(Offer::Shutdown(s.reason)),
        Some(GetWorkResponse {
            reply: Some(Reply::Wait(_)) | None,
        }) => Ok(Offer::Wait),
        Some(GetWorkResponse {
            reply: Some(Reply::Params(_)),
        }) => Err(tonic::Status::internal(
            "GetWork sent parameters before a task",
        )),
        None => Err(tonic::Status::internal("GetWork ended without a reply")),
    }
}

/// Reads the parameters that follow a task (`values` values of `value_bytes` bytes), gathered
/// into one buffer as they come, each part copied while the next is on the wire: hands the
/// first `first` values to `first_ready` as soon as they have come (a worker starts computing
/// with them), and returns the rest once the stream ends. A stream that breaks the protocol (a
/// part out of order or past the end, the vector not whole at the end) is an `INTERNAL` error;
/// a step abandoned while its parameters were streaming ends the call with `ABORTED`.
pub async fn receive_params(
    replies: &mut tonic::Streaming<GetWorkResponse>,
    values: usize,
    value_bytes: usize,
    first: usize,
    first_ready: impl FnOnce(Bytes),
) -> Result<Bytes, tonic::Status> {
    use get_work_response::Reply;
    let mut params = Gather::new(values, value_bytes);
    let mut first_ready = Some(first_ready);
    let first_bytes = first.min(values) * value_bytes;
    loop {
        if params.have() >= first_bytes
            && let Some(ready) = first_ready.take()
        {
            ready(params.take(first_bytes));
        }
        let Some(message) = replies.message().await? else {
            break;
        };
        let Some(Reply::Params(part)) = message.reply else {
            return Err(tonic::Status::internal(
                "GetWork sent something other than parameters after a task",
            ));
        };
        params.push(&part)?;
    }
    params.finish()
}

/// A task's parameters gathered from their parts (see [`receive_params`]).
struct Gather {
    /// The bytes gathered and not yet taken.
    params: BytesMut,
    /// Bytes taken from the front ([`take`](Self::take)).
    taken: usize,
    values: usize,
    value_bytes: usize,
}

impl Gather {
    fn new(values: usize, value_bytes: usize) -> Self {
        Gather {
            params: BytesMut::with_capacity(values * value_bytes),
            taken: 0,
            values,
            value_bytes,
        }
    }

    /// How many bytes have come.
    fn have(&self) -> usize {
        self.taken + self.params.len()
    }

    /// The first `bytes` of those gathered and not yet taken, taken out without a copy.
    fn take(&mut self, bytes: usize) -> Bytes {
        self.taken += bytes;
        self.params.split_to(bytes).freeze()
    }

    /// Adds the next part, refusing one out of order, of partial values or past the end.
    fn push(&mut self, part: &TensorPart) -> Result<(), tonic::Status> {
        let have = self.have();
        let in_order = part.offset.checked_mul(self.value_bytes as u64) == Some(have as u64);
        if !in_order
            || have + part.values.len() > self.values * self.value_bytes
            || !part.values.len().is_multiple_of(self.value_bytes)
        {
            return Err(tonic::Status::internal(format!(
                "a part of the task's parameters of {} bytes at value {}, after {} of {} values: \
                 parts come in order, whole values, until the vector is whole",
                part.values.len(),
                part.offset,
                have / self.value_bytes,
                self.values
            )));
        }
        self.params.extend_from_slice(&part.values);
        Ok(())
    }

    /// What was not taken, refusing a vector that is not whole.
    fn finish(self) -> Result<Bytes, tonic::Status> {
        let whole = self.values * self.value_bytes;
        if self.have() != whole {
            return Err(tonic::Status::internal(format!(
                "the task's parameters ended after {} of {whole} bytes",
                self.have()
            )));
        }
        Ok(self.params.freeze())
    }
}

/// HTTP/2 flow-control windows for the channels that carry tensors. The defaults (64 KiB) make a
/// 13 MB message wait for hundreds of window updates; a window larger than one message lets it
/// stream at memory speed. Both the coordinator's server and the worker's channel use these.
pub const STREAM_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// The largest HTTP/2 DATA frame each side accepts (the default is 16 KiB): a 13 MB tensor
/// crosses in 13 frames instead of 800.
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn part(offset: u64, bytes: usize) -> TensorPart {
        let values = (0..bytes).map(|b| b as u8).collect::<Vec<u8>>().into();
        TensorPart { values, offset }
    }

    #[test]
    fn parameters_are_gathered_from_parts_in_order_until_whole() {
        let mut gather = Gather::new(5, 4);
        gather.push(&part(0, 12)).unwrap();
        gather.push(&part(3, 8)).unwrap();
        let whole = gather.finish().unwrap();
        assert_eq!(whole.len(), 20);
        assert_eq!(&whole[12..], &part(3, 8).values[..]);
    }

    /// A worker takes the trunk's values while the rest still come: the front, taken without
    /// a copy, and the rest give the whole vector, and the checks count the front in.
    #[test]
    fn the_front_taken_early_and_the_rest_make_the_whole_vector() {
        let mut gather = Gather::new(5, 4);
        gather.push(&part(0, 12)).unwrap();
        let front = gather.take(8);
        assert_eq!(&front[..], &part(0, 8).values[..]);
        assert_eq!(gather.have(), 12);
        let late = gather.push(&part(2, 4)).unwrap_err();
        assert!(late.message().contains("after 3 of 5 values"), "{late:?}");
        gather.push(&part(3, 8)).unwrap();
        let rest = gather.finish().unwrap();
        assert_eq!(rest.len(), 12);
        assert_eq!(&rest[..4], &part(0, 12).values[8..]);
        assert_eq!(&rest[4..], &part(3, 8).values[..]);
        let mut short = Gather::new(5, 4);
        short.push(&part(0, 12)).unwrap();
        short.take(12);
        let status = short.finish().unwrap_err();
        assert!(
            status.message().contains("ended after 12 of 20 bytes"),
            "{status:?}"
        );
    }

    #[test]
    fn parts_out_of_order_of_partial_values_past_the_end_or_short_are_refused() {
        let refused = |parts: &[TensorPart]| {
            let mut gather = Gather::new(5, 4);
            let pushed: Result<(), tonic::Status> = parts.iter().try_for_each(|p| gather.push(p));
            let status = pushed.and_then(|()| gather.finish().map(drop)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Internal);
            status.message().to_string()
        };
        assert!(refused(&[part(1, 4)]).contains("at value 1, after 0 of 5"));
        assert!(refused(&[part(0, 8), part(1, 4)]).contains("in order"));
        assert!(refused(&[part(0, 6)]).contains("whole values"));
        assert!(refused(&[part(0, 16), part(4, 8)]).contains("of 8 bytes at value 4"));
        assert!(refused(&[part(0, 16)]).contains("ended after 16 of 20 bytes"));
    }

    #[test]
    fn a_gradient_is_cut_into_whole_value_parts_that_share_its_memory() {
        let node = NodeRange { lo: 2, hi: 4 };
        // 2.5 parts of f32, then bf16 (2 bytes a value), then an empty vector.
        let whole = |gradient: Bytes| NodeGradient {
            node: Some(node),
            gradient,
            loss_sum: 3.5,
            offset: 0,
        };
        let bytes = Bytes::from(vec![7u8; TENSOR_PART_BYTES * 5 / 2]);
        let parts = gradient_parts(whole(bytes.clone()), 4);
        let offsets: Vec<u64> = parts.iter().map(|p| p.offset).collect();
        let values = (TENSOR_PART_BYTES / 4) as u64;
        assert_eq!(offsets, [0, values, 2 * values]);
        assert_eq!(parts[2].gradient.len(), TENSOR_PART_BYTES / 2);
        assert_eq!(parts.iter().map(|p| p.loss_sum).sum::<f64>(), 3.5);
        assert_eq!(parts[0].loss_sum, 3.5);
        assert!(parts.iter().all(|p| p.node == Some(node)));
        assert_eq!(
            parts[1].gradient.as_ptr(),
            bytes[TENSOR_PART_BYTES..].as_ptr()
        );
        let bf16 = gradient_parts(whole(Bytes::from(vec![0u8; 6])), 2);
        assert_eq!((bf16.len(), bf16[0].gradient.len()), (1, 6));
        let empty = gradient_parts(whole(Bytes::new()), 4);
        assert_eq!((empty.len(), empty[0].gradient.len()), (1, 0));
    }
}
