//! A few-row step's attention input in one launch: the qkv projection stores its
//! queries through rotary and its keys and values straight into the KV cache, beside
//! the MLP up projection, so that `rope_qkv` and its kernel boundary drop out of the
//! layer: `gemv2_rope_bf16_r1` for one row on CUDA cores, `gemv2_tcx_rope_r*` for the
//! row-invariant tensor-core pair of up to 8 rows (the runtime's decode and verify
//! steps). The stored values are bit-identical to [`Gpu::linear_pair`] followed by
//! [`Gpu::attention`], which every other step takes.

use super::attention::{AttentionParams, KvBuffers};
use super::linear::{bias_args, gemv_features_per_block, GEMV_WARPS};
use super::pair::{check_pair, PairHalf, PairRoute};
use super::{p, to_i32};
use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, GemvSplit, Gpu};
use crate::step::DeviceStep;

impl Gpu {
    /// `(attention(x @ qkv^T + qkv_bias), up(x))` for one layer: [`Gpu::linear_pair`]
    /// of the two products, then [`Gpu::attention`] over the first. Where the pair would
    /// run as `gemv2_bf16_r1` or as the row-invariant `gemv2_tc*`, the fused kernel runs
    /// instead when `fuse_rope` (callers pass [`Gpu::fuse_rope`], or true where they
    /// always fuse), writing the queries and the cache. `then` is queued between the
    /// two, with the up projection's output (the caller forks the MLP's next product
    /// there, [`Gpu::fork`]); its result comes back third.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_and_pair<T>(
        &self,
        x: &DeviceBuffer<f32>,
        k: usize,
        qkv: PairHalf<'_>,
        up: PairHalf<'_>,
        groups: &[usize],
        kv: &mut KvBuffers,
        layer: usize,
        step: &DeviceStep,
        a: &AttentionParams<'_>,
        fuse_rope: bool,
        then: impl FnOnce(&DeviceBuffer<f32>) -> Result<T, KernelError>,
    ) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>, T), KernelError> {
        let rows = step.rows;
        // The one-row CUDA-core pair, or the row-invariant tensor-core pair of up to 8
        // rows (the runtime's decode and verify steps), whose tiles then hold rotary
        // pairs (16 features: head sizes that are multiples of 16).
        let route = self.pair_route(rows, k, qkv.n, up.n);
        if !(fuse_rope && !qkv.gelu && rope_fuses(route, a.head_dim)) {
            let (y, up_out) = self.linear_pair(x, rows, k, qkv, up, groups)?;
            let t = then(&up_out)?;
            return Ok((self.attention(&y, kv, layer, step, a)?, up_out, t));
        }
        let g = self.attention_geometry(kv, layer, step, a)?;
        check_pair(x, rows, k, &qkv, &up)?;
        if qkv.n != g.qkv_cols() {
            return Err(KernelError::invalid(
                "attention",
                format!(
                    "qkv has {} features, {} heads over {} kv heads of {} need {}",
                    qkv.n,
                    g.nh,
                    g.kvh,
                    g.hd,
                    g.qkv_cols()
                ),
            ));
        }
        let q = self.scratch::<f32>(rows * g.nh * g.hd)?;
        let up_out = self.scratch::<f32>(rows * up.n)?;
        let rope = g.rope_args(&q, kv, step)?;
        if route == PairRoute::Simt {
            self.pair_rope_simt(x, k, &qkv, &up, &up_out, &rope)?;
        } else {
            // The qkv half's output argument is never written: q stands in for it.
            self.pair_tc(x, rows, k, &qkv, &up, &q, &up_out, true, Some(&rope))?;
        }
        self.count_fused_rope_launch();
        let t = then(&up_out)?;
        Ok((self.attend(&q, kv, step, &g)?, up_out, t))
    }

    /// `gemv2_rope_bf16_r1`: one row on CUDA cores, the qkv half in rotary pairs.
    fn pair_rope_simt(
        &self,
        x: &DeviceBuffer<f32>,
        k: usize,
        qkv: &PairHalf<'_>,
        up: &PairHalf<'_>,
        up_out: &DeviceBuffer<f32>,
        rope: &[Arg],
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        // Four rotary pairs per block on the qkv side; the up projection's blocks as
        // gemv2_bf16_r1 deals them.
        let blocks_a = (qkv.n / 2).div_ceil(GEMV_WARPS as usize) as u32;
        let blocks_b = (up.n as u32).div_ceil(gemv_features_per_block(1, GemvSplit::One));
        let (ba, has_ba) = bias_args(qkv.bias, x);
        let mut args = vec![
            p(x),
            Arg::I32(to_i32(OP, k)?),
            p(qkv.w),
            ba,
            Arg::I32(has_ba),
            Arg::I32(blocks_a as i32),
        ];
        args.extend(up.simt_args(x, up_out)?);
        args.extend_from_slice(rope);
        self.launch(
            &self.k.gemv2_rope_simt_r1,
            (blocks_a + blocks_b, 1, 1),
            32 * GEMV_WARPS,
            0,
            &args,
        )
    }
}

/// Whether a pair taking `route` can store a fused qkv projection of head size
/// `head_dim`: the one-row CUDA-core kernel deals rotary pairs to warps (any even head
/// size), the row-invariant tensor-core one to 16-feature tiles of 8 pairs and their
/// partners (multiples of 16). Other routes keep `rope_qkv`.
fn rope_fuses(route: PairRoute, head_dim: usize) -> bool {
    match route {
        PairRoute::Simt => head_dim.is_multiple_of(2),
        PairRoute::TensorCores { exact: true } => head_dim.is_multiple_of(16),
        PairRoute::TensorCores { exact: false } | PairRoute::Separate => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_pairs_fit_the_routes_kernels() {
        for hd in [8, 16, 64, 128] {
            assert!(rope_fuses(PairRoute::Simt, hd), "{hd} on CUDA cores");
            assert!(!rope_fuses(PairRoute::Separate, hd));
            assert!(!rope_fuses(PairRoute::TensorCores { exact: false }, hd));
        }
        assert!(!rope_fuses(PairRoute::Simt, 7));
        let tc = |hd| rope_fuses(PairRoute::TensorCores { exact: true }, hd);
        assert!(tc(16) && tc(64) && tc(128));
        assert!(!tc(8) && !tc(24) && !tc(2));
    }
}
