//! A quantized weight row to f32 for the matmul: `q * scale` per column, exactly the
//! values of [`QuantMatrix::dequantize_row`] (one f32 multiply each), with AVX2 where the
//! CPU has it (the portable loop costs more than the products on a small model).

use crate::quant::QuantMatrix;

pub(super) fn dequantize_row(m: &QuantMatrix, r: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && r < m.rows() && out.len() == m.cols() {
            // SAFETY: AVX2 is present (checked just above); row and length are in range.
            unsafe { avx2::dequantize_row(m, r, out) };
            return;
        }
    }
    m.dequantize_row(r, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::quant::{int4_row_bytes, QuantData, QuantMatrix};

    /// # Safety
    /// AVX2 must be available, `r < m.rows()` and `out.len() == m.cols()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(m: &QuantMatrix, r: usize, out: &mut [f32]) {
        let cols = m.cols();
        match m.data() {
            QuantData::Int8 { q, scales } => {
                let (row, s) = (&q[r * cols..(r + 1) * cols], _mm256_set1_ps(scales[r]));
                let mut i = 0;
                while i + 8 <= cols {
                    // SAFETY: i + 8 <= cols for both the row and `out`.
                    unsafe {
                        let v = _mm_loadl_epi64(row.as_ptr().add(i).cast());
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(f, s));
                    }
                    i += 8;
                }
                for j in i..cols {
                    out[j] = f32::from(row[j]) * scales[r];
                }
            }
            QuantData::Int4 {
                packed,
                scales,
                group,
            } => {
                let (rb, groups) = (int4_row_bytes(cols), cols.div_ceil(*group));
                let row = &packed[r * rb..(r + 1) * rb];
                let (mask, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
                for (g, &scale) in scales[r * groups..(r + 1) * groups].iter().enumerate() {
                    let first = g * group;
                    let len = (*group).min(cols - first);
                    let (bytes, o) = (&row[first / 2..], &mut out[first..first + len]);
                    let s = _mm256_set1_ps(scale);
                    let mut i = 0;
                    // 16 columns (8 bytes) at a time: low and high nibbles interleaved
                    // into column order, minus 8, widened to f32, times the scale.
                    while i + 16 <= len {
                        // SAFETY: columns i..i + 16 are bytes i/2..i/2 + 8 of the group,
                        // within the row; `o` holds `len` values.
                        unsafe {
                            let v = _mm_loadl_epi64(bytes.as_ptr().add(i / 2).cast());
                            let lo = _mm_and_si128(v, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
                            let q = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight);
                            let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                            let b =
                                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q)));
                            _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(a, s));
                            _mm256_storeu_ps(o.as_mut_ptr().add(i + 8), _mm256_mul_ps(b, s));
                        }
                        i += 16;
                    }
                    for (j, v) in o.iter_mut().enumerate().skip(i) {
                        let b = bytes[j / 2] >> (4 * (j % 2));
                        *v = f32::from((b & 0xf) as i8 - 8) * scale;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::quant::Quant;

    /// Bit for bit the portable values, for widths with and without a SIMD tail and a
    /// short last group.
    #[test]
    fn rows_equal_the_portable_dequantization() {
        for cols in [5usize, 16, 37, 100, 384, 1000] {
            let rows = 3;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
                .collect();
            for quant in [
                Quant::Int8,
                Quant::Int4 { group: 16 },
                Quant::Int4 { group: 64 },
            ] {
                let m = QuantMatrix::quantize(&w, rows, cols, quant).unwrap();
                let (mut got, mut want) = (vec![0.0; cols], vec![0.0; cols]);
                for r in 0..rows {
                    dequantize_row(&m, r, &mut got);
                    m.dequantize_row(r, &mut want);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{quant:?} cols {cols} row {r}"
                    );
                }
            }
        }
    }
}
