//! Falcon's parallel-attention layer on the GPU, `x += dense(attn(a)) + down(gelu(up(a)))`
//! for the layer's normed input `a`: the qkv and up projections as one pair, the
//! attention, then the two residual products. With [`Gpu::set_fork_mlp`] a one-row step
//! (in row-invariant mode, any step whose products run as GEMVs) runs the MLP down
//! projection on a second stream while the attention runs (it needs only the up
//! projection), and the attention output projection after both. A forked row-invariant
//! step keeps the unforked order of the sums (attention output projection first, then
//! the MLP's product from a buffer of its own), so that forking changes no bit.
//!
//! [`Gpu::set_fork_mlp`]: falconer_kernels::Gpu::set_fork_mlp

use falconer_kernels::DeviceBuffer;

use super::{
    attention_output, attention_params, check_linear, check_step_rows, groups, invalid, map_err,
    pair_half, CudaBackend, CudaKvCache, CudaStep, CudaTensor,
};
use crate::backend::{AttnConfig, Backend, ParallelWeights};
use crate::error::BackendError;

impl CudaBackend {
    /// Whether a parallel-attention layer of `rows` rows runs its MLP beside the
    /// attention ([`Gpu::set_fork_mlp`]; `separate`: a layer whose attention and MLP have
    /// norms of their own): outside row-invariant mode one-row steps (measured with a
    /// shared norm), in it every step whose products run as GEMVs (the runtime's decode
    /// and verify steps). All but one-row shared-norm steps outside row-invariant mode
    /// only with [`Gpu::set_fork_wide`].
    ///
    /// [`Gpu::set_fork_wide`]: falconer_kernels::Gpu::set_fork_wide
    pub(super) fn forks_mlp(&self, rows: usize, separate: bool) -> bool {
        let gpu = &self.gpu;
        if !gpu.fork_mlp() {
            return false;
        }
        if gpu.row_invariant() {
            gpu.fork_wide() && gpu.gemv_takes_rows(rows)
        } else {
            rows == 1 && (!separate || gpu.fork_wide())
        }
    }

    /// [`Backend::parallel_attention_separate`] with the whole MLP (its up and down
    /// projections) on a second stream while the main stream runs the qkv projection,
    /// the attention and its output projection; the MLP's product is added after those,
    /// as unforked (the same bits).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn parallel_attention_separate_forked(
        &self,
        a: &CudaTensor,
        m: &CudaTensor,
        w: &ParallelWeights<'_, CudaTensor>,
        kv: &mut CudaKvCache,
        layer: usize,
        step: &CudaStep,
        attn: &AttnConfig,
        acc: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let ((up, up_bias), (down, down_bias)) = (w.up, w.down);
        check_linear(m, up)?;
        if down.cols != up.rows || a.rows != m.rows || (acc.rows, acc.cols) != (m.rows, down.rows) {
            return Err(invalid(
                "linear",
                format!(
                    "{}x{} accumulator for a {}-row MLP of {} -> {} -> {} features \
                     ({} attention rows)",
                    acc.rows, acc.cols, m.rows, up.cols, up.rows, down.rows, a.rows
                ),
            ));
        }
        let gpu = &self.gpu;
        let product = gpu
            .fork_mlp_product(
                m.f32("linear")?,
                m.rows,
                m.cols,
                pair_half(up, up_bias, true)?,
                pair_half(down, down_bias, false)?,
                groups(m),
            )
            .map_err(map_err)?;
        // An error from here on drops `product`, which joins it.
        let qkv = self.linear(a, w.qkv.0, w.qkv.1)?;
        let ctx = self.attention(&qkv, kv, layer, step, attn)?;
        self.linear_add(&ctx, w.dense.0, w.dense.1, acc)?;
        let mlp = product.join().map_err(map_err)?;
        gpu.add(acc.f32_mut("add")?, &mlp).map_err(map_err)
    }

    /// The qkv and up projections of `x` (`(weight, bias)` each, GELU on the second),
    /// `then` with the up projection's output, then the attention; returns the attention
    /// output, the up projection's output and `then`'s result. `fuse_rope` as for
    /// [`Gpu::attention_and_pair`].
    ///
    /// [`Gpu::attention_and_pair`]: falconer_kernels::Gpu::attention_and_pair
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_pair_then<T>(
        &self,
        x: &CudaTensor,
        (qkv, qkv_bias): (&CudaTensor, Option<&CudaTensor>),
        (up, up_bias): (&CudaTensor, Option<&CudaTensor>),
        kv: &mut CudaKvCache,
        layer: usize,
        step: &CudaStep,
        attn: &AttnConfig,
        fuse_rope: bool,
        then: impl FnOnce(&DeviceBuffer<f32>) -> Result<T, falconer_kernels::KernelError>,
    ) -> Result<(CudaTensor, DeviceBuffer<f32>, T), BackendError> {
        check_linear(x, qkv)?;
        check_linear(x, up)?;
        check_step_rows(x, step)?;
        let slopes = self.alibi_slopes(attn)?;
        let (ctx, up_out, t) = self
            .gpu
            .attention_and_pair(
                x.f32("linear")?,
                x.cols,
                pair_half(qkv, qkv_bias, false)?,
                pair_half(up, up_bias, true)?,
                groups(x),
                &mut kv.buf,
                layer,
                &step.dev,
                &attention_params(attn, slopes.as_deref()),
                fuse_rope,
                then,
            )
            .map_err(map_err)?;
        Ok((attention_output(ctx, x.rows, attn, step), up_out, t))
    }

    /// [`Backend::parallel_attention`] with the MLP down projection forked
    /// beside the attention: `acc += down(h)` on the second stream, then, after the
    /// join, `acc += dense(attn)`. The qkv projection always stores the rotary queries
    /// and the cache itself here (`Gpu::fuse_rope` aside; the same bits as `rope_qkv`):
    /// on an H100 the forked layer decoded at 194.1 tokens/s with `rope_qkv` and 205.4
    /// with the fused projection, against 195.0 unforked (three interleaved runs each,
    /// `benches/results/h100_fork.txt`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn parallel_attention_forked(
        &self,
        x: &CudaTensor,
        w: &ParallelWeights<'_, CudaTensor>,
        kv: &mut CudaKvCache,
        layer: usize,
        step: &CudaStep,
        attn: &AttnConfig,
        acc: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let ((down, down_bias), up, dense) = (w.down, w.up.0, w.dense.0);
        // Both residual products checked before anything is queued, as the unforked
        // layer's sum does (the projections are checked by `attention_pair_then`), so
        // that a bad shape leaves `acc` untouched.
        let ctx_cols = attn.num_heads * attn.head_dim;
        if down.cols != up.rows
            || dense.cols != ctx_cols
            || dense.rows != down.rows
            || (acc.rows, acc.cols) != (x.rows, down.rows)
        {
            return Err(invalid(
                "linear",
                format!(
                    "{}x{} accumulator for a {}-row MLP of {} -> {} -> {} features and an \
                     attention output projection of {} -> {} ({ctx_cols} attention features)",
                    acc.rows, acc.cols, x.rows, up.cols, up.rows, down.rows, dense.cols, dense.rows
                ),
            ));
        }
        let gpu = &self.gpu;
        let down_w = down.bf16("linear")?;
        let down_b = down_bias.map(|b| b.f32("linear")).transpose()?;
        if gpu.row_invariant() {
            // `acc + dense + down` in the unforked order, so that a row gets the bits
            // of every other step (a product added from its own buffer is rounded as
            // one accumulated by its GEMV).
            let (ctx, up_out, product) =
                self.attention_pair_then(x, w.qkv, w.up, kv, layer, step, attn, true, |h| {
                    gpu.fork_linear(h, x.rows, up.rows, down_w, down.rows, down_b, groups(x))
                })?;
            let mlp = product.join().map_err(map_err)?;
            drop(up_out);
            self.linear_add(&ctx, dense, w.dense.1, acc)?;
            return gpu.add(acc.f32_mut("add")?, &mlp).map_err(map_err);
        }
        let acc_buf = acc.f32_mut("linear")?;
        let (ctx, up_out, forked) =
            self.attention_pair_then(x, w.qkv, w.up, kv, layer, step, attn, true, |h| {
                gpu.fork_linear_accumulate(
                    h,
                    x.rows,
                    up.rows,
                    down_w,
                    down.rows,
                    down_b,
                    acc_buf,
                    groups(x),
                )
            })?;
        forked.join().map_err(map_err)?;
        // The forked product read `up_out` and wrote `acc` until the join.
        drop(up_out);
        self.linear_add(&ctx, dense, w.dense.1, acc)
    }
}
