//! Two products of two inputs added to one residual stream: Falcon's parallel-attention
//! layer ends with `x += dense(attn) + mlp_down(gelu_up)`. For one row outside
//! row-invariant mode both run as one dot product over the two inputs laid end to end
//! (`gemv_cat_bf16_r1`): one launch streams both weights, where two launches would each
//! drain the GPU and ramp it up again. The sum is rounded differently from two
//! accumulating launches, so steps that must match other steps bit for bit (row-invariant
//! mode) and every other shape take the two launches. Its rows (both inputs) are longer
//! than its output count, so [`Gpu::set_gemv_split`] lets several warps share each.
//!
//! When the caller knows the second input was complete before the kernel it queued last
//! (Falcon's MLP activations, computed before the attention) and
//! [`Gpu::set_sum_overlap`] allows it (off by default: measured slower), the launch
//! streams that product first, before its programmatic-dependent-launch wait
//! (`gemv_cat_late_bf16_r1`): the larger weight (the MLP down projection) then streams
//! while the attention still runs, and only the attention output projection waits.

use half::bf16;

use super::linear::{bias_args, gemv_features_per_block, GEMV_WARPS};
use super::{check_len, p, to_i32};
use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, GemvKernel, Gpu};

/// One term of [`Gpu::linear_accumulate_sum`]: `x [rows, k] @ w [n, k]^T (+ bias)`.
#[derive(Debug, Clone, Copy)]
pub struct SumTerm<'a> {
    pub x: &'a DeviceBuffer<f32>,
    pub k: usize,
    pub w: &'a DeviceBuffer<bf16>,
    pub bias: Option<&'a DeviceBuffer<f32>>,
}

impl Gpu {
    /// `acc += a + b` for two products with `n` outputs over `rows` rows. `groups` as for
    /// [`Gpu::linear`]. `b_ready`: no kernel from the one queued last on writes `b.x`, so
    /// that a fused launch may multiply it before waiting for that kernel
    /// ([`Gpu::set_sum_overlap`]); a caller that cannot tell passes false.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_accumulate_sum(
        &self,
        rows: usize,
        n: usize,
        a: SumTerm<'_>,
        b: SumTerm<'_>,
        acc: &mut DeviceBuffer<f32>,
        groups: &[usize],
        b_ready: bool,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        check_len(OP, "accumulator", acc, rows * n)?;
        for t in [&a, &b] {
            check_len(OP, "input", t.x, rows * t.k)?;
            check_len(OP, "weight", t.w, n * t.k)?;
            if let Some(bias) = t.bias {
                check_len(OP, "bias", bias, n)?;
            }
        }
        let fused = self.fuse_sum()
            && rows == 1
            && n > 0
            && !self.row_invariant()
            && self.gemv_kernel(1) == GemvKernel::Simt
            && a.k.is_multiple_of(8)
            && b.k.is_multiple_of(8);
        if !fused {
            for t in [&a, &b] {
                self.linear_accumulate(t.x, rows, t.k, t.w, n, t.bias, acc, groups)?;
            }
            return Ok(());
        }
        let term = |t: &SumTerm<'_>| -> Result<[Arg; 5], KernelError> {
            let (bias, has_bias) = bias_args(t.bias, t.x);
            Ok([
                p(t.x),
                p(t.w),
                Arg::I32(to_i32(OP, t.k)?),
                bias,
                Arg::I32(has_bias),
            ])
        };
        // The term multiplied before the wait goes first.
        let late = b_ready && self.sum_overlap();
        let split = self.gemv_split_for(n, a.k + b.k);
        let (first, second, kernel) = if late {
            (&b, &a, &self.k.gemv_cat_late_simt_r1[split.index()])
        } else {
            (&a, &b, &self.k.gemv_cat_simt_r1[split.index()])
        };
        let mut args = Vec::with_capacity(12);
        args.extend(term(first)?);
        args.extend(term(second)?);
        args.extend([p(acc), Arg::I32(to_i32(OP, n)?)]);
        let blocks = (n as u32).div_ceil(gemv_features_per_block(1, split));
        self.launch(kernel, (blocks, 1, 1), 32 * GEMV_WARPS, 0, &args)?;
        if late {
            self.count_late_sum_launch();
        }
        Ok(())
    }
}
