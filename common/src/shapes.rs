//! The lecture's layer-shape calculator, with TensorFlow's padding semantics.
//!
//! - `SAME`: `out = ceil(in / stride)`; the zero padding needed for that is split with the
//!   smaller half on the top/left and the larger on the bottom/right, as TensorFlow does.
//! - `VALID`: `out = ceil((in - filter + 1) / stride)`, no padding.
//! - explicit `P`: `out = floor((in - filter + 2P) / stride) + 1`.
//!
//! The engine pads its convolutions and pools with [`padding_pairs`], so the layers that train
//! agree with this calculator by construction (and a property test checks it).

use crate::Error;
use std::fmt;
use std::str::FromStr;

/// How a convolution or pooling layer pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Same,
    Valid,
    /// `P` zeros on every side.
    Explicit(usize),
}

impl FromStr for Padding {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "same" => Ok(Padding::Same),
            "valid" => Ok(Padding::Valid),
            other => other.parse().map(Padding::Explicit).map_err(|_| {
                Error::Shape(format!(
                    "padding {s:?} is not same, valid or a number of zeros"
                ))
            }),
        }
    }
}

impl fmt::Display for Padding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Padding::Same => write!(f, "SAME"),
            Padding::Valid => write!(f, "VALID"),
            Padding::Explicit(p) => write!(f, "P={p}"),
        }
    }
}

/// Output length along one spatial axis.
pub fn output_len(
    input: usize,
    filter: usize,
    stride: usize,
    padding: Padding,
) -> Result<usize, Error> {
    if input == 0 || filter == 0 || stride == 0 {
        return Err(Error::Shape(format!(
            "input {input}, filter {filter} and stride {stride} must all be positive"
        )));
    }
    match padding {
        Padding::Same => Ok(input.div_ceil(stride)),
        Padding::Valid if filter > input => Err(Error::Shape(format!(
            "a {filter}-wide filter does not fit a {input}-wide input without padding"
        ))),
        Padding::Valid => Ok((input - filter + 1).div_ceil(stride)),
        Padding::Explicit(p) if input + 2 * p < filter => Err(Error::Shape(format!(
            "a {filter}-wide filter does not fit a {input}-wide input padded by {p}"
        ))),
        Padding::Explicit(p) => Ok((input + 2 * p - filter) / stride + 1),
    }
}

/// The (begin, end) zero padding along one axis that produces [`output_len`].
pub fn padding_pairs(
    input: usize,
    filter: usize,
    stride: usize,
    padding: Padding,
) -> Result<(usize, usize), Error> {
    let out = output_len(input, filter, stride, padding)?;
    Ok(match padding {
        Padding::Valid => (0, 0),
        Padding::Explicit(p) => (p, p),
        Padding::Same => {
            let total = ((out - 1) * stride + filter).saturating_sub(input);
            (total / 2, total - total / 2)
        }
    })
}

/// A height x width x depth volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    pub height: usize,
    pub width: usize,
    pub depth: usize,
}

impl Volume {
    pub const fn new(height: usize, width: usize, depth: usize) -> Self {
        Volume {
            height,
            width,
            depth,
        }
    }

    pub fn size(&self) -> usize {
        self.height * self.width * self.depth
    }
}

impl fmt::Display for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.height, self.width, self.depth)
    }
}

impl FromStr for Volume {
    type Err = Error;

    /// Parses `HxWxD` (or `HxW`, depth 1).
    fn from_str(s: &str) -> Result<Self, Error> {
        let parts: Result<Vec<usize>, _> = s.split(['x', 'X']).map(str::parse).collect();
        match parts.as_deref() {
            Ok([h, w, d]) => Ok(Volume::new(*h, *w, *d)),
            Ok([h, w]) => Ok(Volume::new(*h, *w, 1)),
            _ => Err(Error::Shape(format!("{s:?} is not HxWxD, e.g. 32x32x3"))),
        }
    }
}

/// A convolution layer as the lecture's quiz states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    pub input: Volume,
    /// Filter height and width; its depth is the input's.
    pub filter: (usize, usize),
    pub filters: usize,
    pub stride: usize,
    pub padding: Padding,
}

/// What a layer produces and costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub output: Volume,
    /// Weights and biases when every output position shares its filter's weights.
    pub params_shared: usize,
    /// Weights and biases if every output neuron had its own (no parameter sharing).
    pub params_unshared: usize,
}

impl Conv {
    pub fn shape(&self) -> Result<LayerShape, Error> {
        let output = Volume::new(
            output_len(self.input.height, self.filter.0, self.stride, self.padding)?,
            output_len(self.input.width, self.filter.1, self.stride, self.padding)?,
            self.filters,
        );
        let per_neuron = self.filter.0 * self.filter.1 * self.input.depth + 1;
        Ok(LayerShape {
            output,
            params_shared: per_neuron * self.filters,
            params_unshared: per_neuron * output.size(),
        })
    }
}

/// A pooling layer's output: depth is kept, no parameters.
pub fn pool(
    input: Volume,
    window: usize,
    stride: usize,
    padding: Padding,
) -> Result<Volume, Error> {
    Ok(Volume::new(
        output_len(input.height, window, stride, padding)?,
        output_len(input.width, window, stride, padding)?,
        input.depth,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lecture_layer(padding: Padding) -> LayerShape {
        Conv {
            input: Volume::new(32, 32, 3),
            filter: (8, 8),
            filters: 20,
            stride: 2,
            padding,
        }
        .shape()
        .unwrap()
    }

    #[test]
    fn the_lecture_quiz_gives_16x16x20_with_same_padding() {
        assert_eq!(lecture_layer(Padding::Same).output, Volume::new(16, 16, 20));
    }

    #[test]
    fn the_lecture_quiz_gives_13x13x20_with_valid_padding() {
        assert_eq!(
            lecture_layer(Padding::Valid).output,
            Volume::new(13, 13, 20)
        );
    }

    #[test]
    fn the_lecture_quiz_gives_14x14x20_with_one_pixel_of_padding() {
        assert_eq!(
            lecture_layer(Padding::Explicit(1)).output,
            Volume::new(14, 14, 20)
        );
    }

    #[test]
    fn sharing_cuts_the_padded_layer_from_756560_to_3860_parameters() {
        let l = lecture_layer(Padding::Explicit(1));
        assert_eq!(l.params_unshared, 756_560);
        assert_eq!(l.params_shared, 3_860);
    }

    #[test]
    fn same_padding_puts_the_extra_zero_on_the_bottom_right() {
        // 32 wide, 8-wide filter, stride 2: out 16, needs (16-1)*2+8-32 = 6 -> (3, 3).
        assert_eq!(padding_pairs(32, 8, 2, Padding::Same).unwrap(), (3, 3));
        // 28 wide, 4-wide filter, stride 2: out 14, needs 13*2+4-28 = 2 -> (1, 1);
        // 27 wide: out 14, needs 3 -> (1, 2).
        assert_eq!(padding_pairs(27, 4, 2, Padding::Same).unwrap(), (1, 2));
    }

    #[test]
    fn a_filter_larger_than_the_input_is_an_error_without_padding() {
        assert!(output_len(4, 5, 1, Padding::Valid).is_err());
        assert_eq!(output_len(4, 5, 1, Padding::Same).unwrap(), 4);
    }

    #[test]
    fn volumes_and_paddings_parse_from_the_command_line() {
        assert_eq!("32x32x3".parse::<Volume>().unwrap(), Volume::new(32, 32, 3));
        assert_eq!("same".parse::<Padding>().unwrap(), Padding::Same);
        assert_eq!("2".parse::<Padding>().unwrap(), Padding::Explicit(2));
        assert!("fancy".parse::<Padding>().is_err());
    }
}
