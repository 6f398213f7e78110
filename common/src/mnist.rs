//! The MNIST IDX reader: gzipped or raw files, each checked against the SHA-256 of its
//! decompressed contents before it is parsed.
//!
//! Images stay as raw `u8` pixels everywhere (784 bytes each) until the engine normalises
//! them with [`INPUT_SCALE`]; that keeps the wire small and the checkpoint's input
//! normalisation a single documented formula.

use crate::Error;
use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Side of an MNIST image.
pub const SIDE: usize = 28;
/// Pixels per image.
pub const PIXELS: usize = SIDE * SIDE;
/// Number of classes.
pub const CLASSES: usize = 10;
/// Training images held out as the validation set, as the lecture's `mnist.validation`.
pub const VALIDATION: usize = 5_000;
/// Training images left for training.
pub const TRAIN: usize = 60_000 - VALIDATION;
/// Input normalisation: `x = (pixel * INPUT_SCALE - INPUT_MEAN) / INPUT_STD`.
pub const INPUT_SCALE: f32 = 1.0 / 255.0;
/// See [`INPUT_SCALE`].
pub const INPUT_MEAN: f32 = 0.0;
/// See [`INPUT_SCALE`].
pub const INPUT_STD: f32 = 1.0;

/// The four files, with the SHA-256 of their decompressed contents.
pub const FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// Images and their labels.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// `len * PIXELS` bytes, row-major.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// The examples at `indices`, in that order.
    pub fn gather(&self, indices: &[u32]) -> Split {
        let mut out = Split {
            images: Vec::with_capacity(indices.len() * PIXELS),
            labels: Vec::with_capacity(indices.len()),
        };
        for &i in indices {
            out.images.extend_from_slice(self.image(i as usize));
            out.labels.push(self.labels[i as usize]);
        }
        out
    }

    /// Examples `range` as a new split.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Split {
        Split {
            images: self.images[range.start * PIXELS..range.end * PIXELS].to_vec(),
            labels: self.labels[range].to_vec(),
        }
    }
}

/// MNIST split the way the lecture uses it.
#[derive(Debug, Clone)]
pub struct Mnist {
    /// The first 55,000 training images.
    pub train: Split,
    /// The last 5,000 training images.
    pub validation: Split,
    /// The 10,000 t10k images.
    pub test: Split,
}

/// The path of `name` in `dir`: `name.gz` if present, else `name`.
pub fn locate(dir: &Path, name: &str) -> Option<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Some(gz);
    }
    let raw = dir.join(name);
    raw.is_file().then_some(raw)
}

/// Reads one file (gzipped when its name ends in `.gz`) and checks its SHA-256.
pub fn read_verified(path: &Path, expected_sha256: &str) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::read(path).map_err(io)?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        GzDecoder::new(&file[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::BadIdx {
                path: path.to_path_buf(),
                reason: format!("gzip stream is truncated or corrupt: {e}"),
            })?;
        out
    } else {
        file
    };
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != expected_sha256 {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

fn parse_idx(path: &Path, bytes: &[u8], dims: usize) -> Result<(Vec<usize>, Vec<u8>), Error> {
    let bad = |reason: String| Error::BadIdx {
        path: path.to_path_buf(),
        reason,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(bad(format!(
            "{} bytes is shorter than its header",
            bytes.len()
        )));
    }
    // Magic: two zero bytes, 0x08 (unsigned byte data), then the number of dimensions.
    if bytes[0..3] != [0, 0, 8] || bytes[3] as usize != dims {
        return Err(bad(format!("bad magic {:02x?}", &bytes[0..4])));
    }
    let shape: Vec<usize> = (0..dims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let body = &bytes[header..];
    let want: usize = shape.iter().product();
    if body.len() != want {
        return Err(bad(format!(
            "header says {want} bytes of data, file has {}",
            body.len()
        )));
    }
    Ok((shape, body.to_vec()))
}

fn read_split(dir: &Path, images: (&str, &str), labels: (&str, &str)) -> Result<Split, Error> {
    let find = |name: &str| {
        locate(dir, name).ok_or_else(|| Error::MissingFile {
            path: dir.join(format!("{name}.gz")),
        })
    };
    let (ipath, lpath) = (find(images.0)?, find(labels.0)?);
    let (ishape, ibody) = parse_idx(&ipath, &read_verified(&ipath, images.1)?, 3)?;
    let (lshape, lbody) = parse_idx(&lpath, &read_verified(&lpath, labels.1)?, 1)?;
    if ishape[1..] != [SIDE, SIDE] || ishape[0] != lshape[0] {
        return Err(Error::BadIdx {
            path: ipath,
            reason: format!("shape {ishape:?} does not match {} labels", lshape[0]),
        });
    }
    Ok(Split {
        images: ibody,
        labels: lbody,
    })
}

/// Loads MNIST from `dir`, verifying every file, and splits off the validation set.
pub fn load(dir: &Path) -> Result<Mnist, Error> {
    let train = read_split(dir, FILES[0], FILES[1])?;
    let test = read_split(dir, FILES[2], FILES[3])?;
    let cut = train.len().saturating_sub(VALIDATION);
    Ok(Mnist {
        validation: train.slice(cut..train.len()),
        train: train.slice(0..cut),
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idx_header_that_lies_about_its_length_is_refused() {
        let mut bytes = vec![0, 0, 8, 1, 0, 0, 0, 5];
        bytes.extend([1, 2, 3]);
        let err = parse_idx(Path::new("x"), &bytes, 1).unwrap_err();
        assert!(err.to_string().contains("header says 5 bytes"), "{err}");
    }

    #[test]
    fn a_wrong_magic_is_refused() {
        let err = parse_idx(Path::new("x"), &[0, 0, 9, 1, 0, 0, 0, 0], 1).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn a_missing_directory_names_the_file_it_wanted() {
        let err = load(Path::new("/nonexistent/mnist")).unwrap_err();
        assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
    }
}
