//! What the coordinator and the workers share: the convnets ([`model`]), the MNIST reader
//! ([`mnist`]), the compute engine that turns parameters and images into gradients
//! ([`engine`]), the deterministic data order and reduction tree that make the result
//! independent of how many workers compute it ([`schedule`], [`tree`]), momentum SGD
//! ([`sgd`]), the lecture's layer-shape calculator ([`shapes`]) and a single-process
//! training loop that is the reference for the distributed one ([`train`]).

pub mod engine;
pub mod error;
pub mod mnist;
pub mod model;
pub mod schedule;
pub mod sgd;
pub mod shapes;
#[cfg(feature = "tch")]
pub mod torch;
pub mod train;
pub mod tree;

pub use error::Error;
