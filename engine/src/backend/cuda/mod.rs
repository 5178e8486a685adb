//! The CUDA backend: bf16 weights and KV cache, f32 activations and accumulation, NVRTC
//! kernels and cuBLAS from `falconer-kernels` (the only crate that launches kernels).
//!
//! Tensors are either f32 (activations, and the 1-D parameters: layer-norm scales and
//! shifts and biases, which are tiny and keep full precision), bf16 (weight matrices) or
//! int8 / int4 (decoder-layer weights loaded in those formats: `quant`). `linear`
//! streams the weights once per step for up to [`kernels::GEMV_MAX_ROWS`] rows (decode
//! and verify cost about the same) and uses cuBLAS tensor cores beyond (prefill). Each op queues work on the GPU's stream; only
//! [`Backend::to_host`] waits.
//!
//! [`CudaBackend::new`] never panics on a machine without a GPU or CUDA libraries: it
//! returns [`BackendError::Unavailable`], so callers can fall back to the CPU.

mod graphs;
mod parallel;
mod quant;
mod tensor;
mod upload;
mod warp;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use graphs::{GraphStats, StepGraphs};
pub use quant::upload_quant_weight;
pub use tensor::{CudaData, CudaKvCache, CudaStep, CudaTensor};

use half::bf16;

pub use falconer_kernels as kernels;
use falconer_kernels::{AttentionParams, DeviceBuffer, Gpu, KernelError, SeqDesc, StepInput};

use super::{
    AttnConfig, Backend, KvLayout, ParallelWeights, StepMeta, StepPass, WarpRow, WarpedRows,
};
use crate::checkpoint::{Dtype, HostTensor};
use crate::error::BackendError;
use crate::quant::{QuantMatrix, WeightFormat};

/// One half of [`Gpu::linear_pair`]: a weight, its bias, GELU or not.
fn pair_half<'a>(
    w: &'a CudaTensor,
    bias: Option<&'a CudaTensor>,
    gelu: bool,
) -> Result<kernels::PairHalf<'a>, BackendError> {
    Ok(kernels::PairHalf {
        w: w.bf16("linear")?,
        n: w.rows,
        bias: bias.map(|t| t.f32("linear")).transpose()?,
        gelu,
    })
}

/// One term of [`Gpu::linear_accumulate_sum`]: an input, a weight and its bias.
fn sum_term<'a>(
    x: &'a CudaTensor,
    w: &'a CudaTensor,
    bias: Option<&'a CudaTensor>,
) -> Result<kernels::SumTerm<'a>, BackendError> {
    Ok(kernels::SumTerm {
        x: x.f32("linear")?,
        k: x.cols,
        w: w.bf16("linear")?,
        bias: bias.map(|t| t.f32("linear")).transpose()?,
    })
}

/// A layer's attention input must have one row per step row.
fn check_step_rows(x: &CudaTensor, step: &CudaStep) -> Result<(), BackendError> {
    if x.rows != step.dev.rows() {
        return Err(invalid(
            "attention",
            format!("qkv has {} rows, the step {}", x.rows, step.dev.rows()),
        ));
    }
    Ok(())
}

fn attention_params<'a>(
    attn: &AttnConfig,
    slopes: Option<&'a DeviceBuffer<f32>>,
) -> AttentionParams<'a> {
    AttentionParams {
        num_heads: attn.num_heads,
        num_kv_heads: attn.num_kv_heads,
        head_dim: attn.head_dim,
        alibi_slopes: slopes,
    }
}

/// Attention's output `[rows, heads * head_dim]`, in the step's sequence chunks.
fn attention_output(
    out: DeviceBuffer<f32>,
    rows: usize,
    attn: &AttnConfig,
    step: &CudaStep,
) -> CudaTensor {
    CudaTensor {
        data: CudaData::F32(out),
        rows,
        cols: attn.num_heads * attn.head_dim,
        groups: Some(Arc::clone(&step.chunk_rows)),
    }
}

fn map_err(e: KernelError) -> BackendError {
    match e {
        KernelError::Unavailable(reason) => BackendError::Unavailable {
            backend: "cuda",
            reason,
        },
        KernelError::OutOfMemory { requested } => BackendError::OutOfMemory { requested },
        KernelError::Device { op, message } | KernelError::Invalid { op, message } => {
            BackendError::Device { op, message }
        }
    }
}

/// The chunk row counts of `x` (empty when its rows are not a step's).
fn groups(x: &CudaTensor) -> &[usize] {
    x.groups.as_deref().unwrap_or(&[])
}

fn check_linear(x: &CudaTensor, weight: &CudaTensor) -> Result<(), BackendError> {
    if weight.cols != x.cols {
        return Err(invalid(
            "linear",
            format!("input has {} columns, weight {}", x.cols, weight.cols),
        ));
    }
    Ok(())
}

/// Rows of `cols` values asked of a tensor that has exactly that many columns.
fn check_cols(op: &'static str, x: &CudaTensor, cols: usize) -> Result<(), BackendError> {
    if cols != x.cols {
        return Err(invalid(
            op,
            format!("rows of {cols} for a tensor of {} columns", x.cols),
        ));
    }
    Ok(())
}

fn invalid(op: &'static str, message: String) -> BackendError {
    BackendError::Device { op, message }
}

/// The CUDA backend on one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    gpu: Gpu,
    /// `Some(next seed)` when uploads are synthesised on the device (benchmarks).
    synthetic: Option<AtomicU64>,
    /// ALiBi slopes uploaded once per distinct slope vector (keyed by their bits).
    slopes: Mutex<Vec<SlopeEntry>>,
    /// Whether [`Backend::warp_rows`] and [`Backend::penalized_argmax_rows`] run on the
    /// device (the default) or copy the rows to the host (for comparisons).
    device_warp: AtomicBool,
    /// Whether decode and verify steps are recorded and replayed as CUDA graphs
    /// ([`Backend::run_step`]; on by default, `FALCONER_CUDA_GRAPHS=0` turns it off).
    step_graphs: AtomicBool,
}

/// An uploaded slope vector and the bits of its values.
type SlopeEntry = (Vec<u32>, Arc<DeviceBuffer<f32>>);

impl CudaBackend {
    /// Opens GPU `ordinal`. A machine without a GPU or without the CUDA libraries gets
    /// [`BackendError::Unavailable`] (never a panic).
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        Ok(CudaBackend {
            gpu: Gpu::new(ordinal).map_err(map_err)?,
            synthetic: None,
            slopes: Mutex::new(Vec::new()),
            device_warp: AtomicBool::new(true),
            step_graphs: AtomicBool::new(
                std::env::var("FALCONER_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0"),
            ),
        })
    }

    /// Turns the recording and replaying of steps as CUDA graphs on or off.
    pub fn set_step_graphs(&self, on: bool) {
        self.step_graphs.store(on, Ordering::Relaxed);
    }

    pub fn step_graphs(&self) -> bool {
        self.step_graphs.load(Ordering::Relaxed)
    }

    /// Whether sampled rows are warped on the device (default) or on the host.
    pub fn set_device_warp(&self, on: bool) {
        self.device_warp.store(on, Ordering::Relaxed);
    }

    pub fn device_warp(&self) -> bool {
        self.device_warp.load(Ordering::Relaxed)
    }

    /// A backend whose [`Backend::upload`] ignores the host bytes and fills each tensor
    /// on the device instead: weight matrices with seeded uniform values of standard
    /// deviation 0.02, vectors with values near 1. Only the shapes of a checkpoint are
    /// read, so full-size models can be benchmarked from a sparse stand-in file.
    pub fn synthetic(ordinal: usize, seed: u64) -> Result<Self, BackendError> {
        let mut b = Self::new(ordinal)?;
        b.synthetic = Some(AtomicU64::new(seed));
        Ok(b)
    }

    /// The GPU and its launchers (benchmarks measure raw GEMM peaks through it).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.gpu.synchronize().map_err(map_err)
    }

    /// Fills a KV cache with seeded random keys and values (long-context benchmarks).
    pub fn fill_kv_uniform(&self, kv: &mut CudaKvCache, seed: u64) -> Result<(), BackendError> {
        self.gpu
            .fill_kv_uniform(&mut kv.buf, seed, 1.0)
            .map_err(map_err)
    }

    /// The ALiBi slopes of an ALiBi model on the device (cached).
    fn alibi_slopes(
        &self,
        attn: &AttnConfig,
    ) -> Result<Option<Arc<DeviceBuffer<f32>>>, BackendError> {
        attn.alibi_slopes
            .as_deref()
            .map(|s| self.slopes_buffer(s))
            .transpose()
    }

    fn slopes_buffer(&self, slopes: &[f32]) -> Result<Arc<DeviceBuffer<f32>>, BackendError> {
        let key: Vec<u32> = slopes.iter().map(|s| s.to_bits()).collect();
        let mut cache = self
            .slopes
            .lock()
            .map_err(|_| invalid("attention", "slope cache lock poisoned".into()))?;
        if let Some((_, b)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(Arc::clone(b));
        }
        let b = Arc::new(self.gpu.upload(slopes).map_err(map_err)?);
        cache.push((key, Arc::clone(&b)));
        Ok(b)
    }

    /// `acc += a + b` for `(input, weight, bias)` terms; `b_ready` as for
    /// [`Gpu::linear_accumulate_sum`].
    fn add_sum(
        &self,
        (a_x, a, a_bias): (&CudaTensor, &CudaTensor, Option<&CudaTensor>),
        (b_x, b, b_bias): (&CudaTensor, &CudaTensor, Option<&CudaTensor>),
        acc: &mut CudaTensor,
        b_ready: bool,
    ) -> Result<(), BackendError> {
        check_linear(a_x, a)?;
        check_linear(b_x, b)?;
        if a_x.rows != b_x.rows || a.rows != b.rows || (acc.rows, acc.cols) != (a_x.rows, a.rows) {
            return Err(invalid(
                "linear",
                format!(
                    "{}x{} accumulator for {}x{} and {}x{} products",
                    acc.rows, acc.cols, a_x.rows, a.rows, b_x.rows, b.rows
                ),
            ));
        }
        let (ta, tb) = (sum_term(a_x, a, a_bias)?, sum_term(b_x, b, b_bias)?);
        self.gpu
            .linear_accumulate_sum(
                a_x.rows,
                a.rows,
                ta,
                tb,
                acc.f32_mut("linear")?,
                groups(a_x),
                b_ready,
            )
            .map_err(map_err)
    }

    /// `x @ weight^T + bias` on the GPU, with the exact GELU fused when `gelu`.
    fn product(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        gelu: bool,
    ) -> Result<CudaTensor, BackendError> {
        if let CudaData::Quant(w) = &weight.data {
            return self.product_quant(x, weight, w, bias, gelu);
        }
        check_linear(x, weight)?;
        let bias = bias.map(|b| b.f32("linear")).transpose()?;
        let (xs, ws) = (x.f32("linear")?, weight.bf16("linear")?);
        let out = if gelu {
            self.gpu
                .linear_gelu(xs, x.rows, x.cols, ws, weight.rows, bias, groups(x))
        } else {
            self.gpu
                .linear(xs, x.rows, x.cols, ws, weight.rows, bias, groups(x))
        }
        .map_err(map_err)?;
        Ok(x.product_output(weight, out))
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type KvCache = CudaKvCache;
    type Step = CudaStep;
    type StepGraphs = StepGraphs;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, tensor: &HostTensor<'_>) -> Result<CudaTensor, BackendError> {
        let (rows, cols, vector) = match tensor.shape {
            [n] => (1, *n, true),
            [r, c] => (*r, *c, false),
            other => {
                return Err(invalid(
                    "upload",
                    format!("tensors of rank {} are not supported", other.len()),
                ))
            }
        };
        let elem = if tensor.dtype == Dtype::F32 { 4 } else { 2 };
        if self.synthetic.is_none() && tensor.bytes.len() != rows * cols * elem {
            return Err(invalid(
                "upload",
                format!("{} bytes for shape {:?}", tensor.bytes.len(), tensor.shape),
            ));
        }
        if let Some(seed) = &self.synthetic {
            return self.synthesize(seed, rows, cols, vector);
        }
        let data = if vector {
            CudaData::F32(self.gpu.upload(&tensor.to_f32()).map_err(map_err)?)
        } else {
            CudaData::Bf16(
                self.gpu
                    .upload(&upload::host_to_bf16(tensor))
                    .map_err(map_err)?,
            )
        };
        Ok(CudaTensor {
            data,
            rows,
            cols,
            groups: None,
        })
    }

    fn tensor_bytes(&self, tensor: &CudaTensor) -> usize {
        match &tensor.data {
            CudaData::F32(b) => 4 * b.len(),
            CudaData::Bf16(b) => 2 * b.len(),
            CudaData::Quant(w) => w.byte_size(),
        }
    }

    /// Every format: int8 and int4 weights stay integers in device memory.
    fn supports_weights(&self, _format: WeightFormat) -> bool {
        true
    }

    fn upload_quantized(&self, weight: QuantMatrix) -> Result<CudaTensor, BackendError> {
        self.upload_quant(&weight)
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CudaKvCache, BackendError> {
        let buf = self
            .gpu
            .alloc_kv(
                layout.num_layers,
                layout.num_blocks,
                layout.block_size,
                layout.num_kv_heads,
                layout.head_dim,
            )
            .map_err(map_err)?;
        Ok(CudaKvCache {
            layout: *layout,
            buf,
        })
    }

    fn prepare_step(&self, meta: &StepMeta) -> Result<CudaStep, BackendError> {
        let seqs: Vec<SeqDesc<'_>> = meta
            .seqs
            .iter()
            .map(|s| SeqDesc {
                first_row: s.first_row,
                num_rows: s.num_rows,
                start_pos: s.start_pos,
                block_table: &s.block_table,
            })
            .collect();
        let input = StepInput {
            token_ids: &meta.token_ids,
            slots: &meta.slots,
            rope_cos: &meta.rope_cos,
            rope_sin: &meta.rope_sin,
            seqs: &seqs,
            logit_rows: &meta.logit_rows,
            block_size: meta.block_size,
        };
        // Logit rows come chunk by chunk; count them per sequence in order.
        let mut logit_groups: Vec<usize> = Vec::new();
        let mut last_seq = None;
        for &r in &meta.logit_rows {
            let seq = meta
                .seqs
                .iter()
                .position(|s| (s.first_row..s.first_row + s.num_rows).contains(&(r as usize)));
            match logit_groups.last_mut() {
                Some(c) if seq == last_seq => *c += 1,
                _ => logit_groups.push(1),
            }
            last_seq = seq;
        }
        Ok(CudaStep {
            dev: self.gpu.upload_step(&input).map_err(map_err)?,
            chunk_rows: meta.seqs.iter().map(|s| s.num_rows).collect(),
            logit_groups: logit_groups.into(),
        })
    }

    fn embed(&self, table: &CudaTensor, step: &CudaStep) -> Result<CudaTensor, BackendError> {
        let out = self
            .gpu
            .embed(table.bf16("embed")?, table.rows, table.cols, &step.dev)
            .map_err(map_err)?;
        Ok(CudaTensor {
            data: CudaData::F32(out),
            rows: step.dev.rows(),
            cols: table.cols,
            groups: Some(Arc::clone(&step.chunk_rows)),
        })
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        let out = self
            .gpu
            .layer_norm(
                x.f32("layer_norm")?,
                x.rows,
                x.cols,
                weight.f32("layer_norm")?,
                bias.f32("layer_norm")?,
                eps,
            )
            .map_err(map_err)?;
        Ok(CudaTensor {
            data: CudaData::F32(out),
            rows: x.rows,
            cols: x.cols,
            groups: x.groups.clone(),
        })
    }

    fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor, BackendError> {
        self.product(x, weight, bias, false)
    }

    fn gelu(&self, x: &mut CudaTensor) -> Result<(), BackendError> {
        self.gpu.gelu(x.f32_mut("gelu")?).map_err(map_err)
    }

    fn linear_gelu(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor, BackendError> {
        self.product(x, weight, bias, true)
    }

    fn linear_and_gelu(
        &self,
        x: &CudaTensor,
        a: &CudaTensor,
        a_bias: Option<&CudaTensor>,
        b: &CudaTensor,
        b_bias: Option<&CudaTensor>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        if a.is_quantized() || b.is_quantized() {
            return Ok((self.linear(x, a, a_bias)?, self.linear_gelu(x, b, b_bias)?));
        }
        check_linear(x, a)?;
        check_linear(x, b)?;
        let (ya, yb) = self
            .gpu
            .linear_pair(
                x.f32("linear")?,
                x.rows,
                x.cols,
                pair_half(a, a_bias, false)?,
                pair_half(b, b_bias, true)?,
                groups(x),
            )
            .map_err(map_err)?;
        Ok((x.product_output(a, ya), x.product_output(b, yb)))
    }

    fn attention_and_gelu(
        &self,
        x: &CudaTensor,
        qkv: &CudaTensor,
        qkv_bias: Option<&CudaTensor>,
        up: &CudaTensor,
        up_bias: Option<&CudaTensor>,
        kv: &mut CudaKvCache,
        layer: usize,
        step: &CudaStep,
        attn: &AttnConfig,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        if qkv.is_quantized() || up.is_quantized() {
            let (y, up) = self.linear_and_gelu(x, qkv, qkv_bias, up, up_bias)?;
            return Ok((self.attention(&y, kv, layer, step, attn)?, up));
        }
        let (ctx, up_out, ()) = self.attention_pair_then(
            x,
            (qkv, qkv_bias),
            (up, up_bias),
            kv,
            layer,
            step,
            attn,
            self.gpu.fuse_rope(),
            |_| Ok(()),
        )?;
        Ok((ctx, x.product_output(up, up_out)))
    }

    fn linear_add_sum(
        &self,
        a_x: &CudaTensor,
        a: &CudaTensor,
        a_bias: Option<&CudaTensor>,
        b_x: &CudaTensor,
        b: &CudaTensor,
        b_bias: Option<&CudaTensor>,
        acc: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        if a.is_quantized() || b.is_quantized() {
            self.linear_add(a_x, a, a_bias, acc)?;
            return self.linear_add(b_x, b, b_bias, acc);
        }
        self.add_sum((a_x, a, a_bias), (b_x, b, b_bias), acc, false)
    }

    fn parallel_attention(
        &self,
        x: &CudaTensor,
        w: &ParallelWeights<'_, CudaTensor>,
        kv: &mut CudaKvCache,
        layer: usize,
        step: &CudaStep,
        attn: &AttnConfig,
        acc: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        if quant::any_quantized(w) {
            let (ctx, up) = self
                .attention_and_gelu(x, w.qkv.0, w.qkv.1, w.up.0, w.up.1, kv, layer, step, attn)?;
            return self.linear_add_sum(&ctx, w.dense.0, w.dense.1, &up, w.down.0, w.down.1, acc);
        }
        if self.forks_mlp(x.rows, false) {
            return self.parallel_attention_forked(x, w, kv, layer, step, attn, acc);
        }
        let (ctx, up) =
            self.attention_and_gelu(x, w.qkv.0, w.qkv.1, w.up.0, w.up.1, kv, layer, step, attn)?;
        // The attention queued at least one kernel after the one that wrote `up`.
        self.add_sum(
            (&ctx, w.dense.0, w.dense.1),
            (&up, w.down.0, w.down.1),
            acc,
            true,
        )
    }

    fn parallel_attention_separate(
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
        if self.forks_mlp(a.rows, true) && !quant::any_quantized(w) {
            return self.parallel_attention_separate_forked(a, m, w, kv, layer, step, attn, acc);
        }
        super::parallel_attention_separate_in_order(self, a, m, w, kv, layer, step, attn, acc)
    }

    fn linear_add(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        acc: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        check_linear(x, weight)?;
        if (acc.rows, acc.cols) != (x.rows, weight.rows) {
            return Err(invalid(
                "linear",
                format!(
                    "{}x{} accumulator for a {}x{} product",
                    acc.rows, acc.cols, x.rows, weight.rows
                ),
            ));
        }
        if let CudaData::Quant(w) = &weight.data {
            return self.accumulate_quant(x, w, bias, acc);
        }
        let bias = bias.map(|b| b.f32("linear")).transpose()?;
        self.gpu
            .linear_accumulate(
                x.f32("linear")?,
                x.rows,
                x.cols,
                weight.bf16("linear")?,
                weight.rows,
                bias,
                acc.f32_mut("linear")?,
                groups(x),
            )
            .map_err(map_err)
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<(), BackendError> {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(invalid(
                "add",
                format!("{}x{} + {}x{}", x.rows, x.cols, y.rows, y.cols),
            ));
        }
        let y = y.f32("add")?;
        self.gpu.add(x.f32_mut("add")?, y).map_err(map_err)
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        kv: &mut CudaKvCache,
        layer: usize,
        step: &CudaStep,
        attn: &AttnConfig,
    ) -> Result<CudaTensor, BackendError> {
        check_step_rows(qkv, step)?;
        let slopes = self.alibi_slopes(attn)?;
        let out = self
            .gpu
            .attention(
                qkv.f32("attention")?,
                &mut kv.buf,
                layer,
                &step.dev,
                &attention_params(attn, slopes.as_deref()),
            )
            .map_err(map_err)?;
        Ok(attention_output(out, qkv.rows, attn, step))
    }

    fn gather_logit_rows(
        &self,
        x: &CudaTensor,
        step: &CudaStep,
    ) -> Result<CudaTensor, BackendError> {
        if x.rows != step.dev.rows() {
            return Err(invalid(
                "gather_logit_rows",
                format!("input has {} rows, the step {}", x.rows, step.dev.rows()),
            ));
        }
        let out = self
            .gpu
            .gather_logit_rows(x.f32("gather_logit_rows")?, x.cols, &step.dev)
            .map_err(map_err)?;
        Ok(CudaTensor {
            data: CudaData::F32(out),
            rows: step.dev.num_logit_rows(),
            cols: x.cols,
            groups: Some(Arc::clone(&step.logit_groups)),
        })
    }

    fn argmax_rows(&self, x: &CudaTensor, cols: usize) -> Result<Vec<Option<u32>>, BackendError> {
        check_cols("argmax_rows", x, cols)?;
        self.gpu
            .argmax_rows(x.f32("argmax_rows")?, x.rows, x.cols)
            .map_err(map_err)
    }

    fn warp_rows(
        &self,
        x: &CudaTensor,
        cols: usize,
        rows: &[WarpRow<'_>],
    ) -> Result<WarpedRows, BackendError> {
        warp::warp_rows(self, x, cols, rows)
    }

    fn penalized_argmax_rows(
        &self,
        x: &CudaTensor,
        cols: usize,
        rows: &[WarpRow<'_>],
    ) -> Result<Vec<Option<u32>>, BackendError> {
        warp::penalized_argmax_rows(self, x, cols, rows)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>, BackendError> {
        match &x.data {
            CudaData::F32(b) => self.gpu.download_f32(b).map_err(map_err),
            CudaData::Bf16(b) => Ok(self
                .gpu
                .download(b)
                .map_err(map_err)?
                .into_iter()
                .map(bf16::to_f32)
                .collect()),
            CudaData::Quant(w) => {
                let d = self.gpu.dequantize_bf16(w).map_err(map_err)?;
                Ok(self
                    .gpu
                    .download(&d)
                    .map_err(map_err)?
                    .into_iter()
                    .map(bf16::to_f32)
                    .collect())
            }
        }
    }

    /// A hidden state of another GPU is copied here (through the host, after that
    /// GPU's queued work); one of this GPU is used as it is.
    fn receive_hidden(&self, x: CudaTensor) -> Result<CudaTensor, BackendError> {
        let CudaData::F32(b) = &x.data else {
            return Ok(x);
        };
        if b.ordinal().map_err(map_err)? == self.gpu.ordinal() {
            return Ok(x);
        }
        let data = self.gpu.copy_from_other_gpu(b).map_err(map_err)?;
        Ok(CudaTensor {
            data: CudaData::F32(data),
            rows: x.rows,
            cols: x.cols,
            groups: x.groups.clone(),
        })
    }

    fn upload_hidden(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<CudaTensor, BackendError> {
        if data.len() != rows * cols {
            return Err(invalid(
                "upload_hidden",
                format!("{} values for {rows}x{cols}", data.len()),
            ));
        }
        Ok(CudaTensor {
            data: CudaData::F32(self.gpu.upload(data).map_err(map_err)?),
            rows,
            cols,
            groups: None,
        })
    }

    fn run_step<E: From<BackendError> + std::fmt::Display>(
        &self,
        graphs: &mut StepGraphs,
        step: &CudaStep,
        input: Option<CudaTensor>,
        pass: &mut StepPass<'_, CudaBackend, E>,
    ) -> Result<CudaTensor, E> {
        graphs::run_step(self, graphs, step, input, pass)
    }

    fn copy_kv_blocks(
        &self,
        kv: &mut CudaKvCache,
        copies: &[(u32, u32)],
    ) -> Result<(), BackendError> {
        self.gpu
            .copy_kv_blocks(&mut kv.buf, copies)
            .map_err(map_err)
    }
}
