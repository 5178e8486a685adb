//! Matrix products: `x @ w^T` for few activation rows by the GEMV kernels of
//! `gemv.cu` (CUDA cores or tensor cores, with fused epilogues), for many by cuBLAS.

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use half::bf16;

use super::{check_len, p, to_i32};
use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, GemvKernel, GemvSplit, Gpu, ROW_INVARIANT_MAX_ROWS};

/// Up to this many activation rows, `linear` streams the weights with the GEMV kernels
/// (a verify pass costs about one decode step); beyond it, cuBLAS on tensor cores.
pub const GEMV_MAX_ROWS: usize = 8;
/// Below this many multiply-adds a multi-row `linear` also takes the GEMV kernels (in
/// groups of [`GEMV_MAX_ROWS`] rows): cuBLAS would need bf16 activations, whose
/// rounding costs more accuracy than such small problems gain in speed.
const SMALL_GEMM_MACS: usize = 1 << 26;
pub(super) const GEMV_WARPS: u32 = 4;

/// Output features per CUDA-core GEMV block for `rows` activation rows (`GEMV_KERNEL`
/// in gemv.cu), with `split` warps sharing each output (`gemv_rows`' SPLIT).
pub(super) fn gemv_features_per_block(rows: usize, split: GemvSplit) -> u32 {
    let per_warp = if rows <= 2 { 2 } else { 4 };
    GEMV_WARPS / split as u32 * per_warp
}
/// Tensor-core GEMV (`gemv_tc`): warps per block and output features per block.
pub(super) const TCG_WARPS: u32 = 4;
const TCG_FEATURES: usize = 16;
/// 32-wide K chunks a warp takes per iteration (`TCG_U` in gemv.cu).
const TCG_U: usize = 4;

/// K splits and 32-wide chunks per split for the tensor-core GEMV: enough blocks for
/// about `per_sm` per SM, but at least one round of every warp per split.
/// `u` is the kernel's chunks per warp iteration (`TCG_U`).
pub(super) fn tc_split(
    tiles: usize,
    chunks: usize,
    sms: usize,
    u: usize,
    per_sm: usize,
) -> (usize, usize) {
    let per_round = TCG_WARPS as usize * u;
    let max_split = (chunks / per_round).max(1);
    let want = (per_sm * sms).div_ceil(tiles.max(1)).clamp(1, max_split);
    let per_split = chunks.div_ceil(want).next_multiple_of(u).max(1);
    (chunks.div_ceil(per_split).max(1), per_split)
}
/// A GEMV's bias argument and flag: the bias, or any valid pointer (`x`) and 0.
pub(super) fn bias_args(bias: Option<&DeviceBuffer<f32>>, x: &DeviceBuffer<f32>) -> (Arg, i32) {
    match bias {
        Some(b) => (p(b), 1),
        None => (p(x), 0),
    }
}

/// Rows `row0..row0 + rows` of a `[*, k] @ [n, k]^T` product; `gemv`: never cuBLAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) row0: usize,
    pub(super) rows: usize,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) gemv: bool,
}

/// How a product of `rows` rows is launched: the whole at once, or, in row-invariant
/// mode with the rows of several sequence chunks (`groups`, summing to `rows`), each chunk
/// computed as it would be alone, so that batching never changes a sequence's bits: runs
/// of short chunks (decode, verify) take the row-invariant GEMV whatever their total
/// (`gemv`), a longer chunk (prefill) the path it would take alone.
pub(super) fn spans(rows: usize, k: usize, n: usize, groups: &[usize], exact: bool) -> Vec<Span> {
    let span = |row0, rows, gemv| Span {
        row0,
        rows,
        k,
        n,
        gemv,
    };
    if !exact
        || rows <= ROW_INVARIANT_MAX_ROWS
        || groups.len() < 2
        || groups.iter().sum::<usize>() != rows
    {
        return vec![span(0, rows, false)];
    }
    let mut out = Vec::new();
    let (mut at, mut run) = (0, 0);
    for &g in groups {
        if g <= ROW_INVARIANT_MAX_ROWS {
            run += g;
        } else {
            if run > 0 {
                out.push(span(at - run, run, true));
                run = 0;
            }
            out.push(span(at, g, false));
        }
        at += g;
    }
    if run > 0 {
        out.push(span(at - run, run, true));
    }
    out
}

/// The kernel a GEMV launch of at most [`GEMV_MAX_ROWS`] rows takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkKernel {
    /// `gemv_tc` (K a multiple of 32), split over K with scratch and arrival counters.
    TensorCores,
    /// `gemv_bf16_r*` (K a multiple of 8).
    Simt,
    /// `gemv_scalar`, any K.
    Scalar,
}

/// What a GEMV stores (`EPI_*` in gemv.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Epilogue {
    Store = 0,
    Gelu = 1,
    Accumulate = 2,
}

impl Gpu {
    /// `x @ w^T (+ bias)` for `x [rows, k]` f32 and `w [n, k]` bf16: GEMV kernels with f32
    /// activations for few rows or small problems, cuBLAS (activations rounded to bf16,
    /// f32 accumulation) for large ones. `groups`, when not empty, gives the rows of each
    /// sequence chunk in order: in row-invariant mode each chunk is then computed as it
    /// would be alone (see [`Gpu::set_row_invariant`]).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        groups: &[usize],
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let mut out = self.scratch::<f32>(rows * n)?;
        self.linear_into(x, rows, k, w, n, bias, Epilogue::Store, &mut out, groups)?;
        Ok(out)
    }

    /// `gelu(x @ w^T + bias)` (exact erf GELU), the GELU fused into the GEMV's stores:
    /// bit-identical to [`Gpu::linear`] followed by [`Gpu::gelu`].
    #[allow(clippy::too_many_arguments)]
    pub fn linear_gelu(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        groups: &[usize],
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let mut out = self.scratch::<f32>(rows * n)?;
        self.linear_into(x, rows, k, w, n, bias, Epilogue::Gelu, &mut out, groups)?;
        Ok(out)
    }

    /// `acc += x @ w^T + bias` (a residual stream), fused into the GEMV's stores:
    /// bit-identical to [`Gpu::linear`] followed by [`Gpu::add`].
    #[allow(clippy::too_many_arguments)]
    pub fn linear_accumulate(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        acc: &mut DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<(), KernelError> {
        check_len("linear", "accumulator", acc, rows * n)?;
        self.linear_into(x, rows, k, w, n, bias, Epilogue::Accumulate, acc, groups)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_into(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        epi: Epilogue,
        out: &mut DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        check_len(OP, "weight", w, n * k)?;
        for s in self.product_spans(OP, x, rows, k, n, bias, out, groups)? {
            self.linear_span(x, w, bias, epi, out, s)?;
        }
        Ok(())
    }

    /// The [`spans`] of a `[rows, k] @ [n, k]^T` product into `out`, once the input,
    /// output and bias lengths are checked: none when there is nothing to compute.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn product_spans(
        &self,
        op: &'static str,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        out: &DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<Vec<Span>, KernelError> {
        check_len(op, "input", x, rows * k)?;
        check_len(op, "output", out, rows * n)?;
        if let Some(b) = bias {
            check_len(op, "bias", b, n)?;
        }
        if rows == 0 || n == 0 {
            return Ok(Vec::new());
        }
        Ok(spans(rows, k, n, groups, self.row_invariant()))
    }

    /// `linear_into` over rows `s.row0..s.row0 + s.rows` of `x` and `out`: the GEMV
    /// kernels for few rows (always with `s.gemv`), otherwise cuBLAS on copies of those
    /// rows in fresh buffers (aligned as the whole-tensor call's, so that cuBLAS picks
    /// the same algorithm and a chunk gets the same bits as alone).
    pub(super) fn linear_span(
        &self,
        x: &DeviceBuffer<f32>,
        w: &DeviceBuffer<bf16>,
        bias: Option<&DeviceBuffer<f32>>,
        epi: Epilogue,
        out: &mut DeviceBuffer<f32>,
        s: Span,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        let Span {
            row0,
            rows,
            k,
            n,
            gemv,
        } = s;
        let (ni, ki) = (to_i32(OP, n)?, to_i32(OP, k)?);
        let (bias_arg, has_bias) = bias_args(bias, x);
        let epi_arg = Arg::I32(epi as i32);
        let exact = self.row_invariant();
        if gemv
            || rows <= GEMV_MAX_ROWS
            || rows * n * k <= SMALL_GEMM_MACS
            || (exact && rows <= ROW_INVARIANT_MAX_ROWS)
        {
            // Groups of up to GEMV_MAX_ROWS rows; each group streams the weights once.
            for r0 in (0..rows).step_by(GEMV_MAX_ROWS) {
                let r = GEMV_MAX_ROWS.min(rows - r0);
                let (xa, ya) = (
                    Arg::U64(x.ptr_at((row0 + r0) * k)),
                    Arg::U64(out.ptr_at((row0 + r0) * n)),
                );
                let kernel = self.chunk_kernel(r, k, exact);
                if kernel == ChunkKernel::TensorCores {
                    self.gemv_tc_launch(xa, w, bias_arg, has_bias, ya, r, n, k, epi, exact)?;
                } else if kernel == ChunkKernel::Simt {
                    let (kernel, split) = if r == 1 {
                        let split = self.gemv_split_for(n, k);
                        (&self.k.gemv_r1[split.index()], split)
                    } else {
                        (&self.k.gemv[r - 1], GemvSplit::One)
                    };
                    self.launch(
                        kernel,
                        ((n as u32).div_ceil(gemv_features_per_block(r, split)), 1, 1),
                        32 * GEMV_WARPS,
                        0,
                        &[
                            xa,
                            p(w),
                            bias_arg,
                            ya,
                            Arg::I32(ni),
                            Arg::I32(ki),
                            Arg::I32(has_bias),
                            epi_arg,
                        ],
                    )?;
                } else {
                    self.launch(
                        &self.k.gemv_scalar,
                        ((n as u32).div_ceil(GEMV_WARPS), 1, 1),
                        32 * GEMV_WARPS,
                        0,
                        &[
                            xa,
                            p(w),
                            bias_arg,
                            ya,
                            Arg::I32(r as i32),
                            Arg::I32(ni),
                            Arg::I32(ki),
                            Arg::I32(has_bias),
                            epi_arg,
                        ],
                    )?;
                }
            }
            return Ok(());
        }
        // cuBLAS: the epilogue as the separate kernels it replaces (same operations).
        let whole = row0 == 0 && rows * n == out.len();
        let mut tmp = if whole && epi != Epilogue::Accumulate {
            None
        } else {
            Some(self.scratch::<f32>(rows * n)?)
        };
        let dst = match tmp.as_mut() {
            Some(t) => t,
            None => &mut *out,
        };
        let xb = self.to_bf16_rows(x, row0 * k, rows * k)?;
        self.gemm_bf16(&xb, rows, k, w, n, dst)?;
        let total = rows * n;
        if let Some(b) = bias {
            self.launch(
                &self.k.add_bias_rows,
                (self.stride_blocks(total), 1, 1),
                256,
                0,
                &[p(dst), p(b), Arg::U64(total as u64), Arg::I32(ni)],
            )?;
        }
        if epi == Epilogue::Gelu {
            self.gelu(dst)?;
        }
        let Some(t) = tmp else {
            return Ok(());
        };
        let at = Arg::U64(out.ptr_at(row0 * n));
        if epi == Epilogue::Accumulate {
            self.launch(
                &self.k.add_f32,
                (self.stride_blocks(total), 1, 1),
                256,
                0,
                &[at, p(&t), Arg::U64(total as u64)],
            )
        } else {
            self.copy_f32(&t, out.ptr_at(row0 * n))
        }
    }

    /// The kernel of a GEMV launch of `r` rows over `k`. Row-invariant (`exact`): the
    /// tensor-core kernel for every row count (the CUDA-core ones are row-invariant too,
    /// for K that is not a multiple of 32).
    pub(super) fn chunk_kernel(&self, r: usize, k: usize, exact: bool) -> ChunkKernel {
        let kernel = if exact {
            GemvKernel::Tc4
        } else {
            self.gemv_kernel(r)
        };
        if k.is_multiple_of(32) && kernel != GemvKernel::Simt {
            ChunkKernel::TensorCores
        } else if k.is_multiple_of(8) {
            ChunkKernel::Simt
        } else {
            ChunkKernel::Scalar
        }
    }

    /// The tensor-core GEMV (`gemv_tc` in gemv.cu) of `r` rows on `w [n, k]`, k a
    /// multiple of 32, split over K until the GPU has several waves of blocks.
    #[allow(clippy::too_many_arguments)]
    fn gemv_tc_launch(
        &self,
        x: Arg,
        w: &DeviceBuffer<bf16>,
        bias: Arg,
        has_bias: i32,
        y: Arg,
        r: usize,
        n: usize,
        k: usize,
        epi: Epilogue,
        exact: bool,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        let (tiles, nsplit, per_split) = self.tc_tiles(n, k);
        let part = if nsplit > 1 {
            Some(self.scratch::<f32>(nsplit * r * n)?)
        } else {
            None
        };
        let counters = if nsplit > 1 {
            self.gemv_counters(tiles)?
        } else {
            0
        };
        self.launch(
            if exact {
                &self.k.gemv_tc_exact[r - 1]
            } else {
                &self.k.gemv_tc[r - 1]
            },
            (tiles as u32, nsplit as u32, 1),
            32 * TCG_WARPS,
            0,
            &[
                x,
                p(w),
                bias,
                y,
                part.as_ref().map_or(y, p),
                Arg::U64(counters),
                Arg::I32(to_i32(OP, n)?),
                Arg::I32(to_i32(OP, k)?),
                Arg::I32(has_bias),
                Arg::I32(to_i32(OP, per_split)?),
                Arg::I32(epi as i32),
            ],
        )
    }

    /// The tensor-core GEMV's 16-feature tiles of an `[n, k]` weight, its K splits and
    /// 32-wide chunks per split (a function of the shape and device only, so that a
    /// product gets the same bits in any launch).
    pub(super) fn tc_tiles(&self, n: usize, k: usize) -> (usize, usize, usize) {
        let tiles = n.div_ceil(TCG_FEATURES);
        let (nsplit, per_split) = tc_split(
            tiles,
            k / 32,
            self.sm_count() as usize,
            TCG_U,
            self.tc_blocks_per_sm(),
        );
        (tiles, nsplit, per_split)
    }

    /// An f32 buffer rounded to bf16.
    pub fn to_bf16(&self, x: &DeviceBuffer<f32>) -> Result<DeviceBuffer<bf16>, KernelError> {
        self.to_bf16_rows(x, 0, x.len())
    }

    /// Elements `from..from + n` of `x` rounded to bf16, in a fresh buffer.
    fn to_bf16_rows(
        &self,
        x: &DeviceBuffer<f32>,
        from: usize,
        n: usize,
    ) -> Result<DeviceBuffer<bf16>, KernelError> {
        if from + n > x.len() {
            return Err(KernelError::invalid(
                "to_bf16",
                format!("elements {from}..{} of {}", from + n, x.len()),
            ));
        }
        let out = self.scratch::<bf16>(n)?;
        self.launch(
            &self.k.f32_to_bf16,
            (self.stride_blocks(n), 1, 1),
            256,
            0,
            &[Arg::U64(x.ptr_at(from)), p(&out), Arg::U64(n as u64)],
        )?;
        Ok(out)
    }

    /// `out [m, n] = a [m, k] @ w [n, k]^T` with cuBLAS (bf16 inputs, f32 accumulation
    /// and output).
    pub fn gemm_bf16(
        &self,
        a: &DeviceBuffer<bf16>,
        m: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "gemm";
        check_len(OP, "input", a, m * k)?;
        check_len(OP, "weight", w, n * k)?;
        check_len(OP, "output", out, m * n)?;
        let (mi, ni, ki) = (to_i32(OP, m)?, to_i32(OP, n)?, to_i32(OP, k)?);
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cuBLAS queues on the GPU's stream, which a recording does not capture.
        self.not_capturing(OP)?;
        let blas = self.blas.lock().map_err(|_| KernelError::Device {
            op: OP,
            message: "cuBLAS handle lock poisoned".into(),
        })?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| KernelError::driver(OP, e))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major y[m, n] is column-major y^T[n, m] = W (col-major [k, n], transposed)
        // times x^T (col-major [k, m]).
        // SAFETY: the three buffers are live and hold exactly the m*k, n*k and m*n
        // elements the call addresses (checked above); the handle is bound to our stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const c_void,
                w.ptr as *const c_void,
                cudaDataType::CUDA_R_16BF,
                ki,
                a.ptr as *const c_void,
                cudaDataType::CUDA_R_16BF,
                ki,
                &beta as *const f32 as *const c_void,
                out.ptr as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Device {
            op: OP,
            message: format!("{e:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triples(v: Vec<Span>) -> Vec<(usize, usize, bool)> {
        v.into_iter().map(|s| (s.row0, s.rows, s.gemv)).collect()
    }

    /// Runs of short chunks go to the GEMV together, each long chunk alone; anything
    /// else (not row-invariant, few rows, no chunk list, or one that does not add up)
    /// is one span.
    #[test]
    fn a_steps_chunks_split_into_spans_as_alone() {
        let (k, n) = (64, 32);
        assert_eq!(
            triples(spans(54, k, n, &[3, 40, 2, 5, 4], true)),
            [(0, 3, true), (3, 40, false), (43, 11, true)]
        );
        assert_eq!(
            triples(spans(60, k, n, &[20, 40], true)),
            [(0, 20, false), (20, 40, false)]
        );
        assert_eq!(
            triples(spans(54, k, n, &[3, 40, 2, 5, 4], false)),
            [(0, 54, false)]
        );
        assert_eq!(triples(spans(16, k, n, &[8, 8], true)), [(0, 16, false)]);
        assert_eq!(triples(spans(30, k, n, &[30], true)), [(0, 30, false)]);
        assert_eq!(triples(spans(30, k, n, &[10, 10], true)), [(0, 30, false)]);
        assert!(spans(54, k, n, &[3, 51], true)
            .iter()
            .all(|s| (s.k, s.n) == (k, n)));
    }
}
