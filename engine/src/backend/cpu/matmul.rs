//! `y = x @ w^T + b` for row-major `x [t, k]` and checkpoint-layout `w [n, k]`.
//!
//! Work is split over output features: each task streams its weight rows once and
//! reuses each row for every token in the step, so a k+1-token verify pass reads the
//! weights once, like a single decode step.

use rayon::prelude::*;

/// Output features per parallel task.
const CHUNK: usize = 16;

pub(super) fn linear(
    x: &[f32],
    t: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    // Computed transposed ([n, t]) so that every task writes one contiguous range.
    let mut yt = vec![0.0f32; n * t];
    yt.par_chunks_mut(CHUNK * t)
        .enumerate()
        .for_each(|(c, out)| {
            let first = c * CHUNK;
            for (j, out_row) in out.chunks_mut(t).enumerate() {
                let o = first + j;
                let w_row = &w[o * k..(o + 1) * k];
                let b = bias.map_or(0.0, |b| b[o]);
                row_dots(x, k, w_row, out_row);
                for y in out_row.iter_mut() {
                    *y += b;
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
fn row_dots(x: &[f32], k: usize, w_row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            unsafe { simd::row_dots(x, k, w_row, out) };
            return;
        }
    }
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

    /// Up to four rows at a time share each 8-wide load of the weight row; every row
    /// keeps its own accumulator, reduced in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_dots(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        let t = out.len();
        let k8 = k / 8 * 8;
        let wp = w.as_ptr();
        let mut r0 = 0;
        while r0 < t {
            let rows = (t - r0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < k8 {
                // SAFETY: i + 8 <= k8 <= k = w.len(), and each row slice is k long.
                let wv = unsafe { _mm256_loadu_ps(wp.add(i)) };
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add((r0 + r) * k + i)) };
                    *a = _mm256_fmadd_ps(xv, wv, *a);
                }
                i += 8;
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                let mut lanes = [0.0f32; 8];
                // SAFETY: lanes holds 8 f32.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
                for j in k8..k {
                    s += xr[j] * w[j];
                }
                out[r0 + r] = s;
            }
            r0 += rows;
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
    use super::*;

    #[test]
    fn matches_naive_matmul() {
        let (t, n, k) = (3, 37, 19);
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 13) as f32 * 0.25 - 1.5)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let y = linear(&x, t, &w, n, k, Some(&b));
        for r in 0..t {
            for o in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum::<f32>() + b[o];
                assert!((y[r * n + o] - want).abs() < 1e-3, "{r},{o}");
            }
        }
    }
}
