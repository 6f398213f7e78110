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
pub const PROTOCOL_VERSION: u32 = 4;

/// The largest gRPC message either side accepts or sends: 64 MiB. A task carries one parameter
/// vector (13.1 MB for the seed convnet) plus at most a batch of images (785 bytes each); a
/// submission streams one message per reduction-tree node, each one gradient vector. The
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

/// An upper bound of the encoded size of one message of a submission: one node's gradient.
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
