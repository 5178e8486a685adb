//! Integer weights on the GPU (`crate::quant`'s int8 and int4): uploaded in the kernels'
//! layout ([`kernels::QuantWeight`]) and multiplied by the integer GEMVs for few rows, or
//! dequantized to bf16 for cuBLAS for many. Layers with integer weights take the plain
//! composition of products (no fused pairs, sums or forked MLP: those kernels stream
//! bf16), which gives the same results those fusions are defined to give.

use falconer_kernels as kernels;

use super::{check_linear, groups, map_err, CudaBackend, CudaData, CudaTensor};
use crate::backend::ParallelWeights;
use crate::error::BackendError;
use crate::quant::{QuantData, QuantMatrix};

/// Whether any weight of a parallel-attention layer is held as integers.
pub(super) fn any_quantized(w: &ParallelWeights<'_, CudaTensor>) -> bool {
    [w.qkv.0, w.up.0, w.dense.0, w.down.0]
        .iter()
        .any(|t| t.is_quantized())
}

/// A quantized matrix in the kernels' layout on `gpu` (the backend's uploads, and
/// benchmarks and tests that drive the kernels directly).
pub fn upload_quant_weight(
    gpu: &kernels::Gpu,
    m: &QuantMatrix,
) -> Result<kernels::QuantWeight, kernels::KernelError> {
    let (n, k) = (m.rows(), m.cols());
    match m.data() {
        QuantData::Int8 { q, scales } => gpu.upload_q8(q, scales, n, k),
        QuantData::Int4 {
            packed,
            scales,
            group,
        } => gpu.upload_q4(packed, scales, n, k, *group),
    }
}

impl CudaTensor {
    pub(super) fn is_quantized(&self) -> bool {
        matches!(self.data, CudaData::Quant(_))
    }
}

impl CudaBackend {
    pub(super) fn upload_quant(&self, m: &QuantMatrix) -> Result<CudaTensor, BackendError> {
        let w = upload_quant_weight(&self.gpu, m).map_err(map_err)?;
        Ok(CudaTensor {
            data: CudaData::Quant(w),
            rows: m.rows(),
            cols: m.cols(),
            groups: None,
        })
    }

    /// `x @ weight^T + bias` (GELU fused when `gelu`) for an integer `weight`.
    pub(super) fn product_quant(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        w: &kernels::QuantWeight,
        bias: Option<&CudaTensor>,
        gelu: bool,
    ) -> Result<CudaTensor, BackendError> {
        check_linear(x, weight)?;
        let bias = bias.map(|b| b.f32("linear")).transpose()?;
        let xs = x.f32("linear")?;
        let out = if gelu {
            self.gpu.linear_quant_gelu(xs, x.rows, w, bias, groups(x))
        } else {
            self.gpu.linear_quant(xs, x.rows, w, bias, groups(x))
        }
        .map_err(map_err)?;
        Ok(x.product_output(weight, out))
    }

    /// `acc += x @ weight^T + bias` for an integer `weight` (`linear_add` checked the
    /// shapes).
    pub(super) fn accumulate_quant(
        &self,
        x: &CudaTensor,
        w: &kernels::QuantWeight,
        bias: Option<&CudaTensor>,
        acc: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let bias = bias.map(|b| b.f32("linear")).transpose()?;
        self.gpu
            .linear_quant_accumulate(
                x.f32("linear")?,
                x.rows,
                w,
                bias,
                acc.f32_mut("linear")?,
                groups(x),
            )
            .map_err(map_err)
    }
}
