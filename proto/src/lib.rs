//! The gRPC contract of the training cluster: generated tonic/prost types for `dtrain.v1`, the
//! protocol version, the message-size bound and the tensor wire encoding; and [`transport`], the
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
pub const PROTOCOL_VERSION: u32 = 3;

/// The largest gRPC message either side accepts or sends: 64 MiB. A task carries one parameter
/// vector (13.1 MB for the seed convnet) plus at most a batch of images (785 bytes each); a
/// submission streams one message per reduction-tree node, each one gradient vector. The
/// coordinator checks both sizes for its job at start ([`largest_task_bytes`],
/// [`largest_submission_part_bytes`]). Anything larger is
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

/// Encodes f32 values as little-endian bytes, the wire form of every tensor.
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes little-endian f32 bytes, refusing a length that is not `expected` values.
pub fn decode_f32(bytes: &[u8], expected: usize) -> Result<Vec<f32>, WireLengthError> {
    if bytes.len() != expected * 4 {
        return Err(WireLengthError {
            expected,
            got_bytes: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A tensor on the wire had the wrong number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireLengthError {
    pub expected: usize,
    pub got_bytes: usize,
}

impl std::fmt::Display for WireLengthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expected {} f32 values ({} bytes), got {} bytes",
            self.expected,
            self.expected * 4,
            self.got_bytes
        )
    }
}

impl std::error::Error for WireLengthError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_through_the_wire_form() {
        let v = vec![0.0, -1.5, f32::MAX, 1e-30];
        assert_eq!(decode_f32(&encode_f32(&v), 4).unwrap(), v);
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let err = decode_f32(&[0u8; 7], 2).unwrap_err();
        assert_eq!(err.got_bytes, 7);
    }
}
