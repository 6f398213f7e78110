//! The networks: their parameters in one fixed order (the flat codec every vector on the wire
//! and in a checkpoint uses), their initialisation, and a Keras-style summary.
//!
//! Parameters are named and laid out as PyTorch's `torch.nn` would hold them
//! (`conv1.weight [32,1,5,5]`, `fc1.weight [1024,3136]` as `[out,in]`, flatten order NCHW),
//! so a checkpoint loads straight into the equivalent PyTorch model.

use crate::Error;
use crate::mnist::{CLASSES, SIDE};
use crate::shapes::{Conv, Padding, Volume, pool};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which network to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// The lecture's convnet: conv 5x5x32, pool, conv 5x5x64, pool, dense 1024, dense 10.
    Seed,
    /// A small inception-style network (see [`inception`]).
    Inception,
}

/// The pooling used to halve the feature maps (and in the inception pool branch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Max,
    Avg,
}

impl FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "seed" => Ok(ModelKind::Seed),
            "inception" => Ok(ModelKind::Inception),
            other => Err(Error::UnknownModel(other.to_string())),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Seed => "seed",
            ModelKind::Inception => "inception",
        })
    }
}

impl FromStr for Pool {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "max" => Ok(Pool::Max),
            "avg" => Ok(Pool::Avg),
            other => Err(Error::UnknownPool(other.to_string())),
        }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pool::Max => "max",
            Pool::Avg => "avg",
        })
    }
}

/// A model: its kind and pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub pool: Pool,
}

/// One parameter tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// PyTorch's name, e.g. `conv1.weight`.
    pub name: String,
    /// PyTorch's shape: `[out, in, kh, kw]` for convolutions, `[out, in]` for dense layers.
    pub shape: Vec<usize>,
    /// Inputs feeding one output, for the initialisation bound `1/sqrt(fan_in)`.
    pub fan_in: usize,
    /// Dense weights are held transposed (`[in, out]`, burn's layout, which spares a
    /// transpose in every forward and backward pass); checkpoints convert to `shape`.
    pub transposed: bool,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts this parameter between the flat vector's layout and PyTorch's.
    /// `to_torch` picks the direction; non-transposed parameters are copied as they are.
    pub fn convert_layout(&self, values: &[f32], to_torch: bool) -> Vec<f32> {
        if !self.transposed {
            return values.to_vec();
        }
        let [rows, cols] = if to_torch {
            [self.shape[1], self.shape[0]]
        } else {
            [self.shape[0], self.shape[1]]
        };
        let mut out = vec![0.0; values.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = values[r * cols + c];
            }
        }
        out
    }
}

/// The inception module's branch widths (14x14x32 in, 14x14x56 out).
pub mod inception {
    /// 1x1 branch.
    pub const B1: usize = 16;
    /// 1x1 reduction before the 3x3, and the 3x3 width.
    pub const B2_REDUCE: usize = 16;
    pub const B2: usize = 24;
    /// 1x1 reduction before the 5x5, and the 5x5 width.
    pub const B3_REDUCE: usize = 4;
    pub const B3: usize = 8;
    /// 1x1 projection after the 3x3 stride-1 pool.
    pub const B4: usize = 8;
    pub const OUT: usize = B1 + B2 + B3 + B4;
    /// Hidden width of the classifier.
    pub const HIDDEN: usize = 256;
}

/// Width of the seed network's hidden dense layer.
pub const SEED_HIDDEN: usize = 1024;

fn conv(name: &str, out: usize, inp: usize, k: usize) -> [ParamSpec; 2] {
    [
        ParamSpec {
            name: format!("{name}.weight"),
            shape: vec![out, inp, k, k],
            fan_in: inp * k * k,
            transposed: false,
        },
        ParamSpec {
            name: format!("{name}.bias"),
            shape: vec![out],
            fan_in: inp * k * k,
            transposed: false,
        },
    ]
}

fn dense(name: &str, out: usize, inp: usize) -> [ParamSpec; 2] {
    [
        ParamSpec {
            name: format!("{name}.weight"),
            shape: vec![out, inp],
            fan_in: inp,
            transposed: true,
        },
        ParamSpec {
            name: format!("{name}.bias"),
            shape: vec![out],
            fan_in: inp,
            transposed: false,
        },
    ]
}

/// One row of [`ModelSpec::summary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    pub layer: String,
    pub output: String,
    pub params: usize,
}

/// Cuts a flat vector into its parameters' pieces, in order: the one walk over the flat layout.
/// `None` when its length is not the parameters' total.
pub fn split_flat<'v>(params: &[ParamSpec], flat: &'v [f32]) -> Option<Vec<&'v [f32]>> {
    if flat.len() != params.iter().map(ParamSpec::len).sum::<usize>() {
        return None;
    }
    let mut rest = flat;
    Some(
        params
            .iter()
            .map(|p| {
                let (head, tail) = rest.split_at(p.len());
                rest = tail;
                head
            })
            .collect(),
    )
}

impl ModelSpec {
    pub const SEED: ModelSpec = ModelSpec {
        kind: ModelKind::Seed,
        pool: Pool::Max,
    };

    /// The parameters in their one fixed order.
    pub fn params(&self) -> Vec<ParamSpec> {
        use inception::*;
        let flat = self.flat_features();
        match self.kind {
            ModelKind::Seed => [
                conv("conv1", 32, 1, 5),
                conv("conv2", 64, 32, 5),
                dense("fc1", SEED_HIDDEN, flat),
                dense("fc2", CLASSES, SEED_HIDDEN),
            ]
            .concat(),
            ModelKind::Inception => [
                conv("conv1", 32, 1, 5),
                conv("inception.b1", B1, 32, 1),
                conv("inception.b2_reduce", B2_REDUCE, 32, 1),
                conv("inception.b2", B2, B2_REDUCE, 3),
                conv("inception.b3_reduce", B3_REDUCE, 32, 1),
                conv("inception.b3", B3, B3_REDUCE, 5),
                conv("inception.b4", B4, 32, 1),
                dense("fc1", HIDDEN, flat),
                dense("fc2", CLASSES, HIDDEN),
            ]
            .concat(),
        }
    }

    /// Features entering the first dense layer: 7x7x64 = 3136 (seed) or 7x7x56 (inception).
    pub fn flat_features(&self) -> usize {
        let side = SIDE / 4;
        side * side
            * match self.kind {
                ModelKind::Seed => 64,
                ModelKind::Inception => inception::OUT,
            }
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.params().iter().map(ParamSpec::len).sum()
    }

    /// PyTorch's default initialisation, drawn from `seed`: every weight and bias uniform in
    /// `±1/sqrt(fan_in)`.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(self.param_count());
        for p in self.params() {
            let bound = 1.0 / (p.fan_in as f32).sqrt();
            out.extend((0..p.len()).map(|_| rng.random_range(-bound..bound)));
        }
        out
    }

    /// The layers with their output shapes and parameter counts, like Keras' `model.summary()`.
    pub fn summary(&self) -> Result<Vec<SummaryRow>, Error> {
        use inception::*;
        let input = Volume::new(SIDE, SIDE, 1);
        let mut rows = vec![SummaryRow {
            layer: "input".into(),
            output: input.to_string(),
            params: 0,
        }];
        let add_conv =
            |rows: &mut Vec<SummaryRow>, name: &str, input: Volume, k: usize, filters: usize| {
                let s = Conv {
                    input,
                    filter: (k, k),
                    filters,
                    stride: 1,
                    padding: Padding::Same,
                }
                .shape()?;
                rows.push(SummaryRow {
                    layer: format!("{name} ({k}x{k}x{filters}, SAME) + ReLU"),
                    output: s.output.to_string(),
                    params: s.params_shared,
                });
                Ok::<Volume, Error>(s.output)
            };
        let half = |rows: &mut Vec<SummaryRow>, name: &str, v: Volume| {
            let out = pool(v, 2, 2, Padding::Same)?;
            rows.push(SummaryRow {
                layer: format!("{name} ({}-pool 2x2)", self.pool),
                output: out.to_string(),
                params: 0,
            });
            Ok::<Volume, Error>(out)
        };
        let dense_row = |name: &str, inp: usize, out: usize, extra: &str| SummaryRow {
            layer: format!("{name} (dense {inp}->{out}){extra}"),
            output: out.to_string(),
            params: inp * out + out,
        };
        let v = add_conv(&mut rows, "conv1", input, 5, 32)?;
        let v = half(&mut rows, "pool1", v)?;
        let hidden = match self.kind {
            ModelKind::Seed => {
                let v = add_conv(&mut rows, "conv2", v, 5, 64)?;
                half(&mut rows, "pool2", v)?;
                SEED_HIDDEN
            }
            ModelKind::Inception => {
                add_conv(&mut rows, "inception.b1", v, 1, B1)?;
                let r = add_conv(&mut rows, "inception.b2_reduce", v, 1, B2_REDUCE)?;
                add_conv(&mut rows, "inception.b2", r, 3, B2)?;
                let r = add_conv(&mut rows, "inception.b3_reduce", v, 1, B3_REDUCE)?;
                add_conv(&mut rows, "inception.b3", r, 5, B3)?;
                let p = pool(v, 3, 1, Padding::Same)?;
                rows.push(SummaryRow {
                    layer: format!("inception.b4_pool ({}-pool 3x3, stride 1)", self.pool),
                    output: p.to_string(),
                    params: 0,
                });
                add_conv(&mut rows, "inception.b4", p, 1, B4)?;
                let cat = Volume::new(v.height, v.width, OUT);
                rows.push(SummaryRow {
                    layer: "inception (concat)".into(),
                    output: cat.to_string(),
                    params: 0,
                });
                half(&mut rows, "pool2", cat)?;
                HIDDEN
            }
        };
        let flat = self.flat_features();
        rows.push(SummaryRow {
            layer: "flatten".into(),
            output: flat.to_string(),
            params: 0,
        });
        rows.push(dense_row("fc1", flat, hidden, " + ReLU + dropout"));
        rows.push(dense_row("fc2", hidden, CLASSES, ""));
        Ok(rows)
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}-pool)", self.kind, self.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_network_has_3274634_parameters() {
        assert_eq!(ModelSpec::SEED.param_count(), 3_274_634);
        assert_eq!(ModelSpec::SEED.flat_features(), 3136);
    }

    #[test]
    fn the_seed_summary_walks_28x28x1_to_14x14x32_to_7x7x64_to_1024_to_10() {
        let rows = ModelSpec::SEED.summary().unwrap();
        let outputs: Vec<&str> = rows.iter().map(|r| r.output.as_str()).collect();
        assert_eq!(
            outputs,
            [
                "28x28x1", "28x28x32", "14x14x32", "14x14x64", "7x7x64", "3136", "1024", "10"
            ]
        );
        let total: usize = rows.iter().map(|r| r.params).sum();
        assert_eq!(total, 3_274_634);
    }

    #[test]
    fn every_summary_total_matches_the_parameter_list() {
        for kind in [ModelKind::Seed, ModelKind::Inception] {
            for pool in [Pool::Max, Pool::Avg] {
                let spec = ModelSpec { kind, pool };
                let total: usize = spec.summary().unwrap().iter().map(|r| r.params).sum();
                assert_eq!(total, spec.param_count(), "{spec}");
            }
        }
    }

    #[test]
    fn initialisation_is_a_function_of_the_seed() {
        let a = ModelSpec::SEED.init(7);
        assert_eq!(a, ModelSpec::SEED.init(7));
        assert_ne!(a, ModelSpec::SEED.init(8));
        assert!(a[..800].iter().all(|w| w.abs() <= 0.2));
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn dense_weights_convert_to_torch_layout_and_back() {
        let p = ModelSpec::SEED
            .params()
            .into_iter()
            .find(|p| p.name == "fc2.weight")
            .unwrap();
        assert!(p.transposed && p.shape == [10, 1024]);
        let stored: Vec<f32> = (0..p.len()).map(|i| i as f32).collect();
        let torch = p.convert_layout(&stored, true);
        // torch[o][i] == stored[i][o]
        assert_eq!(torch[3 * 1024 + 7], stored[7 * 10 + 3]);
        assert_eq!(p.convert_layout(&torch, false), stored);
    }
}
