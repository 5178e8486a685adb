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
                for (r, y) in out_row.iter_mut().enumerate() {
                    *y = dot(&x[r * k..(r + 1) * k], w_row) + b;
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
