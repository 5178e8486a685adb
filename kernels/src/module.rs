//! The kernels' NVRTC program: every `.cu` source of this crate compiled as one program
//! for the device's own architecture (once per process and architecture), and the
//! handles of its kernels, loaded once per [`Gpu`](crate::gpu::Gpu).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::CompileOptions;

use crate::error::KernelError;
use crate::ops::TcDecodeShape;

/// All kernel sources, one NVRTC program (NVRTC cannot #include our own files).
const SOURCE: &str = concat!(
    include_str!("common.cuh"),
    include_str!("elementwise.cu"),
    include_str!("gemv.cu"),
    include_str!("gemv_quant.cu"),
    include_str!("attention.cu"),
    include_str!("attention_tc_decode.cu"),
    include_str!("sampling.cu"),
);

/// Handles of every kernel in the module.
pub(crate) struct Kernels {
    pub embed_bf16: CudaFunction,
    pub layer_norm_f32: CudaFunction,
    pub layer_norm_f32_reg: CudaFunction,
    pub gelu_f32: CudaFunction,
    pub add_f32: CudaFunction,
    pub argmax_rows_f32: CudaFunction,
    pub warp_probs_rows_f32: CudaFunction,
    pub penalize_rows_f32: CudaFunction,
    pub gather_rows_f32: CudaFunction,
    pub f32_to_bf16: CudaFunction,
    pub add_bias_rows: CudaFunction,
    pub copy_kv_blocks: CudaFunction,
    pub fill_uniform_bf16: CudaFunction,
    pub fill_uniform_f32: CudaFunction,
    pub rope_qkv: CudaFunction,
    pub gemv: Vec<CudaFunction>,
    pub gemv_tc: Vec<CudaFunction>,
    /// Row-invariant tensor-core GEMVs (`gemv_tcx_r1..4`, then `gemv_tc_r5..8`).
    pub gemv_tc_exact: Vec<CudaFunction>,
    pub gemv_scalar: CudaFunction,
    /// Integer-weight GEMVs and their dequantization to bf16 (gemv_quant.cu).
    pub gemv_q8: CudaFunction,
    pub gemv_q4: CudaFunction,
    pub dequant_q8_bf16: CudaFunction,
    pub dequant_q4_bf16: CudaFunction,
    /// Two products of one input per launch (`gemv2_*`): CUDA cores for one row, and
    /// tensor cores for 1..8 rows, plain and row-invariant as `gemv_tc`/`gemv_tc_exact`.
    /// (`gemv2_bf16_r1`, `_s2`, `_s4` by [`crate::gpu::GemvSplit`].)
    pub gemv2_simt_r1: [CudaFunction; 3],
    /// `gemv2_bf16_r1` with the qkv half stored through rotary into q and the KV cache.
    pub gemv2_rope_simt_r1: CudaFunction,
    /// One row's product by [`crate::gpu::GemvSplit`] (`gemv_bf16_r1`, `_s2`, `_s4`:
    /// 1, 2 or 4 warps sharing each output's row).
    pub gemv_r1: [CudaFunction; 3],
    /// One row's `y += x @ w^T + x2 @ w2^T` as one product, by [`crate::gpu::GemvSplit`]
    /// (`gemv_cat_bf16_r1`, `_s2`, `_s4`).
    pub gemv_cat_simt_r1: [CudaFunction; 3],
    /// The same whose first product streams before the PDL wait
    /// (`gemv_cat_late_bf16_r1`, `_s2`, `_s4`).
    pub gemv_cat_late_simt_r1: [CudaFunction; 3],
    pub gemv2_tc: Vec<CudaFunction>,
    pub gemv2_tc_exact: Vec<CudaFunction>,
    /// `gemv2_tc_exact` with the first product a fused qkv projection stored through
    /// rotary into q and the KV cache (`gemv2_tcx_rope_r1..8`).
    pub gemv2_tcx_rope: Vec<CudaFunction>,
    pub attn_decode: CudaFunction,
    pub attn_decode_hd64: CudaFunction,
    pub attn_decode_hd128: CudaFunction,
    pub attn_combine: CudaFunction,
    pub attn_decode_tc64: CudaFunction,
    pub attn_decode_tc128: CudaFunction,
    /// Dynamic shared memory `attn_decode_tc64` / `attn_decode_tc128` may use: what they
    /// need at most where the device allowed it at load, else the default 48 KiB.
    pub attn_decode_tc_smem: [usize; 2],
    pub attn_prefill_tc64: CudaFunction,
    pub attn_prefill_tc128: CudaFunction,
}

impl Kernels {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        let f = |name: &str| {
            module.load_function(name).map_err(|e| KernelError::Device {
                op: "load kernel",
                message: format!("{name}: {e:?}"),
            })
        };
        let mut gemv = Vec::with_capacity(8);
        let mut gemv_tc = Vec::with_capacity(8);
        let mut gemv_tc_exact = Vec::with_capacity(8);
        let mut gemv2_tc = Vec::with_capacity(8);
        let mut gemv2_tc_exact = Vec::with_capacity(8);
        let mut gemv2_tcx_rope = Vec::with_capacity(8);
        for r in 1..=8 {
            gemv.push(f(&format!("gemv_bf16_r{r}"))?);
            gemv_tc.push(f(&format!("gemv_tc_r{r}"))?);
            let exact = if r <= 4 { "tcx" } else { "tc" };
            gemv_tc_exact.push(f(&format!("gemv_{exact}_r{r}"))?);
            gemv2_tc.push(f(&format!("gemv2_tc_r{r}"))?);
            gemv2_tc_exact.push(f(&format!("gemv2_{exact}_r{r}"))?);
            gemv2_tcx_rope.push(f(&format!("gemv2_tcx_rope_r{r}"))?);
        }
        // The tensor-core decode attention holds a whole split in shared memory (more
        // than the default 48 KiB); a device that refuses leaves it to the CUDA-core one.
        let attn_decode_tc64 = f("attn_decode_tc64")?;
        let attn_decode_tc128 = f("attn_decode_tc128")?;
        let allow = |func: &CudaFunction, hd: usize| {
            let bytes = TcDecodeShape::max_smem_bytes(hd);
            let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            match i32::try_from(bytes).map(|b| func.set_attribute(attr, b)) {
                Ok(Ok(())) => bytes,
                _ => 48 * 1024,
            }
        };
        let attn_decode_tc_smem = [allow(&attn_decode_tc64, 64), allow(&attn_decode_tc128, 128)];
        Ok(Kernels {
            embed_bf16: f("embed_bf16")?,
            layer_norm_f32: f("layer_norm_f32")?,
            layer_norm_f32_reg: f("layer_norm_f32_reg")?,
            gelu_f32: f("gelu_f32")?,
            add_f32: f("add_f32")?,
            argmax_rows_f32: f("argmax_rows_f32")?,
            warp_probs_rows_f32: f("warp_probs_rows_f32")?,
            penalize_rows_f32: f("penalize_rows_f32")?,
            gather_rows_f32: f("gather_rows_f32")?,
            f32_to_bf16: f("f32_to_bf16")?,
            add_bias_rows: f("add_bias_rows")?,
            copy_kv_blocks: f("copy_kv_blocks")?,
            fill_uniform_bf16: f("fill_uniform_bf16")?,
            fill_uniform_f32: f("fill_uniform_f32")?,
            rope_qkv: f("rope_qkv")?,
            gemv,
            gemv_tc,
            gemv_tc_exact,
            gemv_scalar: f("gemv_bf16_scalar")?,
            gemv_q8: f("gemv_q8")?,
            gemv_q4: f("gemv_q4")?,
            dequant_q8_bf16: f("dequant_q8_bf16")?,
            dequant_q4_bf16: f("dequant_q4_bf16")?,
            gemv2_simt_r1: [
                f("gemv2_bf16_r1")?,
                f("gemv2_bf16_r1_s2")?,
                f("gemv2_bf16_r1_s4")?,
            ],
            gemv2_rope_simt_r1: f("gemv2_rope_bf16_r1")?,
            gemv_r1: [
                f("gemv_bf16_r1")?,
                f("gemv_bf16_r1_s2")?,
                f("gemv_bf16_r1_s4")?,
            ],
            gemv_cat_simt_r1: [
                f("gemv_cat_bf16_r1")?,
                f("gemv_cat_bf16_r1_s2")?,
                f("gemv_cat_bf16_r1_s4")?,
            ],
            gemv_cat_late_simt_r1: [
                f("gemv_cat_late_bf16_r1")?,
                f("gemv_cat_late_bf16_r1_s2")?,
                f("gemv_cat_late_bf16_r1_s4")?,
            ],
            gemv2_tc,
            gemv2_tc_exact,
            gemv2_tcx_rope,
            attn_decode: f("attn_decode")?,
            attn_decode_hd64: f("attn_decode_hd64")?,
            attn_decode_hd128: f("attn_decode_hd128")?,
            attn_combine: f("attn_combine")?,
            attn_decode_tc64,
            attn_decode_tc128,
            attn_decode_tc_smem,
            attn_prefill_tc64: f("attn_prefill_tc64")?,
            attn_prefill_tc128: f("attn_prefill_tc128")?,
        })
    }
}

/// PTX per architecture, compiled once per process: every [`Gpu`] of that architecture
/// (each test, each shard) loads the same text.
pub(crate) fn ptx_for(arch: &str) -> Result<String, KernelError> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().map_err(|_| KernelError::Device {
        op: "nvrtc",
        message: "PTX cache lock poisoned".into(),
    })?;
    if let Some(p) = map.get(arch) {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "--extra-device-vectorization".into(),
        ],
        name: Some("falconer_kernels.cu".into()),
        ..CompileOptions::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        let message = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                format!("{}", log.to_string_lossy())
            }
            other => format!("{other:?}"),
        };
        KernelError::Device {
            op: "nvrtc compile",
            message,
        }
    })?;
    let text = ptx.to_src();
    map.insert(arch.to_string(), text.clone());
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole kernel source compiles under NVRTC for Ampere and Hopper, with the
    /// macro-made kernels among its entries. Only the NVRTC library is needed, no GPU:
    /// `.ci/run` installs it (NVIDIA's `nvidia-cuda-nvrtc` wheel) and sets
    /// `FALCONER_REQUIRE_NVRTC=1`, so that there a missing library fails the test;
    /// elsewhere the test prints that it skipped.
    #[test]
    fn kernels_compile_under_nvrtc() {
        // SAFETY: this only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("FALCONER_REQUIRE_NVRTC").is_none(),
                "FALCONER_REQUIRE_NVRTC is set but no NVRTC library loads"
            );
            println!("skipped: no NVRTC library (libnvrtc.so.13 on LD_LIBRARY_PATH)");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let ptx = ptx_for(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            for name in [
                "rope_qkv",
                "gemv_bf16_r1_s4",
                "gemv_cat_late_bf16_r1_s2",
                "attn_decode_hd64",
                "attn_decode_hd128",
                "attn_combine",
                "attn_decode_tc64",
                "attn_decode_tc128",
                "attn_prefill_tc128",
                "warp_probs_rows_f32",
                "gemv_q8",
                "gemv_q4",
                "dequant_q8_bf16",
                "dequant_q4_bf16",
            ] {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{arch}: no kernel {name} in the PTX"
                );
            }
        }
    }
}
