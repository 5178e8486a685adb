//! `y = x @ w^T + b` for row-major `x [t, k]` and checkpoint-layout `w [n, k]`.
//!
//! Work is split over output features: each task streams its weight rows once and
//! reuses each row for every token in the step, so a k+1-token verify pass reads the
//! weights once, like a single decode step.

use rayon::prelude::*;

use crate::quant::QuantMatrix;

/// Output features per parallel task.
const CHUNK: usize = 16;

/// A weight matrix `[n, k]` as the matmul reads it: f32 rows, or a quantized matrix
/// whose rows it dequantizes one at a time (into a buffer of the task's own).
#[derive(Debug, Clone, Copy)]
pub(super) enum WeightRows<'a> {
    F32(&'a [f32]),
    Quant(&'a QuantMatrix),
}

#[cfg(test)]
pub(super) fn linear(
    x: &[f32],
    t: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    act: Option<fn(f32) -> f32>,
) -> Vec<f32> {
    linear_rows(x, t, WeightRows::F32(w), n, k, bias, act)
}

/// [`linear`] over any [`WeightRows`]: a quantized weight gives exactly the products of
/// its dequantized f32 matrix (the same row values go through the same dots).
pub(super) fn linear_rows(
    x: &[f32],
    t: usize,
    w: WeightRows<'_>,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    act: Option<fn(f32) -> f32>,
) -> Vec<f32> {
    // Computed transposed ([n, t]) so that every task writes one contiguous range.
    let mut yt = vec![0.0f32; n * t];
    yt.par_chunks_mut(CHUNK * t)
        .enumerate()
        .for_each(|(c, out)| {
            let first = c * CHUNK;
            let mut buf = match w {
                WeightRows::F32(_) => Vec::new(),
                WeightRows::Quant(_) => vec![0.0f32; k],
            };
            for (j, out_row) in out.chunks_mut(t).enumerate() {
                let o = first + j;
                let (w_row, ahead): (&[f32], &[f32]) = match w {
                    // This row and the next, to prefetch ahead while multiplying.
                    WeightRows::F32(w) => (
                        &w[o * k..(o + 1) * k],
                        &w[o * k..((o + 2) * k).min(w.len())],
                    ),
                    WeightRows::Quant(m) => {
                        super::dequant::dequantize_row(m, o, &mut buf);
                        (&buf, &[])
                    }
                };
                let b = bias.map_or(0.0, |b| b[o]);
                row_dots(x, k, w_row, ahead, out_row);
                for y in out_row.iter_mut() {
                    *y += b;
                    if let Some(f) = act {
                        *y = f(*y);
                    }
                }
            }
        });
    if t == 1 {
        return yt;
    }
    let mut y = vec![0.0f32; t * n];
    for o in 0..n {
        for r in 0..t {
            y[r * n + o] = yt[o * t + r];
        }
    }
    y
}

/// `out[r] = x[r] . w_row` for every row of `x`. Each row's sum is computed in the
/// same order however many rows there are, so a verify pass gives bit-identical
/// logits to one-token steps (greedy speculation relies on that).
fn row_dots(x: &[f32], k: usize, w_row: &[f32], ahead: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            unsafe { simd::row_dots(x, k, w_row, ahead, out) };
            return;
        }
    }
    let _ = ahead;
    for (r, y) in out.iter_mut().enumerate() {
        *y = dot(&x[r * k..(r + 1) * k], w_row);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// Up to [`MAX_ROWS`] activation rows at a time share each load of the weight row.
    /// Every row keeps two accumulators (even and odd 8-wide blocks, so that two FMA
    /// chains run at once), summed in one fixed order whatever the row count. The row
    /// count is a compile-time parameter so that the accumulators live in registers.
    /// The weights stream from DRAM: the first pass prefetches `ahead` (this row and
    /// the next, contiguous) a fixed distance in front of its loads.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_dots(x: &[f32], k: usize, w: &[f32], ahead: &[f32], out: &mut [f32]) {
        let t = out.len();
        debug_assert!(x.len() >= t * k && w.len() >= k);
        let mut r0 = 0;
        while r0 < t {
            let rows = (t - r0).min(MAX_ROWS);
            let xr = &x[r0 * k..(r0 + rows) * k];
            let o = &mut out[r0..r0 + rows];
            // SAFETY: xr holds `rows` rows of k, w at least k values; AVX2 + FMA as
            // this function's caller checked.
            unsafe {
                let pf = if r0 == 0 { ahead } else { &[] };
                match rows {
                    1 => dots::<1>(xr, k, w, pf, o),
                    2 => dots::<2>(xr, k, w, pf, o),
                    3 => dots::<3>(xr, k, w, pf, o),
                    4 => dots::<4>(xr, k, w, pf, o),
                    5 => dots::<5>(xr, k, w, pf, o),
                    _ => dots::<6>(xr, k, w, pf, o),
                }
            }
            r0 += rows;
        }
    }

    /// Activation rows per pass over a weight row: 2 accumulators per row plus the two
    /// weight vectors fill the 16 AVX2 registers.
    const MAX_ROWS: usize = 6;
    /// Prefetch distance in f32 (PF_DIST * 4 bytes ahead of the weight loads).
    const PF_DIST: usize = 512;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots<const R: usize>(x: &[f32], k: usize, w: &[f32], pf: &[f32], out: &mut [f32]) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let mut i = 0;
        // SAFETY (all loads): i + 16 <= k (or i + 8 <= k below), w holds k values and
        // x holds R rows of k.
        while i + 16 <= k {
            if i + PF_DIST < pf.len() {
                // SAFETY: in bounds of pf; prefetching never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(pf.as_ptr().add(i + PF_DIST).cast()) };
            }
            let (w0, w1) = unsafe { (_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(wp.add(i + 8))) };
            for r in 0..R {
                let xr = unsafe { xp.add(r * k + i) };
                a0[r] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xr) }, w0, a0[r]);
                a1[r] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xr.add(8)) }, w1, a1[r]);
            }
            i += 16;
        }
        if i + 8 <= k {
            let w0 = unsafe { _mm256_loadu_ps(wp.add(i)) };
            for (r, a) in a0.iter_mut().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(xp.add(r * k + i)) };
                *a = _mm256_fmadd_ps(xv, w0, *a);
            }
            i += 8;
        }
        for r in 0..R {
            let mut lanes = [0.0f32; 8];
            // SAFETY: lanes holds 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0[r], a1[r])) };
            let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            let row = &x[r * k..(r + 1) * k];
            for j in i..k {
                s += row[j] * w[j];
            }
            out[r] = s;
        }
    }
}

/// Dot product with eight independent accumulators (vectorises without fast-math).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        let (pa, pb) = (&a[i * 8..i * 8 + 8], &b[i * 8..i * 8 + 8]);
        for l in 0..8 {
            acc[l] += pa[l] * pb[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn matches_naive_matmul() {
        let (t, n, k) = (3, 37, 19);
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 13) as f32 * 0.25 - 1.5)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let y = linear(&x, t, &w, n, k, Some(&b), None);
        for r in 0..t {
            for o in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum::<f32>() + b[o];
                assert!((y[r * n + o] - want).abs() < 1e-3, "{r},{o}");
            }
        }
    }

    /// Greedy speculation needs a verify pass to give each row exactly what a
    /// one-token step gives it: every row count, every K tail (16-, 8- and 1-wide).
    #[test]
    fn each_row_is_bit_identical_for_any_row_count() {
        for k in [7usize, 8, 16, 24, 37, 384] {
            let n = 35;
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..13 * k)
                .map(|i| ((i * 104_729) % 1000) as f32 / 991.0 - 0.5)
                .collect();
            let alone: Vec<Vec<f32>> = (0..13)
                .map(|r| linear(&x[r * k..(r + 1) * k], 1, &w, n, k, None, None))
                .collect();
            for t in 1..=13 {
                let y = linear(&x[..t * k], t, &w, n, k, None, None);
                for (r, want) in alone.iter().enumerate().take(t) {
                    let got = &y[r * n..(r + 1) * n];
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "k={k}, row {r} of {t}"
                    );
                }
            }
        }
    }

    /// A quantized weight gives the bits its dequantized f32 matrix gives, for every
    /// row count and with bias and activation.
    #[test]
    fn quantized_weights_give_the_products_of_their_dequantized_values() {
        use crate::quant::Quant;
        let (n, k) = (37, 100);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..7 * k)
            .map(|i| ((i * 104_729) % 1000) as f32 / 991.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        for quant in [Quant::Int8, Quant::Int4 { group: 32 }] {
            let m = QuantMatrix::quantize(&w, n, k, quant).unwrap();
            let d = m.dequantize();
            for t in [1, 2, 7] {
                let act: Option<fn(f32) -> f32> = Some(|v| v.max(0.0));
                let got = linear_rows(&x[..t * k], t, WeightRows::Quant(&m), n, k, Some(&b), act);
                let want = linear(&x[..t * k], t, &d, n, k, Some(&b), act);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{quant:?}, {t} rows"
                );
            }
        }
    }

    #[test]
    fn activation_is_applied_to_every_output() {
        let (t, n, k) = (2, 20, 9);
        let x: Vec<f32> = (0..t * k).map(|i| i as f32 * 0.1 - 0.7).collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 3) % 7) as f32 * 0.2 - 0.6)
            .collect();
        let plain = linear(&x, t, &w, n, k, None, None);
        let doubled = linear(&x, t, &w, n, k, None, Some(|v| 2.0 * v));
        assert!(plain.iter().zip(&doubled).all(|(a, b)| *b == 2.0 * a));
    }
}
