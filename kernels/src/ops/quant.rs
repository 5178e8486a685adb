//! Products with integer weights (`gemv_quant.cu`): an 8-bit or 4-bit weight uploaded in
//! the kernels' layout ([`QuantWeight`]), GEMVs that dequantize it in registers for few
//! activation rows, and for many rows a dequantization to bf16 followed by the bf16 path
//! (cuBLAS). In row-invariant mode a step's chunks are split as [`Gpu::linear`] splits
//! them, so that a chunk gets the bits it gets alone.

use half::bf16;

use super::linear::{bias_args, Epilogue, Span, GEMV_MAX_ROWS};
use super::{check_len, p, to_i32};
use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, Gpu, ROW_INVARIANT_MAX_ROWS};

/// Warps (output features) per block of the integer GEMVs (`QG_WARPS`).
const QG_WARPS: u32 = 4;

/// The integer format of a [`QuantWeight`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantLayout {
    /// Signed bytes, one f32 scale per row.
    Int8,
    /// `value + 8` in nibbles (even column low), one f32 scale per `group` columns of a
    /// row (a multiple of 16).
    Int4 { group: usize },
}

/// An integer weight `[n, k]` in device memory: rows padded to `kp` columns (k rounded
/// up to 32, padding value 0) so that each starts on 16 bytes, and its scales.
#[derive(Debug)]
pub struct QuantWeight {
    layout: QuantLayout,
    n: usize,
    k: usize,
    q: DeviceBuffer<u8>,
    scales: DeviceBuffer<f32>,
}

impl QuantWeight {
    pub fn layout(&self) -> QuantLayout {
        self.layout
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Device bytes held: the padded integers and the scales.
    pub fn byte_size(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// Columns of a padded row.
    fn kp(&self) -> usize {
        padded(self.k)
    }

    /// Scales per row.
    fn groups(&self) -> usize {
        match self.layout {
            QuantLayout::Int8 => 1,
            QuantLayout::Int4 { group } => self.k.div_ceil(group),
        }
    }
}

fn padded(k: usize) -> usize {
    k.next_multiple_of(32)
}

/// int8 rows `[n, k]` as the kernels read them: rows of `padded(k)` bytes, padding 0.
fn q8_rows(q: &[i8], n: usize, k: usize) -> Vec<u8> {
    let kp = padded(k);
    let mut bytes = vec![0u8; n * kp];
    for (dst, src) in bytes.chunks_mut(kp.max(1)).zip(q.chunks(k.max(1))) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as u8;
        }
    }
    bytes
}

/// Packed int4 rows of `ceil(k / 2)` bytes as the kernels read them: rows of
/// `padded(k) / 2` bytes, every padding nibble 8 (value 0), the spare high nibble of an
/// odd row too.
fn q4_rows(packed: &[u8], n: usize, k: usize) -> Vec<u8> {
    let (row, kp) = (k.div_ceil(2), padded(k));
    let mut bytes = vec![0x88u8; n * kp / 2];
    for (dst, src) in bytes
        .chunks_mut((kp / 2).max(1))
        .zip(packed.chunks(row.max(1)))
    {
        dst[..row].copy_from_slice(src);
        if k % 2 == 1 {
            dst[row - 1] = (dst[row - 1] & 0x0f) | 0x80;
        }
    }
    bytes
}

impl Gpu {
    /// Uploads an int8 weight: `q` the `[n, k]` signed values row-major, `scales` one
    /// per row.
    pub fn upload_q8(
        &self,
        q: &[i8],
        scales: &[f32],
        n: usize,
        k: usize,
    ) -> Result<QuantWeight, KernelError> {
        const OP: &str = "upload_q8";
        if q.len() != n * k || scales.len() != n {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "{} values and {} scales for [{n}, {k}]",
                    q.len(),
                    scales.len()
                ),
            ));
        }
        let bytes = q8_rows(q, n, k);
        self.quant_upload(QuantLayout::Int8, n, k, &bytes, scales)
    }

    /// Uploads an int4 weight: `packed` rows of `ceil(k / 2)` bytes (column `c` in the
    /// low nibble of byte `c / 2` for even `c`, the high one for odd, as `value + 8`),
    /// `scales` `[n, ceil(k / group)]`.
    pub fn upload_q4(
        &self,
        packed: &[u8],
        scales: &[f32],
        n: usize,
        k: usize,
        group: usize,
    ) -> Result<QuantWeight, KernelError> {
        const OP: &str = "upload_q4";
        if group == 0 || !group.is_multiple_of(16) {
            return Err(KernelError::invalid(
                OP,
                format!("group of {group} columns (a multiple of 16 is needed)"),
            ));
        }
        let row = k.div_ceil(2);
        if packed.len() != n * row || scales.len() != n * k.div_ceil(group) {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "{} bytes and {} scales for [{n}, {k}] in groups of {group}",
                    packed.len(),
                    scales.len()
                ),
            ));
        }
        let bytes = q4_rows(packed, n, k);
        self.quant_upload(QuantLayout::Int4 { group }, n, k, &bytes, scales)
    }

    fn quant_upload(
        &self,
        layout: QuantLayout,
        n: usize,
        k: usize,
        bytes: &[u8],
        scales: &[f32],
    ) -> Result<QuantWeight, KernelError> {
        Ok(QuantWeight {
            layout,
            n,
            k,
            q: self.upload(bytes)?,
            scales: self.upload(scales)?,
        })
    }

    /// `x @ w^T (+ bias)` for `x [rows, k]` f32 and an integer weight `w [n, k]`.
    pub fn linear_quant(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        w: &QuantWeight,
        bias: Option<&DeviceBuffer<f32>>,
        groups: &[usize],
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        self.linear_quant_new(x, rows, w, bias, Epilogue::Store, groups)
    }

    /// `gelu(x @ w^T + bias)`, bit-identical to [`Gpu::linear_quant`] then [`Gpu::gelu`].
    pub fn linear_quant_gelu(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        w: &QuantWeight,
        bias: Option<&DeviceBuffer<f32>>,
        groups: &[usize],
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        self.linear_quant_new(x, rows, w, bias, Epilogue::Gelu, groups)
    }

    /// `acc += x @ w^T + bias`, bit-identical to [`Gpu::linear_quant`] then [`Gpu::add`].
    pub fn linear_quant_accumulate(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        w: &QuantWeight,
        bias: Option<&DeviceBuffer<f32>>,
        acc: &mut DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<(), KernelError> {
        check_len("linear_quant", "accumulator", acc, rows * w.n)?;
        self.linear_quant_into(x, rows, w, bias, Epilogue::Accumulate, acc, groups)
    }

    /// The weight as a bf16 matrix `[n, k]` (each value `q * scale` rounded to bf16).
    pub fn dequantize_bf16(&self, w: &QuantWeight) -> Result<DeviceBuffer<bf16>, KernelError> {
        const OP: &str = "dequantize";
        let out = self.scratch::<bf16>(w.n * w.k)?;
        let mut args = vec![
            p(&w.q),
            p(&w.scales),
            p(&out),
            Arg::I32(to_i32(OP, w.n)?),
            Arg::I32(to_i32(OP, w.k)?),
            Arg::I32(to_i32(OP, w.kp())?),
        ];
        let kernel = match w.layout {
            QuantLayout::Int8 => &self.k.dequant_q8_bf16,
            QuantLayout::Int4 { group } => {
                args.push(Arg::I32(to_i32(OP, group)?));
                args.push(Arg::I32(to_i32(OP, w.groups())?));
                &self.k.dequant_q4_bf16
            }
        };
        self.launch(kernel, (self.stride_blocks(w.n * w.k), 1, 1), 256, 0, &args)?;
        Ok(out)
    }

    /// A fresh output of `linear_quant_into`.
    fn linear_quant_new(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        w: &QuantWeight,
        bias: Option<&DeviceBuffer<f32>>,
        epi: Epilogue,
        groups: &[usize],
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let mut out = self.scratch::<f32>(rows * w.n)?;
        self.linear_quant_into(x, rows, w, bias, epi, &mut out, groups)?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_quant_into(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        w: &QuantWeight,
        bias: Option<&DeviceBuffer<f32>>,
        epi: Epilogue,
        out: &mut DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<(), KernelError> {
        // Split as `linear_into` splits (row invariance across a step's chunks).
        for s in self.product_spans("linear_quant", x, rows, w.k, w.n, bias, out, groups)? {
            self.quant_span(x, w, bias, epi, out, s)?;
        }
        Ok(())
    }

    /// Rows `s.row0..s.row0 + s.rows`: the integer GEMVs in groups of up to
    /// [`GEMV_MAX_ROWS`] rows for at most [`ROW_INVARIANT_MAX_ROWS`] rows (or with
    /// `s.gemv`), otherwise the weight dequantized to bf16 through the bf16 path.
    fn quant_span(
        &self,
        x: &DeviceBuffer<f32>,
        w: &QuantWeight,
        bias: Option<&DeviceBuffer<f32>>,
        epi: Epilogue,
        out: &mut DeviceBuffer<f32>,
        s: Span,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear_quant";
        if !s.gemv && s.rows > ROW_INVARIANT_MAX_ROWS {
            let wb = self.dequantize_bf16(w)?;
            return self.linear_span(x, &wb, bias, epi, out, s);
        }
        let (bias_arg, has_bias) = bias_args(bias, x);
        let (ni, ki, kpi) = (to_i32(OP, s.n)?, to_i32(OP, s.k)?, to_i32(OP, w.kp())?);
        let grid = ((s.n as u32).div_ceil(QG_WARPS), 1, 1);
        for r0 in (0..s.rows).step_by(GEMV_MAX_ROWS) {
            let r = GEMV_MAX_ROWS.min(s.rows - r0);
            let (xa, ya) = (
                Arg::U64(x.ptr_at((s.row0 + r0) * s.k)),
                Arg::U64(out.ptr_at((s.row0 + r0) * s.n)),
            );
            let mut args = vec![
                xa,
                p(&w.q),
                p(&w.scales),
                bias_arg,
                ya,
                Arg::I32(r as i32),
                Arg::I32(ni),
                Arg::I32(ki),
                Arg::I32(kpi),
            ];
            let kernel = match w.layout {
                QuantLayout::Int8 => &self.k.gemv_q8,
                QuantLayout::Int4 { group } => {
                    args.push(Arg::I32(to_i32(OP, group)?));
                    args.push(Arg::I32(to_i32(OP, w.groups())?));
                    &self.k.gemv_q4
                }
            };
            args.push(Arg::I32(has_bias));
            args.push(Arg::I32(epi as i32));
            self.launch(kernel, grid, 32 * QG_WARPS, 0, &args)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_rows_are_padded_to_32_with_zeros() {
        let q: Vec<i8> = (0..2 * 33).map(|i| (i as i8).wrapping_mul(7)).collect();
        let b = q8_rows(&q, 2, 33);
        assert_eq!(b.len(), 2 * 64);
        for r in 0..2 {
            let row = &b[r * 64..(r + 1) * 64];
            assert!(row[..33]
                .iter()
                .zip(&q[r * 33..])
                .all(|(&d, &s)| d as i8 == s));
            assert!(row[33..].iter().all(|&d| d == 0), "row {r}");
        }
    }

    #[test]
    fn int4_rows_are_padded_with_value_zero_nibbles() {
        // Three rows of 5 columns (3 bytes, the last with a spare high nibble 0).
        let packed: Vec<u8> = vec![0x12, 0x34, 0x05, 0x9a, 0xbc, 0x0d, 0xf0, 0x0f, 0x07];
        let b = q4_rows(&packed, 3, 5);
        assert_eq!(b.len(), 3 * 16);
        for r in 0..3 {
            let row = &b[r * 16..(r + 1) * 16];
            assert_eq!(row[..2], packed[r * 3..r * 3 + 2]);
            assert_eq!(
                row[2],
                (packed[r * 3 + 2] & 0x0f) | 0x80,
                "row {r}'s last byte"
            );
            assert!(row[3..].iter().all(|&d| d == 0x88), "row {r}");
        }
    }

    /// gemv_quant.cu reads a byte `u` as the float with bits `0x4B000000 | u` minus
    /// 2^23 + offset: exactly `u - offset` for every byte.
    #[test]
    fn the_kernels_byte_to_float_trick_is_exact() {
        for u in 0u32..256 {
            let f = f32::from_bits(0x4B00_0000 | u);
            assert_eq!(f - 8_388_736.0, u as f32 - 128.0);
            assert_eq!(f - 8_388_616.0, u as f32 - 8.0);
            // int8 bytes are stored as two's complement and flipped by ^0x80.
            let signed = u as u8 as i8;
            let flipped = (u ^ 0x80) & 0xff;
            assert_eq!(
                f32::from_bits(0x4B00_0000 | flipped) - 8_388_736.0,
                f32::from(signed)
            );
        }
    }
}
