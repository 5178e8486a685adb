//! Sampling warps where the logits are: repetition penalty, temperature, top-k, top-p
//! and softmax of whole rows (`warp_probs_rows_f32`), so that a sampled step hands the
//! host a distribution to draw from instead of a row to sort.

use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, Gpu};
use crate::ops::{check_len, p, to_i32};

/// Words per row of the kernel's parameter array (see `sampling.cu`).
const SPEC_WORDS: usize = 8;

/// Blocks per row on sm_90+ (the portable cluster size).
const WARP_CLUSTER: u32 = 8;

/// Words of a row's exchange area (`PROBS_WORK_WORDS` in `sampling.cu`: nine 4096-bin
/// histograms and four reductions of up to 16 blocks).
const WORK_WORDS: usize = 9 * 4096 + 4 * 16;

/// One row to warp: which logit row, and the parameters of engine/src/sampling
/// `warp_probs` after `apply_repetition_penalty`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbsSpec<'a> {
    /// Row of the logits tensor.
    pub row: usize,
    /// Positive and finite (greedy rows take `argmax_rows` or `penalized_argmax_rows`).
    pub temperature: f32,
    /// 0 (or at least the row length) keeps every token.
    pub top_k: usize,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// Token ids the penalty applies to, each once (duplicates are dropped here).
    pub penalized: &'a [u32],
}

/// A warped row.
#[derive(Debug, Clone, PartialEq)]
pub enum WarpedRow {
    /// The normalised distribution (filtered tokens exactly 0).
    Probs(Vec<f32>),
    /// The penalised logits of a row the kernel leaves to the host: one without a usable
    /// logit, or with a `+inf` one (rare rows whose host semantics are not worth a kernel).
    Logits(Vec<f32>),
}

impl Gpu {
    /// The warped distribution of each spec's row of `x [rows, cols]`.
    pub fn warp_probs_rows(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        cols: usize,
        specs: &[ProbsSpec<'_>],
    ) -> Result<Vec<WarpedRow>, KernelError> {
        const OP: &str = "warp_probs_rows";
        check_len(OP, "logits", x, rows * cols)?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        if cols == 0 {
            return Err(KernelError::invalid(OP, "rows of zero logits"));
        }
        let mut words = Vec::with_capacity(specs.len() * SPEC_WORDS);
        let mut ids: Vec<u32> = Vec::new();
        for s in specs {
            check_spec(s, rows)?;
            let start = ids.len();
            if s.repetition_penalty != 1.0 {
                ids.extend(distinct_ids(s.penalized, cols));
            }
            let top_k = if s.top_k >= cols { 0 } else { s.top_k };
            words.extend([
                s.row as u32,
                top_k as u32,
                s.temperature.to_bits(),
                s.top_p.to_bits(),
                s.repetition_penalty.to_bits(),
                start as u32,
                (ids.len() - start) as u32,
                0,
            ]);
        }
        let spec_buf = self.upload(&words)?;
        let id_buf = self.upload(&ids)?;
        // The rows, then each row's status (as bits): one copy back.
        let n = specs.len();
        let out = self.scratch::<f32>(n * cols + n)?;
        let work = self.zeros::<u64>(n * WORK_WORDS)?;
        // A cluster of blocks per row where the device has clusters (sm_90+): a pass over
        // a 65k-entry row is issue-bound on one SM. One 65k row on the H200 (top-k 50,
        // top-p 0.95): 205 us with 1 block, 121 with 2, 76 with 4, 55 with 8.
        let cluster = if self.compute_capability().0 >= 9 {
            WARP_CLUSTER
        } else {
            1
        };
        let launch = |cluster: u32| {
            self.launch_clustered(
                &self.k.warp_probs_rows_f32,
                (cluster * n as u32, 1, 1),
                1024,
                0,
                &[
                    p(x),
                    p(&spec_buf),
                    p(&id_buf),
                    p(&out),
                    Arg::U64(out.ptr_at(n * cols)),
                    p(&work),
                    Arg::I32(to_i32(OP, cols)?),
                    Arg::F32(fixed_point_scale(cols)),
                    Arg::I32(cluster as i32),
                ],
                cluster,
            )
        };
        // A device that cannot place a cluster (a small MIG slice) still runs the kernel
        // with one block per row.
        if cluster == 1 || launch(cluster).is_err() {
            launch(1)?;
        }
        let mut data = self.download_f32(&out)?;
        let status: Vec<u32> = data
            .split_off(n * cols)
            .iter()
            .map(|s| s.to_bits())
            .collect();
        // Rows split off the end, so that the first keeps the download's allocation.
        let mut rows: Vec<WarpedRow> = Vec::with_capacity(specs.len());
        for (r, s) in status.iter().enumerate().rev() {
            let row = if r == 0 {
                std::mem::take(&mut data)
            } else {
                data.split_off(r * cols)
            };
            rows.push(match s {
                0 => WarpedRow::Probs(row),
                _ => WarpedRow::Logits(row),
            });
        }
        rows.reverse();
        Ok(rows)
    }
}

/// One row for [`Gpu::penalized_argmax_rows`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PenaltySpec<'a> {
    /// Row of the logits tensor.
    pub row: usize,
    pub repetition_penalty: f32,
    /// Token ids the penalty applies to, each once (duplicates are dropped here).
    pub penalized: &'a [u32],
}

impl Gpu {
    /// Greedy tokens of penalised rows: each spec's row of `x [rows, cols]`, copied, with
    /// engine/src/sampling `apply_repetition_penalty`, then its `argmax_rows` (`None`: no
    /// usable logit). Only the token ids cross to the host.
    pub fn penalized_argmax_rows(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        cols: usize,
        specs: &[PenaltySpec<'_>],
    ) -> Result<Vec<Option<u32>>, KernelError> {
        const OP: &str = "penalized_argmax_rows";
        check_len(OP, "logits", x, rows * cols)?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let mut list = Vec::with_capacity(specs.len());
        let mut words = Vec::with_capacity(3 * specs.len());
        let mut ids: Vec<u32> = Vec::new();
        for s in specs {
            check_row_and_penalty(OP, s.row, rows, s.repetition_penalty)?;
            let start = ids.len();
            if s.repetition_penalty != 1.0 {
                ids.extend(distinct_ids(s.penalized, cols));
            }
            list.push(s.row as u32);
            words.extend([
                s.repetition_penalty.to_bits(),
                start as u32,
                (ids.len() - start) as u32,
            ]);
        }
        let n = specs.len();
        let list_buf = self.upload(&list)?;
        let spec_buf = self.upload(&words)?;
        let id_buf = self.upload(&ids)?;
        let copy = self.scratch::<f32>(n * cols)?;
        let c = Arg::I32(to_i32(OP, cols)?);
        self.launch(
            &self.k.gather_rows_f32,
            (n as u32, 1, 1),
            256,
            0,
            &[p(x), p(&list_buf), p(&copy), c],
        )?;
        self.launch(
            &self.k.penalize_rows_f32,
            (n as u32, 1, 1),
            256,
            0,
            &[p(&copy), p(&spec_buf), p(&id_buf), c],
        )?;
        self.argmax_rows(&copy, n, cols)
    }
}

/// The ids below `cols`, sorted, each once (the host penalises a repeated id once).
fn distinct_ids(ids: &[u32], cols: usize) -> Vec<u32> {
    let mut own: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&i| (i as usize) < cols)
        .collect();
    own.sort_unstable();
    own.dedup();
    own
}

/// A row index inside the logits and a usable repetition penalty.
fn check_row_and_penalty(
    op: &'static str,
    row: usize,
    rows: usize,
    penalty: f32,
) -> Result<(), KernelError> {
    if row >= rows {
        return Err(KernelError::invalid(
            op,
            format!("row {row} of {rows} logit rows"),
        ));
    }
    if !(penalty.is_finite() && penalty > 0.0) {
        return Err(KernelError::invalid(
            op,
            format!("repetition penalty {penalty}"),
        ));
    }
    Ok(())
}

fn check_spec(s: &ProbsSpec<'_>, rows: usize) -> Result<(), KernelError> {
    const OP: &str = "warp_probs_rows";
    check_row_and_penalty(OP, s.row, rows, s.repetition_penalty)?;
    if !(s.temperature.is_finite() && s.temperature > 0.0) {
        return Err(KernelError::invalid(
            OP,
            format!("temperature {} (greedy rows take an argmax)", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(KernelError::invalid(OP, format!("top_p {}", s.top_p)));
    }
    if u32::try_from(s.top_k).is_err() {
        return Err(KernelError::invalid(OP, format!("top_k {}", s.top_k)));
    }
    Ok(())
}

/// 2^s for the largest s with `cols * 2^s < 2^63`: each token's weight exp((x - max)/t)
/// <= 1 becomes an integer below 2^s, and a row's sum cannot overflow u64.
fn fixed_point_scale(cols: usize) -> f32 {
    let bits = usize::BITS - cols.leading_zeros();
    2f32.powi(63 - bits as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_leaves_room_for_a_row_sum() {
        for cols in [1usize, 2, 3, 1000, 65024, 65536, 131072, 250_000] {
            let s = fixed_point_scale(cols) as f64;
            assert!((cols as f64) * s < 2f64.powi(63), "cols {cols}");
            assert!(
                (cols as f64) * s * 2.0 >= 2f64.powi(63),
                "cols {cols}: not the largest"
            );
        }
    }
}
