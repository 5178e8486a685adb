//! A decode step's attention input in one launch: the qkv projection stores its
//! queries through rotary and its keys and values straight into the KV cache
//! (`gemv2_rope_bf16_r1`), beside the MLP up projection, so that `rope_qkv` and its
//! kernel boundary drop out of the layer. The stored values are bit-identical to
//! [`Gpu::linear_pair`] followed by [`Gpu::attention`], which every other step takes.

use super::attention::{AttentionParams, KvBuffers};
use super::linear::{bias_args, gemv_features_per_block, GEMV_WARPS};
use super::pair::{PairHalf, PairRoute};
use super::{check_len, p, to_i32};
use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, Gpu};
use crate::step::DeviceStep;

impl Gpu {
    /// `(attention(x @ qkv^T + qkv_bias), up(x))` for one layer: [`Gpu::linear_pair`]
    /// of the two products, then [`Gpu::attention`] over the first. A one-row step that
    /// the pair would run as `gemv2_bf16_r1` runs as `gemv2_rope_bf16_r1` instead (while
    /// [`Gpu::fuse_rope`] is on), writing the queries and the cache itself.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_and_pair(
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
    ) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelError> {
        const OP: &str = "linear";
        let rows = step.rows;
        let fused = self.fuse_rope()
            && rows == 1
            && !qkv.gelu
            && a.head_dim.is_multiple_of(2)
            && self.pair_route(rows, k, qkv.n, up.n) == PairRoute::Simt;
        if !fused {
            let (y, up_out) = self.linear_pair(x, rows, k, qkv, up, groups)?;
            return Ok((self.attention(&y, kv, layer, step, a)?, up_out));
        }
        let g = self.attention_geometry(kv, layer, step, a)?;
        check_len(OP, "input", x, k)?;
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
        for h in [&qkv, &up] {
            check_len(OP, "weight", h.w, h.n * k)?;
            if let Some(bias) = h.bias {
                check_len(OP, "bias", bias, h.n)?;
            }
        }
        let q = self.scratch::<f32>(g.nh * g.hd)?;
        let up_out = self.scratch::<f32>(up.n)?;
        // Four rotary pairs per block on the qkv side; the up projection's blocks as
        // gemv2_bf16_r1 deals them.
        let blocks_a = (qkv.n / 2).div_ceil(GEMV_WARPS as usize) as u32;
        let blocks_b = (up.n as u32).div_ceil(gemv_features_per_block(1));
        let (ba, has_ba) = bias_args(qkv.bias, x);
        let (bb, has_bb) = bias_args(up.bias, x);
        let mut args = vec![
            p(x),
            Arg::I32(to_i32(OP, k)?),
            p(qkv.w),
            ba,
            Arg::I32(has_ba),
            Arg::I32(blocks_a as i32),
            p(up.w),
            bb,
            p(&up_out),
            Arg::I32(to_i32(OP, up.n)?),
            Arg::I32(has_bb),
            Arg::I32(up.epilogue() as i32),
        ];
        args.extend(g.rope_args(&q, kv, step)?);
        self.launch(
            &self.k.gemv2_rope_simt_r1,
            (blocks_a + blocks_b, 1, 1),
            32 * GEMV_WARPS,
            0,
            &args,
        )?;
        self.count_fused_rope_launch();
        Ok((self.attend(&q, kv, step, &g)?, up_out))
    }
}
