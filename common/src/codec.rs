//! The one codec for flat f32 vectors: little-endian bytes, 4 per value. It is the wire form
//! of every tensor in the protocol (parameters, gradients) and the data of every checkpoint
//! tensor (safetensors F32). Encoding and decoding are one copy each on little-endian machines
//! (`bytemuck` for the encode, a loop the compiler turns into `memcpy` for the decode;
//! `cargo run -p cluster-tests --example step_checks` measures both), and an owned vector
//! becomes the message's bytes without the encode copy ([`encode_owned`]; tonic still copies it
//! into its send buffer).
//!
//! The wire may also carry bfloat16 ([`WireFormat::Bf16`], 2 bytes per value, rounded to
//! nearest, ties to even): half the bytes, at the cost of 8 bits of mantissa on every parameter and
//! gradient in flight. The coordinator's master weights and momentum stay f32.

use bytes::Bytes;

/// How tensors travel between coordinator and workers (also the coordinator's `--wire-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WireFormat {
    /// Exact: little-endian f32.
    #[default]
    F32,
    /// Little-endian bfloat16: half the bytes, 3 significant digits.
    Bf16,
}

impl WireFormat {
    pub fn bytes_per_value(self) -> usize {
        match self {
            WireFormat::F32 => 4,
            WireFormat::Bf16 => 2,
        }
    }
}

/// Encodes f32 values in `format`.
pub fn encode(format: WireFormat, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * format.bytes_per_value());
    encode_append(format, values, &mut out);
    out
}

/// Appends the encoding of `values` in `format` to `out` (the coordinator encodes the new
/// parameters block by block inside the SGD step, `TrainState::apply_then`, and sends them in
/// parts as it goes).
pub fn encode_append(format: WireFormat, values: &[f32], out: &mut Vec<u8>) {
    match format {
        WireFormat::F32 if cfg!(target_endian = "little") => {
            out.extend_from_slice(bytemuck::cast_slice(values))
        }
        WireFormat::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        WireFormat::Bf16 => out.extend(values.iter().flat_map(|&v| bf16_bits(v).to_le_bytes())),
    }
}

/// The bfloat16 nearest to `v` (ties to even; NaN stays a quiet NaN): the top half of its f32
/// bits, rounded. Written out rather than taken from the `half` crate because this form has no
/// branch the compiler cannot turn into a select, so the loop over a parameter vector
/// vectorises (2.1 ms for the seed convnet's parameters against 6.0 ms with
/// `half::bf16::from_f32`, measured with the `step_checks` example).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        (b >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// Decodes `expected` values in `format` into f32, refusing any other length.
pub fn decode(
    format: WireFormat,
    bytes: &[u8],
    expected: usize,
) -> Result<Vec<f32>, WireLengthError> {
    check_length(format, bytes, expected)?;
    let mut values = Vec::with_capacity(expected);
    decode_append(format, bytes, &mut values);
    Ok(values)
}

/// A vector that arrives in parts (a gradient streamed in a submission, see
/// `proto::gradient_parts`), each at its offset, decoded block by block, each block's squares
/// summed right after it is decoded, while it is in cache. So the coordinator checks a
/// gradient by its norm without a second pass over the 13 MB (`step_checks` measures it
/// against decode-then-norm), and decodes one part while the next is in flight.
///
/// Parts are decoded onto the end, into memory never zeroed, when they start there or past it
/// (a worker sends the dense layers' values, at the end of the vector, while it still
/// computes the convolutions'): then only the gap before them is zeroed, and the parts that
/// fill it later are written in their place. Parts must not overlap.
#[derive(Debug)]
pub struct PartsDecoder {
    format: WireFormat,
    expected: usize,
    /// The vector up to the end of the part furthest along, zeros in the gaps nothing has
    /// filled yet.
    values: Vec<f32>,
    /// The ranges that have come, sorted and disjoint (touching ones joined: one while the
    /// parts come in order).
    ranges: Vec<std::ops::Range<usize>>,
    squares: crate::sgd::SquareSum,
}

impl PartsDecoder {
    /// A decoder for a vector of `expected` values in `format`.
    pub fn new(format: WireFormat, expected: usize) -> Self {
        PartsDecoder {
            format,
            expected,
            values: Vec::with_capacity(expected),
            ranges: Vec::new(),
            squares: Default::default(),
        }
    }

    /// How many values have come so far.
    pub fn decoded(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.decoded() == self.expected
    }

    /// Decodes the part that starts at value `offset`, refusing one of partial values, one
    /// going past the end, or one over values that already came.
    pub fn push_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), PartError> {
        let width = self.format.bytes_per_value();
        let len = bytes.len() / width;
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(len))
            .filter(|&end| end <= self.expected && bytes.len().is_multiple_of(width));
        let Some(end) = end else {
            let got_bytes = offset
                .saturating_mul(width as u64)
                .saturating_add(bytes.len() as u64);
            return Err(PartError::Length(WireLengthError {
                expected: self.expected,
                got_bytes: usize::try_from(got_bytes).unwrap_or(usize::MAX),
                format: self.format,
            }));
        };
        let start = end - len;
        if len == 0 {
            return Ok(());
        }
        // The first range that ends after this part starts must start at or after its end.
        let next = self.ranges.partition_point(|r| r.end <= start);
        if self.ranges.get(next).is_some_and(|r| r.start < end) {
            return Err(PartError::Overlap { offset, len });
        }
        // Ranges that touch are joined, and a vector scattered in more runs than any worker
        // sends is refused: the list stays short whatever a peer sends.
        let joins_before = next > 0 && self.ranges[next - 1].end == start;
        let joins_after = self.ranges.get(next).is_some_and(|r| r.start == end);
        match (joins_before, joins_after) {
            (true, true) => {
                self.ranges[next - 1].end = self.ranges[next].end;
                self.ranges.remove(next);
            }
            (true, false) => self.ranges[next - 1].end = end,
            (false, true) => self.ranges[next].start = start,
            (false, false) if self.ranges.len() >= MAX_RUNS => {
                return Err(PartError::Scattered { runs: MAX_RUNS });
            }
            (false, false) => self.ranges.insert(next, start..end),
        }
        if start >= self.values.len() {
            // At the end (in order) or past it: zero the gap before it, decode onto the end.
            self.values.resize(start, 0.0);
            self.append(bytes);
        } else {
            // Into a gap. The vector ends where the part furthest along ends, so a part that
            // starts before that end and is not refused above ends before it too.
            let mut at = start;
            for wire in bytes.chunks(crate::sgd::CACHE_BLOCK * width) {
                let out = &mut self.values[at..at + wire.len() / width];
                decode_into(self.format, wire, out);
                self.squares.add(out);
                at += out.len();
            }
        }
        Ok(())
    }

    /// Decodes `bytes` onto the end of the vector, block by block, summing each block's squares.
    fn append(&mut self, bytes: &[u8]) {
        for wire in bytes.chunks(crate::sgd::CACHE_BLOCK * self.format.bytes_per_value()) {
            let at = self.values.len();
            decode_append(self.format, wire, &mut self.values);
            self.squares.add(&self.values[at..]);
        }
    }

    /// The whole vector and its L2 norm (NaN or infinite when a value is; the same bits as
    /// [`crate::sgd::l2_norm`] when the parts came in order and each but the last is a
    /// multiple of 8 values), refusing a vector not yet whole.
    pub fn finish(self) -> Result<(Vec<f32>, f64), WireLengthError> {
        if !self.is_complete() {
            return Err(WireLengthError {
                expected: self.expected,
                got_bytes: self.decoded() * self.format.bytes_per_value(),
                format: self.format,
            });
        }
        Ok((self.values, self.squares.norm()))
    }
}

/// The most separate runs of values a vector arriving in parts may have at once (a worker's
/// have 2 at most: the dense layers' values at the end, then the convolutions' at the start).
const MAX_RUNS: usize = 64;

/// A part of a vector ([`PartsDecoder`]) that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    /// Partial values, or values past the end of the vector.
    #[error(transparent)]
    Length(#[from] WireLengthError),
    #[error("the part of {len} values at value {offset} overlaps values that already came")]
    Overlap { offset: u64, len: usize },
    #[error("the parts leave the vector in more than {runs} separate runs")]
    Scattered { runs: usize },
}

fn check_length(format: WireFormat, bytes: &[u8], expected: usize) -> Result<(), WireLengthError> {
    if bytes.len() == expected * format.bytes_per_value() {
        return Ok(());
    }
    Err(WireLengthError {
        expected,
        got_bytes: bytes.len(),
        format,
    })
}

/// Appends the values of `bytes` (whole values) to `out`. The compiler turns the f32 loop into
/// a copy (it shows as `memcpy` in a profile of the coordinator), into memory never zeroed.
fn decode_append(format: WireFormat, bytes: &[u8], out: &mut Vec<f32>) {
    match format {
        WireFormat::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        WireFormat::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
    }
}

/// Writes the values of `bytes` (exactly `out.len()` whole values) over `out`.
fn decode_into(format: WireFormat, bytes: &[u8], out: &mut [f32]) {
    match format {
        WireFormat::F32 => {
            for (v, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WireFormat::Bf16 => {
            for (v, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *v = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
    }
}

/// Encodes `values`, taking them over: in f32 on a little-endian machine the vector's own
/// memory is the wire form, so a gradient is handed to tonic without the 13 MB copy of
/// [`encode`].
pub fn encode_owned(format: WireFormat, values: Vec<f32>) -> Bytes {
    match format {
        WireFormat::F32 if cfg!(target_endian = "little") => Bytes::from_owner(LeF32(values)),
        _ => encode(format, &values).into(),
    }
}

/// f32 values seen as their little-endian bytes (on a little-endian machine only).
struct LeF32(Vec<f32>);

impl AsRef<[u8]> for LeF32 {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Encodes f32 values as little-endian bytes, the wire form of every tensor.
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    encode(WireFormat::F32, values)
}

/// Decodes little-endian f32 bytes, refusing a length that is not `expected` values.
pub fn decode_f32(bytes: &[u8], expected: usize) -> Result<Vec<f32>, WireLengthError> {
    decode(WireFormat::F32, bytes, expected)
}

/// A tensor on the wire had the wrong number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireLengthError {
    pub expected: usize,
    pub got_bytes: usize,
    pub format: WireFormat,
}

impl std::fmt::Display for WireLengthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.format {
            WireFormat::F32 => "f32",
            WireFormat::Bf16 => "bf16",
        };
        write!(
            f,
            "expected {} {name} values ({} bytes), got {} bytes",
            self.expected,
            self.expected * self.format.bytes_per_value(),
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
    fn parts_decode_to_the_whole_vector_and_its_norm() {
        // Not a multiple of the block or of the lanes, with a bf16 twin; whole, and in parts
        // of 1,000 values.
        let v: Vec<f32> = (0..10_007).map(|i| (i as f32 - 5000.0) * 1e-3).collect();
        for format in [WireFormat::F32, WireFormat::Bf16] {
            let wire = encode(format, &v);
            let width = format.bytes_per_value();
            for part in [wire.len(), 1000 * width] {
                let mut d = PartsDecoder::new(format, v.len());
                for (i, p) in wire.chunks(part).enumerate() {
                    assert!(!d.is_complete());
                    d.push_at((i * part / width) as u64, p).unwrap();
                }
                let (values, norm) = d.finish().unwrap();
                assert_eq!(values, decode(format, &wire, v.len()).unwrap());
                assert_eq!(norm.to_bits(), crate::sgd::l2_norm(&values).to_bits());
            }
        }
        let mut d = PartsDecoder::new(WireFormat::F32, 2);
        d.push_at(0, &encode_f32(&[1.0, f32::NAN])).unwrap();
        assert!(d.finish().unwrap().1.is_nan());
    }

    /// The parts in any order (the head's first, as a worker on a CPU sends them; reversed;
    /// shuffled) give the vector they give in order, and a norm equal to within rounding.
    #[test]
    fn parts_out_of_order_decode_to_the_whole_vector() {
        let v: Vec<f32> = (0..10_007).map(|i| (i as f32 - 5000.0) * 1e-3).collect();
        for format in [WireFormat::F32, WireFormat::Bf16] {
            let wire = encode(format, &v);
            let width = format.bytes_per_value();
            let parts: Vec<(u64, &[u8])> = [0, 900, 1000, 4000, 10_000, 10_007]
                .windows(2)
                .map(|w| (w[0] as u64, &wire[w[0] * width..w[1] * width]))
                .collect();
            let head_first = [&parts[2..], &parts[..2]].concat();
            let reversed: Vec<_> = parts.iter().rev().copied().collect();
            let shuffled = vec![parts[3], parts[0], parts[4], parts[2], parts[1]];
            for order in [head_first, reversed, shuffled] {
                let mut d = PartsDecoder::new(format, v.len());
                for &(offset, p) in &order {
                    assert!(!d.is_complete());
                    d.push_at(offset, p).unwrap();
                }
                let (values, norm) = d.finish().unwrap();
                assert_eq!(values, decode(format, &wire, v.len()).unwrap());
                let want = crate::sgd::l2_norm(&values);
                assert!((norm - want).abs() <= want * 1e-9, "{norm} against {want}");
            }
        }
    }

    #[test]
    fn parts_of_partial_values_past_the_end_overlapping_or_short_are_refused() {
        let mut d = PartsDecoder::new(WireFormat::F32, 4);
        let length = |e: PartError| match e {
            PartError::Length(e) => e,
            other => panic!("{other}"),
        };
        assert_eq!(length(d.push_at(0, &[0u8; 3]).unwrap_err()).got_bytes, 3);
        d.push_at(0, &[0u8; 4]).unwrap();
        assert_eq!(d.decoded(), 1);
        let past = d.push_at(1, &[0u8; 16]).unwrap_err();
        assert_eq!(
            past.to_string(),
            "expected 4 f32 values (16 bytes), got 20 bytes"
        );
        assert!(matches!(
            d.push_at(u64::MAX, &[0u8; 4]).unwrap_err(),
            PartError::Length(_)
        ));
        // Ahead of its turn, then one over it, one over the first, and one over both.
        d.push_at(2, &[0u8; 4]).unwrap();
        for (offset, values) in [(2, 1), (0, 2), (1, 2)] {
            assert_eq!(
                d.push_at(offset, &vec![0u8; 4 * values]).unwrap_err(),
                PartError::Overlap {
                    offset,
                    len: values
                }
            );
        }
        assert_eq!(d.decoded(), 2);
        assert_eq!(d.finish().unwrap_err().got_bytes, 8);
    }

    /// An empty part anywhere changes nothing, and a peer cannot scatter a vector into more
    /// runs than [`MAX_RUNS`]: touching runs are joined, the one too many is refused.
    #[test]
    fn empty_parts_are_nothing_and_scattered_parts_are_bounded() {
        let mut d = PartsDecoder::new(WireFormat::F32, 3);
        d.push_at(2, &[]).unwrap();
        d.push_at(2, &encode_f32(&[3.0])).unwrap();
        d.push_at(0, &encode_f32(&[1.0, 2.0])).unwrap();
        assert_eq!(d.finish().unwrap().0, [1.0, 2.0, 3.0]);

        let n = 4 * MAX_RUNS;
        let mut d = PartsDecoder::new(WireFormat::F32, n);
        // Every other value, from the end: one run each.
        for i in (0..MAX_RUNS).rev() {
            d.push_at((2 * i + 1) as u64, &encode_f32(&[1.0])).unwrap();
        }
        assert_eq!(
            d.push_at(n as u64 - 1, &encode_f32(&[1.0])).unwrap_err(),
            PartError::Scattered { runs: MAX_RUNS }
        );
        // The gaps filled join the runs into one, and the vector completes.
        for i in 0..MAX_RUNS {
            d.push_at((2 * i) as u64, &encode_f32(&[1.0])).unwrap();
        }
        d.push_at(
            2 * MAX_RUNS as u64,
            &encode_f32(&vec![1.0; n - 2 * MAX_RUNS]),
        )
        .unwrap();
        assert_eq!(d.finish().unwrap().0, vec![1.0; n]);
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let err = decode_f32(&[0u8; 7], 2).unwrap_err();
        assert_eq!(err.got_bytes, 7);
        let err = decode(WireFormat::Bf16, &[0u8; 8], 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected 2 bf16 values (4 bytes), got 8 bytes"
        );
    }

    #[test]
    fn bf16_halves_the_bytes_and_rounds_to_nearest_within_its_precision() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0137).collect();
        let wire = encode(WireFormat::Bf16, &v);
        assert_eq!(wire.len(), v.len() * 2);
        let back = decode(WireFormat::Bf16, &wire, v.len()).unwrap();
        for (a, b) in v.iter().zip(&back) {
            // 8 bits of mantissa: half an ulp of 2^-8 relative at most.
            assert!((a - b).abs() <= a.abs() * (1.0 / 256.0), "{a} -> {b}");
        }
        // Ties go to the even neighbour; overflow rounds to infinity.
        let tie_down = 1.0 + 2f32.powi(-8);
        let tie_up = 1.0 + 3.0 * 2f32.powi(-8);
        let big = f32::MAX;
        assert_eq!(
            decode(
                WireFormat::Bf16,
                &encode(WireFormat::Bf16, &[tie_down, tie_up, big]),
                3
            )
            .unwrap(),
            [1.0, 1.0 + 2f32.powi(-6), f32::INFINITY]
        );
        // Exactly representable values survive, and so do the special ones.
        let exact = [0.0, 1.0, -2.5, 0.15625, f32::INFINITY];
        assert_eq!(
            decode(WireFormat::Bf16, &encode(WireFormat::Bf16, &exact), 5).unwrap(),
            exact
        );
        assert!(
            decode(WireFormat::Bf16, &encode(WireFormat::Bf16, &[f32::NAN]), 1).unwrap()[0]
                .is_nan()
        );
        assert_eq!(encode(WireFormat::F32, &v), encode_f32(&v));
        for format in [WireFormat::F32, WireFormat::Bf16] {
            assert_eq!(encode_owned(format, v.clone()), encode(format, &v));
        }
    }
}
