//! The CPU reference backend: f32 math on any checkpoint dtype, multithreaded with
//! rayon. It is the yardstick the CUDA backend is checked against, so clarity wins
//! over speed where they conflict; the matmul still streams each weight row once per
//! step so that multi-token verify passes cost little more than one token.

mod attention;
mod dequant;
mod matmul;

use rayon::prelude::*;

use super::{AttnConfig, Backend, KvLayout, StepMeta};
use crate::checkpoint::HostTensor;
use crate::error::BackendError;
use crate::quant::{QuantMatrix, WeightFormat};
use matmul::WeightRows;

/// A row-major f32 matrix, or a quantized weight (see [`CpuTensor::quantized`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    /// The values; empty for a quantized weight.
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    quant: Option<QuantMatrix>,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self, BackendError> {
        if data.len() != rows * cols {
            return Err(shape_error("tensor", data.len(), rows * cols));
        }
        Ok(CpuTensor {
            data,
            rows,
            cols,
            quant: None,
        })
    }

    /// A linear weight kept in its integer format: products dequantize it a row at a
    /// time; every other op sees no values (`data` is empty) and refuses it.
    pub fn quantized(weight: QuantMatrix) -> Self {
        CpuTensor {
            data: Vec::new(),
            rows: weight.rows(),
            cols: weight.cols(),
            quant: Some(weight),
        }
    }

    /// The quantized weight this tensor holds, if it is one.
    pub fn quant(&self) -> Option<&QuantMatrix> {
        self.quant.as_ref()
    }

    /// Bytes of memory the values take (f32, or the integers and scales).
    pub fn bytes(&self) -> usize {
        self.quant
            .as_ref()
            .map_or(4 * self.data.len(), QuantMatrix::bytes)
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Paged K and V for every layer: `[layer][slot][kv_head][head_dim]`.
#[derive(Debug, Clone)]
pub struct CpuKvCache {
    layout: KvLayout,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKvCache {
    fn layer_len(&self) -> usize {
        self.layout.num_slots() * self.layout.num_kv_heads * self.layout.head_dim
    }
}

/// The CPU backend. Threads come from rayon's global pool unless one is given.
#[derive(Debug, Default)]
pub struct CpuBackend {
    pool: Option<rayon::ThreadPool>,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { pool: None }
    }

    /// A backend with its own pool of `threads` threads (e.g. one pool per shard).
    pub fn with_threads(threads: usize) -> Result<Self, BackendError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| BackendError::Device {
                op: "thread pool",
                message: e.to_string(),
            })?;
        Ok(CpuBackend { pool: Some(pool) })
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// `x @ weight^T + bias`, then `act` on every output inside the parallel tasks.
    fn linear_then(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        act: Option<fn(f32) -> f32>,
    ) -> Result<CpuTensor, BackendError> {
        if weight.cols != x.cols {
            return Err(shape_error("linear", weight.cols, x.cols));
        }
        if let Some(b) = bias {
            if b.data.len() != weight.rows {
                return Err(shape_error("linear bias", b.data.len(), weight.rows));
            }
        }
        if x.data.len() != x.rows * x.cols {
            return Err(shape_error("linear input", x.data.len(), x.rows * x.cols));
        }
        let rows = match &weight.quant {
            Some(q) => WeightRows::Quant(q),
            None if weight.data.len() == weight.rows * weight.cols => WeightRows::F32(&weight.data),
            None => {
                return Err(shape_error(
                    "linear weight",
                    weight.data.len(),
                    weight.rows * weight.cols,
                ))
            }
        };
        let data = self.run(|| {
            matmul::linear_rows(
                &x.data,
                x.rows,
                rows,
                weight.rows,
                x.cols,
                bias.map(|b| b.data.as_slice()),
                act,
            )
        });
        CpuTensor::new(data, x.rows, weight.rows)
    }
}

/// Exact GELU with f32 erf (under 1 ulp), as torch computes it; f64 cost a sixth of a
/// small model's decode step.
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2))
}

fn shape_error(op: &'static str, found: usize, expected: usize) -> BackendError {
    BackendError::Device {
        op,
        message: format!("shape mismatch: {found} elements, expected {expected}"),
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type KvCache = CpuKvCache;
    type Step = StepMeta;
    type StepGraphs = ();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, tensor: &HostTensor<'_>) -> Result<CpuTensor, BackendError> {
        let (rows, cols) = match tensor.shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => return Err(shape_error("upload", tensor.numel(), tensor.numel())),
        };
        CpuTensor::new(tensor.to_f32(), rows, cols)
    }

    fn tensor_bytes(&self, tensor: &CpuTensor) -> usize {
        tensor.bytes()
    }

    /// Every format: the CPU keeps int8 and int4 weights as they are and dequantizes
    /// a row at a time inside the matmul.
    fn supports_weights(&self, _format: WeightFormat) -> bool {
        true
    }

    fn upload_quantized(&self, weight: QuantMatrix) -> Result<CpuTensor, BackendError> {
        Ok(CpuTensor::quantized(weight))
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CpuKvCache, BackendError> {
        let n = layout.num_layers * layout.num_slots() * layout.num_kv_heads * layout.head_dim;
        Ok(CpuKvCache {
            layout: *layout,
            k: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    fn prepare_step(&self, meta: &StepMeta) -> Result<StepMeta, BackendError> {
        Ok(meta.clone())
    }

    fn embed(&self, table: &CpuTensor, step: &StepMeta) -> Result<CpuTensor, BackendError> {
        let mut data = Vec::with_capacity(step.token_ids.len() * table.cols);
        for &id in &step.token_ids {
            let id = id as usize;
            if id >= table.rows {
                return Err(shape_error("embed", id, table.rows));
            }
            data.extend_from_slice(table.row(id));
        }
        CpuTensor::new(data, step.token_ids.len(), table.cols)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor, BackendError> {
        if weight.data.len() != x.cols || bias.data.len() != x.cols {
            return Err(shape_error("layer_norm", weight.data.len(), x.cols));
        }
        let mut out = x.clone();
        self.run(|| {
            out.data.par_chunks_mut(x.cols).for_each(|row| {
                let n = row.len() as f64;
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = row
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let inv = 1.0 / (var + f64::from(eps)).sqrt();
                for ((v, w), b) in row.iter_mut().zip(&weight.data).zip(&bias.data) {
                    *v = ((f64::from(*v) - mean) * inv) as f32 * w + b;
                }
            })
        });
        Ok(out)
    }

    fn linear(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
    ) -> Result<CpuTensor, BackendError> {
        self.linear_then(x, weight, bias, None)
    }

    /// GELU inside the parallel matmul tasks: the same operations as `linear` then
    /// `gelu`, spread over the threads with the products instead of after them.
    fn linear_gelu(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
    ) -> Result<CpuTensor, BackendError> {
        self.linear_then(x, weight, bias, Some(gelu))
    }

    fn gelu(&self, x: &mut CpuTensor) -> Result<(), BackendError> {
        self.run(|| {
            x.data.par_chunks_mut(4096).for_each(|c| {
                for v in c {
                    *v = gelu(*v);
                }
            })
        });
        Ok(())
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), BackendError> {
        if x.data.len() != y.data.len() {
            return Err(shape_error("add", y.data.len(), x.data.len()));
        }
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        kv: &mut CpuKvCache,
        layer: usize,
        step: &StepMeta,
        attn: &AttnConfig,
    ) -> Result<CpuTensor, BackendError> {
        self.run(|| attention::attend(qkv, kv, layer, step, attn))
    }

    fn gather_logit_rows(&self, x: &CpuTensor, step: &StepMeta) -> Result<CpuTensor, BackendError> {
        let mut data = Vec::with_capacity(step.logit_rows.len() * x.cols);
        for &r in &step.logit_rows {
            let r = r as usize;
            if r >= x.rows {
                return Err(shape_error("gather_logit_rows", r, x.rows));
            }
            data.extend_from_slice(x.row(r));
        }
        CpuTensor::new(data, step.logit_rows.len(), x.cols)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>, BackendError> {
        Ok(match &x.quant {
            Some(q) => q.dequantize(),
            None => x.data.clone(),
        })
    }

    fn upload_hidden(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<CpuTensor, BackendError> {
        CpuTensor::new(data.to_vec(), rows, cols)
    }

    fn copy_kv_blocks(
        &self,
        kv: &mut CpuKvCache,
        copies: &[(u32, u32)],
    ) -> Result<(), BackendError> {
        let l = kv.layout;
        let block = l.block_size * l.num_kv_heads * l.head_dim;
        let layer_len = kv.layer_len();
        for &(src, dst) in copies {
            let (src, dst) = (src as usize, dst as usize);
            if src >= l.num_blocks || dst >= l.num_blocks {
                return Err(shape_error("copy_kv_blocks", src.max(dst), l.num_blocks));
            }
            for layer in 0..l.num_layers {
                let base = layer * layer_len;
                for buf in [&mut kv.k, &mut kv.v] {
                    buf.copy_within(
                        base + src * block..base + (src + 1) * block,
                        base + dst * block,
                    );
                }
            }
        }
        Ok(())
    }
}
