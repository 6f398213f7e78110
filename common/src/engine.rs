//! The compute engine: parameters and images in, per-example-summed gradients and predictions
//! out, on a backend chosen at run time (`flex`, pure Rust, by default; `tch`, libtorch, with
//! the `tch` feature).
//!
//! Parameters arrive as one flat vector in [`ModelSpec::params`] order, go to the device in one
//! piece and are cut there into one 1-D autodiff leaf each, reshaped inside the forward pass;
//! their gradients are summed along the reduction tree on the device, parameter by parameter,
//! joined into one flat vector in the same order, and come back one node at a time, ready for
//! the wire (on a CPU parameter by parameter, unjoined, the dense layers' first, see
//! [`Engine::node_gradients_in_pieces`]).
//!
//! Dropout masks are drawn on the host from a seed the caller gives per micro-batch, so the
//! same micro-batch gets the same mask whichever worker (or backend) computes it.

use crate::Error;
use crate::mnist::{CLASSES, INPUT_MEAN, INPUT_SCALE, INPUT_STD, PIXELS, SIDE, Split};
use crate::model::{ModelKind, ModelSpec, ParamSpec, Pool, inception};
use crate::shapes::{Padding, padding_pairs};
use crate::tree::{Node, combine_by};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::{avg_pool2d, conv2d, linear, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn::tensor::{AllocationProperty, DType, Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Which tensor library runs the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend; needs nothing installed.
    Flex,
    /// libtorch through burn-tch (CPU or CUDA); needs the `tch` feature.
    Tch,
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "flex" => Ok(BackendKind::Flex),
            "tch" => Ok(BackendKind::Tch),
            other => Err(Error::UnknownBackend(other.to_string())),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Tch => "tch",
        })
    }
}

/// The device a backend runs on: `cpu` or `cuda:N`.
pub fn device(backend: BackendKind, name: &str) -> Result<Device, Error> {
    let cuda = name.strip_prefix("cuda:").map(str::parse::<usize>);
    match (backend, name, cuda) {
        (BackendKind::Flex, "cpu", _) => Ok(Device::flex()),
        (BackendKind::Flex, _, Some(Ok(_))) => Err(Error::UnknownDevice(format!(
            "{name} (the flex backend is CPU only; use --backend tch for CUDA)"
        ))),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        (BackendKind::Tch, "cpu", _) => Ok(Device::libtorch()),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        (BackendKind::Tch, _, Some(Ok(i))) => {
            let found = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
            if i >= found {
                return Err(Error::UnknownDevice(format!(
                    "{name} (libtorch sees {found} CUDA devices)"
                )));
            }
            Ok(Device::libtorch_cuda(i))
        }
        #[cfg(not(feature = "tch"))]
        (BackendKind::Tch, _, _) => Err(Error::BackendUnavailable {
            backend: "tch",
            feature: "tch",
        }),
        _ => Err(Error::UnknownDevice(name.to_string())),
    }
}

/// Bounds the process's compute threads: rayon's global pool, which the flex backend runs on,
/// and libtorch's intra-op pool. Call once, before any tensor work.
pub fn set_compute_threads(n: usize) -> Result<(), Error> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Tensor(format!("cannot size the compute pool: {e}")))?;
    set_libtorch_threads(n);
    Ok(())
}

/// Sets libtorch's intra-op threads (may change at any time); nothing without the `tch` build.
pub fn set_libtorch_threads(n: usize) {
    #[cfg(feature = "tch")]
    tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
    #[cfg(not(feature = "tch"))]
    let _ = n;
}

/// One micro-batch to differentiate.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch<'a> {
    /// `PIXELS` bytes per image.
    pub images: &'a [u8],
    pub labels: &'a [u8],
    /// Seed of this micro-batch's dropout mask.
    pub dropout_seed: u64,
}

/// A parameter vector as [`Engine::node_gradients`] takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Params {
    /// The values (the coordinator's, a local loop's, a decoded bf16 task's). Flex keeps the
    /// vector as its tensor, without a copy.
    Values(Vec<f32>),
    /// Little-endian f32 bytes as a task brought them. libtorch copies them straight into its
    /// tensor, without a decoded vector in between (one 13.1 MB copy less per task); flex
    /// decodes them into the vector it keeps.
    LeF32(bytes::Bytes),
}

impl From<Vec<f32>> for Params {
    fn from(values: Vec<f32>) -> Self {
        Params::Values(values)
    }
}

/// Parameters as [`Engine::node_gradients_in_pieces`] takes them: whole, or the trunk's now and
/// the head's later. `E` is the caller's error type.
pub enum Incoming<'a, E> {
    Whole(Params),
    /// The trunk's values (the first [`Engine::trunk_len`] of the flat vector), and a call that
    /// waits for the head's (the rest), made once the first micro-batch's forward pass through
    /// the trunk is under way: a worker computes that while the head's 12.8 MB (seed convnet)
    /// are still on the wire. An error from `head` stops the computation.
    InTwo {
        trunk: Params,
        head: Box<dyn FnOnce() -> Result<Params, E> + 'a>,
    },
}

/// The gradient of the summed (not averaged) cross-entropy over a micro-batch, or summed over
/// the micro-batches of a tree node.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    pub values: Vec<f32>,
    pub loss_sum: f64,
    pub examples: u32,
}

/// A piece of a node's gradient sum, ready to send
/// ([`Engine::node_gradients_in_pieces`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub node: Node,
    /// Where `values` start in the flat vector ([`ModelSpec::params`] order).
    pub offset: usize,
    pub values: Vec<f32>,
    /// The node's loss sum on the node's last piece, 0 on the others (so a node's pieces add
    /// up to its loss).
    pub loss_sum: f64,
}

/// How the engine hands a node's sum out ([`Engine::node_gradients_in_pieces`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handout {
    /// Each node whole, at the end: its parameters' sums joined into one tensor on the device
    /// and read back in one piece (on a GPU, one transfer).
    Whole,
    /// Parameter by parameter, unjoined (on the host a join is one more copy of the node's
    /// 13 MB), the head's of every node before the last micro-batch's backward pass through
    /// the trunk, which runs while the caller sends them.
    ByParameter,
}

/// Where a gradient computation spent its time (wall clock, added up over calls). On a GPU the
/// host waits for running kernels only when it reads the losses and the sums back (in
/// `download`; the uploads wait too, but come first, while the queue is empty), so there
/// `forward` and `backward` count the time to queue their kernels and `download` the kernels
/// still running. Parameters that come in two pieces ([`Incoming::InTwo`]) add the wait for
/// the head's to `upload`, and on a GPU their upload, after the first micro-batch's trunk is
/// queued, the time its kernels still run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// The parameters (host copy, transfer, cut into leaves); the task's images, labels and
    /// dropout masks.
    pub upload: Duration,
    /// Forward pass and loss, micro-batch by micro-batch.
    pub forward: Duration,
    /// Backward passes (the head's, then the trunk's from the features' gradient).
    pub backward: Duration,
    /// Micro-batch gradients summed along the tree on the device.
    pub reduce: Duration,
    /// The losses and each node's sum to the host (on a GPU joined into one flat tensor and
    /// read in one transfer; on a CPU read parameter by parameter).
    pub download: Duration,
}

impl Phases {
    pub fn total(&self) -> Duration {
        self.upload + self.forward + self.backward + self.reduce + self.download
    }
}

impl std::ops::AddAssign for Phases {
    fn add_assign(&mut self, other: Phases) {
        self.upload += other.upload;
        self.forward += other.forward;
        self.backward += other.backward;
        self.reduce += other.reduce;
        self.download += other.download;
    }
}

/// Runs one model on one device.
#[derive(Debug, Clone)]
pub struct Engine {
    spec: ModelSpec,
    params: Vec<ParamSpec>,
    param_count: usize,
    keep_prob: f32,
    backend: BackendKind,
    device: Device,
    /// Whether `device` is the host's memory (`cpu`), not a GPU's.
    on_host: bool,
}

impl Engine {
    pub fn new(
        spec: ModelSpec,
        backend: BackendKind,
        device_name: &str,
        keep_prob: f32,
    ) -> Result<Self, Error> {
        let device = device(backend, device_name)?;
        // Reproducible runs: deterministic algorithms, and cuDNN picks its algorithms by
        // fixed heuristics instead of timing candidates (the winner varies run to run).
        #[cfg(feature = "tch")]
        if backend == BackendKind::Tch {
            crate::torch::set_deterministic(true);
        }
        let params = spec.params();
        Ok(Engine {
            spec,
            param_count: params.iter().map(ParamSpec::len).sum(),
            params,
            keep_prob,
            backend,
            device,
            on_host: device_name == "cpu",
        })
    }

    pub fn spec(&self) -> ModelSpec {
        self.spec
    }

    pub fn param_count(&self) -> usize {
        self.param_count
    }

    /// The device this engine computes on (its backend included).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One gradient per micro-batch, each from its own forward and backward pass (each leaf
    /// its own node of [`node_gradients`](Self::node_gradients)).
    pub fn gradients(
        &self,
        params: &[f32],
        batches: &[MicroBatch<'_>],
    ) -> Result<Vec<Gradient>, Error> {
        let leaves: Vec<Node> = (0..batches.len() as u32)
            .map(|i| Node::new(i, i + 1))
            .collect();
        self.node_gradients(params.to_vec(), 0, batches, &leaves, &mut Phases::default())
    }

    /// The gradient sums of `nodes` of the reduction tree over the micro-batches `batches`,
    /// which are the leaves `first..first + batches.len()`, each whole.
    ///
    /// The parameters go to the device once, as one flat tensor cut into the leaves; each
    /// micro-batch's gradient stays on the device, one tensor per parameter, and is summed
    /// there along the tree (the same additions, in the same order, as
    /// [`combine`](crate::tree::combine) on the host, so the bits do not depend on where they
    /// were added); each node's sum is joined into one flat tensor and comes back to the host
    /// in one piece. `params` is taken by value so that it becomes the device tensor with as
    /// few copies as the backend allows ([`Params`]). Where the time went is added to `phases`.
    pub fn node_gradients(
        &self,
        params: impl Into<Params>,
        first: u32,
        batches: &[MicroBatch<'_>],
        nodes: &[Node],
        phases: &mut Phases,
    ) -> Result<Vec<Gradient>, Error> {
        let mut whole = Vec::with_capacity(nodes.len());
        let examples = self.differentiate::<Error>(
            Incoming::Whole(params.into()),
            first,
            batches,
            nodes,
            Handout::Whole,
            phases,
            &mut |piece| {
                whole.push(piece);
                Ok(())
            },
        )?;
        Ok(whole
            .into_iter()
            .zip(examples)
            .map(|(piece, examples)| Gradient {
                values: piece.values,
                loss_sum: piece.loss_sum,
                examples,
            })
            .collect())
    }

    /// [`node_gradients`](Self::node_gradients), handing each node's sum to `ready` in pieces
    /// as soon as each is known, so the caller can send one while the next is computed. Where
    /// the device is the host, each parameter's sum is a piece (not joined: on the host a join
    /// is a copy), and the dense layers' pieces of every node (98% of the seed convnet's
    /// values) come before the last micro-batch's backward pass through the convolutions,
    /// which runs while the caller sends them; the convolutions' pieces come last, the loss
    /// on the last one. On a GPU that pass takes a fraction of a millisecond, and reading a
    /// piece back early would leave the device idle: each node comes whole, at the end. The
    /// parameters may come in two pieces too ([`Incoming::InTwo`]). The values are the same
    /// bits either way. An error from `ready` or from the parameters' `head` stops the
    /// computation and is returned as it was; the engine's own errors come as `E::from`.
    pub fn node_gradients_in_pieces<E: From<Error>>(
        &self,
        params: Incoming<'_, E>,
        first: u32,
        batches: &[MicroBatch<'_>],
        nodes: &[Node],
        phases: &mut Phases,
        ready: &mut dyn FnMut(Piece) -> Result<(), E>,
    ) -> Result<(), E> {
        let handout = if self.on_host {
            Handout::ByParameter
        } else {
            Handout::Whole
        };
        self.differentiate(params, first, batches, nodes, handout, phases, ready)
            .map(drop)
    }

    /// Computes the node sums and hands them to `ready` (see the two callers); returns each
    /// node's example count.
    #[allow(clippy::too_many_arguments)]
    fn differentiate<E: From<Error>>(
        &self,
        params: Incoming<'_, E>,
        first: u32,
        batches: &[MicroBatch<'_>],
        nodes: &[Node],
        handout: Handout,
        phases: &mut Phases,
        ready: &mut dyn FnMut(Piece) -> Result<(), E>,
    ) -> Result<Vec<u32>, E> {
        if batches.is_empty() {
            return Err(Error::BadBatch("a task without micro-batches".into()).into());
        }
        let clock = Instant::now();
        let device = self.device.clone().autodiff();
        let leaves = |params: Params, specs: &[ParamSpec]| -> Result<Vec<Tensor<1>>, Error> {
            let leaves = self.upload(params, specs, &device)?;
            Ok(leaves.into_iter().map(Tensor::require_grad).collect())
        };
        let (trunk_specs, head_specs) = self.params.split_at(self.head_start());
        let (trunk, mut head, mut later) = match params {
            Incoming::Whole(params) => {
                let mut trunk = leaves(params, &self.params)?;
                let head = trunk.split_off(self.head_start());
                (trunk, head, None)
            }
            Incoming::InTwo { trunk, head } => {
                (leaves(trunk, trunk_specs)?, Vec::new(), Some(head))
            }
        };
        phases.upload += clock.elapsed();

        // The task's inputs go to the device in one piece each (images, one-hot labels,
        // dropout masks of all its leaves), and each leaf reads its rows. On a GPU a copy from
        // pageable host memory waits for the device; done per leaf, each would stall the queue
        // of kernels the previous leaf left running. The values are the same either way.
        let clock = Instant::now();
        let rows = batches
            .iter()
            .map(|b| check_batch(b.images, b.labels))
            .collect::<Result<Vec<usize>, Error>>()?;
        let images = images_tensor(batches.iter().map(|b| b.images), &device);
        let onehot = onehot_tensor(batches.iter().map(|b| b.labels), &device);
        let masks = (self.keep_prob < 1.0).then(|| {
            let seeds = batches.iter().zip(&rows).map(|(b, &n)| (n, b.dropout_seed));
            self.dropout_masks(seeds, &device)
        });
        phases.upload += clock.elapsed();

        // Each leaf's gradient, one tensor per parameter, for the trunk and the head apart.
        let mut trunk_sums: BTreeMap<Node, Vec<Tensor<1>>> = BTreeMap::new();
        let mut head_sums: BTreeMap<Node, Vec<Tensor<1>>> = BTreeMap::new();
        // Each leaf's loss stays on the device until all leaves are queued: read one by one,
        // each read would wait for its leaf's forward pass.
        let mut losses = Vec::with_capacity(batches.len());
        let mut at = 0;
        for (i, &n) in rows.iter().enumerate() {
            let clock = Instant::now();
            let mask = masks.as_ref().map(|m| m.clone().narrow(0, at, n));
            // The graph is cut between the trunk and the head: the head's backward pass gives
            // the head's gradient and the features' gradient, which the trunk's pass then
            // starts from. The trunk sees the same gradient (times one) as it would through
            // one graph, so the bits are those of one backward pass.
            let features = self.trunk(&trunk, images.clone().narrow(0, at, n));
            let mut waited = Duration::ZERO;
            if let Some(wait) = later.take() {
                let clock = Instant::now();
                head = leaves(wait()?, head_specs)?;
                waited = clock.elapsed();
                phases.upload += waited;
            }
            let cut = features.clone().detach().require_grad();
            let logits = self.head(&head, cut.clone(), mask);
            let onehot = onehot.clone().narrow(0, at, n);
            let loss = (log_softmax(logits, 1) * onehot).sum().neg();
            at += n;
            phases.forward += clock.elapsed() - waited;

            let clock = Instant::now();
            let leaf = first + i as u32;
            let leaf = Node::new(leaf, leaf + 1);
            let grads = loss.backward();
            losses.push(loss.detach());
            head_sums.insert(leaf, self.grads_of(&head, &grads));
            let upstream = cut
                .grad(&grads)
                .ok_or_else(|| Error::Tensor("the features have no gradient".into()))?;
            phases.backward += clock.elapsed();

            if handout == Handout::ByParameter && i + 1 == rows.len() {
                // Every node's head is summed now: send it while the trunk's pass runs.
                let offset = self.trunk_len();
                for &node in nodes {
                    let sum = self.node_sum(node, first, batches.len(), &mut head_sums, phases)?;
                    self.hand_out(node, offset, sum, 0.0, phases, ready)?;
                }
            }

            let clock = Instant::now();
            let grads = (features * upstream).sum().backward();
            trunk_sums.insert(leaf, self.grads_of(&trunk, &grads));
            phases.backward += clock.elapsed();
        }
        let clock = Instant::now();
        let losses: Vec<f64> = to_vec(Tensor::cat(losses, 0))?
            .into_iter()
            .map(f64::from)
            .collect();
        phases.download += clock.elapsed();

        let mut examples = Vec::with_capacity(nodes.len());
        for &node in nodes {
            let mut sum = self.node_sum(node, first, batches.len(), &mut trunk_sums, phases)?;
            if handout == Handout::Whole {
                sum.extend(self.node_sum(node, first, batches.len(), &mut head_sums, phases)?);
                let clock = Instant::now();
                sum = vec![Tensor::cat(sum, 0)];
                phases.download += clock.elapsed();
            }
            let under = (node.lo - first) as usize..(node.hi - first) as usize;
            let loss_sum = losses[under.clone()].iter().sum();
            self.hand_out(node, 0, sum, loss_sum, phases, ready)?;
            examples.push(rows[under].iter().sum::<usize>() as u32);
        }
        Ok(examples)
    }

    /// The gradients of `leaves` in `grads`; a parameter the loss does not reach has a zero
    /// gradient.
    fn grads_of(&self, leaves: &[Tensor<1>], grads: &burn::tensor::Gradients) -> Vec<Tensor<1>> {
        leaves
            .iter()
            .map(|leaf| {
                leaf.grad(grads)
                    .unwrap_or_else(|| Tensor::zeros([leaf.dims()[0]], &self.device))
            })
            .collect()
    }

    /// The sum at `node` of the per-parameter gradients of the leaves in `sums` (taken out of
    /// it), added along the tree parameter by parameter.
    fn node_sum(
        &self,
        node: Node,
        first: u32,
        leaves: usize,
        sums: &mut BTreeMap<Node, Vec<Tensor<1>>>,
        phases: &mut Phases,
    ) -> Result<Vec<Tensor<1>>, Error> {
        let clock = Instant::now();
        let add = &mut |a: Vec<Tensor<1>>, b: Vec<Tensor<1>>| {
            a.into_iter().zip(b).map(|(a, b)| a + b).collect()
        };
        let sum = combine_by(node, sums, add).ok_or_else(|| {
            Error::BadBatch(format!(
                "node {}..{} is not made of the leaves {first}..{} (once each)",
                node.lo,
                node.hi,
                first + leaves as u32
            ))
        })?;
        phases.reduce += clock.elapsed();
        Ok(sum)
    }

    /// Reads `node`'s sums of consecutive stretches of the flat vector (one per parameter, or
    /// one joined for them all), the first at `offset`, and hands each to `ready` as a piece,
    /// `loss_sum` on the last (on an empty piece when there are none, so the loss is never
    /// lost).
    fn hand_out<E: From<Error>>(
        &self,
        node: Node,
        mut offset: usize,
        sums: Vec<Tensor<1>>,
        loss_sum: f64,
        phases: &mut Phases,
        ready: &mut dyn FnMut(Piece) -> Result<(), E>,
    ) -> Result<(), E> {
        if sums.is_empty() {
            return ready(Piece {
                node,
                offset,
                values: Vec::new(),
                loss_sum,
            });
        }
        let last = sums.len() - 1;
        for (i, sum) in sums.into_iter().enumerate() {
            let clock = Instant::now();
            let values = to_vec(sum)?;
            phases.download += clock.elapsed();
            let len = values.len();
            ready(Piece {
                node,
                offset,
                values,
                loss_sum: if i == last { loss_sum } else { 0.0 },
            })?;
            offset += len;
        }
        Ok(())
    }

    /// The index of the first of the head's parameters (the two dense layers, weight and bias
    /// each, which both models end with).
    fn head_start(&self) -> usize {
        self.params.len() - 4
    }

    /// How many of the flat vector's values are the trunk's (the convolutions'): the head's
    /// start there.
    pub fn trunk_len(&self) -> usize {
        self.params[..self.head_start()]
            .iter()
            .map(ParamSpec::len)
            .sum()
    }

    /// Predicted classes for `images`, evaluated in chunks with dropout off.
    pub fn predict(&self, params: &[f32], images: &[u8]) -> Result<Vec<u8>, Error> {
        const CHUNK: usize = 500;
        let leaves = self.upload(params.to_vec().into(), &self.params, &self.device)?;
        let mut out = Vec::with_capacity(images.len() / PIXELS);
        for chunk in images.chunks(CHUNK * PIXELS) {
            let logits = self.forward(&leaves, images_tensor([chunk], &self.device), None);
            let classes = logits.argmax(1).into_data();
            let classes = classes
                .convert::<i64>()
                .try_into_vec::<i64>()
                .map_err(|e| Error::Tensor(format!("{e:?}")))?;
            out.extend(classes.into_iter().map(|c| c as u8));
        }
        Ok(out)
    }

    /// Fraction of `split` classified correctly.
    pub fn accuracy(&self, params: &[f32], split: &Split) -> Result<f64, Error> {
        if split.is_empty() {
            return Ok(0.0);
        }
        let predicted = self.predict(params, &split.images)?;
        let correct = predicted
            .iter()
            .zip(&split.labels)
            .filter(|(p, l)| p == l)
            .count();
        Ok(correct as f64 / split.len() as f64)
    }

    /// The parameters of `specs` on `device`: one flat tensor (the vector itself where the
    /// device is the host), cut into one tensor per parameter (views of it where the backend
    /// has views).
    fn upload(
        &self,
        params: Params,
        specs: &[ParamSpec],
        device: &Device,
    ) -> Result<Vec<Tensor<1>>, Error> {
        let n: usize = specs.iter().map(ParamSpec::len).sum();
        let data = match params {
            Params::Values(values) if values.len() == n => TensorData::new(values, [n]),
            Params::Values(values) => {
                return Err(Error::ParamCount {
                    expected: n,
                    got: values.len(),
                });
            }
            // libtorch reads the bytes as they are (native f32: little-endian here).
            Params::LeF32(bytes)
                if self.backend == BackendKind::Tch
                    && cfg!(target_endian = "little")
                    && bytes.len() == 4 * n =>
            {
                let shared = burn::tensor::Bytes::from_shared(bytes, AllocationProperty::Other);
                TensorData::from_bytes(shared, [n], DType::F32)
            }
            Params::LeF32(bytes) => {
                // Also the length check of every backend's bytes.
                TensorData::new(crate::codec::decode_f32(&bytes, n)?, [n])
            }
        };
        let flat = Tensor::<1>::from_data(data, device);
        let mut at = 0;
        Ok(specs
            .iter()
            .map(|p| {
                let piece = flat.clone().slice(at..at + p.len());
                at += p.len();
                piece
            })
            .collect())
    }

    /// The dropout masks of micro-batches of `(rows, seed)`, one after the other, each drawn
    /// from its own seed (so a micro-batch's mask is the same whatever comes before it).
    fn dropout_masks(
        &self,
        batches: impl IntoIterator<Item = (usize, u64)>,
        device: &Device,
    ) -> Tensor<2> {
        let hidden = hidden_width(self.spec);
        let keep = self.keep_prob;
        let mut mask = Vec::new();
        for (rows, seed) in batches {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            mask.extend((0..rows * hidden).map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            }));
        }
        let rows = mask.len() / hidden;
        Tensor::from_data(TensorData::new(mask, [rows, hidden]), device)
    }

    /// # Shapes
    /// - `x`: `[n, 1, 28, 28]`
    /// - `dropout`: `[n, hidden]`, or `None` for evaluation
    /// - returns logits `[n, 10]`
    fn forward(&self, leaves: &[Tensor<1>], x: Tensor<4>, dropout: Option<Tensor<2>>) -> Tensor<2> {
        let (trunk, head) = leaves.split_at(self.head_start());
        self.head(head, self.trunk(trunk, x), dropout)
    }

    /// The convolutions and pools, with the trunk's leaves (the parameters before the head).
    ///
    /// # Shapes
    /// - `x`: `[n, 1, 28, 28]`
    /// - returns the features, flattened in PyTorch's (NCHW) order: `[n, flat_features]`
    fn trunk(&self, leaves: &[Tensor<1>], x: Tensor<4>) -> Tensor<2> {
        let mut w = Weights {
            leaves,
            specs: &self.params,
            next: 0,
        };
        let pool = self.spec.pool;
        let x = relu(w.conv(x));
        let x = pool2d(x, pool, 2, 2);
        let x = match self.spec.kind {
            ModelKind::Seed => relu(w.conv(x)),
            ModelKind::Inception => {
                let b1 = relu(w.conv(x.clone()));
                let reduced = relu(w.conv(x.clone()));
                let b2 = relu(w.conv(reduced));
                let reduced = relu(w.conv(x.clone()));
                let b3 = relu(w.conv(reduced));
                let b4 = relu(w.conv(pool2d(x, pool, 3, 1)));
                let cat = Tensor::cat(vec![b1, b2, b3, b4], 1);
                debug_assert_eq!(cat.dims()[1], inception::OUT);
                cat
            }
        };
        let x = pool2d(x, pool, 2, 2);
        let [n, c, h, wd] = x.dims();
        x.reshape([n, c * h * wd])
    }

    /// The two dense layers, with the head's leaves.
    ///
    /// # Shapes
    /// - `x`: `[n, flat_features]`
    /// - `dropout`: `[n, hidden]`, or `None` for evaluation
    /// - returns logits `[n, 10]`
    fn head(&self, leaves: &[Tensor<1>], x: Tensor<2>, dropout: Option<Tensor<2>>) -> Tensor<2> {
        let mut w = Weights {
            leaves,
            specs: &self.params[self.head_start()..],
            next: 0,
        };
        let mut x = relu(w.dense(x));
        if let Some(mask) = dropout {
            x = x * mask;
        }
        w.dense(x)
    }
}

/// Width of the layer dropout applies to.
fn hidden_width(spec: ModelSpec) -> usize {
    match spec.kind {
        ModelKind::Seed => crate::model::SEED_HIDDEN,
        ModelKind::Inception => inception::HIDDEN,
    }
}

/// Hands out the parameter leaves in order, reshaped for their layer.
struct Weights<'a> {
    leaves: &'a [Tensor<1>],
    specs: &'a [ParamSpec],
    next: usize,
}

impl Weights<'_> {
    fn take(&mut self) -> (Tensor<1>, &ParamSpec) {
        let i = self.next;
        self.next += 1;
        (self.leaves[i].clone(), &self.specs[i])
    }

    /// A stride-1 SAME convolution with the next weight and bias.
    fn conv(&mut self, x: Tensor<4>) -> Tensor<4> {
        let (weight, spec) = self.take();
        let [o, i, kh, kw] = [spec.shape[0], spec.shape[1], spec.shape[2], spec.shape[3]];
        let weight: Tensor<4> = weight.reshape([o, i, kh, kw]);
        let (bias, _) = self.take();
        let [_, _, h, wd] = x.dims();
        let pad = |len, k| padding_pairs(len, k, 1, Padding::Same).unwrap_or((0, 0));
        let options = ConvOptions::new_with_padding([1, 1], [pad(h, kh), pad(wd, kw)], [1, 1], 1);
        conv2d(x, weight, Some(bias), options)
    }

    /// A dense layer with the next weight (held `[in, out]`) and bias.
    fn dense(&mut self, x: Tensor<2>) -> Tensor<2> {
        let (weight, spec) = self.take();
        let weight: Tensor<2> = weight.reshape([spec.shape[1], spec.shape[0]]);
        let (bias, _) = self.take();
        linear(x, weight, Some(bias))
    }
}

/// A `window`x`window` pool with TensorFlow SAME padding (padded cells never win a max and
/// are not counted in an average, as in TensorFlow).
pub fn pool2d(x: Tensor<4>, pool: Pool, window: usize, stride: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let pad = |len| padding_pairs(len, window, stride, Padding::Same).unwrap_or((0, 0));
    let padding = [pad(h), pad(w)];
    match pool {
        Pool::Max => max_pool2d(
            x,
            MaxPoolOptions::new([window, window])
                .with_stride([stride, stride])
                .with_padding_pairs(padding),
        ),
        Pool::Avg => {
            let mut options = AvgPoolOptions::new([window, window])
                .with_stride([stride, stride])
                .with_padding_pairs(padding);
            options.count_include_pad = false;
            avg_pool2d(x, options)
        }
    }
}

/// A convolution with explicit stride and padding, for checking the shape calculator.
pub fn conv_output_dims(
    input: [usize; 4],
    filters: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
) -> Result<[usize; 4], Error> {
    let [n, c, h, w] = input;
    let device = Device::flex();
    let x = Tensor::<4>::zeros([n, c, h, w], &device);
    let weight = Tensor::<4>::zeros([filters, c, kernel, kernel], &device);
    let options = ConvOptions::new_with_padding(
        [stride, stride],
        [
            padding_pairs(h, kernel, stride, padding)?,
            padding_pairs(w, kernel, stride, padding)?,
        ],
        [1, 1],
        1,
    );
    Ok(conv2d(x, weight, None, options).dims())
}

/// A pooling layer's output dims with the given padding, for checking the shape calculator.
pub fn pool_output_dims(
    input: [usize; 4],
    pool: Pool,
    window: usize,
    stride: usize,
    padding: Padding,
) -> Result<[usize; 4], Error> {
    let [n, c, h, w] = input;
    let x = Tensor::<4>::zeros([n, c, h, w], &Device::flex());
    let pads = [
        padding_pairs(h, window, stride, padding)?,
        padding_pairs(w, window, stride, padding)?,
    ];
    Ok(match pool {
        Pool::Max => max_pool2d(
            x,
            MaxPoolOptions::new([window, window])
                .with_stride([stride, stride])
                .with_padding_pairs(pads),
        ),
        Pool::Avg => avg_pool2d(
            x,
            AvgPoolOptions::new([window, window])
                .with_stride([stride, stride])
                .with_padding_pairs(pads),
        ),
    }
    .dims())
}

fn check_batch(images: &[u8], labels: &[u8]) -> Result<usize, Error> {
    let n = labels.len();
    if n == 0 || images.len() != n * PIXELS {
        return Err(Error::BadBatch(format!(
            "{} image bytes for {n} labels (want {} per image, at least one image)",
            images.len(),
            PIXELS
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= CLASSES) {
        return Err(Error::BadBatch(format!("label {bad} is not a digit")));
    }
    Ok(n)
}

/// Images (`PIXELS` bytes each, from one or more slices one after the other), normalised.
fn images_tensor<'a>(images: impl IntoIterator<Item = &'a [u8]>, device: &Device) -> Tensor<4> {
    let x: Vec<f32> = images
        .into_iter()
        .flatten()
        .map(|&p| (f32::from(p) * INPUT_SCALE - INPUT_MEAN) / INPUT_STD)
        .collect();
    let n = x.len() / PIXELS;
    Tensor::from_data(TensorData::new(x, [n, 1, SIDE, SIDE]), device)
}

/// One-hot rows of labels (from one or more slices one after the other).
fn onehot_tensor<'a>(labels: impl IntoIterator<Item = &'a [u8]>, device: &Device) -> Tensor<2> {
    let mut v = Vec::new();
    for &l in labels.into_iter().flatten() {
        let mut row = [0.0f32; CLASSES];
        row[l as usize] = 1.0;
        v.extend_from_slice(&row);
    }
    let n = v.len() / CLASSES;
    Tensor::from_data(TensorData::new(v, [n, CLASSES]), device)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, Error> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Tensor(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::output_len;

    /// Random layer geometries: the burn layers and the calculator agree on every output shape.
    #[test]
    fn burn_layers_agree_with_the_shape_calculator_on_random_sizes() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        for case in 0..150 {
            let input = rng.random_range(1..=33usize);
            let kernel = rng.random_range(1..=7usize);
            let stride = rng.random_range(1..=4usize);
            let padding = match rng.random_range(0..3) {
                0 => Padding::Same,
                1 => Padding::Valid,
                _ => Padding::Explicit(rng.random_range(0..=3)),
            };
            let Ok(want) = output_len(input, kernel, stride, padding) else {
                continue;
            };
            let conv = conv_output_dims([1, 2, input, input], 3, kernel, stride, padding).unwrap();
            assert_eq!(
                conv,
                [1, 3, want, want],
                "case {case}: conv {input} k{kernel} s{stride} {padding}"
            );
            // Pools pad at most half a window in burn.
            let half_window = padding_pairs(input, kernel, stride, padding).unwrap();
            if half_window.0.max(half_window.1) * 2 <= kernel {
                for pool in [Pool::Max, Pool::Avg] {
                    let got = pool_output_dims([1, 2, input, input], pool, kernel, stride, padding)
                        .unwrap();
                    assert_eq!(
                        got,
                        [1, 2, want, want],
                        "case {case}: {pool}-pool {input} k{kernel} s{stride} {padding}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_lecture_quiz_layer_runs_in_burn_with_the_calculators_shapes() {
        for (padding, side) in [
            (Padding::Same, 16),
            (Padding::Valid, 13),
            (Padding::Explicit(1), 14),
        ] {
            assert_eq!(
                conv_output_dims([1, 3, 32, 32], 20, 8, 2, padding).unwrap(),
                [1, 20, side, side]
            );
        }
    }

    fn digits(n: usize) -> (Vec<u8>, Vec<u8>) {
        let data = crate::mnist::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/mnist"
        )));
        match data {
            Ok(d) => (
                d.train.images[..n * PIXELS].to_vec(),
                d.train.labels[..n].to_vec(),
            ),
            Err(_) => (
                (0..n * PIXELS).map(|i| (i * 37 % 256) as u8).collect(),
                (0..n).map(|i| (i % 10) as u8).collect(),
            ),
        }
    }

    #[test]
    fn gradients_are_finite_nonzero_and_a_small_step_lowers_the_loss() {
        for kind in [ModelKind::Seed, ModelKind::Inception] {
            let spec = ModelSpec {
                kind,
                pool: Pool::Max,
            };
            let engine = Engine::new(spec, BackendKind::Flex, "cpu", 1.0).unwrap();
            let mut params = spec.init(3);
            let (images, labels) = digits(16);
            let batch = [MicroBatch {
                images: &images,
                labels: &labels,
                dropout_seed: 0,
            }];
            let g = engine.gradients(&params, &batch).unwrap().remove(0);
            assert_eq!(g.values.len(), spec.param_count());
            assert!(g.values.iter().all(|v| v.is_finite()));
            assert!(g.values.iter().any(|v| *v != 0.0));
            for (p, d) in params.iter_mut().zip(&g.values) {
                *p -= 0.01 * d / 16.0;
            }
            let after = engine.gradients(&params, &batch).unwrap().remove(0);
            assert!(
                after.loss_sum < g.loss_sum,
                "{kind}: {} -> {}",
                g.loss_sum,
                after.loss_sum
            );
        }
    }

    /// A task's inputs go to the device in one piece and each leaf reads its rows: a leaf's
    /// gradient and loss must not depend on the leaves before it (the worker-count invariance
    /// rests on it). Leaves of unequal sizes, dropout on; on libtorch too in a `tch` build.
    #[test]
    fn a_leaf_computed_with_others_equals_the_leaf_computed_alone() {
        for backend in cpu_backends() {
            leaves_together_and_alone_agree(backend);
        }
    }

    /// The backends to test on the CPU: flex, and libtorch in a `tch` build.
    fn cpu_backends() -> impl Iterator<Item = BackendKind> {
        let tch = cfg!(feature = "tch").then_some(BackendKind::Tch);
        std::iter::once(BackendKind::Flex).chain(tch)
    }

    /// Three micro-batches of unequal sizes (5, 2 and 5 images), each with its dropout seed.
    fn unequal_leaves<'a>(images: &'a [u8], labels: &'a [u8]) -> Vec<MicroBatch<'a>> {
        [0usize, 5, 7, 12]
            .windows(2)
            .enumerate()
            .map(|(i, w)| MicroBatch {
                images: &images[w[0] * PIXELS..w[1] * PIXELS],
                labels: &labels[w[0]..w[1]],
                dropout_seed: 100 + i as u64,
            })
            .collect()
    }

    /// Asserts two computations gave the same bits, leaf by leaf.
    fn assert_same_bits(a: &[Gradient], b: &[Gradient], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (a, b)) in a.iter().zip(b).enumerate() {
            assert_eq!(a.examples, b.examples, "{what}, leaf {i}");
            assert_eq!(
                a.loss_sum.to_bits(),
                b.loss_sum.to_bits(),
                "{what}, leaf {i}: loss"
            );
            let same = a
                .values
                .iter()
                .zip(&b.values)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{what}, leaf {i}: gradients differ");
        }
    }

    fn leaves_together_and_alone_agree(backend: BackendKind) {
        let engine = Engine::new(ModelSpec::SEED, backend, "cpu", 0.75).unwrap();
        let params = ModelSpec::SEED.init(5);
        let (images, labels) = digits(12);
        let batches = unequal_leaves(&images, &labels);
        let together = engine.gradients(&params, &batches).unwrap();
        let alone: Vec<Gradient> = batches
            .iter()
            .map(|b| engine.gradients(&params, &[*b]).unwrap().remove(0))
            .collect();
        assert_same_bits(&together, &alone, &format!("{backend}, together and alone"));
    }

    /// The graph cut between trunk and head changes no bit: a micro-batch's gradient and loss
    /// equal those of one backward pass through the whole network, dropout on. On libtorch too
    /// in a `tch` build.
    #[test]
    fn the_cut_graph_gives_the_bits_of_one_backward_pass() {
        for backend in cpu_backends() {
            let engine = Engine::new(ModelSpec::SEED, backend, "cpu", 0.75).unwrap();
            let params = ModelSpec::SEED.init(13);
            let (images, labels) = digits(5);
            let batch = MicroBatch {
                images: &images,
                labels: &labels,
                dropout_seed: 77,
            };
            let cut = engine.gradients(&params, &[batch]).unwrap().remove(0);

            let device = engine.device.clone().autodiff();
            let leaves: Vec<Tensor<1>> = engine
                .upload(params.clone().into(), &engine.params, &device)
                .unwrap()
                .into_iter()
                .map(Tensor::require_grad)
                .collect();
            let mask = engine.dropout_masks([(labels.len(), 77)], &device);
            let logits = engine.forward(&leaves, images_tensor([&images[..]], &device), Some(mask));
            let onehot = onehot_tensor([&labels[..]], &device);
            let loss = (log_softmax(logits, 1) * onehot).sum().neg();
            let grads = loss.backward();
            let one_pass = Gradient {
                values: to_vec(Tensor::cat(engine.grads_of(&leaves, &grads), 0)).unwrap(),
                loss_sum: f64::from(to_vec(loss.detach()).unwrap()[0]),
                examples: labels.len() as u32,
            };
            assert_same_bits(&[one_pass], &[cut], &format!("{backend}, one pass and cut"));
        }
    }

    /// A worker's way in: the parameters in two pieces (the trunk's as values, the head's as
    /// wire bytes, as they come) and the node sums handed out in pieces. Each node's pieces
    /// cover its vector once and hold the bits [`Engine::node_gradients`] gives whole, with
    /// the node's loss; on the host one piece a parameter, the head's of all nodes first. On
    /// libtorch too in a `tch` build.
    #[test]
    fn pieces_from_parameters_in_two_give_the_bits_of_the_whole_computation() {
        for backend in cpu_backends() {
            let engine = Engine::new(ModelSpec::SEED, backend, "cpu", 0.75).unwrap();
            let params = ModelSpec::SEED.init(11);
            let (images, labels) = digits(12);
            let batches = unequal_leaves(&images, &labels);
            let nodes = [Node::new(0, 2), Node::new(2, 3)];
            let mut phases = Phases::default();
            let whole = engine
                .node_gradients(params.clone(), 0, &batches, &nodes, &mut phases)
                .unwrap();
            let cut = engine.trunk_len();
            let head = crate::codec::encode_f32(&params[cut..]);
            let incoming: Incoming<'_, Error> = Incoming::InTwo {
                trunk: params[..cut].to_vec().into(),
                head: Box::new(move || Ok(Params::LeF32(head.into()))),
            };
            let mut pieces = Vec::new();
            engine
                .node_gradients_in_pieces(incoming, 0, &batches, &nodes, &mut phases, &mut |p| {
                    pieces.push(p);
                    Ok(())
                })
                .unwrap();
            // One piece a parameter: the head's of both nodes, then the trunk's, the loss on
            // each node's last.
            let starts: Vec<usize> = engine
                .params
                .iter()
                .scan(0, |at, p| {
                    let start = *at;
                    *at += p.len();
                    Some(start)
                })
                .collect();
            let (trunk_starts, head_starts) = starts.split_at(engine.head_start());
            let mut want: Vec<(u32, usize)> = Vec::new();
            for part in [head_starts, trunk_starts] {
                for node in nodes {
                    want.extend(part.iter().map(|&at| (node.lo, at)));
                }
            }
            let order: Vec<(u32, usize)> = pieces.iter().map(|p| (p.node.lo, p.offset)).collect();
            assert_eq!(order, want, "{backend}");
            assert_eq!(head_starts[0], cut, "{backend}");
            for node in nodes {
                let last = pieces.iter().rposition(|p| p.node == node).unwrap();
                let others = pieces.iter().take(last).filter(|p| p.node == node);
                assert!(others.map(|p| p.loss_sum).all(|l| l == 0.0), "{backend}");
            }
            let joined: Vec<Gradient> = nodes
                .iter()
                .zip(&whole)
                .map(|(&node, w)| {
                    let mut values = vec![f32::NAN; w.values.len()];
                    let mut loss_sum = 0.0;
                    for p in pieces.iter().filter(|p| p.node == node) {
                        values[p.offset..p.offset + p.values.len()].copy_from_slice(&p.values);
                        loss_sum += p.loss_sum;
                    }
                    Gradient {
                        values,
                        loss_sum,
                        examples: w.examples,
                    }
                })
                .collect();
            assert_same_bits(&whole, &joined, &format!("{backend}, pieces and whole"));
        }
    }

    /// The head's parameters that never come stop the computation with the caller's error,
    /// before any piece is handed out.
    #[test]
    fn parameters_that_do_not_come_stop_the_computation() {
        let engine = Engine::new(ModelSpec::SEED, BackendKind::Flex, "cpu", 0.75).unwrap();
        let params = ModelSpec::SEED.init(1);
        let (images, labels) = digits(4);
        let batch = [MicroBatch {
            images: &images,
            labels: &labels,
            dropout_seed: 0,
        }];
        let incoming = Incoming::InTwo {
            trunk: params[..engine.trunk_len()].to_vec().into(),
            head: Box::new(|| Err(Error::Tensor("the stream broke".into()))),
        };
        let mut pieces = 0;
        let err = engine
            .node_gradients_in_pieces(
                incoming,
                0,
                &batch,
                &[Node::new(0, 1)],
                &mut Phases::default(),
                &mut |_| {
                    pieces += 1;
                    Ok(())
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("the stream broke"), "{err}");
        assert_eq!(pieces, 0);
    }

    /// A task's parameters go to the engine as the wire's bytes (f32): the gradients must be
    /// those of the decoded values, the bytes at any alignment (libtorch reads them in place;
    /// flex decodes them). On libtorch too in a `tch` build.
    #[test]
    fn parameters_as_wire_bytes_give_the_gradients_of_their_values() {
        for backend in cpu_backends() {
            let engine = Engine::new(ModelSpec::SEED, backend, "cpu", 0.75).unwrap();
            let params = ModelSpec::SEED.init(7);
            let (images, labels) = digits(12);
            let batches = unequal_leaves(&images, &labels);
            let leaves: Vec<Node> = (0..3).map(|i| Node::new(i, i + 1)).collect();
            let mut phases = Phases::default();
            let mut gradients = |p: Params| {
                engine
                    .node_gradients(p, 0, &batches, &leaves, &mut phases)
                    .unwrap()
            };
            let from_values = gradients(Params::Values(params.clone()));
            // One byte in front, so the values start off their alignment.
            let mut wire = vec![0u8];
            wire.extend_from_slice(&crate::codec::encode_f32(&params));
            let unaligned = bytes::Bytes::from(wire).slice(1..);
            let from_bytes = gradients(Params::LeF32(unaligned));
            assert_same_bits(
                &from_values,
                &from_bytes,
                &format!("{backend}, bytes and values"),
            );
            // One value short, and half a value short.
            for short in [4 * params.len() - 4, 4 * params.len() - 2] {
                let bytes = Params::LeF32(bytes::Bytes::from(vec![0u8; short]));
                assert!(matches!(
                    engine.node_gradients(bytes, 0, &batches, &leaves, &mut phases),
                    Err(Error::WireLength(e)) if e.got_bytes == short
                ));
            }
        }
    }

    /// `set_deterministic` turns off libtorch's fill of new tensors with NaN. With the fill on,
    /// any read of memory no op wrote would change the result, so the same bits with and
    /// without it hold that the fill was not needed. (The switch is process-wide; the suite
    /// runs the libtorch tests one at a time.)
    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_gradients_do_not_change_with_the_fill_of_new_tensors() {
        let engine = Engine::new(ModelSpec::SEED, BackendKind::Tch, "cpu", 0.75).unwrap();
        let params = ModelSpec::SEED.init(9);
        let (images, labels) = digits(12);
        let batches = unequal_leaves(&images, &labels);
        crate::torch::set_fill_uninitialized(true);
        let filled = engine.gradients(&params, &batches);
        crate::torch::set_fill_uninitialized(false);
        let plain = engine.gradients(&params, &batches).unwrap();
        assert_same_bits(&filled.unwrap(), &plain, "with and without the fill");
    }

    #[test]
    fn a_batch_with_a_bad_label_or_size_is_refused() {
        let engine = Engine::new(ModelSpec::SEED, BackendKind::Flex, "cpu", 1.0).unwrap();
        let params = ModelSpec::SEED.init(1);
        let images = vec![0u8; PIXELS];
        let bad = [MicroBatch {
            images: &images,
            labels: &[12],
            dropout_seed: 0,
        }];
        let err = engine.gradients(&params, &bad).unwrap_err().to_string();
        assert!(err.contains("label 12 is not a digit"), "{err}");
        let short = [MicroBatch {
            images: &images[1..],
            labels: &[1],
            dropout_seed: 0,
        }];
        let err = engine.gradients(&params, &short).unwrap_err().to_string();
        assert!(err.contains("783 image bytes for 1 labels"), "{err}");
        // A good batch with a parameter vector one value short: the count is what is refused.
        let good = [MicroBatch {
            images: &images,
            labels: &[1],
            dropout_seed: 0,
        }];
        assert!(matches!(
            engine.gradients(&params[1..], &good),
            Err(Error::ParamCount { got, .. }) if got == params.len() - 1
        ));
    }
}
