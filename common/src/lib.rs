//! What the coordinator and the workers share: the convnets ([`model`]) and the codec of their
//! flat parameter vectors ([`codec`]), the MNIST reader
//! ([`mnist`]), the compute engine that turns parameters and images into gradients
//! ([`engine`]), the deterministic data order and reduction tree that make the result
//! independent of how many workers compute it ([`schedule`], [`tree`]), momentum SGD
//! ([`sgd`]), the lecture's layer-shape calculator ([`shapes`]) and a single-process
//! training loop that is the reference for the distributed one ([`train`]); and what both
//! programs do at start and stop: logging and the shutdown signal ([`process`]).

pub mod codec;
pub mod engine;
pub mod error;
pub mod mnist;
pub mod model;
pub mod process;
pub mod schedule;
pub mod sgd;
pub mod shapes;
#[cfg(feature = "tch")]
pub mod torch;
pub mod train;
pub mod tree;

pub use error::Error;
