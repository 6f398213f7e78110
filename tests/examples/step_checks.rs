//! What the coordinator's numeric checks cost per step, against a plain copy of the same bytes
//! measured in the same run: the gradient checks on every submitted node (NaN/Inf and the norm
//! bound, one pass), the mean gradient's norm (divergence and `--clip-grad-norm`), and the SGD
//! step with its fused finiteness check; the step with the norm, the step with the encode of the
//! new parameters, and two workers' nodes summed before the step, each in two passes against
//! fused; the wire codec (`common::codec`: parameters encoded once a step, each gradient
//! decoded; the encode against the value-by-value loop it replaced), the gradient intake
//! (decode, then the norm check) in two passes against fused block by block, the worker's
//! finiteness check of a sum (the same norm, against the value-by-value check with an early
//! exit it replaced), and the bf16 wire format's encode and decode, for the seed convnet's
//! 3,274,634 parameters.
//!
//!   cargo run -p cluster-tests --example step_checks [-- ROUNDS]          (default 50)

use common::sgd::{Sgd, l2_norm};
use std::hint::black_box;
use std::time::Instant;

/// Mean milliseconds of `f` over `rounds` runs, after one warm-up run.
fn time(rounds: u32, mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    for _ in 0..rounds {
        f();
    }
    started.elapsed().as_secs_f64() * 1e3 / f64::from(rounds)
}

fn main() {
    // As the coordinator and worker binaries do.
    common::process::keep_large_buffers();
    let rounds: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let n = common::model::ModelSpec::SEED.param_count();
    let grad: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect();
    let mut params: Vec<f32> = (0..n).map(|i| ((i % 89) as f32 - 44.0) * 1e-3).collect();
    let mut copy = vec![0.0f32; n];
    let mut sgd = Sgd::new(0.9, n);

    let memcpy = time(rounds, || copy.copy_from_slice(black_box(&grad)));
    let norm = time(rounds, || {
        black_box(l2_norm(black_box(&grad)));
    });
    let sgd_ms = time(rounds, || {
        // A tiny step keeps the parameters finite and changing.
        black_box(sgd.step(&mut params, black_box(&grad), 0.05, 1e-6));
    });
    println!(
        "{n} parameters ({:.1} MB), {rounds} rounds",
        (n * 4) as f64 / 1e6
    );
    println!("copy of the vector (baseline)          {memcpy:7.3} ms");
    println!(
        "gradient check / mean-gradient norm    {norm:7.3} ms  ({:.2}x the copy)",
        norm / memcpy
    );
    // The worker checks each sum before it sends it with the same norm; it used to go value
    // by value with an early exit, which the compiler cannot vectorise.
    let early_exit = time(rounds, || {
        black_box(black_box(&grad).iter().all(|v| v.is_finite()));
    });
    println!(
        "  the worker's check before, value by value with an early exit {early_exit:.3} ms ({:.2}x the norm)",
        early_exit / norm
    );
    let mut velocity = vec![0.0f32; n];
    let unchecked = time(rounds, || {
        // The same loop without the finiteness check, as it was before.
        for ((p, v), g) in params.iter_mut().zip(&mut velocity).zip(black_box(&grad)) {
            *v = 0.9 * *v + g * 1e-6;
            *p -= 0.05 * *v;
        }
    });
    println!(
        "SGD step without a check               {unchecked:7.3} ms  ({:.2}x the copy)",
        unchecked / memcpy
    );
    println!(
        "SGD step with its finiteness check     {sgd_ms:7.3} ms  ({:.2}x the copy, {:.2}x unchecked)",
        sgd_ms / memcpy,
        sgd_ms / unchecked
    );
    // The coordinator's step without clipping: the mean gradient's norm (reported) and the step.
    let two_passes_sgd = time(rounds, || {
        black_box(l2_norm(black_box(&grad)));
        black_box(sgd.step(&mut params, black_box(&grad), 0.05, 1e-6));
    });
    let fused_sgd = time(rounds, || {
        let mut squares = common::sgd::SquareSum::default();
        let g = black_box(grad.as_slice());
        black_box(sgd.step_blocks(&mut params, g, 0.05, 1e-6, |_, g| squares.add(g)));
        black_box(squares.norm());
    });
    println!(
        "norm + SGD step, two passes            {two_passes_sgd:7.3} ms  ({:.2}x the copy; fused block by block {fused_sgd:.3} ms, {:.2}x, {:.2}x two passes)",
        two_passes_sgd / memcpy,
        fused_sgd / memcpy,
        fused_sgd / two_passes_sgd
    );
    // The coordinator's step as it ends: the step, then the new parameters' wire form for the
    // next step's tasks, in two passes against encoded block by block inside the step.
    let step_then_encode = time(rounds, || {
        black_box(sgd.step(&mut params, black_box(&grad), 0.05, 1e-6));
        black_box(common::codec::encode_f32(&params));
    });
    let step_encoding = time(rounds, || {
        let mut out = Vec::with_capacity(n * 4);
        let g = black_box(grad.as_slice());
        black_box(sgd.step_blocks(&mut params, g, 0.05, 1e-6, |p, _| {
            common::codec::encode_append(common::codec::WireFormat::F32, p, &mut out)
        }));
        black_box(out);
    });
    println!(
        "SGD step + wire encode, two passes     {step_then_encode:7.3} ms  ({:.2}x the copy; fused block by block {step_encoding:.3} ms, {:.2}x, {:.2}x two passes)",
        step_then_encode / memcpy,
        step_encoding / memcpy,
        step_encoding / step_then_encode
    );
    // With two workers the step's gradient is the sum of two nodes: added into a 13 MB vector,
    // then read by the step, against added block by block as the step reads them.
    let (left, right) = (
        grad.clone(),
        grad.iter().map(|g| g * 0.5).collect::<Vec<f32>>(),
    );
    let mut sum = vec![0.0f32; n];
    let add_then_step = time(rounds, || {
        for ((s, a), b) in sum.iter_mut().zip(black_box(&left)).zip(black_box(&right)) {
            *s = a + b;
        }
        let mut out = Vec::with_capacity(n * 4);
        black_box(
            sgd.step_blocks(&mut params, sum.as_slice(), 0.05, 1e-6, |p, _| {
                common::codec::encode_append(common::codec::WireFormat::F32, p, &mut out)
            }),
        );
        black_box(out);
    });
    let root = common::tree::Node::root(2);
    let nodes = [
        (common::tree::Node::new(0, 1), left),
        (common::tree::Node::new(1, 2), right),
    ];
    let tree = common::tree::TreeSum::new(root, nodes.into()).expect("covers the root");
    let tree_step = time(rounds, || {
        let mut out = Vec::with_capacity(n * 4);
        black_box(
            sgd.step_blocks(&mut params, black_box(&tree), 0.05, 1e-6, |p, _| {
                common::codec::encode_append(common::codec::WireFormat::F32, p, &mut out)
            }),
        );
        black_box(out);
    });
    println!(
        "2 nodes summed, SGD step + encode      {add_then_step:7.3} ms  ({:.2}x the copy; summed block by block in the step {tree_step:.3} ms, {:.2}x, {:.2}x summed first)",
        add_then_step / memcpy,
        tree_step / memcpy,
        tree_step / add_then_step
    );
    let bytes = common::codec::encode_f32(&grad);
    let encode = time(rounds, || {
        black_box(common::codec::encode_f32(black_box(&grad)));
    });
    let decode = time(rounds, || {
        black_box(common::codec::decode_f32(black_box(&bytes), n).unwrap());
    });
    let encode_loop = time(rounds, || {
        let mut out = Vec::with_capacity(n * 4);
        for v in black_box(&grad) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        black_box(out);
    });
    println!(
        "wire encode (a new vector)             {encode:7.3} ms  ({:.2}x the copy; value by value {encode_loop:.3} ms, {:.2}x)",
        encode / memcpy,
        encode_loop / memcpy
    );
    println!(
        "wire decode (a new vector)             {decode:7.3} ms  ({:.2}x the copy)",
        decode / memcpy
    );
    use common::codec::{WireFormat, decode as decode_as, encode as encode_as};
    // The coordinator's intake of a submitted gradient: decoded, then checked by its norm.
    let two_passes = time(rounds, || {
        let values = common::codec::decode_f32(black_box(&bytes), n).unwrap();
        black_box(l2_norm(&values));
        black_box(values);
    });
    let fused = time(rounds, || {
        let mut d = common::codec::PartsDecoder::new(WireFormat::F32, n);
        // In the parts a worker sends.
        let values = proto::TENSOR_PART_BYTES / 4;
        for (i, part) in black_box(&bytes)
            .chunks(proto::TENSOR_PART_BYTES)
            .enumerate()
        {
            d.push_at((i * values) as u64, part).unwrap();
        }
        black_box(d.finish().unwrap());
    });
    println!(
        "decode + gradient check, two passes    {two_passes:7.3} ms  ({:.2}x the copy; in parts, fused block by block {fused:.3} ms, {:.2}x, {:.2}x two passes)",
        two_passes / memcpy,
        fused / memcpy,
        fused / two_passes
    );
    let bf16 = encode_as(WireFormat::Bf16, &grad);
    let encode_bf16 = time(rounds, || {
        black_box(encode_as(WireFormat::Bf16, black_box(&grad)));
    });
    let decode_bf16 = time(rounds, || {
        black_box(decode_as(WireFormat::Bf16, black_box(&bf16), n).unwrap());
    });
    println!(
        "bf16 wire encode / decode              {encode_bf16:7.3} / {decode_bf16:.3} ms  ({:.2}x / {:.2}x the copy of the f32 vector)",
        encode_bf16 / memcpy,
        decode_bf16 / memcpy
    );
}
