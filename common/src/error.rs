//! The one error type of this crate.

use std::path::PathBuf;

/// Errors of the shared library. Each variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "MNIST file {path} is missing (give --data-dir a directory holding the four MNIST files, gzipped or not, or let the coordinator download them)"
    )]
    MissingFile { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt: SHA-256 of its contents is {actual}, expected {expected} (delete it and fetch it again)"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path} is not a valid IDX file: {reason}")]
    BadIdx { path: PathBuf, reason: String },
    #[error("unknown model {0:?} (expected one of: seed, inception)")]
    UnknownModel(String),
    #[error("unknown pooling {0:?} (expected max or avg)")]
    UnknownPool(String),
    #[error("unknown backend {0:?} (expected flex or tch)")]
    UnknownBackend(String),
    #[error(
        "backend {backend} is not compiled into this binary (rebuild with --features {feature})"
    )]
    BackendUnavailable {
        backend: &'static str,
        feature: &'static str,
    },
    #[error("unknown device {0:?} (expected cpu or cuda:N)")]
    UnknownDevice(String),
    #[error("parameter vector has {got} values, the model has {expected}")]
    ParamCount { expected: usize, got: usize },
    #[error("parameter bytes: {0}")]
    WireLength(#[from] crate::codec::WireLengthError),
    #[error("batch is malformed: {0}")]
    BadBatch(String),
    #[error("invalid layer shape: {0}")]
    Shape(String),
    #[error("tensor data error: {0}")]
    Tensor(String),
    #[error("training diverged: {0}")]
    Diverged(String),
}
