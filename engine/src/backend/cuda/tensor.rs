//! The CUDA backend's tensors, KV cache and step metadata: device buffers with the
//! shapes and chunk layout the ops check against.

use std::sync::Arc;

use half::bf16;

use falconer_kernels::{DeviceBuffer, DeviceStep, KvBuffers, QuantWeight};

use super::invalid;
use crate::backend::KvLayout;
use crate::error::BackendError;

/// A tensor's device storage.
#[derive(Debug)]
pub enum CudaData {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
    /// An int8 or int4 linear weight (`crate::quant`).
    Quant(QuantWeight),
}

/// A row-major `[rows, cols]` tensor in device memory.
#[derive(Debug)]
pub struct CudaTensor {
    pub(super) data: CudaData,
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// When the rows are a step's: how many belong to each sequence chunk, in order. In
    /// row-invariant mode a product computes each chunk as it would be computed alone.
    pub(super) groups: Option<Arc<[usize]>>,
}

impl CudaTensor {
    /// The result `data` of `self @ weight^T`: one row per row of `self` (and its
    /// sequence chunks), one column per row of `weight`.
    pub(super) fn product_output(
        &self,
        weight: &CudaTensor,
        data: DeviceBuffer<f32>,
    ) -> CudaTensor {
        CudaTensor {
            data: CudaData::F32(data),
            rows: self.rows,
            cols: weight.rows,
            groups: self.groups.clone(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &CudaData {
        &self.data
    }

    pub(super) fn f32(&self, op: &'static str) -> Result<&DeviceBuffer<f32>, BackendError> {
        match &self.data {
            CudaData::F32(b) => Ok(b),
            _ => Err(invalid(op, "expected an f32 tensor".into())),
        }
    }

    pub(super) fn f32_mut(
        &mut self,
        op: &'static str,
    ) -> Result<&mut DeviceBuffer<f32>, BackendError> {
        match &mut self.data {
            CudaData::F32(b) => Ok(b),
            _ => Err(invalid(op, "expected an f32 tensor".into())),
        }
    }

    pub(super) fn bf16(&self, op: &'static str) -> Result<&DeviceBuffer<bf16>, BackendError> {
        match &self.data {
            CudaData::Bf16(b) => Ok(b),
            _ => Err(invalid(op, "expected a bf16 weight".into())),
        }
    }
}

/// Paged bf16 K and V of every layer, `[layer][slot][kv_head][head_dim]`.
#[derive(Debug)]
pub struct CudaKvCache {
    pub(super) layout: KvLayout,
    pub(super) buf: KvBuffers,
}

impl CudaKvCache {
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Device bytes held by keys and values.
    pub fn byte_size(&self) -> usize {
        self.buf.byte_size()
    }

    /// Bytes per cached token: `2 (K, V) x layers x kv_heads x head_dim x 2 (bf16)`.
    pub fn bytes_per_token(&self) -> usize {
        self.buf.bytes_per_token()
    }
}

/// One step's metadata on the device.
#[derive(Debug)]
pub struct CudaStep {
    pub(super) dev: DeviceStep,
    /// Rows of each sequence chunk, in order, and logit rows of each.
    pub(super) chunk_rows: Arc<[usize]>,
    pub(super) logit_groups: Arc<[usize]>,
}
