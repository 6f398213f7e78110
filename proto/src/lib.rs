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

/// Encoded `FileDescriptorSet` of `dtrain.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dtrain_descriptor");

/// Bumped on any incompatible change of the contract. A worker whose version differs is refused
/// at registration with `FAILED_PRECONDITION`.
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest gRPC message either side accepts or sends: 64 MiB. A task carries one parameter
/// vector (13.1 MB for the seed convnet) plus at most a batch of images (785 bytes each); a
/// submission streams each reduction-tree node's gradient in parts ([`gradient_parts`]). The
/// coordinator checks both sizes for its job at start ([`largest_task_bytes`],
/// [`largest_submission_part_bytes`]); no valid job comes near the bound (the largest, the
/// seed convnet with all 55,000 training images in one batch of one-image micro-batches sent
/// to one worker, is 58 MB: a unit test in the coordinator checks it). Anything larger is
/// refused by tonic with `OUT_OF_RANGE` before it is buffered whole.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Protobuf framing around the tensors of one message (tags, lengths, the header fields), and
/// per leaf or node (its size or range), generously counted.
const FRAMING_BYTES: usize = 1024;
const FRAMING_BYTES_PER_LEAF: usize = 16;

/// An upper bound of the encoded size of a task for a model of `params` parameters whose shard
/// holds `images` images in `leaves` micro-batches (a whole batch at worst).
pub fn largest_task_bytes(params: usize, images: usize, leaves: usize) -> usize {
    params * 4 + images * (784 + 1) + leaves * 2 * FRAMING_BYTES_PER_LEAF + FRAMING_BYTES
}

/// The most gradient bytes a worker puts in one message of a submission (see
/// [`gradient_parts`]): 1 MiB, the HTTP/2 frame size, so a part is one frame on the wire and the
/// coordinator decodes each while the next is in flight.
pub const GRADIENT_PART_BYTES: usize = 1024 * 1024;

/// A node's whole gradient (`whole`, in a wire format of `value_bytes` bytes per value) as the
/// parts of a submission: slices of at most [`GRADIENT_PART_BYTES`] (whole values, sharing its
/// memory), each with its offset, the loss on the first.
pub fn gradient_parts(whole: NodeGradient, value_bytes: usize) -> Vec<NodeGradient> {
    let part_len = GRADIENT_PART_BYTES / value_bytes * value_bytes;
    let gradient = &whole.gradient;
    let starts = (0..gradient.len().max(1)).step_by(part_len);
    starts
        .map(|start| NodeGradient {
            node: whole.node,
            gradient: gradient.slice(start..(start + part_len).min(gradient.len())),
            loss_sum: if start == 0 { whole.loss_sum } else { 0.0 },
            offset: (start / value_bytes) as u64,
        })
        .collect()
}

/// An upper bound of the encoded size of one message of a submission: at most one node's
/// whole gradient (workers send parts of [`GRADIENT_PART_BYTES`]; the bound allows a whole node).
pub fn largest_submission_part_bytes(params: usize) -> usize {
    params * 4 + FRAMING_BYTES
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
    use prost::bytes::Bytes;

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
        let bytes = Bytes::from(vec![7u8; GRADIENT_PART_BYTES * 5 / 2]);
        let parts = gradient_parts(whole(bytes.clone()), 4);
        let offsets: Vec<u64> = parts.iter().map(|p| p.offset).collect();
        let values = (GRADIENT_PART_BYTES / 4) as u64;
        assert_eq!(offsets, [0, values, 2 * values]);
        assert_eq!(parts[2].gradient.len(), GRADIENT_PART_BYTES / 2);
        assert_eq!(parts.iter().map(|p| p.loss_sum).sum::<f64>(), 3.5);
        assert_eq!(parts[0].loss_sum, 3.5);
        assert!(parts.iter().all(|p| p.node == Some(node)));
        assert_eq!(
            parts[1].gradient.as_ptr(),
            bytes[GRADIENT_PART_BYTES..].as_ptr()
        );
        let bf16 = gradient_parts(whole(Bytes::from(vec![0u8; 6])), 2);
        assert_eq!((bf16.len(), bf16[0].gradient.len()), (1, 6));
        let empty = gradient_parts(whole(Bytes::new()), 4);
        assert_eq!((empty.len(), empty[0].gradient.len()), (1, 0));
    }
}
