//! Typed launchers: each checks its operands' sizes (and the step's recorded index
//! bounds) against what the kernel will touch, allocates the output and queues the
//! kernel. Activations are f32, matrices bf16, the KV cache bf16.

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use half::bf16;

use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, Elem, GemvKernel, Gpu};
use crate::step::DeviceStep;

/// Up to this many activation rows, `linear` streams the weights with the GEMV kernels
/// (a verify pass costs about one decode step); beyond it, cuBLAS on tensor cores.
pub const GEMV_MAX_ROWS: usize = 8;
/// Below this many multiply-adds a multi-row `linear` also takes the GEMV kernels (in
/// groups of [`GEMV_MAX_ROWS`] rows): cuBLAS would need bf16 activations, whose
/// rounding costs more accuracy than such small problems gain in speed.
const SMALL_GEMM_MACS: usize = 1 << 26;
const GEMV_WARPS: u32 = 4;

/// Output features per GEMV block for `rows` activation rows (`GEMV_KERNEL` in gemv.cu).
fn gemv_features_per_block(rows: usize) -> u32 {
    GEMV_WARPS * if rows <= 2 { 2 } else { 4 }
}
/// Tensor-core GEMV (`gemv_tc`): warps per block and output features per block.
const TCG_WARPS: u32 = 4;
const TCG_FEATURES: usize = 16;
/// 32-wide K chunks a warp takes per iteration (`TCG_U` in gemv.cu).
const TCG_U: usize = 4;

/// K splits and 32-wide chunks per split for the tensor-core GEMV: enough blocks for
/// about `per_sm` per SM, but at least one round of every warp per split.
/// `u` is the kernel's chunks per warp iteration (`TCG_U`).
fn tc_split(tiles: usize, chunks: usize, sms: usize, u: usize, per_sm: usize) -> (usize, usize) {
    let per_round = TCG_WARPS as usize * u;
    let max_split = (chunks / per_round).max(1);
    let want = (per_sm * sms).div_ceil(tiles.max(1)).clamp(1, max_split);
    let per_split = chunks.div_ceil(want).next_multiple_of(u).max(1);
    (chunks.div_ceil(per_split).max(1), per_split)
}
/// What a GEMV stores (`EPI_*` in gemv.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Epilogue {
    Store = 0,
    Gelu = 1,
    Accumulate = 2,
}

const DEC_TK: usize = 32;
/// Splits whose weights `attn_combine` keeps in shared memory (more still combine, with
/// weight 0: never produced, the launchers stay below).
const COMBINE_MAX_SPLITS: usize = 1024;
/// Tensor-core decode attention (`attn_decode_tc*`): warps per block, query heads per block.
const DEC_TC_WARPS: u32 = 8;
const DEC_TC_HEADS: usize = 16 * DEC_TC_WARPS as usize;
const DEC_WARPS: usize = 8;
const DEC_THREADS: u32 = 32 * DEC_WARPS as u32;
/// Shared memory a block may use without opting in.
const SMEM_FLOATS: usize = 48 * 1024 / 4;

/// The paged KV memory of one model (or shard): `[layer][slot][kv_head][head_dim]`
/// bf16 for keys and for values.
#[derive(Debug)]
pub struct KvBuffers {
    pub(crate) k: DeviceBuffer<bf16>,
    pub(crate) v: DeviceBuffer<bf16>,
    layers: usize,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvBuffers {
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Device bytes of keys and values together.
    pub fn byte_size(&self) -> usize {
        self.k.num_bytes() + self.v.num_bytes()
    }

    /// Bytes one token occupies: K and V, every layer, bf16.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * std::mem::size_of::<bf16>()
    }

    fn layer_elems(&self) -> usize {
        self.num_slots() * self.kv_heads * self.head_dim
    }
}

/// Attention geometry for [`Gpu::attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Per-head ALiBi slopes (`num_heads` values) for ALiBi models.
    pub alibi_slopes: Option<&'a DeviceBuffer<f32>>,
}

fn check_len<T: Elem>(
    op: &'static str,
    what: &str,
    buf: &DeviceBuffer<T>,
    want: usize,
) -> Result<(), KernelError> {
    if buf.len() != want {
        return Err(KernelError::invalid(
            op,
            format!("{what} has {} elements, expected {want}", buf.len()),
        ));
    }
    Ok(())
}

fn to_i32(op: &'static str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::invalid(op, format!("size {v} exceeds i32")))
}

fn p<T: Elem>(b: &DeviceBuffer<T>) -> Arg {
    Arg::U64(b.ptr)
}

impl Gpu {
    /// Blocks for a grid-stride loop over `n` elements.
    fn stride_blocks(&self, n: usize) -> u32 {
        (n.div_ceil(256) as u64).clamp(1, u64::from(self.sm_count()) * 8) as u32
    }

    /// `out[r] = table[token_ids[r]]` (bf16 table `[vocab, cols]`, f32 out).
    pub fn embed(
        &self,
        table: &DeviceBuffer<bf16>,
        vocab: usize,
        cols: usize,
        step: &DeviceStep,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        const OP: &str = "embed";
        check_len(OP, "table", table, vocab * cols)?;
        if step.max_token as usize >= vocab {
            return Err(KernelError::invalid(
                OP,
                format!("token id {} outside vocabulary {vocab}", step.max_token),
            ));
        }
        let out = self.scratch::<f32>(step.rows * cols)?;
        self.launch(
            &self.k.embed_bf16,
            (step.rows as u32, 1, 1),
            256,
            0,
            &[
                p(table),
                Arg::U64(step.at(step.off.tokens)),
                p(&out),
                Arg::I32(to_i32(OP, cols)?),
            ],
        )?;
        Ok(out)
    }

    /// Layer norm of each row of `x` (`[rows, cols]`) with f32 scale and shift.
    pub fn layer_norm(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        cols: usize,
        weight: &DeviceBuffer<f32>,
        bias: &DeviceBuffer<f32>,
        eps: f32,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        const OP: &str = "layer_norm";
        check_len(OP, "input", x, rows * cols)?;
        check_len(OP, "weight", weight, cols)?;
        check_len(OP, "bias", bias, cols)?;
        let out = self.scratch::<f32>(rows * cols)?;
        // One block per row. Rows of up to 8 values per thread (of at most 1024) stay in
        // registers: enough threads for 4 values each.
        let (func, threads) = if cols <= 8 * 1024 {
            let t = cols.div_ceil(4).next_multiple_of(32).clamp(64, 1024) as u32;
            (&self.k.layer_norm_f32_reg, t)
        } else {
            (&self.k.layer_norm_f32, 1024)
        };
        self.launch(
            func,
            (rows as u32, 1, 1),
            threads,
            0,
            &[
                p(x),
                p(weight),
                p(bias),
                p(&out),
                Arg::I32(to_i32(OP, cols)?),
                Arg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    /// Exact GELU in place.
    pub fn gelu(&self, x: &mut DeviceBuffer<f32>) -> Result<(), KernelError> {
        let n = x.len();
        self.launch(
            &self.k.gelu_f32,
            (self.stride_blocks(n), 1, 1),
            256,
            0,
            &[p(x), Arg::U64(n as u64)],
        )
    }

    /// `x += y`.
    pub fn add(&self, x: &mut DeviceBuffer<f32>, y: &DeviceBuffer<f32>) -> Result<(), KernelError> {
        check_len("add", "addend", y, x.len())?;
        let n = x.len();
        self.launch(
            &self.k.add_f32,
            (self.stride_blocks(n), 1, 1),
            256,
            0,
            &[p(x), p(y), Arg::U64(n as u64)],
        )
    }

    /// Index of the largest value in each row of `x [rows, cols]` (the first on ties,
    /// NaN skipped): greedy tokens without copying logits. `None` for a row of nothing
    /// but NaN and -inf.
    pub fn argmax_rows(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Option<u32>>, KernelError> {
        const OP: &str = "argmax_rows";
        check_len(OP, "input", x, rows * cols)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let out = self.scratch::<u32>(rows)?;
        self.launch(
            &self.k.argmax_rows_f32,
            (rows as u32, 1, 1),
            1024,
            0,
            &[p(x), p(&out), Arg::I32(to_i32(OP, cols)?)],
        )?;
        Ok(self
            .download(&out)?
            .into_iter()
            .map(|i| (i != u32::MAX).then_some(i))
            .collect())
    }

    /// The step's logit rows of `x` (`[step rows, cols]`).
    pub fn gather_logit_rows(
        &self,
        x: &DeviceBuffer<f32>,
        cols: usize,
        step: &DeviceStep,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        const OP: &str = "gather_logit_rows";
        check_len(OP, "input", x, step.rows * cols)?;
        let out = self.scratch::<f32>(step.n_logit_rows * cols)?;
        self.launch(
            &self.k.gather_rows_f32,
            (step.n_logit_rows as u32, 1, 1),
            256,
            0,
            &[
                p(x),
                Arg::U64(step.at(step.off.logit_rows)),
                p(&out),
                Arg::I32(to_i32(OP, cols)?),
            ],
        )?;
        Ok(out)
    }

    /// `x @ w^T (+ bias)` for `x [rows, k]` f32 and `w [n, k]` bf16: GEMV kernels with f32
    /// activations for few rows or small problems, cuBLAS (activations rounded to bf16,
    /// f32 accumulation) for large ones.
    pub fn linear(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let mut out = self.scratch::<f32>(rows * n)?;
        self.linear_into(x, rows, k, w, n, bias, Epilogue::Store, &mut out)?;
        Ok(out)
    }

    /// `gelu(x @ w^T + bias)` (exact erf GELU), the GELU fused into the GEMV's stores:
    /// bit-identical to [`Gpu::linear`] followed by [`Gpu::gelu`].
    pub fn linear_gelu(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let mut out = self.scratch::<f32>(rows * n)?;
        self.linear_into(x, rows, k, w, n, bias, Epilogue::Gelu, &mut out)?;
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
    ) -> Result<(), KernelError> {
        check_len("linear", "accumulator", acc, rows * n)?;
        self.linear_into(x, rows, k, w, n, bias, Epilogue::Accumulate, acc)
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_into(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        epi: Epilogue,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        check_len(OP, "input", x, rows * k)?;
        check_len(OP, "weight", w, n * k)?;
        check_len(OP, "output", out, rows * n)?;
        if let Some(b) = bias {
            check_len(OP, "bias", b, n)?;
        }
        let (ni, ki) = (to_i32(OP, n)?, to_i32(OP, k)?);
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (bias_arg, has_bias) = match bias {
            Some(b) => (p(b), 1),
            None => (p(x), 0),
        };
        let epi_arg = Arg::I32(epi as i32);
        if rows <= GEMV_MAX_ROWS || rows * n * k <= SMALL_GEMM_MACS {
            // Groups of up to GEMV_MAX_ROWS rows; each group streams the weights once.
            for r0 in (0..rows).step_by(GEMV_MAX_ROWS) {
                let r = GEMV_MAX_ROWS.min(rows - r0);
                let (xa, ya) = (Arg::U64(x.ptr_at(r0 * k)), Arg::U64(out.ptr_at(r0 * n)));
                let kernel = self.gemv_kernel(r);
                if k.is_multiple_of(32) && kernel != GemvKernel::Simt {
                    self.gemv_tc_launch(xa, w, bias_arg, has_bias, ya, r, n, k, epi)?;
                } else if k.is_multiple_of(8) {
                    self.launch(
                        &self.k.gemv[r - 1],
                        ((n as u32).div_ceil(gemv_features_per_block(r)), 1, 1),
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
        let mut tmp = match epi {
            Epilogue::Accumulate => Some(self.scratch::<f32>(rows * n)?),
            _ => None,
        };
        let dst = match tmp.as_mut() {
            Some(t) => t,
            None => &mut *out,
        };
        let xb = self.to_bf16(x)?;
        self.gemm_bf16(&xb, rows, k, w, n, dst)?;
        if let Some(b) = bias {
            let total = rows * n;
            self.launch(
                &self.k.add_bias_rows,
                (self.stride_blocks(total), 1, 1),
                256,
                0,
                &[p(dst), p(b), Arg::U64(total as u64), Arg::I32(ni)],
            )?;
        }
        match (epi, tmp) {
            (Epilogue::Gelu, _) => self.gelu(out),
            (Epilogue::Accumulate, Some(t)) => self.add(out, &t),
            _ => Ok(()),
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
    ) -> Result<(), KernelError> {
        const OP: &str = "linear";
        let tiles = n.div_ceil(TCG_FEATURES);
        let (nsplit, per_split) = tc_split(
            tiles,
            k / 32,
            self.sm_count() as usize,
            TCG_U,
            self.tc_blocks_per_sm(),
        );
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
            &self.k.gemv_tc[r - 1],
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

    /// An f32 buffer rounded to bf16.
    pub fn to_bf16(&self, x: &DeviceBuffer<f32>) -> Result<DeviceBuffer<bf16>, KernelError> {
        let n = x.len();
        let out = self.scratch::<bf16>(n)?;
        self.launch(
            &self.k.f32_to_bf16,
            (self.stride_blocks(n), 1, 1),
            256,
            0,
            &[p(x), p(&out), Arg::U64(n as u64)],
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

    /// Zeroed KV memory for `layers` layers of `num_blocks` blocks.
    pub fn alloc_kv(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<KvBuffers, KernelError> {
        if block_size == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::invalid(
                "alloc_kv",
                "zero block size, kv heads or head dim",
            ));
        }
        let n = layers * num_blocks * block_size * kv_heads * head_dim;
        Ok(KvBuffers {
            k: self.zeros::<bf16>(n)?,
            v: self.zeros::<bf16>(n)?,
            layers,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
        })
    }

    /// Fills keys and values with seeded uniform values in `(-scale, scale)` (benchmarks
    /// of long contexts without running the prefill).
    pub fn fill_kv_uniform(
        &self,
        kv: &mut KvBuffers,
        seed: u64,
        scale: f32,
    ) -> Result<(), KernelError> {
        self.fill_uniform_bf16(&mut kv.k, seed, scale)?;
        self.fill_uniform_bf16(&mut kv.v, seed ^ 0x5bd1_e995, scale)
    }

    /// `buf[i] = uniform(-scale, scale)`, reproducible for a seed.
    pub fn fill_uniform_bf16(
        &self,
        buf: &mut DeviceBuffer<bf16>,
        seed: u64,
        scale: f32,
    ) -> Result<(), KernelError> {
        let n = buf.len();
        self.launch(
            &self.k.fill_uniform_bf16,
            (self.stride_blocks(n), 1, 1),
            256,
            0,
            &[p(buf), Arg::U64(n as u64), Arg::U64(seed), Arg::F32(scale)],
        )
    }

    /// `buf[i] = offset + uniform(-scale, scale)`.
    pub fn fill_uniform_f32(
        &self,
        buf: &mut DeviceBuffer<f32>,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<(), KernelError> {
        let n = buf.len();
        self.launch(
            &self.k.fill_uniform_f32,
            (self.stride_blocks(n), 1, 1),
            256,
            0,
            &[
                p(buf),
                Arg::U64(n as u64),
                Arg::U64(seed),
                Arg::F32(scale),
                Arg::F32(offset),
            ],
        )
    }

    /// Copies whole blocks `src -> dst` in every layer.
    pub fn copy_kv_blocks(
        &self,
        kv: &mut KvBuffers,
        copies: &[(u32, u32)],
    ) -> Result<(), KernelError> {
        if copies.is_empty() || kv.layers == 0 {
            return Ok(());
        }
        let mut pairs = Vec::with_capacity(2 * copies.len());
        for &(s, d) in copies {
            if s as usize >= kv.num_blocks || d as usize >= kv.num_blocks {
                return Err(KernelError::invalid(
                    "copy_kv_blocks",
                    format!("block {} outside {}", s.max(d), kv.num_blocks),
                ));
            }
            pairs.extend([s, d]);
        }
        let pairs = self.upload(&pairs)?;
        let block_elems = kv.block_size * kv.kv_heads * kv.head_dim;
        self.launch(
            &self.k.copy_kv_blocks,
            (copies.len() as u32, kv.layers as u32, 1),
            256,
            0,
            &[
                p(&kv.k),
                p(&kv.v),
                p(&pairs),
                Arg::U64(kv.layer_elems() as u64),
                Arg::U64(block_elems as u64),
            ],
        )
    }

    /// Rotary + KV write + causal attention for one layer (see `attention.cu`).
    /// `qkv` is `[rows, kv_heads * (q_per_kv + 2) * head_dim]`; returns
    /// `[rows, heads * head_dim]`.
    pub fn attention(
        &self,
        qkv: &DeviceBuffer<f32>,
        kv: &mut KvBuffers,
        layer: usize,
        step: &DeviceStep,
        a: &AttentionParams<'_>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        const OP: &str = "attention";
        let (nh, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        if kvh == 0 || nh % kvh != 0 || hd == 0 {
            return Err(KernelError::invalid(
                OP,
                format!("{nh} heads over {kvh} kv heads of {hd}"),
            ));
        }
        let qpg = nh / kvh;
        let rows = step.rows;
        check_len(OP, "qkv", qkv, rows * kvh * (qpg + 2) * hd)?;
        if layer >= kv.layers || kv.kv_heads != kvh || kv.head_dim != hd {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "layer {layer} / {kvh} kv heads of {hd} do not fit a cache of {} layers, {} kv heads of {}",
                    kv.layers, kv.kv_heads, kv.head_dim
                ),
            ));
        }
        if step.block_size != kv.block_size
            || step.max_slot as usize >= kv.num_slots()
            || step.max_block as usize >= kv.num_blocks
        {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "step (block size {}, slot {}, block {}) does not fit the cache ({} blocks of {})",
                    step.block_size, step.max_slot, step.max_block, kv.num_blocks, kv.block_size
                ),
            ));
        }
        let rotary = step.half_dim > 0;
        if rotary && 2 * step.half_dim != hd {
            return Err(KernelError::invalid(
                OP,
                format!("rotary tables of {} pairs for head dim {hd}", step.half_dim),
            ));
        }
        let (slopes, has_alibi) = match a.alibi_slopes {
            Some(s) => {
                check_len(OP, "alibi slopes", s, nh)?;
                (p(s), 1)
            }
            None => (p(qkv), 0),
        };
        let (nhi, kvhi, hdi) = (to_i32(OP, nh)?, to_i32(OP, kvh)?, to_i32(OP, hd)?);
        let layer_off = (layer * kv.layer_elems()) as u64;
        let q = self.scratch::<f32>(rows * nh * hd)?;
        let out = self.scratch::<f32>(rows * nh * hd)?;
        self.launch(
            &self.k.rope_qkv,
            (
                rows as u32,
                kvh as u32,
                ((qpg + 2) * hd).div_ceil(256) as u32,
            ),
            256,
            0,
            &[
                p(qkv),
                p(&q),
                p(&kv.k),
                p(&kv.v),
                Arg::U64(step.at(step.off.slots)),
                Arg::U64(step.at(step.off.cos)),
                Arg::U64(step.at(step.off.sin)),
                Arg::I32(i32::from(rotary)),
                Arg::I32(nhi),
                Arg::I32(kvhi),
                Arg::I32(hdi),
                Arg::U64(layer_off),
            ],
        )?;
        let scale = 1.0 / (hd as f32).sqrt();
        let tc = match hd {
            64 => Some(&self.k.attn_prefill_tc64),
            128 => Some(&self.k.attn_prefill_tc128),
            _ => None,
        };
        let (list, n_list, max_ctx) = match tc {
            Some(func) if step.n_tiles > 0 => {
                self.launch(
                    func,
                    (step.n_tiles as u32, nh as u32, 1),
                    128,
                    0,
                    &[
                        p(&q),
                        p(&kv.k),
                        p(&kv.v),
                        Arg::U64(layer_off),
                        Arg::U64(step.at(step.off.tiles)),
                        Arg::U64(step.at(step.off.seq_info)),
                        Arg::U64(step.at(step.off.block_tables)),
                        Arg::I32(step.block_size as i32),
                        slopes,
                        Arg::I32(has_alibi),
                        p(&out),
                        Arg::I32(nhi),
                        Arg::I32(kvhi),
                        Arg::F32(scale),
                    ],
                )?;
                (step.off.small_rows, step.n_small_rows, step.max_ctx_small)
            }
            _ => (step.off.all_rows, rows, step.max_ctx),
        };
        if n_list == 0 {
            return Ok(out);
        }

        // Many query heads per kv head over a long context: tensor cores, the heads of a
        // token as the rows of the mma tiles, split over the context.
        let dec_tc = match hd {
            64 => Some(&self.k.attn_decode_tc64),
            128 => Some(&self.k.attn_decode_tc128),
            _ => None,
        };
        if let Some(func) = dec_tc.filter(|_| qpg >= 16 && max_ctx >= self.attn_tc_min_ctx()) {
            let tiles = qpg.div_ceil(DEC_TC_HEADS);
            let blocks = n_list * kvh * tiles;
            // About two blocks per SM, each split at least 256 keys (the partial results
            // of a split, every head's vector, cost as much as 71 keys of K and V).
            let (per_sm, min_keys) = self.attn_split();
            let target = per_sm * self.sm_count() as usize;
            let mut nsplit = if blocks >= target {
                1
            } else {
                target
                    .div_ceil(blocks)
                    .min(max_ctx.div_ceil(min_keys))
                    .max(1)
            };
            let keys_per_split = max_ctx
                .div_ceil(nsplit.min(COMBINE_MAX_SPLITS))
                .div_ceil(64)
                * 64;
            nsplit = max_ctx.div_ceil(keys_per_split).max(1);
            let (part_o, part_ml) = if nsplit > 1 {
                (
                    Some(self.scratch::<f32>(rows * nh * nsplit * hd)?),
                    Some(self.scratch::<f32>(rows * nh * nsplit * 2)?),
                )
            } else {
                (None, None)
            };
            let po = part_o.as_ref().map_or(p(&out), p);
            let pm = part_ml.as_ref().map_or(p(&out), p);
            self.launch(
                func,
                (n_list as u32, (kvh * tiles) as u32, nsplit as u32),
                32 * DEC_TC_WARPS,
                0,
                &[
                    p(&q),
                    p(&kv.k),
                    p(&kv.v),
                    Arg::U64(layer_off),
                    Arg::U64(step.at(list)),
                    Arg::U64(step.at(step.off.row_info)),
                    Arg::U64(step.at(step.off.seq_info)),
                    Arg::U64(step.at(step.off.block_tables)),
                    Arg::I32(step.block_size as i32),
                    slopes,
                    Arg::I32(has_alibi),
                    p(&out),
                    po,
                    pm,
                    Arg::I32(nhi),
                    Arg::I32(kvhi),
                    Arg::I32(to_i32(OP, keys_per_split)?),
                    Arg::F32(scale),
                ],
            )?;
            if nsplit > 1 {
                self.launch(
                    &self.k.attn_combine,
                    (n_list as u32, nh as u32, 1),
                    128,
                    0,
                    &[
                        Arg::U64(step.at(list)),
                        po,
                        pm,
                        p(&out),
                        Arg::I32(nhi),
                        Arg::I32(hdi),
                        Arg::I32(nsplit as i32),
                    ],
                )?;
            }
            return Ok(out);
        }

        // The compile-time head sizes take the vectorised kernel (K rows padded by 4
        // floats instead of 1).
        let (decode, pad) = match hd {
            64 => (&self.k.attn_decode_hd64, 4),
            128 => (&self.k.attn_decode_hd128, 4),
            _ => (&self.k.attn_decode, 1),
        };
        // Heads per block: one per warp at most (more blocks for MQA's 71 heads), and
        // what fits 48 KiB of shared memory.
        let fixed = DEC_TK * (hd + pad) + DEC_TK * hd + 8 * 32;
        let per_head = 2 * hd + 2;
        let max_hb = SMEM_FLOATS.saturating_sub(fixed) / per_head;
        if max_hb == 0 {
            return Err(KernelError::invalid(
                OP,
                format!("head dim {hd} is too large"),
            ));
        }
        let chunks0 = qpg.div_ceil(max_hb.min(DEC_WARPS));
        let hb = qpg.div_ceil(chunks0);
        let chunks = qpg.div_ceil(hb);
        // Split long contexts over more blocks until the GPU is busy (flash-decoding),
        // keeping at least 64 keys per split.
        let blocks = n_list * kvh * chunks;
        let target = 4 * self.sm_count() as usize;
        let mut nsplit = if blocks >= target {
            1
        } else {
            target.div_ceil(blocks).min(max_ctx.div_ceil(64)).max(1)
        };
        let keys_per_split = max_ctx
            .div_ceil(nsplit.min(COMBINE_MAX_SPLITS))
            .div_ceil(DEC_TK)
            * DEC_TK;
        nsplit = max_ctx.div_ceil(keys_per_split).max(1);
        let smem = ((2 * hb * hd + 2 * hb + fixed) * 4) as u32;
        let (part_o, part_ml) = if nsplit > 1 {
            (
                Some(self.scratch::<f32>(rows * nh * nsplit * hd)?),
                Some(self.scratch::<f32>(rows * nh * nsplit * 2)?),
            )
        } else {
            (None, None)
        };
        let po = part_o.as_ref().map_or(p(&out), p);
        let pm = part_ml.as_ref().map_or(p(&out), p);
        self.launch(
            decode,
            (n_list as u32, (kvh * chunks) as u32, nsplit as u32),
            DEC_THREADS,
            smem,
            &[
                p(&q),
                p(&kv.k),
                p(&kv.v),
                Arg::U64(layer_off),
                Arg::U64(step.at(list)),
                Arg::U64(step.at(step.off.row_info)),
                Arg::U64(step.at(step.off.seq_info)),
                Arg::U64(step.at(step.off.block_tables)),
                Arg::I32(step.block_size as i32),
                slopes,
                Arg::I32(has_alibi),
                p(&out),
                po,
                pm,
                Arg::I32(nhi),
                Arg::I32(kvhi),
                Arg::I32(hdi),
                Arg::I32(hb as i32),
                Arg::I32(to_i32(OP, keys_per_split)?),
                Arg::F32(scale),
            ],
        )?;
        if nsplit > 1 {
            self.launch(
                &self.k.attn_combine,
                (n_list as u32, nh as u32, 1),
                128,
                0,
                &[
                    Arg::U64(step.at(list)),
                    po,
                    pm,
                    p(&out),
                    Arg::I32(nhi),
                    Arg::I32(hdi),
                    Arg::I32(nsplit as i32),
                ],
            )?;
        }
        Ok(out)
    }
}
