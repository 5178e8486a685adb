//! Typed launchers: each checks its operands' sizes (and the step's recorded index
//! bounds) against what the kernel will touch, allocates the output and queues the
//! kernel. Activations are f32, matrices bf16, the KV cache bf16.
//!
//! `linear` holds the matrix products (GEMV kernels and cuBLAS), `pair` two products
//! of one input in one launch, `sum` two products of two inputs added to one residual,
//! `attention` the KV cache and attention, `qkv_rope` a decode step's qkv projection
//! with rotary and the cache write in its epilogue, `sampling` the warp of logit rows
//! into distributions, `quant` the products with 8-bit and 4-bit weights; the small
//! element-wise launchers are here.

mod attention;
pub(crate) use attention::TcDecodeShape;
mod linear;
mod pair;
mod qkv_rope;
mod quant;
mod sampling;
mod sum;

pub(crate) use attention::{ctx_class, ctx_class_limit};
pub use attention::{AttentionParams, KvBuffers};
mod forked;
pub use forked::ForkedProduct;
pub use linear::GEMV_MAX_ROWS;
pub use pair::PairHalf;
pub use quant::{QuantLayout, QuantWeight};
pub use sampling::{PenaltySpec, ProbsSpec, WarpedRow};
pub use sum::SumTerm;

use half::bf16;

use crate::error::KernelError;
use crate::gpu::{Arg, DeviceBuffer, Elem, Gpu};
use crate::graph::Bound;
use crate::step::DeviceStep;

pub(crate) fn check_len<T: Elem>(
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

pub(crate) fn to_i32(op: &'static str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::invalid(op, format!("size {v} exceeds i32")))
}

pub(crate) fn p<T: Elem>(b: &DeviceBuffer<T>) -> Arg {
    Arg::U64(b.ptr)
}

impl Gpu {
    /// Blocks for a grid-stride loop over `n` elements.
    pub(crate) fn stride_blocks(&self, n: usize) -> u32 {
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
        self.note_limit(Bound::Tokens, vocab);
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
}
