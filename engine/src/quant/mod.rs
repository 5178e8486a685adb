//! Weights held in memory as 8-bit or 4-bit integers: the formats a model can be loaded
//! in ([`WeightFormat`]) and the quantized matrices themselves ([`QuantMatrix`]).
//!
//! The loader quantizes the decoder layers' four linear weights (qkv, attention output,
//! MLP up and down: nearly all of a large model's bytes) as it reads a float checkpoint,
//! or reads them as stored from a checkpoint that [`save_quantized`] wrote. Embeddings, the output head, norms and biases keep
//! the checkpoint's precision. Both formats are symmetric (zero is exact, no offsets):
//!
//! - `int8`: one f32 scale per output row, `w = q * scale` with `q` in -127..=127 and
//!   `scale = max|w| / 127` over the row (LLM.int8's absmax rounding, without its
//!   outlier columns).
//! - `int4`: one f32 scale per group of `group` consecutive inputs of a row (64 by
//!   default: it divides every Falcon width), `q` in -7..=7 stored as `q + 8` in a nibble,
//!   two to a byte, the even column in the low nibble; rows start on a byte.
//!
//! Backends compute with the dequantized values (`q * scale`, one f32 multiply, so the
//! same bits everywhere); a product of a quantized model is therefore exactly that of
//! the f32 matrix [`QuantMatrix::dequantize`] returns, and greedy speculation stays exact
//! against the quantized target.

mod save;
#[cfg(test)]
mod tests;

pub use save::{save_quantized, SaveError, SavedCheckpoint};

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use thiserror::Error;

/// The default int4 group: 64 inputs share a scale (Falcon's hidden sizes 4544, 8192
/// and 14848 and their MLP widths are all multiples of 64; 128 does not divide 4544).
pub const DEFAULT_INT4_GROUP: usize = 64;

/// How a model's decoder-layer weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As the backend holds a checkpoint's tensors (f32 on the CPU, bf16 on the GPU).
    #[default]
    Checkpoint,
    /// 8-bit integers with a scale per output row.
    Int8,
    /// 4-bit integers with a scale per `group` inputs of a row.
    Int4 { group: usize },
}

/// The integer formats of [`WeightFormat`], for the code that quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    Int8,
    Int4 { group: usize },
}

impl WeightFormat {
    /// `int4` with the default group.
    pub const INT4: WeightFormat = WeightFormat::Int4 {
        group: DEFAULT_INT4_GROUP,
    };

    /// The integer format, or `None` for [`WeightFormat::Checkpoint`].
    pub fn quant(self) -> Option<Quant> {
        match self {
            WeightFormat::Checkpoint => None,
            WeightFormat::Int8 => Some(Quant::Int8),
            WeightFormat::Int4 { group } => Some(Quant::Int4 { group }),
        }
    }

    /// Checks the format's parameters (the int4 group size).
    pub fn validate(self) -> Result<Self, QuantError> {
        if let WeightFormat::Int4 { group } = self {
            if !(16..=4096).contains(&group) || group % 16 != 0 {
                return Err(QuantError::GroupSize { group });
            }
        }
        Ok(self)
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Checkpoint => f.write_str("checkpoint"),
            WeightFormat::Int8 => f.write_str("int8"),
            WeightFormat::Int4 { group } => write!(f, "int4:g{group}"),
        }
    }
}

/// Parses `checkpoint`, `int8`, `int4` or `int4:g<group>` (what `Display` writes).
impl FromStr for WeightFormat {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self, QuantError> {
        let unknown = || QuantError::UnknownFormat {
            text: s.to_string(),
        };
        let format = match s.trim().to_ascii_lowercase().as_str() {
            "checkpoint" => WeightFormat::Checkpoint,
            "int8" => WeightFormat::Int8,
            "int4" => WeightFormat::INT4,
            other => {
                let group = other
                    .strip_prefix("int4:g")
                    .and_then(|g| g.parse::<usize>().ok())
                    .ok_or_else(unknown)?;
                WeightFormat::Int4 { group }
            }
        };
        format.validate()
    }
}

/// A weight that cannot be quantized, or a format that cannot be used.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    #[error("unknown weight format `{text}` (known: checkpoint, int8, int4, int4:g<group>)")]
    UnknownFormat { text: String },
    #[error("int4 group of {group} inputs: groups must be a multiple of 16 from 16 to 4096")]
    GroupSize { group: usize },
    #[error("weight [{row}, {col}] is {value}: a quantized weight must be finite")]
    NonFinite { row: usize, col: usize, value: f32 },
    #[error("{len} values do not make a [{rows}, {cols}] matrix")]
    Shape {
        len: usize,
        rows: usize,
        cols: usize,
    },
    #[error("{what}: {len} entries, expected {expected}")]
    Parts {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("scale {index} is {value}: a scale must be finite and not negative")]
    BadScale { index: usize, value: f32 },
}

/// The integers and scales of a [`QuantMatrix`].
#[derive(Debug, Clone, PartialEq)]
pub enum QuantData {
    /// `q[r * cols + c]`, `scales[r]`.
    Int8 { q: Vec<i8>, scales: Vec<f32> },
    /// Row `r` is bytes `r * row_bytes..`, column `c` the nibble `c % 2` (low first) of
    /// byte `c / 2`, holding `q + 8`; `scales[r * groups_per_row + c / group]`.
    Int4 {
        packed: Vec<u8>,
        scales: Vec<f32>,
        group: usize,
    },
}

/// A `[rows, cols]` weight (checkpoint layout `[out, in]`) in an integer format.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    data: QuantData,
}

impl QuantMatrix {
    /// Quantizes a row-major `[rows, cols]` matrix; every value must be finite.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, quant: Quant) -> Result<Self, QuantError> {
        if rows.checked_mul(cols) != Some(w.len()) {
            return Err(QuantError::Shape {
                len: w.len(),
                rows,
                cols,
            });
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                row: i / cols.max(1),
                col: i % cols.max(1),
                value: w[i],
            });
        }
        let data = match quant {
            Quant::Int8 => quantize_int8(w, rows, cols),
            Quant::Int4 { group } => {
                WeightFormat::Int4 { group }.validate()?;
                quantize_int4(w, rows, cols, group)
            }
        };
        Ok(QuantMatrix { rows, cols, data })
    }

    /// A matrix from stored integers and scales (a quantized checkpoint), checked:
    /// lengths as the format lays them out, the int4 group, finite non-negative scales.
    pub fn from_parts(rows: usize, cols: usize, data: QuantData) -> Result<Self, QuantError> {
        let check = |what, len: usize, expected: usize| {
            if len == expected {
                Ok(())
            } else {
                Err(QuantError::Parts {
                    what,
                    len,
                    expected,
                })
            }
        };
        let scales = match &data {
            QuantData::Int8 { q, scales } => {
                check("int8 values", q.len(), rows * cols)?;
                check("int8 scales", scales.len(), rows)?;
                scales
            }
            QuantData::Int4 {
                packed,
                scales,
                group,
            } => {
                WeightFormat::Int4 { group: *group }.validate()?;
                check("int4 bytes", packed.len(), rows * int4_row_bytes(cols))?;
                check("int4 scales", scales.len(), rows * cols.div_ceil(*group))?;
                scales
            }
        };
        if let Some((index, &value)) = scales
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_finite() || **s < 0.0)
        {
            return Err(QuantError::BadScale { index, value });
        }
        Ok(QuantMatrix { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &QuantData {
        &self.data
    }

    /// The format this matrix is in.
    pub fn format(&self) -> WeightFormat {
        match self.data {
            QuantData::Int8 { .. } => WeightFormat::Int8,
            QuantData::Int4 { group, .. } => WeightFormat::Int4 { group },
        }
    }

    /// Bytes held: the integers and the f32 scales.
    pub fn bytes(&self) -> usize {
        match &self.data {
            QuantData::Int8 { q, scales } => q.len() + 4 * scales.len(),
            QuantData::Int4 { packed, scales, .. } => packed.len() + 4 * scales.len(),
        }
    }

    /// Writes row `r`'s values (`q * scale`) into `out` (`cols` long).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols` (callers size both from the matrix).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} into {}",
            out.len()
        );
        let cols = self.cols;
        match &self.data {
            QuantData::Int8 { q, scales } => {
                let s = scales[r];
                for (o, &v) in out.iter_mut().zip(&q[r * cols..(r + 1) * cols]) {
                    *o = f32::from(v) * s;
                }
            }
            QuantData::Int4 {
                packed,
                scales,
                group,
            } => {
                let row = &packed[r * int4_row_bytes(cols)..][..int4_row_bytes(cols)];
                let row_scales = &scales[r * cols.div_ceil(*group)..][..cols.div_ceil(*group)];
                // Groups are even, so each starts on a byte: two columns per byte, in a
                // loop the compiler vectorizes.
                for ((chunk, bytes), &s) in out
                    .chunks_mut(*group)
                    .zip(row.chunks(group / 2))
                    .zip(row_scales)
                {
                    let mut pairs = chunk.chunks_exact_mut(2);
                    for (pair, &b) in (&mut pairs).zip(bytes) {
                        pair[0] = f32::from((b & 0xf) as i8 - 8) * s;
                        pair[1] = f32::from((b >> 4) as i8 - 8) * s;
                    }
                    if let ([last], Some(&b)) = (pairs.into_remainder(), bytes.last()) {
                        *last = f32::from((b & 0xf) as i8 - 8) * s;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32 (`q * scale`), row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.dequantize_row(r, row);
        }
        out
    }
}

/// Bytes of one packed int4 row of `cols` values.
pub fn int4_row_bytes(cols: usize) -> usize {
    cols.div_ceil(2)
}

/// How a quantized checkpoint ([`save_quantized`]) stores a `[rows, cols]` weight: its
/// integers under the weight's own name, its f32 scales under [`scale_name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayout {
    /// `I8` for int8, `U8` (packed nibbles) for int4.
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub scale_shape: Vec<usize>,
}

impl Quant {
    /// The stored form of a `[rows, cols]` weight in this format.
    pub fn stored_layout(self, rows: usize, cols: usize) -> StoredLayout {
        match self {
            Quant::Int8 => StoredLayout {
                dtype: safetensors::Dtype::I8,
                shape: vec![rows, cols],
                scale_shape: vec![rows],
            },
            Quant::Int4 { group } => StoredLayout {
                dtype: safetensors::Dtype::U8,
                shape: vec![rows, int4_row_bytes(cols)],
                scale_shape: vec![rows, cols.div_ceil(group)],
            },
        }
    }
}

/// The name of a stored weight's scales: `<linear>.weight` -> `<linear>.weight_scale`.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}_scale")
}

/// The signed value at column `c` of a packed int4 row (the layout's definition).
#[cfg(test)]
fn int4_at(row: &[u8], c: usize) -> i8 {
    let nibble = (row[c / 2] >> (4 * (c % 2))) & 0xf;
    nibble as i8 - 8
}

/// Symmetric absmax scale for values up to `amax` in magnitude onto `-levels..=levels`
/// (0 for an all-zero range, whose integers are then all 0).
fn absmax_scale(values: &[f32], levels: f32) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs())) / levels
}

/// `round(v / scale)` clamped to `-levels..=levels` (0 when the scale is 0).
fn to_level(v: f32, scale: f32, levels: f32) -> f32 {
    if scale == 0.0 {
        0.0
    } else {
        (v / scale).round().clamp(-levels, levels)
    }
}

fn quantize_int8(w: &[f32], rows: usize, cols: usize) -> QuantData {
    let cols = cols.max(1);
    let mut q = vec![0i8; rows * cols];
    let mut scales = vec![0.0f32; rows];
    // Rows in parallel: a large checkpoint quantizes billions of weights on load.
    q.par_chunks_mut(cols)
        .zip(scales.par_iter_mut())
        .zip(w.par_chunks(cols))
        .for_each(|((out, scale), row)| {
            let s = absmax_scale(row, 127.0);
            *scale = s;
            for (o, &v) in out.iter_mut().zip(row) {
                *o = to_level(v, s, 127.0) as i8;
            }
        });
    QuantData::Int8 { q, scales }
}

fn quantize_int4(w: &[f32], rows: usize, cols: usize, group: usize) -> QuantData {
    let (cols, row_bytes, groups) = (
        cols.max(1),
        int4_row_bytes(cols).max(1),
        cols.div_ceil(group),
    );
    let mut packed = vec![0u8; rows * row_bytes];
    let mut scales = vec![0.0f32; rows * groups];
    packed
        .par_chunks_mut(row_bytes)
        .zip(scales.par_chunks_mut(groups.max(1)))
        .zip(w.par_chunks(cols))
        .for_each(|((out, row_scales), row)| {
            for (g, (chunk, scale)) in row.chunks(group).zip(row_scales.iter_mut()).enumerate() {
                let s = absmax_scale(chunk, 7.0);
                *scale = s;
                for (j, &v) in chunk.iter().enumerate() {
                    let c = g * group + j;
                    let nibble = (to_level(v, s, 7.0) as i8 + 8) as u8;
                    out[c / 2] |= nibble << (4 * (c % 2));
                }
            }
        });
    QuantData::Int4 {
        packed,
        scales,
        group,
    }
}
