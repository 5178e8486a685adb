//! Two products of one input in one GEMV launch: Falcon's qkv projection and MLP up
//! projection (with GELU) under a shared norm. Each half computes exactly what its own
//! launch would (the same kernel code, tiles and K splits), so results are bit-identical
//! to [`Gpu::linear`] and [`Gpu::linear_gelu`]; what is saved is a kernel boundary per
//! layer, where the GPU drains one grid and ramps up the next. (With
//! [`PairLaunch::TensorCores`] a one-row pair outside row-invariant mode takes the
//! tensor-core kernel where a single product would take the CUDA-core one.)

use half::bf16;

use super::linear::{
    bias_args, gemv_features_per_block, Epilogue, GEMV_MAX_ROWS, GEMV_WARPS, TCG_WARPS,
};
use super::{check_len, p, to_i32};
use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, GemvKernel, Gpu, PairLaunch};

/// One of the two products: `w [n, k]` bf16, optional bias, GELU on the stores or not.
#[derive(Debug, Clone, Copy)]
pub struct PairHalf<'a> {
    pub w: &'a DeviceBuffer<bf16>,
    pub n: usize,
    pub bias: Option<&'a DeviceBuffer<f32>>,
    pub gelu: bool,
}

impl PairHalf<'_> {
    pub(super) fn epilogue(&self) -> Epilogue {
        if self.gelu {
            Epilogue::Gelu
        } else {
            Epilogue::Store
        }
    }

    /// This half's arguments to the one-row CUDA-core pair kernels (`gemv2_bf16_r1`,
    /// `gemv2_rope_bf16_r1`'s second half): weight, bias, output `y`, features, bias
    /// flag, epilogue (`x` stands in for a missing bias).
    pub(super) fn simt_args(
        &self,
        x: &DeviceBuffer<f32>,
        y: &DeviceBuffer<f32>,
    ) -> Result<[Arg; 6], KernelError> {
        let (bias, has_bias) = bias_args(self.bias, x);
        Ok([
            p(self.w),
            bias,
            p(y),
            Arg::I32(to_i32("linear", self.n)?),
            Arg::I32(has_bias),
            Arg::I32(self.epilogue() as i32),
        ])
    }
}

/// Checks the input `x [rows, k]` and both halves' weights and biases of a pair.
pub(super) fn check_pair(
    x: &DeviceBuffer<f32>,
    rows: usize,
    k: usize,
    a: &PairHalf<'_>,
    b: &PairHalf<'_>,
) -> Result<(), KernelError> {
    const OP: &str = "linear";
    check_len(OP, "input", x, rows * k)?;
    for h in [a, b] {
        check_len(OP, "weight", h.w, h.n * k)?;
        if let Some(bias) = h.bias {
            check_len(OP, "bias", bias, h.n)?;
        }
    }
    Ok(())
}

/// The kernels [`Gpu::linear_pair`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PairRoute {
    /// `gemv2_tc*` (row-invariant or not), up to 8 rows.
    TensorCores { exact: bool },
    /// `gemv2_bf16_r1`, one row.
    Simt,
    /// Each product in its own launch.
    Separate,
}

/// [`Gpu::pair_route`] for the row-invariant setting `exact`, the few-row kernel
/// `kernel` that `rows` rows take and the pair-launch setting `launch`.
pub(super) fn pair_route(
    rows: usize,
    k: usize,
    (n_a, n_b): (usize, usize),
    exact: bool,
    kernel: GemvKernel,
    launch: PairLaunch,
) -> PairRoute {
    let fused = (1..=GEMV_MAX_ROWS).contains(&rows) && n_a > 0 && n_b > 0;
    // One row outside row-invariant mode: the CUDA-core GEMV alone, or one launch of it
    // or of the tensor cores (a different kernel, but nothing requires a one-row step to
    // match a verify pass there).
    let mode = match (launch, exact, rows, kernel) {
        (PairLaunch::Off, ..) => PairLaunch::Off,
        (m, false, 1, GemvKernel::Simt) => m,
        (.., GemvKernel::Simt) => PairLaunch::Simt,
        _ => PairLaunch::TensorCores,
    };
    if fused && k.is_multiple_of(32) && mode == PairLaunch::TensorCores {
        PairRoute::TensorCores { exact }
    } else if fused && rows == 1 && k.is_multiple_of(8) && mode == PairLaunch::Simt {
        PairRoute::Simt
    } else {
        PairRoute::Separate
    }
}

impl Gpu {
    /// `(a(x), b(x))` for `x [rows, k]`, each `x @ w^T (+ bias)`, GELU where asked. One
    /// launch when both take the few-row GEMV (up to [`GEMV_MAX_ROWS`] rows); otherwise
    /// the two products one after the other, as [`Gpu::linear`] would run them.
    pub fn linear_pair(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        a: PairHalf<'_>,
        b: PairHalf<'_>,
        groups: &[usize],
    ) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelError> {
        check_pair(x, rows, k, &a, &b)?;
        let mut ya = self.scratch::<f32>(rows * a.n)?;
        let mut yb = self.scratch::<f32>(rows * b.n)?;
        match self.pair_route(rows, k, a.n, b.n) {
            PairRoute::TensorCores { exact } => {
                self.pair_tc(x, rows, k, &a, &b, &ya, &yb, exact, None)?
            }
            PairRoute::Simt => self.pair_simt(x, k, &a, &b, &ya, &yb)?,
            PairRoute::Separate => {
                for (h, y) in [(&a, &mut ya), (&b, &mut yb)] {
                    self.linear_into(x, rows, k, h.w, h.n, h.bias, h.epilogue(), y, groups)?;
                }
            }
        }
        Ok((ya, yb))
    }

    /// How [`Gpu::linear_pair`] runs two products of `n_a` and `n_b` features over
    /// `rows` rows of `k` values under the current settings.
    pub(super) fn pair_route(&self, rows: usize, k: usize, n_a: usize, n_b: usize) -> PairRoute {
        let exact = self.row_invariant();
        let kernel = if exact {
            GemvKernel::Tc4
        } else {
            self.gemv_kernel(rows)
        };
        pair_route(rows, k, (n_a, n_b), exact, kernel, self.pair_launch())
    }

    /// `gemv2_bf16_r1`: one row on CUDA cores.
    fn pair_simt(
        &self,
        x: &DeviceBuffer<f32>,
        k: usize,
        a: &PairHalf<'_>,
        b: &PairHalf<'_>,
        ya: &DeviceBuffer<f32>,
        yb: &DeviceBuffer<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        let split = self.gemv_split_for(a.n + b.n, k);
        let per_block = gemv_features_per_block(1, split);
        let blocks_a = (a.n as u32).div_ceil(per_block);
        let blocks_b = (b.n as u32).div_ceil(per_block);
        let mut args = vec![p(x), Arg::I32(to_i32(OP, k)?)];
        args.extend(a.simt_args(x, ya)?);
        args.push(Arg::I32(blocks_a as i32));
        args.extend(b.simt_args(x, yb)?);
        self.launch(
            &self.k.gemv2_simt_r1[split.index()],
            (blocks_a + blocks_b, 1, 1),
            32 * GEMV_WARPS,
            0,
            &args,
        )
    }

    /// `gemv2_tc*`: up to 8 rows on tensor cores, each half with the tiles and K splits
    /// it has alone. With `rope` (the rotary arguments, row-invariant kernels only) the
    /// first half is a fused qkv projection stored through rotary (`gemv2_tcx_rope_r*`)
    /// and `ya` is not written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pair_tc(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        a: &PairHalf<'_>,
        b: &PairHalf<'_>,
        ya: &DeviceBuffer<f32>,
        yb: &DeviceBuffer<f32>,
        exact: bool,
        rope: Option<&[Arg]>,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        let (ta, tb) = (self.tc_tiles(a.n, k), self.tc_tiles(b.n, k));
        // Arrival counters: the second half's follow the first's.
        let counters = self.gemv_counters(ta.0 + tb.0)?;
        let counters_b = counters + (ta.0 * std::mem::size_of::<u32>()) as u64;
        // Each half's arguments (weight, bias, output, partial sums, counters, features,
        // bias flag, chunks per split, epilogue, tiles, splits) and its partial sums,
        // allocated only when K is split, as for a single product.
        let mut parts = Vec::with_capacity(2);
        let mut half = |h: &PairHalf<'_>,
                        y: &DeviceBuffer<f32>,
                        (tiles, nsplit, per_split): (usize, usize, usize),
                        counters: u64|
         -> Result<[Arg; 11], KernelError> {
            let part = if nsplit > 1 {
                Some(self.scratch::<f32>(nsplit * rows * h.n)?)
            } else {
                None
            };
            let (bias, has_bias) = bias_args(h.bias, x);
            let args = [
                p(h.w),
                bias,
                p(y),
                part.as_ref().map_or(p(y), p),
                Arg::U64(counters),
                Arg::I32(to_i32(OP, h.n)?),
                Arg::I32(has_bias),
                Arg::I32(to_i32(OP, per_split)?),
                Arg::I32(h.epilogue() as i32),
                Arg::I32(to_i32(OP, tiles)?),
                Arg::I32(to_i32(OP, nsplit)?),
            ];
            parts.push(part);
            Ok(args)
        };
        let mut args = vec![p(x), Arg::I32(to_i32(OP, k)?)];
        args.extend(half(a, ya, ta, counters)?);
        args.extend(half(b, yb, tb, counters_b)?);
        let func = match (rope, exact) {
            (Some(extra), true) => {
                args.extend_from_slice(extra);
                &self.k.gemv2_tcx_rope[rows - 1]
            }
            (Some(_), false) => {
                return Err(KernelError::invalid(
                    OP,
                    "the fused qkv projection on tensor cores is row-invariant only",
                ))
            }
            (None, true) => &self.k.gemv2_tc_exact[rows - 1],
            (None, false) => &self.k.gemv2_tc[rows - 1],
        };
        let blocks = ta.0 * ta.1 + tb.0 * tb.1;
        self.launch(
            func,
            (to_i32(OP, blocks)? as u32, 1, 1),
            32 * TCG_WARPS,
            0,
            &args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALCON_7B: (usize, usize) = (4672, 18176);

    #[test]
    fn one_row_outside_row_invariant_mode_takes_the_launch_asked_for() {
        let k = 4544;
        for (launch, want) in [
            (PairLaunch::Simt, PairRoute::Simt),
            (
                PairLaunch::TensorCores,
                PairRoute::TensorCores { exact: false },
            ),
            (PairLaunch::Off, PairRoute::Separate),
        ] {
            assert_eq!(
                pair_route(1, k, FALCON_7B, false, GemvKernel::Simt, launch),
                want
            );
        }
        // The CUDA-core pair needs 16-byte weight rows; the tensor cores whole 32-wide
        // chunks.
        let simt = |k| pair_route(1, k, FALCON_7B, false, GemvKernel::Simt, PairLaunch::Simt);
        assert_eq!(simt(264), PairRoute::Simt);
        assert_eq!(simt(260), PairRoute::Separate);
        let tc = |k| {
            pair_route(
                1,
                k,
                FALCON_7B,
                false,
                GemvKernel::Simt,
                PairLaunch::TensorCores,
            )
        };
        assert_eq!(tc(264), PairRoute::Separate);
    }

    #[test]
    fn row_invariant_mode_takes_its_tensor_cores_for_any_few_rows() {
        for rows in 1..=GEMV_MAX_ROWS {
            assert_eq!(
                pair_route(
                    rows,
                    4544,
                    FALCON_7B,
                    true,
                    GemvKernel::Tc4,
                    PairLaunch::Simt
                ),
                PairRoute::TensorCores { exact: true },
                "{rows} rows"
            );
        }
        // Too many rows, an empty product, or the pair switched off: two launches.
        let route = |rows, n, launch| pair_route(rows, 4544, n, true, GemvKernel::Tc4, launch);
        assert_eq!(
            route(GEMV_MAX_ROWS + 1, FALCON_7B, PairLaunch::Simt),
            PairRoute::Separate
        );
        assert_eq!(route(1, (4672, 0), PairLaunch::Simt), PairRoute::Separate);
        assert_eq!(route(3, FALCON_7B, PairLaunch::Off), PairRoute::Separate);
    }

    #[test]
    fn several_rows_outside_row_invariant_mode_follow_their_kernel() {
        let route = |kernel| pair_route(5, 4544, FALCON_7B, false, kernel, PairLaunch::Simt);
        assert_eq!(
            route(GemvKernel::Tc4),
            PairRoute::TensorCores { exact: false }
        );
        // The one-row CUDA-core pair kernel takes one row only.
        assert_eq!(route(GemvKernel::Simt), PairRoute::Separate);
    }
}
