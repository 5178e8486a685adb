//! Host data to device tensors: checkpoint bytes of any dtype to bf16, and the seeded
//! fills that stand in for a checkpoint's values in benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

use half::{bf16, f16};
use rayon::prelude::*;

use super::{map_err, CudaBackend, CudaData, CudaTensor};
use crate::checkpoint::{Dtype, HostTensor};
use crate::error::BackendError;

/// Checkpoint bytes of any supported dtype to bf16, in parallel (a 7B checkpoint is
/// 14 GB).
pub(super) fn host_to_bf16(t: &HostTensor<'_>) -> Vec<bf16> {
    const CHUNK: usize = 1 << 16;
    let b = t.bytes;
    match t.dtype {
        Dtype::Bf16 => b
            .par_chunks(2 * CHUNK)
            .flat_map_iter(|c| c.chunks_exact(2).map(|p| bf16::from_le_bytes([p[0], p[1]])))
            .collect(),
        Dtype::F16 => b
            .par_chunks(2 * CHUNK)
            .flat_map_iter(|c| {
                c.chunks_exact(2)
                    .map(|p| bf16::from_f32(f16::from_le_bytes([p[0], p[1]]).to_f32()))
            })
            .collect(),
        Dtype::F32 => b
            .par_chunks(4 * CHUNK)
            .flat_map_iter(|c| {
                c.chunks_exact(4)
                    .map(|p| bf16::from_f32(f32::from_le_bytes([p[0], p[1], p[2], p[3]])))
            })
            .collect(),
    }
}

impl CudaBackend {
    pub(super) fn synthesize(
        &self,
        seed: &AtomicU64,
        rows: usize,
        cols: usize,
        vector: bool,
    ) -> Result<CudaTensor, BackendError> {
        let s = seed.fetch_add(1, Ordering::Relaxed);
        let n = rows * cols;
        let data = if vector {
            let mut b = self.gpu.alloc::<f32>(n).map_err(map_err)?;
            self.gpu
                .fill_uniform_f32(&mut b, s, 0.1, 1.0)
                .map_err(map_err)?;
            CudaData::F32(b)
        } else {
            let mut b = self.gpu.alloc::<bf16>(n).map_err(map_err)?;
            // Uniform on (-a, a) has standard deviation a / sqrt(3).
            self.gpu
                .fill_uniform_bf16(&mut b, s, 0.02 * 3f32.sqrt())
                .map_err(map_err)?;
            CudaData::Bf16(b)
        };
        Ok(CudaTensor {
            data,
            rows,
            cols,
            groups: None,
        })
    }
}
